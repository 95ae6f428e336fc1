//! Deterministic checks of documented rules: batch visibility, duplicate reporting, limits,
//! `position_at`, `watch_head`, `recorded_at`, and the read-model and snapshot contracts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracktrace_core::{
    Direction, Error, EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, KeyRange,
    Metadata, NewEvent, Position, ReadAll, ReadModelBatch, ReadModelStore, ReadModelWrite,
    RecordedEvent, Snapshot, SnapshotStore, Timestamp, Version, limits,
};

use super::failure::{CheckFailure, CheckResult};
use super::support::*;

/// A batch becomes visible whole: readers polling `read_all`, `read_stream` and
/// `stream_version` while 100-event batches are appended only ever see multiples of 100.
pub async fn batches_become_visible_whole(store: Arc<dyn EventStore>) -> CheckResult {
    const BATCH: usize = 100;
    const BATCHES: usize = 12;
    let (tn, st) = (t("acme"), s("Whole-1"));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (store, done, tn, st) = (store.clone(), done.clone(), tn.clone(), st.clone());
        readers.push(tokio::spawn(async move {
            let mut observations = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let seen = match r {
                    0 => ok(
                        store
                            .read_all(
                                ReadAll::starting_at(Position::START, BATCH * BATCHES + 1)
                                    .filter(EventFilter::tenant(tn.clone())),
                            )
                            .await,
                        "read_all",
                    )?
                    .events
                    .len(),
                    1 => ok(store.read_stream_forwards(&tn, &st).await, "read_stream")?.len(),
                    _ => ok(store.stream_version(&tn, &st).await, "stream_version")?.get() as usize,
                };
                ensure!(
                    seen % BATCH == 0,
                    "reader {r} saw {seen} events of a stream written in batches of {BATCH}"
                );
                observations += 1;
                tokio::task::yield_now().await;
            }
            Ok::<u64, CheckFailure>(observations)
        }));
    }
    for b in 0..BATCHES {
        let expected = ExpectedVersion::Exact(Version::new((b * BATCH) as u64));
        must_append(&*store, &tn, &st, expected, evs("W", BATCH)).await?;
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for r in readers {
        let n = r
            .await
            .map_err(|e| CheckFailure(format!("reader panicked: {e}")))??;
        ensure!(n > 0, "a reader never observed the store");
    }
    Ok(())
}

/// A retried batch, even with its events in another order or identified by dedup key only,
/// is `duplicate` with the originals' references in request order.
pub async fn duplicate_refs_in_request_order(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("dup-order"));
    let batch = vec![
        ev("A", 1),
        ev("B", 2).with_dedup_key("dk-b"),
        ev("C", 3),
        ev("D", 4).with_dedup_key("dk-d"),
    ];
    let first = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, batch.clone()).await?;
    let order = [3usize, 0, 2, 1];
    let mut again: Vec<NewEvent> = order.iter().map(|&i| batch[i].clone()).collect();
    // The events with a dedup key come back under new ids: found by key.
    again[0].event_id = EventId::new();
    again[3].event_id = EventId::new();
    let out = ok(
        store
            .append_to(&tn, &st, ExpectedVersion::Exact(Version::new(1)), again)
            .await,
        "re-append in another order",
    )?;
    ensure!(
        out.duplicate,
        "a batch of stored events must be a duplicate"
    );
    let want: Vec<_> = order.iter().map(|&i| first.events[i].clone()).collect();
    ensure_eq!(out.events, want, "duplicate references in request order");
    ensure_eq!(stream_len(&*store, &tn, &st).await?, 4, "nothing written");
    Ok(())
}

/// A batch mixing new and stored events is `Error::Duplicate` naming the batch's stored event
/// (by id, or the event whose dedup key is taken) and where its original is; nothing is written.
pub async fn duplicate_error_names_the_stored_event(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("dup-name"));
    let stored = vec![ev("A", 1), ev("B", 2).with_dedup_key("dk-b")];
    let first = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, stored.clone()).await?;
    let by_id = vec![ev("N", 1), ev("N", 2), stored[0].clone(), ev("N", 3)];
    let by_key_event = ev("N", 5).with_dedup_key("dk-b");
    let by_key = vec![ev("N", 4), by_key_event.clone(), ev("N", 6)];
    for (what, batch, event_id, original) in [
        ("by event id", by_id, stored[0].event_id, &first.events[0]),
        (
            "by dedup key",
            by_key,
            by_key_event.event_id,
            &first.events[1],
        ),
    ] {
        let r = store.append_to(&tn, &st, ExpectedVersion::Any, batch).await;
        match r {
            Err(Error::Duplicate {
                event_id: e,
                existing,
            }) => {
                ensure_eq!(
                    e,
                    event_id,
                    "{what}: Duplicate names the batch's stored event"
                );
                ensure_eq!(
                    existing,
                    *original,
                    "{what}: Duplicate points at the original"
                );
            }
            other => {
                return Err(CheckFailure(format!(
                    "{what}: a partly stored batch must be Error::Duplicate, got {other:?}"
                )));
            }
        }
    }
    ensure_eq!(stream_len(&*store, &tn, &st).await?, 2, "nothing written");
    ensure_eq!(
        all_events(&*store).await?.len(),
        2,
        "nothing written anywhere"
    );
    Ok(())
}

