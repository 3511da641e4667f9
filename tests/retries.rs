//! Resilience through the real sidecar: status retries, retry-on, body replay limits,
//! the retry budget, per-try / response / idle timeouts, outlier ejection and
//! max-in-flight, each against real HTTP/1.1 backends on loopback that count and keep
//! what they receive.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use support::{Conn, Ferry};
use tokio::net::{TcpListener, TcpStream};

// === backends ===

/// What a backend does with every request, after reading the whole request body.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Answers this status with its name as the body.
    Answer(u16),
    /// Closes the connection without an answer.
    Close,
    /// Answers 200 (its name) after this long.
    Delay(Duration),
    /// Headers at once, then `n` chunks `gap` apart (the first at once).
    Chunks { n: u32, gap: Duration },
    /// Headers and one chunk at once, then nothing for `stall`, then a last chunk.
    Stall(Duration),
}

/// One request a backend received: when its head arrived, its method and its body
/// (`None` if the body could not be read whole).
#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    method: String,
    body: Option<Bytes>,
}

struct Backend {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Hit>>>,
}

impl Backend {
    fn hits(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn log(&self) -> Vec<Hit> {
        self.log.lock().unwrap().clone()
    }
}

type RespBody = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A real HTTP/1.1 server on 127.0.0.1 behaving as `mode`.
async fn backend(name: &'static str, mode: Mode) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let hits = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    serve(name, mode, hits.clone(), req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Backend { addr, log }
}

async fn serve(
    name: &'static str,
    mode: Mode,
    log: Arc<Mutex<Vec<Hit>>>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, std::io::Error> {
    let i = {
        let mut l = log.lock().unwrap();
        l.push(Hit {
            at: Instant::now(),
            method: req.method().to_string(),
            body: None,
        });
        l.len() - 1
    };
    if let Ok(c) = req.into_body().collect().await {
        log.lock().unwrap()[i].body = Some(c.to_bytes());
    }
    let stream = |frames: Vec<(Duration, Bytes)>| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        tokio::spawn(async move {
            for (wait, data) in frames {
                tokio::time::sleep(wait).await;
                if tx.send(Ok(Frame::data(data))).await.is_err() {
                    return;
                }
            }
        });
        Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
    };
    match mode {
        Mode::Answer(code) => Ok(Response::builder().status(code).body(full(name)).unwrap()),
        // hyper closes the connection, writing nothing, when the service fails.
        Mode::Close => Err(std::io::Error::other("closing without an answer")),
        Mode::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(Response::new(full(name)))
        }
        Mode::Chunks { n, gap } => Ok(stream(
            (0..n)
                .map(|k| {
                    let wait = if k == 0 { Duration::ZERO } else { gap };
                    (wait, Bytes::from(format!("chunk {k}\n")))
                })
                .collect(),
        )),
        Mode::Stall(stall) => Ok(stream(vec![
            (Duration::ZERO, Bytes::from("first\n")),
            (stall, Bytes::from("last\n")),
        ])),
    }
}

// === the sidecar and clients ===

/// A service: its name, endpoints and settings.
type Svc<'a> = (&'a str, &'a [SocketAddr], &'a [(&'a str, &'a str)]);

