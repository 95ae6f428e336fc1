//! Group appends (`PgStoreOptions::append_groups`): concurrent single-event appends that share
//! one statement keep every single-append rule: preconditions, conflicts with the actual
//! version, duplicates by event id and by dedup key, and a gap-free log read back in order.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Barrier;
use tracktrace_core::{
    AppendOutcome, Error, EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion,
    NewEvent, Position, Result, StreamId, TenantId, Version,
};

/// What one concurrent caller does.
#[derive(Clone)]
enum Job {
    /// A new stream, `NoStream`.
    Fresh(StreamId),
    /// `Exact(1)` on the contended stream (which holds one event): exactly one may win.
    Contend,
    /// The same event (same id) to the same new stream, twice at once.
    SameEvent(StreamId, NewEvent),
    /// Different events with one dedup key, to two different streams.
    SameKey(StreamId, String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_appends_keep_every_single_append_rule() {
    // One slot: every caller that finds it busy is queued and grouped.
    let Some(store) = common::try_store_with(|o| o.max_connections(8).append_groups(1)).await
    else {
        return;
    };
    let store = Arc::new(store);
    let tenant = TenantId::parse("grouped").unwrap();
    let contended = StreamId::parse("Contended").unwrap();
    store
        .append_to(
            &tenant,
            &contended,
            ExpectedVersion::NoStream,
            vec![NewEvent::json("Opened", &serde_json::json!({}))],
        )
        .await
        .unwrap();

    for round in 0..3 {
        let mut jobs = Vec::new();
        for i in 0..24 {
            jobs.push(Job::Fresh(
                StreamId::parse(format!("Fresh-{round}-{i}")).unwrap(),
            ));
        }
        for _ in 0..6 {
            jobs.push(Job::Contend);
        }
        for i in 0..3 {
            let e = NewEvent::json("Twice", &serde_json::json!({"i": i}));
            let s = StreamId::parse(format!("Twice-{round}-{i}")).unwrap();
            jobs.push(Job::SameEvent(s.clone(), e.clone()));
            jobs.push(Job::SameEvent(s, e));
        }
        for i in 0..3 {
            let key = format!("key-{round}-{i}");
            jobs.push(Job::SameKey(
                StreamId::parse(format!("KeyA-{round}-{i}")).unwrap(),
                key.clone(),
            ));
            jobs.push(Job::SameKey(
                StreamId::parse(format!("KeyB-{round}-{i}")).unwrap(),
                key,
            ));
        }
        fastrand::shuffle(&mut jobs);

        let barrier = Arc::new(Barrier::new(jobs.len()));
        let mut tasks = Vec::new();
        for job in jobs.clone() {
            let (store, tenant, contended, barrier) = (
                store.clone(),
                tenant.clone(),
                contended.clone(),
                barrier.clone(),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                run(&*store, &tenant, &contended, job, round).await
            }));
        }
        let mut results = Vec::new();
        for (job, t) in jobs.iter().zip(tasks) {
            results.push((job.clone(), t.await.unwrap()));
        }

        // Fresh streams: all stored at version 1.
        // Contended: exactly one wins (version round + 2); the others conflict with it.
        let mut winners = 0;
        // Same event twice: one stored, one duplicate with the same reference.
        let mut by_id: HashMap<EventId, Vec<AppendOutcome>> = HashMap::new();
        // Same key: one stored, one duplicate naming the stored one.
        let mut by_key: HashMap<String, Vec<AppendOutcome>> = HashMap::new();
        for (job, res) in results {
            match job {
                Job::Fresh(stream) => {
                    let out = res.expect("append to a fresh stream");
                    assert!(!out.duplicate);
                    assert_eq!(out.events[0].stream, stream);
                    assert_eq!(out.events[0].version, Version::new(1));
                }
                Job::Contend => match res {
                    Ok(out) => {
                        winners += 1;
                        assert_eq!(out.events[0].version, Version::new(round + 2));
                    }
                    Err(Error::Conflict {
                        expected, actual, ..
                    }) => {
                        assert_eq!(expected, ExpectedVersion::Exact(Version::new(round + 1)));
                        assert_eq!(actual, Version::new(round + 2));
                    }
                    Err(e) => panic!("contended append: unexpected error {e}"),
                },
                Job::SameEvent(_, e) => {
                    by_id
                        .entry(e.event_id)
                        .or_default()
                        .push(res.expect("same event twice"));
                }
                Job::SameKey(_, key) => {
                    by_key
                        .entry(key)
                        .or_default()
                        .push(res.expect("same dedup key"));
                }
            }
        }
        assert_eq!(
            winners, 1,
            "round {round}: exactly one contended append wins"
        );
        for (id, outs) in by_id {
            assert_eq!(outs.len(), 2);
            assert_eq!(
                outs.iter().filter(|o| o.duplicate).count(),
                1,
                "event {id}: one original, one duplicate"
            );
            assert_eq!(outs[0].events, outs[1].events, "both name the stored event");
        }
        for (key, outs) in by_key {
            assert_eq!(outs.len(), 2);
            assert_eq!(
                outs.iter().filter(|o| o.duplicate).count(),
                1,
                "key {key}: one original, one duplicate"
            );
            assert_eq!(outs[0].events, outs[1].events, "both name the stored event");
        }
    }

