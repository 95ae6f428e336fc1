//! One saga instance as the runner knows it: the fold of its stream's records
//! ([`Instance`]), what it still waits for, and the version from which a forward read of its
//! stream rebuilds it ([`Instance::base`], stored on every batch the runner appends).

use std::collections::HashMap;

use uuid::Uuid;

use crate::event::RecordedEvent;
use crate::id::{StreamId, TenantId, Timestamp, Version};
use crate::saga::model::{RecordOf, Saga, SagaRecord};

/// Metadata header on the last record of every batch the runner appends: the instance's
/// [`Instance::base`] after that batch. A reload reads the stream backwards to it instead of
/// from version 1 (streams without it, written before it existed, are read whole).
pub(super) const BASE_HEADER: &str = "tt.saga.base";

/// The base recorded on `e` (the newest record of a stream), if any.
pub(super) fn recorded_base(e: &RecordedEvent) -> Option<Version> {
    e.metadata
        .headers
        .get(BASE_HEADER)
        .and_then(|s| s.parse::<u64>().ok())
        .map(Version::new)
}

/// A scheduled command without a recorded result.
#[derive(Clone)]
pub(super) struct Pending<C> {
    /// Its dispatch id (the `CommandScheduled` record's event id).
    pub(super) dispatch_id: Uuid,
    pub(super) command: C,
    /// Version of its `CommandScheduled` record.
    pub(super) at: Version,
}

/// A scheduled deadline that neither fired nor was cancelled.
#[derive(Clone)]
pub(super) struct Deadline {
    pub(super) name: String,
    pub(super) due: Timestamp,
    /// Version of its `DeadlineScheduled` record.
    pub(super) at: Version,
}

/// In-memory fold of one instance's records (from its [`Instance::base`] on).
pub(super) struct Instance<S: Saga> {
    pub(super) tenant: TenantId,
    pub(super) stream: StreamId,
    /// Version of the stream's last record.
    pub(super) version: Version,
    pub(super) state: S::State,
    /// Version of the latest `StateChanged` record (`ZERO`: none; the state is the default).
    state_at: Version,
    /// Scheduled commands without a result, in record order.
    pub(super) pending: Vec<Pending<S::Command>>,
    /// Pending deadlines by id.
    pub(super) deadlines: HashMap<Uuid, Deadline>,
    /// Version of the `Completed` record.
    completed_at: Option<Version>,
}

impl<S: Saga> Clone for Instance<S> {
    fn clone(&self) -> Self {
        Self {
            tenant: self.tenant.clone(),
            stream: self.stream.clone(),
            version: self.version,
            state: self.state.clone(),
            state_at: self.state_at,
            pending: self.pending.clone(),
            deadlines: self.deadlines.clone(),
            completed_at: self.completed_at,
        }
    }
}

impl<S: Saga> Instance<S> {
    /// An instance without records.
    pub(super) fn new(tenant: TenantId, stream: StreamId) -> Self {
        Self {
            tenant,
            stream,
            version: Version::ZERO,
            state: S::State::default(),
            state_at: Version::ZERO,
            pending: Vec::new(),
            deadlines: HashMap::new(),
            completed_at: None,
        }
    }

    /// Whether the saga finished ([`SagaRecord::Completed`]).
    pub(super) fn completed(&self) -> bool {
        self.completed_at.is_some()
    }

    /// The version of its oldest open work (a command without a result or a pending
    /// deadline), `None` if it waits for nothing.
    pub(super) fn open_since(&self) -> Option<Version> {
        self.pending
            .iter()
            .map(|p| p.at)
            .chain(self.deadlines.values().map(|d| d.at))
            .min()
    }

    /// The lowest version a forward read must start at to rebuild this fold: its latest
    /// state, its completion, and every open command and deadline are at or after it.
    pub(super) fn base(&self) -> Version {
        [self.open_since(), self.completed_at]
            .into_iter()
            .flatten()
            .chain((self.state_at > Version::ZERO).then_some(self.state_at))
            .min()
            .unwrap_or(self.version)
    }

    /// Folds the record at `version` whose event id is `id`.
    pub(super) fn fold(&mut self, id: Uuid, version: Version, r: RecordOf<S>) {
        self.version = version;
        let parse = |s: &str| Uuid::parse_str(s).unwrap_or_default();
        match r {
            SagaRecord::Triggered { .. } => {}
            SagaRecord::StateChanged { state } => {
                self.state = state;
                self.state_at = version;
            }
            SagaRecord::CommandScheduled { command, .. } => self.pending.push(Pending {
                dispatch_id: id,
                command,
                at: version,
            }),
            SagaRecord::CommandSucceeded { dispatch_id }
            | SagaRecord::CommandFailed { dispatch_id, .. } => {
                let d = parse(&dispatch_id);
                self.pending.retain(|p| p.dispatch_id != d);
            }
            SagaRecord::DeadlineScheduled {
                name,
                due_at_micros,
            } => {
                self.deadlines.insert(
                    id,
                    Deadline {
                        name,
                        due: Timestamp::from_unix_micros(due_at_micros),
                        at: version,
                    },
                );
            }
            SagaRecord::DeadlineFired { deadline_id, .. }
            | SagaRecord::DeadlineCancelled { deadline_id } => {
                self.deadlines.remove(&parse(&deadline_id));
            }
            SagaRecord::Completed => {
                self.completed_at = Some(version);
                self.deadlines.clear();
            }
        }
    }
}

/// What a streaming pass over saga records (recovery) keeps per instance: the ids of the
/// commands and deadlines it saw opened and not yet closed. Records closing work opened
/// before the pass began are ignored (that work is in the open-work index).
#[derive(Default)]
pub(super) struct OpenIds {
    commands: Vec<Uuid>,
    deadlines: Vec<Uuid>,
}

impl OpenIds {
    /// Applies the record whose event id is `id`.
    pub(super) fn apply<St, C, F>(&mut self, id: Uuid, r: &SagaRecord<St, C, F>) {
        let parse = |s: &str| Uuid::parse_str(s).unwrap_or_default();
        match r {
            SagaRecord::CommandScheduled { .. } => self.commands.push(id),
            SagaRecord::CommandSucceeded { dispatch_id }
            | SagaRecord::CommandFailed { dispatch_id, .. } => {
                let d = parse(dispatch_id);
                self.commands.retain(|c| *c != d);
            }
            SagaRecord::DeadlineScheduled { .. } => self.deadlines.push(id),
            SagaRecord::DeadlineFired { deadline_id, .. }
            | SagaRecord::DeadlineCancelled { deadline_id } => {
                let d = parse(deadline_id);
                self.deadlines.retain(|x| *x != d);
            }
            SagaRecord::Completed => self.deadlines.clear(),
            SagaRecord::Triggered { .. } | SagaRecord::StateChanged { .. } => {}
        }
    }

    /// Whether nothing it saw opened is still open.
    pub(super) fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.deadlines.is_empty()
    }
}
