//! Propagation end to end (feature `nats`): real `tracktrace-server` processes on the embedded
//! sled store, driven over HTTP, publishing to and consuming from real NATS JetStream — the
//! machine's (`TRACKTRACE_TEST_NATS_URL`, default `nats://127.0.0.1:4222`; unreachable: a
//! failure under `CI=true`, else a loud skip) or, for the outage test, a private
//! `nats-server` the test stops and restarts (never the machine's). Every test has its own
//! data directory, subjects and streams, so they run in parallel.
#![cfg(feature = "nats")]

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tracktrace_nats::async_nats::{self, HeaderMap, jetstream};

mod common;
#[path = "../../tracktrace-nats/tests/common/mod.rs"]
mod nats;

use common::{Exposition, Server, call, cli_token, event, trace};
use nats::{
    PrivateNats, assert_once_in_entity_order, nats_url, read_all_messages, shared_nats, unique,
};

/// Waits (bounded: about a minute) until `check` holds; panics naming `what` otherwise.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting: {what}");
}

/// A server on its own data directory; tokens come from the `token` subcommand.
struct Env {
    data: String,
}

impl Env {
    fn new(dir: &Path) -> Env {
        Env {
            data: dir.join("data").to_str().unwrap().to_owned(),
        }
    }

    fn start(&self, dir: &Path, name: &str, extra: &[&str]) -> Server {
        let mut args = vec!["--data-dir", self.data.as_str()];
        args.extend_from_slice(extra);
        Server::start(dir, name, &args)
    }

    fn token(&self, server: &Server, tenant: &str, scopes: &str) -> String {
        cli_token(&["--data-dir", &self.data], &server.addr, tenant, scopes)
    }
}

