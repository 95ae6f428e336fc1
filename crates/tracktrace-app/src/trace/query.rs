//! Queries over the trace read model ([`crate::trace::model`]): an entity's status record,
//! one filtered page of its timeline (ordered by `occurredAt`, then event id; opaque cursors)
//! and its journey legs.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracktrace_core::{Direction, KeyRange, Position, ReadModelStore, TenantId};

use crate::error::AppError;
use crate::trace::model::{
    ENTITY_NS, EntityStatus, TIMELINE_NS, entity_key, sortable, timeline_prefix,
};

/// Field error `entityId` unless `id` is an entity id a capture could have.
pub fn check_entity_id(id: &str) -> Result<(), AppError> {
    match tracktrace_domain::entity_id_problem(id) {
        None => Ok(()),
        Some(m) => Err(AppError::field("entityId", m)),
    }
}

/// Loads an entity's status record.
pub async fn load_status(
    rm: &dyn ReadModelStore,
    tenant: &TenantId,
    entity_id: &str,
) -> Result<Option<EntityStatus>, AppError> {
    match rm
        .get(ENTITY_NS, &entity_key(tenant.as_str(), entity_id))
        .await?
    {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            tracing::error!(error = %e, "undecodable entity status record");
            AppError::internal(e)
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

/// The fields of a stored [`TimelineEntry`](crate::trace::model::TimelineEntry) that filters and the compact and legs views need,
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
pub fn decode_cursor(s: &str) -> Result<Vec<u8>, AppError> {
    let bad = || AppError::BadRequest("invalid cursor".into());
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
    /// Matching entries (stored JSON of [`TimelineEntry`](crate::trace::model::TimelineEntry)), ordered by `occurredAt` then
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
) -> Result<TimelinePage, AppError> {
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
                KeyRange::new(start.clone(), end.clone()),
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
pub async fn checkpoint(rm: &dyn ReadModelStore, name: &str) -> Result<Position, AppError> {
    Ok(rm.load_checkpoint(name).await?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::model::{timeline_key, timeline_prefix};

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
