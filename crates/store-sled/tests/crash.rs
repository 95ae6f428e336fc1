//! Crash consistency with a real child process and `kill -9` (SIGKILL).
//!
//! The test binary re-executes itself as the child (env `TRACKTRACE_CRASH_CHILD=<dir>`): it opens
//! the store with the default durability and appends batches from several concurrent tasks,
//! printing one line per *acknowledged* batch. The parent kills it at a random moment, reopens
//! the store and checks that every acknowledged event is present and intact, that no batch is
//! partly visible, that versions are contiguous, that the global log is ordered without gaps,
//! that the recovered event count is the log's length, and that new appends work. Round after
//! round on the same directory.
//!
//! The first `TRACKTRACE_CRASH_ROUNDS` rounds (default 24) use the default durability
//! (`Durability::Fsync`); then `TRACKTRACE_CRASH_FLUSH_ROUNDS` rounds (default 6) use the opt-in
//! `Durability::Flush`, which claims to survive a process crash too. `TRACKTRACE_CRASH_SEED`
//! makes a run reproducible.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracktrace_core::{
    EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position,
    RecordedEvent, StreamId, TenantId, Version,
};
use tracktrace_store_sled::{Durability, OpenError, SledOptions, SledStore};

const CHILD_ENV: &str = "TRACKTRACE_CRASH_CHILD";
/// `fsync` or `flush`: the durability mode of the child.
const CHILD_MODE_ENV: &str = "TRACKTRACE_CRASH_CHILD_MODE";
const TASKS: usize = 8;

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    // `cargo test` passes harness flags such as `--list` or a name filter; honour `--list`.
    if std::env::args().any(|a| a == "--list") {
        println!("crash_consistency_under_kill_9: test");
        return;
    }
    parent();
    println!("test crash_consistency_under_kill_9 ... ok");
}

fn tenant() -> TenantId {
    TenantId::parse("crash").unwrap()
}

/// The payload of event `idx` of batch `batch` holding `n` events.
fn payload(batch: u64, idx: usize, n: usize) -> String {
    format!("{batch:016x}:{idx}:{n}")
}

// ---------------------------------------------------------------------------------------------
// child

fn child(dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let durability = match std::env::var(CHILD_MODE_ENV).as_deref() {
            Ok("flush") => Durability::Flush,
            _ => Durability::Fsync,
        };
        let store = Arc::new(
            SledStore::open(SledOptions::new(dir).durability(durability))
                .expect("child opens the store"),
        );
        println!("READY");
        std::io::stdout().flush().unwrap();
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(append_forever(store, task)));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

