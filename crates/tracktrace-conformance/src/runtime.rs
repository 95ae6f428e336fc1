//! Runtime checks every backend runs: the command
//! bus under contention, snapshot + tail == replay, upcasting, projections and sagas across
//! restarts, and the circuit breaker — plus the test domain they use ([`Account`],
//! [`OrderSaga`]) and a fault-injecting store wrapper ([`FaultyStore`]).
//!
//! ```text
//! async fn make_stores() -> RuntimeStores { RuntimeStores::from_store(Arc::new(/* fresh store */)) }
//! tracktrace_conformance::runtime_tests!(make_stores);
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::store::{CheckFailure, CheckResult};
use crate::support::{Intercept, Intercepted};
use tracktrace_core::{
    Aggregate, BreakerConfig, BreakerState, CacheMiss, CircuitBreaker, CommandBus,
    CommandDispatcher, CommandError, CommandFailure, CommandMeta, DispatchError, DomainEvent,
    Error, EventFilter, EventId, EventStore, EventStoreExt, ExpectedVersion, FailureKind,
    FieldError, JsonCodec, NewEvent, Position, Projection, ProjectionRunner, Reaction,
    ReadModelStore, ReadModelTx, RecordedEvent, Repository, Result, Saga, SagaRecord, SagaRunner,
    SnapshotStore, StreamId, TenantId, Timestamp, Upcasters, Version,
};
use tracktrace_core::{
    AllPage, AppendOutcome, AppendRequest, CheckpointStore, Direction, KeyRange, ReadAll,
    ReadModelBatch, ReadStream, RetryPolicy,
};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, CheckFailure> {
    r.map_err(|e| CheckFailure(format!("{what}: unexpected error: {e}")))
}

/// The stores a runtime check needs; usually all the same backend instance.
#[derive(Clone)]
pub struct RuntimeStores {
    /// Events.
    pub events: Arc<dyn EventStore>,
    /// Snapshots.
    pub snapshots: Arc<dyn SnapshotStore>,
    /// Read models and checkpoints.
    pub read_models: Arc<dyn ReadModelStore>,
}

impl std::fmt::Debug for RuntimeStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeStores").finish_non_exhaustive()
    }
}

impl RuntimeStores {
    /// One backend for everything.
    pub fn from_store<S: EventStore + SnapshotStore + ReadModelStore>(store: Arc<S>) -> Self {
        Self {
            events: store.clone(),
            snapshots: store.clone(),
            read_models: store,
        }
    }

    /// Every capability from one backend handle (with whatever layers it carries).
    pub fn from_backend(backend: Arc<dyn tracktrace_core::Backend>) -> Self {
        Self {
            events: backend.clone(),
            snapshots: backend.clone(),
            read_models: backend,
        }
    }
}

fn tenant() -> TenantId {
    TenantId::parse("acme").expect("valid tenant literal")
}

// ---------------------------------------------------------------------------------------------
// Test domain: a bank account.

/// A bank account: the aggregate of the runtime checks (and a template for your own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Current balance.
    pub balance: i64,
    /// Operations applied.
    pub operations: u64,
    /// Order-sensitive checksum of every amount applied (detects reordering or loss).
    pub checksum: u64,
}

/// What an account can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountCommand {
    /// Adds money.
    Deposit(i64),
    /// Takes money out, if there is enough.
    Withdraw(i64),
}

/// What happened to an account. `Deposited` is at schema version 2 (version 1 had no currency:
/// see [`account_upcasters`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// Money came in.
    Deposited {
        /// Amount.
        amount: i64,
        /// ISO currency code (added in schema version 2).
        currency: String,
    },
    /// Money went out.
    Withdrawn {
        /// Amount.
        amount: i64,
    },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Deposited { .. } => "Deposited",
            AccountEvent::Withdrawn { .. } => "Withdrawn",
        }
    }
    fn schema_version(&self) -> u32 {
        match self {
            AccountEvent::Deposited { .. } => 2,
            AccountEvent::Withdrawn { .. } => 1,
        }
    }
}

/// Why an account refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Not enough money.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Current balance.
        balance: i64,
        /// Requested amount.
        requested: i64,
    },
}

impl Aggregate for Account {
    const TYPE: &'static str = "Account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Codec = JsonCodec;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(match *command {
            AccountCommand::Deposit(amount) => vec![AccountEvent::Deposited {
                amount,
                currency: "EUR".into(),
            }],
            AccountCommand::Withdraw(amount) if amount > self.balance => {
                return Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    requested: amount,
                });
            }
            AccountCommand::Withdraw(amount) => vec![AccountEvent::Withdrawn { amount }],
        })
    }

    fn apply(&mut self, event: &AccountEvent) {
        let delta = match event {
            AccountEvent::Deposited { amount, .. } => *amount,
            AccountEvent::Withdrawn { amount } => -amount,
        };
        self.balance += delta;
        self.operations += 1;
        self.checksum = self.checksum.wrapping_mul(31).wrapping_add(delta as u64);
    }
}

/// Field validation of account commands: amounts must be in `1..=1_000_000`.
pub fn validate_account(command: &AccountCommand) -> Vec<FieldError> {
    let (AccountCommand::Deposit(a) | AccountCommand::Withdraw(a)) = command;
    if (1..=1_000_000).contains(a) {
        Vec::new()
    } else {
        vec![FieldError::new("amount", "must be between 1 and 1000000")]
    }
}

/// `Deposited` v1 (`{"Deposited":{"amount":N}}`) → v2 (adds `"currency":"EUR"`).
pub fn account_upcasters() -> Upcasters {
    Upcasters::new().json("Deposited", 1, |mut v| {
        match v.get_mut("Deposited").and_then(|d| d.as_object_mut()) {
            Some(d) => {
                d.entry("currency").or_insert_with(|| "EUR".into());
            }
            None => return Err("not a Deposited payload".into()),
        }
        Ok(v)
    })
}

/// The default command bus of the checks: validator, cache, snapshots every `snapshot_every`.
pub fn account_bus(s: &RuntimeStores, snapshot_every: u64) -> CommandBus<Account> {
    CommandBus::new(
        Repository::<Account>::new(s.events.clone())
            .with_upcasters(account_upcasters())
            .with_snapshots(s.snapshots.clone(), snapshot_every)
            .with_cache(1024),
    )
    .with_validator(validate_account)
}

// ---------------------------------------------------------------------------------------------
// Command side checks.

/// 16 concurrent deposits on one account all succeed through conflict retries, and the final
/// state equals executing them sequentially.
pub async fn concurrent_commands(s: RuntimeStores) -> CheckResult {
    let t = tenant();
    // Two buses (like two server processes) with their own caches, plus retries.
    let buses = [account_bus(&s, 5), account_bus(&s, 5)];
    let mut tasks = Vec::new();
    for i in 0..16i64 {
        let bus = buses[i as usize % 2].clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            bus.execute(&t, "acc-1", AccountCommand::Deposit(i + 1))
                .await
        }));
    }
    let mut amounts_in_commit_order = BTreeMap::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let out = ok(task.await.map_err(|e| e.to_string()), "join command task")?;
        let out = ok(out, &format!("command {i}"))?;
        ensure_eq!(out.events.len(), 1, "one event per deposit");
        amounts_in_commit_order.insert(out.version, i as i64 + 1);
    }
    let fresh = Repository::<Account>::new(s.events.clone()).with_upcasters(account_upcasters());
    let replayed = ok(fresh.replay(&t, "acc-1").await, "replay")?;
    let mut sequential = Account::default();
    for amount in amounts_in_commit_order.values() {
        for e in ok(
            sequential.handle(&AccountCommand::Deposit(*amount)),
            "sequential handle",
        )? {
            sequential.apply(&e);
        }
    }
    ensure_eq!(replayed.version, Version::new(16), "16 events stored");
    ensure_eq!(
        replayed.state,
        sequential,
        "final state == sequential execution"
    );
    ensure_eq!(replayed.state.balance, (1..=16).sum::<i64>(), "balance");
    for bus in &buses {
        let loaded = ok(bus.repository().load(&t, "acc-1").await, "load via bus")?;
        ensure_eq!(
            loaded.state,
            sequential,
            "cached/snapshot load == sequential"
        );
    }
    Ok(())
}

/// An append-only log of readings: an aggregate without invariants
/// ([`tracktrace_core::Concurrency::Unchecked`]), for [`unchecked_concurrent_commands`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readings {
    /// Readings applied.
    pub count: u64,
    /// Sum of the readings.
    pub sum: i64,
}

/// A reading was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadingTaken {
    /// The value.
    pub value: i64,
}

impl DomainEvent for ReadingTaken {
    fn event_type(&self) -> &'static str {
        "ReadingTaken"
    }
}

impl Aggregate for Readings {
    const TYPE: &'static str = "Readings";
    const CONCURRENCY: tracktrace_core::Concurrency = tracktrace_core::Concurrency::Unchecked;
    type Command = i64;
    type Event = ReadingTaken;
    type Error = std::convert::Infallible;
    type Codec = JsonCodec;

    fn handle(&self, value: &i64) -> Result<Vec<ReadingTaken>, std::convert::Infallible> {
        Ok(vec![ReadingTaken { value: *value }])
    }

