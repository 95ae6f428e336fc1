//! [`store_stats`]: the number of events in the log and the bytes the schema uses, without a
//! scan of the log (see migration 7 for the table it keeps).
//!
//! Exactness: `events` is the number of events below the read horizon of the call, i.e.
//! exactly what a `read_all` from the start would return at that moment; appends still in
//! flight are counted by the first call after they commit. `bytes` is
//! `pg_total_relation_size` summed over the schema's tables (heap, indexes, TOAST and free
//! space inside them: the files PostgreSQL keeps for the store, not the WAL).

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool};
use tracktrace_core::{Error, Result, StoreStats};

use crate::error::map_err;
use crate::horizon::horizon;
use crate::rows::to_i64;

/// `$1`: the read horizon, computed by an earlier statement (so this statement's snapshot
/// holds every event below it); `$2`: the schema.
///
/// Counts the events between the stored `below` and the horizon and moves the row up to the
/// horizon. The `UPDATE` only applies if `below` is still what this statement read: when
/// another process moved it meanwhile (READ COMMITTED re-checks the condition on the newer
/// row), its total is as exact as this one and is kept. A horizon lower than `below` (another
/// process counted further already) counts nothing and reports the stored total.
const STATS_SQL: &str = "
WITH c AS MATERIALIZED (
    SELECT below, events FROM event_count
), n AS MATERIALIZED (
    SELECT c.below AS old_below,
           greatest(c.below, $1::bigint) AS below,
           c.events + (SELECT count(*) FROM events e
                       WHERE e.position >= c.below AND e.position < $1::bigint) AS events
    FROM c
), u AS (
    UPDATE event_count SET below = n.below, events = n.events
    FROM n
    WHERE event_count.below = n.old_below AND n.below > n.old_below
)
SELECT n.events,
       (SELECT COALESCE(sum(pg_catalog.pg_total_relation_size(t.oid)), 0)::bigint
        FROM pg_catalog.pg_class t
        JOIN pg_catalog.pg_namespace ns ON ns.oid = t.relnamespace
        WHERE ns.nspname = $2 AND t.relkind = 'r')
FROM n";

/// The stats of the store in `schema` (advisory-lock key `lock_key`).
///
/// Runs in a task of its own: the count covers everything appended since the last call, which
/// after a long pause between scrapes may take longer than a scraper waits. A caller that gives
/// up (its future is dropped) does not cancel the statement, so the mark still moves and the
/// next call starts from there instead of repeating the same work.
pub(crate) async fn store_stats(pool: &PgPool, lock_key: i32, schema: &str) -> Result<StoreStats> {
    let (pool, schema) = (pool.clone(), schema.to_owned());
    tokio::spawn(async move { count(&pool, lock_key, &schema).await })
        .await
        .map_err(|e| Error::backend("the store stats task failed", e))?
}

async fn count(pool: &PgPool, lock_key: i32, schema: &str) -> Result<StoreStats> {
    let h = horizon(pool, lock_key).await?;
    let row = sqlx::query(STATS_SQL)
        .bind(to_i64("horizon", h.horizon.get())?)
        .bind(schema)
        .fetch_optional(pool)
        .await
        .map_err(|e| map_err("store stats", e))?
        .ok_or_else(missing_row)?;
    let events: i64 = row.try_get(0).map_err(|e| map_err("store stats", e))?;
    let bytes: i64 = row.try_get(1).map_err(|e| map_err("store stats", e))?;
    Ok(StoreStats::new(
        u64::try_from(events).unwrap_or(0),
        u64::try_from(bytes).unwrap_or(0),
    ))
}

fn missing_row() -> Error {
    Error::Backend {
        message: "the event_count row is missing; `PgStore::migrate` counts the log again".into(),
        source: None,
    }
}

/// Writes the `event_count` row if there is none (migration 7, or a deleted row): the events
/// below the read horizon, counted once. Runs inside `migrate`'s transaction; the count is a
/// later statement than the horizon, so it sees every event below it.
pub(crate) async fn seed(conn: &mut PgConnection, lock_key: i32) -> Result<()> {
    let e = |e| map_err("migrate: counting the events", e);
    let present: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event_count)")
        .fetch_one(&mut *conn)
        .await
        .map_err(e)?;
    if present {
        return Ok(());
    }
    let h = horizon(&mut *conn, lock_key).await?;
    let below = to_i64("horizon", h.horizon.get())?;
    sqlx::query(
        "INSERT INTO event_count (below, events) \
         SELECT $1, count(*) FROM events WHERE position < $1",
    )
    .bind(below)
    .execute(&mut *conn)
    .await
    .map_err(e)?;
    Ok(())
}
