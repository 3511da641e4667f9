//! Traces in a real Jaeger v2 (all-in-one: OTLP receivers, in-memory storage, query API),
//! read back through Jaeger's own query API:
//! client -> sidecar A (outbound, client span, `app-a`) -> sidecar B (inbound, server
//! span, `app-b`) -> a real upstream.
//!
//! Jaeger runs the configuration of deploy/jaeger.yaml (read from that file), built from
//! its Go module by tests/tools/build-jaeger.sh (`FERRY_JAEGER_BIN`, else the cache that
//! script fills). The sidecars get what the injector gives them: only
//! `OTEL_EXPORTER_OTLP_ENDPOINT=http://<jaeger>:4317` and `OTEL_SERVICE_NAME`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_demo::HttpUpstream;
use ferry_demo::proto::EchoRequest;
use ferry_demo::proto::echo_client::EchoClient;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use support::netns::{Namespaces, as_proxy_user, ferry_for_proxy_user, is_root, must};
use support::{Conn, Ferry, eventually};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// How long spans may take from a sidecar to Jaeger's query API (ferry batches for a
/// second, Jaeger's batch processor for 200 ms).
const ARRIVAL: Duration = Duration::from_secs(20);

/// Each test's Jaeger listens on a loopback address of its own; the README's listens on
/// every address (16686) and fixed ports. Outside a network namespace of its own (not
/// root), the README test runs alone.
static PORTS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared_ports() -> std::sync::RwLockReadGuard<'static, ()> {
    PORTS.read().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ----- Jaeger -----

/// The version tests/tools/build-jaeger.sh builds by default, e.g. `v2.12.0`.
fn built_version() -> String {
    let script = std::fs::read_to_string(repo().join("tests/tools/build-jaeger.sh")).unwrap();
    script
        .lines()
        .find_map(|l| l.strip_prefix("JAEGER_VERSION=\"${JAEGER_VERSION:-"))
        .and_then(|v| v.strip_suffix("}\""))
        .expect("build-jaeger.sh sets JAEGER_VERSION")
        .to_string()
}

/// The Jaeger binary: `FERRY_JAEGER_BIN`, else where build-jaeger.sh puts it.
fn jaeger_bin() -> PathBuf {
    let bin = match std::env::var_os("FERRY_JAEGER_BIN") {
        Some(b) => PathBuf::from(b),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
            cache
                .join("ferry-tools")
                .join(format!("jaeger-{}", built_version()))
                .join("jaeger")
        }
    };
    assert!(
        bin.exists(),
        "Jaeger is not built at {} (tests/tools/build-jaeger.sh builds it; tests/run.sh does)",
        bin.display()
    );
    bin
}

