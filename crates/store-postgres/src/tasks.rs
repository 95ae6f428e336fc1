//! Background tasks of a store: the `LISTEN` task, the coalescing `NOTIFY` sender and the
//! horizon re-checker. All of them sleep on a channel or a socket while the store is idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use tracktrace_core::Position;

use crate::horizon::horizon;

/// State shared by a store and its tasks.
pub(crate) struct Shared {
    /// The value subscribers watch (a recent head; every change wakes them).
    pub(crate) head: watch::Sender<Position>,
    /// `LISTEN/NOTIFY` channel of the store.
    pub(crate) channel: String,
    /// Highest position to announce with the next `NOTIFY`.
    out_pos: AtomicU64,
    /// Wakes the notifier.
    out_wake: Notify,
    /// Whether commits are announced to other processes.
    notify: bool,
    /// Highest committed position a reader found above its horizon (0: none pending).
    pending: AtomicU64,
    /// Wakes the re-checker.
    recheck: Notify,
}

impl Shared {
    pub(crate) fn new(channel: String, notify: bool) -> Self {
        Self {
            head: watch::channel(Position::START).0,
            channel,
            out_pos: AtomicU64::new(0),
            out_wake: Notify::new(),
            notify,
            pending: AtomicU64::new(0),
            recheck: Notify::new(),
        }
    }

    /// Wakes every subscriber (always counts as a change, even with an equal value).
    pub(crate) fn bump(&self, at_least: Position) {
        self.head.send_modify(|h| *h = (*h).max(at_least));
    }

    /// After a local commit: wake local subscribers now, other processes via `NOTIFY` soon.
    pub(crate) fn committed(&self, last: Position) {
        self.bump(last);
        if self.notify {
            self.out_pos.fetch_max(last.get(), Ordering::Relaxed);
            self.out_wake.notify_one();
        }
    }

    /// A reader saw committed events at or above its horizon (an older append was still in
    /// flight). Its commit normally wakes everybody; this is the safety net for an append whose
    /// process died before it could notify: re-check until the horizon passes `max`.
    pub(crate) fn pending(&self, max: Position) {
        self.pending.fetch_max(max.get(), Ordering::Relaxed);
        self.recheck.notify_one();
    }
}

/// Aborts the store's tasks when the last handle of the store is dropped.
pub(crate) struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    pool: PgPool,
    listener: Option<PgConnectOptions>,
    lock_key: i32,
) -> TaskGuard {
    let mut tasks = vec![
        tokio::spawn(notifier(shared.clone(), pool.clone())),
        tokio::spawn(rechecker(shared.clone(), pool, lock_key)),
    ];
    if let Some(opts) = listener {
        // A dedicated one-connection pool: PgListener uses it to (re)connect. It pings on
        // checkout so a reconnect never picks up the dead connection again.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(opts);
        tasks.push(tokio::spawn(listen(shared, pool)));
    }
    TaskGuard(tasks)
}

/// Least time between two `NOTIFY`s of one store. Each `NOTIFY` is a transaction with a commit
/// record (PostgreSQL needs a transaction id for it), so under a steady stream of appends this
/// caps the extra commits at 200/s; subscribers in *other* processes see new events at most
/// this much later (local subscribers are woken at once).
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// Sends coalesced `NOTIFY`s: at most one in flight and one per [`NOTIFY_INTERVAL`]; a burst of
/// commits costs one or two.
async fn notifier(shared: Arc<Shared>, pool: PgPool) {
    loop {
        shared.out_wake.notified().await;
        let pos = shared.out_pos.load(Ordering::Relaxed);
        // A plain (synchronous) commit. `synchronous_commit = off` for this transaction looks
        // cheaper, but appends measured several times slower with it on the (noisy) dev
        // machine: each asynchronous commit wakes the WAL writer, whose extra flushes compete
        // with the appends' own commit flushes.
        let res = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&shared.channel)
            .bind(pos.to_string())
            .execute(&pool)
            .await;
        if let Err(e) = res {
            tracing::warn!(channel = %shared.channel, error = %e, "NOTIFY failed; subscribers in other processes wake on the next commit");
        }
        // Commits during the pause are announced together by the next round.
        tokio::time::sleep(NOTIFY_INTERVAL).await;
    }
}

/// Re-checks the horizon with exponential backoff while committed events wait behind an
/// append that never announced its end; wakes subscribers once they are readable.
async fn rechecker(shared: Arc<Shared>, pool: PgPool, lock_key: i32) {
    loop {
        shared.recheck.notified().await;
        let mut delay = Duration::from_millis(50);
        loop {
            tokio::time::sleep(delay).await;
            let target = shared.pending.load(Ordering::Relaxed);
            if target == 0 {
                break;
            }
            match horizon(&pool, lock_key).await {
                Ok(h) if h.horizon > Position::new(target) => {
                    shared.bump(Position::START);
                    if shared
                        .pending
                        .compare_exchange(target, 0, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        break;
                    }
                }
                _ => delay = (delay * 2).min(Duration::from_secs(2)),
            }
        }
    }
}

/// Follows the store's channel. After every (re)connection it wakes all subscribers, since
/// notifications sent while it was away are lost.
async fn listen(shared: Arc<Shared>, pool: PgPool) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(channel = %shared.channel, error = %e, ?backoff, "LISTEN connection failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(&shared.channel).await {
            tracing::warn!(channel = %shared.channel, error = %e, ?backoff, "LISTEN failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        backoff = Duration::from_millis(50);
        shared.bump(Position::START);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let p = n.payload().parse().map(Position::new).unwrap_or_default();
                    shared.bump(p);
                }
                // The connection was lost and re-established (with LISTEN re-issued).
                Ok(None) => shared.bump(Position::START),
                Err(e) => {
                    tracing::warn!(channel = %shared.channel, error = %e, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
        drop(listener);
        tokio::time::sleep(backoff).await;
    }
}
