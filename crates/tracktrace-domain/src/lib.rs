//! The Track & Trace domain: the operational event, its validation (every field error at
//! once), its enrichment and how it is stored in the event store.
//!
//! A crate of its own (no HTTP, no server dependencies) so that fuzz targets and other
//! front ends (a queue consumer, a CLI importer) can validate capture payloads exactly as the
//! server does; `tracktrace-http` re-exports it as `tracktrace_http::domain`.
//!
//! [`validate_capture`] is the one entry point from untrusted bytes to a valid
//! [`OperationalEvent`]; it never panics (fuzzed by `tracktrace-http`'s
//! `tests/capture_fuzz.rs` and the `fuzz/` targets).
//!
//! ```
//! use tracktrace_domain::{CaptureError, validate_capture};
//!
//! let ev = validate_capture(br#"{"entityId": "0125123456", "entityType": "Bag",
//!     "eventType": "BagLoaded", "occurredAt": "2026-11-28T08:15:00+01:00",
//!     "location": {"code": "MAD"}}"#).map_err(|e| e.to_string())?;
//! assert_eq!(ev.occurred_at.utc_rfc3339(), "2026-11-28T07:15:00Z");
//! assert_eq!(ev.stream_id().map_err(|e| e.to_string())?.as_str(), "Entity-Bag-0125123456");
//!
//! let Err(CaptureError::Invalid { errors }) = validate_capture(br#"{"entityId": "x"}"#) else {
//!     return Err("expected field errors".into());
//! };
//! assert!(errors.iter().any(|e| e.field == "occurredAt"));
//! # Ok::<(), String>(())
//! ```
//!
//! # Features
//! - `openapi`: `utoipa::ToSchema` for the wire types (used by the server's OpenAPI document).

#![cfg_attr(docsrs, feature(doc_cfg))]

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracktrace_core::{
    DomainEvent, EventId, IdError, RecordedEvent, StreamId, TenantId, Timestamp,
};

/// Documented limits of the capture payload.
pub mod limits {
    /// Largest accepted request body for one event, in bytes (HTTP 413 above).
    pub const MAX_EVENT_BODY_BYTES: usize = 64 * 1024;
    /// Largest accepted batch request body, in bytes (HTTP 413 above).
    pub const MAX_BATCH_BODY_BYTES: usize = 4 * 1024 * 1024;
    /// Most events in one `events:batch` request.
    pub const MAX_BATCH_ITEMS: usize = 500;
    /// Largest `attributes` object, serialized, in bytes.
    pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
    /// Longest entity id, in bytes.
    pub const MAX_ENTITY_ID_LEN: usize = 128;
    /// Longest entity type, in bytes.
    pub const MAX_ENTITY_TYPE_LEN: usize = 64;
    /// Longest event type, in bytes.
    pub const MAX_EVENT_TYPE_LEN: usize = 128;
    /// Longest dedup key, source, location detail or relation, in bytes.
    pub const MAX_TEXT_LEN: usize = 256;
    /// Most related entities on one event.
    pub const MAX_RELATED_ENTITIES: usize = 32;
}

/// One invalid field of a request: what the HTTP layer lists in a 400 problem document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldError {
    /// Path of the field, e.g. `location.code` or `relatedEntities[1].relation`
    /// (empty for the document itself).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a capture payload was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// The bytes are not JSON.
    #[error("malformed JSON: {detail}")]
    Malformed {
        /// Parser message (line and column).
        detail: String,
    },
    /// The JSON does not describe a valid event; every problem found is listed.
    #[error("invalid event: {} field error(s)", errors.len())]
    Invalid {
        /// One entry per invalid field.
        errors: Vec<FieldError>,
    },
}

/// An instant as the client sent it (RFC 3339 with its offset) plus its UTC normalisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OccurredAt {
    original: String,
    utc_micros: i64,
}

