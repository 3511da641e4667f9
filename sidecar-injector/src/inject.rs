//! The injector's core, a pure function: a pod and the injector's settings in; the
//! injected pod, a reason not to inject, or a refusal out. No Kubernetes API calls.

use std::collections::BTreeMap;

use ferry_policy::annotations::{PodAnnotations, SidecarMode};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, NodeSelectorTerm, ObjectFieldSelector, Pod, PodSpec, Probe,
    ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const INJECT: &str = "ferry.dev/inject";
pub const INJECTED: &str = "ferry.dev/injected";
pub use ferry_policy::contract::{INIT_CONTAINER as INIT, PROXY_CONTAINER as PROXY};
pub const PODINFO: &str = "ferry-podinfo";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The sidecar's ports in a pod. `ferry init` redirects to the two listeners, so they are
/// fixed; the admin API (probed by the kubelet) moves with `admin:` in `ferry.dev/policy`.
pub use ferry_policy::contract::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT};

/// Node labels that name the OS (the beta one is still set by older kubelets).
const OS_LABELS: [&str; 2] = ["kubernetes.io/os", "beta.kubernetes.io/os"];

/// What the injector adds, and where it refuses to.
#[derive(Clone, Debug)]
pub struct Config {
    pub image: String,
    pub image_pull_policy: String,
    pub excluded_namespaces: Vec<String>,
    pub sidecar_mode: SidecarMode,
    pub proxy_uid: i64,
    pub proxy_cpu: String,
    pub proxy_memory: String,
    /// Where sidecars send spans (`OTEL_EXPORTER_OTLP_ENDPOINT`), if anywhere.
    pub otlp_endpoint: Option<String>,
    /// The discovery controller sidecars ask for Service endpoints (`FERRY_CONTROLLER`).
    pub controller: Option<String>,
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            image: format!("ghcr.io/ferry-mesh/ferry:{VERSION}"),
            image_pull_policy: "IfNotPresent".into(),
            excluded_namespaces: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
            sidecar_mode: SidecarMode::Native,
            proxy_uid: ferry_policy::contract::PROXY_UID.into(),
            proxy_cpu: "100m".into(),
            proxy_memory: "64Mi".into(),
            otlp_endpoint: None,
            controller: None,
            log_level: "info".into(),
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Injected(Box<Pod>),
    /// Left alone, and why (shown to the user as an admission warning).
    Skipped(String),
}

/// A pod that must not be admitted as it is: bad `ferry.dev/` annotations, or ports the
/// sidecar needs already taken.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn annotations(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.annotations.clone().unwrap_or_default()
}

