//! The conformance suite has teeth: it fails against deliberately broken stores.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracktrace_conformance::store::{self as conformance, CheckResult};
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, Error, EventId, EventRef,
    EventStore, ExpectedVersion, InMemoryStore, NewEvent, Position, ReadAll, ReadModelBatch,
    ReadModelStore, ReadModelWrite, ReadStream, RecordedEvent, Result, Snapshot, SnapshotStore,
    StoreStats, StreamId, TenantId, Timestamp, Version, limits,
};

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// No fault: the wrapper just delegates.
    None,
    /// Appends as if every expected version were `Any`.
    IgnoreExpectedVersion,
    /// Swaps the first two events of every `read_all` page.
    ReorderReadAll,
    /// Drops every event whose position is 3 modulo 5 from `read_all` pages.
    DropFromReadAll,
    /// Gives every appended event a fresh id and no dedup key, so duplicates get stored.
    LetDuplicatesThrough,
    /// `position_at` answers one position too late (skips the window's first event).
    PositionAtTooLate,
    /// `position_at` answers the start of the log (correct but a full scan for readers).
    PositionAtAlwaysStart,
    /// `store_stats` counts the events of every append call, rejected and duplicate ones too.
    StatsCountAttempts,
    /// `store_stats` answers what the store held at the previous call (a stale cache).
    StatsStale,
    /// Keys streams by tenant and stream concatenated without a separator.
    ConcatenatedKeys,
    /// A tenant filter matches every tenant whose id starts with it.
    TenantFilterByPrefix,
    /// A stream prefix is matched as a SQL LIKE pattern (`_`, `%`).
    StreamPrefixAsLike,
    /// Dedup keys are cut to 64 bytes.
    DedupKeysCutAt64,
    /// Expected versions and read starts are taken modulo 2^32.
    Versions32Bit,
    /// `read_all` returns events without their metadata.
    ReadAllDropsMetadata,
    /// Header values are cut to 255 bytes on every read.
    HeaderValuesCutAt255,
    /// Header names are stored lower-cased.
    HeaderNamesLowerCased,
    /// Reads cap at 256 events whatever the limit.
    ReadsCappedAt256,
    /// A batch is written one event at a time.
    BatchesWrittenPiecemeal,
    /// Duplicate references come back sorted by position, not in request order.
    DuplicateRefsSorted,
    /// `Error::Duplicate` names the batch's first event.
    DuplicateNamesFirstEvent,
    /// Dedup keys are checked, then written, without holding anything in between.
    DedupCheckThenAct,
    /// Batches over `MAX_BATCH_BYTES` are split instead of rejected.
    BatchBytesUnenforced,
    /// Invalid metadata strings are dropped or cut instead of rejected.
    MetadataUnchecked,
    /// `position_at` past the end answers a position far beyond the head.
    PositionAtPastEndTooFar,
    /// `watch_head` carries positions above the head.
    WatchHeadAhead,
    /// `recorded_at` of odd positions reads 50 ms late.
    RecordedAtJitter,
    /// A read-model commit expecting no checkpoint is never fenced.
    ReadModelNoneUnfenced,
    /// A read-model batch applies its puts before its deletes and clears.
    ReadModelWritesReordered,
    /// A snapshot at the stored version is ignored.
    SnapshotSameVersionKept,
    /// `read_stream` backwards ignores its start version.
    BackwardsIgnoresFrom,
}

/// How a read reached the store (faults that affect one read path only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Stream,
    All,
    Get,
}

/// The key suffix `DedupCheckThenAct` stores keys under (so the inner store does not dedup).
const RACY_SUFFIX: &str = "#~";

