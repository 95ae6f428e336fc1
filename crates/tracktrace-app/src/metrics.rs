//! Technical metrics (arc42 §6.5.2) in the Prometheus text exposition format (version 0.0.4),
//! served on `GET /metrics` by the API router and by the ops router (role `processor`) to
//! tokens of the system tenant with the `metrics:read` scope
//! ([`Actor::require_scrape`](crate::access::Actor::require_scrape)).
//!
//! The names, types and labels are a contract with the alerting rules and the Grafana
//! dashboard in `ops/`: the table in `ops/README.md` is the specification, and a test checks
//! that every name the rules and the dashboard use is exported.
//!
//! A [`Metrics`] registry lives in the server state, never in a global, so two servers (or two
//! tests) in one process never share counters. Updates on the request path are atomics (plus
//! one read-locked map lookup for the per-tenant counter); everything that needs I/O (the
//! store's event count, size and head, the age of the oldest event a projection has not
//! applied) is measured at scrape time by [`Metrics::scrape`].
//!
//! # Adding metrics from another module
//! Register a gauge or counter read at scrape time, or a circuit breaker, once at start-up:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use tracktrace_core::BreakerState;
//! use tracktrace_app::metrics::Metrics;
//!
//! let metrics = Metrics::new();
//! let pending = Arc::new(AtomicU64::new(3));
//! let read = pending.clone();
//! metrics.register_gauge(
//!     "tracktrace_publisher_lag_positions",
//!     "Events not yet published, per route",
//!     &["route"],
//!     move |s| s.push(&["sita"], read.load(Ordering::Relaxed) as f64),
//! )?;
//! // Joins the contract's `tracktrace_circuit_breaker_state{component}` family.
//! metrics.register_breaker("nats:sita", || Some(BreakerState::Closed))?;
//!
//! let text = metrics.render();
//! assert!(text.contains("tracktrace_publisher_lag_positions{route=\"sita\"} 3\n"));
//! assert!(text.contains("tracktrace_circuit_breaker_state{component=\"nats:sita\"} 0\n"));
//! # Ok::<(), tracktrace_app::metrics::MetricsError>(())
//! ```
//!
//! Projections other than the trace projection report their lag with
//! [`Metrics::register_projection`] (from a `LagHandle` or a checkpoint `watch`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, Backend, BoxError, BreakerConfig, BreakerState,
    CheckpointStore, CircuitBreaker, Direction, EventFilter, EventId, EventStore, KeyRange,
    LagHandle, Position, Projection, ReadAll, ReadModelBatch, ReadModelStore, ReadModelTx,
    ReadStream, RecordedEvent, Snapshot, SnapshotStore, StoreStats, StreamId, TenantId, Timestamp,
    Version,
};

use crate::error::AppError;

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the latency histograms: 100 µs … 10 s. 0.1 s, the threshold of
/// the trace p95 alert, is a bucket bound so `histogram_quantile` is exact there.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds (seconds) of the data freshness histogram: 1 ms … 5 min.
pub const FRESHNESS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The `component` label of the store's circuit breaker (one breaker for the log, the read
/// models and the snapshots: [`guarded_backend`]).
pub const EVENT_STORE_COMPONENT: &str = "event_store";

const INGESTED: &str = "tracktrace_events_ingested_total";
const COMMANDS: &str = "tracktrace_commands_total";
const FAILURES: &str = "tracktrace_command_failures_total";
const APPEND: &str = "tracktrace_append_duration_seconds";
const TRACE_QUERY: &str = "tracktrace_trace_query_duration_seconds";
const LAG_POSITIONS: &str = "tracktrace_projection_lag_positions";
const LAG_SECONDS: &str = "tracktrace_projection_lag_seconds";
const FRESHNESS: &str = "tracktrace_data_freshness_seconds";
const CACHE: &str = "tracktrace_cache_requests_total";
const BREAKER: &str = "tracktrace_circuit_breaker_state";
const STORE_EVENTS: &str = "tracktrace_event_store_events";
const STORE_BYTES: &str = "tracktrace_event_store_bytes";
const STORE_HEAD: &str = "tracktrace_event_store_head_position";
const BUILD_INFO: &str = "tracktrace_build_info";

