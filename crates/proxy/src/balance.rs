//! Endpoints and the balancers that choose among them.
//!
//! An [`EndpointSet`] is immutable once built: its locality tiers and hash tables are
//! computed when the set or the algorithm changes, so a pick is a few atomic loads and
//! no lock. With more than one tier, a pick first chooses a tier by the shares of
//! [`crate::locality`], recomputed at most every 100 ms, then an endpoint within it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry_policy::Lb;
use http::uri::Authority;
use prometheus_client::metrics::counter::Counter;
use xxhash_rust::xxh3::xxh3_64;

use crate::locality::{LocalityState, Place, Plan, ShareGauge, Tier, TierStats};
use crate::metrics::StatusCounters;

/// Latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Consecutive connection failures before an endpoint is passed over.
const EJECT_AFTER: u32 = 3;
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);
/// How fast the peak-EWMA estimate forgets a slow response.
const DECAY: Duration = Duration::from_secs(10);
/// An ejected endpoint is probed with a TCP connect this often, so one that comes back
/// takes traffic again within about this long rather than after its backoff.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest outlier ejection, however often an endpoint was ejected.
const OUTLIER_MAX: Duration = Duration::from_secs(300);

/// Outlier ejection settings of a service.
#[derive(Clone, Copy, Debug)]
pub struct Outlier {
    pub failures: u32,
    pub base: Duration,
    pub max_percent: u8,
}

impl Outlier {
    pub fn of(s: &ferry_policy::Settings) -> Outlier {
        Outlier {
            failures: s.outlier_failures,
            base: s.outlier_ejection,
            max_percent: s.max_ejection_percent,
        }
    }
}

/// How often the tier shares are recomputed from endpoint health and latency.
const REFRESH: Duration = Duration::from_millis(100);

