//! [`SnapshotStore`], [`CheckpointStore`] and [`ReadModelStore`] for [`PgStore`].

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use tracktrace_core::{
    CheckpointStore, Direction, Error, KeyRange, Position, ReadModelBatch, ReadModelStore,
    ReadModelWrite, Result, Snapshot, SnapshotStore, StreamId, TenantId, Version,
};

use crate::error::map_err;
use crate::handle::PgStore;
use crate::rows::to_i64;

/// The error for write `i` of a read-model batch, of a kind this backend does not know.
fn unsupported_write(i: usize) -> Error {
    Error::invalid(
        format!("writes[{i}]"),
        "is a kind of read-model write the PostgreSQL store does not support",
    )
}

fn checkpoint_from(v: i64) -> Result<Position> {
    u64::try_from(v)
        .map(Position::new)
        .map_err(|_| Error::corruption(None, format!("negative checkpoint {v}")))
}

#[async_trait]
impl SnapshotStore for PgStore {
    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        let row = sqlx::query(
            "SELECT version, schema_version, payload FROM snapshots WHERE tenant = $1 AND stream = $2",
        )
        .bind(tenant.as_str())
        .bind(stream.as_str())
        .fetch_optional(self.pool())
        .await
        .map_err(|e| map_err("load snapshot", e))?;
        let Some(row) = row else { return Ok(None) };
        let e = |e| map_err("load snapshot", e);
        let version: i64 = row.try_get(0).map_err(e)?;
        let schema_version: i32 = row.try_get(1).map_err(e)?;
        let payload: Vec<u8> = row.try_get(2).map_err(e)?;
        let version = u64::try_from(version).map_err(|_| {
            Error::corruption(
                None,
                format!("snapshot of {tenant}/{stream}: version {version}"),
            )
        })?;
        let schema_version = u32::try_from(schema_version).map_err(|_| {
            Error::corruption(
                None,
                format!("snapshot of {tenant}/{stream}: schema version {schema_version}"),
            )
        })?;
        Ok(Some(Snapshot::new(
            tenant.clone(),
            stream.clone(),
            Version::new(version),
            schema_version,
            Bytes::from(payload),
        )))
    }

    async fn save_snapshot(&self, s: Snapshot) -> Result<()> {
        let schema_version = i32::try_from(s.schema_version)
            .map_err(|_| Error::invalid("schema_version", "must fit in a signed 32-bit integer"))?;
        // An older snapshot never replaces a newer one (equal versions do replace).
        sqlx::query(
            "INSERT INTO snapshots AS s (tenant, stream, version, schema_version, payload)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, stream) DO UPDATE
             SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version,
                 payload = EXCLUDED.payload
             WHERE s.version <= EXCLUDED.version",
        )
        .bind(s.tenant.as_str())
        .bind(s.stream.as_str())
        .bind(to_i64("version", s.version.get())?)
        .bind(schema_version)
        .bind(&s.payload[..])
        .execute(self.pool())
        .await
        .map_err(|e| map_err("save snapshot", e))?;
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for PgStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        let v: Option<i64> = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| map_err("load checkpoint", e))?;
        v.map(checkpoint_from).transpose()
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        sqlx::query(
            "INSERT INTO checkpoints (name, position) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
        )
        .bind(name)
        .bind(to_i64("position", position.get())?)
        .execute(self.pool())
        .await
        .map_err(|e| map_err("save checkpoint", e))?;
        Ok(())
    }
}

