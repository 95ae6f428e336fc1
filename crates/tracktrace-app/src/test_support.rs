//! Test helpers shared by the unit tests of several modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{AppendOutcome, AppendRequest, Error, EventStore, Result};

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
    pub(crate) fn new(inner: Arc<dyn EventStore>, prefix: &str) -> Intercepted<Self> {
        Intercepted(Self {
            inner,
            prefix: prefix.to_owned(),
            conflicts: AtomicU32::new(0),
        })
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
impl Intercept for ContendedStore {
    type Inner = dyn EventStore;

    fn inner(&self) -> &dyn EventStore {
        &*self.inner
    }

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
}
