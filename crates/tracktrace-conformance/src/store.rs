//! The event-store, read-model and snapshot checks.
//!
//! Every check is a plain `async fn` over a fresh store that returns `Err(CheckFailure)` when
//! the store misbehaves, so the suite itself can be tested against deliberately broken stores.
//! Backends run all of them with one macro in an integration test:
//!
//! ```text
//! async fn make_store() -> Arc<dyn EventStore> { /* fresh, isolated store */ }
//! tracktrace_conformance::conformance_tests!(make_store);
//! async fn make_read_model_store() -> Arc<dyn ReadModelStore> { /* fresh */ }
//! tracktrace_conformance::read_model_tests!(make_read_model_store);
//! async fn make_snapshot_store() -> Arc<dyn SnapshotStore> { /* fresh */ }
//! tracktrace_conformance::snapshot_tests!(make_snapshot_store);
//! ```
//!
//! The macros generate one `#[test]` per check (each with its own multi-threaded runtime) and a
//! model-based property test ([`model_test`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use tracktrace_core::{
    Direction, Error, EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, KeyRange,
    Metadata, NewEvent, Position, ReadAll, ReadModelBatch, ReadModelStore, ReadModelWrite,
    ReadStream, RecordedEvent, Snapshot, SnapshotStore, StreamId, SubscribeOptions, Subscription,
    TenantId, Timestamp, Version, limits,
};

mod failure;
mod fidelity;
mod identity;
mod model;
mod rules;
mod support;
pub use failure::{CheckFailure, CheckResult};
pub use fidelity::{
    full_events_on_every_read_path, long_streams_read_in_full, paged_reads_match_full_reads,
};
pub use identity::{
    dedup_keys_compared_in_full, stream_keys_do_not_collide, stream_prefix_is_literal,
    tenant_filter_is_exact, versions_are_64_bit,
};
pub use model::model_test;
pub use rules::{
    batches_become_visible_whole, duplicate_error_names_the_stored_event,
    duplicate_refs_in_request_order, limits_enforced_at_the_bounds, position_at_past_the_end,
    racing_dedup_keys_store_one, read_model_commit_none_is_fenced,
    read_model_writes_apply_in_order, recorded_at_consistent_under_concurrency,
    recorded_at_never_decreases, snapshot_same_version_replaces, watch_head_carries_the_head,
};
pub use support::run;
use support::*;

// ---------------------------------------------------------------------------------------------
// Expected versions

/// `Any` appends to new and existing streams.
pub async fn expected_version_any(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("any-1"));
    must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("A", 2)).await?;
    let out = must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("A", 1)).await?;
    ensure_eq!(
        out.last_version(),
        Version::new(3),
        "version after 3 events"
    );
    ensure_eq!(
        ok(store.stream_version(&tn, &st).await, "stream_version")?,
        Version::new(3),
        "stream_version"
    );
    Ok(())
}

/// `NoStream` creates a stream and conflicts (writing nothing) once it exists.
pub async fn expected_version_no_stream(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("nostream-1"));
    must_append(&*store, &tn, &st, ExpectedVersion::NoStream, evs("A", 1)).await?;
    let r = store
        .append_to(&tn, &st, ExpectedVersion::NoStream, evs("A", 2))
        .await;
    check_conflict(r, ExpectedVersion::NoStream, Version::new(1))?;
    ensure_eq!(
        stream_len(&*store, &tn, &st).await?,
        1,
        "a conflict must write nothing"
    );
    ensure_eq!(
        all_events(&*store).await?.len(),
        1,
        "a conflict must write nothing to the log"
    );
    Ok(())
}

/// `StreamExists` conflicts on a missing stream and appends to an existing one.
pub async fn expected_version_stream_exists(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("exists-1"));
    let r = store
        .append_to(&tn, &st, ExpectedVersion::StreamExists, evs("A", 1))
        .await;
    check_conflict(r, ExpectedVersion::StreamExists, Version::ZERO)?;
    ensure_eq!(
        stream_len(&*store, &tn, &st).await?,
        0,
        "a conflict must write nothing"
    );
    must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("A", 1)).await?;
    let out = must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::StreamExists,
        evs("A", 1),
    )
    .await?;
    ensure_eq!(out.last_version(), Version::new(2), "version");
    Ok(())
}

/// `Exact(v)` appends only at exactly `v`, `Exact(0)` behaves as `NoStream`, and conflicts
/// report the actual version and write nothing.
pub async fn expected_version_exact(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("exact-1"));
    must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Exact(Version::ZERO),
        evs("A", 2),
    )
    .await?;
    for wrong in [0, 1, 3, 99] {
        let exp = ExpectedVersion::Exact(Version::new(wrong));
        let r = store.append_to(&tn, &st, exp, evs("B", 3)).await;
        check_conflict(r, exp, Version::new(2))?;
    }
    ensure_eq!(
        stream_len(&*store, &tn, &st).await?,
        2,
        "conflicts must write nothing"
    );
    let out = must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Exact(Version::new(2)),
        evs("C", 1),
    )
    .await?;
    ensure_eq!(out.last_version(), Version::new(3), "version");
    let types: Vec<_> = ok(store.read_stream_forwards(&tn, &st).await, "read")?
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    ensure_eq!(types, vec!["A", "A", "C"], "stream content after conflicts");
    Ok(())
}

/// Versions start at 1 and are contiguous across batches; positions strictly increase.
pub async fn versions_start_at_one(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("ver-1"));
    let a = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, evs("A", 3)).await?;
    let b = must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Exact(Version::new(3)),
        evs("A", 2),
    )
    .await?;
    let versions: Vec<u64> = a
        .events
        .iter()
        .chain(&b.events)
        .map(|r| r.version.get())
        .collect();
    ensure_eq!(versions, vec![1, 2, 3, 4, 5], "versions of the outcome");
    let read = ok(store.read_stream_forwards(&tn, &st).await, "read")?;
    let rv: Vec<u64> = read.iter().map(|e| e.version.get()).collect();
    ensure_eq!(rv, versions, "versions read back");
    let positions: Vec<Position> = a
        .events
        .iter()
        .chain(&b.events)
        .map(|r| r.position)
        .collect();
    ensure!(
        positions[0] > Position::START,
        "positions start above Position::START"
    );
    ensure!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions must strictly increase: {positions:?}"
    );
    let rp: Vec<Position> = read.iter().map(|e| e.position).collect();
    ensure_eq!(rp, positions, "positions read back");
    Ok(())
}

