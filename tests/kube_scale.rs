//! Scale benchmark, run by hand (not timed, asserts only sanity):
//!
//! `cargo test --release -p ferry --test kube_scale -- --ignored --nocapture`
//!
//! A real kube-apiserver, etcd and kube-controller-manager on the host loopback, and the
//! real ferry-controller. 2,000 selectorless Services with one hand-written EndpointSlice
//! each (10,000 endpoints, never contacted), then 100 gRPC subscribers and 200 endpoint
//! changes at a steady pace. Prints the controller's memory and CPU, the update lag seen by
//! subscribers, and a sidecar's memory before and after the 2,000 Services appear, as a
//! markdown table for the README.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_discovery_api::{DiscoveryClient, ResolveRequest};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::Ferry;
use support::controller::Controller;
use support::kube::{Cluster, KubeBins, ServicePortSpec, TargetPort, create_service};
use tokio::sync::mpsc;
use tonic::transport::Channel;

const NAMESPACES: usize = 20;
const SERVICES: usize = 2_000;
const ENDPOINTS_PER_SLICE: usize = 5;
/// API calls in flight while creating: enough to keep the API server busy on 2 cores.
const CREATE_CONCURRENCY: usize = 24;
const SUBSCRIBERS: usize = 100;
const CHANNELS: usize = 10;
const UPDATES: usize = 200;
const UPDATES_PER_SEC: u64 = 20;

fn ns_name(svc: usize) -> String {
    format!("scale-{:02}", svc % NAMESPACES)
}

fn svc_name(svc: usize) -> String {
    format!("svc-{svc:04}")
}

