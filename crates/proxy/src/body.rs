//! The response body: the upstream's, passed through, or one the proxy made.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use ferry_telemetry::ActiveSpan;

use crate::balance::InFlight;
use crate::metrics::RouteMetrics;

/// What is recorded when a call ends, at the end of its response body: the request
/// metrics and the span, with the gRPC status from trailers.
pub struct CallEnd {
    metrics: std::sync::Arc<RouteMetrics>,
    start: std::time::Instant,
    status: u16,
    /// From the response headers (a trailers-only gRPC response).
    grpc: Option<u8>,
    span: ActiveSpan,
}

impl CallEnd {
    pub fn new(
        metrics: std::sync::Arc<RouteMetrics>,
        start: std::time::Instant,
        status: u16,
        headers: &HeaderMap,
        span: ActiveSpan,
    ) -> Self {
        CallEnd {
            metrics,
            start,
            status,
            grpc: grpc_status(headers),
            span,
        }
    }

    /// Records the call; `grpc` from trailers wins over the headers'.
    pub fn finish(self, grpc: Option<u8>, error: Option<&'static str>) {
        let grpc = grpc.or(self.grpc);
        self.metrics
            .record(self.status, grpc, error, self.start.elapsed());
        self.span.finish(self.status, grpc.map(i32::from), error);
    }
}

/// `grpc-status` of headers or trailers.
pub fn grpc_status(h: &HeaderMap) -> Option<u8> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the upstream clients send: the client's body as it came, a body kept for a
/// retry, or nothing (a bodiless request rebuilt for a retry).
pub enum ReqBody {
    Direct(Incoming),
    /// Taken out of `slot` at the first poll. A connect that fails never polls the body,
    /// so after one the body is still in `slot`, whole, for the next attempt.
    Kept {
        slot: std::sync::Arc<std::sync::Mutex<Option<Incoming>>>,
        body: Option<Incoming>,
        /// The body's `is_end_stream` and `size_hint` before it is read, so hyper's
        /// checks before the first poll take no lock.
        unread: (bool, SizeHint),
    },
    Empty,
}

impl ReqBody {
    pub fn kept(slot: std::sync::Arc<std::sync::Mutex<Option<Incoming>>>) -> ReqBody {
        let unread = match &*slot.lock().expect("body slot poisoned") {
            Some(b) => (b.is_end_stream(), b.size_hint()),
            None => (true, SizeHint::with_exact(0)),
        };
        ReqBody::Kept {
            slot,
            body: None,
            unread,
        }
    }

    /// Whether a kept body was never read: an attempt that failed to connect.
    pub fn unread(slot: &std::sync::Mutex<Option<Incoming>>) -> bool {
        slot.lock().expect("body slot poisoned").is_some()
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Direct(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Kept { slot, body, .. } => {
                if body.is_none() {
                    *body = slot.lock().expect("body slot poisoned").take();
                }
                match body {
                    Some(b) => Pin::new(b).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Direct(b) | ReqBody::Kept { body: Some(b), .. } => b.is_end_stream(),
            ReqBody::Kept { unread, .. } => unread.0,
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Direct(b) | ReqBody::Kept { body: Some(b), .. } => b.size_hint(),
            ReqBody::Kept { unread, .. } => unread.1,
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

pub struct ProxyBody(Kind);

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Upstream(Upstream),
}

struct Upstream {
    inner: Incoming,
    /// Held until the body ends, so the endpoint's in-flight count covers streaming.
    _in_flight: Option<InFlight>,
    /// The request's deadline, when it has one (boxed only then).
    deadline: Option<Pin<Box<Sleep>>>,
    grpc: bool,
    done: bool,
    end: Option<CallEnd>,
}

impl Upstream {
    fn finish(&mut self, grpc: Option<u8>, error: Option<&'static str>) {
        if let Some(e) = self.end.take() {
            e.finish(grpc, error);
        }
    }
}

impl Drop for Upstream {
    /// A client that stops reading (or a body hyper stops polling once its length is
    /// met) still ends the call.
    fn drop(&mut self) {
        self.finish(None, None);
    }
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody(Kind::Empty)
    }

    pub fn full(b: Bytes) -> Self {
        ProxyBody(Kind::Full(Some(b)))
    }

    pub fn upstream(
        inner: Incoming,
        in_flight: Option<InFlight>,
        deadline: Option<tokio::time::Instant>,
        grpc: bool,
        end: Option<CallEnd>,
    ) -> Self {
        ProxyBody(Kind::Upstream(Upstream {
            inner,
            _in_flight: in_flight,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            grpc,
            done: false,
            end,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request deadline passed while the response was streaming")]
pub struct BodyDeadline;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(u) => {
                if u.done {
                    return Poll::Ready(None);
                }
                if let Some(d) = &mut u.deadline
                    && d.as_mut().poll(cx).is_ready()
                {
                    u.deadline = None;
                    u.done = true;
                    u.finish(u.grpc.then_some(4), Some("timeout"));
                    if u.grpc {
                        // A stream cut by its deadline still ends the way gRPC expects.
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", HeaderValue::from_static("4"));
                        t.insert(
                            "grpc-message",
                            HeaderValue::from_static("ferry:%20deadline%20exceeded"),
                        );
                        t.insert(
                            crate::errors::FERRY_ERROR,
                            HeaderValue::from_static("timeout"),
                        );
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    return Poll::Ready(Some(Err(BodyDeadline.into())));
                }
                match Pin::new(&mut u.inner).poll_frame(cx) {
                    Poll::Ready(None) => {
                        u.done = true;
                        u.finish(None, None);
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(t) = f.trailers_ref() {
                            u.finish(grpc_status(t), None);
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        u.finish(None, Some("upstream-reset"));
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => u.done || u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(u) => u.inner.size_hint(),
        }
    }
}
