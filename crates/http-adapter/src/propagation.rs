//! Event propagation over NATS JetStream (feature `nats`): the architecture's "Propagación
//! evento: Event Publisher → Queue → SITA" and flow 6.2.1 steps 1 (reception via the event bus)
//! and 7 (notify subscribers).
//!
//! - **Partner routes** ([`routes`]): per tenant, which event types go to which partner, on
//!   which subjects, into which JetStream stream, in which format. Routes are configuration
//!   stored as events of the system tenant, so every process sees the same routes; they are
//!   managed through the admin API ([`admin`]). Adding a route replays from a chosen position
//!   (`fromPosition`, default: the next event after the current head).
//! - **Outbox publishers**: in roles `processor` and `all` with `--nats-publish`, on the
//!   leader of the background work, one [`tracktrace_nats::publisher::Publisher`] per route,
//!   each following the global log from its own persisted checkpoint
//!   (`propagation.route.<tenant>.<route>.<addedAt>`: a route removed and added again starts
//!   afresh). The event store is the outbox: nothing is written twice. Optionally a *feed* of
//!   every tenant's events (`--nats-feed-stream`).
//! - **Subjects and messages** ([`envelope`]): `<subjectPrefix>.<tenant>.<entityType>.<eventType>`
//!   (prefix `tracktrace` by default), derived from the stored `OperationalEventRecorded`
//!   payload; other stored event types (tenant registry, claims, routes…) are never published.
//!   The body is our JSON envelope; `Nats-Msg-Id` is the event id, so JetStream drops
//!   redeliveries.
//! - **Bus ingestion** ([`bus`]): with `--nats-ingest`, a durable JetStream consumer on
//!   `tracktrace.ingest.<tenant>` feeding the same pipeline as `POST /api/v1/events`.
//!
//! # Readiness
//! `/readyz` carries a `propagation` component (route breakers and lags, ingestion state,
//! NATS connection). An open NATS breaker marks it `degraded` but **does not** make `/readyz`
//! answer 503: captures are durably stored and published once NATS is back, so taking the API
//! out of a load balancer would turn a partner outage into a capture outage. Alert on the
//! component (or on the lag metrics) instead.
//!
//! # Status and metrics
//! [`Propagation::status`] is a cheap snapshot (atomic loads, one short lock) of every
//! running route's lag in positions and seconds and breaker state, and of the ingestion
//! counters; the server reaches it through `AppState::propagation()`. [`spawn`] exports it
//! to `/metrics`: `tracktrace_publisher_lag_positions`, `tracktrace_publisher_lag_seconds`,
//! `tracktrace_publisher_breaker_state` (labels `tenant`, `route`),
//! `tracktrace_circuit_breaker_state{component="nats_publisher"}` (the worst route) and
//! `tracktrace_bus_ingest_messages_total{result}`.
//!
//! # Several processors
//! Route publishers are background work of the leader (the holder of the background-work
//! lease on PostgreSQL, like the trace projection): the other processors stand by and take
//! over from the stored checkpoints. Were two to publish at once (a leader that has not yet
//! noticed it lost its lease), nothing breaks: JetStream drops the second copy by event id
//! within the stream's duplicate window, and per-entity order holds since a publisher awaits
//! an entity's previous acknowledgement. Bus ingestion runs in every processor: they share
//! the durable consumer, which splits the messages between them.

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

#[cfg(feature = "nats")]
pub mod admin;
#[cfg(feature = "nats")]
pub mod bus;
#[cfg(feature = "nats")]
pub mod envelope;
#[cfg(feature = "nats")]
pub mod routes;
#[cfg(feature = "nats")]
mod running;

#[cfg(feature = "nats")]
pub use running::{
    BREAKER_COMPONENT, FEED, IngestStatus, Propagation, PropagationStatus, RouteStatus, spawn,
};