/// Decides and, when it should, injects. `namespace_enabled` says whether the pod's
/// namespace carries `ferry.dev/inject=enabled` (the webhook's namespaceSelector knows).
pub fn inject(
    pod: &Pod,
    namespace: &str,
    namespace_enabled: bool,
    cfg: &Config,
) -> Result<Outcome, Refusal> {
    let ann = annotations(pod);
    let wanted = match ann.get(INJECT).map(|v| v.trim()) {
        Some("enabled") => true,
        Some("disabled") => {
            return Ok(Outcome::Skipped(format!(
                "{INJECT} is disabled on this pod"
            )));
        }
        Some(other) => {
            return Err(Refusal(format!(
                "{INJECT}: {other:?} is not an injection choice (allowed: enabled, disabled)"
            )));
        }
        None => namespace_enabled,
    };
    if !wanted {
        return Ok(Outcome::Skipped(
            "injection is not enabled for this pod or its namespace".into(),
        ));
    }
    if cfg.excluded_namespaces.iter().any(|n| n == namespace) {
        return Ok(Outcome::Skipped(format!(
            "namespace {namespace} is excluded from injection"
        )));
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(
            "pods with hostNetwork: true are not injected (their traffic is the node's)".into(),
        ));
    }
    if let Some(why) = windows_only(&spec) {
        return Ok(Outcome::Skipped(format!(
            "the pod runs on Windows nodes ({why}), and the ferry sidecar is Linux-only"
        )));
    }
    let has_proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY);
    if ann.contains_key(INJECTED) || has_proxy {
        return Ok(Outcome::Skipped("the pod is already injected".into()));
    }
    let parsed = PodAnnotations::from_map(&ann).map_err(|e| {
        Refusal(format!(
            "invalid ferry annotations: {}",
            e.iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    let admin = admin_port(&parsed)?;
    // Two processes in one network namespace cannot listen on one port: one of them
    // would crash-loop, so the pod is refused now rather than broken later.
    let clashes = port_clashes(&spec, admin);
    if !clashes.is_empty() {
        return Err(Refusal(clashes.join("; ")));
    }

    let mut out = pod.clone();
    let mode = parsed.sidecar_mode.unwrap_or(cfg.sidecar_mode);
    let spec = out.spec.get_or_insert_with(Default::default);
    let proxy = proxy_container(pod, &parsed, mode, admin, cfg);
    let init = init_container(&parsed, admin, cfg);
    let mut inits = vec![init];
    if mode == SidecarMode::Native {
        // Right after the redirect, so later init containers already go through it.
        inits.push(proxy.clone());
    }
    inits.extend(spec.init_containers.take().unwrap_or_default());
    spec.init_containers = Some(inits);
    if mode == SidecarMode::Container {
        spec.containers.push(proxy);
    }
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: PODINFO.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "annotations".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.annotations".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    out.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED.into(), VERSION.into());
    Ok(Outcome::Injected(Box::new(out)))
}

/// Why the pod can only run on Windows nodes, if so: the sidecar and `ferry init`
/// (iptables) are Linux-only, and the API server rejects Linux security settings in a
/// pod with `spec.os.name: windows`.
fn windows_only(spec: &PodSpec) -> Option<String> {
    if spec.os.as_ref().is_some_and(|os| os.name == "windows") {
        return Some("spec.os.name: windows".into());
    }
    if let Some((k, _)) = spec
        .node_selector
        .iter()
        .flatten()
        .find(|(k, v)| OS_LABELS.contains(&k.as_str()) && v.as_str() == "windows")
    {
        return Some(format!("spec.nodeSelector {k}: windows"));
    }
    let terms = spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .as_slice();
    // Terms are alternatives: Windows only if every one of them demands it.
    let windows_term = |t: &NodeSelectorTerm| {
        t.match_expressions.iter().flatten().any(|e| {
            OS_LABELS.contains(&e.key.as_str())
                && e.operator == "In"
                && e.values
                    .as_ref()
                    .is_some_and(|v| !v.is_empty() && v.iter().all(|x| x == "windows"))
        })
    };
    (!terms.is_empty() && terms.iter().all(windows_term))
        .then(|| "its required node affinity admits only kubernetes.io/os: windows".into())
}

/// The admin API's port as the sidecar will bind it, or why the kubelet could not probe it.
fn admin_port(ann: &PodAnnotations) -> Result<u16, Refusal> {
    let Some(admin) = ann.policy.as_ref().and_then(|p| p.admin) else {
        return Ok(ADMIN_PORT);
    };
    let bad = |why: String| Err(Refusal(format!("ferry.dev/policy: admin: {why}")));
    let Some(addr) = admin else {
        return bad(format!(
            "off leaves the sidecar without the admin API its probes need (/ready, /live); \
             leave admin unset for 0.0.0.0:{ADMIN_PORT}"
        ));
    };
    if !addr.ip().is_unspecified() {
        return bad(format!(
            "{addr} is not reachable by the kubelet's probes, which come to the pod's IP; \
             bind 0.0.0.0:{} or leave admin unset",
            addr.port()
        ));
    }
    match addr.port() {
        0 => bad(format!(
            "{addr} picks a random port, which the kubelet cannot probe; name a port"
        )),
        p @ (OUTBOUND_PORT | INBOUND_PORT) => bad(format!(
            "{addr} is the sidecar's {} listener port; pick another",
            if p == OUTBOUND_PORT {
                "outbound"
            } else {
                "inbound"
            }
        )),
        p => Ok(p),
    }
}

/// Each container port the sidecar needs but a container already declares. Only TCP:
/// the sidecar listens on nothing else.
fn port_clashes(spec: &PodSpec, admin: u16) -> Vec<String> {
    let needed = [
        (admin, "admin API"),
        (OUTBOUND_PORT, "outbound listener"),
        (INBOUND_PORT, "inbound listener"),
    ];
    let containers = spec.containers.iter().map(|c| ("container", c)).chain(
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| ("init container", c)),
    );
    let mut out = Vec::new();
    for (kind, c) in containers {
        for p in c.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Some((port, role)) = needed
                .iter()
                .find(|(n, _)| i32::from(*n) == p.container_port)
            else {
                continue;
            };
            let msg = format!(
                "{kind} {:?} already uses port {port}, which the ferry sidecar needs ({role})",
                c.name
            );
            if !out.contains(&msg) {
                out.push(msg);
            }
        }
    }
    out
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, admin: u16, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(admin.into()),
            ..Default::default()
        }),
        period_seconds: Some(1),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

