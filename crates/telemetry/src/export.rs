//! A bounded span queue in front of the OTLP exporter. Requests only ever `try_send`:
//! a slow or absent collector costs a counter increment, never a wait. Failures are
//! loud anyway: a WARN at the first, a summary a minute while they go on, counters by
//! reason, and the state in the admin API's `GET /tracing`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// While exports keep failing, one WARN summarises them this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue-full`, `export-failed` or `export-timeout`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub exported: Counter,
    pub dropped: Family<DropLabels, Counter>,
}

impl Counters {
    fn drop(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
    }
}

/// What `GET /tracing` shows of the exporter.
#[derive(Clone, Debug)]
pub struct Status {
    pub endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub protocol: &'static str,
    /// Why this protocol, when ferry chose it rather than the environment.
    pub protocol_note: Option<String>,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub queue_depth: usize,
    pub queue_capacity: usize,
}

#[derive(Default)]
struct Outcomes {
    last_success: Option<SystemTime>,
    last_error: Option<(SystemTime, String)>,
}

enum Msg {
    Span(Box<SpanData>),
    /// Export what is queued now and say when done.
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub struct Queue {
    tx: mpsc::Sender<Msg>,
    pub counters: Counters,
    config: Config,
    /// Written by the export task once per batch; read by the admin API.
    outcomes: Arc<Mutex<Outcomes>>,
}

impl Queue {
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(Msg::Span(Box::new(span))).is_err() {
            self.counters.drop("queue-full", 1);
        }
    }

    pub fn status(&self) -> Status {
        let o = self.outcomes.lock().expect("outcomes poisoned");
        Status {
            endpoint: self.config.endpoint.clone(),
            protocol: if self.config.grpc {
                "grpc"
            } else {
                "http/protobuf"
            },
            protocol_note: self.config.note.clone(),
            last_success: o.last_success,
            last_error: o.last_error.clone(),
            queue_depth: QUEUE - self.tx.capacity(),
            queue_capacity: QUEUE,
        }
    }

    /// Exports everything queued before this call, waiting at most `within`.
    pub async fn flush(&self, within: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send_timeout(Msg::Flush(tx), within).await.is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }
}

/// The exporter's settings as read from the standard `OTEL_EXPORTER_OTLP_*` variables.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub endpoint: String,
    pub grpc: bool,
    /// Set when the protocol was not given and ferry chose it from the port.
    pub note: Option<String>,
}

impl Config {
    /// `endpoint` as given; `protocol` from `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`. The
    /// specification's default is `http/protobuf`, but 4317 is OTLP/gRPC's port: with no
    /// protocol set, an endpoint on port 4317 is spoken to with gRPC, so
    /// `OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4317` works as a user means it.
    pub fn new(endpoint: &str, protocol: Option<&str>) -> Config {
        let on_4317 = endpoint
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .is_some_and(|p| p.split('/').next() == Some("4317"));
        let (grpc, note) = match protocol.map(str::trim) {
            Some("grpc") => (true, None),
            Some(p) if on_4317 => {
                tracing::warn!(
                    endpoint,
                    protocol = p,
                    "OTLP endpoint is on 4317, the OTLP/gRPC port, but the protocol is {p}; \
                     if spans do not arrive, set OTEL_EXPORTER_OTLP_PROTOCOL=grpc or use port 4318"
                );
                (false, None)
            }
            Some(_) => (false, None),
            None if on_4317 => (
                true,
                Some(
                    "no OTEL_EXPORTER_OTLP_PROTOCOL set; port 4317 is OTLP/gRPC's, so gRPC".into(),
                ),
            ),
            None => (false, None),
        };
        Config {
            endpoint: endpoint.to_string(),
            grpc,
            note,
        }
    }
}

