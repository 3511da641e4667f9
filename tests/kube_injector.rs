//! ferry-injector and deploy/ against a real kube-apiserver (with etcd and the
//! kube-controller-manager's Deployment, ReplicaSet and EndpointSlice controllers) on the
//! host loopback, no root needed:
//!
//! 1. the API server calls the injector as a cluster would: Pods come back injected, left
//!    alone, or refused, as their namespace and annotations say;
//! 2. every object of `kustomize build deploy` passes the API server's own validation
//!    (server-side dry run, strict fields);
//! 3. the demo's Deployments make Pods that come back injected, and once bound and ready
//!    (no scheduler, no kubelet: the test does their part) ferry-controller serves both echo
//!    Deployments' Pods as the endpoints of `echo.ferry-demo:50051`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_discovery_api::{DiscoveryClient, Resolution, ResolveRequest};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{
    Binding, Container, Namespace, ObjectReference, Pod, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::{Discovery, Scope};
use kube::{Client, Resource};
use serde_json::{Value as Json, json};
use support::controller::{Controller, controller_bin, workspace_bin};
use support::kube::{Cluster, client_for, create_namespace, create_node, set_pod_ready};

/// What deploy/injector/configmap.yaml gives the injector, so sidecars find the controller.
const CONTROLLER_URL: &str = "http://ferry-controller.ferry-system:8086";
const WAIT: Duration = Duration::from_secs(30);
/// Part 1's own namespace, labelled for injection.
const SHOP: &str = "shop";
const DEMO: &str = "ferry-demo";
/// The demo's Deployments, the Node each one's Pod is bound to, and the Pod's IP.
const DEMO_PODS: [(&str, &str, &str); 3] = [
    ("echo-a", "node-a", "10.254.1.10"),
    ("echo-b", "node-b", "10.254.2.10"),
    ("client", "node-a", "10.254.1.11"),
];

