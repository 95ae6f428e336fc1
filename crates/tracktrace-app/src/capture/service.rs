//! The capture service: the command side of a capture (architecture 6.1.1), built with the
//! runtime: validated [`CaptureCommand`] → [`CommandBus`] → aggregate handler → event store
//! append. The event bus is the store's global log (subscriptions woken by head
//! notifications), which feeds the trace projection ([`crate::trace`]).
//!
//! Order per capture: the tenant's attribute schema (if one is registered for the event type)
//! → the entity's type claim ([`EntityClaim`], cached once settled) → the entity's stream
//! ([`TrackedEntity`]). Every front end reaches it through
//! [`CapturePipeline`](crate::capture::pipeline::CapturePipeline), so HTTP, bus ingestion and
//! the milestone saga enforce the same schemas and claims.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{
    CacheMiss, CommandBus, CommandError, CommandMeta, EventStore, Repository, TenantId,
};

use crate::capture::aggregates::{
    CaptureCommand, ClaimType, EntityClaim, TrackedEntity, TypeMismatch,
};
use crate::error::AppError;
use crate::schemas::SchemaRegistry;

/// Result of a capture: where the event is (the original, for duplicates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

fn command_error<E: std::error::Error + 'static>(e: CommandError<E>) -> AppError {
    match e {
        CommandError::Validation { errors } => AppError::Validation(
            errors
                .into_iter()
                .map(|f| tracktrace_domain::FieldError::new(f.field, f.message))
                .collect(),
        ),
        CommandError::Rejected(r) => AppError::Conflict(r.to_string()),
        CommandError::Conflict { stream, .. } => {
            tracing::warn!(%stream, "capture still conflicting after retries");
            AppError::Contention(format!("{stream} is being changed concurrently"))
        }
        CommandError::Store(e) => e.into(),
        other => {
            tracing::error!(error = %other, "capture failed");
            AppError::internal(other)
        }
    }
}

impl CaptureService {
    /// The service over `store` (wrap it in the runtime's circuit breaker first).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        let claims = CommandBus::new(
            Repository::<EntityClaim>::new(store.clone())
                .with_cache(100_000)
                .on_cache_miss(CacheMiss::AssumeNew),
        );
        let entities = CommandBus::new(
            Repository::<TrackedEntity>::new(store)
                .with_cache(100_000)
                .on_cache_miss(CacheMiss::AssumeNew),
        );
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
    ) -> Result<(), AppError> {
        let key = (tenant.clone(), entity_id.to_owned());
        if let Some(t) = self.known.get(&key).await {
            return if t == entity_type {
                Ok(())
            } else {
                Err(AppError::Conflict(
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
    pub async fn capture(&self, cmd: CaptureCommand) -> Result<Captured, AppError> {
        let tenant = cmd.enrichment.tenant.clone();
        if let Some(schemas) = &self.schemas {
            let errors = schemas.check(&tenant, &cmd.event.event_type, &cmd.event.attributes);
            if !errors.is_empty() {
                return Err(AppError::Validation(errors));
            }
        }
        self.claim(&tenant, &cmd.event.entity_id, &cmd.event.entity_type)
            .await?;
        let id = cmd.event.aggregate_id();
        let meta = CommandMeta::new().with_correlation_id(cmd.enrichment.correlation_id.clone());
        let entity_id = cmd.event.entity_id.clone();
        let out = self
            .entities
            .execute_with(&tenant, &id, cmd, meta)
            .await
            .map_err(command_error)?;
        let r = out
            .events
            .first()
            .ok_or_else(|| AppError::internal("a capture stored no event"))?;
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
