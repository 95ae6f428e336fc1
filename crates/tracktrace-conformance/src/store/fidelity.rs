//! Checks that every read path returns exactly what was appended, with fields at their
//! documented maxima and streams longer than any page size a backend might cap reads at.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use tracktrace_core::{
    EventFilter, EventStore, EventStoreExt, ExpectedVersion, Metadata, NewEvent, PagedReads,
    Position, ReadAll, ReadStream, RecordedEvent, StreamId, SubscribeOptions, Subscription,
    TenantId, Version, limits,
};

use super::failure::{CheckFailure, CheckResult};
use super::support::*;

/// A string of exactly `len` bytes mixing cases, digits, punctuation and two-byte characters.
fn text(len: usize, seed: usize) -> String {
    const PARTS: [&str; 8] = ["Ab", "ü", "Z9", "-_", "é", "Q'", "\"x", "\\"];
    let mut s = String::with_capacity(len);
    let mut i = seed;
    while s.len() < len {
        let part = PARTS[i % PARTS.len()];
        if s.len() + part.len() <= len {
            s.push_str(part);
        } else {
            s.push('a');
        }
        i += 1;
    }
    s
}

/// Events whose every field is at its documented maximum (or a tricky value) beside small
/// and empty ones.
fn extreme_events() -> Vec<NewEvent> {
    use limits::*;
    let mut headers = BTreeMap::new();
    for i in 0..MAX_HEADERS {
        // Keys that differ only in case, at the longest key length, and long values with
        // newlines, tabs, quotes and non-ASCII text.
        let key = match i {
            0 => "Source".to_string(),
            1 => "source".to_string(),
            2 => "SOURCE".to_string(),
            _ => format!("{:03}{}", i, text(MAX_SHORT_STRING_LEN - 3, i)),
        };
        let value = match i {
            0 => String::new(),
            1 => "line 1\nline 2\ttab \"quoted\" \\ back".to_string(),
            _ => text(MAX_HEADER_VALUE_LEN, i),
        };
        headers.insert(key, value);
    }
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let big = NewEvent::new(
        text(MAX_EVENT_TYPE_LEN, 1),
        text(MAX_SHORT_STRING_LEN, 2),
        payload,
    )
    .with_dedup_key(text(MAX_SHORT_STRING_LEN, 3))
    .with_schema_version(MAX_SCHEMA_VERSION)
    .with_metadata(
        Metadata::new()
            .with_correlation_id(text(MAX_SHORT_STRING_LEN, 4))
            .with_causation_id(text(MAX_SHORT_STRING_LEN, 5))
            .with_headers(headers),
    );
    let mut one_header = BTreeMap::new();
    one_header.insert("k".to_string(), "V".to_string());
    vec![
        big,
        NewEvent::new("Empty", "application/octet-stream", Bytes::new()),
        NewEvent::new("Zeros", "application/octet-stream", vec![0u8; 300])
            .with_schema_version(2)
            .with_metadata(
                Metadata::new()
                    .with_causation_id("c")
                    .with_headers(one_header),
            ),
        ev("Small", 7),
    ]
}

/// Compares a read event with what was appended and where the append put it.
fn same_event(
    what: &str,
    got: &RecordedEvent,
    sent: &NewEvent,
    tenant: &TenantId,
    stream: &StreamId,
    at: &tracktrace_core::EventRef,
) -> CheckResult {
    ensure_eq!(got.tenant, *tenant, "{what}: tenant");
    ensure_eq!(got.stream, *stream, "{what}: stream");
    ensure_eq!(got.version, at.version, "{what}: version");
    ensure_eq!(got.position, at.position, "{what}: position");
    ensure_eq!(got.event_id, sent.event_id, "{what}: event id");
    ensure_eq!(got.dedup_key, sent.dedup_key, "{what}: dedup key");
    ensure_eq!(got.event_type, sent.event_type, "{what}: event type");
    ensure_eq!(
        got.schema_version,
        sent.schema_version,
        "{what}: schema version"
    );
    ensure_eq!(got.content_type, sent.content_type, "{what}: content type");
    ensure!(
        got.payload == sent.payload,
        "{what}: payload differs ({} bytes read, {} sent)",
        got.payload.len(),
        sent.payload.len()
    );
    ensure_eq!(
        got.metadata.correlation_id,
        sent.metadata.correlation_id,
        "{what}: correlation id"
    );
    ensure_eq!(
        got.metadata.causation_id,
        sent.metadata.causation_id,
        "{what}: causation id"
    );
    ensure_eq!(
        got.metadata.headers.len(),
        sent.metadata.headers.len(),
        "{what}: number of headers"
    );
    for (k, v) in &sent.metadata.headers {
        ensure!(
            got.metadata.headers.get(k) == Some(v),
            "{what}: header {:?} ({} bytes) read back as {:?}",
            k.chars().take(16).collect::<String>(),
            v.len(),
            got.metadata
                .headers
                .get(k)
                .map(|v| v.chars().take(16).collect::<String>())
        );
    }
    Ok(())
}

