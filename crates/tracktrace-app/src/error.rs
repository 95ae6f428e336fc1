//! [`AppError`]: every way an application call can fail, independent of any transport.
//!
//! Front ends map it to their own terms (the HTTP adapter to problem+json with a status; bus
//! ingestion to "retry" or "dead-letter"; sagas to transient or permanent dispatch failures)
//! and decide *whether to try again* with [`AppError::is_retryable`] only, so every front end
//! classifies a failure the same way.

use std::time::Duration;

use tracktrace_domain::{CaptureError, FieldError};

/// The retry delay suggested when the cause gives none.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why an application call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The payload is not JSON.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// Fields of the request are invalid (every one listed).
    #[error("validation failed: {}", .0.iter().map(|f| format!("{}: {}", f.field, f.message)).collect::<Vec<_>>().join("; "))]
    Validation(Vec<FieldError>),
    /// The request is invalid in a way that names no field (a bad identifier, a cursor).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller may not do this (scope, tenant state, tenant of the token).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// What the request names does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with stored state (an entity's type, a different route of the
    /// same name, too many rules).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The payload is larger than `limit` bytes.
    #[error("payload too large: at most {limit} bytes")]
    TooLarge {
        /// The limit, bytes.
        limit: usize,
    },
    /// The event store is unavailable (circuit open, connection lost).
    #[error("service unavailable: {reason}")]
    Unavailable {
        /// What was unavailable.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The store's storage is full: writes are refused (nothing written) until space is
    /// freed; reads keep working.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// This process already runs as much of some bounded work as it admits (e.g. on-demand
    /// analytics runs); the same request may succeed later.
    #[error("busy: {what}")]
    Busy {
        /// What is busy, for the caller.
        what: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// A command still conflicted with concurrent writers of the same aggregate after the
    /// command bus's retries.
    #[error("contention: {0}")]
    Contention(String),
    /// A bounded wait (read-your-writes) ran out.
    #[error("timeout: {0}")]
    Timeout(String),
    /// A bug or a non-retryable backend failure (the detail is for logs, not for clients).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    /// An internal error with its cause, for the log.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        AppError::Internal(cause.to_string())
    }

    /// Whether the same request, unchanged, may succeed later: every failure on the server's
    /// side (`Unavailable`, `StorageFull`, `Busy`, `Contention`, `Timeout`, `Internal`). `false` for failures of the
    /// request itself (invalid, forbidden, unknown, conflicting, too large), which no retry
    /// can fix. Callers that retry must bound their retries (a bug stays a bug).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AppError::Unavailable { .. }
                | AppError::StorageFull(_)
                | AppError::Busy { .. }
                | AppError::Contention(_)
                | AppError::Timeout(_)
                | AppError::Internal(_)
        )
    }

    /// When to try again, for retryable failures (the cause's hint, else
    /// [`DEFAULT_RETRY_AFTER`]); `None` for the others.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AppError::Unavailable { retry_after, .. } | AppError::Busy { retry_after, .. } => {
                Some(*retry_after)
            }
            e if e.is_retryable() => Some(DEFAULT_RETRY_AFTER),
            _ => None,
        }
    }

    /// Field errors with `prefix` prepended to their paths (`events[3].`); other errors as
    /// they are.
    pub fn prefixed(self, prefix: &str) -> Self {
        match self {
            AppError::Validation(errs) if !prefix.is_empty() => AppError::Validation(
                errs.into_iter()
                    .map(|f| FieldError::new(format!("{prefix}{}", f.field), f.message))
                    .collect(),
            ),
            other => other,
        }
    }

    /// One field error.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        AppError::Validation(vec![FieldError::new(field, message)])
    }
}

impl From<CaptureError> for AppError {
    fn from(e: CaptureError) -> Self {
        match e {
            CaptureError::Malformed { detail } => AppError::Malformed(detail),
            CaptureError::Invalid { errors } => AppError::Validation(errors),
        }
    }
}

impl From<tracktrace_core::Error> for AppError {
    fn from(e: tracktrace_core::Error) -> Self {
        use tracktrace_core::Error as E;
        match e {
            E::Unavailable { retry_after, .. } => {
                tracing::warn!(error = %e, "event store unavailable");
                AppError::Unavailable {
                    reason: e.to_string(),
                    retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
                }
            }
            E::StorageFull { .. } => {
                tracing::error!(error = %e, "event store storage full: writes refused");
                AppError::StorageFull(e.to_string())
            }
            E::Overloaded { retry_after, .. } => {
                tracing::warn!(error = %e, "event store at capacity: shedding");
                AppError::Unavailable {
                    reason: e.to_string(),
                    retry_after,
                }
            }
            E::InvalidInput { field, reason } => AppError::field(field, reason),
            E::Conflict { .. } | E::Duplicate { .. } => AppError::Conflict(e.to_string()),
            E::NotFound { what } => AppError::NotFound(what),
            other => {
                tracing::error!(error = %other, "internal error");
                AppError::Internal(other.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_failures_are_retryable_and_say_when() {
        let unavailable = AppError::Unavailable {
            reason: "down".into(),
            retry_after: Duration::from_secs(3),
        };
        let cases = [
            (unavailable, true, Some(Duration::from_secs(3))),
            (
                AppError::Busy {
                    what: "runs".into(),
                    retry_after: Duration::from_secs(5),
                },
                true,
                Some(Duration::from_secs(5)),
            ),
            (
                AppError::Contention("x".into()),
                true,
                Some(DEFAULT_RETRY_AFTER),
            ),
            (
                AppError::Timeout("x".into()),
                true,
                Some(DEFAULT_RETRY_AFTER),
            ),
            (AppError::internal("x"), true, Some(DEFAULT_RETRY_AFTER)),
            (AppError::field("a", "b"), false, None),
            (AppError::Malformed("x".into()), false, None),
            (AppError::BadRequest("x".into()), false, None),
            (AppError::Forbidden("x".into()), false, None),
            (AppError::NotFound("x".into()), false, None),
            (AppError::Conflict("x".into()), false, None),
            (AppError::TooLarge { limit: 1 }, false, None),
        ];
        for (e, retryable, after) in cases {
            assert_eq!(e.is_retryable(), retryable, "{e:?}");
            assert_eq!(e.retry_after(), after, "{e:?}");
        }
    }

    #[test]
    fn store_errors_map_to_their_kind() {
        let e: AppError = tracktrace_core::Error::Unavailable {
            reason: "x".into(),
            retry_after: None,
            source: None,
        }
        .into();
        assert!(e.is_retryable());
        let e: AppError = tracktrace_core::Error::invalid("f", "r").into();
        assert!(matches!(&e, AppError::Validation(v) if v[0].field == "f"));
        assert!(matches!(
            AppError::field("x", "y").prefixed("events[2]."),
            AppError::Validation(v) if v[0].field == "events[2].x"
        ));
    }
}
