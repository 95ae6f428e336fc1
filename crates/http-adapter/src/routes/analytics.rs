//! The analytics API: on-demand runs (admins), KPI windows and anomalies of the caller's
//! tenant (`metrics:read`), per-tenant configuration (system admins, or the tenant's own).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tracktrace_app::Scope;
use tracktrace_app::analytics::{
    AnomalyDto, KpiWindow, RunRequest, RunResult, TenantAnalyticsConfig,
};
use tracktrace_domain::FieldError;

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::extract::JsonBody;
use crate::state::HttpState;

/// `from`/`to` query of the KPI and anomaly listings.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// Windows starting at or after this instant (RFC 3339); default: 24 hours before `to`.
    pub from: Option<String>,
    /// Windows starting before this instant (RFC 3339); default: now.
    pub to: Option<String>,
}

/// Run the analytics batch on demand.
#[utoipa::path(
    post,
    path = "/api/v1/analytics/run",
    tag = "analytics",
    request_body(content = RunRequest, description = "Optional window range and tenant"),
    responses(
        (status = 200, description = "What was computed (or found stored) per tenant and window", body = RunResult),
        (status = 400, description = "Bad from/to/tenant (field errors)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin (of that tenant)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Event store unavailable, or as many on-demand runs in progress as the server admits (`/problems/busy`); see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn run_analytics(
    State(state): State<HttpState>,
    p: Principal,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<RunResult>, ApiError> {
    p.require(Scope::Admin)?;
    // The body is optional: empty means "the last closed window".
    let req: RunRequest = if body.is_empty() {
        RunRequest::default()
    } else {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        if body.len() > 4096 {
            return Err(ApiError::PayloadTooLarge);
        }
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Validation(vec![FieldError::new("body", e.to_string())]))?
    };
    let app = state.app();
    Ok(Json(
        app.analytics().run_for(&p, app.tenants(), &req).await?,
    ))
}

fn range(q: Result<Query<RangeQuery>, QueryRejection>) -> Result<RangeQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::Validation(vec![FieldError::new("query", e.body_text())]))
}

/// List the stored KPI windows of the caller's tenant.
#[utoipa::path(
    get,
    path = "/api/v1/kpis",
    tag = "analytics",
    params(RangeQuery),
    responses(
        (status = 200, description = "KPI windows starting in the range, oldest first", body = Vec<KpiWindow>),
        (status = 400, description = "Bad from/to (field errors)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing metrics:read scope, suspended or unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_kpis(
    State(state): State<HttpState>,
    p: Principal,
    q: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<Vec<KpiWindow>>, ApiError> {
    let app = state.app();
    app.authorize(&p, Scope::MetricsRead).await?;
    let q = range(q)?;
    Ok(Json(
        app.analytics()
            .kpis_for(&p, app.tenants(), q.from.as_deref(), q.to.as_deref())
            .await?,
    ))
}

/// List the anomalies of the caller's tenant.
#[utoipa::path(
    get,
    path = "/api/v1/anomalies",
    tag = "analytics",
    params(RangeQuery),
    responses(
        (status = 200, description = "Anomalies of windows starting in the range, oldest first", body = Vec<AnomalyDto>),
        (status = 400, description = "Bad from/to (field errors)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing metrics:read scope, suspended or unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_anomalies(
    State(state): State<HttpState>,
    p: Principal,
    q: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<Vec<AnomalyDto>>, ApiError> {
    let app = state.app();
    app.authorize(&p, Scope::MetricsRead).await?;
    let q = range(q)?;
    Ok(Json(
        app.analytics()
            .anomalies_for(&p, app.tenants(), q.from.as_deref(), q.to.as_deref())
            .await?,
    ))
}

/// A tenant's analytics configuration.
#[utoipa::path(
    get,
    path = "/api/v1/admin/analytics/config/{tenant}",
    tag = "analytics",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "The configuration (defaults until one is set)", body = TenantAnalyticsConfig),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin of that tenant", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_config(
    State(state): State<HttpState>,
    p: Principal,
    Path(tenant): Path<String>,
) -> Result<Json<TenantAnalyticsConfig>, ApiError> {
    let app = state.app();
    Ok(Json(
        app.analytics()
            .tenant_config_for(&p, app.tenants(), &tenant)
            .await?,
    ))
}

/// Replace a tenant's analytics configuration (milestone pairs, late threshold, detector).
#[utoipa::path(
    put,
    path = "/api/v1/admin/analytics/config/{tenant}",
    tag = "analytics",
    params(("tenant" = String, Path, description = "Tenant id")),
    request_body = TenantAnalyticsConfig,
    responses(
        (status = 200, description = "Stored", body = TenantAnalyticsConfig),
        (status = 400, description = "Invalid configuration (field errors)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin of that tenant", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn put_config(
    State(state): State<HttpState>,
    p: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<16384>,
) -> Result<Response, ApiError> {
    let app = state.app();
    let cfg = app
        .analytics()
        .set_tenant_config_for(&p, app.tenants(), &tenant, &body)
        .await?;
    Ok((StatusCode::OK, Json(cfg)).into_response())
}
