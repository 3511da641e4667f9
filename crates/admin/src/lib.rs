//! The ferry admin API: health, metrics, policy (read, replace, validate, roll back),
//! endpoints, log level and graceful shutdown; and [`Control`], which owns the policy
//! layers and their history.

#![forbid(unsafe_code)]

mod api;
mod control;

pub use api::{AdminState, SetLogLevel, app};
pub use control::{Control, Source};

use std::net::SocketAddr;

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
