//! The capture command path of the architecture document (6.1.1), built with the runtime:
//! validated `CreateEventCommand` → [`CommandBus`] → aggregate handler → event store append.
//! The event bus is the store's global log (subscriptions woken by head notifications), which
//! feeds the trace projection ([`crate::projection`]).
//!
//! Two aggregates:
//! - [`EntityClaim`] (stream `EntityClaim-<entityId>`) enforces "an entity keeps one type":
//!   its first event claims the type; a capture with another type is rejected (409).
//! - [`TrackedEntity`] (stream `Entity-<entityType>-<entityId>`) records the operational events.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{
    Aggregate, CommandBus, CommandError, CommandMeta, DomainEvent, EventStore, JsonCodec,
    Repository, TenantId,
};

use crate::domain::{Enrichment, OperationalEvent, StoredEvent};
use crate::error::ApiError;
use crate::schemas::SchemaRegistry;

/// `CreateEventCommand` of the architecture document: a validated event and its enrichment.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureCommand {
    /// The validated event.
    pub event: OperationalEvent,
    /// Server-side context.
    pub enrichment: Enrichment,
}

/// Result of a capture: where the event is (the original, for duplicates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Captured {
    /// Event id.
    pub event_id: String,
    /// Entity id.
    pub entity_id: String,
    /// Version in the entity's stream.
    pub version: u64,
    /// Global position (pass as `minPosition` to a trace query to read your write).
    pub position: u64,
    /// `true` when the event was already stored (same `eventId` or `dedupKey`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// The type claim of an entity id.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EntityClaim {
    entity_type: Option<String>,
}

/// Claims (or checks) an entity's type.
#[derive(Clone, Debug)]
pub struct ClaimType(pub String);

/// The entity's type was fixed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityTypeClaimed {
    /// The type.
    pub entity_type: String,
}

impl DomainEvent for EntityTypeClaimed {
    fn event_type(&self) -> &'static str {
        "EntityTypeClaimed"
    }
}

/// The entity already has another type.
#[derive(Debug, thiserror::Error)]
#[error("the entity has type {existing:?}; an entity keeps one entityType (got {requested:?})")]
pub struct TypeMismatch {
    /// The claimed type.
    pub existing: String,
    /// The type of the rejected capture.
    pub requested: String,
}

impl Aggregate for EntityClaim {
    const TYPE: &'static str = "EntityClaim";
    type Command = ClaimType;
    type Event = EntityTypeClaimed;
    type Error = TypeMismatch;
    type Codec = JsonCodec;

    fn handle(&self, cmd: &ClaimType) -> Result<Vec<EntityTypeClaimed>, TypeMismatch> {
        match &self.entity_type {
            None => Ok(vec![EntityTypeClaimed {
                entity_type: cmd.0.clone(),
            }]),
            Some(t) if *t == cmd.0 => Ok(Vec::new()),
            Some(t) => Err(TypeMismatch {
                existing: t.clone(),
                requested: cmd.0.clone(),
            }),
        }
    }

    fn apply(&mut self, e: &EntityTypeClaimed) {
        // The first claim wins; a later one cannot be produced by `handle`.
        if self.entity_type.is_none() {
            self.entity_type = Some(e.entity_type.clone());
        }
    }
}

/// An entity's event stream (the aggregate state is only its size: every event is accepted
/// once the type claim holds; late and out-of-order events are ordered by the read model).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrackedEntity {
    events: u64,
}

/// A capture the entity cannot take (the stream's type differs: defensive, the claim
/// already guarantees it).
#[derive(Debug, thiserror::Error)]
#[error("entity stream mismatch: {0}")]
pub struct CaptureRejected(String);

impl Aggregate for TrackedEntity {
    const TYPE: &'static str = "Entity";
    type Command = CaptureCommand;
    type Event = StoredEvent;
    type Error = CaptureRejected;
    type Codec = JsonCodec;

    fn handle(&self, cmd: &CaptureCommand) -> Result<Vec<StoredEvent>, CaptureRejected> {
        Ok(vec![StoredEvent::from_capture(&cmd.event, &cmd.enrichment)])
    }

    fn apply(&mut self, _e: &StoredEvent) {
        self.events += 1;
    }
}

