//! `tracktrace-server export` / `import` as processes on the embedded store: export → import
//! into an empty store → `verify` passes and the events are the same (ids, streams, versions,
//! types, metadata, payloads, log order); importing again stores nothing; an interrupted export
//! (a torn last line) resumes to the same file; bad lines go to the reject file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tracktrace_core::{EventStoreExt, ExpectedVersion, Metadata, NewEvent, StreamId, TenantId};
use tracktrace_store_sled::{SledOptions, SledStore};

/// 60 events: 2 tenants × 3 streams, one with a text payload, metadata and a dedup key.
async fn fill(data_dir: &Path) {
    let store = SledStore::open(SledOptions::new(data_dir.join("events"))).unwrap();
    for i in 0..60 {
        let tenant = TenantId::parse(if i % 2 == 0 { "acme" } else { "iberia" }).unwrap();
        let stream = StreamId::parse(format!("Entity-Bag-{}", i % 3)).unwrap();
        let event = if i == 7 {
            NewEvent::new("NOTE", "text/plain", &b"plain \x00 bytes"[..])
                .with_dedup_key("note-7")
                .with_metadata(
                    Metadata::new()
                        .with_correlation_id("corr-1")
                        .with_header("x-source", "scanner 4"),
                )
        } else {
            NewEvent::json("SEEN", &serde_json::json!({ "i": i, "at": "MAD" }))
        };
        store
            .append_to(&tenant, &stream, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(common::BIN)
        .args(args)
        .env_remove("TRACKTRACE_STORE")
        .output()
        .expect("run tracktrace-server")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// The lines of an export without what the target store assigns (position, recordedAt).
fn portable(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("position");
            o.remove("recordedAt");
            v
        })
        .collect()
}

#[tokio::test]
async fn export_import_verify_round_trip_is_idempotent_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fill(&a).await;
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let file = dir.path().join("a.ndjson");
    let rejects = dir.path().join("rejects.ndjson");
    let file_s = file.to_str().unwrap();
    let rejects_s = rejects.to_str().unwrap();

    let o = run(&[
        "export",
        "--data-dir",
        a_s,
        "--output",
        file_s,
        "--page-size",
        "7",
        "--progress-secs",
        "0",
    ]);
    let err = text(&o.stderr);
    ok(o);
    assert!(
        err.contains("exported 60 events") && err.contains("events/s"),
        "{err}"
    );
    let exported = std::fs::read_to_string(&file).unwrap();
    assert_eq!(exported.lines().count(), 60);
    let note: Value = serde_json::from_str(exported.lines().nth(7).unwrap()).unwrap();
    assert_eq!(note["payloadHex"], "706c61696e2000206279746573"); // "plain \0 bytes"
    assert_eq!(note["dedupKey"], "note-7");
    assert_eq!(note["metadata"]["headers"]["x-source"], "scanner 4");

    // Into an empty store; it verifies and holds the same events.
    let import_into_b = || {
        ok(run(&[
            "import",
            file_s,
            "--data-dir",
            b_s,
            "--rejects",
            rejects_s,
        ]))
    };
    let out = import_into_b();
    assert!(
        out.contains("imported 60 lines: 60 stored, 0 already there, 0 rejected"),
        "{out}"
    );
    let out = ok(run(&["verify", "--data-dir", b_s]));
    assert!(
        out.contains("verified 60 events in 6 streams") && out.contains(": 0 finding(s)"),
        "{out}"
    );
    let again = dir.path().join("b.ndjson");
    ok(run(&[
        "export",
        "--data-dir",
        b_s,
        "--output",
        again.to_str().unwrap(),
    ]));
    assert_eq!(portable(&file), portable(&again));

    // Twice: nothing new.
    let out = import_into_b();
    assert!(
        out.contains("60 lines: 0 stored, 60 already there, 0 rejected"),
        "{out}"
    );

    // An interrupted export: 30 complete lines and half a line; the rerun completes the file.
    let cut: String = exported
        .lines()
        .take(30)
        .map(|l| format!("{l}\n"))
        .collect();
    let torn = format!("{cut}{}", &exported.lines().nth(30).unwrap()[..20]);
    std::fs::write(&file, torn).unwrap();
    let o = run(&["export", "--data-dir", a_s, "--output", file_s]);
    let err = text(&o.stderr);
    ok(o);
    assert!(err.contains("exported 30 events"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), exported);

    // One tenant only.
    let out = ok(run(&["export", "--data-dir", a_s, "--tenant", "iberia"]));
    assert_eq!(out.lines().count(), 30);
    assert!(out.lines().all(|l| l.contains("\"tenant\":\"iberia\"")));
}

#[tokio::test]
async fn lines_that_cannot_be_imported_go_to_the_reject_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fill(&a).await;
    let file = dir.path().join("a.ndjson");
    ok(run(&[
        "export",
        "--data-dir",
        a.to_str().unwrap(),
        "--output",
        file.to_str().unwrap(),
    ]));
    let mut lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    // The last events of two streams (a refused event would hold back its stream's later
    // ones): line 59's event claims version 12 of a stream at version 9; line 60 is not JSON.
    let mut v: Value = serde_json::from_str(&lines[58]).unwrap();
    assert_eq!(v["version"], 10);
    v["version"] = 12.into();
    lines[58] = v.to_string();
    lines[59] = "{not json".into();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let rejects = dir.path().join("rejects.ndjson");
    let o = run(&[
        "import",
        file.to_str().unwrap(),
        "--data-dir",
        b.to_str().unwrap(),
        "--rejects",
        rejects.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let rejected: Vec<Value> = std::fs::read_to_string(&rejects)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0]["line"], 59);
    assert!(
        rejected[0]["error"].as_str().unwrap().contains("conflict"),
        "{rejected:?}"
    );
    assert_eq!(rejected[1]["line"], 60);
    assert!(rejected[1]["error"].as_str().unwrap().contains("not JSON"));
    assert!(
        text(&o.stdout).contains("60 lines: 58 stored"),
        "{}",
        text(&o.stdout)
    );
}

#[tokio::test]
async fn export_by_recorded_time() {
    let dir = tempfile::tempdir().unwrap();
    let split = {
        let store = SledStore::open(SledOptions::new(dir.path().join("events"))).unwrap();
        let tenant = TenantId::parse("acme").unwrap();
        let stream = StreamId::parse("Entity-Bag-1").unwrap();
        let append = |n: u32| {
            store.append_to(
                &tenant,
                &stream,
                ExpectedVersion::Any,
                (0..n)
                    .map(|i| NewEvent::json("SEEN", &serde_json::json!({ "i": i })))
                    .collect(),
            )
        };
        append(3).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let split = tracktrace_core::Timestamp::now();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        append(2).await.unwrap();
        split
    };
    let at = tracktrace_domain::format_micros(split.unix_micros());
    let d = dir.path().to_str().unwrap();
    let since = ok(run(&["export", "--data-dir", d, "--since", &at]));
    let until = ok(run(&["export", "--data-dir", d, "--until", &at]));
    let versions = |out: &str| -> Vec<u64> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["version"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(versions(&since), vec![4, 5]);
    assert_eq!(versions(&until), vec![1, 2, 3]);
    let bad = run(&["export", "--data-dir", d, "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("--since"),
        "{}",
        text(&bad.stderr)
    );
}
