//! PostgreSQL backend for tracktrace: an [`EventStore`](tracktrace_core::EventStore) with a
//! gap-free global log, plus [`SnapshotStore`](tracktrace_core::SnapshotStore),
//! [`CheckpointStore`](tracktrace_core::CheckpointStore) and
//! [`ReadModelStore`](tracktrace_core::ReadModelStore), on sqlx (runtime-checked
//! queries only: building this crate never needs a database).
//!
//! ```no_run
//! use std::sync::Arc;
//! use tracktrace_core::{
//!     EventStore, EventStoreExt, ExpectedVersion, NewEvent, StreamId, SubscribeOptions,
//!     Subscription, TenantId,
//! };
//! use tracktrace_store_postgres::{PgStore, PgStoreOptions};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Connects, creates the schema `tracktrace` if needed and applies pending migrations.
//! let store = PgStore::connect_with(
//!     PgStoreOptions::new("postgres://postgres@127.0.0.1:5432/test").schema("tracktrace"),
//! )
//! .await?;
//! let tenant = TenantId::parse("acme")?;
//! let bag = StreamId::parse("Bag-0001")?;
//! let out = store
//!     .append_to(&tenant, &bag, ExpectedVersion::NoStream, vec![
//!         NewEvent::json("CHECKED_IN", &serde_json::json!({"at": "MAD"})),
//!     ])
//!     .await?;
//! println!("stored at position {}", out.last_position());
//!
//! // Follow the global log: catch-up, then live via LISTEN/NOTIFY.
//! let store: Arc<dyn EventStore> = Arc::new(store);
//! let mut sub = Subscription::new(store, SubscribeOptions::default());
//! let first = sub.next().await?;
//! println!("{} {}", first.position, first.event_type);
//! # Ok(())
//! # }
//! ```
//!
//! # Schema
//! Everything lives in one PostgreSQL schema (default `tracktrace`, see
//! [`PgStoreOptions::schema`]), so several stores (and parallel tests) share a database.
//! Migrations are SQL files embedded in the binary and applied by [`PgStore::connect_with`] /
//! [`PgStore::migrate`] with a small versioned runner: table `tt_migrations` *inside* the
//! store's schema records the applied versions, and a transaction-scoped advisory lock
//! serialises concurrent runners. (`sqlx::migrate!` keeps one `_sqlx_migrations` table per
//! `search_path`, which is easy to get wrong with one schema per store.) Every connection of the
//! pool sets `search_path` to the store's schema.
//!
//! Tables: `events` (the global log: primary key `position`; unique `(tenant, stream, version)`
//! for stream reads and versions, `(event_id, tenant)` and `(tenant, dedup_key)` for
//! idempotency; a BRIN index on `recorded_at` for time-range scans), `snapshots`,
//! `checkpoints`, `read_models`, and the one-row `log_meta`.
//!
//! # Appends
//! One append is one statement (one round trip, one implicit transaction): it takes the store's
//! shared advisory lock, reads the stream's version from the unique `(tenant, stream,
//! version)` index, checks the expected version and inserts all events with one `UNNEST`. The
//! database enforces optimistic concurrency: two appends that both read version `v` both try to
//! insert `v + 1`; the unique index lets one commit and fails the other. After such a unique
//! violation (or a failed precondition) the append is re-run through the PL/pgSQL function
//! `tt_append`, which takes a per-stream lock, looks duplicates up by event id, then dedup key,
//! and only then compares versions: so a conflict carries the actual version, and concurrent
//! duplicates end exactly as the kernel's rule says. There is no separate stream-head table to
//! update: one heap insert per event is all an append writes.
//!
//! An append to a stream whose version is known skips the version read (a backward index scan that
//! checks every entry of the stream on the index's last leaf page, the costliest part of a
//! single-event statement after the commit): `NoStream` / `Exact(0)` insert version 1, which the
//! unique index refuses if the stream has events; `Exact(v)` inserts `v + 1` if version `v` exists
//! (a forward probe that stops at the first entry past `v`); `Any` and `StreamExists` do the same
//! with the version this process last saw the stream at (a small lock-free table of recent streams,
//! `hints.rs`). The database verifies the believed version either way, so a stale one (another
//! process appended meanwhile) only costs the careful path's extra statement, never a misplaced
//! event. Batches and group appends use the same believed versions.
//!
//! # Group appends
//! Under load, single-event appends share statements: at most
//! [`PgStoreOptions::append_groups`] of them run at once, and one that finds them all busy is
//! queued; the next statement takes every queued single-event append (distinct streams, up to
//! 256) as one group, in one transaction, with the same precondition check per request. A
//! request the group could not store (failed precondition, duplicate, lost race) is finished
//! alone on the careful path, so results are exactly those of single appends; an idle store
//! runs each append at once. While no group is running, up to twice as many appends run alone
//! before anything is queued: with a few more appenders than slots, groups would hold one or
//! two requests, too few to pay for the group statement, and the slot limit would only cut the
//! number of commits in flight. Batches (more than one event) are never grouped.
//!
//! # Gap-free global log
//! A sequence hands out numbers in one order while transactions commit in another, so a
//! reader by position could skip an event that commits late. Here the position of an event is
//! derived from its transaction id: `(xid + offset) * 1024 + index in the batch` (a batch has
//! at most 1000 events), so positions follow transaction-id order. Every append first takes a
//! shared, transaction-scoped advisory lock (key derived from the schema name) and only then
//! gets its transaction id. A reader computes a *horizon*: the `xmax` of its statement snapshot,
//! lowered to the transaction id of every append still holding that lock (`pg_locks` for the
//! holders, then their ids from `pg_stat_get_activity`, i.e. straight from the process array);
//! it then reads, with a newer snapshot, only positions below the horizon. Every append that
//! may still commit has a transaction id at or above the horizon, so nothing can ever appear
//! below what a reader has seen (the argument is spelled out on `HORIZON_SQL` in `store.rs`).
//! Appends never wait for each other (no global lock: group commit keeps working); readers pay
//! one extra statement per page. Only this store's in-flight appends hold readers back, not
//! unrelated transactions elsewhere in the cluster, and a reader right after an append sees
//! it. `read_stream`, `get_event` and `stream_version` need no horizon.
//!
//! After a logical restore into another cluster (lower transaction ids), [`PgStore::migrate`]
//! raises `offset` so new positions stay above the restored ones. `log_meta` records the
//! offset; append statements read it from `tt_xid_offset()`, an `IMMUTABLE` SQL function with
//! a constant body that PostgreSQL inlines into their plans (no table read per append).
//! `migrate` replaces the function whenever the offset changes, which invalidates every cached
//! plan that inlined the old value, in every session.
//!
//! # Notifications
//! After a commit the appending process wakes its local subscribers at once and asks a
//! background task to `pg_notify` the store's channel (coalesced: at most one in flight and
//! one per 5 ms). The `NOTIFY` runs outside the append transaction: inside it, PostgreSQL
//! would serialise the commits of all appends on its notify-queue lock. One
//! [`sqlx::postgres::PgListener`] per store wakes subscribers on notifications from other
//! processes; after a lost connection it reconnects with backoff and wakes everybody so they
//! catch up. If a reader finds committed events held back by an append that never announces
//! its end (its process died), a background task re-checks the horizon with exponential
//! backoff until they are readable. Nothing polls while idle.
//!
//! # Failures
//! Lost connections, pool timeouts, shutdown / too-many-connections / serialization SQLSTATEs
//! map to the retryable [`tracktrace_core::Error::Unavailable`]; acquiring or opening a
//! connection is bounded by [`PgStoreOptions::acquire_timeout`], so a dead server fails fast.
//!
//! # Connections
//! Appends and log/stream reads use a small connection cache of the store's own
//! ([`PgStoreOptions::max_connections`] connections): sqlx's pool pings every connection when
//! it is returned, a full round trip per operation, which would double the cost of a
//! one-round-trip append. Connections are not pinged before use either: a dead one fails its
//! statement with an I/O error (`Unavailable`, and it is discarded); appends are idempotent by
//! event id, so the caller's retry is safe. The remaining operations (snapshots, checkpoints,
//! read models, `stream_version`, `get_event`) use the sqlx pool ([`PgStore::pool`]), also
//! without ping-before-use.

