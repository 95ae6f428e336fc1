//! A layer applied to the backend handle wraps every capability: the log, read models,
//! checkpoints and snapshots are retried by one `RetryLayer` and guarded by one breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, Backend, BackendExt, BreakerConfig, BreakerLayer,
    CheckpointStore, Direction, Error, EventId, EventStore, EventStoreExt, ExpectedVersion,
    InMemoryStore, KeyRange, NewEvent, Position, ReadAll, ReadModelBatch, ReadModelStore,
    ReadStream, RecordedEvent, Result, RetryLayer, RetryPolicy, Snapshot, SnapshotStore, StreamId,
    TenantId, Timestamp, Version,
};

/// The in-memory store behind a switch: while `fail_next` is above zero every call (of any
/// capability) fails as unavailable and counts it down; `calls` counts the calls that arrive.
#[derive(Default)]
struct Flaky {
    inner: InMemoryStore,
    fail_next: AtomicU32,
    calls: AtomicU64,
}

impl Flaky {
    fn gate(&self) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            Err(Error::unavailable("flaky", "injected"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl EventStore for Flaky {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        self.gate()?;
        self.inner.append(req).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.gate()?;
        self.inner.read_stream(req).await
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.gate()?;
        self.inner.read_all(req).await
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.gate()?;
        self.inner.stream_version(tenant, stream).await
    }
    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        self.gate()?;
        self.inner.get_event(tenant, id).await
    }
    async fn head(&self) -> Result<Position> {
        self.gate()?;
        self.inner.head().await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.gate()?;
        self.inner.position_at(at).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
}

#[async_trait]
impl CheckpointStore for Flaky {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        self.gate()?;
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.gate()?;
        self.inner.save_checkpoint(name, position).await
    }
}

#[async_trait]
impl ReadModelStore for Flaky {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.gate()?;
        self.inner.get(ns, key).await
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.gate()?;
        self.inner.scan(ns, range, direction, limit).await
    }
    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        self.gate()?;
        self.inner.commit(batch).await
    }
}

#[async_trait]
impl SnapshotStore for Flaky {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.gate()?;
        self.inner.load_snapshot(tenant, stream).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.gate()?;
        self.inner.save_snapshot(snapshot).await
    }
}

fn quick_retries() -> RetryLayer {
    RetryLayer(
        RetryPolicy::default()
            .with_max_attempts(5)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(2)),
    )
}

#[tokio::test]
async fn one_retry_layer_covers_every_capability() {
    let flaky = Arc::new(Flaky::default());
    let backend = (flaky.clone() as Arc<dyn Backend>).layer(&quick_retries());
    let (tenant, stream) = (
        TenantId::from_static("acme"),
        StreamId::from_static("Bag-1"),
    );

    flaky.fail_next.store(2, Ordering::SeqCst);
    backend
        .append_to(
            &tenant,
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::json("A", &serde_json::json!(1))],
        )
        .await
        .expect("the append is retried");
    flaky.fail_next.store(2, Ordering::SeqCst);
    backend
        .commit(
            ReadModelBatch::new("p", None, Position::new(1)).with_writes(vec![
                tracktrace_core::ReadModelWrite::put("ns", b"k".to_vec(), b"v".to_vec()),
            ]),
        )
        .await
        .expect("the read-model commit is retried");
    flaky.fail_next.store(2, Ordering::SeqCst);
    assert_eq!(
        backend
            .get("ns", b"k")
            .await
            .expect("the read is retried")
            .as_deref(),
        Some(&b"v"[..])
    );
    flaky.fail_next.store(2, Ordering::SeqCst);
    assert_eq!(
        backend
            .load_checkpoint("p")
            .await
            .expect("checkpoints are retried"),
        Some(Position::new(1))
    );
    let snap = Snapshot::new(
        tenant.clone(),
        stream.clone(),
        Version::new(1),
        1,
        Bytes::from_static(b"s"),
    );
    flaky.fail_next.store(2, Ordering::SeqCst);
    backend
        .save_snapshot(snap.clone())
        .await
        .expect("snapshots are retried");
    flaky.fail_next.store(2, Ordering::SeqCst);
    assert_eq!(
        backend.load_snapshot(&tenant, &stream).await.unwrap(),
        Some(snap)
    );
    // Six operations, each failed twice and then went through.
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 18);
}

#[tokio::test]
async fn one_breaker_layer_guards_every_capability() {
    let flaky = Arc::new(Flaky::default());
    let backend = (flaky.clone() as Arc<dyn Backend>).layer(&BreakerLayer(
        BreakerConfig::default()
            .with_failure_threshold(3)
            .with_open_for(Duration::from_secs(60)),
    ));
    let (tenant, stream) = (
        TenantId::from_static("acme"),
        StreamId::from_static("Bag-1"),
    );
    flaky.fail_next.store(u32::MAX, Ordering::SeqCst);
    // Three failures on three different capabilities open the one breaker...
    assert!(backend.head().await.is_err());
    assert!(backend.get("ns", b"k").await.is_err());
    assert!(backend.load_snapshot(&tenant, &stream).await.is_err());
    let reached = flaky.calls.load(Ordering::SeqCst);
    assert_eq!(reached, 3);
    // ...and then every capability fails fast, without reaching the backend.
    let open = backend.load_checkpoint("p").await.unwrap_err();
    assert!(
        open.retry_after().is_some(),
        "an open breaker says when to retry: {open:?}"
    );
    assert!(
        backend
            .read_stream_forwards(&tenant, &stream)
            .await
            .is_err()
    );
    assert!(
        backend
            .scan("ns", KeyRange::default(), Direction::Forwards, 1)
            .await
            .is_err()
    );
    assert_eq!(flaky.calls.load(Ordering::SeqCst), reached);
    // The capabilities handed out from the handle go through the same breaker.
    let snapshots: Arc<dyn SnapshotStore> = backend.clone();
    assert!(snapshots.load_snapshot(&tenant, &stream).await.is_err());
    assert_eq!(flaky.calls.load(Ordering::SeqCst), reached);
}
