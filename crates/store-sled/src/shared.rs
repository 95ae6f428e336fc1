//! What the store's handles, its writer thread and its sync thread share: the sled trees, the
//! published head, the poison flag and the write-path counters, with the store's error
//! mappings. The read path over this state is in `read.rs`.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;
use tracktrace_core::{Error, Position};

/// What the writer thread and the readers share.
pub(crate) struct Shared {
    pub(crate) db: sled::Db,
    pub(crate) log: sled::Tree,
    pub(crate) projections: sled::Tree,
    pub(crate) snapshots: sled::Tree,
    /// Highest position readers may see: everything up to it is committed per the durability
    /// mode. Only the writer advances it, after the group's barrier.
    pub(crate) head: AtomicU64,
    pub(crate) head_tx: watch::Sender<Position>,
    /// Set when a write or barrier failed: the on-disk state is then unknown and every later
    /// call fails until the store is reopened.
    pub(crate) poisoned: OnceLock<String>,
    pub(crate) stats: Counters,
}

/// Write-path counters (see [`SledStats`](crate::SledStats)).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) appends: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) groups: AtomicU64,
    pub(crate) barriers: AtomicU64,
    pub(crate) repaired: AtomicU64,
}

impl Shared {
    /// Marks the store as failed (the first reason wins).
    pub(crate) fn poison(&self, reason: &str) {
        tracing::error!(%reason, "sled event store failed; every later call returns an error");
        let _ = self.poisoned.set(reason.to_owned());
    }

    pub(crate) fn poison_error(reason: &str) -> Error {
        Error::Backend {
            message: format!(
                "the sled event store stopped accepting calls after a failed write or sync \
                 ({reason}); reopen it"
            ),
            source: None,
        }
    }
}

pub(crate) fn sled_err(e: sled::Error) -> Error {
    match e {
        sled::Error::Corruption { .. } => Error::corruption(None, format!("sled: {e}")),
        other => Error::backend("sled operation failed", other),
    }
}
