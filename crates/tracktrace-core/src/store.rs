//! The [`EventStore`] trait every backend implements, its request/response types, the
//! [`EventStoreExt`] conveniences and the notification-driven [`Subscription`].

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::event::{NewEvent, RecordedEvent};
use crate::event_ref::EventRef;
use crate::id::{EventId, ExpectedVersion, Position, StreamId, TenantId, Timestamp, Version};

/// An atomic append of one or more events to one stream ([`AppendRequest::new`], or
/// [`EventStoreExt::append_to`]). Non-exhaustive: fields may be added, so other crates build
/// it with the constructor:
///
/// ```
/// use tracktrace_core::{AppendRequest, ExpectedVersion, NewEvent, StreamId, TenantId};
/// let req = AppendRequest::new(
///     TenantId::from_static("acme"),
///     StreamId::from_static("Bag-1"),
///     ExpectedVersion::NoStream,
///     vec![NewEvent::json("CHECKED_IN", &serde_json::json!({}))],
/// );
/// assert_eq!(req.events.len(), 1);
/// ```
///
/// ```compile_fail
/// use tracktrace_core::{AppendRequest, ExpectedVersion, StreamId, TenantId};
/// let req = AppendRequest {
///     tenant: TenantId::from_static("acme"),
///     stream: StreamId::from_static("Bag-1"),
///     expected: ExpectedVersion::NoStream,
///     events: Vec::new(),
/// };
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AppendRequest {
    /// Owning tenant.
    pub tenant: TenantId,
    /// Target stream (created by its first append).
    pub stream: StreamId,
    /// Optimistic-concurrency precondition.
    pub expected: ExpectedVersion,
    /// The events, in order. 1 ..= [`crate::limits::MAX_BATCH_EVENTS`].
    pub events: Vec<NewEvent>,
}

impl AppendRequest {
    /// An append of `events` to `stream` of `tenant` if the stream satisfies `expected`.
    pub fn new(
        tenant: TenantId,
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        Self {
            tenant,
            stream,
            expected,
            events,
        }
    }
}

/// Result of a successful append ([`AppendOutcome::new`]). Non-exhaustive: fields may be
/// added, so other crates (backends, wrapper stores) build it with the constructor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendOutcome {
    /// One reference per event of the request, in request order.
    pub events: Vec<EventRef>,
    /// `true` when every event of the batch was already stored: nothing was written and
    /// `events` are the references of the originals (the expected version is not checked
    /// for such a batch, so a retried append after a lost acknowledgement succeeds).
    pub duplicate: bool,
}

impl AppendOutcome {
    /// The outcome of an append that stored (or, with `duplicate`, had already stored)
    /// `events`, one reference per event of the request, in request order.
    pub fn new(events: Vec<EventRef>, duplicate: bool) -> Self {
        Self { events, duplicate }
    }

    /// Version of the stream after the append (of the last original for duplicates).
    pub fn last_version(&self) -> Version {
        self.events.last().map(|r| r.version).unwrap_or_default()
    }

    /// Global position of the last event.
    pub fn last_position(&self) -> Position {
        self.events.last().map(|r| r.position).unwrap_or_default()
    }
}

/// Reading direction within a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forwards,
    /// Newest first.
    Backwards,
}

/// A read of one stream ([`ReadStream::forwards`] / [`ReadStream::backwards`], then
/// [`ReadStream::from`] / [`ReadStream::limit`]). Non-exhaustive: fields may be added.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReadStream {
    /// Tenant of the stream.
    pub tenant: TenantId,
    /// The stream.
    pub stream: StreamId,
    /// Direction.
    pub direction: Direction,
    /// First version to return, inclusive. `None`: the first event (forwards) or the last
    /// (backwards).
    pub from: Option<Version>,
    /// At most this many events.
    pub limit: usize,
}

impl ReadStream {
    /// The whole stream, forwards.
    pub fn forwards(tenant: TenantId, stream: StreamId) -> Self {
        Self {
            tenant,
            stream,
            direction: Direction::Forwards,
            from: None,
            limit: usize::MAX,
        }
    }

    /// The whole stream, newest first.
    pub fn backwards(tenant: TenantId, stream: StreamId) -> Self {
        Self {
            direction: Direction::Backwards,
            ..Self::forwards(tenant, stream)
        }
    }

