//! Open-time repair of the log's tail after a crash.
//!
//! The writer stores an append group with one `insert` per key (see [`crate::layout`]): every
//! page of the group, then its id and dedup index entries, then its stream runs, in position
//! order. sled recovers a prefix of those writes, so after a crash the log may end with events
//! of groups that were never acknowledged (their barrier did not finish): pages without their
//! runs, possibly an append cut between two pages, possibly id or dedup entries pointing to
//! them, possibly continuation chunks whose page was never written.
//!
//! An event is *covered* when the run of its stream holding its version exists and places it
//! at its position. A run is written after every page and index entry of its group and after
//! the runs before it, so the covered events are a prefix of the log, each with its whole
//! append and its index entries. Every acknowledged event is covered (its run was written
//! before its barrier started). The repair walks back from the last page and removes the
//! uncovered events: their pages (a page holding covered events too is rewritten with those
//! only), the index entries pointing to them, and every continuation chunk above the new last
//! position. It stops at the first covered event, which on a clean log is the last one (one
//! page decoded and one run looked up per open). Removing instead of re-creating the missing
//! index entries and runs keeps appends atomic: the pages alone do not tell where one append of
//! a group ends and the next begins, so a rebuilt run could expose half an append.
//!
//! The removals go in one sled batch; the caller flushes (and with `Durability::Fsync` syncs)
//! it before the writer starts, so later appends, which reuse the removed positions, never
//! meet the removed events again, even after another crash.

use tracktrace_core::RecordedEvent;
use tracktrace_core::codec::envelope;

use crate::layout::{self, IndexEntry, Run};

/// What stops the repair.
pub(crate) enum RepairError {
    Sled(sled::Error),
    /// The page at this position cannot be read.
    Damaged(u64, String),
}

impl From<sled::Error> for RepairError {
    fn from(e: sled::Error) -> Self {
        RepairError::Sled(e)
    }
}

/// Removes the uncovered events at the end of the log (see the module docs); returns how many.
pub(crate) fn repair_tail(log: &sled::Tree) -> Result<u64, RepairError> {
    let mut batch = sled::Batch::default();
    let mut removed = 0u64;
    // Last position kept, once known.
    let mut head = 0u64;
    for item in log.scan_prefix(b"E").rev() {
        let (key, stored) = item?;
        let first = layout::page_key_position(&key)
            .ok_or_else(|| RepairError::Damaged(0, "has a malformed key".into()))?;
        let damaged = |d: String| RepairError::Damaged(first, d);
        let old_chunks = layout::continuation_count(&stored);
        let bytes = layout::get_value(log, &key, stored).map_err(damaged)?;
        let page = layout::Page::parse(bytes.as_ref()).map_err(damaged)?;
        let mut keep = page.len();
        while keep > 0 {
            let position = first + keep as u64 - 1;
            let event = match envelope::decode(page.event(keep - 1)) {
                Ok(e) if e.position.get() == position => e,
                // A damaged event is reported by the reads that meet it; the repair only
                // removes what it can prove was never acknowledged.
                _ => {
                    tracing::warn!(
                        position,
                        "cannot decode the last events of the log to check them; left as they are"
                    );
                    break;
                }
            };
            if covered(log, &event)? {
                break;
            }
            remove_index_entries(log, &mut batch, &event)?;
            removed += 1;
            keep -= 1;
        }
        if keep == page.len() {
            head = first + keep as u64 - 1;
            break;
        }
        if keep == 0 {
            layout::delete_value(&mut batch, &key, old_chunks);
            continue;
        }
        let page_bytes = layout::encode_page((0..keep).map(|i| page.event(i)));
        layout::put_value(&mut batch, &key, &page_bytes, old_chunks);
        head = first + keep as u64 - 1;
        break;
    }
    // Continuation chunks of pages above the head: of the pages removed above, or orphans
    // written before a primary key that never was.
    let from = layout::continuation_key(&layout::page_key(head + 1), 0);
    let mut chunks = 0u64;
    for k in log.range(from..b"Y".to_vec()).keys() {
        batch.remove(k?);
        chunks += 1;
    }
    if removed > 0 || chunks > 0 {
        tracing::warn!(
            removed,
            chunks,
            head,
            "removed the unacknowledged end of the log left by a crash"
        );
        log.apply_batch(batch)?;
    }
    Ok(removed)
}

/// Whether the run of `e`'s stream holding its version exists and places it at its position.
fn covered(log: &sled::Tree, e: &RecordedEvent) -> Result<bool, RepairError> {
    let prefix = layout::stream_prefix(e.tenant.as_str(), e.stream.as_str());
    let v = e.version.get();
    let Some(item) = log
        .range(prefix.clone()..=layout::run_key(&prefix, v))
        .next_back()
    else {
        return Ok(false);
    };
    let (k, val) = item?;
    let run = Run::decode(prefix.len(), &k, &val).ok_or_else(|| {
        RepairError::Damaged(
            e.position.get(),
            format!(
                "has a malformed stream index entry of {}/{}",
                e.tenant, e.stream
            ),
        )
    })?;
    Ok(run.last_version() >= v && run.position_of(v) == e.position.get())
}

/// Adds the removal of the id and dedup index entries that point to `e` to `batch`.
fn remove_index_entries(
    log: &sled::Tree,
    batch: &mut sled::Batch,
    e: &RecordedEvent,
) -> Result<(), RepairError> {
    let tenant = e.tenant.as_str();
    let mut keys = vec![layout::id_key(tenant, &e.event_id.to_bytes())];
    if let Some(k) = &e.dedup_key {
        keys.push(layout::dedup_key(tenant, k));
    }
    for k in keys {
        if let Some(v) = log.get(&k)?
            && IndexEntry::decode(&v).is_some_and(|x| x.position == e.position.get())
        {
            batch.remove(k);
        }
    }
    Ok(())
}
