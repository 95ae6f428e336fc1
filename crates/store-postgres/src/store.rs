//! [`EventStore`] for [`PgStore`].

use async_trait::async_trait;
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;
use uuid::Uuid;

use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, Direction, Error, EventId, EventRef, EventStore,
    Position, ReadAll, ReadStream, RecordedEvent, Result, StoreStats, StreamId, TenantId, Version,
    resolve_duplicates, validate_batch,
};

use crate::bind::{bind_event, expected_params, headers_json, schema_version_param};
use crate::conns::CachedConn;
use crate::error::{is_unique_violation, map_err};
use crate::group::Entry;
use crate::group_queue::Reply;
use crate::handle::PgStore;
use crate::horizon::horizon;
use crate::rows::{EVENT_COLUMNS, decode_event, decode_event_with_ids, position, to_i64};
use crate::stats::store_stats;
use crate::time_range::position_at;

/// How often an append is re-run after losing a race (unique violation from a concurrent
/// duplicate, or a concurrent append that took the same versions) before giving up as
/// `Unavailable`. Retries serialise per stream, so more than two are rare.
const MAX_APPEND_ATTEMPTS: usize = 16;

/// Most events a stream read reserves room for up front (see `read_stream`).
const MAX_PRESIZED_READ: usize = 100_000;

/// The careful path (`tt_append`, PL/pgSQL): duplicates looked up first, then the version;
/// used after the fast path reports a failed precondition or hits a unique violation.
const APPEND_SQL: &str = "SELECT o_kind, o_idx, o_event_id, o_stream, o_version, o_position, \
     o_recorded_us FROM tt_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";

/// The fast path: one plain statement, same parameters as [`APPEND_SQL`] (`$6`, "retry", is
/// always false here) and `$16`, the version the stream is believed to be at (NULL: look it
/// up; see [`FAST_APPEND_HINT_SQL`] for how a belief is checked). It returns the row of kind 0
/// of [`APPEND_SQL`] (first version and position), or no row when the precondition failed (or
/// the belief was wrong): then the careful path decides between duplicate and conflict.
///
/// Order is forced by data dependencies: `ok` reads `cur`, whose `FROM` takes the store's
/// shared advisory lock, and computes the first position from `pg_current_xact_id()`, which
/// assigns the transaction id: strictly after the lock (the invariant `HORIZON_SQL` relies
/// on). The insert reads `ok`. The answer is computed from `ok` and the batch's length, not
/// from `RETURNING` rows: a data-modifying CTE always runs to completion, and it inserts every
/// event or fails the statement (unique violation), so nothing is gained by collecting and
/// aggregating a row per event.
const FAST_APPEND_SQL: &str = concat!(
    "
WITH cur AS MATERIALIZED (
    SELECT CASE WHEN $16::bigint IS NULL
                THEN COALESCE((SELECT e.version FROM events e WHERE e.tenant = $2
                               AND e.stream = $3 ORDER BY e.version DESC LIMIT 1), 0)
                WHEN $16::bigint = 0 OR (SELECT e.version FROM events e WHERE e.tenant = $2
                                         AND e.stream = $3 AND e.version >= $16::bigint
                                         ORDER BY e.version LIMIT 1) = $16::bigint
                THEN $16::bigint
                ELSE -1
           END AS v
    FROM ",
    append_lock!(),
    "
), ok AS MATERIALIZED (
    SELECT cur.v, ",
    first_position!(),
    " AS p
    FROM cur
    WHERE NOT $6::boolean AND cur.v >= 0
      AND CASE $4::smallint WHEN 0 THEN true WHEN 1 THEN cur.v = 0 WHEN 2 THEN cur.v > 0
                            ELSE cur.v = $5::bigint END
), ins AS (
    ",
    insert_events!(),
    "    SELECT ok.p + u.i - 1,
           $2, $3, ok.v + u.i, u.id, u.dk, u.ty, u.sv, u.ct, u.pl, u.co, u.ca, u.hd::jsonb,
           now()
    FROM ok,
         unnest($7::uuid[], $8::text[], $9::text[], $10::integer[], $11::text[], $12::bytea[],
                $13::text[], $14::text[], $15::text[])
         WITH ORDINALITY AS u(id, dk, ty, sv, ct, pl, co, ca, hd, i)
)
SELECT 0::smallint, cardinality($7::uuid[])::integer, NULL::uuid, NULL::text, ok.v + 1, ok.p,
       NULL::bigint
FROM ok",
);

