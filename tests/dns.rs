//! DNS discovery against a real DNS server: dnsmasq answers inside a network namespace
//! made by this test (whose resolv.conf `ip netns exec` points at it), and ferry follows
//! the answers as they change. Needs root; skipped otherwise.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::netns::{Namespaces, is_root};
use support::{Ferry, eventually, raw};

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf.
struct Resolv(std::path::PathBuf);

impl Drop for Resolv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dns_endpoints_follow_the_answers() {
    if !is_root() {
        eprintln!(
            "skipped: needs root for a network namespace with its own resolver (CI runs as root)"
        );
        return;
    }
    let ns = Namespaces::new("ferry-dns", 1);
    let etc = std::path::PathBuf::from(format!("/etc/netns/{}", ns.name(0)));
    std::fs::create_dir_all(&etc).unwrap();
    let _resolv = Resolv(etc.clone());
    std::fs::write(
        etc.join("resolv.conf"),
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.2 web.mesh.test\n127.0.0.3 web.mesh.test\n").unwrap();
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(0),
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--local-ttl=0",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is installed (apt-get install dnsmasq-base; tests/run.sh does)");
    let dnsmasq = Dnsmasq(dnsmasq);

    // Two upstreams on loopback addresses inside the namespace.
    ns.spawn(0, || async {
        for (ip, name) in [("127.0.0.2", "two"), ("127.0.0.3", "three")] {
            let l = tokio::net::TcpListener::bind((ip, 8080)).await.unwrap();
            tokio::spawn(ferry_demo::serve_http(name.into(), l));
        }
        std::future::pending::<()>().await
    });

    let policy = "admin: 127.0.0.1:15000\nlisteners: [{name: web, bind: \"127.0.0.1:4140\", service: web}]\n\
                  services: {web: {lb: round-robin, dns: \"web.mesh.test:8080\"}}\n";
    let _ferry = Ferry::start(
        policy,
        &["--dns-refresh", "200ms"],
        &["ip", "netns", "exec", ns.name(0)],
    );
    let web: SocketAddr = "127.0.0.1:4140".parse().unwrap();

    let answers = |n: usize| {
        ns.run(0, move || async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..n {
                let (status, body) = raw(web, "GET", "/", "").await;
                if status == 200 {
                    seen.insert(body.trim().to_string());
                }
            }
            seen
        })
    };
    let both: std::collections::BTreeSet<String> =
        ["hello from three".to_string(), "hello from two".to_string()].into();
    let mut ok = false;
    for _ in 0..50 {
        if answers(4) == both {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "both DNS answers never became endpoints");

    // The name now answers with one address: ferry follows, without a reload.
    std::fs::write(&hosts, "127.0.0.3 web.mesh.test\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &dnsmasq.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let followed = rt.block_on(eventually(Duration::from_secs(10), || async {
        answers(6) == ["hello from three".to_string()].into()
    }));
    assert!(
        followed,
        "ferry kept sending to an address DNS no longer gives"
    );
}
