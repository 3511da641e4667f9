//! The discovery API between `ferry-controller` (server) and the sidecars (client),
//! generated from `proto/discovery.proto`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("ferry.discovery.v1");

pub use discovery_client::DiscoveryClient;
pub use discovery_server::{Discovery, DiscoveryServer};
