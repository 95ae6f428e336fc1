//! Tenant administration (`/api/v1/admin/tenants…`) and the tenants' attribute schemas
//! (`/api/v1/admin/tenants/{id}/schemas…`), for system admins.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tracktrace_app::app::TENANT_ADMIN;
use tracktrace_app::schemas::{MAX_SCHEMA_BYTES, SchemaInfo};
use tracktrace_app::tenants::TenantInfo;
use tracktrace_domain::FieldError;

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::extract::JsonBody;
use crate::state::HttpState;

/// Body of a tenant creation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewTenant {
    /// Tenant id: 1–64 of `A–Z a–z 0–9 _ . -`, not starting with `_`.
    pub id: String,
}

/// Create a tenant (idempotent: 200 if it exists).
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants",
    tag = "admin",
    request_body = NewTenant,
    responses(
        (status = 201, description = "Created", body = TenantInfo),
        (status = 200, description = "Already existed", body = TenantInfo),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create_tenant(
    State(state): State<HttpState>,
    p: Principal,
    JsonBody(body): JsonBody<4096>,
) -> Result<Response, ApiError> {
    p.require_system_admin(TENANT_ADMIN)?;
    let req: NewTenant = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Validation(vec![FieldError::new("id", e.to_string())]))?;
    let (info, created) = state.app().create_tenant(&p, &req.id).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

/// List tenants.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants",
    tag = "admin",
    responses(
        (status = 200, description = "Every tenant", body = Vec<TenantInfo>),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_tenants(
    State(state): State<HttpState>,
    p: Principal,
) -> Result<Json<Vec<TenantInfo>>, ApiError> {
    Ok(Json(state.app().list_tenants(&p).await?))
}

/// Suspend a tenant: every request of its tokens gets 403 until resumed.
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants/{id}/suspend",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Suspended", body = TenantInfo),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn suspend_tenant(
    State(state): State<HttpState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<TenantInfo>, ApiError> {
    Ok(Json(state.app().set_suspended(&p, &id, true).await?))
}

/// Resume a suspended tenant.
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants/{id}/resume",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Active", body = TenantInfo),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn resume_tenant(
    State(state): State<HttpState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<TenantInfo>, ApiError> {
    Ok(Json(state.app().set_suspended(&p, &id, false).await?))
}

/// The attribute schemas of a tenant, by event type.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants/{id}/schemas",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Registered schemas", body = Vec<SchemaInfo>),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_schemas(
    State(state): State<HttpState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<SchemaInfo>>, ApiError> {
    Ok(Json(state.app().list_schemas(&p, &id).await?))
}

/// Register (or replace) the JSON Schema that `attributes` of an event type must satisfy for
/// a tenant. The body is the schema itself. Captures violating it get 400 with one field
/// error per violation.
#[utoipa::path(
    put,
    path = "/api/v1/admin/tenants/{id}/schemas/{eventType}",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id"), ("eventType" = String, Path, description = "Event type")),
    request_body(content = Object, content_type = "application/json", description = "A JSON Schema (draft 2020-12 unless `$schema` says otherwise); no remote references"),
    responses(
        (status = 200, description = "Registered", body = SchemaInfo),
        (status = 400, description = "Not a usable schema", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn put_schema(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, event_type)): Path<(String, String)>,
    JsonBody(body): JsonBody<{ MAX_SCHEMA_BYTES }>,
) -> Result<Json<SchemaInfo>, ApiError> {
    Ok(Json(
        state.app().put_schema(&p, &id, &event_type, &body).await?,
    ))
}

/// Remove the schema of an event type: its captures accept any `attributes` object again.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/tenants/{id}/schemas/{eventType}",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id"), ("eventType" = String, Path, description = "Event type")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or no schema", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn delete_schema(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, event_type)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.app().delete_schema(&p, &id, &event_type).await?;
    Ok(StatusCode::NO_CONTENT)
}