    /// Starts at `v` (inclusive).
    pub fn from(mut self, v: Version) -> Self {
        self.from = Some(v);
        self
    }

    /// Returns at most `n` events.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n;
        self
    }
}

/// Which events of the global log a reader wants. Empty fields match everything.
///
/// Non-exhaustive: fields may be added, so other crates build it from `Default` (everything)
/// or [`EventFilter::tenant`] and the `with_*` methods:
///
/// ```
/// use tracktrace_core::{EventFilter, TenantId};
/// let f = EventFilter::default()
///     .with_tenant(TenantId::from_static("acme"))
///     .with_event_types(["LOADED", "SCANNED"])
///     .with_stream_prefix("Bag-");
/// assert_eq!(f.event_types, ["LOADED", "SCANNED"]);
/// assert!(EventFilter::default().is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventFilter {
    /// Only this tenant's events.
    pub tenant: Option<TenantId>,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
    /// Only streams whose id starts with this prefix.
    pub stream_prefix: Option<String>,
}

impl EventFilter {
    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &RecordedEvent) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == e.tenant)
            && (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
            && self
                .stream_prefix
                .as_ref()
                .is_none_or(|p| e.stream.as_str().starts_with(p.as_str()))
    }

    /// Whether an event with these fields passes the filter (for backends that can read them
    /// before decoding a whole event; same answer as [`EventFilter::matches`]).
    pub fn matches_head(&self, tenant: &str, stream: &str, event_type: &str) -> bool {
        self.tenant.as_ref().is_none_or(|t| t.as_str() == tenant)
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
            && self
                .stream_prefix
                .as_ref()
                .is_none_or(|p| stream.starts_with(p.as_str()))
    }

    /// Whether the filter lets every event through.
    pub fn is_empty(&self) -> bool {
        self.tenant.is_none() && self.event_types.is_empty() && self.stream_prefix.is_none()
    }

    /// Only `tenant`'s events.
    pub fn tenant(tenant: TenantId) -> Self {
        Self {
            tenant: Some(tenant),
            ..Self::default()
        }
    }

    /// Sets the tenant: `Some(t)` (or a plain `TenantId`) keeps only its events, `None` lets
    /// every tenant's through (builder style).
    pub fn with_tenant(mut self, tenant: impl Into<Option<TenantId>>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// Sets the event types to keep; none (an empty list) keeps every type (builder style).
    pub fn with_event_types<T: Into<String>>(
        mut self,
        event_types: impl IntoIterator<Item = T>,
    ) -> Self {
        self.event_types = event_types.into_iter().map(Into::into).collect();
        self
    }

    /// Keeps only streams whose id starts with `prefix` (builder style).
    pub fn with_stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }
}

/// A read of the global log ([`ReadAll::starting_at`], then [`ReadAll::filter`]).
/// Non-exhaustive: fields may be added.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReadAll {
    /// First position to consider, inclusive (`Position::START` reads from the beginning).
    pub from: Position,
    /// At most this many (matching) events.
    pub limit: usize,
    /// Which events.
    pub filter: EventFilter,
}

impl ReadAll {
    /// Up to `limit` events from `from`, unfiltered.
    pub fn starting_at(from: Position, limit: usize) -> Self {
        Self {
            from,
            limit,
            filter: EventFilter::default(),
        }
    }

    /// Up to `limit` events from `from`, unfiltered.
    #[deprecated(note = "reads like `From::from`; use `ReadAll::starting_at`")]
    pub fn from(from: Position, limit: usize) -> Self {
        Self::starting_at(from, limit)
    }

    /// With a filter.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// One page of the global log ([`AllPage::new`]). Non-exhaustive: fields may be added, so
/// other crates (backends, wrapper stores) build it with the constructor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AllPage {
    /// Matching events in strictly increasing position order.
    pub events: Vec<RecordedEvent>,
    /// Where the next read should start (`from` of the next [`ReadAll`]). Everything below it
    /// has been considered: no event committed later will ever get a position below `next`.
    ///
    /// A page with fewer than `limit` events means the read reached the head.
    pub next: Position,
}

