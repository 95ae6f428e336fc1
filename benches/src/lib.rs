//! Shared benchmark workloads for every tracktrace backend, generic over
//! `Arc<dyn EventStore>`, so each backend's bench file (`benches/sled.rs`,
//! `benches/postgres.rs`, ...) measures exactly the same thing.
//!
//! [`bench_store`] registers every workload for one store; the individual workloads are public
//! too. Throughput is reported in events per second (criterion's `elem/s`).
//!
//! | id | what one iteration does |
//! |---|---|
//! | `append_1` | one append of one event (one caller, so every event pays a full commit) |
//! | `append_batch_100` | one append of a batch of [`BATCH`] events |
//! | `concurrent_8` / `concurrent_64` | 8 / 64 tasks each append one single-event batch to its own stream (they run continuously; an iteration is one event per task) |
//! | `read_stream_1000` | reads a whole [`STREAM_LEN`]-event stream forwards (written in batches of 100) |
//! | `read_stream_1000_interleaved` | the same, for a stream written one event per append, interleaved with appends to other streams (the usual shape of an aggregate's stream) |
//! | `read_all_10000` | reads [`LOG_LEN`] events of the global log in pages of 1,000 |
//!
//! Events are [`event`]s: a JSON payload of about 120 bytes (about 200 bytes encoded with the
//! store's metadata), the size the raw baselines use.

#[cfg(feature = "postgres")]
pub mod private_pg;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use tokio::runtime::Runtime;
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, ReadAll, Result, StreamId,
    TenantId,
};

/// `TRACKTRACE_BENCH_INTERLEAVE=<rounds>`: the bench files run interleaved rounds of raw
/// baselines and stores instead of criterion (see each bench file); `None` when unset.
pub fn interleave_rounds() -> Option<usize> {
    std::env::var("TRACKTRACE_BENCH_INTERLEAVE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|r| r.max(1))
}

/// The median of per-round values (the upper one of an even count).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Events per batch in `append_batch_100`.
pub const BATCH: usize = 100;
/// Length of the stream read by `read_stream_1000`.
pub const STREAM_LEN: usize = 1000;
/// Events read by `read_all_10000`.
pub const LOG_LEN: usize = 10_000;
/// Approximate encoded size of one [`event`], in bytes (what raw baselines write per event).
pub const EVENT_BYTES: usize = 200;

static STREAMS: AtomicU64 = AtomicU64::new(0);

/// The tenant every workload writes to.
pub fn tenant() -> TenantId {
    TenantId::parse("bench").expect("valid tenant id")
}

/// A stream id no other workload of this process uses.
pub fn fresh_stream(kind: &str) -> StreamId {
    let n = STREAMS.fetch_add(1, Ordering::Relaxed);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    StreamId::parse(format!("Bench-{kind}-{nonce:x}-{n}")).expect("valid stream id")
}

/// The benchmark event number `i`: a Track & Trace scan with a ~120-byte JSON payload.
///
/// The payload is formatted from a template rather than built as a `serde_json::Value`: the
/// benches measure stores, and the raw baselines they are compared with write ready-made bytes
/// (building and serialising a JSON map per event cost the caller about a microsecond, a
/// tenth of a batched event's whole cost on PostgreSQL).
pub fn event(i: u64) -> NewEvent {
    NewEvent::new(
        "BagScanned",
        "application/json",
        format!(
            r#"{{"at":"2025-06-01T10:15:00+02:00","bag":"0220123456","flight":"IB3170","point":"make-up-07","seq":{i},"station":"MAD"}}"#
        )
        .into_bytes(),
    )
}

/// Appends one event to `stream` (no version check).
pub async fn append_one(store: &dyn EventStore, stream: &StreamId, i: u64) -> Result<()> {
    store
        .append_to(&tenant(), stream, ExpectedVersion::Any, vec![event(i)])
        .await
        .map(drop)
}

/// Appends one batch of `n` events to `stream` (no version check).
pub async fn append_batch(store: &dyn EventStore, stream: &StreamId, n: usize) -> Result<()> {
    let events = (0..n as u64).map(event).collect();
    store
        .append_to(&tenant(), stream, ExpectedVersion::Any, events)
        .await
        .map(drop)
}

/// `writers` tasks each append `per_writer` single-event batches to their own stream, all at
/// once; returns the wall time until the last one is acknowledged.
pub async fn concurrent_appends(
    store: &Arc<dyn EventStore>,
    writers: usize,
    per_writer: u64,
) -> Result<Duration> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        let store = store.clone();
        let stream = fresh_stream("concurrent");
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                append_one(store.as_ref(), &stream, i).await?;
            }
            Ok::<_, tracktrace_core::Error>(())
        }));
    }
    for t in tasks {
        t.await.expect("append task panicked")?;
    }
    Ok(start.elapsed())
}

