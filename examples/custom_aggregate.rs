//! A custom aggregate (a checked bag) behind a `CommandBus`: validation, domain rules, retries,
//! snapshots and idempotent commands, on the embedded sled store. Run it with:
//! `cargo run -p tracktrace-examples --example custom_aggregate`

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{
    Aggregate, CommandBus, CommandError, CommandMeta, DomainEvent, FieldError, JsonCodec,
    Repository, TenantId,
};

/// The aggregate: a checked bag. State only holds what the rules need.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Bag {
    checked_in: bool,
    flight: Option<String>,
    loads: u32,
}

/// What a bag can be asked to do.
#[derive(Debug)]
pub(crate) enum BagCommand {
    CheckIn { airport: String },
    Load { flight: String },
}

/// What happened to a bag (stored as JSON, one event type per variant).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum BagEvent {
    CheckedIn { airport: String },
    Loaded { flight: String },
}

impl DomainEvent for BagEvent {
    fn event_type(&self) -> &'static str {
        match self {
            BagEvent::CheckedIn { .. } => "BagCheckedIn",
            BagEvent::Loaded { .. } => "BagLoaded",
        }
    }
}

/// Domain rule violations.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BagError {
    #[error("the bag is already checked in")]
    AlreadyCheckedIn,
    #[error("the bag must be checked in before it is loaded")]
    NotCheckedIn,
}

impl Aggregate for Bag {
    const TYPE: &'static str = "Bag";
    type Command = BagCommand;
    type Event = BagEvent;
    type Error = BagError;
    type Codec = JsonCodec;

    fn handle(&self, command: &BagCommand) -> Result<Vec<BagEvent>, BagError> {
        match command {
            BagCommand::CheckIn { .. } if self.checked_in => Err(BagError::AlreadyCheckedIn),
            BagCommand::CheckIn { airport } => Ok(vec![BagEvent::CheckedIn {
                airport: airport.clone(),
            }]),
            BagCommand::Load { .. } if !self.checked_in => Err(BagError::NotCheckedIn),
            // Loading onto the flight it is already on is a no-op: no event.
            BagCommand::Load { flight } if self.flight.as_ref() == Some(flight) => Ok(vec![]),
            BagCommand::Load { flight } => Ok(vec![BagEvent::Loaded {
                flight: flight.clone(),
            }]),
        }
    }

    fn apply(&mut self, event: &BagEvent) {
        match event {
            BagEvent::CheckedIn { .. } => self.checked_in = true,
            BagEvent::Loaded { flight } => {
                self.flight = Some(flight.clone());
                self.loads += 1;
            }
        }
    }
}

/// Field checks before anything is loaded (the HTTP layer turns these into a 400).
fn validate(command: &BagCommand) -> Vec<FieldError> {
    let mut errors = Vec::new();
    match command {
        BagCommand::CheckIn { airport } if airport.len() != 3 => {
            errors.push(FieldError::new("airport", "must be a 3-letter IATA code"))
        }
        BagCommand::Load { flight } if flight.is_empty() => {
            errors.push(FieldError::new("flight", "must not be empty"))
        }
        _ => {}
    }
    errors
}

/// Runs the example; returns the final state of the bag.
pub(crate) async fn run() -> Result<Bag, Box<dyn std::error::Error>> {
    let store = Arc::new(tracktrace_examples::temporary_store()?);
    let bus = CommandBus::new(
        Repository::<Bag>::new(store.clone())
            .with_snapshots(store.clone(), 3) // a snapshot every 3 events
            .with_cache(1_000),
    )
    .with_validator(validate);
    let tenant = TenantId::parse("acme-air")?;

    let out = bus
        .execute(
            &tenant,
            "0001",
            BagCommand::CheckIn {
                airport: "MAD".into(),
            },
        )
        .await?;
    println!(
        "checked in: stream {} at version {}",
        out.stream, out.version
    );

    match bus
        .execute(
            &tenant,
            "0001",
            BagCommand::CheckIn {
                airport: "MADRID".into(),
            },
        )
        .await
    {
        Err(CommandError::Validation { errors }) => println!("validation errors: {errors:?}"),
        other => return Err(format!("expected a validation error, got {other:?}").into()),
    }
    match bus
        .execute(
            &tenant,
            "0001",
            BagCommand::CheckIn {
                airport: "MAD".into(),
            },
        )
        .await
    {
        Err(CommandError::Rejected(e)) => println!("rejected by the domain: {e}"),
        other => return Err(format!("expected a rejection, got {other:?}").into()),
    }

    // Eight loads at once (two flights alternately): conflicts are retried with backoff.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (bus, tenant) = (bus.clone(), tenant.clone());
        let flight = if i % 2 == 0 { "IB3170" } else { "IB3171" }.to_owned();
        tasks.push(tokio::spawn(async move {
            bus.execute(&tenant, "0001", BagCommand::Load { flight })
                .await
        }));
    }
    let mut attempts = 0;
    for t in tasks {
        attempts += t.await??.attempts;
    }
    println!("8 concurrent loads done in {attempts} attempts in total");

    // The same command id twice: stored once, the second answer says "duplicate".
    let meta = CommandMeta::with_command_id(uuid::Uuid::now_v7());
    let load = || BagCommand::Load {
        flight: "UX1097".into(),
    };
    let first = bus
        .execute_with(&tenant, "0001", load(), meta.clone())
        .await?;
    let again = bus.execute_with(&tenant, "0001", load(), meta).await?;
    println!(
        "idempotent command: first duplicate={}, retry duplicate={}",
        first.duplicate, again.duplicate
    );

    let loaded = bus.repository().load(&tenant, "0001").await?;
    let replayed = bus.repository().replay(&tenant, "0001").await?;
    println!(
        "final state at version {}: {:?} (snapshot + tail equals a full replay: {})",
        loaded.version,
        loaded.state,
        loaded.state.loads == replayed.state.loads && loaded.version == replayed.version
    );
    Ok(loaded.state)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    run().await?;
    Ok(())
}
