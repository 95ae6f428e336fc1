//! Partner routes, stored in the event store itself: one stream per route
//! (`partner-route-<tenant>/<name>`) under the system tenant, with `tt.PartnerRouteAdded` and
//! `tt.PartnerRouteRemoved` events. Every process keeps an in-memory view refreshed from the
//! system tenant's part of the global log ([`crate::follow::Followed`], like the tenants).
//!
//! A route is immutable once added: to change one, remove it and add it again (with the
//! `fromPosition` the new version should start from). The position of the `Added` event names
//! the route's publisher checkpoint, so a re-added route never inherits an old checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, RecordedEvent, StreamId, TenantId,
    Version,
};
use tracktrace_domain::{FieldError, entity_type_problem, event_type_problem};

use crate::access::system_tenant;
use crate::error::AppError;
use crate::follow::{Followed, SystemView};
use crate::propagation::envelope::token;

const ADDED: &str = "tt.PartnerRouteAdded";
const REMOVED: &str = "tt.PartnerRouteRemoved";
const STREAM_PREFIX: &str = "partner-route-";

/// Subject prefix of a route that names none.
pub const DEFAULT_SUBJECT_PREFIX: &str = "tracktrace";

/// Most event or entity types one route may select.
pub const MAX_TYPES: usize = 100;

/// Message format of a route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RouteFormat {
    /// Our JSON envelope (see [`crate::propagation::envelope`]).
    #[default]
    Envelope,
}

/// Body of a route creation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct NewRoute {
    /// Route name, unique per tenant: 1–64 of `a–z 0–9 _ -`, starting with a letter or digit.
    pub name: String,
    /// The partner (free text, e.g. `SITA`).
    #[serde(default)]
    pub partner: Option<String>,
    /// Event types to publish (the client's `eventType`); empty or absent: all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Entity types to publish; empty or absent: all.
    #[serde(default)]
    pub entity_types: Vec<String>,
    /// Subjects are `<subjectPrefix>.<tenant>.<entityType>.<eventType>`; default `tracktrace`.
    #[serde(default)]
    pub subject_prefix: Option<String>,
    /// JetStream stream to create (if missing) for the route's subjects, with a two-minute
    /// de-duplication window; absent: a stream managed elsewhere must capture them (as the
    /// feed's stream does for routes under the feed's prefix: JetStream refuses a second
    /// stream over overlapping subjects, so such a route names none).
    #[serde(default)]
    pub stream: Option<String>,
    /// Message format; default `envelope`.
    #[serde(default)]
    pub format: Option<RouteFormat>,
    /// First global position to publish (0: the whole log); default: the next position after
    /// the current head (only events captured from now on).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub from_position: Option<u64>,
}

/// A route as stored and shown by the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RouteInfo {
    /// Tenant.
    pub tenant: String,
    /// Route name.
    pub name: String,
    /// Partner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// Event types published (empty: all).
    pub event_types: Vec<String>,
    /// Entity types published (empty: all).
    pub entity_types: Vec<String>,
    /// Subject prefix.
    pub subject_prefix: String,
    /// Stream created for the route, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Message format.
    pub format: RouteFormat,
    /// First global position published.
    pub from_position: u64,
    /// Global position of the event that added the route (names its checkpoint).
    pub added_at: u64,
    /// Who added it.
    #[serde(default)]
    pub added_by: String,
}

impl RouteInfo {
    /// The subjects the route publishes on, as a NATS wildcard
    /// (`<subjectPrefix>.<tenant>.*.*`).
    pub fn subjects(&self) -> String {
        format!("{}.{}.*.*", self.subject_prefix, token(&self.tenant))
    }

    /// Name of the route publisher's checkpoint.
    pub fn checkpoint(&self) -> String {
        format!(
            "propagation.route.{}.{}.{}",
            self.tenant, self.name, self.added_at
        )
    }

