//! Focused tests of runtime pieces the generic runtime checks do not isolate: upcaster chains,
//! backoff bounds, a breaker whose probe is cancelled, projection error paths, two saga
//! runners racing on one trigger or sharing a checkpoint, a saga checkpoint without an index of
//! open work, reloading a long saga stream, and where a filtered subscription resumes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tracktrace_conformance::runtime::{
    BalanceProjection, CountingStore, FaultyStore, OrderSaga, ParcelCommand, ParcelDispatcher,
    ParcelSaga, RecordingDispatcher, RuntimeStores, dump, seed_accounts,
};
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::upcast::Upcaster;
use tracktrace_core::{
    AppendOutcome, AppendRequest, BoxError, BreakerConfig, BreakerState, CheckpointStore,
    CircuitBreaker, Error, EventFilter, EventStore, EventStoreExt, ExpectedVersion, InMemoryStore,
    NewEvent, Position, Projection, ProjectionError, ProjectionRunner, ReadModelBatch,
    ReadModelStore, ReadModelTx, ReadModelWrite, RecordedEvent, RetryPolicy, Retrying, SagaRecord,
    SagaRunner, StreamId, TenantId, Upcasters,
};

fn tenant() -> TenantId {
    TenantId::parse("acme").unwrap()
}

async fn stored(
    store: &InMemoryStore,
    event_type: &str,
    version: u32,
    body: &str,
) -> RecordedEvent {
    let stream = StreamId::parse(format!("S-{}", uuid::Uuid::now_v7())).unwrap();
    let e = NewEvent::new(event_type, "application/json", body.as_bytes().to_vec())
        .with_schema_version(version);
    store
        .append_to(&tenant(), &stream, ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    store
        .read_stream_forwards(&tenant(), &stream)
        .await
        .unwrap()[0]
        .clone()
}

struct Rename;

impl Upcaster for Rename {
    fn event_type(&self) -> &str {
        "T"
    }
    fn source_version(&self) -> u32 {
        2
    }
    fn upcast(&self, _content_type: &str, payload: Bytes) -> Result<Bytes, BoxError> {
        let s = String::from_utf8(payload.to_vec())?;
        Ok(Bytes::from(s.replace("\"n\"", "\"count\"")))
    }
}

#[tokio::test]
async fn upcasters_chain_versions_and_report_failures() {
    let store = InMemoryStore::new();
    let chain = Upcasters::new()
        .json("T", 1, |mut v| {
            v["n"] = serde_json::json!(v["n"].as_i64().unwrap_or(0) * 10);
            Ok(v)
        })
        .register(Rename);
    let v1 = stored(&store, "T", 1, r#"{"n":4}"#).await;
    let up = chain.upcast(v1).unwrap();
    assert_eq!(up.schema_version, 3);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&up.payload).unwrap(),
        serde_json::json!({"count": 40})
    );
    // Current version and other types pass through unchanged.
    let v3 = stored(&store, "T", 3, r#"{"count":1}"#).await;
    assert_eq!(chain.upcast(v3.clone()).unwrap(), v3);
    let other = stored(&store, "U", 1, r#"{"n":1}"#).await;
    assert_eq!(chain.upcast(other.clone()).unwrap(), other);
    // Undecodable input is a typed corruption at the event's position, not a panic.
    let bad = stored(&store, "T", 1, "not json").await;
    let pos = bad.position;
    match chain.upcast(bad) {
        Err(Error::Corruption { position, .. }) => assert_eq!(position, Some(pos)),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn backoff_stays_within_its_cap() {
    let p = RetryPolicy::default()
        .with_max_attempts(10)
        .with_backoff(Duration::from_millis(2), Duration::from_millis(20));
    for retry in 1..40 {
        let cap = Duration::from_millis(2 * (1u64 << (retry - 1).min(20))).min(p.max_backoff);
        for _ in 0..50 {
            assert!(p.backoff(retry) <= cap, "retry {retry}");
        }
    }
}

#[tokio::test]
async fn a_cancelled_probe_does_not_wedge_the_breaker() {
    let faulty = Arc::new(FaultyStore::new(Arc::new(InMemoryStore::new())));
    let breaker = CircuitBreaker::with_config(
        faulty.clone(),
        BreakerConfig::default()
            .with_failure_threshold(1)
            .with_open_for(Duration::from_millis(300)),
    );
    faulty.set_down(true);
    assert!(breaker.head().await.is_err());
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The probe hangs and its caller gives up (the probe's future is dropped).
    faulty.set_down(false);
    faulty.set_hang(true);
    let calls = faulty.calls();
    assert!(
        tokio::time::timeout(Duration::from_millis(20), breaker.head())
            .await
            .is_err()
    );
    assert_eq!(faulty.calls(), calls + 1, "the probe reached the store");
    // While the (abandoned) probe counts as in flight, others fail fast.
    match breaker.head().await {
        Err(Error::Unavailable {
            retry_after: Some(_),
            ..
        }) => {}
        other => panic!("expected a fast rejection, got {other:?}"),
    }
    assert_eq!(faulty.calls(), calls + 1);
    // After open_for a new probe is let through and closes the breaker.
    faulty.set_hang(false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    breaker
        .head()
        .await
        .expect("a new probe is let through after open_for");
    assert_eq!(breaker.state(), BreakerState::Closed);
}

/// A call deadline turns a store that stopped answering into fast, typed failures: each call
/// waits at most the deadline, and once the breaker is open no call reaches the store.
#[tokio::test]
async fn a_call_deadline_bounds_a_hanging_store() {
    let faulty = Arc::new(FaultyStore::new(Arc::new(InMemoryStore::new())));
    let breaker = CircuitBreaker::with_config(
        faulty.clone(),
        BreakerConfig::default()
            .with_failure_threshold(2)
            .with_open_for(Duration::from_secs(60))
            .with_call_timeout(Some(Duration::from_millis(50))),
    );
    faulty.set_hang(true);
    for _ in 0..2 {
        // Bounded by the deadline (the outer timeout only keeps a broken build from hanging).
        let r = tokio::time::timeout(Duration::from_secs(10), breaker.head())
            .await
            .expect("the call deadline applies");
        assert!(
            matches!(&r, Err(Error::Unavailable { reason, .. }) if reason.contains("did not answer")),
            "{r:?}"
        );
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let calls = faulty.calls();
    assert!(breaker.head().await.is_err());
    assert_eq!(
        faulty.calls(),
        calls,
        "an open breaker does not call the store"
    );
}

/// A store that is at capacity (`Overloaded`) is busy, not broken: the breaker stays closed
/// however often it says so, and `Retrying` retries it.
#[tokio::test]
async fn overload_never_opens_the_breaker() {
    struct Busy(Arc<InMemoryStore>, std::sync::atomic::AtomicU32);
    #[async_trait]
    impl Intercept for Busy {
        type Inner = InMemoryStore;
        fn inner(&self) -> &InMemoryStore {
            &self.0
        }
        async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, Error> {
            if self.1.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                return Err(Error::Overloaded {
                    reason: "queue full".into(),
                    retry_after: Duration::from_millis(1),
                });
            }
            self.0.append(req).await
        }
    }
    let busy = Arc::new(Intercepted(Busy(
        Arc::new(InMemoryStore::new()),
        std::sync::atomic::AtomicU32::new(10),
    )));
    let breaker = CircuitBreaker::with_config(
        busy.clone(),
        BreakerConfig::default().with_failure_threshold(1),
    );
    let tenant = TenantId::parse("acme").unwrap();
    let stream = StreamId::parse("s-1").unwrap();
    let ev = || vec![NewEvent::json("X", &serde_json::json!({}))];
    for _ in 0..5 {
        let r = breaker
            .append_to(&tenant, &stream, ExpectedVersion::Any, ev())
            .await;
        assert!(
            matches!(&r, Err(e @ Error::Overloaded { .. }) if e.is_retryable()),
            "{r:?}"
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
    // Retrying waits it out (5 more refusals, then the append goes through).
    let retrying = Retrying::new(breaker);
    retrying
        .append_to(&tenant, &stream, ExpectedVersion::Any, ev())
        .await
        .expect("retried past the overload");
}

/// Read models and checkpoints go through the breaker too.
#[tokio::test]
async fn the_breaker_guards_read_models() {
    let mem = Arc::new(InMemoryStore::new());
    let breaker = CircuitBreaker::new(mem.clone());
    breaker
        .commit(
            ReadModelBatch::new("p", None, Position::new(7)).with_writes(vec![
                ReadModelWrite::put("ns", b"k".to_vec(), b"v".to_vec()),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(
        breaker.get("ns", b"k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(
        breaker.load_checkpoint("p").await.unwrap(),
        Some(Position::new(7))
    );
}

/// Fails on the event with the given sequence number.
struct Failing {
    fail_at: u64,
    seen: u64,
}

#[async_trait]
impl Projection for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    async fn apply(
        &mut self,
        _e: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        self.seen += 1;
        if self.seen == self.fail_at {
            return Err("boom".into());
        }
        tx.put("failing", self.seen.to_be_bytes(), b"x".to_vec());
        Ok(())
    }
}

#[tokio::test]
async fn a_failing_handler_commits_nothing_of_its_batch() {
    let store = Arc::new(InMemoryStore::new());
    seed_accounts(&*store, 10, 2).await.unwrap();
    let mut r = ProjectionRunner::new(
        store.clone(),
        store.clone(),
        Failing {
            fail_at: 10,
            seen: 0,
        },
    )
    .with_batch_size(8);
    r.step().await.unwrap();
    let cp = r.checkpoint().await.unwrap();
    match r.step().await {
        Err(ProjectionError::Handler { position, .. }) => assert_eq!(position, Position::new(10)),
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert_eq!(store.load_checkpoint("failing").await.unwrap(), cp);
    assert_eq!(
        dump(&*store, "failing").await.unwrap().len(),
        8,
        "only the first batch"
    );
}

/// Writes through its tx although it runs at-least-once.
struct Writer;

#[async_trait]
impl Projection for Writer {
    fn name(&self) -> &str {
        "writer"
    }
    async fn apply(
        &mut self,
        _e: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        tx.put("w", b"k".to_vec(), b"v".to_vec());
        Ok(())
    }
}

/// Counts events in memory (an at-least-once consumer).
#[derive(Default)]
struct Counting(u64);

#[async_trait]
impl Projection for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn filter(&self) -> EventFilter {
        EventFilter::default().with_event_types(["Wanted"])
    }
    async fn apply(
        &mut self,
        _e: &RecordedEvent,
        _tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        self.0 += 1;
        Ok(())
    }
    async fn reset(&mut self) -> Result<(), BoxError> {
        self.0 = 0;
        Ok(())
    }
}

#[tokio::test]
async fn at_least_once_runners_keep_only_a_checkpoint() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints = Arc::new(InMemoryStore::new());
    let s = StreamId::parse("X-1").unwrap();
    for ty in ["Wanted", "Other", "Wanted", "Other", "Other"] {
        store
            .append_to(
                &tenant(),
                &s,
                ExpectedVersion::Any,
                vec![NewEvent::json(ty, &serde_json::json!({}))],
            )
            .await
            .unwrap();
    }
    let mut w = ProjectionRunner::at_least_once(store.clone(), checkpoints.clone(), Writer);
    assert!(matches!(
        w.step().await,
        Err(ProjectionError::Handler { .. })
    ));
    let mut c =
        ProjectionRunner::at_least_once(store.clone(), checkpoints.clone(), Counting::default());
    c.catch_up().await.unwrap();
    assert_eq!(c.projection().0, 2);
    // The checkpoint moves past the filtered-out tail too.
    assert_eq!(
        checkpoints.load_checkpoint("counting").await.unwrap(),
        Some(Position::new(5))
    );
    assert_eq!(c.lag_handle().get().positions, 0);
    c.rebuild().await.unwrap();
    assert_eq!(c.projection().0, 2, "reset then replayed");
}

#[tokio::test]
async fn same_store_projection_matches_the_log_after_many_restarts() {
    let store = Arc::new(InMemoryStore::new());
    let s = RuntimeStores::from_store(store.clone());
    seed_accounts(&*s.events, 97, 5).await.unwrap();
    let p = BalanceProjection::new("restarts");
    // A new runner for every batch: each restart resumes exactly after the last commit.
    loop {
        let mut r = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), p.clone())
            .with_batch_size(7);
        if r.step().await.unwrap().1 {
            break;
        }
    }
    let resumed = dump(&*store, &p.namespace()).await.unwrap();
    let mut r = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), p.clone());
    r.rebuild().await.unwrap();
    assert_eq!(resumed, dump(&*store, &p.namespace()).await.unwrap());
}

#[tokio::test]
async fn two_saga_runners_record_a_trigger_once() {
    let store = Arc::new(InMemoryStore::new());
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(60),
    };
    let d1 = RecordingDispatcher::new(store.clone());
    let d2 = RecordingDispatcher::new(store.clone());
    // Separate checkpoint stores: both runners see the trigger.
    let mut r1 = SagaRunner::new(
        store.clone(),
        Arc::new(InMemoryStore::new()),
        saga.clone(),
        d1.clone(),
    );
    let mut r2 = SagaRunner::new(
        store.clone(),
        Arc::new(InMemoryStore::new()),
        saga,
        d2.clone(),
    );
    r2.run_once().await.unwrap(); // r2 recovers before the instance exists
    let s = StreamId::parse("Order-o9").unwrap();
    store
        .append_to(
            &tenant(),
            &s,
            ExpectedVersion::Any,
            vec![NewEvent::json("OrderPlaced", &serde_json::json!({}))],
        )
        .await
        .unwrap();
    r1.run_once().await.unwrap();
    r2.run_once().await.unwrap();
    let records = r1.records(&tenant(), "o9").await.unwrap();
    let triggered = records
        .iter()
        .filter(|r| matches!(r, SagaRecord::Triggered { .. }))
        .count();
    assert_eq!(triggered, 1, "{records:?}");
    assert_eq!(d1.sent().len() + d2.sent().len(), 1, "Reserve sent once");
}

#[tokio::test]
async fn a_filtered_subscription_resumes_past_events_it_filtered_out() {
    let store = Arc::new(InMemoryStore::new());
    let other = TenantId::parse("globex").unwrap();
    let append = |t: TenantId| {
        let store = store.clone();
        async move {
            store
                .append_to(
                    &t,
                    &StreamId::parse("S-1").unwrap(),
                    ExpectedVersion::Any,
                    vec![NewEvent::json("E", &serde_json::json!({}))],
                )
                .await
                .unwrap()
                .last_position()
        }
    };
    let mine = append(tenant()).await;
    append(other.clone()).await;
    let head = append(other).await;
    let mut sub = tracktrace_core::Subscription::new(
        store.clone(),
        tracktrace_core::SubscribeOptions::default()
            .with_from(Position::START)
            .with_filter(EventFilter::tenant(tenant()))
            .with_batch_size(1),
    );
    assert_eq!(sub.resume_position(), Position::START);
    let batch = sub.next_batch(10).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].position, mine);
    // Nothing of ours is left; the read considered the other tenant's events too.
    assert!(sub.next_batch(10).await.unwrap().is_empty());
    assert_eq!(sub.resume_position(), head.next());
}

#[tokio::test]
async fn a_paced_saga_runner_handles_every_trigger_once_across_a_restart() {
    let store = Arc::new(InMemoryStore::new());
    let checkpoints = Arc::new(InMemoryStore::new());
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(60),
    };
    let d = RecordingDispatcher::new(store.clone());
    let mut r = SagaRunner::new(store.clone(), checkpoints.clone(), saga.clone(), d.clone())
        .with_min_interval(Duration::from_millis(100));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        r.run(async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        r
    });
    // A burst of triggers inside one pacing interval.
    for o in ["o1", "o2", "o3"] {
        store
            .append_to(
                &tenant(),
                &StreamId::parse(format!("Order-{o}")).unwrap(),
                ExpectedVersion::Any,
                vec![NewEvent::json("OrderPlaced", &serde_json::json!({}))],
            )
            .await
            .unwrap();
    }
    for _ in 0..500 {
        if d.sent().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(d.sent().len(), 3, "every trigger handled");
    stop.send(()).unwrap();
    let r = task.await.unwrap();
    // A new runner resumes from the stored checkpoint, which may lag behind what was handled
    // (it is stored lazily): nothing is recorded or sent twice.
    let mut again = SagaRunner::new(store.clone(), checkpoints, saga, d.clone());
    again.run_once().await.unwrap();
    assert_eq!(d.sent().len(), 3, "nothing sent twice");
    for o in ["o1", "o2", "o3"] {
        let triggered = r
            .records(&tenant(), o)
            .await
            .unwrap()
            .iter()
            .filter(|x| matches!(x, SagaRecord::Triggered { .. }))
            .count();
        assert_eq!(triggered, 1, "{o}");
    }
}

async fn order(store: &InMemoryStore, order: &str, event_type: &str) {
    store
        .append_to(
            &tenant(),
            &StreamId::parse(format!("Order-{order}")).unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::json(event_type, &serde_json::json!({}))],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_checkpoint_stored_without_an_index_is_recovered_from_the_whole_saga_log_once() {
    let store = Arc::new(InMemoryStore::new());
    let s = RuntimeStores::from_store(store.clone());
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(3600),
    };
    let d = RecordingDispatcher::new(store.clone());
    order(&store, "open", "OrderPlaced").await;
    for i in 0..10 {
        order(&store, &format!("done{i}"), "OrderPlaced").await;
        order(&store, &format!("done{i}"), "PaymentReceived").await;
    }
    let mut r = SagaRunner::new(store.clone(), store.clone(), saga.clone(), d.clone());
    r.run_once().await.unwrap();
    r.run_once().await.unwrap();
    drop(r);
    // What a runner that kept no index leaves behind: its checkpoint alone, past the records
    // of an order whose deadline is pending.
    let cp = store.load_checkpoint("saga.order").await.unwrap().unwrap();
    store
        .commit(
            ReadModelBatch::new("saga.order", Some(cp), cp)
                .with_writes(vec![ReadModelWrite::clear("saga.order.open")]),
        )
        .await
        .unwrap();
    let counting = Arc::new(CountingStore::new(&s));
    let mut r = SagaRunner::new(counting.clone(), counting.clone(), saga.clone(), d.clone());
    let p = r.run_once().await.unwrap();
    assert_eq!((p.triggers, p.dispatched), (0, 0));
    assert_eq!(
        r.instances_in_memory(),
        1,
        "the open order, found in the saga log"
    );
    assert!(r.next_deadline().is_some());
    let whole_log = counting.read();
    drop(r);
    // The index it wrote spares the next restart that read.
    let counting = Arc::new(CountingStore::new(&s));
    let mut r = SagaRunner::new(counting.clone(), counting.clone(), saga, d.clone());
    r.run_once().await.unwrap();
    assert_eq!(r.instances_in_memory(), 1);
    assert!(
        counting.read() * 5 < whole_log,
        "{} vs {whole_log}",
        counting.read()
    );
    assert_eq!(d.sent().len(), 21, "each command sent once");
}

#[tokio::test]
async fn a_long_lived_instance_is_reloaded_from_the_end_of_its_stream() {
    let store = Arc::new(InMemoryStore::new());
    let s = RuntimeStores::from_store(store.clone());
    let saga = ParcelSaga {
        hold: Duration::from_secs(3600),
    };
    let d = ParcelDispatcher::new(store.clone());
    let stream = StreamId::parse("Parcel-p1").unwrap();
    let scans: Vec<_> = (0..150)
        .map(|_| NewEvent::json("Scanned", &serde_json::json!({})))
        .collect();
    store
        .append_to(&tenant(), &stream, ExpectedVersion::Any, scans)
        .await
        .unwrap();
    store
        .append_to(
            &tenant(),
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::json("Held", &serde_json::json!({}))],
        )
        .await
        .unwrap();
    let mut r = SagaRunner::new(store.clone(), store.clone(), saga.clone(), d.clone());
    let p = r.run_once().await.unwrap();
    assert_eq!((p.triggers, p.dispatched), (151, 150));
    r.run_once().await.unwrap();
    drop(r);
    let records = store
        .read_stream_forwards(
            &tenant(),
            &SagaRunner::<ParcelSaga, ParcelDispatcher>::stream_id("p1").unwrap(),
        )
        .await
        .unwrap()
        .len();
    assert!(records > 500, "{records}");
    // A restart reloads the held parcel from the tail of its stream, with its whole state.
    let counting = Arc::new(CountingStore::new(&s));
    let mut r = SagaRunner::new(counting.clone(), counting.clone(), saga, d.clone());
    r.run_once().await.unwrap();
    assert_eq!(r.state(&tenant(), "p1").map(|s| s.scans), Some(150));
    assert!(r.next_deadline().is_some());
    assert!(
        counting.read() < 80,
        "read {} of {records}",
        counting.read()
    );
    // After delivery it leaves memory; a scan reloads it, again from the tail.
    for event_type in ["Delivered", "Scanned"] {
        store
            .append_to(
                &tenant(),
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json(event_type, &serde_json::json!({}))],
            )
            .await
            .unwrap();
        r.run_once().await.unwrap();
    }
    assert_eq!(
        r.instances_in_memory(),
        1,
        "held: the deadline is still pending"
    );
    let acks = d
        .sent()
        .iter()
        .filter(|(_, _, c)| matches!(c, ParcelCommand::Ack { scan: 151, .. }))
        .count();
    assert_eq!(acks, 1, "the state carried over");
}