/// A batch is atomic: it is written whole, read back in order, and a failing batch (conflict,
/// invalid event anywhere in it) writes none of its events.
pub async fn atomic_batches(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("atomic-1"));
    let batch = evs("A", 50);
    let want = batch.iter().map(|e| e.event_id).collect::<Vec<_>>();
    must_append(&*store, &tn, &st, ExpectedVersion::NoStream, batch).await?;
    ensure_eq!(
        ids(&ok(store.read_stream_forwards(&tn, &st).await, "read")?),
        want,
        "batch order"
    );

    let mut bad = evs("B", 5);
    bad[3].event_type = String::new();
    let r = store.append_to(&tn, &st, ExpectedVersion::Any, bad).await;
    ensure!(
        matches!(r, Err(Error::InvalidInput { .. })),
        "a batch with an invalid event must be InvalidInput, got {r:?}"
    );
    let r = store
        .append_to(
            &tn,
            &st,
            ExpectedVersion::Exact(Version::new(7)),
            evs("C", 5),
        )
        .await;
    check_conflict(r, ExpectedVersion::Exact(Version::new(7)), Version::new(50))?;
    ensure_eq!(
        stream_len(&*store, &tn, &st).await?,
        50,
        "failed batches must write nothing"
    );
    ensure_eq!(
        all_events(&*store).await?.len(),
        50,
        "failed batches must write nothing to the log"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idempotency

/// Re-appending events with already stored ids returns the original references, writes
/// nothing, and does not check the expected version.
pub async fn idempotent_by_event_id(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("idem-1"));
    let batch = evs("A", 3);
    let first = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, batch.clone()).await?;
    must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("B", 1)).await?;
    for exp in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Any,
        ExpectedVersion::Exact(Version::new(1)),
    ] {
        let again = ok(
            store.append_to(&tn, &st, exp, batch.clone()).await,
            "duplicate re-append",
        )?;
        ensure!(
            again.duplicate,
            "a fully duplicate batch must be reported as duplicate"
        );
        ensure_eq!(
            again.events,
            first.events,
            "a duplicate returns the original references"
        );
    }
    // Also when retried against another stream: the original reference wins.
    let other = ok(
        store
            .append_to(
                &tn,
                &s("idem-2"),
                ExpectedVersion::Any,
                batch[1..2].to_vec(),
            )
            .await,
        "dup on other stream",
    )?;
    ensure!(
        other.duplicate,
        "duplicate detection is per tenant, not per stream"
    );
    ensure_eq!(
        other.events,
        first.events[1..2].to_vec(),
        "original reference"
    );
    ensure_eq!(
        all_events(&*store).await?.len(),
        4,
        "duplicates must write nothing"
    );
    let got = ok(store.get_event(&tn, batch[0].event_id).await, "get_event")?;
    ensure!(
        got.is_some_and(|e| e.version == Version::new(1)),
        "get_event finds the original"
    );
    Ok(())
}

/// Events with an already stored dedup key (per tenant) are duplicates, even with a new id.
pub async fn idempotent_by_dedup_key(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("dedup-1"));
    let first = must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Any,
        vec![ev("A", 1).with_dedup_key("bag-1/loaded")],
    )
    .await?;
    let again = ok(
        store
            .append_to(
                &tn,
                &s("dedup-2"),
                ExpectedVersion::Any,
                vec![ev("A", 2).with_dedup_key("bag-1/loaded")],
            )
            .await,
        "re-append by dedup key",
    )?;
    ensure!(again.duplicate, "same dedup key must be a duplicate");
    ensure_eq!(again.events, first.events, "original reference");
    ensure_eq!(all_events(&*store).await?.len(), 1, "nothing written");
    // Dedup keys are per tenant.
    must_append(
        &*store,
        &t("other"),
        &st,
        ExpectedVersion::Any,
        vec![ev("A", 3).with_dedup_key("bag-1/loaded")],
    )
    .await?;
    Ok(())
}

/// The documented rule for a batch where some events are already stored and some are new:
/// the whole batch is rejected with `Error::Duplicate` naming the first stored one, and
/// nothing is written.
pub async fn partial_duplicate_batch_rejected(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("partial-1"));
    let old = evs("A", 2);
    let first = must_append(&*store, &tn, &st, ExpectedVersion::Any, old.clone()).await?;
    let mut mixed = evs("B", 2);
    mixed.push(old[1].clone());
    mixed.push(ev("B", 9));
    match store.append_to(&tn, &st, ExpectedVersion::Any, mixed).await {
        Err(Error::Duplicate { event_id, existing }) => {
            ensure_eq!(
                event_id,
                old[1].event_id,
                "Duplicate names the stored event"
            );
            ensure_eq!(
                existing,
                first.events[1],
                "Duplicate carries the original reference"
            );
        }
        other => {
            return Err(CheckFailure(format!(
                "a partly duplicate batch must be Error::Duplicate, got {other:?}"
            )));
        }
    }
    let mixed_key = vec![ev("C", 1), ev("C", 2).with_dedup_key("k")];
    must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Any,
        vec![ev("D", 0).with_dedup_key("k")],
    )
    .await?;
    let r = store
        .append_to(&tn, &st, ExpectedVersion::Any, mixed_key)
        .await;
    ensure!(
        matches!(r, Err(Error::Duplicate { .. })),
        "partly duplicate by dedup key must be Duplicate, got {r:?}"
    );
    ensure_eq!(
        stream_len(&*store, &tn, &st).await?,
        3,
        "a rejected batch writes nothing"
    );
    Ok(())
}

