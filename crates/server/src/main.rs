//! `tracktrace-server`: the Track & Trace reference server.
//!
//! ```text
//! tracktrace-server [serve] [--data-dir ./tracktrace-data] [--listen 127.0.0.1:8080]
//!                   [--store postgres://…] [--cache redis://…] [--role api|processor|all]
//!                   [--nats-url nats://…] [--nats-publish] [--nats-ingest] (feature `nats`)
//! tracktrace-server token --tenant acme --scopes events:write,trace:read
//! ```
//! Every flag has a `TRACKTRACE_*` environment variable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracktrace_app::analytics::AnalyticsConfig;
use tracktrace_app::propagation::PropagationConfig;
use tracktrace_app::{AppConfig, SYSTEM_TENANT, Scope};
use tracktrace_core::{BreakerConfig, TenantId};
use tracktrace_http::auth::{Claims, now_secs};
use tracktrace_http::cache::CacheConfig;
use tracktrace_http::layers::HttpLimits;
use tracktrace_server::{self as server, Role, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "tracktrace-server",
    version,
    about = "Track & Trace reference server"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    serve: Serve,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Data directory: the embedded store and the generated JWT secret.
    #[arg(
        long,
        env = "TRACKTRACE_DATA_DIR",
        default_value = "./tracktrace-data",
        global = true
    )]
    data_dir: PathBuf,
    /// PostgreSQL URL (postgres://…); default: the embedded sled store in the data directory.
    #[arg(long, env = "TRACKTRACE_STORE", global = true)]
    store: Option<String>,
    /// PostgreSQL schema of the store.
    #[arg(
        long,
        env = "TRACKTRACE_PG_SCHEMA",
        default_value = "tracktrace",
        global = true
    )]
    pg_schema: String,
    /// PostgreSQL connection pool size.
    #[arg(
        long,
        env = "TRACKTRACE_PG_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pg_max_connections: u32,
    /// PostgreSQL: how many single-event append statements run at once before further
    /// single-event appends are grouped into one transaction (0: never group).
    #[arg(
        long,
        env = "TRACKTRACE_PG_APPEND_GROUPS",
        default_value_t = tracktrace_store_postgres::DEFAULT_APPEND_GROUPS,
        global = true
    )]
    pg_append_groups: usize,
    /// Appends waiting in the store's queue at most (sled: the writer queue; PostgreSQL: the
    /// group-append queue); beyond it an append is refused with 503 + Retry-After.
    #[arg(
        long,
        env = "TRACKTRACE_STORE_MAX_QUEUED",
        default_value_t = 4096,
        global = true
    )]
    store_max_queued: usize,
    /// sled: free MiB the data directory's file system must keep; below it captures are
    /// refused with 507 (nothing stored) until space is freed (0: no reserve).
    #[arg(
        long,
        env = "TRACKTRACE_SLED_MIN_FREE_MIB",
        default_value_t = 64,
        global = true
    )]
    sled_min_free_mib: u64,
    /// JWT HS256 secret (at least 32 bytes); default: generated once in the data directory.
    #[arg(
        long,
        env = "TRACKTRACE_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default).
    Serve(Box<Serve>),
    /// Print a token signed with the server's secret, creating the tenant if needed.
    Token(Token),
    /// Check the store's integrity: positions in order, every stream's versions contiguous,
    /// every event found by its id and at its stream version, stream versions as the log says.
    /// Prints each finding; exits non-zero when there is any.
    Verify(Verify),
    /// Write the store's events (all, or one tenant's) as NDJSON, one event per line in log
    /// order. To a file, a rerun resumes after the file's last complete line.
    Export(Export),
    /// Append the events of an `export` file to the store, keeping ids, metadata and stream
    /// versions; importing a file twice stores nothing new. Lines that cannot be imported go to
    /// the reject file with their reason (exit 1 if there is any).
    Import(Import),
    /// Copy an embedded (sled) store into the configured store (`--store postgres://…`),
    /// resumable (a checkpoint in the target), then `verify` the target.
    Migrate(Migrate),
}