impl OccurredAt {
    /// Parses an RFC 3339 timestamp with an explicit offset (`Z` or `±hh:mm`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| format!("must be an RFC 3339 timestamp with an offset ({e})"))?;
        let micros = t.unix_timestamp_nanos().div_euclid(1000);
        let utc_micros = i64::try_from(micros).map_err(|_| "is out of range".to_string())?;
        Ok(Self {
            original: s.to_owned(),
            utc_micros,
        })
    }

    /// The instant `utc_micros` (microseconds since the epoch), written in UTC (`…Z`): for
    /// events the server itself raises.
    pub fn from_utc_micros(utc_micros: i64) -> Self {
        Self {
            original: format_micros(utc_micros),
            utc_micros,
        }
    }

    /// Rebuilds from stored parts (the original text is trusted to be valid RFC 3339).
    fn from_parts(original: String, utc_micros: i64) -> Self {
        Self {
            original,
            utc_micros,
        }
    }

    /// The timestamp exactly as sent (offset kept).
    pub fn as_sent(&self) -> &str {
        &self.original
    }

    /// Microseconds since the Unix epoch (UTC).
    pub fn utc_micros(&self) -> i64 {
        self.utc_micros
    }

    /// The instant in UTC, RFC 3339 (`…Z`).
    pub fn utc_rfc3339(&self) -> String {
        format_micros(self.utc_micros)
    }
}

/// Formats microseconds since the epoch as RFC 3339 UTC (`…Z`).
pub fn format_micros(us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| us.to_string())
}

/// Parses an RFC 3339 timestamp into microseconds since the epoch (query filters).
pub fn parse_instant(s: &str) -> Result<i64, String> {
    OccurredAt::parse(s).map(|t| t.utc_micros)
}

/// Where an event happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Location {
    /// IATA-like location code: 3–8 characters `A–Z 0–9` (airport `MAD`, ICAO `LEMD`,
    /// UN/LOCODE `ESMAD`).
    pub code: String,
    /// Free text within the location (gate, belt, stand…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A relation to another entity (bag *containedIn* ULD, ULD *loadedOn* flight).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RelatedEntity {
    /// The other entity's id.
    pub entity_id: String,
    /// The other entity's type.
    pub entity_type: String,
    /// The relation's name, e.g. `containedIn`.
    pub relation: String,
}

/// A valid operational event as captured (before enrichment).
#[derive(Clone, Debug, PartialEq)]
pub struct OperationalEvent {
    /// Client-supplied event id (idempotent retries); generated when absent.
    pub event_id: Option<EventId>,
    /// Business de-duplication key, unique per tenant.
    pub dedup_key: Option<String>,
    /// The entity the event is about.
    pub entity_id: String,
    /// The entity's type (an entity keeps one type).
    pub entity_type: String,
    /// What happened.
    pub event_type: String,
    /// When it happened.
    pub occurred_at: OccurredAt,
    /// Where it happened.
    pub location: Location,
    /// Which system reported it (defaults to the token subject at enrichment).
    pub source: Option<String>,
    /// Free-form attributes (size-limited).
    pub attributes: Map<String, Value>,
    /// Related entities.
    pub related_entities: Vec<RelatedEntity>,
}

impl OperationalEvent {
    /// The aggregate id of the entity: `<entityType>-<entityId>` (its stream is
    /// `Entity-<entityType>-<entityId>`, see [`entity_stream`]).
    pub fn aggregate_id(&self) -> String {
        format!("{}-{}", self.entity_type, self.entity_id)
    }

    /// The stream holding this entity's events.
    pub fn stream_id(&self) -> Result<StreamId, IdError> {
        entity_stream(&self.entity_type, &self.entity_id)
    }
}

/// Category prefix of entity streams.
pub const ENTITY_STREAM_PREFIX: &str = "Entity-";

/// The stream of an entity: `Entity-<entityType>-<entityId>`. Entity types contain no `-`,
/// so the split is unambiguous, and the `Entity-<entityType>-` prefix keeps sharding by
/// entity type possible.
pub fn entity_stream(entity_type: &str, entity_id: &str) -> Result<StreamId, IdError> {
    StreamId::parse(format!("{ENTITY_STREAM_PREFIX}{entity_type}-{entity_id}"))
}

