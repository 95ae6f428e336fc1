//! Test helpers shared by the unit tests of several modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use tokio::sync::watch;
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, Error, EventId, EventStore, Position, ReadAll,
    ReadStream, RecordedEvent, Result, StreamId, TenantId, Timestamp, Version,
};

/// An [`EventStore`] wrapper whose next appends to streams starting with a prefix fail with a
/// version conflict, as if other writers kept winning the race: what makes the command bus
/// give up with a conflict after its retries (the application's `Contention`).
pub(crate) struct ContendedStore {
    inner: Arc<dyn EventStore>,
    prefix: String,
    conflicts: AtomicU32,
}

impl ContendedStore {
    /// Wraps `inner`; appends to streams starting with `prefix` can be made to conflict.
    pub(crate) fn new(inner: Arc<dyn EventStore>, prefix: &str) -> Self {
        Self {
            inner,
            prefix: prefix.to_owned(),
            conflicts: AtomicU32::new(0),
        }
    }

    /// The next `n` appends to matching streams conflict.
    pub(crate) fn conflict_next(&self, n: u32) {
        self.conflicts.store(n, Ordering::SeqCst);
    }

    /// Conflicts still to inject (used by the bus-ingestion tests, feature `nats`).
    #[cfg(feature = "nats")]
    pub(crate) fn pending(&self) -> u32 {
        self.conflicts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventStore for ContendedStore {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        if req.stream.as_str().starts_with(&self.prefix)
            && self
                .conflicts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            let actual = self.inner.stream_version(&req.tenant, &req.stream).await?;
            return Err(Error::Conflict {
                tenant: req.tenant,
                stream: req.stream,
                expected: req.expected,
                actual: actual.next(),
            });
        }
        self.inner.append(req).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(req).await
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.inner.read_all(req).await
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.inner.stream_version(tenant, stream).await
    }
    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        self.inner.get_event(tenant, id).await
    }
    async fn head(&self) -> Result<Position> {
        self.inner.head().await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.inner.position_at(at).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
}
