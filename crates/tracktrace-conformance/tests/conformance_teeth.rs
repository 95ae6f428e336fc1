//! The conformance suite has teeth: it fails against deliberately broken stores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use tracktrace_conformance::store::{self as conformance, CheckResult};
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, EventId, EventStore, ExpectedVersion, InMemoryStore,
    Position, ReadAll, ReadStream, RecordedEvent, Result, StoreStats, StreamId, TenantId,
    Timestamp, Version,
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
}

struct Broken {
    inner: InMemoryStore,
    fault: Fault,
    /// Events of every append call (`StatsCountAttempts`).
    attempted: AtomicU64,
    /// The previous answer of the inner store (`StatsStale`).
    previous: Mutex<Option<StoreStats>>,
}

#[async_trait]
impl EventStore for Broken {
    async fn append(&self, mut req: AppendRequest) -> Result<AppendOutcome> {
        self.attempted
            .fetch_add(req.events.len() as u64, Ordering::SeqCst);
        match self.fault {
            Fault::IgnoreExpectedVersion => req.expected = ExpectedVersion::Any,
            Fault::LetDuplicatesThrough => {
                for e in &mut req.events {
                    e.event_id = EventId::new();
                    e.dedup_key = None;
                }
            }
            _ => {}
        }
        self.inner.append(req).await
    }

    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(req).await
    }

    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        let mut page = self.inner.read_all(req).await?;
        match self.fault {
            Fault::ReorderReadAll if page.events.len() >= 2 => page.events.swap(0, 1),
            Fault::DropFromReadAll => page.events.retain(|e| e.position.get() % 5 != 3),
            _ => {}
        }
        Ok(page)
    }

    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.inner.stream_version(tenant, stream).await
    }

    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        self.inner.get_event(tenant, id).await
    }

    async fn head(&self) -> Result<Position> {
        self.inner.head().await
    }

    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        let p = self.inner.position_at(at).await?;
        Ok(match self.fault {
            Fault::PositionAtTooLate => p.next(),
            Fault::PositionAtAlwaysStart => Position::START,
            _ => p,
        })
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
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
}

fn broken(fault: Fault) -> Arc<dyn EventStore> {
    Arc::new(Broken {
        inner: InMemoryStore::new(),
        fault,
        attempted: AtomicU64::new(0),
        previous: Mutex::new(None),
    })
}

/// `must_fail!(fault, check)`: runs `conformance::check` against a store with `fault` and
/// asserts it fails.
macro_rules! must_fail {
    ($fault:expr, $check:ident) => {
        must_fail($fault, stringify!($check), conformance::$check)
    };
}

/// Runs `check` against a store with `fault` and asserts it fails.
fn must_fail<F, Fut>(fault: Fault, name: &str, check: F)
where
    F: FnOnce(Arc<dyn EventStore>) -> Fut,
    Fut: std::future::Future<Output = CheckResult>,
{
    let r = conformance::run(check(broken(fault)));
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
