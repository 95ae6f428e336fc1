//! The shared workloads on `InMemoryStore` and the sled store (durable default and flush-only),
//! plus raw sled baselines measured in the same run: plain `insert` of a 200-byte value followed
//! by the same barrier the store uses (`flush()` + `fdatasync` of `db`), per event and per 100
//! events.
//!
//! `TRACKTRACE_BENCH_INTERLEAVE=<rounds>` alternates short runs of the raw baselines and the
//! durable store (one writer; 64 writers against a raw leader-based group commit) and prints
//! per-round and median ratios instead of running criterion.
//!
//! Run: `cargo bench -p tracktrace-benches --bench sled -- --warm-up-time 1 --measurement-time 3`
//! (`-- --test` runs every bench once, as CI does).

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use tracktrace_benches::{BATCH, EVENT_BYTES, bench_store, concurrent_appends, configure, runtime};
use tracktrace_core::{EventStore, InMemoryStore};
use tracktrace_store_sled::{Durability, SledOptions, SledStore};

/// A plain sled database with the barrier of `Durability::Fsync`.
struct RawSled {
    _dir: tempfile::TempDir,
    db: sled::Db,
    db_file: File,
    next: u64,
}

impl RawSled {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .expect("open raw sled");
        let db_file = File::open(dir.path().join("db")).expect("open db file");
        Self {
            _dir: dir,
            db,
            db_file,
            next: 0,
        }
    }

    fn insert(&mut self) {
        self.next += 1;
        self.db
            .insert(self.next.to_be_bytes(), &[7u8; EVENT_BYTES][..])
            .expect("raw insert");
    }

    fn barrier(&self) {
        self.db.flush().expect("raw flush");
        self.db_file.sync_data().expect("raw fdatasync");
    }
}

fn raw_baselines(c: &mut Criterion) {
    let mut raw = RawSled::new();
    let mut g = c.benchmark_group("append_1");
    configure(&mut g, 1);
    g.bench_function("raw-sled-insert+barrier", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                raw.insert();
                raw.barrier();
            }
            start.elapsed()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("append_batch_100");
    configure(&mut g, BATCH as u64);
    g.bench_function("raw-sled-insert+barrier-every-100", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for _ in 0..BATCH {
                    raw.insert();
                }
                raw.barrier();
            }
            start.elapsed()
        })
    });
    g.bench_function("raw-sled-insert+flush-every-100", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for _ in 0..BATCH {
                    raw.insert();
                }
                raw.db.flush().expect("raw flush");
            }
            start.elapsed()
        })
    });
    g.finish();
}

fn stores(c: &mut Criterion) {
    let rt = runtime();
    bench_store(c, &rt, "memory", Arc::new(InMemoryStore::new()));
    for (name, durability) in [
        ("sled-fsync", Durability::Fsync),
        ("sled-flush", Durability::Flush),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let sled = SledStore::open(SledOptions::new(dir.path()).durability(durability))
            .expect("open sled store");
        let store: Arc<dyn EventStore> = Arc::new(sled.clone());
        // Untimed probe: how many appends share a barrier with 64 concurrent appenders.
        let before = sled.stats();
        rt.block_on(concurrent_appends(&store, 64, 20))
            .expect("group commit probe");
        let after = sled.stats();
        let (appends, barriers) = (
            after.appends - before.appends,
            after.barriers - before.barriers,
        );
        eprintln!(
            "{name}: group commit probe: {appends} appends from 64 concurrent appenders shared \
             {barriers} barriers ({:.1} appends per barrier)",
            appends as f64 / barriers.max(1) as f64
        );
        bench_store(c, &rt, name, store);
    }
}