impl AllPage {
    /// A page of `events` (matching, in strictly increasing position order) after which the
    /// next read starts at `next`.
    pub fn new(events: Vec<RecordedEvent>, next: Position) -> Self {
        Self { events, next }
    }
}

/// A stored snapshot of an aggregate's state at a stream version ([`Snapshot::new`]).
/// Non-exhaustive: fields may be added, so other crates build it with the constructor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Tenant of the stream.
    pub tenant: TenantId,
    /// The aggregate's stream.
    pub stream: StreamId,
    /// Stream version the state includes.
    pub version: Version,
    /// Schema version of the encoded state (a mismatch makes loaders ignore the snapshot).
    pub schema_version: u32,
    /// Encoded state.
    pub payload: Bytes,
}

impl Snapshot {
    /// The state `payload` (encoded with schema `schema_version`) of `tenant`'s `stream`,
    /// including every event up to `version`.
    pub fn new(
        tenant: TenantId,
        stream: StreamId,
        version: Version,
        schema_version: u32,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            tenant,
            stream,
            version,
            schema_version,
            payload: payload.into(),
        }
    }
}

/// Persistent snapshots, one (the latest) per stream. Optional per aggregate type.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// The stored snapshot of a stream, if any.
    async fn load_snapshot(&self, tenant: &TenantId, stream: &StreamId)
    -> Result<Option<Snapshot>>;
    /// Stores `snapshot`, unless one of a higher version is already stored.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;
}

/// Persistent checkpoints of global-log consumers (projections, publishers), by name.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The last position the named consumer has fully processed.
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>>;
    /// Records that the named consumer has processed everything up to `position`.
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()>;
}

/// One write of a [`ReadModelBatch`] ([`ReadModelWrite::put`], [`ReadModelWrite::delete`],
/// [`ReadModelWrite::clear`]).
///
/// Non-exhaustive: kinds of writes may be added. A backend that meets one it does not know
/// must reject the whole batch (e.g. with [`Error::InvalidInput`]), never skip the write.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadModelWrite {
    /// Sets `key` in namespace `ns` to `value`.
    Put {
        /// Namespace (one per read model, e.g. `"timeline"`).
        ns: String,
        /// Key (ordered bytewise).
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Removes `key` from `ns` (no error if absent).
    Delete {
        /// Namespace.
        ns: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Removes every key of `ns` (used when a projection is rebuilt from position 0).
    Clear {
        /// Namespace.
        ns: String,
    },
}

impl ReadModelWrite {
    /// Sets `key` in namespace `ns` to `value` ([`ReadModelWrite::Put`]).
    pub fn put(ns: impl Into<String>, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put {
            ns: ns.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    /// Removes `key` from `ns` ([`ReadModelWrite::Delete`]).
    pub fn delete(ns: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        Self::Delete {
            ns: ns.into(),
            key: key.into(),
        }
    }

    /// Removes every key of `ns` ([`ReadModelWrite::Clear`]).
    pub fn clear(ns: impl Into<String>) -> Self {
        Self::Clear { ns: ns.into() }
    }
}

/// Read-model writes that commit atomically together with a projection checkpoint
/// ([`ReadModelBatch::new`], then [`ReadModelBatch::with_writes`] or
/// [`ReadModelBatch::push`]). Non-exhaustive: fields may be added, so other crates build it
/// with the constructor:
///
/// ```
/// use tracktrace_core::{Position, ReadModelBatch, ReadModelWrite};
/// let mut batch = ReadModelBatch::new("timeline", None, Position::new(7))
///     .with_writes(vec![ReadModelWrite::clear("timeline")]);
/// batch.push(ReadModelWrite::put("timeline", "bag-1", "loaded"));
/// assert_eq!(batch.writes.len(), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadModelBatch {
    /// Checkpoint name (the projection's name).
    pub checkpoint: String,
    /// The checkpoint the writer believes is stored (`None`: none yet). If another value is
    /// stored the batch is rejected with [`Error::CheckpointMoved`] and nothing is written:
    /// this fences off a second runner of the same projection.
    pub expected_checkpoint: Option<Position>,
    /// New checkpoint: every event up to here is reflected in the read model.
    pub position: Position,
    /// The writes, applied in order.
    pub writes: Vec<ReadModelWrite>,
}

impl ReadModelBatch {
    /// A batch without writes that moves checkpoint `checkpoint` from `expected_checkpoint`
    /// (`None`: none stored yet) to `position`.
    pub fn new(
        checkpoint: impl Into<String>,
        expected_checkpoint: Option<Position>,
        position: Position,
    ) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            expected_checkpoint,
            position,
            writes: Vec::new(),
        }
    }

    /// Sets the writes, replacing any added before (builder style).
    pub fn with_writes(mut self, writes: Vec<ReadModelWrite>) -> Self {
        self.writes = writes;
        self
    }

    /// Adds `write` after the others.
    pub fn push(&mut self, write: ReadModelWrite) {
        self.writes.push(write);
    }
}

