//! Prometheus metrics for the data plane.
//!
//! Handles are resolved when a service or endpoint is built, never per request, and
//! the latency histogram is a set of atomics: recording takes no lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// A finished call: where it went and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub direction: &'static str,
    pub service: String,
    pub route: String,
    pub status_code: u16,
    /// The gRPC status from trailers (or a trailers-only response); empty for HTTP.
    pub grpc_status: &'static str,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub service: String,
    pub route: String,
    pub classification: &'static str,
}

/// Istio's standard labels (`metrics-compat: istio`), so Istio and Kiali dashboards work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_app: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Who this sidecar's pod is, for Istio's labels: from the injector's environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub app: String,
}

impl Workload {
    /// `FERRY_WORKLOAD`, `FERRY_POD_NAMESPACE` and `OTEL_SERVICE_NAME`; `unknown` where unset.
    pub fn from_env() -> Workload {
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "unknown".into())
        };
        Workload {
            name: var("FERRY_WORKLOAD"),
            namespace: var("FERRY_POD_NAMESPACE"),
            app: var("OTEL_SERVICE_NAME"),
        }
    }
}

/// Per-endpoint series, only with `metrics-endpoint-labels: true`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
    pub status_code: u16,
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

/// The `direction` label of a call's or a connection's series.
pub fn direction(inbound: bool) -> &'static str {
    if inbound { "inbound" } else { "outbound" }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    pub reason: &'static str,
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
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<CallLabels, Counter>,
    pub duration: Family<DurationLabels, AtomicHistogram>,
    pub endpoint_requests: Family<EndpointLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub connections: Family<ConnLabels, Counter>,
    pub policy_reloads: Counter,
    pub passthrough: Family<ReasonLabels, Counter>,
    pub locality_requests: Family<TierLabels, Counter>,
    pub locality_share: Family<TierLabels, Gauge<f64, AtomicU64>>,
    pub locality_endpoints: Family<TierLabels, Gauge>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_open: Family<TcpLabels, Gauge>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub discovery_destinations: Gauge,
    pub istio_requests: Family<IstioLabels, Counter>,
    pub istio_duration: Family<IstioLabels, AtomicHistogram, fn() -> AtomicHistogram>,
    pub workload: Arc<Workload>,
    /// Per service: how many live [`ServiceSeries`] guards it has, and the request
    /// series made for it, so a service that is gone takes them along.
    by_service: Arc<std::sync::Mutex<HashMap<String, Tracked>>>,
}

/// Live guards of a service, and its series.
type Tracked = (usize, HashSet<Series>);

/// Held by each compiled version of a service; when the last one of a name is dropped
/// (no policy names it, no connection uses it), its request series are removed, so
/// series do not pile up with every destination ever called.
pub struct ServiceSeries {
    metrics: Metrics,
    service: String,
}

impl Drop for ServiceSeries {
    fn drop(&mut self) {
        let gone = {
            let mut m = self.metrics.by_service.lock().expect("series map poisoned");
            match m.get_mut(&self.service) {
                Some((n, _)) if *n > 1 => {
                    *n -= 1;
                    None
                }
                _ => m.remove(&self.service).map(|(_, s)| s),
            }
        };
        for series in gone.into_iter().flatten() {
            match series {
                Series::Call(l) => self.metrics.requests.remove(&l),
                Series::Duration(l) => self.metrics.duration.remove(&l),
                Series::Istio(l) => {
                    self.metrics.istio_requests.remove(&l);
                    self.metrics.istio_duration.remove(&l)
                }
            };
        }
    }
}

/// One series of a per-service family.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Series {
    Call(CallLabels),
    Duration(DurationLabels),
    Istio(IstioLabels),
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Workload::default())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// Istio's `istio_request_duration_milliseconds` buckets.
const ISTIO_BUCKETS: [f64; 18] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn istio_histogram() -> AtomicHistogram {
    AtomicHistogram::with_bounds(&ISTIO_BUCKETS, 1000.0)
}

