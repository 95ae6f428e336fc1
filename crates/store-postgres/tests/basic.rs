//! Quick end-to-end checks of the PostgreSQL store (the full conformance suite is in
//! conformance.rs), and its event count (`store_stats`).

mod common;

use std::sync::Arc;

use tracktrace_core::{
    Error, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, ReadAll, ReadStream,
    StreamId, SubscribeOptions, Subscription, TenantId, Version,
};

fn ev(t: &str) -> NewEvent {
    NewEvent::json(t, &serde_json::json!({"t": t}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_conflict_duplicate() {
    let Some(s) = common::try_store().await else {
        return;
    };
    let t = TenantId::parse("acme").unwrap();
    let b = StreamId::parse("Bag-1").unwrap();
    let mut e1 = ev("A");
    e1.metadata.correlation_id = Some("corr".into());
    e1.metadata.headers.insert("h".into(), "v".into());
    let out = s
        .append_to(
            &t,
            &b,
            ExpectedVersion::NoStream,
            vec![e1.clone(), ev("B").with_dedup_key("k1")],
        )
        .await
        .unwrap();
    assert!(!out.duplicate);
    assert_eq!(out.last_version(), Version::new(2));
    assert!(out.events[1].position > out.events[0].position);

    let again = s
        .append_to(&t, &b, ExpectedVersion::NoStream, vec![e1.clone()])
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events[0], out.events[0]);
    // dedup key with another id
    let again = s
        .append_to(
            &t,
            &b,
            ExpectedVersion::Any,
            vec![ev("X").with_dedup_key("k1")],
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events[0], out.events[1]);
    // partial duplicate
    let err = s
        .append_to(&t, &b, ExpectedVersion::Any, vec![ev("N"), e1.clone()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Duplicate { .. }), "{err:?}");
    // conflict
    let err = s
        .append_to(
            &t,
            &b,
            ExpectedVersion::Exact(Version::new(1)),
            vec![ev("C")],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { actual, .. } if actual == Version::new(2)),
        "{err:?}"
    );
    let err = s
        .append_to(
            &t,
            &StreamId::parse("none").unwrap(),
            ExpectedVersion::StreamExists,
            vec![ev("C")],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { actual, .. } if actual == Version::ZERO),
        "{err:?}"
    );
    s.append_to(
        &t,
        &b,
        ExpectedVersion::Exact(Version::new(2)),
        vec![ev("C")],
    )
    .await
    .unwrap();
    s.append_to(&t, &b, ExpectedVersion::StreamExists, vec![ev("D")])
        .await
        .unwrap();
    s.append_to(&t, &b, ExpectedVersion::Any, vec![ev("E")])
        .await
        .unwrap();

    let all = s.read_stream_forwards(&t, &b).await.unwrap();
    let types: Vec<_> = all.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["A", "B", "C", "D", "E"]);
    assert_eq!(all[0].metadata, e1.metadata);
    assert_eq!(all[0].payload, e1.payload);
    assert_eq!(all[1].dedup_key.as_deref(), Some("k1"));
    let back = s
        .read_stream(
            ReadStream::backwards(t.clone(), b.clone())
                .from(Version::new(4))
                .limit(2),
        )
        .await
        .unwrap();
    assert_eq!(
        back.iter().map(|e| e.version.get()).collect::<Vec<_>>(),
        [4, 3]
    );
    assert_eq!(s.stream_version(&t, &b).await.unwrap(), Version::new(5));

    let page = s
        .read_all(ReadAll::starting_at(Position::START, 3))
        .await
        .unwrap();
    assert_eq!(page.events.len(), 3);
    let rest = s
        .read_all(ReadAll::starting_at(page.next, 100))
        .await
        .unwrap();
    assert_eq!(rest.events.len(), 2);
    assert_eq!(s.head().await.unwrap(), rest.events[1].position);
    assert!(rest.next > rest.events[1].position);
    let got = s.get_event(&t, e1.event_id).await.unwrap().unwrap();
    assert_eq!(got, all[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_goes_live() {
    let Some(s) = common::try_store().await else {
        return;
    };
    let s = Arc::new(s);
    let t = TenantId::parse("acme").unwrap();
    let b = StreamId::parse("Bag-1").unwrap();
    let mut sub = Subscription::new(s.clone(), SubscribeOptions::default());
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                s.append_to(&t, &b, ExpectedVersion::Any, vec![ev(&format!("E{i}"))])
                    .await
                    .unwrap();
            }
        })
    };
    for i in 0..20 {
        assert_eq!(sub.next().await.unwrap().event_type, format!("E{i}"));
    }
    writer.await.unwrap();
}

