//! Bus ingestion: messages published on `tracktrace.ingest.<tenant>` (a `.` in the tenant id
//! written `~`, as in published subjects) go through the same
//! pipeline as `POST /api/v1/events` ([`AppState::capture_event`]): tenant active? →
//! validation (every field error, attribute schemas) → enrichment (received-at, source,
//! correlation id) → `CaptureService` (entity type claim, de-duplication by event id or dedup
//! key, durable append) → the same metrics and rejected-command counts.
//!
//! The consumer ([`tracktrace_nats::ingest`]) acknowledges a message only after the append
//! returned (or the event was recognised as a duplicate). Unknown or suspended tenants,
//! malformed JSON, invalid fields and entity-type conflicts are dead-lettered with their
//! errors; an unavailable store is retried. The submitter is `nats-ingest` (also the
//! `source` of a message that names none); `X-Correlation-Id` is taken from the message
//! headers, else the body's `correlationId`, else generated.
//!
//! A message with neither `eventId` nor `dedupKey` gets a deterministic event id (UUIDv5 of
//! the tenant and its `Nats-Msg-Id`, or of its bytes when it has none): a redelivery after a
//! crash between append and acknowledgement is then stored once, not twice.

use axum::http::{HeaderMap, HeaderValue};
use serde_json::Value;
use tracktrace_core::TenantId;
use tracktrace_nats::ingest::{IngestHandler, IngestMessage, Verdict};
use uuid::Uuid;

use crate::api::AppState;
use crate::auth::{Principal, Scope};
use crate::domain::{FieldError, limits};
use crate::error::ApiError;

use super::envelope::untoken;

/// Namespace of event ids derived for bus messages without `eventId`/`dedupKey`.
const BUS_EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5d1e_7f2a_93c4_4b8e_a6f0_2c71_d4e9_b318);

/// The "submitted by" of bus captures (and their `source` when the message names none).
pub const BUS_SUBMITTER: &str = "nats-ingest";

/// The bus ingestion pipeline: the server's own capture path.
#[derive(Clone, Debug)]
pub struct BusPipeline {
    state: AppState,
}

impl BusPipeline {
    /// The pipeline of the server whose state is `state`.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Processes one message body for the tenant token `tenant`.
    pub async fn process(
        &self,
        tenant: &str,
        body: &[u8],
        msg_id: Option<&str>,
        correlation_header: Option<&str>,
    ) -> Verdict {
        let tenant = match TenantId::parse(untoken(tenant).into_owned()) {
            Ok(t) => t,
            Err(e) => return Verdict::Invalid(vec![format!("tenant: {e}")]),
        };
        if body.len() > limits::MAX_EVENT_BODY_BYTES {
            return Verdict::Invalid(vec![format!(
                "body: {} bytes; at most {} are allowed",
                body.len(),
                limits::MAX_EVENT_BODY_BYTES
            )]);
        }
        // What the HTTP layer checks before a capture: the tenant is known and active.
        if let Err(e) = self.state.tenants().require_active(&tenant).await {
            return verdict_of(e);
        }
        let mut value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Verdict::Invalid(vec![format!("malformed JSON: {e}")]),
        };
        if let Some(obj) = value.as_object_mut()
            && !obj.contains_key("eventId")
            && !obj.contains_key("dedupKey")
        {
            let name = match msg_id {
                Some(id) => [tenant.as_str().as_bytes(), b"\nmsg-id\n", id.as_bytes()].concat(),
                None => [tenant.as_str().as_bytes(), b"\nbody\n", body].concat(),
            };
            let id = Uuid::new_v5(&BUS_EVENT_ID_NAMESPACE, &name);
            obj.insert("eventId".into(), id.to_string().into());
        }
        let mut headers = HeaderMap::new();
        if let Some(c) = correlation_header {
            match HeaderValue::from_str(c) {
                Ok(v) => {
                    headers.insert("x-correlation-id", v);
                }
                Err(_) => {
                    return verdict_of(ApiError::Validation(vec![FieldError::new(
                        "X-Correlation-Id",
                        "must be visible ASCII characters",
                    )]));
                }
            }
        }
        let principal = Principal {
            subject: BUS_SUBMITTER.into(),
            tenant: tenant.clone(),
            scopes: vec![Scope::EventsWrite],
        };
        match self.state.capture_event(&principal, &headers, &value).await {
            Ok(c) => {
                if c.duplicate {
                    tracing::info!(%tenant, event_id = %c.event_id, entity_id = %c.entity_id,
                        position = c.position, "duplicate bus capture: already stored");
                }
                Verdict::Stored
            }
            Err(e) => verdict_of(e),
        }
    }
}