/// Different events with one dedup key appended at the same moment, to one stream or to
/// several: exactly one is stored; every other call is a duplicate pointing at it.
pub async fn racing_dedup_keys_store_one(store: Arc<dyn EventStore>) -> CheckResult {
    const RACERS: usize = 8;
    let tn = t("acme");
    for round in 0..6 {
        let key = format!("race-key-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let (store, barrier, tn, key) =
                (store.clone(), barrier.clone(), tn.clone(), key.clone());
            // Even rounds: one stream for all; odd rounds: a stream each.
            let st = if round % 2 == 0 {
                s(&format!("race-{round}"))
            } else {
                s(&format!("race-{round}-{i}"))
            };
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store
                    .append_to(
                        &tn,
                        &st,
                        ExpectedVersion::Any,
                        vec![ev("R", i as u64).with_dedup_key(key)],
                    )
                    .await
            }));
        }
        let mut winners = Vec::new();
        let mut refs = Vec::new();
        for task in tasks {
            let out = task
                .await
                .map_err(|e| CheckFailure(format!("racer panicked: {e}")))?;
            let out = ok(out, "racing append with one dedup key")?;
            if !out.duplicate {
                winners.push(out.events[0].clone());
            }
            refs.push(out.events[0].clone());
        }
        ensure_eq!(
            winners.len(),
            1,
            "round {round}: appends that stored an event"
        );
        ensure!(
            refs.iter().all(|r| *r == winners[0]),
            "round {round}: every duplicate must point at the stored event"
        );
        let stored: Vec<RecordedEvent> = all_events(&*store)
            .await?
            .into_iter()
            .filter(|e| e.dedup_key.as_deref() == Some(key.as_str()))
            .collect();
        ensure_eq!(
            stored.len(),
            1,
            "round {round}: events stored under the key"
        );
    }
    Ok(())
}

