//! The runtime checks of `tracktrace_conformance::runtime` (command bus under contention,
//! snapshot + tail == replay, upcasting, projection restart, sagas across restarts, circuit
//! breaker) on the sled store, one fresh temporary directory per check.

use std::sync::Arc;

use tracktrace_conformance::runtime::RuntimeStores;
use tracktrace_store_sled::{Durability, SledStore};

async fn make_stores() -> RuntimeStores {
    RuntimeStores::from_store(Arc::new(
        SledStore::temporary(Durability::Fsync).expect("open a temporary sled store"),
    ))
}

tracktrace_conformance::runtime_tests!(make_stores);
