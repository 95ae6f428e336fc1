//! The two aggregates of a capture:
//! - [`EntityClaim`] (stream `EntityClaim-<entityId>`) enforces "an entity keeps one type":
//!   its first event claims the type; a capture with another type is rejected (409). It has
//!   an invariant, so it appends with optimistic concurrency.
//! - [`TrackedEntity`] (stream `Entity-<entityType>-<entityId>`) records the operational
//!   events. It has no invariant (every event is accepted once the claim holds; the read model
//!   orders by `occurredAt`), so it appends with [`Concurrency::Unchecked`]: concurrent
//!   captures of one entity never conflict.

use serde::{Deserialize, Serialize};
use tracktrace_core::{Aggregate, Concurrency, DomainEvent, JsonCodec};
use tracktrace_domain::{Enrichment, OperationalEvent, StoredEvent};

/// `CreateEventCommand` of the architecture document: a validated event and its enrichment.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureCommand {
    /// The validated event.
    pub event: OperationalEvent,
    /// Server-side context.
    pub enrichment: Enrichment,
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

/// A capture the entity cannot take (never produced: kept so the aggregate can grow rules).
#[derive(Debug, thiserror::Error)]
#[error("entity stream mismatch: {0}")]
pub struct CaptureRejected(String);

impl Aggregate for TrackedEntity {
    const TYPE: &'static str = "Entity";
    /// No invariant over the stream: concurrent captures of one entity append in commit
    /// order instead of conflicting and retrying.
    const CONCURRENCY: Concurrency = Concurrency::Unchecked;
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
