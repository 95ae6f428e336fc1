//! Per-tenant KPIs over one time window of operational events.
//!
//! A [`WindowAccumulator`] takes the window's events one at a time, as a scan reads them, and
//! keeps state bounded by [`Bounds`], not by the number of events; [`WindowAccumulator::finish`]
//! turns it into a [`KpiReport`]. [`compute`] does the same over a slice of [`Observation`]s.
//! The report depends only on the set of events, never on their order (re-running a window
//! gives the same report).
//!
//! # Exact and approximate KPIs
//!
//! | KPI | how | exact? |
//! |---|---|---|
//! | events, ingestion rate, late share, rejected-command rate | counters | always |
//! | events by type, by location | one counter per key, at most [`Bounds::max_keys`] keys each | always for the first `max_keys` distinct keys of the window (in scan order); events of later keys are counted in [`Truncation::events_without_type_key`] / [`Truncation::events_without_location_key`] instead |
//! | active entities | the set of tracked entities, plus a [`HyperLogLog`] of every entity id | exact while the window has at most [`Bounds::max_tracked_entities`] entities; beyond, the HyperLogLog estimate (relative standard error 0.81 %, [`Truncation::active_entities_estimated`]) |
//! | transit p50/p95/max per milestone pair, dwell p50/p95/max per location | exact nearest-rank percentiles of the samples of the *tracked* entities | exact when every entity is tracked ([`Truncation::untracked_entities`] = 0); otherwise exact over the tracked entities, the others counted in [`Truncation`] |
//!
//! Transit and dwell need each entity's events in occurred-at order, which a scan in log order
//! does not deliver (late events). An entity is **tracked** while the accumulator keeps its
//! timeline: a compact point (occurred-at, tie-breaker, milestone, location; 40 bytes) per
//! event, kept sorted. An entity is tracked if it is among the first
//! [`Bounds::max_tracked_entities`] entities of the window (in scan order), every location it
//! visits has a key (see above), and its points fit in the tenant's budget of
//! [`Bounds::max_tracked_events`] points; an event that does not fit drops its entity's
//! timeline (its points return to the budget) and the entity stays untracked for the rest of
//! the window. Percentiles of tracked entities are computed exactly at the end: the samples
//! are at most one per tracked entity and pair (transit) and one per point (dwell).
//!
//! Memory of one accumulator is bounded by its [`Bounds`]: about
//! `max_tracked_entities × (100 B + entity id length) + max_tracked_events × 40 B` (up to twice
//! the points' part while timelines grow) `+ 2 × max_keys × (60 B + key length) + 16 KiB`. With
//! the defaults (100,000 entities, 1,000,000 points, 1,000 keys) that is at most about 100 MB
//! per tenant and window, whatever the number of events.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::hll::HyperLogLog;

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

impl Observation {
    /// The observation, borrowed.
    pub fn borrowed(&self) -> ObservationRef<'_> {
        ObservationRef {
            id: &self.id,
            entity_id: &self.entity_id,
            event_type: &self.event_type,
            location: &self.location,
            occurred_at_us: self.occurred_at_us,
            received_at_us: self.received_at_us,
        }
    }
}

/// An [`Observation`] borrowed from the caller's decoded event (what
/// [`WindowAccumulator::observe`] takes, so a scan allocates nothing per event for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservationRef<'a> {
    /// Tie-breaker for events of one entity at the same instant (e.g. the event id; compared
    /// as a string, a canonical lower-case UUID kept as 16 bytes).
    pub id: &'a str,
    /// Tracked entity.
    pub entity_id: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// Location code.
    pub location: &'a str,
    /// When it happened, µs since the epoch.
    pub occurred_at_us: i64,
    /// When the system received it, µs since the epoch.
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

/// Bounds of the state one [`WindowAccumulator`] (one tenant, one window) keeps; see the
/// [module docs](self) for what each bounds and what is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Entities whose timelines are kept (transit, dwell) and whose ids make the exact
    /// distinct count.
    pub max_tracked_entities: usize,
    /// Points (one per event) kept in those timelines, in total.
    pub max_tracked_events: usize,
    /// Distinct event types counted by key, and distinct locations counted by key (each).
    /// Also what keeps a stored KPI window well under the store's 1 MiB event limit: the
    /// default 1,000 keys of at most 128 bytes each take at most ~280 KB of JSON.
    pub max_keys: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_tracked_entities: 100_000,
            max_tracked_events: 1_000_000,
            max_keys: 1_000,
        }
    }
}

