//! Assembling and running the server: store selection, roles, background tasks, graceful
//! shutdown. The binary `tracktrace-server` is a thin clap front end over this module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracktrace_core::{BreakerConfig, EventStore, Position, ReadModelStore, TenantId};

use crate::api::{ApiConfig, AppState, router};
use crate::auth::JwtKeys;
use crate::cache::{CacheConfig, TraceCache};
use crate::metrics::{Metrics, guarded_store};
use crate::projection;
use crate::tenants::TenantRegistry;

/// What a process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Serves the API only (scale out against one PostgreSQL).
    Api,
    /// Runs background work only (projections, milestone watch); serves `/healthz` and
    /// `/readyz`.
    Processor,
    /// Both (the default).
    All,
}

/// Server configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Data directory (sled store, generated JWT secret).
    pub data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL instead of sled.
    pub store_url: Option<String>,
    /// PostgreSQL schema.
    pub pg_schema: String,
    /// PostgreSQL connection pool size.
    pub pg_max_connections: u32,
    /// PostgreSQL group appends (see `PgStoreOptions::append_groups`).
    pub pg_append_groups: usize,
    /// `redis://…` to cache trace views in Redis.
    pub cache_url: Option<String>,
    /// Cache settings.
    pub cache: CacheConfig,
    /// Role.
    pub role: Role,
    /// JWT secret (else `<data-dir>/jwt-secret`, generated once).
    pub jwt_secret: Option<String>,
    /// API settings.
    pub api: ApiConfig,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Analytics engine settings (scheduler, windows, InfluxDB).
    pub analytics: crate::analytics::AnalyticsConfig,
    /// NATS propagation (publishers, bus ingestion; feature `nats`).
    pub propagation: crate::propagation::PropagationConfig,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("cannot open the event store: {0}")]
    Store(String),
    /// The secret could not be loaded.
    #[error(transparent)]
    Secret(#[from] crate::auth::SecretError),
    /// The cache could not be set up.
    #[error("cannot set up the cache: {0}")]
    Cache(String),
    /// The analytics engine could not be set up (e.g. the InfluxDB client).
    #[error("cannot set up analytics: {0}")]
    Analytics(String),
    /// Binding or serving failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// NATS propagation could not be set up.
    #[error("cannot set up NATS propagation: {0}")]
    Propagation(String),
}

/// An opened store: the event store and its read-model store (same backend).
#[derive(Clone)]
pub struct Stores {
    /// Events (unwrapped; the API wraps it in the circuit breaker).
    pub events: Arc<dyn EventStore>,
    /// Read models and checkpoints.
    pub read_models: Arc<dyn ReadModelStore>,
    /// Who runs the background work when several processes share the store.
    pub leader: Leadership,
}

/// How a process becomes the one that runs background work (projections, sagas,
/// publishing, analytics) when several `processor`/`all` processes share one store.
#[derive(Clone, Debug)]
pub enum Leadership {
    /// Always this process: the embedded store is opened by one process only.
    Local,
    /// A PostgreSQL lease (session advisory lock, see `PgStore::try_lease`): one leader per
    /// store schema; the others stand by and take over when its connection ends.
    Postgres(tracktrace_store_postgres::PgStore),
}

/// Name of the lease guarding background work.
pub const BACKGROUND_LEASE: &str = "background-work";

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

/// Opens the configured store: PostgreSQL if `store_url` is set, else sled in
/// `<data-dir>/events`.
pub async fn open_stores(cfg: &ServerConfig) -> Result<Stores, StartError> {
    match &cfg.store_url {
        Some(url) => {
            let store = tracktrace_store_postgres::PgStore::connect_with(
                tracktrace_store_postgres::PgStoreOptions::new(url.clone())
                    .schema(cfg.pg_schema.clone())
                    .max_connections(cfg.pg_max_connections)
                    .append_groups(cfg.pg_append_groups)
                    .acquire_timeout(Duration::from_secs(2)),
            )
            .await
            .map_err(|e| StartError::Store(e.to_string()))?;
            let s = Arc::new(store);
            Ok(Stores {
                events: s.clone(),
                read_models: s.clone(),
                leader: Leadership::Postgres((*s).clone()),
            })
        }
        None => {
            let path = cfg.data_dir.join("events");
            std::fs::create_dir_all(&path)?;
            let store = tracktrace_store_sled::SledStore::open(
                tracktrace_store_sled::SledOptions::new(&path),
            )
            .map_err(|e| StartError::Store(e.to_string()))?;
            let s = Arc::new(store);
            Ok(Stores {
                events: s.clone(),
                read_models: s,
                leader: Leadership::Local,
            })
        }
    }
}

