//! Traces across two sidecars, checked at a real OTLP collector (rotel, from PyPI):
//! client -> sidecar A (outbound, client span) -> sidecar B (inbound, server span) -> app.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_demo::HttpUpstream;
use support::{Conn, Ferry, eventually};

/// A span as the collector printed it.
#[derive(Clone, Debug, Default)]
struct Span {
    name: String,
    trace: String,
    parent: String,
    id: String,
    kind: String,
    service: String,
    attrs: BTreeMap<String, String>,
}

/// rotel's collector, printing every span it receives to a file.
struct Collector {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
    grpc: SocketAddr,
    http: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Collector {
    fn start() -> Collector {
        Collector::start_at(([127, 0, 0, 1], free_port()).into())
    }

    /// gRPC on port 4317, on a loopback address of its own so nothing else there clashes.
    fn start_on_4317() -> Collector {
        Collector::start_at(([127, 0, 43, 17], 4317).into())
    }

    fn start_at(grpc: SocketAddr) -> Collector {
        let bin = Command::new("python3")
            .args(["-c", "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))"])
            .output()
            .expect("python3 runs");
        let bin = String::from_utf8(bin.stdout).unwrap().trim().to_string();
        assert!(
            std::path::Path::new(&bin).exists(),
            "rotel is not installed (pip install rotel; tests/run.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.txt");
        let http = free_port();
        let child = Command::new(bin)
            .args([
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
            ])
            .args([
                "--otlp-grpc-endpoint",
                &grpc.to_string(),
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{http}"),
            ])
            .args(["--batch-timeout", "100ms"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let c = Collector {
            child,
            out,
            _dir: dir,
            grpc,
            http: ([127, 0, 0, 1], http).into(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(c.grpc).is_err()
            || std::net::TcpStream::connect(c.http).is_err()
        {
            assert!(std::time::Instant::now() < deadline, "rotel did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn spans(&self) -> Vec<Span> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut spans = Vec::new();
        let mut service = String::new();
        let mut cur: Option<Span> = None;
        let mut in_attrs = false;
        for line in text.lines() {
            let t = line.trim();
            if let Some(v) = t.strip_prefix("-> service.name: Str(") {
                service = v.trim_end_matches(')').to_string();
                continue;
            }
            if t.starts_with("Span #") {
                spans.extend(cur.take());
                cur = Some(Span {
                    service: service.clone(),
                    ..Span::default()
                });
                in_attrs = false;
                continue;
            }
            if t.starts_with("ResourceSpans #") {
                spans.extend(cur.take());
            }
            let Some(s) = cur.as_mut() else { continue };
            let field = |p: &str| {
                t.strip_prefix(p)
                    .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
            };
            if let Some(v) = field("Name") {
                s.name = v;
            } else if let Some(v) = field("Trace ID") {
                s.trace = v;
            } else if let Some(v) = field("Parent ID") {
                s.parent = v;
            } else if let Some(v) = field("ID") {
                s.id = v;
            } else if let Some(v) = field("Kind") {
                s.kind = v;
            } else if t.starts_with("Attributes:") {
                in_attrs = true;
            } else if in_attrs
                && let Some((k, v)) = t.strip_prefix("-> ").and_then(|kv| kv.split_once(": "))
            {
                let v = v
                    .split_once('(')
                    .map(|(_, v)| v.trim_end_matches(')'))
                    .unwrap_or(v);
                s.attrs.insert(k.to_string(), v.to_string());
            }
        }
        spans.extend(cur);
        spans
    }

    fn spans_of(&self, service: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.service == service)
            .collect()
    }

    fn trace(&self, id: &str) -> Vec<Span> {
        self.spans().into_iter().filter(|s| s.trace == id).collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sidecar B fronts the app (server spans, exported over OTLP/HTTP); sidecar A is the
/// caller's (client spans, exported over OTLP/gRPC) and sends to B.
fn two_sidecars(c: &Collector, app: SocketAddr) -> (Ferry, Ferry) {
    let b_policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: in, bind: \"127.0.0.1:0\", service: app, direction: inbound}}]\n\
         defaults: {{trace-propagation: \"w3c,b3,b3multi,jaeger\"}}\nservices: {{app: {{endpoints: [\"{app}\"]}}}}\n"
    );
    let b = with_env(
        &b_policy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.http)),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("OTEL_SERVICE_NAME", "app-b".into()),
        ],
    );
    let a_policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: out, bind: \"127.0.0.1:0\", service: b}}]\n\
         defaults: {{trace-propagation: \"w3c,b3,b3multi,jaeger\"}}\nservices: {{b: {{endpoints: [\"{}\"]}}}}\n",
        b.addr("in")
    );
    let a = with_env(
        &a_policy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.grpc)),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_SERVICE_NAME", "app-a".into()),
        ],
    );
    (a, b)
}

