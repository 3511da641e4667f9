//! The HTTP/1.1, HTTP/2 and gRPC proxy: one [`HttpProxy`] per connection, called per
//! request.
//!
//! Per request: load the runtime once, choose the service and its settings, compute the
//! deadline, strip hop-by-hop headers, pick an endpoint, send on a pooled connection,
//! and wrap the response body so in-flight counts and deadlines cover streaming.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ferry_policy::HashOn;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::balance::{Endpoint, EndpointSet, Outlier, hash_ip, hash_key};
use crate::body::{CallEnd, Idle, ProxyBody, ReqBody, clock_ns, failed_call, grpc_status};
use crate::errors::ProxyError;
use crate::metrics::RouteMetrics;
use crate::retry::{Failure, Replay, backoff, retryable};
use crate::state::{ServiceRt, Shared, Target};
use ferry_policy::Settings;
use ferry_telemetry::{ActiveSpan, Call, Kind};

pub struct ConnCtx {
    pub peer: SocketAddr,
    pub target: Target,
    /// Inbound connections get server spans; everything else client spans.
    pub inbound: bool,
    /// Inbound: tell the app who called (`X-Forwarded-For`, `X-Forwarded-Proto`).
    pub forwarded: bool,
    /// CONNECT requests are tunnelled rather than refused.
    pub allow_connect: bool,
    /// The service a `Dst` connection resolved to, and for which policy version.
    cached: ArcSwapOption<ServiceRt>,
    /// Requests, and those the client cancelled before their response (HTTP/2
    /// RST_STREAM after the proxy took them on: h2's own reset limit does not see those).
    requests: AtomicU32,
    cancelled: AtomicU32,
    /// Woken when cancellations look like an attack rather than a client's deadlines.
    pub too_many_cancels: tokio::sync::Notify,
}

/// Cancelled requests after which an HTTP/2 connection is asked to go away, when they
/// are also most of its requests (a client cancelling now and then is left alone).
pub const MAX_CANCELLED: u32 = 100;

/// Counts the request as cancelled if dropped before its response.
struct OnCancel<'a>(Option<&'a ConnCtx>);

impl Drop for OnCancel<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let n = c.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= MAX_CANCELLED && n * 2 > c.requests.load(Ordering::Relaxed) {
                c.too_many_cancels.notify_one();
            }
        }
    }
}

impl ConnCtx {
    pub fn new(peer: SocketAddr, target: Target, inbound: bool) -> Self {
        ConnCtx {
            peer,
            target,
            inbound,
            forwarded: true,
            allow_connect: false,
            cached: ArcSwapOption::empty(),
            requests: AtomicU32::new(0),
            cancelled: AtomicU32::new(0),
            too_many_cancels: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Clone)]
pub struct HttpProxy {
    shared: Arc<Shared>,
    conn: Arc<ConnCtx>,
}

impl HttpProxy {
    pub fn new(shared: Arc<Shared>, conn: Arc<ConnCtx>) -> Self {
        HttpProxy { shared, conn }
    }

    async fn service(&self) -> Option<Arc<ServiceRt>> {
        {
            let rt = self.shared.load();
            if let Target::Listener(i) = self.conn.target {
                return rt.listener_service(i).cloned();
            }
            if let Some(s) = &*self.conn.cached.load()
                && s.version == rt.version
            {
                return Some(s.clone());
            }
        }
        // Once per connection and policy version: may wait for discovery's first answer.
        let rt = self.shared.load_full();
        let svc = self.shared.resolve(&rt, self.conn.target).await?;
        self.conn.cached.store(Some(svc.clone()));
        Some(svc)
    }

