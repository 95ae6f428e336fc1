//! Running the trace projection ([`TraceProjection`]) with the runtime's
//! [`ProjectionRunner`]: it follows the event bus (the store's global log, catch-up then live)
//! and commits timeline writes *together with* its checkpoint through
//! [`ReadModelStore::commit`], so a crash never applies an event twice or skips one.
//!
//! Runs in processes with role `processor` or `all`. A second runner of the same projection
//! (another process) is fenced off by the commit's expected checkpoint: its commit fails with
//! [`Error::CheckpointMoved`](tracktrace_core::Error::CheckpointMoved) and it restarts from the
//! stored checkpoint instead of writing twice.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracktrace_core::{EventStore, Position, ProjectionError, ProjectionRunner, ReadModelStore};

use crate::error::AppError;
use crate::metrics::{Freshness, Metrics};
use crate::trace::model::{TRACE_PROJECTION, TraceProjection};

/// Events applied per read-model commit at most.
const BATCH: usize = 512;

/// Runs the trace projection with the runtime's [`ProjectionRunner`] forever (the server
/// aborts the task at shutdown): catch up, publish the committed checkpoint on `progress`,
/// sleep until the store's head changes. Failures (store outage, fencing by another runner)
/// restart from the stored checkpoint after a growing pause.
pub async fn run(
    store: Arc<dyn EventStore>,
    rm: Arc<dyn ReadModelStore>,
    progress: watch::Sender<Position>,
) {
    run_with_metrics(store, rm, progress, Metrics::new()).await;
}

/// [`run`], observing each event's data freshness (recorded → committed in the read model)
/// into `metrics`.
pub async fn run_with_metrics(
    store: Arc<dyn EventStore>,
    rm: Arc<dyn ReadModelStore>,
    progress: watch::Sender<Position>,
    metrics: Metrics,
) {
    let mut runner =
        ProjectionRunner::new(store.clone(), rm, Freshness::new(TraceProjection, metrics))
            .with_batch_size(BATCH);
    let mut head = store.watch_head();
    let mut backoff = Duration::from_millis(50);
    loop {
        // Seen before reading: a commit after the read changes the watch again.
        head.borrow_and_update();
        match catch_up(&mut runner, &progress).await {
            Ok(()) => {
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::warn!(error = %e, "trace projection failed; retrying from its checkpoint");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}

/// Batch by batch until the head: each committed batch's freshness is observed, then its
/// checkpoint published (so a reader woken by `progress` sees the batch counted).
async fn catch_up(
    runner: &mut ProjectionRunner<Freshness<TraceProjection>>,
    progress: &watch::Sender<Position>,
) -> Result<(), ProjectionError> {
    loop {
        match runner.step().await {
            Ok((_, at_head)) => {
                runner.projection_mut().committed();
                progress.send_replace(runner.checkpoint().await?.unwrap_or_default());
                if at_head {
                    return Ok(());
                }
            }
            Err(e) => {
                // Not committed (or committed but its lag not measured: those few freshness
                // observations are lost, the events are not reapplied).
                runner.projection_mut().discard();
                return Err(e);
            }
        }
    }
}

/// Waits until the trace read model includes `position`, at most `timeout`.
///
/// With a local runner (`progress`), waits on its notifications; otherwise (API-only
/// process) re-reads the stored checkpoint with a growing pause (5 ms … 100 ms) — a bounded
/// wait of one request, not a polling subscription.
pub async fn wait_for(
    rm: &dyn ReadModelStore,
    progress: Option<&watch::Receiver<Position>>,
    position: Position,
    timeout: Duration,
) -> Result<(), AppError> {
    let reached = async {
        match progress {
            Some(rx) => {
                let mut rx = rx.clone();
                rx.wait_for(|p| *p >= position)
                    .await
                    .map(|_| ())
                    .map_err(|_| AppError::Unavailable {
                        reason: "the trace projection stopped".into(),
                        retry_after: crate::error::DEFAULT_RETRY_AFTER,
                    })
            }
            None => {
                let mut pause = Duration::from_millis(5);
                loop {
                    if rm
                        .load_checkpoint(TRACE_PROJECTION)
                        .await?
                        .unwrap_or_default()
                        >= position
                    {
                        return Ok(());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    };
    match tokio::time::timeout(timeout, reached).await {
        Ok(r) => r,
        Err(_) => Err(AppError::Timeout(format!(
            "the trace read model did not reach position {position} within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// A standby's view of the trace projection (a process that does not run it, in roles
/// `processor` and `all` while another process leads): the stored checkpoint, re-read while
/// the log's head is ahead of it (every 20 ms, for at most 2 s per head change) and otherwise
/// when the head moves, so `minPosition` waits in this process still work.
pub async fn follow_checkpoint(
    store: Arc<dyn EventStore>,
    rm: Arc<dyn ReadModelStore>,
    progress: watch::Sender<Position>,
) {
    let mut head = store.watch_head();
    loop {
        let target = *head.borrow_and_update();
        // Poll until the leader's checkpoint passes the head we saw, for a bounded time (the
        // leader may be gone; then there is nothing to wait for until the head moves again).
        let give_up = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match rm.load_checkpoint(TRACE_PROJECTION).await {
                Ok(p) => {
                    let p = p.unwrap_or_default();
                    progress.send_if_modified(|cur| (p > *cur).then(|| *cur = p).is_some());
                }
                Err(e) => tracing::debug!(error = %e, "standby cannot read the trace checkpoint"),
            }
            if *progress.borrow() > target || tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}
