//! Transparent interception end to end: a "pod" network namespace programmed by
//! `ferry init`, the sidecar running there as uid 1337, and a "peer" namespace with real
//! upstreams, joined by veth. The app in the pod calls the peer's address directly and
//! never learns about the proxy. Needs root (CI runs as root); skipped otherwise.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::netns::{Namespaces, as_proxy_user, ferry_for_proxy_user, is_root, must};
use support::{Ferry, raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const POD: &str = "10.250.7.1";
const PEER: &str = "10.250.7.2";
/// A second peer address, in a range the pod skips with `--skip-outbound-cidrs`.
const PEER_SKIPPED: &str = "10.250.8.2";
const POD6: &str = "fd00:250:7::1";
const PEER6: &str = "fd00:250:7::2";

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Reads a counter of the sidecar's metrics, from inside the pod.
fn counter(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

async fn h2_get(to: SocketAddr, path: &str) -> (u16, String) {
    let mut tx = support::h2c(to).await;
    let req = hyper::Request::get(format!("http://{to}{path}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `bytes`, closes the sending half, and reads until the peer closes.
async fn tcp_round_trip(to: SocketAddr, bytes: &'static [u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    back
}

#[test]
fn the_pod_calls_peers_directly_and_every_call_goes_through_the_sidecar() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    let ns = Namespaces::new("ferry-ic", 2);
    let (pod_if, peer_if) = ns.link(0, &format!("{POD}/24"), 1, &format!("{PEER}/24"));
    // IPv6 too, without duplicate address detection's wait.
    for (i, ifname, a) in [(0, &pod_if, POD6), (1, &peer_if, PEER6)] {
        must(&[
            "ip",
            "-n",
            ns.name(i),
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            ifname,
            "nodad",
        ]);
    }
    must(&[
        "ip",
        "-n",
        ns.name(1),
        "addr",
        "add",
        &format!("{PEER_SKIPPED}/24"),
        "dev",
        &format!("vb{}01", std::process::id() % 100_000),
    ]);
    must(&[
        "ip",
        "-n",
        ns.name(0),
        "route",
        "add",
        "10.250.8.0/24",
        "dev",
        &pod_if,
    ]);

    // Peers: HTTP (8080, and 8081 which the pod skips), gRPC, TCP echo, a banner server.
    ns.spawn(1, || async {
        for (port, name) in [(8080, "peer-http"), (8081, "peer-skipped")] {
            let l = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
            tokio::spawn(ferry_demo::serve_http(name.into(), l));
        }
        tokio::spawn(ferry_demo::serve_grpc(
            "peer-grpc".into(),
            TcpListener::bind("0.0.0.0:50051").await.unwrap(),
        ));
        tokio::spawn(ferry_demo::serve_tcp_echo(
            TcpListener::bind("0.0.0.0:7000").await.unwrap(),
        ));
        tokio::spawn(ferry_demo::serve_banner(
            TcpListener::bind("0.0.0.0:2525").await.unwrap(),
        ));
        std::future::pending::<()>().await
    });
    // The pod's own apps: on every address (9090, both families), on the pod IP only
    // (9092), and on loopback only (9091: a debug port meant to stay inside the pod).
    ns.spawn(0, || async {
        for (bind, name) in [
            ("0.0.0.0:9090".to_string(), "pod-app"),
            ("[::]:9090".to_string(), "pod-app"),
            (format!("{POD}:9092"), "pod-ip-app"),
            (format!("[{POD6}]:9092"), "pod-ip-app"),
            ("127.0.0.1:9091".to_string(), "pod-local"),
            ("[::1]:9091".to_string(), "pod-local"),
        ] {
            let l = socket2::Socket::new(
                if bind.starts_with('[') {
                    socket2::Domain::IPV6
                } else {
                    socket2::Domain::IPV4
                },
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            if bind.starts_with('[') {
                l.set_only_v6(true).unwrap();
            }
            l.set_reuse_address(true).unwrap();
            l.bind(&bind.parse::<SocketAddr>().unwrap().into()).unwrap();
            l.listen(64).unwrap();
            l.set_nonblocking(true).unwrap();
            let l = TcpListener::from_std(l.into()).unwrap();
            tokio::spawn(ferry_demo::serve_http(name.into(), l));
        }
        std::future::pending::<()>().await
    });

    // A copy of the binary uid 1337 may run, and its policy.
    let (_bin_dir, bin, dir) = ferry_for_proxy_user();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "admin: 0.0.0.0:15000\nopaque-ports: [7000]\nlisteners:\n  - {name: outbound, bind: \"0.0.0.0:15001\", transparent: outbound}\n  - {name: inbound, bind: \"0.0.0.0:15006\", transparent: inbound}\n  - {name: inbound-v6, bind: \"[::]:15006\", transparent: inbound}\n",
    )
    .unwrap();

    // `ferry init`, twice, as an init container restarted would: one set of rules.
    let init = [
        "ip",
        "netns",
        "exec",
        ns.name(0),
        &bin,
        "init",
        "--skip-outbound-ports",
        "8081",
        "--skip-outbound-cidrs",
        "10.250.8.0/24",
    ];
    must(&init);
    must(&init);
    let rules = must(&[
        "ip",
        "netns",
        "exec",
        ns.name(0),
        "iptables-save",
        "-t",
        "nat",
    ]);
    assert_eq!(
        rules.matches("-A OUTPUT -p tcp -j FERRY_OUTPUT").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules
            .matches("-A PREROUTING -p tcp -j FERRY_INBOUND")
            .count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules
            .matches("-A FERRY_OUTPUT -m owner --uid-owner 1337 -j RETURN")
            .count(),
        1,
        "{rules}"
    );
    let dry = must(&[&bin, "init", "--dry-run"]);
    assert!(dry.contains("REDIRECT --to-ports 15001"), "{dry}");

    let prefix = as_proxy_user(ns.name(0));
    let ferry = Ferry::start_bin(dir, &bin, &["--log-level", "warn"], &prefix);
    assert_eq!(ferry.addr("outbound").port(), 15001);

    let metrics = |ns: &Namespaces| {
        ns.run(0, || async {
            raw(addr("127.0.0.1", 15000), "GET", "/metrics", "").await.1
        })
    };
    let conns = |m: &str, listener: &str, proto: &str| {
        counter(
            m,
            &format!("ferry_tcp_connections_total{{listener=\"{listener}\",protocol=\"{proto}\"}}"),
        )
    };
    let before = metrics(&ns);

    // HTTP/1.1, h2c, gRPC, and plain TCP from the app to the peer's own address.
    let (h1, h2, grpc) = ns.run(0, || async {
        let h1 = raw(addr(PEER, 8080), "GET", "/headers", "").await;
        let h2 = h2_get(addr(PEER, 8080), "/").await;
        let grpc = ferry_demo::grpc_say(addr(PEER, 50051), "through the mesh")
            .await
            .unwrap();
        (h1, h2, grpc)
    });
    assert_eq!(h1.0, 200);
    let seen: std::collections::BTreeMap<String, String> = serde_json::from_str(&h1.1).unwrap();
    // The sidecar was on the path: it started a trace and named the request.
    assert!(seen["traceparent"].starts_with("00-"), "{seen:?}");
    assert!(seen.contains_key("x-request-id"), "{seen:?}");
    assert_eq!(h2, (200, "hello from peer-http\n".to_string()));
    assert_eq!(grpc, "through the mesh (from peer-grpc)");

    // 64 MiB up and back, byte for byte.
    let big: Vec<u8> = (0..64 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let sent = big.clone();
    let echoed = ns.run(0, move || async move {
        let s = TcpStream::connect(addr(PEER, 8080)).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/echo")
            .header("host", "peer")
            .body(Full::new(Bytes::from(sent)))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    });
    assert!(
        echoed.len() == big.len() && echoed[..] == big[..],
        "64 MiB body changed on the way"
    );

    // Raw TCP with a half-close: the client stops sending, still reads everything back.
    let sent: &[u8] = b"opaque bytes \x00\x01\x02 end";
    assert_eq!(
        ns.run(0, move || tcp_round_trip(addr(PEER, 7000), sent)),
        sent
    );
    // Port 7000 is in opaque-ports: even bytes that look like HTTP are not parsed.
    let sent: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(
        ns.run(0, move || tcp_round_trip(addr(PEER, 7000), sent)),
        sent
    );

    // A server that speaks first gets through without waiting for the client.
    let banner = ns.run(0, || async {
        let mut s = TcpStream::connect(addr(PEER, 2525)).await.unwrap();
        let mut buf = vec![0u8; ferry_demo::BANNER.len()];
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
            .await
            .expect("banner within a second")
            .unwrap();
        buf
    });
    assert_eq!(banner, ferry_demo::BANNER);

    let after = metrics(&ns);
    assert!(
        conns(&after, "outbound", "http1") >= conns(&before, "outbound", "http1") + 2,
        "{after}"
    );
    assert_eq!(
        conns(&after, "outbound", "http2"),
        conns(&before, "outbound", "http2") + 2,
        "h2c and gRPC: {after}"
    );
    assert_eq!(
        conns(&after, "outbound", "opaque"),
        conns(&before, "outbound", "opaque") + 3,
        "{after}"
    );
    assert!(after.contains(&format!("ferry_requests_total{{direction=\"outbound\",service=\"{PEER}:8080\",route=\"\",status_code=\"200\",grpc_status=\"\",classification=\"success\"}}")), "{after}");

    // Skipped port and CIDR go straight out: the sidecar sees nothing.
    let skipped = ns.run(0, || async {
        let a = raw(addr(PEER, 8081), "GET", "/", "").await;
        let b = raw(addr(PEER_SKIPPED, 8080), "GET", "/", "").await;
        (a, b)
    });
    assert_eq!(skipped.0, (200, "hello from peer-skipped\n".to_string()));
    assert_eq!(skipped.1, (200, "hello from peer-http\n".to_string()));
    let after_skips = metrics(&ns);
    for proto in ["http1", "http2", "opaque"] {
        assert_eq!(
            conns(&after_skips, "outbound", proto),
            conns(&after, "outbound", proto),
            "{proto}"
        );
    }

    // Inbound: the peer calls the pod's app port and arrives through the inbound listener.
    let inbound = ns.run(1, || async { raw(addr(POD, 9090), "GET", "/", "").await });
    assert_eq!(inbound, (200, "hello from pod-app\n".to_string()));
    let after_in = metrics(&ns);
    assert_eq!(
        conns(&after_in, "inbound", "http1"),
        conns(&after_skips, "inbound", "http1") + 1,
        "{after_in}"
    );

    // The sidecar reaches the app where the caller was going, the pod's own address: an
    // app bound to it or to every address answers, one bound to loopback alone does not,
    // exactly as without the mesh. Both families.
    let calls = ns.run(1, || async {
        let mut out = Vec::new();
        for ip in [POD, POD6] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            for port in [9090, 9092, 9091] {
                out.push((
                    ip,
                    port,
                    raw(SocketAddr::new(ip, port), "GET", "/", "").await,
                ));
            }
        }
        out
    });
    for (ip, port, (status, body)) in calls {
        match port {
            9090 => assert_eq!(
                (status, body.as_str()),
                (200, "hello from pod-app\n"),
                "{ip}"
            ),
            9092 => assert_eq!(
                (status, body.as_str()),
                (200, "hello from pod-ip-app\n"),
                "{ip}"
            ),
            _ => assert!(
                status != 200 && !body.contains("pod-local"),
                "a loopback-only app answered a caller from the network through the sidecar at {ip}: {status} {body}"
            ),
        }
    }
    let after_v6 = metrics(&ns);
    assert!(
        conns(&after_v6, "inbound-v6", "http1") >= 3,
        "IPv6 calls went through the IPv6 inbound listener: {after_v6}"
    );

    // Cleanup removes every rule and chain.
    drop(ferry);
    must(&["ip", "netns", "exec", ns.name(0), &bin, "init", "--cleanup"]);
    let rules = must(&[
        "ip",
        "netns",
        "exec",
        ns.name(0),
        "iptables-save",
        "-t",
        "nat",
    ]);
    assert!(!rules.contains("FERRY"), "{rules}");
}

/// Without a policy file ferry runs as a pod's sidecar: transparent listeners on both
/// address families beside each other, annotations from the downward-API file.
#[test]
fn pod_mode_listens_on_ipv4_and_ipv6_side_by_side() {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace (CI runs as root)");
        return;
    }
    let ns = Namespaces::new("ferry-pod", 1);
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("annotations");
    std::fs::write(&ann, "ferry.dev/lb=\"round-robin\"\n").unwrap();
    let ann = ann.display().to_string();
    let ferry = Ferry::run(
        dir,
        env!("CARGO_BIN_EXE_ferry"),
        &["proxy", "--annotations", &ann],
        &["ip", "netns", "exec", ns.name(0)],
    );
    for (name, addr) in [
        ("outbound", "0.0.0.0:15001"),
        ("inbound", "0.0.0.0:15006"),
        ("outbound-v6", "[::]:15001"),
        ("inbound-v6", "[::]:15006"),
    ] {
        assert_eq!(ferry.addr(name), addr.parse().unwrap(), "{name}");
    }
    let lb = ns.run(0, || async {
        let (_, p) = support::call(addr("127.0.0.1", 15000), "GET", "/policy", "").await;
        p["policy"]["defaults"]["lb"].clone()
    });
    assert_eq!(lb, "round-robin");
}
