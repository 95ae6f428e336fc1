//! Memory soak of the milestone watch (not a criterion bench; feature `soak`): drives
//! `ENTITIES` bags (default 1,000,000) through the milestone watch's saga runner on a sled
//! store, each loaded and then arriving on time, with about `CHUNK` (default 10,000) watches
//! open at any moment, and reports the process's peak RSS (`VmHWM` of `/proc/self/status`), the
//! most instances the runner held, and the time and records a restart takes after that long
//! saga history and after a short one (`SHORT` bags, default 10,000, in a fresh store).
//!
//! ```text
//! cargo run --release -p tracktrace-benches --features soak --bin milestone_soak -- \
//!     [ENTITIES] [SHORT] [CHUNK]
//! ```
//!
//! sled runs with `Durability::Buffered` (the soak measures memory, not durability) and its
//! default 256 MiB page cache, which is part of the RSS. With `SOAK_STORE_ONLY=1` the same
//! appends run without the milestone watch: the RSS of the store alone, to subtract.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracktrace_app::capture::service::CaptureService;
use tracktrace_app::milestone::rules::{self, MilestoneRule};
use tracktrace_app::milestone::{CaptureDispatcher, MilestoneWatch};
use tracktrace_conformance::runtime::{CountingStore, RuntimeStores};
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, SagaRunner, TenantId, Timestamp,
};
use tracktrace_domain::{Location, OPERATIONAL_EVENT, StoredEvent, entity_stream, format_micros};
use tracktrace_store_sled::{Durability, SledOptions, SledStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Runner = SagaRunner<MilestoneWatch, CaptureDispatcher>;

/// Concurrent appends of milestones (sled groups them into one commit).
const APPENDERS: usize = 64;

fn status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// `SOAK_STORE_ONLY=1`: the appends without the milestone watch (the store's own RSS).
fn store_only() -> bool {
    std::env::var("SOAK_STORE_ONLY").is_ok_and(|v| v == "1")
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn tenant() -> TenantId {
    TenantId::parse("soak").expect("tenant literal")
}

fn milestone(bag: usize, event_type: &str, at_us: i64) -> NewEvent {
    let stored = StoredEvent {
        event_type: event_type.into(),
        entity_id: format!("B{bag:07}"),
        entity_type: "Bag".into(),
        occurred_at: format_micros(at_us),
        occurred_at_us: at_us,
        location: Location {
            code: "MAD".into(),
            detail: None,
        },
        source: "soak".into(),
        attributes: serde_json::Map::new(),
        related_entities: Vec::new(),
        received_at_us: Timestamp::now().unix_micros(),
        submitted_by: "soak".into(),
        event_id: None,
        dedup_key: None,
    };
    NewEvent::json(
        OPERATIONAL_EVENT,
        &serde_json::to_value(&stored).expect("stored event as JSON"),
    )
}

/// Appends one milestone per bag of `bags`, `APPENDERS` at a time.
async fn capture(
    store: &Arc<SledStore>,
    bags: std::ops::Range<usize>,
    event_type: &'static str,
    at_us: i64,
) -> Result<(), BoxError> {
    let mut tasks = JoinSet::new();
    for bag in bags {
        if tasks.len() >= APPENDERS
            && let Some(r) = tasks.join_next().await
        {
            r??;
        }
        let store = store.clone();
        tasks.spawn(async move {
            let stream = entity_stream("Bag", &format!("B{bag:07}"))?;
            store
                .append_to(
                    &tenant(),
                    &stream,
                    ExpectedVersion::Any,
                    vec![milestone(bag, event_type, at_us)],
                )
                .await?;
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn runner(events: Arc<dyn EventStore>, stores: &RuntimeStores) -> Result<Runner, BoxError> {
    Ok(SagaRunner::new(
        events.clone(),
        stores.read_models.clone(),
        MilestoneWatch::load(events.clone()).await?,
        CaptureDispatcher::new(CaptureService::new(events)),
    ))
}

struct Soaked {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    most_instances: usize,
    handled: usize,
    took: Duration,
}

/// Drives `entities` bags through a fresh store's milestone watch.
async fn soak(entities: usize, chunk: usize, verbose: bool) -> Result<Soaked, BoxError> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(SledOptions::new(dir.path()).durability(
        Durability::Buffered {
            flush_every_ms: 1000,
        },
    ))?);
    let rule = MilestoneRule {
        id: "bag-arrival".into(),
        entity_type: "Bag".into(),
        trigger_event_type: "LOADED".into(),
        expected_event_types: vec!["ARRIVED".into()],
        within_ms: 2 * 3_600_000,
    };
    rules::set(&*store, &tenant(), &rule, "soak").await?;
    let stores = RuntimeStores::from_store(store.clone());
    let mut r = runner(store.clone(), &stores).await?;
    let started = Instant::now();
    let t0 = Timestamp::now().unix_micros();
    let (mut most_instances, mut handled) = (0, 0);
    let chunks = entities.div_ceil(chunk);
    for c in 0..=chunks {
        // This chunk is loaded, the previous one arrives (on time): about one chunk of
        // watches is open at any moment.
        if c < chunks {
            let bags = c * chunk..((c + 1) * chunk).min(entities);
            capture(&store, bags, "LOADED", t0).await?;
        }
        if c > 0 {
            let bags = (c - 1) * chunk..(c * chunk).min(entities);
            capture(&store, bags, "ARRIVED", t0 + 60_000_000).await?;
        }
        if store_only() {
            handled += 2 * (((c + 1) * chunk).min(entities) - (c * chunk).min(entities));
        } else {
            let p = r.run_once().await?;
            handled += p.triggers;
        }
        most_instances = most_instances.max(r.instances_in_memory());
        if verbose && (c % 10 == 0 || c == chunks) {
            println!(
                "  {:>9} bags  {:>7} instances in memory  VmRSS {:>12}  VmHWM {:>12}  {:>6.1} s",
                (c * chunk).min(entities),
                r.instances_in_memory(),
                status("VmRSS:"),
                status("VmHWM:"),
                started.elapsed().as_secs_f64()
            );
        }
    }
    if handled != 2 * entities {
        return Err(format!("{handled} milestones handled, expected {}", 2 * entities).into());
    }
    if r.instances_in_memory() != 0 {
        return Err(format!("{} instances left in memory", r.instances_in_memory()).into());
    }
    Ok(Soaked {
        _dir: dir,
        store,
        most_instances,
        handled,
        took: started.elapsed(),
    })
}

/// A restart: a new runner's first round (recovery, then nothing new) after the rules are
/// loaded. Returns the time to load the rules, the round's time and the records and index
/// entries the round read.
async fn restart(store: &Arc<SledStore>) -> Result<(Duration, Duration, u64), BoxError> {
    let stores = RuntimeStores::from_store(store.clone());
    let counting = Arc::new(CountingStore::new(&stores));
    let rules_started = Instant::now();
    let watch = MilestoneWatch::load(store.clone()).await?;
    let rules_took = rules_started.elapsed();
    let mut r: Runner = SagaRunner::new(
        counting.clone(),
        counting.clone(),
        watch,
        CaptureDispatcher::new(CaptureService::new(store.clone())),
    );
    let started = Instant::now();
    let p = r.run_once().await?;
    let took = started.elapsed();
    if p.triggers != 0 || r.instances_in_memory() != 0 {
        return Err(format!("restart redid work: {p:?}").into());
    }
    Ok((rules_took, took, counting.read()))
}

fn main() -> Result<(), BoxError> {
    let entities = arg(1, 1_000_000);
    let short = arg(2, 10_000);
    let chunk = arg(3, 10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("milestone watch soak: {entities} bags (chunks of {chunk}) on sled");
        let long = soak(entities, chunk, true).await?;
        if store_only() {
            println!("store only: peak RSS (VmHWM) {}", status("VmHWM:"));
            return Ok(());
        }
        let head = long.store.head().await?;
        println!(
            "long history: {} milestones in {:.1} s ({:.0}/s), most instances in memory {}, log head {head}",
            long.handled,
            long.took.as_secs_f64(),
            long.handled as f64 / long.took.as_secs_f64(),
            long.most_instances,
        );
        println!("peak RSS (VmHWM) after the long history: {}", status("VmHWM:"));
        let (rules, took, read) = restart(&long.store).await?;
        println!(
            "restart after {entities} bags: runner's first round {:.1} ms, {read} records and index entries read (rules loaded in {:.1} ms)",
            took.as_secs_f64() * 1e3,
            rules.as_secs_f64() * 1e3
        );
        drop(long);
        let short = soak(short, chunk.min(short.max(1)), false).await?;
        let (rules, took, read) = restart(&short.store).await?;
        println!(
            "restart after {} bags: runner's first round {:.1} ms, {read} records and index entries read (rules loaded in {:.1} ms)",
            short.handled / 2,
            took.as_secs_f64() * 1e3,
            rules.as_secs_f64() * 1e3
        );
        Ok(())
    })
}
