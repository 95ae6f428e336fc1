//! The REST API: [`router`] over an [`AppState`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tracktrace_core::{EventStore, Position, ReadModelStore, TenantId, Timestamp};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{JwtKeys, Principal, Scope};
use crate::cache::{TraceCache, cache_key};
use crate::capture::{CaptureCommand, CaptureService, Captured};
use crate::domain::{
    CaptureError, Enrichment, FieldError, limits, parse_instant, validate_capture_value,
};
use crate::error::{ApiError, Problem};
use crate::metrics::{CacheResult, Metrics};
use crate::projection::wait_for;
use crate::schemas::{SchemaInfo, SchemaRegistry};
use crate::tenants::{TenantInfo, TenantRegistry, parse_new_tenant};
use crate::timeline::{
    self, CurrentStatus, EntityStatus, EntryMeta, Leg, TimelineEntry, TimelineFilter, decode_cursor,
};

/// API settings.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Longest wait of a `minPosition` read-your-writes request.
    pub read_your_writes_timeout: Duration,
    /// Page size when `limit` is absent.
    pub default_limit: usize,
    /// Largest accepted `limit`.
    pub max_limit: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            read_your_writes_timeout: Duration::from_secs(2),
            default_limit: 100,
            max_limit: 1000,
        }
    }
}

