//! The read path: loading pages, walking positions, the event an index entry points to, stream
//! versions, `position_at`, checkpoints and snapshots, as methods on [`Shared`]. Used by the
//! store's reads (`store.rs`) and by the writer thread, which checks new writes against what is
//! already stored.

use bytes::Bytes;
use sled::IVec;
use tracktrace_core::codec::envelope;
use tracktrace_core::{
    Direction, Error, Position, RecordedEvent, Result, Snapshot, StreamId, TenantId, Timestamp,
    Version,
};

use crate::layout::{self, Run};
use crate::shared::{Shared, sled_err};

pub(crate) fn corrupt(position: u64, detail: impl Into<String>) -> Error {
    Error::corruption(Some(Position::new(position)), detail)
}

/// Decodes the encoded event found at `pos`.
pub(crate) fn decode_event(pos: u64, bytes: &[u8]) -> Result<RecordedEvent> {
    let e = envelope::decode(bytes).map_err(|d| corrupt(pos, d.to_string()))?;
    if e.position.get() != pos {
        return Err(corrupt(
            pos,
            format!("the record stored here claims position {}", e.position),
        ));
    }
    Ok(e)
}

impl Shared {
    /// Loads the page stored under `key`; returns its first position and its bytes.
    fn load_page(&self, key: &[u8], value: IVec) -> Result<(u64, layout::ValueBytes)> {
        let first = layout::page_key_position(key)
            .ok_or_else(|| Error::corruption(None, "malformed page key"))?;
        let bytes = layout::get_value(&self.log, key, value).map_err(|d| corrupt(first, d))?;
        Ok((first, bytes))
    }

    /// The first page starting at or after `x` (and at or before `head`): its first position
    /// and the recorded-at of its first event. A forward lookup (reverse ones are slow in sled
    /// 0.34).
    fn page_from(&self, x: u64, head: u64) -> Result<Option<(u64, Timestamp)>> {
        let Some(item) = self
            .log
            .range(layout::page_key(x)..=layout::page_key(head))
            .next()
        else {
            return Ok(None);
        };
        let (k, v) = item.map_err(sled_err)?;
        let (first, bytes) = self.load_page(&k, v)?;
        let page = layout::Page::parse(bytes.as_ref()).map_err(|d| corrupt(first, d))?;
        if page.is_empty() {
            return Err(corrupt(first, "empty page"));
        }
        Ok(Some((
            first,
            decode_event(first, page.event(0))?.recorded_at,
        )))
    }

    /// The first position up to `head` recorded at or after `at` (`head + 1` if none).
    ///
    /// The single writer stamps events with a monotonic clock (recovered from the last event on
    /// open), so recorded-at never decreases along the log: a binary search over positions for
    /// the first *page* whose first event is recorded at or after `at` (each probe one forward
    /// lookup, O(log n) probes), then a walk of the page before it.
    pub(crate) fn position_at(&self, at: Timestamp, head: u64) -> Result<u64> {
        // Smallest x such that the first page starting at or after x is missing or starts with
        // an event recorded at or after `at` (monotone in x).
        let (mut lo, mut hi) = (1u64, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.page_from(mid, head)? {
                Some((_, t)) if t < at => lo = mid + 1,
                _ => hi = mid,
            }
        }
        if lo == 1 {
            return Ok(1);
        }
        // A page starts at lo - 1 (else the predicate would hold there too) with its first
        // event recorded before `at`; the answer is in it or is the next page's start.
        let next_page = self.page_from(lo, head)?.map_or(head + 1, |(p, _)| p);
        let mut found = next_page;
        self.walk(
            lo - 1,
            (next_page - 1).min(head),
            Direction::Forwards,
            Some(lo - 1),
            |pos, bytes| {
                if decode_event(pos, bytes)?.recorded_at >= at {
                    found = pos;
                    return Ok(true);
                }
                Ok(false)
            },
        )?;
        Ok(found)
    }

    /// The event an index entry points to, whether or not it is visible yet.
    pub(crate) fn read_event(&self, entry: layout::IndexEntry) -> Result<RecordedEvent> {
        let key = layout::page_key(entry.page);
        let missing = || corrupt(entry.position, "an index entry points to a missing event");
        let v = self.log.get(key).map_err(sled_err)?.ok_or_else(missing)?;
        let (first, bytes) = self.load_page(&key, v)?;
        let page = layout::Page::parse(bytes.as_ref()).map_err(|d| corrupt(first, d))?;
        let i = (entry.position - first) as usize;
        if i >= page.len() {
            return Err(missing());
        }
        decode_event(entry.position, page.event(i))
    }

