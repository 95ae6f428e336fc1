//! [`SledStore`]: opening, and the trait implementations: writes go to the writer thread
//! (`writer.rs`), reads go straight to sled through the read path of the shared state
//! (`read.rs`).

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
    Snapshot, SnapshotStore, StoreStats, StreamId, TenantId, Timestamp, Version, prefix_end,
    validate_batch,
};

use crate::keys::{check_namespace, read_model_key};
use crate::layout::{self, Run};
use crate::options::{Durability, OpenError, SledOptions};
use crate::read::{corrupt, decode_event};
use crate::repair::{self, RepairError};
use crate::shared::{Counters, Shared, sled_err};
use crate::writer::{Barrier, Request, Syncing, Writer, sync_loop};

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
    /// `None` only while dropping.
    shared: Option<Arc<Shared>>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    durability: Durability,
    /// Delete the directory on drop ([`SledStore::temporary`]).
    temporary: bool,
    /// The free-space reserve ([`SledOptions::min_free_bytes`]) and the last look at it.
    reserve: u64,
    space: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            // The writer finishes the requests already queued, then stops the sync thread.
            let _ = w.join();
        }
        drop(self.shared.take());
        // sled's background threads may hold its locked `db` file a little longer than the
        // `Db`; wait (briefly) until it is released, so that a store dropped in this process
        // can be reopened right away.
        let db = self.path.join("db");
        for _ in 0..2000 {
            match File::open(&db) {
                Ok(f) => {
                    if f.try_lock().is_ok() {
                        let _ = f.unlock();
                        break;
                    }
                }
                Err(_) => break,
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.remove_if_temporary();
    }
}

