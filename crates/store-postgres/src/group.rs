//! Group appends: concurrent single-event appends share one statement and one transaction.
//!
//! A single-event append costs PostgreSQL far more per transaction (snapshot, advisory lock,
//! transaction id, commit record, WAL flush, one client round trip) than per row. At most
//! [`PgStoreOptions::append_groups`](crate::handle::PgStoreOptions::append_groups) append
//! statements of single-event requests run at once; a request that finds them all busy joins a
//! queue, and the next statement to start takes everything queued (distinct streams, up to
//! [`MAX_GROUP`](crate::group_queue::MAX_GROUP) requests) as one group.
//! A caller that finds a free slot runs alone at once, so an idle store adds no latency and a
//! busy one trades waiting for a slot against per-transaction overhead. While no group is
//! running (no drainer), a caller that finds every slot busy may still run alone on one of as
//! many *extra* permits: with a few more appenders than slots (8 on 4 slots, measured),
//! grouping would make groups of one or two, which cost more in the statement than they save
//! in transactions, while capping the commits in flight (about 6 % fewer appends/s). Once
//! groups run, newcomers queue, so under heavy load (64 appenders) the groups stay large.
//!
//! A group is one statement ([`GROUP_APPEND_SQL`]): it checks every request's precondition
//! against the stream's version read under the store's shared advisory lock, exactly like the
//! single append, and inserts the events that pass with `ON CONFLICT DO NOTHING`. A request
//! whose row was not inserted (failed precondition, a duplicate id or dedup key, or a
//! concurrent append that took the version) is handed back to its caller, which runs the
//! careful path (`tt_append`) alone: duplicates, conflicts and their actual versions are
//! decided there, as for a single append. Each group request is one event, so no request is
//! ever half-stored. A group whose statement fails as a whole hands every request back to run
//! alone from the start (appends are idempotent by event id, so one whose commit was in fact
//! durable is reported as a duplicate of itself, with its original position).
//!
//! Groups insert in `(tenant, stream)` order, so two groups touching the same streams wait for
//! each other in one direction only. (Two groups crossing on *event ids or dedup keys* of
//! different streams could still deadlock; PostgreSQL then aborts one after
//! `deadlock_timeout` and its requests run alone, as above.)
//!
//! Positions stay gap-free for readers: the group's events share one transaction id, taken
//! after the shared lock like any append's, at positions `(xid + offset) * 1024 + index`.
//!
//! Queued requests are run by a spawned task (the *drainer*), never by another caller's future:
//! a caller that gives up (its future is dropped) cancels nothing but its own request, which is
//! skipped if it had not started.
//!
//! The slots and the queue are in `group_queue.rs` (the store's handle holds them); this module
//! enters them, spawns the drainers and runs the groups.

use std::sync::atomic::Ordering;

use sqlx::Row;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use tracktrace_core::{AppendOutcome, AppendRequest, EventRef, Position, Result, Version};

use crate::bind::{expected_params, headers_json, schema_version_param};
use crate::error::map_err;
use crate::group_queue::{Grouper, Pending, Reply};
use crate::handle::PgStore;
use crate::rows::position;