#[macro_use]
mod sql;
mod conns;
mod error;
mod group;
mod hints;
mod kv;
mod lease;
mod migrate;
mod rows;
mod store;
mod tasks;
mod time_range;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::watch;

use tracktrace_core::{Error, Position, Result};

pub use lease::Lease;
pub use tracktrace_core;

/// Default schema of a store.
pub const DEFAULT_SCHEMA: &str = "tracktrace";

/// Longest accepted schema name (the notification channel appends a suffix and PostgreSQL
/// identifiers are limited to 63 bytes).
pub const MAX_SCHEMA_LEN: usize = 48;

/// Default of [`PgStoreOptions::append_groups`].
pub const DEFAULT_APPEND_GROUPS: usize = 4;

/// How to connect a [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgStoreOptions {
    url: String,
    connect: Option<PgConnectOptions>,
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    application_name: String,
    listen: bool,
    notify: bool,
    append_groups: usize,
}

impl PgStoreOptions {
    /// Options for the database at `url` (`postgres://user@host:port/db`), with defaults:
    /// schema [`DEFAULT_SCHEMA`], 10 connections, 3 s acquire timeout, listener enabled.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect: None,
            schema: DEFAULT_SCHEMA.to_owned(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            application_name: "tracktrace".to_owned(),
            listen: true,
            notify: true,
            append_groups: DEFAULT_APPEND_GROUPS,
        }
    }

    /// Connection settings built in code (host, credentials, TLS, ...) instead of the URL given
    /// to [`PgStoreOptions::new`]. The store still sets `search_path` and `application_name`.
    pub fn connect_options(mut self, opts: PgConnectOptions) -> Self {
        self.connect = Some(opts);
        self
    }

    /// The schema holding every table of the store (`[a-z_][a-z0-9_]*`, at most
    /// [`MAX_SCHEMA_LEN`] bytes). Created if missing.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Size of the connection pool.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long an operation waits for a pooled connection (or for a new one to be opened)
    /// before failing with `Unavailable`. Keep it short so a dead server fails fast.
    pub fn acquire_timeout(mut self, t: Duration) -> Self {
        self.acquire_timeout = t;
        self
    }

    /// Time limit for the first connection made by [`PgStore::connect_with`].
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// `application_name` of the pool's connections (the listener's connection gets
    /// `<name>-listener`).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Whether commits are announced with `NOTIFY` to other processes (default `true`). A bulk
    /// loader may turn it off: other processes then see its events with the next notification
    /// of any other writer (or after their listener reconnects).
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// How many single-event append statements run at once before further single-event
    /// appends are grouped (default [`DEFAULT_APPEND_GROUPS`]; `0` never groups). When that
    /// many are in flight, the next statement to start takes every queued single-event append
    /// (to distinct streams) as one group: one statement and one transaction, so PostgreSQL
    /// pays its per-transaction costs once for the group. While no group is running, up to as
    /// many again run alone before anything is queued (a few more appenders than slots make
    /// groups of one or two, which cost more than they save). See "Group appends" in the crate
    /// docs. Capped at [`PgStoreOptions::max_connections`].
    pub fn append_groups(mut self, n: usize) -> Self {
        self.append_groups = n;
        self
    }

    /// Whether to run the `LISTEN` task that wakes subscribers on appends made by other
    /// processes (default `true`; appends of this store wake its own subscribers either way).
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }
}

