//! The write path: one writer thread owns every write; it groups the requests queued meanwhile,
//! checks and stages them, and writes each group's events, index entries and runs with one sled
//! `insert` per key, in the order described in [`crate::layout`]. It then hands
//! the group to the sync thread and goes on with the next group. The sync thread runs one
//! durability barrier for every group applied since its last barrier (group commit, pipelined
//! with the writer), then publishes the new head to readers and answers the requests, in order.
//! A group of one request with nothing queued behind it and nothing being synced is committed
//! by the writer itself (same barrier, same order), saving a thread hand-off per append when
//! there is nothing to pipeline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracktrace_core::codec::envelope;
use tracktrace_core::{
    AppendOutcome, AppendRequest, Error, EventRef, Position, ReadModelBatch, ReadModelWrite,
    RecordedEvent, Result, Snapshot, Timestamp, Version, monotonic_now, resolve_duplicates,
};

use crate::keys::{check_namespace, read_model_key};
use crate::layout::{self, Run};
use crate::options::Durability;
use crate::shared::{Shared, sled_err};

/// Most requests committed together in one group.
const MAX_GROUP_REQUESTS: usize = 1024;
/// A group stops taking appends once it holds this many events (bounds its memory).
const MAX_GROUP_EVENTS: usize = 20_000;

/// A write for the writer thread.
pub(crate) enum Request {
    Append {
        req: AppendRequest,
        reply: oneshot::Sender<Result<AppendOutcome>>,
    },
    Commit {
        batch: ReadModelBatch,
        reply: oneshot::Sender<Result<()>>,
    },
    SaveCheckpoint {
        name: String,
        position: Position,
        reply: oneshot::Sender<Result<()>>,
    },
    SaveSnapshot {
        snapshot: Snapshot,
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Request {
    fn event_count(&self) -> usize {
        match self {
            Request::Append { req, .. } => req.events.len(),
            _ => 1,
        }
    }
}

pub(crate) enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome>>,
        Result<AppendOutcome>,
    ),
    Unit(oneshot::Sender<Result<()>>, Result<()>),
}

