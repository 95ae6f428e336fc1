//! The outbox publisher: follows the global log from a persisted checkpoint and publishes to
//! NATS JetStream. The event store *is* the outbox: there is no second write to forget.
//!
//! Delivery is at-least-once: the checkpoint moves only after JetStream acknowledged every
//! message up to it, so a crash republishes at most the unacknowledged tail. Each message
//! carries `Nats-Msg-Id: <event id>`, so JetStream drops those redeliveries within the stream's
//! `duplicate_window`; beyond it, consumers de-duplicate by the same id.
//!
//! Order: messages with the same [`OutboundMessage::ordering_key`] (the entity) are never in
//! flight together, so they reach the stream in log order even when a publish fails and is
//! retried; messages of different entities are pipelined.
//!
//! Lag ([`PublisherStatus::lag_positions`], [`PublisherStatus::lag_time`]) is measured against
//! the store's head: a filtered publisher that has nothing to publish is caught up (lag 0)
//! however far its last published event lies behind, and the time lag is the age of the
//! oldest event read but not yet acknowledged (it grows while the broker is down).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracktrace_core::{
    CheckpointStore, EventFilter, EventStore, Position, RecordedEvent, SubscribeOptions,
    Subscription, Timestamp,
};

/// A message to publish for one stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundMessage {
    /// NATS subject, e.g. `tracktrace.acme.Bag.LOADED`.
    pub subject: String,
    /// Body.
    pub payload: Bytes,
    /// Extra headers (`Nats-Msg-Id` is always set to the event id).
    pub headers: Vec<(String, String)>,
    /// Messages with the same key are published strictly in log order (use the entity).
    pub ordering_key: String,
}

/// Turns stored events into messages; `None` skips an event.
pub trait MessageMapper: Send + Sync + 'static {
    /// The message for `event`, if it is to be published.
    fn map(&self, event: &RecordedEvent) -> Option<OutboundMessage>;
}

impl<F> MessageMapper for F
where
    F: Fn(&RecordedEvent) -> Option<OutboundMessage> + Send + Sync + 'static,
{
    fn map(&self, event: &RecordedEvent) -> Option<OutboundMessage> {
        self(event)
    }
}

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// Checkpoint name (one per publisher / partner route).
    pub name: String,
    /// Which events of the log this publisher considers.
    pub filter: EventFilter,
    /// Where to start when no checkpoint exists yet (a new route replays from here).
    pub start: Position,
    /// Events read and published per batch (also the checkpoint interval).
    pub batch_size: usize,
    /// How long to wait for a JetStream acknowledgement.
    pub ack_timeout: Duration,
    /// First retry delay after a failure.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Consecutive failed attempts that open the breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one probe attempt.
    pub breaker_open_for: Duration,
    /// A JetStream stream to create (if missing) before publishing, e.g. one capturing this
    /// publisher's subjects with a de-duplication window. Retried under the breaker.
    pub create_stream: Option<jetstream::stream::Config>,
}

impl PublisherConfig {
    /// Defaults for a publisher named `name` over the whole log.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            filter: EventFilter::default(),
            start: Position::START,
            batch_size: 256,
            ack_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            breaker_threshold: 3,
            breaker_open_for: Duration::from_secs(2),
            create_stream: None,
        }
    }
}

/// Breaker state of a publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Publishing normally.
    Closed,
    /// The broker failed repeatedly; waiting before a probe.
    Open,
    /// One probe attempt is under way.
    HalfOpen,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::HalfOpen,
            2 => BreakerState::Open,
            _ => BreakerState::Closed,
        }
    }

    /// Numeric value for metrics: closed 0, half-open 1, open 2.
    pub fn as_gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// A point-in-time view of a publisher, for `/readyz` and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublisherStatus {
    /// Messages acknowledged as new by JetStream.
    pub published: u64,
    /// Messages JetStream reported as duplicates (redeliveries it dropped).
    pub duplicates: u64,
    /// Failed publish attempts.
    pub failures: u64,
    /// Last position whose message (and all before it) is acknowledged.
    pub position: Position,
    /// Breaker state.
    pub breaker: BreakerState,
    /// `recorded_at` of the last acknowledged event (for lag in seconds).
    pub last_recorded_at: Option<Timestamp>,
    /// The store's head as last seen (notification hint or measured).
    pub head: Position,
    /// Positions between what this publisher has considered (published, or skipped by its
    /// filter or mapper) and the head: an upper bound on the events still to look at; 0 when
    /// caught up.
    pub lag_positions: u64,
    /// Age of the oldest event read but not yet acknowledged (zero when nothing is pending).
    pub lag_time: Duration,
}

