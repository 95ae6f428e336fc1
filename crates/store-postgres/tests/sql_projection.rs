//! SQL projections: a projection writes its own table in the transaction that moves its
//! checkpoint — exactly once across failures, fenced against a second runner, rebuildable,
//! live with read-your-writes.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgConnection;
use tracktrace_core::{
    BoxError, CheckpointStore, Error, EventFilter, EventStoreExt, ExpectedVersion, NewEvent,
    Position, RecordedEvent, StreamId, TenantId,
};
use tracktrace_store_postgres::{PgStore, SqlProjection, SqlProjectionRunner};

/// Scans per bag and the last station, in table `bag_scans`. Not idempotent on purpose
/// (`scans = scans + 1`): only an exactly-once commit keeps the counts right. Fails on an event
/// whose station is `"POISON"` while `poison` is set.
struct BagScans {
    poison: bool,
}

#[async_trait]
impl SqlProjection for BagScans {
    fn name(&self) -> &str {
        "bag-scans"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_event_types(["Scanned"])
    }

    async fn setup(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS bag_scans (
                 tenant text NOT NULL, bag text NOT NULL, station text NOT NULL,
                 scans bigint NOT NULL, PRIMARY KEY (tenant, bag))",
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn apply(&mut self, e: &RecordedEvent, conn: &mut PgConnection) -> Result<(), BoxError> {
        let body: serde_json::Value = serde_json::from_slice(&e.payload)?;
        let station = body["station"].as_str().ok_or("Scanned without station")?;
        if self.poison && station == "POISON" {
            return Err("poisoned event".into());
        }
        sqlx::query(
            "INSERT INTO bag_scans (tenant, bag, station, scans) VALUES ($1, $2, $3, 1)
             ON CONFLICT (tenant, bag) DO UPDATE
             SET station = EXCLUDED.station, scans = bag_scans.scans + 1",
        )
        .bind(e.tenant.as_str())
        .bind(e.stream.as_str())
        .bind(station)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn reset(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
        sqlx::query("TRUNCATE bag_scans").execute(conn).await?;
        Ok(())
    }
}

async fn scan(store: &PgStore, bag: u32, station: &str) -> Position {
    let out = store
        .append_to(
            &TenantId::from_static("acme"),
            &StreamId::parse(format!("Bag-{bag}")).unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::json(
                "Scanned",
                &serde_json::json!({ "station": station }),
            )],
        )
        .await
        .unwrap();
    out.last_position()
}

async fn rows(store: &PgStore) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT bag, station, scans FROM bag_scans ORDER BY bag")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_builds_and_queries_its_own_table_exactly_once() {
    let Some(s) = common::try_store().await else {
        return;
    };
    let store = s.store.clone();
    for i in 0..30u32 {
        scan(&store, i % 3, if i < 27 { "MAD" } else { "LHR" }).await;
    }
    // Noise the filter skips.
    store
        .append_to(
            &TenantId::from_static("acme"),
            &StreamId::from_static("Flight-1"),
            ExpectedVersion::Any,
            vec![NewEvent::json("Departed", &serde_json::json!({}))],
        )
        .await
        .unwrap();

    let mut runner =
        SqlProjectionRunner::new(store.clone(), BagScans { poison: true }).with_batch_size(7);
    let cp = runner.catch_up().await.unwrap();
    assert_eq!(
        cp,
        store.load_checkpoint("bag-scans").await.unwrap().unwrap()
    );
    assert_eq!(
        rows(&store).await,
        vec![
            ("Bag-0".into(), "LHR".into(), 10),
            ("Bag-1".into(), "LHR".into(), 10),
            ("Bag-2".into(), "LHR".into(), 10),
        ]
    );

    // A poisoned event fails its batch: nothing of the batch (not even the events before it)
    // and no checkpoint move is committed.
    scan(&store, 0, "CDG").await;
    scan(&store, 1, "POISON").await;
    let err = runner.catch_up().await.unwrap_err();
    assert!(err.to_string().contains("poisoned"), "{err}");
    assert_eq!(
        store.load_checkpoint("bag-scans").await.unwrap(),
        Some(cp),
        "checkpoint unchanged"
    );
    assert_eq!(rows(&store).await[0], ("Bag-0".into(), "LHR".into(), 10));

    // A second runner that loaded the checkpoint before the first moves it is fenced off.
    let mut stale = SqlProjectionRunner::new(store.clone(), BagScans { poison: false });
    assert_eq!(stale.checkpoint().await.unwrap(), Some(cp));
    let mut fixed = SqlProjectionRunner::new(store.clone(), BagScans { poison: false });
    fixed.catch_up().await.unwrap();
    assert_eq!(
        rows(&store).await,
        vec![
            ("Bag-0".into(), "CDG".into(), 11),
            ("Bag-1".into(), "POISON".into(), 11),
            ("Bag-2".into(), "LHR".into(), 10),
        ]
    );
    let fenced = stale.step().await.unwrap_err();
    assert!(
        matches!(fenced.store_error(), Some(Error::CheckpointMoved { .. })),
        "{fenced:?}"
    );
    assert_eq!(
        rows(&store).await[0].2,
        11,
        "the fenced batch wrote nothing"
    );

    // A rebuild empties the table and replays: the same counts.
    let before = rows(&store).await;
    fixed.rebuild().await.unwrap();
    assert_eq!(rows(&store).await, before);

    // Live, with read-your-writes through the progress handle.
    let progress = fixed.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move { fixed.run(async { stopped.await.unwrap_or(()) }).await });
    for i in 0..5 {
        let at = scan(&store, 2, &format!("ST{i}")).await;
        tokio::time::timeout(Duration::from_secs(10), progress.wait_for(at))
            .await
            .expect("wait_for timed out")
            .unwrap();
        assert_eq!(
            rows(&store).await[2],
            ("Bag-2".into(), format!("ST{i}"), 11 + i)
        );
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
