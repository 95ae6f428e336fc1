//! The command path: [`Repository`] (load an aggregate from snapshot + tail, append its new
//! events with `Exact(version)`, or `Any` for [`Concurrency::Unchecked`] aggregates) and
//! [`CommandBus`] (validate → load → handle → append, retrying version conflicts with backoff
//! and jitter).
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # use tracktrace_core::{Aggregate, DomainEvent, JsonCodec};
//! # #[derive(Default, Clone, Serialize, Deserialize)]
//! # struct Counter { value: u64 }
//! # #[derive(Serialize, Deserialize)]
//! # enum CounterEvent { Incremented { by: u64 } }
//! # impl DomainEvent for CounterEvent { fn event_type(&self) -> &'static str { "Incremented" } }
//! # #[derive(Debug, thiserror::Error)] #[error("zero")] struct ZeroIncrement;
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "Counter";
//! #     type Command = u64; type Event = CounterEvent; type Error = ZeroIncrement; type Codec = JsonCodec;
//! #     fn handle(&self, by: &u64) -> Result<Vec<CounterEvent>, ZeroIncrement> {
//! #         if *by == 0 { return Err(ZeroIncrement) } Ok(vec![CounterEvent::Incremented { by: *by }]) }
//! #     fn apply(&mut self, e: &CounterEvent) { match e { CounterEvent::Incremented { by } => self.value += by } }
//! # }
//! use std::sync::Arc;
//! use tracktrace_core::{CommandBus, CommandError, FieldError, InMemoryStore, Repository, TenantId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryStore::new());
//! let bus = CommandBus::new(
//!     Repository::<Counter>::new(store.clone())
//!         .with_snapshots(store.clone(), 100)
//!         .with_cache(10_000),
//! )
//! .with_validator(|by: &u64| {
//!     if *by > 1000 { vec![FieldError::new("by", "at most 1000")] } else { vec![] }
//! });
//! let tenant = TenantId::parse("acme")?;
//! let out = bus.execute(&tenant, "c-1", 5).await?;
//! assert_eq!(out.version.get(), 1);
//! assert!(matches!(bus.execute(&tenant, "c-1", 0).await, Err(CommandError::Rejected(_))));
//! assert!(matches!(bus.execute(&tenant, "c-1", 5000).await, Err(CommandError::Validation { .. })));
//! assert_eq!(bus.repository().load(&tenant, "c-1").await?.state.value, 5);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::aggregate::{
    Aggregate, Concurrency, DomainEvent, FieldError, Validator, decode_domain_event,
};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::event::{Metadata, NewEvent, RecordedEvent};
use crate::event_ref::EventRef;
use crate::id::{EventId, ExpectedVersion, IdError, StreamId, TenantId, Version};
use crate::resilience::RetryPolicy;
use crate::store::{AppendRequest, EventStore, ReadStream, Snapshot, SnapshotStore};
use crate::upcast::Upcasters;

/// Namespace of the UUIDv5 event ids derived from command ids (see [`derived_event_id`]).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f0e_7a1c_9b2d_4e3f_8a61_c0d2_e4f6_0718);

/// The deterministic id of the `index`-th event produced in `stream` by the command (or saga
/// dispatch) `command_id`: a UUIDv5, so re-running the same command after a crash or a lost
/// acknowledgement yields the same ids and the store answers with the originals.
pub fn derived_event_id(command_id: Uuid, stream: &StreamId, index: usize) -> EventId {
    let mut name = Vec::with_capacity(16 + stream.as_str().len() + 9);
    name.extend_from_slice(command_id.as_bytes());
    name.extend_from_slice(stream.as_str().as_bytes());
    name.push(0);
    name.extend_from_slice(&(index as u64).to_be_bytes());
    // A v5 UUID is never nil, so `from_uuid` cannot fail.
    EventId::from_uuid(Uuid::new_v5(&EVENT_ID_NAMESPACE, &name)).unwrap_or_default()
}