    async fn proxy(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        if req.method() == http::Method::CONNECT && !self.conn.allow_connect {
            return ProxyError::ConnectNotAllowed.to_response(grpc);
        }
        let Some(svc) = self.service().await else {
            return ProxyError::UnknownService.to_response(grpc);
        };
        let (route, settings) = svc.route_for(req.uri().path());
        let calls = svc.calls(route, self.conn.inbound, &self.shared.metrics);
        let kind = if self.conn.inbound {
            Kind::Server
        } else {
            Kind::Client
        };
        let (mut parts, body) = req.into_parts();
        let call = Call {
            kind,
            method: &parts.method,
            path: parts.uri.path(),
            grpc,
            peer: self.conn.peer,
            route: calls.route(),
        };
        let span = self.shared.tracer.start(
            call,
            settings.trace_propagation,
            settings.trace_sampling,
            &mut parts.headers,
        );
        let mut req = Request::from_parts(parts, body);

        let deadline = deadline(settings.timeout, req.headers(), start);
        // An HTTP/1.1 upgrade (WebSocket and the like) keeps its handshake headers and
        // becomes a byte tunnel once the upstream answers 101.
        let upgrade = if req.version() == Version::HTTP_11 {
            upgrade_protocol(req.headers())
        } else {
            None
        };
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), true);
        if req.version() <= Version::HTTP_11
            && let Some(a) = req.uri().authority()
            && let Ok(host) = HeaderValue::from_str(a.as_str())
        {
            // RFC 9112 §3.2.2: an absolute-form target's authority is the Host.
            req.headers_mut().insert(header::HOST, host);
        }
        if self.conn.inbound && self.conn.forwarded {
            forwarded_for(req.headers_mut(), self.conn.peer);
        }
        if let Some(p) = upgrade {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, p);
        }

        // Over the service's concurrency limit: answered now, not queued.
        let permit = if settings.max_in_flight.is_some() || settings.adaptive_concurrency {
            match svc
                .limiter
                .acquire(settings.max_in_flight, settings.adaptive_concurrency)
            {
                Some(p) => Some(p),
                None => {
                    return self.fail(&svc, ProxyError::Overloaded, grpc, span, (calls, start));
                }
            }
        } else {
            None
        };

        let set = svc.endpoint_set();
        let key = set.lb().is_hash().then(|| match &settings.hash_on {
            HashOn::Header(h) => req
                .headers()
                .get(h.as_str())
                .map(|v| hash_key(v.as_bytes()))
                .unwrap_or_else(|| hash_ip(self.conn.peer.ip())),
            HashOn::SourceIp => hash_ip(self.conn.peer.ip()),
        });
        let Some(ep) = set.pick(key, None).cloned() else {
            return self.fail(&svc, ProxyError::NoEndpoints, grpc, span, (calls, start));
        };

        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        match upstream_uri(&ep.authority, pq.clone()) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => {
                tracing::debug!(error = %e, "bad request uri");
                return self.fail(&svc, ProxyError::UpstreamReset, grpc, span, (calls, start));
            }
        }
        if let Some(d) = deadline
            && grpc
        {
            set_grpc_timeout(
                req.headers_mut(),
                d.saturating_duration_since(Instant::now()),
            );
        }
        // The upstream declared h2c (appProtocol): HTTP/1 requests go as HTTP/2 over the
        // pooled multiplexed connection. Upgrades need HTTP/1.1 and stay as they are.
        if svc.h2 && client_upgrade.is_none() && req.version() != Version::HTTP_2 {
            *req.version_mut() = Version::HTTP_2;
        }

        // A failed connect sent nothing, so it is retried on another endpoint even with
        // `retries: 0` (as Istio does), when there is another: a dead pod or zone fails
        // no call, gRPC and POST included. That costs a header-map copy (and, with a
        // body, the replay buffer) per request to a balanced or retrying service.
        let can_retry = settings.retries > 0 || set.endpoints.len() > 1;
        let (head, body) = req.into_parts();
        let retry_head = can_retry.then(|| RetryHead {
            method: head.method.clone(),
            headers: head.headers.clone(),
            version: head.version,
            pq,
        });
        let (body, replay) = if can_retry && !http_body::Body::is_end_stream(&body) {
            let r = Replay::new(body);
            (ReqBody::replay(r.attempt()), Some(r))
        } else {
            (ReqBody::direct(body), None)
        };
        let activity = settings
            .stream_idle_timeout
            .map(|_| Arc::new(AtomicU64::new(clock_ns())));
        let mut req = Request::from_parts(head, body.with_activity(activity.clone()));
        if can_retry {
            svc.retry_budget.deposit();
        }

        let ctx = Attempts {
            svc: &svc,
            settings,
            set,
            grpc,
            deadline,
            headers_by: earliest(
                deadline.map(|d| (d, ProxyError::Timeout)),
                settings
                    .response_timeout
                    .map(|t| (start + t, ProxyError::ResponseTimeout)),
            ),
            head: retry_head,
            replay,
            activity,
        };
        let mut ep = ep;
        let mut span = span;
        let mut attempt = 0;
        loop {
            let method_version = (req.method().clone(), req.version());
            let (res, in_flight, took) = ctx.send(&ep, req, &mut span).await;
            let (failure, next) = match res {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let g = if grpc {
                        grpc_status(resp.headers())
                    } else {
                        None
                    };
                    if let Some(p) = &permit {
                        p.observe(took, status == 503);
                    }
                    let failure = Failure::Status(status, g);
                    let next = if failed_call(status, g) {
                        self.next_attempt(&ctx, &ep, key, failure, &method_version.0, attempt)
                    } else {
                        None
                    };
                    // Not retried: the upstream's own answer goes back, whatever it is.
                    let Some(next) = next else {
                        let end = CallEnd::new(
                            calls.clone(),
                            start.into_std(),
                            status,
                            resp.headers(),
                            span,
                        );
                        let end = if settings.outlier_failures > 0 {
                            end.with_outcome(
                                ep.clone(),
                                ctx.set.clone(),
                                Outlier::of(&svc.settings),
                            )
                        } else {
                            end
                        };
                        return self.respond(resp, end, client_upgrade, (in_flight, permit), &ctx);
                    };
                    ep.outcome(true, &ctx.set, Outlier::of(&svc.settings));
                    (failure, next)
                }
                Err(e) => {
                    drop(in_flight);
                    if let Some(p) = &permit
                        && matches!(
                            e,
                            ProxyError::Timeout
                                | ProxyError::ResponseTimeout
                                | ProxyError::PerTryTimeout
                        )
                    {
                        p.observe(took, true);
                    }
                    let f = match e {
                        ProxyError::ConnectFailed | ProxyError::ConnectTimeout => {
                            ep.connect_failed();
                            Failure::Connect(e)
                        }
                        ProxyError::Unprocessed => Failure::Unprocessed,
                        ProxyError::UpstreamReset | ProxyError::PerTryTimeout => {
                            ep.outcome(true, &ctx.set, Outlier::of(&svc.settings));
                            Failure::Written(e)
                        }
                        _ => return self.fail(&svc, e, grpc, span, (calls, start)),
                    };
                    match self.next_attempt(&ctx, &ep, key, f, &method_version.0, attempt) {
                        Some(next) => (f, next),
                        None => return self.fail(&svc, e, grpc, span, (calls, start)),
                    }
                }
            };
            let head = ctx.head.as_ref().expect("a retry has the request head");
            attempt += 1;
            self.shared.metrics.retry(&svc.name, failure.reason());
            span.retry(attempt, ep.addr, failure.reason());
            tracing::debug!(service = %svc.name, from = %ep.addr, to = %next.addr, attempt, reason = failure.reason(), "retrying");
            if !matches!(failure, Failure::Connect(_) | Failure::Unprocessed) {
                let wait = Instant::now() + backoff(attempt);
                tokio::time::sleep_until(deadline.map_or(wait, |d| d.min(wait))).await;
            }
            let body = match &ctx.replay {
                Some(r) => ReqBody::replay(r.attempt()),
                None => ReqBody::empty(),
            };
            let mut r = Request::new(body.with_activity(ctx.activity.clone()));
            *r.method_mut() = head.method.clone();
            *r.headers_mut() = head.headers.clone();
            *r.version_mut() = head.version;
            *r.uri_mut() = upstream_uri(&next.authority, head.pq.clone()).unwrap_or_default();
            ep = next;
            req = r;
        }
    }

    /// The endpoint to send a failed attempt to next, when the route's rules, the
    /// body, the retry budget and the endpoints allow one.
    fn next_attempt(
        &self,
        ctx: &Attempts<'_>,
        ep: &Arc<Endpoint>,
        key: Option<u64>,
        f: Failure,
        method: &http::Method,
        attempt: u32,
    ) -> Option<Arc<Endpoint>> {
        if !ctx.may_retry(f, method, attempt) {
            return None;
        }
        if !ctx.svc.retry_budget.withdraw() {
            self.shared.metrics.budget_exhausted(&ctx.svc.name);
            return None;
        }
        ctx.svc.endpoints().pick(key, Some(ep)).cloned()
    }

    /// The upstream's response on its way to the client: a tunnel for an accepted
    /// upgrade, else the body wrapped so the call ends (metrics, span, outlier, limits)
    /// when it does.
    fn respond(
        &self,
        mut resp: Response<Incoming>,
        end: CallEnd,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        held: (crate::balance::InFlight, Option<crate::limit::Permit>),
        ctx: &Attempts<'_>,
    ) -> Response<ProxyBody> {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            end.finish(None, None);
            let accepted = resp.headers().get(header::UPGRADE).cloned();
            tunnel(client, hyper::upgrade::on(&mut resp), held.0);
            strip_hop_by_hop(resp.headers_mut(), false);
            if let Some(p) = accepted {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                resp.headers_mut().insert(header::UPGRADE, p);
            }
            return resp.map(|_| ProxyBody::empty());
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        let idle = ctx
            .settings
            .stream_idle_timeout
            .zip(ctx.activity.clone())
            .map(|(t, a)| Idle::new(t, a));
        resp.map(|b| {
            ProxyBody::upstream(
                b,
                (Some(held.0), held.1),
                ctx.deadline,
                idle,
                ctx.grpc,
                Some(end),
            )
        })
    }

    /// A response ferry makes itself, recorded as the call's end.
    fn fail(
        &self,
        svc: &ServiceRt,
        e: ProxyError,
        grpc: bool,
        span: ActiveSpan,
        (calls, start): (&RouteMetrics, Instant),
    ) -> Response<ProxyBody> {
        self.shared.metrics.error(&svc.name, e.reason());
        let status = if grpc { 200 } else { e.http_status().as_u16() };
        calls.record(
            status,
            grpc.then_some(e.grpc_status()),
            Some(e.reason()),
            start.elapsed(),
        );
        span.finish(
            status,
            grpc.then_some(e.grpc_status() as i32),
            Some(e.reason()),
        );
        e.to_response(grpc)
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpProxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            this.conn.requests.fetch_add(1, Ordering::Relaxed);
            let mut cancel = OnCancel(Some(&this.conn));
            let resp = this.proxy(req).await;
            cancel.0 = None;
            Ok(resp)
        })
    }
}

