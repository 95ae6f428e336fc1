//! The trace projection: follows the event bus (the store's global log, catch-up then live)
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
use tracktrace_core::{
    EventStore, Position, ReadModelBatch, ReadModelStore, SubscribeOptions, Subscription,
};

use crate::error::ApiError;
use crate::timeline::apply_batch;

/// Checkpoint name of the trace projection.
pub const TRACE_PROJECTION: &str = "tt.trace";

/// Events applied per read-model commit at most.
const BATCH: usize = 512;

/// Runs the trace projection forever (the server aborts the task at shutdown); progress (the
/// committed checkpoint) is published on `progress`. Failures restart it from the stored
/// checkpoint with a growing pause.
pub async fn run(
    store: Arc<dyn EventStore>,
    rm: Arc<dyn ReadModelStore>,
    progress: watch::Sender<Position>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match run_once(&store, &*rm, &progress).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, "trace projection stopped; restarting from its checkpoint");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn run_once(
    store: &Arc<dyn EventStore>,
    rm: &dyn ReadModelStore,
    progress: &watch::Sender<Position>,
) -> tracktrace_core::Result<()> {
    let mut checkpoint = rm.load_checkpoint(TRACE_PROJECTION).await?;
    progress.send_replace(checkpoint.unwrap_or_default());
    let mut sub = Subscription::new(
        store.clone(),
        SubscribeOptions {
            from: checkpoint.map(Position::next).unwrap_or(Position::START),
            batch_size: BATCH,
            ..SubscribeOptions::default()
        },
    );
    loop {
        sub.wait().await?;
        let events = sub.next_batch(BATCH).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            continue;
        };
        let writes = apply_batch(rm, &events).await?;
        rm.commit(ReadModelBatch {
            checkpoint: TRACE_PROJECTION.into(),
            expected_checkpoint: checkpoint,
            position: last,
            writes,
        })
        .await?;
        checkpoint = Some(last);
        progress.send_replace(last);
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
) -> Result<(), ApiError> {
    let reached = async {
        match progress {
            Some(rx) => {
                let mut rx = rx.clone();
                rx.wait_for(|p| *p >= position)
                    .await
                    .map(|_| ())
                    .map_err(|_| ApiError::Unavailable {
                        retry_after: Duration::from_secs(1),
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
        Err(_) => Err(ApiError::Timeout(format!(
            "the trace read model did not reach position {position} within {} ms",
            timeout.as_millis()
        ))),
    }
}