impl Bounds {
    /// No bound: memory grows with the window (what [`compute`] uses: its caller holds every
    /// observation anyway).
    pub const UNBOUNDED: Bounds = Bounds {
        max_tracked_entities: usize::MAX,
        max_tracked_events: usize::MAX,
        max_keys: usize::MAX,
    };
}

/// What a window's [`Bounds`] left out (all zero when every KPI of the report is exact).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Entities with events in the window whose transit and dwell were not computed (estimated
    /// when [`Truncation::active_entities_estimated`]).
    pub untracked_entities: usize,
    /// Events of those entities (exact).
    pub untracked_events: usize,
    /// More than [`Bounds::max_tracked_entities`] entities: `active_entities` is a HyperLogLog
    /// estimate.
    pub active_entities_estimated: bool,
    /// Events whose type was not counted in `events_by_type` ([`Bounds::max_keys`] reached).
    pub events_without_type_key: usize,
    /// Events whose location was not counted in `events_by_location`.
    pub events_without_location_key: usize,
}

impl Truncation {
    /// Whether nothing was left out.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
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
    /// first `to` milestone after it (by occurred-at, then id).
    pub transit: BTreeMap<MilestonePair, DurationStats>,
    /// Dwell time per location: for each entity, from its first event at a location to its next
    /// event at another location (stays still open at the end of the window are not counted).
    pub dwell: BTreeMap<String, DurationStats>,
    /// Share of events received later than the configured threshold after they occurred.
    pub late_share: f64,
    /// Rejected commands / (accepted + rejected) in the window.
    pub rejected_rate: f64,
    /// What the bounds left out.
    pub truncation: Truncation,
}

/// Orders events of one entity at the same occurred-at instant, as their ids compare as
/// strings. A canonical (lower-case, hyphenated) UUID, what the engine passes, is kept as its
/// 128 bits, whose numeric order is the order of its text.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tie {
    Uuid(u64, u64),
    Text(Box<str>),
}

impl Tie {
    fn of(id: &str) -> Self {
        Self::parse_uuid(id).unwrap_or_else(|| Tie::Text(id.into()))
    }

    fn parse_uuid(id: &str) -> Option<Self> {
        let b = id.as_bytes();
        if b.len() != 36 {
            return None;
        }
        let mut v: u128 = 0;
        for (i, c) in b.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if *c != b'-' {
                    return None;
                }
                continue;
            }
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return None,
            };
            v = (v << 4) | u128::from(d);
        }
        Some(Tie::Uuid((v >> 64) as u64, v as u64))
    }

    fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Tie::Text(t) => std::borrow::Cow::Borrowed(t),
            Tie::Uuid(hi, lo) => {
                let v = (u128::from(*hi) << 64) | u128::from(*lo);
                let hex = format!("{v:032x}");
                std::borrow::Cow::Owned(format!(
                    "{}-{}-{}-{}-{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32]
                ))
            }
        }
    }
}

impl Ord for Tie {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Tie::Uuid(a, b), Tie::Uuid(c, d)) => (a, b).cmp(&(c, d)),
            (Tie::Text(a), Tie::Text(b)) => a.cmp(b),
            _ => self.text().cmp(&other.text()),
        }
    }
}

impl PartialOrd for Tie {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// No milestone of a configured pair.
const NOT_A_MILESTONE: u32 = u32::MAX;

/// One event in an entity's timeline.
#[derive(Clone, Debug)]
struct Point {
    occurred_at_us: i64,
    tie: Tie,
    /// Index into the accumulator's milestone types, or [`NOT_A_MILESTONE`].
    milestone: u32,
    /// Index of the location key.
    location: u32,
}

impl Point {
    fn key(&self) -> (i64, &Tie) {
        (self.occurred_at_us, &self.tie)
    }
}

/// An entity of the window: its timeline while tracked.
#[derive(Debug, Default)]
struct Entity {
    /// Sorted by (occurred-at, tie).
    points: Vec<Point>,
    untracked: bool,
}

/// A location key: its index (for timelines) and its event count.
#[derive(Debug)]
struct LocationKey {
    index: u32,
    events: usize,
}

/// The KPIs of one tenant's window, accumulated event by event in bounded memory (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct WindowAccumulator {
    window_start_us: i64,
    window_end_us: i64,
    bounds: Bounds,
    late_us: i64,
    /// The configured pairs (duplicates kept, as configured) and their milestone indexes.
    pairs: Vec<(MilestonePair, u32, u32)>,
    /// Distinct milestone event types of the pairs → index.
    milestones: HashMap<String, u32>,
    events: usize,
    late: usize,
    by_type: HashMap<Box<str>, usize>,
    without_type: usize,
    locations: HashMap<Box<str>, LocationKey>,
    without_location: usize,
    entities: HashMap<Box<str>, Entity>,
    /// Some entity found no room among the tracked ones.
    entities_overflowed: bool,
    /// Points held by tracked entities.
    points: usize,
    distinct: HyperLogLog,
}

