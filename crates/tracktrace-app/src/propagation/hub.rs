//! The running side: the [`Propagation`] hub held by the application, the supervisors that
//! start and stop one publisher per route and the ingestion consumer, and their status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::task::JoinHandle;
use tracktrace_core::{CheckpointStore, EventFilter, EventStore, Position, TenantId};
use tracktrace_nats::async_nats::{self, jetstream};
use tracktrace_nats::ingest::{IngestConfig, IngestConsumer};
use tracktrace_nats::publisher::{BreakerState, Publisher, PublisherConfig};

use crate::capture::pipeline::CapturePipeline;
use crate::metrics::{Metrics, Samples};
use crate::propagation::config::PropagationConfig;
use crate::propagation::envelope::RouteMapper;
use crate::propagation::ingest::BusPipeline;
use crate::propagation::routes::{RouteInfo, RouteRegistry};

/// Tenant and route names of the feed in [`RouteStatus`].
pub const FEED: (&str, &str) = ("*", "feed");

/// Shortest pause between two looks at the route registry.
const ROUTE_REFRESH_INTERVAL: Duration = Duration::from_millis(250);

/// De-duplication window of the streams the server creates.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// One running route publisher.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// Tenant (`*` for the feed).
    pub tenant: String,
    /// Route name (`feed` for the feed).
    pub route: String,
    /// Breaker state: `closed`, `halfOpen` or `open`.
    #[serde(serialize_with = "breaker_name")]
    pub breaker: BreakerState,
    /// Positions between what the publisher has considered and the store's head (0: caught
    /// up).
    pub lag_positions: u64,
    /// Age in seconds of the oldest event read but not yet acknowledged by JetStream.
    pub lag_seconds: f64,
    /// Checkpoint: every routed event up to here is acknowledged.
    pub position: u64,
    /// Messages JetStream stored.
    pub published: u64,
    /// Messages JetStream dropped as duplicates (redeliveries).
    pub duplicates: u64,
    /// Failed publish attempts.
    pub failures: u64,
}

fn breaker_name<S: serde::Serializer>(b: &BreakerState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match b {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "halfOpen",
        BreakerState::Open => "open",
    })
}

/// The ingestion consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestStatus {
    /// Bound to its stream and consuming (false while NATS could not be reached at start).
    pub consuming: bool,
    /// Messages stored (or recognised as duplicates) and acknowledged.
    pub stored: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Transient failures (redelivered).
    pub retried: u64,
}

/// A snapshot of propagation in this process.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PropagationStatus {
    /// This process publishes (`--nats-publish` in role `processor` or `all`); the route
    /// publishers run only while it leads the background work (see `/readyz`'s `leader`).
    pub publishing: bool,
    /// The ingestion consumer runs here.
    pub ingesting: bool,
    /// NATS connection: `connected`, `disconnected`, `pending` or `none`.
    pub nats: &'static str,
    /// Every route publisher (and the feed) running here.
    pub routes: Vec<RouteStatus>,
    /// The ingestion consumer, if it runs here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestStatus>,
}

impl PropagationStatus {
    /// Whether something is impaired: a breaker not closed, NATS not connected, or the
    /// ingestion consumer not bound.
    pub fn degraded(&self) -> bool {
        ((self.publishing || self.ingesting) && self.nats != "connected")
            || self
                .routes
                .iter()
                .any(|r| r.breaker != BreakerState::Closed)
            || self.ingest.is_some_and(|i| !i.consuming)
    }
}

struct RunningRoute {
    added_at: u64,
    publisher: Publisher,
}

struct Hub {
    routes: RouteRegistry,
    publishing: AtomicBool,
    ingesting: AtomicBool,
    client: Mutex<Option<async_nats::Client>>,
    publishers: Mutex<BTreeMap<(String, String), RunningRoute>>,
    /// Set by [`spawn`] with `publish`: what [`Propagation::spawn_publishers`] needs.
    publish: Mutex<Option<Arc<PublishContext>>>,
    ingest: Mutex<Option<IngestConsumer>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Propagation in one server process (cheap to clone): the route registry, and the route
/// publishers and ingestion consumer when [`spawn`] started them here.
#[derive(Clone)]
pub struct Propagation {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for Propagation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Propagation").finish_non_exhaustive()
    }
}

