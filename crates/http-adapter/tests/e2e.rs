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

use serde_json::json;
use tokio::net::TcpStream;
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};

mod common;

use common::{
    Proxy, SECRET, Server, call, capture, cli_token, event, host_port, reachable, service_url,
    trace, types,
};

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
    // Graceful shutdown, restart on the same directory: everything is still there.
    let w = tokens("acme", "events:write,trace:read");
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

    // Outage: every capture answers 503 with Retry-After (never 500), readiness fails.
    let w = tokens("acme", "events:write,trace:read");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_see_each_others_writes() {
    let Some(pg) = services().await else { return };
    let schema = fresh_schema();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = pg_args(&pg, &schema, data.to_str().unwrap());
    args.extend(cache_args());
    // Two API processes and one processor (runs the trace projection, serves only health).
    let start = |name: &str, role: &str| {
        let mut v = args.clone();
        v.extend(["--role".into(), role.into()]);
        Server::start(
            dir.path(),
            name,
            &v.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
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
