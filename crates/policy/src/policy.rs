//! The policy document: listeners, defaults, services and routes.
//!
//! The YAML is walked by hand rather than derived, so that one pass reports every
//! problem, each with its path (`services.web.timeout`), the value and what is allowed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Map, Value as Json, json};
use serde_yaml::Value;

use crate::error::{Errors, FieldError};
use crate::settings::{self, Overrides, Settings};

/// A policy document, or one layer of one. Everything is optional so layers can stack;
/// [`Policy::overlay`] merges two.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// The admin API's address; `Some(None)` turns it off.
    pub admin: Option<Option<SocketAddr>>,
    pub detect_timeout: Option<Duration>,
    pub header_read_timeout: Option<Duration>,
    /// How long an HTTP/1 keep-alive connection may wait for its next request.
    pub idle_timeout: Option<Duration>,
    /// Inbound HTTP: append the caller to `X-Forwarded-For` (default) or leave headers.
    pub forwarded_headers: Option<bool>,
    /// CONNECT requests: refused with 405 (default) or tunnelled.
    pub http_connect: Option<bool>,
    pub drain_timeout: Option<Duration>,
    pub opaque_ports: Option<Vec<u16>>,
    /// This sidecar's own locality (`ferry.dev/region`, `zone`); in Kubernetes it
    /// overrides what the node's labels say.
    pub locality: Locality,
    /// Per-endpoint metric series (`ferry_endpoint_requests_total`), off by default:
    /// endpoints come and go with every rollout.
    pub metrics_endpoint_labels: Option<bool>,
    /// `istio`: also export Istio's standard request metrics.
    pub metrics_compat: Option<MetricsCompat>,
    pub listeners: Vec<Listener>,
    pub defaults: Overrides,
    pub services: BTreeMap<String, Service>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub kind: ListenerKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Explicit mode: every connection goes to one service. `inbound` marks a listener
    /// in front of the local app (server spans) rather than one the app calls out
    /// through (client spans).
    Service {
        service: String,
        opaque: bool,
        inbound: bool,
    },
    /// Transparent mode, app to world: the original destination picks the service.
    Outbound,
    /// Transparent mode, world to app: forwarded to the app on loopback.
    Inbound,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    pub endpoints: Option<Endpoints>,
    /// Original destinations (transparent mode) that mean this service.
    pub addresses: Option<Vec<SocketAddr>>,
    pub overrides: Overrides,
    pub routes: Vec<Route>,
}

/// Extra metric families for dashboards built for another mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsCompat {
    None,
    Istio,
}

/// Where something runs: the `topology.kubernetes.io/region` and `zone` of its node, or
/// what a policy says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Locality {
    pub fn is_empty(&self) -> bool {
        self.region.is_none() && self.zone.is_none()
    }
}

/// One address of a static endpoint list, with its locality if the policy gives one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticEndpoint {
    pub addr: SocketAddr,
    pub locality: Locality,
}

impl From<SocketAddr> for StaticEndpoint {
    fn from(addr: SocketAddr) -> Self {
        StaticEndpoint {
            addr,
            locality: Locality::default(),
        }
    }
}

