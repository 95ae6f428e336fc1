//! 8 concurrent writers x 500 appends while a subscriber follows the global log: every event
//! arrives exactly once with strictly increasing positions, and a reader started afterwards
//! sees the identical sequence.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tracktrace_core::{
    EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, StreamId,
    SubscribeOptions, Subscription, TenantId, Version,
};

const WRITERS: usize = 8;
const APPENDS: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_a_live_subscriber_agree_on_one_gap_free_log() {
    let Some(store) = common::try_store_with(|o| o.max_connections(12)).await else {
        return;
    };
    let store = Arc::new(store);
    let tenant = TenantId::parse("stress").unwrap();
    let total = WRITERS * APPENDS;

    // The subscriber starts before the writers and follows them live.
    let sub_store: Arc<dyn EventStore> = store.clone();
    let progress = Arc::new(std::sync::Mutex::new(Vec::<(Position, EventId)>::new()));
    let prog = progress.clone();
    let subscriber = tokio::spawn(async move {
        let mut sub = Subscription::new(sub_store, SubscribeOptions::default());
        let mut seen = Vec::with_capacity(total);
        while seen.len() < total {
            let e = sub.next().await.expect("subscription");
            seen.push((e.position, e.event_id));
            prog.lock().unwrap().push((e.position, e.event_id));
        }
        seen
    });

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let tenant = tenant.clone();
        writers.push(tokio::spawn(async move {
            let own = StreamId::parse(format!("Writer-{w}")).unwrap();
            let shared = StreamId::parse("Shared").unwrap();
            let mut ids = Vec::with_capacity(APPENDS);
            let mut version = Version::ZERO;
            for i in 0..APPENDS {
                let e = NewEvent::json("Stressed", &serde_json::json!({"w": w, "i": i}));
                ids.push(e.event_id);
                if i % 10 == 0 {
                    // Contended stream: every writer, no version check.
                    store
                        .append_to(&tenant, &shared, ExpectedVersion::Any, vec![e])
                        .await
                        .expect("append to the shared stream");
                } else {
                    let out = store
                        .append_to(&tenant, &own, ExpectedVersion::Exact(version), vec![e])
                        .await
                        .expect("append to the own stream");
                    version = out.last_version();
                }
            }
            ids
        }));
    }
    let mut written: HashSet<EventId> = HashSet::with_capacity(total);
    for w in writers {
        written.extend(w.await.expect("writer task"));
    }
    assert_eq!(written.len(), total);

    let seen = match tokio::time::timeout(Duration::from_secs(60), subscriber).await {
        Ok(seen) => seen.expect("subscriber task"),
        Err(_) => {
            let stored = store
                .read_all_to_end(Position::START, EventFilter::default())
                .await
                .unwrap();
            let got = progress.lock().unwrap().clone();
            let got_ids: HashSet<EventId> = got.iter().map(|(_, id)| *id).collect();
            let missing: Vec<Position> = stored
                .iter()
                .filter(|e| !got_ids.contains(&e.event_id))
                .map(|e| e.position)
                .collect();
            panic!(
                "the subscriber stalled after {} of {total} events; read_all now finds {}; \
                 missing positions {missing:?}; subscriber's last position {:?} \
                 (missing below it = a skipped event, above it = a lost wake-up)",
                got.len(),
                stored.len(),
                got.last().map(|(p, _)| *p),
            );
        }
    };
    for pair in seen.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "positions not strictly increasing: {pair:?}"
        );
    }
    let seen_ids: HashSet<EventId> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(seen_ids.len(), total, "an event was delivered twice");
    assert_eq!(
        seen_ids, written,
        "the subscriber's events differ from the written ones"
    );

    // A reader started afterwards sees exactly the same sequence.
    let later: Vec<(Position, EventId)> = store
        .read_all_to_end(Position::START, EventFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.position, e.event_id))
        .collect();
    assert_eq!(later, seen);

    // Streams have contiguous versions.
    for w in 0..WRITERS {
        let s = StreamId::parse(format!("Writer-{w}")).unwrap();
        let events = store.read_stream_forwards(&tenant, &s).await.unwrap();
        let versions: Vec<u64> = events.iter().map(|e| e.version.get()).collect();
        assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    }
    let shared = store
        .read_stream_forwards(&tenant, &StreamId::parse("Shared").unwrap())
        .await
        .unwrap();
    assert_eq!(shared.len(), WRITERS * APPENDS.div_ceil(10));
    assert!(
        shared
            .iter()
            .enumerate()
            .all(|(i, e)| e.version.get() == i as u64 + 1)
    );
}