    fn apply(&mut self, e: &ReadingTaken) {
        self.count += 1;
        self.sum += e.value;
    }
}

/// 32 concurrent commands on one [`tracktrace_core::Concurrency::Unchecked`] aggregate, through two
/// buses (two processes) that may not retry at all: every command succeeds at its first
/// attempt, the stream holds 32 events at versions 1..=32, and loads through either bus (cache,
/// snapshots every 5) equal a full replay afterwards.
pub async fn unchecked_concurrent_commands(s: RuntimeStores) -> CheckResult {
    let t = tenant();
    let no_retry = RetryPolicy::none();
    let bus = || {
        CommandBus::new(
            Repository::<Readings>::new(s.events.clone())
                .with_snapshots(s.snapshots.clone(), 5)
                .with_cache(64),
        )
        .with_retry(no_retry)
    };
    let buses = [bus(), bus()];
    let mut tasks = Vec::new();
    for i in 0..32i64 {
        let bus = buses[i as usize % 2].clone();
        let t = t.clone();
        tasks.push(tokio::spawn(
            async move { bus.execute(&t, "r-1", i + 1).await },
        ));
    }
    let mut versions = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let out = ok(task.await.map_err(|e| e.to_string()), "join command task")?;
        let out = ok(out, &format!("command {i} (no retries allowed)"))?;
        ensure_eq!(out.attempts, 1, "an unchecked command never conflicts");
        ensure_eq!(out.events.len(), 1, "one event per command");
        versions.push(out.version.get());
    }
    versions.sort_unstable();
    ensure_eq!(
        versions,
        (1..=32).collect::<Vec<u64>>(),
        "each command got its own version, contiguous from 1"
    );
    let replayed = ok(
        Repository::<Readings>::new(s.events.clone())
            .replay(&t, "r-1")
            .await,
        "replay",
    )?;
    ensure_eq!(replayed.version, Version::new(32), "32 events stored");
    ensure_eq!(
        replayed.state.sum,
        (1..=32).sum::<i64>(),
        "every reading stored once"
    );
    for bus in &buses {
        let loaded = ok(bus.repository().load(&t, "r-1").await, "load via bus")?;
        ensure_eq!(loaded, replayed, "cached/snapshot load == replay");
    }
    // A later command on a warm cache still lands at the end of the stream.
    let out = ok(
        buses[0].execute(&t, "r-1", 100).await,
        "command after the race",
    )?;
    ensure_eq!(out.version, Version::new(33), "appended after the others");
    Ok(())
}

/// The command path's cost model (see [`tracktrace_core::Repository`]), in store calls per command: a
/// new aggregate through `create` is one append and no read; the default repository reads an
/// uncached aggregate once and then appends; a cached one only appends (a growing stream costs
/// the same per command whatever its length); with the cache off every command reads. `create`
/// and a stale cache are only cost hints: an aggregate that exists, or that another process
/// moved on, ends in exactly the state and outcome `execute` gives, without using up an
/// attempt of the retry policy.
pub async fn command_costs(s: RuntimeStores) -> CheckResult {
    let t = tenant();
    let counted = Arc::new(CountingStore::new(&s));
    let bus = |repo: Repository<Account>| CommandBus::new(repo).with_retry(RetryPolicy::none());
    let default = bus(Repository::new(counted.clone()));
    let cost = |before: (u64, u64)| {
        let now = counted.calls();
        (now.0 - before.0, now.1 - before.1)
    };

    let before = counted.calls();
    let out = ok(
        default
            .create(&t, "cost-new", AccountCommand::Deposit(10))
            .await,
        "create on a new aggregate",
    )?;
    ensure_eq!(out.version, Version::new(1), "created at version 1");
    ensure_eq!(
        cost(before),
        (0, 1),
        "create of a new aggregate: (reads, appends)"
    );

    // A growing stream through one repository: cached, one append per command.
    let before = counted.calls();
    for _ in 0..20 {
        ok(
            default
                .execute(&t, "cost-new", AccountCommand::Deposit(1))
                .await,
            "deposit on a cached aggregate",
        )?;
    }
    ensure_eq!(cost(before), (0, 20), "20 commands on a cached aggregate");

    // Another repository (another process): not cached there, so one read, then one append.
    let other = bus(Repository::new(counted.clone()));
    let before = counted.calls();
    let out = ok(
        other
            .execute(&t, "cost-new", AccountCommand::Withdraw(30))
            .await,
        "withdraw through a second repository",
    )?;
    ensure_eq!(
        out.version,
        Version::new(22),
        "appended after the 21 events"
    );
    ensure_eq!(cost(before), (1, 1), "uncached existing aggregate");

    // The first repository's entry is now stale: a failed append, a tail read, an append,
    // and the retry policy (no retries) is not used up by it.
    let before = counted.calls();
    let out = ok(
        default
            .execute(&t, "cost-new", AccountCommand::Deposit(2))
            .await,
        "deposit on a stale cache entry",
    )?;
    ensure_eq!(
        out.version,
        Version::new(23),
        "after the other repository's event"
    );
    ensure_eq!(out.attempts, 1, "a stale cache entry is not a retry");
    ensure_eq!(cost(before), (1, 2), "stale cache entry");

    // `create` on an aggregate that exists: the same outcome as `execute`. A withdrawal the
    // empty state would refuse succeeds on the stored balance (2).
    let fresh = bus(Repository::new(counted.clone()));
    let out = ok(
        fresh
            .create(&t, "cost-new", AccountCommand::Withdraw(2))
            .await,
        "create on an existing aggregate",
    )?;
    ensure_eq!(out.version, Version::new(24), "appended at the end");
    ensure_eq!(out.attempts, 1, "a wrong `create` guess is not a retry");
    let fresh = bus(Repository::new(counted.clone()));
    let out = ok(
        fresh
            .create(&t, "cost-new", AccountCommand::Deposit(7))
            .await,
        "create of a deposit on an existing aggregate",
    )?;
    ensure_eq!(
        out.version,
        Version::new(25),
        "deposit lands at the end, not at version 1"
    );
    match fresh
        .create(&t, "cost-new", AccountCommand::Withdraw(8))
        .await
    {
        Err(CommandError::Rejected(AccountError::InsufficientFunds { balance: 7, .. })) => {}
        other => {
            return Err(CheckFailure(format!(
                "create on an existing aggregate must decide on its stored state, got {other:?}"
            )));
        }
    }
    let loaded = ok(default.repository().load(&t, "cost-new").await, "load")?;
    let replayed = ok(default.repository().replay(&t, "cost-new").await, "replay")?;
    ensure_eq!(loaded, replayed, "cached state == replay");
    ensure_eq!(loaded.state.balance, 7, "balance after every command");

    // Cache off: every command reads the stream.
    let uncached = bus(Repository::new(counted.clone()).with_cache(0));
    let before = counted.calls();
    for _ in 0..3 {
        ok(
            uncached
                .execute(&t, "cost-new", AccountCommand::Deposit(1))
                .await,
            "deposit without cache",
        )?;
    }
    ensure_eq!(cost(before), (3, 3), "three commands without cache");

    // `CacheMiss::AssumeNew`: a new aggregate is one append, an existing one falls back.
    let assume = bus(Repository::new(counted.clone()).on_cache_miss(CacheMiss::AssumeNew));
    let before = counted.calls();
    ok(
        assume
            .execute(&t, "cost-other", AccountCommand::Deposit(1))
            .await,
        "deposit on a new aggregate, assumed new",
    )?;
    ensure_eq!(cost(before), (0, 1), "AssumeNew on a new aggregate");
    let out = ok(
        assume
            .execute(&t, "cost-new", AccountCommand::Deposit(1))
            .await,
        "deposit on an existing aggregate, assumed new",
    )?;
    ensure_eq!(
        out.version,
        Version::new(29),
        "assumed new, appended at the end"
    );
    Ok(())
}

