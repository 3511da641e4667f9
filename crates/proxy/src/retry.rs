//! Retries: which failures may be sent again, the budget that bounds them, the backoff
//! between them, and the request body kept so it can be replayed.
//!
//! A failed connect sent nothing, so any request may go again. A request that was written
//! goes again only when the route says so (`retry-on`) or, on 503 / `UNAVAILABLE`, when
//! its method is idempotent, and only while its body (at most [`REPLAY_LIMIT`]) is kept.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_policy::{RetryOn, Settings};
use http::{HeaderMap, Method, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::errors::ProxyError;

/// Request bodies up to this size are kept for a replay; a larger one is never sent twice.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Retries of a failed connect (nothing was sent), whatever `retries` says.
pub const CONNECT_RETRIES: u32 = 2;

/// Backoff before sending a written request again: full jitter under a doubling cap.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Why an attempt failed, as far as retrying goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing was sent: the connect failed or timed out.
    Connect(ProxyError),
    /// Sent, but the upstream says it did nothing with it (HTTP/2 `REFUSED_STREAM`, a
    /// stream above a GOAWAY's last stream id): as safe to send again as a failed connect.
    Unprocessed,
    /// The request was (maybe partly) written, then the upstream reset or timed out.
    Written(ProxyError),
    /// The upstream answered with this status (and gRPC status in the headers).
    Status(u16, Option<u8>),
}

impl Failure {
    /// The label of `ferry_retries_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Connect(e) | Failure::Written(e) => e.reason(),
            Failure::Unprocessed => ProxyError::Unprocessed.reason(),
            Failure::Status(_, Some(14)) => "unavailable",
            Failure::Status(503, _) => "unavailable",
            Failure::Status(..) => "status",
        }
    }
}

/// Whether a failed attempt may be sent again, before the budget and the endpoint count
/// have their say. `attempt` counts from 0 (the first send).
pub fn retryable(f: Failure, method: &Method, settings: &Settings, attempt: u32) -> bool {
    if let Failure::Connect(_) | Failure::Unprocessed = f {
        return attempt < settings.retries.max(CONNECT_RETRIES);
    }
    if attempt >= settings.retries {
        return false;
    }
    let on = &settings.retry_on;
    match f {
        Failure::Connect(_) | Failure::Unprocessed => unreachable!(),
        Failure::Written(ProxyError::PerTryTimeout) => on.has(RetryOn::PER_TRY_TIMEOUT),
        Failure::Written(_) => on.has(RetryOn::RESET),
        Failure::Status(s, g) => {
            on.status(s, g) || (idempotent(method) && (s == 503 || g == Some(14)))
        }
    }
}

/// Whether a request could be sent again after some of its body was read, so the body
/// must be kept: an HTTP/2 stream can be refused after its first frames went out, and a
/// written request is resent when the route allows it. Otherwise only a failed connect
/// is retried, and that read none of the body.
pub fn may_resend(version: Version, method: &Method, settings: &Settings) -> bool {
    version == Version::HTTP_2
        || (settings.retries > 0 && (!settings.retry_on.is_empty() || idempotent(method)))
}

/// RFC 9110 section 9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The wait before retry number `attempt` (1-based) of a written request: uniform in
/// [0, min(max, base x 2^(attempt-1))], so clients that failed together do not return
/// together.
pub fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(8))
        .min(BACKOFF_MAX);
    cap.mul_f64(fastrand::f64())
}

/// Retries may add at most [`Budget::RATIO`] of the requests of the last
/// [`Budget::WINDOW_SECS`] seconds, plus [`Budget::MIN_PER_SEC`] a second, so a failing
/// upstream is not buried under retries and a quiet hour banks nothing for an outage.
///
/// Counted in one-second slots of atomics (no lock on the request path): a slot is reused
/// when its second comes round again, and a count racing that reset may be lost, which
/// errs on the side of fewer retries.
pub struct Budget {
    slots: [Slot; Budget::WINDOW_SECS as usize],
}

