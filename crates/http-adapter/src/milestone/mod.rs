//! Milestone watch: per-tenant rules of expected next milestones, in the spirit of IATA
//! Resolution 753's tracking points ("after `LOADED` on a bag expect `ARRIVED` within 2 h";
//! "after `TRANSFER` expect `LOADED` within the minimum connection time"), enforced by a saga.
//!
//! - **Rules** ([`rules`]): `(entityType, triggerEventType, expectedEventTypes, within)`,
//!   managed by system admins through [`http`] and stored as `tt.MilestoneRuleSet` /
//!   `tt.MilestoneRuleRemoved` events of the system tenant (stream
//!   `milestone-rules-<tenant>`), so every process sees the same rules.
//! - **The watch** ([`watch::MilestoneWatch`]): a runtime [`Saga`](tracktrace_core::Saga), one
//!   instance per (tenant, entity), fed by the entities' `OperationalEventRecorded` events. A
//!   trigger opens a watch with a durable deadline; an expected milestone closes it; a deadline
//!   that fires first dispatches a command that captures a `MILESTONE_OVERDUE` event into the
//!   entity's own stream through the normal capture pipeline (so it is in the trace, pushed to
//!   subscribers and counted by event type); an expected milestone arriving after that captures
//!   a compensating `MILESTONE_RECOVERED`. Both carry deterministic event ids, so a command
//!   re-sent after a crash is answered with the stored event: each is raised exactly once.
//!
//! # Semantics
//! - **Which rules apply**: the rules in force at the milestone's position in the global log
//!   (rule changes are events of the same log). A rule applies to milestones recorded after it;
//!   creating a rule never raises alarms for history. Replacing a rule changes future watches;
//!   open watches keep the terms they were opened with. Removing a rule drops its open watches
//!   when they come due (no `MILESTONE_OVERDUE`) and stops its recoveries.
//! - **Deadline = trigger `occurredAt` + `within`**: the time the milestone physically happened
//!   counts, as for IATA tracking points, not when it was reported. A trigger reported after its
//!   deadline raises `MILESTONE_OVERDUE` at once, unless the expected milestone is already known.
//! - **Late and out-of-order events**: an expected milestone satisfies a watch if its
//!   `occurredAt` is not before the trigger's, whenever it is recorded: before the trigger (out
//!   of order: remembered, the watch never opens), before the deadline fires (the watch closes
//!   silently), or after (a `MILESTONE_RECOVERED`, even if it happened before the deadline but
//!   was reported too late to prevent the alarm). A trigger older than the rule's open watch or
//!   raised alarm is ignored (the newer one stands); a newer trigger re-arms the watch.
//! - `MILESTONE_OVERDUE` occurs at the deadline, at the trigger's location; attributes `rule`,
//!   `expectedEventTypes`, `within`, `deadline`, `triggerEventType`, `triggerEventId`,
//!   `triggerOccurredAt`. `MILESTONE_RECOVERED` occurs 1 ms after the milestone (and after the
//!   deadline), at its location; attributes `rule`, `expectedEventTypes`, `deadline`,
//!   `milestoneEventType`, `milestoneEventId`, `milestoneOccurredAt`, `lateBySeconds`,
//!   `overdueEventId`. Source `tracktrace.milestone-watch`.
//!
//! # Running it
//! [`run`] runs in server roles `processor` and `all` from the saga's persisted checkpoint
//! (`saga.milestone-watch`); deadlines are records of the saga streams, rebuilt on start, so a
//! deadline scheduled before a restart (or `kill -9`) fires once after it. Several processors on
//! one PostgreSQL are safe but redundant: every decision has a deterministic record id, appended
//! with the instance's expected version, so concurrent runners conflict, reload and skip what
//! the other recorded, and a doubly sent command is answered with the stored event. Each
//! processor does the whole work, though (there is no leader election yet); run one processor
//! per store to avoid it. The runner keeps every instance in memory (proportional to watched
//! entities) and reads the saga streams once at start.

pub mod http;
pub mod rules;
pub mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracktrace_core::{CheckpointStore, EventStore, SagaRunner};

use crate::capture::CaptureService;

pub use rules::{MilestoneRule, RuleBook, RuleView};
pub use watch::{CaptureDispatcher, MilestoneCommand, MilestoneWatch, WatchState};

/// Event type raised when an expected milestone is overdue.
pub const OVERDUE: &str = "MILESTONE_OVERDUE";
/// Event type raised when an overdue milestone arrives after all.
pub const RECOVERED: &str = "MILESTONE_RECOVERED";
/// `source` of the events the watch raises.
pub const SOURCE: &str = "tracktrace.milestone-watch";

/// Least time between two passes of the watch over new events.
const FOLLOW_PAUSE: Duration = Duration::from_millis(100);

/// Runs the milestone watch forever (the server aborts the task at shutdown): loads the rules,
/// then a [`SagaRunner`] from its checkpoint in `checkpoints`, reading triggers from `store` and
/// capturing alarms through a [`CaptureService`] over `capture_store` (the circuit-broken
/// store). A failure (store outage) restarts it, with a growing pause, from its records.
pub async fn run(
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    capture_store: Arc<dyn EventStore>,
) {
    let capture = CaptureService::new(capture_store);
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let r = async {
            let watch = MilestoneWatch::load(store.clone()).await?;
            let mut runner = SagaRunner::new(
                store.clone(),
                checkpoints.clone(),
                watch,
                CaptureDispatcher::new(capture.clone()),
            )
            // Deadlines are minutes to hours: read a busy log a few times a second, not
            // after every commit.
            .with_min_interval(FOLLOW_PAUSE);
            runner.run(std::future::pending::<()>()).await
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
