//! One handle for everything a backend offers — the log ([`EventStore`]), read models and
//! checkpoints ([`ReadModelStore`]) and snapshots ([`SnapshotStore`]) — and [`StoreLayer`]s
//! that wrap all of them at once, so a retry policy or a circuit breaker applied to the handle
//! covers every capability and no code path reaches the raw backend by accident.
//!
//! ```
//! use std::sync::Arc;
//! use tracktrace_core::{
//!     Backend, BackendExt, BreakerConfig, BreakerLayer, EventStore, InMemoryStore,
//!     ReadModelStore, RetryLayer, RetryPolicy, SnapshotStore,
//! };
//!
//! let backend: Arc<dyn Backend> = Arc::new(InMemoryStore::new());
//! // The breaker wraps the backend, the retries wrap the breaker (they back off while it is
//! // open rather than hammering it): each layer wraps every capability.
//! let backend = backend
//!     .layer(&BreakerLayer(BreakerConfig::default()))
//!     .layer(&RetryLayer(RetryPolicy::default()));
//! // Hand out the capabilities a component needs; they all go through the layers.
//! let events: Arc<dyn EventStore> = backend.clone();
//! let read_models: Arc<dyn ReadModelStore> = backend.clone();
//! let snapshots: Arc<dyn SnapshotStore> = backend;
//! # let _ = (events, read_models, snapshots);
//! ```

use std::sync::Arc;

use crate::resilience::{BreakerConfig, CircuitBreaker, RetryPolicy, Retrying};
use crate::store::{EventStore, ReadModelStore, SnapshotStore};

/// Everything a full backend offers: the event log, read models with their checkpoints, and
/// snapshots. Implemented for every type that implements the three traits (the in-memory,
/// sled and PostgreSQL stores, and the [`Retrying`] and [`CircuitBreaker`] wrappers of them),
/// so `Arc<dyn Backend>` is the one value to pass around; it converts to
/// `Arc<dyn EventStore>`, `Arc<dyn ReadModelStore>` (or `Arc<dyn CheckpointStore>`) and
/// `Arc<dyn SnapshotStore>` by coercion.
///
/// [`CheckpointStore`]: crate::CheckpointStore
pub trait Backend: EventStore + ReadModelStore + SnapshotStore {}

impl<S: EventStore + ReadModelStore + SnapshotStore + ?Sized> Backend for S {}

/// Wraps a whole [`Backend`] (in the spirit of `tower::Layer`): the wrapper sees every call of
/// every capability.
pub trait StoreLayer {
    /// `inner` wrapped by this layer.
    fn layer(&self, inner: Arc<dyn Backend>) -> Arc<dyn Backend>;
}

/// [`Retrying`] every capability with this policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer(pub RetryPolicy);

impl StoreLayer for RetryLayer {
    fn layer(&self, inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
        Arc::new(Retrying::with_policy(inner, self.0))
    }
}

/// One [`CircuitBreaker`] with this configuration in front of every capability: failures of
/// the log, the read models and the snapshots count towards the same breaker, and once it is
/// open every capability fails fast.
#[derive(Clone, Copy, Debug, Default)]
pub struct BreakerLayer(pub BreakerConfig);

impl StoreLayer for BreakerLayer {
    fn layer(&self, inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
        Arc::new(CircuitBreaker::with_config(inner, self.0))
    }
}

/// [`StoreLayer`]s applied to a backend handle.
pub trait BackendExt {
    /// This backend wrapped by `layer`.
    fn layer(self, layer: &dyn StoreLayer) -> Arc<dyn Backend>;
}

impl BackendExt for Arc<dyn Backend> {
    fn layer(self, layer: &dyn StoreLayer) -> Arc<dyn Backend> {
        layer.layer(self)
    }
}
