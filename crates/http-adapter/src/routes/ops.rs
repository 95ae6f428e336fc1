//! Operations: `/healthz`, `/readyz`, `/metrics`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tracktrace_app::metrics::CONTENT_TYPE;

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::state::HttpState;

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = String)))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the event store answers. The `cache` component reports the trace view cache
/// (`"status": "degraded"` while Redis is unreachable, slow or skipped by its breaker: traces
/// are then served from the read model). With feature `nats`, a `propagation` component
/// reports route breakers, lags and bus ingestion; `"status": "degraded"` there (NATS down)
/// does not fail readiness either: captures are stored and published once NATS is back.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "Store unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn readyz(
    State(state): State<HttpState>,
) -> Result<Json<BTreeMap<&'static str, Value>>, ApiError> {
    let mut r = state.app().readiness().await?;
    r.insert("cache", state.cache().readiness());
    Ok(Json(r))
}

/// Technical metrics in the Prometheus text format (see `ops/README.md` for the contract).
/// Needs a token of the system tenant with the `metrics:read` scope.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String, content_type = "text/plain"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a metrics:read token of the system tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub(crate) async fn scrape_metrics(
    State(state): State<HttpState>,
    p: Principal,
) -> Result<Response, ApiError> {
    let body = state.app().scrape(&p).await?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        body,
    )
        .into_response())
}
