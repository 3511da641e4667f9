//! The call's clocks: its deadline (the policy's `timeout`, or the client's shorter
//! `grpc-timeout`, passed on to a gRPC upstream as what is left), the time its response
//! headers must come by (`response-timeout`), and the request side's activity stamp for
//! `stream-idle-timeout`. The timers themselves run per attempt ([`super::endpoint`]) and
//! in the response body.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use super::call::{Answer, Call, Failed};
use super::endpoint::earliest;
use crate::body::clock_ns;
use crate::errors::ProxyError;
use crate::http::{deadline, set_grpc_timeout};

#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B> tower::Service<Call<B>> for Deadline<S>
where
    S: tower::Service<Call<B>, Response = Answer, Error = Failed>,
{
    type Response = Answer;
    type Error = Failed;
    type Future = S::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut call: Call<B>) -> Self::Future {
        let ctx = &mut call.ctx;
        let s = ctx.settings();
        let by = deadline(s.timeout, ctx.grpc, call.req.headers(), ctx.start);
        let headers_by = earliest(
            by.map(|d| (d, ProxyError::Timeout)),
            s.response_timeout
                .map(|t| (ctx.start + t, ProxyError::ResponseTimeout)),
        );
        let idle = s.stream_idle_timeout.is_some();
        if let Some(d) = by
            && ctx.grpc
        {
            set_grpc_timeout(
                call.req.headers_mut(),
                d.saturating_duration_since(tokio::time::Instant::now()),
            );
        }
        ctx.deadline = by;
        ctx.headers_by = headers_by;
        if idle {
            ctx.activity = Some(Arc::new(AtomicU64::new(clock_ns())));
        }
        self.inner.call(call)
    }
}
