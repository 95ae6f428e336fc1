//! [`HttpState`]: what every handler shares: the application, the token keys, the trace-view
//! cache and the shutdown signal of open event streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracktrace_app::App;
use tracktrace_core::TenantId;

use crate::auth::JwtKeys;
use crate::cache::TraceCache;
use crate::error::ApiError;
use crate::layers::HttpLimits;

/// Shared state of every handler (cheap to clone).
#[derive(Clone)]
pub struct HttpState {
    inner: Arc<Inner>,
}

struct Inner {
    app: App,
    keys: JwtKeys,
    cache: TraceCache,
    limits: HttpLimits,
    /// Open event streams per tenant.
    streams: Arc<Mutex<HashMap<TenantId, usize>>>,
    /// Set at shutdown: ends open event streams so graceful shutdown can drain connections.
    closing: watch::Sender<bool>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState").finish_non_exhaustive()
    }
}

impl HttpState {
    /// The adapter's state over `app`, verifying tokens with `keys`, caching trace views in
    /// `cache`.
    pub fn new(app: App, keys: JwtKeys, cache: TraceCache) -> Self {
        Self::with_limits(app, keys, cache, HttpLimits::default())
    }

    /// Like [`HttpState::new`], with the HTTP layer's `limits`.
    pub fn with_limits(app: App, keys: JwtKeys, cache: TraceCache, limits: HttpLimits) -> Self {
        export_cache(&app, &cache);
        Self {
            inner: Arc::new(Inner {
                app,
                keys,
                cache,
                limits,
                streams: Arc::new(Mutex::new(HashMap::new())),
                closing: watch::Sender::new(false),
            }),
        }
    }

    /// The HTTP layer's limits.
    pub fn limits(&self) -> HttpLimits {
        self.inner.limits
    }

    /// Counts an event stream of `tenant` while the returned guard lives; 429 when the tenant
    /// already has [`HttpLimits::max_streams_per_tenant`] open in this process.
    pub fn open_stream(&self, tenant: &TenantId) -> Result<StreamSlot, ApiError> {
        let max = self.inner.limits.max_streams_per_tenant;
        let mut open = self.inner.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(tenant.clone()).or_insert(0);
        if *n >= max {
            return Err(ApiError::TooManyStreams(format!(
                "tenant {tenant} has {max} open event streams, the most allowed per server process"
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            streams: self.inner.streams.clone(),
            tenant: tenant.clone(),
        })
    }

    /// The application.
    pub fn app(&self) -> &App {
        &self.inner.app
    }

    /// The signing keys.
    pub fn keys(&self) -> &JwtKeys {
        &self.inner.keys
    }

    /// The trace-view cache.
    pub fn cache(&self) -> &TraceCache {
        &self.inner.cache
    }

    /// Ends every open event stream (SSE) and refuses new ones: called at shutdown, since
    /// graceful shutdown waits for open connections to finish.
    pub fn close_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves once [`HttpState::close_streams`] was called.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

/// The cache's failures (`tracktrace_cache_errors_total`) and breaker
/// (`tracktrace_circuit_breaker_state{component="cache"}`, Redis only) on `/metrics`.
fn export_cache(app: &App, cache: &TraceCache) {
    let m = app.metrics();
    let c = cache.clone();
    let r = m.register_counter(
        CACHE_ERRORS,
        "Trace view cache calls that failed or missed their deadline (the views were served from the read model)",
        &[],
        move |out| out.push(&[], c.errors() as f64),
    );
    if let Err(e) = r {
        tracing::warn!(error = %e, "cache metrics not exported twice");
        return;
    }
    if cache.breaker().is_some() {
        let c = cache.clone();
        if let Err(e) = m.register_breaker(CACHE_COMPONENT, move || c.breaker()) {
            tracing::warn!(error = %e, "cache breaker not exported twice");
        }
    }
}

/// Failed cache calls (a counter).
pub const CACHE_ERRORS: &str = "tracktrace_cache_errors_total";

/// The `component` label of the cache's breaker.
pub const CACHE_COMPONENT: &str = "cache";

/// One open event stream of a tenant (released on drop).
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<Mutex<HashMap<TenantId, usize>>>,
    tenant: TenantId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}
