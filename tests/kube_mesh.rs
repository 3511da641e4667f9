//! The mesh's main promise in a cluster, end to end: a client pod's sidecar balances each
//! gRPC call to a Service's ClusterIP over the Service's pods.
//!
//! Network namespaces made here: a "node" (router; runs etcd, kube-apiserver,
//! kube-controller-manager and ferry-controller on its loopback, and does kube-proxy's
//! job: a random DNAT of the ClusterIP per connection), a client "pod" programmed by
//! `ferry init` with the sidecar as uid 1337, and backend "pods" with real gRPC servers.
//! Pods are real API objects made ready by patching their status (there is no kubelet);
//! the real EndpointSlice controller writes the slices. Needs root; skipped otherwise.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_demo::proto::EchoRequest;
use ferry_demo::proto::echo_client::EchoClient;
use support::controller::Controller;
use support::kube::{
    Cluster, ServicePortSpec, create_namespace, create_node, create_pod, create_service,
    force_delete_pod, mark_pod_terminating, set_pod_ready,
};
use support::netns::{Namespaces, as_proxy_user, ferry_for_proxy_user, is_root, must};
use support::{Ferry, raw, set_child_env};
use tokio::sync::oneshot;
use tonic::transport::Channel;

const NS: &str = "ferry-demo";
const NODE: usize = 0;
const CLIENT: usize = 1;
/// Backend pod slots: namespaces 2.. with address 10.253.<slot>.2.
const SLOTS: usize = 6;
const CONTROLLER: &str = "10.253.100.1:8086";

fn slot_ip(slot: usize) -> String {
    format!("10.253.{slot}.2")
}

/// Answers per backend for `n` calls over one channel; panics on any failed call.
async fn spread(ch: &Channel, n: usize) -> BTreeMap<String, usize> {
    let mut client = EchoClient::new(ch.clone());
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let r = client
            .say(EchoRequest {
                message: format!("call {i}"),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("call {i} failed: {s:?}"));
        *seen.entry(r.into_inner().server).or_insert(0) += 1;
    }
    seen
}

