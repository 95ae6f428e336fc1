//! The read horizon (see "Gap-free global log" in the crate docs): the statement that computes
//! it, the lock key every append takes before its transaction id and that the statement looks
//! for, and [`horizon`], which runs it. Used by `read_all` and `head` (`store.rs`), `position_at`
//! (`time_range.rs`) and the re-checker task (`tasks.rs`).

use tracktrace_core::{Position, Result};

use crate::error::map_err;
use crate::rows::position;

/// Second half of the append advisory-lock key (see `tt_append` and [`horizon`]).
pub(crate) const APPEND_LOCK: i32 = 1_953_759_233;

/// The read horizon: positions below it are final.
///
/// Order matters and is forced by data dependencies: the statement snapshot (t0) is taken
/// before execution; the lock table is read (t1) when the first holder row is needed; each
/// holder's transaction id is read from its PGPROC via `pg_stat_get_activity` (t2), which needs
/// that row. Every append that may still commit then either
/// - held the store's advisory lock at t1 and had its id at t2: the horizon is at most that id;
/// - held it at t1 but got its id after t2, or took the lock after t1: its id is at least
///   `nextXid(t0) >= xmax(t0)`;
/// - held it at t1 and ended before t2: it is visible to the caller's next statement.
///
/// The id is read from PGPROC (set in the same instant the id is assigned) rather than from the
/// transaction's `transactionid` lock, which is taken a moment later: a reader in between would
/// miss the id. A holder whose details this role may not see (another role without
/// `pg_read_all_stats`) counts as the snapshot's xmin, which is never above its id.
/// The caller reads rows with a *later* statement, whose snapshot contains every append below
/// the horizon.
const HORIZON_SQL: &str = "
WITH s AS MATERIALIZED (
    SELECT pg_catalog.pg_snapshot_xmax(snap)::text::bigint AS xmax,
           pg_catalog.pg_snapshot_xmin(snap)::text::bigint AS xmin
    FROM pg_catalog.pg_current_snapshot() AS snap
), holders AS MATERIALIZED (
    SELECT l.pid
    FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid = $1::integer::oid AND l.objid = $2::integer::oid
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                        WHERE d.datname = pg_catalog.current_database())
), xids AS (
    SELECT (SELECT CASE
                       WHEN a.state IS NULL THEN s.xmin
                       ELSE s.xmax + ((a.backend_xid::text::bigint - s.xmax % 4294967296
                                       + 6442450944) % 4294967296) - 2147483648
                   END
            FROM pg_catalog.pg_stat_get_activity(h.pid) a) AS x
    FROM holders h, s
), h AS (
    SELECT least(s.xmax, (SELECT min(xids.x) FROM xids)) + tt_xid_offset()
           AS hx
    FROM s
)
SELECT h.hx * 1024,
       COALESCE((SELECT e.position FROM events e WHERE e.position < h.hx * 1024
                 ORDER BY e.position DESC LIMIT 1), 0),
       COALESCE((SELECT e.position FROM events e ORDER BY e.position DESC LIMIT 1), 0)
FROM h";

/// Result of [`horizon`].
pub(crate) struct Horizon {
    /// Positions below this are final.
    pub(crate) horizon: Position,
    /// Highest stored position below the horizon (0: none).
    pub(crate) head: Position,
    /// Highest stored position (may be at or above the horizon).
    pub(crate) max: Position,
}

pub(crate) async fn horizon<'c, E>(executor: E, lock_key: i32) -> Result<Horizon>
where
    E: sqlx::PgExecutor<'c>,
{
    let row = sqlx::query(HORIZON_SQL)
        .bind(lock_key)
        .bind(APPEND_LOCK)
        .fetch_one(executor)
        .await
        .map_err(|e| map_err("read horizon", e))?;
    Ok(Horizon {
        horizon: position(&row, 0)?,
        head: position(&row, 1)?,
        max: position(&row, 2)?,
    })
}