impl WindowAccumulator {
    /// An empty accumulator for the window `[window_start_us, window_end_us)`.
    pub fn new(cfg: &KpiConfig, bounds: Bounds, window_start_us: i64, window_end_us: i64) -> Self {
        let mut milestones: HashMap<String, u32> = HashMap::new();
        let mut index = |ty: &str| -> u32 {
            let next = milestones.len() as u32;
            *milestones.entry(ty.to_owned()).or_insert(next)
        };
        let pairs = cfg
            .milestone_pairs
            .iter()
            .map(|p| {
                let (f, t) = (index(&p.from), index(&p.to));
                (p.clone(), f, t)
            })
            .collect();
        Self {
            window_start_us,
            window_end_us,
            bounds,
            late_us: i64::try_from(cfg.late_threshold.as_micros()).unwrap_or(i64::MAX),
            pairs,
            milestones,
            events: 0,
            late: 0,
            by_type: HashMap::new(),
            without_type: 0,
            locations: HashMap::new(),
            without_location: 0,
            entities: HashMap::new(),
            entities_overflowed: false,
            points: 0,
            distinct: HyperLogLog::default(),
        }
    }

    /// Events observed so far.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Entities held (tracked ones and those dropped from tracking); at most
    /// [`Bounds::max_tracked_entities`].
    pub fn held_entities(&self) -> usize {
        self.entities.len()
    }

    /// Timeline points held; at most [`Bounds::max_tracked_events`].
    pub fn held_points(&self) -> usize {
        self.points
    }

    /// Adds one event of the window.
    pub fn observe(&mut self, o: ObservationRef<'_>) {
        self.events += 1;
        if o.received_at_us.saturating_sub(o.occurred_at_us) > self.late_us {
            self.late += 1;
        }
        if let Some(n) = self.by_type.get_mut(o.event_type) {
            *n += 1;
        } else if self.by_type.len() < self.bounds.max_keys {
            self.by_type.insert(o.event_type.into(), 1);
        } else {
            self.without_type += 1;
        }
        let location = if let Some(k) = self.locations.get_mut(o.location) {
            k.events += 1;
            Some(k.index)
        } else if self.locations.len() < self.bounds.max_keys {
            let index = self.locations.len() as u32;
            self.locations
                .insert(o.location.into(), LocationKey { index, events: 1 });
            Some(index)
        } else {
            self.without_location += 1;
            None
        };
        self.distinct.insert(o.entity_id.as_bytes());

        if !self.entities.contains_key(o.entity_id) {
            if self.entities.len() >= self.bounds.max_tracked_entities {
                self.entities_overflowed = true;
                return;
            }
            self.entities.insert(o.entity_id.into(), Entity::default());
        }
        let Some(entity) = self.entities.get_mut(o.entity_id) else {
            return;
        };
        if entity.untracked {
            return;
        }
        let Some(location) = location.filter(|_| self.points < self.bounds.max_tracked_events)
        else {
            // No room: the entity's timeline is dropped for the rest of the window.
            self.points -= entity.points.len();
            entity.points = Vec::new();
            entity.untracked = true;
            return;
        };
        let point = Point {
            occurred_at_us: o.occurred_at_us,
            tie: Tie::of(o.id),
            milestone: self
                .milestones
                .get(o.event_type)
                .copied()
                .unwrap_or(NOT_A_MILESTONE),
            location,
        };
        // Scans mostly deliver an entity's events in occurred-at order: append, else insert.
        match entity.points.last() {
            Some(last) if last.key() > point.key() => {
                let at = entity.points.partition_point(|p| p.key() <= point.key());
                entity.points.insert(at, point);
            }
            _ => entity.points.push(point),
        }
        self.points += 1;
    }