/// The metric names this module exports itself (the contract of `ops/README.md`).
pub const BUILTIN_METRICS: &[&str] = &[
    BUILD_INFO,
    INGESTED,
    COMMANDS,
    FAILURES,
    APPEND,
    TRACE_QUERY,
    LAG_POSITIONS,
    LAG_SECONDS,
    FRESHNESS,
    CACHE,
    BREAKER,
    STORE_EVENTS,
    STORE_BYTES,
    STORE_HEAD,
];

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every guarded value is replaced in one step: a poisoned lock is still consistent.
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A histogram of durations with fixed bucket bounds (seconds), lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last slot counts values above every bound.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (strictly increasing, finite).
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // `le` is inclusive: the first bound ≥ the value.
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, label: Option<(&str, &str)>) {
        // `_count` is derived from the same reads as the buckets, so it always equals the
        // `+Inf` bucket even while observations race with the scrape.
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => fmt_f64(*b),
                None => "+Inf".to_owned(),
            };
            let mut labels: Vec<(&str, &str)> = label.into_iter().collect();
            labels.push(("le", &le));
            write_sample(
                out,
                &format!("{name}_bucket"),
                &labels,
                &cumulative.to_string(),
            );
        }
        let labels: Vec<(&str, &str)> = label.into_iter().collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        write_sample(out, &format!("{name}_sum"), &labels, &fmt_f64(sum));
        write_sample(
            out,
            &format!("{name}_count"),
            &labels,
            &cumulative.to_string(),
        );
    }
}

/// Children of a metric with one label, created on first use.
struct Family<M> {
    label: &'static str,
    children: RwLock<BTreeMap<String, Arc<M>>>,
    make: fn() -> M,
}

impl<M> Family<M> {
    fn new(label: &'static str, make: fn() -> M) -> Self {
        Self {
            label,
            children: RwLock::new(BTreeMap::new()),
            make,
        }
    }

    /// Runs `f` on the child for `value` (a read lock and no allocation once it exists).
    fn with<R>(&self, value: &str, f: impl FnOnce(&M) -> R) -> R {
        if let Some(m) = read(&self.children).get(value) {
            return f(m);
        }
        f(&self.child(value))
    }

    fn child(&self, value: &str) -> Arc<M> {
        if let Some(m) = read(&self.children).get(value) {
            return m.clone();
        }
        write(&self.children)
            .entry(value.to_owned())
            .or_insert_with(|| Arc::new((self.make)()))
            .clone()
    }

    fn snapshot(&self) -> Vec<(String, Arc<M>)> {
        read(&self.children)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// How a command ended (`tracktrace_commands_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Stored, or recognised as a duplicate.
    Ok,
    /// Refused because of the request (4xx): invalid, forbidden, conflicting.
    Rejected,
    /// Failed on our side (5xx): store unavailable, contention, internal error.
    Failed,
}

impl CommandOutcome {
    /// Every outcome (each series is exported from the start, at 0).
    pub const ALL: [CommandOutcome; 3] = [
        CommandOutcome::Ok,
        CommandOutcome::Rejected,
        CommandOutcome::Failed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Ok => "ok",
            CommandOutcome::Rejected => "rejected",
            CommandOutcome::Failed => "failed",
        }
    }
}

/// Why a command did not succeed (`tracktrace_command_failures_total{reason}`): a closed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// Malformed JSON, invalid fields, bad header (400).
    Validation,
    /// Missing scope, suspended or unknown tenant (403).
    Forbidden,
    /// The command conflicts with stored state, e.g. an entity's type (409).
    Conflict,
    /// Still conflicting with concurrent writers after the command bus's retries (503).
    Contention,
    /// The event store is unreachable or its circuit breaker is open (503).
    Unavailable,
    /// Anything else (500): a bug or a non-retryable backend failure.
    Internal,
}

impl FailureReason {
    /// Every reason (each series is exported from the start, at 0).
    pub const ALL: [FailureReason; 6] = [
        FailureReason::Validation,
        FailureReason::Forbidden,
        FailureReason::Conflict,
        FailureReason::Contention,
        FailureReason::Unavailable,
        FailureReason::Internal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Validation => "validation",
            FailureReason::Forbidden => "forbidden",
            FailureReason::Conflict => "conflict",
            FailureReason::Contention => "contention",
            FailureReason::Unavailable => "unavailable",
            FailureReason::Internal => "internal",
        }
    }

    /// The reason of an application error.
    pub fn of(e: &AppError) -> Self {
        match e {
            AppError::Malformed(_)
            | AppError::Validation(_)
            | AppError::BadRequest(_)
            | AppError::TooLarge { .. } => FailureReason::Validation,
            AppError::Forbidden(_) => FailureReason::Forbidden,
            AppError::Conflict(_) => FailureReason::Conflict,
            AppError::Contention(_) => FailureReason::Contention,
            AppError::Unavailable { .. }
            | AppError::StorageFull(_)
            | AppError::Busy { .. }
            | AppError::Timeout(_) => FailureReason::Unavailable,
            AppError::NotFound(_) | AppError::Internal(_) => FailureReason::Internal,
        }
    }

    /// The outcome it counts as: the caller's problem is `rejected`, ours is `failed`.
    pub fn outcome(self) -> CommandOutcome {
        match self {
            FailureReason::Validation | FailureReason::Forbidden | FailureReason::Conflict => {
                CommandOutcome::Rejected
            }
            FailureReason::Contention | FailureReason::Unavailable | FailureReason::Internal => {
                CommandOutcome::Failed
            }
        }
    }
}

