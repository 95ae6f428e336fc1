//! The analytics engine (architecture scenario 6.1.3, flow 6.2.3): per-tenant KPIs of closed
//! time windows, anomaly detection on their series, results stored as events, served over the
//! API and (feature `influxdb`) written to InfluxDB.
//!
//! - **Windows** are aligned multiples of the window length (default one hour) of the store's
//!   recorded-at clock. A window `[from, to)` is *closed* once `to + grace` has passed.
//! - **Reading a window**: [`EventStore::position_at`]`(from)` finds where it starts in the
//!   global log (binary search or index, not a scan); the reader then reads on until the first
//!   event recorded at or after `to + grace` (the slack that covers PostgreSQL's approximate
//!   recorded-at order), filtering on recorded-at exactly.
//! - **Computing a window**: each page read is fed to one
//!   [`WindowAccumulator`] per tenant being
//!   computed (other tenants' events are skipped), so memory is bounded by
//!   [`AnalyticsConfig::kpi_bounds`] per tenant, not by the window's events; the
//!   `tracktrace-analytics` crate's `kpi` module says which KPIs stay exact and which become
//!   approximate beyond the bounds, and [`KpiWindow::truncation`] what a window left out
//!   (counted on `/metrics` too). Decoding and accumulating a page, and finishing the reports,
//!   run on tokio's blocking pool: the runtime's worker threads only await them, so a run
//!   never stalls the requests an API process serves. At most
//!   [`AnalyticsConfig::max_concurrent_computations`] window computations run at once per
//!   process (a fair semaphore; a run waits for a slot window by window), which bounds the
//!   process's analytics memory to that many windows' state.
//! - **On-demand runs** ([`Analytics::run_for`]): at most
//!   [`AnalyticsConfig::max_pending_runs`] are admitted at once (computing or waiting for a
//!   slot); another is refused at once with [`AppError::Busy`] (503, `Retry-After`). A run
//!   repeating windows another run stored answers what is stored.
//! - **Rejected commands** are not events: every API process counts rejected captures
//!   (validation errors, malformed JSON, conflicts) per tenant and second in a bounded buffer
//!   ([`AnalyticsConfig::max_rejection_buckets`]; over it, buckets are coarsened to whole
//!   windows, then the oldest dropped and counted) and flushes it every `grace / 4` (at most
//!   5 s) as `tt.RejectedCommandsCounted` events of the system tenant, one per tenant and UTC
//!   hour of counts (stream `analytics-rejected-<tenant>-<yyyymmddhh>`, at most 3,600 counts:
//!   under 150 KB). A chunk that cannot be stored is kept and retried with the same event id,
//!   so a lost acknowledgement never counts a second twice. A window sums the counts whose
//!   second falls in it from the hourly streams it overlaps, whenever they were stored: counts
//!   stored after an outage are counted by windows computed after that. Counts not yet flushed
//!   when a process crashes are lost (at most one flush interval, or the outage's buffer); a
//!   window computed before a late flush keeps what it stored.
//! - **Results** are events of the system tenant in one stream per tenant and UTC day
//!   (`analytics-<tenant>-<yyyymmdd>`): `tt.KpiWindowComputed` per window, `tt.AnomalyDetected`
//!   per anomaly, and `tt.AnomalyCheckCompleted` once a window's anomalies are decided. Their
//!   event ids are UUIDv5 of tenant, window and kind, so a re-run of a window appends nothing
//!   and answers what is stored: idempotent, also across processes.
//! - **Anomalies**: each KPI series (`events`, `active_entities`, `late_share`,
//!   `rejected_rate`, `milestone_overdue`) over the trailing `lookback` windows goes through
//!   [`tracktrace_analytics::anomaly::detect`] with the tenant's detector settings; the window
//!   is anomalous in a series when the detector flags its last point. Trailing windows that
//!   were never computed are computed (and stored) first. Transit and dwell percentiles are not
//!   judged: they are undefined in windows without samples.
//! - **Configuration** per tenant ([`TenantAnalyticsConfig`]) is stored as
//!   `tt.AnalyticsConfigSet` events (stream `analytics-config-<tenant>` of the system tenant),
//!   so every process reads the same; defaults apply until one is set.
//! - **Scheduler** ([`Analytics::run_scheduler`], roles `processor` and `all`): after each
//!   window closes it runs the new windows for every active tenant; on start it catches up on
//!   the last `catch_up_windows`. Several schedulers (processes) are safe: results are
//!   idempotent, so a race costs only duplicate work.

mod rejections;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracktrace_analytics::anomaly::{self, DetectorConfig};
use tracktrace_analytics::kpi::{
    self, Bounds, KpiConfig, KpiReport, MilestonePair, ObservationRef, WindowAccumulator,
};
use tracktrace_core::{
    Error as StoreError, EventId, EventStore, EventStoreExt, ExpectedVersion, NewEvent, ReadAll,
    ReadStream, RecordedEvent, StreamId, TenantId, Timestamp, Version,
};
use uuid::Uuid;

use rejections::{Chunk, HOUR_US, RejectionBuffer};

/// The bounds of one tenant's window computation ([`AnalyticsConfig::kpi_bounds`]).
pub use tracktrace_analytics::kpi::Bounds as KpiBounds;

use tracktrace_domain::{
    FieldError, OPERATIONAL_EVENT, StoredEvent, event_type_problem, format_micros, parse_instant,
};

use crate::access::{Actor, Admins, Scope, system_tenant};
use crate::error::AppError;
use crate::tenants::{TenantRegistry, parse_tenant};

const KPI_EVENT: &str = "tt.KpiWindowComputed";
const ANOMALY_EVENT: &str = "tt.AnomalyDetected";
const CHECKED_EVENT: &str = "tt.AnomalyCheckCompleted";
const REJECTED_EVENT: &str = "tt.RejectedCommandsCounted";
const CONFIG_EVENT: &str = "tt.AnalyticsConfigSet";
/// Event type of the milestone watch's overdue events (counted as a KPI).
pub const MILESTONE_OVERDUE: &str = "MILESTONE_OVERDUE";
/// Namespace of the deterministic (UUIDv5) result event ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0e_2f4c_9d1b_4e57_8c3a_b1f0_7d25_e943);
const PAGE: usize = 1000;
/// Events of the first page of a window scan (then ×8 per page up to [`PAGE`]).
const FIRST_PAGE: usize = 16;
const US_PER_S: i64 = 1_000_000;
/// Events per read of a rejected-count stream.
const REJECTED_PAGE: usize = 64;
/// What a refused on-demand run is told to wait.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Engine settings (server flags).
#[derive(Clone, Debug)]
pub struct AnalyticsConfig {
    /// Window length (and scheduler period); windows are aligned to multiples of it.
    pub window: Duration,
    /// A window is closed (may be computed) once `to + grace` has passed; also the reader's
    /// slack past `to`.
    pub grace: Duration,
    /// Trailing windows the anomaly detector sees (including the judged one).
    pub lookback_windows: usize,
    /// Windows the scheduler checks on start (computing those missing).
    pub catch_up_windows: usize,
    /// Most windows one on-demand run may cover.
    pub max_windows_per_run: usize,
    /// Whether the scheduler runs (roles `processor` and `all`).
    pub schedule: bool,
    /// Bounds of the state one tenant's window computation keeps (see
    /// [`tracktrace_analytics::kpi`] for what stays exact).
    pub kpi_bounds: Bounds,
    /// Window computations (scan and KPIs) running at once in this process, each holding at
    /// most one window's bounded state per tenant it computes.
    pub max_concurrent_computations: usize,
    /// On-demand runs ([`Analytics::run_for`]) admitted at once, computing or waiting for a
    /// computation slot; more are refused with [`AppError::Busy`] (503 with `Retry-After`).
    pub max_pending_runs: usize,
    /// Rejected-command counts this process buffers, in (tenant, second) buckets, before it
    /// coarsens them to whole windows and then drops the oldest (see
    /// [`Analytics::record_rejected_at`]).
    pub max_rejection_buckets: usize,
    /// InfluxDB writer, if configured.
    #[cfg(feature = "influxdb")]
    #[cfg_attr(docsrs, doc(cfg(feature = "influxdb")))]
    pub influx: Option<tracktrace_analytics::influx::InfluxConfig>,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(3600),
            grace: Duration::from_secs(60),
            lookback_windows: 7 * 24,
            catch_up_windows: 24,
            max_windows_per_run: 31 * 24,
            schedule: true,
            kpi_bounds: Bounds::default(),
            max_concurrent_computations: 1,
            max_pending_runs: 4,
            max_rejection_buckets: 200_000,
            #[cfg(feature = "influxdb")]
            influx: None,
        }
    }
}

