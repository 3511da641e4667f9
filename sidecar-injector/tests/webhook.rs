//! The webhook over real HTTPS: this test's client stands in for the kube-apiserver,
//! sending the AdmissionReviews it would send for pods a controller creates.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const POD: &str = include_str!("fixtures/pod.json");

struct Injector {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    ca: rustls::pki_types::CertificateDer<'static>,
}

fn write_cert(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    // Written to a temporary name first: the injector may read at any moment.
    std::fs::write(dir.join("tls.key.tmp"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("tls.crt.tmp"), ck.cert.pem()).unwrap();
    std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).unwrap();
    ck.cert.der().clone()
}

impl Injector {
    fn start() -> Injector {
        let dir = tempfile::tempdir().unwrap();
        let ca = write_cert(dir.path());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-injector"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--cert-reload",
                "100ms",
                "--image",
                "ferry:test",
            ])
            .arg("--cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--key")
            .arg(dir.path().join("tls.key"))
            .env(
                "FERRY_INJECTOR_LOG",
                std::env::var("TEST_INJECTOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
        Injector {
            child,
            addr,
            dir,
            ca,
        }
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.post_trusting(&self.ca.clone(), path, body)
            .await
            .unwrap()
    }

    async fn post_trusting(
        &self,
        ca: &rustls::pki_types::CertificateDer<'static>,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header("host", "ferry-injector.ferry-system.svc")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn review_of(pod: &Value, uid: &str) -> Vec<u8> {
    serde_json::to_vec(&review_value(pod, uid)).unwrap()
}

fn review_value(pod: &Value, uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "uid": "u-1", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// A pod from the fixture with `f` applied.
fn pod_with(f: impl FnOnce(&mut Value)) -> Value {
    let mut p: Value = serde_json::from_str(POD).unwrap();
    f(&mut p);
    p
}

/// The refusal message of a denied review.
fn denial(resp: &Value) -> &str {
    assert_eq!(resp["response"]["allowed"], false, "{resp}");
    assert!(resp["response"]["patch"].is_null(), "{resp}");
    resp["response"]["status"]["message"].as_str().unwrap()
}

/// The skip warning of a review allowed unchanged.
fn skip_warning(resp: &Value) -> &str {
    assert_eq!(resp["response"]["allowed"], true, "{resp}");
    assert!(resp["response"]["patch"].is_null(), "{resp}");
    resp["response"]["warnings"][0].as_str().unwrap_or_default()
}

/// The patch bytes: kube-core writes Go's `[]byte` as a JSON array of numbers, which the
/// API server decodes like base64 text; accept both.
fn patch_bytes(response: &Value) -> Option<Vec<u8>> {
    match &response["response"]["patch"] {
        Value::String(b64) => Some(decode_b64(b64)),
        Value::Array(a) => Some(a.iter().map(|b| b.as_u64().unwrap() as u8).collect()),
        _ => None,
    }
}

fn apply(pod: &Value, response: &Value) -> Value {
    let raw = patch_bytes(response).expect("a patch");
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).expect("the patch applies to the request's object");
    out
}

fn decode_b64(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        buf = (buf << 6) | A.iter().position(|x| *x == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

/// Validates with the `kubernetes-validate` tool (PyPI), as a real schema check.
fn validate_pod(pod: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pod.json");
    let mut named = pod.clone();
    named["metadata"]["name"] = json!("checkout-7d9f8c6b5-abcde");
    std::fs::write(&f, serde_json::to_vec(&named).unwrap()).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&f)
        .output()
        .expect(
            "kubernetes-validate is installed (pip install kubernetes-validate; tests/run.sh does)",
        );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_controller_created_pod_is_injected_and_a_second_pass_adds_nothing() {
    let inj = Injector::start();
    let pod: Value = serde_json::from_str(POD).unwrap();
    let (status, resp) = inj
        .post("/mutate?namespace-enabled=true", review_of(&pod, "a-1"))
        .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["response"]["uid"], "a-1");
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patched = apply(&pod, &resp);

    let inits = patched["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ferry-init", "ferry-proxy", "migrate"]);
    let init = &inits[0];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--skip-outbound-ports", "5432"]),
        "{args:?}"
    );
    let proxy = &inits[1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        proxy["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(proxy["resources"]["requests"]["memory"], "96Mi");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["volumeMounts"][0]["mountPath"], "/etc/ferry");
    assert_eq!(
        patched["metadata"]["annotations"]["ferry.dev/injected"],
        env!("CARGO_PKG_VERSION")
    );

    // Nothing the pod had is gone or changed.
    for key in ["ownerReferences", "generateName", "labels"] {
        assert_eq!(patched["metadata"][key], pod["metadata"][key], "{key}");
    }
    assert_eq!(patched["spec"]["containers"], pod["spec"]["containers"]);
    assert_eq!(patched["spec"]["volumes"][0], pod["spec"]["volumes"][0]);
    assert_eq!(inits[2], pod["spec"]["initContainers"][0]);
    validate_pod(&patched);

    // The API server calls again (reinvocation): nothing more is added.
    let (status, again) = inj
        .post("/mutate?namespace-enabled=true", review_of(&patched, "a-2"))
        .await;
    assert_eq!(status, 200);
    assert!(again["response"]["patch"].is_null(), "{again}");
    assert!(
        again["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("already injected")
    );
}

#[tokio::test]
async fn the_pod_annotation_wins_over_the_namespace_and_skips_say_why() {
    let inj = Injector::start();
    let base: Value = serde_json::from_str(POD).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut p = base.clone();
        f(&mut p);
        p
    };
    let cases: Vec<(&str, Value, bool, Option<&str>)> = vec![
        (
            "namespace not enabled",
            base.clone(),
            false,
            Some("not enabled"),
        ),
        (
            "pod enables in a plain namespace",
            with(&|p| p["metadata"]["annotations"]["ferry.dev/inject"] = json!("enabled")),
            false,
            None,
        ),
        (
            "pod disables in an enabled namespace",
            with(&|p| p["metadata"]["annotations"]["ferry.dev/inject"] = json!("disabled")),
            true,
            Some("disabled"),
        ),
        (
            "hostNetwork",
            with(&|p| p["spec"]["hostNetwork"] = json!(true)),
            true,
            Some("hostNetwork"),
        ),
        (
            "kube-system",
            with(&|p| p["metadata"]["namespace"] = json!("kube-system")),
            true,
            Some("excluded"),
        ),
    ];
    for (what, pod, ns_enabled, skipped) in cases {
        let path = if ns_enabled {
            "/mutate?namespace-enabled=true"
        } else {
            "/mutate"
        };
        let (status, resp) = inj.post(path, review_of(&pod, "u")).await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(resp["response"]["allowed"], true, "{what}");
        match skipped {
            Some(reason) => {
                assert!(resp["response"]["patch"].is_null(), "{what}");
                let w = resp["response"]["warnings"][0].as_str().unwrap_or_default();
                assert!(w.contains(reason), "{what}: {w}");
            }
            None => assert!(patch_bytes(&resp).is_some(), "{what}: {resp}"),
        }
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_the_reason_and_the_server_keeps_answering() {
    let inj = Injector::start();
    let mut pod: Value = serde_json::from_str(POD).unwrap();
    pod["metadata"]["annotations"]["ferry.dev/timeout"] = json!("banana");
    pod["metadata"]["annotations"]["ferry.dev/lb"] = json!("fastest");
    let (status, resp) = inj
        .post("/mutate?namespace-enabled=true", review_of(&pod, "bad-1"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(resp["response"]["allowed"], false);
    let msg = resp["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("ferry.dev/timeout: \"banana\" is not a duration"),
        "{msg}"
    );
    assert!(
        msg.contains("ferry.dev/lb: \"fastest\" is not a balancer"),
        "{msg}"
    );

    let mut bad_inject: Value = serde_json::from_str(POD).unwrap();
    bad_inject["metadata"]["annotations"]["ferry.dev/inject"] = json!("yes");
    let (_, resp) = inj.post("/mutate", review_of(&bad_inject, "bad-2")).await;
    assert_eq!(resp["response"]["allowed"], false);
    assert!(
        resp["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("\"yes\" is not an injection choice")
    );

    // Malformed and truncated reviews: 400 with a message.
    let whole = review_of(&serde_json::from_str(POD).unwrap(), "t");
    for body in [
        b"not json".to_vec(),
        whole[..whole.len() / 2].to_vec(),
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}".to_vec(),
    ] {
        let (status, resp) = inj.post("/mutate", body).await;
        assert_eq!(status, 400, "{resp}");
        assert!(resp["error"].as_str().unwrap().len() > 10);
    }
    // An enormous pod is refused cleanly, not with a 5xx.
    let mut huge: Value = serde_json::from_str(POD).unwrap();
    huge["metadata"]["annotations"]["big"] = json!("x".repeat(5 * 1024 * 1024));
    let (status, _) = inj.post("/mutate", review_of(&huge, "h")).await;
    assert_eq!(status, 413);

    // A non-Pod object is allowed unchanged.
    let mut review: Value =
        serde_json::from_slice(&review_of(&serde_json::from_str(POD).unwrap(), "cm")).unwrap();
    review["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    review["request"]["object"] =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    let (status, resp) = inj
        .post("/mutate", serde_json::to_vec(&review).unwrap())
        .await;
    assert_eq!((status, &resp["response"]["allowed"]), (200, &json!(true)));
    assert!(resp["response"]["patch"].is_null());

    // Still serving, and it counted what happened.
    let (status, resp) = inj
        .post(
            "/mutate?namespace-enabled=true",
            review_of(&serde_json::from_str(POD).unwrap(), "ok"),
        )
        .await;
    assert_eq!(
        (status, resp["response"]["allowed"].as_bool()),
        (200, Some(true))
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let inj = Injector::start();
    let old = inj.ca.clone();
    let new = write_cert(inj.dir.path());
    let mut ok = false;
    let mut last_err = String::new();
    for _ in 0..100 {
        match inj.post_trusting(&new, "/mutate", b"x".to_vec()).await {
            Ok(_) => {
                ok = true;
                break;
            }
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the new certificate was never served: {last_err}");
    assert!(
        inj.post_trusting(&old, "/mutate", b"x".to_vec())
            .await
            .is_err(),
        "the old certificate is still served"
    );
}

#[test]
fn inject_f_handles_every_workload_kind_in_one_stream() {
    let pod: Value = serde_json::from_str(POD).unwrap();
    let template = json!({"metadata": {"labels": {"app": "w"}}, "spec": pod["spec"]});
    let mut docs = vec![pod.clone()];
    for (kind, api) in [
        ("Deployment", "apps/v1"),
        ("StatefulSet", "apps/v1"),
        ("DaemonSet", "apps/v1"),
        ("ReplicaSet", "apps/v1"),
        ("Job", "batch/v1"),
    ] {
        docs.push(json!({"apiVersion": api, "kind": kind, "metadata": {"name": kind.to_lowercase()}, "spec": {"selector": {"matchLabels": {"app": "w"}}, "template": template}}));
    }
    docs.push(json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cron"}, "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}}));
    docs.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}}));
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-injector"))
        .args(["inject", "-f"])
        .arg(dir.path().join("all.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let results: Vec<Value> = serde_yaml::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(results.len(), docs.len());
    for r in &results[..7] {
        let t = match r["kind"].as_str().unwrap() {
            "Pod" => r.clone(),
            "CronJob" => r["spec"]["jobTemplate"]["spec"]["template"].clone(),
            _ => r["spec"]["template"].clone(),
        };
        assert_eq!(
            t["spec"]["initContainers"][1]["name"], "ferry-proxy",
            "{}",
            r["kind"]
        );
    }
    assert_eq!(results[7], docs[7], "a Service passes through untouched");
    let all = dir.path().join("out.yaml");
    std::fs::write(&all, &stdout).unwrap();
    let v = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&all)
        .output()
        .expect("kubernetes-validate");
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    // A bad annotation stops the whole run with its reason, and nothing is printed.
    std::fs::write(dir.path().join("bad.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {ferry.dev/retries: lots}}\nspec: {containers: [{name: a, image: x}]}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-injector"))
        .args(["inject", "-f"])
        .arg(dir.path().join("bad.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ferry.dev/retries: \"lots\" is not a retry count")
    );
}

#[tokio::test]
async fn only_a_create_is_mutated_other_operations_pass_unchanged() {
    let inj = Injector::start();
    let pod: Value = serde_json::from_str(POD).unwrap();
    // The control: the same pod, created, is injected.
    let (_, resp) = inj
        .post("/mutate?namespace-enabled=true", review_of(&pod, "c"))
        .await;
    assert!(patch_bytes(&resp).is_some(), "{resp}");

    let mut dying = pod.clone();
    dying["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    // Each carries a pod the injector would inject, so only the operation decides.
    for (op, object, old, options) in [
        ("UPDATE", pod.clone(), pod.clone(), "UpdateOptions"),
        ("DELETE", dying, pod.clone(), "DeleteOptions"),
        ("DELETE", Value::Null, pod.clone(), "DeleteOptions"),
        ("CONNECT", pod.clone(), Value::Null, "PodExecOptions"),
    ] {
        let mut review = review_value(&pod, op);
        review["request"]["operation"] = json!(op);
        review["request"]["object"] = object;
        review["request"]["oldObject"] = old;
        review["request"]["options"]["kind"] = json!(options);
        let (status, resp) = inj
            .post(
                "/mutate?namespace-enabled=true",
                serde_json::to_vec(&review).unwrap(),
            )
            .await;
        assert_eq!(status, 200, "{op}: {resp}");
        assert_eq!(resp["response"]["uid"], op, "{resp}");
        assert_eq!(resp["response"]["allowed"], true, "{op}: {resp}");
        assert!(resp["response"]["patch"].is_null(), "{op}: {resp}");
        assert!(resp["response"]["patchType"].is_null(), "{op}: {resp}");
        // Every label change on a running pod comes here: no warning noise for them.
        assert!(resp["response"]["warnings"].is_null(), "{op}: {resp}");
    }

    // An UPDATE is not judged either: bad annotations are the sidecar's to refuse live.
    let bad = pod_with(|p| p["metadata"]["annotations"]["ferry.dev/inject"] = json!("yes"));
    let mut review = review_value(&bad, "u-bad");
    review["request"]["operation"] = json!("UPDATE");
    review["request"]["oldObject"] = pod.clone();
    let (_, resp) = inj
        .post("/mutate", serde_json::to_vec(&review).unwrap())
        .await;
    assert_eq!(resp["response"]["allowed"], true, "{resp}");
    assert!(resp["response"]["patch"].is_null(), "{resp}");
}

#[tokio::test]
async fn pods_for_windows_nodes_are_skipped_with_a_warning_saying_why() {
    let inj = Injector::start();
    let os_in = |values: Value| json!({"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": values}]});
    let required = |terms: Vec<Value>| json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}});
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "nodeSelector",
            pod_with(|p| p["spec"]["nodeSelector"] = json!({"kubernetes.io/os": "windows"})),
            Some("spec.nodeSelector kubernetes.io/os: windows"),
        ),
        (
            "required affinity, one term",
            pod_with(|p| p["spec"]["affinity"] = required(vec![os_in(json!(["windows"]))])),
            Some("required node affinity admits only kubernetes.io/os: windows"),
        ),
        (
            "required affinity, every term windows",
            pod_with(|p| {
                let mut arm = os_in(json!(["windows"]));
                arm["matchExpressions"].as_array_mut().unwrap().push(
                    json!({"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"]}),
                );
                p["spec"]["affinity"] = required(vec![os_in(json!(["windows"])), arm]);
            }),
            Some("node affinity"),
        ),
        (
            "spec.os",
            pod_with(|p| p["spec"]["os"] = json!({"name": "windows"})),
            Some("spec.os.name: windows"),
        ),
        (
            "nodeSelector linux",
            pod_with(|p| p["spec"]["nodeSelector"] = json!({"kubernetes.io/os": "linux"})),
            None,
        ),
        (
            "affinity allows linux too",
            pod_with(|p| {
                p["spec"]["affinity"] = required(vec![os_in(json!(["windows", "linux"]))])
            }),
            None,
        ),
        (
            "one term of two allows linux",
            pod_with(|p| {
                p["spec"]["affinity"] =
                    required(vec![os_in(json!(["windows"])), os_in(json!(["linux"]))])
            }),
            None,
        ),
        (
            "windows only NotIn",
            pod_with(|p| {
                p["spec"]["affinity"] = required(vec![
                    json!({"matchExpressions": [{"key": "kubernetes.io/os", "operator": "NotIn", "values": ["windows"]}]}),
                ])
            }),
            None,
        ),
        (
            "windows only preferred",
            pod_with(
                |p| p["spec"]["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": os_in(json!(["windows"]))}]}}),
            ),
            None,
        ),
    ];
    for (what, pod, skipped) in cases {
        let (status, resp) = inj
            .post("/mutate?namespace-enabled=true", review_of(&pod, "w"))
            .await;
        assert_eq!(status, 200, "{what}");
        match skipped {
            Some(why) => {
                let w = skip_warning(&resp);
                assert!(
                    w.starts_with("ferry: not injected: the pod runs on Windows nodes (")
                        && w.contains(why)
                        && w.ends_with("the ferry sidecar is Linux-only"),
                    "{what}: {w}"
                );
            }
            None => {
                assert_eq!(resp["response"]["allowed"], true, "{what}: {resp}");
                let patched = apply(&pod, &resp);
                assert_eq!(
                    patched["spec"]["initContainers"][1]["name"], "ferry-proxy",
                    "{what}"
                );
            }
        }
    }
}

