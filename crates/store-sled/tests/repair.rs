//! The open-time repair of the log's tail, deterministically: the writes a crash can leave of an
//! unacknowledged append group (a prefix of its pages, index entries and runs, in that order;
//! see `layout`) are made with plain sled in a closed store, which is then reopened.

use tracktrace_core::codec::envelope;
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, ReadAll, RecordedEvent,
    StreamId, TenantId, Timestamp, Version,
};
use tracktrace_store_sled::{SledStore, layout};

fn tenant() -> TenantId {
    TenantId::parse("acme").unwrap()
}

fn stream(s: &str) -> StreamId {
    StreamId::parse(s).unwrap()
}

fn ev(i: usize) -> NewEvent {
    NewEvent::json("E", &serde_json::json!({ "i": i }))
}

/// The recorded form of `e` at `version` and `position` of `stream`.
fn recorded(s: &str, version: u64, position: u64, e: NewEvent) -> RecordedEvent {
    RecordedEvent::from_new(
        tenant(),
        stream(s),
        Version::new(version),
        Position::new(position),
        Timestamp::now(),
        e,
    )
}

/// Writes, with plain sled, what the writer writes for one group: pages of the given events
/// (each page a slice of `pages`), then (if `index`) their id and dedup entries, then the
/// runs given as (stream, first version, first position, count, first page).
fn write_group(
    log: &sled::Tree,
    pages: &[&[RecordedEvent]],
    index: bool,
    runs: &[(&str, u64, u64, u32, u64)],
) {
    for page in pages {
        let first = page[0].position.get();
        let encoded: Vec<Vec<u8>> = page.iter().map(envelope::encode).collect();
        let bytes = layout::encode_page(encoded.iter().map(|e| e.as_slice()));
        let key = layout::page_key(first);
        let (stored, chunks) = layout::value_parts(&key, &bytes);
        for (k, c) in chunks {
            log.insert(k, c).unwrap();
        }
        log.insert(key, stored).unwrap();
    }
    if index {
        for page in pages {
            let first = page[0].position.get();
            for e in page.iter() {
                let entry = layout::IndexEntry {
                    page: first,
                    position: e.position.get(),
                }
                .encode();
                let t = e.tenant.as_str();
                log.insert(layout::id_key(t, &e.event_id.to_bytes()), &entry)
                    .unwrap();
                if let Some(k) = &e.dedup_key {
                    log.insert(layout::dedup_key(t, k), &entry).unwrap();
                }
            }
        }
    }
    for &(s, first_version, first_position, count, first_page) in runs {
        let run = layout::Run {
            first_version,
            first_position,
            count,
            first_page,
        };
        let key = layout::run_key(&layout::stream_prefix("acme", s), first_version);
        log.insert(key, &run.encode_value()).unwrap();
    }
}

fn open_log(dir: &std::path::Path) -> (sled::Db, sled::Tree) {
    let db = sled::Config::new().path(dir).open().unwrap();
    let log = db.open_tree(layout::LOG_TREE).unwrap();
    (db, log)
}

async fn versions(store: &SledStore, s: &str) -> Vec<u64> {
    store
        .read_stream_forwards(&tenant(), &stream(s))
        .await
        .unwrap()
        .iter()
        .map(|e| e.version.get())
        .collect()
}

async fn positions(store: &SledStore) -> Vec<u64> {
    store
        .read_all(ReadAll::starting_at(Position::START, 100))
        .await
        .unwrap()
        .events
        .iter()
        .map(|e| e.position.get())
        .collect()
}