/// A tracktrace store in one PostgreSQL schema. Cheap to clone (clones share the pool and the
/// background tasks, which stop when the last clone is dropped).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    appenders: conns::ConnCache,
    /// Options of the pool's connections (leases open their own).
    conn_opts: PgConnectOptions,
    schema: String,
    lock_key: i32,
    shared: Arc<tasks::Shared>,
    /// Group appends (`None`: disabled).
    grouper: Option<group::Grouper>,
    /// Last versions of recently appended streams (see `hints`).
    hints: hints::VersionHints,
    _tasks: tasks::TaskGuard,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

/// Checks a schema name (it is interpolated into DDL, so only a safe alphabet is accepted).
pub fn validate_schema(schema: &str) -> Result<()> {
    let ok_first = schema
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok_first || !ok_rest || schema.len() > MAX_SCHEMA_LEN || schema.starts_with("pg_") {
        return Err(Error::invalid(
            "schema",
            format!(
                "{schema:?} is not a valid schema name: use 1-{MAX_SCHEMA_LEN} bytes of [a-z0-9_], \
                 starting with a letter or '_', not starting with 'pg_'"
            ),
        ));
    }
    Ok(())
}

/// Advisory-lock key (first half) of a schema: FNV-1a of its name folded into a positive i32.
/// Collisions between schemas only make readers more conservative, never incorrect.
fn lock_key(schema: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in schema.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff).max(1) as i32
}