/// A policy with one listener per service (named as the service), round-robin so that
/// every endpoint is picked in turn, and the given settings.
fn policy(services: &[Svc<'_>]) -> String {
    let mut s = "admin: 127.0.0.1:0\nlisteners:\n".to_string();
    for (name, _, _) in services {
        s += &format!("  - {{name: {name}, bind: \"127.0.0.1:0\", service: {name}}}\n");
    }
    s += "services:\n";
    for (name, eps, settings) in services {
        s += &format!("  {name}:\n    lb: round-robin\n");
        for (k, v) in *settings {
            s += &format!("    {k}: {v}\n");
        }
        let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
        s += &format!("    endpoints: [{}]\n", eps.join(", "));
    }
    s
}

/// The last lines ferry logged, for failure messages.
fn log_tail(f: &Ferry) -> String {
    let log = f.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The value of one series (exact name and labels) in a Prometheus text page, 0 if absent.
fn metric(m: &str, series: &str) -> f64 {
    m.lines()
        .filter_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .sum()
}

/// Every line of the page about `family`, for reports.
fn metric_lines(m: &str, family: &str) -> String {
    m.lines()
        .filter(|l| l.starts_with(family))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ferry_error(h: &HeaderMap) -> Option<String> {
    h.get("x-ferry-error")
        .map(|v| v.to_str().unwrap_or("?").to_string())
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    /// The whole body, or how reading it failed.
    body: Result<Bytes, String>,
}

/// One request on a new HTTP/1.1 connection.
async fn send(addr: SocketAddr, method: &str, path: &str, body: Bytes) -> Result<Answer, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web")
        .body(Full::new(body))
        .unwrap();
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A GET whose body is read frame by frame: the status, each data frame with when it
/// came, and how the body ended (`Ok` for a clean end) and when.
struct Streamed {
    status: u16,
    sent: Instant,
    frames: Vec<(Instant, Bytes)>,
    end: Result<(), String>,
    ended: Instant,
}

impl Streamed {
    fn text(&self) -> String {
        self.frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

async fn stream_get(addr: SocketAddr) -> Streamed {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "web")
        .body(Full::<Bytes>::default())
        .unwrap();
    let sent = Instant::now();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Err(_) => break Err("no frame for 5 s".to_string()),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(e.to_string()),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    frames.push((Instant::now(), d));
                }
            }
        }
    };
    Streamed {
        status,
        sent,
        frames,
        end,
        ended: Instant::now(),
    }
}

async fn endpoint_health(f: &Ferry, service: &str, addr: SocketAddr) -> Json {
    let (_, eps) = f.admin("GET", "/endpoints", "").await;
    eps["services"][service]["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no endpoints for {service}: {eps}"))
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("{addr} not in {eps}"))
}

/// A body of `len` bytes, different for every `seed`.
fn body_of(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed.wrapping_mul(37)))
        .collect::<Vec<u8>>()
        .into()
}

// === 1. outlier ejection with retries ===