/// Validates a capture payload: JSON bytes → [`OperationalEvent`], listing every field error.
/// Never panics, whatever the input.
pub fn validate_capture(bytes: &[u8]) -> Result<OperationalEvent, CaptureError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| CaptureError::Malformed {
        detail: e.to_string(),
    })?;
    validate_capture_value(&value, "").map_err(|errors| CaptureError::Invalid { errors })
}

/// Validates one already parsed event; `prefix` is prepended to field paths (`events[3].`).
pub fn validate_capture_value(
    value: &Value,
    prefix: &str,
) -> Result<OperationalEvent, Vec<FieldError>> {
    let mut v = Check {
        prefix,
        errors: Vec::new(),
    };
    let Some(obj) = value.as_object() else {
        let field = prefix.strip_suffix('.').unwrap_or(prefix);
        return Err(vec![FieldError::new(field, "must be a JSON object")]);
    };
    const KNOWN: [&str; 11] = [
        "eventId",
        "dedupKey",
        "entityId",
        "entityType",
        "eventType",
        "occurredAt",
        "location",
        "source",
        "attributes",
        "relatedEntities",
        "correlationId",
    ];
    for k in obj.keys() {
        if !KNOWN.contains(&k.as_str()) {
            v.err(k, "unknown field");
        }
    }
    let event_id = v
        .opt_str(obj, "eventId")
        .and_then(|s| match EventId::parse(s) {
            Ok(id) => Some(id),
            Err(e) => {
                v.err("eventId", e.to_string());
                None
            }
        });
    let dedup_key = v
        .opt_str(obj, "dedupKey")
        .and_then(|s| v.text("dedupKey", s, limits::MAX_TEXT_LEN));
    let entity_id = v
        .req_str(obj, "entityId")
        .and_then(|s| v.entity_id("entityId", s));
    let entity_type = v
        .req_str(obj, "entityType")
        .and_then(|s| v.entity_type("entityType", s));
    let event_type = v
        .req_str(obj, "eventType")
        .and_then(|s| v.event_type("eventType", s));
    let occurred_at = v
        .req_str(obj, "occurredAt")
        .and_then(|s| match OccurredAt::parse(s) {
            Ok(t) => Some(t),
            Err(m) => {
                v.err("occurredAt", m);
                None
            }
        });
    let location = v.location(obj.get("location"));
    let source = v
        .opt_str(obj, "source")
        .and_then(|s| v.text("source", s, limits::MAX_TEXT_LEN));
    // `correlationId` in the body is accepted for clients that cannot set headers.
    if let Some(c) = v.opt_str(obj, "correlationId") {
        v.text("correlationId", c, limits::MAX_TEXT_LEN);
    }
    let attributes = match obj.get("attributes") {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(m)) => {
            let size = serde_json::to_vec(m).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > limits::MAX_ATTRIBUTES_BYTES {
                v.err(
                    "attributes",
                    format!(
                        "is {size} bytes serialized; at most {} are allowed",
                        limits::MAX_ATTRIBUTES_BYTES
                    ),
                );
                None
            } else {
                Some(m.clone())
            }
        }
        Some(_) => {
            v.err("attributes", "must be a JSON object");
            None
        }
    };
    let related = v.related(obj.get("relatedEntities"));
    match (
        entity_id,
        entity_type,
        event_type,
        occurred_at,
        location,
        attributes,
        related,
    ) {
        (
            Some(entity_id),
            Some(entity_type),
            Some(event_type),
            Some(oa),
            Some(loc),
            Some(a),
            Some(r),
        ) if v.errors.is_empty() => Ok(OperationalEvent {
            event_id,
            dedup_key: dedup_key.map(str::to_owned),
            entity_id: entity_id.to_owned(),
            entity_type: entity_type.to_owned(),
            event_type: event_type.to_owned(),
            occurred_at: oa,
            location: loc,
            source: source.map(str::to_owned),
            attributes: a,
            related_entities: r,
        }),
        _ => Err(v.errors),
    }
}

