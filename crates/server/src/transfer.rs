//! `export` and `import`: a store's events as NDJSON, one event per line, in log order.
//!
//! A line holds everything the store keeps of an event: `position`, `tenant`, `stream`,
//! `version`, `eventId`, `dedupKey` (when set), `eventType`, `schemaVersion`, `contentType`,
//! `recordedAt` (µs since the Unix epoch), `metadata` (`correlationId`, `causationId`,
//! `headers`) and the payload: `payload` (the JSON value) when the content type is JSON and
//! the bytes parse, else `payloadHex`.
//!
//! **Export** streams the log page by page (one page in memory), optionally one tenant's
//! events only and only those recorded in a time range ([`ExportScope`]). Written to a file, it resumes: the last complete line's position is where a
//! rerun continues (a torn last line, from a crash mid-write, is cut off first).
//!
//! **Import** appends each line's event with its id, its metadata and its stream version
//! (`ExpectedVersion::Exact(version − 1)`): importing a file twice stores nothing new (every
//! event is answered as a duplicate by id), and an import stopped half-way resumes by running
//! it again. A line that cannot be imported (malformed, or its stream holds other events at
//! that version) is written with the reason to the reject file and counted; the others go on
//! (a refused event's later events in the same stream are refused too: their versions cannot
//! follow it).
//! The target store assigns new positions and `recordedAt` times: the log order and every
//! stream's versions are kept.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::{Map, Value, json};
use tracktrace_core::{
    AppendRequest, CONTENT_TYPE_JSON, Error, EventId, EventStore, ExpectedVersion, Metadata,
    NewEvent, Position, ReadAll, RecordedEvent, StreamId, TenantId, Timestamp, Version,
};

/// One event as an NDJSON line (without the newline).
pub fn event_line(e: &RecordedEvent) -> String {
    let mut o = Map::new();
    o.insert("position".into(), json!(e.position.get()));
    o.insert("tenant".into(), json!(e.tenant.as_str()));
    o.insert("stream".into(), json!(e.stream.as_str()));
    o.insert("version".into(), json!(e.version.get()));
    o.insert("eventId".into(), json!(e.event_id.to_string()));
    if let Some(k) = &e.dedup_key {
        o.insert("dedupKey".into(), json!(k));
    }
    o.insert("eventType".into(), json!(e.event_type));
    o.insert("schemaVersion".into(), json!(e.schema_version));
    o.insert("contentType".into(), json!(e.content_type));
    o.insert("recordedAt".into(), json!(e.recorded_at.unix_micros()));
    o.insert(
        "metadata".into(),
        json!({
            "correlationId": e.metadata.correlation_id,
            "causationId": e.metadata.causation_id,
            "headers": e.metadata.headers,
        }),
    );
    let as_json = (e.content_type == CONTENT_TYPE_JSON)
        .then(|| serde_json::from_slice::<Value>(&e.payload).ok())
        .flatten();
    match as_json {
        Some(v) => o.insert("payload".into(), v),
        None => o.insert("payloadHex".into(), json!(hex(&e.payload))),
    };
    Value::Object(o).to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An event read back from a line: where it goes and what to append.
#[derive(Debug)]
pub struct ImportedEvent {
    /// Its tenant.
    pub tenant: TenantId,
    /// Its stream.
    pub stream: StreamId,
    /// Its version in the stream.
    pub version: Version,
    /// The event.
    pub event: NewEvent,
}

/// Parses one exported line.
pub fn parse_line(line: &str) -> Result<ImportedEvent, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let str_of = |k: &str| -> Result<&str, String> {
        v.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("`{k}`: a string is required"))
    };
    let u64_of = |k: &str| -> Result<u64, String> {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("`{k}`: a non-negative integer is required"))
    };
    let tenant = TenantId::parse(str_of("tenant")?).map_err(|e| format!("`tenant`: {e}"))?;
    let stream = StreamId::parse(str_of("stream")?).map_err(|e| format!("`stream`: {e}"))?;
    let version = u64_of("version")?;
    if version == 0 {
        return Err("`version`: versions start at 1".into());
    }
    let id = EventId::parse(str_of("eventId")?).map_err(|e| format!("`eventId`: {e}"))?;
    let content_type = str_of("contentType")?;
    let payload = match (v.get("payload"), v.get("payloadHex")) {
        (Some(p), None) => p.to_string().into_bytes(),
        (None, Some(Value::String(h))) => unhex(h).ok_or("`payloadHex`: not hexadecimal")?,
        _ => return Err("exactly one of `payload` and `payloadHex` is required".into()),
    };
    let schema_version = u32::try_from(u64_of("schemaVersion")?)
        .map_err(|_| "`schemaVersion`: too large".to_string())?;
    let mut metadata = Metadata::new();
    if let Some(m) = v.get("metadata") {
        if let Some(c) = m.get("correlationId").and_then(Value::as_str) {
            metadata = metadata.with_correlation_id(c);
        }
        if let Some(c) = m.get("causationId").and_then(Value::as_str) {
            metadata = metadata.with_causation_id(c);
        }
        if let Some(h) = m.get("headers").and_then(Value::as_object) {
            for (k, val) in h {
                let val = val
                    .as_str()
                    .ok_or_else(|| format!("`metadata.headers.{k}`: a string is required"))?;
                metadata = metadata.with_header(k.clone(), val);
            }
        }
    }
    let mut event = NewEvent::new_with_id(id, str_of("eventType")?, content_type, payload)
        .with_schema_version(schema_version)
        .with_metadata(metadata);
    if let Some(k) = v.get("dedupKey").and_then(Value::as_str) {
        event = event.with_dedup_key(k);
    }
    Ok(ImportedEvent {
        tenant,
        stream,
        version: Version::new(version),
        event,
    })
}

