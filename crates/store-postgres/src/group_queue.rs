//! The state of group appends (see `group.rs`): the slots, the extra permits, the number of
//! running drainers and the queue of single-event appends waiting for a group, with the reply a
//! queued request gets. The store's handle (`handle.rs`) holds this state; entering it,
//! spawning drainers and running groups need the handle and are in `group.rs`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, oneshot};

use tracktrace_core::{AppendOutcome, AppendRequest};

/// Most requests in one group (positions of a transaction are `xid * 1024 + index`).
pub(crate) const MAX_GROUP: usize = 256;

/// What a queued request's caller does next.
pub(crate) enum Reply {
    /// Stored by the group.
    Done(AppendOutcome),
    /// Not stored by the group (precondition, duplicate or lost race): run the careful path.
    Careful(AppendRequest),
    /// The group's statement failed as a whole: run the append alone from the start.
    Alone(AppendRequest),
}

/// A queued request and where its reply goes.
pub(crate) struct Pending {
    pub(crate) req: AppendRequest,
    pub(crate) tx: oneshot::Sender<Reply>,
}

/// The slots and the queue of one store.
pub(crate) struct Grouper {
    pub(crate) slots: Arc<Semaphore>,
    /// As many again, for appends that run alone while no group is being run.
    pub(crate) extra: Arc<Semaphore>,
    /// Drainers running (spawned and not yet finished).
    pub(crate) draining: AtomicUsize,
    queue: Mutex<VecDeque<Pending>>,
    /// Requests queued at most: beyond, an append is refused as overloaded.
    pub(crate) max_queued: usize,
}

impl Grouper {
    pub(crate) fn new(slots: usize, max_queued: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            extra: Arc::new(Semaphore::new(slots.max(1))),
            draining: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            max_queued: max_queued.max(1),
        }
    }

    pub(crate) fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to [`MAX_GROUP`] queued requests for distinct streams, oldest first; requests whose
    /// caller has gone are dropped unrun.
    pub(crate) fn take(&self) -> Vec<Pending> {
        let mut q = self.queue();
        let mut seen = HashSet::new();
        let mut group = Vec::new();
        let mut later = VecDeque::new();
        while let Some(p) = q.pop_front() {
            if p.tx.is_closed() {
                continue;
            }
            if group.len() < MAX_GROUP && seen.insert((p.req.tenant.clone(), p.req.stream.clone()))
            {
                group.push(p);
            } else {
                later.push_back(p);
            }
        }
        *q = later;
        drop(q);
        // Every group inserts in one global order of streams: two groups running at once
        // that touch the same streams then wait for each other in one direction only (a
        // unique-index wait on a row of the other's uncommitted insert), never in a cycle.
        group.sort_unstable_by(|a, b| {
            (&a.req.tenant, &a.req.stream).cmp(&(&b.req.tenant, &b.req.stream))
        });
        group
    }
}
