//! Event envelopes: what callers append ([`NewEvent`]) and what the store returns
//! ([`RecordedEvent`]).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::event_ref::EventRef;
use crate::id::{EventId, Position, StreamId, TenantId, Timestamp, Version};

/// Size limits every backend enforces at append time (documented, and tested by the
/// conformance suite).
pub mod limits {
    /// Largest payload of one event, in bytes (1 MiB).
    pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
    /// Most events in one append.
    pub const MAX_BATCH_EVENTS: usize = 1000;
    /// Largest total payload of one append, in bytes (16 MiB).
    pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
    /// Longest event type, in bytes.
    pub const MAX_EVENT_TYPE_LEN: usize = 128;
    /// Longest dedup key, correlation id, causation id, content type, header name, in bytes.
    pub const MAX_SHORT_STRING_LEN: usize = 256;
    /// Longest header value, in bytes. Header values may hold any character but NUL (U+0000),
    /// which SQL text types cannot store.
    pub const MAX_HEADER_VALUE_LEN: usize = 4096;
    /// Most headers on one event.
    pub const MAX_HEADERS: usize = 64;
    /// Highest payload schema version (`i32::MAX`, so that every backend can keep it in a
    /// signed 32-bit column).
    pub const MAX_SCHEMA_VERSION: u32 = i32::MAX as u32;
}

/// Content type of JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Cross-cutting metadata carried by every event.
///
/// Non-exhaustive: fields may be added, so other crates build it with [`Metadata::new`] (or
/// `Default`) and the `with_*` methods:
///
/// ```
/// use tracktrace_core::Metadata;
/// let m = Metadata::new()
///     .with_correlation_id("req-1")
///     .with_causation_id("cmd-7")
///     .with_header("source", "scanner-3");
/// assert_eq!(m.correlation_id.as_deref(), Some("req-1"));
/// assert_eq!(m.headers["source"], "scanner-3");
/// ```
///
/// ```compile_fail
/// use tracktrace_core::Metadata;
/// let m = Metadata {
///     correlation_id: None,
///     causation_id: None,
///     headers: Default::default(),
/// };
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metadata {
    /// Groups every event caused by one original request.
    pub correlation_id: Option<String>,
    /// The message (command or event) that directly caused this event.
    pub causation_id: Option<String>,
    /// Free-form headers.
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata: no correlation or causation id, no headers (same as `Default`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id (builder style).
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id (builder style).
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets header `name` to `value`, replacing an earlier value (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Replaces all headers (builder style).
    #[inline]
    pub fn with_headers(mut self, headers: BTreeMap<String, String>) -> Self {
        self.headers = headers;
        self
    }
}

/// An event to append ([`NewEvent::new`] / [`NewEvent::json`] and the `with_*` methods).
/// Non-exhaustive: fields may be added.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewEvent {
    /// Unique id; re-appending an event with an id already stored (for the tenant) is idempotent.
    pub event_id: EventId,
    /// Optional business deduplication key, unique per tenant.
    pub dedup_key: Option<String>,
    /// Event type name, e.g. `"BagLoaded"`.
    pub event_type: String,
    /// Schema version of the payload (starts at 1; upcasters migrate older ones on read).
    pub schema_version: u32,
    /// MIME type of the payload, e.g. `application/json`.
    pub content_type: String,
    /// Encoded payload.
    pub payload: Bytes,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
}

impl NewEvent {
    /// A JSON event with a fresh UUIDv7 id, schema version 1 and empty metadata.
    pub fn json(event_type: impl Into<String>, payload: &serde_json::Value) -> Self {
        Self::new(
            event_type,
            CONTENT_TYPE_JSON,
            Bytes::from(serde_json::to_vec(payload).unwrap_or_default()),
        )
    }

    /// An event with a fresh UUIDv7 id, schema version 1 and empty metadata.
    pub fn new(
        event_type: impl Into<String>,
        content_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self::new_with_id(EventId::new(), event_type, content_type, payload)
    }

    /// An event with id `event_id`, schema version 1 and empty metadata. Unlike
    /// [`NewEvent::new`] it draws no fresh id, which backends decoding stored events (with
    /// [`RecordedEvent::from_new`]) would only throw away.
    #[inline]
    pub fn new_with_id(
        event_id: EventId,
        event_type: impl Into<String>,
        content_type: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            event_id,
            dedup_key: None,
            event_type: event_type.into(),
            schema_version: 1,
            content_type: content_type.into(),
            payload: payload.into(),
            metadata: Metadata::default(),
        }
    }

    /// Sets the event id (builder style).
    pub fn with_id(mut self, id: EventId) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the dedup key (builder style).
    pub fn with_dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Sets the schema version (builder style).
    #[inline]
    pub fn with_schema_version(mut self, v: u32) -> Self {
        self.schema_version = v;
        self
    }

    /// Sets the metadata (builder style).
    #[inline]
    pub fn with_metadata(mut self, m: Metadata) -> Self {
        self.metadata = m;
        self
    }
}

