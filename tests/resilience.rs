//! Resilience settings through the real sidecar, with real backends on loopback: gRPC
//! failures reported in trailers (metrics, spans, outlier ejection), load balancing around
//! a slow endpoint and around one whose SYNs are dropped, adaptive concurrency shedding
//! while a backend stalls, timeouts that fit streaming gRPC, and `max-in-flight`.
//!
//! The tests measure shares and times; they run one at a time (SERIAL) so they do not
//! skew each other on a small machine.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_demo::proto::echo_client::EchoClient;
use ferry_demo::proto::echo_server::{Echo, EchoServer};
use ferry_demo::proto::{EchoReply, EchoRequest};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value as Json;
use support::netns::{Namespaces, is_root, must};
use support::{Conn, Ferry, eventually};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, Status};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------
// gRPC backends
// ---------------------------------------------------------------------------------------

/// The Echo service with a paced `Expand`: `count` replies `delay_ms` apart (the first at
/// once), then, with `fail_code`, that status in the trailers (the stream having begun,
/// so not trailers-only). A message `stall:<n>:<ms>` pauses `ms` after the n-th reply.
/// An `unavailable` backend ends every Expand after one reply with UNAVAILABLE.
/// `Say` answers after `delay_ms`.
#[derive(Clone)]
struct Grpc {
    name: String,
    hits: Arc<AtomicU64>,
    unavailable: bool,
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Grpc {
    async fn say(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let r = req.into_inner();
        tokio::time::sleep(Duration::from_millis(r.delay_ms)).await;
        Ok(tonic::Response::new(EchoReply {
            message: r.message,
            server: self.name.clone(),
        }))
    }

    type ExpandStream = Replies;

    async fn expand(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Replies>, Status> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let deadline = req.metadata().get("grpc-timeout").cloned();
        let r = req.into_inner();
        let (count, fail) = if self.unavailable {
            (1, Code::Unavailable as i32)
        } else {
            (r.count, r.fail_code)
        };
        let stall: Option<(u32, u64)> = r.message.strip_prefix("stall:").map(|s| {
            let (n, ms) = s.split_once(':').expect("stall:<n>:<ms>");
            (n.parse().unwrap(), ms.parse().unwrap())
        });
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = self.name.clone();
        tokio::spawn(async move {
            for i in 0..count {
                if i > 0 && r.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(r.delay_ms)).await;
                }
                let reply = EchoReply {
                    message: format!("{} {i}", r.message),
                    server: name.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
                if let Some((n, ms)) = stall
                    && n == i + 1
                {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            if fail != 0 {
                let status = Status::new(Code::from_i32(fail), format!("{name} failed as asked"));
                let _ = tx.send(Err(status)).await;
            }
        });
        let mut resp = tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )) as Replies);
        if let Some(t) = deadline {
            resp.metadata_mut().insert("x-received-grpc-timeout", t);
        }
        Ok(resp)
    }

    async fn collect(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        Err(Status::unimplemented("not here"))
    }

    type ChatStream = Replies;

    async fn chat(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Replies>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

impl Backend {
    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

async fn grpc_backend(name: &str, unavailable: bool) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let svc = Grpc {
        name: name.to_string(),
        hits: hits.clone(),
        unavailable,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    Backend { addr, hits }
}

/// A hand-made gRPC server (hyper, HTTP/2) answering every call with response headers,
/// no message, then trailers `grpc-status: 14`: a unary UNAVAILABLE in trailers, as
/// servers that commit their headers early send it (tonic itself sends a unary error
/// trailers-only).
async fn unary_unavailable_in_trailers() -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let h = h.clone();
                    async move {
                        h.fetch_add(1, Ordering::Relaxed);
                        let _ = req.into_body().collect().await;
                        let mut t = hyper::HeaderMap::new();
                        t.insert("grpc-status", "14".parse().unwrap());
                        t.insert("grpc-message", "draining".parse().unwrap());
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                            vec![Ok(Frame::trailers(t))];
                        let body = StreamBody::new(futures::stream::iter(frames));
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Backend { addr, hits }
}

/// A gRPC response as it is on the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    headers: hyper::HeaderMap,
    data_frames: usize,
    trailers: Option<hyper::HeaderMap>,
}

/// Protobuf encoding of an EchoRequest (no prost here: four plain fields).
fn encode(r: &EchoRequest) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::new();
    if !r.message.is_empty() {
        out.push(0x0a);
        varint(&mut out, r.message.len() as u64);
        out.extend_from_slice(r.message.as_bytes());
    }
    for (tag, v) in [
        (0x10, r.count as u64),
        (0x18, r.delay_ms),
        (0x20, r.fail_code as u64),
    ] {
        if v != 0 {
            out.push(tag);
            varint(&mut out, v);
        }
    }
    out
}

/// One gRPC call over a raw HTTP/2 connection: what came back, frame by frame.
async fn grpc_wire(addr: SocketAddr, method: &str, req: &EchoRequest) -> Wire {
    let mut tx = support::h2c(addr).await;
    let msg = encode(req);
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/ferry.demo.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut b = resp.into_body();
    let (mut data_frames, mut trailers) = (0, None);
    while let Some(f) = tokio::time::timeout(Duration::from_secs(10), b.frame())
        .await
        .expect("the body ends within 10 s")
    {
        let f = f.unwrap();
        if f.is_data() {
            data_frames += 1;
        } else if let Ok(t) = f.into_trailers() {
            trailers = Some(t);
        }
    }
    Wire {
        status,
        headers,
        data_frames,
        trailers,
    }
}

