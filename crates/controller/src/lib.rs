//! `ferry-controller`: the mesh's only reader of the Kubernetes API. It holds one watch
//! per resource kind (Services, EndpointSlices, Node metadata) and streams endpoint sets
//! to sidecars over gRPC, per destination they ask for.

#![forbid(unsafe_code)]

pub mod grpc;
pub mod hub;
pub mod index;
pub mod watch;

pub use hub::Hub;
pub use index::{Dest, Index, SvcKey};
