//! The tenant registry, stored in the event store itself: one stream per tenant
//! (`tenant-<id>`) under the [`SYSTEM_TENANT`], with `tt.TenantCreated`,
//! `tt.TenantSuspended` and `tt.TenantResumed` events.
//!
//! Every process keeps an in-memory view, refreshed from the system tenant's part of the
//! global log by a follower task (woken by the store's head notifications) and, on an unknown
//! tenant, once synchronously before answering 403. A suspension made through one process
//! reaches the others as soon as their follower reads it.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, RecordedEvent, StreamId, TenantId,
    Version,
};

use crate::access::{Actor, Admins, SYSTEM_TENANT, system_tenant};
use crate::error::AppError;
use crate::follow::{FOLLOW_PAUSE, Followed, SystemView};

const CREATED: &str = "tt.TenantCreated";
const SUSPENDED: &str = "tt.TenantSuspended";
const RESUMED: &str = "tt.TenantResumed";
const STREAM_PREFIX: &str = "tenant-";

/// A tenant's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    /// May capture and read.
    Active,
    /// Every request gets 403 until resumed.
    Suspended,
}

/// A tenant as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenantInfo {
    /// Tenant id.
    pub id: String,
    /// State.
    pub status: TenantStatus,
    /// Version of the tenant's registry stream.
    pub version: u64,
}

#[derive(Serialize, Deserialize)]
struct TenantPayload {
    tenant: String,
    #[serde(default)]
    by: String,
}

/// The registry's view: every tenant's state and registry-stream version.
#[derive(Default)]
pub struct TenantView {
    tenants: HashMap<String, (TenantStatus, Version)>,
}

impl SystemView for TenantView {
    type Change = (String, TenantStatus, Version);
    const STREAM_PREFIX: &'static str = STREAM_PREFIX;

    fn decode(e: &RecordedEvent) -> Option<Self::Change> {
        let status = match e.event_type.as_str() {
            CREATED | RESUMED => TenantStatus::Active,
            SUSPENDED => TenantStatus::Suspended,
            _ => return None,
        };
        match serde_json::from_slice::<TenantPayload>(&e.payload) {
            Ok(p) => Some((p.tenant, status, e.version)),
            Err(_) => {
                tracing::error!(position = %e.position, "undecodable tenant registry event skipped");
                None
            }
        }
    }

    fn apply(&mut self, (tenant, status, version): Self::Change) {
        self.tenants.insert(tenant, (status, version));
    }
}

impl TenantView {
    fn info(&self, id: &str) -> Option<TenantInfo> {
        self.tenants.get(id).map(|(status, version)| TenantInfo {
            id: id.to_owned(),
            status: *status,
            version: version.get(),
        })
    }
}

/// The registry (cheap to clone).
#[derive(Clone, Debug)]
pub struct TenantRegistry {
    view: Followed<TenantView>,
}

fn stream_of(tenant: &TenantId) -> Result<StreamId, AppError> {
    StreamId::parse(format!("{STREAM_PREFIX}{tenant}")).map_err(AppError::internal)
}

/// Parses a tenant id named in a request (field `tenant` of a 400 when invalid).
pub fn parse_tenant(id: &str) -> Result<TenantId, AppError> {
    TenantId::parse(id).map_err(|e| AppError::field("tenant", e.to_string()))
}

/// Validates a tenant id for creation (the system tenant and `_`-prefixed ids are reserved).
pub fn parse_new_tenant(id: &str) -> Result<TenantId, AppError> {
    let t = TenantId::parse(id).map_err(|e| AppError::field("id", e.to_string()))?;
    if id.starts_with('_') {
        return Err(AppError::field(
            "id",
            "tenant ids starting with '_' are reserved",
        ));
    }
    Ok(t)
}

