//! On-disk layout (format 1): the keys and values this crate writes into sled.
//!
//! Public so that tools and tests can inspect a store directory with plain sled; the layout is
//! stable within a format version (recorded under [`FORMAT_KEY`] in sled's default tree).
//!
//! # Trees
//! - [`LOG_TREE`]: the events and their indexes. The writer stores an append group with one
//!   `Tree::insert` per key (a `sled::Batch` costs sled a batch manifest and a second log write
//!   per barrier; see [Write order and crash recovery](#write-order-and-crash-recovery)):
//!   - `E` + position of its first event (u64 BE) → a *page*: the events of consecutive
//!     positions written by one group, each as a [`tracktrace_core::codec::envelope`]
//!     (see [`encode_page`]), stored as a chunked value (see below). Packing a group's events
//!     into pages of up to [`MAX_INLINE`] bytes costs one sled write per page instead of one per
//!     event; an event larger than a page gets a page of its own, chunked;
//!   - `X` + page key without its tag + chunk index (u32 BE) → continuation chunks of a large page;
//!   - `S` + tenant + `0x00` + stream + `0x00` + first version (u64 BE) → a *run*: first position
//!     (u64 BE) + event count (u32 BE) + key position of the page holding the first event
//!     (u64 BE). One append writes one run (its positions are contiguous), so a stream index
//!     costs one write per append, not per event, and the stream's version is the end of its
//!     last run;
//!   - `I` + tenant + `0x00` + event id (16 bytes) → [`IndexEntry`]: the key position of the
//!     event's page and the event's position (u64 BE each);
//!   - `D` + tenant + `0x00` + dedup key → [`IndexEntry`] likewise.
//!
//!   Tenant ids, stream ids and dedup keys never contain `0x00` (they reject control
//!   characters), so the separators are unambiguous.
//! - [`PROJECTIONS_TREE`]: checkpoints and read models, written by one `sled::Batch` per commit.
//!   - `P` + checkpoint name → position (u64 BE);
//!   - `R` + namespace length (u16 BE) + namespace + key → chunked value;
//!   - `X` + (the `R` key without its tag) + chunk index → continuation chunks.
//! - [`SNAPSHOTS_TREE`]: `N` + tenant + `0x00` + stream → chunked value holding version (u64 BE),
//!   schema version (u32 BE) and the payload; `X` continuation chunks as above.
//!
//! # Write order and crash recovery
//! An append group's writes go to [`LOG_TREE`] from the writer thread, one `insert` each, in
//! this order: every page of the group in position order (a page's continuation chunks before
//! its primary key), then the `I` and `D` entries of its events in position order, then its
//! `S` runs in position order. Groups are written one after the other by that one thread.
//!
//! **Assumption**: after a crash, sled 0.34 recovers a *prefix* of the writes one thread made,
//! in the order it made them. Each write reserves its place in sled's log (its LSN) before it
//! returns, so one thread's writes get increasing LSNs, and recovery replays the log in LSN
//! order up to the first torn or missing message (`pagecache/iterator.rs`: the scan stops at
//! a tear, `check_contiguity_in_unstable_tail` bounds replay by the end of the last contiguous
//! message; the batch manifests that make a `Batch` atomic rely on this same cut). The
//! previous design, one batch per group with the next group written while the previous one's
//! barrier runs, already relied on it across groups.
//!
//! Hence a run is only ever present with every page, index entry and earlier run written
//! before it, and every acknowledged append's run is present (it was written before its
//! group's barrier started). On open, the repair walks back from the last page and removes
//! the events no run covers (never acknowledged), with their index entries and any
//! continuation chunk above the new last position (a page holding covered events too is
//! rewritten with those only), in one batch that is flushed before the writer starts. Missing
//! runs are not re-created from the pages: a page does not say where one append of its group
//! ends and the next begins, so that could expose half an append. The removed positions are
//! then reused by the next appends. Readers never see any of this before the repair: they are
//! bounded by the published head, which moves only after a group's barrier.
//!
//! Read-model commits, checkpoints and snapshots ([`PROJECTIONS_TREE`], [`SNAPSHOTS_TREE`])
//! keep one `sled::Batch` each: they need atomicity and are not on the append path.
//!
//! # Chunked values
//! sled 0.34 writes a page whose serialized size exceeds a quarter of a segment (≈128 KiB with
//! the default 512 KiB segments; a leaf holds up to 17 entries, hence "values over ≈7 kB") to a
//! separate `blobs/<lsn>` file that it never fsyncs. To keep every value inline in the `db` file
//! (which the durability barrier fsyncs), values longer than [`MAX_INLINE`] are split (so the
//! barrier only looks for blob files as a safety net, at most once a second):
//! - inline: `0x00` + bytes;
//! - chunked: `0x01` + total length (u32 BE) + number of continuation chunks (u32 BE) + the first
//!   part; continuation `i` (0-based) lives under `X` + (primary key without its tag) + `i`.