/// Per-command metadata copied onto every event it produces.
///
/// Non-exhaustive: fields may be added, so other crates build it with [`CommandMeta::new`]
/// (or `Default`: no metadata) or [`CommandMeta::with_command_id`], then the `with_*` methods:
///
/// ```
/// use tracktrace_core::CommandMeta;
/// let meta = CommandMeta::with_command_id(uuid::Uuid::now_v7())
///     .with_correlation_id("req-1")
///     .with_header("source", "scanner-3");
/// assert!(meta.command_id.is_some());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandMeta {
    /// Idempotency key of the command: event ids are derived from it (unless the event
    /// supplies its own), so executing the same command twice stores its events once. A
    /// command whose events are already stored is answered with the earlier outcome
    /// (`duplicate: true`) without running the handler again (one extra read by id).
    pub command_id: Option<Uuid>,
    /// Correlation id for every event.
    pub correlation_id: Option<String>,
    /// Causation id (defaults to the command id when that is set).
    pub causation_id: Option<String>,
    /// Extra headers for every event.
    pub headers: BTreeMap<String, String>,
}

impl CommandMeta {
    /// No metadata: no idempotency key, correlation or causation id, no headers (same as
    /// `Default`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Metadata with an idempotency key (a constructor; chain the `with_*` methods after it).
    pub fn with_command_id(command_id: Uuid) -> Self {
        Self {
            command_id: Some(command_id),
            ..Self::default()
        }
    }

    /// Sets the correlation id of every event (builder style).
    pub fn with_correlation_id(self, id: impl Into<String>) -> Self {
        self.map_metadata(|m| m.with_correlation_id(id))
    }

    /// Sets the causation id of every event (builder style).
    pub fn with_causation_id(self, id: impl Into<String>) -> Self {
        self.map_metadata(|m| m.with_causation_id(id))
    }

    /// Sets header `name` to `value` on every event, replacing an earlier value (builder
    /// style).
    pub fn with_header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.map_metadata(|m| m.with_header(name, value))
    }

    /// Replaces all extra headers (builder style).
    pub fn with_headers(self, headers: BTreeMap<String, String>) -> Self {
        self.map_metadata(|m| m.with_headers(headers))
    }

    /// Applies `f` (one of [`Metadata`]'s builders, so both types build alike) to the event
    /// metadata.
    fn map_metadata(self, f: impl FnOnce(Metadata) -> Metadata) -> Self {
        let metadata = f(Metadata {
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            headers: self.headers,
        });
        Self {
            correlation_id: metadata.correlation_id,
            causation_id: metadata.causation_id,
            headers: metadata.headers,
            ..self
        }
    }
}

/// A loaded aggregate and the stream version it reflects.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// Version of the stream the state includes (`Version::ZERO`: new aggregate).
    pub version: Version,
}

/// A successful command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandOutcome {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// Stream version after the command (unchanged when it produced no events).
    pub version: Version,
    /// The stored events (empty when the command produced none).
    pub events: Vec<EventRef>,
    /// The events were already stored (an idempotent retry): nothing was written.
    pub duplicate: bool,
    /// Attempts used (1 when there was no conflict).
    pub attempts: u32,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The command's fields are invalid; nothing was loaded or written.
    #[error("invalid command: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Validation {
        /// Every field error found.
        errors: Vec<FieldError>,
    },
    /// The aggregate rejected the command (a domain rule); nothing was written.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Version conflicts persisted through every retry of the [`RetryPolicy`].
    #[error("{stream}: still conflicting after {attempts} attempts")]
    Conflict {
        /// The aggregate's stream.
        stream: StreamId,
        /// Attempts made.
        attempts: u32,
        /// The last conflict.
        #[source]
        source: Error,
    },
    /// The store failed ([`Error::Unavailable`] is retryable later), or stored data could not
    /// be decoded ([`Error::Corruption`]).
    #[error(transparent)]
    Store(#[from] Error),
}