/// One endpoint of three answers 503 to everything: retries on 503 hide it from the
/// clients, it is ejected after at most 5 requests, and stays out for the ejection time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_endpoint_is_ejected_and_retries_hide_it() {
    let a = backend("a", Mode::Answer(200)).await;
    let b = backend("b", Mode::Answer(200)).await;
    let bad = backend("bad", Mode::Answer(503)).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[a.addr, b.addr, bad.addr],
        &[("retries", "2"), ("retry-on", "503")],
    )]));
    let web = f.addr("web");

    // ~20 requests, then until /endpoints says ejected (at most 60 in all).
    let mut c = Conn::open(web).await.unwrap();
    let mut warmup = 0;
    let mut warm_ok = 0;
    let mut ejected = false;
    while warmup < 60 {
        let r = c.get("/").await;
        warmup += 1;
        if matches!(r, Ok((200, _))) {
            warm_ok += 1;
        } else {
            eprintln!("warm-up request {warmup}: {r:?}");
            c = Conn::open(web).await.unwrap();
        }
        if warmup >= 20 {
            let h = endpoint_health(&f, "web", bad.addr).await;
            if h["health"] == "ejected" {
                ejected = true;
                break;
            }
        }
    }
    let at_ejection = bad.hits();
    let state = endpoint_health(&f, "web", bad.addr).await;
    eprintln!(
        "test 1: ejected={ejected} after {warmup} requests, {at_ejection} of them reached the 503 endpoint; {state}"
    );
    assert!(
        ejected,
        "the 503 endpoint was not ejected after {warmup} requests ({at_ejection} reached it): {state}\n{}",
        log_tail(&f)
    );
    assert!(
        at_ejection <= 5,
        "{at_ejection} requests reached the 503 endpoint before it was ejected"
    );
    assert_eq!(warm_ok, warmup, "warm-up requests failed despite retries");
    let t_eject = bad.log().last().map(|h| h.at).unwrap();

    // 3,000 GETs over 4 keep-alive connections.
    const CONNS: usize = 4;
    const PER_CONN: usize = 750;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(web).await.unwrap();
            let mut ok = 0usize;
            let mut bad_answers = Vec::new();
            for _ in 0..PER_CONN {
                match c.get("/").await {
                    Ok((200, _)) => ok += 1,
                    other => {
                        if bad_answers.len() < 5 {
                            bad_answers.push(format!("{other:?}"));
                        }
                        if other.is_err() {
                            c = Conn::open(web).await.unwrap();
                        }
                    }
                }
            }
            (ok, bad_answers)
        }));
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    for t in tasks {
        let (n, f) = t.await.unwrap();
        ok += n;
        failures.extend(f);
    }
    let load_took = started.elapsed();
    let total = CONNS * PER_CONN;
    let rate = ok as f64 / total as f64;
    eprintln!(
        "test 1: {ok}/{total} succeeded ({:.3}%) in {load_took:?}; failures: {failures:?}",
        rate * 100.0
    );

    // Light traffic until 9 s after the ejection, so that a return would be seen.
    let mut extra = 0;
    while t_eject.elapsed() < Duration::from_secs(9) && extra < 2000 {
        let _ = c.get("/").await;
        extra += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during: Vec<Duration> = bad.log()[at_ejection..]
        .iter()
        .map(|h| h.at - t_eject)
        .filter(|d| *d < Duration::from_secs(9))
        .collect();
    eprintln!(
        "test 1: 503 endpoint hits after its ejection within 9 s: {during:?} ({extra} extra requests)"
    );

    let (_, eps) = f.admin("GET", "/endpoints", "").await;
    let m = f.metrics().await;
    let ejections = metric(&m, r#"ferry_ejections_total{service="web"}"#);
    eprintln!(
        "test 1: ferry_ejections_total={ejections}\n{}",
        metric_lines(&m, "ferry_retries_total")
    );
    assert!(
        rate >= 0.999,
        "success {ok}/{total} is under 99.9%: {failures:?}"
    );
    assert!(
        during.is_empty(),
        "the ejected endpoint received requests {during:?} after its ejection (ejection time 10 s)\n{eps}\n{}",
        log_tail(&f)
    );
    assert!(ejections >= 1.0, "{}", metric_lines(&m, "ferry_ejections"));
}

// === 2. POST bodies and retries ===

/// A POST that fails after being written reaches the backends exactly once when
/// `retry-on` is unset, whether the backend answers 503 or closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_post_is_sent_once_without_retry_on() {
    for mode in [Mode::Answer(503), Mode::Close] {
        let x = backend("x", mode).await;
        let y = backend("y", mode).await;
        let f = Ferry::start_logged(&policy(&[("web", &[x.addr, y.addr], &[("retries", "2")])]));
        for i in 0..4u8 {
            let before = x.hits() + y.hits();
            let body = body_of(10 * 1024, i);
            let r = send(f.addr("web"), "POST", "/submit", body.clone()).await;
            let reached = x.hits() + y.hits() - before;
            eprintln!(
                "test 2 ({mode:?}): POST {i}: {:?}, {reached} backend hit(s)",
                r.as_ref()
                    .map(|a| (a.status, ferry_error(&a.headers)))
                    .map_err(|e| e.clone())
            );
            assert_eq!(
                reached,
                1,
                "{mode:?}: POST {i} reached the backends {reached} times with retry-on unset\n{}",
                log_tail(&f)
            );
            let status = r.map(|a| a.status).unwrap_or(0);
            assert!(status != 200, "{mode:?}: a failed POST answered {status}");
            if let Mode::Answer(503) = mode {
                assert_eq!(status, 503, "the backend's 503 reaches the client");
            }
        }
        // What the backends got were the whole bodies.
        for h in x.log().into_iter().chain(y.log()) {
            assert_eq!(h.method, "POST");
            assert_eq!(h.body.map(|b| b.len()), Some(10 * 1024), "{mode:?}");
        }
    }
}

