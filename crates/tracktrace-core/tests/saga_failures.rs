//! Typed saga failures: what a [`BusDispatcher`] reports for each kind of permanent failure,
//! as the default [`CommandFailure`] and as a saga's own failure type built from the target
//! aggregate's error ([`FromBusFailure`]).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracktrace_core::{
    Aggregate, BusDispatcher, BusFailure, CommandBus, CommandDispatcher, CommandError,
    CommandFailure, DispatchError, DomainEvent, FailureKind, FieldError, FromBusFailure,
    InMemoryStore, JsonCodec, Repository, SagaRecord, TenantId,
};
use uuid::Uuid;

#[derive(Clone, Debug, Default)]
struct Seat {
    taken: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum SeatEvent {
    Taken,
}

impl DomainEvent for SeatEvent {
    fn event_type(&self) -> &'static str {
        "Taken"
    }
}

#[derive(Debug, PartialEq)]
enum SeatError {
    AlreadyTaken,
}

impl fmt::Display for SeatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the seat is taken")
    }
}

impl std::error::Error for SeatError {}

impl Aggregate for Seat {
    const TYPE: &'static str = "Seat";
    type Command = String;
    type Event = SeatEvent;
    type Error = SeatError;
    type Codec = JsonCodec;

    fn handle(&self, _passenger: &String) -> Result<Vec<SeatEvent>, SeatError> {
        if self.taken {
            Err(SeatError::AlreadyTaken)
        } else {
            Ok(vec![SeatEvent::Taken])
        }
    }

    fn apply(&mut self, _: &SeatEvent) {
        self.taken = true;
    }
}

/// A saga command: seat `passenger` in `seat` (`seat` empty: no route).
#[derive(Clone, Debug)]
struct Book {
    seat: String,
    passenger: String,
}

fn dispatcher() -> BusDispatcher<Seat, impl Fn(&Book) -> Option<(String, String)> + Send + Sync> {
    let bus = CommandBus::new(Repository::<Seat>::new(Arc::new(InMemoryStore::new())))
        .with_validator(|p: &String| {
            if p.is_empty() {
                vec![FieldError::new("passenger", "required")]
            } else {
                Vec::new()
            }
        });
    BusDispatcher::new(bus, |b: &Book| {
        (!b.seat.is_empty()).then(|| (b.seat.clone(), b.passenger.clone()))
    })
}

fn book(seat: &str, passenger: &str) -> Book {
    Book {
        seat: seat.into(),
        passenger: passenger.into(),
    }
}

async fn send<F>(d: &impl CommandDispatcher<Book, F>, b: &Book) -> Result<(), DispatchError<F>> {
    let tenant = TenantId::parse("acme").unwrap();
    d.dispatch(&tenant, Uuid::now_v7(), b).await
}

#[tokio::test]
async fn the_default_failure_names_its_kind_and_keeps_field_errors() {
    let d = dispatcher();
    send::<CommandFailure>(&d, &book("12A", "ann"))
        .await
        .unwrap();

    let Err(DispatchError::Rejected(f)) = send::<CommandFailure>(&d, &book("12A", "bob")).await
    else {
        panic!("a taken seat is a permanent failure");
    };
    assert_eq!(f.kind, FailureKind::Rejected);
    assert_eq!(f.message, "the seat is taken");
    assert!(f.fields.is_empty());

    let Err(DispatchError::Rejected(f)) = send::<CommandFailure>(&d, &book("12B", "")).await else {
        panic!("an invalid command is a permanent failure");
    };
    assert_eq!(f.kind, FailureKind::Invalid);
    assert_eq!(f.fields, vec![FieldError::new("passenger", "required")]);

    let Err(DispatchError::Rejected(f)) = send::<CommandFailure>(&d, &book("", "cy")).await else {
        panic!("an unroutable command is a permanent failure");
    };
    assert_eq!(f.kind, FailureKind::Unroutable);

    // What the saga's stream records: it round-trips through JSON.
    let f = CommandFailure::rejected("the seat is taken").with_code("AlreadyTaken");
    let json = serde_json::to_string(&f).unwrap();
    assert_eq!(serde_json::from_str::<CommandFailure>(&json).unwrap(), f);
    assert_eq!(f.to_string(), "rejected (AlreadyTaken): the seat is taken");
}

/// A saga's own failure type, built from the aggregate's error.
#[derive(Debug, PartialEq)]
enum BookingFailure {
    SeatTaken,
    Other(String),
}

impl FromBusFailure<SeatError> for BookingFailure {
    fn from_bus_failure(failure: BusFailure<'_, SeatError>) -> Self {
        match failure {
            BusFailure::Command(CommandError::Rejected(SeatError::AlreadyTaken)) => {
                BookingFailure::SeatTaken
            }
            BusFailure::Command(e) => BookingFailure::Other(e.to_string()),
            _ => BookingFailure::Other("unroutable".into()),
        }
    }
}

#[tokio::test]
async fn a_saga_failure_type_of_its_own_receives_the_aggregate_error() {
    let d = dispatcher();
    send::<BookingFailure>(&d, &book("1C", "ann"))
        .await
        .unwrap();
    assert_eq!(
        send::<BookingFailure>(&d, &book("1C", "bob")).await,
        Err(DispatchError::Rejected(BookingFailure::SeatTaken))
    );
    assert_eq!(
        send::<BookingFailure>(&d, &book("", "bob")).await,
        Err(DispatchError::Rejected(BookingFailure::Other(
            "unroutable".into()
        )))
    );
}

/// Records written before sagas had a failure type (`error` only) still decode.
#[test]
fn a_failure_record_without_a_failure_value_still_decodes() {
    let old = r#"{"CommandFailed":{"dispatch_id":"d-1","error":"aircraft full"}}"#;
    let r: SagaRecord<(), String> = serde_json::from_str(old).unwrap();
    let SagaRecord::CommandFailed {
        dispatch_id,
        error,
        failure,
    } = r
    else {
        panic!("{r:?}");
    };
    assert_eq!(
        (dispatch_id.as_str(), error.as_str()),
        ("d-1", "aircraft full")
    );
    assert_eq!(failure, None);
}