async fn client(addr: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    EchoClient::connect(format!("http://{addr}")).await.unwrap()
}

fn ereq(message: &str, count: u32, delay_ms: u64, fail_code: i32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count,
        delay_ms,
        fail_code,
    }
}

/// A server stream read to its end: each reply with when it came, how it ended.
struct StreamRun {
    replies: Vec<(Duration, String)>,
    end: Result<(), Status>,
    elapsed: Duration,
    /// The response headers' metadata, when the call got that far.
    head: Option<tonic::metadata::MetadataMap>,
}

async fn read_stream(
    c: &mut EchoClient<tonic::transport::Channel>,
    req: tonic::Request<EchoRequest>,
) -> StreamRun {
    let start = Instant::now();
    let mut run = StreamRun {
        replies: Vec::new(),
        end: Ok(()),
        elapsed: Duration::ZERO,
        head: None,
    };
    match c.expand(req).await {
        Err(s) => run.end = Err(s),
        Ok(resp) => {
            run.head = Some(resp.metadata().clone());
            let mut s = resp.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
                    Err(_) => panic!("the stream neither moved nor ended for 10 s"),
                    Ok(None) => break,
                    Ok(Some(Ok(r))) => run.replies.push((start.elapsed(), r.message)),
                    Ok(Some(Err(e))) => {
                        run.end = Err(e);
                        break;
                    }
                }
            }
        }
    }
    run.elapsed = start.elapsed();
    run
}

