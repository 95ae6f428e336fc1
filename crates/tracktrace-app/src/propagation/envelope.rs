//! What a published message looks like: its subject and our JSON envelope.
//!
//! Subject: `<subjectPrefix>.<tenant>.<entityType>.<eventType>`, always four tokens after the
//! prefix's own. Tenant ids and event types may contain `.` (the subject separator): inside a
//! token it is written as `~`, which neither may contain, so the mapping is reversible
//! ([`token`], [`untoken`]). Entity types contain neither.
//!
//! Body (`Content-Type: application/json`), e.g.:
//!
//! ```json
//! {"eventId":"01a220e5-70d4-74da-8708-12571128f5d6","tenant":"acme","entityId":"0125123456",
//!  "entityType":"Bag","eventType":"BagLoaded","occurredAt":"2026-11-28T09:40:00+01:00",
//!  "occurredAtUtc":"2026-11-28T08:40:00Z","location":{"code":"MAD"},"source":"BRS-MAD",
//!  "attributes":{"flight":"IB3170"},"receivedAt":"2026-11-28T08:40:01.2Z",
//!  "recordedAt":"2026-11-28T08:40:01.201Z","correlationId":"…","version":1,"position":3}
//! ```
//!
//! Headers: `Nats-Msg-Id` (the event id: JetStream's de-duplication key), `Tt-Tenant`,
//! `Tt-Stream` (the entity's stream), `Tt-Version`, `Tt-Position`, `Tt-Correlation-Id`.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Map, Value};
use tracktrace_core::{EventFilter, RecordedEvent, TenantId};
use tracktrace_nats::publisher::{MessageMapper, OutboundMessage};

use tracktrace_domain::{
    ENTITY_STREAM_PREFIX, Location, OPERATIONAL_EVENT, RelatedEntity, StoredEvent, format_micros,
};

/// A tenant id or event type as one subject token (`.` → `~`).
pub fn token(s: &str) -> Cow<'_, str> {
    if s.contains('.') {
        Cow::Owned(s.replace('.', "~"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The value a subject token stands for (`~` → `.`).
pub fn untoken(s: &str) -> Cow<'_, str> {
    if s.contains('~') {
        Cow::Owned(s.replace('~', "."))
    } else {
        Cow::Borrowed(s)
    }
}

/// The subject of an event: `<prefix>.<tenant>.<entityType>.<eventType>`.
pub fn subject(prefix: &str, tenant: &str, entity_type: &str, event_type: &str) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        token(tenant),
        token(entity_type),
        token(event_type)
    )
}

/// The JSON envelope of a published event.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<'a> {
    /// Event id (also `Nats-Msg-Id`).
    pub event_id: String,
    /// Tenant.
    pub tenant: &'a str,
    /// Entity id.
    pub entity_id: &'a str,
    /// Entity type.
    pub entity_type: &'a str,
    /// The client's event type.
    pub event_type: &'a str,
    /// When it happened, as sent (offset kept).
    pub occurred_at: &'a str,
    /// When it happened, UTC.
    pub occurred_at_utc: String,
    /// Where.
    pub location: &'a Location,
    /// Reporting system.
    pub source: &'a str,
    /// Attributes.
    pub attributes: &'a Map<String, Value>,
    /// Related entities.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub related_entities: &'a [RelatedEntity],
    /// When the server received it, UTC.
    pub received_at: String,
    /// When the store recorded it, UTC.
    pub recorded_at: String,
    /// Correlation id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<&'a str>,
    /// Version in the entity's stream.
    pub version: u64,
    /// Global position.
    pub position: u64,
}

/// Builds the message of a stored operational event for subjects under `prefix`; `None` for
/// any other event (or an undecodable one, logged).
pub fn message(prefix: &str, e: &RecordedEvent) -> Option<(StoredEvent, OutboundMessage)> {
    if e.event_type != OPERATIONAL_EVENT {
        return None;
    }
    let s = match StoredEvent::decode(e) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, position = %e.position, "undecodable operational event not published");
            return None;
        }
    };
    let correlation = e.metadata.correlation_id.as_deref();
    let envelope = Envelope {
        event_id: e.event_id.to_string(),
        tenant: e.tenant.as_str(),
        entity_id: &s.entity_id,
        entity_type: &s.entity_type,
        event_type: &s.event_type,
        occurred_at: &s.occurred_at,
        occurred_at_utc: format_micros(s.occurred_at_us),
        location: &s.location,
        source: &s.source,
        attributes: &s.attributes,
        related_entities: &s.related_entities,
        received_at: format_micros(s.received_at_us),
        recorded_at: format_micros(e.recorded_at.unix_micros()),
        correlation_id: correlation,
        version: e.version.get(),
        position: e.position.get(),
    };
    let payload = serde_json::to_vec(&envelope).ok()?;
    let mut headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("Tt-Tenant".to_owned(), e.tenant.to_string()),
        ("Tt-Stream".to_owned(), e.stream.to_string()),
        ("Tt-Version".to_owned(), e.version.to_string()),
        ("Tt-Position".to_owned(), e.position.to_string()),
    ];
    if let Some(c) = correlation {
        headers.push(("Tt-Correlation-Id".to_owned(), c.to_owned()));
    }
    let msg = OutboundMessage {
        subject: subject(prefix, e.tenant.as_str(), &s.entity_type, &s.event_type),
        payload: payload.into(),
        headers,
        ordering_key: e.stream.to_string(),
    };
    Some((s, msg))
}

