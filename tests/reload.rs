//! Hot reload: policy changes through the admin API and the watched files take effect
//! for the next request, while a bounded load runs through the real sidecar without a
//! single failed request; bad candidates are refused and the running policy stays.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::{Conn, Ferry, eventually, upstream, write_atomically};

fn policy(lb: &str, timeout: &str, endpoints: &[std::net::SocketAddr]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: web, bind: \"127.0.0.1:0\", service: web}}]\n\
         services:\n  web:\n    lb: {lb}\n    timeout: {timeout}\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

/// What `/endpoints` says about the `web` service: its balancer and addresses.
async fn web_state(f: &Ferry) -> (String, BTreeSet<String>) {
    let (_, e) = f.admin("GET", "/endpoints", "").await;
    let web = &e["services"]["web"];
    let addrs = web["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["address"].as_str().unwrap().to_string())
        .collect();
    (web["lb"].as_str().unwrap().to_string(), addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_policy_changes_under_load_drop_no_request() {
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    ];
    let all: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let f = Ferry::start(
        &policy("round-robin", "2s", &all),
        &["--watch-files", "poll", "--watch-interval", "50ms"],
        &[],
    );
    let web = f.addr("web");

    // 20 000 requests over 16 keep-alive connections.
    const CONNS: u64 = 16;
    const PER_CONN: u64 = 1250;
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..CONNS {
        let (failures, done) = (failures.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut c = Conn::open(web).await.unwrap();
            for _ in 0..PER_CONN {
                match c.get("/").await {
                    Ok((200, _)) => {}
                    other => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed request: {other:?}");
                        if other.is_err() {
                            c = Conn::open(web).await.unwrap();
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let lbs = [
        "round-robin",
        "least-request",
        "random",
        "p2c-ewma",
        "ring-hash",
        "maglev",
    ];
    let timeouts = ["1s", "2s", "3s"];
    let subsets: [&[usize]; 4] = [&[0, 1, 2], &[0, 1], &[1, 2], &[0, 2]];
    let mut changes = 0;
    let done_before_changes = done.load(Ordering::Relaxed);
    for i in 0..110usize {
        let lb = lbs[i % lbs.len()];
        let timeout = timeouts[i % timeouts.len()];
        let eps: Vec<_> = subsets[i % subsets.len()].iter().map(|&j| all[j]).collect();
        let before = f.policy_version().await;
        if i % 10 == 9 {
            // Every tenth change goes through the watched policy file, with the admin
            // layer cleared first so it does not hide the file's values.
            let (status, _) = f.admin("PUT", "/policy", "{}").await;
            assert_eq!(status, 200);
            let before = before + 1;
            write_atomically(&f.path("policy.yaml"), &policy(lb, timeout, &eps));
            assert!(
                eventually(Duration::from_secs(10), || async {
                    f.policy_version().await > before
                })
                .await,
                "file change {i} was not picked up"
            );
        } else {
            let doc = format!(
                "services: {{web: {{lb: {lb}, timeout: {timeout}, endpoints: [{}]}}}}",
                eps.iter()
                    .map(|e| format!("\"{e}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let (status, body) = f.admin("PUT", "/policy", &doc).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["version"].as_u64().unwrap(), before + 1);
        }
        // The change took effect: the balancer and endpoint set are the new ones ...
        let want: BTreeSet<String> = eps.iter().map(|e| e.to_string()).collect();
        let (got_lb, got_eps) = web_state(&f).await;
        assert_eq!((got_lb.as_str(), &got_eps), (lb, &want), "change {i}");
        let (_, p) = f.admin("GET", "/policy", "").await;
        assert_eq!(
            p["policy"]["services"]["web"]["timeout"], timeout,
            "change {i}"
        );
        // ... and the next requests only reach endpoints of the new set.
        let names: BTreeSet<String> = subsets[i % subsets.len()]
            .iter()
            .map(|&j| ["a", "b", "c"][j].to_string())
            .collect();
        let mut probe = Conn::open(web).await.unwrap();
        for _ in 0..6 {
            let (status, body) = probe.get("/").await.unwrap();
            assert_eq!(status, 200);
            assert!(
                names.contains(&body),
                "change {i}: {body} answered, not one of {names:?}"
            );
        }
        changes += 1;
    }
    let done_after_changes = done.load(Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert!(changes >= 100);
    // The changes really happened under load.
    assert!(
        done_before_changes < CONNS * PER_CONN && done_after_changes > done_before_changes + 1000
    );
    assert_eq!(done.load(Ordering::Relaxed), CONNS * PER_CONN);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
}

#[tokio::test]
async fn requests_in_flight_finish_under_the_policy_they_started_with() {
    let a = upstream("a").await;
    let f = Ferry::start(&policy("round-robin", "2s", &[a.addr]), &[], &[]);
    let web = f.addr("web");
    // `/slow` takes 300 ms; it started under a 2 s timeout, so a 100 ms one arriving
    // meanwhile must not cut it.
    let slow = tokio::spawn(async move { Conn::open(web).await.unwrap().get("/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = f
        .admin("PUT", "/policy", "services: {web: {timeout: 100ms}}")
        .await;
    assert_eq!(status, 200);
    assert_eq!(slow.await.unwrap().unwrap().0, 200);
    // The next one runs under the new timeout.
    let (status, _) = Conn::open(web).await.unwrap().get("/slow").await.unwrap();
    assert_eq!(status, 504);
}

fn downward_api(lines: &[(&str, &str)]) -> String {
    lines
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\"\n"))
        .collect()
}

/// Swaps `dir/annotations` the way the kubelet does: a new timestamped directory, then
/// an atomic rename of the `..data` symlink.
fn kubelet_write(dir: &std::path::Path, generation: u32, text: &str) {
    let ts = dir.join(format!("..2026_11_23_{generation}"));
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("annotations"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("annotations");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/annotations", &link).unwrap();
    }
}

#[tokio::test]
async fn annotations_reach_the_running_sidecar_and_a_bad_one_is_refused() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        policy("p2c-ewma", "2s", &[a.addr, b.addr]).replace("    lb: p2c-ewma\n", ""),
    )
    .unwrap();
    let ann = dir.path().join("podinfo");
    std::fs::create_dir(&ann).unwrap();
    kubelet_write(
        &ann,
        1,
        &downward_api(&[("app", "web"), ("ferry.dev/lb", "round-robin")]),
    );
    let ann_file = ann.join("annotations").display().to_string();
    let f = Ferry::start_in(
        dir,
        // No timed re-read during the test: the kubelet's swap is seen by inotify.
        &["--annotations", &ann_file, "--watch-interval", "1h"],
        &[],
    );
    assert_eq!(web_state(&f).await.0, "round-robin");

    // `kubectl annotate` -> the kubelet swaps the file -> the sidecar reloads.
    let v1 = f.policy_version().await;
    kubelet_write(
        &ann,
        2,
        &downward_api(&[("app", "web"), ("ferry.dev/lb", "least-request")]),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            web_state(&f).await.0 == "least-request"
        })
        .await
    );
    let (_, p) = f.admin("GET", "/policy", "").await;
    assert_eq!(p["sources"]["services.web.lb"], "file");
    assert!(p["version"].as_u64().unwrap() > v1);

    // A bad value: refused whole, the running policy stays, the error is shown.
    let v2 = f.policy_version().await;
    kubelet_write(
        &ann,
        3,
        &downward_api(&[("ferry.dev/lb", "banana"), ("ferry.dev/timeout", "soon")]),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            !f.admin("GET", "/policy", "").await.1["last_error"].is_null()
        })
        .await
    );
    let (_, p) = f.admin("GET", "/policy", "").await;
    assert_eq!(p["version"].as_u64().unwrap(), v2);
    let errors: Vec<&str> = p["last_error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("ferry.dev/lb: \"banana\" is not a balancer")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("ferry.dev/timeout: \"soon\" is not a duration")),
        "{errors:?}"
    );
    assert_eq!(web_state(&f).await.0, "least-request");
    let (status, _) = Conn::open(f.addr("web"))
        .await
        .unwrap()
        .get("/")
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Fixed: accepted, and the error clears.
    kubelet_write(&ann, 4, &downward_api(&[("ferry.dev/lb", "random")]));
    assert!(
        eventually(Duration::from_secs(10), || async {
            web_state(&f).await.0 == "random"
        })
        .await
    );
    assert!(f.admin("GET", "/policy", "").await.1["last_error"].is_null());
}

#[tokio::test]
async fn sighup_reloads_at_once() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    // A watch interval far longer than the test: only SIGHUP can trigger the reload.
    let f = Ferry::start(
        &policy("round-robin", "2s", &[a.addr]),
        &["--watch-files", "poll", "--watch-interval", "1h"],
        &[],
    );
    std::fs::write(
        f.path("policy.yaml"),
        policy("random", "2s", &[a.addr, b.addr]),
    )
    .unwrap();
    f.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            web_state(&f).await.0 == "random"
        })
        .await
    );
    assert_eq!(web_state(&f).await.1.len(), 2);
}

/// Series in `/metrics`, each a line that is not a comment.
fn series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// Endpoints churn (a rollout a minute for a day, at once) under load: with per-endpoint
/// labels off the number of series does not move; with them on, it follows the endpoints
/// there are now, not every endpoint there ever was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_endpoint_changes_leave_the_series_bounded() {
    let mut ups = Vec::new();
    for _ in 0..40 {
        ups.push(upstream("u").await);
    }
    let all: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let f = Ferry::start(&policy("round-robin", "2s", &all[..3]), &[], &[]);
    let web = f.addr("web");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures) = (stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut c = Conn::open(web).await.unwrap();
            // Bounded: at most 20,000 requests a connection, or until told to stop.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if !matches!(c.get("/").await, Ok((200, _))) {
                    failures.fetch_add(1, Ordering::Relaxed);
                    c = Conn::open(web).await.unwrap();
                }
            }
        }));
    }
    let mut counts = Vec::new();
    for labels in [false, true] {
        for i in 0..500usize {
            // Three endpoints at a time, a different three each change.
            let eps: Vec<String> = (0..3)
                .map(|k| format!("\"{}\"", all[(i * 7 + k * 13) % all.len()]))
                .collect();
            let body = format!(
                "metrics-endpoint-labels: {labels}\nservices: {{web: {{endpoints: [{}]}}}}",
                eps.join(", ")
            );
            let (code, r) = f.admin("PUT", "/policy", &body).await;
            assert_eq!(code, 200, "{r}");
            if i == 10 || i == 499 {
                // Let requests reach the new endpoints before counting.
                tokio::time::sleep(Duration::from_millis(100)).await;
                counts.push((labels, i, series(&f.metrics().await)));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    eprintln!("series after endpoint changes (labels, change, series): {counts:?}");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed");
    let [
        (_, _, off_early),
        (_, _, off_late),
        (_, _, on_early),
        (_, _, on_late),
    ] = counts[..]
    else {
        panic!("{counts:?}")
    };
    // Labels off: 490 more changes add no series at all.
    assert_eq!(off_early, off_late, "{counts:?}");
    // Labels on: one series per current endpoint and status, whatever the history.
    assert!(on_late <= off_late + 3, "{counts:?}");
    assert!(on_early <= off_late + 3, "{counts:?}");
    let m = f.metrics().await;
    let endpoint_series = m
        .lines()
        .filter(|l| l.starts_with("ferry_endpoint_requests_total{"))
        .count();
    assert!(
        (1..=3).contains(&endpoint_series),
        "{endpoint_series} endpoint series for 3 endpoints:\n{m}"
    );
}