    /// Calls `f` with each position from `p0` to `p1` (inclusive, `1 <= p0 <= p1`) and its
    /// encoded event, in `direction`, until `f` returns `true`. A position missing from the log
    /// is a corruption error. `first_page`, if known, is the key position of a page at or before
    /// the one holding `p0` (it saves a reverse lookup, which is slow in sled 0.34).
    pub(crate) fn walk(
        &self,
        p0: u64,
        p1: u64,
        direction: Direction,
        first_page: Option<u64>,
        mut f: impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let missing = |p: u64| corrupt(p, "event missing from the log");
        let parse = |item: sled::Result<(IVec, IVec)>| -> Result<(u64, layout::ValueBytes)> {
            let (k, v) = item.map_err(sled_err)?;
            self.load_page(&k, v)
        };
        match direction {
            Direction::Forwards => {
                let mut expect = p0;
                // Visits one page; `true` once the walk is over.
                let mut visit = |first: u64, bytes: &[u8], expect: &mut u64| -> Result<bool> {
                    let page = layout::Page::parse(bytes).map_err(|d| corrupt(first, d))?;
                    for i in 0..page.len() {
                        let pos = first + i as u64;
                        if pos < p0 {
                            continue;
                        }
                        if pos > p1 {
                            return Ok(true);
                        }
                        if pos != *expect {
                            return Err(missing(*expect));
                        }
                        *expect += 1;
                        if f(pos, page.event(i))? {
                            return Ok(true);
                        }
                    }
                    Ok(*expect > p1)
                };
                let start = match first_page {
                    // A point read of the known first page is much cheaper than an iterator
                    // (short runs, e.g. single-event appends, need nothing else).
                    Some(page) => {
                        let page = page.min(p0);
                        let key = layout::page_key(page);
                        match self.log.get(key).map_err(sled_err)? {
                            Some(v) => {
                                let (first, bytes) = self.load_page(&key, v)?;
                                if visit(first, bytes.as_ref(), &mut expect)? {
                                    return Ok(());
                                }
                                page + 1
                            }
                            None => page,
                        }
                    }
                    None => match self
                        .log
                        .range(layout::page_key(0)..=layout::page_key(p0))
                        .next_back()
                    {
                        Some(item) => parse(item)?.0,
                        None => p0,
                    },
                };
                for item in self
                    .log
                    .range(layout::page_key(start)..=layout::page_key(p1))
                {
                    let (first, bytes) = parse(item)?;
                    if visit(first, bytes.as_ref(), &mut expect)? {
                        return Ok(());
                    }
                }
                if expect == p1 + 1 {
                    Ok(())
                } else {
                    Err(missing(expect))
                }
            }
            Direction::Backwards => {
                let mut expect = p1;
                let low = first_page.unwrap_or(0).min(p0);
                for item in self
                    .log
                    .range(layout::page_key(low)..=layout::page_key(p1))
                    .rev()
                {
                    let (first, bytes) = parse(item)?;
                    let page =
                        layout::Page::parse(bytes.as_ref()).map_err(|d| corrupt(first, d))?;
                    for i in (0..page.len()).rev() {
                        let pos = first + i as u64;
                        if pos > p1 {
                            continue;
                        }
                        if pos < p0 {
                            return Ok(());
                        }
                        if pos != expect {
                            return Err(missing(expect));
                        }
                        expect -= 1;
                        if f(pos, page.event(i))? {
                            return Ok(());
                        }
                    }
                }
                if expect + 1 == p0 {
                    Ok(())
                } else {
                    Err(missing(expect))
                }
            }
        }
    }

    /// Version of the stream with run prefix `prefix`, counting only runs at positions up to
    /// `cap`.
    pub(crate) fn stream_version_of(&self, prefix: &[u8], cap: u64) -> Result<u64> {
        for item in self.log.scan_prefix(prefix).rev() {
            let (k, v) = item.map_err(sled_err)?;
            let run = Run::decode(prefix.len(), &k, &v)
                .ok_or_else(|| Error::corruption(None, "malformed stream index entry"))?;
            if run.first_position <= cap {
                return Ok(run.last_version());
            }
        }
        Ok(0)
    }

    pub(crate) fn checkpoint_at(&self, key: &[u8]) -> Result<Option<Position>> {
        match self.projections.get(key).map_err(sled_err)? {
            None => Ok(None),
            Some(v) => layout::decode_u64(&v)
                .map(|p| Some(Position::new(p)))
                .ok_or_else(|| Error::corruption(None, "malformed checkpoint")),
        }
    }

    pub(crate) fn decode_snapshot(
        &self,
        key: &[u8],
        stored: IVec,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Snapshot> {
        let bad =
            |d: String| Error::corruption(None, format!("snapshot of {tenant}/{stream}: {d}"));
        let v = layout::get_value(&self.snapshots, key, stored).map_err(bad)?;
        let v = v.as_ref();
        if v.len() < 12 {
            return Err(bad("truncated header".into()));
        }
        let version = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
        let schema_version = u32::from_be_bytes(v[8..12].try_into().unwrap_or_default());
        Ok(Snapshot::new(
            tenant.clone(),
            stream.clone(),
            Version::new(version),
            schema_version,
            Bytes::copy_from_slice(&v[12..]),
        ))
    }
}
