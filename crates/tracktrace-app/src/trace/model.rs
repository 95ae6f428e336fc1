//! The trace read model: per-entity timelines and current status, kept in the store's
//! read-model store by the trace projection ([`TraceProjection`]); the queries over it are in
//! [`crate::trace::query`].
//!
//! Key layout (bytewise ordered, so late and out-of-order events land in place):
//! - namespace [`TIMELINE_NS`]: `tenant 0x00 entityId 0x00 occurredAt(UTC µs, 8 bytes,
//!   sign-flipped big-endian) eventId(16 bytes)` → [`TimelineEntry`] (JSON);
//! - namespace [`ENTITY_NS`]: `tenant 0x00 entityId` → [`EntityStatus`] (JSON).
//!
//! Tenant ids and entity ids contain no `0x00`, so one tenant's or entity's keys are one
//! contiguous range, and a tenant can never read another's rows.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracktrace_core::{BoxError, EventFilter, Projection, ReadModelTx, RecordedEvent};
use tracktrace_domain::{
    ENTITY_STREAM_PREFIX, Location, OPERATIONAL_EVENT, RelatedEntity, StoredEvent, format_micros,
};

use crate::access::SYSTEM_TENANT;

/// Namespace of timeline entries.
pub const TIMELINE_NS: &str = "tt.timeline";
/// Namespace of per-entity status records.
pub const ENTITY_NS: &str = "tt.entity";

/// One event of an entity's timeline.
///
/// Stored as JSON with `attributes` kept as raw JSON text, so reading a timeline never
/// rebuilds attribute maps: entries are copied from the read store to the response.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// When it happened, as sent.
    pub occurred_at: String,
    /// When it happened, UTC.
    pub occurred_at_utc: String,
    /// Where.
    pub location: Location,
    /// Reporting system.
    pub source: String,
    /// Attributes (a JSON object, as raw JSON).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub attributes: Box<RawValue>,
    /// Related entities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related_entities: Vec<RelatedEntity>,
    /// Version in the entity's stream (arrival order).
    pub version: u64,
    /// Global position.
    pub position: u64,
    /// When the server received it, UTC.
    pub received_at: String,
    /// Correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// The current status of an entity: its latest event by `occurredAt`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CurrentStatus {
    /// Last event type.
    pub event_type: String,
    /// Last location.
    pub location: Location,
    /// When, as sent.
    pub occurred_at: String,
    /// Event id of that event.
    pub event_id: String,
    /// Its time in µs (ordering only).
    #[serde(rename = "_us")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub occurred_at_us: i64,
}

/// Per-entity summary record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityStatus {
    /// Entity id.
    pub entity_id: String,
    /// Entity type.
    pub entity_type: String,
    /// Events in the timeline.
    pub event_count: u64,
    /// Global position of the last event applied for this entity: changes whenever the
    /// entity's timeline changes, so it is the cache generation of the entity's views.
    pub last_position: u64,
    /// Latest event by `occurredAt`.
    pub current: CurrentStatus,
}

pub(crate) fn sortable(us: i64) -> [u8; 8] {
    ((us as u64) ^ (1 << 63)).to_be_bytes()
}

/// `tenant 0x00 entityId 0x00` — prefix of an entity's timeline keys.
pub fn timeline_prefix(tenant: &str, entity_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + entity_id.len() + 2 + 24);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(entity_id.as_bytes());
    k.push(0);
    k
}

/// Full timeline key of an event.
pub fn timeline_key(
    tenant: &str,
    entity_id: &str,
    occurred_us: i64,
    event_id: [u8; 16],
) -> Vec<u8> {
    let mut k = timeline_prefix(tenant, entity_id);
    k.extend_from_slice(&sortable(occurred_us));
    k.extend_from_slice(&event_id);
    k
}

/// Key of an entity's status record.
pub fn entity_key(tenant: &str, entity_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + entity_id.len() + 1);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(entity_id.as_bytes());
    k
}

/// Whether the trace projection handles this event (operational events of real tenants).
pub fn is_operational(e: &RecordedEvent) -> bool {
    e.tenant.as_str() != SYSTEM_TENANT
        && e.event_type == OPERATIONAL_EVENT
        && e.stream.as_str().starts_with(ENTITY_STREAM_PREFIX)
}

