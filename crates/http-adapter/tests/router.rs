//! Router tests: the whole API through `router(state).oneshot(request)`, over the in-memory
//! store with the trace projection running, one test per behaviour, covering every status
//! code the API documents.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;
use tracktrace_app::{App, AppConfig};
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{
    BreakerConfig, CircuitBreaker, Error, EventStore, InMemoryStore, Position, TenantId,
};
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
use tracktrace_http::cache::{CacheConfig, TraceCache};
use tracktrace_http::{HttpState, router};

/// An event store that fails with `Unavailable` while `down` is set (a store outage).
struct Switchable {
    inner: Arc<InMemoryStore>,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl Intercept for Switchable {
    type Inner = InMemoryStore;

    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }

    async fn before(&self) -> tracktrace_core::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(Error::Unavailable {
                reason: "test outage".into(),
                retry_after: None,
                source: None,
            })
        } else {
            Ok(())
        }
    }
}

struct Fixture {
    app: axum::Router,
    state: HttpState,
    mem: Arc<InMemoryStore>,
    keys: JwtKeys,
    down: Arc<AtomicBool>,
}

const SECRET: &[u8] = b"router-test-secret-0123456789abcdef";

async fn fixture_with(config: AppConfig) -> Fixture {
    let mem = Arc::new(InMemoryStore::new());
    let down = Arc::new(AtomicBool::new(false));
    let switchable: Arc<dyn EventStore> = Arc::new(Intercepted(Switchable {
        inner: mem.clone(),
        down: down.clone(),
    }));
    let guarded: Arc<dyn EventStore> = Arc::new(CircuitBreaker::with_config(
        switchable,
        BreakerConfig::default()
            .with_failure_threshold(2)
            .with_open_for(Duration::from_secs(30)),
    ));
    let keys = JwtKeys::from_secret(SECRET).unwrap();
    let (tx, rx) = watch::channel(Position::START);
    tokio::spawn(tracktrace_app::trace::runner::run(
        mem.clone(),
        mem.clone(),
        tx,
    ));
    let app = App::new(guarded, mem.clone(), Some(rx), config);
    let state = HttpState::new(app, keys.clone(), TraceCache::local(CacheConfig::default()));
    for t in ["acme", "globex"] {
        state
            .app()
            .tenants()
            .create(&TenantId::parse(t).unwrap(), "test")
            .await
            .unwrap();
    }
    Fixture {
        app: router(state.clone()),
        state,
        mem,
        keys,
        down,
    }
}

async fn fixture() -> Fixture {
    fixture_with(AppConfig::default()).await
}

impl Fixture {
    fn token(&self, tenant: &str, scopes: &[&str]) -> String {
        self.keys.sign(&Claims {
            sub: "router-test".into(),
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            exp: now_secs() + 600,
        })
    }

    fn writer(&self) -> String {
        self.token("acme", &["events:write", "trace:read"])
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, v)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let mut b = Request::post(path).header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let (s, _, v) = self
            .send(b.body(Body::from(body.to_string())).unwrap())
            .await;
        (s, v)
    }

    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut b = Request::get(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        self.send(b.body(Body::empty()).unwrap()).await
    }

    /// Captures and returns the 201/200 body.
    async fn capture(&self, token: &str, ev: &Value) -> Value {
        let (s, v) = self.post("/api/v1/events", Some(token), ev).await;
        assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{s}: {v}");
        v
    }

    /// A trace read that waits for `min_position`.
    async fn trace(
        &self,
        token: &str,
        entity: &str,
        query: &str,
        min_position: u64,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let sep = if query.is_empty() { "" } else { "&" };
        self.get(
            &format!("/api/v1/trace/{entity}?minPosition={min_position}{sep}{query}"),
            Some(token),
        )
        .await
    }
}

fn event(entity: &str, event_type: &str, at: &str, loc: &str) -> Value {
    json!({
        "entityId": entity,
        "entityType": "Bag",
        "eventType": event_type,
        "occurredAt": at,
        "location": {"code": loc},
        "source": "BRS",
        "attributes": {"flight": "IB3170"}
    })
}

fn problem_type(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("")
}

#[tokio::test]
async fn capture_201_then_trace_200_with_status_and_utc_time() {
    let f = fixture().await;
    let t = f.writer();
    let c = f
        .capture(
            &t,
            &event("B1", "BagCheckedIn", "2026-11-28T08:15:00+01:00", "MAD"),
        )
        .await;
    assert_eq!(c["entityId"], "B1");
    assert_eq!(c["version"], 1);
    assert!(c["position"].as_u64().unwrap() >= 1);
    assert!(c.get("duplicate").is_none());
    let (s, h, v) = f.trace(&t, "B1", "", c["position"].as_u64().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(v["entityType"], "Bag");
    assert_eq!(v["status"]["eventType"], "BagCheckedIn");
    assert_eq!(v["events"][0]["occurredAt"], "2026-11-28T08:15:00+01:00");
    assert_eq!(v["events"][0]["occurredAtUtc"], "2026-11-28T07:15:00Z");
    assert_eq!(v["events"][0]["attributes"]["flight"], "IB3170");
    assert!(v["events"][0].get("_us").is_none());
}

#[tokio::test]
async fn duplicates_return_200_with_the_existing_reference() {
    let f = fixture().await;
    let t = f.writer();
    let mut ev = event("B2", "BagLoaded", "2026-11-28T09:00:00Z", "MAD");
    ev["eventId"] = json!("01a220a4-9adf-7553-90c8-d5814a2ff9b8");
    let (s1, first) = f.post("/api/v1/events", Some(&t), &ev).await;
    assert_eq!(s1, StatusCode::CREATED);
    let (s2, again) = f.post("/api/v1/events", Some(&t), &ev).await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["eventId"], first["eventId"]);
    assert_eq!(again["position"], first["position"]);
    // Same dedupKey, different event id: also the original.
    let mut a = event("B2", "BagScanned", "2026-11-28T09:01:00Z", "MAD");
    a["dedupKey"] = json!("scan-77");
    let (_, orig) = f.post("/api/v1/events", Some(&t), &a).await;
    let (s3, dup) = f.post("/api/v1/events", Some(&t), &a).await;
    assert_eq!(s3, StatusCode::OK);
    assert_eq!(dup["eventId"], orig["eventId"]);
    let (_, _, v) = f
        .trace(&t, "B2", "", dup["position"].as_u64().unwrap())
        .await;
    assert_eq!(v["eventCount"], 2);
}

