//! Saga deadline across a real process crash, on sled.
//!
//! A child process (this test binary re-executed with env `TRACKTRACE_SAGA_CHILD=<dir>`) runs the
//! order saga over a sled store holding an `OrderPlaced` event: it records the reaction
//! (reservation dispatched, payment deadline scheduled), prints `SCHEDULED`, and idles. The
//! parent kills it with SIGKILL before the deadline is due, reopens the store in a new runner,
//! and waits: the deadline fires exactly once and its command is sent once. A further restart
//! fires nothing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tracktrace_conformance::runtime::{OrderCommand, OrderSaga, RecordingDispatcher};
use tracktrace_core::{
    EventStoreExt, ExpectedVersion, NewEvent, SagaRecord, SagaRunner, StreamId, TenantId,
};

mod crash_common;

use crash_common::{open_sled, runtime};

const CHILD_ENV: &str = "TRACKTRACE_SAGA_CHILD";

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("saga_deadline_survives_kill_9: test");
        return;
    }
    parent();
    println!("test saga_deadline_survives_kill_9 ... ok");
}

fn saga() -> OrderSaga {
    OrderSaga {
        payment_timeout: Duration::from_millis(800),
    }
}

fn tenant() -> TenantId {
    TenantId::parse("acme").expect("tenant")
}

fn child(dir: &Path) {
    runtime().block_on(async {
        let store = Arc::new(open_sled(dir));
        let d = RecordingDispatcher::new(store.clone());
        let mut runner = SagaRunner::new(store.clone(), store.clone(), saga(), d);
        let p = runner.run_once().await.expect("run_once");
        assert_eq!(p.triggers, 1);
        println!("SCHEDULED");
        // Stay alive (holding the store) until killed.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

fn parent() {
    let dir = std::env::temp_dir().join(format!(
        "tracktrace-saga-crash-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("test directory");
    let rt = runtime();
    rt.block_on(async {
        let store = open_sled(&dir);
        let s = StreamId::parse("Order-o1").expect("stream");
        store
            .append_to(
                &tenant(),
                &s,
                ExpectedVersion::NoStream,
                vec![NewEvent::json("OrderPlaced", &serde_json::json!({}))],
            )
            .await
            .expect("append trigger");
    });
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let scheduled = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "SCHEDULED");
    child.kill().expect("kill -9 the child");
    let _ = child.wait();
    assert!(scheduled, "the child recorded the saga's reaction");

    rt.block_on(async {
        let store = Arc::new(open_sled(&dir));
        let d = RecordingDispatcher::new(store.clone());
        let mut runner = SagaRunner::new(store.clone(), store.clone(), saga(), d.clone());
        let mut fired = 0;
        for _ in 0..500 {
            fired += runner.run_once().await.expect("run_once").deadlines_fired;
            if fired > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            fired, 1,
            "the deadline scheduled before the crash fired after it"
        );
        let cancels = d
            .sent()
            .iter()
            .filter(|(_, c)| matches!(c, OrderCommand::Cancel(_)))
            .count();
        assert_eq!(cancels, 1, "its command was sent once");
        assert!(
            !d.sent()
                .iter()
                .any(|(_, c)| matches!(c, OrderCommand::Reserve(_))),
            "the reservation the child had sent is not sent again"
        );
    });
    // Another restart: nothing fires again.
    rt.block_on(async {
        let store = Arc::new(open_sled(&dir));
        let d = RecordingDispatcher::new(store.clone());
        let mut runner = SagaRunner::new(store.clone(), store.clone(), saga(), d.clone());
        let p = runner.run_once().await.expect("run_once");
        assert_eq!(p.deadlines_fired, 0);
        assert!(d.sent().is_empty());
        let records = runner.records(&tenant(), "o1").await.expect("records");
        let fired = records
            .iter()
            .filter(|r| matches!(r, SagaRecord::DeadlineFired { .. }))
            .count();
        assert_eq!(fired, 1, "exactly one DeadlineFired: {records:?}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
