//! The milestone operations front ends offer: rule administration (system admins) and the
//! watch of one entity (tenant readers).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{EventStore, EventStoreExt, SagaRecord, SagaRunner};
use tracktrace_domain::{entity_type_problem, format_micros};

use crate::access::{Actor, Admins, Scope};
use crate::error::AppError;
use crate::milestone::dispatch::CaptureDispatcher;
use crate::milestone::rules::{self, RuleView, SetOutcome, check_rule_id, validate_rule};
use crate::milestone::watch::{MilestoneCommand, MilestoneWatch, Watch, WatchState};
use crate::tenants::TenantRegistry;

/// What rule administration needs.
const RULES: Admins<'static> = Admins::System("milestone rules");

/// One watch as front ends show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Milestone rules and watches (cheap to clone).
#[derive(Clone)]
pub struct Milestones {
    store: Arc<dyn EventStore>,
    tenants: TenantRegistry,
}

impl std::fmt::Debug for Milestones {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Milestones").finish_non_exhaustive()
    }
}

impl Milestones {
    /// Over `store` (behind the circuit breaker), checking tenants in `tenants`.
    pub fn new(store: Arc<dyn EventStore>, tenants: TenantRegistry) -> Self {
        Self { store, tenants }
    }

    /// Creates or replaces rule `rule_id` of tenant `tenant` from its JSON body. Checked in
    /// this order: a system admin → the body (malformed, every field error) → the tenant.
    pub async fn put_rule(
        &self,
        actor: &Actor,
        tenant: &str,
        rule_id: &str,
        body: &[u8],
    ) -> Result<(RuleView, SetOutcome), AppError> {
        actor.require_admin(RULES, tenant)?;
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| AppError::Malformed(e.to_string()))?;
        let rule = validate_rule(rule_id, &value).map_err(AppError::Validation)?;
        let tenant = self.tenants.admin_target(actor, RULES, tenant).await?;
        let outcome = rules::set(&*self.store, &tenant, &rule, &actor.subject).await?;
        Ok((RuleView::of(&tenant, &rule), outcome))
    }

    /// The rules of a tenant, by id.
    pub async fn rules(&self, actor: &Actor, tenant: &str) -> Result<Vec<RuleView>, AppError> {
        let tenant = self.tenants.admin_target(actor, RULES, tenant).await?;
        let (rules, _) = rules::list(&*self.store, &tenant).await?;
        Ok(rules.iter().map(|r| RuleView::of(&tenant, r)).collect())
    }

    /// One rule.
    pub async fn rule(
        &self,
        actor: &Actor,
        tenant: &str,
        rule_id: &str,
    ) -> Result<RuleView, AppError> {
        actor.require_admin(RULES, tenant)?;
        check_rule_id(rule_id).map_err(|e| AppError::Validation(vec![e]))?;
        let tenant = self.tenants.admin_target(actor, RULES, tenant).await?;
        let (rules, _) = rules::list(&*self.store, &tenant).await?;
        rules
            .iter()
            .find(|r| r.id == rule_id)
            .map(|r| RuleView::of(&tenant, r))
            .ok_or_else(|| AppError::NotFound(format!("milestone rule {rule_id} of {tenant}")))
    }

    /// Removes a rule (not found if it does not exist).
    pub async fn remove_rule(
        &self,
        actor: &Actor,
        tenant: &str,
        rule_id: &str,
    ) -> Result<(), AppError> {
        actor.require_admin(RULES, tenant)?;
        check_rule_id(rule_id).map_err(|e| AppError::Validation(vec![e]))?;
        let tenant = self.tenants.admin_target(actor, RULES, tenant).await?;
        if rules::remove(&*self.store, &tenant, rule_id, &actor.subject).await? {
            Ok(())
        } else {
            Err(AppError::NotFound(format!(
                "milestone rule {rule_id} of {tenant}"
            )))
        }
    }

    /// The watches of one entity of the actor's tenant, as the watch last recorded them (not
    /// found if no rule has ever concerned the entity).
    pub async fn entity_watches(
        &self,
        actor: &Actor,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<EntityWatches, AppError> {
        actor.require(Scope::TraceRead)?;
        self.tenants.require_active(&actor.tenant).await?;
        if let Some(m) = entity_type_problem(entity_type) {
            return Err(AppError::field("entityType", m));
        }
        let not_found =
            || AppError::NotFound(format!("no milestone watch for {entity_type} {entity_id}"));
        let stream = SagaRunner::<MilestoneWatch, CaptureDispatcher>::stream_id(&format!(
            "{entity_type}-{entity_id}"
        ))
        .map_err(|_| not_found())?;
        let records = self
            .store
            .read_stream_forwards(&actor.tenant, &stream)
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
                    return Err(AppError::internal(format!(
                        "undecodable milestone watch record at {}: {err}",
                        e.position
                    )));
                }
            }
        }
        let mut open = Vec::new();
        let mut overdue = Vec::new();
        for w in current.rules.values() {
            open.extend(w.open.iter().map(WatchView::from));
            overdue.extend(w.overdue.iter().map(WatchView::from));
        }
        Ok(EntityWatches {
            entity_type: entity_type.to_owned(),
            entity_id: entity_id.to_owned(),
            open,
            overdue,
        })
    }
}
