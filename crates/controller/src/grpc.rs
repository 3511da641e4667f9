//! The Discovery gRPC service: each `Resolve` call is a stream of one destination's
//! endpoint sets, the current one first.

use std::pin::Pin;
use std::sync::Arc;

use ferry_discovery_api as api;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::hub::Hub;
use crate::index::Dest;

pub struct DiscoveryService {
    hub: Arc<Hub>,
}

impl DiscoveryService {
    pub fn new(hub: Arc<Hub>) -> api::DiscoveryServer<DiscoveryService> {
        api::DiscoveryServer::new(DiscoveryService { hub })
    }
}

type Resolutions = Pin<Box<dyn Stream<Item = Result<api::Resolution, Status>> + Send>>;

#[tonic::async_trait]
impl api::Discovery for DiscoveryService {
    type ResolveStream = Resolutions;

    async fn resolve(
        &self,
        req: Request<api::ResolveRequest>,
    ) -> Result<Response<Self::ResolveStream>, Status> {
        let req = req.into_inner();
        let dest = Dest::parse(&req.destination, &self.hub.cluster_domain)
            .map_err(Status::invalid_argument)?;
        // Answering before the caches are full would send "not found" for Services
        // that exist; the sidecar waits a moment, then passes the call through.
        let mut synced = self.hub.synced();
        if synced.wait_for(|s| *s).await.is_err() {
            return Err(Status::unavailable("the controller is shutting down"));
        }
        tracing::debug!(destination = %req.destination, node = %req.node, "subscribed");
        let rx = self.hub.subscribe(dest, req.node);
        let stream = WatchStream::new(rx).map(|r| Ok(api::Resolution::clone(&r)));
        Ok(Response::new(Box::pin(stream)))
    }
}