/// Whether a trace view came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache.
    Hit,
    /// Built from the read model.
    Miss,
}

impl CacheResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricsError {
    /// Not a valid Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    #[error("invalid metric name {0:?}")]
    InvalidName(String),
    /// Not a valid label name (`[a-zA-Z_][a-zA-Z0-9_]*`, not `__…`, not `le` or `quantile`),
    /// or repeated.
    #[error("invalid label name {0:?}")]
    InvalidLabel(String),
    /// The metric, breaker component or projection is already registered.
    #[error("{0:?} is already registered")]
    Duplicate(String),
}

/// Where a projection's committed checkpoint is read (for its lag).
pub trait CheckpointSource: Send + Sync + 'static {
    /// The checkpoint: every event up to here is applied.
    fn checkpoint(&self) -> Position;
}

impl CheckpointSource for watch::Receiver<Position> {
    fn checkpoint(&self) -> Position {
        *self.borrow()
    }
}

impl CheckpointSource for LagHandle {
    fn checkpoint(&self) -> Position {
        self.get().checkpoint
    }
}

/// A projection whose lag is exported.
struct ProjectionWatch {
    name: String,
    store: Weak<dyn EventStore>,
    checkpoint: Box<dyn CheckpointSource>,
    /// Recorded-at of the first event after the checkpoint, cached per checkpoint: the log
    /// has no gaps below the head, so it cannot change until the checkpoint moves.
    oldest: Mutex<Option<(Position, Timestamp)>>,
    positions: Gauge,
    seconds: Gauge,
}

impl ProjectionWatch {
    /// Lag in positions: head − checkpoint. Lag in seconds: age of the oldest event the
    /// projection has not applied yet (0 when caught up). Measured here rather than by the
    /// runner so a stuck projection shows a growing lag instead of its last measurement.
    async fn refresh(&self) {
        let Some(store) = self.store.upgrade() else {
            return;
        };
        let cp = self.checkpoint.checkpoint();
        let head = match store.head().await {
            Ok(h) => h,
            Err(_) => *store.watch_head().borrow(),
        };
        let behind = head.get().saturating_sub(cp.get());
        self.positions.set(behind as f64);
        if behind == 0 {
            self.seconds.set(0.0);
            return;
        }
        let cached = lock(&self.oldest)
            .filter(|(at, _)| *at == cp)
            .map(|(_, t)| t);
        let oldest = match cached {
            Some(t) => Some(t),
            None => match store.read_all(ReadAll::starting_at(cp.next(), 1)).await {
                Ok(page) => page.events.first().map(|e| {
                    *lock(&self.oldest) = Some((cp, e.recorded_at));
                    e.recorded_at
                }),
                Err(e) => {
                    tracing::debug!(projection = %self.name, error = %e, "cannot measure projection lag");
                    None
                }
            },
        };
        // Unknown (store unreachable before this checkpoint's oldest event was read): the
        // previous value stays.
        if let Some(t) = oldest {
            self.seconds
                .set(t.elapsed_until(Timestamp::now()).as_secs_f64());
        }
    }
}

type BreakerFn = Box<dyn Fn() -> Option<BreakerState> + Send + Sync>;
type ReadFn = Box<dyn Fn(&mut Samples<'_>) + Send + Sync>;

/// A metric registered by another module, read at scrape time.
struct Custom {
    name: String,
    help: String,
    kind: &'static str,
    labels: Vec<String>,
    read: ReadFn,
}

/// The samples of a registered metric, filled by its read function at scrape time.
pub struct Samples<'a> {
    out: &'a mut String,
    name: &'a str,
    labels: &'a [String],
}

impl std::fmt::Debug for Samples<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Samples")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Samples<'_> {
    /// Adds one sample; `label_values` are the values of the registered label names, in
    /// order (a sample with the wrong number of values is dropped and logged).
    pub fn push(&mut self, label_values: &[&str], value: f64) {
        if label_values.len() != self.labels.len() {
            tracing::warn!(metric = %self.name, expected = self.labels.len(), got = label_values.len(), "metric sample with the wrong number of labels dropped");
            return;
        }
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(String::as_str)
            .zip(label_values.iter().copied())
            .collect();
        write_sample(self.out, self.name, &labels, &fmt_f64(value));
    }
}

