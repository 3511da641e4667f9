//! Locality-aware balancing in a cluster, end to end: a client pod on node-a (zone a,
//! region r1) calls a Service with two pods on each of node-a, node-b (zone b, r1) and
//! node-c (zone c, r2). Its sidecar learns its own locality and each endpoint's from
//! ferry-controller (Node labels), keeps calls in zone a, fails over to zone b (same
//! region) when zone a's servers die, then to zone c, comes back when zone a does, spills
//! to zone b when zone a is slow, and with `trafficDistribution: PreferSameNode` keeps
//! calls on its own node.
//!
//! Network namespaces as in `kube_mesh.rs`: a "node" (router; runs etcd, kube-apiserver,
//! kube-controller-manager and ferry-controller on its loopback, and kube-proxy's random
//! DNAT of the ClusterIP), a client "pod" programmed by `ferry init` with the sidecar as
//! uid 1337, and backend "pods" with real gRPC servers (an Echo server here that can be
//! made slow at run time). Pods are real API objects made ready by patching their status
//! (there is no kubelet); the real EndpointSlice controller writes the slices. Needs root;
//! skipped otherwise.
//!
//! One test, in steps that build on each other. Where an expectation on measured traffic
//! does not hold, the test notes it, goes on (the steps after still say something), and
//! fails at the end with every note; broken set-up fails at once. Each step prints what it
//! measured and the sidecar's plan (`/endpoints` tiers and reason).

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_demo::proto::echo_client::EchoClient;
use ferry_demo::proto::echo_server::{Echo, EchoServer};
use ferry_demo::proto::{EchoReply, EchoRequest};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value as Json, json};
use support::controller::Controller;
use support::kube::{
    Cluster, ServicePortSpec, create_namespace, create_node, create_pod, create_service,
    set_pod_ready, wait_for_slices,
};
use support::netns::{Namespaces, as_proxy_user, ferry_for_proxy_user, is_root, must};
use support::raw;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

const NS: &str = "ferry-demo";
/// The Service's name in the sidecar's `/endpoints` and metrics.
const ECHO: &str = "echo.ferry-demo";
const NEAR: &str = "echo-near.ferry-demo";
const NODE: usize = 0;
const CLIENT: usize = 1;
const CONTROLLER: &str = "10.252.100.1:8086";
const ADMIN: &str = "127.0.0.1:15000";

/// The backend pods and their nodes. Pod `i` lives in namespace `2 + i` at
/// 10.252.<2 + i>.2; its zone is its name's first letter. The last one (on a second node
/// of zone a) joins for the last step only.
const PODS: [(&str, &str); 7] = [
    ("a-0", "node-a"),
    ("a-1", "node-a"),
    ("b-0", "node-b"),
    ("b-1", "node-b"),
    ("c-0", "node-c"),
    ("c-1", "node-c"),
    ("a2-0", "node-a2"),
];
const ZONE_A: [usize; 2] = [0, 1];
const ZONE_B: [usize; 2] = [2, 3];
const FIRST_SIX: [usize; 6] = [0, 1, 2, 3, 4, 5];
const EXTRA: usize = 6;

fn netns_of(pod: usize) -> usize {
    2 + pod
}

fn pod_ip(pod: usize) -> String {
    format!("10.252.{}.2", netns_of(pod))
}

fn zone_of(server: &str) -> &str {
    &server[..1]
}

/// What each zone's servers wait before answering, in ms (zones a, b, c).
static DELAY_MS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// A pod's app: answers `Say` with the pod's name, after its zone's delay.
#[derive(Clone)]
struct Backend {
    name: String,
    zone: usize,
}

type Replies = Pin<Box<dyn futures::Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Backend {
    async fn say(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let delay = DELAY_MS[self.zone].load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Ok(Response::new(EchoReply {
            message: req.into_inner().message,
            server: self.name.clone(),
        }))
    }

    type ExpandStream = Replies;

    async fn expand(&self, _: Request<EchoRequest>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("only Say"))
    }

    async fn collect(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("only Say"))
    }

    type ChatStream = Replies;

    async fn chat(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("only Say"))
    }
}

