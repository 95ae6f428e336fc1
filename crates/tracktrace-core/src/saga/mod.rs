//! Sagas (process managers): long-running processes that react to events by dispatching
//! commands, with durable deadlines and compensation, whose whole state is kept **as events**
//! in their own stream (`"saga.{NAME}-{instance}"`, one per instance and tenant).
//!
//! # How it stays correct across crashes
//! Everything a saga decides is first appended to its stream as [`SagaRecord`]s, with event ids
//! derived deterministically from the cause (the trigger event, the dispatch, the deadline),
//! and only then acted on:
//! - a command is recorded as [`SagaRecord::CommandScheduled`] (an outbox entry) *before* it is
//!   sent; its id (the record's event id) is the dispatch id the [`CommandDispatcher`] must use
//!   as idempotency key (e.g. [`crate::CommandMeta::command_id`], which derives the target's
//!   event ids from it; [`BusDispatcher`] does exactly that). After a crash, scheduled
//!   commands without a recorded result are sent again with the same dispatch id: none is
//!   lost, and the receiver stores its effect once;
//! - a deadline is recorded as [`SagaRecord::DeadlineScheduled`] with its due time; on start the
//!   runner reloads the instances with open work (below), so a deadline scheduled before a
//!   crash fires after the restart. Firing appends [`SagaRecord::DeadlineFired`] with an id
//!   derived from the deadline, so it is recorded (and reacted to) exactly once;
//! - a trigger event is recorded as [`SagaRecord::Triggered`]; re-reading it after a crash is
//!   recognised and skipped (the records of a cause have derived ids, so the store refuses
//!   them a second time; recovery also collects the triggers recorded after the checkpoint);
//! - a command that fails permanently is recorded as [`SagaRecord::CommandFailed`] together
//!   with the reaction of [`Saga::on_failure`], typically compensation commands
//!   ([`Reaction::compensate`], recorded with `compensation: true`). The failure is typed
//!   ([`Saga::Failure`]: [`CommandFailure`] with a [`FailureKind`] and an optional code, or
//!   the saga's own type), so a saga branches on why a command failed, not on a message.
//!
//! Run one [`SagaRunner`] per saga type.
//!
//! # Bounded memory and restart
//! The runner keeps in memory the instances with *open work* (a command without a recorded
//! result, a pending deadline) and, up to [`SagaRunner::with_max_instances`] (default
//! [`DEFAULT_MAX_INSTANCES`]), others, least recently used first. An instance that completed
//! ([`Reaction::complete`]) or is [idle](Saga::is_idle) leaves memory as soon as its commands
//! are done. An instance out of memory is reloaded from its stream when a trigger concerns it:
//! the last record of every batch carries the instance's *base* (metadata header
//! `tt.saga.base`: the lowest version holding its latest state, its completion or open work),
//! so a reload reads the stream backwards only to there.
//!
//! The instances with open work are also kept in a persisted index (read-model namespace
//! `"saga.{NAME}.open"`, one entry per instance, keyed by the version of its oldest open work)
//! committed atomically with the runner's checkpoint ([`crate::ReadModelStore::commit`]). On
//! start the runner reads that index, reloads the instances it names and reads the saga
//! records after the checkpoint (work opened since, triggers recorded since): a restart costs
//! the open work plus the checkpoint's lag, not the saga's history. A checkpoint stored without
//! an index (by a runner that kept none) makes the first start read the whole saga log once,
//! streamed, keeping only the instances left open.
//!
//! Measured on the milestone watch (`cargo run --release -p tracktrace-benches --features soak
//! --bin milestone_soak`: 1,000,000 bags on sled, about 10,000 watches open at a time): at most
//! 10,000 instances in memory and a peak RSS of 0.98 GB (5.3 GB when every instance stayed in
//! memory); a restart's first round took 0.9 ms after 1,000,000 bags and 0.6 ms after 10,000,
//! reading 49 records and index entries each time (37 s and 0.2 s when recovery read the whole
//! saga log).

mod dispatch;
mod instance;
mod model;
mod open_index;
mod runner;

pub use dispatch::{
    BusDispatcher, BusFailure, CommandDispatcher, CommandFailure, DispatchError, FailureKind,
    FromBusFailure,
};
pub use model::{Reaction, RecordOf, Saga, SagaRecord};
pub use runner::{DEFAULT_MAX_INSTANCES, SagaProgress, SagaRunner};
