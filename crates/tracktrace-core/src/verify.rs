//! Integrity of a store, checked through the [`EventStore`] trait alone, so one check serves
//! every backend: [`verify_store`] reads the whole log once and reports what contradicts the
//! store's contract.
//!
//! - **The log**: positions strictly increase and none is past the head read at the start.
//! - **Streams**: every stream's versions in log order are `1, 2, 3, …` (no gap, no repeat);
//!   at the end, each stream's [`EventStore::stream_version`] is its last version in the log.
//! - **Indexes** (unless [`VerifyOptions::with_index_checks`] is off): every event is found by
//!   its id ([`EventStore::get_event`]) and at its version in its stream
//!   ([`EventStore::read_stream`]) as the same event, at the same position. A damaged or lost
//!   index entry shows up here. This costs two reads per event.
//!
//! Memory: one entry (tenant, stream, last version) per stream. Read models are the
//! application's business (it knows what they should hold); this module checks the log.

use std::collections::HashMap;
use std::fmt;

use crate::error::Result;
use crate::event::RecordedEvent;
use crate::id::{EventId, Position, StreamId, TenantId, Version};
use crate::store::{EventStore, ReadAll, ReadStream};

/// What [`verify_store`] checks and how it reads.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// Events per page of the log (default 1,000).
    pub page_size: usize,
    /// Look every event up by id and by stream version (default on).
    pub index_checks: bool,
    /// Findings kept in the report; later ones are only counted (default 100).
    pub max_findings: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            page_size: 1000,
            index_checks: true,
            max_findings: 100,
        }
    }
}

impl VerifyOptions {
    /// With `n` events per page (at least 1).
    pub fn with_page_size(mut self, n: usize) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// With or without the per-event index lookups.
    pub fn with_index_checks(mut self, on: bool) -> Self {
        self.index_checks = on;
        self
    }

    /// Keeping at most `n` findings.
    pub fn with_max_findings(mut self, n: usize) -> Self {
        self.max_findings = n;
        self
    }
}

/// One contradiction found in a store.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// The log returned a position not above the one before it.
    PositionOrder {
        /// The event's position.
        position: Position,
        /// The position before it.
        previous: Position,
    },
    /// A stream's next event in log order does not have the next version.
    VersionGap {
        /// Its tenant.
        tenant: TenantId,
        /// The stream.
        stream: StreamId,
        /// The event's position.
        position: Position,
        /// The version expected (last version + 1).
        expected: Version,
        /// The event's version.
        found: Version,
    },
    /// Looking the event up by id did not find it as it is in the log.
    IdIndex {
        /// Its tenant.
        tenant: TenantId,
        /// The event.
        event_id: EventId,
        /// Its position in the log.
        position: Position,
        /// What the lookup returned instead.
        detail: String,
    },
    /// Reading the event's stream at its version did not return it as it is in the log.
    StreamIndex {
        /// Its tenant.
        tenant: TenantId,
        /// The stream.
        stream: StreamId,
        /// The event's version.
        version: Version,
        /// Its position in the log.
        position: Position,
        /// What the read returned instead.
        detail: String,
    },
    /// A stream's version as the store reports it is not its last version in the log.
    StreamVersion {
        /// Its tenant.
        tenant: TenantId,
        /// The stream.
        stream: StreamId,
        /// The last version in the log.
        in_log: Version,
        /// What [`EventStore::stream_version`] answered.
        reported: Version,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::PositionOrder { position, previous } => {
                write!(f, "log: position {position} follows {previous}")
            }
            Finding::VersionGap {
                tenant,
                stream,
                position,
                expected,
                found,
            } => write!(
                f,
                "stream {tenant}/{stream}: version {found} at position {position}, expected {expected}"
            ),
            Finding::IdIndex {
                tenant,
                event_id,
                position,
                detail,
            } => write!(
                f,
                "id index: event {tenant}/{event_id} (position {position}): {detail}"
            ),
            Finding::StreamIndex {
                tenant,
                stream,
                version,
                position,
                detail,
            } => write!(
                f,
                "stream index: {tenant}/{stream} version {version} (position {position}): {detail}"
            ),
            Finding::StreamVersion {
                tenant,
                stream,
                in_log,
                reported,
            } => write!(
                f,
                "stream {tenant}/{stream}: the store reports version {reported}, the log ends at {in_log}"
            ),
        }
    }
}

/// What [`verify_store`] found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Events read.
    pub events: u64,
    /// Streams seen.
    pub streams: u64,
    /// The last position read.
    pub last_position: Option<Position>,
    /// The first findings, up to [`VerifyOptions::max_findings`].
    pub findings: Vec<Finding>,
    /// Findings beyond those kept.
    pub more_findings: u64,
}

impl VerifyReport {
    /// Whether nothing was found.
    pub fn is_ok(&self) -> bool {
        self.findings.is_empty() && self.more_findings == 0
    }

    fn found(&mut self, max: usize, f: Finding) {
        if self.findings.len() < max {
            self.findings.push(f);
        } else {
            self.more_findings += 1;
        }
    }
}