/// Builds the exporter from the standard `OTEL_EXPORTER_OTLP_*` variables and starts the
/// task that batches spans into it. Needs a tokio runtime.
pub fn start(resource: Resource, config: Config) -> anyhow::Result<Queue> {
    if let Some(note) = &config.note {
        tracing::info!(endpoint = %config.endpoint, "span export: {note}");
    }
    let mut exporter = if config.grpc {
        SpanExporter::builder()
            .with_tonic()
            .with_timeout(EXPORT_TIMEOUT)
            .build()?
    } else {
        SpanExporter::builder()
            .with_http()
            .with_timeout(EXPORT_TIMEOUT)
            .build()?
    };
    exporter.set_resource(&resource);
    let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
    let counters = Counters::default();
    let c = counters.clone();
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let out = outcomes.clone();
    let endpoint = config.endpoint.clone();
    tokio::spawn(async move {
        let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
        let mut warn = FailureLog::default();
        loop {
            let Some(first) = rx.recv().await else { break };
            let mut flushed = None;
            match first {
                Msg::Span(s) => batch.push(*s),
                Msg::Flush(done) => flushed = Some(done),
            }
            let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
            while flushed.is_none() && batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(Msg::Span(s))) => batch.push(*s),
                    Ok(Some(Msg::Flush(done))) => flushed = Some(done),
                    _ => break,
                }
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                let spans = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                let failed =
                    match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
                        Ok(Ok(())) => {
                            c.exported.inc_by(n);
                            None
                        }
                        Ok(Err(error)) => {
                            c.drop("export-failed", n);
                            Some(error.to_string())
                        }
                        Err(_) => {
                            c.drop("export-timeout", n);
                            Some(format!("no answer within {}s", EXPORT_TIMEOUT.as_secs()))
                        }
                    };
                let mut o = out.lock().expect("outcomes poisoned");
                match failed {
                    None => {
                        o.last_success = Some(SystemTime::now());
                        warn.succeeded(&endpoint);
                    }
                    Some(cause) => {
                        warn.failed(&endpoint, &cause, n);
                        o.last_error = Some((SystemTime::now(), cause));
                    }
                }
            }
            if let Some(done) = flushed {
                let _ = done.send(());
            }
        }
        let _ = exporter.shutdown();
    });
    Ok(Queue {
        tx,
        counters,
        config,
        outcomes,
    })
}

/// Rate-limits the WARN lines of failing exports: the first failure at once, then one
/// summary per [`WARN_EVERY`] while failures go on, and a line when exports recover.
#[derive(Default)]
struct FailureLog {
    last_warn: Option<Instant>,
    failures: u64,
    spans: u64,
}

impl FailureLog {
    fn failed(&mut self, endpoint: &str, cause: &str, spans: u64) {
        self.failures += 1;
        self.spans += spans;
        let due = self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if !due {
            return;
        }
        if self.last_warn.is_none() {
            tracing::warn!(
                endpoint,
                spans,
                "span export failed; spans dropped (counted in ferry_spans_dropped_total, state in GET /tracing): {cause}"
            );
        } else {
            tracing::warn!(
                endpoint,
                failures = self.failures,
                spans = self.spans,
                "span exports still failing in the last minute; spans dropped: {cause}"
            );
        }
        self.last_warn = Some(Instant::now());
        self.failures = 0;
        self.spans = 0;
    }

    fn succeeded(&mut self, endpoint: &str) {
        if self.last_warn.take().is_some() {
            tracing::info!(endpoint, "span export works again");
        }
        self.failures = 0;
        self.spans = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_4317_without_a_protocol_means_grpc() {
        let c = Config::new("http://127.0.0.1:4317", None);
        assert!(c.grpc && c.note.is_some());
        assert!(Config::new("http://jaeger:4317/", None).grpc);
        assert!(!Config::new("http://127.0.0.1:4318", None).grpc);
        assert!(!Config::new("http://127.0.0.1:4317", Some("http/protobuf")).grpc);
        assert!(Config::new("http://127.0.0.1:14317", Some("grpc")).grpc);
        assert!(!Config::new("http://127.0.0.1:14317", None).grpc);
    }
}
