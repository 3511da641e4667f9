//! The running configuration: a [`Runtime`] compiled from a merged [`Policy`], and the
//! [`Shared`] store that swaps it atomically.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use ferry_policy::{Errors, ListenerKind, Policy, RouteMatch, Settings};
use ferry_telemetry::Tracer;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::balance::{Endpoint, EndpointSet};
use crate::discovery::{Discover, EndpointWatch};
use crate::metrics::{AtomicHistogram, Metrics, ServiceLabels, StatusCounters};

/// How long an idle pooled connection is kept. Below the 10 s header-read timeout that
/// peers (ferry included) use to close idle keep-alive connections, so a pooled
/// connection is retired before the other side closes it under a new request.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// Pooled upstream clients, one per protocol. Cloning shares the pools.
#[derive(Clone)]
pub struct Clients {
    pub h1: Client<HttpConnector, crate::http::ReqBody>,
    pub h2: Client<HttpConnector, crate::http::ReqBody>,
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
        let h1 = b.build(conn.clone());
        b.http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(false)
            .http2_adaptive_window(true);
        let h2 = b.build(conn);
        Clients {
            h1,
            h2,
            connect_timeout,
        }
    }
}

/// Retries may add at most a tenth to a service's load, plus a small reserve, so a
/// failing upstream is not buried under retries.
pub struct RetryBudget(std::sync::atomic::AtomicI64);

const RETRY_COST: i64 = 10;
const RETRY_RESERVE: i64 = 10 * RETRY_COST;
const RETRY_CAP: i64 = 1000 * RETRY_COST;

impl RetryBudget {
    fn new() -> Self {
        RetryBudget(std::sync::atomic::AtomicI64::new(RETRY_RESERVE))
    }

    /// Every request earns a tenth of a retry.
    pub fn deposit(&self) {
        if self.0.load(Ordering::Relaxed) < RETRY_CAP {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn withdraw(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= RETRY_COST).then(|| b - RETRY_COST)
            })
            .is_ok()
    }
}

/// One service as requests see it for one policy version.
pub struct ServiceRt {
    pub name: Arc<str>,
    pub version: u64,
    pub settings: Settings,
    pub routes: Vec<(RouteMatch, Settings)>,
    endpoints: arc_swap::ArcSwap<EndpointSet>,
    pub clients: Clients,
    pub duration: AtomicHistogram,
    pub retry_budget: Arc<RetryBudget>,
}

impl ServiceRt {
    /// The settings of the first route matching `path`, else the service's.
    pub fn settings_for(&self, path: &str) -> &Settings {
        self.routes
            .iter()
            .find(|(m, _)| m.matches(path))
            .map(|(_, s)| s)
            .unwrap_or(&self.settings)
    }

    pub fn endpoints(&self) -> Guard<Arc<EndpointSet>> {
        self.endpoints.load()
    }

    pub fn endpoint_set(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// Replaces the address list, keeping the state of endpoints that remain.
    fn set_addrs(&self, addrs: &[SocketAddr], metrics: &Metrics) {
        let old = self.endpoints.load();
        let eps = reuse_endpoints(&self.name, addrs, &old.endpoints, metrics);
        self.endpoints
            .store(Arc::new(EndpointSet::new(eps, self.settings.lb)));
    }
}

fn reuse_endpoints(
    service: &Arc<str>,
    addrs: &[SocketAddr],
    old: &[Arc<Endpoint>],
    metrics: &Metrics,
) -> Vec<Arc<Endpoint>> {
    addrs
        .iter()
        .map(|a| {
            old.iter()
                .find(|e| e.addr == *a)
                .cloned()
                .unwrap_or_else(|| {
                    Arc::new(Endpoint::new(
                        *a,
                        StatusCounters::new(&metrics.requests, service.clone(), a.to_string()),
                    ))
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

    /// The service a transparent connection's destination means: the one that claims the
    /// address, else the destination itself.
    pub fn dst_service(&self, dst: SocketAddr, metrics: &Metrics) -> Arc<ServiceRt> {
        match self.by_addr.get(&dst) {
            Some(s) => s.clone(),
            None => self.passthrough(dst, metrics),
        }
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
                let eps = reuse_endpoints(&name, &[dst], &[], metrics);
                Arc::new(ServiceRt {
                    duration: duration_for(&name, metrics),
                    endpoints: ArcSwap::from_pointee(EndpointSet::new(eps, self.defaults.lb)),
                    name,
                    version: self.version,
                    settings: self.defaults.clone(),
                    routes: Vec::new(),
                    clients: self.default_clients.clone(),
                    retry_budget: Arc::new(RetryBudget::new()),
                })
            })
            .clone()
    }
}

fn duration_for(name: &str, metrics: &Metrics) -> AtomicHistogram {
    metrics
        .duration
        .get_or_create(&ServiceLabels {
            service: name.to_string(),
        })
        .clone()
}

/// The proxy's shared state: the current runtime behind `arc-swap`, and what builds it.
pub struct Shared {
    store: ArcSwap<Runtime>,
    pub metrics: Metrics,
    discover: Arc<dyn Discover>,
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
        let routes = spec
            .routes
            .iter()
            .map(|r| (r.matcher.clone(), r.overrides.apply(&settings)))
            .collect();
        let prev = old.and_then(|o| o.services.get(name));
        let clients = match prev {
            Some(p) if p.clients.connect_timeout == settings.connect_timeout => p.clients.clone(),
            _ if default_clients.connect_timeout == settings.connect_timeout => {
                default_clients.clone()
            }
            _ => Clients::new(settings.connect_timeout),
        };
        let name_arc: Arc<str> = Arc::from(name.as_str());
        let watch = spec.endpoints.as_ref().map(|e| discover.watch(e));
        let addrs: Vec<SocketAddr> = watch
            .as_ref()
            .map(|w| w.borrow().to_vec())
            .unwrap_or_default();
        let old_eps = prev
            .map(|p| p.endpoints().endpoints.clone())
            .unwrap_or_default();
        let eps = reuse_endpoints(&name_arc, &addrs, &old_eps, metrics);
        let retry_budget = prev
            .map(|p| p.retry_budget.clone())
            .unwrap_or_else(|| Arc::new(RetryBudget::new()));
        let svc = Arc::new(ServiceRt {
            retry_budget,
            duration: duration_for(name, metrics),
            name: name_arc,
            version,
            endpoints: ArcSwap::from_pointee(EndpointSet::new(eps, settings.lb)),
            settings,
            routes,
            clients,
        });
        if let Some(w) = watch {
            follow(Arc::downgrade(&svc), w, shared.clone());
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

/// Keeps a service's endpoints in step with discovery while the service is in use.
fn follow(svc: Weak<ServiceRt>, mut watch: EndpointWatch, shared: Weak<Shared>) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            let (Some(svc), Some(shared)) = (svc.upgrade(), shared.upgrade()) else {
                return;
            };
            let addrs = watch.borrow_and_update().clone();
            svc.set_addrs(&addrs, &shared.metrics);
        }
    });
}
