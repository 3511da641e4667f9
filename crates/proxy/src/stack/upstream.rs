//! The bottom of the stack: the service's pooled hyper clients, HTTP/2 for requests
//! that are HTTP/2 by now, HTTP/1.1 otherwise.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::TryFutureExt;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Error, ResponseFuture};

use crate::body::ReqBody;
use crate::errors::ProxyError;
use crate::state::ServiceRt;

/// A request for `svc`'s upstream clients.
pub struct Send {
    pub svc: Arc<ServiceRt>,
    pub req: Request<ReqBody>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Upstream;

impl tower::Service<Send> for Upstream {
    type Response = Response<Incoming>;
    type Error = ProxyError;
    type Future = futures::future::MapErr<ResponseFuture, fn(Error) -> ProxyError>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, s: Send) -> Self::Future {
        let clients = &s.svc.clients;
        let send = if s.req.version() == Version::HTTP_2 {
            clients.h2.request(s.req)
        } else {
            clients.h1.request(s.req)
        };
        send.map_err(classify as fn(Error) -> ProxyError)
    }
}

fn classify(e: Error) -> ProxyError {
    let error = ProxyError::from_client(&e);
    tracing::debug!(error = ?e, reason = error.reason(), "upstream request failed");
    error
}