/// A pod's process: a thread in the pod's namespace with its own runtime.
struct Server {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    /// Returns once the server listens.
    fn start(ns: &Namespaces, pod: usize) -> Server {
        let path = format!("/var/run/netns/{}", ns.name(netns_of(pod)));
        let name = PODS[pod].0.to_string();
        let zone = usize::from(name.as_bytes()[0] - b'a');
        let backend = Backend { name, zone };
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("namespace exists");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.set_reuseaddr(true).unwrap();
                sock.bind("0.0.0.0:50051".parse().unwrap()).unwrap();
                let listener = sock.listen(1024).unwrap();
                bound_tx.send(()).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let serve = tonic::transport::Server::builder()
                    .add_service(EchoServer::new(backend))
                    .serve_with_incoming(incoming);
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // The runtime goes with every connection on it: the process is gone.
            drop(rt);
        });
        bound
            .recv_timeout(Duration::from_secs(10))
            .expect("the pod's server listens");
        Server { stop, thread }
    }

    /// A crash: the listener and every connection close; returns once they have.
    fn kill(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }
}

/// The client pod's sidecar (uid 1337, transparent mode) with its stderr kept in a file,
/// to read the locality log lines.
struct Sidecar {
    child: Child,
    log: PathBuf,
    _bin_dir: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    fn start(ns: &Namespaces) -> Sidecar {
        let (bin_dir, bin, dir) = ferry_for_proxy_user();
        let annotations = dir.path().join("annotations");
        std::fs::write(&annotations, "ferry.dev/inject=\"enabled\"\n").unwrap();
        let log = dir.path().join("sidecar.log");
        let prefix = as_proxy_user(ns.name(CLIENT));
        let a = annotations.display().to_string();
        let mut child = Command::new(prefix[0])
            .args(&prefix[1..])
            .arg(&bin)
            .args(["proxy", "--annotations", &a])
            .env("FERRY_CONTROLLER", format!("http://{CONTROLLER}"))
            .env("FERRY_NODE_NAME", "node-a")
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("ferry starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l == "ferry: ready");
        assert!(
            ready,
            "the sidecar exited before it was ready:\n{}",
            tail(&log)
        );
        std::thread::spawn(move || for _ in lines {});
        Sidecar {
            child,
            log,
            _bin_dir: bin_dir,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many lines the log has, for [`Sidecar::lines_with`].
    fn mark(&self) -> usize {
        self.log().lines().count()
    }

    /// The log lines after the first `since` holding every one of `words`.
    fn lines_with(&self, since: usize, words: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .skip(since)
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .map(str::to_string)
            .collect()
    }
}

fn tail(log: &PathBuf) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- the sidecar's log (last 60 lines) -----\n{}",
                tail(&self.log)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a batch of calls got: each answer's pod in order, and the failures.
#[derive(Debug, Default)]
struct Calls {
    answers: Vec<String>,
    failed: Vec<String>,
}

impl Calls {
    fn zone(&self, z: &str) -> usize {
        self.answers.iter().filter(|s| zone_of(s) == z).count()
    }

    fn by_pod(&self) -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for s in &self.answers {
            *m.entry(s.as_str()).or_insert(0) += 1;
        }
        m
    }

    fn by_zone(&self) -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for s in &self.answers {
            *m.entry(zone_of(s)).or_insert(0) += 1;
        }
        m
    }
}

/// `n` calls one after another, each bounded to 5 s.
async fn call_n(ch: &Channel, n: usize) -> Calls {
    let mut client = EchoClient::new(ch.clone());
    let mut calls = Calls::default();
    for i in 0..n {
        let req = EchoRequest {
            message: format!("call {i}"),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(5), client.say(req)).await {
            Ok(Ok(r)) => calls.answers.push(r.into_inner().server),
            Ok(Err(s)) => {
                let ferry = s.metadata().get("x-ferry-error");
                let ferry = ferry.and_then(|v| v.to_str().ok()).unwrap_or("-");
                let (code, msg) = (s.code(), s.message());
                calls
                    .failed
                    .push(format!("call {i}: {code:?} {msg:?}, x-ferry-error {ferry}"));
            }
            Err(_) => calls.failed.push(format!("call {i}: no answer within 5 s")),
        }
    }
    calls
}

/// The service's entry in `/endpoints`' answer.
fn service<'a>(endpoints: &'a Json, name: &str) -> &'a Json {
    &endpoints["services"][name]
}

/// `(healthy, total, share)` of tier `name`, if listed.
fn tier(svc: &Json, name: &str) -> Option<(u64, u64, f64)> {
    let t = svc["locality"]["tiers"]
        .as_array()?
        .iter()
        .find(|t| t["tier"] == name)?;
    Some((
        t["healthy"].as_u64()?,
        t["total"].as_u64()?,
        t["share"].as_f64()?,
    ))
}

