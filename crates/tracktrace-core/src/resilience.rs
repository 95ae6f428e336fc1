//! Retries and circuit breaking as *wrapper stores*: [`Retrying<S>`] and [`CircuitBreaker<S>`]
//! implement [`EventStore`] around any other store, so backends need no flags for them.
//!
//! Compose them outside-in: `Retrying::new(CircuitBreaker::new(store))` retries a few times and
//! stops as soon as the breaker opens (an open breaker's error carries a `retry_after` longer
//! than the policy is willing to wait), while `CircuitBreaker::new(Retrying::new(store))` counts
//! one failure per exhausted retry series.
//!
//! Only [`Error::Unavailable`] is transient and trips the breaker: conflicts, duplicates,
//! invalid input and corruption are returned at once (they are the caller's or the data's
//! problem, not the store's health), and [`Error::Overloaded`] (a full queue: the store is busy,
//! not broken) is retried by [`Retrying`] but neither opens nor closes a breaker.
//!
//! A breaker can also put a deadline on every call ([`BreakerConfig::call_timeout`]): a call
//! that has not answered in time fails with [`Error::Unavailable`] (and counts as a failure),
//! so a store that stopped answering (a frozen server, a black-holed connection) costs callers
//! at most the deadline, then nothing once the breaker is open. A timed-out append may still
//! commit: retry it with the same event ids (idempotency makes that safe). [`CircuitBreaker`]
//! guards read models and checkpoints too ([`ReadModelStore`], [`CheckpointStore`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::id::{EventId, Position, StreamId, TenantId, Timestamp, Version};
use crate::store::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, EventStore, KeyRange,
    ReadAll, ReadModelBatch, ReadModelStore, ReadStream, Snapshot, SnapshotStore, StoreStats,
};

/// Bounded exponential backoff with full jitter: before retry `n` (1-based) wait a uniformly
/// random duration in `[0, min(max_backoff, initial_backoff · 2^(n-1))]`.
///
/// Used for version conflicts by [`crate::command::CommandBus`] and for transient store
/// errors by [`Retrying`].
///
/// Built from [`RetryPolicy::default`] or [`RetryPolicy::none`] with the `with_*` methods
/// (non-exhaustive: options may be added).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Cap of the first backoff.
    pub initial_backoff: Duration,
    /// Largest backoff cap.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 20 attempts, backoff caps 2 ms, 4 ms, … up to 250 ms.
    fn default() -> Self {
        Self {
            max_attempts: 20,
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(250),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// With `n` attempts in total, the first included (1 = no retry; 0 counts as 1).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// With backoff caps starting at `initial` and doubling up to `max`.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// The (jittered) wait before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(30);
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << shift)
            .min(self.max_backoff);
        let micros = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(fastrand::u64(0..=micros))
    }
}

/// Retries retryable failures of the inner store ([`Error::Unavailable`],
/// [`Error::Overloaded`]) with a [`RetryPolicy`].
///
/// Appends are retried too: an append that failed as unavailable may have committed, and the
/// retry (same event ids) is then answered as a duplicate (`AppendOutcome::duplicate`), which
/// is the idempotency contract every backend implements. An `Unavailable` whose `retry_after`
/// exceeds the policy's `max_backoff` (an open [`CircuitBreaker`]) is returned at once.
#[derive(Debug)]
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S> Retrying<S> {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: S) -> Self {
        Self::with_policy(inner, RetryPolicy::default())
    }

    /// Wraps `inner` with `policy`.
    pub fn with_policy(inner: S, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T>> + Send,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e)
                    if e.is_retryable()
                        && attempt < self.policy.max_attempts
                        && e.retry_after().is_none_or(|d| d <= self.policy.max_backoff) =>
                {
                    let wait = self
                        .policy
                        .backoff(attempt)
                        .max(e.retry_after().unwrap_or_default());
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl<S: EventStore> EventStore for Retrying<S> {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        self.run(|| self.inner.append(req.clone())).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.run(|| self.inner.read_stream(req.clone())).await
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.run(|| self.inner.read_all(req.clone())).await
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.run(|| self.inner.stream_version(tenant, stream)).await
    }
    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>> {
        self.run(|| self.inner.get_event(tenant, event_id)).await
    }
    async fn head(&self) -> Result<Position> {
        self.run(|| self.inner.head()).await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.run(|| self.inner.position_at(at)).await
    }
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        self.run(|| self.inner.store_stats()).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
}

