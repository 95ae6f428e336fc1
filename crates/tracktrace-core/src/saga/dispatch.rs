//! Sending a saga's commands: the [`CommandDispatcher`] trait, its [`DispatchError`]s and the
//! [`BusDispatcher`] onto a [`CommandBus`].

use std::fmt;

use async_trait::async_trait;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::command::{CommandBus, CommandMeta};
use crate::id::TenantId;

/// Why a dispatch failed. Non-exhaustive: kinds may be added, so a `match` on it in other
/// crates needs a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// Permanent: recorded as [`SagaRecord::CommandFailed`](crate::saga::SagaRecord::CommandFailed)
    /// and handed to [`Saga::on_failure`](crate::saga::Saga::on_failure).
    #[error("command rejected: {0}")]
    Rejected(String),
    /// Transient: the command stays scheduled and is sent again later (same dispatch id).
    #[error("dispatch failed transiently: {0}")]
    Transient(String),
}

/// Sends a saga's commands (e.g. to a [`crate::CommandBus`]).
#[async_trait]
pub trait CommandDispatcher<C>: Send + Sync {
    /// Sends `command` for `tenant`. `dispatch_id` is stable across re-sends after a crash:
    /// the receiver must use it to deduplicate (e.g. as [`crate::CommandMeta::command_id`]).
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &C,
    ) -> Result<(), DispatchError>;
}

/// A [`CommandDispatcher`] that executes saga commands on a [`CommandBus`], with the dispatch
/// id as [`CommandMeta::command_id`]: a command re-sent after a crash is answered from its
/// stored events (`duplicate`) instead of being applied twice.
///
/// `route` maps a saga command to the target aggregate id and command (`None`: the saga command
/// is not for this bus, reported as a permanent failure). Domain rejections and validation
/// errors are permanent ([`DispatchError::Rejected`], which triggers compensation); store
/// unavailability and persistent conflicts are transient (sent again later); anything else
/// (e.g. corrupt data) is permanent.
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
impl<C, A, F> CommandDispatcher<C> for BusDispatcher<A, F>
where
    C: Send + Sync + 'static,
    A: Aggregate,
    A::Command: Send,
    F: Fn(&C) -> Option<(String, A::Command)> + Send + Sync,
{
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &C,
    ) -> Result<(), DispatchError> {
        let Some((id, cmd)) = (self.route)(command) else {
            return Err(DispatchError::Rejected(
                "no route for this saga command".into(),
            ));
        };
        match self
            .bus
            .execute_with(tenant, &id, cmd, CommandMeta::with_command_id(dispatch_id))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_retryable() => Err(DispatchError::Transient(e.to_string())),
            Err(e) => Err(DispatchError::Rejected(e.to_string())),
        }
    }
}