/// A bytewise key range `[start, end)` within one namespace: [`KeyRange::default`] (every
/// key), [`KeyRange::new`] or [`KeyRange::prefix`] (non-exhaustive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyRange {
    /// Inclusive lower bound.
    pub start: Vec<u8>,
    /// Exclusive upper bound (`None`: to the end of the namespace).
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// The keys from `start` (inclusive) to `end` (exclusive; `None`: to the end of the
    /// namespace).
    pub fn new(start: impl Into<Vec<u8>>, end: Option<Vec<u8>>) -> Self {
        Self {
            start: start.into(),
            end,
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        Self {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// The smallest key greater than every key starting with `prefix` (`None` if there is none).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Ordered key-value storage for read models living in the same store as the events, whose
/// writes commit atomically with the projection's checkpoint: after a crash a projection
/// resumes exactly after the last event it applied (no double application).
///
/// Checkpoints are shared with [`CheckpointStore`]: `commit` moves the same named checkpoint.
#[async_trait]
pub trait ReadModelStore: CheckpointStore {
    /// The value of `key` in `ns`.
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>>;
    /// Up to `limit` entries of `ns` within `range`, in key order (or reverse order).
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>>;
    /// Applies the batch atomically (all writes and the checkpoint, or nothing).
    async fn commit(&self, batch: ReadModelBatch) -> Result<()>;
}

/// An event store backend.
///
/// Object safe: most code holds an `Arc<dyn EventStore>`. Behaviour such as retries, circuit
/// breaking or metrics is added by wrapper stores, not by flags in backends. Every backend must
/// pass the suite of the `tracktrace-conformance` crate.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `req.events` atomically (all or nothing) to the stream.
    ///
    /// Order of checks: invalid input ([`Error::InvalidInput`]); idempotency (all events already
    /// stored for the tenant, by event id or dedup key: `Ok` with `duplicate: true`; only some:
    /// [`Error::Duplicate`]); the expected version ([`Error::Conflict`]). Only then is anything
    /// written. The returned `Ok` means the events are durable per the backend's documented mode.
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome>;

    /// Events of one stream; an unknown stream reads as empty.
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>>;

    /// A page of the global log in position order. Never returns an event while a
    /// lower-positioned one may still commit.
    async fn read_all(&self, req: ReadAll) -> Result<AllPage>;

    /// Current version of a stream (`Version::ZERO` if it does not exist).
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version>;

    /// A stored event by id, within a tenant.
    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>>;

    /// Highest position readers may read up to (no gaps below it can be filled later).
    async fn head(&self) -> Result<Position>;

    /// Where a time window starts in the global log: the lowest position of an event recorded
    /// (store clock, [`RecordedEvent::recorded_at`]) at or after `at`; if there is none, the
    /// position where a read of the log's head starts (so events committed later are found).
    ///
    /// Guarantee (every backend): every event below the result was recorded before `at`, and a
    /// [`EventStore::read_all`] from the result finds every event recorded at or after `at`.
    /// Backends whose recorded-at never decreases along the log (in-memory, sled: one writer,
    /// monotonic clock) also guarantee that every event at or above the result was recorded at
    /// or after `at`. On PostgreSQL, recorded-at is the appending transaction's start and
    /// positions follow transaction ids, so concurrent appends may interleave by the time an
    /// append takes to get its id: a reader of `[from, to)` starts at `position_at(from)`,
    /// reads on a little past `to` (a slack) and filters on recorded-at exactly.
    ///
    /// Backends answer without scanning the whole log (binary search, or an index).
    async fn position_at(&self, at: Timestamp) -> Result<Position>;

    /// A channel that changes whenever new events may have become readable. Its value is a
    /// hint (a recent head), not a promise; subscribers re-read with [`EventStore::read_all`].
    fn watch_head(&self) -> watch::Receiver<Position>;

    /// How many events the store holds and how many bytes it uses, or `None` when the backend
    /// does not report them (the default, so existing implementations need not change).
    ///
    /// Cheap enough for every metrics scrape: backends never scan the whole log for it.
    /// [`StoreStats::events`] counts stored events, not positions (positions need not be
    /// contiguous; on PostgreSQL they follow transaction ids): every event readable through
    /// [`EventStore::read_all`] at some recent head is counted once; duplicates and rejected
    /// appends never count. What [`StoreStats::bytes`] measures is documented by each backend.
    /// Wrapper stores pass the call through.
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        Ok(None)
    }
}

/// What a store holds ([`EventStore::store_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Events stored (readable through [`EventStore::read_all`]), each counted once.
    pub events: u64,
    /// Bytes the store uses, as its backend measures them (files on disk, relation sizes,
    /// memory held): see the backend's documentation.
    pub bytes: u64,
}

