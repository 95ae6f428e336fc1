//! Helpers shared by the checks: short constructors, reads that check the paging contract on
//! the way, and error context.

use std::future::Future;
use std::time::Duration;

use super::failure::{CheckFailure, CheckResult};
use tracktrace_core::{
    Error, EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position,
    ReadAll, RecordedEvent, StreamId, Subscription, TenantId, Version,
};

/// Turns a store error into a check failure with context.
pub(super) fn ok<T>(r: tracktrace_core::Result<T>, what: &str) -> Result<T, CheckFailure> {
    r.map_err(|e| CheckFailure(format!("{what}: unexpected error: {e}")))
}

/// Runs `fut` on a fresh multi-threaded tokio runtime (used by the generated tests).
pub fn run<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime for the conformance tests")
        .block_on(fut)
}

pub(super) fn t(s: &str) -> TenantId {
    TenantId::parse(s).expect("valid tenant literal")
}

pub(super) fn s(s: &str) -> StreamId {
    StreamId::parse(s).expect("valid stream literal")
}

pub(super) fn ev(ty: &str, n: u64) -> NewEvent {
    NewEvent::new(
        ty,
        tracktrace_core::CONTENT_TYPE_JSON,
        format!("{{\"n\":{n}}}").into_bytes(),
    )
}

pub(super) fn evs(ty: &str, n: usize) -> Vec<NewEvent> {
    (0..n).map(|i| ev(ty, i as u64)).collect()
}

pub(super) async fn all_events(store: &dyn EventStore) -> Result<Vec<RecordedEvent>, CheckFailure> {
    ok(
        store
            .read_all_to_end(Position::START, EventFilter::default())
            .await,
        "read_all to end",
    )
}

/// Reads the whole log page by page, checking the paging contract on the way.
pub(super) async fn page_all(
    store: &dyn EventStore,
    filter: EventFilter,
    limit: usize,
) -> Result<Vec<RecordedEvent>, CheckFailure> {
    let mut got: Vec<RecordedEvent> = Vec::new();
    let mut next = Position::START;
    for _ in 0..100_000 {
        let page = ok(
            store
                .read_all(ReadAll::starting_at(next, limit).filter(filter.clone()))
                .await,
            "read_all page",
        )?;
        ensure!(
            page.events.len() <= limit,
            "page of {} events with limit {limit}",
            page.events.len()
        );
        ensure!(
            page.next >= next,
            "next went backwards from {next} to {}",
            page.next
        );
        if let (Some(first), Some(prev)) = (page.events.first(), got.last()) {
            ensure!(
                first.position > prev.position,
                "page starts at {} after {}",
                first.position,
                prev.position
            );
        }
        if let Some(last) = page.events.last() {
            ensure!(
                page.next > last.position,
                "next {} must be past the last returned event {}",
                page.next,
                last.position
            );
        }
        let short = page.events.len() < limit;
        got.extend(page.events);
        next = page.next;
        if short {
            return Ok(got);
        }
    }
    Err(CheckFailure(
        "paging through read_all did not terminate".into(),
    ))
}

pub(super) fn ids(events: &[RecordedEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event_id).collect()
}

pub(super) fn check_conflict(
    r: tracktrace_core::Result<tracktrace_core::AppendOutcome>,
    expected: ExpectedVersion,
    actual: Version,
) -> CheckResult {
    match r {
        Err(Error::Conflict {
            expected: e,
            actual: a,
            ..
        }) => {
            ensure_eq!(e, expected, "conflict must carry the expected version");
            ensure_eq!(a, actual, "conflict must carry the actual version");
            Ok(())
        }
        other => Err(CheckFailure(format!(
            "append with {expected} on a stream at {actual} must be a Conflict, got {other:?}"
        ))),
    }
}

/// Appends `events` and checks they were all written, returning the outcome.
pub(super) async fn must_append(
    store: &dyn EventStore,
    tenant: &TenantId,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Result<tracktrace_core::AppendOutcome, CheckFailure> {
    let n = events.len();
    let out = ok(
        store.append_to(tenant, stream, expected, events).await,
        &format!("append of {n} events to {stream} with {expected}"),
    )?;
    ensure!(!out.duplicate, "a new batch was reported as duplicate");
    ensure_eq!(out.events.len(), n, "one reference per appended event");
    Ok(out)
}

pub(super) async fn stream_len(
    store: &dyn EventStore,
    tenant: &TenantId,
    stream: &StreamId,
) -> Result<usize, CheckFailure> {
    Ok(ok(
        store.read_stream_forwards(tenant, stream).await,
        "read_stream",
    )?
    .len())
}

/// The next event of `sub`, failing the check if none arrives within 10 s.
pub(super) async fn next_within(
    sub: &mut Subscription,
    what: &str,
) -> Result<RecordedEvent, CheckFailure> {
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(r) => ok(r, what),
        Err(_) => Err(CheckFailure(format!(
            "{what}: no event delivered within 10 s"
        ))),
    }
}