fn with_env(policy: &str, env: &[(&str, String)]) -> Ferry {
    for (k, v) in env {
        // Each sidecar is a child process; the variables only reach it through this.
        support::set_child_env(k, v);
    }
    let f = Ferry::start(policy, &[], &[]);
    support::clear_child_env();
    f
}

async fn headers_seen(through: SocketAddr, sent: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut c = Conn::open(through).await.unwrap();
    let (status, _, body) = c.get_with("/headers", sent).await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn one_trace_across_two_sidecars_in_every_format() {
    let c = Collector::start();
    let app = HttpUpstream::start("app").await.unwrap();
    let (a, _b) = two_sidecars(&c, app.addr);

    // Each format the caller may use, read by A, carried to B, written on to the app.
    let inputs: [(&str, Vec<(&str, String)>); 4] = [
        (
            "w3c",
            vec![("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))],
        ),
        ("b3", vec![("b3", format!("{TRACE}-{CALLER_SPAN}-1"))]),
        (
            "b3multi",
            vec![
                ("x-b3-traceid", TRACE.into()),
                ("x-b3-spanid", CALLER_SPAN.into()),
                ("x-b3-sampled", "1".into()),
            ],
        ),
        (
            "jaeger",
            vec![("uber-trace-id", format!("{TRACE}:{CALLER_SPAN}:0:1"))],
        ),
    ];
    for (i, (format, hdrs)) in inputs.iter().enumerate() {
        // A distinct trace per format, so spans can be told apart.
        let trace = format!("{}{:02x}", &TRACE[..30], i);
        let hdrs: Vec<(&str, String)> = hdrs
            .iter()
            .map(|(k, v)| (*k, v.replace(TRACE, &trace)))
            .collect();
        let sent: Vec<(&str, &str)> = hdrs
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain([("baggage", "user=42")])
            .collect();
        let seen = headers_seen(a.addr("out"), &sent).await;
        // The app sees every format, one trace id, and B's span as its parent.
        let tp = &seen["traceparent"];
        assert!(
            tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-01"),
            "{format}: {tp}"
        );
        assert!(seen["b3"].starts_with(&trace), "{format}: {seen:?}");
        assert_eq!(seen["x-b3-traceid"], trace, "{format}");
        assert!(seen["uber-trace-id"].starts_with(&trace), "{format}");
        assert_eq!(seen["baggage"], "user=42", "baggage passes through");
        assert!(seen.contains_key("x-request-id"));
        let app_parent = tp.split('-').nth(2).unwrap().to_string();

        assert!(
            eventually(Duration::from_secs(15), || async {
                c.trace(&trace).len() >= 2
            })
            .await,
            "{format}: the collector did not get both spans: {:?}",
            c.spans()
        );
        let spans = c.trace(&trace);
        let client = spans
            .iter()
            .find(|s| s.service == "app-a")
            .expect("a span from sidecar A");
        let server = spans
            .iter()
            .find(|s| s.service == "app-b")
            .expect("a span from sidecar B");
        assert_eq!(client.kind, "SPAN_KIND_CLIENT");
        assert_eq!(server.kind, "SPAN_KIND_SERVER");
        assert_eq!(
            client.parent, CALLER_SPAN,
            "{format}: A's span hangs under the caller's"
        );
        assert_eq!(
            server.parent, client.id,
            "{format}: B's span hangs under A's"
        );
        assert_eq!(
            app_parent, server.id,
            "{format}: the app's parent is B's span"
        );
        assert_eq!(server.attrs["http.response.status_code"], "200");
        assert_eq!(server.attrs["url.path"], "/headers");
        assert_eq!(server.attrs["server.port"], app.addr.port().to_string());
    }
}

#[tokio::test]
async fn a_sampled_out_parent_exports_nothing_but_still_propagates() {
    let c = Collector::start();
    let app = HttpUpstream::start("app").await.unwrap();
    let (a, _b) = two_sidecars(&c, app.addr);
    let out_trace = format!("{}ff", &TRACE[..30]);
    let seen = headers_seen(
        a.addr("out"),
        &[("traceparent", &format!("00-{out_trace}-{CALLER_SPAN}-00"))],
    )
    .await;
    assert!(
        seen["traceparent"].starts_with(&format!("00-{out_trace}-"))
            && seen["traceparent"].ends_with("-00")
    );
    assert_eq!(seen["x-b3-sampled"], "0");
    // A sampled request afterwards shows the exporters work, so silence means something.
    let in_trace = format!("{}ee", &TRACE[..30]);
    headers_seen(
        a.addr("out"),
        &[("traceparent", &format!("00-{in_trace}-{CALLER_SPAN}-01"))],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            c.trace(&in_trace).len() >= 2
        })
        .await
    );
    assert!(
        c.trace(&out_trace).is_empty(),
        "a sampled-out trace was exported"
    );
}

#[tokio::test]
async fn a_dead_collector_fails_no_request_and_drops_are_counted() {
    let c = Collector::start();
    let app = HttpUpstream::start("app").await.unwrap();
    let (a, _b) = two_sidecars(&c, app.addr);
    drop(c);
    let mut conn = Conn::open(a.addr("out")).await.unwrap();
    for _ in 0..300 {
        assert_eq!(conn.get("/").await.unwrap().0, 200);
    }
    // The collector is gone: exports fail (refused) or time out, each counted by reason.
    let dropped = |m: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("ferry_spans_dropped_total{reason=\"export-failed\"}")
                    || l.starts_with("ferry_spans_dropped_total{reason=\"export-timeout\"}")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            dropped(&a.metrics().await) > 0
        })
        .await,
        "the dropped-span counter never rose: {}",
        a.metrics().await
    );
    // And the admin API says where spans were going and why they did not arrive.
    let (status, t) = a.admin("GET", "/tracing", "").await;
    assert_eq!(status, 200);
    assert_eq!(t["exporting"], true, "{t}");
    assert_eq!(t["protocol"], "grpc", "{t}");
    assert!(
        t["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{t}"
    );
    assert!(
        !t["last_error"]["error"].as_str().unwrap_or("").is_empty(),
        "{t}"
    );
    assert!(t["last_success"].is_null(), "{t}");
}

