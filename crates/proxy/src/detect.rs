//! Protocol detection from a connection's first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we wait for before calling a stream opaque.
const MAX_METHOD: usize = 16;

enum Verdict {
    Is(Protocol),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // An HTTP/1 request line starts with a method token and a space.
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Verdict::Is(Protocol::Http1),
            _ => return Verdict::Is(Protocol::Opaque),
        }
    }
    if buf.len() > MAX_METHOD {
        Verdict::Is(Protocol::Opaque)
    } else {
        Verdict::NeedMore
    }
}

/// Reads until the protocol is known. A client that says nothing within `window` is
/// taken to wait for the server to speak first (databases, SMTP): opaque at once.
pub async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    window: Duration,
) -> io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(512);
    let deadline = Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(_)) => {
                if let Verdict::Is(p) = classify(&buf) {
                    return Ok((p, buf));
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn into_parts(self) -> (BytesMut, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        let is = |b: &[u8], p| matches!(classify(b), Verdict::Is(x) if x == p);
        assert!(is(b"GET / HTTP/1.1\r\n", Protocol::Http1));
        assert!(is(b"M-SEARCH * HTTP/1.1", Protocol::Http1));
        assert!(is(H2_PREFACE, Protocol::Http2));
        assert!(matches!(classify(b"PRI * HT"), Verdict::NeedMore));
        assert!(matches!(classify(b"GE"), Verdict::NeedMore));
        assert!(is(b"\x16\x03\x01\x02", Protocol::Opaque));
        assert!(is(b"hello world", Protocol::Opaque));
        assert!(is(b" GET", Protocol::Opaque));
        assert!(is(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAA", Protocol::Opaque));
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_window_and_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let (p, buf) = detect(&mut server, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!((p, buf.len()), (Protocol::Opaque, 0));

        client.write_all(b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
            client
        });
        let (p, buf) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let _client = writer.await.unwrap();
        let mut prefixed = Prefixed::new(buf, server);
        let mut line = [0u8; 16];
        prefixed.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET / HTTP/1.1\r\n");
    }
}
