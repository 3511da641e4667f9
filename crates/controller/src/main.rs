//! `ferry-controller`: watches the Kubernetes API and serves sidecars their endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use ferry_controller::{Hub, grpc, watch};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "ferry-controller", version, about)]
struct Args {
    /// Where sidecars connect (gRPC).
    #[arg(long, env = "FERRY_CONTROLLER_ADDR", default_value = "0.0.0.0:8086")]
    addr: SocketAddr,
    /// Probes and metrics: /live, /ready, /metrics.
    #[arg(
        long,
        env = "FERRY_CONTROLLER_ADMIN_ADDR",
        default_value = "0.0.0.0:9990"
    )]
    admin_addr: SocketAddr,
    /// The cluster's DNS domain, for names such as echo.shop.svc.cluster.local.
    #[arg(long, env = "FERRY_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Log filter, as RUST_LOG (`info`, `ferry_controller=debug`).
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    // Two threads: the watches and the fan-out to sidecars do not wait on each other.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

struct AdminState {
    hub: Arc<Hub>,
    registry: Registry,
}

async fn run(args: Args) -> anyhow::Result<()> {
    // In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API to talk to (in-cluster config or KUBECONFIG)")?;
    let hub = Hub::new(args.cluster_domain.clone());
    let mut registry = Registry::default();
    hub.metrics.register(&mut registry);

    let grpc_listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot bind {}", args.addr))?;
    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot bind {}", args.admin_addr))?;
    println!(
        "ferry-controller: listening grpc {}\nferry-controller: listening admin {}",
        grpc_listener.local_addr()?,
        admin_listener.local_addr()?
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(watch::run(client, hub.clone()));
    tokio::spawn({
        let hub = hub.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                hub.sweep();
            }
        }
    });
    let admin = axum::Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(AdminState {
            hub: hub.clone(),
            registry,
        }));
    tokio::spawn(async move { axum::serve(admin_listener, admin).await });

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(grpc::DiscoveryService::new(hub))
        .serve_with_incoming(incoming);
    // Streams to sidecars never end by themselves: on SIGTERM the controller exits, and
    // sidecars reconnect to another replica, keeping their last endpoints meanwhile.
    tokio::select! {
        r = server => r.context("gRPC server")?,
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = int.recv() => tracing::info!("SIGINT: exiting"),
    }
    Ok(())
}

async fn ready(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.hub.is_synced() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet")
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
