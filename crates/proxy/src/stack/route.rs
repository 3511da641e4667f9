//! The top of the stack: a connection's hyper service. Per request it finds the service
//! (once per connection and policy version for a transparent destination) and the route,
//! readies the headers for the next hop (hop-by-hop, `Host`, `X-Forwarded-For`, an
//! upgrade's handshake, HTTP/2 for an h2c upstream), and hands the [`Call`] down.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::Service as _;

use ferry_telemetry::ActiveSpan;

use super::call::{Call, Ctx};
use crate::body::ProxyBody;
use crate::errors::ProxyError;
use crate::http::{ClientIo, forwarded_for, is_grpc, strip_hop_by_hop, upgrade_protocol};
use crate::state::{ServiceRt, Shared, Target};
use crate::tcp;

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
    /// HTTP/1.1: where the connection goes once hyper hands it back after an upgrade
    /// (the connection is served without hyper's own upgrade support, so that an idle
    /// one can be taken back too).
    upgrade: std::sync::Mutex<Option<oneshot::Sender<ClientIo>>>,
}

/// Cancelled requests after which an HTTP/2 connection is asked to go away, when they
/// are also most of its requests (a client cancelling now and then is left alone).
pub const MAX_CANCELLED: u32 = 100;

/// Counts the request as cancelled if dropped before its response.
struct OnCancel<'a>(Option<&'a ConnCtx>);

impl Drop for OnCancel<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancelled.fetch_add(1, Ordering::Relaxed);
            if c.flooded() {
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
            upgrade: std::sync::Mutex::new(None),
        }
    }

    /// The client's side of an HTTP/1.1 upgrade this request asks for; it arrives once
    /// the response has switched protocols and the connection has ended as HTTP.
    fn on_upgrade(&self) -> oneshot::Receiver<ClientIo> {
        let (tx, rx) = oneshot::channel();
        *self.upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Where an HTTP/1.1 connection that ended goes, if a request asked to upgrade it.
    pub fn take_upgrade(&self) -> Option<oneshot::Sender<ClientIo>> {
        self.upgrade
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The `direction` label of this connection's metrics.
    pub fn direction(&self) -> &'static str {
        crate::metrics::direction(self.inbound)
    }

    /// Whether cancelled requests are most of this connection's, and too many.
    pub fn flooded(&self) -> bool {
        let n = self.cancelled.load(Ordering::Relaxed);
        n >= MAX_CANCELLED && n * 2 > self.requests.load(Ordering::Relaxed)
    }

    /// The service this connection's requests go to, for HTTP and opaque TCP alike:
    /// resolved once per connection and policy version (a transparent destination may
    /// wait for discovery's first answer), then read without a lock.
    pub async fn service(&self, shared: &Arc<Shared>) -> Option<Arc<ServiceRt>> {
        match self.known_service(shared) {
            Ok(svc) => svc,
            // Boxed: kept out of every request's future.
            Err(()) => Box::pin(self.resolve_service(shared)).await,
        }
    }

    /// The service without waiting; `Err` when it must be resolved first.
    fn known_service(&self, shared: &Shared) -> Result<Option<Arc<ServiceRt>>, ()> {
        let rt = shared.load();
        if let Target::Listener(i) = self.target {
            return Ok(rt.listener_service(i).cloned());
        }
        match &*self.cached.load() {
            Some(s) if s.version == rt.version => Ok(Some(s.clone())),
            _ => Err(()),
        }
    }

    /// Once per connection and policy version: may wait for discovery's first answer.
    async fn resolve_service(&self, shared: &Arc<Shared>) -> Option<Arc<ServiceRt>> {
        let rt = shared.load_full();
        let svc = shared.resolve(&rt, self.target).await?;
        self.cached.store(Some(svc.clone()));
        Some(svc)
    }
}

#[derive(Clone)]
pub struct HttpProxy {
    shared: Arc<Shared>,
    conn: Arc<ConnCtx>,
    stack: Stack,
}

impl HttpProxy {
    pub fn new(shared: Arc<Shared>, conn: Arc<ConnCtx>) -> Self {
        HttpProxy {
            shared,
            conn,
            stack: new(),
        }
    }

