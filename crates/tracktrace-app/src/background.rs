//! Assembling the application over opened stores and running its background work, by role:
//! the registry followers and the rejection-count flusher in every process that serves
//! requests; bus ingestion in every processor; and, in the one process that holds the
//! background-work lease, the trace projection, the milestone watch, the partner-route
//! publishers and the analytics scheduler.
//!
//! Leadership goes through the store's [`Leases`]: a store only one process can open grants
//! it at once ([`tracktrace_core::LocalLeases`]); PostgreSQL elects one holder per schema and
//! hands over when its connection ends. A standby keeps its `minPosition` waits working by
//! following the leader's stored checkpoint. Correctness never depends on one leader only
//! (fenced checkpoints, idempotent appends): the lease avoids duplicated work.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracktrace_core::{Backend, BreakerConfig, Leases, Position};

use crate::analytics::{AnalyticsConfig, AnalyticsStatus};
use crate::app::{App, AppConfig};
use crate::metrics::{Metrics, Samples, guarded_backend};
use crate::milestone::run::run as run_milestone_watch;
use crate::propagation::config::PropagationConfig;
use crate::trace::runner::{follow_checkpoint, run_with_metrics};

/// Name of the lease guarding background work.
pub const BACKGROUND_LEASE: &str = "background-work";

/// What a process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves requests only (scale out against one PostgreSQL).
    Api,
    /// Runs background work only.
    Processor,
    /// Both.
    All,
}

/// An opened store: events, read models, and who leads background work on it.
#[derive(Clone)]
pub struct Stores {
    /// The backend: the log, read models and checkpoints, snapshots (unwrapped: [`start`]
    /// puts the application's copy behind one breaker, [`guarded_backend`]; background work
    /// uses it as is).
    pub store: Arc<dyn Backend>,
    /// Leases of the store (which process runs the background work).
    pub leases: Arc<dyn Leases>,
    /// The `backend` label of the store's append latency (`sled`, `postgres`, `memory`).
    pub backend: &'static str,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Settings of [`start`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Role of the process.
    pub role: Role,
    /// Query settings.
    pub app: AppConfig,
    /// The event store's circuit breaker.
    pub breaker: BreakerConfig,
    /// Analytics engine settings.
    pub analytics: AnalyticsConfig,
    /// Propagation settings (feature `nats`).
    pub propagation: PropagationConfig,
    /// Milestone-watch instances (entities) kept in memory at most, beyond those with a
    /// pending expectation or alarm (see `tracktrace_core::saga`); the others reload from
    /// their streams when an event arrives for them.
    pub milestone_max_instances: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            role: Role::All,
            app: AppConfig::default(),
            breaker: BreakerConfig::default(),
            analytics: AnalyticsConfig::default(),
            propagation: PropagationConfig::default(),
            milestone_max_instances: tracktrace_core::saga::DEFAULT_MAX_INSTANCES,
        }
    }
}

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The analytics engine could not be set up (e.g. the InfluxDB client).
    #[error("cannot set up analytics: {0}")]
    Analytics(String),
    /// Propagation could not be set up (or this build has no NATS support).
    #[error("cannot set up NATS propagation: {0}")]
    Propagation(String),
}

