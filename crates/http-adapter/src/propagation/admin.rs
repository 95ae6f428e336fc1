//! The partner-route admin API: `/api/v1/admin/tenants/{id}/routes[/{name}]`, for admin
//! tokens of the system tenant (like tenant administration), merged into the server's router
//! and OpenAPI document by [`crate::api::api_routes`].

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracktrace_core::TenantId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::routes::{NewRoute, RouteInfo, validate};
use crate::api::{AppState, JsonBody, require_system_admin, require_tenant};
use crate::auth::Principal;
use crate::error::{ApiError, Problem};

fn require_admin(p: &Principal) -> Result<(), ApiError> {
    require_system_admin(p, "partner routes")
}

/// The tenant of the path: 400 if the id is invalid, 404 if there is no such tenant.
async fn existing_tenant(state: &AppState, id: &str) -> Result<TenantId, ApiError> {
    let tenant = TenantId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    require_tenant(state, &tenant).await?;
    Ok(tenant)
}

/// Add a partner route: which of the tenant's event types are published where. Publishing
/// starts at `fromPosition` (default: events captured from now on; `0` replays the whole
/// log). Idempotent: 200 if the same route exists; 409 if a different one has the name.
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants/{id}/routes",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    request_body = NewRoute,
    responses(
        (status = 201, description = "Added", body = RouteInfo),
        (status = 200, description = "The same route existed", body = RouteInfo),
        (status = 400, description = "Malformed JSON or invalid fields", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A different route has this name", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Event store unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn add_route(
    State(state): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<16384>,
) -> Result<Response, ApiError> {
    require_admin(&p)?;
    let spec = validate(&body)?;
    let tenant = existing_tenant(&state, &id).await?;
    let (route, created) = state
        .propagation()
        .routes()
        .add(&tenant, &spec, &p.subject)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(route)).into_response())
}

/// List a tenant's partner routes.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants/{id}/routes",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "The tenant's routes", body = Vec<RouteInfo>),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn list_routes(
    State(state): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<RouteInfo>>, ApiError> {
    require_admin(&p)?;
    let tenant = existing_tenant(&state, &id).await?;
    Ok(Json(state.propagation().routes().list(&tenant).await?))
}

/// One partner route.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants/{id}/routes/{name}",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Route name")),
    responses(
        (status = 200, description = "The route", body = RouteInfo),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or route", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn get_route(
    State(state): State<AppState>,
    p: Principal,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<RouteInfo>, ApiError> {
    require_admin(&p)?;
    let tenant = existing_tenant(&state, &id).await?;
    state
        .propagation()
        .routes()
        .get(&tenant, &name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("route {name} of tenant {tenant}")))
}

/// Remove a partner route: its publisher stops (in every process, as it reads the removal).
#[utoipa::path(
    delete,
    path = "/api/v1/admin/tenants/{id}/routes/{name}",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Route name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or route", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn remove_route(
    State(state): State<AppState>,
    p: Principal,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require_admin(&p)?;
    let tenant = existing_tenant(&state, &id).await?;
    state
        .propagation()
        .routes()
        .remove(&tenant, &name, &p.subject)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The route admin endpoints with their OpenAPI paths.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(add_route, list_routes))
        .routes(routes!(get_route, remove_route))
}
