//! The admin API, called in-process with `oneshot` (the router is a plain function of
//! its state), and checked against the OpenAPI document kept beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use ferry_admin::{AdminState, Control, app};
use ferry_policy::Policy;
use ferry_proxy::{DefaultDiscover, Metrics, Shared};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use serde_json::Value as Json;
use tower::ServiceExt;

const FILE: &str = r#"
listeners: [{name: web, bind: "127.0.0.1:0", service: web}]
defaults: {timeout: 2s}
services:
  web:
    endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]
    lb: round-robin
"#;

struct Fixture {
    state: AdminState,
    shutdown: Arc<AtomicBool>,
}

fn fixture(token: Option<&str>) -> Fixture {
    let file = Policy::from_yaml(FILE).unwrap();
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let shared = Shared::new(file.clone(), Arc::new(DefaultDiscover::default()), metrics).unwrap();
    let control = Control::new(shared, file, "test policy");
    let shutdown = Arc::new(AtomicBool::new(false));
    let s = shutdown.clone();
    let state = AdminState {
        control,
        registry: Arc::new(registry),
        token: token.map(Arc::from),
        set_log_level: Some(Arc::new(|l: &str| {
            if l == "bogus[" {
                Err("is not a log filter".into())
            } else {
                Ok(())
            }
        })),
        shutdown: Arc::new(move || s.store(true, Ordering::SeqCst)),
    };
    Fixture { state, shutdown }
}

const LOOPBACK: &str = "127.0.0.1:40000";
const REMOTE: &str = "10.250.0.2:40000";

async fn call(
    state: &AdminState,
    method: Method,
    path: &str,
    body: &str,
    peer: &str,
    auth: Option<&str>,
) -> (StatusCode, String, Json) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = auth {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut req = req.body(Body::from(body.to_string())).unwrap();
    let peer: SocketAddr = peer.parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or(Json::String(String::from_utf8_lossy(&bytes).into()));
    (status, ctype, json)
}

#[tokio::test]
async fn an_invalid_put_lists_every_error_and_the_version_stays() {
    let f = fixture(None);
    let (_, _, before) = call(&f.state, Method::GET, "/policy", "", LOOPBACK, None).await;
    let bad = "services:\n  web:\n    timeout: banana\n    lb: fastest\n";
    let (status, _, body) = call(&f.state, Method::PUT, "/policy", bad, LOOPBACK, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let errors: Vec<String> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("services.web.timeout: \"banana\" is not a duration"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("services.web.lb: \"fastest\" is not a balancer"))
    );
    let (_, _, after) = call(&f.state, Method::GET, "/policy", "", LOOPBACK, None).await;
    assert_eq!(before["version"], after["version"]);
    assert_eq!(before["policy"], after["policy"]);
}

#[tokio::test]
async fn a_listener_pointing_nowhere_is_refused_whole() {
    let f = fixture(None);
    let doc = "listeners: [{name: x, bind: \"127.0.0.1:0\", service: missing}]";
    let (status, _, body) = call(&f.state, Method::PUT, "/policy", doc, LOOPBACK, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("\"missing\" is not a service"),
        "{body}"
    );
}