/// The `config.yaml` of deploy/jaeger.yaml's ConfigMap, as Jaeger reads it there.
fn deploy_config() -> String {
    let yaml = std::fs::read_to_string(repo().join("deploy/jaeger.yaml")).unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.yaml: |");
    let key = lines.next().expect("deploy/jaeger.yaml has a config.yaml");
    let indent = key.len() - key.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The image deploy/jaeger.yaml runs, e.g. `jaegertracing/jaeger:2.12.0`.
fn deploy_image() -> String {
    let yaml = std::fs::read_to_string(repo().join("deploy/jaeger.yaml")).unwrap();
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .expect("an image")
        .to_string()
}

/// Jaeger all-in-one with deploy/'s configuration, every listener on `host`.
struct Jaeger {
    child: Child,
    dir: tempfile::TempDir,
    host: IpAddr,
}

impl Jaeger {
    /// On a loopback address of the test's own, so tests beside each other do not clash.
    fn start(host: &str) -> Jaeger {
        let j = Jaeger::spawn(host, &[]);
        let ready = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(wait_ready(j.health()));
        assert!(ready, "Jaeger did not become healthy:\n{}", j.log());
        j
    }

    /// Spawned with `prefix` (e.g. `ip netns exec X`) in front; not waited for.
    fn spawn(host: &str, prefix: &[&str]) -> Jaeger {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, deploy_config()).unwrap();
        let bin = jaeger_bin();
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.push(bin.display().to_string());
        argv.extend(["--config".into(), config.display().to_string()]);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("JAEGER_LISTEN_HOST", host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("jaeger.log")).unwrap())
            .spawn()
            .expect("jaeger starts");
        Jaeger {
            child,
            dir,
            host: host.parse().unwrap(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jaeger.log")).unwrap_or_default()
    }

    fn otlp_grpc(&self) -> String {
        format!("http://{}", SocketAddr::new(self.host, 4317))
    }

    fn query(&self) -> SocketAddr {
        SocketAddr::new(self.host, 16686)
    }

    fn health(&self) -> SocketAddr {
        SocketAddr::new(self.host, 13133)
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Until Jaeger's health check says every component runs (the OTLP receivers start last).
async fn wait_ready(health: SocketAddr) -> bool {
    eventually(Duration::from_secs(30), || async {
        get(health, "/status").await.is_some_and(|(s, _)| s == 200)
    })
    .await
}

/// One GET; `None` when nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tx.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A span as Jaeger's API v3 returns it (OTLP JSON).
#[derive(Clone, Debug, Default)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    service: String,
    /// `client`, `server`, ...
    kind: String,
    /// `unset`, `ok` or `error`.
    status: String,
    attrs: BTreeMap<String, String>,
}

/// OTLP JSON carries ids in hex; protobuf's own JSON mapping in base64. Either way, hex.
fn hex_id(v: &Json) -> String {
    let s = v.as_str().unwrap_or_default();
    if s.chars().all(|c| c.is_ascii_hexdigit()) {
        return s.to_ascii_lowercase();
    }
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut bits, mut n, mut out) = (0u32, 0, String::new());
    for c in s.bytes().filter(|c| *c != b'=') {
        let d = alphabet.iter().position(|a| *a == c).expect("base64") as u32;
        bits = (bits << 6) | d;
        n += 6;
        if n >= 8 {
            n -= 8;
            out += &format!("{:02x}", (bits >> n) & 0xff);
        }
    }
    out
}

fn enum_name(v: &Json, prefix: &str, numbered: &[&str]) -> String {
    match v {
        Json::Number(n) => numbered
            .get(n.as_u64().unwrap_or(0) as usize)
            .unwrap_or(&"?")
            .to_string(),
        Json::String(s) => s.trim_start_matches(prefix).to_ascii_lowercase(),
        _ => numbered[0].to_string(),
    }
}

fn attr_value(v: &Json) -> String {
    let (_, v) = v
        .as_object()
        .and_then(|o| o.iter().next())
        .expect("a typed value");
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn attrs(list: &Json) -> BTreeMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["key"].as_str().unwrap().to_string(),
                attr_value(&a["value"]),
            )
        })
        .collect()
}

/// Every span of an API v3 answer (`{"result": {"resourceSpans": [...]}}`).
fn spans_of(answer: &Json) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in answer["result"]["resourceSpans"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let service = attrs(&rs["resource"]["attributes"])
            .remove("service.name")
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(Span {
                    trace: hex_id(&s["traceId"]),
                    id: hex_id(&s["spanId"]),
                    parent: hex_id(&s["parentSpanId"]),
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    service: service.clone(),
                    kind: enum_name(
                        &s["kind"],
                        "SPAN_KIND_",
                        &[
                            "unspecified",
                            "internal",
                            "server",
                            "client",
                            "producer",
                            "consumer",
                        ],
                    ),
                    status: enum_name(
                        &s["status"]["code"],
                        "STATUS_CODE_",
                        &["unset", "ok", "error"],
                    ),
                    attrs: attrs(&s["attributes"]),
                });
            }
        }
    }
    out
}

/// `GET /api/v3/traces/{id}`: the trace's spans, none while Jaeger has not got it.
async fn trace(query: SocketAddr, id: &str) -> Vec<Span> {
    match get(query, &format!("/api/v3/traces/{id}")).await {
        Some((200, body)) => spans_of(&serde_json::from_str(&body).unwrap()),
        _ => Vec::new(),
    }
}

/// Waits until Jaeger has `n` spans of trace `id`.
async fn trace_of(query: SocketAddr, id: &str, n: usize) -> Vec<Span> {
    let arrived = eventually(ARRIVAL, || async { trace(query, id).await.len() >= n }).await;
    let spans = trace(query, id).await;
    assert!(
        arrived,
        "trace {id}: {} of {n} spans in Jaeger: {spans:#?}",
        spans.len()
    );
    spans
}

