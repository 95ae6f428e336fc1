//! Milestone rules: what they are, how they are validated, how they are stored (events of
//! the system tenant) and the [`RuleBook`] the watch evaluates them with.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamId,
    TenantId, Version,
};

use tracktrace_domain::{FieldError, entity_type_problem, event_type_problem};

use crate::access::{SYSTEM_TENANT, system_tenant};
use crate::error::AppError;
use crate::follow::SystemView;

/// Event type raised when an expected milestone is overdue.
pub const OVERDUE: &str = "MILESTONE_OVERDUE";
/// Event type raised when an overdue milestone arrives after all.
pub const RECOVERED: &str = "MILESTONE_RECOVERED";

/// Stored event type: a rule was created or replaced.
pub const RULE_SET: &str = "tt.MilestoneRuleSet";
/// Stored event type: a rule was removed.
pub const RULE_REMOVED: &str = "tt.MilestoneRuleRemoved";
/// Prefix of the rule streams (`milestone-rules-<tenant>`, in the system tenant).
pub const RULE_STREAM_PREFIX: &str = "milestone-rules-";

/// Most rules per tenant.
pub const MAX_RULES_PER_TENANT: usize = 64;
/// Most expected event types per rule.
pub const MAX_EXPECTED: usize = 16;
/// Longest accepted `within`: 30 days.
pub const MAX_WITHIN_MS: u64 = 30 * 86_400_000;
/// Longest rule id, in bytes.
pub const MAX_RULE_ID_LEN: usize = 64;

/// One rule: after `trigger_event_type` on an entity of `entity_type`, one of
/// `expected_event_types` must follow within `within_ms` (counted from the trigger's
/// `occurredAt`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MilestoneRule {
    /// Rule id, unique per tenant.
    pub id: String,
    /// Entity type the rule watches.
    pub entity_type: String,
    /// Event type that opens a watch.
    pub trigger_event_type: String,
    /// Event types that satisfy it.
    pub expected_event_types: Vec<String>,
    /// The allowed delay, milliseconds.
    pub within_ms: u64,
}

/// A rule as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RuleView {
    /// Rule id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Entity type the rule watches.
    pub entity_type: String,
    /// Event type that opens a watch.
    pub trigger_event_type: String,
    /// Event types that satisfy it (any one).
    pub expected_event_types: Vec<String>,
    /// The allowed delay after the trigger's `occurredAt`, ISO-8601 (`PT2H`).
    pub within: String,
    /// The same, in seconds.
    pub within_seconds: f64,
}

impl RuleView {
    /// The view of `rule` of `tenant`.
    pub fn of(tenant: &TenantId, rule: &MilestoneRule) -> Self {
        Self {
            id: rule.id.clone(),
            tenant: tenant.to_string(),
            entity_type: rule.entity_type.clone(),
            trigger_event_type: rule.trigger_event_type.clone(),
            expected_event_types: rule.expected_event_types.clone(),
            within: format_within(rule.within_ms),
            within_seconds: rule.within_ms as f64 / 1000.0,
        }
    }
}

/// Body of a rule creation or replacement (documentation of the wire form; the handler
/// validates the JSON itself to report every field error at once).
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RuleRequest {
    /// Entity type the rule watches, e.g. `Bag` (the capture rules for `entityType`).
    pub entity_type: String,
    /// Event type that opens a watch, e.g. `LOADED`.
    pub trigger_event_type: String,
    /// Event types that satisfy it, e.g. `["ARRIVED"]` (1–16; a single string is accepted
    /// too). Neither may be the trigger or `MILESTONE_OVERDUE` / `MILESTONE_RECOVERED`.
    pub expected_event_types: Vec<String>,
    /// The allowed delay after the trigger's `occurredAt`: an ISO-8601 duration with days,
    /// hours, minutes and (fractional) seconds (`PT2S`, `PT1H30M`, `P1D`, `P1W`) or a number of
    /// seconds; more than 0, at most 30 days.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "PT2H"))]
    pub within: Value,
}

