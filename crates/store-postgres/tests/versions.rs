//! Stream versions without a lookup, and the xid offset as an inlined constant.
//!
//! An append to a stream this process appended to before inserts at the remembered version + 1
//! (checked by the database), and an `Exact(v)` append at `v + 1`. These tests make the
//! remembered versions stale on purpose — a second store (another process) appends to the same
//! streams in between — and check that versions stay contiguous, every event is stored once,
//! and conflicts report the actual version; with group appends on and off.
//! The offset test simulates a restore into a cluster whose transaction ids are lower than the
//! stored positions: after `migrate`, appends of every connected store (cached plans included)
//! get positions above the stored ones. And stream lookups have a single candidate index, so no
//! generic plan can scan a tenant's whole log instead.

mod common;

use std::sync::Arc;

use tracktrace_core::{
    Error, EventFilter, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, StreamId,
    TenantId, Version,
};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};

fn ev(i: usize) -> NewEvent {
    NewEvent::json("Scanned", &serde_json::json!({ "i": i }))
}

/// The `i` of an [`ev`] payload.
fn i_of(payload: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(payload).unwrap()["i"]
        .as_u64()
        .unwrap()
}

/// A second store on the schema of `first` (as another process would connect).
async fn second(first: &PgStore, groups: usize) -> PgStore {
    PgStore::connect_with(
        PgStoreOptions::new(common::url())
            .schema(first.schema())
            .append_groups(groups),
    )
    .await
    .expect("second store")
}

