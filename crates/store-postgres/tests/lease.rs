//! Leases: one holder at a time per name and schema; a holder whose connection is killed
//! (`pg_terminate_backend`) learns that it lost the lease, and another process takes it.

mod common;

use std::time::Duration;

use tracktrace_store_postgres::{PgStore, PgStoreOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time_and_a_killed_holder_is_replaced() {
    let Some(a) = common::try_store().await else {
        return;
    };
    let app = format!("tt-lease-{}", a.store.schema());
    let b = PgStore::connect_with(
        PgStoreOptions::new(common::url())
            .schema(a.store.schema())
            .application_name(&app),
    )
    .await
    .expect("second store on the schema");

    let held = a
        .store
        .try_lease("projections")
        .await
        .unwrap()
        .expect("free lease");
    assert!(held.is_held());
    assert!(
        b.try_lease("projections").await.unwrap().is_none(),
        "two holders"
    );
    // Names are independent.
    let other = b
        .try_lease("publisher")
        .await
        .unwrap()
        .expect("another name is free");
    drop(other);
    // ... and so are schemas (a store in another schema sees its own leases).
    let c = common::store().await;
    assert!(c.store.try_lease("projections").await.unwrap().is_some());

    // Dropping releases: b takes it, then a cannot.
    drop(held);
    let held_b = b.lease("projections", Duration::from_millis(20)).await;
    assert!(a.store.try_lease("projections").await.unwrap().is_none());

    // Kill b's lease connection: b learns it lost the lease, and a gets it.
    let admin = sqlx::PgPool::connect(&common::url()).await.unwrap();
    let pid: i32 =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
            .bind(format!("{app}-lease"))
            .fetch_one(&admin)
            .await
            .expect("b's lease connection");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::timeout(Duration::from_secs(30), held_b.lost())
        .await
        .expect("the holder notices the lost lease");
    assert!(!held_b.is_held());
    let held_a = tokio::time::timeout(
        Duration::from_secs(30),
        a.store.lease("projections", Duration::from_millis(20)),
    )
    .await
    .expect("the lease is free again");
    assert!(held_a.is_held());
}
