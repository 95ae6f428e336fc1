//! `POST /api/v1/events` and `POST /api/v1/events:batch`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracktrace_app::{CaptureRequest, Captured};
use tracktrace_domain::limits;

use crate::auth::Principal;
use crate::error::{ApiError, Problem};
use crate::extract::{CORRELATION_HEADER, JsonBody, correlation_id};
use crate::state::HttpState;

/// Capture one operational event.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "capture",
    request_body(content = Object, content_type = "application/json",
        description = "An operational event: entityId, entityType, eventType, occurredAt, location, optional eventId, dedupKey, source, attributes, relatedEntities"),
    params(("X-Correlation-Id" = Option<String>, Header, description = "Correlation id (generated when absent)")),
    responses(
        (status = 201, description = "Stored", body = Captured),
        (status = 200, description = "Duplicate: the existing event", body = Captured),
        (status = 400, description = "Malformed JSON or invalid fields", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, expired or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Missing scope, suspended or unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The entity has another type", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Event store unavailable, or the entity still contended after retries (Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn capture(
    State(state): State<HttpState>,
    p: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<{ limits::MAX_EVENT_BODY_BYTES }>,
) -> Result<Response, ApiError> {
    let req = CaptureRequest::json(&body)
        .correlation_id(correlation_id(&headers))
        .correlation_field(CORRELATION_HEADER);
    let out = state.app().capture(&p, req).await?;
    let status = if out.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut res = (status, Json(&out)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/trace/{}", out.entity_id)) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

/// Result of one item of a batch.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchItem {
    /// Index in the request.
    pub index: usize,
    /// The status a single capture would have had (201, 200, 400, 409, 503…).
    pub status: u16,
    /// The stored (or existing) event, on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Captured>,
    /// The problem, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// Response of a batch capture.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchResponse {
    /// One result per event, in request order.
    pub results: Vec<BatchItem>,
}

/// Capture up to 500 events; each is processed (and can fail) independently, in order.
#[utoipa::path(
    post,
    path = "/api/v1/events:batch",
    tag = "capture",
    request_body(content = Object, content_type = "application/json",
        description = "`{\"events\": [<event>, …]}`"),
    responses(
        (status = 200, description = "Per-item results", body = BatchResponse),
        (status = 400, description = "Malformed JSON or not an events array", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn capture_batch(
    State(state): State<HttpState>,
    p: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<{ limits::MAX_BATCH_BODY_BYTES }>,
) -> Result<Json<BatchResponse>, ApiError> {
    let results = state
        .app()
        .capture_batch(&p, &body, correlation_id(&headers), CORRELATION_HEADER)
        .await?
        .into_iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(c) => BatchItem {
                index,
                status: if c.duplicate { 200 } else { 201 },
                result: Some(c),
                problem: None,
            },
            Err(e) => {
                let e = ApiError::from(e);
                BatchItem {
                    index,
                    status: e.status().as_u16(),
                    result: None,
                    problem: Some(e.problem()),
                }
            }
        })
        .collect();
    Ok(Json(BatchResponse { results }))
}
