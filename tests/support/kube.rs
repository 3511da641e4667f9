//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager (EndpointSlice, ServiceAccount, Namespace, GC, Deployment and
//! ReplicaSet controllers), no scheduler, no kubelet. Tests make Nodes and Pods themselves
//! (or bind the Pods controllers make) and play the kubelet's part by patching Pod status.
//! Helpers below create the objects; the controllers do the rest for real.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, Pod, PodSpec, Service, ServiceAccount, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use serde_json::json;

/// The folder holding `kube-apiserver`, `kube-controller-manager` and `etcd`.
pub struct KubeBins {
    pub dir: PathBuf,
}

const BINS: [&str; 3] = ["kube-apiserver", "kube-controller-manager", "etcd"];
const SCRIPT: &str = "tests/tools/build-kube.sh";

impl KubeBins {
    /// `$FERRY_KUBE_BIN` when it holds all three, else what `tests/tools/build-kube.sh`
    /// prints (it builds them once into a cache; ~10 min the first time).
    pub fn find() -> KubeBins {
        // Once per test binary, so parallel tests do not start parallel builds.
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        let dir = DIR.get_or_init(|| {
            if let Some(dir) = std::env::var_os("FERRY_KUBE_BIN").map(PathBuf::from)
                && has_all(&dir)
            {
                return dir;
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            eprintln!("kube binaries: asking {SCRIPT} (a first build takes ~10 min)");
            // stderr is inherited so the build's progress shows.
            let out = Command::new("bash")
                .arg(root.join(SCRIPT))
                .stderr(Stdio::inherit())
                .output();
            let dir = match out {
                Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .rfind(|l| !l.trim().is_empty())
                    .map(|l| PathBuf::from(l.trim())),
                _ => None,
            };
            match dir {
                Some(dir) if has_all(&dir) => dir,
                _ => panic!(
                    "no kube-apiserver/kube-controller-manager/etcd: run {SCRIPT} (needs Go) \
                     or set FERRY_KUBE_BIN to a folder holding them"
                ),
            }
        });
        KubeBins { dir: dir.clone() }
    }

    pub fn path(&self, bin: &str) -> PathBuf {
        self.dir.join(bin)
    }
}

fn has_all(dir: &Path) -> bool {
    BINS.iter().all(|b| dir.join(b).is_file())
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running control plane; `Drop` SIGKILLs it (a graceful apiserver stop takes ~60 s).
pub struct Cluster {
    dir: tempfile::TempDir,
    netns: Option<String>,
    url: String,
    token: String,
    kubeconfig: PathBuf,
    procs: Vec<Proc>,
}

const ADMIN_TOKEN: &str = "ferry-test-admin-token";

impl Cluster {
    /// Starts etcd, kube-apiserver and kube-controller-manager on 127.0.0.1 (of network
    /// namespace `netns` when given, through `ip netns exec`), and returns once the API
    /// server is ready and `default/default` ServiceAccount exists. Blocking.
    pub fn start(netns: Option<&str>) -> Cluster {
        let begin = Instant::now();
        let bins = KubeBins::find();
        let dir = tempfile::Builder::new()
            .prefix("ferry-kube-")
            .tempdir()
            .unwrap();
        let base = dir.path().to_path_buf();
        let p = |f: &str| base.join(f).display().to_string();
        let (sa_key, sa_pub, certs) = (p("sa.key"), p("sa.pub"), p("certs"));
        openssl(&["genrsa", "-out", &sa_key, "2048"]);
        openssl(&["rsa", "-in", &sa_key, "-pubout", "-out", &sa_pub]);
        std::fs::write(
            base.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        // Ports are free on the host loopback; a fresh namespace's loopback has none taken.
        let [etcd_client, etcd_peer, api] = free_ports();
        let url = format!("https://127.0.0.1:{api}");
        // The API server writes its self-signed certificate (and CA) there at start.
        let ca = base.join("certs/apiserver.crt");
        let kubeconfig = base.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url, &ca, ADMIN_TOKEN)).unwrap();

        let mut cluster = Cluster {
            netns: netns.map(str::to_string),
            url,
            token: ADMIN_TOKEN.to_string(),
            kubeconfig,
            procs: Vec::new(),
            dir,
        };
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        cluster.spawn(
            "etcd",
            &bins.path("etcd"),
            &[
                "--name=ferry-test".into(),
                format!("--data-dir={}", p("etcd")),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=ferry-test={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        );
        cluster.spawn(
            "kube-apiserver",
            &bins.path("kube-apiserver"),
            &[
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // Else it exits: a loopback address cannot back the `kubernetes` Service.
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={api}"),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", p("tokens.csv")),
                format!("--service-account-key-file={sa_pub}"),
                format!("--service-account-signing-key-file={sa_key}"),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--cert-dir={certs}"),
                format!("--etcd-servers={etcd_url}"),
            ],
        );
        cluster.wait_until(
            "kube-apiserver /readyz",
            Duration::from_secs(60),
            |c| async move {
                let req = hyper::Request::get("/readyz").body(Vec::new()).unwrap();
                c.request_text(req).await.is_ok_and(|t| t.trim() == "ok")
            },
        );
        cluster.spawn(
            "kube-controller-manager",
            &bins.path("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", cluster.kubeconfig.display()),
                // Deployments and ReplicaSets too, so a Deployment makes Pods (still no
                // scheduler: tests bind them).
                "--controllers=endpointslice-controller,endpointslice-mirroring-controller,\
                 serviceaccount-controller,namespace-controller,garbage-collector-controller,\
                 deployment-controller,replicaset-controller"
                    .into(),
                "--leader-elect=false".into(),
                format!("--service-account-private-key-file={sa_key}"),
                "--secure-port=0".into(),
                "--bind-address=127.0.0.1".into(),
            ],
        );
        // The ServiceAccount admission plugin refuses Pods until it exists.
        cluster.wait_until(
            "ServiceAccount default/default",
            Duration::from_secs(60),
            |c| async move { has_default_sa(&c, "default").await },
        );
        eprintln!(
            "kube cluster ready in {:.1} s at {}",
            begin.elapsed().as_secs_f64(),
            cluster.url
        );
        cluster
    }

    /// A kubeconfig (token auth, the API server's CA) for other processes: `KUBECONFIG=...`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A bearer token in group `system:masters`.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// A client for the runtime this is awaited on (kube clients stay bound to their first
    /// runtime, so make one per runtime). With a netns, call it from inside that namespace,
    /// or use [`client_for`] where `&self` cannot go (`'static` closures).
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await
    }

