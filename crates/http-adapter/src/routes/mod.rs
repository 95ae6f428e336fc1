//! The handlers, one module per resource; [`crate::openapi`] assembles them into the router.

pub mod analytics;
pub mod capture;
pub mod milestones;
pub mod ops;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod propagation;
pub mod tenants;
pub mod trace;
