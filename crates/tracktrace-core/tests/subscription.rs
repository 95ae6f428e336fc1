//! `Subscription` as a `futures_core::Stream` and its end when the store is closed.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use tokio::sync::watch;
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, Error, EventId, EventStore, EventStoreExt,
    ExpectedVersion, InMemoryStore, NewEvent, Position, ReadAll, ReadStream, RecordedEvent, Result,
    StreamId, SubscribeOptions, Subscription, TenantId, Timestamp, Version,
};

fn tenant() -> TenantId {
    TenantId::from_static("acme")
}

async fn append(store: &dyn EventStore, i: u64) {
    store
        .append_to(
            &tenant(),
            &StreamId::from_static("Bag-1"),
            ExpectedVersion::Any,
            vec![NewEvent::json("SCANNED", &serde_json::json!({ "i": i }))],
        )
        .await
        .expect("append");
}

async fn next_item(sub: &mut Subscription) -> Option<Result<RecordedEvent>> {
    poll_fn(|cx| Pin::new(&mut *sub).poll_next(cx)).await
}

#[tokio::test]
async fn the_stream_catches_up_then_follows_live_commits() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    for i in 0..5 {
        append(store.as_ref(), i).await;
    }
    let mut sub = Subscription::new(
        store.clone(),
        SubscribeOptions::default().with_batch_size(2),
    );
    let mut positions = Vec::new();
    for _ in 0..5 {
        let e = next_item(&mut sub)
            .await
            .expect("an item")
            .expect("an event");
        positions.push(e.position);
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    // Caught up: the stream waits, and a later commit wakes it.
    let waiting = tokio::time::timeout(Duration::from_millis(50), next_item(&mut sub)).await;
    assert!(waiting.is_err(), "nothing to deliver yet");
    let writer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        append(writer.as_ref(), 5).await;
    });
    let live = tokio::time::timeout(Duration::from_secs(5), next_item(&mut sub))
        .await
        .expect("woken by the commit")
        .expect("an item")
        .expect("an event");
    assert!(live.position > positions[4]);
    // `next` and the stream share one state: nothing is delivered twice or skipped.
    append(store.as_ref(), 6).await;
    let e = sub.next().await.expect("next");
    assert!(e.position > live.position);
    assert_eq!(sub.last_position(), Some(e.position));
}

/// An in-memory store whose head notifications can be closed, like a store shut down under a
/// subscriber.
struct Closable {
    inner: InMemoryStore,
    head: Mutex<Option<watch::Sender<Position>>>,
    rx: watch::Receiver<Position>,
}

impl Closable {
    fn new() -> Self {
        let (tx, rx) = watch::channel(Position::START);
        Self {
            inner: InMemoryStore::new(),
            head: Mutex::new(Some(tx)),
            rx,
        }
    }

    fn close(&self) {
        self.head.lock().unwrap().take();
    }
}

#[async_trait]
impl EventStore for Closable {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        let out = self.inner.append(req).await?;
        if let Some(tx) = &*self.head.lock().unwrap() {
            tx.send_replace(out.last_position());
        }
        Ok(out)
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
        self.rx.clone()
    }
}

#[tokio::test]
async fn a_closed_store_ends_the_subscription_with_a_terminal_error() {
    let store = Arc::new(Closable::new());
    append(store.as_ref(), 0).await;
    let mut sub = Subscription::new(store.clone(), SubscribeOptions::default());
    assert!(next_item(&mut sub).await.expect("an item").is_ok());
    let closer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        closer.close();
    });
    let err = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the close wakes the waiting subscriber")
        .expect_err("closed");
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert!(
        !err.is_retryable(),
        "a consumer loop retrying retryable errors must stop"
    );
    // The stream has ended; `next` keeps saying why.
    assert!(next_item(&mut sub).await.is_none());
    assert!(matches!(sub.next().await, Err(Error::Closed)));
    assert!(matches!(sub.wait().await, Err(Error::Closed)));
}
