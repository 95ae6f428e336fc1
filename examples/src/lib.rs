//! Runnable examples of the tracktrace runtime (see the `*.rs` files next to this crate's
//! `Cargo.toml`; each starts with the `cargo run` line that runs it). The examples are also
//! compiled into this crate's tests, which run each one to completion.
//!
//! This library only holds what the examples share: opening the embedded default store.

use tracktrace_store_sled::{Durability, OpenError, SledStore};

/// The embedded default store (sled, durable) in a fresh temporary directory that is deleted
/// when the store is dropped.
pub fn temporary_store() -> Result<SledStore, OpenError> {
    SledStore::temporary(Durability::Fsync)
}
