//! Locality-aware balancing through the real sidecar, in explicit mode: six HTTP/1.1
//! backends on loopback, two in zone a and two in zone b of region r1, two in zone c of
//! region r2; ferry runs in zone a. Calls stay in zone a while it is healthy, fail over
//! to zone b and then to zone c when zones go down (without one failed call), come back
//! when zone a returns, spill to zone b while zone a is slow, and spread over every zone
//! with `locality: off`. Backends can be stopped (listener and open connections
//! closed), restarted on the same address, slowed at run time, or replaced by a
//! blackhole that drops SYNs (an ignored test, until ferry stops charging a retried
//! request's lost time to the endpoint that answers it).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use support::{Conn, Ferry, eventually};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The tests here measure shares and times; one at a time keeps them from skewing each
/// other on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The six backends: name (its first letter is its zone), zone, region.
const BACKENDS: [(&str, &str, &str); 6] = [
    ("a1", "a", "r1"),
    ("a2", "a", "r1"),
    ("b1", "b", "r1"),
    ("b2", "b", "r1"),
    ("c1", "c", "r2"),
    ("c2", "c", "r2"),
];

/// An HTTP/1.1 backend answering every request with its name, after `delay_ms`.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    /// One clone per open connection: the count tells when every one is closed.
    open: Arc<()>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    /// Binds `ip` on a free port.
    async fn start(name: &'static str, ip: &str) -> Backend {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let mut b = Backend {
            name,
            addr: l.local_addr().unwrap(),
            delay_ms: Arc::new(AtomicU64::new(0)),
            open: Arc::new(()),
            task: None,
        };
        b.serve(l);
        b
    }

    fn serve(&mut self, l: TcpListener) {
        let (name, delay, open) = (self.name, self.delay_ms.clone(), self.open.clone());
        self.task = Some(tokio::spawn(async move {
            // Dropping this task (on stop) drops the listener and the JoinSet, which
            // aborts every connection task and so closes its socket.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = l.accept() => {
                        let Ok((s, _)) = accepted else { return };
                        let (delay, guard) = (delay.clone(), open.clone());
                        conns.spawn(async move {
                            let _guard = guard;
                            let svc = hyper::service::service_fn(move |_: Request<hyper::body::Incoming>| {
                                let ms = delay.load(Ordering::Relaxed);
                                async move {
                                    if ms > 0 {
                                        tokio::time::sleep(Duration::from_millis(ms)).await;
                                    }
                                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(name))))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
    }

    /// Closes the listener and every open connection; returns once a new connect is
    /// refused and no connection is left.
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let addr = self.addr;
        let open = Arc::downgrade(&self.open);
        assert!(
            eventually(Duration::from_secs(5), || {
                let open = open.clone();
                async move { open.strong_count() == 1 && TcpStream::connect(addr).await.is_err() }
            })
            .await,
            "{} ({addr}) did not stop",
            self.name
        );
    }

    /// Listens again on the same address.
    async fn restart(&mut self) {
        assert!(self.task.is_none(), "{} is running", self.name);
        let end = Instant::now() + Duration::from_secs(5);
        let l = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() > end => panic!("rebinding {}: {e}", self.addr),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(l);
    }

    fn slow(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A listener on an address that never accepts, with its accept queue full: the kernel
/// drops further SYNs, so a connect there waits out its timeout, as with a zone cut off
/// by the network.
struct Blackhole {
    _listener: socket2::Socket,
    _queued: Vec<socket2::Socket>,
}

impl Blackhole {
    fn on(addr: SocketAddr) -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.set_reuse_address(true).unwrap();
        l.bind(&addr.into()).unwrap();
        l.listen(0).unwrap();
        let mut queued = Vec::new();
        for _ in 0..3 {
            let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            let _ = c.connect(&addr.into());
            queued.push(c);
        }
        // Wait until a connect really times out.
        let end = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            assert!(Instant::now() < end, "{addr} still accepts connections");
        }
        Blackhole {
            _listener: l,
            _queued: queued,
        }
    }
}

/// The six backends on `127.0.<net>.1` to `.6` (a separate address per backend, so a
/// stopped one's port is not taken by anything else before it restarts).
async fn backends(net: u8) -> Vec<Backend> {
    let mut out = Vec::new();
    for (i, (name, _, _)) in BACKENDS.iter().enumerate() {
        out.push(Backend::start(name, &format!("127.0.{net}.{}", i + 1)).await);
    }
    out
}

fn policy(bs: &[Backend], service_extra: &str) -> String {
    let mut eps = String::new();
    for (b, (_, zone, region)) in bs.iter().zip(BACKENDS) {
        eps += &format!(
            "      - {{address: \"{}\", zone: {zone}, region: {region}}}\n",
            b.addr
        );
    }
    format!(
        "admin: 127.0.0.1:0\nzone: a\nregion: r1\n\
         listeners: [{{name: echo, bind: \"127.0.0.1:0\", service: echo}}]\n\
         services:\n  echo:\n{service_extra}    endpoints:\n{eps}"
    )
}

/// Like `Ferry::start`, but ferry logs at INFO to `ferry.log` in its directory, so the
/// test can read its `locality ...` lines.
fn start_ferry(policy: &str) -> Ferry {
    Ferry::start_logged(policy)
}

fn log(f: &Ferry) -> String {
    f.log()
}

/// ferry's log lines containing `what` and naming service echo.
fn log_lines(f: &Ferry, what: &str) -> Vec<String> {
    log(f)
        .lines()
        .filter(|l| l.contains(what) && l.contains("echo"))
        .map(str::to_string)
        .collect()
}

fn locality_log(f: &Ferry) -> String {
    log(f)
        .lines()
        .filter(|l| l.contains("locality"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A keep-alive client connection to ferry's listener, reopened when it breaks.
struct Client {
    addr: SocketAddr,
    conn: Option<Conn>,
}

/// One call: when it was made and who answered (or what went wrong).
struct Call {
    at: Instant,
    answer: Result<String, String>,
}

impl Call {
    fn zone(&self) -> Option<&str> {
        self.answer.as_ref().ok().map(|name| &name[..1])
    }
}

impl Client {
    fn new(f: &Ferry) -> Client {
        Client {
            addr: f.addr("echo"),
            conn: None,
        }
    }

    async fn call(&mut self) -> Call {
        let at = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), self.get()).await;
        let answer = answer.unwrap_or_else(|_| {
            self.conn = None;
            Err("no answer within 10 s".into())
        });
        Call { at, answer }
    }

    async fn get(&mut self) -> Result<String, String> {
        if self.conn.is_none() {
            let c = Conn::open(self.addr)
                .await
                .map_err(|e| format!("connecting to ferry: {e}"))?;
            self.conn = Some(c);
        }
        match self.conn.as_mut().unwrap().get_with("/", &[]).await {
            Ok((200, _, body)) if BACKENDS.iter().any(|b| b.0 == body) => Ok(body),
            Ok((status, headers, body)) => Err(format!(
                "{status} x-ferry-error: {:?}, body {body:?}",
                headers.get("x-ferry-error")
            )),
            Err(e) => {
                self.conn = None;
                Err(format!("connection to ferry broke: {e}"))
            }
        }
    }

    async fn calls(&mut self, n: usize) -> Vec<Call> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.call().await);
        }
        out
    }
}

/// Answers per zone (`"a"`, `"b"`, `"c"`), and `"failed"`.
fn by_zone(calls: &[Call]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for c in calls {
        *m.entry(c.zone().unwrap_or("failed")).or_default() += 1;
    }
    m
}

fn count(calls: &[Call], zone: &str) -> usize {
    calls.iter().filter(|c| c.zone() == Some(zone)).count()
}

fn failures(calls: &[Call]) -> Vec<&str> {
    calls
        .iter()
        .filter_map(|c| c.answer.as_ref().err().map(String::as_str))
        .collect()
}

/// Calls (one every `pace`) until a window of `window` consecutive calls has at least
/// 95% answered in `zone`, for at most `bound`. Returns the time from `since` to the
/// first call of that window, if one came, and every call made.
async fn until_home(
    client: &mut Client,
    zone: &str,
    since: Instant,
    window: usize,
    bound: Duration,
    pace: Duration,
) -> (Option<Duration>, Vec<Call>) {
    let mut calls = Vec::new();
    while since.elapsed() < bound {
        calls.push(client.call().await);
        if calls.len() >= window {
            let w = &calls[calls.len() - window..];
            if count(w, zone) * 100 >= window * 95 {
                return (Some(w[0].at - since), calls);
            }
        }
        tokio::time::sleep(pace).await;
    }
    (None, calls)
}

async fn echo_state(f: &Ferry) -> Json {
    let (status, body) = f.admin("GET", "/endpoints", "").await;
    assert_eq!(status, 200, "{body}");
    body["services"]["echo"].clone()
}

/// The entry for `tier` in `/endpoints`' locality tiers.
fn tier(echo: &Json, name: &str) -> Json {
    echo["locality"]["tiers"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["tier"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no tier {name} in {echo:#}"))
}

async fn tier_healthy(f: &Ferry, name: &str) -> u64 {
    tier(&echo_state(f).await, name)["healthy"]
        .as_u64()
        .unwrap()
}

/// The value of the metric `name` with exactly these labels, if ferry exports it.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{')?;
        if n != name {
            return None;
        }
        let got: HashMap<&str, &str> = rest
            .strip_suffix('}')?
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.trim_matches('"')))
            })
            .collect();
        let same = got.len() == labels.len() && labels.iter().all(|(k, v)| got.get(k) == Some(v));
        if same { value.parse().ok() } else { None }
    })
}

