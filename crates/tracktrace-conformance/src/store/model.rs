//! Model-based property test: random operation sequences run against the store under test
//! and a plain, obviously-correct model; every result is compared after every step.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use super::failure::CheckFailure;
use tracktrace_core::{
    AppendOutcome, Error, EventFilter, EventId, EventStore, ExpectedVersion, Metadata, NewEvent,
    Position, ReadAll, ReadStream, RecordedEvent, StreamId, TenantId, Version,
};

const TENANTS: [&str; 2] = ["ta", "tb"];
const STREAMS: [&str; 3] = ["Bag-1", "Bag-2", "Uld-1"];
const TYPES: [&str; 3] = ["A", "B", "C"];
/// Stream prefixes the `read_all` filters use (matching one, two or all streams).
const PREFIXES: [&str; 4] = ["Bag-", "Bag-1", "Uld", "B"];

#[derive(Debug, Clone)]
enum Exp {
    Any,
    NoStream,
    StreamExists,
    ExactCurrent,
    Exact(u64),
}

#[derive(Debug, Clone)]
enum EvSpec {
    Fresh {
        ty: usize,
        dedup: Option<u8>,
    },
    /// Reuses the id of an earlier generated event (index modulo the number generated).
    ReuseId(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        tenant: usize,
        stream: usize,
        expected: Exp,
        events: Vec<EvSpec>,
    },
    ReadStream {
        tenant: usize,
        stream: usize,
        backwards: bool,
        from: Option<u64>,
        limit: usize,
    },
    ReadAll {
        from_index: usize,
        limit: usize,
        tenant: Option<usize>,
        /// Bit `i` set: type `i` is in the filter (0: no type filter).
        types: u8,
        prefix: Option<usize>,
    },
    Version {
        tenant: usize,
        stream: usize,
    },
    Get {
        tenant: usize,
        pick: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let exp = prop_oneof![
        1 => Just(Exp::Any),
        1 => Just(Exp::NoStream),
        1 => Just(Exp::StreamExists),
        3 => Just(Exp::ExactCurrent),
        1 => (0u64..5).prop_map(Exp::Exact),
    ];
    let ev = prop_oneof![
        5 => (0..TYPES.len(), proptest::option::weighted(0.3, 0u8..4))
            .prop_map(|(ty, dedup)| EvSpec::Fresh { ty, dedup }),
        1 => any::<usize>().prop_map(EvSpec::ReuseId),
    ];
    prop_oneof![
        5 => (0..2usize, 0..3usize, exp, proptest::collection::vec(ev, 1..4))
            .prop_map(|(tenant, stream, expected, events)| Op::Append { tenant, stream, expected, events }),
        2 => (0..2usize, 0..3usize, any::<bool>(), proptest::option::of(0u64..8), 0usize..6)
            .prop_map(|(tenant, stream, backwards, from, limit)| Op::ReadStream { tenant, stream, backwards, from, limit }),
        2 => (0usize..30, 1usize..8, proptest::option::of(0..2usize), 0u8..8, proptest::option::weighted(0.3, 0..PREFIXES.len()))
            .prop_map(|(from_index, limit, tenant, types, prefix)| Op::ReadAll { from_index, limit, tenant, types, prefix }),
        1 => (0..2usize, 0..3usize).prop_map(|(tenant, stream)| Op::Version { tenant, stream }),
        1 => (0..2usize, any::<usize>()).prop_map(|(tenant, pick)| Op::Get { tenant, pick }),
    ]
}

#[derive(Debug, Clone)]
struct MEvent {
    tenant: usize,
    stream: usize,
    version: u64,
    id: EventId,
    dedup: Option<String>,
    ty: usize,
}

/// The model: a plain vector of events; position `i` of the model is index `i` of `log`.
#[derive(Default)]
struct Model {
    log: Vec<MEvent>,
}

enum MOutcome {
    Appended(Vec<usize>),
    Duplicate(Vec<usize>),
    Conflict {
        expected: ExpectedVersion,
        actual: u64,
    },
    DuplicateErr {
        id: EventId,
        existing: usize,
    },
    Invalid,
}

impl Model {
    fn version(&self, tenant: usize, stream: usize) -> u64 {
        self.log
            .iter()
            .filter(|e| e.tenant == tenant && e.stream == stream)
            .count() as u64
    }