/// The batch byte limit and the string rules of every metadata field are enforced at their
/// exact bounds: the maximum is stored, one more (or empty, or a control character) is
/// `InvalidInput` and writes nothing.
pub async fn limits_enforced_at_the_bounds(store: Arc<dyn EventStore>) -> CheckResult {
    use limits::*;
    let (tn, st) = (t("acme"), s("bounds-1"));
    let chunk = MAX_PAYLOAD_BYTES;
    let full = MAX_BATCH_BYTES / chunk;
    let payload = |n: usize| vec![(n % 251) as u8; chunk];
    // Exactly MAX_BATCH_BYTES in one batch is accepted.
    let at_max: Vec<NewEvent> = (0..full)
        .map(|i| NewEvent::new("Max", "application/octet-stream", payload(i)))
        .collect();
    must_append(&*store, &tn, &st, ExpectedVersion::NoStream, at_max).await?;
    // One byte more is not.
    let mut over: Vec<NewEvent> = (0..full)
        .map(|i| NewEvent::new("Over", "application/octet-stream", payload(i)))
        .collect();
    over.push(NewEvent::new("Over", "application/octet-stream", vec![1u8]));
    let r = store.append_to(&tn, &st, ExpectedVersion::Any, over).await;
    ensure!(
        matches!(r, Err(Error::InvalidInput { .. })),
        "a batch of MAX_BATCH_BYTES + 1 must be InvalidInput, got {:?}",
        r.map(|o| o.events.len())
    );
    let long = |n: usize| "x".repeat(n);
    let with_meta = |f: &dyn Fn(&mut Metadata)| {
        let mut e = ev("M", 1);
        f(&mut e.metadata);
        e
    };
    let header = |k: String, v: String| {
        with_meta(&move |m: &mut Metadata| {
            m.headers.insert(k.clone(), v.clone());
        })
    };
    let many_headers = with_meta(&|m: &mut Metadata| {
        for i in 0..=MAX_HEADERS {
            m.headers.insert(format!("h{i}"), "v".into());
        }
    });
    let cases: Vec<(&str, NewEvent)> = vec![
        (
            "correlation id too long",
            with_meta(&|m| m.correlation_id = Some(long(MAX_SHORT_STRING_LEN + 1))),
        ),
        (
            "empty correlation id",
            with_meta(&|m| m.correlation_id = Some(String::new())),
        ),
        (
            "control character in correlation id",
            with_meta(&|m| m.correlation_id = Some("a\u{7}b".into())),
        ),
        (
            "causation id too long",
            with_meta(&|m| m.causation_id = Some(long(MAX_SHORT_STRING_LEN + 1))),
        ),
        (
            "empty causation id",
            with_meta(&|m| m.causation_id = Some(String::new())),
        ),
        (
            "control character in causation id",
            with_meta(&|m| m.causation_id = Some("a\nb".into())),
        ),
        ("empty header name", header(String::new(), "v".into())),
        (
            "header name too long",
            header(long(MAX_SHORT_STRING_LEN + 1), "v".into()),
        ),
        (
            "control character in header name",
            header("a\u{0}b".into(), "v".into()),
        ),
        (
            "header value too long",
            header("h".into(), long(MAX_HEADER_VALUE_LEN + 1)),
        ),
        ("too many headers", many_headers),
        (
            "dedup key too long",
            ev("M", 1).with_dedup_key(long(MAX_SHORT_STRING_LEN + 1)),
        ),
        ("empty dedup key", ev("M", 1).with_dedup_key("")),
        (
            "control character in dedup key",
            ev("M", 1).with_dedup_key("k\u{1b}"),
        ),
        (
            "event type too long",
            NewEvent::new(long(MAX_EVENT_TYPE_LEN + 1), CONTENT_TYPE, Bytes::new()),
        ),
        (
            "content type too long",
            NewEvent::new("M", long(MAX_SHORT_STRING_LEN + 1), Bytes::new()),
        ),
        ("empty content type", NewEvent::new("M", "", Bytes::new())),
        (
            "payload too large",
            NewEvent::new("M", CONTENT_TYPE, vec![0u8; MAX_PAYLOAD_BYTES + 1]),
        ),
    ];
    for (what, bad) in cases {
        let r = store
            .append_to(
                &tn,
                &s("bounds-2"),
                ExpectedVersion::Any,
                vec![ev("ok", 0), bad],
            )
            .await;
        ensure!(
            matches!(r, Err(Error::InvalidInput { .. })),
            "{what}: expected InvalidInput, got {r:?}"
        );
    }
    ensure_eq!(
        stream_len(&*store, &tn, &s("bounds-2")).await?,
        0,
        "nothing written"
    );
    ensure_eq!(
        stream_len(&*store, &tn, &st).await?,
        full,
        "only the batch at the maximum"
    );
    Ok(())
}

const CONTENT_TYPE: &str = "application/octet-stream";

/// `position_at` for a time after the last event answers where the log's head will continue:
/// no stored event is at or above it, and an event appended afterwards is.
pub async fn position_at_past_the_end(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("pat-end"));
    let out = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, evs("E", 5)).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let at = Timestamp::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let p = ok(
        store.position_at(at).await,
        "position_at after the last event",
    )?;
    ensure!(
        p > out.last_position(),
        "position_at after the last event is {p}, not above the last event {}",
        out.last_position()
    );
    let far = ok(
        store
            .position_at(Timestamp::from_unix_micros(
                at.unix_micros() + 3_600_000_000,
            ))
            .await,
        "position_at an hour ahead",
    )?;
    ensure!(
        far > out.last_position(),
        "position_at an hour ahead is {far}, not above the last event"
    );
    let later = must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("L", 1)).await?;
    let page = ok(
        store.read_all(ReadAll::starting_at(p, 100)).await,
        "read_all from position_at",
    )?;
    ensure_eq!(
        ids(&page.events),
        vec![later.events[0].event_id],
        "a read from position_at(after the last event) finds exactly the later event"
    );
    Ok(())
}