async fn stale_hints_never_misplace_an_event(groups: usize) {
    let Some(a) = common::try_store_with(|o| o.append_groups(groups)).await else {
        return;
    };
    let b = Arc::new(second(&a.store, groups).await);
    let (_schema, a) = (&a, Arc::new(a.store.clone()));
    let tenant = TenantId::parse("hints").unwrap();
    let streams: Vec<StreamId> = (0..4)
        .map(|i| StreamId::parse(format!("Bag-{i}")).unwrap())
        .collect();
    let mut written = 0;
    for round in 0..12 {
        // Both stores append to every stream, concurrently: each store's remembered version is
        // stale after the other's append.
        let mut tasks = Vec::new();
        for (k, s) in streams.iter().enumerate() {
            for (who, store) in [
                ("a", a.clone() as Arc<dyn EventStore>),
                ("b", b.clone() as Arc<dyn EventStore>),
            ] {
                let (tenant, s) = (tenant.clone(), s.clone());
                // `a` appends batches of two (the batch statement), `b` single events.
                let i = round * 100 + k * 4 + if who == "b" { 3 } else { 0 };
                let events = if who == "a" {
                    vec![ev(i), ev(i + 1)]
                } else {
                    vec![ev(i)]
                };
                tasks.push(tokio::spawn(async move {
                    store
                        .append_to(&tenant, &s, ExpectedVersion::Any, events)
                        .await
                        .map(|o| o.events[0].version)
                }));
            }
        }
        for t in tasks {
            t.await.unwrap().expect("append with a stale hint");
            written += 1;
        }
    }
    for s in &streams {
        let events = a.read_stream_forwards(&tenant, s).await.unwrap();
        let versions: Vec<u64> = events.iter().map(|e| e.version.get()).collect();
        assert_eq!(versions, (1..=36).collect::<Vec<u64>>(), "stream {s}");
        let mut payloads: Vec<&[u8]> = events.iter().map(|e| &e.payload[..]).collect();
        payloads.sort();
        payloads.dedup();
        assert_eq!(payloads.len(), 36, "every append stored once in {s}");
        // A batch's events are consecutive.
        for w in events.windows(2) {
            let (x, y) = (i_of(&w[0].payload), i_of(&w[1].payload));
            if x % 4 == 0 {
                assert_eq!(y, x + 1, "batch split in {s}");
            }
        }
    }
    assert_eq!(written, 12 * 4 * 2);

    // Store `a` remembers Bag-0 at a version `b` has since moved past.
    let s = &streams[0];
    b.append_to(&tenant, s, ExpectedVersion::Any, vec![ev(1000)])
        .await
        .unwrap();
    // An expected version behind the stream, and one ahead of it, for a single event and a
    // batch: conflicts with the actual one.
    for expected in [36, 40] {
        for n in [1, 2] {
            match a
                .append_to(
                    &tenant,
                    s,
                    ExpectedVersion::Exact(Version::new(expected)),
                    (0..n)
                        .map(|j| ev(2000 + expected as usize * 2 + j))
                        .collect(),
                )
                .await
            {
                Err(Error::Conflict { actual, .. }) => assert_eq!(actual, Version::new(37)),
                other => panic!("Exact({expected}) on a stream at 37: {other:?}"),
            }
        }
    }
    // `Any` through the stale hint lands right after the other store's event.
    let out = a
        .append_to(&tenant, s, ExpectedVersion::Any, vec![ev(3000)])
        .await
        .unwrap();
    assert_eq!(out.events[0].version, Version::new(38));
    let out = a
        .append_to(
            &tenant,
            s,
            ExpectedVersion::Exact(Version::new(38)),
            vec![ev(3001), ev(3002)],
        )
        .await
        .unwrap();
    assert_eq!(out.events[0].version, Version::new(39));
    let n = a.read_stream_forwards(&tenant, s).await.unwrap().len();
    assert_eq!(n, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_hints_never_misplace_an_event_alone() {
    stale_hints_never_misplace_an_event(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_hints_never_misplace_an_event_grouped() {
    stale_hints_never_misplace_an_event(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raised_xid_offset_reaches_connected_stores() {
    let Some(a) = common::try_store_with(|o| o.append_groups(0)).await else {
        return;
    };
    let b = second(&a.store, 0).await;
    let tenant = TenantId::parse("offset").unwrap();
    let sid = |s: &str| StreamId::parse(s).unwrap();
    // Both stores have run (and cached) their append statements.
    a.store
        .append_to(&tenant, &sid("A"), ExpectedVersion::NoStream, vec![ev(1)])
        .await
        .unwrap();
    b.append_to(&tenant, &sid("B"), ExpectedVersion::NoStream, vec![ev(2)])
        .await
        .unwrap();
    b.append_to(&tenant, &sid("B"), ExpectedVersion::Any, vec![ev(3)])
        .await
        .unwrap();

    // A restored log whose positions come from transaction ids far above this cluster's.
    let restored: i64 = sqlx::query_scalar(
        "INSERT INTO events (position, tenant, stream, version, event_id, event_type,
                             schema_version, content_type, payload, recorded_at)
         VALUES ((pg_current_xact_id()::text::bigint + 1000000) * 1024, 'offset', 'Restored',
                 1, gen_random_uuid(), 'Restored', 1, 'application/json', '\\x7b7d', now())
         RETURNING position",
    )
    .fetch_one(a.store.pool())
    .await
    .unwrap();
    a.store.migrate().await.unwrap();

    // Every append statement: an expected version (a), a remembered one (b), a new stream
    // (b), a batch (a); none of them may take the careful path here.
    let appends = [
        (
            "a",
            &a.store,
            "A",
            ExpectedVersion::Exact(Version::new(1)),
            1,
        ),
        ("b", &b, "B", ExpectedVersion::Any, 1),
        ("b", &b, "C", ExpectedVersion::NoStream, 1),
        ("a", &a.store, "D", ExpectedVersion::Any, 2),
    ];
    for (who, store, stream, expected, n) in appends {
        let out = store
            .append_to(&tenant, &sid(stream), expected, (0..n).map(ev).collect())
            .await
            .unwrap();
        for e in &out.events {
            assert!(
                e.position.get() > restored as u64,
                "store {who}, stream {stream}: new position {} not above the restored {restored}",
                e.position
            );
        }
    }
    // Readers following the log see the restored event, then the new ones.
    let all = a
        .store
        .read_all_to_end(Position::START, EventFilter::default())
        .await
        .unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.position.get()).collect();
    assert_eq!(positions.len(), 9);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(positions[3], restored as u64);
}

/// Stream lookups (`tenant = $1 AND stream = $2 ORDER BY version`) must have exactly one
/// candidate index: a second full index led by `tenant` let generic plans made while the table
/// was small filter and sort the tenant's whole log instead (migration 5).
#[tokio::test]
async fn stream_lookups_have_one_candidate_index() {
    let Some(s) = common::try_store().await else {
        return;
    };
    let led_by_tenant: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text
         FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = 'events'::regclass AND a.attname = 'tenant'
           AND i.indpred IS NULL
         ORDER BY 1",
    )
    .fetch_all(s.store.pool())
    .await
    .unwrap();
    assert_eq!(led_by_tenant, vec!["events_stream_version_key".to_owned()]);
}
