//! Runs the real `ferry-controller` binary against a test cluster.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `ferry-controller` binary, see [`workspace_bin`].
pub fn controller_bin() -> PathBuf {
    workspace_bin("ferry-controller", "ferry-controller")
}

/// Binary `bin` of workspace package `package`, beside the `ferry` one cargo built for
/// these tests, built (once per test process and binary) with the same profile: it belongs
/// to another package, so cargo does not build it for this package's tests by itself.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    // Held while building, so parallel tests do not start parallel cargo runs.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let ferry = Path::new(env!("CARGO_BIN_EXE_ferry"));
    let dir = ferry.parent().expect("the ferry binary has a folder");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // The same target folder as the tests', wherever that is.
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    // What cargo set for this test process is not the build's: with CARGO_MANIFEST_DIR
    // inherited, ring's build script counts as changed, and this build and every plain
    // `cargo build` would keep rebuilding the TLS stack for each other.
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(set_for_tests) {
            cmd.env_remove(k);
        }
    }
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = dir.join(bin);
    built.insert(bin.to_string(), path.clone());
    path
}

/// Variables cargo sets for a test process (never cargo configuration).
fn set_for_tests(var: &str) -> bool {
    const EXACT: [&str; 3] = [
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
    ];
    ["CARGO_PKG_", "CARGO_BIN_", "CARGO_MANIFEST_"]
        .iter()
        .any(|p| var.starts_with(p))
        || EXACT.contains(&var)
}

pub struct Controller {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Controller {
    /// Starts `prefix.. ferry-controller` with `KUBECONFIG=kubeconfig` and `args`, and
    /// returns once it listens (it serves answers once its watches have listed).
    pub fn start(kubeconfig: &Path, args: &[&str], prefix: &[&str]) -> Controller {
        let bin = controller_bin();
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.push(bin.display().to_string());
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("KUBECONFIG", kubeconfig)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ferry-controller starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut grpc, mut admin) = (None, None);
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(a) = line.strip_prefix("ferry-controller: listening grpc ") {
                grpc = a.parse().ok();
            }
            if let Some(a) = line.strip_prefix("ferry-controller: listening admin ") {
                admin = a.parse().ok();
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Controller {
            child,
            grpc: grpc.expect("ferry-controller printed its gRPC address"),
            admin: admin.expect("ferry-controller printed its admin address"),
        }
    }

    /// Waits for `/ready` (every watch has listed), from the caller's namespace.
    pub async fn wait_ready(&self, within: Duration) {
        wait_ready(self.admin, within).await
    }

    /// Like [`Controller::wait_ready`], from inside `cluster`'s network namespace.
    pub fn wait_ready_in(&self, cluster: &super::kube::Cluster, within: Duration) {
        let admin = self.admin;
        cluster.block_on(move || wait_ready(admin, within));
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for a controller's `/ready` at `admin` (every watch has listed).
pub async fn wait_ready(admin: std::net::SocketAddr, within: Duration) {
    let end = Instant::now() + within;
    loop {
        if super::raw(admin, "GET", "/ready", "").await.0 == 200 {
            return;
        }
        assert!(
            Instant::now() < end,
            "ferry-controller not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