/// A newcomer's mistake the README used to invite: the endpoint is the gRPC port 4317 and
/// no protocol is set. ferry speaks gRPC to 4317 (saying so in GET /tracing), and spans
/// arrive.
#[tokio::test]
async fn an_endpoint_on_port_4317_without_a_protocol_gets_grpc() {
    let c = Collector::start_on_4317();
    let app = HttpUpstream::start("app").await.unwrap();
    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: out, bind: \"127.0.0.1:0\", service: app}}]\n\
         services: {{app: {{endpoints: [\"{}\"]}}}}\n",
        app.addr
    );
    let a = with_env(
        &policy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.grpc)),
            ("OTEL_SERVICE_NAME", "app-4317".into()),
        ],
    );
    let (_, t) = a.admin("GET", "/tracing", "").await;
    assert_eq!(t["protocol"], "grpc", "{t}");
    assert!(t["protocol_note"].as_str().unwrap().contains("4317"), "{t}");
    let mut conn = Conn::open(a.addr("out")).await.unwrap();
    assert_eq!(conn.get("/").await.unwrap().0, 200);
    assert!(
        eventually(Duration::from_secs(20), || async {
            !c.spans_of("app-4317").is_empty()
        })
        .await,
        "no span of app-4317 reached the collector on 4317"
    );
    // The collector prints a span before it answers the export that carried it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.admin("GET", "/tracing", "").await.1["last_success"].is_string()
        })
        .await,
        "{}",
        a.admin("GET", "/tracing", "").await.1
    );
}

