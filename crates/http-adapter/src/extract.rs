//! Request extractors: the caller ([`Principal`], from the bearer token), JSON bodies with a
//! size limit ([`JsonBody`]), the correlation header, and query strings whose errors are
//! problem documents ([`query`]).

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::HttpState;

/// The header carrying a client's correlation id.
pub const CORRELATION_HEADER: &str = "X-Correlation-Id";

impl FromRequestParts<HttpState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let h = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
        let token = h
            .to_str()
            .ok()
            .and_then(|s| {
                s.strip_prefix("Bearer ")
                    .or_else(|| s.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        state.keys().verify(token)
    }
}

/// A JSON request body of at most `LIMIT` bytes: 415 unless the content type is JSON
/// (`application/json` or `application/*+json`), 413 when larger than `LIMIT`.
#[derive(Debug)]
pub struct JsonBody<const LIMIT: usize>(pub Bytes);

/// Whether the request declares a JSON body.
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for JsonBody<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > LIMIT as u64) {
            return Err(ApiError::PayloadTooLarge);
        }
        match axum::body::to_bytes(req.into_body(), LIMIT).await {
            Ok(b) => Ok(JsonBody(b)),
            Err(e) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                    || e.to_string().contains("length limit");
                if too_large {
                    Err(ApiError::PayloadTooLarge)
                } else {
                    Err(ApiError::BadRequest(format!("cannot read the body: {e}")))
                }
            }
        }
    }
}

/// The correlation id header as text (the application checks it: 1–256 visible ASCII
/// characters); bytes that are not text are passed on lossily so the check refuses them.
pub fn correlation_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CORRELATION_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// A query string, its errors as 400 problems.
pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}
