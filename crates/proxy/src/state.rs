//! The running configuration: a [`Runtime`] compiled from a merged [`Policy`], and the
//! [`Shared`] store that swaps it atomically.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use ferry_policy::{Errors, ListenerKind, Policy, RouteMatch, Settings};
use ferry_telemetry::Tracer;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::balance::{Endpoint, EndpointSet};
use crate::body::ReqBody;
use crate::discovery::{Addr, Discover, DstWatch, Resolved};
use crate::limit::Limiter;
use crate::locality::{LocalityState, Place, Plan};
use crate::memory::Connector;
use crate::metrics::{Metrics, RouteMetrics, ServiceLabels, ServiceSeries, StatusCounters};
use crate::retry::Budget;

/// How long an idle pooled connection is kept. Below the 10 s header-read timeout that
/// peers (ferry included) use to close idle keep-alive connections, so a pooled
/// connection is retired before the other side closes it under a new request.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// Pooled upstream clients, one per protocol. Cloning shares the pools.
#[derive(Clone)]
pub struct Clients {
    pub h1: Client<Connector, ReqBody>,
    pub h2: Client<Connector, ReqBody>,
    connect_timeout: Duration,
}

impl Clients {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(connect_timeout));
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE);
        let conn = Connector(conn);
        let h1 = b.build(conn.clone());
        b.http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(false)
            // Fixed windows, not adaptive: clients share one pooled upstream connection,
            // and one client that stops reading may hold at most its stream's window,
            // never the whole connection's (which would stall everyone else's bodies).
            .http2_initial_stream_window_size(256 * 1024)
            .http2_initial_connection_window_size(1 << 30);
        let h2 = b.build(conn);
        Clients {
            h1,
            h2,
            connect_timeout,
        }
    }
}

/// Where a connection's requests go.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The service of explicit listener number N.
    Listener(usize),
    /// A transparent connection's destination: a known service, else itself.
    Dst(SocketAddr),
    /// An inbound connection: the app, at the address the caller dialled (the pod's
    /// own IP), so an app listening on loopback only stays unreachable, as without
    /// the mesh.
    Inbound(SocketAddr),
}

/// One service as requests see it for one policy version.
pub struct ServiceRt {
    pub name: Arc<str>,
    pub version: u64,
    pub settings: Settings,
    pub routes: Vec<(RouteMatch, Settings)>,
    endpoints: arc_swap::ArcSwap<EndpointSet>,
    pub clients: Clients,
    /// Per route (0: none matched, then the routes in order) and direction (outbound,
    /// inbound): metric handles, made at a route's first call.
    calls: Box<[[OnceLock<Arc<RouteMetrics>>; 2]]>,
    /// Per-endpoint series (`metrics-endpoint-labels`).
    endpoint_labels: bool,
    /// Istio's series too (`metrics-compat: istio`).
    istio: bool,
    /// Keeps the service's request series while any version of it lives.
    _series: ServiceSeries,
    pub retry_budget: Arc<Budget>,
    /// In-flight requests and the adaptive concurrency limit; outlives versions.
    pub limiter: Arc<Limiter>,
    /// Send HTTP/1 requests upstream as HTTP/2 (the upstream declared h2c).
    pub h2: bool,
    /// How endpoints are tiered by nearness, and the state that outlives versions.
    pub plan: Plan,
    pub locality: Arc<LocalityState>,
    /// Stops the task that follows discovery once the service is dropped.
    _follow: Option<DropGuard>,
}