/// Validation, domain rejection, idempotent command ids and typed conflict after retries.
pub async fn command_errors(s: RuntimeStores) -> CheckResult {
    let t = tenant();
    let bus = account_bus(&s, 0);
    match bus.execute(&t, "acc-2", AccountCommand::Deposit(0)).await {
        Err(CommandError::Validation { errors }) => {
            ensure_eq!(errors[0].field, "amount", "field error names the field")
        }
        other => {
            return Err(CheckFailure(format!(
                "expected validation error, got {other:?}"
            )));
        }
    }
    ok(
        bus.execute(&t, "acc-2", AccountCommand::Deposit(10)).await,
        "deposit",
    )?;
    match bus.execute(&t, "acc-2", AccountCommand::Withdraw(11)).await {
        Err(CommandError::Rejected(AccountError::InsufficientFunds { balance: 10, .. })) => {}
        other => return Err(CheckFailure(format!("expected rejection, got {other:?}"))),
    }
    // Same command id twice: stored once.
    let meta = CommandMeta::with_command_id(Uuid::now_v7());
    let a = ok(
        bus.execute_with(&t, "acc-2", AccountCommand::Deposit(5), meta.clone())
            .await,
        "first",
    )?;
    let b = ok(
        bus.execute_with(&t, "acc-2", AccountCommand::Deposit(5), meta)
            .await,
        "retry",
    )?;
    ensure!(
        !a.duplicate && b.duplicate,
        "second execution is a duplicate"
    );
    ensure_eq!(a.events, b.events, "same references");
    let loaded = ok(bus.repository().load(&t, "acc-2").await, "load")?;
    ensure_eq!(loaded.state.balance, 15, "deposit applied once");
    // A retried command is answered from its stored events, even where re-running the handler
    // against the newer state would now reject it (withdrawing the whole balance twice).
    let meta = CommandMeta::with_command_id(Uuid::now_v7());
    let a = ok(
        bus.execute_with(&t, "acc-2", AccountCommand::Withdraw(15), meta.clone())
            .await,
        "withdraw all",
    )?;
    let b = ok(
        bus.execute_with(&t, "acc-2", AccountCommand::Withdraw(15), meta)
            .await,
        "retried withdraw",
    )?;
    ensure!(
        b.duplicate && a.events == b.events,
        "retry answered as duplicate: {a:?} {b:?}"
    );
    ok(
        bus.execute(&t, "acc-2", AccountCommand::Deposit(15)).await,
        "deposit back",
    )?;
    // A rejection decided on a stale cache is re-checked: another bus deposits, then a
    // withdrawal that only the fresh state allows succeeds.
    let other = account_bus(&s, 0);
    ok(
        other
            .execute(&t, "acc-2", AccountCommand::Deposit(100))
            .await,
        "other bus",
    )?;
    ok(
        bus.execute(&t, "acc-2", AccountCommand::Withdraw(110))
            .await,
        "withdraw allowed by fresh state",
    )?;
    // Persistent contention ends as a typed conflict: a store that always conflicts.
    let conflicting = CommandBus::new(Repository::<Account>::new(Arc::new(Intercepted(
        AlwaysConflict(s.events.clone()),
    ))))
    .with_retry(
        RetryPolicy::default()
            .with_max_attempts(3)
            .with_backoff(Duration::from_micros(100), Duration::from_millis(1)),
    );
    match conflicting
        .execute(&t, "acc-3", AccountCommand::Deposit(1))
        .await
    {
        Err(CommandError::Conflict { attempts: 3, .. }) => {}
        other => return Err(CheckFailure(format!("expected conflict, got {other:?}"))),
    }
    Ok(())
}

/// A store whose appends always conflict (for the retry-exhaustion check).
struct AlwaysConflict(Arc<dyn EventStore>);

#[async_trait]
impl Intercept for AlwaysConflict {
    type Inner = dyn EventStore;

    fn inner(&self) -> &dyn EventStore {
        &*self.0
    }

    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        let actual = self.0.stream_version(&req.tenant, &req.stream).await?;
        Err(Error::Conflict {
            tenant: req.tenant,
            stream: req.stream,
            expected: req.expected,
            actual: actual.next(),
        })
    }
}

/// Runs `ops` (`(deposit?, amount)`) through a bus snapshotting every `every` events, then
/// checks that loading from snapshot + tail equals a full replay.
pub async fn snapshot_matches_replay(
    s: RuntimeStores,
    ops: &[(bool, i64)],
    every: u64,
) -> CheckResult {
    let t = tenant();
    let id = format!("snap-{}", Uuid::now_v7().simple());
    let bus = account_bus(&s, every);
    for (deposit, amount) in ops {
        let cmd = if *deposit {
            AccountCommand::Deposit(*amount)
        } else {
            AccountCommand::Withdraw(*amount)
        };
        match bus.execute(&t, &id, cmd).await {
            Ok(_) | Err(CommandError::Rejected(_)) => {}
            Err(e) => return Err(CheckFailure(format!("command: {e}"))),
        }
    }
    // A fresh repository (no cache): snapshot + tail.
    let fresh = Repository::<Account>::new(s.events.clone())
        .with_upcasters(account_upcasters())
        .with_snapshots(s.snapshots.clone(), every);
    let from_snapshot = ok(fresh.load(&t, &id).await, "snapshot load")?;
    let replayed = ok(fresh.replay(&t, &id).await, "replay")?;
    ensure_eq!(from_snapshot, replayed, "snapshot + tail == full replay");
    let stream = ok(Repository::<Account>::stream_id(&id), "stream id")?;
    let snap = ok(
        s.snapshots.load_snapshot(&t, &stream).await,
        "load snapshot",
    )?;
    let expected_snapshot = replayed.version.get() / every * every;
    ensure_eq!(
        snap.map(|s| s.version.get()).unwrap_or(0),
        expected_snapshot,
        "latest snapshot at the last multiple of {every}"
    );
    Ok(())
}

/// Property test of [`snapshot_matches_replay`] over random command sequences.
pub fn snapshot_proptest<F, Fut>(make: F, cases: u32) -> CheckResult
where
    F: Fn() -> Fut,
    Fut: Future<Output = RuntimeStores>,
{
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestError, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec((any::<bool>(), 1i64..100), 0..60),
        1u64..12,
    );
    let result = runner.run(&strategy, |(ops, every)| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(format!("runtime: {e}")))?;
        rt.block_on(async { snapshot_matches_replay(make().await, &ops, every).await })
            .map_err(|e| TestCaseError::fail(e.0))
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, input)) => {
            Err(CheckFailure(format!("{reason}; minimal input: {input:?}")))
        }
        Err(TestError::Abort(reason)) => Err(CheckFailure(format!("aborted: {reason}"))),
    }
}

/// An event stored with schema version 1 is read back as version 2 through the upcaster; without
/// it, reading is a typed corruption error (never a panic or a silent default).
pub async fn upcaster_v1_to_v2(s: RuntimeStores) -> CheckResult {
    let t = tenant();
    let stream = ok(Repository::<Account>::stream_id("legacy"), "stream id")?;
    let v1 = NewEvent::json(
        "Deposited",
        &serde_json::json!({"Deposited": {"amount": 7}}),
    );
    ok(
        s.events
            .append_to(&t, &stream, ExpectedVersion::NoStream, vec![v1])
            .await,
        "append v1",
    )?;
    let with = Repository::<Account>::new(s.events.clone()).with_upcasters(account_upcasters());
    let stored = ok(s.events.read_stream_forwards(&t, &stream).await, "read")?;
    ensure_eq!(stored[0].schema_version, 1, "stored as version 1");
    let decoded = ok(with.decode_event(stored[0].clone()), "decode with upcaster")?;
    ensure_eq!(
        decoded,
        AccountEvent::Deposited {
            amount: 7,
            currency: "EUR".into()
        },
        "read back as version 2"
    );
    ensure_eq!(
        ok(with.load(&t, "legacy").await, "load")?.state.balance,
        7,
        "aggregate state from the upcast event"
    );
    let without = Repository::<Account>::new(s.events.clone());
    match without.load(&t, "legacy").await {
        Err(Error::Corruption { .. }) => {}
        other => return Err(CheckFailure(format!("expected corruption, got {other:?}"))),
    }
    // New commands on top of the legacy event work, and are stored at version 2.
    let bus = account_bus(&s, 0);
    ok(
        bus.execute(&t, "legacy", AccountCommand::Deposit(3)).await,
        "deposit",
    )?;
    let stored = ok(s.events.read_stream_forwards(&t, &stream).await, "read")?;
    ensure_eq!(stored[1].schema_version, 2, "new events at version 2");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Query side.

/// A projection that is *not* idempotent (it increments counters), so applying an event twice
/// shows: per-account count and sum, plus a global count, all in namespace `"balances"`.
#[derive(Debug, Clone)]
pub struct BalanceProjection {
    /// Projection (and checkpoint) name.
    pub name: String,
    /// Delay per event, to make a catch-up slow enough to be interrupted (crash tests).
    pub delay: Option<Duration>,
}

impl BalanceProjection {
    /// A projection named `name`, no delay.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            delay: None,
        }
    }

    /// The namespace it writes.
    pub fn namespace(&self) -> String {
        format!("{}.balances", self.name)
    }
}

#[async_trait]
impl Projection for BalanceProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_stream_prefix("Account-")
    }

    fn namespaces(&self) -> Vec<String> {
        vec![self.namespace()]
    }

    async fn apply(
        &mut self,
        event: &RecordedEvent,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), tracktrace_core::BoxError> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        let ns = self.namespace();
        let e: AccountEvent = serde_json::from_slice(&event.payload)?;
        let delta = match e {
            AccountEvent::Deposited { amount, .. } => amount,
            AccountEvent::Withdrawn { amount } => -amount,
        };
        let key = event.stream.as_str().as_bytes().to_vec();
        let (count, sum): (u64, i64) = tx.get_json(&ns, &key).await?.unwrap_or((0, 0));
        tx.put_json(&ns, key, &(count + 1, sum + delta))?;
        let total: u64 = tx.get_json(&ns, b"~total").await?.unwrap_or(0);
        tx.put_json(&ns, b"~total".to_vec(), &(total + 1))?;
        Ok(())
    }
}

/// Every entry of a namespace.
pub async fn dump(
    store: &dyn ReadModelStore,
    ns: &str,
) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>> {
    store
        .scan(ns, KeyRange::default(), Direction::Forwards, usize::MAX)
        .await
}

