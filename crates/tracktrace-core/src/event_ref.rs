//! [`EventRef`], where a stored event is. A module of its own because both the event
//! envelopes (`RecordedEvent::to_ref`) and the error type (`Error::Duplicate`) need it, and
//! `error` must not import `event`, which imports `error` for its validation errors.

use crate::id::{EventId, Position, StreamId, Version};

/// Where a stored event is ([`EventRef::new`], or `RecordedEvent::to_ref`). Non-exhaustive:
/// fields may be added, so other crates (backends) build it with the constructor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct EventRef {
    /// The event.
    pub event_id: EventId,
    /// Its stream.
    pub stream: StreamId,
    /// Its version within the stream.
    pub version: Version,
    /// Its position in the global log.
    pub position: Position,
}

impl EventRef {
    /// Event `event_id`, stored at `version` of `stream` and `position` of the global log.
    #[inline]
    pub fn new(event_id: EventId, stream: StreamId, version: Version, position: Position) -> Self {
        Self {
            event_id,
            stream,
            version,
            position,
        }
    }
}