async fn append_forever(store: Arc<SledStore>, task: usize) {
    let t = tenant();
    let own = StreamId::parse(format!("own-{task}")).unwrap();
    let shared = StreamId::parse("shared").unwrap();
    let mut version = store.stream_version(&t, &own).await.unwrap();
    let mut rng = fastrand::Rng::new();
    loop {
        let n = rng.usize(1..=4);
        let batch = rng.u64(..);
        let events: Vec<NewEvent> = (0..n)
            .map(|i| {
                let e = NewEvent::new("Crash", "text/plain", payload(batch, i, n));
                if rng.bool() {
                    e.with_dedup_key(format!("dk-{batch:016x}-{i}"))
                } else {
                    e
                }
            })
            .collect();
        let to_shared = rng.u8(..) < 80;
        let (stream, expected) = if to_shared {
            (&shared, ExpectedVersion::Any)
        } else {
            (&own, ExpectedVersion::Exact(version))
        };
        let out = store
            .append_to(&t, stream, expected, events)
            .await
            .expect("append in the child");
        if !to_shared {
            version = out.last_version();
        }
        let ids: Vec<String> = out.events.iter().map(|r| r.event_id.to_string()).collect();
        let positions: Vec<String> = out.events.iter().map(|r| r.position.to_string()).collect();
        // One write per line so a line is either whole or (when killed mid-write) cut short.
        let line = format!(
            "ACK {stream} {} {n} {batch:016x} {} {}\n",
            out.events[0].version,
            ids.join(","),
            positions.join(",")
        );
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes()).unwrap();
        out.flush().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// parent

#[derive(Debug, Clone)]
struct Ack {
    stream: String,
    first_version: u64,
    n: usize,
    batch: u64,
    ids: Vec<EventId>,
    positions: Vec<u64>,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut f = line.strip_prefix("ACK ")?.split(' ');
    let stream = f.next()?.to_owned();
    let first_version = f.next()?.parse().ok()?;
    let n = f.next()?.parse().ok()?;
    let batch = u64::from_str_radix(f.next()?, 16).ok()?;
    let ids = f
        .next()?
        .split(',')
        .map(|s| EventId::parse(s).ok())
        .collect::<Option<Vec<_>>>()?;
    let positions = f
        .next()?
        .split(',')
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<_>>>()?;
    (ids.len() == n && positions.len() == n).then_some(Ack {
        stream,
        first_version,
        n,
        batch,
        ids,
        positions,
    })
}

fn parent() {
    let rounds: usize = std::env::var("TRACKTRACE_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let flush_rounds: usize = std::env::var("TRACKTRACE_CRASH_FLUSH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("TRACKTRACE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!(
        "crash test: {rounds} rounds with Durability::Fsync, {flush_rounds} with Durability::Flush, \
         TRACKTRACE_CRASH_SEED={seed}"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut acked: Vec<Ack> = Vec::new();
    let mut killed_before_ready = 0;
    let (mut repaired_total, mut repaired_rounds) = (0u64, 0usize);
    for round in 0..rounds + flush_rounds {
        let mode = if round < rounds { "fsync" } else { "flush" };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, dir.path())
            .env(CHILD_MODE_ENV, mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut lines = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.ends_with('\n') => {
                        if line == "READY\n" {
                            let _ = ready_tx.send(());
                        } else {
                            lines.push(line.trim_end().to_owned());
                        }
                    }
                    // A line cut short by the kill: its batch was acknowledged, but the line is
                    // unreadable, so it is not checked.
                    Ok(_) => break,
                }
            }
            lines
        });
        // Every fifth round kills the child early, possibly during sled's recovery.
        if round % 5 == 4 {
            std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
            killed_before_ready += 1;
        } else {
            ready_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the child opened the store");
            if round == 0 {
                // The directory is held by another process now.
                let err = SledStore::open_path(dir.path()).unwrap_err();
                assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
                assert!(err.to_string().contains("in use by another process"));
            }
            std::thread::sleep(Duration::from_millis(rng.u64(1..250)));
        }
        child.kill().expect("kill -9 the child");
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child must have been killed");
        let lines = reader.join().unwrap();
        let before = acked.len();
        for l in &lines {
            acked.push(parse_ack(l).unwrap_or_else(|| panic!("malformed ack line {l:?}")));
        }
        let store = SledStore::open_path(dir.path()).expect("reopen after kill -9");
        let repaired = store.stats().repaired;
        repaired_total += repaired;
        repaired_rounds += usize::from(repaired > 0);
        rt.block_on(verify(&store, &acked, round));
        drop(store);
        eprintln!(
            "round {round} ({mode}): {} batches acknowledged ({} in total), {repaired} \
             unacknowledged events removed on open, verified",
            acked.len() - before,
            acked.len()
        );
    }
    let elapsed = started.elapsed();
    assert!(
        acked.len() >= rounds,
        "too few acknowledged batches ({}) for the test to mean anything",
        acked.len()
    );
    eprintln!(
        "crash test: {} rounds ({killed_before_ready} killed early), {} acknowledged batches verified in {elapsed:?}; \
         the open-time repair removed {repaired_total} unacknowledged events in {repaired_rounds} rounds",
        rounds + flush_rounds,
        acked.len()
    );
}

