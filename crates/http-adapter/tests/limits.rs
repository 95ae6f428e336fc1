//! The HTTP layer's limits and middleware through `router(state).oneshot(request)` over the
//! in-memory store: request ids, load shedding, the request timeout, and the lifetime of
//! event streams (per-tenant limit, token expiry, tenant suspension, slow clients).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;
use tracktrace_app::{App, AppConfig};
use tracktrace_core::{InMemoryStore, Position, TenantId};
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
use tracktrace_http::cache::{CacheConfig, TraceCache};
use tracktrace_http::layers::HttpLimits;
use tracktrace_http::{HttpState, router};

const SECRET: &[u8] = b"limits-test-secret-0123456789abcdef";

struct Fixture {
    app: axum::Router,
    state: HttpState,
    keys: JwtKeys,
}

async fn fixture(config: AppConfig, limits: HttpLimits) -> Fixture {
    let mem = Arc::new(InMemoryStore::new());
    let (tx, rx) = watch::channel(Position::START);
    tokio::spawn(tracktrace_app::trace::runner::run(
        mem.clone(),
        mem.clone(),
        tx,
    ));
    let app = App::new(mem.clone(), mem.clone(), Some(rx), config);
    app.tenants()
        .create(&TenantId::parse("acme").unwrap(), "test")
        .await
        .unwrap();
    let keys = JwtKeys::from_secret(SECRET).unwrap();
    let state = HttpState::with_limits(
        app,
        keys.clone(),
        TraceCache::local(CacheConfig::default()),
        limits,
    );
    Fixture {
        app: router(state.clone()),
        state,
        keys,
    }
}

impl Fixture {
    fn token_until(&self, tenant: &str, exp: u64) -> String {
        self.keys.sign(&Claims {
            sub: "limits-test".into(),
            tenant: tenant.into(),
            scopes: vec!["events:write".into(), "trace:read".into()],
            exp,
        })
    }

    fn token(&self) -> String {
        self.token_until("acme", now_secs() + 600)
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str) -> (StatusCode, axum::http::HeaderMap, Value) {
        let req = Request::get(path)
            .header("authorization", format!("Bearer {}", self.token()))
            .body(Body::empty())
            .unwrap();
        self.send(req).await
    }

    async fn capture(&self, entity: &str) -> Value {
        let body = json!({"entityId": entity, "entityType": "Bag", "eventType": "BagSeen",
            "occurredAt": "2026-11-28T09:00:00Z", "location": {"code": "MAD"}});
        let req = Request::post("/api/v1/events")
            .header("authorization", format!("Bearer {}", self.token()))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (s, _, v) = self.send(req).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// Opens an event stream; `Err(status)` if refused.
    async fn subscribe(&self, token: &str, query: &str) -> Result<SseReader, StatusCode> {
        let req = Request::get(format!("/api/v1/subscribe?{query}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        if res.status() != StatusCode::OK {
            return Err(res.status());
        }
        Ok(SseReader {
            body: res.into_body(),
            text: String::new(),
        })
    }
}

/// One SSE event: (event name, id, data).
type SseEvent = (String, Option<u64>, Value);

struct SseReader {
    body: Body,
    text: String,
}

impl SseReader {
    /// The next event, or `None` when the stream ended (bounded wait: a hung stream fails the
    /// test instead of hanging it).
    async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(end) = self.text.find("\n\n") {
                    let block: String = self.text.drain(..end + 2).collect();
                    let (mut ev, mut id, mut data) = (String::new(), None, Value::Null);
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            ev = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().parse().ok();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data = serde_json::from_str(v.trim()).unwrap_or(Value::Null);
                        }
                    }
                    if ev.is_empty() && id.is_none() {
                        continue; // a keep-alive comment
                    }
                    return Some((ev, id, data));
                }
                let frame = self.body.frame().await?.ok()?;
                if let Ok(data) = frame.into_data() {
                    self.text.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
        })
        .await
        .expect("the stream neither sent an event nor ended within 20 s")
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let f = fixture(AppConfig::default(), HttpLimits::default()).await;
    let req = Request::get("/healthz")
        .header("x-request-id", "req-42")
        .body(Body::empty())
        .unwrap();
    let (s, h, _) = f.send(req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["x-request-id"], "req-42");
    let (_, h, _) = f.get("/api/v1/trace/none").await;
    let id = h["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

/// Beyond `max_in_flight` requests at once, the next is answered at once with 503
/// `/problems/overloaded` and `Retry-After`, not queued; the server serves again afterwards.
#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_shed() {
    let f = fixture(
        AppConfig {
            read_your_writes_timeout: Duration::from_millis(1500),
            ..AppConfig::default()
        },
        HttpLimits {
            max_in_flight: 1,
            ..HttpLimits::default()
        },
    )
    .await;
    let c = f.capture("L1").await;
    let far = c["position"].as_u64().unwrap() + 1_000;
    // Holds the only slot while it waits for a position the read model never reaches.
    let slow_path = format!("/api/v1/trace/L1?minPosition={far}");
    let slow = f.get(&slow_path);
    let shed = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        f.get("/api/v1/trace/L1").await
    };
    let ((slow_s, _, _), (s, h, v)) = tokio::join!(slow, shed);
    // It waited out the read-your-writes timeout; that position was never assigned.
    assert_eq!(slow_s, StatusCode::BAD_REQUEST, "the slow one ran out");
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["type"], "/problems/overloaded");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["content-type"], "application/problem+json");
    // The slot is free again.
    let (s, _, _) = f.get("/api/v1/trace/L1").await;
    assert_eq!(s, StatusCode::OK);
}