/// [`FAST_APPEND_SQL`] for the common single-event append, with scalar parameters: no arrays
/// to encode and decode, no `unnest` to set up (about a quarter of the statement's execution
/// time for one event). `$1`–`$5` as there; `$6`–`$14` the event's columns.
const FAST_APPEND_ONE_SQL: &str = concat!(
    "
WITH cur AS MATERIALIZED (
    SELECT COALESCE((SELECT e.version FROM events e WHERE e.tenant = $2 AND e.stream = $3
                     ORDER BY e.version DESC LIMIT 1), 0) AS v
    FROM ",
    append_lock!(),
    "
)
",
    insert_events!(),
    "SELECT ",
    first_position!(),
    ",
       $2, $3, cur.v + 1, $6::uuid, $7::text, $8::text, $9::integer, $10::text, $11::bytea,
       $12::text, $13::text, $14::text::jsonb, now()
FROM cur
WHERE CASE $4::smallint WHEN 0 THEN true WHEN 1 THEN cur.v = 0 WHEN 2 THEN cur.v > 0
                        ELSE cur.v = $5::bigint END
RETURNING 0::smallint, 1, NULL::uuid, NULL::text, version, position, NULL::bigint",
);

/// [`FAST_APPEND_ONE_SQL`] for a single event to a stream expected not to exist
/// (`NoStream` or `Exact(0)`, what a command on a new aggregate sends): no version lookup. The
/// event is inserted at version 1; if the stream has events, version 1 exists and the unique
/// `(tenant, stream, version)` index refuses the row, and the careful path reports the
/// conflict (or the duplicate). `$1`–`$3` as there; `$4`–`$12` the event's columns.
///
/// Kept apart from [`FAST_APPEND_HINT_SQL`] (which could take `$4 = 0` and skip its probe): the
/// probe's never-run init plan still opens and locks the index at every execution (pgbench
/// without fsync, same run: 68–92 µs here vs 95–103 µs merged).
const FAST_APPEND_NEW_SQL: &str = concat!(
    lock_cte!(),
    insert_events!(),
    "SELECT ",
    first_position!(),
    ",
       $2, $3, 1, $4::uuid, $5::text, $6::text, $7::integer, $8::text, $9::bytea,
       $10::text, $11::text, $12::text::jsonb, now()
FROM l
RETURNING 0::smallint, 1, NULL::uuid, NULL::text, version, position, NULL::bigint",
);

/// [`FAST_APPEND_ONE_SQL`] for a single event to a stream believed to be at version `$4` (> 0): the
/// expected version of an `Exact` append, or the store's hint (see `hints`). No version lookup: the
/// event is inserted at `$4 + 1` if version `$4` exists (a forward probe of the unique index that
/// stops at the first entry past it; written with `ORDER BY` so that even a generic plan made while
/// the table was empty uses that index, which an `EXISTS` with three equalities does not
/// guarantee). If the stream has fewer events the probe fails and no row is returned; if it has
/// more, the unique index refuses `$4 + 1`. Either way the careful path decides, so a stale hint
/// costs a statement, never a wrong version. When the row is inserted the stream was at exactly
/// `$4`, so every expected-version kind but `NoStream` (never sent here) is satisfied. `$1`–`$3` as
/// there; `$5`–`$13` the event's columns.
///
/// The probe (an init plan) may run before the lock: harmless, versions are never removed.
const FAST_APPEND_HINT_SQL: &str = concat!(
    lock_cte!(),
    insert_events!(),
    "SELECT ",
    first_position!(),
    ",
       $2, $3, $4::bigint + 1, $5::uuid, $6::text, $7::text, $8::integer, $9::text, $10::bytea,
       $11::text, $12::text, $13::text::jsonb, now()
FROM l
WHERE (SELECT e.version FROM events e
       WHERE e.tenant = $2 AND e.stream = $3 AND e.version >= $4::bigint
       ORDER BY e.version LIMIT 1) = $4::bigint
RETURNING 0::smallint, 1, NULL::uuid, NULL::text, version, position, NULL::bigint",
);