/// One statement for a group of single-event appends to distinct streams. `$1` the store's
/// lock key; per request: `$2` tenant, `$3` stream, `$4` expected kind (as in the single
/// append), `$5` expected version, `$6`–`$14` the event's columns, `$15` the version the stream
/// is believed to be at (`PgStore::believed_version`, NULL: unknown). Returns `(position,
/// version)` of every inserted row; `position % 1024` is the request's index.
///
/// A believed version `h` is used as the single-event statements use it: the event goes to
/// `h + 1` if version `h` exists (`v = -1` otherwise: not inserted), and the unique index turns
/// a stale `h` into a conflict (`DO NOTHING`: not inserted); an unknown one is looked up.
///
/// Order is forced by data dependencies as in the single append: `r` takes the shared lock
/// before anything reads a version, and `pg_current_xact_id()` is evaluated on `r`'s rows.
const GROUP_APPEND_SQL: &str = concat!(
    "
WITH r AS MATERIALIZED (
    SELECT q.i, q.t, q.s, q.k, q.x, q.id, q.dk, q.ty, q.sv, q.ct, q.pl, q.co, q.ca, q.hd,
           CASE WHEN q.h IS NULL
                THEN COALESCE((SELECT e.version FROM events e WHERE e.tenant = q.t
                               AND e.stream = q.s ORDER BY e.version DESC LIMIT 1), 0)
                WHEN q.h = 0 OR (SELECT e.version FROM events e WHERE e.tenant = q.t
                                 AND e.stream = q.s AND e.version >= q.h
                                 ORDER BY e.version LIMIT 1) = q.h
                THEN q.h
                ELSE -1
           END AS v
    FROM ",
    append_lock!(),
    ",
         unnest($2::text[], $3::text[], $4::smallint[], $5::bigint[], $6::uuid[], $7::text[],
                $8::text[], $9::integer[], $10::text[], $11::bytea[], $12::text[], $13::text[],
                $14::text[], $15::bigint[])
         WITH ORDINALITY AS q(t, s, k, x, id, dk, ty, sv, ct, pl, co, ca, hd, h, i)
)
",
    insert_events!(),
    "SELECT ",
    first_position!(),
    " + r.i - 1,
       r.t, r.s, r.v + 1, r.id, r.dk, r.ty, r.sv, r.ct, r.pl, r.co, r.ca, r.hd::jsonb, now()
FROM r
WHERE r.v >= 0 AND CASE r.k WHEN 0 THEN true WHEN 1 THEN r.v = 0 WHEN 2 THEN r.v > 0 ELSE r.v = r.x END
ON CONFLICT DO NOTHING
RETURNING position, version",
);

/// How a single-event append proceeds.
pub(crate) enum Entry {
    /// A slot was free: run alone now, holding the slot until the guard drops.
    Alone(SlotGuard, AppendRequest),
    /// Queued: wait for the drainer's reply.
    Queued(oneshot::Receiver<Reply>),
    /// The queue is full: the append is refused (nothing written).
    Full,
}

/// A held slot. Dropping it releases the slot and, if requests are queued, hands a slot to a
/// new drainer, so nothing queued waits for a caller that may never come.
pub(crate) struct SlotGuard {
    store: PgStore,
    permit: Option<OwnedSemaphorePermit>,
    /// Held by a drainer: counted in `Grouper::draining` from its spawn until this drops (also
    /// when the drainer panics or its task is cancelled before it ran).
    drainer: bool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(grouper) = &self.store.inner.grouper {
            if self.drainer {
                grouper.draining.fetch_sub(1, Ordering::AcqRel);
            }
            grouper.kick(&self.store);
        }
    }
}

impl Grouper {
    /// Takes a free slot (when nothing is queued: queued requests go first) or queues `req`.
    pub(crate) fn enter(&self, store: &PgStore, req: AppendRequest) -> Entry {
        let queued_before = !self.queue().is_empty();
        let grouping = self.draining.load(Ordering::Acquire) > 0;
        if !queued_before
            && let Ok(permit) = (self.slots.clone().try_acquire_owned()).or_else(|e| {
                if grouping {
                    Err(e)
                } else {
                    self.extra.clone().try_acquire_owned()
                }
            })
        {
            let guard = SlotGuard {
                store: store.clone(),
                permit: Some(permit),
                drainer: false,
            };
            return Entry::Alone(guard, req);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue();
            if q.len() >= self.max_queued {
                return Entry::Full;
            }
            q.push_back(Pending { req, tx });
        }
        // Every slot holder looks at the queue after releasing its slot; a slot released
        // between the attempt above and the push is picked up here.
        self.kick(store);
        Entry::Queued(rx)
    }

    /// If requests are queued and a slot is free, spawns a drainer holding it.
    fn kick(&self, store: &PgStore) {
        if self.queue().is_empty() {
            return;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.draining.fetch_add(1, Ordering::AcqRel);
                rt.spawn(drain(SlotGuard {
                    store: store.clone(),
                    permit: Some(permit),
                    drainer: true,
                }));
            }
            Err(_) => {
                // No runtime (a store dropped outside of one): nobody could await the replies
                // either; let the queued requests fail to their (gone) callers.
                drop(permit);
                self.queue().clear();
            }
        }
    }
}