/// The signing keys of `cfg`.
pub fn keys(cfg: &ServerConfig) -> Result<JwtKeys, StartError> {
    Ok(match &cfg.jwt_secret {
        Some(s) => JwtKeys::from_secret(s.as_bytes())?,
        None => JwtKeys::load_or_create(&cfg.data_dir)?,
    })
}

async fn make_cache(cfg: &ServerConfig) -> Result<TraceCache, StartError> {
    match &cfg.cache_url {
        None => Ok(TraceCache::local(cfg.cache.clone())),
        #[cfg(feature = "redis")]
        Some(url) => crate::cache::RedisCache::connect(url, &cfg.cache, &store_identity(cfg))
            .await
            .map(TraceCache::Redis)
            .map_err(|e| StartError::Cache(e.to_string())),
        #[cfg(not(feature = "redis"))]
        Some(_) => Err(StartError::Cache(
            "this build has no Redis support (build with `--features redis`)".into(),
        )),
    }
}

/// Identifies the configured event store (cache namespace): PostgreSQL host, database and
/// schema (credentials stripped), or the sled directory.
pub fn store_identity(cfg: &ServerConfig) -> String {
    match &cfg.store_url {
        Some(url) => {
            let rest = url.split("://").nth(1).unwrap_or(url);
            let rest = rest.rsplit('@').next().unwrap_or(rest);
            let rest = rest.split('?').next().unwrap_or(rest);
            format!("pg:{rest}:{}", cfg.pg_schema)
        }
        None => format!(
            "sled:{}",
            std::fs::canonicalize(&cfg.data_dir)
                .unwrap_or_else(|_| cfg.data_dir.clone())
                .display()
        ),
    }
}

