//! The [`SagaRunner`]: follows the global log, records a saga's reactions in its instances'
//! streams, dispatches their commands and fires their deadlines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use crate::command::derived_event_id;
use crate::error::{Error, Result};
use crate::event::{CONTENT_TYPE_JSON, Metadata, NewEvent};
use crate::id::{ExpectedVersion, Position, StreamId, TenantId, Timestamp, Version};
use crate::saga::dispatch::{CommandDispatcher, DispatchError};
use crate::saga::model::{Reaction, RecordOf, Saga, SagaRecord, decode_record};
use crate::store::{
    AppendRequest, CheckpointStore, EventFilter, EventStore, EventStoreExt, ReadAll, ReadStream,
};

struct Pending<C> {
    dispatch_id: Uuid,
    command: C,
}

/// In-memory fold of one instance's records.
struct Instance<S: Saga> {
    tenant: TenantId,
    stream: StreamId,
    version: Version,
    state: S::State,
    /// Causes already recorded: trigger ids, dispatch ids with a result, fired deadline ids.
    handled: HashSet<Uuid>,
    /// Scheduled commands without a result, in record order.
    pending: Vec<Pending<S::Command>>,
    /// Pending deadlines: id -> (name, due).
    deadlines: HashMap<Uuid, (String, Timestamp)>,
    completed: bool,
}

impl<S: Saga> Instance<S> {
    fn new(tenant: TenantId, stream: StreamId) -> Self {
        Self {
            tenant,
            stream,
            version: Version::ZERO,
            state: S::State::default(),
            handled: HashSet::new(),
            pending: Vec::new(),
            deadlines: HashMap::new(),
            completed: false,
        }
    }

    fn fold(&mut self, id: Uuid, version: Version, r: RecordOf<S>) {
        self.version = version;
        let parse = |s: &str| Uuid::parse_str(s).unwrap_or_default();
        match r {
            SagaRecord::Triggered { event_id, .. } => {
                self.handled.insert(parse(&event_id));
            }
            SagaRecord::StateChanged { state } => self.state = state,
            SagaRecord::CommandScheduled { command, .. } => self.pending.push(Pending {
                dispatch_id: id,
                command,
            }),
            SagaRecord::CommandSucceeded { dispatch_id }
            | SagaRecord::CommandFailed { dispatch_id, .. } => {
                let d = parse(&dispatch_id);
                self.handled.insert(d);
                self.pending.retain(|p| p.dispatch_id != d);
            }
            SagaRecord::DeadlineScheduled {
                name,
                due_at_micros,
            } => {
                self.deadlines
                    .insert(id, (name, Timestamp::from_unix_micros(due_at_micros)));
            }
            SagaRecord::DeadlineFired { deadline_id, .. }
            | SagaRecord::DeadlineCancelled { deadline_id } => {
                let d = parse(&deadline_id);
                self.handled.insert(d);
                self.deadlines.remove(&d);
            }
            SagaRecord::Completed => {
                self.completed = true;
                self.deadlines.clear();
            }
        }
    }
}

/// What one [`SagaRunner::run_once`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

/// Runs one [`Saga`]: follows the global log from its checkpoint, records reactions, dispatches
/// commands through a [`CommandDispatcher`], and fires deadlines.
pub struct SagaRunner<S: Saga, D> {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    saga: S,
    dispatcher: D,
    instances: BTreeMap<(TenantId, String), Instance<S>>,
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

impl<S: Saga, D> fmt::Debug for SagaRunner<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaRunner")
            .field("saga", &S::NAME)
            .field("instances", &self.instances.len())
            .finish_non_exhaustive()
    }
}

