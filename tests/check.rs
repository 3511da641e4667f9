//! `ferry check` judges a policy file or an annotations file the way the sidecar would,
//! and exits non-zero with every problem, each naming its field and value.

use std::process::Command;

fn check(name: &str, text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join(name);
    std::fs::write(&f, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("check")
        .arg(&f)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_policy_passes_and_a_bad_one_lists_every_problem() {
    let (ok, out, _) = check(
        "good.yaml",
        "listeners: [{name: web, bind: \"127.0.0.1:4140\", service: web}]\nservices: {web: {endpoints: [\"127.0.0.1:8080\"]}}\n",
    );
    assert!(ok);
    assert!(out.contains("valid (1 listeners, 1 services)"), "{out}");

    let (ok, _, err) = check(
        "bad.yaml",
        "listeners: [{name: web, bind: \"127.0.0.1:4140\", service: nope}]\nservices: {web: {timeout: banana, lb: fastest}}\n",
    );
    assert!(!ok);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("services.web.timeout: \"banana\" is not a duration"),
        "{err}"
    );
    assert!(
        err.contains("services.web.lb: \"fastest\" is not a balancer"),
        "{err}"
    );
}

#[test]
fn an_annotations_file_is_checked_as_annotations() {
    let (ok, _, _) = check(
        "annotations",
        "app=\"web\"\nferry.dev/lb=\"round-robin\"\nferry.dev/timeout=\"2s\"\n",
    );
    assert!(ok);
    let (ok, _, err) = check(
        "annotations",
        "ferry.dev/timeout=\"banana\"\nferry.dev/skip-outbound-ports=\"80,http\"\n",
    );
    assert!(!ok);
    assert!(
        err.contains(
            "ferry.dev/timeout: \"banana\" is not a duration (examples: 250ms, 2s, or off)"
        ),
        "{err}"
    );
    assert!(
        err.contains("ferry.dev/skip-outbound-ports: \"80,http\""),
        "{err}"
    );
}
