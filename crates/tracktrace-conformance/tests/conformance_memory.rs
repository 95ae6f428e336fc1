//! The full conformance suite and the model-based property test against `InMemoryStore`.

use std::sync::Arc;

use tracktrace_core::{EventStore, InMemoryStore, ReadModelStore, SnapshotStore};

async fn make_store() -> Arc<dyn EventStore> {
    Arc::new(InMemoryStore::new())
}

async fn make_read_model_store() -> Arc<dyn ReadModelStore> {
    Arc::new(InMemoryStore::new())
}

async fn make_snapshot_store() -> Arc<dyn SnapshotStore> {
    Arc::new(InMemoryStore::new())
}

tracktrace_conformance::conformance_tests!(make_store);
tracktrace_conformance::read_model_tests!(make_read_model_store);
tracktrace_conformance::snapshot_tests!(make_snapshot_store);
tracktrace_conformance::monotonic_clock_tests!(make_store);
