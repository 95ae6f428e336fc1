//! The `LISTEN` connection of a store is killed with `pg_terminate_backend` mid-stream: the
//! store reconnects, wakes its subscribers, and the subscription loses nothing.
//!
//! The events of the second half are written by a store that sends no `NOTIFY` at all, before
//! the kill: the subscriber (on a third store) can only learn about them through the wake-up
//! that follows the listener's reconnection.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, StreamId, SubscribeOptions, Subscription,
    TenantId,
};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};

const BEFORE: usize = 50;
const AFTER: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listener_reconnects_and_the_subscription_loses_nothing() {
    let Some(writer) = common::try_store().await else {
        return;
    };
    // A second store on the same schema: its subscriber can only learn about the writer's
    // commits through LISTEN/NOTIFY (or the reconnect wake-up), never through local wake-ups.
    let app = format!("tt-test-{}", writer.store.schema());
    let reader = PgStore::connect_with(
        PgStoreOptions::new(common::url())
            .schema(writer.store.schema())
            .application_name(&app),
    )
    .await
    .expect("second store");
    let silent = PgStore::connect_with(
        PgStoreOptions::new(common::url())
            .schema(writer.store.schema())
            .notify(false)
            .listen(false),
    )
    .await
    .expect("silent writer");
    let listener_app = format!("{app}-listener");
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&common::url())
        .await
        .unwrap();
    let listener_pids = || async {
        sqlx::query_scalar::<_, i32>("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
            .bind(&listener_app)
            .fetch_all(&admin)
            .await
            .unwrap()
    };

    let reader: Arc<dyn EventStore> = Arc::new(reader);
    let tenant = TenantId::parse("acme").unwrap();
    let stream = StreamId::parse("Bag-1").unwrap();
    let mut ids = Vec::new();
    let mut append = |i: usize, store: &PgStore| {
        let e = NewEvent::json("Scanned", &serde_json::json!({ "i": i }));
        ids.push(e.event_id);
        let (w, t, s) = (store.clone(), tenant.clone(), stream.clone());
        async move {
            w.append_to(&t, &s, ExpectedVersion::Any, vec![e])
                .await
                .unwrap()
        }
    };

    // Wait for the listener to be connected (it starts in the background).
    let first = loop {
        let pids = listener_pids().await;
        if let Some(p) = pids.first() {
            break *p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The subscriber runs in its own task and parks on the store's wake-ups between reads.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = tokio::spawn(async move {
        let mut sub = Subscription::new(reader, SubscribeOptions::default());
        loop {
            let e = sub.next().await.expect("subscription");
            if tx.send(e.event_id).is_err() {
                return;
            }
        }
    });

    // First half: announced by NOTIFY as usual.
    for i in 0..BEFORE {
        append(i, &writer.store).await;
    }
    let mut got = Vec::new();
    while got.len() < BEFORE {
        got.push(rx.recv().await.expect("consumer alive"));
    }
    // Let trailing notifications arrive; the consumer reads nothing more and parks again.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Second half: unannounced. Nothing wakes the parked subscriber...
    for i in BEFORE..BEFORE + AFTER {
        append(i, &silent).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "the subscriber woke up without a notification; the test cannot tell reconnection apart"
    );

    // ... until its listener's backend is killed and the listener reconnects.
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(killed, "could not terminate the listener backend {first}");

    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while got.len() < BEFORE + AFTER {
            got.push(rx.recv().await.expect("consumer alive"));
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "the subscription stalled after the listener was killed ({} of {} events)",
        got.len(),
        BEFORE + AFTER
    );
    assert_eq!(got, ids, "events lost, duplicated or reordered");
    // The subscriber was woken by the reconnection, so the new listener is up.
    let now = listener_pids().await;
    assert!(
        !now.is_empty() && !now.contains(&first),
        "the listener did not reconnect on a new backend: {now:?}"
    );
    consumer.abort();
    admin.close().await;
}
