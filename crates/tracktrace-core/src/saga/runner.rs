//! The [`SagaRunner`]: follows the global log, records a saga's reactions in its instances'
//! streams, dispatches their commands and fires their deadlines, keeping in memory only the
//! instances with open work plus a bounded number of others.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::IgnoredAny;
use uuid::Uuid;

use crate::command::derived_event_id;
use crate::error::{Error, Result};
use crate::event::{CONTENT_TYPE_JSON, Metadata, NewEvent, RecordedEvent};
use crate::id::{EventId, ExpectedVersion, Position, StreamId, TenantId, Timestamp, Version};
use crate::saga::dispatch::{CommandDispatcher, DispatchError};
use crate::saga::instance::{BASE_HEADER, Instance, OpenIds, recorded_base};
use crate::saga::model::{Reaction, RecordOf, Saga, SagaRecord, decode_record};
use crate::saga::open_index::{FORMAT, FORMAT_KEY, OPEN_PREFIX, entry_key, namespace, parse_entry};
use crate::store::{
    AppendRequest, Direction, EventFilter, EventStore, EventStoreExt, KeyRange, ReadAll,
    ReadModelBatch, ReadModelStore, ReadModelWrite, ReadStream,
};

/// An instance: its tenant and its id within the saga.
type Key = (TenantId, String);

/// What one [`SagaRunner::run_once`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SagaProgress {
    /// Trigger events newly handled.
    pub triggers: usize,
    /// Commands dispatched (successfully or with a permanent failure).
    pub dispatched: usize,
    /// Deadlines fired.
    pub deadlines_fired: usize,
    /// Commands still waiting after a transient dispatch failure.
    pub pending: usize,
}

/// An instance in memory and the runner's bookkeeping of it.
struct Resident<S: Saga> {
    inst: Instance<S>,
    /// Versions of its open-work index entries, stored or about to be (usually one, none
    /// while it waits for nothing).
    indexed: BTreeSet<Version>,
    /// Its deadlines as registered in [`SagaRunner::timers`].
    timers: Vec<(Timestamp, Uuid)>,
    /// Its place in [`SagaRunner::idle`] while it has no open work.
    lru: Option<u64>,
}

impl<S: Saga> Resident<S> {
    fn new(inst: Instance<S>, indexed: BTreeSet<Version>) -> Self {
        Self {
            inst,
            indexed,
            timers: Vec::new(),
            lru: None,
        }
    }
}

/// How appending the records of one cause ended.
enum Appended {
    /// Appended and folded in.
    Recorded,
    /// The cause was recorded before (its derived record ids are stored).
    Before,
    /// The stream moved since the instance was read.
    Moved,
}

/// Runs one [`Saga`]: follows the global log from its checkpoint, records reactions, dispatches
/// commands through a [`CommandDispatcher`], and fires deadlines.
///
/// Memory: instances with open work (a command without a result, a pending deadline) stay in
/// memory; completed and [idle](Saga::is_idle) ones are dropped once their commands are done,
/// and beyond [`SagaRunner::with_max_instances`] the least recently used of the others are
/// dropped too. A dropped instance is reloaded from its stream when a trigger concerns it.
///
/// Restart: the runner keeps the instances with open work in a persisted index (read-model
/// namespace `"saga.{NAME}.open"`) committed atomically with its checkpoint, so recovery reads
/// that index, those instances' streams and the saga records after the checkpoint: its cost
/// follows the open work and the checkpoint's lag, not the length of the saga's history.
pub struct SagaRunner<S: Saga, D> {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn ReadModelStore>,
    saga: S,
    dispatcher: D,
    instances: HashMap<Key, Resident<S>>,
    /// Instances with commands waiting to be sent.
    with_pending: BTreeSet<Key>,
    /// Every pending deadline of the instances in memory: (due, deadline id, instance).
    timers: BTreeSet<(Timestamp, Uuid, Key)>,
    /// Instances in memory without open work, least recently used first.
    idle: BTreeMap<u64, Key>,
    /// Last [`SagaRunner::idle`] tick handed out.
    tick: u64,
    max_instances: usize,
    /// Open-work index writes not yet committed: key → put (`true`) or delete.
    index_writes: BTreeMap<Vec<u8>, bool>,
    /// Whether the index's format marker is stored.
    index_ready: bool,
    /// The checkpoint this runner believes is stored.
    committed: Option<Position>,
    /// Position of the last record this runner appended.
    appended: Option<Position>,
    /// Triggers recorded after the stored checkpoint by an earlier run (found by recovery):
    /// recognised without touching their instance while the runner re-reads them.
    replayed: HashSet<Uuid>,
    /// Position of the last of those records.
    replay_end: Position,
    recovered: bool,
    batch_size: usize,
    retry_interval: Duration,
    /// Last position considered (in memory; the stored checkpoint may lag behind it).
    cursor: Option<Position>,
    /// When the checkpoint was last stored.
    saved_at: Option<std::time::Instant>,
    /// Least time between two passes over new events (see [`SagaRunner::with_min_interval`]).
    min_interval: Duration,
}

