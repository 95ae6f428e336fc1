//! [`InMemoryStore`]: the reference implementation of [`EventStore`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::Error;
use crate::error::Result;
use crate::event::{RecordedEvent, validate_batch};
use crate::event_ref::EventRef;
use crate::id::{EventId, Position, StreamId, TenantId, Timestamp, Version};
use crate::store::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, EventStore, KeyRange,
    ReadAll, ReadModelBatch, ReadModelStore, ReadModelWrite, ReadStream, Snapshot, SnapshotStore,
    StoreStats, monotonic_now, resolve_duplicates,
};

/// A non-durable event store held in memory: the reference model for every backend, and a
/// fast store for tests and examples.
///
/// Appends are serialised by one mutex (positions are assigned and made visible in the same
/// critical section, so the global log has no gaps). Clones share the same data.
///
/// [`EventStore::store_stats`]: `events` is the length of the log (exact); `bytes` estimates
/// the memory the events hold (each event's struct plus its variable-length fields; indexes,
/// snapshots and read models excluded).
#[derive(Clone, Default)]
pub struct InMemoryStore {
    inner: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    head: watch::Sender<Position>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            head: watch::channel(Position::START).0,
        }
    }
}

#[derive(Default)]
struct State {
    /// The global log; index `i` holds position `i + 1`.
    log: Vec<Arc<RecordedEvent>>,
    streams: HashMap<(TenantId, StreamId), Vec<usize>>,
    by_id: HashMap<(TenantId, EventId), usize>,
    by_dedup: HashMap<(TenantId, String), usize>,
    snapshots: HashMap<(TenantId, StreamId), Snapshot>,
    checkpoints: HashMap<String, Position>,
    read_models: HashMap<String, BTreeMap<Vec<u8>, Bytes>>,
    clock: Timestamp,
    /// Sum of [`event_bytes`] over the log.
    bytes: u64,
}

/// What one stored event holds in memory: its struct and its variable-length fields.
fn event_bytes(e: &RecordedEvent) -> u64 {
    let m = &e.metadata;
    let variable = e.tenant.as_str().len()
        + e.stream.as_str().len()
        + e.dedup_key.as_ref().map_or(0, String::len)
        + e.event_type.len()
        + e.content_type.len()
        + e.payload.len()
        + m.correlation_id.as_ref().map_or(0, String::len)
        + m.causation_id.as_ref().map_or(0, String::len)
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    (std::mem::size_of::<RecordedEvent>() + variable) as u64
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryStore")
            .field("events", &self.lock().log.len())
            .finish()
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated (all mutation happens
        // after every check), so a poisoned lock is still consistent.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn event_ref(&self, idx: usize) -> EventRef {
        self.log[idx].to_ref()
    }

    fn version(&self, tenant: &TenantId, stream: &StreamId) -> Version {
        // Fast path without cloning the key would need a borrowed key type; streams are short.
        self.streams
            .get(&(tenant.clone(), stream.clone()))
            .map_or(Version::ZERO, |v| Version::new(v.len() as u64))
    }
}

