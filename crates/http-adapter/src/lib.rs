//! The REST adapter of the tracktrace Track & Trace application (`tracktrace-app`): axum
//! routes over the application's operations, HS256 JWT bearer authentication, errors as
//! RFC 9457 problem documents, a cache-aside trace-view cache (in-process, or Redis with
//! feature `redis`), Server-Sent Events, and an OpenAPI document generated from the handlers.
//! It knows no storage backend: the server binary (`tracktrace-server`) opens the store.
//!
//! ```
//! use std::sync::Arc;
//! use axum::body::Body;
//! use axum::http::Request;
//! use tower::ServiceExt;
//! use tracktrace_app::{App, AppConfig};
//! use tracktrace_core::{InMemoryStore, Position, TenantId};
//! use tracktrace_http::auth::{Claims, JwtKeys, now_secs};
//! use tracktrace_http::cache::{CacheConfig, TraceCache};
//! use tracktrace_http::{HttpState, router};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryStore::new());
//! // The trace projection: event bus (the store's log) → read model, with its checkpoint.
//! let (progress, seen) = tokio::sync::watch::channel(Position::START);
//! tokio::spawn(tracktrace_app::trace::runner::run(store.clone(), store.clone(), progress));
//! let app = App::new(store.clone(), store.clone(), Some(seen), AppConfig::default());
//! app.tenants().create(&TenantId::parse("acme")?, "docs").await?;
//! let keys = JwtKeys::from_secret(b"a-secret-of-at-least-32-bytes-long!")?;
//! let state = HttpState::new(app, keys.clone(), TraceCache::local(CacheConfig::default()));
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
//! # Map
//! - [`openapi`]: [`router`] / [`ops_router`] and the OpenAPI document.
//! - [`routes`]: the handlers, one module per resource (capture, trace + SSE, tenants and
//!   schemas, milestones, analytics, partner routes with feature `nats`, operations). Each
//!   extracts, calls the application, and maps the result.
//! - [`auth`] (JWT → [`Principal`](auth::Principal) wrapping the application's `Actor`),
//!   [`extract`] (JSON bodies with limits, the correlation header), [`error`] ([`ApiError`],
//!   `From<AppError>`), [`state`] ([`HttpState`]), [`cache`] (trace views, keyed by the
//!   entity's generation), [`client`] (a minimal HTTP/1.1 client for the CLI and tests).
//!
//! # Features
//! - `redis`: Redis as the trace view cache.
//! - `nats`: the partner-route admin API.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
pub mod cache;
pub mod client;
pub mod error;
pub mod extract;
pub mod layers;
pub mod openapi;
pub mod routes;
pub mod state;

pub use error::ApiError;
pub use openapi::{ops_router, router};
pub use state::HttpState;