/// A stored event as read back from a store.
///
/// Non-exhaustive: fields may be added, so other crates (backends, tests) build it with
/// [`RecordedEvent::from_new`] from a [`NewEvent`], whose `with_*` methods set the event's own
/// fields:
///
/// ```
/// use tracktrace_core::{
///     Metadata, NewEvent, Position, RecordedEvent, StreamId, TenantId, Timestamp, Version,
/// };
/// let e = RecordedEvent::from_new(
///     TenantId::from_static("acme"),
///     StreamId::from_static("Bag-1"),
///     Version::new(1),
///     Position::new(1),
///     Timestamp::now(),
///     NewEvent::json("CHECKED_IN", &serde_json::json!({}))
///         .with_metadata(Metadata::new().with_correlation_id("req-1")),
/// );
/// assert_eq!(e.event_type, "CHECKED_IN");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// Owning tenant.
    pub tenant: TenantId,
    /// Stream.
    pub stream: StreamId,
    /// Version within the stream (1-based).
    pub version: Version,
    /// Position in the global log.
    pub position: Position,
    /// When the store recorded it (store clock).
    pub recorded_at: Timestamp,
    /// Unique id.
    pub event_id: EventId,
    /// Dedup key, if any.
    pub dedup_key: Option<String>,
    /// Event type.
    pub event_type: String,
    /// Payload schema version.
    pub schema_version: u32,
    /// Payload MIME type.
    pub content_type: String,
    /// Encoded payload.
    pub payload: Bytes,
    /// Correlation, causation and headers.
    pub metadata: Metadata,
}

impl RecordedEvent {
    /// The recorded form of `e`, stored at `version` of `stream` and `position` of the global
    /// log at `recorded_at` (used by backends, when appending and when decoding stored events;
    /// see [`NewEvent::new_with_id`]). Every field of `e` is kept.
    #[inline]
    pub fn from_new(
        tenant: TenantId,
        stream: StreamId,
        version: Version,
        position: Position,
        recorded_at: Timestamp,
        e: NewEvent,
    ) -> Self {
        Self {
            tenant,
            stream,
            version,
            position,
            recorded_at,
            event_id: e.event_id,
            dedup_key: e.dedup_key,
            event_type: e.event_type,
            schema_version: e.schema_version,
            content_type: e.content_type,
            payload: e.payload,
            metadata: e.metadata,
        }
    }

    /// Where this event is.
    pub fn to_ref(&self) -> EventRef {
        EventRef {
            event_id: self.event_id,
            stream: self.stream.clone(),
            version: self.version,
            position: self.position,
        }
    }
}

