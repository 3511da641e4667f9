//! The ferry policy model: pod annotations and policy files parsed into one typed
//! [`Policy`], validated with field-level errors.
//!
//! Pure: no I/O. The sidecar and the injector both judge an annotation with this crate,
//! so they never disagree about what a value means.

#![forbid(unsafe_code)]

pub mod annotations;
pub mod contract;
mod error;
mod policy;
pub mod settings;

pub use error::{Errors, FieldError};
pub use policy::{
    DEFAULT_ADMIN, DEFAULT_DETECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, Endpoints, Listener, ListenerKind, Locality, MetricsCompat, Policy,
    Route, RouteMatch, Service, StaticEndpoint,
};
pub use settings::{Formats, HashOn, Lb, Overrides, RetryOn, Settings};

/// The prefix of every ferry annotation and label.
pub const ANNOTATION_PREFIX: &str = annotations::PREFIX;
