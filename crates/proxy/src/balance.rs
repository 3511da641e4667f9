//! Endpoints and the balancers that choose among them.
//!
//! An [`EndpointSet`] is immutable once built: its hash tables are computed when the
//! set or the algorithm changes, so a pick is a few atomic loads and no lock.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry_policy::Lb;
use http::uri::Authority;
use xxhash_rust::xxh3::xxh3_64;

use crate::metrics::StatusCounters;

/// Latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Consecutive connection failures before an endpoint is passed over.
const EJECT_AFTER: u32 = 3;
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);
/// How fast the peak-EWMA estimate forgets a slow response.
const DECAY: Duration = Duration::from_secs(10);

/// One upstream address, with the load it carries now and its latency estimate.
/// Shared across policy versions so counts and estimates survive a reload.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub authority: Authority,
    in_flight: AtomicUsize,
    /// Peak-EWMA latency in nanoseconds, as f64 bits.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds since `epoch()`.
    stamp_ns: AtomicU64,
    /// Connection failures since the last success (passive health).
    failures: AtomicU32,
    /// Until when balancers pass this endpoint over, in `now_ns()` time.
    ejected_until: AtomicU64,
    pub statuses: StatusCounters,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    Instant::now().saturating_duration_since(epoch()).as_nanos() as u64
}

impl Endpoint {
    pub fn new(addr: SocketAddr, statuses: StatusCounters) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .expect("a socket address is an authority");
        Endpoint {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            statuses,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn connected(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// After a few consecutive connection failures the endpoint is passed over for a
    /// while, doubling with each further failure (up to 30 s); a request after that
    /// probes it again.
    pub fn connect_failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            let backoff = EJECT_BASE
                .saturating_mul(1 << (n - EJECT_AFTER).min(5))
                .min(EJECT_MAX);
            self.ejected_until
                .store(now_ns() + backoff.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ns() < until
    }

    /// Marks a request as started; the guard marks it finished when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The latency estimate now, decayed for the time since the last sample.
    pub fn rtt_estimate(&self) -> Duration {
        Duration::from_nanos(self.decayed(now_ns()) as u64)
    }

    fn decayed(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        rtt * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// Records one response latency: a slower sample replaces the estimate at once,
    /// a faster one moves it by an exponentially weighted average.
    pub fn observe(&self, rtt: Duration) {
        let now = now_ns();
        let sample = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        let next = if sample > current {
            sample
        } else {
            let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            current * w + sample * (1.0 - w)
        };
        // Racing writers may lose a sample; the estimate stays sound.
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }

    /// Expected wait for a new request: latency times the requests ahead of it.
    fn ewma_cost(&self, now: u64) -> f64 {
        self.decayed(now).max(1.0) * (self.in_flight() + 1) as f64
    }
}

/// A request in flight on an endpoint.
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of a service as one balancer sees them.
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    lb: Lb,
    next: AtomicUsize,
    table: HashTable,
}

enum HashTable {
    None,
    Ring(Vec<(u64, u32)>),
    Maglev(Vec<u32>),
}

/// Virtual nodes per endpoint on the ring; enough for an even spread of a few dozen.
const RING_REPLICAS: u32 = 160;
/// Maglev lookup table size: a prime far above the endpoint counts of a service. It must
/// not change with the endpoint set, or every key would move; 16,381 slots (64 KiB) keep
/// the spread even up to about 150 endpoints and a rebuild on a policy swap cheap.
const MAGLEV_SIZE: usize = 16_381;

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>, lb: Lb) -> Self {
        let table = match lb {
            Lb::RingHash if !endpoints.is_empty() => HashTable::Ring(build_ring(&endpoints)),
            Lb::Maglev if !endpoints.is_empty() => HashTable::Maglev(build_maglev(&endpoints)),
            _ => HashTable::None,
        };
        EndpointSet {
            endpoints,
            lb,
            next: AtomicUsize::new(0),
            table,
        }
    }

    pub fn lb(&self) -> Lb {
        self.lb
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Chooses an endpoint. `key` is the request's hash key (hash balancers only).
    /// `avoid` is an endpoint a retry should not go back to, when there is another.
    pub fn pick(&self, key: Option<u64>, avoid: Option<&Arc<Endpoint>>) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n <= 1 {
            return self.endpoints.first();
        }
        let i = match (&self.table, key) {
            (HashTable::Ring(ring), Some(k)) => {
                let at = ring.partition_point(|(h, _)| *h < k);
                ring[at % ring.len()].1 as usize
            }
            (HashTable::Maglev(t), Some(k)) => t[(k % t.len() as u64) as usize] as usize,
            _ => match self.lb {
                Lb::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
                Lb::Random | Lb::RingHash | Lb::Maglev => fastrand::usize(..n),
                Lb::LeastRequest => {
                    let (a, b) = two_distinct(n);
                    let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                    if eb.in_flight() < ea.in_flight() {
                        b
                    } else {
                        a
                    }
                }
                Lb::P2cEwma => {
                    let (a, b) = two_distinct(n);
                    let now = now_ns();
                    let (ca, cb) = (
                        self.endpoints[a].ewma_cost(now),
                        self.endpoints[b].ewma_cost(now),
                    );
                    if cb < ca { b } else { a }
                }
            },
        };
        // Pass over an ejected endpoint or the one a retry avoids, when another will do.
        let usable =
            |e: &Arc<Endpoint>| !e.is_ejected() && !avoid.is_some_and(|a| Arc::ptr_eq(a, e));
        if usable(&self.endpoints[i]) {
            return Some(&self.endpoints[i]);
        }
        (1..n)
            .map(|k| &self.endpoints[(i + k) % n])
            .find(|e| usable(e))
            .or_else(|| {
                let chosen = &self.endpoints[i];
                match avoid {
                    Some(a) if Arc::ptr_eq(a, chosen) => Some(&self.endpoints[(i + 1) % n]),
                    _ => Some(chosen),
                }
            })
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    (a, b)
}

/// The hash of a balancing key, stable across processes so a restart keeps keys in place.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_key(&v4.octets()),
        IpAddr::V6(v6) => hash_key(&v6.octets()),
    }
}