/// Where an export to `path` resumes: after the position of its last complete line (a torn
/// last line is cut off), or at the start for a new or empty file.
pub fn resume_point(path: &Path) -> std::io::Result<Position> {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(Position::START);
    };
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        f.set_len(complete as u64)?;
        f.seek(SeekFrom::End(0))?;
    }
    let last = text[..complete].lines().next_back();
    Ok(
        match last.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
            Some(v) => v
                .get("position")
                .and_then(Value::as_u64)
                .map_or(Position::START, |p| Position::new(p).next()),
            None => Position::START,
        },
    )
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct Exported {
    /// Events written.
    pub events: u64,
    /// Where the export started.
    pub from: Position,
}

/// Which events an [`export`] writes.
#[derive(Clone, Debug, Default)]
pub struct ExportScope {
    /// Only this tenant's.
    pub tenant: Option<TenantId>,
    /// Only those recorded at or after this time.
    pub since: Option<Timestamp>,
    /// Only those recorded before this time.
    pub until: Option<Timestamp>,
}

/// How far past `until` an export reads before it stops: on PostgreSQL concurrent appends may
/// interleave in position by up to the time an append takes (see
/// [`EventStore::position_at`]).
pub const UNTIL_SLACK: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes the events of `scope` from `from` up to the head read at the start to `out`,
/// calling `progress(events, position, head)` after every page. With `since`, the read starts
/// at [`EventStore::position_at`]`(since)` (or `from`, if later); with `until`, it stops once
/// events are recorded [`UNTIL_SLACK`] past it; both filter on the recorded time exactly.
pub async fn export(
    store: &dyn EventStore,
    scope: &ExportScope,
    from: Position,
    page_size: usize,
    out: &mut impl Write,
    mut progress: impl FnMut(u64, Position, Position),
) -> Result<Exported, String> {
    let head = store.head().await.map_err(|e| e.to_string())?;
    let mut filter = tracktrace_core::EventFilter::default();
    if let Some(t) = &scope.tenant {
        filter = filter.with_tenant(t.clone());
    }
    let from = match scope.since {
        Some(since) => from.max(store.position_at(since).await.map_err(|e| e.to_string())?),
        None => from,
    };
    let stop_at = scope.until.map(|u| {
        Timestamp::from_unix_micros(
            u.unix_micros()
                .saturating_add(i64::try_from(UNTIL_SLACK.as_micros()).unwrap_or(i64::MAX)),
        )
    });
    let in_range = |e: &RecordedEvent| {
        scope.since.is_none_or(|s| e.recorded_at >= s)
            && scope.until.is_none_or(|u| e.recorded_at < u)
    };
    let mut at = from;
    let mut done = Exported { events: 0, from };
    'read: while at <= head {
        let page = store
            .read_all(ReadAll::starting_at(at, page_size.max(1)).filter(filter.clone()))
            .await
            .map_err(|e| e.to_string())?;
        for e in &page.events {
            if e.position > head || stop_at.is_some_and(|s| e.recorded_at >= s) {
                break 'read;
            }
            if !in_range(e) {
                continue;
            }
            writeln!(out, "{}", event_line(e)).map_err(|e| format!("writing: {e}"))?;
            done.events += 1;
        }
        out.flush().map_err(|e| format!("writing: {e}"))?;
        progress(
            done.events,
            page.events.last().map_or(at, |e| e.position),
            head,
        );
        if page.events.is_empty() || page.next <= at {
            break;
        }
        at = page.next;
    }
    Ok(done)
}