/// The same event id in another tenant is a different event (uniqueness is per tenant).
pub async fn event_ids_are_per_tenant(store: Arc<dyn EventStore>) -> CheckResult {
    let e = ev("A", 1);
    must_append(
        &*store,
        &t("t1"),
        &s("x"),
        ExpectedVersion::Any,
        vec![e.clone()],
    )
    .await?;
    must_append(
        &*store,
        &t("t2"),
        &s("x"),
        ExpectedVersion::Any,
        vec![e.clone()],
    )
    .await?;
    let a = ok(store.get_event(&t("t1"), e.event_id).await, "get")?;
    let b = ok(store.get_event(&t("t2"), e.event_id).await, "get")?;
    ensure!(a.is_some() && b.is_some(), "both tenants store their event");
    ensure!(
        a.map(|e| e.tenant) == Some(t("t1")),
        "get_event is tenant-scoped"
    );
    ensure!(
        ok(store.get_event(&t("t3"), e.event_id).await, "get")?.is_none(),
        "unknown tenant sees nothing"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reads

/// `read_stream` forwards and backwards, with `from` and `limit`; unknown streams read empty.
pub async fn read_stream_directions(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("rs-1"));
    must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("A", 10)).await?;
    must_append(&*store, &tn, &s("rs-2"), ExpectedVersion::Any, evs("Z", 3)).await?;
    let v = |r: Vec<RecordedEvent>| r.into_iter().map(|e| e.version.get()).collect::<Vec<_>>();
    let rs = |d: Direction, from: Option<u64>, limit: usize| {
        let req = match d {
            Direction::Forwards => ReadStream::forwards(tn.clone(), st.clone()),
            Direction::Backwards => ReadStream::backwards(tn.clone(), st.clone()),
        }
        .limit(limit);
        match from {
            Some(v) => req.from(Version::new(v)),
            None => req,
        }
    };
    use Direction::*;
    let cases: Vec<(ReadStream, Vec<u64>)> = vec![
        (rs(Forwards, None, usize::MAX), (1..=10).collect()),
        (rs(Forwards, Some(4), 3), vec![4, 5, 6]),
        (rs(Forwards, Some(9), 5), vec![9, 10]),
        (rs(Forwards, Some(11), 5), vec![]),
        (rs(Forwards, None, 0), vec![]),
        (rs(Backwards, None, usize::MAX), (1..=10).rev().collect()),
        (rs(Backwards, None, 2), vec![10, 9]),
        (rs(Backwards, Some(5), 3), vec![5, 4, 3]),
        (rs(Backwards, Some(2), 10), vec![2, 1]),
        (rs(Backwards, Some(50), 2), vec![10, 9]),
    ];
    for (req, want) in cases {
        let desc = format!(
            "{:?} from {:?} limit {}",
            req.direction, req.from, req.limit
        );
        let got = ok(store.read_stream(req).await, &desc)?;
        ensure!(
            got.iter().all(|e| e.stream == st && e.tenant == tn),
            "{desc}: events of another stream"
        );
        ensure_eq!(v(got), want, "{desc}");
    }
    ensure!(
        ok(store.read_stream_forwards(&tn, &s("missing")).await, "read")?.is_empty(),
        "unknown stream reads empty"
    );
    ensure_eq!(
        ok(store.stream_version(&tn, &s("missing")).await, "version")?,
        Version::ZERO,
        "unknown stream version"
    );
    Ok(())
}

/// `read_all` returns events in position order, pages with `limit`/`next` without loss or
/// repetition, and filters by tenant, event type and stream prefix.
pub async fn read_all_order_and_filters(store: Arc<dyn EventStore>) -> CheckResult {
    let mut expected = Vec::new();
    for i in 0..30u64 {
        let tn = if i % 3 == 0 { t("t1") } else { t("t2") };
        let st = if i % 2 == 0 {
            s(&format!("Bag-{}", i % 4))
        } else {
            s(&format!("Uld-{}", i % 5))
        };
        let e = ev(if i % 5 == 0 { "LOADED" } else { "SCANNED" }, i);
        expected.push((tn.clone(), st.clone(), e.event_type.clone(), e.event_id));
        must_append(&*store, &tn, &st, ExpectedVersion::Any, vec![e]).await?;
    }
    let all = all_events(&*store).await?;
    ensure_eq!(
        ids(&all),
        expected.iter().map(|x| x.3).collect::<Vec<_>>(),
        "read_all returns events in append order"
    );
    ensure!(
        all.windows(2).all(|w| w[0].position < w[1].position),
        "positions strictly increase"
    );
    // Paging with small limits: the concatenation equals the full read.
    for limit in [1usize, 7] {
        let got = page_all(&*store, EventFilter::default(), limit).await?;
        ensure_eq!(ids(&got), ids(&all), "paging with limit {limit}");
    }
    // Starting in the middle.
    let mid = all[10].position;
    let tail = ok(
        store.read_all(ReadAll::starting_at(mid, 1000)).await,
        "read_all from middle",
    )?;
    ensure_eq!(
        ids(&tail.events),
        ids(&all[10..]),
        "read_all from a position is inclusive"
    );
    // Filters.
    let f = |tenant: Option<&str>, types: &[&str], prefix: Option<&str>| {
        let f = EventFilter::default()
            .with_tenant(tenant.map(t))
            .with_event_types(types.iter().copied());
        match prefix {
            Some(p) => f.with_stream_prefix(p),
            None => f,
        }
    };
    for filter in [
        f(Some("t1"), &[], None),
        f(None, &["LOADED"], None),
        f(None, &["LOADED", "SCANNED"], Some("Bag-")),
        f(Some("t2"), &["SCANNED"], Some("Uld-")),
        f(Some("nobody"), &[], None),
    ] {
        let want: Vec<EventId> = all
            .iter()
            .filter(|e| filter.matches(e))
            .map(|e| e.event_id)
            .collect();
        let got = ok(
            store.read_all_to_end(Position::START, filter.clone()).await,
            "filtered read_all",
        )?;
        ensure!(
            got.iter().all(|e| filter.matches(e)),
            "filter {filter:?} let a non-matching event through"
        );
        ensure_eq!(ids(&got), want, "filter {filter:?}");
        // Filtered paging with limit 2 must also see everything.
        let paged = page_all(&*store, filter.clone(), 2).await?;
        ensure_eq!(ids(&paged), want, "filter {filter:?} paged by 2");
    }
    ensure_eq!(
        ok(store.head().await, "head")?,
        all.last().map_or(Position::START, |e| e.position),
        "head is the position of the last event"
    );
    Ok(())
}

