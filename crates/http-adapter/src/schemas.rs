//! Optional per-tenant JSON Schemas for the `attributes` of each event type.
//!
//! A system admin registers a schema for (tenant, event type); from then on every capture of
//! that type by that tenant — over HTTP, from the bus or from a saga, since the check runs in
//! [`crate::capture::CaptureService`] — must have `attributes` that validate against it, or
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
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;
use tracktrace_core::{
    EventFilter, EventStore, EventStoreExt, ExpectedVersion, NewEvent, Position, ReadAll, StreamId,
    TenantId,
};

use crate::auth::SYSTEM_TENANT;
use crate::domain::FieldError;
use crate::error::ApiError;

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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaInfo {
    /// Event type the schema applies to.
    pub event_type: String,
    /// The JSON Schema of `attributes`.
    pub schema: Value,
}

struct Compiled {
    source: Value,
    validator: jsonschema::Validator,
}

#[derive(Default)]
struct View {
    /// tenant → event type → schema.
    schemas: HashMap<String, BTreeMap<String, Arc<Compiled>>>,
    next: Position,
}

/// The registry (cheap to clone).
#[derive(Clone)]
pub struct SchemaRegistry {
    store: Arc<dyn EventStore>,
    system: TenantId,
    view: Arc<RwLock<View>>,
    refresh_lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry").finish_non_exhaustive()
    }
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
            store,
            system: TenantId::parse(SYSTEM_TENANT).expect("the system tenant id is valid"),
            view: Arc::new(RwLock::new(View::default())),
            refresh_lock: Arc::new(Mutex::new(())),
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
        let compiled = {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            match view
                .schemas
                .get(tenant.as_str())
                .and_then(|m| m.get(event_type))
            {
                Some(c) => c.clone(),
                None => return Vec::new(),
            }
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

    /// The schemas of `tenant`, by event type.
    pub fn list(&self, tenant: &TenantId) -> Vec<SchemaInfo> {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        view.schemas
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
    }

    /// Registers (or replaces) the schema of `event_type` for `tenant`; 400 with a `schema`
    /// field error if it cannot be compiled.
    pub async fn set(
        &self,
        tenant: &TenantId,
        event_type: &str,
        schema: Value,
        by: &str,
    ) -> Result<SchemaInfo, ApiError> {
        compile(&schema).map_err(|m| ApiError::Validation(vec![FieldError::new("schema", m)]))?;
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
    ) -> Result<bool, ApiError> {
        self.refresh().await?;
        let exists = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .schemas
            .get(tenant.as_str())
            .is_some_and(|m| m.contains_key(event_type));
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
    ) -> Result<(), ApiError> {
        let stream = StreamId::parse(format!("{STREAM_PREFIX}{tenant}"))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let payload = SchemaPayload {
            tenant: tenant.to_string(),
            event_type: event_type.to_owned(),
            schema,
            by: by.to_owned(),
        };
        self.store
            .append_to(
                &self.system,
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json(kind, &serde_json::json!(payload))],
            )
            .await?;
        // This process applies its own change at once.
        self.refresh().await
    }

    /// Reads schema events committed since the last refresh.
    pub async fn refresh(&self) -> Result<(), ApiError> {
        let _g = self.refresh_lock.lock().await;
        let mut next = self.view.read().unwrap_or_else(|p| p.into_inner()).next;
        let filter = EventFilter {
            tenant: Some(self.system.clone()),
            event_types: Vec::new(),
            stream_prefix: Some(STREAM_PREFIX.into()),
        };
        loop {
            let page = self
                .store
                .read_all(ReadAll::from(next, 500).filter(filter.clone()))
                .await?;
            let full = page.events.len() == 500;
            // Compile outside the lock.
            let mut changes = Vec::with_capacity(page.events.len());
            for e in &page.events {
                let Ok(p) = serde_json::from_slice::<SchemaPayload>(&e.payload) else {
                    tracing::error!(position = %e.position, "unreadable schema event; skipped");
                    continue;
                };
                let compiled = match (e.event_type.as_str(), p.schema) {
                    (SET, Some(source)) => match compile(&source) {
                        Ok(validator) => Some(Arc::new(Compiled { source, validator })),
                        Err(m) => {
                            tracing::error!(position = %e.position, error = m, "stored schema does not compile; ignored");
                            continue;
                        }
                    },
                    (REMOVED, _) => None,
                    _ => continue,
                };
                changes.push((p.tenant, p.event_type, compiled));
            }
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            for (tenant, event_type, compiled) in changes {
                let m = v.schemas.entry(tenant).or_default();
                match compiled {
                    Some(c) => {
                        m.insert(event_type, c);
                    }
                    None => {
                        m.remove(&event_type);
                    }
                }
            }
            v.next = page.next;
            next = page.next;
            if !full {
                return Ok(());
            }
        }
    }

    /// Follows the schema events forever (spawned by the server): refreshes on head changes.
    pub async fn follow(self) {
        let mut watch = self.store.watch_head();
        loop {
            watch.borrow_and_update();
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "schema registry refresh failed");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            // A busy log changes the head after every commit: refresh a few times a second
            // at most (this process applies its own changes at once; others' arrive within
            // this pause).
            tokio::time::sleep(crate::tenants::FOLLOW_PAUSE).await;
            if watch.changed().await.is_err() {
                return;
            }
        }
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
                Err(ApiError::Validation(errs)) => assert_eq!(errs[0].field, "schema", "{bad}"),
                other => panic!("{bad} accepted: {other:?}"),
            }
        }
        assert!(reg.list(&t).is_empty());
    }
}
