//! Trace views (architecture 6.1.2): an entity's timeline in one of three shapes (`full`,
//! `compact`, `legs`), filtered and paginated, with its current status; and the parsing of
//! the query options a front end received.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracktrace_core::{ReadModelStore, TenantId};
use tracktrace_domain::{FieldError, Location, parse_instant};

use crate::error::AppError;
use crate::trace::model::{CurrentStatus, EntityStatus};
use crate::trace::query::{EntryMeta, Leg, TimelineFilter, decode_cursor, legs, read_timeline};

/// Limits of trace queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimits {
    /// Page size when the query names none.
    pub default_limit: usize,
    /// Largest accepted page size.
    pub max_limit: usize,
}

impl Default for PageLimits {
    fn default() -> Self {
        Self {
            default_limit: 100,
            max_limit: 1000,
        }
    }
}

/// The options of a trace query as a front end received them (text, checked by
/// [`ParsedQuery::parse`]; over HTTP, the query string of `GET /api/v1/trace/{entityId}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(rename_all = "camelCase")]
pub struct TraceOptions {
    /// Earliest `occurredAt` (RFC 3339, inclusive).
    pub from: Option<String>,
    /// Latest `occurredAt` (RFC 3339, inclusive).
    pub to: Option<String>,
    /// Only these event types (comma-separated).
    pub event_type: Option<String>,
    /// Only this location code.
    pub location: Option<String>,
    /// Only this source.
    pub source: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// `full` (default), `compact` or `legs`.
    pub view: Option<String>,
    /// Wait (bounded) until the read model includes this position (from a capture's
    /// result): read your writes.
    pub min_position: Option<u64>,
}

/// The shape of a trace view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    /// Every stored field of every entry.
    Full,
    /// Id, type, time and location code per entry.
    Compact,
    /// Entries grouped into journey legs by location.
    Legs,
}

/// A checked trace query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedQuery {
    /// The filter.
    pub filter: TimelineFilter,
    /// Decoded cursor.
    pub cursor: Option<Vec<u8>>,
    /// Page size.
    pub limit: usize,
    /// Shape.
    pub view: View,
    /// Normalised form of the whole query: equal for queries that give the same view (the
    /// cache key part of the query).
    pub key: String,
}

/// Splits a comma-separated list, trimming and dropping empty items.
pub fn split_list(s: Option<&str>) -> Vec<String> {
    s.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

impl ParsedQuery {
    /// Checks `q`, listing every field error.
    pub fn parse(q: &TraceOptions, limits: PageLimits) -> Result<Self, AppError> {
        let mut errors = Vec::new();
        let mut instant = |name: &str, v: &Option<String>| match v {
            None => None,
            Some(s) => match parse_instant(s) {
                Ok(t) => Some(t),
                Err(m) => {
                    errors.push(FieldError::new(name, m));
                    None
                }
            },
        };
        let from_us = instant("from", &q.from);
        let to_us = instant("to", &q.to);
        let limit = q.limit.unwrap_or(limits.default_limit);
        if limit == 0 || limit > limits.max_limit {
            errors.push(FieldError::new(
                "limit",
                format!("must be 1–{}", limits.max_limit),
            ));
        }
        let view = match q.view.as_deref() {
            None | Some("full") => View::Full,
            Some("compact") => View::Compact,
            Some("legs") => View::Legs,
            Some(_) => {
                errors.push(FieldError::new("view", "must be full, compact or legs"));
                View::Full
            }
        };
        let cursor = match q.cursor.as_deref() {
            None => None,
            Some(c) => match decode_cursor(c) {
                Ok(c) => Some(c),
                Err(_) => {
                    errors.push(FieldError::new("cursor", "is not a cursor of this API"));
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(AppError::Validation(errors));
        }
        let mut event_types = split_list(q.event_type.as_deref());
        event_types.sort();
        event_types.dedup();
        let filter = TimelineFilter {
            from_us,
            to_us,
            event_types,
            location: q.location.clone(),
            source: q.source.clone(),
        };
        let key = serde_json::to_string(&(
            filter.from_us,
            filter.to_us,
            &filter.event_types,
            &filter.location,
            &filter.source,
            limit,
            &q.cursor,
            format!("{view:?}"),
        ))
        .unwrap_or_default();
        Ok(ParsedQuery {
            filter,
            cursor,
            limit,
            view,
            key,
        })
    }
}

/// A compact timeline entry.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CompactEntry {
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// When (as sent).
    pub occurred_at: String,
    /// Location code.
    pub location: String,
}

/// Timeline entries of a trace, per view.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Entries {
    /// `view=full`: the stored entries
    /// ([`TimelineEntry`](crate::trace::model::TimelineEntry)) copied as they are.
    Full(Vec<Box<serde_json::value::RawValue>>),
    /// `view=compact`.
    Compact(Vec<CompactEntry>),
}

/// The trace of an entity.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TraceView {
    /// Entity id.
    pub entity_id: String,
    /// Entity type.
    pub entity_type: String,
    /// Events in the whole timeline.
    pub event_count: u64,
    /// Current status (latest event by `occurredAt`).
    pub status: StatusView,
    /// `full`, `compact` or `legs`.
    pub view: String,
    /// Timeline entries (`full`: every field of a timeline entry; `compact`: id, type, time,
    /// location).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<crate::trace::model::TimelineEntry>>))]
    pub events: Option<Entries>,
    /// Journey legs (`view=legs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legs: Option<Vec<Leg>>,
    /// Cursor of the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Global position of the last event reflected for this entity.
    pub position: u64,
}