impl AnalyticsConfig {
    fn window_us(&self) -> i64 {
        i64::try_from(self.window.as_micros())
            .unwrap_or(i64::MAX)
            .max(US_PER_S)
    }

    fn grace_us(&self) -> i64 {
        i64::try_from(self.grace.as_micros()).unwrap_or(i64::MAX)
    }

    /// How often API processes flush their rejected-command counts.
    pub fn flush_interval(&self) -> Duration {
        (self.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

// ---------------------------------------------------------------------------------------------
// Wire types (also the stored payloads: JSON, deterministic for a given input).

/// A milestone pair whose transit time is measured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MilestonePairDto {
    /// Start milestone event type, e.g. `CHECKED_IN`.
    pub from: String,
    /// End milestone event type, e.g. `LOADED`.
    pub to: String,
}

/// Anomaly detector settings of a tenant (see the analytics crate's `DetectorConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DetectorDto {
    /// Season length in windows (24: daily cycle of hourly windows); 0: no seasonality.
    pub season: usize,
    /// Seasons (or, without a season, windows) of history before a window is judged.
    pub min_history: usize,
    /// Trailing residuals whose MAD scales the score.
    pub residual_window: usize,
    /// Residuals needed before windows are judged.
    pub min_residuals: usize,
    /// Robust z-score above which a window is anomalous.
    pub threshold: f64,
    /// Floor of the residual scale relative to the expected value.
    pub min_relative_scale: f64,
}

impl Default for DetectorDto {
    fn default() -> Self {
        let d = DetectorConfig::default();
        Self {
            season: d.season.unwrap_or(0),
            min_history: d.min_history,
            residual_window: d.residual_window,
            min_residuals: d.min_residuals,
            threshold: d.threshold,
            min_relative_scale: d.min_relative_scale,
        }
    }
}

/// Per-tenant analytics configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantAnalyticsConfig {
    /// Milestone pairs whose transit time is reported (at most 20).
    pub milestone_pairs: Vec<MilestonePairDto>,
    /// An event is late when received more than this many seconds after it occurred.
    pub late_threshold_secs: u64,
    /// Anomaly detector settings.
    pub detector: DetectorDto,
}

impl Default for TenantAnalyticsConfig {
    fn default() -> Self {
        let k = KpiConfig::default();
        Self {
            milestone_pairs: k
                .milestone_pairs
                .into_iter()
                .map(|p| MilestonePairDto {
                    from: p.from,
                    to: p.to,
                })
                .collect(),
            late_threshold_secs: k.late_threshold.as_secs(),
            detector: DetectorDto::default(),
        }
    }
}

impl TenantAnalyticsConfig {
    /// Every field error of this configuration.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        if self.milestone_pairs.len() > 20 {
            errs.push(FieldError::new("milestonePairs", "at most 20 pairs"));
        }
        for (i, p) in self.milestone_pairs.iter().enumerate() {
            for (name, v) in [("from", &p.from), ("to", &p.to)] {
                if let Some(m) = event_type_problem(v) {
                    errs.push(FieldError::new(format!("milestonePairs[{i}].{name}"), m));
                }
            }
        }
        if !(1..=7 * 86_400).contains(&self.late_threshold_secs) {
            errs.push(FieldError::new(
                "lateThresholdSecs",
                "must be 1–604800 seconds",
            ));
        }
        let d = &self.detector;
        let mut range = |name: &str, v: usize, lo: usize, hi: usize| {
            if !(lo..=hi).contains(&v) {
                errs.push(FieldError::new(
                    format!("detector.{name}"),
                    format!("must be {lo}–{hi}"),
                ));
            }
        };
        range("season", d.season, 0, 1000);
        range("minHistory", d.min_history, 1, 1000);
        range("residualWindow", d.residual_window, 1, 10_000);
        range("minResiduals", d.min_residuals, 1, 10_000);
        if !(d.threshold.is_finite() && d.threshold > 0.0 && d.threshold <= 100.0) {
            errs.push(FieldError::new(
                "detector.threshold",
                "must be a number in (0, 100]",
            ));
        }
        if !(d.min_relative_scale.is_finite() && (0.0..=1.0).contains(&d.min_relative_scale)) {
            errs.push(FieldError::new(
                "detector.minRelativeScale",
                "must be a number in [0, 1]",
            ));
        }
        errs
    }

    fn kpi_config(&self) -> KpiConfig {
        KpiConfig {
            milestone_pairs: self
                .milestone_pairs
                .iter()
                .map(|p| MilestonePair::new(p.from.clone(), p.to.clone()))
                .collect(),
            late_threshold: Duration::from_secs(self.late_threshold_secs),
        }
    }

    fn detector_config(&self) -> DetectorConfig {
        let d = &self.detector;
        DetectorConfig {
            season: (d.season > 0).then_some(d.season),
            min_history: d.min_history,
            residual_window: d.residual_window,
            min_residuals: d.min_residuals,
            threshold: d.threshold,
            min_relative_scale: d.min_relative_scale,
        }
    }
}

/// Percentiles of durations, in seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DurationDto {
    /// Samples.
    pub count: usize,
    /// Median (nearest rank), seconds.
    pub p50_s: f64,
    /// 95th percentile (nearest rank), seconds.
    pub p95_s: f64,
    /// Largest sample, seconds.
    pub max_s: f64,
}

impl From<&kpi::DurationStats> for DurationDto {
    fn from(s: &kpi::DurationStats) -> Self {
        Self {
            count: s.count,
            p50_s: s.p50_us as f64 / 1e6,
            p95_s: s.p95_us as f64 / 1e6,
            max_s: s.max_us as f64 / 1e6,
        }
    }
}

/// Transit time between a milestone pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TransitDto {
    /// Start milestone.
    pub from: String,
    /// End milestone.
    pub to: String,
    /// Percentiles.
    #[serde(flatten)]
    pub stats: DurationDto,
}

/// Dwell time at a location.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DwellDto {
    /// Location code.
    pub location: String,
    /// Percentiles.
    #[serde(flatten)]
    pub stats: DurationDto,
}

/// The KPIs of one tenant and window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct KpiWindow {
    /// Tenant.
    pub tenant: String,
    /// Window start (inclusive), RFC 3339 UTC.
    pub from: String,
    /// Window end (exclusive), RFC 3339 UTC.
    pub to: String,
    /// Operational events recorded in the window.
    pub events: usize,
    /// Events per event type.
    pub events_by_type: BTreeMap<String, usize>,
    /// Events per location code.
    pub events_by_location: BTreeMap<String, usize>,
    /// Events per second.
    pub ingestion_rate_per_s: f64,
    /// Distinct entities with an event in the window.
    pub active_entities: usize,
    /// Transit time per configured milestone pair (pairs without samples are absent).
    pub transit: Vec<TransitDto>,
    /// Dwell time per location (closed stays only).
    pub dwell: Vec<DwellDto>,
    /// Share of events received later than the tenant's late threshold after they occurred.
    pub late_share: f64,
    /// Rejected commands (captures) in the window.
    pub rejected_commands: u64,
    /// Rejected / (accepted + rejected).
    pub rejected_rate: f64,
    /// `MILESTONE_OVERDUE` events in the window.
    pub milestone_overdue: usize,
    /// What the engine's bounds left out of this window; absent when every KPI is exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncation: Option<TruncationDto>,
}

