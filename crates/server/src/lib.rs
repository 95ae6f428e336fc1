//! The Track & Trace reference server: opens the configured store (sled by default,
//! PostgreSQL with `--store postgres://…`), assembles the application (`tracktrace-app`) for
//! the process's role, and serves it over HTTP (`tracktrace-http`) with graceful shutdown.
//! The binary `tracktrace-server` is a thin clap front end over this library.

pub mod transfer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracktrace_app::analytics::AnalyticsConfig;
use tracktrace_app::background::{self, RuntimeConfig, Stores};
use tracktrace_app::propagation::PropagationConfig;
use tracktrace_app::tenants::TenantRegistry;
use tracktrace_app::{App, AppConfig};
use tracktrace_core::{BreakerConfig, LocalLeases, TenantId};
use tracktrace_http::auth::{JwtKeys, SecretError};
use tracktrace_http::cache::{CacheConfig, TraceCache};
use tracktrace_http::layers::HttpLimits;
use tracktrace_http::{HttpState, ops_router, router};

/// What a process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Serves the API only (scale out against one PostgreSQL).
    Api,
    /// Runs background work only (projections, milestone watch); serves `/healthz`,
    /// `/readyz` and `/metrics`.
    Processor,
    /// Both (the default).
    All,
}

impl From<Role> for background::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Api => background::Role::Api,
            Role::Processor => background::Role::Processor,
            Role::All => background::Role::All,
        }
    }
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
    /// Appends queued in the store at most (sled writer queue, PostgreSQL group queue).
    pub store_max_queued: usize,
    /// sled: free bytes the data directory's file system must keep (writes refused below).
    pub sled_min_free_bytes: u64,
    /// `redis://…` to cache trace views in Redis.
    pub cache_url: Option<String>,
    /// Cache settings.
    pub cache: CacheConfig,
    /// The HTTP layer's limits (request timeout, requests in flight, streams per tenant).
    pub http: HttpLimits,
    /// Role.
    pub role: Role,
    /// JWT secret (else `<data-dir>/jwt-secret`, generated once).
    pub jwt_secret: Option<String>,
    /// Query settings.
    pub app: AppConfig,
    /// Circuit breaker settings.
    pub breaker: BreakerConfig,
    /// Analytics engine settings (scheduler, windows, InfluxDB).
    pub analytics: AnalyticsConfig,
    /// NATS propagation (publishers, bus ingestion; feature `nats`).
    pub propagation: PropagationConfig,
    /// Milestone-watch entities kept in memory beyond those with pending work.
    pub milestone_max_instances: usize,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("cannot open the event store: {0}")]
    Store(String),
    /// The secret could not be loaded.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The cache could not be set up.
    #[error("cannot set up the cache: {0}")]
    Cache(String),
    /// The application could not start (analytics, propagation).
    #[error(transparent)]
    App(#[from] background::StartError),
    /// Binding or serving failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the configured store: PostgreSQL if `store_url` is set (leases: advisory locks on
/// the schema), else sled in `<data-dir>/events` (one process: local leases).
pub async fn open_stores(cfg: &ServerConfig) -> Result<Stores, StartError> {
    match &cfg.store_url {
        Some(url) => {
            let store = tracktrace_store_postgres::PgStore::connect_with(
                tracktrace_store_postgres::PgStoreOptions::new(url.clone())
                    .schema(cfg.pg_schema.clone())
                    .max_connections(cfg.pg_max_connections)
                    .append_groups(cfg.pg_append_groups)
                    .max_queued_appends(cfg.store_max_queued)
                    .acquire_timeout(Duration::from_secs(2)),
            )
            .await
            .map_err(|e| StartError::Store(e.to_string()))?;
            let s = Arc::new(store);
            Ok(Stores {
                store: s.clone(),
                leases: s,
                backend: "postgres",
            })
        }
        None => {
            let path = cfg.data_dir.join("events");
            std::fs::create_dir_all(&path)?;
            let store = tracktrace_store_sled::SledStore::open(
                tracktrace_store_sled::SledOptions::new(&path)
                    .max_pending(cfg.store_max_queued)
                    .min_free_bytes(cfg.sled_min_free_bytes),
            )
            .map_err(|e| StartError::Store(e.to_string()))?;
            let s = Arc::new(store);
            Ok(Stores {
                store: s,
                leases: Arc::new(LocalLeases::new()),
                backend: "sled",
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
        Some(url) => {
            tracktrace_http::cache::RedisCache::connect(url, &cfg.cache, &store_identity(cfg))
                .await
                .map(TraceCache::Redis)
                .map_err(|e| StartError::Cache(e.to_string()))
        }
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

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// The application the server serves.
    pub app: App,
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
    let runtime = RuntimeConfig {
        role: cfg.role.into(),
        app: cfg.app.clone(),
        breaker: cfg.breaker,
        analytics: cfg.analytics.clone(),
        propagation: cfg.propagation.clone(),
        milestone_max_instances: cfg.milestone_max_instances,
    };
    let (app, background) = background::start(&stores, &runtime).await?;
    let state = HttpState::with_limits(app.clone(), keys, cache, cfg.http);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let closing = state.clone();
    let http = match cfg.role {
        Role::Processor => ops_router(state),
        _ => router(state),
    };
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, http)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
                // Open event streams would keep their connections (and the drain) forever.
                closing.close_streams();
            })
            .await;
        drop(background);
        r
    });
    Ok(Running {
        addr,
        app,
        shutdown,
        task,
    })
}

/// Creates `tenant` in `stores` if it does not exist; `Ok(true)` if created.
pub async fn ensure_tenant(stores: &Stores, tenant: &TenantId, by: &str) -> Result<bool, String> {
    let reg = TenantRegistry::new(stores.store.clone());
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
