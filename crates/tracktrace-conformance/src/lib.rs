//! The conformance suite every tracktrace backend must pass, kept apart from
//! `tracktrace-core` so that adding checks never changes the kernel's public API.
//!
//! Add it as a dev-dependency of a backend and generate the tests with one macro per
//! capability:
//!
//! ```text
//! async fn make_store() -> Arc<dyn EventStore> { /* a fresh, isolated store */ }
//! tracktrace_conformance::conformance_tests!(make_store);
//! async fn make_read_model_store() -> Arc<dyn ReadModelStore> { /* fresh */ }
//! tracktrace_conformance::read_model_tests!(make_read_model_store);
//! async fn make_snapshot_store() -> Arc<dyn SnapshotStore> { /* fresh */ }
//! tracktrace_conformance::snapshot_tests!(make_snapshot_store);
//! async fn make_stores() -> RuntimeStores { RuntimeStores::from_store(Arc::new(/* fresh */)) }
//! tracktrace_conformance::runtime_tests!(make_stores);
//! ```
//!
//! - [`store`]: event-store, read-model and snapshot checks and the model-based property test;
//! - [`runtime`]: the command bus, snapshots, upcasting, projections, sagas and the circuit
//!   breaker over a backend, with the test domain they use and a fault-injecting wrapper;
//! - [`fuzz`]: the bodies of the cargo-fuzz targets in `fuzz/`;
//! - [`support`]: wrapper stores for tests that override only the calls they change
//!   ([`support::Intercept`], forwarding every other call to an inner store).
//!
//! Every check is a plain `async fn` returning [`CheckResult`], so the suite can itself be
//! tested against deliberately broken stores (this crate's `tests/conformance_teeth.rs` holds
//! one broken store per check).
//!
//! The suite is versioned on its own: a new check is a minor release of this crate even when
//! it fails a backend that passed before.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod check_macros;

pub mod fuzz;
pub mod runtime;
pub mod store;
pub mod support;

pub use store::{CheckFailure, CheckResult, model_test, run};
