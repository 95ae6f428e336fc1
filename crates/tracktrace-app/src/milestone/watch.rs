//! The milestone watch saga ([`MilestoneWatch`]) and the alarm events its commands raise
//! ([`MilestoneCommand::event`]); [`crate::milestone::dispatch`] captures them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracktrace_core::{
    CommandFailure, EventFilter, EventId, EventStore, Reaction, RecordedEvent, Saga, TenantId,
    Timestamp,
};
use tracktrace_domain::{
    ENTITY_STREAM_PREFIX, Location, OPERATIONAL_EVENT, OccurredAt, OperationalEvent, format_micros,
};
use uuid::Uuid;

use crate::error::AppError;
use crate::milestone::rules::{
    OVERDUE, RECOVERED, RULE_REMOVED, RULE_SET, RuleBook, format_within,
};

/// `source` of the events the watch raises.
pub const SOURCE: &str = "tracktrace.milestone-watch";

/// A milestone as the watch remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Milestone {
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// `occurredAt`, µs since the epoch (UTC).
    pub occurred_at_us: i64,
    /// Where.
    pub location: Location,
    /// Correlation id of the event, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// The terms of a rule a watch was opened with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleTerms {
    /// Rule id.
    pub id: String,
    /// Expected event types.
    pub expected_event_types: Vec<String>,
    /// Allowed delay, ms.
    pub within_ms: u64,
}

/// A watch opened by a trigger (open, or overdue once its deadline fired).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Watch {
    /// The rule's terms when the watch opened.
    pub rule: RuleTerms,
    /// The trigger.
    pub trigger: Milestone,
    /// Trigger `occurredAt` + `within`, µs since the epoch.
    pub deadline_us: i64,
}

impl Watch {
    /// Name of its saga deadline.
    fn deadline_name(&self) -> String {
        format!("{}|{}", self.rule.id, self.trigger.event_id)
    }

    fn satisfied_by(&self, m: &Milestone) -> bool {
        self.rule.expected_event_types.contains(&m.event_type)
            && m.occurred_at_us >= self.trigger.occurred_at_us
    }
}

/// One rule's watches on one entity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleWatch {
    /// The open watch (deadline pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<Watch>,
    /// Watches whose `MILESTONE_OVERDUE` was raised and not yet recovered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overdue: Vec<Watch>,
}

/// The state of one entity's watch (saga state, recorded as events).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchState {
    /// Tenant.
    pub tenant: String,
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Latest `occurredAt` (µs) seen per expected event type (for out-of-order triggers).
    #[serde(default)]
    pub seen: BTreeMap<String, i64>,
    /// Per rule id.
    #[serde(default)]
    pub rules: BTreeMap<String, RuleWatch>,
}

/// What the watch dispatches: captures of alarm events into the entity's stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MilestoneCommand {
    /// Capture `MILESTONE_OVERDUE`.
    RaiseOverdue {
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// The watch that ran out.
        watch: Watch,
    },
    /// Capture `MILESTONE_RECOVERED` (a compensation of the overdue).
    RaiseRecovered {
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// The overdue watch.
        watch: Watch,
        /// The milestone that arrived.
        milestone: Milestone,
    },
}

/// Namespace of the watch's deterministic event ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d1e_57a0_4e2b_4c8f_9a3d_7b15_c0de_0753);

/// The event id of the alarm `kind` (`OVERDUE` or `RECOVERED`) of `watch` on an entity: a
/// UUIDv5 of everything that identifies it, so a re-sent command stores nothing new.
pub fn alarm_event_id(
    kind: &str,
    tenant: &TenantId,
    entity_type: &str,
    entity_id: &str,
    watch: &Watch,
) -> EventId {
    let name = [
        kind,
        tenant.as_str(),
        entity_type,
        entity_id,
        &watch.rule.id,
        &watch.trigger.event_id,
    ]
    .join("\u{0}");
    EventId::from_uuid(Uuid::new_v5(&ID_NAMESPACE, name.as_bytes())).unwrap_or_default()
}

/// The fields of a stored operational event the watch reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields {
    event_type: String,
    entity_id: String,
    entity_type: String,
    occurred_at_us: i64,
    location: Location,
}

fn fields(e: &RecordedEvent) -> Option<Fields> {
    if e.event_type != OPERATIONAL_EVENT || !e.stream.as_str().starts_with(ENTITY_STREAM_PREFIX) {
        return None;
    }
    serde_json::from_slice(&e.payload).ok()
}