/// How often a runner stores its checkpoint while it only passes over events it does not
/// react to. Storing it is a durable write; re-reading up to this much of the log after a
/// restart is cheap and safe (a trigger already recorded is recognised by its cause).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Default of [`SagaRunner::with_max_instances`].
pub const DEFAULT_MAX_INSTANCES: usize = 100_000;

/// Records read per page when an instance is reloaded from the end of its stream.
const RELOAD_PAGE: usize = 64;

/// Entries and records read per page during recovery.
const RECOVERY_PAGE: usize = 1024;

impl<S: Saga, D> fmt::Debug for SagaRunner<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaRunner")
            .field("saga", &S::NAME)
            .field("instances", &self.instances.len())
            .finish_non_exhaustive()
    }
}

impl<S: Saga, D: CommandDispatcher<S::Command, S::Failure>> SagaRunner<S, D> {
    /// A runner reading triggers from `store`, keeping its checkpoint (named
    /// `"saga.{NAME}"`) and its index of open work (namespace `"saga.{NAME}.open"`, committed
    /// with the checkpoint) in `checkpoints`.
    pub fn new(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn ReadModelStore>,
        saga: S,
        dispatcher: D,
    ) -> Self {
        Self {
            store,
            checkpoints,
            saga,
            dispatcher,
            instances: HashMap::new(),
            with_pending: BTreeSet::new(),
            timers: BTreeSet::new(),
            idle: BTreeMap::new(),
            tick: 0,
            max_instances: DEFAULT_MAX_INSTANCES,
            index_writes: BTreeMap::new(),
            index_ready: false,
            committed: None,
            appended: None,
            replayed: HashSet::new(),
            replay_end: Position::START,
            recovered: false,
            batch_size: 256,
            retry_interval: Duration::from_secs(1),
            cursor: None,
            saved_at: None,
            min_interval: Duration::ZERO,
        }
    }

    /// How long [`SagaRunner::run`] waits before re-sending after a transient dispatch failure
    /// (default 1 s).
    pub fn with_retry_interval(mut self, d: Duration) -> Self {
        self.retry_interval = d;
        self
    }

    /// Least time between two passes of [`SagaRunner::run`] over new events (default: none).
    /// A saga whose reactions are not urgent (deadlines of minutes) can batch a busy log's
    /// wake-ups instead of reading after every commit; deadlines still fire on time.
    pub fn with_min_interval(mut self, d: Duration) -> Self {
        self.min_interval = d;
        self
    }

    /// How many instances the runner keeps in memory (default [`DEFAULT_MAX_INSTANCES`]).
    /// Beyond it, instances without open work are dropped, least recently used first, and
    /// reloaded from their streams when a trigger concerns them. Instances with open work (a
    /// command without a result, a pending deadline) are never dropped, so they may exceed
    /// the bound.
    pub fn with_max_instances(mut self, n: usize) -> Self {
        self.max_instances = n;
        self
    }