/// With `retry-on: 503` a 10 KiB POST failing with 503 is sent again, and the second
/// backend receives the identical body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_post_is_retried_with_the_identical_body() {
    let bad = backend("bad", Mode::Answer(503)).await;
    let good = backend("good", Mode::Answer(200)).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[bad.addr, good.addr],
        &[("retries", "2"), ("retry-on", "503")],
    )]));
    let mut sent = Vec::new();
    for i in 0..4u8 {
        let body = body_of(10 * 1024, i);
        sent.push(body.clone());
        let r = send(f.addr("web"), "POST", "/submit", body).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_deref().ok()),
            (200, Some(&b"good"[..])),
            "POST {i}: {r:?}\n{}",
            log_tail(&f)
        );
    }
    let got: Vec<Bytes> = good.log().into_iter().filter_map(|h| h.body).collect();
    eprintln!(
        "test 2: 10 KiB POSTs: the 503 endpoint got {}, the good one {}",
        bad.hits(),
        good.hits()
    );
    assert!(bad.hits() >= 1, "no POST went to the 503 endpoint first");
    assert_eq!(good.hits(), 4, "each POST reached the good endpoint once");
    assert!(
        got == sent,
        "the good endpoint's bodies differ from those sent"
    );
    for h in bad.log() {
        let b = h.body.expect("the 503 endpoint read the whole body");
        assert!(sent.contains(&b), "the 503 endpoint got a body never sent");
    }
}

/// A 100 KiB POST (over the 64 KiB replay buffer) is never sent twice once written:
/// one backend hit, and the client gets the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_post_is_never_retried_once_written() {
    let bad = backend("bad", Mode::Answer(503)).await;
    let good = backend("good", Mode::Answer(200)).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[bad.addr, good.addr],
        &[("retries", "2"), ("retry-on", "503")],
    )]));
    let mut saw_503 = 0;
    for i in 0..4u8 {
        let body = body_of(100 * 1024, i);
        let (b0, g0) = (bad.hits(), good.hits());
        let r = send(f.addr("web"), "POST", "/submit", body.clone())
            .await
            .unwrap();
        let (db, dg) = (bad.hits() - b0, good.hits() - g0);
        eprintln!(
            "test 2: 100 KiB POST {i}: {} {:?}; hits: 503 endpoint +{db}, good +{dg}",
            r.status,
            ferry_error(&r.headers)
        );
        assert_eq!(
            db + dg,
            1,
            "100 KiB POST {i} reached the backends {} times\n{}",
            db + dg,
            log_tail(&f)
        );
        if db == 1 {
            saw_503 += 1;
            assert_eq!(r.status, 503, "POST {i}: {r:?}");
            assert_eq!(bad.log().last().unwrap().body.as_ref(), Some(&body));
        } else {
            assert_eq!(r.status, 200, "POST {i}: {r:?}");
        }
    }
    assert!(saw_503 >= 1, "no POST went to the 503 endpoint");
}

// === 3. idempotent GETs ===

/// `retries: 1` with `retry-on` unset still retries a GET answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotent_get_is_retried_on_503_without_retry_on() {
    let bad = backend("bad", Mode::Answer(503)).await;
    let good = backend("good", Mode::Answer(200)).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[bad.addr, good.addr],
        &[("retries", "1")],
    )]));
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    for i in 0..10 {
        let r = c.get("/").await;
        assert_eq!(
            r,
            Ok((200, "good".to_string())),
            "GET {i}\n{}",
            log_tail(&f)
        );
    }
    eprintln!(
        "test 3: 10 GETs: the 503 endpoint got {}, the good one {}",
        bad.hits(),
        good.hits()
    );
    assert!(bad.hits() >= 1, "no GET went to the 503 endpoint first");
    assert_eq!(good.hits(), 10);
}

// === 4. the retry budget ===

struct Budget;
impl Budget {
    const WINDOW_SECS: f64 = 10.0;
}

