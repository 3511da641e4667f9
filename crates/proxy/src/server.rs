//! Listeners, per-connection protocol handling, and graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use ferry_policy::{ListenerKind, Policy};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::detect::{Prefixed, Protocol, detect};
use crate::head::{ConnTimer, HeadClock, RELEASE_IDLE_AFTER, Watched};
use crate::metrics::ConnLabels;
use crate::stack::route::{ConnCtx, HttpProxy};
use crate::state::Shared;
use crate::state::Target;
use crate::tcp;
use prometheus_client::metrics::counter::Counter;

/// Largest request head accepted; larger gets 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Tells connections to finish: flip to `true` once.
pub type Drain = watch::Receiver<bool>;

/// A listener's identity, shared by its connections (one refcount each).
struct ListenerInfo {
    index: usize,
    name: Arc<str>,
    kind: ListenerKind,
    /// `ferry_tcp_connections_total` for this listener, by protocol, resolved at bind.
    conns: [Counter; 3],
}

impl ListenerInfo {
    fn counter(&self, p: Protocol) -> &Counter {
        &self.conns[match p {
            Protocol::Http1 => 0,
            Protocol::Http2 => 1,
            Protocol::Opaque => 2,
        }]
    }
}

struct Bound {
    info: Arc<ListenerInfo>,
    listener: TcpListener,
}

/// The proxy with its listeners bound, not yet serving.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<Bound>,
}

impl Proxy {
    /// Binds every listener of `shared`'s policy.
    pub async fn bind(shared: Arc<Shared>) -> anyhow::Result<Proxy> {
        let policy = shared.load().policy.clone();
        let mut listeners = Vec::new();
        for (index, l) in policy.listeners.iter().enumerate() {
            let listener = bind(l.bind)
                .await
                .map_err(|e| anyhow::anyhow!("listener {} cannot bind {}: {e}", l.name, l.bind))?;
            let conns = [Protocol::Http1, Protocol::Http2, Protocol::Opaque].map(|p| {
                shared
                    .metrics
                    .connections
                    .get_or_create(&ConnLabels {
                        listener: l.name.clone(),
                        protocol: p.as_str(),
                    })
                    .clone()
            });
            let info = Arc::new(ListenerInfo {
                index,
                name: Arc::from(l.name.as_str()),
                kind: l.kind.clone(),
                conns,
            });
            listeners.push(Bound { info, listener });
        }
        Ok(Proxy { shared, listeners })
    }

    /// `(listener name, bound address)`, ports resolved.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|b| Some((b.info.name.to_string(), b.listener.local_addr().ok()?)))
            .collect()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `drain` turns true, then lets connections finish for up to the
    /// policy's drain timeout. Returns whether every connection finished in time.
    pub async fn serve(self, drain: Drain) -> bool {
        let tracker = TaskTracker::new();
        for b in self.listeners {
            let shared = self.shared.clone();
            let drain = drain.clone();
            let t = tracker.clone();
            tracker.spawn(accept_loop(b, shared, drain, t));
        }
        self.shared.set_ready(true);
        let mut d = drain.clone();
        drained(&mut d).await;
        self.shared.set_ready(false);
        let timeout = self.shared.load().policy.drain_timeout();
        tracker.close();
        tokio::time::timeout(timeout, tracker.wait()).await.is_ok()
    }
}