/// Shared state of every handler (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModelStore>,
    tenants: TenantRegistry,
    schemas: SchemaRegistry,
    keys: JwtKeys,
    capture: CaptureService,
    cache: TraceCache,
    progress: Option<watch::Receiver<Position>>,
    /// Whether this process leads the background work (set by the server; absent: API only).
    leading: std::sync::OnceLock<watch::Receiver<bool>>,
    config: ApiConfig,
    /// Set at shutdown: ends open event streams so graceful shutdown can drain connections.
    closing: watch::Sender<bool>,
    analytics: crate::analytics::Analytics,
    metrics: Metrics,
    /// Partner routes, and the publishers / bus consumer when they run in this process.
    #[cfg(feature = "nats")]
    propagation: crate::propagation::Propagation,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    /// State over `store` (already wrapped in the circuit breaker) and its read-model store.
    /// `progress`: the local trace projection's committed checkpoint, if it runs in this
    /// process.
    pub fn new(
        store: Arc<dyn EventStore>,
        read_models: Arc<dyn ReadModelStore>,
        keys: JwtKeys,
        cache: TraceCache,
        progress: Option<watch::Receiver<Position>>,
        config: ApiConfig,
    ) -> Self {
        Self::with_metrics(
            store,
            read_models,
            keys,
            cache,
            progress,
            config,
            Metrics::new(),
        )
    }

    /// Like [`AppState::new`], exporting into `metrics` (see [`crate::metrics`]): the head of
    /// `store` and, with `progress`, the trace projection's lag are measured at scrape time.
    pub fn with_metrics(
        store: Arc<dyn EventStore>,
        read_models: Arc<dyn ReadModelStore>,
        keys: JwtKeys,
        cache: TraceCache,
        progress: Option<watch::Receiver<Position>>,
        config: ApiConfig,
        metrics: Metrics,
    ) -> Self {
        metrics.watch_event_store(&store);
        if let Some(p) = &progress
            && let Err(e) =
                metrics.register_projection(crate::projection::TRACE_PROJECTION, &store, p.clone())
        {
            tracing::warn!(error = %e, "trace projection lag not exported twice");
        }
        let schemas = SchemaRegistry::new(store.clone());
        Self {
            inner: Arc::new(Inner {
                tenants: TenantRegistry::new(store.clone()),
                analytics: crate::analytics::Analytics::new(store.clone()),
                capture: CaptureService::new(store.clone()).with_schemas(schemas.clone()),
                schemas,
                #[cfg(feature = "nats")]
                propagation: crate::propagation::Propagation::new(store.clone()),
                store,
                read_models,
                keys,
                cache,
                progress,
                leading: std::sync::OnceLock::new(),
                config,
                closing: watch::Sender::new(false),
                metrics,
            }),
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Ends every open event stream (SSE) and refuses new ones: called at shutdown, since
    /// graceful shutdown waits for open connections to finish.
    pub fn close_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Reports, in `/readyz`, whether this process leads the background work.
    pub fn with_leading(self, leading: watch::Receiver<bool>) -> Self {
        let _ = self.inner.leading.set(leading);
        self
    }

    /// The tenant registry.
    pub fn tenants(&self) -> &TenantRegistry {
        &self.inner.tenants
    }

    /// The attribute schema registry.
    pub fn schemas(&self) -> &SchemaRegistry {
        &self.inner.schemas
    }

    /// The signing keys.
    pub fn keys(&self) -> &JwtKeys {
        &self.inner.keys
    }

    /// The analytics engine (KPIs, anomalies, rejected-command counts).
    pub fn analytics(&self) -> &crate::analytics::Analytics {
        &self.inner.analytics
    }

    /// The event store (behind the circuit breaker).
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// Captures one event for `p` exactly as `POST /api/v1/events` does once the caller is
    /// authorized (validation, attribute schemas, enrichment, de-duplication, append,
    /// metrics): the entry point of other front ends, such as bus ingestion.
    pub async fn capture_event(
        &self,
        p: &Principal,
        headers: &HeaderMap,
        value: &Value,
    ) -> Result<Captured, ApiError> {
        capture_one(self, p, headers, value, "").await
    }

    /// Propagation: partner routes, publisher and bus-consumer status (feature `nats`).
    #[cfg(feature = "nats")]
    pub fn propagation(&self) -> &crate::propagation::Propagation {
        &self.inner.propagation
    }

    /// 403 unless the caller has `scope` and its tenant is active.
    async fn authorize(&self, p: &Principal, scope: Scope) -> Result<(), ApiError> {
        p.require(scope)?;
        self.inner.tenants.require_active(&p.tenant).await
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
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
        state.inner.keys.verify(token)
    }
}

/// A JSON request body of at most `LIMIT` bytes: 415 unless the content type is JSON
/// (`application/json` or `application/*+json`), 413 when larger than `LIMIT`.
#[derive(Debug)]
pub struct JsonBody<const LIMIT: usize>(pub Bytes);

fn is_json(headers: &HeaderMap) -> bool {
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

const CORRELATION_HEADER: &str = "x-correlation-id";

fn correlation_id(headers: &HeaderMap, body: &Value) -> Result<String, ApiError> {
    let from_header = match headers.get(CORRELATION_HEADER) {
        None => None,
        Some(v) => {
            let s = v
                .to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= limits::MAX_TEXT_LEN)
                .ok_or_else(|| {
                    ApiError::Validation(vec![FieldError::new(
                        "X-Correlation-Id",
                        format!(
                            "must be 1–{} visible ASCII characters",
                            limits::MAX_TEXT_LEN
                        ),
                    )])
                })?;
            Some(s.to_owned())
        }
    };
    Ok(from_header
        .or_else(|| crate::domain::body_correlation_id(body).map(str::to_owned))
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()))
}

/// Validates and dispatches one capture (shared by the single and batch endpoints), and
/// counts it in the metrics.
async fn capture_one(
    state: &AppState,
    p: &Principal,
    headers: &HeaderMap,
    value: &Value,
    prefix: &str,
) -> Result<Captured, ApiError> {
    let r = dispatch_capture(state, p, headers, value, prefix).await;
    state.inner.metrics.record_capture(&p.tenant, &r);
    r
}

async fn dispatch_capture(
    state: &AppState,
    p: &Principal,
    headers: &HeaderMap,
    value: &Value,
    prefix: &str,
) -> Result<Captured, ApiError> {
    // 6.1.1: API → Validator → (valid) CommandBus → handler → event store.
    let r = capture_validated(state, p, headers, value, prefix).await;
    if let Err(e) = &r {
        state.inner.analytics.record_outcome(&p.tenant, e);
    }
    r
}