    /// The window's KPIs; `rejected_commands` is the number of commands rejected in it.
    pub fn finish(self, rejected_commands: u64) -> KpiReport {
        let mut transit_samples: BTreeMap<MilestonePair, Vec<i64>> = BTreeMap::new();
        let mut dwell_samples: Vec<Vec<i64>> = vec![Vec::new(); self.locations.len()];
        let mut tracked = 0usize;
        let mut tracked_points = 0usize;
        for entity in self.entities.values().filter(|e| !e.untracked) {
            tracked += 1;
            let events = &entity.points;
            tracked_points += events.len();
            for (pair, from, to) in &self.pairs {
                if let Some(start) = events.iter().position(|e| e.milestone == *from)
                    && let Some(end) = events[start + 1..].iter().find(|e| e.milestone == *to)
                {
                    transit_samples
                        .entry(pair.clone())
                        .or_default()
                        .push(end.occurred_at_us - events[start].occurred_at_us);
                }
            }
            let mut stay_start: Option<&Point> = None;
            for e in events {
                match stay_start {
                    Some(s) if s.location != e.location => {
                        dwell_samples[s.location as usize]
                            .push(e.occurred_at_us - s.occurred_at_us);
                        stay_start = Some(e);
                    }
                    Some(_) => {}
                    None => stay_start = Some(e),
                }
            }
        }
        let mut location_names: Vec<&str> = vec![""; self.locations.len()];
        for (name, k) in &self.locations {
            location_names[k.index as usize] = name;
        }
        let held = self.entities.len();
        let active = if self.entities_overflowed {
            (self.distinct.estimate().round() as usize).max(held + 1)
        } else {
            held
        };
        let n = self.events;
        let rejected = usize::try_from(rejected_commands).unwrap_or(usize::MAX);
        let secs = (self.window_end_us - self.window_start_us).max(1) as f64 / 1e6;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        KpiReport {
            window_start_us: self.window_start_us,
            window_end_us: self.window_end_us,
            events: n,
            events_by_type: self
                .by_type
                .into_iter()
                .map(|(k, v)| (k.into_string(), v))
                .collect(),
            events_by_location: self
                .locations
                .iter()
                .map(|(k, v)| (k.to_string(), v.events))
                .collect(),
            ingestion_rate_per_s: n as f64 / secs,
            active_entities: active,
            transit: transit_samples
                .into_iter()
                .filter_map(|(k, v)| DurationStats::of(v).map(|s| (k, s)))
                .collect(),
            dwell: dwell_samples
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    DurationStats::of(v).map(|s| (location_names[i].to_owned(), s))
                })
                .collect(),
            late_share: ratio(self.late, n),
            rejected_rate: ratio(rejected, n.saturating_add(rejected)),
            truncation: Truncation {
                untracked_entities: active - tracked,
                untracked_events: n - tracked_points,
                active_entities_estimated: self.entities_overflowed,
                events_without_type_key: self.without_type,
                events_without_location_key: self.without_location,
            },
        }
    }
}

