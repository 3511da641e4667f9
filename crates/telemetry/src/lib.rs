//! Tracing for the ferry proxy: trace-context propagation (W3C, B3 single and multi,
//! Jaeger), one span per proxied request following OpenTelemetry's HTTP and RPC
//! conventions, and OTLP export (gRPC or HTTP) configured by the standard `OTEL_*`
//! variables.
//!
//! Built for the hot path: the sampling decision is made before any span exists, an
//! unsampled request costs a header parse and a header write, and spans reach the
//! exporter through a bounded queue that never blocks a request.

#![forbid(unsafe_code)]

mod export;
pub mod propagation;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ferry_policy::Formats;
use http::{HeaderMap, Method};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prometheus_client::registry::Registry;

pub use export::Status as ExportStatus;
pub use propagation::Parent;

/// Which side of the call the proxy stands on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Inbound: the proxy receives the call for its app.
    Server,
    /// Outbound: the proxy makes the call for its app.
    Client,
}

/// What a span needs to know about the request it covers.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    pub kind: Kind,
    pub method: &'a Method,
    pub path: &'a str,
    pub grpc: bool,
    /// The client's address.
    pub peer: SocketAddr,
    /// The matched route (`/api`, `pkg.Svc/*`), empty when none matched.
    pub route: &'a str,
}

/// `OTEL_TRACES_SAMPLER`, when set: it overrides the policy's ratio.
#[derive(Clone, Copy, Debug, PartialEq)]
struct EnvSampler {
    parent_based: bool,
    ratio: f64,
}

fn env_sampler() -> Option<EnvSampler> {
    let name = std::env::var("OTEL_TRACES_SAMPLER").ok()?;
    let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG")
        .ok()
        .and_then(|a| a.trim().parse::<f64>().ok());
    let ratio = arg.unwrap_or(1.0).clamp(0.0, 1.0);
    Some(match name.trim() {
        "always_on" => EnvSampler {
            parent_based: false,
            ratio: 1.0,
        },
        "always_off" => EnvSampler {
            parent_based: false,
            ratio: 0.0,
        },
        "traceidratio" => EnvSampler {
            parent_based: false,
            ratio,
        },
        "parentbased_always_on" => EnvSampler {
            parent_based: true,
            ratio: 1.0,
        },
        "parentbased_always_off" => EnvSampler {
            parent_based: true,
            ratio: 0.0,
        },
        "parentbased_traceidratio" => EnvSampler {
            parent_based: true,
            ratio,
        },
        other => {
            tracing::warn!(
                sampler = other,
                "unknown OTEL_TRACES_SAMPLER; using the policy's trace-sampling"
            );
            return None;
        }
    })
}

struct Inner {
    queue: Option<export::Queue>,
    sampler: Option<EnvSampler>,
    scope: InstrumentationScope,
    counters: export::Counters,
}

/// Starts spans and propagates context. Cheap to clone.
#[derive(Clone)]
pub struct Tracer(Arc<Inner>);

impl Tracer {
    /// Propagation only: headers are read and written, no span is exported.
    pub fn disabled() -> Tracer {
        Tracer(Arc::new(Inner {
            queue: None,
            sampler: None,
            scope: scope(),
            counters: export::Counters::default(),
        }))
    }

