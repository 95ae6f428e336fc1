//! Runs every example to completion (the example files are compiled in as modules) and checks
//! what each one claims to show.

#[path = "../custom_aggregate.rs"]
#[allow(dead_code)]
mod custom_aggregate;
#[path = "../custom_projection.rs"]
#[allow(dead_code)]
mod custom_projection;
#[path = "../saga.rs"]
#[allow(dead_code)]
mod saga;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_aggregate_runs() {
    let bag = custom_aggregate::run().await.expect("example runs");
    // Eight alternating loads plus one idempotent load: at least the last one is recorded.
    assert!(format!("{bag:?}").contains("UX1097"), "{bag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_projection_runs() {
    let manifest = custom_projection::run().await.expect("example runs");
    assert_eq!(manifest.len(), 3);
    assert!(manifest.iter().all(|k| k.starts_with("IB3170/Bag-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_runs() {
    let (first, second) = saga::run().await.expect("example runs");
    assert!(
        first
            .iter()
            .any(|k| k.starts_with("CommandScheduled(compensation: ReleaseConnection")),
        "compensation recorded: {first:?}"
    );
    assert!(first.iter().any(|k| k == "CommandFailed"), "{first:?}");
    assert_eq!(
        second.iter().filter(|k| *k == "DeadlineFired").count(),
        1,
        "deadline fired once: {second:?}"
    );
}
