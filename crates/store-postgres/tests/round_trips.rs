//! Round trips per append, counted on the wire.
//!
//! The store talks to PostgreSQL through a small TCP proxy that parses the frontend protocol of
//! every connection and counts the messages the client sends. A round trip is a message the
//! client must wait for an answer to: `Sync` (extended protocol: one per statement pipeline) or
//! `Query` (simple protocol); `Bind`, `Execute` and `Close` travel in the same flight. `Parse`
//! counts statements prepared. The test then checks the
//! cost model the crate documents: after one warm-up append per statement shape, a
//! single-event append (new stream, known version, `Any` with and without a version hint) and a
//! batch are exactly one round trip, with nothing prepared again and no ping on checkout.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracktrace_core::{EventStore, EventStoreExt, ExpectedVersion, NewEvent, StreamId, TenantId};

/// Frontend messages counted per proxied connection, by type byte.
#[derive(Default, Clone, Debug)]
struct Counts(HashMap<u8, u64>);

impl Counts {
    fn get(&self, ty: u8) -> u64 {
        self.0.get(&ty).copied().unwrap_or(0)
    }
    /// Messages the client waits on: `Sync` and simple `Query`, but for `pg_notify`s.
    fn round_trips(&self) -> u64 {
        self.get(b'S') + self.get(b'Q')
    }
    /// Round trips that ran `pg_notify` (counted apart: the store's notifier may borrow any
    /// pooled connection, the one that carried the appends included).
    fn notifies(&self) -> u64 {
        self.get(NOTIFY)
    }
}

/// The key under which [`Counts`] keeps `pg_notify` round trips (not a message type).
const NOTIFY: u8 = 0;

/// The NUL-terminated string at the start of `b`, and the rest after it.
fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

fn is_notify(query: &[u8]) -> bool {
    query.windows(9).any(|w| w == b"pg_notify")
}

type Log = Arc<Mutex<Vec<Counts>>>;

/// Parses the frontend byte stream of one connection: an untyped startup packet (after an
/// optional untyped SSL/GSS request), then typed messages (type byte, big-endian length that
/// includes itself).
struct FrameParser {
    buf: Vec<u8>,
    started: bool,
    /// Prepared statement name → whether it runs `pg_notify`.
    statements: HashMap<Vec<u8>, bool>,
    /// The extended-protocol exchange since the last `Sync` runs `pg_notify`.
    notifying: bool,
}

impl FrameParser {
    fn feed(&mut self, bytes: &[u8], counts: &mut Counts) {
        self.buf.extend_from_slice(bytes);
        loop {
            if !self.started {
                let Some(len) = self.buf.get(..4).map(|b| be_len(b) as usize) else {
                    return;
                };
                if self.buf.len() < len {
                    return;
                }
                let code = self.buf.get(4..8).map_or(0, be_len);
                // SSLRequest / GSSENCRequest are followed by another untyped packet.
                self.started = !(code == 80_877_103 || code == 80_877_104);
                self.buf.drain(..len);
                continue;
            }
            if self.buf.len() < 5 {
                return;
            }
            let len = be_len(&self.buf[1..5]) as usize + 1;
            if self.buf.len() < len {
                return;
            }
            let ty = self.buf[0];
            let body = &self.buf[5..len];
            let key = match ty {
                b'P' => {
                    let (name, rest) = cstr(body);
                    let (query, _) = cstr(rest);
                    self.statements.insert(name.to_vec(), is_notify(query));
                    ty
                }
                b'B' => {
                    let (_portal, rest) = cstr(body);
                    let (statement, _) = cstr(rest);
                    self.notifying |= self.statements.get(statement).copied().unwrap_or(false);
                    ty
                }
                b'Q' if is_notify(cstr(body).0) => NOTIFY,
                b'S' if std::mem::take(&mut self.notifying) => NOTIFY,
                _ => ty,
            };
            *counts.0.entry(key).or_default() += 1;
            self.buf.drain(..len);
        }
    }
}