fn ferry_error(s: &Status) -> Option<String> {
    s.metadata()
        .get("x-ferry-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// HTTP backends and load
// ---------------------------------------------------------------------------------------

/// An HTTP/1.1 backend answering with its name after `delay_ms` (read as a request
/// arrives, so it can be changed at run time).
struct HttpBackend {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
}

async fn http_backend(ip: &str, name: &'static str, delay_ms: u64) -> HttpBackend {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let delay = Arc::new(AtomicU64::new(delay_ms));
    let d = delay.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let d = d.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_: Request<Incoming>| {
                    let ms = d.load(Ordering::Relaxed);
                    async move {
                        if ms > 0 {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    HttpBackend {
        addr,
        delay_ms: delay,
    }
}

fn http_policy(eps: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: web, bind: \"127.0.0.1:0\", service: app}}]\n\
         services:\n  app:\n{extra}    endpoints: [{}]\n",
        eps.join(", ")
    )
}

/// One HTTP call through ferry as a client saw it.
#[derive(Clone, Debug)]
struct Outcome {
    start: Instant,
    latency: Duration,
    /// 0 when there was no response (the error is in `body`).
    status: u16,
    ferry_error: Option<String>,
    body: String,
}

impl Outcome {
    fn done(&self) -> Instant {
        self.start + self.latency
    }
    fn shed(&self) -> bool {
        self.status == 503 && self.ferry_error.as_deref() == Some("overloaded")
    }
}

async fn http_call(conn: &mut Option<Conn>, addr: SocketAddr) -> Outcome {
    let start = Instant::now();
    let fail = |body: String| Outcome {
        start,
        latency: start.elapsed(),
        status: 0,
        ferry_error: None,
        body,
    };
    if conn.is_none() {
        match Conn::open(addr).await {
            Ok(c) => *conn = Some(c),
            Err(e) => return fail(format!("connecting to ferry: {e}")),
        }
    }
    let c = conn.as_mut().unwrap();
    match tokio::time::timeout(Duration::from_secs(10), c.get_with("/", &[])).await {
        Ok(Ok((status, headers, body))) => Outcome {
            start,
            latency: start.elapsed(),
            status,
            ferry_error: headers
                .get("x-ferry-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body,
        },
        Ok(Err(e)) => {
            *conn = None;
            fail(format!("connection to ferry broke: {e}"))
        }
        Err(_) => {
            *conn = None;
            fail("no answer within 10 s".into())
        }
    }
}

/// `clients` keep-alive clients calling until `until` (a call started before then is
/// awaited); after a non-200 answer a client pauses `pause`, as a caller backing off.
async fn drive(addr: SocketAddr, clients: usize, until: Instant, pause: Duration) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            let mut out = Vec::new();
            while Instant::now() < until {
                let o = http_call(&mut conn, addr).await;
                let ok = o.status == 200;
                out.push(o);
                if !ok {
                    tokio::time::sleep(pause).await;
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|o| o.done());
    all
}

/// `n` calls from each of `clients` keep-alive clients at once.
async fn calls(addr: SocketAddr, clients: usize, n: usize) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(http_call(&mut conn, addr).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|o| o.start);
    all
}

fn answered_by(calls: &[Outcome]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in calls {
        let k = if c.status == 200 {
            c.body.clone()
        } else {
            format!("failed ({} {:?} {})", c.status, c.ferry_error, c.body)
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

fn p99(mut v: Vec<Duration>) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------------------
// Metrics and the admin API
// ---------------------------------------------------------------------------------------

/// The sum of metric `name` over the series carrying (at least) these labels.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let got: HashMap<&str, &str> = rest
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            labels
                .iter()
                .all(|(k, v)| got.get(k) == Some(v))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn metric_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(name)).collect()
}

async fn service_state(f: &Ferry, service: &str) -> Json {
    let (status, body) = f.admin("GET", "/endpoints", "").await;
    assert_eq!(status, 200, "{body}");
    body["services"][service].clone()
}

fn endpoint_health(state: &Json, addr: SocketAddr) -> String {
    state["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .map(|e| e["health"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("(no endpoint {addr} in {state})"))
}

// ---------------------------------------------------------------------------------------
// The OTLP collector (rotel), as tests/tracing.rs runs it
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Span {
    name: String,
    kind: String,
    service: String,
    status: String,
    attrs: BTreeMap<String, String>,
}

struct Collector {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
    grpc: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Collector {
    fn start() -> Collector {
        let bin = Command::new("python3")
            .args(["-c", "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))"])
            .output()
            .expect("python3 runs");
        let bin = String::from_utf8(bin.stdout).unwrap().trim().to_string();
        assert!(
            std::path::Path::new(&bin).exists(),
            "rotel is not installed (pip install rotel; tests/run.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.txt");
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(bin)
            .args([
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-grpc-endpoint",
                &grpc.to_string(),
                "--otlp-http-endpoint",
                &http.to_string(),
                "--batch-timeout",
                "100ms",
            ])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let c = Collector {
            child,
            out,
            _dir: dir,
            grpc,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(grpc).is_err()
            || std::net::TcpStream::connect(http).is_err()
        {
            assert!(Instant::now() < deadline, "rotel did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn spans_of(&self, service: &str) -> Vec<Span> {
        let text = self.text();
        let mut spans = Vec::new();
        let mut svc = String::new();
        let mut cur: Option<Span> = None;
        let mut in_attrs = false;
        for line in text.lines() {
            let t = line.trim();
            if let Some(v) = t.strip_prefix("-> service.name: Str(") {
                svc = v.trim_end_matches(')').to_string();
                continue;
            }
            if t.starts_with("Span #") {
                spans.extend(cur.take());
                cur = Some(Span {
                    service: svc.clone(),
                    ..Span::default()
                });
                in_attrs = false;
                continue;
            }
            if t.starts_with("ResourceSpans #") {
                spans.extend(cur.take());
            }
            let Some(s) = cur.as_mut() else { continue };
            let field = |p: &str| {
                t.strip_prefix(p)
                    .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
            };
            if let Some(v) = field("Name") {
                s.name = v;
            } else if let Some(v) = field("Kind") {
                s.kind = v;
            } else if let Some(v) = field("Status code") {
                s.status = v;
            } else if t.starts_with("Attributes:") {
                in_attrs = true;
            } else if in_attrs
                && let Some((k, v)) = t.strip_prefix("-> ").and_then(|kv| kv.split_once(": "))
            {
                let v = v
                    .split_once('(')
                    .map(|(_, v)| v.trim_end_matches(')'))
                    .unwrap_or(v);
                s.attrs.insert(k.to_string(), v.to_string());
            }
        }
        spans.extend(cur);
        spans.retain(|s| s.service == service);
        spans
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_with_env(policy: &str, env: &[(&str, String)]) -> Ferry {
    for (k, v) in env {
        support::set_child_env(k, v);
    }
    let f = Ferry::start_logged(policy);
    support::clear_child_env();
    f
}

// ---------------------------------------------------------------------------------------
// 1. gRPC UNAVAILABLE in trailers: metrics, spans, outlier ejection
// ---------------------------------------------------------------------------------------

/// UNAVAILABLE after the response headers (a server stream that sent a reply, and a
/// unary call with empty body and trailers) is a failure in `/metrics` and on the client
/// span at a real OTLP collector, although the headers said nothing was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_in_trailers_is_a_failure_in_metrics_and_spans() {
    let _serial = SERIAL.lock().await;
    let c = Collector::start();
    let streamer = grpc_backend("g-stream", false).await;
    let unary = unary_unavailable_in_trailers().await;

    // The shapes on the wire, straight from the backends: 200 and no grpc-status in the
    // headers, then grpc-status 14 in the trailers. Neither is trailers-only.
    let w = grpc_wire(streamer.addr, "Expand", &ereq("x", 1, 0, 14)).await;
    assert_eq!(w.status, 200, "{w:?}");
    assert!(w.headers.get("grpc-status").is_none(), "{w:?}");
    assert!(
        w.data_frames >= 1,
        "the reply comes before the status: {w:?}"
    );
    assert_eq!(
        w.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .unwrap(),
        "14",
        "{w:?}"
    );
    let w = grpc_wire(unary.addr, "Say", &ereq("x", 0, 0, 0)).await;
    assert_eq!(w.status, 200, "{w:?}");
    assert!(w.headers.get("grpc-status").is_none(), "{w:?}");
    assert_eq!(
        w.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .unwrap(),
        "14",
        "{w:?}"
    );
    // For the record, tonic's own unary error (the demo service's Say): trailers-only,
    // the status in the headers; which is why the unary case above is hand-made.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = l.local_addr().unwrap();
    tokio::spawn(ferry_demo::serve_grpc("demo".into(), l));
    let w = grpc_wire(demo, "Say", &ereq("x", 0, 0, 14)).await;
    eprintln!(
        "tonic unary UNAVAILABLE: grpc-status in headers {:?}, in trailers {:?}, {} data frames",
        w.headers.get("grpc-status"),
        w.trailers.as_ref().and_then(|t| t.get("grpc-status")),
        w.data_frames
    );
    let unary_hits = unary.hits();

    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners:\n  - {{name: stream, bind: \"127.0.0.1:0\", service: streamer}}\n  \
         - {{name: unary, bind: \"127.0.0.1:0\", service: unary}}\n\
         services:\n  streamer: {{endpoints: [\"{}\"]}}\n  unary: {{endpoints: [\"{}\"]}}\n",
        streamer.addr, unary.addr
    );
    let f = start_with_env(
        &policy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.grpc)),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_SERVICE_NAME", "res-trailers".into()),
        ],
    );

    let mut sc = client(f.addr("stream")).await;
    let run = read_stream(&mut sc, tonic::Request::new(ereq("one", 1, 0, 14))).await;
    assert_eq!(run.replies.len(), 1, "the reply before the status arrives");
    let err = run.end.expect_err("the stream ends with UNAVAILABLE");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        ferry_error(&err),
        None,
        "the upstream's status, not ferry's"
    );

    let mut uc = client(f.addr("unary")).await;
    let err = uc.say(ereq("hi", 0, 0, 0)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unavailable, "draining"));
    assert_eq!(ferry_error(&err), None);
    assert_eq!(unary.hits(), unary_hits + 1, "no retry (retries is 0)");

    for service in ["streamer", "unary"] {
        let want = [
            ("direction", "outbound"),
            ("service", service),
            ("grpc_status", "14"),
            ("classification", "failure"),
        ];
        let seen = eventually(Duration::from_secs(5), || async {
            metric_sum(&f.metrics().await, "ferry_requests_total", &want) == 1.0
        })
        .await;
        let m = f.metrics().await;
        assert!(
            seen,
            "{service}: no ferry_requests_total{{grpc_status=\"14\",classification=\"failure\"}} 1:\n{}",
            metric_lines(&m, "ferry_requests_total").join("\n")
        );
        let success = metric_sum(
            &m,
            "ferry_requests_total",
            &[("service", service), ("classification", "success")],
        );
        assert_eq!(
            success,
            0.0,
            "{service}: a call failing in trailers was also counted a success:\n{}",
            metric_lines(&m, "ferry_requests_total").join("\n")
        );
    }

    let span = |method: &'static str| {
        c.spans_of("res-trailers").into_iter().find(|s| {
            s.attrs.get("rpc.method").map(String::as_str) == Some(method)
                && s.kind.contains("CLIENT")
        })
    };
    let arrived = eventually(Duration::from_secs(20), || async {
        span("Expand").is_some() && span("Say").is_some()
    })
    .await;
    assert!(
        arrived,
        "the client spans of Expand and Say never reached the collector; spans of res-trailers: {:#?}",
        c.spans_of("res-trailers")
    );
    for method in ["Expand", "Say"] {
        let s = span(method).unwrap();
        eprintln!(
            "{method} client span: status {:?}, attrs {:?}",
            s.status, s.attrs
        );
        assert_eq!(
            s.attrs.get("rpc.grpc.status_code").map(String::as_str),
            Some("14"),
            "{method}: {s:#?}"
        );
        assert!(
            s.status.to_ascii_lowercase().contains("error"),
            "{method}: the span's status is {:?}, not an error: {s:#?}",
            s.status
        );
    }
}

/// Three endpoints, one ending every call with UNAVAILABLE in trailers after a reply:
/// after `outlier-failures` (5) such calls it is ejected, `/endpoints` says so, the
/// ejection is counted, and it gets none of the next 50 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_in_trailers_is_ejected() {
    let _serial = SERIAL.lock().await;
    let good = [
        grpc_backend("g-1", false).await,
        grpc_backend("g-2", false).await,
    ];
    let bad = grpc_backend("g-bad", true).await;
    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: grpc, bind: \"127.0.0.1:0\", service: echo}}]\n\
         services:\n  echo:\n    lb: round-robin\n    outlier-failures: 5\n    outlier-ejection: 30s\n    \
         endpoints: [\"{}\", \"{}\", \"{}\"]\n",
        good[0].addr, good[1].addr, bad.addr
    );
    let f = Ferry::start_logged(&policy);
    let mut c = client(f.addr("grpc")).await;

    let mut failed = 0;
    let mut ejected_after = None;
    for i in 0..60 {
        let run = read_stream(&mut c, tonic::Request::new(ereq("m", 1, 0, 0))).await;
        assert_eq!(
            run.replies.len(),
            1,
            "call {i}: every endpoint sends one reply"
        );
        if let Err(e) = &run.end {
            assert_eq!(e.code(), Code::Unavailable, "call {i}: {e:?}");
            failed += 1;
        }
        let state = service_state(&f, "echo").await;
        if endpoint_health(&state, bad.addr) == "ejected" {
            ejected_after = Some(i + 1);
            break;
        }
    }
    let state = service_state(&f, "echo").await;
    let Some(calls_made) = ejected_after else {
        panic!(
            "g-bad was never ejected: {failed} calls failed with UNAVAILABLE in trailers, it got {} calls\n{state:#}\n{}",
            bad.hits(),
            f.log()
        )
    };
    let bad_hits = bad.hits();
    eprintln!("g-bad ejected after {calls_made} calls, {bad_hits} of them to it ({failed} failed)");
    assert_eq!(
        bad_hits, 5,
        "outlier-failures: 5, yet g-bad took {bad_hits} failing calls before its ejection showed\n{state:#}"
    );
    let m = f.metrics().await;
    let ejections = metric_sum(&m, "ferry_ejections_total", &[("service", "echo")]);
    assert!(
        ejections >= 1.0,
        "ferry_ejections_total{{service=\"echo\"}} is {ejections}:\n{}",
        metric_lines(&m, "ferry_ejections").join("\n")
    );

    let before = bad.hits();
    let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..50 {
        let run = read_stream(&mut c, tonic::Request::new(ereq("after", 1, 0, 0))).await;
        assert!(
            run.end.is_ok(),
            "call {i} after the ejection failed: {:?}\n{:#}",
            run.end,
            service_state(&f, "echo").await
        );
        *by_server.entry(run.replies[0].1.clone()).or_default() += 1;
    }
    eprintln!(
        "the 50 calls after the ejection: g-1 {} g-2 {} g-bad {}",
        good[0].hits(),
        good[1].hits(),
        bad.hits()
    );
    assert_eq!(
        bad.hits(),
        before,
        "the ejected endpoint still got calls\n{:#}",
        service_state(&f, "echo").await
    );
    assert_eq!(
        endpoint_health(&service_state(&f, "echo").await, bad.addr),
        "ejected"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Balancing around a slow endpoint and a dead one
// ---------------------------------------------------------------------------------------

/// Three HTTP/1.1 endpoints, one 200 ms slower: the default balancer (p2c-ewma) sends it
/// under 10% of 300 calls from six clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_balancer_sends_a_slow_endpoint_little() {
    let _serial = SERIAL.lock().await;
    let a = http_backend("127.0.0.1", "a", 0).await;
    let b = http_backend("127.0.0.1", "b", 0).await;
    let slow = http_backend("127.0.0.1", "slow", 200).await;
    let f = Ferry::start_logged(&http_policy(&[a.addr, b.addr, slow.addr], ""));
    let (_, state) = f.admin("GET", "/endpoints", "").await;
    assert_eq!(state["services"]["app"]["lb"], "p2c-ewma", "{state:#}");
    let start = Instant::now();
    let out = calls(f.addr("web"), 6, 50).await;
    let by = answered_by(&out);
    eprintln!(
        "300 calls in {:.2} s: {by:?}",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(out.len(), 300);
    assert!(out.iter().all(|o| o.status == 200), "{by:?}");
    let s = by.get("slow").copied().unwrap_or(0);
    assert!(
        s < 30,
        "the endpoint 200 ms slower got {s} of 300 calls ({by:?})\n{:#}",
        service_state(&f, "app").await
    );
}

/// Two healthy endpoints and one whose SYNs are dropped (`connect-timeout: 300ms`): a
/// call that tried the dead one first is answered by a healthy one after the lost
/// 300 ms, and that time must not make the healthy one look slow to the balancer. Over
/// 200 calls no call fails, A and B look as fast as they are, and each keeps a fair share. Needs root (a network
/// namespace with iptables); skipped otherwise.
#[test]
fn a_dead_endpoint_does_not_make_its_healthy_neighbour_look_slow() {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace and iptables (CI runs as root)");
        return;
    }
    let _serial = SERIAL.blocking_lock();
    let ns = Namespaces::new("ferry-res", 1);
    let name = ns.name(0).to_string();
    // 127.0.0.2:9 inside the namespace: SYNs dropped on arrival, so a connect there
    // waits out its timeout, as with a host cut off by the network.
    must(&[
        "ip",
        "netns",
        "exec",
        &name,
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.2",
        "--dport",
        "9",
        "-j",
        "DROP",
    ]);
    let dead: SocketAddr = "127.0.0.2:9".parse().unwrap();
    let (out, state, log, connect_probe) = ns.run(0, move || async move {
        let probe = Instant::now();
        let r = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(dead)).await;
        assert!(r.is_err(), "a connect to {dead} did not hang: {r:?}");
        let probe = probe.elapsed();
        let a = http_backend("127.0.0.1", "A", 0).await;
        let b = http_backend("127.0.0.1", "B", 0).await;
        let policy = http_policy(&[a.addr, dead, b.addr], "    connect-timeout: 300ms\n");
        let f = Ferry::start(&policy, &[], &["ip", "netns", "exec", &name]);
        let out = calls(f.addr("web"), 4, 50).await;
        let state = service_state(&f, "app").await;
        let m = f.metrics().await;
        let log = metric_lines(&m, "ferry_requests_total")
            .into_iter()
            .chain(metric_lines(&m, "ferry_ejections_total"))
            .chain(metric_lines(&m, "ferry_endpoint_requests_total"))
            .collect::<Vec<_>>()
            .join("\n");
        (out, state, log, probe)
    });
    let by = answered_by(&out);
    let quarters: Vec<String> = out
        .chunks(50)
        .map(|w| format!("{:?}", answered_by(w)))
        .collect();
    eprintln!(
        "connect probe to the dead endpoint timed out after {}; 200 calls: {by:?}; per 50 (by start): {}",
        ms(connect_probe),
        quarters.join(" ")
    );
    let slowest = out.iter().map(|o| o.latency).max().unwrap();
    let via_dead = out
        .iter()
        .filter(|o| o.latency >= Duration::from_millis(250))
        .count();
    eprintln!(
        "slowest call {}; {via_dead} calls took >= 250 ms (tried the dead endpoint first)\n{state:#}\n{log}",
        ms(slowest)
    );
    let failed: Vec<&Outcome> = out.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of 200 calls failed, first {:?}\n{state:#}\n{log}",
        failed.len(),
        failed.first()
    );
    // The balancer's view: the neighbours that answered the retried calls were charged
    // only for their own ~1 ms answers, not the 300 ms spent on the dead endpoint (the
    // peak-EWMA estimate would hold such a sample for seconds).
    for e in state["endpoints"].as_array().unwrap() {
        if e["address"] == dead.to_string() {
            continue;
        }
        let est = e["latency_estimate_ms"].as_f64().unwrap();
        assert!(
            est < 100.0,
            "{} looks {est} ms slow to the balancer\n{state:#}",
            e["address"]
        );
    }
    // And so it keeps its share. Loose bound: two identical endpoints under p2c-ewma
    // split 200 calls 40/60 at worst on a loaded machine.
    for n in ["A", "B"] {
        let got = by.get(n).copied().unwrap_or(0);
        assert!(
            got >= 50,
            "{n} answered {got} of 200 calls (< 25%): {by:?}; per 50: {}\n{state:#}\n{log}",
            quarters.join(" ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. Adaptive concurrency
// ---------------------------------------------------------------------------------------

/// A backend answering in ~5 ms stalls (holds every request 2 s) for 3 s while 40
/// clients call: with `adaptive-concurrency: on` ferry sheds the excess with a fast 503
/// `x-ferry-error: overloaded`, and what it admits waits for the backend only (p99 under
/// 2.5 s: the 2 s hold plus slack, i.e. no queueing in ferry beyond one stall). After the
/// backend recovers, calls succeed again within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_sheds_fast_while_the_backend_stalls() {
    let _serial = SERIAL.lock().await;
    let app = http_backend("127.0.0.1", "app", 5).await;
    let f = Ferry::start_logged(&http_policy(&[app.addr], "    adaptive-concurrency: on\n"));
    let addr = f.addr("web");
    let pause = Duration::from_millis(20);

    // Normal operation: 10 clients for 2 s, so the limit learns a ~5 ms latency.
    let warm = drive(addr, 10, Instant::now() + Duration::from_secs(2), pause).await;
    let warm_ok = warm.iter().filter(|o| o.status == 200).count();
    let warm_shed = warm.iter().filter(|o| o.shed()).count();
    eprintln!(
        "warm-up: {} calls, {warm_ok} ok, {warm_shed} shed, p99 {}",
        warm.len(),
        ms(p99(warm.iter().map(|o| o.latency).collect()))
    );
    assert!(warm_ok > 100, "{:?}", answered_by(&warm));

    // The stall: every request arriving in the next 3 s is held 2 s.
    app.delay_ms.store(2000, Ordering::Relaxed);
    let stalled = Instant::now();
    let stall_end = stalled + Duration::from_secs(3);
    let stall = tokio::spawn(drive(addr, 40, stall_end, pause));
    tokio::time::sleep_until(stall_end.into()).await;
    app.delay_ms.store(5, Ordering::Relaxed);
    let recovered = Instant::now();
    let recovery = tokio::spawn(drive(addr, 10, recovered + Duration::from_secs(8), pause));
    let stall = stall.await.unwrap();
    let recovery = recovery.await.unwrap();

    let shed: Vec<&Outcome> = stall.iter().filter(|o| o.shed()).collect();
    let admitted: Vec<&Outcome> = stall.iter().filter(|o| o.status == 200).collect();
    let other: Vec<&Outcome> = stall
        .iter()
        .filter(|o| !o.shed() && o.status != 200)
        .collect();
    let shed_p99 = p99(shed.iter().map(|o| o.latency).collect());
    let admitted_p99 = p99(admitted.iter().map(|o| o.latency).collect());
    let admitted_max = admitted.iter().map(|o| o.latency).max().unwrap_or_default();
    let per_half_second: Vec<String> = (0..6)
        .map(|i| {
            let w: Vec<&Outcome> = stall
                .iter()
                .filter(|o| (o.start - stalled).as_millis() / 500 == i)
                .collect();
            format!(
                "{}ok/{}shed",
                w.iter().filter(|o| o.status == 200).count(),
                w.iter().filter(|o| o.shed()).count()
            )
        })
        .collect();
    eprintln!(
        "stall: {} calls: {} admitted (p99 {}, max {}), {} shed (p99 {}), {} other; by start per 0.5 s: {}",
        stall.len(),
        admitted.len(),
        ms(admitted_p99),
        ms(admitted_max),
        shed.len(),
        ms(shed_p99),
        other.len(),
        per_half_second.join(" ")
    );
    assert!(
        other.is_empty(),
        "answers that are neither 200 nor a shed 503 overloaded: {} (first {:?})",
        other.len(),
        other.first()
    );
    assert!(
        !shed.is_empty(),
        "40 clients on a backend holding every request 2 s, and ferry shed nothing: {:?}\n{}",
        answered_by(&stall),
        f.log()
    );
    assert!(
        shed_p99 < Duration::from_millis(100),
        "shedding is not fast: p99 of {} shed answers is {}",
        shed.len(),
        ms(shed_p99)
    );
    assert!(
        admitted_p99 < Duration::from_millis(2500),
        "admitted calls queued beyond one stall: p99 {} (max {}) of {} for a backend holding 2 s",
        ms(admitted_p99),
        ms(admitted_max),
        admitted.len()
    );

    // Recovery: the first run of 20 successive answers (by completion) all 200.
    let mut back = None;
    for (i, w) in recovery.windows(20).enumerate() {
        if w.iter().all(|o| o.status == 200) {
            back = Some(recovery[i].done().saturating_duration_since(recovered));
            break;
        }
    }
    let rec_shed = recovery.iter().filter(|o| o.shed()).count();
    eprintln!(
        "recovery: {} calls, {rec_shed} shed; 20 successes in a row {:?} after the backend recovered",
        recovery.len(),
        back
    );
    let back = back.unwrap_or_else(|| {
        panic!(
            "calls never succeeded again in 8 s after the backend recovered: {:?}",
            answered_by(&recovery)
        )
    });
    assert!(
        back <= Duration::from_secs(5),
        "calls succeeded again only {:.2} s after the backend recovered",
        back.as_secs_f64()
    );
    let tail = &recovery[recovery.len().saturating_sub(100)..];
    assert!(
        tail.iter().all(|o| o.status == 200),
        "the last 100 calls, seconds after recovery, still failed: {:?}",
        answered_by(tail)
    );

    // Every shed answer is a 503 failure in ferry's metrics.
    let total_shed = (warm_shed + shed.len() + rec_shed) as f64;
    let counted = eventually(Duration::from_secs(5), || async {
        metric_sum(
            &f.metrics().await,
            "ferry_requests_total",
            &[
                ("service", "app"),
                ("status_code", "503"),
                ("classification", "failure"),
            ],
        ) == total_shed
    })
    .await;
    assert!(
        counted,
        "{total_shed} shed answers seen, metrics say:\n{}",
        metric_lines(&f.metrics().await, "ferry_requests_total").join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// 4. Timeouts that fit streaming gRPC
// ---------------------------------------------------------------------------------------

/// A server stream with a reply every 100 ms for 2 s: `stream-idle-timeout: 500ms` lets it all
/// through, `timeout: 1s` cuts it at ~1 s, a stall of 1.5 s after the 3rd reply is cut
/// by the idle timeout within ~0.5 s, and a client `grpc-timeout` shorter than the
/// policy's `timeout` wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_timeouts_cut_what_they_should_and_nothing_else() {
    let _serial = SERIAL.lock().await;
    let g = grpc_backend("g-tick", false).await;
    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners:\n  - {{name: idle, bind: \"127.0.0.1:0\", service: idle}}\n  \
         - {{name: deadline, bind: \"127.0.0.1:0\", service: deadline}}\n\
         services:\n  idle:\n    stream-idle-timeout: 500ms\n    endpoints: [\"{a}\"]\n  \
         deadline:\n    timeout: 1s\n    endpoints: [\"{a}\"]\n",
        a = g.addr
    );
    let f = Ferry::start_logged(&policy);
    let mut idle = client(f.addr("idle")).await;
    let mut deadline = client(f.addr("deadline")).await;
    let ticking = || tonic::Request::new(ereq("tick", 20, 100, 0));

    // Idle timeout, a stream that keeps moving: all of it, OK.
    let run = read_stream(&mut idle, ticking()).await;
    eprintln!(
        "stream-idle-timeout 500ms, a reply every 100 ms: {} replies in {}, {:?}",
        run.replies.len(),
        ms(run.elapsed),
        run.end.as_ref().err()
    );
    assert!(run.end.is_ok(), "{:?}\n{}", run.end, f.log());
    assert_eq!(run.replies.len(), 20);
    assert!(
        run.elapsed >= Duration::from_millis(1800),
        "{}",
        ms(run.elapsed)
    );

    // A whole-call deadline of 1 s cuts the same stream at ~1 s.
    let run = read_stream(&mut deadline, ticking()).await;
    let err = run.end.as_ref().err().cloned();
    eprintln!(
        "timeout 1s: {} replies, ended after {} with {:?}",
        run.replies.len(),
        ms(run.elapsed),
        err
    );
    let err = err.expect("the stream is cut");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        run.elapsed >= Duration::from_millis(900) && run.elapsed <= Duration::from_millis(1400),
        "cut after {}, not ~1 s",
        ms(run.elapsed)
    );
    assert!(
        (8..=11).contains(&run.replies.len()),
        "{} replies before the 1 s cut",
        run.replies.len()
    );
    assert_eq!(ferry_error(&err).as_deref(), Some("timeout"), "{err:?}");

    // A stall of 1.5 s after the 3rd reply, under stream-idle-timeout 500ms.
    let run = read_stream(
        &mut idle,
        tonic::Request::new(ereq("stall:3:1500", 20, 100, 0)),
    )
    .await;
    let err = run.end.as_ref().err().cloned();
    let third = run.replies.get(2).map(|r| r.0);
    eprintln!(
        "stall after the 3rd reply: {} replies (3rd at {:?}), ended after {} with {:?}",
        run.replies.len(),
        third.map(ms),
        ms(run.elapsed),
        err
    );
    let err = err.expect("the stalled stream is cut");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        ferry_error(&err).as_deref(),
        Some("stream-idle-timeout"),
        "{err:?}"
    );
    assert_eq!(run.replies.len(), 3);
    let after_stall = run.elapsed - third.unwrap();
    assert!(
        after_stall >= Duration::from_millis(450) && after_stall <= Duration::from_millis(1000),
        "cut {} after the stall began (stream-idle-timeout 500ms)",
        ms(after_stall)
    );

    // The client's deadline (400 ms) is shorter than the policy's (1 s): it wins.
    let mut r = ticking();
    r.set_timeout(Duration::from_millis(400));
    let run = read_stream(&mut deadline, r).await;
    let err = run.end.as_ref().err().cloned();
    let seen = run
        .head
        .as_ref()
        .and_then(|m| m.get("x-received-grpc-timeout"))
        .map(|v| v.to_str().unwrap().to_string());
    eprintln!(
        "client grpc-timeout 400m under timeout 1s: {} replies, ended after {} with {:?}; the backend saw grpc-timeout {seen:?}",
        run.replies.len(),
        ms(run.elapsed),
        err
    );
    let err = err.expect("the stream is cut at the client's deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        run.elapsed >= Duration::from_millis(350) && run.elapsed <= Duration::from_millis(750),
        "cut after {}, not at the client's 400 ms",
        ms(run.elapsed)
    );
    assert!(run.replies.len() <= 6, "{} replies", run.replies.len());
}

// ---------------------------------------------------------------------------------------
// 5. max-in-flight with gRPC
// ---------------------------------------------------------------------------------------

/// `max-in-flight: 2`, six unary calls at once to a method holding 500 ms: two go
/// through, the other four fail at once with RESOURCE_EXHAUSTED and
/// `x-ferry-error: overloaded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_refuses_the_excess_at_once_with_resource_exhausted() {
    let _serial = SERIAL.lock().await;
    let g = grpc_backend("g-hold", false).await;
    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: grpc, bind: \"127.0.0.1:0\", service: echo}}]\n\
         services:\n  echo:\n    max-in-flight: 2\n    endpoints: [\"{}\"]\n",
        g.addr
    );
    let f = Ferry::start_logged(&policy);
    let c = client(f.addr("grpc")).await;
    // Warm the connection so the six calls race only for ferry's limit.
    c.clone().say(ereq("warm", 0, 0, 0)).await.unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(6));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (mut c, barrier) = (c.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let r = c.say(ereq(&format!("hold {i}"), 0, 500, 0)).await;
            (start.elapsed(), r.map(|r| r.into_inner().message))
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for (elapsed, r) in &results {
        match r {
            Ok(_) => ok.push(*elapsed),
            Err(s) => refused.push((*elapsed, s.code(), ferry_error(s))),
        }
    }
    eprintln!(
        "6 calls, max-in-flight 2: ok after {:?}; refused: {:?}",
        ok.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        refused
            .iter()
            .map(|(d, c, e)| format!("{c:?} {e:?} after {}", ms(*d)))
            .collect::<Vec<_>>()
    );
    assert!(
        refused.len() >= 4,
        "only {} of 6 calls refused with max-in-flight 2",
        refused.len()
    );
    for (elapsed, code, e) in &refused {
        assert_eq!(*code, Code::ResourceExhausted, "{refused:?}");
        assert_eq!(e.as_deref(), Some("overloaded"), "{refused:?}");
        assert!(
            *elapsed < Duration::from_millis(100),
            "a refusal took {} (not at once)",
            ms(*elapsed)
        );
    }
    for d in &ok {
        assert!(*d >= Duration::from_millis(500), "{}", ms(*d));
    }
    assert_eq!(
        g.hits() as usize,
        1 + ok.len(),
        "refused calls reached the backend"
    );

    // The slots are given back: two calls at once both pass afterwards.
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = tokio::join!(
        c1.say(ereq("again 1", 0, 200, 0)),
        c2.say(ereq("again 2", 0, 200, 0))
    );
    assert!(r1.is_ok() && r2.is_ok(), "{r1:?} {r2:?}");

    let want = refused.len() as f64;
    let counted = eventually(Duration::from_secs(5), || async {
        metric_sum(
            &f.metrics().await,
            "ferry_requests_total",
            &[
                ("service", "echo"),
                ("grpc_status", "8"),
                ("classification", "failure"),
            ],
        ) == want
    })
    .await;
    assert!(
        counted,
        "{want} RESOURCE_EXHAUSTED answers, metrics say:\n{}",
        metric_lines(&f.metrics().await, "ferry_requests_total").join("\n")
    );
}
