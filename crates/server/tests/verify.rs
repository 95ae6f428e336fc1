//! `tracktrace-server verify` as a process, on the embedded store: a sound store passes (exit
//! 0, with progress lines and a summary), and a store with one id-index entry removed behind
//! its back fails (non-zero exit, the finding names the event), in full mode; the quick mode
//! (no index lookups) does not look there.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use tracktrace_core::{EventStoreExt, ExpectedVersion, NewEvent, StreamId, TenantId};
use tracktrace_store_sled::{SledOptions, SledStore, layout};

/// 50 events over 5 streams of one tenant in `<dir>/events` (the server's layout); returns
/// the id of the 17th.
async fn fill(dir: &Path) -> tracktrace_core::EventId {
    let store = SledStore::open(SledOptions::new(dir.join("events"))).unwrap();
    let tenant = TenantId::parse("acme").unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        let stream = StreamId::parse(format!("Entity-Bag-{}", i % 5)).unwrap();
        let out = store
            .append_to(
                &tenant,
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json("SEEN", &serde_json::json!({ "i": i }))],
            )
            .await
            .unwrap();
        ids.push(out.events[0].event_id);
    }
    ids[16]
}

fn verify(dir: &Path, extra: &[&str]) -> Output {
    Command::new(common::BIN)
        .arg("verify")
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(["--page-size", "7", "--progress-secs", "0"])
        .args(extra)
        .env_remove("TRACKTRACE_STORE")
        .output()
        .expect("run tracktrace-server verify")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn verify_passes_a_sound_store_and_fails_a_damaged_index() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = fill(dir.path()).await;

    let ok = verify(dir.path(), &[]);
    let (out, err) = (text(&ok.stdout), text(&ok.stderr));
    assert!(ok.status.success(), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("verified 50 events in 5 streams") && out.contains(": 0 finding(s)"),
        "{out}"
    );
    assert!(
        err.contains("verify: ") && err.contains("events/s"),
        "progress lines: {err}"
    );

    // Remove the 17th event's id-index entry with plain sled.
    {
        let db = sled::open(dir.path().join("events")).unwrap();
        let log = db.open_tree(layout::LOG_TREE).unwrap();
        let key = layout::id_key("acme", damaged.as_uuid().as_bytes());
        assert!(log.remove(key).unwrap().is_some(), "the entry existed");
        db.flush().unwrap();
    }

    let bad = verify(dir.path(), &[]);
    let out = text(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "stdout: {out}");
    assert!(
        out.contains(&format!("id index: event acme/{damaged}")) && out.contains("not found"),
        "{out}"
    );
    assert!(out.contains(": 1 finding(s)"), "{out}");

    // The quick mode checks the log and the versions only.
    let quick = verify(dir.path(), &["--quick"]);
    assert!(quick.status.success(), "{}", text(&quick.stdout));
}
