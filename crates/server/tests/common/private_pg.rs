//! A private PostgreSQL cluster for tests that stop, kill or reconfigure it (never the
//! machine's shared one).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::in_ci;

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private PostgreSQL cluster (`initdb` in a temp dir, trust auth, a free port), run as the
/// `postgres` user, which the test stops and starts.
pub struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    settings: Vec<String>,
    _tmp: tempfile::TempDir,
}

fn as_postgres(cmd: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{PG_BIN}/{cmd}")])
        .args(args);
    c.output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

impl PrivatePostgres {
    /// A cluster with default settings.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// A cluster started with extra `-c name=value` settings (e.g.
    /// `shared_preload_libraries=pg_stat_statements`).
    pub fn start_with(settings: &[&str]) -> Option<Self> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            assert!(!in_ci(), "{PG_BIN}/initdb missing under CI=true");
            eprintln!("\n*** SKIPPED: {PG_BIN}/initdb not found ***\n");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cluster");
        std::fs::create_dir(&dir).unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(tmp.path())
            .status()
            .unwrap();
        assert!(chown.success());
        let out = as_postgres(
            "initdb",
            &[
                "-D",
                dir.to_str().unwrap(),
                "--auth=trust",
                "-U",
                "postgres",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self {
            port: free_port(),
            dir,
            settings: settings.iter().map(|s| format!(" -c {s}")).collect(),
            _tmp: tmp,
        };
        pg.up();
        Some(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn up(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}{}",
            self.port,
            self.dir.display(),
            self.settings.concat()
        );
        let out = as_postgres(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-o", &opts, "-w", "-l"]
                .iter()
                .copied()
                .chain([self.dir.join("log").to_str().unwrap(), "start"])
                .collect::<Vec<_>>(),
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn down(&self) {
        let out = as_postgres(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop");
    }

    /// Terminates every connection but the caller's.
    pub fn kill_connections(&self) {
        self.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
        );
    }

    /// Runs `sql` with `psql` in the database `postgres`; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-Atc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}