/// Parses `within`: an ISO-8601 duration (`P[nW]` or `P[nD][T[nH][nM][n[.f]S]]`) or a
/// JSON number of seconds, into milliseconds (more than 0, at most 30 days).
pub fn parse_within(v: &Value) -> Result<u64, String> {
    let ms = match v {
        Value::Number(n) => {
            let secs = n
                .as_f64()
                .filter(|s| s.is_finite())
                .ok_or("must be a finite number of seconds")?;
            if secs <= 0.0 {
                return Err("must be more than 0 seconds".into());
            }
            let ms = (secs * 1000.0).round();
            if ms > MAX_WITHIN_MS as f64 {
                return Err("must be at most 30 days (P30D)".into());
            }
            ms as u64
        }
        Value::String(s) => parse_iso_duration(s)?,
        _ => {
            return Err(
                "must be an ISO-8601 duration such as \"PT2H\" or a number of seconds".into(),
            );
        }
    };
    if ms == 0 {
        return Err("must be at least 1 millisecond".into());
    }
    if ms > MAX_WITHIN_MS {
        return Err("must be at most 30 days (P30D)".into());
    }
    Ok(ms)
}

fn parse_iso_duration(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?} is not an ISO-8601 duration such as \"PT2H\", \"PT1H30M\", \"PT2.5S\", \"P1D\""
        )
    };
    let rest = s.strip_prefix('P').ok_or_else(bad)?;
    if rest.is_empty() || rest == "T" || rest.ends_with('T') {
        return Err(bad());
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    // Each part: a sequence of <number><designator> with designators in order.
    let mut total: f64 = 0.0;
    let mut parse_part = |part: &str, units: &[(char, f64)], time_part: bool| {
        let mut rank = 0;
        let mut num = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || (c == '.' && time_part) {
                num.push(c);
                continue;
            }
            if !time_part && (c == 'Y' || c == 'M') {
                return Err(
                    "years and months have no fixed length; use weeks (W), days (D), hours, minutes or seconds"
                        .to_string(),
                );
            }
            let Some(pos) = units.iter().position(|(u, _)| *u == c) else {
                return Err(bad());
            };
            if pos < rank || num.is_empty() {
                return Err(bad());
            }
            // Only seconds may be fractional.
            if num.contains('.') && c != 'S' {
                return Err(bad());
            }
            let n: f64 = num.parse().map_err(|_| bad())?;
            total += n * units[pos].1;
            num.clear();
            rank = pos + 1;
        }
        if num.is_empty() { Ok(()) } else { Err(bad()) }
    };
    parse_part(date, &[('W', 604_800_000.0), ('D', 86_400_000.0)], false)?;
    if date.contains('W') && (date.len() != date.find('W').map_or(0, |i| i + 1) || time.is_some()) {
        return Err(bad());
    }
    if let Some(t) = time {
        parse_part(
            t,
            &[('H', 3_600_000.0), ('M', 60_000.0), ('S', 1000.0)],
            true,
        )?;
    }
    if total > MAX_WITHIN_MS as f64 {
        return Err("must be at most 30 days (P30D)".into());
    }
    Ok(total.round() as u64)
}

/// Formats milliseconds as an ISO-8601 duration (`P1DT2H3M4.5S`, `PT2S`).
pub fn format_within(ms: u64) -> String {
    let days = ms / 86_400_000;
    let rest = ms % 86_400_000;
    let (h, m, s, frac) = (
        rest / 3_600_000,
        rest % 3_600_000 / 60_000,
        rest % 60_000 / 1000,
        rest % 1000,
    );
    let mut out = String::from("P");
    if days > 0 {
        out.push_str(&format!("{days}D"));
    }
    if rest > 0 {
        out.push('T');
        if h > 0 {
            out.push_str(&format!("{h}H"));
        }
        if m > 0 {
            out.push_str(&format!("{m}M"));
        }
        if s > 0 || frac > 0 {
            if frac > 0 {
                let f = format!("{frac:03}");
                out.push_str(&format!("{s}.{}S", f.trim_end_matches('0')));
            } else {
                out.push_str(&format!("{s}S"));
            }
        }
    }
    if out == "P" {
        out.push_str("T0S");
    }
    out
}

/// Checks a rule id (path segment): 1–64 of `A–Z a–z 0–9 _ . -`.
pub fn check_rule_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty()
        || id.len() > MAX_RULE_ID_LEN
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(FieldError::new(
            "ruleId",
            format!("must be 1–{MAX_RULE_ID_LEN} characters of A–Z a–z 0–9 _ . -"),
        ));
    }
    Ok(())
}

