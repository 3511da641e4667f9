//! A bounded span queue in front of the OTLP exporter. Requests only ever `try_send`:
//! a slow or absent collector costs a counter increment, never a wait.

use std::time::Duration;

use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub exported: Counter,
    pub dropped: Counter,
}

enum Msg {
    Span(Box<SpanData>),
    /// Export what is queued now and say when done.
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub struct Queue {
    tx: mpsc::Sender<Msg>,
    pub counters: Counters,
}

impl Queue {
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(Msg::Span(Box::new(span))).is_err() {
            self.counters.dropped.inc();
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

/// Which OTLP transport, from `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`.
fn grpc() -> bool {
    let p = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    p.trim() == "grpc"
}

/// Builds the exporter from the standard `OTEL_EXPORTER_OTLP_*` variables and starts the
/// task that batches spans into it. Needs a tokio runtime.
pub fn start(resource: Resource) -> anyhow::Result<Queue> {
    let mut exporter = if grpc() {
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
    tokio::spawn(async move {
        let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
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
                match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
                    Ok(Ok(())) => {
                        c.exported.inc_by(n);
                    }
                    Ok(Err(error)) => {
                        c.dropped.inc_by(n);
                        tracing::debug!(%error, spans = n, "span export failed; spans dropped");
                    }
                    Err(_) => {
                        c.dropped.inc_by(n);
                        tracing::debug!(spans = n, "span export timed out; spans dropped");
                    }
                }
            }
            if let Some(done) = flushed {
                let _ = done.send(());
            }
        }
        let _ = exporter.shutdown();
    });
    Ok(Queue { tx, counters })
}
