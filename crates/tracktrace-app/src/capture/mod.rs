//! Capture (architecture 6.1.1): the [`pipeline`] every front end calls, the [`service`]
//! (command side: schemas, type claim, append) and the two [`aggregates`].

pub mod aggregates;
pub mod pipeline;
pub mod service;

pub use aggregates::{CaptureCommand, EntityClaim, TrackedEntity};
pub use pipeline::{CapturePipeline, CaptureRequest};
pub use service::{CaptureService, Captured};