/// `GET /api/v3/traces?query.service_name=...` over the last ten minutes: spans by trace.
async fn search(query: SocketAddr, service: &str) -> BTreeMap<String, Vec<Span>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rfc3339 = |secs: u64| {
        let out = Command::new("date")
            .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let path = format!(
        "/api/v3/traces?query.service_name={service}&query.start_time_min={}&query.start_time_max={}&query.num_traces=100",
        rfc3339(now - 600),
        rfc3339(now + 60)
    );
    let (status, body) = get(query, &path).await.expect("Jaeger answers");
    assert_eq!(status, 200, "{path}: {body}");
    let mut by_trace: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for s in spans_of(&serde_json::from_str(&body).unwrap()) {
        by_trace.entry(s.trace.clone()).or_default().push(s);
    }
    by_trace
}

// ----- The two sidecars -----

/// `ferry proxy` with `policy` and these variables in its environment.
fn with_env(policy: &str, env: &[(&str, String)]) -> Ferry {
    for (k, v) in env {
        support::set_child_env(k, v);
    }
    let f = Ferry::start(policy, &[], &[]);
    support::clear_child_env();
    f
}

/// The injector's settings for a sidecar: the OTLP endpoint on 4317 and a service name.
fn otel(jaeger: &str, service: &str) -> [(&'static str, String); 2] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.to_string()),
        ("OTEL_SERVICE_NAME", service.to_string()),
    ]
}

const FORMATS: &str = "defaults: {trace-propagation: \"w3c,b3,b3multi,jaeger\"}";

/// Sidecar B (explicit inbound listener) fronts `app`; sidecar A (explicit outbound
/// listener) is the caller's and sends to B.
fn two_sidecars(j: &Jaeger, app: SocketAddr) -> (Ferry, Ferry) {
    let b = with_env(
        &format!(
            "admin: 127.0.0.1:0\nlisteners: [{{name: in, bind: \"127.0.0.1:0\", service: app, direction: inbound}}]\n\
             {FORMATS}\nservices: {{app: {{endpoints: [\"{app}\"]}}}}\n"
        ),
        &otel(&j.otlp_grpc(), "app-b"),
    );
    let a = with_env(
        &format!(
            "admin: 127.0.0.1:0\nlisteners: [{{name: out, bind: \"127.0.0.1:0\", service: b}}]\n\
             {FORMATS}\nservices: {{b: {{endpoints: [\"{}\"]}}}}\n",
            b.addr("in")
        ),
        &otel(&j.otlp_grpc(), "app-a"),
    );
    (a, b)
}

/// The trace context a caller sends in `format` (`none`: no context, A starts the trace).
fn context(format: &str, trace: &str) -> Vec<(&'static str, String)> {
    match format {
        "none" => vec![],
        "w3c" => vec![("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"))],
        "b3" => vec![("b3", format!("{trace}-{CALLER_SPAN}-1"))],
        "jaeger" => vec![("uber-trace-id", format!("{trace}:{CALLER_SPAN}:0:1"))],
        f => panic!("{f}"),
    }
}

/// A's client span and B's server span, the whole trace, hung together: B's under A's,
/// A's under the caller's span when the caller sent one.
fn client_and_server(spans: &[Span], caller: Option<&str>, what: &str) -> (Span, Span) {
    assert_eq!(spans.len(), 2, "{what}: one span per hop: {spans:#?}");
    let client = spans
        .iter()
        .find(|s| s.service == "app-a")
        .unwrap_or_else(|| panic!("{what}: no span of app-a: {spans:#?}"))
        .clone();
    let server = spans
        .iter()
        .find(|s| s.service == "app-b")
        .unwrap_or_else(|| panic!("{what}: no span of app-b: {spans:#?}"))
        .clone();
    assert_eq!(client.kind, "client", "{what}: {client:#?}");
    assert_eq!(server.kind, "server", "{what}: {server:#?}");
    assert_eq!(client.trace, server.trace, "{what}");
    assert_eq!(server.parent, client.id, "{what}: B's span hangs under A's");
    assert_eq!(
        client.parent,
        caller.unwrap_or(""),
        "{what}: A's span hangs under the caller's (or is the root)"
    );
    (client, server)
}

fn attr<'a>(s: &'a Span, key: &str) -> &'a str {
    s.attrs
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{} span has no {key}: {s:#?}", s.kind))
}

// ----- Tests -----

/// HTTP: a call with each caller format (and none), then failing calls, each one trace of
/// two spans in Jaeger; searching by service finds exactly those traces.
#[test]
fn http_calls_are_one_trace_each_across_two_sidecars_in_jaeger() {
    let _ports = shared_ports();
    runtime().block_on(http_calls());
}