/// `watch_head` carries a head readers may read up to: never above `head()`, and once writes
/// stop it reaches `head()`, which covers every appended event.
pub async fn watch_head_carries_the_head(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("watch-1"));
    let rx = store.watch_head();
    for i in 0..5u64 {
        let out = must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("W", 3)).await?;
        let watched = *rx.borrow();
        let head = ok(store.head().await, "head")?;
        ensure!(
            watched <= head,
            "append {i}: watch_head carries {watched}, above head() {head}"
        );
        ensure!(
            head >= out.last_position(),
            "append {i}: head() {head} below the appended event {}",
            out.last_position()
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let watched = *rx.borrow();
            if watched >= out.last_position() {
                let head = ok(store.head().await, "head")?;
                ensure!(
                    watched <= head,
                    "append {i}: watch_head carries {watched}, above head() {head}"
                );
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "append {i}: watch_head stayed at {watched} for 5 s after an append at {}",
                out.last_position()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let page = ok(
        store
            .read_all(ReadAll::starting_at(Position::START, 100))
            .await,
        "read_all",
    )?;
    let head = ok(store.head().await, "head")?;
    ensure!(
        page.events.iter().all(|e| e.position <= head),
        "an event above head() is readable"
    );
    ensure_eq!(
        page.events.len(),
        15,
        "every appended event is below head()"
    );
    Ok(())
}

/// Under concurrent writers, `position_at` keeps its guarantee for every recorded time: no
/// event below the answer was recorded at or after it, and no event recorded at or after it
/// is below the answer.
pub async fn recorded_at_consistent_under_concurrency(store: Arc<dyn EventStore>) -> CheckResult {
    let events = concurrent_appends(&store, 6, 15).await?;
    let mut times: Vec<Timestamp> = events.iter().map(|e| e.recorded_at).collect();
    times.sort_unstable();
    times.dedup();
    for at in times.iter().step_by(3) {
        let p = ok(store.position_at(*at).await, "position_at")?;
        for e in &events {
            ensure!(
                !(e.position < p && e.recorded_at >= *at),
                "position_at({at:?}) = {p} skips event at {} recorded at {:?}",
                e.position,
                e.recorded_at
            );
        }
    }
    Ok(())
}

/// For backends whose clock never goes backwards along the log (in-memory, sled): under
/// concurrent writers `recorded_at` never decreases with the position.
pub async fn recorded_at_never_decreases(store: Arc<dyn EventStore>) -> CheckResult {
    let events = concurrent_appends(&store, 8, 25).await?;
    for w in events.windows(2) {
        ensure!(
            w[0].recorded_at <= w[1].recorded_at,
            "event at {} recorded at {:?} after the event at {} recorded at {:?}",
            w[1].position,
            w[1].recorded_at,
            w[0].position,
            w[0].recorded_at
        );
    }
    Ok(())
}

/// `writers` tasks append `appends` single events each to their own stream at the same time;
/// returns the whole log.
async fn concurrent_appends(
    store: &Arc<dyn EventStore>,
    writers: usize,
    appends: usize,
) -> Result<Vec<RecordedEvent>, CheckFailure> {
    let barrier = Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for i in 0..appends {
                ok(
                    store
                        .append_to(
                            &t("acme"),
                            &s(&format!("clock-{w}")),
                            ExpectedVersion::Any,
                            vec![ev("C", i as u64)],
                        )
                        .await,
                    "concurrent append",
                )?;
            }
            Ok::<(), CheckFailure>(())
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| CheckFailure(format!("writer panicked: {e}")))??;
    }
    let events = all_events(&**store).await?;
    ensure_eq!(
        events.len(),
        writers * appends,
        "every concurrent append stored"
    );
    Ok(events)
}

// ---------------------------------------------------------------------------------------------
// Read models and snapshots

