//! The query side: [`Projection`]s over the global log and the [`ProjectionRunner`] that feeds
//! them from a persisted checkpoint (catch-up, then live), reports their [`Lag`], and can
//! rebuild them from position 0.
//!
//! # Delivery guarantees
//! - **Same-store read models** ([`ProjectionRunner::new`] with a [`ReadModelStore`]): the
//!   projection writes through a [`ReadModelTx`]; the runner commits a batch's writes *and* the
//!   new checkpoint atomically with [`ReadModelStore::commit`], fenced by the checkpoint it
//!   read. A crash at any point leaves either the whole batch applied or none of it: no event is
//!   ever applied twice, and a second runner of the same projection is rejected
//!   ([`crate::Error::CheckpointMoved`]).
//! - **Anything else** ([`ProjectionRunner::at_least_once`]: side effects, external databases):
//!   the checkpoint is saved after the batch's effects, so after a crash the events since the
//!   last checkpoint are delivered again. Such projections must be idempotent (e.g. upserts
//!   keyed by event id).
//!
//! # Ordering
//! Events arrive in global position order, but a projection must only rely on the order of
//! events *of the same stream* (entity): once the log is partitioned (by tenant or entity type)
//! only per-entity order is guaranteed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::aggregate::{DomainEvent, decode_domain_event};
use crate::codec::Codec;
use crate::error::{BoxError, Error, Result};
use crate::event::RecordedEvent;
use crate::id::{Position, Timestamp};
use crate::store::{
    CheckpointStore, EventFilter, EventStore, ReadAll, ReadModelBatch, ReadModelStore,
    ReadModelWrite,
};
use crate::upcast::Upcasters;

