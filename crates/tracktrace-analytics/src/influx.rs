//! A batched, retrying InfluxDB 1.x writer (HTTP `/write`, line protocol). Feature `influxdb`.
//!
//! Points are queued in a bounded in-memory buffer and written by one background task in
//! batches. While InfluxDB is unreachable or failing (connection errors, 5xx) the batch stays
//! queued and is retried with exponential backoff; when the buffer is full the oldest lines are
//! dropped and counted ([`WriterStats::dropped`]), never silently lost. Lines InfluxDB rejects
//! as malformed (400) are counted in [`WriterStats::rejected`] and not retried.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::line_protocol::Point;

/// Writer settings.
#[derive(Clone, Debug)]
pub struct InfluxConfig {
    /// Base URL, e.g. `http://127.0.0.1:8086`.
    pub url: String,
    /// Database name.
    pub database: String,
    /// Lines per HTTP request.
    pub batch_size: usize,
    /// Longest time a line waits before its batch is sent.
    pub flush_interval: Duration,
    /// Most lines held while InfluxDB is unavailable; beyond that the oldest are dropped.
    pub max_buffer: usize,
    /// First retry delay.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Issue `CREATE DATABASE` (idempotent in InfluxDB 1.x) before the first write and after a
    /// "database not found" answer.
    pub create_database: bool,
}

impl InfluxConfig {
    /// Defaults for `url` and `database`.
    pub fn new(url: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            url: url.into().trim_end_matches('/').to_string(),
            database: database.into(),
            batch_size: 5000,
            flush_interval: Duration::from_secs(1),
            max_buffer: 100_000,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            create_database: true,
        }
    }
}

/// Counters of a writer (monotonic, except `buffered`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Lines accepted by InfluxDB.
    pub written: u64,
    /// Lines dropped because the buffer was full.
    pub dropped: u64,
    /// Lines InfluxDB rejected as malformed.
    pub rejected: u64,
    /// Failed write attempts (each retried).
    pub failed_attempts: u64,
    /// Lines waiting to be written (including an in-flight batch).
    pub buffered: u64,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    failed_attempts: AtomicU64,
}

struct Shared {
    cfg: InfluxConfig,
    queue: Mutex<Queue>,
    wake: Notify,
    drained: Notify,
    counters: Counters,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<String>,
    in_flight: usize,
    closed: bool,
}

/// Handle to the background writer. Dropping it stops the task (use [`InfluxWriter::flush`]
/// first to wait for queued lines).
pub struct InfluxWriter {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for InfluxWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfluxWriter")
            .field("url", &self.shared.cfg.url)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Why a writer could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfluxError {
    /// The HTTP client could not be built.
    #[error("cannot build the InfluxDB HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

impl InfluxWriter {
    /// Starts the background writer on the current tokio runtime.
    pub fn start(cfg: InfluxConfig) -> Result<Self, InfluxError> {
        let client = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .build()
            .map_err(InfluxError::Client)?;
        let shared = Arc::new(Shared {
            cfg,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            counters: Counters::default(),
        });
        let task = tokio::spawn(run(shared.clone(), client));
        Ok(Self { shared, task })
    }

    /// Queues points (points without fields are skipped).
    pub fn write(&self, points: &[Point]) {
        let mut q = lock(&self.shared.queue);
        for line in points.iter().filter_map(Point::to_line) {
            q.lines.push_back(line);
        }
        let cap = self.shared.cfg.max_buffer.max(1);
        let excess = (q.lines.len() + q.in_flight)
            .saturating_sub(cap)
            .min(q.lines.len());
        if excess > 0 {
            q.lines.drain(..excess);
            self.shared
                .counters
                .dropped
                .fetch_add(excess as u64, Ordering::Relaxed);
            tracing::warn!(excess, "InfluxDB buffer full: dropped the oldest lines");
        }
        let full_batch = q.lines.len() >= self.shared.cfg.batch_size;
        drop(q);
        if full_batch {
            self.shared.wake.notify_one();
        }
    }

    /// Sends what is queued now and waits until the queue is empty, at most `timeout`.
    /// Returns whether everything was written (or rejected) in time.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let q = lock(&self.shared.queue);
                if q.lines.is_empty() && q.in_flight == 0 {
                    return true;
                }
            }
            self.shared.wake.notify_one();
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return false;
            }
        }
    }

    /// Current counters.
    pub fn stats(&self) -> WriterStats {
        let q = lock(&self.shared.queue);
        let c = &self.shared.counters;
        WriterStats {
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            buffered: (q.lines.len() + q.in_flight) as u64,
        }
    }
}