struct Shared {
    published: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
    position: AtomicU64,
    breaker: AtomicU8,
    last_recorded_at: AtomicI64,
    /// Every event below this position is acknowledged or not for this publisher.
    considered_below: AtomicU64,
    /// Highest head measured by the task.
    head: AtomicU64,
    /// `recorded_at` (µs) of the oldest read, unacknowledged event; `NONE` when none.
    pending_since: AtomicI64,
}

const NONE: i64 = i64::MIN;

impl Default for Shared {
    fn default() -> Self {
        Self {
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            position: AtomicU64::new(0),
            breaker: AtomicU8::new(0),
            last_recorded_at: AtomicI64::new(NONE),
            considered_below: AtomicU64::new(0),
            head: AtomicU64::new(0),
            pending_since: AtomicI64::new(NONE),
        }
    }
}

/// A running publisher task. Dropping the handle stops it.
pub struct Publisher {
    shared: Arc<Shared>,
    head: watch::Receiver<Position>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("status", &self.status())
            .finish()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Publisher {
    /// Starts publishing on the current tokio runtime.
    pub fn spawn(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        jetstream: jetstream::Context,
        mapper: Arc<dyn MessageMapper>,
        config: PublisherConfig,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        shared
            .considered_below
            .store(config.start.get(), Ordering::Relaxed);
        let head = store.watch_head();
        let task = tokio::spawn(run(
            store,
            checkpoints,
            jetstream,
            mapper,
            config,
            shared.clone(),
        ));
        Self { shared, head, task }
    }

    /// Current counters, state and lag: a few atomic loads, no I/O.
    pub fn status(&self) -> PublisherStatus {
        let s = &self.shared;
        let position = s.position.load(Ordering::Acquire);
        let t = s.last_recorded_at.load(Ordering::Acquire);
        let head = s.head.load(Ordering::Relaxed).max(self.head.borrow().get());
        // Everything in [considered_below, head] may still hold events for this publisher.
        let below = s.considered_below.load(Ordering::Acquire);
        let lag_positions = (head + 1).saturating_sub(below.max(1));
        let pending = s.pending_since.load(Ordering::Acquire);
        let lag_time = if pending == NONE {
            Duration::ZERO
        } else {
            Timestamp::from_unix_micros(pending).elapsed_until(Timestamp::now())
        };
        PublisherStatus {
            published: s.published.load(Ordering::Relaxed),
            duplicates: s.duplicates.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            position: Position::new(position),
            breaker: BreakerState::from_u8(s.breaker.load(Ordering::Relaxed)),
            last_recorded_at: (t != NONE).then(|| Timestamp::from_unix_micros(t)),
            head: Position::new(head),
            lag_positions,
            lag_time,
        }
    }

    /// Waits until everything up to `position` is acknowledged, at most `timeout`.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.status().position < position {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Keeps retrying `f` with exponential backoff and jitter, driving the breaker state.
struct Backoff<'a> {
    cfg: &'a PublisherConfig,
    shared: &'a Shared,
    delay: Duration,
    consecutive: u32,
}

impl Backoff<'_> {
    fn success(&mut self) {
        self.delay = self.cfg.min_backoff;
        self.consecutive = 0;
        self.shared.breaker.store(0, Ordering::Relaxed);
    }