/// What the bounds of a window computation left out (see the analytics crate's `kpi`
/// module): transit and dwell cover the tracked entities only; `activeEntities` may be an
/// estimate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TruncationDto {
    /// Entities whose transit and dwell were not computed (estimated when
    /// `activeEntitiesEstimated`).
    pub untracked_entities: usize,
    /// Events of those entities.
    pub untracked_events: usize,
    /// `activeEntities` is a HyperLogLog estimate (relative standard error 0.81 %).
    pub active_entities_estimated: bool,
    /// Events not counted in `eventsByType` (too many distinct types).
    pub events_without_type_key: usize,
    /// Events not counted in `eventsByLocation` (too many distinct locations).
    pub events_without_location_key: usize,
}

impl From<&kpi::Truncation> for TruncationDto {
    fn from(t: &kpi::Truncation) -> Self {
        Self {
            untracked_entities: t.untracked_entities,
            untracked_events: t.untracked_events,
            active_entities_estimated: t.active_entities_estimated,
            events_without_type_key: t.events_without_type_key,
            events_without_location_key: t.events_without_location_key,
        }
    }
}

impl KpiWindow {
    fn from_report(tenant: &str, r: &KpiReport, rejected: u64, overdue: usize) -> Self {
        Self {
            tenant: tenant.to_owned(),
            from: format_micros(r.window_start_us),
            to: format_micros(r.window_end_us),
            events: r.events,
            events_by_type: r.events_by_type.clone(),
            events_by_location: r.events_by_location.clone(),
            ingestion_rate_per_s: r.ingestion_rate_per_s,
            active_entities: r.active_entities,
            transit: r
                .transit
                .iter()
                .map(|(p, s)| TransitDto {
                    from: p.from.clone(),
                    to: p.to.clone(),
                    stats: s.into(),
                })
                .collect(),
            dwell: r
                .dwell
                .iter()
                .map(|(l, s)| DwellDto {
                    location: l.clone(),
                    stats: s.into(),
                })
                .collect(),
            late_share: r.late_share,
            rejected_commands: rejected,
            rejected_rate: r.rejected_rate,
            milestone_overdue: overdue,
            truncation: (!r.truncation.is_empty()).then(|| (&r.truncation).into()),
        }
    }

    /// The value of a judged KPI series.
    fn series_value(&self, kpi: &str) -> f64 {
        match kpi {
            "events" => self.events as f64,
            "active_entities" => self.active_entities as f64,
            "late_share" => self.late_share,
            "rejected_rate" => self.rejected_rate,
            "milestone_overdue" => self.milestone_overdue as f64,
            _ => f64::NAN,
        }
    }

    #[cfg(feature = "influxdb")]
    fn to_report(&self, from_us: i64, to_us: i64) -> KpiReport {
        let stats = |d: &DurationDto| kpi::DurationStats {
            count: d.count,
            p50_us: (d.p50_s * 1e6).round() as i64,
            p95_us: (d.p95_s * 1e6).round() as i64,
            max_us: (d.max_s * 1e6).round() as i64,
        };
        KpiReport {
            window_start_us: from_us,
            window_end_us: to_us,
            events: self.events,
            events_by_type: self.events_by_type.clone(),
            events_by_location: self.events_by_location.clone(),
            ingestion_rate_per_s: self.ingestion_rate_per_s,
            active_entities: self.active_entities,
            transit: self
                .transit
                .iter()
                .map(|t| (MilestonePair::new(&t.from, &t.to), stats(&t.stats)))
                .collect(),
            dwell: self
                .dwell
                .iter()
                .map(|d| (d.location.clone(), stats(&d.stats)))
                .collect(),
            late_share: self.late_share,
            rejected_rate: self.rejected_rate,
            truncation: kpi::Truncation::default(),
        }
    }
}

/// The KPI series judged for anomalies.
pub const JUDGED_KPIS: [&str; 5] = [
    "events",
    "active_entities",
    "late_share",
    "rejected_rate",
    "milestone_overdue",
];

/// An anomalous KPI value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AnomalyDto {
    /// Tenant.
    pub tenant: String,
    /// KPI series (`events`, `active_entities`, `late_share`, `rejected_rate`,
    /// `milestone_overdue`).
    pub kpi: String,
    /// Window start, RFC 3339 UTC.
    pub from: String,
    /// Window end, RFC 3339 UTC.
    pub to: String,
    /// Observed value.
    pub value: f64,
    /// Expected value (robust baseline).
    pub expected: f64,
    /// Robust z-score (positive: spike, negative: drop).
    pub score: f64,
    /// Lowest value that would not have been flagged.
    pub expected_low: f64,
    /// Highest value that would not have been flagged.
    pub expected_high: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CheckedPayload {
    tenant: String,
    from: String,
    to: String,
    anomalies: usize,
}

#[derive(Serialize, Deserialize)]
struct RejectedPayload {
    tenant: String,
    /// `(second start in µs since the epoch, count)`.
    counts: Vec<(i64, u64)>,
}

/// One computed window of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WindowResult {
    /// `true` if this run stored the result; `false` if it was stored before (the stored
    /// result is returned).
    pub stored: bool,
    /// The KPIs.
    pub kpis: KpiWindow,
    /// The window's anomalies.
    pub anomalies: Vec<AnomalyDto>,
}

/// What a run computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    /// Start of the first window, RFC 3339 UTC.
    pub from: String,
    /// End of the last window, RFC 3339 UTC.
    pub to: String,
    /// Per tenant and window, in window order.
    pub windows: Vec<WindowResult>,
}

// ---------------------------------------------------------------------------------------------
// The engine.

/// The analytics engine of one process (cheap to clone).
#[derive(Clone)]
pub struct Analytics {
    inner: Arc<Engine>,
}

struct Engine {
    store: Arc<dyn EventStore>,
    system: TenantId,
    config: RwLock<AnalyticsConfig>,
    /// Rejected captures counted until they are stored.
    rejections: Mutex<RejectionBuffer>,
    /// One flush at a time (chunks are stored in order).
    flushing: tokio::sync::Mutex<()>,
    /// Window computation slots (`max_concurrent_computations`; replaced by `configure`).
    computations: RwLock<Arc<Semaphore>>,
    /// On-demand runs admitted (computing or waiting for a slot).
    pending_runs: AtomicUsize,
    runs_refused: AtomicU64,
    untracked_entities: AtomicU64,
    #[cfg(feature = "influxdb")]
    influx: std::sync::OnceLock<tracktrace_analytics::influx::InfluxWriter>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics").finish_non_exhaustive()
    }
}

/// Counters of the engine and its InfluxDB writer, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnalyticsStatus {
    /// Entities whose transit and dwell were left out of windows this process computed, because
    /// a tenant's window had more entities or events than the bounds allow.
    pub untracked_entities: u64,
    /// On-demand runs refused because as many as the process admits were in progress.
    pub runs_refused: u64,
    /// On-demand runs in progress (computing or waiting for a computation slot).
    pub runs_pending: u64,
    /// (tenant, second) buckets of rejected-command counts not yet stored.
    pub rejection_buckets: u64,
    /// Rejected-command counts dropped because the buffer reached its bound.
    pub rejections_lost: u64,
    /// Whether an InfluxDB writer is configured.
    pub influx_enabled: bool,
    /// Lines waiting to be written.
    pub influx_buffered: u64,
    /// Lines dropped because the buffer was full.
    pub influx_dropped: u64,
    /// Lines accepted by InfluxDB.
    pub influx_written: u64,
    /// Lines InfluxDB rejected as malformed.
    pub influx_rejected: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> i64 {
    Timestamp::now().unix_micros()
}

