//! Network namespaces made by a test, joined by veth, removed on drop; and a way to
//! run async code inside one (a thread that enters the namespace with `setns`).

use std::process::Command;

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command runs")
}

pub fn must(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn is_root() -> bool {
    String::from_utf8_lossy(&sh(&["id", "-u"]).stdout).trim() == "0"
}

/// Namespaces to delete when the test ends, whatever happens.
pub struct Namespaces(pub Vec<String>);

impl Namespaces {
    /// `n` namespaces named `<prefix>-<pid>-<i>`.
    pub fn new(prefix: &str, n: usize) -> Namespaces {
        let ns = Namespaces(
            (0..n)
                .map(|i| format!("{prefix}-{}-{i}", std::process::id()))
                .collect(),
        );
        for name in &ns.0 {
            let _ = sh(&["ip", "netns", "del", name]);
            must(&["ip", "netns", "add", name]);
            must(&["ip", "-n", name, "link", "set", "lo", "up"]);
        }
        ns
    }

    pub fn name(&self, i: usize) -> &str {
        &self.0[i]
    }

    /// A veth pair between namespaces `a` and `b` with the given addresses (CIDR form).
    pub fn link(&self, a: usize, addr_a: &str, b: usize, addr_b: &str) -> (String, String) {
        let tag = format!("{}{a}{b}", std::process::id() % 100_000);
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        must(&[
            "ip", "link", "add", &va, "netns", &self.0[a], "type", "veth", "peer", "name", &vb,
            "netns", &self.0[b],
        ]);
        must(&["ip", "-n", &self.0[a], "addr", "add", addr_a, "dev", &va]);
        must(&["ip", "-n", &self.0[b], "addr", "add", addr_b, "dev", &vb]);
        must(&["ip", "-n", &self.0[a], "link", "set", &va, "up"]);
        must(&["ip", "-n", &self.0[b], "link", "set", &vb, "up"]);
        (va, vb)
    }

    /// Makes namespace `hub` the router of `spokes` (namespace, subnet): each spoke gets
    /// a veth to the hub, `<net>.<subnet>.2/24` on its side and `.1` on the hub's, and a
    /// default route through the hub, which forwards between them.
    pub fn star(&self, hub: usize, net: &str, spokes: &[(usize, usize)]) {
        for &(spoke, subnet) in spokes {
            let gw = format!("{net}.{subnet}.1");
            self.link(
                hub,
                &format!("{gw}/24"),
                spoke,
                &format!("{net}.{subnet}.2/24"),
            );
            must(&[
                "ip",
                "-n",
                &self.0[spoke],
                "route",
                "add",
                "default",
                "via",
                &gw,
            ]);
        }
        must(&[
            "ip",
            "netns",
            "exec",
            &self.0[hub],
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }

    /// Runs `f` on a new thread inside namespace `ns`, on its own runtime, to completion.
    pub fn run<T, F, Fut>(&self, ns: usize, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        self.thread(ns, f)
            .join()
            .expect("namespace thread panicked")
    }

    /// Starts `f` on a thread inside namespace `ns` and leaves it running.
    pub fn spawn<F, Fut>(&self, ns: usize, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        self.thread(ns, f);
    }

    fn thread<T, F, Fut>(&self, ns: usize, f: F) -> std::thread::JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let path = format!("/var/run/netns/{}", self.0[ns]);
        std::thread::spawn(move || {
            enter(&path);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
    }
}

fn enter(path: &str) {
    let f = std::fs::File::open(path).expect("namespace exists");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

/// A copy of the ferry binary the proxy's user (uid 1337) may run, and a folder it may
/// read, for a sidecar started with [`as_proxy_user`]. Keep the first folder alive.
pub fn ferry_for_proxy_user() -> (tempfile::TempDir, String, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for d in [&bin_dir, &dir] {
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin = bin_dir.path().join("ferry");
    std::fs::copy(env!("CARGO_BIN_EXE_ferry"), &bin).unwrap();
    let bin = bin.display().to_string();
    (bin_dir, bin, dir)
}

/// Runs a command inside namespace `ns` as the proxy's user, as the injected sidecar runs.
pub fn as_proxy_user(ns: &str) -> [&str; 10] {
    [
        "ip",
        "netns",
        "exec",
        ns,
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
    ]
}