use sled::IVec;

/// Key in sled's default tree holding the format version of the store.
pub const FORMAT_KEY: &[u8] = b"tracktrace.format";
/// Current format version.
pub const FORMAT_VERSION: &[u8] = b"1";
/// Tree of events and their indexes.
pub const LOG_TREE: &str = "log";
/// Tree of checkpoints and read models.
pub const PROJECTIONS_TREE: &str = "projections";
/// Tree of snapshots.
pub const SNAPSHOTS_TREE: &str = "snapshots";

/// Longest stored value kept in one sled entry (bytes); longer values are chunked.
pub const MAX_INLINE: usize = 4000;
const CHUNK_HEADER: usize = 9;

const TAG_INLINE: u8 = 0;
const TAG_CHUNKED: u8 = 1;

/// Key of the page whose first event is at `first_position`, in [`LOG_TREE`].
pub fn page_key(first_position: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'E';
    k[1..].copy_from_slice(&first_position.to_be_bytes());
    k
}

/// First position encoded in a page key, if `key` is one.
pub fn page_key_position(key: &[u8]) -> Option<u64> {
    match key {
        [b'E', rest @ ..] => rest.try_into().ok().map(u64::from_be_bytes),
        _ => None,
    }
}

/// Target size of a page: pages are closed before they would exceed it.
pub const PAGE_TARGET: usize = MAX_INLINE - 1;

/// Encodes a page of encoded events: event count (u32 BE), then the end offset of each event
/// within the data (u32 BE each), then the events back to back.
pub fn encode_page<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let events: Vec<&[u8]> = events.into_iter().collect();
    let data: usize = events.iter().map(|e| e.len()).sum();
    let mut out = Vec::with_capacity(4 + 4 * events.len() + data);
    out.extend_from_slice(&(events.len() as u32).to_be_bytes());
    let mut end = 0u32;
    for e in &events {
        end = end.saturating_add(e.len() as u32);
        out.extend_from_slice(&end.to_be_bytes());
    }
    for e in events {
        out.extend_from_slice(e);
    }
    out
}

/// Size a page of events of the given sizes takes.
pub fn page_size(event_sizes: impl IntoIterator<Item = usize>) -> usize {
    event_sizes.into_iter().fold(4, |acc, n| acc + 4 + n)
}

/// A parsed page: the encoded events it holds.
#[derive(Debug)]
pub struct Page<'a> {
    ends: &'a [u8],
    data: &'a [u8],
}

impl<'a> Page<'a> {
    /// Parses and checks the framing of a page (not the events themselves).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let n = bytes
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("truncated page header")?;
        if n == 0 {
            return Err("empty page".into());
        }
        let header = n
            .checked_mul(4)
            .and_then(|h| h.checked_add(4))
            .filter(|h| *h <= bytes.len())
            .ok_or("page header longer than the page")?;
        let page = Page {
            ends: &bytes[4..header],
            data: &bytes[header..],
        };
        let mut prev = 0;
        for i in 0..n {
            let end = page.end(i);
            if end < prev || end > page.data.len() {
                return Err(format!("bad offset of event {i} in the page"));
            }
            prev = end;
        }
        if prev != page.data.len() {
            return Err("trailing bytes after the last event of the page".into());
        }
        Ok(page)
    }

    fn end(&self, i: usize) -> usize {
        let b = &self.ends[4 * i..4 * i + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// Number of events in the page (≥ 1).
    pub fn len(&self) -> usize {
        self.ends.len() / 4
    }

    /// Always `false`: a parsed page holds at least one event.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The encoded event `i` (`i < len()`).
    pub fn event(&self, i: usize) -> &'a [u8] {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        &self.data[start..self.end(i)]
    }
}