async fn capture_validated(
    state: &AppState,
    p: &Principal,
    headers: &HeaderMap,
    value: &Value,
    prefix: &str,
) -> Result<Captured, ApiError> {
    let event = validate_capture_value(value, prefix).map_err(ApiError::Validation)?;
    let prefixed = |e: ApiError| match e {
        // Schema violations found by the capture service name fields of this item.
        ApiError::Validation(errs) if !prefix.is_empty() => ApiError::Validation(
            errs.into_iter()
                .map(|f| FieldError::new(format!("{prefix}{}", f.field), f.message))
                .collect(),
        ),
        other => other,
    };
    let enrichment = Enrichment {
        tenant: p.tenant.clone(),
        submitted_by: p.subject.clone(),
        received_at: Timestamp::now(),
        correlation_id: correlation_id(headers, value)?,
    };
    let out = state
        .inner
        .capture
        .capture(CaptureCommand { event, enrichment })
        .await
        .map_err(prefixed)?;
    if out.duplicate {
        tracing::info!(
            tenant = %p.tenant,
            event_id = %out.event_id,
            entity_id = %out.entity_id,
            position = out.position,
            "duplicate capture: returning the existing event"
        );
    }
    Ok(out)
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::from(CaptureError::Malformed {
            detail: e.to_string(),
        })
    })
}

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
async fn capture(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<{ limits::MAX_EVENT_BODY_BYTES }>,
) -> Result<Response, ApiError> {
    let refused = |e| state.inner.metrics.command_refused(e);
    state
        .authorize(&p, Scope::EventsWrite)
        .await
        .map_err(refused)?;
    let value = parse_json(&body).map_err(refused)?;
    let out = capture_one(&state, &p, &headers, &value, "").await?;
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
async fn capture_batch(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<{ limits::MAX_BATCH_BODY_BYTES }>,
) -> Result<Json<BatchResponse>, ApiError> {
    // A batch refused as a whole counts as one refused command.
    let refused = |e| state.inner.metrics.command_refused(e);
    state
        .authorize(&p, Scope::EventsWrite)
        .await
        .map_err(refused)?;
    let value = parse_json(&body).map_err(refused)?;
    let items = match value.get("events") {
        Some(Value::Array(a)) if value.as_object().is_some_and(|o| o.len() == 1) => a,
        _ => {
            return Err(refused(ApiError::Validation(vec![FieldError::new(
                "events",
                "the body must be an object with exactly one field, `events`, an array",
            )])));
        }
    };
    if items.is_empty() || items.len() > limits::MAX_BATCH_ITEMS {
        return Err(refused(ApiError::Validation(vec![FieldError::new(
            "events",
            format!("must hold 1–{} events", limits::MAX_BATCH_ITEMS),
        )])));
    }
    let mut results = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let r = capture_one(&state, &p, &headers, item, &format!("events[{index}].")).await;
        results.push(match r {
            Ok(c) => BatchItem {
                index,
                status: if c.duplicate { 200 } else { 201 },
                result: Some(c),
                problem: None,
            },
            Err(e) => BatchItem {
                index,
                status: e.status().as_u16(),
                result: None,
                problem: Some(e.problem()),
            },
        });
    }
    Ok(Json(BatchResponse { results }))
}

/// Query of a trace.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct TraceQuery {
    /// Earliest `occurredAt` (RFC 3339, inclusive).
    pub from: Option<String>,
    /// Latest `occurredAt` (RFC 3339, inclusive).
    pub to: Option<String>,
    /// Only these event types (comma-separated).
    pub event_type: Option<String>,
    /// Only this location code.
    pub location: Option<String>,
    /// Only this source.
    pub source: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// `full` (default), `compact` or `legs`.
    pub view: Option<String>,
    /// Wait (bounded) until the read model includes this position (from a capture's 201).
    pub min_position: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    Full,
    Compact,
    Legs,
}