impl StoreStats {
    /// `events` stored in `bytes`.
    pub fn new(events: u64, bytes: u64) -> Self {
        Self { events, bytes }
    }
}

#[async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        (**self).append(req).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        (**self).read_stream(req).await
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        (**self).read_all(req).await
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        (**self).stream_version(tenant, stream).await
    }
    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>> {
        (**self).get_event(tenant, event_id).await
    }
    async fn head(&self) -> Result<Position> {
        (**self).head().await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        (**self).position_at(at).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        (**self).watch_head()
    }
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        (**self).store_stats().await
    }
}

#[async_trait]
impl<S: SnapshotStore + ?Sized> SnapshotStore for Arc<S> {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        (**self).load_snapshot(tenant, stream).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        (**self).save_snapshot(snapshot).await
    }
}

#[async_trait]
impl<S: CheckpointStore + ?Sized> CheckpointStore for Arc<S> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        (**self).load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        (**self).save_checkpoint(name, position).await
    }
}

#[async_trait]
impl<S: ReadModelStore + ?Sized> ReadModelStore for Arc<S> {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        (**self).get(ns, key).await
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        (**self).scan(ns, range, direction, limit).await
    }
    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        (**self).commit(batch).await
    }
}

/// Conveniences over [`EventStore`], implemented for every store.
#[async_trait]
pub trait EventStoreExt: EventStore {
    /// Appends `events` to `tenant`/`stream`.
    async fn append_to(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        self.append(AppendRequest {
            tenant: tenant.clone(),
            stream: stream.clone(),
            expected,
            events,
        })
        .await
    }

    /// The whole stream, oldest first.
    async fn read_stream_forwards(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Vec<RecordedEvent>> {
        self.read_stream(ReadStream::forwards(tenant.clone(), stream.clone()))
            .await
    }

    /// Every event of the global log from `from` that matches `filter` (pages internally).
    async fn read_all_to_end(
        &self,
        from: Position,
        filter: EventFilter,
    ) -> Result<Vec<RecordedEvent>> {
        let mut out = Vec::new();
        let mut next = from;
        loop {
            let page = self
                .read_all(ReadAll::starting_at(next, 1000).filter(filter.clone()))
                .await?;
            let full = page.events.len() == 1000;
            out.extend(page.events);
            next = page.next;
            if !full {
                return Ok(out);
            }
        }
    }
}

impl<S: EventStore + ?Sized> EventStoreExt for S {}

/// Where and what a [`Subscription`] reads. Non-exhaustive: fields may be added, so other
/// crates start from `Default` (the whole log, 512 events per read) and use the `with_*`
/// methods:
///
/// ```
/// use tracktrace_core::{EventFilter, Position, SubscribeOptions};
/// let opts = SubscribeOptions::default()
///     .with_from(Position::new(42))
///     .with_filter(EventFilter::default().with_stream_prefix("Bag-"))
///     .with_batch_size(100);
/// assert_eq!(opts.batch_size, 100);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// First position to deliver (inclusive). To resume after a checkpoint `p`, use `p.next()`.
    pub from: Position,
    /// Which events.
    pub filter: EventFilter,
    /// Events fetched per read.
    pub batch_size: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            from: Position::START,
            filter: EventFilter::default(),
            batch_size: 512,
        }
    }
}

