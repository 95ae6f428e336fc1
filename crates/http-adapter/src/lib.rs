//! The Track & Trace reference server: operational events (bags, ULDs, flights…) captured
//! over REST, validated, enriched, de-duplicated and stored in a tracktrace event store,
//! projected into per-entity timelines and served back as traces, with JWT auth, tenants,
//! a view cache and Server-Sent Events.
//!
//! ```
//! use std::sync::Arc;
//! use axum::body::Body;
//! use axum::http::Request;
//! use tower::ServiceExt;
//! use tracktrace_core::{InMemoryStore, Position, TenantId};
//! use tracktrace_http::api::{ApiConfig, AppState, router};
//! use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
//! use tracktrace_http::cache::{CacheConfig, TraceCache};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryStore::new());
//! let keys = JwtKeys::from_secret(b"a-secret-of-at-least-32-bytes-long!")?;
//! // The trace projection: event bus (the store's log) → read model, with its checkpoint.
//! let (progress, seen) = tokio::sync::watch::channel(Position::START);
//! tokio::spawn(tracktrace_http::projection::run(store.clone(), store.clone(), progress));
//! let state = AppState::new(
//!     store.clone(), store.clone(), keys.clone(),
//!     TraceCache::local(CacheConfig::default()), Some(seen), ApiConfig::default(),
//! );
//! state.tenants().create(&TenantId::parse("acme")?, "docs").await?;
//! let token = keys.sign(&Claims {
//!     sub: "docs".into(), tenant: "acme".into(),
//!     scopes: vec!["events:write".into(), "trace:read".into()], exp: now_secs() + 60,
//! });
//!
//! let capture = Request::post("/api/v1/events")
//!     .header("authorization", format!("Bearer {token}"))
//!     .header("content-type", "application/json")
//!     .body(Body::from(r#"{"entityId": "0125123456", "entityType": "Bag",
//!         "eventType": "BagLoaded", "occurredAt": "2026-11-28T08:15:00+01:00",
//!         "location": {"code": "MAD"}}"#))?;
//! let res = router(state.clone()).oneshot(capture).await?;
//! assert_eq!(res.status(), 201);
//! let body = axum::body::to_bytes(res.into_body(), usize::MAX).await?;
//! let position = serde_json::from_slice::<serde_json::Value>(&body)?["position"].clone();
//!
//! // Read your write: wait (bounded) until the read model includes that position.
//! let trace = Request::get(format!("/api/v1/trace/0125123456?minPosition={position}"))
//!     .header("authorization", format!("Bearer {token}"))
//!     .body(Body::empty())?;
//! let res = router(state).oneshot(trace).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! # Architecture (arc42 §6)
//! - **Capture (6.1.1)**: [`api`] → [`domain::validate_capture`] (every field error) →
//!   [`capture::CaptureService`]: the runtime's `CommandBus` over two aggregates,
//!   [`capture::EntityClaim`] (an entity keeps one type) and [`capture::TrackedEntity`]
//!   (appends the event) → event store → the store's global log is the event bus →
//!   [`projection`] updates the read model and its checkpoint atomically.
//! - **Trace (6.1.2)**: [`auth`] → entity status (generation) → [`cache`] → [`timeline`]
//!   read model → view (`full`, `compact`, `legs`) → cache.
//! - **Tenants**: [`tenants`], stored as events of the system tenant; optional per-tenant
//!   JSON Schemas of `attributes` per event type: [`schemas`].
//! - **Analytics (6.1.3, 6.2.3)**: [`analytics`]: hourly and on-demand KPI windows per tenant
//!   read with `EventStore::position_at`, anomaly detection, results stored as events,
//!   `GET /api/v1/kpis` and `/api/v1/anomalies`, optional InfluxDB output.
//! - **Milestone watch**: [`milestone`], a saga raising `MILESTONE_OVERDUE` /
//!   `MILESTONE_RECOVERED` into entity traces by per-tenant rules.
//! - **Metrics**: [`metrics`], Prometheus text on `GET /metrics` (contract in `ops/README.md`).
//! - **Propagation (feature `nats`)**: [`propagation`]: per-tenant partner routes, one outbox
//!   publisher per route to NATS JetStream, and bus ingestion into the capture pipeline.
//! - **Server**: [`server`] (store selection, roles, graceful shutdown) behind the
//!   `tracktrace-server` binary.
//!
//! # Features
//! - `redis`: Redis as the trace view cache (`--cache redis://…`).
//! - `nats`: NATS JetStream propagation and bus ingestion (`--nats-publish`, `--nats-ingest`)
//!   and the partner-route admin API.
//! - `influxdb`: KPIs and anomalies written to InfluxDB (`--influx-url`).

pub mod analytics;
pub mod api;
pub mod auth;
pub mod cache;
pub mod capture;
pub mod client;
pub use tracktrace_domain as domain;
pub mod error;
pub mod metrics;
pub mod milestone;
pub mod projection;
pub mod propagation;
pub mod schemas;
pub mod server;
pub mod tenants;
pub mod timeline;
