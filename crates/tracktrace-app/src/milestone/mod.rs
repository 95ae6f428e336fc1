//! Milestone watch: per-tenant rules of expected next milestones, in the spirit of IATA
//! Resolution 753's tracking points ("after `LOADED` on a bag expect `ARRIVED` within 2 h";
//! "after `TRANSFER` expect `LOADED` within the minimum connection time"), enforced by a saga.
//!
//! - **Rules** ([`rules`]): `(entityType, triggerEventType, expectedEventTypes, within)`,
//!   managed by system admins through [`service::Milestones`] and stored as `tt.MilestoneRuleSet` /
//!   `tt.MilestoneRuleRemoved` events of the system tenant (stream
//!   `milestone-rules-<tenant>`), so every process sees the same rules.
//! - **The watch** ([`watch::MilestoneWatch`]): a runtime [`Saga`](tracktrace_core::Saga), one
//!   instance per (tenant, entity), fed by the entities' `OperationalEventRecorded` events. A
//!   trigger opens a watch with a durable deadline; an expected milestone closes it; a deadline
//!   that fires first dispatches a command that captures a `MILESTONE_OVERDUE` event into the
//!   entity's own stream through the application's capture service ([`dispatch`]: the tenant's
//!   attribute schemas and the entity's type claim apply, the alarm is in the trace, pushed to
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
//! [`run::run`] runs in server roles `processor` and `all` from the saga's persisted checkpoint
//! (`saga.milestone-watch`); deadlines are records of the saga streams, rebuilt on start, so a
//! deadline scheduled before a restart (or `kill -9`) fires once after it. With several
//! processors on one PostgreSQL, only the holder of the background-work lease runs it (see
//! [`crate::background`]); were two to run at once (a holder that has not noticed yet that it
//! lost the lease), every decision has a deterministic record id, appended with the instance's
//! expected version, so concurrent runners conflict, reload and skip what the other recorded,
//! and a doubly sent command is answered with the stored event. A dispatch that fails for a
//! reason the same command may survive ([`crate::error::AppError::is_retryable`]: store outage,
//! contention) is sent again later; only permanent refusals are recorded as failed.
//!
//! Memory and restart: an entity's watch instance is idle ([`Saga::is_idle`](tracktrace_core::Saga::is_idle))
//! once it has no open watch and no unrecovered `MILESTONE_OVERDUE`; the runner then drops it
//! from memory (its state, including the milestones it remembers for out-of-order triggers,
//! stays in its saga stream and is reloaded by the entity's next milestone). Memory therefore
//! follows the entities with an open watch (each has a pending deadline) plus at most the
//! runner's `with_max_instances` bound of entities with an unrecovered alarm, not the entities
//! ever watched; a restart reads the runner's index of open work and the log after its
//! checkpoint, not every saga record (see [`tracktrace_core::saga`]). Measured with
//! `cargo run --release -p tracktrace-benches --features soak --bin milestone_soak` (1,000,000
//! bags on sled, each loaded then arriving on time, about 10,000 watches open at a time): at
//! most 10,000 instances in memory, peak RSS 0.98 GB (sled's cache included), and the runner's
//! first round after a restart 0.9 ms, as after 10,000 bags (0.6 ms).
//! [`service::Milestones::entity_watches`] reads the saga stream, so it answers for entities
//! in memory or not.

pub mod dispatch;
pub mod rules;
pub mod run;
pub mod service;
pub mod watch;

pub use dispatch::{CaptureDispatcher, failure_of};
pub use rules::{MilestoneRule, OVERDUE, RECOVERED, RuleBook, RuleView};
pub use service::{EntityWatches, Milestones, WatchView};
pub use watch::{MilestoneCommand, MilestoneWatch, SOURCE, WatchState};