/// A read model (or any other consumer) built from the global log.
#[async_trait]
pub trait Projection: Send + 'static {
    /// Unique, stable name: also the checkpoint name.
    fn name(&self) -> &str;

    /// Which events it wants (default: all). Filtering happens in the store.
    fn filter(&self) -> EventFilter {
        EventFilter::default()
    }

    /// The read-model namespaces it owns: cleared by [`ProjectionRunner::rebuild`].
    fn namespaces(&self) -> Vec<String> {
        Vec::new()
    }

    /// Applies one event (already upcast). Read-model changes go through `tx` and are committed
    /// with the checkpoint; an error stops the runner before the batch is committed.
    async fn apply(
        &mut self,
        event: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError>;

    /// Forgets derived state kept outside the read-model store (called by
    /// [`ProjectionRunner::rebuild`] before replaying from position 0). Default: nothing.
    async fn reset(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A projection over a typed event — a domain's event enum or an aggregate's
/// [`Aggregate::Event`](crate::Aggregate::Event) — decoded with [`TypedProjection::Codec`]
/// after upcasting. Run it with [`ProjectionRunner::typed`] (or wrap it in [`Typed`]).
///
/// Its [`filter`](TypedProjection::filter) must select only events of `Self::Event` (usually
/// by stream prefix, e.g. `"Account-"`, or by event types): an event that does not decode
/// stops the runner with [`Error::Corruption`] before its batch commits.
///
/// ```
/// # use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use tracktrace_core::*;
///
/// #[derive(Debug, Serialize, Deserialize)]
/// enum BagEvent { Loaded { flight: String }, Offloaded }
/// impl DomainEvent for BagEvent {
///     fn event_type(&self) -> &'static str {
///         match self { BagEvent::Loaded { .. } => "Loaded", BagEvent::Offloaded => "Offloaded" }
///     }
/// }
///
/// /// Bags per flight.
/// struct Manifest;
/// #[async_trait::async_trait]
/// impl TypedProjection for Manifest {
///     type Event = BagEvent;
///     type Codec = JsonCodec;
///     fn name(&self) -> &str { "manifest" }
///     fn filter(&self) -> EventFilter { EventFilter::default().with_stream_prefix("Bag-") }
///     async fn apply(&mut self, event: &BagEvent, meta: &RecordedEvent, tx: &mut ReadModelTx<'_>)
///         -> std::result::Result<(), BoxError> {
///         if let BagEvent::Loaded { flight } = event {
///             tx.put("manifest", format!("{flight}/{}", meta.stream), Vec::new());
///         }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::result::Result<(), BoxError> {
/// let store = Arc::new(InMemoryStore::new());
/// let loaded = JsonCodec::new_event("Loaded", 1, &BagEvent::Loaded { flight: "IB3170".into() })?;
/// store.append_to(&TenantId::from_static("acme"), &StreamId::from_static("Bag-1"),
///                 ExpectedVersion::NoStream, vec![loaded]).await?;
/// let mut runner = ProjectionRunner::typed(store.clone(), store.clone(), Manifest);
/// runner.catch_up().await?;
/// assert!(store.get("manifest", b"IB3170/Bag-1").await?.is_some());
/// # Ok(()) }
/// ```
#[async_trait]
pub trait TypedProjection: Send + 'static {
    /// The events it reads.
    type Event: DomainEvent;
    /// How they are encoded.
    type Codec: Codec;

    /// Unique, stable name: also the checkpoint name.
    fn name(&self) -> &str;

    /// Which events it wants: only events of `Self::Event` (filtering happens in the store).
    fn filter(&self) -> EventFilter {
        EventFilter::default()
    }

    /// The read-model namespaces it owns: cleared by [`ProjectionRunner::rebuild`].
    fn namespaces(&self) -> Vec<String> {
        Vec::new()
    }

    /// Applies one decoded event; `meta` is the stored event it came from (stream, version,
    /// position, recorded-at, metadata).
    async fn apply(
        &mut self,
        event: &Self::Event,
        meta: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError>;

    /// Forgets derived state kept outside the read-model store (see [`Projection::reset`]).
    async fn reset(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A [`TypedProjection`] as a [`Projection`]: decodes every event before handing it over.
#[derive(Debug, Clone, Default)]
pub struct Typed<P>(pub P);

#[async_trait]
impl<P: TypedProjection> Projection for Typed<P> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn filter(&self) -> EventFilter {
        self.0.filter()
    }

    fn namespaces(&self) -> Vec<String> {
        self.0.namespaces()
    }

    async fn apply(
        &mut self,
        event: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        let decoded = decode_domain_event::<P::Event, P::Codec>(self.0.name(), event)?;
        self.0.apply(&decoded, event, tx).await
    }

    async fn reset(&mut self) -> Result<(), BoxError> {
        self.0.reset().await
    }
}

/// The pending read-model writes of one batch, readable by the projection (reads see the
/// batch's own earlier writes).
pub struct ReadModelTx<'a> {
    store: Option<&'a dyn ReadModelStore>,
    writes: Vec<ReadModelWrite>,
    overlay: HashMap<(String, Vec<u8>), Option<Bytes>>,
    cleared: HashSet<String>,
}

impl fmt::Debug for ReadModelTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadModelTx")
            .field("writes", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl<'a> ReadModelTx<'a> {
    fn new(store: Option<&'a dyn ReadModelStore>) -> Self {
        Self {
            store,
            writes: Vec::new(),
            overlay: HashMap::new(),
            cleared: HashSet::new(),
        }
    }

    /// The value of `key` in `ns`, including this batch's pending writes.
    pub async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        if let Some(v) = self.overlay.get(&(ns.to_owned(), key.to_vec())) {
            return Ok(v.clone());
        }
        if self.cleared.contains(ns) {
            return Ok(None);
        }
        match self.store {
            Some(s) => s.get(ns, key).await,
            None => Ok(None),
        }
    }

    /// Sets `key` in `ns`.
    pub fn put(&mut self, ns: &str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let (key, value) = (key.into(), value.into());
        self.overlay.insert(
            (ns.to_owned(), key.clone()),
            Some(Bytes::from(value.clone())),
        );
        self.writes.push(ReadModelWrite::Put {
            ns: ns.to_owned(),
            key,
            value,
        });
    }

    /// Removes `key` from `ns`.
    pub fn delete(&mut self, ns: &str, key: impl Into<Vec<u8>>) {
        let key = key.into();
        self.overlay.insert((ns.to_owned(), key.clone()), None);
        self.writes.push(ReadModelWrite::Delete {
            ns: ns.to_owned(),
            key,
        });
    }

    /// The JSON value of `key` in `ns` (undecodable data is [`Error::Corruption`]).
    pub async fn get_json<T: DeserializeOwned>(&self, ns: &str, key: &[u8]) -> Result<Option<T>> {
        match self.get(ns, key).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Error::corruption(None, format!("read model {ns}: undecodable value: {e}"))
            }),
        }
    }

    /// Sets `key` in `ns` to `value` as JSON.
    pub fn put_json<T: Serialize + ?Sized>(
        &mut self,
        ns: &str,
        key: impl Into<Vec<u8>>,
        value: &T,
    ) -> Result<()> {
        let v = serde_json::to_vec(value).map_err(|e| Error::invalid(ns, e.to_string()))?;
        self.put(ns, key, v);
        Ok(())
    }

    /// Number of pending writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether no write is pending.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// How far a projection is behind the head of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Lag {
    /// The projection's checkpoint (everything up to here is applied).
    pub checkpoint: Position,
    /// The store's head when last measured.
    pub head: Position,
    /// `head − checkpoint` in positions (positions need not be contiguous: an upper bound on
    /// the number of unprocessed events).
    pub positions: u64,
    /// Now − recorded-at of the last applied event, in seconds, while behind; `0.0` when caught
    /// up (and before the first event is applied).
    pub seconds: f64,
    /// Recorded-at of the last applied event.
    pub last_applied_at: Option<Timestamp>,
}