    fn same_as(&self, spec: &NewRoute) -> bool {
        self.partner == spec.partner
            && self.event_types == spec.event_types
            && self.entity_types == spec.entity_types
            && Some(&self.subject_prefix) == spec.subject_prefix.as_ref()
            && self.stream == spec.stream
            && Some(self.format) == spec.format
            && spec.from_position.is_none_or(|p| p == self.from_position)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddedPayload {
    tenant: String,
    name: String,
    #[serde(default)]
    partner: Option<String>,
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    entity_types: Vec<String>,
    subject_prefix: String,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    format: RouteFormat,
    from_position: u64,
    #[serde(default)]
    by: String,
}

#[derive(Serialize, Deserialize)]
struct RemovedPayload {
    tenant: String,
    name: String,
    #[serde(default)]
    by: String,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
}

/// The route name rule: 1–64 of `a–z 0–9 _ -`, starting with a letter or digit.
pub fn name_problem(n: &str) -> Option<&'static str> {
    let ok =
        !n.is_empty() && n.len() <= 64 && n.chars().all(is_name_char) && !n.starts_with(['_', '-']);
    (!ok).then_some("must be 1–64 of a–z 0–9 _ -, starting with a letter or digit")
}

/// A list of types, each checked by `problem` (the capture rule of its kind).
fn check_types(
    errors: &mut Vec<FieldError>,
    field: &str,
    v: Option<&Value>,
    problem: fn(&str) -> Option<String>,
) -> Vec<String> {
    let items = match v {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            errors.push(FieldError::new(field, "must be an array of strings"));
            return Vec::new();
        }
    };
    if items.len() > MAX_TYPES {
        errors.push(FieldError::new(
            field,
            format!("at most {MAX_TYPES} entries"),
        ));
        return Vec::new();
    }
    let mut out = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str().map(|s| (s, problem(s))) {
            Some((s, None)) => {
                out.insert(s.to_owned());
            }
            Some((_, Some(m))) => errors.push(FieldError::new(format!("{field}[{i}]"), m)),
            None => errors.push(FieldError::new(format!("{field}[{i}]"), "must be a string")),
        }
    }
    out.into_iter().collect()
}

