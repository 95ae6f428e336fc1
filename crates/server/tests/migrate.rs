//! `tracktrace-server migrate`: a sled store of 100,000 events over 10,000 streams copied into
//! PostgreSQL (a fresh schema), killed with SIGKILL part-way and run again; afterwards `verify`
//! passes on the target (run by `migrate` itself) and the target holds every source event
//! exactly once, with its stream and version.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, StreamId, TenantId,
};
use tracktrace_store_sled::{Durability, SledOptions, SledStore};

const STREAMS: usize = 10_000;

/// Every event of `store` by id: (tenant, stream, version, payload).
async fn all(
    store: &dyn EventStore,
) -> std::collections::BTreeMap<tracktrace_core::EventId, (String, String, u64, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    let mut at = Position::START;
    loop {
        let page = store
            .read_all(tracktrace_core::ReadAll::starting_at(at, 5000))
            .await
            .unwrap();
        if page.events.is_empty() {
            break;
        }
        for e in page.events {
            let v = (
                e.tenant.to_string(),
                e.stream.to_string(),
                e.version.get(),
                e.payload.to_vec(),
            );
            assert!(out.insert(e.event_id, v).is_none(), "{} twice", e.event_id);
        }
        at = page.next;
    }
    out
}

const PER_STREAM: usize = 10;

/// 100,000 events: 5 rounds over 10,000 streams of 2 tenants, two events per append (so the
/// log interleaves the streams as live traffic would).
async fn fill(data_dir: &Path) {
    let store = std::sync::Arc::new(
        SledStore::open(SledOptions::new(data_dir.join("events")).durability(Durability::Flush))
            .unwrap(),
    );
    for round in 0..PER_STREAM / 2 {
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..8 {
            let store = store.clone();
            tasks.spawn(async move {
                for s in (w..STREAMS).step_by(8) {
                    let tenant =
                        TenantId::parse(if s % 2 == 0 { "acme" } else { "iberia" }).unwrap();
                    let stream = StreamId::parse(format!("Entity-Bag-{s:05}")).unwrap();
                    store
                        .append_to(
                            &tenant,
                            &stream,
                            ExpectedVersion::Any,
                            vec![
                                NewEvent::json("SEEN", &serde_json::json!({ "round": round })),
                                NewEvent::json("LEFT", &serde_json::json!({ "round": round })),
                            ],
                        )
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_migrates_to_postgres_resuming_after_a_kill() {
    let url = common::service_url(
        "TRACKTRACE_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    if !common::reachable("TRACKTRACE_TEST_DATABASE_URL", &url).await {
        return;
    }
    let schema = format!("tt_migrate_{}_{}", std::process::id(), fastrand::u32(..));
    let dir = tempfile::tempdir().unwrap();
    let (source, target_dir) = (dir.path().join("source"), dir.path().join("target"));
    let started = std::time::Instant::now();
    fill(&source).await;
    eprintln!("filled in {:?}", started.elapsed());
    let args = [
        "migrate",
        "--from-data-dir",
        source.to_str().unwrap(),
        "--data-dir",
        target_dir.to_str().unwrap(),
        "--store",
        &url,
        "--pg-schema",
        &schema,
        "--progress-secs",
        "0",
    ];

    // First run: killed once it has copied a few pages.
    let mut first = Command::new(common::BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let mut pages = 0;
    for line in lines.by_ref() {
        if line.unwrap().starts_with("migrate: ") {
            pages += 1;
            if pages == 5 {
                break;
            }
        }
    }
    assert_eq!(pages, 5, "the first run reported its pages");
    first.kill().unwrap();
    let _ = first.wait();

    eprintln!("first run killed at {:?}", started.elapsed());
    // Second run: resumes, finishes, verifies.
    let out = Command::new(common::BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("second run done at {:?}: {stdout}", started.elapsed());
    let resumed_from = stdout
        .lines()
        .find_map(|l| l.strip_prefix("migrated "))
        .and_then(|l| l.split(" from position ").nth(1))
        .and_then(|l| l.split(':').next())
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(resumed_from > 0, "the second run resumed: {stdout}");
    assert!(
        stdout.contains(&format!(
            "verified {} events in {STREAMS} streams",
            STREAMS * PER_STREAM
        )) && stdout.contains(": 0 finding(s)"),
        "{stdout}"
    );

    // Every source event once in the target, at its stream and version: both logs read in
    // full and compared by event id.
    let target = tracktrace_store_postgres::PgStore::connect_with(
        tracktrace_store_postgres::PgStoreOptions::new(&url).schema(&schema),
    )
    .await
    .unwrap();
    let src = SledStore::open(SledOptions::new(source.join("events"))).unwrap();
    let source_events = all(&src).await;
    let target_events = all(&target).await;
    assert_eq!(source_events.len(), STREAMS * PER_STREAM);
    assert_eq!(target_events.len(), source_events.len(), "each event once");
    assert_eq!(target_events, source_events);
    let seen = target_events.len();
    eprintln!("checked in {:?}", started.elapsed());
    assert_eq!(seen, STREAMS * PER_STREAM);
    let _ = target.drop_schema().await;
}
