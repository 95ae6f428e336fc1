//! The milestone API: rules (system admins) and the watch of one entity (tenant readers).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracktrace_app::milestone::rules::{RuleRequest, RuleView, SetOutcome};
use tracktrace_app::milestone::service::EntityWatches;

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::extract::JsonBody;
use crate::state::HttpState;

/// Create or replace a milestone rule of a tenant.
///
/// After `triggerEventType` on an entity of `entityType`, one of `expectedEventTypes` must
/// follow within `within` of the trigger's `occurredAt`, or the watch captures a
/// `MILESTONE_OVERDUE` event into the entity's trace (and a `MILESTONE_RECOVERED` when the
/// milestone arrives after all). Applies to milestones recorded after the rule.
#[utoipa::path(
    put,
    path = "/api/v1/admin/tenants/{id}/milestone-rules/{ruleId}",
    tag = "milestones",
    params(
        ("id" = String, Path, description = "Tenant id"),
        ("ruleId" = String, Path, description = "Rule id: 1–64 of A–Z a–z 0–9 _ . -"),
    ),
    request_body = RuleRequest,
    responses(
        (status = 201, description = "Created", body = RuleView),
        (status = 200, description = "Replaced, or unchanged", body = RuleView),
        (status = 400, description = "Malformed JSON or invalid fields (every one listed)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Too many rules, or changed concurrently", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn put_rule(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, rule_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<8192>,
) -> Result<Response, ApiError> {
    let (view, outcome) = state
        .app()
        .milestones()
        .put_rule(&p, &id, &rule_id, &body)
        .await?;
    let status = match outcome {
        SetOutcome::Created => StatusCode::CREATED,
        SetOutcome::Replaced | SetOutcome::Unchanged => StatusCode::OK,
    };
    Ok((status, Json(view)).into_response())
}

/// List a tenant's milestone rules.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants/{id}/milestone-rules",
    tag = "milestones",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "The rules, by id", body = Vec<RuleView>),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_rules(
    State(state): State<HttpState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<RuleView>>, ApiError> {
    Ok(Json(state.app().milestones().rules(&p, &id).await?))
}

/// One milestone rule.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants/{id}/milestone-rules/{ruleId}",
    tag = "milestones",
    params(
        ("id" = String, Path, description = "Tenant id"),
        ("ruleId" = String, Path, description = "Rule id"),
    ),
    responses(
        (status = 200, description = "The rule", body = RuleView),
        (status = 400, description = "Invalid rule id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or rule", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_rule(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, rule_id)): Path<(String, String)>,
) -> Result<Json<RuleView>, ApiError> {
    Ok(Json(
        state.app().milestones().rule(&p, &id, &rule_id).await?,
    ))
}

/// Remove a milestone rule: no new watches; its open watches end without an alarm.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/tenants/{id}/milestone-rules/{ruleId}",
    tag = "milestones",
    params(
        ("id" = String, Path, description = "Tenant id"),
        ("ruleId" = String, Path, description = "Rule id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Invalid rule id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or rule", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn delete_rule(
    State(state): State<HttpState>,
    p: Principal,
    Path((id, rule_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .app()
        .milestones()
        .remove_rule(&p, &id, &rule_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The milestone watches of one entity, as the watch last recorded them (404 if no rule has
/// ever concerned the entity).
#[utoipa::path(
    get,
    path = "/api/v1/milestone-watches/{entityType}/{entityId}",
    tag = "milestones",
    params(
        ("entityType" = String, Path, description = "Entity type"),
        ("entityId" = String, Path, description = "Entity id"),
    ),
    responses(
        (status = 200, description = "Open and overdue watches", body = EntityWatches),
        (status = 400, description = "Invalid entity type", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing trace:read, suspended or unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No watch for this entity", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn entity_watches(
    State(state): State<HttpState>,
    p: Principal,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Result<Json<EntityWatches>, ApiError> {
    Ok(Json(
        state
            .app()
            .milestones()
            .entity_watches(&p, &entity_type, &entity_id)
            .await?,
    ))
}