/// Appends `n` deposits of 1..=n spread over `accounts` account streams (plain appends).
pub async fn seed_accounts(store: &dyn EventStore, n: usize, accounts: usize) -> Result<()> {
    let t = tenant();
    for i in 0..n {
        let stream = Repository::<Account>::stream_id(&format!("p{}", i % accounts))?;
        let e = AccountEvent::Deposited {
            amount: i as i64 + 1,
            currency: "EUR".into(),
        };
        let ev = <JsonCodec as tracktrace_core::Codec>::new_event("Deposited", 2, &e)
            .map_err(|e| Error::invalid("payload", e.to_string()))?;
        store
            .append_to(&t, &stream, ExpectedVersion::Any, vec![ev])
            .await?;
    }
    Ok(())
}

/// A projection interrupted mid-catch-up (runner dropped between batches, as after a crash)
/// and restarted ends identical to a clean rebuild; a second runner is fenced off; lag is
/// reported; live events are picked up.
pub async fn projection_restart_and_rebuild(s: RuntimeStores) -> CheckResult {
    ok(seed_accounts(&*s.events, 200, 7).await, "seed")?;
    let p = BalanceProjection::new("balances-restart");
    let ns = p.namespace();
    let mut first = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), p.clone())
        .with_batch_size(16);
    for _ in 0..5 {
        ok(first.step().await, "step")?;
    }
    let lag = first.lag_handle().get();
    ensure!(lag.positions > 0, "lag reported while behind: {lag:?}");
    // A stale runner that loaded the checkpoint before the others moved it.
    let mut stale = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), p.clone())
        .with_batch_size(16);
    ok(stale.checkpoint().await, "stale checkpoint")?;
    drop(first); // the "crash": nothing of the runner survives but what it committed
    let mut second = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), p.clone())
        .with_batch_size(16);
    ok(second.catch_up().await, "catch up after restart")?;
    let lag = second.lag_handle().get();
    ensure_eq!(lag.positions, 0, "caught up: no lag");
    match stale.step().await {
        Err(e) if matches!(e.store_error(), Some(Error::CheckpointMoved { .. })) => {}
        other => {
            return Err(CheckFailure(format!(
                "a stale runner must be fenced off, got {other:?}"
            )));
        }
    }
    let after_restart = ok(dump(&*s.read_models, &ns).await, "dump")?;
    ok(second.rebuild().await, "rebuild")?;
    let rebuilt = ok(dump(&*s.read_models, &ns).await, "dump")?;
    ensure_eq!(after_restart, rebuilt, "restarted == clean rebuild");
    let total: u64 = serde_json::from_slice(
        &rebuilt
            .iter()
            .find(|(k, _)| &k[..] == b"~total")
            .ok_or_else(|| CheckFailure("no total".into()))?
            .1,
    )
    .map_err(|e| CheckFailure(e.to_string()))?;
    ensure_eq!(total, 200, "each event applied exactly once");
    // Live: the runner follows new events until shut down.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let lag = second.lag_handle();
    let task = tokio::spawn(async move {
        second
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    ok(seed_accounts(&*s.events, 10, 7).await, "seed live")?;
    let head = ok(s.events.head().await, "head")?;
    let mut caught_up = false;
    for _ in 0..500 {
        if lag.get().checkpoint >= head {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    ok(
        ok(task.await.map_err(|e| e.to_string()), "join")?,
        "live run",
    )?;
    ensure!(caught_up, "live runner reached the new head {head}");
    let live = ok(dump(&*s.read_models, &ns).await, "dump")?;
    let total: u64 = serde_json::from_slice(
        &live
            .iter()
            .find(|(k, _)| &k[..] == b"~total")
            .ok_or_else(|| CheckFailure("no total".into()))?
            .1,
    )
    .map_err(|e| CheckFailure(e.to_string()))?;
    ensure_eq!(total, 210, "live events applied once");
    Ok(())
}

/// The balance projection's global count.
async fn balance_total(store: &dyn ReadModelStore, ns: &str) -> Result<u64, CheckFailure> {
    let v = ok(store.get(ns, b"~total").await, "get total")?;
    match v {
        None => Ok(0),
        Some(v) => serde_json::from_slice(&v).map_err(|e| CheckFailure(e.to_string())),
    }
}

/// Read-your-writes through a projection: `ProjectionRunner::wait_for` (driving the runner in
/// this task) and `ProjectionProgress::wait_for` (while the runner runs in another) return once
/// the position of a just-appended event is applied, also for positions the projection's
/// filter skips; a progress handle whose runner is gone fails with `Error::Closed`.
pub async fn projection_wait_for_reads_your_writes(s: RuntimeStores) -> CheckResult {
    ok(seed_accounts(&*s.events, 20, 3).await, "seed")?;
    let head = ok(s.events.head().await, "head")?;
    let p = BalanceProjection::new("balances-wait");
    let ns = p.namespace();
    let mut runner =
        ProjectionRunner::new(s.events.clone(), s.read_models.clone(), p).with_batch_size(4);
    let cp = ok(
        tokio::time::timeout(Duration::from_secs(10), runner.wait_for(head))
            .await
            .map_err(|_| "timed out".to_string()),
        "runner.wait_for",
    )?;
    let cp = ok(cp, "runner.wait_for")?;
    ensure!(cp >= head, "wait_for({head}) returned checkpoint {cp}");
    ensure_eq!(
        balance_total(&*s.read_models, &ns).await?,
        20,
        "applied by wait_for"
    );

    let progress = runner.progress();
    ensure!(
        progress.checkpoint() >= head,
        "progress starts at the runner's checkpoint"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        runner
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    for i in 0..10u64 {
        ok(seed_accounts(&*s.events, 1, 3).await, "append")?;
        // An event the projection's filter skips, after it: waiting for it covers both.
        let noise = ok(
            s.events
                .append_to(
                    &tenant(),
                    &StreamId::from_static("Noise-1"),
                    ExpectedVersion::Any,
                    vec![NewEvent::json("Noise", &serde_json::json!({ "i": i }))],
                )
                .await,
            "append noise",
        )?;
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            progress.wait_for(noise.last_position()),
        )
        .await
        .map_err(|_| CheckFailure(format!("progress.wait_for timed out at write {i}")))?;
        ok(waited, "progress.wait_for")?;
        ensure_eq!(
            balance_total(&*s.read_models, &ns).await?,
            21 + i,
            "the write is visible once wait_for returns"
        );
    }
    let _ = stop_tx.send(());
    ok(
        ok(task.await.map_err(|e| e.to_string()), "join")?,
        "live run",
    )?;
    // The runner is gone: waiting for more fails instead of hanging.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        progress.wait_for(Position::new(u64::MAX)),
    )
    .await
    .map_err(|_| CheckFailure("wait_for on a dropped runner hung".into()))?;
    ensure!(
        matches!(r, Err(Error::Closed)),
        "wait_for on a dropped runner must be Error::Closed, got {r:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sagas.

/// Commands of [`OrderSaga`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderCommand {
    /// Reserve stock for the order.
    Reserve(String),
    /// Ship it.
    Ship(String),
    /// Release the reservation (compensation).
    Release(String),
    /// Cancel the order (payment timed out).
    Cancel(String),
}

/// State of [`OrderSaga`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    /// The order.
    pub order: String,
    /// Where it is.
    pub stage: String,
}

/// The test saga: `OrderPlaced` → reserve + payment deadline; `PaymentReceived` → ship, cancel
/// the deadline; deadline → cancel the order; shipping fails → release the reservation.
#[derive(Debug, Clone)]
pub struct OrderSaga {
    /// Payment deadline.
    pub payment_timeout: Duration,
}

impl Saga for OrderSaga {
    const NAME: &'static str = "order";
    type State = OrderState;
    type Command = OrderCommand;
    type Failure = CommandFailure;

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_stream_prefix("Order-")
    }

    fn correlate(&self, event: &RecordedEvent) -> Option<String> {
        event
            .stream
            .as_str()
            .strip_prefix("Order-")
            .map(str::to_owned)
    }

    fn on_event(&self, state: &OrderState, event: &RecordedEvent) -> Reaction<Self> {
        let order = event.stream.as_str().to_owned();
        match event.event_type.as_str() {
            "OrderPlaced" => Reaction::new()
                .state(OrderState {
                    order: order.clone(),
                    stage: "reserving".into(),
                })
                .dispatch(OrderCommand::Reserve(order))
                .schedule("payment-timeout", self.payment_timeout),
            "PaymentReceived" => Reaction::new()
                .state(OrderState {
                    stage: "shipping".into(),
                    ..state.clone()
                })
                .cancel("payment-timeout")
                .dispatch(OrderCommand::Ship(order)),
            _ => Reaction::new(),
        }
    }

    fn on_deadline(&self, state: &OrderState, _deadline: &str) -> Reaction<Self> {
        Reaction::new()
            .state(OrderState {
                stage: "cancelled".into(),
                ..state.clone()
            })
            .dispatch(OrderCommand::Cancel(state.order.clone()))
            .complete()
    }

    fn on_success(&self, state: &OrderState, command: &OrderCommand) -> Reaction<Self> {
        match command {
            OrderCommand::Ship(_) => Reaction::new()
                .state(OrderState {
                    stage: "shipped".into(),
                    ..state.clone()
                })
                .complete(),
            _ => Reaction::new(),
        }
    }

    fn on_failure(
        &self,
        state: &OrderState,
        command: &OrderCommand,
        failure: &CommandFailure,
    ) -> Reaction<Self> {
        match command {
            // Only a refusal by the carrier is compensated (the failure is typed: kind and code).
            OrderCommand::Ship(order)
                if failure.kind == FailureKind::Rejected
                    && failure.code.as_deref() == Some(CARRIER_REFUSED) =>
            {
                Reaction::new()
                    .state(OrderState {
                        stage: "compensated".into(),
                        ..state.clone()
                    })
                    .compensate(OrderCommand::Release(order.clone()))
                    .complete()
            }
            _ => Reaction::new(),
        }
    }
}

/// The failure code [`RecordingDispatcher`] gives a refused `Ship`.
pub const CARRIER_REFUSED: &str = "CarrierRefused";

/// A dispatcher that logs every send, rejects the commands it is told to, fails transiently
/// while `down`, and checks that each command was recorded in the saga stream *before* it was
/// sent.
#[derive(Clone)]
pub struct RecordingDispatcher {
    store: Arc<dyn EventStore>,
    /// Every send: (dispatch id, command).
    pub sent: Arc<Mutex<Vec<(Uuid, OrderCommand)>>>,
    /// Reject `Ship` commands.
    pub reject_ship: bool,
    /// Fail transiently.
    pub down: Arc<AtomicBool>,
    /// Sends whose outbox record was missing (must stay 0).
    pub unrecorded: Arc<AtomicU32>,
}

impl std::fmt::Debug for RecordingDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingDispatcher")
            .finish_non_exhaustive()
    }
}

