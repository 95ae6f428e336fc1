//! Fuzz-style property tests of the capture payload validation
//! (`tracktrace_domain::validate_capture`): random bytes, random JSON and mutations of
//! valid events never panic, and the outcome is consistent (a valid event re-validates from
//! its parts; every rejection of JSON input lists at least one field error).

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tracktrace_domain::{CaptureError, validate_capture};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        // Values that are close to valid field contents.
        prop_oneof![
            Just("Bag"),
            Just("MAD"),
            Just("2026-11-28T08:15:00+01:00"),
            Just("2026-13-45T99:99:99Z"),
            Just("01a220a4-9adf-7553-90c8-d5814a2ff9b8"),
            Just("00000000-0000-0000-0000-000000000000"),
            Just("+999999-01-01T00:00:00Z"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("entityId".to_string()),
                    Just("entityType".to_string()),
                    Just("eventType".to_string()),
                    Just("occurredAt".to_string()),
                    Just("location".to_string()),
                    Just("code".to_string()),
                    Just("attributes".to_string()),
                    Just("relatedEntities".to_string()),
                    "[a-zA-Z]{1,10}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn valid() -> Value {
    json!({
        "eventId": "01a220a4-9adf-7553-90c8-d5814a2ff9b8",
        "dedupKey": "k-1",
        "entityId": "0125123456",
        "entityType": "Bag",
        "eventType": "BagLoaded",
        "occurredAt": "2026-11-28T08:15:00+01:00",
        "location": {"code": "MAD", "detail": "T4S"},
        "source": "BRS",
        "attributes": {"flight": "IB3170"},
        "relatedEntities": [{"entityId": "AKE1", "entityType": "ULD", "relation": "containedIn"}]
    })
}

fn check(bytes: &[u8]) {
    match validate_capture(bytes) {
        Ok(ev) => {
            assert!(!ev.entity_id.is_empty() && !ev.event_type.is_empty());
            assert!(ev.stream_id().is_ok());
        }
        Err(CaptureError::Malformed { detail }) => assert!(!detail.is_empty()),
        Err(CaptureError::Invalid { errors }) => assert!(!errors.is_empty()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn random_json_never_panics(v in arb_json()) {
        check(v.to_string().as_bytes());
    }

    #[test]
    fn mutated_valid_events_never_panic(
        field in prop::sample::select(vec![
            "eventId", "dedupKey", "entityId", "entityType", "eventType", "occurredAt",
            "location", "source", "attributes", "relatedEntities", "extra",
        ]),
        replacement in arb_json(),
        remove in any::<bool>(),
    ) {
        let mut v = valid();
        let o = v.as_object_mut().unwrap();
        if remove { o.remove(field); } else { o.insert(field.into(), replacement); }
        check(v.to_string().as_bytes());
    }

    #[test]
    fn truncated_valid_events_never_panic(cut in 0usize..400) {
        let s = valid().to_string();
        check(&s.as_bytes()[..cut.min(s.len())]);
    }
}

#[test]
fn the_valid_seed_is_valid_and_deep_nesting_is_rejected_not_crashing() {
    assert!(validate_capture(valid().to_string().as_bytes()).is_ok());
    let deep = "[".repeat(100_000);
    assert!(matches!(
        validate_capture(deep.as_bytes()),
        Err(CaptureError::Malformed { .. })
    ));
    let mut v = valid();
    v["attributes"] = json!({"a": serde_json::from_str::<Value>(&format!("{}1{}", "[".repeat(120), "]".repeat(120))).unwrap()});
    check(v.to_string().as_bytes());
}