/// Validates a rule body, listing every field error.
pub fn validate_rule(id: &str, body: &Value) -> Result<MilestoneRule, Vec<FieldError>> {
    let mut errors = Vec::new();
    if let Err(e) = check_rule_id(id) {
        errors.push(e);
    }
    let Some(obj) = body.as_object() else {
        errors.push(FieldError::new("", "must be a JSON object"));
        return Err(errors);
    };
    const KNOWN: [&str; 4] = [
        "entityType",
        "triggerEventType",
        "expectedEventTypes",
        "within",
    ];
    for k in obj.keys() {
        if !KNOWN.contains(&k.as_str()) {
            errors.push(FieldError::new(k.clone(), "unknown field"));
        }
    }
    let entity_type =
        req_str(obj, "entityType", &mut errors).and_then(|s| match entity_type_problem(s) {
            Some(m) => {
                errors.push(FieldError::new("entityType", m));
                None
            }
            None => Some(s.to_owned()),
        });
    let trigger = req_str(obj, "triggerEventType", &mut errors)
        .and_then(|s| event_type(s, "triggerEventType", &mut errors));
    let expected: Option<Vec<String>> = match obj.get("expectedEventTypes") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("expectedEventTypes", "is required"));
            None
        }
        Some(Value::String(s)) => event_type(s, "expectedEventTypes", &mut errors).map(|s| vec![s]),
        Some(Value::Array(items)) => {
            if items.is_empty() || items.len() > MAX_EXPECTED {
                errors.push(FieldError::new(
                    "expectedEventTypes",
                    format!("must hold 1–{MAX_EXPECTED} event types"),
                ));
                None
            } else {
                let mut out = Vec::new();
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    let field = format!("expectedEventTypes[{i}]");
                    match item.as_str() {
                        None => {
                            errors.push(FieldError::new(field, "must be a string"));
                            ok = false;
                        }
                        Some(s) => match event_type(s, &field, &mut errors) {
                            Some(s) if out.contains(&s) => {
                                errors.push(FieldError::new(field, "is listed twice"));
                                ok = false;
                            }
                            Some(s) => out.push(s),
                            None => ok = false,
                        },
                    }
                }
                ok.then_some(out)
            }
        }
        Some(_) => {
            errors.push(FieldError::new(
                "expectedEventTypes",
                "must be an array of event types",
            ));
            None
        }
    };
    if let (Some(t), Some(exp)) = (&trigger, &expected)
        && exp.contains(t)
    {
        errors.push(FieldError::new(
            "expectedEventTypes",
            "must not contain the trigger event type",
        ));
    }
    let within = match obj.get("within") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("within", "is required"));
            None
        }
        Some(v) => match parse_within(v) {
            Ok(ms) => Some(ms),
            Err(m) => {
                errors.push(FieldError::new("within", m));
                None
            }
        },
    };
    match (entity_type, trigger, expected, within) {
        (
            Some(entity_type),
            Some(trigger_event_type),
            Some(expected_event_types),
            Some(within_ms),
        ) if errors.is_empty() => Ok(MilestoneRule {
            id: id.to_owned(),
            entity_type,
            trigger_event_type,
            expected_event_types,
            within_ms,
        }),
        _ => Err(errors),
    }
}

fn req_str<'v>(
    obj: &'v Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'v str> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    }
}

fn event_type(s: &str, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    if let Some(m) = event_type_problem(s) {
        errors.push(FieldError::new(field, m));
        return None;
    }
    if s == OVERDUE || s == RECOVERED {
        errors.push(FieldError::new(
            field,
            format!("{s} is raised by the milestone watch itself and cannot be watched"),
        ));
        return None;
    }
    Some(s.to_owned())
}

// ---------- storage ----------

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleSetPayload {
    tenant: String,
    rule: MilestoneRule,
    #[serde(default)]
    by: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleRemovedPayload {
    tenant: String,
    rule_id: String,
    #[serde(default)]
    by: String,
}

/// A decoded rule event.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleChange {
    /// (tenant, rule): created or replaced.
    Set(String, MilestoneRule),
    /// (tenant, rule id): removed.
    Removed(String, String),
}

