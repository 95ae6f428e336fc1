//! Stream-version hints: the last version this process saw each recently appended stream at.
//!
//! An append without a known expected version (`Any`, `StreamExists`) has to find
//! the stream's current version. The statement that reads it (a backward scan of the
//! `(tenant, stream, version)` index, `ORDER BY version DESC LIMIT 1`) is the most expensive
//! part of an append after the commit itself: PostgreSQL reads, and checks the keys of, every
//! entry of the stream on the index's last leaf page, not just the last one. With a hint `h`
//! the append instead inserts at `h + 1` on the condition that version `h` exists (a forward
//! probe that stops at the first entry past `h`): the unique index refuses `h + 1` if the stream
//! has moved on, and the probe fails if it has fewer events, so the database verifies the hint
//! and a wrong one only costs the careful path's extra statement, never a wrong version
//! (versions are contiguous from 1).
//!
//! The table is direct-mapped and lock-free: a slot holds a hash tag and a version. Collisions,
//! evictions and torn reads between concurrent writers of one slot only produce wrong hints,
//! which the database rejects as above.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots of a store's hint table (16 bytes each).
const SLOTS: usize = 4096;

struct Slot {
    tag: AtomicU64,
    version: AtomicU64,
}

pub(crate) struct VersionHints {
    slots: Box<[Slot]>,
    hasher: std::collections::hash_map::RandomState,
}

impl VersionHints {
    pub(crate) fn new() -> Self {
        Self {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    tag: AtomicU64::new(0),
                    version: AtomicU64::new(0),
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Slot index and non-zero tag of a stream.
    fn locate(&self, tenant: &str, stream: &str) -> (usize, u64) {
        let mut h = self.hasher.build_hasher();
        tenant.hash(&mut h);
        stream.hash(&mut h);
        let h = h.finish();
        ((h as usize) % SLOTS, h | 1)
    }

    /// The last version recorded for the stream, if its slot still holds it.
    pub(crate) fn get(&self, tenant: &str, stream: &str) -> Option<u64> {
        let (i, tag) = self.locate(tenant, stream);
        let slot = &self.slots[i];
        if slot.tag.load(Ordering::Acquire) != tag {
            return None;
        }
        let version = slot.version.load(Ordering::Acquire);
        // A writer of another stream may have replaced the slot meanwhile.
        (slot.tag.load(Ordering::Acquire) == tag && version > 0).then_some(version)
    }

    /// Records that the stream is at `version` (after a committed append).
    pub(crate) fn set(&self, tenant: &str, stream: &str, version: u64) {
        let (i, tag) = self.locate(tenant, stream);
        let slot = &self.slots[i];
        // Invalidate, write, publish: a reader sees the new tag only with the new version
        // (or a later writer's).
        slot.tag.store(0, Ordering::Release);
        slot.version.store(version, Ordering::Release);
        slot.tag.store(tag, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_version_per_stream() {
        let h = VersionHints::new();
        assert_eq!(h.get("t", "s"), None);
        for (tenant, stream, v) in [("t", "s", 3), ("t", "s2", 7), ("u", "s", 9), ("t", "s", 4)] {
            h.set(tenant, stream, v);
            assert_eq!(h.get(tenant, stream), Some(v));
        }
        // A stream never recorded has no hint (its tag matches no slot's).
        assert_eq!(h.get("t", "other"), None);
        assert_eq!(h.get("ts", ""), None);
    }
}
