//! The Grafana dashboard and recording rules in `deploy/grafana/` against what the real
//! sidecar exports. ferry runs with HTTP, gRPC and opaque TCP upstreams, outbound and
//! inbound listeners, a dead endpoint (retries, ejections, a spent retry budget) and gRPC
//! failures; then every PromQL expression in the dashboard and the rules file is parsed
//! and each metric and label it names is looked up in the scrape. Recording rules are
//! resolved to the series they read. A real Prometheus then scrapes the sidecar under
//! steady traffic with the rules loaded, and every panel's query must answer with numbers.
//! promtool checks the rules, runs their unit tests and lints the scrape. promtool and
//! prometheus come from Debian's `prometheus` package; without them the tests fail naming it.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_demo::HttpUpstream;
use ferry_demo::proto::EchoRequest;
use ferry_demo::proto::echo_client::EchoClient;
use serde_json::Value as Json;
use support::{Conn, Ferry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn grafana(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/grafana")
        .join(file)
}

/// Runs promtool; its exit code and what it printed. Fails, naming the package, when
/// promtool is not installed.
fn promtool(args: &[&str], stdin: Option<&str>) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(grafana(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): it comes with Debian's `prometheus` package \
                 (apt-get install prometheus; tests/run.sh installs it when run as root)"
            )
        });
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn recording_rules_pass_promtool_check_and_their_unit_tests() {
    let (code, out) = promtool(&["check", "rules", "ferry-rules.yaml"], None);
    assert_eq!(code, 0, "promtool check rules ferry-rules.yaml:\n{out}");
    let rules = read_rules(&std::fs::read_to_string(grafana("ferry-rules.yaml")).unwrap());
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool and this test's reader disagree on the rules in ferry-rules.yaml ({} read here):\n{out}",
        rules.len()
    );
    let (code, out) = promtool(&["test", "rules", "ferry-rules.test.yaml"], None);
    assert_eq!(code, 0, "promtool test rules ferry-rules.test.yaml:\n{out}");
    // Every rule has a unit test.
    let tests = std::fs::read_to_string(grafana("ferry-rules.test.yaml")).unwrap();
    for name in rules.keys() {
        assert!(
            tests.contains(&format!("expr: {name}")),
            "ferry-rules.test.yaml has no test evaluating {name}"
        );
    }
}