impl Inner {
    fn remove_if_temporary(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Bytes of the file system holding `path` available to unprivileged users: `statvfs`'s
/// `f_bavail` blocks of `f_frsize` bytes (what `df` shows as available).
#[cfg(unix)]
fn available_space(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_frsize.saturating_mul(s.f_bavail))
}

/// Not read outside Unix: `SledStore::check_space` does not call it there.
#[cfg(not(unix))]
fn available_space(_: &Path) -> std::io::Result<u64> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Counters of a store's write path since it was opened, e.g. to watch group commit at work:
/// `appends / barriers` is the average number of appends sharing one durability barrier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SledStats {
    /// Appends written (duplicates and rejected appends excluded).
    pub appends: u64,
    /// Events written.
    pub events: u64,
    /// Groups written by the writer thread.
    pub groups: u64,
    /// Durability barriers run (`flush` + `fdatasync` with [`Durability::Fsync`]).
    pub barriers: u64,
    /// Events the open-time repair removed: the end of the log a crash left of appends that
    /// were never acknowledged (see [`crate::layout`]). 0 after a clean shutdown.
    pub repaired: u64,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.inner.path)
            .field("durability", &self.inner.durability)
            .field("head", &self.shared().head.load(Ordering::Relaxed))
            .finish()
    }
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
        Self::open_with(opts, None)
    }

    /// [`SledStore::open`], with the barrier syncing `barrier_file` instead of `db` (tests use
    /// a file whose sync fails).
    fn open_with(
        opts: SledOptions,
        barrier_file: Option<&Path>,
    ) -> std::result::Result<Self, OpenError> {
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
        // Remove what a crash left of unacknowledged appends before anything reads the log;
        // the flush (and fsync) below makes the repair durable before the writer starts.
        let repaired = repair::repair_tail(&log).map_err(|e| match e {
            RepairError::Sled(source) => OpenError::Sled {
                path: path.clone(),
                source,
            },
            RepairError::Damaged(position, detail) => OpenError::Corruption {
                path: path.clone(),
                position,
                detail,
            },
        })?;
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
            let first = layout::page_key_position(&k).ok_or_else(|| OpenError::Format {
                path: path.clone(),
                detail: "malformed page key".into(),
            })?;
            let damaged = |detail: String| OpenError::Corruption {
                path: path.clone(),
                position: first,
                detail,
            };
            let bytes = layout::get_value(&log, &k, v).map_err(damaged)?;
            let page = layout::Page::parse(bytes.as_ref()).map_err(damaged)?;
            head = first + page.len() as u64 - 1;
            // A damaged last event is reported when it is read; here it only costs clock
            // monotonicity across the restart.
            if let Ok(e) = envelope::decode(page.event(page.len() - 1)) {
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
            stats: Counters {
                repaired: AtomicU64::new(repaired),
                ..Counters::default()
            },
        });
        let (tx, rx) = mpsc::channel(opts.max_pending.max(1));
        // A rendezvous channel: the writer applies the next group while the current one is
        // being synced, but no further, so groups grow with the barrier time instead of
        // splitting into many small batches.
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel(0);
        let barrier_file = match barrier_file {
            Some(p) => File::open(p).map_err(io("opening the barrier file"))?,
            None => db_file,
        };
        let barrier = Barrier::new(opts.durability, barrier_file, path.join("blobs"));
        let syncing = Arc::new(Syncing::new(barrier));
        let syncer = {
            let shared = shared.clone();
            let syncing = syncing.clone();
            std::thread::Builder::new()
                .name("tracktrace-sled-sync".into())
                .spawn(move || sync_loop(shared, sync_rx, syncing))
                .map_err(io("starting the sync thread"))?
        };
        let writer = Writer {
            shared: shared.clone(),
            rx,
            next_position: head + 1,
            clock,
            sync_tx,
            syncing,
            syncer: Some(syncer),
            versions: Default::default(),
        };
        let writer = std::thread::Builder::new()
            .name("tracktrace-sled-writer".into())
            .spawn(move || writer.run())
            .map_err(io("starting the writer thread"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Some(shared),
                tx: Some(tx),
                writer: Some(writer),
                path,
                durability: opts.durability,
                temporary: false,
                reserve: opts.min_free_bytes,
                space: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Opens a fresh, empty store in a new directory under the system's temporary directory,
    /// deleted when the last clone is dropped. For tests and examples.
    pub fn temporary(durability: Durability) -> std::result::Result<Self, OpenError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!(
                "tracktrace-sled-{}-{n}-{nanos:x}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let store = Self::open(SledOptions::new(&path).durability(durability));
                    return match store {
                        Ok(mut store) => {
                            if let Some(inner) = Arc::get_mut(&mut store.inner) {
                                inner.temporary = true;
                            }
                            Ok(store)
                        }
                        Err(e) => {
                            let _ = std::fs::remove_dir_all(&path);
                            Err(e)
                        }
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(OpenError::Io {
                        path,
                        what: "creating a temporary directory",
                        source,
                    });
                }
            }
        }
    }

    /// Opens the store in `path` with the default options ([`Durability::Fsync`]).
    pub fn open_path(path: impl AsRef<Path>) -> std::result::Result<Self, OpenError> {
        Self::open(SledOptions::new(path))
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Write-path counters since the store was opened.
    pub fn stats(&self) -> SledStats {
        let c = &self.shared().stats;
        SledStats {
            appends: c.appends.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            groups: c.groups.load(Ordering::Relaxed),
            barriers: c.barriers.load(Ordering::Relaxed),
            repaired: c.repaired.load(Ordering::Relaxed),
        }
    }

    /// The durability mode the store was opened with.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    fn shared(&self) -> &Shared {
        self.inner
            .shared
            .as_deref()
            .expect("only taken while the last handle is dropped")
    }

    fn check(&self) -> Result<()> {
        match self.shared().poisoned.get() {
            Some(reason) => Err(Shared::poison_error(reason)),
            None => Ok(()),
        }
    }

    /// `StorageFull` when the store's file system has less free space than the reserve
    /// (looked at most every 100 ms; a failed look lets the write through; Unix only).
    fn check_space(&self) -> Result<()> {
        let reserve = self.inner.reserve;
        if reserve == 0 || cfg!(not(unix)) {
            return Ok(());
        }
        let mut space = self.inner.space.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let free = match *space {
            Some((at, free)) if now.duration_since(at) < std::time::Duration::from_millis(100) => {
                free
            }
            _ => match available_space(&self.inner.path) {
                Ok(free) => {
                    *space = Some((now, free));
                    free
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the free space of the store's file system");
                    return Ok(());
                }
            },
        };
        if free < reserve {
            return Err(Error::StorageFull {
                reason: format!(
                    "{} has {} MiB free, less than the reserve of {} MiB",
                    self.inner.path.display(),
                    free / (1024 * 1024),
                    reserve / (1024 * 1024)
                ),
            });
        }
        Ok(())
    }

    fn visible_head(&self) -> u64 {
        self.shared().head.load(Ordering::Acquire)
    }

    async fn send<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request) -> Result<T> {
        self.check()?;
        self.check_space()?;
        let (tx, rx) = oneshot::channel();
        let closed = || Error::Unavailable {
            reason: "the sled writer thread stopped".into(),
            retry_after: None,
            source: None,
        };
        match self
            .inner
            .tx
            .as_ref()
            .ok_or_else(closed)?
            .try_send(make(tx))
        {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Error::Overloaded {
                    reason: "the sled writer queue is full".into(),
                    retry_after: std::time::Duration::from_millis(100),
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
        }
        rx.await.map_err(|_| closed())?
    }

    /// Reads the events of one run between versions `v0` and `v1` (inclusive), in the request's
    /// direction, into `out` until it holds `req.limit` events.
    fn read_run(
        &self,
        req: &ReadStream,
        run: &Run,
        (v0, v1): (u64, u64),
        out: &mut Vec<RecordedEvent>,
    ) -> Result<()> {
        let (p0, p1) = (run.position_of(v0), run.position_of(v1));
        self.shared()
            .walk(p0, p1, req.direction, Some(run.first_page), |pos, bytes| {
                let e = decode_event(pos, bytes)?;
                if e.tenant != req.tenant
                    || e.stream != req.stream
                    || e.version.get() != run.first_version + (pos - run.first_position)
                {
                    return Err(corrupt(
                        pos,
                        format!(
                            "the stream index of {}/{} points to version {} of {}/{}",
                            req.tenant, req.stream, e.version, e.tenant, e.stream
                        ),
                    ));
                }
                out.push(e);
                Ok(out.len() >= req.limit)
            })
    }
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
                let start = match log
                    .range(prefix.as_slice()..=from_key.as_slice())
                    .next_back()
                {
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
        if req.limit == 0 {
            next = next.min(Position::new(from));
        } else if from <= head {
            // Positions are contiguous, so the page ends right after the last event considered
            // (no need to look at the next one).
            self.shared()
                .walk(from, head, Direction::Forwards, None, |pos, bytes| {
                    // Filtered reads (a tenant's registry, one event type) skip most events:
                    // look at their head before decoding them.
                    if !req.filter.is_empty() {
                        let h = envelope::peek(bytes).map_err(|d| corrupt(pos, d.to_string()))?;
                        if !req.filter.matches_head(h.tenant, h.stream, h.event_type) {
                            return Ok(false);
                        }
                    }
                    let e = decode_event(pos, bytes)?;
                    events.push(e);
                    if events.len() >= req.limit {
                        next = Position::new(pos + 1);
                        return Ok(true);
                    }
                    Ok(false)
                })?;
        }
        Ok(AllPage::new(events, next))
    }

    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.check()?;
        let prefix = layout::stream_prefix(tenant.as_str(), stream.as_str());
        self.shared()
            .stream_version_of(&prefix, self.visible_head())
            .map(Version::new)
    }

    async fn get_event(
        &self,
        tenant: &TenantId,
        event_id: EventId,
    ) -> Result<Option<RecordedEvent>> {
        self.check()?;
        let shared = self.shared();
        let key = layout::id_key(tenant.as_str(), &event_id.to_bytes());
        let Some(v) = shared.log.get(key).map_err(sled_err)? else {
            return Ok(None);
        };
        let entry = layout::IndexEntry::decode(&v)
            .ok_or_else(|| Error::corruption(None, "malformed event-id index entry"))?;
        if entry.position > self.visible_head() {
            return Ok(None);
        }
        let e = shared.read_event(entry)?;
        if e.tenant != *tenant || e.event_id != event_id {
            return Err(corrupt(
                entry.position,
                format!(
                    "the event-id index of {event_id} points to event {}",
                    e.event_id
                ),
            ));
        }
        Ok(Some(e))
    }

    async fn head(&self) -> Result<Position> {
        self.check()?;
        Ok(Position::new(self.visible_head()))
    }

    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.check()?;
        self.shared()
            .position_at(at, self.visible_head())
            .map(Position::new)
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared().head_tx.subscribe()
    }

    /// `events`: the visible head, exact because the writer assigns contiguous positions from
    /// 1 and nothing is ever removed from the log (recovered on open from the last page, like
    /// the head). `bytes`: sled's files (`db` and any blob files: every tree, read models and
    /// snapshots included; [`sled::Db::size_on_disk`], a few `stat`s).
    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        self.check()?;
        let bytes = self.shared().db.size_on_disk().map_err(sled_err)?;
        Ok(Some(StoreStats::new(self.visible_head(), bytes)))
    }
}