/// A group of two appends sharing one page, written up to the first append's run: the first
/// append stays (everything of it is there), the second goes (its run is missing), with the
/// index entries pointing to it; the page is cut after the first append's events.
#[tokio::test]
async fn a_group_cut_between_its_runs_keeps_the_appends_whose_run_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let t = tenant();
    {
        let store = SledStore::open_path(dir.path()).unwrap();
        store
            .append_to(&t, &stream("a"), ExpectedVersion::NoStream, vec![ev(0)])
            .await
            .unwrap();
    }
    // Append A: stream a, versions 2..=3 at positions 2..=3; append B: stream b, version 1 at
    // position 4; one page; every index entry; only A's run.
    let a1 = recorded("a", 2, 2, ev(1).with_dedup_key("dk-a1"));
    let a2 = recorded("a", 3, 3, ev(2));
    let b1 = recorded("b", 1, 4, ev(3).with_dedup_key("dk-b1"));
    let (a1_id, b1_id) = (a1.event_id, b1.event_id);
    {
        let (db, log) = open_log(dir.path());
        write_group(&log, &[&[a1, a2, b1]], true, &[("a", 2, 2, 2, 2)]);
        // A continuation chunk whose page was never written.
        log.insert(
            layout::continuation_key(&layout::page_key(5), 0),
            &b"orphan"[..],
        )
        .unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open_path(dir.path()).unwrap();
    assert_eq!(store.stats().repaired, 1);
    assert_eq!(store.head().await.unwrap(), Position::new(3));
    assert_eq!(positions(&store).await, [1, 2, 3]);
    assert_eq!(versions(&store, "a").await, [1, 2, 3]);
    assert_eq!(
        store.stream_version(&t, &stream("a")).await.unwrap(),
        Version::new(3)
    );
    assert_eq!(
        store.stream_version(&t, &stream("b")).await.unwrap(),
        Version::new(0)
    );
    assert!(versions(&store, "b").await.is_empty());
    assert!(store.get_event(&t, a1_id).await.unwrap().is_some());
    assert!(store.get_event(&t, b1_id).await.unwrap().is_none());
    // A's dedup key still finds A's event.
    let again = store
        .append_to(
            &t,
            &stream("a"),
            ExpectedVersion::Any,
            vec![ev(9).with_dedup_key("dk-a1")],
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events[0].position, Position::new(2));
    // B's id and dedup key are free again: B appended anew is new, at the reused position 4.
    let b = store
        .append_to(
            &t,
            &stream("b"),
            ExpectedVersion::NoStream,
            vec![ev(3).with_id(b1_id).with_dedup_key("dk-b1")],
        )
        .await
        .unwrap();
    assert!(!b.duplicate);
    assert_eq!(b.events[0].position, Position::new(4));
    assert_eq!(b.events[0].version, Version::new(1));
    // And a new append goes after it.
    let c = store
        .append_to(
            &t,
            &stream("a"),
            ExpectedVersion::Exact(Version::new(3)),
            vec![ev(4)],
        )
        .await
        .unwrap();
    assert_eq!(c.events[0].position, Position::new(5));
    assert_eq!(positions(&store).await, [1, 2, 3, 4, 5]);
    assert_eq!(versions(&store, "a").await, [1, 2, 3, 4]);
    assert_eq!(versions(&store, "b").await, [1]);
    let got = store.get_event(&t, b1_id).await.unwrap().unwrap();
    assert_eq!(got.position, Position::new(4));
    drop(store);

    // Reopening finds the same, with nothing left to repair.
    let store = SledStore::open_path(dir.path()).unwrap();
    assert_eq!(store.stats().repaired, 0);
    assert_eq!(positions(&store).await, [1, 2, 3, 4, 5]);
    assert_eq!(versions(&store, "a").await, [1, 2, 3, 4]);
    assert_eq!(versions(&store, "b").await, [1]);
    drop(store);
    let (_db, log) = open_log(dir.path());
    // The orphan chunk is gone (position 5 now has an inline page of its own).
    assert_eq!(log.scan_prefix(b"X").count(), 0);
}

