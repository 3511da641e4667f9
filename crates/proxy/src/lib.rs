//! The ferry data plane: listeners, protocol detection, HTTP/1.1, HTTP/2 and gRPC
//! proxying on hyper, opaque TCP pass-through, balancing, timeouts and metrics.
//!
//! The policy arrives as a [`ferry_policy::Policy`]; [`Shared::apply`] compiles it into a
//! [`Runtime`] and swaps it in with `arc-swap`, so requests never take a lock to read it.

#![forbid(unsafe_code)]

pub mod balance;
pub mod body;
pub mod controller;
pub mod detect;
pub mod discovery;
pub mod errors;
pub mod head;
pub mod http;
pub mod limit;
pub mod locality;
pub mod metrics;
pub mod retry;
mod server;
pub mod state;
pub mod tcp;

pub use controller::ControllerDiscover;
pub use discovery::{DefaultDiscover, Discover};
pub use errors::ProxyError;
pub use metrics::Metrics;
pub use server::{Drain, Proxy};
pub use state::{Runtime, ServiceRt, Shared};