#[test]
fn the_api_server_injects_through_ferry_injector_accepts_deploy_and_the_demo_resolves() {
    let begin = Instant::now();
    // Built before the clock of any bounded wait starts.
    let injector_bin = workspace_bin("ferry-injector", "ferry-injector");
    controller_bin();
    let rendered = kustomize_build();
    eprintln!("binaries built, deploy/ rendered: {:.1} s", secs(begin));
    let cluster = Cluster::start(None);
    let injector = Injector::start(&injector_bin);
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    let (addr, ca) = (injector.addr, injector.ca.clone());
    cluster.block_on(move || async move {
        let c = client_for(&kubeconfig).await;
        let docs = Docs::new(&c, &rendered).await;
        // deploy/ first: its own webhook configuration is dry-run before the test
        // registers one of the same name.
        let t = Instant::now();
        every_deploy_object_is_accepted(&c, &docs).await;
        eprintln!("2. deploy/ dry run: {:.1} s", secs(t));
        let t = Instant::now();
        register_webhook(&c, &docs, addr, ca).await;
        pods_come_back_injected_untouched_or_refused(&c).await;
        eprintln!("1. injection through the API server: {:.1} s", secs(t));
        let t = Instant::now();
        the_demo_makes_injected_pods(&c, &docs).await;
        eprintln!("3. demo Pods injected, bound, ready: {:.1} s", secs(t));
    });
    // ferry-controller starts once the cluster holds the demo, as in a real install.
    let t = Instant::now();
    let controller = Controller::start(
        cluster.kubeconfig_path(),
        &["--addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
        &[],
    );
    let (grpc, admin) = (controller.grpc, controller.admin);
    cluster.block_on(move || async move {
        // Ready once its watches have listed.
        let ready = support::eventually(WAIT, || async {
            support::raw(admin, "GET", "/ready", "").await.0 == 200
        })
        .await;
        assert!(ready, "ferry-controller not ready within {WAIT:?}");
        both_echo_deployments_are_ready_endpoints(grpc).await;
    });
    eprintln!("3. ferry-controller resolves the demo: {:.1} s", secs(t));
    eprintln!("kube_injector: {:.1} s in all", secs(begin));
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

// ----- 1. The injector, registered with the API server -----

/// `ferry-injector serve` on 127.0.0.1 with a certificate for that IP, signed by a CA of
/// its own, as deploy/gen-certs.sh makes them for the Service name.
struct Injector {
    child: Child,
    addr: SocketAddr,
    /// The CA's PEM: the webhook's caBundle.
    ca: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Injector {
    fn start(bin: &Path) -> Injector {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f).display().to_string();
        let d = dir.path();
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(
            d,
            &format!("req -x509 {key} -days 1 -subj /CN=ferry-test-ca -keyout ca.key -out ca.crt"),
        );
        openssl(
            d,
            &format!("req {key} -subj /CN=ferry-injector -keyout tls.key -out tls.csr"),
        );
        // The API server dials https://127.0.0.1:PORT, so the name to match is that IP.
        let ext = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
        std::fs::write(d.join("ext.cnf"), ext).unwrap();
        openssl(
            d,
            "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
             -extfile ext.cnf -out tls.crt",
        );
        let mut child = Command::new(bin)
            .args(["serve", "--addr", "127.0.0.1:0", "--cert"])
            .arg(p("tls.crt"))
            .arg("--key")
            .arg(p("tls.key"))
            .env("FERRY_CONTROLLER", CONTROLLER_URL)
            .env(
                "FERRY_INJECTOR_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("ferry-injector starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("ferry-injector: listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("ferry-injector did not say where it listens: {line:?}"));
        Injector {
            child,
            addr,
            ca: std::fs::read(p("ca.crt")).unwrap(),
            _dir: dir,
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `openssl ARGS` in `dir` (arguments split at spaces).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// deploy/'s MutatingWebhookConfiguration as the API server parsed it (rules, selectors,
/// policies), with each webhook's `clientConfig.service` turned into a URL at the test's
/// injector (the API server here cannot reach a Service) and the real caBundle.
async fn register_webhook(c: &Client, docs: &Docs, injector: SocketAddr, ca: Vec<u8>) {
    let doc = docs.only("MutatingWebhookConfiguration");
    let r = docs.create(c, doc, true).await;
    assert_eq!(r.status, 201, "{}: {}", doc.what(), r.body);
    let parsed: MutatingWebhookConfiguration = serde_json::from_value(r.body).unwrap();
    let mut webhooks = parsed.webhooks.unwrap_or_default();
    assert_eq!(
        webhooks.len(),
        2,
        "deploy/ has one webhook per namespace choice"
    );
    for w in &mut webhooks {
        let path = w
            .client_config
            .service
            .as_ref()
            .and_then(|s| s.path.clone());
        let path = path.unwrap_or_else(|| panic!("webhook {} has no service path", w.name));
        w.client_config = WebhookClientConfig {
            url: Some(format!("https://{injector}{path}")),
            ca_bundle: Some(ByteString(ca.clone())),
            service: None,
        };
    }
    let mwc = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: parsed.metadata.name,
            labels: parsed.metadata.labels,
            ..Default::default()
        },
        webhooks: Some(webhooks),
    };
    Api::<MutatingWebhookConfiguration>::all(c.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .expect("the webhook configuration is created");

    create_namespace(c, SHOP).await;
    label_for_injection(c, SHOP).await;
    // The API server takes a moment to use a new configuration: dry-run a Pod until it
    // comes back injected, which also shows the API server trusts the certificate.
    let probe = pod("probe", json!({}), json!({}));
    let path = format!("/api/v1/namespaces/{SHOP}/pods?dryRun=All");
    let end = Instant::now() + WAIT;
    loop {
        let r = post(c, &path, "application/json", probe.clone()).await;
        if r.status == 201 && has_sidecar(&r.body) {
            break;
        }
        assert!(
            Instant::now() < end,
            "no injected Pod within {WAIT:?} of registering the webhook; last answer: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn label_for_injection(c: &Client, ns: &str) {
    let label = json!({"metadata": {"labels": {"ferry.dev/inject": "enabled"}}});
    Api::<Namespace>::all(c.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
}

/// A Pod with one app container, as JSON for [`post`].
fn pod(name: &str, labels: Json, annotations: Json) -> Vec<u8> {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "ferry-test/none"}]},
    });
    serde_json::to_vec(&pod).unwrap()
}

fn has_sidecar(pod: &Json) -> bool {
    let inits = pod["spec"]["initContainers"].as_array();
    inits.is_some_and(|cs| cs.iter().any(|c| c["name"] == "ferry-proxy"))
}

fn names(cs: &Option<Vec<Container>>) -> Vec<&str> {
    cs.iter().flatten().map(|c| c.name.as_str()).collect()
}

/// What a cluster would run for `pod`: the redirect, then the proxy as a native sidecar
/// (an init container that keeps running), told where the controller is and its node.
fn assert_injected(pod: &Pod, app: &str) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        names(&spec.init_containers),
        ["ferry-init", "ferry-proxy"],
        "{name}"
    );
    assert_eq!(names(&Some(spec.containers.clone())), [app], "{name}");
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"), "{name}");
    let env: BTreeMap<&str, _> = proxy
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert_eq!(
        env.get("FERRY_CONTROLLER").and_then(|e| e.value.as_deref()),
        Some(CONTROLLER_URL),
        "{name}"
    );
    let node = env.get("FERRY_NODE_NAME").and_then(|e| {
        let r = e.value_from.as_ref()?.field_ref.as_ref()?;
        Some(r.field_path.as_str())
    });
    assert_eq!(node, Some("spec.nodeName"), "{name}");
    let ann = pod.metadata.annotations.clone().unwrap_or_default();
    assert!(ann.contains_key("ferry.dev/injected"), "{name}: {ann:?}");
}

fn assert_untouched(pod: &Pod) {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(names(&spec.init_containers), [] as [&str; 0], "{name}");
    assert_eq!(names(&Some(spec.containers.clone())), ["app"], "{name}");
    let ann = pod.metadata.annotations.clone().unwrap_or_default();
    assert!(!ann.contains_key("ferry.dev/injected"), "{name}: {ann:?}");
}

/// Creates the Pod for real; the Pod the API server stored, and the warnings a user sees.
async fn create_pod(c: &Client, ns: &str, body: Vec<u8>) -> (Pod, Vec<String>) {
    let r = post(
        c,
        &format!("/api/v1/namespaces/{ns}/pods"),
        "application/json",
        body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    (serde_json::from_value(r.body).unwrap(), r.warnings)
}

async fn pods_come_back_injected_untouched_or_refused(c: &Client) {
    // A plain Pod in a namespace labelled ferry.dev/inject=enabled.
    let (web, _) = create_pod(c, SHOP, pod("web", json!({"app": "web"}), json!({}))).await;
    assert_injected(&web, "app");

    // Opted out by annotation: the injector is asked and says why it left the Pod alone
    // (kubectl prints the warning).
    let off = json!({"ferry.dev/inject": "disabled"});
    let (p, warnings) = create_pod(c, SHOP, pod("opted-out", json!({}), off)).await;
    assert_untouched(&p);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ferry: not injected: ferry.dev/inject is disabled")),
        "{warnings:?}"
    );
    // Opted out by label: the webhook's objectSelector does not even send it.
    let off = json!({"ferry.dev/inject": "disabled"});
    let (p, warnings) = create_pod(c, SHOP, pod("labelled-out", off, json!({}))).await;
    assert_untouched(&p);
    assert!(warnings.is_empty(), "{warnings:?}");

    // Opted in by annotation in a namespace that is not: the other webhook injects it.
    let on = json!({"ferry.dev/inject": "enabled"});
    let (p, _) = create_pod(c, "default", pod("opted-in", json!({}), on)).await;
    assert_injected(&p, "app");
    let (p, warnings) = create_pod(c, "default", pod("plain", json!({}), json!({}))).await;
    assert_untouched(&p);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("injection is not enabled")),
        "{warnings:?}"
    );

    // A bad ferry annotation: refused at creation, naming it, rather than a sidecar that
    // fails later.
    let bad = json!({"ferry.dev/timeout": "banana"});
    let r = post(
        c,
        &format!("/api/v1/namespaces/{SHOP}/pods"),
        "application/json",
        pod("bad", json!({}), bad),
    )
    .await;
    // The injector gives no code, so the API server answers 400: kubectl says
    // "Error from server (BadRequest): admission webhook ... denied the request: ...".
    assert_eq!(r.status, 400, "{}", r.body);
    let message = r.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(r#"admission webhook "namespace.inject.ferry.dev" denied the request"#)
            && message.contains(r#"ferry.dev/timeout: "banana" is not a duration"#),
        "{message}"
    );
    let pods: Api<Pod> = Api::namespaced(c.clone(), SHOP);
    assert!(pods.get_opt("bad").await.unwrap().is_none());
}

// ----- 2. deploy/ against the API server -----

/// `kustomize build deploy`, as `kubectl apply -k deploy/` would send it.
fn kustomize_build() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let gobin = Path::new(&home).join("go/bin/kustomize");
    let kustomize = if gobin.exists() {
        gobin
    } else {
        PathBuf::from("kustomize")
    };
    let out = Command::new(kustomize)
        .args(["build", "deploy"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .output()
        .expect(
            "kustomize is installed (go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1; \
             .ci/run does)",
        );
    assert!(
        out.status.success(),
        "kustomize build deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One rendered object: where it goes, and its YAML as rendered.
struct Doc {
    kind: String,
    name: String,
    namespace: Option<String>,
    /// The collection to POST it to, from the API server's discovery.
    path: String,
    yaml: String,
}

impl Doc {
    fn what(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

struct Docs(Vec<Doc>);

impl Docs {
    /// Splits kustomize's output (block style, keys sorted, two-space indent: the few
    /// fields that locate an object are found by their place) and resolves each kind with
    /// the API server's discovery. The API server itself parses the YAML.
    async fn new(c: &Client, rendered: &str) -> Docs {
        let discovery = Discovery::new(c.clone()).run().await.unwrap();
        let mut docs = Vec::new();
        for yaml in rendered.split("\n---\n").filter(|d| !d.trim().is_empty()) {
            let top = |key: &str| field(yaml.lines(), key);
            let meta = yaml
                .lines()
                .skip_while(|l| *l != "metadata:")
                .skip(1)
                .take_while(|l| l.starts_with(' '))
                .filter_map(|l| l.strip_prefix("  "));
            let (api_version, kind) = (top("apiVersion").unwrap(), top("kind").unwrap());
            let name = field(meta.clone(), "name").unwrap();
            let namespace = field(meta, "namespace");
            let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
            let gvk = GroupVersionKind::gvk(group, version, &kind);
            let (ar, caps) = discovery
                .resolve_gvk(&gvk)
                .unwrap_or_else(|| panic!("the API server has no {api_version} {kind}"));
            // Else `kubectl apply -k` puts it in whatever namespace the user's context says.
            let ns = match caps.scope {
                Scope::Namespaced => Some(namespace.clone().unwrap_or_else(|| {
                    panic!("{kind} {name} is namespaced but names no namespace")
                })),
                Scope::Cluster => None,
            };
            docs.push(Doc {
                path: DynamicObject::url_path(&ar, ns.as_deref()),
                kind,
                name,
                namespace,
                yaml: yaml.to_string(),
            });
        }
        Docs(docs)
    }

    fn only(&self, kind: &str) -> &Doc {
        let mut of_kind = self.0.iter().filter(|d| d.kind == kind);
        let doc = of_kind
            .next()
            .unwrap_or_else(|| panic!("no {kind} rendered"));
        assert!(of_kind.next().is_none(), "more than one {kind} rendered");
        doc
    }

    /// POSTs the document's YAML; strict field validation, as kubectl's default is.
    async fn create(&self, c: &Client, doc: &Doc, dry_run: bool) -> Reply {
        let mut path = format!("{}?fieldValidation=Strict", doc.path);
        if dry_run {
            path += "&dryRun=All";
        }
        post(c, &path, "application/yaml", doc.yaml.clone().into_bytes()).await
    }
}

/// The value of `key:` among `lines` at their own level (unquoted).
fn field<'a>(mut lines: impl Iterator<Item = &'a str>, key: &str) -> Option<String> {
    let prefix = format!("{key}: ");
    lines.find_map(|l| {
        let v = l.strip_prefix(&prefix)?.trim();
        Some(v.trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

#[derive(Debug)]
struct Reply {
    status: u16,
    /// The `Warning` headers, as kubectl prints them.
    warnings: Vec<String>,
    body: Json,
}

/// A raw POST through the client (its authentication and TLS), keeping the status and
/// warnings that typed calls drop.
async fn post(c: &Client, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
    let req = hyper::Request::post(path)
        .header("content-type", content_type)
        .header("accept", "application/json")
        .body(kube::client::Body::from(body))
        .unwrap();
    let resp = c
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status().as_u16();
    let warnings = resp
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let bytes = resp.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
    Reply {
        status,
        warnings,
        body,
    }
}

async fn every_deploy_object_is_accepted(c: &Client, docs: &Docs) {
    // Namespaced objects can only be dry-run into namespaces that exist: made for real.
    for doc in docs.0.iter().filter(|d| d.kind == "Namespace") {
        let r = docs.create(c, doc, false).await;
        assert_eq!(r.status, 201, "{}: {}", doc.what(), r.body);
        assert!(r.warnings.is_empty(), "{}: {:?}", doc.what(), r.warnings);
    }
    let mut accepted = BTreeMap::new();
    for doc in docs.0.iter().filter(|d| d.kind != "Namespace") {
        let r = docs.create(c, doc, true).await;
        assert_eq!(r.status, 201, "{} refused: {}", doc.what(), r.body);
        assert!(r.warnings.is_empty(), "{}: {:?}", doc.what(), r.warnings);
        accepted.insert(doc.what(), r.body);
    }
    eprintln!(
        "the API server accepted the {} objects of deploy/ besides its Namespaces: {:?}",
        accepted.len(),
        accepted.keys()
    );
    // The address the injector gives sidecars is the controller Service deploy/ makes.
    let config = &accepted["ConfigMap ferry-system/ferry-injector"];
    assert_eq!(config["data"]["FERRY_CONTROLLER"], CONTROLLER_URL);
    let svc = &accepted["Service ferry-system/ferry-controller"];
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 8086),
        "{svc}"
    );
}

// ----- 3. The demo -----

async fn the_demo_makes_injected_pods(c: &Client, docs: &Docs) {
    // Part 2 made the demo's Namespace from its own object; it asks for injection.
    let ns = Api::<Namespace>::all(c.clone()).get(DEMO).await.unwrap();
    let labels = ns.metadata.labels.unwrap_or_default();
    assert_eq!(labels["ferry.dev/inject"], "enabled");
    // Pods are refused until the namespace's default ServiceAccount exists.
    let sa: Api<ServiceAccount> = Api::namespaced(c.clone(), DEMO);
    let has_sa = support::eventually(WAIT, || async {
        matches!(sa.get_opt("default").await, Ok(Some(_)))
    })
    .await;
    assert!(has_sa, "no ServiceAccount {DEMO}/default within {WAIT:?}");

    let demo: Vec<&Doc> = docs
        .0
        .iter()
        .filter(|d| d.namespace.as_deref() == Some(DEMO))
        .collect();
    let kinds: BTreeSet<&str> = demo.iter().map(|d| d.kind.as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["Deployment", "Service"]));
    for doc in demo {
        let r = docs.create(c, doc, false).await;
        assert_eq!(r.status, 201, "{}: {}", doc.what(), r.body);
    }
    create_node(c, "node-a", Some("zone-a"), Some("region-1")).await;
    create_node(c, "node-b", Some("zone-b"), Some("region-1")).await;

    // The Deployment and ReplicaSet controllers make one Pod per Deployment.
    let pods: Api<Pod> = Api::namespaced(c.clone(), DEMO);
    let mut made = BTreeMap::new();
    let end = Instant::now() + WAIT;
    while made.len() < DEMO_PODS.len() {
        for p in pods.list(&ListParams::default()).await.unwrap().items {
            let name = p.metadata.name.clone().unwrap_or_default();
            if let Some((d, ..)) = DEMO_PODS
                .iter()
                .find(|(d, ..)| name.starts_with(&format!("{d}-")))
            {
                made.insert(*d, p);
            }
        }
        if Instant::now() > end {
            panic!(
                "only {:?} of the demo's Pods within {WAIT:?}; ReplicaSets say: {}",
                made.keys(),
                replica_set_conditions(c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (d, node, ip) in DEMO_PODS {
        let p = &made[d];
        let app = if d == "client" { "client" } else { "echo" };
        assert_injected(p, app);
        let name = p.metadata.name.clone().unwrap();
        // The scheduler's part: bind the Pod to a Node through pods/binding.
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                ..Default::default()
            },
        };
        pods.create_subresource::<_, Json>("binding", &name, &PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("bind {name} to {node}: {e}"));
        // The kubelet's part.
        let p = set_pod_ready(c, DEMO, &name, ip, true).await;
        assert_eq!(p.spec.and_then(|s| s.node_name).as_deref(), Some(node));
    }
    // What the client's sidecar reads: round-robin over echo, per request.
    let client = made["client"].metadata.annotations.clone().unwrap();
    assert_eq!(client["ferry.dev/lb"], "round-robin");
}

async fn replica_set_conditions(c: &Client) -> String {
    let rs: Api<ReplicaSet> = Api::namespaced(c.clone(), DEMO);
    let list = rs.list(&ListParams::default()).await.unwrap();
    let conds: BTreeMap<_, _> = list
        .items
        .into_iter()
        .map(|r| (r.metadata.name, r.status.and_then(|s| s.conditions)))
        .collect();
    format!("{conds:?}")
}

/// `echo.ferry-demo:50051`, as the demo client's sidecar asks ferry-controller: both echo
/// Deployments' Pods, ready, over h2c.
async fn both_echo_deployments_are_ready_endpoints(grpc: SocketAddr) {
    let mut client = DiscoveryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut stream = client
        .resolve(ResolveRequest {
            destination: format!("echo.{DEMO}:50051"),
            node: "node-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let want: BTreeSet<String> = DEMO_PODS[..2]
        .iter()
        .map(|(_, _, ip)| format!("{ip}:50051"))
        .collect();
    let ready = |r: &Resolution| -> BTreeSet<String> {
        let ready = r.endpoints.iter().filter(|e| e.ready);
        ready.map(|e| format!("{}:{}", e.ip, e.port)).collect()
    };
    let end = Instant::now() + WAIT;
    let mut last = None;
    let r = loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(r))) if ready(&r) == want => break r,
            Ok(Ok(Some(r))) => last = Some(r),
            Ok(other) => panic!("the stream ended: {other:?}"),
            Err(_) => panic!("not both echo Pods within {WAIT:?}; last answer: {last:#?}"),
        }
    };
    assert!(r.found, "{r:?}");
    assert_eq!(r.app_protocol, "kubernetes.io/h2c");
    // Each endpoint is its Deployment's Pod, in its Node's zone.
    let by_pod: BTreeMap<String, String> = r
        .endpoints
        .iter()
        .map(|e| {
            let deployment = e.pod.rsplitn(3, '-').nth(2).unwrap_or_default();
            let zone = e.locality.clone().unwrap_or_default().zone;
            (deployment.to_string(), zone)
        })
        .collect();
    assert_eq!(
        by_pod,
        BTreeMap::from([
            ("echo-a".to_string(), "zone-a".to_string()),
            ("echo-b".to_string(), "zone-b".to_string()),
        ])
    );
}
