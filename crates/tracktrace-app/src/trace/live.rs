//! Live timeline entries: a tenant's captured events in log order, as [`TimelineEntry`]s,
//! from a position on, for front ends that push them (Server-Sent Events).
//!
//! One [`LiveHub`] per process reads the store's global log once (one store subscription,
//! started by the first client) and broadcasts every entry to the clients, whatever their
//! number: 500 clients cost the store what one does. A client first catches up with its own
//! reads of the log (its tenant's events only) up to the head, then subscribes to the
//! broadcast, reads once more up to the head (what was broadcast before it subscribed), and
//! continues from the broadcast, skipping what it delivered already: entries arrive once, in
//! position order, without a gap.
//!
//! A stream ends with a [`LiveItem::Closed`] when its client cannot keep up (the broadcast
//! buffer of [`LiveHub::new`] overflowed: reconnect from the last position delivered), when
//! its tenant is suspended or removed, or when the store fails during the catch-up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::broadcast;
use tracktrace_core::{
    EventFilter, EventStore, Position, ReadAll, SubscribeOptions, Subscription, TenantId,
};
use tracktrace_domain::{ENTITY_STREAM_PREFIX, OPERATIONAL_EVENT};

use crate::tenants::{TenantRegistry, TenantStatus};
use crate::trace::model::{TimelineEntry, entry_of};

/// Which entries a live stream carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveFilter {
    /// Only this entity's entries.
    pub entity_id: Option<String>,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
}

impl LiveFilter {
    fn matches(&self, e: &LiveEntry) -> bool {
        self.entity_id.as_ref().is_none_or(|id| *id == e.entity_id)
            && (self.event_types.is_empty() || self.event_types.contains(&e.entry.event_type))
    }
}

/// One entry of the live log.
#[derive(Clone, Debug)]
pub struct LiveEntry {
    /// Its position in the global log.
    pub position: Position,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its entity.
    pub entity_id: String,
    /// The entry.
    pub entry: TimelineEntry,
}

/// Why a live stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// The client fell behind by more than the broadcast buffer holds: `missed` entries were
    /// dropped for it. Reconnect from the last position delivered.
    Lagged {
        /// Entries it missed.
        missed: u64,
    },
    /// The tenant was suspended (or is unknown).
    TenantInactive,
    /// The store failed while the stream caught up.
    StoreFailed(String),
}

/// An item of a live stream.
#[derive(Clone, Debug)]
pub enum LiveItem {
    /// An entry.
    Entry(Arc<LiveEntry>),
    /// The last item: why the stream ended.
    Closed(Closed),
}

/// The process's one reader of the live log (cheap to clone).
#[derive(Clone)]
pub struct LiveHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    store: Arc<dyn EventStore>,
    sender: broadcast::Sender<Arc<LiveEntry>>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        if let Some(t) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

impl std::fmt::Debug for LiveHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveHub")
            .field("clients", &self.inner.sender.receiver_count())
            .finish_non_exhaustive()
    }
}

/// Entries read per page.
const PAGE: usize = 256;

fn operational(tenant: Option<TenantId>) -> EventFilter {
    EventFilter::default()
        .with_tenant(tenant)
        .with_event_types([OPERATIONAL_EVENT])
        .with_stream_prefix(ENTITY_STREAM_PREFIX)
}

impl LiveHub {
    /// A hub over `store`; each client may fall at most `buffer` entries behind.
    pub fn new(store: Arc<dyn EventStore>, buffer: usize) -> Self {
        Self {
            inner: Arc::new(HubInner {
                store,
                sender: broadcast::channel(buffer.max(1)).0,
                reader: Mutex::new(None),
            }),
        }
    }

    /// Clients subscribed now.
    pub fn clients(&self) -> usize {
        self.inner.sender.receiver_count()
    }

    /// A receiver of every entry broadcast from now on; starts the reader on first use.
    fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEntry>> {
        let rx = self.inner.sender.subscribe();
        let mut reader = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        if reader.is_none() {
            let (store, sender) = (self.inner.store.clone(), self.inner.sender.clone());
            *reader = Some(tokio::spawn(read_live(store, sender)));
        }
        rx
    }

