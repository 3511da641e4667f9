//! The admin HTTP API. Plain axum: this is not the hot path.

// Handlers return ready-made error responses; their size does not matter off the hot path.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use ferry_policy::{FieldError, Policy};
use prometheus_client::registry::Registry;
use serde_json::{Value as Json, json};

use crate::control::{Control, errors_json};

/// Changes the log filter (`info`, `ferry=debug,hyper=info`, ...).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub control: Arc<Control>,
    pub registry: Arc<Registry>,
    /// Bearer token that lets non-loopback callers change things.
    pub token: Option<Arc<str>>,
    pub set_log_level: Option<SetLogLevel>,
    /// Starts a graceful drain of the whole process.
    pub shutdown: Arc<dyn Fn() + Send + Sync>,
}

/// The admin router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn app(state: AdminState) -> Router {
    // Reads are open; every route that changes something passes this first.
    let guard = || axum::middleware::from_fn_with_state(state.clone(), require_change_rights);
    Router::new()
        .route("/ready", get(ready))
        .route("/live", get(|| async { json_ok(json!({"live": true})) }))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .route(
            "/policy",
            get(get_policy).merge(put(put_policy).route_layer(guard())),
        )
        .route("/policy/validate", post(validate_policy))
        .route("/policy/rollback", post(rollback).route_layer(guard()))
        .route("/endpoints", get(endpoints))
        .route("/tracing", get(tracing_state))
        .route("/log-level", put(log_level).route_layer(guard()))
        .route("/shutdown", post(shutdown).route_layer(guard()))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .with_state(state)
}

