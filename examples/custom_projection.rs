//! A custom typed projection (flight manifests built from `BagLoaded` events, decoded into a
//! struct) with a persisted checkpoint: catch-up, lag, live updates read back with `wait_for`,
//! and a rebuild, on the embedded sled store, where the read model and the checkpoint commit
//! atomically. Run it with:
//! `cargo run -p tracktrace-examples --example custom_projection`

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracktrace_core::{
    BoxError, Codec, Direction, DomainEvent, EventFilter, EventStoreExt, ExpectedVersion,
    JsonCodec, KeyRange, Position, ProjectionRunner, ReadModelStore, ReadModelTx, RecordedEvent,
    StreamId, TenantId, TypedProjection,
};

/// The event the projection reads: stored as JSON `{"flight": "IB3170"}`.
#[derive(Debug, Serialize, Deserialize)]
struct BagLoaded {
    flight: String,
}

impl DomainEvent for BagLoaded {
    fn event_type(&self) -> &'static str {
        "BagLoaded"
    }
}

/// Bags per flight: key `"{flight}/{bag}"` in namespace `manifest`, and a count per flight in
/// namespace `manifest.count`.
struct Manifest;

#[async_trait]
impl TypedProjection for Manifest {
    type Event = BagLoaded;
    type Codec = JsonCodec;

    fn name(&self) -> &str {
        "manifest"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_event_types(["BagLoaded"])
    }

    fn namespaces(&self) -> Vec<String> {
        vec!["manifest".into(), "manifest.count".into()]
    }

    async fn apply(
        &mut self,
        bag: &BagLoaded,
        e: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        let flight = bag.flight.as_str();
        tx.put(
            "manifest",
            format!("{flight}/{}", e.stream),
            e.event_id.to_string(),
        );
        // Not idempotent on purpose: the atomic commit is what keeps the count exact.
        let n: u64 = tx
            .get_json("manifest.count", flight.as_bytes())
            .await?
            .unwrap_or(0);
        tx.put_json("manifest.count", flight, &(n + 1))?;
        Ok(())
    }
}

async fn load_bag(
    store: &impl EventStoreExt,
    tenant: &TenantId,
    bag: u32,
    flight: &str,
) -> Result<Position, BoxError> {
    let stream = StreamId::parse(format!("Bag-{bag:04}"))?;
    let event = JsonCodec::new_event(
        "BagLoaded",
        1,
        &BagLoaded {
            flight: flight.to_owned(),
        },
    )?;
    let out = store
        .append_to(tenant, &stream, ExpectedVersion::Any, vec![event])
        .await?;
    Ok(out.last_position())
}

async fn count(store: &dyn ReadModelStore, flight: &str) -> Result<u64, BoxError> {
    Ok(
        match store.get("manifest.count", flight.as_bytes()).await? {
            Some(v) => serde_json::from_slice(&v)?,
            None => 0,
        },
    )
}

/// Runs the example; returns the manifest of IB3170 (bag keys).
pub(crate) async fn run() -> Result<Vec<String>, BoxError> {
    let store = Arc::new(tracktrace_examples::temporary_store()?);
    let tenant = TenantId::parse("acme-air")?;
    for bag in 0..300 {
        let flight = if bag % 3 == 0 { "UX1097" } else { "IB3170" };
        load_bag(&*store, &tenant, bag, flight).await?;
    }

    let mut runner =
        ProjectionRunner::typed(store.clone(), store.clone(), Manifest).with_batch_size(64);
    runner.step().await?;
    let lag = runner.lag_handle().get();
    println!(
        "after one batch: checkpoint {}, lag {} positions",
        lag.checkpoint, lag.positions
    );
    let cp = runner.catch_up().await?;
    println!(
        "caught up at {cp}: IB3170 has {} bags",
        count(&*store, "IB3170").await?
    );

    // Live: the runner sleeps on the store's notifications until new events arrive; the
    // progress handle waits until a write is reflected (read-your-writes).
    let progress = runner.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(async move {
        runner.run(async { stopped.await.unwrap_or(()) }).await?;
        Ok::<_, tracktrace_core::ProjectionError>(runner)
    });
    let written = load_bag(&*store, &tenant, 1000, "IB3170").await?;
    tokio::time::timeout(Duration::from_secs(10), progress.wait_for(written)).await??;
    let _ = stop.send(());
    let mut runner = live.await??;
    println!(
        "live update: IB3170 now has {} bags",
        count(&*store, "IB3170").await?
    );

    // Rebuild from position 0: the namespaces are cleared and the log replayed.
    runner.rebuild().await?;
    println!(
        "rebuilt: IB3170 has {} bags",
        count(&*store, "IB3170").await?
    );

    let manifest: Vec<String> = store
        .scan(
            "manifest",
            KeyRange::prefix(b"IB3170/"),
            Direction::Forwards,
            3,
        )
        .await?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    println!("first bags on IB3170: {manifest:?}");
    Ok(manifest)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await?;
    Ok(())
}
