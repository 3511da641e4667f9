//! HTTP/1.1 and h2c through the real sidecar: what a client sees.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_demo::HttpUpstream;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{Conn, Ferry, raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn policy(eps: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "admin: 127.0.0.1:0\nheader-read-timeout: 500ms\nlisteners: [{{name: web, bind: \"127.0.0.1:0\", service: web}}]\n\
         services:\n  web:\n    lb: round-robin\n{extra}    endpoints: [{}]\n",
        eps.join(", ")
    )
}

#[tokio::test]
async fn keep_alive_carries_many_requests_and_bodies_intact() {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let s = TcpStream::connect(f.addr("web")).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..200 {
        tx.ready().await.unwrap();
        let req = hyper::Request::get("/")
            .header("host", "web")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "hello from a\n"
        );
    }
    // One client connection; the upstream saw all 200 requests.
    assert_eq!(up.hits(), 200);
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    tx.ready().await.unwrap();
    let req = hyper::Request::post("/echo")
        .header("host", "web")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), big);
}

#[tokio::test]
async fn h2c_multiplexes_many_streams_on_one_connection() {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let tx = support::h2c(f.addr("web")).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let req = hyper::Request::get(format!("http://web/delay?ms={}", i % 20))
                .body(Full::<Bytes>::default())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            (
                resp.status(),
                resp.into_body().collect().await.unwrap().to_bytes(),
            )
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with(b"hello from a after"));
    }
    let m = f.metrics().await;
    assert!(
        m.contains("ferry_tcp_connections_total{listener=\"web\",protocol=\"http2\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let mut s = TcpStream::connect(f.addr("web")).await.unwrap();
    // Twice on one connection: the second request shows the connection stayed usable.
    for _ in 0..2 {
        s.write_all(
            b"GET /headers HTTP/1.1\r\nHost: web\r\nConnection: x-foo, keep-alive\r\nX-Foo: secret\r\n\
              Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: foo/1\r\n\
              X-End-To-End: kept\r\nTE: trailers\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let seen: BTreeMap<String, String> = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen.get("x-end-to-end").map(String::as_str), Some("kept"));
        assert_eq!(seen.get("te").map(String::as_str), Some("trailers"));
        for h in ["x-foo", "keep-alive", "proxy-connection", "upgrade"] {
            assert!(!seen.contains_key(h), "{h} reached the upstream: {seen:?}");
        }
        let connection = seen.get("connection").cloned().unwrap_or_default();
        assert!(
            !connection.contains("x-foo"),
            "the client's Connection header reached the upstream: {connection}"
        );
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body: the head and the body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = buf.split_off(head_end);
    while body.len() < len {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, body)
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";

/// A new connection that has had one [`GET`] answered 200: it, and the body.
async fn get_ok(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (s, body)
}

async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn bad_requests_are_refused_and_harm_no_one_else() {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let web = f.addr("web");
    let malformed = send_raw(
        web,
        b"GET / HTTP/1.1\r\nHost: web\r\nBad Header Line\r\n\r\n",
    )
    .await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let too_large = send_raw(web, huge.as_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");

    // A client that never finishes its headers is cut off after header-read-timeout,
    // while a well-behaved client is served all along.
    let started = Instant::now();
    let mut slow = TcpStream::connect(web).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ")
        .await
        .unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let bystander = tokio::spawn({
        let cut = cut.clone();
        async move {
            let mut c = Conn::open(web).await.unwrap();
            let (mut before, mut after) = (0, 0);
            // Until the slow client is cut off, then a few more to show nothing broke.
            while after < 3 {
                assert_eq!(
                    c.get("/").await.unwrap(),
                    (200, "hello from a\n".to_string())
                );
                if cut.load(Ordering::Relaxed) {
                    after += 1;
                } else {
                    before += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            before + after
        }
    });
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut sink)).await;
    cut.store(true, Ordering::Relaxed);
    assert!(r.is_ok(), "the slow client was never cut off");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "cut off before the header-read timeout"
    );
    let answers = bystander.await.unwrap();
    assert_eq!(
        up.hits(),
        answers,
        "none of the bad requests reached the upstream"
    );
}

#[tokio::test]
async fn timeouts_and_missing_endpoints_answer_with_the_proxys_reason() {
    let up = HttpUpstream::start("a").await.unwrap();
    // Nothing listens on a port we bound and closed.
    let closed = support::dead_addr();
    // A listener whose backlog is full and never accepts: connects hang.
    let hang = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hang.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    hang.listen(0).unwrap();
    let hang_addr = hang.local_addr().unwrap().as_socket().unwrap();
    let _fillers: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&hang_addr, Duration::from_millis(100)).ok()
        })
        .collect();

    let doc = format!(
        "admin: 127.0.0.1:0\nlisteners:\n  - {{name: web, bind: \"127.0.0.1:0\", service: web}}\n  - {{name: empty, bind: \"127.0.0.1:0\", service: empty}}\n  - {{name: refused, bind: \"127.0.0.1:0\", service: refused}}\n  - {{name: hang, bind: \"127.0.0.1:0\", service: hang}}\n\
         services:\n  web:\n    timeout: 200ms\n    endpoints: [\"{}\"]\n  empty:\n    endpoints: []\n  refused:\n    endpoints: [\"{closed}\"]\n  hang:\n    connect-timeout: 200ms\n    endpoints: [\"{hang_addr}\"]\n",
        up.addr
    );
    let f = Ferry::start(&doc, &[], &[]);
    let ferry_error = |h: &hyper::HeaderMap| {
        h.get("x-ferry-error")
            .map(|v| v.to_str().unwrap().to_string())
    };

    let mut c = Conn::open(f.addr("web")).await.unwrap();
    let (status, h, _) = c.get_with("/delay?ms=1000", &[]).await.unwrap();
    assert_eq!((status, ferry_error(&h).as_deref()), (504, Some("timeout")));
    let (status, h, _) = Conn::open(f.addr("web"))
        .await
        .unwrap()
        .get_with("/status/404", &[])
        .await
        .unwrap();
    assert_eq!(
        (status, ferry_error(&h)),
        (404, None),
        "an upstream answer carries no x-ferry-error"
    );

    for (listener, code, reason) in [
        ("empty", 503, "no-endpoints"),
        ("refused", 503, "connect-failed"),
        ("hang", 503, "connect-timeout"),
    ] {
        let (status, h, body) = Conn::open(f.addr(listener))
            .await
            .unwrap()
            .get_with("/", &[])
            .await
            .unwrap();
        assert_eq!(
            (status, ferry_error(&h).as_deref()),
            (code, Some(reason)),
            "{listener}: {body}"
        );
    }
    let m = f.metrics().await;
    assert!(
        m.contains("ferry_errors_total{service=\"web\",reason=\"timeout\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferry_errors_total{service=\"hang\",reason=\"connect-timeout\"} 1"),
        "{m}"
    );
}

/// A route's timeout governs the requests it matches; every other path keeps the
/// service's timeout.
#[tokio::test]
async fn a_route_timeout_applies_to_its_route_only() {
    let up = HttpUpstream::start("a").await.unwrap();
    let extra = "    timeout: 200ms\n    routes:\n      - match: {path-prefix: /delay/long}\n        timeout: 5s\n";
    let f = Ferry::start(&policy(&[up.addr], extra), &[], &[]);
    for (path, expect) in [
        ("/delay/long?ms=600", (200, None)),
        ("/delay/short?ms=600", (504, Some("timeout"))),
        ("/delay?ms=600", (504, Some("timeout"))),
    ] {
        let (status, h, _) = Conn::open(f.addr("web"))
            .await
            .unwrap()
            .get_with(path, &[])
            .await
            .unwrap();
        let reason = h.get("x-ferry-error").map(|v| v.to_str().unwrap());
        assert_eq!((status, reason), expect, "{path}");
    }
}

#[tokio::test]
async fn retries_route_around_a_dead_endpoint() {
    let up = HttpUpstream::start("a").await.unwrap();
    let dead = support::dead_addr();
    let f = Ferry::start(&policy(&[up.addr, dead], "    retries: 2\n"), &[], &[]);
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    // A POST is not resent once written, but a refused connect read none of its body,
    // which then goes whole to the live endpoint.
    // (Round robin: the first, third and fifth go to the dead one first.)
    for i in 0..20 {
        let body = format!("order {i}");
        assert_eq!(c.post("/echo", &body).await.unwrap(), (200, body));
    }
    for _ in 0..20 {
        assert_eq!(
            c.get("/").await.unwrap(),
            (200, "hello from a\n".to_string())
        );
    }
    let (_, eps) = f.admin("GET", "/endpoints", "").await;
    let dead_state = eps["services"]["web"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == dead.to_string())
        .unwrap()
        .clone();
    // Three refused connects in a row: passed over (and probed) until it answers.
    assert_eq!(dead_state["health"], "ejected", "{eps}");
    assert!(
        dead_state["consecutive_failures"].as_u64() >= Some(3),
        "{eps}"
    );
    // Each refused connect was retried on the live endpoint; the third ejected it.
    // (More if the test is slow enough for the ejection to lapse once.)
    let m = f.metrics().await;
    let value = |series: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        value(r#"ferry_retries_total{service="web",reason="connect-failed"}"#) >= 3,
        "{m}"
    );
    assert!(value(r#"ferry_ejections_total{service="web"}"#) >= 1, "{m}");
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let up = HttpUpstream::start("a").await.unwrap();
    let mut f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let web = f.addr("web");
    let slow =
        tokio::spawn(async move { Conn::open(web).await.unwrap().get("/delay?ms=700").await });
    // Signal only once the request has reached the upstream: it is truly in flight.
    assert!(support::eventually(Duration::from_secs(5), || async { up.hits() == 1 }).await);
    f.signal("TERM");
    let r = slow.await.unwrap();
    assert_eq!(r.unwrap().0, 200, "the in-flight request was cut");
    // New connections are refused once draining began.
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            TcpStream::connect(web).await.is_err()
        })
        .await
    );
    let started = Instant::now();
    let status = loop {
        if let Some(s) = f.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "ferry did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// What a dashboard charts: calls by direction, service, route, status and
/// classification, durations to the end of the body; per-endpoint series only when asked.
#[tokio::test]
async fn metrics_count_calls_by_direction_service_route_status_and_classification() {
    let up = HttpUpstream::start("a").await.unwrap();
    let extra = "    routes:\n      - match: {path-prefix: /status}\n        timeout: 5s\n";
    let f = Ferry::start(&policy(&[up.addr], extra), &[], &[]);
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    for _ in 0..3 {
        c.get("/").await.unwrap();
    }
    c.get("/status/418").await.unwrap();
    c.get("/status/503").await.unwrap();
    let (status, _) = f.admin("GET", "/live", "").await;
    assert_eq!(status, 200);
    let (status, _) = raw(f.addr("admin"), "GET", "/ready", "").await;
    assert_eq!(status, 200);
    let m = f.metrics().await;
    for want in [
        r#"ferry_requests_total{direction="outbound",service="web",route="",status_code="200",grpc_status="",classification="success"} 3"#,
        r#"ferry_requests_total{direction="outbound",service="web",route="/status",status_code="418",grpc_status="",classification="success"} 1"#,
        r#"ferry_requests_total{direction="outbound",service="web",route="/status",status_code="503",grpc_status="",classification="failure"} 1"#,
        r#"ferry_request_duration_seconds_count{direction="outbound",service="web",route="",classification="success"} 3"#,
        r#"ferry_request_duration_seconds_count{direction="outbound",service="web",route="/status",classification="failure"} 1"#,
    ] {
        assert!(m.contains(want), "missing {want}\n{m}");
    }
    // No per-endpoint series unless the policy asks for them.
    assert!(!m.contains(&up.addr.to_string()), "{m}");
    let (code, _) = f
        .admin("PUT", "/policy", "metrics-endpoint-labels: true")
        .await;
    assert_eq!(code, 200);
    c.get("/").await.unwrap();
    let m = f.metrics().await;
    let want = format!(
        "ferry_endpoint_requests_total{{service=\"web\",endpoint=\"{}\",status_code=\"200\"}} 1",
        up.addr
    );
    assert!(m.contains(&want), "missing {want}\n{m}");

    // Istio's names and labels too, for dashboards made for Istio and Kiali.
    let (code, _) = f.admin("PUT", "/policy", "metrics-compat: istio").await;
    assert_eq!(code, 200);
    c.get("/").await.unwrap();
    c.get("/status/503").await.unwrap();
    let m = f.metrics().await;
    for want in [
        r#"istio_requests_total{reporter="source",source_workload="unknown",source_workload_namespace="unknown",source_app="unknown",destination_workload="unknown",destination_workload_namespace="unknown",destination_app="unknown",destination_service="web",destination_service_name="web",destination_service_namespace="unknown",request_protocol="http",response_code="200",grpc_response_status="",response_flags="-",connection_security_policy="none"} 1"#,
        r#"response_code="503",grpc_response_status="",response_flags="-",connection_security_policy="none"} 1"#,
        r#"istio_request_duration_milliseconds_bucket{le="10.0",reporter="source""#,
    ] {
        assert!(m.contains(want), "missing {want}\n{m}");
    }
}

/// An idle keep-alive connection is not the slow client header-read-timeout is for:
/// it stays open for idle-timeout, and the next POST on it succeeds.
#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_read_timeout() {
    let up = HttpUpstream::start("a").await.unwrap();
    let post = b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello";
    // header-read-timeout is 500ms here; the default idle-timeout is an hour.
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let mut s = TcpStream::connect(f.addr("web")).await.unwrap();
    for _ in 0..2 {
        s.write_all(post).await.unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"hello");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    // With idle-timeout set, an idle connection is closed once it passes.
    let f = Ferry::start(
        &format!("idle-timeout: 700ms\n{}", policy(&[up.addr], "")),
        &[],
        &[],
    );
    let mut s = TcpStream::connect(f.addr("web")).await.unwrap();
    s.write_all(post).await.unwrap();
    read_response(&mut s).await;
    closed_between(&mut s, Duration::from_millis(600), Duration::from_secs(5)).await;
}

/// Asserts the connection is closed by ferry no sooner than `not_before` from now (its
/// idle-timeout, counted from the last response) and within `within`.
async fn closed_between(s: &mut TcpStream, not_before: Duration, within: Duration) {
    let t = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(within, s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle connection was never closed");
    assert!(
        t.elapsed() >= not_before,
        "closed {:?} after its last response, before idle-timeout",
        t.elapsed()
    );
}

/// Idle keep-alive connections give hyper's buffers (~16 KiB each) back after a second
/// and keep their sockets, and each still answers its next request, whether it arrives
/// whole, in pieces or pipelined. The idle timeout still counts from the last response.
#[tokio::test]
async fn idle_connections_give_their_buffers_back_and_still_serve() {
    const CONNS: usize = 500;
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(
        &format!("idle-timeout: 8s\n{}", policy(&[up.addr], "")),
        &[],
        &[],
    );
    let pid = f.child.id();
    let before = support::proc_status(pid, "VmRSS");
    let mut conns = Vec::new();
    // Ten at a time, so that the upstream pool stays small beside the 500.
    for _ in 0..CONNS / 10 {
        let batch = (0..10).map(|_| async {
            let (s, body) = get_ok(f.addr("web")).await;
            assert_eq!(body, b"hello from a\n");
            s
        });
        conns.extend(futures::future::join_all(batch).await);
    }
    let served = Instant::now();
    let busy = rss_each(pid, before, CONNS);
    // Released after 1 s idle; the memory goes back to the system a second later.
    let window = (Duration::from_millis(2500), Duration::from_secs(5));
    let idle = rss_each_until(pid, before, CONNS, served, window, busy - 4.0).await;
    eprintln!("{CONNS} connections: {busy:.1} KiB of RSS each just served, {idle:.1} idle");
    // hyper's read and write buffers touch at least a page each.
    assert!(
        busy - idle > 4.0,
        "idle connections cost {idle:.1} KiB each, {busy:.1} just served: not given back"
    );

    // Every one still serves: whole requests, one in two pieces, two pipelined.
    for s in conns.iter_mut().skip(2) {
        s.write_all(GET).await.unwrap();
        let (head, _) = read_response(s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "after release: {head}");
    }
    let (pieces, rest) = conns.split_at_mut(1);
    let s = &mut pieces[0];
    s.write_all(&GET[..9]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&GET[9..]).await.unwrap();
    let (head, _) = read_response(s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "in pieces: {head}");
    let s = &mut rest[0];
    s.write_all(&[GET, GET].concat()).await.unwrap();
    for _ in 0..2 {
        let (head, _) = read_response(s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "pipelined: {head}");
    }

    // Released or not, a connection is closed once idle-timeout (8 s) passes from its
    // last response, and not before.
    closed_between(s, Duration::from_millis(7500), Duration::from_secs(15)).await;
}

/// Ferry's RSS above `base`, in KiB per connection.
fn rss_each(pid: u32, base: u64, conns: usize) -> f64 {
    support::proc_status(pid, "VmRSS").saturating_sub(base) as f64 / conns as f64
}

/// Polls [`rss_each`] until it is below `below` once `not_before` has passed since
/// `since`, or until `until` has; returns the last reading.
async fn rss_each_until(
    pid: u32,
    base: u64,
    conns: usize,
    since: Instant,
    (not_before, until): (Duration, Duration),
    below: f64,
) -> f64 {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_each(pid, base, conns);
        if (since.elapsed() >= not_before && now < below) || since.elapsed() >= until {
            return now;
        }
    }
}

/// What client connections held goes back to the system once they close, and what the
/// upstream connections they used held once the pool closes those (5-10 s after their
/// last use): a sidecar gone quiet does not keep the peak of its last burst.
#[tokio::test]
async fn closed_client_and_pool_connections_give_their_memory_back() {
    const CONNS: usize = 300;
    // Slow answers, so that every call holds an upstream connection of its own.
    let up = support::slow_upstream("a", Duration::from_millis(500)).await;
    // jemalloc's own decay also returns pages, but only as later allocations tick it
    // (never, on a sidecar that went quiet): off here, so that only ferry's purge counts.
    support::set_child_env("_RJEM_MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1");
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    support::clear_child_env();
    let pid = f.child.id();
    let before = support::proc_status(pid, "VmRSS");
    let calls = (0..CONNS).map(|_| get_ok(f.addr("web")));
    futures::future::join_all(calls).await;
    let served = Instant::now();
    let busy = rss_each(pid, before, CONNS);
    assert_eq!(up.hits.load(Ordering::Relaxed), CONNS as u64);

    // The clients closed as their calls ended.
    let window = (Duration::from_millis(1500), Duration::from_secs(4));
    let closed = rss_each_until(pid, before, CONNS, served, window, busy - 4.0).await;
    let window = (Duration::ZERO, Duration::from_secs(16));
    let pool_closed = rss_each_until(pid, before, CONNS, served, window, closed - 4.0).await;
    eprintln!(
        "{CONNS} calls: {busy:.1} KiB of RSS each just served, {closed:.1} with the clients \
         gone, {pool_closed:.1} with the pool's connections closed too"
    );
    // Each side's hyper connection holds at least a page of buffers.
    assert!(
        busy - closed > 4.0,
        "closed client connections kept {closed:.1} KiB each ({busy:.1} just served)"
    );
    assert!(
        closed - pool_closed > 4.0,
        "closed pool connections kept {pool_closed:.1} KiB each ({closed:.1} before)"
    );
}

/// A WebSocket-style upgrade becomes a byte tunnel to the upstream once it answers 101,
/// also on a keep-alive connection that sat idle (and was released) first; bytes the
/// client sent right behind its upgrade request reach the upstream first.
#[tokio::test]
async fn an_upgrade_becomes_a_tunnel_even_after_the_connection_idled() {
    // The upstream answers plain requests with "ok" and upgrade requests with 101, after
    // which it echoes bytes in upper case.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if !head.contains("upgrade: shout") {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        s.write_all(ok).await.unwrap();
                        continue;
                    }
                    let switched = b"HTTP/1.1 101 Switching Protocols\r\n\
                        Connection: upgrade\r\nUpgrade: shout\r\n\r\n";
                    s.write_all(switched).await.unwrap();
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => s.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap(),
                        }
                    }
                }
            });
        }
    });
    let f = Ferry::start(&policy(&[up], ""), &[], &[]);
    let (mut s, body) = get_ok(f.addr("web")).await;
    assert_eq!(body, b"ok");
    // Past the second after which an idle connection is released.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: shout\r\n\r\nearly ",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let want_head = "HTTP/1.1 101";
    let switched = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(i) = text.find("\r\n\r\n")
                && text[i + 4..].contains("EARLY ")
            {
                return text;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed during the upgrade: {text}");
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the upgrade and the early bytes' echo in time");
    assert!(switched.starts_with(want_head), "{switched}");
    assert!(
        switched.to_ascii_lowercase().contains("upgrade: shout"),
        "{switched}"
    );

    s.write_all(b"and more").await.unwrap();
    let mut echo = vec![0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(echo, b"AND MORE");
    // The client ends its side; the tunnel passes that on and the upstream closes.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the tunnel did not end after both sides did");
}

/// A client that pauses inside its request line, longer than the detection window, is
/// still proxied as HTTP (the sidecar adds its request id), not tunnelled as bytes.
#[tokio::test]
async fn a_pause_inside_the_request_line_does_not_make_the_connection_opaque() {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(
        &format!("detect-timeout: 50ms\n{}", policy(&[up.addr], "")),
        &[],
        &[],
    );
    let mut s = TcpStream::connect(f.addr("web")).await.unwrap();
    s.write_all(b"GE").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"T /headers HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen: std::collections::BTreeMap<String, String> = serde_json::from_slice(&body).unwrap();
    assert!(
        seen.contains_key("x-request-id"),
        "proxied as HTTP: {seen:?}"
    );
}

/// RFC edge cases answered by the proxy itself: a malformed chunked body is the client's
/// fault (400), an absolute-form target names the Host, CONNECT is refused (405).
#[tokio::test]
async fn malformed_bodies_absolute_targets_and_connect_get_the_rfc_answers() {
    let up = HttpUpstream::start("a").await.unwrap();
    let f = Ferry::start(&policy(&[up.addr], ""), &[], &[]);
    let web = f.addr("web");

    let bad_chunk = send_raw(
        web,
        b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(bad_chunk.starts_with("HTTP/1.1 400"), "{bad_chunk}");
    assert!(
        bad_chunk.contains("x-ferry-error: bad-request"),
        "{bad_chunk}"
    );

    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"GET http://shop.example:8080/headers HTTP/1.1\r\nHost: wrong\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen: std::collections::BTreeMap<String, String> = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["host"], "shop.example:8080", "{seen:?}");

    let connect = send_raw(
        web,
        b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(
        connect.contains("x-ferry-error: connect-not-allowed"),
        "{connect}"
    );
    // Still serving.
    assert_eq!(raw(web, "GET", "/", "").await.0, 200);
}

/// A TCP server that echoes what it reads in upper case.
async fn shout_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads from `s` until `want` has come, or fails naming what did.
async fn read_until(s: &mut (impl tokio::io::AsyncRead + Unpin), want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        while !got.windows(want.len()).any(|w| w == want) {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before {:?} came: {:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("{:?} never came", String::from_utf8_lossy(want)));
    got
}

/// With `http-connect: tunnel`, CONNECT opens a TCP tunnel to one of the listener's
/// service's endpoints: 200, then bytes both ways, those sent right behind the request
/// first; over HTTP/1.1 (the rest of the connection) and HTTP/2 (the stream). An
/// endpoint that refuses is a 503 naming why, as for requests.
#[tokio::test]
async fn connect_opens_a_tunnel_to_the_service_when_the_policy_allows_it() {
    let shout = shout_server().await;
    let f = Ferry::start(
        &format!("http-connect: tunnel\n{}", policy(&[shout], "")),
        &[],
        &[],
    );
    let web = f.addr("web");

    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\nearly ")
        .await
        .unwrap();
    let got = read_until(&mut s, b"EARLY ").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    s.write_all(b"and later").await.unwrap();
    read_until(&mut s, b"AND LATER").await;
    drop(s);

    let mut tx = support::h2c(web).await;
    let req = hyper::Request::builder()
        .method("CONNECT")
        .uri("db.example:5432")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let mut resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "HTTP/2 CONNECT");
    let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
    io.write_all(b"over a stream").await.unwrap();
    read_until(&mut io, b"OVER A STREAM").await;
    // Counted as the service's TCP connections, bytes both ways.
    let m = f.metrics().await;
    for want in [
        r#"ferry_tcp_opened_total{direction="outbound",service="web"} 2"#,
        r#"ferry_tcp_received_bytes_total{direction="outbound",service="web"} 28"#,
        r#"ferry_tcp_sent_bytes_total{direction="outbound",service="web"} 28"#,
    ] {
        assert!(m.contains(want), "{want} not in:\n{m}");
    }
    drop((io, tx));

    let dead = support::dead_addr();
    let f = Ferry::start(
        &format!("http-connect: tunnel\n{}", policy(&[dead], "")),
        &[],
        &[],
    );
    let mut s = TcpStream::connect(f.addr("web")).await.unwrap();
    s.write_all(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n")
        .await
        .unwrap();
    let (refused, _) = read_response(&mut s).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains("x-ferry-error: connect-failed"),
        "{refused}"
    );
}

/// Behind an inbound sidecar the app still learns who called it.
#[tokio::test]
async fn the_app_behind_an_inbound_listener_sees_the_caller_in_x_forwarded_for() {
    let up = HttpUpstream::start("app").await.unwrap();
    let doc = |extra: &str| {
        format!(
            "admin: 127.0.0.1:0\n{extra}listeners: [{{name: in, bind: \"127.0.0.1:0\", service: app, direction: inbound}}]\n\
             services: {{app: {{endpoints: [\"{}\"]}}}}\n",
            up.addr
        )
    };
    let headers = |addr: SocketAddr, xff: Option<&'static str>| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let extra = xff
            .map(|v| format!("X-Forwarded-For: {v}\r\n"))
            .unwrap_or_default();
        s.write_all(format!("GET /headers HTTP/1.1\r\nHost: app\r\n{extra}\r\n").as_bytes())
            .await
            .unwrap();
        let (_, body) = read_response(&mut s).await;
        serde_json::from_slice::<std::collections::BTreeMap<String, String>>(&body).unwrap()
    };
    let f = Ferry::start(&doc(""), &[], &[]);
    let seen = headers(f.addr("in"), None).await;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen:?}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen:?}");
    let seen = headers(f.addr("in"), Some("203.0.113.7")).await;
    assert_eq!(
        seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1",
        "{seen:?}"
    );

    let f = Ferry::start(&doc("forwarded-headers: off\n"), &[], &[]);
    let seen = headers(f.addr("in"), None).await;
    assert!(!seen.contains_key("x-forwarded-for"), "{seen:?}");
}
