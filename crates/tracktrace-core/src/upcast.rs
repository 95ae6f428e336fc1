//! Upcasters: migrate stored payloads of old schema versions to the current one *on read*, so
//! an event type can evolve without rewriting history.
//!
//! An [`Upcaster`] turns one event type's payload from schema version `n` into `n + 1`;
//! [`Upcasters`] chains them (`1 → 2 → 3 …`) until no upcaster matches. The repository and the
//! projection runner apply the chain to every event before decoding it.
//!
//! ```
//! use tracktrace_core::upcast::Upcasters;
//!
//! // Version 1 of "Deposited" had no currency; version 2 requires one.
//! let upcasters = Upcasters::new().json("Deposited", 1, |mut v| {
//!     v["currency"] = serde_json::json!("EUR");
//!     Ok(v)
//! });
//! # let _ = upcasters;
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{BoxError, Error, Result};
use crate::event::{CONTENT_TYPE_JSON, RecordedEvent};

/// Migrates one event type's payload from [`Upcaster::source_version`] to the next version.
pub trait Upcaster: Send + Sync + 'static {
    /// The event type it applies to.
    fn event_type(&self) -> &str;
    /// The schema version it reads; it produces `source_version() + 1`.
    fn source_version(&self) -> u32;
    /// Converts the payload (of the given content type).
    fn upcast(&self, content_type: &str, payload: Bytes) -> Result<Bytes, BoxError>;
}

type JsonFn = dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync;

/// An [`Upcaster`] over JSON payloads (built by [`Upcasters::json`]).
struct JsonUpcaster {
    event_type: String,
    from_version: u32,
    f: Box<JsonFn>,
}

impl Upcaster for JsonUpcaster {
    fn event_type(&self) -> &str {
        &self.event_type
    }

    fn source_version(&self) -> u32 {
        self.from_version
    }

    fn upcast(&self, content_type: &str, payload: Bytes) -> Result<Bytes, BoxError> {
        if content_type != CONTENT_TYPE_JSON {
            return Err(format!("a JSON upcaster cannot read {content_type:?} payloads").into());
        }
        let v: serde_json::Value = serde_json::from_slice(&payload)?;
        let out = (self.f)(v)?;
        Ok(Bytes::from(serde_json::to_vec(&out)?))
    }
}

/// A chain of [`Upcaster`]s, keyed by (event type, from-version). Cheap to clone.
#[derive(Clone, Default)]
pub struct Upcasters {
    by_key: Arc<HashMap<(String, u32), Arc<dyn Upcaster>>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<_> = self.by_key.keys().collect();
        keys.sort();
        f.debug_struct("Upcasters").field("steps", &keys).finish()
    }
}

impl Upcasters {
    /// An empty chain (every event is read as stored).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `upcaster` (replacing one registered for the same event type and version).
    pub fn register(mut self, upcaster: impl Upcaster) -> Self {
        let key = (upcaster.event_type().to_owned(), upcaster.source_version());
        Arc::make_mut(&mut self.by_key).insert(key, Arc::new(upcaster));
        self
    }

    /// Adds a JSON upcaster from `from_version` to `from_version + 1` of `event_type`.
    pub fn json<F>(self, event_type: impl Into<String>, from_version: u32, f: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync + 'static,
    {
        self.register(JsonUpcaster {
            event_type: event_type.into(),
            from_version,
            f: Box::new(f),
        })
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Migrates `event` through every matching step; its `schema_version` is updated.
    /// A failing step is reported as [`Error::Corruption`] at the event's position.
    pub fn upcast(&self, mut event: RecordedEvent) -> Result<RecordedEvent> {
        if self.by_key.is_empty() {
            return Ok(event);
        }
        // Bounded: each step strictly increases the version, and there are finitely many steps.
        while let Some(u) = self
            .by_key
            .get(&(event.event_type.clone(), event.schema_version))
        {
            event.payload = u.upcast(&event.content_type, event.payload).map_err(|e| {
                Error::corruption(
                    Some(event.position),
                    format!(
                        "upcasting {} from schema version {} failed: {e}",
                        event.event_type, event.schema_version
                    ),
                )
            })?;
            event.schema_version += 1;
        }
        Ok(event)
    }
}