    /// How many instances are in memory now.
    pub fn instances_in_memory(&self) -> usize {
        self.instances.len()
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &D {
        &self.dispatcher
    }

    /// The stream of `instance`.
    pub fn stream_id(instance: &str) -> Result<StreamId> {
        Ok(StreamId::parse(format!("{}{instance}", Self::prefix()))?)
    }

    fn prefix() -> String {
        format!("saga.{}-", S::NAME)
    }

    fn checkpoint_name() -> String {
        format!("saga.{}", S::NAME)
    }

    /// The records of one instance, decoded (for inspection and tests).
    pub async fn records(&self, tenant: &TenantId, instance: &str) -> Result<Vec<RecordOf<S>>> {
        let stream = Self::stream_id(instance)?;
        self.store
            .read_stream_forwards(tenant, &stream)
            .await?
            .iter()
            .map(decode_record::<S>)
            .collect()
    }

    /// The state of an instance in memory (`None` if it is not: unknown, or dropped because
    /// it completed, is idle or was evicted; [`SagaRunner::load_state`] reads those).
    pub fn state(&self, tenant: &TenantId, instance: &str) -> Option<&S::State> {
        self.instances
            .get(&(tenant.clone(), instance.to_owned()))
            .map(|r| &r.inst.state)
    }

    /// The current state of an instance, from memory or else from its stream (`None`: it has
    /// no records).
    pub async fn load_state(&self, tenant: &TenantId, instance: &str) -> Result<Option<S::State>> {
        let key = (tenant.clone(), instance.to_owned());
        if let Some(r) = self.instances.get(&key) {
            return Ok(Some(r.inst.state.clone()));
        }
        let inst = self.read_instance(&key).await?;
        Ok((inst.version > Version::ZERO).then_some(inst.state))
    }

    /// The earliest pending deadline.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.timers.first().map(|t| t.0)
    }

    /// Reads an instance from the end of its stream back to the base its newest record names
    /// (the whole stream if it names none).
    async fn read_instance(&self, key: &Key) -> Result<Instance<S>> {
        let stream = Self::stream_id(&key.1)?;
        let mut inst = Instance::new(key.0.clone(), stream.clone());
        let mut newest_first: Vec<RecordedEvent> = Vec::new();
        let mut base = Version::new(1);
        loop {
            let from = newest_first
                .last()
                .map(|e| Version::new(e.version.get().saturating_sub(1)));
            let page = self
                .store
                .read_stream(ReadStream {
                    tenant: key.0.clone(),
                    stream: stream.clone(),
                    direction: Direction::Backwards,
                    from,
                    limit: RELOAD_PAGE,
                })
                .await?;
            let short = page.len() < RELOAD_PAGE;
            if newest_first.is_empty() {
                match page.first() {
                    None => return Ok(inst),
                    Some(newest) => base = recorded_base(newest).unwrap_or(base),
                }
            }
            newest_first.extend(page);
            let oldest = newest_first.last().map_or(Version::ZERO, |e| e.version);
            if short || oldest <= base || oldest <= Version::new(1) {
                break;
            }
        }
        for e in newest_first.iter().rev().filter(|e| e.version >= base) {
            inst.fold(e.event_id.as_uuid(), e.version, decode_record::<S>(e)?);
        }
        inst.version = newest_first.first().map_or(Version::ZERO, |e| e.version);
        Ok(inst)
    }

    /// Makes sure the instance is in memory (read from its stream if not).
    async fn ensure_loaded(&mut self, key: &Key) -> Result<()> {
        if !self.instances.contains_key(key) {
            let inst = self.read_instance(key).await?;
            self.instances
                .insert(key.clone(), Resident::new(inst, BTreeSet::new()));
        }
        Ok(())
    }

    /// Replaces the instance's fold with its stream's (the bookkeeping is brought up to date
    /// by the next [`SagaRunner::refresh`]).
    async fn reload(&mut self, key: &Key) -> Result<()> {
        let inst = self.read_instance(key).await?;
        match self.instances.get_mut(key) {
            Some(r) => r.inst = inst,
            None => {
                self.instances
                    .insert(key.clone(), Resident::new(inst, BTreeSet::new()));
            }
        }
        Ok(())
    }