    // The log: every event once, positions strictly increasing, and grouping did happen
    // (events sharing one transaction id, i.e. one `position / 1024`).
    let log = store
        .read_all_to_end(Position::START, EventFilter::default())
        .await
        .unwrap();
    // 1 + 3 rounds x (24 fresh + 1 contended winner + 3 same-event + 3 same-key)
    assert_eq!(log.len(), 1 + 3 * 31);
    let mut ids = std::collections::HashSet::new();
    for w in log.windows(2) {
        assert!(w[0].position < w[1].position, "positions strictly increase");
    }
    for e in &log {
        assert!(ids.insert(e.event_id), "event {} stored once", e.event_id);
    }
    let mut per_xid: HashMap<u64, usize> = HashMap::new();
    for e in &log {
        *per_xid.entry(e.position.get() / 1024).or_default() += 1;
    }
    assert!(
        per_xid.values().any(|&n| n > 1),
        "some single-event appends shared a transaction"
    );
}

async fn run(
    store: &dyn EventStore,
    tenant: &TenantId,
    contended: &StreamId,
    job: Job,
    round: u64,
) -> Result<AppendOutcome> {
    match job {
        Job::Fresh(stream) => {
            store
                .append_to(
                    tenant,
                    &stream,
                    ExpectedVersion::NoStream,
                    vec![NewEvent::json("Fresh", &serde_json::json!({}))],
                )
                .await
        }
        Job::Contend => {
            store
                .append_to(
                    tenant,
                    contended,
                    ExpectedVersion::Exact(Version::new(round + 1)),
                    vec![NewEvent::json("Contended", &serde_json::json!({}))],
                )
                .await
        }
        Job::SameEvent(stream, e) => {
            store
                .append_to(tenant, &stream, ExpectedVersion::Any, vec![e])
                .await
        }
        Job::SameKey(stream, key) => {
            store
                .append_to(
                    tenant,
                    &stream,
                    ExpectedVersion::Any,
                    vec![NewEvent::json("Keyed", &serde_json::json!({})).with_dedup_key(key)],
                )
                .await
        }
    }
}

/// Many callers on a few shared streams (`Any`): groups running at once race for the same
/// versions; every append ends stored exactly once, and each stream's versions are 1..=n.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_appends_racing_on_shared_streams_store_everything_once() {
    let Some(store) = common::try_store_with(|o| o.max_connections(8).append_groups(3)).await
    else {
        return;
    };
    let store = Arc::new(store);
    let tenant = TenantId::parse("racing").unwrap();
    const STREAMS: usize = 5;
    const TASKS: usize = 24;
    const EACH: usize = 20;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, tenant) = (store.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..EACH {
                let stream = StreamId::parse(format!("Shared-{}", (t + i) % STREAMS)).unwrap();
                let e = NewEvent::json("Raced", &serde_json::json!({"t": t, "i": i}));
                ids.push(e.event_id);
                let out = store
                    .append_to(&tenant, &stream, ExpectedVersion::Any, vec![e])
                    .await
                    .expect("append with Any never conflicts");
                assert!(!out.duplicate);
            }
            ids
        }));
    }
    let mut written = std::collections::HashSet::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    assert_eq!(written.len(), TASKS * EACH);
    let mut total = 0;
    for s in 0..STREAMS {
        let stream = StreamId::parse(format!("Shared-{s}")).unwrap();
        let events = store.read_stream_forwards(&tenant, &stream).await.unwrap();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.version, Version::new(i as u64 + 1), "versions are 1..=n");
            assert!(written.contains(&e.event_id));
        }
        total += events.len();
    }
    assert_eq!(total, TASKS * EACH, "every append stored exactly once");
    let log = store
        .read_all_to_end(Position::START, EventFilter::default())
        .await
        .unwrap();
    assert_eq!(log.len(), TASKS * EACH);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
}

/// The group queue is bounded (`PgStoreOptions::max_queued_appends`): beyond it an append
/// fails at once with `Overloaded` and writes nothing; every acknowledged append is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_group_queue_refuses_appends_without_writing() {
    let Some(store) =
        common::try_store_with(|o| o.max_connections(4).append_groups(1).max_queued_appends(1))
            .await
    else {
        return;
    };
    let store = Arc::new(store);
    let tenant = TenantId::parse("bounded").unwrap();
    let start = Arc::new(Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (store, tenant, start) = (store.clone(), tenant.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let s = StreamId::parse(format!("q-{i}")).unwrap();
            start.wait().await;
            store
                .append_to(
                    &tenant,
                    &s,
                    ExpectedVersion::NoStream,
                    vec![NewEvent::json("E", &serde_json::json!({"i": i}))],
                )
                .await
        }));
    }
    let (mut stored, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => stored += 1,
            Err(e @ Error::Overloaded { .. }) => {
                assert!(e.is_retryable());
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(refused > 0, "200 appenders never found a queue of 1 full");
    let all = store
        .read_all_to_end(Position::START, EventFilter::default().with_tenant(tenant))
        .await
        .unwrap();
    assert_eq!(all.len(), stored, "every acknowledged append, nothing else");
}
