//! sled-specific behaviour: reopening, large (chunked) values, the directory lock, corruption
//! reporting, read models and snapshots surviving a reopen, each durability mode, and the
//! store's event count and size.

use std::sync::Arc;

use bytes::Bytes;
use tracktrace_core::{
    CheckpointStore, Direction, Error, EventStore, EventStoreExt, ExpectedVersion, KeyRange,
    NewEvent, Position, ReadAll, ReadModelBatch, ReadModelStore, ReadModelWrite, ReadStream,
    Snapshot, SnapshotStore, StreamId, TenantId, Version,
};
use tracktrace_store_sled::{Durability, OpenError, SledOptions, SledStore, layout};

fn ids() -> (TenantId, StreamId) {
    (
        TenantId::parse("acme").unwrap(),
        StreamId::parse("Bag-1").unwrap(),
    )
}

fn ev(i: usize) -> NewEvent {
    NewEvent::json("E", &serde_json::json!({ "i": i }))
}

#[tokio::test]
async fn events_survive_reopen_and_positions_continue() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let (t, s) = ids();
    {
        let store = SledStore::open_path(dir.path())?;
        store
            .append_to(&t, &s, ExpectedVersion::NoStream, (0..3).map(ev).collect())
            .await?;
        store
            .append_to(&t, &s, ExpectedVersion::Exact(Version::new(3)), vec![ev(3)])
            .await?;
    }
    let store = SledStore::open_path(dir.path())?;
    assert_eq!(store.head().await?, Position::new(4));
    assert_eq!(store.stream_version(&t, &s).await?, Version::new(4));
    let out = store
        .append_to(&t, &s, ExpectedVersion::Exact(Version::new(4)), vec![ev(4)])
        .await?;
    assert_eq!(out.last_position(), Position::new(5));
    let all = store.read_stream_forwards(&t, &s).await?;
    let versions: Vec<u64> = all.iter().map(|e| e.version.get()).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    // Runs are split across appends; reads in both directions cross them.
    let back = store
        .read_stream(
            ReadStream::backwards(t.clone(), s.clone())
                .from(Version::new(4))
                .limit(3),
        )
        .await?;
    let versions: Vec<u64> = back.iter().map(|e| e.version.get()).collect();
    assert_eq!(versions, [4, 3, 2]);
    let fwd = store
        .read_stream(
            ReadStream::forwards(t.clone(), s.clone())
                .from(Version::new(3))
                .limit(2),
        )
        .await?;
    let versions: Vec<u64> = fwd.iter().map(|e| e.version.get()).collect();
    assert_eq!(versions, [3, 4]);
    Ok(())
}

