//! Per-tenant KPIs over one time window of operational events.
//!
//! [`compute`] is a pure function of its inputs: the same window of observations gives the same
//! [`KpiReport`] whatever their order (re-running a window is idempotent).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// One operational event as the analytics engine sees it (mapped from the event store by the
/// caller). Times are microseconds since the Unix epoch, UTC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Tie-breaker for events of one entity at the same instant (e.g. the event id).
    pub id: String,
    /// Tracked entity (bag, ULD, flight, ...).
    pub entity_id: String,
    /// Event type, e.g. `CHECKED_IN`.
    pub event_type: String,
    /// Location code, e.g. IATA airport `MAD`.
    pub location: String,
    /// When it happened, per the source.
    pub occurred_at_us: i64,
    /// When the system received it.
    pub received_at_us: i64,
}

/// A pair of milestones whose transit time is measured, e.g. `CHECKED_IN` → `LOADED`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MilestonePair {
    /// Start milestone event type.
    pub from: String,
    /// End milestone event type.
    pub to: String,
}

impl MilestonePair {
    /// A pair.
    pub fn new(from: impl Into<String>, to: impl Into<String>) -> Self {
        Self {
            from: from.into(),
            to: to.into(),
        }
    }
}

/// Per-tenant KPI configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KpiConfig {
    /// Milestone pairs whose transit time is reported.
    pub milestone_pairs: Vec<MilestonePair>,
    /// An event is late when `received_at - occurred_at` exceeds this.
    pub late_threshold: Duration,
}

impl Default for KpiConfig {
    fn default() -> Self {
        Self {
            milestone_pairs: vec![MilestonePair::new("CHECKED_IN", "LOADED")],
            late_threshold: Duration::from_secs(15 * 60),
        }
    }
}

/// Percentile summary of durations (nearest-rank method), in microseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationStats {
    /// Number of samples.
    pub count: usize,
    /// Median (nearest rank).
    pub p50_us: i64,
    /// 95th percentile (nearest rank).
    pub p95_us: i64,
    /// Largest sample.
    pub max_us: i64,
}

