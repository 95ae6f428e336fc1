//! Leases: which of several processes sharing one store runs a piece of background work.
//!
//! A backend that several processes can open at once (PostgreSQL) implements [`Leases`] with
//! something all of them see (an advisory lock); a backend only one process can open (sled,
//! the in-memory store) grants every lease locally ([`LocalLeases`]). Leases are for
//! efficiency, not correctness: a holder that has not noticed yet that it lost its lease must
//! still be harmless, which fenced checkpoints and idempotent appends give the work built on
//! the store.
//!
//! ```
//! use std::time::Duration;
//! use tracktrace_core::{Leases, LocalLeases};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tracktrace_core::Result<()> {
//! let leases = LocalLeases::new();
//! let held = leases.lease("background-work", Duration::from_millis(100)).await;
//! assert!(held.is_held());
//! // Nobody else gets it while it is held.
//! assert!(leases.try_lease("background-work").await?.is_none());
//! drop(held);
//! assert!(leases.try_lease("background-work").await?.is_some());
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

/// A held lease. Dropping it releases it.
#[async_trait]
pub trait Lease: Send + Sync + fmt::Debug {
    /// The lease's name.
    fn name(&self) -> &str;

    /// Whether the lease is still held as far as this process knows.
    fn is_held(&self) -> bool;

    /// Resolves when the lease may have been lost (for a shared backend: its connection
    /// failed). The work it guards must stop then.
    async fn lost(&self);
}

/// Grants named leases to one process at a time.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes the lease `name` if no other holder has it; `Ok(None)` if one has.
    async fn try_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>>;

    /// Waits until this process holds `name`, trying every `every`; errors (an unreachable
    /// database) are logged and retried.
    async fn lease(&self, name: &str, every: Duration) -> Box<dyn Lease> {
        loop {
            match self.try_lease(name).await {
                Ok(Some(l)) => return l,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, lease = name, "cannot try the lease"),
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Leases of a store that only one process can open: granted to the first holder in this
/// process, never lost, released on drop. Cheap to clone (clones share the held names).
#[derive(Clone, Debug, Default)]
pub struct LocalLeases {
    held: Arc<Mutex<HashSet<String>>>,
}

impl LocalLeases {
    /// No lease held yet.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock(m: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    // Single insert/remove operations: a poisoned set is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Leases for LocalLeases {
    async fn try_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>> {
        if !lock(&self.held).insert(name.to_owned()) {
            return Ok(None);
        }
        Ok(Some(Box::new(LocalLease {
            name: name.to_owned(),
            held: self.held.clone(),
        })))
    }
}

/// A lease of [`LocalLeases`].
struct LocalLease {
    name: String,
    held: Arc<Mutex<HashSet<String>>>,
}

impl fmt::Debug for LocalLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLease")
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        lock(&self.held).remove(&self.name);
    }
}

#[async_trait]
impl Lease for LocalLease {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_held(&self) -> bool {
        true
    }

    async fn lost(&self) {
        std::future::pending::<()>().await;
    }
}