#[derive(Args, Debug)]
struct Migrate {
    /// Data directory of the sled store to copy (its `events` directory is opened).
    #[arg(long)]
    from_data_dir: PathBuf,
    /// Events read per page of the source.
    #[arg(long, default_value_t = 1000)]
    page_size: usize,
    /// Streams appended at once within a page.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Skip the `verify` of the target afterwards.
    #[arg(long)]
    no_verify: bool,
    /// Seconds between two progress lines on stderr.
    #[arg(long, default_value_t = 2)]
    progress_secs: u64,
}

#[derive(Args, Debug)]
struct Export {
    /// Only this tenant's events.
    #[arg(long)]
    tenant: Option<String>,
    /// Only events recorded at or after this time (RFC 3339, e.g. 2026-12-01T00:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only events recorded before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Output file (appended to and resumed); default: standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Events read per page of the log.
    #[arg(long, default_value_t = 1000)]
    page_size: usize,
    /// Seconds between two progress lines on stderr.
    #[arg(long, default_value_t = 2)]
    progress_secs: u64,
}

#[derive(Args, Debug)]
struct Import {
    /// The NDJSON file to import (as written by `export`).
    input: PathBuf,
    /// Where refused lines go, with their line number and reason.
    #[arg(long, default_value = "import-rejects.ndjson")]
    rejects: PathBuf,
    /// Seconds between two progress lines on stderr.
    #[arg(long, default_value_t = 2)]
    progress_secs: u64,
}

#[derive(Args, Debug)]
struct Verify {
    /// Skip the two index lookups per event (checks the log and the stream versions only).
    #[arg(long)]
    quick: bool,
    /// Events read per page of the log.
    #[arg(long, default_value_t = 1000)]
    page_size: usize,
    /// Findings printed at most (the rest are counted).
    #[arg(long, default_value_t = 100)]
    max_findings: usize,
    /// Seconds between two progress lines on stderr.
    #[arg(long, default_value_t = 2)]
    progress_secs: u64,
}

#[derive(Args, Debug)]
struct Serve {
    /// Listen address.
    #[arg(long, env = "TRACKTRACE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Redis URL (redis://…) for the trace view cache; default: in-process cache.
    #[arg(long, env = "TRACKTRACE_CACHE")]
    cache: Option<String>,
    /// What this process does.
    #[arg(long, env = "TRACKTRACE_ROLE", value_enum, default_value_t = Role::All)]
    role: Role,
    /// Trace view cache time-to-live, seconds.
    #[arg(long, env = "TRACKTRACE_CACHE_TTL_SECS", default_value_t = 60)]
    cache_ttl_secs: u64,
    /// Trace view cache memory bound per tenant, MiB (in-process and Redis).
    #[arg(long, env = "TRACKTRACE_CACHE_MIB_PER_TENANT", default_value_t = 32)]
    cache_mib_per_tenant: u64,
    /// Milestone-watch entities kept in memory at most, beyond those with a pending expectation
    /// or alarm (the others reload from their streams when an event arrives for them).
    #[arg(long, env = "TRACKTRACE_MILESTONE_MAX_INSTANCES", default_value_t = tracktrace_core::saga::DEFAULT_MAX_INSTANCES)]
    milestone_max_instances: usize,
    /// Live-stream (SSE) entries a client may fall behind before its stream is closed with
    /// `reason: lagged` (one shared buffer per process).
    #[arg(long, env = "TRACKTRACE_LIVE_BUFFER", default_value_t = 1024)]
    live_buffer: usize,
    /// Longest `minPosition` wait, milliseconds.
    #[arg(long, env = "TRACKTRACE_READ_YOUR_WRITES_MS", default_value_t = 2000)]
    read_your_writes_ms: u64,
    /// Consecutive store failures that open the circuit breaker.
    #[arg(long, env = "TRACKTRACE_BREAKER_FAILURES", default_value_t = 5)]
    breaker_failures: u32,
    /// How long the circuit breaker stays open before probing, milliseconds.
    #[arg(long, env = "TRACKTRACE_BREAKER_OPEN_MS", default_value_t = 5000)]
    breaker_open_ms: u64,
    /// Longest time to produce a response, milliseconds (an event stream: its first byte);
    /// past it the request is answered 503 + Retry-After.
    #[arg(long, env = "TRACKTRACE_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Requests handled at once; more are shed at once with 503 + Retry-After.
    #[arg(long, env = "TRACKTRACE_MAX_IN_FLIGHT", default_value_t = 512)]
    max_in_flight: usize,
    /// Open event streams (SSE) per tenant and process; more get 429.
    #[arg(long, env = "TRACKTRACE_MAX_STREAMS_PER_TENANT", default_value_t = 100)]
    max_streams_per_tenant: usize,
    /// Deadline of one Redis cache call, milliseconds (past it: a miss, served from the read
    /// model).
    #[arg(long, env = "TRACKTRACE_CACHE_TIMEOUT_MS", default_value_t = 50)]
    cache_timeout_ms: u64,
    /// Deadline of every event-store and read-model call of a request, milliseconds (a store
    /// that stopped answering costs a request at most this; 0: no deadline).
    #[arg(long, env = "TRACKTRACE_STORE_TIMEOUT_MS", default_value_t = 1000)]
    store_timeout_ms: u64,
    #[command(flatten)]
    analytics: AnalyticsArgs,
    #[command(flatten)]
    nats: Nats,
}