/// A compact timeline entry.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompactEntry {
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// When (as sent).
    pub occurred_at: String,
    /// Location code.
    pub location: String,
}

/// Timeline entries of a trace, per view.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Entries {
    /// `view=full`: the stored entries ([`TimelineEntry`]) copied as they are.
    Full(Vec<Box<serde_json::value::RawValue>>),
    /// `view=compact`.
    Compact(Vec<CompactEntry>),
}

/// The trace of an entity.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceView {
    /// Entity id.
    pub entity_id: String,
    /// Entity type.
    pub entity_type: String,
    /// Events in the whole timeline.
    pub event_count: u64,
    /// Current status (latest event by `occurredAt`).
    pub status: StatusView,
    /// `full`, `compact` or `legs`.
    pub view: String,
    /// Timeline entries (`full`: every field of a timeline entry; `compact`: id, type, time,
    /// location).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<TimelineEntry>>)]
    pub events: Option<Entries>,
    /// Journey legs (`view=legs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legs: Option<Vec<Leg>>,
    /// Cursor of the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Global position of the last event reflected for this entity.
    pub position: u64,
}

/// Current status of an entity.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// Last event type.
    pub event_type: String,
    /// Last location.
    pub location: crate::domain::Location,
    /// When (as sent).
    pub occurred_at: String,
}

impl From<&CurrentStatus> for StatusView {
    fn from(c: &CurrentStatus) -> Self {
        Self {
            event_type: c.event_type.clone(),
            location: c.location.clone(),
            occurred_at: c.occurred_at.clone(),
        }
    }
}

struct ParsedQuery {
    filter: TimelineFilter,
    cursor: Option<Vec<u8>>,
    limit: usize,
    view: View,
    /// Normalised form (cache key part).
    key: String,
}

fn parse_query(q: &TraceQuery, cfg: &ApiConfig) -> Result<ParsedQuery, ApiError> {
    let mut errors = Vec::new();
    let mut instant = |name: &str, v: &Option<String>| match v {
        None => None,
        Some(s) => match parse_instant(s) {
            Ok(t) => Some(t),
            Err(m) => {
                errors.push(FieldError::new(name, m));
                None
            }
        },
    };
    let from_us = instant("from", &q.from);
    let to_us = instant("to", &q.to);
    let limit = q.limit.unwrap_or(cfg.default_limit);
    if limit == 0 || limit > cfg.max_limit {
        errors.push(FieldError::new(
            "limit",
            format!("must be 1–{}", cfg.max_limit),
        ));
    }
    let view = match q.view.as_deref() {
        None | Some("full") => View::Full,
        Some("compact") => View::Compact,
        Some("legs") => View::Legs,
        Some(_) => {
            errors.push(FieldError::new("view", "must be full, compact or legs"));
            View::Full
        }
    };
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => match decode_cursor(c) {
            Ok(c) => Some(c),
            Err(_) => {
                errors.push(FieldError::new("cursor", "is not a cursor of this API"));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let mut event_types: Vec<String> = q
        .event_type
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    event_types.sort();
    event_types.dedup();
    let filter = TimelineFilter {
        from_us,
        to_us,
        event_types,
        location: q.location.clone(),
        source: q.source.clone(),
    };
    let key = serde_json::to_string(&(
        filter.from_us,
        filter.to_us,
        &filter.event_types,
        &filter.location,
        &filter.source,
        limit,
        &q.cursor,
        format!("{view:?}"),
    ))
    .unwrap_or_default();
    Ok(ParsedQuery {
        filter,
        cursor,
        limit,
        view,
        key,
    })
}

fn check_entity_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= limits::MAX_ENTITY_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:@+~-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Validation(vec![FieldError::new(
            "entityId",
            "may only contain 1–128 ASCII letters, digits and . _ : @ + ~ -",
        )]))
    }
}

