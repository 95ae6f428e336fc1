//! [`PgStore`], the handle of a store, and [`PgStoreOptions`]: the state the handle shares
//! between its clones (pools, background tasks, group appends, version hints), connecting and
//! migrating, and the schema-level operations. The statements run in `store.rs` (events),
//! `group.rs` (group appends), `kv.rs` (snapshots, checkpoints, read models) and `lease.rs`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::watch;

use tracktrace_core::{Error, Position, Result};

use crate::conns::{CachedConn, ConnCache};
use crate::error::map_err;
use crate::group_queue::Grouper;
use crate::hints::VersionHints;
use crate::migrate;
use crate::tasks::{self, Shared, TaskGuard};

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
    max_queued_appends: usize,
}

/// Default of [`PgStoreOptions::max_queued_appends`].
pub const DEFAULT_MAX_QUEUED_APPENDS: usize = 4096;

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
            max_queued_appends: DEFAULT_MAX_QUEUED_APPENDS,
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

    /// Single-event appends waiting for a group at most (default
    /// [`DEFAULT_MAX_QUEUED_APPENDS`]); an append beyond it fails at once with
    /// `Error::Overloaded` (nothing written) instead of queueing without bound.
    pub fn max_queued_appends(mut self, n: usize) -> Self {
        self.max_queued_appends = n.max(1);
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
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) appenders: ConnCache,
    /// Options of the pool's connections (leases open their own).
    pub(crate) conn_opts: PgConnectOptions,
    schema: String,
    pub(crate) lock_key: i32,
    pub(crate) shared: Arc<Shared>,
    /// Group appends (`None`: disabled).
    pub(crate) grouper: Option<Grouper>,
    /// Last versions of recently appended streams (see `hints`).
    pub(crate) hints: VersionHints,
    _tasks: TaskGuard,
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
            .map_err(|e| map_err("connect", e))?;
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
        let appenders = ConnCache::new(
            conn_opts.clone().options([
                ("plan_cache_mode", "force_generic_plan"),
                ("enable_bitmapscan", "off"),
                ("enable_sort", "off"),
            ]),
            opts.max_connections,
            opts.acquire_timeout,
        );
        let channel = format!("{}_log", opts.schema);
        let shared = Arc::new(Shared::new(channel, opts.notify));
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
                    Grouper::new(
                        opts.append_groups.min(opts.max_connections as usize),
                        opts.max_queued_appends,
                    )
                }),
                hints: VersionHints::new(),
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
            .map_err(|e| map_err("migrate", e))?;
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
            .map_err(|e| map_err("drop schema", e))?;
        Ok(())
    }

    pub(crate) fn watch(&self) -> watch::Receiver<Position> {
        self.inner.shared.head.subscribe()
    }

    /// After an append statement failed on `conn`: let the server finish aborting its
    /// transaction before the error is reported or the append retried (so a read right after
    /// does not lag behind it), discard the connection after an I/O or protocol error, and
    /// wake readers whose horizon the failed transaction may have held back.
    pub(crate) async fn settle_failed_append(&self, conn: &mut CachedConn<'_>, e: &sqlx::Error) {
        if matches!(e, sqlx::Error::Database(_)) {
            let _ = sqlx::Connection::ping(conn.conn()).await;
        } else {
            conn.broken = true;
        }
        let head = *self.inner.shared.head.borrow();
        self.inner.shared.committed(head);
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
