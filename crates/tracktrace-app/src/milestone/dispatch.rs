//! [`CaptureDispatcher`]: the milestone watch's commands captured as events.

use async_trait::async_trait;
use tracktrace_core::{
    CommandDispatcher, CommandFailure, DispatchError, FailureKind, FieldError, TenantId, Timestamp,
};
use tracktrace_domain::Enrichment;
use uuid::Uuid;

use crate::capture::aggregates::CaptureCommand;
use crate::capture::service::CaptureService;
use crate::error::AppError;
use crate::milestone::watch::{MilestoneCommand, SOURCE};

/// Dispatches [`MilestoneCommand`]s through the capture service of the application: the
/// alarm goes through the tenant's attribute schemas and the entity's type claim like a
/// client's event, is stored in the entity's stream with its deterministic id (a re-send is
/// answered with the stored event), projected into the trace and seen by subscribers.
/// Failures the same command may survive later ([`crate::error::AppError::is_retryable`]:
/// store outage, contention) are transient, so the runner sends the command again; any other
/// failure (the tenant's schema refuses the alarm, the entity has another type) is permanent,
/// reported as a [`CommandFailure`] whose kind and code name the [`AppError`] variant
/// ([`failure_of`]).
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
            Err(e) => Err(DispatchError::Rejected(failure_of(&e))),
        }
    }
}

/// The saga failure a permanent [`AppError`] stands for: validation errors keep their fields
/// ([`FailureKind::Invalid`]); forbidden, not found and conflict are domain refusals
/// ([`FailureKind::Rejected`]); the rest is [`FailureKind::Other`]. The code is the variant's
/// name (`"Validation"`, `"Conflict"`, …), stable for sagas to branch on.
pub fn failure_of(e: &AppError) -> CommandFailure {
    let (kind, code) = match e {
        AppError::Validation(fields) => {
            let fields = fields
                .iter()
                .map(|f| FieldError::new(f.field.clone(), f.message.clone()))
                .collect();
            return CommandFailure::invalid(fields).with_code("Validation");
        }
        AppError::Forbidden(_) => (FailureKind::Rejected, "Forbidden"),
        AppError::NotFound(_) => (FailureKind::Rejected, "NotFound"),
        AppError::Conflict(_) => (FailureKind::Rejected, "Conflict"),
        AppError::Malformed(_) => (FailureKind::Other, "Malformed"),
        AppError::BadRequest(_) => (FailureKind::Other, "BadRequest"),
        AppError::TooLarge { .. } => (FailureKind::Other, "TooLarge"),
        AppError::StorageFull(_) => (FailureKind::Other, "StorageFull"),
        _ => (FailureKind::Other, "Internal"),
    };
    CommandFailure::new(kind, e.to_string()).with_code(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_app_errors_become_typed_failures() {
        let f = failure_of(&AppError::field("attributes.flight", "required"));
        assert_eq!(f.kind, FailureKind::Invalid);
        assert_eq!(f.code.as_deref(), Some("Validation"));
        assert_eq!(
            f.fields,
            vec![FieldError::new("attributes.flight", "required")]
        );
        let f = failure_of(&AppError::Conflict("entity Bag-1 is a ULD".into()));
        assert_eq!(f.kind, FailureKind::Rejected);
        assert_eq!(f.code.as_deref(), Some("Conflict"));
        assert!(f.message.contains("is a ULD"), "{}", f.message);
        let f = failure_of(&AppError::internal("disk on fire"));
        assert_eq!(f.kind, FailureKind::Other);
        assert_eq!(f.code.as_deref(), Some("Internal"));
    }
}