/// The correlation id a body may carry (`correlationId`), if it is a string.
pub fn body_correlation_id(value: &Value) -> Option<&str> {
    value.get("correlationId").and_then(Value::as_str)
}

/// Why `s` is not a valid `entityId` by the capture rules (`None`: it is valid). For other
/// front ends that name entities (trace queries, subscriptions).
pub fn entity_id_problem(s: &str) -> Option<String> {
    let mut c = Check {
        prefix: "",
        errors: Vec::new(),
    };
    c.entity_id("", s);
    c.errors.pop().map(|e| e.message)
}

/// Why `s` is not a valid `entityType` by the capture rules (`None`: it is valid). For other
/// front ends that name entity types (e.g. the server's milestone rules).
pub fn entity_type_problem(s: &str) -> Option<String> {
    let mut c = Check {
        prefix: "",
        errors: Vec::new(),
    };
    c.entity_type("", s);
    c.errors.pop().map(|e| e.message)
}

/// Why `s` is not a valid `eventType` by the capture rules (`None`: it is valid).
pub fn event_type_problem(s: &str) -> Option<String> {
    let mut c = Check {
        prefix: "",
        errors: Vec::new(),
    };
    c.event_type("", s);
    c.errors.pop().map(|e| e.message)
}

struct Check<'p> {
    prefix: &'p str,
    errors: Vec<FieldError>,
}

