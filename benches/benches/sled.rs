//! The shared workloads on `InMemoryStore` and the sled store (durable default and flush-only),
//! plus raw sled baselines measured in the same run: plain `insert` of a 200-byte value followed
//! by the same barrier the store uses (`flush()` + `fdatasync` of `db`), per event and per 100
//! events.
//!
//! Run: `cargo bench -p tracktrace-benches --bench sled -- --warm-up-time 1 --measurement-time 3`
//! (`-- --test` runs every bench once, as CI does).

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
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

criterion_group!(benches, raw_baselines, stores);
criterion_main!(benches);