    async fn failure(&mut self) {
        self.shared.failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive += 1;
        if self.consecutive >= self.cfg.breaker_threshold.max(1) {
            self.shared.breaker.store(2, Ordering::Relaxed);
            tokio::time::sleep(self.cfg.breaker_open_for).await;
            self.shared.breaker.store(1, Ordering::Relaxed);
        } else {
            tokio::time::sleep(self.delay.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
            self.delay = (self.delay * 2).min(self.cfg.max_backoff);
        }
    }
}

async fn run(
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    js: jetstream::Context,
    mapper: Arc<dyn MessageMapper>,
    cfg: PublisherConfig,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff {
        cfg: &cfg,
        shared: &shared,
        delay: cfg.min_backoff,
        consecutive: 0,
    };
    if let Some(stream) = &cfg.create_stream {
        while let Err(e) = js.get_or_create_stream(stream.clone()).await {
            tracing::warn!(error = %e, name = %cfg.name, stream = %stream.name, "cannot create the JetStream stream");
            backoff.failure().await;
        }
        backoff.success();
    }
    let checkpoint = loop {
        match checkpoints.load_checkpoint(&cfg.name).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, name = %cfg.name, "cannot load publisher checkpoint");
                backoff.failure().await;
            }
        }
    };
    backoff.success();
    let from = checkpoint.map_or(cfg.start, Position::next);
    if let Some(c) = checkpoint {
        shared.position.store(c.get(), Ordering::Relaxed);
    }
    shared.considered_below.store(from.get(), Ordering::Relaxed);
    measure_head(&*store, &shared).await;
    let mut sub = Subscription::new(
        store.clone(),
        SubscribeOptions::default()
            .with_from(from)
            .with_filter(cfg.filter.clone())
            .with_batch_size(cfg.batch_size.max(1)),
    );
    loop {
        let batch = match sub.next_batch(cfg.batch_size.max(1)).await {
            Ok(b) if b.is_empty() => {
                // Caught up: everything up to where the next read starts is considered.
                shared
                    .considered_below
                    .store(sub.resume_position().get(), Ordering::Relaxed);
                if let Err(e) = sub.wait().await {
                    tracing::warn!(error = %e, name = %cfg.name, "waiting for the log failed");
                    backoff.failure().await;
                }
                continue;
            }
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, name = %cfg.name, "reading the log failed");
                backoff.failure().await;
                continue;
            }
        };
        measure_head(&*store, &shared).await;
        let mut done = 0;
        while done < batch.len() {
            shared
                .pending_since
                .store(batch[done].recorded_at.unix_micros(), Ordering::Relaxed);
            match publish(&js, &*mapper, &cfg, &shared, &batch[done..]).await {
                Ok(()) => {
                    backoff.success();
                    done = batch.len();
                }
                Err((acked, e)) => {
                    tracing::warn!(error = %e, name = %cfg.name, "publishing failed; retrying");
                    done += acked;
                    backoff.failure().await;
                }
            }
        }
        let Some(last) = batch.last() else { continue };
        loop {
            match checkpoints.save_checkpoint(&cfg.name, last.position).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, name = %cfg.name, "cannot save publisher checkpoint");
                    backoff.failure().await;
                }
            }
        }
        // Lag first: whoever sees the new position also sees the lag that goes with it.
        shared
            .considered_below
            .store(sub.resume_position().get(), Ordering::Release);
        shared.pending_since.store(NONE, Ordering::Release);
        shared
            .last_recorded_at
            .store(last.recorded_at.unix_micros(), Ordering::Release);
        shared
            .position
            .store(last.position.get(), Ordering::Release);
    }
}

/// Records the store's head for the lag (a failed read keeps the previous value).
async fn measure_head(store: &dyn EventStore, shared: &Shared) {
    if let Ok(head) = store.head().await {
        shared.head.fetch_max(head.get(), Ordering::Relaxed);
    }
}

/// Publishes `events` in order; on failure returns how many leading events are acknowledged.
async fn publish(
    js: &jetstream::Context,
    mapper: &dyn MessageMapper,
    cfg: &PublisherConfig,
    shared: &Shared,
    events: &[RecordedEvent],
) -> Result<(), (usize, String)> {
    let mut pending: Vec<(usize, jetstream::context::PublishAckFuture)> = Vec::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut acked = 0usize;
    for (i, e) in events.iter().enumerate() {
        let Some(msg) = mapper.map(e) else {
            if pending.is_empty() {
                acked = i + 1;
            }
            continue;
        };
        if in_flight.contains(&msg.ordering_key) {
            acked = drain(&mut pending, shared, cfg, acked).await?;
            in_flight.clear();
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", e.event_id.to_string().as_str());
        for (k, v) in &msg.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        match js
            .publish_with_headers(msg.subject.clone(), headers, msg.payload.clone())
            .await
        {
            Ok(fut) => {
                pending.push((i, fut));
                in_flight.insert(msg.ordering_key);
            }
            Err(err) => {
                let acked = drain(&mut pending, shared, cfg, acked).await?;
                return Err((acked, format!("publish to {}: {err}", msg.subject)));
            }
        }
    }
    let acked = drain(&mut pending, shared, cfg, acked).await?;
    debug_assert!(acked <= events.len());
    Ok(())
}

/// Awaits the pending acknowledgements in order. Returns the new count of leading acknowledged
/// events, or that count and the error at the first failed acknowledgement.
async fn drain(
    pending: &mut Vec<(usize, jetstream::context::PublishAckFuture)>,
    shared: &Shared,
    cfg: &PublisherConfig,
    mut acked: usize,
) -> Result<usize, (usize, String)> {
    let mut failed: Option<String> = None;
    // One deadline for the whole window: acknowledgements arrive together or not at all.
    let deadline = tokio::time::Instant::now() + cfg.ack_timeout;
    for (i, fut) in pending.drain(..) {
        if failed.is_some() {
            // Dropped unawaited: these are republished (and de-duplicated) on retry.
            continue;
        }
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(Ok(ack)) => {
                if ack.duplicate {
                    shared.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    shared.published.fetch_add(1, Ordering::Relaxed);
                }
                acked = i + 1;
            }
            Ok(Err(e)) => failed = Some(format!("acknowledgement: {e}")),
            Err(_) => failed = Some("acknowledgement timed out".into()),
        }
    }
    match failed {
        None => Ok(acked),
        Some(e) => Err((acked, e)),
    }
}