/// Every endpoint answers 503 with `retries: 3`: the budget (20% of requests plus
/// 10/s) bounds what the backends receive, and its exhaustion is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_retry_budget_bounds_the_load_on_a_failing_service() {
    let x = backend("x", Mode::Answer(503)).await;
    let y = backend("y", Mode::Answer(503)).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[x.addr, y.addr],
        &[
            ("retries", "3"),
            ("retry-on", "503"),
            ("outlier-failures", "0"),
        ],
    )]));
    let web = f.addr("web");
    // 1,000 requests, 4 connections each sending one every 10 ms: about 2.5 s.
    const CONNS: usize = 4;
    const PER_CONN: usize = 250;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(web).await.unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut statuses = Vec::new();
            for _ in 0..PER_CONN {
                tick.tick().await;
                match c.get_with("/", &[]).await {
                    Ok((s, h, body)) => {
                        if s != 503 && statuses.iter().all(|x| *x == 503) {
                            eprintln!(
                                "test 4: first answer other than 503: {s} x-ferry-error {:?} body {body:?}",
                                ferry_error(&h)
                            );
                        }
                        statuses.push(s)
                    }
                    Err(e) => {
                        statuses.push(0);
                        eprintln!("test 4: {e}");
                        c = Conn::open(web).await.unwrap();
                    }
                }
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let hits = x.hits() + y.hits();
    let n = statuses.len();
    // In any 10 s window, retries may add 20% of its requests plus 10/s (100 per
    // window): the whole run fits one window unless it took longer than 10 s.
    let seconds = elapsed.as_secs_f64().ceil().max(Budget::WINDOW_SECS);
    let allowed = n as f64 * 1.2 + 10.0 * seconds + 10.0;
    // What the budget would allow if its 10/s only accrued from the first request.
    let accrued = n as f64 * 1.2 + 10.0 * elapsed.as_secs_f64().ceil();
    let m = f.metrics().await;
    let exhausted = metric(&m, r#"ferry_retry_budget_exhausted_total{service="web"}"#);
    eprintln!(
        "test 4: {n} requests in {elapsed:?}: {hits} backend hits (allowed {allowed}, {accrued} if 10/s accrued from the start; without a budget up to {}), budget exhausted {exhausted} times\n{}",
        n * 4,
        metric_lines(&m, "ferry_retries_total")
    );
    let mut by_status = std::collections::BTreeMap::new();
    for s in &statuses {
        *by_status.entry(*s).or_insert(0) += 1;
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        n,
        "every request ends in the backends' 503: {by_status:?}\n{}",
        log_tail(&f)
    );
    assert!(
        hits as f64 <= allowed,
        "{hits} backend hits for {n} requests in {elapsed:?}: over the budget ({allowed})"
    );
    assert!(hits > n, "no retries at all ({hits} hits for {n} requests)");
    assert!(
        exhausted > 0.0,
        "{}",
        metric_lines(&m, "ferry_retry_budget")
    );
    let (_, eps) = f.admin("GET", "/endpoints", "").await;
    for e in eps["services"]["web"]["endpoints"].as_array().unwrap() {
        assert_ne!(
            e["health"], "ejected",
            "outlier-failures: 0 ejects nothing: {eps}"
        );
    }
}

// === 5. per-try timeout ===

/// One endpoint takes 1 s: a 100 ms per-try timeout moves the attempt to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_try_timeout_moves_a_slow_attempt_to_another_endpoint() {
    let slow = backend("slow", Mode::Delay(Duration::from_secs(1))).await;
    let fast = backend("fast", Mode::Answer(200)).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[slow.addr, fast.addr],
        &[
            ("retries", "1"),
            ("retry-on", "per-try-timeout"),
            ("per-try-timeout", "100ms"),
        ],
    )]));
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let r = c.get("/").await;
        let took = t.elapsed();
        worst = worst.max(took);
        assert_eq!(
            r,
            Ok((200, "fast".to_string())),
            "GET {i} after {took:?}\n{}",
            log_tail(&f)
        );
        assert!(took < Duration::from_millis(800), "GET {i} took {took:?}");
    }
    let m = f.metrics().await;
    eprintln!(
        "test 5: 20 GETs, slowest {worst:?}; slow endpoint got {}, fast {}\n{}",
        slow.hits(),
        fast.hits(),
        metric_lines(&m, "ferry_retries_total")
    );
    assert!(slow.hits() >= 1, "no GET went to the slow endpoint first");
}