/// Tenants are isolated: same stream ids are different streams, and tenant-scoped reads
/// never return another tenant's events.
pub async fn tenant_isolation(store: Arc<dyn EventStore>) -> CheckResult {
    let st = s("Bag-1");
    must_append(
        &*store,
        &t("t1"),
        &st,
        ExpectedVersion::NoStream,
        evs("A", 2),
    )
    .await?;
    must_append(
        &*store,
        &t("t2"),
        &st,
        ExpectedVersion::NoStream,
        evs("B", 3),
    )
    .await?;
    let a = ok(store.read_stream_forwards(&t("t1"), &st).await, "read t1")?;
    let b = ok(store.read_stream_forwards(&t("t2"), &st).await, "read t2")?;
    ensure!(
        a.len() == 2 && a.iter().all(|e| e.tenant == t("t1") && e.event_type == "A"),
        "t1 sees only its events"
    );
    ensure!(
        b.len() == 3 && b.iter().all(|e| e.tenant == t("t2") && e.event_type == "B"),
        "t2 sees only its events"
    );
    ensure_eq!(
        ok(store.stream_version(&t("t1"), &st).await, "v")?,
        Version::new(2),
        "t1 version"
    );
    let only_t2 = ok(
        store
            .read_all_to_end(Position::START, EventFilter::tenant(t("t2")))
            .await,
        "read_all t2",
    )?;
    ensure!(
        only_t2.len() == 3 && only_t2.iter().all(|e| e.tenant == t("t2")),
        "tenant filter of read_all"
    );
    ensure!(
        ok(store.get_event(&t("t2"), a[0].event_id).await, "get")?.is_none(),
        "get_event across tenants must find nothing"
    );
    Ok(())
}

/// All metadata round-trips: ids, dedup key, type, schema version, content type, payload,
/// correlation, causation, headers; `recorded_at` comes from the store clock.
pub async fn metadata_roundtrip(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("meta-1"));
    let mut headers = BTreeMap::new();
    headers.insert("source".to_string(), "BRS-MAD".to_string());
    headers.insert("ü-key".to_string(), String::new());
    let e = NewEvent::new("BagLoaded", "application/x-postcard", vec![0u8, 255, 1, 2])
        .with_dedup_key("dk-1")
        .with_schema_version(3)
        .with_metadata(
            Metadata::new()
                .with_correlation_id("corr-1")
                .with_causation_id("cause-1")
                .with_headers(headers),
        );
    let before = Timestamp::now();
    must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Any,
        vec![e.clone(), ev("Plain", 1)],
    )
    .await?;
    let after = Timestamp::now();
    let got = ok(store.read_stream_forwards(&tn, &st).await, "read")?;
    let r = &got[0];
    ensure_eq!(r.event_id, e.event_id, "event id");
    ensure_eq!(r.dedup_key, e.dedup_key, "dedup key");
    ensure_eq!(r.event_type, e.event_type, "event type");
    ensure_eq!(r.schema_version, 3, "schema version");
    ensure_eq!(r.content_type, e.content_type, "content type");
    ensure_eq!(r.payload, e.payload, "payload");
    ensure_eq!(r.metadata, e.metadata, "metadata");
    ensure_eq!(got[1].metadata, Metadata::default(), "empty metadata");
    ensure!(got[1].dedup_key.is_none(), "no dedup key");
    let slack = 2_000_000; // 2 s of clock skew between the store and this process
    ensure!(
        r.recorded_at.unix_micros() >= before.unix_micros() - slack
            && r.recorded_at.unix_micros() <= after.unix_micros() + slack,
        "recorded_at {:?} not between {:?} and {:?}",
        r.recorded_at,
        before,
        after
    );
    let by_id = ok(store.get_event(&tn, e.event_id).await, "get_event")?;
    ensure_eq!(by_id.as_ref(), Some(r), "get_event returns the same event");
    Ok(())
}

/// Payloads up to [`limits::MAX_PAYLOAD_BYTES`] are stored intact; larger ones are
/// rejected with `InvalidInput` and nothing is written.
pub async fn payload_size_limit(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("big-1"));
    let big: Vec<u8> = (0..limits::MAX_PAYLOAD_BYTES)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let e = NewEvent::new("Big", "application/octet-stream", big.clone());
    must_append(&*store, &tn, &st, ExpectedVersion::Any, vec![e]).await?;
    let got = ok(store.read_stream_forwards(&tn, &st).await, "read")?;
    ensure!(
        got.len() == 1 && got[0].payload == big,
        "max-size payload read back intact"
    );
    let mut too_big = vec![0u8; limits::MAX_PAYLOAD_BYTES + 1];
    too_big[0] = 1;
    let r = store
        .append_to(
            &tn,
            &st,
            ExpectedVersion::Any,
            vec![ev("ok", 1), NewEvent::new("Big", "x", too_big)],
        )
        .await;
    ensure!(
        matches!(r, Err(Error::InvalidInput { .. })),
        "oversized payload must be InvalidInput, got {r:?}"
    );
    ensure_eq!(all_events(&*store).await?.len(), 1, "nothing written");
    Ok(())
}

/// Invalid requests are rejected with `InvalidInput` and write nothing.
pub async fn invalid_input_rejected(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("inv-1"));
    let e = ev("A", 1);
    let mut bad_header = ev("A", 2);
    bad_header
        .metadata
        .headers
        .insert("h".into(), "v".repeat(limits::MAX_HEADER_VALUE_LEN + 1));
    let cases: Vec<(&str, Vec<NewEvent>)> = vec![
        ("empty batch", vec![]),
        (
            "empty event type",
            vec![NewEvent::new("", "x", Bytes::new())],
        ),
        (
            "control char in type",
            vec![NewEvent::new("A\u{0}", "x", Bytes::new())],
        ),
        ("schema version 0", vec![ev("A", 1).with_schema_version(0)]),
        ("same id twice", vec![e.clone(), e]),
        (
            "same dedup key twice",
            vec![
                ev("A", 1).with_dedup_key("k"),
                ev("A", 2).with_dedup_key("k"),
            ],
        ),
        ("oversized header", vec![bad_header]),
        ("too many events", evs("A", limits::MAX_BATCH_EVENTS + 1)),
    ];
    for (what, events) in cases {
        let r = store
            .append_to(&tn, &st, ExpectedVersion::Any, events)
            .await;
        ensure!(
            matches!(r, Err(Error::InvalidInput { .. })),
            "{what}: expected InvalidInput, got {r:?}"
        );
    }
    ensure_eq!(
        all_events(&*store).await?.len(),
        0,
        "invalid input writes nothing"
    );
    ensure_eq!(
        ok(store.head().await, "head")?,
        Position::START,
        "empty store head"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Concurrency and subscriptions

/// Many tasks append to one stream with `Exact` at the same moment, round after round:
/// exactly one winner per version, every loser gets a conflict carrying the new version, and
/// nothing is lost or doubled.
pub async fn concurrent_exact_appends(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("race-1"));
    const TASKS: usize = 8;
    const ROUNDS: usize = 12;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let (store, tn, st, barrier) = (store.clone(), tn.clone(), st.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..ROUNDS {
                barrier.wait().await;
                let v = store.stream_version(&tn, &st).await;
                // Everyone has read the version before anyone appends.
                barrier.wait().await;
                let v = v?;
                let e = ev("Race", task as u64);
                let id = e.event_id;
                let r = store
                    .append_to(&tn, &st, ExpectedVersion::Exact(v), vec![e])
                    .await;
                results.push((v, id, r));
            }
            Ok::<_, Error>(results)
        }));
    }
    let mut rounds: HashMap<
        Version,
        Vec<(
            EventId,
            tracktrace_core::Result<tracktrace_core::AppendOutcome>,
        )>,
    > = HashMap::new();
    for h in handles {
        let results = ok(
            h.await
                .map_err(|e| Error::invalid("task", e.to_string()))
                .and_then(|r| r),
            "racing appender",
        )?;
        for (v, id, r) in results {
            rounds.entry(v).or_default().push((id, r));
        }
    }
    ensure_eq!(
        rounds.len(),
        ROUNDS,
        "every round starts from the version the previous one produced"
    );
    let mut winners = HashMap::new();
    for (v, results) in rounds {
        let mut won = 0;
        for (id, r) in results {
            match r {
                Ok(out) => {
                    ensure!(
                        !out.duplicate && out.last_version() == v.next(),
                        "winner at {v} got {out:?}"
                    );
                    winners.insert(v.next(), id);
                    won += 1;
                }
                Err(Error::Conflict { actual, .. }) => {
                    ensure_eq!(
                        actual,
                        v.next(),
                        "a loser's conflict carries the winner's version"
                    )
                }
                Err(e) => {
                    return Err(CheckFailure(format!(
                        "racing append at {v}: unexpected error {e}"
                    )));
                }
            }
        }
        ensure_eq!(won, 1, "winners of the append at version {v}");
    }
    let events = ok(store.read_stream_forwards(&tn, &st).await, "read")?;
    ensure_eq!(events.len(), ROUNDS, "every won append stored exactly once");
    for e in &events {
        ensure_eq!(
            winners.get(&e.version),
            Some(&e.event_id),
            "the stored event at {} is its winner",
            e.version
        );
    }
    Ok(())
}

