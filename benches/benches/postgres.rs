//! The shared workloads on the PostgreSQL store, plus raw sqlx baselines measured in the same
//! run against a plain table in the same database:
//!
//! | group | raw baseline |
//! |---|---|
//! | `append_1` | `raw-insert-1conn`: one autocommit `INSERT` on a held connection |
//! | `concurrent_8` | `raw-insert-8conn`: the same on 8 connections at once |
//! | `append_batch_100` | `raw-unnest-100`: one autocommit `INSERT ... SELECT FROM UNNEST` of 100 rows |
//! | `read_stream_10000` | `raw-fetch`: `SELECT` of a 10,000-row stream into tuples |
//!
//! The raw table `raw_events` has the columns a minimal hand-written event table has
//! (bigserial position, tenant, stream, version, event id, type, content type, payload,
//! recorded-at) and one unique index on `(tenant, stream, version)`. The interleaved mode also
//! writes `raw_events_idem`, the same plus a unique `(event_id, tenant)` index (what idempotency
//! by event id costs, which the store enforces and the minimal table does not), and reports the
//! store's ratio to both.
//!
//! `TRACKTRACE_BENCH_INTERLEAVE=<rounds>` alternates short runs of the raw baselines and the
//! store's matching workloads (single events on 1 and 8 connections, batches of 100) and prints
//! per-round and median ratios instead of running criterion: the robust comparison on a busy
//! machine.
//! `TRACKTRACE_BENCH_PG_GROUPS` sets `PgStoreOptions::append_groups` (default
//! `DEFAULT_APPEND_GROUPS`; `0` turns group appends off); `TRACKTRACE_BENCH_PG_NOTIFY=0` turns
//! `NOTIFY` off.
//!
//! The interleaved mode also reads a 10,000-event stream next to `raw-fetch` and prints the
//! statements per single-event append that `pg_stat_statements` counted (when the cluster
//! loads it).
//!
//! Database: `TRACKTRACE_BENCH_PG=private` creates a cluster with PostgreSQL's default
//! settings for the run (`initdb` into a temp folder, a free loopback port; see
//! `tracktrace_benches::private_pg`); otherwise `TRACKTRACE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`).
//! Without a reachable database the bench prints a message and measures nothing (under
//! `CI=true` it fails instead). Everything lives in a fresh schema, dropped at the end.
//!
//! Run: `cargo bench -p tracktrace-benches --bench postgres -- --warm-up-time 1 --measurement-time 3`
//! (`-- --test` runs every bench once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use tokio::runtime::Runtime;
use tracktrace_benches::private_pg::PrivatePostgres;
use tracktrace_benches::{BATCH, bench_store, configure, event, runtime, seed_stream, tenant};
use tracktrace_core::{EventStore, EventStoreExt, StreamId};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};
use uuid::Uuid;

const URL_VAR: &str = "TRACKTRACE_TEST_DATABASE_URL";
/// Length of the stream of the `read_stream_10000` group.
const LONG_STREAM: usize = 10_000;

const RAW_TABLE: &str = "CREATE TABLE raw_events (
    position     bigserial PRIMARY KEY,
    tenant       text NOT NULL,
    stream       text NOT NULL,
    version      bigint NOT NULL,
    event_id     uuid NOT NULL,
    event_type   text NOT NULL,
    content_type text NOT NULL,
    payload      bytea NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, stream, version)
)";

/// `raw_events` plus the one index an idempotent store cannot do without: event ids unique per
/// tenant (what the store's `(event_id, tenant)` index enforces). The interleaved mode reports
/// the ratio to it too, to tell the cost of that index from the store's own overhead.
const RAW_IDEM_TABLE: &str =
    "CREATE TABLE raw_events_idem (LIKE raw_events INCLUDING ALL, UNIQUE (event_id, tenant))";

const RAW_INSERT: &str = "INSERT INTO raw_events (tenant, stream, version, event_id, event_type, \
     content_type, payload) VALUES ($1, $2, $3, $4, $5, $6, $7)";

