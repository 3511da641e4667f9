//! The ferry data plane: listeners, protocol detection, HTTP/1.1, HTTP/2 and gRPC
//! proxying on hyper, opaque TCP pass-through, balancing, timeouts and metrics.
//!
//! The policy arrives as a [`ferry_policy::Policy`]; [`Shared::apply`] compiles it into a
//! [`Runtime`] and swaps it in with `arc-swap`, so requests never take a lock to read it.
//!
//! Modules, each importing only those listed before it:
//!
//! - [`errors`]: the proxy's own failures, and the responses and gRPC trailers they become.
//! - [`metrics`]: the Prometheus families and per-route handles.
//! - [`locality`]: tiers by nearness, and when traffic fails over or spills.
//! - [`balance`]: endpoints (load, latency, health, ejection) and the balancers.
//! - [`limit`]: the concurrency limiter, static and adaptive.
//! - [`retry`]: what may be retried, the retry budget, the replayable request body.
//! - [`body`]: request and response bodies; a call ends with its response body.
//! - [`discovery`], [`controller`]: endpoints from DNS or ferry-controller.
//! - [`memory`]: when freed memory can go back to the system; the upstream connector.
//! - [`state`]: the compiled policy: services, routes, clients, shared state.
//! - [`http`]: HTTP on the wire: hop-by-hop headers, upgrades, `grpc-timeout`.
//! - [`tcp`]: opaque TCP and `CONNECT` tunnels: connecting, splicing, their metrics.
//! - [`stack`]: the request path as tower layers, top to bottom: route, trace,
//!   deadline, limit, retry, balance, endpoint, upstream.
//! - [`detect`], [`head`], `server`: listeners, protocol detection, header timers, idle
//!   HTTP/1 connections giving their buffers back.

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
pub mod memory;
pub mod metrics;
pub mod retry;
mod server;
pub mod stack;
pub mod state;
pub mod tcp;

pub use controller::ControllerDiscover;
pub use discovery::{DefaultDiscover, Discover};
pub use errors::ProxyError;
pub use metrics::Metrics;
pub use server::{Drain, Proxy};
pub use state::{Runtime, ServiceRt, Shared};