    /// Brings the runner's bookkeeping of an instance up to date with its fold: timers,
    /// commands to send, open-work index entries, and eviction (dropped at once if it waits
    /// for nothing and is completed or idle, else queued least recently used first).
    fn refresh(&mut self, key: &Key) {
        let Some(r) = self.instances.get_mut(key) else {
            return;
        };
        for (due, id) in r.timers.drain(..) {
            self.timers.remove(&(due, id, key.clone()));
        }
        for (id, d) in &r.inst.deadlines {
            self.timers.insert((d.due, *id, key.clone()));
            r.timers.push((d.due, *id));
        }
        if r.inst.pending.is_empty() {
            self.with_pending.remove(key);
        } else if !self.with_pending.contains(key) {
            self.with_pending.insert(key.clone());
        }
        let open = r.inst.open_since();
        for v in r.indexed.iter().filter(|v| Some(**v) != open) {
            self.index_writes
                .insert(entry_key(&key.0, &key.1, *v), false);
        }
        r.indexed.retain(|v| Some(*v) == open);
        if let Some(v) = open
            && r.indexed.insert(v)
        {
            self.index_writes.insert(entry_key(&key.0, &key.1, v), true);
        }
        if let Some(t) = r.lru.take() {
            self.idle.remove(&t);
        }
        if open.is_some() {
            return;
        }
        if r.inst.completed() || self.saga.is_idle(&r.inst.state) {
            self.instances.remove(key);
        } else {
            self.tick += 1;
            r.lru = Some(self.tick);
            self.idle.insert(self.tick, key.clone());
        }
    }

    /// Drops instances without open work, least recently used first, while more than
    /// `max_instances` are in memory.
    fn enforce_bound(&mut self) {
        while self.instances.len() > self.max_instances {
            let Some((_, key)) = self.idle.pop_first() else {
                break;
            };
            self.instances.remove(&key);
        }
    }

    /// Forgets everything in memory (before recovery).
    fn reset(&mut self) {
        self.instances.clear();
        self.with_pending.clear();
        self.timers.clear();
        self.idle.clear();
        self.index_writes.clear();
        self.appended = None;
        self.replayed.clear();
        self.replay_end = Position::START;
        self.cursor = None;
        self.saved_at = None;
    }

