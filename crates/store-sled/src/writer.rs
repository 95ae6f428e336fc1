//! The single writer thread: owns every write, groups concurrent requests, commits each group
//! with one sled batch and one durability barrier, then publishes the new head.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tracktrace_core::codec::envelope;
use tracktrace_core::{
    AppendOutcome, AppendRequest, Error, EventRef, Position, ReadModelBatch, ReadModelWrite,
    RecordedEvent, Result, Snapshot, Timestamp, Version, monotonic_now, resolve_duplicates,
};

use crate::layout::{self, Run};
use crate::options::Durability;
use crate::store::{Shared, sled_err};

/// Most requests committed together in one group.
const MAX_GROUP_REQUESTS: usize = 1024;

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

enum Reply {
    Append(oneshot::Sender<Result<AppendOutcome>>, Result<AppendOutcome>),
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
}

impl Barrier {
    pub(crate) fn new(mode: Durability, db_file: File, blobs_dir: PathBuf) -> Self {
        Self {
            mode,
            db_file,
            blobs_dir,
            synced_blobs: HashSet::new(),
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

    /// sled never fsyncs the `blobs/<lsn>` files it writes for oversized pages. Values are kept
    /// small enough that this should not happen (see [`crate::layout`]); if it does anyway, the
    /// new files and the directory are synced here.
    fn sync_blobs(&mut self) -> std::result::Result<(), String> {
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
        Ok(())
    }
}

/// State of the writer thread.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) rx: mpsc::UnboundedReceiver<Request>,
    /// Position the next event gets (positions are contiguous).
    pub(crate) next_position: u64,
    pub(crate) clock: Timestamp,
    pub(crate) barrier: Barrier,
}

/// What one group has staged but not yet written.
#[derive(Default)]
struct Group {
    batch: sled::Batch,
    dirty: bool,
    /// Versions of streams appended to in this group, by stream prefix.
    versions: HashMap<Vec<u8>, u64>,
    /// Events appended in this group, by id-index and dedup-index key.
    refs: HashMap<Vec<u8>, EventRef>,
}

impl Writer {
    pub(crate) fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP_REQUESTS {
                match self.rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            self.process(group);
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
        if fatal.is_none() && g.dirty {
            let batch = std::mem::take(&mut g.batch);
            if let Err(e) = self.shared.log.apply_batch(batch) {
                fatal = Some(format!("writing an append group failed: {e}"));
            } else if let Err(e) = self.barrier.run(&self.shared.db) {
                fatal = Some(e);
            }
        }
        if let Some(reason) = fatal {
            tracing::error!(%reason, "sled event store poisoned");
            let _ = self.shared.poisoned.set(reason.clone());
            for r in replies {
                r.fail(Shared::poison_error(&reason));
            }
            return;
        }
        let head = self.next_position - 1;
        if head != self.shared.head.load(Ordering::Acquire) {
            self.shared.head.store(head, Ordering::Release);
            self.shared.head_tx.send_replace(Position::new(head));
        }
        for r in replies {
            r.send();
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
        let pos = layout::decode_u64(&v)
            .ok_or_else(|| Error::corruption(None, "malformed index entry"))?;
        match self.shared.read_event(pos)? {
            Some(e) => Ok(Some(e.to_ref())),
            None => Err(Error::corruption(
                Some(Position::new(pos)),
                "an index entry points to a missing event",
            )),
        }
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
        let actual = match g.versions.get(&prefix) {
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
            let pos_bytes = position.to_be_bytes();
            layout::put_value(
                &mut g.batch,
                &layout::event_key(position),
                &envelope::encode(&rec),
                0,
            );
            g.batch.insert(id_key.as_slice(), &pos_bytes);
            let r = rec.to_ref();
            if let Some(dk) = dk {
                g.batch.insert(dk.as_slice(), &pos_bytes);
                g.refs.insert(dk, r.clone());
            }
            g.refs.insert(id_key, r.clone());
            refs.push(r);
        }
        let run = Run {
            first_version: actual + 1,
            first_position,
            count: u32::try_from(count).unwrap_or(u32::MAX),
        };
        g.batch
            .insert(layout::run_key(&prefix, actual + 1), &run.encode_value());
        g.versions.insert(prefix, actual + count);
        g.dirty = true;
        self.next_position += count;
        Ok(AppendOutcome {
            events: refs,
            duplicate: false,
        })
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
                    pending.insert(crate::store::read_model_key(i, &ns, &key)?, Some(value));
                }
                ReadModelWrite::Delete { ns, key } => {
                    pending.insert(crate::store::read_model_key(i, &ns, &key)?, None);
                }
                ReadModelWrite::Clear { ns } => {
                    crate::store::check_namespace(i, &ns)?;
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

    fn save_snapshot(
        &self,
        s: Snapshot,
        g: &mut Group,
        fatal: &mut Option<String>,
    ) -> Result<()> {
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
