//! Load benchmark of the Track & Trace server over a real socket.
//!
//! Starts the server in-process on `127.0.0.1:0` (sled in a temporary directory with the
//! default durable `Fsync` mode, or PostgreSQL when `TRACKTRACE_BENCH_PG` is set to a URL;
//! a fresh schema is used and dropped) and reports:
//! - capture throughput with 32 concurrent keep-alive clients (events/s);
//! - trace latency p50/p95/p99 of a 1,000-event entity (`limit=1000`, full view), on cache
//!   hits and on cache misses (each miss uses a query that no earlier request used).
//!
//! ```text
//! cargo bench -p tracktrace-server --bench http_load
//! TRACKTRACE_BENCH_PG=postgres://postgres@127.0.0.1:5432/test cargo bench -p tracktrace-server --bench http_load
//! ```
//! Knobs: `TRACKTRACE_BENCH_EVENTS` (captures, default 20000), `TRACKTRACE_BENCH_CLIENTS` (32),
//! `TRACKTRACE_BENCH_SAMPLES` (trace samples per case, 300), `TRACKTRACE_BENCH_PG_POOL`
//! (PostgreSQL pool size, 16), `TRACKTRACE_BENCH_PG_GROUPS` (PostgreSQL group-append slots,
//! `PgStoreOptions::append_groups`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracktrace_app::AppConfig;
use tracktrace_core::{BreakerConfig, TenantId};
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
use tracktrace_http::cache::CacheConfig;
use tracktrace_http::client::Conn;
use tracktrace_server::{self as server, Role, ServerConfig};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn event(entity: &str, i: usize) -> Vec<u8> {
    let minute = i % 60;
    let hour = (i / 60) % 24;
    json!({
        "entityId": entity,
        "entityType": "Bag",
        "eventType": if i.is_multiple_of(3) { "BagScanned" } else { "BagSeen" },
        "occurredAt": format!("2026-11-28T{hour:02}:{minute:02}:{:02}.{:06}Z", i % 60, i % 1_000_000),
        "location": {"code": if (i / 50).is_multiple_of(2) { "MAD" } else { "LHR" }, "detail": "belt 7"},
        "source": "bench",
        "attributes": {"flight": "IB3170", "seq": i}
    })
    .to_string()
    .into_bytes()
}