impl ServiceRt {
    /// The first route matching `path` (its index, 1-based; 0 for none) and its
    /// settings, else the service's.
    pub fn route_for(&self, path: &str) -> (usize, &Settings) {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, (m, _))| m.matches(path))
            .map(|(i, (_, s))| (i + 1, s))
            .unwrap_or((0, &self.settings))
    }

    /// The settings of route `route` (from [`ServiceRt::route_for`]).
    pub fn route_settings(&self, route: usize) -> &Settings {
        match route {
            0 => &self.settings,
            i => &self.routes[i - 1].1,
        }
    }

    /// The metric handles for calls on route `route` (from [`ServiceRt::route_for`]).
    pub fn calls(&self, route: usize, inbound: bool, metrics: &Metrics) -> &Arc<RouteMetrics> {
        self.calls[route][inbound as usize].get_or_init(|| {
            let name = match route {
                0 => String::new(),
                i => route_label(&self.routes[i - 1].0),
            };
            let direction = crate::metrics::direction(inbound);
            Arc::new(RouteMetrics::new(
                metrics, direction, &self.name, &name, self.istio,
            ))
        })
    }

    pub fn endpoints(&self) -> Guard<Arc<EndpointSet>> {
        self.endpoints.load()
    }

    pub fn endpoint_set(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// An endpoint for a whole connection (opaque TCP, a `CONNECT` tunnel), picked by
    /// the service's balancer.
    pub fn pick_for_connection(
        &self,
        headers: Option<&http::HeaderMap>,
        peer: SocketAddr,
    ) -> Option<Arc<Endpoint>> {
        let set = self.endpoints();
        let key = crate::balance::request_key(set.lb(), &self.settings.hash_on, headers, peer);
        set.pick(key, None).cloned()
    }

    /// Replaces the address list, keeping the state of endpoints that remain.
    fn set_addrs(&self, addrs: &[Addr], metrics: &Metrics) {
        let old = self.endpoints.load();
        let eps = reuse_endpoints(
            &self.name,
            addrs,
            &old.endpoints,
            metrics,
            self.endpoint_labels,
        );
        self.endpoints.store(Arc::new(EndpointSet::new(
            eps,
            self.settings.lb,
            &self.plan,
            &self.locality,
        )));
    }
}

/// Endpoints for `addrs`, reusing those of `old` with the same address and place so
/// their load, latency and health carry over.
fn reuse_endpoints(
    service: &Arc<str>,
    addrs: &[Addr],
    old: &[Arc<Endpoint>],
    metrics: &Metrics,
    endpoint_labels: bool,
) -> Vec<Arc<Endpoint>> {
    addrs
        .iter()
        .map(|a| {
            old.iter()
                .find(|e| {
                    e.addr == a.addr
                        && e.place == a.place
                        && e.hints == a.hints
                        && e.statuses.is_some() == endpoint_labels
                })
                .cloned()
                .unwrap_or_else(|| {
                    let ejections = metrics
                        .ejections
                        .get_or_create(&ServiceLabels {
                            service: service.to_string(),
                        })
                        .clone();
                    Arc::new(
                        Endpoint::new(
                            a.addr,
                            a.place.clone(),
                            a.hints.clone(),
                            endpoint_labels.then(|| {
                                StatusCounters::new(
                                    &metrics.endpoint_requests,
                                    service.clone(),
                                    a.addr.to_string(),
                                )
                            }),
                        )
                        .count_ejections(ejections),
                    )
                })
        })
        .collect()
}

/// Everything a request needs from the policy, compiled once per version.
pub struct Runtime {
    pub policy: Arc<Policy>,
    pub version: u64,
    pub defaults: Settings,
    services: HashMap<String, Arc<ServiceRt>>,
    by_addr: HashMap<SocketAddr, Arc<ServiceRt>>,
    /// Per listener index: the service of an explicit listener.
    listener_services: Vec<Option<Arc<ServiceRt>>>,
    default_clients: Clients,
    /// Destinations no service claims, each seen as a one-endpoint service.
    passthrough: Mutex<HashMap<SocketAddr, Arc<ServiceRt>>>,
}

impl Runtime {
    pub fn listener_service(&self, listener: usize) -> Option<&Arc<ServiceRt>> {
        self.listener_services
            .get(listener)
            .and_then(Option::as_ref)
    }

