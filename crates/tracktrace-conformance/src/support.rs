//! Wrapper stores for tests: an [`Intercept`] names an inner store and overrides only the calls
//! it changes (every other call is forwarded); [`Intercepted`] turns it into a store of every
//! capability its inner store has ([`EventStore`], [`CheckpointStore`], [`ReadModelStore`],
//! [`SnapshotStore`]).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//!
//! use tracktrace_conformance::support::{Intercept, Intercepted};
//! use tracktrace_core::{Error, EventStore, InMemoryStore, Result};
//!
//! /// The in-memory store, failing every call while `down` (an outage).
//! struct Outage {
//!     inner: InMemoryStore,
//!     down: AtomicBool,
//! }
//!
//! #[async_trait::async_trait]
//! impl Intercept for Outage {
//!     type Inner = InMemoryStore;
//!     fn inner(&self) -> &InMemoryStore {
//!         &self.inner
//!     }
//!     async fn before(&self) -> Result<()> {
//!         match self.down.load(Ordering::SeqCst) {
//!             true => Err(Error::unavailable("test outage", "injected")),
//!             false => Ok(()),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = Arc::new(Intercepted(Outage {
//!     inner: InMemoryStore::new(),
//!     down: AtomicBool::new(true),
//! }));
//! assert!(store.head().await.is_err());
//! store.down.store(false, Ordering::SeqCst); // `Intercepted` derefs to the `Outage`
//! assert!(store.head().await.is_ok());
//! # }
//! ```

use std::ops::Deref;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, EventId, EventStore,
    KeyRange, Position, ReadAll, ReadModelBatch, ReadModelStore, ReadStream, RecordedEvent, Result,
    Snapshot, SnapshotStore, StoreStats, StreamId, TenantId, Timestamp, Version,
};

/// The calls of a wrapper store, each forwarded to [`Intercept::inner`] unless overridden: one
/// method per method of [`EventStore`], [`CheckpointStore`], [`ReadModelStore`] and
/// [`SnapshotStore`] (the last three only when the inner store has that capability). Run it as
/// a store with [`Intercepted`].
///
/// Every default runs [`Intercept::before`] first (except the synchronous
/// [`Intercept::watch_head`]), so a wrapper that fails or counts calls overrides that alone.
#[async_trait]
pub trait Intercept: Send + Sync + 'static {
    /// The store calls are forwarded to.
    type Inner: EventStore + ?Sized;

    /// The store calls are forwarded to.
    fn inner(&self) -> &Self::Inner;

    /// Runs before every forwarded call; an error fails the call without forwarding it.
    /// Default: nothing.
    async fn before(&self) -> Result<()> {
        Ok(())
    }

    /// [`EventStore::append`].
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        self.before().await?;
        self.inner().append(req).await
    }

    /// [`EventStore::read_stream`].
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.before().await?;
        self.inner().read_stream(req).await
    }

    /// [`EventStore::read_all`].
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.before().await?;
        self.inner().read_all(req).await
    }

    /// [`EventStore::stream_version`].
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.before().await?;
        self.inner().stream_version(tenant, stream).await
    }

    /// [`EventStore::get_event`].
    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        self.before().await?;
        self.inner().get_event(tenant, id).await
    }

    /// [`EventStore::head`].
    async fn head(&self) -> Result<Position> {
        self.before().await?;
        self.inner().head().await
    }

    /// [`EventStore::position_at`].
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.before().await?;
        self.inner().position_at(at).await
    }

    /// [`EventStore::watch_head`] (no [`Intercept::before`]: it cannot fail).
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner().watch_head()
    }

    /// [`EventStore::store_stats`].
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        self.before().await?;
        self.inner().store_stats().await
    }

    /// [`CheckpointStore::load_checkpoint`].
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>>
    where
        Self::Inner: CheckpointStore,
    {
        self.before().await?;
        self.inner().load_checkpoint(name).await
    }

    /// [`CheckpointStore::save_checkpoint`].
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()>
    where
        Self::Inner: CheckpointStore,
    {
        self.before().await?;
        self.inner().save_checkpoint(name, position).await
    }

    /// [`ReadModelStore::get`].
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>>
    where
        Self::Inner: ReadModelStore,
    {
        self.before().await?;
        self.inner().get(ns, key).await
    }

    /// [`ReadModelStore::scan`].
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>>
    where
        Self::Inner: ReadModelStore,
    {
        self.before().await?;
        self.inner().scan(ns, range, direction, limit).await
    }

    /// [`ReadModelStore::commit`].
    async fn commit(&self, batch: ReadModelBatch) -> Result<()>
    where
        Self::Inner: ReadModelStore,
    {
        self.before().await?;
        self.inner().commit(batch).await
    }

    /// [`SnapshotStore::load_snapshot`].
    async fn load_snapshot(&self, tenant: &TenantId, stream: &StreamId) -> Result<Option<Snapshot>>
    where
        Self::Inner: SnapshotStore,
    {
        self.before().await?;
        self.inner().load_snapshot(tenant, stream).await
    }

    /// [`SnapshotStore::save_snapshot`].
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>
    where
        Self::Inner: SnapshotStore,
    {
        self.before().await?;
        self.inner().save_snapshot(snapshot).await
    }
}

/// An [`Intercept`] as a store: an [`EventStore`], and a [`CheckpointStore`],
/// [`ReadModelStore`] or [`SnapshotStore`] when its inner store is one. Derefs to the
/// intercept (its fields and methods).
#[derive(Clone, Debug, Default)]
pub struct Intercepted<T>(pub T);

impl<T> Deref for Intercepted<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

#[async_trait]
impl<T: Intercept> EventStore for Intercepted<T> {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        self.0.append(req).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.0.read_stream(req).await
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.0.read_all(req).await
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.0.stream_version(tenant, stream).await
    }
    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        self.0.get_event(tenant, id).await
    }
    async fn head(&self) -> Result<Position> {
        self.0.head().await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.0.position_at(at).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.0.watch_head()
    }
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        self.0.store_stats().await
    }
}

#[async_trait]
impl<T: Intercept> CheckpointStore for Intercepted<T>
where
    T::Inner: CheckpointStore,
{
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        self.0.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.0.save_checkpoint(name, position).await
    }
}

#[async_trait]
impl<T: Intercept> ReadModelStore for Intercepted<T>
where
    T::Inner: ReadModelStore,
{
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.0.get(ns, key).await
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.0.scan(ns, range, direction, limit).await
    }
    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        self.0.commit(batch).await
    }
}

#[async_trait]
impl<T: Intercept> SnapshotStore for Intercepted<T>
where
    T::Inner: SnapshotStore,
{
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.0.load_snapshot(tenant, stream).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.0.save_snapshot(snapshot).await
    }
}
