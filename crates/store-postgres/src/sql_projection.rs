//! Projections into the application's own SQL tables, exactly once: a [`SqlProjection`] runs
//! its statements in the transaction that moves its checkpoint, driven by a
//! [`SqlProjectionRunner`].

use std::fmt;
use std::future::Future;

use async_trait::async_trait;
use sqlx::postgres::PgConnection;
use sqlx::{Postgres, Transaction};
use tokio::sync::watch;
use tracktrace_core::projection::{self, ProjectionStep};
use tracktrace_core::{
    BoxError, CheckpointStore, Error, EventFilter, EventStore, Position, ProjectionError,
    ProjectionProgress, RecordedEvent, Upcasters,
};

use crate::error::map_err;
use crate::handle::PgStore;
use crate::kv::fence;

/// A projection whose read model is ordinary SQL tables in the store's database (and schema:
/// connections have the store's `search_path`), so applications query it with SQL.
///
/// Each batch of events is applied in one transaction that also moves the projection's
/// checkpoint (the same checkpoint table as every other projection): after a crash the
/// projection resumes exactly after the last committed event, so statements that are not
/// idempotent (`count = count + 1`) stay exact. A second runner of the same projection is
/// fenced off ([`Error::CheckpointMoved`]).
#[async_trait]
pub trait SqlProjection: Send + 'static {
    /// Unique, stable name: also the checkpoint name.
    fn name(&self) -> &str;

    /// Which events it wants (default: all). Filtering happens in the store.
    fn filter(&self) -> EventFilter {
        EventFilter::default()
    }

    /// Creates its tables and indexes if they do not exist (idempotent DDL, e.g.
    /// `CREATE TABLE IF NOT EXISTS`). Runs once per runner, in its own transaction, before the
    /// first batch. Default: nothing.
    async fn setup(&mut self, conn: &mut PgConnection) -> Result<(), BoxError> {
        let _ = conn;
        Ok(())
    }

    /// Applies one event (already upcast) with the batch's transaction. An error rolls the
    /// whole batch back, checkpoint included.
    async fn apply(
        &mut self,
        event: &RecordedEvent,
        conn: &mut PgConnection,
    ) -> Result<(), BoxError>;

    /// Empties its tables for a rebuild, in the transaction that resets the checkpoint to 0.
    async fn reset(&mut self, conn: &mut PgConnection) -> Result<(), BoxError>;
}

/// Feeds one [`SqlProjection`] from the global log of a [`PgStore`]. Run one runner per
/// projection name (others are fenced off).
pub struct SqlProjectionRunner<P: SqlProjection> {
    store: PgStore,
    projection: P,
    upcasters: Upcasters,
    batch_size: usize,
    set_up: bool,
    /// `None`: not loaded yet (reloaded after a failed commit).
    checkpoint: Option<Option<Position>>,
    progress: watch::Sender<Position>,
}