impl<E: std::error::Error + 'static> CommandError<E> {
    /// Whether the same command may succeed if sent again later (store unavailable or
    /// persistent contention).
    pub fn is_retryable(&self) -> bool {
        match self {
            CommandError::Conflict { .. } => true,
            CommandError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }
}

type EncodeFn<A> = fn(&A) -> std::result::Result<Vec<u8>, crate::CodecError>;
type DecodeFn<A> = fn(&[u8]) -> std::result::Result<A, crate::CodecError>;

struct Snapshots<A> {
    store: Arc<dyn SnapshotStore>,
    every: u64,
    encode: EncodeFn<A>,
    decode: DecodeFn<A>,
}

/// Aggregates [`Repository::new`] keeps in memory unless told otherwise
/// ([`Repository::with_cache`]).
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;

/// What the command path does with an aggregate that is not in the repository's cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheMiss {
    /// Load it (snapshot, then the stored tail) before the handler decides: one read and one
    /// append for a command on an aggregate that is not cached.
    #[default]
    Load,
    /// Decide on the empty state and append with `Exact(0)`, as [`CommandBus::create`] does
    /// for every command: one append for a new aggregate; an existing one costs that failed
    /// append, a load and a second append. For workloads where most uncached aggregates are
    /// new (a capture pipeline where most entities are seen for the first time).
    AssumeNew,
}

/// Bounded map of recently used aggregates, each with the version it reflects.
struct Cache<A> {
    capacity: usize,
    map: HashMap<(TenantId, StreamId), (Version, A)>,
}

struct RepoInner<A: Aggregate> {
    store: Arc<dyn EventStore>,
    upcasters: Upcasters,
    snapshots: Option<Snapshots<A>>,
    cache: Option<Mutex<Cache<A>>>,
    on_miss: CacheMiss,
}