fn tier_names(svc: &Json) -> Vec<String> {
    svc["locality"]["tiers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["tier"].as_str().map(str::to_string))
        .collect()
}

/// The endpoint entry for `pod`, if listed.
fn endpoint(svc: &Json, pod: usize) -> Option<&Json> {
    let addr = format!("{}:50051", pod_ip(pod));
    svc["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr.as_str())
}

/// The value of the sample `name{labels..}` in Prometheus text, whatever the label order.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{')?;
        if n != name {
            return None;
        }
        let body = rest.strip_suffix('}')?;
        let have: Vec<&str> = body.split(',').collect();
        labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"").as_str()))
            .then(|| value.parse().ok())?
    })
}

fn tier_picks(metrics: &str, svc: &str, t: &str) -> f64 {
    metric(
        metrics,
        "ferry_locality_requests_total",
        &[("service", svc), ("tier", t)],
    )
    .unwrap_or(0.0)
}

fn ready_endpoints(slices: &[EndpointSlice]) -> usize {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .count()
}

/// Notes an expectation that did not hold and goes on, as the steps after it still say
/// something; the test fails at its end with every note.
macro_rules! check {
    ($problems:ident, $cond:expr, $($msg:tt)+) => {
        let held: bool = $cond;
        if !held {
            let note = format!($($msg)+);
            eprintln!("   NOT AS EXPECTED: {note}");
            $problems.push(note);
        }
    };
}

struct Mesh {
    ns: Namespaces,
    cluster: Cluster,
    servers: Vec<Option<Server>>,
}

impl Mesh {
    fn node(&self) -> &str {
        self.ns.name(NODE)
    }

    /// Starts the pod's server, then its Pod object, made ready.
    fn add_pod(&mut self, pod: usize) {
        self.start_server(pod);
        self.cluster.kube(move |c| async move {
            let (name, node) = PODS[pod];
            create_pod(&c, NS, name, &[("app", "echo")], node, &[("grpc", 50051)]).await;
            set_pod_ready(&c, NS, name, &pod_ip(pod), true).await;
        })
    }

    fn start_server(&mut self, pod: usize) {
        assert!(self.servers[pod].is_none(), "{} runs already", PODS[pod].0);
        self.servers[pod] = Some(Server::start(&self.ns, pod));
    }

    fn kill_server(&mut self, pod: usize) {
        self.servers[pod].take().expect("a running server").kill();
    }

    /// The kubelet's readiness report for `pods`.
    fn set_ready(&self, pods: &[usize], ready: bool) {
        let pods = pods.to_vec();
        self.cluster.kube(move |c| async move {
            for pod in pods {
                set_pod_ready(&c, NS, PODS[pod].0, &pod_ip(pod), ready).await;
            }
        })
    }

    fn controller(&self) -> Controller {
        let prefix = ["ip", "netns", "exec", self.node()];
        let c = Controller::start(
            self.cluster.kubeconfig_path(),
            &["--addr", "0.0.0.0:8086", "--admin-addr", "127.0.0.1:9990"],
            &prefix,
        );
        c.wait_ready_in(&self.cluster, Duration::from_secs(30));
        c
    }