#[tokio::test]
async fn store_stats_count_events_and_survive_reopen() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let (t, s) = ids();
    // Incompressible-ish and larger than a page: stored in chunks.
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let big = NewEvent::new("Big", "application/octet-stream", big);
    {
        let store = SledStore::open_path(dir.path())?;
        let fresh = store.store_stats().await?.expect("sled reports stats");
        assert_eq!(fresh.events, 0);
        store
            .append_to(&t, &s, ExpectedVersion::NoStream, (0..3).map(ev).collect())
            .await?;
        store
            .append_to(&t, &s, ExpectedVersion::Any, vec![big.clone()])
            .await?;
        // A duplicate and a conflict store nothing.
        let dup = store
            .append_to(&t, &s, ExpectedVersion::Any, vec![big.clone()])
            .await?;
        assert!(dup.duplicate);
        assert!(
            store
                .append_to(&t, &s, ExpectedVersion::NoStream, vec![ev(9)])
                .await
                .is_err()
        );
        let stats = store.store_stats().await?.unwrap();
        assert_eq!(stats.events, 4);
        assert!(stats.bytes >= 300_000, "{stats:?}");
    }
    // Recovered on open, and counting on.
    let store = SledStore::open_path(dir.path())?;
    assert_eq!(store.store_stats().await?.unwrap().events, 4);
    store
        .append_to(
            &t,
            &StreamId::parse("Bag-2").unwrap(),
            ExpectedVersion::Any,
            vec![ev(5), ev(6)],
        )
        .await?;
    let stats = store.store_stats().await?.unwrap();
    assert_eq!(stats.events, 6);
    assert!(stats.bytes >= 300_000, "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn large_events_and_values_roundtrip_through_chunks() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let (t, s) = ids();
    let big: Vec<u8> = (0..tracktrace_core::limits::MAX_PAYLOAD_BYTES)
        .map(|i| (i % 253) as u8)
        .collect();
    let e = NewEvent::new("Big", "application/octet-stream", big.clone());
    let id = e.event_id;
    {
        let store = SledStore::open_path(dir.path())?;
        store
            .append_to(&t, &s, ExpectedVersion::Any, vec![ev(0), e, ev(2)])
            .await?;
        store
            .commit(
                ReadModelBatch::new("p", None, Position::new(3))
                    .with_writes(vec![ReadModelWrite::put("ns", b"k".to_vec(), big.clone())]),
            )
            .await?;
        store
            .save_snapshot(Snapshot::new(
                t.clone(),
                s.clone(),
                Version::new(3),
                2,
                Bytes::from(big.clone()),
            ))
            .await?;
    }
    let store = SledStore::open_path(dir.path())?;
    let got = store.get_event(&t, id).await?.expect("stored");
    assert_eq!(got.payload.as_ref(), big.as_slice());
    let all = store
        .read_all(ReadAll::starting_at(Position::START, 10))
        .await?;
    assert_eq!(all.events.len(), 3);
    assert_eq!(all.events[1].payload.as_ref(), big.as_slice());
    assert_eq!(
        store.get("ns", b"k").await?.unwrap().as_ref(),
        big.as_slice()
    );
    let snap = store.load_snapshot(&t, &s).await?.unwrap();
    assert_eq!((snap.version, snap.schema_version), (Version::new(3), 2));
    assert_eq!(snap.payload.as_ref(), big.as_slice());
    // Every stored sled value stays below the inline limit (nothing goes to unsynced blobs).
    drop(store);
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    for name in db.tree_names() {
        for item in db.open_tree(&name).unwrap().iter() {
            let (_, v) = item.unwrap();
            assert!(v.len() <= layout::MAX_INLINE, "value of {} bytes", v.len());
        }
    }
    let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    assert_eq!(blobs, 0, "sled wrote blob files");
    Ok(())
}

#[tokio::test]
async fn a_held_directory_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let first = SledStore::open_path(dir.path()).unwrap();
    let second = SledStore::open_path(dir.path()).unwrap_err();
    assert!(matches!(second, OpenError::Locked { .. }), "{second:?}");
    let msg = second.to_string();
    assert!(msg.contains("in use by another process"), "{msg}");
    // Once the holder is gone the directory opens again.
    drop(first);
    SledStore::open_path(dir.path()).unwrap();
}

