//! The tracktrace event-sourcing kernel: an [`EventStore`] trait with version-based optimistic
//! concurrency, idempotent appends and a gap-free global log, an [`InMemoryStore`] reference
//! implementation, payload [`codec`]s and catch-up-then-live [`Subscription`]s.
//! Every backend must pass the suite in the `tracktrace-conformance` crate.
//!
//! Backends live in their own crates (`tracktrace-store-sled`, `tracktrace-store-postgres`);
//! this crate does no I/O of its own.
//!
//! ```
//! use std::sync::Arc;
//! use tracktrace_core::{
//!     EventStore, EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent, StreamId,
//!     SubscribeOptions, Subscription, TenantId, Version,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryStore::new());
//! let tenant = TenantId::parse("acme")?;
//! let bag = StreamId::parse("Bag-0001")?;
//!
//! // First append: the stream must not exist yet.
//! let checked_in = NewEvent::json("CHECKED_IN", &serde_json::json!({"at": "MAD"}));
//! let out = store
//!     .append_to(&tenant, &bag, ExpectedVersion::NoStream, vec![checked_in.clone()])
//!     .await?;
//! assert_eq!(out.last_version(), Version::new(1));
//!
//! // Retrying the same event is idempotent: same reference, nothing written.
//! let again = store
//!     .append_to(&tenant, &bag, ExpectedVersion::NoStream, vec![checked_in])
//!     .await?;
//! assert!(again.duplicate && again.events == out.events);
//!
//! // A stale expected version is a typed conflict.
//! let loaded = NewEvent::json("LOADED", &serde_json::json!({"flight": "IB3170"}));
//! let err = store
//!     .append_to(&tenant, &bag, ExpectedVersion::NoStream, vec![loaded.clone()])
//!     .await
//!     .unwrap_err();
//! assert!(err.is_conflict());
//! store
//!     .append_to(&tenant, &bag, ExpectedVersion::Exact(Version::new(1)), vec![loaded])
//!     .await?;
//!
//! // Follow the global log from the start: catch-up, then live.
//! let mut sub = Subscription::new(store.clone(), SubscribeOptions::default());
//! assert_eq!(sub.next().await?.event_type, "CHECKED_IN");
//! assert_eq!(sub.next().await?.event_type, "LOADED");
//! # Ok(())
//! # }
//! ```
//!
//! # The runtime: commands, queries, sagas
//! On top of the store trait, each in its own module and working on every backend:
//! - [`aggregate`]: the [`Aggregate`] / [`DomainEvent`] traits and field-level [`Validator`]s;
//! - [`command`]: [`Repository`] (snapshot + tail loading, optional cache) and [`CommandBus`]
//!   (validate → load → handle → append with `Exact(version)`, conflicts retried with jittered
//!   backoff, typed [`CommandError`]);
//! - [`upcast`]: [`Upcasters`] migrating old payload schema versions on read;
//! - [`projection`]: [`Projection`]s fed by a [`ProjectionRunner`] from a persisted checkpoint,
//!   exactly-once for same-store read models, with [`Lag`] and rebuilds;
//! - [`saga`]: process managers whose state, outbox and deadlines are events in their own
//!   stream, run by a [`SagaRunner`];
//! - [`resilience`]: the [`Retrying`] and [`CircuitBreaker`] wrapper stores.
//!
//! # Features
// The codec exists only with the feature: link to it only then (docs build without it too).
#![cfg_attr(
    feature = "bincode",
    doc = "- `bincode`: [`codec::BincodeCodec`] (bincode 2) beside the default JSON and postcard codecs."
)]
#![cfg_attr(
    not(feature = "bincode"),
    doc = "- `bincode`: `codec::BincodeCodec` (bincode 2) beside the default JSON and postcard codecs."
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod aggregate;
mod backend;
pub mod codec;
pub mod command;
mod error;
mod event;
mod event_ref;
mod id;
pub mod lease;
mod memory;
mod paged;
pub mod partition;
pub mod projection;
pub mod resilience;
pub mod saga;
mod store;
pub mod upcast;
pub mod verify;

pub use aggregate::{
    Aggregate, Concurrency, DomainEvent, FieldError, Validator, decode_domain_event,
};
pub use backend::{Backend, BackendExt, BreakerLayer, RetryLayer, StoreLayer};
pub use codec::{Codec, CodecError, JsonCodec, PostcardCodec};
pub use command::{
    CacheMiss, CommandBus, CommandError, CommandMeta, CommandOutcome, DEFAULT_CACHE_CAPACITY,
    Loaded, Repository, derived_event_id,
};
pub use error::{BoxError, Error, Result};
pub use event::{CONTENT_TYPE_JSON, Metadata, NewEvent, RecordedEvent, limits, validate_batch};
pub use event_ref::EventRef;
pub use id::{EventId, ExpectedVersion, IdError, Position, StreamId, TenantId, Timestamp, Version};
pub use lease::{Lease, Leases, LocalLeases};
pub use memory::InMemoryStore;
pub use paged::{EventPages, PagedReads};
pub use partition::{Partition, Partitioning};
pub use projection::{
    Lag, LagHandle, Projection, ProjectionError, ProjectionProgress, ProjectionRunner, ReadModelTx,
    Typed, TypedProjection,
};
pub use resilience::{BreakerConfig, BreakerState, CircuitBreaker, RetryPolicy, Retrying};
pub use saga::{
    BusDispatcher, BusFailure, CommandDispatcher, CommandFailure, DispatchError, FailureKind,
    FromBusFailure, Reaction, Saga, SagaProgress, SagaRecord, SagaRunner,
};
pub use store::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, EventFilter, EventStore,
    EventStoreExt, KeyRange, ReadAll, ReadModelBatch, ReadModelStore, ReadModelWrite, ReadStream,
    Snapshot, SnapshotStore, StoreStats, SubscribeOptions, Subscription, monotonic_now, prefix_end,
    resolve_duplicates,
};
pub use upcast::{Upcaster, Upcasters};
