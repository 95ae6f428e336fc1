//! Parameters of the append statements, shared by single appends (`store.rs`) and group
//! appends (`group.rs`): the expected-version pair, an event's columns and the version a
//! stream is believed to be at.

use tracktrace_core::{AppendRequest, ExpectedVersion, NewEvent, Result};

use crate::handle::PgStore;
use crate::rows::to_i64;

pub(crate) fn expected_params(e: ExpectedVersion) -> Result<(i16, i64)> {
    Ok(match e {
        ExpectedVersion::Any => (0, 0),
        ExpectedVersion::NoStream => (1, 0),
        ExpectedVersion::StreamExists => (2, 0),
        ExpectedVersion::Exact(v) => (3, to_i64("expected", v.get())?),
    })
}

/// The `headers` column of an event: its headers as JSON text, `None` when it has none.
pub(crate) fn headers_json(e: &NewEvent) -> Option<String> {
    (!e.metadata.headers.is_empty())
        .then(|| serde_json::to_string(&e.metadata.headers).unwrap_or_default())
}

/// The `schema_version` column of an event (`validate_batch` has checked that it is at most
/// `limits::MAX_SCHEMA_VERSION`).
pub(crate) fn schema_version_param(e: &NewEvent) -> i32 {
    i32::try_from(e.schema_version).unwrap_or(i32::MAX)
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds one event's nine columns (id, dedup key, type, schema version, content type, payload,
/// correlation, causation, headers), in that order, after the parameters `q` already has.
pub(crate) fn bind_event<'q>(q: PgQuery<'q>, e: &'q NewEvent) -> PgQuery<'q> {
    q.bind(e.event_id.as_uuid())
        .bind(e.dedup_key.as_deref())
        .bind(e.event_type.as_str())
        .bind(schema_version_param(e))
        .bind(e.content_type.as_str())
        .bind(&e.payload[..])
        .bind(e.metadata.correlation_id.as_deref())
        .bind(e.metadata.causation_id.as_deref())
        .bind(headers_json(e))
}

impl PgStore {
    /// The version the request's stream is believed to be at, as the statements' parameter:
    /// known for `NoStream` and `Exact`, hinted for `Any` / `StreamExists` when this process
    /// appended to it recently (see `hints`); `None` (look it up) otherwise or beyond `i64`.
    /// Append statements verify it.
    pub(crate) fn believed_version(&self, req: &AppendRequest) -> Option<i64> {
        let v = match req.expected {
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v.get()),
            ExpectedVersion::Any | ExpectedVersion::StreamExists => self
                .inner
                .hints
                .get(req.tenant.as_str(), req.stream.as_str()),
        };
        v.and_then(|v| i64::try_from(v).ok())
    }
}