// === 6. response and idle timeouts ===

/// `response-timeout` bounds the time to response headers, not the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_timeout_cuts_slow_headers_not_slow_bodies() {
    let late = backend("late", Mode::Delay(Duration::from_secs(1))).await;
    let trickle = backend(
        "trickle",
        Mode::Chunks {
            n: 11,
            gap: Duration::from_millis(100),
        },
    )
    .await;
    let rt = [("response-timeout", "200ms")];
    let f = Ferry::start_logged(&policy(&[
        ("late", &[late.addr], &rt),
        ("trickle", &[trickle.addr], &rt),
    ]));

    let t = Instant::now();
    let r = send(f.addr("late"), "GET", "/", Bytes::new())
        .await
        .unwrap();
    let took = t.elapsed();
    eprintln!(
        "test 6: slow headers: {} {:?} after {took:?}",
        r.status,
        ferry_error(&r.headers)
    );
    assert_eq!(
        (r.status, ferry_error(&r.headers).as_deref()),
        (504, Some("response-timeout")),
        "{r:?}\n{}",
        log_tail(&f)
    );
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(900),
        "504 after {took:?}"
    );

    let s = stream_get(f.addr("trickle")).await;
    let took = s.ended - s.sent;
    let want: String = (0..11).map(|k| format!("chunk {k}\n")).collect();
    eprintln!(
        "test 6: slow body under response-timeout: {} {:?} after {took:?}, {} frames",
        s.status,
        s.end,
        s.frames.len()
    );
    assert_eq!(s.status, 200);
    assert_eq!(
        (s.end.clone(), s.text()),
        (Ok(()), want),
        "response-timeout cut a body whose headers came at once\n{}",
        log_tail(&f)
    );
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

/// `stream-idle-timeout` lets a body with 100 ms gaps finish and cuts one that stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_idle_timeout_cuts_a_stalled_body_not_a_slow_one() {
    let trickle = backend(
        "trickle",
        Mode::Chunks {
            n: 11,
            gap: Duration::from_millis(100),
        },
    )
    .await;
    let stall = backend("stall", Mode::Stall(Duration::from_secs(1))).await;
    let idle = [("stream-idle-timeout", "300ms")];
    let f = Ferry::start_logged(&policy(&[
        ("trickle", &[trickle.addr], &idle),
        ("stall", &[stall.addr], &idle),
    ]));

    let s = stream_get(f.addr("trickle")).await;
    let want: String = (0..11).map(|k| format!("chunk {k}\n")).collect();
    eprintln!(
        "test 6: 100 ms gaps under stream-idle-timeout: {} {:?} after {:?}",
        s.status,
        s.end,
        s.ended - s.sent
    );
    assert_eq!(s.status, 200);
    assert_eq!(
        (s.end.clone(), s.text()),
        (Ok(()), want),
        "stream-idle-timeout cut a body that never paused 300 ms\n{}",
        log_tail(&f)
    );

    let s = stream_get(f.addr("stall")).await;
    assert_eq!(s.status, 200);
    let first = s
        .frames
        .first()
        .map(|(at, _)| *at)
        .expect("the first chunk arrives");
    let cut_after = s.ended - first;
    eprintln!(
        "test 6: stalled body: {:?} {:?}, ended {cut_after:?} after the stall began",
        s.text(),
        s.end
    );
    assert!(
        s.end.is_err() || s.text() != "first\nlast\n",
        "the stalled body was not cut: {:?} {:?}\n{}",
        s.text(),
        s.end,
        log_tail(&f)
    );
    assert!(
        s.text() == "first\n",
        "the stalled body was cut with {:?}",
        s.text()
    );
    assert!(
        cut_after >= Duration::from_millis(250) && cut_after < Duration::from_millis(700),
        "cut {cut_after:?} after the stall began (stream-idle-timeout 300ms)"
    );
}