    fn append(
        &mut self,
        tenant: usize,
        stream: usize,
        expected: ExpectedVersion,
        events: &[(EventId, Option<String>, usize)],
    ) -> MOutcome {
        for (i, a) in events.iter().enumerate() {
            for b in &events[i + 1..] {
                if a.0 == b.0 || (a.1.is_some() && a.1 == b.1) {
                    return MOutcome::Invalid;
                }
            }
        }
        let found: Vec<Option<usize>> = events
            .iter()
            .map(|(id, dedup, _)| {
                self.log
                    .iter()
                    .position(|e| e.tenant == tenant && e.id == *id)
                    .or_else(|| {
                        dedup.as_ref().and_then(|k| {
                            self.log
                                .iter()
                                .position(|e| e.tenant == tenant && e.dedup.as_ref() == Some(k))
                        })
                    })
            })
            .collect();
        if found.iter().all(Option::is_some) {
            return MOutcome::Duplicate(found.into_iter().flatten().collect());
        }
        if let Some((i, Some(existing))) = found.iter().enumerate().find(|(_, f)| f.is_some()) {
            return MOutcome::DuplicateErr {
                id: events[i].0,
                existing: *existing,
            };
        }
        let actual = self.version(tenant, stream);
        if !expected.accepts(Version::new(actual)) {
            return MOutcome::Conflict { expected, actual };
        }
        let mut idx = Vec::new();
        for (i, (id, dedup, ty)) in events.iter().enumerate() {
            idx.push(self.log.len());
            self.log.push(MEvent {
                tenant,
                stream,
                version: actual + 1 + i as u64,
                id: *id,
                dedup: dedup.clone(),
                ty: *ty,
            });
        }
        MOutcome::Appended(idx)
    }
}

struct Case {
    store: Arc<dyn EventStore>,
    model: Model,
    /// Actual position of model index `i`.
    positions: Vec<Position>,
    generated: Vec<EventId>,
    /// What was sent for each stored (tenant, event id): payload, metadata, schema and content
    /// type.
    sent: HashMap<(usize, EventId), NewEvent>,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn tenant(i: usize) -> TenantId {
    TenantId::parse(TENANTS[i]).expect("valid")
}

fn stream(i: usize) -> StreamId {
    StreamId::parse(STREAMS[i]).expect("valid")
}

impl Case {
    fn check_event(&self, got: &RecordedEvent, idx: usize, ctx: &str) -> Result<(), TestCaseError> {
        let m = &self.model.log[idx];
        let ok = got.event_id == m.id
            && got.tenant == tenant(m.tenant)
            && got.stream == stream(m.stream)
            && got.version == Version::new(m.version)
            && got.event_type == TYPES[m.ty]
            && got.dedup_key == m.dedup
            && got.position == self.positions[idx]
            && self.sent.get(&(m.tenant, m.id)).is_some_and(|sent| {
                got.payload == sent.payload
                    && got.metadata == sent.metadata
                    && got.schema_version == sent.schema_version
                    && got.content_type == sent.content_type
            });
        if ok {
            Ok(())
        } else {
            Err(fail(format!(
                "{ctx}: got {got:?}, model has {m:?} at {}",
                self.positions[idx]
            )))
        }
    }

