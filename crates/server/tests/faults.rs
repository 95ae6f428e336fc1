//! Fault injection with real processes: the `tracktrace-server` binary against services the
//! test starts itself on private loopback ports (never the machine's shared ones), which it
//! freezes, kills, stops and restarts:
//! - Redis (the trace view cache) down at start, frozen (`SIGSTOP`) and killed: traces are
//!   served from the read model fast, `/readyz` reports the cache degraded, and the cache is
//!   used again once Redis is back;
//! - PostgreSQL (a cluster `initdb` makes in a temp dir) with its connections killed and then
//!   stopped: captures and traces answer 503 + `Retry-After` within 2 s, no acknowledged capture
//!   is lost, and the service is back within 5 s of PostgreSQL returning;
//! - a full disk under sled (a small tmpfs): captures answer 507 with a clear problem, nothing
//!   is corrupted, captures work again once space is freed, and every acknowledged event is
//!   readable, also after a restart.
//!
//! (NATS killed mid-publication is `propagation.rs`'s outage test: captures unaffected,
//! publishers resume without loss or duplicate.)
//!
//! Timing bounds here are liveness bounds from the issue (a trace within 200 ms while the cache
//! is gone, a 503 within 2 s, back within 5 s): generous against a healthy 2-core machine,
//! where each of these takes milliseconds.

mod common;

use std::path::Path;
use std::process::Command;
#[cfg(feature = "redis")]
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[cfg(feature = "redis")]
use serde_json::Value;
use serde_json::json;

use common::private_pg::PrivatePostgres;
#[cfg(feature = "redis")]
use common::private_pg::free_port;
use common::{Server, call, cli_token, event, in_ci};

#[cfg(feature = "redis")]
fn wait_for_port(port: u16, what: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {port}");
}

#[cfg(feature = "redis")]
fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} failed");
}

/// Waits until `check` holds, at most `within`; returns how long it took.
async fn within<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {} ms",
            within.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------- Redis ----------

/// A private `redis-server` (no persistence) on a fixed port, which the test freezes, kills
/// and restarts.
#[cfg(feature = "redis")]
struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