/// The slice's endpoints, the first `not_ready` of them not ready. Addresses are unique
/// per Service in 10.200.0.0/16 and never contacted.
fn endpoints(svc: usize, not_ready: usize) -> Vec<Endpoint> {
    (0..ENDPOINTS_PER_SLICE)
        .map(|j| {
            let n = svc * ENDPOINTS_PER_SLICE + j;
            Endpoint {
                addresses: vec![format!("10.200.{}.{}", n / 256, n % 256)],
                conditions: Some(EndpointConditions {
                    ready: Some(j >= not_ready),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect()
}

/// A selectorless Service and its one EndpointSlice; returns the ClusterIP.
async fn create_one(c: &Client, svc: usize) -> String {
    let (ns, name) = (ns_name(svc), svc_name(svc));
    let port = ServicePortSpec {
        name: Some("http".into()),
        port: 80,
        target_port: TargetPort::Number(8080),
        app_protocol: None,
    };
    // No selector: the EndpointSlice controller leaves the slice to us.
    let created = create_service(c, &ns, &name, &[], &[port]).await;
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-1")),
            labels: Some([("kubernetes.io/service-name".to_string(), name.clone())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints(svc, 0)),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    Api::<EndpointSlice>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &slice)
        .await
        .unwrap_or_else(|e| panic!("create endpointslice {ns}/{name}-1: {e}"));
    created
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap_or_else(|| panic!("{ns}/{name} has no ClusterIP"))
}

/// Memory and CPU of a process, from /proc.
#[derive(Clone, Copy, Debug)]
struct Usage {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_s: f64,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e} (did it exit?)"));
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces); utime and stime are the
    // 14th and 15th fields, the 12th and 13th after it.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    Usage {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu_s: ticks as f64 / clock_ticks(),
    }
}

fn clock_ticks() -> f64 {
    sh("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Sum of the samples of `series` (`name` or `name{labels}`) in a metrics page.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| *k == series || k.starts_with(&format!("{series}{{")))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        // Not `sum()`: an empty f64 sum is -0.
        .fold(0.0, |a, b| a + b)
}

async fn controller_metrics(admin: SocketAddr) -> String {
    let (status, body) = support::raw(admin, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "controller /metrics: {body}");
    body
}

/// The indexed Services and EndpointSlices.
async fn indexed(admin: SocketAddr) -> (f64, f64) {
    let m = controller_metrics(admin).await;
    (
        metric(&m, "ferry_controller_objects{kind=\"service\"}"),
        metric(&m, "ferry_controller_objects{kind=\"endpointslice\"}"),
    )
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p).div_ceil(100).max(1) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// What a subscriber reports.
enum Seen {
    /// The first answer with every endpoint ready.
    Initial,
    /// `level` endpoints not ready, first seen at that instant.
    Level(usize, usize, Instant),
    Failed(usize, String),
}

/// Follows one destination and reports each new number of not-ready endpoints (updates
/// only ever raise it, so a level is seen once, even if answers are coalesced).
async fn subscriber(
    mut client: DiscoveryClient<Channel>,
    i: usize,
    dest: String,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let req = ResolveRequest {
        destination: dest.clone(),
        node: String::new(),
    };
    let mut stream = match client.resolve(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            let _ = tx.send(Seen::Failed(i, format!("{dest}: {e}")));
            return;
        }
    };
    let (mut initial, mut level) = (false, 0);
    loop {
        match stream.message().await {
            Ok(Some(r)) => {
                let now = Instant::now();
                let not_ready = r.endpoints.iter().filter(|e| !e.ready).count();
                if !initial {
                    if !(r.found && r.endpoints.len() == ENDPOINTS_PER_SLICE && not_ready == 0) {
                        continue;
                    }
                    initial = true;
                    let _ = tx.send(Seen::Initial);
                }
                if r.endpoints.len() != ENDPOINTS_PER_SLICE {
                    let _ = tx.send(Seen::Failed(i, format!("{dest}: {r:?}")));
                }
                for l in level + 1..=not_ready {
                    let _ = tx.send(Seen::Level(i, l, now));
                }
                level = level.max(not_ready);
            }
            Ok(None) => {
                let _ = tx.send(Seen::Failed(i, format!("{dest}: the stream ended")));
                return;
            }
            Err(e) => {
                let _ = tx.send(Seen::Failed(i, format!("{dest}: {e}")));
                return;
            }
        }
    }
}

#[derive(Default)]
struct Inbox {
    initials: usize,
    /// (subscriber, level) → when first seen.
    levels: HashMap<(usize, usize), Instant>,
    failures: Vec<String>,
}

impl Inbox {
    fn take(&mut self, s: Seen) {
        match s {
            Seen::Initial => self.initials += 1,
            Seen::Level(i, l, at) => {
                self.levels.insert((i, l), at);
            }
            Seen::Failed(i, why) => self.failures.push(format!("subscriber {i}: {why}")),
        }
    }
}

struct Figures {
    create: Duration,
    catch_up: Duration,
    ctl_idle: Usage,
    ctl_synced: Usage,
    ctl_updated: Usage,
    first_answers: Duration,
    lags: Vec<Duration>,
    patches: Vec<Duration>,
    updates_sent: u64,
    watch_errors: u64,
}

#[test]
#[ignore = "scale benchmark, by hand: cargo test --release -p ferry --test kube_scale -- --ignored --nocapture"]
fn scale_2000_services_100_subscribers_200_updates() {
    // Built (cargo) before the clock starts: the figure is the run, not the build.
    support::controller::controller_bin();
    let begin = Instant::now();
    let cluster = Cluster::start(None);
    let controller = Controller::start(
        cluster.kubeconfig_path(),
        &["--addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
        &[],
    );
    let ctl_pid = controller.child.id();
    // One explicit listener so it starts; it never calls anything, so it never subscribes.
    let sidecar = Ferry::start(
        "admin: 127.0.0.1:0\nlisteners: [{name: web, bind: \"127.0.0.1:0\", service: web}]\n\
         services: {web: {endpoints: [\"127.0.0.1:9\"]}}\n",
        &["--controller", &format!("http://{}", controller.grpc)],
        &[],
    );
    let sidecar_pid = sidecar.child.id();
    let (grpc, admin) = (controller.grpc, controller.admin);
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (figs, sidecar_before, sidecar_after) = rt.block_on(async move {
        let c = support::kube::client_for(&kubeconfig).await;
        controller.wait_ready(Duration::from_secs(30)).await;
        let (svc0, slice0) = indexed(admin).await;
        // Let the sidecar settle after start before the first reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sidecar_before = usage(sidecar_pid);
        let ctl_idle = usage(ctl_pid);

        // Namespaces need no ServiceAccount here (no Pods), so no waiting for one.
        let nss: Api<Namespace> = Api::all(c.clone());
        eprintln!("creating {SERVICES} Services and EndpointSlices in {NAMESPACES} namespaces");
        let t = Instant::now();
        for n in 0..NAMESPACES {
            let mut ns = Namespace::default();
            ns.metadata.name = Some(ns_name(n));
            nss.create(&PostParams::default(), &ns).await.unwrap();
        }
        let created = tokio::time::timeout(
            Duration::from_secs(300),
            stream::iter(0..SERVICES)
                .map(|i| {
                    let c = c.clone();
                    async move { (i, create_one(&c, i).await) }
                })
                .buffer_unordered(CREATE_CONCURRENCY)
                .collect::<HashMap<usize, String>>(),
        )
        .await
        .expect("creating took over 300 s");
        let create = t.elapsed();
        eprintln!("created in {:.1} s", create.as_secs_f64());

        // Synced: the controller's index holds every Service and slice.
        let t = Instant::now();
        let want = (svc0 + SERVICES as f64, slice0 + SERVICES as f64);
        let mut last = (0.0, 0.0);
        while last != want {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the controller indexed {last:?} of {want:?} (services, slices) in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = indexed(admin).await;
        }
        let catch_up = t.elapsed();
        let ctl_synced = usage(ctl_pid);
        let sidecar_after = usage(sidecar_pid);
        eprintln!(
            "controller synced {:.2} s after the last create",
            catch_up.as_secs_f64()
        );

        // Subscribers: every 20th Service (all namespaces), half by ClusterIP, half by name.
        let mut channels = Vec::new();
        for _ in 0..CHANNELS {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect to ferry-controller");
            channels.push(DiscoveryClient::new(ch));
        }
        let subs: Vec<usize> = (0..SUBSCRIBERS).map(|i| i * 20 + i % 20).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t = Instant::now();
        let tasks: Vec<_> = subs
            .iter()
            .enumerate()
            .map(|(i, &svc)| {
                let dest = if i % 2 == 0 {
                    format!("{}:80", created[&svc])
                } else {
                    format!("{}.{}:80", svc_name(svc), ns_name(svc))
                };
                tokio::spawn(subscriber(
                    channels[i % CHANNELS].clone(),
                    i,
                    dest,
                    tx.clone(),
                ))
            })
            .collect();
        let mut inbox = Inbox::default();
        let end = Instant::now() + Duration::from_secs(30);
        while inbox.initials < SUBSCRIBERS {
            match tokio::time::timeout_at(end.into(), rx.recv()).await {
                Ok(Some(s)) => inbox.take(s),
                _ => panic!(
                    "{} of {SUBSCRIBERS} subscribers answered in 30 s",
                    inbox.initials
                ),
            }
        }
        let first_answers = t.elapsed();
        assert!(inbox.failures.is_empty(), "{:#?}", inbox.failures);
        eprintln!(
            "{SUBSCRIBERS} subscribers answered in {:.1} ms; {UPDATES} updates at {UPDATES_PER_SEC}/s",
            first_answers.as_secs_f64() * 1e3
        );

        // Updates: each turns one more endpoint of a subscribed Service not ready; the
        // calls are spawned so a slow one does not hold back the pace.
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / UPDATES_PER_SEC));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut calls = Vec::new();
        for k in 0..UPDATES {
            tick.tick().await;
            let (i, level) = (k % SUBSCRIBERS, k / SUBSCRIBERS + 1);
            let svc = subs[i];
            let api: Api<EndpointSlice> = Api::namespaced(c.clone(), &ns_name(svc));
            let body = json!({ "endpoints": endpoints(svc, level) });
            calls.push(tokio::spawn(async move {
                let name = format!("{}-1", svc_name(svc));
                let t = Instant::now();
                let r = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await;
                (i, level, t, t.elapsed(), r.map(|_| ()))
            }));
        }
        let mut sent_at = HashMap::new();
        let mut patches = Vec::new();
        for call in calls {
            let (i, level, t, took, r) = tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .expect("a patch took over 60 s")
                .unwrap();
            r.unwrap_or_else(|e| panic!("patch for subscriber {i}: {e}"));
            sent_at.insert((i, level), t);
            patches.push(took);
        }
        let end = Instant::now() + Duration::from_secs(30);
        while inbox.levels.len() < UPDATES {
            match tokio::time::timeout_at(end.into(), rx.recv()).await {
                Ok(Some(s)) => inbox.take(s),
                _ => break,
            }
        }
        // Anything else already queued (a failure, an extra level).
        while let Ok(s) = rx.try_recv() {
            inbox.take(s);
        }
        assert!(inbox.failures.is_empty(), "{:#?}", inbox.failures);
        let lag_seen = inbox.levels;
        let missing: Vec<_> = sent_at
            .keys()
            .filter(|k| !lag_seen.contains_key(k))
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {UPDATES} updates never reached their subscriber within 30 s: {missing:?}",
            missing.len()
        );
        assert_eq!(lag_seen.len(), UPDATES, "levels seen beyond the updates made");
        let mut lags: Vec<Duration> = sent_at
            .iter()
            .map(|(k, t)| lag_seen[k].saturating_duration_since(*t))
            .collect();
        lags.sort();
        patches.sort();
        let ctl_updated = usage(ctl_pid);
        for t in tasks {
            t.abort();
        }

        let m = controller_metrics(admin).await;
        let figs = Figures {
            create,
            catch_up,
            ctl_idle,
            ctl_synced,
            ctl_updated,
            first_answers,
            lags,
            patches,
            updates_sent: metric(&m, "ferry_controller_updates_total") as u64,
            watch_errors: metric(&m, "ferry_controller_watch_errors_total") as u64,
        };
        drop(controller);
        (figs, sidecar_before, sidecar_after)
    });
    drop(rt);

    let mut sidecar = sidecar;
    assert!(
        sidecar.child.try_wait().unwrap().is_none(),
        "the sidecar exited"
    );
    let growth = sidecar_after.rss_kib as i64 - sidecar_before.rss_kib as i64;
    let elapsed = begin.elapsed();
    drop(cluster);

    print_table(&figs, sidecar_before, sidecar_after, growth, elapsed);
    assert!(
        growth < 4 * 1024,
        "the sidecar's RSS grew by {growth} KiB as Services it never calls appeared"
    );
}

fn print_table(f: &Figures, side0: Usage, side1: Usage, growth: i64, elapsed: Duration) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kube = KubeBins::find()
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let objects = SERVICES * 2 + NAMESPACES;
    let rows: Vec<(String, String)> = vec![
        (
            "objects".into(),
            format!(
                "{n} selectorless Services, {n} EndpointSlices, {} endpoints, \
                 {NAMESPACES} namespaces",
                thousands(SERVICES * ENDPOINTS_PER_SLICE),
                n = thousands(SERVICES),
            ),
        ),
        (
            format!("create them ({CREATE_CONCURRENCY} API calls in flight)"),
            format!(
                "{:.1} s ({:.0} objects/s)",
                f.create.as_secs_f64(),
                objects as f64 / f.create.as_secs_f64()
            ),
        ),
        (
            "controller indexed all, after the last create".into(),
            format!("{} ms", ms(f.catch_up)),
        ),
        (
            "controller RSS (VmRSS / VmHWM): empty cluster".into(),
            format!(
                "{} / {} MiB",
                mib(f.ctl_idle.rss_kib),
                mib(f.ctl_idle.hwm_kib)
            ),
        ),
        (
            format!(
                "controller RSS: synced with {} Services",
                thousands(SERVICES)
            ),
            format!(
                "{} / {} MiB",
                mib(f.ctl_synced.rss_kib),
                mib(f.ctl_synced.hwm_kib)
            ),
        ),
        (
            format!("controller RSS: after {SUBSCRIBERS} subscribers, {UPDATES} updates"),
            format!(
                "{} / {} MiB",
                mib(f.ctl_updated.rss_kib),
                mib(f.ctl_updated.hwm_kib)
            ),
        ),
        (
            "controller CPU (utime+stime): to sync everything".into(),
            format!("{:.2} s", f.ctl_synced.cpu_s - f.ctl_idle.cpu_s),
        ),
        (
            "controller CPU: subscribers and update phase".into(),
            format!(
                "{:.2} s (total since start {:.2} s)",
                f.ctl_updated.cpu_s - f.ctl_synced.cpu_s,
                f.ctl_updated.cpu_s
            ),
        ),
        (
            "subscribers".into(),
            format!(
                "{SUBSCRIBERS} streams on {CHANNELS} connections, half by ClusterIP, half by name"
            ),
        ),
        (
            "first answer on all subscriptions".into(),
            format!("{} ms", ms(f.first_answers)),
        ),
        (
            format!("update lag p50 / p99 / max ({UPDATES} updates at {UPDATES_PER_SEC}/s)"),
            format!(
                "{} / {} / {} ms",
                ms(pct(&f.lags, 50)),
                ms(pct(&f.lags, 99)),
                ms(*f.lags.last().unwrap())
            ),
        ),
        (
            "of which the API patch round trip, p50 / p99".into(),
            format!(
                "{} / {} ms",
                ms(pct(&f.patches, 50)),
                ms(pct(&f.patches, 99))
            ),
        ),
        (
            "controller updates sent / watch errors".into(),
            format!("{} / {}", f.updates_sent, f.watch_errors),
        ),
        (
            format!(
                "sidecar RSS: before / after {} Services appear",
                thousands(SERVICES)
            ),
            format!(
                "{} / {} MiB ({growth:+} KiB)",
                mib(side0.rss_kib),
                mib(side1.rss_kib)
            ),
        ),
    ];
    println!();
    println!(
        "{}, {cores} cores (shared), {cpu}; {kube} on the host loopback; test run {:.0} s",
        sh("date", &["-u", "+%F"]),
        elapsed.as_secs_f64()
    );
    println!();
    println!("| what | value |");
    println!("| --- | ---: |");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    println!();
}
