//! [`ApiError`]: every failure of the API as an RFC 9457 `application/problem+json` response,
//! and the mapping of the application's [`AppError`] onto it.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use tracktrace_app::AppError;
use tracktrace_domain::FieldError;

/// Media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Everything the API answers with a 4xx/5xx status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// 400: the request is JSON but fields are invalid (all of them listed).
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 400: a bad query parameter or path segment.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: no, expired or invalid credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403: valid credentials without the right (scope, tenant state).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 409: the request conflicts with stored state (e.g. an entity's type).
    #[error("conflict: {0}")]
    Conflict(String),
    /// 413: the body is larger than the limit.
    #[error("payload too large")]
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 503: the store is unavailable (circuit open, connection lost); retry later.
    #[error("service unavailable")]
    Unavailable {
        /// When to retry.
        retry_after: Duration,
    },
    /// 503: the server already runs as much of some bounded work as it admits (e.g. on-demand
    /// analytics runs); retry later.
    #[error("busy: {detail}")]
    Busy {
        /// What is busy.
        detail: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// 503: the command still conflicted with concurrent writers of the same entity after
    /// the command bus's retries; retry later.
    #[error("contention")]
    Contention {
        /// When to retry.
        retry_after: Duration,
    },
    /// 503: the server is at its limit of requests in flight and sheds this one; retry later.
    #[error("overloaded")]
    Overloaded {
        /// When to retry.
        retry_after: Duration,
    },
    /// 503: the request did not complete within the server's request timeout; retry later.
    #[error("request timeout")]
    RequestTimeout {
        /// The timeout.
        after: Duration,
    },
    /// 507: the event store's storage is full; writes succeed again once space is freed.
    #[error("insufficient storage")]
    InsufficientStorage,
    /// 429: the tenant has as many open event streams as it may; close one or retry later.
    #[error("too many event streams: {0}")]
    TooManyStreams(String),
    /// 504: a bounded wait (read-your-writes) ran out.
    #[error("timeout: {0}")]
    Timeout(String),
    /// 500: a bug or a non-retryable backend failure (details only in the log).
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) | ApiError::Validation(_) | ApiError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. }
            | ApiError::Busy { .. }
            | ApiError::Contention { .. }
            | ApiError::Overloaded { .. }
            | ApiError::RequestTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        let (slug, title, detail) = match self {
            ApiError::Malformed(d) => ("malformed-json", "Malformed JSON", d.clone()),
            ApiError::Validation(errs) => (
                "validation",
                "Validation failed",
                format!("{} invalid field(s)", errs.len()),
            ),
            ApiError::BadRequest(d) => ("bad-request", "Bad request", d.clone()),
            ApiError::Unauthorized(d) => ("unauthorized", "Unauthorized", d.clone()),
            ApiError::Forbidden(d) => ("forbidden", "Forbidden", d.clone()),
            ApiError::NotFound(d) => ("not-found", "Not found", d.clone()),
            ApiError::Conflict(d) => ("conflict", "Conflict", d.clone()),
            ApiError::PayloadTooLarge => (
                "payload-too-large",
                "Payload too large",
                "the request body exceeds the size limit".into(),
            ),
            ApiError::UnsupportedMediaType => (
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as application/json".into(),
            ),
            ApiError::Unavailable { .. } => (
                "unavailable",
                "Service unavailable",
                "the event store is unavailable; retry later".into(),
            ),
            ApiError::Busy { detail, .. } => ("busy", "Busy", detail.clone()),
            ApiError::Contention { .. } => (
                "contention",
                "Contention",
                "the entity is being changed concurrently; retry later".into(),
            ),
            ApiError::InsufficientStorage => (
                "insufficient-storage",
                "Insufficient storage",
                "the event store's disk is full: nothing was stored; retry once space is freed"
                    .into(),
            ),
            ApiError::Overloaded { .. } => (
                "overloaded",
                "Overloaded",
                "the server is at its limit of requests in flight; retry later".into(),
            ),
            ApiError::RequestTimeout { after } => (
                "request-timeout",
                "Request timeout",
                format!(
                    "the request did not complete within {} ms; retry later",
                    after.as_millis()
                ),
            ),
            ApiError::TooManyStreams(d) => {
                ("too-many-streams", "Too many event streams", d.clone())
            }
            ApiError::Timeout(d) => ("timeout", "Timeout", d.clone()),
            ApiError::Internal => (
                "internal",
                "Internal server error",
                "an internal error occurred".into(),
            ),
        };
        Problem {
            r#type: format!("/problems/{slug}"),
            title: title.into(),
            status: self.status().as_u16(),
            detail,
            errors: match self {
                ApiError::Validation(errs) => errs.clone(),
                _ => Vec::new(),
            },
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// Problem type (a relative URI naming the kind of problem).
    pub r#type: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// Field-level errors (validation problems only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The problem type of an error response (a response extension, for the request log).
#[derive(Debug, Clone)]
pub struct ProblemType(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let problem = self.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.extensions_mut().insert(ProblemType(problem.r#type));
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tracktrace\""),
                );
            }
            ApiError::Unavailable { retry_after }
            | ApiError::Busy { retry_after, .. }
            | ApiError::Contention { retry_after }
            | ApiError::Overloaded { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::RequestTimeout { .. } | ApiError::TooManyStreams(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::InsufficientStorage => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            }
            _ => {}
        }
        res
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Malformed(d) => ApiError::Malformed(d),
            AppError::Validation(errors) => ApiError::Validation(errors),
            AppError::BadRequest(d) => ApiError::BadRequest(d),
            AppError::Forbidden(d) => ApiError::Forbidden(d),
            AppError::NotFound(d) => ApiError::NotFound(d),
            AppError::Conflict(d) => ApiError::Conflict(d),
            AppError::TooLarge { .. } => ApiError::PayloadTooLarge,
            AppError::StorageFull(_) => ApiError::InsufficientStorage,
            e @ (AppError::Unavailable { .. } | AppError::Contention(_)) => {
                let retry_after = e.retry_after().unwrap_or(Duration::from_secs(1));
                tracing::warn!(error = %e, "request failed: retry later");
                if matches!(e, AppError::Contention(_)) {
                    ApiError::Contention { retry_after }
                } else {
                    ApiError::Unavailable { retry_after }
                }
            }
            AppError::Busy { what, retry_after } => {
                tracing::warn!(what = %what, "request refused: busy");
                ApiError::Busy {
                    detail: what,
                    retry_after,
                }
            }
            AppError::Timeout(d) => ApiError::Timeout(d),
            other => {
                // Internal errors (and variants added later) are logged with their cause;
                // the client learns nothing about our internals.
                tracing::error!(error = %other, "internal error");
                ApiError::Internal
            }
        }
    }
}