impl PgStore {
    /// Connects to `url` with default options (schema [`DEFAULT_SCHEMA`]) and migrates.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(PgStoreOptions::new(url)).await
    }

    /// Connects, creates the schema if needed, applies pending migrations and starts the
    /// notification tasks. Must be called within a Tokio runtime.
    pub async fn connect_with(opts: PgStoreOptions) -> Result<Self> {
        validate_schema(&opts.schema)?;
        let base: PgConnectOptions = match &opts.connect {
            Some(c) => c.clone(),
            None => opts
                .url
                .parse()
                .map_err(|e: sqlx::Error| Error::invalid("url", e.to_string()))?,
        };
        let conn_opts = base
            .clone()
            .options([("search_path", opts.schema.as_str())])
            .application_name(&opts.application_name);
        let lock_key = lock_key(&opts.schema);

        // One direct connection first: fails fast with the real cause (connection refused,
        // authentication, ...) instead of a pool timeout, and runs the migrations.
        let mut conn = tokio::time::timeout(opts.connect_timeout, conn_opts.connect())
            .await
            .map_err(|_| Error::Unavailable {
                reason: format!(
                    "connecting to PostgreSQL timed out after {:?}",
                    opts.connect_timeout
                ),
                retry_after: None,
                source: None,
            })?
            .map_err(|e| error::map_err("connect", e))?;
        migrate::run(&mut conn, &opts.schema, lock_key).await?;
        let _ = conn.close().await;

        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .min_connections(0)
            .acquire_timeout(opts.acquire_timeout)
            // No ping on checkout: it costs a round trip per operation; a dead connection makes
            // its statement fail with an I/O error (=> Unavailable, retryable, and appends are
            // idempotent), after which sqlx discards it.
            .test_before_acquire(false)
            .idle_timeout(Duration::from_secs(300))
            .max_lifetime(Duration::from_secs(1800))
            .connect_lazy_with(conn_opts.clone());

        // Appends always run the same two statements, whose generic plans are as good as any
        // custom one (index probes and an INSERT ... SELECT FROM unnest). Left to `auto`, the
        // planner keeps choosing custom plans (a custom plan knows the arrays' lengths, so it
        // looks cheaper) and re-plans the CTE on every append: ~130 µs, more than executing it.
        //
        // The same connections read the log and streams. A generic plan estimates a parameter
        // range (`position >= $1 AND position < $2`) at a fixed 0.5 % of the table, so a
        // filtered `read_all` page was planned as a bitmap scan of the whole range (and, with a
        // tenant filter, of the tenant's index entries) followed by a sort: every page of a
        // catch-up would read everything up to the horizon (`EXPLAIN` at 5,000 and 200,000
        // events). Every statement on these connections has an index that delivers its rows in
        // order (appends, version probes, stream reads by `(tenant, stream, version)`, log
        // pages by `position`), so bitmap scans and sorts are switched off here, where they are
        // only ever the wrong choice; the ordered index scans stop at the page's `LIMIT`.
        let appenders = conns::ConnCache::new(
            conn_opts.clone().options([
                ("plan_cache_mode", "force_generic_plan"),
                ("enable_bitmapscan", "off"),
                ("enable_sort", "off"),
            ]),
            opts.max_connections,
            opts.acquire_timeout,
        );
        let channel = format!("{}_log", opts.schema);
        let shared = Arc::new(tasks::Shared::new(channel, opts.notify));
        let lease_opts = conn_opts
            .clone()
            .application_name(&format!("{}-lease", opts.application_name));
        let listener_opts =
            conn_opts.application_name(&format!("{}-listener", opts.application_name));
        let guard = tasks::spawn(
            shared.clone(),
            pool.clone(),
            opts.listen.then_some(listener_opts),
            lock_key,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                appenders,
                conn_opts: lease_opts,
                schema: opts.schema,
                lock_key,
                shared,
                grouper: (opts.append_groups > 0).then(|| {
                    group::Grouper::new(opts.append_groups.min(opts.max_connections as usize))
                }),
                hints: hints::VersionHints::new(),
                _tasks: guard,
            }),
        })
    }

    /// Applies pending migrations (idempotent; [`PgStore::connect_with`] already did).
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|e| error::map_err("migrate", e))?;
        migrate::run(&mut conn, &self.inner.schema, self.inner.lock_key).await
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The connection pool (its connections have `search_path` set to [`PgStore::schema`]).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Name of the `LISTEN/NOTIFY` channel announcing new events (`<schema>_log`; the payload
    /// is the position of the last event of a commit).
    pub fn channel(&self) -> &str {
        &self.inner.shared.channel
    }

    /// Drops the store's schema with everything in it. Irreversible; meant for tests and
    /// tear-down scripts. Other handles to the same schema fail afterwards.
    pub async fn drop_schema(&self) -> Result<()> {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.inner.schema);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.inner.pool)
            .await
            .map_err(|e| error::map_err("drop schema", e))?;
        Ok(())
    }

    fn watch(&self) -> watch::Receiver<Position> {
        self.inner.shared.head.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        for ok in ["tracktrace", "tt_0a1b", "_x", "a1"] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "A", "a-b", "a\"b", "pg_temp", &"a".repeat(49)] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_keys_are_positive_and_stable() {
        assert_eq!(lock_key("tracktrace"), lock_key("tracktrace"));
        assert_ne!(lock_key("a"), lock_key("b"));
        for s in ["", "a", "tracktrace", "tt_ffffffff"] {
            assert!(lock_key(s) > 0);
        }
    }
}