impl RecordingDispatcher {
    /// A dispatcher over `store` (used to check the outbox records).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            sent: Arc::default(),
            reject_ship: false,
            down: Arc::default(),
            unrecorded: Arc::default(),
        }
    }

    /// Sends so far.
    pub fn sent(&self) -> Vec<(Uuid, OrderCommand)> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl CommandDispatcher<OrderCommand> for RecordingDispatcher {
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &OrderCommand,
    ) -> Result<(), DispatchError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(DispatchError::Transient("receiver down".into()));
        }
        let recorded = EventId::from_uuid(dispatch_id)
            .ok()
            .map(|id| self.store.get_event(tenant, id));
        let recorded = match recorded {
            Some(f) => matches!(f.await, Ok(Some(_))),
            None => false,
        };
        if !recorded {
            self.unrecorded.fetch_add(1, Ordering::SeqCst);
        }
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((dispatch_id, command.clone()));
        match command {
            OrderCommand::Ship(_) if self.reject_ship => Err(DispatchError::Rejected(
                CommandFailure::rejected("carrier refused the parcel").with_code(CARRIER_REFUSED),
            )),
            _ => Ok(()),
        }
    }
}

async fn place(s: &RuntimeStores, order: &str, event_type: &str) -> Result<(), CheckFailure> {
    let stream = ok(StreamId::parse(format!("Order-{order}")), "stream")?;
    ok(
        s.events
            .append_to(
                &tenant(),
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json(event_type, &serde_json::json!({}))],
            )
            .await,
        "append order event",
    )?;
    Ok(())
}

fn count<St, C, F>(
    records: &[SagaRecord<St, C, F>],
    f: impl Fn(&SagaRecord<St, C, F>) -> bool,
) -> usize {
    records.iter().filter(|r| f(r)).count()
}

/// A deadline scheduled before a "crash" (the runner is dropped) fires after the restart,
/// exactly once, and a command recorded but not sent before the crash is sent after it with
/// the same dispatch id.
pub async fn saga_deadline_across_restart(s: RuntimeStores) -> CheckResult {
    // Long enough that the first runner cannot reach the deadline before its "crash".
    let saga = OrderSaga {
        payment_timeout: Duration::from_millis(500),
    };
    let d1 = RecordingDispatcher::new(s.events.clone());
    d1.down.store(true, Ordering::SeqCst);
    place(&s, "o1", "OrderPlaced").await?;
    let mut r1 = SagaRunner::new(
        s.events.clone(),
        s.read_models.clone(),
        saga.clone(),
        d1.clone(),
    );
    let p = ok(r1.run_once().await, "run_once")?;
    ensure_eq!(p.triggers, 1, "trigger handled");
    ensure_eq!(
        p.pending,
        1,
        "Reserve recorded but not sent (receiver down)"
    );
    drop(r1); // crash
    let d2 = RecordingDispatcher::new(s.events.clone());
    let mut r2 = SagaRunner::new(
        s.events.clone(),
        s.read_models.clone(),
        saga.clone(),
        d2.clone(),
    );
    let mut fired = 0;
    for _ in 0..300 {
        fired += ok(r2.run_once().await, "run_once after restart")?.deadlines_fired;
        if fired > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure_eq!(fired, 1, "deadline fired after restart");
    drop(r2);
    // Another restart after the deadline fired: nothing fires again.
    let mut r3 = SagaRunner::new(s.events.clone(), s.read_models.clone(), saga, d2.clone());
    let p = ok(r3.run_once().await, "run_once after second restart")?;
    ensure_eq!(p.deadlines_fired, 0, "no second firing");
    let records = ok(r3.records(&tenant(), "o1").await, "records")?;
    ensure_eq!(
        count(&records, |r| matches!(r, SagaRecord::DeadlineFired { .. })),
        1,
        "exactly one DeadlineFired record: {records:?}"
    );
    let sent = d2.sent();
    let reserve: Vec<_> = sent
        .iter()
        .filter(|(_, c)| matches!(c, OrderCommand::Reserve(_)))
        .collect();
    let cancel: Vec<_> = sent
        .iter()
        .filter(|(_, c)| matches!(c, OrderCommand::Cancel(_)))
        .collect();
    ensure_eq!(
        reserve.len(),
        1,
        "recorded Reserve sent once after the crash"
    );
    ensure_eq!(cancel.len(), 1, "Cancel sent exactly once: {sent:?}");
    ensure_eq!(d1.sent().len(), 0, "nothing sent while down");
    ensure_eq!(
        d2.unrecorded.load(Ordering::SeqCst),
        0,
        "every send was recorded first"
    );
    // Completed and done: out of memory, its state in its stream.
    ensure_eq!(
        r3.state(&tenant(), "o1"),
        None,
        "completed instance evicted"
    );
    ensure_eq!(
        ok(r3.load_state(&tenant(), "o1").await, "load_state")?.map(|s| s.stage),
        Some("cancelled".to_owned()),
        "state from saga events"
    );
    Ok(())
}

/// A failing step (shipping) triggers its compensation (release), visible as saga events; the
/// cancelled deadline never fires.
pub async fn saga_compensation(s: RuntimeStores) -> CheckResult {
    let saga = OrderSaga {
        payment_timeout: Duration::from_millis(50),
    };
    let mut d = RecordingDispatcher::new(s.events.clone());
    d.reject_ship = true;
    let mut r = SagaRunner::new(s.events.clone(), s.read_models.clone(), saga, d.clone());
    place(&s, "o2", "OrderPlaced").await?;
    place(&s, "o2", "PaymentReceived").await?;
    ok(r.run_once().await, "run_once")?;
    tokio::time::sleep(Duration::from_millis(80)).await;
    let p = ok(
        r.run_once().await,
        "run_once after the deadline would be due",
    )?;
    ensure_eq!(p.deadlines_fired, 0, "cancelled deadline does not fire");
    let records = ok(r.records(&tenant(), "o2").await, "records")?;
    let kinds: Vec<_> = records
        .iter()
        .map(|r| match r {
            SagaRecord::Triggered { event_type, .. } => format!("Triggered({event_type})"),
            SagaRecord::StateChanged { state } => format!("State({})", state.stage),
            SagaRecord::CommandScheduled {
                command,
                compensation,
            } => format!("Scheduled({command:?}, compensation={compensation})"),
            SagaRecord::CommandSucceeded { .. } => "Succeeded".into(),
            SagaRecord::CommandFailed { error, failure, .. } => {
                format!("Failed({error}; {failure:?})")
            }
            SagaRecord::DeadlineScheduled { .. } => "DeadlineScheduled".into(),
            SagaRecord::DeadlineFired { .. } => "DeadlineFired".into(),
            SagaRecord::DeadlineCancelled { .. } => "DeadlineCancelled".into(),
            SagaRecord::Completed => "Completed".into(),
            #[allow(unreachable_patterns)]
            _ => "Other".into(),
        })
        .collect();
    let expected = [
        "Triggered(OrderPlaced)",
        "State(reserving)",
        "Scheduled(Reserve(\"Order-o2\"), compensation=false)",
        "DeadlineScheduled",
        "Succeeded",
        "Triggered(PaymentReceived)",
        "State(shipping)",
        "Scheduled(Ship(\"Order-o2\"), compensation=false)",
        "DeadlineCancelled",
        "Failed(rejected (CarrierRefused): carrier refused the parcel; Some(CommandFailure { \
         kind: Rejected, code: Some(\"CarrierRefused\"), message: \"carrier refused the parcel\", \
         fields: [] }))",
        "State(compensated)",
        "Scheduled(Release(\"Order-o2\"), compensation=true)",
        "Completed",
        "Succeeded",
    ];
    ensure_eq!(kinds, expected, "saga events");
    let sent: Vec<_> = d.sent().into_iter().map(|(_, c)| c).collect();
    ensure_eq!(
        sent,
        vec![
            OrderCommand::Reserve("Order-o2".into()),
            OrderCommand::Ship("Order-o2".into()),
            OrderCommand::Release("Order-o2".into())
        ],
        "sends"
    );
    Ok(())
}

/// Sends through a [`tracktrace_core::BusDispatcher`], then "loses the acknowledgement" of the first
/// send of each dispatch (as if the saga process crashed right after sending).
struct LossyAck<D> {
    inner: D,
    acked: Mutex<std::collections::HashSet<Uuid>>,
}

#[async_trait]
impl<D: CommandDispatcher<OrderCommand>> CommandDispatcher<OrderCommand> for LossyAck<D> {
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &OrderCommand,
    ) -> Result<(), DispatchError> {
        self.inner.dispatch(tenant, dispatch_id, command).await?;
        let first = self
            .acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dispatch_id);
        if first {
            return Err(DispatchError::Transient("acknowledgement lost".into()));
        }
        Ok(())
    }
}