fn json_bytes_response(bytes: Bytes, cache: &'static str) -> Response {
    let mut res = (StatusCode::OK, bytes).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("x-cache", HeaderValue::from_static(cache));
    res
}

/// The trace of an entity: its timeline ordered by `occurredAt`, filtered, paginated, in one
/// of three views, with its current status.
#[utoipa::path(
    get,
    path = "/api/v1/trace/{entityId}",
    tag = "trace",
    params(("entityId" = String, Path, description = "Entity id"), TraceQuery),
    responses(
        (status = 200, description = "The trace", body = TraceView),
        (status = 400, description = "Bad query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown entity", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "minPosition not reached in time", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn trace(
    State(state): State<AppState>,
    p: Principal,
    Path(entity_id): Path<String>,
    query: Result<Query<TraceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    state.authorize(&p, Scope::TraceRead).await?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    check_entity_id(&entity_id)?;
    let pq = parse_query(&q, &state.inner.config)?;
    let rm = &*state.inner.read_models;
    if let Some(min) = q.min_position {
        wait_for(
            rm,
            state.inner.progress.as_ref(),
            Position::new(min),
            state.inner.config.read_your_writes_timeout,
        )
        .await?;
    }
    // Query latency excludes the read-your-writes wait (that is the projection's lag).
    let started = std::time::Instant::now();
    let metrics = &state.inner.metrics;
    // 6.1.2: the entity's generation, then the cache, then the read store.
    let status = timeline::load_status(rm, &p.tenant, &entity_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("entity {entity_id}")))?;
    let key = cache_key(&p.tenant, &entity_id, status.last_position, &pq.key);
    if let Some(hit) = state.inner.cache.get(&p.tenant, &key).await {
        metrics.cache_lookup(CacheResult::Hit);
        metrics.trace_query(CacheResult::Hit, started.elapsed());
        return Ok(json_bytes_response(hit, "hit"));
    }
    metrics.cache_lookup(CacheResult::Miss);
    let view = build_view(rm, &p.tenant, &status, &pq).await?;
    let bytes = Bytes::from(serde_json::to_vec(&view).map_err(|_| ApiError::Internal)?);
    state.inner.cache.put(&p.tenant, key, bytes.clone()).await;
    metrics.trace_query(CacheResult::Miss, started.elapsed());
    Ok(json_bytes_response(bytes, "miss"))
}

async fn build_view(
    rm: &dyn ReadModelStore,
    tenant: &TenantId,
    status: &EntityStatus,
    pq: &ParsedQuery,
) -> Result<TraceView, ApiError> {
    let page = timeline::read_timeline(
        rm,
        tenant,
        &status.entity_id,
        &pq.filter,
        pq.cursor.as_deref(),
        pq.limit,
    )
    .await?;
    let corrupt = |e: serde_json::Error| {
        tracing::error!(error = %e, "undecodable timeline entry");
        ApiError::Internal
    };
    let metas = || -> Result<Vec<EntryMeta<'_>>, ApiError> {
        page.entries
            .iter()
            .map(|b| EntryMeta::parse(b).map_err(corrupt))
            .collect()
    };
    let (events, legs, view) = match pq.view {
        View::Full => (
            Some(Entries::Full(
                page.entries
                    .iter()
                    .map(|b| serde_json::from_slice(b).map_err(corrupt))
                    .collect::<Result<_, _>>()?,
            )),
            None,
            "full",
        ),
        View::Compact => (
            Some(Entries::Compact(
                metas()?
                    .into_iter()
                    .map(|e| CompactEntry {
                        event_id: e.event_id.into_owned(),
                        event_type: e.event_type.into_owned(),
                        occurred_at: e.occurred_at.into_owned(),
                        location: e.location.code.into_owned(),
                    })
                    .collect(),
            )),
            None,
            "compact",
        ),
        View::Legs => (None, Some(timeline::legs(&metas()?)), "legs"),
    };
    Ok(TraceView {
        entity_id: status.entity_id.clone(),
        entity_type: status.entity_type.clone(),
        event_count: status.event_count,
        status: StatusView::from(&status.current),
        view: view.into(),
        events,
        legs,
        next_cursor: page.next_cursor,
        position: status.last_position,
    })
}