// === 7. max-in-flight ===

/// `max-in-flight: 4` with a backend holding requests 500 ms: of 10 at once, the
/// excess is refused at once with 503 `overloaded`, the rest served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_in_flight_refuses_the_excess_at_once() {
    let hold = backend("hold", Mode::Delay(Duration::from_millis(500))).await;
    let f = Ferry::start_logged(&policy(&[("web", &[hold.addr], &[("max-in-flight", "4")])]));
    let web = f.addr("web");
    let burst = |n: usize| async move {
        let gate = Arc::new(tokio::sync::Barrier::new(n));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(web).await.unwrap();
                gate.wait().await;
                let t = Instant::now();
                let r = c.get_with("/", &[]).await;
                (r.map(|(s, h, _)| (s, ferry_error(&h))), t.elapsed())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    };
    let answers = burst(10).await;
    eprintln!("test 7: 10 at once: {answers:?}");
    let served = answers
        .iter()
        .filter(|(r, _)| matches!(r, Ok((200, None))))
        .count();
    let refused: Vec<Duration> = answers
        .iter()
        .filter(|(r, _)| matches!(r, Ok((503, Some(e))) if e == "overloaded"))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(
        served + refused.len(),
        10,
        "answers other than 200 or 503 overloaded: {answers:?}\n{}",
        log_tail(&f)
    );
    assert!(refused.len() >= 6, "{answers:?}");
    assert!((1..=4).contains(&served), "{answers:?}");
    assert!(
        refused.iter().all(|t| *t < Duration::from_millis(200)),
        "503s not at once: {refused:?}"
    );
    assert_eq!(hold.hits(), served, "refused requests reached the backend");
    let m = f.metrics().await;
    let series = r#"ferry_requests_total{direction="outbound",service="web",route="",status_code="503",grpc_status="",classification="failure"}"#;
    assert_eq!(
        metric(&m, series),
        refused.len() as f64,
        "{}",
        metric_lines(&m, "ferry_requests_total")
    );

    // Afterwards: as many as the limit at once are all served.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let answers = burst(4).await;
    eprintln!("test 7: 4 at once afterwards: {answers:?}");
    assert!(
        answers.iter().all(|(r, _)| matches!(r, Ok((200, None)))),
        "{answers:?}"
    );
}

// === 8. validation ===

