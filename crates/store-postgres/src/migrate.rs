//! A small versioned migration runner with the SQL files embedded in the binary.
//!
//! Each store schema has its own `tt_migrations` table. All pending migrations run in one
//! transaction that first takes a transaction-scoped advisory lock for the schema, so concurrent
//! `connect`s of the same schema wait for each other instead of racing on `CREATE`.

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

use tracktrace_core::Result;

use crate::error::map_err;

/// `(version, name, sql)`, in order. Never edit an applied migration: add a new one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("../migrations/0001_initial.sql")),
    (
        2,
        "brin_autosummarize",
        include_str!("../migrations/0002_brin_autosummarize.sql"),
    ),
    (
        3,
        "c_collation",
        include_str!("../migrations/0003_c_collation.sql"),
    ),
    (
        4,
        "xid_offset_function",
        include_str!("../migrations/0004_xid_offset_function.sql"),
    ),
    (
        5,
        "event_id_index_order",
        include_str!("../migrations/0005_event_id_index_order.sql"),
    ),
    (
        6,
        "careful_path_duplicate_probes",
        include_str!("../migrations/0006_careful_path_duplicate_probes.sql"),
    ),
    (
        7,
        "event_count",
        include_str!("../migrations/0007_event_count.sql"),
    ),
];

/// Second half of the migration advisory-lock key (the first is the schema's lock key).
const MIGRATE_LOCK: i32 = 1_953_759_234;

/// Creates `schema` if needed and applies pending migrations to it.
pub(crate) async fn run(conn: &mut PgConnection, schema: &str, lock_key: i32) -> Result<()> {
    let e = |e| map_err("migrate", e);
    let mut tx = conn.begin().await.map_err(e)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(lock_key)
        .bind(MIGRATE_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    // `schema` passed `validate_schema`: only [a-z0-9_].
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         SET LOCAL search_path TO \"{schema}\";
         CREATE TABLE IF NOT EXISTS tt_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    let applied: Vec<i32> = sqlx::query_scalar("SELECT version FROM tt_migrations")
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        sqlx::raw_sql(AssertSqlSafe(*sql))
            .execute(&mut *tx)
            .await
            .map_err(|err| map_err(&format!("migration {version} ({name})"), err))?;
        sqlx::query("INSERT INTO tt_migrations (version, name) VALUES ($1, $2)")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
    }
    // After a logical restore into another cluster, transaction ids may be lower than those the
    // stored positions were derived from: raise the offset so new positions stay above them.
    sqlx::query(
        "UPDATE log_meta SET xid_offset = x.needed
         FROM (SELECT COALESCE((SELECT max(position) FROM events), 0) / 1024 + 1
                      - pg_current_xact_id()::text::bigint AS needed) x
         WHERE log_meta.xid_offset < x.needed",
    )
    .execute(&mut *tx)
    .await
    .map_err(e)?;
    // The append statements read the offset from `tt_xid_offset()` (migration 4): keep it equal
    // to `log_meta`. Replacing it invalidates the cached plans that inlined the old value.
    let (offset, inlined): (i64, i64) =
        sqlx::query_as("SELECT m.xid_offset, tt_xid_offset() FROM log_meta m")
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
    if offset != inlined {
        sqlx::raw_sql(AssertSqlSafe(xid_offset_function(offset)))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
    }
    // The event count (migration 7) starts from one exact count of the existing log.
    crate::stats::seed(&mut tx, lock_key).await?;
    tx.commit().await.map_err(e)?;
    Ok(())
}

/// `CREATE OR REPLACE` of `tt_xid_offset()` returning `offset` (an integer: nothing to quote).
fn xid_offset_function(offset: i64) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION tt_xid_offset() RETURNS bigint \
         LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT {offset}::bigint'"
    )
}
