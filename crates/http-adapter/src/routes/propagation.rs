//! The partner-route admin API: `/api/v1/admin/tenants/{id}/routes[/{name}]`, for admin
//! tokens of the system tenant (like tenant administration).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracktrace_app::propagation::routes::{NewRoute, RouteInfo};

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::extract::JsonBody;
use crate::state::HttpState;

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
pub(crate) async fn add_route(
    State(state): State<HttpState>,
    p: Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<16384>,
) -> Result<Response, ApiError> {
    let (route, created) = state.app().add_route(&p, &id, &body).await?;
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
pub(crate) async fn list_routes(
    State(state): State<HttpState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<RouteInfo>>, ApiError> {
    Ok(Json(state.app().list_routes(&p, &id).await?))
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
pub(crate) async fn get_route(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<RouteInfo>, ApiError> {
    Ok(Json(state.app().route(&p, &id, &name).await?))
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
        (status = 400, description = "Invalid tenant id or route name", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or route", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove_route(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.app().remove_route(&p, &id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
