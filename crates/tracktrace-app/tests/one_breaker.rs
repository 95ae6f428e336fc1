//! The API's backend handle (`metrics::guarded_backend`): one circuit breaker in front of the
//! log, the read models and the snapshots, so an outage seen on appends makes trace reads fail
//! fast too, and the breaker is exported once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tracktrace_app::metrics::{Metrics, guarded_backend};
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{
    Backend, BreakerConfig, Error, EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent,
    ReadModelStore, Result, SnapshotStore, StreamId, TenantId,
};

/// The in-memory store, failing every call while `down`; counts the calls that reached it.
struct Outage {
    inner: InMemoryStore,
    down: AtomicBool,
    reached: AtomicU32,
}

#[async_trait::async_trait]
impl Intercept for Outage {
    type Inner = InMemoryStore;
    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }
    async fn before(&self) -> Result<()> {
        self.reached.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(Error::unavailable("test outage", "injected"))
        } else {
            Ok(())
        }
    }
}

#[tokio::test]
async fn failing_appends_open_the_breaker_for_read_models_and_snapshots_too() {
    let raw = Arc::new(Intercepted(Outage {
        inner: InMemoryStore::new(),
        down: AtomicBool::new(false),
        reached: AtomicU32::new(0),
    }));
    let metrics = Metrics::new();
    let api = guarded_backend(
        raw.clone() as Arc<dyn Backend>,
        "memory",
        BreakerConfig::default()
            .with_failure_threshold(2)
            .with_open_for(Duration::from_secs(60)),
        &metrics,
    );
    let (tenant, stream) = (
        TenantId::from_static("acme"),
        StreamId::from_static("Bag-1"),
    );
    let append = || {
        api.append_to(
            &tenant,
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::json("SEEN", &serde_json::json!({}))],
        )
    };
    append().await.unwrap();
    assert!(api.get("trace", b"Bag-1").await.unwrap().is_none());

    raw.down.store(true, Ordering::SeqCst);
    assert!(append().await.is_err());
    assert!(append().await.is_err());
    let reached = raw.reached.load(Ordering::SeqCst);

    // Open: the read models and snapshots fail fast, without reaching the store.
    let err = api.get("trace", b"Bag-1").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let err = api.load_snapshot(&tenant, &stream).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(append().await.is_err());
    assert_eq!(
        raw.reached.load(Ordering::SeqCst),
        reached,
        "nothing reached the store"
    );

    // One breaker, exported once, open.
    let text = metrics.render();
    let states: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tracktrace_circuit_breaker_state{"))
        .collect();
    assert_eq!(
        states,
        vec!["tracktrace_circuit_breaker_state{component=\"event_store\"} 2"],
        "{text}"
    );
}
