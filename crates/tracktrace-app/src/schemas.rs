//! Optional per-tenant JSON Schemas for the `attributes` of each event type.
//!
//! A system admin registers a schema for (tenant, event type); from then on every capture of
//! that type by that tenant — over HTTP, from the bus or from a saga, since the check runs in
//! [`crate::capture::service::CaptureService`] — must have `attributes` that validate against it, or
//! it is rejected with one field error per violation (`attributes.weightKg: …`). Event types
//! without a schema accept any object, as before.
//!
//! Schemas are stored as events of the system tenant (stream `schemas-<tenant>`, events
//! `tt.AttributeSchemaSet` / `tt.AttributeSchemaRemoved`), so every server process applies
//! the same ones: each keeps compiled validators in memory, refreshed from the log by a
//! follower task (and at once in the process that made the change). Another process applies
//! a change when its follower reads it, normally milliseconds later.
//!
//! Any JSON Schema draft the `jsonschema` crate supports (2020-12 by default, or the draft its
//! `$schema` names). References are resolved inside the schema only: nothing is fetched, so a
//! schema with a remote or file `$ref` is refused when registered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracktrace_core::{
    EventStore, EventStoreExt, ExpectedVersion, NewEvent, RecordedEvent, StreamId, TenantId,
};
use tracktrace_domain::{FieldError, event_type_problem};

use crate::access::system_tenant;
use crate::error::AppError;
use crate::follow::{FOLLOW_PAUSE, Followed, SystemView};

const SET: &str = "tt.AttributeSchemaSet";
const REMOVED: &str = "tt.AttributeSchemaRemoved";
const STREAM_PREFIX: &str = "schemas-";
/// Largest accepted schema document, serialized.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Most violations reported for one capture (a huge object can violate a schema many times).
const MAX_REPORTED: usize = 50;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaPayload {
    tenant: String,
    event_type: String,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    by: String,
}

/// A registered schema as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SchemaInfo {
    /// Event type the schema applies to.
    pub event_type: String,
    /// The JSON Schema of `attributes`.
    pub schema: Value,
}

/// A registered schema, compiled.
pub struct Compiled {
    source: Value,
    validator: jsonschema::Validator,
}

/// The registry's view: tenant → event type → compiled schema.
#[derive(Default)]
pub struct SchemaView {
    schemas: HashMap<String, BTreeMap<String, Arc<Compiled>>>,
}

/// One schema event: (tenant, event type, the compiled schema or `None` when removed).
type SchemaChange = (String, String, Option<Arc<Compiled>>);

impl SystemView for SchemaView {
    type Change = SchemaChange;
    const STREAM_PREFIX: &'static str = STREAM_PREFIX;

    /// Compiles the schema here, outside the view's lock.
    fn decode(e: &RecordedEvent) -> Option<SchemaChange> {
        let Ok(p) = serde_json::from_slice::<SchemaPayload>(&e.payload) else {
            tracing::error!(position = %e.position, "unreadable schema event; skipped");
            return None;
        };
        let compiled = match (e.event_type.as_str(), p.schema) {
            (SET, Some(source)) => match compile(&source) {
                Ok(validator) => Some(Arc::new(Compiled { source, validator })),
                Err(m) => {
                    tracing::error!(position = %e.position, error = m, "stored schema does not compile; ignored");
                    return None;
                }
            },
            (REMOVED, _) => None,
            _ => return None,
        };
        Some((p.tenant, p.event_type, compiled))
    }

    fn apply(&mut self, (tenant, event_type, compiled): SchemaChange) {
        let m = self.schemas.entry(tenant).or_default();
        match compiled {
            Some(c) => {
                m.insert(event_type, c);
            }
            None => {
                m.remove(&event_type);
            }
        }
    }
}

/// The registry (cheap to clone).
#[derive(Clone, Debug)]
pub struct SchemaRegistry {
    view: Followed<SchemaView>,
}

/// Compiles `schema`, or says why it cannot be used.
fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err("a JSON Schema is an object (or a boolean)".into());
    }
    let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(0);
    if size > MAX_SCHEMA_BYTES {
        return Err(format!("larger than {MAX_SCHEMA_BYTES} bytes"));
    }
    jsonschema::validator_for(schema).map_err(|e| e.to_string())
}