async fn http_calls() {
    let j = tokio::task::spawn_blocking(|| Jaeger::start("127.77.1.1"))
        .await
        .unwrap();
    let app = HttpUpstream::start("app").await.unwrap();
    let (a, b) = two_sidecars(&j, app.addr);
    let mut conn = Conn::open(a.addr("out")).await.unwrap();
    let mut traces = BTreeSet::new();
    // (caller's format, path, status the caller gets)
    let calls = [
        ("none", "/headers", 200),
        ("w3c", "/headers", 200),
        ("b3", "/headers", 200),
        ("jaeger", "/headers", 200),
        ("w3c", "/status/500", 500),
        ("b3", "/status/404", 404),
    ];
    for (i, (format, path, want)) in calls.into_iter().enumerate() {
        let what = format!("{format} {path}");
        let sent_trace = format!("{}{:02x}", &TRACE[..30], i);
        let hdrs = context(format, &sent_trace);
        let hdrs: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, body) = conn.get_with(path, &hdrs).await.unwrap();
        assert_eq!(status, want, "{what}: {body}");
        // The app's view: the trace it is part of, and its parent (B's span).
        let app_seen: Option<BTreeMap<String, String>> =
            (path == "/headers").then(|| serde_json::from_str(&body).unwrap());
        let trace_id = match (format, &app_seen) {
            ("none", Some(seen)) => seen["traceparent"].split('-').nth(1).unwrap().to_string(),
            _ => sent_trace,
        };
        let caller = (format != "none").then_some(CALLER_SPAN);
        let spans = trace_of(j.query(), &trace_id, 2).await;
        let (client, server) = client_and_server(&spans, caller, &what);
        if let Some(seen) = &app_seen {
            let tp = &seen["traceparent"];
            assert_eq!(
                tp.split('-').nth(2),
                Some(server.id.as_str()),
                "{what}: the app's parent is B's span: {tp}"
            );
        }
        for s in [&client, &server] {
            assert_eq!(s.name, "GET", "{what}: {s:#?}");
            assert_eq!(attr(s, "http.request.method"), "GET", "{what}");
            assert_eq!(attr(s, "url.path"), path, "{what}");
            assert_eq!(
                attr(s, "http.response.status_code"),
                want.to_string(),
                "{what}"
            );
        }
        // Each hop names the server it called: A called B's listener, B called the app.
        assert_eq!(attr(&client, "server.address"), "127.0.0.1", "{what}");
        assert_eq!(
            attr(&client, "server.port"),
            b.addr("in").port().to_string(),
            "{what}"
        );
        assert_eq!(attr(&server, "server.address"), "127.0.0.1", "{what}");
        assert_eq!(
            attr(&server, "server.port"),
            app.addr.port().to_string(),
            "{what}"
        );
        // A 5xx fails both spans; a 4xx fails the client's only (the server answered
        // as it should), as OpenTelemetry's HTTP conventions say.
        let (client_failed, server_failed) = (want >= 400, want >= 500);
        for (s, failed) in [(&client, client_failed), (&server, server_failed)] {
            let who = format!("{what}: {} span", s.kind);
            if failed {
                assert_eq!(s.status, "error", "{who}: {s:#?}");
                assert_eq!(attr(s, "error.type"), want.to_string(), "{who}");
            } else {
                assert_ne!(s.status, "error", "{who}: {s:#?}");
                assert!(!s.attrs.contains_key("error.type"), "{who}: {s:#?}");
            }
        }
        traces.insert(trace_id);
    }
    // Searching by service: exactly one trace per call, each with both hops.
    for service in ["app-a", "app-b"] {
        let found = search(j.query(), service).await;
        assert_eq!(
            found.keys().cloned().collect::<BTreeSet<_>>(),
            traces,
            "{service}"
        );
        for (id, spans) in &found {
            let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
            assert_eq!(
                services,
                BTreeSet::from(["app-a", "app-b"]),
                "{service}: trace {id}"
            );
        }
    }
}

