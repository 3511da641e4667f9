//! Tells the process when connections have freed memory, so that it can return it to
//! the system once the sidecar is quiet (the allocator is the binary's business, not
//! this crate's). Client connections say so when they end or go idle; upstream
//! connections, made by [`Connector`], when they close (the pool closes idle ones on
//! its own timer).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::TryFutureExt;
use futures::future::MapOk;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Bumped on every freeing; a quiet second is one where it did not move.
static FREED: AtomicU64 = AtomicU64::new(0);
/// Something was freed since the last [`quiet_after_freeing`] returned.
static PENDING: AtomicBool = AtomicBool::new(false);
static WAKE: Notify = Notify::const_new();

/// A connection ended or dropped its buffers. Cheap: a waiter is woken only by the
/// first call after it last returned.
pub fn released() {
    FREED.fetch_add(1, Ordering::Relaxed);
    if !PENDING.swap(true, Ordering::AcqRel) {
        WAKE.notify_one();
    }
}

/// Resolves once memory was freed and then nothing more for `quiet` (so that a busy
/// sidecar, whose allocator reuses what it frees, is not asked to give pages back).
pub async fn quiet_after_freeing(quiet: Duration) {
    while !PENDING.load(Ordering::Acquire) {
        WAKE.notified().await;
    }
    loop {
        let seen = FREED.load(Ordering::Relaxed);
        tokio::time::sleep(quiet).await;
        if FREED.load(Ordering::Relaxed) == seen {
            break;
        }
    }
    // Freeings from here on wake the next wait; those before are covered by the
    // caller's work, which comes after.
    PENDING.store(false, Ordering::Release);
}

/// Connects upstream like [`HttpConnector`]; each connection calls [`released`] when
/// it closes.
#[derive(Clone)]
pub struct Connector(pub HttpConnector);

type Connecting = <HttpConnector as tower::Service<Uri>>::Future;

impl tower::Service<Uri> for Connector {
    type Response = Upstream;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = MapOk<Connecting, fn(TokioIo<TcpStream>) -> Upstream>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        self.0.call(dst).map_ok(Upstream)
    }
}

/// An upstream connection; see [`Connector`].
pub struct Upstream(TokioIo<TcpStream>);

impl Drop for Upstream {
    fn drop(&mut self) {
        released();
    }
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

impl hyper::rt::Read for Upstream {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Upstream {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