    /// The entries of `tenant` from `from` on, filtered; ends (with [`LiveItem::Closed`])
    /// as the module docs say. `tenants` tells when the tenant stops being active.
    pub fn entries(
        &self,
        tenant: TenantId,
        from: Position,
        filter: LiveFilter,
        tenants: TenantRegistry,
    ) -> impl Stream<Item = LiveItem> + Send + 'static {
        let client = Client {
            hub: self.clone(),
            rx: None,
            store: self.inner.store.clone(),
            tenant_changes: tenants.changes(),
            tenants,
            tenant,
            filter,
            next: from,
            caught_up: false,
            buffer: VecDeque::new(),
            done: false,
        };
        futures_util::stream::unfold(client, |mut c| async move {
            let item = c.next_item().await?;
            Some((item, c))
        })
    }
}

/// The hub's reader: one subscription to the whole log, from its head when it starts.
async fn read_live(store: Arc<dyn EventStore>, sender: broadcast::Sender<Arc<LiveEntry>>) {
    let mut pause = Duration::from_millis(100);
    let mut from = loop {
        match store.head().await {
            Ok(h) => break h.next(),
            Err(e) => {
                tracing::warn!(error = %e, "live log: cannot read the head; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    };
    loop {
        let mut sub = Subscription::new(
            store.clone(),
            SubscribeOptions::default()
                .with_from(from)
                .with_filter(operational(None))
                .with_batch_size(PAGE),
        );
        loop {
            match sub.next().await {
                Ok(e) => {
                    from = e.position.next();
                    pause = Duration::from_millis(100);
                    if let Some((entry, entity_id)) = entry_of(&e) {
                        // No receiver: nobody listens now; that is fine.
                        let _ = sender.send(Arc::new(LiveEntry {
                            position: e.position,
                            tenant: e.tenant.clone(),
                            entity_id,
                            entry,
                        }));
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "live log: subscription failed; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// One client's stream.
struct Client {
    hub: LiveHub,
    /// Subscribed once the first catch-up reached the head.
    rx: Option<broadcast::Receiver<Arc<LiveEntry>>>,
    store: Arc<dyn EventStore>,
    tenants: TenantRegistry,
    tenant_changes: tokio::sync::watch::Receiver<u64>,
    tenant: TenantId,
    filter: LiveFilter,
    /// The first position not yet delivered (or skipped).
    next: Position,
    caught_up: bool,
    buffer: VecDeque<Arc<LiveEntry>>,
    done: bool,
}

impl Client {
    fn close(&mut self, why: Closed) -> Option<LiveItem> {
        self.done = true;
        Some(LiveItem::Closed(why))
    }

    async fn next_item(&mut self) -> Option<LiveItem> {
        if self.done {
            return None;
        }
        loop {
            if let Some(e) = self.buffer.pop_front() {
                return Some(LiveItem::Entry(e));
            }
            if !self.caught_up {
                if let Err(e) = self.catch_up().await {
                    return self.close(Closed::StoreFailed(e));
                }
                if self.caught_up && self.rx.is_none() {
                    // Subscribe, then read once more up to the head: what was broadcast
                    // before the subscription is read, what comes after is received.
                    self.rx = Some(self.hub.subscribe());
                    self.caught_up = false;
                }
                continue;
            }
            let Some(rx) = self.rx.as_mut() else {
                self.caught_up = false;
                continue;
            };
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(e) => {
                        if e.position >= self.next && e.tenant == self.tenant {
                            self.next = e.position.next();
                            if self.filter.matches(&e) {
                                return Some(LiveItem::Entry(e));
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        return self.close(Closed::Lagged { missed });
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                changed = self.tenant_changes.changed() => {
                    if changed.is_err() || !self.tenant_active().await {
                        return self.close(Closed::TenantInactive);
                    }
                }
            }
        }
    }

    async fn tenant_active(&self) -> bool {
        matches!(
            self.tenants.status(&self.tenant).await,
            Ok(Some(TenantStatus::Active))
        )
    }

    /// Reads the tenant's entries from `next` to the log's head into the buffer (one page).
    async fn catch_up(&mut self) -> Result<(), String> {
        let page = self
            .store
            .read_all(
                ReadAll::starting_at(self.next, PAGE)
                    .filter(operational(Some(self.tenant.clone()))),
            )
            .await
            .map_err(|e| e.to_string())?;
        if page.events.len() < PAGE {
            self.caught_up = true;
        }
        for e in &page.events {
            if let Some((entry, entity_id)) = entry_of(e) {
                let live = LiveEntry {
                    position: e.position,
                    tenant: e.tenant.clone(),
                    entity_id,
                    entry,
                };
                if self.filter.matches(&live) {
                    self.buffer.push_back(Arc::new(live));
                }
            }
        }
        self.next = self.next.max(page.next);
        Ok(())
    }
}