/// Query of a subscription.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct SubscribeQuery {
    /// Only this entity's events.
    pub entity_id: Option<String>,
    /// Only these event types (comma-separated).
    pub event_type: Option<String>,
    /// Start after this position (like `Last-Event-ID`, which wins when both are given).
    pub after: Option<u64>,
}

/// Server-Sent Events of the tenant's captured events, in log order, filtered by entity and
/// event type. Each event's `id` is its position: reconnect with `Last-Event-ID` to resume
/// exactly after the last event received. Without either, the stream starts at the current
/// head (new events only).
#[utoipa::path(
    get,
    path = "/api/v1/subscribe",
    tag = "trace",
    params(SubscribeQuery, ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses(
        (status = 200, description = "text/event-stream of timeline entries (event = eventType, id = position)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn subscribe(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tracktrace_core::{EventFilter, SubscribeOptions, Subscription};

    state.authorize(&p, Scope::TraceRead).await?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(id) = &q.entity_id {
        check_entity_id(id)?;
    }
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a position".into()))?,
        ),
    };
    let from = match last_event_id.or(q.after) {
        Some(after) => Position::new(after).next(),
        None => state.inner.store.head().await?.next(),
    };
    let event_types: Vec<String> = q
        .event_type
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let sub = Subscription::new(
        state.inner.store.clone(),
        SubscribeOptions {
            from,
            filter: EventFilter {
                tenant: Some(p.tenant.clone()),
                event_types: vec![crate::domain::OPERATIONAL_EVENT.into()],
                stream_prefix: Some(crate::domain::ENTITY_STREAM_PREFIX.into()),
            },
            batch_size: 256,
        },
    );
    let entity = q.entity_id.clone();
    let stream = futures_util::stream::unfold(sub, move |mut sub| {
        let entity = entity.clone();
        let event_types = event_types.clone();
        async move {
            loop {
                let e = match sub.next().await {
                    Ok(e) => e,
                    Err(err) => {
                        tracing::warn!(error = %err, "subscription ended");
                        return None;
                    }
                };
                let Some(entry) = timeline::entry_of(&e) else {
                    continue;
                };
                if entity.as_ref().is_some_and(|id| *id != entry.1)
                    || (!event_types.is_empty() && !event_types.contains(&entry.0.event_type))
                {
                    continue;
                }
                let ev = Event::default()
                    .id(e.position.get().to_string())
                    .event(entry.0.event_type.clone())
                    .data(serde_json::to_string(&entry.0).unwrap_or_default());
                return Some((Ok::<_, std::convert::Infallible>(ev), sub));
            }
        }
    });
    let mut closing = state.inner.closing.subscribe();
    let stream = futures_util::StreamExt::take_until(stream, async move {
        let _ = closing.wait_for(|c| *c).await;
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Body of a tenant creation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewTenant {
    /// Tenant id: 1–64 of `A–Z a–z 0–9 _ . -`, not starting with `_`.
    pub id: String,
}

/// 403 unless `p` holds an admin token of the system tenant; `what` names what needs it.
pub(crate) fn require_system_admin(p: &Principal, what: &str) -> Result<(), ApiError> {
    if p.is_system_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "{what}: an admin token of the system tenant is required"
        )))
    }
}

fn require_admin(p: &Principal) -> Result<(), ApiError> {
    require_system_admin(p, "tenant administration")
}

/// 404 unless `tenant` is in the registry (looked up again on a miss).
pub(crate) async fn require_tenant(state: &AppState, tenant: &TenantId) -> Result<(), ApiError> {
    match state.inner.tenants.status(tenant).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound(format!("tenant {tenant}"))),
    }
}

