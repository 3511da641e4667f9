//! Concurrency limits per service (circuit breaking): a static `max-in-flight`, and an
//! adaptive limit that learns how much concurrency the upstream takes before its
//! latency climbs. A request over the limit is answered at once (`overloaded`) rather
//! than queued behind requests that are already waiting.
//!
//! The adaptive limit is AIMD on latency: a response within twice the service's
//! baseline latency (plus a little) adds 1/limit while the limit is in use; a slower one,
//! or a timeout, cuts it by a tenth, at most once per baseline interval so one burst of
//! slow answers is one cut. The baseline is the fastest latency seen in the last
//! 30 s, so it follows an upstream that got slower for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const INITIAL: f64 = 20.0;
const MIN: f64 = 1.0;
/// With no `max-in-flight` the adaptive limit grows at most this far.
const CEILING: f64 = 1000.0;
const TOLERANCE: f64 = 2.0;
const SLACK: Duration = Duration::from_millis(5);
const BASELINE_TTL: Duration = Duration::from_secs(30);

pub struct Limiter {
    in_flight: AtomicU32,
    /// The adaptive limit, as f64 bits.
    limit: AtomicU64,
    /// Fastest latency (ns) seen since `baseline_at`.
    baseline_ns: AtomicU64,
    baseline_at: AtomicU64,
    last_cut: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Limiter {
    pub fn new() -> Self {
        Limiter {
            in_flight: AtomicU32::new(0),
            limit: AtomicU64::new(INITIAL.to_bits()),
            baseline_ns: AtomicU64::new(u64::MAX),
            baseline_at: AtomicU64::new(0),
            last_cut: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The adaptive limit now.
    pub fn limit(&self) -> u32 {
        f64::from_bits(self.limit.load(Ordering::Relaxed)) as u32
    }

    /// Admits a request, or `None` when the service is at its limit.
    pub fn acquire(self: &Arc<Self>, max: Option<u32>, adaptive: bool) -> Option<Permit> {
        let mut cap = max.unwrap_or(u32::MAX);
        if adaptive {
            cap = cap.min(self.limit().max(MIN as u32));
        }
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if n >= cap {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Permit {
            limiter: self.clone(),
            adaptive: adaptive.then_some(max.map_or(CEILING, f64::from)),
        })
    }

    fn learn(&self, latency: Duration, failed: bool, ceiling: f64) {
        let now = now_ns();
        let sample = latency.as_nanos() as u64;
        let at = self.baseline_at.load(Ordering::Relaxed);
        if sample < self.baseline_ns.load(Ordering::Relaxed)
            || now.saturating_sub(at) > BASELINE_TTL.as_nanos() as u64
        {
            self.baseline_ns.store(sample.max(1), Ordering::Relaxed);
            self.baseline_at.store(now, Ordering::Relaxed);
        }
        let baseline = self.baseline_ns.load(Ordering::Relaxed) as f64;
        let limit = f64::from_bits(self.limit.load(Ordering::Relaxed));
        let slow = sample as f64 > baseline * TOLERANCE + SLACK.as_nanos() as f64;
        let next = if failed || slow {
            let last = self.last_cut.load(Ordering::Relaxed);
            if last != 0 && now.saturating_sub(last) < (baseline as u64).max(10_000_000) {
                return;
            }
            self.last_cut.store(now, Ordering::Relaxed);
            (limit * 0.9).max(MIN)
        } else if f64::from(self.in_flight()) * 2.0 >= limit {
            (limit + 1.0 / limit).min(ceiling)
        } else {
            return;
        };
        // Racing writers may lose an update; the limit stays sound.
        self.limit.store(next.to_bits(), Ordering::Relaxed);
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// An admitted request; it leaves the count when dropped (at the end of its response).
pub struct Permit {
    limiter: Arc<Limiter>,
    /// The adaptive limit's ceiling, when the limit is adaptive.
    adaptive: Option<f64>,
}

impl Permit {
    /// Teaches the adaptive limit one response's latency (to its headers).
    pub fn observe(&self, latency: Duration, failed: bool) {
        if let Some(ceiling) = self.adaptive {
            self.limiter.learn(latency, failed, ceiling);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_limit_refuses_the_request_over_it() {
        let l = Arc::new(Limiter::new());
        let held: Vec<_> = (0..3).map(|_| l.acquire(Some(3), false).unwrap()).collect();
        assert!(l.acquire(Some(3), false).is_none());
        drop(held);
        assert!(l.acquire(Some(3), false).is_some());
    }

    #[test]
    fn slow_answers_cut_the_adaptive_limit_and_fast_ones_grow_it_back() {
        let l = Arc::new(Limiter::new());
        let p = l.acquire(None, true).unwrap();
        p.observe(Duration::from_millis(5), false);
        for _ in 0..50 {
            p.observe(Duration::from_secs(2), false);
            // One cut per baseline interval.
            l.last_cut.store(0, Ordering::Relaxed);
        }
        assert_eq!(l.limit(), 1);
        drop(p);
        let held: Vec<_> = (0..40).filter_map(|_| l.acquire(None, true)).collect();
        assert_eq!(held.len(), 1);
        for _ in 0..200 {
            held[0].observe(Duration::from_millis(5), false);
        }
        // Growth follows use: with one request in flight the limit reaches 2.
        assert_eq!(l.limit(), 2);
        assert!(l.acquire(None, true).is_some());
    }
}
