//! Each balancer shows its characteristic property through the real sidecar.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::{Conn, Ferry, eventually, slow_upstream, upstream};

fn policy(lb: &str, extra: &str, eps: &[SocketAddr]) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: web, bind: \"127.0.0.1:0\", service: web}}]\n\
         services:\n  web:\n    lb: {lb}\n{extra}    endpoints: [{}]\n",
        eps.join(", ")
    )
}

async fn spread(f: &Ferry, n: usize, conns: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let web = f.addr("web");
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(web).await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..n / conns {
                let (status, body) = c.get("/").await.unwrap();
                assert_eq!(status, 200);
                seen.push(body);
            }
            seen
        }));
    }
    let mut counts = HashMap::new();
    for t in tasks {
        for b in t.await.unwrap() {
            *counts.entry(b).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn round_robin_spreads_exactly_evenly() {
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    ];
    let f = Ferry::start(&policy("round-robin", "", &ups.map(|u| u.addr)), &[], &[]);
    let counts = spread(&f, 300, 1).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [100, 100, 100],
        "{counts:?}"
    );
}

#[tokio::test]
async fn random_reaches_every_endpoint() {
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    ];
    let f = Ferry::start(&policy("random", "", &ups.map(|u| u.addr)), &[], &[]);
    let counts = spread(&f, 300, 1).await;
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&c| c > 50), "{counts:?}");
}

/// A slow endpoint gets clearly less of the load under the load-aware balancers.
#[tokio::test]
async fn p2c_ewma_and_least_request_move_load_off_a_slow_endpoint() {
    for lb in ["p2c-ewma", "least-request"] {
        let fast = upstream("fast").await;
        let slow = slow_upstream("slow", Duration::from_millis(50)).await;
        let f = Ferry::start(&policy(lb, "", &[fast.addr, slow.addr]), &[], &[]);
        let counts = spread(&f, 400, 8).await;
        let fast_share = counts.get("fast").copied().unwrap_or(0) as f64 / 400.0;
        assert!(
            fast_share > 0.7,
            "{lb}: fast endpoint got {fast_share:.2} ({counts:?})"
        );
    }
}

async fn owners(f: &Ferry, keys: usize) -> Vec<String> {
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    let mut out = Vec::new();
    for k in 0..keys {
        let (status, _, body) = c
            .get_with("/", &[("x-user-id", &format!("user-{k}"))])
            .await
            .unwrap();
        assert_eq!(status, 200);
        out.push(body);
    }
    out
}

/// A key stays on one endpoint; when one of five endpoints leaves, only its keys move.
#[tokio::test]
async fn ring_hash_and_maglev_keep_keys_and_remap_about_a_fifth() {
    for lb in ["ring-hash", "maglev"] {
        let names = ["e0", "e1", "e2", "e3", "e4"];
        let mut ups = Vec::new();
        for n in names {
            ups.push(upstream(n).await);
        }
        let all: Vec<_> = ups.iter().map(|u| u.addr).collect();
        let extra = "    hash-on: header:x-user-id\n";
        let f = Ferry::start(&policy(lb, extra, &all), &["--watch-interval", "50ms"], &[]);
        let first = owners(&f, 400).await;
        assert_eq!(
            first,
            owners(&f, 400).await,
            "{lb}: a key changed endpoint with nothing changed"
        );
        let used: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(used.len(), 5, "{lb}: keys should reach all endpoints");

        // e4 leaves (a reload, no restart).
        let v = f.policy_version().await;
        support::write_atomically(&f.path("policy.yaml"), &policy(lb, extra, &all[..4]));
        assert!(
            eventually(Duration::from_secs(10), || async {
                f.policy_version().await > v
            })
            .await
        );
        let second = owners(&f, 400).await;
        let moved = first.iter().zip(&second).filter(|(a, b)| a != b).count();
        let on_e4 = first.iter().filter(|o| *o == "e4").count();
        let needless = first
            .iter()
            .zip(&second)
            .filter(|(a, b)| *a != "e4" && a != b)
            .count();
        assert!(second.iter().all(|o| o != "e4"), "{lb}");
        assert!(
            (40..=140).contains(&on_e4),
            "{lb}: {on_e4} of 400 keys were on e4"
        );
        assert!(
            needless <= 20,
            "{lb}: {needless} keys moved that did not live on e4 ({moved} moved)"
        );
    }
}
