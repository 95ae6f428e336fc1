//! Bus ingestion: messages published on `tracktrace.ingest.<tenant>` (a `.` in the tenant id
//! written `~`, as in published subjects) go through the same capture pipeline as
//! `POST /api/v1/events` ([`CapturePipeline::capture`]): tenant active? →
//! validation (every field error, attribute schemas) → enrichment (received-at, source,
//! correlation id) → `CaptureService` (entity type claim, de-duplication by event id or dedup
//! key, durable append) → the same metrics and rejected-command counts.
//!
//! The consumer ([`tracktrace_nats::ingest`]) acknowledges a message only after the append
//! returned (or the event was recognised as a duplicate). Failures of the message itself
//! (unknown or suspended tenant, malformed JSON, invalid fields, an entity-type conflict) are
//! dead-lettered with their errors; failures the same message may survive
//! ([`AppError::is_retryable`]: store unavailable, contention, timeout) are retried
//! (redelivered by JetStream, up to its `max_deliver`). The submitter is `nats-ingest` (also the
//! `source` of a message that names none); `X-Correlation-Id` is taken from the message
//! headers, else the body's `correlationId`, else generated.
//!
//! A message with neither `eventId` nor `dedupKey` gets a deterministic event id (UUIDv5 of
//! the tenant and its `Nats-Msg-Id`, or of its bytes when it has none): a redelivery after a
//! crash between append and acknowledgement is then stored once, not twice.

use tracktrace_core::{EventId, TenantId};
use tracktrace_domain::limits;
use tracktrace_nats::ingest::{IngestHandler, IngestMessage, Verdict};
use uuid::Uuid;

use crate::access::{Actor, Scope};
use crate::capture::pipeline::{CapturePipeline, CaptureRequest};
use crate::error::AppError;
use crate::propagation::envelope::untoken;

/// Namespace of event ids derived for bus messages without `eventId`/`dedupKey`.
const BUS_EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5d1e_7f2a_93c4_4b8e_a6f0_2c71_d4e9_b318);

/// The "submitted by" of bus captures (and their `source` when the message names none).
pub const BUS_SUBMITTER: &str = "nats-ingest";

/// The header that carries a message's correlation id.
pub const CORRELATION_HEADER: &str = "X-Correlation-Id";

/// The bus ingestion pipeline: the application's capture pipeline.
#[derive(Clone, Debug)]
pub struct BusPipeline {
    capture: CapturePipeline,
}

impl BusPipeline {
    /// Ingestion through `capture`.
    pub fn new(capture: CapturePipeline) -> Self {
        Self { capture }
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
        // A redelivery after a crash between append and acknowledgement must be recognised:
        // messages without their own ids get one derived from the message.
        let name = match msg_id {
            Some(id) => [tenant.as_str().as_bytes(), b"\nmsg-id\n", id.as_bytes()].concat(),
            None => [tenant.as_str().as_bytes(), b"\nbody\n", body].concat(),
        };
        let derived =
            EventId::from_uuid(Uuid::new_v5(&BUS_EVENT_ID_NAMESPACE, &name)).unwrap_or_default();
        let actor = Actor::new(BUS_SUBMITTER, tenant.clone(), vec![Scope::EventsWrite]);
        let req = CaptureRequest::json(body)
            .correlation_id(correlation_header.map(str::to_owned))
            .correlation_field(CORRELATION_HEADER)
            .default_event_id(derived);
        match self.capture.capture(&actor, req).await {
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

/// Failures the same message may survive are retried; the others are dead-lettered with
/// their details.
fn verdict_of(e: AppError) -> Verdict {
    if e.is_retryable() {
        return Verdict::Retry(e.to_string());
    }
    match e {
        AppError::Validation(errors) => Verdict::Invalid(
            errors
                .into_iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect(),
        ),
        AppError::Malformed(m) => Verdict::Invalid(vec![format!("malformed JSON: {m}")]),
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
    use crate::analytics::Analytics;
    use crate::metrics::Metrics;
    use crate::schemas::SchemaRegistry;
    use crate::tenants::TenantRegistry;
    use crate::test_support::ContendedStore;
    use tracktrace_core::{EventStore, InMemoryStore};

    struct Fx {
        store: Arc<dyn EventStore>,
        tenants: TenantRegistry,
        bus: BusPipeline,
    }

    fn over(store: Arc<dyn EventStore>) -> Fx {
        let tenants = TenantRegistry::new(store.clone());
        let capture = CapturePipeline::new(
            store.clone(),
            tenants.clone(),
            SchemaRegistry::new(store.clone()),
            Metrics::new(),
            Analytics::new(store.clone()),
        );
        Fx {
            store,
            tenants,
            bus: BusPipeline::new(capture),
        }
    }

    fn pipeline() -> (Arc<dyn EventStore>, Fx) {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
        (store.clone(), over(store))
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
        let (store, f) = pipeline();
        let p = &f.bus;
        let acme = TenantId::parse("acme").unwrap();
        let unknown = p.process("acme", &body("B1"), None, None).await;
        assert!(
            matches!(&unknown, Verdict::Invalid(e) if e[0].contains("unknown")),
            "{unknown:?}"
        );
        f.tenants.create(&acme, "t").await.unwrap();
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
        let mut uld: serde_json::Value = serde_json::from_slice(&body("B1")).unwrap();
        uld["entityType"] = "ULD".into();
        let v = p
            .process("acme", uld.to_string().as_bytes(), None, None)
            .await;
        assert!(
            matches!(&v, Verdict::Invalid(e) if e[0].contains("conflict")),
            "{v:?}"
        );
    }

    /// Contention (the command bus still conflicting after its retries) is the server's
    /// problem, not the message's: the message is retried, not dead-lettered, and stored once
    /// the contention is over.
    #[tokio::test]
    async fn contention_is_retried_not_dead_lettered() {
        let mem: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
        let contended = Arc::new(ContendedStore::new(mem.clone(), "EntityClaim-"));
        let f = over(contended.clone());
        let acme = TenantId::parse("acme").unwrap();
        f.tenants.create(&acme, "t").await.unwrap();
        // Every attempt of the claim's command bus (20 by default) meets a concurrent writer.
        contended.conflict_next(1000);
        let v = f.bus.process("acme", &body("C1"), Some("m-c1"), None).await;
        assert!(
            matches!(&v, Verdict::Retry(m) if m.contains("contention")),
            "{v:?}"
        );
        assert!(contended.pending() < 1000, "the claim was attempted");
        let head = f.store.head().await.unwrap();
        // The redelivery after the contention: stored, once.
        contended.conflict_next(0);
        assert_eq!(
            f.bus.process("acme", &body("C1"), Some("m-c1"), None).await,
            Verdict::Stored
        );
        assert!(f.store.head().await.unwrap() > head);
        let after = f.store.head().await.unwrap();
        assert_eq!(
            f.bus.process("acme", &body("C1"), Some("m-c1"), None).await,
            Verdict::Stored
        );
        assert_eq!(f.store.head().await.unwrap(), after, "stored once");
    }
}
