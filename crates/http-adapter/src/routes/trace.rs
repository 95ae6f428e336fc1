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

use crate::auth::{Principal, now_secs};
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
/// head (new events only). The stream ends with an `event: error` whose data says why
/// (`{"reason": "lagged" | "tenantInactive" | "tokenExpired" | "storeFailed", …}`) when the
/// client fell too far behind (resume from the last id), the tenant is suspended, or the token
/// expires; at most a configured number of streams per tenant and process (429 beyond).
#[utoipa::path(
    get,
    path = "/api/v1/subscribe",
    tag = "trace",
    params(SubscribeQuery, ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position")),
    responses(
        (status = 200, description = "text/event-stream of timeline entries (event = eventType, id = position); a final `error` event says why a stream ended", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Forbidden", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many open streams for the tenant (Retry-After)", body = Problem, content_type = "application/problem+json"),
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
    use tracktrace_app::trace::live::{Closed, LiveItem};

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
    let slot = state.open_stream(&p.tenant)?;
    let entries = app
        .live_entries(&p, last_event_id.or(q.after).map(Position::new), filter)
        .await?;
    let closed = |reason: &str, detail: String| {
        Event::default()
            .event("error")
            .data(serde_json::json!({"reason": reason, "detail": detail}).to_string())
    };
    // (is this the stream's last event, the event)
    let items = entries.map(move |item| match item {
        LiveItem::Entry(e) => (
            false,
            Event::default()
                .id(e.position.get().to_string())
                .event(e.entry.event_type.clone())
                .data(serde_json::to_string(&e.entry).unwrap_or_default()),
        ),
        LiveItem::Closed(Closed::Lagged { missed }) => (
            true,
            closed(
                "lagged",
                format!("the client fell {missed} events behind; reconnect with Last-Event-ID"),
            ),
        ),
        LiveItem::Closed(Closed::TenantInactive) => (
            true,
            closed("tenantInactive", "the tenant was suspended".into()),
        ),
        LiveItem::Closed(Closed::StoreFailed(e)) => (true, closed("storeFailed", e)),
    });
    // A source that ends without a reason (the process shuts down) ends the stream too.
    let items = items.chain(futures_util::stream::once(async move {
        (true, closed("ended", "the server is shutting down".into()))
    }));
    // The stream also ends at the token's expiry (with a last error event) and at shutdown.
    let left = std::time::Duration::from_secs(p.expires_at.saturating_sub(now_secs()));
    let expiry = futures_util::stream::once(async move {
        tokio::time::sleep(left).await;
        (
            true,
            closed(
                "tokenExpired",
                "the token expired; reconnect with a new one".into(),
            ),
        )
    });
    // Ends right after its last event (without waiting for the sources to end).
    let merged = Box::pin(futures_util::stream::select(items, expiry));
    let events = futures_util::stream::unfold(
        (merged, false, slot),
        |(mut merged, done, slot)| async move {
            if done {
                return None;
            }
            let (last, e) = merged.next().await?;
            // The stream holds its tenant's slot until it ends.
            Some((Ok::<_, std::convert::Infallible>(e), (merged, last, slot)))
        },
    );
    let stream = events.take_until(state.closing());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
