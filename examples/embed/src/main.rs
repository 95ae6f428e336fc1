//! An application embedding tracktrace: an aggregate (a checked bag), a typed projection (the
//! flight manifest), and a saga (rebooking offloaded bags onto the next flight through the
//! command bus), on the embedded sled store or on PostgreSQL, where the manifest is a real SQL
//! table written in the transaction that moves the projection's checkpoint.
//!
//! ```text
//! cargo run -- sled <directory>
//! cargo run -- postgres <database url> [schema]
//! ```
//!
//! It checks its own results and exits non-zero when something is off.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnection;
use tracktrace_core::{
    Aggregate, Backend, BackendExt, BoxError, BusDispatcher, BusFailure, CommandBus, CommandError,
    Direction, DomainEvent, EventFilter, EventStore, FromBusFailure, JsonCodec, KeyRange,
    ProjectionRunner, Reaction, ReadModelStore, ReadModelTx, RecordedEvent, Repository, RetryLayer,
    Saga, SagaRunner, TenantId, TypedProjection, decode_domain_event,
};
use tracktrace_store_postgres::{PgStore, PgStoreOptions, SqlProjection, SqlProjectionRunner};
use tracktrace_store_sled::{SledOptions, SledStore};

// ---------------------------------------------------------------------------------------------
// The aggregate: one stream per bag, "Bag-<tag>".

/// A checked bag.
#[derive(Clone, Debug, Default)]
struct Bag {
    checked_in: bool,
    on: Option<String>,
}

/// What can be asked of a bag.
enum BagCommand {
    CheckIn { flight: String },
    Load { flight: String },
    Offload,
}

/// What happens to a bag (stored as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum BagEvent {
    CheckedIn { flight: String },
    Loaded { flight: String },
    Offloaded { flight: String },
}

impl DomainEvent for BagEvent {
    fn event_type(&self) -> &'static str {
        match self {
            BagEvent::CheckedIn { .. } => "CheckedIn",
            BagEvent::Loaded { .. } => "Loaded",
            BagEvent::Offloaded { .. } => "Offloaded",
        }
    }
}

/// Why a command was refused.
#[derive(Debug)]
enum BagError {
    AlreadyCheckedIn,
    NotCheckedIn,
    AlreadyLoaded(String),
    NotLoaded,
}

impl fmt::Display for BagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BagError::AlreadyCheckedIn => write!(f, "the bag is already checked in"),
            BagError::NotCheckedIn => write!(f, "the bag is not checked in"),
            BagError::AlreadyLoaded(flight) => write!(f, "the bag is already on {flight}"),
            BagError::NotLoaded => write!(f, "the bag is not loaded"),
        }
    }
}

impl std::error::Error for BagError {}

impl Aggregate for Bag {
    const TYPE: &'static str = "Bag";
    type Command = BagCommand;
    type Event = BagEvent;
    type Error = BagError;
    type Codec = JsonCodec;

    fn handle(&self, command: &BagCommand) -> Result<Vec<BagEvent>, BagError> {
        match command {
            BagCommand::CheckIn { flight } if !self.checked_in => Ok(vec![BagEvent::CheckedIn {
                flight: flight.clone(),
            }]),
            BagCommand::CheckIn { .. } => Err(BagError::AlreadyCheckedIn),
            BagCommand::Load { .. } if !self.checked_in => Err(BagError::NotCheckedIn),
            BagCommand::Load { .. } if self.on.is_some() => {
                Err(BagError::AlreadyLoaded(self.on.clone().unwrap_or_default()))
            }
            BagCommand::Load { flight } => Ok(vec![BagEvent::Loaded {
                flight: flight.clone(),
            }]),
            BagCommand::Offload => match &self.on {
                Some(flight) => Ok(vec![BagEvent::Offloaded {
                    flight: flight.clone(),
                }]),
                None => Err(BagError::NotLoaded),
            },
        }
    }

    fn apply(&mut self, event: &BagEvent) {
        match event {
            BagEvent::CheckedIn { .. } => self.checked_in = true,
            BagEvent::Loaded { flight } => self.on = Some(flight.clone()),
            BagEvent::Offloaded { .. } => self.on = None,
        }
    }
}

fn bags() -> EventFilter {
    EventFilter::default().with_stream_prefix("Bag-")
}

// ---------------------------------------------------------------------------------------------
// The flight manifest, twice: a typed projection into the store's key-value read models (any
// backend), and a SQL projection into a table (PostgreSQL).