/// Whether a connection to `addr` lands on a listener bound to `bind`.
fn reaches(bind: SocketAddr, addr: SocketAddr) -> bool {
    bind.port() != 0
        && bind.port() == addr.port()
        && (bind.ip() == addr.ip()
            || (bind.ip().is_unspecified()
                && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoints {
    Static(Vec<StaticEndpoint>),
    /// Resolved with DNS (A and AAAA) and re-resolved while the proxy runs.
    Dns {
        host: String,
        port: u16,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub matcher: RouteMatch,
    pub overrides: Overrides,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteMatch {
    PathPrefix(String),
    /// `pkg.Service/Method`, or `pkg.Service/*` for every method.
    GrpcMethod {
        service: String,
        method: Option<String>,
    },
}

impl RouteMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            RouteMatch::PathPrefix(p) => path.starts_with(p.as_str()),
            RouteMatch::GrpcMethod { service, method } => {
                let Some(rest) = path
                    .strip_prefix('/')
                    .and_then(|p| p.strip_prefix(service.as_str()))
                else {
                    return false;
                };
                match (rest.strip_prefix('/'), method) {
                    (Some(m), Some(want)) => m == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                }
            }
        }
    }
}

impl std::fmt::Display for RouteMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteMatch::PathPrefix(p) => write!(f, "path-prefix {p}"),
            RouteMatch::GrpcMethod { service, method } => {
                write!(
                    f,
                    "grpc-method {service}/{}",
                    method.as_deref().unwrap_or("*")
                )
            }
        }
    }
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Above client pools' idle timeouts (Go 90 s, OkHttp 5 min), like Envoy's 1 h: a
/// client must never find its pooled connection closed under its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Policy {
    /// Parses and validates one document, reporting every problem found.
    pub fn from_yaml(text: &str) -> Result<Policy, Errors> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| {
            Errors::from(FieldError::new(
                "(document)",
                "",
                format!("is not valid YAML: {e}"),
            ))
        })?;
        Policy::from_value(&doc)
    }

    /// Like [`Policy::from_yaml`], from an already-parsed value (JSON is YAML).
    pub fn from_value(doc: &Value) -> Result<Policy, Errors> {
        let mut errs = Errors::default();
        let mut p = Policy::default();
        if doc.is_null() {
            return Ok(p);
        }
        let Some(map) = mapping(doc, "(document)", &mut errs) else {
            return Err(errs);
        };
        for (k, v) in &map {
            let (k, v) = (k.as_str(), v);
            match k {
                "admin" => {
                    if let Some(s) = scalar(v, "admin", &mut errs) {
                        if s == "off" {
                            p.admin = Some(None);
                        } else {
                            p.admin = Some(parse_addr(&s, "admin", &mut errs));
                        }
                    }
                }
                "detect-timeout" => p.detect_timeout = duration(v, k, &mut errs),
                "header-read-timeout" => p.header_read_timeout = duration(v, k, &mut errs),
                "idle-timeout" => p.idle_timeout = duration(v, k, &mut errs),
                "forwarded-headers" => {
                    p.forwarded_headers = choice(v, k, ["off", "append"], &mut errs)
                }
                "http-connect" => p.http_connect = choice(v, k, ["refuse", "tunnel"], &mut errs),
                "drain-timeout" => p.drain_timeout = duration(v, k, &mut errs),
                "opaque-ports" => p.opaque_ports = ports(v, k, &mut errs),
                "metrics-endpoint-labels" => {
                    p.metrics_endpoint_labels = choice(v, k, ["false", "true"], &mut errs)
                }
                "metrics-compat" => {
                    p.metrics_compat = choice(v, k, ["none", "istio"], &mut errs).map(|istio| {
                        if istio {
                            MetricsCompat::Istio
                        } else {
                            MetricsCompat::None
                        }
                    })
                }
                "region" => p.locality.region = locality_name(v, k, &mut errs),
                "zone" => p.locality.zone = locality_name(v, k, &mut errs),
                "listeners" => p.listeners = listeners(v, &mut errs),
                "defaults" => p.defaults = overrides(v, "defaults", &[], &mut errs).unwrap_or_default(),
                "services" => {
                    if let Some(m) = mapping(v, "services", &mut errs) {
                        for (name, sv) in m {
                            if let Some(s) = service(&sv, &format!("services.{name}"), &mut errs) {
                                p.services.insert(name, s);
                            }
                        }
                    }
                }
                other => errs.push(FieldError::new(
                    other,
                    "",
                    "is not a policy field (allowed: admin, detect-timeout, header-read-timeout, idle-timeout, drain-timeout, forwarded-headers, http-connect, opaque-ports, region, zone, metrics-endpoint-labels, metrics-compat, listeners, defaults, services)",
                )),
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in p.listeners.iter().enumerate() {
            if !names.insert(l.name.as_str()) {
                errs.push(FieldError::new(
                    format!("listeners[{i}].name"),
                    &l.name,
                    "is used by another listener (names must be unique)",
                ));
            }
        }
        errs.into_result(p)
    }

    /// `top` layered over `self`. Services merge by name; a service's endpoint list,
    /// addresses and routes are replaced whole when `top` sets them.
    pub fn overlay(&self, top: &Policy) -> Policy {
        let mut services = self.services.clone();
        for (name, t) in &top.services {
            let merged = match services.get(name) {
                Some(b) => Service {
                    endpoints: t.endpoints.clone().or_else(|| b.endpoints.clone()),
                    addresses: t.addresses.clone().or_else(|| b.addresses.clone()),
                    overrides: b.overrides.overlay(&t.overrides),
                    routes: if t.routes.is_empty() {
                        b.routes.clone()
                    } else {
                        t.routes.clone()
                    },
                },
                None => t.clone(),
            };
            services.insert(name.clone(), merged);
        }
        Policy {
            admin: top.admin.or(self.admin),
            detect_timeout: top.detect_timeout.or(self.detect_timeout),
            header_read_timeout: top.header_read_timeout.or(self.header_read_timeout),
            idle_timeout: top.idle_timeout.or(self.idle_timeout),
            forwarded_headers: top.forwarded_headers.or(self.forwarded_headers),
            http_connect: top.http_connect.or(self.http_connect),
            drain_timeout: top.drain_timeout.or(self.drain_timeout),
            opaque_ports: top
                .opaque_ports
                .clone()
                .or_else(|| self.opaque_ports.clone()),
            locality: Locality {
                region: top
                    .locality
                    .region
                    .clone()
                    .or_else(|| self.locality.region.clone()),
                zone: top
                    .locality
                    .zone
                    .clone()
                    .or_else(|| self.locality.zone.clone()),
            },
            metrics_endpoint_labels: top.metrics_endpoint_labels.or(self.metrics_endpoint_labels),
            metrics_compat: top.metrics_compat.or(self.metrics_compat),
            listeners: if top.listeners.is_empty() {
                self.listeners.clone()
            } else {
                top.listeners.clone()
            },
            defaults: self.defaults.overlay(&top.defaults),
            services,
        }
    }

    /// Checks what only the merged whole can show: listeners naming known services.
    pub fn validate_complete(&self) -> Result<(), Errors> {
        let mut errs = Errors::default();
        for (i, l) in self.listeners.iter().enumerate() {
            if let ListenerKind::Service { service, .. } = &l.kind
                && !self.services.contains_key(service)
            {
                errs.push(FieldError::new(
                    format!("listeners[{i}].service"),
                    service,
                    format!(
                        "is not a service of this policy (known: {})",
                        self.services.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        // A request sent to one of this sidecar's own listeners comes back to it, and
        // again, until its file descriptors run out.
        for (name, svc) in &self.services {
            let Some(Endpoints::Static(eps)) = &svc.endpoints else {
                continue;
            };
            for (j, ep) in eps.iter().enumerate() {
                if let Some(l) = self.listeners.iter().find(|l| reaches(l.bind, ep.addr)) {
                    errs.push(FieldError::new(
                        format!("services.{name}.endpoints[{j}]"),
                        ep.addr.to_string(),
                        format!(
                            "is this sidecar's own listener {:?} ({}): requests would loop back to it",
                            l.name, l.bind
                        ),
                    ));
                }
            }
        }
        errs.into_result(())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        match self.admin {
            Some(a) => a,
            None => Some(DEFAULT_ADMIN.parse().expect("valid default")),
        }
    }

    pub fn detect_timeout(&self) -> Duration {
        self.detect_timeout.unwrap_or(DEFAULT_DETECT_TIMEOUT)
    }

    pub fn header_read_timeout(&self) -> Duration {
        self.header_read_timeout
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT)
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT)
    }

    pub fn forwarded_headers(&self) -> bool {
        self.forwarded_headers.unwrap_or(true)
    }

    pub fn http_connect(&self) -> bool {
        self.http_connect.unwrap_or(false)
    }

    pub fn metrics_istio(&self) -> bool {
        self.metrics_compat == Some(MetricsCompat::Istio)
    }

    pub fn metrics_endpoint_labels(&self) -> bool {
        self.metrics_endpoint_labels.unwrap_or(false)
    }

    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT)
    }

    /// Built-in defaults with this policy's `defaults` applied.
    pub fn default_settings(&self) -> Settings {
        self.defaults.apply(&Settings::default())
    }

    /// The settings of a service (unknown services get the defaults).
    pub fn service_settings(&self, name: &str) -> Settings {
        let base = self.default_settings();
        match self.services.get(name) {
            Some(s) => s.overrides.apply(&base),
            None => base,
        }
    }

    /// The document as JSON, in the same shape as the YAML it was read from.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        if let Some(a) = self.admin {
            m.insert(
                "admin".into(),
                json!(a.map(|a| a.to_string()).unwrap_or_else(|| "off".into())),
            );
        }
        for (k, v) in [
            ("detect-timeout", self.detect_timeout),
            ("header-read-timeout", self.header_read_timeout),
            ("idle-timeout", self.idle_timeout),
            ("drain-timeout", self.drain_timeout),
        ] {
            if let Some(d) = v {
                m.insert(k.into(), json!(settings::format_duration(d)));
            }
        }
        if let Some(f) = self.forwarded_headers {
            m.insert(
                "forwarded-headers".into(),
                json!(if f { "append" } else { "off" }),
            );
        }
        if let Some(c) = self.http_connect {
            m.insert(
                "http-connect".into(),
                json!(if c { "tunnel" } else { "refuse" }),
            );
        }
        if let Some(p) = &self.opaque_ports {
            m.insert("opaque-ports".into(), json!(p));
        }
        if let Some(e) = self.metrics_endpoint_labels {
            m.insert("metrics-endpoint-labels".into(), json!(e));
        }
        if let Some(c) = self.metrics_compat {
            let word = match c {
                MetricsCompat::None => "none",
                MetricsCompat::Istio => "istio",
            };
            m.insert("metrics-compat".into(), json!(word));
        }
        if let Some(r) = &self.locality.region {
            m.insert("region".into(), json!(r));
        }
        if let Some(z) = &self.locality.zone {
            m.insert("zone".into(), json!(z));
        }
        if !self.listeners.is_empty() {
            let ls: Vec<Json> = self
                .listeners
                .iter()
                .map(|l| {
                    let mut o = json!({"name": l.name, "bind": l.bind.to_string()});
                    match &l.kind {
                        ListenerKind::Service {
                            service,
                            opaque,
                            inbound,
                        } => {
                            o["service"] = json!(service);
                            o["protocol"] = json!(if *opaque { "opaque" } else { "auto" });
                            if *inbound {
                                o["direction"] = json!("inbound");
                            }
                        }
                        ListenerKind::Outbound => o["transparent"] = json!("outbound"),
                        ListenerKind::Inbound => o["transparent"] = json!("inbound"),
                    }
                    o
                })
                .collect();
            m.insert("listeners".into(), Json::Array(ls));
        }
        if !self.defaults.is_empty() {
            m.insert("defaults".into(), overrides_json(&self.defaults));
        }
        if !self.services.is_empty() {
            let mut svcs = Map::new();
            for (name, s) in &self.services {
                let mut o = overrides_json(&s.overrides);
                match &s.endpoints {
                    Some(Endpoints::Static(eps)) => {
                        o["endpoints"] = eps.iter().map(static_endpoint_json).collect()
                    }
                    Some(Endpoints::Dns { host, port }) => {
                        o["dns"] = json!(format!("{host}:{port}"))
                    }
                    None => {}
                }
                if let Some(a) = &s.addresses {
                    o["addresses"] = json!(a.iter().map(|e| e.to_string()).collect::<Vec<_>>());
                }
                if !s.routes.is_empty() {
                    let rs: Vec<Json> = s
                        .routes
                        .iter()
                        .map(|r| {
                            let mut o = overrides_json(&r.overrides);
                            o["match"] = match &r.matcher {
                                RouteMatch::PathPrefix(p) => json!({"path-prefix": p}),
                                RouteMatch::GrpcMethod { service, method } => json!({
                                    "grpc-method": format!("{service}/{}", method.as_deref().unwrap_or("*"))
                                }),
                            };
                            o
                        })
                        .collect();
                    o["routes"] = Json::Array(rs);
                }
                svcs.insert(name.clone(), o);
            }
            m.insert("services".into(), Json::Object(svcs));
        }
        Json::Object(m)
    }
}

