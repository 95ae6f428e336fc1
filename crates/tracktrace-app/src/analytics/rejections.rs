//! The per-process buffer of rejected-command counts: bounded, flushed in chunks that each
//! stay far below the store's 1 MiB event limit, and retried without counting a second twice.
//!
//! - **Buckets**: counts are kept per tenant and second (`bucket start → count`). The buffer
//!   holds at most `max_buckets` of them, live and sealed together.
//! - **Over the bound** (an outage longer than the buffer covers): every bucket is first
//!   *coarsened* to the start of its window (the window length in force), which loses nothing
//!   a KPI reads: a window sums the counts whose bucket start falls in it. If that leaves more
//!   than 7/8 of the bound, the oldest buckets are dropped until 3/4 remain and their counts
//!   are added to [`RejectionBuffer::lost`]. The margins make the work amortised: at least
//!   `max_buckets / 8` new buckets come between two shrinks.
//! - **Chunks**: a flush *seals* the live buckets into chunks of one tenant and one UTC hour
//!   (at most 3,600 buckets: under 150 KB of JSON), each with a fresh event id, and stores them
//!   oldest first. A chunk that fails stays *pending* and is retried with the same id, so a
//!   write whose acknowledgement was lost is recognised as a duplicate by the store instead of
//!   counted again; coarsening rewrites a pending chunk in place and keeps its id for the same
//!   reason. Nothing new is sealed while chunks are pending.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tracktrace_core::EventId;

/// One UTC hour, µs.
pub(crate) const HOUR_US: i64 = 3_600_000_000;

/// Counts of one tenant and one UTC hour, stored as one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// The event id: the same on every retry.
    pub(crate) id: EventId,
    pub(crate) tenant: String,
    /// Start of the hour, µs since the epoch.
    pub(crate) hour_us: i64,
    /// Bucket start (µs) → count.
    pub(crate) counts: BTreeMap<i64, u64>,
}

/// Rejected-command counts not yet stored (see the module docs).
#[derive(Debug)]
pub(crate) struct RejectionBuffer {
    max_buckets: usize,
    /// Tenant → bucket start → count.
    live: HashMap<String, BTreeMap<i64, u64>>,
    /// Sealed chunks, oldest first.
    pending: VecDeque<Chunk>,
    /// Buckets in `live` and `pending`.
    buckets: usize,
    lost: u64,
}

impl RejectionBuffer {
    pub(crate) fn new(max_buckets: usize) -> Self {
        Self {
            max_buckets: max_buckets.max(8),
            live: HashMap::new(),
            pending: VecDeque::new(),
            buckets: 0,
            lost: 0,
        }
    }

    /// Changes the bound (applied from the next count on).
    pub(crate) fn set_max_buckets(&mut self, max_buckets: usize) {
        self.max_buckets = max_buckets.max(8);
    }

    /// Buckets held (live and pending).
    pub(crate) fn buckets(&self) -> usize {
        self.buckets
    }

    /// Counts dropped because the bound was reached.
    pub(crate) fn lost(&self) -> u64 {
        self.lost
    }

