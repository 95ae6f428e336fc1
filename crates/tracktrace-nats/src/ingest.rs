//! Ingestion from the event bus: a durable JetStream pull consumer on
//! `<prefix>.<tenant>` subjects that hands each message to an [`IngestHandler`] (the same
//! validation, enrichment and de-duplication pipeline as the HTTP capture).
//!
//! The streams capture `<prefix>.*` (the tenant is exactly one subject token), so they never
//! overlap a stream of published events such as `tracktrace.*.*.*`.
//!
//! A message is acknowledged only after the handler says it is durably stored
//! ([`Verdict::Stored`]) or is invalid ([`Verdict::Invalid`], then it is first published to the
//! dead-letter subject `<dead_letter_prefix>.<tenant>` with the validation errors). Transient
//! failures are negatively acknowledged with a delay and redelivered; a message that keeps
//! failing is dead-lettered after `max_deliver` attempts, so a poison message never blocks the
//! consumer. Each message is handled in its own task under `handle_timeout`: a handler that
//! panics dead-letters that message, one that hangs is retried, and the consumer goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use tokio::task::JoinHandle;

/// What the pipeline did with one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Durably appended (or recognised as a duplicate of a stored event): acknowledge.
    Stored,
    /// Invalid: dead-letter with these errors, then acknowledge.
    Invalid(Vec<String>),
    /// A transient failure (store unavailable): redeliver later.
    Retry(String),
}

/// One message as the consumer hands it to [`IngestHandler::handle_message`].
#[derive(Clone, Copy, Debug)]
pub struct IngestMessage<'a> {
    /// The tenant token of the subject `<prefix>.<tenant>`.
    pub tenant: &'a str,
    /// The whole subject.
    pub subject: &'a str,
    /// The body.
    pub body: &'a [u8],
    /// The `Nats-Msg-Id` header, if the sender set one (its de-duplication id).
    pub msg_id: Option<&'a str>,
    /// The `X-Correlation-Id` header, if present.
    pub correlation_id: Option<&'a str>,
}

/// The ingestion pipeline behind the consumer.
pub trait IngestHandler: Send + Sync + 'static {
    /// Processes the body of one message published on `<prefix>.<tenant>`.
    fn handle(
        &self,
        tenant: &str,
        body: &[u8],
    ) -> impl std::future::Future<Output = Verdict> + Send;

    /// Processes one message with its headers; by default [`IngestHandler::handle`] of its
    /// tenant and body.
    fn handle_message(
        &self,
        msg: IngestMessage<'_>,
    ) -> impl std::future::Future<Output = Verdict> + Send {
        self.handle(msg.tenant, msg.body)
    }
}

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// JetStream stream capturing `<subject_prefix>.>` (created if missing).
    pub stream: String,
    /// Subject prefix; tenants publish on `<subject_prefix>.<tenant>`.
    pub subject_prefix: String,
    /// Durable consumer name (shared by every server process: work is split between them).
    pub durable: String,
    /// Dead-letter subject prefix.
    pub dead_letter_prefix: String,
    /// JetStream stream capturing `<dead_letter_prefix>.>` (created if missing).
    pub dead_letter_stream: String,
    /// Deliveries before a failing message is dead-lettered.
    pub max_deliver: i64,
    /// Redelivery delay after a transient failure.
    pub retry_delay: Duration,
    /// Longest time the handler may take for one message before it is redelivered.
    pub handle_timeout: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            stream: "TRACKTRACE_INGEST".into(),
            subject_prefix: "tracktrace.ingest".into(),
            durable: "tracktrace-ingest".into(),
            dead_letter_prefix: "tracktrace.deadletter".into(),
            dead_letter_stream: "TRACKTRACE_DEADLETTER".into(),
            max_deliver: 10,
            retry_delay: Duration::from_secs(1),
            handle_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of a consumer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Messages stored (acknowledged).
    pub stored: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Transient failures (redelivered).
    pub retried: u64,
}

#[derive(Default)]
struct Counters {
    stored: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
}

/// Errors setting up the consumer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// JetStream refused or could not be reached.
    #[error("JetStream: {0}")]
    JetStream(String),
}