/// Validates a route creation body (every field error at once); resolves defaults except
/// `fromPosition`, which needs the store's head.
pub fn validate(body: &[u8]) -> Result<NewRoute, AppError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| AppError::Malformed(e.to_string()))?;
    let Some(obj) = value.as_object() else {
        return Err(AppError::Validation(vec![FieldError::new(
            "",
            "must be a JSON object",
        )]));
    };
    let mut errors = Vec::new();
    const KNOWN: [&str; 8] = [
        "name",
        "partner",
        "eventTypes",
        "entityTypes",
        "subjectPrefix",
        "stream",
        "format",
        "fromPosition",
    ];
    for k in obj.keys() {
        if !KNOWN.contains(&k.as_str()) {
            errors.push(FieldError::new(k.as_str(), "unknown field"));
        }
    }
    let opt_str = |errors: &mut Vec<FieldError>, field: &str| match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    };
    let name = match opt_str(&mut errors, "name") {
        Some(n) => match name_problem(&n) {
            None => n,
            Some(m) => {
                errors.push(FieldError::new("name", m));
                String::new()
            }
        },
        None => {
            if !errors.iter().any(|e| e.field == "name") {
                errors.push(FieldError::new("name", "is required"));
            }
            String::new()
        }
    };
    let partner = opt_str(&mut errors, "partner");
    if partner
        .as_ref()
        .is_some_and(|p| p.is_empty() || p.len() > 128 || p.chars().any(char::is_control))
    {
        errors.push(FieldError::new(
            "partner",
            "must be 1–128 characters without control characters",
        ));
    }
    let event_types = check_types(
        &mut errors,
        "eventTypes",
        obj.get("eventTypes"),
        event_type_problem,
    );
    let entity_types = check_types(
        &mut errors,
        "entityTypes",
        obj.get("entityTypes"),
        entity_type_problem,
    );
    let subject_prefix =
        opt_str(&mut errors, "subjectPrefix").unwrap_or_else(|| DEFAULT_SUBJECT_PREFIX.into());
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if subject_prefix.len() > 128 || !subject_prefix.split('.').all(token_ok) {
        errors.push(FieldError::new(
            "subjectPrefix",
            "must be at most 128 characters: dot-separated tokens of A–Z a–z 0–9 _ -",
        ));
    }
    let stream = opt_str(&mut errors, "stream");
    if stream
        .as_deref()
        .is_some_and(|s| s.len() > 64 || !token_ok(s))
    {
        errors.push(FieldError::new(
            "stream",
            "must be 1–64 of A–Z a–z 0–9 _ - (a JetStream stream name)",
        ));
    }
    let format = match obj.get("format") {
        None | Some(Value::Null) => RouteFormat::Envelope,
        Some(v) => match serde_json::from_value::<RouteFormat>(v.clone()) {
            Ok(f) => f,
            Err(_) => {
                errors.push(FieldError::new("format", "must be \"envelope\""));
                RouteFormat::Envelope
            }
        },
    };
    let from_position = match obj.get("fromPosition") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(p) => Some(p),
            None => {
                errors.push(FieldError::new(
                    "fromPosition",
                    "must be a non-negative integer",
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(AppError::Validation(errors));
    }
    Ok(NewRoute {
        name,
        partner,
        event_types,
        entity_types,
        subject_prefix: Some(subject_prefix),
        stream,
        format: Some(format),
        from_position,
    })
}

type Key = (String, String);

/// The registry's view: every route ever added, `None` once removed, with its stream's
/// version.
#[derive(Default)]
pub struct RouteView {
    routes: BTreeMap<Key, (Option<RouteInfo>, Version)>,
}

impl SystemView for RouteView {
    type Change = (Key, Option<RouteInfo>, Version);
    const STREAM_PREFIX: &'static str = STREAM_PREFIX;

    fn decode(e: &RecordedEvent) -> Option<Self::Change> {
        let undecodable = |err: serde_json::Error| {
            tracing::error!(error = %err, position = %e.position, "undecodable route event skipped");
        };
        match e.event_type.as_str() {
            ADDED => match serde_json::from_slice::<AddedPayload>(&e.payload) {
                Ok(p) => {
                    let info = RouteInfo {
                        tenant: p.tenant,
                        name: p.name,
                        partner: p.partner,
                        event_types: p.event_types,
                        entity_types: p.entity_types,
                        subject_prefix: p.subject_prefix,
                        stream: p.stream,
                        format: p.format,
                        from_position: p.from_position,
                        added_at: e.position.get(),
                        added_by: p.by,
                    };
                    Some((
                        (info.tenant.clone(), info.name.clone()),
                        Some(info),
                        e.version,
                    ))
                }
                Err(err) => {
                    undecodable(err);
                    None
                }
            },
            REMOVED => match serde_json::from_slice::<RemovedPayload>(&e.payload) {
                Ok(p) => Some(((p.tenant, p.name), None, e.version)),
                Err(err) => {
                    undecodable(err);
                    None
                }
            },
            _ => None,
        }
    }

    fn apply(&mut self, (key, route, version): Self::Change) {
        self.routes.insert(key, (route, version));
    }
}

/// The route registry (cheap to clone).
#[derive(Clone, Debug)]
pub struct RouteRegistry {
    view: Followed<RouteView>,
}

/// The route's stream; a name outside the route name rule is a field error (`name`).
fn stream_of(tenant: &TenantId, name: &str) -> Result<StreamId, AppError> {
    if let Some(m) = name_problem(name) {
        return Err(AppError::field("name", m));
    }
    StreamId::parse(format!("{STREAM_PREFIX}{tenant}/{name}")).map_err(AppError::internal)
}

impl RouteRegistry {
    /// A registry over `store` (loads nothing until [`RouteRegistry::refresh`]).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            view: Followed::new(store),
        }
    }

    fn store(&self) -> &Arc<dyn EventStore> {
        self.view.store()
    }

    /// Reads route events committed since the last refresh.
    pub async fn refresh(&self) -> Result<(), AppError> {
        self.view.refresh().await
    }

    /// A receiver that changes whenever a refresh applied route changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.view.changes()
    }

    /// Follows the route events forever: refreshes after head changes, at most once per
    /// `pause`.
    pub async fn follow(self, pause: std::time::Duration) {
        self.view.follow(pause).await
    }

    /// Every active route as of the last refresh.
    pub fn active(&self) -> Vec<RouteInfo> {
        self.view
            .read(|v| v.routes.values().filter_map(|(r, _)| r.clone()).collect())
    }

    /// The tenant's active routes (refreshed first).
    pub async fn list(&self, tenant: &TenantId) -> Result<Vec<RouteInfo>, AppError> {
        self.refresh().await?;
        Ok(self.view.read(|v| {
            v.routes
                .range((tenant.to_string(), String::new())..)
                .take_while(|((t, _), _)| t == tenant.as_str())
                .filter_map(|(_, (r, _))| r.clone())
                .collect()
        }))
    }

    /// One active route (refreshed first).
    pub async fn get(&self, tenant: &TenantId, name: &str) -> Result<Option<RouteInfo>, AppError> {
        if let Some(m) = name_problem(name) {
            return Err(AppError::field("name", m));
        }
        self.refresh().await?;
        Ok(self.current(tenant, name).0)
    }

    fn current(&self, tenant: &TenantId, name: &str) -> (Option<RouteInfo>, Version) {
        self.view.read(|v| {
            v.routes
                .get(&(tenant.to_string(), name.to_owned()))
                .cloned()
                .unwrap_or((None, Version::ZERO))
        })
    }

    /// Adds a validated route; `Ok((route, false))` if the same route exists already
    /// (idempotent), 409 if a different one has that name.
    pub async fn add(
        &self,
        tenant: &TenantId,
        spec: &NewRoute,
        by: &str,
    ) -> Result<(RouteInfo, bool), AppError> {
        let stream = stream_of(tenant, &spec.name)?;
        for _ in 0..5 {
            self.refresh().await?;
            let (current, version) = self.current(tenant, &spec.name);
            if let Some(r) = current {
                return if r.same_as(spec) {
                    Ok((r, false))
                } else {
                    Err(AppError::Conflict(format!(
                        "tenant {tenant} already has a different route {:?}; remove it first",
                        spec.name
                    )))
                };
            }
            let from_position = match spec.from_position {
                Some(p) => p,
                None => self.store().head().await?.next().get(),
            };
            let payload = AddedPayload {
                tenant: tenant.to_string(),
                name: spec.name.clone(),
                partner: spec.partner.clone(),
                event_types: spec.event_types.clone(),
                entity_types: spec.entity_types.clone(),
                subject_prefix: spec
                    .subject_prefix
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SUBJECT_PREFIX.into()),
                stream: spec.stream.clone(),
                format: spec.format.unwrap_or_default(),
                from_position,
                by: by.to_owned(),
            };
            let expected = if version == Version::ZERO {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            };
            match self
                .store()
                .append_to(
                    &system_tenant(),
                    &stream,
                    expected,
                    vec![NewEvent::json(ADDED, &serde_json::json!(payload))],
                )
                .await
            {
                Ok(_) => {
                    self.refresh().await?;
                    let (r, _) = self.current(tenant, &spec.name);
                    return r
                        .map(|r| (r, true))
                        .ok_or_else(|| AppError::internal("an added route vanished"));
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Conflict(format!(
            "route {:?} of tenant {tenant} is being changed concurrently; retry",
            spec.name
        )))
    }

    /// Removes a route; 404 if it does not exist.
    pub async fn remove(&self, tenant: &TenantId, name: &str, by: &str) -> Result<(), AppError> {
        let stream = stream_of(tenant, name)?;
        for _ in 0..5 {
            self.refresh().await?;
            let (current, version) = self.current(tenant, name);
            if current.is_none() {
                return Err(AppError::NotFound(format!(
                    "route {name} of tenant {tenant}"
                )));
            }
            let payload = RemovedPayload {
                tenant: tenant.to_string(),
                name: name.to_owned(),
                by: by.to_owned(),
            };
            match self
                .store()
                .append_to(
                    &system_tenant(),
                    &stream,
                    ExpectedVersion::Exact(version),
                    vec![NewEvent::json(REMOVED, &serde_json::json!(payload))],
                )
                .await
            {
                Ok(_) => {
                    self.refresh().await?;
                    return Ok(());
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppError::Conflict(format!(
            "route {name:?} of tenant {tenant} is being changed concurrently; retry"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracktrace_core::InMemoryStore;

    fn fields(e: AppError) -> Vec<String> {
        match e {
            AppError::Validation(errs) => errs.into_iter().map(|e| e.field).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn validation_lists_every_field_error_and_resolves_defaults() {
        let bad = serde_json::json!({
            "name": "Bad Name", "eventTypes": ["ok", "1bad"], "entityTypes": "Bag",
            "subjectPrefix": "a..b", "stream": "has.dot", "format": "xml",
            "fromPosition": -1, "extra": 1
        });
        let f = fields(validate(bad.to_string().as_bytes()).unwrap_err());
        for want in [
            "name",
            "eventTypes[1]",
            "entityTypes",
            "subjectPrefix",
            "stream",
            "format",
            "fromPosition",
            "extra",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing in {f:?}");
        }
        assert_eq!(fields(validate(b"{}").unwrap_err()), ["name"]);
        assert!(matches!(validate(b"nope"), Err(AppError::Malformed(_))));
        let ok =
            validate(br#"{"name": "sita", "eventTypes": ["BagLoaded", "BagLoaded"]}"#).unwrap();
        assert_eq!(ok.subject_prefix.as_deref(), Some(DEFAULT_SUBJECT_PREFIX));
        assert_eq!(ok.event_types, ["BagLoaded"]);
        assert_eq!(ok.format, Some(RouteFormat::Envelope));
        assert_eq!(ok.from_position, None);
    }

    #[tokio::test]
    async fn add_is_idempotent_conflicts_on_change_and_readds_with_a_new_checkpoint() {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
        let reg = RouteRegistry::new(store.clone());
        let acme = TenantId::parse("acme").unwrap();
        let spec = validate(br#"{"name": "sita", "eventTypes": ["BagLoaded"]}"#).unwrap();
        let (r, created) = reg.add(&acme, &spec, "t").await.unwrap();
        assert!(created);
        assert_eq!(r.subjects(), "tracktrace.acme.*.*");
        let head = store.head().await.unwrap();
        // Default start: after the head when it was added (the route's own event is at head).
        assert_eq!(r.from_position, head.get());
        assert!(!reg.add(&acme, &spec, "t").await.unwrap().1, "idempotent");
        let other = validate(br#"{"name": "sita"}"#).unwrap();
        assert!(matches!(
            reg.add(&acme, &other, "t").await,
            Err(AppError::Conflict(_))
        ));
        // Another process sees the same routes.
        let reg2 = RouteRegistry::new(store.clone());
        assert_eq!(reg2.list(&acme).await.unwrap(), vec![r.clone()]);
        reg.remove(&acme, "sita", "t").await.unwrap();
        assert!(matches!(
            reg.remove(&acme, "sita", "t").await,
            Err(AppError::NotFound(_))
        ));
        assert!(reg2.list(&acme).await.unwrap().is_empty());
        let replay = validate(br#"{"name": "sita", "fromPosition": 0}"#).unwrap();
        let (r2, created) = reg.add(&acme, &replay, "t").await.unwrap();
        assert!(created && r2.from_position == 0);
        assert_ne!(r2.checkpoint(), r.checkpoint());
        reg2.refresh().await.unwrap();
        assert_eq!(reg2.active(), vec![r2]);
        // A name outside the route name rule (non-ASCII here) is the caller's error, a field
        // error, never an internal one.
        for bad in ["sitä", "Sita", "-x", ""] {
            assert!(
                matches!(reg.remove(&acme, bad, "t").await, Err(AppError::Validation(e)) if e[0].field == "name"),
                "{bad:?}"
            );
            assert!(
                matches!(reg.get(&acme, bad).await, Err(AppError::Validation(e)) if e[0].field == "name"),
                "{bad:?}"
            );
        }
    }
}
