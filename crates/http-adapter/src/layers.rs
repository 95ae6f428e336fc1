//! The middleware every request passes, outermost first:
//! 1. **request id**: `x-request-id` taken from the request (or a new UUID) and returned on
//!    the response;
//! 2. **a span per request** (`request{id, method, path}`): everything logged while handling
//!    it carries the request id, and every 5xx answer is logged with its status (its cause is
//!    logged where it arose, inside the span);
//! 3. **panics** become 500 problems (logged), never a dropped connection;
//! 4. **overload protection**: at most [`HttpLimits::max_in_flight`] requests are handled at
//!    once (the others are shed at once with 503 `/problems/overloaded` + `Retry-After`,
//!    never queued), and each must produce its response within
//!    [`HttpLimits::request_timeout`] (else 503 `/problems/request-timeout` + `Retry-After`).
//!    An event stream (SSE) counts until its response starts, not while it streams.

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;

/// The header carrying a request's id.
pub const REQUEST_ID: &str = "x-request-id";

/// Limits of the HTTP layer (flags of the server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest time to produce a response (an event stream: its first byte).
    pub request_timeout: Duration,
    /// Requests handled at once; more are shed with 503.
    pub max_in_flight: usize,
    /// Open event streams (SSE) per tenant and process; more get 429.
    pub max_streams_per_tenant: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_in_flight: 512,
            max_streams_per_tenant: 100,
        }
    }
}

/// `router` with the middleware of the module docs.
pub fn apply(router: Router, limits: HttpLimits) -> Router {
    let timeout = limits.request_timeout;
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(
                header::HeaderName::from_static(REQUEST_ID),
                MakeRequestUuid,
            ))
            .layer(PropagateRequestIdLayer::new(
                header::HeaderName::from_static(REQUEST_ID),
            ))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request<_>| {
                        let id = req
                            .headers()
                            .get(REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        tracing::info_span!(
                            "request",
                            id = %id,
                            method = %req.method(),
                            path = %req.uri().path()
                        )
                    })
                    .on_request(())
                    .on_response(
                        |res: &Response<_>, latency: Duration, _span: &tracing::Span| {
                            let status = res.status();
                            if !status.is_server_error() {
                                return;
                            }
                            let problem = res
                                .extensions()
                                .get::<crate::error::ProblemType>()
                                .map_or("", |p| p.0.as_str());
                            let latency_ms = latency.as_millis() as u64;
                            // Shedding, an unavailable dependency and a full disk are expected
                            // states with a Retry-After (their cause is logged where they
                            // arise): a warning each, so an overload does not flood the error
                            // log. Everything else is an error.
                            if matches!(status.as_u16(), 503 | 507) {
                                tracing::warn!(
                                    status = status.as_u16(),
                                    problem,
                                    latency_ms,
                                    "retryable server error answered"
                                );
                            } else {
                                tracing::error!(
                                    status = status.as_u16(),
                                    problem,
                                    latency_ms,
                                    "server error answered"
                                );
                            }
                        },
                    )
                    .on_body_chunk(())
                    .on_eos(())
                    .on_failure(()),
            )
            .layer(CatchPanicLayer::custom(panicked))
            .layer(HandleErrorLayer::new(
                move |e: tower::BoxError| async move { shed(e, timeout) },
            ))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.max_in_flight.max(1),
            ))
            .timeout(timeout),
    )
}

/// The answer to a request the middleware refused or gave up on.
fn shed(e: tower::BoxError, timeout: Duration) -> ApiError {
    if e.is::<tower::timeout::error::Elapsed>() {
        ApiError::RequestTimeout { after: timeout }
    } else if e.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded {
            retry_after: Duration::from_secs(1),
        }
    } else {
        tracing::error!(error = %e, "middleware error");
        ApiError::Internal
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response<axum::body::Body> {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = what, "handler panicked");
    let mut res = ApiError::Internal.into_response();
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
