//! Attempts. The first goes out at once; a failed one goes again when
//! [`retryable`] allows (the route's `retry-on`, an idempotent
//! method, or nothing sent at all), the body can be replayed whole, and the service's
//! retry budget has one to spare, after a jittered backoff when the request was written.
//! Each retry is an event on the span and a `ferry_retries_total{reason}`.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use super::call::{Answer, Attempt, Call, Ctx, Failed};
use crate::balance::Outlier;
use crate::body::{ReqBody, failed_call, grpc_status};
use crate::errors::ProxyError;
use crate::retry::{Failure, Replay, backoff, may_resend, retryable};

#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer;

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
}

impl<S> tower::Service<Call<Incoming>> for Retry<S>
where
    S: tower::Service<Call, Response = Answer, Error = Failed> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Answer;
    type Error = Failed;
    type Future = BoxFuture<'static, Attempt>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<Incoming>) -> Self::Future {
        Box::pin(attempts(self.inner.clone(), call))
    }
}

/// What a retry needs to rebuild the request.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

async fn attempts<S>(mut inner: S, call: Call<Incoming>) -> Attempt
where
    S: tower::Service<Call, Response = Answer, Error = Failed>,
{
    let Call { req, mut ctx } = call;
    let set = ctx.svc.endpoint_set();
    // A failed connect is retried on another endpoint even with `retries: 0` (as Istio
    // does), when there is another. That costs a header-map copy (and, with a body, the
    // replay buffer) per request to a balanced or retrying service.
    let can_retry = ctx.settings().retries > 0 || set.endpoints.len() > 1;
    ctx.set = Some(set);
    if !can_retry {
        let activity = ctx.activity.clone();
        let req = req.map(|b| ReqBody::direct(b).with_activity(activity));
        return inner.call(Call { req, ctx }).await;
    }
    let (parts, body) = req.into_parts();
    let head = Head {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    };
    let (body, replay) = if body.is_end_stream() {
        (ReqBody::direct(body), None)
    } else {
        let r = Replay::new(body, may_resend(head.version, &head.method, ctx.settings()));
        (ReqBody::replay(r.attempt()), Some(r))
    };
    ctx.svc.retry_budget.deposit(ctx.start.into_std());
    let mut req = Request::from_parts(parts, body.with_activity(ctx.activity.clone()));
    let mut attempt = 0;
    loop {
        let (failure, back) = match inner.call(Call { req, ctx }).await {
            Ok(a) => {
                let status = a.resp.status().as_u16();
                let g = if a.ctx.grpc {
                    grpc_status(a.resp.headers())
                } else {
                    None
                };
                let failure = Failure::Status(status, g);
                // Not retried: the upstream's own answer goes back, whatever it is.
                if !failed_call(status, g)
                    || !may_retry(&a.ctx, failure, &head.method, attempt, replay.as_deref())
                {
                    return Ok(a);
                }
                let Answer { mut ctx, ep, .. } = a;
                if let Some(set) = &ctx.set {
                    ep.outcome(true, set, Outlier::of(&ctx.svc.settings));
                }
                ctx.avoid = Some(ep);
                (failure, ctx)
            }
            Err(f) => {
                let failure = match f.error {
                    e @ (ProxyError::ConnectFailed | ProxyError::ConnectTimeout) => {
                        Failure::Connect(e)
                    }
                    ProxyError::Unprocessed => Failure::Unprocessed,
                    e @ (ProxyError::UpstreamReset | ProxyError::PerTryTimeout) => {
                        Failure::Written(e)
                    }
                    _ => return Err(f),
                };
                if !may_retry(&f.ctx, failure, &head.method, attempt, replay.as_deref()) {
                    return Err(f);
                }
                (failure, f.ctx)
            }
        };
        ctx = back;
        attempt += 1;
        let reason = failure.reason();
        ctx.shared.metrics.retry(&ctx.svc.name, reason);
        if let Some(from) = &ctx.avoid {
            ctx.span.retry(attempt, from.addr, reason);
            tracing::debug!(service = %ctx.svc.name, from = %from.addr, attempt, reason, "retrying");
        }
        if let Failure::Status(..) | Failure::Written(_) = failure {
            let wait = tokio::time::Instant::now() + backoff(attempt);
            tokio::time::sleep_until(ctx.deadline.map_or(wait, |d| d.min(wait))).await;
        }
        let body = match &replay {
            Some(r) => ReqBody::replay(r.attempt()),
            None => ReqBody::empty(),
        };
        let mut r = Request::new(body.with_activity(ctx.activity.clone()));
        *r.method_mut() = head.method.clone();
        *r.uri_mut() = head.uri.clone();
        *r.version_mut() = head.version;
        *r.headers_mut() = head.headers.clone();
        req = r;
    }
}

/// Whether the failure may be retried: the route's rules, a body that can be sent whole
/// again, and the budget.
fn may_retry(
    ctx: &Ctx,
    f: Failure,
    method: &Method,
    attempt: u32,
    replay: Option<&Replay>,
) -> bool {
    let written = !matches!(f, Failure::Connect(_));
    if !retryable(f, method, ctx.settings(), attempt)
        || !replay.is_none_or(|r| r.replayable(written))
    {
        return false;
    }
    if ctx.svc.retry_budget.withdraw() {
        return true;
    }
    ctx.shared.metrics.budget_exhausted(&ctx.svc.name);
    false
}