/// A LIKE match of `pattern` (with `_` and `%`) against the start of `s`.
fn like_prefix(pattern: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => true, // a prefix: the rest of `s` is free
            Some(('%', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some(('_', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

fn short_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

struct Broken {
    inner: InMemoryStore,
    fault: Fault,
    /// Events of every append call (`StatsCountAttempts`).
    attempted: AtomicU64,
    /// The previous answer of the inner store (`StatsStale`).
    previous: Mutex<Option<StoreStats>>,
    /// Dedup keys seen by `DedupCheckThenAct`.
    racy_keys: Mutex<HashMap<(TenantId, String), EventRef>>,
    /// The forwarding channel of `WatchHeadAhead`.
    watch: Mutex<Option<watch::Receiver<Position>>>,
}

impl Broken {
    /// Where `ConcatenatedKeys` keeps `(tenant, stream)`: `ab`/`c-1` and `a`/`bc-1` collide.
    fn key(&self, tenant: &TenantId, stream: &StreamId) -> (TenantId, StreamId) {
        if !matches!(self.fault, Fault::ConcatenatedKeys) {
            return (tenant.clone(), stream.clone());
        }
        let t = tenant.as_str();
        (
            TenantId::parse(&t[..1]).unwrap(),
            StreamId::parse(format!("{}{}", &t[1..], stream.as_str())).unwrap(),
        )
    }

    fn fix_read(&self, e: &mut RecordedEvent, path: Path) {
        match self.fault {
            Fault::ReadAllDropsMetadata if path == Path::All => {
                e.metadata = Default::default();
            }
            Fault::HeaderValuesCutAt255 => {
                for v in e.metadata.headers.values_mut() {
                    *v = cut(v, 255);
                }
            }
            Fault::RecordedAtJitter if e.position.get() % 2 == 1 => {
                e.recorded_at = Timestamp::from_unix_micros(e.recorded_at.unix_micros() + 50_000);
            }
            Fault::DedupCheckThenAct => {
                if let Some(k) = &mut e.dedup_key
                    && let Some(i) = k.find(RACY_SUFFIX)
                {
                    k.truncate(i);
                }
            }
            _ => {}
        }
    }

    fn fix_new(&self, e: &mut NewEvent) {
        use limits::*;
        match self.fault {
            Fault::DedupKeysCutAt64 => {
                if let Some(k) = &mut e.dedup_key {
                    *k = cut(k, 64);
                }
            }
            Fault::HeaderNamesLowerCased => {
                let headers = std::mem::take(&mut e.metadata.headers);
                e.metadata.headers = headers
                    .into_iter()
                    .map(|(k, v)| (k.to_lowercase(), v))
                    .collect();
            }
            Fault::MetadataUnchecked => {
                let m = &mut e.metadata;
                m.correlation_id = m
                    .correlation_id
                    .take()
                    .filter(|c| short_ok(c, MAX_SHORT_STRING_LEN));
                m.causation_id = m
                    .causation_id
                    .take()
                    .filter(|c| short_ok(c, MAX_SHORT_STRING_LEN));
                m.headers.retain(|k, v| {
                    short_ok(k, MAX_SHORT_STRING_LEN)
                        && v.len() <= MAX_HEADER_VALUE_LEN
                        && !v.contains('\0')
                });
                while m.headers.len() > MAX_HEADERS {
                    m.headers.pop_last();
                }
                e.dedup_key = e
                    .dedup_key
                    .take()
                    .filter(|k| short_ok(k, MAX_SHORT_STRING_LEN));
                if !short_ok(&e.event_type, MAX_EVENT_TYPE_LEN) {
                    e.event_type = "X".into();
                }
                if !short_ok(&e.content_type, MAX_SHORT_STRING_LEN) {
                    e.content_type = "x".into();
                }
                if e.payload.len() > MAX_PAYLOAD_BYTES {
                    e.payload = e.payload.slice(..MAX_PAYLOAD_BYTES);
                }
                e.schema_version = e.schema_version.clamp(1, MAX_SCHEMA_VERSION);
            }
            _ => {}
        }
    }

    /// Appends `req` as several appends (the first with the precondition, the rest `Any`).
    async fn append_in_pieces(
        &self,
        req: AppendRequest,
        pieces: Vec<Vec<NewEvent>>,
        pause: Duration,
    ) -> Result<AppendOutcome> {
        let mut out = AppendOutcome::new(Vec::new(), true);
        for (i, events) in pieces.into_iter().enumerate() {
            let expected = if i == 0 {
                req.expected
            } else {
                ExpectedVersion::Any
            };
            let part = self
                .inner
                .append(AppendRequest::new(
                    req.tenant.clone(),
                    req.stream.clone(),
                    expected,
                    events,
                ))
                .await?;
            out.duplicate &= part.duplicate;
            out.events.extend(part.events);
            tokio::time::sleep(pause).await;
        }
        Ok(out)
    }

    /// `DedupCheckThenAct`: a single keyed event checked against the keys seen, a pause, then
    /// written under a unique key (so the inner store cannot catch the race).
    async fn racy_append(&self, mut req: AppendRequest) -> Result<AppendOutcome> {
        let key = req.events[0].dedup_key.clone().unwrap();
        let seen = self
            .racy_keys
            .lock()
            .unwrap()
            .get(&(req.tenant.clone(), key.clone()))
            .cloned();
        if let Some(r) = seen {
            return Ok(AppendOutcome::new(vec![r], true));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let unique = format!("{key}{RACY_SUFFIX}{}", req.events[0].event_id);
        req.events[0].dedup_key = Some(unique);
        let tenant = req.tenant.clone();
        let out = self.inner.append(req).await?;
        self.racy_keys
            .lock()
            .unwrap()
            .insert((tenant, key), out.events[0].clone());
        Ok(out)
    }

    /// A read of the log that keeps the events `keep` accepts (for filters the fault matches
    /// differently), paging through the inner store.
    async fn read_all_keeping(
        &self,
        req: &ReadAll,
        keep: impl Fn(&RecordedEvent) -> bool,
    ) -> Result<AllPage> {
        let mut events = Vec::new();
        let mut from = req.from;
        let step = req.limit.clamp(1, 1000);
        loop {
            let page = self
                .inner
                .read_all(ReadAll::starting_at(from, step))
                .await?;
            let short = page.events.len() < step;
            for e in page.events {
                if keep(&e) {
                    let next = e.position.next();
                    events.push(e);
                    if events.len() == req.limit {
                        return Ok(AllPage::new(events, next));
                    }
                }
            }
            from = page.next;
            if short {
                return Ok(AllPage::new(events, from));
            }
        }
    }
}

#[async_trait]
impl Intercept for Broken {
    type Inner = InMemoryStore;

    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }

    async fn append(&self, mut req: AppendRequest) -> Result<AppendOutcome> {
        self.attempted
            .fetch_add(req.events.len() as u64, Ordering::SeqCst);
        let (tenant, stream) = (req.tenant.clone(), req.stream.clone());
        (req.tenant, req.stream) = self.key(&tenant, &stream);
        for e in &mut req.events {
            self.fix_new(e);
        }
        let first_id = req.events.first().map(|e| e.event_id);
        match self.fault {
            Fault::IgnoreExpectedVersion => req.expected = ExpectedVersion::Any,
            Fault::LetDuplicatesThrough => {
                for e in &mut req.events {
                    e.event_id = EventId::new();
                    e.dedup_key = None;
                }
            }
            Fault::Versions32Bit => {
                if let ExpectedVersion::Exact(v) = req.expected {
                    req.expected = ExpectedVersion::Exact(Version::new(v.get() & 0xffff_ffff));
                }
            }
            Fault::BatchesWrittenPiecemeal if req.events.len() > 1 => {
                let pieces = req.events.iter().map(|e| vec![e.clone()]).collect();
                return self
                    .append_in_pieces(req, pieces, Duration::from_millis(2))
                    .await;
            }
            Fault::BatchBytesUnenforced
                if req.events.len() > 1
                    && req.events.iter().map(|e| e.payload.len()).sum::<usize>()
                        > limits::MAX_BATCH_BYTES =>
            {
                let mut rest = req.events.clone();
                let first = rest.drain(..rest.len() / 2).collect();
                return self
                    .append_in_pieces(req, vec![first, rest], Duration::ZERO)
                    .await;
            }
            Fault::DedupCheckThenAct
                if req.events.len() == 1 && req.events[0].dedup_key.is_some() =>
            {
                return self.racy_append(req).await;
            }
            _ => {}
        }
        let mut r = self.inner.append(req).await;
        match (&mut r, self.fault) {
            (Ok(out), Fault::DuplicateRefsSorted) if out.duplicate => {
                out.events.sort_by_key(|r| r.position);
            }
            (Err(Error::Duplicate { event_id, .. }), Fault::DuplicateNamesFirstEvent) => {
                *event_id = first_id.unwrap();
            }
            (Ok(out), Fault::ConcatenatedKeys) => {
                for r in &mut out.events {
                    r.stream = stream.clone();
                }
            }
            _ => {}
        }
        r
    }

    async fn read_stream(&self, mut req: ReadStream) -> Result<Vec<RecordedEvent>> {
        let (tenant, stream) = (req.tenant.clone(), req.stream.clone());
        (req.tenant, req.stream) = self.key(&tenant, &stream);
        match self.fault {
            Fault::Versions32Bit => {
                req.from = req.from.map(|v| Version::new(v.get() & 0xffff_ffff));
            }
            Fault::ReadsCappedAt256 => req.limit = req.limit.min(256),
            Fault::BackwardsIgnoresFrom if req.direction == Direction::Backwards => req.from = None,
            _ => {}
        }
        let mut events = self.inner.read_stream(req).await?;
        for e in &mut events {
            self.fix_read(e, Path::Stream);
            if matches!(self.fault, Fault::ConcatenatedKeys) {
                (e.tenant, e.stream) = (tenant.clone(), stream.clone());
            }
        }
        Ok(events)
    }

    async fn read_all(&self, mut req: ReadAll) -> Result<AllPage> {
        let mut page = match self.fault {
            Fault::TenantFilterByPrefix if req.filter.tenant.is_some() => {
                let tenant = req.filter.tenant.take().unwrap();
                let rest = req.filter.clone();
                self.read_all_keeping(&req, |e| {
                    e.tenant.as_str().starts_with(tenant.as_str()) && rest.matches(e)
                })
                .await?
            }
            Fault::StreamPrefixAsLike if req.filter.stream_prefix.is_some() => {
                let prefix = req.filter.stream_prefix.take().unwrap();
                let rest = req.filter.clone();
                self.read_all_keeping(&req, |e| {
                    like_prefix(&prefix, e.stream.as_str()) && rest.matches(e)
                })
                .await?
            }
            _ => {
                match self.fault {
                    Fault::Versions32Bit => req.from = Position::new(req.from.get() & 0xffff_ffff),
                    Fault::ReadsCappedAt256 => req.limit = req.limit.min(256),
                    _ => {}
                }
                self.inner.read_all(req).await?
            }
        };
        match self.fault {
            Fault::ReorderReadAll if page.events.len() >= 2 => page.events.swap(0, 1),
            Fault::DropFromReadAll => page.events.retain(|e| e.position.get() % 5 != 3),
            _ => {}
        }
        for e in &mut page.events {
            self.fix_read(e, Path::All);
        }
        Ok(page)
    }

    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        let (tenant, stream) = self.key(tenant, stream);
        self.inner.stream_version(&tenant, &stream).await
    }

    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        let mut e = self.inner.get_event(tenant, id).await?;
        if let Some(e) = &mut e {
            self.fix_read(e, Path::Get);
        }
        Ok(e)
    }

    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        let p = self.inner.position_at(at).await?;
        Ok(match self.fault {
            Fault::PositionAtTooLate => p.next(),
            Fault::PositionAtAlwaysStart => Position::START,
            Fault::PositionAtPastEndTooFar if p > self.inner.head().await? => {
                Position::new(p.get() + 1000)
            }
            _ => p,
        })
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        if !matches!(self.fault, Fault::WatchHeadAhead) {
            return self.inner.watch_head();
        }
        let mut slot = self.watch.lock().unwrap();
        slot.get_or_insert_with(|| {
            let mut inner = self.inner.watch_head();
            let (tx, rx) = watch::channel(Position::new(inner.borrow().get() + 1000));
            tokio::spawn(async move {
                while inner.changed().await.is_ok() {
                    let p = Position::new(inner.borrow().get() + 1000);
                    if tx.send(p).is_err() {
                        break;
                    }
                }
            });
            rx
        })
        .clone()
    }

    async fn store_stats(&self) -> Result<Option<StoreStats>> {
        let stats = self.inner.store_stats().await?;
        Ok(match self.fault {
            Fault::StatsCountAttempts => {
                stats.map(|s| StoreStats::new(self.attempted.load(Ordering::SeqCst), s.bytes))
            }
            Fault::StatsStale => {
                let mut previous = self.previous.lock().unwrap();
                std::mem::replace(&mut *previous, stats).or(stats)
            }
            _ => stats,
        })
    }

    async fn commit(&self, mut batch: ReadModelBatch) -> Result<()> {
        match self.fault {
            Fault::ReadModelNoneUnfenced if batch.expected_checkpoint.is_none() => {
                batch.expected_checkpoint = self.inner.load_checkpoint(&batch.checkpoint).await?;
            }
            Fault::ReadModelWritesReordered => {
                batch
                    .writes
                    .sort_by_key(|w| !matches!(w, ReadModelWrite::Put { .. }));
            }
            _ => {}
        }
        self.inner.commit(batch).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        if matches!(self.fault, Fault::SnapshotSameVersionKept)
            && let Some(stored) = self
                .inner
                .load_snapshot(&snapshot.tenant, &snapshot.stream)
                .await?
            && stored.version == snapshot.version
        {
            return Ok(());
        }
        self.inner.save_snapshot(snapshot).await
    }
}

/// A [`Broken`] as a store.
type BrokenStore = Intercepted<Broken>;

fn broken_store(fault: Fault) -> Arc<BrokenStore> {
    Arc::new(Intercepted(Broken {
        inner: InMemoryStore::new(),
        fault,
        attempted: AtomicU64::new(0),
        previous: Mutex::new(None),
        racy_keys: Mutex::new(HashMap::new()),
        watch: Mutex::new(None),
    }))
}

fn broken(fault: Fault) -> Arc<dyn EventStore> {
    broken_store(fault)
}

/// `must_fail!(fault, check)`: runs `conformance::check` against a store with `fault` and
/// asserts it fails.
macro_rules! must_fail {
    ($fault:expr, $check:ident) => {
        must_fail($fault, stringify!($check), |s: Arc<BrokenStore>| {
            conformance::$check(s as Arc<dyn EventStore>)
        })
    };
}

/// `must_fail_rm!(fault, check)`: the same for a read-model check.
macro_rules! must_fail_rm {
    ($fault:expr, $check:ident) => {
        must_fail($fault, stringify!($check), |s: Arc<BrokenStore>| {
            conformance::$check(s as Arc<dyn ReadModelStore>)
        })
    };
}

/// `must_fail_snap!(fault, check)`: the same for a snapshot check.
macro_rules! must_fail_snap {
    ($fault:expr, $check:ident) => {
        must_fail($fault, stringify!($check), |s: Arc<BrokenStore>| {
            conformance::$check(s as Arc<dyn SnapshotStore>)
        })
    };
}

/// Runs `check` against a store with `fault` and asserts it fails.
fn must_fail<S, F, Fut>(fault: Fault, name: &str, check: F)
where
    Arc<BrokenStore>: Into<S>,
    F: FnOnce(S) -> Fut,
    Fut: std::future::Future<Output = CheckResult>,
{
    let r = conformance::run(check(broken_store(fault).into()));
    let Err(failure) = r else {
        panic!("check `{name}` passed against a store with fault {fault:?}");
    };
    eprintln!("{fault:?} / {name}: caught: {failure}");
}

fn model_must_fail(fault: Fault) {
    let r = conformance::model_test(|| async move { broken(fault) }, 64);
    let Err(failure) = r else {
        panic!("the model-based test passed against a store with fault {fault:?}");
    };
    eprintln!(
        "{fault:?} / model: caught: {}",
        failure.0.lines().next().unwrap_or("")
    );
}

#[test]
fn the_wrapper_without_a_fault_passes() {
    // Guards against the wrapper itself being what fails the checks below.
    let store = broken(Fault::None);
    conformance::run(conformance::concurrent_writers_with_subscriber(store)).unwrap();
    conformance::run(conformance::read_all_order_and_filters(broken(Fault::None))).unwrap();
    conformance::run(conformance::idempotent_by_event_id(broken(Fault::None))).unwrap();
    conformance::run(conformance::expected_version_exact(broken(Fault::None))).unwrap();
    conformance::run(conformance::position_at_finds_window_starts(broken(
        Fault::None,
    )))
    .unwrap();
    conformance::run(conformance::store_stats_count_events(broken(Fault::None))).unwrap();
    conformance::model_test(|| async { broken(Fault::None) }, 16).unwrap();
}

#[test]
fn ignoring_the_expected_version_is_caught() {
    let f = Fault::IgnoreExpectedVersion;
    must_fail!(f, expected_version_no_stream);
    must_fail!(f, expected_version_exact);
    must_fail!(f, expected_version_stream_exists);
    must_fail!(f, atomic_batches);
    must_fail!(f, concurrent_exact_appends);
    model_must_fail(f);
}

#[test]
fn reordering_read_all_is_caught() {
    let f = Fault::ReorderReadAll;
    must_fail!(f, read_all_order_and_filters);
    must_fail!(f, concurrent_writers_with_subscriber);
    must_fail!(f, subscription_catch_up_then_live);
    model_must_fail(f);
}

#[test]
fn dropping_from_read_all_is_caught() {
    let f = Fault::DropFromReadAll;
    must_fail!(f, read_all_order_and_filters);
    must_fail!(f, concurrent_writers_with_subscriber);
    must_fail!(f, subscription_catch_up_then_live);
    model_must_fail(f);
}

#[test]
fn letting_duplicates_through_is_caught() {
    let f = Fault::LetDuplicatesThrough;
    must_fail!(f, idempotent_by_event_id);
    must_fail!(f, idempotent_by_dedup_key);
    must_fail!(f, partial_duplicate_batch_rejected);
    model_must_fail(f);
}

#[test]
fn a_wrong_position_at_is_caught() {
    must_fail!(Fault::PositionAtTooLate, position_at_finds_window_starts);
    must_fail!(
        Fault::PositionAtAlwaysStart,
        position_at_finds_window_starts
    );
}

#[test]
fn wrong_store_stats_are_caught() {
    must_fail!(Fault::StatsCountAttempts, store_stats_count_events);
    must_fail!(Fault::StatsStale, store_stats_count_events);
}

#[test]
fn the_wrapper_without_a_fault_passes_the_extended_checks() {
    // The wrapper's fault-free paths (key mapping, read fix-ups) pass every new check.
    let f = Fault::None;
    let ok = |name: &str, r: CheckResult| {
        if let Err(e) = r {
            panic!("{name} failed without a fault: {e}");
        }
    };
    macro_rules! pass {
        ($check:ident) => {
            ok(
                stringify!($check),
                conformance::run(conformance::$check(broken(f))),
            )
        };
    }
    pass!(stream_keys_do_not_collide);
    pass!(tenant_filter_is_exact);
    pass!(stream_prefix_is_literal);
    pass!(dedup_keys_compared_in_full);
    pass!(versions_are_64_bit);
    pass!(full_events_on_every_read_path);
    pass!(long_streams_read_in_full);
    pass!(batches_become_visible_whole);
    pass!(duplicate_refs_in_request_order);
    pass!(duplicate_error_names_the_stored_event);
    pass!(racing_dedup_keys_store_one);
    pass!(limits_enforced_at_the_bounds);
    pass!(position_at_past_the_end);
    pass!(watch_head_carries_the_head);
    pass!(recorded_at_consistent_under_concurrency);
    pass!(recorded_at_never_decreases);
    pass!(paged_reads_match_full_reads);
    let rm = || broken_store(f) as Arc<dyn ReadModelStore>;
    ok(
        "rm none",
        conformance::run(conformance::read_model_commit_none_is_fenced(rm())),
    );
    ok(
        "rm order",
        conformance::run(conformance::read_model_writes_apply_in_order(rm())),
    );
    ok("rm", conformance::run(conformance::read_model_store(rm())));
    let snap = broken_store(f) as Arc<dyn SnapshotStore>;
    ok(
        "snap",
        conformance::run(conformance::snapshot_same_version_replaces(snap)),
    );
}

#[test]
fn colliding_identifiers_are_caught() {
    must_fail!(Fault::ConcatenatedKeys, stream_keys_do_not_collide);
    must_fail!(Fault::TenantFilterByPrefix, tenant_filter_is_exact);
    must_fail!(Fault::StreamPrefixAsLike, stream_prefix_is_literal);
    must_fail!(Fault::DedupKeysCutAt64, dedup_keys_compared_in_full);
    must_fail!(Fault::Versions32Bit, versions_are_64_bit);
}

#[test]
fn events_altered_on_a_read_path_are_caught() {
    must_fail!(Fault::ReadAllDropsMetadata, full_events_on_every_read_path);
    must_fail!(Fault::HeaderValuesCutAt255, full_events_on_every_read_path);
    must_fail!(Fault::HeaderNamesLowerCased, full_events_on_every_read_path);
    must_fail!(Fault::ReadsCappedAt256, long_streams_read_in_full);
    must_fail!(Fault::BackwardsIgnoresFrom, paged_reads_match_full_reads);
    // The model compares full events on every read path too.
    model_must_fail(Fault::ReadAllDropsMetadata);
    model_must_fail(Fault::HeaderValuesCutAt255);
}

#[test]
fn broken_batch_and_duplicate_rules_are_caught() {
    must_fail!(Fault::BatchesWrittenPiecemeal, batches_become_visible_whole);
    must_fail!(Fault::DuplicateRefsSorted, duplicate_refs_in_request_order);
    must_fail!(
        Fault::DuplicateNamesFirstEvent,
        duplicate_error_names_the_stored_event
    );
    must_fail!(Fault::DedupCheckThenAct, racing_dedup_keys_store_one);
    must_fail!(Fault::BatchBytesUnenforced, limits_enforced_at_the_bounds);
    must_fail!(Fault::MetadataUnchecked, limits_enforced_at_the_bounds);
}

#[test]
fn wrong_heads_and_clocks_are_caught() {
    must_fail!(Fault::PositionAtPastEndTooFar, position_at_past_the_end);
    must_fail!(Fault::WatchHeadAhead, watch_head_carries_the_head);
    must_fail!(Fault::RecordedAtJitter, recorded_at_never_decreases);
    must_fail!(
        Fault::RecordedAtJitter,
        recorded_at_consistent_under_concurrency
    );
}

#[test]
fn broken_read_models_and_snapshots_are_caught() {
    must_fail_rm!(
        Fault::ReadModelNoneUnfenced,
        read_model_commit_none_is_fenced
    );
    must_fail_rm!(
        Fault::ReadModelWritesReordered,
        read_model_writes_apply_in_order
    );
    must_fail_snap!(
        Fault::SnapshotSameVersionKept,
        snapshot_same_version_replaces
    );
}

#[test]
fn the_like_matcher_of_the_fault_matches_like() {
    assert!(like_prefix("a_", "ab1"));
    assert!(like_prefix("a%", "axyz"));
    assert!(like_prefix("%", ""));
    assert!(!like_prefix("a_", "a"));
    assert!(!like_prefix("b", "ab"));
}