/// The dashboard's and the rules' queries name only metrics and labels a real ferry
/// exports, and the checker used for that catches what it should.
#[tokio::test]
async fn every_query_names_metrics_and_labels_ferry_exports() {
    let dashboard: Json =
        serde_json::from_str(&std::fs::read_to_string(grafana("ferry-dashboard.json")).unwrap())
            .expect("ferry-dashboard.json is JSON");
    let rules = read_rules(&std::fs::read_to_string(grafana("ferry-rules.yaml")).unwrap());
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 15, "{queries:#?}");

    let (f, _keep) = start_ferry_with_traffic().await;
    // Every raw series the queries read has samples (recorded at the end of a body or a
    // connection, so poll briefly).
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for text in rules
        .values()
        .map(|r| r.expr.clone())
        .chain(queries.iter().map(|q| q.expr.clone()))
    {
        wanted.extend(
            lex(&substitute(&text, &[]).0)
                .into_iter()
                .filter_map(|t| match t {
                    Tok::Ident(n) if n.starts_with("ferry_") => Some(n),
                    _ => None,
                }),
        );
    }
    let end = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = f.metrics().await;
        let scrape = Scrape::parse(&text);
        if wanted.iter().all(|m| scrape.series.contains_key(m)) || Instant::now() > end {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let scrape = Scrape::parse(&text);

    // promtool lints the scrape; a parse error fails, lint findings are reported.
    let (code, out) = promtool(&["check", "metrics"], Some(&text));
    match code {
        0 => {}
        3 => eprintln!("promtool check metrics (lint, reported, not failed):\n{out}"),
        _ => panic!(
            "promtool check metrics could not parse ferry's /metrics ({code}):\n{out}\n{text}"
        ),
    }

    let mut ck = Checker::new(&scrape, &rules);
    let mut errors = Vec::new();
    for (name, rule) in &rules {
        let (_, errs) = ck.check(&rule.expr);
        errors.extend(errs.into_iter().map(|e| format!("rule {name}: {e}")));
    }
    let vars = dashboard_variables(&dashboard, &scrape, &mut errors);
    let mut used_rules = BTreeSet::new();
    for q in &queries {
        let (expr, unknown) = substitute(&q.expr, &vars);
        for v in unknown {
            errors.push(format!("{}: ${v} is not a dashboard variable", q.at));
        }
        ck.used.clear();
        let (v, errs) = ck.check(&expr);
        errors.extend(errs.into_iter().map(|e| format!("{}: {e}", q.at)));
        if !matches!(v, Val::Vector { .. }) {
            errors.push(format!("{}: not an instant vector: {}", q.at, q.expr));
        }
        let reached = ck.reach(&ck.used);
        let (via, sources): (Vec<String>, Vec<String>) =
            reached.into_iter().partition(|n| rules.contains_key(n));
        eprintln!("{}: {} <- {via:?}", q.at, sources.join(", "));
        used_rules.extend(via);
    }
    for name in rules.keys() {
        if !used_rules.contains(name) {
            errors.push(format!(
                "rule {name} is recorded but no dashboard panel reads it (directly or through another rule)"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "{} problem(s):\n  {}\n\nthe scrape:\n{text}",
        errors.len(),
        errors.join("\n  ")
    );

    // The dashboard's queries are PromQL to Prometheus' own parser too.
    let mut doc = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let (expr, _) = substitute(&q.expr, &vars);
        doc += &format!("      - record: dashboard:query_{i}\n        expr: |\n");
        for line in expr.lines() {
            doc += &format!("          {line}\n");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&file, &doc).unwrap();
    let (code, out) = promtool(&["check", "rules", file.to_str().unwrap()], None);
    assert_eq!(
        code, 0,
        "Prometheus does not parse a dashboard query:\n{out}\n{doc}"
    );

    // The checker is not a rubber stamp: each of these is refused, for the right reason.
    for (bad, why) in [
        ("rate(ferry_requestz_total[5m])", "ferry_requestz_total"),
        (r#"sum(rate(ferry_requests_total{pod="x"}[5m]))"#, "pod"),
        ("sum by (zone) (rate(ferry_requests_total[5m]))", "zone"),
        (
            r#"sum(rate(ferry_requests_total{classification="broken"}[5m]))"#,
            "broken",
        ),
        (
            "histogram_quantile(0.9, sum by (service) (rate(ferry_request_duration_seconds_bucket[5m])))",
            "le",
        ),
        (
            "sum by (service, direction) (rate(ferry_requests_total[5m])) / sum by (service) (rate(ferry_errors_total[5m]))",
            "match",
        ),
        ("service_direction:ferry_nothing:rate1m", "ferry-rules.yaml"),
        (
            r#"service_reason:ferry_errors:rate1m{direction="outbound"}"#,
            "direction",
        ),
        (
            "sum by (tier) (ferry_locality_share) / ignoring (tier) group_left (zone) ferry_locality_endpoints",
            "zone",
        ),
        (
            "sum by (service) (nosuchfunction(ferry_requests_total))",
            "nosuchfunction",
        ),
    ] {
        let (_, errs) = ck.check(bad);
        assert!(
            errs.iter().any(|e| e.contains(why)),
            "{bad}: expected a complaint about {why}, got {errs:?}"
        );
    }
}

/// A real Prometheus scrapes the sidecar every second under steady traffic, with the
/// recording rules evaluated every second: every panel's query returns series, and none
/// of them is NaN (a quantile over a histogram without a +Inf bucket, a ratio of rules
/// that never match).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_every_panel_with_numbers() {
    let dashboard: Json =
        serde_json::from_str(&std::fs::read_to_string(grafana("ferry-dashboard.json")).unwrap())
            .unwrap();
    let queries = dashboard_queries(&dashboard);
    let vars: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let (f, _keep) = start_ferry_with_traffic().await;
    let addrs = f.addrs.clone();
    let traffic = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(90);
        while Instant::now() < end {
            round(&addrs).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let prom = Prometheus::start(f.addr("admin"));
    let end = Instant::now() + Duration::from_secs(45);
    let problems = loop {
        let mut problems = Vec::new();
        for q in &queries {
            // "All" for every variable, as the dashboard opens.
            let (expr, _) = substitute_with(&q.expr, &vars, ".*");
            match prom.query(&expr).await {
                Err(e) => problems.push(format!("{}: {e}: {expr}", q.at)),
                Ok(v) if v.is_empty() => problems.push(format!("{}: no series: {expr}", q.at)),
                Ok(v) => {
                    let nan: Vec<&String> = v
                        .iter()
                        .filter(|(_, x)| x.is_nan())
                        .map(|(s, _)| s)
                        .collect();
                    if !nan.is_empty() {
                        problems.push(format!("{}: NaN for {nan:?}: {expr}", q.at));
                    }
                }
            }
        }
        if problems.is_empty() || Instant::now() > end {
            break problems;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    traffic.abort();
    assert!(
        problems.is_empty(),
        "after {}s of scraping, {} panel queries answer badly:\n  {}\n\nprometheus' log:\n{}",
        45,
        problems.len(),
        problems.join("\n  "),
        prom.log()
    );
}

/// Prometheus (from Debian's `prometheus` package) scraping one target every second.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = std::fs::read_to_string(grafana("ferry-rules.yaml"))
            .unwrap()
            .replace("interval: 30s", "interval: 1s");
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [rules.yaml]\n\
                 scrape_configs:\n  - job_name: ferry\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
            ),
        )
        .unwrap();
        let addr = closed_port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "prometheus not found ({e}): it comes with Debian's `prometheus` package \
                     (apt-get install prometheus; tests/run.sh installs it when run as root)"
                )
            });
        let mut p = Prometheus { child, addr, dir };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = std::net::TcpStream::connect(addr) {
                drop(s);
                break;
            }
            assert!(
                p.child.try_wait().unwrap().is_none() && Instant::now() < end,
                "prometheus did not start:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// An instant query: each series (as text) and its value.
    async fn query(&self, expr: &str) -> Result<Vec<(String, f64)>, String> {
        let mut q = String::new();
        for b in expr.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                q.push(b as char);
            } else {
                q += &format!("%{b:02X}");
            }
        }
        let (status, body) =
            support::raw(self.addr, "GET", &format!("/api/v1/query?query={q}"), "").await;
        let j: Json = serde_json::from_str(&body).map_err(|e| format!("{status} {e}: {body}"))?;
        if j["status"] != "success" {
            return Err(format!("{status}: {}", j["error"]));
        }
        Ok(j["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let v = r["value"][1].as_str().unwrap_or("NaN");
                (r["metric"].to_string(), v.parse().unwrap_or(f64::NAN))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// ferry, its upstreams and the traffic

fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// ferry with every kind of traffic the dashboard charts: a dead endpoint retried around
/// and ejected, a service whose endpoints are all dead until its retry budget is spent,
/// then a few rounds of everything. The stream keeps an opaque connection open.
async fn start_ferry_with_traffic() -> (Ferry, TcpStream) {
    let f = start_ferry().await;
    let mut c = Conn::open(f.addr("web")).await.unwrap();
    for i in 0..30 {
        let (status, body) = c.get("/").await.unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
    }
    for i in 0..40 {
        let (status, body) = Conn::open(f.addr("gone"))
            .await
            .unwrap()
            .get("/")
            .await
            .unwrap();
        assert_eq!(status, 503, "gone, request {i}: {body}");
        if i >= 15
            && f.metrics()
                .await
                .contains("ferry_retry_budget_exhausted_total{service=\"gone\"}")
        {
            break;
        }
    }
    let addrs = f.addrs.clone();
    for _ in 0..3 {
        round(&addrs).await;
    }
    let mut open = TcpStream::connect(f.addr("db")).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).await.unwrap();
    (f, open)
}

/// ferry with HTTP, gRPC and opaque TCP services, outbound and inbound, over real
/// upstreams on loopback; `web` has a dead endpoint and `gone` nothing but dead ones.
async fn start_ferry() -> Ferry {
    let a = HttpUpstream::start("a").await.unwrap();
    let b = HttpUpstream::start("b").await.unwrap();
    let g = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = g.local_addr().unwrap();
    tokio::spawn(ferry_demo::serve_grpc("g".to_string(), g));
    let t = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = t.local_addr().unwrap();
    tokio::spawn(ferry_demo::serve_tcp_echo(t));
    let (dead, dead2) = (support::dead_addr(), support::dead_addr());
    let policy = format!(
        "admin: 127.0.0.1:0\nzone: a\nregion: r1\nlisteners:\n\
         \x20 - {{name: web, bind: \"127.0.0.1:0\", service: web}}\n\
         \x20 - {{name: grpc, bind: \"127.0.0.1:0\", service: echo}}\n\
         \x20 - {{name: gone, bind: \"127.0.0.1:0\", service: gone}}\n\
         \x20 - {{name: db, bind: \"127.0.0.1:0\", service: db, protocol: opaque}}\n\
         \x20 - {{name: app, bind: \"127.0.0.1:0\", service: app, direction: inbound}}\n\
         \x20 - {{name: db-in, bind: \"127.0.0.1:0\", service: db-local, direction: inbound, protocol: opaque}}\n\
         services:\n\
         \x20 web:\n    lb: round-robin\n    retries: 2\n    endpoints:\n\
         \x20     - {{address: \"{}\", zone: a, region: r1}}\n\
         \x20     - {{address: \"{dead}\", zone: a, region: r1}}\n\
         \x20     - {{address: \"{}\", zone: b, region: r1}}\n\
         \x20 echo: {{lb: round-robin, endpoints: [\"{grpc}\"]}}\n\
         \x20 gone: {{retries: 3, endpoints: [\"{dead}\", \"{dead2}\"]}}\n\
         \x20 db: {{endpoints: [\"{tcp}\"]}}\n\
         \x20 db-local: {{endpoints: [\"{tcp}\"]}}\n\
         \x20 app: {{endpoints: [\"{}\"]}}\n",
        a.addr, b.addr, a.addr
    );
    Ferry::start(&policy, &[], &[])
}

/// One of everything: HTTP outbound (a success, an upstream 503), ferry's own 503, gRPC
/// OK and INTERNAL, HTTP inbound, opaque TCP outbound and inbound.
async fn round(addrs: &HashMap<String, SocketAddr>) {
    let mut c = Conn::open(addrs["web"]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().0, 200);
    assert_eq!(c.get("/status/503").await.unwrap().0, 503);
    let (status, h, body) = Conn::open(addrs["gone"])
        .await
        .unwrap()
        .get_with("/", &[])
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(h.contains_key("x-ferry-error"), "{h:?}");

    let mut client = EchoClient::connect(format!("http://{}", addrs["grpc"]))
        .await
        .unwrap();
    let r = client
        .say(EchoRequest {
            message: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().message, "m");
    let e = client
        .say(EchoRequest {
            message: "fail".into(),
            fail_code: tonic::Code::Internal as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");

    assert_eq!(
        Conn::open(addrs["app"])
            .await
            .unwrap()
            .get("/")
            .await
            .unwrap()
            .0,
        200
    );

    for listener in ["db", "db-in"] {
        let mut s = TcpStream::connect(addrs[listener]).await.unwrap();
        s.write_all(&[7u8; 10_000]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), 10_000, "{listener}");
    }
}

// ---------------------------------------------------------------------------------------
// The scrape

/// What `/metrics` holds: per sample name, each label's values.
#[derive(Default)]
struct Scrape {
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    types: HashMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    s.types.insert(n.to_string(), t.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(line.len());
            let labels = s.series.entry(line[..name_end].to_string()).or_default();
            if line[name_end..].starts_with('{') {
                for (k, v) in parse_label_pairs(&line[name_end + 1..]) {
                    labels.entry(k).or_default().insert(v);
                }
            }
        }
        s
    }
}

/// `a="x",b="y\"z"} ...`: the pairs up to the closing brace.
fn parse_label_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none_or(|c| *c == '}') {
            return out;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {key} in {s}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

// ---------------------------------------------------------------------------------------
// The rules file (the subset of YAML it is written in: `record:`, `expr:` plain or as a
// `|` block, `labels:` as a block map; the count is checked against promtool's).

struct Rule {
    expr: String,
    labels: BTreeSet<String>,
}

fn read_rules(text: &str) -> BTreeMap<String, Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut rules = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let Some(name) = line.trim_start().strip_prefix("- record:") else {
            assert!(
                !line.trim_start().starts_with("- alert:"),
                "this test reads recording rules only: {line}"
            );
            i += 1;
            continue;
        };
        let name = name.trim().to_string();
        let body = indent(line) + 2;
        let mut rule = Rule {
            expr: String::new(),
            labels: BTreeSet::new(),
        };
        i += 1;
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) >= body) {
            let l = lines[i].trim();
            if let Some(e) = l.strip_prefix("expr:") {
                let e = e.trim();
                if e == "|" || e == ">" || e == "|-" || e == ">-" {
                    i += 1;
                    while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > body)
                    {
                        rule.expr += lines[i].trim();
                        rule.expr.push('\n');
                        i += 1;
                    }
                    continue;
                }
                assert!(
                    !e.starts_with(['"', '\'']),
                    "write expr plain or as a | block: {e}"
                );
                rule.expr = e.to_string();
            } else if l == "labels:" {
                i += 1;
                while i < lines.len() && indent(lines[i]) > body && !lines[i].trim().is_empty() {
                    let (k, _) = lines[i].trim().split_once(':').unwrap();
                    rule.labels.insert(k.trim().to_string());
                    i += 1;
                }
                continue;
            }
            i += 1;
        }
        assert!(!rule.expr.is_empty(), "rule {name} has no expr");
        assert!(
            rules.insert(name.clone(), rule).is_none(),
            "{name} recorded twice"
        );
    }
    rules
}