/// The timeline entry of an operational event and its entity id (`None` for other events or
/// undecodable payloads).
pub fn entry_of(e: &RecordedEvent) -> Option<(TimelineEntry, String)> {
    if !is_operational(e) {
        return None;
    }
    let s = StoredEvent::decode(e).ok()?;
    Some((entry_from(e, &s), s.entity_id))
}

fn entry_from(e: &RecordedEvent, s: &StoredEvent) -> TimelineEntry {
    TimelineEntry {
        event_id: e.event_id.to_string(),
        event_type: s.event_type.clone(),
        occurred_at: s.occurred_at.clone(),
        occurred_at_utc: format_micros(s.occurred_at_us),
        location: s.location.clone(),
        source: s.source.clone(),
        attributes: serde_json::value::to_raw_value(&s.attributes)
            .unwrap_or_else(|_| empty_object()),
        related_entities: s.related_entities.clone(),
        version: e.version.get(),
        position: e.position.get(),
        received_at: format_micros(s.received_at_us),
        correlation_id: e.metadata.correlation_id.clone(),
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".into()).unwrap_or_else(|_| unreachable_raw())
}

#[allow(clippy::unreachable)]
fn unreachable_raw() -> Box<RawValue> {
    unreachable!("`{{}}` is valid JSON")
}

/// The trace projection (arc42 6.1.1 "ReadModel: UpdateProjections"): per event, the
/// timeline entry and the entity's status record, through the runtime's [`ReadModelTx`] so
/// they commit atomically with the checkpoint. Undecodable events are logged and skipped so
/// one bad record cannot wedge the projection.
#[derive(Debug, Default)]
pub struct TraceProjection;

/// Checkpoint name of the trace projection.
pub const TRACE_PROJECTION: &str = "tt.trace";

#[async_trait::async_trait]
impl Projection for TraceProjection {
    fn name(&self) -> &str {
        TRACE_PROJECTION
    }

    fn filter(&self) -> EventFilter {
        EventFilter::default()
            .with_event_types([OPERATIONAL_EVENT])
            .with_stream_prefix(ENTITY_STREAM_PREFIX)
    }

    fn namespaces(&self) -> Vec<String> {
        vec![TIMELINE_NS.into(), ENTITY_NS.into()]
    }

    async fn apply(&mut self, e: &RecordedEvent, tx: &mut ReadModelTx<'_>) -> Result<(), BoxError> {
        if !is_operational(e) {
            return Ok(());
        }
        let s = match StoredEvent::decode(e) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(position = %e.position, error = %err, "undecodable operational event skipped by the trace projection");
                return Ok(());
            }
        };
        let tenant = e.tenant.as_str();
        let entry = entry_from(e, &s);
        tx.put(
            TIMELINE_NS,
            timeline_key(
                tenant,
                &s.entity_id,
                s.occurred_at_us,
                e.event_id.to_bytes(),
            ),
            serde_json::to_vec(&entry)?,
        );
        let key = entity_key(tenant, &s.entity_id);
        let prev = tx
            .get(ENTITY_NS, &key)
            .await?
            .and_then(|b| serde_json::from_slice::<EntityStatus>(&b).ok());
        let candidate = CurrentStatus {
            event_type: s.event_type.clone(),
            location: s.location.clone(),
            occurred_at: s.occurred_at.clone(),
            event_id: e.event_id.to_string(),
            occurred_at_us: s.occurred_at_us,
        };
        let status = match prev {
            Some(mut st) => {
                st.event_count += 1;
                st.last_position = e.position.get();
                if (candidate.occurred_at_us, &candidate.event_id)
                    >= (st.current.occurred_at_us, &st.current.event_id)
                {
                    st.current = candidate;
                }
                st
            }
            None => EntityStatus {
                entity_id: s.entity_id.clone(),
                entity_type: s.entity_type.clone(),
                event_count: 1,
                last_position: e.position.get(),
                current: candidate,
            },
        };
        tx.put(ENTITY_NS, key, serde_json::to_vec(&status)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_by_time_including_negative() {
        let id = [1u8; 16];
        let a = timeline_key("t", "e", -5, id);
        let b = timeline_key("t", "e", 0, id);
        let c = timeline_key("t", "e", 7, id);
        assert!(a < b && b < c);
        // One entity's keys never interleave with another's whose id extends it.
        let d = timeline_key("t", "e1", i64::MIN, id);
        assert!(c < d || !d.starts_with(&timeline_prefix("t", "e")));
    }
}