impl Drop for InfluxWriter {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.task.abort();
    }
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Sent {
    Ok,
    Rejected,
    Retry,
}

async fn send(shared: &Shared, client: &reqwest::Client, body: String) -> Sent {
    let cfg = &shared.cfg;
    let url = match reqwest::Url::parse_with_params(
        &format!("{}/write", cfg.url),
        &[("db", cfg.database.as_str()), ("precision", "ns")],
    ) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, url = %cfg.url, "invalid InfluxDB URL");
            return Sent::Retry;
        }
    };
    let res = client.post(url).body(body).send().await;
    match res {
        Ok(r) if r.status().is_success() => Sent::Ok,
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND && cfg.create_database => {
            create_database(shared, client).await;
            Sent::Retry
        }
        Ok(r) if r.status() == reqwest::StatusCode::BAD_REQUEST => {
            let text = r.text().await.unwrap_or_default();
            tracing::error!(%text, "InfluxDB rejected a batch as malformed");
            Sent::Rejected
        }
        Ok(r) => {
            tracing::warn!(status = %r.status(), "InfluxDB write failed; will retry");
            Sent::Retry
        }
        Err(e) => {
            tracing::warn!(error = %e, "InfluxDB unreachable; will retry");
            Sent::Retry
        }
    }
}

async fn create_database(shared: &Shared, client: &reqwest::Client) {
    let q = format!(
        "CREATE DATABASE \"{}\"",
        shared
            .cfg
            .database
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    );
    let Ok(url) =
        reqwest::Url::parse_with_params(&format!("{}/query", shared.cfg.url), &[("q", q.as_str())])
    else {
        return;
    };
    if let Err(e) = client.post(url).send().await {
        tracing::warn!(error = %e, "CREATE DATABASE failed");
    }
}

async fn run(shared: Arc<Shared>, client: reqwest::Client) {
    let cfg = shared.cfg.clone();
    if cfg.create_database {
        create_database(&shared, &client).await;
    }
    let mut backoff = cfg.min_backoff;
    loop {
        let batch: Vec<String> = {
            let mut q = lock(&shared.queue);
            if q.closed {
                return;
            }
            let n = q.lines.len().min(cfg.batch_size.max(1));
            q.in_flight = n;
            q.lines.drain(..n).collect()
        };
        if batch.is_empty() {
            shared.drained.notify_waiters();
            let _ = tokio::time::timeout(cfg.flush_interval, shared.wake.notified()).await;
            continue;
        }
        let n = batch.len();
        match send(&shared, &client, batch.join("\n")).await {
            Sent::Ok => {
                shared
                    .counters
                    .written
                    .fetch_add(n as u64, Ordering::Relaxed);
                lock(&shared.queue).in_flight = 0;
                backoff = cfg.min_backoff;
            }
            Sent::Rejected => {
                shared
                    .counters
                    .rejected
                    .fetch_add(n as u64, Ordering::Relaxed);
                lock(&shared.queue).in_flight = 0;
            }
            Sent::Retry => {
                shared
                    .counters
                    .failed_attempts
                    .fetch_add(1, Ordering::Relaxed);
                {
                    // Put the batch back in front, keeping the buffer bound.
                    let mut q = lock(&shared.queue);
                    q.in_flight = 0;
                    for line in batch.into_iter().rev() {
                        q.lines.push_front(line);
                    }
                    let excess = q.lines.len().saturating_sub(cfg.max_buffer.max(1));
                    if excess > 0 {
                        q.lines.drain(..excess);
                        shared
                            .counters
                            .dropped
                            .fetch_add(excess as u64, Ordering::Relaxed);
                    }
                }
                let jitter = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                tokio::time::sleep(jitter).await;
                backoff = (backoff * 2).min(cfg.max_backoff);
            }
        }
    }
}
