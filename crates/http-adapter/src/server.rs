//! Assembling and running the server: store selection, roles, background tasks, graceful
//! shutdown. The binary `tracktrace-server` is a thin clap front end over this module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracktrace_core::{
    BreakerConfig, CircuitBreaker, EventStore, Position, ReadModelStore, TenantId,
};

use crate::api::{ApiConfig, AppState, router};
use crate::auth::JwtKeys;
use crate::cache::{CacheConfig, TraceCache};
use crate::projection;
use crate::tenants::TenantRegistry;

/// What a process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Serves the API only (scale out against one PostgreSQL).
    Api,
    /// Runs background work only (projections); serves `/healthz` and `/readyz`.
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
}

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
                    .acquire_timeout(Duration::from_secs(2)),
            )
            .await
            .map_err(|e| StartError::Store(e.to_string()))?;
            let s = Arc::new(store);
            Ok(Stores {
                events: s.clone(),
                read_models: s,
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
        Some(url) => crate::cache::RedisCache::connect(url, cfg.cache.ttl, &store_identity(cfg))
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
    let guarded: Arc<dyn EventStore> = Arc::new(CircuitBreaker::with_config(
        stores.events.clone(),
        cfg.breaker,
    ));
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let mut background = Vec::new();
    let progress = if cfg.role != Role::Api {
        let (tx, rx) = watch::channel(Position::START);
        background.push(tokio::spawn(projection::run(
            stores.events.clone(),
            stores.read_models.clone(),
            tx,
        )));
        Some(rx)
    } else {
        None
    };
    let state = AppState::new(
        guarded,
        stores.read_models.clone(),
        keys,
        cache,
        progress,
        cfg.api.clone(),
    );
    background.push(tokio::spawn(state.tenants().clone().follow()));
    // Publishers and the bus consumer are background work: roles `processor` and `all`.
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