/// The milestone watch saga. It reads the rule events from the same log as the milestones
/// (its filter includes them), so each milestone is judged by the rules in force at its
/// position.
pub struct MilestoneWatch {
    book: Mutex<RuleBook>,
}

impl std::fmt::Debug for MilestoneWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MilestoneWatch").finish_non_exhaustive()
    }
}

impl MilestoneWatch {
    /// A watch over `book` (the rule events up to some position; later ones arrive as
    /// triggers).
    pub fn new(book: RuleBook) -> Self {
        Self {
            book: Mutex::new(book),
        }
    }

    /// A watch with every rule of `store` up to its head.
    pub async fn load(store: Arc<dyn EventStore>) -> Result<Self, AppError> {
        Ok(Self::new(RuleBook::load(&*store).await?))
    }

    fn book(&self) -> MutexGuard<'_, RuleBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn delay_until(deadline_us: i64) -> Duration {
    Timestamp::now().elapsed_until(Timestamp::from_unix_micros(deadline_us))
}

impl Saga for MilestoneWatch {
    const NAME: &'static str = "milestone-watch";
    type State = WatchState;
    type Command = MilestoneCommand;
    type Failure = CommandFailure;

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_event_types([OPERATIONAL_EVENT, RULE_SET, RULE_REMOVED])
    }

    fn correlate(&self, e: &RecordedEvent) -> Option<String> {
        if e.event_type == RULE_SET || e.event_type == RULE_REMOVED {
            // The runner reads the log in order: a rule event is applied before any milestone
            // recorded after it is judged.
            self.book().apply_event(e);
            return None;
        }
        // Most tenants have no rules: skip them before decoding anything.
        if !self.book().has_rules(e.tenant.as_str()) {
            return None;
        }
        let f = fields(e)?;
        self.book()
            .concerns(e.tenant.as_str(), &f.entity_type, &f.event_type, e.position)
            .then(|| format!("{}-{}", f.entity_type, f.entity_id))
    }

    fn on_event(&self, state: &WatchState, e: &RecordedEvent) -> Reaction<Self> {
        let Some(f) = fields(e) else {
            return Reaction::new();
        };
        let book = self.book();
        let tenant = e.tenant.as_str();
        let m = Milestone {
            event_id: e.event_id.to_string(),
            event_type: f.event_type,
            occurred_at_us: f.occurred_at_us,
            location: f.location,
            correlation_id: e.metadata.correlation_id.clone(),
        };
        let mut st = state.clone();
        st.tenant = tenant.to_owned();
        st.entity_type = f.entity_type.clone();
        st.entity_id = f.entity_id.clone();
        let mut reaction = Reaction::new();
        // As an expected milestone: close open watches, recover raised alarms.
        for w in st.rules.values_mut() {
            if let Some(open) = w.open.take_if(|o| o.satisfied_by(&m)) {
                reaction = reaction.cancel(open.deadline_name());
            }
            let (recovered, still): (Vec<_>, Vec<_>) =
                w.overdue.drain(..).partition(|o| o.satisfied_by(&m));
            w.overdue = still;
            for watch in recovered {
                reaction = reaction.compensate(MilestoneCommand::RaiseRecovered {
                    entity_type: st.entity_type.clone(),
                    entity_id: st.entity_id.clone(),
                    watch,
                    milestone: m.clone(),
                });
            }
        }
        // Remember it (rules never expect their own trigger, so it cannot satisfy a watch it
        // opens below).
        if book.expected_before(tenant, &st.entity_type, &m.event_type, e.position) {
            let s = st.seen.entry(m.event_type.clone()).or_insert(i64::MIN);
            *s = (*s).max(m.occurred_at_us);
        }
        // As a trigger: open (or re-arm) a watch per rule in force.
        for rule in book.rules_at(tenant, &st.entity_type, e.position) {
            if rule.trigger_event_type != m.event_type {
                continue;
            }
            let already = rule
                .expected_event_types
                .iter()
                .filter_map(|x| st.seen.get(x))
                .any(|at| *at >= m.occurred_at_us);
            if already {
                continue;
            }
            let w = st.rules.entry(rule.id.clone()).or_default();
            let newer_exists = w
                .open
                .iter()
                .chain(w.overdue.iter())
                .any(|o| o.trigger.occurred_at_us >= m.occurred_at_us);
            if newer_exists {
                continue;
            }
            if let Some(old) = w.open.take() {
                reaction = reaction.cancel(old.deadline_name());
            }
            let within_us = i64::try_from(rule.within_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
            let watch = Watch {
                rule: RuleTerms {
                    id: rule.id.clone(),
                    expected_event_types: rule.expected_event_types.clone(),
                    within_ms: rule.within_ms,
                },
                trigger: m.clone(),
                deadline_us: m.occurred_at_us.saturating_add(within_us),
            };
            reaction = reaction.schedule(watch.deadline_name(), delay_until(watch.deadline_us));
            w.open = Some(watch);
        }
        st.rules
            .retain(|_, w| w.open.is_some() || !w.overdue.is_empty());
        if st != *state {
            reaction = reaction.state(st);
        }
        reaction
    }

    fn on_deadline(&self, state: &WatchState, deadline: &str) -> Reaction<Self> {
        let mut st = state.clone();
        let Some((rule_id, w)) = st.rules.iter_mut().find(|(_, w)| {
            w.open
                .as_ref()
                .is_some_and(|o| o.deadline_name() == deadline)
        }) else {
            return Reaction::new();
        };
        let Some(open) = w.open.take() else {
            return Reaction::new();
        };
        let mut reaction = Reaction::new();
        if self.book().is_current(&st.tenant, rule_id) {
            reaction = reaction.dispatch(MilestoneCommand::RaiseOverdue {
                entity_type: st.entity_type.clone(),
                entity_id: st.entity_id.clone(),
                watch: open.clone(),
            });
            w.overdue.push(open);
        } else {
            tracing::info!(rule = %rule_id, "milestone rule removed: its watch ends without an alarm");
        }
        st.rules
            .retain(|_, w| w.open.is_some() || !w.overdue.is_empty());
        reaction.state(st)
    }

    /// No open watch and no unrecovered overdue alarm: the runner drops the instance from
    /// memory (its state, `seen` included, stays in its stream for the entity's next
    /// milestone).
    fn is_idle(&self, state: &WatchState) -> bool {
        state.rules.is_empty()
    }

    fn on_failure(
        &self,
        state: &WatchState,
        command: &MilestoneCommand,
        failure: &CommandFailure,
    ) -> Reaction<Self> {
        tracing::error!(?command, %failure, "milestone alarm could not be captured");
        match command {
            // No alarm was stored: nothing to recover later.
            MilestoneCommand::RaiseOverdue { watch, .. } => {
                let mut st = state.clone();
                for w in st.rules.values_mut() {
                    w.overdue.retain(|o| o != watch);
                }
                st.rules
                    .retain(|_, w| w.open.is_some() || !w.overdue.is_empty());
                Reaction::new().state(st)
            }
            MilestoneCommand::RaiseRecovered { .. } => Reaction::new(),
        }
    }
}