/// A command whose acknowledgement was lost is sent again (same dispatch id) and, through a
/// [`tracktrace_core::BusDispatcher`], applied to the target aggregate exactly once.
pub async fn saga_redelivery_is_idempotent(s: RuntimeStores) -> CheckResult {
    let route = |c: &OrderCommand| match c {
        OrderCommand::Reserve(order) => {
            Some((format!("stock-{order}"), AccountCommand::Deposit(1)))
        }
        _ => None,
    };
    let dispatcher = LossyAck {
        inner: tracktrace_core::BusDispatcher::new(account_bus(&s, 0), route),
        acked: Mutex::default(),
    };
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(3600),
    };
    place(&s, "o3", "OrderPlaced").await?;
    let mut r = SagaRunner::new(
        s.events.clone(),
        s.read_models.clone(),
        saga.clone(),
        dispatcher,
    );
    let p = ok(r.run_once().await, "first round")?;
    ensure_eq!(p.pending, 1, "ack lost: Reserve still pending");
    let p = ok(r.run_once().await, "second round")?;
    ensure_eq!(p.pending, 0, "re-sent and acknowledged");
    let account = Repository::<Account>::new(s.events.clone()).with_upcasters(account_upcasters());
    let loaded = ok(
        account.replay(&tenant(), "stock-Order-o3").await,
        "replay target",
    )?;
    ensure_eq!(
        loaded.version,
        Version::new(1),
        "the target applied the command once"
    );
    let records = ok(r.records(&tenant(), "o3").await, "records")?;
    ensure_eq!(
        count(&records, |r| matches!(
            r,
            SagaRecord::CommandSucceeded { .. }
        )),
        1,
        "one result recorded: {records:?}"
    );
    Ok(())
}

/// Commands of [`ParcelSaga`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParcelCommand {
    /// Acknowledge the parcel's `scan`-th scan.
    Ack {
        /// The parcel.
        parcel: String,
        /// How many scans the saga had seen.
        scan: u32,
    },
    /// Release a held parcel (its hold deadline came).
    Release {
        /// The parcel.
        parcel: String,
        /// How many scans the saga had seen.
        scan: u32,
    },
}

/// State of [`ParcelSaga`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParcelState {
    /// The parcel (its stream).
    pub parcel: String,
    /// Scans seen.
    pub scans: u32,
    /// Delivered: the instance is idle.
    pub delivered: bool,
}

/// A long-lived saga whose instances go idle: `Scanned` → `Ack` (with the number of scans so
/// far, so a state lost between triggers shows); `Held` → a `hold` deadline, then `Release`;
/// `Delivered` → idle ([`Saga::is_idle`]), but later scans are still handled.
#[derive(Debug, Clone)]
pub struct ParcelSaga {
    /// The hold deadline.
    pub hold: Duration,
}

impl Saga for ParcelSaga {
    const NAME: &'static str = "parcel";
    type State = ParcelState;
    type Command = ParcelCommand;
    type Failure = CommandFailure;

    fn filter(&self) -> EventFilter {
        EventFilter::default().with_stream_prefix("Parcel-")
    }

    fn correlate(&self, event: &RecordedEvent) -> Option<String> {
        event
            .stream
            .as_str()
            .strip_prefix("Parcel-")
            .map(str::to_owned)
    }

    fn on_event(&self, state: &ParcelState, event: &RecordedEvent) -> Reaction<Self> {
        let mut st = state.clone();
        st.parcel = event.stream.as_str().to_owned();
        match event.event_type.as_str() {
            "Scanned" => {
                st.scans += 1;
                Reaction::new().dispatch(ParcelCommand::Ack {
                    parcel: st.parcel.clone(),
                    scan: st.scans,
                })
            }
            "Held" => Reaction::new().schedule("hold", self.hold),
            "Delivered" => {
                st.delivered = true;
                Reaction::new()
            }
            _ => Reaction::new(),
        }
        .state(st)
    }

    fn on_deadline(&self, state: &ParcelState, _deadline: &str) -> Reaction<Self> {
        Reaction::new().dispatch(ParcelCommand::Release {
            parcel: state.parcel.clone(),
            scan: state.scans,
        })
    }

    fn on_failure(
        &self,
        _state: &ParcelState,
        _command: &ParcelCommand,
        _failure: &CommandFailure,
    ) -> Reaction<Self> {
        Reaction::new()
    }

    fn is_idle(&self, state: &ParcelState) -> bool {
        state.delivered
    }
}

/// Logs every send of [`ParcelSaga`]'s commands by instance stream, and counts sends whose
/// outbox record was missing.
#[derive(Clone)]
pub struct ParcelDispatcher {
    store: Arc<dyn EventStore>,
    /// Every send: (dispatch id, saga stream, command).
    pub sent: Arc<Mutex<Vec<(Uuid, String, ParcelCommand)>>>,
    /// Sends whose outbox record was missing (must stay 0).
    pub unrecorded: Arc<AtomicU32>,
}

impl std::fmt::Debug for ParcelDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParcelDispatcher").finish_non_exhaustive()
    }
}

impl ParcelDispatcher {
    /// A dispatcher over `store` (used to check the outbox records).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            sent: Arc::default(),
            unrecorded: Arc::default(),
        }
    }

    /// Sends so far.
    pub fn sent(&self) -> Vec<(Uuid, String, ParcelCommand)> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl CommandDispatcher<ParcelCommand> for ParcelDispatcher {
    async fn dispatch(
        &self,
        tenant: &TenantId,
        dispatch_id: Uuid,
        command: &ParcelCommand,
    ) -> Result<(), DispatchError> {
        let stored = match EventId::from_uuid(dispatch_id) {
            Ok(id) => self.store.get_event(tenant, id).await.ok().flatten(),
            Err(_) => None,
        };
        let Some(stored) = stored else {
            self.unrecorded.fetch_add(1, Ordering::SeqCst);
            return Err(DispatchError::Rejected(CommandFailure::new(
                FailureKind::Other,
                "no outbox record",
            )));
        };
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).push((
            dispatch_id,
            stored.stream.as_str().to_owned(),
            command.clone(),
        ));
        Ok(())
    }
}

async fn parcel(s: &RuntimeStores, p: &str, event_type: &str) -> Result<(), CheckFailure> {
    let stream = ok(StreamId::parse(format!("Parcel-{p}")), "stream")?;
    ok(
        s.events
            .append_to(
                &tenant(),
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::json(event_type, &serde_json::json!({}))],
            )
            .await,
        "append parcel event",
    )?;
    Ok(())
}

