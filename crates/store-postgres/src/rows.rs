//! Decoding of stored rows into kernel types.

use std::collections::BTreeMap;

use bytes::Bytes;
use sqlx::Row;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgRow, PgTypeInfo, PgValueFormat, PgValueRef, Postgres};

use tracktrace_core::{
    Error, EventId, Metadata, NewEvent, Position, RecordedEvent, Result, StreamId, TenantId,
    Timestamp, Version,
};

/// Columns of an event row, in the order [`decode_event`] expects, without tenant and stream.
pub(crate) const EVENT_COLUMNS: &str = "position, version, event_id, dedup_key, event_type, \
     schema_version, content_type, payload, correlation_id, causation_id, headers::text, \
     recorded_at";

/// A `timestamptz` as microseconds since the Unix epoch, decoded straight from the binary
/// wire format (no chrono/time dependency, no allocation).
pub(crate) struct PgMicros(pub(crate) i64);

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

impl sqlx::Type<Postgres> for PgMicros {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(1184))
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for PgMicros {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let raw: [u8; 8] = value.as_bytes()?.try_into()?;
                Ok(PgMicros(
                    i64::from_be_bytes(raw).saturating_add(PG_EPOCH_OFFSET_US),
                ))
            }
            PgValueFormat::Text => Err("timestamptz in text format is not supported".into()),
        }
    }
}

pub(crate) fn to_i64(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(what, format!("{v} is out of range")))
}

fn from_i64(position: Option<Position>, what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::corruption(position, format!("negative {what} {v}")))
}

fn col<'r, T>(row: &'r PgRow, i: usize, position: Option<Position>) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    // Unchecked: the column types are fixed by our own schema and queries; decoding still
    // validates every value (a wrong type fails as a length or format error, not UB).
    row.try_get_unchecked(i)
        .map_err(|e| Error::corruption(position, format!("column {i}: {e}")))
}

/// Decodes [`EVENT_COLUMNS`] starting at column `at`.
pub(crate) fn decode_event(
    row: &PgRow,
    at: usize,
    tenant: TenantId,
    stream: StreamId,
) -> Result<RecordedEvent> {
    let raw_pos: i64 = col(row, at, None)?;
    let position = Position::new(from_i64(None, "position", raw_pos)?);
    let p = Some(position);
    let version = Version::new(from_i64(p, "version", col(row, at + 1, p)?)?);
    let event_id = EventId::from_uuid(col(row, at + 2, p)?)
        .map_err(|e| Error::corruption(p, e.to_string()))?;
    let dedup_key: Option<String> = col(row, at + 3, p)?;
    let event_type: String = col(row, at + 4, p)?;
    let schema_version: i32 = col(row, at + 5, p)?;
    let schema_version = u32::try_from(schema_version)
        .map_err(|_| Error::corruption(p, format!("negative schema version {schema_version}")))?;
    let content_type: String = col(row, at + 6, p)?;
    let payload: &[u8] = col(row, at + 7, p)?;
    let correlation_id: Option<String> = col(row, at + 8, p)?;
    let causation_id: Option<String> = col(row, at + 9, p)?;
    let headers: Option<&str> = col(row, at + 10, p)?;
    let headers = match headers {
        None => BTreeMap::new(),
        Some(h) => serde_json::from_str(h).map_err(|e| {
            Error::corruption(p, format!("headers are not a JSON object of strings: {e}"))
        })?,
    };
    let recorded_at: PgMicros = col(row, at + 11, p)?;
    let mut metadata = Metadata::new().with_headers(headers);
    metadata.correlation_id = correlation_id;
    metadata.causation_id = causation_id;
    let mut event = NewEvent::new_with_id(
        event_id,
        event_type,
        content_type,
        Bytes::copy_from_slice(payload),
    )
    .with_schema_version(schema_version)
    .with_metadata(metadata);
    event.dedup_key = dedup_key;
    Ok(RecordedEvent::from_new(
        tenant,
        stream,
        version,
        position,
        Timestamp::from_unix_micros(recorded_at.0),
        event,
    ))
}

/// Decodes a row of `tenant, stream, <EVENT_COLUMNS>`.
pub(crate) fn decode_event_with_ids(row: &PgRow) -> Result<RecordedEvent> {
    let tenant: &str = col(row, 0, None)?;
    let stream: &str = col(row, 1, None)?;
    let tenant = TenantId::parse(tenant).map_err(|e| Error::corruption(None, e.to_string()))?;
    let stream = StreamId::parse(stream).map_err(|e| Error::corruption(None, e.to_string()))?;
    decode_event(row, 2, tenant, stream)
}

/// Decodes a position column.
pub(crate) fn position(row: &PgRow, i: usize) -> Result<Position> {
    let v: i64 = col(row, i, None)?;
    Ok(Position::new(from_i64(None, "position", v)?))
}