impl TraceView {
    /// The view as JSON bytes (what front ends send and cache).
    pub fn to_json(&self) -> Result<Bytes, AppError> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(AppError::internal)
    }
}

/// Current status of an entity.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// Last event type.
    pub event_type: String,
    /// Last location.
    pub location: Location,
    /// When (as sent).
    pub occurred_at: String,
}

impl From<&CurrentStatus> for StatusView {
    fn from(c: &CurrentStatus) -> Self {
        Self {
            event_type: c.event_type.clone(),
            location: c.location.clone(),
            occurred_at: c.occurred_at.clone(),
        }
    }
}

/// Builds the view of the entity whose status is `status`, for query `pq`.
pub async fn build_view(
    rm: &dyn ReadModelStore,
    tenant: &TenantId,
    status: &EntityStatus,
    pq: &ParsedQuery,
) -> Result<TraceView, AppError> {
    let page = read_timeline(
        rm,
        tenant,
        &status.entity_id,
        &pq.filter,
        pq.cursor.as_deref(),
        pq.limit,
    )
    .await?;
    let corrupt = |e: serde_json::Error| {
        tracing::error!(error = %e, "undecodable timeline entry");
        AppError::internal(format!("undecodable timeline entry: {e}"))
    };
    let metas = || -> Result<Vec<EntryMeta<'_>>, AppError> {
        page.entries
            .iter()
            .map(|b| EntryMeta::parse(b).map_err(corrupt))
            .collect()
    };
    let (events, legs, view) = match pq.view {
        View::Full => (
            Some(Entries::Full(
                page.entries
                    .iter()
                    .map(|b| serde_json::from_slice(b).map_err(corrupt))
                    .collect::<Result<_, _>>()?,
            )),
            None,
            "full",
        ),
        View::Compact => (
            Some(Entries::Compact(
                metas()?
                    .into_iter()
                    .map(|e| CompactEntry {
                        event_id: e.event_id.into_owned(),
                        event_type: e.event_type.into_owned(),
                        occurred_at: e.occurred_at.into_owned(),
                        location: e.location.code.into_owned(),
                    })
                    .collect(),
            )),
            None,
            "compact",
        ),
        View::Legs => (None, Some(legs(&metas()?)), "legs"),
    };
    Ok(TraceView {
        entity_id: status.entity_id.clone(),
        entity_type: status.entity_type.clone(),
        event_count: status.event_count,
        status: StatusView::from(&status.current),
        view: view.into(),
        events,
        legs,
        next_cursor: page.next_cursor,
        position: status.last_position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_option_is_listed_and_equal_queries_share_a_key() {
        let bad = TraceOptions {
            from: Some("yesterday".into()),
            limit: Some(0),
            view: Some("wide".into()),
            cursor: Some("zz".into()),
            ..TraceOptions::default()
        };
        match ParsedQuery::parse(&bad, PageLimits::default()) {
            Err(AppError::Validation(errs)) => {
                let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, ["from", "limit", "view", "cursor"]);
            }
            other => panic!("{other:?}"),
        }
        let a = TraceOptions {
            event_type: Some("B, A,,A".into()),
            ..TraceOptions::default()
        };
        let b = TraceOptions {
            event_type: Some("A,B".into()),
            ..TraceOptions::default()
        };
        let (a, b) = (
            ParsedQuery::parse(&a, PageLimits::default()).unwrap(),
            ParsedQuery::parse(&b, PageLimits::default()).unwrap(),
        );
        assert_eq!(a.key, b.key);
        assert_eq!(a.filter.event_types, ["A", "B"]);
    }
}