/// Value of an event-id or dedup-key index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Key position of the page holding the event.
    pub page: u64,
    /// Position of the event.
    pub position: u64,
}

impl IndexEntry {
    /// The stored value.
    pub fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.page.to_be_bytes());
        v[8..].copy_from_slice(&self.position.to_be_bytes());
        v
    }

    /// Parses a stored value.
    pub fn decode(v: &[u8]) -> Option<Self> {
        let page = decode_u64(v.get(..8)?)?;
        let position = decode_u64(v.get(8..)?)?;
        (page <= position).then_some(Self { page, position })
    }
}

/// Prefix of every run key of one stream in [`LOG_TREE`].
pub fn stream_prefix(tenant: &str, stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + tenant.len() + stream.len() + 8);
    k.push(b'S');
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k
}

/// Run key: the stream prefix followed by the run's first version.
pub fn run_key(prefix: &[u8], first_version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&first_version.to_be_bytes());
    k
}

/// A run of consecutive versions of one stream at consecutive positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Version of the first event of the run.
    pub first_version: u64,
    /// Position of the first event of the run.
    pub first_position: u64,
    /// Number of events in the run (≥ 1).
    pub count: u32,
    /// Key position of the page holding the run's first event (≤ `first_position`).
    pub first_page: u64,
}

impl Run {
    /// Version of the last event of the run.
    pub fn last_version(&self) -> u64 {
        self.first_version + u64::from(self.count) - 1
    }

    /// Position of the event with version `v` (which must be within the run).
    pub fn position_of(&self, v: u64) -> u64 {
        self.first_position + (v - self.first_version)
    }

    /// The value stored for the run.
    pub fn encode_value(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..8].copy_from_slice(&self.first_position.to_be_bytes());
        v[8..12].copy_from_slice(&self.count.to_be_bytes());
        v[12..].copy_from_slice(&self.first_page.to_be_bytes());
        v
    }

    /// Parses a run from its key (with the stream prefix of length `prefix_len`) and value.
    pub fn decode(prefix_len: usize, key: &[u8], value: &[u8]) -> Option<Run> {
        let first_version = u64::from_be_bytes(key.get(prefix_len..)?.try_into().ok()?);
        let first_position = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
        let count = u32::from_be_bytes(value.get(8..12)?.try_into().ok()?);
        let first_page = u64::from_be_bytes(value.get(12..)?.try_into().ok()?);
        (count > 0 && first_version > 0 && first_page > 0 && first_page <= first_position)
            .then_some(Run {
                first_version,
                first_position,
                count,
                first_page,
            })
    }
}

/// Key of the event-id index entry.
pub fn id_key(tenant: &str, event_id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.len() + 16);
    k.push(b'I');
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(event_id);
    k
}

/// Key of the dedup-key index entry.
pub fn dedup_key(tenant: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.len() + key.len());
    k.push(b'D');
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Key of a checkpoint in [`PROJECTIONS_TREE`].
pub fn checkpoint_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(b'P');
    k.extend_from_slice(name.as_bytes());
    k
}

/// Prefix of every read-model key of namespace `ns` in [`PROJECTIONS_TREE`].
/// `ns` must be at most `u16::MAX` bytes long (the store enforces a lower limit).
pub fn namespace_prefix(ns: &str) -> Vec<u8> {
    let len = u16::try_from(ns.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + ns.len());
    k.push(b'R');
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(ns.as_bytes());
    k
}

/// Key of a snapshot in [`SNAPSHOTS_TREE`].
pub fn snapshot_key(tenant: &str, stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.len() + stream.len());
    k.push(b'N');
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(stream.as_bytes());
    k
}