/// Key `"{flight}/{bag stream}"` in namespace `manifest` for every bag on board.
struct Manifest;

#[async_trait]
impl TypedProjection for Manifest {
    type Event = BagEvent;
    type Codec = JsonCodec;

    fn name(&self) -> &str {
        "manifest"
    }

    fn filter(&self) -> EventFilter {
        bags()
    }

    fn namespaces(&self) -> Vec<String> {
        vec!["manifest".into()]
    }

    async fn apply(
        &mut self,
        event: &BagEvent,
        meta: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), BoxError> {
        match event {
            BagEvent::Loaded { flight } => {
                tx.put("manifest", format!("{flight}/{}", meta.stream), Vec::new());
            }
            BagEvent::Offloaded { flight } => {
                tx.delete("manifest", format!("{flight}/{}", meta.stream));
            }
            BagEvent::CheckedIn { .. } => {}
        }
        Ok(())
    }
}

/// Table `flight_manifest (flight, bag)`, one row per bag on board.
struct SqlManifest;

#[async_trait]
impl SqlProjection for SqlManifest {
    fn name(&self) -> &str {
        "sql-manifest"
    }

    fn filter(&self) -> EventFilter {
        bags()
    }

    async fn setup(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS flight_manifest (
                 tenant text NOT NULL, flight text NOT NULL, bag text NOT NULL,
                 PRIMARY KEY (tenant, flight, bag))",
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn apply(&mut self, e: &RecordedEvent, conn: &mut PgConnection) -> Result<(), BoxError> {
        // The same typed decoding the command side uses.
        match decode_domain_event::<BagEvent, JsonCodec>("sql-manifest", e)? {
            BagEvent::Loaded { flight } => {
                sqlx::query("INSERT INTO flight_manifest VALUES ($1, $2, $3)")
                    .bind(e.tenant.as_str())
                    .bind(flight)
                    .bind(e.stream.as_str())
                    .execute(conn)
                    .await?;
            }
            BagEvent::Offloaded { flight } => {
                sqlx::query(
                    "DELETE FROM flight_manifest WHERE tenant = $1 AND flight = $2 AND bag = $3",
                )
                .bind(e.tenant.as_str())
                .bind(flight)
                .bind(e.stream.as_str())
                .execute(conn)
                .await?;
            }
            BagEvent::CheckedIn { .. } => {}
        }
        Ok(())
    }

    async fn reset(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
        sqlx::query("TRUNCATE flight_manifest")
            .execute(conn)
            .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The saga: an offloaded bag goes on the next flight.

/// The saga's command: load `bag` (its aggregate id) onto `flight`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Rebook {
    bag: String,
    flight: String,
}

struct Rebooking;

/// Why a rebooking failed, typed: the saga branches on it (recorded in its stream as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum RebookFailure {
    /// The bag is already on a flight (the aggregate's `BagError::AlreadyLoaded`).
    AlreadyOn(String),
    /// Anything else, described.
    Other(String),
}

impl fmt::Display for RebookFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RebookFailure::AlreadyOn(flight) => write!(f, "already on {flight}"),
            RebookFailure::Other(why) => f.write_str(why),
        }
    }
}

/// How the bus dispatcher reports a refused `Load` to the saga: the aggregate's own error.
impl FromBusFailure<BagError> for RebookFailure {
    fn from_bus_failure(failure: BusFailure<'_, BagError>) -> Self {
        match failure {
            BusFailure::Command(CommandError::Rejected(BagError::AlreadyLoaded(flight))) => {
                RebookFailure::AlreadyOn(flight.clone())
            }
            BusFailure::Command(e) => RebookFailure::Other(e.to_string()),
            _ => RebookFailure::Other("no route".into()),
        }
    }
}

impl Saga for Rebooking {
    const NAME: &'static str = "rebooking";
    type State = ();
    type Command = Rebook;
    type Failure = RebookFailure;

    fn filter(&self) -> EventFilter {
        bags().with_event_types(["Offloaded"])
    }

    fn correlate(&self, e: &RecordedEvent) -> Option<String> {
        Some(e.stream.as_str().to_owned())
    }

    fn on_event(&self, _: &(), e: &RecordedEvent) -> Reaction<Self> {
        let Ok(BagEvent::Offloaded { flight }) =
            decode_domain_event::<BagEvent, JsonCodec>(Self::NAME, e)
        else {
            return Reaction::new();
        };
        let bag = e.stream.as_str().trim_start_matches("Bag-").to_owned();
        Reaction::new().dispatch(Rebook {
            bag,
            flight: next_flight(&flight),
        })
    }