/// A running consumer. Dropping it stops the task.
pub struct IngestConsumer {
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for IngestConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestConsumer")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for IngestConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IngestConsumer {
    /// Creates (or binds to) the stream and durable consumer, then consumes in the background.
    pub async fn start<H: IngestHandler>(
        js: jetstream::Context,
        handler: Arc<H>,
        cfg: IngestConfig,
    ) -> Result<Self, IngestError> {
        let err = |e: &dyn std::fmt::Display| IngestError::JetStream(e.to_string());
        let stream = js
            .get_or_create_stream(stream::Config {
                name: cfg.stream.clone(),
                subjects: vec![format!("{}.*", cfg.subject_prefix)],
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        js.get_or_create_stream(stream::Config {
            name: cfg.dead_letter_stream.clone(),
            subjects: vec![format!("{}.*", cfg.dead_letter_prefix)],
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &cfg.durable,
                consumer::pull::Config {
                    durable_name: Some(cfg.durable.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_deliver: cfg.max_deliver,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| err(&e))?;
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(consume(js, consumer, handler, cfg, counters.clone()));
        Ok(Self { counters, task })
    }

    /// Current counters.
    pub fn stats(&self) -> IngestStats {
        IngestStats {
            stored: self.counters.stored.load(Ordering::Relaxed),
            dead_lettered: self.counters.dead_lettered.load(Ordering::Relaxed),
            retried: self.counters.retried.load(Ordering::Relaxed),
        }
    }
}

/// Runs the handler on one message in a task of its own, so a panic or a hang affects only
/// that message.
async fn handle_isolated<H: IngestHandler>(
    handler: &Arc<H>,
    cfg: &IngestConfig,
    tenant: &str,
    subject: &str,
    msg: &jetstream::Message,
) -> Verdict {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.to_string())
    };
    let handler = handler.clone();
    let (tenant, subject, body) = (tenant.to_owned(), subject.to_owned(), msg.payload.clone());
    let (msg_id, correlation_id) = (header("Nats-Msg-Id"), header("X-Correlation-Id"));
    let timeout = cfg.handle_timeout;
    let task = tokio::spawn(async move {
        let m = IngestMessage {
            tenant: &tenant,
            subject: &subject,
            body: &body,
            msg_id: msg_id.as_deref(),
            correlation_id: correlation_id.as_deref(),
        };
        tokio::time::timeout(timeout, handler.handle_message(m)).await
    });
    match task.await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => Verdict::Retry(format!(
            "the pipeline did not answer within {} ms",
            timeout.as_millis()
        )),
        Err(e) => {
            tracing::error!(error = %e, "the ingest pipeline failed on a message");
            Verdict::Invalid(vec![format!("the pipeline failed on this message: {e}")])
        }
    }
}

async fn consume<H: IngestHandler>(
    js: jetstream::Context,
    consumer: consumer::PullConsumer,
    handler: Arc<H>,
    cfg: IngestConfig,
    counters: Arc<Counters>,
) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the ingest consumer; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "ingest consumer stream error");
                    break;
                }
            };
            let subject = msg.subject.to_string();
            let tenant = subject
                .strip_prefix(cfg.subject_prefix.as_str())
                .and_then(|s| s.strip_prefix('.'))
                .unwrap_or("")
                .to_string();
            let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
            let verdict = if tenant.is_empty() || tenant.contains('.') {
                Verdict::Invalid(vec![format!(
                    "subject {subject}: expected {}.<tenant>",
                    cfg.subject_prefix
                )])
            } else {
                handle_isolated(&handler, &cfg, &tenant, &subject, &msg).await
            };
            let verdict =
                match verdict {
                    Verdict::Retry(reason) if delivered >= cfg.max_deliver => Verdict::Invalid(
                        vec![format!("gave up after {delivered} deliveries: {reason}")],
                    ),
                    v => v,
                };
            match verdict {
                Verdict::Stored => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "ack failed; the message will be redelivered and de-duplicated");
                    }
                    counters.stored.fetch_add(1, Ordering::Relaxed);
                }
                Verdict::Invalid(errors) => {
                    let dlq = format!(
                        "{}.{}",
                        cfg.dead_letter_prefix,
                        if tenant.is_empty() {
                            "unknown"
                        } else {
                            &tenant
                        }
                    );
                    let body = serde_json::json!({
                        "subject": subject,
                        "errors": errors,
                        "payload": String::from_utf8_lossy(&msg.payload),
                    });
                    let published = match js.publish(dlq.clone(), body.to_string().into()).await {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    };
                    if published {
                        let _ = msg.ack().await;
                        counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%dlq, "dead-lettered an invalid message");
                    } else {
                        // No dead-letter stream captured it (or NATS is down): keep the message.
                        let _ = msg.ack_with(AckKind::Nak(Some(cfg.retry_delay))).await;
                        counters.retried.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Verdict::Retry(reason) => {
                    tracing::warn!(%reason, delivered, "transient ingest failure; redelivering");
                    let _ = msg.ack_with(AckKind::Nak(Some(cfg.retry_delay))).await;
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
