//! The trace read model: per-entity timelines and current status, kept in the store's
//! [`ReadModelStore`] by the trace projection, and the queries over it.
//!
//! Key layout (bytewise ordered, so late and out-of-order events land in place):
//! - namespace [`TIMELINE_NS`]: `tenant 0x00 entityId 0x00 occurredAt(UTC µs, 8 bytes,
//!   sign-flipped big-endian) eventId(16 bytes)` → [`TimelineEntry`] (JSON);
//! - namespace [`ENTITY_NS`]: `tenant 0x00 entityId` → [`EntityStatus`] (JSON).
//!
//! Tenant ids and entity ids contain no `0x00`, so one tenant's or entity's keys are one
//! contiguous range, and a tenant can never read another's rows.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracktrace_core::{
    BoxError, Direction, EventFilter, KeyRange, Position, Projection, ReadModelStore, ReadModelTx,
    RecordedEvent, TenantId,
};

use crate::auth::SYSTEM_TENANT;
use crate::domain::{
    ENTITY_STREAM_PREFIX, Location, OPERATIONAL_EVENT, RelatedEntity, StoredEvent, format_micros,
};
use crate::error::ApiError;

/// Namespace of timeline entries.
pub const TIMELINE_NS: &str = "tt.timeline";
/// Namespace of per-entity status records.
pub const ENTITY_NS: &str = "tt.entity";

/// One event of an entity's timeline.
///
/// Stored as JSON with `attributes` kept as raw JSON text, so reading a timeline never
/// rebuilds attribute maps: entries are copied from the read store to the response.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(value_type = Object)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[schema(ignore)]
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

fn sortable(us: i64) -> [u8; 8] {
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
        EventFilter {
            tenant: None,
            event_types: vec![OPERATIONAL_EVENT.into()],
            stream_prefix: Some(ENTITY_STREAM_PREFIX.into()),
        }
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

/// Loads an entity's status record.
pub async fn load_status(
    rm: &dyn ReadModelStore,
    tenant: &TenantId,
    entity_id: &str,
) -> Result<Option<EntityStatus>, ApiError> {
    match rm
        .get(ENTITY_NS, &entity_key(tenant.as_str(), entity_id))
        .await?
    {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            tracing::error!(error = %e, "undecodable entity status record");
            ApiError::Internal
        }),
    }
}

/// Filters of a timeline query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TimelineFilter {
    /// Earliest `occurredAt` (inclusive), UTC µs.
    pub from_us: Option<i64>,
    /// Latest `occurredAt` (inclusive), UTC µs.
    pub to_us: Option<i64>,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
    /// Only this location code.
    pub location: Option<String>,
    /// Only this source.
    pub source: Option<String>,
}

impl TimelineFilter {
    fn matches(&self, e: &EntryMeta<'_>) -> bool {
        (self.event_types.is_empty() || self.event_types.iter().any(|t| *t == e.event_type))
            && self.location.as_ref().is_none_or(|l| *l == e.location.code)
            && self.source.as_ref().is_none_or(|s| *s == e.source)
    }
}

/// The fields of a stored [`TimelineEntry`] that filters and the compact and legs views need,
/// borrowed from the stored bytes (no attribute parsing, few allocations).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryMeta<'a> {
    /// Event id.
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    /// Event type.
    #[serde(borrow)]
    pub event_type: Cow<'a, str>,
    /// When, as sent.
    #[serde(borrow)]
    pub occurred_at: Cow<'a, str>,
    /// Where.
    #[serde(borrow)]
    pub location: LocationMeta<'a>,
    /// Reporting system.
    #[serde(borrow)]
    pub source: Cow<'a, str>,
}

/// The location code of an [`EntryMeta`].
#[derive(Debug, Deserialize)]
pub struct LocationMeta<'a> {
    /// Location code.
    #[serde(borrow)]
    pub code: Cow<'a, str>,
}

impl<'a> EntryMeta<'a> {
    /// Decodes the view fields of a stored entry.
    pub fn parse(stored: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(stored)
    }
}

/// An opaque pagination cursor: the key suffix (time + event id) of the last entry returned.
pub fn encode_cursor(entry_key_suffix: &[u8]) -> String {
    entry_key_suffix
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Decodes a cursor (400 if it was not produced by [`encode_cursor`]).
pub fn decode_cursor(s: &str) -> Result<Vec<u8>, ApiError> {
    let bad = || ApiError::BadRequest("invalid cursor".into());
    if s.len() != 48 || !s.is_ascii() {
        return Err(bad());
    }
    (0..24)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad()))
        .collect()
}

