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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    async fn start(banner: bool) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, banner));
        addr
    }

    /// Bytes come back unchanged, and our half-close comes back as EOF.
    #[tokio::test]
    async fn echoes_then_passes_on_half_close() {
        let mut s = TcpStream::connect(start(false).await).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
        s.write_all(&payload).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert!(back == payload);
    }

    #[tokio::test]
    async fn greets_before_the_client_speaks() {
        let mut s = TcpStream::connect(start(true).await).await.unwrap();
        let mut greeting = vec![0u8; BANNER.len()];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(greeting, BANNER);
        s.write_all(b"HELO\r\n").await.unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"HELO\r\n");
    }
}