/// A shared, always-readable view of a runner's [`Lag`] (for metrics exporters).
#[derive(Clone, Debug, Default)]
pub struct LagHandle(Arc<Mutex<Lag>>);

impl LagHandle {
    /// The latest measurement.
    pub fn get(&self) -> Lag {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, lag: Lag) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = lag;
    }
}

/// Why a projection runner stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The event store or read-model store failed (the batch was not committed).
    #[error("projection {projection}: {source}")]
    Store {
        /// Projection name.
        projection: String,
        /// The store error.
        #[source]
        source: Error,
    },
    /// The projection's handler failed on an event (the batch was not committed).
    #[error("projection {projection} failed at position {position}: {source}")]
    Handler {
        /// Projection name.
        projection: String,
        /// The event it failed on.
        position: Position,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
}

impl ProjectionError {
    /// The store error, if this is one.
    pub fn store_error(&self) -> Option<&Error> {
        match self {
            ProjectionError::Store { source, .. } => Some(source),
            ProjectionError::Handler { .. } => None,
        }
    }
}

/// A shared view of a runner's checkpoint that can wait for it to reach a position (from
/// another task while the runner runs): the usual way to read your own writes through a
/// projection.
///
/// ```
/// # use std::sync::Arc;
/// # use tracktrace_core::*;
/// # struct Count;
/// # #[async_trait::async_trait]
/// # impl Projection for Count {
/// #     fn name(&self) -> &str { "count" }
/// #     async fn apply(&mut self, _e: &RecordedEvent, tx: &mut ReadModelTx<'_>) -> std::result::Result<(), BoxError> {
/// #         tx.put("n", b"k".to_vec(), b"v".to_vec()); Ok(())
/// #     }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::result::Result<(), BoxError> {
/// let store = Arc::new(InMemoryStore::new());
/// let mut runner = ProjectionRunner::new(store.clone(), store.clone(), Count);
/// let progress = runner.progress();
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let task = tokio::spawn(async move { runner.run(async { stopped.await.unwrap_or(()) }).await });
///
/// let tenant = TenantId::from_static("acme");
/// let out = store
///     .append_to(&tenant, &StreamId::from_static("s-1"), ExpectedVersion::Any,
///                vec![NewEvent::json("Happened", &serde_json::json!({}))])
///     .await?;
/// progress.wait_for(out.last_position()).await?; // the write is in the read model now
/// assert!(store.get("n", b"k").await?.is_some());
/// let _ = stop.send(());
/// task.await??;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ProjectionProgress(watch::Receiver<Position>);

