//! What a saga is and decides: the [`Saga`] trait, its [`Reaction`]s and the [`SagaRecord`]s its
//! stream holds.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::saga::dispatch::CommandFailure;
use crate::store::EventFilter;

/// A process manager. Its methods are pure decisions; the
/// [`SagaRunner`](crate::saga::SagaRunner) records and executes them.
pub trait Saga: Send + Sync + 'static {
    /// Saga type name; instance streams are `"saga.{NAME}-{instance}"`.
    const NAME: &'static str;
    /// The saga's own data (recorded as [`SagaRecord::StateChanged`] whenever a reaction sets it).
    type State: Default + Clone + Serialize + DeserializeOwned + Send + Sync + fmt::Debug;
    /// The commands it dispatches.
    type Command: Clone + Serialize + DeserializeOwned + Send + Sync + fmt::Debug;
    /// What a permanently failed command reports to [`Saga::on_failure`]: usually
    /// [`CommandFailure`] (kind, code, message, field errors), or a type of the saga's own
    /// (e.g. the target aggregate's error) that its dispatcher builds. Recorded in the saga's
    /// stream with [`SagaRecord::CommandFailed`], so it must be serialisable.
    type Failure: Clone + Serialize + DeserializeOwned + Send + Sync + fmt::Debug + fmt::Display;

    /// Which events may trigger it (default: all; filtering happens in the store).
    fn filter(&self) -> EventFilter {
        EventFilter::default()
    }

    /// The instance an event belongs to (`None`: not for this saga).
    fn correlate(&self, event: &RecordedEvent) -> Option<String>;

    /// Reaction to a trigger event.
    fn on_event(&self, state: &Self::State, event: &RecordedEvent) -> Reaction<Self>;

    /// Reaction to a due deadline.
    fn on_deadline(&self, state: &Self::State, deadline: &str) -> Reaction<Self>;

    /// Reaction to a dispatched command that succeeded (default: nothing).
    fn on_success(&self, state: &Self::State, command: &Self::Command) -> Reaction<Self> {
        let _ = (state, command);
        Reaction::new()
    }

    /// Reaction to a dispatched command that failed permanently: usually compensation, chosen
    /// by what `failure` says (its kind or code, not its message).
    fn on_failure(
        &self,
        state: &Self::State,
        command: &Self::Command,
        failure: &Self::Failure,
    ) -> Reaction<Self>;

    /// Whether an instance in `state` waits for nothing but a later trigger (default: never).
    /// The runner drops such an instance from memory as soon as it has no command without a
    /// result and no pending deadline; its state stays in its stream, and a later trigger
    /// reloads it from there and continues. Unlike [`Reaction::complete`], nothing is recorded
    /// and later triggers are handled. Instances that are neither idle nor completed stay in
    /// memory up to [`SagaRunner::with_max_instances`](crate::saga::SagaRunner::with_max_instances)
    /// and are reloaded the same way once evicted.
    fn is_idle(&self, state: &Self::State) -> bool {
        let _ = state;
        false
    }
}

/// What a saga decides in response to something: recorded atomically, then executed.
pub struct Reaction<S: Saga + ?Sized> {
    /// New saga state, if it changed.
    pub state: Option<S::State>,
    /// Commands to dispatch, in order.
    pub commands: Vec<S::Command>,
    /// Compensation commands to dispatch (recorded with `compensation: true`).
    pub compensations: Vec<S::Command>,
    /// Deadlines to schedule: (name, delay from now).
    pub deadlines: Vec<(String, Duration)>,
    /// Pending deadlines to cancel, by name.
    pub cancel: Vec<String>,
    /// The saga is finished: later triggers and deadlines are ignored (recorded
    /// commands are still dispatched). Once its commands are done the runner drops the
    /// instance from memory; a later trigger reloads it from its stream, finds it completed
    /// and ignores the trigger.
    pub complete: bool,
}

impl<S: Saga + ?Sized> fmt::Debug for Reaction<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reaction")
            .field("state", &self.state)
            .field("commands", &self.commands)
            .field("compensations", &self.compensations)
            .field("deadlines", &self.deadlines)
            .field("cancel", &self.cancel)
            .field("complete", &self.complete)
            .finish()
    }
}

impl<S: Saga + ?Sized> Default for Reaction<S> {
    fn default() -> Self {
        Self {
            state: None,
            commands: Vec::new(),
            compensations: Vec::new(),
            deadlines: Vec::new(),
            cancel: Vec::new(),
            complete: false,
        }
    }
}

