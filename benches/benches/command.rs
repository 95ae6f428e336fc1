//! The command path (`CommandBus::execute`: validate → load → handle → append with
//! `Exact(version)`), one caller, single-event commands, on each backend (memory, sled with its
//! durable default, PostgreSQL when reachable):
//!
//! | id | what one iteration does |
//! |---|---|
//! | `baseline_append/{store}` | one bare `EventStore::append` of one event to a new stream (the floor) |
//! | `new_aggregate/{store}` | one command on a never-seen aggregate |
//! | `new_aggregate_8_callers/{store}` | 8 concurrent callers, one command each on a never-seen aggregate |
//! | `growing_1000/{store}/{config}` | 1,000 commands on one new aggregate (its stream grows 0 → 1,000); not for `replay` |
//! | `at_1000/{store}/{config}` | one command on an aggregate whose stream already holds ≥ 1,000 events |
//!
//! Configs: `cache` (in-memory aggregate cache checked by version + snapshots every 100, the
//! recommended setup), `snapshots` (no cache: every command loads snapshot + tail), `replay` (no
//! cache, no snapshots: every command replays the whole stream, as the peers do).
//!
//! `cargo bench -p tracktrace-benches --bench command`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tracktrace_core::{
    Aggregate, CommandBus, DomainEvent, EventStore, EventStoreExt, ExpectedVersion, InMemoryStore,
    JsonCodec, NewEvent, Repository, SnapshotStore, StreamId, TenantId,
};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};
use tracktrace_store_sled::{Durability, SledOptions, SledStore};

/// A small aggregate, like the peers' benchmark aggregates.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counter {
    value: u64,
    scans: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum CounterEvent {
    Scanned { station: String, seq: u64 },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> &'static str {
        "Scanned"
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Counter {
    const TYPE: &'static str = "Counter";
    type Command = u64;
    type Event = CounterEvent;
    type Error = Never;
    type Codec = JsonCodec;

    fn handle(&self, seq: &u64) -> Result<Vec<CounterEvent>, Never> {
        Ok(vec![CounterEvent::Scanned {
            station: "MAD".into(),
            seq: *seq,
        }])
    }

    fn apply(&mut self, e: &CounterEvent) {
        let CounterEvent::Scanned { seq, .. } = e;
        self.value = *seq;
        self.scans += 1;
    }
}

static IDS: AtomicU64 = AtomicU64::new(0);

fn fresh_id() -> String {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nonce:x}-{}", IDS.fetch_add(1, Ordering::Relaxed))
}

fn bus<S: EventStore + SnapshotStore>(store: &Arc<S>, config: &str) -> CommandBus<Counter> {
    let repo = Repository::<Counter>::new(store.clone());
    CommandBus::new(match config {
        "cache" => repo.with_snapshots(store.clone(), 100).with_cache(10_000),
        "snapshots" => repo.with_snapshots(store.clone(), 100),
        _ => repo,
    })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn bench_backend<S: EventStore + SnapshotStore>(
    c: &mut Criterion,
    rt: &Runtime,
    name: &str,
    store: Arc<S>,
) {
    let tenant = TenantId::parse("bench").expect("tenant");

    // Baseline in the same conditions: one bare `EventStore::append` of one event to a new
    // stream (what every command costs at least).
    let mut g = c.benchmark_group("command/baseline_append");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    g.bench_function(name, |bencher| {
        bencher.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let stream = StreamId::parse(format!("Raw-{}", fresh_id())).expect("stream");
                    let event = NewEvent::json("Scanned", &serde_json::json!({"seq": i}));
                    store
                        .append_to(&tenant, &stream, ExpectedVersion::NoStream, vec![event])
                        .await
                        .expect("append");
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("command/new_aggregate");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let b = bus(&store, "cache");
    g.bench_function(name, |bencher| {
        bencher.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    b.execute(&tenant, &fresh_id(), i).await.expect("command");
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    // Eight callers at once, each on its own new aggregates (the server's situation).
    let mut g = c.benchmark_group("command/new_aggregate_8_callers");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(8));
    g.bench_function(name, |bencher| {
        bencher.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..8)
                    .map(|_| {
                        let (b, tenant) = (b.clone(), tenant.clone());
                        tokio::spawn(async move {
                            for i in 0..iters {
                                b.execute(&tenant, &fresh_id(), i).await.expect("command");
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("caller task");
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    for config in ["cache", "snapshots", "replay"] {
        let b = bus(&store, config);
        // Replaying the whole stream on every command is quadratic: only measured at 1,000.
        if config != "replay" {
            let mut g = c.benchmark_group("command/growing_1000");
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(4))
                .throughput(Throughput::Elements(1000));
            g.bench_function(format!("{name}/{config}"), |bencher| {
                bencher.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let id = fresh_id();
                            for seq in 0..1000 {
                                b.execute(&tenant, &id, seq).await.expect("command");
                            }
                        }
                        start.elapsed()
                    })
                })
            });
            g.finish();
        }

        // Per-command latency at the end of the growing stream.
        let id = fresh_id();
        rt.block_on(async {
            for seq in 0..1000 {
                b.execute(&tenant, &id, seq).await.expect("seed command");
            }
        });
        let mut g = c.benchmark_group("command/at_1000");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements(1));
        let seq = AtomicU64::new(1000);
        g.bench_function(format!("{name}/{config}"), |bencher| {
            bencher.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let s = seq.fetch_add(1, Ordering::Relaxed);
                        b.execute(&tenant, &id, s).await.expect("command");
                    }
                    start.elapsed()
                })
            })
        });
        g.finish();
    }
}

fn backends(c: &mut Criterion) {
    let rt = runtime();
    bench_backend(c, &rt, "memory", Arc::new(InMemoryStore::new()));
    let dir = tempfile::tempdir().expect("temp dir");
    let sled = Arc::new(
        SledStore::open(SledOptions::new(dir.path()).durability(Durability::Fsync))
            .expect("open sled store"),
    );
    bench_backend(c, &rt, "sled-fsync", sled);

    // PostgreSQL in a fresh schema, dropped at the end; skipped (loudly) outside CI when no
    // database is reachable.
    let url = std::env::var("TRACKTRACE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("tt_bench_cmd_{:016x}", fastrand::u64(..));
    let pg = rt.block_on(PgStore::connect_with(
        PgStoreOptions::new(&url)
            .schema(&schema)
            .max_connections(16)
            .connect_timeout(Duration::from_secs(5)),
    ));
    match pg {
        Ok(pg) => {
            let pg = Arc::new(pg);
            bench_backend(c, &rt, "postgres", pg.clone());
            let _ = rt.block_on(pg.drop_schema());
        }
        Err(e) if e.is_retryable() && std::env::var("CI").map_or(true, |v| v != "true") => {
            eprintln!(
                "\n=== command bench on PostgreSQL SKIPPED: no database at {url} ({e}).\n\
                 === Set TRACKTRACE_TEST_DATABASE_URL to a reachable PostgreSQL.\n"
            );
        }
        Err(e) => panic!("command bench: cannot connect to {url}: {e}"),
    }
}

criterion_group!(benches, backends);
criterion_main!(benches);
