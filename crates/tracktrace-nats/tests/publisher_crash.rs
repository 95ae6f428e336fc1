//! The publisher killed with `kill -9` mid-stream and restarted: nothing is lost, and the
//! redelivered tail is dropped by JetStream's de-duplication on the event id.
//!
//! The publisher runs in a child process (this test binary re-executed with
//! `TT_NATS_CRASH_CHILD` set) over a durable sled store that holds both the events and the
//! publisher's checkpoint.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tracktrace_core::{EventStore, EventStoreExt, ExpectedVersion, NewEvent, StreamId, TenantId};
use tracktrace_nats::publisher::{Publisher, PublisherConfig};
use tracktrace_store_sled::SledStore;

mod common;

use common::{
    assert_once_in_entity_order, create_stream, in_ci, mapper, nats_url, read_all_messages,
};

const EVENTS: usize = 3000;
const ENTITIES: usize = 40;

/// Child mode: publish everything in the store, then print `done` and exit.
#[test]
fn child_publisher_process() {
    let (Ok(dir), Ok(prefix)) = (
        std::env::var("TT_NATS_CRASH_CHILD"),
        std::env::var("TT_NATS_PREFIX"),
    ) else {
        return; // not the child: nothing to do
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let store = Arc::new(SledStore::open_path(&dir).expect("open sled"));
        let client = async_nats::connect(nats_url()).await.expect("connect");
        let mut cfg = PublisherConfig::new("crash-publisher");
        cfg.batch_size = 64;
        let publisher = Publisher::spawn(
            store.clone() as Arc<dyn EventStore>,
            store.clone(),
            jetstream::new(client),
            Arc::new(mapper(prefix)),
            cfg,
        );
        let head = store.head().await.expect("head");
        assert!(
            publisher.wait_for(head, Duration::from_secs(60)).await,
            "{:?}",
            publisher.status()
        );
        println!("done {:?}", publisher.status());
    });
}

async fn stream_count(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_are_suppressed() {
    let client = match async_nats::connect(nats_url()).await {
        Ok(c) => c,
        Err(e) if in_ci() => panic!("NATS unreachable under CI=true: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: NATS unreachable ({e}); set TRACKTRACE_TEST_NATS_URL");
            return;
        }
    };
    let js = jetstream::new(client);
    let prefix = format!("ttcrash{}x{}", std::process::id(), fastrand::u32(..));
    let name = prefix.to_uppercase();
    create_stream(&js, &name, &prefix).await;

    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = SledStore::open_path(dir.path()).expect("open");
        let tenant = TenantId::parse("acme").expect("tenant");
        for chunk in 0..EVENTS / 100 {
            for e in 0..ENTITIES {
                let stream = StreamId::parse(format!("Bag-{e}")).expect("stream");
                let events: Vec<NewEvent> = (0..100 / ENTITIES.min(100))
                    .map(|i| NewEvent::json("SCANNED", &serde_json::json!({"c": chunk, "i": i})))
                    .collect();
                if events.is_empty() {
                    continue;
                }
                store
                    .append_to(&tenant, &stream, ExpectedVersion::Any, events)
                    .await
                    .expect("append");
            }
        }
    }
    let total = {
        let store = SledStore::open_path(dir.path()).expect("reopen");
        store
            .read_all_to_end(tracktrace_core::Position::START, Default::default())
            .await
            .expect("read")
            .len()
    };

    let exe = std::env::current_exe().expect("current exe");
    let child = |_: ()| {
        Command::new(&exe)
            .args([
                "--exact",
                "child_publisher_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TT_NATS_CRASH_CHILD", dir.path())
            .env("TT_NATS_PREFIX", &prefix)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child")
    };

    // Round 1: kill -9 once part of the log is published.
    let mut first = child(());
    let target = (total / 3) as u64;
    let mut killed_at = 0;
    for _ in 0..600 {
        killed_at = stream_count(&js, &name).await;
        if killed_at >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().expect("kill -9"); // SIGKILL
    let _ = first.wait();
    assert!(
        killed_at > 0 && (killed_at as usize) < total,
        "killed mid-stream at {killed_at} of {total}"
    );

    // Round 2: restart and let it finish.
    let second = child(());
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("done"),
        "restarted publisher: {stdout}"
    );

    // Every event exactly once (nothing more: a duplicate would be message total + 1), in
    // per-entity order.
    let msgs = read_all_messages(&js, &name, total).await;
    assert_once_in_entity_order(&msgs, total);
    eprintln!(
        "killed at {killed_at} of {total} published; restart completed without loss or duplicate"
    );
    let _ = js.delete_stream(&name).await;
}
