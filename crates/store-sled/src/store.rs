//! [`SledStore`]: opening, reads, and the trait implementations (writes go to the writer thread).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use sled::IVec;
use tokio::sync::{mpsc, oneshot, watch};
use tracktrace_core::codec::envelope;
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, Error, EventId, EventStore,
    KeyRange, Position, ReadAll, ReadModelBatch, ReadModelStore, ReadStream, RecordedEvent, Result,
    Snapshot, SnapshotStore, StreamId, TenantId, Timestamp, Version, prefix_end, validate_batch,
};

use crate::layout::{self, Run};
use crate::options::{Durability, OpenError, SledOptions};
use crate::writer::{Barrier, Request, Writer};

/// Longest read-model namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 256;
/// Longest read-model key, in bytes (long keys would push sled index pages out of the `db`
/// file into unsynced blob files; see [`crate::layout`]).
pub const MAX_READ_MODEL_KEY_LEN: usize = 1024;

/// The durable embedded event store on sled 0.34.
///
/// Implements [`EventStore`], [`SnapshotStore`], [`CheckpointStore`] and [`ReadModelStore`].
/// Cheap to clone (clones share one store). Writes go through one writer thread that commits
/// concurrent requests together (group commit); reads go straight to sled from the caller.
/// Dropping the last clone finishes pending writes, stops the writer and releases the directory.
///
/// See the [crate documentation](crate) for the guarantees and [`Durability`] for the modes.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: Option<mpsc::UnboundedSender<Request>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    durability: Durability,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            // The writer finishes the requests already queued, then exits.
            let _ = w.join();
        }
    }
}

/// What the writer thread and the readers share.
pub(crate) struct Shared {
    pub(crate) db: sled::Db,
    pub(crate) log: sled::Tree,
    pub(crate) projections: sled::Tree,
    pub(crate) snapshots: sled::Tree,
    /// Highest position readers may see: everything up to it is committed per the durability
    /// mode. Only the writer advances it, after the group's barrier.
    pub(crate) head: AtomicU64,
    pub(crate) head_tx: watch::Sender<Position>,
    /// Set when a write or barrier failed: the on-disk state is then unknown and every later
    /// call fails until the store is reopened.
    pub(crate) poisoned: OnceLock<String>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.inner.path)
            .field("durability", &self.inner.durability)
            .field("head", &self.inner.shared.head.load(Ordering::Relaxed))
            .finish()
    }
}

pub(crate) fn sled_err(e: sled::Error) -> Error {
    match e {
        sled::Error::Corruption { .. } => Error::corruption(None, format!("sled: {e}")),
        other => Error::backend("sled operation failed", other),
    }
}