impl SubscribeOptions {
    /// Sets the first position to deliver, inclusive (builder style). To resume after a
    /// checkpoint `p`, use `p.next()`.
    pub fn with_from(mut self, from: Position) -> Self {
        self.from = from;
        self
    }

    /// Sets which events to deliver (builder style).
    pub fn with_filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Sets how many events each read fetches (builder style; 0 counts as 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
}

/// A catch-up-then-live reader of the global log.
///
/// It reads pages until it reaches the head, then sleeps on the store's head notifications
/// ([`EventStore::watch_head`]): an idle subscription costs no CPU. Each event is delivered
/// once, in position order; the hand-over from catch-up to live cannot lose an event because
/// the notification is marked seen *before* each read.
///
/// Use it with [`Subscription::next`] or as a [`futures_core::Stream`] of
/// `Result<RecordedEvent>` (both share one state; a read or wait dropped half-way loses
/// nothing). A failed read is reported and the next call reads again (retryable errors are
/// worth retrying); when the store is closed the subscription reports [`Error::Closed`] once
/// and the stream ends.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    filter: EventFilter,
    batch_size: usize,
    next: Position,
    last: Option<Position>,
    buf: VecDeque<RecordedEvent>,
    watch: watch::Receiver<Position>,
    /// The read or the wait in flight, if any.
    pending: Option<Step>,
    /// The store was closed: nothing more will come.
    closed: bool,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What a subscription is waiting for.
enum Step {
    /// A page of the log.
    Read(BoxFuture<Result<AllPage>>),
    /// A head notification (`false`: the store was closed).
    Wait(BoxFuture<bool>),
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("filter", &self.filter)
            .field("next", &self.next)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Starts a subscription (no I/O until the first [`Subscription::next`]).
    pub fn new(store: Arc<dyn EventStore>, opts: SubscribeOptions) -> Self {
        let watch = store.watch_head();
        Self {
            store,
            filter: opts.filter,
            batch_size: opts.batch_size.max(1),
            next: opts.from,
            last: None,
            buf: VecDeque::new(),
            watch,
            pending: None,
            closed: false,
        }
    }