/// Events with every field at its documented maximum (and tricky values: header keys that
/// differ only in case, newlines and quotes, the highest schema version, empty payloads) read
/// back identical on every read path: `read_stream` both ways, `get_event`, `read_all`
/// (unfiltered and filtered by tenant, by several types and by prefix) and a subscription.
pub async fn full_events_on_every_read_path(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("Full-1"));
    // Something else in the log first, so positions and filters matter.
    must_append(
        &*store,
        &t("other"),
        &st,
        ExpectedVersion::Any,
        evs("Small", 2),
    )
    .await?;
    let sent = extreme_events();
    let out = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, sent.clone()).await?;
    let refs = out.events;
    let check_all = |what: &str, got: &[RecordedEvent], order: &[usize]| -> CheckResult {
        ensure_eq!(got.len(), order.len(), "{what}: number of events");
        for (g, &i) in got.iter().zip(order) {
            same_event(&format!("{what} #{i}"), g, &sent[i], &tn, &st, &refs[i])?;
        }
        Ok(())
    };
    let n = sent.len();
    let fwd: Vec<usize> = (0..n).collect();
    let bwd: Vec<usize> = (0..n).rev().collect();
    check_all(
        "read_stream forwards",
        &ok(store.read_stream_forwards(&tn, &st).await, "read_stream")?,
        &fwd,
    )?;
    check_all(
        "read_stream backwards",
        &ok(
            store
                .read_stream(ReadStream::backwards(tn.clone(), st.clone()))
                .await,
            "read_stream backwards",
        )?,
        &bwd,
    )?;
    for (i, e) in sent.iter().enumerate() {
        let got = ok(store.get_event(&tn, e.event_id).await, "get_event")?;
        let Some(got) = got else {
            return Err(CheckFailure(format!("get_event #{i}: not found")));
        };
        same_event(&format!("get_event #{i}"), &got, e, &tn, &st, &refs[i])?;
    }
    let filters = [
        ("read_all", EventFilter::default()),
        ("read_all by tenant", EventFilter::tenant(tn.clone())),
        (
            "read_all by types",
            EventFilter::default()
                .with_tenant(tn.clone())
                .with_event_types(sent.iter().map(|e| e.event_type.clone())),
        ),
        (
            "read_all by prefix",
            EventFilter::default()
                .with_tenant(tn.clone())
                .with_stream_prefix("Full-"),
        ),
    ];
    for (what, filter) in filters {
        let all = page_all(&*store, filter, 3).await?;
        let mine: Vec<RecordedEvent> = all.into_iter().filter(|e| e.tenant == tn).collect();
        check_all(what, &mine, &fwd)?;
    }
    let mut sub = Subscription::new(
        store.clone(),
        SubscribeOptions::default()
            .with_filter(EventFilter::tenant(tn.clone()))
            .with_batch_size(2),
    );
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(next_within(&mut sub, "subscription").await?);
    }
    check_all("subscription", &got, &fwd)
}