/// What a retry needs to rebuild the request.
struct RetryHead {
    method: http::Method,
    headers: HeaderMap,
    version: Version,
    pq: PathAndQuery,
}

/// One call's attempts: what stays the same from one to the next.
struct Attempts<'a> {
    svc: &'a ServiceRt,
    settings: &'a Settings,
    set: Arc<EndpointSet>,
    grpc: bool,
    deadline: Option<Instant>,
    /// When the response headers must have come, and the error if they have not.
    headers_by: Option<(Instant, ProxyError)>,
    head: Option<RetryHead>,
    replay: Option<Arc<Replay>>,
    activity: Option<Arc<AtomicU64>>,
}

impl Attempts<'_> {
    /// Sends one attempt to `ep`, timed on its own: the endpoint that answers is not
    /// charged for the time an earlier one took to fail.
    async fn send(
        &self,
        ep: &Arc<Endpoint>,
        req: Request<ReqBody>,
        span: &mut ActiveSpan,
    ) -> (
        Result<Response<Incoming>, ProxyError>,
        crate::balance::InFlight,
        Duration,
    ) {
        let attempt_start = Instant::now();
        span.set_endpoint(ep.addr);
        let in_flight = ep.start();
        let send = if req.version() == Version::HTTP_2 {
            self.svc.clients.h2.request(req)
        } else {
            self.svc.clients.h1.request(req)
        };
        let by = earliest(
            self.headers_by,
            self.settings
                .per_try_timeout
                .map(|t| (attempt_start + t, ProxyError::PerTryTimeout)),
        );
        let res = match by {
            Some((at, e)) => match tokio::time::timeout_at(at, send).await {
                Ok(r) => r.map_err(|e| ProxyError::from_client(&e)),
                Err(_) => Err(e),
            },
            None => send.await.map_err(|e| ProxyError::from_client(&e)),
        };
        let took = attempt_start.elapsed();
        match &res {
            Ok(r) => {
                ep.observe(took);
                ep.connected();
                if let Some(s) = &ep.statuses {
                    s.inc(r.status().as_u16());
                }
            }
            // A timed-out endpoint is slow as far as the balancer can tell.
            Err(
                ProxyError::ConnectTimeout
                | ProxyError::Timeout
                | ProxyError::ResponseTimeout
                | ProxyError::PerTryTimeout,
            ) => ep.observe(took),
            Err(_) => {}
        }
        (res, in_flight, took)
    }

    /// Whether the failure may be retried as far as the request goes: the route's
    /// rules, and a body that can be sent whole again.
    fn may_retry(&self, f: Failure, method: &http::Method, attempt: u32) -> bool {
        self.head.is_some()
            && retryable(f, method, self.settings, attempt)
            && self
                .replay
                .as_ref()
                .is_none_or(|r| r.replayable(!matches!(f, Failure::Connect(_))))
    }
}