    fn check_events(
        &self,
        got: &[RecordedEvent],
        want: &[usize],
        ctx: &str,
    ) -> Result<(), TestCaseError> {
        if got.len() != want.len() {
            return Err(fail(format!(
                "{ctx}: got {} events, model has {}: {:?}",
                got.len(),
                want.len(),
                got.iter().map(|e| e.event_id).collect::<Vec<_>>()
            )));
        }
        for (g, &i) in got.iter().zip(want) {
            self.check_event(g, i, ctx)?;
        }
        Ok(())
    }

    fn check_refs(
        &self,
        got: &AppendOutcome,
        want: &[usize],
        ctx: &str,
    ) -> Result<(), TestCaseError> {
        if got.events.len() != want.len() {
            return Err(fail(format!(
                "{ctx}: {} refs, model has {}",
                got.events.len(),
                want.len()
            )));
        }
        for (r, &i) in got.events.iter().zip(want) {
            let m = &self.model.log[i];
            if r.event_id != m.id
                || r.stream != stream(m.stream)
                || r.version != Version::new(m.version)
                || r.position != self.positions[i]
            {
                return Err(fail(format!(
                    "{ctx}: ref {r:?} differs from model {m:?} at {}",
                    self.positions[i]
                )));
            }
        }
        Ok(())
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let ctx = format!("{op:?}");
        match op {
            Op::Append {
                tenant: tn,
                stream: st,
                expected,
                events,
            } => {
                let current = self.model.version(*tn, *st);
                let expected = match expected {
                    Exp::Any => ExpectedVersion::Any,
                    Exp::NoStream => ExpectedVersion::NoStream,
                    Exp::StreamExists => ExpectedVersion::StreamExists,
                    Exp::ExactCurrent => ExpectedVersion::Exact(Version::new(current)),
                    Exp::Exact(v) => ExpectedVersion::Exact(Version::new(*v)),
                };
                let mut spec = Vec::new();
                let mut new_events = Vec::new();
                for e in events {
                    let (id, dedup, ty) = match e {
                        EvSpec::ReuseId(i) if !self.generated.is_empty() => {
                            (self.generated[i % self.generated.len()], None, 0)
                        }
                        EvSpec::ReuseId(_) => (EventId::new(), None, 0),
                        EvSpec::Fresh { ty, dedup } => {
                            (EventId::new(), dedup.map(|d| format!("k{d}")), *ty)
                        }
                    };
                    let n = self.generated.len();
                    self.generated.push(id);
                    // Contents vary with `n`, so an event read back with another's payload or
                    // metadata is caught.
                    let mut headers = BTreeMap::new();
                    if !n.is_multiple_of(3) {
                        headers.insert(format!("H{}", n % 4), format!("v{n}"));
                        headers.insert(format!("h{}", n % 4), "x".repeat((n % 7) * 50));
                    }
                    let mut metadata = Metadata::new().with_headers(headers);
                    metadata.correlation_id = (n % 2 == 1).then(|| format!("corr-{n}"));
                    metadata.causation_id = (n % 5 == 1).then(|| format!("cause-{n}"));
                    let mut ne = NewEvent::new(
                        TYPES[ty],
                        if n.is_multiple_of(2) {
                            tracktrace_core::CONTENT_TYPE_JSON
                        } else {
                            "application/x-test"
                        },
                        format!("{{\"n\":{n}}}").into_bytes(),
                    )
                    .with_id(id)
                    .with_schema_version(1 + (n % 3) as u32)
                    .with_metadata(metadata);
                    ne.dedup_key = dedup.clone();
                    new_events.push(ne);
                    spec.push((id, dedup, ty));
                }
                let want = self.model.append(*tn, *st, expected, &spec);
                let want_desc = match &want {
                    MOutcome::Appended(_) => "appended",
                    MOutcome::Duplicate(_) => "duplicate outcome",
                    MOutcome::Conflict { .. } => "conflict",
                    MOutcome::DuplicateErr { .. } => "Duplicate error",
                    MOutcome::Invalid => "InvalidInput",
                };
                let got = self
                    .store
                    .append(tracktrace_core::AppendRequest::new(
                        tenant(*tn),
                        stream(*st),
                        expected,
                        new_events.clone(),
                    ))
                    .await;
                match (want, got) {
                    (MOutcome::Appended(idx), Ok(out)) if !out.duplicate => {
                        for e in &new_events {
                            self.sent.insert((*tn, e.event_id), e.clone());
                        }
                        for (r, _) in out.events.iter().zip(&idx) {
                            if let Some(last) = self.positions.last()
                                && r.position <= *last
                            {
                                return Err(fail(format!(
                                    "{ctx}: position {} not above the previous {last}",
                                    r.position
                                )));
                            }
                            self.positions.push(r.position);
                        }
                        self.check_refs(&out, &idx, &ctx)?;
                    }
                    (MOutcome::Duplicate(idx), Ok(out)) if out.duplicate => {
                        self.check_refs(&out, &idx, &ctx)?
                    }
                    (
                        MOutcome::Conflict {
                            expected: e,
                            actual: a,
                        },
                        Err(Error::Conflict {
                            expected, actual, ..
                        }),
                    ) => {
                        if e != expected || Version::new(a) != actual {
                            return Err(fail(format!(
                                "{ctx}: conflict {expected}/{actual}, model {e}/{a}"
                            )));
                        }
                    }
                    (
                        MOutcome::DuplicateErr { id, existing },
                        Err(Error::Duplicate {
                            event_id,
                            existing: r,
                        }),
                    ) => {
                        if id != event_id
                            || r.position != self.positions[existing]
                            || r.event_id != self.model.log[existing].id
                        {
                            return Err(fail(format!(
                                "{ctx}: Duplicate({event_id}, {r:?}), model ({id}, index {existing})"
                            )));
                        }
                    }
                    (MOutcome::Invalid, Err(Error::InvalidInput { .. })) => {}
                    (_, got) => {
                        return Err(fail(format!(
                            "{ctx}: store returned {got:?}, model says {want_desc}"
                        )));
                    }
                }
            }
            Op::ReadStream {
                tenant: tn,
                stream: st,
                backwards,
                from,
                limit,
            } => {
                let mut idx: Vec<usize> = (0..self.model.log.len())
                    .filter(|&i| self.model.log[i].tenant == *tn && self.model.log[i].stream == *st)
                    .collect();
                if *backwards {
                    idx.reverse();
                    if let Some(f) = from {
                        idx.retain(|&i| self.model.log[i].version <= *f);
                    }
                } else if let Some(f) = from {
                    idx.retain(|&i| self.model.log[i].version >= *f);
                }
                idx.truncate(*limit);
                let got = self
                    .store
                    .read_stream({
                        let (tn, st) = (tenant(*tn), stream(*st));
                        let req = if *backwards {
                            ReadStream::backwards(tn, st)
                        } else {
                            ReadStream::forwards(tn, st)
                        };
                        let req = req.limit(*limit);
                        match from {
                            Some(v) => req.from(Version::new(*v)),
                            None => req,
                        }
                    })
                    .await
                    .map_err(|e| fail(format!("{ctx}: {e}")))?;
                self.check_events(&got, &idx, &ctx)?;
            }
            Op::ReadAll {
                from_index,
                limit,
                tenant: tn,
                types,
                prefix,
            } => {
                let from = self
                    .positions
                    .get(*from_index)
                    .copied()
                    .unwrap_or(Position::START);
                let start = if *from_index < self.positions.len() {
                    *from_index
                } else {
                    0
                };
                let type_set: Vec<usize> =
                    (0..TYPES.len()).filter(|i| types & (1 << i) != 0).collect();
                let matching: Vec<usize> = (start..self.model.log.len())
                    .filter(|&i| {
                        let m = &self.model.log[i];
                        tn.is_none_or(|t| m.tenant == t)
                            && (type_set.is_empty() || type_set.contains(&m.ty))
                            && prefix.is_none_or(|p| STREAMS[m.stream].starts_with(PREFIXES[p]))
                    })
                    .collect();
                let mut filter = EventFilter::default()
                    .with_tenant(tn.map(tenant))
                    .with_event_types(type_set.iter().map(|&t| TYPES[t]));
                if let Some(p) = prefix {
                    filter = filter.with_stream_prefix(PREFIXES[*p]);
                }
                // Two pages: the second starts at the first's `next`.
                let mut from = from;
                for (page_no, want) in matching
                    .chunks(*limit)
                    .chain(std::iter::once(&[][..]))
                    .take(2)
                    .enumerate()
                {
                    let page = self
                        .store
                        .read_all(ReadAll::starting_at(from, *limit).filter(filter.clone()))
                        .await
                        .map_err(|e| fail(format!("{ctx}: page {page_no}: {e}")))?;
                    self.check_events(&page.events, want, &format!("{ctx}: page {page_no}"))?;
                    if page.next < from {
                        return Err(fail(format!(
                            "{ctx}: next {} went back from {from}",
                            page.next
                        )));
                    }
                    if page.events.len() < *limit {
                        break;
                    }
                    from = page.next;
                }
            }
            Op::Version {
                tenant: tn,
                stream: st,
            } => {
                let got = self
                    .store
                    .stream_version(&tenant(*tn), &stream(*st))
                    .await
                    .map_err(|e| fail(format!("{ctx}: {e}")))?;
                let want = Version::new(self.model.version(*tn, *st));
                if got != want {
                    return Err(fail(format!("{ctx}: version {got}, model {want}")));
                }
            }
            Op::Get { tenant: tn, pick } => {
                if self.generated.is_empty() {
                    return Ok(());
                }
                let id = self.generated[pick % self.generated.len()];
                let got = self
                    .store
                    .get_event(&tenant(*tn), id)
                    .await
                    .map_err(|e| fail(format!("{ctx}: {e}")))?;
                let want = self
                    .model
                    .log
                    .iter()
                    .position(|e| e.tenant == *tn && e.id == id);
                match (got, want) {
                    (None, None) => {}
                    (Some(g), Some(i)) => self.check_event(&g, i, &ctx)?,
                    (g, w) => {
                        return Err(fail(format!("{ctx}: get_event {g:?}, model index {w:?}")));
                    }
                }
            }
        }
        let head = self
            .store
            .head()
            .await
            .map_err(|e| fail(format!("head: {e}")))?;
        let want = self.positions.last().copied().unwrap_or(Position::START);
        if head != want {
            return Err(fail(format!("after {ctx}: head {head}, expected {want}")));
        }
        Ok(())
    }
}

/// Runs `cases` random operation sequences against fresh stores from `make`, comparing every
/// result with the model. Returns the minimal failing sequence on failure.
pub fn model_test<F, Fut>(make: F, cases: u32) -> Result<(), CheckFailure>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn EventStore>>,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = proptest::collection::vec(op_strategy(), 1..40);
    let result = runner.run(&strategy, |ops| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| fail(format!("runtime: {e}")))?;
        rt.block_on(async {
            let mut case = Case {
                store: make().await,
                model: Model::default(),
                positions: Vec::new(),
                generated: Vec::new(),
                sent: HashMap::new(),
            };
            for op in &ops {
                case.step(op).await?;
            }
            let all = tracktrace_core::EventStoreExt::read_all_to_end(
                &*case.store,
                Position::START,
                EventFilter::default(),
            )
            .await
            .map_err(|e| fail(format!("final read_all: {e}")))?;
            let every: Vec<usize> = (0..case.model.log.len()).collect();
            case.check_events(&all, &every, "final read_all")
        })
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, ops)) => Err(CheckFailure(format!(
            "{reason}\nminimal failing operations: {ops:#?}"
        ))),
        Err(TestError::Abort(reason)) => Err(CheckFailure(format!("model test aborted: {reason}"))),
    }
}