// ---------------------------------------------------------------------------------------
// The dashboard

#[derive(Debug)]
struct Query {
    at: String,
    expr: String,
}

/// Every target's `expr`, in panels and rows' panels.
fn dashboard_queries(d: &Json) -> Vec<Query> {
    fn walk(panels: &Json, out: &mut Vec<Query>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title}: a target without expr"));
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "panel {title}: targets use the datasource variable"
                );
                out.push(Query {
                    at: format!("panel \"{title}\" {}", t["refId"].as_str().unwrap_or("?")),
                    expr: expr.to_string(),
                });
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// The template variables' names, after checking each `label_values(metric, label)`
/// against the scrape.
fn dashboard_variables(d: &Json, scrape: &Scrape, errors: &mut Vec<String>) -> Vec<String> {
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion: {}",
        d["schemaVersion"]
    );
    let mut names = Vec::new();
    for v in d["templating"]["list"].as_array().expect("templating.list") {
        let name = v["name"].as_str().unwrap().to_string();
        match v["type"].as_str() {
            Some("datasource") => assert_eq!(v["query"], "prometheus", "{v}"),
            Some("query") => {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or_else(|| panic!("variable {name}: no query"));
                let args = q
                    .trim()
                    .strip_prefix("label_values(")
                    .and_then(|r| r.strip_suffix(')'))
                    .unwrap_or_else(|| {
                        panic!(
                            "variable {name}: only label_values(metric, label) is checked here: {q}"
                        )
                    });
                let (metric, label) = args
                    .rsplit_once(',')
                    .unwrap_or_else(|| panic!("variable {name}: label_values needs a metric: {q}"));
                let (metric, label) = (metric.trim(), label.trim());
                match scrape.series.get(metric) {
                    None => errors.push(format!(
                        "variable ${name}: {metric} is not in ferry's /metrics"
                    )),
                    Some(ls) if !ls.contains_key(label) => {
                        errors.push(format!("variable ${name}: {metric} has no label {label}"))
                    }
                    _ => {}
                }
            }
            other => panic!("variable {name}: type {other:?} is not checked here"),
        }
        names.push(name);
    }
    for want in ["datasource", "service", "direction"] {
        assert!(
            names.iter().any(|n| n == want),
            "no ${want} variable: {names:?}"
        );
    }
    names
}

