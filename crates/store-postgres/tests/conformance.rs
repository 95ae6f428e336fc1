//! The kernel's conformance suite (every check plus the model-based proptest) against
//! PostgreSQL, each store in a fresh schema so the tests run in parallel.
//!
//! Database: `TRACKTRACE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Under `CI=true` an unreachable database fails every test. Otherwise the generated tests
//! cannot return early, so each one prints a loud SKIPPED message naming the variable and runs
//! against the in-memory reference store instead (which checks nothing about PostgreSQL).

mod common;

use std::sync::Arc;

use tracktrace_core::{EventStore, InMemoryStore, ReadModelStore, SnapshotStore};

async fn make_store() -> Arc<dyn EventStore> {
    match common::try_store().await {
        Some(s) => Arc::new(s),
        None => Arc::new(InMemoryStore::new()),
    }
}
tracktrace_core::conformance_tests!(make_store);

async fn make_read_model_store() -> Arc<dyn ReadModelStore> {
    match common::try_store().await {
        Some(s) => Arc::new(s),
        None => Arc::new(InMemoryStore::new()),
    }
}
tracktrace_core::read_model_tests!(make_read_model_store);

async fn make_snapshot_store() -> Arc<dyn SnapshotStore> {
    match common::try_store().await {
        Some(s) => Arc::new(s),
        None => Arc::new(InMemoryStore::new()),
    }
}
tracktrace_core::snapshot_tests!(make_snapshot_store);