fn json_ok(v: Json) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// Changing endpoints answer loopback callers, or anyone with the bearer token.
async fn require_change_rights(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(&s, peer, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

fn authorize(state: &AdminState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (presented, &state.token) {
        (Some(p), Some(t)) if constant_time_eq(p.as_bytes(), t.as_bytes()) => Ok(()),
        (Some(_), _) => Err(error(
            StatusCode::FORBIDDEN,
            "the bearer token is not valid",
        )),
        (None, _) if peer.ip().is_loopback() => Ok(()),
        (None, _) => Err(error(
            StatusCode::UNAUTHORIZED,
            "changes are accepted from loopback, or with an Authorization: Bearer token",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.control.shared().is_ready() {
        json_ok(json!({"ready": true}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded",
        ),
    }
}

async fn version(State(s): State<AdminState>) -> Response {
    json_ok(json!({
        "ferry": env!("CARGO_PKG_VERSION"),
        "policy_version": s.control.version(),
    }))
}

async fn get_policy(State(s): State<AdminState>) -> Response {
    json_ok(s.control.describe())
}

/// The body as a policy document: YAML, or JSON (which is YAML).
fn parse_body(body: &Bytes) -> Result<Policy, Response> {
    let text = std::str::from_utf8(body)
        .map_err(|_| invalid(&FieldError::new("(body)", "", "is not UTF-8 text").into()))?;
    Policy::from_yaml(text).map_err(|e| invalid(&e))
}

fn invalid(e: &ferry_policy::Errors) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(
            json!({"error": "the policy is not valid; nothing changed", "errors": errors_json(e)}),
        ),
    )
        .into_response()
}

async fn put_policy(State(s): State<AdminState>, body: Bytes) -> Response {
    let admin = match parse_body(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match s.control.set_admin(admin) {
        Ok(version) => json_ok(json!({"version": version})),
        Err(e) => invalid(&e),
    }
}

async fn validate_policy(State(s): State<AdminState>, body: Bytes) -> Response {
    let admin = match parse_body(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match s.control.check_admin(&admin) {
        Ok(merged) => json_ok(json!({"valid": true, "policy": merged.to_json()})),
        Err(e) => invalid(&e),
    }
}

async fn rollback(State(s): State<AdminState>) -> Response {
    match s.control.rollback() {
        Ok(version) => json_ok(json!({"version": version})),
        Err(m) => error(StatusCode::CONFLICT, m),
    }
}

async fn endpoints(State(s): State<AdminState>) -> Response {
    let shared = s.control.shared();
    let rt = shared.load_full();
    let mut services = serde_json::Map::new();
    let mut all: Vec<_> = rt.services().map(|s| (s.clone(), "policy")).collect();
    all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    all.extend(shared.discovered().into_iter().map(|s| (s, "discovery")));
    for (svc, source) in all {
        let set = svc.endpoint_set();
        let eps: Vec<Json> = set
            .endpoints
            .iter()
            .map(|e| {
                let health = if e.is_ejected() {
                    "ejected"
                } else if e.consecutive_failures() > 0 {
                    "failing"
                } else {
                    "healthy"
                };
                json!({
                    "address": e.addr.to_string(),
                    "zone": e.place.zone.as_deref(),
                    "region": e.place.region.as_deref(),
                    "node": e.place.node.as_deref(),
                    "tier": set.tier_of(e).as_str(),
                    "in_flight": e.in_flight(),
                    "latency_estimate_ms": e.rtt_estimate().as_secs_f64() * 1000.0,
                    "consecutive_failures": e.consecutive_failures(),
                    "outlier_ejections": e.outlier_ejections(),
                    "health": health,
                })
            })
            .collect();
        let view = set.locality();
        let caller = &view.plan.caller;
        let tiers: Vec<Json> = view
            .tiers
            .iter()
            .map(|(tier, stats, share)| {
                json!({
                    "tier": tier.as_str(),
                    "healthy": stats.healthy,
                    "total": stats.total,
                    "share": share,
                })
            })
            .collect();
        let locality = json!({
            "mode": view.plan.mode(),
            "caller": {
                "zone": caller.zone.as_deref(),
                "region": caller.region.as_deref(),
                "node": caller.node.as_deref(),
            },
            "tiers": tiers,
            "reason": view.reason,
        });
        let concurrency = json!({
            "in_flight": svc.limiter.in_flight(),
            "max_in_flight": svc.settings.max_in_flight,
            "adaptive_limit": svc.settings.adaptive_concurrency.then(|| svc.limiter.limit()),
        });
        services.insert(
            svc.name.to_string(),
            json!({"lb": set.lb().as_str(), "source": source, "locality": locality, "concurrency": concurrency, "endpoints": eps}),
        );
    }
    json_ok(json!({"version": rt.version, "services": services}))
}

/// The span exporter: where it sends, how, and whether that works.
async fn tracing_state(State(s): State<AdminState>) -> Response {
    let shared = s.control.shared();
    let Some(st) = shared.tracer.status() else {
        return json_ok(json!({
            "exporting": false,
            "reason": "no OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_SDK_DISABLED=true / OTEL_TRACES_EXPORTER=none): trace context is propagated, no spans are exported",
        }));
    };
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    json_ok(json!({
        "exporting": true,
        "endpoint": st.endpoint,
        "protocol": st.protocol,
        "protocol_note": st.protocol_note,
        "last_success": st.last_success.map(time),
        "last_error": st.last_error.as_ref().map(|(t, e)| json!({"at": time(*t), "error": e})),
        "queue_depth": st.queue_depth,
        "queue_capacity": st.queue_capacity,
    }))
}

async fn log_level(State(s): State<AdminState>, body: Bytes) -> Response {
    // Either a bare filter (`debug`) or `{"level": "debug"}`.
    let text = String::from_utf8_lossy(&body);
    let level = match serde_json::from_str::<Json>(&text) {
        Ok(Json::Object(o)) => o.get("level").and_then(Json::as_str).map(str::to_string),
        Ok(Json::String(l)) => Some(l),
        _ => Some(text.trim().to_string()),
    };
    let Some(level) = level.filter(|l| !l.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "give a level such as info, or {\"level\": \"ferry=debug\"}",
        );
    };
    let Some(set) = &s.set_log_level else {
        return error(
            StatusCode::CONFLICT,
            "the log level cannot be changed in this process",
        );
    };
    match set(&level) {
        Ok(()) => json_ok(json!({"level": level})),
        Err(m) => error(
            StatusCode::BAD_REQUEST,
            FieldError::new("level", level, m).to_string(),
        ),
    }
}

async fn shutdown(State(s): State<AdminState>) -> Response {
    (s.shutdown)();
    (StatusCode::ACCEPTED, axum::Json(json!({"draining": true}))).into_response()
}