    fn on_deadline(&self, _: &(), _: &str) -> Reaction<Self> {
        Reaction::new()
    }

    fn on_failure(&self, _: &(), command: &Rebook, failure: &RebookFailure) -> Reaction<Self> {
        match failure {
            // Someone loaded it meanwhile: nothing to do.
            RebookFailure::AlreadyOn(_) => {}
            RebookFailure::Other(why) => eprintln!("rebooking {} failed: {why}", command.bag),
        }
        Reaction::new()
    }
}

fn next_flight(flight: &str) -> String {
    let (prefix, number) = flight.split_at(2);
    format!("{prefix}{}", number.parse::<u32>().unwrap_or(0) + 1)
}

// ---------------------------------------------------------------------------------------------

/// Checks in, loads and offloads bags, lets the saga rebook, and returns the manifest as
/// `"{flight}/{bag stream}"` entries of the key-value projection. `backend` is one handle for
/// the log, the read models and the snapshots, whatever the store.
async fn run(backend: Arc<dyn Backend>) -> Result<Vec<String>, BoxError> {
    // Retries of transient failures for every capability at once.
    let backend = backend.layer(&RetryLayer::default());
    let events: Arc<dyn EventStore> = backend.clone();
    let read_models: Arc<dyn ReadModelStore> = backend;
    let tenant = TenantId::parse("acme-air")?;
    let bus = CommandBus::new(Repository::<Bag>::new(events.clone()));
    for tag in ["0001", "0002", "0003"] {
        // A new aggregate: one append, no read.
        bus.create(
            &tenant,
            tag,
            BagCommand::CheckIn {
                flight: "IB3170".into(),
            },
        )
        .await?;
        bus.execute(
            &tenant,
            tag,
            BagCommand::Load {
                flight: "IB3170".into(),
            },
        )
        .await?;
    }
    bus.execute(&tenant, "0002", BagCommand::Offload).await?;
    // A domain rule, refused with the aggregate's own error type.
    let refused = bus.execute(&tenant, "0002", BagCommand::Offload).await;
    println!(
        "offloading twice: {}",
        refused
            .map(|_| "accepted".to_string())
            .unwrap_or_else(|e| e.to_string())
    );

    let dispatcher = BusDispatcher::new(bus.clone(), |c: &Rebook| {
        Some((
            c.bag.clone(),
            BagCommand::Load {
                flight: c.flight.clone(),
            },
        ))
    });
    let mut saga = SagaRunner::new(events.clone(), read_models.clone(), Rebooking, dispatcher);
    let progress = saga.run_once().await?;
    println!("saga: {progress:?}");

    let mut manifest = ProjectionRunner::typed(events.clone(), read_models.clone(), Manifest);
    manifest.catch_up().await?;
    let entries = read_models
        .scan("manifest", KeyRange::default(), Direction::Forwards, 100)
        .await?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    Ok(entries)
}

const EXPECTED: [&str; 3] = ["IB3170/Bag-0001", "IB3170/Bag-0003", "IB3171/Bag-0002"];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["sled", dir] => {
            let store = Arc::new(SledStore::open(SledOptions::new(dir))?);
            let manifest = run(store).await?;
            println!("manifest: {manifest:?}");
            check(&manifest)?;
        }
        ["postgres", url, rest @ ..] => {
            let mut opts = PgStoreOptions::new(*url);
            if let [schema] = rest {
                opts = opts.schema(*schema);
            }
            let store = PgStore::connect_with(opts).await?;
            let manifest = run(Arc::new(store.clone())).await?;
            println!("manifest: {manifest:?}");
            check(&manifest)?;
            // The same manifest as a SQL table, queried with SQL.
            let mut runner = SqlProjectionRunner::new(store.clone(), SqlManifest);
            runner.catch_up().await?;
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT flight, bag FROM flight_manifest ORDER BY flight, bag")
                    .fetch_all(store.pool())
                    .await?;
            let sql: Vec<String> = rows.into_iter().map(|(f, b)| format!("{f}/{b}")).collect();
            println!("flight_manifest table: {sql:?}");
            check(&sql)?;
        }
        _ => {
            return Err(
                "usage: tracktrace-embed-example sled <dir> | postgres <url> [schema]".into(),
            );
        }
    }
    Ok(())
}

fn check(manifest: &[String]) -> Result<(), BoxError> {
    if manifest != EXPECTED {
        return Err(format!("expected the manifest {EXPECTED:?}, got {manifest:?}").into());
    }
    Ok(())
}