/// `attributes` + a JSON pointer below it, in the field-path style of capture errors
/// (`attributes.dims[2].h`).
fn field_path(pointer: &str) -> String {
    let mut out = String::from("attributes");
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

impl SchemaRegistry {
    /// A registry over `store` (empty until [`SchemaRegistry::refresh`]).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            view: Followed::new(store),
        }
    }

    /// Field errors of `attributes` of an event of `event_type` captured by `tenant` (empty:
    /// valid, or no schema registered). Synchronous and lock-light: runs on every capture.
    pub fn check(
        &self,
        tenant: &TenantId,
        event_type: &str,
        attributes: &serde_json::Map<String, Value>,
    ) -> Vec<FieldError> {
        let compiled = self.view.read(|v| {
            v.schemas
                .get(tenant.as_str())
                .and_then(|m| m.get(event_type))
                .cloned()
        });
        let Some(compiled) = compiled else {
            return Vec::new();
        };
        let instance = Value::Object(attributes.clone());
        if compiled.validator.is_valid(&instance) {
            return Vec::new();
        }
        compiled
            .validator
            .iter_errors(&instance)
            .take(MAX_REPORTED)
            .map(|e| FieldError::new(field_path(e.instance_path().as_str()), e.to_string()))
            .collect()
    }

    /// The schemas of `tenant`, by event type (as of the last refresh).
    pub fn list(&self, tenant: &TenantId) -> Vec<SchemaInfo> {
        self.view.read(|v| {
            v.schemas
                .get(tenant.as_str())
                .map(|m| {
                    m.iter()
                        .map(|(t, c)| SchemaInfo {
                            event_type: t.clone(),
                            schema: c.source.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// Registers (or replaces) the schema of `event_type` for `tenant`. Field errors: an
    /// `eventType` the capture validator would refuse (no capture could ever use the
    /// schema), a `schema` that cannot be compiled.
    pub async fn set(
        &self,
        tenant: &TenantId,
        event_type: &str,
        schema: Value,
        by: &str,
    ) -> Result<SchemaInfo, AppError> {
        if let Some(m) = event_type_problem(event_type) {
            return Err(AppError::field("eventType", m));
        }
        compile(&schema).map_err(|m| AppError::field("schema", m))?;
        self.append(SET, tenant, event_type, Some(schema.clone()), by)
            .await?;
        Ok(SchemaInfo {
            event_type: event_type.to_owned(),
            schema,
        })
    }

    /// Removes the schema of `event_type` for `tenant`; `false` if there was none.
    pub async fn remove(
        &self,
        tenant: &TenantId,
        event_type: &str,
        by: &str,
    ) -> Result<bool, AppError> {
        self.refresh().await?;
        let exists = self.view.read(|v| {
            v.schemas
                .get(tenant.as_str())
                .is_some_and(|m| m.contains_key(event_type))
        });
        if exists {
            self.append(REMOVED, tenant, event_type, None, by).await?;
        }
        Ok(exists)
    }

    async fn append(
        &self,
        kind: &str,
        tenant: &TenantId,
        event_type: &str,
        schema: Option<Value>,
        by: &str,
    ) -> Result<(), AppError> {
        let stream =
            StreamId::parse(format!("{STREAM_PREFIX}{tenant}")).map_err(AppError::internal)?;
        let payload = SchemaPayload {
            tenant: tenant.to_string(),
            event_type: event_type.to_owned(),
            schema,
            by: by.to_owned(),
        };
        self.view
            .store()
            .append_to(
                &system_tenant(),
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json(kind, &serde_json::json!(payload))],
            )
            .await?;
        // This process applies its own change at once.
        self.refresh().await
    }

    /// Reads schema events committed since the last refresh.
    pub async fn refresh(&self) -> Result<(), AppError> {
        self.view.refresh().await
    }

    /// Follows the schema events forever (spawned by the server): refreshes after head
    /// changes, at most once per [`FOLLOW_PAUSE`].
    pub async fn follow(self) {
        self.view.follow(FOLLOW_PAUSE).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tracktrace_core::InMemoryStore;

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(field_path(""), "attributes");
        assert_eq!(field_path("/weightKg"), "attributes.weightKg");
        assert_eq!(field_path("/dims/2/h"), "attributes.dims[2].h");
        assert_eq!(field_path("/a~1b/c~0d"), "attributes.a/b.c~d");
    }

    #[tokio::test]
    async fn schemas_apply_per_tenant_and_event_type_and_survive_a_reload() {
        let store = Arc::new(InMemoryStore::new());
        let reg = SchemaRegistry::new(store.clone());
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("other").unwrap();
        let schema = json!({
            "type": "object",
            "required": ["weightKg"],
            "properties": {"weightKg": {"type": "number", "minimum": 0}, "tags": {"type": "array", "items": {"type": "string"}}}
        });
        reg.set(&acme, "BagWeighed", schema.clone(), "t")
            .await
            .unwrap();
        let attrs = |v: Value| v.as_object().unwrap().clone();
        assert!(
            reg.check(&acme, "BagWeighed", &attrs(json!({"weightKg": 23.5})))
                .is_empty()
        );
        let errs = reg.check(
            &acme,
            "BagWeighed",
            &attrs(json!({"weightKg": -1, "tags": ["a", 2]})),
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"attributes.weightKg"), "{errs:?}");
        assert!(fields.contains(&"attributes.tags[1]"), "{errs:?}");
        let missing = reg.check(&acme, "BagWeighed", &attrs(json!({})));
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].field, "attributes");
        // Other event types and other tenants are unaffected.
        assert!(reg.check(&acme, "BagLoaded", &attrs(json!({}))).is_empty());
        assert!(
            reg.check(&other, "BagWeighed", &attrs(json!({})))
                .is_empty()
        );

        // A second process (registry) over the same store sees it after a refresh.
        let reg2 = SchemaRegistry::new(store.clone());
        reg2.refresh().await.unwrap();
        assert_eq!(
            reg2.list(&acme),
            vec![SchemaInfo {
                event_type: "BagWeighed".into(),
                schema
            }]
        );
        assert!(
            !reg2
                .check(&acme, "BagWeighed", &attrs(json!({})))
                .is_empty()
        );

        assert!(reg.remove(&acme, "BagWeighed", "t").await.unwrap());
        assert!(!reg.remove(&acme, "BagWeighed", "t").await.unwrap());
        reg2.refresh().await.unwrap();
        assert!(
            reg2.check(&acme, "BagWeighed", &attrs(json!({})))
                .is_empty()
        );
        assert!(reg2.list(&acme).is_empty());
    }

    #[tokio::test]
    async fn unusable_schemas_are_refused() {
        let reg = SchemaRegistry::new(Arc::new(InMemoryStore::new()));
        let t = TenantId::parse("acme").unwrap();
        for bad in [
            json!("not a schema"),
            json!({"type": "no-such-type"}),
            json!({"$ref": "https://example.com/schemas/bag.json"}),
            json!({"$ref": "file:///etc/passwd"}),
            json!({"properties": {"a": {"pattern": "("}}}),
        ] {
            match reg.set(&t, "X", bad.clone(), "t").await {
                Err(AppError::Validation(errs)) => assert_eq!(errs[0].field, "schema", "{bad}"),
                other => panic!("{bad} accepted: {other:?}"),
            }
        }
        assert!(reg.list(&t).is_empty());
    }

    #[tokio::test]
    async fn schemas_only_for_event_types_a_capture_can_have() {
        let reg = SchemaRegistry::new(Arc::new(InMemoryStore::new()));
        let t = TenantId::parse("acme").unwrap();
        let schema = json!({"type": "object"});
        // Each of these is refused by the capture validator, so no capture could use it.
        for bad in ["1abc", "", "a b", "-x", "BagLoaded!", &"A".repeat(129)] {
            match reg.set(&t, bad, schema.clone(), "t").await {
                Err(AppError::Validation(errs)) => {
                    assert_eq!(errs[0].field, "eventType", "{bad:?}");
                    assert_eq!(
                        Some(errs[0].message.clone()),
                        tracktrace_domain::event_type_problem(bad)
                    );
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
        for good in ["BagLoaded", "MILESTONE_OVERDUE", "bag.loaded:v2-x"] {
            assert!(tracktrace_domain::event_type_problem(good).is_none());
            reg.set(&t, good, schema.clone(), "t").await.unwrap();
        }
        assert_eq!(reg.list(&t).len(), 3);
    }
}
