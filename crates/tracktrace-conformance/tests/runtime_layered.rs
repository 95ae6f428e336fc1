//! The runtime checks through one backend handle with a breaker and a retry layer on every
//! capability: the layers change nothing a projection, saga or command sees.

use std::sync::Arc;

use tracktrace_conformance::runtime::RuntimeStores;
use tracktrace_core::{
    Backend, BackendExt, BreakerConfig, BreakerLayer, InMemoryStore, RetryLayer, RetryPolicy,
};

async fn make_stores() -> RuntimeStores {
    let backend: Arc<dyn Backend> = Arc::new(InMemoryStore::new());
    RuntimeStores::from_backend(
        backend
            .layer(&BreakerLayer(BreakerConfig::default()))
            .layer(&RetryLayer(RetryPolicy::default())),
    )
}

tracktrace_conformance::runtime_tests!(make_stores);