fn overrides_json(o: &Overrides) -> Json {
    Json::Object(
        o.entries()
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

// === the walker ===

fn mapping(v: &Value, field: &str, errs: &mut Errors) -> Option<Vec<(String, Value)>> {
    let Value::Mapping(m) = v else {
        errs.push(FieldError::new(field, describe(v), "must be a mapping"));
        return None;
    };
    let mut out = Vec::with_capacity(m.len());
    for (k, v) in m {
        match k {
            Value::String(s) => out.push((s.clone(), v.clone())),
            other => errs.push(FieldError::new(
                field,
                describe(other),
                "has a key that is not a string",
            )),
        }
    }
    Some(out)
}

fn scalar(v: &Value, field: &str, errs: &mut Errors) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => {
            errs.push(FieldError::new(
                field,
                describe(other),
                "must be a single value",
            ));
            None
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Sequence(_) => "(a list)".into(),
        Value::Mapping(_) => "(a mapping)".into(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// A list, written either as a YAML sequence or as one comma-separated string.
fn list(v: &Value, field: &str, errs: &mut Errors) -> Option<String> {
    match v {
        Value::Sequence(items) => {
            let mut parts = Vec::new();
            for (i, item) in items.iter().enumerate() {
                parts.push(scalar(item, &format!("{field}[{i}]"), errs)?);
            }
            Some(parts.join(","))
        }
        other => scalar(other, field, errs),
    }
}

fn duration(v: &Value, field: &str, errs: &mut Errors) -> Option<Duration> {
    let s = scalar(v, field, errs)?;
    settings::parse_duration(&s)
        .map_err(|m| errs.push(FieldError::new(field, &s, m)))
        .ok()
}

/// One of two words: `false` for the first, `true` for the second.
fn choice(v: &Value, field: &str, words: [&str; 2], errs: &mut Errors) -> Option<bool> {
    let s = scalar(v, field, errs)?;
    match words.iter().position(|w| *w == s) {
        Some(i) => Some(i == 1),
        None => {
            errs.push(FieldError::new(
                field,
                &s,
                format!("is not allowed (allowed: {}, {})", words[0], words[1]),
            ));
            None
        }
    }
}

fn ports(v: &Value, field: &str, errs: &mut Errors) -> Option<Vec<u16>> {
    let s = list(v, field, errs)?;
    settings::parse_ports(&s)
        .map_err(|m| errs.push(FieldError::new(field, &s, m)))
        .ok()
}

fn parse_addr(s: &str, field: &str, errs: &mut Errors) -> Option<SocketAddr> {
    s.trim()
        .parse()
        .map_err(|_| {
            errs.push(FieldError::new(
                field,
                s,
                "is not an address with a port (examples: 127.0.0.1:8080, [::1]:8080)",
            ))
        })
        .ok()
}

fn addrs(v: &Value, field: &str, errs: &mut Errors) -> Option<Vec<SocketAddr>> {
    list_of(v, field, errs, |item, f, errs| {
        scalar(item, f, errs).and_then(|s| parse_addr(&s, f, errs))
    })
}

/// Each item of a list, read by `item` (given the item's field path); items it cannot
/// read are left out after it reports them.
fn list_of<T>(
    v: &Value,
    field: &str,
    errs: &mut Errors,
    mut item: impl FnMut(&Value, &str, &mut Errors) -> Option<T>,
) -> Option<Vec<T>> {
    let Value::Sequence(items) = v else {
        errs.push(FieldError::new(
            field,
            describe(v),
            "must be a list of addresses",
        ));
        return None;
    };
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        out.extend(item(it, &format!("{field}[{i}]"), errs));
    }
    Some(out)
}

/// Endpoints as addresses (`10.0.0.1:8080`) or mappings with a locality
/// (`{address: 10.0.0.1:8080, zone: eu-west-1a, region: eu-west-1}`).
fn static_endpoints(v: &Value, field: &str, errs: &mut Errors) -> Option<Vec<StaticEndpoint>> {
    list_of(v, field, errs, |item, f, errs| {
        if !matches!(item, Value::Mapping(_)) {
            let s = scalar(item, f, errs)?;
            return parse_addr(&s, f, errs).map(StaticEndpoint::from);
        }
        let m = mapping(item, f, errs)?;
        let (mut addr, mut locality) = (None, Locality::default());
        for (k, v) in m {
            let kf = format!("{f}.{k}");
            match k.as_str() {
                "address" => addr = scalar(&v, &kf, errs).and_then(|s| parse_addr(&s, &kf, errs)),
                "region" => locality.region = locality_name(&v, &kf, errs),
                "zone" => locality.zone = locality_name(&v, &kf, errs),
                _ => errs.push(FieldError::new(
                    kf,
                    "",
                    "is not an endpoint field (allowed: address, zone, region)",
                )),
            }
        }
        if addr.is_none() {
            errs.push(FieldError::new(
                format!("{f}.address"),
                "",
                "is required (an address such as 10.0.0.1:8080)",
            ));
        }
        Some(StaticEndpoint {
            addr: addr?,
            locality,
        })
    })
}

fn static_endpoint_json(e: &StaticEndpoint) -> Json {
    if e.locality.is_empty() {
        return json!(e.addr.to_string());
    }
    let mut o = json!({"address": e.addr.to_string()});
    if let Some(z) = &e.locality.zone {
        o["zone"] = json!(z);
    }
    if let Some(r) = &e.locality.region {
        o["region"] = json!(r);
    }
    o
}

fn locality_name(v: &Value, field: &str, errs: &mut Errors) -> Option<String> {
    let s = scalar(v, field, errs)?;
    settings::parse_locality_name(&s)
        .map_err(|m| errs.push(FieldError::new(field, &s, m)))
        .ok()
}

/// Reads override settings from a mapping; keys in `extra` are left for the caller.
fn overrides(v: &Value, field: &str, extra: &[&str], errs: &mut Errors) -> Option<Overrides> {
    let m = mapping(v, field, errs)?;
    let mut o = Overrides::default();
    for (k, v) in m {
        if extra.contains(&k.as_str()) {
            continue;
        }
        let f = format!("{field}.{k}");
        let Some(s) = list(&v, &f, errs) else {
            continue;
        };
        match o.set(&k, &s) {
            Ok(true) => {}
            Ok(false) => {
                let mut allowed: Vec<&str> = Overrides::KEYS.to_vec();
                allowed.extend_from_slice(extra);
                errs.push(FieldError::new(
                    f,
                    "",
                    format!("is not a setting (allowed: {})", allowed.join(", ")),
                ))
            }
            Err(m) => errs.push(FieldError::new(f, s, m)),
        }
    }
    Some(o)
}

fn listeners(v: &Value, errs: &mut Errors) -> Vec<Listener> {
    let Value::Sequence(items) = v else {
        errs.push(FieldError::new("listeners", describe(v), "must be a list"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("listeners[{i}]");
        let Some(m) = mapping(item, &field, errs) else {
            continue;
        };
        let (mut name, mut bind, mut service, mut transparent, mut opaque) =
            (None, None, None, None, false);
        let mut inbound = false;
        let mut ok = true;
        for (k, v) in m {
            let f = format!("{field}.{k}");
            let Some(s) = scalar(&v, &f, errs) else {
                ok = false;
                continue;
            };
            match k.as_str() {
                "name" => name = Some(s),
                "bind" => bind = parse_addr(&s, &f, errs),
                "service" => service = Some(s),
                "transparent" => match s.as_str() {
                    "outbound" => transparent = Some(ListenerKind::Outbound),
                    "inbound" => transparent = Some(ListenerKind::Inbound),
                    _ => errs.push(FieldError::new(
                        f,
                        s,
                        "is not a direction (allowed: outbound, inbound)",
                    )),
                },
                "direction" => match s.as_str() {
                    "outbound" => inbound = false,
                    "inbound" => inbound = true,
                    _ => errs.push(FieldError::new(f, s, "is not a direction (allowed: outbound, inbound)")),
                },
                "protocol" => match s.as_str() {
                    "auto" => opaque = false,
                    "opaque" => opaque = true,
                    _ => errs.push(FieldError::new(
                        f,
                        s,
                        "is not a protocol (allowed: auto, opaque)",
                    )),
                },
                _ => errs.push(FieldError::new(
                    f,
                    "",
                    "is not a listener field (allowed: name, bind, service, transparent, protocol, direction)",
                )),
            }
        }
        if bind.is_none() {
            errs.push(FieldError::new(
                format!("{field}.bind"),
                "",
                "is required (an address such as 127.0.0.1:4140)",
            ));
            ok = false;
        }
        let kind = match (service, transparent) {
            (Some(service), None) => Some(ListenerKind::Service {
                service,
                opaque,
                inbound,
            }),
            (None, Some(t)) => Some(t),
            (Some(_), Some(_)) => {
                errs.push(FieldError::new(
                    &field,
                    "",
                    "sets both service and transparent (choose one)",
                ));
                None
            }
            (None, None) => {
                errs.push(FieldError::new(
                    &field,
                    "",
                    "needs a service or transparent: outbound|inbound",
                ));
                None
            }
        };
        if let (true, Some(bind), Some(kind)) = (ok, bind, kind) {
            let name = name.unwrap_or_else(|| format!("listener-{i}"));
            out.push(Listener { name, bind, kind });
        }
    }
    out
}

fn service(v: &Value, field: &str, errs: &mut Errors) -> Option<Service> {
    const EXTRA: [&str; 4] = ["endpoints", "dns", "addresses", "routes"];
    let overrides = overrides(v, field, &EXTRA, errs)?;
    let mut s = Service {
        overrides,
        ..Service::default()
    };
    let Value::Mapping(m) = v else { return None };
    if let Some(eps) = m.get("endpoints") {
        s.endpoints =
            static_endpoints(eps, &format!("{field}.endpoints"), errs).map(Endpoints::Static);
    }
    if let Some(d) = m.get("dns") {
        let f = format!("{field}.dns");
        if s.endpoints.is_some() {
            errs.push(FieldError::new(
                &f,
                "",
                "cannot be set with endpoints (choose one)",
            ));
        } else if let Some(text) = scalar(d, &f, errs) {
            match text.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
                Some((host, Ok(port))) if !host.is_empty() && port > 0 => {
                    s.endpoints = Some(Endpoints::Dns {
                        host: host.to_string(),
                        port,
                    })
                }
                _ => errs.push(FieldError::new(
                    f,
                    text,
                    "is not a DNS name with a port (example: web.default.svc.cluster.local:8080)",
                )),
            }
        }
    }
    if let Some(a) = m.get("addresses") {
        s.addresses = addrs(a, &format!("{field}.addresses"), errs);
    }
    if let Some(r) = m.get("routes") {
        let f = format!("{field}.routes");
        match r {
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    s.routes.extend(route(item, &format!("{f}[{i}]"), errs));
                }
            }
            other => errs.push(FieldError::new(f, describe(other), "must be a list")),
        }
    }
    Some(s)
}

fn route(v: &Value, field: &str, errs: &mut Errors) -> Option<Route> {
    let overrides = overrides(v, field, &["match"], errs)?;
    let Value::Mapping(m) = v else { return None };
    let mf = format!("{field}.match");
    let Some(mv) = m.get("match") else {
        errs.push(FieldError::new(
            mf,
            "",
            "is required ({path-prefix: /api} or {grpc-method: pkg.Service/Method})",
        ));
        return None;
    };
    let entries = mapping(mv, &mf, errs)?;
    let [(kind, value)] = entries.as_slice() else {
        errs.push(FieldError::new(
            mf,
            describe(mv),
            "must have exactly one of path-prefix, grpc-method",
        ));
        return None;
    };
    let f = format!("{mf}.{kind}");
    let value = scalar(value, &f, errs)?;
    let matcher = match kind.as_str() {
        "path-prefix" if value.starts_with('/') => RouteMatch::PathPrefix(value),
        "path-prefix" => {
            errs.push(FieldError::new(
                f,
                value,
                "must start with / (example: /api)",
            ));
            return None;
        }
        "grpc-method" => match value.split_once('/') {
            Some((svc, m)) if !svc.is_empty() && !m.is_empty() && !m.contains('/') => {
                RouteMatch::GrpcMethod {
                    service: svc.to_string(),
                    method: (m != "*").then(|| m.to_string()),
                }
            }
            _ => {
                errs.push(FieldError::new(
                    f,
                    value,
                    "is not a gRPC method (examples: pkg.Service/Method, pkg.Service/*)",
                ));
                return None;
            }
        },
        _ => {
            errs.push(FieldError::new(
                f,
                "",
                "is not a route match (allowed: path-prefix, grpc-method)",
            ));
            return None;
        }
    };
    Some(Route { matcher, overrides })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Lb;

    const FULL: &str = r#"
admin: 127.0.0.1:0
detect-timeout: 50ms
opaque-ports: [3306, 5432]
zone: eu-west-1a
region: eu-west-1
listeners:
  - name: web
    bind: 127.0.0.1:4140
    service: web
  - name: out
    bind: 0.0.0.0:15001
    transparent: outbound
defaults:
  lb: round-robin
  timeout: 3s
services:
  web:
    endpoints:
      - 127.0.0.1:8081
      - {address: "[::1]:8082", zone: eu-west-1b, region: eu-west-1}
    addresses: [10.96.0.12:8080]
    locality: off
    lb: maglev
    hash-on: header:x-user-id
    routes:
      - match: { path-prefix: /slow }
        timeout: 5s
      - match: { grpc-method: demo.Echo/* }
        timeout: 300ms
  names:
    dns: web.default.svc.cluster.local:8080
"#;

    #[test]
    fn a_full_document_parses() {
        let p = Policy::from_yaml(FULL).unwrap();
        assert_eq!(p.admin_addr(), Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(p.detect_timeout(), Duration::from_millis(50));
        assert_eq!(p.opaque_ports, Some(vec![3306, 5432]));
        assert_eq!(p.listeners.len(), 2);
        assert_eq!(p.listeners[1].kind, ListenerKind::Outbound);
        assert_eq!(p.locality.zone.as_deref(), Some("eu-west-1a"));
        let web = &p.services["web"];
        assert_eq!(web.routes.len(), 2);
        assert_eq!(web.overrides.locality, Some(false));
        let Some(Endpoints::Static(eps)) = &web.endpoints else {
            panic!("static endpoints")
        };
        assert!(eps[0].locality.is_empty());
        assert_eq!(eps[1].locality.zone.as_deref(), Some("eu-west-1b"));
        assert!(web.routes[1].matcher.matches("/demo.Echo/Say"));
        assert!(!web.routes[1].matcher.matches("/demo.EchoX/Say"));
        let s = p.service_settings("web");
        assert_eq!(s.lb, Lb::Maglev);
        assert_eq!(s.timeout, Some(Duration::from_secs(3)));
        assert_eq!(p.service_settings("names").lb, Lb::RoundRobin);
        assert_eq!(
            p.services["names"].endpoints,
            Some(Endpoints::Dns {
                host: "web.default.svc.cluster.local".into(),
                port: 8080
            })
        );
        p.validate_complete().unwrap();
    }

    #[test]
    fn json_form_reads_back_the_same() {
        let p = Policy::from_yaml(FULL).unwrap();
        let again = Policy::from_yaml(&p.to_json().to_string()).unwrap();
        assert_eq!(p, again);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let doc = r#"
listeners:
  - bind: nowhere
    service: web
services:
  web:
    timeout: banana
    lb: fastest
    endpoints: [127.0.0.1, {address: 127.0.0.1:1, zone: "a b", rack: 3}, {zone: a}]
    locality: sometimes
    color: blue
    routes:
      - match: { path-prefix: api }
bogus: 1
zone: -a
"#;
        let errs = Policy::from_yaml(doc).unwrap_err();
        let text = errs.to_string();
        for want in [
            "listeners[0].bind: \"nowhere\" is not an address",
            "services.web.timeout: \"banana\" is not a duration (examples: 250ms, 2s, or off)",
            "services.web.lb: \"fastest\" is not a balancer",
            "services.web.endpoints[0]: \"127.0.0.1\" is not an address",
            "services.web.endpoints[1].zone: \"a b\" is not a locality name",
            "services.web.endpoints[1].rack: \"\" is not an endpoint field (allowed: address, zone, region)",
            "services.web.endpoints[2].address: \"\" is required",
            "services.web.locality: \"sometimes\" is not on or off",
            "zone: \"-a\" is not a locality name",
            "services.web.color: \"\" is not a setting",
            "services.web.routes[0].match.path-prefix: \"api\" must start with /",
            "bogus: \"\" is not a policy field",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_listener_must_name_a_known_service() {
        let p = Policy::from_yaml("listeners: [{bind: 127.0.0.1:1, service: nope}]").unwrap();
        let e = p.validate_complete().unwrap_err().to_string();
        assert!(
            e.contains("listeners[0].service: \"nope\" is not a service"),
            "{e}"
        );
    }

    #[test]
    fn an_endpoint_that_is_a_listener_of_this_sidecar_is_refused() {
        for (bind, ep) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
        ] {
            let p = Policy::from_yaml(&format!(
                "listeners: [{{name: web, bind: \"{bind}\", service: web}}]\n\
                 services: {{web: {{endpoints: [127.0.0.1:9, \"{ep}\"]}}}}"
            ))
            .unwrap();
            let e = p.validate_complete().unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "services.web.endpoints[1]: \"{ep}\" is this sidecar's own listener \"web\""
                )),
                "{e}"
            );
        }
        // Another port, another address, or a port the kernel picks: no loop.
        for (bind, ep) in [
            ("127.0.0.1:8080", "127.0.0.1:8081"),
            ("127.0.0.1:8080", "10.0.0.7:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            let p = Policy::from_yaml(&format!(
                "listeners: [{{name: web, bind: \"{bind}\", service: web}}]\n\
                 services: {{web: {{endpoints: [\"{ep}\"]}}}}"
            ))
            .unwrap();
            assert!(p.validate_complete().is_ok(), "{bind} and {ep}");
        }
    }

    #[test]
    fn layers_merge_by_service() {
        let base = Policy::from_yaml(FULL).unwrap();
        let top =
            Policy::from_yaml("services: {web: {timeout: 1s, endpoints: [127.0.0.1:9]}}").unwrap();
        let m = base.overlay(&top);
        let web = &m.services["web"];
        assert_eq!(
            web.endpoints,
            Some(Endpoints::Static(vec![
                "127.0.0.1:9".parse::<SocketAddr>().unwrap().into()
            ]))
        );
        assert_eq!(web.overrides.lb, Some(Lb::Maglev));
        assert_eq!(
            m.service_settings("web").timeout,
            Some(Duration::from_secs(1))
        );
        assert_eq!(m.listeners, base.listeners);
    }

    #[test]
    fn not_yaml_is_one_clear_error() {
        let e = Policy::from_yaml("services: [unclosed").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e.to_string().contains("is not valid YAML"), "{e}");
    }
}