fn be_len(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A counting proxy in front of `upstream`; returns its port.
async fn proxy(upstream: (String, u16), log: Log) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = TcpStream::connect((upstream.0.as_str(), upstream.1)).await else {
                continue;
            };
            let idx = {
                let mut l = log.lock().unwrap();
                l.push(Counts::default());
                l.len() - 1
            };
            let log = log.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut parser = FrameParser {
                        buf: Vec::new(),
                        started: false,
                        statements: HashMap::new(),
                        notifying: false,
                    };
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        parser.feed(&buf[..n], &mut log.lock().unwrap()[idx]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    sw.shutdown().await.ok();
                };
                let down = async {
                    tokio::io::copy(&mut sr, &mut cw).await.ok();
                    cw.shutdown().await.ok();
                };
                tokio::join!(up, down);
            });
        }
    });
    port
}

/// Per-connection differences between two snapshots (new connections count from zero).
fn delta(before: &[Counts], after: &[Counts]) -> Vec<Counts> {
    after
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut d = a.clone();
            if let Some(b) = before.get(i) {
                for (ty, n) in &b.0 {
                    *d.0.entry(*ty).or_default() -= n;
                }
            }
            d
        })
        .collect()
}

fn ev(i: u64) -> NewEvent {
    NewEvent::json("BAG_SCANNED", &serde_json::json!({ "i": i, "at": "MAD" }))
}

/// Runs `op` `n` times after one warm-up run and returns the per-connection message counts of
/// the `n` measured runs.
async fn measure<F, Fut>(log: &Log, n: u64, mut op: F) -> Vec<Counts>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    op(0).await;
    let before = log.lock().unwrap().clone();
    for i in 1..=n {
        op(i).await;
    }
    let after = log.lock().unwrap().clone();
    delta(&before, &after)
}

