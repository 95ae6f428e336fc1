//! Sending a saga's commands: the [`CommandDispatcher`] trait, its [`DispatchError`]s, the
//! typed [`CommandFailure`] sagas receive by default, and the [`BusDispatcher`] onto a
//! [`CommandBus`].

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, FieldError};
use crate::command::{CommandBus, CommandError, CommandMeta};
use crate::id::TenantId;

/// Why a dispatch failed. `F` is what a permanent failure carries to
/// [`Saga::on_failure`](crate::saga::Saga::on_failure): the saga's
/// [`Failure`](crate::saga::Saga::Failure) type, [`CommandFailure`] unless the saga chose its
/// own. Non-exhaustive: kinds may be added, so a `match` on it in other crates needs a
/// wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError<F = CommandFailure> {
    /// Permanent: recorded as [`SagaRecord::CommandFailed`](crate::saga::SagaRecord::CommandFailed)
    /// and handed to [`Saga::on_failure`](crate::saga::Saga::on_failure).
    #[error("command rejected: {0}")]
    Rejected(F),
    /// Transient: the command stays scheduled and is sent again later (same dispatch id).
    #[error("dispatch failed transiently: {0}")]
    Transient(String),
}

/// What kind of permanent failure a [`CommandFailure`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The target refused the command by a domain rule
    /// ([`CommandError::Rejected`](crate::CommandError::Rejected)).
    Rejected,
    /// The command's fields were invalid ([`CommandError::Validation`]); the field errors are in
    /// [`CommandFailure::fields`].
    Invalid,
    /// Nothing accepts this command (e.g. a [`BusDispatcher`] route returned `None`).
    Unroutable,
    /// Anything else that will not succeed when sent again (e.g. corrupt stored data).
    Other,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Rejected => "rejected",
            FailureKind::Invalid => "invalid",
            FailureKind::Unroutable => "unroutable",
            FailureKind::Other => "failed",
        })
    }
}

/// A command that failed permanently, as a saga sees it by default: the kind of failure, a
/// stable machine-readable `code` where the dispatcher knows one (a saga branches on `kind`
/// and `code`, never on `message`), the human-readable message and, for
/// [`FailureKind::Invalid`], the field errors. Serialisable: it is recorded in the saga's
/// stream ([`SagaRecord::CommandFailed`](crate::saga::SagaRecord::CommandFailed)).
///
/// A saga that needs its target's own error type declares it as
/// [`Saga::Failure`](crate::saga::Saga::Failure) instead, and its dispatcher (or
/// [`FromBusFailure`] for a [`BusDispatcher`]) builds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CommandFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// A stable code naming the failure, e.g. a domain error's variant (`"FlightClosed"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// For humans.
    pub message: String,
    /// The invalid fields ([`FailureKind::Invalid`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

impl CommandFailure {
    /// A failure of `kind` described by `message`, without code or field errors.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: None,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    /// A domain rejection ([`FailureKind::Rejected`]).
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Rejected, message)
    }

    /// Invalid fields ([`FailureKind::Invalid`]).
    pub fn invalid(fields: Vec<FieldError>) -> Self {
        let message = fields
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            fields,
            ..Self::new(FailureKind::Invalid, message)
        }
    }

    /// With a stable machine-readable code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The failure a permanent [`CommandError`] stands for (its kind, message and field
    /// errors; no code).
    pub fn from_command_error<E: std::error::Error + 'static>(error: &CommandError<E>) -> Self {
        match error {
            CommandError::Validation { errors } => Self::invalid(errors.clone()),
            CommandError::Rejected(e) => Self::rejected(e.to_string()),
            other => Self::new(FailureKind::Other, other.to_string()),
        }
    }
}

impl fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} ({code}): {}", self.kind, self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

impl std::error::Error for CommandFailure {}