/// A request that cannot produce its response within the request timeout gets 503
/// `/problems/request-timeout` with `Retry-After` instead of hanging.
#[tokio::test]
async fn a_request_past_the_timeout_is_answered_503() {
    let f = fixture(
        AppConfig {
            read_your_writes_timeout: Duration::from_secs(30),
            ..AppConfig::default()
        },
        HttpLimits {
            request_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        },
    )
    .await;
    let c = f.capture("T1").await;
    let far = c["position"].as_u64().unwrap() + 1_000;
    let (s, h, v) = f.get(&format!("/api/v1/trace/T1?minPosition={far}")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["type"], "/problems/request-timeout");
    assert_eq!(h["retry-after"], "1");
}

/// At most `max_streams_per_tenant` open event streams per tenant; a closed one frees its
/// slot.
#[tokio::test]
async fn event_streams_are_limited_per_tenant() {
    let f = fixture(
        AppConfig::default(),
        HttpLimits {
            max_streams_per_tenant: 2,
            ..HttpLimits::default()
        },
    )
    .await;
    let t = f.token();
    let a = f.subscribe(&t, "").await.unwrap();
    let _b = f.subscribe(&t, "").await.unwrap();
    assert_eq!(
        f.subscribe(&t, "").await.err(),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    drop(a);
    assert!(f.subscribe(&t, "").await.is_ok(), "the slot was freed");
}

/// A stream ends with an `error` event when the token expires.
#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let f = fixture(AppConfig::default(), HttpLimits::default()).await;
    let soon = f.token_until("acme", now_secs() + 2);
    let mut s = f.subscribe(&soon, "after=0").await.unwrap();
    f.capture("X1").await;
    let first = s.next().await.unwrap();
    assert_eq!(first.0, "BagSeen");
    let last = s.next().await.unwrap();
    assert_eq!(last.0, "error");
    assert_eq!(last.2["reason"], "tokenExpired");
    assert!(s.next().await.is_none(), "the stream ended");
}

/// A stream ends with an `error` event when its tenant is suspended.
#[tokio::test]
async fn a_stream_ends_when_its_tenant_is_suspended() {
    let f = fixture(AppConfig::default(), HttpLimits::default()).await;
    let mut s = f.subscribe(&f.token(), "after=0").await.unwrap();
    f.capture("S1").await;
    assert_eq!(s.next().await.unwrap().0, "BagSeen");
    f.state
        .app()
        .tenants()
        .set_suspended(&TenantId::parse("acme").unwrap(), true, "test")
        .await
        .unwrap();
    let last = s.next().await.unwrap();
    assert_eq!(last.0, "error");
    assert_eq!(last.2["reason"], "tenantInactive");
    assert!(s.next().await.is_none());
}

/// A client that falls further behind than the shared buffer holds is dropped with an
/// `error` event (reason `lagged`); it resumes with `Last-Event-ID` and misses nothing.
#[tokio::test]
async fn a_slow_client_is_dropped_and_resumes_without_loss() {
    let f = fixture(
        AppConfig {
            live_buffer: 4,
            ..AppConfig::default()
        },
        HttpLimits::default(),
    )
    .await;
    let mut slow = f.subscribe(&f.token(), "").await.unwrap();
    let first = f.capture("G1").await;
    let got = slow.next().await.unwrap();
    assert_eq!(got.1, first["position"].as_u64());
    let mut delivered = vec![got.1.unwrap()];
    // One more, read too: the client has caught up and now follows the shared broadcast.
    let mut positions = vec![f.capture("G2").await["position"].as_u64().unwrap()];
    delivered.push(slow.next().await.unwrap().1.unwrap());
    // 40 events while the client reads nothing (each broadcast as it commits).
    for i in 0..40 {
        positions.push(
            f.capture(&format!("G{i}")).await["position"]
                .as_u64()
                .unwrap(),
        );
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    let end = loop {
        let e = slow.next().await.expect("an error event before the end");
        if e.0 == "error" {
            break e;
        }
        delivered.push(e.1.unwrap());
    };
    assert_eq!(end.2["reason"], "lagged", "{end:?}");
    assert!(slow.next().await.is_none());
    // Resume after the last delivered id: everything else arrives, once, in order.
    let last = *delivered.last().unwrap();
    let req = Request::get("/api/v1/subscribe")
        .header("authorization", format!("Bearer {}", f.token()))
        .header("last-event-id", last.to_string())
        .body(Body::empty())
        .unwrap();
    let res = f.app.clone().oneshot(req).await.unwrap();
    let mut resumed = SseReader {
        body: res.into_body(),
        text: String::new(),
    };
    while delivered.len() < positions.len() + 1 {
        delivered.push(resumed.next().await.unwrap().1.unwrap());
    }
    let mut expected = vec![first["position"].as_u64().unwrap()];
    expected.extend(positions);
    assert_eq!(delivered, expected);
}
