//! Locality: which endpoints are near this sidecar, and how much traffic each tier of
//! nearness gets.
//!
//! Endpoints fall into tiers: the caller's node (only when the Service asks for
//! `PreferSameNode`), its zone, its region, anywhere else. Traffic fills the nearest
//! tier up to its health and spills the rest outward, by Envoy's overprovisioning rule:
//! a tier's health is `min(1, 1.4 × healthy / total)`, so a zone that loses a third of
//! its endpoints still takes everything, and one that loses more hands the difference
//! to the next. Beyond that rule, a tier whose latency estimate is far above the next
//! tier's is overloaded and sheds a growing share to it until the estimates meet again.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{Metrics, TierLabels};

pub type ShareGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Where something runs. Empty fields are unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Place {
    pub region: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub node: Option<Arc<str>>,
}

impl Place {
    pub fn from_policy(l: &ferry_policy::Locality) -> Place {
        Place {
            region: l.region.as_deref().map(Arc::from),
            zone: l.zone.as_deref().map(Arc::from),
            node: None,
        }
    }

    /// `self` with the fields `over` knows replaced (annotations over node labels).
    pub fn overridden_by(&self, over: &Place) -> Place {
        Place {
            region: over.region.clone().or_else(|| self.region.clone()),
            zone: over.zone.clone().or_else(|| self.zone.clone()),
            node: over.node.clone().or_else(|| self.node.clone()),
        }
    }
}

/// How a service's endpoints are tiered for this sidecar.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The `locality` setting; off balances over every endpoint alike.
    pub on: bool,
    /// The Service's `trafficDistribution: PreferSameNode`.
    pub prefer_node: bool,
    pub caller: Place,
}

impl Plan {
    pub fn off() -> Plan {
        Plan::default()
    }

    pub fn mode(&self) -> &'static str {
        match (self.on, self.prefer_node) {
            (false, _) => "off",
            (true, true) => "prefer-node",
            (true, false) => "prefer-zone",
        }
    }

    /// Whether anything is known of the caller to be near to.
    fn applies(&self) -> bool {
        self.on
            && (self.caller.zone.is_some()
                || self.caller.region.is_some()
                || (self.prefer_node && self.caller.node.is_some()))
    }

    /// Each endpoint's tier. `hints` are the zones an EndpointSlice hints each endpoint
    /// for; they count only when every endpoint has some and one names the caller's
    /// zone (kube-proxy's rule), and then they decide the zone tier.
    pub fn tiers(&self, places: &[(&Place, &[Arc<str>])]) -> Vec<Tier> {
        if !self.applies() {
            return vec![Tier::Any; places.len()];
        }
        let c = &self.caller;
        let use_hints = c.zone.as_ref().is_some_and(|z| {
            places.iter().all(|(_, h)| !h.is_empty()) && places.iter().any(|(_, h)| h.contains(z))
        });
        places
            .iter()
            .map(|(p, hints)| {
                if self.prefer_node && c.node.is_some() && p.node == c.node {
                    return Tier::Node;
                }
                let same_zone = if use_hints {
                    c.zone.as_ref().is_some_and(|z| hints.contains(z))
                } else {
                    c.zone.is_some()
                        && p.zone == c.zone
                        && (c.region.is_none() || p.region.is_none() || p.region == c.region)
                };
                if same_zone {
                    Tier::Zone
                } else if c.region.is_some() && p.region == c.region {
                    Tier::Region
                } else {
                    Tier::Other
                }
            })
            .collect()
    }
}

