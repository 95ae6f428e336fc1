//! Helpers shared by the HTTP tests: a real `tracktrace-server` process, the `token`
//! subcommand, HTTP calls, service reachability, a cuttable TCP proxy, and a strict parser of
//! the Prometheus text exposition format (what `/metrics` answers), so tests read values
//! instead of matching substrings.
#![allow(dead_code, unreachable_pub)]

pub mod private_pg;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tracktrace_http::client::{ClientResponse, request};

pub const BIN: &str = env!("CARGO_BIN_EXE_tracktrace-server");
pub const SECRET: &str = "e2e-secret-0123456789abcdefghijklmnopqrstuvwxyz";

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Server {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env(
                "RUST_LOG",
                "warn,tracktrace_app=info,tracktrace_http=info,tracktrace_server=info",
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = match line
            .trim()
            .strip_prefix("tracktrace-server listening on http://")
        {
            Some(a) => a.to_owned(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Server { child, addr, log }
    }

    /// `kill -9`: the process dies at once, mid-whatever it was doing.
    pub fn kill_9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (graceful shutdown); returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        std::mem::forget(self);
        ok
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- server {} log ---\n{}",
                self.addr,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Runs `tracktrace-server token …` and returns the token.
pub fn cli_token(common: &[&str], server: &str, tenant: &str, scopes: &str) -> String {
    let out = Command::new(BIN)
        .args(common)
        .args([
            "token", "--tenant", tenant, "--scopes", scopes, "--server", server,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> ClientResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let bytes = body.map(|b| b.to_string().into_bytes());
    if bytes.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    request(addr, method, path, &headers, bytes.as_deref())
        .await
        .unwrap()
}

pub fn event(entity: &str, event_type: &str, at: &str, loc: &str) -> Value {
    json!({
        "entityId": entity, "entityType": "Bag", "eventType": event_type,
        "occurredAt": at, "location": {"code": loc}, "source": "e2e"
    })
}

pub async fn capture(addr: &str, token: &str, ev: &Value) -> Value {
    let r = call(addr, "POST", "/api/v1/events", Some(token), Some(ev)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

pub async fn trace(addr: &str, token: &str, entity: &str, query: &str, min: u64) -> ClientResponse {
    call(
        addr,
        "GET",
        &format!("/api/v1/trace/{entity}?minPosition={min}&{query}"),
        Some(token),
        None,
    )
    .await
}

pub fn types(v: &Value) -> Vec<String> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap().to_owned())
        .collect()
}

pub fn service_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// `host:port` of a `scheme://[user@]host:port/...` URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// Whether the service answers; under `CI=true` an unreachable service is a failure.
pub async fn reachable(var: &str, url: &str) -> bool {
    let ok = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(host_port(url)))
        .await
        .is_ok_and(|r| r.is_ok());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{var}={url} is unreachable (CI=true)");
        }
        eprintln!("\n*** SKIPPED: {url} unreachable; set {var} to a reachable server ***\n");
    }
    ok
}

/// A TCP proxy in front of PostgreSQL that the test can cut (a network outage).
pub struct Proxy {
    pub addr: String,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (d, c) = (down.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                c.lock().await.push(tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                }));
            }
        });
        Proxy { addr, down, conns }
    }

    /// Cuts every connection and refuses new ones.
    pub async fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for h in self.conns.lock().await.drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// `# TYPE` per metric family.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses `text`; fails on anything the format does not allow (a sample before its
    /// family's TYPE line, a second TYPE for one family, bad escapes, bad values).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut e = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| err("bad TYPE"))?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(err("unknown type"));
                }
                if e.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(err("second TYPE line"));
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let s = parse_sample(line).map_err(|m| err(&m))?;
            if e.family_of(&s.name).is_none() {
                return Err(err("sample without a TYPE line"));
            }
            e.samples.push(s);
        }
        Ok(e)
    }

    /// The family (TYPE line) a sample or metric name belongs to: itself, or the histogram
    /// whose `_bucket`, `_sum` or `_count` series it is.
    pub fn family_of(&self, name: &str) -> Option<&str> {
        if let Some((k, _)) = self.types.get_key_value(name) {
            return Some(k);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            match self.types.get_key_value(base) {
                Some((k, t)) if t == "histogram" || t == "summary" => Some(k.as_str()),
                _ => None,
            }
        })
    }

    /// The value of the sample `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Exposition::value`], 0 when the series does not exist yet.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Samples named `name` (any labels).
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if !valid {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find("=\"").ok_or("bad label")?;
            let key = &r[..eq];
            if key.is_empty()
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || key.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("bad label name {key:?}"));
            }
            let mut value = String::new();
            let mut it = r[eq + 2..].char_indices();
            let end = loop {
                match it.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match it.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, '\n') => return Err("newline in label value".into()),
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            r = &r[eq + 2 + end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
        rest = r;
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = value.split(' ').next().unwrap_or(value); // an optional timestamp follows
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}