    pub fn service(&self, name: &str) -> Option<&Arc<ServiceRt>> {
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceRt>> {
        self.services.values()
    }

    /// A service for a destination no service claims: forwarded to itself.
    pub fn passthrough(&self, dst: SocketAddr, metrics: &Metrics) -> Arc<ServiceRt> {
        let mut map = self.passthrough.lock().expect("passthrough map poisoned");
        if map.len() > 4096 {
            map.clear();
        }
        map.entry(dst)
            .or_insert_with(|| {
                let name: Arc<str> = Arc::from(dst.to_string());
                let eps = reuse_endpoints(&name, &[Addr::from(dst)], &[], metrics, false);
                let locality = LocalityState::new(name.clone(), metrics);
                let plan = Plan::off();
                Arc::new(ServiceRt {
                    calls: call_slots(0),
                    endpoint_labels: false,
                    istio: self.policy.metrics_istio(),
                    _series: metrics.service_series(&name),
                    endpoints: ArcSwap::from_pointee(EndpointSet::new(
                        eps,
                        self.defaults.lb,
                        &plan,
                        &locality,
                    )),
                    plan,
                    locality,
                    name,
                    version: self.version,
                    settings: self.defaults.clone(),
                    routes: Vec::new(),
                    clients: self.default_clients.clone(),
                    retry_budget: Arc::new(Budget::new()),
                    limiter: Arc::new(Limiter::new()),
                    h2: false,
                    _follow: None,
                })
            })
            .clone()
    }
}

/// Clients for `settings`: the previous version's if the connect timeout is the same
/// (pooled connections survive a policy swap), else the default ones, else new.
fn clients_for(prev: Option<&ServiceRt>, default: &Clients, settings: &Settings) -> Clients {
    match prev {
        Some(p) if p.clients.connect_timeout == settings.connect_timeout => p.clients.clone(),
        _ if default.connect_timeout == settings.connect_timeout => default.clone(),
        _ => Clients::new(settings.connect_timeout),
    }
}

/// A service's routes, each with its overrides applied to the service's settings.
fn routes_for(spec: &ferry_policy::Service, settings: &Settings) -> Vec<(RouteMatch, Settings)> {
    spec.routes
        .iter()
        .map(|r| (r.matcher.clone(), r.overrides.apply(settings)))
        .collect()
}

/// A route as its metric label: the path prefix or the gRPC method it matches.
fn route_label(m: &RouteMatch) -> String {
    match m {
        RouteMatch::PathPrefix(p) => p.clone(),
        RouteMatch::GrpcMethod { service, method } => {
            format!("{service}/{}", method.as_deref().unwrap_or("*"))
        }
    }
}

fn call_slots(routes: usize) -> Box<[[OnceLock<Arc<RouteMetrics>>; 2]]> {
    (0..=routes).map(|_| Default::default()).collect()
}

/// How long a new destination waits for discovery's first answer before it is passed
/// through; only while the discovery source is reachable.
const RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// A transparent destination that discovery follows.
struct DstEntry {
    sub: DstWatch,
    /// Built from the answer `from`, for one policy version.
    svc: Option<(Arc<ServiceRt>, Arc<Resolved>)>,
    last_used: std::time::Instant,
    logged: bool,
}

impl DstEntry {
    /// The service already built from `answer` for `version`, if any.
    fn built(&self, version: u64, answer: &Arc<Resolved>) -> Option<Arc<ServiceRt>> {
        let (svc, from) = self.svc.as_ref()?;
        (svc.version == version && Arc::ptr_eq(from, answer)).then(|| svc.clone())
    }
}

/// The proxy's shared state: the current runtime behind `arc-swap`, and what builds it.
pub struct Shared {
    store: ArcSwap<Runtime>,
    pub metrics: Metrics,
    discover: Arc<dyn Discover>,
    /// Destinations resolved through discovery, kept across policy versions; taken once
    /// per new connection (connections cache their service), never per request.
    dst: Mutex<HashMap<SocketAddr, DstEntry>>,
    /// Serialises policy swaps (never taken by requests).
    apply_lock: Mutex<()>,
    ready: AtomicBool,
    /// Listener kinds, fixed at bind time.
    listener_kinds: Vec<ListenerKind>,
    pub tracer: Tracer,
}

impl Shared {
    /// A proxy that propagates trace context but exports no spans.
    pub fn new(
        policy: Policy,
        discover: Arc<dyn Discover>,
        metrics: Metrics,
    ) -> Result<Arc<Shared>, Errors> {
        Shared::with_tracer(policy, discover, metrics, Tracer::disabled())
    }