/// The mapper of one route (or of the feed): operational events of the selected entity and
/// event types (empty sets: all) as envelopes on the route's subjects.
#[derive(Clone, Debug)]
pub struct RouteMapper {
    /// Subject prefix.
    pub prefix: String,
    /// Event types published (empty: all).
    pub event_types: BTreeSet<String>,
    /// Entity types published (empty: all).
    pub entity_types: BTreeSet<String>,
}

impl RouteMapper {
    /// The log filter a publisher with this mapper reads through: operational events of
    /// `tenant` (every tenant when `None`), narrowed to one entity type's streams when the
    /// route selects exactly one.
    pub fn filter(&self, tenant: Option<&TenantId>) -> EventFilter {
        let prefix = match self.entity_types.iter().next() {
            Some(t) if self.entity_types.len() == 1 => format!("{ENTITY_STREAM_PREFIX}{t}-"),
            _ => ENTITY_STREAM_PREFIX.to_owned(),
        };
        EventFilter::default()
            .with_tenant(tenant.cloned())
            .with_event_types([OPERATIONAL_EVENT])
            .with_stream_prefix(prefix)
    }
}

impl MessageMapper for RouteMapper {
    fn map(&self, event: &RecordedEvent) -> Option<OutboundMessage> {
        let (s, msg) = message(&self.prefix, event)?;
        let wanted = (self.event_types.is_empty() || self.event_types.contains(&s.event_type))
            && (self.entity_types.is_empty() || self.entity_types.contains(&s.entity_type));
        wanted.then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracktrace_core::{EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent, StreamId};

    #[test]
    fn tokens_round_trip_and_subjects_have_four_tokens() {
        assert_eq!(token("acme.eu"), "acme~eu");
        assert_eq!(untoken(&token("acme.eu")), "acme.eu");
        assert_eq!(token("acme"), "acme");
        let s = subject("partners.sita", "acme.eu", "Bag", "BAG.LOADED");
        assert_eq!(s, "partners.sita.acme~eu.Bag.BAG~LOADED");
        assert_eq!(s.split('.').count(), 2 + 3);
    }

    #[tokio::test]
    async fn maps_only_selected_operational_events() {
        let store = InMemoryStore::new();
        let acme = TenantId::parse("acme").unwrap();
        let stored = serde_json::json!({
            "eventType": "BagLoaded", "entityId": "B1", "entityType": "Bag",
            "occurredAt": "2026-11-28T09:40:00+01:00", "occurredAtUs": 1_795_855_200_000_000_i64,
            "location": {"code": "MAD"}, "source": "DCS", "attributes": {"flight": "IB3170"},
            "receivedAtUs": 1_795_855_201_000_000_i64, "submittedBy": "t"
        });
        let mut other = stored.clone();
        other["eventType"] = "BagSeen".into();
        let out = store
            .append_to(
                &acme,
                &StreamId::parse("Entity-Bag-B1").unwrap(),
                ExpectedVersion::Any,
                vec![
                    NewEvent::json(OPERATIONAL_EVENT, &stored),
                    NewEvent::json(OPERATIONAL_EVENT, &other),
                    NewEvent::json("EntityTypeClaimed", &serde_json::json!({})),
                ],
            )
            .await
            .unwrap();
        let events = store
            .read_all_to_end(tracktrace_core::Position::START, Default::default())
            .await
            .unwrap();
        assert_eq!(events.len(), 3, "{out:?}");
        let mapper = RouteMapper {
            prefix: "partners.sita".into(),
            event_types: ["BagLoaded".to_owned()].into(),
            entity_types: BTreeSet::new(),
        };
        let msg = mapper.map(&events[0]).expect("selected");
        assert_eq!(msg.subject, "partners.sita.acme.Bag.BagLoaded");
        assert_eq!(msg.ordering_key, "Entity-Bag-B1");
        let body: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(body["eventId"], events[0].event_id.to_string());
        assert_eq!(body["entityId"], "B1");
        assert_eq!(body["attributes"]["flight"], "IB3170");
        assert_eq!(body["occurredAtUtc"], "2026-11-28T08:40:00Z");
        assert!(mapper.map(&events[1]).is_none(), "event type not routed");
        assert!(mapper.map(&events[2]).is_none(), "not an operational event");
        let filter = mapper.filter(Some(&acme));
        assert!(filter.matches(&events[0]) && !filter.matches(&events[2]));
    }
}