fn result_id(parts: &str) -> EventId {
    // UUIDv5 is never nil, so this cannot fail; fall back to a random id defensively.
    EventId::from_uuid(Uuid::new_v5(&ID_NAMESPACE, parts.as_bytes()))
        .unwrap_or_else(|_| EventId::new())
}

fn kpi_id(tenant: &str, from: i64, to: i64) -> EventId {
    result_id(&format!("kpi/{tenant}/{from}/{to}"))
}

fn checked_id(tenant: &str, from: i64, to: i64) -> EventId {
    result_id(&format!("checked/{tenant}/{from}/{to}"))
}

fn anomaly_id(tenant: &str, from: i64, to: i64, kpi: &str) -> EventId {
    result_id(&format!("anomaly/{tenant}/{from}/{to}/{kpi}"))
}

/// The result stream of `tenant` for the UTC day holding `at_us`.
fn day_stream(tenant: &str, at_us: i64) -> Result<StreamId, AppError> {
    let day = format_micros(at_us.div_euclid(86_400 * US_PER_S) * 86_400 * US_PER_S);
    let ymd: String = day.chars().take(10).filter(|c| *c != '-').collect();
    StreamId::parse(format!("analytics-{tenant}-{ymd}")).map_err(AppError::internal)
}

fn config_stream(tenant: &str) -> Result<StreamId, AppError> {
    StreamId::parse(format!("analytics-config-{tenant}")).map_err(AppError::internal)
}

fn rejected_stream(tenant: &str) -> Result<StreamId, AppError> {
    StreamId::parse(format!("analytics-rejected-{tenant}")).map_err(AppError::internal)
}

/// The stream of `tenant`'s rejected-command counts of the UTC hour starting at `hour_us`.
fn rejected_hour_stream(tenant: &str, hour_us: i64) -> Result<StreamId, AppError> {
    let hour = format_micros(hour_us);
    let ymdh: String = hour
        .chars()
        .take(13)
        .filter(|c| c.is_ascii_digit())
        .collect();
    StreamId::parse(format!("analytics-rejected-{tenant}-{ymdh}")).map_err(AppError::internal)
}

/// What a window scan accumulates for one tenant.
struct TenantWindow {
    tenant: TenantId,
    kpis: WindowAccumulator,
    overdue: usize,
    /// Counts from the stream written before counts were stored per hour.
    legacy_rejected: u64,
}

/// The state of one window scan, moved to a blocking thread for each page.
struct Scan {
    from_us: i64,
    to_us: i64,
    end_us: i64,
    system: TenantId,
    tenants: HashMap<String, TenantWindow>,
}

impl Scan {
    /// Accumulates a page; `true` once an event recorded at or after `to + grace` is reached.
    fn page(&mut self, events: &[RecordedEvent]) -> bool {
        let mut id = Uuid::encode_buffer();
        for e in events {
            let at = e.recorded_at.unix_micros();
            if at >= self.end_us {
                return true;
            }
            if e.event_type == OPERATIONAL_EVENT && (self.from_us..self.to_us).contains(&at) {
                let Some(t) = self.tenants.get_mut(e.tenant.as_str()) else {
                    continue;
                };
                match StoredEvent::decode(e) {
                    Ok(s) => {
                        if s.event_type == MILESTONE_OVERDUE {
                            t.overdue += 1;
                        }
                        t.kpis.observe(ObservationRef {
                            id: e.event_id.as_uuid().hyphenated().encode_lower(&mut id),
                            entity_id: &s.entity_id,
                            event_type: &s.event_type,
                            location: &s.location.code,
                            occurred_at_us: s.occurred_at_us,
                            received_at_us: s.received_at_us,
                        });
                    }
                    Err(err) => {
                        tracing::error!(position = %e.position, error = %err, "undecodable operational event skipped by analytics");
                    }
                }
            } else if e.event_type == REJECTED_EVENT
                && e.tenant == self.system
                && e.stream.as_str().starts_with("analytics-rejected-")
            {
                match serde_json::from_slice::<RejectedPayload>(&e.payload) {
                    // Only the per-tenant stream of earlier versions: the hourly ones are
                    // read by stream, whenever their events were recorded.
                    Ok(p) if rejected_stream(&p.tenant).is_ok_and(|s| s == e.stream) => {
                        if let Some(t) = self.tenants.get_mut(&p.tenant) {
                            t.legacy_rejected += p
                                .counts
                                .iter()
                                .filter(|(s, _)| (self.from_us..self.to_us).contains(s))
                                .map(|(_, n)| n)
                                .sum::<u64>();
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::error!(position = %e.position, error = %err, "undecodable rejection counts skipped");
                    }
                }
            }
        }
        false
    }
}

/// Runs `f` on tokio's blocking pool: CPU-bound work off the runtime's worker threads.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppError::internal(format!("analytics computation failed: {e}")))
}

/// An admitted on-demand run; leaves the count when dropped.
struct RunTicket<'a>(&'a AtomicUsize);