/// Big-endian u64 value.
pub fn decode_u64(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

/// Key of continuation chunk `i` of the value stored under `primary`.
pub fn continuation_key(primary: &[u8], i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(primary.len() + 4);
    k.push(b'X');
    k.extend_from_slice(primary.get(1..).unwrap_or_default());
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// Number of continuation chunks of a stored value (0 for inline or unparsable values).
pub fn continuation_count(stored: &[u8]) -> u32 {
    match stored {
        [TAG_CHUNKED, _, _, _, _, n0, n1, n2, n3, ..] => u32::from_be_bytes([*n0, *n1, *n2, *n3]),
        _ => 0,
    }
}

/// Continuation chunks of a stored value: (key, bytes) each.
pub type Chunks<'a> = Vec<(Vec<u8>, &'a [u8])>;

/// The stored form of `value` under `primary`: the value stored under `primary` itself and its
/// continuation chunks, none for an inline value.
pub fn value_parts<'a>(primary: &[u8], value: &'a [u8]) -> (Vec<u8>, Chunks<'a>) {
    if value.len() < MAX_INLINE {
        let mut v = Vec::with_capacity(value.len() + 1);
        v.push(TAG_INLINE);
        v.extend_from_slice(value);
        (v, Vec::new())
    } else {
        let first = MAX_INLINE - CHUNK_HEADER;
        let (head, rest) = value.split_at(first);
        let chunks: Vec<&[u8]> = rest.chunks(MAX_INLINE).collect();
        let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        let total = u32::try_from(value.len()).unwrap_or(u32::MAX);
        let mut v = Vec::with_capacity(MAX_INLINE);
        v.push(TAG_CHUNKED);
        v.extend_from_slice(&total.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(head);
        let chunks = chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| (continuation_key(primary, i as u32), c))
            .collect();
        (v, chunks)
    }
}

/// Adds the writes storing `value` under `primary` to `batch`, removing the continuation chunks
/// of the previous value (`old_continuations`, from [`continuation_count`]) that are not
/// overwritten.
pub fn put_value(batch: &mut sled::Batch, primary: &[u8], value: &[u8], old_continuations: u32) {
    let (stored, chunks) = value_parts(primary, value);
    let new_continuations = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
    batch.insert(primary, stored);
    for (k, c) in chunks {
        batch.insert(k, c);
    }
    remove_continuations(batch, primary, new_continuations, old_continuations);
}

/// Adds the removal of `primary` and of its `old_continuations` chunks to `batch`.
pub fn delete_value(batch: &mut sled::Batch, primary: &[u8], old_continuations: u32) {
    batch.remove(primary);
    remove_continuations(batch, primary, 0, old_continuations);
}

fn remove_continuations(batch: &mut sled::Batch, primary: &[u8], from: u32, to: u32) {
    for i in from..to {
        batch.remove(continuation_key(primary, i));
    }
}

/// Reassembles a value stored by [`put_value`], fetching continuation chunks from `tree`.
/// Returns a description of the damage if the stored bytes are inconsistent.
pub fn get_value(tree: &sled::Tree, primary: &[u8], stored: IVec) -> Result<ValueBytes, String> {
    match stored.first() {
        Some(&TAG_INLINE) => Ok(ValueBytes { stored, offset: 1 }),
        Some(&TAG_CHUNKED) => {
            if stored.len() < CHUNK_HEADER {
                return Err("truncated chunk header".into());
            }
            let total = u32::from_be_bytes([stored[1], stored[2], stored[3], stored[4]]) as usize;
            let n = continuation_count(&stored);
            let mut out = Vec::with_capacity(total.min(64 * 1024 * 1024));
            out.extend_from_slice(&stored[CHUNK_HEADER..]);
            for i in 0..n {
                let chunk = tree
                    .get(continuation_key(primary, i))
                    .map_err(|e| format!("reading chunk {i}: {e}"))?
                    .ok_or_else(|| format!("chunk {i} of {n} is missing"))?;
                out.extend_from_slice(&chunk);
                if out.len() > total {
                    break;
                }
            }
            if out.len() != total {
                return Err(format!(
                    "chunked value has {} bytes, header says {total}",
                    out.len()
                ));
            }
            Ok(ValueBytes {
                stored: IVec::from(out),
                offset: 0,
            })
        }
        Some(t) => Err(format!("unknown value tag {t}")),
        None => Err("empty value".into()),
    }
}

