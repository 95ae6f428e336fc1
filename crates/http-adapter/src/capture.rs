//! The capture command: an enriched, validated operational event to append to its entity's
//! stream, and the rule that an entity keeps one type.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, ReadStream, TenantId,
};

use crate::domain::{
    ENTITY_CLAIMED, Enrichment, OperationalEvent, StoredEvent, entity_claim_stream,
};
use crate::error::ApiError;

/// `CreateEventCommand` of the architecture document (6.1.1).
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
    /// Global position (pass as `minPosition` to read your write).
    pub position: u64,
    /// `true` when the event was already stored (same `eventId` or `dedupKey`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Claim {
    entity_type: String,
}

/// Enforces "an entity keeps one type": the first capture of an entity id appends a claim to
/// `_entity-<id>` (expected: no stream); later captures compare with it. Claims never change,
/// so they are cached without invalidation.
#[derive(Clone)]
pub struct EntityTypes {
    store: Arc<dyn EventStore>,
    known: moka::future::Cache<(TenantId, String), String>,
}

impl std::fmt::Debug for EntityTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityTypes").finish_non_exhaustive()
    }
}

impl EntityTypes {
    /// Claims over `store`, caching up to 100,000 entity types.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            known: moka::future::Cache::new(100_000),
        }
    }

    /// Ok if `entity_id` has (or now gets) type `entity_type`; 409 if it has another one.
    pub async fn claim(
        &self,
        tenant: &TenantId,
        entity_id: &str,
        entity_type: &str,
    ) -> Result<(), ApiError> {
        let key = (tenant.clone(), entity_id.to_owned());
        let existing = match self.known.get(&key).await {
            Some(t) => t,
            None => {
                let t = self.claim_in_store(tenant, entity_id, entity_type).await?;
                self.known.insert(key, t.clone()).await;
                t
            }
        };
        if existing == entity_type {
            Ok(())
        } else {
            Err(ApiError::Conflict(format!(
                "entity {entity_id:?} has type {existing:?}; an entity keeps one entityType (got {entity_type:?})"
            )))
        }
    }

    async fn claim_in_store(
        &self,
        tenant: &TenantId,
        entity_id: &str,
        entity_type: &str,
    ) -> Result<String, ApiError> {
        let stream = entity_claim_stream(entity_id).map_err(|_| ApiError::Internal)?;
        let ev = NewEvent::json(
            ENTITY_CLAIMED,
            &serde_json::json!(Claim {
                entity_type: entity_type.to_owned()
            }),
        );
        match self
            .store
            .append_to(tenant, &stream, ExpectedVersion::NoStream, vec![ev])
            .await
        {
            Ok(_) => Ok(entity_type.to_owned()),
            Err(e) if e.is_conflict() => {
                let first = self
                    .store
                    .read_stream(ReadStream::forwards(tenant.clone(), stream).limit(1))
                    .await?;
                let claim = first
                    .first()
                    .and_then(|e| serde_json::from_slice::<Claim>(&e.payload).ok())
                    .ok_or_else(|| {
                        tracing::error!(entity_id, "undecodable entity type claim");
                        ApiError::Internal
                    })?;
                Ok(claim.entity_type)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Executes a capture: type claim, then append (idempotent by event id and dedup key).
pub async fn execute(
    store: &dyn EventStore,
    types: &EntityTypes,
    cmd: &CaptureCommand,
) -> Result<Captured, ApiError> {
    let ev = &cmd.event;
    let tenant = &cmd.enrichment.tenant;
    types.claim(tenant, &ev.entity_id, &ev.entity_type).await?;
    let stream = ev.stream_id().map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let new = StoredEvent::new_event(ev, &cmd.enrichment);
    let out = store
        .append_to(tenant, &stream, ExpectedVersion::Any, vec![new])
        .await?;
    let r = out.events.first().ok_or(ApiError::Internal)?;
    // A duplicate may name an event stored for another entity (reused event id or dedup
    // key): report where the original is.
    let entity_id = match r.stream.as_str().split_once('-') {
        Some((_, id)) if out.duplicate => id.to_owned(),
        _ => ev.entity_id.clone(),
    };
    Ok(Captured {
        event_id: r.event_id.to_string(),
        entity_id,
        version: r.version.get(),
        position: r.position.get(),
        duplicate: out.duplicate,
    })
}