impl<S: Saga + ?Sized> Reaction<S> {
    /// Nothing.
    pub fn new() -> Self {
        Self::default()
    }
    /// Records a new state.
    pub fn state(mut self, state: S::State) -> Self {
        self.state = Some(state);
        self
    }
    /// Dispatches `command`.
    pub fn dispatch(mut self, command: S::Command) -> Self {
        self.commands.push(command);
        self
    }
    /// Dispatches a compensation `command`.
    pub fn compensate(mut self, command: S::Command) -> Self {
        self.compensations.push(command);
        self
    }
    /// Schedules deadline `name` after `delay`.
    pub fn schedule(mut self, name: impl Into<String>, delay: Duration) -> Self {
        self.deadlines.push((name.into(), delay));
        self
    }
    /// Cancels pending deadlines named `name`.
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.cancel.push(name.into());
        self
    }
    /// Marks the saga finished.
    pub fn complete(mut self) -> Self {
        self.complete = true;
        self
    }
}

/// One event of a saga's stream (stored as JSON, event type `"Saga" + variant name`), of a saga
/// whose state is `St`, commands `C` and failure type `F`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SagaRecord<St, C, F = CommandFailure> {
    /// A trigger event was handled.
    Triggered {
        /// The trigger's event id.
        event_id: String,
        /// Its type.
        event_type: String,
        /// Its stream.
        stream: String,
    },
    /// The saga's state changed.
    StateChanged {
        /// The new state.
        state: St,
    },
    /// A command is to be dispatched (outbox entry); its dispatch id is this record's event id.
    CommandScheduled {
        /// The command.
        command: C,
        /// Whether it compensates an earlier step.
        compensation: bool,
    },
    /// A scheduled command was dispatched successfully.
    CommandSucceeded {
        /// Its dispatch id.
        dispatch_id: String,
    },
    /// A scheduled command failed permanently.
    CommandFailed {
        /// Its dispatch id.
        dispatch_id: String,
        /// Why, for humans (the failure's `Display`).
        error: String,
        /// Why, as the saga's failure value (absent from records written before sagas had a
        /// failure type).
        #[serde(default = "no_failure", skip_serializing_if = "Option::is_none")]
        failure: Option<F>,
    },
    /// A deadline was scheduled; its id is this record's event id.
    DeadlineScheduled {
        /// Its name.
        name: String,
        /// When it is due (µs since the Unix epoch).
        due_at_micros: i64,
    },
    /// A deadline fired.
    DeadlineFired {
        /// Its id.
        deadline_id: String,
        /// Its name.
        name: String,
    },
    /// A deadline was cancelled.
    DeadlineCancelled {
        /// Its id.
        deadline_id: String,
    },
    /// The saga finished.
    Completed,
}

impl<St, C, F> SagaRecord<St, C, F> {
    pub(super) fn event_type(&self) -> &'static str {
        match self {
            SagaRecord::Triggered { .. } => "SagaTriggered",
            SagaRecord::StateChanged { .. } => "SagaStateChanged",
            SagaRecord::CommandScheduled { .. } => "SagaCommandScheduled",
            SagaRecord::CommandSucceeded { .. } => "SagaCommandSucceeded",
            SagaRecord::CommandFailed { .. } => "SagaCommandFailed",
            SagaRecord::DeadlineScheduled { .. } => "SagaDeadlineScheduled",
            SagaRecord::DeadlineFired { .. } => "SagaDeadlineFired",
            SagaRecord::DeadlineCancelled { .. } => "SagaDeadlineCancelled",
            SagaRecord::Completed => "SagaCompleted",
        }
    }
}

/// `failure` of a record that has none (without a `Default` bound on the failure type).
fn no_failure<F>() -> Option<F> {
    None
}

/// The record type of saga `S`.
pub type RecordOf<S> = SagaRecord<<S as Saga>::State, <S as Saga>::Command, <S as Saga>::Failure>;

/// Decodes one record of saga `S`'s stream.
pub(super) fn decode_record<S: Saga>(e: &RecordedEvent) -> Result<RecordOf<S>> {
    serde_json::from_slice(&e.payload).map_err(|err| {
        Error::corruption(
            Some(e.position),
            format!("saga {} record {}: {err}", S::NAME, e.event_type),
        )
    })
}
