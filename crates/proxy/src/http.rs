//! HTTP on the wire, for the request path in [`crate::stack`]: hop-by-hop headers,
//! `X-Forwarded-For`, upgrades and their tunnels, and gRPC's timeout header.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// Appends the caller to `X-Forwarded-For` and sets `X-Forwarded-Proto` if unset, so
/// the app behind the inbound sidecar still learns who called it.
pub fn forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_canonical();
    let value = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR, v);
    }
    if !h.contains_key(X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The protocol a request asks to switch to, when it really asks (`Connection: upgrade`).
pub fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let up = h.get(header::UPGRADE)?;
    let conn = h.get(header::CONNECTION)?.to_str().ok()?;
    conn.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        .then(|| up.clone())
}

/// An HTTP/1.1 client connection after its upgrade: the socket, with any bytes hyper
/// had read past the request put back in front.
pub type ClientIo = crate::detect::Prefixed<tokio::net::TcpStream>;

/// Copies bytes both ways between the upgraded client and upstream connections.
pub fn tunnel(
    client: tokio::sync::oneshot::Receiver<ClientIo>,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: crate::balance::InFlight,
) {
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let (client, upstream) = tokio::join!(client, upstream);
        match (client, upstream) {
            (Ok(mut c), Ok(u)) => {
                let mut u = hyper_util::rt::TokioIo::new(u);
                if let Err(error) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(%error, "upgraded connection ended with an error");
                }
            }
            (Err(_), _) => tracing::debug!("upgrade failed: the client connection ended first"),
            (_, Err(error)) => tracing::debug!(%error, "upgrade failed"),
        }
    });
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The earlier of the policy's timeout and, on a gRPC call, the client's own
/// `grpc-timeout` (not looked up on other requests: a gRPC header).
pub fn deadline(
    timeout: Option<Duration>,
    grpc: bool,
    h: &HeaderMap,
    start: Instant,
) -> Option<Instant> {
    let grpc = grpc
        .then(|| h.get(GRPC_TIMEOUT))
        .flatten()
        .and_then(|v| parse_grpc_timeout(v.as_bytes()));
    match (timeout, grpc) {
        (Some(a), Some(b)) => Some(start + a.min(b)),
        (Some(a), None) | (None, Some(a)) => Some(start + a),
        (None, None) => None,
    }
}

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes the time left, in the finest unit that fits in 8 digits.
pub fn set_grpc_timeout(h: &mut HeaderMap, left: Duration) {
    let micros = left.as_micros().max(1);
    let v = if micros < 100_000_000 {
        format!("{micros}u")
    } else {
        format!("{}m", left.as_millis().min(99_999_999))
    };
    h.insert(GRPC_TIMEOUT, HeaderValue::from_str(&v).expect("digits"));
}

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1); the names
/// `strip_hop_by_hop` looks for, with `te`.
static HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

pub fn strip_hop_by_hop(h: &mut HeaderMap, request: bool) {
    // One pass over the names first: most messages carry none of these, and a miss by
    // name (one string match a name) is cheaper than a hashed lookup for each.
    let any = h.keys().any(|k| {
        matches!(
            k.as_str(),
            "te" | "connection"
                | "transfer-encoding"
                | "upgrade"
                | "keep-alive"
                | "proxy-connection"
        )
    });
    if !any {
        return;
    }
    if let Some(conn) = h.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            let name = name.trim();
            // gRPC needs `te: trailers` end to end; keep it even when listed.
            if !name.is_empty() && !name.eq_ignore_ascii_case("te") {
                h.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    if request
        && let Some(te) = h.get(header::TE)
        && te.as_bytes() != b"trailers"
    {
        h.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        let mut h = HeaderMap::new();
        set_grpc_timeout(&mut h, Duration::from_millis(1500));
        assert_eq!(h["grpc-timeout"], "1500000u");
        set_grpc_timeout(&mut h, Duration::from_secs(1000));
        assert_eq!(h["grpc-timeout"], "1000000m");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-foo, keep-alive, te"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-bar", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, true);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["te", "x-bar"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key(header::TE));
        // Each alone, so the first pass over the names must see it.
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h, false);
            assert!(h.is_empty(), "{name} left in");
        }
    }
}