    /// Runs `f` to completion on a new thread with its own runtime, inside the cluster's
    /// network namespace if it has one.
    pub fn block_on<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let netns = self.netns.clone();
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                enter_netns(&ns);
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Runs `f` with a fresh client, inside the cluster's network namespace if it has one.
    pub fn kube<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let kc = self.kubeconfig_path().to_path_buf();
        self.block_on(move || async move { f(client_for(&kc).await).await })
    }

    /// The last `n` lines of each process's log.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("----- {} (last {n} lines of its log) -----\n", p.name);
            for l in &lines[lines.len().saturating_sub(n)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    fn spawn(&mut self, name: &'static str, bin: &Path, args: &[String]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.procs.push(Proc { name, child, log });
    }

    /// Polls `check` with a fresh client until it holds; panics if a process exits or
    /// `within` passes (the logs are printed by `Drop`).
    fn wait_until<F, Fut>(&mut self, what: &str, within: Duration, check: F)
    where
        F: Fn(Client) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = bool>,
    {
        let end = Instant::now() + within;
        loop {
            for p in &mut self.procs {
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("{} exited ({status}) while waiting for {what}", p.name);
                }
            }
            let (kubeconfig, check) = (self.kubeconfig.clone(), check.clone());
            let ok = self.block_on(move || async move {
                let Ok(client) = client_from(&kubeconfig).await else {
                    return false;
                };
                tokio::time::timeout(Duration::from_secs(5), check(client))
                    .await
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            assert!(Instant::now() < end, "no {what} within {within:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(40));
        }
        for p in &mut self.procs {
            let _ = p.child.kill();
        }
        for p in &mut self.procs {
            let _ = p.child.wait();
        }
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `N` distinct ports, all held until all are picked.
fn free_ports<const N: usize>() -> [u16; N] {
    let ls = [(); N].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    ls.map(|l| l.local_addr().unwrap().port())
}

fn enter_netns(name: &str) {
    let f = File::open(format!("/var/run/netns/{name}")).expect("network namespace exists");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

fn kubeconfig_yaml(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ferry-test
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: ferry-test
  context:
    cluster: ferry-test
    user: admin
    namespace: default
current-context: ferry-test
",
        ca = ca.display()
    )
}

/// A client from a kubeconfig file, e.g. [`Cluster::kubeconfig_path`].
pub async fn client_for(kubeconfig: &Path) -> Client {
    client_from(kubeconfig)
        .await
        .unwrap_or_else(|e| panic!("kube client from {}: {e}", kubeconfig.display()))
}

async fn client_from(kubeconfig: &Path) -> Result<Client, String> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Client::try_from(config).map_err(|e| e.to_string())
}

async fn has_default_sa(client: &Client, ns: &str) -> bool {
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    matches!(sa.get_opt("default").await, Ok(Some(_)))
}

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        ..Default::default()
    }
}

/// Creates namespace `name` and waits (≤ 30 s) for its `default` ServiceAccount, without
/// which Pods are refused.
pub async fn create_namespace(client: &Client, name: &str) -> Namespace {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: meta(name, &[]),
        ..Default::default()
    };
    let ns = api
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    let ok = super::eventually(Duration::from_secs(30), || has_default_sa(client, name)).await;
    assert!(ok, "no ServiceAccount {name}/default within 30 s");
    ns
}