/// Checks a short string field; `field` names it in the error (built only on failure: this
/// runs for every field of every appended event).
fn check_short(field: impl FnOnce() -> String, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(field(), "must not be empty"));
    }
    if s.len() > max {
        return Err(Error::invalid(
            field(),
            format!("is {} bytes long; at most {max} are allowed", s.len()),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(
            field(),
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a batch against the documented [`limits`] and intra-batch uniqueness.
/// Every backend calls this before touching storage, so invalid input never writes anything.
pub fn validate_batch(events: &[NewEvent]) -> Result<()> {
    use limits::*;
    if events.is_empty() {
        return Err(Error::invalid(
            "events",
            "an append needs at least one event",
        ));
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(Error::invalid(
            "events",
            format!(
                "{} events in one append; at most {MAX_BATCH_EVENTS} are allowed",
                events.len()
            ),
        ));
    }
    let total: usize = events.iter().map(|e| e.payload.len()).sum();
    if total > MAX_BATCH_BYTES {
        return Err(Error::invalid(
            "events",
            format!("{total} payload bytes in one append; at most {MAX_BATCH_BYTES} are allowed"),
        ));
    }
    let mut ids = HashSet::with_capacity(events.len());
    let mut keys = HashSet::new();
    for (i, e) in events.iter().enumerate() {
        let f = |name: &str| format!("events[{i}].{name}");
        check_short(|| f("event_type"), &e.event_type, MAX_EVENT_TYPE_LEN)?;
        check_short(|| f("content_type"), &e.content_type, MAX_SHORT_STRING_LEN)?;
        if e.schema_version == 0 {
            return Err(Error::invalid(f("schema_version"), "must be at least 1"));
        }
        if e.schema_version > MAX_SCHEMA_VERSION {
            return Err(Error::invalid(
                f("schema_version"),
                format!(
                    "is {}; at most {MAX_SCHEMA_VERSION} is allowed",
                    e.schema_version
                ),
            ));
        }
        if e.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(
                f("payload"),
                format!(
                    "is {} bytes; at most {MAX_PAYLOAD_BYTES} are allowed",
                    e.payload.len()
                ),
            ));
        }
        if e.event_id.as_uuid().is_nil() {
            return Err(Error::invalid(f("event_id"), "must not be the nil UUID"));
        }
        if !ids.insert(e.event_id) {
            return Err(Error::invalid(
                f("event_id"),
                format!("{} appears twice in the batch", e.event_id),
            ));
        }
        if let Some(k) = &e.dedup_key {
            check_short(|| f("dedup_key"), k, MAX_SHORT_STRING_LEN)?;
            if !keys.insert(k.as_str()) {
                return Err(Error::invalid(
                    f("dedup_key"),
                    format!("{k:?} appears twice in the batch"),
                ));
            }
        }
        let m = &e.metadata;
        if let Some(c) = &m.correlation_id {
            check_short(|| f("metadata.correlation_id"), c, MAX_SHORT_STRING_LEN)?;
        }
        if let Some(c) = &m.causation_id {
            check_short(|| f("metadata.causation_id"), c, MAX_SHORT_STRING_LEN)?;
        }
        if m.headers.len() > MAX_HEADERS {
            return Err(Error::invalid(
                f("metadata.headers"),
                format!(
                    "{} headers; at most {MAX_HEADERS} are allowed",
                    m.headers.len()
                ),
            ));
        }
        for (k, v) in &m.headers {
            check_short(|| f("metadata.headers"), k, MAX_SHORT_STRING_LEN)?;
            if v.len() > MAX_HEADER_VALUE_LEN {
                return Err(Error::invalid(
                    f(&format!("metadata.headers.{k}")),
                    format!(
                        "value is {} bytes; at most {MAX_HEADER_VALUE_LEN} are allowed",
                        v.len()
                    ),
                ));
            }
            if v.contains('\0') {
                return Err(Error::invalid(
                    f(&format!("metadata.headers.{k}")),
                    "value must not contain the NUL character",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> NewEvent {
        NewEvent::new("T", CONTENT_TYPE_JSON, &b"{}"[..])
    }

    #[test]
    fn batch_validation_catches_each_limit() {
        assert!(validate_batch(&[ev(), ev()]).is_ok());
        assert!(validate_batch(&[]).is_err());
        let big = NewEvent::new("T", "x", vec![0u8; limits::MAX_PAYLOAD_BYTES + 1]);
        assert!(
            matches!(validate_batch(&[big]), Err(Error::InvalidInput { field, .. }) if field == "events[0].payload")
        );
        let e = ev();
        assert!(validate_batch(&[e.clone(), e]).is_err());
        let k1 = ev().with_dedup_key("k");
        let k2 = ev().with_dedup_key("k");
        assert!(validate_batch(&[k1, k2]).is_err());
        assert!(validate_batch(&[NewEvent::new("", "x", Bytes::new())]).is_err());
        assert!(validate_batch(&[ev().with_schema_version(0)]).is_err());
        let max = limits::MAX_SCHEMA_VERSION;
        assert!(validate_batch(&[ev().with_schema_version(max)]).is_ok());
        assert!(
            matches!(validate_batch(&[ev().with_schema_version(max + 1)]), Err(Error::InvalidInput { field, .. }) if field == "events[0].schema_version")
        );
        let mut nul = ev();
        nul.metadata.headers.insert("a".into(), "x\0y".into());
        assert!(
            matches!(validate_batch(&[nul]), Err(Error::InvalidInput { field, .. }) if field == "events[0].metadata.headers.a")
        );
        let mut h = ev();
        h.metadata.headers.insert("a".into(), "x".repeat(5000));
        assert!(validate_batch(&[h]).is_err());
        let too_many: Vec<_> = (0..=limits::MAX_BATCH_EVENTS).map(|_| ev()).collect();
        assert!(validate_batch(&too_many).is_err());
    }
}
