//! Listeners, per-connection protocol handling, and graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ferry_policy::{ListenerKind, Policy};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::detect::{Prefixed, Protocol, detect};
use crate::head::{ConnTimer, HeadClock, Watched};
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
        (Protocol::Opaque, bytes::BytesMut::new())
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
    match proto {
        Protocol::Opaque => {
            let (dst, connect_timeout, service) = opaque_dst(&shared, &ctx).await?;
            let direction = if ctx.inbound { "inbound" } else { "outbound" };
            let stats = tcp::TcpStats::open(&shared.metrics, direction, &service);
            tcp::forward(stream, prefix, dst, connect_timeout, &stats).await?;
        }
        Protocol::Http1 => {
            let clock = HeadClock::new(idle_timeout);
            let io = TokioIo::new(Watched::new(Prefixed::new(prefix, stream), clock.clone()));
            let svc = HttpProxy::new(shared, ctx);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(ConnTimer(clock))
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            let never = || false;
            until_done(conn, &mut drain, std::future::pending(), never, |c| {
                c.graceful_shutdown()
            })
            .await?;
        }
        Protocol::Http2 => {
            let io = TokioIo::new(Prefixed::new(prefix, stream));
            let svc = HttpProxy::new(shared, ctx.clone());
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .adaptive_window(true)
                .serve_connection(io, svc);
            // A flood of streams cancelled after they were forwarded (rapid reset that
            // waits for the proxy) ends like a drain: GOAWAY, streams in flight finish.
            let flood = async {
                ctx.too_many_cancels.notified().await;
                tracing::debug!(%peer, "too many cancelled streams; sending GOAWAY");
            };
            let flooded = || ctx.flooded();
            until_done(conn, &mut drain, flood, flooded, |c| c.graceful_shutdown()).await?;
        }
    }
    Ok(())
}

/// Runs an HTTP connection to its end; once draining starts or `stop` completes, asks
/// it to finish gracefully (HTTP/1: after the request in flight; HTTP/2: GOAWAY) and
/// waits. `stopped` says, without waiting, whether `stop` may have completed.
async fn until_done<C>(
    conn: C,
    drain: &mut Drain,
    stop: impl Future<Output = ()>,
    stopped: impl Fn() -> bool,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let probe = drain.clone();
    tokio::pin!(conn);
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
    let set = svc.endpoints();
    let key = crate::balance::request_key(set.lb(), &svc.settings.hash_on, None, ctx.peer);
    let ep = set.pick(key, None).ok_or_else(|| {
        shared.metrics.error(&svc.name, "no-endpoints");
        anyhow::anyhow!("service {} has no endpoints", svc.name)
    })?;
    Ok((ep.addr, svc.settings.connect_timeout, svc.name.clone()))
}