impl Reply {
    fn send(self) {
        // A dropped receiver means the caller went away (e.g. its future was cancelled); the
        // write stands either way.
        match self {
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Unit(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, e: Error) {
        match self {
            Reply::Append(tx, _) => drop(tx.send(Err(e))),
            Reply::Unit(tx, _) => drop(tx.send(Err(e))),
        }
    }
}

/// The durability barrier of [`Durability::Fsync`]: sled `flush()` + `fdatasync` of `db` and of
/// any new blob file.
pub(crate) struct Barrier {
    mode: Durability,
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<OsString>,
    /// Modification time of the blobs directory read before the last listing, if the listing
    /// happened well after it (then an unchanged mtime proves no file was added since).
    blobs_listed_at_mtime: Option<SystemTime>,
    /// When the blobs directory was last looked at.
    blobs_checked_at: Option<Instant>,
}

/// How often the barrier looks for blob files (see [`Barrier::sync_blobs`]).
const BLOB_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Barrier {
    pub(crate) fn new(mode: Durability, db_file: File, blobs_dir: PathBuf) -> Self {
        Self {
            mode,
            db_file,
            blobs_dir,
            synced_blobs: HashSet::new(),
            blobs_listed_at_mtime: None,
            blobs_checked_at: None,
        }
    }

    fn run(&mut self, db: &sled::Db) -> std::result::Result<(), String> {
        match self.mode {
            Durability::Fsync => {
                db.flush().map_err(|e| format!("sled flush failed: {e}"))?;
                self.db_file
                    .sync_data()
                    .map_err(|e| format!("fdatasync of the db file failed: {e}"))?;
                self.sync_blobs()
            }
            Durability::Flush => db
                .flush()
                .map(drop)
                .map_err(|e| format!("sled flush failed: {e}")),
            Durability::Buffered { .. } => Ok(()),
        }
    }

    /// sled never fsyncs the `blobs/<lsn>` files it writes for oversized pages. Values and keys
    /// are kept small enough that this does not happen (see [`crate::layout`]), so the blobs
    /// directory is only looked at as a safety net, at most once per [`BLOB_CHECK_INTERVAL`]
    /// (a `statx` per barrier was a measurable part of a single writer's barrier): if a blob
    /// file turns up anyway, it and the directory are synced then, which may be after the
    /// barrier of the write that created it.
    fn sync_blobs(&mut self) -> std::result::Result<(), String> {
        let now = Instant::now();
        if self
            .blobs_checked_at
            .is_some_and(|t| now.duration_since(t) < BLOB_CHECK_INTERVAL)
        {
            return Ok(());
        }
        self.blobs_checked_at = Some(now);
        let mtime = match std::fs::metadata(&self.blobs_dir).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("stat of {}: {e}", self.blobs_dir.display())),
        };
        // Listing the directory costs more than the rest of a batched barrier; skip it while
        // the directory provably did not change. File timestamps are coarse (a few ms), so an
        // unchanged mtime only proves that when the last listing happened well after it.
        if self.blobs_listed_at_mtime == Some(mtime) {
            return Ok(());
        }
        let listed_at = SystemTime::now();
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("listing {}: {e}", self.blobs_dir.display())),
        };
        let mut present = HashSet::new();
        let mut synced_any = false;
        for entry in entries {
            let entry = entry.map_err(|e| format!("listing blobs: {e}"))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f
                        .sync_data()
                        .map_err(|e| format!("fdatasync of blob {name:?} failed: {e}"))?,
                    // Garbage-collected by sled in the meantime.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(format!("opening blob {name:?}: {e}")),
                }
                synced_any = true;
            }
            present.insert(name);
        }
        if synced_any {
            File::open(&self.blobs_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("fsync of the blobs directory failed: {e}"))?;
        }
        self.synced_blobs = present;
        self.blobs_listed_at_mtime = listed_at
            .duration_since(mtime)
            .is_ok_and(|d| d > Duration::from_secs(1))
            .then_some(mtime);
        Ok(())
    }
}

/// A group written to sled (visible to the writer, not yet to readers) that waits for its
/// barrier.
pub(crate) struct Applied {
    replies: Vec<Reply>,
    /// Last position the group (and every group before it) assigned.
    head: u64,
    /// Whether the group wrote anything (otherwise it needs no barrier of its own).
    dirty: bool,
}

/// What the writer and the sync thread share to run barriers.
pub(crate) struct Syncing {
    barrier: Mutex<Barrier>,
    /// Groups handed to the sync thread and not yet answered by it.
    in_flight: AtomicUsize,
}

