//! HTTP/1 timeouts that tell a slow client from an idle one.
//!
//! hyper arms its header-read timer as soon as a connection waits for a request head, so
//! with `header-read-timeout` alone an idle keep-alive connection is closed after 10 s,
//! under the next request of a client whose pool keeps connections for minutes. Here the
//! timer hyper asks for counts `idle-timeout` until a byte of the next request arrives,
//! then `header-read-timeout` from that byte: slow headers are still cut off.
//!
//! The same timer tells the connection's owner when a keep-alive connection has waited
//! [`RELEASE_IDLE_AFTER`] for its next request, so that it can give back hyper's
//! buffers (~16 KiB) until bytes arrive (see `server::serve_http1`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long a keep-alive connection waits for its next request before it gives its
/// buffers back. Waking it then costs a new hyper connection (two buffers and a few
/// hundred bytes of state), once per request for a client that calls less often than
/// this; more often, nothing.
pub const RELEASE_IDLE_AFTER: Duration = Duration::from_secs(1);

/// When the first byte after the last head wait began arrived (ns since `base`, 0: none).
pub struct HeadClock {
    base: Instant,
    first_byte: AtomicU64,
    idle: Duration,
    /// Whether a head wait has begun: the first is a new connection's (or a woken
    /// one's), whose request is on its way; later ones follow a response and may be
    /// released.
    waited: AtomicBool,
    release: AtomicBool,
}

impl HeadClock {
    pub fn new(idle: Duration) -> Arc<HeadClock> {
        Arc::new(HeadClock {
            base: Instant::now(),
            first_byte: AtomicU64::new(0),
            idle,
            waited: AtomicBool::new(false),
            release: AtomicBool::new(false),
        })
    }

    /// Whether the connection has waited [`RELEASE_IDLE_AFTER`] for its next request
    /// with no byte of it arrived (asked once; hyper keeps waiting meanwhile).
    pub fn take_release(&self) -> bool {
        self.release.load(Ordering::Relaxed) && self.release.swap(false, Ordering::Relaxed)
    }

    fn saw_bytes(&self) {
        if self.first_byte.load(Ordering::Relaxed) == 0 {
            let ns = self.base.elapsed().as_nanos() as u64;
            self.first_byte.store(ns.max(1), Ordering::Relaxed);
        }
    }

    fn first_byte(&self) -> Option<Instant> {
        match self.first_byte.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }
}

/// The timer handed to hyper's HTTP/1 server for one connection.
#[derive(Clone)]
pub struct ConnTimer(pub Arc<HeadClock>);

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    /// hyper asks for this when it starts waiting for a request head; `deadline` is
    /// now + header-read-timeout.
    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // One clock read: this runs for every request of a keep-alive connection.
        let started = Instant::now();
        let header = deadline.saturating_duration_since(started.into_std());
        self.0.first_byte.store(0, Ordering::Relaxed);
        let may_release =
            self.0.waited.swap(true, Ordering::Relaxed) && RELEASE_IDLE_AFTER < self.0.idle;
        Box::pin(HeadSleep {
            clock: self.0.clone(),
            header,
            started,
            may_release,
            sleep: tokio::time::sleep_until(started + self.0.idle),
        })
    }
}

pin_project_lite::pin_project! {
    struct HeadSleep {
        clock: Arc<HeadClock>,
        header: Duration,
        started: Instant,
        may_release: bool,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // hyper polls this after every read that leaves the head incomplete, so the
        // deadline moves to first byte + header-read-timeout as soon as one arrives.
        let first_byte = this.clock.first_byte();
        let deadline = match first_byte {
            Some(t) => t + *this.header,
            None if *this.may_release => *this.started + RELEASE_IDLE_AFTER,
            None => *this.started + this.clock.idle,
        };
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if first_byte.is_none() && *this.may_release {
            // Idle long enough to be released; the idle timeout still counts from
            // `started` if the owner lets hyper wait on.
            *this.may_release = false;
            this.clock.release.store(true, Ordering::Relaxed);
            this.sleep.as_mut().reset(*this.started + this.clock.idle);
            return this.sleep.poll(cx);
        }
        Poll::Ready(())
    }
}

pin_project_lite::pin_project! {
    /// A connection's IO that tells its [`HeadClock`] when bytes arrive.
    pub struct Watched<S> {
        #[pin]
        inner: S,
        clock: Arc<HeadClock>,
    }
}

impl<S> Watched<S> {
    pub fn new(inner: S, clock: Arc<HeadClock>) -> Self {
        Watched { inner, clock }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.saw_bytes();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn an_idle_wait_lasts_idle_and_a_started_head_lasts_header_read() {
        let clock = HeadClock::new(Duration::from_secs(3600));
        let timer = ConnTimer(clock.clone());
        let header = Duration::from_secs(10);

        let mut idle = timer.sleep(header);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            futures_poll(&mut idle).is_pending(),
            "idle for a minute: still open"
        );
        assert!(
            !clock.take_release(),
            "a connection's first wait is for a request on its way: never released"
        );

        clock.saw_bytes();
        assert!(futures_poll(&mut idle).is_pending());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            futures_poll(&mut idle).is_ready(),
            "a head begun 11 s ago is cut off"
        );

        // The next wait starts afresh: the bytes of the last head do not count.
        let mut next = timer.sleep(header);
        tokio::time::advance(RELEASE_IDLE_AFTER / 2).await;
        assert!(futures_poll(&mut next).is_pending());
        assert!(!clock.take_release(), "not idle long enough to be released");
        tokio::time::advance(RELEASE_IDLE_AFTER).await;
        assert!(futures_poll(&mut next).is_pending());
        assert!(
            clock.take_release(),
            "idle past RELEASE_IDLE_AFTER: released"
        );
        assert!(!clock.take_release(), "asked once");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(futures_poll(&mut next).is_pending());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(
            futures_poll(&mut next).is_ready(),
            "idle past idle-timeout: closed"
        );
    }

    fn futures_poll(f: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        let waker = std::task::Waker::noop();
        f.as_mut().poll(&mut Context::from_waker(waker))
    }
}