/// Computes the KPIs of a window from the observations received in it and the number of
/// commands rejected in it (validation or domain failures), without bounds.
pub fn compute(
    cfg: &KpiConfig,
    window_start_us: i64,
    window_end_us: i64,
    observations: &[Observation],
    rejected_commands: usize,
) -> KpiReport {
    let mut acc = WindowAccumulator::new(cfg, Bounds::UNBOUNDED, window_start_us, window_end_us);
    for o in observations {
        acc.observe(o.borrowed());
    }
    acc.finish(rejected_commands as u64)
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

    /// The computation before it was made incremental (sort everything, then walk each
    /// entity's timeline): the reference the accumulator must match.
    fn reference(
        cfg: &KpiConfig,
        start: i64,
        end: i64,
        observations: &[Observation],
        rejected: usize,
    ) -> KpiReport {
        use std::collections::BTreeSet;
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
        let secs = (end - start).max(1) as f64 / 1e6;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        KpiReport {
            window_start_us: start,
            window_end_us: end,
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
            rejected_rate: ratio(rejected, n + rejected),
            truncation: Truncation::default(),
        }
    }

    /// A random window: few entities, types, locations and instants, so that ties at one
    /// instant, late (out-of-order) events, repeated milestones and revisited locations are
    /// common. Ids mix canonical UUIDs (upper- and lower-case) and free text.
    fn random_window(rng: &mut fastrand::Rng, n: usize) -> Vec<Observation> {
        let types = [
            "CHECKED_IN",
            "LOADED",
            "ARRIVED",
            "SCANNED",
            "MILESTONE_OVERDUE",
        ];
        let locations = ["MAD", "LHR", "CDG", "FRA"];
        (0..n)
            .map(|i| {
                let id = match rng.u8(0..4) {
                    0 => format!("ev-{}", rng.u32(0..50)),
                    1 => format!("{:08x}-0000-7000-8000-{:012x}", rng.u32(0..4), i),
                    2 => format!("{:08X}-0000-7000-8000-{:012X}", rng.u32(0..4), i),
                    _ => format!("{:032x}", rng.u128(..)),
                };
                let occurred = rng.i64(0..40) * MIN;
                Observation {
                    id,
                    entity_id: format!("bag{}", rng.u8(0..12)),
                    event_type: types[rng.usize(..types.len())].into(),
                    location: locations[rng.usize(..locations.len())].into(),
                    occurred_at_us: occurred,
                    received_at_us: occurred + rng.i64(0..30) * MIN,
                }
            })
            .collect()
    }

    fn random_config(rng: &mut fastrand::Rng) -> KpiConfig {
        let mut pairs = vec![
            MilestonePair::new("CHECKED_IN", "LOADED"),
            MilestonePair::new("LOADED", "ARRIVED"),
            // The same type at both ends, and a pair configured twice.
            MilestonePair::new("SCANNED", "SCANNED"),
        ];
        if rng.bool() {
            pairs.push(MilestonePair::new("CHECKED_IN", "LOADED"));
        }
        KpiConfig {
            milestone_pairs: pairs,
            late_threshold: Duration::from_secs(15 * 60),
        }
    }

    #[test]
    fn the_accumulator_matches_the_reference_in_any_order() {
        let mut rng = fastrand::Rng::with_seed(0x7ac7_7ace);
        for round in 0..400 {
            let cfg = random_config(&mut rng);
            let n = rng.usize(0..120);
            let mut obs = random_window(&mut rng, n);
            let expected = reference(&cfg, 0, 60 * MIN, &obs, round % 3);
            assert_eq!(compute(&cfg, 0, 60 * MIN, &obs, round % 3), expected);
            rng.shuffle(&mut obs);
            let mut acc = WindowAccumulator::new(&cfg, Bounds::default(), 0, 60 * MIN);
            for o in &obs {
                acc.observe(o.borrowed());
            }
            assert_eq!(acc.finish((round % 3) as u64), expected, "round {round}");
        }
    }

    #[test]
    fn ties_order_like_the_ids_text() {
        let ids = [
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c",
            "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5",
            "0190a1b2",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "00000000-0000-0000-0000-000000000000",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b-x",
            "z",
            "",
        ];
        for a in ids {
            assert_eq!(Tie::of(a).text(), a);
            for b in ids {
                assert_eq!(Tie::of(a).cmp(&Tie::of(b)), a.cmp(b), "{a} vs {b}");
            }
        }
        assert!(matches!(Tie::of(ids[0]), Tie::Uuid(..)));
        assert!(matches!(Tie::of(ids[2]), Tie::Text(_)));
    }

    /// Many more entities, events and keys than the bounds allow: what is held never exceeds
    /// them, the counters stay exact, and the report says what was left out.
    #[test]
    fn bounds_cap_the_state_and_the_report_says_what_was_left_out() {
        let bounds = Bounds {
            max_tracked_entities: 50,
            max_tracked_events: 120,
            max_keys: 3,
        };
        let cfg = KpiConfig::default();
        let mut acc = WindowAccumulator::new(&cfg, bounds, 0, 60 * MIN);
        let mut all = Vec::new();
        for bag in 0..5_000 {
            for (k, (ty, loc)) in [("CHECKED_IN", "MAD"), ("LOADED", "MAD"), ("ARRIVED", "LHR")]
                .into_iter()
                .enumerate()
            {
                // Every tenth bag arrives at an extra location: beyond the location keys.
                let loc = if bag % 10 == 9 && k == 2 { "XXX" } else { loc };
                let o = Observation {
                    id: format!("{bag}-{k}"),
                    entity_id: format!("bag{bag}"),
                    event_type: if bag % 7 == 6 && k == 2 { "LOST" } else { ty }.into(),
                    location: loc.into(),
                    occurred_at_us: (k as i64 * 10 + bag % 5) * MIN,
                    received_at_us: (k as i64 * 10 + bag % 5) * MIN,
                };
                acc.observe(o.borrowed());
                assert!(acc.held_entities() <= 50 && acc.held_points() <= 120);
                all.push(o);
            }
        }
        let r = acc.finish(0);
        let exact = compute(&cfg, 0, 60 * MIN, &all, 0);
        assert_eq!(r.events, 15_000);
        assert_eq!(r.late_share, exact.late_share);
        // Type keys: CHECKED_IN, LOADED, ARRIVED (bag 0) fill the 3 keys; LOST comes later.
        let mut first_three = exact.events_by_type.clone();
        let lost = first_three.remove("LOST").unwrap();
        assert_eq!(r.events_by_type, first_three);
        let t = r.truncation;
        assert_eq!(t.events_without_type_key, lost);
        // Location keys: MAD, LHR (bag 0), XXX (bag 9): all fit.
        assert_eq!(r.events_by_location, exact.events_by_location);
        assert_eq!(t.events_without_location_key, 0);
        // 5,000 bags: an estimate within 4 standard errors (deterministic: fixed hash).
        assert!(t.active_entities_estimated);
        let rel = (r.active_entities as f64 - 5_000.0).abs() / 5_000.0;
        assert!(
            rel < 0.033,
            "{} active entities estimated",
            r.active_entities
        );
        // Of the 50 held bags, bags 0–39 fill the 120 points; bags 40–49 find no room.
        let tracked = r.active_entities - t.untracked_entities;
        assert_eq!(tracked, 40);
        assert_eq!(t.untracked_events, 15_000 - 3 * 40);
        let transit = &r.transit[&MilestonePair::new("CHECKED_IN", "LOADED")];
        assert_eq!(transit.count, 40, "one transit per tracked bag");
        assert_eq!(transit.p50_us, 10 * MIN);
    }

    #[test]
    fn an_event_without_a_location_key_or_room_untracks_its_entity() {
        let cfg = KpiConfig::default();
        let bounds = Bounds {
            max_tracked_entities: 10,
            max_tracked_events: 3,
            max_keys: 1,
        };
        let mut acc = WindowAccumulator::new(&cfg, bounds, 0, 60 * MIN);
        let all = [
            obs("a1", "bag1", "CHECKED_IN", "MAD", 0, 0),
            obs("a2", "bag1", "LOADED", "MAD", 30, 0),
            // No key for LHR (one location key): bag2 is not tracked.
            obs("b1", "bag2", "CHECKED_IN", "LHR", 0, 0),
            obs("b2", "bag2", "LOADED", "MAD", 20, 0),
            // bag3 takes the last point, then finds no room: dropped, its point returned.
            obs("c1", "bag3", "CHECKED_IN", "MAD", 0, 0),
            obs("c2", "bag3", "LOADED", "MAD", 10, 0),
            obs("d1", "bag4", "CHECKED_IN", "MAD", 0, 0),
        ];
        for o in &all {
            acc.observe(o.borrowed());
        }
        assert_eq!(acc.held_points(), 3, "bag1's two points and bag4's");
        let r = acc.finish(0);
        assert_eq!(r.active_entities, 4);
        let t = r.truncation;
        assert_eq!((t.untracked_entities, t.untracked_events), (2, 4));
        assert!(!t.active_entities_estimated);
        assert_eq!(t.events_without_location_key, 1);
        let transit = &r.transit[&MilestonePair::new("CHECKED_IN", "LOADED")];
        assert_eq!((transit.count, transit.p50_us), (1, 30 * MIN));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=20).collect();
        assert_eq!(nearest_rank(&v, 50), 10);
        assert_eq!(nearest_rank(&v, 95), 19);
        assert_eq!(nearest_rank(&[7], 95), 7);
    }
}