/// Decodes a rule event of the system tenant (`None`: not a rule event, or undecodable,
/// which is logged).
pub fn decode_change(e: &RecordedEvent) -> Option<RuleChange> {
    if e.tenant.as_str() != SYSTEM_TENANT || !e.stream.as_str().starts_with(RULE_STREAM_PREFIX) {
        return None;
    }
    let r = match e.event_type.as_str() {
        RULE_SET => serde_json::from_slice::<RuleSetPayload>(&e.payload)
            .map(|p| RuleChange::Set(p.tenant, p.rule)),
        RULE_REMOVED => serde_json::from_slice::<RuleRemovedPayload>(&e.payload)
            .map(|p| RuleChange::Removed(p.tenant, p.rule_id)),
        _ => return None,
    };
    match r {
        Ok(c) => Some(c),
        Err(err) => {
            tracing::error!(position = %e.position, error = %err, "undecodable milestone rule event skipped");
            None
        }
    }
}

fn rule_stream(tenant: &TenantId) -> Result<StreamId, AppError> {
    StreamId::parse(format!("{RULE_STREAM_PREFIX}{tenant}")).map_err(AppError::internal)
}

/// The rules of `tenant` (sorted by id) and the version of its rule stream.
pub async fn list(
    store: &dyn EventStore,
    tenant: &TenantId,
) -> Result<(Vec<MilestoneRule>, Version), AppError> {
    let events = store
        .read_stream_forwards(&system_tenant(), &rule_stream(tenant)?)
        .await?;
    let version = events.last().map_or(Version::ZERO, |e| e.version);
    let mut rules = BTreeMap::new();
    for e in &events {
        match decode_change(e) {
            Some(RuleChange::Set(_, r)) => {
                rules.insert(r.id.clone(), r);
            }
            Some(RuleChange::Removed(_, id)) => {
                rules.remove(&id);
            }
            None => {}
        }
    }
    Ok((rules.into_values().collect(), version))
}

/// How [`set`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// A new rule.
    Created,
    /// An existing rule with other terms was replaced.
    Replaced,
    /// The rule existed with the same terms: nothing was written.
    Unchanged,
}

/// Creates or replaces `rule` of `tenant` (optimistic concurrency on the tenant's rule
/// stream, retried a few times).
pub async fn set(
    store: &dyn EventStore,
    tenant: &TenantId,
    rule: &MilestoneRule,
    by: &str,
) -> Result<SetOutcome, AppError> {
    for _ in 0..5 {
        let (rules, version) = list(store, tenant).await?;
        let existing = rules.iter().find(|r| r.id == rule.id);
        let outcome = match existing {
            Some(r) if r == rule => return Ok(SetOutcome::Unchanged),
            Some(_) => SetOutcome::Replaced,
            None if rules.len() >= MAX_RULES_PER_TENANT => {
                return Err(AppError::Conflict(format!(
                    "tenant {tenant} already has {MAX_RULES_PER_TENANT} milestone rules, the most allowed"
                )));
            }
            None => SetOutcome::Created,
        };
        let ev = NewEvent::json(
            RULE_SET,
            &serde_json::json!(RuleSetPayload {
                tenant: tenant.to_string(),
                rule: rule.clone(),
                by: by.to_owned(),
            }),
        );
        if append(store, tenant, version, ev).await? {
            return Ok(outcome);
        }
    }
    Err(concurrent(tenant))
}

/// Removes rule `id` of `tenant`; `false` if it does not exist.
pub async fn remove(
    store: &dyn EventStore,
    tenant: &TenantId,
    id: &str,
    by: &str,
) -> Result<bool, AppError> {
    for _ in 0..5 {
        let (rules, version) = list(store, tenant).await?;
        if !rules.iter().any(|r| r.id == id) {
            return Ok(false);
        }
        let ev = NewEvent::json(
            RULE_REMOVED,
            &serde_json::json!(RuleRemovedPayload {
                tenant: tenant.to_string(),
                rule_id: id.to_owned(),
                by: by.to_owned(),
            }),
        );
        if append(store, tenant, version, ev).await? {
            return Ok(true);
        }
    }
    Err(concurrent(tenant))
}

