//! A PostgreSQL cluster with default settings, created by the bench itself: `initdb` into a
//! temporary folder, started on a free loopback port, stopped and removed on drop. What an
//! independent harness measures against (fsync, synchronous_commit, shared_buffers and every
//! other setting at PostgreSQL's defaults), unlike a machine's tuned cluster. The only
//! addition is `pg_stat_statements` (loaded, not tuning anything) to count statements per
//! operation.
//!
//! `initdb` refuses to run as root; as root the cluster is created and run as the `postgres`
//! user (`runuser`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where Debian's PostgreSQL 15 binaries live (`TRACKTRACE_PG_BIN` overrides).
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running private cluster.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Creates and starts a cluster; `Err` names what is missing or failed.
    pub fn start() -> Result<Self, String> {
        let bin = std::env::var("TRACKTRACE_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(DEFAULT_PG_BIN));
        if !bin.join("initdb").exists() {
            return Err(format!(
                "{}/initdb not found (set TRACKTRACE_PG_BIN to PostgreSQL's bin directory)",
                bin.display()
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()))?;
        }
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("free port: {e}"))?;
        let pg = Self {
            bin,
            data,
            port,
            as_postgres,
            _dir: dir,
        };
        pg.pg(
            "initdb",
            &["-D", pg.data_str(), "--auth=trust", "-U", "postgres"],
        )?;
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c shared_preload_libraries=pg_stat_statements",
            pg.dir().display()
        );
        let log = pg.dir().join("log");
        let log = log.to_str().unwrap_or("log").to_owned();
        pg.pg(
            "pg_ctl",
            &["-D", pg.data_str(), "-o", &opts, "-w", "-l", &log, "start"],
        )?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn dir(&self) -> &Path {
        self.data.parent().unwrap_or(&self.data)
    }

    fn data_str(&self) -> &str {
        self.data.to_str().unwrap_or_default()
    }

    fn pg(&self, tool: &str, args: &[&str]) -> Result<Output, String> {
        let path = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        run(c.args(args))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data_str().to_owned();
        let _ = self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn run(c: &mut Command) -> Result<Output, String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