async fn say(
    through: SocketAddr,
    ctx: &[(&'static str, String)],
    fail_code: i32,
) -> Result<String, tonic::Status> {
    let mut client = EchoClient::connect(format!("http://{through}"))
        .await
        .unwrap();
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        fail_code,
        ..Default::default()
    });
    for (k, v) in ctx {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    client.say(req).await.map(|r| r.into_inner().message)
}

/// Checks a gRPC call's two spans: the RPC attributes on both, the gRPC status, and the
/// span status each side should have.
fn check_grpc_spans(
    spans: &[Span],
    caller: Option<&str>,
    code: i32,
    failed: (bool, Option<bool>),
    what: &str,
) {
    let (client, server) = client_and_server(spans, caller, what);
    for s in [&client, &server] {
        assert_eq!(s.name, "ferry.demo.Echo/Say", "{what}: {s:#?}");
        assert_eq!(attr(s, "rpc.system"), "grpc", "{what}");
        assert_eq!(attr(s, "rpc.service"), "ferry.demo.Echo", "{what}");
        assert_eq!(attr(s, "rpc.method"), "Say", "{what}");
        assert_eq!(attr(s, "rpc.grpc.status_code"), code.to_string(), "{what}");
        assert_eq!(attr(s, "http.request.method"), "POST", "{what}");
        assert_eq!(attr(s, "http.response.status_code"), "200", "{what}");
        assert_eq!(attr(s, "url.path"), "/ferry.demo.Echo/Say", "{what}");
        assert!(s.attrs.contains_key("server.address"), "{what}: {s:#?}");
    }
    assert_eq!(client.status == "error", failed.0, "{what}: {client:#?}");
    if let Some(f) = failed.1 {
        assert_eq!(server.status == "error", f, "{what}: {server:#?}");
    }
}

/// gRPC: an OK call, NOT_FOUND and INTERNAL, with the caller's context in each format.
#[test]
fn grpc_calls_carry_rpc_attributes_and_status_in_jaeger() {
    let _ports = shared_ports();
    runtime().block_on(grpc_calls());
}

async fn grpc_calls() {
    let j = tokio::task::spawn_blocking(|| Jaeger::start("127.77.2.1"))
        .await
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap();
    tokio::spawn(ferry_demo::serve_grpc("g".into(), l));
    let (a, _b) = two_sidecars(&j, server);
    // (format, fail code, client span failed, server span failed when asserted)
    // NOT_FOUND on the server side: OpenTelemetry's gRPC conventions leave a server
    // span's status unset for it (the server did its job), so that is not asserted.
    let calls = [
        ("w3c", 0, (false, Some(false))),
        ("b3", 5, (true, None)),
        ("jaeger", 13, (true, Some(true))),
        ("none", 0, (false, Some(false))),
    ];
    for (i, (format, code, failed)) in calls.into_iter().enumerate() {
        let what = format!("{format} code {code}");
        let trace_id = format!("{}{:02x}", &TRACE[..30], 0x10 + i);
        let got = say(a.addr("out"), &context(format, &trace_id), code).await;
        match code {
            0 => assert_eq!(got.unwrap(), "hi", "{what}"),
            c => assert_eq!(got.unwrap_err().code(), tonic::Code::from_i32(c), "{what}"),
        }
        if format == "none" {
            // A started the trace: find it by service instead.
            let started_by_a = || async {
                search(j.query(), "app-a")
                    .await
                    .into_iter()
                    .find(|(id, spans)| !id.starts_with(&TRACE[..30]) && spans.len() >= 2)
            };
            assert!(
                eventually(ARRIVAL, || async { started_by_a().await.is_some() }).await,
                "{what}: no trace started by A in Jaeger"
            );
            let (_, spans) = started_by_a().await.unwrap();
            check_grpc_spans(&spans, None, code, failed, &what);
            let all = search(j.query(), "app-a").await;
            assert_eq!(all.len(), calls.len(), "one trace per call: {all:#?}");
        } else {
            let spans = trace_of(j.query(), &trace_id, 2).await;
            check_grpc_spans(&spans, Some(CALLER_SPAN), code, failed, &what);
        }
    }
}

/// Transparent mode: a client pod and a server pod (network namespaces, `ferry init`,
/// sidecars as uid 1337 on 15001/15006), Jaeger in a third namespace reached from both.
/// The app calls the server pod's own address; one trace of two spans comes out.
#[test]
fn transparent_sidecars_in_two_pods_make_one_trace_in_jaeger() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and iptables (CI runs as root)");
        return;
    }
    const CLIENT: &str = "10.251.1.1";
    const SERVER: &str = "10.251.1.2";
    const JAEGER_FROM_CLIENT: &str = "10.251.2.2";
    const JAEGER_FROM_SERVER: &str = "10.251.3.2";
    let ns = Namespaces::new("ferry-jg", 3);
    ns.link(0, &format!("{CLIENT}/24"), 1, &format!("{SERVER}/24"));
    ns.link(0, "10.251.2.1/24", 2, &format!("{JAEGER_FROM_CLIENT}/24"));
    ns.link(1, "10.251.3.1/24", 2, &format!("{JAEGER_FROM_SERVER}/24"));

    let jaeger = Jaeger::spawn("0.0.0.0", &["ip", "netns", "exec", ns.name(2)]);
    let local = SocketAddr::from(([127, 0, 0, 1], 13133));
    assert!(
        ns.run(2, move || wait_ready(local)),
        "Jaeger did not become healthy:\n{}",
        jaeger.log()
    );

    // The server pod's apps, on every address.
    ns.spawn(1, || async {
        let l = tokio::net::TcpListener::bind("0.0.0.0:8080").await.unwrap();
        tokio::spawn(ferry_demo::serve_http("server-app".into(), l));
        let l = tokio::net::TcpListener::bind("0.0.0.0:50051")
            .await
            .unwrap();
        tokio::spawn(ferry_demo::serve_grpc("server-grpc".into(), l));
        std::future::pending::<()>().await
    });

    // Each pod: `ferry init`, then the sidecar as uid 1337 with the injector's settings.
    let (_bin_dir, bin, _) = ferry_for_proxy_user();
    let policy = format!(
        "admin: 0.0.0.0:15000\n{FORMATS}\nlisteners:\n  - {{name: outbound, bind: \"0.0.0.0:15001\", transparent: outbound}}\n  - {{name: inbound, bind: \"0.0.0.0:15006\", transparent: inbound}}\n"
    );
    let mut sidecars = Vec::new();
    for (i, service, jaeger_ip) in [
        (0, "app-a", JAEGER_FROM_CLIENT),
        (1, "app-b", JAEGER_FROM_SERVER),
    ] {
        must(&["ip", "netns", "exec", ns.name(i), &bin, "init"]);
        let prefix = as_proxy_user(ns.name(i));
        let dir = tempfile::tempdir().unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(dir.path().join("policy.yaml"), &policy).unwrap();
        for (k, v) in otel(&format!("http://{jaeger_ip}:4317"), service) {
            support::set_child_env(k, &v);
        }
        sidecars.push(Ferry::start_bin(dir, &bin, &[], &prefix));
        support::clear_child_env();
    }

    // The client pod's app calls the server pod's address: HTTP and gRPC.
    let http_trace = format!("{}{:02x}", &TRACE[..30], 0x20);
    let grpc_trace = format!("{}{:02x}", &TRACE[..30], 0x21);
    let (tp, grpc_trace_sent) = (
        format!("00-{http_trace}-{CALLER_SPAN}-01"),
        context("b3", &grpc_trace),
    );
    let (seen, grpc) = ns.run(0, move || async move {
        let to: SocketAddr = format!("{SERVER}:8080").parse().unwrap();
        let mut conn = Conn::open(to).await.unwrap();
        let (status, _, body) = conn
            .get_with("/headers", &[("traceparent", tp.as_str())])
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let seen: BTreeMap<String, String> = serde_json::from_str(&body).unwrap();
        let grpc = say(
            format!("{SERVER}:50051").parse().unwrap(),
            &grpc_trace_sent,
            5,
        )
        .await;
        (seen, grpc.map_err(|s| s.code()))
    });
    assert_eq!(grpc, Err(tonic::Code::NotFound));
    // The app got the call through both sidecars: B's span is its parent.
    let app_parent = seen["traceparent"].split('-').nth(2).unwrap().to_string();

    let query = SocketAddr::from(([127, 0, 0, 1], 16686));
    let (h, g, found) = ns.run(2, move || async move {
        let h = trace_of(query, &http_trace, 2).await;
        let g = trace_of(query, &grpc_trace, 2).await;
        (h, g, search(query, "app-a").await)
    });
    let (client, server) = client_and_server(&h, Some(CALLER_SPAN), "transparent HTTP");
    assert_eq!(app_parent, server.id, "the app's parent is B's span");
    for s in [&client, &server] {
        assert_eq!(attr(s, "http.request.method"), "GET");
        assert_eq!(attr(s, "url.path"), "/headers");
        assert_eq!(attr(s, "http.response.status_code"), "200");
        assert_eq!(attr(s, "server.port"), "8080");
        assert_ne!(s.status, "error", "{s:#?}");
    }
    // A called the server pod's address; B handed the call to the app at that address.
    assert_eq!(attr(&client, "server.address"), SERVER);
    assert_eq!(attr(&server, "server.address"), SERVER);
    assert_eq!(attr(&server, "network.peer.address"), CLIENT);
    check_grpc_spans(&g, Some(CALLER_SPAN), 5, (true, None), "transparent gRPC");
    assert_eq!(found.len(), 2, "one trace per call: {found:#?}");
    drop(sidecars);
    drop(jaeger);
}