// Read models, checkpoints and snapshots are retried like the log: a read-model commit is
// fenced by its expected checkpoint (a retry of a commit that did land fails with
// `CheckpointMoved` and the runner reloads), and saving a checkpoint or a snapshot is
// idempotent.

#[async_trait]
impl<S: CheckpointStore> CheckpointStore for Retrying<S> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        self.run(|| self.inner.load_checkpoint(name)).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.run(|| self.inner.save_checkpoint(name, position))
            .await
    }
}

#[async_trait]
impl<S: ReadModelStore> ReadModelStore for Retrying<S> {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        self.run(|| self.inner.get(ns, key)).await
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>> {
        self.run(|| self.inner.scan(ns, range.clone(), direction, limit))
            .await
    }
    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        self.run(|| self.inner.commit(batch.clone())).await
    }
}

#[async_trait]
impl<S: SnapshotStore> SnapshotStore for Retrying<S> {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.run(|| self.inner.load_snapshot(tenant, stream)).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.run(|| self.inner.save_snapshot(snapshot.clone()))
            .await
    }
}

/// When a [`CircuitBreaker`] opens and how it probes. Built from [`BreakerConfig::default`]
/// with the `with_*` methods (non-exhaustive: options may be added).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive [`Error::Unavailable`] failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before letting one probe call through (half-open).
    pub open_for: Duration,
    /// Deadline of every call (`None`: calls take as long as the store does). A call past it
    /// fails with [`Error::Unavailable`], which counts as a failure.
    pub call_timeout: Option<Duration>,
}

impl Default for BreakerConfig {
    /// Opens after 5 consecutive failures, probes after 5 s, no call deadline.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            call_timeout: None,
        }
    }
}

impl BreakerConfig {
    /// Opens after `n` consecutive failures.
    pub fn with_failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// Stays open for `d` before letting a probe through.
    pub fn with_open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// With a deadline on every call (`None`: none).
    pub fn with_call_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.call_timeout = timeout;
        self
    }
}

/// State of a [`CircuitBreaker`] (export it as a gauge: closed 0, half-open 1, open 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls fail fast with [`Error::Unavailable`] and a `retry_after` hint.
    Open,
    /// The open period is over: the next call is a probe; others still fail fast.
    HalfOpen,
}

impl BreakerState {
    /// Numeric value for metrics: closed 0, half-open 1, open 2.
    pub fn as_gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probe_since`: when the in-flight probe started (a probe whose future was dropped is
    /// replaced after `open_for`).
    HalfOpen {
        probe_since: Option<Instant>,
    },
}

/// Fails fast while the inner store is down.
///
/// After [`BreakerConfig::failure_threshold`] consecutive [`Error::Unavailable`] failures the
/// breaker opens: every call returns `Error::Unavailable { retry_after: Some(..) }` without
/// touching the store. After [`BreakerConfig::open_for`] it lets one probe call through
/// (half-open): success closes it, another transient failure opens it again.
/// [`EventStore::watch_head`] is passed through unguarded.
#[derive(Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    config: BreakerConfig,
    state: Mutex<Inner>,
    rejected: AtomicU64,
}

enum Admit {
    Call { probe: bool },
    Reject(Duration),
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` with the default configuration.
    pub fn new(inner: S) -> Self {
        Self::with_config(inner, BreakerConfig::default())
    }

