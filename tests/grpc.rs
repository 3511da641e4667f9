//! gRPC through the real sidecar with tonic: every call shape, statuses and trailers,
//! deadlines.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use ferry_demo::proto::EchoRequest;
use ferry_demo::proto::echo_client::EchoClient;
use futures::StreamExt;
use support::Ferry;
use tokio::net::TcpListener;
use tonic::Code;

async fn grpc_upstream(name: &str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(ferry_demo::serve_grpc(name.to_string(), l));
    a
}

fn policy(eps: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "admin: 127.0.0.1:0\nlisteners:\n  - {{name: grpc, bind: \"127.0.0.1:0\", service: echo}}\n  - {{name: empty, bind: \"127.0.0.1:0\", service: empty}}\n\
         services:\n  empty: {{endpoints: []}}\n  echo:\n    lb: round-robin\n{extra}    endpoints: [{}]\n",
        eps.join(", ")
    )
}

async fn client(addr: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    EchoClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Parses a `grpc-timeout` value (`<digits><unit>`, unit one of H M S m u n).
fn grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad grpc-timeout {v}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("bad grpc-timeout unit in {v}"),
    }
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unary_and_every_streaming_shape_pass_through() {
    let (a, b) = (grpc_upstream("g-a").await, grpc_upstream("g-b").await);
    let f = Ferry::start(&policy(&[a, b], ""), &[], &[]);
    let mut c = client(f.addr("grpc")).await;

    let mut servers = Vec::new();
    for i in 0..4 {
        let r = c.say(req(&format!("m{i}"))).await.unwrap().into_inner();
        assert_eq!(r.message, format!("m{i}"));
        servers.push(r.server);
    }
    assert_eq!(
        servers,
        ["g-a", "g-b", "g-a", "g-b"],
        "round robin per call on one HTTP/2 connection"
    );

    let expanded: Vec<String> = c
        .expand(EchoRequest {
            message: "x".into(),
            count: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().message)
        .collect()
        .await;
    assert_eq!(expanded.len(), 50);
    assert_eq!(expanded[49], "x 49");

    let collected = c
        .collect(futures::stream::iter((0..10).map(|i| req(&i.to_string()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(collected.message, "0 1 2 3 4 5 6 7 8 9");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        tx.send(req(&format!("turn {i}"))).await.unwrap();
        // A reply per message, before the next is sent: a real conversation.
        assert_eq!(
            replies.next().await.unwrap().unwrap().message,
            format!("turn {i}")
        );
    }
    drop(tx);
    assert!(replies.next().await.is_none());
}

#[tokio::test]
async fn a_failed_call_keeps_its_status_and_message() {
    let a = grpc_upstream("g-a").await;
    let f = Ferry::start(&policy(&[a], ""), &[], &[]);
    let mut c = client(f.addr("grpc")).await;
    let err = c
        .say(EchoRequest {
            message: "nope".into(),
            fail_code: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "failed as asked: nope")
    );
    assert!(
        err.metadata().get("x-ferry-error").is_none(),
        "an upstream status is not ferry's"
    );
    // A failure mid-stream still arrives as trailers after the data.
    let mut s = c
        .chat(futures::stream::iter(vec![
            req("ok"),
            EchoRequest {
                fail_code: 9,
                ..req("bad")
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.next().await.unwrap().unwrap().message, "ok");
    assert_eq!(
        s.next().await.unwrap().unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn deadlines_and_missing_endpoints_are_grpc_statuses() {
    let a = grpc_upstream("g-a").await;
    let f = Ferry::start(&policy(&[a], "    timeout: 200ms\n"), &[], &[]);
    let mut c = client(f.addr("grpc")).await;
    let err = c
        .say(EchoRequest {
            delay_ms: 1000,
            ..req("slow")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(err.metadata().get("x-ferry-error").unwrap(), "timeout");

    // A client deadline shorter than the policy's wins, and the upstream sees what is left.
    let mut r = tonic::Request::new(req("quick"));
    r.set_timeout(Duration::from_millis(150));
    let resp = c.say(r).await.unwrap();
    let seen = resp
        .metadata()
        .get("x-received-grpc-timeout")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let left = grpc_timeout(&seen);
    assert!(
        left < Duration::from_millis(150) && left > Duration::ZERO,
        "the upstream saw grpc-timeout {seen}, not what was left of 150ms"
    );

    let mut e = client(f.addr("empty")).await;
    let err = e.say(req("anyone?")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.metadata().get("x-ferry-error").unwrap(), "no-endpoints");
}

/// A gRPC error in trailers (after data: the status a dashboard would miss by reading
/// headers) is a failure on both sidecars of the call, outbound and inbound.
#[tokio::test]
async fn a_grpc_status_in_trailers_counts_as_a_failure_in_both_directions() {
    let server = grpc_upstream("g-a").await;
    let inbound = Ferry::start(
        &format!(
            "admin: 127.0.0.1:0\nlisteners: [{{name: in, bind: \"127.0.0.1:0\", service: app, direction: inbound}}]\n\
             services: {{app: {{endpoints: [\"{server}\"]}}}}\n"
        ),
        &[],
        &[],
    );
    let outbound = Ferry::start(
        &format!(
            "admin: 127.0.0.1:0\nlisteners: [{{name: out, bind: \"127.0.0.1:0\", service: app}}]\n\
             services: {{app: {{endpoints: [\"{}\"]}}}}\n",
            inbound.addr("in")
        ),
        &[],
        &[],
    );
    let mut c = client(outbound.addr("out")).await;
    c.say(req("fine")).await.unwrap();
    // One reply, then NOT_FOUND in the trailers.
    let mut s = c
        .chat(futures::stream::iter(vec![
            req("ok"),
            EchoRequest {
                fail_code: 5,
                ..req("gone")
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.next().await.unwrap().unwrap().message, "ok");
    assert_eq!(s.next().await.unwrap().unwrap_err().code(), Code::NotFound);
    drop(s);
    for (f, direction) in [(&outbound, "outbound"), (&inbound, "inbound")] {
        let want = [
            format!(
                r#"ferry_requests_total{{direction="{direction}",service="app",route="",status_code="200",grpc_status="5",classification="failure"}} 1"#
            ),
            format!(
                r#"ferry_requests_total{{direction="{direction}",service="app",route="",status_code="200",grpc_status="0",classification="success"}} 1"#
            ),
        ];
        let seen = support::eventually(Duration::from_secs(5), || async {
            let m = f.metrics().await;
            want.iter().all(|w| m.contains(w.as_str()))
        })
        .await;
        assert!(seen, "{direction}: missing {want:?}\n{}", f.metrics().await);
    }
}

/// A dead endpoint fails no gRPC call: a connect that fails read nothing of the call,
/// so the call goes, body and all, to the live endpoint.
#[tokio::test]
async fn a_dead_endpoint_fails_no_grpc_call() {
    let live = grpc_upstream("g-live").await;
    let dead = support::dead_addr();
    let f = Ferry::start(&policy(&[dead, live], ""), &[], &[]);
    let mut c = client(f.addr("grpc")).await;
    for i in 0..20 {
        let r = c
            .say(req(&format!("m{i}")))
            .await
            .unwrap_or_else(|s| panic!("call {i} failed: {s:?}"))
            .into_inner();
        assert_eq!(
            (r.message, r.server),
            (format!("m{i}"), "g-live".to_string())
        );
    }
    // A client stream too: its messages reach the live endpoint whole.
    let n = c
        .collect(futures::stream::iter((0..5).map(|i| req(&format!("c{i}")))))
        .await
        .unwrap()
        .into_inner();
    assert!(n.message.contains("c4"), "{n:?}");
}

/// An HTTP/2 server (h2, as in tonic and hyper) sends GOAWAY `ENHANCE_YOUR_CALM` after
/// 100 empty DATA frames on a connection: ferry must end each request body on its last
/// frame, or calls start failing after a hundred or so on a pooled connection.
#[tokio::test]
async fn hundreds_of_calls_share_one_upstream_connection_without_failing() {
    // Two endpoints, so a failed connect could be retried and request bodies are kept
    // for replay: the path where the body's end was missed.
    let (a, b) = (grpc_upstream("g-a").await, grpc_upstream("g-b").await);
    let f = Ferry::start(&policy(&[a, b], ""), &[], &[]);
    let mut c = client(f.addr("grpc")).await;
    let mut failed = Vec::new();
    for i in 0..400 {
        if let Err(s) = c.say(req(&format!("m{i}"))).await {
            failed.push(format!("call {i}: {:?} {}", s.code(), s.message()));
        }
    }
    for i in 0..60 {
        let parts = futures::stream::iter((0..3).map(move |j| req(&format!("{i}.{j}"))));
        if let Err(s) = c.collect(parts).await {
            failed.push(format!("collect {i}: {:?} {}", s.code(), s.message()));
        }
    }
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let metrics = f.metrics().await;
    assert!(
        !metrics.contains("upstream-reset"),
        "no upstream resets expected:\n{metrics}"
    );
}
