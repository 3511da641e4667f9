//! Picks the attempt's endpoint from the service's [`EndpointSet`](crate::balance::EndpointSet)
//! (balancer, hash key, locality tiers, health; a retry avoids the endpoint that failed)
//! and points the request at it.

use std::task::{Context, Poll};

use futures::future::Either as E;
use http::uri::{PathAndQuery, Scheme, Uri};

use super::call::{Answer, Call, Either, Failed};
use crate::balance::request_key;
use crate::errors::ProxyError;

#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceLayer;

impl<S> tower::Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
}

impl<S> tower::Service<Call> for Balance<S>
where
    S: tower::Service<Call, Response = Answer, Error = Failed>,
{
    type Response = Answer;
    type Error = Failed;
    type Future = Either<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let ctx = &mut call.ctx;
        if ctx.set.is_none() {
            ctx.set = Some(ctx.svc.endpoint_set());
        }
        let set = ctx.set.as_deref().expect("just set");
        let key = request_key(
            set.lb(),
            &ctx.settings().hash_on,
            Some(call.req.headers()),
            ctx.peer,
        );
        let Some(ep) = set.pick(key, ctx.avoid.as_ref()).cloned() else {
            return E::Left(fail(ProxyError::NoEndpoints, call));
        };
        let pq = call
            .req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        match upstream_uri(&ep.authority, pq) {
            Ok(uri) => *call.req.uri_mut() = uri,
            Err(e) => {
                tracing::debug!(error = %e, "bad request uri");
                return E::Left(fail(ProxyError::UpstreamReset, call));
            }
        }
        call.ctx.ep = Some(ep);
        E::Right(self.inner.call(call))
    }
}

fn fail(error: ProxyError, call: Call) -> super::call::Ready {
    std::future::ready(Err(Failed {
        error,
        ctx: call.ctx,
    }))
}

/// The request's path and query, sent to `authority`.
fn upstream_uri(
    authority: &http::uri::Authority,
    pq: PathAndQuery,
) -> Result<Uri, http::uri::InvalidUriParts> {
    // From parts rather than `Uri::builder()`, whose every step moves a `Result` of them.
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts)
}