/// Analytics engine flags.
#[derive(Args, Debug)]
struct AnalyticsArgs {
    /// KPI window length and scheduler period, seconds (windows align to multiples of it).
    #[arg(long, env = "TRACKTRACE_ANALYTICS_WINDOW_SECS", default_value_t = 3600)]
    analytics_window_secs: u64,
    /// Seconds after a window's end before it is computed (late commits, rejection counts).
    #[arg(long, env = "TRACKTRACE_ANALYTICS_GRACE_SECS", default_value_t = 60)]
    analytics_grace_secs: u64,
    /// Trailing windows the anomaly detector sees.
    #[arg(long, env = "TRACKTRACE_ANALYTICS_LOOKBACK", default_value_t = 168)]
    analytics_lookback: usize,
    /// Run the scheduled batch (roles processor and all).
    #[arg(long, env = "TRACKTRACE_ANALYTICS_SCHEDULE", default_value_t = true, action = clap::ArgAction::Set)]
    analytics_schedule: bool,
    /// Entities per tenant and window whose timelines are kept for transit and dwell (beyond:
    /// left out and counted; active entities estimated).
    #[arg(
        long,
        env = "TRACKTRACE_ANALYTICS_MAX_ENTITIES",
        default_value_t = 100_000
    )]
    analytics_max_entities: usize,
    /// Events per tenant and window kept in those timelines (40 bytes each).
    #[arg(
        long,
        env = "TRACKTRACE_ANALYTICS_MAX_TRACKED_EVENTS",
        default_value_t = 1_000_000
    )]
    analytics_max_tracked_events: usize,
    /// On-demand runs admitted at once; more get 503 with Retry-After.
    #[arg(
        long,
        env = "TRACKTRACE_ANALYTICS_MAX_PENDING_RUNS",
        default_value_t = 4
    )]
    analytics_max_pending_runs: usize,
    /// Rejected-command count buckets (tenant × second) buffered until stored.
    #[arg(
        long,
        env = "TRACKTRACE_ANALYTICS_MAX_REJECTION_BUCKETS",
        default_value_t = 200_000
    )]
    analytics_max_rejection_buckets: usize,
    /// InfluxDB 1.x base URL (http://…:8086) to write KPIs and anomalies to (feature `influxdb`).
    #[arg(long, env = "TRACKTRACE_INFLUX_URL")]
    influx_url: Option<String>,
    /// InfluxDB database (created if missing).
    #[arg(long, env = "TRACKTRACE_INFLUX_DB", default_value = "tracktrace")]
    influx_db: String,
}

