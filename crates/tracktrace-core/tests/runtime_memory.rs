//! The runtime checks (command bus, snapshots, upcasters, projections, sagas, circuit breaker)
//! on `InMemoryStore`.

use std::sync::Arc;

use tracktrace_core::InMemoryStore;
use tracktrace_core::runtime_checks::RuntimeStores;

async fn make_stores() -> RuntimeStores {
    RuntimeStores::from_store(Arc::new(InMemoryStore::new()))
}

tracktrace_core::runtime_tests!(make_stores);
