//! Shared helpers of the PostgreSQL integration tests: database URL, skip-or-fail policy and a
//! fresh schema per store (dropped again when the store is dropped).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};

/// Environment variable naming the test database.
pub const URL_VAR: &str = "TRACKTRACE_TEST_DATABASE_URL";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A unique schema name `tt_<unix seconds, hex>_<random hex>` (the timestamp lets a later run
/// drop schemas that a crashed run left behind).
pub fn fresh_schema() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("tt_{secs:x}_{:016x}", fastrand::u64(..))
}

static CLEANED: AtomicBool = AtomicBool::new(false);

/// Drops test schemas older than 30 minutes (left behind by killed runs).
async fn drop_stale_schemas(url: &str) {
    if CLEANED.swap(true, Ordering::SeqCst) {
        return;
    }
    // A single direct connection: fails at once when nothing listens (a pool would retry).
    let Ok(opts) = url.parse::<sqlx::postgres::PgConnectOptions>() else {
        return;
    };
    let Ok(mut conn) = sqlx::ConnectOptions::connect(&opts).await else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname ~ '^tt_[0-9a-f]+_[0-9a-f]{16}$'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    for n in names {
        let secs = n
            .split('_')
            .nth(1)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or(now);
        if now.saturating_sub(secs) > 1800 {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{n}\" CASCADE"
            )))
            .execute(&mut conn)
            .await;
        }
    }
    let _ = sqlx::Connection::close(conn).await;
}

/// Connects a store in a fresh schema. `None` (after a loud message) when the database is
/// unreachable outside CI; under `CI=true` an unreachable database panics (fails the test).
pub async fn try_store_with(
    opts: impl FnOnce(PgStoreOptions) -> PgStoreOptions,
) -> Option<TestStore> {
    let url = url();
    drop_stale_schemas(&url).await;
    let schema = fresh_schema();
    match PgStore::connect_with(opts(PgStoreOptions::new(&url).schema(&schema))).await {
        Ok(store) => Some(Intercepted(TestSchema { store })),
        Err(e) if e.is_retryable() && !in_ci() => {
            eprintln!(
                "\n=== SKIPPING PostgreSQL test: database at {url} unreachable ({e}).\n\
                 === Set {URL_VAR} to a reachable database (CI=true turns this into a failure).\n"
            );
            None
        }
        Err(e) => panic!("cannot connect to the test database {url} (set {URL_VAR}): {e}"),
    }
}

pub async fn try_store() -> Option<TestStore> {
    try_store_with(|o| o).await
}

/// A store for a factory that must return one: panics when the database is unreachable,
/// naming the variable (the conformance macros cannot skip).
pub async fn store() -> TestStore {
    match try_store().await {
        Some(s) => s,
        None => panic!("PostgreSQL unreachable: set {URL_VAR} (see the message above)"),
    }
}

/// A [`PgStore`] in its own schema, dropped with the store ([`TestSchema`] as a store of every
/// capability).
pub type TestStore = Intercepted<TestSchema>;

/// A [`PgStore`] in its own schema, dropped with this value.
pub struct TestSchema {
    pub store: PgStore,
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let url = url();
        let schema = self.store.schema().to_owned();
        // Drop runs inside the test's runtime: do the blocking work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

impl Intercept for TestSchema {
    type Inner = PgStore;

    fn inner(&self) -> &PgStore {
        &self.store
    }
}

pub fn arc(s: TestStore) -> Arc<TestStore> {
    Arc::new(s)
}