/// `/endpoints` for echo once it plans all traffic for zone a. That is at once unless a
/// latency blip in zone a (one slow answer on a busy machine) set off an overload spill;
/// then calls go on (paced, up to 15 s) until the spill is over. Says so when it waited.
async fn home_plan(f: &Ferry, client: &mut Client) -> Json {
    let start = Instant::now();
    let mut echo = echo_state(f).await;
    let mut spilled = None;
    while tier(&echo, "zone")["share"].as_f64() != Some(1.0)
        && start.elapsed() < Duration::from_secs(15)
    {
        spilled.get_or_insert_with(|| echo["locality"]["reason"].to_string());
        for _ in 0..20 {
            let c = client.call().await;
            assert!(c.answer.is_ok(), "{:?}", c.answer);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        echo = echo_state(f).await;
    }
    if let Some(reason) = spilled {
        eprintln!(
            "zone a's plan was not 100% ({reason}); back after {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
    echo
}

fn echo_tier_metric(text: &str, name: &str, t: &str) -> f64 {
    metric(text, name, &[("service", "echo"), ("tier", t)]).unwrap_or(0.0)
}

async fn stop_zone(bs: &mut [Backend], zone: &str) {
    for (b, (_, z, _)) in bs.iter_mut().zip(BACKENDS) {
        if z == zone {
            b.stop().await;
        }
    }
}

async fn restart_zone(bs: &mut [Backend], zone: &str) {
    for (b, (_, z, _)) in bs.iter_mut().zip(BACKENDS) {
        if z == zone {
            b.restart().await;
        }
    }
}

fn slow_zone(bs: &[Backend], zone: &str, ms: u64) {
    for (b, (_, z, _)) in bs.iter().zip(BACKENDS) {
        if z == zone {
            b.slow(ms);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_then_region_then_other_and_back_and_spill_when_slow() {
    let _serial = SERIAL.lock().await;
    let mut bs = backends(1).await;
    let f = start_ferry(&policy(&bs, ""));
    let mut client = Client::new(&f);

    // 1. All healthy: zone a answers (nearly) everything.
    let calls = client.calls(400).await;
    assert!(failures(&calls).is_empty(), "{:?}", failures(&calls));
    let a = count(&calls, "a");
    eprintln!("step 1, all healthy: {:?} of 400", by_zone(&calls));
    assert!(
        a * 100 >= 400 * 95,
        "zone a answered {a} of 400 ({:?}); flat balancing would give it about a third\n{:#}\n{}",
        by_zone(&calls),
        echo_state(&f).await,
        locality_log(&f)
    );
    let echo = echo_state(&f).await;
    let loc = &echo["locality"];
    assert_eq!(loc["mode"], "prefer-zone", "{echo:#}");
    assert_eq!(loc["caller"]["zone"], "a", "{echo:#}");
    assert_eq!(loc["caller"]["region"], "r1", "{echo:#}");
    let expected_tier: HashMap<String, &str> = bs
        .iter()
        .zip(BACKENDS)
        .map(|(b, (_, z, _))| {
            let t = match z {
                "a" => "zone",
                "b" => "region",
                _ => "other",
            };
            (b.addr.to_string(), t)
        })
        .collect();
    let eps = echo["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 6, "{echo:#}");
    for e in eps {
        let addr = e["address"].as_str().unwrap();
        assert_eq!(e["tier"], expected_tier[addr], "endpoint {addr}: {echo:#}");
    }
    let echo = home_plan(&f, &mut client).await;
    let zone = tier(&echo, "zone");
    assert_eq!(zone["healthy"], 2, "{echo:#}");
    assert_eq!(zone["total"], 2, "{echo:#}");
    assert_eq!(zone["share"].as_f64(), Some(1.0), "{echo:#}");
    for t in ["region", "other"] {
        let t = tier(&echo, t);
        assert_eq!(
            (t["healthy"].as_u64(), t["total"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(t["share"].as_f64(), Some(0.0), "{echo:#}");
    }

    // 2. Zone a goes down: no call fails, zone b (same region) takes over, not zone c.
    stop_zone(&mut bs, "a").await;
    let calls = client.calls(300).await;
    eprintln!("step 2, zone a down: {:?} of 300", by_zone(&calls));
    assert!(
        failures(&calls).is_empty(),
        "{} of 300 calls failed after zone a stopped (first: {:?})\n{}",
        failures(&calls).len(),
        failures(&calls).first(),
        locality_log(&f)
    );
    let c_calls: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].zone() == Some("c"))
        .collect();
    assert!(
        c_calls.is_empty(),
        "zone c answered calls {c_calls:?} of 300 while zone b was healthy ({:?})\n{:#}\n{}",
        by_zone(&calls),
        echo_state(&f).await,
        locality_log(&f)
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            tier_healthy(&f, "zone").await == 0
        })
        .await,
        "{:#}",
        echo_state(&f).await
    );
    // After the first few calls, no pick goes to zone a any more.
    let zone_picks = echo_tier_metric(&f.metrics().await, "ferry_locality_requests_total", "zone");
    let more = client.calls(100).await;
    assert!(failures(&more).is_empty(), "{:?}", failures(&more));
    assert_eq!(count(&more, "b"), 100, "{:?}", by_zone(&more));
    let zone_picks_after =
        echo_tier_metric(&f.metrics().await, "ferry_locality_requests_total", "zone");
    eprintln!("step 2: picks of zone a in all: {zone_picks_after}");
    assert_eq!(
        zone_picks, zone_picks_after,
        "zone a was still picked while down"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            !log_lines(&f, "locality failover").is_empty()
        })
        .await,
        "no `locality failover` line for echo:\n{}",
        log(&f)
    );
    let failovers = log_lines(&f, "locality failover");
    eprintln!("step 2: {}", failovers.join("\n"));
    // One line per change of where traffic goes: when a's endpoints are ejected one
    // after the other there may be two (part to b, then all to b), not more.
    assert!(failovers.len() <= 2, "{}", failovers.join("\n"));

    // 3. Zone b goes down too: zone c (other region) takes over, still no call fails.
    stop_zone(&mut bs, "b").await;
    let calls = client.calls(300).await;
    eprintln!("step 3, zones a and b down: {:?} of 300", by_zone(&calls));
    assert!(
        failures(&calls).is_empty(),
        "{} of 300 calls failed after zone b stopped (first: {:?})\n{}",
        failures(&calls).len(),
        failures(&calls).first(),
        locality_log(&f)
    );
    assert_eq!(count(&calls, "c"), 300, "{:?}", by_zone(&calls));
    assert!(
        eventually(Duration::from_secs(5), || async {
            log_lines(&f, "locality failover").len() > failovers.len()
        })
        .await,
        "no new `locality failover` line for echo when zone b stopped:\n{}",
        locality_log(&f)
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            tier_healthy(&f, "region").await == 0
        })
        .await,
        "{:#}",
        echo_state(&f).await
    );

    // 4. Zone a comes back: traffic returns to it within seconds.
    restart_zone(&mut bs, "a").await;
    let restarted = Instant::now();
    let (back, calls) = until_home(
        &mut client,
        "a",
        restarted,
        50,
        Duration::from_secs(15),
        Duration::from_millis(5),
    )
    .await;
    assert!(
        failures(&calls).is_empty(),
        "calls failed while zone a came back: {:?}",
        failures(&calls)
    );
    let Some(back) = back else {
        panic!(
            "traffic did not return to zone a within 15 s: {:?}\n{:#}\n{}",
            by_zone(&calls),
            echo_state(&f).await,
            locality_log(&f)
        )
    };
    eprintln!(
        "step 4: traffic back in zone a {:.2} s after its backends restarted ({} calls)",
        back.as_secs_f64(),
        calls.len()
    );
    assert!(back <= Duration::from_secs(5), "took {back:?}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            !log_lines(&f, "locality return").is_empty()
        })
        .await,
        "no `locality return` line for echo:\n{}",
        log(&f)
    );

    // 5. Zone b is back; zone a turns slow (200 ms): traffic spills to zone b.
    restart_zone(&mut bs, "b").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            tier_healthy(&f, "region").await == 2
        })
        .await,
        "{:#}",
        echo_state(&f).await
    );
    slow_zone(&bs, "a", 200);
    let slowed = Instant::now();
    let mut calls = Vec::new();
    while calls.len() < 300 && slowed.elapsed() < Duration::from_secs(10) {
        calls.push(client.call().await);
    }
    assert!(failures(&calls).is_empty(), "{:?}", failures(&calls));
    let progression: Vec<String> = calls
        .chunks(25)
        .map(|w| format!("{}/{}", count(w, "b"), w.len()))
        .collect();
    let last = &calls[calls.len().saturating_sub(50)..];
    let spill = count(last, "b") as f64 / last.len() as f64;
    eprintln!(
        "step 5, zone a slow: {} calls in {:.1} s, {:?}; zone b's part per 25 calls: {}; \
         last {} calls: {:.0}% to zone b",
        calls.len(),
        slowed.elapsed().as_secs_f64(),
        by_zone(&calls),
        progression.join(" "),
        last.len(),
        spill * 100.0
    );
    assert!(
        spill >= 0.5,
        "zone a is 200 ms slower than zone b, yet only {:.0}% of the last {} calls spilled to b \
         (per 25 calls: {})\n{:#}\n{}",
        spill * 100.0,
        last.len(),
        progression.join(" "),
        echo_state(&f).await,
        locality_log(&f)
    );
    assert_eq!(count(&calls, "c"), 0, "{:?}", by_zone(&calls));
    assert!(
        eventually(Duration::from_secs(5), || async {
            !log_lines(&f, "locality spill").is_empty()
        })
        .await,
        "no `locality spill` line for echo:\n{}",
        log(&f)
    );
    eprintln!("step 5: {}", log_lines(&f, "locality spill").join("\n"));

    // Zone a is fast again: traffic comes back once its latency estimate has decayed.
    slow_zone(&bs, "a", 0);
    let fast = Instant::now();
    let (back, calls) = until_home(
        &mut client,
        "a",
        fast,
        50,
        Duration::from_secs(60),
        Duration::from_millis(5),
    )
    .await;
    assert!(failures(&calls).is_empty(), "{:?}", failures(&calls));
    let Some(back) = back else {
        panic!(
            "traffic did not return to zone a within 60 s of it being fast again: {:?}\n{:#}\n{}",
            by_zone(&calls),
            echo_state(&f).await,
            locality_log(&f)
        )
    };
    eprintln!(
        "step 5: traffic back in zone a {:.2} s after it was fast again ({} calls)",
        back.as_secs_f64(),
        calls.len()
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            log_lines(&f, "locality return").len() >= 2
        })
        .await,
        "no `locality return` line for echo after the spill:\n{}",
        locality_log(&f)
    );
    eprintln!("ferry's locality log:\n{}", locality_log(&f));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_off_spreads_over_every_zone() {
    let _serial = SERIAL.lock().await;
    let bs = backends(2).await;
    let f = start_ferry(&policy(&bs, "    locality: off\n"));
    // Twelve callers at once, as a service under load would call: with sequential calls
    // p2c-ewma follows sub-millisecond noise in the latency estimates, while requests in
    // flight weigh alike on every endpoint.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut client = Client::new(&f);
        tasks.push(tokio::spawn(async move { client.calls(50).await }));
    }
    let mut calls = Vec::new();
    for t in tasks {
        calls.extend(t.await.unwrap());
    }
    assert!(failures(&calls).is_empty(), "{:?}", failures(&calls));
    let zones = by_zone(&calls);
    eprintln!("locality off: {zones:?} of 600");
    for z in ["a", "b", "c"] {
        let share = count(&calls, z) as f64 / 600.0;
        assert!(
            (0.20..=0.47).contains(&share),
            "zone {z} got {share:.2} of the calls ({zones:?})"
        );
    }
    let echo = echo_state(&f).await;
    assert_eq!(echo["locality"]["mode"], "off", "{echo:#}");
    let tiers = echo["locality"]["tiers"].as_array().expect("tiers");
    assert_eq!(tiers.len(), 1, "{echo:#}");
    assert_eq!(tiers[0]["tier"], "any", "{echo:#}");
    assert_eq!(tiers[0]["total"], 6, "{echo:#}");
    for e in echo["endpoints"].as_array().unwrap() {
        assert_eq!(e["tier"], "any", "{echo:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_metrics_count_picks_per_tier() {
    let _serial = SERIAL.lock().await;
    let bs = backends(3).await;
    let f = start_ferry(&policy(&bs, ""));
    let mut client = Client::new(&f);
    let calls = client.calls(200).await;
    assert!(failures(&calls).is_empty(), "{:?}", failures(&calls));
    let m = f.metrics().await;
    let lines: Vec<&str> = m.lines().filter(|l| l.contains("locality")).collect();
    eprintln!("{}", lines.join("\n"));
    let picks: Vec<f64> = ["zone", "region", "other"]
        .iter()
        .map(|t| echo_tier_metric(&m, "ferry_locality_requests_total", t))
        .collect();
    assert!(
        metric(
            &m,
            "ferry_locality_requests_total",
            &[("service", "echo"), ("tier", "zone")]
        )
        .is_some(),
        "{}",
        lines.join("\n")
    );
    // Every call was one pick (nothing failed, nothing retried), each answered by a
    // backend of the tier picked.
    assert_eq!(picks.iter().sum::<f64>(), 200.0, "{}", lines.join("\n"));
    assert_eq!(picks[0], count(&calls, "a") as f64, "{:?}", by_zone(&calls));
    assert_eq!(picks[1], count(&calls, "b") as f64, "{:?}", by_zone(&calls));
    assert_eq!(picks[2], count(&calls, "c") as f64, "{:?}", by_zone(&calls));
    assert!(
        picks[0] >= 190.0,
        "{}\n{}",
        lines.join("\n"),
        locality_log(&f)
    );
    // The planned shares: what /endpoints shows, all of it for zone a once settled.
    let echo = home_plan(&f, &mut client).await;
    let m = f.metrics().await;
    let lines: Vec<&str> = m.lines().filter(|l| l.contains("locality")).collect();
    for t in ["zone", "region", "other"] {
        let share = metric(
            &m,
            "ferry_locality_share",
            &[("service", "echo"), ("tier", t)],
        );
        assert_eq!(
            share,
            tier(&echo, t)["share"].as_f64(),
            "tier {t}: {}\n{echo:#}",
            lines.join("\n")
        );
        let expected = if t == "zone" { 1.0 } else { 0.0 };
        assert_eq!(share, Some(expected), "tier {t}: {}", lines.join("\n"));
    }
}

/// Zone a stops answering SYNs instead of refusing (a network partition): each attempt
/// there waits out the connect timeout (300 ms) and is retried on zone b. Zone b must
/// not be charged for the time lost in zone a, or it looks overloaded next to zone c's
/// untouched estimate and traffic spills to the other region though zone b is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_cut_off_by_the_network_fails_over_within_the_region() {
    let _serial = SERIAL.lock().await;
    let mut bs = backends(4).await;
    let f = start_ferry(&policy(&bs, "    connect-timeout: 300ms\n"));
    let mut client = Client::new(&f);
    let warm = client.calls(100).await;
    assert!(failures(&warm).is_empty(), "{:?}", failures(&warm));
    let mut holes = Vec::new();
    for b in bs.iter_mut().take(2) {
        b.stop().await;
        holes.push(Blackhole::on(b.addr));
    }
    let cut = Instant::now();
    let mut calls = Vec::new();
    while cut.elapsed() < Duration::from_secs(6) && calls.len() < 3000 {
        calls.push(client.call().await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let per_second: Vec<String> = (0..6)
        .map(|s| {
            let w: Vec<&Call> = calls
                .iter()
                .filter(|c| (c.at - cut).as_secs() == s)
                .collect();
            let (b, c) = (
                w.iter().filter(|x| x.zone() == Some("b")).count(),
                w.iter().filter(|x| x.zone() == Some("c")).count(),
            );
            format!("b {b} c {c}")
        })
        .collect();
    eprintln!(
        "zone a cut off: {:?} of {} calls; per second: {}",
        by_zone(&calls),
        calls.len(),
        per_second.join(", ")
    );
    assert!(
        failures(&calls).is_empty(),
        "{} calls failed (first: {:?})",
        failures(&calls).len(),
        failures(&calls).first()
    );
    assert_eq!(
        count(&calls, "c"),
        0,
        "zone c answered while zone b was healthy; per second: {}\n{:#}\n{}",
        per_second.join(", "),
        echo_state(&f).await,
        locality_log(&f)
    );
    drop(holes);
}
