//! An HTTP/1.1 upgrade (what WebSocket uses) passes through the proxy and becomes a
//! byte tunnel. The proxy runs in-process on real loopback sockets.

use std::sync::Arc;

use bytes::Bytes;
use ferry_policy::Policy;
use ferry_proxy::{DefaultDiscover, Metrics, Proxy, Shared};
use http_body_util::Empty;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An upstream that accepts `Upgrade: echo` and then echoes bytes back.
async fn upgrade_upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    assert_eq!(req.headers()["upgrade"], "echo");
                    tokio::spawn(async move {
                        let up = hyper::upgrade::on(&mut req).await.unwrap();
                        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                        tokio::io::copy(&mut r, &mut w).await.unwrap();
                    });
                    let resp = Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    Ok::<_, hyper::Error>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upgraded_connection_tunnels_bytes_both_ways() {
    let up = upgrade_upstream().await;
    let policy = Policy::from_yaml(&format!(
        "listeners: [{{name: web, bind: \"127.0.0.1:0\", service: web}}]\nservices: {{web: {{endpoints: [\"{up}\"], timeout: 1s}}}}"
    ))
    .unwrap();
    let shared = Shared::new(
        policy,
        Arc::new(DefaultDiscover::default()),
        Metrics::default(),
    )
    .unwrap();
    let proxy = Proxy::bind(shared).await.unwrap();
    let addr = proxy.local_addrs()[0].1;
    let (_drain_tx, drain) = tokio::sync::watch::channel(false);
    tokio::spawn(proxy.serve(drain));

    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    // The 1 s request timeout does not cut a tunnel.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    c.write_all(b"ping across the tunnel").await.unwrap();
    let mut buf = [0u8; 22];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping across the tunnel");
}