    pub fn with_tracer(
        policy: Policy,
        discover: Arc<dyn Discover>,
        metrics: Metrics,
        tracer: Tracer,
    ) -> Result<Arc<Shared>, Errors> {
        policy.validate_complete()?;
        let listener_kinds: Vec<ListenerKind> =
            policy.listeners.iter().map(|l| l.kind.clone()).collect();
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| {
            let rt = compile(
                &policy,
                1,
                None,
                &*discover,
                &metrics,
                &listener_kinds,
                weak.clone(),
            );
            Shared {
                store: ArcSwap::from_pointee(rt),
                metrics,
                discover,
                dst: Mutex::default(),
                apply_lock: Mutex::new(()),
                ready: AtomicBool::new(false),
                listener_kinds,
                tracer,
            }
        });
        Ok(shared)
    }

    /// The runtime now. Requests call this once and keep what they took.
    pub fn load(&self) -> Guard<Arc<Runtime>> {
        self.store.load()
    }

    pub fn load_full(&self) -> Arc<Runtime> {
        self.store.load_full()
    }

    /// Validates `policy` whole and, if good, makes it current; returns its version.
    /// A bad policy is refused and the running one stays.
    pub fn apply(self: &Arc<Self>, policy: Policy) -> Result<u64, Errors> {
        policy.validate_complete()?;
        let _g = self.apply_lock.lock().expect("apply lock poisoned");
        let old = self.store.load_full();
        let version = old.version + 1;
        let rt = compile(
            &policy,
            version,
            Some(&old),
            &*self.discover,
            &self.metrics,
            &self.listener_kinds,
            Arc::downgrade(self),
        );
        self.store.store(Arc::new(rt));
        self.metrics.policy_reloads.inc();
        Ok(version)
    }

    /// Where a connection's requests go.
    pub async fn resolve(self: &Arc<Self>, rt: &Runtime, target: Target) -> Option<Arc<ServiceRt>> {
        match target {
            Target::Listener(i) => rt.listener_service(i).cloned(),
            Target::Dst(dst) => Some(self.dst_service(rt, dst).await),
            // The app in this pod: no Service call, nothing to discover.
            Target::Inbound(app) => Some(rt.passthrough(app, &self.metrics)),
        }
    }