/// A group cut inside its pages (an append split between a page that is there and one that is
/// not, a large chunked page whose primary key never landed) leaves nothing behind.
#[tokio::test]
async fn a_group_cut_inside_its_pages_is_removed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let t = tenant();
    {
        let store = SledStore::open_path(dir.path()).unwrap();
        store
            .append_to(
                &t,
                &stream("a"),
                ExpectedVersion::NoStream,
                vec![ev(0), ev(1)],
            )
            .await
            .unwrap();
    }
    // Append C: stream c, versions 1..=3 at positions 3..=5, split over two pages (3..=4 and
    // 5); only the first page was written. Then a chunked page at 6 with only its chunks.
    let c1 = recorded("c", 1, 3, ev(2).with_dedup_key("dk-c1"));
    let c2 = recorded("c", 2, 4, ev(3));
    let c1_id = c1.event_id;
    let big = recorded(
        "d",
        1,
        6,
        NewEvent::new(
            "Big",
            "application/octet-stream",
            vec![7u8; 3 * layout::MAX_INLINE],
        ),
    );
    {
        let (db, log) = open_log(dir.path());
        write_group(&log, &[&[c1, c2]], false, &[]);
        let encoded = envelope::encode(&big);
        let bytes = layout::encode_page([encoded.as_slice()]);
        let (_, chunks) = layout::value_parts(&layout::page_key(6), &bytes);
        assert!(chunks.len() >= 2);
        for (k, c) in chunks {
            log.insert(k, c).unwrap();
        }
        db.flush().unwrap();
    }
    let store = SledStore::open_path(dir.path()).unwrap();
    assert_eq!(store.stats().repaired, 2);
    assert_eq!(store.head().await.unwrap(), Position::new(2));
    assert_eq!(positions(&store).await, [1, 2]);
    assert!(versions(&store, "c").await.is_empty());
    assert!(store.get_event(&t, c1_id).await.unwrap().is_none());
    // Positions 3.. are reused, by a large event too (its chunks overwrite nothing stale).
    let big = NewEvent::new(
        "Big",
        "application/octet-stream",
        vec![9u8; 2 * layout::MAX_INLINE],
    );
    let out = store
        .append_to(
            &t,
            &stream("c"),
            ExpectedVersion::NoStream,
            vec![big, ev(5).with_dedup_key("dk-c1")],
        )
        .await
        .unwrap();
    assert!(!out.duplicate);
    assert_eq!(out.events[0].position, Position::new(3));
    let back = store.read_stream_forwards(&t, &stream("c")).await.unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].payload.len(), 2 * layout::MAX_INLINE);
    assert!(back[0].payload.iter().all(|b| *b == 9));
    assert_eq!(positions(&store).await, [1, 2, 3, 4]);
    drop(store);
    let (_db, log) = open_log(dir.path());
    // Only the chunks of the new large page are left.
    let chunks: Vec<Vec<u8>> = log
        .scan_prefix(b"X")
        .keys()
        .map(|k| k.unwrap().to_vec())
        .collect();
    assert!(!chunks.is_empty());
    for k in chunks {
        assert_eq!(&k[1..9], &3u64.to_be_bytes(), "stale chunk {k:?}");
    }
}

/// What the store itself wrote, with the last group's runs or index entries dropped: the
/// group's appends are gone after reopening, and the ones before stay.
#[tokio::test]
async fn dropping_the_last_groups_runs_removes_its_appends() {
    let dir = tempfile::tempdir().unwrap();
    let t = tenant();
    let last = ev(2).with_dedup_key("dk-last");
    let last_id = last.event_id;
    {
        let store = SledStore::open_path(dir.path()).unwrap();
        store
            .append_to(
                &t,
                &stream("a"),
                ExpectedVersion::NoStream,
                vec![ev(0), ev(1)],
            )
            .await
            .unwrap();
        store
            .append_to(
                &t,
                &stream("a"),
                ExpectedVersion::Exact(Version::new(2)),
                vec![last, ev(3)],
            )
            .await
            .unwrap();
    }
    {
        let (db, log) = open_log(dir.path());
        let prefix = layout::stream_prefix("acme", "a");
        assert!(log.remove(layout::run_key(&prefix, 3)).unwrap().is_some());
        db.flush().unwrap();
    }
    let store = SledStore::open_path(dir.path()).unwrap();
    assert_eq!(store.stats().repaired, 2);
    assert_eq!(positions(&store).await, [1, 2]);
    assert_eq!(versions(&store, "a").await, [1, 2]);
    assert!(store.get_event(&t, last_id).await.unwrap().is_none());
    let out = store
        .append_to(
            &t,
            &stream("a"),
            ExpectedVersion::Exact(Version::new(2)),
            vec![ev(4).with_dedup_key("dk-last")],
        )
        .await
        .unwrap();
    assert!(!out.duplicate);
    assert_eq!(out.events[0].position, Position::new(3));
    assert_eq!(out.events[0].version, Version::new(3));
    drop(store);
    let store = SledStore::open_path(dir.path()).unwrap();
    assert_eq!(positions(&store).await, [1, 2, 3]);
    assert_eq!(versions(&store, "a").await, [1, 2, 3]);
}
