//! `ferry-injector serve`: HTTPS (rustls) with the certificate reloaded when its files
//! change, `POST /mutate`, health and metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

use crate::inject::Config;
use crate::review::review;

/// Larger than any pod the API server stores (etcd's limit is 1.5 MiB).
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone)]
struct AppState {
    cfg: Arc<Config>,
    reviews: Family<ResultLabel, Counter>,
    registry: Arc<Registry>,
}

#[derive(serde::Deserialize)]
struct MutateQuery {
    /// Set by the webhook whose namespaceSelector matched `ferry.dev/inject=enabled`.
    #[serde(rename = "namespace-enabled", default)]
    namespace_enabled: bool,
}

pub fn app(cfg: Config) -> Router {
    let reviews = Family::<ResultLabel, Counter>::default();
    let mut registry = Registry::default();
    registry.register(
        "ferry_injector_reviews",
        "AdmissionReviews answered, by result",
        reviews.clone(),
    );
    let state = AppState {
        cfg: Arc::new(cfg),
        reviews,
        registry: Arc::new(registry),
    };
    Router::new()
        .route("/mutate", post(mutate))
        .route("/mutate/namespace-enabled", post(mutate_enabled))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Called by the webhook whose namespaceSelector matched `ferry.dev/inject=enabled`.
async fn mutate_enabled(state: State<AppState>, body: Bytes) -> Response {
    answer(state, true, body)
}

async fn mutate(state: State<AppState>, Query(q): Query<MutateQuery>, body: Bytes) -> Response {
    answer(state, q.namespace_enabled, body)
}

fn answer(State(s): State<AppState>, namespace_enabled: bool, body: Bytes) -> Response {
    match review(&body, namespace_enabled, &s.cfg) {
        Ok((r, verdict)) => {
            s.reviews
                .get_or_create(&ResultLabel {
                    result: verdict.as_str(),
                })
                .inc();
            axum::Json(r).into_response()
        }
        Err(e) => {
            s.reviews
                .get_or_create(&ResultLabel {
                    result: "bad-request",
                })
                .inc();
            (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &s.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn load_tls(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading key {}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves until the process ends; the printed line tells supervisors and tests where.
pub async fn serve(
    addr: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    cfg: Config,
    reload_every: Duration,
) -> anyhow::Result<()> {
    // The snapshot is taken before loading, so a rotation racing startup is still seen.
    let snapshot = (std::fs::read(&cert).ok(), std::fs::read(&key).ok());
    let tls = Arc::new(ArcSwap::from_pointee(load_tls(&cert, &key)?));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    println!("ferry-injector: listening {}", listener.local_addr()?);
    tokio::spawn(watch_certs(cert, key, snapshot, tls.clone(), reload_every));
    let svc = TowerToHyperService::new(app(cfg));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let svc = svc.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Re-reads the certificate and key when their contents change (cert-manager and
/// Secret volume updates rewrite them); a bad pair is logged and the old one stays.
type Snapshot = (Option<Vec<u8>>, Option<Vec<u8>>);

async fn watch_certs(
    cert: PathBuf,
    key: PathBuf,
    mut last: Snapshot,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    every: Duration,
) {
    let read = || (std::fs::read(&cert).ok(), std::fs::read(&key).ok());
    loop {
        tokio::time::sleep(every).await;
        let now = read();
        if now == last {
            continue;
        }
        match load_tls(&cert, &key) {
            Ok(cfg) => {
                tls.store(Arc::new(cfg));
                last = now;
                tracing::info!("certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "new certificate refused; keeping the old one")
            }
        }
    }
}