/// Create a tenant (idempotent: 200 if it exists).
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants",
    tag = "admin",
    request_body = NewTenant,
    responses(
        (status = 201, description = "Created", body = TenantInfo),
        (status = 200, description = "Already existed", body = TenantInfo),
        (status = 400, description = "Invalid id", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn create_tenant(
    State(state): State<AppState>,
    p: Principal,
    JsonBody(body): JsonBody<4096>,
) -> Result<Response, ApiError> {
    require_admin(&p)?;
    let req: NewTenant = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Validation(vec![FieldError::new("id", e.to_string())]))?;
    let tenant = parse_new_tenant(&req.id)?;
    let (info, created) = state.inner.tenants.create(&tenant, &p.subject).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)).into_response())
}

/// List tenants.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants",
    tag = "admin",
    responses(
        (status = 200, description = "Every tenant", body = Vec<TenantInfo>),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn list_tenants(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<Vec<TenantInfo>>, ApiError> {
    require_admin(&p)?;
    Ok(Json(state.inner.tenants.list().await?))
}

async fn set_suspended(
    state: &AppState,
    p: &Principal,
    id: &str,
    suspend: bool,
) -> Result<Json<TenantInfo>, ApiError> {
    require_admin(p)?;
    let tenant = TenantId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(Json(
        state
            .inner
            .tenants
            .set_suspended(&tenant, suspend, &p.subject)
            .await?,
    ))
}

/// Suspend a tenant: every request of its tokens gets 403 until resumed.
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants/{id}/suspend",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Suspended", body = TenantInfo),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn suspend_tenant(
    State(state): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<TenantInfo>, ApiError> {
    set_suspended(&state, &p, &id, true).await
}

/// Resume a suspended tenant.
#[utoipa::path(
    post,
    path = "/api/v1/admin/tenants/{id}/resume",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Active", body = TenantInfo),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn resume_tenant(
    State(state): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<TenantInfo>, ApiError> {
    set_suspended(&state, &p, &id, false).await
}

/// The attribute schemas of a tenant, by event type.
#[utoipa::path(
    get,
    path = "/api/v1/admin/tenants/{id}/schemas",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Registered schemas", body = Vec<SchemaInfo>),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn list_schemas(
    State(state): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<SchemaInfo>>, ApiError> {
    let tenant = admin_tenant(&state, &p, &id).await?;
    state.inner.schemas.refresh().await?;
    Ok(Json(state.inner.schemas.list(&tenant)))
}

async fn admin_tenant(state: &AppState, p: &Principal, id: &str) -> Result<TenantId, ApiError> {
    require_admin(p)?;
    let tenant = TenantId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    require_tenant(state, &tenant).await?;
    Ok(tenant)
}

fn schema_event_type(event_type: &str) -> Result<(), ApiError> {
    let ok = !event_type.is_empty()
        && event_type.len() <= 128
        && event_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Validation(vec![FieldError::new(
            "eventType",
            "1-128 characters of [A-Za-z0-9_.:-]",
        )]))
    }
}

