//! A saga (process manager) for bag transfers with a durable deadline and a compensation step,
//! all recorded as events in the saga's own stream, on the embedded sled store. Run it with:
//! `cargo run -p tracktrace-examples --example saga`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracktrace_core::{
    BoxError, CommandDispatcher, CommandFailure, DispatchError, EventFilter, EventStoreExt,
    ExpectedVersion, FailureKind, NewEvent, Reaction, RecordedEvent, Saga, SagaRecord, SagaRunner,
    StreamId, TenantId,
};

/// Commands the saga sends to other parts of the system.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum TransferCommand {
    BookConnection { bag: String },
    LoadOnConnection { bag: String },
    ReleaseConnection { bag: String },
    SendToLostAndFound { bag: String },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TransferState {
    bag: String,
    stage: String,
}

/// `TransferRequested` → book the connection and give the bag 300 ms to arrive;
/// `BagArrived` → load it (cancelling the deadline); loading fails → release the booking
/// (compensation); the deadline fires → lost and found.
struct BagTransfer;

impl Saga for BagTransfer {
    const NAME: &'static str = "bag-transfer";
    type State = TransferState;
    type Command = TransferCommand;
    type Failure = CommandFailure;

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_stream_prefix("Bag-")
    }

    fn correlate(&self, e: &RecordedEvent) -> Option<String> {
        Some(e.stream.as_str().to_owned())
    }

    fn on_event(&self, _: &TransferState, e: &RecordedEvent) -> Reaction<Self> {
        let bag = e.stream.as_str().to_owned();
        let stage = |s: &str| TransferState {
            bag: bag.clone(),
            stage: s.into(),
        };
        match e.event_type.as_str() {
            "TransferRequested" => Reaction::new()
                .state(stage("booked"))
                .dispatch(TransferCommand::BookConnection { bag })
                .schedule("transfer-window", Duration::from_millis(300)),
            "BagArrived" => Reaction::new()
                .state(stage("loading"))
                .cancel("transfer-window")
                .dispatch(TransferCommand::LoadOnConnection { bag }),
            _ => Reaction::new(),
        }
    }

    fn on_deadline(&self, state: &TransferState, _deadline: &str) -> Reaction<Self> {
        Reaction::new()
            .state(TransferState {
                stage: "missed".into(),
                ..state.clone()
            })
            .dispatch(TransferCommand::SendToLostAndFound {
                bag: state.bag.clone(),
            })
            .complete()
    }

    fn on_success(&self, _: &TransferState, c: &TransferCommand) -> Reaction<Self> {
        match c {
            TransferCommand::LoadOnConnection { .. } => Reaction::new().complete(),
            _ => Reaction::new(),
        }
    }

    fn on_failure(
        &self,
        state: &TransferState,
        c: &TransferCommand,
        failure: &CommandFailure,
    ) -> Reaction<Self> {
        match c {
            // The connection refused the bag (a domain rule, not an outage): release it.
            TransferCommand::LoadOnConnection { bag } if failure.kind == FailureKind::Rejected => {
                Reaction::new()
                    .state(TransferState {
                        stage: "compensated".into(),
                        ..state.clone()
                    })
                    .compensate(TransferCommand::ReleaseConnection { bag: bag.clone() })
                    .complete()
            }
            _ => Reaction::new(),
        }
    }
}

/// Prints each command; loading always fails ("aircraft full") to show the compensation.
#[derive(Default)]
struct PrintingDispatcher {
    sent: Mutex<Vec<String>>,
}

#[async_trait]
impl CommandDispatcher<TransferCommand> for PrintingDispatcher {
    async fn dispatch(
        &self,
        _tenant: &TenantId,
        dispatch_id: uuid::Uuid,
        command: &TransferCommand,
    ) -> Result<(), DispatchError> {
        println!("  dispatch {command:?} (dispatch id {dispatch_id})");
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{command:?}"));
        match command {
            TransferCommand::LoadOnConnection { .. } => Err(DispatchError::Rejected(
                CommandFailure::rejected("aircraft full").with_code("AircraftFull"),
            )),
            _ => Ok(()),
        }
    }
}

async fn happen(
    store: &impl EventStoreExt,
    tenant: &TenantId,
    bag: &str,
    event_type: &str,
) -> Result<(), BoxError> {
    let stream = StreamId::parse(bag)?;
    let event = NewEvent::json(event_type, &serde_json::json!({}));
    store
        .append_to(tenant, &stream, ExpectedVersion::Any, vec![event])
        .await?;
    Ok(())
}

/// Runs the example; returns the event types of both saga streams.
pub(crate) async fn run() -> Result<(Vec<String>, Vec<String>), BoxError> {
    let store = Arc::new(tracktrace_examples::temporary_store()?);
    let tenant = TenantId::parse("acme-air")?;
    let mut runner = SagaRunner::new(
        store.clone(),
        store.clone(),
        BagTransfer,
        PrintingDispatcher::default(),
    );

    println!("Bag-0001: transfer requested, bag arrives, loading fails -> compensation");
    happen(&*store, &tenant, "Bag-0001", "TransferRequested").await?;
    happen(&*store, &tenant, "Bag-0001", "BagArrived").await?;
    runner.run_once().await?;

    println!("Bag-0002: transfer requested, the bag never arrives -> deadline");
    happen(&*store, &tenant, "Bag-0002", "TransferRequested").await?;
    runner.run_once().await?;
    // Simulate a restart: a new runner rebuilds its timers from the saga streams.
    drop(runner);
    let mut runner = SagaRunner::new(
        store.clone(),
        store.clone(),
        BagTransfer,
        PrintingDispatcher::default(),
    );
    let mut fired = 0;
    for _ in 0..200 {
        fired += runner.run_once().await?.deadlines_fired;
        if fired > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if fired != 1 {
        return Err(format!("expected the deadline to fire once, fired {fired}").into());
    }

    let mut out = Vec::new();
    for bag in ["Bag-0001", "Bag-0002"] {
        let kinds: Vec<String> = runner
            .records(&tenant, bag)
            .await?
            .iter()
            .map(|r| match r {
                SagaRecord::CommandScheduled {
                    command,
                    compensation: true,
                } => {
                    format!("CommandScheduled(compensation: {command:?})")
                }
                SagaRecord::CommandScheduled { command, .. } => {
                    format!("CommandScheduled({command:?})")
                }
                other => format!("{other:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or("")
                    .to_owned(),
            })
            .collect();
        println!("saga events of {bag}:");
        for k in &kinds {
            println!("  {k}");
        }
        out.push(kinds);
    }
    let second = out.pop().unwrap_or_default();
    let first = out.pop().unwrap_or_default();
    Ok((first, second))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await?;
    Ok(())
}
