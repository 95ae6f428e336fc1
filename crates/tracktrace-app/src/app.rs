//! [`App`]: the Track & Trace application assembled over one store, with every operation a
//! front end offers (capture, traces, tenant and schema administration, milestones,
//! analytics, partner routes), each checking its [`Actor`] itself.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tracktrace_core::{EventStore, Position, ReadModelStore, TenantId};
use tracktrace_domain::FieldError;

use crate::access::{Actor, Admins, Scope};
use crate::analytics::Analytics;
use crate::capture::pipeline::{CapturePipeline, CaptureRequest};
use crate::capture::service::Captured;
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::milestone::service::Milestones;
use crate::schemas::{SchemaInfo, SchemaRegistry};
use crate::tenants::{TenantInfo, TenantRegistry, parse_new_tenant};
use crate::trace::live::{LiveFilter, LiveHub, LiveItem};
use crate::trace::model::{EntityStatus, TRACE_PROJECTION};
use crate::trace::query::{check_entity_id, load_status};
use crate::trace::runner::wait_for;
use crate::trace::view::{PageLimits, ParsedQuery, TraceOptions, TraceView, build_view};

/// Settings of the application's queries.
#[derive(Clone, Debug)]
pub struct AppConfig {
    /// Longest wait of a read-your-writes (`minPosition`) trace query.
    pub read_your_writes_timeout: Duration,
    /// Page sizes of trace queries.
    pub page: PageLimits,
    /// Entries a live-stream client may fall behind before its stream is closed (the shared
    /// broadcast buffer of [`LiveHub`]).
    pub live_buffer: usize,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            read_your_writes_timeout: Duration::from_secs(2),
            page: PageLimits::default(),
            live_buffer: 1024,
        }
    }
}