impl Check<'_> {
    fn err(&mut self, field: &str, message: impl Into<String>) {
        self.errors
            .push(FieldError::new(format!("{}{field}", self.prefix), message));
    }

    fn req_str<'v>(&mut self, obj: &'v Map<String, Value>, field: &str) -> Option<&'v str> {
        match obj.get(field) {
            None | Some(Value::Null) => {
                self.err(field, "is required");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(field, "must be a string");
                None
            }
        }
    }

    fn opt_str<'v>(&mut self, obj: &'v Map<String, Value>, field: &str) -> Option<&'v str> {
        match obj.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(field, "must be a string");
                None
            }
        }
    }

    fn text<'s>(&mut self, field: &str, s: &'s str, max: usize) -> Option<&'s str> {
        if s.is_empty() {
            self.err(field, "must not be empty");
            None
        } else if s.len() > max {
            self.err(
                field,
                format!("is {} bytes long; at most {max} are allowed", s.len()),
            );
            None
        } else if s.chars().any(char::is_control) {
            self.err(field, "must not contain control characters");
            None
        } else {
            Some(s)
        }
    }

    fn pattern<'s>(
        &mut self,
        field: &str,
        s: &'s str,
        min: usize,
        max: usize,
        ok: impl Fn(usize, char) -> bool,
        alphabet: &str,
    ) -> Option<&'s str> {
        if s.len() < min || s.len() > max {
            self.err(
                field,
                format!("must be {min}–{max} characters long ({alphabet})"),
            );
            None
        } else if !s.chars().enumerate().all(|(i, c)| ok(i, c)) {
            self.err(field, format!("may only contain {alphabet}"));
            None
        } else {
            Some(s)
        }
    }

    fn entity_id<'s>(&mut self, field: &str, s: &'s str) -> Option<&'s str> {
        self.pattern(
            field,
            s,
            1,
            limits::MAX_ENTITY_ID_LEN,
            |_, c| c.is_ascii_alphanumeric() || "._:@+~-".contains(c),
            "ASCII letters, digits and . _ : @ + ~ -",
        )
    }

    fn entity_type<'s>(&mut self, field: &str, s: &'s str) -> Option<&'s str> {
        self.pattern(
            field,
            s,
            1,
            limits::MAX_ENTITY_TYPE_LEN,
            |i, c| c.is_ascii_alphabetic() || (i > 0 && (c.is_ascii_digit() || c == '_')),
            "ASCII letters, digits and _, starting with a letter",
        )
    }

    fn event_type<'s>(&mut self, field: &str, s: &'s str) -> Option<&'s str> {
        self.pattern(
            field,
            s,
            1,
            limits::MAX_EVENT_TYPE_LEN,
            |i, c| c.is_ascii_alphabetic() || (i > 0 && (c.is_ascii_digit() || "_.:-".contains(c))),
            "ASCII letters, digits and _ . : -, starting with a letter",
        )
    }

    fn location(&mut self, v: Option<&Value>) -> Option<Location> {
        let obj = match v {
            None | Some(Value::Null) => {
                self.err("location", "is required");
                return None;
            }
            Some(Value::Object(o)) => o,
            Some(_) => {
                self.err("location", "must be an object with a `code`");
                return None;
            }
        };
        for k in obj.keys() {
            if k != "code" && k != "detail" {
                self.err(&format!("location.{k}"), "unknown field");
            }
        }
        let code = self.req_str(obj, "code").map(|s| s.to_owned());
        // req_str reported under the bare name; fix the path for nested fields.
        self.fix_last_path("code", "location.code");
        let code = code.and_then(|c| {
            self.pattern(
                "location.code",
                &c,
                3,
                8,
                |_, ch| ch.is_ascii_uppercase() || ch.is_ascii_digit(),
                "upper-case ASCII letters and digits (IATA-like code)",
            )
            .map(str::to_owned)
        });
        let detail = self.opt_str(obj, "detail").map(str::to_owned);
        self.fix_last_path("detail", "location.detail");
        let detail = match detail {
            Some(d) => self
                .text("location.detail", &d, limits::MAX_TEXT_LEN)
                .is_some()
                .then_some(Some(d)),
            None => Some(None),
        };
        Some(Location {
            code: code?,
            detail: detail?,
        })
    }

    fn related(&mut self, v: Option<&Value>) -> Option<Vec<RelatedEntity>> {
        let items = match v {
            None | Some(Value::Null) => return Some(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(_) => {
                self.err("relatedEntities", "must be an array");
                return None;
            }
        };
        if items.len() > limits::MAX_RELATED_ENTITIES {
            self.err(
                "relatedEntities",
                format!(
                    "has {} items; at most {} are allowed",
                    items.len(),
                    limits::MAX_RELATED_ENTITIES
                ),
            );
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("relatedEntities[{i}]");
            let Some(obj) = item.as_object() else {
                self.err(&path, "must be an object");
                ok = false;
                continue;
            };
            for k in obj.keys() {
                if !["entityId", "entityType", "relation"].contains(&k.as_str()) {
                    self.err(&format!("{path}.{k}"), "unknown field");
                    ok = false;
                }
            }
            let mut get = |name: &str| -> Option<String> {
                let s = self.req_str(obj, name).map(str::to_owned);
                self.fix_last_path(name, &format!("{path}.{name}"));
                s
            };
            let (id, ty, rel) = (get("entityId"), get("entityType"), get("relation"));
            let id = id.and_then(|s| {
                self.entity_id(&format!("{path}.entityId"), &s)
                    .map(str::to_owned)
            });
            let ty = ty.and_then(|s| {
                self.entity_type(&format!("{path}.entityType"), &s)
                    .map(str::to_owned)
            });
            let rel = rel.and_then(|s| {
                self.pattern(
                    &format!("{path}.relation"),
                    &s,
                    1,
                    64,
                    |i, c| c.is_ascii_alphabetic() || (i > 0 && (c.is_ascii_digit() || c == '_')),
                    "ASCII letters, digits and _, starting with a letter",
                )
                .map(str::to_owned)
            });
            match (id, ty, rel) {
                (Some(entity_id), Some(entity_type), Some(relation)) => out.push(RelatedEntity {
                    entity_id,
                    entity_type,
                    relation,
                }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// `req_str`/`opt_str` report a bare field name; nested callers rename the last error.
    fn fix_last_path(&mut self, bare: &str, full: &str) {
        let bare = format!("{}{bare}", self.prefix);
        if let Some(last) = self.errors.last_mut()
            && last.field == bare
        {
            last.field = format!("{}{full}", self.prefix);
        }
    }
}

/// Server-side context added to a captured event before it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrichment {
    /// The capturing tenant.
    pub tenant: TenantId,
    /// Token subject (who submitted it).
    pub submitted_by: String,
    /// When the server received it (server clock).
    pub received_at: Timestamp,
    /// Correlation id: `X-Correlation-Id`, the body's `correlationId`, or generated.
    pub correlation_id: String,
}

/// Stored event type of every captured operational event (the client's `eventType` is in
/// the payload: the runtime's [`DomainEvent`] types are static names).
pub const OPERATIONAL_EVENT: &str = "OperationalEventRecorded";

/// The stored form of a captured event (JSON payload of the store event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    /// The client's event type.
    pub event_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Entity type.
    pub entity_type: String,
    /// `occurredAt` exactly as sent.
    pub occurred_at: String,
    /// `occurredAt` in microseconds since the epoch (UTC).
    pub occurred_at_us: i64,
    /// Location.
    pub location: Location,
    /// Reporting system.
    pub source: String,
    /// Attributes.
    #[serde(default)]
    pub attributes: Map<String, Value>,
    /// Related entities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related_entities: Vec<RelatedEntity>,
    /// Server receive time, microseconds since the epoch.
    pub received_at_us: i64,
    /// Token subject that submitted the event.
    pub submitted_by: String,
    /// Client-supplied event id (not part of the payload: it is the store event's id).
    #[serde(skip)]
    pub event_id: Option<EventId>,
    /// Dedup key (not part of the payload: it is the store event's dedup key).
    #[serde(skip)]
    pub dedup_key: Option<String>,
}

impl DomainEvent for StoredEvent {
    fn event_type(&self) -> &'static str {
        OPERATIONAL_EVENT
    }

    fn event_id(&self) -> Option<EventId> {
        self.event_id
    }

    fn dedup_key(&self) -> Option<String> {
        self.dedup_key.clone()
    }
}

impl StoredEvent {
    /// Combines a validated event and its enrichment into the event to record.
    pub fn from_capture(ev: &OperationalEvent, en: &Enrichment) -> Self {
        StoredEvent {
            event_type: ev.event_type.clone(),
            entity_id: ev.entity_id.clone(),
            entity_type: ev.entity_type.clone(),
            occurred_at: ev.occurred_at.as_sent().to_owned(),
            occurred_at_us: ev.occurred_at.utc_micros(),
            location: ev.location.clone(),
            source: ev.source.clone().unwrap_or_else(|| en.submitted_by.clone()),
            attributes: ev.attributes.clone(),
            related_entities: ev.related_entities.clone(),
            received_at_us: en.received_at.unix_micros(),
            submitted_by: en.submitted_by.clone(),
            event_id: ev.event_id,
            dedup_key: ev.dedup_key.clone(),
        }
    }

    /// Decodes the payload of a stored operational event.
    pub fn decode(e: &RecordedEvent) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(&e.payload)
    }

    /// The occurred-at instant.
    pub fn occurred_at(&self) -> OccurredAt {
        OccurredAt::from_parts(self.occurred_at.clone(), self.occurred_at_us)
    }
}