/// Loads and saves aggregates of type `A`. Cheap to clone (shared state).
///
/// Loading = the latest snapshot (if enabled and of the current
/// [`Aggregate::SNAPSHOT_VERSION`]) plus the events after it, each upcast then decoded with
/// [`Aggregate::Codec`]; the result equals a full replay.
///
/// # Cost model of the command path
/// The command path keeps recently used aggregates in memory ([`DEFAULT_CACHE_CAPACITY`] by
/// default, [`Repository::with_cache`]) and trusts them optimistically: the append's
/// `Exact(version)` check detects a stale entry (another writer or process), which is then
/// refreshed from its tail and the handler runs again. A rejection or a no-op decided on a
/// cached state is checked against the store before it is reported. Store operations per
/// command:
///
/// | situation | reads | appends |
/// |---|--:|--:|
/// | aggregate cached and current (a stream the process writes) | 0 | 1 |
/// | not cached ([`CacheMiss::Load`], the default) | 1 (snapshot, if enabled, + 1 tail read) | 1 |
/// | new aggregate through [`CommandBus::create`] or [`CacheMiss::AssumeNew`] | 0 | 1 |
/// | `create` / `AssumeNew` on an aggregate that exists | 1 | 2 (the first fails) |
/// | cached entry stale (another process appended) | 1 (the tail only) | 2 (the first fails) |
/// | cache disabled (`with_cache(0)`) | 1 (whole stream, or snapshot + tail) | 1 |
///
/// A read of an aggregate without snapshots costs the whole stream (time grows with its
/// length); with [`Repository::with_snapshots`] only the tail after the latest snapshot, plus
/// one snapshot write every `every` events. The cache holds clones of the states (memory:
/// capacity × state size); with it, a busy aggregate costs one append per command whatever
/// its length. A [`CommandMeta::command_id`] adds one read by event id per command (the
/// idempotency check).
pub struct Repository<A: Aggregate> {
    inner: Arc<RepoInner<A>>,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<A: Aggregate> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &A::TYPE)
            .field("upcasters", &self.inner.upcasters)
            .field(
                "snapshot_every",
                &self.inner.snapshots.as_ref().map(|s| s.every),
            )
            .field("cache", &self.inner.cache.is_some())
            .finish()
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository over `store`, with a cache of [`DEFAULT_CACHE_CAPACITY`] aggregates that
    /// loads on a miss ([`CacheMiss::Load`]), without snapshots or upcasters.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            inner: Arc::new(RepoInner {
                store,
                upcasters: Upcasters::new(),
                snapshots: None,
                cache: Some(Mutex::new(Cache {
                    capacity: DEFAULT_CACHE_CAPACITY,
                    map: HashMap::new(),
                })),
                on_miss: CacheMiss::Load,
            }),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut RepoInner<A>)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                // Configured after cloning: build a fresh copy of the configuration.
                let old = &self.inner;
                let mut inner = RepoInner {
                    store: old.store.clone(),
                    upcasters: old.upcasters.clone(),
                    snapshots: old.snapshots.as_ref().map(|s| Snapshots {
                        store: s.store.clone(),
                        every: s.every,
                        encode: s.encode,
                        decode: s.decode,
                    }),
                    cache: old.cache.as_ref().map(|c| {
                        Mutex::new(Cache {
                            capacity: lock(c).capacity,
                            map: HashMap::new(),
                        })
                    }),
                    on_miss: old.on_miss,
                };
                f(&mut inner);
                self.inner = Arc::new(inner);
            }
        }
        self
    }

    /// Migrates old event payloads on read.
    pub fn with_upcasters(self, upcasters: Upcasters) -> Self {
        self.configure(|i| i.upcasters = upcasters)
    }

    /// Stores a snapshot of the state every `every` events (`0` disables). Snapshots are
    /// encoded with [`Aggregate::Codec`] and tagged with [`Aggregate::SNAPSHOT_VERSION`].
    pub fn with_snapshots(self, store: Arc<dyn SnapshotStore>, every: u64) -> Self
    where
        A: Serialize + DeserializeOwned,
    {
        self.configure(|i| {
            i.snapshots = (every > 0).then(|| Snapshots {
                store,
                every,
                encode: |a| A::Codec::encode(a),
                decode: |b| A::Codec::decode(b),
            })
        })
    }

    /// Keeps up to `capacity` aggregates in memory (default [`DEFAULT_CACHE_CAPACITY`]; `0`
    /// disables: every command then reads its aggregate). When full, an arbitrary half of the
    /// entries is evicted.
    pub fn with_cache(self, capacity: usize) -> Self {
        self.configure(|i| {
            i.cache = (capacity > 0).then(|| {
                Mutex::new(Cache {
                    capacity,
                    map: HashMap::new(),
                })
            })
        })
    }

    /// What the command path does with an aggregate that is not cached (default
    /// [`CacheMiss::Load`]; see the cost model on [`Repository`]).
    pub fn on_cache_miss(self, on_miss: CacheMiss) -> Self {
        self.configure(|i| i.on_miss = on_miss)
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The stream of aggregate `id`: `"{A::TYPE}-{id}"`.
    pub fn stream_id(id: &str) -> Result<StreamId, IdError> {
        StreamId::parse(format!("{}-{id}", A::TYPE))
    }

    /// Decodes one stored event (after upcasting).
    pub fn decode_event(&self, event: RecordedEvent) -> Result<A::Event> {
        let e = self.inner.upcasters.upcast(event)?;
        decode_domain_event::<A::Event, A::Codec>(A::TYPE, &e)
    }

    /// Applies the stored events after `loaded.version` to it.
    async fn catch_up(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        loaded: &mut Loaded<A>,
    ) -> Result<()> {
        let events = self
            .inner
            .store
            .read_stream(
                ReadStream::forwards(tenant.clone(), stream.clone()).from(loaded.version.next()),
            )
            .await?;
        for e in events {
            if e.version != loaded.version.next() {
                return Err(Error::corruption(
                    Some(e.position),
                    format!(
                        "{stream}: expected version {} but read {}",
                        loaded.version.next(),
                        e.version
                    ),
                ));
            }
            let v = e.version;
            let ev = self.decode_event(e)?;
            loaded.state.apply(&ev);
            loaded.version = v;
        }
        Ok(())
    }

    /// Full replay of aggregate `id` from its first event (no snapshot, no cache).
    pub async fn replay(&self, tenant: &TenantId, id: &str) -> Result<Loaded<A>> {
        let stream = Self::stream_id(id)?;
        let mut loaded = Loaded {
            state: A::default(),
            version: Version::ZERO,
        };
        self.catch_up(tenant, &stream, &mut loaded).await?;
        Ok(loaded)
    }

    /// The current state of aggregate `id`: cache or snapshot, plus the stored tail.
    pub async fn load(&self, tenant: &TenantId, id: &str) -> Result<Loaded<A>> {
        let stream = Self::stream_id(id)?;
        self.load_stream(tenant, &stream, true, false)
            .await
            .map(|(l, _)| l)
    }

    /// Loads; with `verify == false` a cached entry is returned without reading the store, and
    /// an uncached aggregate is taken to be new (the empty state, without reading) when
    /// `assume_new` or the repository's [`CacheMiss`] policy says so (second value `true`:
    /// unverified).
    async fn load_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        verify: bool,
        assume_new: bool,
    ) -> Result<(Loaded<A>, bool)> {
        let key = (tenant.clone(), stream.clone());
        let cached = self.inner.cache.as_ref().and_then(|c| {
            lock(c).map.get(&key).map(|(v, a)| Loaded {
                state: a.clone(),
                version: *v,
            })
        });
        let assume_new = assume_new
            || (self.inner.cache.is_some() && self.inner.on_miss == CacheMiss::AssumeNew);
        if !verify && assume_new && cached.is_none() {
            // Optimistic miss: most uncached aggregates are new ones. Decide on the empty
            // state; `Exact(0)` makes the append fail if the stream exists after all, and a
            // rejection or no-op is re-checked against the store before it is reported.
            return Ok((
                Loaded {
                    state: A::default(),
                    version: Version::ZERO,
                },
                true,
            ));
        }
        if let Some(mut loaded) = cached {
            if !verify {
                return Ok((loaded, true));
            }
            self.catch_up(tenant, stream, &mut loaded).await?;
            self.remember(&key, &loaded);
            return Ok((loaded, false));
        }
        let mut loaded = self.load_snapshot(tenant, stream).await;
        self.catch_up(tenant, stream, &mut loaded).await?;
        self.remember(&key, &loaded);
        Ok((loaded, false))
    }

    /// The stored snapshot, or the empty state. A missing, outdated or undecodable snapshot is
    /// not an error: the events are the truth, the snapshot only a shortcut.
    async fn load_snapshot(&self, tenant: &TenantId, stream: &StreamId) -> Loaded<A> {
        let empty = Loaded {
            state: A::default(),
            version: Version::ZERO,
        };
        let Some(s) = &self.inner.snapshots else {
            return empty;
        };
        match s.store.load_snapshot(tenant, stream).await {
            Ok(Some(snap)) if snap.schema_version == A::SNAPSHOT_VERSION => {
                match (s.decode)(&snap.payload) {
                    Ok(state) => Loaded {
                        state,
                        version: snap.version,
                    },
                    Err(e) => {
                        tracing::warn!(%stream, error = %e, "ignoring undecodable snapshot");
                        empty
                    }
                }
            }
            Ok(_) => empty,
            Err(e) => {
                tracing::warn!(%stream, error = %e, "cannot load snapshot; replaying");
                empty
            }
        }
    }

    fn remember(&self, key: &(TenantId, StreamId), loaded: &Loaded<A>) {
        if let Some(c) = &self.inner.cache {
            let mut c = lock(c);
            if c.map.len() >= c.capacity && !c.map.contains_key(key) {
                let drop_n = (c.capacity / 2).max(1);
                let victims: Vec<_> = c.map.keys().take(drop_n).cloned().collect();
                for k in victims {
                    c.map.remove(&k);
                }
            }
            // Concurrent commands may finish out of order: keep the newest state.
            if c.map.get(key).is_none_or(|(v, _)| *v <= loaded.version) {
                c.map
                    .insert(key.clone(), (loaded.version, loaded.state.clone()));
            }
        }
    }

    fn forget(&self, key: &(TenantId, StreamId)) {
        if let Some(c) = &self.inner.cache {
            lock(c).map.remove(key);
        }
    }

    fn to_new_events(
        &self,
        stream: &StreamId,
        events: &[A::Event],
        meta: &CommandMeta,
    ) -> Result<Vec<NewEvent>> {
        let metadata = Metadata {
            correlation_id: meta.correlation_id.clone(),
            causation_id: meta
                .causation_id
                .clone()
                .or_else(|| meta.command_id.map(|c| c.to_string())),
            headers: meta.headers.clone(),
        };
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let payload = A::Codec::encode(e).map_err(|err| {
                    Error::invalid(format!("events[{i}].payload"), err.to_string())
                })?;
                let event_id = e.event_id().unwrap_or_else(|| match meta.command_id {
                    Some(c) => derived_event_id(c, stream, i),
                    None => EventId::new(),
                });
                Ok(NewEvent {
                    event_id,
                    dedup_key: e.dedup_key(),
                    event_type: e.event_type().to_owned(),
                    schema_version: e.schema_version(),
                    content_type: A::Codec::CONTENT_TYPE.to_owned(),
                    payload: Bytes::from(payload),
                    metadata: metadata.clone(),
                })
            })
            .collect()
    }

    /// Appends `events` produced from `loaded` (with `Exact(loaded.version)`, or `Any` for
    /// [`Concurrency::Unchecked`] aggregates), then updates the cache and, when a snapshot
    /// boundary is crossed, the snapshot. Returns the outcome and the state after the events.
    ///
    /// For an unchecked aggregate whose append landed after events of other writers (its
    /// first version is not `loaded.version + 1`), the returned state is `loaded` with only
    /// this command's events applied, at the stream's new version: it is neither cached nor
    /// snapshotted (the cached entry is dropped), so the next load reads the whole tail.
    pub async fn save(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        loaded: Loaded<A>,
        events: &[A::Event],
        meta: &CommandMeta,
    ) -> Result<(crate::AppendOutcome, Loaded<A>)> {
        let key = (tenant.clone(), stream.clone());
        let new_events = self.to_new_events(stream, events, meta)?;
        // On any failure, and for duplicates, a cached entry stays: it is the true state at its
        // version, and the next `Exact` append detects that the stream moved on.
        let res = self
            .inner
            .store
            .append(AppendRequest {
                tenant: tenant.clone(),
                stream: stream.clone(),
                expected: match A::CONCURRENCY {
                    Concurrency::Optimistic => ExpectedVersion::Exact(loaded.version),
                    Concurrency::Unchecked => ExpectedVersion::Any,
                },
                events: new_events,
            })
            .await;
        let out = res?;
        if out.duplicate {
            return Ok((out, loaded));
        }
        let old = loaded.version;
        let mut after = loaded;
        for e in events {
            after.state.apply(e);
        }
        after.version = out.last_version();
        let contiguous = out.events.first().is_some_and(|r| r.version == old.next());
        if !contiguous {
            // Other writers' events sit between `old` and ours: this state lacks them.
            self.forget(&key);
            return Ok((out, after));
        }
        self.remember(&key, &after);
        if let Some(s) = &self.inner.snapshots
            && old.get() / s.every != after.version.get() / s.every
        {
            self.save_snapshot(s, tenant, stream, &after).await;
        }
        Ok((out, after))
    }

    async fn save_snapshot(
        &self,
        s: &Snapshots<A>,
        tenant: &TenantId,
        stream: &StreamId,
        l: &Loaded<A>,
    ) {
        let payload = match (s.encode)(&l.state) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%stream, error = %e, "cannot encode snapshot");
                return;
            }
        };
        let snap = Snapshot {
            tenant: tenant.clone(),
            stream: stream.clone(),
            version: l.version,
            schema_version: A::SNAPSHOT_VERSION,
            payload: Bytes::from(payload),
        };
        // The events are committed; a failed snapshot only costs a longer replay later.
        if let Err(e) = s.store.save_snapshot(snap).await {
            tracing::warn!(%stream, error = %e, "cannot save snapshot");
        }
    }
}

