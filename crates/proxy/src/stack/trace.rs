//! The call as the user sees it: its span (started here, with trace context written for
//! the next hop) and its metrics, and the response the client gets. An answer from the
//! upstream goes back with its body wrapped so the call ends (metrics, span, outlier
//! outcome, in-flight count, permit, deadline, idle timer) when the body does; an
//! accepted HTTP/1.1 upgrade becomes a tunnel; a failure becomes the response ferry
//! makes itself ([`ProxyError::to_response`](crate::errors::ProxyError::to_response)), recorded as the call's end.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::FutureExt;
use http::Response;
use http::header::{self, HeaderValue};
use hyper::body::Incoming;

use ferry_telemetry::Kind;

use super::call::{Answer, Attempt, Call, Ctx, Failed};
use crate::balance::Outlier;
use crate::body::{CallEnd, Idle, ProxyBody};
use crate::http::{strip_hop_by_hop, tunnel};

#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

type Respond = fn(Attempt) -> Result<Response<ProxyBody>, Infallible>;

impl<S> tower::Service<Call<Incoming>> for Trace<S>
where
    S: tower::Service<Call<Incoming>, Response = Answer, Error = Failed>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = futures::future::Map<S::Future, Respond>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<Incoming>) -> Self::Future {
        let Call { mut req, mut ctx } = call;
        // The headers are taken out for the tracer to write while it reads the method
        // and path: a move of the map, not of the whole request twice. An empty map
        // does not allocate.
        let mut headers = std::mem::take(req.headers_mut());
        let span = {
            let s = ctx.settings();
            let info = ferry_telemetry::Call {
                kind: if ctx.inbound {
                    Kind::Server
                } else {
                    Kind::Client
                },
                method: req.method(),
                path: req.uri().path(),
                grpc: ctx.grpc,
                peer: ctx.peer,
                route: ctx.calls.route(),
            };
            ctx.shared
                .tracer
                .start(info, s.trace_propagation, s.trace_sampling, &mut headers)
        };
        *req.headers_mut() = headers;
        ctx.span = span;
        self.inner.call(Call { req, ctx }).map(respond as Respond)
    }
}

fn respond(a: Attempt) -> Result<Response<ProxyBody>, Infallible> {
    Ok(match a {
        Ok(a) => answered(a),
        Err(f) => failed(f),
    })
}

fn answered(a: Answer) -> Response<ProxyBody> {
    let Answer {
        mut resp,
        ctx,
        ep,
        in_flight,
    } = a;
    let Ctx {
        svc,
        route,
        calls,
        grpc,
        start,
        deadline,
        activity,
        upgrade,
        span,
        permit,
        set,
        ..
    } = *ctx;
    let settings = svc.route_settings(route);
    // Metrics and span are recorded when the body ends, with the gRPC status from
    // trailers; so is the endpoint's outcome, for outlier ejection.
    let mut end = CallEnd::new(
        calls,
        start.into_std(),
        resp.status().as_u16(),
        grpc,
        resp.headers(),
        span,
    );
    if settings.outlier_failures > 0
        && let Some(set) = set
    {
        end = end.with_outcome(ep, set, Outlier::of(&svc.settings));
    }
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = upgrade
    {
        end.finish(None, None);
        let accepted = resp.headers().get(header::UPGRADE).cloned();
        tunnel(client, hyper::upgrade::on(&mut resp), in_flight);
        strip_hop_by_hop(resp.headers_mut(), false);
        if let Some(p) = accepted {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert(header::UPGRADE, p);
        }
        return resp.map(|_| ProxyBody::empty());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    let idle = settings
        .stream_idle_timeout
        .zip(activity)
        .map(|(t, a)| Idle::new(t, a));
    resp.map(|b| {
        ProxyBody::upstream(
            b,
            (Some(in_flight), permit),
            deadline,
            idle,
            grpc,
            Some(end),
        )
    })
}

/// A response ferry makes itself, recorded as the call's end.
fn failed(f: Failed) -> Response<ProxyBody> {
    let Failed { error: e, ctx } = f;
    ctx.shared.metrics.error(&ctx.svc.name, e.reason());
    let status = if ctx.grpc {
        200
    } else {
        e.http_status().as_u16()
    };
    let grpc = ctx.grpc.then_some(e.grpc_status());
    ctx.calls
        .record(status, grpc, Some(e.reason()), ctx.start.elapsed());
    ctx.span
        .finish(status, grpc.map(i32::from), Some(e.reason()));
    e.to_response(ctx.grpc)
}