/// Asserts `n` runs cost `n` round trips on the wire in total, with no statement prepared,
/// the per-connection counts in the failure message.
fn assert_one_round_trip_each(what: &str, n: u64, d: &[Counts]) {
    let trips: u64 = d.iter().map(Counts::round_trips).sum();
    let parses: u64 = d.iter().map(|c| c.get(b'P')).sum();
    let busy: Vec<&Counts> = d
        .iter()
        .filter(|c| !c.0.values().all(|v| *v == 0))
        .collect();
    assert_eq!(
        trips, n,
        "{what}: {n} operations sent {trips} round trips (Sync + Query) on the wire: {busy:?}"
    );
    assert_eq!(
        parses, 0,
        "{what}: statements prepared again after the warm-up: {busy:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_event_appends_and_batches_cost_one_round_trip() {
    // Reachability (and the skip-or-fail policy) through the shared helper.
    let Some(probe) = common::try_store().await else {
        return;
    };
    drop(probe);
    let url = common::url();
    let opts: PgConnectOptions = url.parse().expect("database url");
    let upstream = (opts.get_host().to_owned(), opts.get_port());
    let log: Log = Arc::default();
    let port = proxy(upstream, log.clone()).await;
    let via_proxy = opts
        .clone()
        .host("127.0.0.1")
        .port(port)
        .ssl_mode(PgSslMode::Disable);
    // NOTIFY and LISTEN off: their background connections are not on the append path (the
    // second test counts them apart). Group appends stay at their default.
    let Some(test) = common::try_store_with(|o| {
        o.connect_options(via_proxy.clone())
            .notify(false)
            .listen(false)
    })
    .await
    else {
        return;
    };
    let store = test.store.clone();
    let tenant = TenantId::parse("acme").unwrap();
    const N: u64 = 50;

    // New streams, `NoStream` (what a command on a new aggregate sends).
    let d = measure(&log, N, |i| {
        let (store, tenant) = (store.clone(), tenant.clone());
        async move {
            let s = StreamId::parse(format!("new-{i}")).unwrap();
            store
                .append_to(&tenant, &s, ExpectedVersion::NoStream, vec![ev(i)])
                .await
                .expect("append to a new stream");
        }
    })
    .await;
    assert_one_round_trip_each("NoStream appends to new streams", N, &d);

    // One stream, `Exact(v)` (a command on a loaded aggregate).
    let exact = StreamId::parse("exact").unwrap();
    store
        .append_to(&tenant, &exact, ExpectedVersion::NoStream, vec![ev(0)])
        .await
        .expect("first event");
    let d = measure(&log, N, |i| {
        let (store, tenant, s) = (store.clone(), tenant.clone(), exact.clone());
        async move {
            let expected = ExpectedVersion::Exact(tracktrace_core::Version::new(i + 1));
            store
                .append_to(&tenant, &s, expected, vec![ev(i)])
                .await
                .expect("append at a known version");
        }
    })
    .await;
    assert_one_round_trip_each("Exact appends", N, &d);

    // One stream, `Any` (the store's version hint from its own last append).
    let any = StreamId::parse("any").unwrap();
    let d = measure(&log, N, |i| {
        let (store, tenant, s) = (store.clone(), tenant.clone(), any.clone());
        async move {
            store
                .append_to(&tenant, &s, ExpectedVersion::Any, vec![ev(i)])
                .await
                .expect("append with Any");
        }
    })
    .await;
    assert_one_round_trip_each("Any appends to a hinted stream", N, &d);

    // `Any` to streams this process never saw (no hint: the statement looks the version up).
    let d = measure(&log, N, |i| {
        let (store, tenant) = (store.clone(), tenant.clone());
        async move {
            let s = StreamId::parse(format!("cold-{i}")).unwrap();
            store
                .append_to(&tenant, &s, ExpectedVersion::Any, vec![ev(i)])
                .await
                .expect("append with Any to an unseen stream");
        }
    })
    .await;
    assert_one_round_trip_each("Any appends to unseen streams", N, &d);

    // Batches of 10 events.
    let batch = StreamId::parse("batch").unwrap();
    let d = measure(&log, N, |i| {
        let (store, tenant, s) = (store.clone(), tenant.clone(), batch.clone());
        async move {
            let events = (0..10).map(|k| ev(i * 10 + k)).collect();
            store
                .append_to(&tenant, &s, ExpectedVersion::Any, events)
                .await
                .expect("batch append");
        }
    })
    .await;
    assert_one_round_trip_each("batches of 10", N, &d);

    // Reading a stream back: one round trip too.
    let d = measure(&log, N, |_| {
        let (store, tenant, s) = (store.clone(), tenant.clone(), exact.clone());
        async move {
            let events = store
                .read_stream(tracktrace_core::ReadStream::forwards(tenant, s))
                .await
                .expect("read stream");
            assert_eq!(events.len() as u64, N + 2);
        }
    })
    .await;
    assert_one_round_trip_each("read_stream", N, &d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_notify_on_the_append_connection_still_sends_one_round_trip_per_append() {
    let Some(probe) = common::try_store().await else {
        return;
    };
    drop(probe);
    let opts: PgConnectOptions = common::url().parse().expect("database url");
    let upstream = (opts.get_host().to_owned(), opts.get_port());
    let log: Log = Arc::default();
    let port = proxy(upstream, log.clone()).await;
    let via_proxy = opts
        .clone()
        .host("127.0.0.1")
        .port(port)
        .ssl_mode(PgSslMode::Disable);
    // Store defaults: NOTIFY and LISTEN on.
    let Some(test) = common::try_store_with(|o| o.connect_options(via_proxy.clone())).await else {
        return;
    };
    let store = test.store.clone();
    let tenant = TenantId::parse("acme").unwrap();
    let s = StreamId::parse("notified").unwrap();
    const N: u64 = 100;
    let append = |i: u64| {
        let (store, tenant, s) = (store.clone(), tenant.clone(), s.clone());
        async move {
            store
                .append_to(&tenant, &s, ExpectedVersion::Any, vec![ev(i)])
                .await
                .expect("append");
        }
    };
    // Warm-up: the first append finds no version hint, the second prepares the hinted statement.
    append(0).await;
    append(0).await;
    let before = log.lock().unwrap().clone();
    for i in 1..=N {
        append(i).await;
    }
    // Give the coalesced NOTIFY of the last append time to go out.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let d = delta(&before, &log.lock().unwrap().clone());
    // The connection that carried the appends: the busiest one once the `pg_notify` round
    // trips (which may borrow any pooled connection) are counted apart.
    let mut trips: Vec<u64> = d.iter().map(Counts::round_trips).collect();
    trips.sort_unstable();
    let append_conn = *trips.last().unwrap();
    let notifies: u64 = d.iter().map(Counts::notifies).sum();
    assert_eq!(
        append_conn, N,
        "the append connection sent {append_conn} round trips for {N} appends: {d:?}"
    );
    println!(
        "{N} sequential appends with NOTIFY on: {append_conn} round trips on the append \
         connection, {notifies} coalesced pg_notify round trips"
    );
    assert!(
        notifies <= N,
        "NOTIFY is coalesced: at most one per append, got {notifies} for {N}"
    );
}
