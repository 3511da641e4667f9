//! The ferry sidecar injector: decides whether a pod gets the proxy and writes the JSON
//! patch that adds it. The decision is a pure function ([`inject::inject`]); the
//! webhook ([`server`]) and offline injection ([`workloads`]) are thin layers on it.

#![forbid(unsafe_code)]

pub mod inject;
pub mod review;
pub mod server;
pub mod workloads;