/// One upstream address, with the load it carries now and its latency estimate.
/// Shared across policy versions so counts and estimates survive a reload.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub authority: Authority,
    pub place: Place,
    /// EndpointSlice `hints.forZones`.
    pub hints: Arc<[Arc<str>]>,
    in_flight: AtomicUsize,
    /// Peak-EWMA latency in nanoseconds, as f64 bits.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds since `epoch()`.
    stamp_ns: AtomicU64,
    /// Connection failures since the last success (passive health).
    failures: AtomicU32,
    /// Failed calls (5xx, gRPC UNAVAILABLE, resets) since the last good one (outliers).
    errors: AtomicU32,
    /// Outlier ejections so far: each lasts as many times the base ejection.
    outlier_ejections: AtomicU32,
    /// When the last outlier ejection ended, in `now_ns()` time.
    outlier_until: AtomicU64,
    /// Until when balancers pass this endpoint over, in `now_ns()` time.
    ejected_until: AtomicU64,
    probing: AtomicBool,
    /// Whether a response has been timed (see [`Endpoint::observe`]), and whether a
    /// sample has been kept.
    observed: AtomicBool,
    answered: AtomicBool,
    /// Per-endpoint status counters, with `metrics-endpoint-labels: true` only.
    pub statuses: Option<StatusCounters>,
    /// The service's ejection counter.
    ejections: Counter,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    Instant::now().saturating_duration_since(epoch()).as_nanos() as u64
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        place: Place,
        hints: Arc<[Arc<str>]>,
        statuses: Option<StatusCounters>,
    ) -> Self {
        let authority = Authority::try_from(addr.to_string().as_str())
            .expect("a socket address is an authority");
        Endpoint {
            addr,
            authority,
            place,
            hints,
            in_flight: AtomicUsize::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
            failures: AtomicU32::new(0),
            errors: AtomicU32::new(0),
            outlier_ejections: AtomicU32::new(0),
            outlier_until: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            observed: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            statuses,
            ejections: Counter::default(),
        }
    }

    /// Counts this endpoint's ejections in `c` (the service's counter).
    pub fn count_ejections(mut self, c: Counter) -> Self {
        self.ejections = c;
        self
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Consecutive connection failures and failed calls.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed) + self.errors.load(Ordering::Relaxed)
    }

    /// Outlier ejections so far.
    pub fn outlier_ejections(&self) -> u32 {
        self.outlier_ejections.load(Ordering::Relaxed)
    }

    /// How a call this endpoint answered (or failed) ended. After `cfg.failures` failures
    /// in a row the endpoint is ejected for `cfg.base` times its ejection count (at most
    /// 5 min), unless that would take more than `cfg.max_percent` of the set
    /// out (one endpoint always stays). Unlike a refused connect, a failed call may be
    /// the fault of something behind every endpoint, which is why the share is bounded.
    pub fn outcome(&self, failed: bool, set: &EndpointSet, cfg: Outlier) {
        if !failed {
            if self.errors.load(Ordering::Relaxed) != 0 {
                self.errors.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if cfg.failures == 0 || n < cfg.failures || self.is_ejected() {
            return;
        }
        let len = set.endpoints.len();
        let out = set.endpoints.iter().filter(|e| e.is_ejected()).count();
        let allowed = out + 1 < len
            && cfg.max_percent > 0
            && (out == 0 || (out + 1) * 100 <= len * usize::from(cfg.max_percent));
        if !allowed {
            return;
        }
        let now = now_ns();
        // Well-behaved for a while since the last ejection: start counting afresh.
        let last = self.outlier_until.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) > OUTLIER_MAX.as_nanos() as u64 {
            self.outlier_ejections.store(0, Ordering::Relaxed);
        }
        let k = self.outlier_ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = cfg.base.saturating_mul(k).min(OUTLIER_MAX);
        let until = now + time.as_nanos() as u64;
        self.ejected_until.fetch_max(until, Ordering::Relaxed);
        self.outlier_until.store(until, Ordering::Relaxed);
        self.errors.store(0, Ordering::Relaxed);
        self.ejections.inc();
        tracing::info!(
            endpoint = %self.addr,
            failures = n,
            ejected_for = ?time,
            "endpoint ejected: consecutive failed calls"
        );
    }

    pub fn connected(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// After a few consecutive connection failures the endpoint is passed over for a
    /// while, doubling with each further failure (up to 30 s); a request after that
    /// tries it again, and meanwhile a TCP probe every second returns it as soon as it
    /// accepts connections.
    pub fn connect_failed(self: &Arc<Self>) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            let backoff = EJECT_BASE
                .saturating_mul(1 << (n - EJECT_AFTER).min(5))
                .min(EJECT_MAX);
            if !self.is_ejected() {
                self.ejections.inc();
            }
            self.ejected_until
                .store(now_ns() + backoff.as_nanos() as u64, Ordering::Relaxed);
            self.probe();
        }
    }

    /// Connects every [`PROBE_EVERY`] until a connect succeeds, requests succeed again,
    /// or the endpoint is gone. One probe task per endpoint.
    fn probe(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        let (addr, timeout) = (self.addr, EJECT_BASE);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if weak
                    .upgrade()
                    .is_none_or(|e| e.failures.load(Ordering::Relaxed) == 0)
                {
                    break;
                }
                let up = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .is_ok_and(|r| r.is_ok());
                let Some(e) = weak.upgrade() else { break };
                if up {
                    tracing::info!(endpoint = %addr, "endpoint accepts connections again");
                    e.connected();
                    break;
                }
                // Still down: stay ejected until a probe gets through, rather than let
                // the backoff lapse and send a real call to find out.
                let until = now_ns() + 2 * PROBE_EVERY.as_nanos() as u64;
                e.ejected_until.fetch_max(until, Ordering::Relaxed);
            }
            if let Some(e) = weak.upgrade() {
                e.probing.store(false, Ordering::Relaxed);
            }
        });
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
        f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) * self.decay(now)
    }

    /// How much of the estimate is left at `now`, since the last sample.
    fn decay(&self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// Records one response latency: a slower sample replaces the estimate at once,
    /// a faster one moves it by an exponentially weighted average. The first sample is
    /// left out: it usually paid for the connection's setup, which would make a new
    /// endpoint look slow for as long as the estimate takes to decay.
    pub fn observe(&self, rtt: Duration) {
        if !self.observed.swap(true, Ordering::Relaxed) {
            return;
        }
        self.answered.store(true, Ordering::Relaxed);
        let now = now_ns();
        // Through u64 (585 years of nanoseconds): a u128 to f64 conversion is a libcall.
        let sample = rtt.as_nanos() as u64 as f64;
        let estimate = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let next = next_estimate(estimate, self.decay(now), sample);
        // Racing writers may lose a sample; the estimate stays sound.
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }

    /// Whether a latency sample has been kept (the second response on).
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Expected wait for a new request: latency times the requests ahead of it.
    fn ewma_cost(&self, now: u64) -> f64 {
        self.decayed(now).max(1.0) * (self.in_flight() + 1) as f64
    }
}