    /// Exports with OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific one)
    /// is set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Needs a
    /// tokio runtime.
    pub fn from_env(default_service_name: &str) -> anyhow::Result<Tracer> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let off = var("OTEL_SDK_DISABLED").is_some_and(|v| v == "true")
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none");
        let sampler = env_sampler();
        if endpoint.is_none() || off {
            let mut t = Tracer::disabled();
            Arc::get_mut(&mut t.0).expect("fresh").sampler = sampler;
            return Ok(t);
        }
        let mut resource = Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none()
            && !var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="))
        {
            resource = resource.with_service_name(default_service_name.to_string());
        }
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        let config =
            export::Config::new(endpoint.as_deref().unwrap_or_default(), protocol.as_deref());
        let queue = export::start(resource.build(), config)?;
        let counters = queue.counters.clone();
        Ok(Tracer(Arc::new(Inner {
            queue: Some(queue),
            sampler,
            scope: scope(),
            counters,
        })))
    }

    /// Exports the spans still queued, waiting at most `within` (on drain, before exit).
    pub async fn flush(&self, within: std::time::Duration) {
        if let Some(q) = &self.0.queue {
            q.flush(within).await;
        }
    }

    pub fn is_exporting(&self) -> bool {
        self.0.queue.is_some()
    }

    /// The exporter's state, `None` when no spans are exported.
    pub fn status(&self) -> Option<export::Status> {
        self.0.queue.as_ref().map(|q| q.status())
    }

    /// `ferry_spans_exported_total` and `ferry_spans_dropped_total{reason}`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "ferry_spans_exported",
            "Spans the collector accepted",
            self.0.counters.exported.clone(),
        );
        registry.register(
            "ferry_spans_dropped",
            "Spans dropped, by reason: queue-full (the collector is slower than traffic), \
             export-failed (the collector refused or could not be reached), export-timeout",
            self.0.counters.dropped.clone(),
        );
    }

    /// Reads the caller's context from `headers`, decides sampling (the parent's decision
    /// wins, else `ratio`), and rewrites `headers` for the next hop in every format of
    /// `formats`, with a new span as the parent. Adds `x-request-id` when absent.
    pub fn start(
        &self,
        call: Call<'_>,
        formats: Formats,
        ratio: f64,
        headers: &mut HeaderMap,
    ) -> ActiveSpan {
        let Call {
            kind,
            method,
            path,
            grpc,
            peer,
            route,
        } = call;
        let present = propagation::Present::scan(headers);
        let request_id = !present.request_id();
        if formats.is_empty() {
            if request_id {
                headers.insert(propagation::X_REQUEST_ID, propagation::request_id());
            }
            if self.0.queue.is_none() {
                return ActiveSpan(None);
            }
        }
        let parent = propagation::extract_present(headers, present);
        let trace_id = parent
            .map(|p| p.trace_id)
            .unwrap_or_else(|| fastrand::u128(1..));
        let sampled = match (self.0.sampler, parent.and_then(|p| p.sampled)) {
            (Some(s), Some(p)) if s.parent_based => p,
            (Some(s), _) => ratio_sampled(trace_id, s.ratio),
            (None, Some(p)) => p,
            (None, None) => ratio_sampled(trace_id, ratio),
        };
        let span_id = fastrand::u64(1..);
        let parent_span = parent.map(|p| p.span_id);
        if !formats.is_empty() {
            propagation::inject_present(
                headers,
                present,
                formats,
                trace_id,
                span_id,
                parent_span,
                sampled,
                request_id,
            );
        }
        if !sampled || self.0.queue.is_none() {
            return ActiveSpan(None);
        }
        ActiveSpan(Some(Box::new(Recording {
            tracer: self.clone(),
            kind,
            trace_id,
            span_id,
            parent_span,
            start: SystemTime::now(),
            method: method.clone(),
            path: path.to_string(),
            grpc,
            peer,
            route: route.to_string(),
            endpoint: None,
            events: Vec::new(),
        })))
    }
}