fn put(ns: &str, k: &str, v: &str) -> ReadModelWrite {
    ReadModelWrite::put(ns, k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

/// A read-model commit expecting no checkpoint (`expected_checkpoint: None`) is fenced like
/// any other: once a checkpoint is stored (by `commit` or `save_checkpoint`) it is
/// `CheckpointMoved` and writes nothing.
pub async fn read_model_commit_none_is_fenced(store: Arc<dyn ReadModelStore>) -> CheckResult {
    let batch = |name: &str, pos: u64, v: &str| {
        ReadModelBatch::new(name, None, Position::new(pos)).with_writes(vec![put("fence", name, v)])
    };
    ok(store.commit(batch("p", 5, "first")).await, "first commit")?;
    let r = store.commit(batch("p", 9, "second")).await;
    ensure!(
        matches!(r, Err(Error::CheckpointMoved { .. })),
        "a second commit expecting no checkpoint must be CheckpointMoved, got {r:?}"
    );
    ensure_eq!(
        ok(store.get("fence", b"p").await, "get")?,
        Some(Bytes::from_static(b"first")),
        "the fenced commit wrote nothing"
    );
    ensure_eq!(
        ok(store.load_checkpoint("p").await, "load")?,
        Some(Position::new(5)),
        "the fenced commit did not move the checkpoint"
    );
    ok(
        store.save_checkpoint("q", Position::new(3)).await,
        "save_checkpoint",
    )?;
    let r = store.commit(batch("q", 4, "q")).await;
    ensure!(
        matches!(r, Err(Error::CheckpointMoved { .. })),
        "a commit expecting no checkpoint after save_checkpoint must be CheckpointMoved, got {r:?}"
    );
    ensure_eq!(
        ok(store.get("fence", b"q").await, "get")?,
        None,
        "nothing written"
    );
    Ok(())
}

/// The writes of a read-model batch apply in order: a later put wins over an earlier delete
/// and vice versa, and a clear removes only what was written before it.
pub async fn read_model_writes_apply_in_order(store: Arc<dyn ReadModelStore>) -> CheckResult {
    let del = |ns: &str, k: &str| ReadModelWrite::delete(ns, k.as_bytes().to_vec());
    let clear = |ns: &str| ReadModelWrite::clear(ns);
    ok(
        store
            .commit(
                ReadModelBatch::new("ord", None, Position::new(1))
                    .with_writes(vec![put("o2", "old", "1"), put("o1", "gone", "1")]),
            )
            .await,
        "setup commit",
    )?;
    ok(
        store
            .commit(
                ReadModelBatch::new("ord", Some(Position::new(1)), Position::new(2)).with_writes(
                    vec![
                        put("o1", "a", "1"),
                        del("o1", "a"),
                        put("o1", "a", "2"),
                        put("o1", "b", "1"),
                        put("o1", "b", "2"),
                        del("o1", "b"),
                        del("o1", "gone"),
                        put("o1", "gone", "back"),
                        put("o2", "before-clear", "x"),
                        clear("o2"),
                        put("o2", "after-clear", "y"),
                        put("o1", "c", "1"),
                        put("o1", "c", "3"),
                    ],
                ),
            )
            .await,
        "ordered commit",
    )?;
    let get = |ns: &'static str, k: &'static str| {
        let store = store.clone();
        async move { ok(store.get(ns, k.as_bytes()).await, "get") }
    };
    ensure_eq!(
        get("o1", "a").await?,
        Some(Bytes::from_static(b"2")),
        "put, delete, put"
    );
    ensure_eq!(get("o1", "b").await?, None, "put, put, delete");
    ensure_eq!(
        get("o1", "gone").await?,
        Some(Bytes::from_static(b"back")),
        "delete, put"
    );
    ensure_eq!(
        get("o1", "c").await?,
        Some(Bytes::from_static(b"3")),
        "put, put"
    );
    let o2 = ok(
        store
            .scan("o2", KeyRange::default(), Direction::Forwards, 10)
            .await,
        "scan",
    )?;
    let keys: Vec<&[u8]> = o2.iter().map(|(k, _)| k.as_ref()).collect();
    ensure_eq!(
        keys,
        vec![&b"after-clear"[..]],
        "clear removes what came before it only"
    );
    Ok(())
}

/// Saving a snapshot at the stored version replaces it (a new schema version of the same
/// state); a lower version never does.
pub async fn snapshot_same_version_replaces(store: Arc<dyn SnapshotStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("snap-same"));
    let snap = |v: u64, schema: u32, payload: &'static [u8]| {
        Snapshot::new(
            tn.clone(),
            st.clone(),
            Version::new(v),
            schema,
            Bytes::from_static(payload),
        )
    };
    ok(store.save_snapshot(snap(5, 1, b"old")).await, "save v5")?;
    ok(
        store.save_snapshot(snap(5, 2, b"new")).await,
        "save v5 again",
    )?;
    ensure_eq!(
        ok(store.load_snapshot(&tn, &st).await, "load")?,
        Some(snap(5, 2, b"new")),
        "a snapshot at the same version replaces the stored one"
    );
    ok(store.save_snapshot(snap(4, 3, b"older")).await, "save v4")?;
    ensure_eq!(
        ok(store.load_snapshot(&tn, &st).await, "load")?,
        Some(snap(5, 2, b"new")),
        "a lower version never replaces"
    );
    ok(store.save_snapshot(snap(6, 2, b"newer")).await, "save v6")?;
    ensure_eq!(
        ok(store.load_snapshot(&tn, &st).await, "load")?,
        Some(snap(6, 2, b"newer")),
        "a higher version replaces"
    );
    ensure_eq!(
        ok(store.load_snapshot(&t("acme2"), &st).await, "load")?,
        None,
        "snapshots are per tenant"
    );
    Ok(())
}
