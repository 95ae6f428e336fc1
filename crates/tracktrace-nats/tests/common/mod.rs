//! Helpers shared by the JetStream integration tests (also included by tracktrace-server's
//! propagation tests, hence `async_nats` through `tracktrace_nats`).
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use tracktrace_core::RecordedEvent;
use tracktrace_nats::async_nats::{
    self,
    jetstream::{self, consumer, stream},
};
use tracktrace_nats::publisher::OutboundMessage;

/// The Debian package's server binary (the machine's NATS service runs it).
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub fn nats_url() -> String {
    std::env::var("TRACKTRACE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Connects to the shared NATS, or skips (outside CI) / fails (under CI=true).
pub async fn shared_nats() -> Option<async_nats::Client> {
    let url = nats_url();
    match async_nats::connect(&url).await {
        Ok(c) => Some(c),
        Err(e) if in_ci() => panic!("NATS at {url} unreachable under CI=true: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: NATS at {url} unreachable ({e}); set TRACKTRACE_TEST_NATS_URL");
            None
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id(), fastrand::u32(..))
}

/// The mapper the tests use: subject `<prefix>.<tenant>.<stream>.<type>`, entity = stream.
pub fn mapper(prefix: String) -> impl Fn(&RecordedEvent) -> Option<OutboundMessage> + Send + Sync {
    move |e: &RecordedEvent| {
        Some(OutboundMessage {
            subject: format!("{prefix}.{}.{}.{}", e.tenant, e.stream, e.event_type),
            payload: e.payload.clone(),
            headers: vec![
                ("Tt-Stream".into(), e.stream.to_string()),
                ("Tt-Version".into(), e.version.to_string()),
            ],
            ordering_key: e.stream.to_string(),
        })
    }
}

/// A stream on `<prefix>.>` with a two-minute de-duplication window.
pub async fn create_stream(js: &jetstream::Context, name: &str, prefix: &str) {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// Every message of `stream`, as (msg id, entity, version), in stream order; reads up to
/// `expected` messages, then waits briefly for one more (which would be a duplicate).
pub async fn read_all_messages(
    js: &jetstream::Context,
    stream: &str,
    expected: usize,
) -> Vec<(String, String, u64)> {
    let s = js.get_stream(stream).await.expect("stream");
    let c = s
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut msgs = c.messages().await.expect("messages");
    let mut out = Vec::new();
    loop {
        let wait = if out.len() < expected { 5000 } else { 500 };
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(wait), msgs.next()).await
        else {
            break;
        };
        let m = m.expect("message");
        let h = m.headers.clone().unwrap_or_default();
        let get = |k: &str| h.get(k).map(|v| v.to_string()).unwrap_or_default();
        out.push((
            get("Nats-Msg-Id"),
            get("Tt-Stream"),
            get("Tt-Version").parse().unwrap_or(0),
        ));
        if out.len() > expected {
            break;
        }
    }
    out
}

/// Asserts `msgs` holds exactly `total` messages, each event once, every entity's versions
/// 1, 2, … in stream order; returns the number of entities.
pub fn assert_once_in_entity_order(msgs: &[(String, String, u64)], total: usize) -> usize {
    assert_eq!(msgs.len(), total, "exactly {total} messages on the stream");
    let ids: HashSet<&String> = msgs.iter().map(|m| &m.0).collect();
    assert_eq!(ids.len(), total, "each event once");
    let mut per_entity: HashMap<&str, Vec<u64>> = HashMap::new();
    for (_, entity, version) in msgs {
        per_entity.entry(entity).or_default().push(*version);
    }
    for (entity, versions) in &per_entity {
        let want: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, &want, "order of {entity}");
    }
    per_entity.len()
}

/// A private nats-server with JetStream on a free port, which the test can stop and restart.
pub struct PrivateNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Option<Self> {
        if !Path::new(NATS_SERVER).exists() {
            assert!(!in_ci(), "{NATS_SERVER} missing under CI=true");
            eprintln!("SKIPPED: {NATS_SERVER} not found");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let mut n = Self {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        n.restart();
        Some(n)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not start");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}