#[tokio::test]
async fn spans_still_queued_are_exported_before_the_sidecar_exits() {
    let c = Collector::start();
    let app = HttpUpstream::start("app").await.unwrap();
    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: out, bind: \"127.0.0.1:0\", service: app}}]\nservices: {{app: {{endpoints: [\"{}\"]}}}}\n",
        app.addr
    );
    let mut a = with_env(
        &policy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.grpc)),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_SERVICE_NAME", "app-a".into()),
        ],
    );
    let trace = format!("{}dd", &TRACE[..30]);
    headers_seen(
        a.addr("out"),
        &[("traceparent", &format!("00-{trace}-{CALLER_SPAN}-01"))],
    )
    .await;
    // Straight away, well inside the exporter's one-second batching window.
    a.signal("TERM");
    let status = tokio::task::spawn_blocking(move || a.child.wait().map(|s| (s, a)))
        .await
        .unwrap()
        .unwrap();
    assert!(status.0.success());
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.trace(&trace).len() == 1
        })
        .await,
        "the span queued at shutdown was lost"
    );
}

/// A gRPC error in trailers (NOT_FOUND after a reply) marks both hops' spans failed with
/// `rpc.grpc.status_code` 5, and the spans end with the call, not at its headers.
#[tokio::test]
async fn a_grpc_status_in_trailers_is_on_both_spans() {
    use ferry_demo::proto::EchoRequest;
    use ferry_demo::proto::echo_client::EchoClient;
    use futures::StreamExt;

    let c = Collector::start();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap();
    tokio::spawn(ferry_demo::serve_grpc("g".into(), l));
    let (a, _b) = two_sidecars(&c, server);
    let mut client = EchoClient::connect(format!("http://{}", a.addr("out")))
        .await
        .unwrap();
    let req = |m: &str, fail_code: i32| EchoRequest {
        message: m.into(),
        fail_code,
        ..Default::default()
    };
    let mut s = client
        .chat(futures::stream::iter(vec![req("ok", 0), req("gone", 5)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.next().await.unwrap().unwrap().message, "ok");
    assert_eq!(
        s.next().await.unwrap().unwrap_err().code(),
        tonic::Code::NotFound
    );
    drop(s);
    let chat = |svc: &str| {
        c.spans_of(svc)
            .into_iter()
            .find(|s| s.attrs.get("rpc.method").map(String::as_str) == Some("Chat"))
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            chat("app-a").is_some() && chat("app-b").is_some()
        })
        .await,
        "the Chat spans never arrived"
    );
    for (svc, kind) in [("app-a", "CLIENT"), ("app-b", "SERVER")] {
        let span = chat(svc).unwrap();
        assert!(span.kind.contains(kind), "{svc}: {span:?}");
        assert_eq!(
            span.attrs.get("rpc.grpc.status_code").map(String::as_str),
            Some("5"),
            "{svc}: {span:?}"
        );
        assert_eq!(
            span.attrs.get("error.type").map(String::as_str),
            Some("NOT_FOUND"),
            "{svc}: {span:?}"
        );
    }
}

/// A matched route names the span (`GET /status`) and is its `http.route`.
#[tokio::test]
async fn a_matched_route_names_the_span() {
    let c = Collector::start();
    let app = HttpUpstream::start("app").await.unwrap();
    let policy = format!(
        "admin: 127.0.0.1:0\nlisteners: [{{name: out, bind: \"127.0.0.1:0\", service: app}}]\n\
         services:\n  app:\n    endpoints: [\"{}\"]\n    routes:\n      - match: {{path-prefix: /status}}\n        timeout: 2s\n",
        app.addr
    );
    let a = with_env(
        &policy,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.grpc)),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_SERVICE_NAME", "app-route".into()),
        ],
    );
    let mut conn = Conn::open(a.addr("out")).await.unwrap();
    assert_eq!(conn.get("/status/201").await.unwrap().0, 201);
    assert_eq!(conn.get("/").await.unwrap().0, 200);
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.spans_of("app-route").len() >= 2
        })
        .await,
        "spans never arrived"
    );
    let spans = c.spans_of("app-route");
    let routed = spans
        .iter()
        .find(|s| s.attrs.get("url.path").map(String::as_str) == Some("/status/201"))
        .unwrap();
    assert_eq!(routed.name, "GET /status", "{routed:?}");
    assert_eq!(
        routed.attrs.get("http.route").map(String::as_str),
        Some("/status")
    );
    let other = spans
        .iter()
        .find(|s| s.attrs.get("url.path").map(String::as_str) == Some("/"))
        .unwrap();
    assert_eq!(other.name, "GET", "{other:?}");
    assert!(!other.attrs.contains_key("http.route"), "{other:?}");
}
