//! The command side's domain model: [`Aggregate`]s, their [`DomainEvent`]s, and field-level
//! command [`Validator`]s.
//!
//! An aggregate is a plain value rebuilt by [`Aggregate::apply`]ing its events in stream order;
//! [`Aggregate::handle`] decides, from the current state, which new events a command produces
//! (or rejects it with a typed domain error). Neither does I/O: loading, appending, retrying
//! and snapshotting are the job of [`crate::command::Repository`] and
//! [`crate::command::CommandBus`].

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::id::EventId;

/// Decodes a stored event (already upcast) as the domain event `E` with codec `C`: a payload
/// that does not decode, or whose schema version differs from `E`'s current one, is
/// [`Error::Corruption`] naming the event (`what` says whose event it is, e.g. the aggregate
/// type or the projection name).
pub fn decode_domain_event<E: DomainEvent, C: Codec>(what: &str, e: &RecordedEvent) -> Result<E> {
    let decoded: E = C::decode_event(e).map_err(|err| {
        Error::corruption(
            Some(e.position),
            format!(
                "{what} event {} (schema version {}) of {}: {err}",
                e.event_type, e.schema_version, e.stream
            ),
        )
    })?;
    if decoded.schema_version() != e.schema_version {
        return Err(Error::corruption(
            Some(e.position),
            format!(
                "{} is stored with schema version {} but the current version is {} and no \
                 upcaster bridges them",
                e.event_type,
                e.schema_version,
                decoded.schema_version()
            ),
        ));
    }
    Ok(decoded)
}

/// An event type of a domain, stored through the aggregate's [`Aggregate::Codec`].
///
/// Usually an enum with one variant per event type. Every stored event records
/// [`DomainEvent::event_type`] (what projections filter on and upcasters are keyed by) and
/// [`DomainEvent::schema_version`] (what upcasters migrate from).
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stored event type name of this value, e.g. `"Deposited"`.
    fn event_type(&self) -> &'static str;

    /// The *current* schema version of this value's event type (default 1). Stored payloads
    /// of older versions are migrated by [`crate::upcast::Upcasters`] on read; a payload whose
    /// version still differs after upcasting is reported as [`crate::Error::Corruption`].
    fn schema_version(&self) -> u32 {
        1
    }

    /// A caller-chosen event id (e.g. supplied by a client for idempotent retries). `None`
    /// (the default): derived from [`crate::command::CommandMeta::command_id`] when set,
    /// else a fresh UUIDv7.
    fn event_id(&self) -> Option<EventId> {
        None
    }

    /// A business deduplication key, unique per tenant (default none).
    fn dedup_key(&self) -> Option<String> {
        None
    }
}

/// An event-sourced consistency boundary: one stream per instance, named
/// `"{TYPE}-{id}"` (see [`crate::command::Repository::stream_id`]).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tracktrace_core::{Aggregate, DomainEvent, JsonCodec};
///
/// #[derive(Default, Clone, Serialize, Deserialize)]
/// struct Counter { value: u64 }
///
/// #[derive(Serialize, Deserialize)]
/// enum CounterEvent { Incremented { by: u64 } }
///
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str { "Incremented" }
/// }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("increment must be positive")]
/// struct ZeroIncrement;
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "Counter";
///     type Command = u64;
///     type Event = CounterEvent;
///     type Error = ZeroIncrement;
///     type Codec = JsonCodec;
///
///     fn handle(&self, by: &u64) -> Result<Vec<CounterEvent>, ZeroIncrement> {
///         if *by == 0 { return Err(ZeroIncrement) }
///         Ok(vec![CounterEvent::Incremented { by: *by }])
///     }
///     fn apply(&mut self, e: &CounterEvent) {
///         match e { CounterEvent::Incremented { by } => self.value += by }
///     }
/// }
/// ```
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// The aggregate type, used as the stream category (`"{TYPE}-{id}"`), e.g. `"Account"`.
    const TYPE: &'static str;

    /// Schema version of the snapshot encoding of the state. Bump it when the state's shape
    /// changes: snapshots of another version are ignored (the state is replayed instead).
    const SNAPSHOT_VERSION: u32 = 1;

    /// How the command bus appends this aggregate's events: [`Concurrency::Optimistic`] (the
    /// default) for aggregates with invariants, [`Concurrency::Unchecked`] for append-only
    /// aggregates whose decisions do not depend on the events other writers may add meanwhile.
    const CONCURRENCY: Concurrency = Concurrency::Optimistic;

    /// What callers ask the aggregate to do.
    type Command: Send + Sync;
    /// What happened.
    type Event: DomainEvent;
    /// Why a command was rejected by the domain.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Payload codec for events (and snapshots, when enabled): [`crate::JsonCodec`] or
    /// [`crate::PostcardCodec`].
    type Codec: Codec;

    /// Decides which events `command` produces from the current state. Pure: no I/O, and it
    /// may run more than once per command (it is re-run after a version conflict).
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state. Must not fail: the event already happened.
    fn apply(&mut self, event: &Self::Event);
}

/// How the command bus appends an aggregate's events (see [`Aggregate::CONCURRENCY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Concurrency {
    /// Append with `ExpectedVersion::Exact(v)`, `v` the version the handler decided on: a
    /// concurrent writer makes the append conflict, and the bus reloads the aggregate and runs
    /// the handler again (bounded, with backoff). Required whenever `handle` enforces an
    /// invariant over the events already in the stream (a balance, a state machine, a claim).
    Optimistic,
    /// Append with `ExpectedVersion::Any`: the store puts the events after whatever the stream
    /// holds when the append commits, so concurrent commands on one aggregate never conflict
    /// and never retry. Stream versions stay contiguous (the store assigns them); the order of
    /// concurrent commands is the order their appends commit. Only for aggregates whose
    /// `handle` accepts a command whatever other writers appended meanwhile, e.g. a log of
    /// observations ordered by their own timestamps. The state passed to `handle` may then miss
    /// events of concurrent commands; the repository caches and snapshots a state only when no
    /// other writer's events were interleaved.
    Unchecked,
}

/// One problem with one field of a command (what the HTTP layer turns into a 400 with a list).
/// Built with [`FieldError::new`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct FieldError {
    /// Dotted path of the field, e.g. `"location.airport"`.
    pub field: String,
    /// What is wrong with it, for humans.
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

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Checks a command's fields before anything is loaded. Returns every problem found (an empty
/// list means valid). Implemented for closures `Fn(&C) -> Vec<FieldError>`.
pub trait Validator<C>: Send + Sync {
    /// All field errors of `command` (empty: valid).
    fn validate(&self, command: &C) -> Vec<FieldError>;
}

impl<C, F> Validator<C> for F
where
    F: Fn(&C) -> Vec<FieldError> + Send + Sync,
{
    fn validate(&self, command: &C) -> Vec<FieldError> {
        self(command)
    }
}