/// Appends through `tt_append` inside an explicit transaction that the test keeps open.
async fn open_append(
    conn: &mut sqlx::PgConnection,
    store: &tracktrace_store_postgres::PgStore,
    stream: &str,
) {
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "SELECT * FROM tt_append($1, 'acme', $2, 0::smallint, 0, false, ARRAY[gen_random_uuid()], \
         ARRAY[NULL::text], ARRAY['Held'], ARRAY[1], ARRAY['application/json'], ARRAY['\\x7b7d'::bytea], \
         ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::text])",
    )
    .bind(lock_key_of(store))
    .bind(stream)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
}

/// The store's advisory-lock key (FNV-1a of the schema, as in the crate).
fn lock_key_of(store: &tracktrace_store_postgres::PgStore) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in store.schema().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff).max(1) as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_in_flight_holds_back_the_global_log_until_it_ends() {
    use sqlx::ConnectOptions;
    let Some(s) = common::try_store().await else {
        return;
    };
    let t = TenantId::parse("acme").unwrap();
    let opts: sqlx::postgres::PgConnectOptions = common::url().parse().unwrap();
    let mut held = opts
        .options([("search_path", s.store.schema())])
        .connect()
        .await
        .unwrap();

    for commit in [true, false] {
        let before = s
            .read_all(ReadAll::starting_at(Position::START, 1000))
            .await
            .unwrap();
        // An append that has its transaction id but has not committed ...
        open_append(&mut held, &s.store, "Held").await;
        // ... and a later one that commits.
        let later = s
            .append_to(
                &t,
                &StreamId::parse("Later").unwrap(),
                ExpectedVersion::Any,
                vec![ev("L")],
            )
            .await
            .unwrap();
        // The later event exists (stream reads see it) but the global log must not show it yet:
        // the held append would commit below it.
        assert_eq!(
            s.read_stream_forwards(&t, &StreamId::parse("Later").unwrap())
                .await
                .unwrap()
                .len(),
            if commit { 1 } else { 2 }
        );
        let page = s
            .read_all(ReadAll::starting_at(before.next, 1000))
            .await
            .unwrap();
        assert!(
            page.events.is_empty(),
            "read_all returned {:?} past an append in flight",
            page.events
        );
        assert!(page.next <= later.last_position());
        assert!(s.head().await.unwrap() < later.last_position());

        let end = if commit { "COMMIT" } else { "ROLLBACK" };
        sqlx::raw_sql(end).execute(&mut held).await.unwrap();
        let page = s
            .read_all(ReadAll::starting_at(before.next, 1000))
            .await
            .unwrap();
        let types: Vec<_> = page.events.iter().map(|e| e.event_type.as_str()).collect();
        if commit {
            assert_eq!(
                types,
                ["Held", "L"],
                "the held append sorts before the later one"
            );
        } else {
            assert_eq!(types, ["L"]);
        }
        assert_eq!(s.head().await.unwrap(), later.last_position());
    }
}

async fn events_counted(store: &dyn EventStore) -> u64 {
    store
        .store_stats()
        .await
        .unwrap()
        .expect("PgStore reports stats")
        .events
}

