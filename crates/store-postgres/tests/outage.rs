//! Outages map to the retryable `Unavailable` kind, quickly, and the store recovers.

mod common;

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracktrace_core::{EventStore, EventStoreExt, ExpectedVersion, NewEvent, StreamId, TenantId};
use tracktrace_store_postgres::{PgStore, PgStoreOptions};

#[tokio::test]
async fn a_closed_port_is_unavailable() {
    let err = PgStore::connect_with(
        PgStoreOptions::new("postgres://postgres@127.0.0.1:1/test")
            .schema("tt_unreachable")
            .connect_timeout(Duration::from_secs(2)),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "expected Unavailable, got {err:?}");
}

/// A TCP proxy in front of PostgreSQL that can be cut (all connections dropped, port closed)
/// and restored on the same port.
struct Proxy {
    port: u16,
    upstream: (String, u16),
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(upstream: (String, u16), port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let mut tasks = JoinSet::new();
        let up = upstream.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    break;
                };
                let up = up.clone();
                conns.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect((up.0.as_str(), up.1)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy {
            port,
            upstream,
            tasks,
        }
    }

    /// Drops every proxied connection and closes the port.
    async fn cut(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_is_unavailable_and_the_store_recovers() {
    // Needs the real database behind the proxy (skips like the other tests without one).
    let Some(direct) = common::try_store().await else {
        return;
    };
    let opts: PgConnectOptions = common::url().parse().unwrap();
    let upstream = (opts.get_host().to_owned(), opts.get_port());
    let mut proxy = Proxy::start(upstream, 0).await;
    let via_proxy = opts.clone().host("127.0.0.1").port(proxy.port);
    let store = PgStore::connect_with(
        PgStoreOptions::new("unused")
            .connect_options(via_proxy)
            .schema(direct.store.schema())
            .acquire_timeout(Duration::from_secs(1))
            .connect_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect through the proxy");
    let tenant = TenantId::parse("acme").unwrap();
    let stream = StreamId::parse("Bag-1").unwrap();
    store
        .append_to(
            &tenant,
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::json("A", &serde_json::json!({}))],
        )
        .await
        .expect("append through the proxy");

    proxy.cut().await;
    // The pooled connection is dead and new ones are refused: Unavailable, within the acquire
    // timeout (no ping before use, so the first failure is the statement's own I/O error).
    let retried = NewEvent::json("B", &serde_json::json!({}));
    for _ in 0..2 {
        let err = store
            .append_to(
                &tenant,
                &stream,
                ExpectedVersion::Any,
                vec![retried.clone()],
            )
            .await
            .expect_err("the server is gone");
        assert!(err.is_retryable(), "expected Unavailable, got {err:?}");
        let err = store.head().await.expect_err("the server is gone");
        assert!(err.is_retryable(), "expected Unavailable, got {err:?}");
    }

    // Back on the same port: the same (idempotent) append succeeds after a few retries.
    let port = proxy.port;
    let proxy = Proxy::start(proxy.upstream.clone(), port).await;
    let mut outcome = None;
    for _ in 0..50 {
        match store
            .append_to(
                &tenant,
                &stream,
                ExpectedVersion::Any,
                vec![retried.clone()],
            )
            .await
        {
            Ok(out) => {
                outcome = Some(out);
                break;
            }
            Err(e) => {
                assert!(
                    e.is_retryable(),
                    "expected Unavailable while recovering, got {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let out = outcome.expect("the store did not recover after the server came back");
    assert_eq!(out.last_version().get(), 2);
    let events = direct
        .store
        .read_stream_forwards(&tenant, &stream)
        .await
        .unwrap();
    assert_eq!(
        events.len(),
        2,
        "the retried append was stored exactly once"
    );
    drop(proxy);
}