/// What an import did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Imported {
    /// Lines read.
    pub lines: u64,
    /// Events stored.
    pub stored: u64,
    /// Events already in the store (same id): nothing written.
    pub duplicates: u64,
    /// Lines written to the reject file.
    pub rejected: u64,
}

/// Imports the lines of `input` into `store` (see the module documentation), writing refused
/// lines with their reason to `rejects`, calling `progress` every 1,000 lines.
pub async fn import(
    store: &dyn EventStore,
    input: impl Read,
    rejects: &mut impl Write,
    mut progress: impl FnMut(&Imported),
) -> Result<Imported, String> {
    let mut done = Imported::default();
    for (n, line) in BufReader::new(input).lines().enumerate() {
        let line = line.map_err(|e| format!("reading line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        done.lines += 1;
        let outcome = match parse_line(&line) {
            Err(why) => Err(why),
            Ok(ev) => {
                let expected = match ev.version.get() {
                    1 => ExpectedVersion::NoStream,
                    v => ExpectedVersion::Exact(Version::new(v - 1)),
                };
                let req = AppendRequest::new(ev.tenant, ev.stream, expected, vec![ev.event]);
                match store.append(req).await {
                    Ok(out) => Ok(out.duplicate),
                    Err(
                        e @ (Error::Conflict { .. }
                        | Error::InvalidInput { .. }
                        | Error::Duplicate { .. }),
                    ) => Err(e.to_string()),
                    Err(e) => return Err(format!("line {}: {e}", n + 1)),
                }
            }
        };
        match outcome {
            Ok(true) => done.duplicates += 1,
            Ok(false) => done.stored += 1,
            Err(why) => {
                done.rejected += 1;
                let reject = json!({"line": n + 1, "error": why, "input": line});
                writeln!(rejects, "{reject}").map_err(|e| format!("writing rejects: {e}"))?;
            }
        }
        if done.lines.is_multiple_of(1000) {
            progress(&done);
        }
    }
    progress(&done);
    rejects
        .flush()
        .map_err(|e| format!("writing rejects: {e}"))?;
    Ok(done)
}

/// The checkpoint (in the target store) of [`migrate`]: the last source position copied.
pub const MIGRATE_CHECKPOINT: &str = "tracktrace.migrate";

/// What a [`migrate`] run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Migrated {
    /// Where this run started in the source (after the target's checkpoint).
    pub from: Position,
    /// Source events read by this run.
    pub events: u64,
    /// Events stored in the target.
    pub stored: u64,
    /// Events the target already held (same id): nothing written.
    pub duplicates: u64,
}

/// `e` as an event to append elsewhere: same id, dedup key, type, schema version, content
/// type, payload and metadata.
pub fn to_new_event(e: &RecordedEvent) -> NewEvent {
    let mut n = NewEvent::new_with_id(
        e.event_id,
        e.event_type.clone(),
        e.content_type.clone(),
        e.payload.clone(),
    )
    .with_schema_version(e.schema_version)
    .with_metadata(e.metadata.clone());
    if let Some(k) = &e.dedup_key {
        n = n.with_dedup_key(k.clone());
    }
    n
}

fn expected_before(v: Version) -> ExpectedVersion {
    match v.get() {
        0 | 1 => ExpectedVersion::NoStream,
        n => ExpectedVersion::Exact(Version::new(n - 1)),
    }
}

/// Appends `run` (consecutive versions of one stream) to `target`; returns (stored,
/// duplicates). A run the target holds in part (an earlier run cut elsewhere) is appended
/// event by event.
async fn copy_run(target: &dyn EventStore, run: &[RecordedEvent]) -> Result<(u64, u64), String> {
    let first = &run[0];
    let req = AppendRequest::new(
        first.tenant.clone(),
        first.stream.clone(),
        expected_before(first.version),
        run.iter().map(to_new_event).collect(),
    );
    match target.append(req).await {
        Ok(out) if out.duplicate => Ok((0, run.len() as u64)),
        Ok(_) => Ok((run.len() as u64, 0)),
        Err(Error::Conflict { .. } | Error::Duplicate { .. }) if run.len() > 1 => {
            let mut counts = (0, 0);
            for e in run {
                let (s, d) = Box::pin(copy_run(target, std::slice::from_ref(e))).await?;
                counts = (counts.0 + s, counts.1 + d);
            }
            Ok(counts)
        }
        Err(e) => Err(format!(
            "{}/{} version {} (source position {}): {e}",
            first.tenant, first.stream, first.version, first.position
        )),
    }
}

/// Copies every event of `source` after the target's [`MIGRATE_CHECKPOINT`] (from the start
/// on the first run) up to the source's head into `target`, page by page: within a page, the
/// runs of consecutive versions of each stream are appended concurrently (at most
/// `concurrency` at a time), each stream's in order, then the checkpoint moves to the page's
/// last position. Ids, metadata, payloads and stream versions are kept; the target assigns
/// positions and recorded times, and events of different streams within one page may be
/// ordered differently in the target. Stopped at any point, a rerun resumes from the
/// checkpoint (a page copied again is answered as duplicates).
pub async fn migrate(
    source: std::sync::Arc<dyn EventStore>,
    target: std::sync::Arc<dyn tracktrace_core::Backend>,
    page_size: usize,
    concurrency: usize,
    mut progress: impl FnMut(&Migrated, Position, Position),
) -> Result<Migrated, String> {
    let err = |e: Error| e.to_string();
    let from = target
        .load_checkpoint(MIGRATE_CHECKPOINT)
        .await
        .map_err(err)?
        .map_or(Position::START, Position::next);
    let head = source.head().await.map_err(err)?;
    let mut done = Migrated {
        from,
        ..Migrated::default()
    };
    let mut at = from;
    while at <= head {
        let page = source
            .read_all(ReadAll::starting_at(at, page_size.max(1)))
            .await
            .map_err(err)?;
        let events: Vec<RecordedEvent> = page
            .events
            .into_iter()
            .take_while(|e| e.position <= head)
            .collect();
        let Some(last) = events.last().map(|e| e.position) else {
            break;
        };
        done.events += events.len() as u64;
        // Runs of consecutive versions per stream, in log order within each stream.
        let mut runs: Vec<Vec<RecordedEvent>> = Vec::new();
        let mut open: std::collections::HashMap<(TenantId, StreamId), usize> =
            std::collections::HashMap::new();
        for e in events {
            let key = (e.tenant.clone(), e.stream.clone());
            match open.get(&key) {
                Some(&i)
                    if runs[i]
                        .last()
                        .is_some_and(|p| p.version.next() == e.version) =>
                {
                    runs[i].push(e);
                }
                _ => {
                    open.insert(key, runs.len());
                    runs.push(vec![e]);
                }
            }
        }
        // Runs of one stream must go in order: a stream's later run waits for its earlier one
        // (rare: only a version gap in the source splits a stream's events in a page).
        let mut tasks = tokio::task::JoinSet::new();
        let mut pending = runs.into_iter();
        let mut busy: std::collections::HashSet<(TenantId, StreamId)> = Default::default();
        let mut waiting: Vec<Vec<RecordedEvent>> = Vec::new();
        loop {
            while tasks.len() < concurrency.max(1) {
                let next = match waiting
                    .iter()
                    .position(|r| !busy.contains(&(r[0].tenant.clone(), r[0].stream.clone())))
                {
                    Some(i) => waiting.remove(i),
                    None => match pending.next() {
                        Some(r) => r,
                        None => break,
                    },
                };
                let key = (next[0].tenant.clone(), next[0].stream.clone());
                if !busy.insert(key.clone()) {
                    waiting.push(next);
                    continue;
                }
                let target = target.clone();
                tasks.spawn(async move { (key, copy_run(target.as_ref(), &next).await) });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (key, counts) = joined.map_err(|e| format!("copy task: {e}"))?;
            let (stored, duplicates) = counts?;
            busy.remove(&key);
            done.stored += stored;
            done.duplicates += duplicates;
        }
        target
            .save_checkpoint(MIGRATE_CHECKPOINT, last)
            .await
            .map_err(err)?;
        progress(&done, last, head);
        if page.next <= at {
            break;
        }
        at = page.next;
    }
    Ok(done)
}