/// The application (cheap to clone: clones share everything).
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModelStore>,
    tenants: TenantRegistry,
    schemas: SchemaRegistry,
    capture: CapturePipeline,
    analytics: Analytics,
    milestones: Milestones,
    metrics: Metrics,
    live: LiveHub,
    progress: Option<watch::Receiver<Position>>,
    leading: OnceLock<watch::Receiver<bool>>,
    config: AppConfig,
    #[cfg(feature = "nats")]
    propagation: crate::propagation::Propagation,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// The application over `store` (wrap it in the circuit breaker first, see
    /// [`crate::metrics::guarded_store`]) and its read-model store. `progress`: the trace
    /// projection's committed checkpoint, when it runs (or is followed) in this process.
    pub fn new(
        store: Arc<dyn EventStore>,
        read_models: Arc<dyn ReadModelStore>,
        progress: Option<watch::Receiver<Position>>,
        config: AppConfig,
    ) -> Self {
        Self::with_metrics(store, read_models, progress, config, Metrics::new())
    }

    /// Like [`App::new`], exporting into `metrics`: the head of `store` and, with `progress`,
    /// the trace projection's lag are measured at scrape time.
    pub fn with_metrics(
        store: Arc<dyn EventStore>,
        read_models: Arc<dyn ReadModelStore>,
        progress: Option<watch::Receiver<Position>>,
        config: AppConfig,
        metrics: Metrics,
    ) -> Self {
        metrics.watch_event_store(&store);
        if let Some(p) = &progress
            && let Err(e) = metrics.register_projection(TRACE_PROJECTION, &store, p.clone())
        {
            tracing::warn!(error = %e, "trace projection lag not exported twice");
        }
        let tenants = TenantRegistry::new(store.clone());
        let schemas = SchemaRegistry::new(store.clone());
        let analytics = Analytics::new(store.clone());
        let capture = CapturePipeline::new(
            store.clone(),
            tenants.clone(),
            schemas.clone(),
            metrics.clone(),
            analytics.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                milestones: Milestones::new(store.clone(), tenants.clone()),
                live: LiveHub::new(store.clone(), config.live_buffer),
                #[cfg(feature = "nats")]
                propagation: crate::propagation::Propagation::new(store.clone()),
                tenants,
                schemas,
                capture,
                analytics,
                metrics,
                store,
                read_models,
                progress,
                leading: OnceLock::new(),
                config,
            }),
        }
    }

    // ---- parts ----------------------------------------------------------------------------

    /// The event store (behind the circuit breaker).
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The read models and checkpoints.
    pub fn read_models(&self) -> &Arc<dyn ReadModelStore> {
        &self.inner.read_models
    }

    /// The tenant registry.
    pub fn tenants(&self) -> &TenantRegistry {
        &self.inner.tenants
    }

    /// The attribute schema registry.
    pub fn schemas(&self) -> &SchemaRegistry {
        &self.inner.schemas
    }

    /// The capture pipeline.
    pub fn capture_pipeline(&self) -> &CapturePipeline {
        &self.inner.capture
    }

    /// The analytics engine.
    pub fn analytics(&self) -> &Analytics {
        &self.inner.analytics
    }

    /// Milestone rules and watches.
    pub fn milestones(&self) -> &Milestones {
        &self.inner.milestones
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The settings.
    pub fn config(&self) -> &AppConfig {
        &self.inner.config
    }

    /// Propagation: partner routes, publisher and bus-consumer status (feature `nats`).
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    pub fn propagation(&self) -> &crate::propagation::Propagation {
        &self.inner.propagation
    }

    /// Reports, in [`App::readiness`], whether this process leads the background work (the
    /// first call wins).
    pub fn set_leading(&self, leading: watch::Receiver<bool>) {
        let _ = self.inner.leading.set(leading);
    }

    // ---- access ---------------------------------------------------------------------------

    /// Forbidden unless `actor` holds `scope` and its tenant is active.
    pub async fn authorize(&self, actor: &Actor, scope: Scope) -> Result<(), AppError> {
        actor.require(scope)?;
        self.inner.tenants.require_active(&actor.tenant).await
    }

    // ---- capture --------------------------------------------------------------------------

    /// Captures one event (see [`crate::capture::pipeline`]).
    pub async fn capture(
        &self,
        actor: &Actor,
        req: CaptureRequest<'_>,
    ) -> Result<Captured, AppError> {
        self.inner.capture.capture(actor, req).await
    }

    /// Captures the events of a batch document, each on its own.
    pub async fn capture_batch(
        &self,
        actor: &Actor,
        body: &[u8],
        correlation_id: Option<String>,
        correlation_field: &str,
    ) -> Result<Vec<Result<Captured, AppError>>, AppError> {
        self.inner
            .capture
            .capture_batch(actor, body, correlation_id, correlation_field)
            .await
    }

    // ---- traces ---------------------------------------------------------------------------

    /// Checks trace query options (every field error).
    pub fn parse_trace_query(&self, options: &TraceOptions) -> Result<ParsedQuery, AppError> {
        ParsedQuery::parse(options, self.inner.config.page)
    }

    /// Waits (at most the read-your-writes timeout) until the trace read model includes
    /// `position`. A position beyond the log's head when the wait ends was never returned by a
    /// capture: a field error on `minPosition` (not a timeout, which would say "retry").
    pub async fn wait_for_position(&self, position: Position) -> Result<(), AppError> {
        match wait_for(
            &*self.inner.read_models,
            self.inner.progress.as_ref(),
            position,
            self.inner.config.read_your_writes_timeout,
        )
        .await
        {
            Err(AppError::Timeout(reason)) => match self.inner.store.head().await {
                Ok(head) if position > head => Err(AppError::Validation(vec![FieldError::new(
                    "minPosition",
                    format!(
                        "position {position} is beyond the head of the log ({head}): no capture \
                         returned it"
                    ),
                )])),
                _ => Err(AppError::Timeout(reason)),
            },
            r => r,
        }
    }

    /// The status record of `entity_id` of `tenant`: its generation (the position of the
    /// last event applied to it) keys every cached view of it. Field error for an invalid id,
    /// not found for an unknown entity.
    pub async fn entity_status(
        &self,
        tenant: &TenantId,
        entity_id: &str,
    ) -> Result<EntityStatus, AppError> {
        check_entity_id(entity_id)?;
        load_status(&*self.inner.read_models, tenant, entity_id)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("entity {entity_id}")))
    }

    /// The view of the entity whose status is `status`, for query `query`.
    pub async fn trace_view(
        &self,
        tenant: &TenantId,
        status: &EntityStatus,
        query: &ParsedQuery,
    ) -> Result<TraceView, AppError> {
        build_view(&*self.inner.read_models, tenant, status, query).await
    }

    /// The timeline entries of the actor's tenant after `after` (default: from the current
    /// head: new entries only), live, through the process's one [`LiveHub`]. Checks the actor
    /// (`trace:read`, active tenant) and the filter first; the stream ends when the tenant is
    /// suspended or the client falls too far behind (see [`crate::trace::live`]).
    pub async fn live_entries(
        &self,
        actor: &Actor,
        after: Option<Position>,
        filter: LiveFilter,
    ) -> Result<impl futures_util::Stream<Item = LiveItem> + Send + 'static, AppError> {
        self.authorize(actor, Scope::TraceRead).await?;
        if let Some(id) = &filter.entity_id {
            check_entity_id(id)?;
        }
        let from = match after {
            Some(p) => p.next(),
            None => self.inner.store.head().await?.next(),
        };
        Ok(self.inner.live.entries(
            actor.tenant.clone(),
            from,
            filter,
            self.inner.tenants.clone(),
        ))
    }

    /// The live hub (clients connected now, for metrics and tests).
    pub fn live_hub(&self) -> &LiveHub {
        &self.inner.live
    }

    // ---- tenants and schemas ----------------------------------------------------------------

    /// Creates a tenant (system admins); `(info, false)` if it existed.
    pub async fn create_tenant(
        &self,
        actor: &Actor,
        id: &str,
    ) -> Result<(TenantInfo, bool), AppError> {
        actor.require_system_admin(TENANT_ADMIN)?;
        let tenant = parse_new_tenant(id)?;
        self.inner.tenants.create(&tenant, &actor.subject).await
    }

    /// Every tenant (system admins).
    pub async fn list_tenants(&self, actor: &Actor) -> Result<Vec<TenantInfo>, AppError> {
        actor.require_system_admin(TENANT_ADMIN)?;
        self.inner.tenants.list().await
    }

    /// Suspends or resumes a tenant (system admins).
    pub async fn set_suspended(
        &self,
        actor: &Actor,
        id: &str,
        suspend: bool,
    ) -> Result<TenantInfo, AppError> {
        actor.require_system_admin(TENANT_ADMIN)?;
        let tenant = crate::tenants::parse_tenant(id)?;
        self.inner
            .tenants
            .set_suspended(&tenant, suspend, &actor.subject)
            .await
    }

    /// The attribute schemas of a tenant (system admins).
    pub async fn list_schemas(
        &self,
        actor: &Actor,
        tenant: &str,
    ) -> Result<Vec<SchemaInfo>, AppError> {
        let tenant = self
            .inner
            .tenants
            .admin_target(actor, Admins::System(TENANT_ADMIN), tenant)
            .await?;
        self.inner.schemas.refresh().await?;
        Ok(self.inner.schemas.list(&tenant))
    }

    /// Registers (or replaces) the schema of an event type of a tenant from its JSON `body`
    /// (system admins).
    pub async fn put_schema(
        &self,
        actor: &Actor,
        tenant: &str,
        event_type: &str,
        body: &[u8],
    ) -> Result<SchemaInfo, AppError> {
        let tenant = self
            .inner
            .tenants
            .admin_target(actor, Admins::System(TENANT_ADMIN), tenant)
            .await?;
        let schema: Value =
            serde_json::from_slice(body).map_err(|e| AppError::Malformed(e.to_string()))?;
        self.inner
            .schemas
            .set(&tenant, event_type, schema, &actor.subject)
            .await
    }

    /// Removes the schema of an event type of a tenant (system admins; not found if there
    /// is none).
    pub async fn delete_schema(
        &self,
        actor: &Actor,
        tenant: &str,
        event_type: &str,
    ) -> Result<(), AppError> {
        let tenant = self
            .inner
            .tenants
            .admin_target(actor, Admins::System(TENANT_ADMIN), tenant)
            .await?;
        if self
            .inner
            .schemas
            .remove(&tenant, event_type, &actor.subject)
            .await?
        {
            Ok(())
        } else {
            Err(AppError::NotFound(format!(
                "no schema for event type {event_type}"
            )))
        }
    }

    // ---- operations -------------------------------------------------------------------------

    /// What a readiness probe reports: the store's head (an error if it is unreachable), the
    /// trace projection's checkpoint when known here, whether this process leads the
    /// background work, and (feature `nats`) the propagation component.
    pub async fn readiness(&self) -> Result<BTreeMap<&'static str, Value>, AppError> {
        let head = self.inner.store.head().await?;
        let mut m = BTreeMap::new();
        m.insert("head", head.get().into());
        if let Some(p) = &self.inner.progress {
            m.insert("traceProjection", p.borrow().get().into());
        }
        #[cfg(feature = "nats")]
        if let Some(p) = self.inner.propagation.readiness() {
            m.insert("propagation", p);
        }
        if let Some(l) = self.inner.leading.get() {
            m.insert("leader", u64::from(*l.borrow()).into());
        }
        Ok(m)
    }

    /// The Prometheus exposition of this process (system tenant, `metrics:read`).
    pub async fn scrape(&self, actor: &Actor) -> Result<String, AppError> {
        actor.require_scrape()?;
        Ok(self.inner.metrics.scrape().await)
    }
}