impl<P: SqlProjection> fmt::Debug for SqlProjectionRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlProjectionRunner")
            .field("projection", &self.projection.name())
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl<P: SqlProjection> SqlProjectionRunner<P> {
    /// A runner of `projection` over `store` (events, checkpoint and tables in one database).
    pub fn new(store: PgStore, projection: P) -> Self {
        Self {
            store,
            projection,
            upcasters: Upcasters::new(),
            batch_size: 256,
            set_up: false,
            checkpoint: None,
            progress: watch::Sender::new(Position::START),
        }
    }

    /// Events read and applied per transaction (default 256).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Upcasts events before the projection sees them.
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// A handle that follows the checkpoint and can wait for a position from another task
    /// while this runner [runs](SqlProjectionRunner::run) (read-your-writes).
    pub fn progress(&self) -> ProjectionProgress {
        ProjectionProgress::new(self.progress.subscribe())
    }

    fn err(&self, source: Error) -> ProjectionError {
        ProjectionError::Store {
            projection: self.projection.name().to_owned(),
            source,
        }
    }

    fn handler_err(&self, position: Position, source: BoxError) -> ProjectionError {
        ProjectionError::Handler {
            projection: self.projection.name().to_owned(),
            position,
            source,
        }
    }

    /// A failed SQL call of operation `what` (e.g. `"sql projection commit"`).
    fn sql_err(&self, what: &str, source: sqlx::Error) -> ProjectionError {
        self.err(map_err(what, source))
    }

    /// Opens a transaction on the store's pool (errors name operation `what`). Takes `&mut self`
    /// because the runner is `Send` but not `Sync` (nor is the projection): a future holding
    /// `&self` across the connect would not be `Send`.
    async fn begin(
        &mut self,
        what: &str,
    ) -> Result<Transaction<'static, Postgres>, ProjectionError> {
        self.store
            .pool()
            .begin()
            .await
            .map_err(|e| self.sql_err(what, e))
    }

    fn set_checkpoint(&mut self, cp: Option<Position>) {
        self.checkpoint = Some(cp);
        self.progress.send_replace(cp.unwrap_or_default());
    }

    /// The stored checkpoint (`None`: never ran).
    pub async fn checkpoint(&mut self) -> Result<Option<Position>, ProjectionError> {
        if let Some(cp) = self.checkpoint {
            return Ok(cp);
        }
        let cp = self
            .store
            .load_checkpoint(self.projection.name())
            .await
            .map_err(|e| self.err(e))?;
        self.set_checkpoint(cp);
        Ok(cp)
    }

    async fn ensure_set_up(&mut self) -> Result<(), ProjectionError> {
        if self.set_up {
            return Ok(());
        }
        let what = "sql projection setup";
        let mut tx = self.begin(what).await?;
        if let Err(source) = self.projection.setup(&mut tx).await {
            return Err(self.handler_err(Position::START, source));
        }
        tx.commit().await.map_err(|e| self.sql_err(what, e))?;
        self.set_up = true;
        Ok(())
    }

    /// Applies one batch in one transaction with its checkpoint; returns the number of
    /// events applied and whether the batch reached the head.
    pub async fn step(&mut self) -> Result<(usize, bool), ProjectionError> {
        self.ensure_set_up().await?;
        let cp = self.checkpoint().await?;
        let batch =
            projection::read_batch(&self.store, cp, self.projection.filter(), self.batch_size)
                .await
                .map_err(|e| self.err(e))?;
        let (at_head, new_cp) = (batch.at_head, batch.checkpoint);
        if batch.idle {
            return Ok((0, at_head));
        }
        let applied = batch.events.len();
        let what = "sql projection commit";
        let mut tx = self.begin(what).await?;
        if let Err(err) = fence(&mut tx, self.projection.name(), cp, new_cp).await {
            self.checkpoint = None;
            return Err(self.err(err));
        }
        for event in batch.events {
            let position = event.position;
            let event = self.upcasters.upcast(event).map_err(|e| self.err(e))?;
            if let Err(source) = self.projection.apply(&event, &mut tx).await {
                return Err(self.handler_err(position, source));
            }
        }
        if let Err(e) = tx.commit().await {
            self.checkpoint = None;
            return Err(self.sql_err(what, e));
        }
        self.set_checkpoint(Some(new_cp));
        Ok((applied, at_head))
    }

    /// Applies batches until the head is reached; returns the checkpoint.
    pub async fn catch_up(&mut self) -> Result<Position, ProjectionError> {
        projection::catch_up(self).await
    }

    /// Applies batches until every event up to `position` is applied, waiting on the store's
    /// head notifications while it is not readable yet; returns the checkpoint. Waits for as
    /// long as it takes: wrap it in a timeout.
    pub async fn wait_for(&mut self, position: Position) -> Result<Position, ProjectionError> {
        projection::wait_for(self, position).await
    }

    /// Catches up, then follows new events (woken by the store's head notifications) until
    /// `shutdown` completes.
    pub async fn run(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        projection::follow(self, shutdown).await
    }

    /// Empties the projection's tables ([`SqlProjection::reset`]) and moves its checkpoint
    /// back to 0 in one transaction, then replays the log.
    pub async fn rebuild(&mut self) -> Result<Position, ProjectionError> {
        self.ensure_set_up().await?;
        let cp = self.checkpoint().await?;
        let what = "sql projection reset";
        let mut tx = self.begin(what).await?;
        self.checkpoint = None;
        fence(&mut tx, self.projection.name(), cp, Position::START)
            .await
            .map_err(|err| self.err(err))?;
        if let Err(source) = self.projection.reset(&mut tx).await {
            return Err(self.handler_err(Position::START, source));
        }
        tx.commit().await.map_err(|e| self.sql_err(what, e))?;
        self.set_checkpoint(Some(Position::START));
        self.catch_up().await
    }
}

#[async_trait]
impl<P: SqlProjection> ProjectionStep for SqlProjectionRunner<P> {
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.store.watch_head()
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, ProjectionError> {
        SqlProjectionRunner::checkpoint(self).await
    }

    async fn step(&mut self) -> Result<(usize, bool), ProjectionError> {
        SqlProjectionRunner::step(self).await
    }

    fn closed(&self) -> ProjectionError {
        self.err(Error::Closed)
    }
}
