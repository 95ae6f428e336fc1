//! Memory soak of the analytics engine: one KPI window of operational events (bags of 10
//! events, one tenant) in the in-memory store, computed once; prints the process's peak RSS
//! during the computation (VmHWM, reset just before it through `/proc/self/clear_refs`) next to
//! its RSS before it (the store's own events), and the time.
//!
//! The test suite runs it with 2,000 bags (20,000 events). The soak proper is 100,000 bags,
//! 1,000,000 events (a few GiB-seconds, tens of seconds):
//!
//! ```sh
//! TRACKTRACE_SOAK_BAGS=100000 cargo test --release -p tracktrace-app --test analytics_soak -- --nocapture
//! ```
//!
//! It asserts only what the window contains, never a time or a memory figure; it also prints a
//! digest of the whole KPI window, so that two builds' figures can be compared. Measured on 2
//! cores with 100,000 bags: the run
//! peaks 77–81 MiB above the store's 1,119 MiB in 2.6–3.2 s; with the former computation
//! (every observation collected, then sorted) 278–279 MiB in 3.1–4.1 s, same digest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracktrace_app::analytics::{Analytics, AnalyticsConfig};
use tracktrace_core::{
    EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent, TenantId, Timestamp,
};
use tracktrace_domain::{Location, OPERATIONAL_EVENT, StoredEvent, entity_stream, format_micros};

/// Bags in the window: `TRACKTRACE_SOAK_BAGS`, default 2,000.
fn bags() -> usize {
    std::env::var("TRACKTRACE_SOAK_BAGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

const EVENTS_PER_BAG: usize = 10;
const DAY_US: i64 = 86_400_000_000;

/// `VmRSS` or `VmHWM` of this process, KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_event_window() {
    let bags = bags();
    let store = Arc::new(InMemoryStore::new());
    let acme = TenantId::parse("acme").unwrap();
    let started = Timestamp::now().unix_micros();
    let t0 = started - 3_600_000_000;
    let types = ["CHECKED_IN", "SCANNED", "LOADED", "TRANSFERRED", "ARRIVED"];
    let locations = ["MAD", "LHR", "CDG", "FRA", "AMS", "JFK", "DXB", "SIN"];
    for bag in 0..bags {
        let entity = format!("bag-{bag:06}");
        let batch = (0..EVENTS_PER_BAG)
            .map(|k| {
                let at = t0 + (k as i64) * 120_000_000 + (bag as i64 % 600) * 1_000_000;
                let stored = StoredEvent {
                    event_type: types[k % types.len()].into(),
                    entity_id: entity.clone(),
                    entity_type: "Bag".into(),
                    occurred_at: format_micros(at),
                    occurred_at_us: at,
                    location: Location {
                        code: locations[(bag + k / 3) % locations.len()].into(),
                        detail: None,
                    },
                    source: "soak".into(),
                    attributes: serde_json::json!({"flight": "IB3166", "weightKg": 23})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    related_entities: Vec::new(),
                    // Every 20th event arrives 20 minutes late.
                    received_at_us: at
                        + if (bag + k) % 20 == 0 {
                            1_200_000_000
                        } else {
                            0
                        },
                    submitted_by: "soak".into(),
                    event_id: None,
                    dedup_key: None,
                };
                NewEvent::json(OPERATIONAL_EVENT, &serde_json::to_value(&stored).unwrap())
            })
            .collect();
        store
            .append_to(
                &acme,
                &entity_stream("Bag", &entity).unwrap(),
                ExpectedVersion::Any,
                batch,
            )
            .await
            .unwrap();
    }
    let analytics = Analytics::new(store.clone());
    analytics
        .configure(AnalyticsConfig {
            window: Duration::from_secs(86_400),
            grace: Duration::from_secs(1),
            lookback_windows: 1,
            schedule: false,
            ..AnalyticsConfig::default()
        })
        .unwrap();
    let from = started.div_euclid(DAY_US) * DAY_US;

    let rss_before = status_kib("VmRSS:");
    // Writing 5 resets the peak (VmHWM) to the current RSS (Linux ≥ 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let clock = Instant::now();
    let r = analytics
        .run(std::slice::from_ref(&acme), from, from + DAY_US)
        .await
        .unwrap();
    let elapsed = clock.elapsed();
    let peak = status_kib("VmHWM:");

    let k = &r.windows[0].kpis;
    // A digest of the whole KPI window, to compare the figures of two builds.
    let json = serde_json::to_string(k).unwrap();
    let digest = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        json.hash(&mut h);
        h.finish()
    };
    println!(
        "analytics soak: KPI window digest {digest:016x} ({} bytes of JSON)",
        json.len()
    );
    println!(
        "analytics soak: {} events, {} active entities, {} transit samples; run {:.2} s; \
         RSS before {} MiB, peak during the run {} MiB (+{} MiB){}",
        k.events,
        k.active_entities,
        k.transit.first().map_or(0, |t| t.stats.count),
        elapsed.as_secs_f64(),
        rss_before / 1024,
        peak / 1024,
        peak.saturating_sub(rss_before) / 1024,
        if reset {
            ""
        } else {
            " (VmHWM not reset: peak since start)"
        }
    );
    assert_eq!(
        k.events,
        bags * EVENTS_PER_BAG,
        "the day did not change meanwhile"
    );
    assert_eq!(k.active_entities, bags);
}