    /// Wraps `inner` with `config`.
    pub fn with_config(inner: S, config: BreakerConfig) -> Self {
        Self {
            inner,
            config: BreakerConfig {
                failure_threshold: config.failure_threshold.max(1),
                ..config
            },
            state: Mutex::new(Inner::Closed { failures: 0 }),
            rejected: AtomicU64::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Current state (an open breaker whose period is over reports half-open).
    pub fn state(&self) -> BreakerState {
        match &*self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < *until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Calls rejected without touching the store since creation (a counter for metrics).
    pub fn rejected_calls(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a plain enum updated in one assignment: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self) -> Admit {
        let mut st = self.lock();
        let now = Instant::now();
        match &*st {
            Inner::Closed { .. } => Admit::Call { probe: false },
            Inner::Open { until } if now < *until => Admit::Reject(*until - now),
            // A probe is in flight: others wait for its verdict.
            Inner::HalfOpen {
                probe_since: Some(t),
            } if now.duration_since(*t) < self.config.open_for => {
                Admit::Reject(self.config.open_for - now.duration_since(*t))
            }
            Inner::Open { .. } | Inner::HalfOpen { .. } => {
                *st = Inner::HalfOpen {
                    probe_since: Some(now),
                };
                Admit::Call { probe: true }
            }
        }
    }

    fn record<T>(&self, probe: bool, r: &Result<T>) {
        let mut st = self.lock();
        match r {
            // Busy or full, not broken: no verdict on the store's health (a probe slot is
            // freed).
            Err(Error::Overloaded { .. } | Error::StorageFull { .. }) => {
                if probe && let Inner::HalfOpen { probe_since } = &mut *st {
                    *probe_since = None;
                }
            }
            Err(Error::Unavailable { .. }) => {
                let open = match &mut *st {
                    Inner::Closed { failures } => {
                        *failures += 1;
                        *failures >= self.config.failure_threshold
                    }
                    Inner::HalfOpen { .. } => probe,
                    Inner::Open { .. } => false,
                };
                if open {
                    *st = Inner::Open {
                        until: Instant::now() + self.config.open_for,
                    };
                }
            }
            // Any answer that is not "unavailable" proves the store is reachable.
            _ => {
                if probe || matches!(*st, Inner::Closed { .. }) {
                    *st = Inner::Closed { failures: 0 };
                }
            }
        }
    }

    async fn guard<T, Fut>(&self, fut: impl FnOnce() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        match self.admit() {
            Admit::Reject(retry_after) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(Error::Unavailable {
                    reason: "circuit breaker open: the event store failed repeatedly".into(),
                    retry_after: Some(retry_after),
                    source: None,
                })
            }
            Admit::Call { probe } => {
                let r = match self.config.call_timeout {
                    None => fut().await,
                    Some(limit) => match tokio::time::timeout(limit, fut()).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::Unavailable {
                            reason: format!(
                                "the store did not answer within {} ms",
                                limit.as_millis()
                            ),
                            retry_after: Some(self.config.open_for.min(limit)),
                            source: None,
                        }),
                    },
                };
                self.record(probe, &r);
                r
            }
        }
    }
}

#[async_trait]
impl<S: EventStore> EventStore for CircuitBreaker<S> {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        self.guard(|| self.inner.append(req)).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.guard(|| self.inner.read_stream(req)).await
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.guard(|| self.inner.read_all(req)).await
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.guard(|| self.inner.stream_version(tenant, stream))
            .await
    }
    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>> {
        self.guard(|| self.inner.get_event(tenant, event_id)).await
    }
    async fn head(&self) -> Result<Position> {
        self.guard(|| self.inner.head()).await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.guard(|| self.inner.position_at(at)).await
    }
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        self.guard(|| self.inner.store_stats()).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
}

#[async_trait]
impl<S: CheckpointStore> CheckpointStore for CircuitBreaker<S> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        self.guard(|| self.inner.load_checkpoint(name)).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.guard(|| self.inner.save_checkpoint(name, position))
            .await
    }
}

#[async_trait]
impl<S: ReadModelStore> ReadModelStore for CircuitBreaker<S> {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        self.guard(|| self.inner.get(ns, key)).await
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>> {
        self.guard(|| self.inner.scan(ns, range, direction, limit))
            .await
    }
    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        self.guard(|| self.inner.commit(batch)).await
    }
}

#[async_trait]
impl<S: SnapshotStore> SnapshotStore for CircuitBreaker<S> {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.guard(|| self.inner.load_snapshot(tenant, stream))
            .await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.guard(|| self.inner.save_snapshot(snapshot)).await
    }
}
