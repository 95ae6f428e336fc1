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
//! Configs: `default` (`Repository::new`: a cache of `DEFAULT_CACHE_CAPACITY` aggregates that
//! loads on a miss), `cache` (a cache of 10,000 + snapshots every 100), `snapshots` (no cache:
//! every command loads snapshot + tail), `replay` (no cache, no snapshots: every command replays
//! the whole stream, as the peers do).
//!
//! `cargo bench -p tracktrace-benches --bench command`
//!
//! `TRACKTRACE_BENCH_INTERLEAVE=<rounds>` runs, instead of criterion, interleaved rounds on
//! PostgreSQL (`TRACKTRACE_BENCH_PG=private`: a cluster with default settings created for the
//! run; otherwise `TRACKTRACE_TEST_DATABASE_URL`) next to a raw sqlx loop that does what a
//! minimal hand-written command handler does (read the aggregate's rows, insert the new event
//! with autocommit, on a held connection): commands on new aggregates (`create`, and `execute`
//! through the default repository) and 1,000 commands on one growing stream (default
//! repository; cache + snapshots), with the latency of the last 100 commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
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
        "snapshots" => repo.with_snapshots(store.clone(), 100).with_cache(0),
        "replay" => repo.with_cache(0),
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

    for config in ["default", "cache", "snapshots", "replay"] {
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

/// The raw command loop: read the aggregate's rows (decoding each payload as the aggregate's
/// event, as a handler must to rebuild its state), then insert the next event with autocommit,
/// on one held connection.
struct RawCommands {
    conn: sqlx::postgres::PgConnection,
}

impl RawCommands {
    async fn command(&mut self, id: &str, seq: u64) {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT version, payload FROM raw_commands WHERE aggregate_id = $1 ORDER BY version",
        )
        .bind(id)
        .fetch_all(&mut self.conn)
        .await
        .expect("raw read");
        let mut state = Counter::default();
        for (_, p) in &rows {
            let e: CounterEvent = serde_json::from_slice(p).expect("raw decode");
            state.apply(&e);
        }
        let version = rows.last().map_or(0, |r| r.0) + 1;
        let e = CounterEvent::Scanned {
            station: "MAD".into(),
            seq,
        };
        sqlx::query(
            "INSERT INTO raw_commands (aggregate_id, version, event_type, payload) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(version)
        .bind("Scanned")
        .bind(serde_json::to_vec(&e).expect("encode"))
        .execute(&mut self.conn)
        .await
        .expect("raw insert");
    }
}

/// `n` commands, each on a new aggregate; commands per second.
async fn new_aggregates<F, Fut>(n: u64, mut command: F) -> f64
where
    F: FnMut(String, u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    for i in 0..n {
        command(fresh_id(), i).await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// 1,000 commands on one new aggregate: (commands per second, mean latency of the last 100).
async fn growing<F, Fut>(mut command: F) -> (f64, Duration)
where
    F: FnMut(String, u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let id = fresh_id();
    let start = Instant::now();
    let mut last = Duration::ZERO;
    for seq in 0..1000 {
        let t = Instant::now();
        command(id.clone(), seq).await;
        if seq >= 900 {
            last += t.elapsed();
        }
    }
    (1000.0 / start.elapsed().as_secs_f64(), last / 100)
}

fn interleaved(rounds: usize) {
    let rt = runtime();
    let private = match std::env::var("TRACKTRACE_BENCH_PG").as_deref() {
        Ok("private") => Some(
            tracktrace_benches::private_pg::PrivatePostgres::start()
                .unwrap_or_else(|e| panic!("command bench: no private cluster: {e}")),
        ),
        _ => None,
    };
    let url = match &private {
        Some(pg) => pg.url(),
        None => std::env::var("TRACKTRACE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
    };
    if private.is_some() {
        println!("private PostgreSQL cluster with default settings at {url}");
    }
    let schema = format!("tt_bench_cmd_{:016x}", fastrand::u64(..));
    let store = Arc::new(
        rt.block_on(PgStore::connect_with(
            PgStoreOptions::new(&url).schema(&schema),
        ))
        .unwrap_or_else(|e| panic!("command bench: cannot connect to {url}: {e}")),
    );
    let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("database url");
    let opts = opts.options([("search_path", schema.as_str())]);
    let raw = rt.block_on(async {
        use sqlx::ConnectOptions;
        let mut conn = opts.connect().await.expect("raw connection");
        sqlx::raw_sql(
            "CREATE TABLE raw_commands (aggregate_id text NOT NULL, version bigint NOT NULL, \
             event_type text NOT NULL, payload bytea NOT NULL, \
             recorded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (aggregate_id, version))",
        )
        .execute(&mut conn)
        .await
        .expect("raw table");
        tokio::sync::Mutex::new(RawCommands { conn })
    });
    let tenant = TenantId::parse("bench").expect("tenant");
    let default = bus(&store, "default");
    let cached = bus(&store, "cache");
    const NEW: u64 = 300;
    let mut ratios: [Vec<f64>; 4] = Default::default();
    let mut latency = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        rt.block_on(async {
            let raw_new = new_aggregates(NEW, |id, i| {
                let raw = &raw;
                async move { raw.lock().await.command(&id, i).await }
            })
            .await;
            let created = new_aggregates(NEW, |id, i| {
                let (b, t) = (&default, &tenant);
                async move {
                    b.create(t, &id, i).await.expect("create");
                }
            })
            .await;
            let executed = new_aggregates(NEW, |id, i| {
                let (b, t) = (&default, &tenant);
                async move {
                    b.execute(t, &id, i).await.expect("execute");
                }
            })
            .await;
            let (raw_g, raw_l) = growing(|id, i| {
                let raw = &raw;
                async move { raw.lock().await.command(&id, i).await }
            })
            .await;
            let (def_g, def_l) = growing(|id, i| {
                let (b, t) = (&default, &tenant);
                async move {
                    b.execute(t, &id, i).await.expect("execute");
                }
            })
            .await;
            let (cache_g, cache_l) = growing(|id, i| {
                let (b, t) = (&cached, &tenant);
                async move {
                    b.execute(t, &id, i).await.expect("execute");
                }
            })
            .await;
            println!(
                "round {round}: new aggregates raw {raw_new:.0}/s, create {created:.0}/s \
                 ({:.2}x), execute {executed:.0}/s ({:.2}x); growing 1,000 raw {raw_g:.0}/s \
                 (last 100: {:.2} ms), default {def_g:.0}/s ({:.2}x, last 100: {:.2} ms), \
                 cache + snapshots {cache_g:.0}/s ({:.2}x, last 100: {:.2} ms)",
                created / raw_new,
                executed / raw_new,
                raw_l.as_secs_f64() * 1e3,
                def_g / raw_g,
                def_l.as_secs_f64() * 1e3,
                cache_g / raw_g,
                cache_l.as_secs_f64() * 1e3,
            );
            ratios[0].push(created / raw_new);
            ratios[1].push(executed / raw_new);
            ratios[2].push(def_g / raw_g);
            ratios[3].push(cache_g / raw_g);
            latency.0.push(raw_l);
            latency.1.push(def_l);
            latency.2.push(cache_l);
        });
    }
    let median = tracktrace_benches::median;
    let median_ms = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "median of {rounds} rounds: new aggregates create {:.2}x raw, execute {:.2}x raw; \
         growing 1,000 default {:.2}x raw, cache + snapshots {:.2}x raw; last-100 latency raw \
         {:.2} ms, default {:.2} ms, cache + snapshots {:.2} ms",
        median(&mut ratios[0]),
        median(&mut ratios[1]),
        median(&mut ratios[2]),
        median(&mut ratios[3]),
        median_ms(&mut latency.0),
        median_ms(&mut latency.1),
        median_ms(&mut latency.2),
    );
    let _ = rt.block_on(store.drop_schema());
}

criterion_group!(benches, backends);

fn main() {
    match tracktrace_benches::interleave_rounds() {
        Some(rounds) => interleaved(rounds),
        None => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