impl ProjectionProgress {
    /// A handle following `checkpoints`, for projection runners of other crates (e.g. a
    /// backend's own runner) that publish their checkpoint on a watch channel.
    pub fn new(checkpoints: watch::Receiver<Position>) -> Self {
        Self(checkpoints)
    }

    /// The runner's checkpoint as last committed (or loaded): every event at or below it is
    /// applied. `Position::START` before the runner has loaded or committed one.
    pub fn checkpoint(&self) -> Position {
        *self.0.borrow()
    }

    /// Waits until the checkpoint is at or past `position` (every event up to `position` is
    /// reflected in the projection). Waits for as long as it takes: wrap it in a timeout. Fails
    /// with [`Error::Closed`] once the runner is dropped without reaching `position`.
    pub async fn wait_for(&self, position: Position) -> Result<Position> {
        let mut rx = self.0.clone();
        let cp = rx
            .wait_for(|cp| *cp >= position)
            .await
            .map_err(|_| Error::Closed)?;
        Ok(*cp)
    }
}

/// One batch of a projection runner. The loops around it — [`catch_up`], [`wait_for`] and
/// [`follow`] — are shared by [`ProjectionRunner`] and by runners of other crates (e.g. the
/// PostgreSQL backend's SQL-table projections).
#[async_trait]
pub trait ProjectionStep: Send {
    /// Head notifications of the log the runner reads.
    fn watch_head(&self) -> watch::Receiver<Position>;

    /// The stored checkpoint (`None`: never ran).
    async fn checkpoint(&mut self) -> Result<Option<Position>, ProjectionError>;

    /// Applies one batch; returns the number of events applied and whether the batch reached
    /// the head (a short page).
    async fn step(&mut self) -> Result<(usize, bool), ProjectionError>;

    /// The error to stop with when the log's store is closed.
    fn closed(&self) -> ProjectionError;
}

/// Steps `runner` until a batch reaches the head; returns the checkpoint.
pub async fn catch_up<R: ProjectionStep + ?Sized>(
    runner: &mut R,
) -> Result<Position, ProjectionError> {
    loop {
        let (_, at_head) = runner.step().await?;
        if at_head {
            return Ok(runner.checkpoint().await?.unwrap_or_default());
        }
    }
}

/// Steps `runner` until every event up to `position` is applied, waiting on head notifications
/// while `position` is not readable yet; returns the checkpoint. Waits for as long as it takes.
pub async fn wait_for<R: ProjectionStep + ?Sized>(
    runner: &mut R,
    position: Position,
) -> Result<Position, ProjectionError> {
    let mut watch = runner.watch_head();
    loop {
        if let Some(cp) = runner.checkpoint().await?
            && cp >= position
        {
            return Ok(cp);
        }
        watch.borrow_and_update();
        let (_, at_head) = runner.step().await?;
        if at_head
            && runner.checkpoint().await?.unwrap_or_default() < position
            && watch.changed().await.is_err()
        {
            return Err(runner.closed());
        }
    }
}

/// Catches `runner` up, then follows new events (woken by head notifications) until
/// `shutdown` completes.
pub async fn follow<R: ProjectionStep + ?Sized>(
    runner: &mut R,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProjectionError> {
    let mut watch = runner.watch_head();
    tokio::pin!(shutdown);
    loop {
        // Seen before reading: a commit after the read changes the watch again.
        watch.borrow_and_update();
        catch_up(runner).await?;
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            changed = watch.changed() => {
                if changed.is_err() {
                    return Err(runner.closed());
                }
            }
        }
    }
}

