//! Running the milestone watch: [`run`] (the supervised saga runner of roles `processor` and
//! `all`, under the background-work lease).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracktrace_core::{EventStore, ReadModelStore, SagaRunner};

use crate::capture::service::CaptureService;
use crate::milestone::dispatch::CaptureDispatcher;
use crate::milestone::watch::MilestoneWatch;

/// Least time between two passes of the watch over new events.
const FOLLOW_PAUSE: Duration = Duration::from_millis(100);

/// Runs the milestone watch forever (the server aborts the task at shutdown): loads the rules,
/// then a [`SagaRunner`] from its checkpoint and index of open work in `checkpoints`, reading
/// triggers from `store` and capturing alarms through `capture` (the application's capture
/// service, over the circuit-broken store, enforcing the tenants' schemas), keeping at most
/// `max_instances` entities without pending work in memory. A failure (store
/// outage) restarts it, with a growing pause, from its records.
pub async fn run(
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn ReadModelStore>,
    capture: CaptureService,
    max_instances: usize,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let r = async {
            let watch = MilestoneWatch::load(store.clone())
                .await
                .map_err(|e| e.to_string())?;
            let mut runner = SagaRunner::new(
                store.clone(),
                checkpoints.clone(),
                watch,
                CaptureDispatcher::new(capture.clone()),
            )
            // Deadlines are minutes to hours: read a busy log a few times a second, not
            // after every commit.
            .with_min_interval(FOLLOW_PAUSE)
            .with_max_instances(max_instances);
            runner
                .run(std::future::pending::<()>())
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "milestone watch failed; restarting from its records");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
