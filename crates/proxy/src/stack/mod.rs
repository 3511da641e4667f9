//! The HTTP request path as a stack of tower layers, read top to bottom
//! (assembled in [`route::new`]):
//!
//! - [`route`]: a connection's hyper service; the request's service and route, its
//!   hop-by-hop headers, and the [`Ctx`] that travels down with it.
//! - [`trace`]: the call's span and metrics, and the response the client gets: the
//!   upstream's, wrapped so the call ends with its body, or one ferry makes.
//! - [`deadline`]: the whole-call deadline (`timeout`, `grpc-timeout`), the time to
//!   response headers, and the activity clock of `stream-idle-timeout`.
//! - [`limit`]: the service's concurrency limit (`max-in-flight`, adaptive).
//! - [`retry`]: attempts, the replayed body, the budget and the backoff.
//! - [`balance`]: picks the attempt's endpoint and points the request at it.
//! - [`endpoint`]: one attempt on one endpoint: in-flight count, latency, connect and
//!   outlier health, `per-try-timeout`.
//! - [`upstream`]: the pooled HTTP/1.1 and HTTP/2 clients.
//!
//! A request goes down ([`call`]) as a [`Call`]; an attempt comes back up as an [`Answer`] or a
//! [`Failed`], each carrying the [`Ctx`] back so the layers above keep what they put
//! in it (the span, the permit). Every service here is always ready.

pub mod balance;
pub mod call;
pub mod deadline;
pub mod endpoint;
pub mod limit;
pub mod retry;
pub mod route;
pub mod trace;
pub mod upstream;

pub use call::{Answer, Attempt, Call, Ctx, Failed};
