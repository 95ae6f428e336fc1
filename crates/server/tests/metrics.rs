//! `GET /metrics` through `router(state).oneshot(..)`, with the server's own assembly
//! (`guarded_store`, `trace::runner::run_with_metrics`, `App::with_metrics`) over the
//! in-memory store:
//! - every metric name the alerting rules and the Grafana dashboard use is exported, and the
//!   exported families are exactly the contract table of `ops/README.md`, with its types;
//! - values move when the thing happens (captures per tenant, outcomes and failure reasons,
//!   cache hits and misses, append latency, freshness, lag, breaker state);
//! - the text is valid: our strict parser, and `promtool check metrics` when installed
//!   (required under `CI=true`);
//! - scraping needs a `metrics:read` token of the system tenant.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;
use tracktrace_app::metrics::{BUILTIN_METRICS, Metrics, guarded_store};
use tracktrace_app::{App, AppConfig, SYSTEM_TENANT};
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{
    AppendOutcome, AppendRequest, BreakerConfig, Error, EventStore, EventStoreExt, InMemoryStore,
    Position, TenantId, Version,
};
use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
use tracktrace_http::cache::{CacheConfig, TraceCache};
use tracktrace_http::{HttpState, ops_router, router};

use common::{Exposition, in_ci};

/// The in-memory store whose appends fail while `down` (`Unavailable`: an outage) or
/// `contended` (`Conflict`: another writer always wins) is set. Reads keep working, so only
/// the command path sees the failure.
struct FailingAppends {
    inner: Arc<InMemoryStore>,
    down: Arc<AtomicBool>,
    contended: Arc<AtomicBool>,
}

#[async_trait]
impl Intercept for FailingAppends {
    type Inner = InMemoryStore;

    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }

    async fn append(&self, req: AppendRequest) -> tracktrace_core::Result<AppendOutcome> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                reason: "test outage".into(),
                retry_after: None,
                source: None,
            });
        }
        if self.contended.load(Ordering::SeqCst) {
            return Err(Error::Conflict {
                tenant: req.tenant,
                stream: req.stream,
                expected: req.expected,
                actual: Version::new(u64::MAX),
            });
        }
        self.inner.append(req).await
    }
}

const SECRET: &[u8] = b"metrics-test-secret-0123456789abcdef";

struct Fixture {
    state: HttpState,
    keys: JwtKeys,
    down: Arc<AtomicBool>,
    contended: Arc<AtomicBool>,
    store: Arc<dyn EventStore>,
}

/// Assembled like `server::start` (role `all`).
async fn fixture() -> Fixture {
    let mem = Arc::new(InMemoryStore::new());
    let down = Arc::new(AtomicBool::new(false));
    let contended = Arc::new(AtomicBool::new(false));
    let metrics = Metrics::new();
    let store = guarded_store(
        Arc::new(Intercepted(FailingAppends {
            inner: mem.clone(),
            down: down.clone(),
            contended: contended.clone(),
        })),
        "memory",
        BreakerConfig::default()
            .with_failure_threshold(2)
            .with_open_for(Duration::from_secs(60)),
        &metrics,
    );
    let (tx, rx) = watch::channel(Position::START);
    tokio::spawn(tracktrace_app::trace::runner::run_with_metrics(
        mem.clone(),
        mem.clone(),
        tx,
        metrics.clone(),
    ));
    let keys = JwtKeys::from_secret(SECRET).unwrap();
    let app = App::with_metrics(
        store.clone(),
        mem.clone(),
        Some(rx),
        AppConfig::default(),
        metrics,
    );
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
        state,
        keys,
        down,
        contended,
        store,
    }
}

impl Fixture {
    fn token(&self, tenant: &str, scopes: &[&str]) -> String {
        self.keys.sign(&Claims {
            sub: "metrics-test".into(),
            tenant: tenant.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            exp: now_secs() + 600,
        })
    }

    fn writer(&self, tenant: &str) -> String {
        self.token(tenant, &["events:write", "trace:read"])
    }