fn analytics_config(a: &AnalyticsArgs) -> AnalyticsConfig {
    #[cfg(not(feature = "influxdb"))]
    if a.influx_url.is_some() {
        tracing::warn!(db = %a.influx_db, "--influx-url ignored: this build has no InfluxDB support (build with `--features influxdb`)");
    }
    AnalyticsConfig {
        window: Duration::from_secs(a.analytics_window_secs.max(1)),
        grace: Duration::from_secs(a.analytics_grace_secs),
        lookback_windows: a.analytics_lookback.max(1),
        schedule: a.analytics_schedule,
        kpi_bounds: tracktrace_app::analytics::KpiBounds {
            max_tracked_entities: a.analytics_max_entities,
            max_tracked_events: a.analytics_max_tracked_events,
            ..tracktrace_app::analytics::KpiBounds::default()
        },
        max_pending_runs: a.analytics_max_pending_runs.max(1),
        max_rejection_buckets: a.analytics_max_rejection_buckets,
        #[cfg(feature = "influxdb")]
        influx: a.influx_url.as_ref().map(|u| {
            tracktrace_analytics::influx::InfluxConfig::new(u.clone(), a.influx_db.clone())
        }),
        ..AnalyticsConfig::default()
    }
}

/// NATS JetStream propagation (builds with feature `nats`; roles `processor` and `all`).
#[derive(Args, Debug)]
struct Nats {
    /// NATS server URL.
    #[arg(
        long,
        env = "TRACKTRACE_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Publish events to NATS: one outbox publisher per partner route (and the feed).
    #[arg(long, env = "TRACKTRACE_NATS_PUBLISH")]
    nats_publish: bool,
    /// Consume operational events published on `<ingest prefix>.<tenant>`.
    #[arg(long, env = "TRACKTRACE_NATS_INGEST")]
    nats_ingest: bool,
    /// Also publish every tenant's events into this stream (created if missing), on
    /// `<subject prefix>.<tenant>.<entityType>.<eventType>`.
    #[arg(long, env = "TRACKTRACE_NATS_FEED_STREAM")]
    nats_feed_stream: Option<String>,
    /// Subject prefix of the feed.
    #[arg(
        long,
        env = "TRACKTRACE_NATS_SUBJECT_PREFIX",
        default_value = "tracktrace"
    )]
    nats_subject_prefix: String,
    /// Bus ingestion stream (created if missing).
    #[arg(
        long,
        env = "TRACKTRACE_NATS_INGEST_STREAM",
        default_value = "TRACKTRACE_INGEST"
    )]
    nats_ingest_stream: String,
    /// Bus ingestion subject prefix: tenants publish on `<prefix>.<tenant>`.
    #[arg(
        long,
        env = "TRACKTRACE_NATS_INGEST_PREFIX",
        default_value = "tracktrace.ingest"
    )]
    nats_ingest_prefix: String,
    /// Durable consumer of bus ingestion (shared by every processor).
    #[arg(
        long,
        env = "TRACKTRACE_NATS_INGEST_DURABLE",
        default_value = "tracktrace-ingest"
    )]
    nats_ingest_durable: String,
    /// Dead-letter subject prefix (`<prefix>.<tenant>`).
    #[arg(
        long,
        env = "TRACKTRACE_NATS_DEAD_LETTER_PREFIX",
        default_value = "tracktrace.deadletter"
    )]
    nats_dead_letter_prefix: String,
    /// Dead-letter stream (created if missing).
    #[arg(
        long,
        env = "TRACKTRACE_NATS_DEAD_LETTER_STREAM",
        default_value = "TRACKTRACE_DEADLETTER"
    )]
    nats_dead_letter_stream: String,
    /// Deliveries of a failing ingest message before it is dead-lettered.
    #[arg(long, env = "TRACKTRACE_NATS_INGEST_MAX_DELIVER", default_value_t = 10)]
    nats_ingest_max_deliver: i64,
    /// Events per publish batch (and checkpoint interval).
    #[arg(long, env = "TRACKTRACE_NATS_BATCH_SIZE", default_value_t = 256)]
    nats_batch_size: usize,
    /// How long a publisher waits for JetStream's acknowledgement, milliseconds.
    #[arg(long, env = "TRACKTRACE_NATS_ACK_TIMEOUT_MS", default_value_t = 5000)]
    nats_ack_timeout_ms: u64,
    /// Consecutive publish failures that open a route's breaker.
    #[arg(long, env = "TRACKTRACE_NATS_BREAKER_FAILURES", default_value_t = 3)]
    nats_breaker_failures: u32,
    /// How long a route's breaker stays open before a probe, milliseconds.
    #[arg(long, env = "TRACKTRACE_NATS_BREAKER_OPEN_MS", default_value_t = 2000)]
    nats_breaker_open_ms: u64,
}