/// Many tasks race to append the *same* batch (a client retry racing its original): exactly
/// one append writes it, every other one gets the duplicate outcome with the same references,
/// and the log holds the batch once.
pub async fn concurrent_duplicate_appends(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("dup-race-1"));
    const TASKS: usize = 8;
    for round in 0..5 {
        let mut batch = evs("Retry", 3);
        batch[1].dedup_key = Some(format!("round-{round}"));
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut handles = Vec::new();
        for _ in 0..TASKS {
            let (store, tn, st, batch, barrier) = (
                store.clone(),
                tn.clone(),
                st.clone(),
                batch.clone(),
                barrier.clone(),
            );
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                store.append_to(&tn, &st, ExpectedVersion::Any, batch).await
            }));
        }
        let mut outcomes = Vec::new();
        for h in handles {
            let r = h.await.map_err(|e| CheckFailure(format!("task: {e}")))?;
            outcomes.push(ok(r, "racing duplicate append")?);
        }
        let writers = outcomes.iter().filter(|o| !o.duplicate).count();
        ensure_eq!(writers, 1, "appends that wrote the batch in round {round}");
        for o in &outcomes {
            ensure_eq!(
                o.events,
                outcomes[0].events,
                "every racer gets the same references"
            );
        }
    }
    let events = ok(store.read_stream_forwards(&tn, &st).await, "read")?;
    ensure_eq!(events.len(), 15, "each racing batch stored once");
    Ok(())
}

/// Many tasks append to many streams while a subscriber follows the global log: it sees every
/// event exactly once, in strictly increasing positions, and never finds a committed event
/// below a position it already passed (compared with a full read afterwards).
pub async fn concurrent_writers_with_subscriber(store: Arc<dyn EventStore>) -> CheckResult {
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;
    let total = WRITERS * APPENDS * 2;
    let sub_store = store.clone();
    let subscriber = tokio::spawn(async move {
        let mut sub = Subscription::new(sub_store, SubscribeOptions::default().with_batch_size(7));
        let mut seen = Vec::with_capacity(total);
        while seen.len() < total {
            let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .map_err(|_| {
                    Error::invalid("subscriber", format!("stalled after {} events", seen.len()))
                })??;
            seen.push(e);
        }
        Ok::<_, Error>(seen)
    });
    // A reader that follows `next` pointers by hand, concurrently with the writers.
    let pager_store = store.clone();
    let pager = tokio::spawn(async move {
        let mut seen = Vec::with_capacity(total);
        let mut next = Position::START;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < total && tokio::time::Instant::now() < deadline {
            let page = pager_store.read_all(ReadAll::starting_at(next, 5)).await?;
            if page.events.is_empty() {
                tokio::task::yield_now().await;
            }
            seen.extend(page.events);
            next = page.next;
        }
        Ok::<_, Error>(seen)
    });
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let tn = t(if w % 2 == 0 { "t1" } else { "t2" });
            for i in 0..APPENDS {
                let st = s(&format!("w{w}-s{}", i % 3));
                store
                    .append_to(&tn, &st, ExpectedVersion::Any, evs("Tick", 2))
                    .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for h in writers {
        ok(
            h.await
                .map_err(|e| Error::invalid("task", e.to_string()))
                .and_then(|r| r),
            "writer",
        )?;
    }
    let seen = ok(
        subscriber
            .await
            .map_err(|e| Error::invalid("task", e.to_string()))
            .and_then(|r| r),
        "subscriber",
    )?;
    let paged = ok(
        pager
            .await
            .map_err(|e| Error::invalid("task", e.to_string()))
            .and_then(|r| r),
        "pager",
    )?;
    let all = all_events(&*store).await?;
    ensure_eq!(all.len(), total, "every appended event is in the log");
    ensure!(
        all.windows(2).all(|w| w[0].position < w[1].position),
        "log positions strictly increase"
    );
    ensure!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "subscriber positions strictly increase"
    );
    let unique: HashSet<EventId> = seen.iter().map(|e| e.event_id).collect();
    ensure_eq!(unique.len(), seen.len(), "subscriber saw an event twice");
    ensure_eq!(
        ids(&seen),
        ids(&all),
        "the subscriber's sequence equals the final log (an event committed below a passed position would be missing)"
    );
    ensure_eq!(
        ids(&paged),
        ids(&all),
        "a concurrent pager following `next` equals the final log"
    );
    // Per-stream versions are contiguous.
    let mut per_stream: HashMap<(TenantId, StreamId), Vec<u64>> = HashMap::new();
    for e in &all {
        per_stream
            .entry((e.tenant.clone(), e.stream.clone()))
            .or_default()
            .push(e.version.get());
    }
    for (k, v) in per_stream {
        ensure_eq!(
            v,
            (1..=v.len() as u64).collect::<Vec<_>>(),
            "versions of {k:?} in log order"
        );
    }
    Ok(())
}

