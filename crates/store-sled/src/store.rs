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
use crate::writer::{Barrier, Request, Writer, sync_loop};

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
    /// `None` only while dropping.
    shared: Option<Arc<Shared>>,
    tx: Option<mpsc::UnboundedSender<Request>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    durability: Durability,
    /// Delete the directory on drop ([`SledStore::temporary`]).
    temporary: bool,
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
                    if fs2::FileExt::try_lock_exclusive(&f).is_ok() {
                        let _ = fs2::FileExt::unlock(&f);
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
    pub(crate) stats: Counters,
}

/// Write-path counters (see [`SledStats`]).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) appends: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) groups: AtomicU64,
    pub(crate) barriers: AtomicU64,
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
    /// Groups written by the writer thread (one sled batch each).
    pub groups: u64,
    /// Durability barriers run (`flush` + `fdatasync` with [`Durability::Fsync`]).
    pub barriers: u64,
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
            stats: Counters::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        // A rendezvous channel: the writer applies the next group while the current one is
        // being synced, but no further, so groups grow with the barrier time instead of
        // splitting into many small batches.
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel(0);
        let barrier_file = match barrier_file {
            Some(p) => File::open(p).map_err(io("opening the barrier file"))?,
            None => db_file,
        };
        let barrier = Barrier::new(opts.durability, barrier_file, path.join("blobs"));
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tracktrace-sled-sync".into())
                .spawn(move || sync_loop(shared, sync_rx, barrier))
                .map_err(io("starting the sync thread"))?
        };
        let writer = Writer {
            shared: shared.clone(),
            rx,
            next_position: head + 1,
            clock,
            sync_tx,
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

/// Decodes the encoded event found at `pos`.
fn decode_event(pos: u64, bytes: &[u8]) -> Result<RecordedEvent> {
    let e = envelope::decode(bytes).map_err(|d| corrupt(pos, d.to_string()))?;
    if e.position.get() != pos {
        return Err(corrupt(
            pos,
            format!("the record stored here claims position {}", e.position),
        ));
    }
    Ok(e)
}

impl Shared {
    /// Marks the store as failed (the first reason wins).
    pub(crate) fn poison(&self, reason: &str) {
        tracing::error!(%reason, "sled event store failed; every later call returns an error");
        let _ = self.poisoned.set(reason.to_owned());
    }

    pub(crate) fn poison_error(reason: &str) -> Error {
        Error::Backend {
            message: format!(
                "the sled event store stopped accepting calls after a failed write or sync \
                 ({reason}); reopen it"
            ),
            source: None,
        }
    }

    /// Loads the page stored under `key`; returns its first position and its bytes.
    fn load_page(&self, key: &[u8], value: IVec) -> Result<(u64, layout::ValueBytes)> {
        let first = layout::page_key_position(key)
            .ok_or_else(|| Error::corruption(None, "malformed page key"))?;
        let bytes = layout::get_value(&self.log, key, value).map_err(|d| corrupt(first, d))?;
        Ok((first, bytes))
    }

    /// The first page starting at or after `x` (and at or before `head`): its first position
    /// and the recorded-at of its first event. A forward lookup (reverse ones are slow in sled
    /// 0.34).
    fn page_from(&self, x: u64, head: u64) -> Result<Option<(u64, Timestamp)>> {
        let Some(item) = self
            .log
            .range(layout::page_key(x)..=layout::page_key(head))
            .next()
        else {
            return Ok(None);
        };
        let (k, v) = item.map_err(sled_err)?;
        let (first, bytes) = self.load_page(&k, v)?;
        let page = layout::Page::parse(bytes.as_ref()).map_err(|d| corrupt(first, d))?;
        if page.is_empty() {
            return Err(corrupt(first, "empty page"));
        }
        Ok(Some((
            first,
            decode_event(first, page.event(0))?.recorded_at,
        )))
    }

    /// The first position up to `head` recorded at or after `at` (`head + 1` if none).
    ///
    /// The single writer stamps events with a monotonic clock (recovered from the last event on
    /// open), so recorded-at never decreases along the log: a binary search over positions for
    /// the first *page* whose first event is recorded at or after `at` (each probe one forward
    /// lookup, O(log n) probes), then a walk of the page before it.
    pub(crate) fn position_at(&self, at: Timestamp, head: u64) -> Result<u64> {
        // Smallest x such that the first page starting at or after x is missing or starts with
        // an event recorded at or after `at` (monotone in x).
        let (mut lo, mut hi) = (1u64, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.page_from(mid, head)? {
                Some((_, t)) if t < at => lo = mid + 1,
                _ => hi = mid,
            }
        }
        if lo == 1 {
            return Ok(1);
        }
        // A page starts at lo - 1 (else the predicate would hold there too) with its first
        // event recorded before `at`; the answer is in it or is the next page's start.
        let next_page = self.page_from(lo, head)?.map_or(head + 1, |(p, _)| p);
        let mut found = next_page;
        self.walk(
            lo - 1,
            (next_page - 1).min(head),
            Direction::Forwards,
            Some(lo - 1),
            |pos, bytes| {
                if decode_event(pos, bytes)?.recorded_at >= at {
                    found = pos;
                    return Ok(true);
                }
                Ok(false)
            },
        )?;
        Ok(found)
    }

    /// The event an index entry points to, whether or not it is visible yet.
    pub(crate) fn read_event(&self, entry: layout::IndexEntry) -> Result<RecordedEvent> {
        let key = layout::page_key(entry.page);
        let missing = || corrupt(entry.position, "an index entry points to a missing event");
        let v = self.log.get(key).map_err(sled_err)?.ok_or_else(missing)?;
        let (first, bytes) = self.load_page(&key, v)?;
        let page = layout::Page::parse(bytes.as_ref()).map_err(|d| corrupt(first, d))?;
        let i = (entry.position - first) as usize;
        if i >= page.len() {
            return Err(missing());
        }
        decode_event(entry.position, page.event(i))
    }

    /// Calls `f` with each position from `p0` to `p1` (inclusive, `1 <= p0 <= p1`) and its
    /// encoded event, in `direction`, until `f` returns `true`. A position missing from the log
    /// is a corruption error. `first_page`, if known, is the key position of a page at or before
    /// the one holding `p0` (it saves a reverse lookup, which is slow in sled 0.34).
    pub(crate) fn walk(
        &self,
        p0: u64,
        p1: u64,
        direction: Direction,
        first_page: Option<u64>,
        mut f: impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let missing = |p: u64| corrupt(p, "event missing from the log");
        let parse = |item: sled::Result<(IVec, IVec)>| -> Result<(u64, layout::ValueBytes)> {
            let (k, v) = item.map_err(sled_err)?;
            self.load_page(&k, v)
        };
        match direction {
            Direction::Forwards => {
                let mut expect = p0;
                // Visits one page; `true` once the walk is over.
                let mut visit = |first: u64, bytes: &[u8], expect: &mut u64| -> Result<bool> {
                    let page = layout::Page::parse(bytes).map_err(|d| corrupt(first, d))?;
                    for i in 0..page.len() {
                        let pos = first + i as u64;
                        if pos < p0 {
                            continue;
                        }
                        if pos > p1 {
                            return Ok(true);
                        }
                        if pos != *expect {
                            return Err(missing(*expect));
                        }
                        *expect += 1;
                        if f(pos, page.event(i))? {
                            return Ok(true);
                        }
                    }
                    Ok(*expect > p1)
                };
                let start = match first_page {
                    // A point read of the known first page is much cheaper than an iterator
                    // (short runs, e.g. single-event appends, need nothing else).
                    Some(page) => {
                        let page = page.min(p0);
                        let key = layout::page_key(page);
                        match self.log.get(key).map_err(sled_err)? {
                            Some(v) => {
                                let (first, bytes) = self.load_page(&key, v)?;
                                if visit(first, bytes.as_ref(), &mut expect)? {
                                    return Ok(());
                                }
                                page + 1
                            }
                            None => page,
                        }
                    }
                    None => match self
                        .log
                        .range(layout::page_key(0)..=layout::page_key(p0))
                        .next_back()
                    {
                        Some(item) => parse(item)?.0,
                        None => p0,
                    },
                };
                for item in self
                    .log
                    .range(layout::page_key(start)..=layout::page_key(p1))
                {
                    let (first, bytes) = parse(item)?;
                    if visit(first, bytes.as_ref(), &mut expect)? {
                        return Ok(());
                    }
                }
                if expect == p1 + 1 {
                    Ok(())
                } else {
                    Err(missing(expect))
                }
            }
            Direction::Backwards => {
                let mut expect = p1;
                let low = first_page.unwrap_or(0).min(p0);
                for item in self
                    .log
                    .range(layout::page_key(low)..=layout::page_key(p1))
                    .rev()
                {
                    let (first, bytes) = parse(item)?;
                    let page =
                        layout::Page::parse(bytes.as_ref()).map_err(|d| corrupt(first, d))?;
                    for i in (0..page.len()).rev() {
                        let pos = first + i as u64;
                        if pos > p1 {
                            continue;
                        }
                        if pos < p0 {
                            return Ok(());
                        }
                        if pos != expect {
                            return Err(missing(expect));
                        }
                        expect -= 1;
                        if f(pos, page.event(i))? {
                            return Ok(());
                        }
                    }
                }
                if expect + 1 == p0 {
                    Ok(())
                } else {
                    Err(missing(expect))
                }
            }
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
        let bad =
            |d: String| Error::corruption(None, format!("snapshot of {tenant}/{stream}: {d}"));
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
            format!(
                "is {} bytes long; at most {MAX_NAMESPACE_LEN} are allowed",
                ns.len()
            ),
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
        Ok(AllPage { events, next })
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
                .read_all(ReadAll::from(Position::START, 10))
                .await
                .is_err()
        );
        assert!(store.stream_version(&t, &s).await.is_err());
        assert!(store.save_checkpoint("c", Position::new(1)).await.is_err());
        assert!(store.load_checkpoint("c").await.is_err());
    }
}
