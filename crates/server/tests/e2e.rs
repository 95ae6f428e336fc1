//! End-to-end tests: real `tracktrace-server` processes on `127.0.0.1:0`, driven over HTTP.
//!
//! - sled (embedded default): always runs.
//! - PostgreSQL (+ Redis when built with `--features redis`): needs the services at
//!   `TRACKTRACE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
//!   `TRACKTRACE_TEST_REDIS` (default `redis://127.0.0.1:6379`). Unreachable: fails under
//!   `CI=true`, otherwise skips with a message naming the variable. Each test uses a fresh
//!   schema. PostgreSQL outages are simulated with a TCP proxy the test controls.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpStream;
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};

mod common;
use common::{
    Exposition, Proxy, SECRET, Server, call, capture, cli_token, event, host_port, reachable,
    service_url, trace, types,
};

/// `/metrics` read with a `metrics:read` token of the system tenant, parsed.
async fn scrape(addr: &str, token: &str) -> Exposition {
    let r = call(addr, "GET", "/metrics", Some(token), None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8(r.body).unwrap();
    Exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// One more capture moves the tenant's ingestion counter by exactly one and times the
/// appends under the server's backend.
async fn capture_is_metered(addr: &str, scraper: &str, writer: &str, backend: &str) {
    let ingested = [("tenant", "acme")];
    let appends = [("backend", backend)];
    let count = "tracktrace_append_duration_seconds_count";
    let before = scrape(addr, scraper).await;
    capture(
        addr,
        writer,
        &event("METERED", "BagLoaded", "2026-11-28T10:00:00Z", "MAD"),
    )
    .await;
    let after = scrape(addr, scraper).await;
    assert_eq!(
        after.get("tracktrace_events_ingested_total", &ingested),
        before.get("tracktrace_events_ingested_total", &ingested) + 1.0
    );
    assert!(after.get(count, &appends) > before.get(count, &appends));
    assert_eq!(
        after.value(
            "tracktrace_circuit_breaker_state",
            &[("component", "event_store")]
        ),
        Some(0.0)
    );
    // The analytics writer's counters are exported by every server (zero without InfluxDB).
    assert_eq!(
        after.value("tracktrace_influx_points_dropped_total", &[]),
        Some(0.0)
    );
}

/// The scenario of the issue, against any running server.
/// `tokens(tenant, scopes)` mints tokens the way an operator would.
async fn scenario(addr: &str, keys: &JwtKeys, tokens: &dyn Fn(&str, &str) -> String) {
    let w = tokens("acme", "events:write,trace:read");
    // Capture → trace.
    let c1 = capture(
        addr,
        &w,
        &event("BAG1", "BagLoaded", "2026-11-28T10:00:00Z", "MAD"),
    )
    .await;
    let r = trace(addr, &w, "BAG1", "", c1["position"].as_u64().unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(types(&r.json()), ["BagLoaded"]);
    // Duplicate.
    let mut dup = event("BAG1", "BagScanned", "2026-11-28T10:05:00Z", "MAD");
    dup["dedupKey"] = json!("scan-1");
    let d1 = capture(addr, &w, &dup).await;
    let r = call(addr, "POST", "/api/v1/events", Some(&w), Some(&dup)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["duplicate"], true);
    assert_eq!(r.json()["position"], d1["position"]);
    // Late event lands in place.
    let late = capture(
        addr,
        &w,
        &event("BAG1", "BagCheckedIn", "2026-11-28T10:30:00+02:00", "MAD"),
    )
    .await;
    let r = trace(addr, &w, "BAG1", "", late["position"].as_u64().unwrap()).await;
    assert_eq!(
        types(&r.json()),
        ["BagCheckedIn", "BagLoaded", "BagScanned"]
    );
    // Pagination.
    let mut last = 0;
    for i in 0..12 {
        last = capture(
            addr,
            &w,
            &event(
                "BAG2",
                "BagSeen",
                &format!("2026-11-28T11:{i:02}:00Z"),
                "LHR",
            ),
        )
        .await["position"]
            .as_u64()
            .unwrap();
    }
    let mut cursor = String::new();
    let mut pages = 0;
    let mut seen = 0;
    loop {
        let q = if cursor.is_empty() {
            "limit=5".to_owned()
        } else {
            format!("limit=5&cursor={cursor}")
        };
        let v = trace(addr, &w, "BAG2", &q, last).await.json();
        seen += v["events"].as_array().unwrap().len();
        pages += 1;
        match v["nextCursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!((pages, seen), (3, 12));
    // Tenant isolation.
    let g = tokens("globex", "events:write,trace:read");
    assert_eq!(trace(addr, &g, "BAG1", "", 0).await.status, 404);
    // Bad tokens.
    let ev = event("BAG3", "BagLoaded", "2026-11-28T10:00:00Z", "MAD");
    assert_eq!(
        call(addr, "POST", "/api/v1/events", None, Some(&ev))
            .await
            .status,
        401
    );
    let expired = keys.sign(&Claims {
        sub: "e2e".into(),
        tenant: "acme".into(),
        scopes: vec!["events:write".into()],
        exp: now_secs() - 3600,
    });
    assert_eq!(
        call(addr, "POST", "/api/v1/events", Some(&expired), Some(&ev))
            .await
            .status,
        401
    );
    let forged = JwtKeys::from_secret(b"not-the-server-secret-0123456789abcdef")
        .unwrap()
        .sign(&Claims {
            sub: "e2e".into(),
            tenant: "acme".into(),
            scopes: vec!["events:write".into()],
            exp: now_secs() + 600,
        });
    assert_eq!(
        call(addr, "POST", "/api/v1/events", Some(&forged), Some(&ev))
            .await
            .status,
        401
    );
    let reader = tokens("acme", "trace:read");
    assert_eq!(
        call(addr, "POST", "/api/v1/events", Some(&reader), Some(&ev))
            .await
            .status,
        403
    );
    // Suspended tenant.
    let admin = tokens("_system", "admin");
    let r = call(
        addr,
        "POST",
        "/api/v1/admin/tenants/acme/suspend",
        Some(&admin),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(addr, "POST", "/api/v1/events", Some(&w), Some(&ev))
            .await
            .status,
        403
    );
    assert_eq!(trace(addr, &w, "BAG1", "", 0).await.status, 403);
    let r = call(
        addr,
        "POST",
        "/api/v1/admin/tenants/acme/resume",
        Some(&admin),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        call(addr, "POST", "/api/v1/events", Some(&w), Some(&ev))
            .await
            .status,
        201
    );
    // Operations.
    assert_eq!(call(addr, "GET", "/healthz", None, None).await.status, 200);
    assert_eq!(call(addr, "GET", "/readyz", None, None).await.status, 200);
    let doc = call(addr, "GET", "/openapi.json", None, None).await.json();
    assert!(doc["paths"]["/api/v1/events"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let server = Server::start(dir.path(), "sled", &["--data-dir", &data_s]);
    let addr = server.addr.clone();
    // The secret was generated in the data directory; the store is held by the server, so
    // the token command creates tenants through the admin API.
    let keys = JwtKeys::load_or_create(&data).unwrap();
    let common = ["--data-dir".to_owned(), data_s.clone()];
    let tokens = |tenant: &str, scopes: &str| {
        let c: Vec<&str> = common.iter().map(String::as_str).collect();
        cli_token(&c, &addr, tenant, scopes)
    };
    scenario(&addr, &keys, &tokens).await;
    let w = tokens("acme", "events:write,trace:read");
    capture_is_metered(&addr, &tokens("_system", "metrics:read"), &w, "sled").await;
    // Graceful shutdown, restart on the same directory: everything is still there.
    let before = trace(&addr, &w, "BAG2", "limit=1000", 0).await.json();
    // An open event stream must not keep graceful shutdown from finishing.
    let mut sse = TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /api/v1/subscribe HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {w}\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut sse, req.as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut sse, &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(server.terminate(), "graceful shutdown failed");
    let server = Server::start(dir.path(), "sled2", &["--data-dir", &data_s]);
    let after = trace(&server.addr, &w, "BAG2", "limit=1000", 0)
        .await
        .json();
    assert_eq!(before["events"], after["events"]);
    assert_eq!(after["eventCount"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_role_serves_metrics_with_the_projection_lag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let server = Server::start(
        dir.path(),
        "processor",
        &["--data-dir", &data_s, "--role", "processor"],
    );
    let addr = server.addr.clone();
    let keys = JwtKeys::load_or_create(&data).unwrap();
    let scraper = keys.sign(&Claims {
        sub: "e2e".into(),
        tenant: "_system".into(),
        scopes: vec!["metrics:read".into()],
        exp: now_secs() + 600,
    });
    assert_eq!(call(&addr, "GET", "/metrics", None, None).await.status, 401);
    let m = scrape(&addr, &scraper).await;
    let trace = [("projection", "tt.trace")];
    assert!(
        m.value("tracktrace_projection_lag_positions", &trace)
            .is_some()
    );
    assert!(
        m.value("tracktrace_projection_lag_seconds", &trace)
            .is_some()
    );
    // The processor serves no API.
    let ev = event("BAG1", "BagLoaded", "2026-11-28T10:00:00Z", "MAD");
    assert_eq!(
        call(&addr, "POST", "/api/v1/events", Some(&scraper), Some(&ev))
            .await
            .status,
        404
    );
}

/// 64 clients capture events of one entity at the same moment, 4 rounds: every capture is
/// stored (201, never a 503 for contention), at its own version, contiguous, and the trace
/// holds them all; the store saw exactly one append per capture (no version-conflict retry:
/// `TrackedEntity` has no invariant, so its appends do not race on an expected version).
async fn concurrent_captures_of_one_entity(addr: &str, token: &str, scraper: &str, backend: &str) {
    const CLIENTS: u64 = 64;
    const ROUNDS: u64 = 4;
    // The entity exists and its type claim is settled in this process before the race.
    let first = capture(
        addr,
        token,
        &event("HOT1", "BagSeen", "2026-11-28T11:59:00Z", "MAD"),
    )
    .await;
    assert_eq!(first["version"], 1);
    let appends = [("backend", backend)];
    let count = "tracktrace_append_duration_seconds_count";
    let before = scrape(addr, scraper).await.get(count, &appends);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (addr, token) = (addr.to_owned(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for r in 0..ROUNDS {
                let i = c * ROUNDS + r;
                let ev = event(
                    "HOT1",
                    "BagSeen",
                    &format!("2026-11-28T12:{:02}:{:02}Z", i / 60, i % 60),
                    "MAD",
                );
                out.push(call(&addr, "POST", "/api/v1/events", Some(&token), Some(&ev)).await);
            }
            out
        }));
    }
    let mut versions = Vec::new();
    let mut last = 0;
    for t in tasks {
        for r in t.await.unwrap() {
            assert_eq!(
                r.status,
                201,
                "{} (retry-after {:?})",
                String::from_utf8_lossy(&r.body),
                r.header("retry-after")
            );
            let v = r.json();
            versions.push(v["version"].as_u64().unwrap());
            last = last.max(v["position"].as_u64().unwrap());
        }
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=CLIENTS * ROUNDS + 1).collect::<Vec<u64>>());
    let after = scrape(addr, scraper).await.get(count, &appends);
    assert_eq!(
        after - before,
        (CLIENTS * ROUNDS) as f64,
        "one append per capture, none retried"
    );
    let t = trace(addr, token, "HOT1", "view=compact&limit=1000", last).await;
    assert_eq!(t.status, 200);
    assert_eq!(t.json()["eventCount"], CLIENTS * ROUNDS + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_concurrent_captures_of_one_entity_all_stored_without_retries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let server = Server::start(dir.path(), "hot", &["--data-dir", &data_s]);
    let common = ["--data-dir", data_s.as_str()];
    let w = cli_token(&common, &server.addr, "acme", "events:write,trace:read");
    let scraper = cli_token(&common, &server.addr, "_system", "metrics:read");
    concurrent_captures_of_one_entity(&server.addr, &w, &scraper, "sled").await;
}

// ---------- PostgreSQL (+ Redis) ----------

static SCHEMA_SEQ: AtomicU32 = AtomicU32::new(0);

fn fresh_schema() -> String {
    format!(
        "tt_e2e_{}_{}_{}",
        std::process::id(),
        SCHEMA_SEQ.fetch_add(1, Ordering::SeqCst),
        fastrand::u32(..)
    )
}

/// `tracktrace_event_store_events` counts events, while the head is a position (on
/// PostgreSQL derived from transaction ids, far above the count): the scraped count is at most
/// what a second store on the schema reads afterwards, and that store's own count agrees.
async fn store_size_is_counted(addr: &str, scraper: &str, url: &str, schema: &str) {
    use tracktrace_core::{EventStore, EventStoreExt, Position};
    let m = scrape(addr, scraper).await;
    let other = tracktrace_store_postgres::PgStore::connect_with(
        tracktrace_store_postgres::PgStoreOptions::new(url).schema(schema),
    )
    .await
    .unwrap();
    let stored = other
        .read_all_to_end(Position::START, Default::default())
        .await
        .unwrap()
        .len() as u64;
    let counted = other.store_stats().await.unwrap().unwrap();
    let events = m.get("tracktrace_event_store_events", &[]);
    let head = m.get("tracktrace_event_store_head_position", &[]);
    assert!(
        events > 0.0 && events <= stored as f64,
        "{events} of {stored}"
    );
    assert!(counted.events >= stored, "{counted:?}, {stored} read");
    assert!(head > 1024.0 && head > stored as f64, "head {head}");
    assert!(m.get("tracktrace_event_store_bytes", &[]) > 0.0);
}

async fn drop_schema(url: &str, schema: &str) {
    if let Ok(s) = tracktrace_store_postgres::PgStore::connect_with(
        tracktrace_store_postgres::PgStoreOptions::new(url).schema(schema),
    )
    .await
    {
        let _ = s.drop_schema().await;
    }
}

fn pg_args(url: &str, schema: &str, data: &str) -> Vec<String> {
    vec![
        "--data-dir".into(),
        data.into(),
        "--store".into(),
        url.into(),
        "--pg-schema".into(),
        schema.into(),
        "--jwt-secret".into(),
        SECRET.into(),
    ]
}

fn cache_args() -> Vec<String> {
    if cfg!(feature = "redis") {
        vec![
            "--cache".into(),
            service_url("TRACKTRACE_TEST_REDIS", "redis://127.0.0.1:6379"),
        ]
    } else {
        eprintln!(
            "note: built without the `redis` feature: PostgreSQL e2e tests use the in-process cache"
        );
        Vec::new()
    }
}

async fn services() -> Option<String> {
    let pg = service_url(
        "TRACKTRACE_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    if !reachable("TRACKTRACE_TEST_DATABASE_URL", &pg).await {
        return None;
    }
    if cfg!(feature = "redis") {
        let redis = service_url("TRACKTRACE_TEST_REDIS", "redis://127.0.0.1:6379");
        if !reachable("TRACKTRACE_TEST_REDIS", &redis).await {
            return None;
        }
    }
    Some(pg)
}

fn proxied(url: &str, proxy: &str) -> String {
    url.replacen(&host_port(url), proxy, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_end_to_end_with_outage_and_recovery() {
    let Some(pg) = services().await else { return };
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let proxy = Proxy::start(host_port(&pg)).await;
    let url = proxied(&pg, &proxy.addr);
    let mut args = pg_args(&url, &schema, data.to_str().unwrap());
    args.extend(cache_args());
    args.extend([
        "--breaker-failures".into(),
        "2".into(),
        "--breaker-open-ms".into(),
        "300".into(),
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(dir.path(), "pg", &argv);
    let addr = server.addr.clone();
    let keys = JwtKeys::from_secret(SECRET.as_bytes()).unwrap();
    let common: Vec<String> = pg_args(&url, &schema, data.to_str().unwrap());
    let tokens = |tenant: &str, scopes: &str| {
        let c: Vec<&str> = common.iter().map(String::as_str).collect();
        cli_token(&c, &addr, tenant, scopes)
    };
    scenario(&addr, &keys, &tokens).await;
    let w = tokens("acme", "events:write,trace:read");
    let scraper = tokens("_system", "metrics:read");
    capture_is_metered(&addr, &scraper, &w, "postgres").await;
    store_size_is_counted(&addr, &scraper, &pg, &schema).await;
    let unavailable = [("reason", "unavailable")];
    let failures = "tracktrace_command_failures_total";
    let before = scrape(&addr, &scraper).await.get(failures, &unavailable);

    // Outage: every capture answers 503 with Retry-After (never 500), readiness fails.
    proxy.cut().await;
    let mut saw_breaker = false;
    for i in 0..6 {
        let r = call(
            &addr,
            "POST",
            "/api/v1/events",
            Some(&w),
            Some(&event(
                &format!("OUT{i}"),
                "BagLoaded",
                "2026-11-28T10:00:00Z",
                "MAD",
            )),
        )
        .await;
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.header("retry-after").is_some());
        assert_eq!(r.json()["type"], "/problems/unavailable");
        saw_breaker |= r.header("retry-after").is_some();
    }
    assert!(saw_breaker);
    assert_eq!(call(&addr, "GET", "/readyz", None, None).await.status, 503);
    // Still scraped during the outage: six failed commands, reason unavailable.
    let during = scrape(&addr, &scraper).await;
    assert_eq!(during.get(failures, &unavailable), before + 6.0);
    assert!(during.get("tracktrace_event_store_events", &[]) > 0.0);
    // Recovery: once PostgreSQL is reachable again, captures succeed and are traced.
    proxy.restore();
    let mut recovered = None;
    for _ in 0..120 {
        let r = call(
            &addr,
            "POST",
            "/api/v1/events",
            Some(&w),
            Some(&event("BACK", "BagLoaded", "2026-11-28T10:00:00Z", "MAD")),
        )
        .await;
        if r.status == 201 {
            recovered = Some(r.json());
            break;
        }
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = recovered.expect("the server did not recover after PostgreSQL came back");
    let mut traced = false;
    for _ in 0..20 {
        let r = trace(&addr, &w, "BACK", "", c["position"].as_u64().unwrap()).await;
        if r.status == 200 {
            assert_eq!(types(&r.json()), ["BagLoaded"]);
            traced = true;
            break;
        }
        // The projection may still be backing off after the outage: minPosition times out.
        assert!(r.status == 504 || r.status == 503, "{}", r.status);
    }
    assert!(
        traced,
        "the trace projection did not catch up after the outage"
    );
    drop(server);
    drop_schema(&pg, &schema).await;
}

/// A server process with `args` and `--role role`.
fn start_with_role(dir: &std::path::Path, name: &str, args: &[String], role: &str) -> Server {
    let mut v = args.to_vec();
    v.extend(["--role".into(), role.into()]);
    Server::start(dir, name, &v.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_see_each_others_writes() {
    let Some(pg) = services().await else { return };
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = pg_args(&pg, &schema, data.to_str().unwrap());
    args.extend(cache_args());
    // Two API processes and one processor (runs the trace projection, serves only health).
    let start = |name: &str, role: &str| start_with_role(dir.path(), name, &args, role);
    let a = start("a", "api");
    let b = start("b", "api");
    let p = start("p", "processor");
    assert_eq!(
        call(&p.addr, "GET", "/readyz", None, None).await.status,
        200
    );
    assert_eq!(
        call(&p.addr, "GET", "/api/v1/trace/X1", None, None)
            .await
            .status,
        404
    );
    let common: Vec<String> = pg_args(&pg, &schema, data.to_str().unwrap());
    let c: Vec<&str> = common.iter().map(String::as_str).collect();
    let w = cli_token(&c, &a.addr, "acme", "events:write,trace:read");

    // Through A, read through B (the API processes run no projection: they wait on the
    // checkpoint the processor stores).
    let c1 = capture(
        &a.addr,
        &w,
        &event("X1", "BagLoaded", "2026-11-28T10:00:00Z", "MAD"),
    )
    .await;
    let r = trace(&b.addr, &w, "X1", "", c1["position"].as_u64().unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(types(&r.json()), ["BagLoaded"]);
    // Warm both caches, then change the entity through B: A must not serve its cached view.
    for s in [&a.addr, &b.addr] {
        let _ = trace(s, &w, "X1", "", 0).await;
        assert_eq!(
            trace(s, &w, "X1", "", 0).await.header("x-cache"),
            Some("hit")
        );
    }
    let c2 = capture(
        &b.addr,
        &w,
        &event("X1", "BagUnloaded", "2026-11-28T12:00:00Z", "LHR"),
    )
    .await;
    for s in [&a.addr, &b.addr] {
        let r = trace(s, &w, "X1", "", c2["position"].as_u64().unwrap()).await;
        assert_eq!(
            types(&r.json()),
            ["BagLoaded", "BagUnloaded"],
            "stale view from {s}"
        );
    }
    drop((a, b, p));
    drop_schema(&pg, &schema).await;
}

// ---------- milestone watch ----------

/// RFC 3339 (UTC, µs) of now + `offset_us`, and the µs value.
fn instant(offset_us: i64) -> (String, i64) {
    let us = tracktrace_core::Timestamp::now().unix_micros() + offset_us;
    (tracktrace_domain::format_micros(us), us)
}

const SEC: i64 = 1_000_000;

/// Polls the full trace of `entity` until it holds an event of `event_type` (bounded).
async fn trace_until(addr: &str, token: &str, entity: &str, event_type: &str) -> Value {
    for _ in 0..1200 {
        let r = trace(addr, token, entity, "view=full", 0).await;
        if r.status == 200 && types(&r.json()).iter().any(|t| t == event_type) {
            return r.json();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{entity} never got a {event_type}");
}

fn count(trace: &Value, event_type: &str) -> usize {
    types(trace).iter().filter(|t| *t == event_type).count()
}

fn find<'a>(trace: &'a Value, event_type: &str) -> &'a Value {
    trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["eventType"] == event_type)
        .unwrap()
}

async fn put_rule(addr: &str, admin: &str, within: &str) {
    let r = call(
        addr,
        "PUT",
        "/api/v1/admin/tenants/acme/milestone-rules/bag-arrival",
        Some(admin),
        Some(&json!({"entityType": "Bag", "triggerEventType": "LOADED",
            "expectedEventTypes": ["ARRIVED"], "within": within})),
    )
    .await;
    assert!(
        r.status == 201 || r.status == 200,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

/// The scenario: a bag loaded and never arrived gets exactly one `MILESTONE_OVERDUE`
/// after the deadline, also when the server is killed (`kill -9`) between the trigger and the
/// deadline and restarted after it; a late arrival adds exactly one `MILESTONE_RECOVERED`; an
/// on-time arrival gets neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_milestone_watch_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let start = |name: &str| Server::start(dir.path(), name, &["--data-dir", &data_s]);
    let mut server = start("m1");
    let common = ["--data-dir", data_s.as_str()];
    let admin = cli_token(&common, &server.addr, "_system", "admin");
    let w = cli_token(&common, &server.addr, "acme", "events:write,trace:read");
    let mut within_s = 4;
    put_rule(&server.addr, &admin, &format!("PT{within_s}S")).await;

    // On time: loaded, then arrived before the deadline (occurredAt an hour ahead keeps the
    // deadline far from the test's pace).
    let (t1, _) = instant(3600 * SEC);
    let (t2, _) = instant(3601 * SEC);
    capture(&server.addr, &w, &event("ONTIME", "LOADED", &t1, "MAD")).await;
    capture(&server.addr, &w, &event("ONTIME", "ARRIVED", &t2, "LHR")).await;
    // Never arrived, deadline long past: overdue at once.
    let (t, _) = instant(-3600 * SEC);
    capture(&server.addr, &w, &event("NEVER", "LOADED", &t, "MAD")).await;
    let v = trace_until(&server.addr, &w, "NEVER", "MILESTONE_OVERDUE").await;
    assert_eq!(count(&v, "MILESTONE_OVERDUE"), 1);

    // Loaded now; the watch records its deadline; the server is killed before the deadline.
    // (If this machine is so slow that the deadline passed before the kill, try again with a
    // longer window: the point is a deadline that is scheduled before the crash and due after.)
    let mut late = None;
    for attempt in 0..4 {
        let bag = format!("LATE{attempt}");
        let (at, at_us) = instant(0);
        capture(&server.addr, &w, &event(&bag, "LOADED", &at, "MAD")).await;
        let mut open = false;
        for _ in 0..600 {
            let r = call(
                &server.addr,
                "GET",
                &format!("/api/v1/milestone-watches/Bag/{bag}"),
                Some(&w),
                None,
            )
            .await;
            if r.status == 200 && r.json()["open"].as_array().is_some_and(|a| a.len() == 1) {
                open = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(open, "the watch of {bag} never opened");
        drop(server); // SIGKILL
        let deadline_us = at_us + within_s * SEC;
        if instant(0).1 + SEC / 2 < deadline_us {
            late = Some((bag, deadline_us));
            server = start(&format!("m2-{attempt}"));
            break;
        }
        eprintln!(
            "note: the deadline of {bag} passed before the kill; retrying with a longer window"
        );
        server = start(&format!("m1-{attempt}"));
        within_s *= 2;
        put_rule(&server.addr, &admin, &format!("PT{within_s}S")).await;
    }
    let (bag, deadline_us) = late.expect("never killed the server before a deadline");
    // Restarted: the deadline fires once.
    let v = trace_until(&server.addr, &w, &bag, "MILESTONE_OVERDUE").await;
    assert_eq!(count(&v, "MILESTONE_OVERDUE"), 1);
    let overdue = find(&v, "MILESTONE_OVERDUE");
    let deadline = tracktrace_domain::format_micros(deadline_us);
    assert_eq!(overdue["attributes"]["deadline"], deadline);
    assert_eq!(overdue["occurredAt"], deadline);
    assert_eq!(overdue["attributes"]["rule"], "bag-arrival");
    assert_eq!(
        overdue["attributes"]["expectedEventTypes"],
        json!(["ARRIVED"])
    );
    assert_eq!(overdue["source"], "tracktrace.milestone-watch");
    // The bag arrives late: one recovery.
    let (at, _) = instant(0);
    capture(&server.addr, &w, &event(&bag, "ARRIVED", &at, "LHR")).await;
    let v = trace_until(&server.addr, &w, &bag, "MILESTONE_RECOVERED").await;
    assert_eq!(
        (
            count(&v, "MILESTONE_OVERDUE"),
            count(&v, "MILESTONE_RECOVERED")
        ),
        (1, 1)
    );
    assert_eq!(
        find(&v, "MILESTONE_RECOVERED")["attributes"]["overdueEventId"],
        overdue["eventId"]
    );
    assert_eq!(
        types(&v),
        [
            "LOADED",
            "MILESTONE_OVERDUE",
            "ARRIVED",
            "MILESTONE_RECOVERED"
        ]
    );

    // Killed and restarted once more: a new alarm after the restart (so the watch has caught
    // up past everything above), and still exactly one of each.
    drop(server);
    let server = start("m3");
    let (t, _) = instant(-3600 * SEC);
    capture(&server.addr, &w, &event("NEVER2", "LOADED", &t, "MAD")).await;
    trace_until(&server.addr, &w, "NEVER2", "MILESTONE_OVERDUE").await;
    let v = trace(&server.addr, &w, &bag, "", 0).await.json();
    assert_eq!(
        (
            count(&v, "MILESTONE_OVERDUE"),
            count(&v, "MILESTONE_RECOVERED")
        ),
        (1, 1)
    );
    let v = trace(&server.addr, &w, "NEVER", "", 0).await.json();
    assert_eq!(types(&v), ["LOADED", "MILESTONE_OVERDUE"]);
    // On time: neither, and nothing left open.
    let v = trace(&server.addr, &w, "ONTIME", "", 0).await.json();
    assert_eq!(types(&v), ["LOADED", "ARRIVED"]);
    let r = call(
        &server.addr,
        "GET",
        "/api/v1/milestone-watches/Bag/ONTIME",
        Some(&w),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (&r.json()["open"], &r.json()["overdue"]),
        (&json!([]), &json!([]))
    );
}

/// Two processors on one PostgreSQL (one runs the watch under the background-work lease, the
/// other stands by): each alarm is raised once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_processors_raise_each_milestone_alarm_once() {
    let Some(pg) = services().await else { return };
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = pg_args(&pg, &schema, data.to_str().unwrap());
    args.extend(cache_args());
    let start = |name: &str, role: &str| start_with_role(dir.path(), name, &args, role);
    let api = start("api", "api");
    let p1 = start("p1", "processor");
    let p2 = start("p2", "processor");
    let common: Vec<String> = pg_args(&pg, &schema, data.to_str().unwrap());
    let c: Vec<&str> = common.iter().map(String::as_str).collect();
    let admin = cli_token(&c, &api.addr, "_system", "admin");
    let w = cli_token(&c, &api.addr, "acme", "events:write,trace:read");
    put_rule(&api.addr, &admin, "PT1S").await;
    let bags: Vec<String> = (0..6).map(|i| format!("PG{i}")).collect();
    for (i, bag) in bags.iter().enumerate() {
        // Half overdue at once, half a second after capture.
        let (at, _) = instant(if i % 2 == 0 { -3600 * SEC } else { 0 });
        capture(&api.addr, &w, &event(bag, "LOADED", &at, "MAD")).await;
    }
    for bag in &bags {
        trace_until(&api.addr, &w, bag, "MILESTONE_OVERDUE").await;
        let (at, _) = instant(0);
        capture(&api.addr, &w, &event(bag, "ARRIVED", &at, "LHR")).await;
    }
    for bag in &bags {
        trace_until(&api.addr, &w, bag, "MILESTONE_RECOVERED").await;
    }
    // A last alarm after everything: both processors have passed the events above.
    let (t, _) = instant(-3600 * SEC);
    capture(&api.addr, &w, &event("PGLAST", "LOADED", &t, "MAD")).await;
    trace_until(&api.addr, &w, "PGLAST", "MILESTONE_OVERDUE").await;
    for bag in &bags {
        let v = trace(&api.addr, &w, bag, "", 0).await.json();
        assert_eq!(
            types(&v),
            [
                "LOADED",
                "MILESTONE_OVERDUE",
                "ARRIVED",
                "MILESTONE_RECOVERED"
            ],
            "{bag}"
        );
    }
    drop((api, p1, p2));
    drop_schema(&pg, &schema).await;
}

/// `leader` from a server's `/readyz` (`None`: not ready or no such field).
async fn leader(addr: &str) -> Option<u64> {
    let r = call(addr, "GET", "/readyz", None, None).await;
    (r.status == 200)
        .then(|| r.json()["leader"].as_u64())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_on_one_postgres_share_the_work_through_a_lease() {
    let Some(pg) = services().await else { return };
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = pg_args(&pg, &schema, data.to_str().unwrap());
    let start = |name: &str, role: &str| start_with_role(dir.path(), name, &args, role);
    let a = start("a", "api");
    let p1 = start("p1", "processor");
    let p2 = start("p2", "processor");
    let c: Vec<&str> = args.iter().map(String::as_str).collect();
    let w = cli_token(&c, &a.addr, "acme", "events:write,trace:read");

    // Exactly one of the two leads (the other stands by).
    let mut roles = (None, None);
    for _ in 0..300 {
        roles = (leader(&p1.addr).await, leader(&p2.addr).await);
        if matches!(roles, (Some(1), Some(0)) | (Some(0), Some(1))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (lead, standby) = match roles {
        (Some(1), Some(0)) => (p1, p2),
        (Some(0), Some(1)) => (p2, p1),
        other => panic!("expected one leader and one standby, got {other:?}"),
    };
    let c1 = capture(
        &a.addr,
        &w,
        &event("L1", "BagLoaded", "2026-11-28T10:00:00Z", "MAD"),
    )
    .await;
    let r = trace(&a.addr, &w, "L1", "", c1["position"].as_u64().unwrap()).await;
    assert_eq!(types(&r.json()), ["BagLoaded"]);

    // The leader dies (kill -9): the standby takes over and the read model moves on.
    drop(lead);
    let mut took_over = false;
    for _ in 0..300 {
        if leader(&standby.addr).await == Some(1) {
            took_over = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took_over, "the standby did not take over");
    let c2 = capture(
        &a.addr,
        &w,
        &event("L1", "BagUnloaded", "2026-11-28T12:00:00Z", "LHR"),
    )
    .await;
    let r = trace(&a.addr, &w, "L1", "", c2["position"].as_u64().unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(types(&r.json()), ["BagLoaded", "BagUnloaded"]);
    drop((a, standby));
    drop_schema(&pg, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_captures_of_one_entity_all_stored_without_retries() {
    let Some(url) = services().await else {
        return;
    };
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = pg_args(&url, &schema, data.to_str().unwrap());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(dir.path(), "hot-pg", &a);
    let w = cli_token(&a, &server.addr, "acme", "events:write,trace:read");
    let scraper = cli_token(&a, &server.addr, "_system", "metrics:read");
    concurrent_captures_of_one_entity(&server.addr, &w, &scraper, "postgres").await;
    drop(server);
    drop_schema(&url, &schema).await;
}
