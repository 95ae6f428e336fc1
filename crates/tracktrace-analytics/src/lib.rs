//! Track & Trace analytics (architecture scenario 6.1.3 and flow 6.2.3): per-tenant KPIs over a
//! time window ([`kpi`]), robust anomaly detection on KPI series ([`anomaly`]), and their
//! encoding as InfluxDB line protocol ([`line_protocol`]) with a batched, retrying writer
//! (`influx`, feature `influxdb`).
//!
//! Everything but the writer is pure computation: the server feeds a window's stored events,
//! as it reads them, to a [`kpi::WindowAccumulator`] per tenant (memory bounded by
//! [`kpi::Bounds`], not by the window's events; [`kpi`] says which KPIs are exact and which
//! approximate, and by how much), gets a [`kpi::KpiReport`] per tenant and window, and feeds
//! KPI series to [`anomaly::detect`]. [`hll`] is the HyperLogLog distinct counter behind the
//! active-entity count of windows with more entities than the bound.
//!
//! ```
//! use tracktrace_analytics::anomaly::{DetectorConfig, detect};
//! use tracktrace_analytics::kpi::{KpiConfig, Observation, compute};
//!
//! let at = |min: i64| min * 60_000_000;
//! let obs = |id: &str, ty: &str, min: i64| Observation {
//!     id: id.into(),
//!     entity_id: "bag-1".into(),
//!     event_type: ty.into(),
//!     location: "MAD".into(),
//!     occurred_at_us: at(min),
//!     received_at_us: at(min),
//! };
//! let report = compute(
//!     &KpiConfig::default(),
//!     0,
//!     at(60),
//!     &[obs("1", "CHECKED_IN", 5), obs("2", "LOADED", 35)],
//!     0,
//! );
//! let transit = report.transit.values().next().expect("one milestone pair");
//! assert_eq!(transit.p50_us, at(30));
//!
//! // A flat series with one spike: only the spike is flagged.
//! let mut series = vec![100.0; 30];
//! series[25] = 400.0;
//! let cfg = DetectorConfig { season: None, min_history: 5, min_residuals: 5, ..DetectorConfig::default() };
//! assert_eq!(detect(&cfg, &series).iter().map(|a| a.index).collect::<Vec<_>>(), vec![25]);
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod anomaly;
pub mod hll;
#[cfg(feature = "influxdb")]
#[cfg_attr(docsrs, doc(cfg(feature = "influxdb")))]
pub mod influx;
pub mod kpi;
pub mod line_protocol;