/// Completed and idle instances leave memory once their commands are done and come back from
/// their streams when a trigger concerns them; beyond `with_max_instances` the least recently
/// used instances without open work leave too, while instances with a pending deadline stay.
/// Throughout, every command is sent once and every deadline fires once.
pub async fn saga_bounded_instances(s: RuntimeStores) -> CheckResult {
    // Completion (OrderSaga): evicted once shipped; a later event finds it completed.
    let orders = RecordingDispatcher::new(s.events.clone());
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(3600),
    };
    let mut r = SagaRunner::new(
        s.events.clone(),
        s.read_models.clone(),
        saga,
        orders.clone(),
    );
    place(&s, "o7", "OrderPlaced").await?;
    place(&s, "o7", "PaymentReceived").await?;
    let p = ok(r.run_once().await, "orders")?;
    ensure_eq!((p.triggers, p.dispatched), (2, 2), "reserved and shipped");
    ensure_eq!(
        r.instances_in_memory(),
        0,
        "a completed instance leaves memory"
    );
    place(&s, "o7", "PaymentReceived").await?;
    let p = ok(r.run_once().await, "a trigger for a completed order")?;
    ensure_eq!(
        (p.triggers, p.dispatched),
        (0, 0),
        "reloaded, completed: ignored"
    );
    ensure_eq!(r.instances_in_memory(), 0, "and out of memory again");
    ensure_eq!(
        ok(r.load_state(&tenant(), "o7").await, "load_state")?.map(|s| s.stage),
        Some("shipped".to_owned()),
        "its state is in its stream"
    );
    ensure_eq!(orders.sent().len(), 2, "nothing sent again");

    // Idle instances and the bound (ParcelSaga, at most 3 in memory).
    const PARCELS: usize = 12;
    const HELD: usize = 5;
    const MAX: usize = 3;
    let saga = ParcelSaga {
        hold: Duration::from_millis(200),
    };
    let d = ParcelDispatcher::new(s.events.clone());
    let runner = |d: &ParcelDispatcher| {
        SagaRunner::new(
            s.events.clone(),
            s.read_models.clone(),
            saga.clone(),
            d.clone(),
        )
        .with_max_instances(MAX)
    };
    let mut r = runner(&d);
    for round in 1..=2 {
        for i in 0..PARCELS {
            parcel(&s, &format!("p{i}"), "Scanned").await?;
        }
        let p = ok(r.run_once().await, "scans")?;
        ensure_eq!(
            (p.triggers, p.dispatched),
            (PARCELS, PARCELS),
            "round {round}"
        );
        ensure!(
            r.instances_in_memory() <= MAX,
            "round {round}: {} instances in memory, bound {MAX}",
            r.instances_in_memory()
        );
    }
    for i in 0..HELD {
        parcel(&s, &format!("p{i}"), "Held").await?;
    }
    let mut fired = ok(r.run_once().await, "holds")?.deadlines_fired;
    ensure!(
        r.instances_in_memory() <= HELD.max(MAX),
        "{} instances in memory with {HELD} holds pending",
        r.instances_in_memory()
    );
    for _ in 0..300 {
        if fired >= HELD {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        fired += ok(r.run_once().await, "until the holds end")?.deadlines_fired;
        ensure!(
            r.instances_in_memory() <= HELD.max(MAX),
            "{} instances in memory",
            r.instances_in_memory()
        );
    }
    ensure_eq!(fired, HELD, "each hold fired");
    ensure!(
        r.instances_in_memory() <= MAX,
        "{} instances in memory once the holds ended",
        r.instances_in_memory()
    );
    for i in 0..PARCELS {
        parcel(&s, &format!("p{i}"), "Delivered").await?;
    }
    ok(r.run_once().await, "deliveries")?;
    ensure_eq!(r.instances_in_memory(), 0, "idle instances leave memory");
    // An idle instance continues from its stream.
    parcel(&s, "p0", "Scanned").await?;
    let p = ok(r.run_once().await, "a scan after delivery")?;
    ensure_eq!((p.triggers, p.dispatched), (1, 1), "handled");
    ensure_eq!(r.instances_in_memory(), 0, "idle again");
    // A restart finds nothing to do.
    drop(r);
    let mut r = runner(&d);
    let p = ok(r.run_once().await, "after a restart")?;
    ensure_eq!(
        (p.triggers, p.dispatched, p.deadlines_fired),
        (0, 0, 0),
        "nothing again"
    );
    ensure_eq!(r.instances_in_memory(), 0, "no open work to load");

    let sent = d.sent();
    let ids: std::collections::HashSet<_> = sent.iter().map(|(id, _, _)| *id).collect();
    ensure_eq!(ids.len(), sent.len(), "no dispatch id sent twice");
    for i in 0..PARCELS {
        let stream = format!("saga.parcel-p{i}");
        let mut acks: Vec<u32> = sent
            .iter()
            .filter(|(_, s, _)| *s == stream)
            .filter_map(|(_, _, c)| match c {
                ParcelCommand::Ack { scan, .. } => Some(*scan),
                ParcelCommand::Release { .. } => None,
            })
            .collect();
        acks.sort_unstable();
        let expected: Vec<u32> = if i == 0 { vec![1, 2, 3] } else { vec![1, 2] };
        ensure_eq!(
            acks,
            expected,
            "p{i}: each scan acknowledged once, state kept"
        );
        let releases: Vec<u32> = sent
            .iter()
            .filter(|(_, s, _)| *s == stream)
            .filter_map(|(_, _, c)| match c {
                ParcelCommand::Release { scan, .. } => Some(*scan),
                ParcelCommand::Ack { .. } => None,
            })
            .collect();
        let expected: Vec<u32> = if i < HELD { vec![2] } else { vec![] };
        ensure_eq!(releases, expected, "p{i}: released once if held");
        let records = ok(
            SagaRunner::<ParcelSaga, ParcelDispatcher>::new(
                s.events.clone(),
                s.read_models.clone(),
                saga.clone(),
                d.clone(),
            )
            .records(&tenant(), &format!("p{i}"))
            .await,
            "records",
        )?;
        ensure_eq!(
            count(&records, |r| matches!(r, SagaRecord::DeadlineFired { .. })),
            usize::from(i < HELD),
            "p{i}: DeadlineFired records"
        );
    }
    ensure_eq!(
        d.unrecorded.load(Ordering::SeqCst),
        0,
        "every send recorded first"
    );
    Ok(())
}

/// An [`EventStore`] and [`ReadModelStore`] wrapper that counts what is read through it (events
/// returned by stream, log and id reads; entries returned by read-model gets and scans), the
/// event-store calls made (reads and appends, see [`CountingStore::calls`]) and can fail every
/// read-model commit (a process that dies before storing its checkpoint).
pub struct CountingStore {
    events: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModelStore>,
    read: AtomicU64,
    read_calls: AtomicU64,
    appends: AtomicU64,
    fail_commits: AtomicBool,
}

impl std::fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingStore")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl CountingStore {
    /// Wraps the stores of `s`.
    pub fn new(s: &RuntimeStores) -> Self {
        Self {
            events: s.events.clone(),
            read_models: s.read_models.clone(),
            read: AtomicU64::new(0),
            read_calls: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            fail_commits: AtomicBool::new(false),
        }
    }

    /// Event-store calls so far: `(reads, appends)`, where a read is a `read_stream`,
    /// `read_all`, `get_event` or `stream_version` call (each one store round trip).
    pub fn calls(&self) -> (u64, u64) {
        (
            self.read_calls.load(Ordering::SeqCst),
            self.appends.load(Ordering::SeqCst),
        )
    }

    /// Events and entries read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::SeqCst)
    }

    /// Makes every read-model commit fail ([`Error::Unavailable`]) while set.
    pub fn set_fail_commits(&self, fail: bool) {
        self.fail_commits.store(fail, Ordering::SeqCst);
    }

    fn count(&self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::SeqCst);
    }

    fn call(&self) {
        self.read_calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl EventStore for CountingStore {
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        self.events.append(req).await
    }
    async fn read_stream(&self, req: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.call();
        let out = self.events.read_stream(req).await?;
        self.count(out.len());
        Ok(out)
    }
    async fn read_all(&self, req: ReadAll) -> Result<AllPage> {
        self.call();
        let out = self.events.read_all(req).await?;
        self.count(out.events.len());
        Ok(out)
    }
    async fn stream_version(&self, tenant: &TenantId, stream: &StreamId) -> Result<Version> {
        self.call();
        self.events.stream_version(tenant, stream).await
    }
    async fn get_event(&self, tenant: &TenantId, id: EventId) -> Result<Option<RecordedEvent>> {
        self.call();
        let out = self.events.get_event(tenant, id).await?;
        self.count(usize::from(out.is_some()));
        Ok(out)
    }
    async fn head(&self) -> Result<Position> {
        self.events.head().await
    }
    async fn position_at(&self, at: Timestamp) -> Result<Position> {
        self.events.position_at(at).await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.events.watch_head()
    }
}

#[async_trait]
impl CheckpointStore for CountingStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        self.read_models.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        self.read_models.save_checkpoint(name, position).await
    }
}

#[async_trait]
impl ReadModelStore for CountingStore {
    async fn get(&self, ns: &str, key: &[u8]) -> Result<Option<bytes::Bytes>> {
        let out = self.read_models.get(ns, key).await?;
        self.count(usize::from(out.is_some()));
        Ok(out)
    }
    async fn scan(
        &self,
        ns: &str,
        range: KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>> {
        let out = self.read_models.scan(ns, range, direction, limit).await?;
        self.count(out.len());
        Ok(out)
    }
    async fn commit(&self, batch: ReadModelBatch) -> Result<()> {
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                reason: "injected commit failure".into(),
                retry_after: None,
                source: None,
            });
        }
        self.read_models.commit(batch).await
    }
}