/// Writes a fresh stream of `len` events (in batches of [`BATCH`]) and returns it.
pub async fn seed_stream(store: &dyn EventStore, len: usize) -> Result<StreamId> {
    let stream = fresh_stream("read");
    let mut left = len;
    while left > 0 {
        let n = left.min(BATCH);
        append_batch(store, &stream, n).await?;
        left -= n;
    }
    Ok(stream)
}

/// Writes a fresh stream of `len` events, one per append, each followed by an append of 3
/// events to another stream, and returns it.
pub async fn seed_interleaved_stream(store: &dyn EventStore, len: usize) -> Result<StreamId> {
    let stream = fresh_stream("interleaved");
    let noise = fresh_stream("noise");
    for i in 0..len as u64 {
        append_one(store, &stream, i).await?;
        append_batch(store, &noise, 3).await?;
    }
    Ok(stream)
}

/// Reads a whole stream forwards; returns the number of events.
pub async fn read_stream(store: &dyn EventStore, stream: &StreamId) -> Result<usize> {
    Ok(store.read_stream_forwards(&tenant(), stream).await?.len())
}

/// Appends `len` events (in batches of [`BATCH`]) and returns the position of the first.
pub async fn seed_log(store: &dyn EventStore, len: usize) -> Result<Position> {
    let from = store.head().await?.next();
    seed_stream(store, len).await?;
    Ok(from)
}

/// Reads `len` events of the global log from `from`, in pages of 1,000; returns how many.
pub async fn read_all(store: &dyn EventStore, from: Position, len: usize) -> Result<usize> {
    let mut next = from;
    let mut n = 0;
    while n < len {
        let page = store
            .read_all(ReadAll::starting_at(next, (len - n).min(1000)))
            .await?;
        if page.events.is_empty() {
            break;
        }
        n += page.events.len();
        next = page.next;
    }
    Ok(n)
}

/// Sets short, uniform settings on a workload group.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>, events_per_iter: u64) {
    group.throughput(Throughput::Elements(events_per_iter));
    group.sample_size(10);
}

/// Registers every workload for `store` under the benchmark id `name` (e.g. `"sled-fsync"`).
/// Each workload is a criterion group (`append_1`, `append_batch_100`, ...), so backends land
/// side by side in the report.
pub fn bench_store(c: &mut Criterion, rt: &Runtime, name: &str, store: Arc<dyn EventStore>) {
    let mut g = c.benchmark_group("append_1");
    configure(&mut g, 1);
    let stream = fresh_stream("one");
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    ok(name, append_one(store.as_ref(), &stream, i).await);
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("append_batch_100");
    configure(&mut g, BATCH as u64);
    let stream = fresh_stream("batch");
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    ok(name, append_batch(store.as_ref(), &stream, BATCH).await);
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    for writers in [8usize, 64] {
        let mut g = c.benchmark_group(format!("concurrent_{writers}"));
        configure(&mut g, writers as u64);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                ok(
                    name,
                    rt.block_on(concurrent_appends(&store, writers, iters)),
                )
            })
        });
        g.finish();
    }

    let mut g = c.benchmark_group("read_stream_1000");
    configure(&mut g, STREAM_LEN as u64);
    let stream = ok(name, rt.block_on(seed_stream(store.as_ref(), STREAM_LEN)));
    g.bench_function(name, |b| {
        b.iter(|| {
            let n = ok(name, rt.block_on(read_stream(store.as_ref(), &stream)));
            assert_eq!(n, STREAM_LEN);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("read_stream_1000_interleaved");
    configure(&mut g, STREAM_LEN as u64);
    let stream = ok(
        name,
        rt.block_on(seed_interleaved_stream(store.as_ref(), STREAM_LEN)),
    );
    g.bench_function(name, |b| {
        b.iter(|| {
            let n = ok(name, rt.block_on(read_stream(store.as_ref(), &stream)));
            assert_eq!(n, STREAM_LEN);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("read_all_10000");
    configure(&mut g, LOG_LEN as u64);
    let from = ok(name, rt.block_on(seed_log(store.as_ref(), LOG_LEN)));
    g.bench_function(name, |b| {
        b.iter(|| {
            let n = ok(name, rt.block_on(read_all(store.as_ref(), from, LOG_LEN)));
            assert_eq!(n, LOG_LEN);
        })
    });
    g.finish();
}

fn ok<T>(name: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{name}: workload failed: {e}"))
}

/// The runtime the benches use: multi-threaded with 2 workers (the CI machines have 2 cores).
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
