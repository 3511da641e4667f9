//! Demo and test upstreams: an HTTP/1.1 + h2c server, the `ferry.demo.Echo` gRPC
//! service, a TCP echo server and a server-speaks-first one; and small clients for them.
//! `ferry demo` puts the proxy in front of these; the tests use them as real peers.

#![forbid(unsafe_code)]

mod grpc;
mod http;
mod tcp;

pub mod proto {
    tonic::include_proto!("ferry.demo");
}

pub use grpc::{EchoService, grpc_say, serve_grpc};
pub use http::{HttpUpstream, http_get, serve_http};
pub use tcp::{BANNER, serve_banner, serve_tcp_echo};
