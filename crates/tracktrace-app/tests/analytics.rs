//! The analytics engine's bounds over the in-memory store: KPI windows with more entities than
//! a tenant's window may track, rejected-command counts through a day-long store outage and
//! through lost acknowledgements.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tracktrace_app::analytics::{Analytics, AnalyticsConfig, KpiBounds};
use tracktrace_conformance::runtime::FaultyStore;
use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::{
    AppendOutcome, AppendRequest, Error, EventFilter, EventStore, EventStoreExt, InMemoryStore,
    NewEvent, Position, RecordedEvent, TenantId, Timestamp,
};
use tracktrace_domain::{Location, OPERATIONAL_EVENT, StoredEvent, entity_stream, format_micros};

const S: i64 = 1_000_000;
const HOUR: i64 = 3_600 * S;

fn now_us() -> i64 {
    Timestamp::now().unix_micros()
}

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

fn hourly(schedule_free: AnalyticsConfig) -> AnalyticsConfig {
    AnalyticsConfig {
        window: Duration::from_secs(3_600),
        grace: Duration::from_secs(60),
        lookback_windows: 1,
        schedule: false,
        ..schedule_free
    }
}

/// Stores an operational event of `entity`, occurred at `at`, as the capture pipeline would.
async fn capture(store: &dyn EventStore, t: &TenantId, entity: &str, ty: &str, at: i64) {
    let loc = "MAD";
    let stored = StoredEvent {
        event_type: ty.into(),
        entity_id: entity.into(),
        entity_type: "Bag".into(),
        occurred_at: format_micros(at),
        occurred_at_us: at,
        location: Location {
            code: loc.into(),
            detail: None,
        },
        source: "test".into(),
        attributes: Default::default(),
        related_entities: Vec::new(),
        received_at_us: at,
        submitted_by: "test".into(),
        event_id: None,
        dedup_key: None,
    };
    let ev = NewEvent::json(OPERATIONAL_EVENT, &serde_json::to_value(&stored).unwrap());
    store
        .append_to(
            t,
            &entity_stream("Bag", entity).unwrap(),
            tracktrace_core::ExpectedVersion::Any,
            vec![ev],
        )
        .await
        .unwrap();
}

/// A window with ten times more entities than a tenant's window may track: the counts stay
/// exact, the state held stays within the bounds, and the stored window says what was left
/// out (and so does the engine's counter).
#[tokio::test]
async fn a_window_beyond_the_bounds_says_what_it_left_out() {
    let store = Arc::new(InMemoryStore::new());
    let analytics = Analytics::new(store.clone());
    analytics
        .configure(hourly(AnalyticsConfig {
            kpi_bounds: KpiBounds {
                max_tracked_entities: 30,
                max_tracked_events: 1_000,
                ..KpiBounds::default()
            },
            ..AnalyticsConfig::default()
        }))
        .unwrap();
    let acme = tenant("acme");
    let globex = tenant("globex");
    let t0 = now_us() - HOUR;
    for bag in 0..300 {
        capture(&*store, &acme, &format!("bag{bag}"), "CHECKED_IN", t0).await;
        capture(&*store, &acme, &format!("bag{bag}"), "LOADED", t0 + 600 * S).await;
    }
    capture(&*store, &globex, "x1", "LOADED", t0).await;
    let from = now_us().div_euclid(HOUR) * HOUR - HOUR;
    let r = analytics
        .run(&[acme.clone(), globex.clone()], from, from + 2 * HOUR)
        .await
        .unwrap();
    let acme_windows: Vec<_> = r
        .windows
        .iter()
        .filter(|w| w.kpis.tenant == "acme" && w.kpis.events > 0)
        .collect();
    let events: usize = acme_windows.iter().map(|w| w.kpis.events).sum();
    assert_eq!(events, 600, "counts are exact");
    let loaded: usize = acme_windows
        .iter()
        .map(|w| w.kpis.events_by_type["LOADED"])
        .sum();
    assert_eq!(loaded, 300);
    let mut untracked = 0;
    for w in &acme_windows {
        let t = w
            .kpis
            .truncation
            .as_ref()
            .expect("the window says it is bounded");
        assert!(t.active_entities_estimated, "{t:?}");
        let tracked = w.kpis.active_entities - t.untracked_entities;
        assert!(tracked <= 30, "{t:?}");
        // Transit covers the tracked bags only (all of them unless an hour began between a
        // bag's two events).
        assert!(w.kpis.transit[0].stats.count <= tracked);
        untracked += t.untracked_entities;
    }
    if let [w] = acme_windows.as_slice() {
        let t = w.kpis.truncation.as_ref().unwrap();
        assert_eq!(t.untracked_entities, w.kpis.active_entities - 30);
        assert_eq!(t.untracked_events, 600 - 2 * 30);
        assert_eq!(w.kpis.transit[0].stats.count, 30);
        assert_eq!(w.kpis.transit[0].stats.p50_s, 600.0);
        let active = w.kpis.active_entities as f64;
        assert!(
            (active - 300.0).abs() < 300.0 * 0.033,
            "{active} active entities estimated"
        );
    }
    assert_eq!(
        analytics.status().untracked_entities,
        untracked as u64,
        "what is left out is counted"
    );
    // A window within the bounds is exact and says nothing more than before.
    let g = r
        .windows
        .iter()
        .find(|w| w.kpis.tenant == "globex" && w.kpis.events > 0)
        .unwrap();
    assert_eq!(
        (g.kpis.active_entities, g.kpis.truncation.as_ref()),
        (1, None)
    );
    let json = serde_json::to_value(&g.kpis).unwrap();
    assert!(json.get("truncation").is_none(), "{json}");
}