fn corrupt(position: u64, detail: impl Into<String>) -> Error {
    Error::corruption(Some(Position::new(position)), detail)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

impl SledStore {
    /// Opens (creating if needed) the store in `opts.path`.
    ///
    /// Blocks for sled's recovery. Fails with [`OpenError::Locked`] when another process (or
    /// another open store in this process) holds the directory.
    pub fn open(opts: SledOptions) -> std::result::Result<Self, OpenError> {
        let path = opts.path.clone();
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| OpenError::Io { path, what, source }
        };
        std::fs::create_dir_all(&path).map_err(io("creating the directory"))?;
        let mut cfg = sled::Config::new()
            .path(&path)
            .cache_capacity(opts.cache_capacity);
        if let Durability::Buffered { flush_every_ms } = opts.durability {
            cfg = cfg.flush_every_ms(Some(flush_every_ms.max(1)));
        }
        let db = cfg.open().map_err(|source| match &source {
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                OpenError::Locked {
                    path: path.clone(),
                    source,
                }
            }
            _ => OpenError::Sled {
                path: path.clone(),
                source,
            },
        })?;
        let sled_open = |source| OpenError::Sled {
            path: path.clone(),
            source,
        };
        let log = db.open_tree(layout::LOG_TREE).map_err(sled_open)?;
        let projections = db.open_tree(layout::PROJECTIONS_TREE).map_err(sled_open)?;
        let snapshots = db.open_tree(layout::SNAPSHOTS_TREE).map_err(sled_open)?;
        match db.get(layout::FORMAT_KEY).map_err(sled_open)? {
            Some(v) if v == layout::FORMAT_VERSION => {}
            Some(v) => {
                return Err(OpenError::Format {
                    path,
                    detail: format!("format marker is {:?}", String::from_utf8_lossy(&v)),
                });
            }
            None if log.is_empty() && projections.is_empty() && snapshots.is_empty() => {
                db.insert(layout::FORMAT_KEY, layout::FORMAT_VERSION)
                    .map_err(sled_open)?;
            }
            None => {
                return Err(OpenError::Format {
                    path,
                    detail: "sled data without a format marker".into(),
                });
            }
        }
        db.flush().map_err(sled_open)?;
        let db_file = File::open(path.join("db")).map_err(io("opening the db file for fsync"))?;
        if opts.durability == Durability::Fsync {
            // sled never fsyncs directories: make the entries of the files it created durable.
            db_file.sync_all().map_err(io("fsync of the db file"))?;
            let blobs = path.join("blobs");
            if blobs.is_dir() {
                sync_dir(&blobs).map_err(io("fsync of the blobs directory"))?;
            }
            sync_dir(&path).map_err(io("fsync of the store directory"))?;
        }

        // Recover the head and the clock from the last event.
        let mut head = 0;
        let mut clock = Timestamp::default();
        if let Some(item) = log.scan_prefix(b"E").next_back() {
            let (k, v) = item.map_err(sled_open)?;
            head = layout::event_key_position(&k).ok_or_else(|| OpenError::Format {
                path: path.clone(),
                detail: "malformed event key".into(),
            })?;
            // A damaged last event is reported when it is read; here it only costs clock
            // monotonicity across the restart.
            if let Ok(bytes) = layout::get_value(&log, &k, v)
                && let Ok(e) = envelope::decode(bytes.as_ref())
            {
                clock = e.recorded_at;
            }
        }

        let (head_tx, _) = watch::channel(Position::new(head));
        let shared = Arc::new(Shared {
            db,
            log,
            projections,
            snapshots,
            head: AtomicU64::new(head),
            head_tx,
            poisoned: OnceLock::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            shared: shared.clone(),
            rx,
            next_position: head + 1,
            clock,
            barrier: Barrier::new(opts.durability, db_file, path.join("blobs")),
        };
        let writer = std::thread::Builder::new()
            .name("tracktrace-sled-writer".into())
            .spawn(move || writer.run())
            .map_err(io("starting the writer thread"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                tx: Some(tx),
                writer: Some(writer),
                path,
                durability: opts.durability,
            }),
        })
    }

    /// Opens the store in `path` with the default options ([`Durability::Fsync`]).
    pub fn open_path(path: impl AsRef<Path>) -> std::result::Result<Self, OpenError> {
        Self::open(SledOptions::new(path))
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The durability mode the store was opened with.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn check(&self) -> Result<()> {
        match self.shared().poisoned.get() {
            Some(reason) => Err(Shared::poison_error(reason)),
            None => Ok(()),
        }
    }

    fn visible_head(&self) -> u64 {
        self.shared().head.load(Ordering::Acquire)
    }

    async fn send<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request) -> Result<T> {
        self.check()?;
        let (tx, rx) = oneshot::channel();
        let closed = || Error::Unavailable {
            reason: "the sled writer thread stopped".into(),
            retry_after: None,
            source: None,
        };
        self.inner
            .tx
            .as_ref()
            .ok_or_else(closed)?
            .send(make(tx))
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Reads the events of one run between versions `v0` and `v1` (inclusive), in `direction`,
    /// into `out` until it holds `limit` events.
    fn read_run(
        &self,
        req: &ReadStream,
        run: &Run,
        (v0, v1): (u64, u64),
        out: &mut Vec<RecordedEvent>,
    ) -> Result<()> {
        let shared = self.shared();
        let (p0, p1) = (run.position_of(v0), run.position_of(v1));
        let range = shared
            .log
            .range(layout::event_key(p0)..=layout::event_key(p1));
        let mut expect = match req.direction {
            Direction::Forwards => p0,
            Direction::Backwards => p1,
        };
        let mut take = |item: sled::Result<(IVec, IVec)>| -> Result<bool> {
            let (k, v) = item.map_err(sled_err)?;
            let e = shared.decode_event_kv(&k, v)?;
            let pos = e.position.get();
            if pos != expect
                || e.tenant != req.tenant
                || e.stream != req.stream
                || e.version.get() != run.first_version + (pos - run.first_position)
            {
                return Err(corrupt(
                    expect,
                    format!(
                        "stream index of {}/{} points to event {} (version {}) of {}/{}",
                        req.tenant, req.stream, pos, e.version, e.tenant, e.stream
                    ),
                ));
            }
            out.push(e);
            expect = match req.direction {
                Direction::Forwards => expect + 1,
                Direction::Backwards => expect.wrapping_sub(1),
            };
            Ok(out.len() >= req.limit)
        };
        let full = match req.direction {
            Direction::Forwards => range.map(&mut take).find(|r| !matches!(r, Ok(false))),
            Direction::Backwards => range.rev().map(&mut take).find(|r| !matches!(r, Ok(false))),
        };
        match full {
            Some(r) => r.map(drop),
            None => {
                let done = match req.direction {
                    Direction::Forwards => expect == p1 + 1,
                    Direction::Backwards => expect == p0.wrapping_sub(1),
                };
                if done {
                    Ok(())
                } else {
                    Err(corrupt(expect, "event missing from the log"))
                }
            }
        }
    }
}