/// The next batch of a projection runner, as planned by [`read_batch`]: the events after its
/// checkpoint and the checkpoint to commit with them.
#[derive(Debug)]
#[non_exhaustive]
pub struct Batch {
    /// The events to apply, in position order (as stored: not upcast yet).
    pub events: Vec<RecordedEvent>,
    /// The checkpoint to commit with the batch: everything below the page's `next` has been
    /// considered (events the filter skipped included) and nothing can commit there later.
    pub checkpoint: Position,
    /// Whether the page was short: the batch reaches the head of the log.
    pub at_head: bool,
    /// Whether there is nothing to commit: no event, and the checkpoint would not move (or the
    /// log is still empty).
    pub idle: bool,
}

/// Reads the next batch of a projection runner whose stored checkpoint is `checkpoint`
/// (`None`: never ran): up to `batch_size` events of `filter` after it, and the checkpoint
/// that commits them. Shared by [`ProjectionRunner`] and by runners of other crates (e.g. the
/// PostgreSQL backend's SQL-table projections); the caller applies [`Batch::events`] and commits
/// [`Batch::checkpoint`] unless the batch is [`idle`](Batch::idle).
pub async fn read_batch<S: EventStore + ?Sized>(
    store: &S,
    checkpoint: Option<Position>,
    filter: EventFilter,
    batch_size: usize,
) -> Result<Batch> {
    let from = checkpoint.map_or(Position::START, Position::next);
    let page = store
        .read_all(ReadAll::starting_at(from, batch_size).filter(filter))
        .await?;
    let at_head = page.events.len() < batch_size;
    let new_cp = Position::new(page.next.get().saturating_sub(1));
    let idle = page.events.is_empty() && checkpoint.is_some_and(|c| c >= new_cp)
        || page.next == Position::START;
    Ok(Batch {
        events: page.events,
        checkpoint: new_cp,
        at_head,
        idle,
    })
}

#[async_trait]
impl<P: Projection> ProjectionStep for ProjectionRunner<P> {
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.store.watch_head()
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, ProjectionError> {
        ProjectionRunner::checkpoint(self).await
    }

    async fn step(&mut self) -> Result<(usize, bool), ProjectionError> {
        ProjectionRunner::step(self).await
    }

    fn closed(&self) -> ProjectionError {
        self.err(Error::Closed)
    }
}

enum Target {
    ReadModels(Arc<dyn ReadModelStore>),
    Checkpoints(Arc<dyn CheckpointStore>),
}

/// Feeds one [`Projection`] from the global log. Run exactly one runner per projection name
/// (several are fenced off for same-store read models, not for at-least-once projections).
pub struct ProjectionRunner<P: Projection> {
    store: Arc<dyn EventStore>,
    target: Target,
    projection: P,
    upcasters: Upcasters,
    batch_size: usize,
    /// `None`: not loaded yet (reloaded after a fencing error).
    checkpoint: Option<Option<Position>>,
    lag: LagHandle,
    progress: watch::Sender<Position>,
}

impl<P: Projection> fmt::Debug for ProjectionRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projection", &self.projection.name())
            .field("checkpoint", &self.checkpoint)
            .field("lag", &self.lag.get())
            .finish_non_exhaustive()
    }
}

impl<T: TypedProjection> ProjectionRunner<Typed<T>> {
    /// A runner for a [`TypedProjection`] whose read model lives in `read_models` (see
    /// [`ProjectionRunner::new`]).
    pub fn typed(
        store: Arc<dyn EventStore>,
        read_models: Arc<dyn ReadModelStore>,
        projection: T,
    ) -> Self {
        Self::new(store, read_models, Typed(projection))
    }
}

