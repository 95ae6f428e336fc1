//! [`HttpState`]: what every handler shares: the application, the token keys, the trace-view
//! cache and the shutdown signal of open event streams.

use std::sync::Arc;

use tokio::sync::watch;
use tracktrace_app::App;

use crate::auth::JwtKeys;
use crate::cache::TraceCache;

/// Shared state of every handler (cheap to clone).
#[derive(Clone)]
pub struct HttpState {
    inner: Arc<Inner>,
}

struct Inner {
    app: App,
    keys: JwtKeys,
    cache: TraceCache,
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
        Self {
            inner: Arc::new(Inner {
                app,
                keys,
                cache,
                closing: watch::Sender::new(false),
            }),
        }
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
