//! The analytics API through `router(state).oneshot(request)` over the in-memory store:
//! run → KPIs → anomalies, idempotent re-runs, auth, bad input, the per-tenant configuration,
//! runs computed off the runtime's threads and refused (503) beyond the admitted ones, and
//! (feature `influxdb`) a run writing to a real InfluxDB.
//!
//! Windows are short (5 s, grace 1 s) because the store stamps events with the real clock;
//! the tests wait for windows to close but never assert on timing: expected values are
//! computed from the recorded-at times the store actually assigned.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;
use tracktrace_app::analytics::AnalyticsConfig;
use tracktrace_app::{App, AppConfig};
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{
    EventFilter, EventStore, EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent, Position,
    TenantId, Timestamp,
};
use tracktrace_domain::{Location, OPERATIONAL_EVENT, StoredEvent, entity_stream, format_micros};
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
use tracktrace_http::cache::{CacheConfig, TraceCache};
use tracktrace_http::{HttpState, router};

const SECRET: &[u8] = b"analytics-test-secret-0123456789abcdef";
const WINDOW_S: i64 = 5;
const US: i64 = 1_000_000;

struct Fixture {
    app: axum::Router,
    state: HttpState,
    store: Arc<InMemoryStore>,
    keys: JwtKeys,
}

fn config() -> AnalyticsConfig {
    AnalyticsConfig {
        window: Duration::from_secs(WINDOW_S as u64),
        grace: Duration::from_secs(1),
        lookback_windows: 8,
        schedule: false,
        ..AnalyticsConfig::default()
    }
}

async fn fixture(cfg: AnalyticsConfig) -> Fixture {
    let store = Arc::new(InMemoryStore::new());
    fixture_over(cfg, store.clone(), store).await
}

/// The fixture with the application over `events` (a wrapper of `store`).
async fn fixture_over(
    cfg: AnalyticsConfig,
    events: Arc<dyn EventStore>,
    store: Arc<InMemoryStore>,
) -> Fixture {
    let keys = JwtKeys::from_secret(SECRET).unwrap();
    let app = App::new(events, store.clone(), None, AppConfig::default());
    app.analytics().configure(cfg).unwrap();
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
        store,
        keys,
    }
}

