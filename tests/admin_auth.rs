//! The admin API from another host: a caller in a network namespace made by this test,
//! across a veth pair, may read but not change anything without the bearer token.
//! Needs root (CI runs as root); skipped with a message otherwise.

mod support;

use std::process::Command;

use support::Ferry;

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command runs")
}

fn is_root() -> bool {
    String::from_utf8_lossy(&sh(&["id", "-u"]).stdout).trim() == "0"
}

/// Two namespaces joined by veth: `srv` 10.250.91.1, `cli` 10.250.91.2. Removed on drop.
struct Pair {
    srv: String,
    cli: String,
}

impl Pair {
    fn new() -> Pair {
        let id = std::process::id() % 100_000;
        let p = Pair {
            srv: format!("fadm-s-{id}"),
            cli: format!("fadm-c-{id}"),
        };
        let (vs, vc) = (format!("fas{id}"), format!("fac{id}"));
        for cmd in [
            vec!["ip", "netns", "add", &p.srv],
            vec!["ip", "netns", "add", &p.cli],
            vec![
                "ip", "link", "add", &vs, "netns", &p.srv, "type", "veth", "peer", "name", &vc,
                "netns", &p.cli,
            ],
            vec![
                "ip",
                "-n",
                &p.srv,
                "addr",
                "add",
                "10.250.91.1/30",
                "dev",
                &vs,
            ],
            vec![
                "ip",
                "-n",
                &p.cli,
                "addr",
                "add",
                "10.250.91.2/30",
                "dev",
                &vc,
            ],
            vec!["ip", "-n", &p.srv, "link", "set", &vs, "up"],
            vec!["ip", "-n", &p.cli, "link", "set", &vc, "up"],
            vec!["ip", "-n", &p.srv, "link", "set", "lo", "up"],
            vec!["ip", "-n", &p.cli, "link", "set", "lo", "up"],
        ] {
            let out = sh(&cmd);
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        p
    }

    /// `curl` from the client namespace: the HTTP status code.
    fn curl(&self, args: &[&str]) -> String {
        let mut cmd = vec![
            "ip",
            "netns",
            "exec",
            &self.cli,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ];
        cmd.extend_from_slice(args);
        String::from_utf8_lossy(&sh(&cmd).stdout).into_owned()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.srv]);
        let _ = sh(&["ip", "netns", "del", &self.cli]);
    }
}

#[test]
fn a_remote_caller_reads_but_changes_only_with_the_token() {
    if !is_root() {
        eprintln!("skipped: needs root to create network namespaces (CI runs as root)");
        return;
    }
    let pair = Pair::new();
    let policy = "admin: 0.0.0.0:15000\nlisteners: [{name: web, bind: \"127.0.0.1:0\", service: web}]\nservices: {web: {endpoints: []}}\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
    let token_file = dir.path().join("token").display().to_string();
    let ferry = Ferry::start_in(
        dir,
        &["--admin-token-file", &token_file],
        &["ip", "netns", "exec", &pair.srv],
    );
    assert_eq!(ferry.addr("admin").port(), 15000);
    let base = "http://10.250.91.1:15000";

    assert_eq!(pair.curl(&[&format!("{base}/policy")]), "200");
    assert_eq!(pair.curl(&[&format!("{base}/ready")]), "200");
    let put = ["-X", "PUT", "--data", "defaults: {retries: 1}"];
    let url = format!("{base}/policy");
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = put.to_vec();
        a.extend_from_slice(extra);
        a.push(&url);
        pair.curl(&a)
    };
    assert_eq!(with(&[]), "401");
    assert_eq!(with(&["-H", "Authorization: Bearer wrong"]), "403");
    assert_eq!(
        pair.curl(&["-X", "POST", &format!("{base}/shutdown")]),
        "401"
    );
    assert_eq!(
        pair.curl(&["-X", "PUT", "--data", "debug", &format!("{base}/log-level")]),
        "401"
    );
    assert_eq!(with(&["-H", "Authorization: Bearer s3cret"]), "200");
}
