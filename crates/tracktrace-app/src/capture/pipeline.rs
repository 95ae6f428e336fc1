//! The capture pipeline of every front end (HTTP, bus ingestion, imports): an [`Actor`], an
//! optional correlation id and a JSON payload in, a [`Captured`] reference (or an [`AppError`])
//! out. Transport types never reach it.
//!
//! Per capture, in this order (architecture 6.1.1):
//! 1. **authorize**: the actor holds `events:write` and its tenant is active;
//! 2. **parse**: at most [`limits::MAX_EVENT_BODY_BYTES`], JSON;
//! 3. **validate** ([`validate_capture_value`]): every field error at once;
//! 4. **enrich**: received-at, submitter, correlation id (given, else the body's
//!    `correlationId`, else generated);
//! 5. **dispatch** through the [`CaptureService`] (schemas, type claim, de-duplication, durable
//!    append);
//! 6. **count**: `tracktrace_commands_total` / `…_failures_total` / ingested events, and
//!    rejected commands for the analytics KPIs.

use std::sync::Arc;

use serde_json::Value;
use tracktrace_core::{EventId, EventStore, TenantId, Timestamp};
use tracktrace_domain::{Enrichment, limits, validate_capture_value};

use crate::access::{Actor, Scope};
use crate::analytics::Analytics;
use crate::capture::aggregates::CaptureCommand;
use crate::capture::service::{CaptureService, Captured};
use crate::error::AppError;
use crate::metrics::{FailureReason, Metrics};
use crate::schemas::SchemaRegistry;
use crate::tenants::TenantRegistry;

/// The field named in errors about a correlation id when the front end names none.
pub const CORRELATION_FIELD: &str = "correlationId";

/// One capture: the payload and its context.
#[derive(Clone, Debug)]
pub struct CaptureRequest<'a> {
    payload: Payload<'a>,
    correlation_id: Option<String>,
    correlation_field: &'a str,
    default_event_id: Option<EventId>,
}