/// Appends at `Exact(version)`: `false` on a conflict (someone else changed the rules).
async fn append(
    store: &dyn EventStore,
    tenant: &TenantId,
    version: Version,
    ev: NewEvent,
) -> Result<bool, AppError> {
    match store
        .append_to(
            &system_tenant(),
            &rule_stream(tenant)?,
            ExpectedVersion::Exact(version),
            vec![ev],
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_conflict() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn concurrent(tenant: &TenantId) -> AppError {
    AppError::Conflict(format!(
        "the milestone rules of {tenant} are being changed concurrently; retry"
    ))
}

// ---------- the rule book ----------

/// One rule's history: (position of the event, the rule from then on; `None` = removed).
type History = Vec<(Position, Option<Arc<MilestoneRule>>)>;

#[derive(Default)]
struct TenantRules {
    history: BTreeMap<String, History>,
    /// (entity type, event type) pairs some version of some rule expected, with the position
    /// of the first such rule event.
    expected_since: HashMap<(String, String), Position>,
}

/// Every tenant's rules *with their history in the global log*, so the watch decides each
/// event with the rules that were in force at its position (the same decision in every
/// process, whatever it has read since).
#[derive(Default)]
pub struct RuleBook {
    tenants: HashMap<String, TenantRules>,
    /// Every rule event below this position has been applied.
    horizon: Position,
}

impl std::fmt::Debug for RuleBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleBook")
            .field("tenants", &self.tenants.len())
            .field("horizon", &self.horizon)
            .finish()
    }
}

impl RuleBook {
    /// Loads every rule event of the log up to its current head.
    pub async fn load(store: &dyn EventStore) -> Result<Self, AppError> {
        let (mut book, next) = crate::follow::load::<RuleBook>(store).await?;
        // Gap-free log: nothing can still commit below `next`.
        book.horizon = book.horizon.max(next);
        Ok(book)
    }

    /// Applies a rule event (ignored if it is no rule event, or below the horizon: already
    /// applied).
    pub fn apply_event(&mut self, e: &RecordedEvent) {
        if let Some(change) = <RuleBook as SystemView>::decode(e) {
            <RuleBook as SystemView>::apply(self, change);
        }
    }

    /// The rules of `tenant` for `entity_type` in force just before position `at`.
    pub fn rules_at(
        &self,
        tenant: &str,
        entity_type: &str,
        at: Position,
    ) -> Vec<Arc<MilestoneRule>> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        t.history
            .values()
            .filter_map(|h| {
                h.iter()
                    .rev()
                    .find(|(p, _)| *p < at)
                    .and_then(|(_, r)| r.clone())
            })
            .filter(|r| r.entity_type == entity_type)
            .collect()
    }

    /// Whether `tenant` has (or had) any rule.
    pub fn has_rules(&self, tenant: &str) -> bool {
        self.tenants.contains_key(tenant)
    }

    /// Whether an event of `event_type` on an entity of `entity_type` at position `at` concerns
    /// the watch: a trigger of a rule in force, or a type some rule recorded before expected.
    pub fn concerns(
        &self,
        tenant: &str,
        entity_type: &str,
        event_type: &str,
        at: Position,
    ) -> bool {
        self.expected_before(tenant, entity_type, event_type, at)
            || self
                .rules_at(tenant, entity_type, at)
                .iter()
                .any(|r| r.trigger_event_type == event_type)
    }

    /// Whether some rule of `tenant` recorded before position `at` expected `event_type` on
    /// entities of `entity_type` (in any version, so watches opened under older terms can
    /// still be satisfied after the rule changed).
    pub fn expected_before(
        &self,
        tenant: &str,
        entity_type: &str,
        event_type: &str,
        at: Position,
    ) -> bool {
        self.tenants.get(tenant).is_some_and(|t| {
            t.expected_since
                .get(&(entity_type.to_owned(), event_type.to_owned()))
                .is_some_and(|p| *p < at)
        })
    }

    /// Whether rule `id` of `tenant` exists in its latest known version.
    pub fn is_current(&self, tenant: &str, id: &str) -> bool {
        self.tenants
            .get(tenant)
            .and_then(|t| t.history.get(id))
            .and_then(|h| h.last())
            .is_some_and(|(_, r)| r.is_some())
    }
}

