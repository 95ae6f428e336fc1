//! Checks with identifiers that collide in careless encodings: keys concatenated without a
//! separator, filters matched by prefix or as SQL patterns, keys or versions truncated.

use std::sync::Arc;
use std::time::Duration;

use tracktrace_core::{
    EventFilter, EventStore, EventStoreExt, ExpectedVersion, Position, ReadAll, ReadStream,
    SubscribeOptions, Subscription, Version, limits,
};

use super::failure::{CheckFailure, CheckResult};
use super::support::*;

/// `(tenant, stream)` pairs whose concatenation is the same string (`ab`+`c-1` and `a`+`bc-1`),
/// and stream ids that contain the separators backends like to use, are distinct streams:
/// versions, reads and `stream_version` never mix them.
pub async fn stream_keys_do_not_collide(store: Arc<dyn EventStore>) -> CheckResult {
    let pairs = [
        ("ab", "c-1"),
        ("a", "bc-1"),
        ("a.b", "c"),
        ("a", "b.c"),
        ("a", "x/y"),
        ("a", "x"),
        ("a", "x:y"),
        ("a", "x|y"),
        ("a", "x y"),
        ("a", "X/Y"),
        ("a", "x\u{ff}y"),
        ("a-b", "c"),
        ("a", "-bc"),
    ];
    for (i, (tn, st)) in pairs.iter().enumerate() {
        // Stream i gets i + 1 events, so any mixing shows in the counts.
        must_append(
            &*store,
            &t(tn),
            &s(st),
            ExpectedVersion::NoStream,
            evs(&format!("K{i}"), i + 1),
        )
        .await?;
    }
    for (i, (tn, st)) in pairs.iter().enumerate() {
        let (tn, st) = (t(tn), s(st));
        let got = ok(store.read_stream_forwards(&tn, &st).await, "read_stream")?;
        ensure_eq!(got.len(), i + 1, "events of {tn}/{st}");
        for e in &got {
            ensure!(
                e.tenant == tn && e.stream == st && e.event_type == format!("K{i}"),
                "{tn}/{st} returned {}/{} {}",
                e.tenant,
                e.stream,
                e.event_type
            );
        }
        let back = ok(
            store
                .read_stream(ReadStream::backwards(tn.clone(), st.clone()))
                .await,
            "read_stream backwards",
        )?;
        ensure_eq!(back.len(), i + 1, "backwards events of {tn}/{st}");
        ensure_eq!(
            ok(store.stream_version(&tn, &st).await, "stream_version")?,
            Version::new(i as u64 + 1),
            "version of {tn}/{st}"
        );
        let only = EventFilter::default()
            .with_tenant(tn.clone())
            .with_stream_prefix(st.as_str());
        let filtered = page_all(&*store, only, 1000).await?;
        ensure!(
            filtered
                .iter()
                .all(|e| e.tenant == tn && e.stream.as_str().starts_with(st.as_str())),
            "read_all filtered on {tn}/{st} returned another tenant or stream"
        );
    }
    // Appending with the version of the colliding stream must conflict.
    let r = store
        .append_to(
            &t("a"),
            &s("bc-1"),
            ExpectedVersion::Exact(Version::new(1)),
            evs("K", 1),
        )
        .await;
    check_conflict(r, ExpectedVersion::Exact(Version::new(1)), Version::new(2))
}

/// A tenant filter matches the tenant exactly: `acme` never returns `acme-eu`'s or `acm`'s
/// events, on `read_all` and on subscriptions.
pub async fn tenant_filter_is_exact(store: Arc<dyn EventStore>) -> CheckResult {
    let tenants = ["acme", "acme-eu", "acm", "acme_", "Acme", "xacme"];
    for tn in tenants {
        must_append(
            &*store,
            &t(tn),
            &s("Bag-1"),
            ExpectedVersion::NoStream,
            vec![ev(&format!("T-{tn}"), 1)],
        )
        .await?;
    }
    for tn in tenants {
        let want = t(tn);
        let got = page_all(&*store, EventFilter::tenant(want.clone()), 2).await?;
        ensure_eq!(got.len(), 1, "events of tenant {tn}");
        ensure!(
            got[0].tenant == want && got[0].event_type == format!("T-{tn}"),
            "tenant filter {tn} returned {}'s event",
            got[0].tenant
        );
    }
    let mut sub = Subscription::new(
        store.clone(),
        SubscribeOptions::default().with_filter(EventFilter::tenant(t("acme"))),
    );
    let e = next_within(&mut sub, "tenant-filtered subscription").await?;
    ensure_eq!(e.tenant.as_str(), "acme", "subscription tenant");
    ensure!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "a subscription filtered on acme returned a second event"
    );
    Ok(())
}