/// The background tasks of a running application; aborted on drop.
#[derive(Debug)]
pub struct Background {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Assembles the application over `stores` and starts its background work for `cfg.role`.
/// Must run inside a tokio runtime.
pub async fn start(stores: &Stores, cfg: &RuntimeConfig) -> Result<(App, Background), StartError> {
    #[cfg(not(feature = "nats"))]
    if cfg.propagation.enabled() {
        return Err(StartError::Propagation(
            "this build has no NATS support (build with `--features nats`)".into(),
        ));
    }
    let metrics = Metrics::new();
    let guarded = guarded_backend(stores.store.clone(), stores.backend, cfg.breaker, &metrics);
    let (progress_tx, progress) = if cfg.role != Role::Api {
        let (tx, rx) = watch::channel(Position::START);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let app = App::with_metrics(guarded.clone(), guarded, progress, cfg.app.clone(), metrics);
    let (leading_tx, leading) = watch::channel(false);
    app.set_leading(leading);
    let mut tasks = vec![tokio::spawn(app.tenants().clone().follow())];
    // Schemas are in force before the first request is served.
    if let Err(e) = app.schemas().refresh().await {
        tracing::warn!(error = %e, "cannot load attribute schemas yet; the follower retries");
    }
    tasks.push(tokio::spawn(app.schemas().clone().follow()));
    app.analytics()
        .configure(cfg.analytics.clone())
        .map_err(StartError::Analytics)?;
    export_analytics(&app);
    if cfg.role != Role::Processor {
        // Every process that serves requests counts its own rejected captures.
        tasks.push(tokio::spawn(
            app.analytics().clone().run_rejection_flusher(),
        ));
    }
    // Bus ingestion runs in every processor (they share the durable consumer); the route
    // publishers are leader work.
    #[cfg(feature = "nats")]
    if cfg.role != Role::Api {
        tasks.extend(
            crate::propagation::spawn(
                &cfg.propagation,
                app.propagation(),
                crate::propagation::PropagationDeps {
                    store: stores.store.clone(),
                    checkpoints: stores.store.clone(),
                    capture: app.capture_pipeline().clone(),
                    metrics: app.metrics().clone(),
                },
            )
            .await
            .map_err(StartError::Propagation)?,
        );
    } else if cfg.propagation.enabled() {
        tracing::warn!(
            "role api: --nats-publish / --nats-ingest run only in roles processor and all"
        );
    }
    if let Some(tx) = progress_tx {
        let work = leader_work(
            stores,
            &app,
            cfg.analytics.schedule,
            cfg.milestone_max_instances,
            tx.clone(),
        );
        tasks.push(tokio::spawn(supervise(
            stores.clone(),
            tx,
            leading_tx,
            work,
        )));
    }
    Ok((app, Background { tasks }))
}

/// Name, help, counter (else gauge), reader.
type Series = (
    &'static str,
    &'static str,
    bool,
    fn(&AnalyticsStatus) -> u64,
);

/// The analytics engine's bounds and the InfluxDB writer's counters on `/metrics` (the
/// writer's all zero without a writer): nothing the analytics engine drops goes unnoticed.
fn export_analytics(app: &App) {
    let m = app.metrics();
    let series: [Series; 8] = [
        (
            "tracktrace_analytics_untracked_entities_total",
            "Entities whose transit and dwell were left out of the KPI windows this process computed (a tenant's window exceeded the tracked-entity or tracked-event bound)",
            true,
            |s| s.untracked_entities,
        ),
        (
            "tracktrace_analytics_runs_refused_total",
            "On-demand analytics runs refused with 503 because as many as the process admits were in progress",
            true,
            |s| s.runs_refused,
        ),
        (
            "tracktrace_analytics_rejection_buckets",
            "Rejected-command count buckets (tenant, second or window) not yet stored",
            false,
            |s| s.rejection_buckets,
        ),
        (
            "tracktrace_analytics_rejections_lost_total",
            "Rejected-command counts dropped because the buffer reached its bound (store down too long)",
            true,
            |s| s.rejections_lost,
        ),
        (
            "tracktrace_influx_points_written_total",
            "KPI and anomaly points InfluxDB accepted",
            true,
            |s| s.influx_written,
        ),
        (
            "tracktrace_influx_points_dropped_total",
            "KPI and anomaly points dropped because the writer's buffer was full (InfluxDB down too long)",
            true,
            |s| s.influx_dropped,
        ),
        (
            "tracktrace_influx_points_rejected_total",
            "KPI and anomaly points InfluxDB rejected as malformed",
            true,
            |s| s.influx_rejected,
        ),
        (
            "tracktrace_influx_points_buffered",
            "KPI and anomaly points waiting to be written to InfluxDB",
            false,
            |s| s.influx_buffered,
        ),
    ];
    for (name, help, counter, read) in series {
        let a = app.analytics().clone();
        let sample = move |out: &mut Samples<'_>| out.push(&[], read(&a.status()) as f64);
        let r = if counter {
            m.register_counter(name, help, &[], sample)
        } else {
            m.register_gauge(name, help, &[], sample)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "analytics metric not exported");
        }
    }
}

/// Starts the leader's background tasks; called again after every takeover.
type Work = Arc<dyn Fn() -> Vec<JoinHandle<()>> + Send + Sync>;

/// The background work of a leader: the trace projection, the milestone watch, the route
/// publishers and the analytics scheduler. Aborted when leadership is lost.
fn leader_work(
    stores: &Stores,
    app: &App,
    schedule: bool,
    milestone_max_instances: usize,
    progress: watch::Sender<Position>,
) -> Work {
    let (stores, app) = (stores.clone(), app.clone());
    Arc::new(move || {
        let mut tasks = vec![
            tokio::spawn(run_with_metrics(
                stores.store.clone(),
                stores.store.clone(),
                progress.clone(),
                app.metrics().clone(),
            )),
            tokio::spawn(run_milestone_watch(
                stores.store.clone(),
                stores.store.clone(),
                app.capture_pipeline().service().clone(),
                milestone_max_instances,
            )),
        ];
        // Partner-route publishers (prepared by `propagation::spawn` with --nats-publish).
        #[cfg(feature = "nats")]
        tasks.extend(app.propagation().spawn_publishers());
        if schedule {
            let tenants = app.tenants().clone();
            tasks.push(tokio::spawn(app.analytics().clone().run_scheduler(
                move || {
                    let tenants = tenants.clone();
                    async move { tenants.active().await }
                },
            )));
        }
        tasks
    })
}

/// Runs the [`leader_work`] while this process holds the background-work lease; stands by
/// otherwise, following the leader's checkpoint.
async fn supervise(
    stores: Stores,
    progress: watch::Sender<Position>,
    leading: watch::Sender<bool>,
    work: Work,
) {
    loop {
        let standby = tokio::spawn(follow_checkpoint(
            stores.store.clone(),
            stores.store.clone(),
            progress.clone(),
        ));
        let lease = stores
            .leases
            .lease(BACKGROUND_LEASE, Duration::from_secs(1))
            .await;
        standby.abort();
        tracing::info!("leading background work (lease {BACKGROUND_LEASE})");
        leading.send_replace(true);
        let work = AbortAll(work());
        lease.lost().await;
        drop(work);
        leading.send_replace(false);
        tracing::warn!("lost the background-work lease; standing by");
    }
}

/// Aborts its tasks when dropped.
struct AbortAll(Vec<JoinHandle<()>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