impl Metrics {
    pub fn new(workload: Workload) -> Metrics {
        Metrics {
            requests: Default::default(),
            duration: Default::default(),
            endpoint_requests: Default::default(),
            errors: Default::default(),
            connections: Default::default(),
            policy_reloads: Default::default(),
            passthrough: Default::default(),
            locality_requests: Default::default(),
            locality_share: Default::default(),
            locality_endpoints: Default::default(),
            tcp_opened: Default::default(),
            tcp_closed: Default::default(),
            tcp_open: Default::default(),
            tcp_received: Default::default(),
            tcp_sent: Default::default(),
            retries: Default::default(),
            budget_exhausted: Default::default(),
            ejections: Default::default(),
            discovery_destinations: Default::default(),
            istio_requests: Default::default(),
            istio_duration: Family::new_with_constructor(istio_histogram),
            workload: Arc::new(workload),
            by_service: Default::default(),
        }
    }

    /// Notes a series of `service`'s, made on a slow path (once per series).
    fn track(&self, service: &str, series: Series) {
        let mut m = self.by_service.lock().expect("series map poisoned");
        m.entry(service.to_string()).or_default().1.insert(series);
    }

    /// A guard that keeps `service`'s request series while it lives.
    pub fn service_series(&self, service: &str) -> ServiceSeries {
        let mut m = self.by_service.lock().expect("series map poisoned");
        m.entry(service.to_string()).or_default().0 += 1;
        ServiceSeries {
            metrics: self.clone(),
            service: service.to_string(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferry_requests",
            "HTTP and gRPC calls proxied, by direction, service, route, HTTP status, gRPC \
             status (from trailers) and classification (failure: 5xx, a gRPC status other \
             than OK, or a response ferry made)",
            self.requests.clone(),
        );
        registry.register(
            "ferry_request_duration_seconds",
            "Time from request to the end of the response body (the whole call, streams \
             included), by direction, service, route and classification",
            self.duration.clone(),
        );
        registry.register(
            "ferry_endpoint_requests",
            "Calls by endpoint and HTTP status (only with metrics-endpoint-labels: true; \
             series of endpoints that are gone expire)",
            self.endpoint_requests.clone(),
        );
        registry.register(
            "ferry_policy_reloads",
            "Policies applied after the first (admin API, files, SIGHUP)",
            self.policy_reloads.clone(),
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
            "istio_requests",
            "Istio's request counter with its standard labels (metrics-compat: istio only)",
            self.istio_requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Istio's request duration with its standard labels (metrics-compat: istio only)",
            self.istio_duration.clone(),
        );
        registry.register(
            "ferry_tcp_opened",
            "Opaque TCP connections and CONNECT tunnels proxied, by direction and service",
            self.tcp_opened.clone(),
        );
        registry.register(
            "ferry_tcp_closed",
            "Opaque TCP connections and CONNECT tunnels ended, by direction and service",
            self.tcp_closed.clone(),
        );
        registry.register(
            "ferry_tcp_open_connections",
            "Opaque TCP connections and CONNECT tunnels open now, by direction and service",
            self.tcp_open.clone(),
        );
        registry.register(
            "ferry_tcp_received_bytes",
            "Bytes received from clients on opaque TCP connections and CONNECT tunnels",
            self.tcp_received.clone(),
        );
        registry.register(
            "ferry_tcp_sent_bytes",
            "Bytes sent to clients on opaque TCP connections and CONNECT tunnels",
            self.tcp_sent.clone(),
        );
        registry.register(
            "ferry_retries",
            "Requests retried on another endpoint, by service and reason",
            self.retries.clone(),
        );
        registry.register(
            "ferry_retry_budget_exhausted",
            "Retries not made because the service's retry budget was spent",
            self.budget_exhausted.clone(),
        );
        registry.register(
            "ferry_ejections",
            "Endpoints passed over after consecutive connection failures, by service",
            self.ejections.clone(),
        );
        registry.register(
            "ferry_discovery_destinations",
            "Destinations followed through the discovery controller",
            self.discovery_destinations.clone(),
        );
        registry.register(
            "ferry_locality_endpoints",
            "Endpoints of a service in each locality tier",
            self.locality_endpoints.clone(),
        );
    }

    pub fn retry(&self, service: &str, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }

    pub fn budget_exhausted(&self, service: &str) {
        self.budget_exhausted
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .inc();
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
/// Their series are removed when the endpoint is gone, so rollouts do not grow them.
pub struct StatusCounters {
    family: Family<EndpointLabels, Counter>,
    service: Arc<str>,
    endpoint: String,
    slots: Box<[OnceLock<Counter>]>,
}

impl StatusCounters {
    pub fn new(
        family: &Family<EndpointLabels, Counter>,
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

    fn labels(&self, status_code: u16) -> EndpointLabels {
        EndpointLabels {
            service: self.service.to_string(),
            endpoint: self.endpoint.clone(),
            status_code,
        }
    }

    fn create(&self, status: u16) -> Counter {
        self.family.get_or_create(&self.labels(status)).clone()
    }
}

impl Drop for StatusCounters {
    fn drop(&mut self) {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.get().is_some() {
                self.family.remove(&self.labels(100 + i as u16));
            }
        }
    }
}

/// gRPC status codes as label values, so a label costs no allocation.
const GRPC_CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// HTTP statuses with a preallocated counter slot; others take the family's map.
const COMMON: [u16; 16] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504,
];

/// Whether a call failed, as dashboards count it: a 5xx, a gRPC status other than OK.
pub fn is_failure(status: u16, grpc: Option<u8>) -> bool {
    status >= 500 || grpc.is_some_and(|g| g != 0)
}

/// The metric handles of one service, route and direction, resolved once; recording a
/// call with a common status is a few atomic adds and no allocation.
pub struct RouteMetrics {
    metrics: Metrics,
    direction: &'static str,
    service: String,
    route: String,
    http: [OnceLock<Counter>; COMMON.len()],
    /// HTTP 200 with a gRPC status, by code.
    grpc: [OnceLock<Counter>; GRPC_CODES.len()],
    success: AtomicHistogram,
    failure: AtomicHistogram,
    istio: Option<Istio>,
}

/// Istio's series for one service and direction; made per call outcome, kept per slot.
struct Istio {
    base: IstioLabels,
    service: String,
    metrics: Metrics,
    /// HTTP statuses of `COMMON`, then gRPC codes with 200.
    slots: [OnceLock<(Counter, AtomicHistogram)>; COMMON.len() + GRPC_CODES.len()],
}

impl Istio {
    fn new(metrics: &Metrics, direction: &'static str, service: &str) -> Istio {
        let w = &metrics.workload;
        let unknown = || "unknown".to_string();
        // A Kubernetes Service's name is `name.namespace`.
        let (svc_name, svc_ns) = match service.split_once('.') {
            Some((n, ns)) if !service.contains(':') => (n.to_string(), ns.to_string()),
            _ => (service.to_string(), unknown()),
        };
        let fqdn = if svc_ns == "unknown" {
            service.to_string()
        } else {
            format!("{svc_name}.{svc_ns}.svc.cluster.local")
        };
        let outbound = direction == "outbound";
        let base = IstioLabels {
            reporter: if outbound { "source" } else { "destination" },
            source_workload: if outbound { w.name.clone() } else { unknown() },
            source_workload_namespace: if outbound {
                w.namespace.clone()
            } else {
                unknown()
            },
            source_app: if outbound { w.app.clone() } else { unknown() },
            destination_workload: if outbound { unknown() } else { w.name.clone() },
            destination_workload_namespace: if outbound {
                svc_ns.clone()
            } else {
                w.namespace.clone()
            },
            destination_app: if outbound { unknown() } else { w.app.clone() },
            destination_service: if outbound { fqdn } else { unknown() },
            destination_service_name: if outbound { svc_name } else { unknown() },
            destination_service_namespace: if outbound {
                svc_ns
            } else {
                w.namespace.clone()
            },
            request_protocol: "http",
            response_code: 0,
            grpc_response_status: "",
            response_flags: "-",
            connection_security_policy: "none",
        };
        Istio {
            base,
            service: service.to_string(),
            metrics: metrics.clone(),
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn handles(
        &self,
        status: u16,
        grpc: Option<u8>,
        flags: &'static str,
    ) -> (Counter, AtomicHistogram) {
        let mut l = self.base.clone();
        l.request_protocol = if grpc.is_some() { "grpc" } else { "http" };
        l.response_code = status;
        l.grpc_response_status = grpc
            .and_then(|g| GRPC_CODES.get(g as usize).copied())
            .unwrap_or("");
        l.response_flags = flags;
        let handles = (
            self.metrics.istio_requests.get_or_create(&l).clone(),
            self.metrics.istio_duration.get_or_create(&l).clone(),
        );
        self.metrics.track(&self.service, Series::Istio(l));
        handles
    }

    fn record(
        &self,
        status: u16,
        grpc: Option<u8>,
        flags: &'static str,
        elapsed: std::time::Duration,
    ) {
        let slot = match (grpc, flags) {
            (_, f) if f != "-" => None,
            (Some(g), _) if status == 200 => self.slots.get(COMMON.len() + g as usize),
            (Some(_), _) => None,
            (None, _) => COMMON
                .iter()
                .position(|c| *c == status)
                .map(|i| &self.slots[i]),
        };
        let owned;
        let (c, h) = match slot {
            Some(s) => s.get_or_init(|| self.handles(status, grpc, flags)),
            None => {
                owned = self.handles(status, grpc, flags);
                &owned
            }
        };
        c.inc();
        h.observe(elapsed);
    }
}

/// Envoy's response flags for the responses ferry makes, as Istio reports them.
pub fn response_flags(ferry_error: Option<&'static str>) -> &'static str {
    match ferry_error {
        None => "-",
        Some("timeout") => "UT",
        Some("connect-failed") | Some("connect-timeout") => "UF",
        Some("no-endpoints") => "UH",
        Some("upstream-reset") => "UR",
        Some(_) => "DPE",
    }
}

impl RouteMetrics {
    /// `istio`: also export Istio's series (`metrics-compat: istio`).
    pub fn new(
        metrics: &Metrics,
        direction: &'static str,
        service: &str,
        route: &str,
        istio: bool,
    ) -> Self {
        let hist = |classification| {
            let l = DurationLabels {
                direction,
                service: service.to_string(),
                route: route.to_string(),
                classification,
            };
            let h = metrics.duration.get_or_create(&l).clone();
            metrics.track(service, Series::Duration(l));
            h
        };
        RouteMetrics {
            metrics: metrics.clone(),
            direction,
            service: service.to_string(),
            route: route.to_string(),
            http: Default::default(),
            grpc: Default::default(),
            success: hist("success"),
            failure: hist("failure"),
            istio: istio.then(|| Istio::new(metrics, direction, service)),
        }
    }

    /// The route's label (empty when no route matched).
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Records a finished call; `proxy_error` is ferry's reason when it made or cut the
    /// response.
    pub fn record(
        &self,
        status: u16,
        grpc: Option<u8>,
        proxy_error: Option<&'static str>,
        elapsed: std::time::Duration,
    ) {
        if let Some(i) = &self.istio {
            i.record(status, grpc, response_flags(proxy_error), elapsed);
        }
        let proxy_error = proxy_error.is_some();
        let failed = proxy_error || is_failure(status, grpc);
        let slot = match grpc {
            _ if proxy_error => None,
            Some(g) if status == 200 => self.grpc.get(g as usize),
            Some(_) => None,
            None => COMMON
                .iter()
                .position(|c| *c == status)
                .map(|i| &self.http[i]),
        };
        match slot {
            Some(s) => s.get_or_init(|| self.create(status, grpc, false)).inc(),
            None => self.create(status, grpc, failed).inc(),
        };
        if failed {
            self.failure.observe(elapsed)
        } else {
            self.success.observe(elapsed)
        }
    }

    fn create(&self, status_code: u16, grpc: Option<u8>, failed: bool) -> Counter {
        let failed = failed || is_failure(status_code, grpc);
        let l = CallLabels {
            direction: self.direction,
            service: self.service.clone(),
            route: self.route.clone(),
            status_code,
            grpc_status: grpc
                .and_then(|g| GRPC_CODES.get(g as usize).copied())
                .unwrap_or(if grpc.is_some() { "unknown" } else { "" }),
            classification: if failed { "failure" } else { "success" },
        };
        let c = self.metrics.requests.get_or_create(&l).clone();
        self.metrics.track(&self.service, Series::Call(l));
        c
    }
}

/// OpenTelemetry's suggested bounds for HTTP durations, with two finer ones below 5 ms
/// since a sidecar hop is often faster than that.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// A lock-free histogram with fixed buckets: seconds, or Istio's milliseconds.
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// Units per second: 1 for seconds, 1000 for milliseconds.
    scale: f64,
    /// One more than `bounds`: the last is +Inf.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram::with_bounds(&BUCKETS, 1.0)
    }
}

impl AtomicHistogram {
    fn with_bounds(bounds: &'static [f64], scale: f64) -> Self {
        AtomicHistogram(Arc::new(HistogramInner {
            bounds,
            scale,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: std::time::Duration) {
        let v = d.as_secs_f64() * self.0.scale;
        let i = self
            .0
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.0.bounds.len());
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
        let mut buckets = Vec::with_capacity(self.0.counts.len());
        for (i, c) in self.0.counts.iter().enumerate() {
            let bound = self.0.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, c.load(Ordering::Relaxed)));
        }
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.0.sum_micros.load(Ordering::Relaxed) as f64 / 1e6 * self.0.scale;
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
    fn calls_encode_with_direction_route_status_and_classification() {
        let m = Metrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let r = RouteMetrics::new(&m, "outbound", "web", "/api", false);
        r.record(200, None, None, Duration::from_millis(3));
        r.record(200, None, None, Duration::from_millis(3));
        r.record(418, None, None, Duration::from_millis(3));
        r.record(200, Some(5), None, Duration::from_secs(60));
        let sc = StatusCounters::new(&m.endpoint_requests, "web".into(), "127.0.0.1:1".into());
        sc.inc(200);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            r#"ferry_requests_total{direction="outbound",service="web",route="/api",status_code="200",grpc_status="",classification="success"} 2"#,
            r#"ferry_requests_total{direction="outbound",service="web",route="/api",status_code="418",grpc_status="",classification="success"} 1"#,
            r#"ferry_requests_total{direction="outbound",service="web",route="/api",status_code="200",grpc_status="5",classification="failure"} 1"#,
            r#"ferry_request_duration_seconds_bucket{le="0.005",direction="outbound",service="web",route="/api",classification="success"} 3"#,
            r#"ferry_request_duration_seconds_count{direction="outbound",service="web",route="/api",classification="failure"} 1"#,
            r#"ferry_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="web",route="/api",classification="failure"} 1"#,
            "ferry_policy_reloads_total 0",
            r#"ferry_endpoint_requests_total{service="web",endpoint="127.0.0.1:1",status_code="200"} 1"#,
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // A service that is gone takes its request series with it (here: no guard).
        drop(m.service_series("web"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            !text.contains(r#"ferry_requests_total{direction="outbound",service="web""#),
            "{text}"
        );
        assert!(
            !text.contains(
                r#"ferry_request_duration_seconds_count{direction="outbound",service="web""#
            ),
            "{text}"
        );
        // An endpoint that is gone takes its series with it.
        drop(sc);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(!text.contains("127.0.0.1:1"), "{text}");
    }
}