/// Why a [`BusDispatcher`] could not execute a saga command: what [`FromBusFailure`] turns
/// into the saga's failure type.
#[derive(Debug)]
#[non_exhaustive]
pub enum BusFailure<'a, E: std::error::Error + 'static> {
    /// The route returned `None`.
    Unroutable,
    /// The command bus answered with a permanent error (never a retryable one: those are
    /// sent again).
    Command(&'a CommandError<E>),
}

/// How a saga's [`Failure`](crate::saga::Saga::Failure) type is built from a [`BusDispatcher`]'s
/// permanent failures. Implemented for [`CommandFailure`]; implement it for your own failure
/// type to hand the target aggregate's typed error to the saga, e.g. by matching
/// `BusFailure::Command(CommandError::Rejected(e))`.
pub trait FromBusFailure<E: std::error::Error + 'static>: Sized {
    /// The failure value for `failure`.
    fn from_bus_failure(failure: BusFailure<'_, E>) -> Self;
}

impl<E: std::error::Error + 'static> FromBusFailure<E> for CommandFailure {
    fn from_bus_failure(failure: BusFailure<'_, E>) -> Self {
        match failure {
            BusFailure::Unroutable => {
                Self::new(FailureKind::Unroutable, "no route for this saga command")
            }
            BusFailure::Command(e) => Self::from_command_error(e),
        }
    }
}

/// Sends a saga's commands (e.g. to a [`crate::CommandBus`]). `F` is the failure type the
/// saga receives ([`Saga::Failure`](crate::saga::Saga::Failure)).
#[async_trait]
pub trait CommandDispatcher<C, F = CommandFailure>: Send + Sync {
    /// Sends `command` for `tenant`. `dispatch_id` is stable across re-sends after a crash:
    /// the receiver must use it to deduplicate (e.g. as [`crate::CommandMeta::command_id`]).
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &C,
    ) -> Result<(), DispatchError<F>>;
}

/// A [`CommandDispatcher`] that executes saga commands on a [`CommandBus`], with the dispatch
/// id as [`CommandMeta::command_id`]: a command re-sent after a crash is answered from its
/// stored events (`duplicate`) instead of being applied twice.
///
/// `route` maps a saga command to the target aggregate id and command (`None`: the saga command
/// is not for this bus, a permanent [`BusFailure::Unroutable`]). Domain rejections and
/// validation errors are permanent ([`DispatchError::Rejected`], which triggers compensation);
/// store unavailability and persistent conflicts are transient (sent again later); anything
/// else (e.g. corrupt data) is permanent. Permanent failures reach the saga as its failure type
/// through [`FromBusFailure`].
pub struct BusDispatcher<A: Aggregate, F> {
    bus: CommandBus<A>,
    route: F,
}

impl<A: Aggregate, F> fmt::Debug for BusDispatcher<A, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusDispatcher")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, F> BusDispatcher<A, F> {
    /// Dispatches through `bus`, routing each saga command with `route`.
    pub fn new(bus: CommandBus<A>, route: F) -> Self {
        Self { bus, route }
    }
}

#[async_trait]
impl<C, A, F, Fail> CommandDispatcher<C, Fail> for BusDispatcher<A, F>
where
    C: Send + Sync + 'static,
    A: Aggregate,
    A::Command: Send,
    F: Fn(&C) -> Option<(String, A::Command)> + Send + Sync,
    Fail: FromBusFailure<A::Error> + Send,
{
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &C,
    ) -> Result<(), DispatchError<Fail>> {
        let Some((id, cmd)) = (self.route)(command) else {
            return Err(DispatchError::Rejected(Fail::from_bus_failure(
                BusFailure::Unroutable,
            )));
        };
        match self
            .bus
            .execute_with(tenant, &id, cmd, CommandMeta::with_command_id(dispatch_id))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_retryable() => Err(DispatchError::Transient(e.to_string())),
            Err(e) => Err(DispatchError::Rejected(Fail::from_bus_failure(
                BusFailure::Command(&e),
            ))),
        }
    }
}