#[derive(Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl Budget {
    pub const WINDOW_SECS: u64 = 10;
    pub const RATIO: f64 = 0.2;
    pub const MIN_PER_SEC: u32 = 10;

    pub fn new() -> Self {
        Budget {
            slots: Default::default(),
        }
    }

    fn slot(&self, second: u64) -> &Slot {
        let s = &self.slots[(second % Self::WINDOW_SECS) as usize];
        let seen = s.second.load(Ordering::Relaxed);
        if seen != second
            && s.second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            s.requests.store(0, Ordering::Relaxed);
            s.retries.store(0, Ordering::Relaxed);
        }
        s
    }

    /// Every request that could be retried earns a fifth of a retry; `at`: when it came
    /// (a clock read the request has made already).
    pub fn deposit(&self, at: Instant) {
        self.slot(secs(at)).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry if the window allows it.
    pub fn withdraw(&self) -> bool {
        let now = now_secs();
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let second = s.second.load(Ordering::Relaxed);
            if second + Self::WINDOW_SECS > now && second <= now {
                requests += u64::from(s.requests.load(Ordering::Relaxed));
                retries += u64::from(s.retries.load(Ordering::Relaxed));
            }
        }
        let allowed = (requests as f64 * Self::RATIO) as u64
            + u64::from(Self::MIN_PER_SEC) * Self::WINDOW_SECS;
        if retries >= allowed {
            return false;
        }
        self.slot(now).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

fn now_secs() -> u64 {
    secs(Instant::now())
}

/// `at` in whole seconds on a monotonic clock, starting a window late so a slot's
/// zeroed `second` never counts as live.
fn secs(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_secs() + Budget::WINDOW_SECS
}

/// A request body read once from the client and kept, up to [`REPLAY_LIMIT`], so a
/// retry can send it again. Each attempt reads it through its own [`ReplayBody`]; only
/// the newest attempt may read on (an abandoned one is told its body failed).
pub struct Replay {
    state: Mutex<State>,
    /// The body's `is_end_stream` and `size_hint` before anything was read; every
    /// attempt's body is the whole body again, so they hold for every attempt.
    unread: (bool, SizeHint),
    /// Keep what is read for a resend; otherwise the first attempt to read takes the
    /// body and reads it without the lock.
    keep: bool,
}

struct State {
    rest: Option<Incoming>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    /// More than [`REPLAY_LIMIT`] was read: no replay.
    overflow: bool,
    /// Something was read: a connect that failed reads nothing.
    touched: bool,
    /// The attempt allowed to read.
    current: u32,
}

impl Replay {
    pub fn new(body: Incoming, keep: bool) -> Arc<Replay> {
        let unread = (body.is_end_stream(), body.size_hint());
        Arc::new(Replay {
            state: Mutex::new(State {
                rest: Some(body),
                chunks: Vec::new(),
                trailers: None,
                len: 0,
                overflow: false,
                touched: false,
                current: 0,
            }),
            unread,
            keep,
        })
    }

    /// Whether another attempt can send the body whole: nothing was read yet, or all
    /// that was read was kept.
    pub fn replayable(&self, written: bool) -> bool {
        let s = self.state.lock().expect("replay poisoned");
        if written { !s.overflow } else { !s.touched }
    }

    /// The body for the next attempt, which from now on is the only one that reads.
    pub fn attempt(self: &Arc<Self>) -> ReplayBody {
        let mut s = self.state.lock().expect("replay poisoned");
        s.current += 1;
        ReplayBody {
            replay: self.clone(),
            attempt: s.current,
            pos: 0,
            trailers_sent: false,
            owned: None,
        }
    }
}

pub struct ReplayBody {
    replay: Arc<Replay>,
    attempt: u32,
    pos: usize,
    trailers_sent: bool,
    /// The body, taken whole when it is not kept.
    owned: Option<Incoming>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body moved to a newer attempt")]
pub struct Superseded;

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = crate::errors::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(b) = &mut this.owned {
            return Pin::new(b).poll_frame(cx).map_err(Into::into);
        }
        let mut s = this.replay.state.lock().expect("replay poisoned");
        if s.current != this.attempt {
            return Poll::Ready(Some(Err(Superseded.into())));
        }
        if !this.replay.keep
            && let Some(rest) = s.rest.take()
        {
            s.touched = true;
            s.overflow = true;
            drop(s);
            return Pin::new(this.owned.insert(rest))
                .poll_frame(cx)
                .map_err(Into::into);
        }
        if this.pos < s.chunks.len() {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.chunks[this.pos - 1].clone()))));
        }
        let s = &mut *s;
        let Some(rest) = s.rest.as_mut() else {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        };
        s.touched = true;
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    s.len += d.len();
                    if s.len > REPLAY_LIMIT {
                        s.overflow = true;
                        s.chunks = Vec::new();
                    } else if !s.overflow && !d.is_empty() {
                        s.chunks.push(d.clone());
                        this.pos = s.chunks.len();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                s.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.overflow = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Exact, so the last DATA frame carries END_STREAM rather than an empty frame after it.
    fn is_end_stream(&self) -> bool {
        if self.replay.unread.0 {
            return true;
        }
        if let Some(b) = &self.owned {
            return b.is_end_stream();
        }
        let Ok(s) = self.replay.state.try_lock() else {
            return false;
        };
        if s.current != self.attempt || self.pos < s.chunks.len() {
            return false;
        }
        match &s.rest {
            Some(rest) => rest.is_end_stream(),
            None => self.trailers_sent || s.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.replay.unread.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_fifth_of_recent_requests_plus_a_floor() {
        let b = Budget::new();
        for _ in 0..1000 {
            b.deposit(Instant::now());
        }
        let floor = (Budget::MIN_PER_SEC as u64 * Budget::WINDOW_SECS) as usize;
        let granted = (0..2000).take_while(|_| b.withdraw()).count();
        assert_eq!(granted, 200 + floor);
        assert!(!b.withdraw());
    }

    #[test]
    fn a_quiet_budget_banks_nothing_beyond_the_floor() {
        let b = Budget::new();
        let floor = (Budget::MIN_PER_SEC as u64 * Budget::WINDOW_SECS) as usize;
        assert_eq!((0..1000).take_while(|_| b.withdraw()).count(), floor);
    }

    #[test]
    fn written_requests_are_retried_only_when_allowed() {
        let mut s = Settings {
            retries: 2,
            ..Settings::default()
        };
        let unavailable = Failure::Status(503, None);
        assert!(retryable(unavailable, &Method::GET, &s, 0));
        assert!(!retryable(unavailable, &Method::POST, &s, 0));
        assert!(!retryable(Failure::Status(500, None), &Method::GET, &s, 0));
        assert!(!retryable(
            Failure::Written(ProxyError::UpstreamReset),
            &Method::GET,
            &s,
            0
        ));
        assert!(!retryable(unavailable, &Method::GET, &s, 2));
        s.retry_on = RetryOn::parse("503,reset").unwrap();
        assert!(retryable(unavailable, &Method::POST, &s, 1));
        assert!(retryable(
            Failure::Written(ProxyError::UpstreamReset),
            &Method::POST,
            &s,
            0
        ));
        s.retry_on = RetryOn::parse("unavailable").unwrap();
        assert!(retryable(
            Failure::Status(200, Some(14)),
            &Method::POST,
            &s,
            0
        ));
        s.retries = 0;
        assert!(!retryable(unavailable, &Method::GET, &s, 0));
        assert!(retryable(
            Failure::Connect(ProxyError::ConnectFailed),
            &Method::POST,
            &s,
            1
        ));
    }

    #[test]
    fn backoff_stays_under_its_cap() {
        for a in 1..20 {
            assert!(backoff(a) <= BACKOFF_MAX);
        }
        assert!(backoff(1) <= BACKOFF_BASE);
    }
}