impl Drop for RunTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Analytics {
    /// An engine over `store` with default settings (see [`Analytics::configure`]).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            inner: Arc::new(Engine {
                store,
                system: system_tenant(),
                config: RwLock::new(AnalyticsConfig::default()),
                rejections: Mutex::new(RejectionBuffer::new(
                    AnalyticsConfig::default().max_rejection_buckets,
                )),
                flushing: tokio::sync::Mutex::new(()),
                computations: RwLock::new(Arc::new(Semaphore::new(
                    AnalyticsConfig::default().max_concurrent_computations,
                ))),
                pending_runs: AtomicUsize::new(0),
                runs_refused: AtomicU64::new(0),
                untracked_entities: AtomicU64::new(0),
                #[cfg(feature = "influxdb")]
                influx: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Applies the server's settings; starts the InfluxDB writer if one is configured (the
    /// first configured writer stays). Must run inside a tokio runtime.
    pub fn configure(&self, cfg: AnalyticsConfig) -> Result<(), String> {
        #[cfg(feature = "influxdb")]
        if let Some(ic) = &cfg.influx
            && self.inner.influx.get().is_none()
        {
            let w = tracktrace_analytics::influx::InfluxWriter::start(ic.clone())
                .map_err(|e| e.to_string())?;
            let _ = self.inner.influx.set(w);
        }
        lock(&self.inner.rejections).set_max_buckets(cfg.max_rejection_buckets);
        *self
            .inner
            .computations
            .write()
            .unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Semaphore::new(cfg.max_concurrent_computations.max(1)));
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(())
    }

    fn config(&self) -> AnalyticsConfig {
        self.inner
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The engine's and the InfluxDB writer's counters (cheap: a few atomics and two short
    /// locks).
    pub fn status(&self) -> AnalyticsStatus {
        let (buckets, lost) = {
            let r = lock(&self.inner.rejections);
            (r.buckets() as u64, r.lost())
        };
        let status = AnalyticsStatus {
            untracked_entities: self.inner.untracked_entities.load(Ordering::Relaxed),
            runs_refused: self.inner.runs_refused.load(Ordering::Relaxed),
            runs_pending: self.inner.pending_runs.load(Ordering::Relaxed) as u64,
            rejection_buckets: buckets,
            rejections_lost: lost,
            ..AnalyticsStatus::default()
        };
        #[cfg(feature = "influxdb")]
        if let Some(w) = self.inner.influx.get() {
            let s = w.stats();
            return AnalyticsStatus {
                influx_enabled: true,
                influx_buffered: s.buffered,
                influx_dropped: s.dropped,
                influx_written: s.written,
                influx_rejected: s.rejected,
                ..status
            };
        }
        status
    }

    /// Waits (at most `timeout`) until the InfluxDB writer has sent what is queued; `true`
    /// without a writer.
    pub async fn flush_influx(&self, timeout: Duration) -> bool {
        #[cfg(feature = "influxdb")]
        if let Some(w) = self.inner.influx.get() {
            return w.flush(timeout).await;
        }
        let _ = timeout;
        true
    }

    // ---- rejected commands ------------------------------------------------------------------

    /// Counts a rejected command of `tenant` now (flushed by [`Analytics::flush_rejections`]).
    pub fn record_rejected(&self, tenant: &TenantId) {
        self.record_rejected_at(tenant, now_us());
    }

    /// Counts a rejected command of `tenant` at `at_us` (µs since the epoch; counted in its
    /// second). The buffer holds at most `max_rejection_buckets` (tenant, second) buckets:
    /// beyond, it coarsens its buckets to whole windows (nothing a window's KPI reads is
    /// lost), then drops the oldest and counts them in [`AnalyticsStatus::rejections_lost`].
    pub fn record_rejected_at(&self, tenant: &TenantId, at_us: i64) {
        let window_us = self
            .inner
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .window_us();
        lock(&self.inner.rejections).record(tenant.as_str(), at_us, 1, window_us);
    }

    /// Counts `e` if it means the command was rejected (invalid, malformed, conflicting).
    pub fn record_outcome(&self, tenant: &TenantId, e: &AppError) {
        if matches!(
            e,
            AppError::Validation(_) | AppError::Malformed(_) | AppError::Conflict(_)
        ) {
            self.record_rejected(tenant);
        }
    }

    /// Stores the counted rejections as events: one per tenant and UTC hour of counts (at most
    /// 3,600 counts, well under the store's 1 MiB event limit), oldest first. A chunk that
    /// cannot be stored stays in the buffer and is retried with the same event id (a write
    /// whose acknowledgement was lost is not counted twice); nothing newer is sealed into
    /// chunks meanwhile.
    pub async fn flush_rejections(&self) -> Result<(), AppError> {
        let _one_at_a_time = self.inner.flushing.lock().await;
        // Pending chunks first, then what was counted up to now (once: counts that arrive
        // during the flush wait for the next).
        let mut sealed = false;
        loop {
            let chunk = {
                let mut b = lock(&self.inner.rejections);
                let seal = !sealed && !b.has_pending();
                sealed |= seal;
                b.next_chunk(seal)
            };
            let Some(chunk) = chunk else {
                return Ok(());
            };
            self.store_chunk(&chunk).await?;
            lock(&self.inner.rejections).stored(chunk.id);
        }
    }

    async fn store_chunk(&self, chunk: &Chunk) -> Result<(), AppError> {
        let payload = RejectedPayload {
            tenant: chunk.tenant.clone(),
            counts: chunk.counts.iter().map(|(k, v)| (*k, *v)).collect(),
        };
        let ev = NewEvent::json(
            REJECTED_EVENT,
            &serde_json::to_value(&payload).map_err(AppError::internal)?,
        )
        .with_id(chunk.id);
        // A duplicate (the same chunk stored before its acknowledgement was lost) is success.
        self.inner
            .store
            .append_to(
                &self.inner.system,
                &rejected_hour_stream(&chunk.tenant, chunk.hour_us)?,
                ExpectedVersion::Any,
                vec![ev],
            )
            .await?;
        Ok(())
    }

    /// Rejected commands of `tenant` counted in `[from, to)`, from its hourly count streams
    /// (whenever the counts were stored).
    async fn rejected_in(&self, tenant: &str, from_us: i64, to_us: i64) -> Result<u64, AppError> {
        let mut total = 0u64;
        let mut hour = from_us.div_euclid(HOUR_US) * HOUR_US;
        while hour < to_us {
            let stream = rejected_hour_stream(tenant, hour)?;
            let mut next = Version::new(1);
            loop {
                let events = self
                    .inner
                    .store
                    .read_stream(
                        ReadStream::forwards(self.inner.system.clone(), stream.clone())
                            .from(next)
                            .limit(REJECTED_PAGE),
                    )
                    .await?;
                for e in &events {
                    match serde_json::from_slice::<RejectedPayload>(&e.payload) {
                        Ok(p) => {
                            total = total.saturating_add(
                                p.counts
                                    .iter()
                                    .filter(|(s, _)| (from_us..to_us).contains(s))
                                    .map(|(_, n)| n)
                                    .sum::<u64>(),
                            );
                        }
                        Err(err) => {
                            tracing::error!(position = %e.position, error = %err, "undecodable rejection counts skipped");
                        }
                    }
                }
                match events.last() {
                    Some(last) if events.len() == REJECTED_PAGE => next = last.version.next(),
                    _ => break,
                }
            }
            hour += HOUR_US;
        }
        Ok(total)
    }

    /// Flushes rejection counts forever (spawned by the server in roles `api` and `all`).
    pub async fn run_rejection_flusher(self) {
        loop {
            tokio::time::sleep(self.config().flush_interval()).await;
            if let Err(e) = self.flush_rejections().await {
                tracing::warn!(error = %e, "cannot store rejected-command counts; retrying");
            }
        }
    }

    // ---- configuration ----------------------------------------------------------------------

    /// The tenant's configuration (defaults until one is set).
    pub async fn tenant_config(
        &self,
        tenant: &TenantId,
    ) -> Result<TenantAnalyticsConfig, AppError> {
        let last = self
            .inner
            .store
            .read_stream(
                ReadStream::backwards(self.inner.system.clone(), config_stream(tenant.as_str())?)
                    .limit(1),
            )
            .await?;
        match last.first() {
            None => Ok(TenantAnalyticsConfig::default()),
            Some(e) => serde_json::from_slice(&e.payload).map_err(|err| {
                tracing::error!(position = %e.position, error = %err, "undecodable analytics config");
                AppError::internal(err)
            }),
        }
    }

    /// Stores a new configuration for `tenant` (400 with field errors if invalid).
    pub async fn set_tenant_config(
        &self,
        tenant: &TenantId,
        cfg: &TenantAnalyticsConfig,
    ) -> Result<(), AppError> {
        let errs = cfg.validate();
        if !errs.is_empty() {
            return Err(AppError::Validation(errs));
        }
        let ev = NewEvent::json(
            CONFIG_EVENT,
            &serde_json::to_value(cfg).map_err(AppError::internal)?,
        );
        self.inner
            .store
            .append_to(
                &self.inner.system,
                &config_stream(tenant.as_str())?,
                ExpectedVersion::Any,
                vec![ev],
            )
            .await?;
        Ok(())
    }

    // ---- reading windows --------------------------------------------------------------------

    /// Computes the KPIs of `[from, to)` for `tenants` (with their KPI configurations) in
    /// one scan: waits for a computation slot, reads the window page by page and feeds each
    /// page to per-tenant accumulators on the blocking pool (never on the runtime's worker
    /// threads), reads the rejection counts, and finishes the reports on the blocking pool.
    async fn compute_window(
        &self,
        from_us: i64,
        to_us: i64,
        grace_us: i64,
        tenants: Vec<(TenantId, KpiConfig)>,
    ) -> Result<Vec<(TenantId, KpiWindow)>, AppError> {
        let _slot = self.computation_slot().await?;
        let bounds = self.config().kpi_bounds;
        let mut scan = Scan {
            from_us,
            to_us,
            end_us: to_us.saturating_add(grace_us),
            system: self.inner.system.clone(),
            tenants: tenants
                .into_iter()
                .map(|(t, kc)| {
                    let w = TenantWindow {
                        tenant: t.clone(),
                        kpis: WindowAccumulator::new(&kc, bounds, from_us, to_us),
                        overdue: 0,
                        legacy_rejected: 0,
                    };
                    (t.to_string(), w)
                })
                .collect(),
        };
        let store = &self.inner.store;
        let mut pos = store
            .position_at(Timestamp::from_unix_micros(from_us))
            .await?;
        // Most windows the scheduler checks on start are empty (it looks back days): their
        // scan ends at the first event read, so the first pages are small and grow to `PAGE`
        // (a full first page cost ~8 % of the CPU of a capture load started with the server).
        let mut limit = FIRST_PAGE;
        loop {
            let page = store.read_all(ReadAll::starting_at(pos, limit)).await?;
            let short = page.events.len() < limit;
            limit = (limit * 8).min(PAGE);
            pos = page.next;
            let (back, ended) = off_runtime(move || {
                let ended = scan.page(&page.events);
                (scan, ended)
            })
            .await?;
            scan = back;
            if ended || short {
                break;
            }
        }
        let mut finishing = Vec::with_capacity(scan.tenants.len());
        for w in scan.tenants.into_values() {
            let rejected = self
                .rejected_in(w.tenant.as_str(), from_us, to_us)
                .await?
                .saturating_add(w.legacy_rejected);
            finishing.push((w, rejected));
        }
        let windows = off_runtime(move || {
            finishing
                .into_iter()
                .map(|(w, rejected)| {
                    let report = w.kpis.finish(rejected);
                    let k = KpiWindow::from_report(w.tenant.as_str(), &report, rejected, w.overdue);
                    (w.tenant, k)
                })
                .collect::<Vec<_>>()
        })
        .await?;
        let untracked: usize = windows
            .iter()
            .filter_map(|(_, k)| k.truncation.as_ref().map(|t| t.untracked_entities))
            .sum();
        self.inner
            .untracked_entities
            .fetch_add(untracked as u64, Ordering::Relaxed);
        Ok(windows)
    }

    /// A window computation slot (at most `max_concurrent_computations` at once; waiters are
    /// served in order).
    async fn computation_slot(&self) -> Result<OwnedSemaphorePermit, AppError> {
        let slots = self
            .inner
            .computations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        slots
            .acquire_owned()
            .await
            .map_err(|_| AppError::internal("analytics computation slots closed"))
    }

    /// Admits an on-demand run, or refuses it when `max_pending_runs` are in progress.
    fn admit_run(&self) -> Result<RunTicket<'_>, AppError> {
        let max = self.config().max_pending_runs.max(1);
        let admitted =
            self.inner
                .pending_runs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < max).then_some(n + 1)
                });
        if admitted.is_err() {
            self.inner.runs_refused.fetch_add(1, Ordering::Relaxed);
            return Err(AppError::Busy {
                what: format!(
                    "{max} analytics run(s) are already in progress in this process, the most it \
                     admits at once; retry later"
                ),
                retry_after: BUSY_RETRY_AFTER,
            });
        }
        Ok(RunTicket(&self.inner.pending_runs))
    }

    // ---- stored results ---------------------------------------------------------------------

    async fn stored<T: serde::de::DeserializeOwned>(
        &self,
        id: EventId,
    ) -> Result<Option<T>, AppError> {
        match self.inner.store.get_event(&self.inner.system, id).await? {
            None => Ok(None),
            Some(e) => serde_json::from_slice(&e.payload).map(Some).map_err(|err| {
                tracing::error!(position = %e.position, error = %err, "undecodable analytics result");
                AppError::internal(err)
            }),
        }
    }

    /// Events of `tenant`'s result streams of the days overlapping `[from, to)`, of `ty`.
    async fn stored_events(
        &self,
        tenant: &str,
        from_us: i64,
        to_us: i64,
        ty: &str,
    ) -> Result<Vec<RecordedEvent>, AppError> {
        let day = 86_400 * US_PER_S;
        let mut out = Vec::new();
        let mut d = from_us.div_euclid(day) * day;
        while d < to_us {
            let events = self
                .inner
                .store
                .read_stream_forwards(&self.inner.system, &day_stream(tenant, d)?)
                .await?;
            out.extend(events.into_iter().filter(|e| e.event_type == ty));
            d += day;
        }
        Ok(out)
    }

    /// Stored KPI windows of `tenant` starting in `[from, to)`, in window order.
    pub async fn kpis(
        &self,
        tenant: &TenantId,
        from_us: i64,
        to_us: i64,
    ) -> Result<Vec<KpiWindow>, AppError> {
        let mut v: Vec<(i64, KpiWindow)> = Vec::new();
        for e in self
            .stored_events(tenant.as_str(), from_us, to_us, KPI_EVENT)
            .await?
        {
            let Ok(k) = serde_json::from_slice::<KpiWindow>(&e.payload) else {
                tracing::error!(position = %e.position, "undecodable KPI window skipped");
                continue;
            };
            let start = parse_instant(&k.from).unwrap_or(i64::MIN);
            if (from_us..to_us).contains(&start) {
                v.push((start, k));
            }
        }
        v.sort_by_key(|a| a.0);
        Ok(v.into_iter().map(|(_, k)| k).collect())
    }

    /// Stored anomalies of `tenant` in windows starting in `[from, to)`, in window order.
    pub async fn anomalies(
        &self,
        tenant: &TenantId,
        from_us: i64,
        to_us: i64,
    ) -> Result<Vec<AnomalyDto>, AppError> {
        let mut v: Vec<(i64, usize, AnomalyDto)> = Vec::new();
        for e in self
            .stored_events(tenant.as_str(), from_us, to_us, ANOMALY_EVENT)
            .await?
        {
            let Ok(a) = serde_json::from_slice::<AnomalyDto>(&e.payload) else {
                tracing::error!(position = %e.position, "undecodable anomaly skipped");
                continue;
            };
            let start = parse_instant(&a.from).unwrap_or(i64::MIN);
            if (from_us..to_us).contains(&start) {
                // Same order as a run reports them.
                let rank = JUDGED_KPIS
                    .iter()
                    .position(|k| *k == a.kpi)
                    .unwrap_or(usize::MAX);
                v.push((start, rank, a));
            }
        }
        v.sort_by_key(|a| (a.0, a.1));
        Ok(v.into_iter().map(|(_, _, a)| a).collect())
    }

    // ---- runs -------------------------------------------------------------------------------

    /// The last closed window's end (`to`), per the current settings.
    pub fn last_closed_end(&self) -> i64 {
        let cfg = self.config();
        let w = cfg.window_us();
        (now_us() - cfg.grace_us()).div_euclid(w) * w
    }

    /// Checks a requested range: aligned, ordered, closed, not too long.
    pub fn check_range(&self, from_us: i64, to_us: i64) -> Result<(), AppError> {
        let cfg = self.config();
        let w = cfg.window_us();
        let mut errs = Vec::new();
        if from_us.rem_euclid(w) != 0 {
            errs.push(FieldError::new(
                "from",
                format!(
                    "must be a multiple of the window length ({} s) since the epoch",
                    w / US_PER_S
                ),
            ));
        }
        if to_us.rem_euclid(w) != 0 {
            errs.push(FieldError::new(
                "to",
                format!(
                    "must be a multiple of the window length ({} s) since the epoch",
                    w / US_PER_S
                ),
            ));
        }
        if to_us <= from_us {
            errs.push(FieldError::new("to", "must be after from"));
        } else if (to_us - from_us) / w > cfg.max_windows_per_run as i64 {
            errs.push(FieldError::new(
                "to",
                format!("at most {} windows per run", cfg.max_windows_per_run),
            ));
        }
        if to_us.saturating_add(cfg.grace_us()) > now_us() {
            errs.push(FieldError::new(
                "to",
                format!(
                    "the window is not closed yet: to + {} s of grace must be in the past",
                    cfg.grace.as_secs_f64()
                ),
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(AppError::Validation(errs))
        }
    }

    /// Computes (or answers from the store) every window of `[from, to)` for `tenants`.
    /// `from` and `to` must pass [`Analytics::check_range`].
    pub async fn run(
        &self,
        tenants: &[TenantId],
        from_us: i64,
        to_us: i64,
    ) -> Result<RunResult, AppError> {
        let cfg = self.config();
        let w = cfg.window_us();
        let grace = cfg.grace_us();
        let lookback = cfg.lookback_windows.max(1) as i64;
        let mut configs = HashMap::new();
        for t in tenants {
            configs.insert(t.to_string(), self.tenant_config(t).await?);
        }
        // Every window the detector needs: stored ones are loaded, missing ones computed (the
        // trailing history is stored as KPIs only; its own anomalies are decided when a run
        // asks for it).
        let first = from_us - (lookback - 1) * w;
        let mut kpis: HashMap<(String, i64), (KpiWindow, bool)> = HashMap::new();
        let mut start = first;
        while start < to_us {
            let end = start + w;
            let mut missing = Vec::new();
            for t in tenants {
                match self
                    .stored::<KpiWindow>(kpi_id(t.as_str(), start, end))
                    .await?
                {
                    Some(k) => {
                        kpis.insert((t.to_string(), start), (k, true));
                    }
                    None => missing.push(t.clone()),
                }
            }
            if !missing.is_empty() {
                let wanted = missing
                    .iter()
                    .map(|t| {
                        let kc = configs
                            .get(t.as_str())
                            .map(TenantAnalyticsConfig::kpi_config)
                            .unwrap_or_default();
                        (t.clone(), kc)
                    })
                    .collect();
                let computed = self.compute_window(start, end, grace, wanted).await?;
                for (t, k) in computed {
                    let existed = if start < from_us {
                        // History: stored alone.
                        self.append_results(&t, start, vec![self.kpi_event(&k, start, end)?])
                            .await?
                    } else {
                        false
                    };
                    kpis.insert((t.to_string(), start), (k, existed));
                }
            }
            start = end;
        }
        let mut windows = Vec::new();
        let mut start = from_us;
        while start < to_us {
            let end = start + w;
            for t in tenants {
                let tenant = t.as_str();
                let det = configs
                    .get(tenant)
                    .map(TenantAnalyticsConfig::detector_config)
                    .unwrap_or_default();
                let (k, kpi_stored) = kpis
                    .get(&(tenant.to_owned(), start))
                    .cloned()
                    .ok_or_else(|| AppError::internal("a window's KPIs were not computed"))?;
                let decided = self
                    .stored::<CheckedPayload>(checked_id(tenant, start, end))
                    .await?
                    .is_some();
                let result = if decided {
                    WindowResult {
                        stored: false,
                        kpis: k,
                        anomalies: self.anomalies(t, start, start + 1).await?,
                    }
                } else {
                    let series = |kpi: &str| -> Vec<f64> {
                        (0..lookback)
                            .rev()
                            .map(|i| {
                                kpis.get(&(tenant.to_owned(), start - i * w))
                                    .map_or(f64::NAN, |(k, _)| k.series_value(kpi))
                            })
                            .collect()
                    };
                    let mut found = Vec::new();
                    for kpi in JUDGED_KPIS {
                        let s = series(kpi);
                        let last = s.len() - 1;
                        if let Some(a) = anomaly::detect(&det, &s)
                            .into_iter()
                            .find(|a| a.index == last)
                        {
                            found.push(AnomalyDto {
                                tenant: tenant.to_owned(),
                                kpi: kpi.to_owned(),
                                from: k.from.clone(),
                                to: k.to.clone(),
                                value: a.value,
                                expected: a.expected,
                                score: a.score,
                                expected_low: a.expected_range.0,
                                expected_high: a.expected_range.1,
                            });
                        }
                    }
                    let mut batch = Vec::new();
                    if !kpi_stored {
                        batch.push(self.kpi_event(&k, start, end)?);
                    }
                    for a in &found {
                        batch.push(
                            NewEvent::json(
                                ANOMALY_EVENT,
                                &serde_json::to_value(a).map_err(AppError::internal)?,
                            )
                            .with_id(anomaly_id(tenant, start, end, &a.kpi)),
                        );
                    }
                    batch.push(
                        NewEvent::json(
                            CHECKED_EVENT,
                            &serde_json::to_value(CheckedPayload {
                                tenant: tenant.to_owned(),
                                from: k.from.clone(),
                                to: k.to.clone(),
                                anomalies: found.len(),
                            })
                            .map_err(AppError::internal)?,
                        )
                        .with_id(checked_id(tenant, start, end)),
                    );
                    if self.append_results(t, start, batch).await? {
                        // Another run decided this window first: answer what it stored.
                        WindowResult {
                            stored: false,
                            kpis: self.stored(kpi_id(tenant, start, end)).await?.unwrap_or(k),
                            anomalies: self.anomalies(t, start, start + 1).await?,
                        }
                    } else {
                        WindowResult {
                            stored: true,
                            kpis: k,
                            anomalies: found,
                        }
                    }
                };
                self.write_influx(start, end, &result);
                windows.push(result);
            }
            start = end;
        }
        Ok(RunResult {
            from: format_micros(from_us),
            to: format_micros(to_us),
            windows,
        })
    }

    fn kpi_event(&self, k: &KpiWindow, from: i64, to: i64) -> Result<NewEvent, AppError> {
        Ok(NewEvent::json(
            KPI_EVENT,
            &serde_json::to_value(k).map_err(AppError::internal)?,
        )
        .with_id(kpi_id(&k.tenant, from, to)))
    }

    /// Appends result events atomically; `Ok(true)` if they were all stored already (also
    /// when a concurrent run stored some of them first).
    async fn append_results(
        &self,
        tenant: &TenantId,
        start: i64,
        batch: Vec<NewEvent>,
    ) -> Result<bool, AppError> {
        match self
            .inner
            .store
            .append_to(
                &self.inner.system,
                &day_stream(tenant.as_str(), start)?,
                ExpectedVersion::Any,
                batch,
            )
            .await
        {
            Ok(out) => Ok(out.duplicate),
            Err(StoreError::Duplicate { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    #[cfg(feature = "influxdb")]
    fn write_influx(&self, from_us: i64, to_us: i64, r: &WindowResult) {
        use tracktrace_analytics::line_protocol::{FieldValue, Point, anomaly_point, kpi_points};
        let Some(w) = self.inner.influx.get() else {
            return;
        };
        let tenant = r.kpis.tenant.as_str();
        let mut points = kpi_points(tenant, &r.kpis.to_report(from_us, to_us));
        points.push(
            Point::new("tt_kpi_extra", from_us.saturating_mul(1000))
                .tag("tenant", tenant)
                .field(
                    "rejected_commands",
                    FieldValue::Int(r.kpis.rejected_commands as i64),
                )
                .field(
                    "milestone_overdue",
                    FieldValue::Int(r.kpis.milestone_overdue as i64),
                ),
        );
        for a in &r.anomalies {
            let det = anomaly::Anomaly {
                index: 0,
                value: a.value,
                expected: a.expected,
                score: a.score,
                expected_range: (a.expected_low, a.expected_high),
            };
            points.push(anomaly_point(
                tenant,
                &a.kpi,
                from_us.saturating_mul(1000),
                &det,
            ));
        }
        w.write(&points);
    }

    #[cfg(not(feature = "influxdb"))]
    fn write_influx(&self, _from_us: i64, _to_us: i64, _r: &WindowResult) {}

    /// Runs closed windows forever (spawned by the server in roles `processor` and `all`):
    /// first the last `catch_up_windows`, then each window as soon as it closes, for every
    /// active tenant. `tenants` lists them at each run.
    pub async fn run_scheduler<F, Fut>(self, tenants: F)
    where
        F: Fn() -> Fut + Send,
        Fut: std::future::Future<Output = Result<Vec<TenantId>, AppError>> + Send,
    {
        let cfg = self.config();
        let w = cfg.window_us();
        let mut done = self.last_closed_end() - cfg.catch_up_windows.max(1) as i64 * w;
        loop {
            let end = self.last_closed_end();
            if end > done {
                // Long outages are caught up a bounded chunk at a time.
                let from = done.max(end - cfg.max_windows_per_run.max(1) as i64 * w);
                match tenants().await {
                    Ok(ts) if !ts.is_empty() => match self.run(&ts, from, end).await {
                        Ok(r) => {
                            let anomalies: usize =
                                r.windows.iter().map(|w| w.anomalies.len()).sum();
                            tracing::info!(from = %r.from, to = %r.to, windows = r.windows.len(), anomalies, "analytics batch done");
                            done = end;
                        }
                        Err(e) => tracing::warn!(error = %e, "analytics batch failed; retrying"),
                    },
                    Ok(_) => done = end,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list tenants for analytics; retrying")
                    }
                }
            }
            // Sleep until the next window closes (or a minute after a failure).
            let next_close = if done >= end {
                end + w + cfg.grace_us()
            } else {
                now_us() + 60 * US_PER_S
            };
            let wait = (next_close - now_us()).clamp(10_000, 3_600 * US_PER_S);
            tokio::time::sleep(Duration::from_micros(wait as u64)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests of front ends (authorization, tenant selection, ranges).

/// A run on demand (`POST /api/v1/analytics/run` over HTTP).
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunRequest {
    /// First window start (RFC 3339, aligned to the window length); default: the last closed
    /// window.
    pub from: Option<String>,
    /// End of the last window (RFC 3339, aligned); default: the last closed window's end.
    pub to: Option<String>,
    /// Tenant (system admins only; default: every active tenant). Tenant admins run their own.
    pub tenant: Option<String>,
}

/// Longest range a listing covers.
const MAX_LIST_RANGE_US: i64 = 93 * 86_400 * US_PER_S;

fn parse_range(
    from: Option<&str>,
    to: Option<&str>,
    default_to: i64,
    default_len: i64,
) -> Result<(i64, i64), AppError> {
    let mut errs = Vec::new();
    let mut parse = |name: &str, v: Option<&str>| match v {
        None => None,
        Some(s) => match parse_instant(s) {
            Ok(t) => Some(t),
            Err(m) => {
                errs.push(FieldError::new(name, m));
                None
            }
        },
    };
    let f = parse("from", from);
    let t = parse("to", to);
    if !errs.is_empty() {
        return Err(AppError::Validation(errs));
    }
    let to_us = t.unwrap_or(default_to);
    let from_us = f.unwrap_or(to_us - default_len);
    Ok((from_us, to_us))
}

/// The `[from, to)` of a listing: default the last 24 hours, at most 93 days.
fn parse_list_range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), AppError> {
    let (from, to) = parse_range(from, to, now_us(), 86_400 * US_PER_S)?;
    if to <= from {
        return Err(AppError::field("to", "must be after from"));
    }
    if to - from > MAX_LIST_RANGE_US {
        return Err(AppError::field("to", "the range may cover at most 93 days"));
    }
    Ok((from, to))
}

impl Analytics {
    /// Runs the windows `req` asks for on behalf of `actor` (an admin): a named tenant (system
    /// admins any, tenant admins their own), else every active tenant (system admins) or the
    /// actor's own; default range: the last closed window.
    pub async fn run_for(
        &self,
        actor: &Actor,
        tenants: &TenantRegistry,
        req: &RunRequest,
    ) -> Result<RunResult, AppError> {
        actor.require(Scope::Admin)?;
        let targets = match (&req.tenant, actor.is_system_admin()) {
            (Some(t), _) => {
                let t = parse_tenant(t)?;
                actor.require_admin_of(t.as_str())?;
                if tenants.status(&t).await?.is_none() {
                    return Err(AppError::field("tenant", "unknown tenant"));
                }
                vec![t]
            }
            (None, true) => tenants.active().await?,
            (None, false) => {
                tenants.require_active(&actor.tenant).await?;
                vec![actor.tenant.clone()]
            }
        };
        let cfg = self.config();
        let (from, to) = parse_range(
            req.from.as_deref(),
            req.to.as_deref(),
            self.last_closed_end(),
            cfg.window_us(),
        )?;
        self.check_range(from, to)?;
        let _admitted = self.admit_run()?;
        self.run(&targets, from, to).await
    }

    /// The checks of a listing (`metrics:read`, an active tenant) and its `[from, to)`.
    async fn listing(
        actor: &Actor,
        tenants: &TenantRegistry,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<(i64, i64), AppError> {
        actor.require(Scope::MetricsRead)?;
        tenants.require_active(&actor.tenant).await?;
        parse_list_range(from, to)
    }

    /// The actor's tenant's KPI windows starting in `[from, to)` (default: the last 24 h).
    pub async fn kpis_for(
        &self,
        actor: &Actor,
        tenants: &TenantRegistry,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<KpiWindow>, AppError> {
        let (from, to) = Self::listing(actor, tenants, from, to).await?;
        self.kpis(&actor.tenant, from, to).await
    }

    /// The actor's tenant's anomalies of windows starting in `[from, to)`.
    pub async fn anomalies_for(
        &self,
        actor: &Actor,
        tenants: &TenantRegistry,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<AnomalyDto>, AppError> {
        let (from, to) = Self::listing(actor, tenants, from, to).await?;
        self.anomalies(&actor.tenant, from, to).await
    }

    /// The configuration of tenant `tenant` (system admins, or that tenant's admins).
    pub async fn tenant_config_for(
        &self,
        actor: &Actor,
        tenants: &TenantRegistry,
        tenant: &str,
    ) -> Result<TenantAnalyticsConfig, AppError> {
        let t = tenants
            .admin_target(actor, Admins::SystemOrOwn, tenant)
            .await?;
        self.tenant_config(&t).await
    }

    /// Replaces the configuration of tenant `tenant` with the JSON `body`.
    pub async fn set_tenant_config_for(
        &self,
        actor: &Actor,
        tenants: &TenantRegistry,
        tenant: &str,
        body: &[u8],
    ) -> Result<TenantAnalyticsConfig, AppError> {
        let t = tenants
            .admin_target(actor, Admins::SystemOrOwn, tenant)
            .await?;
        let cfg: TenantAnalyticsConfig =
            serde_json::from_slice(body).map_err(|e| AppError::field("body", e.to_string()))?;
        self.set_tenant_config(&t, &cfg).await?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ids_are_deterministic_and_distinct() {
        assert_eq!(kpi_id("acme", 0, 10), kpi_id("acme", 0, 10));
        assert_ne!(kpi_id("acme", 0, 10), kpi_id("acme", 10, 20));
        assert_ne!(kpi_id("acme", 0, 10), checked_id("acme", 0, 10));
        assert_ne!(
            anomaly_id("acme", 0, 10, "events"),
            anomaly_id("acme", 0, 10, "late_share")
        );
        assert_ne!(kpi_id("acme", 0, 10), kpi_id("other", 0, 10));
    }

    #[test]
    fn day_streams_are_per_utc_day() {
        let day = 86_400 * US_PER_S;
        assert_eq!(
            day_stream("acme", 0).unwrap().as_str(),
            "analytics-acme-19700101"
        );
        assert_eq!(
            day_stream("acme", day - 1).unwrap().as_str(),
            "analytics-acme-19700101"
        );
        assert_eq!(
            day_stream("acme", day).unwrap().as_str(),
            "analytics-acme-19700102"
        );
    }

    #[test]
    fn config_validation_names_every_bad_field() {
        let mut c = TenantAnalyticsConfig::default();
        assert!(c.validate().is_empty());
        c.late_threshold_secs = 0;
        c.milestone_pairs.push(MilestonePairDto {
            from: String::new(),
            to: "X".into(),
        });
        c.detector.threshold = f64::NAN;
        let fields: Vec<String> = c.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            vec![
                "milestonePairs[1].from",
                "lateThresholdSecs",
                "detector.threshold"
            ]
        );
    }
}