/// A tier of nearness, nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Node,
    Zone,
    Region,
    Other,
    /// Locality does not apply: off, or nothing known of the caller.
    Any,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Node => "node",
            Tier::Zone => "zone",
            Tier::Region => "region",
            Tier::Other => "other",
            Tier::Any => "any",
        }
    }

    /// The tier as a user would name it from where the caller is: `zone eu-west-1a`.
    pub fn describe(self, caller: &Place) -> String {
        let named = |kind: &str, v: &Option<Arc<str>>| match v {
            Some(v) => format!("{kind} {v}"),
            None => kind.to_string(),
        };
        match self {
            Tier::Node => named("node", &caller.node),
            Tier::Zone => named("zone", &caller.zone),
            Tier::Region => format!("{} (other zones)", named("region", &caller.region)),
            Tier::Other => "other regions".into(),
            Tier::Any => "all endpoints".into(),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Envoy's overprovisioning factor: a tier takes all its share while 1/1.4 (71%) of
/// its endpoints are healthy.
const OVERPROVISION: f64 = 1.4;
/// The nearest tier is overloaded when its latency estimate exceeds the next tier's
/// by this factor plus [`OVERLOAD_MARGIN_MS`]; the margin keeps sub-millisecond noise
/// from moving traffic across zones.
const OVERLOAD_FACTOR: f64 = 2.0;
const OVERLOAD_MARGIN_MS: f64 = 10.0;
/// Against a tier with no latency known yet, the near tier is overloaded above this.
const OVERLOAD_UNKNOWN_MS: f64 = 100.0;
/// Spill moves by a tenth of the traffic per recomputation (every 100 ms), so a
/// shift takes about a second and a blip moves little.
const SPILL_STEP: u32 = 100;
/// A tenth of the traffic stays on an overloaded tier, so its latency keeps being
/// measured and traffic comes back as soon as it recovers.
const SPILL_MAX: u32 = 900;

/// What a tier looks like at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TierStats {
    pub healthy: usize,
    pub total: usize,
    /// The latency estimate (× requests in flight) of its cheapest healthy endpoint
    /// that has answered, in ms; `None` when none has.
    pub cost_ms: Option<f64>,
}

/// Shares of traffic per tier (summing to 1), by the overprovisioning rule, before any
/// spill for overload. With no healthy endpoint anywhere, the nearest tier takes all.
pub fn shares(stats: &[TierStats]) -> Vec<f64> {
    let health: Vec<f64> = stats
        .iter()
        .map(|s| {
            if s.total == 0 {
                0.0
            } else {
                (OVERPROVISION * s.healthy as f64 / s.total as f64).min(1.0)
            }
        })
        .collect();
    let sum: f64 = health.iter().sum();
    let mut out = vec![0.0; stats.len()];
    if sum <= 0.0 {
        if let Some(first) = out.first_mut() {
            *first = 1.0;
        }
        return out;
    }
    // Below a total health of 1 the shares are scaled up to fill it (Envoy's
    // normalised total health), so a degraded service still takes all its traffic.
    let scale = if sum < 1.0 { 1.0 / sum } else { 1.0 };
    let mut left = 1.0;
    for (o, h) in out.iter_mut().zip(&health) {
        let take = (h * scale).min(left);
        *o = take;
        left -= take;
    }
    out
}

/// A service's locality state that outlives endpoint sets and policy versions: the
/// overload spill, the last logged traffic placement, and the metric handles.
pub struct LocalityState {
    pub service: Arc<str>,
    /// Share of the primary tier's traffic sent on to the next, in thousandths.
    spill: AtomicU32,
    /// Where traffic went at the last computation: the primary tier's kind in bits
    /// 0-7, bit 8 set while spilling, bits 16.. the kinds getting traffic; `u32::MAX`
    /// before the first. Kinds, not positions: a tier that empties shifts positions.
    placed: AtomicU32,
    metrics: Metrics,
}

impl LocalityState {
    pub fn new(service: Arc<str>, metrics: &Metrics) -> Arc<LocalityState> {
        Arc::new(LocalityState {
            service,
            spill: AtomicU32::new(0),
            placed: AtomicU32::new(u32::MAX),
            metrics: metrics.clone(),
        })
    }

    /// Metric handles for a tier of `endpoints` endpoints; none for `Any`, which would
    /// repeat the request counters under another name.
    pub fn handles(&self, tier: Tier, endpoints: usize) -> Option<(Counter, ShareGauge)> {
        if tier == Tier::Any {
            return None;
        }
        let labels = TierLabels {
            service: self.service.to_string(),
            tier: tier.as_str(),
        };
        self.metrics
            .locality_endpoints
            .get_or_create(&labels)
            .set(endpoints as i64);
        Some((
            self.metrics
                .locality_requests
                .get_or_create(&labels)
                .clone(),
            self.metrics.locality_share.get_or_create(&labels).clone(),
        ))
    }

    /// Zeroes the gauges of tiers a new endpoint set no longer has.
    pub fn tiers_now(&self, present: &[Tier]) {
        for tier in [Tier::Node, Tier::Zone, Tier::Region, Tier::Other] {
            if present.contains(&tier) {
                continue;
            }
            let labels = TierLabels {
                service: self.service.to_string(),
                tier: tier.as_str(),
            };
            // Only tiers that had series: a flat service never grows any.
            if let Some(g) = self.metrics.locality_endpoints.get(&labels) {
                g.set(0);
            }
            if let Some(g) = self.metrics.locality_share.get(&labels) {
                g.set(0.0);
            }
        }
    }

    /// Final shares for `tiers` with their `stats`: the overprovisioning rule, then the
    /// overload spill from the primary tier to the next healthy one. Also logs, once per
    /// change, where traffic went and why. Returns the shares and the reason.
    pub fn place(&self, tiers: &[Tier], stats: &[TierStats], caller: &Place) -> (Vec<f64>, String) {
        let mut share = shares(stats);
        let primary = share.iter().position(|s| *s > 0.0).unwrap_or(0);
        let before = self.placed.load(Ordering::Relaxed);
        let kind = tiers[primary] as u32;
        if before != u32::MAX && before & 0xff != kind {
            // Spill belongs to the tier that was primary; a failover starts afresh.
            self.spill.store(0, Ordering::Relaxed);
        }
        let next = (primary + 1..stats.len()).find(|&i| stats[i].healthy > 0);
        let mut reason = String::new();
        let mut spill = 0;
        if let Some(q) = next
            && share[primary] >= 1.0
            && stats[primary].healthy > 0
        {
            let p_ms = stats[primary].cost_ms.unwrap_or(0.0);
            let q_ms = stats[q].cost_ms;
            let overloaded = match q_ms {
                Some(q_ms) => p_ms > OVERLOAD_FACTOR * q_ms + OVERLOAD_MARGIN_MS,
                None => p_ms > OVERLOAD_UNKNOWN_MS,
            };
            let cur = self.spill.load(Ordering::Relaxed);
            spill = if overloaded {
                (cur + SPILL_STEP).min(SPILL_MAX)
            } else {
                cur.saturating_sub(SPILL_STEP)
            };
            self.spill.store(spill, Ordering::Relaxed);
            if spill > 0 {
                let f = spill as f64 / 1000.0;
                share[primary] -= f;
                share[q] += f;
                let q_text = q_ms.map_or("unknown".to_string(), |q| format!("{q:.1} ms"));
                reason = format!(
                    "{} {} (latency estimate {p_ms:.1} ms vs {q_text} in {}); {:.0}% to {}",
                    tiers[primary].describe(caller),
                    if overloaded {
                        "overloaded"
                    } else {
                        "recovering"
                    },
                    tiers[q].describe(caller),
                    f * 100.0,
                    tiers[q].describe(caller),
                );
            }
        } else {
            self.spill.store(0, Ordering::Relaxed);
        }
        if spill == 0 {
            let s = &stats[primary];
            reason = format!(
                "{}: {} of {} endpoints healthy",
                tiers[primary].describe(caller),
                s.healthy,
                s.total
            );
            // Say why each nearer tier gets nothing.
            for near in (0..primary).rev().filter(|&i| stats[i].total > 0) {
                let n = &stats[near];
                reason = format!(
                    "{}: {} of {} endpoints healthy; {}",
                    tiers[near].describe(caller),
                    n.healthy,
                    n.total,
                    reason
                );
            }
            let elsewhere: Vec<String> = share
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != primary && **s > 0.0)
                .map(|(i, s)| format!("{:.0}% to {}", s * 100.0, tiers[i].describe(caller)))
                .collect();
            if !elsewhere.is_empty() {
                reason = format!("{reason}; {}", elsewhere.join(", "));
            }
        }
        let receiving = share
            .iter()
            .zip(tiers)
            .filter(|(s, _)| **s > 0.0)
            .fold(0u32, |b, (_, t)| b | 1 << *t as u32);
        let now = kind | u32::from(spill > 0) << 8 | receiving << 16;
        if before != now {
            self.placed.store(now, Ordering::Relaxed);
            let service = &*self.service;
            // All traffic in the nearest tier there is.
            let home = primary == 0 && receiving == 1 << kind;
            let (was_kind, was_spilling) = (before & 0xff, before & 1 << 8 != 0);
            let first = before == u32::MAX;
            if first {
                if !home {
                    tracing::info!(service, "locality failover: {reason}");
                }
            } else if kind < was_kind || (home && (was_spilling || before >> 16 != receiving)) {
                tracing::info!(service, "locality return: {reason}");
            } else if kind > was_kind {
                tracing::info!(service, "locality failover: {reason}");
            } else if spill > 0 && !was_spilling {
                tracing::info!(service, "locality spill: {reason}");
            } else if spill == 0 && before >> 16 != receiving {
                // Part of the traffic moved for health (a tier lost some endpoints).
                tracing::info!(service, "locality failover: {reason}");
            }
        }
        (share, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(zone: &str, region: &str) -> Place {
        Place {
            zone: Some(zone.into()),
            region: Some(region.into()),
            node: None,
        }
    }

    fn stats(healthy: usize, total: usize) -> TierStats {
        TierStats {
            healthy,
            total,
            cost_ms: Some(1.0),
        }
    }

    #[test]
    fn tiers_follow_zone_then_region() {
        let plan = Plan {
            on: true,
            prefer_node: false,
            caller: place("a", "r1"),
        };
        let (a, b, c, unknown) = (
            place("a", "r1"),
            place("b", "r1"),
            place("c", "r2"),
            Place::default(),
        );
        let got = plan.tiers(&[(&a, &[]), (&b, &[]), (&c, &[]), (&unknown, &[])]);
        assert_eq!(got, [Tier::Zone, Tier::Region, Tier::Other, Tier::Other]);
        let off = Plan { on: false, ..plan };
        assert_eq!(off.tiers(&[(&a, &[])]), [Tier::Any]);
        let nowhere = Plan {
            on: true,
            ..Plan::default()
        };
        assert_eq!(nowhere.tiers(&[(&a, &[])]), [Tier::Any]);
    }

    #[test]
    fn hints_decide_the_zone_tier_only_when_every_endpoint_has_them() {
        let plan = Plan {
            on: true,
            prefer_node: false,
            caller: place("a", "r1"),
        };
        let (a, b) = (place("a", "r1"), place("b", "r1"));
        let ha: [Arc<str>; 1] = ["a".into()];
        let hb: [Arc<str>; 1] = ["b".into()];
        // The controller hinted b's endpoint for zone a: it is local for this caller.
        assert_eq!(
            plan.tiers(&[(&a, &hb), (&b, &ha)]),
            [Tier::Region, Tier::Zone]
        );
        // One endpoint without hints: hints are ignored.
        assert_eq!(
            plan.tiers(&[(&a, &[]), (&b, &ha)]),
            [Tier::Zone, Tier::Region]
        );
    }

    #[test]
    fn prefer_node_puts_the_callers_node_first() {
        let mut caller = place("a", "r1");
        caller.node = Some("n1".into());
        let plan = Plan {
            on: true,
            prefer_node: true,
            caller,
        };
        let mut same = place("a", "r1");
        same.node = Some("n1".into());
        let mut other = place("a", "r1");
        other.node = Some("n2".into());
        assert_eq!(
            plan.tiers(&[(&other, &[]), (&same, &[])]),
            [Tier::Zone, Tier::Node]
        );
    }

    #[test]
    fn overprovisioning_keeps_traffic_near_until_a_third_is_lost() {
        assert_eq!(shares(&[stats(3, 3), stats(3, 3)]), [1.0, 0.0]);
        // 2 of 3 healthy: 1.4 × 0.67 = 0.93 stays, 0.07 spills.
        let s = shares(&[stats(2, 3), stats(3, 3)]);
        assert!(
            (s[0] - 0.9333).abs() < 1e-3 && (s[1] - 0.0667).abs() < 1e-3,
            "{s:?}"
        );
        assert_eq!(
            shares(&[stats(0, 2), stats(2, 2), stats(2, 2)]),
            [0.0, 1.0, 0.0]
        );
        assert_eq!(
            shares(&[stats(0, 2), stats(0, 2), stats(2, 2)]),
            [0.0, 0.0, 1.0]
        );
        // Everything degraded: shares are scaled up to carry all the traffic.
        let s = shares(&[stats(1, 4), stats(1, 4)]);
        assert!(
            (s[0] - 0.5).abs() < 1e-9 && (s[1] - 0.5).abs() < 1e-9,
            "{s:?}"
        );
        // Nothing healthy anywhere: the nearest tier keeps it.
        assert_eq!(shares(&[stats(0, 2), stats(0, 1)]), [1.0, 0.0]);
    }

    #[test]
    fn an_overloaded_tier_spills_step_by_step_and_comes_back() {
        let state = LocalityState::new("echo".into(), &Metrics::default());
        let tiers = [Tier::Zone, Tier::Region];
        let caller = place("a", "r1");
        let slow = [
            TierStats {
                healthy: 2,
                total: 2,
                cost_ms: Some(200.0),
            },
            stats(2, 2),
        ];
        let mut last = 0.0;
        for _ in 0..5 {
            let (s, why) = state.place(&tiers, &slow, &caller);
            assert!(s[1] > last, "{s:?}");
            assert!(why.contains("overloaded"), "{why}");
            last = s[1];
        }
        // Never more than nine tenths: the slow tier stays measured.
        for _ in 0..20 {
            state.place(&tiers, &slow, &caller);
        }
        let (s, _) = state.place(&tiers, &slow, &caller);
        assert!((s[0] - 0.1).abs() < 1e-9, "{s:?}");
        let fine = [stats(2, 2), stats(2, 2)];
        for _ in 0..9 {
            state.place(&tiers, &fine, &caller);
        }
        assert_eq!(state.place(&tiers, &fine, &caller).0, [1.0, 0.0]);
        // Against a tier never measured, only a clearly slow one spills.
        let unknown = |ms| {
            [
                TierStats {
                    healthy: 2,
                    total: 2,
                    cost_ms: Some(ms),
                },
                TierStats {
                    healthy: 2,
                    total: 2,
                    cost_ms: None,
                },
            ]
        };
        assert_eq!(state.place(&tiers, &unknown(40.0), &caller).0, [1.0, 0.0]);
        assert!(state.place(&tiers, &unknown(200.0), &caller).0[1] > 0.0);
    }
}