const VAR: &str = "__grafana_var__";

/// Grafana's variables replaced: interval built-ins by durations, the dashboard's own
/// by a placeholder (matched as a value, never checked as one). Also the names used that
/// are neither.
fn substitute(expr: &str, vars: &[String]) -> (String, Vec<String>) {
    substitute_with(expr, vars, VAR)
}

/// [`substitute`], with `value` for the dashboard's variables.
fn substitute_with(expr: &str, vars: &[String], value: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut unknown = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out += &rest[..i];
        rest = &rest[i + 1..];
        let (name, len) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').unwrap_or(r.len());
            let inner = &r[..end];
            (inner.split(':').next().unwrap_or("").to_string(), end + 2)
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (rest[..end].to_string(), end)
        };
        rest = &rest[len.min(rest.len())..];
        match name.as_str() {
            "__rate_interval" | "__interval" => out += "5m",
            "__range" => out += "1h",
            n if vars.iter().any(|v| v == n) => out += value,
            n => {
                unknown.push(n.to_string());
                out += value;
            }
        }
    }
    out += rest;
    (out, unknown)
}

// ---------------------------------------------------------------------------------------
// A PromQL reader: enough of the grammar to know which labels each expression's result
// carries, and so whether every metric, matcher, grouping and vector match it names can
// hold against the scrape.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Num,
    Str(String),
    /// `[...]`, a range or subquery.
    Range,
    P(&'static str),
}