    /// The service a transparent connection's destination means: a policy service that
    /// claims the address, else what discovery says (a Kubernetes Service balanced over
    /// its endpoints), else the destination itself.
    pub async fn dst_service(self: &Arc<Self>, rt: &Runtime, dst: SocketAddr) -> Arc<ServiceRt> {
        if let Some(s) = rt.by_addr.get(&dst) {
            return s.clone();
        }
        let sub = {
            let mut map = self.dst.lock().expect("dst map poisoned");
            let followed = map.len() as i64;
            let entry = match map.entry(dst) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let Some(sub) = self.discover.resolve(dst) else {
                        return rt.passthrough(dst, &self.metrics);
                    };
                    self.metrics.discovery_destinations.set(followed + 1);
                    v.insert(DstEntry {
                        sub,
                        svc: None,
                        last_used: std::time::Instant::now(),
                        logged: false,
                    })
                }
            };
            entry.last_used = std::time::Instant::now();
            if let Some(now) = &*entry.sub.borrow()
                && let Some(svc) = entry.built(rt.version, now)
            {
                return svc;
            }
            entry.sub.clone()
        };
        if sub.borrow().is_none() && self.discover.reachable() {
            let mut first = sub.clone();
            let _ = tokio::time::timeout(RESOLVE_WAIT, first.wait_for(Option::is_some)).await;
        }
        let answer = sub.borrow().clone();
        let mut map = self.dst.lock().expect("dst map poisoned");
        let Some(entry) = map.get_mut(&dst) else {
            return rt.passthrough(dst, &self.metrics);
        };
        match answer {
            Some(r) if r.found => {
                // Another connection may have built it while this one waited.
                if let Some(svc) = entry.built(rt.version, &r) {
                    return svc;
                }
                let prev = entry.svc.as_ref().map(|(s, _)| &**s);
                let svc = self.discovered_service(rt, &r, prev, sub);
                entry.svc = Some((svc.clone(), r));
                svc
            }
            answer => {
                let reason = if answer.is_some() {
                    "not-a-service"
                } else {
                    "discovery-unavailable"
                };
                if !std::mem::replace(&mut entry.logged, true) {
                    match &answer {
                        Some(r) => {
                            tracing::info!(%dst, reason = %r.reason, "passing through: not a service")
                        }
                        None => tracing::warn!(%dst, "passing through: no answer from discovery"),
                    }
                }
                entry.svc = None;
                self.metrics.passthrough(reason);
                rt.passthrough(dst, &self.metrics)
            }
        }
    }

    /// A discovered service under `rt`'s policy: a policy service of the same name gives
    /// its settings and routes (`echo.shop: {lb: round-robin}`); endpoint state, pooled
    /// connections and the retry budget carry over from `prev`.
    fn discovered_service(
        self: &Arc<Self>,
        rt: &Runtime,
        r: &Resolved,
        prev: Option<&ServiceRt>,
        sub: DstWatch,
    ) -> Arc<ServiceRt> {
        let settings = rt.policy.service_settings(&r.name);
        let routes = rt
            .policy
            .services
            .get(&*r.name)
            .map(|spec| routes_for(spec, &settings))
            .unwrap_or_default();
        let old_eps = prev
            .filter(|p| p.name == r.name)
            .map(|p| p.endpoints().endpoints.clone())
            .unwrap_or_default();
        let endpoint_labels = rt.policy.metrics_endpoint_labels();
        let eps = reuse_endpoints(&r.name, &r.addrs, &old_eps, &self.metrics, endpoint_labels);
        let token = CancellationToken::new();
        // The pod's ferry.dev/zone and region win over its node's labels.
        let plan = Plan {
            on: settings.locality,
            prefer_node: r.prefer_node,
            caller: r
                .caller
                .overridden_by(&Place::from_policy(&rt.policy.locality)),
        };
        let locality = prev
            .filter(|p| p.name == r.name)
            .map(|p| p.locality.clone())
            .unwrap_or_else(|| LocalityState::new(r.name.clone(), &self.metrics));
        let svc = Arc::new(ServiceRt {
            clients: clients_for(prev, &rt.default_clients, &settings),
            retry_budget: prev
                .map(|p| p.retry_budget.clone())
                .unwrap_or_else(|| Arc::new(Budget::new())),
            limiter: prev
                .map(|p| p.limiter.clone())
                .unwrap_or_else(|| Arc::new(Limiter::new())),
            calls: call_slots(routes.len()),
            endpoint_labels,
            istio: rt.policy.metrics_istio(),
            _series: self.metrics.service_series(&r.name),
            name: r.name.clone(),
            version: rt.version,
            endpoints: ArcSwap::from_pointee(EndpointSet::new(eps, settings.lb, &plan, &locality)),
            plan,
            locality,
            settings,
            routes,
            h2: r.h2,
            _follow: Some(token.clone().drop_guard()),
        });
        follow(
            Arc::downgrade(&svc),
            sub,
            |r| r.as_ref().filter(|r| r.found).map(|r| r.addrs.clone()),
            token,
            Arc::downgrade(self),
        );
        svc
    }

    /// The services discovery resolved, as built for their last use.
    pub fn discovered(&self) -> Vec<Arc<ServiceRt>> {
        let map = self.dst.lock().expect("dst map poisoned");
        let mut v: Vec<_> = map
            .values()
            .filter_map(|e| e.svc.as_ref().map(|(s, _)| s.clone()))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.dedup_by(|a, b| Arc::ptr_eq(a, b));
        v
    }

    /// Forgets destinations no new connection asked for in `idle`, every `idle`/4:
    /// their subscriptions end once the connections still using them close.
    pub async fn forget_idle(self: Arc<Self>, idle: Duration) {
        loop {
            tokio::time::sleep(idle / 4).await;
            let now = std::time::Instant::now();
            let mut map = self.dst.lock().expect("dst map poisoned");
            map.retain(|_, e| now.duration_since(e.last_used) < idle);
            self.metrics.discovery_destinations.set(map.len() as i64);
        }
    }

    /// Ready once listeners serve; not ready again once draining starts.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

