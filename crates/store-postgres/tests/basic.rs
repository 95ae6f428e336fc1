//! Quick end-to-end checks of the PostgreSQL store (the full conformance suite is in
//! conformance.rs).

mod common;

use std::sync::Arc;

use tracktrace_core::{
    Error, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, ReadAll, ReadStream,
    StreamId, SubscribeOptions, Subscription, TenantId, Version,
};

fn ev(t: &str) -> NewEvent {
    NewEvent::json(t, &serde_json::json!({"t": t}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_conflict_duplicate() {
    let Some(s) = common::try_store().await else { return };
    let t = TenantId::parse("acme").unwrap();
    let b = StreamId::parse("Bag-1").unwrap();
    let mut e1 = ev("A");
    e1.metadata.correlation_id = Some("corr".into());
    e1.metadata.headers.insert("h".into(), "v".into());
    let out = s
        .append_to(&t, &b, ExpectedVersion::NoStream, vec![e1.clone(), ev("B").with_dedup_key("k1")])
        .await
        .unwrap();
    assert!(!out.duplicate);
    assert_eq!(out.last_version(), Version::new(2));
    assert!(out.events[1].position > out.events[0].position);

    let again = s
        .append_to(&t, &b, ExpectedVersion::NoStream, vec![e1.clone()])
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events[0], out.events[0]);
    // dedup key with another id
    let again = s
        .append_to(&t, &b, ExpectedVersion::Any, vec![ev("X").with_dedup_key("k1")])
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events[0], out.events[1]);
    // partial duplicate
    let err = s
        .append_to(&t, &b, ExpectedVersion::Any, vec![ev("N"), e1.clone()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Duplicate { .. }), "{err:?}");
    // conflict
    let err = s
        .append_to(&t, &b, ExpectedVersion::Exact(Version::new(1)), vec![ev("C")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { actual, .. } if actual == Version::new(2)),
        "{err:?}"
    );
    let err = s
        .append_to(&t, &StreamId::parse("none").unwrap(), ExpectedVersion::StreamExists, vec![ev("C")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual, .. } if actual == Version::ZERO), "{err:?}");
    s.append_to(&t, &b, ExpectedVersion::Exact(Version::new(2)), vec![ev("C")])
        .await
        .unwrap();
    s.append_to(&t, &b, ExpectedVersion::StreamExists, vec![ev("D")])
        .await
        .unwrap();
    s.append_to(&t, &b, ExpectedVersion::Any, vec![ev("E")]).await.unwrap();

    let all = s.read_stream_forwards(&t, &b).await.unwrap();
    let types: Vec<_> = all.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["A", "B", "C", "D", "E"]);
    assert_eq!(all[0].metadata, e1.metadata);
    assert_eq!(all[0].payload, e1.payload);
    assert_eq!(all[1].dedup_key.as_deref(), Some("k1"));
    let back = s
        .read_stream(ReadStream::backwards(t.clone(), b.clone()).from(Version::new(4)).limit(2))
        .await
        .unwrap();
    assert_eq!(back.iter().map(|e| e.version.get()).collect::<Vec<_>>(), [4, 3]);
    assert_eq!(s.stream_version(&t, &b).await.unwrap(), Version::new(5));

    let page = s.read_all(ReadAll::from(Position::START, 3)).await.unwrap();
    assert_eq!(page.events.len(), 3);
    let rest = s.read_all(ReadAll::from(page.next, 100)).await.unwrap();
    assert_eq!(rest.events.len(), 2);
    assert_eq!(s.head().await.unwrap(), rest.events[1].position);
    assert!(rest.next > rest.events[1].position);
    let got = s.get_event(&t, e1.event_id).await.unwrap().unwrap();
    assert_eq!(got, all[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_goes_live() {
    let Some(s) = common::try_store().await else { return };
    let s = Arc::new(s);
    let t = TenantId::parse("acme").unwrap();
    let b = StreamId::parse("Bag-1").unwrap();
    let mut sub = Subscription::new(s.clone(), SubscribeOptions::default());
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                s.append_to(&t, &b, ExpectedVersion::Any, vec![ev(&format!("E{i}"))])
                    .await
                    .unwrap();
            }
        })
    };
    for i in 0..20 {
        assert_eq!(sub.next().await.unwrap().event_type, format!("E{i}"));
    }
    writer.await.unwrap();
}
