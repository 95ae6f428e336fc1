//! The runtime checks (command bus, snapshots, upcasters, projections, sagas, circuit breaker)
//! on `InMemoryStore`.

use std::sync::Arc;

use tracktrace_conformance::runtime::RuntimeStores;
use tracktrace_core::InMemoryStore;

async fn make_stores() -> RuntimeStores {
    RuntimeStores::from_store(Arc::new(InMemoryStore::new()))
}

tracktrace_conformance::runtime_tests!(make_stores);
