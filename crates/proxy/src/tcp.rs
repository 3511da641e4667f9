//! Opaque TCP: bytes copied both ways, half-close included.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Connects to `dst`, replays what detection already read, then copies until both
/// directions have ended. When one side finishes sending, the other is told with a
/// FIN and may keep sending.
pub async fn forward(
    mut client: TcpStream,
    prefix: BytesMut,
    dst: SocketAddr,
    connect_timeout: Duration,
) -> io::Result<(u64, u64)> {
    let mut upstream = tokio::time::timeout(connect_timeout, TcpStream::connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    upstream.set_nodelay(true)?;
    if !prefix.is_empty() {
        upstream.write_all(&prefix).await?;
    }
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok((up + prefix.len() as u64, down))
}

/// The destination a connection had before iptables redirected it to us.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
