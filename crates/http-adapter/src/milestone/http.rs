//! The milestone API: rules (system admins) and the watch of one entity (tenant readers).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracktrace_core::{EventStoreExt, SagaRecord, SagaRunner, TenantId};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::rules::{self, RuleRequest, RuleView, SetOutcome, check_rule_id, validate_rule};
use super::watch::{CaptureDispatcher, MilestoneCommand, MilestoneWatch, Watch, WatchState};
use crate::api::{AppState, JsonBody, require_system_admin, require_tenant};
use crate::auth::{Principal, Scope};
use crate::domain::{FieldError, entity_type_problem, format_micros};
use crate::error::{ApiError, Problem};

fn require_admin(p: &Principal) -> Result<(), ApiError> {
    require_system_admin(p, "milestone rules")
}

/// The tenant of the path, which must exist (404 otherwise).
async fn existing_tenant(state: &AppState, id: &str) -> Result<TenantId, ApiError> {
    let tenant = TenantId::parse(id)
        .map_err(|e| ApiError::Validation(vec![FieldError::new("tenant", e.to_string())]))?;
    require_tenant(state, &tenant).await?;
    Ok(tenant)
}

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
async fn put_rule(
    State(state): State<AppState>,
    p: Principal,
    Path((id, rule_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<8192>,
) -> Result<Response, ApiError> {
    require_admin(&p)?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::Malformed(e.to_string()))?;
    let rule = validate_rule(&rule_id, &value).map_err(ApiError::Validation)?;
    let tenant = existing_tenant(&state, &id).await?;
    let outcome = rules::set(&**state.store(), &tenant, &rule, &p.subject).await?;
    let status = match outcome {
        SetOutcome::Created => StatusCode::CREATED,
        SetOutcome::Replaced | SetOutcome::Unchanged => StatusCode::OK,
    };
    Ok((status, Json(RuleView::of(&tenant, &rule))).into_response())
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
async fn list_rules(
    State(state): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<RuleView>>, ApiError> {
    require_admin(&p)?;
    let tenant = existing_tenant(&state, &id).await?;
    let (rules, _) = rules::list(&**state.store(), &tenant).await?;
    Ok(Json(
        rules.iter().map(|r| RuleView::of(&tenant, r)).collect(),
    ))
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
async fn get_rule(
    State(state): State<AppState>,
    p: Principal,
    Path((id, rule_id)): Path<(String, String)>,
) -> Result<Json<RuleView>, ApiError> {
    require_admin(&p)?;
    check_rule_id(&rule_id).map_err(|e| ApiError::Validation(vec![e]))?;
    let tenant = existing_tenant(&state, &id).await?;
    let (rules, _) = rules::list(&**state.store(), &tenant).await?;
    rules
        .iter()
        .find(|r| r.id == rule_id)
        .map(|r| Json(RuleView::of(&tenant, r)))
        .ok_or_else(|| ApiError::NotFound(format!("milestone rule {rule_id} of {tenant}")))
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
async fn delete_rule(
    State(state): State<AppState>,
    p: Principal,
    Path((id, rule_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require_admin(&p)?;
    check_rule_id(&rule_id).map_err(|e| ApiError::Validation(vec![e]))?;
    let tenant = existing_tenant(&state, &id).await?;
    if rules::remove(&**state.store(), &tenant, &rule_id, &p.subject).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "milestone rule {rule_id} of {tenant}"
        )))
    }
}

/// One watch as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WatchView {
    /// Rule id.
    pub rule: String,
    /// Event types that satisfy it.
    pub expected_event_types: Vec<String>,
    /// The trigger's event type.
    pub trigger_event_type: String,
    /// The trigger's event id.
    pub trigger_event_id: String,
    /// The trigger's `occurredAt`, UTC.
    pub trigger_occurred_at: String,
    /// When the expected milestone is (was) due, UTC.
    pub deadline: String,
}

impl From<&Watch> for WatchView {
    fn from(w: &Watch) -> Self {
        Self {
            rule: w.rule.id.clone(),
            expected_event_types: w.rule.expected_event_types.clone(),
            trigger_event_type: w.trigger.event_type.clone(),
            trigger_event_id: w.trigger.event_id.clone(),
            trigger_occurred_at: format_micros(w.trigger.occurred_at_us),
            deadline: format_micros(w.deadline_us),
        }
    }
}

/// The milestone watches of one entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityWatches {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Watches waiting for their milestone (deadline not yet passed).
    pub open: Vec<WatchView>,
    /// Watches whose `MILESTONE_OVERDUE` was raised and not yet recovered.
    pub overdue: Vec<WatchView>,
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
async fn entity_watches(
    State(state): State<AppState>,
    p: Principal,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Result<Json<EntityWatches>, ApiError> {
    p.require(Scope::TraceRead)?;
    state.tenants().require_active(&p.tenant).await?;
    if let Some(m) = entity_type_problem(&entity_type) {
        return Err(ApiError::Validation(vec![FieldError::new("entityType", m)]));
    }
    let not_found =
        || ApiError::NotFound(format!("no milestone watch for {entity_type} {entity_id}"));
    let stream = SagaRunner::<MilestoneWatch, CaptureDispatcher>::stream_id(&format!(
        "{entity_type}-{entity_id}"
    ))
    .map_err(|_| not_found())?;
    let records = state
        .store()
        .read_stream_forwards(&p.tenant, &stream)
        .await?;
    if records.is_empty() {
        return Err(not_found());
    }
    let mut current = WatchState::default();
    for e in &records {
        if e.event_type != "SagaStateChanged" {
            continue;
        }
        match serde_json::from_slice::<SagaRecord<WatchState, MilestoneCommand>>(&e.payload) {
            Ok(SagaRecord::StateChanged { state }) => current = state,
            Ok(_) => {}
            Err(err) => {
                tracing::error!(position = %e.position, error = %err, "undecodable milestone watch record");
                return Err(ApiError::Internal);
            }
        }
    }
    let mut open = Vec::new();
    let mut overdue = Vec::new();
    for w in current.rules.values() {
        open.extend(w.open.iter().map(WatchView::from));
        overdue.extend(w.overdue.iter().map(WatchView::from));
    }
    Ok(Json(EntityWatches {
        entity_type,
        entity_id,
        open,
        overdue,
    }))
}

/// The milestone routes and their OpenAPI description (merged into [`crate::api::api_routes`]).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_rules))
        .routes(routes!(put_rule, get_rule, delete_rule))
        .routes(routes!(entity_watches))
}