/// The README's "Traces in Jaeger" block, run as written with bash: it builds (here: finds)
/// and starts Jaeger, starts `ferry demo` exporting to it, makes a call, and asks
/// Jaeger's API for the call's trace, which must be there. In a network namespace of its
/// own when root (the demo and Jaeger use fixed ports); with the test's ferry and Jaeger
/// first on PATH.
#[test]
fn the_readme_jaeger_commands_work_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## Traces in Jaeger\n")
        .nth(1)
        .expect("README has a Traces in Jaeger section");
    let section = section.split("\n## ").next().unwrap();
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a sh block in the section");
    // The call's trace id, from the traceparent the block sends.
    let trace_id = block
        .split("traceparent: 00-")
        .nth(1)
        .and_then(|t| t.get(..32))
        .expect("the block calls with a traceparent")
        .to_string();
    assert!(
        block.contains(&format!("/api/v3/traces/{trace_id}")),
        "the block asks Jaeger for the call's trace: {block}"
    );

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("block.sh");
    std::fs::write(&script, block).unwrap();
    let out = dir.path().join("out.txt");
    let jaeger = jaeger_bin();
    let ferry = Path::new(env!("CARGO_BIN_EXE_ferry"));
    let path = format!(
        "{}:{}:{}",
        ferry.parent().unwrap().display(),
        jaeger.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ns = is_root().then(|| Namespaces::new("ferry-readme", 1));
    let _alone = ns
        .is_none()
        .then(|| PORTS.write().unwrap_or_else(|e| e.into_inner()));
    let mut argv: Vec<String> = match &ns {
        Some(ns) => ["ip", "netns", "exec", ns.name(0)]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        None => vec![],
    };
    argv.extend([
        "bash".into(),
        "-e".into(),
        "-o".into(),
        "pipefail".into(),
        script.display().to_string(),
    ]);
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(repo())
        .env("PATH", path)
        .env("FERRY_JAEGER_BIN", &jaeger)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::inherit())
        // Its own process group: what the block leaves running in the background is
        // stopped with it.
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
    let _ = child.wait();
    let printed = std::fs::read_to_string(&out).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the block did not finish in 120 s:\n{printed}"));
    assert!(status.success(), "the block failed ({status}):\n{printed}");
    // The last command's answer: the trace, with the demo's client span under the
    // caller's span.
    let json = printed
        .rfind("{\"result\"")
        .map(|i| &printed[i..])
        .unwrap_or_else(|| panic!("no trace printed:\n{printed}"));
    let spans = spans_of(&serde_json::from_str(json.trim()).unwrap());
    let parent = block
        .split(&format!("traceparent: 00-{trace_id}-"))
        .nth(1)
        .and_then(|t| t.get(..16))
        .unwrap();
    assert!(
        spans.iter().any(|s| s.trace == trace_id
            && s.service == "web"
            && s.kind == "client"
            && s.parent == parent
            && s.attrs.get("url.path").map(String::as_str) == Some("/")),
        "{spans:#?}"
    );
    drop(ns);
}

/// deploy/jaeger.yaml runs the version the tests build, with the configuration they run,
/// and the built binary is that version.
#[test]
fn deploy_runs_the_jaeger_the_tests_run() {
    let version = built_version();
    assert_eq!(
        deploy_image(),
        format!("jaegertracing/jaeger:{}", version.trim_start_matches('v'))
    );
    let out = Command::new(jaeger_bin()).arg("version").output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&version), "jaeger version: {text}");
    let config = deploy_config();
    for needed in [":4317\"", ":4318\"", ":16686\"", "memory:"] {
        assert!(config.contains(needed), "{needed} in {config}");
    }
}