impl Syncing {
    pub(crate) fn new(barrier: Barrier) -> Self {
        Self {
            barrier: Mutex::new(barrier),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// The sync thread: runs one barrier for everything applied since the last one, then
/// publishes the new head and answers the groups it covers, in order.
pub(crate) fn sync_loop(
    shared: Arc<Shared>,
    rx: std::sync::mpsc::Receiver<Applied>,
    syncing: Arc<Syncing>,
) {
    while let Ok(first) = rx.recv() {
        let mut groups = vec![first];
        groups.extend(rx.try_iter());
        let n = groups.len();
        commit(&shared, &syncing.barrier, groups);
        syncing.in_flight.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Runs one barrier for `groups` (applied, in order), then publishes the new head and answers
/// their requests, in order.
fn commit(shared: &Shared, barrier: &Mutex<Barrier>, groups: Vec<Applied>) {
    let mut result = match shared.poisoned.get() {
        Some(reason) => Err(reason.clone()),
        None => Ok(()),
    };
    if result.is_ok() && groups.iter().any(|g| g.dirty) {
        result = barrier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run(&shared.db);
        shared.stats.barriers.fetch_add(1, Ordering::Relaxed);
        if let Err(reason) = &result {
            shared.poison(reason);
        }
    }
    match result {
        Ok(()) => {
            let head = groups.last().map_or(0, |g| g.head);
            if head != shared.head.load(Ordering::Acquire) {
                shared.head.store(head, Ordering::Release);
                shared.head_tx.send_replace(Position::new(head));
            }
            for r in groups.into_iter().flat_map(|g| g.replies) {
                r.send();
            }
        }
        Err(reason) => {
            for r in groups.into_iter().flat_map(|g| g.replies) {
                r.fail(Shared::poison_error(&reason));
            }
        }
    }
}

/// State of the writer thread.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) rx: mpsc::Receiver<Request>,
    /// Position the next event gets (positions are contiguous).
    pub(crate) next_position: u64,
    pub(crate) clock: Timestamp,
    /// Applied groups go to the sync thread.
    pub(crate) sync_tx: std::sync::mpsc::SyncSender<Applied>,
    pub(crate) syncing: Arc<Syncing>,
    /// The sync thread, joined when the writer stops.
    pub(crate) syncer: Option<std::thread::JoinHandle<()>>,
    /// Committed versions of recently appended streams, by stream prefix (saves a reverse
    /// index scan per append; the writer is the only writer, so the cache cannot go stale).
    pub(crate) versions: HashMap<Vec<u8>, u64>,
}

/// What one group has staged but not yet written.
#[derive(Default)]
struct Group {
    dirty: bool,
    /// Versions of streams appended to in this group, by stream prefix.
    versions: HashMap<Vec<u8>, u64>,
    /// Events appended in this group, by id-index and dedup-index key.
    refs: HashMap<Vec<u8>, EventRef>,
    /// The group's encoded events in position order, packed into pages at the end.
    events: Vec<PendingEvent>,
    /// The group's stream-index runs, written last (after the pages and index entries).
    runs: Vec<(Vec<u8>, Run)>,
}

struct PendingEvent {
    position: u64,
    envelope: Vec<u8>,
    /// Its event-id index key and, if any, its dedup-key index key.
    index_keys: Vec<Vec<u8>>,
}

/// Most stream versions the writer keeps cached (the cache is cleared when full).
const VERSION_CACHE_CAP: usize = 100_000;

impl Group {
    /// Packs the staged events into pages and writes them, their index entries and the group's
    /// runs to `log`, one `insert` each, in the order the open-time repair relies on (see
    /// [`crate::layout`]): every page of the group (continuation chunks before their primary
    /// key), then the id and dedup index entries, then the runs, in position order. A crash
    /// leaves a prefix of these writes; a run is only ever present with everything before it.
    fn write_to(&mut self, log: &sled::Tree) -> sled::Result<()> {
        let events = std::mem::take(&mut self.events);
        let mut page_starts = Vec::new();
        let mut entries = Vec::with_capacity(events.len() * 2);
        let mut start = 0;
        while start < events.len() {
            let mut size = layout::page_size([events[start].envelope.len()]);
            let mut end = start + 1;
            while end < events.len() && size + 4 + events[end].envelope.len() <= layout::PAGE_TARGET
            {
                size += 4 + events[end].envelope.len();
                end += 1;
            }
            let first = events[start].position;
            page_starts.push(first);
            let page =
                layout::encode_page(events[start..end].iter().map(|e| e.envelope.as_slice()));
            let key = layout::page_key(first);
            let (stored, chunks) = layout::value_parts(&key, &page);
            for (k, c) in chunks {
                log.insert(k, c)?;
            }
            log.insert(key, stored)?;
            for e in &events[start..end] {
                let entry = layout::IndexEntry {
                    page: first,
                    position: e.position,
                }
                .encode();
                for k in &e.index_keys {
                    entries.push((k, entry));
                }
            }
            start = end;
        }
        for (k, entry) in entries {
            log.insert(k.as_slice(), &entry)?;
        }
        for (key, mut run) in std::mem::take(&mut self.runs) {
            // The page holding the run's first event: the last one starting at or before it.
            let i = page_starts.partition_point(|&p| p <= run.first_position);
            run.first_page = page_starts
                .get(i.wrapping_sub(1))
                .copied()
                .unwrap_or(run.first_position);
            log.insert(key, &run.encode_value())?;
        }
        Ok(())
    }
}

impl Writer {
    pub(crate) fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut events = first.event_count();
            let mut group = vec![first];
            while group.len() < MAX_GROUP_REQUESTS && events < MAX_GROUP_EVENTS {
                match self.rx.try_recv() {
                    Ok(r) => {
                        events += r.event_count();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.process(group);
        }
        // Let the syncer finish the groups already applied, then stop it.
        let Writer {
            sync_tx, syncer, ..
        } = self;
        drop(sync_tx);
        if let Some(s) = syncer {
            let _ = s.join();
        }
    }

    fn process(&mut self, requests: Vec<Request>) {
        let mut replies = Vec::with_capacity(requests.len());
        if let Some(reason) = self.shared.poisoned.get() {
            for r in requests {
                reply_of(r).fail(Shared::poison_error(reason));
            }
            return;
        }
        let mut g = Group::default();
        let mut fatal = None;
        for r in requests {
            if fatal.is_some() {
                replies.push(reply_of(r));
                continue;
            }
            let reply = match r {
                Request::Append { req, reply } => {
                    Reply::Append(reply, self.stage_append(req, &mut g))
                }
                Request::Commit { batch, reply } => {
                    Reply::Unit(reply, self.commit_read_model(batch, &mut g, &mut fatal))
                }
                Request::SaveCheckpoint {
                    name,
                    position,
                    reply,
                } => {
                    let mut b = sled::Batch::default();
                    b.insert(layout::checkpoint_key(&name), &position.get().to_be_bytes());
                    let r = self.apply(&self.shared.projections, b, &mut g, &mut fatal);
                    Reply::Unit(reply, r)
                }
                Request::SaveSnapshot { snapshot, reply } => {
                    Reply::Unit(reply, self.save_snapshot(snapshot, &mut g, &mut fatal))
                }
            };
            replies.push(reply);
        }
        if fatal.is_none() && !g.events.is_empty() {
            let stats = &self.shared.stats;
            stats.groups.fetch_add(1, Ordering::Relaxed);
            stats
                .appends
                .fetch_add(g.runs.len() as u64, Ordering::Relaxed);
            stats
                .events
                .fetch_add(g.events.len() as u64, Ordering::Relaxed);
            if let Err(e) = g.write_to(&self.shared.log) {
                fatal = Some(format!("writing an append group failed: {e}"));
            }
        }
        if let Some(reason) = fatal {
            self.shared.poison(&reason);
            for r in replies {
                r.fail(Shared::poison_error(&reason));
            }
            return;
        }
        for (k, v) in g.versions.drain() {
            if self.versions.len() >= VERSION_CACHE_CAP {
                self.versions.clear();
            }
            self.versions.insert(k, v);
        }
        let applied = Applied {
            replies,
            head: self.next_position - 1,
            dirty: g.dirty,
        };
        // A lone request with nothing queued behind it and no earlier group still being
        // synced (one writer at a time, mostly): there is nothing to pipeline, so run the
        // barrier and answer here, which saves waking the sync thread. Larger groups still go
        // to the sync thread, so that the next group is staged during their barrier.
        if applied.replies.len() == 1
            && self.rx.is_empty()
            && self.syncing.in_flight.load(Ordering::Acquire) == 0
        {
            commit(&self.shared, &self.syncing.barrier, vec![applied]);
            return;
        }
        // Otherwise the syncer makes the group durable, publishes the head and answers;
        // meanwhile this thread goes on with the next group (pipelining).
        self.syncing.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Err(std::sync::mpsc::SendError(applied)) = self.sync_tx.send(applied) {
            self.syncing.in_flight.fetch_sub(1, Ordering::AcqRel);
            for r in applied.replies {
                r.fail(Shared::poison_error("the sync thread stopped"));
            }
        }
    }

    /// Applies a non-log batch at once (it becomes durable with the group's barrier).
    fn apply(
        &self,
        tree: &sled::Tree,
        batch: sled::Batch,
        g: &mut Group,
        fatal: &mut Option<String>,
    ) -> Result<()> {
        match tree.apply_batch(batch) {
            Ok(()) => {
                g.dirty = true;
                Ok(())
            }
            Err(e) => {
                let reason = format!("writing to sled failed: {e}");
                *fatal = Some(reason.clone());
                Err(Shared::poison_error(&reason))
            }
        }
    }

    /// The stored event an index entry points to, as a reference.
    fn committed_ref(&self, index_key: &[u8]) -> Result<Option<EventRef>> {
        let Some(v) = self.shared.log.get(index_key).map_err(sled_err)? else {
            return Ok(None);
        };
        let entry = layout::IndexEntry::decode(&v)
            .ok_or_else(|| Error::corruption(None, "malformed index entry"))?;
        Ok(Some(self.shared.read_event(entry)?.to_ref()))
    }

    fn stage_append(&mut self, req: AppendRequest, g: &mut Group) -> Result<AppendOutcome> {
        let tenant = req.tenant.as_str();
        let mut existing = Vec::with_capacity(req.events.len());
        for e in &req.events {
            let id_key = layout::id_key(tenant, &e.event_id.to_bytes());
            let mut found = match g.refs.get(&id_key) {
                Some(r) => Some(r.clone()),
                None => self.committed_ref(&id_key)?,
            };
            if found.is_none()
                && let Some(k) = &e.dedup_key
            {
                let dk = layout::dedup_key(tenant, k);
                found = match g.refs.get(&dk) {
                    Some(r) => Some(r.clone()),
                    None => self.committed_ref(&dk)?,
                };
            }
            existing.push(found);
        }
        if let Some(dup) = resolve_duplicates(&req.events, existing)? {
            return Ok(dup);
        }
        let prefix = layout::stream_prefix(tenant, req.stream.as_str());
        let actual = match g
            .versions
            .get(&prefix)
            .or_else(|| self.versions.get(&prefix))
        {
            Some(v) => *v,
            None => self.shared.stream_version_of(&prefix, u64::MAX)?,
        };
        if !req.expected.accepts(Version::new(actual)) {
            return Err(Error::Conflict {
                tenant: req.tenant,
                stream: req.stream,
                expected: req.expected,
                actual: Version::new(actual),
            });
        }
        let now = monotonic_now(&mut self.clock);
        let first_position = self.next_position;
        let count = req.events.len() as u64;
        let mut refs = Vec::with_capacity(req.events.len());
        for (i, e) in req.events.into_iter().enumerate() {
            let version = Version::new(actual + 1 + i as u64);
            let position = first_position + i as u64;
            let id_key = layout::id_key(tenant, &e.event_id.to_bytes());
            let dk = e.dedup_key.as_deref().map(|k| layout::dedup_key(tenant, k));
            let rec = RecordedEvent::from_new(
                req.tenant.clone(),
                req.stream.clone(),
                version,
                Position::new(position),
                now,
                e,
            );
            let r = rec.to_ref();
            let mut index_keys = Vec::with_capacity(2);
            if let Some(dk) = dk {
                g.refs.insert(dk.clone(), r.clone());
                index_keys.push(dk);
            }
            g.refs.insert(id_key.clone(), r.clone());
            index_keys.push(id_key);
            g.events.push(PendingEvent {
                position,
                envelope: envelope::encode(&rec),
                index_keys,
            });
            refs.push(r);
        }
        // Written with the pages, which decide `first_page`.
        g.runs.push((
            layout::run_key(&prefix, actual + 1),
            Run {
                first_version: actual + 1,
                first_position,
                count: u32::try_from(count).unwrap_or(u32::MAX),
                first_page: first_position,
            },
        ));
        g.versions.insert(prefix, actual + count);
        g.dirty = true;
        self.next_position += count;
        Ok(AppendOutcome::new(refs, false))
    }

    fn commit_read_model(
        &self,
        batch: ReadModelBatch,
        g: &mut Group,
        fatal: &mut Option<String>,
    ) -> Result<()> {
        let tree = &self.shared.projections;
        let ck = layout::checkpoint_key(&batch.checkpoint);
        let actual = self.shared.checkpoint_at(&ck)?;
        if actual != batch.expected_checkpoint {
            return Err(Error::CheckpointMoved {
                name: batch.checkpoint,
                expected: batch.expected_checkpoint,
                actual,
            });
        }
        // The writes apply in order: resolve them into one final value per key first.
        let mut pending: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for (i, w) in batch.writes.into_iter().enumerate() {
            match w {
                ReadModelWrite::Put { ns, key, value } => {
                    pending.insert(read_model_key(i, &ns, &key)?, Some(value));
                }
                ReadModelWrite::Delete { ns, key } => {
                    pending.insert(read_model_key(i, &ns, &key)?, None);
                }
                ReadModelWrite::Clear { ns } => {
                    check_namespace(i, &ns)?;
                    let prefix = layout::namespace_prefix(&ns);
                    for k in tree.scan_prefix(&prefix).keys() {
                        pending.insert(k.map_err(sled_err)?.to_vec(), None);
                    }
                    for (_, v) in pending
                        .range_mut(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                    {
                        *v = None;
                    }
                }
                // A kind of write added to tracktrace-core after this backend: the whole batch
                // is rejected (nothing is written yet), never the write skipped.
                _ => {
                    return Err(Error::invalid(
                        format!("writes[{i}]"),
                        "is a kind of read-model write the sled store does not support",
                    ));
                }
            }
        }
        let mut b = sled::Batch::default();
        for (k, v) in pending {
            let old = tree
                .get(&k)
                .map_err(sled_err)?
                .map(|o| layout::continuation_count(&o));
            match (v, old) {
                (Some(v), old) => layout::put_value(&mut b, &k, &v, old.unwrap_or(0)),
                (None, Some(old)) => layout::delete_value(&mut b, &k, old),
                (None, None) => {}
            }
        }
        b.insert(ck, &batch.position.get().to_be_bytes());
        self.apply(tree, b, g, fatal)
    }

    fn save_snapshot(&self, s: Snapshot, g: &mut Group, fatal: &mut Option<String>) -> Result<()> {
        let tree = &self.shared.snapshots;
        let key = layout::snapshot_key(s.tenant.as_str(), s.stream.as_str());
        let old = tree.get(&key).map_err(sled_err)?;
        if let Some(old) = &old
            && self
                .shared
                .decode_snapshot(&key, old.clone(), &s.tenant, &s.stream)?
                .version
                > s.version
        {
            return Ok(());
        }
        let mut value = Vec::with_capacity(12 + s.payload.len());
        value.extend_from_slice(&s.version.get().to_be_bytes());
        value.extend_from_slice(&s.schema_version.to_be_bytes());
        value.extend_from_slice(&s.payload);
        let mut b = sled::Batch::default();
        layout::put_value(
            &mut b,
            &key,
            &value,
            old.map_or(0, |o| layout::continuation_count(&o)),
        );
        self.apply(tree, b, g, fatal)
    }
}

/// The reply slot of a request that is not processed (it is only ever failed).
fn reply_of(r: Request) -> Reply {
    let unprocessed = || Shared::poison_error("the request was not processed");
    match r {
        Request::Append { reply, .. } => Reply::Append(reply, Err(unprocessed())),
        Request::Commit { reply, .. }
        | Request::SaveCheckpoint { reply, .. }
        | Request::SaveSnapshot { reply, .. } => Reply::Unit(reply, Err(unprocessed())),
    }
}