impl<P: Projection> ProjectionRunner<P> {
    /// A runner whose read model lives in `read_models` (usually the event store itself):
    /// writes and checkpoint commit atomically, so each event is applied exactly once.
    pub fn new(
        store: Arc<dyn EventStore>,
        read_models: Arc<dyn ReadModelStore>,
        projection: P,
    ) -> Self {
        Self::with_target(store, Target::ReadModels(read_models), projection)
    }

    /// A runner for a projection whose effects live elsewhere: only the checkpoint is stored
    /// in `checkpoints`, after the effects, so delivery is **at-least-once**. The projection
    /// must not write through its [`ReadModelTx`] (that fails the batch).
    pub fn at_least_once(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        projection: P,
    ) -> Self {
        Self::with_target(store, Target::Checkpoints(checkpoints), projection)
    }

    fn with_target(store: Arc<dyn EventStore>, target: Target, projection: P) -> Self {
        Self {
            store,
            target,
            projection,
            upcasters: Upcasters::new(),
            batch_size: 256,
            checkpoint: None,
            lag: LagHandle::default(),
            progress: watch::Sender::new(Position::START),
        }
    }

    /// Events read (and committed) per batch (default 256).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Upcasts events before the projection sees them.
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The projection, mutably.
    pub fn projection_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// A handle to read the lag from another task.
    pub fn lag_handle(&self) -> LagHandle {
        self.lag.clone()
    }

    /// A handle that follows the checkpoint and can [wait for](ProjectionProgress::wait_for) a
    /// position from another task while this runner [runs](ProjectionRunner::run).
    pub fn progress(&self) -> ProjectionProgress {
        ProjectionProgress(self.progress.subscribe())
    }

    /// Records `cp` as the checkpoint and tells the [`ProjectionProgress`] handles.
    fn set_checkpoint(&mut self, cp: Option<Position>) {
        self.checkpoint = Some(cp);
        self.progress.send_replace(cp.unwrap_or_default());
    }

    /// Processes batches (in this task) until every event up to `position` is applied, waiting
    /// on the store's head notifications when `position` is not readable yet; returns the
    /// checkpoint. Waits for as long as it takes: wrap it in a timeout. Use
    /// [`ProjectionRunner::progress`] instead while the runner [runs](ProjectionRunner::run)
    /// in another task.
    pub async fn wait_for(&mut self, position: Position) -> Result<Position, ProjectionError> {
        wait_for(self, position).await
    }

    fn err(&self, source: Error) -> ProjectionError {
        ProjectionError::Store {
            projection: self.projection.name().to_owned(),
            source,
        }
    }

    /// The stored checkpoint (`None`: never ran).
    pub async fn checkpoint(&mut self) -> Result<Option<Position>, ProjectionError> {
        if let Some(cp) = self.checkpoint {
            return Ok(cp);
        }
        let name = self.projection.name().to_owned();
        let cp = match &self.target {
            Target::ReadModels(s) => s.load_checkpoint(&name).await,
            Target::Checkpoints(s) => s.load_checkpoint(&name).await,
        }
        .map_err(|e| self.err(e))?;
        self.set_checkpoint(cp);
        Ok(cp)
    }

