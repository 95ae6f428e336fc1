//! Leases: which of several processes sharing one store does a piece of background work.
//!
//! A lease is a session-level advisory lock held on a dedicated connection. PostgreSQL
//! releases it when that connection ends, so a crashed holder frees it without any timeout
//! bookkeeping of ours. The holder checks its connection with a heartbeat; when that fails it
//! reports the lease as lost and must stop the work: another process may take over as soon as
//! PostgreSQL notices the connection is gone.
//!
//! A lease is for efficiency, not for correctness: two processes that both believe they hold
//! one (a holder that has not yet noticed its connection died) must still be safe, which is
//! what fenced checkpoints and idempotent appends give the work built on this store.

use std::time::Duration;

use sqlx::{ConnectOptions, Connection};
use tokio::sync::watch;
use tracktrace_core::{Error, Result};

use async_trait::async_trait;

use crate::error::map_err;
use crate::handle::PgStore;

/// How often a holder checks its connection, and how long a check may take.
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Second half of a lease's advisory-lock key: FNV-1a of its name.
fn name_key(name: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

/// A held lease (see the module docs). Dropping it releases it.
#[derive(Debug)]
pub struct Lease {
    name: String,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Ends the connection, and with it the lock.
        self.task.abort();
    }
}

impl Lease {
    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the heartbeat still succeeds.
    pub fn is_held(&self) -> bool {
        !*self.lost.borrow()
    }

    /// Resolves when the lease may have been lost (its connection failed a heartbeat or
    /// ended). The work it guards must stop then.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }
}

impl PgStore {
    /// Takes the lease `name` if no other process holds it, on a new dedicated connection.
    pub async fn try_lease(&self, name: &str) -> Result<Option<Lease>> {
        let mut conn = tokio::time::timeout(HEARTBEAT_TIMEOUT, self.inner.conn_opts.connect())
            .await
            .map_err(|_| Error::Unavailable {
                reason: "connecting to PostgreSQL for a lease timed out".into(),
                retry_after: Some(HEARTBEAT),
                source: None,
            })?
            .map_err(|e| map_err("lease", e))?;
        // Negative first key: outside the positive keys stores use for appends, so a lease
        // never collides with an append lock of any store.
        let (k1, k2) = (-self.inner.lock_key, name_key(name));
        let got: bool = sqlx::query_scalar("SELECT pg_catalog.pg_try_advisory_lock($1, $2)")
            .bind(k1)
            .bind(k2)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| map_err("lease", e))?;
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ok = tokio::time::timeout(HEARTBEAT_TIMEOUT, conn.ping())
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !ok {
                    tx.send_replace(true);
                    return;
                }
            }
        });
        Ok(Some(Lease {
            name: name.to_owned(),
            lost,
            task,
        }))
    }

    /// Waits until this process holds the lease `name`, trying every `every`; errors (an
    /// unreachable database) are retried too.
    pub async fn lease(&self, name: &str, every: Duration) -> Lease {
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

#[async_trait]
impl tracktrace_core::Lease for Lease {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_held(&self) -> bool {
        Lease::is_held(self)
    }

    async fn lost(&self) {
        Lease::lost(self).await
    }
}

/// Every process on the store's schema competes for the same names (see [`PgStore::try_lease`]).
#[async_trait]
impl tracktrace_core::Leases for PgStore {
    async fn try_lease(&self, name: &str) -> Result<Option<Box<dyn tracktrace_core::Lease>>> {
        Ok(PgStore::try_lease(self, name)
            .await?
            .map(|l| Box::new(l) as Box<dyn tracktrace_core::Lease>))
    }
}
