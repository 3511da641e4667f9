//! Opaque TCP: anything that is not HTTP passes through byte for byte.

mod support;

use std::time::{Duration, Instant};

use support::Ferry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn non_http_bytes_pass_through_and_server_first_protocols_do_not_stall() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ea, ba) = (echo.local_addr().unwrap(), banner.local_addr().unwrap());
    tokio::spawn(ferry_demo::serve_tcp_echo(echo));
    tokio::spawn(ferry_demo::serve_banner(banner));
    let f = Ferry::start(
        &format!(
            "admin: 127.0.0.1:0\ndetect-timeout: 100ms\nlisteners:\n  - {{name: echo, bind: \"127.0.0.1:0\", service: echo}}\n  - {{name: smtp, bind: \"127.0.0.1:0\", service: smtp}}\n  - {{name: raw, bind: \"127.0.0.1:0\", service: echo, protocol: opaque}}\n\
             services:\n  echo: {{endpoints: [\"{ea}\"]}}\n  smtp: {{endpoints: [\"{ba}\"]}}\n"
        ),
        &[],
        &[],
    );

    // Binary, with a half-close: everything comes back, then EOF.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut s = TcpStream::connect(f.addr("echo")).await.unwrap();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert!(back == payload, "bytes changed on the way");

    // The server speaks first; the client says nothing until greeted.
    let started = Instant::now();
    let mut s = TcpStream::connect(f.addr("smtp")).await.unwrap();
    let mut greeting = vec![0u8; ferry_demo::BANNER.len()];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, ferry_demo::BANNER);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "greeting took {:?}",
        started.elapsed()
    );

    // An opaque listener forwards even bytes that look like HTTP untouched.
    let mut s = TcpStream::connect(f.addr("raw")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nnot: parsed\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"GET / HTTP/1.1\r\nnot: parsed\r\n\r\n");

    let m = f.metrics().await;
    assert!(
        m.contains("ferry_tcp_connections_total{listener=\"echo\",protocol=\"opaque\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ferry_tcp_connections_total{listener=\"raw\",protocol=\"opaque\"} 1"),
        "{m}"
    );
    // Per service: opened and closed, none open now, and every byte each way.
    let req = b"GET / HTTP/1.1\r\nnot: parsed\r\n\r\n".len();
    let bytes = payload.len() + req;
    let smtp_in = 0;
    let smtp_out = ferry_demo::BANNER.len();
    let mut want = vec![
        r#"ferry_tcp_opened_total{direction="outbound",service="echo"} 2"#.to_string(),
        r#"ferry_tcp_open_connections{direction="outbound",service="echo"} 0"#.to_string(),
        format!(r#"ferry_tcp_received_bytes_total{{direction="outbound",service="echo"}} {bytes}"#),
        format!(r#"ferry_tcp_sent_bytes_total{{direction="outbound",service="echo"}} {bytes}"#),
        format!(
            r#"ferry_tcp_received_bytes_total{{direction="outbound",service="smtp"}} {smtp_in}"#
        ),
    ];
    want.push(r#"ferry_tcp_closed_total{direction="outbound",service="echo"} 2"#.to_string());
    let ok = support::eventually(Duration::from_secs(5), || async {
        let m = f.metrics().await;
        want.iter().all(|w| m.contains(w.as_str()))
    })
    .await;
    let m = f.metrics().await;
    assert!(ok, "missing some of {want:?}\n{m}");
    // The smtp connection is still open: counted as open, its greeting as sent.
    assert!(
        m.contains(r#"ferry_tcp_open_connections{direction="outbound",service="smtp"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            r#"ferry_tcp_sent_bytes_total{{direction="outbound",service="smtp"}} {smtp_out}"#
        )),
        "{m}"
    );
    drop(s);
}