#[async_trait]
impl SnapshotStore for SledStore {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.check()?;
        let key = layout::snapshot_key(tenant.as_str(), stream.as_str());
        match self.shared().snapshots.get(&key).map_err(sled_err)? {
            Some(v) => self
                .shared()
                .decode_snapshot(&key, v, tenant, stream)
                .map(Some),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracktrace_core::{EventStoreExt, ExpectedVersion, NewEvent};

    #[tokio::test]
    async fn a_failed_barrier_poisons_the_store() {
        let dir = tempfile::tempdir().unwrap();
        // fdatasync of /dev/null fails with EINVAL: the barrier fails like a dying disk would.
        let store =
            SledStore::open_with(SledOptions::new(dir.path()), Some(Path::new("/dev/null")))
                .unwrap();
        let t = TenantId::parse("t").unwrap();
        let s = StreamId::parse("s").unwrap();
        let ev = || NewEvent::new("E", "text/plain", &b"x"[..]);
        let err = store
            .append_to(&t, &s, ExpectedVersion::Any, vec![ev()])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Backend { message, .. } if message.contains("fdatasync")),
            "{err:?}"
        );
        // Nothing was published, and every later call fails.
        assert_eq!(store.watch_head().borrow().get(), 0);
        assert!(
            store
                .append_to(&t, &s, ExpectedVersion::Any, vec![ev()])
                .await
                .is_err()
        );
        assert!(store.head().await.is_err());
        assert!(
            store
                .read_all(ReadAll::starting_at(Position::START, 10))
                .await
                .is_err()
        );
        assert!(store.stream_version(&t, &s).await.is_err());
        assert!(store.save_checkpoint("c", Position::new(1)).await.is_err());
        assert!(store.load_checkpoint("c").await.is_err());
    }
}
