//! The kernel's conformance suite (every check, the model-based proptest, read models and
//! snapshots) on the sled store with its default durability, one fresh directory per store.

use std::sync::Arc;

use tracktrace_core::{EventStore, ReadModelStore, SnapshotStore};
use tracktrace_store_sled::{Durability, SledStore};

fn fresh() -> SledStore {
    SledStore::temporary(Durability::Fsync).expect("open a temporary sled store")
}

async fn make_store() -> Arc<dyn EventStore> {
    Arc::new(fresh())
}
tracktrace_conformance::conformance_tests!(make_store);
tracktrace_conformance::monotonic_clock_tests!(make_store);

async fn make_read_model_store() -> Arc<dyn ReadModelStore> {
    Arc::new(fresh())
}
tracktrace_conformance::read_model_tests!(make_read_model_store);

async fn make_snapshot_store() -> Arc<dyn SnapshotStore> {
    Arc::new(fresh())
}
tracktrace_conformance::snapshot_tests!(make_snapshot_store);