/// The count is of events, not positions (which follow transaction ids), and exact at the read
/// horizon: an append in flight, and a later one that committed above it, count once the held
/// one has ended (rolled back: only the later one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stats_count_events_below_the_read_horizon() {
    use sqlx::ConnectOptions;
    let Some(s) = common::try_store().await else {
        return;
    };
    let t = TenantId::parse("acme").unwrap();
    assert_eq!(events_counted(&s).await, 0);
    for i in 0..5 {
        s.append_to(
            &t,
            &StreamId::parse(format!("Bag-{i}")).unwrap(),
            ExpectedVersion::NoStream,
            vec![ev("A"), ev("B")],
        )
        .await
        .unwrap();
    }
    assert_eq!(events_counted(&s).await, 10);
    let head = s.head().await.unwrap().get();
    assert!(
        head >= 1024,
        "positions follow transaction ids: head {head}"
    );
    let fresh = s.store_stats().await.unwrap().unwrap();
    assert!(fresh.bytes > 0, "{fresh:?}");

    let opts: sqlx::postgres::PgConnectOptions = common::url().parse().unwrap();
    let mut held = opts
        .options([("search_path", s.store.schema())])
        .connect()
        .await
        .unwrap();
    let mut counted = 10;
    for commit in [true, false] {
        open_append(&mut held, &s.store, "Held").await;
        s.append_to(
            &t,
            &StreamId::parse("Later").unwrap(),
            ExpectedVersion::Any,
            vec![ev("L")],
        )
        .await
        .unwrap();
        // Neither is below the horizon yet.
        assert_eq!(events_counted(&s).await, counted);
        let end = if commit { "COMMIT" } else { "ROLLBACK" };
        sqlx::raw_sql(end).execute(&mut held).await.unwrap();
        counted += if commit { 2 } else { 1 };
        assert_eq!(events_counted(&s).await, counted);
        let log = s
            .read_all(ReadAll::starting_at(Position::START, 1000))
            .await
            .unwrap();
        assert_eq!(log.events.len() as u64, counted);
    }
}

/// Several processes (stores) on one schema share the count: each call counts only what was
/// appended since the last call of any of them, and every one reports the exact total. A
/// schema migrated before the count existed is counted once when migration 7 runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stats_are_shared_by_processes_and_counted_on_upgrade() {
    let Some(s) = common::try_store().await else {
        return;
    };
    let other = tracktrace_store_postgres::PgStore::connect_with(
        tracktrace_store_postgres::PgStoreOptions::new(common::url()).schema(s.store.schema()),
    )
    .await
    .unwrap();
    let t = TenantId::parse("acme").unwrap();
    let mut total = 0;
    for round in 0..3u64 {
        for (i, store) in [&s.store, &other].into_iter().enumerate() {
            let n = round as usize + i + 1;
            store
                .append_to(
                    &t,
                    &StreamId::parse(format!("R{round}-{i}")).unwrap(),
                    ExpectedVersion::NoStream,
                    (0..n).map(|_| ev("X")).collect(),
                )
                .await
                .unwrap();
            total += n as u64;
        }
        assert_eq!(events_counted(&other).await, total);
        assert_eq!(events_counted(&s).await, total);
    }
    let (below, stored): (i64, i64) = sqlx::query_as("SELECT below, events FROM event_count")
        .fetch_one(s.store.pool())
        .await
        .unwrap();
    assert_eq!(stored as u64, total);
    assert!(below as u64 > s.head().await.unwrap().get());

    // A schema from before migration 7: the table and its row appear on the next connect,
    // with the events already stored.
    sqlx::raw_sql("DROP TABLE event_count; DELETE FROM tt_migrations WHERE version = 7")
        .execute(s.store.pool())
        .await
        .unwrap();
    drop(other);
    let upgraded = tracktrace_store_postgres::PgStore::connect_with(
        tracktrace_store_postgres::PgStoreOptions::new(common::url()).schema(s.store.schema()),
    )
    .await
    .unwrap();
    assert_eq!(events_counted(&upgraded).await, total);
    upgraded
        .append_to(
            &t,
            &StreamId::parse("After").unwrap(),
            ExpectedVersion::Any,
            vec![ev("Y")],
        )
        .await
        .unwrap();
    assert_eq!(events_counted(&upgraded).await, total + 1);
    assert_eq!(events_counted(&s).await, total + 1);
}