/// Carries a decoding error out of a sqlx row mapper ...
fn to_sqlx(e: Error) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// ... and back: the kernel error if it is one, else the usual mapping.
fn from_sqlx(what: &str, e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Decode(inner) => match inner.downcast::<Error>() {
            Ok(core) => *core,
            Err(other) => map_err(what, sqlx::Error::Decode(other)),
        },
        other => map_err(what, other),
    }
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgStore {
    /// A cached connection (see `conns`), errors mapped.
    async fn conn(&self) -> Result<CachedConn<'_>> {
        self.inner
            .appenders
            .get()
            .await
            .map_err(|e| map_err("connect", e))
    }

    async fn append_once(
        &self,
        conn: &mut PgConnection,
        req: &AppendRequest,
        retry: bool,
    ) -> std::result::Result<Vec<PgRow>, sqlx::Error> {
        let ev = &req.events;
        let (kind, expected) =
            expected_params(req.expected).map_err(|e| sqlx::Error::Encode(e.into()))?;
        if let ([e], false) = (&ev[..], retry) {
            let q = match self.believed_version(req) {
                Some(0) => sqlx::query(FAST_APPEND_NEW_SQL)
                    .bind(self.inner.lock_key)
                    .bind(req.tenant.as_str())
                    .bind(req.stream.as_str()),
                Some(v) => sqlx::query(FAST_APPEND_HINT_SQL)
                    .bind(self.inner.lock_key)
                    .bind(req.tenant.as_str())
                    .bind(req.stream.as_str())
                    .bind(v),
                None => sqlx::query(FAST_APPEND_ONE_SQL)
                    .bind(self.inner.lock_key)
                    .bind(req.tenant.as_str())
                    .bind(req.stream.as_str())
                    .bind(kind)
                    .bind(expected),
            };
            return bind_event(q, e).fetch_all(&mut *conn).await;
        }
        let headers: Vec<Option<String>> = ev.iter().map(headers_json).collect();
        let schema_versions: Vec<i32> = ev.iter().map(schema_version_param).collect();
        let q = sqlx::query(if retry { APPEND_SQL } else { FAST_APPEND_SQL })
            .bind(self.inner.lock_key)
            .bind(req.tenant.as_str())
            .bind(req.stream.as_str())
            .bind(kind)
            .bind(expected)
            .bind(retry)
            .bind(
                ev.iter()
                    .map(|e| e.event_id.as_uuid())
                    .collect::<Vec<Uuid>>(),
            )
            .bind(
                ev.iter()
                    .map(|e| e.dedup_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(ev.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
            .bind(schema_versions)
            .bind(
                ev.iter()
                    .map(|e| e.content_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(ev.iter().map(|e| &e.payload[..]).collect::<Vec<&[u8]>>())
            .bind(
                ev.iter()
                    .map(|e| e.metadata.correlation_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                ev.iter()
                    .map(|e| e.metadata.causation_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(headers);
        let q = if retry {
            q
        } else {
            q.bind(self.believed_version(req))
        };
        q.fetch_all(&mut *conn).await
    }
}

fn decode_dups(req: &AppendRequest, rows: &[PgRow]) -> Result<Vec<Option<EventRef>>> {
    let mut out = vec![None; req.events.len()];
    for row in rows {
        let idx: i32 = row.try_get(1).map_err(|e| map_err("append", e))?;
        let id: Option<Uuid> = row.try_get(2).map_err(|e| map_err("append", e))?;
        let Some(id) = id else { continue };
        let stream: String = row.try_get(3).map_err(|e| map_err("append", e))?;
        let version: i64 = row.try_get(4).map_err(|e| map_err("append", e))?;
        let pos = position(row, 5)?;
        let slot = usize::try_from(idx - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| {
                Error::corruption(None, format!("duplicate lookup returned index {idx}"))
            })?;
        *slot = Some(EventRef::new(
            EventId::from_uuid(id).map_err(|e| Error::corruption(Some(pos), e.to_string()))?,
            StreamId::parse(stream).map_err(|e| Error::corruption(Some(pos), e.to_string()))?,
            Version::new(u64::try_from(version).unwrap_or_default()),
            pos,
        ));
    }
    Ok(out)
}

impl PgStore {
    /// One append on its own (not grouped); `careful` starts with the careful path.
    async fn append_alone(&self, req: AppendRequest, careful: bool) -> Result<AppendOutcome> {
        // Every attempt of one append runs on the same connection. sqlx reports a statement's
        // error before the server has finished aborting its transaction; on this connection the
        // next attempt starts only after that abort, so by the time this append returns, no
        // failed attempt of it still holds the lock (and its transaction id) that would make
        // readers' horizon lag behind this append's own events.
        let mut conn = self
            .inner
            .appenders
            .get()
            .await
            .map_err(|e| map_err("append", e))?;
        let mut retry = careful;
        for _ in 0..MAX_APPEND_ATTEMPTS {
            let rows = match self.append_once(conn.conn(), &req, retry).await {
                Ok(rows) => rows,
                // A concurrent append stored one of our ids / dedup keys between our check and
                // our insert: look the originals up and decide again.
                Err(e) if is_unique_violation(&e) => {
                    retry = true;
                    continue;
                }
                Err(e) => {
                    self.settle_failed_append(&mut conn, &e).await;
                    return Err(map_err("append", e));
                }
            };
            let Some(first) = rows.first() else {
                if retry {
                    return Err(Error::backend(
                        "append",
                        std::io::Error::other("tt_append returned no row"),
                    ));
                }
                // Fast path: the precondition failed; the careful path tells duplicates (which
                // take precedence) from conflicts.
                retry = true;
                continue;
            };
            let kind: i16 = first.try_get(0).map_err(|e| map_err("append", e))?;
            match kind {
                0 => {
                    // One row (careful path) or one per event (fast path, in no promised
                    // order): the batch starts at the lowest version and position.
                    let mut v0 = i64::MAX;
                    let mut p0 = Position::new(u64::MAX);
                    for row in &rows {
                        v0 = v0.min(row.try_get(4).map_err(|e| map_err("append", e))?);
                        p0 = p0.min(position(row, 5)?);
                    }
                    let v0 = u64::try_from(v0).unwrap_or_default();
                    let events: Vec<EventRef> = req
                        .events
                        .iter()
                        .enumerate()
                        .map(|(i, e)| {
                            EventRef::new(
                                e.event_id,
                                req.stream.clone(),
                                Version::new(v0 + i as u64),
                                Position::new(p0.get() + i as u64),
                            )
                        })
                        .collect();
                    if let Some(last) = events.last() {
                        self.inner.shared.committed(last.position);
                        self.inner.hints.set(
                            req.tenant.as_str(),
                            req.stream.as_str(),
                            last.version.get(),
                        );
                    }
                    return Ok(AppendOutcome::new(events, false));
                }
                1 => {
                    let existing = decode_dups(&req, &rows)?;
                    if let Some(outcome) = resolve_duplicates(&req.events, existing)? {
                        return Ok(outcome);
                    }
                    // The originals vanished (cannot happen: events are never deleted); retry.
                }
                2 => {
                    let actual: i64 = first.try_get(4).map_err(|e| map_err("append", e))?;
                    let actual = Version::new(u64::try_from(actual).unwrap_or_default());
                    if !req.expected.accepts(actual) {
                        return Err(Error::Conflict {
                            tenant: req.tenant,
                            stream: req.stream,
                            expected: req.expected,
                            actual,
                        });
                    }
                    // Unreachable in practice: the version was checked and read in one place.
                }
                k => {
                    return Err(Error::corruption(None, format!("append returned kind {k}")));
                }
            }
        }
        Err(Error::Unavailable {
            reason: format!(
                "append to {}/{} lost {MAX_APPEND_ATTEMPTS} races against concurrent writers",
                req.tenant, req.stream
            ),
            retry_after: None,
            source: None,
        })
    }
}

#[async_trait]
impl EventStore for PgStore {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        validate_batch(&req.events)?;
        if req.events.len() == 1
            && let Some(grouper) = &self.inner.grouper
        {
            return match grouper.enter(self, req) {
                Entry::Alone(slot, req) => {
                    let out = self.append_alone(req, false).await;
                    drop(slot);
                    out
                }
                Entry::Full => Err(Error::Overloaded {
                    reason: "the group-append queue is full".into(),
                    retry_after: std::time::Duration::from_millis(100),
                }),
                Entry::Queued(reply) => match reply.await {
                    Ok(Reply::Done(outcome)) => Ok(outcome),
                    Ok(Reply::Careful(req)) => self.append_alone(req, true).await,
                    Ok(Reply::Alone(req)) => self.append_alone(req, false).await,
                    Err(_) => Err(Error::Unavailable {
                        reason: "append: the group it was queued in was abandoned (runtime \
                                 shutting down); it may or may not be stored"
                            .to_owned(),
                        retry_after: None,
                        source: None,
                    }),
                },
            };
        }
        self.append_alone(req, false).await
    }

    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let (sql, from) = match req.direction {
            Direction::Forwards => (
                const_format_forwards(),
                req.from.map_or(Ok(1), |v| to_i64("from", v.get()))?,
            ),
            Direction::Backwards => (
                const_format_backwards(),
                req.from.map_or(Ok(i64::MAX), |v| to_i64("from", v.get()))?,
            ),
        };
        // Rows are decoded as they arrive (no intermediate Vec<PgRow>), into a vector sized
        // from the stream's version when this process knows it (it appended to the stream):
        // a `RecordedEvent` is about 300 bytes, so growing the vector by doubling cost a
        // long read a third of its client time in copies and page faults.
        let known = self
            .inner
            .hints
            .get(req.tenant.as_str(), req.stream.as_str())
            .map_or(0, |v| match req.direction {
                Direction::Forwards => v.saturating_sub(u64::try_from(from).unwrap_or(0)) + 1,
                Direction::Backwards => v.min(u64::try_from(from).unwrap_or(0)),
            });
        let capacity = usize::try_from(known)
            .unwrap_or(usize::MAX)
            .min(req.limit)
            .min(MAX_PRESIZED_READ);
        let (tenant, stream) = (req.tenant.clone(), req.stream.clone());
        let mut conn = self.conn().await?;
        let mut out = Vec::with_capacity(capacity);
        let mut rows = sqlx::query(AssertSqlSafe(sql))
            .bind(req.tenant.as_str())
            .bind(req.stream.as_str())
            .bind(from)
            .bind(limit(req.limit))
            .try_map(move |r| decode_event(&r, 0, tenant.clone(), stream.clone()).map_err(to_sqlx))
            .fetch(conn.conn());
        let res = loop {
            match rows.try_next().await {
                Ok(Some(e)) => out.push(e),
                Ok(None) => break Ok(out),
                Err(e) => break Err(from_sqlx("read stream", e)),
            }
        };
        drop(rows);
        res.inspect_err(|e| conn.broken = e.is_retryable())
    }

    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        let mut conn = self.conn().await?;
        let h = horizon(conn.conn(), self.inner.lock_key)
            .await
            .inspect_err(|e| conn.broken = e.is_retryable())?;
        if h.max >= h.horizon {
            self.inner.shared.pending(h.max);
        }
        let from = req.from.max(Position::new(1));
        if req.limit == 0 || from >= h.horizon {
            return Ok(AllPage::new(Vec::new(), req.from));
        }
        let mut sql = format!(
            "SELECT tenant, stream, {EVENT_COLUMNS} FROM events WHERE position >= $1 AND position < $2"
        );
        let f = &req.filter;
        let mut n = 3;
        if f.tenant.is_some() {
            sql.push_str(&format!(" AND tenant = ${n}"));
            n += 1;
        }
        if !f.event_types.is_empty() {
            sql.push_str(&format!(" AND event_type = ANY(${n})"));
            n += 1;
        }
        if f.stream_prefix.is_some() {
            sql.push_str(&format!(" AND starts_with(stream, ${n})"));
            n += 1;
        }
        sql.push_str(&format!(" ORDER BY position LIMIT ${n}"));
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(to_i64("from", from.get())?)
            .bind(to_i64("horizon", h.horizon.get())?);
        if let Some(t) = &f.tenant {
            q = q.bind(t.as_str());
        }
        if !f.event_types.is_empty() {
            q = q.bind(&f.event_types);
        }
        if let Some(p) = &f.stream_prefix {
            q = q.bind(p.as_str());
        }
        let events = q
            .bind(limit(req.limit))
            .try_map(|r| decode_event_with_ids(&r).map_err(to_sqlx))
            .fetch_all(conn.conn())
            .await
            .map_err(|e| from_sqlx("read all", e))
            .inspect_err(|e| conn.broken = e.is_retryable())?;
        let last = events.last().map(|e| e.position.next());
        let next = if events.len() >= req.limit {
            // Full page: resume right after the last event returned.
            last.unwrap_or(from)
        } else {
            // Everything below the horizon has been considered; stop just after the highest
            // stored position (nothing can ever commit below the horizon).
            req.from
                .max(h.head.next())
                .max(last.unwrap_or_default())
                .min(h.horizon.max(req.from))
        };
        Ok(AllPage::new(events, next))
    }

    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM events WHERE tenant = $1 AND stream = $2 \
                 ORDER BY version DESC LIMIT 1",
        )
        .bind(tenant.as_str())
        .bind(stream.as_str())
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(|e| map_err("stream version", e))?;
        Ok(Version::new(
            v.map_or(0, |v| u64::try_from(v).unwrap_or_default()),
        ))
    }

    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT tenant, stream, {EVENT_COLUMNS} FROM events WHERE tenant = $1 AND event_id = $2"
        )))
        .bind(tenant.as_str())
        .bind(event_id.as_uuid())
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(|e| map_err("get event", e))?;
        row.as_ref().map(decode_event_with_ids).transpose()
    }

    async fn head(&self) -> Result<Position> {
        Ok(horizon(&self.inner.pool, self.inner.lock_key).await?.head)
    }

    async fn position_at(&self, at: tracktrace_core::Timestamp) -> Result<Position> {
        position_at(self, at).await
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.watch()
    }

    /// Exact event count below the read horizon and the schema's relation sizes: see
    /// `stats.rs` and migration 7.
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        store_stats(&self.inner.pool, self.inner.lock_key, self.schema())
            .await
            .map(Some)
    }
}

fn const_format_forwards() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE tenant = $1 AND stream = $2 AND version >= $3 \
         ORDER BY version LIMIT $4"
    )
}

fn const_format_backwards() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE tenant = $1 AND stream = $2 AND version <= $3 \
         ORDER BY version DESC LIMIT $4"
    )
}