/// Peak EWMA: the estimate decayed by `w` (what is left of it since the last sample),
/// replaced by a slower sample, or moved toward a faster one by what decayed.
fn next_estimate(estimate: f64, w: f64, sample: f64) -> f64 {
    let current = estimate * w;
    if sample > current {
        sample
    } else {
        current + sample * (1.0 - w)
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

/// The endpoints of a service as its balancer sees them, in locality tiers.
pub struct EndpointSet {
    /// Every endpoint, in the order discovery or the policy gave them.
    pub endpoints: Vec<Arc<Endpoint>>,
    lb: Lb,
    /// Non-empty tiers, nearest first; one when locality does not apply.
    tiers: Vec<TierPool>,
    plan: Plan,
    locality: Arc<LocalityState>,
    /// Cumulative shares per tier, in 1/65536, and when they were computed.
    cum: [AtomicU32; 4],
    computed_ns: AtomicU64,
    /// Why traffic is where it is, as of the last computation.
    reason: arc_swap::ArcSwap<String>,
}

struct TierPool {
    tier: Tier,
    pool: Pool,
    requests: Option<Counter>,
    share: Option<ShareGauge>,
}

/// What `/endpoints` shows of a set's locality.
pub struct LocalityView {
    pub plan: Plan,
    /// Per non-empty tier: its stats and planned share.
    pub tiers: Vec<(Tier, TierStats, f64)>,
    pub reason: String,
}

const SHARE_ONE: f64 = 65536.0;

impl EndpointSet {
    pub fn new(
        endpoints: Vec<Arc<Endpoint>>,
        lb: Lb,
        plan: &Plan,
        locality: &Arc<LocalityState>,
    ) -> Self {
        let places: Vec<(&Place, &[Arc<str>])> =
            endpoints.iter().map(|e| (&e.place, &*e.hints)).collect();
        let of = plan.tiers(&places);
        let mut kinds: Vec<Tier> = of.clone();
        kinds.sort_unstable();
        kinds.dedup();
        let tiers = kinds
            .into_iter()
            .map(|tier| {
                let members: Vec<_> = endpoints
                    .iter()
                    .zip(&of)
                    .filter(|(_, t)| **t == tier)
                    .map(|(e, _)| e.clone())
                    .collect();
                let (requests, share) = locality.handles(tier, members.len()).unzip();
                TierPool {
                    tier,
                    pool: Pool::new(members, lb),
                    requests,
                    share,
                }
            })
            .collect::<Vec<TierPool>>();
        locality.tiers_now(&tiers.iter().map(|t| t.tier).collect::<Vec<_>>());
        if let [only] = tiers.as_slice()
            && let Some(g) = &only.share
        {
            g.set(1.0);
        }
        EndpointSet {
            endpoints,
            lb,
            tiers,
            plan: plan.clone(),
            locality: locality.clone(),
            cum: Default::default(),
            computed_ns: AtomicU64::new(0),
            reason: Default::default(),
        }
    }

    pub fn lb(&self) -> Lb {
        self.lb
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The tier `e` is in.
    pub fn tier_of(&self, e: &Arc<Endpoint>) -> Tier {
        self.tiers
            .iter()
            .find(|t| t.pool.endpoints.iter().any(|m| Arc::ptr_eq(m, e)))
            .map_or(Tier::Any, |t| t.tier)
    }

    /// Chooses an endpoint. `key` is the request's hash key (hash balancers only).
    /// `avoid` is an endpoint a retry should not go back to, when there is another;
    /// a retry also prefers endpoints with no recent connection failure.
    pub fn pick<'a>(
        &'a self,
        key: Option<u64>,
        avoid: Option<&Arc<Endpoint>>,
    ) -> Option<&'a Arc<Endpoint>> {
        let (first, rest) = match self.tiers.as_slice() {
            [] => return None,
            [only] => (only, &[][..]),
            _ => (&self.tiers[self.choose_tier(key)], &self.tiers[..]),
        };
        let retry = avoid.is_some();
        let not_avoided = |e: &Arc<Endpoint>| !avoid.is_some_and(|a| Arc::ptr_eq(a, e));
        let fresh = |e: &Arc<Endpoint>| {
            !e.is_ejected() && not_avoided(e) && (!retry || e.consecutive_failures() == 0)
        };
        let usable = |e: &Arc<Endpoint>| !e.is_ejected() && not_avoided(e);
        let i = first.pool.choose(key);
        let others = || rest.iter().filter(|t| !std::ptr::eq(*t, first));
        let in_tier = |t: &'a TierPool, ok: &dyn Fn(&Arc<Endpoint>) -> bool| {
            let at = if std::ptr::eq(t, first) {
                i
            } else {
                t.pool.choose(key)
            };
            t.pool.from(at, ok).map(|e| (t, e))
        };
        // The chosen tier, then the others nearest first; then the same with looser terms.
        let (t, e) = in_tier(first, &fresh)
            .or_else(|| others().find_map(|t| in_tier(t, &fresh)))
            .or_else(|| in_tier(first, &usable))
            .or_else(|| others().find_map(|t| in_tier(t, &usable)))
            .unwrap_or_else(|| {
                // Nothing usable: the balancer's choice anyway, unless a retry avoids it.
                let n = first.pool.endpoints.len();
                let chosen = &first.pool.endpoints[i];
                let e = match avoid {
                    Some(a) if Arc::ptr_eq(a, chosen) && n > 1 => {
                        &first.pool.endpoints[(i + 1) % n]
                    }
                    _ => chosen,
                };
                (first, e)
            });
        if let Some(c) = &t.requests {
            c.inc();
        }
        Some(e)
    }

    /// A tier by the current shares: at random, or by the hash key, so a key keeps its
    /// tier (and so its endpoint) while the shares stay.
    fn choose_tier(&self, key: Option<u64>) -> usize {
        self.refresh();
        let r = match key {
            Some(k) => (k >> 48) as u32,
            None => fastrand::u32(..1 << 16),
        };
        self.cum[..self.tiers.len()]
            .iter()
            .position(|c| r < c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    fn stats(&self, now: u64) -> Vec<TierStats> {
        self.tiers
            .iter()
            .map(|t| {
                let healthy: Vec<&Arc<Endpoint>> = t
                    .pool
                    .endpoints
                    .iter()
                    .filter(|e| !e.is_ejected())
                    .collect();
                // What the balancer would pick in this tier: its cheapest endpoint that
                // has answered. A tier is overloaded only when even that one is slow.
                let cost_ms = healthy
                    .iter()
                    .filter(|e| e.has_answered())
                    .map(|e| e.ewma_cost(now) / 1e6)
                    .min_by(f64::total_cmp);
                TierStats {
                    healthy: healthy.len(),
                    total: t.pool.endpoints.len(),
                    cost_ms,
                }
            })
            .collect()
    }

    /// Recomputes the tier shares if they are older than [`REFRESH`]; one caller does.
    fn refresh(&self) {
        let now = now_ns();
        let at = self.computed_ns.load(Ordering::Relaxed);
        if (at == 0 || now.saturating_sub(at) >= REFRESH.as_nanos() as u64)
            && self
                .computed_ns
                .compare_exchange(at, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.recompute(now);
        }
    }

    /// Recomputes the tier shares and publishes them.
    fn recompute(&self, now: u64) {
        let stats = self.stats(now);
        let kinds: Vec<Tier> = self.tiers.iter().map(|t| t.tier).collect();
        let (shares, reason) = self.locality.place(&kinds, &stats, &self.plan.caller);
        self.reason.store(Arc::new(reason));
        let mut acc = 0.0;
        for (i, s) in shares.iter().enumerate() {
            acc += s;
            let c = if i + 1 == shares.len() {
                u32::MAX
            } else {
                (acc * SHARE_ONE).round() as u32
            };
            self.cum[i].store(c, Ordering::Relaxed);
            if let Some(g) = &self.tiers[i].share {
                g.set(*s);
            }
        }
    }

    /// The shares in effect, from the published cumulative ones.
    fn shares(&self) -> Vec<f64> {
        let mut prev = 0.0;
        self.cum[..self.tiers.len()]
            .iter()
            .map(|c| {
                let c = (c.load(Ordering::Relaxed) as f64).min(SHARE_ONE);
                let s = (c - prev) / SHARE_ONE;
                prev = c;
                s
            })
            .collect()
    }

    /// The locality as it stands now, for `/endpoints`.
    pub fn locality(&self) -> LocalityView {
        let now = now_ns();
        let (tiers, reason) = if self.tiers.len() > 1 {
            self.refresh();
            let (stats, shares) = (self.stats(now), self.shares());
            let reason = self.reason.load().to_string();
            let tiers = self
                .tiers
                .iter()
                .zip(stats)
                .zip(shares)
                .map(|((t, s), sh)| (t.tier, s, sh))
                .collect();
            (tiers, reason)
        } else {
            let stats = self.stats(now);
            let reason = match self.tiers.first() {
                Some(t) if t.tier == Tier::Any && !self.plan.on => "locality off".to_string(),
                Some(t) if t.tier == Tier::Any => {
                    "this sidecar's zone and region are unknown".to_string()
                }
                Some(t) => format!(
                    "{}: {} of {} endpoints healthy",
                    t.tier.describe(&self.plan.caller),
                    stats[0].healthy,
                    stats[0].total
                ),
                None => "no endpoints".to_string(),
            };
            let tiers = self
                .tiers
                .iter()
                .zip(stats)
                .map(|(t, s)| (t.tier, s, 1.0))
                .collect();
            (tiers, reason)
        };
        LocalityView {
            plan: self.plan.clone(),
            tiers,
            reason,
        }
    }
}

/// The endpoints of one tier, with the balancer's table over them.
struct Pool {
    endpoints: Vec<Arc<Endpoint>>,
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

impl Pool {
    fn new(endpoints: Vec<Arc<Endpoint>>, lb: Lb) -> Self {
        let table = match lb {
            Lb::RingHash if !endpoints.is_empty() => HashTable::Ring(build_ring(&endpoints)),
            Lb::Maglev if !endpoints.is_empty() => HashTable::Maglev(build_maglev(&endpoints)),
            _ => HashTable::None,
        };
        Pool {
            endpoints,
            lb,
            next: AtomicUsize::new(0),
            table,
        }
    }

    /// The balancer's choice, before health is considered.
    fn choose(&self, key: Option<u64>) -> usize {
        let n = self.endpoints.len();
        if n <= 1 {
            return 0;
        }
        match (&self.table, key) {
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
        }
    }

    /// The first endpoint from `i` on that `ok` accepts.
    fn from(&self, i: usize, ok: impl Fn(&Arc<Endpoint>) -> bool) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        (0..n).map(|k| &self.endpoints[(i + k) % n]).find(|e| ok(e))
    }
}

fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    (a, b)
}

/// The hash of a balancing key, stable across processes so a restart keeps keys in place.
/// The key a hash balancer picks by, for a request (its headers, when HTTP) from
/// `peer`; `None` for the other balancers.
pub fn request_key(
    lb: Lb,
    on: &ferry_policy::HashOn,
    headers: Option<&http::HeaderMap>,
    peer: std::net::SocketAddr,
) -> Option<u64> {
    if !lb.is_hash() {
        return None;
    }
    let header = match on {
        ferry_policy::HashOn::Header(h) => headers.and_then(|hs| hs.get(h.as_str())),
        ferry_policy::HashOn::SourceIp => None,
    };
    Some(header.map_or_else(|| hash_ip(peer.ip()), |v| hash_key(v.as_bytes())))
}

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
        (0..n).map(|i| endpoint(i, None)).collect()
    }

    fn endpoint(i: u16, zone: Option<&str>) -> Arc<Endpoint> {
        let m = Metrics::default();
        let addr: SocketAddr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
        let place = Place {
            zone: zone.map(Arc::from),
            region: zone.map(|_| Arc::from("r1")),
            node: None,
        };
        Arc::new(Endpoint::new(
            addr,
            place,
            Arc::from(Vec::new()),
            Some(StatusCounters::new(
                &m.endpoint_requests,
                "t".into(),
                addr.to_string(),
            )),
        ))
    }

    fn flat(eps: Vec<Arc<Endpoint>>, lb: Lb) -> EndpointSet {
        let state = LocalityState::new("t".into(), &Metrics::default());
        EndpointSet::new(eps, lb, &Plan::off(), &state)
    }

    /// Two endpoints in zone a, two in zone b (region r1); the caller is in zone a.
    fn zoned(lb: Lb) -> EndpointSet {
        let eps = vec![
            endpoint(0, Some("a")),
            endpoint(1, Some("a")),
            endpoint(2, Some("b")),
            endpoint(3, Some("b")),
        ];
        let plan = Plan {
            on: true,
            prefer_node: false,
            caller: Place {
                zone: Some("a".into()),
                region: Some("r1".into()),
                node: None,
            },
        };
        let state = LocalityState::new("t".into(), &Metrics::default());
        EndpointSet::new(eps, lb, &plan, &state)
    }

    fn owner(set: &EndpointSet, key: u64) -> SocketAddr {
        set.pick(Some(key), None).unwrap().addr
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let set = flat(endpoints(3), Lb::RoundRobin);
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
            let before = flat(all.clone(), lb);
            let after = flat(all[..4].to_vec(), lb);
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
    fn the_estimate_decays_once_a_sample() {
        // Half of a 100 ms estimate is left: a 10 ms sample moves it to 50 + 10 * 0.5.
        assert_eq!(next_estimate(100e6, 0.5, 10e6), 55e6);
        // Slower than what is left: the sample is the estimate (peak).
        assert_eq!(next_estimate(100e6, 0.5, 60e6), 60e6);
        // No time since the last sample: a faster one changes nothing yet.
        assert_eq!(next_estimate(100e6, 1.0, 10e6), 100e6);
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_endpoint() {
        let eps = endpoints(2);
        // The first response of each is left out (it paid for the connection).
        for _ in 0..2 {
            eps[0].observe(Duration::from_millis(200));
            eps[1].observe(Duration::from_micros(500));
        }
        let set = flat(eps, Lb::P2cEwma);
        for _ in 0..50 {
            assert_eq!(set.pick(None, None).unwrap().addr.port(), 9001);
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = endpoints(2);
        let _busy: Vec<_> = (0..3).map(|_| eps[0].start()).collect();
        let set = flat(eps.clone(), Lb::LeastRequest);
        assert_eq!(set.pick(None, None).unwrap().addr.port(), 9001);
        drop(_busy);
        assert_eq!(eps[0].in_flight(), 0);
    }

    #[test]
    fn an_endpoint_failing_to_connect_is_passed_over_until_it_recovers() {
        let set = flat(endpoints(2), Lb::RoundRobin);
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
        let set = flat(endpoints(2), Lb::Random);
        let first = set.endpoints[0].clone();
        for _ in 0..20 {
            assert_eq!(set.pick(None, Some(&first)).unwrap().addr.port(), 9001);
        }
    }

    #[tokio::test]
    async fn traffic_stays_in_zone_and_fails_over_when_the_zone_is_ejected() {
        for lb in Lb::ALL {
            let set = zoned(lb);
            let zone_of = |e: &Arc<Endpoint>| e.place.zone.as_deref().unwrap().to_string();
            for k in 0..200u64 {
                let key = lb.is_hash().then(|| hash_key(&k.to_le_bytes()));
                assert_eq!(zone_of(set.pick(key, None).unwrap()), "a", "{lb}");
            }
            for e in &set.endpoints[..2] {
                for _ in 0..EJECT_AFTER {
                    e.connect_failed();
                }
            }
            // Wait out the cached shares.
            tokio::time::sleep(REFRESH + Duration::from_millis(10)).await;
            for k in 0..200u64 {
                let key = lb.is_hash().then(|| hash_key(&k.to_le_bytes()));
                assert_eq!(zone_of(set.pick(key, None).unwrap()), "b", "{lb}");
            }
            let view = set.locality();
            assert_eq!(view.tiers[0].1.healthy, 0);
            assert_eq!(view.tiers[1].2, 1.0);
        }
    }

    #[test]
    fn a_retry_leaves_the_zone_when_its_other_endpoint_is_failing_too() {
        let set = zoned(Lb::RoundRobin);
        let (a0, a1) = (&set.endpoints[0], &set.endpoints[1]);
        // Both of zone a's endpoints refused once (not yet ejected).
        a0.failures.store(1, Ordering::Relaxed);
        a1.failures.store(1, Ordering::Relaxed);
        for _ in 0..10 {
            let next = set.pick(None, Some(a0)).unwrap();
            assert_eq!(next.place.zone.as_deref(), Some("b"));
        }
        assert_eq!(set.tier_of(a0), Tier::Zone);
        assert_eq!(set.tier_of(&set.endpoints[2]), Tier::Region);
    }
}
