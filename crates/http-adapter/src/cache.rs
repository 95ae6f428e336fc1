//! Cache-aside for trace views, with a TTL: in-process (moka, bounded memory per tenant) by
//! default, Redis when configured (feature `redis`).
//!
//! Invalidation: every key includes the entity's *generation*, the global position of the
//! last event the projection applied to that entity (read from the entity's status record in
//! the read store, one point read per request). When the entity changes its generation
//! changes, so no process can serve an older view after the read model moved on — across
//! server processes too, without any message between them. Superseded entries age out by
//! TTL and LRU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tracktrace_core::TenantId;

/// Cache settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Time to live of an entry.
    pub ttl: Duration,
    /// In-process cache: memory bound per tenant, in bytes of cached views.
    pub max_bytes_per_tenant: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            max_bytes_per_tenant: 32 * 1024 * 1024,
        }
    }
}

/// Where cached views live.
#[derive(Clone)]
pub enum TraceCache {
    /// No caching.
    Disabled,
    /// Per-tenant in-process caches.
    Local(Arc<LocalCache>),
    /// Redis (shared by every server process).
    #[cfg(feature = "redis")]
    Redis(RedisCache),
}

impl std::fmt::Debug for TraceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TraceCache::Disabled => "TraceCache::Disabled",
            TraceCache::Local(_) => "TraceCache::Local",
            #[cfg(feature = "redis")]
            TraceCache::Redis(_) => "TraceCache::Redis",
        })
    }
}

/// The cache key of a view: tenant, entity, generation and the normalised query.
pub fn cache_key(tenant: &TenantId, entity_id: &str, generation: u64, query: &str) -> String {
    format!("tt:trace:{tenant}:{entity_id}:{generation}:{query}")
}

impl TraceCache {
    /// In-process cache with `cfg`.
    pub fn local(cfg: CacheConfig) -> Self {
        TraceCache::Local(Arc::new(LocalCache {
            cfg,
            tenants: Mutex::new(HashMap::new()),
        }))
    }

    /// A cached view, if any. Cache failures are misses (logged), never request failures.
    pub async fn get(&self, tenant: &TenantId, key: &str) -> Option<Bytes> {
        match self {
            TraceCache::Disabled => None,
            TraceCache::Local(c) => c.tenant(tenant).get(key).await,
            #[cfg(feature = "redis")]
            TraceCache::Redis(r) => r.get(key).await,
        }
    }

    /// Stores a view.
    pub async fn put(&self, tenant: &TenantId, key: String, value: Bytes) {
        match self {
            TraceCache::Disabled => {}
            TraceCache::Local(c) => c.tenant(tenant).insert(key, value).await,
            #[cfg(feature = "redis")]
            TraceCache::Redis(r) => r.put(&key, value).await,
        }
    }
}

/// Per-tenant moka caches, each bounded by bytes.
pub struct LocalCache {
    cfg: CacheConfig,
    tenants: Mutex<HashMap<TenantId, moka::future::Cache<String, Bytes>>>,
}

impl LocalCache {
    fn tenant(&self, tenant: &TenantId) -> moka::future::Cache<String, Bytes> {
        let mut map = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.clone())
            .or_insert_with(|| {
                moka::future::Cache::builder()
                    .max_capacity(self.cfg.max_bytes_per_tenant)
                    .weigher(|k: &String, v: &Bytes| {
                        u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX)
                    })
                    .time_to_live(self.cfg.ttl)
                    .build()
            })
            .clone()
    }
}

/// Redis-backed view cache.
#[cfg(feature = "redis")]
#[derive(Clone)]
pub struct RedisCache {
    conn: redis::aio::ConnectionManager,
    ttl: Duration,
    namespace: String,
}

#[cfg(feature = "redis")]
impl RedisCache {
    /// Connects to `url` (`redis://host:port`). `namespace` identifies the event store the
    /// views come from (several stores may share one Redis): it prefixes every key.
    pub async fn connect(
        url: &str,
        ttl: Duration,
        namespace: &str,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = redis::aio::ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            ttl,
            namespace: namespace.to_owned(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}|{key}", self.namespace)
    }

    async fn get(&self, key: &str) -> Option<Bytes> {
        let mut c = self.conn.clone();
        match redis::cmd("GET")
            .arg(self.key(key))
            .query_async::<Option<Vec<u8>>>(&mut c)
            .await
        {
            Ok(v) => v.map(Bytes::from),
            Err(e) => {
                tracing::warn!(error = %e, "redis GET failed; treating as a cache miss");
                None
            }
        }
    }

    async fn put(&self, key: &str, value: Bytes) {
        let mut c = self.conn.clone();
        let r = redis::cmd("SET")
            .arg(self.key(key))
            .arg(value.as_ref())
            .arg("PX")
            .arg(
                u64::try_from(self.ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .query_async::<()>(&mut c)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "redis SET failed; view not cached");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_cache_is_per_tenant_and_generation_keyed() {
        let c = TraceCache::local(CacheConfig::default());
        let (a, b) = (TenantId::parse("a").unwrap(), TenantId::parse("b").unwrap());
        let k1 = cache_key(&a, "e", 1, "q");
        c.put(&a, k1.clone(), Bytes::from_static(b"v1")).await;
        assert_eq!(c.get(&a, &k1).await.as_deref(), Some(&b"v1"[..]));
        assert_eq!(c.get(&b, &k1).await, None);
        assert_eq!(c.get(&a, &cache_key(&a, "e", 2, "q")).await, None);
    }
}