/// Calls until an answer comes from `server`; the time it took.
async fn first_from(ch: &Channel, server: &str, within: Duration) -> Duration {
    let mut client = EchoClient::new(ch.clone());
    let t = Instant::now();
    loop {
        let r = client.say(EchoRequest::default()).await.unwrap();
        if r.into_inner().server == server {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "no answer from {server} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Mesh {
    ns: Namespaces,
    cluster: Cluster,
    cluster_ip: String,
}

impl Mesh {
    fn node(&self) -> &str {
        self.ns.name(NODE)
    }

    fn add_pod(&self, slot: usize) {
        self.cluster.kube(move |c| async move {
            let name = format!("pod-{slot}");
            let node = if slot.is_multiple_of(2) {
                "node-a"
            } else {
                "node-b"
            };
            create_pod(&c, NS, &name, &[("app", "echo")], node, &[("grpc", 50051)]).await;
            set_pod_ready(&c, NS, &name, &slot_ip(slot), true).await;
        })
    }

    fn remove_pod(&self, slot: usize, graceful: bool) {
        self.cluster.kube(move |c| async move {
            let name = format!("pod-{slot}");
            if graceful {
                mark_pod_terminating(&c, NS, &name).await;
            } else {
                force_delete_pod(&c, NS, &name).await;
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

    /// Starts the client pod's sidecar as uid 1337, in transparent mode.
    fn sidecar(&self, controller: bool) -> Ferry {
        let (bin_dir, bin, dir) = ferry_for_proxy_user();
        // The Service's name is a policy key: round-robin for echo.ferry-demo only, and
        // over every pod whatever its zone (kube_locality.rs shows the zone preference).
        let annotations = dir.path().join("annotations");
        std::fs::write(
            &annotations,
            "ferry.dev/policy=\"services: {echo.ferry-demo: {lb: round-robin, locality: off}}\"\n",
        )
        .unwrap();
        if controller {
            set_child_env("FERRY_CONTROLLER", &format!("http://{CONTROLLER}"));
            set_child_env("FERRY_NODE_NAME", "node-a");
            set_child_env("FERRY_DISCOVERY_IDLE", "2s");
        }
        let prefix = as_proxy_user(self.ns.name(CLIENT));
        let a = annotations.display().to_string();
        let f = Ferry::run(dir, &bin, &["proxy", "--annotations", &a], &prefix);
        support::clear_child_env();
        std::mem::forget(bin_dir);
        f
    }

    /// A channel from the client pod's app to the Service's ClusterIP.
    fn in_client<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Channel) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let url = format!("http://{}:50051", self.cluster_ip);
        self.ns.run(CLIENT, move || async move {
            let ch = Channel::from_shared(url).unwrap().connect().await.unwrap();
            f(ch).await
        })
    }
}

#[test]
fn a_sidecar_balances_calls_to_a_cluster_ip_over_the_services_pods() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    let ns = Namespaces::new("ferry-km", 2 + SLOTS);
    // The node routes between the client pod (10.253.100.2) and pod slots (10.253.<slot>.2).
    let spokes: Vec<(usize, usize)> = std::iter::once((CLIENT, 100))
        .chain((2..2 + SLOTS).map(|slot| (slot, slot)))
        .collect();
    ns.star(NODE, "10.253", &spokes);

    let cluster = Cluster::start(Some(ns.name(NODE)));
    let mut mesh = Mesh {
        ns,
        cluster,
        cluster_ip: String::new(),
    };
    mesh.cluster_ip = mesh.cluster.kube(|c| async move {
        create_namespace(&c, NS).await;
        create_node(&c, "node-a", Some("zone-a"), Some("region-1")).await;
        create_node(&c, "node-b", Some("zone-b"), Some("region-1")).await;
        let svc = create_service(
            &c,
            NS,
            "echo",
            &[("app", "echo")],
            &[ServicePortSpec {
                name: Some("grpc".into()),
                port: 50051,
                target_port: "grpc".into(),
                app_protocol: Some("kubernetes.io/h2c".into()),
            }],
        )
        .await;
        svc.spec.and_then(|s| s.cluster_ip).unwrap()
    });
    for slot in [2, 3, 4] {
        start_pod(&mesh, slot);
    }
    // kube-proxy's part: the ClusterIP to one random pod per connection.
    let cip = mesh.cluster_ip.clone();
    let node = mesh.node().to_string();
    let ipt = |args: &str| {
        let mut v = vec!["ip", "netns", "exec", &node, "iptables", "-t", "nat"];
        v.extend(args.split(' '));
        must(&v);
    };
    ipt("-N KUBE-SVC-ECHO");
    ipt(&format!(
        "-A PREROUTING -d {cip}/32 -p tcp --dport 50051 -j KUBE-SVC-ECHO"
    ));
    ipt(&format!(
        "-A KUBE-SVC-ECHO -p tcp -m statistic --mode random --probability 0.33333 -j DNAT --to-destination {}:50051",
        slot_ip(2)
    ));
    ipt(&format!(
        "-A KUBE-SVC-ECHO -p tcp -m statistic --mode random --probability 0.5 -j DNAT --to-destination {}:50051",
        slot_ip(3)
    ));
    ipt(&format!(
        "-A KUBE-SVC-ECHO -p tcp -j DNAT --to-destination {}:50051",
        slot_ip(4)
    ));

    let ferry_bin = env!("CARGO_BIN_EXE_ferry");
    must(&[
        "ip",
        "netns",
        "exec",
        mesh.ns.name(CLIENT),
        ferry_bin,
        "init",
    ]);

    // Without discovery: the sidecar pools one HTTP/2 connection to the ClusterIP, and
    // kube-proxy pins that connection to one pod.
    let sidecar = mesh.sidecar(false);
    let seen = mesh.in_client(|ch| async move { spread(&ch, 60).await });
    assert_eq!(
        seen.len(),
        1,
        "without discovery every call lands on one pod: {seen:?}"
    );
    drop(sidecar);

    let mut controller = mesh.controller();
    let sidecar = mesh.sidecar(true);
    let admin: std::net::SocketAddr = "127.0.0.1:15000".parse().unwrap();

    // With discovery: per-request round-robin over the three pods.
    let seen = mesh.in_client(|ch| async move { spread(&ch, 300).await });
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (pod, n) in &seen {
        assert!(
            (60..=135).contains(n),
            "{pod} got {n} of 300 calls: {seen:?}"
        );
    }
    let (endpoints, metrics) = mesh.ns.run(CLIENT, move || async move {
        (
            raw(admin, "GET", "/endpoints", "").await.1,
            raw(admin, "GET", "/metrics", "").await.1,
        )
    });
    let endpoints: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let echo = &endpoints["services"]["echo.ferry-demo"];
    assert_eq!(echo["lb"], "round-robin", "{endpoints}");
    assert_eq!(echo["source"], "discovery", "{endpoints}");
    assert_eq!(
        echo["endpoints"].as_array().unwrap().len(),
        3,
        "{endpoints}"
    );
    assert!(
        metrics.contains("ferry_requests_total{direction=\"outbound\",service=\"echo.ferry-demo\""),
        "{metrics}"
    );

    // Scale 3 -> 5: new pods get calls within a second of turning ready.
    let mut lags = Vec::new();
    for slot in [5, 6] {
        start_pod(&mesh, slot);
        lags.push(first_call_on(&mesh, slot));
    }
    let seen = mesh.in_client(|ch| async move { spread(&ch, 100).await });
    assert_eq!(seen.len(), 5, "{seen:?}");

    // Scale 5 -> 2: the removed pods get nothing once their endpoints are gone.
    for slot in [4, 5, 6] {
        mesh.remove_pod(slot, false);
    }
    let t = Instant::now();
    let gone = mesh.in_client(|ch| async move {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = spread(&ch, 20).await;
            if seen.keys().all(|k| k == "pod-2" || k == "pod-3") {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
        }
    });
    assert!(gone, "calls still reach removed pods");
    eprintln!("scale-down reached the sidecar within {:?}", t.elapsed());
    for slot in [4, 5, 6] {
        stop_server(slot);
    }

    // Rolling restart under 500 calls a second: each pod replaced by a new one (ready
    // first), the old one terminating, then gone and its server stopped.
    let failed = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        let (failed, sent, stopping) = (failed.clone(), sent.clone(), stop.clone());
        let mesh = &mesh;
        let load = s.spawn(move || {
            mesh.in_client(move |ch| async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                let mut tasks = tokio::task::JoinSet::new();
                let end = Instant::now() + Duration::from_secs(60);
                while !stopping.load(Ordering::Relaxed) && Instant::now() < end {
                    tick.tick().await;
                    let mut c = EchoClient::new(ch.clone());
                    let (failed, sent) = (failed.clone(), sent.clone());
                    sent.fetch_add(1, Ordering::Relaxed);
                    tasks.spawn(async move {
                        if let Err(s) = c.say(EchoRequest::default()).await {
                            eprintln!("failed during the rollout: {s:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        for (old, new) in [(2, 4), (3, 5)] {
            start_pod(mesh, new);
            std::thread::sleep(Duration::from_millis(700));
            mesh.remove_pod(old, true);
            std::thread::sleep(Duration::from_millis(700));
            mesh.remove_pod(old, false);
            std::thread::sleep(Duration::from_millis(300));
            // The old pod's process ends; its connections with it.
            stop_server(old);
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap();
    });
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rolling restart: {sent} calls, {failed} failed");
    assert!(sent > 1000, "the load ran: {sent} calls");
    assert_eq!(failed, 0, "calls failed during the rolling restart");
    let seen = mesh.in_client(|ch| async move { spread(&ch, 40).await });
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["pod-4", "pod-5"],
        "after the rollout only the new pods answer"
    );

    // A pod IP is no Service: the call goes where it was going.
    let direct = |ip: String| {
        mesh.ns.run(CLIENT, move || async move {
            ferry_demo::grpc_say(format!("{ip}:50051").parse().unwrap(), "direct").await
        })
    };
    assert_eq!(direct(slot_ip(4)).unwrap(), "direct (from pod-4)");

    // Controller down: known destinations keep their endpoints; nothing fails, and a
    // destination never seen passes through.
    controller.kill();
    let seen = mesh.in_client(|ch| async move { spread(&ch, 100).await });
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(direct(slot_ip(5)).unwrap(), "direct (from pod-5)");
    let metrics = mesh.ns.run(CLIENT, move || async move {
        raw(admin, "GET", "/metrics", "").await.1
    });
    for reason in ["not-a-service", "discovery-unavailable"] {
        assert!(
            metrics.contains(&format!(
                "ferry_discovery_passthrough_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    // Back again: the sidecar reconnects and follows changes again.
    let _controller = mesh.controller();
    let seen = mesh.in_client(|ch| async move { spread(&ch, 50).await });
    assert_eq!(seen.len(), 2, "{seen:?}");
    start_pod(&mesh, 6);
    lags.push(first_call_on(&mesh, 6));

    lags.sort();
    eprintln!(
        "pod ready -> first call on it: {:?} (p50 {:?}, max {:?})",
        lags,
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
    assert!(lags.iter().all(|l| *l < Duration::from_secs(3)), "{lags:?}");

    // Idle: the sidecar unsubscribes a destination no new connection asked for in
    // --discovery-idle (2 s here), and the controller forgets it.
    let subscriptions = |mesh: &Mesh| {
        mesh.cluster.block_on(|| async {
            let m = raw("127.0.0.1:9990".parse().unwrap(), "GET", "/metrics", "")
                .await
                .1;
            m.lines()
                .find_map(|l| l.strip_prefix("ferry_controller_subscriptions "))
                .map(|v| v.trim().parse::<u64>().unwrap())
                .unwrap_or_default()
        })
    };
    assert!(subscriptions(&mesh) >= 1);
    let end = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        // Any change makes the controller drop subscriptions nobody listens to.
        mesh.cluster.kube(move |c| async move {
            let name = format!("nudge-{n}");
            let port = ServicePortSpec {
                name: None,
                port: 80,
                target_port: 80.into(),
                app_protocol: None,
            };
            create_service(&c, NS, &name, &[("app", "none")], &[port]).await;
        });
        n += 1;
        if subscriptions(&mesh) == 0 {
            break;
        }
    }
    assert_eq!(
        subscriptions(&mesh),
        0,
        "the idle destination was never unsubscribed"
    );
    drop(sidecar);
}

/// The gRPC server of each running slot, to stop it as a pod's process ends.
static SERVERS: std::sync::Mutex<Vec<(usize, oneshot::Sender<()>)>> =
    std::sync::Mutex::new(Vec::new());

/// Starts slot `slot`'s server, then its Pod object, made ready.
fn start_pod(mesh: &Mesh, slot: usize) {
    let (tx, rx) = oneshot::channel();
    let name = format!("pod-{slot}");
    mesh.ns.spawn(slot, move || async move {
        let l = tokio::net::TcpListener::bind("0.0.0.0:50051")
            .await
            .unwrap();
        tokio::select! {
            _ = ferry_demo::serve_grpc(name, l) => {}
            _ = rx => {}
        }
    });
    SERVERS.lock().unwrap().push((slot, tx));
    mesh.add_pod(slot);
}

/// Ends the slot's server: its runtime goes, connections and all.
fn stop_server(slot: usize) {
    let mut servers = SERVERS.lock().unwrap();
    if let Some(i) = servers.iter().position(|(s, _)| *s == slot) {
        let _ = servers.remove(i).1.send(());
    }
}

/// From the Pod turning ready to the first call it answers.
fn first_call_on(mesh: &Mesh, slot: usize) -> Duration {
    let t = Instant::now();
    let server = format!("pod-{slot}");
    mesh.in_client(
        move |ch| async move { first_from(&ch, &server, Duration::from_secs(10)).await },
    );
    t.elapsed()
}
