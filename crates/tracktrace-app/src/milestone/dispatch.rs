//! [`CaptureDispatcher`]: the milestone watch's commands captured as events.

use async_trait::async_trait;
use tracktrace_core::{CommandDispatcher, DispatchError, TenantId, Timestamp};
use tracktrace_domain::Enrichment;
use uuid::Uuid;

use crate::capture::aggregates::CaptureCommand;
use crate::capture::service::CaptureService;
use crate::milestone::watch::{MilestoneCommand, SOURCE};

/// Dispatches [`MilestoneCommand`]s through the capture service of the application: the
/// alarm goes through the tenant's attribute schemas and the entity's type claim like a
/// client's event, is stored in the entity's stream with its deterministic id (a re-send is
/// answered with the stored event), projected into the trace and seen by subscribers.
/// Failures the same command may survive later ([`crate::error::AppError::is_retryable`]:
/// store outage, contention) are transient, so the runner sends the command again; any other
/// failure (the tenant's schema refuses the alarm, the entity has another type) is permanent.
#[derive(Clone, Debug)]
pub struct CaptureDispatcher {
    capture: CaptureService,
}

impl CaptureDispatcher {
    /// Dispatches through `capture` (the application's, so its schemas apply).
    pub fn new(capture: CaptureService) -> Self {
        Self { capture }
    }
}

#[async_trait]
impl CommandDispatcher<MilestoneCommand> for CaptureDispatcher {
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &MilestoneCommand,
    ) -> Result<(), DispatchError> {
        let enrichment = Enrichment {
            tenant: tenant.clone(),
            submitted_by: SOURCE.into(),
            received_at: Timestamp::now(),
            correlation_id: command.correlation_id(dispatch_id),
        };
        let event = command.event(tenant);
        match self
            .capture
            .capture(CaptureCommand { event, enrichment })
            .await
        {
            Ok(c) => {
                tracing::info!(
                    %tenant, entity_id = %c.entity_id, event_id = %c.event_id,
                    duplicate = c.duplicate, "milestone alarm captured"
                );
                Ok(())
            }
            Err(e) if e.is_retryable() => Err(DispatchError::Transient(e.to_string())),
            Err(e) => Err(DispatchError::Rejected(e.to_string())),
        }
    }
}