const PUNCT: [&str; 21] = [
    "==", "!=", ">=", "<=", "=~", "!~", "+", "-", "*", "/", "%", "^", ">", "<", "=", "(", ")", "{",
    "}", ",", "@",
];

fn lex(s: &str) -> Vec<Tok> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut v = String::new();
            i += 1;
            while i < b.len() && b[i] as char != c {
                if b[i] == b'\\' && c != '`' && i + 1 < b.len() {
                    i += 1;
                }
                v.push(b[i] as char);
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(v));
        } else if c == '[' {
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
            i += 1;
            out.push(Tok::Range);
        } else if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let w = &s[start..i];
            if matches!(w.to_ascii_lowercase().as_str(), "inf" | "nan") {
                out.push(Tok::Num);
            } else {
                out.push(Tok::Ident(w.to_string()));
            }
        } else if let Some(p) = PUNCT.iter().find(|p| s[i..].starts_with(**p)) {
            out.push(Tok::P(p));
            i += p.len();
        } else {
            out.push(Tok::P("?"));
            i += 1;
        }
    }
    out
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
];

type Labels = BTreeSet<String>;

#[derive(Clone, Debug)]
enum Val {
    Scalar,
    Str(String),
    /// `labels` is None once an error made them unknowable (no cascade of complaints).
    Vector {
        labels: Option<Labels>,
    },
}

fn vector(labels: Option<Labels>) -> Val {
    Val::Vector { labels }
}

fn set(ls: &[String]) -> Labels {
    ls.iter().cloned().collect()
}

fn show(ls: &Labels) -> String {
    format!("{{{}}}", ls.iter().cloned().collect::<Vec<_>>().join(", "))
}

struct Checker<'a> {
    scrape: &'a Scrape,
    rules: &'a BTreeMap<String, Rule>,
    /// Recording rules resolved: the labels of what they record, and the names they read.
    resolved: HashMap<String, (Option<Labels>, BTreeSet<String>)>,
    resolving: Vec<String>,
    /// Names (metrics and rules) the last checked expression read.
    used: BTreeSet<String>,
}

impl<'a> Checker<'a> {
    fn new(scrape: &'a Scrape, rules: &'a BTreeMap<String, Rule>) -> Self {
        Checker {
            scrape,
            rules,
            resolved: HashMap::new(),
            resolving: Vec::new(),
            used: BTreeSet::new(),
        }
    }

    /// The expression's result and what is wrong with it.
    fn check(&mut self, expr: &str) -> (Val, Vec<String>) {
        let mut p = Parser {
            toks: lex(expr),
            pos: 0,
            errors: Vec::new(),
        };
        let v = p.expr(self, 0);
        if p.pos < p.toks.len() {
            p.errors.push(format!(
                "unexpected {:?} at the end of {expr}",
                p.toks[p.pos]
            ));
        }
        (v, p.errors)
    }