/// The `backend` label of the configured store's append latency.
fn backend_label(cfg: &ServerConfig) -> &'static str {
    if cfg.store_url.is_some() {
        "postgres"
    } else {
        "sled"
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

impl Running {
    /// Stops accepting connections, drains in-flight requests, stops background tasks.
    pub async fn shutdown(self) -> Result<(), std::io::Error> {
        let _ = self.shutdown.send(true);
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Waits until the server stops (after a shutdown signal).
    pub async fn wait(self) -> Result<(), std::io::Error> {
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// A handle that triggers graceful shutdown.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Starts the server on `listener` over already opened `stores`.
pub async fn start(
    cfg: &ServerConfig,
    stores: Stores,
    listener: TcpListener,
) -> Result<Running, StartError> {
    let keys = keys(cfg)?;
    let cache = make_cache(cfg).await?;
    #[cfg(not(feature = "nats"))]
    if cfg.propagation.enabled() {
        return Err(StartError::Propagation(
            "this build has no NATS support (build with `--features nats`)".into(),
        ));
    }
    let metrics = Metrics::new();
    let guarded = guarded_store(
        stores.events.clone(),
        backend_label(cfg),
        cfg.breaker,
        &metrics,
    );
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let mut background = Vec::new();
    let (leading_tx, leading) = watch::channel(false);
    let (progress_tx, progress) = if cfg.role != Role::Api {
        let (tx, rx) = watch::channel(Position::START);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let state = AppState::with_metrics(
        guarded,
        stores.read_models.clone(),
        keys,
        cache,
        progress,
        cfg.api.clone(),
        metrics,
    );
    let state = state.with_leading(leading);
    background.push(tokio::spawn(state.tenants().clone().follow()));
    // Schemas are in force before the first request is served.
    if let Err(e) = state.schemas().refresh().await {
        tracing::warn!(error = %e, "cannot load attribute schemas yet; the follower retries");
    }
    background.push(tokio::spawn(state.schemas().clone().follow()));
    state
        .analytics()
        .configure(cfg.analytics.clone())
        .map_err(StartError::Analytics)?;
    export_analytics(&state);
    if cfg.role != Role::Processor {
        // Every API process counts its own rejected captures.
        background.push(tokio::spawn(
            state.analytics().clone().run_rejection_flusher(),
        ));
    }
    // Propagation in roles `processor` and `all`: bus ingestion runs in every such process
    // (they share the durable consumer); the route publishers are leader work.
    #[cfg(feature = "nats")]
    if cfg.role != Role::Api {
        background.extend(
            crate::propagation::spawn(&cfg.propagation, &state, &stores)
                .await
                .map_err(StartError::Propagation)?,
        );
    } else if cfg.propagation.enabled() {
        tracing::warn!(
            "role api: --nats-publish / --nats-ingest run only in roles processor and all"
        );
    }
    if let Some(tx) = progress_tx {
        let work = leader_work(cfg, &stores, &state, tx.clone());
        background.push(tokio::spawn(supervise(
            stores.clone(),
            tx,
            leading_tx,
            work,
        )));
    }
    let closing = state.clone();
    let app = match cfg.role {
        Role::Processor => crate::api::ops_router(state),
        _ => router(state),
    };
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
                // Open event streams would keep their connections (and the drain) forever.
                closing.close_streams();
            })
            .await;
        for b in background {
            b.abort();
        }
        r
    });
    Ok(Running {
        addr,
        shutdown,
        task,
    })
}

/// Name, help, counter (else gauge), reader.
type Series = (
    &'static str,
    &'static str,
    bool,
    fn(&crate::analytics::AnalyticsStatus) -> u64,
);

/// The InfluxDB writer's counters on `/metrics` (all zero without a writer): nothing the
/// analytics engine drops goes unnoticed.
fn export_analytics(state: &AppState) {
    let m = state.metrics();
    let series: [Series; 4] = [
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
        let a = state.analytics().clone();
        let sample =
            move |out: &mut crate::metrics::Samples<'_>| out.push(&[], read(&a.status()) as f64);
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

/// The background work of a leader (roles `processor` and `all`): the trace projection, the
/// milestone watch and the analytics scheduler. Aborted when leadership is lost.
fn leader_work(
    cfg: &ServerConfig,
    stores: &Stores,
    state: &AppState,
    progress: watch::Sender<Position>,
) -> Work {
    let (stores, state, schedule) = (stores.clone(), state.clone(), cfg.analytics.schedule);
    Arc::new(move || {
        let mut tasks = vec![
            tokio::spawn(projection::run_with_metrics(
                stores.events.clone(),
                stores.read_models.clone(),
                progress.clone(),
                state.metrics().clone(),
            )),
            tokio::spawn(crate::milestone::run(
                stores.events.clone(),
                stores.read_models.clone(),
                state.store().clone(),
            )),
        ];
        // Partner-route publishers (prepared by `propagation::spawn` with --nats-publish).
        #[cfg(feature = "nats")]
        tasks.extend(state.propagation().spawn_publishers());
        if schedule {
            let s = state.clone();
            tasks.push(tokio::spawn(state.analytics().clone().run_scheduler(
                move || {
                    let s = s.clone();
                    async move { crate::analytics::active_tenants(&s).await }
                },
            )));
        }
        tasks
    })
}

/// Runs the [`leader_work`] while this process holds the leadership; stands by otherwise.
///
/// A standby keeps `progress` current from the stored checkpoint (the leader's), so its
/// `minPosition` reads still wait for the right thing. Correctness does not depend on there
/// being one leader only (a leader that lost its lease and has not noticed yet is fenced by
/// the projection's checkpoint; appends are idempotent): the lease avoids duplicated work.
async fn supervise(
    stores: Stores,
    progress: watch::Sender<Position>,
    leading: watch::Sender<bool>,
    work: Work,
) {
    loop {
        match &stores.leader {
            Leadership::Local => {
                leading.send_replace(true);
                let work = work();
                // Never lost: wait until the server aborts this task (abort ends the work too).
                let _abort_on_drop = AbortAll(work);
                std::future::pending::<()>().await;
            }
            Leadership::Postgres(pg) => {
                let standby = tokio::spawn(follow_checkpoint(stores.clone(), progress.clone()));
                let lease = pg.lease(BACKGROUND_LEASE, Duration::from_secs(1)).await;
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

/// A standby's view of the trace projection: the stored checkpoint, re-read while the log's
/// head is ahead of it (every 20 ms) and otherwise when the head moves.
async fn follow_checkpoint(stores: Stores, progress: watch::Sender<Position>) {
    let mut head = stores.events.watch_head();
    loop {
        let target = *head.borrow_and_update();
        // Poll until the leader's checkpoint passes the head we saw, for a bounded time (the
        // leader may be gone; then there is nothing to wait for until the head moves again).
        let give_up = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match stores
                .read_models
                .load_checkpoint(projection::TRACE_PROJECTION)
                .await
            {
                Ok(p) => {
                    let p = p.unwrap_or_default();
                    progress.send_if_modified(|cur| (p > *cur).then(|| *cur = p).is_some());
                }
                Err(e) => tracing::debug!(error = %e, "standby cannot read the trace checkpoint"),
            }
            if *progress.borrow() > target || tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}

/// Creates `tenant` in the store of `cfg` if it does not exist; `Ok(true)` if created.
pub async fn ensure_tenant(stores: &Stores, tenant: &TenantId, by: &str) -> Result<bool, String> {
    let reg = TenantRegistry::new(stores.events.clone());
    reg.create(tenant, by)
        .await
        .map(|(_, created)| created)
        .map_err(|e| e.to_string())
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