    /// Rebuilds the instances with open work (once per runner): those the open-work index
    /// names, and those whose records after the checkpoint leave work open (the whole saga log
    /// is read instead, once, if the stored checkpoint comes without an index).
    async fn recover(&mut self) -> Result<()> {
        if self.recovered {
            return Ok(());
        }
        self.reset();
        let ns = namespace(S::NAME);
        let cp = self
            .checkpoints
            .load_checkpoint(&Self::checkpoint_name())
            .await?;
        let ready = self.checkpoints.get(&ns, FORMAT_KEY).await?.is_some();
        let mut candidates: BTreeMap<Key, BTreeSet<Version>> = BTreeMap::new();
        if ready {
            let mut range = KeyRange::prefix(OPEN_PREFIX);
            loop {
                let page = self
                    .checkpoints
                    .scan(&ns, range.clone(), Direction::Forwards, RECOVERY_PAGE)
                    .await?;
                for (k, _) in &page {
                    let Some((tenant, instance, since)) = parse_entry(k) else {
                        return Err(Error::corruption(
                            None,
                            format!("saga {} open-work index: undecodable key {k:?}", S::NAME),
                        ));
                    };
                    candidates
                        .entry((tenant, instance))
                        .or_default()
                        .insert(since);
                }
                match page.last() {
                    Some((last, _)) if page.len() == RECOVERY_PAGE => {
                        let mut start = last.to_vec();
                        start.push(0);
                        range.start = start;
                    }
                    _ => break,
                }
            }
        }
        // The saga records after the checkpoint: work they open, triggers they record.
        let prefix = Self::prefix();
        let filter = EventFilter {
            stream_prefix: Some(prefix.clone()),
            ..EventFilter::default()
        };
        let mut at = match (ready, cp) {
            (true, Some(c)) => c.next(),
            _ => Position::START,
        };
        let mut open: HashMap<Key, OpenIds> = HashMap::new();
        loop {
            let page = self
                .store
                .read_all(ReadAll::starting_at(at, RECOVERY_PAGE).filter(filter.clone()))
                .await?;
            for e in &page.events {
                let Some(instance) = e.stream.as_str().strip_prefix(&prefix) else {
                    continue;
                };
                let r: SagaRecord<IgnoredAny, IgnoredAny, IgnoredAny> =
                    serde_json::from_slice(&e.payload).map_err(|err| {
                        Error::corruption(
                            Some(e.position),
                            format!("saga {} record {}: {err}", S::NAME, e.event_type),
                        )
                    })?;
                if let SagaRecord::Triggered { event_id, .. } = &r
                    && cp.is_none_or(|c| e.position > c)
                    && let Ok(id) = Uuid::parse_str(event_id)
                {
                    self.replayed.insert(id);
                    self.replay_end = self.replay_end.max(e.position);
                }
                let key = (e.tenant.clone(), instance.to_owned());
                let id = e.event_id.as_uuid();
                if let Some(ids) = open.get_mut(&key) {
                    ids.apply(id, &r);
                    if ids.is_empty() {
                        open.remove(&key);
                    }
                } else if matches!(
                    r,
                    SagaRecord::CommandScheduled { .. } | SagaRecord::DeadlineScheduled { .. }
                ) {
                    let mut ids = OpenIds::default();
                    ids.apply(id, &r);
                    open.insert(key, ids);
                }
            }
            if page.events.len() < RECOVERY_PAGE {
                break;
            }
            at = page.next;
        }
        for key in open.into_keys() {
            candidates.entry(key).or_default();
        }
        for (key, indexed) in candidates {
            let inst = self.read_instance(&key).await?;
            self.instances
                .insert(key.clone(), Resident::new(inst, indexed));
            self.refresh(&key);
        }
        self.enforce_bound();
        self.cursor = cp;
        self.committed = cp;
        self.index_ready = ready;
        self.recovered = true;
        if cp.is_some() && (!ready || !self.index_writes.is_empty()) {
            self.commit().await?;
        }
        Ok(())
    }