struct Registry {
    ingested: Family<Counter>,
    commands: [Counter; 3],
    failures: [Counter; 6],
    append: Family<Histogram>,
    trace_query: [Histogram; 2],
    cache: [Counter; 2],
    freshness: Histogram,
    store: OnceLock<Weak<dyn EventStore>>,
    /// Whether the store has reported [`EventStore::store_stats`] (its last answer stays
    /// exported while it is unreachable).
    store_stats: AtomicBool,
    store_events: Gauge,
    store_bytes: Gauge,
    store_head: Gauge,
    breakers: RwLock<Vec<(String, BreakerFn)>>,
    projections: RwLock<Vec<Arc<ProjectionWatch>>>,
    custom: RwLock<Vec<Custom>>,
}

/// The metrics registry of one server (cheap to clone; clones share the values).
#[derive(Clone)]
pub struct Metrics(Arc<Registry>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
        && s != "le"
        && s != "quantile"
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self(Arc::new(Registry {
            ingested: Family::new("tenant", Counter::default),
            commands: Default::default(),
            failures: Default::default(),
            append: Family::new("backend", latency_histogram),
            trace_query: [latency_histogram(), latency_histogram()],
            cache: Default::default(),
            freshness: Histogram::new(FRESHNESS_BUCKETS),
            store: OnceLock::new(),
            store_stats: AtomicBool::new(false),
            store_events: Gauge::default(),
            store_bytes: Gauge::default(),
            store_head: Gauge::default(),
            breakers: RwLock::new(Vec::new()),
            projections: RwLock::new(Vec::new()),
            custom: RwLock::new(Vec::new()),
        }))
    }

    // ---- the request path -------------------------------------------------------------

    /// Counts one successful capture command: a stored event (counted as ingested for
    /// `tenant`) or a recognised duplicate.
    pub fn record_captured(&self, tenant: &TenantId, duplicate: bool) {
        self.0.commands[CommandOutcome::Ok as usize].inc();
        if !duplicate {
            self.0.ingested.with(tenant.as_str(), Counter::inc);
        }
    }

    /// Counts a command that did not succeed, by its [`FailureReason`] (rejected or failed).
    pub fn record_failure(&self, reason: FailureReason) {
        self.0.commands[reason.outcome() as usize].inc();
        self.0.failures[reason as usize].inc();
    }

    /// Counts a trace cache lookup.
    pub fn cache_lookup(&self, result: CacheResult) {
        self.0.cache[result as usize].inc();
    }

    /// Records the latency of a served trace query.
    pub fn trace_query(&self, cache: CacheResult, elapsed: Duration) {
        self.0.trace_query[cache as usize].observe(elapsed);
    }

    /// Records one event's freshness: from recorded (command accepted) to committed in the
    /// read model.
    pub fn freshness(&self, d: Duration) {
        self.0.freshness.observe(d);
    }

    /// The append latency histogram of `backend` (`sled`, `postgres`, `memory`…), for
    /// [`Metered`].
    pub fn append_histogram(&self, backend: &str) -> Arc<Histogram> {
        self.0.append.child(backend)
    }

    // ---- registrations (start-up) -----------------------------------------------------

    /// The store whose event count, size and head `tracktrace_event_store_{events,bytes,
    /// head_position}` report (the first call wins; the registry does not keep the store
    /// alive).
    pub fn watch_event_store(&self, store: &Arc<dyn EventStore>) {
        let _ = self.0.store.set(Arc::downgrade(store));
    }

    /// Exports `tracktrace_projection_lag_{positions,seconds}{projection=name}`, measured at
    /// scrape time against `store` from the checkpoint `checkpoint` reports. Register it in
    /// the process that runs the projection.
    pub fn register_projection(
        &self,
        name: &str,
        store: &Arc<dyn EventStore>,
        checkpoint: impl CheckpointSource,
    ) -> Result<(), MetricsError> {
        let mut ps = write(&self.0.projections);
        if ps.iter().any(|p| p.name == name) {
            return Err(MetricsError::Duplicate(name.to_owned()));
        }
        ps.push(Arc::new(ProjectionWatch {
            name: name.to_owned(),
            store: Arc::downgrade(store),
            checkpoint: Box::new(checkpoint),
            oldest: Mutex::new(None),
            positions: Gauge::default(),
            seconds: Gauge::default(),
        }));
        Ok(())
    }

    /// Exports `tracktrace_circuit_breaker_state{component}` (closed 0, half-open 1, open 2)
    /// from `state`, read at scrape time (`None`: no sample, e.g. the component is gone).
    pub fn register_breaker(
        &self,
        component: &str,
        state: impl Fn() -> Option<BreakerState> + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        let mut bs = write(&self.0.breakers);
        if bs.iter().any(|(c, _)| c == component) {
            return Err(MetricsError::Duplicate(component.to_owned()));
        }
        bs.push((component.to_owned(), Box::new(state)));
        Ok(())
    }

    /// Exports a gauge whose samples `read` produces at scrape time (cheap and non-blocking:
    /// it runs while the exposition is rendered). `labels` are its label names.
    pub fn register_gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn(&mut Samples<'_>) + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        self.register("gauge", name, help, labels, Box::new(read))
    }

    /// Like [`Metrics::register_gauge`] for a counter (name it `…_total`; values must never
    /// decrease while the process lives).
    pub fn register_counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn(&mut Samples<'_>) + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        self.register("counter", name, help, labels, Box::new(read))
    }

    fn register(
        &self,
        kind: &'static str,
        name: &str,
        help: &str,
        labels: &[&str],
        read: ReadFn,
    ) -> Result<(), MetricsError> {
        if !valid_metric_name(name) {
            return Err(MetricsError::InvalidName(name.to_owned()));
        }
        for (i, l) in labels.iter().enumerate() {
            if !valid_label_name(l) || labels[..i].contains(l) {
                return Err(MetricsError::InvalidLabel((*l).to_owned()));
            }
        }
        let mut custom = write(&self.0.custom);
        // Histogram series names would collide too.
        let taken = |n: &str| {
            BUILTIN_METRICS.iter().any(|b| {
                n == *b || ([APPEND, TRACE_QUERY, FRESHNESS].contains(b) && n.starts_with(b))
            }) || custom.iter().any(|c| c.name == n)
        };
        if taken(name) {
            return Err(MetricsError::Duplicate(name.to_owned()));
        }
        custom.push(Custom {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            read,
        });
        Ok(())
    }

    // ---- exposition -------------------------------------------------------------------

    /// Measures what needs I/O (the store's event count, size and head, projection lags), then
    /// renders.
    pub async fn scrape(&self) -> String {
        if let Some(store) = self.0.store.get().and_then(Weak::upgrade) {
            let head = match store.head().await {
                Ok(h) => h,
                // Unreachable store: the last head it notified.
                Err(_) => *store.watch_head().borrow(),
            };
            self.0.store_head.set(head.get() as f64);
            match store.store_stats().await {
                Ok(Some(stats)) => {
                    self.0.store_events.set(stats.events as f64);
                    self.0.store_bytes.set(stats.bytes as f64);
                    self.0.store_stats.store(true, Ordering::Relaxed);
                }
                // A backend that does not count: no samples.
                Ok(None) => self.0.store_stats.store(false, Ordering::Relaxed),
                // Unreachable store: the last answer stays.
                Err(e) => tracing::debug!(error = %e, "cannot read the event store's stats"),
            }
        }
        let projections: Vec<Arc<ProjectionWatch>> = read(&self.0.projections).clone();
        for p in projections {
            p.refresh().await;
        }
        self.render()
    }

    /// Renders the exposition from the values measured so far (no I/O; [`Metrics::scrape`]
    /// refreshes the store's figures and projection lags first).
    pub fn render(&self) -> String {
        let r = &*self.0;
        let mut out = String::with_capacity(8 * 1024);

        write_header(
            &mut out,
            BUILD_INFO,
            "Build information; the value is always 1",
            "gauge",
        );
        write_sample(
            &mut out,
            BUILD_INFO,
            &[("version", env!("CARGO_PKG_VERSION"))],
            "1",
        );

        write_header(
            &mut out,
            INGESTED,
            "Events stored by captures (duplicates excluded), per tenant",
            "counter",
        );
        for (tenant, c) in r.ingested.snapshot() {
            write_sample(
                &mut out,
                INGESTED,
                &[(r.ingested.label, &tenant)],
                &c.get().to_string(),
            );
        }

        write_header(
            &mut out,
            COMMANDS,
            "Capture commands handled, by outcome (ok, rejected, failed)",
            "counter",
        );
        for o in CommandOutcome::ALL {
            write_sample(
                &mut out,
                COMMANDS,
                &[("outcome", o.as_str())],
                &r.commands[o as usize].get().to_string(),
            );
        }

        write_header(
            &mut out,
            FAILURES,
            "Rejected or failed capture commands, by reason",
            "counter",
        );
        for f in FailureReason::ALL {
            write_sample(
                &mut out,
                FAILURES,
                &[("reason", f.as_str())],
                &r.failures[f as usize].get().to_string(),
            );
        }

        write_header(
            &mut out,
            APPEND,
            "Event store append latency, per backend",
            "histogram",
        );
        for (backend, h) in r.append.snapshot() {
            h.render(&mut out, APPEND, Some((r.append.label, &backend)));
        }

        write_header(
            &mut out,
            TRACE_QUERY,
            "Trace query latency (after any minPosition wait), by cache hit or miss",
            "histogram",
        );
        for c in [CacheResult::Hit, CacheResult::Miss] {
            r.trace_query[c as usize].render(&mut out, TRACE_QUERY, Some(("cache", c.as_str())));
        }

        let projections: Vec<Arc<ProjectionWatch>> = read(&r.projections).clone();
        write_header(
            &mut out,
            LAG_POSITIONS,
            "Read model lag in log positions (store head minus the projection's checkpoint)",
            "gauge",
        );
        for p in &projections {
            write_sample(
                &mut out,
                LAG_POSITIONS,
                &[("projection", &p.name)],
                &fmt_f64(p.positions.get()),
            );
        }
        write_header(
            &mut out,
            LAG_SECONDS,
            "Read model lag in seconds (age of the oldest event not yet applied; 0 when caught up)",
            "gauge",
        );
        for p in &projections {
            write_sample(
                &mut out,
                LAG_SECONDS,
                &[("projection", &p.name)],
                &fmt_f64(p.seconds.get()),
            );
        }

        write_header(
            &mut out,
            FRESHNESS,
            "Time from an event's recording (command accepted) to its commit in the trace read model",
            "histogram",
        );
        r.freshness.render(&mut out, FRESHNESS, None);

        write_header(
            &mut out,
            CACHE,
            "Trace view cache lookups, by result (hit, miss)",
            "counter",
        );
        for c in [CacheResult::Hit, CacheResult::Miss] {
            write_sample(
                &mut out,
                CACHE,
                &[("result", c.as_str())],
                &r.cache[c as usize].get().to_string(),
            );
        }

        write_header(
            &mut out,
            BREAKER,
            "Circuit breaker state per component: 0 closed, 1 half-open, 2 open",
            "gauge",
        );
        for (component, state) in read(&r.breakers).iter() {
            if let Some(s) = state() {
                write_sample(
                    &mut out,
                    BREAKER,
                    &[("component", component)],
                    &s.as_gauge().to_string(),
                );
            }
        }

        let stats = r.store_stats.load(Ordering::Relaxed);
        write_header(
            &mut out,
            STORE_EVENTS,
            "Events stored in the event store (counted, not derived from positions)",
            "gauge",
        );
        if stats {
            write_sample(&mut out, STORE_EVENTS, &[], &fmt_f64(r.store_events.get()));
        }
        write_header(
            &mut out,
            STORE_BYTES,
            "Bytes the event store uses, as its backend measures them (files, relation sizes)",
            "gauge",
        );
        if stats {
            write_sample(&mut out, STORE_BYTES, &[], &fmt_f64(r.store_bytes.get()));
        }
        write_header(
            &mut out,
            STORE_HEAD,
            "Head position of the event store's global log (a position, not a count: on PostgreSQL positions follow transaction ids)",
            "gauge",
        );
        if r.store.get().is_some() {
            write_sample(&mut out, STORE_HEAD, &[], &fmt_f64(r.store_head.get()));
        }

        for c in read(&r.custom).iter() {
            write_header(&mut out, &c.name, &c.help, c.kind);
            let mut s = Samples {
                out: &mut out,
                name: &c.name,
                labels: &c.labels,
            };
            (c.read)(&mut s);
        }
        out
    }
}

fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as the exposition format writes it (`+Inf`, `-Inf`, `NaN`; Rust's shortest
/// round-trip decimal otherwise, which Prometheus parses).
fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Wrapper store timing every append of the inner store
/// (`tracktrace_append_duration_seconds{backend}`, failed appends included); other calls
/// (`store_stats`, read models, checkpoints and snapshots included) pass through untouched.
pub struct Metered<S> {
    inner: S,
    append: Arc<Histogram>,
}

impl<S> std::fmt::Debug for Metered<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered").finish_non_exhaustive()
    }
}

impl<S: EventStore> Metered<S> {
    /// Times `inner`'s appends under `backend`.
    pub fn new(inner: S, metrics: &Metrics, backend: &str) -> Self {
        Self {
            inner,
            append: metrics.append_histogram(backend),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: EventStore> EventStore for Metered<S> {
    async fn append(&self, req: AppendRequest) -> tracktrace_core::Result<AppendOutcome> {
        let started = Instant::now();
        let r = self.inner.append(req).await;
        self.append.observe(started.elapsed());
        r
    }
    async fn read_stream(&self, req: ReadStream) -> tracktrace_core::Result<Vec<RecordedEvent>> {
        self.inner.read_stream(req).await
    }
    async fn read_all(&self, req: ReadAll) -> tracktrace_core::Result<AllPage> {
        self.inner.read_all(req).await
    }
    async fn stream_version(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> tracktrace_core::Result<Version> {
        self.inner.stream_version(tenant, stream).await
    }
    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> tracktrace_core::Result<Option<RecordedEvent>> {
        self.inner.get_event(tenant, event_id).await
    }
    async fn head(&self) -> tracktrace_core::Result<Position> {
        self.inner.head().await
    }
    async fn position_at(
        &self,
        at: tracktrace_core::Timestamp,
    ) -> tracktrace_core::Result<Position> {
        self.inner.position_at(at).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
    async fn store_stats(&self) -> tracktrace_core::Result<Option<StoreStats>> {
        self.inner.store_stats().await
    }
}

#[async_trait]
impl<S: CheckpointStore> CheckpointStore for Metered<S> {
    async fn load_checkpoint(&self, name: &str) -> tracktrace_core::Result<Option<Position>> {
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> tracktrace_core::Result<()> {
        self.inner.save_checkpoint(name, position).await
    }
}

#[async_trait]
impl<S: ReadModelStore> ReadModelStore for Metered<S> {
    async fn get(&self, ns: &str, key: &[u8]) -> tracktrace_core::Result<Option<Bytes>> {
        self.inner.get(ns, key).await
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> tracktrace_core::Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan(ns, range, direction, limit).await
    }
    async fn commit(&self, batch: ReadModelBatch) -> tracktrace_core::Result<()> {
        self.inner.commit(batch).await
    }
}

#[async_trait]
impl<S: SnapshotStore> SnapshotStore for Metered<S> {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> tracktrace_core::Result<Option<Snapshot>> {
        self.inner.load_snapshot(tenant, stream).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> tracktrace_core::Result<()> {
        self.inner.save_snapshot(snapshot).await
    }
}

/// What the API uses of the whole backend: `CircuitBreaker(Metered(backend))`, one breaker for
/// the log, the read models and the snapshots (a failing database fails all of them, so one
/// breaker opens for all and trace reads fail fast with a retry hint instead of waiting out
/// the store's timeouts). Appends are timed under `backend`; the breaker's state is exported
/// as `component="event_store"`. Calls rejected by an open breaker never reach the store and
/// are not timed.
pub fn guarded_backend(
    store: Arc<dyn Backend>,
    backend: &str,
    breaker: BreakerConfig,
    metrics: &Metrics,
) -> Arc<dyn Backend> {
    let guarded = Arc::new(CircuitBreaker::with_config(
        Metered::new(store, metrics, backend),
        breaker,
    ));
    let probe = Arc::downgrade(&guarded);
    if let Err(e) = metrics.register_breaker(EVENT_STORE_COMPONENT, move || {
        probe.upgrade().map(|b| b.state())
    }) {
        tracing::warn!(error = %e, "a second event store breaker is not exported");
    }
    guarded
}

/// The event store the API uses when it has nothing but an event store (tests, tools):
/// `CircuitBreaker(Metered(store))`, with the append latency exported
/// under `backend` and the breaker's state as `component="event_store"`. Appends rejected by
/// an open breaker never reach the store and are not timed.
pub fn guarded_store(
    store: Arc<dyn EventStore>,
    backend: &str,
    breaker: BreakerConfig,
    metrics: &Metrics,
) -> Arc<dyn EventStore> {
    let guarded = Arc::new(CircuitBreaker::with_config(
        Metered::new(store, metrics, backend),
        breaker,
    ));
    let probe = Arc::downgrade(&guarded);
    if let Err(e) = metrics.register_breaker(EVENT_STORE_COMPONENT, move || {
        probe.upgrade().map(|b| b.state())
    }) {
        tracing::warn!(error = %e, "a second event store breaker is not exported");
    }
    guarded
}

/// A projection wrapper that measures data freshness: it remembers the recorded-at of every
/// event applied in the current batch, and the projection's driver calls
/// [`Freshness::committed`] once the batch (and its checkpoint) is committed, or
/// [`Freshness::discard`] when it was not.
pub struct Freshness<P> {
    inner: P,
    metrics: Metrics,
    pending: Vec<Timestamp>,
}

impl<P> std::fmt::Debug for Freshness<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freshness")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<P: Projection> Freshness<P> {
    /// Wraps `inner`, observing into `metrics`.
    pub fn new(inner: P, metrics: Metrics) -> Self {
        Self {
            inner,
            metrics,
            pending: Vec::new(),
        }
    }

    /// The batch applied since the last call is committed: observe each event's freshness.
    pub fn committed(&mut self) {
        let now = Timestamp::now();
        for t in self.pending.drain(..) {
            self.metrics.freshness(t.elapsed_until(now));
        }
    }

    /// The batch was not committed (it will be applied again): forget it.
    pub fn discard(&mut self) {
        self.pending.clear();
    }
}

#[async_trait]
impl<P: Projection> Projection for Freshness<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn filter(&self) -> EventFilter {
        self.inner.filter()
    }
    fn namespaces(&self) -> Vec<String> {
        self.inner.namespaces()
    }
    async fn apply(
        &mut self,
        event: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        self.pending.push(event.recorded_at);
        self.inner.apply(event, tx).await
    }
    async fn reset(&mut self) -> Result<(), BoxError> {
        self.pending.clear();
        self.inner.reset().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_le_inclusive() {
        static B: &[f64] = &[0.001, 0.01];
        let h = Histogram::new(B);
        h.observe(Duration::from_micros(1000)); // exactly on the first bound
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", Some(("k", "v")));
        assert_eq!(
            out,
            "x_seconds_bucket{k=\"v\",le=\"0.001\"} 1\n\
             x_seconds_bucket{k=\"v\",le=\"0.01\"} 2\n\
             x_seconds_bucket{k=\"v\",le=\"+Inf\"} 3\n\
             x_seconds_sum{k=\"v\"} 1.006\n\
             x_seconds_count{k=\"v\"} 3\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let m = Metrics::new();
        m.register_gauge("t_g", "line1\nback\\slash", &["l"], |s| {
            s.push(&["a\"b\\c\nd"], 1.5);
            s.push(&["too", "many"], 2.0);
        })
        .unwrap();
        let text = m.render();
        assert!(
            text.contains("# HELP t_g line1\\nback\\\\slash\n"),
            "{text}"
        );
        assert!(text.contains("t_g{l=\"a\\\"b\\\\c\\nd\"} 1.5\n"), "{text}");
        assert!(!text.contains("too"), "{text}");
    }

    #[test]
    fn floats_use_the_exposition_spelling() {
        assert_eq!(fmt_f64(f64::INFINITY), "+Inf");
        assert_eq!(fmt_f64(f64::NEG_INFINITY), "-Inf");
        assert_eq!(fmt_f64(f64::NAN), "NaN");
        assert_eq!(fmt_f64(0.25), "0.25");
        assert_eq!(fmt_f64(3.0), "3");
    }

    #[test]
    fn registrations_are_validated() {
        let m = Metrics::new();
        let noop = |_: &mut Samples<'_>| {};
        assert_eq!(
            m.register_gauge("1bad", "", &[], noop),
            Err(MetricsError::InvalidName("1bad".into()))
        );
        assert_eq!(
            m.register_gauge("ok_name", "", &["le"], noop),
            Err(MetricsError::InvalidLabel("le".into()))
        );
        assert_eq!(
            m.register_gauge("ok_name", "", &["a", "a"], noop),
            Err(MetricsError::InvalidLabel("a".into()))
        );
        assert_eq!(
            m.register_counter(INGESTED, "", &[], noop),
            Err(MetricsError::Duplicate(INGESTED.into()))
        );
        assert_eq!(
            m.register_gauge("tracktrace_append_duration_seconds_count", "", &[], noop),
            Err(MetricsError::Duplicate(
                "tracktrace_append_duration_seconds_count".into()
            ))
        );
        m.register_gauge("ok_name", "", &["a"], noop).unwrap();
        assert!(m.register_gauge("ok_name", "", &[], noop).is_err());
        m.register_breaker("x", || None).unwrap();
        assert!(m.register_breaker("x", || None).is_err());
    }

    #[test]
    fn failure_reasons_map_errors_and_outcomes() {
        let cases = [
            (AppError::Validation(Vec::new()), "validation", "rejected"),
            (AppError::Malformed("x".into()), "validation", "rejected"),
            (AppError::TooLarge { limit: 1 }, "validation", "rejected"),
            (AppError::Forbidden("x".into()), "forbidden", "rejected"),
            (AppError::Conflict("x".into()), "conflict", "rejected"),
            (AppError::Contention("x".into()), "contention", "failed"),
            (
                AppError::Unavailable {
                    reason: "x".into(),
                    retry_after: Duration::from_secs(1),
                },
                "unavailable",
                "failed",
            ),
            (AppError::internal("x"), "internal", "failed"),
        ];
        for (e, reason, outcome) in cases {
            let r = FailureReason::of(&e);
            assert_eq!(
                (r.as_str(), r.outcome().as_str()),
                (reason, outcome),
                "{e:?}"
            );
        }
        let m = Metrics::new();
        m.record_failure(FailureReason::Forbidden);
        let text = m.render();
        assert!(text.contains("tracktrace_command_failures_total{reason=\"forbidden\"} 1\n"));
        assert!(text.contains("tracktrace_commands_total{outcome=\"rejected\"} 1\n"));
        assert!(text.contains("tracktrace_commands_total{outcome=\"failed\"} 0\n"));
    }
}