    /// The request's service and route, its headers made ready for the next hop, and
    /// the stack below for the rest.
    async fn route(self, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        self.conn.requests.fetch_add(1, Ordering::Relaxed);
        let mut cancel = OnCancel(Some(&self.conn));
        // One future for the whole request (no inner one to move the request into).
        let resp = 'call: {
            let grpc = is_grpc(req.headers());
            if req.method() == http::Method::CONNECT && !self.conn.allow_connect {
                break 'call ProxyError::ConnectNotAllowed.to_response(grpc);
            }
            let Some(svc) = self.conn.service(&self.shared).await else {
                break 'call ProxyError::UnknownService.to_response(grpc);
            };
            if req.method() == http::Method::CONNECT {
                // Boxed: a rare path, kept out of every request's future.
                break 'call Box::pin(self.connect_tunnel(svc, req, start)).await;
            }
            let (route, _) = svc.route_for(req.uri().path());
            let calls = svc
                .calls(route, self.conn.inbound, &self.shared.metrics)
                .clone();
            // An HTTP/1.1 upgrade (WebSocket and the like) keeps its handshake headers and
            // becomes a byte tunnel once the upstream answers 101.
            let upgrade = if req.version() == Version::HTTP_11 {
                upgrade_protocol(req.headers())
            } else {
                None
            };
            let client_upgrade = upgrade.is_some().then(|| {
                req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
                self.conn.on_upgrade()
            });
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
            // The upstream declared h2c (appProtocol): HTTP/1 requests go as HTTP/2 over the
            // pooled multiplexed connection. Upgrades need HTTP/1.1 and stay as they are.
            if svc.h2 && client_upgrade.is_none() && req.version() != Version::HTTP_2 {
                *req.version_mut() = Version::HTTP_2;
            }
            let ctx = Box::new(Ctx {
                shared: self.shared.clone(),
                svc,
                route,
                calls,
                peer: self.conn.peer,
                inbound: self.conn.inbound,
                grpc,
                start,
                deadline: None,
                headers_by: None,
                activity: None,
                upgrade: client_upgrade,
                span: ActiveSpan::default(),
                permit: None,
                set: None,
                ep: None,
                avoid: None,
            });
            let mut stack = self.stack.clone();
            match stack.call(Call { req, ctx }).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        };
        cancel.0 = None;
        Ok(resp)
    }

    /// `CONNECT` (allowed by `http-connect: tunnel`): a TCP connection to one of the
    /// service's endpoints, joined to the client's once ferry has answered 200 (HTTP/1.1:
    /// the rest of the connection; HTTP/2: the stream). The target the client named is
    /// not dialled: the listener's service decides where the bytes go, as it does for
    /// requests. Counted as a call and as a TCP connection of the service.
    async fn connect_tunnel(
        &self,
        svc: Arc<ServiceRt>,
        mut req: Request<Incoming>,
        start: Instant,
    ) -> Response<ProxyBody> {
        let calls = svc.calls(0, self.conn.inbound, &self.shared.metrics);
        let opened = match svc.pick_for_connection(Some(req.headers()), self.conn.peer) {
            None => Err(ProxyError::NoEndpoints),
            Some(ep) => tcp::connect(ep.addr, svc.settings.connect_timeout)
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::TimedOut => ProxyError::ConnectTimeout,
                    _ => ProxyError::ConnectFailed,
                }),
        };
        let upstream = match opened {
            Ok(s) => s,
            Err(e) => {
                self.shared.metrics.error(&svc.name, e.reason());
                let status = e.http_status().as_u16();
                calls.record(status, None, Some(e.reason()), start.elapsed());
                return e.to_response(false);
            }
        };
        let client = if req.version() == Version::HTTP_2 {
            ClientSide::Stream(hyper::upgrade::on(&mut req))
        } else {
            // The connection itself, once hyper has ended it (see `ConnCtx::on_upgrade`).
            req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
            ClientSide::Connection(self.conn.on_upgrade())
        };
        let stats = tcp::TcpStats::open(&self.shared.metrics, self.conn.direction(), &svc.name);
        tokio::spawn(async move {
            let spliced = match client {
                ClientSide::Connection(rx) => match rx.await {
                    Ok(io) => {
                        let (unread, stream) = io.into_parts();
                        tcp::splice(stream, unread, upstream, &stats).await
                    }
                    Err(_) => return,
                },
                ClientSide::Stream(up) => match up.await {
                    Ok(io) => tcp::splice(TokioIo::new(io), Bytes::new(), upstream, &stats).await,
                    Err(error) => {
                        tracing::debug!(%error, "CONNECT: the client's stream was not handed over");
                        return;
                    }
                },
            };
            if let Err(error) = spliced {
                tracing::debug!(%error, "CONNECT tunnel ended with an error");
            }
        });
        calls.record(200, None, None, start.elapsed());
        Response::new(ProxyBody::empty())
    }
}

/// Where a `CONNECT` tunnel's client bytes come from.
enum ClientSide {
    Connection(oneshot::Receiver<ClientIo>),
    Stream(hyper::upgrade::OnUpgrade),
}

impl hyper::service::Service<Request<Incoming>> for HttpProxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().route(req))
    }
}

/// The stack below [`HttpProxy`], assembled in one place.
pub type Stack = super::trace::Trace<
    super::deadline::Deadline<
        super::limit::Limit<
            super::retry::Retry<
                super::balance::Balance<super::endpoint::EndpointSvc<super::upstream::Upstream>>,
            >,
        >,
    >,
>;

pub fn new() -> Stack {
    tower::ServiceBuilder::new()
        .layer(super::trace::TraceLayer)
        .layer(super::deadline::DeadlineLayer)
        .layer(super::limit::LimitLayer)
        .layer(super::retry::RetryLayer)
        .layer(super::balance::BalanceLayer)
        .layer(super::endpoint::EndpointLayer)
        .service(super::upstream::Upstream)
}
