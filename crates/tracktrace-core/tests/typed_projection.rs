//! Typed projections: events arrive decoded (after upcasting), and an event that does not
//! decode stops the runner before its batch commits.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracktrace_core::{
    BoxError, CheckpointStore, Codec, DomainEvent, Error, EventFilter, EventStoreExt,
    ExpectedVersion, InMemoryStore, JsonCodec, NewEvent, ProjectionRunner, ReadModelStore,
    ReadModelTx, RecordedEvent, StreamId, TenantId, TypedProjection, Upcasters,
};

#[derive(Debug, Serialize, Deserialize)]
enum Scan {
    /// Version 2: the location is `station`; version 1 called it `at`.
    Seen { station: String },
}

impl DomainEvent for Scan {
    fn event_type(&self) -> &'static str {
        "Seen"
    }
    fn schema_version(&self) -> u32 {
        2
    }
}

/// Last station per bag.
struct LastSeen;

#[async_trait]
impl TypedProjection for LastSeen {
    type Event = Scan;
    type Codec = JsonCodec;

    fn name(&self) -> &str {
        "last-seen"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_stream_prefix("Bag-")
    }

    async fn apply(
        &mut self,
        event: &Scan,
        meta: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        let Scan::Seen { station } = event;
        tx.put("last", meta.stream.as_str(), station.as_bytes());
        Ok(())
    }
}

fn bag(n: u32) -> StreamId {
    StreamId::parse(format!("Bag-{n}")).unwrap()
}

#[tokio::test]
async fn events_arrive_decoded_and_upcast() {
    let store = Arc::new(InMemoryStore::new());
    let tenant = TenantId::from_static("acme");
    let v1 = NewEvent::json("Seen", &serde_json::json!({ "Seen": { "at": "MAD" } }));
    let v2 = JsonCodec::new_event(
        "Seen",
        2,
        &Scan::Seen {
            station: "LHR".into(),
        },
    )
    .unwrap();
    store
        .append_to(&tenant, &bag(1), ExpectedVersion::Any, vec![v1])
        .await
        .unwrap();
    store
        .append_to(&tenant, &bag(2), ExpectedVersion::Any, vec![v2])
        .await
        .unwrap();
    // Not a bag: the filter keeps it away from the typed projection.
    store
        .append_to(
            &tenant,
            &StreamId::from_static("Flight-1"),
            ExpectedVersion::Any,
            vec![NewEvent::json("Departed", &serde_json::json!({}))],
        )
        .await
        .unwrap();
    let upcasters = Upcasters::new().json("Seen", 1, |mut v| {
        let at = v["Seen"]["at"].take();
        v["Seen"] = serde_json::json!({ "station": at });
        Ok(v)
    });
    let mut runner =
        ProjectionRunner::typed(store.clone(), store.clone(), LastSeen).with_upcasters(upcasters);
    runner.catch_up().await.unwrap();
    assert_eq!(
        store.get("last", b"Bag-1").await.unwrap().as_deref(),
        Some(&b"MAD"[..])
    );
    assert_eq!(
        store.get("last", b"Bag-2").await.unwrap().as_deref(),
        Some(&b"LHR"[..])
    );
}

#[tokio::test]
async fn an_event_that_does_not_decode_stops_the_runner_before_commit() {
    let store = Arc::new(InMemoryStore::new());
    let tenant = TenantId::from_static("acme");
    let good = JsonCodec::new_event(
        "Seen",
        2,
        &Scan::Seen {
            station: "LHR".into(),
        },
    )
    .unwrap();
    let bad = NewEvent::json("Seen", &serde_json::json!({ "Lost": {} })).with_schema_version(2);
    store
        .append_to(&tenant, &bag(1), ExpectedVersion::Any, vec![good, bad])
        .await
        .unwrap();
    let mut runner = ProjectionRunner::typed(store.clone(), store.clone(), LastSeen);
    let err = runner.catch_up().await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("last-seen"), "{msg}");
    assert!(
        std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<Error>())
            .is_some_and(|e| matches!(e, Error::Corruption { .. })),
        "a decoding failure is Error::Corruption: {err:?}"
    );
    // Nothing of the batch was committed: not even the good event before it.
    assert_eq!(store.get("last", b"Bag-1").await.unwrap(), None);
    assert_eq!(store.load_checkpoint("last-seen").await.unwrap(), None);
}