fn endpoint_name(e: &Endpoint) -> String {
    e.addr.to_string()
}

fn build_ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, u32)> {
    let mut ring = Vec::with_capacity(endpoints.len() * RING_REPLICAS as usize);
    for (i, e) in endpoints.iter().enumerate() {
        let name = endpoint_name(e);
        for r in 0..RING_REPLICAS {
            ring.push((hash_key(format!("{name}#{r}").as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// Maglev's table population (Eisenbud et al., NSDI 2016): each endpoint walks its
/// own permutation of slots and takes the next free one, in turns.
fn build_maglev(endpoints: &[Arc<Endpoint>]) -> Vec<u32> {
    let size = MAGLEV_SIZE;
    let m = size as u64;
    let perms: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| {
            let name = endpoint_name(e);
            let offset = xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), 1) % m;
            let skip = xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), 2) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; endpoints.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        let m = Metrics::default();
        (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
                Arc::new(Endpoint::new(
                    addr,
                    StatusCounters::new(&m.requests, "t".into(), addr.to_string()),
                ))
            })
            .collect()
    }

    fn owner(set: &EndpointSet, key: u64) -> SocketAddr {
        set.pick(Some(key), None).unwrap().addr
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let set = EndpointSet::new(endpoints(3), Lb::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[(set.pick(None, None).unwrap().addr.port() - 9000) as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn hash_balancers_move_only_the_keys_of_a_removed_endpoint() {
        for lb in [Lb::RingHash, Lb::Maglev] {
            let all = endpoints(5);
            let before = EndpointSet::new(all.clone(), lb);
            let after = EndpointSet::new(all[..4].to_vec(), lb);
            let removed = all[4].addr;
            let (mut moved, mut on_removed) = (0, 0);
            let keys = 10_000;
            for k in 0..keys {
                let key = hash_key(format!("user-{k}").as_bytes());
                let (b, a) = (owner(&before, key), owner(&after, key));
                if b == removed {
                    on_removed += 1;
                } else if a != b {
                    moved += 1;
                }
            }
            // About 1/N of keys lived on the removed endpoint; of the rest, ring-hash
            // moves none and maglev only a small fraction.
            assert!((1200..2800).contains(&on_removed), "{lb}: {on_removed}");
            assert!(moved < keys / 20, "{lb}: {moved} keys moved needlessly");
        }
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_endpoint() {
        let eps = endpoints(2);
        eps[0].observe(Duration::from_millis(200));
        eps[1].observe(Duration::from_micros(500));
        let set = EndpointSet::new(eps, Lb::P2cEwma);
        for _ in 0..50 {
            assert_eq!(set.pick(None, None).unwrap().addr.port(), 9001);
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = endpoints(2);
        let _busy: Vec<_> = (0..3).map(|_| eps[0].start()).collect();
        let set = EndpointSet::new(eps.clone(), Lb::LeastRequest);
        assert_eq!(set.pick(None, None).unwrap().addr.port(), 9001);
        drop(_busy);
        assert_eq!(eps[0].in_flight(), 0);
    }

    #[test]
    fn an_endpoint_failing_to_connect_is_passed_over_until_it_recovers() {
        let set = EndpointSet::new(endpoints(2), Lb::RoundRobin);
        for _ in 0..EJECT_AFTER {
            set.endpoints[0].connect_failed();
        }
        assert!(set.endpoints[0].is_ejected());
        for _ in 0..10 {
            assert_eq!(set.pick(None, None).unwrap().addr.port(), 9001);
        }
        set.endpoints[0].connected();
        let ports: std::collections::HashSet<_> = (0..4)
            .map(|_| set.pick(None, None).unwrap().addr.port())
            .collect();
        assert_eq!(ports.len(), 2);
        // With every endpoint ejected, requests still go somewhere.
        for e in &set.endpoints {
            for _ in 0..EJECT_AFTER {
                e.connect_failed();
            }
        }
        assert!(set.pick(None, None).is_some());
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed() {
        let set = EndpointSet::new(endpoints(2), Lb::Random);
        let first = set.endpoints[0].clone();
        for _ in 0..20 {
            assert_eq!(set.pick(None, Some(&first)).unwrap().addr.port(), 9001);
        }
    }
}
