//! Prometheus metrics for the data plane.
//!
//! Handles are resolved when a service or endpoint is built, never per request, and
//! the latency histogram is a set of atomics: recording takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub listener: String,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub service: String,
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric the proxy records, registered once.
#[derive(Clone, Default)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<ServiceLabels, AtomicHistogram>,
    pub errors: Family<ErrorLabels, Counter>,
    pub connections: Family<ConnLabels, Counter>,
    pub policy_reloads: Counter,
    pub passthrough: Family<ReasonLabels, Counter>,
    pub locality_requests: Family<TierLabels, Counter>,
    pub locality_share: Family<TierLabels, Gauge<f64, AtomicU64>>,
    pub locality_endpoints: Family<TierLabels, Gauge>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferry_requests",
            "HTTP and gRPC requests proxied, by service, endpoint and response status",
            self.requests.clone(),
        );
        registry.register(
            "ferry_request_duration_seconds",
            "Time from request to response headers, by service",
            self.duration.clone(),
        );
        registry.register(
            "ferry_errors",
            "Responses made by the proxy itself, by service and reason",
            self.errors.clone(),
        );
        registry.register(
            "ferry_tcp_connections",
            "Connections accepted, by listener and detected protocol",
            self.connections.clone(),
        );
        registry.register(
            "ferry_discovery_passthrough",
            "Connections sent to their original destination because discovery did not know it \
             (not-a-service: a pod IP, headless Service, outside the cluster; \
             discovery-unavailable: no answer from the controller)",
            self.passthrough.clone(),
        );
        registry.register(
            "ferry_locality_requests",
            "Requests by the locality tier of the endpoint chosen (node, zone, region, other)",
            self.locality_requests.clone(),
        );
        registry.register(
            "ferry_locality_share",
            "Share of a service's traffic planned for each locality tier (0 to 1)",
            self.locality_share.clone(),
        );
        registry.register(
            "ferry_locality_endpoints",
            "Endpoints of a service in each locality tier",
            self.locality_endpoints.clone(),
        );
    }

    pub fn passthrough(&self, reason: &'static str) {
        self.passthrough
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn error(&self, service: &str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }
}

/// Counters of one endpoint's responses, one lazily created slot per status code.
pub struct StatusCounters {
    family: Family<RequestLabels, Counter>,
    service: Arc<str>,
    endpoint: String,
    slots: Box<[OnceLock<Counter>]>,
}

impl StatusCounters {
    pub fn new(
        family: &Family<RequestLabels, Counter>,
        service: Arc<str>,
        endpoint: String,
    ) -> Self {
        Self {
            family: family.clone(),
            service,
            endpoint,
            slots: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn inc(&self, status: u16) {
        let slot = status
            .checked_sub(100)
            .and_then(|i| self.slots.get(i as usize));
        match slot {
            Some(slot) => slot.get_or_init(|| self.create(status)).inc(),
            None => self.create(status).inc(),
        };
    }

    fn create(&self, status: u16) -> Counter {
        self.family
            .get_or_create(&RequestLabels {
                service: self.service.to_string(),
                endpoint: self.endpoint.clone(),
                status,
            })
            .clone()
    }
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free histogram of seconds with fixed buckets.
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug, Default)]
struct HistogramInner {
    /// One more than `BUCKETS`: the last is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, c) in self.0.counts.iter().enumerate() {
            let bound = BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            buckets.push((bound, c.load(Ordering::Relaxed)));
        }
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.0.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_and_counters_encode_as_prometheus_text() {
        let m = Metrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let h = m
            .duration
            .get_or_create(&ServiceLabels {
                service: "web".into(),
            })
            .clone();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let sc = StatusCounters::new(&m.requests, "web".into(), "127.0.0.1:1".into());
        sc.inc(200);
        sc.inc(200);
        sc.inc(999);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(
                r#"ferry_requests_total{service="web",endpoint="127.0.0.1:1",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"status="999"} 1"#), "{text}");
        assert!(
            text.contains(r#"ferry_request_duration_seconds_bucket{le="0.005",service="web"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ferry_request_duration_seconds_count{service="web"} 2"#),
            "{text}"
        );
    }
}
