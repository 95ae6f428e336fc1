//! Event propagation over NATS JetStream (feature `nats`): the architecture's "Propagación
//! evento: Event Publisher → Queue → SITA" and flow 6.2.1 steps 1 (reception via the event bus)
//! and 7 (notify subscribers).
//!
//! - **Partner routes** ([`routes`]): per tenant, which event types go to which partner, on
//!   which subjects, into which JetStream stream, in which format. Routes are configuration
//!   stored as events of the system tenant, so every process sees the same routes; they are
//!   managed through the admin operations of [`routes::RouteRegistry`]. Adding a route replays from a chosen position
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
//! - **Bus ingestion** ([`ingest`]): with `--nats-ingest`, a durable JetStream consumer on
//!   `tracktrace.ingest.<tenant>` feeding the same capture pipeline as `POST /api/v1/events`.
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
//! counters; front ends reach it through `App::propagation()`. [`hub::spawn`] exports it
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

pub mod config;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod envelope;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod hub;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod ingest;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod routes;

pub use config::PropagationConfig;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use hub::{
    BREAKER_COMPONENT, FEED, IngestStatus, Propagation, PropagationDeps, PropagationStatus,
    RouteStatus, spawn,
};
