//! Projection crash test with a real child process and `kill -9` (SIGKILL), on sled and on
//! PostgreSQL.
//!
//! The parent seeds a store with deposits, then, round after round, re-executes this test
//! binary as a child (env `TRACKTRACE_PROJECTION_CHILD=sled:<dir>` or `pg:<schema>`) that runs a
//! *non-idempotent*
//! same-store projection (counters) with small batches, printing its checkpoint after each
//! committed batch. The parent kills the child mid-catch-up, then finally restarts the
//! projection itself, catches up, and checks the read model is identical to a clean rebuild and
//! that every event was applied exactly once (the counters would show a double application).
//!
//! PostgreSQL: `TRACKTRACE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! a fresh schema dropped at the end; skipped loudly when unreachable outside CI, a failure under
//! `CI=true`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tracktrace_conformance::runtime::RuntimeStores;
use tracktrace_conformance::runtime::{BalanceProjection, dump, seed_accounts};
use tracktrace_core::{EventStore, Position, ProjectionRunner};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};

mod crash_common;

use crash_common::{open_sled, runtime};

const CHILD_ENV: &str = "TRACKTRACE_PROJECTION_CHILD";
const EVENTS: usize = 600;
const ROUNDS: usize = 3;

fn main() {
    if let Ok(target) = std::env::var(CHILD_ENV) {
        let target = Target::parse(&target);
        runtime().block_on(async { child(target.open().await).await });
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("projection_crash_mid_catch_up_sled: test");
        println!("projection_crash_mid_catch_up_postgres: test");
        return;
    }
    let dir = tempfile_dir();
    parent(&Target::Sled(dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    println!("test projection_crash_mid_catch_up_sled ... ok");
    let schema = format!("tt_projcrash_{:016x}", fastrand::u64(..));
    let target = Target::Pg(schema);
    match runtime().block_on(target.try_open()) {
        None => println!("test projection_crash_mid_catch_up_postgres ... skipped (see above)"),
        Some(_) => {
            parent(&target);
            runtime().block_on(async {
                if let Some(s) = target.try_open().await {
                    s.drop().await;
                }
            });
            println!("test projection_crash_mid_catch_up_postgres ... ok");
        }
    }
}

fn pg_url() -> String {
    std::env::var("TRACKTRACE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Which store a process opens.
#[derive(Clone, Debug)]
enum Target {
    Sled(std::path::PathBuf),
    Pg(String),
}

/// An open store (sled or PostgreSQL).
struct Opened {
    stores: RuntimeStores,
    pg: Option<PgStore>,
}

impl Opened {
    async fn drop(self) {
        if let Some(pg) = self.pg {
            let _ = pg.drop_schema().await;
        }
    }
}

impl Target {
    fn env(&self) -> String {
        match self {
            Target::Sled(dir) => format!("sled:{}", dir.display()),
            Target::Pg(schema) => format!("pg:{schema}"),
        }
    }

    fn parse(s: &str) -> Self {
        match s.split_once(':') {
            Some(("sled", dir)) => Target::Sled(dir.into()),
            Some(("pg", schema)) => Target::Pg(schema.to_owned()),
            _ => panic!("bad {CHILD_ENV} value {s:?}"),
        }
    }

    async fn try_open(&self) -> Option<Opened> {
        match self {
            Target::Sled(dir) => {
                let s = Arc::new(open_sled(dir));
                Some(Opened {
                    stores: RuntimeStores::from_store(s),
                    pg: None,
                })
            }
            Target::Pg(schema) => {
                let url = pg_url();
                match PgStore::connect_with(
                    PgStoreOptions::new(&url)
                        .schema(schema)
                        .connect_timeout(Duration::from_secs(5)),
                )
                .await
                {
                    Ok(pg) => Some(Opened {
                        stores: RuntimeStores::from_store(Arc::new(pg.clone())),
                        pg: Some(pg),
                    }),
                    Err(e)
                        if e.is_retryable()
                            && std::env::var("CI").map_or(true, |v| v != "true") =>
                    {
                        eprintln!(
                            "\n=== SKIPPING the PostgreSQL projection crash test: no database at \
                             {url} ({e}).\n=== Set TRACKTRACE_TEST_DATABASE_URL (CI=true makes \
                             this a failure).\n"
                        );
                        None
                    }
                    Err(e) => panic!("cannot connect to {url} (TRACKTRACE_TEST_DATABASE_URL): {e}"),
                }
            }
        }
    }

    async fn open(&self) -> RuntimeStores {
        self.try_open().await.expect("store reachable").stores
    }
}

fn projection() -> BalanceProjection {
    BalanceProjection {
        name: "crash-balances".into(),
        // Slow enough that the parent kills the child well before it catches up.
        delay: Some(Duration::from_millis(2)),
    }
}

async fn child(s: RuntimeStores) {
    let mut runner = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), projection())
        .with_batch_size(10);
    loop {
        let (_, at_head) = runner.step().await.expect("projection step");
        let cp = runner
            .checkpoint()
            .await
            .expect("checkpoint")
            .unwrap_or_default();
        println!("CP {}", cp.get());
        if at_head {
            println!("DONE");
            return;
        }
    }
}

fn parent(target: &Target) {
    let rt = runtime();
    let head = rt.block_on(async {
        let s = target.open().await;
        seed_accounts(&*s.events, EVENTS, 13).await.expect("seed");
        s.events.head().await.expect("head")
    });
    // The store is dropped (and its lock released) before the children start.
    let mut last_cp = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(CHILD_ENV, target.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        // Kill after a few more committed batches than the previous round reached.
        let mut seen = 0;
        let mut cp = 0;
        for line in lines.by_ref() {
            let line = line.expect("read child output");
            if line == "DONE" {
                panic!("round {round}: the child caught up before it was killed");
            }
            if let Some(n) = line.strip_prefix("CP ") {
                cp = n.parse().expect("checkpoint number");
                seen += 1;
                if seen >= 3 + round {
                    break;
                }
            }
        }
        child.kill().expect("kill -9 the child");
        let _ = child.wait();
        assert!(
            cp > last_cp,
            "round {round}: progress across restarts ({last_cp} -> {cp})"
        );
        assert!(
            cp < head.get(),
            "round {round}: killed mid-catch-up (checkpoint {cp} < head {head})"
        );
        last_cp = cp;
    }
    rt.block_on(async {
        let s = target.open().await;
        let p = projection();
        let ns = p.namespace();
        let stored_cp = s
            .read_models
            .load_checkpoint(&p.name)
            .await
            .expect("checkpoint")
            .unwrap_or(Position::START);
        assert!(
            stored_cp.get() >= last_cp && stored_cp < head,
            "the killed runs left a checkpoint mid-way: {stored_cp} (last seen {last_cp}, head {head})"
        );
        let fast = BalanceProjection {
            delay: None,
            ..p.clone()
        };
        let mut runner = ProjectionRunner::new(s.events.clone(), s.read_models.clone(), fast);
        runner.catch_up().await.expect("catch up after the crashes");
        let resumed = dump(&*s.read_models, &ns).await.expect("dump");
        runner.rebuild().await.expect("rebuild");
        let rebuilt = dump(&*s.read_models, &ns).await.expect("dump");
        assert_eq!(resumed, rebuilt, "resumed read model == clean rebuild");
        let total = rebuilt
            .iter()
            .find(|(k, _)| &k[..] == b"~total")
            .map(|(_, v)| serde_json::from_slice::<u64>(v).expect("total"))
            .expect("total present");
        assert_eq!(total, EVENTS as u64, "every event applied exactly once");
    });
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tracktrace-projection-crash-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}