impl Fixture {
    fn token(&self, tenant: &str, scopes: &[&str]) -> String {
        self.keys.sign(&Claims {
            sub: "analytics-test".into(),
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            exp: now_secs() + 600,
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn now_us() -> i64 {
    tracktrace_core::Timestamp::now().unix_micros()
}

/// Sleeps until the wall clock passes `us` (waiting for time to pass, not asserting on it).
async fn sleep_until(us: i64) {
    let wait = us - now_us();
    if wait > 0 {
        tokio::time::sleep(Duration::from_micros(wait as u64 + 20_000)).await;
    }
}

fn event(entity: &str, ty: &str, occurred_us: i64, loc: &str) -> Value {
    json!({
        "entityId": entity, "entityType": "Bag", "eventType": ty,
        "occurredAt": format_micros(occurred_us), "location": {"code": loc}
    })
}

fn fields(v: &Value) -> Vec<String> {
    v["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Captures a small fixture for acme, one event for globex and one rejected capture; returns
/// the aligned `[from, to)` covering them.
async fn capture_fixture(f: &Fixture) -> (i64, i64) {
    let w = WINDOW_S * US;
    // Start at the beginning of a window so the fixture almost surely shares one (the
    // assertions do not rely on it).
    let from = (now_us() / w + 1) * w;
    sleep_until(from).await;
    let writer = f.token("acme", &["events:write"]);
    let t0 = now_us() - 3_600 * US;
    let events = [
        event("bag1", "CHECKED_IN", t0, "MAD"),
        event("bag1", "LOADED", t0 + 1_800 * US, "MAD"),
        event("bag2", "CHECKED_IN", t0 + 60 * US, "MAD"),
        event("bag2", "MILESTONE_OVERDUE", t0 + 120 * US, "MAD"),
        // Received an hour after it occurred: late (threshold 15 min).
        event("bag3", "ARRIVED", now_us() - 3_600 * US, "LHR"),
    ];
    for e in &events {
        let (s, v) = f
            .send("POST", "/api/v1/events", Some(&writer), Some(e))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, _) = f
        .send(
            "POST",
            "/api/v1/events",
            Some(&writer),
            Some(&json!({"entityId": "bag4"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let g = f.token("globex", &["events:write"]);
    let (s, _) = f
        .send(
            "POST",
            "/api/v1/events",
            Some(&g),
            Some(&event("x1", "LOADED", t0, "CDG")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    f.state.app().analytics().flush_rejections().await.unwrap();
    let to = (now_us() / w + 1) * w;
    // Closed once `to + grace` has passed.
    sleep_until(to + US).await;
    (from, to)
}

/// acme's operational events per window start, from the store's own recorded-at times.
async fn recorded_windows(f: &Fixture, tenant: &str) -> BTreeMap<i64, Vec<Value>> {
    let w = WINDOW_S * US;
    let mut out: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    let all = f
        .store
        .read_all_to_end(
            Position::START,
            EventFilter::tenant(TenantId::parse(tenant).unwrap()),
        )
        .await
        .unwrap();
    for e in all.iter().filter(|e| e.event_type == OPERATIONAL_EVENT) {
        let start = e.recorded_at.unix_micros().div_euclid(w) * w;
        out.entry(start)
            .or_default()
            .push(serde_json::from_slice(&e.payload).unwrap());
    }
    out
}

/// A detector that judges short series (no season, 3 windows of history), for both tenants.
async fn short_series_detector(f: &Fixture, admin: &str) {
    let det = json!({
        "milestonePairs": [{"from": "CHECKED_IN", "to": "LOADED"}],
        "lateThresholdSecs": 900,
        "detector": {"season": 0, "minHistory": 3, "residualWindow": 6, "minResiduals": 3,
                     "threshold": 3.5, "minRelativeScale": 0.02}
    });
    for t in ["acme", "globex"] {
        let (s, v) = f
            .send(
                "PUT",
                &format!("/api/v1/admin/analytics/config/{t}"),
                Some(admin),
                Some(&det),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

fn window_of<'a>(windows: &'a [Value], tenant: &str, start: i64) -> &'a Value {
    windows
        .iter()
        .find(|w| w["kpis"]["tenant"] == tenant && w["kpis"]["from"] == format_micros(start))
        .unwrap_or_else(|| panic!("no window {tenant}/{start} in {windows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_then_kpis_and_anomalies_and_an_idempotent_rerun() {
    let f = fixture(config()).await;
    let admin = f.token("_system", &["admin"]);
    short_series_detector(&f, &admin).await;
    let (from, to) = capture_fixture(&f).await;
    let body = json!({"from": format_micros(from), "to": format_micros(to)});
    let (s, run) = f
        .send("POST", "/api/v1/analytics/run", Some(&admin), Some(&body))
        .await;
    assert_eq!(s, StatusCode::OK, "{run}");
    let windows = run["windows"].as_array().unwrap().clone();
    let n_windows = ((to - from) / (WINDOW_S * US)) as usize;
    assert_eq!(
        windows.len(),
        2 * n_windows,
        "one result per tenant and window"
    );
    assert!(
        windows.iter().all(|w| w["stored"] == true),
        "first run stores"
    );

    // KPI values against what the store recorded, window by window.
    let recorded = recorded_windows(&f, "acme").await;
    let mut total = 0;
    for (start, evs) in &recorded {
        let k = &window_of(&windows, "acme", *start)["kpis"];
        assert_eq!(k["events"], evs.len(), "{k}");
        total += evs.len();
        let types = |ty: &str| evs.iter().filter(|e| e["eventType"] == ty).count();
        assert_eq!(k["milestoneOverdue"], types("MILESTONE_OVERDUE"));
        let late = evs.iter().filter(|e| {
            e["receivedAtUs"].as_i64().unwrap() - e["occurredAtUs"].as_i64().unwrap() > 900 * US
        });
        let late_share = late.count() as f64 / evs.len() as f64;
        assert!(
            (k["lateShare"].as_f64().unwrap() - late_share).abs() < 1e-9,
            "{k}"
        );
        let bag1: Vec<&Value> = evs.iter().filter(|e| e["entityId"] == "bag1").collect();
        if bag1.len() == 2 {
            // CHECKED_IN → LOADED of bag1: 30 minutes (bag2 has no LOADED).
            assert_eq!(k["transit"][0]["count"], 1, "{k}");
            assert_eq!(k["transit"][0]["p50S"], 1800.0, "{k}");
            assert_eq!(k["transit"][0]["p95S"], 1800.0, "{k}");
        }
    }
    assert_eq!(total, 5);
    let rejected: u64 = windows
        .iter()
        .filter(|w| w["kpis"]["tenant"] == "acme")
        .map(|w| w["kpis"]["rejectedCommands"].as_u64().unwrap())
        .sum();
    assert_eq!(rejected, 1, "the rejected capture is counted once");
    let globex: u64 = windows
        .iter()
        .filter(|w| w["kpis"]["tenant"] == "globex")
        .map(|w| w["kpis"]["events"].as_u64().unwrap())
        .sum();
    assert_eq!(globex, 1, "tenants are counted separately");

    // Anomalies: after empty history, the windows with traffic spike in `events`.
    let anomalies: Vec<&Value> = windows
        .iter()
        .filter(|w| w["kpis"]["tenant"] == "acme")
        .flat_map(|w| w["anomalies"].as_array().unwrap())
        .collect();
    for start in recorded.keys() {
        let a = anomalies
            .iter()
            .find(|a| a["kpi"] == "events" && a["from"] == format_micros(*start))
            .unwrap_or_else(|| panic!("no events anomaly at {start}: {anomalies:?}"));
        assert!(a["score"].as_f64().unwrap() > 3.5);
        assert_eq!(a["expected"], 0.0);
        assert!(a["expectedHigh"].as_f64().unwrap() < a["value"].as_f64().unwrap());
    }
    assert!(
        anomalies
            .iter()
            .filter(|a| a["kpi"] == "events")
            .all(|a| recorded.contains_key(
                &tracktrace_domain::parse_instant(a["from"].as_str().unwrap()).unwrap()
            )),
        "no anomaly in windows without traffic: {anomalies:?}"
    );

    // The listings serve what the run stored (tenant from the token).
    let reader = f.token("acme", &["metrics:read"]);
    let q = format!(
        "?from={}&to={}",
        format_micros(from).replace('+', "%2B"),
        format_micros(to)
    );
    let (s, kpis) = f
        .send("GET", &format!("/api/v1/kpis{q}"), Some(&reader), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{kpis}");
    let expected: Vec<&Value> = windows
        .iter()
        .filter(|w| w["kpis"]["tenant"] == "acme")
        .map(|w| &w["kpis"])
        .collect();
    assert_eq!(
        kpis.as_array().unwrap().iter().collect::<Vec<_>>(),
        expected
    );
    let (s, listed) = f
        .send("GET", &format!("/api/v1/anomalies{q}"), Some(&reader), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{listed}");
    let mut listed: Vec<Value> = listed.as_array().unwrap().clone();
    let mut ran: Vec<Value> = anomalies.iter().map(|a| (*a).clone()).collect();
    let key = |a: &Value| (a["from"].to_string(), a["kpi"].to_string());
    listed.sort_by_key(key);
    ran.sort_by_key(key);
    assert_eq!(listed, ran);

    // A re-run appends nothing and answers the same.
    let head = f.store.head().await.unwrap();
    let (s, again) = f
        .send("POST", "/api/v1/analytics/run", Some(&admin), Some(&body))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        f.store.head().await.unwrap(),
        head,
        "a re-run stores no new event"
    );
    let again = again["windows"].as_array().unwrap();
    assert!(again.iter().all(|w| w["stored"] == false));
    for (a, b) in windows.iter().zip(again) {
        assert_eq!(a["kpis"], b["kpis"]);
        assert_eq!(a["anomalies"], b["anomalies"]);
    }

    // A tenant admin runs its own tenant only.
    let acme_admin = f.token("acme", &["admin"]);
    let (s, own) = f
        .send(
            "POST",
            "/api/v1/analytics/run",
            Some(&acme_admin),
            Some(&body),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{own}");
    assert!(
        own["windows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["kpis"]["tenant"] == "acme")
    );
}

#[tokio::test]
async fn run_needs_admin_and_checks_its_input() {
    let f = fixture(config()).await;
    let body = json!({});
    let (s, _) = f
        .send("POST", "/api/v1/analytics/run", None, Some(&body))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let writer = f.token("acme", &["events:write", "metrics:read"]);
    let (s, v) = f
        .send("POST", "/api/v1/analytics/run", Some(&writer), Some(&body))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let acme_admin = f.token("acme", &["admin"]);
    let (s, _) = f
        .send(
            "POST",
            "/api/v1/analytics/run",
            Some(&acme_admin),
            Some(&json!({"tenant": "globex"})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a tenant admin cannot run another tenant"
    );

    let admin = f.token("_system", &["admin"]);
    let w = WINDOW_S * US;
    let closed = (now_us() / w - 2) * w;
    let cases = [
        (json!({"from": "yesterday"}), vec!["from"]),
        (
            json!({"from": format_micros(closed + 1), "to": format_micros(closed + w)}),
            vec!["from"],
        ),
        (
            json!({"from": format_micros(closed), "to": format_micros(closed)}),
            vec!["to"],
        ),
        (
            json!({"from": format_micros(closed), "to": format_micros((now_us() / w + 5) * w)}),
            vec!["to"],
        ),
        (json!({"tenant": "no such/tenant"}), vec!["tenant"]),
        (json!({"tenant": "nobody"}), vec!["tenant"]),
        (json!({"window": 1}), vec!["body"]),
    ];
    for (req, expected) in cases {
        let (s, v) = f
            .send("POST", "/api/v1/analytics/run", Some(&admin), Some(&req))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{req}: {v}");
        assert_eq!(
            v["type"].as_str().unwrap_or("").rsplit('/').next(),
            Some("validation"),
            "{v}"
        );
        for field in expected {
            assert!(fields(&v).contains(&field.to_owned()), "{req}: {v}");
        }
    }
    // No body: the last closed window, for every tenant.
    let (s, v) = f
        .send("POST", "/api/v1/analytics/run", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["windows"].as_array().unwrap().len(), 2);

    // Listings: metrics:read scope and valid ranges.
    let (s, _) = f.send("GET", "/api/v1/kpis", Some(&acme_admin), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let reader = f.token("acme", &["metrics:read"]);
    for (q, field) in [
        ("?from=nonsense", "from"),
        ("?to=2026-13-01T00:00:00Z", "to"),
        ("?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("?from=2025-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
    ] {
        for path in ["/api/v1/kpis", "/api/v1/anomalies"] {
            let (s, v) = f
                .send("GET", &format!("{path}{q}"), Some(&reader), None)
                .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{path}{q}: {v}");
            assert_eq!(fields(&v), vec![field.to_owned()], "{path}{q}: {v}");
        }
    }
    let (s, v) = f.send("GET", "/api/v1/kpis", Some(&reader), None).await;
    assert_eq!(s, StatusCode::OK);
    // The run above stored acme's last closed window and the detector's history before it.
    assert_eq!(v.as_array().unwrap().len(), config().lookback_windows);
}

#[tokio::test]
async fn tenant_configuration_is_validated_stored_and_scoped() {
    let f = fixture(config()).await;
    let admin = f.token("_system", &["admin"]);
    let path = "/api/v1/admin/analytics/config/acme";
    let (s, defaults) = f.send("GET", path, Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        defaults["milestonePairs"][0],
        json!({"from": "CHECKED_IN", "to": "LOADED"})
    );
    let bad = json!({
        "milestonePairs": [{"from": "", "to": "LOADED"}],
        "lateThresholdSecs": 0,
        "detector": {"season": 24, "minHistory": 0, "residualWindow": 48, "minResiduals": 12,
                     "threshold": -1.0, "minRelativeScale": 0.02}
    });
    let (s, v) = f.send("PUT", path, Some(&admin), Some(&bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        fields(&v),
        vec![
            "milestonePairs[0].from",
            "lateThresholdSecs",
            "detector.minHistory",
            "detector.threshold"
        ]
    );
    let (s, v) = f
        .send(
            "PUT",
            path,
            Some(&admin),
            Some(&json!({"milestonePairs": []})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let mut good = defaults.clone();
    good["milestonePairs"] = json!([{"from": "LOADED", "to": "ARRIVED"}]);
    let (s, _) = f.send("PUT", path, Some(&admin), Some(&good)).await;
    assert_eq!(s, StatusCode::OK);
    // Another process over the same store sees it (it is stored as an event).
    let other = tracktrace_app::analytics::Analytics::new(f.store.clone());
    let seen = other
        .tenant_config(&TenantId::parse("acme").unwrap())
        .await
        .unwrap();
    assert_eq!(seen.milestone_pairs[0].from, "LOADED");
    // Scope: a tenant admin manages its own tenant only; writers not at all.
    let acme_admin = f.token("acme", &["admin"]);
    let (s, _) = f.send("GET", path, Some(&acme_admin), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f
        .send(
            "GET",
            "/api/v1/admin/analytics/config/globex",
            Some(&acme_admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = f
        .send("GET", path, Some(&f.token("acme", &["events:write"])), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = f
        .send(
            "GET",
            "/api/v1/admin/analytics/config/nobody",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_routes_are_in_the_openapi_document() {
    let f = fixture(config()).await;
    let (s, doc) = f.send("GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    for p in [
        "/api/v1/analytics/run",
        "/api/v1/kpis",
        "/api/v1/anomalies",
        "/api/v1/admin/analytics/config/{tenant}",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
}

/// A run writes its KPIs and anomalies to a real InfluxDB (the one `.ci/run` starts, in
/// `TRACKTRACE_TEST_INFLUX_URL`), read back with an InfluxQL query.
#[cfg(feature = "influxdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_writes_kpis_to_influxdb() {
    let Ok(url) = std::env::var("TRACKTRACE_TEST_INFLUX_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "TRACKTRACE_TEST_INFLUX_URL must be set under CI=true (.ci/run starts InfluxDB)"
        );
        eprintln!(
            "SKIPPED: set TRACKTRACE_TEST_INFLUX_URL (e.g. `bash .ci/influxd.sh 18086`) to run the InfluxDB test"
        );
        return;
    };
    let db = format!("tt_analytics_{}", uuid::Uuid::now_v7().simple());
    let mut cfg = config();
    cfg.influx = Some(tracktrace_analytics::influx::InfluxConfig::new(&url, &db));
    let f = fixture(cfg).await;
    let admin = f.token("_system", &["admin"]);
    short_series_detector(&f, &admin).await;
    let (from, to) = capture_fixture(&f).await;
    let body = json!({"from": format_micros(from), "to": format_micros(to), "tenant": "acme"});
    let (s, run) = f
        .send("POST", "/api/v1/analytics/run", Some(&admin), Some(&body))
        .await;
    assert_eq!(s, StatusCode::OK, "{run}");
    assert!(
        f.state
            .app()
            .analytics()
            .flush_influx(Duration::from_secs(30))
            .await,
        "InfluxDB write did not finish"
    );
    let st = f.state.app().analytics().status();
    assert!(
        st.influx_enabled && st.influx_written > 0 && st.influx_dropped == 0,
        "{st:?}"
    );

    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let q = "SELECT sum(\"events\") FROM \"tt_kpi\" WHERE \"tenant\" = 'acme'";
    let path = format!(
        "/query?db={db}&q={}",
        q.replace(' ', "%20")
            .replace('"', "%22")
            .replace('\'', "%27")
            .replace('=', "%3D")
    );
    let r = tracktrace_http::client::request(addr, "GET", &path, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["results"][0]["series"][0]["values"][0][1], 5, "{v}");
    let q = "SELECT count(\"score\") FROM \"tt_anomaly\" WHERE \"kpi\" = 'events'";
    let path = format!(
        "/query?db={db}&q={}",
        q.replace(' ', "%20")
            .replace('"', "%22")
            .replace('\'', "%27")
            .replace('=', "%3D")
    );
    let r = tracktrace_http::client::request(addr, "GET", &path, &[], None)
        .await
        .unwrap();
    let v = r.json();
    let ran = run["windows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["anomalies"].as_array().unwrap())
        .filter(|a| a["kpi"] == "events")
        .count();
    assert!(ran > 0);
    assert_eq!(v["results"][0]["series"][0]["values"][0][1], ran, "{v}");
}

/// Appends `n` operational events of acme (bags of 10 events) straight to the store, in
/// batches, recorded now.
async fn bulk_events(store: &InMemoryStore, n: usize) {
    let acme = TenantId::parse("acme").unwrap();
    let t0 = now_us() - 3_600 * US;
    let types = ["CHECKED_IN", "SCANNED", "LOADED", "ARRIVED"];
    for bag in 0..n / 10 {
        let entity = format!("bulk{bag}");
        let batch = (0..10)
            .map(|k| {
                let at = t0 + (k as i64) * 60 * US;
                let stored = StoredEvent {
                    event_type: types[k % types.len()].into(),
                    entity_id: entity.clone(),
                    entity_type: "Bag".into(),
                    occurred_at: format_micros(at),
                    occurred_at_us: at,
                    location: Location {
                        code: if k < 5 { "MAD" } else { "LHR" }.into(),
                        detail: None,
                    },
                    source: "bulk".into(),
                    attributes: Default::default(),
                    related_entities: Vec::new(),
                    received_at_us: at,
                    submitted_by: "bulk".into(),
                    event_id: None,
                    dedup_key: None,
                };
                NewEvent::json(OPERATIONAL_EVENT, &serde_json::to_value(&stored).unwrap())
            })
            .collect();
        store
            .append_to(
                &acme,
                &entity_stream("Bag", &entity).unwrap(),
                ExpectedVersion::Any,
                batch,
            )
            .await
            .unwrap();
    }
}

/// On a runtime with a single thread, other requests are served while an on-demand run
/// computes a window of 20,000 events: its computation runs on the blocking pool, and the
/// run's task waits for it instead of holding the thread. (Were the computation on the
/// runtime's thread, the run over the in-memory store would finish in one poll and nothing
/// else would be served meanwhile.)
#[tokio::test(flavor = "current_thread")]
async fn other_requests_are_served_while_a_run_computes() {
    let f = fixture(config()).await;
    let w = WINDOW_S * US;
    sleep_until((now_us() / w + 1) * w).await;
    bulk_events(&f.store, 20_000).await;
    let to = (now_us() / w + 1) * w;
    sleep_until(to + US).await;
    let admin = f.token("_system", &["admin"]);
    let reader = f.token("acme", &["metrics:read"]);
    let body = json!({"from": format_micros(to - w), "to": format_micros(to), "tenant": "acme"});
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/analytics/run")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let run = tokio::spawn(f.app.clone().oneshot(req));
    // Let the run start; from now on this task runs only while the run's task waits.
    tokio::task::yield_now().await;
    let mut served = 0;
    while !run.is_finished() {
        let (s, v) = f.send("GET", "/api/v1/kpis", Some(&reader), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        served += 1;
        tokio::task::yield_now().await;
    }
    assert!(served > 0, "no request was served while the run computed");
    let res = run.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    let events: u64 = v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["kpis"]["events"].as_u64().unwrap())
        .sum();
    assert_eq!(events, 20_000, "{v}");
}

/// The in-memory store whose next `position_at` (where a window scan starts) waits until
/// released: a run held in the middle of its computation.
struct HeldScan {
    inner: Arc<InMemoryStore>,
    hold_next: AtomicBool,
    held: Notify,
    release: Semaphore,
}

#[async_trait]
impl Intercept for HeldScan {
    type Inner = InMemoryStore;

    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }

    async fn position_at(&self, at: Timestamp) -> tracktrace_core::Result<Position> {
        if self.hold_next.swap(false, Ordering::SeqCst) {
            self.held.notify_one();
            let _released = self.release.acquire().await;
        }
        self.inner.position_at(at).await
    }
}

/// With `maxPendingRuns` = 1, a run requested while another is computing is refused at once
/// with 503, `Retry-After` and a problem that says why; once the first is done, runs are
/// admitted again.
#[tokio::test]
async fn a_run_beyond_the_admitted_ones_is_refused_with_503() {
    let store = Arc::new(InMemoryStore::new());
    let held = Arc::new(Intercepted(HeldScan {
        inner: store.clone(),
        hold_next: AtomicBool::new(false),
        held: Notify::new(),
        release: Semaphore::new(0),
    }));
    let cfg = AnalyticsConfig {
        max_pending_runs: 1,
        lookback_windows: 1,
        ..config()
    };
    let f = fixture_over(cfg, held.clone(), store).await;
    let admin = f.token("_system", &["admin"]);
    let request = || {
        Request::builder()
            .method("POST")
            .uri("/api/v1/analytics/run")
            .header("authorization", format!("Bearer {admin}"))
            .body(Body::empty())
            .unwrap()
    };
    held.hold_next.store(true, Ordering::SeqCst);
    let first = tokio::spawn(f.app.clone().oneshot(request()));
    held.held.notified().await;

    let res = f.app.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(retry_after.is_some_and(|s| s >= 1), "{:?}", res.headers());
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let problem: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(problem["type"], "/problems/busy", "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("analytics run")),
        "{problem}"
    );
    assert_eq!(f.state.app().analytics().status().runs_refused, 1);

    held.release.add_permits(1);
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = f.app.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "admitted again");
}