impl Nats {
    fn config(&self) -> PropagationConfig {
        PropagationConfig {
            nats_url: self.nats_url.clone(),
            publish: self.nats_publish,
            ingest: self.nats_ingest,
            subject_prefix: self.nats_subject_prefix.clone(),
            feed_stream: self.nats_feed_stream.clone(),
            ingest_stream: self.nats_ingest_stream.clone(),
            ingest_prefix: self.nats_ingest_prefix.clone(),
            ingest_durable: self.nats_ingest_durable.clone(),
            dead_letter_prefix: self.nats_dead_letter_prefix.clone(),
            dead_letter_stream: self.nats_dead_letter_stream.clone(),
            ingest_max_deliver: self.nats_ingest_max_deliver,
            batch_size: self.nats_batch_size,
            ack_timeout: Duration::from_millis(self.nats_ack_timeout_ms),
            breaker_failures: self.nats_breaker_failures,
            breaker_open_for: Duration::from_millis(self.nats_breaker_open_ms),
        }
    }
}

#[derive(Args, Debug)]
struct Token {
    /// Tenant the token acts for (created if it does not exist).
    #[arg(long)]
    tenant: String,
    /// Comma-separated scopes: events:write, trace:read, metrics:read, admin.
    #[arg(long, value_delimiter = ',', default_value = "events:write,trace:read")]
    scopes: Vec<String>,
    /// Token subject.
    #[arg(long, default_value = "cli")]
    sub: String,
    /// Validity, seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_secs: u64,
    /// Address of a running server to create the tenant through when the store is in use
    /// (`host:port`, or `http://host:port`).
    #[arg(long, env = "TRACKTRACE_LISTEN", default_value = "127.0.0.1:8080", value_parser = server_addr)]
    server: String,
}

/// `host:port` of `--server`, accepting an `http://` URL as well (the form the server prints).
fn server_addr(s: &str) -> Result<String, String> {
    if s.starts_with("https://") {
        return Err("the token command talks plain HTTP to the server; give host:port".into());
    }
    let a = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    if a.is_empty() || a.contains('/') || !a.contains(':') {
        return Err(format!(
            "expected host:port (or http://host:port), got {s:?}"
        ));
    }
    Ok(a.to_owned())
}