/// The name traces show for this workload.
fn service_name(pod: &Pod) -> String {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .cloned()
        .or_else(|| {
            pod.metadata
                .generate_name
                .as_ref()
                .map(|g| g.trim_end_matches('-').to_string())
        })
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_else(|| "ferry".into())
}

/// The pod's workload as Istio names it: a Deployment's pods are `<name>-<hash>-xxxxx`
/// (the hash is the `pod-template-hash` label), other controllers' `<name>-xxxxx`.
fn workload_name(pod: &Pod) -> String {
    let m = &pod.metadata;
    let hash = m.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
    match (&m.generate_name, hash) {
        (Some(g), Some(h)) => g
            .strip_suffix(&format!("-{h}-"))
            .unwrap_or(g.trim_end_matches('-'))
            .to_string(),
        (Some(g), None) => g.trim_end_matches('-').to_string(),
        _ => m.name.clone().unwrap_or_else(|| "unknown".into()),
    }
}

fn proxy_container(
    pod: &Pod,
    ann: &PodAnnotations,
    mode: SidecarMode,
    admin: u16,
    cfg: &Config,
) -> Container {
    let cpu = ann
        .proxy_cpu
        .clone()
        .unwrap_or_else(|| cfg.proxy_cpu.clone());
    let memory = ann
        .proxy_memory
        .clone()
        .unwrap_or_else(|| cfg.proxy_memory.clone());
    let mut envs = vec![
        field_env("FERRY_POD_NAME", "metadata.name"),
        field_env("FERRY_POD_NAMESPACE", "metadata.namespace"),
        field_env("FERRY_POD_IP", "status.podIP"),
        // The node tells the controller where the caller is (locality).
        field_env("FERRY_NODE_NAME", "spec.nodeName"),
        env("FERRY_LOG", &cfg.log_level),
        env("OTEL_SERVICE_NAME", &service_name(pod)),
        // Istio's workload label, for `metrics-compat: istio`.
        env("FERRY_WORKLOAD", &workload_name(pod)),
    ];
    if let Some(c) = &cfg.controller {
        envs.push(env("FERRY_CONTROLLER", c));
    }
    if let Some(e) = &cfg.otlp_endpoint {
        envs.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", e));
        envs.push(env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"));
    }
    Container {
        name: PROXY.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(vec![
            "proxy".into(),
            "--annotations".into(),
            ferry_policy::contract::ANNOTATIONS_FILE.into(),
        ]),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some("ferry-admin".into()),
            container_port: admin.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity(cpu)),
                ("memory".into(), Quantity(memory.clone())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity(memory))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_group: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: PODINFO.into(),
            mount_path: ferry_policy::contract::PODINFO_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        startup_probe: Some(http_probe("/ready", admin, 60)),
        readiness_probe: Some(http_probe("/ready", admin, 3)),
        liveness_probe: Some(http_probe("/live", admin, 10)),
        restart_policy: (mode == SidecarMode::Native).then(|| "Always".into()),
        ..Default::default()
    }
}