/// The rule book follows the rule streams of the system tenant; each change keeps its
/// position (the rules in force at a milestone's position decide it).
impl SystemView for RuleBook {
    type Change = (Position, RuleChange);
    const STREAM_PREFIX: &'static str = RULE_STREAM_PREFIX;

    fn decode(e: &RecordedEvent) -> Option<Self::Change> {
        decode_change(e).map(|c| (e.position, c))
    }

    fn apply(&mut self, (position, change): Self::Change) {
        if position < self.horizon {
            return;
        }
        self.horizon = position.next();
        let (tenant, id, rule) = match change {
            RuleChange::Set(t, r) => (t, r.id.clone(), Some(Arc::new(r))),
            RuleChange::Removed(t, id) => (t, id, None),
        };
        let t = self.tenants.entry(tenant).or_default();
        if let Some(r) = &rule {
            for x in &r.expected_event_types {
                t.expected_since
                    .entry((r.entity_type.clone(), x.clone()))
                    .or_insert(position);
            }
        }
        t.history.entry(id).or_default().push((position, rule));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn iso_durations() {
        let ok = |s: &str| parse_within(&json!(s)).unwrap();
        assert_eq!(ok("PT2S"), 2000);
        assert_eq!(ok("PT0.5S"), 500);
        assert_eq!(ok("PT1H30M"), 5_400_000);
        assert_eq!(ok("P1D"), 86_400_000);
        assert_eq!(ok("P1DT2H"), 93_600_000);
        assert_eq!(ok("P2W"), 14 * 86_400_000);
        assert_eq!(ok("PT45M"), 2_700_000);
        assert_eq!(parse_within(&json!(2)).unwrap(), 2000);
        assert_eq!(parse_within(&json!(1.25)).unwrap(), 1250);
        for bad in [
            "", "P", "PT", "2S", "PT2", "P1M", "P1Y", "PT2S3M", "PT1.5H", "P1DT", "pt2s", "P1W2D",
            "PT-1S", "P31D", "PT0S", "PTS",
        ] {
            assert!(parse_within(&json!(bad)).is_err(), "{bad:?} accepted");
        }
        for bad in [
            json!(0),
            json!(-1),
            json!(true),
            json!([]),
            json!(31 * 86_400),
        ] {
            assert!(parse_within(&bad).is_err(), "{bad} accepted");
        }
        assert!(
            parse_within(&json!("P1M"))
                .unwrap_err()
                .contains("no fixed length")
        );
    }

    #[test]
    fn formats_round_trip() {
        for (ms, s) in [
            (2000, "PT2S"),
            (500, "PT0.5S"),
            (5_400_000, "PT1H30M"),
            (86_400_000, "P1D"),
            (90_061_500, "P1DT1H1M1.5S"),
            (1, "PT0.001S"),
        ] {
            assert_eq!(format_within(ms), s);
            assert_eq!(parse_within(&json!(s)).unwrap(), ms);
        }
    }

    #[test]
    fn validation_lists_every_field_error() {
        let errs = validate_rule(
            "bad id!",
            &json!({"entityType": "1Bag", "triggerEventType": "LOADED",
                "expectedEventTypes": ["LOADED", "MILESTONE_OVERDUE", 3, "A", "A"],
                "within": "P1M", "extra": 1}),
        )
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "ruleId",
            "extra",
            "entityType",
            "expectedEventTypes[1]",
            "expectedEventTypes[2]",
            "expectedEventTypes[4]",
            "within",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        let errs = validate_rule("r", &json!({})).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs.iter().all(|e| e.message == "is required"));
        let errs = validate_rule(
            "r",
            &json!({"entityType": "Bag", "triggerEventType": "LOADED",
                "expectedEventTypes": ["ARRIVED", "LOADED"], "within": "PT1H"}),
        )
        .unwrap_err();
        assert_eq!(errs[0].field, "expectedEventTypes");
        let r = validate_rule(
            "bag-arrival",
            &json!({"entityType": "Bag", "triggerEventType": "LOADED",
                "expectedEventTypes": "ARRIVED", "within": "PT2H"}),
        )
        .unwrap();
        assert_eq!(r.expected_event_types, ["ARRIVED"]);
        assert_eq!(r.within_ms, 7_200_000);
    }
}