    /// `f` with a channel from the client pod's app to `ip:50051` (through its sidecar).
    fn in_client<T, F, Fut>(&self, ip: &str, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Channel) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let url = format!("http://{ip}:50051");
        self.ns.run(CLIENT, move || async move {
            let ch = Channel::from_shared(url).unwrap().connect().await.unwrap();
            f(ch).await
        })
    }

    fn calls(&self, ip: &str, n: usize) -> Calls {
        self.in_client(ip, move |ch| async move { call_n(&ch, n).await })
    }

    /// One request to the sidecar's admin API, from inside the client pod.
    fn admin(&self, method: &'static str, path: &'static str, body: &str) -> (u16, String) {
        let body = body.to_string();
        self.ns.run(CLIENT, move || async move {
            raw(ADMIN.parse().unwrap(), method, path, &body).await
        })
    }

    fn endpoints(&self) -> Json {
        let (status, text) = self.admin("GET", "/endpoints", "");
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The service's tiers and reason, in one line, for the record.
    fn plan(&self, name: &str) -> String {
        let all = self.endpoints();
        let l = &service(&all, name)["locality"];
        let tiers: Vec<String> = l["tiers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let share = t["share"].as_f64().unwrap_or(f64::NAN);
                format!("{} {}/{} {share:.2}", t["tier"], t["healthy"], t["total"])
            })
            .collect();
        format!("[{}] {}", tiers.join(", "), l["reason"])
    }

    /// Calls (20 at a time) until the zone tier has all of the traffic; how long that took,
    /// if it happened within `within`.
    fn settle_in_zone(&self, ip: &str, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < within {
            self.calls(ip, 20);
            let all = self.endpoints();
            if tier(service(&all, ECHO), "zone").is_some_and(|t| t.2 > 0.999) {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn metrics(&self) -> String {
        self.admin("GET", "/metrics", "").1
    }

    /// Polls `/endpoints` until `pred` holds for service `name`; that entry and how long
    /// it took. Panics with the last one seen after `within`.
    fn wait_for(
        &self,
        name: &str,
        what: &str,
        within: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> (Json, Duration) {
        let t = Instant::now();
        loop {
            let all = self.endpoints();
            let svc = service(&all, name).clone();
            if pred(&svc) {
                return (svc, t.elapsed());
            }
            assert!(
                t.elapsed() < within,
                "{name}: not {what} within {within:?}; last seen:\n{}",
                serde_json::to_string_pretty(&svc).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn calls_stay_in_the_callers_zone_fail_over_by_zone_then_region_and_come_back() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    let t0 = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    let at = |what: &str| eprintln!("[{:5.1} s] {what}", t0.elapsed().as_secs_f64());
    let ns = Namespaces::new("ferry-kl", 2 + PODS.len());
    // The node routes between the client pod (10.252.100.2) and the pods (10.252.<ns>.2).
    let spokes: Vec<(usize, usize)> = std::iter::once((CLIENT, 100))
        .chain((0..PODS.len()).map(|pod| (netns_of(pod), netns_of(pod))))
        .collect();
    ns.star(NODE, "10.252", &spokes);

    let cluster = Cluster::start(Some(ns.name(NODE)));
    let mut mesh = Mesh {
        ns,
        cluster,
        servers: (0..PODS.len()).map(|_| None).collect(),
    };
    let echo_port = ServicePortSpec {
        name: Some("grpc".into()),
        port: 50051,
        target_port: "grpc".into(),
        app_protocol: Some("kubernetes.io/h2c".into()),
    };
    let port = echo_port.clone();
    let cluster_ip = mesh.cluster.kube(|c| async move {
        create_namespace(&c, NS).await;
        create_node(&c, "node-a", Some("a"), Some("r1")).await;
        create_node(&c, "node-b", Some("b"), Some("r1")).await;
        create_node(&c, "node-c", Some("c"), Some("r2")).await;
        let svc = create_service(&c, NS, "echo", &[("app", "echo")], &[port]).await;
        svc.spec.and_then(|s| s.cluster_ip).unwrap()
    });
    for pod in FIRST_SIX {
        mesh.add_pod(pod);
    }
    at("six pods created and ready");
    mesh.cluster.kube(|c| async move {
        let six = |s: &[EndpointSlice]| ready_endpoints(s) == 6;
        wait_for_slices(&c, NS, "echo", six, Duration::from_secs(30)).await;
    });

    // kube-proxy's part: the ClusterIP to one random pod per connection. With discovery
    // working the sidecar dials pods itself; without it, calls would spread flat.
    let node = mesh.node().to_string();
    let ipt = |args: &str| {
        let mut v = vec!["ip", "netns", "exec", &node, "iptables", "-t", "nat"];
        v.extend(args.split(' '));
        must(&v);
    };
    ipt("-N KUBE-SVC-ECHO");
    ipt(&format!(
        "-A PREROUTING -d {cluster_ip}/32 -p tcp --dport 50051 -j KUBE-SVC-ECHO"
    ));
    for (i, pod) in FIRST_SIX.into_iter().enumerate() {
        let left = FIRST_SIX.len() - i;
        let pick = if left > 1 {
            format!(
                "-m statistic --mode random --probability {:.5} ",
                1.0 / left as f64
            )
        } else {
            String::new()
        };
        ipt(&format!(
            "-A KUBE-SVC-ECHO -p tcp {pick}-j DNAT --to-destination {}:50051",
            pod_ip(pod)
        ));
    }

    must(&[
        "ip",
        "netns",
        "exec",
        mesh.ns.name(CLIENT),
        env!("CARGO_BIN_EXE_ferry"),
        "init",
    ]);
    let _controller = mesh.controller();
    let sidecar = Sidecar::start(&mesh.ns);
    at("controller and sidecar started");

    // 1. All healthy: calls stay in zone a; /endpoints shows why.
    let first = mesh.calls(&cluster_ip, 1);
    assert!(first.failed.is_empty(), "{first:?}");
    at("first call answered");
    // Some traffic first: a cold start's first latency samples may spill a little.
    assert!(mesh.calls(&cluster_ip, 20).failed.is_empty());
    let (echo, _) = mesh.wait_for(
        ECHO,
        "six endpoints in three tiers",
        Duration::from_secs(15),
        |s| {
            s["endpoints"].as_array().is_some_and(|e| e.len() == 6)
                && tier_names(s) == ["zone", "region", "other"]
        },
    );
    let show = serde_json::to_string_pretty(&echo).unwrap();
    assert_eq!(echo["source"], "discovery", "{show}");
    assert_eq!(echo["locality"]["mode"], "prefer-zone", "{show}");
    assert_eq!(echo["locality"]["caller"]["zone"], "a", "{show}");
    assert_eq!(echo["locality"]["caller"]["region"], "r1", "{show}");
    for t in ["zone", "region", "other"] {
        let (healthy, total, _) = tier(&echo, t).unwrap();
        assert_eq!((healthy, total), (2, 2), "tier {t}: {show}");
    }
    check!(
        problems,
        tier(&echo, "zone").unwrap().2 > 0.999,
        "1. idle and healthy, zone a's share is not 1: {}",
        echo["locality"]
    );
    for (pod, (t, zone, region)) in FIRST_SIX.into_iter().zip([
        ("zone", "a", "r1"),
        ("zone", "a", "r1"),
        ("region", "b", "r1"),
        ("region", "b", "r1"),
        ("other", "c", "r2"),
        ("other", "c", "r2"),
    ]) {
        let e = endpoint(&echo, pod).unwrap_or_else(|| panic!("no {}: {show}", PODS[pod].0));
        assert_eq!(
            (&e["tier"], &e["zone"], &e["region"]),
            (&json!(t), &json!(zone), &json!(region)),
            "{}: {show}",
            PODS[pod].0
        );
    }
    at("1. all healthy");
    let before = mesh.metrics();
    let calls = mesh.calls(&cluster_ip, 300);
    let after = mesh.metrics();
    eprintln!(
        "1. all healthy: {:?} by zone, {:?} by pod\n   plan: {}",
        calls.by_zone(),
        calls.by_pod(),
        mesh.plan(ECHO)
    );
    assert!(calls.failed.is_empty(), "{:?}", calls.failed);
    check!(
        problems,
        calls.zone("a") >= 285,
        "1. zone a answered {} of 300 calls: {:?}",
        calls.zone("a"),
        calls.by_pod()
    );
    let zone_picks = tier_picks(&after, ECHO, "zone") - tier_picks(&before, ECHO, "zone");
    check!(
        problems,
        zone_picks >= 285.0,
        "1. zone-tier picks {zone_picks} of 300"
    );
    let share = metric(
        &after,
        "ferry_locality_share",
        &[("service", ECHO), ("tier", "zone")],
    );
    assert!(share.is_some(), "no ferry_locality_share: {after}");
    check!(
        problems,
        share.is_some_and(|s| s > 0.999),
        "1. ferry_locality_share of zone a {share:?}"
    );

    // The same with locality off (admin layer) and round-robin: a third each.
    let (status, text) = mesh.admin(
        "PUT",
        "/policy",
        "services: {echo.ferry-demo: {locality: off, lb: round-robin}}",
    );
    assert_eq!(status, 200, "{text}");
    // A discovered service is rebuilt for a new policy on the next new connection.
    assert!(mesh.calls(&cluster_ip, 1).failed.is_empty());
    mesh.wait_for(ECHO, "locality off", Duration::from_secs(5), |s| {
        s["locality"]["mode"] == "off" && tier_names(s) == ["any"] && s["lb"] == "round-robin"
    });
    let flat = mesh.calls(&cluster_ip, 300);
    eprintln!("   locality off: {:?} by zone", flat.by_zone());
    assert!(flat.failed.is_empty(), "{:?}", flat.failed);
    for z in ["a", "b", "c"] {
        check!(
            problems,
            (60..=140).contains(&flat.zone(z)),
            "locality off, zone {z}: {:?}",
            flat.by_zone()
        );
    }
    let (status, text) = mesh.admin("PUT", "/policy", "{}");
    assert_eq!(status, 200, "{text}");
    assert!(mesh.calls(&cluster_ip, 1).failed.is_empty());
    mesh.wait_for(ECHO, "prefer-zone again", Duration::from_secs(5), |s| {
        s["locality"]["mode"] == "prefer-zone"
    });

    // Before the crash, traffic is all in zone a (a spill for overload decays first).
    let settled = mesh.settle_in_zone(&cluster_ip, Duration::from_secs(40));
    eprintln!(
        "   all traffic in zone a after {settled:?}; plan: {}",
        mesh.plan(ECHO)
    );
    check!(
        problems,
        settled.is_some(),
        "1. traffic never all in zone a again (idle, healthy)"
    );

    // 2. Zone a's servers crash; their pods still look Ready in the API. No call fails,
    // none leaves the region: zone b answers.
    at("2. zone a's servers crash");
    let mark = sidecar.mark();
    for pod in ZONE_A {
        mesh.kill_server(pod);
    }
    let t = Instant::now();
    let calls = mesh.calls(&cluster_ip, 300);
    eprintln!(
        "2. zone a down, pods still ready: {:?} by pod, {} failed, {:?}\n   plan: {}",
        calls.by_pod(),
        calls.failed.len(),
        t.elapsed(),
        mesh.plan(ECHO)
    );
    check!(
        problems,
        calls.failed.is_empty(),
        "2. {} of 300 calls failed as zone a's servers crashed: {:?}",
        calls.failed.len(),
        calls.failed
    );
    check!(
        problems,
        calls.answers.len() == calls.zone("b"),
        "2. zone a down: not all answers from zone b: {:?}",
        calls.by_pod()
    );
    let (echo, _) = mesh.wait_for(ECHO, "zone a ejected", Duration::from_secs(5), |s| {
        tier(s, "zone").is_some_and(|(h, _, _)| h == 0)
    });
    let show = serde_json::to_string_pretty(&echo).unwrap();
    check!(
        problems,
        tier(&echo, "region").unwrap().2 > 0.99,
        "2. zone a ejected, region's share: {show}"
    );
    for pod in ZONE_A {
        assert_eq!(endpoint(&echo, pod).unwrap()["health"], "ejected", "{show}");
    }
    // Settled: 3 s more of calls (the kubelet has still not noticed) all go to zone b,
    // however the dead endpoints are tried again.
    let before = mesh.metrics();
    let calls = mesh.in_client(&cluster_ip, |ch| async move {
        let mut all = Calls::default();
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && all.answers.len() < 3000 {
            let c = call_n(&ch, 10).await;
            all.answers.extend(c.answers);
            all.failed.extend(c.failed);
        }
        all
    });
    let after = mesh.metrics();
    let zone_picks = tier_picks(&after, ECHO, "zone") - tier_picks(&before, ECHO, "zone");
    eprintln!(
        "   the next 3 s: {:?} by pod, {} failed, {zone_picks} picks in zone a",
        calls.by_pod(),
        calls.failed.len()
    );
    check!(
        problems,
        calls.failed.is_empty() && calls.answers.len() == calls.zone("b"),
        "2. settled on zone b: {:?}, failed {:?}",
        calls.by_pod(),
        calls.failed
    );
    let failover = sidecar.lines_with(mark, &["locality failover", ECHO]);
    check!(problems, !failover.is_empty(), "2. no failover line logged");
    if let Some(l) = failover.first() {
        eprintln!("   logged: {l}");
    }

    // The kubelet notices: zone a's pods turn not ready. Calls stay in zone b.
    mesh.set_ready(&ZONE_A, false);
    let (_, lag) = mesh.wait_for(
        ECHO,
        "without zone a's endpoints",
        Duration::from_secs(10),
        |s| ZONE_A.iter().all(|p| endpoint(s, *p).is_none()),
    );
    eprintln!("   zone a not ready reached the sidecar within {lag:?}");
    let calls = mesh.calls(&cluster_ip, 100);
    eprintln!(
        "   zone a not ready: {:?} by pod\n   plan: {}",
        calls.by_pod(),
        mesh.plan(ECHO)
    );
    check!(
        problems,
        calls.failed.is_empty() && calls.zone("b") == 100,
        "2. zone a not ready: {:?}, failed {:?}",
        calls.by_pod(),
        calls.failed
    );

    // 3. Zone b's servers crash too: region r1 has nothing left; zone c answers all.
    at("3. zone b's servers crash");
    for pod in ZONE_B {
        mesh.kill_server(pod);
    }
    let calls = mesh.calls(&cluster_ip, 300);
    eprintln!(
        "3. zones a and b down: {:?} by pod, {} failed\n   plan: {}",
        calls.by_pod(),
        calls.failed.len(),
        mesh.plan(ECHO)
    );
    check!(
        problems,
        calls.failed.is_empty(),
        "3. {} of 300 calls failed as zone b's servers crashed: {:?}",
        calls.failed.len(),
        calls.failed
    );
    check!(
        problems,
        calls.answers.len() == calls.zone("c"),
        "3. zones a and b down: not all answers from zone c: {:?}",
        calls.by_pod()
    );
    let (echo, _) = mesh.wait_for(ECHO, "zone b ejected", Duration::from_secs(5), |s| {
        tier(s, "region").is_some_and(|(h, _, _)| h == 0)
    });
    let show = serde_json::to_string_pretty(&echo).unwrap();
    check!(
        problems,
        tier(&echo, "other").unwrap().2 > 0.99,
        "3. zone b ejected, other's share: {show}"
    );

    // 4. Zone a comes back (process up, then ready): calls return to it.
    at("4. zone a comes back");
    let mark = sidecar.mark();
    for pod in ZONE_A {
        mesh.start_server(pod);
    }
    mesh.set_ready(&ZONE_A, true);
    let t = Instant::now();
    let back = mesh.in_client(&cluster_ip, |ch| async move {
        let end = Instant::now() + Duration::from_secs(15);
        let mut failed = Vec::new();
        loop {
            let calls = call_n(&ch, 10).await;
            failed.extend(calls.failed.iter().cloned());
            if calls.zone("a") == 10 || Instant::now() > end {
                return (calls.zone("a") == 10, failed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let lag = t.elapsed();
    eprintln!("4. zone a back: its pods answer all calls {lag:?} after turning ready");
    assert!(back.0, "calls never returned to zone a");
    check!(
        problems,
        back.1.is_empty(),
        "4. calls failed as zone a came back: {:?}",
        back.1
    );
    check!(
        problems,
        lag < Duration::from_secs(5),
        "4. calls back in zone a only {lag:?} after it turned ready"
    );
    let calls = mesh.calls(&cluster_ip, 200);
    check!(
        problems,
        calls.failed.is_empty() && calls.zone("a") >= 190,
        "4. zone a back: {:?}, failed {:?}",
        calls.by_pod(),
        calls.failed
    );
    let returned = sidecar.lines_with(mark, &["locality return", ECHO]);
    check!(problems, !returned.is_empty(), "4. no return line logged");
    if let Some(l) = returned.last() {
        eprintln!("   logged: {l}");
    }

    // Zone b's servers come back (their pods stayed ready); probes find them.
    for pod in ZONE_B {
        mesh.start_server(pod);
    }
    let (_, lag) = mesh.wait_for(ECHO, "zone b healthy again", Duration::from_secs(10), |s| {
        tier(s, "region").is_some_and(|t| t.0 == 2) && tier(s, "zone").is_some_and(|t| t.0 == 2)
    });
    eprintln!("   zone b healthy again within {lag:?} of its servers starting");

    // 5. Zone a turns slow (200 ms a call): under load, traffic spills to zone b.
    let settled = mesh.settle_in_zone(&cluster_ip, Duration::from_secs(40));
    eprintln!(
        "   all traffic in zone a after {settled:?}; plan: {}",
        mesh.plan(ECHO)
    );
    check!(
        problems,
        settled.is_some(),
        "4. traffic never all in zone a again after zone b's return"
    );
    at("5. zone a turns slow");
    let mark = sidecar.mark();
    DELAY_MS[0].store(200, Ordering::Relaxed);
    let t = Instant::now();
    let load = mesh.in_client(&cluster_ip, |ch| async move {
        let answers = Arc::new(std::sync::Mutex::new(Calls::default()));
        let end = Instant::now() + Duration::from_secs(20);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (ch, answers) = (ch.clone(), answers.clone());
            workers.spawn(async move {
                while Instant::now() < end {
                    let c = call_n(&ch, 1).await;
                    let mut all = answers.lock().unwrap();
                    all.answers.extend(c.answers);
                    all.failed.extend(c.failed);
                    if all.answers.len() + all.failed.len() >= 600 {
                        return;
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
        std::mem::take(&mut *answers.lock().unwrap())
    });
    let took = t.elapsed();
    let n = load.answers.len();
    let window = &load.answers[n.saturating_sub(200)..];
    let late_a = window.iter().filter(|s| zone_of(s) == "a").count();
    eprintln!(
        "5. zone a slow: {n} calls in {took:?}, {:?} by zone; the last {} calls: {late_a} in zone a\n   plan: {}",
        load.by_zone(),
        window.len(),
        mesh.plan(ECHO)
    );
    check!(
        problems,
        load.failed.is_empty(),
        "5. calls failed: {:?}",
        load.failed
    );
    assert!(n >= 200, "too few calls to judge: {n}");
    check!(
        problems,
        late_a * 2 <= window.len(),
        "5. only {} of the last {} calls left slow zone a",
        window.len() - late_a,
        window.len()
    );
    check!(
        problems,
        load.zone("c") == 0,
        "5. zone c answered while zone b was fine: {:?}",
        load.by_zone()
    );
    let spill = sidecar.lines_with(mark, &["locality spill", ECHO]);
    check!(problems, !spill.is_empty(), "5. no spill line logged");
    if let Some(l) = spill.first() {
        eprintln!("   logged: {l}");
    }

    // Zone a fast again: calls come back to it, as its latency estimate recovers (with
    // all traffic gone, by time alone: a 10 s decay).
    DELAY_MS[0].store(0, Ordering::Relaxed);
    let t = Instant::now();
    let back = mesh.in_client(&cluster_ip, |ch| async move {
        let end = Instant::now() + Duration::from_secs(45);
        loop {
            let calls = call_n(&ch, 20).await;
            if calls.zone("a") >= 18 || Instant::now() > end {
                return calls.zone("a") >= 18;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let lag = t.elapsed();
    eprintln!("   zone a fast again: calls back in zone a after {lag:?}");
    check!(
        problems,
        back,
        "5. calls not back in zone a {lag:?} after it was fast again"
    );

    // 6. A Service with trafficDistribution PreferSameNode: a node tier above the zone;
    // calls stay on node-a's pods, not on node-a2's (zone a too).
    at("6. PreferSameNode");
    mesh.cluster.kube(|c| async move {
        create_node(&c, "node-a2", Some("a"), Some("r1")).await;
    });
    mesh.add_pod(EXTRA);
    let near_ip = mesh.cluster.kube(move |c| async move {
        create_service(&c, NS, "echo-near", &[("app", "echo")], &[echo_port]).await;
        let api: Api<Service> = Api::namespaced(c.clone(), NS);
        let patch = json!({"spec": {"trafficDistribution": "PreferSameNode"}});
        let svc = api
            .patch("echo-near", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("the API server takes trafficDistribution: PreferSameNode");
        let seven = |s: &[EndpointSlice]| ready_endpoints(s) == 7;
        wait_for_slices(&c, NS, "echo-near", seven, Duration::from_secs(30)).await;
        svc.spec.and_then(|s| s.cluster_ip).unwrap()
    });
    let first = mesh.calls(&near_ip, 1);
    assert!(first.failed.is_empty(), "{first:?}");
    let (near, _) = mesh.wait_for(
        NEAR,
        "prefer-node with seven endpoints",
        Duration::from_secs(15),
        |s| {
            s["locality"]["mode"] == "prefer-node"
                && s["endpoints"].as_array().is_some_and(|e| e.len() == 7)
        },
    );
    let show = serde_json::to_string_pretty(&near).unwrap();
    assert_eq!(near["locality"]["caller"]["node"], "node-a", "{show}");
    assert_eq!(
        tier_names(&near),
        ["node", "zone", "region", "other"],
        "{show}"
    );
    for (t, n) in [("node", 2), ("zone", 1), ("region", 2), ("other", 2)] {
        assert_eq!(tier(&near, t).map(|t| t.1), Some(n), "tier {t}: {show}");
    }
    assert_eq!(endpoint(&near, EXTRA).unwrap()["tier"], "zone", "{show}");
    let calls = mesh.calls(&near_ip, 200);
    let on_node_a = calls.answers.iter().filter(|s| s.starts_with("a-")).count();
    eprintln!(
        "6. PreferSameNode: {:?} by pod ({on_node_a} on node-a)\n   plan: {}",
        calls.by_pod(),
        mesh.plan(NEAR)
    );
    check!(
        problems,
        calls.failed.is_empty() && on_node_a >= 190 && calls.zone("c") == 0,
        "6. PreferSameNode: {:?}, failed {:?}",
        calls.by_pod(),
        calls.failed
    );

    eprintln!(
        "locality lines logged:\n{}",
        sidecar.lines_with(0, &["locality"]).join("\n")
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(sidecar);
    for pod in 0..PODS.len() {
        if mesh.servers[pod].is_some() {
            mesh.kill_server(pod);
        }
    }
}
