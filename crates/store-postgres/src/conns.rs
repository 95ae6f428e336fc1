//! A minimal connection cache for appends.
//!
//! sqlx's pool pings every connection when it is returned (a full round trip per operation).
//! An append is one round trip, so that ping would double its cost; appends therefore keep their
//! own small set of connections. A connection that saw an I/O or protocol error is discarded;
//! one that saw a database error is reused (sqlx drains the aborted statement's remaining
//! messages before its next use).

use std::sync::Mutex;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{Semaphore, SemaphorePermit};

pub(crate) struct ConnCache {
    opts: PgConnectOptions,
    idle: Mutex<Vec<PgConnection>>,
    permits: Semaphore,
    timeout: Duration,
}

pub(crate) struct CachedConn<'a> {
    cache: &'a ConnCache,
    conn: Option<PgConnection>,
    _permit: SemaphorePermit<'a>,
    /// Set when the connection must not be reused.
    pub(crate) broken: bool,
}

impl ConnCache {
    pub(crate) fn new(opts: PgConnectOptions, max: u32, timeout: Duration) -> Self {
        Self {
            opts,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max.max(1) as usize),
            timeout,
        }
    }

    /// A connection: an idle one, or a new one (both within the acquire timeout).
    pub(crate) async fn get(&self) -> Result<CachedConn<'_>, sqlx::Error> {
        let permit = tokio::time::timeout(self.timeout, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => tokio::time::timeout(self.timeout, self.opts.connect())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??,
        };
        Ok(CachedConn {
            cache: self,
            conn: Some(conn),
            _permit: permit,
            broken: false,
        })
    }
}

impl CachedConn<'_> {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("the connection is only taken on drop"))
    }
}

impl Drop for CachedConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !self.broken
        {
            self.cache
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}