/// Client errors are dead-lettered with their details; server-side ones are retried.
fn verdict_of(e: ApiError) -> Verdict {
    match e {
        ApiError::Validation(errors) => Verdict::Invalid(
            errors
                .into_iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect(),
        ),
        ApiError::Malformed(m) => Verdict::Invalid(vec![format!("malformed JSON: {m}")]),
        ApiError::Unavailable { .. } | ApiError::Timeout(_) | ApiError::Internal => {
            Verdict::Retry(e.to_string())
        }
        other => Verdict::Invalid(vec![other.to_string()]),
    }
}

impl IngestHandler for BusPipeline {
    async fn handle(&self, tenant: &str, body: &[u8]) -> Verdict {
        self.process(tenant, body, None, None).await
    }

    async fn handle_message(&self, msg: IngestMessage<'_>) -> Verdict {
        self.process(msg.tenant, msg.body, msg.msg_id, msg.correlation_id)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::ApiConfig;
    use crate::auth::JwtKeys;
    use crate::cache::{CacheConfig, TraceCache};
    use tracktrace_core::{EventStore, InMemoryStore};

    fn pipeline() -> (Arc<InMemoryStore>, BusPipeline) {
        let store = Arc::new(InMemoryStore::new());
        let state = AppState::new(
            store.clone(),
            store.clone(),
            JwtKeys::from_secret(&[7; 32]).unwrap(),
            TraceCache::local(CacheConfig::default()),
            None,
            ApiConfig::default(),
        );
        (store, BusPipeline::new(state))
    }

    fn body(entity: &str) -> Vec<u8> {
        serde_json::json!({
            "entityId": entity, "entityType": "Bag", "eventType": "BagLoaded",
            "occurredAt": "2026-11-28T10:00:00Z", "location": {"code": "MAD"}
        })
        .to_string()
        .into_bytes()
    }

    #[tokio::test]
    async fn verdicts_of_the_capture_pipeline() {
        let (store, p) = pipeline();
        let acme = TenantId::parse("acme").unwrap();
        let unknown = p.process("acme", &body("B1"), None, None).await;
        assert!(
            matches!(&unknown, Verdict::Invalid(e) if e[0].contains("unknown")),
            "{unknown:?}"
        );
        p.state.tenants().create(&acme, "t").await.unwrap();
        assert_eq!(
            p.process("acme", &body("B1"), None, None).await,
            Verdict::Stored
        );
        let head = store.head().await.unwrap();
        // The same bytes again (a redelivery without ids): recognised, nothing appended.
        assert_eq!(
            p.process("acme", &body("B1"), None, None).await,
            Verdict::Stored
        );
        assert_eq!(store.head().await.unwrap(), head);
        // The same Nats-Msg-Id twice: stored once.
        let m = Some("m-1");
        assert_eq!(
            p.process("acme", &body("B2"), m, None).await,
            Verdict::Stored
        );
        let after_b2 = store.head().await.unwrap();
        assert!(after_b2 > head);
        assert_eq!(
            p.process("acme", &body("B2"), m, None).await,
            Verdict::Stored
        );
        assert_eq!(store.head().await.unwrap(), after_b2);
        let Verdict::Invalid(errors) = p
            .process("acme", br#"{"entityId": "B3"}"#, None, None)
            .await
        else {
            panic!("expected invalid")
        };
        assert!(
            errors.iter().any(|e| e.starts_with("occurredAt:")),
            "{errors:?}"
        );
        assert!(matches!(
            p.process("acme", b"{", None, None).await,
            Verdict::Invalid(_)
        ));
        assert!(matches!(
            p.process("a b", &body("B1"), None, None).await,
            Verdict::Invalid(_)
        ));
        // Another entity type for B1: the claim conflict is the client's problem.
        let mut uld: Value = serde_json::from_slice(&body("B1")).unwrap();
        uld["entityType"] = "ULD".into();
        let v = p
            .process("acme", uld.to_string().as_bytes(), None, None)
            .await;
        assert!(
            matches!(&v, Verdict::Invalid(e) if e[0].contains("conflict")),
            "{v:?}"
        );
    }
}