    /// Counts `n` rejections of `tenant` at `at_us`; `window_us` is the window length the
    /// buffer coarsens to when it is over its bound.
    pub(crate) fn record(&mut self, tenant: &str, at_us: i64, n: u64, window_us: i64) {
        let second = at_us.div_euclid(1_000_000) * 1_000_000;
        let map = match self.live.get_mut(tenant) {
            Some(m) => m,
            None => self.live.entry(tenant.to_owned()).or_default(),
        };
        match map.entry(second) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(n);
                self.buckets += 1;
            }
            std::collections::btree_map::Entry::Occupied(o) => {
                let c = o.into_mut();
                *c = c.saturating_add(n);
            }
        }
        if self.buckets > self.max_buckets {
            self.shrink(window_us);
        }
    }

    /// The oldest pending chunk, after sealing the live buckets if nothing was pending and
    /// `seal` is set; `None` when there is nothing to store.
    pub(crate) fn next_chunk(&mut self, seal: bool) -> Option<Chunk> {
        if self.pending.is_empty() && seal {
            self.seal();
        }
        self.pending.front().cloned()
    }

    /// Whether chunks are waiting to be stored.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The chunk `id` was stored: it leaves the buffer.
    pub(crate) fn stored(&mut self, id: EventId) {
        if let Some(i) = self.pending.iter().position(|c| c.id == id)
            && let Some(c) = self.pending.remove(i)
        {
            self.buckets -= c.counts.len();
        }
    }

    fn seal(&mut self) {
        let mut chunks: Vec<Chunk> = Vec::new();
        for (tenant, counts) in self.live.drain() {
            let mut counts = counts;
            while let Some((&first, _)) = counts.first_key_value() {
                let hour_us = first.div_euclid(HOUR_US) * HOUR_US;
                let rest = counts.split_off(&(hour_us + HOUR_US));
                chunks.push(Chunk {
                    id: EventId::new(),
                    tenant: tenant.clone(),
                    hour_us,
                    counts,
                });
                counts = rest;
            }
        }
        chunks.sort_by(|a, b| (a.hour_us, &a.tenant).cmp(&(b.hour_us, &b.tenant)));
        self.pending.extend(chunks);
    }

    /// Coarsens to whole windows, then drops the oldest buckets if still nearly full.
    fn shrink(&mut self, window_us: i64) {
        let w = window_us.max(1_000_000);
        let coarsen = |counts: &BTreeMap<i64, u64>| -> BTreeMap<i64, u64> {
            let mut out = BTreeMap::new();
            for (k, v) in counts {
                let c = out.entry(k.div_euclid(w) * w).or_insert(0u64);
                *c = c.saturating_add(*v);
            }
            out
        };
        for counts in self.live.values_mut() {
            *counts = coarsen(counts);
        }
        for c in &mut self.pending {
            c.counts = coarsen(&c.counts);
        }
        self.recount();
        if self.buckets <= self.max_buckets - self.max_buckets / 8 {
            return;
        }
        // Drop the oldest: every bucket at or before the cut, the k-th oldest start.
        let target = self.max_buckets - self.max_buckets / 4;
        let mut starts: Vec<i64> = self
            .live
            .values()
            .flat_map(|m| m.keys().copied())
            .chain(self.pending.iter().flat_map(|c| c.counts.keys().copied()))
            .collect();
        let k = self.buckets - target - 1;
        let (_, cut, _) = starts.select_nth_unstable(k);
        let keep_from = *cut + 1;
        let mut lost = 0u64;
        for counts in self.live.values_mut() {
            let kept = counts.split_off(&keep_from);
            lost = lost.saturating_add(counts.values().sum());
            *counts = kept;
        }
        self.live.retain(|_, m| !m.is_empty());
        for c in &mut self.pending {
            let kept = c.counts.split_off(&keep_from);
            lost = lost.saturating_add(c.counts.values().sum());
            c.counts = kept;
        }
        self.pending.retain(|c| !c.counts.is_empty());
        self.lost = self.lost.saturating_add(lost);
        self.recount();
    }

    fn recount(&mut self) {
        self.buckets = self.live.values().map(BTreeMap::len).sum::<usize>()
            + self.pending.iter().map(|c| c.counts.len()).sum::<usize>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn total(b: &RejectionBuffer) -> u64 {
        b.live.values().flat_map(|m| m.values()).sum::<u64>()
            + b.pending
                .iter()
                .flat_map(|c| c.counts.values())
                .sum::<u64>()
    }

    #[test]
    fn seals_chunks_per_tenant_and_hour_oldest_first() {
        let mut b = RejectionBuffer::new(100_000);
        for s in 0..2 * 3_600 {
            b.record("acme", s * S + 17, 1, 3_600 * S);
        }
        b.record("globex", 10 * S, 2, 3_600 * S);
        assert_eq!(b.buckets(), 7_201);
        let first = b.next_chunk(true).unwrap();
        assert_eq!((first.tenant.as_str(), first.hour_us), ("acme", 0));
        assert_eq!(first.counts.len(), 3_600);
        assert_eq!(
            first.counts.keys().next(),
            Some(&0),
            "buckets start on seconds"
        );
        // Retried as it is until stored.
        assert_eq!(b.next_chunk(true), Some(first.clone()));
        b.stored(first.id);
        let second = b.next_chunk(true).unwrap();
        assert_eq!((second.tenant.as_str(), second.hour_us), ("globex", 0));
        b.stored(second.id);
        let third = b.next_chunk(true).unwrap();
        assert_eq!((third.tenant.as_str(), third.hour_us), ("acme", HOUR_US));
        // New counts are not sealed while chunks are pending.
        b.record("acme", 5 * HOUR_US, 1, 3_600 * S);
        b.stored(third.id);
        assert_eq!(b.next_chunk(false), None);
        assert_eq!(b.next_chunk(true).unwrap().hour_us, 5 * HOUR_US);
        assert_eq!(b.buckets(), 1);
    }

    #[test]
    fn over_the_bound_counts_are_coarsened_to_windows_without_loss() {
        let mut b = RejectionBuffer::new(1_000);
        let pending = {
            b.record("acme", 0, 1, 60 * S);
            b.next_chunk(true).unwrap()
        };
        for s in 0..10_000 {
            b.record("acme", s * S, 1, 60 * S);
            b.record("globex", s * S, 2, 60 * S);
            assert!(b.buckets() <= 1_000);
        }
        assert_eq!(b.lost(), 0);
        assert_eq!(total(&b), 1 + 10_000 + 20_000);
        // Every bucket that was coarsened starts a minute.
        let coarse = b
            .live
            .values()
            .flat_map(|m| m.keys())
            .filter(|k| *k % (60 * S) == 0)
            .count();
        assert!(coarse >= 300, "{coarse}");
        // The pending chunk kept its id.
        assert_eq!(b.pending.len(), 1);
        assert_eq!(b.pending[0].id, pending.id);
    }

    #[test]
    fn when_coarsening_is_not_enough_the_oldest_are_dropped_and_counted() {
        let mut b = RejectionBuffer::new(800);
        // One-second windows: coarsening gains nothing.
        for s in 0..1_000 {
            b.record("acme", s * S, 3, S);
            assert!(b.buckets() <= 800);
        }
        // 801 buckets → dropped to 600, then 199 more: 799.
        assert_eq!(b.buckets(), 799);
        assert_eq!(b.lost(), 3 * 201);
        assert_eq!(total(&b) + b.lost(), 3_000);
        let oldest = *b.live["acme"].keys().next().unwrap();
        assert_eq!(oldest, 201 * S, "the oldest went first");
    }
}
