//! Following part of the system tenant's log into an in-memory view: the one component behind
//! every registry kept as events (tenants, attribute schemas, partner routes, milestone rules,
//! analytics configuration).
//!
//! A registry defines a [`SystemView`]: the stream prefix its events live under in the
//! [`SYSTEM_TENANT`](crate::access::SYSTEM_TENANT), how one event decodes into a change
//! (outside any lock: compiling a JSON Schema takes time) and how a change applies. A
//! [`Followed`] view reads new events from where it stopped ([`Followed::refresh`]), either on
//! demand or from a follower task ([`Followed::follow`]) woken by the store's head
//! notifications; every process reading the same log builds the same view.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tracktrace_core::{EventFilter, EventStore, Position, ReadAll, RecordedEvent};

use crate::access::system_tenant;
use crate::error::AppError;

/// Events read per page.
const PAGE: usize = 500;

/// Least time between two refreshes of a follower task ([`Followed::follow`]): a busy log
/// changes the head after every commit; registries change rarely, so a few reads a second
/// at most (the process that makes a change applies it at once).
pub const FOLLOW_PAUSE: Duration = Duration::from_millis(100);

/// An in-memory view of the events under one stream prefix of the system tenant.
pub trait SystemView: Default + Send + Sync + 'static {
    /// What one event changes.
    type Change: Send;

    /// Prefix of the system tenant's streams whose events the view reads.
    const STREAM_PREFIX: &'static str;

    /// Decodes one event of those streams, outside the view's lock (`None`: not for this
    /// view; an undecodable event is logged by the implementation and skipped, so one bad
    /// record cannot wedge a registry).
    fn decode(event: &RecordedEvent) -> Option<Self::Change>;

    /// Applies one change (changes arrive in log order).
    fn apply(&mut self, change: Self::Change);
}

/// The filter of `V`'s events.
pub fn filter_of<V: SystemView>() -> EventFilter {
    EventFilter::default()
        .with_tenant(system_tenant())
        .with_stream_prefix(V::STREAM_PREFIX)
}

/// Reads `V`'s events from `from` to the log's head in pages, calling `sink` with each page's
/// decoded changes and the position the next read starts at. Returns that position.
pub async fn read_changes<V: SystemView>(
    store: &dyn EventStore,
    from: Position,
    mut sink: impl FnMut(Vec<V::Change>, Position),
) -> Result<Position, AppError> {
    let filter = filter_of::<V>();
    let mut next = from;
    loop {
        let page = store
            .read_all(ReadAll::starting_at(next, PAGE).filter(filter.clone()))
            .await?;
        let full = page.events.len() == PAGE;
        let changes = page.events.iter().filter_map(V::decode).collect();
        // Gap-free log: nothing can still commit below `page.next`.
        next = next.max(page.next);
        sink(changes, next);
        if !full {
            return Ok(next);
        }
    }
}

/// Loads `V` from the whole log (for one-shot readers such as a saga's start); returns the
/// view and the position after the last event read.
pub async fn load<V: SystemView>(store: &dyn EventStore) -> Result<(V, Position), AppError> {
    let mut view = V::default();
    let next = read_changes::<V>(store, Position::START, |changes, _| {
        for c in changes {
            view.apply(c);
        }
    })
    .await?;
    Ok((view, next))
}

struct Shared<V> {
    view: V,
    next: Position,
}

/// A [`SystemView`] kept current from the log (cheap to clone; clones share the view).
pub struct Followed<V: SystemView> {
    store: Arc<dyn EventStore>,
    shared: Arc<RwLock<Shared<V>>>,
    refresh_lock: Arc<Mutex<()>>,
    /// Bumped after every refresh that applied at least one change.
    changes: Arc<watch::Sender<u64>>,
}

impl<V: SystemView> Clone for Followed<V> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            shared: self.shared.clone(),
            refresh_lock: self.refresh_lock.clone(),
            changes: self.changes.clone(),
        }
    }
}

impl<V: SystemView> std::fmt::Debug for Followed<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Followed")
            .field("prefix", &V::STREAM_PREFIX)
            .field("next", &self.next())
            .finish_non_exhaustive()
    }
}