/// gRPC status names, as `error.type` of a failed call.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Sampled when the trace id's low 64 bits fall under the ratio, so every hop that
/// samples by ratio agrees on the same trace.
fn ratio_sampled(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    ((trace_id as u64) >> 1) < (ratio * (u64::MAX >> 1) as f64) as u64
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("ferry")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

struct Recording {
    tracer: Tracer,
    kind: Kind,
    trace_id: u128,
    span_id: u64,
    parent_span: Option<u64>,
    start: SystemTime,
    method: Method,
    path: String,
    grpc: bool,
    peer: SocketAddr,
    route: String,
    endpoint: Option<SocketAddr>,
    events: Vec<opentelemetry::trace::Event>,
}

/// A request's span; recording only when sampled and exporting, free otherwise.
#[derive(Default)]
pub struct ActiveSpan(Option<Box<Recording>>);

impl ActiveSpan {
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    pub fn set_endpoint(&mut self, addr: SocketAddr) {
        if let Some(r) = &mut self.0 {
            r.endpoint = Some(addr);
        }
    }

    /// Notes a retry: which attempt failed where, and why.
    pub fn retry(&mut self, attempt: u32, from: SocketAddr, reason: &'static str) {
        if let Some(r) = &mut self.0 {
            r.events.push(opentelemetry::trace::Event::new(
                "retry",
                SystemTime::now(),
                vec![
                    KeyValue::new("ferry.attempt", attempt as i64),
                    KeyValue::new("ferry.endpoint", from.to_string()),
                    KeyValue::new("ferry.error", reason),
                ],
                0,
            ));
        }
    }

    /// Ends the span with what the client got: the HTTP status, the gRPC status when
    /// there is one, and the proxy's own failure reason when it made the response.
    pub fn finish(self, http_status: u16, grpc_status: Option<i32>, error: Option<&'static str>) {
        let Some(r) = self.0 else { return };
        let grpc = r.grpc;
        let mut attrs = vec![
            KeyValue::new("http.request.method", r.method.as_str().to_string()),
            KeyValue::new("url.path", r.path.clone()),
            KeyValue::new("url.scheme", "http"),
            KeyValue::new("http.response.status_code", http_status as i64),
        ];
        // The peer is the other end of this hop: the caller for a server span, the
        // endpoint connected to for a client span.
        match r.kind {
            Kind::Server => {
                attrs.push(KeyValue::new("client.address", r.peer.ip().to_string()));
                attrs.push(KeyValue::new(
                    "network.peer.address",
                    r.peer.ip().to_string(),
                ));
                attrs.push(KeyValue::new("network.peer.port", r.peer.port() as i64));
            }
            Kind::Client => {
                if let Some(ep) = r.endpoint {
                    attrs.push(KeyValue::new("network.peer.address", ep.ip().to_string()));
                    attrs.push(KeyValue::new("network.peer.port", ep.port() as i64));
                    attrs.push(KeyValue::new("url.full", format!("http://{ep}{}", r.path)));
                }
            }
        }
        if let Some(ep) = r.endpoint {
            attrs.push(KeyValue::new("server.address", ep.ip().to_string()));
            attrs.push(KeyValue::new("server.port", ep.port() as i64));
        }
        let name: Cow<'static, str> = match (
            grpc,
            r.path.strip_prefix('/').and_then(|p| p.split_once('/')),
        ) {
            (true, Some((service, method))) => {
                attrs.push(KeyValue::new("rpc.system", "grpc"));
                attrs.push(KeyValue::new("rpc.service", service.to_string()));
                attrs.push(KeyValue::new("rpc.method", method.to_string()));
                Cow::Owned(format!("{service}/{method}"))
            }
            _ if !r.route.is_empty() => {
                attrs.push(KeyValue::new("http.route", r.route.clone()));
                Cow::Owned(format!("{} {}", r.method.as_str(), r.route))
            }
            _ => Cow::Owned(r.method.as_str().to_string()),
        };
        if let Some(g) = grpc_status {
            attrs.push(KeyValue::new("rpc.grpc.status_code", g as i64));
        }
        let failed = error.is_some()
            || match r.kind {
                Kind::Server => http_status >= 500,
                Kind::Client => http_status >= 400,
            }
            || grpc_status.is_some_and(|g| g != 0);
        if let Some(e) = error {
            attrs.push(KeyValue::new("error.type", e));
            // The reason ferry gave in `x-ferry-error`.
            attrs.push(KeyValue::new("ferry.error", e));
        } else if failed {
            let t = match grpc_status {
                Some(g) if g != 0 => GRPC_CODES
                    .get(g as usize)
                    .map_or_else(|| g.to_string(), |n| n.to_string()),
                _ => http_status.to_string(),
            };
            attrs.push(KeyValue::new("error.type", t));
        }
        let status = if failed {
            // The status code says why; only ferry's own reason adds to it.
            Status::error(error.unwrap_or(""))
        } else {
            Status::Unset
        };
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from(r.trace_id),
                SpanId::from(r.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: r.parent_span.map(SpanId::from).unwrap_or(SpanId::INVALID),
            parent_span_is_remote: r.parent_span.is_some(),
            span_kind: match r.kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            },
            name,
            start_time: r.start,
            end_time: SystemTime::now(),
            attributes: attrs,
            dropped_attributes_count: 0,
            events: {
                let mut e = SpanEvents::default();
                e.events = r.events;
                e
            },
            links: SpanLinks::default(),
            status,
            instrumentation_scope: r.tracer.0.scope.clone(),
        };
        if let Some(q) = &r.tracer.0.queue {
            q.push(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn call(kind: Kind) -> Call<'static> {
        Call {
            kind,
            method: &Method::GET,
            path: "/",
            grpc: false,
            peer: "10.0.0.1:5555".parse().unwrap(),
            route: "",
        }
    }

    #[test]
    fn a_new_request_gets_a_trace_and_a_request_id() {
        let t = Tracer::disabled();
        let mut h = HeaderMap::new();
        let s = t.start(call(Kind::Client), Formats::W3C, 1.0, &mut h);
        assert!(!s.is_recording(), "nothing records without an exporter");
        let p = propagation::extract(&h).unwrap();
        assert_eq!(p.sampled, Some(true));
        let id = h["x-request-id"].as_bytes();
        assert_eq!(id.len(), 32);
        assert!(id.iter().all(u8::is_ascii_hexdigit), "{id:?}");
        assert!(h["x-request-id"].is_sensitive() && h["traceparent"].is_sensitive());
        // Whatever the formats, even none.
        for formats in [Formats::B3, Formats::NONE] {
            let mut h = HeaderMap::new();
            t.start(call(Kind::Client), formats, 1.0, &mut h);
            assert_eq!(h["x-request-id"].len(), 32, "{formats}");
            assert!(!h.contains_key("traceparent"), "{formats}");
        }
        let mut h2 = HeaderMap::new();
        h2.insert("x-request-id", HeaderValue::from_static("given"));
        t.start(call(Kind::Client), Formats::W3C, 1.0, &mut h2);
        assert_eq!(h2["x-request-id"], "given");
    }

    #[test]
    fn the_parents_decision_wins_over_the_ratio() {
        let t = Tracer::disabled();
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        t.start(call(Kind::Server), Formats::W3C | Formats::B3, 1.0, &mut h);
        let p = propagation::extract(&h).unwrap();
        assert_eq!(
            (p.trace_id, p.sampled),
            (0x4bf92f3577b34da6a3ce929d0e0e4736, Some(false))
        );
        assert_ne!(
            p.span_id, 0x00f067aa0ba902b7,
            "the next hop's parent is our span"
        );
        assert!(h["b3"].to_str().unwrap().ends_with("-0-00f067aa0ba902b7"));
    }

    #[test]
    fn ratio_sampling_is_by_trace_id() {
        let n = 20_000;
        let sampled = (0..n)
            .filter(|_| ratio_sampled(fastrand::u128(1..), 0.1))
            .count();
        assert!((1500..2500).contains(&sampled), "{sampled}");
        assert!(!ratio_sampled(12345, 0.0));
        assert!(ratio_sampled(12345, 1.0));
    }
}
