//! Integration tests against the real NATS JetStream on the machine (`nats://127.0.0.1:4222`,
//! or `TRACKTRACE_TEST_NATS_URL`), and against a private `nats-server` the outage test starts and
//! stops itself. Each test uses its own stream and subjects, so they run in parallel.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tracktrace_core::{
    EventId, EventStore, EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent, Position,
    StreamId, TenantId,
};
use tracktrace_nats::ingest::{IngestConfig, IngestConsumer, IngestHandler, Verdict};
use tracktrace_nats::publisher::{BreakerState, Publisher, PublisherConfig};

mod common;

use common::{
    assert_once_in_entity_order, create_stream, in_ci, mapper, read_all_messages, shared_nats,
    unique,
};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

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

/// A private nats-server with JetStream on a free port, which the test can stop and restart.
struct PrivateNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateNats {
    fn start() -> Option<Self> {
        if !Path::new(NATS_SERVER).exists() {
            assert!(!in_ci(), "{NATS_SERVER} missing under CI=true");
            eprintln!("SKIPPED: {NATS_SERVER} not found");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let mut n = Self {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        n.restart();
        Some(n)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not start");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
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
    assert!(
        publisher.status().position < head,
        "nothing can be acknowledged while NATS is down"
    );

    nats.restart();
    assert!(
        publisher.wait_for(head, Duration::from_secs(60)).await,
        "backlog did not drain: {:?}",
        publisher.status()
    );
    assert_eq!(publisher.status().breaker, BreakerState::Closed);
    let msgs = read_all_messages(&js, "OUTAGE", 300).await;
    let ids: HashSet<&String> = msgs.iter().map(|m| &m.0).collect();
    assert_eq!(
        (msgs.len(), ids.len()),
        (300, 300),
        "every event exactly once after the outage"
    );
}

/// A tiny ingestion pipeline for the test: `{"entityId": "...", "eventId": "..."}` bodies.
struct TestPipeline {
    store: InMemoryStore,
}

impl IngestHandler for TestPipeline {
    async fn handle(&self, tenant: &str, body: &[u8]) -> Verdict {
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
    };
    let pipeline = Arc::new(TestPipeline {
        store: InMemoryStore::new(),
    });
    let consumer = IngestConsumer::start(js.clone(), pipeline.clone(), cfg.clone())
        .await
        .expect("consumer");

    let id = EventId::new().to_string();
    let valid = serde_json::json!({"entityId": "Bag-1", "eventId": id});
    for body in [
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
        if s.stored + s.dead_lettered >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s = consumer.stats();
    assert_eq!((s.stored, s.dead_lettered), (2, 1), "{s:?}");
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
    for s in [&cfg.stream, &cfg.dead_letter_stream] {
        let _ = js.delete_stream(s).await;
    }
}