const RAW_UNNEST: &str = "INSERT INTO raw_events (tenant, stream, version, event_id, event_type, \
     content_type, payload) SELECT $1, $2, v, id, ty, ct, pl \
     FROM unnest($3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::bytea[]) AS u(v, id, ty, ct, pl)";

const RAW_IDEM_INSERT: &str = "INSERT INTO raw_events_idem (tenant, stream, version, event_id, \
     event_type, content_type, payload) VALUES ($1, $2, $3, $4, $5, $6, $7)";

const RAW_IDEM_UNNEST: &str = "INSERT INTO raw_events_idem (tenant, stream, version, event_id, \
     event_type, content_type, payload) SELECT $1, $2, v, id, ty, ct, pl \
     FROM unnest($3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::bytea[]) AS u(v, id, ty, ct, pl)";

/// A raw writer on its own connection, appending to its own stream.
struct Raw {
    conn: PgConnection,
    stream: String,
    version: i64,
    payload: Vec<u8>,
    /// Writes to `raw_events_idem` instead of `raw_events`.
    idem: bool,
}

impl Raw {
    async fn new(opts: &PgConnectOptions) -> Raw {
        let payload = event(0).payload.to_vec();
        Raw {
            conn: opts.connect().await.expect("raw connection"),
            stream: format!("raw-{:016x}", fastrand::u64(..)),
            version: 0,
            payload,
            idem: false,
        }
    }

    /// A writer into `raw_events_idem`.
    async fn idem(opts: &PgConnectOptions) -> Raw {
        Raw {
            idem: true,
            ..Raw::new(opts).await
        }
    }

    async fn insert_one(&mut self) {
        self.version += 1;
        sqlx::query(if self.idem {
            RAW_IDEM_INSERT
        } else {
            RAW_INSERT
        })
        .bind("bench")
        .bind(&self.stream)
        .bind(self.version)
        .bind(Uuid::now_v7())
        .bind("BagScanned")
        .bind("application/json")
        .bind(&self.payload)
        .execute(&mut self.conn)
        .await
        .expect("raw insert");
    }

    async fn insert_batch(&mut self, n: usize) {
        let versions: Vec<i64> = (1..=n as i64).map(|i| self.version + i).collect();
        self.version += n as i64;
        sqlx::query(if self.idem {
            RAW_IDEM_UNNEST
        } else {
            RAW_UNNEST
        })
        .bind("bench")
        .bind(&self.stream)
        .bind(versions)
        .bind((0..n).map(|_| Uuid::now_v7()).collect::<Vec<_>>())
        .bind(vec!["BagScanned"; n])
        .bind(vec!["application/json"; n])
        .bind(vec![&self.payload[..]; n])
        .execute(&mut self.conn)
        .await
        .expect("raw batch insert");
    }

    async fn fetch_stream(&mut self) -> usize {
        let rows: Vec<(i64, i64, Uuid, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT position, version, event_id, event_type, content_type, payload \
             FROM raw_events WHERE tenant = $1 AND stream = $2 ORDER BY version",
        )
        .bind("bench")
        .bind(&self.stream)
        .fetch_all(&mut self.conn)
        .await
        .expect("raw fetch");
        rows.len()
    }
}

/// Every raw writer inserts `per_writer` single rows, all at once; the wall time.
async fn raw_concurrent(writers: &mut Vec<Raw>, per_writer: u64) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = writers
        .drain(..)
        .map(|mut w| {
            tokio::spawn(async move {
                for _ in 0..per_writer {
                    w.insert_one().await;
                }
                w
            })
        })
        .collect();
    for t in tasks {
        writers.push(t.await.expect("raw writer"));
    }
    start.elapsed()
}

