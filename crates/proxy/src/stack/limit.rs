//! The service's concurrency limit (circuit breaking): a request over `max-in-flight` or
//! the adaptive limit is answered at once, `overloaded`, instead of queueing behind the
//! requests already waiting. The permit rides in the [`Ctx`](super::Ctx) until the
//! response body ends.

use std::task::{Context, Poll};

use futures::future::Either as E;

use super::call::{Answer, Call, Either, Failed};
use crate::errors::ProxyError;

#[derive(Clone, Copy, Debug, Default)]
pub struct LimitLayer;

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Limit<S> {
    inner: S,
}

impl<S, B> tower::Service<Call<B>> for Limit<S>
where
    S: tower::Service<Call<B>, Response = Answer, Error = Failed>,
{
    type Response = Answer;
    type Error = Failed;
    type Future = Either<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut call: Call<B>) -> Self::Future {
        let s = call.ctx.settings();
        if s.max_in_flight.is_some() || s.adaptive_concurrency {
            let permit = call
                .ctx
                .svc
                .limiter
                .acquire(s.max_in_flight, s.adaptive_concurrency);
            match permit {
                Some(p) => call.ctx.permit = Some(p),
                None => {
                    return E::Left(std::future::ready(Err(Failed {
                        error: ProxyError::Overloaded,
                        ctx: call.ctx,
                    })));
                }
            }
        }
        E::Right(self.inner.call(call))
    }
}
