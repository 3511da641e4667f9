//! Protocol detection from a connection's first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
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

/// What [`detect`] decides from the bytes read so far; `None` means it waits for more.
/// Public for the fuzzer (`tests/fuzz`), which has no other way to reach the pure part.
pub fn classify_prefix(buf: &[u8]) -> Option<Protocol> {
    match classify(buf) {
        Verdict::Is(p) => Some(p),
        Verdict::NeedMore => None,
    }
}

/// Reads until the protocol is known. A client that says nothing within `window` is
/// taken to wait for the server to speak first (databases, SMTP): opaque at once. A
/// client whose first bytes may begin an HTTP/1 request line or the HTTP/2 preface is
/// never downgraded to opaque for being slow: it gets `header_timeout` from its first
/// byte to finish, and is disconnected past it, as a slow HTTP client would be. Only
/// bytes that cannot be HTTP make a connection opaque.
pub async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    window: Duration,
    header_timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(512);
    let mut deadline = Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) if buf.is_empty() => return Ok((Protocol::Opaque, buf.freeze())),
            Err(_elapsed) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client began an HTTP request and did not finish its first line",
                ));
            }
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Ok(n)) => {
                if let Verdict::Is(p) = classify(&buf) {
                    return Ok((p, buf.freeze()));
                }
                if buf.len() == n {
                    deadline = Instant::now() + header_timeout;
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn into_parts(self) -> (Bytes, S) {
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
            if self.prefix.is_empty() {
                // Frees the detection buffer: a long-lived connection need not keep it.
                self.prefix = Bytes::new();
            }
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
        let (p, buf) = detect(
            &mut server,
            Duration::from_millis(20),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!((p, buf.len()), (Protocol::Opaque, 0));

        client.write_all(b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
            client
        });
        let (p, buf) = detect(&mut server, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        let _client = writer.await.unwrap();
        let mut prefixed = Prefixed::new(buf, server);
        let mut line = [0u8; 16];
        prefixed.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET / HTTP/1.1\r\n");
    }

    /// A pause longer than the detection window anywhere inside the HTTP/2 preface or
    /// an HTTP/1 request line does not make the connection opaque.
    #[tokio::test(start_paused = true)]
    async fn a_slow_http_client_is_never_downgraded_to_opaque() {
        let window = Duration::from_millis(100);
        let header = Duration::from_secs(10);
        let cases: [(&[u8], Protocol); 2] = [
            (H2_PREFACE, Protocol::Http2),
            (b"DELETE /items/7 HTTP/1.1\r\n", Protocol::Http1),
        ];
        for (bytes, want) in cases {
            for split in 1..bytes.len() {
                let (mut client, mut server) = tokio::io::duplex(256);
                let (first, rest) = bytes.split_at(split);
                let (first, rest) = (first.to_vec(), rest.to_vec());
                let writer = tokio::spawn(async move {
                    client.write_all(&first).await.unwrap();
                    tokio::time::sleep(window * 5).await;
                    client.write_all(&rest).await.unwrap();
                    client
                });
                let (p, buf) = detect(&mut server, window, header).await.unwrap();
                let _client = writer.await.unwrap();
                assert_eq!(p, want, "split at {split}: {buf:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stalls_inside_a_request_line_is_cut_off_at_header_read_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PO").await.unwrap();
        let t = Instant::now();
        let err = detect(
            &mut server,
            Duration::from_millis(100),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_secs(10));
        // Bytes that cannot be HTTP are opaque at once, however they arrive.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"\x16\x03").await.unwrap();
        let (p, _) = detect(
            &mut server,
            Duration::from_millis(100),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(p, Protocol::Opaque);
    }
}