impl<S: Saga, D: CommandDispatcher<S::Command>> SagaRunner<S, D> {
    /// A runner reading triggers from `store`, keeping its checkpoint (named
    /// `"saga.{NAME}"`) in `checkpoints`.
    pub fn new(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        saga: S,
        dispatcher: D,
    ) -> Self {
        Self {
            store,
            checkpoints,
            saga,
            dispatcher,
            instances: BTreeMap::new(),
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

    /// The current state of an instance, if the runner knows it.
    pub fn state(&self, tenant: &TenantId, instance: &str) -> Option<&S::State> {
        self.instances
            .get(&(tenant.clone(), instance.to_owned()))
            .map(|i| &i.state)
    }

    /// The earliest pending deadline.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.instances
            .values()
            .filter(|i| !i.completed)
            .flat_map(|i| i.deadlines.values().map(|(_, due)| *due))
            .min()
    }

    /// Rebuilds the index of instances from the saga streams (once per runner).
    async fn recover(&mut self) -> Result<()> {
        if self.recovered {
            return Ok(());
        }
        let prefix = Self::prefix();
        let filter = EventFilter {
            stream_prefix: Some(prefix.clone()),
            ..EventFilter::default()
        };
        let records = self.store.read_all_to_end(Position::START, filter).await?;
        for e in records {
            let instance = e.stream.as_str()[prefix.len()..].to_owned();
            let r = decode_record::<S>(&e)?;
            self.instances
                .entry((e.tenant.clone(), instance))
                .or_insert_with(|| Instance::new(e.tenant.clone(), e.stream.clone()))
                .fold(e.event_id.as_uuid(), e.version, r);
        }
        self.recovered = true;
        Ok(())
    }

    /// Records the reaction to `cause` unless it is already handled: `decide` computes the
    /// head record and the reaction from the instance's current state (`None`: nothing to do).
    /// On a conflict (the stream moved, e.g. another runner) the instance is reloaded and the
    /// decision taken again. Returns whether this call recorded it.
    async fn record<F>(&mut self, key: &(TenantId, String), cause: Uuid, decide: F) -> Result<bool>
    where
        F: Fn(&S, &Instance<S>) -> Option<(RecordOf<S>, Reaction<S>)>,
    {
        for _ in 0..5 {
            let Some(inst) = self.instances.get(key) else {
                return Ok(false);
            };
            if inst.handled.contains(&cause) {
                return Ok(false);
            }
            let Some((head, reaction)) = decide(&self.saga, inst) else {
                return Ok(false);
            };
            if self.try_record(key, cause, head, reaction).await? {
                return Ok(true);
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

    /// Appends the records for one cause (ids derived from `cause`) and folds them in
    /// (`true`), or reloads the instance after a conflict or duplicate (`false`).
    async fn try_record(
        &mut self,
        key: &(TenantId, String),
        cause: Uuid,
        head: RecordOf<S>,
        reaction: Reaction<S>,
    ) -> Result<bool> {
        let now = Timestamp::now();
        let Some(inst) = self.instances.get(key) else {
            return Ok(false);
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
            for (id, (n, _)) in &inst.deadlines {
                if *n == name {
                    records.push(SagaRecord::DeadlineCancelled {
                        deadline_id: id.to_string(),
                    });
                }
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
        let stream = inst.stream.clone();
        let tenant = inst.tenant.clone();
        let events = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let payload = serde_json::to_vec(r).map_err(|e| {
                    Error::invalid(format!("saga {} record", S::NAME), e.to_string())
                })?;
                Ok(NewEvent {
                    event_id: derived_event_id(cause, &stream, i),
                    dedup_key: None,
                    event_type: r.event_type().to_owned(),
                    schema_version: 1,
                    content_type: CONTENT_TYPE_JSON.to_owned(),
                    payload: Bytes::from(payload),
                    metadata: Metadata {
                        causation_id: Some(cause.to_string()),
                        ..Metadata::default()
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self
            .store
            .append(AppendRequest {
                tenant,
                stream,
                expected: ExpectedVersion::Exact(inst.version),
                events,
            })
            .await;
        match out {
            Ok(out) if !out.duplicate => {
                if let Some(inst) = self.instances.get_mut(key) {
                    for (r, er) in records.into_iter().zip(out.events) {
                        inst.fold(er.event_id.as_uuid(), er.version, r);
                    }
                }
                Ok(true)
            }
            // Already recorded (another runner, or a retried append), or the stream moved:
            // reload the instance from its stream.
            Ok(_) | Err(Error::Conflict { .. }) | Err(Error::Duplicate { .. }) => {
                self.reload(key).await.map(|()| false)
            }
            Err(e) => Err(e),
        }
    }

    async fn reload(&mut self, key: &(TenantId, String)) -> Result<()> {
        let stream = Self::stream_id(&key.1)?;
        let events = self
            .store
            .read_stream(ReadStream::forwards(key.0.clone(), stream.clone()))
            .await?;
        let mut inst = Instance::new(key.0.clone(), stream);
        for e in &events {
            inst.fold(e.event_id.as_uuid(), e.version, decode_record::<S>(e)?);
        }
        self.instances.insert(key.clone(), inst);
        Ok(())
    }

    /// Sends the instance's scheduled commands in order until none is left or one fails
    /// transiently; returns (dispatched, transient failure).
    async fn dispatch_pending(&mut self, key: &(TenantId, String)) -> Result<(usize, bool)> {
        let mut sent = 0;
        loop {
            let Some(inst) = self.instances.get(key) else {
                return Ok((sent, false));
            };
            let Some(p) = inst.pending.first() else {
                return Ok((sent, false));
            };
            let (id, command) = (p.dispatch_id, p.command.clone());
            let tenant = inst.tenant.clone();
            let result = match self.dispatcher.dispatch(&tenant, id, &command).await {
                Ok(()) => Ok(()),
                Err(DispatchError::Rejected(error)) => Err(error),
                Err(DispatchError::Transient(_)) => return Ok((sent, true)),
            };
            self.record(key, id, |saga, inst| {
                Some(match &result {
                    Ok(()) => (
                        SagaRecord::CommandSucceeded {
                            dispatch_id: id.to_string(),
                        },
                        saga.on_success(&inst.state, &command),
                    ),
                    Err(error) => (
                        SagaRecord::CommandFailed {
                            dispatch_id: id.to_string(),
                            error: error.clone(),
                        },
                        saga.on_failure(&inst.state, &command, error),
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
        let keys: Vec<_> = self.instances.keys().cloned().collect();
        for key in &keys {
            progress.dispatched += self.dispatch_pending(key).await?.0;
        }
        // New triggers.
        let name = Self::checkpoint_name();
        let prefix = Self::prefix();
        loop {
            let cp = match self.cursor {
                Some(c) => Some(c),
                None => self.checkpoints.load_checkpoint(&name).await?,
            };
            let from = cp.map_or(Position::START, Position::next);
            let triggers_before = progress.triggers;
            let page = self
                .store
                .read_all(ReadAll::from(from, self.batch_size).filter(self.saga.filter()))
                .await?;
            let full = page.events.len() == self.batch_size;
            for e in &page.events {
                if e.stream.as_str().starts_with(&prefix) {
                    continue;
                }
                let Some(instance) = self.saga.correlate(e) else {
                    continue;
                };
                let key = (e.tenant.clone(), instance.clone());
                if !self.instances.contains_key(&key) {
                    let stream = Self::stream_id(&instance)?;
                    self.instances
                        .insert(key.clone(), Instance::new(e.tenant.clone(), stream));
                }
                let cause = e.event_id.as_uuid();
                let recorded = self
                    .record(&key, cause, |saga, inst| {
                        (!inst.completed).then(|| {
                            let head = SagaRecord::Triggered {
                                event_id: cause.to_string(),
                                event_type: e.event_type.clone(),
                                stream: e.stream.as_str().to_owned(),
                            };
                            (head, saga.on_event(&inst.state, e))
                        })
                    })
                    .await?;
                if !recorded {
                    continue;
                }
                progress.triggers += 1;
                progress.dispatched += self.dispatch_pending(&key).await?.0;
            }
            let next = Position::new(page.next.get().saturating_sub(1));
            if page.next > Position::START && cp.is_none_or(|c| c < next) {
                let reacted = progress.triggers > triggers_before;
                if reacted
                    || self
                        .saved_at
                        .is_none_or(|t| t.elapsed() >= CHECKPOINT_EVERY)
                {
                    self.checkpoints.save_checkpoint(&name, next).await?;
                    self.saved_at = Some(std::time::Instant::now());
                }
                self.cursor = Some(next);
            }
            if !full {
                break;
            }
        }
        // Due deadlines.
        let now = Timestamp::now();
        let due: Vec<_> = self
            .instances
            .iter()
            .filter(|(_, i)| !i.completed)
            .flat_map(|(k, i)| {
                i.deadlines
                    .iter()
                    .filter(|(_, (_, at))| *at <= now)
                    .map(move |(id, (name, at))| (*at, k.clone(), *id, name.clone()))
            })
            .collect::<Vec<_>>();
        let mut due = due;
        due.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
        for (_, key, id, name) in due {
            let fired = self
                .record(&key, id, |saga, inst| {
                    (!inst.completed && inst.deadlines.contains_key(&id)).then(|| {
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
        progress.pending = self.instances.values().map(|i| i.pending.len()).sum();
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
                        return Err(Error::Unavailable {
                            reason: "the event store was closed".into(),
                            retry_after: None,
                            source: None,
                        });
                    }
                }
            }
        }
    }
}