#[tokio::test]
async fn a_corrupt_record_is_a_typed_error_with_its_position() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let (t, s) = ids();
    let first = ev(0);
    let first_id = first.event_id;
    {
        let store = SledStore::open_path(dir.path())?;
        // One append: positions 1..=3 share the page keyed by position 1.
        store
            .append_to(&t, &s, ExpectedVersion::Any, vec![first, ev(1), ev(2)])
            .await?;
        // Two more appends: positions 4 and 5 get a page each.
        store
            .append_to(&t, &s, ExpectedVersion::Any, vec![ev(3)])
            .await?;
        store
            .append_to(&t, &s, ExpectedVersion::Any, vec![ev(4)])
            .await?;
    }
    {
        // Damage records behind the store's back, through sled itself.
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = db.open_tree(layout::LOG_TREE).unwrap();
        let stored = log.get(layout::page_key(1)).unwrap().unwrap();
        let bytes = layout::get_value(&log, &layout::page_key(1), stored).unwrap();
        let page = layout::Page::parse(bytes.as_ref()).unwrap();
        assert_eq!(page.len(), 3);
        // The event at position 2 becomes garbage inside an intact page...
        let damaged = layout::encode_page([page.event(0), &b"\x01garbage\xff"[..], page.event(2)]);
        let mut batch = sled::Batch::default();
        layout::put_value(&mut batch, &layout::page_key(1), &damaged, 0);
        // ...and the page holding position 4 loses its framing.
        batch.insert(&layout::page_key(4), &b"\x00\x07"[..]);
        log.apply_batch(batch).unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open_path(dir.path())?;
    let at = |e: Error| match e {
        Error::Corruption { position, .. } => position,
        other => panic!("expected a corruption error, got {other:?}"),
    };
    let err = store.read_stream_forwards(&t, &s).await.unwrap_err();
    assert_eq!(at(err), Some(Position::new(2)));
    let err = store
        .read_stream(ReadStream::backwards(t.clone(), s.clone()).from(Version::new(3)))
        .await
        .unwrap_err();
    assert_eq!(at(err), Some(Position::new(2)));
    let err = store
        .read_all(ReadAll::starting_at(Position::START, 10))
        .await
        .unwrap_err();
    assert_eq!(at(err), Some(Position::new(2)));
    let err = store
        .read_all(ReadAll::starting_at(Position::new(3), 10))
        .await
        .unwrap_err();
    assert_eq!(at(err), Some(Position::new(4)));
    // Undamaged records still read fine.
    assert!(store.get_event(&t, first_id).await?.is_some());
    let one = store
        .read_stream(ReadStream::forwards(t.clone(), s.clone()).limit(1))
        .await?;
    assert_eq!(one.len(), 1);
    let page = store
        .read_all(ReadAll::starting_at(Position::new(3), 1))
        .await?;
    assert_eq!(page.events[0].position, Position::new(3));
    let page = store
        .read_all(ReadAll::starting_at(Position::new(5), 10))
        .await?;
    assert_eq!(page.events[0].position, Position::new(5));
    drop(store);

    // A damaged *last* page makes the next position unknowable: opening refuses, clearly.
    {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = db.open_tree(layout::LOG_TREE).unwrap();
        log.insert(layout::page_key(5), &b"\x00\x01"[..]).unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open_path(dir.path()).unwrap_err();
    assert!(
        matches!(err, OpenError::Corruption { position: 5, .. }),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn read_models_commit_with_their_checkpoint_and_survive_reopen() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let put = |k: &str, v: &str| {
        ReadModelWrite::put("timeline", k.as_bytes().to_vec(), v.as_bytes().to_vec())
    };
    {
        let store = SledStore::open_path(dir.path())?;
        store
            .commit(
                ReadModelBatch::new("tl", None, Position::new(5)).with_writes(vec![
                    put("a", "1"),
                    put("b", "2"),
                    put("c", "3"),
                ]),
            )
            .await?;
        // Clear then put within one batch: only the later put survives.
        store
            .commit(
                ReadModelBatch::new("tl", Some(Position::new(5)), Position::new(9)).with_writes(
                    vec![
                        put("d", "4"),
                        ReadModelWrite::clear("timeline"),
                        put("e", "5"),
                        ReadModelWrite::delete("timeline", b"zz".to_vec()),
                    ],
                ),
            )
            .await?;
        let stale = store
            .commit(
                ReadModelBatch::new("tl", Some(Position::new(5)), Position::new(10))
                    .with_writes(vec![put("x", "x")]),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(stale, Error::CheckpointMoved { actual: Some(p), .. } if p == Position::new(9))
        );
    }
    let store = SledStore::open_path(dir.path())?;
    assert_eq!(store.load_checkpoint("tl").await?, Some(Position::new(9)));
    let all = store
        .scan("timeline", KeyRange::default(), Direction::Forwards, 10)
        .await?;
    assert_eq!(all, vec![(Bytes::from("e"), Bytes::from("5"))]);
    assert_eq!(store.get("timeline", b"x").await?, None);
    store.save_checkpoint("other", Position::new(3)).await?;
    assert_eq!(
        store.load_checkpoint("other").await?,
        Some(Position::new(3))
    );
    Ok(())
}

#[tokio::test]
async fn every_durability_mode_keeps_a_clean_reopen() -> Result<(), Error> {
    for mode in [
        Durability::Fsync,
        Durability::Flush,
        Durability::Buffered { flush_every_ms: 10 },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (t, s) = ids();
        {
            let store = SledStore::open(SledOptions::new(dir.path()).durability(mode))?;
            assert_eq!(store.durability(), mode);
            for i in 0..10 {
                store
                    .append_to(&t, &s, ExpectedVersion::Any, vec![ev(i)])
                    .await?;
            }
        }
        // A clean shutdown (drop) flushes in every mode.
        let store = SledStore::open_path(dir.path())?;
        assert_eq!(
            store.stream_version(&t, &s).await?,
            Version::new(10),
            "{mode:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_groups_and_the_log_has_no_gaps() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open_path(dir.path())?);
    let t = TenantId::parse("acme").unwrap();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let s = StreamId::parse(format!("s-{w}")).unwrap();
            for i in 0..20 {
                store
                    .append_to(
                        &t,
                        &s,
                        ExpectedVersion::Exact(Version::new(i)),
                        vec![ev(i as usize)],
                    )
                    .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        task.await.unwrap()?;
    }
    let all = store
        .read_all_to_end(Position::START, Default::default())
        .await?;
    let positions: Vec<u64> = all.iter().map(|e| e.position.get()).collect();
    assert_eq!(positions, (1..=320).collect::<Vec<_>>());
    // Group commit: concurrent appends shared barriers.
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (320, 320));
    assert!(stats.groups <= stats.appends && stats.barriers <= stats.groups);
    assert!(
        stats.barriers < stats.appends,
        "16 concurrent appenders never shared a barrier: {stats:?}"
    );
    eprintln!("{stats:?}");
    Ok(())
}

#[tokio::test]
async fn temporary_stores_delete_their_directory_with_the_last_clone() -> Result<(), Error> {
    let store = SledStore::temporary(Durability::Fsync)?;
    let path = store.path().to_path_buf();
    let (t, s) = ids();
    store
        .append_to(&t, &s, ExpectedVersion::Any, vec![ev(0)])
        .await?;
    assert!(path.join("db").exists());
    let clone = store.clone();
    drop(store);
    assert!(path.exists(), "a clone is still alive");
    assert_eq!(clone.stream_version(&t, &s).await?, Version::new(1));
    drop(clone);
    assert!(!path.exists());
    Ok(())
}

#[tokio::test]
async fn read_model_keys_and_namespaces_have_documented_limits() -> Result<(), Error> {
    use tracktrace_store_sled::{MAX_NAMESPACE_LEN, MAX_READ_MODEL_KEY_LEN};
    let store = SledStore::temporary(Durability::Flush)?;
    let batch = |ns: String, key: Vec<u8>| {
        ReadModelBatch::new("p", None, Position::new(1)).with_writes(vec![ReadModelWrite::put(
            ns,
            key,
            b"v".to_vec(),
        )])
    };
    let long_key = vec![b'k'; MAX_READ_MODEL_KEY_LEN + 1];
    let err = store
        .commit(batch("ns".into(), long_key))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "writes[0].key"),
        "{err:?}"
    );
    let long_ns = "n".repeat(MAX_NAMESPACE_LEN + 1);
    let err = store
        .commit(batch(long_ns, b"k".to_vec()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "writes[0].ns"),
        "{err:?}"
    );
    // Nothing was written, the checkpoint did not move; the longest allowed key works.
    assert_eq!(store.load_checkpoint("p").await?, None);
    let key = vec![b'k'; MAX_READ_MODEL_KEY_LEN];
    store.commit(batch("ns".into(), key.clone())).await?;
    assert_eq!(store.get("ns", &key).await?, Some(Bytes::from("v")));
    Ok(())
}

/// The writer's queue is bounded (`SledOptions::max_pending`): beyond it an append fails at
/// once with `Overloaded` and writes nothing; every acknowledged append is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_writer_queue_refuses_appends_without_writing() -> Result<(), Error> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(
        SledOptions::new(dir.path()).max_pending(1),
    )?);
    let t = TenantId::parse("acme").unwrap();
    let mut tasks = Vec::new();
    for w in 0..200 {
        let (store, t) = (store.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let s = StreamId::parse(format!("s-{w}")).unwrap();
            store
                .append_to(&t, &s, ExpectedVersion::NoStream, vec![ev(w)])
                .await
        }));
    }
    let (mut stored, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => stored += 1,
            Err(e @ Error::Overloaded { .. }) => {
                assert!(e.is_retryable() && e.retry_after().is_some());
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(refused > 0, "200 appenders never found a queue of 1 full");
    let all = store
        .read_all_to_end(Position::START, Default::default())
        .await?;
    assert_eq!(all.len(), stored, "every acknowledged append, nothing else");
    Ok(())
}