impl TenantRegistry {
    /// A registry over `store` (loads nothing until [`TenantRegistry::refresh`]).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            view: Followed::new(store),
        }
    }

    fn store(&self) -> &Arc<dyn EventStore> {
        self.view.store()
    }

    /// Reads registry events committed since the last refresh.
    pub async fn refresh(&self) -> Result<(), AppError> {
        self.view.refresh().await
    }

    /// A receiver that changes whenever a refresh applied registry events (a tenant was
    /// created, suspended or resumed).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.view.changes()
    }

    /// Follows the registry forever (spawned by the server): refreshes after head changes, a
    /// few times a second at most (this process applies its own changes at once; others'
    /// arrive within [`FOLLOW_PAUSE`]).
    pub async fn follow(self) {
        self.view.follow(FOLLOW_PAUSE).await
    }

    /// The tenant's state, if it exists (refreshing once on a miss).
    pub async fn status(&self, tenant: &TenantId) -> Result<Option<TenantStatus>, AppError> {
        let known = |v: &TenantView| v.tenants.get(tenant.as_str()).map(|(s, _)| *s);
        if let Some(s) = self.view.read(known) {
            return Ok(Some(s));
        }
        self.refresh().await?;
        Ok(self.view.read(known))
    }

    /// Forbidden unless the tenant exists and is active.
    pub async fn require_active(&self, tenant: &TenantId) -> Result<(), AppError> {
        match self.status(tenant).await? {
            Some(TenantStatus::Active) => Ok(()),
            Some(TenantStatus::Suspended) => {
                Err(AppError::Forbidden(format!("tenant {tenant} is suspended")))
            }
            None => Err(AppError::Forbidden(format!("tenant {tenant} is unknown"))),
        }
    }

    /// Not found unless the tenant exists (in any state).
    pub async fn require_exists(&self, tenant: &TenantId) -> Result<(), AppError> {
        match self.status(tenant).await? {
            Some(_) => Ok(()),
            None => Err(AppError::NotFound(format!("tenant {tenant}"))),
        }
    }

    /// The tenant an administrative request of `actor` names by `id`, checked in this order:
    /// forbidden unless `actor` is one of `admins`, 400 (field `tenant`) if `id` is not a
    /// tenant id, not found if no such tenant exists. The one check every admin operation on
    /// a tenant's resources uses.
    pub async fn admin_target(
        &self,
        actor: &Actor,
        admins: Admins<'_>,
        id: &str,
    ) -> Result<TenantId, AppError> {
        actor.require_admin(admins, id)?;
        let tenant = parse_tenant(id)?;
        self.require_exists(&tenant).await?;
        Ok(tenant)
    }

    /// Every tenant.
    pub async fn list(&self) -> Result<Vec<TenantInfo>, AppError> {
        self.refresh().await?;
        let mut out: Vec<_> = self.view.read(|v| {
            v.tenants
                .keys()
                .filter_map(|id| v.info(id))
                .collect::<Vec<_>>()
        });
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Every active tenant but the system tenant.
    pub async fn active(&self) -> Result<Vec<TenantId>, AppError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|t| t.status == TenantStatus::Active && t.id != SYSTEM_TENANT)
            .filter_map(|t| TenantId::parse(t.id).ok())
            .collect())
    }

    /// One tenant.
    pub async fn get(&self, tenant: &TenantId) -> Result<Option<TenantInfo>, AppError> {
        self.refresh().await?;
        Ok(self.view.read(|v| v.info(tenant.as_str())))
    }

    /// Creates a tenant; `Ok((info, false))` if it already existed (idempotent).
    pub async fn create(
        &self,
        tenant: &TenantId,
        by: &str,
    ) -> Result<(TenantInfo, bool), AppError> {
        let stream = stream_of(tenant)?;
        let ev = NewEvent::json(
            CREATED,
            &serde_json::json!(TenantPayload {
                tenant: tenant.to_string(),
                by: by.into()
            }),
        );
        let created = match self
            .store()
            .append_to(
                &system_tenant(),
                &stream,
                ExpectedVersion::NoStream,
                vec![ev],
            )
            .await
        {
            Ok(_) => true,
            Err(e) if e.is_conflict() => false,
            Err(e) => return Err(e.into()),
        };
        let info = self.get(tenant).await?.ok_or_else(|| {
            AppError::internal(format!("tenant {tenant} vanished after creation"))
        })?;
        Ok((info, created))
    }

    /// Suspends (`suspend = true`) or resumes a tenant. Not found if it does not exist.
    pub async fn set_suspended(
        &self,
        tenant: &TenantId,
        suspend: bool,
        by: &str,
    ) -> Result<TenantInfo, AppError> {
        let stream = stream_of(tenant)?;
        // Optimistic concurrency on the tenant's stream; a few retries cover racing admins.
        for _ in 0..5 {
            let Some(info) = self.get(tenant).await? else {
                return Err(AppError::NotFound(format!("tenant {tenant}")));
            };
            let wanted = if suspend {
                TenantStatus::Suspended
            } else {
                TenantStatus::Active
            };
            if info.status == wanted {
                return Ok(info);
            }
            let ev = NewEvent::json(
                if suspend { SUSPENDED } else { RESUMED },
                &serde_json::json!(TenantPayload {
                    tenant: tenant.to_string(),
                    by: by.into()
                }),
            );
            match self
                .store()
                .append_to(
                    &system_tenant(),
                    &stream,
                    ExpectedVersion::Exact(Version::new(info.version)),
                    vec![ev],
                )
                .await
            {
                Ok(_) => {
                    return self.get(tenant).await?.ok_or_else(|| {
                        AppError::internal(format!("tenant {tenant} vanished after a change"))
                    });
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Conflict(format!(
            "tenant {tenant} is being changed concurrently; retry"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracktrace_core::InMemoryStore;

    #[tokio::test]
    async fn create_suspend_resume() {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
        let reg = TenantRegistry::new(store.clone());
        let acme = TenantId::parse("acme").unwrap();
        assert!(reg.require_active(&acme).await.is_err());
        let (info, created) = reg.create(&acme, "test").await.unwrap();
        assert!(created && info.status == TenantStatus::Active);
        assert!(!reg.create(&acme, "test").await.unwrap().1);
        reg.require_active(&acme).await.unwrap();
        reg.set_suspended(&acme, true, "test").await.unwrap();
        assert!(
            matches!(reg.require_active(&acme).await, Err(AppError::Forbidden(m)) if m.contains("suspended"))
        );
        // A second registry over the same store (another process) sees the same state.
        let other = TenantRegistry::new(store);
        assert_eq!(
            other.status(&acme).await.unwrap(),
            Some(TenantStatus::Suspended)
        );
        reg.set_suspended(&acme, false, "test").await.unwrap();
        other.refresh().await.unwrap();
        other.require_active(&acme).await.unwrap();
        assert!(parse_new_tenant("_system").is_err());
    }
}
