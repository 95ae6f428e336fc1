//! The assembled application (`background::start`) over the in-memory store: what runs where
//! and which services the background work uses.

use std::sync::Arc;
use std::time::Duration;

use tracktrace_app::access::system_tenant;
use tracktrace_app::background::{self, RuntimeConfig, Stores};
use tracktrace_app::milestone::{CaptureDispatcher, MilestoneWatch, OVERDUE};
use tracktrace_app::{Actor, App, CaptureRequest, Scope};
use tracktrace_core::{
    EventStore, EventStoreExt, InMemoryStore, LocalLeases, RecordedEvent, SagaRunner, TenantId,
};
use tracktrace_domain::{StoredEvent, entity_stream, format_micros};

async fn started() -> (Arc<InMemoryStore>, App, background::Background) {
    let store = Arc::new(InMemoryStore::new());
    let stores = Stores {
        store: store.clone(),
        leases: Arc::new(LocalLeases::new()),
        backend: "memory",
    };
    let mut cfg = RuntimeConfig::default();
    cfg.analytics.schedule = false;
    let (app, bg) = background::start(&stores, &cfg).await.unwrap();
    (store, app, bg)
}

fn now_us() -> i64 {
    tracktrace_core::Timestamp::now().unix_micros()
}

async fn loaded_an_hour_ago(app: &App, bag: &str) {
    let writer = Actor::new(
        "brs",
        TenantId::parse("acme").unwrap(),
        vec![Scope::EventsWrite],
    );
    let body = serde_json::json!({
        "entityId": bag, "entityType": "Bag", "eventType": "LOADED",
        "occurredAt": format_micros(now_us() - 3_600_000_000), "location": {"code": "MAD"},
    })
    .to_string();
    app.capture(&writer, CaptureRequest::json(body.as_bytes()))
        .await
        .unwrap();
}

/// The stored events of `bag`'s stream (type, attributes).
async fn entity_events(store: &InMemoryStore, bag: &str) -> Vec<StoredEvent> {
    store
        .read_stream_forwards(
            &TenantId::parse("acme").unwrap(),
            &entity_stream("Bag", bag).unwrap(),
        )
        .await
        .unwrap()
        .iter()
        .map(|e| StoredEvent::decode(e).unwrap())
        .collect()
}

async fn saga_records(store: &InMemoryStore, bag: &str) -> Vec<RecordedEvent> {
    let stream =
        SagaRunner::<MilestoneWatch, CaptureDispatcher>::stream_id(&format!("Bag-{bag}")).unwrap();
    store
        .read_stream_forwards(&TenantId::parse("acme").unwrap(), &stream)
        .await
        .unwrap()
}

/// Waits (bounded) until `done` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    for _ in 0..500 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The milestone watch the background work runs captures its alarms through the
/// application's capture service, so a tenant's attribute schema for `MILESTONE_OVERDUE`
/// applies to them as to any client's capture: an alarm the schema refuses is not stored
/// (recorded as a failed command), one it accepts is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milestone_alarms_are_checked_against_the_tenants_schema() {
    let (store, app, _bg) = started().await;
    let admin = Actor::new("ops", system_tenant(), vec![Scope::Admin]);
    app.tenants()
        .create(&TenantId::parse("acme").unwrap(), "t")
        .await
        .unwrap();
    app.milestones()
        .put_rule(
            &admin,
            "acme",
            "bag-arrival",
            br#"{"entityType": "Bag", "triggerEventType": "LOADED",
                "expectedEventTypes": ["ARRIVED"], "within": "PT1M"}"#,
        )
        .await
        .unwrap();
    // Every overdue alarm of acme must name a gate: the watch's alarms do not.
    app.put_schema(
        &admin,
        "acme",
        OVERDUE,
        br#"{"type": "object", "required": ["gate"]}"#,
    )
    .await
    .unwrap();
    loaded_an_hour_ago(&app, "B1").await;
    eventually("the refused alarm's failure record", || async {
        saga_records(&store, "B1")
            .await
            .iter()
            .any(|e| e.event_type == "SagaCommandFailed")
    })
    .await;
    let failed = saga_records(&store, "B1").await;
    let failure = failed
        .iter()
        .find(|e| e.event_type == "SagaCommandFailed")
        .unwrap();
    let text = String::from_utf8_lossy(&failure.payload);
    assert!(text.contains("gate"), "{text}");
    assert!(
        entity_events(&store, "B1")
            .await
            .iter()
            .all(|e| e.event_type != OVERDUE),
        "the refused alarm was stored"
    );

    // A schema the alarm satisfies: B2's alarm is stored.
    app.put_schema(
        &admin,
        "acme",
        OVERDUE,
        br#"{"type": "object", "required": ["rule", "deadline"]}"#,
    )
    .await
    .unwrap();
    loaded_an_hour_ago(&app, "B2").await;
    eventually("B2's alarm", || async {
        entity_events(&store, "B2")
            .await
            .iter()
            .any(|e| e.event_type == OVERDUE)
    })
    .await;
}

/// With a single-process store the process leads at once; readiness says so.
#[tokio::test]
async fn a_local_store_leads_at_once() {
    let (_store, app, _bg) = started().await;
    eventually("leadership", || async {
        app.readiness().await.unwrap().get("leader") == Some(&1u64.into())
    })
    .await;
    let head = app.store().head().await.unwrap();
    assert_eq!(
        app.readiness().await.unwrap()["head"],
        serde_json::json!(head.get())
    );
}