/// The capture service: both command buses plus a cache of settled type claims.
#[derive(Clone)]
pub struct CaptureService {
    claims: CommandBus<EntityClaim>,
    entities: CommandBus<TrackedEntity>,
    /// Claims never change once stored, so a settled claim is cached without invalidation.
    known: moka::future::Cache<(TenantId, String), String>,
    /// Per-tenant attribute schemas (the validator step; absent: none enforced).
    schemas: Option<SchemaRegistry>,
}

impl std::fmt::Debug for CaptureService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureService").finish_non_exhaustive()
    }
}

fn command_error<E: std::error::Error + 'static>(e: CommandError<E>) -> ApiError {
    match e {
        CommandError::Validation { errors } => ApiError::Validation(
            errors
                .into_iter()
                .map(|f| crate::domain::FieldError::new(f.field, f.message))
                .collect(),
        ),
        CommandError::Rejected(r) => ApiError::Conflict(r.to_string()),
        CommandError::Conflict { stream, .. } => {
            tracing::warn!(%stream, "capture still conflicting after retries");
            ApiError::Contention {
                retry_after: std::time::Duration::from_secs(1),
            }
        }
        CommandError::Store(e) => e.into(),
        other => {
            tracing::error!(error = %other, "capture failed");
            ApiError::Internal
        }
    }
}

impl CaptureService {
    /// The service over `store` (wrap it in the runtime's circuit breaker first).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        let claims =
            CommandBus::new(Repository::<EntityClaim>::new(store.clone()).with_cache(100_000));
        let entities = CommandBus::new(Repository::<TrackedEntity>::new(store).with_cache(100_000));
        Self {
            claims,
            entities,
            known: moka::future::Cache::new(100_000),
            schemas: None,
        }
    }

    /// Enforces the tenants' attribute schemas on every capture through this service.
    pub fn with_schemas(mut self, schemas: SchemaRegistry) -> Self {
        self.schemas = Some(schemas);
        self
    }

    async fn claim(
        &self,
        tenant: &TenantId,
        entity_id: &str,
        entity_type: &str,
    ) -> Result<(), ApiError> {
        let key = (tenant.clone(), entity_id.to_owned());
        if let Some(t) = self.known.get(&key).await {
            return if t == entity_type {
                Ok(())
            } else {
                Err(ApiError::Conflict(
                    TypeMismatch {
                        existing: t,
                        requested: entity_type.to_owned(),
                    }
                    .to_string(),
                ))
            };
        }
        self.claims
            .execute(tenant, entity_id, ClaimType(entity_type.to_owned()))
            .await
            .map_err(command_error)?;
        self.known.insert(key, entity_type.to_owned()).await;
        Ok(())
    }

    /// Dispatches a capture: claim check, then the entity's command.
    pub async fn capture(&self, cmd: CaptureCommand) -> Result<Captured, ApiError> {
        let tenant = cmd.enrichment.tenant.clone();
        if let Some(schemas) = &self.schemas {
            let errors = schemas.check(&tenant, &cmd.event.event_type, &cmd.event.attributes);
            if !errors.is_empty() {
                return Err(ApiError::Validation(errors));
            }
        }
        self.claim(&tenant, &cmd.event.entity_id, &cmd.event.entity_type)
            .await?;
        let id = cmd.event.aggregate_id();
        let meta = CommandMeta {
            correlation_id: Some(cmd.enrichment.correlation_id.clone()),
            ..CommandMeta::default()
        };
        let entity_id = cmd.event.entity_id.clone();
        let out = self
            .entities
            .execute_with(&tenant, &id, cmd, meta)
            .await
            .map_err(command_error)?;
        let r = out.events.first().ok_or(ApiError::Internal)?;
        // A duplicate may name an event stored for another entity (reused event id or dedup
        // key): report where the original is.
        let entity_id = match r.stream.as_str().splitn(3, '-').nth(2) {
            Some(id) if out.duplicate => id.to_owned(),
            _ => entity_id,
        };
        Ok(Captured {
            event_id: r.event_id.to_string(),
            entity_id,
            version: r.version.get(),
            position: r.position.get(),
            duplicate: out.duplicate,
        })
    }
}