/// Runs queued groups while there are any, then releases its slot (and re-checks the queue).
async fn drain(guard: SlotGuard) {
    let store = &guard.store;
    let Some(grouper) = &store.inner.grouper else {
        return;
    };
    loop {
        let group = grouper.take();
        if group.is_empty() {
            break;
        }
        run_group(store, group).await;
    }
}

async fn run_group(store: &PgStore, group: Vec<Pending>) {
    let rows = match execute(store, &group).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, size = group.len(), "group append failed; appending alone");
            for p in group {
                let _ = p.tx.send(Reply::Alone(p.req));
            }
            return;
        }
    };
    let mut stored: Vec<Option<(Position, u64)>> = vec![None; group.len()];
    let mut last = None;
    for (pos, version) in rows {
        let idx = (pos.get() % 1024) as usize;
        if let Some(slot) = stored.get_mut(idx) {
            *slot = Some((pos, version));
            last = last.max(Some(pos));
        }
    }
    if let Some(last) = last {
        store.inner.shared.committed(last);
    }
    for (p, stored) in group.into_iter().zip(stored) {
        let reply = match stored {
            Some((pos, version)) => {
                let stream = p.req.stream.as_str();
                store
                    .inner
                    .hints
                    .set(p.req.tenant.as_str(), stream, version);
                Reply::Done(AppendOutcome::new(
                    vec![EventRef::new(
                        p.req.events[0].event_id,
                        p.req.stream.clone(),
                        Version::new(version),
                        pos,
                    )],
                    false,
                ))
            }
            None => Reply::Careful(p.req),
        };
        let _ = p.tx.send(reply);
    }
}

/// Runs the group statement; `(position, version)` of every stored row.
async fn execute(store: &PgStore, group: &[Pending]) -> Result<Vec<(Position, u64)>> {
    let n = group.len();
    let mut tenants = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut dedup = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut schema_versions = Vec::with_capacity(n);
    let mut content_types = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut correlation = Vec::with_capacity(n);
    let mut causation = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut believed = Vec::with_capacity(n);
    for p in group {
        let e = &p.req.events[0];
        let (k, x) = expected_params(p.req.expected)?;
        tenants.push(p.req.tenant.as_str());
        streams.push(p.req.stream.as_str());
        kinds.push(k);
        expected.push(x);
        ids.push(e.event_id.as_uuid());
        dedup.push(e.dedup_key.as_deref());
        types.push(e.event_type.as_str());
        schema_versions.push(schema_version_param(e));
        content_types.push(e.content_type.as_str());
        payloads.push(&e.payload[..]);
        correlation.push(e.metadata.correlation_id.as_deref());
        causation.push(e.metadata.causation_id.as_deref());
        headers.push(headers_json(e));
        believed.push(store.believed_version(&p.req));
    }
    let mut conn = store
        .inner
        .appenders
        .get()
        .await
        .map_err(|e| map_err("append", e))?;
    let res = sqlx::query(GROUP_APPEND_SQL)
        .bind(store.inner.lock_key)
        .bind(tenants)
        .bind(streams)
        .bind(kinds)
        .bind(expected)
        .bind(ids)
        .bind(dedup)
        .bind(types)
        .bind(schema_versions)
        .bind(content_types)
        .bind(payloads)
        .bind(correlation)
        .bind(causation)
        .bind(headers)
        .bind(believed)
        .fetch_all(conn.conn())
        .await;
    let rows = match res {
        Ok(rows) => rows,
        Err(e) => {
            // As for a single append, before the requests are retried alone.
            store.settle_failed_append(&mut conn, &e).await;
            return Err(map_err("group append", e));
        }
    };
    rows.iter()
        .map(|row| {
            let pos = position(row, 0)?;
            let v: i64 = row.try_get(1).map_err(|e| map_err("group append", e))?;
            Ok((pos, u64::try_from(v).unwrap_or_default()))
        })
        .collect()
}
