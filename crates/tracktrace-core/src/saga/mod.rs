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
//!   runner rebuilds its timers from the saga streams, so a deadline scheduled before a crash
//!   fires after the restart. Firing appends [`SagaRecord::DeadlineFired`] with an id derived
//!   from the deadline, so it is recorded (and reacted to) exactly once;
//! - a trigger event is recorded as [`SagaRecord::Triggered`]; re-reading it after a crash is
//!   recognised and skipped;
//! - a command that fails permanently is recorded as [`SagaRecord::CommandFailed`] together
//!   with the reaction of [`Saga::on_failure`], typically compensation commands
//!   ([`Reaction::compensate`], recorded with `compensation: true`).
//!
//! Run one [`SagaRunner`] per saga type. The runner rebuilds its in-memory index from the saga
//! streams when it starts (cost proportional to the saga log).

mod dispatch;
mod model;
mod runner;

pub use dispatch::{BusDispatcher, CommandDispatcher, DispatchError};
pub use model::{Reaction, RecordOf, Saga, SagaRecord};
pub use runner::{SagaProgress, SagaRunner};
