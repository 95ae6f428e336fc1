//! Track & Trace reference server: operational events captured over REST, validated,
//! enriched, de-duplicated and stored in a tracktrace event store, projected into per-entity
//! timelines and served back as traces.

pub mod api;
pub mod auth;
pub mod cache;
pub mod capture;
pub mod client;
pub mod domain;
pub mod error;
pub mod projection;
pub mod server;
pub mod tenants;
pub mod timeline;