fn raw_baselines(c: &mut Criterion, rt: &Runtime, opts: &PgConnectOptions) {
    let mut one = rt.block_on(Raw::new(opts));
    let mut g = c.benchmark_group("append_1");
    configure(&mut g, 1);
    g.bench_function("raw-insert-1conn", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    one.insert_one().await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("append_batch_100");
    configure(&mut g, BATCH as u64);
    g.bench_function("raw-unnest-100", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    one.insert_batch(BATCH).await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let mut writers: Vec<Raw> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(Raw::new(opts).await);
        }
        v
    });
    let mut g = c.benchmark_group("concurrent_8");
    configure(&mut g, 8);
    g.bench_function("raw-insert-8conn", |b| {
        b.iter_custom(|iters| rt.block_on(raw_concurrent(&mut writers, iters)))
    });
    g.finish();

    let mut reader = rt.block_on(Raw::new(opts));
    rt.block_on(async {
        for _ in 0..LONG_STREAM / BATCH {
            reader.insert_batch(BATCH).await;
        }
    });
    let mut g = c.benchmark_group("read_stream_10000");
    configure(&mut g, LONG_STREAM as u64);
    g.bench_function("raw-fetch", |b| {
        b.iter(|| assert_eq!(rt.block_on(reader.fetch_stream()), LONG_STREAM))
    });
    g.finish();
}

fn long_stream_read(c: &mut Criterion, rt: &Runtime, store: &Arc<dyn EventStore>) {
    let stream: StreamId = rt
        .block_on(seed_stream(store.as_ref(), LONG_STREAM))
        .expect("seed long stream");
    let mut g = c.benchmark_group("read_stream_10000");
    configure(&mut g, LONG_STREAM as u64);
    g.bench_function("postgres", |b| {
        b.iter(|| {
            let n = rt
                .block_on(store.read_stream_forwards(&tenant(), &stream))
                .expect("read stream")
                .len();
            assert_eq!(n, LONG_STREAM);
        })
    });
    g.finish();
}

