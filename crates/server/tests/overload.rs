//! Overload by design: 2,000 concurrent connections against a server that handles at most 64
//! requests at once. Every connection is open before the first request is sent, then all send
//! together. Each answer must be a success (201 for a capture, 200 for a trace) or
//! 503 + `Retry-After` (shed); none may take longer than the request timeout (plus the time a
//! 2-core machine needs to schedule 2,000 clients); the server's peak RSS stays under a stated
//! bound; afterwards it serves normally and every acknowledged capture is stored.
mod common;

use std::time::{Duration, Instant};

use common::{Server, call, cli_token, event};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 2_000;
const MAX_IN_FLIGHT: &str = "64";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// What the test allows on top of the request timeout: connection set-up is done before the
/// clock starts, but 2,000 client tasks and the server share two cores.
const SCHEDULING_SLACK: Duration = Duration::from_secs(3);
/// Peak resident memory the server may reach (the limits bound it: 64 requests in flight,
/// bounded store queues, 64 KiB event bodies; measured 103 MiB peak in a debug build on sled).
const MAX_RSS_KIB: u64 = 256 * 1024;

/// One raw HTTP/1.1 exchange on an already open connection: (status, Retry-After, body).
async fn exchange(
    mut s: TcpStream,
    request: Vec<u8>,
) -> std::io::Result<(u16, Option<String>, String)> {
    s.write_all(&request).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.trim().to_owned());
    Ok((status, retry, body.to_owned()))
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_are_served_or_shed_never_hung() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let timeout_ms = REQUEST_TIMEOUT.as_millis().to_string();
    let server = Server::start(
        dir.path(),
        "overload",
        &[
            "--data-dir",
            &data_s,
            "--max-in-flight",
            MAX_IN_FLIGHT,
            "--request-timeout-ms",
            &timeout_ms,
        ],
    );
    let addr = server.addr.clone();
    let common = ["--data-dir", data_s.as_str()];
    let token = cli_token(&common, &addr, "acme", "events:write,trace:read");
    // The 50 entities exist (a trace of an unknown entity is a 404).
    for e in 0..50 {
        let c = call(
            &addr,
            "POST",
            "/api/v1/events",
            Some(&token),
            Some(&event(
                &format!("OV{e}"),
                "BagSeen",
                "2026-11-28T09:00:00Z",
                "MAD",
            )),
        )
        .await;
        assert_eq!(c.status, 201, "{}", String::from_utf8_lossy(&c.body));
    }
    let rss_before = peak_rss_kib(server.child.id());

    // Every connection open first.
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        conns.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for (i, conn) in conns.into_iter().enumerate() {
        // Nine in ten capture (on 50 entities), one in ten reads a trace.
        let request = if i % 10 == 9 {
            format!(
                "GET /api/v1/trace/OV{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                 Authorization: Bearer {token}\r\n\r\n",
                i % 50
            )
            .into_bytes()
        } else {
            let mut ev = event(
                &format!("OV{}", i % 50),
                "BagSeen",
                "2026-11-28T10:00:00Z",
                "MAD",
            );
            ev["eventId"] = json!(uuid::Uuid::now_v7().to_string());
            let body = ev.to_string();
            format!(
                "POST /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                 Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let t = Instant::now();
            let r = tokio::time::timeout(REQUEST_TIMEOUT * 10, exchange(conn, request)).await;
            (i, r, t.elapsed())
        }));
    }
    let mut stored = Vec::new();
    let (mut served, mut shed, mut slowest) = (0usize, 0usize, Duration::ZERO);
    for task in tasks {
        let (i, r, took) = task.await.unwrap();
        let (status, retry, body) = r
            .unwrap_or_else(|_| panic!("request {i} hung for {:?}", REQUEST_TIMEOUT * 10))
            .unwrap_or_else(|e| panic!("request {i}: connection failed: {e}"));
        slowest = slowest.max(took);
        assert!(
            took <= REQUEST_TIMEOUT + SCHEDULING_SLACK,
            "request {i} took {took:?} (request timeout {REQUEST_TIMEOUT:?})"
        );
        match status {
            201 | 200 => {
                served += 1;
                if status == 201 {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    stored.push(v["eventId"].as_str().unwrap().to_owned());
                }
            }
            503 => {
                shed += 1;
                let secs: u64 = retry
                    .unwrap_or_else(|| panic!("request {i}: 503 without Retry-After: {body}"))
                    .parse()
                    .expect("Retry-After in seconds");
                assert!(secs >= 1, "Retry-After {secs}");
                assert!(body.contains("/problems/"), "request {i}: 503 body {body}");
            }
            other => panic!("request {i} answered {other}: {body}"),
        }
    }
    let rss = peak_rss_kib(server.child.id());
    eprintln!(
        "{CONNECTIONS} connections, max in flight {MAX_IN_FLIGHT}: {served} served, {shed} shed \
         (503), slowest {} ms; peak RSS {} MiB (before the burst {} MiB)",
        slowest.as_millis(),
        rss / 1024,
        rss_before / 1024
    );
    assert_eq!(served + shed, CONNECTIONS);
    assert!(
        shed > 0,
        "the burst never exceeded the in-flight limit: nothing was shed"
    );
    assert!(served > 0, "nothing was served during the burst");
    assert!(
        rss < MAX_RSS_KIB,
        "peak RSS {} KiB over {MAX_RSS_KIB} KiB",
        rss
    );

    // Afterwards the server serves normally, and every acknowledged capture is stored.
    let c = call(
        &addr,
        "POST",
        "/api/v1/events",
        Some(&token),
        Some(&event("OV-after", "BagSeen", "2026-11-28T11:00:00Z", "MAD")),
    )
    .await;
    assert_eq!(c.status, 201, "{}", String::from_utf8_lossy(&c.body));
    let head = c.json()["position"].as_u64().unwrap();
    let mut seen = std::collections::HashSet::new();
    for e in 0..50 {
        let r = call(
            &addr,
            "GET",
            &format!("/api/v1/trace/OV{e}?limit=1000&minPosition={head}"),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        for ev in r.json()["events"].as_array().unwrap() {
            seen.insert(ev["eventId"].as_str().unwrap().to_owned());
        }
    }
    for id in &stored {
        assert!(
            seen.contains(id),
            "capture {id} was acknowledged but is not in its trace"
        );
    }
}
