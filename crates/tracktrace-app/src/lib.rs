//! The Track & Trace application, transport-independent: operational events (bags, ULDs,
//! flights…) captured, validated, enriched, de-duplicated and stored in a tracktrace event
//! store, projected into per-entity timelines, watched for overdue milestones, aggregated into
//! KPIs, and propagated to partners. Front ends (the HTTP adapter `tracktrace-http`, bus
//! ingestion, imports) call it with an [`Actor`] and get typed results or an [`AppError`];
//! no transport type reaches it.
//!
//! ```
//! use std::sync::Arc;
//! use tracktrace_app::{Actor, App, AppConfig, CaptureRequest, Scope};
//! use tracktrace_core::{InMemoryStore, TenantId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryStore::new());
//! let app = App::new(store.clone(), store, None, AppConfig::default());
//! let acme = TenantId::parse("acme")?;
//! app.tenants().create(&acme, "docs").await?;
//!
//! let agent = Actor::new("BRS-MAD", acme.clone(), vec![Scope::EventsWrite]);
//! let body = br#"{"entityId": "0125123456", "entityType": "Bag", "eventType": "BagLoaded",
//!     "occurredAt": "2026-11-28T08:15:00+01:00", "location": {"code": "MAD"},
//!     "dedupKey": "BRS-MAD/4711"}"#;
//! let captured = app.capture(&agent, CaptureRequest::json(body)).await?;
//! assert_eq!(captured.version, 1);
//!
//! // The same event sent again (same dedupKey) is recognised, not stored twice.
//! let again = app.capture(&agent, CaptureRequest::json(body)).await?;
//! assert!(again.duplicate && again.position == captured.position);
//!
//! // Invalid input is a typed error listing every field.
//! let err = app.capture(&agent, CaptureRequest::json(b"{}")).await.unwrap_err();
//! assert!(!err.is_retryable());
//! # Ok(())
//! # }
//! ```
//!
//! # Map
//! - [`app`]: the [`App`] facade every front end calls; [`access`]: [`Actor`], scopes and the
//!   admin rules; [`error`]: [`AppError`] with [`AppError::is_retryable`].
//! - [`capture`]: the capture pipeline (6.1.1) and its aggregates.
//! - [`trace`]: the trace read model, its projection, queries, views and live entries (6.1.2).
//! - [`tenants`], [`schemas`]: registries kept as events of the system tenant, followed into
//!   memory by [`follow`].
//! - [`milestone`]: expected-milestone rules and the saga that raises overdue alarms.
//! - [`analytics`]: KPI windows and anomalies (6.1.3, 6.2.3), results stored as events.
//! - [`propagation`]: partner routes, outbox publishers and bus ingestion (feature `nats`).
//! - [`metrics`]: the Prometheus registry, the `Metered` store wrapper and data freshness.
//! - [`background`]: assembling the application over opened stores and running its
//!   background work, with leadership through the store's leases.
//!
//! # Features
//! - `openapi`: `utoipa::ToSchema` on the request and response types (for documenting
//!   bindings).
//! - `nats`: NATS JetStream propagation and bus ingestion.
//! - `influxdb`: KPIs and anomalies written to InfluxDB 1.x.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod access;
pub mod analytics;
pub mod app;
pub mod background;
pub mod capture;
pub mod error;
pub mod follow;
pub mod metrics;
pub mod milestone;
pub mod propagation;
pub mod schemas;
pub mod tenants;
pub mod trace;

#[cfg(test)]
mod test_support;

pub use access::{Actor, SYSTEM_TENANT, Scope};
pub use app::{App, AppConfig};
pub use capture::{CaptureRequest, Captured};
pub use error::AppError;