impl Propagation {
    /// The hub over `store` (the routes are read from it); nothing runs until [`spawn`].
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            hub: Arc::new(Hub {
                routes: RouteRegistry::new(store),
                publishing: AtomicBool::new(false),
                ingesting: AtomicBool::new(false),
                client: Mutex::new(None),
                publishers: Mutex::new(BTreeMap::new()),
                publish: Mutex::new(None),
                ingest: Mutex::new(None),
            }),
        }
    }

    /// The partner-route registry.
    pub fn routes(&self) -> &RouteRegistry {
        &self.hub.routes
    }

    /// A snapshot for `/readyz` and metrics: atomic loads and short locks, no I/O.
    pub fn status(&self) -> PropagationStatus {
        let h = &self.hub;
        let routes = lock(&h.publishers)
            .iter()
            .map(|((tenant, route), r)| {
                let s = r.publisher.status();
                RouteStatus {
                    tenant: tenant.clone(),
                    route: route.clone(),
                    breaker: s.breaker,
                    lag_positions: s.lag_positions,
                    lag_seconds: s.lag_time.as_secs_f64(),
                    position: s.position.get(),
                    published: s.published,
                    duplicates: s.duplicates,
                    failures: s.failures,
                }
            })
            .collect();
        let ingesting = h.ingesting.load(Ordering::Relaxed);
        let ingest = ingesting.then(|| match &*lock(&h.ingest) {
            Some(c) => {
                let s = c.stats();
                IngestStatus {
                    consuming: true,
                    stored: s.stored,
                    dead_lettered: s.dead_lettered,
                    retried: s.retried,
                }
            }
            None => IngestStatus {
                consuming: false,
                stored: 0,
                dead_lettered: 0,
                retried: 0,
            },
        });
        let nats = match &*lock(&h.client) {
            None => "none",
            Some(c) => match c.connection_state() {
                async_nats::connection::State::Connected => "connected",
                async_nats::connection::State::Disconnected => "disconnected",
                async_nats::connection::State::Pending => "pending",
            },
        };
        PropagationStatus {
            publishing: h.publishing.load(Ordering::Relaxed),
            ingesting,
            nats,
            routes,
            ingest,
        }
    }

    /// The `propagation` component of `/readyz` (`None` when nothing propagates here):
    /// the status plus `"status": "ok" | "degraded"`. Degraded never fails readiness (see
    /// the module docs).
    pub fn readiness(&self) -> Option<Value> {
        let s = self.status();
        if !s.publishing && !s.ingesting {
            return None;
        }
        let mut v = serde_json::to_value(&s).ok()?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "status".into(),
                (if s.degraded() { "degraded" } else { "ok" }).into(),
            );
        }
        Some(v)
    }

    /// Starts the route publishers (and the feed) if [`spawn`] prepared publishing: the
    /// server calls it when this process becomes the leader of the background work, and
    /// aborts the task (stopping every publisher) when it stops leading.
    pub fn spawn_publishers(&self) -> Option<JoinHandle<()>> {
        let ctx = lock(&self.hub.publish).clone()?;
        Some(tokio::spawn(supervise_routes(self.clone(), ctx)))
    }

    fn reconcile(&self, active: Vec<RouteInfo>, ctx: &PublishContext) {
        let mut running = lock(&self.hub.publishers);
        let wanted: BTreeMap<(String, String), &RouteInfo> = active
            .iter()
            .map(|r| ((r.tenant.clone(), r.name.clone()), r))
            .collect();
        running.retain(|key, r| {
            let keep = (key.0 == FEED.0 && key.1 == FEED.1)
                || wanted.get(key).is_some_and(|w| w.added_at == r.added_at);
            if !keep {
                tracing::info!(tenant = %key.0, route = %key.1, "partner route stopped");
            }
            keep
        });
        for (key, route) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let Ok(tenant) = TenantId::parse(route.tenant.as_str()) else {
                tracing::error!(tenant = %route.tenant, "route of an invalid tenant id skipped");
                continue;
            };
            let mapper = RouteMapper {
                prefix: route.subject_prefix.clone(),
                event_types: route.event_types.iter().cloned().collect(),
                entity_types: route.entity_types.iter().cloned().collect(),
            };
            let mut pc = ctx.config(
                route.checkpoint(),
                mapper.filter(Some(&tenant)),
                Position::new(route.from_position),
            );
            pc.create_stream = route
                .stream
                .as_ref()
                .map(|s| stream_config(s, route.subjects()));
            tracing::info!(tenant = %route.tenant, route = %route.name, subjects = %route.subjects(),
                from = route.from_position, "partner route started");
            running.insert(
                key,
                RunningRoute {
                    added_at: route.added_at,
                    publisher: ctx.spawn(mapper, pc),
                },
            );
        }
    }
}

fn stream_config(name: &str, subjects: String) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects],
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// What every publisher of this process shares.
struct PublishContext {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    js: jetstream::Context,
    cfg: PropagationConfig,
}