fn list(v: &[impl ToString]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn init_container(ann: &PodAnnotations, admin: u16, cfg: &Config) -> Container {
    let mut args: Vec<String> = vec![
        "init".into(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--admin-port".into(),
        admin.to_string(),
        "--proxy-uid".into(),
        cfg.proxy_uid.to_string(),
    ];
    let r = &ann.redirect;
    if !r.skip_outbound_ports.is_empty() {
        args.extend(["--skip-outbound-ports".into(), list(&r.skip_outbound_ports)]);
    }
    if !r.skip_inbound_ports.is_empty() {
        args.extend(["--skip-inbound-ports".into(), list(&r.skip_inbound_ports)]);
    }
    if !r.skip_outbound_cidrs.is_empty() {
        args.extend(["--skip-outbound-cidrs".into(), list(&r.skip_outbound_cidrs)]);
    }
    Container {
        name: INIT.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The JSON patch that turns `before` into `after` (what [`inject`] made of it), as
/// explicit additions. A diff would rewrite the pod's own init containers position by
/// position, and any field this crate's model of a container does not know (a newer
/// API server's) would move onto ferry's container and be lost from the user's.
pub fn patch(before: &Pod, after: &Pod) -> json_patch::Patch {
    fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).expect("a pod's parts serialise")
    }
    let mut ops: Vec<serde_json::Value> = Vec::new();
    let mut add = |path: String, value: serde_json::Value| {
        ops.push(serde_json::json!({"op": "add", "path": path, "value": value}));
    };
    match (&before.spec, &after.spec) {
        (None, Some(a)) => add("/spec".into(), json(a)),
        (Some(b), Some(a)) => {
            // Ferry's init containers go first; the pod's own follow unchanged.
            let (bi, ai) = (
                b.init_containers.as_deref().unwrap_or_default(),
                a.init_containers.as_deref().unwrap_or_default(),
            );
            let ours = &ai[..ai.len().saturating_sub(bi.len())];
            if b.init_containers.is_none() {
                if !ours.is_empty() {
                    add("/spec/initContainers".into(), json(&ours.to_vec()));
                }
            } else {
                for (i, c) in ours.iter().enumerate() {
                    add(format!("/spec/initContainers/{i}"), json(c));
                }
            }
            for c in a.containers.iter().skip(b.containers.len()) {
                add("/spec/containers/-".into(), json(c));
            }
            let bv = b.volumes.as_deref().unwrap_or_default();
            let new_volumes: Vec<_> = a.volumes.iter().flatten().skip(bv.len()).cloned().collect();
            if b.volumes.is_none() {
                if !new_volumes.is_empty() {
                    add("/spec/volumes".into(), json(&new_volumes));
                }
            } else {
                for v in &new_volumes {
                    add("/spec/volumes/-".into(), json(v));
                }
            }
        }
        _ => {}
    }
    let (ba, aa) = (&before.metadata.annotations, &after.metadata.annotations);
    let new: BTreeMap<&String, &String> = aa
        .iter()
        .flatten()
        .filter(|(k, v)| ba.as_ref().and_then(|b| b.get(*k)) != Some(*v))
        .collect();
    if ba.is_none() {
        if !new.is_empty() {
            add("/metadata/annotations".into(), json(&new));
        }
    } else {
        for (k, v) in new {
            let key = k.replace('~', "~0").replace('/', "~1");
            add(format!("/metadata/annotations/{key}"), json(v));
        }
    }
    serde_json::from_value(serde_json::Value::Array(ops)).expect("add operations form a patch")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_workload_is_named_as_istio_names_it() {
        let pod = |meta: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": meta, "spec": {"containers": []}})).unwrap()
        };
        let deployment = pod(json!({
            "generateName": "checkout-7d9f8b6c5-",
            "labels": {"pod-template-hash": "7d9f8b6c5"},
        }));
        assert_eq!(workload_name(&deployment), "checkout");
        assert_eq!(workload_name(&pod(json!({"generateName": "db-"}))), "db");
        assert_eq!(workload_name(&pod(json!({"name": "solo"}))), "solo");
    }

    /// The patch only adds: the pod's own containers, with fields this crate does not
    /// model, come through untouched behind ferry's.
    #[test]
    fn the_patch_adds_and_never_rewrites_the_pods_own_containers() {
        let raw = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "annotations": {"ferry.dev/inject": "enabled"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "m", "futureField": {"x": 1}}],
                "containers": [{"name": "app", "image": "a", "futureField": true}],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        });
        let pod: Pod = serde_json::from_value(raw.clone()).unwrap();
        let Ok(Outcome::Injected(after)) = inject(&pod, "shop", false, &Config::default()) else {
            panic!("not injected");
        };
        let mut patched = raw.clone();
        json_patch::patch(&mut patched, &patch(&pod, &after)).unwrap();
        let inits = patched["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<_> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, [INIT, PROXY, "migrate"]);
        assert_eq!(
            inits[2], raw["spec"]["initContainers"][0],
            "the pod's own, untouched"
        );
        assert!(inits[0].get("futureField").is_none());
        assert_eq!(patched["spec"]["containers"], raw["spec"]["containers"]);
        let vols: Vec<_> = patched["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(vols, ["data", PODINFO]);
        assert_eq!(
            patched["metadata"]["annotations"]["ferry.dev/inject"],
            "enabled"
        );
        assert_eq!(patched["metadata"]["annotations"][INJECTED], VERSION);
        // What the API server stores is what the injector meant.
        let stored: Pod = serde_json::from_value(patched).unwrap();
        assert_eq!(stored, *after);

        // A pod with none of the lists gets them whole.
        let bare = json!({"metadata": {"name": "b", "annotations": {"ferry.dev/inject": "enabled"}},
                          "spec": {"containers": [{"name": "app", "image": "a"}]}});
        let pod: Pod = serde_json::from_value(bare.clone()).unwrap();
        let Ok(Outcome::Injected(after)) = inject(&pod, "shop", false, &Config::default()) else {
            panic!("not injected");
        };
        let mut patched = bare;
        json_patch::patch(&mut patched, &patch(&pod, &after)).unwrap();
        assert_eq!(serde_json::from_value::<Pod>(patched).unwrap(), *after);
    }
}