fn config(c: &Common, s: &Serve) -> ServerConfig {
    ServerConfig {
        data_dir: c.data_dir.clone(),
        store_url: c.store.clone(),
        pg_schema: c.pg_schema.clone(),
        pg_max_connections: c.pg_max_connections,
        pg_append_groups: c.pg_append_groups,
        store_max_queued: c.store_max_queued,
        sled_min_free_bytes: c.sled_min_free_mib * 1024 * 1024,
        cache_url: s.cache.clone(),
        cache: CacheConfig {
            ttl: Duration::from_secs(s.cache_ttl_secs.max(1)),
            max_bytes_per_tenant: s.cache_mib_per_tenant.max(1) * 1024 * 1024,
            redis_timeout: Duration::from_millis(s.cache_timeout_ms.max(1)),
            ..CacheConfig::default()
        },
        http: HttpLimits {
            request_timeout: Duration::from_millis(s.request_timeout_ms.max(1)),
            max_in_flight: s.max_in_flight.max(1),
            max_streams_per_tenant: s.max_streams_per_tenant,
        },
        role: s.role,
        jwt_secret: c.jwt_secret.clone(),
        app: AppConfig {
            read_your_writes_timeout: Duration::from_millis(s.read_your_writes_ms),
            live_buffer: s.live_buffer.max(1),
            ..AppConfig::default()
        },
        breaker: BreakerConfig::default()
            .with_failure_threshold(s.breaker_failures)
            .with_open_for(Duration::from_millis(s.breaker_open_ms))
            .with_call_timeout(
                (s.store_timeout_ms > 0).then(|| Duration::from_millis(s.store_timeout_ms)),
            ),
        analytics: analytics_config(&s.analytics),
        propagation: s.nats.config(),
        milestone_max_instances: s.milestone_max_instances.max(1),
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

async fn serve(common: &Common, s: &Serve) -> Result<(), String> {
    let cfg = config(common, s);
    let stores = server::open_stores(&cfg).await.map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", s.listen))?;
    let running = server::start(&cfg, stores, listener)
        .await
        .map_err(|e| e.to_string())?;
    // Tests and scripts read this line to find the port (with --listen 127.0.0.1:0).
    println!("tracktrace-server listening on http://{}", running.addr);
    tracing::info!(addr = %running.addr, role = ?cfg.role, store = if cfg.store_url.is_some() { "postgres" } else { "sled" }, "serving");
    let stop = running.shutdown_handle();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        tracing::info!("shutting down: draining requests");
        let _ = stop.send(true);
    });
    running.wait().await.map_err(|e| e.to_string())
}