async fn verify(store: &SledStore, acked: &[Ack], round: usize) {
    let t = tenant();
    let ctx = |what: String| format!("round {round}: {what}");

    // The global log: ordered, gap-free (this store's positions are contiguous).
    let all = store
        .read_all_to_end(Position::START, EventFilter::default())
        .await
        .unwrap_or_else(|e| panic!("{}", ctx(format!("read_all failed: {e}"))));
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            e.position.get(),
            i as u64 + 1,
            "{}",
            ctx("gap in the global log".into())
        );
    }
    assert_eq!(store.head().await.unwrap().get(), all.len() as u64);
    // The event count, recovered on open, is the log's length.
    let stats = store.store_stats().await.unwrap().unwrap();
    assert_eq!(
        stats.events,
        all.len() as u64,
        "{}",
        ctx("store_stats after recovery".into())
    );

    // No batch partly visible: every batch seen in the log is whole, with consecutive versions
    // and positions in one stream.
    let mut batches: BTreeMap<u64, Vec<&RecordedEvent>> = BTreeMap::new();
    for e in &all {
        let p = std::str::from_utf8(&e.payload).unwrap();
        let mut f = p.split(':');
        let batch = u64::from_str_radix(f.next().unwrap(), 16).unwrap();
        batches.entry(batch).or_default().push(e);
    }
    for (batch, evs) in &batches {
        let n = evs.len();
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(
                std::str::from_utf8(&e.payload).unwrap(),
                payload(*batch, i, n),
                "{}",
                ctx(format!("batch {batch:016x} is partly visible or damaged"))
            );
            assert_eq!(e.stream, evs[0].stream);
            assert_eq!(e.version.get(), evs[0].version.get() + i as u64);
            assert_eq!(e.position.get(), evs[0].position.get() + i as u64);
        }
    }

    // Versions contiguous in every stream, and the stream index agrees with the log.
    let mut per_stream: HashMap<StreamId, usize> = HashMap::new();
    for e in &all {
        *per_stream.entry(e.stream.clone()).or_default() += 1;
    }
    for (s, count) in &per_stream {
        let evs = store.read_stream_forwards(&t, s).await.unwrap();
        assert_eq!(evs.len(), *count, "{}", ctx(format!("stream {s}")));
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(
                e.version.get(),
                i as u64 + 1,
                "{}",
                ctx(format!("stream {s}"))
            );
        }
        assert_eq!(
            store.stream_version(&t, s).await.unwrap().get(),
            *count as u64
        );
    }

    // Every acknowledged event is present, intact, where the acknowledgement said.
    for a in acked {
        for (i, id) in a.ids.iter().enumerate() {
            let e = store
                .get_event(&t, *id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{}", ctx(format!("acknowledged event {id} lost"))));
            assert_eq!(
                e.stream.as_str(),
                a.stream,
                "{}",
                ctx(format!("event {id}"))
            );
            assert_eq!(e.version.get(), a.first_version + i as u64);
            assert_eq!(e.position.get(), a.positions[i]);
            assert_eq!(
                std::str::from_utf8(&e.payload).unwrap(),
                payload(a.batch, i, a.n)
            );
        }
    }

    // Re-appending an acknowledged batch is a duplicate with the original references.
    if let Some(a) = acked.last() {
        let stream = StreamId::parse(a.stream.clone()).unwrap();
        let again: Vec<NewEvent> = (0..a.n)
            .map(|i| {
                NewEvent::new("Crash", "text/plain", payload(a.batch, i, a.n)).with_id(a.ids[i])
            })
            .collect();
        let out = store
            .append_to(&t, &stream, ExpectedVersion::Any, again)
            .await
            .unwrap();
        assert!(
            out.duplicate,
            "{}",
            ctx("re-append of an acked batch".into())
        );
        let positions: Vec<u64> = out.events.iter().map(|r| r.position.get()).collect();
        assert_eq!(positions, a.positions);
    }

    // New appends work and land right after the recovered head.
    let check = StreamId::parse(format!("parent-check-{round}")).unwrap();
    let out = store
        .append_to(
            &t,
            &check,
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "Check",
                "text/plain",
                payload(u64::from(round as u32), 0, 1),
            )],
        )
        .await
        .unwrap();
    assert_eq!(out.last_version(), Version::new(1));
    assert_eq!(out.last_position().get(), all.len() as u64 + 1);
    let back = store.read_stream_forwards(&t, &check).await.unwrap();
    assert_eq!(back.len(), 1);
}