impl PublishContext {
    fn config(&self, name: String, filter: EventFilter, start: Position) -> PublisherConfig {
        let mut pc = PublisherConfig::new(name);
        pc.filter = filter;
        pc.start = start;
        pc.batch_size = self.cfg.batch_size.max(1);
        pc.ack_timeout = self.cfg.ack_timeout;
        pc.breaker_threshold = self.cfg.breaker_failures.max(1);
        pc.breaker_open_for = self.cfg.breaker_open_for;
        pc
    }

    fn spawn(&self, mapper: RouteMapper, pc: PublisherConfig) -> Publisher {
        Publisher::spawn(
            self.store.clone(),
            self.checkpoints.clone(),
            self.js.clone(),
            Arc::new(mapper),
            pc,
        )
    }
}

/// `component` of the publishers in `tracktrace_circuit_breaker_state`: the worst breaker of
/// the routes running in the process.
pub const BREAKER_COMPONENT: &str = "nats_publisher";

type RouteSeries = (&'static str, &'static str, fn(&RouteStatus) -> f64);

/// Exports propagation to `/metrics` (read at scrape time from [`Propagation::status`]):
/// per route `tracktrace_publisher_lag_positions`, `…_lag_seconds` and `…_breaker_state`
/// (labels `tenant`, `route`; the feed is `*`/`feed`), the worst route breaker as
/// `tracktrace_circuit_breaker_state{component="nats_publisher"}`, and
/// `tracktrace_bus_ingest_messages_total{result}` (`stored`, `dead_lettered`, `retried`).
fn register_metrics(prop: &Propagation, m: &Metrics, publishing: bool, ingesting: bool) {
    let weak = Arc::downgrade(&prop.hub);
    let status = move |w: &Weak<Hub>| w.upgrade().map(|hub| Propagation { hub }.status());
    let mut results = Vec::new();
    if publishing {
        let series: [RouteSeries; 3] = [
            (
                "tracktrace_publisher_lag_positions",
                "Log positions a partner-route publisher has still to consider (0: caught up)",
                |r| r.lag_positions as f64,
            ),
            (
                "tracktrace_publisher_lag_seconds",
                "Age of the oldest event a partner-route publisher read but JetStream has not acknowledged",
                |r| r.lag_seconds,
            ),
            (
                "tracktrace_publisher_breaker_state",
                "Breaker of a partner-route publisher: 0 closed, 1 half-open, 2 open",
                |r| f64::from(r.breaker.as_gauge()),
            ),
        ];
        for (name, help, value) in series {
            let w = weak.clone();
            results.push(
                m.register_gauge(name, help, &["tenant", "route"], move |out| {
                    for r in status(&w).map(|s| s.routes).unwrap_or_default() {
                        out.push(&[&r.tenant, &r.route], value(&r));
                    }
                }),
            );
        }
        let w = weak.clone();
        results.push(m.register_breaker(BREAKER_COMPONENT, move || {
            let worst = status(&w)?
                .routes
                .iter()
                .map(|r| r.breaker.as_gauge())
                .max()?;
            Some(match worst {
                0 => tracktrace_core::BreakerState::Closed,
                1 => tracktrace_core::BreakerState::HalfOpen,
                _ => tracktrace_core::BreakerState::Open,
            })
        }));
    }
    if ingesting {
        let w = weak;
        results.push(m.register_counter(
            "tracktrace_bus_ingest_messages_total",
            "Bus ingestion messages handled: stored (or duplicates), dead_lettered, retried",
            &["result"],
            move |out: &mut Samples<'_>| {
                if let Some(i) = status(&w).and_then(|s| s.ingest) {
                    out.push(&["stored"], i.stored as f64);
                    out.push(&["dead_lettered"], i.dead_lettered as f64);
                    out.push(&["retried"], i.retried as f64);
                }
            },
        ));
    }
    for r in results {
        if let Err(e) = r {
            tracing::warn!(error = %e, "propagation metric not exported");
        }
    }
}

/// Stops what a supervisor started when its task ends (aborted at shutdown).
struct StopOnDrop {
    hub: Arc<Hub>,
    publishers: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.publishers {
            lock(&self.hub.publishers).clear();
        } else {
            lock(&self.hub.ingest).take();
        }
    }
}

/// What [`spawn`] runs propagation over.
#[derive(Clone)]
pub struct PropagationDeps {
    /// The event store the publishers read (unwrapped: they have their own breaker).
    pub store: Arc<dyn EventStore>,
    /// Where the publishers keep their checkpoints.
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// The capture pipeline bus ingestion feeds.
    pub capture: CapturePipeline,
    /// The registry the propagation metrics are exported to.
    pub metrics: Metrics,
}

impl std::fmt::Debug for PropagationDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PropagationDeps").finish_non_exhaustive()
    }
}