#[tokio::test]
async fn host_network_pods_are_skipped_with_a_warning() {
    let inj = Injector::start();
    // Even one asking for injection, and on a port the sidecar would need: it gets none.
    let pod = pod_with(|p| {
        p["spec"]["hostNetwork"] = json!(true);
        p["metadata"]["annotations"]["ferry.dev/inject"] = json!("enabled");
        p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 15001}]);
    });
    let (status, resp) = inj.post("/mutate", review_of(&pod, "hn")).await;
    assert_eq!(status, 200);
    assert_eq!(
        skip_warning(&resp),
        "ferry: not injected: pods with hostNetwork: true are not injected (their traffic is the node's)"
    );
}

#[tokio::test]
async fn a_container_on_a_port_the_sidecar_needs_is_refused_naming_both() {
    let inj = Injector::start();
    let ports = |p: &mut Value, which: &str, i: usize, ports: Value| {
        p["spec"][which][i]["ports"] = ports;
    };
    let refused: Vec<(&str, Value, &str)> = vec![
        (
            "app on the outbound port",
            pod_with(|p| {
                ports(
                    p,
                    "containers",
                    0,
                    json!([{"containerPort": 8080}, {"containerPort": 15001, "protocol": "TCP"}]),
                )
            }),
            "container \"app\" already uses port 15001, which the ferry sidecar needs (outbound listener)",
        ),
        (
            "an init container on the inbound port",
            pod_with(|p| ports(p, "initContainers", 0, json!([{"containerPort": 15006}]))),
            "init container \"migrate\" already uses port 15006, which the ferry sidecar needs (inbound listener)",
        ),
        (
            "two containers on two ports",
            pod_with(|p| {
                ports(
                    p,
                    "containers",
                    1,
                    json!([{"containerPort": 15000, "name": "metrics"}]),
                );
                ports(p, "containers", 0, json!([{"containerPort": 15006}]));
            }),
            "container \"app\" already uses port 15006, which the ferry sidecar needs (inbound listener); \
             container \"log-shipper\" already uses port 15000, which the ferry sidecar needs (admin API)",
        ),
        (
            "the admin port moved by ferry.dev/policy onto the app's",
            pod_with(|p| {
                p["metadata"]["annotations"]["ferry.dev/policy"] = json!("admin: 0.0.0.0:16000\n");
                ports(p, "containers", 0, json!([{"containerPort": 16000}]));
            }),
            "container \"app\" already uses port 16000, which the ferry sidecar needs (admin API)",
        ),
        (
            "the admin API turned off",
            pod_with(|p| {
                p["metadata"]["annotations"]["ferry.dev/policy"] = json!("admin: \"off\"\n")
            }),
            "ferry.dev/policy: admin: off leaves the sidecar without the admin API its probes need (/ready, /live); leave admin unset for 0.0.0.0:15000",
        ),
        (
            "the admin API on loopback",
            pod_with(|p| {
                p["metadata"]["annotations"]["ferry.dev/policy"] = json!("admin: 127.0.0.1:15000\n")
            }),
            "ferry.dev/policy: admin: 127.0.0.1:15000 is not reachable by the kubelet's probes, which come to the pod's IP; bind 0.0.0.0:15000 or leave admin unset",
        ),
        (
            "the admin API on the outbound listener",
            pod_with(|p| {
                p["metadata"]["annotations"]["ferry.dev/policy"] = json!("admin: 0.0.0.0:15001\n")
            }),
            "ferry.dev/policy: admin: 0.0.0.0:15001 is the sidecar's outbound listener port; pick another",
        ),
    ];
    for (what, pod, msg) in refused {
        let (status, resp) = inj
            .post("/mutate?namespace-enabled=true", review_of(&pod, "p"))
            .await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(denial(&resp), msg, "{what}");
    }

    // Not refused: UDP (the sidecar listens on TCP only), and a pod not being injected.
    let udp = pod_with(|p| {
        ports(
            p,
            "containers",
            0,
            json!([{"containerPort": 15001, "protocol": "UDP"}]),
        )
    });
    let (_, resp) = inj
        .post("/mutate?namespace-enabled=true", review_of(&udp, "udp"))
        .await;
    assert!(patch_bytes(&resp).is_some(), "{resp}");
    let clash = pod_with(|p| ports(p, "containers", 0, json!([{"containerPort": 15001}])));
    let (_, resp) = inj.post("/mutate", review_of(&clash, "off")).await;
    assert!(skip_warning(&resp).contains("not enabled"), "{resp}");

    // With the admin API moved, the app may have 15000, and everything follows the move.
    let moved = pod_with(|p| {
        p["metadata"]["annotations"]["ferry.dev/policy"] = json!("admin: 0.0.0.0:16000\n");
        ports(p, "containers", 0, json!([{"containerPort": 15000}]));
    });
    let (_, resp) = inj
        .post("/mutate?namespace-enabled=true", review_of(&moved, "mv"))
        .await;
    let patched = apply(&moved, &resp);
    let init = &patched["spec"]["initContainers"][0];
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--admin-port", "16000"]),
        "{args:?}"
    );
    let proxy = &patched["spec"]["initContainers"][1];
    assert_eq!(proxy["ports"][0]["containerPort"], 16000);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(proxy[probe]["httpGet"]["port"], 16000, "{probe}");
    }
    validate_pod(&patched);
}