impl Shared {
    pub(crate) fn poison_error(reason: &str) -> Error {
        Error::Backend {
            message: format!(
                "the sled event store stopped accepting calls after a failed write or sync \
                 ({reason}); reopen it"
            ),
            source: None,
        }
    }

    /// Decodes a stored event from its `E` key and value.
    pub(crate) fn decode_event_kv(&self, key: &[u8], value: IVec) -> Result<RecordedEvent> {
        let pos = layout::event_key_position(key)
            .ok_or_else(|| Error::corruption(None, "malformed event key"))?;
        let bytes = layout::get_value(&self.log, key, value).map_err(|d| corrupt(pos, d))?;
        let e = envelope::decode(bytes.as_ref()).map_err(|d| corrupt(pos, d.to_string()))?;
        if e.position.get() != pos {
            return Err(corrupt(
                pos,
                format!("the record stored here claims position {}", e.position),
            ));
        }
        Ok(e)
    }

    /// The event at `pos`, whether or not it is visible yet.
    pub(crate) fn read_event(&self, pos: u64) -> Result<Option<RecordedEvent>> {
        let key = layout::event_key(pos);
        match self.log.get(key).map_err(sled_err)? {
            Some(v) => self.decode_event_kv(&key, v).map(Some),
            None => Ok(None),
        }
    }

    /// Version of the stream with run prefix `prefix`, counting only runs at positions up to
    /// `cap`.
    pub(crate) fn stream_version_of(&self, prefix: &[u8], cap: u64) -> Result<u64> {
        for item in self.log.scan_prefix(prefix).rev() {
            let (k, v) = item.map_err(sled_err)?;
            let run = Run::decode(prefix.len(), &k, &v)
                .ok_or_else(|| Error::corruption(None, "malformed stream index entry"))?;
            if run.first_position <= cap {
                return Ok(run.last_version());
            }
        }
        Ok(0)
    }

    pub(crate) fn checkpoint_at(&self, key: &[u8]) -> Result<Option<Position>> {
        match self.projections.get(key).map_err(sled_err)? {
            None => Ok(None),
            Some(v) => layout::decode_u64(&v)
                .map(|p| Some(Position::new(p)))
                .ok_or_else(|| Error::corruption(None, "malformed checkpoint")),
        }
    }