/// `TRACKTRACE_BENCH_INTERLEAVE=<rounds>`: instead of criterion, alternate short runs of each
/// raw baseline and the store's matching workload, round after round, and print every round's
/// ratio and the median. On a shared, noisy machine this keeps slow phases from landing on one
/// side only (criterion measures all raw baselines first, then the store).
fn interleaved(rt: &Runtime, opts: &PgConnectOptions, store: &Arc<dyn EventStore>, rounds: usize) {
    const ONE: u64 = 400;
    const PER_WRITER: u64 = 250;
    const BATCHES: u64 = 40;
    const READS: u32 = 3;
    let (mut one, mut idem_one, mut writers, mut idem_writers, mut reader, long) =
        rt.block_on(async {
            let (mut w, mut wi) = (Vec::new(), Vec::new());
            for _ in 0..8 {
                w.push(Raw::new(opts).await);
                wi.push(Raw::idem(opts).await);
            }
            let mut reader = Raw::new(opts).await;
            for _ in 0..LONG_STREAM / BATCH {
                reader.insert_batch(BATCH).await;
            }
            let long = seed_stream(store.as_ref(), LONG_STREAM)
                .await
                .expect("seed long stream");
            (
                Raw::new(opts).await,
                Raw::idem(opts).await,
                w,
                wi,
                reader,
                long,
            )
        });
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    // Ratios per round: [1 conn, 8 conns, batches] against raw and against raw + id index,
    // and the read ratio.
    let mut ratios: [Vec<f64>; 7] = Default::default();
    for round in 1..=rounds {
        let r = rt.block_on(async {
            let mut ones = Vec::new();
            for raw in [&mut one, &mut idem_one] {
                let t = Instant::now();
                for _ in 0..ONE {
                    raw.insert_one().await;
                }
                ones.push(rate(ONE, t.elapsed()));
            }
            let stream = tracktrace_benches::fresh_stream("interleaved");
            let t = Instant::now();
            for i in 0..ONE {
                tracktrace_benches::append_one(store.as_ref(), &stream, i)
                    .await
                    .expect("append");
            }
            let ours1 = rate(ONE, t.elapsed());
            let raw8 = rate(
                8 * PER_WRITER,
                raw_concurrent(&mut writers, PER_WRITER).await,
            );
            let raw8i = rate(
                8 * PER_WRITER,
                raw_concurrent(&mut idem_writers, PER_WRITER).await,
            );
            let d = tracktrace_benches::concurrent_appends(store, 8, PER_WRITER)
                .await
                .expect("concurrent appends");
            let ours8 = rate(8 * PER_WRITER, d);
            let events = BATCHES * BATCH as u64;
            let mut batches = Vec::new();
            for raw in [&mut one, &mut idem_one] {
                let t = Instant::now();
                for _ in 0..BATCHES {
                    raw.insert_batch(BATCH).await;
                }
                batches.push(rate(events, t.elapsed()));
            }
            let stream = tracktrace_benches::fresh_stream("interleaved-batch");
            let t = Instant::now();
            for _ in 0..BATCHES {
                tracktrace_benches::append_batch(store.as_ref(), &stream, BATCH)
                    .await
                    .expect("batch append");
            }
            let oursb = rate(events, t.elapsed());
            let t = Instant::now();
            for _ in 0..READS {
                assert_eq!(reader.fetch_stream().await, LONG_STREAM);
            }
            let rawr = t.elapsed() / READS;
            let t = Instant::now();
            for _ in 0..READS {
                let n = store
                    .read_stream_forwards(&tenant(), &long)
                    .await
                    .expect("read stream")
                    .len();
                assert_eq!(n, LONG_STREAM);
            }
            let oursr = t.elapsed() / READS;
            [
                (ones[0], ones[1], ours1),
                (raw8, raw8i, ours8),
                (batches[0], batches[1], oursb),
                (
                    rawr.as_secs_f64() * 1e3,
                    oursr.as_secs_f64() * 1e3,
                    oursr.as_secs_f64() / rawr.as_secs_f64(),
                ),
            ]
        });
        let [(r1, r1i, o1), (r8, r8i, o8), (rb, rbi, ob), (rr, or, read)] = r;
        println!(
            "round {round}: 1 conn raw {r1:.0}/s raw+id {r1i:.0}/s ours {o1:.0}/s ({:.0} % / \
             {:.0} %); 8 conns raw {r8:.0}/s raw+id {r8i:.0}/s ours {o8:.0}/s ({:.0} % / {:.0} %); \
             batches of {BATCH} raw {rb:.0} raw+id {rbi:.0} ours {ob:.0} ev/s ({:.0} % / {:.0} %); \
             read {LONG_STREAM} raw {rr:.1} ms ours {or:.1} ms ({read:.2}x)",
            100.0 * o1 / r1,
            100.0 * o1 / r1i,
            100.0 * o8 / r8,
            100.0 * o8 / r8i,
            100.0 * ob / rb,
            100.0 * ob / rbi,
        );
        for (v, x) in ratios.iter_mut().zip([
            o1 / r1,
            o1 / r1i,
            o8 / r8,
            o8 / r8i,
            ob / rb,
            ob / rbi,
            read,
        ]) {
            v.push(x);
        }
    }
    let mut m = ratios.map(|mut v| tracktrace_benches::median(&mut v));
    for x in &mut m[..6] {
        *x *= 100.0;
    }
    println!(
        "median of {rounds} rounds (of raw / of raw with the event-id index): 1 conn {:.0} % / \
         {:.0} %, 8 conns {:.0} % / {:.0} %, batches of {BATCH} {:.0} % / {:.0} %; read of \
         {LONG_STREAM} events {:.2}x raw",
        m[0], m[1], m[2], m[3], m[4], m[5], m[6]
    );
}

