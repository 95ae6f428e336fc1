//! Robust anomaly detection on KPI series (median / MAD, optionally seasonal).
//!
//! For each point the detector builds an expected value from history: the median of the same
//! phase in earlier seasons (e.g. the same hour on previous days) or, without a season, the
//! median of the trailing window. The residual (value − expected) is scaled by the median
//! absolute deviation (MAD) of recent residuals; a robust z-score `0.6745 · r / MAD` above the
//! threshold flags an anomaly. Medians ignore isolated outliers, so one spike neither hides the
//! next anomaly nor shifts the baseline.

/// Detector settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectorConfig {
    /// Season length in points (24 for hourly data with a daily cycle); `None`: no seasonality.
    pub season: Option<usize>,
    /// Seasons (or, without a season, points) of history needed before a point is judged.
    pub min_history: usize,
    /// Trailing residuals whose MAD scales the score.
    pub residual_window: usize,
    /// Residuals needed before points are judged (a scale from a handful of residuals is noise).
    pub min_residuals: usize,
    /// Robust z-score above which a point is anomalous (3.5 is the usual choice).
    pub threshold: f64,
    /// Floor of the residual scale, relative to the expected value's magnitude, so a perfectly
    /// flat history does not turn every tiny change into an anomaly.
    pub min_relative_scale: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            season: Some(24),
            min_history: 3,
            residual_window: 48,
            min_residuals: 12,
            threshold: 3.5,
            min_relative_scale: 0.02,
        }
    }
}

/// One flagged point.
#[derive(Clone, Debug, PartialEq)]
pub struct Anomaly {
    /// Index of the point in the series.
    pub index: usize,
    /// Observed value.
    pub value: f64,
    /// Expected value (baseline).
    pub expected: f64,
    /// Robust z-score (signed: positive is a spike, negative a drop).
    pub score: f64,
    /// Range of values that would not have been flagged.
    pub expected_range: (f64, f64),
}

const MAD_TO_SIGMA: f64 = 0.6745;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Scores every point of `series` and returns the anomalous ones, in order.
pub fn detect(cfg: &DetectorConfig, series: &[f64]) -> Vec<Anomaly> {
    let mut residuals: Vec<f64> = Vec::with_capacity(series.len());
    let mut out = Vec::new();
    for (i, &value) in series.iter().enumerate() {
        let mut history: Vec<f64> = match cfg.season {
            Some(season) if season > 0 => (1..)
                .map_while(|k| i.checked_sub(k * season))
                .map(|j| series[j])
                .collect(),
            _ => series[i.saturating_sub(cfg.residual_window)..i].to_vec(),
        };
        if history.len() < cfg.min_history.max(1) || history.iter().any(|x| !x.is_finite()) {
            continue;
        }
        let expected = median(&mut history);
        let residual = value - expected;
        if residuals.len() < cfg.min_residuals.max(1) {
            residuals.push(residual);
            continue;
        }
        let start = residuals.len().saturating_sub(cfg.residual_window);
        let mut abs: Vec<f64> = residuals[start..].iter().map(|r| r.abs()).collect();
        let scale = median(&mut abs)
            .max(cfg.min_relative_scale * expected.abs())
            .max(f64::EPSILON);
        residuals.push(residual);
        let score = MAD_TO_SIGMA * residual / scale;
        if score.abs() > cfg.threshold || !value.is_finite() {
            let half = cfg.threshold * scale / MAD_TO_SIGMA;
            out.push(Anomaly {
                index: i,
                value,
                expected,
                score,
                expected_range: (expected - half, expected + half),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A week of hourly traffic with a daily cycle and deterministic noise (±6 %).
    fn clean_week() -> Vec<f64> {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        (0..24 * 7)
            .map(|h| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let noise = (seed % 1000) as f64 / 1000.0 * 12.0 - 6.0;
                let hour = (h % 24) as f64;
                let daily =
                    100.0 + 80.0 * (std::f64::consts::PI * (hour - 6.0) / 12.0).sin().max(-0.9);
                daily + noise
            })
            .collect()
    }

    #[test]
    fn flags_exactly_the_injected_spike_and_drop() {
        let mut week = clean_week();
        let spike = 24 * 4 + 14; // Friday 14:00
        let drop = 24 * 5 + 10; // Saturday 10:00
        week[spike] *= 3.0;
        week[drop] = 5.0;
        let found = detect(&DetectorConfig::default(), &week);
        let idx: Vec<usize> = found.iter().map(|a| a.index).collect();
        assert_eq!(idx, vec![spike, drop], "anomalies: {found:?}");
        assert!(found[0].score > 0.0 && found[1].score < 0.0);
        let (lo, hi) = found[0].expected_range;
        assert!(lo < found[0].expected && found[0].expected < hi && found[0].value > hi);
    }

    #[test]
    fn a_clean_week_has_no_anomalies() {
        let found = detect(&DetectorConfig::default(), &clean_week());
        assert!(found.is_empty(), "false positives: {found:?}");
    }

    #[test]
    fn needs_minimum_history() {
        let cfg = DetectorConfig::default();
        // Two days only: no point has three earlier seasons.
        let mut two_days = clean_week()[..48].to_vec();
        two_days[40] = 10_000.0;
        assert!(detect(&cfg, &two_days).is_empty());
    }

    #[test]
    fn non_seasonal_series() {
        let cfg = DetectorConfig {
            season: None,
            min_history: 5,
            residual_window: 20,
            min_residuals: 5,
            ..DetectorConfig::default()
        };
        let mut s: Vec<f64> = (0..60).map(|i| 50.0 + (i % 3) as f64).collect();
        s[45] = 200.0;
        let found = detect(&cfg, &s);
        assert_eq!(found.iter().map(|a| a.index).collect::<Vec<_>>(), vec![45]);
    }
}