/// `attributes` of an alarm from a JSON object literal.
fn attributes(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl MilestoneCommand {
    /// The alarm event the command captures into the entity's stream (built from the
    /// already validated milestones it names), with its deterministic event id.
    pub fn event(&self, tenant: &TenantId) -> OperationalEvent {
        match self {
            MilestoneCommand::RaiseOverdue {
                entity_type,
                entity_id,
                watch,
            } => OperationalEvent {
                event_id: Some(alarm_event_id(
                    OVERDUE,
                    tenant,
                    entity_type,
                    entity_id,
                    watch,
                )),
                dedup_key: None,
                entity_id: entity_id.clone(),
                entity_type: entity_type.clone(),
                event_type: OVERDUE.into(),
                occurred_at: OccurredAt::from_utc_micros(watch.deadline_us),
                location: watch.trigger.location.clone(),
                source: Some(SOURCE.into()),
                attributes: attributes(json!({
                    "rule": watch.rule.id,
                    "expectedEventTypes": watch.rule.expected_event_types,
                    "within": format_within(watch.rule.within_ms),
                    "deadline": format_micros(watch.deadline_us),
                    "triggerEventType": watch.trigger.event_type,
                    "triggerEventId": watch.trigger.event_id,
                    "triggerOccurredAt": format_micros(watch.trigger.occurred_at_us),
                })),
                related_entities: Vec::new(),
            },
            MilestoneCommand::RaiseRecovered {
                entity_type,
                entity_id,
                watch,
                milestone,
            } => {
                // Just after the milestone and never before the alarm it resolves (1 ms), so
                // the trace, ordered by occurredAt, reads milestone → recovery.
                let at = milestone
                    .occurred_at_us
                    .max(watch.deadline_us)
                    .saturating_add(1000);
                let late_us = milestone
                    .occurred_at_us
                    .saturating_sub(watch.deadline_us)
                    .max(0);
                OperationalEvent {
                    event_id: Some(alarm_event_id(
                        RECOVERED,
                        tenant,
                        entity_type,
                        entity_id,
                        watch,
                    )),
                    dedup_key: None,
                    entity_id: entity_id.clone(),
                    entity_type: entity_type.clone(),
                    event_type: RECOVERED.into(),
                    occurred_at: OccurredAt::from_utc_micros(at),
                    location: milestone.location.clone(),
                    source: Some(SOURCE.into()),
                    attributes: attributes(json!({
                        "rule": watch.rule.id,
                        "expectedEventTypes": watch.rule.expected_event_types,
                        "deadline": format_micros(watch.deadline_us),
                        "milestoneEventType": milestone.event_type,
                        "milestoneEventId": milestone.event_id,
                        "milestoneOccurredAt": format_micros(milestone.occurred_at_us),
                        "lateBySeconds": late_us as f64 / 1e6,
                        "overdueEventId": alarm_event_id(OVERDUE, tenant, entity_type, entity_id, watch).as_uuid().to_string(),
                    })),
                    related_entities: Vec::new(),
                }
            }
        }
    }

    /// The correlation id of the alarm: the milestone's, else the dispatch id.
    pub fn correlation_id(&self, dispatch_id: Uuid) -> String {
        let m = match self {
            MilestoneCommand::RaiseOverdue { watch, .. } => &watch.trigger,
            MilestoneCommand::RaiseRecovered { milestone, .. } => milestone,
        };
        m.correlation_id
            .clone()
            .unwrap_or_else(|| dispatch_id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::aggregates::CaptureCommand;
    use crate::capture::service::CaptureService;
    use crate::milestone::dispatch::CaptureDispatcher;
    use crate::milestone::rules::{self, MilestoneRule};
    use tracktrace_core::CommandDispatcher;
    use tracktrace_core::{EventStoreExt, InMemoryStore, ReadModelStore, SagaRunner};
    use tracktrace_domain::{Enrichment, StoredEvent, entity_stream, validate_capture_value};

    type Runner = SagaRunner<MilestoneWatch, CaptureDispatcher>;

    struct Fx {
        mem: Arc<InMemoryStore>,
        store: Arc<dyn EventStore>,
        capture: CaptureService,
        tenant: TenantId,
    }

    fn fx() -> Fx {
        let mem = Arc::new(InMemoryStore::new());
        let store: Arc<dyn EventStore> = mem.clone();
        Fx {
            capture: CaptureService::new(store.clone()),
            store,
            mem,
            tenant: TenantId::parse("acme").unwrap(),
        }
    }

    fn now_us() -> i64 {
        Timestamp::now().unix_micros()
    }

    const HOUR: i64 = 3_600_000_000;

    impl Fx {
        async fn runner(&self) -> Runner {
            let cp: Arc<dyn ReadModelStore> = self.mem.clone();
            SagaRunner::new(
                self.store.clone(),
                cp,
                MilestoneWatch::load(self.store.clone()).await.unwrap(),
                CaptureDispatcher::new(self.capture.clone()),
            )
        }

        async fn rule(&self, within_ms: u64) {
            let rule = MilestoneRule {
                id: "bag-arrival".into(),
                entity_type: "Bag".into(),
                trigger_event_type: "LOADED".into(),
                expected_event_types: vec!["ARRIVED".into()],
                within_ms,
            };
            rules::set(&*self.store, &self.tenant, &rule, "test")
                .await
                .unwrap();
        }

        async fn capture(&self, bag: &str, event_type: &str, at_us: i64) {
            let v = json!({
                "entityId": bag, "entityType": "Bag", "eventType": event_type,
                "occurredAt": format_micros(at_us), "location": {"code": "MAD"},
            });
            let event = validate_capture_value(&v, "").unwrap();
            self.capture
                .capture(CaptureCommand {
                    event,
                    enrichment: Enrichment {
                        tenant: self.tenant.clone(),
                        submitted_by: "test".into(),
                        received_at: Timestamp::now(),
                        correlation_id: "c".into(),
                    },
                })
                .await
                .unwrap();
        }

        /// The entity's events (type, attributes).
        async fn events(&self, bag: &str) -> Vec<(String, serde_json::Map<String, Value>)> {
            self.store
                .read_stream_forwards(&self.tenant, &entity_stream("Bag", bag).unwrap())
                .await
                .unwrap()
                .iter()
                .map(|e| {
                    let s = StoredEvent::decode(e).unwrap();
                    (s.event_type, s.attributes)
                })
                .collect()
        }

        /// The watch's state of an instance, in the runner's memory or not.
        async fn state(&self, r: &Runner, instance: &str) -> WatchState {
            r.load_state(&self.tenant, instance).await.unwrap().unwrap()
        }

        async fn count(&self, bag: &str, event_type: &str) -> usize {
            self.events(bag)
                .await
                .iter()
                .filter(|(t, _)| t == event_type)
                .count()
        }
    }

    /// Runs rounds until a deadline fired (bounded), returning how many fired.
    async fn until_fired(r: &mut Runner) -> usize {
        for _ in 0..500 {
            let p = r.run_once().await.unwrap();
            if p.deadlines_fired > 0 {
                return p.deadlines_fired;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no deadline fired");
    }

    #[tokio::test]
    async fn overdue_once_then_recovered_once() {
        let f = fx();
        f.rule(60_000).await;
        let loaded_at = now_us() - HOUR;
        f.capture("B1", "LOADED", loaded_at).await;
        let mut r = f.runner().await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired, p.dispatched), (1, 1, 1));
        let events = f.events("B1").await;
        assert_eq!(events.len(), 2);
        let (t, attrs) = &events[1];
        assert_eq!(t, OVERDUE);
        assert_eq!(attrs["rule"], "bag-arrival");
        assert_eq!(attrs["expectedEventTypes"], json!(["ARRIVED"]));
        assert_eq!(attrs["within"], "PT1M");
        assert_eq!(attrs["deadline"], format_micros(loaded_at + 60_000_000));
        // Its own alarm does not concern the watch; nothing more happens.
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired, p.dispatched), (0, 0, 0));

        f.capture("B1", "ARRIVED", now_us()).await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.dispatched), (1, 1));
        let events = f.events("B1").await;
        let (t, attrs) = events.last().unwrap();
        assert_eq!(t, RECOVERED);
        assert_eq!(attrs["milestoneEventType"], "ARRIVED");
        assert!(attrs["lateBySeconds"].as_f64().unwrap() > 3000.0);
        // A restarted runner (new process) re-reads everything and raises nothing again.
        drop(r);
        let mut r = f.runner().await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired, p.dispatched), (0, 0, 0));
        assert_eq!(f.count("B1", OVERDUE).await, 1);
        assert_eq!(f.count("B1", RECOVERED).await, 1);
        assert!(
            r.state(&f.tenant, "Bag-B1").is_none(),
            "recovered: out of memory"
        );
        assert!(f.state(&r, "Bag-B1").await.rules.is_empty());
    }

    #[tokio::test]
    async fn on_time_and_out_of_order_milestones_raise_nothing() {
        let f = fx();
        f.rule(60_000).await;
        // In order, on time (occurredAt in the future keeps the deadline far away).
        let t = now_us() + HOUR;
        f.capture("ONTIME", "LOADED", t).await;
        f.capture("ONTIME", "ARRIVED", t + 1_000_000).await;
        // Out of order: the arrival is reported before the load, whose deadline has passed.
        let t = now_us() - HOUR;
        f.capture("OOO", "ARRIVED", t).await;
        f.capture("OOO", "LOADED", t - 1_000_000).await;
        // An older load reported late does not re-open a satisfied watch of a newer one.
        let mut r = f.runner().await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired, p.dispatched), (4, 0, 0));
        for bag in ["ONTIME", "OOO"] {
            assert_eq!(f.events(bag).await.len(), 2, "{bag}");
            let st = f.state(&r, &format!("Bag-{bag}")).await;
            assert!(st.rules.is_empty(), "{bag}: {st:?}");
        }
        assert_eq!(
            r.instances_in_memory(),
            0,
            "nothing pending, nothing in memory"
        );
        assert_eq!(r.next_deadline(), None);
    }

    #[tokio::test]
    async fn rules_apply_to_milestones_recorded_after_them() {
        let f = fx();
        let past = now_us() - HOUR;
        f.capture("OLD", "LOADED", past).await;
        let mut r = f.runner().await;
        assert_eq!(r.run_once().await.unwrap().triggers, 0);
        f.rule(1000).await;
        f.capture("NEW", "LOADED", past).await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired), (1, 1));
        assert_eq!(f.count("OLD", OVERDUE).await, 0);
        assert_eq!(f.count("NEW", OVERDUE).await, 1);
        // Loaded at start-up from the log, the rules still apply only from their position.
        let mut r = f.runner().await;
        assert_eq!(r.run_once().await.unwrap().triggers, 0);
        f.capture("NEW2", "LOADED", past).await;
        assert_eq!(r.run_once().await.unwrap().deadlines_fired, 1);
        assert_eq!(f.count("NEW2", OVERDUE).await, 1);
    }

    #[tokio::test]
    async fn open_watches_keep_the_terms_they_were_opened_with() {
        let f = fx();
        f.rule(HOUR as u64 / 1000).await;
        let t = now_us();
        f.capture("C", "LOADED", t).await;
        let mut r = f.runner().await;
        r.run_once().await.unwrap();
        // The rule now expects UNLOADED instead of ARRIVED, within a minute.
        let changed = MilestoneRule {
            id: "bag-arrival".into(),
            entity_type: "Bag".into(),
            trigger_event_type: "LOADED".into(),
            expected_event_types: vec!["UNLOADED".into()],
            within_ms: 60_000,
        };
        rules::set(&*f.store, &f.tenant, &changed, "test")
            .await
            .unwrap();
        f.capture("C2", "LOADED", t).await;
        // ARRIVED still satisfies the watch opened under the old terms.
        f.capture("C", "ARRIVED", t + 1).await;
        let p = r.run_once().await.unwrap();
        assert_eq!(p.triggers, 2);
        assert!(f.state(&r, "Bag-C").await.rules.is_empty());
        let st = r.state(&f.tenant, "Bag-C2").unwrap();
        let open = st.rules["bag-arrival"].open.as_ref().unwrap();
        assert_eq!(open.rule.expected_event_types, ["UNLOADED"]);
        assert_eq!(open.deadline_us, t + 60_000_000);
    }

    #[tokio::test]
    async fn a_removed_rule_ends_its_open_watches_without_alarm() {
        let f = fx();
        f.rule(200).await;
        f.capture("B", "LOADED", now_us()).await;
        let mut r = f.runner().await;
        assert_eq!(r.run_once().await.unwrap().triggers, 1);
        assert!(r.next_deadline().is_some());
        assert!(
            rules::remove(&*f.store, &f.tenant, "bag-arrival", "test")
                .await
                .unwrap()
        );
        assert_eq!(until_fired(&mut r).await, 1);
        assert_eq!(f.count("B", OVERDUE).await, 0);
        assert!(f.state(&r, "Bag-B").await.rules.is_empty());
    }

    #[tokio::test]
    async fn a_deadline_scheduled_before_a_restart_fires_once_after_it() {
        let f = fx();
        f.rule(300).await;
        f.capture("R", "LOADED", now_us()).await;
        let mut r = f.runner().await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired), (1, 0));
        drop(r);
        let mut r = f.runner().await;
        assert_eq!(until_fired(&mut r).await, 1);
        assert_eq!(f.count("R", OVERDUE).await, 1);
        let p = r.run_once().await.unwrap();
        assert_eq!((p.deadlines_fired, p.dispatched), (0, 0));
        assert_eq!(f.count("R", OVERDUE).await, 1);
    }

    #[tokio::test]
    async fn a_newer_trigger_rearms_the_watch_and_an_older_one_is_ignored() {
        let f = fx();
        f.rule(HOUR as u64 / 1000).await;
        let t = now_us();
        f.capture("X", "LOADED", t).await;
        f.capture("X", "LOADED", t + 60_000_000).await;
        f.capture("X", "LOADED", t - 60_000_000).await;
        let mut r = f.runner().await;
        assert_eq!(r.run_once().await.unwrap().triggers, 3);
        let st = r.state(&f.tenant, "Bag-X").unwrap();
        let open = st.rules["bag-arrival"].open.as_ref().unwrap();
        assert_eq!(open.trigger.occurred_at_us, t + 60_000_000);
        assert_eq!(open.deadline_us, t + 60_000_000 + HOUR);
        let records = r.records(&f.tenant, "Bag-X").await.unwrap();
        let scheduled = records
            .iter()
            .filter(|r| matches!(r, tracktrace_core::SagaRecord::DeadlineScheduled { .. }))
            .count();
        let cancelled = records
            .iter()
            .filter(|r| matches!(r, tracktrace_core::SagaRecord::DeadlineCancelled { .. }))
            .count();
        assert_eq!((scheduled, cancelled), (2, 1));
    }

    #[tokio::test]
    async fn a_resent_alarm_is_stored_once() {
        let f = fx();
        f.capture("D", "LOADED", now_us()).await;
        let watch = Watch {
            rule: RuleTerms {
                id: "r".into(),
                expected_event_types: vec!["ARRIVED".into()],
                within_ms: 1000,
            },
            trigger: Milestone {
                event_id: EventId::new().to_string(),
                event_type: "LOADED".into(),
                occurred_at_us: now_us(),
                location: Location {
                    code: "MAD".into(),
                    detail: None,
                },
                correlation_id: None,
            },
            deadline_us: now_us() + 1_000_000,
        };
        let cmd = MilestoneCommand::RaiseOverdue {
            entity_type: "Bag".into(),
            entity_id: "D".into(),
            watch,
        };
        let d = CaptureDispatcher::new(f.capture.clone());
        let id = Uuid::now_v7();
        d.dispatch(&f.tenant, id, &cmd).await.unwrap();
        // A crash after sending, before the success was recorded: the runner sends again
        // (same command); a fresh capture service (another process) too.
        d.dispatch(&f.tenant, id, &cmd).await.unwrap();
        CaptureDispatcher::new(CaptureService::new(f.store.clone()))
            .dispatch(&f.tenant, id, &cmd)
            .await
            .unwrap();
        assert_eq!(f.count("D", OVERDUE).await, 1);
    }

    /// Runs rounds until no deadline is pending (bounded).
    async fn drive(r: &mut Runner) {
        for _ in 0..300 {
            r.run_once().await.unwrap();
            if r.next_deadline().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("deadlines still pending");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_runners_on_one_store_raise_each_alarm_once() {
        let f = fx();
        f.rule(100).await;
        let now = now_us();
        for i in 0..8 {
            f.capture(&format!("P{i}"), "LOADED", now - HOUR).await;
            f.capture(&format!("F{i}"), "LOADED", now).await;
        }
        let (mut a, mut b) = (f.runner().await, f.runner().await);
        tokio::join!(drive(&mut a), drive(&mut b));
        for i in 0..8 {
            for bag in [format!("P{i}"), format!("F{i}")] {
                assert_eq!(f.count(&bag, OVERDUE).await, 1, "{bag}");
            }
        }
        // Late arrivals: both runners see them, one recovery each.
        for i in 0..8 {
            f.capture(&format!("F{i}"), "ARRIVED", now_us()).await;
        }
        let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
        ra.unwrap();
        rb.unwrap();
        for i in 0..8 {
            assert_eq!(f.count(&format!("F{i}"), RECOVERED).await, 1);
        }
    }

    /// An alarm whose capture meets contention (the entity's stream keeps conflicting through
    /// the command bus's retries) is a transient dispatch failure: the runner sends it again
    /// and the alarm is recorded once, instead of being dropped as a permanent failure.
    #[tokio::test]
    async fn a_contended_alarm_is_retried_and_recorded() {
        use crate::test_support::ContendedStore;
        use tracktrace_core::DispatchError;

        let f = fx();
        f.rule(60_000).await;
        f.capture("C1", "LOADED", now_us() - HOUR).await;
        let contended = Arc::new(ContendedStore::new(f.store.clone(), "Entity-Bag-C1"));
        contended.conflict_next(u32::MAX);
        let capture = CaptureService::new(contended.clone());
        // The dispatcher itself calls it transient.
        let watch = Watch {
            rule: RuleTerms {
                id: "bag-arrival".into(),
                expected_event_types: vec!["ARRIVED".into()],
                within_ms: 1000,
            },
            trigger: Milestone {
                event_id: EventId::new().to_string(),
                event_type: "LOADED".into(),
                occurred_at_us: now_us() - HOUR,
                location: Location {
                    code: "MAD".into(),
                    detail: None,
                },
                correlation_id: None,
            },
            deadline_us: now_us() - HOUR + 1_000_000,
        };
        let cmd = MilestoneCommand::RaiseOverdue {
            entity_type: "Bag".into(),
            entity_id: "C1".into(),
            watch,
        };
        let r = CaptureDispatcher::new(capture.clone())
            .dispatch(&f.tenant, Uuid::now_v7(), &cmd)
            .await;
        assert!(
            matches!(&r, Err(DispatchError::Transient(m)) if m.contains("contention")),
            "{r:?}"
        );

        // Through the runner: the deadline fires, the alarm stays pending while contended…
        let cp: Arc<dyn ReadModelStore> = f.mem.clone();
        let mut r = SagaRunner::new(
            f.store.clone(),
            cp,
            MilestoneWatch::load(f.store.clone()).await.unwrap(),
            CaptureDispatcher::new(capture),
        );
        let p = r.run_once().await.unwrap();
        assert_eq!((p.deadlines_fired, p.pending), (1, 1), "{p:?}");
        assert_eq!(f.count("C1", OVERDUE).await, 0);
        // … and is captured once the contention is over.
        contended.conflict_next(0);
        let p = r.run_once().await.unwrap();
        assert_eq!((p.dispatched, p.pending), (1, 0), "{p:?}");
        assert_eq!(f.count("C1", OVERDUE).await, 1);
        let records = f
            .store
            .read_stream_forwards(
                &f.tenant,
                &SagaRunner::<MilestoneWatch, CaptureDispatcher>::stream_id("Bag-C1").unwrap(),
            )
            .await
            .unwrap();
        assert!(
            records.iter().all(|e| e.event_type != "SagaCommandFailed"),
            "no permanent failure was recorded"
        );
    }

    /// Memory follows what is pending: entities whose milestones all arrived on time leave
    /// the runner's memory (their watch stays readable from the saga streams), an open watch
    /// stays until its milestone arrives, an unrecovered alarm until its recovery is captured.
    #[tokio::test]
    async fn instances_leave_memory_once_nothing_is_pending() {
        let f = fx();
        f.rule(HOUR as u64 / 1000).await;
        let t = now_us();
        const BAGS: usize = 50;
        for i in 0..BAGS {
            f.capture(&format!("OK{i}"), "LOADED", t).await;
            f.capture(&format!("OK{i}"), "ARRIVED", t + 1_000_000).await;
        }
        f.capture("OPEN", "LOADED", t).await;
        f.capture("LATE", "LOADED", t - 2 * HOUR).await;
        let mut r = f.runner().await;
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.deadlines_fired), (2 * BAGS + 2, 1));
        assert_eq!(
            r.instances_in_memory(),
            2,
            "the open watch and the raised alarm only"
        );
        assert!(r.state(&f.tenant, "Bag-OPEN").is_some());
        assert!(r.state(&f.tenant, "Bag-LATE").is_some());
        // The watches of a bag out of memory are still served from its saga stream.
        let tenants = crate::tenants::TenantRegistry::new(f.store.clone());
        tenants.create(&f.tenant, "test").await.unwrap();
        let milestones = crate::milestone::service::Milestones::new(f.store.clone(), tenants);
        let reader = crate::access::Actor::new(
            "reader",
            f.tenant.clone(),
            vec![crate::access::Scope::TraceRead],
        );
        let w = milestones
            .entity_watches(&reader, "Bag", "OK7")
            .await
            .unwrap();
        assert!(w.open.is_empty() && w.overdue.is_empty(), "{w:?}");
        let w = milestones
            .entity_watches(&reader, "Bag", "LATE")
            .await
            .unwrap();
        assert_eq!((w.open.len(), w.overdue.len()), (0, 1), "{w:?}");
        for bag in ["OPEN", "LATE"] {
            f.capture(bag, "ARRIVED", now_us()).await;
        }
        let p = r.run_once().await.unwrap();
        assert_eq!((p.triggers, p.dispatched), (2, 1), "LATE recovered");
        assert_eq!(f.count("LATE", RECOVERED).await, 1);
        assert_eq!(r.instances_in_memory(), 0);
        assert!(f.state(&r, "Bag-OPEN").await.rules.is_empty());
        // A bag's next leg reloads its watch from the stream and opens a new one.
        f.capture("OK0", "LOADED", t + 10_000_000).await;
        assert_eq!(r.run_once().await.unwrap().triggers, 1);
        assert_eq!(r.instances_in_memory(), 1);
        assert!(
            r.state(&f.tenant, "Bag-OK0").unwrap().rules["bag-arrival"]
                .open
                .is_some()
        );
    }
}