fn compile(
    policy: &Policy,
    version: u64,
    old: Option<&Runtime>,
    discover: &dyn Discover,
    metrics: &Metrics,
    listener_kinds: &[ListenerKind],
    shared: Weak<Shared>,
) -> Runtime {
    let defaults = policy.default_settings();
    let default_clients = match old {
        Some(o) if o.default_clients.connect_timeout == defaults.connect_timeout => {
            o.default_clients.clone()
        }
        _ => Clients::new(defaults.connect_timeout),
    };
    let mut services = HashMap::new();
    let mut by_addr = HashMap::new();
    for (name, spec) in &policy.services {
        let settings = policy.service_settings(name);
        let routes = routes_for(spec, &settings);
        let prev = old.and_then(|o| o.services.get(name)).map(|p| &**p);
        let clients = clients_for(prev, &default_clients, &settings);
        let name_arc: Arc<str> = Arc::from(name.as_str());
        let watch = spec.endpoints.as_ref().map(|e| discover.watch(e));
        let addrs: Vec<Addr> = watch
            .as_ref()
            .map(|w| w.borrow().to_vec())
            .unwrap_or_default();
        let old_eps = prev
            .map(|p| p.endpoints().endpoints.clone())
            .unwrap_or_default();
        let endpoint_labels = policy.metrics_endpoint_labels();
        let eps = reuse_endpoints(&name_arc, &addrs, &old_eps, metrics, endpoint_labels);
        let retry_budget = prev
            .map(|p| p.retry_budget.clone())
            .unwrap_or_else(|| Arc::new(Budget::new()));
        let limiter = prev
            .map(|p| p.limiter.clone())
            .unwrap_or_else(|| Arc::new(Limiter::new()));
        let token = CancellationToken::new();
        let plan = Plan {
            on: settings.locality,
            prefer_node: false,
            caller: Place::from_policy(&policy.locality),
        };
        let locality = prev
            .map(|p| p.locality.clone())
            .unwrap_or_else(|| LocalityState::new(name_arc.clone(), metrics));
        let svc = Arc::new(ServiceRt {
            retry_budget,
            limiter,
            calls: call_slots(routes.len()),
            endpoint_labels,
            istio: policy.metrics_istio(),
            _series: metrics.service_series(name),
            name: name_arc,
            version,
            endpoints: ArcSwap::from_pointee(EndpointSet::new(eps, settings.lb, &plan, &locality)),
            plan,
            locality,
            settings,
            routes,
            clients,
            h2: false,
            _follow: watch.is_some().then(|| token.clone().drop_guard()),
        });
        if let Some(w) = watch {
            follow(
                Arc::downgrade(&svc),
                w,
                |a| Some(a.clone()),
                token,
                shared.clone(),
            );
        }
        for a in spec.addresses.iter().flatten() {
            by_addr.insert(*a, svc.clone());
        }
        services.insert(name.clone(), svc);
    }
    let listener_services = listener_kinds
        .iter()
        .map(|k| match k {
            ListenerKind::Service { service, .. } => services.get(service).cloned(),
            _ => None,
        })
        .collect();
    Runtime {
        policy: Arc::new(policy.clone()),
        version,
        defaults,
        services,
        by_addr,
        listener_services,
        default_clients,
        passthrough: Mutex::default(),
    }
}

/// Keeps a service's endpoints in step with discovery until the service is dropped
/// (`stop`); `addrs` reads the addresses out of what the watch carries.
fn follow<T: Send + Sync + 'static>(
    svc: Weak<ServiceRt>,
    mut watch: tokio::sync::watch::Receiver<T>,
    addrs: fn(&T) -> Option<Arc<[Addr]>>,
    stop: CancellationToken,
    shared: Weak<Shared>,
) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = watch.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let (Some(svc), Some(shared)) = (svc.upgrade(), shared.upgrade()) else {
                return;
            };
            let Some(addrs) = addrs(&watch.borrow_and_update()) else {
                continue;
            };
            svc.set_addrs(&addrs, &shared.metrics);
        }
    });
}
