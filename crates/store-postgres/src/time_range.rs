//! Time-range reads: [`position_at`], where a window of recorded-at time starts in the log.
//!
//! `recorded_at` is the appending transaction's `now()` (its start) while positions derive from
//! its transaction id, assigned a moment later (after the store's shared advisory lock). Two
//! concurrent appends can therefore have recorded-at and position in opposite orders, by at most
//! the time between an append's start and its id (normally well under a millisecond; longer
//! only while it waits for a lock). The answer is nevertheless exact: it is the *minimum*
//! position over every event recorded at or after `at`, not the first in position order.
//!
//! Cost: the BRIN index on `recorded_at` (summarized as ranges fill, migration 2) selects the
//! block ranges that may hold such events, i.e. the part of the table written since `at`; the
//! earlier part of the log is never read. The statement is sent unprepared so each execution
//! is planned with its actual bound: a generic plan cannot know that `recorded_at >= $1` is
//! selective and would walk the primary key from the start of the log. The `MATERIALIZED`
//! CTE keeps the planner from turning `min(position)` into that same primary-key walk.

use sqlx::Row;
use tracktrace_core::{Position, Result, Timestamp};

use crate::error::map_err;
use crate::handle::PgStore;
use crate::horizon::horizon;

const POSITION_AT_SQL: &str = "
WITH w AS MATERIALIZED (
    SELECT position FROM events
    WHERE recorded_at >= timestamptz 'epoch' + $1::bigint * interval '1 microsecond'
)
SELECT min(position) FROM w";

/// The lowest position of an event recorded at or after `at`, capped at the read horizon (an
/// append still in flight may commit below any committed position above the horizon, and is
/// then found by a read from the horizon); the horizon itself when no event qualifies.
pub(crate) async fn position_at(store: &PgStore, at: Timestamp) -> Result<Position> {
    let pool = &store.inner.pool;
    // Horizon first: every event below it is committed and visible to the next statement.
    let h = horizon(pool, store.inner.lock_key).await?;
    let row = sqlx::query(POSITION_AT_SQL)
        .persistent(false)
        .bind(at.unix_micros())
        .fetch_one(pool)
        .await
        .map_err(|e| map_err("position at", e))?;
    let first: Option<i64> = row.try_get(0).map_err(|e| map_err("position at", e))?;
    let first = first.map_or(h.horizon, |p| Position::new(u64::try_from(p).unwrap_or(0)));
    Ok(first.min(h.horizon))
}
