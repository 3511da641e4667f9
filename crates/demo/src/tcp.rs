//! Plain TCP peers for opaque pass-through tests.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// What the server-speaks-first peer says on accept, like an SMTP or database greeting.
pub const BANNER: &[u8] = b"220 ferry-demo ready\r\n";

/// Echoes every byte back; half-close is passed on (EOF in, FIN out).
pub async fn serve_tcp_echo(listener: TcpListener) -> std::io::Result<()> {
    serve(listener, false).await
}

/// Sends [`BANNER`] first, then echoes.
pub async fn serve_banner(listener: TcpListener) -> std::io::Result<()> {
    serve(listener, true).await
}

async fn serve(listener: TcpListener, banner: bool) -> std::io::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            if banner && s.write_all(BANNER).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}
