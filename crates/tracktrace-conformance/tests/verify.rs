//! `tracktrace_core::verify::verify_store`: a sound store passes; each kind of damage (a lost
//! id-index entry, a stream index pointing elsewhere, an event missing from the log, a wrong
//! stream version) is reported as the finding that names it.

use std::sync::Arc;

use tracktrace_conformance::support::{Intercept, Intercepted};
use tracktrace_core::verify::{Finding, VerifyOptions, verify_store};
use tracktrace_core::{
    AllPage, EventId, EventStore, EventStoreExt, ExpectedVersion, InMemoryStore, NewEvent,
    Position, ReadAll, ReadStream, RecordedEvent, Result, StreamId, TenantId, Version,
};

/// 3 streams of 4 events each, interleaved, over 2 tenants; small pages so the check pages.
async fn filled() -> Arc<InMemoryStore> {
    let store = Arc::new(InMemoryStore::new());
    fill(&store).await;
    store
}

async fn fill(store: &InMemoryStore) {
    for i in 0..4 {
        for (t, s) in [("acme", "Bag-1"), ("acme", "Bag-2"), ("iberia", "Bag-1")] {
            store
                .append_to(
                    &TenantId::parse(t).unwrap(),
                    &StreamId::parse(s).unwrap(),
                    ExpectedVersion::Any,
                    vec![NewEvent::json("SEEN", &serde_json::json!({ "i": i }))],
                )
                .await
                .unwrap();
        }
    }
}

fn opts() -> VerifyOptions {
    VerifyOptions::default().with_page_size(5)
}

#[tokio::test]
async fn a_sound_store_passes_and_progress_is_reported() {
    let store = filled().await;
    let mut pages = 0;
    let report = verify_store(store.as_ref(), &opts(), |p| {
        pages += 1;
        assert!(p.events <= 12 && p.findings == 0);
    })
    .await
    .unwrap();
    assert!(report.is_ok(), "{:?}", report.findings);
    assert_eq!((report.events, report.streams), (12, 3));
    assert!(pages >= 3, "one progress call per page: {pages}");
}

/// Damage: `get_event` loses the event at position `lost`; `read_stream` answers the version
/// after the asked one; `read_all` skips position `skip`; `stream_version` is one too low.
struct Damaged {
    inner: InMemoryStore,
    lost_id: Option<EventId>,
    shifted_stream: bool,
    skip: Option<Position>,
    low_version: bool,
}

#[async_trait::async_trait]
impl Intercept for Damaged {
    type Inner = InMemoryStore;
    fn inner(&self) -> &InMemoryStore {
        &self.inner
    }
    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        if Some(id) == self.lost_id {
            return Ok(None);
        }
        self.inner.get_event(tenant, id).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        let mut events = self.inner.read_stream(req.clone()).await?;
        if self.shifted_stream
            && req.stream.as_str() == "Bag-2"
            && req.from.is_some_and(|v| v > Version::new(2))
        {
            events.clear();
        }
        Ok(events)
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        let mut page = self.inner.read_all(req).await?;
        if let Some(skip) = self.skip {
            page.events.retain(|e| e.position != skip);
        }
        Ok(page)
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        let v = self.inner.stream_version(tenant, stream).await?;
        Ok(match self.low_version && stream.as_str() == "Bag-1" {
            true => Version::new(v.get() - 1),
            false => v,
        })
    }
}

async fn damaged(f: impl FnOnce(&mut Damaged, &[RecordedEvent])) -> Vec<Finding> {
    let mut d = Damaged {
        inner: InMemoryStore::new(),
        lost_id: None,
        shifted_stream: false,
        skip: None,
        low_version: false,
    };
    fill(&d.inner).await;
    let all = d
        .inner
        .read_all(ReadAll::starting_at(Position::START, 100))
        .await
        .unwrap();
    f(&mut d, &all.events);
    let report = verify_store(&Intercepted(d), &opts(), |_| {})
        .await
        .unwrap();
    assert!(!report.is_ok());
    report.findings
}

#[tokio::test]
async fn a_lost_id_index_entry_is_found() {
    let mut lost = None;
    let findings = damaged(|d, all| {
        lost = Some(all[4].event_id);
        d.lost_id = lost;
    })
    .await;
    assert!(
        matches!(&findings[..], [Finding::IdIndex { event_id, detail, .. }] if Some(*event_id) == lost && detail == "not found"),
        "{findings:?}"
    );
}

#[tokio::test]
async fn a_stream_index_missing_events_is_found() {
    let findings = damaged(|d, _| d.shifted_stream = true).await;
    // Bag-2 of acme, versions 3 and 4.
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(
        findings.iter().all(
            |f| matches!(f, Finding::StreamIndex { stream, .. } if stream.as_str() == "Bag-2")
        ),
        "{findings:?}"
    );
}

#[tokio::test]
async fn an_event_missing_from_the_log_is_a_version_gap() {
    let findings = damaged(|d, all| d.skip = Some(all[3].position)).await;
    // all[3] is acme/Bag-1 version 2: version 3 follows version 1.
    assert!(
        matches!(&findings[0], Finding::VersionGap { stream, expected, found, .. }
            if stream.as_str() == "Bag-1" && *expected == Version::new(2) && *found == Version::new(3)),
        "{findings:?}"
    );
}

#[tokio::test]
async fn a_wrong_stream_version_is_found() {
    let findings = damaged(|d, _| d.low_version = true).await;
    // acme/Bag-1 and iberia/Bag-1.
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(
        findings.iter().all(
            |f| matches!(f, Finding::StreamVersion { in_log, reported, .. }
            if *in_log == Version::new(4) && *reported == Version::new(3))
        ),
        "{findings:?}"
    );
}
