//! `GET /api/v1/trace/{entityId}` (cache-aside over the application's trace views) and
//! `GET /api/v1/subscribe` (Server-Sent Events of live timeline entries).

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tracktrace_app::Scope;
use tracktrace_app::metrics::CacheResult;
use tracktrace_app::trace::live::LiveFilter;
use tracktrace_app::trace::query::check_entity_id;
use tracktrace_app::trace::view::{TraceOptions, TraceView, split_list};
use tracktrace_core::Position;

use crate::auth::Principal;
use crate::cache::cache_key;
use crate::error::{ApiError, Problem};
use crate::extract::query;
use crate::state::HttpState;

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
    params(("entityId" = String, Path, description = "Entity id"), TraceOptions),
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
pub(crate) async fn trace(
    State(state): State<HttpState>,
    p: Principal,
    Path(entity_id): Path<String>,
    q: Result<Query<TraceOptions>, QueryRejection>,
) -> Result<Response, ApiError> {
    let app = state.app();
    app.authorize(&p, Scope::TraceRead).await?;
    let options = query(q)?;
    check_entity_id(&entity_id)?;
    let pq = app.parse_trace_query(&options)?;
    if let Some(min) = options.min_position {
        app.wait_for_position(Position::new(min)).await?;
    }
    // Query latency excludes the read-your-writes wait (that is the projection's lag).
    let started = std::time::Instant::now();
    let metrics = app.metrics();
    // 6.1.2: the entity's generation, then the cache, then the read store.
    let status = app.entity_status(&p.tenant, &entity_id).await?;
    let key = cache_key(&p.tenant, &entity_id, status.last_position, &pq.key);
    if let Some(hit) = state.cache().get(&p.tenant, &key).await {
        metrics.cache_lookup(CacheResult::Hit);
        metrics.trace_query(CacheResult::Hit, started.elapsed());
        return Ok(json_bytes_response(hit, "hit"));
    }
    metrics.cache_lookup(CacheResult::Miss);
    let bytes = app.trace_view(&p.tenant, &status, &pq).await?.to_json()?;
    state.cache().put(&p.tenant, key, bytes.clone()).await;
    metrics.trace_query(CacheResult::Miss, started.elapsed());
    Ok(json_bytes_response(bytes, "miss"))
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
pub(crate) async fn subscribe(
    State(state): State<HttpState>,
    p: Principal,
    headers: HeaderMap,
    q: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;

    let app = state.app();
    app.authorize(&p, Scope::TraceRead).await?;
    let q = query(q)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a position".into()))?,
        ),
    };
    let filter = LiveFilter {
        entity_id: q.entity_id,
        event_types: split_list(q.event_type.as_deref()),
    };
    let entries = app
        .live_entries(&p, last_event_id.or(q.after).map(Position::new), filter)
        .await?;
    let events = entries.map(|(position, entry)| {
        Ok::<_, std::convert::Infallible>(
            Event::default()
                .id(position.get().to_string())
                .event(entry.event_type.clone())
                .data(serde_json::to_string(&entry).unwrap_or_default()),
        )
    });
    let stream = events.take_until(state.closing());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