/// Raw sled group commit: `writers` threads insert their own keys; each then waits until a
/// barrier that started after its insert has finished. The first waiter to find no barrier
/// running runs one (`flush` + `fdatasync`) for everything inserted so far (leader-based group
/// commit, the classic shape). Returns the wall time for `per_writer` inserts per thread.
fn raw_group_commit(raw: &RawSled, writers: usize, per_writer: u64) -> std::time::Duration {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex};
    // (barrier running, barriers finished).
    let state = (Mutex::new((false, 0u64)), Condvar::new());
    let next = AtomicU64::new(1 << 40);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..writers {
            scope.spawn(|| {
                for _ in 0..per_writer {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    raw.db
                        .insert(k.to_be_bytes(), &[7u8; EVENT_BYTES][..])
                        .expect("raw insert");
                    let (lock, cv) = &state;
                    let mut st = lock.lock().expect("group commit lock");
                    // A barrier that is already running may have missed this insert: wait for
                    // it and for one that starts after it.
                    let need = st.1 + if st.0 { 2 } else { 1 };
                    while st.1 < need {
                        if st.0 {
                            st = cv.wait(st).expect("group commit wait");
                            continue;
                        }
                        st.0 = true;
                        drop(st);
                        raw.barrier();
                        st = lock.lock().expect("group commit lock");
                        st.0 = false;
                        st.1 += 1;
                        cv.notify_all();
                    }
                }
            });
        }
    });
    start.elapsed()
}

/// `TRACKTRACE_BENCH_INTERLEAVE=<rounds>`: instead of criterion, alternate short runs of each
/// raw baseline and the durable store's matching workload, round after round, and print every
/// round's ratio and the median: one writer (insert + barrier per event) and 64 writers (raw
/// group commit vs 64 concurrent appenders).
fn interleaved(rounds: usize) {
    const ONE: u64 = 300;
    const PER_WRITER: u64 = 40;
    const WRITERS: usize = 64;
    let rt = runtime();
    let mut raw = RawSled::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let sled = SledStore::open(SledOptions::new(dir.path())).expect("open sled store");
    let store: Arc<dyn EventStore> = Arc::new(sled.clone());
    let rate = |n: u64, d: std::time::Duration| n as f64 / d.as_secs_f64();
    let (mut r1, mut r64) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let t = Instant::now();
        for _ in 0..ONE {
            raw.insert();
            raw.barrier();
        }
        let raw1 = rate(ONE, t.elapsed());
        let stream = tracktrace_benches::fresh_stream("interleaved");
        let t = Instant::now();
        rt.block_on(async {
            for i in 0..ONE {
                tracktrace_benches::append_one(store.as_ref(), &stream, i)
                    .await
                    .expect("append");
            }
        });
        let ours1 = rate(ONE, t.elapsed());
        let raw64 = rate(
            WRITERS as u64 * PER_WRITER,
            raw_group_commit(&raw, WRITERS, PER_WRITER),
        );
        let before = sled.stats();
        let d = rt
            .block_on(concurrent_appends(&store, WRITERS, PER_WRITER))
            .expect("concurrent appends");
        let after = sled.stats();
        let ours64 = rate(WRITERS as u64 * PER_WRITER, d);
        println!(
            "round {round}: 1 writer raw {raw1:.0}/s ours {ours1:.0}/s ({:.0} %); \
             {WRITERS} writers raw {raw64:.0}/s ours {ours64:.0}/s ({:.0} %, {:.1} appends \
             per barrier)",
            100.0 * ours1 / raw1,
            100.0 * ours64 / raw64,
            (after.appends - before.appends) as f64
                / (after.barriers - before.barriers).max(1) as f64
        );
        r1.push(ours1 / raw1);
        r64.push(ours64 / raw64);
    }
    let median = tracktrace_benches::median;
    println!(
        "median of {rounds} rounds: 1 writer {:.0} % of raw, {WRITERS} writers {:.0} % of raw",
        100.0 * median(&mut r1),
        100.0 * median(&mut r64)
    );
}

criterion_group!(benches, raw_baselines, stores);

fn main() {
    match tracktrace_benches::interleave_rounds() {
        Some(rounds) => interleaved(rounds),
        None => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