/// `/metrics`, parsed.
async fn scrape(addr: &str, token: &str) -> Exposition {
    let r = call(addr, "GET", "/metrics", Some(token), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    Exposition::parse(&String::from_utf8(r.body).unwrap()).unwrap()
}

const SITA: [(&str, &str); 2] = [("tenant", "acme"), ("route", "sita")];
const NATS_BREAKER: [(&str, &str); 1] = [("component", "nats_publisher")];

async fn readyz(addr: &str) -> (u16, Value) {
    let r = call(addr, "GET", "/readyz", None, None).await;
    (r.status, r.json())
}

/// The `/readyz` status of one route, if it runs.
async fn route_status(addr: &str, tenant: &str, route: &str) -> Option<Value> {
    let (_, v) = readyz(addr).await;
    v["propagation"]["routes"]
        .as_array()?
        .iter()
        .find(|r| r["tenant"] == tenant && r["route"] == route)
        .cloned()
}

async fn caught_up(addr: &str, tenant: &str, route: &str) -> bool {
    route_status(addr, tenant, route)
        .await
        .is_some_and(|r| r["lagPositions"] == 0 && r["breaker"] == "closed")
}

async fn add_route(addr: &str, admin: &str, tenant: &str, body: &Value) -> Value {
    let path = format!("/api/v1/admin/tenants/{tenant}/routes");
    let r = call(addr, "POST", &path, Some(admin), Some(body)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn stream_count(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Captures one event and returns (event id, position).
async fn capture_id(addr: &str, token: &str, ev: &Value) -> (String, u64) {
    let r = call(addr, "POST", "/api/v1/events", Some(token), Some(ev)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    (
        v["eventId"].as_str().unwrap().to_owned(),
        v["position"].as_u64().unwrap(),
    )
}

fn at(i: usize) -> String {
    format!(
        "2026-11-28T{:02}:{:02}:{:02}Z",
        6 + i / 3600,
        (i / 60) % 60,
        i % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_http_captures_reach_the_partner_subject_once_in_entity_order() {
    let Some(client) = shared_nats().await else {
        return;
    };
    let js = jetstream::new(client);
    let p = unique("tte2e");
    let (sita_stream, replay_stream, feed_stream) = (
        format!("{}_SITA", p.to_uppercase()),
        format!("{}_REPLAY", p.to_uppercase()),
        format!("{}_FEED", p.to_uppercase()),
    );
    let feed_prefix = format!("{p}.feed");
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let url = nats_url();
    let server = env.start(
        dir.path(),
        "pub",
        &[
            "--nats-url",
            &url,
            "--nats-publish",
            "--nats-batch-size",
            "64",
            "--nats-feed-stream",
            &feed_stream,
            "--nats-subject-prefix",
            &feed_prefix,
        ],
    );
    let addr = server.addr.clone();
    let admin = env.token(&server, "_system", "admin");
    let acme = env.token(&server, "acme", "events:write,trace:read");
    let globex = env.token(&server, "globex", "events:write");

    // The SITA feed of acme: bag loads and scans only.
    let sita = json!({
        "name": "sita", "partner": "SITA", "eventTypes": ["BagLoaded", "BagScanned"],
        "entityTypes": ["Bag"], "subjectPrefix": format!("{p}.sita"), "stream": sita_stream
    });
    let route = add_route(&addr, &admin, "acme", &sita).await;
    assert_eq!(route["subjectPrefix"], format!("{p}.sita"));
    let again = call(
        &addr,
        "POST",
        "/api/v1/admin/tenants/acme/routes",
        Some(&admin),
        Some(&sita),
    )
    .await;
    assert_eq!(again.status, 200, "adding the same route is idempotent");
    let a = addr.as_str();
    eventually("the route publisher starts", || async move {
        route_status(a, "acme", "sita").await.is_some()
    })
    .await;

    // 1,000 routed captures over HTTP (25 bags × 40 events), with events the route must not
    // publish in between: another event type, and another tenant.
    let mut routed: Vec<(String, u64)> = Vec::new();
    for i in 0..1000 {
        let kind = if i % 2 == 0 {
            "BagLoaded"
        } else {
            "BagScanned"
        };
        let ev = event(&format!("BAG{}", i % 25), kind, &at(i), "MAD");
        routed.push(capture_id(&addr, &acme, &ev).await);
        if i % 100 == 0 {
            capture_id(
                &addr,
                &acme,
                &event(&format!("W{i}"), "BagWeighed", &at(i), "MAD"),
            )
            .await;
            capture_id(
                &addr,
                &globex,
                &event(&format!("G{i}"), "BagLoaded", &at(i), "LHR"),
            )
            .await;
        }
    }
    eventually("1,000 messages on the partner stream", || {
        let js = js.clone();
        let s = sita_stream.clone();
        async move { stream_count(&js, &s).await >= 1000 }
    })
    .await;
    eventually("the route is caught up", || {
        caught_up(&addr, "acme", "sita")
    })
    .await;

    let msgs = read_all_messages(&js, &sita_stream, 1000).await;
    assert_eq!(assert_once_in_entity_order(&msgs, 1000), 25, "entities");
    let on_stream: HashSet<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
    let captured: HashSet<&str> = routed.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        on_stream, captured,
        "exactly the routed captures, by event id"
    );

    // Subject and envelope.
    let s = js.get_stream(&sita_stream).await.unwrap();
    let subject = format!("{p}.sita.acme.Bag.BagScanned");
    let last = s.get_last_raw_message_by_subject(&subject).await.unwrap();
    let body: Value = serde_json::from_slice(&last.payload).unwrap();
    let (last_id, last_pos) = routed.last().unwrap();
    assert_eq!(body["eventId"], last_id.as_str());
    assert_eq!(body["position"], *last_pos);
    assert_eq!(
        (&body["tenant"], &body["entityId"], &body["entityType"]),
        (&json!("acme"), &json!("BAG24"), &json!("Bag"))
    );
    assert_eq!(
        (&body["eventType"], &body["source"], &body["version"]),
        (&json!("BagScanned"), &json!("e2e"), &json!(40))
    );
    assert!(body["correlationId"].is_string() && body["recordedAt"].is_string());

    // A second route replaying from the 500th routed capture: exactly the captures from
    // there on, though they were stored before the route existed.
    let from = routed[499].1;
    let replay = json!({
        "name": "replay", "eventTypes": ["BagLoaded", "BagScanned"],
        "subjectPrefix": format!("{p}.replay"), "stream": replay_stream, "fromPosition": from
    });
    assert_eq!(
        add_route(&addr, &admin, "acme", &replay).await["fromPosition"],
        from
    );
    eventually("the replay is published", || {
        let js = js.clone();
        let s = replay_stream.clone();
        async move { stream_count(&js, &s).await >= 501 }
    })
    .await;
    eventually("the replay route is caught up", || {
        caught_up(&addr, "acme", "replay")
    })
    .await;
    let msgs = read_all_messages(&js, &replay_stream, 501).await;
    let ids: BTreeSet<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
    let want: BTreeSet<&str> = routed[499..].iter().map(|r| r.0.as_str()).collect();
    assert_eq!((msgs.len(), ids), (501, want));

    // The feed carries every tenant's operational events (and nothing else).
    eventually("the feed is published", || {
        let js = js.clone();
        let s = feed_stream.clone();
        async move { stream_count(&js, &s).await >= 1020 }
    })
    .await;
    let msgs = read_all_messages(&js, &feed_stream, 1020).await;
    assert_eq!(assert_once_in_entity_order(&msgs, 1020), 25 + 10 + 10);
    let s = js.get_stream(&feed_stream).await.unwrap();
    let g = s
        .get_last_raw_message_by_subject(&format!("{feed_prefix}.globex.Bag.BagLoaded"))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&g.payload).unwrap()["entityId"],
        "G900"
    );

    // Removing a route stops its publisher.
    let r = call(
        &addr,
        "DELETE",
        "/api/v1/admin/tenants/acme/routes/replay",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    eventually("the removed route stops", || async move {
        route_status(a, "acme", "replay").await.is_none()
    })
    .await;
    let (status, ready) = readyz(&addr).await;
    assert_eq!(status, 200);
    assert_eq!(ready["propagation"]["status"], "ok", "{ready}");
    for s in [&sita_stream, &replay_stream, &feed_stream] {
        let _ = js.delete_stream(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_killed_mid_stream_loses_nothing_and_redeliveries_are_dropped() {
    let Some(client) = shared_nats().await else {
        return;
    };
    let js = jetstream::new(client);
    let p = unique("ttkill");
    let stream = format!("{}_SITA", p.to_uppercase());
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let url = nats_url();

    // A backlog first: the route exists, nothing publishes yet.
    let total = 3000;
    let captured = {
        let server = env.start(dir.path(), "capture", &[]);
        let admin = env.token(&server, "_system", "admin");
        let acme = env.token(&server, "acme", "events:write");
        let route = json!({"name": "sita", "subjectPrefix": format!("{p}.sita"), "stream": stream});
        add_route(&server.addr, &admin, "acme", &route).await;
        let mut ids = HashSet::new();
        for chunk in 0..total / 500 {
            let events: Vec<Value> = (0..500)
                .map(|i| {
                    event(
                        &format!("K{}", i % 40),
                        "BagScanned",
                        &at(chunk * 500 + i),
                        "MAD",
                    )
                })
                .collect();
            let r = call(
                &server.addr,
                "POST",
                "/api/v1/events:batch",
                Some(&acme),
                Some(&json!({ "events": events })),
            )
            .await;
            assert_eq!(r.status, 200);
            for item in r.json()["results"].as_array().unwrap() {
                assert_eq!(item["status"], 201, "{item}");
                ids.insert(item["result"]["eventId"].as_str().unwrap().to_owned());
            }
        }
        assert!(server.terminate(), "graceful shutdown");
        ids
    };
    assert_eq!(captured.len(), total);

    // The processor publishes the backlog and is killed part way, preferably inside a batch
    // (acknowledged messages whose checkpoint is not saved yet: they will be republished).
    // Its checkpoint moves once per batch of 512; 40 entities make about 13 acknowledgement
    // rounds per batch.
    let batch = 512;
    let publish = ["--role", "processor", "--nats-url", &url, "--nats-publish"];
    let first = env.start(
        dir.path(),
        "first",
        &[&publish[..], &["--nats-batch-size", &batch.to_string()]].concat(),
    );
    for _ in 0..6000 {
        let n = stream_count(&js, &stream).await;
        if n >= (total / 4) as u64 && n % batch != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill_9();
    // What reached JetStream before the kill (publishes already on the wire still land).
    let mut killed_at = stream_count(&js, &stream).await;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = stream_count(&js, &stream).await;
        if n == killed_at {
            break;
        }
        killed_at = n;
    }
    assert!(
        killed_at > 0 && killed_at < total as u64,
        "killed mid-stream: {killed_at} of {total} published"
    );

    // Restarted: it resumes from its checkpoint; what it republishes JetStream drops.
    let second = env.start(dir.path(), "second", &publish);
    eventually("the backlog is published", || {
        let js = js.clone();
        let s = stream.clone();
        async move { stream_count(&js, &s).await >= total as u64 }
    })
    .await;
    eventually("the route is caught up", || {
        caught_up(&second.addr, "acme", "sita")
    })
    .await;
    let msgs = read_all_messages(&js, &stream, total).await;
    assert_eq!(assert_once_in_entity_order(&msgs, total), 40);
    let ids: HashSet<String> = msgs.iter().map(|m| m.0.clone()).collect();
    assert_eq!(ids, captured, "every captured event, once");
    let st = route_status(&second.addr, "acme", "sita").await.unwrap();
    // The restarted publisher stored exactly what was missing; whatever it republished from
    // its checkpoint (the tail acknowledged before the kill), JetStream dropped by message id.
    assert_eq!(st["published"], total as u64 - killed_at, "{st}");
    eprintln!(
        "killed at {killed_at} of {total}; after the restart: {} published, {} dropped as duplicates",
        st["published"], st["duplicates"]
    );
    let _ = js.delete_stream(&stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_opens_the_breaker_readyz_reports_it_and_the_backlog_drains() {
    let Some(mut nats) = PrivateNats::start() else {
        return;
    };
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let url = nats.url();
    let server = env.start(
        dir.path(),
        "outage",
        &[
            "--nats-url",
            &url,
            "--nats-publish",
            "--nats-ack-timeout-ms",
            "500",
            "--nats-breaker-failures",
            "2",
            "--nats-breaker-open-ms",
            "300",
        ],
    );
    let addr = server.addr.clone();
    let admin = env.token(&server, "_system", "admin");
    let acme = env.token(&server, "acme", "events:write,trace:read");
    let route = json!({"name": "sita", "subjectPrefix": "outage", "stream": "OUTAGE"});
    add_route(&addr, &admin, "acme", &route).await;
    let a = addr.as_str();
    eventually("the route publisher starts", || async move {
        route_status(a, "acme", "sita").await.is_some()
    })
    .await;
    for i in 0..50 {
        capture_id(
            &addr,
            &acme,
            &event(&format!("O{}", i % 5), "BagLoaded", &at(i), "MAD"),
        )
        .await;
    }
    eventually("the first 50 are published", || {
        let js = js.clone();
        async move { stream_count(&js, "OUTAGE").await >= 50 }
    })
    .await;

    nats.stop();
    // Captures go on: the store is the outbox.
    let mut last = 0;
    for i in 50..150 {
        last = capture_id(
            &addr,
            &acme,
            &event(&format!("O{}", i % 5), "BagLoaded", &at(i), "MAD"),
        )
        .await
        .1;
    }
    eventually("the breaker opens", || async move {
        route_status(a, "acme", "sita")
            .await
            .is_some_and(|r| r["breaker"] != "closed")
    })
    .await;
    let (status, ready) = readyz(&addr).await;
    assert_eq!(
        status, 200,
        "a NATS outage does not take the API out: {ready}"
    );
    let prop = &ready["propagation"];
    assert_eq!(prop["status"], "degraded", "{ready}");
    let r = prop["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "sita")
        .unwrap();
    assert!(r["lagPositions"].as_u64().unwrap() > 0, "{ready}");
    assert!(r["position"].as_u64().unwrap() < last, "{ready}");
    // The trace is served throughout.
    assert_eq!(trace(&addr, &acme, "O1", "", last).await.status, 200);
    // And /metrics shows it.
    let scraper = env.token(&server, "_system", "metrics:read");
    let m = scrape(&addr, &scraper).await;
    assert!(m.get("tracktrace_publisher_breaker_state", &SITA) >= 1.0);
    assert!(m.get("tracktrace_publisher_lag_positions", &SITA) > 0.0);
    assert!(
        m.value("tracktrace_publisher_lag_seconds", &SITA)
            .is_some_and(|s| s >= 0.0)
    );
    assert!(m.get("tracktrace_circuit_breaker_state", &NATS_BREAKER) >= 1.0);

    nats.restart();
    eventually("the backlog drains after NATS is back", || {
        caught_up(&addr, "acme", "sita")
    })
    .await;
    let msgs = read_all_messages(&js, "OUTAGE", 150).await;
    assert_eq!(assert_once_in_entity_order(&msgs, 150), 5);
    let (_, ready) = readyz(&addr).await;
    assert_eq!(ready["propagation"]["status"], "ok", "{ready}");
    let m = scrape(&addr, &scraper).await;
    assert_eq!(
        m.value("tracktrace_publisher_breaker_state", &SITA),
        Some(0.0)
    );
    assert_eq!(
        m.value("tracktrace_publisher_lag_positions", &SITA),
        Some(0.0)
    );
    assert_eq!(
        m.value("tracktrace_publisher_lag_seconds", &SITA),
        Some(0.0)
    );
    assert_eq!(
        m.value("tracktrace_circuit_breaker_state", &NATS_BREAKER),
        Some(0.0)
    );
}

async fn publish(js: &jetstream::Context, subject: &str, headers: &[(&str, &str)], body: &Value) {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(subject.to_owned(), h, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_ingestion_stores_valid_dead_letters_invalid_and_stores_duplicates_once() {
    let Some(client) = shared_nats().await else {
        return;
    };
    let js = jetstream::new(client);
    let p = unique("tting");
    let (ingest, dlq) = (format!("{p}.ingest"), format!("{p}.dlq"));
    let (in_stream, dlq_stream) = (
        format!("{}_IN", p.to_uppercase()),
        format!("{}_DLQ", p.to_uppercase()),
    );
    let durable = format!("{p}-durable");
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let url = nats_url();
    let server = env.start(
        dir.path(),
        "ingest",
        &[
            "--nats-url",
            &url,
            "--nats-ingest",
            "--nats-ingest-prefix",
            &ingest,
            "--nats-ingest-stream",
            &in_stream,
            "--nats-ingest-durable",
            &durable,
            "--nats-dead-letter-prefix",
            &dlq,
            "--nats-dead-letter-stream",
            &dlq_stream,
        ],
    );
    let addr = server.addr.clone();
    let admin = env.token(&server, "_system", "admin");
    let acme = env.token(&server, "acme", "trace:read");
    env.token(&server, "globex", "trace:read");
    let r = call(
        &addr,
        "POST",
        "/api/v1/admin/tenants/globex/suspend",
        Some(&admin),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 200);
    let a = addr.as_str();
    eventually("the ingest consumer is bound", || async move {
        readyz(a).await.1["propagation"]["ingest"]["consuming"] == true
    })
    .await;

    let id = uuid::Uuid::now_v7().to_string();
    let mut loaded = event("BUS1", "BagLoaded", "2026-11-28T10:00:00Z", "MAD");
    loaded["eventId"] = json!(id);
    loaded["source"] = json!("BRS-MAD");
    let mut scanned = event("BUS1", "BagScanned", "2026-11-28T10:05:00Z", "MAD");
    scanned.as_object_mut().unwrap().remove("source");
    let acme_subject = format!("{ingest}.acme");
    // Valid (with a correlation id header), invalid, the same event again, an event without
    // id twice (a redelivery), unknown and suspended tenants, and a last valid one.
    publish(
        &js,
        &acme_subject,
        &[("X-Correlation-Id", "corr-bus-1")],
        &loaded,
    )
    .await;
    publish(
        &js,
        &acme_subject,
        &[],
        &json!({"entityId": "BUS2", "entityType": "Bag"}),
    )
    .await;
    publish(&js, &acme_subject, &[], &loaded).await;
    publish(&js, &acme_subject, &[], &scanned).await;
    publish(&js, &acme_subject, &[], &scanned).await;
    let last = event("BUS9", "BagLoaded", "2026-11-28T11:00:00Z", "LHR");
    publish(&js, &format!("{ingest}.nobody"), &[], &last).await;
    publish(&js, &format!("{ingest}.globex"), &[], &last).await;
    publish(&js, &acme_subject, &[], &last).await;

    // The consumer handles messages in order: once the last one is in the trace, every
    // earlier one has been handled.
    let token = acme.as_str();
    eventually("the last bus event is in the trace", || async move {
        trace(a, token, "BUS9", "", 0).await.status == 200
    })
    .await;
    let t = trace(&addr, &acme, "BUS1", "", 0).await;
    assert_eq!(t.status, 200);
    let v = t.json();
    assert_eq!(v["eventCount"], 2, "duplicates are not stored twice: {v}");
    let events = v["events"].as_array().unwrap();
    assert_eq!(events[0]["eventId"], id.as_str());
    assert_eq!(events[0]["eventType"], "BagLoaded");
    assert_eq!(events[0]["source"], "BRS-MAD");
    assert_eq!(events[0]["correlationId"], "corr-bus-1");
    assert_eq!(events[1]["eventType"], "BagScanned");
    assert_eq!(
        events[1]["source"], "nats-ingest",
        "enriched with the bus as source"
    );

    eventually("three dead letters", || {
        let js = js.clone();
        let s = dlq_stream.clone();
        async move { stream_count(&js, &s).await >= 3 }
    })
    .await;
    let d = js.get_stream(&dlq_stream).await.unwrap();
    let letter = |tenant: &str| {
        let d = d.clone();
        let subject = format!("{dlq}.{tenant}");
        async move {
            let m = d.get_last_raw_message_by_subject(&subject).await.unwrap();
            serde_json::from_slice::<Value>(&m.payload).unwrap()
        }
    };
    let invalid = letter("acme").await;
    let errors = invalid["errors"].to_string();
    for field in ["eventType", "occurredAt", "location"] {
        assert!(errors.contains(field), "{field} missing in {invalid}");
    }
    assert!(
        letter("nobody").await["errors"]
            .to_string()
            .contains("unknown")
    );
    assert!(
        letter("globex").await["errors"]
            .to_string()
            .contains("suspended")
    );
    assert_eq!(stream_count(&js, &dlq_stream).await, 3);

    let (_, ready) = readyz(&addr).await;
    let ing = &ready["propagation"]["ingest"];
    assert_eq!(
        (&ing["stored"], &ing["deadLettered"]),
        (&json!(5), &json!(3)),
        "{ready}"
    );
    // Bus captures count as captures (same pipeline), and the consumer's outcomes as such.
    let m = scrape(&addr, &env.token(&server, "_system", "metrics:read")).await;
    let bus = "tracktrace_bus_ingest_messages_total";
    assert_eq!(m.value(bus, &[("result", "stored")]), Some(5.0));
    assert_eq!(m.value(bus, &[("result", "dead_lettered")]), Some(3.0));
    assert_eq!(
        m.get("tracktrace_events_ingested_total", &[("tenant", "acme")]),
        3.0
    );
    for s in [&in_stream, &dlq_stream] {
        let _ = js.delete_stream(s).await;
    }
}