#[tokio::test]
async fn put_layers_over_the_file_and_sources_say_so() {
    let f = fixture(None);
    let (status, _, body) = call(
        &f.state,
        Method::PUT,
        "/policy",
        "services: {web: {lb: maglev}}",
        LOOPBACK,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    let (_, _, p) = call(&f.state, Method::GET, "/policy", "", LOOPBACK, None).await;
    assert_eq!(p["version"], 2);
    assert_eq!(p["policy"]["services"]["web"]["lb"], "maglev");
    assert_eq!(p["sources"]["services.web.lb"], "admin");
    assert_eq!(p["sources"]["services.web.timeout"], "file");
    assert_eq!(p["sources"]["services.web.retries"], "default");
    assert_eq!(p["sources"]["services.web.endpoints"], "file");
    let (_, _, eps) = call(&f.state, Method::GET, "/endpoints", "", LOOPBACK, None).await;
    assert_eq!(eps["services"]["web"]["lb"], "maglev");
    assert_eq!(
        eps["services"]["web"]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Rollback returns to version 1's layers, as a new version.
    let (status, _, body) = call(
        &f.state,
        Method::POST,
        "/policy/rollback",
        "",
        LOOPBACK,
        None,
    )
    .await;
    assert_eq!(
        (status, body["version"].as_u64()),
        (StatusCode::OK, Some(3))
    );
    let (_, _, p) = call(&f.state, Method::GET, "/policy", "", LOOPBACK, None).await;
    assert_eq!(p["policy"]["services"]["web"]["lb"], "round-robin");
    let sources: Vec<&str> = p["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["rollback", "admin", "startup"]);
    let (status, _, _) = call(
        &f.state,
        Method::POST,
        "/policy/rollback",
        "",
        LOOPBACK,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn validate_changes_nothing() {
    let f = fixture(None);
    let (status, _, body) = call(
        &f.state,
        Method::POST,
        "/policy/validate",
        "{\"defaults\": {\"retries\": 3}}",
        REMOTE,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["policy"]["defaults"]["retries"], "3");
    let (_, _, p) = call(&f.state, Method::GET, "/policy", "", LOOPBACK, None).await;
    assert_eq!(p["version"], 1);
    let (status, _, _) = call(
        &f.state,
        Method::POST,
        "/policy/validate",
        "defaults: {retries: many}",
        REMOTE,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn changes_need_loopback_or_the_token() {
    let f = fixture(Some("s3cret"));
    for (method, path, body) in [
        (Method::PUT, "/policy", "{}"),
        (Method::POST, "/policy/rollback", ""),
        (Method::PUT, "/log-level", "debug"),
        (Method::POST, "/shutdown", ""),
    ] {
        let (status, _, _) = call(&f.state, method.clone(), path, body, REMOTE, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        let (status, _, _) =
            call(&f.state, method.clone(), path, body, REMOTE, Some("wrong")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    assert!(!f.shutdown.load(Ordering::SeqCst));
    let (status, _, _) = call(
        &f.state,
        Method::PUT,
        "/log-level",
        "{\"level\":\"debug\"}",
        REMOTE,
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &f.state,
        Method::PUT,
        "/log-level",
        "bogus[",
        LOOPBACK,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Reads stay open.
    let (status, _, _) = call(&f.state, Method::GET, "/policy", "", REMOTE, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &f.state,
        Method::POST,
        "/shutdown",
        "",
        REMOTE,
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(f.shutdown.load(Ordering::SeqCst));
}

// === the OpenAPI document ===

fn openapi() -> Json {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn resolve<'a>(doc: &'a Json, schema: &'a Json) -> &'a Json {
    match schema.get("$ref").and_then(Json::as_str) {
        Some(r) => {
            let path = r.trim_start_matches("#/").split('/');
            path.fold(doc, |node, key| &node[key])
        }
        None => schema,
    }
}

/// Checks types and required properties, recursively: enough to catch drift between
/// the server and its document.
fn conforms(doc: &Json, schema: &Json, value: &Json, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() && schema["nullable"] == Json::Bool(true) {
        return Ok(());
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: expected {ty}, got {value}"));
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(value)
    {
        return Err(format!("{at}: {value} not in {e:?}"));
    }
    if let Some(req) = schema["required"].as_array() {
        for r in req {
            let r = r.as_str().unwrap();
            if value.get(r).is_none() {
                return Err(format!("{at}: missing required {r}"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), value.as_object()) {
        for (k, s) in props {
            if let Some(v) = obj.get(k) {
                conforms(doc, s, v, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Some(extra), Some(obj)) = (
        schema.get("additionalProperties").filter(|a| a.is_object()),
        value.as_object(),
    ) {
        for (k, v) in obj {
            if schema["properties"].get(k).is_none() {
                conforms(doc, extra, v, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let doc = openapi();
    let f = fixture(None);
    // A request body per operation, chosen to reach a documented success.
    let bodies = |path: &str| match path {
        "/policy" => "services: {web: {timeout: 3s}}",
        "/policy/validate" => "{}",
        "/log-level" => "info",
        _ => "",
    };
    let mut seen = 0;
    // Shutdown last: it flips the fixture's flag, nothing else.
    let mut ops: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (p.clone(), m.clone()))
        })
        .collect();
    ops.sort_by_key(|(p, m)| {
        (
            p == "/shutdown",
            p == "/policy/rollback",
            m == "get",
            p.clone(),
        )
    });
    for (path, method) in ops {
        let op = &doc["paths"][&path][&method];
        let m: Method = method.to_uppercase().parse().unwrap();
        let (status, ctype, body) = call(&f.state, m, &path, bodies(&path), LOOPBACK, None).await;
        let resp = &op["responses"][status.as_str()];
        assert!(
            resp.is_object(),
            "{method} {path} answered {status}, which the document does not list: {body}"
        );
        let content = resp["content"].as_object().unwrap();
        let (media, spec) = content
            .iter()
            .find(|(k, _)| ctype.starts_with(k.as_str()))
            .unwrap_or_else(|| panic!("{method} {path}: content-type {ctype} not documented"));
        if media == "application/json" {
            conforms(&doc, &spec["schema"], &body, &format!("{method} {path}")).unwrap();
        }
        seen += 1;
    }
    assert_eq!(seen, 12);
    // And nothing is served that the document leaves out.
    let (status, _, body) = call(&f.state, Method::GET, "/nope", "", LOOPBACK, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
}