/// Starts propagation for a `processor` or `all` process: connects to NATS (in the
/// background: an unreachable NATS shows as open breakers, not as a start failure), prepares
/// the route publishers (`publish`; started by [`Propagation::spawn_publishers`] under the
/// background-work leadership) and spawns the ingestion consumer (`ingest`). Returns the
/// tasks to abort at shutdown.
pub async fn spawn(
    cfg: &PropagationConfig,
    prop: &Propagation,
    deps: PropagationDeps,
) -> Result<Vec<JoinHandle<()>>, String> {
    if !cfg.enabled() {
        return Ok(Vec::new());
    }
    let client = async_nats::ConnectOptions::new()
        .name("tracktrace-server")
        .retry_on_initial_connect()
        .connect(cfg.nats_url.as_str())
        .await
        .map_err(|e| format!("NATS at {}: {e}", cfg.nats_url))?;
    let js = jetstream::new(client.clone());
    let prop = prop.clone();
    *lock(&prop.hub.client) = Some(client);
    register_metrics(&prop, &deps.metrics, cfg.publish, cfg.ingest);
    let mut tasks = Vec::new();
    if cfg.publish {
        prop.hub.publishing.store(true, Ordering::Relaxed);
        *lock(&prop.hub.publish) = Some(Arc::new(PublishContext {
            store: deps.store.clone(),
            checkpoints: deps.checkpoints.clone(),
            js: js.clone(),
            cfg: cfg.clone(),
        }));
    }
    if cfg.ingest {
        prop.hub.ingesting.store(true, Ordering::Relaxed);
        let pipeline = Arc::new(BusPipeline::new(deps.capture.clone()));
        let icfg = IngestConfig {
            stream: cfg.ingest_stream.clone(),
            subject_prefix: cfg.ingest_prefix.clone(),
            durable: cfg.ingest_durable.clone(),
            dead_letter_prefix: cfg.dead_letter_prefix.clone(),
            dead_letter_stream: cfg.dead_letter_stream.clone(),
            max_deliver: cfg.ingest_max_deliver.max(1),
            ..IngestConfig::default()
        };
        tasks.push(tokio::spawn(supervise_ingest(prop, js, pipeline, icfg)));
    }
    Ok(tasks)
}

/// Runs the feed and one publisher per active route, following route changes (woken by the
/// store's head notifications, like the tenant registry).
async fn supervise_routes(prop: Propagation, ctx: Arc<PublishContext>) {
    let _stop = StopOnDrop {
        hub: prop.hub.clone(),
        publishers: true,
    };
    if let Some(stream) = &ctx.cfg.feed_stream {
        let start = loop {
            match ctx.store.head().await {
                Ok(h) => break h.next(),
                Err(e) => {
                    tracing::warn!(error = %e, "feed: cannot read the head; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mapper = RouteMapper {
            prefix: ctx.cfg.subject_prefix.clone(),
            event_types: BTreeSet::new(),
            entity_types: BTreeSet::new(),
        };
        let mut pc = ctx.config("propagation.feed".into(), mapper.filter(None), start);
        pc.create_stream = Some(stream_config(
            stream,
            format!("{}.*.*.*", ctx.cfg.subject_prefix),
        ));
        let publisher = ctx.spawn(mapper, pc);
        lock(&prop.hub.publishers).insert(
            (FEED.0.into(), FEED.1.into()),
            RunningRoute {
                added_at: 0,
                publisher,
            },
        );
    }
    // The registry follows its events (a few reads a second at most: route changes are
    // rare, and every refresh reads the log's new part); each change reconciles.
    let follower = AbortOnDrop(tokio::spawn(
        prop.routes().clone().follow(ROUTE_REFRESH_INTERVAL),
    ));
    let mut changes = prop.routes().changes();
    loop {
        changes.borrow_and_update();
        prop.reconcile(prop.routes().active(), &ctx);
        if changes.changed().await.is_err() {
            drop(follower);
            return;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds the ingestion consumer, retrying while NATS is unreachable, then keeps it.
async fn supervise_ingest(
    prop: Propagation,
    js: jetstream::Context,
    pipeline: Arc<BusPipeline>,
    cfg: IngestConfig,
) {
    let _stop = StopOnDrop {
        hub: prop.hub.clone(),
        publishers: false,
    };
    let mut pause = Duration::from_millis(500);
    loop {
        match IngestConsumer::start(js.clone(), pipeline.clone(), cfg.clone()).await {
            Ok(c) => {
                tracing::info!(stream = %cfg.stream, subjects = %format!("{}.*", cfg.subject_prefix), "bus ingestion consuming");
                *lock(&prop.hub.ingest) = Some(c);
                std::future::pending::<()>().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "bus ingestion: cannot bind the consumer; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    }
}