/// Bad values of the new keys are refused through `PUT /policy`, naming the key, and
/// change nothing; a document using every new key is accepted and shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resilience_values_are_refused_naming_the_key() {
    let up = backend("a", Mode::Answer(200)).await;
    let f = Ferry::start_logged(&policy(&[("web", &[up.addr], &[("retries", "1")])]));
    let (_, before) = f.admin("GET", "/policy", "").await;
    for (key, value) in [
        ("retry-on", "bogus"),
        ("max-ejection-percent", "150"),
        ("per-try-timeout", "soon"),
        ("max-in-flight", "0"),
    ] {
        let doc = format!("services: {{web: {{{key}: {value}}}}}");
        let (status, body) = f.admin("PUT", "/policy", &doc).await;
        eprintln!("test 8: {doc} -> {status} {body}");
        assert_eq!(status, 400, "{doc}: {body}");
        let errors = body["errors"].as_array().cloned().unwrap_or_default();
        assert!(
            errors.iter().any(|e| {
                e["field"] == format!("services.web.{key}")
                    && e["error"].as_str().is_some_and(|s| s.contains(key))
            }),
            "{doc}: the error does not name {key}: {body}"
        );
        let (_, now) = f.admin("GET", "/policy", "").await;
        assert_eq!(now["version"], before["version"], "{doc}");
        assert_eq!(now["policy"], before["policy"], "{doc} changed the policy");
    }

    let valid = [
        ("retries", "2"),
        ("retry-on", "503,reset,per-try-timeout"),
        ("per-try-timeout", "150ms"),
        ("response-timeout", "2s"),
        ("stream-idle-timeout", "30s"),
        ("outlier-failures", "3"),
        ("outlier-ejection", "20s"),
        ("max-ejection-percent", "30"),
        ("max-in-flight", "50"),
        ("adaptive-concurrency", "on"),
    ];
    let doc = format!(
        "services:\n  web:\n{}",
        valid
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect::<String>()
    );
    let (status, body) = f.admin("PUT", "/policy", &doc).await;
    eprintln!("test 8: all new keys -> {status} {body}");
    assert_eq!(status, 200, "{doc}\n{body}");
    let (_, p) = f.admin("GET", "/policy", "").await;
    let web = &p["policy"]["services"]["web"];
    for (k, v) in valid {
        let shown = web[k].as_str().unwrap_or_default();
        let same = if k == "retry-on" {
            let set = |s: &str| {
                let mut v: Vec<String> = s.split(',').map(|p| p.trim().to_string()).collect();
                v.sort();
                v
            };
            set(shown) == set(v)
        } else {
            shown == v
        };
        assert!(same, "{k}: {v} shown as {:?}: {p}", web[k]);
        assert_eq!(
            p["sources"][format!("services.web.{k}")],
            "admin",
            "{k}: {p}"
        );
    }
    // Still serving under it.
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    assert_eq!(c.get("/").await, Ok((200, "a".to_string())));
}

// === 9. HTTP/2 streams the upstream never processed ===

/// A raw HTTP/2 server that answers `REFUSED_STREAM` to every stream when `refuse`,
/// else 200 with its name; it records every body it read whole.
async fn h2_backend(name: &'static str, refuse: bool) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let method = req.method().to_string();
                        if refuse {
                            seen.lock().unwrap().push(Hit {
                                at: Instant::now(),
                                method,
                                body: None,
                            });
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            return;
                        }
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        seen.lock().unwrap().push(Hit {
                            at: Instant::now(),
                            method,
                            body: Some(Bytes::from(got)),
                        });
                        let resp = Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut send) = respond.send_response(resp, false) {
                            let _ = send.send_data(Bytes::from(name), true);
                        }
                    });
                }
            });
        }
    });
    Backend { addr, log }
}

/// An HTTP/2 upstream that refuses a stream (`REFUSED_STREAM`) did nothing with it, so
/// a POST goes to the other endpoint with its body, even with `retries: 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_stream_is_sent_to_another_endpoint_even_as_a_post() {
    let refusing = h2_backend("refusing", true).await;
    let good = h2_backend("good", false).await;
    let f = Ferry::start_logged(&policy(&[(
        "web",
        &[refusing.addr, good.addr],
        &[("outlier-failures", "0")],
    )]));
    let mut sender = support::h2c(f.addr("web")).await;
    let mut sent = Vec::new();
    for i in 0..4u8 {
        let body = body_of(8 * 1024, i);
        sent.push(body.clone());
        let req = Request::post(format!("http://{}/submit", f.addr("web")))
            .body(Full::new(body))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            (status.as_u16(), &got[..]),
            (200, &b"good"[..]),
            "POST {i}\n{}",
            log_tail(&f)
        );
    }
    let bodies: Vec<Bytes> = good.log().into_iter().filter_map(|h| h.body).collect();
    eprintln!(
        "test 9: the refusing endpoint saw {}, the good one {}",
        refusing.hits(),
        good.hits()
    );
    assert!(
        refusing.hits() >= 1,
        "no stream went to the refusing endpoint"
    );
    assert_eq!(
        bodies, sent,
        "each POST reached the good endpoint once, whole"
    );
    let m = f.metrics().await;
    assert!(
        metric(
            &m,
            r#"ferry_retries_total{service="web",reason="refused-stream"}"#
        ) >= 1.0,
        "{}",
        metric_lines(&m, "ferry_retries_total")
    );
}