/// Statements per single-event append from `pg_stat_statements` (when the extension can be
/// created: the bench's private cluster preloads it), measured on a fresh stream.
fn statements_per_append(rt: &Runtime, opts: &PgConnectOptions, store: &Arc<dyn EventStore>) {
    const N: u64 = 200;
    rt.block_on(async {
        let mut conn = opts.connect().await.expect("stats connection");
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await
            .ok();
        // Wherever the extension lives (it may predate this schema).
        let ext: Option<String> = sqlx::query_scalar(
            "SELECT quote_ident(extnamespace::regnamespace::text) FROM pg_extension \
             WHERE extname = 'pg_stat_statements'",
        )
        .fetch_optional(&mut conn)
        .await
        .ok()
        .flatten();
        let Some(ext) = ext else {
            println!("statements per append: pg_stat_statements is not installed");
            return;
        };
        if sqlx::raw_sql(AssertSqlSafe(format!(
            "SELECT {ext}.pg_stat_statements_reset()"
        )))
        .execute(&mut conn)
        .await
        .is_err()
        {
            println!("statements per append: pg_stat_statements is not loaded on this cluster");
            return;
        }
        let stream = tracktrace_benches::fresh_stream("statements");
        // Warm-up: the first append prepares the statements.
        for i in 0..2 {
            tracktrace_benches::append_one(store.as_ref(), &stream, i)
                .await
                .expect("append");
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SELECT {ext}.pg_stat_statements_reset()"
        )))
        .execute(&mut conn)
        .await
        .expect("reset pg_stat_statements");
        for i in 0..N {
            tracktrace_benches::append_one(store.as_ref(), &stream, i)
                .await
                .expect("append");
        }
        let rows: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 60) \
             FROM {ext}.pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' \
             AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY calls DESC"
        )))
        .fetch_all(&mut conn)
        .await
        .expect("read pg_stat_statements");
        let total: i64 = rows.iter().map(|r| r.0).sum();
        println!(
            "statements per single-event append (pg_stat_statements, {N} appends, every \
             connection of the store): {:.2}",
            total as f64 / N as f64
        );
        for (calls, q) in rows {
            println!("  {calls:>5} {q}");
        }
    });
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = runtime();
    let private = match std::env::var("TRACKTRACE_BENCH_PG").as_deref() {
        Ok("private") => match PrivatePostgres::start() {
            Ok(pg) => Some(pg),
            Err(e) => panic!("postgres bench: cannot create a private cluster: {e}"),
        },
        _ => None,
    };
    let url = match &private {
        Some(pg) => pg.url(),
        None => std::env::var(URL_VAR)
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
    };
    if private.is_some() {
        println!("private PostgreSQL cluster with default settings at {url}");
    }
    let schema = format!("tt_bench_{:016x}", fastrand::u64(..));
    // `PgStore`'s defaults (10 connections, append groups of DEFAULT_APPEND_GROUPS, NOTIFY
    // on): what an application gets.
    let store = rt.block_on(PgStore::connect_with(
        PgStoreOptions::new(&url)
            .schema(&schema)
            .append_groups(
                std::env::var("TRACKTRACE_BENCH_PG_GROUPS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(tracktrace_store_postgres::DEFAULT_APPEND_GROUPS),
            )
            .notify(std::env::var("TRACKTRACE_BENCH_PG_NOTIFY").map_or(true, |v| v != "0"))
            .connect_timeout(Duration::from_secs(5)),
    ));
    let store = match store {
        Ok(s) => s,
        Err(e) if e.is_retryable() && std::env::var("CI").map_or(true, |v| v != "true") => {
            eprintln!(
                "\n=== postgres bench SKIPPED: no database at {url} ({e}).\n\
                 === Set {URL_VAR} to a reachable PostgreSQL to run it.\n"
            );
            return;
        }
        Err(e) => panic!("postgres bench: cannot connect to {url} (set {URL_VAR}): {e}"),
    };
    let opts: PgConnectOptions = url.parse().expect("database url");
    let opts = opts.options([("search_path", schema.as_str())]);
    rt.block_on(async {
        let mut conn = opts.connect().await.expect("raw connection");
        sqlx::raw_sql(RAW_TABLE)
            .execute(&mut conn)
            .await
            .expect("create raw table");
        sqlx::raw_sql(RAW_IDEM_TABLE)
            .execute(&mut conn)
            .await
            .expect("create raw table with the event-id index");
        conn.close().await.ok();
    });

    let dyn_store: Arc<dyn EventStore> = Arc::new(store.clone());
    match tracktrace_benches::interleave_rounds() {
        Some(rounds) => {
            interleaved(&rt, &opts, &dyn_store, rounds);
            statements_per_append(&rt, &opts, &dyn_store);
        }
        None => {
            raw_baselines(&mut c, &rt, &opts);
            bench_store(&mut c, &rt, "postgres", dyn_store.clone());
            long_stream_read(&mut c, &rt, &dyn_store);
        }
    }

    rt.block_on(async {
        let mut conn = opts.connect().await.expect("cleanup connection");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&mut conn)
        .await
        .ok();
    });
    c.final_summary();
}
