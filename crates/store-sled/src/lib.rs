//! The durable embedded event store of tracktrace: an [`EventStore`](tracktrace_core::EventStore)
//! (plus snapshots, checkpoints and read models) in one directory on [sled] 0.34, with no server.
//!
//! ```
//! use tracktrace_core::{
//!     EventStore, EventStoreExt, ExpectedVersion, NewEvent, ReadAll, StreamId, TenantId, Version,
//! };
//! use tracktrace_store_sled::{Durability, SledOptions, SledStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // Default durability: every acknowledged append has been fsynced (group commit).
//! let store = SledStore::open(SledOptions::new(dir.path()).durability(Durability::Fsync))?;
//!
//! let tenant = TenantId::parse("acme")?;
//! let bag = StreamId::parse("Bag-0001")?;
//! let out = store
//!     .append_to(
//!         &tenant,
//!         &bag,
//!         ExpectedVersion::NoStream,
//!         vec![
//!             NewEvent::json("CHECKED_IN", &serde_json::json!({"at": "MAD"})),
//!             NewEvent::json("LOADED", &serde_json::json!({"flight": "IB3170"})),
//!         ],
//!     )
//!     .await?;
//! assert_eq!(out.last_version(), Version::new(2));
//!
//! let events = store.read_stream_forwards(&tenant, &bag).await?;
//! assert_eq!(events[1].event_type, "LOADED");
//! let page = store.read_all(ReadAll::starting_at(out.last_position(), 10)).await?;
//! assert_eq!(page.events.len(), 1);
//!
//! // Reopening finds everything again.
//! drop(store);
//! let store = SledStore::open_path(dir.path())?;
//! assert_eq!(store.stream_version(&tenant, &bag).await?, Version::new(2));
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Atomic appends.** After any crash an append is entirely there or entirely absent: the
//!   writer writes an append's events, then their index entries, then its stream-index run, and
//!   on open the store removes the events left without their run (never acknowledged) before
//!   accepting calls (see [`layout`] for the write order and the sled recovery property it
//!   relies on).
//! - **Durability** per [`Durability`]: by default ([`Durability::Fsync`]) an append is
//!   acknowledged only after `flush()` *and* `fdatasync` of sled's `db` file, because sled
//!   0.34's own `flush()` is only `sync_file_range(2)` on Linux (no device-cache flush, no
//!   metadata). Concurrent writers share barriers (group commit). If a write or a barrier fails,
//!   the store stops accepting calls (every later call returns an error) until it is reopened,
//!   since the state on disk is then unknown.
//! - **A gap-free global log.** One writer thread assigns contiguous positions and publishes a
//!   new head only after the group's barrier; reads never return events above that head, so a
//!   reader never sees an event that a crash could still take away, nor position `p` before
//!   every position below `p` is readable.
//! - **Subscriptions** are woken through an in-process [`tokio::sync::watch`] channel bumped
//!   after each committed group (no polling).
//! - **Corruption** of a stored record is reported as
//!   [`Error::Corruption`](tracktrace_core::Error::Corruption) with its position, never a panic.
//! - **One process per directory**: sled locks the `db` file; a second opener gets
//!   [`OpenError::Locked`].
//!
//! # Write path
//! Appenders validate their batch, then send it with a oneshot reply channel to the writer
//! thread. The writer drains everything queued (a *group*), checks idempotency and expected
//! versions against sled plus what the group itself already staged, assigns versions and
//! positions, writes the group's pages, index entries and runs (one sled `insert` each, in an
//! order a crash can only cut, see [`layout`]), runs one barrier, advances the head, and only
//! then answers every request of the group. Read-model commits, checkpoints and
//! snapshots go through the same writer (each in its own atomic batch) and share the barriers.
//! Reads go straight to sled from the caller. Event reads never go past the published head;
//! read-model, checkpoint and snapshot reads may observe a commit whose barrier is still running
//! (never a partial one; if that barrier fails, the store stops accepting calls).
//!
//! The key layout is documented in [`layout`].

#![cfg_attr(docsrs, feature(doc_cfg))]

mod keys;
mod options;
mod read;
mod repair;
mod shared;
mod store;
mod writer;

pub mod layout;

pub use keys::{MAX_NAMESPACE_LEN, MAX_READ_MODEL_KEY_LEN};
pub use options::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_MAX_PENDING, DEFAULT_MIN_FREE_BYTES, Durability, OpenError,
    SledOptions,
};
pub use store::{SledStats, SledStore};
