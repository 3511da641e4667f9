//! The response body: the upstream's, passed through, or one the proxy made.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use ferry_telemetry::ActiveSpan;

use crate::balance::{Endpoint, EndpointSet, InFlight, Outlier};
use crate::errors::{GRPC_STATUS, ProxyError};
use crate::limit::Permit;
use crate::metrics::RouteMetrics;
use crate::retry::ReplayBody;

/// What is recorded when a call ends, at the end of its response body: the request
/// metrics and the span, with the gRPC status from trailers.
pub struct CallEnd {
    metrics: std::sync::Arc<RouteMetrics>,
    start: std::time::Instant,
    status: u16,
    /// From the response headers (a trailers-only gRPC response).
    grpc: Option<u8>,
    span: ActiveSpan,
    /// The endpoint that answered, told how the call ended (outlier ejection).
    outcome: Option<(Arc<Endpoint>, Arc<EndpointSet>, Outlier)>,
}

impl CallEnd {
    /// `grpc`: a gRPC call, whose response headers may hold its status (trailers-only).
    pub fn new(
        metrics: std::sync::Arc<RouteMetrics>,
        start: std::time::Instant,
        status: u16,
        grpc: bool,
        headers: &HeaderMap,
        span: ActiveSpan,
    ) -> Self {
        CallEnd {
            metrics,
            start,
            status,
            grpc: if grpc { grpc_status(headers) } else { None },
            span,
            outcome: None,
        }
    }

    pub fn with_outcome(mut self, ep: Arc<Endpoint>, set: Arc<EndpointSet>, o: Outlier) -> Self {
        self.outcome = Some((ep, set, o));
        self
    }

    /// Records the call; `grpc` from trailers wins over the headers'.
    pub fn finish(self, grpc: Option<u8>, error: Option<&'static str>) {
        let grpc = grpc.or(self.grpc);
        self.metrics
            .record(self.status, grpc, error, self.start.elapsed());
        self.span.finish(self.status, grpc.map(i32::from), error);
        if let Some((ep, set, o)) = self.outcome {
            // A reset mid-stream is the upstream's failure; our own timeouts are not.
            let failed = failed_call(self.status, grpc) || error == Some("upstream-reset");
            ep.outcome(failed, &set, o);
        }
    }
}

/// A call outlier detection counts against its endpoint: 5xx or gRPC `UNAVAILABLE`.
pub fn failed_call(status: u16, grpc: Option<u8>) -> bool {
    status >= 500 || grpc == Some(14)
}

/// `grpc-status` of headers or trailers.
pub fn grpc_status(h: &HeaderMap) -> Option<u8> {
    h.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

pub use crate::errors::BoxError;

/// What the upstream clients send: the client's body as it came, one kept for a replay,
/// or nothing (a bodiless request rebuilt for a retry). With `stream-idle-timeout` each
/// frame also stamps `activity`, so a client still sending keeps the call alive.
pub struct ReqBody {
    kind: ReqKind,
    activity: Option<Arc<AtomicU64>>,
}

enum ReqKind {
    Direct(Incoming),
    /// Boxed: the request moves many times on its way out, and a replayed body is rare.
    Replay(Box<ReplayBody>),
    Empty,
}

impl ReqBody {
    pub fn direct(b: Incoming) -> Self {
        ReqBody {
            kind: ReqKind::Direct(b),
            activity: None,
        }
    }

    pub fn replay(b: ReplayBody) -> Self {
        ReqBody {
            kind: ReqKind::Replay(Box::new(b)),
            activity: None,
        }
    }

    pub fn empty() -> Self {
        ReqBody {
            kind: ReqKind::Empty,
            activity: None,
        }
    }

    pub fn with_activity(mut self, a: Option<Arc<AtomicU64>>) -> Self {
        self.activity = a;
        self
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let r = match &mut this.kind {
                ReqKind::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
                ReqKind::Replay(b) => Pin::new(&mut **b).poll_frame(cx),
                ReqKind::Empty => Poll::Ready(None),
            };
            if let Poll::Ready(Some(Ok(f))) = &r {
                if let Some(a) = &this.activity {
                    a.store(clock_ns(), Ordering::Relaxed);
                }
                if is_empty_data(f) {
                    continue;
                }
            }
            return r;
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ReqKind::Direct(b) => b.is_end_stream(),
            ReqKind::Replay(b) => b.is_end_stream(),
            ReqKind::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ReqKind::Direct(b) => b.size_hint(),
            ReqKind::Replay(b) => b.size_hint(),
            ReqKind::Empty => SizeHint::with_exact(0),
        }
    }
}