/// A stored value without its framing.
#[derive(Clone, Debug)]
pub struct ValueBytes {
    stored: IVec,
    offset: usize,
}

impl AsRef<[u8]> for ValueBytes {
    fn as_ref(&self) -> &[u8] {
        &self.stored[self.offset..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_values_roundtrip_and_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let t = db.open_tree("t").unwrap();
        for len in [
            0,
            1,
            MAX_INLINE - 1,
            MAX_INLINE,
            MAX_INLINE * 3 + 17,
            1 << 20,
        ] {
            let value: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let old = t.get(b"Rk").unwrap().map_or(0, |v| continuation_count(&v));
            let mut b = sled::Batch::default();
            put_value(&mut b, b"Rk", &value, old);
            t.apply_batch(b).unwrap();
            let stored = t.get(b"Rk").unwrap().unwrap();
            assert!(stored.len() <= MAX_INLINE);
            let got = get_value(&t, b"Rk", stored).unwrap();
            assert_eq!(got.as_ref(), &value[..], "len {len}");
            let expected_chunks = u64::from(continuation_count(&t.get(b"Rk").unwrap().unwrap()));
            assert_eq!(
                t.len() as u64,
                1 + expected_chunks,
                "stale chunks left, len {len}"
            );
        }
        let old = continuation_count(&t.get(b"Rk").unwrap().unwrap());
        let mut b = sled::Batch::default();
        delete_value(&mut b, b"Rk", old);
        t.apply_batch(b).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn damaged_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let t = db.open_tree("t").unwrap();
        assert!(get_value(&t, b"Rk", IVec::from(&b""[..])).is_err());
        assert!(get_value(&t, b"Rk", IVec::from(&[9u8, 1, 2][..])).is_err());
        assert!(get_value(&t, b"Rk", IVec::from(&[1u8, 0, 0][..])).is_err());
        // header claims a continuation chunk that does not exist
        assert!(get_value(&t, b"Rk", IVec::from(&[1u8, 0, 0, 0, 9, 0, 0, 0, 1, 7][..])).is_err());
    }

    #[test]
    fn pages_roundtrip_and_reject_bad_framing() {
        let page = encode_page([&b"ab"[..], b"", b"cde"]);
        assert_eq!(page.len(), page_size([2, 0, 3]));
        let p = Page::parse(&page).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p.event(0), p.event(1), p.event(2)),
            (&b"ab"[..], &b""[..], &b"cde"[..])
        );
        assert!(Page::parse(&page[..page.len() - 1]).is_err());
        assert!(Page::parse(&[0, 0, 0, 0]).is_err());
        assert!(Page::parse(&[0, 0, 0, 9, 1]).is_err());
        assert!(Page::parse(&[0xff, 0xff, 0xff, 0xff]).is_err());
        let mut bad = page.clone();
        bad[7] = 200; // first end offset beyond the data
        assert!(Page::parse(&bad).is_err());
        let e = IndexEntry {
            page: 3,
            position: 5,
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        assert_eq!(IndexEntry::decode(&e.encode()[..9]), None);
    }

    #[test]
    fn run_keys_sort_by_version_within_a_stream() {
        let p = stream_prefix("t", "s");
        assert!(run_key(&p, 2) < run_key(&p, 10));
        let r = Run {
            first_version: 3,
            first_position: 40,
            count: 2,
            first_page: 38,
        };
        assert_eq!(
            Run::decode(p.len(), &run_key(&p, 3), &r.encode_value()),
            Some(r)
        );
        assert_eq!(r.last_version(), 4);
        assert_eq!(r.position_of(4), 41);
        assert_eq!(Run::decode(p.len(), &run_key(&p, 3), b"short"), None);
    }
}