    pub(crate) fn decode_snapshot(
        &self,
        key: &[u8],
        stored: IVec,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Snapshot> {
        let bad = |d: String| Error::corruption(None, format!("snapshot of {tenant}/{stream}: {d}"));
        let v = layout::get_value(&self.snapshots, key, stored).map_err(bad)?;
        let v = v.as_ref();
        if v.len() < 12 {
            return Err(bad("truncated header".into()));
        }
        let version = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
        let schema_version = u32::from_be_bytes(v[8..12].try_into().unwrap_or_default());
        Ok(Snapshot {
            tenant: tenant.clone(),
            stream: stream.clone(),
            version: Version::new(version),
            schema_version,
            payload: Bytes::copy_from_slice(&v[12..]),
        })
    }
}

pub(crate) fn check_namespace(i: usize, ns: &str) -> Result<()> {
    if ns.len() > MAX_NAMESPACE_LEN {
        return Err(Error::invalid(
            format!("writes[{i}].ns"),
            format!("is {} bytes long; at most {MAX_NAMESPACE_LEN} are allowed", ns.len()),
        ));
    }
    Ok(())
}

pub(crate) fn read_model_key(i: usize, ns: &str, key: &[u8]) -> Result<Vec<u8>> {
    check_namespace(i, ns)?;
    if key.len() > MAX_READ_MODEL_KEY_LEN {
        return Err(Error::invalid(
            format!("writes[{i}].key"),
            format!(
                "is {} bytes long; at most {MAX_READ_MODEL_KEY_LEN} are allowed",
                key.len()
            ),
        ));
    }
    let mut k = layout::namespace_prefix(ns);
    k.extend_from_slice(key);
    Ok(k)
}

#[async_trait]
impl EventStore for SledStore {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        validate_batch(&req.events)?;
        self.send(|reply| Request::Append { req, reply }).await
    }

    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.check()?;
        let mut out = Vec::new();
        if req.limit == 0 {
            return Ok(out);
        }
        let head = self.visible_head();
        let log = &self.shared().log;
        let prefix = layout::stream_prefix(req.tenant.as_str(), req.stream.as_str());
        let decode_run = |item: sled::Result<(IVec, IVec)>| -> Result<Run> {
            let (k, v) = item.map_err(sled_err)?;
            Run::decode(prefix.len(), &k, &v)
                .ok_or_else(|| Error::corruption(None, "malformed stream index entry"))
        };
        match req.direction {
            Direction::Forwards => {
                let from = req.from.map_or(1, |v| v.get().max(1));
                let from_key = layout::run_key(&prefix, from);
                // The run holding `from` is the last one starting at or before it.
                let start = match log.range(prefix.as_slice()..=from_key.as_slice()).next_back() {
                    Some(item) => item.map_err(sled_err)?.0.to_vec(),
                    None => from_key,
                };
                for item in log.range(start..) {
                    if let Ok((k, _)) = &item
                        && !k.starts_with(&prefix)
                    {
                        break;
                    }
                    let run = decode_run(item)?;
                    if run.first_position > head {
                        break;
                    }
                    if run.last_version() < from {
                        continue;
                    }
                    let v0 = from.max(run.first_version);
                    self.read_run(&req, &run, (v0, run.last_version()), &mut out)?;
                    if out.len() >= req.limit {
                        break;
                    }
                }
            }
            Direction::Backwards => {
                let from = req.from.map_or(u64::MAX, |v| v.get());
                let end = layout::run_key(&prefix, from);
                for item in log.range(prefix.as_slice()..=end.as_slice()).rev() {
                    let run = decode_run(item)?;
                    if run.first_position > head {
                        continue;
                    }
                    let v1 = from.min(run.last_version());
                    self.read_run(&req, &run, (run.first_version, v1), &mut out)?;
                    if out.len() >= req.limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.check()?;
        let head = self.visible_head();
        let from = req.from.get().max(1);
        let mut next = Position::new(head + 1).max(req.from);
        let mut events = Vec::new();
        if from <= head {
            let shared = self.shared();
            for item in shared
                .log
                .range(layout::event_key(from)..=layout::event_key(head))
            {
                let (k, v) = item.map_err(sled_err)?;
                if events.len() >= req.limit {
                    let pos = layout::event_key_position(&k)
                        .ok_or_else(|| Error::corruption(None, "malformed event key"))?;
                    next = Position::new(pos);
                    break;
                }
                let e = shared.decode_event_kv(&k, v)?;
                if req.filter.matches(&e) {
                    events.push(e);
                }
            }
        }
        Ok(AllPage { events, next })
    }

    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.check()?;
        let prefix = layout::stream_prefix(tenant.as_str(), stream.as_str());
        self.shared()
            .stream_version_of(&prefix, self.visible_head())
            .map(Version::new)
    }

    async fn get_event(&self, tenant: &TenantId, event_id: EventId) -> Result<Option<RecordedEvent>> {
        self.check()?;
        let shared = self.shared();
        let key = layout::id_key(tenant.as_str(), &event_id.to_bytes());
        let Some(v) = shared.log.get(key).map_err(sled_err)? else {
            return Ok(None);
        };
        let pos = layout::decode_u64(&v)
            .ok_or_else(|| Error::corruption(None, "malformed event-id index entry"))?;
        if pos > self.visible_head() {
            return Ok(None);
        }
        match shared.read_event(pos)? {
            Some(e) if e.tenant == *tenant && e.event_id == event_id => Ok(Some(e)),
            Some(e) => Err(corrupt(
                pos,
                format!("event-id index of {event_id} points to event {}", e.event_id),
            )),
            None => Err(corrupt(pos, "event-id index points to a missing event")),
        }
    }

    async fn head(&self) -> Result<Position> {
        self.check()?;
        Ok(Position::new(self.visible_head()))
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared().head_tx.subscribe()
    }
}

#[async_trait]
impl SnapshotStore for SledStore {
    async fn load_snapshot(&self, tenant: &TenantId, stream: &StreamId) -> Result<Option<Snapshot>> {
        self.check()?;
        let key = layout::snapshot_key(tenant.as_str(), stream.as_str());
        match self.shared().snapshots.get(&key).map_err(sled_err)? {
            Some(v) => self.shared().decode_snapshot(&key, v, tenant, stream).map(Some),
            None => Ok(None),
        }
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.send(|reply| Request::SaveSnapshot { snapshot, reply })
            .await
    }
}

#[async_trait]
impl CheckpointStore for SledStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        self.check()?;
        self.shared().checkpoint_at(&layout::checkpoint_key(name))
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        let name = name.to_owned();
        self.send(|reply| Request::SaveCheckpoint {
            name,
            position,
            reply,
        })
        .await
    }
}

