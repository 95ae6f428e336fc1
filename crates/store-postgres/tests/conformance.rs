//! The kernel's conformance suite (every check plus the model-based proptest) against
//! PostgreSQL, each store in a fresh schema so the tests run in parallel.
//!
//! Database: `TRACKTRACE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! The generated tests cannot return early, so an unreachable database fails them, in CI and
//! outside, with a message naming the variable (a suite that passed without PostgreSQL would
//! prove nothing about it).

mod common;

use std::sync::Arc;

use tracktrace_core::{EventStore, ReadModelStore, SnapshotStore};

async fn make_store() -> Arc<dyn EventStore> {
    Arc::new(common::store().await)
}
tracktrace_conformance::conformance_tests!(make_store);

async fn make_read_model_store() -> Arc<dyn ReadModelStore> {
    Arc::new(common::store().await)
}
tracktrace_conformance::read_model_tests!(make_read_model_store);

async fn make_snapshot_store() -> Arc<dyn SnapshotStore> {
    Arc::new(common::store().await)
}
tracktrace_conformance::snapshot_tests!(make_snapshot_store);