/// An empty DATA frame carries nothing, and forwarded without END_STREAM it counts
/// against the peer's flood limit (h2 sends GOAWAY `ENHANCE_YOUR_CALM` after 100 on a
/// connection): bodies skip them, and the end of the stream goes on the last frame.
fn is_empty_data(f: &Frame<Bytes>) -> bool {
    f.data_ref().is_some_and(Bytes::is_empty)
}

/// Nanoseconds on a monotonic clock shared by both directions of a call.
pub fn clock_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

pub struct ProxyBody(Kind);

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Upstream(Upstream),
}

struct Upstream {
    inner: Incoming,
    /// Held until the body ends, so in-flight counts and limits cover streaming.
    _held: (Option<InFlight>, Option<Permit>),
    /// The request's deadline, when it has one (boxed only then).
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<Idle>,
    grpc: bool,
    done: bool,
    end: Option<CallEnd>,
}

/// `stream-idle-timeout`: one timer, pushed back lazily when it fires early, so frames
/// cost a clock read rather than a timer reset.
pub struct Idle {
    every: Duration,
    sleep: Pin<Box<Sleep>>,
    last: u64,
    /// Stamped by the request body's frames.
    request: Arc<AtomicU64>,
}

impl Idle {
    pub fn new(every: Duration, request: Arc<AtomicU64>) -> Idle {
        Idle {
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
            last: clock_ns(),
            request,
        }
    }

    /// Whether the call has been idle for its whole allowance.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let latest = self.last.max(self.request.load(Ordering::Relaxed));
            let quiet = Duration::from_nanos(clock_ns().saturating_sub(latest));
            if quiet >= self.every {
                return true;
            }
            let at = tokio::time::Instant::now() + (self.every - quiet);
            self.sleep.as_mut().reset(at);
        }
        false
    }
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
        held: (Option<InFlight>, Option<Permit>),
        deadline: Option<tokio::time::Instant>,
        idle: Option<Idle>,
        grpc: bool,
        end: Option<CallEnd>,
    ) -> Self {
        ProxyBody(Kind::Upstream(Upstream {
            inner,
            _held: held,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle,
            grpc,
            done: false,
            end,
        }))
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::full(b)
    }
}

impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::empty()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("ferry ended the response while it was streaming: {0}")]
pub struct BodyCut(ProxyError);

impl Upstream {
    /// Ends a streaming response ferry gave up on: gRPC gets the trailers it expects,
    /// anything else a reset stream (HTTP/2) or a cut connection (HTTP/1).
    fn cut(&mut self, e: ProxyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.finish(self.grpc.then_some(e.grpc_status()), Some(e.reason()));
        if self.grpc {
            return Poll::Ready(Some(Ok(Frame::trailers(e.grpc_trailers()))));
        }
        Poll::Ready(Some(Err(BodyCut(e).into())))
    }
}

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
                    return u.cut(ProxyError::Timeout);
                }
                if let Some(i) = &mut u.idle
                    && i.expired(cx)
                {
                    u.idle = None;
                    return u.cut(ProxyError::StreamIdle);
                }
                let polled = loop {
                    match Pin::new(&mut u.inner).poll_frame(cx) {
                        Poll::Ready(Some(Ok(f))) if is_empty_data(&f) => {}
                        other => break other,
                    }
                };
                match polled {
                    Poll::Ready(None) => {
                        u.done = true;
                        u.finish(None, None);
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(i) = &mut u.idle {
                            i.last = clock_ns();
                        }
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
