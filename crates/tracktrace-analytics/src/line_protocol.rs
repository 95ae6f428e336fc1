//! InfluxDB line protocol encoding (`measurement,tag=v field=1i 1700000000000000000`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::anomaly::Anomaly;
use crate::kpi::KpiReport;

/// A field value.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// A float (`1.5`).
    Float(f64),
    /// A signed integer (`7i`).
    Int(i64),
    /// A string (`"text"`).
    Str(String),
    /// A boolean.
    Bool(bool),
}

/// One point.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Measurement name.
    pub measurement: String,
    /// Tags (indexed), sorted by key as InfluxDB recommends.
    pub tags: BTreeMap<String, String>,
    /// Fields (at least one).
    pub fields: BTreeMap<String, FieldValue>,
    /// Timestamp, nanoseconds since the epoch.
    pub time_ns: i64,
}

impl Point {
    /// A point without tags or fields.
    pub fn new(measurement: impl Into<String>, time_ns: i64) -> Self {
        Self {
            measurement: measurement.into(),
            tags: BTreeMap::new(),
            fields: BTreeMap::new(),
            time_ns,
        }
    }

    /// Adds a tag (builder style). Empty tag values are not representable and are skipped.
    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        let v = v.into();
        if !v.is_empty() {
            self.tags.insert(k.into(), v);
        }
        self
    }

    /// Adds a field (builder style). Non-finite floats are not representable and are skipped.
    pub fn field(mut self, k: impl Into<String>, v: FieldValue) -> Self {
        if !matches!(v, FieldValue::Float(f) if !f.is_finite()) {
            self.fields.insert(k.into(), v);
        }
        self
    }

    /// The point as one line (no trailing newline); `None` if it has no field.
    pub fn to_line(&self) -> Option<String> {
        if self.fields.is_empty() {
            return None;
        }
        let mut s = String::with_capacity(64);
        escape(&mut s, &self.measurement, &[',', ' ']);
        for (k, v) in &self.tags {
            s.push(',');
            escape(&mut s, k, &[',', '=', ' ']);
            s.push('=');
            escape(&mut s, v, &[',', '=', ' ']);
        }
        for (i, (k, v)) in self.fields.iter().enumerate() {
            s.push(if i == 0 { ' ' } else { ',' });
            escape(&mut s, k, &[',', '=', ' ']);
            s.push('=');
            match v {
                FieldValue::Float(f) => {
                    let _ = write!(s, "{f:?}");
                }
                FieldValue::Int(n) => {
                    let _ = write!(s, "{n}i");
                }
                FieldValue::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
                FieldValue::Str(t) => {
                    s.push('"');
                    for c in t.chars() {
                        if c == '"' || c == '\\' {
                            s.push('\\');
                        }
                        s.push(c);
                    }
                    s.push('"');
                }
            }
        }
        let _ = write!(s, " {}", self.time_ns);
        Some(s)
    }
}

fn escape(out: &mut String, s: &str, special: &[char]) {
    for c in s.chars() {
        // Newlines cannot be escaped in line protocol: they would end the line.
        let c = if c == '\n' || c == '\r' { ' ' } else { c };
        if special.contains(&c) || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The points of a KPI report for `tenant`, stamped at the window start.
pub fn kpi_points(tenant: &str, r: &KpiReport) -> Vec<Point> {
    let t = r.window_start_us.saturating_mul(1000);
    let mut points = vec![
        Point::new("tt_kpi", t)
            .tag("tenant", tenant)
            .field("events", FieldValue::Int(r.events as i64))
            .field("ingestion_rate", FieldValue::Float(r.ingestion_rate_per_s))
            .field("active_entities", FieldValue::Int(r.active_entities as i64))
            .field("late_share", FieldValue::Float(r.late_share))
            .field("rejected_rate", FieldValue::Float(r.rejected_rate)),
    ];
    for (ty, n) in &r.events_by_type {
        points.push(
            Point::new("tt_events_by_type", t)
                .tag("tenant", tenant)
                .tag("event_type", ty.as_str())
                .field("count", FieldValue::Int(*n as i64)),
        );
    }
    for (loc, n) in &r.events_by_location {
        points.push(
            Point::new("tt_events_by_location", t)
                .tag("tenant", tenant)
                .tag("location", loc.as_str())
                .field("count", FieldValue::Int(*n as i64)),
        );
    }
    for (pair, s) in &r.transit {
        points.push(
            Point::new("tt_transit", t)
                .tag("tenant", tenant)
                .tag("from", pair.from.as_str())
                .tag("to", pair.to.as_str())
                .field("count", FieldValue::Int(s.count as i64))
                .field("p50_s", FieldValue::Float(s.p50_us as f64 / 1e6))
                .field("p95_s", FieldValue::Float(s.p95_us as f64 / 1e6)),
        );
    }
    for (loc, s) in &r.dwell {
        points.push(
            Point::new("tt_dwell", t)
                .tag("tenant", tenant)
                .tag("location", loc.as_str())
                .field("count", FieldValue::Int(s.count as i64))
                .field("p50_s", FieldValue::Float(s.p50_us as f64 / 1e6))
                .field("p95_s", FieldValue::Float(s.p95_us as f64 / 1e6)),
        );
    }
    points
}

/// The point of an anomaly of KPI series `kpi` for `tenant` at `time_ns`.
pub fn anomaly_point(tenant: &str, kpi: &str, time_ns: i64, a: &Anomaly) -> Point {
    Point::new("tt_anomaly", time_ns)
        .tag("tenant", tenant)
        .tag("kpi", kpi)
        .field("value", FieldValue::Float(a.value))
        .field("expected", FieldValue::Float(a.expected))
        .field("score", FieldValue::Float(a.score))
        .field("low", FieldValue::Float(a.expected_range.0))
        .field("high", FieldValue::Float(a.expected_range.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_escapes() {
        let p = Point::new("my measure,x", 1_700_000_000_000_000_000)
            .tag("tenant", "acme air")
            .tag("loc", "a=b,c")
            .tag("empty", "")
            .field("n", FieldValue::Int(-3))
            .field("f", FieldValue::Float(2.0))
            .field("s", FieldValue::Str("say \"hi\" \\ there".into()))
            .field("b", FieldValue::Bool(true))
            .field("nan", FieldValue::Float(f64::NAN));
        assert_eq!(
            p.to_line().unwrap(),
            r#"my\ measure\,x,loc=a\=b\,c,tenant=acme\ air b=true,f=2.0,n=-3i,s="say \"hi\" \\ there" 1700000000000000000"#
        );
        assert_eq!(Point::new("m", 0).to_line(), None);
        let nl = Point::new("m", 0)
            .tag("t", "a\nb")
            .field("x", FieldValue::Int(1));
        assert_eq!(nl.to_line().unwrap(), r"m,t=a\ b x=1i 0");
    }
}
