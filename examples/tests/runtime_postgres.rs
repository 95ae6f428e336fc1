//! The runtime checks of `tracktrace_conformance::runtime` on PostgreSQL, each in a fresh schema
//! (dropped afterwards) so they run in parallel. Uses store-postgres's own test helpers.
//!
//! Database: `TRACKTRACE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! The generated tests cannot skip: without a reachable database they fail, naming the variable.

#[path = "../../crates/store-postgres/tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use tracktrace_conformance::runtime::RuntimeStores;

async fn make_stores() -> RuntimeStores {
    RuntimeStores::from_store(Arc::new(common::store().await))
}

tracktrace_conformance::runtime_tests!(make_stores);