#[derive(Clone, Copy, Debug)]
enum Payload<'a> {
    Json(&'a [u8]),
    Value(&'a Value),
}

impl<'a> CaptureRequest<'a> {
    /// A capture of the JSON document `body` (parsed by the pipeline: oversized or malformed
    /// payloads are counted as refused commands).
    pub fn json(body: &'a [u8]) -> Self {
        Self::of(Payload::Json(body))
    }

    /// A capture of an already parsed event.
    pub fn value(event: &'a Value) -> Self {
        Self::of(Payload::Value(event))
    }

    fn of(payload: Payload<'a>) -> Self {
        Self {
            payload,
            correlation_id: None,
            correlation_field: CORRELATION_FIELD,
            default_event_id: None,
        }
    }

    /// The correlation id the front end received (validated: 1–256 visible ASCII
    /// characters; `None`: the body's `correlationId`, else a generated one).
    pub fn correlation_id(mut self, id: Option<String>) -> Self {
        self.correlation_id = id;
        self
    }

    /// The name under which the front end received the correlation id, for field errors
    /// (e.g. `X-Correlation-Id`; default [`CORRELATION_FIELD`]).
    pub fn correlation_field(mut self, field: &'a str) -> Self {
        self.correlation_field = field;
        self
    }

    /// The event id to use when the payload has neither `eventId` nor `dedupKey`: a front end
    /// that may deliver one message twice (a bus redelivery) derives it from the message, so
    /// the second delivery is recognised as a duplicate.
    pub fn default_event_id(mut self, id: EventId) -> Self {
        self.default_event_id = Some(id);
        self
    }
}

/// The capture pipeline (cheap to clone).
#[derive(Clone, Debug)]
pub struct CapturePipeline {
    service: CaptureService,
    tenants: TenantRegistry,
    metrics: Metrics,
    analytics: Analytics,
}

impl CapturePipeline {
    /// The pipeline over `store` (behind the circuit breaker), enforcing `schemas`, checking
    /// actors' tenants in `tenants`, counting into `metrics` and `analytics`.
    pub fn new(
        store: Arc<dyn EventStore>,
        tenants: TenantRegistry,
        schemas: SchemaRegistry,
        metrics: Metrics,
        analytics: Analytics,
    ) -> Self {
        Self {
            service: CaptureService::new(store).with_schemas(schemas),
            tenants,
            metrics,
            analytics,
        }
    }

    /// The capture service behind the pipeline (for callers that build validated commands
    /// themselves, such as the milestone saga).
    pub fn service(&self) -> &CaptureService {
        &self.service
    }

    /// Forbidden unless `actor` may capture: `events:write` and an active tenant. A refusal
    /// is counted as a refused command.
    pub async fn authorize(&self, actor: &Actor) -> Result<(), AppError> {
        let r = async {
            actor.require(Scope::EventsWrite)?;
            self.tenants.require_active(&actor.tenant).await
        }
        .await;
        r.map_err(|e| self.refused(e))
    }

    /// Captures one event for `actor` (steps 1–6 of the module docs).
    pub async fn capture(
        &self,
        actor: &Actor,
        req: CaptureRequest<'_>,
    ) -> Result<Captured, AppError> {
        self.authorize(actor).await?;
        let parsed;
        let value = match req.payload {
            Payload::Value(v) => v,
            Payload::Json(bytes) => {
                parsed = parse(bytes).map_err(|e| self.refused(e))?;
                &parsed
            }
        };
        self.capture_value(actor, &req, value, "").await
    }

    /// Captures up to [`limits::MAX_BATCH_ITEMS`] events of the JSON document
    /// `{"events": [...]}`, each independently and in order (field errors name
    /// `events[i].…`). The outer error refuses the whole batch (counted as one refused
    /// command); the inner results are the captures', counted each.
    pub async fn capture_batch(
        &self,
        actor: &Actor,
        body: &[u8],
        correlation_id: Option<String>,
        correlation_field: &str,
    ) -> Result<Vec<Result<Captured, AppError>>, AppError> {
        self.authorize(actor).await?;
        let value =
            parse_limited(body, limits::MAX_BATCH_BODY_BYTES).map_err(|e| self.refused(e))?;
        let items = match value.get("events") {
            Some(Value::Array(a)) if value.as_object().is_some_and(|o| o.len() == 1) => a,
            _ => {
                return Err(self.refused(AppError::field(
                    "events",
                    "the body must be an object with exactly one field, `events`, an array",
                )));
            }
        };
        if items.is_empty() || items.len() > limits::MAX_BATCH_ITEMS {
            return Err(self.refused(AppError::field(
                "events",
                format!("must hold 1–{} events", limits::MAX_BATCH_ITEMS),
            )));
        }
        let req = CaptureRequest::json(body)
            .correlation_id(correlation_id)
            .correlation_field(correlation_field);
        let mut results = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let prefix = format!("events[{index}].");
            results.push(self.capture_value(actor, &req, item, &prefix).await);
        }
        Ok(results)
    }

    /// Steps 3–6 for an authorized actor.
    async fn capture_value(
        &self,
        actor: &Actor,
        req: &CaptureRequest<'_>,
        value: &Value,
        prefix: &str,
    ) -> Result<Captured, AppError> {
        let r = self.validate_and_dispatch(actor, req, value, prefix).await;
        match &r {
            Ok(c) => self.metrics.record_captured(&actor.tenant, c.duplicate),
            Err(e) => {
                self.metrics.record_failure(FailureReason::of(e));
                self.analytics.record_outcome(&actor.tenant, e);
            }
        }
        r
    }

    async fn validate_and_dispatch(
        &self,
        actor: &Actor,
        req: &CaptureRequest<'_>,
        value: &Value,
        prefix: &str,
    ) -> Result<Captured, AppError> {
        let mut event = validate_capture_value(value, prefix).map_err(AppError::Validation)?;
        if event.event_id.is_none() && event.dedup_key.is_none() {
            event.event_id = req.default_event_id;
        }
        let enrichment = Enrichment {
            tenant: actor.tenant.clone(),
            submitted_by: actor.subject.clone(),
            received_at: Timestamp::now(),
            correlation_id: correlation_id(req, value)?,
        };
        let out = self
            .service
            .capture(CaptureCommand { event, enrichment })
            .await
            // Schema violations found by the capture service name fields of this item.
            .map_err(|e| e.prefixed(prefix))?;
        if out.duplicate {
            log_duplicate(&actor.tenant, &out);
        }
        Ok(out)
    }

    /// Counts a command refused before it reached the command bus and hands the error back.
    fn refused(&self, e: AppError) -> AppError {
        self.metrics.record_failure(FailureReason::of(&e));
        e
    }
}

fn log_duplicate(tenant: &TenantId, out: &Captured) {
    tracing::info!(
        %tenant,
        event_id = %out.event_id,
        entity_id = %out.entity_id,
        position = out.position,
        "duplicate capture: returning the existing event"
    );
}