    /// A recording rule's labels, resolving it (and the rules it reads) once.
    fn rule(&mut self, name: &str, errors: &mut Vec<String>) -> Option<Labels> {
        if let Some((labels, _)) = self.resolved.get(name) {
            return labels.clone();
        }
        if self.resolving.iter().any(|n| n == name) {
            errors.push(format!(
                "recording rules read each other in a cycle: {name}"
            ));
            return None;
        }
        self.resolving.push(name.to_string());
        let outer = std::mem::take(&mut self.used);
        let expr = self.rules[name].expr.clone();
        let (v, _) = self.check(&expr);
        let reads = std::mem::replace(&mut self.used, outer);
        self.resolving.pop();
        let labels = match v {
            Val::Vector { labels } => {
                labels.map(|ls| ls.union(&self.rules[name].labels).cloned().collect())
            }
            _ => Some(Labels::new()),
        };
        self.resolved
            .insert(name.to_string(), (labels.clone(), reads));
        labels
    }

    /// These names and every name they read, through recording rules.
    fn reach(&self, names: &BTreeSet<String>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<String> = names.iter().cloned().collect();
        while let Some(n) = todo.pop() {
            if out.insert(n.clone())
                && let Some((_, reads)) = self.resolved.get(&n)
            {
                todo.extend(reads.iter().cloned());
            }
        }
        out
    }
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    errors: Vec<String>,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.pos + n)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn is_p(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::P(q)) if *q == p)
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(i)) if i == w)
    }

    fn expect(&mut self, p: &str) {
        if self.is_p(p) {
            self.pos += 1;
        } else {
            let got = self.peek().cloned();
            self.errors.push(format!("expected {p}, found {got:?}"));
            self.pos = self.toks.len();
        }
    }

    /// `(a, b, ...)`
    fn label_list(&mut self) -> Vec<String> {
        self.expect("(");
        let mut out = Vec::new();
        while let Some(Tok::Ident(l)) = self.peek().cloned() {
            self.pos += 1;
            out.push(l);
            if self.is_p(",") {
                self.pos += 1;
            }
        }
        self.expect(")");
        out
    }

    fn binop(&self) -> Option<(String, u8)> {
        let op = match self.peek()? {
            Tok::P(p) => p.to_string(),
            Tok::Ident(w) if matches!(w.as_str(), "and" | "or" | "unless" | "atan2") => w.clone(),
            _ => return None,
        };
        let prec = match op.as_str() {
            "or" => 1,
            "and" | "unless" => 2,
            "==" | "!=" | "<=" | "<" | ">=" | ">" => 3,
            "+" | "-" => 4,
            "*" | "/" | "%" | "atan2" => 5,
            "^" => 6,
            _ => return None,
        };
        Some((op, prec))
    }

    fn expr(&mut self, ck: &mut Checker, min: u8) -> Val {
        let mut lhs = self.unary(ck);
        while let Some((op, prec)) = self.binop() {
            if prec < min {
                break;
            }
            self.pos += 1;
            if self.is_word("bool") {
                self.pos += 1;
            }
            let mut on = None;
            for (kw, is_on) in [("on", true), ("ignoring", false)] {
                if self.is_word(kw) {
                    self.pos += 1;
                    on = Some((is_on, self.label_list()));
                }
            }
            let mut group = None;
            for (kw, left) in [("group_left", true), ("group_right", false)] {
                if self.is_word(kw) {
                    self.pos += 1;
                    let ls = if self.is_p("(") {
                        self.label_list()
                    } else {
                        Vec::new()
                    };
                    group = Some((left, ls));
                }
            }
            let rhs = self.expr(ck, if op == "^" { prec } else { prec + 1 });
            lhs = self.binary(&op, lhs, rhs, on, group);
        }
        lhs
    }

    fn binary(
        &mut self,
        op: &str,
        l: Val,
        r: Val,
        on: Option<(bool, Vec<String>)>,
        group: Option<(bool, Vec<String>)>,
    ) -> Val {
        let (la, lb) = match (&l, &r) {
            (Val::Vector { labels: a }, Val::Vector { labels: b }) => (a.clone(), b.clone()),
            (Val::Vector { .. }, _) => return l,
            (_, Val::Vector { .. }) => return r,
            _ => return Val::Scalar,
        };
        let (Some(la), Some(lb)) = (la, lb) else {
            return vector(None);
        };
        if let Some((is_on, ls)) = &on {
            for x in ls {
                let ok = if *is_on {
                    la.contains(x) && lb.contains(x)
                } else {
                    la.contains(x) || lb.contains(x)
                };
                if !ok {
                    self.errors.push(format!(
                        "`{op} {} ({x})`: {x} is not a label of {} {op} {}",
                        if *is_on { "on" } else { "ignoring" },
                        show(&la),
                        show(&lb)
                    ));
                }
            }
        }
        if let Some((left, g)) = &group {
            let one = if *left { &lb } else { &la };
            for x in g {
                if !one.contains(x) {
                    self.errors.push(format!(
                        "`{}({x})`: {x} is not a label of the one side {}",
                        if *left { "group_left" } else { "group_right" },
                        show(one)
                    ));
                }
            }
        }
        let key = |s: &Labels| match &on {
            Some((true, ls)) => set(ls),
            Some((false, ls)) => s.difference(&set(ls)).cloned().collect(),
            None => s.clone(),
        };
        if matches!(op, "and" | "or" | "unless") {
            return vector(Some(if op == "or" {
                la.union(&lb).cloned().collect()
            } else {
                la
            }));
        }
        if key(&la) != key(&lb) {
            self.errors.push(format!(
                "`{op}` would match no series: the left side is keyed by {}, the right by {}",
                show(&key(&la)),
                show(&key(&lb))
            ));
        }
        vector(Some(match (&group, &on) {
            (Some((true, g)), _) => la.union(&set(g)).cloned().collect(),
            (Some((false, g)), _) => lb.union(&set(g)).cloned().collect(),
            (None, Some((true, ls))) => set(ls),
            (None, _) => key(&la),
        }))
    }

    fn unary(&mut self, ck: &mut Checker) -> Val {
        if self.is_p("-") || self.is_p("+") {
            self.pos += 1;
            return self.unary(ck);
        }
        let mut v = self.primary(ck);
        loop {
            if self.peek() == Some(&Tok::Range) {
                self.pos += 1;
            } else if self.is_word("offset") {
                self.pos += 1;
                if self.is_p("-") {
                    self.pos += 1;
                }
                self.next();
            } else if self.is_p("@") {
                self.pos += 1;
                if matches!(self.next(), Some(Tok::Ident(_))) {
                    self.expect("(");
                    self.expect(")");
                }
            } else {
                break;
            }
        }
        if let Val::Str(_) = v {
            v = Val::Scalar;
        }
        v
    }

    fn primary(&mut self, ck: &mut Checker) -> Val {
        match self.next() {
            Some(Tok::Num) => Val::Scalar,
            Some(Tok::Str(s)) => Val::Str(s),
            Some(Tok::P("(")) => {
                let v = self.expr(ck, 0);
                self.expect(")");
                v
            }
            Some(Tok::P("{")) => {
                self.pos -= 1;
                self.selector(ck, None)
            }
            Some(Tok::Ident(w)) => {
                let call = self.is_p("(")
                    || (AGGREGATIONS.contains(&w.as_str())
                        && (self.is_word("by") || self.is_word("without")));
                if AGGREGATIONS.contains(&w.as_str()) && call {
                    self.aggregation(ck, &w)
                } else if call {
                    self.function(ck, &w)
                } else if KEYWORDS.contains(&w.as_str()) {
                    self.errors.push(format!("unexpected keyword {w}"));
                    vector(None)
                } else {
                    self.selector(ck, Some(w))
                }
            }
            t => {
                self.errors.push(format!("unexpected {t:?}"));
                self.pos = self.toks.len();
                vector(None)
            }
        }
    }

    fn args(&mut self, ck: &mut Checker) -> Vec<Val> {
        self.expect("(");
        let mut out = Vec::new();
        while !self.is_p(")") && self.pos < self.toks.len() {
            // A string argument stays a string (label names in label_replace, ...).
            if let (Some(Tok::Str(s)), Some(Tok::P(",") | Tok::P(")"))) =
                (self.peek().cloned(), self.peek_at(1))
            {
                self.pos += 1;
                out.push(Val::Str(s));
            } else {
                out.push(self.expr(ck, 0));
            }
            if self.is_p(",") {
                self.pos += 1;
            }
        }
        self.expect(")");
        out
    }

    fn aggregation(&mut self, ck: &mut Checker, name: &str) -> Val {
        let mut grouping = None;
        for (kw, by) in [("by", true), ("without", false)] {
            if self.is_word(kw) {
                self.pos += 1;
                grouping = Some((by, self.label_list()));
            }
        }
        let args = self.args(ck);
        for (kw, by) in [("by", true), ("without", false)] {
            if grouping.is_none() && self.is_word(kw) {
                self.pos += 1;
                grouping = Some((by, self.label_list()));
            }
        }
        let Some(Val::Vector { labels }) = args.last().cloned() else {
            self.errors
                .push(format!("{name}(...) aggregates no instant vector"));
            return vector(None);
        };
        let Some(ls) = labels else {
            return vector(None);
        };
        if let Some((by, g)) = &grouping {
            for x in g {
                if !ls.contains(x) {
                    self.errors.push(format!(
                        "`{name} {} ({x})`: {x} is not a label of what it aggregates, {}",
                        if *by { "by" } else { "without" },
                        show(&ls)
                    ));
                }
            }
        }
        let mut out = match &grouping {
            _ if matches!(name, "topk" | "bottomk" | "limitk" | "limit_ratio") => ls.clone(),
            Some((true, g)) => set(g),
            Some((false, g)) => ls.difference(&set(g)).cloned().collect(),
            None => Labels::new(),
        };
        if name == "count_values"
            && let Some(Val::Str(l)) = args.first()
        {
            out.insert(l.clone());
        }
        vector(Some(out))
    }

    fn function(&mut self, ck: &mut Checker, name: &str) -> Val {
        let args = self.args(ck);
        if !FUNCTIONS.contains(&name) {
            self.errors
                .push(format!("{name}() is not a PromQL function"));
            return vector(None);
        }
        let first = args.iter().find_map(|a| match a {
            Val::Vector { labels } => Some(labels.clone()),
            _ => None,
        });
        let strs: Vec<String> = args
            .iter()
            .filter_map(|a| match a {
                Val::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let need = |p: &mut Parser, ls: &Labels, x: &str| {
            if !x.is_empty() && !ls.contains(x) {
                p.errors.push(format!(
                    "{name}(): {x} is not a label of its argument, {}",
                    show(ls)
                ));
            }
        };
        match name {
            "time" | "pi" | "scalar" => Val::Scalar,
            "vector" => vector(Some(Labels::new())),
            "absent" | "absent_over_time" => vector(None),
            _ => {
                let Some(labels) = first else {
                    return vector(None);
                };
                let Some(mut ls) = labels else {
                    return vector(None);
                };
                match name {
                    "histogram_quantile" | "histogram_fraction" => {
                        need(self, &ls, "le");
                        ls.remove("le");
                    }
                    "label_replace" => {
                        if let [dst, _, src, _] = strs.as_slice() {
                            need(self, &ls, src);
                            ls.insert(dst.clone());
                        }
                    }
                    "label_join" => {
                        for src in strs.iter().skip(2) {
                            need(self, &ls, src);
                        }
                        if let Some(dst) = strs.first() {
                            ls.insert(dst.clone());
                        }
                    }
                    "sort_by_label" | "sort_by_label_desc" => {
                        for l in &strs {
                            need(self, &ls, l);
                        }
                    }
                    _ => {}
                }
                vector(Some(ls))
            }
        }
    }

    /// `name{matchers}` or `{__name__="name", ...}`.
    fn selector(&mut self, ck: &mut Checker, name: Option<String>) -> Val {
        let mut matchers = Vec::new();
        if self.is_p("{") {
            self.pos += 1;
            while let Some(Tok::Ident(l)) = self.peek().cloned() {
                self.pos += 1;
                let op = match self.next() {
                    Some(Tok::P(op)) if matches!(op, "=" | "!=" | "=~" | "!~") => op,
                    t => {
                        self.errors.push(format!("matcher {l}: unexpected {t:?}"));
                        return vector(None);
                    }
                };
                let Some(Tok::Str(v)) = self.next() else {
                    self.errors.push(format!("matcher {l}{op}: no string"));
                    return vector(None);
                };
                matchers.push((l, op, v));
                if self.is_p(",") {
                    self.pos += 1;
                }
            }
            self.expect("}");
        }
        let name = name.or_else(|| {
            matchers
                .iter()
                .find(|(l, op, _)| l == "__name__" && *op == "=")
                .map(|m| m.2.clone())
        });
        let Some(name) = name else {
            self.errors
                .push("a selector without a metric name is not checked".to_string());
            return vector(None);
        };
        ck.used.insert(name.clone());
        let (labels, values) = if ck.rules.contains_key(&name) {
            (ck.rule(&name, &mut self.errors), None)
        } else if let Some(ls) = ck.scrape.series.get(&name) {
            (Some(ls.keys().cloned().collect::<Labels>()), Some(ls))
        } else if name.contains(':') {
            self.errors.push(format!(
                "{name} looks like a recording rule but ferry-rules.yaml does not record it"
            ));
            return vector(None);
        } else {
            let family = ck
                .scrape
                .types
                .keys()
                .find(|f| name.starts_with(f.as_str()));
            self.errors.push(match family {
                Some(f) => format!(
                    "{name}: ferry declares {f} but exported no sample of {name} in this run"
                ),
                None => format!("{name} is not a metric ferry exports"),
            });
            return vector(None);
        };
        if let (Some(base), Some(values)) = (name.strip_suffix("_bucket"), values) {
            if ck.scrape.types.get(base).map(String::as_str) != Some("histogram") {
                self.errors
                    .push(format!("{name}: {base} is not declared a histogram"));
            }
            if !values.get("le").is_some_and(|v| v.contains("+Inf")) {
                self.errors.push(format!(
                    "{name} has no le=\"+Inf\" bucket (its highest is le=\"{}\"); \
                     histogram_quantile returns NaN without one",
                    values
                        .get("le")
                        .and_then(|v| v.iter().max_by(|a, b| {
                            let f = |s: &str| s.parse::<f64>().unwrap_or(0.0);
                            f(a).total_cmp(&f(b))
                        }))
                        .map(String::as_str)
                        .unwrap_or("none")
                ));
            }
        }
        let Some(ls) = labels else {
            return vector(None);
        };
        for (l, op, v) in &matchers {
            if l == "__name__" {
                continue;
            }
            if !ls.contains(l) {
                self.errors.push(format!(
                    "{name}{{{l}{op}\"{v}\"}}: {name} has no label {l} (its labels: {})",
                    show(&ls)
                ));
            } else if *op == "="
                && !v.is_empty()
                && !v.contains(VAR)
                && let Some(values) = values
                && !values[l].contains(v)
            {
                self.errors.push(format!(
                    "{name}{{{l}=\"{v}\"}}: no series of {name} has {l}=\"{v}\" (seen: {:?})",
                    values[l]
                ));
            }
        }
        vector(Some(ls))
    }
}