#[cfg(feature = "redis")]
impl PrivateRedis {
    /// A Redis to be started later on a port nothing listens on yet.
    fn not_started() -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(!in_ci(), "redis-server missing under CI=true");
            eprintln!("\n*** SKIPPED: redis-server not found ***\n");
            return None;
        }
        Some(Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server");
    }

    fn freeze(&self) {
        signal(self.child.as_ref().unwrap(), "-STOP");
    }

    fn thaw(&self) {
        signal(self.child.as_ref().unwrap(), "-CONT");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A frozen process dies on SIGKILL too.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// p99 of `n` sequential trace requests (each must answer 200), in ms.
#[cfg(feature = "redis")]
async fn trace_p99(addr: &str, token: &str, entity: &str, n: usize) -> f64 {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        // A different page size each time: also misses, not only cache hits.
        let r = call(
            addr,
            "GET",
            &format!("/api/v1/trace/{entity}?limit={}", 1 + i % 50),
            Some(token),
            None,
        )
        .await;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[(n * 99).div_ceil(100) - 1]
}

#[cfg(feature = "redis")]
async fn cache_status(addr: &str) -> Value {
    let r = call(addr, "GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200, "readiness never depends on the cache");
    r.json()["cache"].clone()
}

/// Whether a repeated query is now answered from the cache.
#[cfg(feature = "redis")]
async fn cache_hit(addr: &str, token: &str, entity: &str) -> bool {
    let path = format!("/api/v1/trace/{entity}?view=compact");
    let _ = call(addr, "GET", &path, Some(token), None).await;
    call(addr, "GET", &path, Some(token), None)
        .await
        .header("x-cache")
        == Some("hit")
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_frozen_and_killed_never_slows_traces() {
    let Some(mut redis) = PrivateRedis::not_started() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let url = redis.url();
    // Redis is down: the server starts anyway.
    let server = Server::start(
        dir.path(),
        "redis-faults",
        &["--data-dir", &data_s, "--cache", &url],
    );
    let addr = server.addr.clone();
    let common = ["--data-dir", data_s.as_str()];
    let w = cli_token(&common, &addr, "acme", "events:write,trace:read");
    let mut last = 0;
    for i in 0..20 {
        let c = call(
            &addr,
            "POST",
            "/api/v1/events",
            Some(&w),
            Some(&event(
                "R1",
                "BagSeen",
                &format!("2026-11-28T10:{i:02}:00Z"),
                "MAD",
            )),
        )
        .await;
        assert_eq!(c.status, 201);
        last = c.json()["position"].as_u64().unwrap();
    }
    let r = call(
        &addr,
        "GET",
        &format!("/api/v1/trace/R1?minPosition={last}"),
        Some(&w),
        None,
    )
    .await;
    assert_eq!(r.status, 200);

    // 1. Down at start.
    let p99 = trace_p99(&addr, &w, "R1", 100).await;
    assert!(p99 < 200.0, "Redis down: trace p99 {p99:.1} ms");
    let s = cache_status(&addr).await;
    assert_eq!(s["status"], "degraded", "{s}");
    assert_eq!(s["connected"], false, "{s}");
    // It comes: the server connects in the background and uses it.
    redis.start();
    within(
        "the cache after Redis came",
        Duration::from_secs(10),
        || async {
            // a trace request is what probes the half-open breaker; readiness only reports it
            cache_hit(&addr, &w, "R1").await && cache_status(&addr).await["status"] == "ok"
        },
    )
    .await;

    // 2. Frozen.
    redis.freeze();
    let p99 = trace_p99(&addr, &w, "R1", 100).await;
    assert!(p99 < 200.0, "Redis frozen: trace p99 {p99:.1} ms");
    let s = cache_status(&addr).await;
    assert_eq!(s["status"], "degraded", "{s}");
    redis.thaw();
    within(
        "the cache after Redis thawed",
        Duration::from_secs(10),
        || async {
            // a trace request is what probes the half-open breaker; readiness only reports it
            cache_hit(&addr, &w, "R1").await && cache_status(&addr).await["status"] == "ok"
        },
    )
    .await;

    // 3. Killed.
    redis.kill();
    let p99 = trace_p99(&addr, &w, "R1", 100).await;
    assert!(p99 < 200.0, "Redis killed: trace p99 {p99:.1} ms");
    assert_eq!(cache_status(&addr).await["status"], "degraded");
    redis.start();
    within(
        "the cache after Redis restarted",
        Duration::from_secs(10),
        || async {
            // a trace request is what probes the half-open breaker; readiness only reports it
            cache_hit(&addr, &w, "R1").await && cache_status(&addr).await["status"] == "ok"
        },
    )
    .await;
    // The failures were counted.
    let scraper = cli_token(&common, &addr, "_system", "metrics:read");
    let m = call(&addr, "GET", "/metrics", Some(&scraper), None).await;
    let text = String::from_utf8(m.body).unwrap();
    let errors: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tracktrace_cache_errors_total "))
        .expect("tracktrace_cache_errors_total exported")
        .parse()
        .unwrap();
    assert!(errors > 0.0, "{errors}");
}

// ---------- PostgreSQL ----------

/// Captures one event; returns (status, Retry-After, event id, elapsed).
async fn try_capture(
    addr: &str,
    token: &str,
    i: usize,
) -> (u16, Option<String>, Option<String>, Duration) {
    let t = Instant::now();
    let mut ev = event(
        &format!("P{}", i % 7),
        "BagSeen",
        "2026-11-28T10:00:00Z",
        "MAD",
    );
    // Client-chosen ids: a retried capture is recognised.
    ev["eventId"] = json!(uuid::Uuid::now_v7().to_string());
    let r = call(addr, "POST", "/api/v1/events", Some(token), Some(&ev)).await;
    let id = (r.status == 201).then(|| ev["eventId"].as_str().unwrap().to_owned());
    (
        r.status,
        r.header("retry-after").map(str::to_owned),
        id,
        t.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_killed_and_stopped_answer_503_fast_and_lose_nothing() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = pg.url();
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--store",
        url.as_str(),
        "--jwt-secret",
        common::SECRET,
        "--store-timeout-ms",
        "1000",
        "--breaker-failures",
        "2",
        "--breaker-open-ms",
        "500",
    ];
    let server = Server::start(dir.path(), "pg-faults", &args);
    let addr = server.addr.clone();
    let w = cli_token(&args, &addr, "acme", "events:write,trace:read");
    let mut acked = Vec::new();
    for i in 0..20 {
        let (s, _, id, _) = try_capture(&addr, &w, i).await;
        assert_eq!(s, 201);
        acked.extend(id);
    }

    // 1. Every connection killed: each request answers at once, stored or 503 + Retry-After.
    // The pool replaces its dead connections; the breaker sheds while they fail.
    pg.kill_connections();
    let killed = Instant::now();
    let mut i = 20;
    while acked.len() < 25 {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the store did not reconnect within 10 s ({} stored after the kill)",
            acked.len() - 20
        );
        let (s, retry, id, took) = try_capture(&addr, &w, i).await;
        i += 1;
        assert!(took < Duration::from_secs(2), "capture took {took:?}");
        match s {
            201 => acked.extend(id),
            503 => assert!(retry.is_some(), "503 without Retry-After"),
            other => panic!("capture answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "stored again {} ms after the connections were killed ({} requests)",
        killed.elapsed().as_millis(),
        i - 20
    );

    // 2. PostgreSQL stopped: captures and traces 503 + Retry-After within 2 s.
    pg.down();
    for i in 10_000..10_020 {
        let (s, retry, _, took) = try_capture(&addr, &w, i).await;
        assert!(took < Duration::from_secs(2), "capture took {took:?}");
        assert_eq!(s, 503);
        assert!(retry.is_some());
        let t = Instant::now();
        let r = call(&addr, "GET", "/api/v1/trace/P1", Some(&w), None).await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "trace took {:?}",
            t.elapsed()
        );
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.header("retry-after").is_some());
    }

    // 3. Back: the service answers within 5 s of PostgreSQL returning.
    pg.up();
    let (a, tok) = (addr.as_str(), w.as_str());
    let took = within(
        "captures after PostgreSQL returned",
        Duration::from_secs(5),
        || async move { try_capture(a, tok, 999).await.0 == 201 },
    )
    .await;
    eprintln!("service back {} ms after PostgreSQL", took.as_millis());

    // Nothing acknowledged is lost.
    for id in &acked {
        let mut ev = event("P0", "BagSeen", "2026-11-28T10:00:00Z", "MAD");
        ev["eventId"] = json!(id);
        // Re-sending an acknowledged event is answered as a duplicate: it is stored.
        let r = call(&addr, "POST", "/api/v1/events", Some(&w), Some(&ev)).await;
        assert_eq!(
            r.status, 200,
            "event {id} was acknowledged but is not stored"
        );
        assert_eq!(r.json()["duplicate"], true);
    }
}

// ---------- a full disk under sled ----------

/// A small tmpfs (root only), unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(!in_ci(), "cannot mount a tmpfs under CI=true (root needed)");
            eprintln!("\n*** SKIPPED: cannot mount a tmpfs (run as root) ***\n");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_mib(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1M"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Fills the disk up to `leave_mib` free with a ballast file.
    fn fill(&self, leave_mib: u64) {
        let fill = self.free_mib().saturating_sub(leave_mib);
        let out = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", &format!("count={fill}")])
            .arg(format!("of={}", self.path().join("ballast").display()))
            .output()
            .unwrap();
        assert!(out.status.success() || fill == 0);
    }

    fn free_ballast(&self) {
        std::fs::remove_file(self.path().join("ballast")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_sled_answers_507_then_recovers_without_loss() {
    let Some(disk) = SmallDisk::mount(160) else {
        return;
    };
    let logs = tempfile::tempdir().unwrap();
    let data = disk.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let args = [
        "--data-dir",
        data_s.as_str(),
        "--sled-min-free-mib",
        "48",
        "--jwt-secret",
        common::SECRET,
    ];
    let server = Server::start(logs.path(), "disk", &args);
    let addr = server.addr.clone();
    let w = cli_token(&args, &addr, "acme", "events:write,trace:read");
    // Leave a little more than the reserve, then capture 8 KiB events until the disk is full.
    disk.fill(64);
    let blob = "x".repeat(8 * 1024);
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..20_000 {
        let mut ev = event(
            &format!("D{}", i % 11),
            "BagSeen",
            "2026-11-28T10:00:00Z",
            "MAD",
        );
        ev["attributes"] = json!({"blob": blob});
        let r = call(&addr, "POST", "/api/v1/events", Some(&w), Some(&ev)).await;
        match r.status {
            201 => acked.push(r.json()["eventId"].as_str().unwrap().to_owned()),
            507 => {
                refused = Some(r);
                break;
            }
            s => panic!("capture answered {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    let refused = refused.expect("the disk filled up");
    let problem = refused.json();
    assert_eq!(
        problem["type"], "/problems/insufficient-storage",
        "{problem}"
    );
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert!(refused.header("retry-after").is_some());
    assert!(!acked.is_empty());
    // Still full: still refused, and traces are still served.
    let again = call(
        &addr,
        "POST",
        "/api/v1/events",
        Some(&w),
        Some(&event("D1", "BagSeen", "2026-11-28T11:00:00Z", "MAD")),
    )
    .await;
    assert_eq!(again.status, 507);
    assert_eq!(
        call(&addr, "GET", "/api/v1/trace/D1", Some(&w), None)
            .await
            .status,
        200
    );

    // Space freed: captures work again.
    disk.free_ballast();
    let (a, tok) = (addr.as_str(), w.as_str());
    within(
        "captures after space was freed",
        Duration::from_secs(5),
        || async move {
            call(
                a,
                "POST",
                "/api/v1/events",
                Some(tok),
                Some(&event("D1", "BagSeen", "2026-11-28T12:00:00Z", "MAD")),
            )
            .await
            .status
                == 201
        },
    )
    .await;

    // Every acknowledged event is readable, also after a restart (no corruption).
    assert!(server.terminate(), "graceful shutdown");
    let server = Server::start(logs.path(), "disk2", &args);
    let mut stored = 0;
    for e in 0..11 {
        let r = call(
            &server.addr,
            "GET",
            &format!("/api/v1/trace/D{e}?view=compact&limit=1000"),
            Some(&w),
            None,
        )
        .await;
        if r.status == 200 {
            stored += r.json()["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|ev| acked.contains(&ev["eventId"].as_str().unwrap().to_owned()))
                .count();
        }
    }
    assert_eq!(stored, acked.len(), "every acknowledged event is readable");
}