#[async_trait]
impl EventStore for InMemoryStore {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        validate_batch(&req.events)?;
        let outcome = {
            let mut st = self.lock();
            let existing = req
                .events
                .iter()
                .map(|e| {
                    st.by_id
                        .get(&(req.tenant.clone(), e.event_id))
                        .or_else(|| {
                            e.dedup_key
                                .as_ref()
                                .and_then(|k| st.by_dedup.get(&(req.tenant.clone(), k.clone())))
                        })
                        .map(|&i| st.event_ref(i))
                })
                .collect();
            if let Some(dup) = resolve_duplicates(&req.events, existing)? {
                return Ok(dup);
            }
            let actual = st.version(&req.tenant, &req.stream);
            if !req.expected.accepts(actual) {
                return Err(Error::Conflict {
                    tenant: req.tenant,
                    stream: req.stream,
                    expected: req.expected,
                    actual,
                });
            }
            let mut clock = st.clock;
            let now = monotonic_now(&mut clock);
            st.clock = clock;
            let mut refs = Vec::with_capacity(req.events.len());
            let key = (req.tenant.clone(), req.stream.clone());
            for (i, e) in req.events.into_iter().enumerate() {
                let idx = st.log.len();
                let version = Version::new(actual.get() + 1 + i as u64);
                let position = Position::new(idx as u64 + 1);
                st.by_id.insert((req.tenant.clone(), e.event_id), idx);
                if let Some(k) = &e.dedup_key {
                    st.by_dedup.insert((req.tenant.clone(), k.clone()), idx);
                }
                let rec = RecordedEvent::from_new(
                    req.tenant.clone(),
                    req.stream.clone(),
                    version,
                    position,
                    now,
                    e,
                );
                refs.push(rec.to_ref());
                st.bytes += event_bytes(&rec);
                st.log.push(Arc::new(rec));
                st.streams.entry(key.clone()).or_default().push(idx);
            }
            let head = Position::new(st.log.len() as u64);
            // Published while still holding the lock so watchers see heads in order.
            self.inner.head.send_replace(head);
            AppendOutcome {
                events: refs,
                duplicate: false,
            }
        };
        Ok(outcome)
    }

    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        let st = self.lock();
        let Some(idx) = st.streams.get(&(req.tenant.clone(), req.stream.clone())) else {
            return Ok(Vec::new());
        };
        let pick = |i: &usize| (*st.log[*i]).clone();
        Ok(match req.direction {
            Direction::Forwards => {
                let start = req.from.map_or(0, |v| v.get().saturating_sub(1)) as usize;
                idx.iter().skip(start).take(req.limit).map(pick).collect()
            }
            Direction::Backwards => {
                let end = req
                    .from
                    .map_or(idx.len(), |v| (v.get() as usize).min(idx.len()));
                idx[..end].iter().rev().take(req.limit).map(pick).collect()
            }
        })
    }

    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        let st = self.lock();
        let start = req.from.get().saturating_sub(1) as usize;
        let mut events = Vec::new();
        let mut next = Position::new(st.log.len() as u64 + 1).max(req.from);
        for e in st.log.iter().skip(start) {
            if events.len() >= req.limit {
                next = e.position;
                break;
            }
            if req.filter.matches(e) {
                events.push((**e).clone());
            }
        }
        Ok(AllPage { events, next })
    }

    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        Ok(self.lock().version(tenant, stream))
    }

    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>> {
        let st = self.lock();
        Ok(st
            .by_id
            .get(&(tenant.clone(), event_id))
            .map(|&i| (*st.log[i]).clone()))
    }

    async fn head(&self) -> Result<Position> {
        Ok(Position::new(self.lock().log.len() as u64))
    }

    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        // Recorded-at never decreases along the log (one lock, monotonic clock).
        let st = self.lock();
        let idx = st.log.partition_point(|e| e.recorded_at < at);
        Ok(Position::new(idx as u64 + 1))
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        let st = self.lock();
        Ok(Some(StoreStats::new(st.log.len() as u64, st.bytes)))
    }
}

#[async_trait]
impl SnapshotStore for InMemoryStore {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        Ok(self
            .lock()
            .snapshots
            .get(&(tenant.clone(), stream.clone()))
            .cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut st = self.lock();
        let key = (snapshot.tenant.clone(), snapshot.stream.clone());
        match st.snapshots.get(&key) {
            Some(old) if old.version > snapshot.version => {}
            _ => {
                st.snapshots.insert(key, snapshot);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for InMemoryStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        Ok(self.lock().checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.lock().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }
}

#[async_trait]
impl ReadModelStore for InMemoryStore {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .lock()
            .read_models
            .get(ns)
            .and_then(|m| m.get(key).cloned()))
    }

    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let st = self.lock();
        let Some(m) = st.read_models.get(ns) else {
            return Ok(Vec::new());
        };
        let bounds = (
            Bound::Included(range.start),
            range.end.map_or(Bound::Unbounded, Bound::Excluded),
        );
        if let (Bound::Included(s), Bound::Excluded(e)) = &bounds
            && s >= e
        {
            return Ok(Vec::new());
        }
        let it = m.range::<Vec<u8>, _>(bounds);
        let kv = |(k, v): (&Vec<u8>, &Bytes)| (Bytes::copy_from_slice(k), v.clone());
        Ok(match direction {
            Direction::Forwards => it.take(limit).map(kv).collect(),
            Direction::Backwards => it.rev().take(limit).map(kv).collect(),
        })
    }

    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        let mut st = self.lock();
        let actual = st.checkpoints.get(&batch.checkpoint).copied();
        if actual != batch.expected_checkpoint {
            return Err(Error::CheckpointMoved {
                name: batch.checkpoint,
                expected: batch.expected_checkpoint,
                actual,
            });
        }
        for w in batch.writes {
            match w {
                ReadModelWrite::Put { ns, key, value } => {
                    st.read_models
                        .entry(ns)
                        .or_default()
                        .insert(key, Bytes::from(value));
                }
                ReadModelWrite::Delete { ns, key } => {
                    if let Some(m) = st.read_models.get_mut(&ns) {
                        m.remove(&key);
                    }
                }
                ReadModelWrite::Clear { ns } => {
                    st.read_models.remove(&ns);
                }
            }
        }
        st.checkpoints.insert(batch.checkpoint, batch.position);
        Ok(())
    }
}