impl DurationStats {
    /// Summary of `samples` (`None` if empty).
    pub fn of(mut samples: Vec<i64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        Some(Self {
            count: samples.len(),
            p50_us: nearest_rank(&samples, 50),
            p95_us: nearest_rank(&samples, 95),
            max_us: *samples.last().unwrap_or(&0),
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty `samples`: the value at rank ⌈p/100 · n⌉.
fn nearest_rank(sorted: &[i64], p: usize) -> i64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// KPIs of one tenant over one window.
#[derive(Clone, Debug, PartialEq)]
pub struct KpiReport {
    /// Window start (inclusive), µs since the epoch.
    pub window_start_us: i64,
    /// Window end (exclusive), µs since the epoch.
    pub window_end_us: i64,
    /// Events received in the window.
    pub events: usize,
    /// Events per event type.
    pub events_by_type: BTreeMap<String, usize>,
    /// Events per location.
    pub events_by_location: BTreeMap<String, usize>,
    /// Events per second over the window.
    pub ingestion_rate_per_s: f64,
    /// Distinct entities with at least one event.
    pub active_entities: usize,
    /// Transit time per milestone pair: for each entity, from its first `from` milestone to the
    /// first `to` milestone after it (by occurred-at).
    pub transit: BTreeMap<MilestonePair, DurationStats>,
    /// Dwell time per location: for each entity, from its first event at a location to its next
    /// event at another location (stays still open at the end of the window are not counted).
    pub dwell: BTreeMap<String, DurationStats>,
    /// Share of events received later than the configured threshold after they occurred.
    pub late_share: f64,
    /// Rejected commands / (accepted + rejected) in the window.
    pub rejected_rate: f64,
}

/// Computes the KPIs of a window from the observations received in it and the number of
/// commands rejected in it (validation or domain failures).
pub fn compute(
    cfg: &KpiConfig,
    window_start_us: i64,
    window_end_us: i64,
    observations: &[Observation],
    rejected_commands: usize,
) -> KpiReport {
    let mut sorted: Vec<&Observation> = observations.iter().collect();
    sorted.sort_by(|a, b| {
        (a.entity_id.as_str(), a.occurred_at_us, a.id.as_str()).cmp(&(
            b.entity_id.as_str(),
            b.occurred_at_us,
            b.id.as_str(),
        ))
    });

    let mut by_type = BTreeMap::new();
    let mut by_location = BTreeMap::new();
    let mut entities = BTreeSet::new();
    let late_us = i64::try_from(cfg.late_threshold.as_micros()).unwrap_or(i64::MAX);
    let mut late = 0usize;
    for o in &sorted {
        *by_type.entry(o.event_type.clone()).or_insert(0) += 1;
        *by_location.entry(o.location.clone()).or_insert(0) += 1;
        entities.insert(o.entity_id.as_str());
        if o.received_at_us.saturating_sub(o.occurred_at_us) > late_us {
            late += 1;
        }
    }

    // Per-entity timelines (already sorted by entity, occurred-at, id).
    let mut timelines: HashMap<&str, Vec<&Observation>> = HashMap::new();
    for o in &sorted {
        timelines.entry(o.entity_id.as_str()).or_default().push(o);
    }

    let mut transit_samples: BTreeMap<MilestonePair, Vec<i64>> = BTreeMap::new();
    let mut dwell_samples: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for events in timelines.values() {
        for pair in &cfg.milestone_pairs {
            if let Some(start) = events.iter().position(|e| e.event_type == pair.from)
                && let Some(end) = events[start + 1..].iter().find(|e| e.event_type == pair.to)
            {
                transit_samples
                    .entry(pair.clone())
                    .or_default()
                    .push(end.occurred_at_us - events[start].occurred_at_us);
            }
        }
        let mut stay_start: Option<&Observation> = None;
        for e in events {
            match stay_start {
                Some(s) if s.location != e.location => {
                    dwell_samples
                        .entry(s.location.clone())
                        .or_default()
                        .push(e.occurred_at_us - s.occurred_at_us);
                    stay_start = Some(e);
                }
                Some(_) => {}
                None => stay_start = Some(e),
            }
        }
    }

    let n = sorted.len();
    let secs = (window_end_us - window_start_us).max(1) as f64 / 1e6;
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    KpiReport {
        window_start_us,
        window_end_us,
        events: n,
        events_by_type: by_type,
        events_by_location: by_location,
        ingestion_rate_per_s: n as f64 / secs,
        active_entities: entities.len(),
        transit: transit_samples
            .into_iter()
            .filter_map(|(k, v)| DurationStats::of(v).map(|s| (k, s)))
            .collect(),
        dwell: dwell_samples
            .into_iter()
            .filter_map(|(k, v)| DurationStats::of(v).map(|s| (k, s)))
            .collect(),
        late_share: ratio(late, n),
        rejected_rate: ratio(rejected_commands, n + rejected_commands),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;

    fn obs(id: &str, entity: &str, ty: &str, loc: &str, at_min: i64, late_min: i64) -> Observation {
        Observation {
            id: id.into(),
            entity_id: entity.into(),
            event_type: ty.into(),
            location: loc.into(),
            occurred_at_us: at_min * MIN,
            received_at_us: (at_min + late_min) * MIN,
        }
    }

    /// A small hand-computed fixture: three bags through MAD → LHR.
    fn fixture() -> Vec<Observation> {
        vec![
            // bag1: checked in at 0, loaded at 30, arrives LHR at 150.
            obs("a1", "bag1", "CHECKED_IN", "MAD", 0, 1),
            obs("a2", "bag1", "LOADED", "MAD", 30, 1),
            obs("a3", "bag1", "ARRIVED", "LHR", 150, 20),
            // bag2: checked in at 10, loaded at 70 (received late), arrives at 190.
            obs("b1", "bag2", "CHECKED_IN", "MAD", 10, 0),
            obs("b2", "bag2", "LOADED", "MAD", 70, 16),
            obs("b3", "bag2", "ARRIVED", "LHR", 190, 2),
            // bag3: checked in at 20, loaded at 40, still at MAD (open stay).
            obs("c1", "bag3", "CHECKED_IN", "MAD", 20, 0),
            obs("c2", "bag3", "LOADED", "MAD", 40, 0),
            // bag4: loaded without check-in: no transit sample.
            obs("d1", "bag4", "LOADED", "MAD", 50, 0),
        ]
    }

    #[test]
    fn kpis_match_hand_computed_values() {
        let cfg = KpiConfig::default();
        let r = compute(&cfg, 0, 60 * MIN * 4, &fixture(), 1);
        assert_eq!(r.events, 9);
        assert_eq!(r.active_entities, 4);
        assert_eq!(r.events_by_type["LOADED"], 4);
        assert_eq!(r.events_by_location["LHR"], 2);
        assert!((r.ingestion_rate_per_s - 9.0 / (4.0 * 3600.0)).abs() < 1e-12);
        // Transit CHECKED_IN → LOADED: 30, 60, 20 minutes → sorted 20, 30, 60.
        // p50 = rank ceil(1.5)=2 → 30; p95 = rank ceil(2.85)=3 → 60.
        let t = &r.transit[&MilestonePair::new("CHECKED_IN", "LOADED")];
        assert_eq!(
            (t.count, t.p50_us, t.p95_us, t.max_us),
            (3, 30 * MIN, 60 * MIN, 60 * MIN)
        );
        // Dwell at MAD: bag1 0→150, bag2 10→190 (bag3 and bag4 still there): 150, 180.
        let d = &r.dwell["MAD"];
        assert_eq!((d.count, d.p50_us, d.p95_us), (2, 150 * MIN, 180 * MIN));
        assert!(!r.dwell.contains_key("LHR"), "open stays are not counted");
        // Late (> 15 min): a3 (20) and b2 (16) → 2 of 9.
        assert!((r.late_share - 2.0 / 9.0).abs() < 1e-12);
        // 1 rejected of 10 commands.
        assert!((r.rejected_rate - 0.1).abs() < 1e-12);
    }

    #[test]
    fn kpis_do_not_depend_on_input_order() {
        let cfg = KpiConfig::default();
        let mut shuffled = fixture();
        shuffled.reverse();
        shuffled.swap(1, 5);
        assert_eq!(
            compute(&cfg, 0, 100 * MIN, &fixture(), 0),
            compute(&cfg, 0, 100 * MIN, &shuffled, 0)
        );
    }

    #[test]
    fn empty_window_is_all_zero() {
        let r = compute(&KpiConfig::default(), 0, MIN, &[], 0);
        assert_eq!(r.events, 0);
        assert_eq!(r.late_share, 0.0);
        assert_eq!(r.rejected_rate, 0.0);
        assert!(r.transit.is_empty() && r.dwell.is_empty());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=20).collect();
        assert_eq!(nearest_rank(&v, 50), 10);
        assert_eq!(nearest_rank(&v, 95), 19);
        assert_eq!(nearest_rank(&[7], 95), 7);
    }
}