impl<V: SystemView> Followed<V> {
    /// An empty view over `store` (nothing is read until [`Followed::refresh`]).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            shared: Arc::new(RwLock::new(Shared {
                view: V::default(),
                next: Position::START,
            })),
            refresh_lock: Arc::new(Mutex::new(())),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }

    /// The store the view reads.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Reads and applies the events committed since the last refresh.
    pub async fn refresh(&self) -> Result<(), AppError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let from = self.next();
        let mut applied = false;
        read_changes::<V>(&*self.store, from, |changes, next| {
            applied |= !changes.is_empty();
            let mut s = self.shared.write().unwrap_or_else(|p| p.into_inner());
            for c in changes {
                s.view.apply(c);
            }
            s.next = s.next.max(next);
        })
        .await?;
        if applied {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// Runs `f` on the current view (a read lock: keep `f` short and synchronous).
    pub fn read<R>(&self, f: impl FnOnce(&V) -> R) -> R {
        f(&self.shared.read().unwrap_or_else(|p| p.into_inner()).view)
    }

    /// Where the next refresh starts reading.
    pub fn next(&self) -> Position {
        self.shared.read().unwrap_or_else(|p| p.into_inner()).next
    }

    /// A receiver that changes whenever a refresh applied new events.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Refreshes forever (a task the server spawns): after every head change, at most once
    /// per `pause`; a failed refresh is logged and retried.
    pub async fn follow(self, pause: Duration) {
        let mut head = self.store.watch_head();
        loop {
            // Seen before reading: a commit after the read changes the watch again.
            head.borrow_and_update();
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, view = V::STREAM_PREFIX, "registry refresh failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            tokio::time::sleep(pause).await;
            if head.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracktrace_core::{EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent, StreamId};

    #[derive(Default)]
    struct Names(Vec<String>);

    impl SystemView for Names {
        type Change = String;
        const STREAM_PREFIX: &'static str = "names-";
        fn decode(e: &RecordedEvent) -> Option<String> {
            serde_json::from_slice(&e.payload).ok()
        }
        fn apply(&mut self, c: String) {
            self.0.push(c);
        }
    }

    async fn add(store: &InMemoryStore, stream: &str, name: &str) {
        store
            .append_to(
                &system_tenant(),
                &StreamId::parse(stream).unwrap(),
                ExpectedVersion::Any,
                vec![NewEvent::json("x", &serde_json::json!(name))],
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn reads_only_its_prefix_in_order_across_pages_and_resumes() {
        let store = Arc::new(InMemoryStore::new());
        for i in 0..(PAGE + 3) {
            add(&store, "names-a", &format!("n{i}")).await;
            if i % 100 == 0 {
                add(&store, "other-a", "ignored").await;
            }
        }
        let f = Followed::<Names>::new(store.clone());
        let mut changes = f.changes();
        f.refresh().await.unwrap();
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_eq!(f.read(|v| v.0.len()), PAGE + 3);
        assert_eq!(f.read(|v| v.0[PAGE + 2].clone()), format!("n{}", PAGE + 2));
        // Nothing new: no change signalled, nothing applied twice.
        f.refresh().await.unwrap();
        assert!(!changes.has_changed().unwrap());
        add(&store, "names-b", "last").await;
        f.refresh().await.unwrap();
        assert_eq!(f.read(|v| v.0.last().cloned()), Some("last".into()));
        assert_eq!(f.read(|v| v.0.len()), PAGE + 4);
        let (loaded, next) = load::<Names>(&*store).await.unwrap();
        assert_eq!(loaded.0, f.read(|v| v.0.clone()));
        assert_eq!(next, f.next());
    }

    #[tokio::test]
    async fn a_follower_task_picks_up_new_events() {
        let store = Arc::new(InMemoryStore::new());
        let f = Followed::<Names>::new(store.clone());
        let task = tokio::spawn(f.clone().follow(Duration::from_millis(1)));
        add(&store, "names-x", "a").await;
        let mut changes = f.changes();
        tokio::time::timeout(Duration::from_secs(5), async {
            while f.read(|v| v.0.is_empty()) {
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap();
        task.abort();
    }
}