fn parse(bytes: &[u8]) -> Result<Value, AppError> {
    parse_limited(bytes, limits::MAX_EVENT_BODY_BYTES)
}

fn parse_limited(bytes: &[u8], limit: usize) -> Result<Value, AppError> {
    if bytes.len() > limit {
        return Err(AppError::TooLarge { limit });
    }
    serde_json::from_slice(bytes).map_err(|e| AppError::Malformed(e.to_string()))
}

/// The given correlation id (checked), else the body's `correlationId`, else a new UUIDv7.
fn correlation_id(req: &CaptureRequest<'_>, body: &Value) -> Result<String, AppError> {
    if let Some(c) = &req.correlation_id {
        let ok = !c.is_empty()
            && c.len() <= limits::MAX_TEXT_LEN
            && c.bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t');
        if !ok {
            return Err(AppError::field(
                req.correlation_field,
                format!(
                    "must be 1–{} visible ASCII characters",
                    limits::MAX_TEXT_LEN
                ),
            ));
        }
        return Ok(c.clone());
    }
    Ok(tracktrace_domain::body_correlation_id(body)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracktrace_core::InMemoryStore;

    fn pipeline() -> (CapturePipeline, TenantRegistry) {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
        let tenants = TenantRegistry::new(store.clone());
        let p = CapturePipeline::new(
            store.clone(),
            tenants.clone(),
            SchemaRegistry::new(store.clone()),
            Metrics::new(),
            Analytics::new(store),
        );
        (p, tenants)
    }

    fn bag(id: &str) -> Value {
        serde_json::json!({"entityId": id, "entityType": "Bag", "eventType": "BagLoaded",
            "occurredAt": "2026-11-28T10:00:00Z", "location": {"code": "MAD"}})
    }

    #[tokio::test]
    async fn authorizes_validates_and_derives_ids() {
        let (p, tenants) = pipeline();
        let acme = TenantId::parse("acme").unwrap();
        let writer = Actor::new("t", acme.clone(), vec![Scope::EventsWrite]);
        let reader = Actor::new("t", acme.clone(), vec![Scope::TraceRead]);
        let body = bag("B1").to_string();
        // Unknown tenant, then a missing scope: forbidden.
        assert!(matches!(
            p.capture(&writer, CaptureRequest::json(body.as_bytes())).await,
            Err(AppError::Forbidden(m)) if m.contains("unknown")
        ));
        tenants.create(&acme, "t").await.unwrap();
        assert!(matches!(
            p.capture(&reader, CaptureRequest::json(body.as_bytes())).await,
            Err(AppError::Forbidden(m)) if m.contains("scope")
        ));
        assert!(matches!(
            p.capture(&writer, CaptureRequest::json(b"{")).await,
            Err(AppError::Malformed(_))
        ));
        let huge = vec![b' '; limits::MAX_EVENT_BODY_BYTES + 1];
        assert!(matches!(
            p.capture(&writer, CaptureRequest::json(&huge)).await,
            Err(AppError::TooLarge { .. })
        ));
        // A bad correlation id names the front end's field.
        let r = p
            .capture(
                &writer,
                CaptureRequest::json(body.as_bytes())
                    .correlation_id(Some("bad\nid".into()))
                    .correlation_field("X-Correlation-Id"),
            )
            .await;
        assert!(matches!(&r, Err(AppError::Validation(v)) if v[0].field == "X-Correlation-Id"));
        // The same message twice with a derived default event id: stored once.
        let id = EventId::new();
        let first = p
            .capture(
                &writer,
                CaptureRequest::json(body.as_bytes()).default_event_id(id),
            )
            .await
            .unwrap();
        assert_eq!(first.event_id, id.to_string());
        let second = p
            .capture(
                &writer,
                CaptureRequest::json(body.as_bytes()).default_event_id(id),
            )
            .await
            .unwrap();
        assert!(second.duplicate && second.position == first.position);
        // Batches: per-item results with prefixed field errors.
        let batch = serde_json::json!({"events": [bag("B2"), {"entityId": "B3"}]}).to_string();
        let rs = p
            .capture_batch(&writer, batch.as_bytes(), None, CORRELATION_FIELD)
            .await
            .unwrap();
        assert!(rs[0].is_ok());
        assert!(
            matches!(&rs[1], Err(AppError::Validation(v)) if v.iter().all(|f| f.field.starts_with("events[1].")))
        );
        assert!(
            p.capture_batch(&writer, br#"{"events": []}"#, None, CORRELATION_FIELD)
                .await
                .is_err()
        );
    }
}