#[async_trait]
impl ReadModelStore for SledStore {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.check()?;
        let k = read_model_key(0, ns, key)?;
        let tree = &self.shared().projections;
        match tree.get(&k).map_err(sled_err)? {
            None => Ok(None),
            Some(v) => layout::get_value(tree, &k, v)
                .map(|b| Some(Bytes::copy_from_slice(b.as_ref())))
                .map_err(|d| Error::corruption(None, format!("read model {ns:?}: {d}"))),
        }
    }

    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.check()?;
        check_namespace(0, ns)?;
        let tree = &self.shared().projections;
        let prefix = layout::namespace_prefix(ns);
        let mut start = prefix.clone();
        start.extend_from_slice(&range.start);
        let end = match &range.end {
            Some(e) => {
                let mut k = prefix.clone();
                k.extend_from_slice(e);
                k
            }
            None => prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]),
        };
        if limit == 0 || start >= end {
            return Ok(Vec::new());
        }
        let it = tree.range(start..end);
        let kv = |item: sled::Result<(IVec, IVec)>| -> Result<(Bytes, Bytes)> {
            let (k, v) = item.map_err(sled_err)?;
            let value = layout::get_value(tree, &k, v)
                .map_err(|d| Error::corruption(None, format!("read model {ns:?}: {d}")))?;
            Ok((
                Bytes::copy_from_slice(&k[prefix.len()..]),
                Bytes::copy_from_slice(value.as_ref()),
            ))
        };
        match direction {
            Direction::Forwards => it.take(limit).map(kv).collect(),
            Direction::Backwards => it.rev().take(limit).map(kv).collect(),
        }
    }

    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        self.send(|reply| Request::Commit { batch, reply }).await
    }
}