/// Resolves once draining has begun (or the sender is gone).
async fn drained(drain: &mut Drain) {
    let _ = drain.wait_for(|v| *v).await;
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // IPv6 only, so `[::]:P` can sit beside `0.0.0.0:P` (a pod's two families).
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

async fn accept_loop(b: Bound, shared: Arc<Shared>, mut drain: Drain, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drained(&mut drain) => return,
            r = b.listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let drain = drain.clone();
                let info = b.info.clone();
                tracker.spawn(async move {
                    if let Err(error) = serve_conn(stream, peer, &info, shared, drain).await {
                        tracing::debug!(listener = %info.name, %peer, %error, "connection ended with an error");
                    }
                    crate::memory::released();
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %b.info.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: &ListenerInfo,
    shared: Arc<Shared>,
    mut drain: Drain,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    // The original destination port, for transparent listeners.
    let (target, listener_opaque, dst_port) = match &listener.kind {
        ListenerKind::Service { opaque, .. } => (Target::Listener(listener.index), *opaque, None),
        ListenerKind::Outbound => {
            let dst = tcp::original_dst(&stream)?;
            if dst == stream.local_addr()? {
                anyhow::bail!("connection made to the outbound listener itself; refusing to loop");
            }
            (Target::Dst(dst), false, Some(dst.port()))
        }
        ListenerKind::Inbound => {
            let dst = tcp::original_dst(&stream)?;
            (Target::Inbound(dst), false, Some(dst.port()))
        }
    };
    let (detect_window, header_timeout, idle_timeout, opaque, forwarded, allow_connect) = {
        let rt = shared.load();
        let p: &Policy = &rt.policy;
        let opaque_port = dst_port.is_some_and(|port| {
            p.opaque_ports
                .as_deref()
                .unwrap_or_default()
                .contains(&port)
        });
        (
            p.detect_timeout(),
            p.header_read_timeout(),
            p.idle_timeout(),
            listener_opaque || opaque_port,
            p.forwarded_headers(),
            p.http_connect(),
        )
    };
    let (proto, prefix) = if opaque {
        (Protocol::Opaque, Bytes::new())
    } else {
        detect(&mut stream, detect_window, header_timeout).await?
    };
    listener.counter(proto).inc();

    let inbound = matches!(
        listener.kind,
        ListenerKind::Inbound | ListenerKind::Service { inbound: true, .. }
    );
    let mut ctx = ConnCtx::new(peer, target, inbound);
    ctx.forwarded = forwarded;
    ctx.allow_connect = allow_connect;
    let ctx = Arc::new(ctx);
    // The other protocols' work is boxed so that the connection's task is no larger
    // than HTTP/1 needs: an idle one keeps only what waits for its socket.
    match proto {
        Protocol::Opaque => Box::pin(serve_opaque(stream, prefix, &shared, &ctx)).await?,
        Protocol::Http1 => {
            let svc = HttpProxy::new(shared, ctx.clone());
            let limits = (header_timeout, idle_timeout);
            serve_http1(stream, prefix, svc, &ctx, &mut drain, limits).await?;
        }
        Protocol::Http2 => {
            let io = TokioIo::new(Prefixed::new(prefix, stream));
            let svc = HttpProxy::new(shared, ctx.clone());
            Box::pin(serve_http2(io, svc, &ctx, &mut drain)).await?;
        }
    }
    Ok(())
}

async fn serve_opaque(
    stream: TcpStream,
    prefix: Bytes,
    shared: &Arc<Shared>,
    ctx: &ConnCtx,
) -> anyhow::Result<()> {
    let (dst, connect_timeout, service) = opaque_dst(shared, ctx).await?;
    let stats = tcp::TcpStats::open(&shared.metrics, ctx.direction(), &service);
    tcp::forward(stream, prefix, dst, connect_timeout, &stats).await?;
    Ok(())
}

async fn serve_http2(
    io: TokioIo<Prefixed<TcpStream>>,
    svc: HttpProxy,
    ctx: &ConnCtx,
    drain: &mut Drain,
) -> Result<(), hyper::Error> {
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .adaptive_window(true)
        .serve_connection(io, svc);
    // A flood of streams cancelled after they were forwarded (rapid reset that waits
    // for the proxy) ends like a drain: GOAWAY, streams in flight finish.
    let flood = async {
        ctx.too_many_cancels.notified().await;
        tracing::debug!(peer = %ctx.peer, "too many cancelled streams; sending GOAWAY");
    };
    let flooded = || ctx.flooded();
    until_done(std::pin::pin!(conn), drain, flood, flooded, |c| {
        c.graceful_shutdown()
    })
    .await
}

type Http1Parts =
    hyper::server::conn::http1::Parts<TokioIo<Watched<Prefixed<TcpStream>>>, HttpProxy>;

/// Serves an HTTP/1 connection. Once it has waited [`RELEASE_IDLE_AFTER`] for its next
/// request, hyper's connection (its read and write buffers, ~16 KiB) is dropped and
/// only the socket waits; the next request's first bytes start a new one. A connection
/// that upgrades (101) goes to the tunnel waiting for it.
async fn serve_http1(
    mut stream: TcpStream,
    mut unread: Bytes,
    mut svc: HttpProxy,
    ctx: &ConnCtx,
    drain: &mut Drain,
    (header_timeout, idle_timeout): (Duration, Duration),
) -> Result<(), hyper::Error> {
    loop {
        let io = Prefixed::new(unread, stream);
        // Boxed: a released connection's task keeps none of hyper's state.
        let (parts, released) = Box::pin(http1_until_idle(
            io,
            svc,
            drain,
            header_timeout,
            idle_timeout,
        ))
        .await?;
        let (rest, s) = parts.io.into_inner().into_inner().into_parts();
        unread = join(parts.read_buf, rest);
        svc = parts.service;
        stream = s;
        if !released {
            match ctx.take_upgrade() {
                // Switched protocols (or the client left before it could).
                Some(tunnel) => {
                    if let Err(mut io) = tunnel.send(Prefixed::new(unread, stream)) {
                        let _ = io.shutdown().await;
                    }
                }
                None => {
                    let _ = stream.shutdown().await;
                }
            }
            return Ok(());
        }
        crate::memory::released();
        if unread.is_empty() {
            let idle = idle_timeout.saturating_sub(RELEASE_IDLE_AFTER);
            tokio::select! {
                biased;
                // Idle: closed now, as a graceful shutdown closes idle connections.
                _ = drained(drain) => return Ok(()),
                r = tokio::time::timeout(idle, stream.readable()) => match r {
                    Ok(Ok(())) => {}
                    _ => return Ok(()),
                },
            }
        }
    }
}

/// Lets hyper serve an HTTP/1 connection until it closes, upgrades, drains, or has
/// waited [`RELEASE_IDLE_AFTER`] for a request (then `true`: released, socket open).
async fn http1_until_idle(
    io: Prefixed<TcpStream>,
    svc: HttpProxy,
    drain: &mut Drain,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> Result<(Http1Parts, bool), hyper::Error> {
    let clock = HeadClock::new(idle_timeout);
    let io = TokioIo::new(Watched::new(io, clock.clone()));
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(ConnTimer(clock.clone()))
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(io, svc);
    // Set by the drain (finish the request in flight, then close) or by the timer
    // (idle long enough to release); both end hyper's connection the same way.
    let draining = AtomicBool::new(false);
    let mut released = false;
    let run = std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(r) = conn.poll_without_shutdown(cx) {
                return Poll::Ready(r);
            }
            // Loads first: this runs on every wake of the connection.
            let drain_now =
                draining.load(Ordering::Relaxed) && draining.swap(false, Ordering::Relaxed);
            // Between requests hyper's state is idle, so this ends the connection as
            // HTTP at once, with nothing left unwritten, and leaves the socket open.
            let release_now = !drain_now && !released && clock.take_release();
            if !(drain_now || release_now) {
                return Poll::Pending;
            }
            released = release_now;
            Pin::new(&mut conn).graceful_shutdown();
        }
    });
    let never = || false;
    until_done(
        std::pin::pin!(run),
        drain,
        std::future::pending(),
        never,
        |_| draining.store(true, Ordering::Relaxed),
    )
    .await?;
    Ok((conn.into_parts(), released))
}

/// Bytes hyper read past the last request, then any the detection left unread. An
/// empty one is replaced: it may still hold the whole buffer it was split from.
fn join(first: Bytes, then: Bytes) -> Bytes {
    match (first.is_empty(), then.is_empty()) {
        (true, true) => Bytes::new(),
        (false, true) => first,
        (true, false) => then,
        (false, false) => [first, then].concat().into(),
    }
}

/// Runs an HTTP connection to its end; once draining starts or `stop` completes, asks
/// it to finish gracefully (HTTP/1: after the request in flight; HTTP/2: GOAWAY) and
/// waits. `stopped` says, without waiting, whether `stop` may have completed.
async fn until_done<C>(
    mut conn: Pin<&mut C>,
    drain: &mut Drain,
    stop: impl Future<Output = ()>,
    stopped: impl Fn() -> bool,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let probe = drain.clone();
    let signal = async {
        tokio::select! {
            _ = drained(drain) => {}
            _ = stop => {}
        }
    };
    tokio::pin!(signal);
    // The signals are polled once, to register this task's waker, and again only once
    // one has fired: a tokio `Notify` polled while it waits takes its waiters' lock,
    // and this task wakes for every read and write of the connection.
    let mut armed = false;
    let done = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if (!armed || probe.has_changed().unwrap_or(true) || stopped())
            && signal.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        armed = true;
        Poll::Pending
    })
    .await;
    match done {
        Some(r) => r,
        None => {
            shutdown(conn.as_mut());
            conn.await
        }
    }
}

/// Where an opaque connection goes: the service's balancer, or the destination itself.
async fn opaque_dst(
    shared: &Arc<Shared>,
    ctx: &ConnCtx,
) -> anyhow::Result<(SocketAddr, Duration, Arc<str>)> {
    let svc = ctx
        .service(shared)
        .await
        .ok_or_else(|| anyhow::anyhow!("no service for this listener"))?;
    let ep = svc.pick_for_connection(None, ctx.peer).ok_or_else(|| {
        shared.metrics.error(&svc.name, "no-endpoints");
        anyhow::anyhow!("service {} has no endpoints", svc.name)
    })?;
    Ok((ep.addr, svc.settings.connect_timeout, svc.name.clone()))
}
