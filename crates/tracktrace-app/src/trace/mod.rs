//! The trace read model (architecture 6.1.2): the projection that builds per-entity
//! timelines ([`model`]), the queries over them ([`query`]), the views front ends serve
//! ([`view`]), live entries ([`live`]) and the projection's runner ([`runner`]).

pub mod live;
pub mod model;
pub mod query;
pub mod runner;
pub mod view;

pub use model::{EntityStatus, TRACE_PROJECTION, TimelineEntry, TraceProjection};
pub use view::{PageLimits, ParsedQuery, TraceOptions, TraceView};
