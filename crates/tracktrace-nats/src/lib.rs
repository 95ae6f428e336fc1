//! Event propagation for tracktrace over NATS JetStream (architecture scenario
//! "Propagación evento: Event Publisher → Queue → SITA", flow 6.2.1 steps 1 and 7).
//!
//! - [`publisher`]: the outbox publisher. It follows the store's global log from a persisted
//!   checkpoint and publishes each event (mapped by a [`publisher::MessageMapper`]) with its
//!   event id as `Nats-Msg-Id`: at-least-once, ordered per entity, retried with backoff behind
//!   a breaker. One publisher per partner route, each with its own checkpoint and filter, so a
//!   new route replays from any position.
//! - [`ingest`]: a durable JetStream consumer feeding messages to the same pipeline as the HTTP
//!   capture, with a dead-letter subject for invalid ones.
//!
//! The server decides subjects and payloads (it knows the Track & Trace wire format); this crate
//! knows only NATS and the kernel.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tracktrace_core::{EventStore, InMemoryStore, RecordedEvent};
//! use tracktrace_nats::publisher::{OutboundMessage, Publisher, PublisherConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(InMemoryStore::new());
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let mapper = |e: &RecordedEvent| {
//!     Some(OutboundMessage {
//!         subject: format!("tracktrace.{}.{}", e.tenant, e.event_type),
//!         payload: e.payload.clone(),
//!         headers: vec![],
//!         ordering_key: e.stream.to_string(),
//!     })
//! };
//! let publisher = Publisher::spawn(
//!     store.clone() as Arc<dyn EventStore>,
//!     store,
//!     js,
//!     Arc::new(mapper),
//!     PublisherConfig::new("publisher.all"),
//! );
//! println!("{:?}", publisher.status());
//! # Ok(())
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod ingest;
pub mod publisher;

pub use async_nats;
