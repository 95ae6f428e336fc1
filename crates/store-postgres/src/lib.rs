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
//! # SQL projections
//! A [`SqlProjection`] keeps its read model in ordinary tables of the store's database and
//! schema, written with its own SQL statements in the transaction that moves its checkpoint
//! (the [`SqlProjectionRunner`]): exactly once across crashes and failures, fenced against a
//! second runner, rebuildable, and queryable with any SQL the application likes.
//!
//! ```no_run
//! use async_trait::async_trait;
//! use sqlx::postgres::PgConnection;
//! use tracktrace_core::{BoxError, RecordedEvent};
//! use tracktrace_store_postgres::{PgStore, SqlProjection, SqlProjectionRunner};
//!
//! /// Events per stream, in table `stream_counts`.
//! struct Counts;
//!
//! #[async_trait]
//! impl SqlProjection for Counts {
//!     fn name(&self) -> &str { "stream-counts" }
//!     async fn setup(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
//!         sqlx::query("CREATE TABLE IF NOT EXISTS stream_counts (stream text PRIMARY KEY, n bigint NOT NULL)")
//!             .execute(conn).await?;
//!         Ok(())
//!     }
//!     async fn apply(&mut self, e: &RecordedEvent, conn: &mut PgConnection) -> Result<(), BoxError> {
//!         sqlx::query("INSERT INTO stream_counts VALUES ($1, 1)
//!                      ON CONFLICT (stream) DO UPDATE SET n = stream_counts.n + 1")
//!             .bind(e.stream.as_str()).execute(conn).await?;
//!         Ok(())
//!     }
//!     async fn reset(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
//!         sqlx::query("TRUNCATE stream_counts").execute(conn).await?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let mut runner = SqlProjectionRunner::new(store.clone(), Counts);
//! runner.catch_up().await?;
//! let n: Option<i64> = sqlx::query_scalar("SELECT n FROM stream_counts WHERE stream = $1")
//!     .bind("Bag-0001").fetch_optional(store.pool()).await?;
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
//! `checkpoints`, `read_models`, the one-row `log_meta`, and the one-row `event_count`
//! (the number of events below a recent read horizon, kept by
//! [`EventStore::store_stats`](tracktrace_core::EventStore::store_stats) rather than by
//! appends: positions follow transaction ids, so they are no count; see migration 7).
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
//! below what a reader has seen (the argument is spelled out on `HORIZON_SQL` in `horizon.rs`).
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

#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod sql;
mod bind;
mod conns;
mod error;
mod group;
mod group_queue;
mod handle;
mod hints;
mod horizon;
mod kv;
mod lease;
mod migrate;
mod rows;
mod sql_projection;
mod stats;
mod store;
mod tasks;
mod time_range;

pub use handle::{
    DEFAULT_APPEND_GROUPS, DEFAULT_MAX_QUEUED_APPENDS, DEFAULT_SCHEMA, MAX_SCHEMA_LEN, PgStore,
    PgStoreOptions, validate_schema,
};
pub use lease::Lease;
pub use sql_projection::{SqlProjection, SqlProjectionRunner};
pub use tracktrace_core;