/// Creates Node `name` with the topology labels given and a Ready status.
pub async fn create_node(
    client: &Client,
    name: &str,
    zone: Option<&str>,
    region: Option<&str>,
) -> Node {
    let api: Api<Node> = Api::all(client.clone());
    let mut labels = vec![("kubernetes.io/hostname", name)];
    labels.extend(zone.map(|z| ("topology.kubernetes.io/zone", z)));
    labels.extend(region.map(|r| ("topology.kubernetes.io/region", r)));
    let node = Node {
        metadata: meta(name, &labels),
        ..Default::default()
    };
    api.create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("create node {name}: {e}"));
    // Allocatable CPU lets the controller's topology hints (topology-mode: Auto) weigh zones.
    let resources = json!({"cpu": "4", "memory": "8Gi", "pods": "110"});
    let status = json!({"status": {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("node {name} status: {e}"))
}

/// A Service's target port: a number or a container port's name.
#[derive(Clone, Debug)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(p: u16) -> Self {
        TargetPort::Number(p)
    }
}

impl From<&str> for TargetPort {
    fn from(n: &str) -> Self {
        TargetPort::Name(n.to_string())
    }
}

#[derive(Clone, Debug)]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub app_protocol: Option<String>,
}

/// Creates a ClusterIP Service (TCP ports) and returns it as stored, ClusterIP included.
pub async fn create_service(
    client: &Client,
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: &[ServicePortSpec],
) -> Service {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc = Service {
        metadata: meta(name, &[]),
        spec: Some(ServiceSpec {
            selector: Some(
                selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.port.into(),
                        protocol: Some("TCP".into()),
                        target_port: Some(match &p.target_port {
                            TargetPort::Number(n) => IntOrString::Int((*n).into()),
                            TargetPort::Name(s) => IntOrString::String(s.clone()),
                        }),
                        app_protocol: p.app_protocol.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    api.create(&PostParams::default(), &svc)
        .await
        .unwrap_or_else(|e| panic!("create service {ns}/{name}: {e}"))
}

/// Creates a Pod bound to `node` (no scheduler, no kubelet: it never runs) with one
/// container declaring `container_ports` (name, port).
pub async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
    container_ports: &[(&str, u16)],
) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = Pod {
        metadata: meta(name, labels),
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("ferry-test/none".into()),
                ports: Some(
                    container_ports
                        .iter()
                        .map(|(n, p)| ContainerPort {
                            name: Some(n.to_string()),
                            container_port: (*p).into(),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    api.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"))
}

/// Does the kubelet's part: phase Running, the Pod's IP, and Ready/ContainersReady.
pub async fn set_pod_ready(client: &Client, ns: &str, name: &str, ip: &str, ready: bool) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let cond = if ready { "True" } else { "False" };
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "PodScheduled", "status": "True"},
            {"type": "ContainersReady", "status": cond},
            {"type": "Ready", "status": cond},
        ],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("pod {ns}/{name} status: {e}"))
}

/// Deletes the Pod with a 300 s grace period: with no kubelet to finish the job it keeps
/// its deletionTimestamp, so the EndpointSlice controller reports it terminating.
pub async fn mark_pod_terminating(client: &Client, ns: &str, name: &str) {
    delete_pod(client, ns, name, 300).await;
}

/// Deletes the Pod at once (grace period 0, as `kubectl delete --force`).
pub async fn force_delete_pod(client: &Client, ns: &str, name: &str) {
    delete_pod(client, ns, name, 0).await;
}

async fn delete_pod(client: &Client, ns: &str, name: &str, grace: u32) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let params = DeleteParams {
        grace_period_seconds: Some(grace),
        ..Default::default()
    };
    api.delete(name, &params)
        .await
        .unwrap_or_else(|e| panic!("delete pod {ns}/{name}: {e}"));
}

/// Polls the EndpointSlices of `service` until `pred` holds and returns them; panics with
/// the last ones seen after `within`.
pub async fn wait_for_slices(
    client: &Client,
    ns: &str,
    service: &str,
    pred: impl Fn(&[EndpointSlice]) -> bool,
    within: Duration,
) -> Vec<EndpointSlice> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let end = Instant::now() + within;
    let mut last = Vec::new();
    loop {
        match api.list(&lp).await {
            Ok(list) => {
                last = list.items;
                if pred(&last) {
                    return last;
                }
            }
            Err(e) => eprintln!("list endpointslices {ns}/{service}: {e}"),
        }
        if Instant::now() > end {
            panic!(
                "EndpointSlices of {ns}/{service} not as expected within {within:?}; last seen:\n{}",
                serde_json::to_string_pretty(&last).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The endpoint with address `ip` in any of `slices`.
pub fn endpoint<'a>(slices: &'a [EndpointSlice], ip: &str) -> Option<&'a Endpoint> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .find(|e| e.addresses.iter().any(|a| a == ip))
}