async fn token(common: &Common, serve: &Serve, t: &Token) -> Result<(), String> {
    let scopes: Vec<String> = t
        .scopes
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &scopes {
        s.parse::<Scope>()?;
    }
    let tenant = TenantId::parse(t.tenant.as_str()).map_err(|e| e.to_string())?;
    let cfg = config(common, serve);
    let keys = server::keys(&cfg).map_err(|e| e.to_string())?;
    if tenant.as_str() != SYSTEM_TENANT {
        tracktrace_app::tenants::parse_new_tenant(tenant.as_str()).map_err(|e| e.to_string())?;
        match server::open_stores(&cfg).await {
            Ok(stores) => {
                if server::ensure_tenant(&stores, &tenant, &t.sub).await? {
                    eprintln!("created tenant {tenant}");
                }
            }
            Err(e) if cfg.store_url.is_none() => {
                // The embedded store is held by a running server: create the tenant through
                // its admin API with a short-lived system admin token.
                eprintln!(
                    "store in use ({e}); creating the tenant through the server at {}",
                    t.server
                );
                let admin = keys.sign(&Claims {
                    sub: t.sub.clone(),
                    tenant: SYSTEM_TENANT.into(),
                    scopes: vec!["admin".into()],
                    exp: now_secs() + 60,
                });
                let body = serde_json::json!({"id": tenant.as_str()}).to_string();
                let auth = format!("Bearer {admin}");
                let r = tracktrace_http::client::request(
                    &t.server,
                    "POST",
                    "/api/v1/admin/tenants",
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    Some(body.as_bytes()),
                )
                .await
                .map_err(|e| format!("cannot reach the server at {}: {e}", t.server))?;
                match r.status {
                    201 => eprintln!("created tenant {tenant}"),
                    200 => {}
                    s => {
                        return Err(format!(
                            "the server refused to create the tenant ({s}): {}",
                            String::from_utf8_lossy(&r.body)
                        ));
                    }
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let token = keys.sign(&Claims {
        sub: t.sub.clone(),
        tenant: tenant.to_string(),
        scopes,
        exp: now_secs() + t.ttl_secs,
    });
    println!("{token}");
    Ok(())
}

async fn verify(common: &Common, serve: &Serve, v: &Verify) -> Result<(), String> {
    use tracktrace_core::verify::{VerifyOptions, verify_store};
    let cfg = config(common, serve);
    let stores = server::open_stores(&cfg).await.map_err(|e| e.to_string())?;
    let options = VerifyOptions::default()
        .with_page_size(v.page_size)
        .with_index_checks(!v.quick)
        .with_max_findings(v.max_findings);
    let started = std::time::Instant::now();
    let mut every = Every::new(v.progress_secs);
    let report = verify_store(stores.store.as_ref(), &options, |p| {
        if let Some(rate) = every.due(p.events) {
            eprintln!(
                "verify: {} events, position {} of {}, {rate:.0} events/s, {} findings",
                p.events, p.position, p.head, p.findings
            );
        }
    })
    .await
    .map_err(|e| format!("verify stopped: {e}"))?;
    for f in &report.findings {
        println!("{f}");
    }
    let found = report.findings.len() as u64 + report.more_findings;
    println!(
        "verified {} events in {} streams in {:.1} s ({}): {found} finding(s)",
        report.events,
        report.streams,
        started.elapsed().as_secs_f64(),
        if v.quick {
            "log and versions"
        } else {
            "log, versions and indexes"
        },
    );
    if found > 0 {
        return Err(format!("the store has {found} finding(s)"));
    }
    Ok(())
}

/// Paces progress lines: at most one per `secs` seconds (0: at every call).
struct Every {
    every: Duration,
    last: Option<std::time::Instant>,
    started: std::time::Instant,
}

impl Every {
    fn new(secs: u64) -> Self {
        Self {
            every: Duration::from_secs(secs),
            last: None,
            started: std::time::Instant::now(),
        }
    }
    /// Whether a progress line is due, and the events/s rate for `n` events so far.
    fn due(&mut self, n: u64) -> Option<f64> {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|l| now - l < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(n as f64 / self.started.elapsed().as_secs_f64().max(1e-3))
    }
}

async fn export(common: &Common, serve: &Serve, x: &Export) -> Result<(), String> {
    use tracktrace_server::transfer;
    let cfg = config(common, serve);
    let stores = server::open_stores(&cfg).await.map_err(|e| e.to_string())?;
    let instant =
        |flag: &str, v: &Option<String>| -> Result<Option<tracktrace_core::Timestamp>, String> {
            v.as_deref()
                .map(|s| {
                    tracktrace_domain::parse_instant(s)
                        .map(tracktrace_core::Timestamp::from_unix_micros)
                        .map_err(|e| format!("--{flag}: {e}"))
                })
                .transpose()
        };
    let scope = transfer::ExportScope {
        tenant: match &x.tenant {
            Some(t) => Some(TenantId::parse(t.as_str()).map_err(|e| e.to_string())?),
            None => None,
        },
        since: instant("since", &x.since)?,
        until: instant("until", &x.until)?,
    };
    let mut every = Every::new(x.progress_secs);
    let progress = |n: u64, at: tracktrace_core::Position, head: tracktrace_core::Position| {
        if let Some(rate) = every.due(n) {
            eprintln!("export: {n} events, position {at} of {head}, {rate:.0} events/s");
        }
    };
    let done = match &x.output {
        Some(path) => {
            let from =
                transfer::resume_point(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            transfer::export(
                stores.store.as_ref(),
                &scope,
                from,
                x.page_size,
                &mut out,
                progress,
            )
            .await?
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            transfer::export(
                stores.store.as_ref(),
                &scope,
                tracktrace_core::Position::START,
                x.page_size,
                &mut out,
                progress,
            )
            .await?
        }
    };
    eprintln!(
        "exported {} events (from position {})",
        done.events, done.from
    );
    Ok(())
}

async fn import(common: &Common, serve: &Serve, x: &Import) -> Result<(), String> {
    use tracktrace_server::transfer;
    let cfg = config(common, serve);
    let stores = server::open_stores(&cfg).await.map_err(|e| e.to_string())?;
    let input = std::fs::File::open(&x.input).map_err(|e| format!("{}: {e}", x.input.display()))?;
    let rejects =
        std::fs::File::create(&x.rejects).map_err(|e| format!("{}: {e}", x.rejects.display()))?;
    let mut rejects = std::io::BufWriter::new(rejects);
    let mut every = Every::new(x.progress_secs);
    let done = transfer::import(stores.store.as_ref(), input, &mut rejects, |d| {
        if let Some(rate) = every.due(d.lines) {
            eprintln!(
                "import: {} lines, {} stored, {} already there, {} rejected, {rate:.0} lines/s",
                d.lines, d.stored, d.duplicates, d.rejected
            );
        }
    })
    .await?;
    println!(
        "imported {} lines: {} stored, {} already there, {} rejected",
        done.lines, done.stored, done.duplicates, done.rejected
    );
    if done.rejected > 0 {
        return Err(format!(
            "{} line(s) rejected: see {}",
            done.rejected,
            x.rejects.display()
        ));
    }
    Ok(())
}

async fn migrate(common: &Common, serve: &Serve, m: &Migrate) -> Result<(), String> {
    use tracktrace_server::transfer;
    let cfg = config(common, serve);
    if cfg.store_url.is_none() {
        return Err("migrate copies into the store given with --store (postgres://…)".into());
    }
    let source = tracktrace_store_sled::SledStore::open(tracktrace_store_sled::SledOptions::new(
        m.from_data_dir.join("events"),
    ))
    .map_err(|e| format!("source {}: {e}", m.from_data_dir.display()))?;
    let stores = server::open_stores(&cfg).await.map_err(|e| e.to_string())?;
    let mut every = Every::new(m.progress_secs);
    let done = transfer::migrate(
        std::sync::Arc::new(source),
        stores.store.clone(),
        m.page_size,
        m.concurrency,
        |d, at, head| {
            if let Some(rate) = every.due(d.events) {
                eprintln!(
                    "migrate: {} events ({} stored, {} already there), source position {at} of {head}, {rate:.0} events/s",
                    d.events, d.stored, d.duplicates
                );
            }
        },
    )
    .await?;
    println!(
        "migrated {} events from position {}: {} stored, {} already there",
        done.events, done.from, done.stored, done.duplicates
    );
    drop(stores);
    if m.no_verify {
        return Ok(());
    }
    verify(
        common,
        serve,
        &Verify {
            quick: false,
            page_size: m.page_size,
            max_findings: 100,
            progress_secs: m.progress_secs,
        },
    )
    .await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracktrace-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match &cli.command {
            None => serve(&cli.common, &cli.serve).await,
            Some(Command::Serve(s)) => serve(&cli.common, s).await,
            Some(Command::Token(t)) => token(&cli.common, &cli.serve, t).await,
            Some(Command::Verify(v)) => verify(&cli.common, &cli.serve, v).await,
            Some(Command::Export(x)) => export(&cli.common, &cli.serve, x).await,
            Some(Command::Import(x)) => import(&cli.common, &cli.serve, x).await,
            Some(Command::Migrate(m)) => migrate(&cli.common, &cli.serve, m).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracktrace-server: {e}");
            ExitCode::FAILURE
        }
    }
}