/// A day of rejected-command counts (one bucket per tenant and second) piles up while the
/// store is down; flushes fail and keep them; once the store is back they are stored in
/// events far below the 1 MiB event limit, and every count is read back by the windows.
#[tokio::test]
async fn a_day_long_outage_is_stored_in_chunks_and_counted_by_the_windows() {
    let memory = Arc::new(InMemoryStore::new());
    let store = Arc::new(FaultyStore::new(memory.clone()));
    let analytics = Analytics::new(store.clone());
    analytics
        .configure(hourly(AnalyticsConfig {
            max_rejection_buckets: 300_000,
            ..AnalyticsConfig::default()
        }))
        .unwrap();
    let tenants = [tenant("acme"), tenant("globex"), tenant("initech")];
    let day_start = now_us().div_euclid(HOUR) * HOUR - 26 * HOUR;

    store.set_down(true);
    for s in 0..86_400 {
        for (i, t) in tenants.iter().enumerate() {
            // Tenant i: i + 1 rejections in every second of the day.
            for _ in 0..=i {
                analytics.record_rejected_at(t, day_start + s * S + 123);
            }
        }
        if s % 21_600 == 0 {
            assert!(
                analytics.flush_rejections().await.is_err(),
                "the store is down"
            );
        }
    }
    assert!(analytics.flush_rejections().await.is_err());
    let st = analytics.status();
    assert_eq!((st.rejection_buckets, st.rejections_lost), (3 * 86_400, 0));

    store.set_down(false);
    analytics.flush_rejections().await.unwrap();
    assert_eq!(analytics.status().rejection_buckets, 0);
    let stored: Vec<RecordedEvent> = memory
        .read_all_to_end(
            Position::START,
            EventFilter::tenant(tracktrace_app::access::system_tenant()),
        )
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "tt.RejectedCommandsCounted")
        .collect();
    // One event per tenant and hour, plus the chunk each tenant's first (failed) flush had
    // sealed: retried as it was, then the rest.
    assert_eq!(stored.len(), 3 * 24 + 3);
    let largest = stored.iter().map(|e| e.payload.len()).max().unwrap();
    assert!(largest < 200_000, "{largest} bytes: far below 1 MiB");

    let r = analytics
        .run(&tenants, day_start, day_start + 24 * HOUR)
        .await
        .unwrap();
    assert_eq!(r.windows.len(), 3 * 24);
    for w in &r.windows {
        let i = tenants
            .iter()
            .position(|t| t.as_str() == w.kpis.tenant)
            .unwrap() as u64;
        assert_eq!(w.kpis.rejected_commands, 3_600 * (i + 1), "{}", w.kpis.from);
    }
}

