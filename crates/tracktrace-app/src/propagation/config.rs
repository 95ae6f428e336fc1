//! Propagation settings of a process (plain data, present in every build so a build without
//! the `nats` feature can refuse them clearly).

use std::time::Duration;

/// Propagation settings of a server process (plain data, present in every build so a build
/// without the `nats` feature can refuse them clearly).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PropagationConfig {
    /// NATS server URL.
    pub nats_url: String,
    /// Run the outbox publishers (roles `processor` and `all`).
    pub publish: bool,
    /// Run the bus ingestion consumer (roles `processor` and `all`).
    pub ingest: bool,
    /// Subject prefix of the feed.
    pub subject_prefix: String,
    /// Publish every tenant's events into this stream (created if missing), on
    /// `<subject_prefix>.<tenant>.<entityType>.<eventType>`.
    pub feed_stream: Option<String>,
    /// Ingestion stream (created if missing, capturing `<ingest_prefix>.*`).
    pub ingest_stream: String,
    /// Ingestion subject prefix: tenants publish on `<ingest_prefix>.<tenant>`.
    pub ingest_prefix: String,
    /// Durable consumer name (shared by every process: they split the work).
    pub ingest_durable: String,
    /// Dead-letter subject prefix (`<dead_letter_prefix>.<tenant>`).
    pub dead_letter_prefix: String,
    /// Dead-letter stream (created if missing).
    pub dead_letter_stream: String,
    /// Deliveries of a failing message before it is dead-lettered.
    pub ingest_max_deliver: i64,
    /// Events per publish batch (and checkpoint interval).
    pub batch_size: usize,
    /// How long a publisher waits for JetStream's acknowledgement.
    pub ack_timeout: Duration,
    /// Consecutive failures that open a publisher's breaker.
    pub breaker_failures: u32,
    /// How long a publisher's breaker stays open before a probe.
    pub breaker_open_for: Duration,
}

impl Default for PropagationConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            publish: false,
            ingest: false,
            subject_prefix: "tracktrace".into(),
            feed_stream: None,
            ingest_stream: "TRACKTRACE_INGEST".into(),
            ingest_prefix: "tracktrace.ingest".into(),
            ingest_durable: "tracktrace-ingest".into(),
            dead_letter_prefix: "tracktrace.deadletter".into(),
            dead_letter_stream: "TRACKTRACE_DEADLETTER".into(),
            ingest_max_deliver: 10,
            batch_size: 256,
            ack_timeout: Duration::from_secs(5),
            breaker_failures: 3,
            breaker_open_for: Duration::from_secs(2),
        }
    }
}

impl PropagationConfig {
    /// Whether this process is asked to publish or ingest.
    pub fn enabled(&self) -> bool {
        self.publish || self.ingest
    }
}