/// A subscription catches up from a position, then hands over to live delivery without loss
/// or duplication, honours filters, and an idle subscription waits instead of returning.
pub async fn subscription_catch_up_then_live(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("sub-1"));
    let first = must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("Old", 10)).await?;
    let mut sub = Subscription::new(
        store.clone(),
        SubscribeOptions::default().with_batch_size(3),
    );
    let mut from_mid = Subscription::new(
        store.clone(),
        SubscribeOptions::default().with_from(first.events[6].position),
    );
    let mut filtered = Subscription::new(
        store.clone(),
        SubscribeOptions::default().with_filter(EventFilter::default().with_event_types(["New"])),
    );
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(next_within(&mut sub, "catch-up").await?.event_id);
    }
    ensure_eq!(
        got,
        first.events.iter().map(|r| r.event_id).collect::<Vec<_>>(),
        "catch-up order"
    );
    let e = next_within(&mut from_mid, "from middle").await?;
    ensure_eq!(
        e.position,
        first.events[6].position,
        "subscription from a position is inclusive"
    );
    // Caught up: next() must wait.
    ensure!(
        tokio::time::timeout(Duration::from_millis(150), sub.next())
            .await
            .is_err(),
        "a caught-up subscription must wait for new events"
    );
    // Live: events appended while the subscriber waits are delivered.
    let waiter = tokio::spawn(async move {
        let mut out = Vec::new();
        for _ in 0..6 {
            out.push(
                tokio::time::timeout(Duration::from_secs(10), sub.next())
                    .await
                    .map_err(|_| Error::invalid("sub", "live event not delivered"))??,
            );
        }
        Ok::<_, Error>(out)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut live_ids = Vec::new();
    for i in 0..3 {
        let out = must_append(
            &*store,
            &tn,
            &st,
            ExpectedVersion::Any,
            vec![ev("New", i), ev("Other", i)],
        )
        .await?;
        live_ids.extend(out.events.iter().map(|r| r.event_id));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let live = ok(
        waiter
            .await
            .map_err(|e| Error::invalid("task", e.to_string()))
            .and_then(|r| r),
        "live",
    )?;
    ensure_eq!(
        ids(&live),
        live_ids,
        "live delivery after catch-up, no loss or duplicate"
    );
    for i in 0..3 {
        let e = next_within(&mut filtered, "filtered").await?;
        ensure!(
            e.event_type == "New",
            "filtered subscription delivered {}",
            e.event_type
        );
        ensure_eq!(e.event_id, live_ids[i * 2], "filtered order");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Read models, checkpoints, snapshots

/// `ReadModelStore`: puts, deletes, clears, ordered scans, and the checkpoint moved atomically
/// with the writes, fenced by the expected checkpoint.
pub async fn read_model_store(store: Arc<dyn ReadModelStore>) -> CheckResult {
    let put = |ns: &str, k: &str, v: &str| {
        ReadModelWrite::put(ns, k.as_bytes().to_vec(), v.as_bytes().to_vec())
    };
    ensure_eq!(
        ok(store.load_checkpoint("p").await, "load")?,
        None,
        "no checkpoint yet"
    );
    ok(
        store
            .commit(
                ReadModelBatch::new("p", None, Position::new(5)).with_writes(vec![
                    put("tl", "a/1", "x"),
                    put("tl", "a/2", "y"),
                    put("tl", "b/1", "z"),
                    put("other", "a/1", "o"),
                    put("tl", "a/3", "w"),
                ]),
            )
            .await,
        "first commit",
    )?;
    ensure_eq!(
        ok(store.load_checkpoint("p").await, "load")?,
        Some(Position::new(5)),
        "checkpoint moved"
    );
    ensure_eq!(
        ok(store.get("tl", b"a/2").await, "get")?,
        Some(Bytes::from_static(b"y")),
        "get"
    );
    ensure_eq!(
        ok(store.get("tl", b"zz").await, "get")?,
        None,
        "missing key"
    );
    let keys = |v: Vec<(Bytes, Bytes)>| {
        v.into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect::<Vec<_>>()
    };
    ensure_eq!(
        keys(ok(
            store
                .scan("tl", KeyRange::prefix(b"a/"), Direction::Forwards, 10)
                .await,
            "scan"
        )?),
        vec!["a/1", "a/2", "a/3"],
        "prefix scan"
    );
    ensure_eq!(
        keys(ok(
            store
                .scan("tl", KeyRange::prefix(b"a/"), Direction::Backwards, 2)
                .await,
            "scan"
        )?),
        vec!["a/3", "a/2"],
        "reverse scan with limit"
    );
    ensure_eq!(
        keys(ok(
            store
                .scan(
                    "tl",
                    KeyRange::new(b"a/2".to_vec(), Some(b"b/1".to_vec())),
                    Direction::Forwards,
                    10
                )
                .await,
            "scan"
        )?),
        vec!["a/2", "a/3"],
        "range scan is [start, end)"
    );
    ensure_eq!(
        keys(ok(
            store
                .scan("tl", KeyRange::default(), Direction::Forwards, 10)
                .await,
            "scan"
        )?),
        vec!["a/1", "a/2", "a/3", "b/1"],
        "full scan"
    );
    // Fenced: a stale expected checkpoint writes nothing.
    let r = store
        .commit(
            ReadModelBatch::new("p", Some(Position::new(4)), Position::new(9))
                .with_writes(vec![put("tl", "c/1", "bad")]),
        )
        .await;
    ensure!(
        matches!(r, Err(Error::CheckpointMoved { .. })),
        "stale expected checkpoint must be CheckpointMoved, got {r:?}"
    );
    ensure_eq!(
        ok(store.get("tl", b"c/1").await, "get")?,
        None,
        "a fenced commit writes nothing"
    );
    ensure_eq!(
        ok(store.load_checkpoint("p").await, "load")?,
        Some(Position::new(5)),
        "a fenced commit keeps the checkpoint"
    );
    // Delete, overwrite, clear.
    ok(
        store
            .commit(
                ReadModelBatch::new("p", Some(Position::new(5)), Position::new(8)).with_writes(
                    vec![
                        ReadModelWrite::delete("tl", b"a/1".to_vec()),
                        put("tl", "a/2", "y2"),
                        ReadModelWrite::clear("other"),
                        put("other", "n", "1"),
                    ],
                ),
            )
            .await,
        "second commit",
    )?;
    ensure_eq!(ok(store.get("tl", b"a/1").await, "get")?, None, "deleted");
    ensure_eq!(
        ok(store.get("tl", b"a/2").await, "get")?,
        Some(Bytes::from_static(b"y2")),
        "overwritten"
    );
    ensure_eq!(
        keys(ok(
            store
                .scan("other", KeyRange::default(), Direction::Forwards, 10)
                .await,
            "scan"
        )?),
        vec!["n"],
        "clear then put"
    );
    // Plain checkpoints share the namespace of names.
    ok(store.save_checkpoint("q", Position::new(3)).await, "save")?;
    ensure_eq!(
        ok(store.load_checkpoint("q").await, "load")?,
        Some(Position::new(3)),
        "save/load checkpoint"
    );
    ok(store.save_checkpoint("q", Position::new(7)).await, "save")?;
    ensure_eq!(
        ok(store.load_checkpoint("q").await, "load")?,
        Some(Position::new(7)),
        "checkpoint overwritten"
    );
    ensure_eq!(
        ok(store.load_checkpoint("p").await, "load")?,
        Some(Position::new(8)),
        "checkpoints independent"
    );
    Ok(())
}

/// `SnapshotStore`: latest snapshot per stream; an older one never replaces a newer one.
pub async fn snapshot_store(store: Arc<dyn SnapshotStore>) -> CheckResult {
    let snap = |tn: &str, st: &str, v: u64, p: &'static [u8]| {
        Snapshot::new(t(tn), s(st), Version::new(v), 1, Bytes::from_static(p))
    };
    ensure_eq!(
        ok(store.load_snapshot(&t("a"), &s("x")).await, "load")?,
        None,
        "no snapshot"
    );
    ok(
        store.save_snapshot(snap("a", "x", 10, b"ten")).await,
        "save",
    )?;
    ok(
        store
            .save_snapshot(snap("b", "x", 3, b"other tenant"))
            .await,
        "save",
    )?;
    ensure_eq!(
        ok(store.load_snapshot(&t("a"), &s("x")).await, "load")?,
        Some(snap("a", "x", 10, b"ten")),
        "load"
    );
    ok(
        store.save_snapshot(snap("a", "x", 4, b"older")).await,
        "save older",
    )?;
    ensure_eq!(
        ok(store.load_snapshot(&t("a"), &s("x")).await, "load")?.map(|s| s.version),
        Some(Version::new(10)),
        "an older snapshot never replaces a newer one"
    );
    ok(
        store.save_snapshot(snap("a", "x", 20, b"twenty")).await,
        "save newer",
    )?;
    ensure_eq!(
        ok(store.load_snapshot(&t("a"), &s("x")).await, "load")?,
        Some(snap("a", "x", 20, b"twenty")),
        "newer replaces"
    );
    ensure_eq!(
        ok(store.load_snapshot(&t("b"), &s("x")).await, "load")?.map(|s| s.payload),
        Some(Bytes::from_static(b"other tenant")),
        "per tenant"
    );
    ensure_eq!(
        ok(store.load_snapshot(&t("a"), &s("y")).await, "load")?,
        None,
        "per stream"
    );
    Ok(())
}

/// `position_at` finds where a time window starts: for every probe time, the result is the
/// lowest position of an event recorded at or after it (so nothing below it was recorded at or
/// after the probe, and a read from it finds every such event); past the last event it is a
/// position above every stored event. Appends are spread over time (short sleeps) so several
/// distinct recorded-at values exist.
pub async fn position_at_finds_window_starts(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, other) = (t("acme"), t("other"));
    let before = Timestamp::from_unix_micros(Timestamp::now().unix_micros() - 60_000_000);
    let empty = ok(
        store.position_at(before).await,
        "position_at on an empty store",
    )?;
    for i in 0..6u64 {
        let tenant = if i % 2 == 0 { &tn } else { &other };
        let n = (i % 3 + 1) as usize;
        must_append(
            &*store,
            tenant,
            &s(&format!("pos-at-{}", i % 2)),
            ExpectedVersion::Any,
            evs("Timed", n),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let log = all_events(&*store).await?;
    ensure!(log.len() >= 12, "expected 12 events, read {}", log.len());
    ensure!(
        empty <= log[0].position,
        "position_at before any event was {empty} on an empty store, above the first event {}",
        log[0].position
    );
    let last = log.last().map(|e| e.position).unwrap_or_default();
    // Probe at every distinct recorded-at, one microsecond before and after it, and outside.
    let mut probes: Vec<Timestamp> = vec![before];
    for e in &log {
        let us = e.recorded_at.unix_micros();
        probes.extend([us - 1, us, us + 1].map(Timestamp::from_unix_micros));
    }
    probes.sort();
    probes.dedup();
    let mut previous = Position::START;
    for at in probes {
        let got = ok(store.position_at(at).await, "position_at")?;
        let expected = log
            .iter()
            .filter(|e| e.recorded_at >= at)
            .map(|e| e.position)
            .min();
        match expected {
            Some(p) => ensure!(
                got == p,
                "position_at({at:?}) = {got}, but the first event recorded at or after it is at {p}"
            ),
            None => ensure!(
                got > last,
                "position_at({at:?}) = {got}: nothing was recorded at or after it, so the result \
                 must be past the last event {last}"
            ),
        }
        ensure!(
            got >= previous,
            "position_at went backwards for a later time"
        );
        previous = got;
        // A read from the result finds every event recorded at or after `at`.
        let page = ok(
            store.read_all_to_end(got, EventFilter::default()).await,
            "read from position_at",
        )?;
        let found = page.iter().filter(|e| e.recorded_at >= at).count();
        let all = log.iter().filter(|e| e.recorded_at >= at).count();
        ensure_eq!(
            found,
            all,
            "events recorded at or after {at:?} read from {got}"
        );
    }
    Ok(())
}

/// [`EventStore::store_stats`] counts stored events, whatever their positions: after single
/// appends, a batch, concurrent appends (to distinct streams, which backends may group, and to
/// one stream), a duplicate (stores nothing), a partly duplicate batch, a conflict and an
/// invalid batch (all rejected), `events` is exactly the number of events `read_all` finds,
/// and a store holding events uses bytes. A store that does not report stats (`None` on the
/// fresh store) passes; one that does must keep reporting them.
pub async fn store_stats_count_events(store: Arc<dyn EventStore>) -> CheckResult {
    let Some(fresh) = ok(store.store_stats().await, "store_stats of a fresh store")? else {
        return Ok(());
    };
    ensure_eq!(fresh.events, 0, "events reported by a fresh store");
    let (tn, st) = (t("acme"), s("stats-1"));
    let first = ev("Counted", 0);
    must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::NoStream,
        vec![first.clone()],
    )
    .await?;
    must_append(
        &*store,
        &tn,
        &st,
        ExpectedVersion::Exact(Version::new(1)),
        evs("Counted", 5),
    )
    .await?;
    must_append(
        &*store,
        &t("other"),
        &st,
        ExpectedVersion::Any,
        evs("Counted", 3),
    )
    .await?;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let store = store.clone();
        let stream = if i < 16 {
            s(&format!("stats-c{i}"))
        } else {
            s("stats-shared")
        };
        tasks.push(tokio::spawn(async move {
            store
                .append_to(
                    &t("acme"),
                    &stream,
                    ExpectedVersion::Any,
                    vec![ev("Counted", i)],
                )
                .await
        }));
    }
    for task in tasks {
        let out = ok(
            task.await
                .map_err(|e| Error::backend("a concurrent append task panicked", e)),
            "concurrent append task",
        )?;
        let out = ok(out, "concurrent append")?;
        ensure!(!out.duplicate, "a new event was reported as duplicate");
    }
    let stored = 1 + 5 + 3 + 24;
    // Rejected or duplicate appends store nothing.
    let again = ok(
        store
            .append_to(&tn, &st, ExpectedVersion::Any, vec![first.clone()])
            .await,
        "re-append of a stored event",
    )?;
    ensure!(again.duplicate, "a re-appended event must be a duplicate");
    let partly = store
        .append_to(
            &tn,
            &st,
            ExpectedVersion::Any,
            vec![ev("Counted", 9), first],
        )
        .await;
    ensure!(
        matches!(partly, Err(Error::Duplicate { .. })),
        "a partly duplicate batch must be Duplicate, got {partly:?}"
    );
    let conflict = store
        .append_to(&tn, &st, ExpectedVersion::NoStream, evs("Counted", 2))
        .await;
    ensure!(
        matches!(conflict, Err(Error::Conflict { .. })),
        "NoStream on an existing stream must be a Conflict, got {conflict:?}"
    );
    let invalid = store
        .append_to(&tn, &st, ExpectedVersion::Any, Vec::new())
        .await;
    ensure!(
        matches!(invalid, Err(Error::InvalidInput { .. })),
        "an empty batch must be InvalidInput, got {invalid:?}"
    );

    let log = all_events(&*store).await?;
    ensure_eq!(log.len() as u64, stored, "events read_all finds");
    let Some(after) = ok(store.store_stats().await, "store_stats")? else {
        return Err(CheckFailure(
            "store_stats reported stats on the fresh store, then None".into(),
        ));
    };
    ensure_eq!(
        after.events,
        stored,
        "store_stats().events after {stored} stored events (last position {})",
        log.last().map_or(0, |e| e.position.get())
    );
    ensure!(
        after.bytes > 0,
        "a store holding {stored} events reports 0 bytes"
    );
    Ok(())
}

/// Generates one test per event-store conformance check plus the model-based property test.
/// `$make` is the path of an `async fn() -> Arc<dyn EventStore>` returning a fresh store.
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::__conformance_tests!($make;
            expected_version_any, expected_version_no_stream, expected_version_stream_exists,
            expected_version_exact, versions_start_at_one, atomic_batches, idempotent_by_event_id,
            idempotent_by_dedup_key, partial_duplicate_batch_rejected, event_ids_are_per_tenant,
            read_stream_directions, read_all_order_and_filters, tenant_isolation,
            metadata_roundtrip, payload_size_limit, invalid_input_rejected,
            concurrent_exact_appends, concurrent_duplicate_appends, concurrent_writers_with_subscriber,
            subscription_catch_up_then_live, position_at_finds_window_starts,
            store_stats_count_events, stream_keys_do_not_collide, tenant_filter_is_exact,
            stream_prefix_is_literal, dedup_keys_compared_in_full, versions_are_64_bit,
            full_events_on_every_read_path, long_streams_read_in_full,
            batches_become_visible_whole, duplicate_refs_in_request_order,
            duplicate_error_names_the_stored_event, racing_dedup_keys_store_one,
            limits_enforced_at_the_bounds, position_at_past_the_end, watch_head_carries_the_head,
            recorded_at_consistent_under_concurrency, paged_reads_match_full_reads);

        #[test]
        fn conformance_model_based_proptest() {
            if let Err(e) = $crate::store::model_test(|| $make(), 24) {
                panic!("model-based test failed: {e}");
            }
        }
    };
}