/// A stream prefix is literal text: `_`, `%`, `\` and `*` are ordinary characters (never SQL
/// LIKE or glob patterns) and the match is case-sensitive.
pub async fn stream_prefix_is_literal(store: Arc<dyn EventStore>) -> CheckResult {
    let tn = t("acme");
    let streams = [
        "a_1", "ab1", "a%b", "axb", "A_1", "a\\x", "ax", "a*1", "a.1", "ü-1", "u-1",
    ];
    for st in streams {
        must_append(&*store, &tn, &s(st), ExpectedVersion::NoStream, evs("P", 1)).await?;
    }
    let cases: &[(&str, &[&str])] = &[
        ("a_", &["a_1"]),
        ("a%", &["a%b"]),
        ("%", &[]),
        ("_", &[]),
        ("A", &["A_1"]),
        ("a\\", &["a\\x"]),
        ("a*", &["a*1"]),
        ("a.", &["a.1"]),
        ("ü", &["ü-1"]),
        ("ab1", &["ab1"]),
        ("ab1x", &[]),
    ];
    for (prefix, want) in cases {
        let filter = EventFilter::default()
            .with_tenant(tn.clone())
            .with_stream_prefix(*prefix);
        let got = page_all(&*store, filter, 5).await?;
        let mut got: Vec<&str> = got.iter().map(|e| e.stream.as_str()).collect();
        got.sort_unstable();
        let mut want = want.to_vec();
        want.sort_unstable();
        ensure_eq!(got, want, "streams matching prefix {prefix:?}");
    }
    Ok(())
}

/// Dedup keys are compared in full: keys that share a long prefix (64, 255 bytes) or differ
/// only in case are different keys, and a key of the maximum length deduplicates.
pub async fn dedup_keys_compared_in_full(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("dk-long"));
    let max = limits::MAX_SHORT_STRING_LEN;
    let keys = [
        format!("{}1", "k".repeat(64)),
        format!("{}2", "k".repeat(64)),
        format!("{}1", "k".repeat(max - 1)),
        format!("{}2", "k".repeat(max - 1)),
        "Key".to_string(),
        "key".to_string(),
        "kéy".to_string(),
        "key ".to_string(),
    ];
    // One append per key: keys that collide must not be caught by the batch's own check.
    let mut first = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let out = must_append(
            &*store,
            &tn,
            &st,
            ExpectedVersion::Any,
            vec![ev("D", i as u64).with_dedup_key(k.clone())],
        )
        .await?;
        first.push(out.events[0].clone());
    }
    for (i, k) in keys.iter().enumerate() {
        // A new event id under a stored key is a duplicate of that key's event.
        let again = ok(
            store
                .append_to(
                    &tn,
                    &s("dk-other"),
                    ExpectedVersion::Any,
                    vec![ev("D2", 0).with_dedup_key(k.clone())],
                )
                .await,
            "re-append under a stored key",
        )?;
        ensure!(
            again.duplicate,
            "key #{i} ({} bytes) did not deduplicate",
            k.len()
        );
        ensure_eq!(
            again.events[0],
            first[i],
            "key #{i} points at its own original"
        );
    }
    let stored = ok(store.read_stream_forwards(&tn, &st).await, "read")?;
    let got: Vec<Option<String>> = stored.iter().map(|e| e.dedup_key.clone()).collect();
    let want: Vec<Option<String>> = keys.iter().cloned().map(Some).collect();
    ensure_eq!(got, want, "dedup keys read back intact");
    ensure_eq!(
        stream_len(&*store, &tn, &s("dk-other")).await?,
        0,
        "duplicates stored nothing"
    );
    Ok(())
}

/// Versions and positions are 64-bit: an expected version or a read start that is equal to a
/// real one modulo 2^32 is a different one.
pub async fn versions_are_64_bit(store: Arc<dyn EventStore>) -> CheckResult {
    let (tn, st) = (t("acme"), s("wide-1"));
    let out = must_append(&*store, &tn, &st, ExpectedVersion::NoStream, evs("W", 3)).await?;
    let wide = |v: u64| Version::new(v + (1u64 << 32));
    for v in [0, 1, 3] {
        let expected = ExpectedVersion::Exact(wide(v));
        let r = store.append_to(&tn, &st, expected, evs("W", 1)).await;
        check_conflict(r, expected, Version::new(3))?;
    }
    let r = store
        .append_to(
            &tn,
            &s("wide-new"),
            ExpectedVersion::Exact(wide(0)),
            evs("W", 1),
        )
        .await;
    check_conflict(r, ExpectedVersion::Exact(wide(0)), Version::ZERO)?;
    let got = ok(
        store
            .read_stream(ReadStream::forwards(tn.clone(), st.clone()).from(wide(2)))
            .await,
        "read_stream from 2^32 + 2",
    )?;
    ensure!(
        got.is_empty(),
        "read_stream from 2^32 + 2 returned versions {:?}",
        got.iter().map(|e| e.version.get()).collect::<Vec<_>>()
    );
    let got = ok(
        store
            .read_stream(ReadStream::backwards(tn.clone(), st.clone()).from(wide(2)))
            .await,
        "read_stream backwards from 2^32 + 2",
    )?;
    ensure_eq!(
        got.len(),
        3,
        "backwards from beyond the end reads the whole stream"
    );
    let last = out.last_position().get();
    let page = ok(
        store
            .read_all(ReadAll::starting_at(Position::new(last + (1u64 << 32)), 10))
            .await,
        "read_all from 2^32 past the last event",
    )?;
    ensure!(
        page.events.is_empty(),
        "read_all from 2^32 past the head returned positions {:?}",
        page.events
            .iter()
            .map(|e| e.position.get())
            .collect::<Vec<_>>()
    );
    ensure_eq!(stream_len(&*store, &tn, &st).await?, 3, "nothing appended");
    Ok(())
}