impl<A: Aggregate> CommandBus<A> {
    /// If the command `command_id` already stored its events in `stream` (its first derived
    /// event id exists), the outcome of that earlier execution, marked duplicate: a retried
    /// command is answered without re-running the handler against the newer state.
    async fn already_executed(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        command_id: Uuid,
    ) -> Result<Option<CommandOutcome>> {
        let store = self.repo.store();
        let Some(first) = store
            .get_event(tenant, derived_event_id(command_id, stream, 0))
            .await?
        else {
            return Ok(None);
        };
        if first.stream != *stream {
            return Ok(None);
        }
        let mut events = Vec::new();
        let tail = store
            .read_stream(ReadStream::forwards(tenant.clone(), stream.clone()).from(first.version))
            .await?;
        for (i, e) in tail.iter().enumerate() {
            if e.event_id != derived_event_id(command_id, stream, i) {
                break;
            }
            events.push(e.to_ref());
        }
        Ok(Some(CommandOutcome {
            stream: stream.clone(),
            version: events.last().map_or(first.version, |r| r.version),
            events,
            duplicate: true,
            attempts: 1,
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Cache updates are single assignments: a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Executes commands against aggregates of type `A`: validate → load → handle → append with
/// `Exact(version)`; a version conflict reloads and re-runs the handler after a jittered
/// backoff ([`RetryPolicy`]). Aggregates declaring [`Concurrency::Unchecked`] append with
/// `Any` instead and never conflict. Cheap to clone.
///
/// Transient store failures ([`Error::Unavailable`]) are *not* retried here: wrap the store in
/// [`crate::Retrying`] / [`crate::CircuitBreaker`] for that.
pub struct CommandBus<A: Aggregate> {
    repo: Repository<A>,
    validator: Option<Arc<dyn Validator<A::Command>>>,
    retry: RetryPolicy,
}

impl<A: Aggregate> Clone for CommandBus<A> {
    fn clone(&self) -> Self {
        Self {
            repo: self.repo.clone(),
            validator: self.validator.clone(),
            retry: self.retry,
        }
    }
}

impl<A: Aggregate> fmt::Debug for CommandBus<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBus")
            .field("repository", &self.repo)
            .field("validator", &self.validator.is_some())
            .field("retry", &self.retry)
            .finish()
    }
}

impl<A: Aggregate> CommandBus<A> {
    /// A bus over `repo`, without validator, with the default [`RetryPolicy`].
    pub fn new(repo: Repository<A>) -> Self {
        Self {
            repo,
            validator: None,
            retry: RetryPolicy::default(),
        }
    }

    /// Validates every command with `validator` first.
    pub fn with_validator(mut self, validator: impl Validator<A::Command> + 'static) -> Self {
        self.validator = Some(Arc::new(validator));
        self
    }

    /// Sets the conflict retry policy.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The repository.
    pub fn repository(&self) -> &Repository<A> {
        &self.repo
    }

    /// Executes `command` against aggregate `id` of `tenant`.
    pub async fn execute(
        &self,
        tenant: &TenantId,
        id: &str,
        command: A::Command,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        self.execute_with(tenant, id, command, CommandMeta::default())
            .await
    }

    /// Executes `command` with metadata (idempotency key, correlation, headers).
    pub async fn execute_with(
        &self,
        tenant: &TenantId,
        id: &str,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        self.run(tenant, id, command, meta, false).await
    }

    /// Executes `command` against aggregate `id`, which the caller expects to be new: the
    /// handler decides on the empty state and the events are appended with `Exact(0)`, one
    /// store round trip and no read. For an [`Concurrency::Optimistic`] aggregate the
    /// expectation is only a cost hint, never a different result: if the aggregate exists (or
    /// is cached), the append fails or is skipped, the aggregate is loaded and the command runs
    /// exactly as [`CommandBus::execute`] would run it. A [`Concurrency::Unchecked`] aggregate
    /// appends with `Any`, so nothing detects the wrong guess: its events are decided on the
    /// empty state (as they would be next to a concurrent writer), and the resulting state is
    /// not cached (the next command loads it).
    pub async fn create(
        &self,
        tenant: &TenantId,
        id: &str,
        command: A::Command,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        self.create_with(tenant, id, command, CommandMeta::default())
            .await
    }

    /// [`CommandBus::create`] with metadata.
    pub async fn create_with(
        &self,
        tenant: &TenantId,
        id: &str,
        command: A::Command,
        meta: CommandMeta,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        self.run(tenant, id, command, meta, true).await
    }

    async fn run(
        &self,
        tenant: &TenantId,
        id: &str,
        command: A::Command,
        meta: CommandMeta,
        assume_new: bool,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        if let Some(v) = &self.validator {
            let errors = v.validate(&command);
            if !errors.is_empty() {
                return Err(CommandError::Validation { errors });
            }
        }
        let stream = Repository::<A>::stream_id(id).map_err(|e| CommandError::Validation {
            errors: vec![FieldError::new("id", e.to_string())],
        })?;
        if let Some(command_id) = meta.command_id
            && let Some(done) = self.already_executed(tenant, &stream, command_id).await?
        {
            return Ok(done);
        }
        let max = self.retry.max_attempts.max(1);
        let mut attempt = 1;
        let mut verify = false;
        loop {
            let (loaded, unverified) = self
                .repo
                .load_stream(tenant, &stream, verify, assume_new)
                .await?;
            let decision = loaded.state.handle(&command);
            // A rejection or a no-op decided on a possibly stale cached state is checked
            // against the stored tail before it is reported.
            if unverified && !matches!(&decision, Ok(events) if !events.is_empty()) {
                verify = true;
                continue;
            }
            let events = decision.map_err(CommandError::Rejected)?;
            if events.is_empty() {
                return Ok(CommandOutcome {
                    stream,
                    version: loaded.version,
                    events: Vec::new(),
                    duplicate: false,
                    attempts: attempt,
                });
            }
            match self
                .repo
                .save(tenant, &stream, loaded, &events, &meta)
                .await
            {
                Ok((out, after)) => {
                    return Ok(CommandOutcome {
                        stream,
                        version: if out.duplicate {
                            out.last_version()
                        } else {
                            after.version
                        },
                        events: out.events,
                        duplicate: out.duplicate,
                        attempts: attempt,
                    });
                }
                // A conflict on an unverified state (a cache entry, or the empty state of an
                // aggregate assumed new) only means the guess was stale: decide again at once
                // on the stored state; it is not an attempt of the retry policy.
                Err(Error::Conflict { .. }) if unverified => verify = true,
                Err(e @ Error::Conflict { .. }) => {
                    if attempt >= max {
                        return Err(CommandError::Conflict {
                            stream,
                            attempts: attempt,
                            source: e,
                        });
                    }
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    attempt += 1;
                    verify = true;
                }
                // Events decided on a possibly stale state partly collide with stored ones:
                // decide again on the verified state before reporting anything.
                Err(Error::Duplicate { .. }) if unverified => verify = true,
                Err(e) => return Err(CommandError::Store(e)),
            }
        }
    }
}