/// Past the bound, a buffer of hourly windows is coarsened to windows (nothing a window reads
/// is lost); past what coarsening can hold, the oldest are dropped and counted as lost.
#[tokio::test]
async fn over_the_bound_rejections_are_coarsened_then_the_oldest_dropped() {
    let store = Arc::new(InMemoryStore::new());
    let analytics = Analytics::new(store.clone());
    analytics
        .configure(hourly(AnalyticsConfig {
            max_rejection_buckets: 1_000,
            ..AnalyticsConfig::default()
        }))
        .unwrap();
    let acme = tenant("acme");
    let day_start = now_us().div_euclid(HOUR) * HOUR - 26 * HOUR;
    for s in 0..86_400 {
        analytics.record_rejected_at(&acme, day_start + s * S);
        assert!(analytics.status().rejection_buckets <= 1_000);
    }
    assert_eq!(analytics.status().rejections_lost, 0);
    analytics.flush_rejections().await.unwrap();
    let r = analytics
        .run(
            std::slice::from_ref(&acme),
            day_start,
            day_start + 24 * HOUR,
        )
        .await
        .unwrap();
    assert!(r.windows.iter().all(|w| w.kpis.rejected_commands == 3_600));

    // With one-second windows coarsening cannot help: the oldest are dropped, and counted.
    let analytics = Analytics::new(store.clone());
    analytics
        .configure(AnalyticsConfig {
            window: Duration::from_secs(1),
            max_rejection_buckets: 1_000,
            ..hourly(AnalyticsConfig::default())
        })
        .unwrap();
    for s in 0..2_000 {
        analytics.record_rejected_at(&acme, day_start + s * S);
    }
    let st = analytics.status();
    assert!(st.rejection_buckets <= 1_000);
    assert_eq!(st.rejection_buckets + st.rejections_lost, 2_000);
}

/// A store that applies the first appends of `analytics-rejected-` streams but answers them
/// with `Unavailable`, as if the connection broke before the acknowledgement came back.
struct LostAcks {
    inner: Arc<InMemoryStore>,
    lose: AtomicU32,
}

#[async_trait]
impl Intercept for LostAcks {
    type Inner = InMemoryStore;

    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }

    async fn append(&self, req: AppendRequest) -> tracktrace_core::Result<AppendOutcome> {
        let rejected = req.stream.as_str().starts_with("analytics-rejected-");
        let out = self.inner.append(req).await?;
        if rejected
            && self
                .lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Error::Unavailable {
                reason: "connection lost before the acknowledgement".into(),
                retry_after: None,
                source: None,
            });
        }
        Ok(out)
    }
}

/// A flush whose write was stored but not acknowledged is retried as the same event: the
/// window counts each rejection once.
#[tokio::test]
async fn a_lost_acknowledgement_does_not_count_rejections_twice() {
    let store = Arc::new(Intercepted(LostAcks {
        inner: Arc::new(InMemoryStore::new()),
        lose: AtomicU32::new(1),
    }));
    let analytics = Analytics::new(store.clone());
    analytics
        .configure(hourly(AnalyticsConfig::default()))
        .unwrap();
    let acme = tenant("acme");
    for _ in 0..5 {
        analytics.record_rejected(&acme);
    }
    assert!(analytics.flush_rejections().await.is_err(), "ack lost");
    analytics.flush_rejections().await.unwrap();
    analytics.flush_rejections().await.unwrap();
    let hour = now_us().div_euclid(HOUR) * HOUR;
    let r = analytics
        .run(std::slice::from_ref(&acme), hour - HOUR, hour + 2 * HOUR)
        .await
        .unwrap();
    let counted: u64 = r.windows.iter().map(|w| w.kpis.rejected_commands).sum();
    assert_eq!(counted, 5);
}