/// A restart reads the open work, not the saga's history: after many completed instances a
/// new runner reads the few open instances' records (from the persisted index of open work)
/// and the log after its checkpoint. Records written after the last checkpoint (a process that
/// died before storing it) are found too: their deadlines are known and their re-read triggers
/// are recognised, so nothing is sent twice.
pub async fn saga_recovery_reads_open_work(s: RuntimeStores) -> CheckResult {
    const DONE: usize = 40;
    const OPEN: usize = 3;
    let saga = OrderSaga {
        payment_timeout: Duration::from_secs(3600),
    };
    let d = RecordingDispatcher::new(s.events.clone());
    for i in 0..DONE {
        place(&s, &format!("done{i}"), "OrderPlaced").await?;
        place(&s, &format!("done{i}"), "PaymentReceived").await?;
    }
    for i in 0..OPEN {
        place(&s, &format!("open{i}"), "OrderPlaced").await?;
    }
    let mut r = SagaRunner::new(
        s.events.clone(),
        s.read_models.clone(),
        saga.clone(),
        d.clone(),
    );
    let p = ok(r.run_once().await, "history")?;
    ensure_eq!(p.triggers, 2 * DONE + OPEN, "every trigger handled");
    // A later round passes over the runner's own records and checkpoints after them.
    ok(r.run_once().await, "second round")?;
    drop(r);
    let history = ok(
        s.events
            .read_all(
                ReadAll::starting_at(Position::START, 100_000)
                    .filter(EventFilter::default().with_stream_prefix("saga.order-")),
            )
            .await,
        "saga log",
    )?
    .events
    .len();
    ensure!(history >= DONE * 10, "{history} saga records");

    let counting = Arc::new(CountingStore::new(&s));
    let mut r = SagaRunner::new(counting.clone(), counting.clone(), saga.clone(), d.clone());
    let p = ok(r.run_once().await, "restart")?;
    ensure_eq!(
        (p.triggers, p.dispatched, p.deadlines_fired),
        (0, 0, 0),
        "nothing to redo"
    );
    ensure_eq!(
        r.instances_in_memory(),
        OPEN,
        "the open orders, and only them"
    );
    ensure!(r.next_deadline().is_some(), "their deadlines are known");
    // Per open order its 5 records (trigger, state, reservation + result, deadline) and its
    // index entry, plus the index's format marker (19 on the in-memory store); the bound
    // leaves room for a few records after the checkpoint.
    let read = counting.read();
    ensure!(
        read <= (OPEN * 8 + 4) as u64,
        "the restart read {read} records and entries; the saga log holds {history}"
    );
    drop(r);

    // Records after the last checkpoint: a runner records new orders, then dies before its
    // checkpoint (and index) are stored.
    for i in 0..2 {
        place(&s, &format!("late{i}"), "OrderPlaced").await?;
    }
    counting.set_fail_commits(true);
    let mut r = SagaRunner::new(counting.clone(), counting.clone(), saga.clone(), d.clone());
    ensure!(
        r.run_once().await.is_err(),
        "the checkpoint could not be stored"
    );
    drop(r);
    counting.set_fail_commits(false);
    let sent_before = d.sent().len();
    let mut r = SagaRunner::new(counting.clone(), counting.clone(), saga.clone(), d.clone());
    let p = ok(r.run_once().await, "restart after the lost checkpoint")?;
    ensure_eq!(
        (p.triggers, p.dispatched),
        (0, 0),
        "re-read triggers recognised, nothing sent again"
    );
    ensure_eq!(d.sent().len(), sent_before, "no second send");
    ensure_eq!(
        r.instances_in_memory(),
        OPEN + 2,
        "the late orders' deadlines are known"
    );
    drop(r);
    // And now they are in the index.
    let mut r = SagaRunner::new(s.events.clone(), s.read_models.clone(), saga, d.clone());
    ok(r.run_once().await, "another restart")?;
    ensure_eq!(
        r.instances_in_memory(),
        OPEN + 2,
        "open orders after another restart"
    );
    let reserves = d
        .sent()
        .iter()
        .filter(|(_, c)| matches!(c, OrderCommand::Reserve(_)))
        .count();
    ensure_eq!(reserves, DONE + OPEN + 2, "each reservation sent once");
    ensure_eq!(
        d.unrecorded.load(Ordering::SeqCst),
        0,
        "every send recorded first"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resilience.

/// An [`EventStore`] wrapper that injects [`Error::Unavailable`] failures and counts the calls
/// that reach the inner store (an [`Intercept`]: [`FaultyStore::new`] returns it as a store).
pub struct FaultyStore {
    inner: Arc<dyn EventStore>,
    down: AtomicBool,
    hang: AtomicBool,
    fail_next: AtomicU32,
    calls: AtomicU64,
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore")
            .field("down", &self.down)
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl FaultyStore {
    /// Wraps `inner`, healthy: a store that derefs to this wrapper's switches and counters.
    pub fn new(inner: Arc<dyn EventStore>) -> Intercepted<Self> {
        Intercepted(Self {
            inner,
            down: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            fail_next: AtomicU32::new(0),
            calls: AtomicU64::new(0),
        })
    }

    /// Every call fails while `down`.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Every call hangs (never completes) while set: a store that stopped answering.
    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::SeqCst);
    }

    /// The next `n` calls fail.
    pub fn fail_next(&self, n: u32) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Calls that reached this wrapper (failed or not).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Intercept for FaultyStore {
    type Inner = dyn EventStore;

    fn inner(&self) -> &dyn EventStore {
        &*self.inner
    }

    /// Counts the call, then hangs, fails or lets it through.
    async fn before(&self) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let injected = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected || self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                reason: "injected fault".into(),
                retry_after: None,
                source: None,
            });
        }
        Ok(())
    }
}

/// The breaker opens after repeated failures, then fails fast without touching the store
/// (with a `retry_after` hint), probes when half-open, and closes once the store recovers;
/// `Retrying` rides over short blips.
pub async fn circuit_breaker(s: RuntimeStores) -> CheckResult {
    let t = tenant();
    let stream = ok(StreamId::parse("Breaker-1"), "stream")?;
    let faulty = Arc::new(FaultyStore::new(s.events.clone()));
    let breaker = CircuitBreaker::with_config(
        faulty.clone(),
        BreakerConfig::default()
            .with_failure_threshold(3)
            .with_open_for(Duration::from_millis(400)),
    );
    ensure_eq!(breaker.state(), BreakerState::Closed, "starts closed");
    ok(breaker.stream_version(&t, &stream).await, "healthy call")?;
    faulty.set_down(true);
    for _ in 0..3 {
        ensure!(
            breaker.stream_version(&t, &stream).await.is_err(),
            "store down"
        );
    }
    ensure_eq!(
        breaker.state(),
        BreakerState::Open,
        "opened after 3 failures"
    );
    let calls = faulty.calls();
    for _ in 0..10 {
        match breaker.stream_version(&t, &stream).await {
            Err(Error::Unavailable {
                retry_after: Some(d),
                ..
            }) if d <= Duration::from_millis(400) => {}
            other => {
                return Err(CheckFailure(format!(
                    "expected fast Unavailable, got {other:?}"
                )));
            }
        }
    }
    ensure_eq!(
        faulty.calls(),
        calls,
        "open breaker does not touch the store"
    );
    ensure_eq!(breaker.rejected_calls(), 10, "rejections counted");
    // Half-open probe while still down: opens again.
    tokio::time::sleep(Duration::from_millis(450)).await;
    ensure_eq!(
        breaker.state(),
        BreakerState::HalfOpen,
        "half-open after open_for"
    );
    ensure!(
        breaker.stream_version(&t, &stream).await.is_err(),
        "probe fails"
    );
    ensure_eq!(
        faulty.calls(),
        calls + 1,
        "exactly one probe reached the store"
    );
    ensure_eq!(breaker.state(), BreakerState::Open, "failed probe re-opens");
    // Recovery.
    faulty.set_down(false);
    tokio::time::sleep(Duration::from_millis(450)).await;
    ok(breaker.stream_version(&t, &stream).await, "probe succeeds")?;
    ensure_eq!(
        breaker.state(),
        BreakerState::Closed,
        "closed after a good probe"
    );
    ok(
        breaker
            .append_to(
                &t,
                &stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::json("X", &serde_json::json!({}))],
            )
            .await,
        "append through the closed breaker",
    )?;
    // Retrying rides over two injected failures (append retried idempotently).
    let retrying = tracktrace_core::Retrying::with_policy(
        faulty.clone(),
        RetryPolicy::default()
            .with_max_attempts(5)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5)),
    );
    faulty.fail_next(2);
    let out = ok(
        retrying
            .append_to(
                &t,
                &stream,
                ExpectedVersion::Exact(Version::new(1)),
                vec![NewEvent::json("X", &serde_json::json!({}))],
            )
            .await,
        "append through Retrying",
    )?;
    ensure_eq!(out.last_version(), Version::new(2), "appended once");
    faulty.fail_next(10);
    match retrying.head().await {
        Err(Error::Unavailable { .. }) => {}
        other => {
            return Err(CheckFailure(format!(
                "expected Unavailable after 5 attempts, got {other:?}"
            )));
        }
    }
    faulty.fail_next(0);
    Ok(())
}

/// Generates one test per runtime check plus the snapshot property test.
/// `$make` is the path of an `async fn() -> RuntimeStores` returning fresh, isolated stores.
#[macro_export]
macro_rules! runtime_tests {
    ($make:path) => {
        $crate::__runtime_tests!($make;
            concurrent_commands, unchecked_concurrent_commands, command_costs, command_errors,
            upcaster_v1_to_v2,
            projection_restart_and_rebuild, projection_wait_for_reads_your_writes,
            saga_deadline_across_restart, saga_compensation,
            saga_redelivery_is_idempotent, saga_bounded_instances, saga_recovery_reads_open_work,
            circuit_breaker);

        #[test]
        fn runtime_snapshot_equals_replay_proptest() {
            if let Err(e) = $crate::runtime::snapshot_proptest(|| $make(), 16) {
                panic!("snapshot + tail != replay: {e}");
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __runtime_tests {
    ($make:path; $($check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::store::run(async {
                    let stores = $make().await;
                    if let Err(e) = $crate::runtime::$check(stores).await {
                        panic!("runtime check `{}` failed: {e}", stringify!($check));
                    }
                });
            }
        )+
    };
}