/// One page of a timeline.
#[derive(Clone, Debug)]
pub struct TimelinePage {
    /// Matching entries (stored JSON of [`TimelineEntry`]), ordered by `occurredAt` then
    /// event id.
    pub entries: Vec<Bytes>,
    /// Cursor of the next page, if there are more matching entries.
    pub next_cursor: Option<String>,
}

/// Reads one page of an entity's timeline.
pub async fn read_timeline(
    rm: &dyn ReadModelStore,
    tenant: &TenantId,
    entity_id: &str,
    filter: &TimelineFilter,
    cursor: Option<&[u8]>,
    limit: usize,
) -> Result<TimelinePage, ApiError> {
    let prefix = timeline_prefix(tenant.as_str(), entity_id);
    let mut start = prefix.clone();
    match cursor {
        // Strictly after the cursor's key: append a zero byte.
        Some(c) => {
            start.extend_from_slice(c);
            start.push(0);
        }
        None => {
            if let Some(from) = filter.from_us {
                start.extend_from_slice(&sortable(from));
            }
        }
    }
    if let (Some(_), Some(from)) = (cursor, filter.from_us) {
        let mut f = prefix.clone();
        f.extend_from_slice(&sortable(from));
        start = start.max(f);
    }
    let end = match filter.to_us {
        Some(to) => {
            let mut e = prefix.clone();
            match to.checked_add(1) {
                Some(next) => e.extend_from_slice(&sortable(next)),
                None => {
                    return Ok(TimelinePage {
                        entries: Vec::new(),
                        next_cursor: None,
                    });
                }
            }
            Some(e)
        }
        None => tracktrace_core::prefix_end(&prefix),
    };
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut last_key: Option<Vec<u8>> = None;
    let chunk = (limit + 1).clamp(64, 2048);
    loop {
        let rows = rm
            .scan(
                TIMELINE_NS,
                KeyRange {
                    start: start.clone(),
                    end: end.clone(),
                },
                Direction::Forwards,
                chunk,
            )
            .await?;
        let n = rows.len();
        for (k, v) in rows {
            start = k.to_vec();
            start.push(0);
            match serde_json::from_slice::<EntryMeta<'_>>(&v) {
                Ok(meta) if filter.matches(&meta) => {}
                Ok(_) => continue,
                Err(err) => {
                    tracing::error!(error = %err, "undecodable timeline entry skipped");
                    continue;
                }
            }
            if out.len() == limit {
                // One more match exists: the page is full and has a successor.
                let next_cursor = last_key.map(|k: Vec<u8>| encode_cursor(&k[prefix.len()..]));
                return Ok(TimelinePage {
                    entries: out,
                    next_cursor,
                });
            }
            last_key = Some(k.to_vec());
            out.push(v);
        }
        if n < chunk {
            return Ok(TimelinePage {
                entries: out,
                next_cursor: None,
            });
        }
    }
}

/// A journey leg: consecutive timeline entries at one location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Leg {
    /// Location code of the leg.
    pub location: String,
    /// `occurredAt` (as sent) of the first event at this location.
    pub from: String,
    /// `occurredAt` (as sent) of the last event at this location.
    pub to: String,
    /// Event types in order.
    pub event_types: Vec<String>,
    /// Event ids in order.
    pub event_ids: Vec<String>,
}

/// Groups entries into legs: a new leg starts whenever the location code changes.
pub fn legs(entries: &[EntryMeta<'_>]) -> Vec<Leg> {
    let mut out: Vec<Leg> = Vec::new();
    for e in entries {
        match out.last_mut() {
            Some(l) if l.location == e.location.code => {
                l.to = e.occurred_at.to_string();
                l.event_types.push(e.event_type.to_string());
                l.event_ids.push(e.event_id.to_string());
            }
            _ => out.push(Leg {
                location: e.location.code.to_string(),
                from: e.occurred_at.to_string(),
                to: e.occurred_at.to_string(),
                event_types: vec![e.event_type.to_string()],
                event_ids: vec![e.event_id.to_string()],
            }),
        }
    }
    out
}

/// The position up to which the read model is known to be complete for `checkpoint`.
pub async fn checkpoint(rm: &dyn ReadModelStore, name: &str) -> Result<Position, ApiError> {
    Ok(rm.load_checkpoint(name).await?.unwrap_or_default())
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

    #[test]
    fn cursors_roundtrip_and_reject_garbage() {
        let k = timeline_key("t", "e", 42, [9u8; 16]);
        let suffix = &k[timeline_prefix("t", "e").len()..];
        assert_eq!(decode_cursor(&encode_cursor(suffix)).unwrap(), suffix);
        assert!(decode_cursor("zz").is_err());
        assert!(decode_cursor(&"g".repeat(48)).is_err());
        assert!(decode_cursor(&"é".repeat(24)).is_err());
    }
}
