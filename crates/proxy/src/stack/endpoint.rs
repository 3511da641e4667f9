//! One attempt on one endpoint: its in-flight count, its latency (this attempt's own, so
//! an endpoint is never charged for the time an earlier one took to fail), its connect
//! and outlier health, and the attempt's time to response headers (`per-try-timeout`,
//! within what is left of `response-timeout` and the deadline).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::call::{Answer, Attempt, Call, Ctx, Failed};
use super::upstream::Send;
use crate::balance::{Endpoint, InFlight, Outlier};
use crate::errors::ProxyError;

#[derive(Clone, Copy, Debug, Default)]
pub struct EndpointLayer;

impl<S> tower::Layer<S> for EndpointLayer {
    type Service = EndpointSvc<S>;

    fn layer(&self, inner: S) -> EndpointSvc<S> {
        EndpointSvc { inner }
    }
}

#[derive(Clone, Debug)]
pub struct EndpointSvc<S> {
    inner: S,
}

impl<S> tower::Service<Call> for EndpointSvc<S>
where
    S: tower::Service<Send, Response = Response<Incoming>, Error = ProxyError>,
{
    type Response = Answer;
    type Error = Failed;
    type Future = EndpointFuture<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Call { req, mut ctx } = call;
        let ep = ctx.ep.take().expect("balance picks the endpoint");
        let started = Instant::now();
        ctx.span.set_endpoint(ep.addr);
        let in_flight = ep.start();
        let by = earliest(
            ctx.headers_by,
            ctx.settings()
                .per_try_timeout
                .map(|t| (started + t, ProxyError::PerTryTimeout)),
        );
        let send = self.inner.call(Send {
            svc: ctx.svc.clone(),
            req,
        });
        EndpointFuture {
            send,
            timer: by.map(|(at, _)| tokio::time::sleep_until(at)),
            timer_error: by.map_or(ProxyError::Timeout, |(_, e)| e),
            attempt: Some((ctx, ep, in_flight)),
            started,
        }
    }
}

pin_project! {
    pub struct EndpointFuture<F> {
        #[pin]
        send: F,
        #[pin]
        timer: Option<Sleep>,
        timer_error: ProxyError,
        attempt: Option<(Box<Ctx>, Arc<Endpoint>, InFlight)>,
        started: Instant,
    }
}

impl<F> Future for EndpointFuture<F>
where
    F: Future<Output = Result<Response<Incoming>, ProxyError>>,
{
    type Output = Attempt;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Attempt> {
        let mut this = self.project();
        let res = match this.send.poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => match this.timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
                Some(Poll::Ready(())) => Err(*this.timer_error),
                _ => return Poll::Pending,
            },
        };
        let (ctx, ep, in_flight) = this.attempt.take().expect("polled after it finished");
        Poll::Ready(finish(res, ctx, ep, in_flight, this.started.elapsed()))
    }
}

/// What the attempt teaches the endpoint and the concurrency limit.
fn finish(
    res: Result<Response<Incoming>, ProxyError>,
    mut ctx: Box<Ctx>,
    ep: Arc<Endpoint>,
    in_flight: InFlight,
    took: Duration,
) -> Attempt {
    match res {
        Ok(resp) => {
            let status = resp.status().as_u16();
            ep.observe(took);
            ep.connected();
            if let Some(s) = &ep.statuses {
                s.inc(status);
            }
            if let Some(p) = &ctx.permit {
                p.observe(took, status == 503);
            }
            Ok(Answer {
                resp,
                ctx,
                ep,
                in_flight,
            })
        }
        Err(error) => {
            drop(in_flight);
            let timed_out = matches!(
                error,
                ProxyError::Timeout | ProxyError::ResponseTimeout | ProxyError::PerTryTimeout
            );
            // A timed-out endpoint is slow as far as the balancer can tell.
            if timed_out || error == ProxyError::ConnectTimeout {
                ep.observe(took);
            }
            if timed_out && let Some(p) = &ctx.permit {
                p.observe(took, true);
            }
            match error {
                ProxyError::ConnectFailed | ProxyError::ConnectTimeout => ep.connect_failed(),
                ProxyError::UpstreamReset | ProxyError::PerTryTimeout => {
                    if let Some(set) = &ctx.set {
                        ep.outcome(true, set, Outlier::of(&ctx.svc.settings));
                    }
                }
                _ => {}
            }
            ctx.avoid = Some(ep);
            Err(Failed { error, ctx })
        }
    }
}

/// The earlier of two deadlines, with the error each one means.
pub fn earliest(
    a: Option<(Instant, ProxyError)>,
    b: Option<(Instant, ProxyError)>,
) -> Option<(Instant, ProxyError)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 < x.0 { y } else { x }),
        (x, y) => x.or(y),
    }
}