/// Streams longer than any page size a backend might cap reads at: 1,500 events read in full
/// forwards and backwards, from a version past 1,000, and in one `read_all` page.
pub async fn long_streams_read_in_full(store: Arc<dyn EventStore>) -> CheckResult {
    const LEN: usize = 1_500;
    let (tn, st) = (t("acme"), s("Long-1"));
    let mut sent = Vec::with_capacity(LEN);
    for chunk in 0..3 {
        let events = evs("L", LEN / 3);
        sent.extend(events.iter().map(|e| e.event_id));
        let expected = if chunk == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(Version::new((chunk * LEN / 3) as u64))
        };
        must_append(&*store, &tn, &st, expected, events).await?;
    }
    let fwd = ok(store.read_stream_forwards(&tn, &st).await, "read_stream")?;
    ensure_eq!(fwd.len(), LEN, "read_stream forwards without a limit");
    ensure!(ids(&fwd) == sent, "read_stream forwards order");
    let bwd = ok(
        store
            .read_stream(ReadStream::backwards(tn.clone(), st.clone()))
            .await,
        "read_stream backwards",
    )?;
    ensure_eq!(bwd.len(), LEN, "read_stream backwards without a limit");
    ensure!(
        ids(&bwd).into_iter().rev().collect::<Vec<_>>() == sent,
        "read_stream backwards order"
    );
    let mid = ok(
        store
            .read_stream(
                ReadStream::forwards(tn.clone(), st.clone())
                    .from(Version::new(1_201))
                    .limit(1_000),
            )
            .await,
        "read_stream from 1,201",
    )?;
    ensure_eq!(mid.len(), 300, "read_stream from 1,201 to the end");
    ensure_eq!(mid[0].version, Version::new(1_201), "first version read");
    let page = ok(
        store
            .read_all(ReadAll::starting_at(Position::START, 2_000))
            .await,
        "read_all",
    )?;
    ensure_eq!(
        page.events.len(),
        LEN,
        "one read_all page with a limit above the log's length"
    );
    let page = ok(
        store
            .read_all(ReadAll::starting_at(Position::START, 1_200))
            .await,
        "read_all",
    )?;
    ensure_eq!(page.events.len(), 1_200, "a read_all page of 1,200");
    ensure_eq!(
        ok(store.stream_version(&tn, &st).await, "stream_version")?,
        Version::new(LEN as u64),
        "stream version"
    );
    Ok(())
}

/// Drains a paged read, failing past `cap` events (a broken store must not make the check
/// run forever).
async fn drain<S: futures_core::Stream<Item = tracktrace_core::Result<RecordedEvent>>>(
    stream: S,
    cap: usize,
    what: &str,
) -> Result<Vec<RecordedEvent>, CheckFailure> {
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(e) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        out.push(ok(e, what)?);
        ensure!(
            out.len() <= cap,
            "{what}: more than the {cap} events it should return"
        );
    }
    Ok(out)
}

/// The paged adaptors (`read_stream_pages`, `read_all_pages`) over the backend's own paging
/// return exactly what one unpaged read returns, for every page size, direction, start and
/// limit, and with a filter that skips most of the log.
pub async fn paged_reads_match_full_reads(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("Paged-1"));
    for chunk in 0..3 {
        must_append(&*store, &tn, &st, ExpectedVersion::Any, evs("P", 17)).await?;
        must_append(
            &*store,
            &t("other"),
            &s(&format!("Noise-{chunk}")),
            ExpectedVersion::Any,
            evs("N", 11),
        )
        .await?;
    }
    let requests = [
        ReadStream::forwards(tn.clone(), st.clone()),
        ReadStream::backwards(tn.clone(), st.clone()),
        ReadStream::forwards(tn.clone(), st.clone())
            .from(Version::new(5))
            .limit(23),
        ReadStream::backwards(tn.clone(), st.clone())
            .from(Version::new(40))
            .limit(100),
        ReadStream::backwards(tn.clone(), st.clone()).limit(9),
        ReadStream::forwards(tn.clone(), st.clone()).from(Version::new(52)),
        ReadStream::forwards(tn.clone(), st.clone()).from(Version::new(60)),
        ReadStream::forwards(tn.clone(), s("Paged-none")),
    ];
    for req in requests {
        let want = ids(&ok(store.read_stream(req.clone()).await, "read_stream")?);
        for page in [1, 2, 7, 51, 1000] {
            let got = drain(
                store.read_stream_pages(req.clone(), page),
                want.len(),
                "read_stream_pages",
            )
            .await?;
            ensure!(
                ids(&got) == want,
                "read_stream_pages({req:?}, page {page}) returned {} events, read_stream {}",
                got.len(),
                want.len()
            );
        }
    }
    let filters = [
        EventFilter::default(),
        EventFilter::tenant(tn.clone()),
        EventFilter::default().with_event_types(["N"]),
    ];
    for filter in filters {
        let want = ids(&all_events_filtered(&*store, filter.clone()).await?);
        for page in [1, 3, 17, 1000] {
            let got = drain(
                store.read_all_pages(Position::START, filter.clone(), page),
                want.len(),
                "read_all_pages",
            )
            .await?;
            ensure!(
                ids(&got) == want,
                "read_all_pages({filter:?}, page {page}) returned {} events, read_all {}",
                got.len(),
                want.len()
            );
        }
    }
    Ok(())
}

async fn all_events_filtered(
    store: &dyn EventStore,
    filter: EventFilter,
) -> Result<Vec<RecordedEvent>, CheckFailure> {
    ok(
        store.read_all_to_end(Position::START, filter).await,
        "read_all to end",
    )
}
