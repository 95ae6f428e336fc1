//! The one error type of the kernel; backends map their failures into it.

use std::time::Duration;

use crate::event_ref::EventRef;
use crate::id::{EventId, ExpectedVersion, IdError, Position, StreamId, TenantId, Version};

/// Boxed source error from a backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the kernel's [`Error`] as default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to an event store.
///
/// Callers branch on the kind: [`Error::Conflict`] means "reload and retry the command",
/// [`Error::is_retryable`] errors may succeed if tried again later, everything else will not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream's version did not satisfy the append's [`ExpectedVersion`]; nothing was written.
    #[error("version conflict on {tenant}/{stream}: expected {expected}, actual {actual}")]
    Conflict {
        /// Tenant of the stream.
        tenant: TenantId,
        /// The stream.
        stream: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was attempted.
        actual: Version,
    },
    /// Part of a batch duplicated already stored events while another part was new;
    /// the whole batch was rejected and nothing was written. (A batch whose events are
    /// *all* already stored is not an error: see `AppendOutcome::duplicate`.)
    #[error(
        "event {event_id} is already stored as {existing:?}, but other events of the batch are new; nothing was written"
    )]
    Duplicate {
        /// The event of the batch that was already stored.
        event_id: EventId,
        /// Where the original is.
        existing: EventRef,
    },
    /// A read-model commit expected another stored checkpoint (another runner of the same
    /// projection moved it); nothing was written.
    #[error("checkpoint {name:?} is at {actual:?}, expected {expected:?}; nothing was written")]
    CheckpointMoved {
        /// Checkpoint name.
        name: String,
        /// What the writer expected.
        expected: Option<Position>,
        /// What is stored.
        actual: Option<Position>,
    },
    /// The requested thing does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The request itself is invalid; retrying it unchanged will fail again.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The offending field (dotted path, e.g. `events[2].payload`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store is temporarily unreachable or overloaded; the operation may succeed later.
    /// An append that fails this way may or may not have been committed: retry it with the same
    /// event ids and idempotency makes the retry safe.
    #[error("event store unavailable: {reason}")]
    Unavailable {
        /// What happened.
        reason: String,
        /// When it is worth trying again, if known (e.g. an open circuit breaker).
        retry_after: Option<Duration>,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The store refused the operation because it is at capacity (a bounded queue is full):
    /// nothing was written, and the same operation may succeed after `retry_after`. Unlike
    /// [`Error::Unavailable`] this says nothing about the store's health, so it never opens a
    /// circuit breaker.
    #[error("event store overloaded: {reason}")]
    Overloaded {
        /// What is full.
        reason: String,
        /// When it is worth trying again.
        retry_after: Duration,
    },
    /// The store refused a write because its storage is (nearly) full: nothing was written,
    /// reads keep working, and writes succeed again once space is freed. Retryable; like
    /// [`Error::Overloaded`] it never opens a circuit breaker (reads are fine).
    #[error("event store storage full: {reason}")]
    StorageFull {
        /// What is full.
        reason: String,
    },
    /// The store was closed (dropped or shut down) while the caller waited on it, e.g. a
    /// [`crate::Subscription`] whose store went away. Terminal: never retryable, so a consumer
    /// loop that retries retryable errors ends.
    #[error("the event store was closed")]
    Closed,
    /// Stored data could not be decoded. Never retryable; reported with the position when known.
    #[error("corrupt data{}: {detail}", position.map(|p| format!(" at position {p}")).unwrap_or_default())]
    Corruption {
        /// Position of the damaged record, if known.
        position: Option<Position>,
        /// What is wrong.
        detail: String,
    },
    /// Any other backend failure (I/O error, driver bug, ...). Not retryable.
    #[error("event store backend error: {message}")]
    Backend {
        /// Context.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unavailable`] with a source.
    pub fn unavailable(reason: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            reason: reason.into(),
            retry_after: None,
            source: Some(source.into()),
        }
    }

    /// Shorthand for [`Error::Backend`] with a source.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Shorthand for [`Error::Corruption`].
    pub fn corruption(position: Option<Position>, detail: impl Into<String>) -> Self {
        Error::Corruption {
            position,
            detail: detail.into(),
        }
    }

    /// Whether trying the same operation again later may succeed ([`Error::Unavailable`],
    /// [`Error::Overloaded`], [`Error::StorageFull`]). Conflicts are *not* retryable as-is: the command must be re-run
    /// against fresh state.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Overloaded { .. } | Error::StorageFull { .. }
        )
    }

    /// When trying again is worth it, if the error says (an open breaker, a full queue).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Unavailable { retry_after, .. } => *retry_after,
            Error::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether this is an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

impl From<IdError> for Error {
    fn from(e: IdError) -> Self {
        let field = match &e {
            IdError::Empty { kind }
            | IdError::TooLong { kind, .. }
            | IdError::BadChar { kind, .. }
            | IdError::NotUuid { kind, .. } => kind.replace(' ', "_"),
        };
        Error::InvalidInput {
            field,
            reason: e.to_string(),
        }
    }
}