/// How far [`verify_store`] is, passed to its progress callback after every page.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct VerifyProgress {
    /// Events read so far.
    pub events: u64,
    /// The last position read.
    pub position: Position,
    /// The head the check reads up to.
    pub head: Position,
    /// Findings so far.
    pub findings: u64,
}

/// Checks `store` (see the module documentation), calling `progress` after every page.
/// Errors of the store end the check (`Err`); contradictions are findings in the report.
pub async fn verify_store(
    store: &dyn EventStore,
    options: &VerifyOptions,
    mut progress: impl FnMut(&VerifyProgress) + Send,
) -> Result<VerifyReport> {
    let head = store.head().await?;
    let mut report = VerifyReport::default();
    let mut versions: HashMap<(TenantId, StreamId), Version> = HashMap::new();
    let mut from = Position::START;
    let mut previous: Option<Position> = None;
    'read: loop {
        let page = store
            .read_all(ReadAll::starting_at(from, options.page_size))
            .await?;
        for e in &page.events {
            if e.position > head {
                // Appended since the check started: not part of this check.
                break 'read;
            }
            if let Some(p) = previous
                && e.position <= p
            {
                report.found(
                    options.max_findings,
                    Finding::PositionOrder {
                        position: e.position,
                        previous: p,
                    },
                );
            }
            previous = Some(e.position);
            report.events += 1;
            report.last_position = Some(e.position);
            let last = versions
                .entry((e.tenant.clone(), e.stream.clone()))
                .or_insert(Version::ZERO);
            let expected = last.next();
            if e.version != expected {
                report.found(
                    options.max_findings,
                    Finding::VersionGap {
                        tenant: e.tenant.clone(),
                        stream: e.stream.clone(),
                        position: e.position,
                        expected,
                        found: e.version,
                    },
                );
            }
            *last = e.version;
            if options.index_checks {
                check_indexes(store, options, &mut report, e).await?;
            }
        }
        progress(&VerifyProgress {
            events: report.events,
            position: report.last_position.unwrap_or(Position::START),
            head,
            findings: report.findings.len() as u64 + report.more_findings,
        });
        // Until an empty page: a short page is not trusted to mean the head was reached.
        if page.events.is_empty() || page.next <= from {
            break;
        }
        from = page.next;
    }
    finish(store, options, head, report, versions).await
}

async fn check_indexes(
    store: &dyn EventStore,
    options: &VerifyOptions,
    report: &mut VerifyReport,
    e: &RecordedEvent,
) -> Result<()> {
    let same = |x: &RecordedEvent| {
        x.event_id == e.event_id
            && x.position == e.position
            && x.stream == e.stream
            && x.version == e.version
    };
    let by_id = store.get_event(&e.tenant, e.event_id).await?;
    if !by_id.as_ref().is_some_and(same) {
        report.found(
            options.max_findings,
            Finding::IdIndex {
                tenant: e.tenant.clone(),
                event_id: e.event_id,
                position: e.position,
                detail: describe(by_id.as_ref()),
            },
        );
    }
    let at = store
        .read_stream(
            ReadStream::forwards(e.tenant.clone(), e.stream.clone())
                .from(e.version)
                .limit(1),
        )
        .await?;
    if !at.first().is_some_and(same) {
        report.found(
            options.max_findings,
            Finding::StreamIndex {
                tenant: e.tenant.clone(),
                stream: e.stream.clone(),
                version: e.version,
                position: e.position,
                detail: describe(at.first()),
            },
        );
    }
    Ok(())
}

fn describe(found: Option<&RecordedEvent>) -> String {
    match found {
        None => "not found".into(),
        Some(x) => format!(
            "found {} at {}/{} version {} position {}",
            x.event_id, x.tenant, x.stream, x.version, x.position
        ),
    }
}

/// Compares each stream's reported version with the log. A stream appended to since the check
/// started may be ahead of the log read up to `head`; it is a finding only if the event after
/// the log's last version is missing or was committed at or below `head` (then the log read
/// skipped it).
async fn finish(
    store: &dyn EventStore,
    options: &VerifyOptions,
    head: Position,
    mut report: VerifyReport,
    versions: HashMap<(TenantId, StreamId), Version>,
) -> Result<VerifyReport> {
    report.streams = versions.len() as u64;
    let mut streams: Vec<_> = versions.into_iter().collect();
    streams.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for ((tenant, stream), in_log) in streams {
        let reported = store.stream_version(&tenant, &stream).await?;
        let contradicts = if reported > in_log {
            let after = store
                .read_stream(
                    ReadStream::forwards(tenant.clone(), stream.clone())
                        .from(in_log.next())
                        .limit(1),
                )
                .await?;
            after.first().is_none_or(|x| x.position <= head)
        } else {
            reported < in_log
        };
        if contradicts {
            report.found(
                options.max_findings,
                Finding::StreamVersion {
                    tenant,
                    stream,
                    in_log,
                    reported,
                },
            );
        }
    }
    Ok(report)
}