#[tokio::test]
async fn validation_400_lists_every_field_error_and_stores_nothing() {
    let f = fixture().await;
    let t = f.writer();
    let bad = json!({"entityId": "x y", "entityType": "Bag", "occurredAt": "yesterday", "location": {"code": "m"}});
    let (s, v) = f.post("/api/v1/events", Some(&t), &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(&v), "/problems/validation");
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for f in ["entityId", "eventType", "occurredAt", "location.code"] {
        assert!(fields.contains(&f), "{f} not in {fields:?}");
    }
    let (s, _, _) = f.get("/api/v1/trace/x", Some(&t)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn malformed_json_400_wrong_type_415_oversized_413() {
    let f = fixture().await;
    let t = f.writer();
    let auth = format!("Bearer {t}");
    let (s, h, v) = f
        .send(
            Request::post("/api/v1/events")
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .body(Body::from("{\"entityId\": "))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(problem_type(&v), "/problems/malformed-json");
    let (s, _, v) = f
        .send(
            Request::post("/api/v1/events")
                .header("authorization", &auth)
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(v["status"], 415);
    let (s, _, _) = f
        .send(
            Request::post("/api/v1/events")
                .header("authorization", &auth)
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut big = event("B3", "BagLoaded", "2026-11-28T09:00:00Z", "MAD");
    big["attributes"] = json!({"blob": "x".repeat(100_000)});
    let (s, v) = f.post("/api/v1/events", Some(&t), &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_type(&v), "/problems/payload-too-large");
    // Without a Content-Length (streamed body) the limit holds too.
    let chunks: Vec<Result<_, std::io::Error>> = vec![Ok(big.to_string().into_bytes())];
    let (s, _, _) = f
        .send(
            Request::post("/api/v1/events")
                .header("authorization", &auth)
                .header("content-type", "application/json")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing was stored by any of them.
    let (s, _, _) = f.get("/api/v1/trace/B3", Some(&t)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_tokens_401() {
    let f = fixture().await;
    let ev = event("B4", "BagLoaded", "2026-11-28T09:00:00Z", "MAD");
    let (s, v) = f.post("/api/v1/events", None, &ev).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(problem_type(&v), "/problems/unauthorized");
    let expired = f.keys.sign(&Claims {
        sub: "x".into(),
        tenant: "acme".into(),
        scopes: vec!["events:write".into()],
        exp: now_secs() - 3600,
    });
    let (s, v) = f.post("/api/v1/events", Some(&expired), &ev).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("expired"));
    let forged = JwtKeys::from_secret(b"another-secret-0123456789abcdefghij")
        .unwrap()
        .sign(&Claims {
            sub: "x".into(),
            tenant: "acme".into(),
            scopes: vec!["events:write".into()],
            exp: now_secs() + 600,
        });
    let (s, v) = f.post("/api/v1/events", Some(&forged), &ev).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("signature"));
    let (s, h, _) = f
        .send(
            Request::get("/api/v1/trace/B4")
                .header("authorization", "Basic dXNlcjpwdw==")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("www-authenticate"));
}

#[tokio::test]
async fn wrong_scope_unknown_and_suspended_tenants_403() {
    let f = fixture().await;
    let ev = event("B5", "BagLoaded", "2026-11-28T09:00:00Z", "MAD");
    let reader = f.token("acme", &["trace:read"]);
    let (s, v) = f.post("/api/v1/events", Some(&reader), &ev).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v["detail"].as_str().unwrap().contains("events:write"));
    let writer_only = f.token("acme", &["events:write"]);
    let (s, _, _) = f.get("/api/v1/trace/B5", Some(&writer_only)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let unknown = f.token("initech", &["events:write"]);
    let (s, v) = f.post("/api/v1/events", Some(&unknown), &ev).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v["detail"].as_str().unwrap().contains("unknown"));

    // Suspension through the admin API, then resume.
    let admin = f.token("_system", &["admin"]);
    let w = f.writer();
    let (s, v) = f
        .post(
            "/api/v1/admin/tenants/acme/suspend",
            Some(&admin),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "suspended");
    let (s, v) = f.post("/api/v1/events", Some(&w), &ev).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v["detail"].as_str().unwrap().contains("suspended"));
    let (s, _) = f
        .post(
            "/api/v1/admin/tenants/acme/resume",
            Some(&admin),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f.post("/api/v1/events", Some(&w), &ev).await;
    assert_eq!(s, StatusCode::CREATED);
    // A tenant's own admin scope does not administer tenants.
    let tenant_admin = f.token("acme", &["admin"]);
    let (s, _) = f
        .post(
            "/api/v1/admin/tenants/globex/suspend",
            Some(&tenant_admin),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn admin_api_creates_tenants_201_then_200_and_404s_unknown() {
    let f = fixture().await;
    let admin = f.token("_system", &["admin"]);
    let (s, v) = f
        .post(
            "/api/v1/admin/tenants",
            Some(&admin),
            &json!({"id": "initech"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["status"], "active");
    let (s, _) = f
        .post(
            "/api/v1/admin/tenants",
            Some(&admin),
            &json!({"id": "initech"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .post(
            "/api/v1/admin/tenants",
            Some(&admin),
            &json!({"id": "_sneaky"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = f
        .post(
            "/api/v1/admin/tenants/nope/suspend",
            Some(&admin),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, v) = f.get("/api/v1/admin/tenants", Some(&admin)).await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "globex", "initech"]);
    // The new tenant can capture at once.
    let t = f.token("initech", &["events:write"]);
    let (s, _) = f
        .post(
            "/api/v1/events",
            Some(&t),
            &event("I1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn an_entity_keeps_its_type_409() {
    let f = fixture().await;
    let t = f.writer();
    f.capture(&t, &event("E1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    let mut uld = event("E1", "UldLoaded", "2026-11-28T09:05:00Z", "MAD");
    uld["entityType"] = json!("ULD");
    let (s, v) = f.post("/api/v1/events", Some(&t), &uld).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(v["detail"].as_str().unwrap().contains("\"Bag\""), "{v}");
}

#[tokio::test]
async fn late_events_land_in_place_and_status_follows_occurred_at() {
    let f = fixture().await;
    let t = f.writer();
    f.capture(&t, &event("L1", "BagLoaded", "2026-11-28T10:00:00Z", "MAD"))
        .await;
    f.capture(
        &t,
        &event("L1", "BagArrived", "2026-11-28T13:00:00+01:00", "LHR"),
    )
    .await;
    // Arrives last, happened first (offset +02:00 → 06:00Z).
    let late = f
        .capture(
            &t,
            &event("L1", "BagCheckedIn", "2026-11-28T08:00:00+02:00", "MAD"),
        )
        .await;
    let (_, _, v) = f
        .trace(&t, "L1", "", late["position"].as_u64().unwrap())
        .await;
    let types: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["BagCheckedIn", "BagLoaded", "BagArrived"]);
    // The latest by occurredAt is the arrival (12:00Z), not the last captured event.
    assert_eq!(v["status"]["eventType"], "BagArrived");
    assert_eq!(v["status"]["location"]["code"], "LHR");
    // Legs: MAD (check-in, load) then LHR.
    let (_, _, legs) = f.trace(&t, "L1", "view=legs", 0).await;
    assert_eq!(legs["legs"][0]["location"], "MAD");
    assert_eq!(
        legs["legs"][0]["eventTypes"],
        json!(["BagCheckedIn", "BagLoaded"])
    );
    assert_eq!(legs["legs"][1]["location"], "LHR");
    let (_, _, compact) = f.trace(&t, "L1", "view=compact", 0).await;
    assert_eq!(
        compact["events"][0],
        json!({
            "eventId": v["events"][0]["eventId"],
            "eventType": "BagCheckedIn",
            "occurredAt": "2026-11-28T08:00:00+02:00",
            "location": "MAD"
        })
    );
}

#[tokio::test]
async fn filters_and_cursor_pagination() {
    let f = fixture().await;
    let t = f.writer();
    let mut last = 0;
    for i in 0..25 {
        let loc = if i % 2 == 0 { "MAD" } else { "LHR" };
        let ty = if i % 5 == 0 { "BagScanned" } else { "BagSeen" };
        let c = f
            .capture(
                &t,
                &event("P1", ty, &format!("2026-11-28T10:{i:02}:00Z"), loc),
            )
            .await;
        last = c["position"].as_u64().unwrap();
    }
    // Walk all pages of 10.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=10&cursor={c}"),
            None => "limit=10".into(),
        };
        let (s, _, v) = f.trace(&t, "P1", &q, last).await;
        assert_eq!(s, StatusCode::OK);
        for e in v["events"].as_array().unwrap() {
            seen.push(e["occurredAt"].as_str().unwrap().to_owned());
        }
        match v["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25)
        .map(|i| format!("2026-11-28T10:{i:02}:00Z"))
        .collect();
    assert_eq!(seen, expected);
    // Filters.
    let (_, _, v) = f.trace(&t, "P1", "eventType=BagScanned", last).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 5);
    let (_, _, v) = f.trace(&t, "P1", "location=LHR&limit=1000", last).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 12);
    let (_, _, v) = f
        .trace(
            &t,
            "P1",
            "from=2026-11-28T10:05:00Z&to=2026-11-28T11:09:00%2B01:00",
            last,
        )
        .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 5);
    let (_, _, v) = f.trace(&t, "P1", "source=nope", last).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 0);
    // Filtered pagination: 13 MAD events in pages of 5.
    let (_, _, p1) = f.trace(&t, "P1", "location=MAD&limit=5", last).await;
    let c = p1["nextCursor"].as_str().unwrap();
    let (_, _, p2) = f
        .trace(&t, "P1", &format!("location=MAD&limit=5&cursor={c}"), last)
        .await;
    assert_eq!(p2["events"][0]["occurredAt"], "2026-11-28T10:10:00Z");
}

#[tokio::test]
async fn bad_query_parameters_400() {
    let f = fixture().await;
    let t = f.writer();
    f.capture(&t, &event("Q1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    for q in [
        "limit=0",
        "limit=5000",
        "view=fancy",
        "cursor=abc",
        "from=yesterday",
        "limit=x",
    ] {
        let (s, _, v) = f.get(&format!("/api/v1/trace/Q1?{q}"), Some(&t)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    let (s, _, _) = f.get("/api/v1/trace/bad%20id", Some(&t)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tenants_are_isolated() {
    let f = fixture().await;
    let acme = f.writer();
    let globex = f.token("globex", &["events:write", "trace:read"]);
    let c = f
        .capture(
            &acme,
            &event("SHARED", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"),
        )
        .await;
    let (s, _, _) = f
        .trace(&globex, "SHARED", "", c["position"].as_u64().unwrap())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // globex may use the same entity id, even with another type.
    let mut ev = event("SHARED", "UldLoaded", "2026-11-28T09:00:00Z", "CDG");
    ev["entityType"] = json!("ULD");
    let c2 = f.capture(&globex, &ev).await;
    let (_, _, v) = f
        .trace(&globex, "SHARED", "", c2["position"].as_u64().unwrap())
        .await;
    assert_eq!(v["eventCount"], 1);
    assert_eq!(v["entityType"], "ULD");
    let (_, _, v) = f.trace(&acme, "SHARED", "", 0).await;
    assert_eq!(v["entityType"], "Bag");
}

#[tokio::test]
async fn cache_hits_and_is_never_stale_after_a_change() {
    let f = fixture().await;
    let t = f.writer();
    let c = f
        .capture(&t, &event("C1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    let p = c["position"].as_u64().unwrap();
    let (_, h1, _) = f.trace(&t, "C1", "", p).await;
    assert_eq!(h1["x-cache"], "miss");
    let (_, h2, v2) = f.trace(&t, "C1", "", p).await;
    assert_eq!(h2["x-cache"], "hit");
    assert_eq!(v2["eventCount"], 1);
    let c = f
        .capture(
            &t,
            &event("C1", "BagUnloaded", "2026-11-28T11:00:00Z", "LHR"),
        )
        .await;
    let (_, h3, v3) = f.trace(&t, "C1", "", c["position"].as_u64().unwrap()).await;
    assert_eq!(h3["x-cache"], "miss");
    assert_eq!(v3["eventCount"], 2);
}

#[tokio::test]
async fn batch_capture_has_per_item_results() {
    let f = fixture().await;
    let t = f.writer();
    let mut dup = event("BT1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD");
    dup["eventId"] = json!("01a220a4-9adf-7553-90c8-d5814a2ff9b9");
    let body = json!({"events": [
        dup.clone(),
        {"entityId": "BT1"},
        dup,
        event("BT2", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"),
    ]});
    let (s, v) = f.post("/api/v1/events:batch", Some(&t), &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = v["results"].as_array().unwrap();
    let statuses: Vec<u64> = r.iter().map(|i| i["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [201, 400, 200, 201]);
    assert!(
        r[1]["problem"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["field"] == "events[1].eventType")
    );
    let (s, _) = f
        .post("/api/v1/events:batch", Some(&t), &json!({"events": []}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = f.post("/api/v1/events:batch", Some(&t), &json!([1])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn min_position_beyond_the_log_is_a_field_error() {
    let f = fixture_with(AppConfig {
        read_your_writes_timeout: Duration::from_millis(50),
        ..AppConfig::default()
    })
    .await;
    let t = f.writer();
    let c = f
        .capture(&t, &event("W1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    let (s, _, v) = f
        .trace(&t, "W1", "", c["position"].as_u64().unwrap() + 1000)
        .await;
    // No capture returned that position: a client error, not "retry later".
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(problem_type(&v), "/problems/validation");
    assert_eq!(v["errors"][0]["field"], "minPosition", "{v}");
    // Beyond what a u64 position the store could ever assign, too.
    let (s, _, v) = f.trace(&t, "W1", "", 1 << 63).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn store_outage_503_with_retry_after_then_recovery() {
    let f = fixture().await;
    let t = f.writer();
    // Make sure the tenant is known before the outage (served from memory during it).
    f.capture(&t, &event("O1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    f.down.store(true, Ordering::SeqCst);
    let mut last = None;
    for i in 0..4 {
        let (s, h, v) = {
            let mut b = Request::post("/api/v1/events")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {t}"));
            b = b.header("x-correlation-id", format!("outage-{i}"));
            f.send(
                b.body(Body::from(
                    event(
                        &format!("O{}", i + 2),
                        "BagLoaded",
                        "2026-11-28T09:00:00Z",
                        "MAD",
                    )
                    .to_string(),
                ))
                .unwrap(),
            )
            .await
        };
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
        assert_eq!(problem_type(&v), "/problems/unavailable");
        last = Some(h["retry-after"].to_str().unwrap().to_owned());
    }
    // The breaker is open: its remaining open time is the hint (30 s configured).
    assert!(last.unwrap().parse::<u64>().unwrap() > 1);
    let (s, _, _) = f.get("/readyz", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    f.down.store(false, Ordering::SeqCst);
    // Still open (fails fast) until its period ends: the recovery itself is exercised in the
    // end-to-end PostgreSQL test with a short breaker period.
    let (s, _, _) = f.get("/readyz", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn health_ready_openapi_and_unknown_routes() {
    let f = fixture().await;
    let (s, _, _) = f.get("/healthz", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, v) = f.get("/readyz", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["head"].as_u64().is_some());
    let (s, _, doc) = f.get("/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/events",
        "/api/v1/events:batch",
        "/api/v1/trace/{entityId}",
        "/api/v1/subscribe",
        "/api/v1/admin/tenants",
        "/api/v1/admin/tenants/{id}/suspend",
        "/api/v1/admin/tenants/{id}/resume",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let (s, h, v) = f.get("/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(v["status"], 404);
    // Every documented path answers (not the fallback's "no such route").
    let t = f.writer();
    let (_, _, v) = f.get("/api/v1/trace/none", Some(&t)).await;
    assert_ne!(v["detail"], "no such route");
    drop(f.state);
}

/// Reads SSE frames until `n` events arrived; returns (id, event, data) triples.
async fn sse_events(
    f: &Fixture,
    path: &str,
    last_event_id: Option<u64>,
    n: usize,
) -> Vec<(u64, String, Value)> {
    use http_body_util::BodyExt;
    let mut b = Request::get(path).header("authorization", format!("Bearer {}", f.writer()));
    if let Some(id) = last_event_id {
        b = b.header("last-event-id", id.to_string());
    }
    let res = f
        .app
        .clone()
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let mut text = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame = body.frame().await.expect("stream ended early").unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut id, mut ev, mut data) = (None, String::new(), Value::Null);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).unwrap();
                }
            }
            if let Some(id) = id {
                out.push((id, ev, data));
            }
        }
    }
    out
}

#[tokio::test]
async fn subscribe_streams_filtered_events_and_resumes_after_last_event_id() {
    let f = fixture().await;
    let t = f.writer();
    let a1 = f
        .capture(&t, &event("S1", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    f.capture(&t, &event("S2", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    // Another tenant's event for the same entity id is never delivered.
    let g = f.token("globex", &["events:write"]);
    f.capture(&g, &event("S1", "BagLost", "2026-11-28T09:00:00Z", "MAD"))
        .await;
    let a3 = f
        .capture(
            &t,
            &event("S1", "BagUnloaded", "2026-11-28T11:00:00Z", "LHR"),
        )
        .await;
    let (p1, p3) = (
        a1["position"].as_u64().unwrap(),
        a3["position"].as_u64().unwrap(),
    );

    let evs = sse_events(&f, "/api/v1/subscribe?entityId=S1", Some(0), 2).await;
    assert_eq!(evs[0].0, p1);
    assert_eq!(evs[0].1, "BagLoaded");
    assert_eq!(evs[1].0, p3);
    assert_eq!(evs[1].1, "BagUnloaded");
    assert_eq!(evs[1].2["location"]["code"], "LHR");
    // Resume after the first.
    let evs = sse_events(&f, "/api/v1/subscribe?entityId=S1", Some(p1), 1).await;
    assert_eq!(evs[0].0, p3);
    // Event-type filter, start given as a query parameter.
    let evs = sse_events(
        &f,
        "/api/v1/subscribe?eventType=BagUnloaded&after=0",
        None,
        1,
    )
    .await;
    assert_eq!(evs[0].0, p3);
    // An event captured while the subscriber connects arrives (catch-up or live).
    let f2 = &f;
    let waiter = sse_events(f2, "/api/v1/subscribe?entityId=S9", Some(p3), 1);
    let capture = async {
        tokio::task::yield_now().await;
        f2.capture(&t, &event("S9", "BagSeen", "2026-11-28T12:00:00Z", "LHR"))
            .await
    };
    let (evs, c) = tokio::join!(waiter, capture);
    assert_eq!(evs[0].0, c["position"].as_u64().unwrap());
    let (s, _, _) = f.get("/api/v1/subscribe?entityId=bad%20id", Some(&t)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn shutdown_ends_open_event_streams() {
    use http_body_util::BodyExt;
    let f = fixture().await;
    let req = Request::get("/api/v1/subscribe?entityId=Z1")
        .header("authorization", format!("Bearer {}", f.writer()))
        .body(Body::empty())
        .unwrap();
    let res = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    f.state.close_streams();
    // The stream ends (instead of waiting for events forever), so connections can drain.
    let mut body = res.into_body();
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
    })
    .await;
    assert!(drained.is_ok(), "the event stream did not end at shutdown");
}

// ---------- milestone watch ----------

const RULES: &str = "/api/v1/admin/tenants/acme/milestone-rules";

fn bag_rule(within: Value) -> Value {
    json!({"entityType": "Bag", "triggerEventType": "LOADED",
        "expectedEventTypes": ["ARRIVED"], "within": within})
}

impl Fixture {
    async fn put(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let mut b = Request::put(path).header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let (s, h, v) = self
            .send(b.body(Body::from(body.to_string())).unwrap())
            .await;
        if !s.is_success() {
            assert_eq!(h["content-type"], "application/problem+json");
        }
        (s, v)
    }

    async fn delete(&self, path: &str, token: &str) -> StatusCode {
        let req = Request::delete(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        self.send(req).await.0
    }
}

#[tokio::test]
async fn milestone_rules_are_created_replaced_listed_and_removed() {
    let f = fixture().await;
    let admin = f.token("_system", &["admin"]);
    let (s, v) = f
        .put(
            &format!("{RULES}/bag-arrival"),
            Some(&admin),
            &bag_rule(json!("PT2H")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["within"], "PT2H");
    assert_eq!(v["withinSeconds"], 7200.0);
    assert_eq!(v["tenant"], "acme");
    // Same terms: 200, nothing written; other terms: 200, replaced.
    let (s, _) = f
        .put(
            &format!("{RULES}/bag-arrival"),
            Some(&admin),
            &bag_rule(json!("PT2H")),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .put(
            &format!("{RULES}/bag-arrival"),
            Some(&admin),
            &bag_rule(json!(90)),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["within"], "PT1M30S");
    let (s, _) = f
        .put(
            &format!("{RULES}/transfer"),
            Some(&admin),
            &json!({"entityType": "Bag", "triggerEventType": "TRANSFER",
                "expectedEventTypes": "LOADED", "within": "PT45M"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, v) = f.get(RULES, Some(&admin)).await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["bag-arrival", "transfer"]);
    assert_eq!(v[0]["within"], "PT1M30S");
    let (s, _, v) = f.get(&format!("{RULES}/transfer"), Some(&admin)).await;
    assert_eq!(
        (s, &v["expectedEventTypes"]),
        (StatusCode::OK, &json!(["LOADED"]))
    );
    // Another tenant's rules are its own.
    let (s, _, v) = f
        .get("/api/v1/admin/tenants/globex/milestone-rules", Some(&admin))
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
    assert_eq!(
        f.delete(&format!("{RULES}/transfer"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.delete(&format!("{RULES}/transfer"), &admin).await,
        StatusCode::NOT_FOUND
    );
    let (s, _, v) = f.get(&format!("{RULES}/transfer"), Some(&admin)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(problem_type(&v), "/problems/not-found");
    let (s, _, _) = f
        .get("/api/v1/admin/tenants/nope/milestone-rules", Some(&admin))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = f
        .put(
            "/api/v1/admin/tenants/nope/milestone-rules/r",
            Some(&admin),
            &bag_rule(json!("PT1H")),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let doc = f.get("/openapi.json", None).await.2;
    for p in [
        "/api/v1/admin/tenants/{id}/milestone-rules",
        "/api/v1/admin/tenants/{id}/milestone-rules/{ruleId}",
        "/api/v1/milestone-watches/{entityType}/{entityId}",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["RuleView"].is_object());
}

#[tokio::test]
async fn milestone_rules_bad_input_400_with_field_errors_and_non_admins_403() {
    let f = fixture().await;
    let admin = f.token("_system", &["admin"]);
    let (s, v) = f
        .put(
            &format!("{RULES}/bad%20id"),
            Some(&admin),
            &json!({"entityType": "Bag-1", "triggerEventType": "MILESTONE_OVERDUE",
                "expectedEventTypes": [], "within": "P1M", "color": "red"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(&v), "/problems/validation");
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "ruleId",
            "color",
            "entityType",
            "triggerEventType",
            "expectedEventTypes",
            "within"
        ]
    );
    for (body, field) in [
        (bag_rule(json!("soon")), "within"),
        (bag_rule(json!(-5)), "within"),
        (bag_rule(json!("P31D")), "within"),
        (
            json!({"entityType": "Bag", "triggerEventType": "LOADED",
                "expectedEventTypes": ["LOADED"], "within": "PT1H"}),
            "expectedEventTypes",
        ),
        (
            json!({"entityType": "Bag", "triggerEventType": "LOADED",
                "expectedEventTypes": ["ARRIVED", 7], "within": "PT1H"}),
            "expectedEventTypes[1]",
        ),
        (json!([1, 2]), ""),
    ] {
        let (s, v) = f.put(&format!("{RULES}/r"), Some(&admin), &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["errors"][0]["field"], field, "{body}: {v}");
    }
    // Malformed JSON and the wrong media type.
    let req = Request::put(format!("{RULES}/r"))
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(Body::from("{"))
        .unwrap();
    let (s, h, v) = f.send(req).await;
    assert_eq!(
        (s, problem_type(&v)),
        (StatusCode::BAD_REQUEST, "/problems/malformed-json")
    );
    assert_eq!(h["content-type"], "application/problem+json");
    let req = Request::put(format!("{RULES}/r"))
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "text/plain")
        .body(Body::from(bag_rule(json!("PT1H")).to_string()))
        .unwrap();
    assert_eq!(f.send(req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Not a system admin: a tenant's own admin-scoped token, a system token without the scope.
    for token in [
        f.token("acme", &["admin", "events:write", "trace:read"]),
        f.token("_system", &["trace:read"]),
    ] {
        let (s, v) = f
            .put(
                &format!("{RULES}/r"),
                Some(&token),
                &bag_rule(json!("PT1H")),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(problem_type(&v), "/problems/forbidden");
        assert_eq!(f.get(RULES, Some(&token)).await.0, StatusCode::FORBIDDEN);
        assert_eq!(
            f.delete(&format!("{RULES}/r"), &token).await,
            StatusCode::FORBIDDEN
        );
    }
    let (s, _) = f
        .put(&format!("{RULES}/r"), None, &bag_rule(json!("PT1H")))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Nothing was stored by any of this.
    assert_eq!(f.get(RULES, Some(&admin)).await.2, json!([]));
}

/// Polls the full trace of `entity` until it holds an event of `event_type` (bounded).
async fn trace_with(f: &Fixture, entity: &str, event_type: &str) -> Value {
    for _ in 0..600 {
        let (s, _, v) = f.trace(&f.writer(), entity, "view=full", 0).await;
        if s == StatusCode::OK
            && v["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["eventType"] == event_type)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{entity} never got a {event_type}");
}

fn count_of(trace: &Value, event_type: &str) -> usize {
    trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["eventType"] == event_type)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_milestone_watch_raises_overdue_into_trace_and_subscribers_then_recovers() {
    let f = fixture().await;
    tokio::spawn(tracktrace_app::milestone::run::run(
        f.mem.clone(),
        f.mem.clone(),
        f.state.app().capture_pipeline().service().clone(),
        tracktrace_core::saga::DEFAULT_MAX_INSTANCES,
    ));
    let admin = f.token("_system", &["admin"]);
    let (s, _) = f
        .put(
            &format!("{RULES}/bag-arrival"),
            Some(&admin),
            &bag_rule(json!("PT2H")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let t = f.writer();
    // Subscribed before the alarm exists: it is pushed live.
    let sub = sse_events(
        &f,
        "/api/v1/subscribe?entityId=M1&eventType=MILESTONE_OVERDUE,MILESTONE_RECOVERED",
        None,
        2,
    );
    let drive = async {
        // Loaded three hours ago, never arrived: overdue since an hour ago.
        f.capture(
            &t,
            &event("M1", "LOADED", "2026-01-10T09:00:00+01:00", "MAD"),
        )
        .await;
        let v = trace_with(&f, "M1", "MILESTONE_OVERDUE").await;
        let overdue = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["eventType"] == "MILESTONE_OVERDUE")
            .unwrap()
            .clone();
        assert_eq!(overdue["occurredAt"], "2026-01-10T10:00:00Z");
        assert_eq!(overdue["source"], "tracktrace.milestone-watch");
        assert_eq!(overdue["location"]["code"], "MAD");
        assert_eq!(overdue["attributes"]["rule"], "bag-arrival");
        assert_eq!(
            overdue["attributes"]["expectedEventTypes"],
            json!(["ARRIVED"])
        );
        assert_eq!(overdue["attributes"]["deadline"], "2026-01-10T10:00:00Z");
        assert_eq!(v["status"]["eventType"], "MILESTONE_OVERDUE");
        let (s, _, w) = f.get("/api/v1/milestone-watches/Bag/M1", Some(&t)).await;
        assert_eq!(s, StatusCode::OK, "{w}");
        assert_eq!(w["open"], json!([]));
        assert_eq!(w["overdue"][0]["rule"], "bag-arrival");
        assert_eq!(w["overdue"][0]["deadline"], "2026-01-10T10:00:00Z");
        // The bag turns up late.
        f.capture(&t, &event("M1", "ARRIVED", "2026-01-10T12:30:00Z", "LHR"))
            .await;
        let v = trace_with(&f, "M1", "MILESTONE_RECOVERED").await;
        assert_eq!(
            (
                count_of(&v, "MILESTONE_OVERDUE"),
                count_of(&v, "MILESTONE_RECOVERED")
            ),
            (1, 1)
        );
        let recovered = v["events"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(recovered["eventType"], "MILESTONE_RECOVERED");
        assert_eq!(recovered["attributes"]["lateBySeconds"], 9000.0);
        assert_eq!(recovered["occurredAt"], "2026-01-10T12:30:00.001Z");
        assert_eq!(recovered["location"]["code"], "LHR");
        assert_eq!(
            recovered["attributes"]["overdueEventId"],
            overdue["eventId"]
        );
        let w = f.get("/api/v1/milestone-watches/Bag/M1", Some(&t)).await.2;
        assert_eq!((&w["open"], &w["overdue"]), (&json!([]), &json!([])));
    };
    let (evs, ()) = tokio::join!(sub, drive);
    assert_eq!(evs[0].1, "MILESTONE_OVERDUE");
    assert_eq!(evs[1].1, "MILESTONE_RECOVERED");
    // The watch of an entity no rule concerns, and bad parameters.
    let (s, _, _) = f.get("/api/v1/milestone-watches/Bag/NOPE", Some(&t)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = f.get("/api/v1/milestone-watches/1Bag/M1", Some(&t)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let w = f.token("acme", &["events:write"]);
    let (s, _, _) = f.get("/api/v1/milestone-watches/Bag/M1", Some(&w)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Another tenant does not see acme's watch.
    let g = f.token("globex", &["trace:read"]);
    let (s, _, _) = f.get("/api/v1/milestone-watches/Bag/M1", Some(&g)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn tenant_attribute_schemas_reject_violations_with_field_errors() {
    let f = fixture().await;
    let admin = f.token("_system", &["admin"]);
    let schema = json!({
        "type": "object",
        "required": ["flight", "weightKg"],
        "properties": {"flight": {"type": "string", "pattern": "^[A-Z0-9]{2}[0-9]{1,4}$"},
                       "weightKg": {"type": "number", "minimum": 0, "maximum": 32}}
    });
    // Only a system admin; unknown tenants 404; unusable schemas 400.
    let w = f.writer();
    let (s, _) = f
        .put(
            "/api/v1/admin/tenants/acme/schemas/BagWeighed",
            Some(&w),
            &schema,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = f
        .put(
            "/api/v1/admin/tenants/nope/schemas/BagWeighed",
            Some(&admin),
            &schema,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = f
        .put(
            "/api/v1/admin/tenants/acme/schemas/BagWeighed",
            Some(&admin),
            &json!({"type": 7}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["errors"][0]["field"], "schema");
    let (s, v) = f
        .put(
            "/api/v1/admin/tenants/acme/schemas/BagWeighed",
            Some(&admin),
            &schema,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = f
        .get("/api/v1/admin/tenants/acme/schemas", Some(&admin))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["eventType"], "BagWeighed");

    // A violating capture: 400, every violation named, nothing stored.
    let mut bad = event("SW1", "BagWeighed", "2026-11-28T09:00:00Z", "MAD");
    bad["attributes"] = json!({"flight": "iberia", "weightKg": 40});
    let (s, v) = f.post("/api/v1/events", Some(&w), &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let mut fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(fields, ["attributes.flight", "attributes.weightKg"]);
    let (s, _, _) = f.trace(&w, "SW1", "", 0).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // In a batch, the fields carry the item's prefix.
    let (s, v) = f
        .post("/api/v1/events:batch", Some(&w), &json!({"events": [bad]}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["results"][0]["status"], 400);
    assert!(
        v["results"][0]["problem"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["field"] == "events[0].attributes.weightKg"),
        "{v}"
    );
    // A conforming one is stored; other event types and other tenants are unaffected.
    let mut good = event("SW1", "BagWeighed", "2026-11-28T09:00:00Z", "MAD");
    good["attributes"] = json!({"flight": "IB3170", "weightKg": 23.5});
    f.capture(&w, &good).await;
    f.capture(
        &w,
        &event("SW2", "BagLoaded", "2026-11-28T09:00:00Z", "MAD"),
    )
    .await;
    let g = f.token("globex", &["events:write"]);
    let mut other = event("SW3", "BagWeighed", "2026-11-28T09:00:00Z", "MAD");
    other["attributes"] = json!({});
    f.capture(&g, &other).await;

    // Removed: the type accepts any attributes again.
    assert_eq!(
        f.delete("/api/v1/admin/tenants/acme/schemas/BagWeighed", &admin)
            .await,
        StatusCode::NO_CONTENT
    );
    let mut any = event("SW4", "BagWeighed", "2026-11-28T09:00:00Z", "MAD");
    any["attributes"] = json!({"free": true});
    f.capture(&w, &any).await;
}

/// Partner-route administration (feature `nats`): system admins only, field errors, 404 for
/// unknown tenants and routes, idempotent creation, 409 on a different route of that name.
#[cfg(feature = "nats")]
#[tokio::test]
async fn partner_route_admin_api() {
    let f = fixture().await;
    let admin = f.token("_system", &["admin"]);
    let path = "/api/v1/admin/tenants/acme/routes";
    let sita = json!({"name": "sita", "partner": "SITA", "eventTypes": ["BagLoaded"],
        "subjectPrefix": "partners.sita", "stream": "SITA"});
    // Tenant tokens, even with the admin scope, cannot manage routes.
    let (s, v) = f
        .post(path, Some(&f.token("acme", &["admin"])), &sita)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = f.post(path, None, &sita).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Every invalid field is listed.
    let bad = json!({"name": "No Spaces", "eventTypes": ["ok", 7], "stream": "a.b",
        "format": "xml", "fromPosition": "0", "colour": "red"});
    let (s, v) = f.post(path, Some(&admin), &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["type"], "/problems/validation");
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for want in [
        "name",
        "eventTypes[1]",
        "stream",
        "format",
        "fromPosition",
        "colour",
    ] {
        assert!(fields.contains(&want), "{want} missing in {v}");
    }
    let (s, _) = f
        .post("/api/v1/admin/tenants/nobody/routes", Some(&admin), &sita)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Created, then the same again (200), then a different one under that name (409).
    let (s, created) = f.post(path, Some(&admin), &sita).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["subjectPrefix"], "partners.sita");
    assert_eq!(created["format"], "envelope");
    assert!(created["fromPosition"].as_u64().unwrap() > 0);
    let (s, again) = f.post(path, Some(&admin), &sita).await;
    assert_eq!((s, &again), (StatusCode::OK, &created));
    let (s, _) = f
        .post(
            path,
            Some(&admin),
            &json!({"name": "sita", "eventTypes": ["BagSeen"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _, list) = f.get(path, Some(&admin)).await;
    assert_eq!((s, list), (StatusCode::OK, json!([created.clone()])));
    let (s, _, one) = f.get(&format!("{path}/sita"), Some(&admin)).await;
    assert_eq!((s, one), (StatusCode::OK, created));
    let (s, _, _) = f.get(&format!("{path}/nope"), Some(&admin)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let delete = |name: &str| {
        Request::delete(format!("{path}/{name}"))
            .header("authorization", format!("Bearer {admin}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(f.send(delete("sita")).await.0, StatusCode::NO_CONTENT);
    assert_eq!(f.send(delete("sita")).await.0, StatusCode::NOT_FOUND);
    let (_, _, list) = f.get(path, Some(&admin)).await;
    assert_eq!(list, json!([]));
    // Documented, and no propagation component in /readyz when nothing propagates here.
    let (_, _, doc) = f.get("/openapi.json", None).await;
    assert!(doc["paths"]["/api/v1/admin/tenants/{id}/routes"]["post"].is_object());
    assert!(doc["paths"]["/api/v1/admin/tenants/{id}/routes/{name}"]["delete"].is_object());
    assert!(doc["components"]["schemas"]["RouteInfo"].is_object());
    let (s, _, ready) = f.get("/readyz", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ready.get("propagation").is_none(), "{ready}");
}

/// A schema can only be registered for an event type a capture could have (the capture
/// validator's rule, `tracktrace_domain::event_type_problem`): `1abc` was accepted before and
/// could never apply to anything.
#[tokio::test]
async fn schemas_only_for_event_types_the_capture_validator_accepts() {
    let f = fixture().await;
    let admin = f.token("_system", &["admin"]);
    let schema = json!({"type": "object"});
    for bad in ["1abc", "Bag%20Loaded", "-x", "a.b!"] {
        let (s, v) = f
            .put(
                &format!("/api/v1/admin/tenants/acme/schemas/{bad}"),
                Some(&admin),
                &schema,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(problem_type(&v), "/problems/validation");
        assert_eq!(v["errors"][0]["field"], "eventType", "{bad}: {v}");
    }
    // The same event type is refused at capture, so nothing could ever have used it.
    let t = f.writer();
    let (s, v) = f
        .post(
            "/api/v1/events",
            Some(&t),
            &event("S1", "1abc", "2026-11-28T09:00:00Z", "MAD"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["errors"][0]["field"], "eventType");
    let (s, v) = f
        .put(
            "/api/v1/admin/tenants/acme/schemas/bag.loaded:v2-x",
            Some(&admin),
            &schema,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Every API operation documents the answers the server's limits give (503 + Retry-After) and
/// every writing operation the full-disk answer (507), whatever its handler documents.
#[tokio::test]
async fn openapi_documents_shedding_and_full_disk_answers() {
    let f = fixture().await;
    let (_, _, doc) = f.get("/openapi.json", None).await;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1/") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let responses = &op["responses"];
            let r503 = &responses["503"];
            assert!(r503.is_object(), "{method} {path}: no 503");
            assert!(
                r503["headers"]["Retry-After"].is_object(),
                "{method} {path}: 503 without Retry-After"
            );
            assert!(
                r503["description"].as_str().unwrap().contains("overloaded"),
                "{method} {path}: {r503}"
            );
            let writes = method != "get";
            assert_eq!(
                responses["507"].is_object(),
                writes,
                "{method} {path}: 507 documented for writes only"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations");
}