/// Moves checkpoint `name` to `position` inside `tx` if it is at `expected` (`None`: not
/// stored yet); otherwise [`Error::CheckpointMoved`] and the caller rolls back. The
/// compare-and-set fences off a second runner of the same projection: a concurrent one either
/// waits for this transaction and then fails its own compare, or wins and makes this one fail.
pub(crate) async fn fence(
    tx: &mut PgConnection,
    name: &str,
    expected: Option<Position>,
    position: Position,
) -> Result<()> {
    let e = |e| map_err("checkpoint fence", e);
    let to = to_i64("position", position.get())?;
    let moved = match expected {
        None => sqlx::query(
            "INSERT INTO checkpoints (name, position) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(to)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected()
            == 0,
        Some(expected) => sqlx::query(
            "UPDATE checkpoints SET position = $2 WHERE name = $1 AND position = $3",
        )
        .bind(name)
        .bind(to)
        .bind(to_i64("expected_checkpoint", expected.get())?)
        .execute(&mut *tx)
        .await
        .map_err(e)?
        .rows_affected()
            == 0,
    };
    if !moved {
        return Ok(());
    }
    let actual: Option<i64> =
        sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(e)?;
    Err(Error::CheckpointMoved {
        name: name.to_owned(),
        expected,
        actual: actual.map(checkpoint_from).transpose()?,
    })
}

/// Applies consecutive puts as one upsert (last value per key wins within the run).
async fn flush_puts(
    conn: &mut PgConnection,
    puts: &mut Vec<(String, Vec<u8>, Vec<u8>)>,
) -> Result<()> {
    if puts.is_empty() {
        return Ok(());
    }
    // ON CONFLICT cannot touch one row twice in a statement: keep the last put of each key.
    let mut last: HashMap<(&str, &[u8]), usize> = HashMap::with_capacity(puts.len());
    for (i, (ns, k, _)) in puts.iter().enumerate() {
        last.insert((ns.as_str(), k.as_slice()), i);
    }
    let mut idx: Vec<usize> = last.into_values().collect();
    idx.sort_unstable();
    let ns: Vec<&str> = idx.iter().map(|&i| puts[i].0.as_str()).collect();
    let keys: Vec<&[u8]> = idx.iter().map(|&i| puts[i].1.as_slice()).collect();
    let values: Vec<&[u8]> = idx.iter().map(|&i| puts[i].2.as_slice()).collect();
    sqlx::query(
        "INSERT INTO read_models (ns, key, value)
         SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[])
         ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value",
    )
    .bind(ns)
    .bind(keys)
    .bind(values)
    .execute(&mut *conn)
    .await
    .map_err(|e| map_err("read-model commit", e))?;
    puts.clear();
    Ok(())
}

#[async_trait]
impl ReadModelStore for PgStore {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Bytes>> {
        let v: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM read_models WHERE ns = $1 AND key = $2")
                .bind(ns)
                .bind(key)
                .fetch_optional(self.pool())
                .await
                .map_err(|e| map_err("read-model get", e))?;
        Ok(v.map(Bytes::from))
    }

    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // bytea compares bytewise (memcmp, then length), like `Vec<u8>`.
        let sql = match direction {
            Direction::Forwards => {
                "SELECT key, value FROM read_models
                 WHERE ns = $1 AND key >= $2 AND ($3::bytea IS NULL OR key < $3)
                 ORDER BY key LIMIT $4"
            }
            Direction::Backwards => {
                "SELECT key, value FROM read_models
                 WHERE ns = $1 AND key >= $2 AND ($3::bytea IS NULL OR key < $3)
                 ORDER BY key DESC LIMIT $4"
            }
        };
        let rows = sqlx::query(sql)
            .bind(ns)
            .bind(range.start.as_slice())
            .bind(range.end.as_deref())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(|e| map_err("read-model scan", e))?;
        rows.iter()
            .map(|r| {
                let k: Vec<u8> = r.try_get(0).map_err(|e| map_err("read-model scan", e))?;
                let v: Vec<u8> = r.try_get(1).map_err(|e| map_err("read-model scan", e))?;
                Ok((Bytes::from(k), Bytes::from(v)))
            })
            .collect()
    }

    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        let e = |e| map_err("read-model commit", e);
        // Kinds of writes added to tracktrace-core after this backend reject the whole batch
        // before anything is written, never are they skipped.
        if let Some(i) = batch.writes.iter().position(|w| {
            !matches!(
                w,
                ReadModelWrite::Put { .. }
                    | ReadModelWrite::Delete { .. }
                    | ReadModelWrite::Clear { .. }
            )
        }) {
            return Err(unsupported_write(i));
        }
        let mut conn = self.pool().acquire().await.map_err(e)?;
        let mut tx = conn.begin().await.map_err(e)?;
        fence(
            &mut tx,
            &batch.checkpoint,
            batch.expected_checkpoint,
            batch.position,
        )
        .await?;
        let mut puts = Vec::new();
        for (i, w) in batch.writes.into_iter().enumerate() {
            match w {
                ReadModelWrite::Put { ns, key, value } => puts.push((ns, key, value)),
                ReadModelWrite::Delete { ns, key } => {
                    flush_puts(&mut tx, &mut puts).await?;
                    sqlx::query("DELETE FROM read_models WHERE ns = $1 AND key = $2")
                        .bind(ns)
                        .bind(key)
                        .execute(&mut *tx)
                        .await
                        .map_err(e)?;
                }
                ReadModelWrite::Clear { ns } => {
                    flush_puts(&mut tx, &mut puts).await?;
                    sqlx::query("DELETE FROM read_models WHERE ns = $1")
                        .bind(ns)
                        .execute(&mut *tx)
                        .await
                        .map_err(e)?;
                }
                // Rejected above; the transaction rolls back if it ever gets here.
                _ => return Err(unsupported_write(i)),
            }
        }
        flush_puts(&mut tx, &mut puts).await?;
        tx.commit().await.map_err(e)?;
        Ok(())
    }
}
