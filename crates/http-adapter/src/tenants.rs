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
use tokio::sync::{Mutex, RwLock};
use tracktrace_core::{
    EventFilter, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, ReadAll, StreamId,
    TenantId, Version,
};

use crate::auth::SYSTEM_TENANT;
use crate::error::ApiError;

const CREATED: &str = "tt.TenantCreated";
const SUSPENDED: &str = "tt.TenantSuspended";
const RESUMED: &str = "tt.TenantResumed";
const STREAM_PREFIX: &str = "tenant-";
/// Least time between two refreshes of a registry follower.
pub(crate) const FOLLOW_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A tenant's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    /// May capture and read.
    Active,
    /// Every request gets 403 until resumed.
    Suspended,
}

/// A tenant as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Default)]
struct View {
    tenants: HashMap<String, (TenantStatus, Version)>,
    next: Position,
}

/// The registry (cheap to clone).
#[derive(Clone)]
pub struct TenantRegistry {
    store: Arc<dyn EventStore>,
    system: TenantId,
    view: Arc<RwLock<View>>,
    refresh_lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for TenantRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRegistry").finish_non_exhaustive()
    }
}

fn stream_of(tenant: &TenantId) -> Result<StreamId, ApiError> {
    StreamId::parse(format!("{STREAM_PREFIX}{tenant}")).map_err(|_| ApiError::Internal)
}

/// Validates a tenant id for creation (the system tenant and `_`-prefixed ids are reserved).
pub fn parse_new_tenant(id: &str) -> Result<TenantId, ApiError> {
    let t = TenantId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if id.starts_with('_') {
        return Err(ApiError::BadRequest(
            "tenant ids starting with '_' are reserved".into(),
        ));
    }
    Ok(t)
}

impl TenantRegistry {
    /// A registry over `store` (loads nothing until [`TenantRegistry::refresh`]).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            system: TenantId::parse(SYSTEM_TENANT).unwrap_or_else(|_| unreachable_tenant()),
            view: Arc::new(RwLock::new(View::default())),
            refresh_lock: Arc::new(Mutex::new(())),
        }
    }

    /// Reads registry events committed since the last refresh.
    pub async fn refresh(&self) -> Result<(), ApiError> {
        let _g = self.refresh_lock.lock().await;
        let from = self.view.read().await.next;
        let filter = EventFilter {
            tenant: Some(self.system.clone()),
            event_types: Vec::new(),
            stream_prefix: Some(STREAM_PREFIX.into()),
        };
        let mut next = from;
        loop {
            let page = self
                .store
                .read_all(ReadAll::from(next, 1000).filter(filter.clone()))
                .await?;
            let full = page.events.len() == 1000;
            let mut v = self.view.write().await;
            for e in &page.events {
                let Ok(p) = serde_json::from_slice::<TenantPayload>(&e.payload) else {
                    tracing::error!(position = %e.position, "undecodable tenant registry event skipped");
                    continue;
                };
                let status = match e.event_type.as_str() {
                    CREATED | RESUMED => TenantStatus::Active,
                    SUSPENDED => TenantStatus::Suspended,
                    _ => continue,
                };
                v.tenants.insert(p.tenant, (status, e.version));
            }
            v.next = v.next.max(page.next);
            next = page.next;
            if !full {
                return Ok(());
            }
        }
    }

    /// Follows the registry forever (spawned by the server): refreshes on every head change.
    pub async fn follow(self) {
        let mut watch = self.store.watch_head();
        loop {
            watch.borrow_and_update();
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "tenant registry refresh failed");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            // A busy log changes the head after every commit: refresh a few times a second
            // at most (this process applies its own changes at once; others' arrive within
            // this pause).
            tokio::time::sleep(crate::tenants::FOLLOW_PAUSE).await;
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    /// The tenant's state, if it exists (refreshing once on a miss).
    pub async fn status(&self, tenant: &TenantId) -> Result<Option<TenantStatus>, ApiError> {
        if let Some((s, _)) = self.view.read().await.tenants.get(tenant.as_str()) {
            return Ok(Some(*s));
        }
        self.refresh().await?;
        Ok(self
            .view
            .read()
            .await
            .tenants
            .get(tenant.as_str())
            .map(|(s, _)| *s))
    }

    /// 403 unless the tenant exists and is active.
    pub async fn require_active(&self, tenant: &TenantId) -> Result<(), ApiError> {
        match self.status(tenant).await? {
            Some(TenantStatus::Active) => Ok(()),
            Some(TenantStatus::Suspended) => {
                Err(ApiError::Forbidden(format!("tenant {tenant} is suspended")))
            }
            None => Err(ApiError::Forbidden(format!("tenant {tenant} is unknown"))),
        }
    }

    /// Every tenant.
    pub async fn list(&self) -> Result<Vec<TenantInfo>, ApiError> {
        self.refresh().await?;
        let v = self.view.read().await;
        let mut out: Vec<_> = v
            .tenants
            .iter()
            .map(|(id, (status, version))| TenantInfo {
                id: id.clone(),
                status: *status,
                version: version.get(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// One tenant.
    pub async fn get(&self, tenant: &TenantId) -> Result<Option<TenantInfo>, ApiError> {
        self.refresh().await?;
        Ok(self
            .view
            .read()
            .await
            .tenants
            .get(tenant.as_str())
            .map(|(status, version)| TenantInfo {
                id: tenant.to_string(),
                status: *status,
                version: version.get(),
            }))
    }

    /// Creates a tenant; `Ok((info, false))` if it already existed (idempotent).
    pub async fn create(
        &self,
        tenant: &TenantId,
        by: &str,
    ) -> Result<(TenantInfo, bool), ApiError> {
        let stream = stream_of(tenant)?;
        let ev = NewEvent::json(
            CREATED,
            &serde_json::json!(TenantPayload {
                tenant: tenant.to_string(),
                by: by.into()
            }),
        );
        let created = match self
            .store
            .append_to(&self.system, &stream, ExpectedVersion::NoStream, vec![ev])
            .await
        {
            Ok(_) => true,
            Err(e) if e.is_conflict() => false,
            Err(e) => return Err(e.into()),
        };
        let info = self.get(tenant).await?.ok_or(ApiError::Internal)?;
        Ok((info, created))
    }

    /// Suspends (`suspend = true`) or resumes a tenant. 404 if it does not exist.
    pub async fn set_suspended(
        &self,
        tenant: &TenantId,
        suspend: bool,
        by: &str,
    ) -> Result<TenantInfo, ApiError> {
        let stream = stream_of(tenant)?;
        // Optimistic concurrency on the tenant's stream; a few retries cover racing admins.
        for _ in 0..5 {
            let current = self.get(tenant).await?;
            let Some(info) = current else {
                return Err(ApiError::NotFound(format!("tenant {tenant}")));
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
                .store
                .append_to(
                    &self.system,
                    &stream,
                    ExpectedVersion::Exact(Version::new(info.version)),
                    vec![ev],
                )
                .await
            {
                Ok(_) => return self.get(tenant).await?.ok_or(ApiError::Internal),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "tenant {tenant} is being changed concurrently; retry"
        )))
    }
}

#[allow(clippy::unreachable)]
fn unreachable_tenant() -> TenantId {
    unreachable!("the system tenant id is valid")
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
            matches!(reg.require_active(&acme).await, Err(ApiError::Forbidden(m)) if m.contains("suspended"))
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
