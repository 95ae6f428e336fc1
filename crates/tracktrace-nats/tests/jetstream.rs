//! Integration tests against the real NATS JetStream on the machine (`nats://127.0.0.1:4222`,
//! or `TRACKTRACE_TEST_NATS_URL`), and against a private `nats-server` the outage test starts and
//! stops itself. Each test uses its own stream and subjects, so they run in parallel.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tracktrace_core::{
    EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent,
    Position, StreamId, TenantId,
};
use tracktrace_nats::ingest::{IngestConfig, IngestConsumer, IngestHandler, Verdict};
use tracktrace_nats::publisher::{BreakerState, Publisher, PublisherConfig};

mod common;

use common::{
    PrivateNats, assert_once_in_entity_order, create_stream, mapper, read_all_messages,
    shared_nats, unique,
};

async fn append_many(
    store: &InMemoryStore,
    tenant: &TenantId,
    n: usize,
    entities: usize,
) -> Position {
    let mut last = Position::START;
    for i in 0..n {
        let stream = StreamId::parse(format!("Bag-{}", i % entities)).expect("stream");
        let out = store
            .append_to(
                tenant,
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json("SCANNED", &serde_json::json!({"i": i}))],
            )
            .await
            .expect("append");
        last = out.last_position();
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_arrive_exactly_once_in_entity_order() {
    let Some(client) = shared_nats().await else {
        return;
    };
    let js = jetstream::new(client);
    let prefix = unique("ttpub");
    let stream_name = prefix.to_uppercase();
    create_stream(&js, &stream_name, &prefix).await;

    let store = Arc::new(InMemoryStore::new());
    let tenant = TenantId::parse("acme").expect("tenant");
    let head = append_many(&store, &tenant, 1000, 37).await;

    let publisher = Publisher::spawn(
        store.clone() as Arc<dyn EventStore>,
        store.clone(),
        js.clone(),
        Arc::new(mapper(prefix.clone())),
        PublisherConfig::new("pub-a"),
    );
    assert!(
        publisher.wait_for(head, Duration::from_secs(60)).await,
        "{:?}",
        publisher.status()
    );
    assert_eq!(publisher.status().published, 1000);

    // A second publisher replaying the same log from the start (a redelivery after a lost
    // checkpoint): JetStream drops every message as a duplicate by its event id.
    let replay = Publisher::spawn(
        store.clone() as Arc<dyn EventStore>,
        store.clone(),
        js.clone(),
        Arc::new(mapper(prefix.clone())),
        PublisherConfig::new("pub-b"),
    );
    assert!(
        replay.wait_for(head, Duration::from_secs(60)).await,
        "{:?}",
        replay.status()
    );
    let st = replay.status();
    assert_eq!((st.published, st.duplicates), (0, 1000), "{st:?}");

    let msgs = read_all_messages(&js, &stream_name, 1000).await;
    assert_eq!(assert_once_in_entity_order(&msgs, 1000), 37, "entities");
    let _ = js.delete_stream(&stream_name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_while_nats_is_down_and_the_backlog_drains_after() {
    let Some(mut nats) = PrivateNats::start() else {
        return;
    };
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .expect("connect");
    let js = jetstream::new(client);
    create_stream(&js, "OUTAGE", "outage").await;

    let store = Arc::new(InMemoryStore::new());
    let tenant = TenantId::parse("acme").expect("tenant");
    let first = append_many(&store, &tenant, 100, 10).await;
    let mut cfg = PublisherConfig::new("pub-outage");
    cfg.ack_timeout = Duration::from_millis(500);
    cfg.breaker_open_for = Duration::from_millis(300);
    cfg.max_backoff = Duration::from_millis(200);
    let publisher = Publisher::spawn(
        store.clone() as Arc<dyn EventStore>,
        store.clone(),
        js.clone(),
        Arc::new(mapper("outage".into())),
        cfg,
    );
    assert!(
        publisher.wait_for(first, Duration::from_secs(30)).await,
        "{:?}",
        publisher.status()
    );

    nats.stop();
    let head = append_many(&store, &tenant, 200, 10).await;
    let mut opened = false;
    for _ in 0..100 {
        if publisher.status().breaker != BreakerState::Closed {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        opened,
        "the breaker must open while NATS is down: {:?}",
        publisher.status()
    );
    let st = publisher.status();
    assert!(
        st.position < head,
        "nothing can be acknowledged while NATS is down"
    );
    assert!(
        st.lag_positions > 0 && st.lag_time > Duration::ZERO,
        "the lag shows the backlog: {st:?}"
    );

    nats.restart();
    assert!(
        publisher.wait_for(head, Duration::from_secs(60)).await,
        "backlog did not drain: {:?}",
        publisher.status()
    );
    assert_eq!(publisher.status().breaker, BreakerState::Closed);
    let st = publisher.status();
    assert_eq!(
        (st.lag_positions, st.lag_time),
        (0, Duration::ZERO),
        "{st:?}"
    );
    let msgs = read_all_messages(&js, "OUTAGE", 300).await;
    let ids: HashSet<&String> = msgs.iter().map(|m| &m.0).collect();
    assert_eq!(
        (msgs.len(), ids.len()),
        (300, 300),
        "every event exactly once after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_publisher_creates_its_stream_and_is_caught_up_without_own_events() {
    let Some(client) = shared_nats().await else {
        return;
    };
    let js = jetstream::new(client);
    let prefix = unique("ttfilt");
    let stream_name = prefix.to_uppercase();
    let store = Arc::new(InMemoryStore::new());
    let acme = TenantId::parse("acme").expect("tenant");
    let globex = TenantId::parse("globex").expect("tenant");
    append_many(&store, &acme, 50, 5).await;
    let head = append_many(&store, &globex, 20, 2).await;

    let publisher_for = |tenant: &TenantId, name: &str| {
        let mut cfg = PublisherConfig::new(name);
        cfg.filter = EventFilter::tenant(tenant.clone());
        cfg.create_stream = Some(async_nats::jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        });
        Publisher::spawn(
            store.clone() as Arc<dyn EventStore>,
            store.clone(),
            js.clone(),
            Arc::new(mapper(prefix.clone())),
            cfg,
        )
    };
    let globex_pub = publisher_for(&globex, "pub-globex");
    assert!(
        globex_pub.wait_for(head, Duration::from_secs(60)).await,
        "{:?}",
        globex_pub.status()
    );
    // A tenant with no events after the start: caught up at once, lag 0, nothing published.
    let nobody = publisher_for(&TenantId::parse("nobody").expect("tenant"), "pub-nobody");
    let mut caught_up = false;
    for _ in 0..400 {
        let st = nobody.status();
        if st.lag_positions == 0 && st.head >= head {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(caught_up, "{:?}", nobody.status());
    assert_eq!(nobody.status().published, 0);
    assert_eq!(
        globex_pub.status().lag_positions,
        0,
        "{:?}",
        globex_pub.status()
    );
    // Only globex's 20 events are on the stream the publisher created.
    let msgs = read_all_messages(&js, &stream_name, 20).await;
    assert_eq!(assert_once_in_entity_order(&msgs, 20), 2);
    let _ = js.delete_stream(&stream_name).await;
}

/// A tiny ingestion pipeline for the test: `{"entityId": "...", "eventId": "..."}` bodies.
struct TestPipeline {
    store: InMemoryStore,
}

impl IngestHandler for TestPipeline {
    async fn handle(&self, tenant: &str, body: &[u8]) -> Verdict {
        if body == b"boom" {
            panic!("a poison message the pipeline cannot survive");
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Verdict::Invalid(vec!["body: not JSON".into()]);
        };
        let mut errors = Vec::new();
        let entity = v["entityId"].as_str().unwrap_or_default();
        if entity.is_empty() {
            errors.push("entityId: required".to_string());
        }
        let id = v["eventId"].as_str().and_then(|s| EventId::parse(s).ok());
        if id.is_none() {
            errors.push("eventId: must be a UUID".to_string());
        }
        let (Ok(tenant), Ok(stream), Some(id)) =
            (TenantId::parse(tenant), StreamId::parse(entity), id)
        else {
            return Verdict::Invalid(errors);
        };
        let event = NewEvent::json("SCANNED", &v).with_id(id);
        match self
            .store
            .append_to(&tenant, &stream, ExpectedVersion::Any, vec![event])
            .await
        {
            Ok(_) => Verdict::Stored,
            Err(e) if e.is_retryable() => Verdict::Retry(e.to_string()),
            Err(e) => Verdict::Invalid(vec![e.to_string()]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_ingestion_stores_valid_dead_letters_invalid_and_dedups() {
    let Some(client) = shared_nats().await else {
        return;
    };
    let js = jetstream::new(client.clone());
    let p = unique("ttin");
    let cfg = IngestConfig {
        stream: format!("{}_IN", p.to_uppercase()),
        subject_prefix: format!("{p}.ingest"),
        durable: format!("{p}-durable"),
        dead_letter_prefix: format!("{p}.dlq"),
        dead_letter_stream: format!("{}_DLQ", p.to_uppercase()),
        max_deliver: 3,
        retry_delay: Duration::from_millis(100),
        handle_timeout: Duration::from_secs(10),
    };
    let pipeline = Arc::new(TestPipeline {
        store: InMemoryStore::new(),
    });
    let consumer = IngestConsumer::start(js.clone(), pipeline.clone(), cfg.clone())
        .await
        .expect("consumer");

    let id = EventId::new().to_string();
    let valid = serde_json::json!({"entityId": "Bag-1", "eventId": id});
    // A poison message first: the pipeline panics on it; it is dead-lettered and the
    // consumer goes on with the next ones.
    for body in [
        "boom".to_string(),
        valid.to_string(),
        "{\"entityId\": \"\"}".to_string(),
        valid.to_string(),
    ] {
        js.publish(format!("{}.acme", cfg.subject_prefix), body.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    for _ in 0..200 {
        let s = consumer.stats();
        if s.stored + s.dead_lettered >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s = consumer.stats();
    assert_eq!((s.stored, s.dead_lettered), (2, 2), "{s:?}");
    let tenant = TenantId::parse("acme").expect("tenant");
    let events = pipeline
        .store
        .read_stream_forwards(&tenant, &StreamId::parse("Bag-1").expect("stream"))
        .await
        .expect("read");
    assert_eq!(events.len(), 1, "the duplicate is not stored twice");

    let dlq = js
        .get_stream(&cfg.dead_letter_stream)
        .await
        .expect("dlq stream");
    let msg = dlq
        .get_last_raw_message_by_subject(&format!("{}.acme", cfg.dead_letter_prefix))
        .await
        .expect("dead letter");
    let body: serde_json::Value = serde_json::from_slice(&msg.payload).expect("json");
    let errors = body["errors"].to_string();
    assert!(
        errors.contains("entityId: required") && errors.contains("eventId"),
        "{body}"
    );
    let poison = dlq.get_raw_message(1).await.expect("first dead letter");
    let body: serde_json::Value = serde_json::from_slice(&poison.payload).expect("json");
    assert_eq!(body["payload"], "boom", "{body}");
    assert!(
        body["errors"].to_string().contains("pipeline failed"),
        "{body}"
    );
    for s in [&cfg.stream, &cfg.dead_letter_stream] {
        let _ = js.delete_stream(s).await;
    }
}