/// Register (or replace) the JSON Schema that `attributes` of an event type must satisfy for
/// a tenant. The body is the schema itself. Captures violating it get 400 with one field
/// error per violation.
#[utoipa::path(
    put,
    path = "/api/v1/admin/tenants/{id}/schemas/{eventType}",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id"), ("eventType" = String, Path, description = "Event type")),
    request_body(content = Object, content_type = "application/json", description = "A JSON Schema (draft 2020-12 unless `$schema` says otherwise); no remote references"),
    responses(
        (status = 200, description = "Registered", body = SchemaInfo),
        (status = 400, description = "Not a usable schema", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn put_schema(
    State(state): State<AppState>,
    p: Principal,
    Path((id, event_type)): Path<(String, String)>,
    JsonBody(body): JsonBody<{ crate::schemas::MAX_SCHEMA_BYTES }>,
) -> Result<Json<SchemaInfo>, ApiError> {
    let tenant = admin_tenant(&state, &p, &id).await?;
    schema_event_type(&event_type)?;
    let schema = parse_json(&body)?;
    Ok(Json(
        state
            .inner
            .schemas
            .set(&tenant, &event_type, schema, &p.subject)
            .await?,
    ))
}

/// Remove the schema of an event type: its captures accept any `attributes` object again.
#[utoipa::path(
    delete,
    path = "/api/v1/admin/tenants/{id}/schemas/{eventType}",
    tag = "admin",
    params(("id" = String, Path, description = "Tenant id"), ("eventType" = String, Path, description = "Event type")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a system admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown tenant or no schema", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn delete_schema(
    State(state): State<AppState>,
    p: Principal,
    Path((id, event_type)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let tenant = admin_tenant(&state, &p, &id).await?;
    if state
        .inner
        .schemas
        .remove(&tenant, &event_type, &p.subject)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "no schema for event type {event_type}"
        )))
    }
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the event store answers. With feature `nats`, a `propagation` component
/// reports route breakers, lags and bus ingestion; `"status": "degraded"` there (NATS down)
/// does not fail readiness: captures are stored and published once NATS is back.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "Store unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
async fn readyz(
    State(state): State<AppState>,
) -> Result<Json<BTreeMap<&'static str, Value>>, ApiError> {
    let head = state.inner.store.head().await?;
    let mut m = BTreeMap::new();
    m.insert("head", head.get().into());
    if let Some(p) = &state.inner.progress {
        m.insert("traceProjection", p.borrow().get().into());
    }
    #[cfg(feature = "nats")]
    if let Some(p) = state.inner.propagation.readiness() {
        m.insert("propagation", p);
    }
    if let Some(l) = state.inner.leading.get() {
        m.insert("leader", u64::from(*l.borrow()).into());
    }
    Ok(Json(m))
}

/// Technical metrics in the Prometheus text format (see `ops/README.md` for the contract).
/// Needs a token of the system tenant with the `metrics:read` scope.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition (version 0.0.4)", body = String, content_type = "text/plain"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a metrics:read token of the system tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn scrape_metrics(State(state): State<AppState>, p: Principal) -> Result<Response, ApiError> {
    crate::metrics::authorize_scrape(&p)?;
    let body = state.inner.metrics.scrape().await;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        body,
    )
        .into_response())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tracktrace Track & Trace API", description = "Operational event capture and per-entity traces."),
    modifiers(&BearerAuth),
    components(schemas(Problem, FieldError))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The documented routes and their OpenAPI description (generated from the handlers, so the
/// two cannot drift apart).
pub fn api_routes() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let r = OpenApiRouter::with_openapi(ApiDoc::openapi());
    #[cfg(feature = "nats")]
    let r = r.merge(crate::propagation::admin::routes());
    r.routes(routes!(capture))
        .routes(routes!(capture_batch))
        .routes(routes!(trace))
        .routes(routes!(subscribe))
        .routes(routes!(create_tenant, list_tenants))
        .routes(routes!(suspend_tenant))
        .routes(routes!(resume_tenant))
        .routes(routes!(list_schemas))
        .routes(routes!(put_schema, delete_schema))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(scrape_metrics))
        .merge(crate::analytics::routes())
        .merge(crate::milestone::http::routes())
        .split_for_parts()
}

/// The whole API, ready to serve: every documented route plus `GET /openapi.json`.
pub fn router(state: AppState) -> axum::Router {
    let (routes, openapi) = api_routes();
    let doc = Arc::new(openapi);
    routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json((*doc).clone()) }
            }),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

/// Only `/healthz`, `/readyz` and `/metrics` (processes with role `processor`).
pub fn ops_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(scrape_metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}