    /// Stores the checkpoint (the cursor) together with the open-work index writes, fenced by
    /// the checkpoint this runner believes stored. If another runner moved it, the later of
    /// the two positions is stored: the other runner's commit covers what it handled up to
    /// there, and this one's index writes cover everything this runner recorded.
    async fn commit(&mut self) -> Result<()> {
        let Some(cursor) = self.cursor else {
            return Ok(());
        };
        let ns = namespace(S::NAME);
        let mut expected = self.committed;
        for _ in 0..5 {
            let position = expected.map_or(cursor, |c| c.max(cursor));
            let mut writes: Vec<ReadModelWrite> = self
                .index_writes
                .iter()
                .filter(|(_, put)| !**put)
                .map(|(k, _)| ReadModelWrite::Delete {
                    ns: ns.clone(),
                    key: k.clone(),
                })
                .collect();
            writes.extend(
                self.index_writes
                    .iter()
                    .filter(|(_, put)| **put)
                    .map(|(k, _)| ReadModelWrite::Put {
                        ns: ns.clone(),
                        key: k.clone(),
                        value: Vec::new(),
                    }),
            );
            if !self.index_ready {
                writes.push(ReadModelWrite::Put {
                    ns: ns.clone(),
                    key: FORMAT_KEY.to_vec(),
                    value: FORMAT.to_vec(),
                });
            }
            let batch = ReadModelBatch {
                checkpoint: Self::checkpoint_name(),
                expected_checkpoint: expected,
                position,
                writes,
            };
            match self.checkpoints.commit(batch).await {
                Ok(()) => {
                    self.committed = Some(position);
                    self.index_writes.clear();
                    self.index_ready = true;
                    self.saved_at = Some(std::time::Instant::now());
                    return Ok(());
                }
                Err(Error::CheckpointMoved { actual, .. }) => expected = actual,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable {
            reason: format!("saga {}: its checkpoint kept moving", S::NAME),
            retry_after: None,
            source: None,
        })
    }

    /// Records the reaction to `cause` unless it is already recorded: `decide` computes the
    /// head record and the reaction from the instance's current fold (`None`: nothing to
    /// do). On a conflict (the stream moved, e.g. another runner) the instance is reloaded and
    /// the decision taken again; a cause whose records are already stored (derived ids) is
    /// recognised by the store and the instance reloaded. Returns whether this call recorded
    /// it. The instance's bookkeeping is refreshed in any case (it may leave memory).
    async fn record<F>(&mut self, key: &Key, cause: Uuid, decide: F) -> Result<bool>
    where
        F: Fn(&S, &Instance<S>) -> Option<(RecordOf<S>, Reaction<S>)>,
    {
        let out = self.record_in_memory(key, cause, decide).await;
        self.refresh(key);
        out
    }

    async fn record_in_memory<F>(&mut self, key: &Key, cause: Uuid, decide: F) -> Result<bool>
    where
        F: Fn(&S, &Instance<S>) -> Option<(RecordOf<S>, Reaction<S>)>,
    {
        for _ in 0..5 {
            let Some(r) = self.instances.get(key) else {
                return Ok(false);
            };
            let Some((head, reaction)) = decide(&self.saga, &r.inst) else {
                return Ok(false);
            };
            match self.try_record(key, cause, head, reaction).await? {
                Appended::Recorded => return Ok(true),
                Appended::Before => {
                    self.reload(key).await?;
                    return Ok(false);
                }
                Appended::Moved => self.reload(key).await?,
            }
        }
        Err(Error::Unavailable {
            reason: format!(
                "saga {} instance {}: its stream kept changing while recording",
                S::NAME,
                key.1
            ),
            retry_after: None,
            source: None,
        })
    }

    /// Appends the records for one cause (ids derived from `cause`, the instance's base after
    /// them on the last one) and folds them in.
    async fn try_record(
        &mut self,
        key: &Key,
        cause: Uuid,
        head: RecordOf<S>,
        reaction: Reaction<S>,
    ) -> Result<Appended> {
        let now = Timestamp::now();
        let Some(inst) = self.instances.get(key).map(|r| &r.inst) else {
            return Ok(Appended::Moved);
        };
        let mut records = vec![head];
        if let Some(state) = reaction.state {
            records.push(SagaRecord::StateChanged { state });
        }
        for (command, compensation) in reaction
            .commands
            .into_iter()
            .map(|c| (c, false))
            .chain(reaction.compensations.into_iter().map(|c| (c, true)))
        {
            records.push(SagaRecord::CommandScheduled {
                command,
                compensation,
            });
        }
        for name in reaction.cancel {
            let mut cancelled: Vec<_> = inst
                .deadlines
                .iter()
                .filter(|(_, d)| d.name == name)
                .map(|(id, d)| (d.at, *id))
                .collect();
            cancelled.sort();
            for (_, id) in cancelled {
                records.push(SagaRecord::DeadlineCancelled {
                    deadline_id: id.to_string(),
                });
            }
        }
        for (name, delay) in reaction.deadlines {
            let due = now
                .unix_micros()
                .saturating_add(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX));
            records.push(SagaRecord::DeadlineScheduled {
                name,
                due_at_micros: due,
            });
        }
        if reaction.complete {
            records.push(SagaRecord::Completed);
        }
        let ids: Vec<EventId> = (0..records.len())
            .map(|i| derived_event_id(cause, &inst.stream, i))
            .collect();
        // The fold after these records, and the base a reload would need then.
        let mut next = inst.clone();
        for (i, (r, id)) in records.iter().zip(&ids).enumerate() {
            let version = Version::new(inst.version.get() + 1 + i as u64);
            next.fold(id.as_uuid(), version, r.clone());
        }
        let base = next.base();
        let last = records.len() - 1;
        let events = records
            .iter()
            .zip(&ids)
            .enumerate()
            .map(|(i, (r, id))| {
                let payload = serde_json::to_vec(r).map_err(|e| {
                    Error::invalid(format!("saga {} record", S::NAME), e.to_string())
                })?;
                let mut metadata = Metadata {
                    causation_id: Some(cause.to_string()),
                    ..Metadata::default()
                };
                if i == last {
                    metadata
                        .headers
                        .insert(BASE_HEADER.to_owned(), base.get().to_string());
                }
                Ok(NewEvent {
                    event_id: *id,
                    dedup_key: None,
                    event_type: r.event_type().to_owned(),
                    schema_version: 1,
                    content_type: CONTENT_TYPE_JSON.to_owned(),
                    payload: Bytes::from(payload),
                    metadata,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self
            .store
            .append(AppendRequest {
                tenant: inst.tenant.clone(),
                stream: inst.stream.clone(),
                expected: ExpectedVersion::Exact(inst.version),
                events,
            })
            .await;
        match out {
            Ok(out) if !out.duplicate => {
                if let Some(p) = out.events.iter().map(|e| e.position).max() {
                    self.appended = Some(self.appended.map_or(p, |a| a.max(p)));
                }
                if let Some(r) = self.instances.get_mut(key) {
                    r.inst = next;
                }
                Ok(Appended::Recorded)
            }
            // Already recorded (another runner, or an earlier run of this one).
            Ok(_) | Err(Error::Duplicate { .. }) => Ok(Appended::Before),
            Err(Error::Conflict { .. }) => Ok(Appended::Moved),
            Err(e) => Err(e),
        }
    }

    /// Sends the instance's scheduled commands in order until none is left or one fails
    /// transiently; returns (dispatched, transient failure).
    async fn dispatch_pending(&mut self, key: &Key) -> Result<(usize, bool)> {
        let mut sent = 0;
        loop {
            let Some(r) = self.instances.get(key) else {
                return Ok((sent, false));
            };
            let Some(p) = r.inst.pending.first() else {
                return Ok((sent, false));
            };
            let (id, command) = (p.dispatch_id, p.command.clone());
            let tenant = r.inst.tenant.clone();
            let result = match self.dispatcher.dispatch(&tenant, id, &command).await {
                Ok(()) => Ok(()),
                Err(DispatchError::Rejected(error)) => Err(error),
                Err(DispatchError::Transient(_)) => return Ok((sent, true)),
            };
            self.record(key, id, |saga, inst| {
                inst.pending
                    .iter()
                    .any(|p| p.dispatch_id == id)
                    .then(|| match &result {
                        Ok(()) => (
                            SagaRecord::CommandSucceeded {
                                dispatch_id: id.to_string(),
                            },
                            saga.on_success(&inst.state, &command),
                        ),
                        Err(failure) => (
                            SagaRecord::CommandFailed {
                                dispatch_id: id.to_string(),
                                error: failure.to_string(),
                                failure: Some(failure.clone()),
                            },
                            saga.on_failure(&inst.state, &command, failure),
                        ),
                    })
            })
            .await?;
            sent += 1;
        }
    }

    /// One round: recovers (first call), handles new trigger events, dispatches scheduled
    /// commands, fires due deadlines. Returns what it did.
    pub async fn run_once(&mut self) -> Result<SagaProgress> {
        self.recover().await?;
        let mut progress = SagaProgress::default();
        // Outbox entries left by a crash (or a transient failure) first.
        let keys: Vec<Key> = self.with_pending.iter().cloned().collect();
        for key in &keys {
            progress.dispatched += self.dispatch_pending(key).await?.0;
        }
        self.enforce_bound();
        // New triggers.
        let prefix = Self::prefix();
        loop {
            let from = self.cursor.map_or(Position::START, Position::next);
            let triggers_before = progress.triggers;
            let page = self
                .store
                .read_all(ReadAll::starting_at(from, self.batch_size).filter(self.saga.filter()))
                .await?;
            let full = page.events.len() == self.batch_size;
            for e in &page.events {
                if e.stream.as_str().starts_with(&prefix) {
                    continue;
                }
                let Some(instance) = self.saga.correlate(e) else {
                    continue;
                };
                let cause = e.event_id.as_uuid();
                if self.replayed.contains(&cause) {
                    continue;
                }
                let key = (e.tenant.clone(), instance);
                self.ensure_loaded(&key).await?;
                let recorded = self
                    .record(&key, cause, |saga, inst| {
                        (!inst.completed()).then(|| {
                            let head = SagaRecord::Triggered {
                                event_id: cause.to_string(),
                                event_type: e.event_type.clone(),
                                stream: e.stream.as_str().to_owned(),
                            };
                            (head, saga.on_event(&inst.state, e))
                        })
                    })
                    .await?;
                if recorded {
                    progress.triggers += 1;
                    progress.dispatched += self.dispatch_pending(&key).await?.0;
                }
                self.enforce_bound();
            }
            let next = Position::new(page.next.get().saturating_sub(1));
            if page.next > Position::START && self.cursor.is_none_or(|c| c < next) {
                self.cursor = Some(next);
                if next >= self.replay_end && !self.replayed.is_empty() {
                    self.replayed = HashSet::new();
                }
                let reacted = progress.triggers > triggers_before;
                // Past this runner's own records: a checkpoint now spares a restart from
                // reading them again.
                let passed_own = self
                    .appended
                    .is_some_and(|a| a <= next && self.committed.is_none_or(|c| c < a));
                if reacted
                    || passed_own
                    || self
                        .saved_at
                        .is_none_or(|t| t.elapsed() >= CHECKPOINT_EVERY)
                {
                    self.commit().await?;
                }
            }
            if !full {
                break;
            }
        }
        // Due deadlines, earliest first.
        let now = Timestamp::now();
        let due: Vec<(Key, Uuid)> = self
            .timers
            .iter()
            .take_while(|t| t.0 <= now)
            .map(|(_, id, key)| (key.clone(), *id))
            .collect();
        for (key, id) in due {
            let Some(name) = self
                .instances
                .get(&key)
                .and_then(|r| r.inst.deadlines.get(&id))
                .map(|d| d.name.clone())
            else {
                continue;
            };
            let fired = self
                .record(&key, id, |saga, inst| {
                    (!inst.completed() && inst.deadlines.contains_key(&id)).then(|| {
                        let head = SagaRecord::DeadlineFired {
                            deadline_id: id.to_string(),
                            name: name.clone(),
                        };
                        (head, saga.on_deadline(&inst.state, &name))
                    })
                })
                .await?;
            if !fired {
                continue;
            }
            progress.deadlines_fired += 1;
            progress.dispatched += self.dispatch_pending(&key).await?.0;
        }
        self.enforce_bound();
        progress.pending = self
            .with_pending
            .iter()
            .filter_map(|k| self.instances.get(k))
            .map(|r| r.inst.pending.len())
            .sum();
        Ok(progress)
    }

    /// Runs rounds until `shutdown` completes, sleeping until new events, the next deadline,
    /// or (while commands wait after a transient failure) the retry interval.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut watch = self.store.watch_head();
        tokio::pin!(shutdown);
        let mut last_pass: Option<std::time::Instant> = None;
        loop {
            if let Some(rest) = last_pass.and_then(|t| self.min_interval.checked_sub(t.elapsed())) {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(rest) => {}
                }
            }
            last_pass = Some(std::time::Instant::now());
            watch.borrow_and_update();
            let progress = self.run_once().await?;
            let mut wait = Duration::from_secs(3600);
            if let Some(due) = self.next_deadline() {
                wait = wait.min(Timestamp::now().elapsed_until(due));
            }
            if progress.pending > 0 {
                wait = wait.min(self.retry_interval);
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
                changed = watch.changed() => {
                    if changed.is_err() {
                        return Err(Error::Closed);
                    }
                }
            }
        }
    }
}