    /// The next event, waiting for one to be committed if the subscriber is caught up.
    /// [`Error::Closed`] when the store was closed.
    pub async fn next(&mut self) -> Result<RecordedEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx))
            .await
            .unwrap_or(Err(Error::Closed))
    }

    /// Every event available now without waiting (possibly none), at most `max`.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<RecordedEvent>> {
        if self.buf.is_empty() {
            self.check_open()?;
            let read = match self.pending.take() {
                Some(Step::Read(f)) => f,
                // A wait in flight is given up: reading now answers the same question.
                _ => self.start_read(),
            };
            let page = read.await?;
            self.take_page(page)?;
        }
        let n = max.min(self.buf.len());
        let out: Vec<_> = self.buf.drain(..n).collect();
        if let Some(e) = out.last() {
            self.last = Some(e.position);
        }
        Ok(out)
    }

    /// Waits until new events may be available (returns at once if some are buffered).
    pub async fn wait(&mut self) -> Result<()> {
        loop {
            if !self.buf.is_empty() {
                return Ok(());
            }
            self.check_open()?;
            match self.pending.take() {
                Some(Step::Wait(f)) => {
                    if f.await {
                        return Ok(());
                    }
                    self.closed = true;
                    return Err(Error::Closed);
                }
                Some(Step::Read(f)) => {
                    let page = f.await?;
                    if !self.take_page(page)? {
                        self.pending = Some(Step::Wait(self.start_wait()));
                    }
                }
                None => {
                    let f = self.start_read();
                    self.pending = Some(Step::Read(f));
                }
            }
        }
    }

    /// Position of the last event delivered, if any.
    pub fn last_position(&self) -> Option<Position> {
        self.last
    }

    /// Where a new subscription with the same filter would start to deliver exactly what this
    /// one has not delivered yet: the first buffered event, or where the next read starts.
    /// Every matching event below it has been delivered (a filtered subscriber uses it to
    /// tell "caught up" from "behind" without events of its own to count).
    pub fn resume_position(&self) -> Position {
        self.buf.front().map_or(self.next, |e| e.position)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// A read of the next page. The current notification is marked seen *before* reading: a
    /// commit that lands after the read changes the watch again and wakes the wait.
    fn start_read(&mut self) -> BoxFuture<Result<AllPage>> {
        self.watch.borrow_and_update();
        let store = self.store.clone();
        let req = ReadAll {
            from: self.next,
            limit: self.batch_size,
            filter: self.filter.clone(),
        };
        Box::pin(async move { store.read_all(req).await })
    }

    /// A wait for the next head notification (on a copy of the receiver, which has seen what
    /// this one has).
    fn start_wait(&self) -> BoxFuture<bool> {
        let mut watch = self.watch.clone();
        Box::pin(async move { watch.changed().await.is_ok() })
    }

    /// Buffers a page; `false` when it held nothing new.
    fn take_page(&mut self, page: AllPage) -> Result<bool> {
        if let Some(prev) = page.events.first().map(|e| e.position)
            && prev < self.next
        {
            return Err(Error::corruption(
                Some(prev),
                format!(
                    "read_all returned position {prev} before the requested {}",
                    self.next
                ),
            ));
        }
        self.next = self.next.max(page.next);
        let found = !page.events.is_empty();
        self.buf.extend(page.events);
        Ok(found)
    }

    /// The stream step: the next buffered event, else drive the read or wait in flight.
    fn poll_event(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<RecordedEvent>>> {
        use std::task::Poll;
        loop {
            if let Some(e) = self.buf.pop_front() {
                self.last = Some(e.position);
                return Poll::Ready(Some(Ok(e)));
            }
            if self.closed {
                return Poll::Ready(None);
            }
            match self.pending.take() {
                None => {
                    let f = self.start_read();
                    self.pending = Some(Step::Read(f));
                }
                Some(Step::Read(mut f)) => match f.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.pending = Some(Step::Read(f));
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(page)) => match self.take_page(page) {
                        Ok(true) => {}
                        Ok(false) => self.pending = Some(Step::Wait(self.start_wait())),
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    },
                    Poll::Ready(Err(e)) => {
                        if matches!(e, Error::Closed) {
                            self.closed = true;
                        }
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Some(Step::Wait(mut f)) => match f.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.pending = Some(Step::Wait(f));
                        return Poll::Pending;
                    }
                    Poll::Ready(true) => {
                        let f = self.start_read();
                        self.pending = Some(Step::Read(f));
                    }
                    Poll::Ready(false) => {
                        self.closed = true;
                        return Poll::Ready(Some(Err(Error::Closed)));
                    }
                },
            }
        }
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<RecordedEvent>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

/// Shared duplicate rule for backends: given, for each event of a batch, the reference of an
/// already stored event with the same id or dedup key (within the tenant), decides the outcome.
///
/// - no duplicates: `Ok(None)`, go on with the append;
/// - all duplicates: `Ok(Some(outcome))` with `duplicate: true`, write nothing;
/// - some duplicates: `Err(Error::Duplicate)` naming the first, write nothing.
pub fn resolve_duplicates(
    events: &[NewEvent],
    existing: Vec<Option<EventRef>>,
) -> Result<Option<AppendOutcome>> {
    debug_assert_eq!(events.len(), existing.len());
    let total = existing.len();
    let dups = existing.iter().filter(|e| e.is_some()).count();
    if total > 0 && dups == total {
        return Ok(Some(AppendOutcome {
            events: existing.into_iter().flatten().collect(),
            duplicate: true,
        }));
    }
    match existing
        .into_iter()
        .zip(events)
        .find_map(|(r, e)| r.map(|r| (e.event_id, r)))
    {
        None => Ok(None),
        Some((event_id, existing)) => Err(Error::Duplicate { event_id, existing }),
    }
}

/// Microsecond store clock that never goes backwards within a process (backends call it
/// under their commit lock so `recorded_at` is monotonic in position order).
pub fn monotonic_now(last: &mut Timestamp) -> Timestamp {
    let now = Timestamp::now().max(Timestamp::from_unix_micros(last.unix_micros()));
    *last = now;
    now
}