async fn trace_latencies(addr: &str, auth: &str, samples: usize, miss: bool) -> Vec<Duration> {
    let mut conn = Conn::connect(addr).await.unwrap();
    let headers = [("Authorization", auth)];
    // Warm the hit case.
    let hit_path = "/api/v1/trace/BIG?limit=1000".to_owned();
    if !miss {
        let r = conn.send("GET", &hit_path, &headers, None).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let path = if miss {
            // A distinct upper bound per request: same result, new cache key.
            format!("/api/v1/trace/BIG?limit=1000&to=2099-01-01T00:00:00.{i:06}Z")
        } else {
            hit_path.clone()
        };
        let t = Instant::now();
        let r = conn.send("GET", &path, &headers, None).await.unwrap();
        out.push(t.elapsed());
        assert_eq!(r.status, 200);
        let want = if miss { "miss" } else { "hit" };
        assert_eq!(r.header("x-cache"), Some(want));
        // Parse only the first response: a full parse per sample would load the measuring
        // process (the server shares it) with more work than the request itself.
        if i == 0 {
            assert_eq!(r.json()["events"].as_array().map(Vec::len), Some(1000));
        }
    }
    out.sort();
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let events = env_usize("TRACKTRACE_BENCH_EVENTS", 20_000);
    let clients = env_usize("TRACKTRACE_BENCH_CLIENTS", 32);
    let samples = env_usize("TRACKTRACE_BENCH_SAMPLES", 300);
    let dir = tempfile::tempdir().unwrap();
    let pg = std::env::var("TRACKTRACE_BENCH_PG").ok();
    let schema = format!("tt_bench_{}", std::process::id());
    let cfg = ServerConfig {
        data_dir: dir.path().to_owned(),
        store_url: pg.clone(),
        pg_schema: schema.clone(),
        pg_max_connections: std::env::var("TRACKTRACE_BENCH_PG_POOL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16),
        pg_append_groups: env_usize(
            "TRACKTRACE_BENCH_PG_GROUPS",
            tracktrace_store_postgres::DEFAULT_APPEND_GROUPS,
        ),
        store_max_queued: tracktrace_store_sled::DEFAULT_MAX_PENDING,
        sled_min_free_bytes: tracktrace_store_sled::DEFAULT_MIN_FREE_BYTES,
        cache_url: None,
        cache: CacheConfig::default(),
        http: tracktrace_http::layers::HttpLimits::default(),
        role: Role::All,
        jwt_secret: Some("bench-secret-0123456789abcdefghijklmnop".into()),
        app: AppConfig::default(),
        breaker: BreakerConfig::default(),
        propagation: Default::default(),
        analytics: Default::default(),
        milestone_max_instances: tracktrace_core::saga::DEFAULT_MAX_INSTANCES,
    };
    let backend = if pg.is_some() {
        "postgres"
    } else {
        "sled (Fsync)"
    };
    let stores = server::open_stores(&cfg).await.unwrap();
    server::ensure_tenant(&stores, &TenantId::parse("bench").unwrap(), "bench")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(&cfg, stores.clone(), listener).await.unwrap();
    let addr = running.addr.to_string();
    let keys = JwtKeys::from_secret(cfg.jwt_secret.as_deref().unwrap().as_bytes()).unwrap();
    let token = keys.sign(&Claims {
        sub: "bench".into(),
        tenant: "bench".into(),
        scopes: vec!["events:write".into(), "trace:read".into()],
        exp: now_secs() + 3600,
    });
    let auth = Arc::new(format!("Bearer {token}"));

    // Capture throughput: `clients` keep-alive connections, entities of 10 events each.
    let per_client = events / clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (addr, auth) = (addr.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&addr).await.unwrap();
            let headers = [
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ];
            let mut last = 0;
            for i in 0..per_client {
                let body = event(&format!("C{c}-{}", i / 10), i);
                let r = conn
                    .send("POST", "/api/v1/events", &headers, Some(&body))
                    .await
                    .unwrap();
                assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
                last = r.json()["position"].as_u64().unwrap();
            }
            last
        }));
    }
    let mut max_pos = 0;
    for t in tasks {
        max_pos = max_pos.max(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    let total = per_client * clients;
    println!(
        "[{backend}] capture: {total} events, {clients} clients, {:.2} s → {:.0} events/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );

    // A 1,000-event entity (batch endpoint to build it quickly).
    let mut conn = Conn::connect(&addr).await.unwrap();
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    for chunk in 0..4 {
        let evs: Vec<serde_json::Value> = (chunk * 250..(chunk + 1) * 250)
            .map(|i| serde_json::from_slice(&event("BIG", i)).unwrap())
            .collect();
        let body = json!({"events": evs}).to_string().into_bytes();
        let r = conn
            .send("POST", "/api/v1/events:batch", &headers, Some(&body))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        for item in r.json()["results"].as_array().unwrap() {
            max_pos = max_pos.max(item["result"]["position"].as_u64().unwrap_or(0));
        }
    }
    // Wait until the projection has caught up with everything.
    let r = conn
        .send(
            "GET",
            &format!("/api/v1/trace/BIG?limit=1&minPosition={max_pos}"),
            &[("Authorization", auth.as_str())],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Where the capture time goes: the same load without HTTP (the capture service: runtime
    // command buses + store), and raw store appends (one event per append), with the server
    // (and its projection) still running as above.
    let store = stores.store.clone();
    let service = tracktrace_app::capture::CaptureService::new(store.clone());
    let tenant = TenantId::parse("bench").unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (service, tenant) = (service.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let ev =
                    tracktrace_domain::validate_capture(&event(&format!("S{c}-{}", i / 10), i))
                        .unwrap();
                let cmd = tracktrace_app::capture::CaptureCommand {
                    event: ev,
                    enrichment: tracktrace_domain::Enrichment {
                        tenant: tenant.clone(),
                        submitted_by: "bench".into(),
                        received_at: tracktrace_core::Timestamp::now(),
                        correlation_id: "bench".into(),
                    },
                };
                service.capture(cmd).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let e = start.elapsed();
    println!(
        "[{backend}] capture without HTTP (CaptureService): {total} events, {clients} tasks, {:.2} s → {:.0} events/s",
        e.as_secs_f64(),
        total as f64 / e.as_secs_f64()
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (store, tenant) = (store.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            use tracktrace_core::EventStoreExt;
            for i in 0..per_client {
                let stream =
                    tracktrace_core::StreamId::parse(format!("Raw-{c}-{}", i / 10)).unwrap();
                let ev = tracktrace_core::NewEvent::new("Raw", "application/json", event("R", i));
                store
                    .append_to(
                        &tenant,
                        &stream,
                        tracktrace_core::ExpectedVersion::Any,
                        vec![ev],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let e = start.elapsed();
    println!(
        "[{backend}] raw store appends (1 event each): {total} events, {clients} tasks, {:.2} s → {:.0} events/s",
        e.as_secs_f64(),
        total as f64 / e.as_secs_f64()
    );

    for (name, miss) in [("cache miss", true), ("cache hit", false)] {
        let l = trace_latencies(&addr, &auth, samples, miss).await;
        println!(
            "[{backend}] trace 1000 events, {name}: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms ({samples} samples)",
            percentile(&l, 0.50).as_secs_f64() * 1e3,
            percentile(&l, 0.95).as_secs_f64() * 1e3,
            percentile(&l, 0.99).as_secs_f64() * 1e3,
        );
    }
    running.shutdown().await.unwrap();
    if let Some(url) = pg
        && let Ok(s) = tracktrace_store_postgres::PgStore::connect_with(
            tracktrace_store_postgres::PgStoreOptions::new(url).schema(schema),
        )
        .await
    {
        let _ = s.drop_schema().await;
    }
}