    async fn send(
        &self,
        app: axum::Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(s) => b
                .header("content-type", "application/json")
                .body(Body::from(s)),
            None => b.body(Body::empty()),
        }
        .unwrap();
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, bytes.to_vec())
    }

    async fn post(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        let app = router(self.state.clone());
        let (s, _, b) = self
            .send(app, "POST", path, Some(token), Some(body.to_string()))
            .await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    async fn trace(&self, token: &str, entity: &str, min_position: u64) -> (StatusCode, String) {
        let app = router(self.state.clone());
        let (s, h, _) = self
            .send(
                app,
                "GET",
                &format!("/api/v1/trace/{entity}?minPosition={min_position}"),
                Some(token),
                None,
            )
            .await;
        let cache = h
            .get("x-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (s, cache)
    }

    fn scraper(&self) -> String {
        self.token(SYSTEM_TENANT, &["metrics:read"])
    }

    async fn scrape_text(&self) -> String {
        let token = self.scraper();
        let (s, h, body) = self
            .send(
                router(self.state.clone()),
                "GET",
                "/metrics",
                Some(&token),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            h["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        String::from_utf8(body).unwrap()
    }

    async fn scrape(&self) -> Exposition {
        let text = self.scrape_text().await;
        Exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

fn event(entity: &str, entity_type: &str, event_type: &str) -> Value {
    json!({
        "entityId": entity,
        "entityType": entity_type,
        "eventType": event_type,
        "occurredAt": "2026-11-28T08:15:00+01:00",
        "location": {"code": "MAD"},
        "source": "BRS"
    })
}

const INGESTED: &str = "tracktrace_events_ingested_total";
const COMMANDS: &str = "tracktrace_commands_total";
const FAILURES: &str = "tracktrace_command_failures_total";

// ---------- the contract: rules, dashboard, ops/README.md ----------

fn ops_file(rel: &str) -> String {
    let path = format!("{}/../../ops/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `expr` of every rule (inline, or a `|`/`>` block: the lines indented deeper).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(rest.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    exprs
}

/// The `expr` of every Prometheus target of the dashboard (a target's own datasource, else
/// its panel's). InfluxDB targets (measurements, not metric names) are skipped; any other
/// datasource type fails the test so nothing is skipped silently.
fn dashboard_exprs(v: &Value, panel_ds: Option<&Value>, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            let ds = o.get("datasource").or(panel_ds);
            if let Some(Value::Array(targets)) = o.get("targets") {
                for t in targets {
                    let kind = t
                        .get("datasource")
                        .or(ds)
                        .and_then(|d| d["type"].as_str())
                        .unwrap_or("?");
                    match kind {
                        "prometheus" => out.push(
                            t["expr"]
                                .as_str()
                                .unwrap_or_else(|| panic!("Prometheus target without expr: {t}"))
                                .to_owned(),
                        ),
                        "influxdb" => {}
                        other => panic!("dashboard target with datasource type {other:?}: {t}"),
                    }
                }
            }
            for (k, child) in o {
                if k != "targets" {
                    dashboard_exprs(child, ds, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| dashboard_exprs(c, panel_ds, out)),
        _ => {}
    }
}

/// The metric names a PromQL expression selects: identifiers that are not functions or
/// aggregations, keywords, label names (matchers, `by`/`without`/`on`/`ignoring` lists),
/// durations, numbers or strings.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "atan2"];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut i = 0;
    // Skips from an opening delimiter to its closing one (strings inside respected).
    let skip_to = |mut i: usize, close: char| {
        while i < c.len() && c[i] != close {
            if c[i] == '"' || c[i] == '\'' {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_to(i + 1, ch);
        } else if ch == '{' {
            i = skip_to(i + 1, '}');
        } else if ch == '[' {
            i = skip_to(i + 1, ']');
        } else if ch == '(' && label_list_next {
            label_list_next = false;
            i = skip_to(i + 1, ')');
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let ident: String = c[start..i].iter().collect();
            let next = c[i..].iter().find(|c| !c.is_whitespace()).copied();
            if LABEL_LISTS.contains(&ident.as_str()) {
                label_list_next = next == Some('(');
            } else if KEYWORDS.contains(&ident.as_str())
                || AGGREGATIONS.contains(&ident.as_str())
                || next == Some('(')
            {
                // a keyword, an aggregation or a function call
            } else {
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_extracted() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (instance, le) (rate(a_bucket{x="y",le!="1"}[5m]))) > 0.1
           and on (instance) max without (le) (b) / clamp_min(sum(rate(c_total[1d:1h])), 1e-9)"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b", "c_total"]
    );
}

/// `(name, type)` rows of the metric contract table in ops/README.md.
fn contract_table() -> Vec<(String, String)> {
    ops_file("README.md")
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            (cols[1].trim_matches('`').to_owned(), cols[2].to_owned())
        })
        .collect()
}

/// Families the rules and the dashboard use that only modules this fixture does not run
/// register (partner-route publishers and bus ingestion, feature `nats`), with their types.
/// `tests/propagation.rs` scrapes them from a server running those modules over NATS.
const OPTIONAL_FAMILIES: &[(&str, &str)] = &[
    ("tracktrace_publisher_lag_seconds", "gauge"),
    ("tracktrace_publisher_breaker_state", "gauge"),
    ("tracktrace_bus_ingest_messages_total", "counter"),
];

#[tokio::test]
async fn every_metric_of_the_rules_and_the_dashboard_is_exported() {
    let f = fixture().await;
    // One capture and one trace, so labelled series exist.
    let w = f.writer("acme");
    let (s, c) = f
        .post("/api/v1/events", &w, &event("BAG1", "Bag", "BagLoaded"))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let (s, _) = f.trace(&w, "BAG1", c["position"].as_u64().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let e = f.scrape().await;

    let rules = rule_exprs(&ops_file("prometheus/tracktrace-alerts.yml"));
    assert_eq!(
        rules.len(),
        11,
        "the rules file has eleven alerts: {rules:?}"
    );
    let dashboard: Value =
        serde_json::from_str(&ops_file("grafana/tracktrace-dashboard.json")).unwrap();
    let mut panels = Vec::new();
    dashboard_exprs(&dashboard, None, &mut panels);
    assert!(panels.len() >= 10, "{panels:?}");

    let table = contract_table();
    let contract: BTreeSet<&str> = table.iter().map(|(n, _)| n.as_str()).collect();
    let mut used = BTreeSet::new();
    for expr in rules.iter().chain(&panels) {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr:?}");
        used.extend(names);
    }
    for name in &used {
        if let Some(kind) = OPTIONAL_FAMILIES
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k)
        {
            // Not registered by this fixture (no NATS): the contract row must say what it is.
            assert_eq!(
                table
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, k)| k.as_str()),
                Some(*kind),
                "{name} is used but its contract row is missing or has another type"
            );
            assert!(
                e.family_of(name).is_none(),
                "{name} is exported here after all"
            );
            continue;
        }
        let family = e.family_of(name).unwrap_or_else(|| {
            panic!("{name} (used by the rules or the dashboard) has no # TYPE line in /metrics")
        });
        assert!(
            contract.contains(family),
            "{family} is used but missing from the contract table of ops/README.md"
        );
        assert!(
            !e.series(name).is_empty(),
            "{name} has no sample after a capture and a trace"
        );
    }
    // The table is the specification: every exported family is in it with its type, and
    // every family of metrics.rs is exported. (Rows for families that optional modules
    // register, e.g. a NATS publisher's, are exported only where those modules run.)
    let kinds: std::collections::BTreeMap<&str, &str> = table
        .iter()
        .map(|(n, k)| (n.as_str(), k.as_str()))
        .collect();
    for (name, kind) in &e.types {
        assert_eq!(
            kinds.get(name.as_str()).copied(),
            Some(kind.as_str()),
            "{name} ({kind}) is exported but not in the contract table of ops/README.md"
        );
    }
    for m in BUILTIN_METRICS {
        assert!(e.types.contains_key(*m), "{m} is not exported");
    }
}

// ---------- values move ----------

#[tokio::test]
async fn captures_count_per_tenant_and_by_outcome() {
    let f = fixture().await;
    let acme = f.writer("acme");
    let e0 = f.scrape().await;
    assert_eq!(e0.get(COMMANDS, &[("outcome", "ok")]), 0.0);
    assert_eq!(e0.value(INGESTED, &[("tenant", "acme")]), None);

    // Stored: ingested for acme, one ok command, appends timed.
    let mut ev = event("BAG1", "Bag", "BagLoaded");
    ev["eventId"] = json!("0190c1a2-7b3d-7c4e-8f5a-1b2c3d4e5f60");
    let (s, _) = f.post("/api/v1/events", &acme, &ev).await;
    assert_eq!(s, StatusCode::CREATED);
    let e1 = f.scrape().await;
    assert_eq!(e1.get(INGESTED, &[("tenant", "acme")]), 1.0);
    assert_eq!(e1.get(COMMANDS, &[("outcome", "ok")]), 1.0);
    let appends = e1.get(
        "tracktrace_append_duration_seconds_count",
        &[("backend", "memory")],
    );
    assert!(appends >= 1.0, "append not timed");

    // A duplicate is an ok command but stores nothing.
    let (s, _) = f.post("/api/v1/events", &acme, &ev).await;
    assert_eq!(s, StatusCode::OK);
    // Another tenant has its own series.
    let (s, _) = f
        .post(
            "/api/v1/events",
            &f.writer("globex"),
            &event("ULD1", "Uld", "UldBuilt"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let e2 = f.scrape().await;
    assert_eq!(e2.get(INGESTED, &[("tenant", "acme")]), 1.0);
    assert_eq!(e2.get(INGESTED, &[("tenant", "globex")]), 1.0);
    assert_eq!(e2.get(COMMANDS, &[("outcome", "ok")]), 3.0);
    assert!(
        e2.get(
            "tracktrace_append_duration_seconds_count",
            &[("backend", "memory")]
        ) > appends
    );

    // A batch: each item is a command; the invalid one is a validation failure.
    let mut bad = event("BAG2", "Bag", "BagLoaded");
    bad["occurredAt"] = json!("yesterday");
    let (s, v) = f
        .post(
            "/api/v1/events:batch",
            &acme,
            &json!({"events": [event("BAG2", "Bag", "BagLoaded"), bad, event("BAG3", "Bag", "BagLoaded")]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let e3 = f.scrape().await;
    assert_eq!(e3.get(INGESTED, &[("tenant", "acme")]), 3.0);
    assert_eq!(e3.get(COMMANDS, &[("outcome", "ok")]), 5.0);
    assert_eq!(e3.get(COMMANDS, &[("outcome", "rejected")]), 1.0);
    assert_eq!(e3.get(FAILURES, &[("reason", "validation")]), 1.0);
}

#[tokio::test]
async fn failing_commands_count_with_their_reason() {
    let f = fixture().await;
    let acme = f.writer("acme");
    let (s, _) = f
        .post("/api/v1/events", &acme, &event("BAG1", "Bag", "BagLoaded"))
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Conflict: an entity keeps one type.
    let (s, _) = f
        .post("/api/v1/events", &acme, &event("BAG1", "Uld", "UldBuilt"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Forbidden: no events:write scope.
    let reader = f.token("acme", &["trace:read"]);
    let (s, _) = f
        .post(
            "/api/v1/events",
            &reader,
            &event("BAG2", "Bag", "BagLoaded"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Validation: malformed JSON (single) and a batch that is not an events array.
    let (s, _, _) = f
        .send(
            router(f.state.clone()),
            "POST",
            "/api/v1/events",
            Some(&acme),
            Some("{not json".into()),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = f
        .post("/api/v1/events:batch", &acme, &json!({"events": "x"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e = f.scrape().await;
    assert_eq!(e.get(FAILURES, &[("reason", "conflict")]), 1.0);
    assert_eq!(e.get(FAILURES, &[("reason", "forbidden")]), 1.0);
    assert_eq!(e.get(FAILURES, &[("reason", "validation")]), 2.0);
    assert_eq!(e.get(COMMANDS, &[("outcome", "rejected")]), 4.0);
    assert_eq!(e.get(COMMANDS, &[("outcome", "failed")]), 0.0);
    assert_eq!(e.get(INGESTED, &[("tenant", "acme")]), 1.0);

    // Contention: still conflicting after the command bus's retries (503, a failed command).
    f.contended.store(true, Ordering::SeqCst);
    let (s, v) = f
        .post("/api/v1/events", &acme, &event("BAG1", "Bag", "BagScanned"))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["type"], "/problems/contention");
    f.contended.store(false, Ordering::SeqCst);
    let e = f.scrape().await;
    assert_eq!(e.get(FAILURES, &[("reason", "contention")]), 1.0);
    assert_eq!(e.get(COMMANDS, &[("outcome", "failed")]), 1.0);
    let breaker = [("component", "event_store")];
    assert_eq!(
        e.value("tracktrace_circuit_breaker_state", &breaker),
        Some(0.0)
    );

    // Store outage: failed commands, reason unavailable; the breaker opens (threshold 2).
    f.down.store(true, Ordering::SeqCst);
    for i in 0..3 {
        let (s, v) = f
            .post(
                "/api/v1/events",
                &acme,
                &event(&format!("OUT{i}"), "Bag", "BagLoaded"),
            )
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    }
    let e = f.scrape().await;
    assert_eq!(e.get(FAILURES, &[("reason", "unavailable")]), 3.0);
    assert_eq!(e.get(COMMANDS, &[("outcome", "failed")]), 4.0);
    assert_eq!(
        e.value("tracktrace_circuit_breaker_state", &breaker),
        Some(2.0)
    );
    // Every reason of the closed set is exported from the start.
    for r in [
        "validation",
        "forbidden",
        "conflict",
        "contention",
        "unavailable",
        "internal",
    ] {
        assert!(e.value(FAILURES, &[("reason", r)]).is_some(), "{r}");
    }
}

#[tokio::test]
async fn trace_queries_count_cache_hits_and_misses_and_freshness() {
    let f = fixture().await;
    let w = f.writer("acme");
    let (_, c) = f
        .post("/api/v1/events", &w, &event("BAG1", "Bag", "BagLoaded"))
        .await;
    let pos = c["position"].as_u64().unwrap();
    let (s, cache) = f.trace(&w, "BAG1", pos).await;
    assert_eq!((s, cache.as_str()), (StatusCode::OK, "miss"));
    let e1 = f.scrape().await;
    let hit = [("cache", "hit")];
    let miss = [("cache", "miss")];
    let q = "tracktrace_trace_query_duration_seconds_count";
    let lookups = "tracktrace_cache_requests_total";
    assert_eq!(e1.get(q, &miss), 1.0);
    assert_eq!(e1.get(q, &hit), 0.0);
    assert_eq!(e1.get(lookups, &[("result", "miss")]), 1.0);
    assert_eq!(e1.get(lookups, &[("result", "hit")]), 0.0);
    // The captured event was committed to the read model before minPosition was satisfied.
    let fresh = e1.get("tracktrace_data_freshness_seconds_count", &[]);
    assert!(fresh >= 1.0, "freshness not observed");
    assert_eq!(
        fresh,
        e1.get(
            "tracktrace_data_freshness_seconds_bucket",
            &[("le", "+Inf")]
        )
    );

    let (s, cache) = f.trace(&w, "BAG1", pos).await;
    assert_eq!((s, cache.as_str()), (StatusCode::OK, "hit"));
    let e2 = f.scrape().await;
    assert_eq!(e2.get(q, &hit), 1.0);
    assert_eq!(e2.get(q, &miss), 1.0);
    assert_eq!(e2.get(lookups, &[("result", "hit")]), 1.0);
    // A 404 is no query of a view: nothing counted.
    let (s, _) = f.trace(&w, "NOPE", 0).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let e3 = f.scrape().await;
    assert_eq!(e3.get(q, &hit) + e3.get(q, &miss), 2.0);

    // Caught up: no lag; the store's event count, size and head are exported.
    let trace = [("projection", "tt.trace")];
    assert_eq!(
        e3.value("tracktrace_projection_lag_positions", &trace),
        Some(0.0)
    );
    assert_eq!(
        e3.value("tracktrace_projection_lag_seconds", &trace),
        Some(0.0)
    );
    let head = f.store.head().await.unwrap().get() as f64;
    assert!(head >= pos as f64);
    assert_eq!(
        e3.value("tracktrace_event_store_head_position", &[]),
        Some(head)
    );
    let stored = f
        .store
        .read_all_to_end(Position::START, Default::default())
        .await
        .unwrap()
        .len() as f64;
    let stats = f.store.store_stats().await.unwrap().unwrap();
    assert_eq!(stats.events as f64, stored);
    assert_eq!(e3.value("tracktrace_event_store_events", &[]), Some(stored));
    assert_eq!(
        e3.value("tracktrace_event_store_bytes", &[]),
        Some(stats.bytes as f64)
    );
    assert!(stats.bytes > 0);
}

#[tokio::test]
async fn projection_lag_is_measured_at_scrape_time() {
    let f = fixture().await;
    // A projection that has applied nothing yet: its checkpoint is ours to move.
    let (tx, rx) = watch::channel(Position::START);
    f.state
        .app()
        .metrics()
        .register_projection("test.lagging", &f.store, rx)
        .unwrap();
    let w = f.writer("acme");
    let (_, c) = f
        .post("/api/v1/events", &w, &event("BAG1", "Bag", "BagLoaded"))
        .await;
    let head = f.store.head().await.unwrap();
    assert!(head.get() >= c["position"].as_u64().unwrap());
    let lagging = [("projection", "test.lagging")];
    let e = f.scrape().await;
    assert_eq!(
        e.value("tracktrace_projection_lag_positions", &lagging),
        Some(head.get() as f64)
    );
    // The age of the first event it has not applied (the tenants created by the fixture).
    let secs = e
        .value("tracktrace_projection_lag_seconds", &lagging)
        .unwrap();
    assert!(secs.is_finite() && secs > 0.0, "{secs}");
    // Caught up.
    tx.send_replace(head);
    let e = f.scrape().await;
    assert_eq!(
        e.value("tracktrace_projection_lag_positions", &lagging),
        Some(0.0)
    );
    assert_eq!(
        e.value("tracktrace_projection_lag_seconds", &lagging),
        Some(0.0)
    );
    // A name is registered once.
    let (_, rx2) = watch::channel(Position::START);
    assert!(
        f.state
            .app()
            .metrics()
            .register_projection("test.lagging", &f.store, rx2)
            .is_err()
    );
}

#[tokio::test]
async fn metrics_registered_by_other_modules_are_exported() {
    let f = fixture().await;
    let m = f.state.app().metrics();
    let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read = published.clone();
    m.register_counter(
        "tracktrace_published_total",
        "Events published",
        &["route"],
        move |s| s.push(&["sita"], read.load(Ordering::Relaxed) as f64),
    )
    .unwrap();
    m.register_breaker("nats:sita", || {
        Some(tracktrace_core::BreakerState::HalfOpen)
    })
    .unwrap();
    published.store(7, Ordering::Relaxed);
    let e = f.scrape().await;
    assert_eq!(e.types["tracktrace_published_total"], "counter");
    assert_eq!(
        e.value("tracktrace_published_total", &[("route", "sita")]),
        Some(7.0)
    );
    assert_eq!(
        e.value(
            "tracktrace_circuit_breaker_state",
            &[("component", "nats:sita")]
        ),
        Some(1.0)
    );
}

// ---------- format and access ----------

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let f = fixture().await;
    let w = f.writer("acme");
    let (_, c) = f
        .post("/api/v1/events", &w, &event("BAG1", "Bag", "BagLoaded"))
        .await;
    f.trace(&w, "BAG1", c["position"].as_u64().unwrap()).await;
    f.trace(&w, "BAG1", c["position"].as_u64().unwrap()).await;
    let text = f.scrape_text().await;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if !in_ci() => {
            eprintln!(
                "SKIPPED: promtool not runnable ({e}); install Debian's `prometheus` package \
                 (CI does, and requires this check)"
            );
            return;
        }
        Err(e) => panic!("promtool is required under CI=true: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn scraping_needs_a_metrics_read_token_of_the_system_tenant() {
    let f = fixture().await;
    for app in [router(f.state.clone()), ops_router(f.state.clone())] {
        let (s, h, _) = f.send(app.clone(), "GET", "/metrics", None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(h["content-type"], "application/problem+json");
        for token in [
            // A tenant's token would see every tenant's figures.
            f.token("acme", &["metrics:read"]),
            f.token(SYSTEM_TENANT, &["admin"]),
        ] {
            let (s, _, _) = f
                .send(app.clone(), "GET", "/metrics", Some(&token), None)
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN);
        }
        let (s, _, body) = f
            .send(app, "GET", "/metrics", Some(&f.scraper()), None)
            .await;
        assert_eq!(s, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("# TYPE tracktrace_events_ingested_total counter\n"));
    }
    let (_, _, doc) = f
        .send(router(f.state.clone()), "GET", "/openapi.json", None, None)
        .await;
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    assert!(doc["paths"]["/metrics"]["get"].is_object());
}