#[tokio::test]
async fn an_annotation_the_sidecar_would_not_understand_is_refused_with_what_is_allowed() {
    let inj = Injector::start();
    let cases = [
        (
            "ferry.dev/inject",
            "yes",
            "ferry.dev/inject: \"yes\" is not an injection choice (allowed: enabled, disabled)",
        ),
        (
            "ferry.dev/sidecar-mode",
            "sidecar",
            "ferry.dev/sidecar-mode: \"sidecar\" is not a sidecar mode (allowed: native, container)",
        ),
        (
            "ferry.dev/lb",
            "fastest",
            "ferry.dev/lb: \"fastest\" is not a balancer (allowed: p2c-ewma, ",
        ),
        (
            "ferry.dev/lbb",
            "random",
            "ferry.dev/lbb: \"random\" is not a ferry annotation (known: ",
        ),
    ];
    for (key, value, msg) in cases {
        let pod = pod_with(|p| p["metadata"]["annotations"][key] = json!(value));
        let (status, resp) = inj
            .post("/mutate?namespace-enabled=true", review_of(&pod, "a"))
            .await;
        assert_eq!(status, 200, "{key}");
        let m = denial(&resp);
        assert!(m.contains(msg), "{key}: {m}");
    }
}

#[test]
fn inject_f_skips_windows_workloads_and_refuses_port_clashes() {
    let pod: Value = serde_json::from_str(POD).unwrap();
    let deployment = |name: &str, spec: &Value| json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": {"selector": {"matchLabels": {"app": "w"}}, "template": {"metadata": {"labels": {"app": "w"}}, "spec": spec}}});
    let mut win_spec = pod["spec"].clone();
    win_spec["nodeSelector"] = json!({"kubernetes.io/os": "windows"});
    let docs = [
        deployment("iis", &win_spec),
        deployment("web", &pod["spec"]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let run = |docs: &[Value]| {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
            .collect();
        std::fs::write(dir.path().join("in.yaml"), text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ferry-injector"))
            .args(["inject", "-f"])
            .arg(dir.path().join("in.yaml"))
            .output()
            .unwrap()
    };
    let out = run(&docs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Deployment iis: not injected: the pod runs on Windows nodes (spec.nodeSelector kubernetes.io/os: windows), and the ferry sidecar is Linux-only"),
        "{stderr}"
    );
    assert!(stderr.contains("Deployment web: injected"), "{stderr}");
    let results: Vec<Value> =
        serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
    assert_eq!(results[0], docs[0], "the Windows workload is untouched");
    assert_eq!(
        results[1]["spec"]["template"]["spec"]["initContainers"][1]["name"],
        "ferry-proxy"
    );

    // A clash stops the run, naming the document, workload, container and port.
    let mut clash_spec = pod["spec"].clone();
    clash_spec["initContainers"][0]["ports"] = json!([{"containerPort": 15000}]);
    let out = run(&[
        deployment("web", &pod["spec"]),
        deployment("batch", &clash_spec),
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "ferry-injector: document 2 (Deployment batch): init container \"migrate\" already uses port 15000, which the ferry sidecar needs (admin API)"
    );
}