    /// Processes one batch; returns the number of events applied and whether the batch reached
    /// the head (a short page).
    pub async fn step(&mut self) -> Result<(usize, bool), ProjectionError> {
        let cp = self.checkpoint().await?;
        let batch = read_batch(&*self.store, cp, self.projection.filter(), self.batch_size)
            .await
            .map_err(|e| self.err(e))?;
        let (at_head, new_cp) = (batch.at_head, batch.checkpoint);
        if batch.idle {
            self.measure(cp.unwrap_or_default(), None).await?;
            return Ok((0, at_head));
        }
        let applied = batch.events.len();
        let last_at = batch.events.last().map(|e| e.recorded_at);
        let read_models = match &self.target {
            Target::ReadModels(s) => Some(s.clone()),
            Target::Checkpoints(_) => None,
        };
        let mut tx = ReadModelTx::new(read_models.as_deref());
        for e in batch.events {
            let position = e.position;
            let e = self.upcasters.upcast(e).map_err(|e| self.err(e))?;
            if let Err(source) = self.projection.apply(&e, &mut tx).await {
                return Err(ProjectionError::Handler {
                    projection: self.projection.name().to_owned(),
                    position,
                    source,
                });
            }
        }
        let name = self.projection.name().to_owned();
        let res = match &self.target {
            Target::ReadModels(s) => {
                s.commit(ReadModelBatch {
                    checkpoint: name.clone(),
                    expected_checkpoint: cp,
                    position: new_cp,
                    writes: tx.writes,
                })
                .await
            }
            Target::Checkpoints(s) => {
                if !tx.writes.is_empty() {
                    return Err(ProjectionError::Handler {
                        projection: name,
                        position: new_cp,
                        source: "an at-least-once projection wrote to its ReadModelTx, which has \
                                 no read-model store"
                            .into(),
                    });
                }
                s.save_checkpoint(&name, new_cp).await
            }
        };
        if let Err(e) = res {
            // Fenced off or failed: reload the checkpoint before the next batch.
            self.checkpoint = None;
            return Err(self.err(e));
        }
        self.set_checkpoint(Some(new_cp));
        self.measure(new_cp, last_at).await?;
        Ok((applied, at_head))
    }

    async fn measure(
        &mut self,
        checkpoint: Position,
        last_at: Option<Timestamp>,
    ) -> Result<(), ProjectionError> {
        let head = self.store.head().await.map_err(|e| self.err(e))?;
        let prev = self.lag.get();
        let last_applied_at = last_at.or(prev.last_applied_at);
        let positions = head.get().saturating_sub(checkpoint.get());
        let seconds = match last_applied_at {
            Some(t) if positions > 0 => t.elapsed_until(Timestamp::now()).as_secs_f64(),
            _ => 0.0,
        };
        self.lag.set(Lag {
            checkpoint,
            head,
            positions,
            seconds,
            last_applied_at,
        });
        Ok(())
    }

    /// Processes batches until the head is reached; returns the checkpoint.
    pub async fn catch_up(&mut self) -> Result<Position, ProjectionError> {
        catch_up(self).await
    }

    /// Catches up, then follows new events (woken by the store's head notifications) until
    /// `shutdown` completes.
    pub async fn run(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        follow(self, shutdown).await
    }

    /// Forgets everything and replays from position 0: clears the projection's
    /// [`Projection::namespaces`] and resets its checkpoint (atomically, for same-store read
    /// models), calls [`Projection::reset`], then catches up.
    pub async fn rebuild(&mut self) -> Result<Position, ProjectionError> {
        self.reset().await?;
        self.catch_up().await
    }

    /// The first half of [`ProjectionRunner::rebuild`]: back to position 0 without replaying.
    pub async fn reset(&mut self) -> Result<(), ProjectionError> {
        let cp = self.checkpoint().await?;
        let name = self.projection.name().to_owned();
        let res = match &self.target {
            Target::ReadModels(s) => {
                s.commit(ReadModelBatch {
                    checkpoint: name.clone(),
                    expected_checkpoint: cp,
                    position: Position::START,
                    writes: self
                        .projection
                        .namespaces()
                        .into_iter()
                        .map(|ns| ReadModelWrite::Clear { ns })
                        .collect(),
                })
                .await
            }
            Target::Checkpoints(s) => s.save_checkpoint(&name, Position::START).await,
        };
        self.checkpoint = None;
        res.map_err(|e| self.err(e))?;
        self.projection
            .reset()
            .await
            .map_err(|source| ProjectionError::Handler {
                projection: name,
                position: Position::START,
                source,
            })?;
        self.set_checkpoint(Some(Position::START));
        self.lag.set(Lag::default());
        Ok(())
    }
}