/// Generates the `ReadModelStore` conformance test (`$make`: `async fn() -> Arc<dyn ReadModelStore>`).
#[macro_export]
macro_rules! read_model_tests {
    ($make:path) => {
        $crate::__conformance_tests!($make; read_model_store, read_model_commit_none_is_fenced,
            read_model_writes_apply_in_order);
    };
}

/// Generates the `SnapshotStore` conformance test (`$make`: `async fn() -> Arc<dyn SnapshotStore>`).
#[macro_export]
macro_rules! snapshot_tests {
    ($make:path) => {
        $crate::__conformance_tests!($make; snapshot_store, snapshot_same_version_replaces);
    };
}

/// Generates the checks for backends whose `recorded_at` never decreases along the log (a
/// single writer with a monotonic clock: in-memory, sled; not PostgreSQL, whose recorded-at is
/// the transaction's start). `$make`: `async fn() -> Arc<dyn EventStore>`.
#[macro_export]
macro_rules! monotonic_clock_tests {
    ($make:path) => {
        $crate::__conformance_tests!($make; recorded_at_never_decreases);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($make:path; $($check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::store::run(async {
                    let store = $make().await;
                    if let Err(e) = $crate::store::$check(store).await {
                        panic!("conformance check `{}` failed: {e}", stringify!($check));
                    }
                });
            }
        )+
    };
}