/// What tenant administration needs (named in its 403).
pub const TENANT_ADMIN: &str = "tenant administration";

#[cfg(feature = "nats")]
mod routes_admin {
    //! Partner-route administration (system admins).

    use super::App;
    use crate::access::{Actor, Admins};
    use crate::error::AppError;
    use crate::propagation::routes::{RouteInfo, validate};

    const ROUTES: Admins<'static> = Admins::System("partner routes");

    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    impl App {
        /// Adds a partner route from its JSON `body`; `(route, false)` if the same route
        /// existed. Checked in this order: a system admin → the body → the tenant.
        pub async fn add_route(
            &self,
            actor: &Actor,
            tenant: &str,
            body: &[u8],
        ) -> Result<(RouteInfo, bool), AppError> {
            actor.require_admin(ROUTES, tenant)?;
            let spec = validate(body)?;
            let tenant = self.tenants().admin_target(actor, ROUTES, tenant).await?;
            self.propagation()
                .routes()
                .add(&tenant, &spec, &actor.subject)
                .await
        }

        /// A tenant's active routes.
        pub async fn list_routes(
            &self,
            actor: &Actor,
            tenant: &str,
        ) -> Result<Vec<RouteInfo>, AppError> {
            let tenant = self.tenants().admin_target(actor, ROUTES, tenant).await?;
            self.propagation().routes().list(&tenant).await
        }

        /// One active route.
        pub async fn route(
            &self,
            actor: &Actor,
            tenant: &str,
            name: &str,
        ) -> Result<RouteInfo, AppError> {
            let tenant = self.tenants().admin_target(actor, ROUTES, tenant).await?;
            self.propagation()
                .routes()
                .get(&tenant, name)
                .await?
                .ok_or_else(|| AppError::NotFound(format!("route {name} of tenant {tenant}")))
        }

        /// Removes a route.
        pub async fn remove_route(
            &self,
            actor: &Actor,
            tenant: &str,
            name: &str,
        ) -> Result<(), AppError> {
            let tenant = self.tenants().admin_target(actor, ROUTES, tenant).await?;
            self.propagation()
                .routes()
                .remove(&tenant, name, &actor.subject)
                .await
        }
    }
}