#[tokio::test]
async fn two_runners_sharing_a_checkpoint_keep_the_open_work_index_whole() {
    let store = Arc::new(InMemoryStore::new());
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(3600),
    };
    let (da, db) = (
        RecordingDispatcher::new(store.clone()),
        RecordingDispatcher::new(store.clone()),
    );
    let mut a = SagaRunner::new(store.clone(), store.clone(), saga.clone(), da.clone());
    let mut b = SagaRunner::new(store.clone(), store.clone(), saga.clone(), db.clone());
    b.run_once().await.unwrap();
    order(&store, "o1", "OrderPlaced").await;
    a.run_once().await.unwrap();
    // `b` believes the checkpoint it loaded is stored; `a` moved it.
    order(&store, "o2", "OrderPlaced").await;
    b.run_once().await.unwrap();
    a.run_once().await.unwrap();
    order(&store, "o1", "PaymentReceived").await;
    b.run_once().await.unwrap();
    a.run_once().await.unwrap();
    drop((a, b));
    let dc = RecordingDispatcher::new(store.clone());
    let mut c = SagaRunner::new(store.clone(), store.clone(), saga, dc.clone());
    let p = c.run_once().await.unwrap();
    assert_eq!((p.triggers, p.dispatched), (0, 0));
    assert_eq!(c.instances_in_memory(), 1, "o2's deadline, o1 shipped");
    assert!(c.next_deadline().is_some());
    let mut sent: Vec<_> = da
        .sent()
        .into_iter()
        .chain(db.sent())
        .map(|(_, c)| format!("{c:?}"))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            "Reserve(\"Order-o1\")",
            "Reserve(\"Order-o2\")",
            "Ship(\"Order-o1\")"
        ]
    );
}