fn earliest(
    a: Option<(Instant, ProxyError)>,
    b: Option<(Instant, ProxyError)>,
) -> Option<(Instant, ProxyError)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 < x.0 { y } else { x }),
        (x, y) => x.or(y),
    }
}

/// Appends the caller to `X-Forwarded-For` and sets `X-Forwarded-Proto` if unset, so
/// the app behind the inbound sidecar still learns who called it.
fn forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_canonical();
    let value = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR, v);
    }
    if !h.contains_key(X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The protocol a request asks to switch to, when it really asks (`Connection: upgrade`).
fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let up = h.get(header::UPGRADE)?;
    let conn = h.get(header::CONNECTION)?.to_str().ok()?;
    conn.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        .then(|| up.clone())
}

/// Copies bytes both ways between the upgraded client and upstream connections.
fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: crate::balance::InFlight,
) {
    tokio::spawn(async move {
        let _in_flight = in_flight;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (
                    hyper_util::rt::TokioIo::new(c),
                    hyper_util::rt::TokioIo::new(u),
                );
                if let Err(error) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(%error, "upgraded connection ended with an error");
                }
            }
            Err(error) => tracing::debug!(%error, "upgrade failed"),
        }
    });
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The earlier of the policy's timeout and the client's own `grpc-timeout`.
fn deadline(timeout: Option<Duration>, h: &HeaderMap, start: Instant) -> Option<Instant> {
    let grpc = h
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()));
    match (timeout, grpc) {
        (Some(a), Some(b)) => Some(start + a.min(b)),
        (Some(a), None) | (None, Some(a)) => Some(start + a),
        (None, None) => None,
    }
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes the time left, in the finest unit that fits in 8 digits.
fn set_grpc_timeout(h: &mut HeaderMap, left: Duration) {
    let micros = left.as_micros().max(1);
    let v = if micros < 100_000_000 {
        format!("{micros}u")
    } else {
        format!("{}m", left.as_millis().min(99_999_999))
    };
    h.insert("grpc-timeout", HeaderValue::from_str(&v).expect("digits"));
}

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
static HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

fn strip_hop_by_hop(h: &mut HeaderMap, request: bool) {
    if let Some(conn) = h.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            let name = name.trim();
            // gRPC needs `te: trailers` end to end; keep it even when listed.
            if !name.is_empty() && !name.eq_ignore_ascii_case("te") {
                h.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    if request
        && let Some(te) = h.get(header::TE)
        && te.as_bytes() != b"trailers"
    {
        h.remove(header::TE);
    }
}

/// The request's path and query, sent to `authority`.
fn upstream_uri(authority: &http::uri::Authority, pq: PathAndQuery) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(pq)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        let mut h = HeaderMap::new();
        set_grpc_timeout(&mut h, Duration::from_millis(1500));
        assert_eq!(h["grpc-timeout"], "1500000u");
        set_grpc_timeout(&mut h, Duration::from_secs(1000));
        assert_eq!(h["grpc-timeout"], "1000000m");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-foo, keep-alive, te"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-bar", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, true);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["te", "x-bar"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key(header::TE));
    }
}
