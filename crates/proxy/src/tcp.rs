//! Opaque TCP and `CONNECT` tunnels: bytes copied both ways, half-close included.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::{Metrics, TcpLabels};

/// One opaque connection's counters: opened now, closed and bytes as they flow.
pub struct TcpStats {
    received: Counter,
    sent: Counter,
    closed: Counter,
    open: Gauge,
}

impl TcpStats {
    pub fn open(metrics: &Metrics, direction: &'static str, service: &str) -> TcpStats {
        let l = TcpLabels {
            direction,
            service: service.to_string(),
        };
        metrics.tcp_opened.get_or_create(&l).inc();
        let open = metrics.tcp_open.get_or_create(&l).clone();
        open.inc();
        TcpStats {
            received: metrics.tcp_received.get_or_create(&l).clone(),
            sent: metrics.tcp_sent.get_or_create(&l).clone(),
            closed: metrics.tcp_closed.get_or_create(&l).clone(),
            open,
        }
    }
}

impl Drop for TcpStats {
    fn drop(&mut self) {
        self.closed.inc();
        self.open.dec();
    }
}

/// The client side of an opaque connection, counting bytes as they pass, so a
/// long-lived connection shows its traffic while it lasts.
struct Counted<'a, T> {
    io: T,
    stats: &'a TcpStats,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.received.inc_by(n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.sent.inc_by(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connects to `dst`, replays what detection already read, then copies until both
/// directions have ended. When one side finishes sending, the other is told with a
/// FIN and may keep sending.
pub async fn forward(
    client: TcpStream,
    prefix: Bytes,
    dst: SocketAddr,
    connect_timeout: Duration,
    stats: &TcpStats,
) -> io::Result<(u64, u64)> {
    let upstream = connect(dst, connect_timeout).await?;
    splice(client, prefix, upstream, stats).await
}

/// A connection to `dst`, or a `TimedOut` error after `connect_timeout`.
pub async fn connect(dst: SocketAddr, connect_timeout: Duration) -> io::Result<TcpStream> {
    let upstream = tokio::time::timeout(connect_timeout, TcpStream::connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    upstream.set_nodelay(true)?;
    Ok(upstream)
}

/// Copies bytes both ways until both sides are done, `prefix` (already read from the
/// client) first. Returns the bytes sent up and down.
pub async fn splice<T: AsyncRead + AsyncWrite + Unpin>(
    client: T,
    prefix: Bytes,
    mut upstream: TcpStream,
    stats: &TcpStats,
) -> io::Result<(u64, u64)> {
    stats.received.inc_by(prefix.len() as u64);
    if !prefix.is_empty() {
        upstream.write_all(&prefix).await?;
    }
    let mut client = Counted { io: client, stats };
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok((up + prefix.len() as u64, down))
}

/// The destination a connection had before iptables redirected it to us.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