impl fmt::Display for OccurredAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "entityId": "0125123456",
            "entityType": "Bag",
            "eventType": "BagLoaded",
            "occurredAt": "2026-11-28T08:15:00+01:00",
            "location": {"code": "MAD", "detail": "T4S stand 12"},
            "source": "BRS-MAD",
            "attributes": {"flight": "IB3170"},
            "relatedEntities": [{"entityId": "AKE12345IB", "entityType": "ULD", "relation": "containedIn"}]
        })
    }

    #[test]
    fn accepts_a_valid_event_and_normalises_time() {
        let ev = validate_capture(valid().to_string().as_bytes()).unwrap();
        assert_eq!(ev.occurred_at.as_sent(), "2026-11-28T08:15:00+01:00");
        assert_eq!(ev.occurred_at.utc_rfc3339(), "2026-11-28T07:15:00Z");
        assert_eq!(ev.stream_id().unwrap().as_str(), "Entity-Bag-0125123456");
        assert_eq!(ev.related_entities[0].relation, "containedIn");
    }

    #[test]
    fn lists_every_field_error() {
        let body = json!({
            "eventId": "nope",
            "entityId": "a b",
            "entityType": "1Bag",
            "occurredAt": "2026-11-28T08:15:00",
            "location": {"code": "mad", "x": 1},
            "attributes": [],
            "relatedEntities": [{"entityId": "x"}],
            "extra": true
        });
        let Err(CaptureError::Invalid { errors }) = validate_capture(body.to_string().as_bytes())
        else {
            panic!("expected invalid")
        };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "extra",
            "eventId",
            "entityId",
            "entityType",
            "eventType",
            "occurredAt",
            "location.x",
            "location.code",
            "attributes",
            "relatedEntities[0].entityType",
            "relatedEntities[0].relation",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn malformed_and_non_objects() {
        assert!(matches!(
            validate_capture(b"{"),
            Err(CaptureError::Malformed { .. })
        ));
        assert!(matches!(
            validate_capture(b"[1]"),
            Err(CaptureError::Invalid { errors }) if errors[0].message == "must be a JSON object"
        ));
    }

    #[test]
    fn type_checks_for_other_front_ends_match_capture() {
        assert_eq!(entity_type_problem("Bag"), None);
        assert_eq!(event_type_problem("MILESTONE_OVERDUE"), None);
        assert!(entity_type_problem("1Bag").is_some());
        assert!(entity_type_problem("Bag-1").is_some());
        assert!(event_type_problem("").is_some());
        assert!(event_type_problem("a b").is_some());
        assert_eq!(entity_id_problem("0125123456"), None);
        assert_eq!(
            entity_id_problem("urn:epc:id:sgtin:0614141.107346.2017"),
            None
        );
        assert!(entity_id_problem("").is_some());
        assert!(entity_id_problem("a/b").is_some());
        assert!(entity_id_problem(&"x".repeat(limits::MAX_ENTITY_ID_LEN + 1)).is_some());
    }

    #[test]
    fn attributes_are_size_limited() {
        let mut v = valid();
        v["attributes"] = json!({"blob": "x".repeat(limits::MAX_ATTRIBUTES_BYTES)});
        let Err(CaptureError::Invalid { errors }) = validate_capture(v.to_string().as_bytes())
        else {
            panic!("expected invalid")
        };
        assert_eq!(errors[0].field, "attributes");
    }

    #[test]
    fn stored_form_roundtrips() {
        let ev = validate_capture(valid().to_string().as_bytes()).unwrap();
        let en = Enrichment {
            tenant: TenantId::parse("acme").unwrap(),
            submitted_by: "cli".into(),
            received_at: Timestamp::from_unix_micros(5),
            correlation_id: "c-1".into(),
        };
        let stored = StoredEvent::from_capture(&ev, &en);
        assert_eq!(stored.event_type, "BagLoaded");
        let payload = serde_json::to_vec(&stored).unwrap();
        let ne = tracktrace_core::NewEvent::new(OPERATIONAL_EVENT, "application/json", payload);
        let rec = RecordedEvent::from_new(
            en.tenant.clone(),
            ev.stream_id().unwrap(),
            tracktrace_core::Version::new(1),
            tracktrace_core::Position::new(1),
            Timestamp::from_unix_micros(6),
            ne,
        );
        let s = StoredEvent::decode(&rec).unwrap();
        assert_eq!(s.source, "BRS-MAD");
        assert_eq!(s.occurred_at().utc_micros(), ev.occurred_at.utc_micros());
    }
}
