//! Endpoint sources behind one trait: static lists and DNS for policy services, and
//! for transparent destinations no policy service claims, what the discovery controller
//! says of them (Kubernetes Services, see the `controller` module).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_policy::Endpoints;
use tokio::sync::watch;

use crate::locality::Place;

/// One endpoint address and where it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub addr: SocketAddr,
    pub place: Place,
    /// EndpointSlice `hints.forZones`.
    pub hints: Arc<[Arc<str>]>,
}

impl From<SocketAddr> for Addr {
    fn from(addr: SocketAddr) -> Self {
        Addr {
            addr,
            place: Place::default(),
            hints: Arc::from(Vec::new()),
        }
    }
}

/// The current addresses of a service; a new value is sent on every change.
pub type EndpointWatch = watch::Receiver<Arc<[Addr]>>;

/// What discovery knows of a transparent destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// False: not a service discovery knows of (a pod IP, a headless Service, outside
    /// the cluster); calls go where they were going. `reason` says why.
    pub found: bool,
    pub reason: String,
    /// The service's name in policy, metrics, spans and `/endpoints` (`echo.shop`).
    pub name: Arc<str>,
    /// The upstream speaks HTTP/2 without TLS (appProtocol `kubernetes.io/h2c`, `grpc`).
    pub h2: bool,
    /// What to balance over: the ready endpoints, else those still serving while they
    /// terminate (as kube-proxy does), so a rollout's last pod is not dropped early.
    pub addrs: Arc<[Addr]>,
    /// The Service's `trafficDistribution: PreferSameNode`.
    pub prefer_node: bool,
    /// Where the caller runs, from its node's labels.
    pub caller: Place,
}

/// A destination's resolution: `None` until the first answer; afterwards the last
/// answer stays while the source is unreachable.
pub type DstWatch = watch::Receiver<Option<Arc<Resolved>>>;

/// Turns a service's endpoint spec into a live view of its addresses.
pub trait Discover: Send + Sync + 'static {
    fn watch(&self, spec: &Endpoints) -> EndpointWatch;

    /// Starts following a transparent destination no policy service claims; `None`
    /// when this source does not resolve destinations (everything passes through).
    fn resolve(&self, _dst: SocketAddr) -> Option<DstWatch> {
        None
    }

    /// Whether a first answer is worth waiting for now (the source is reachable).
    fn reachable(&self) -> bool {
        false
    }
}

/// Static lists as written, and DNS names re-resolved every `dns_refresh`.
pub struct DefaultDiscover {
    dns_refresh: Duration,
    /// Resolvers shared by every policy version that names the same host.
    dns: Mutex<HashMap<(String, u16), EndpointWatch>>,
}

impl DefaultDiscover {
    pub fn new(dns_refresh: Duration) -> Self {
        DefaultDiscover {
            dns_refresh,
            dns: Mutex::default(),
        }
    }
}

impl Default for DefaultDiscover {
    fn default() -> Self {
        DefaultDiscover::new(Duration::from_secs(5))
    }
}

impl Discover for DefaultDiscover {
    fn watch(&self, spec: &Endpoints) -> EndpointWatch {
        match spec {
            Endpoints::Static(eps) => {
                let addrs: Vec<Addr> = eps
                    .iter()
                    .map(|e| Addr {
                        addr: e.addr,
                        place: Place::from_policy(&e.locality),
                        hints: Arc::from(Vec::new()),
                    })
                    .collect();
                watch::channel(Arc::from(addrs)).1
            }
            Endpoints::Dns { host, port } => {
                let mut dns = self.dns.lock().expect("dns map poisoned");
                dns.retain(|_, rx| rx.has_changed().is_ok());
                dns.entry((host.clone(), *port))
                    .or_insert_with(|| spawn_dns(host.clone(), *port, self.dns_refresh))
                    .clone()
            }
        }
    }
}

/// Resolves `host` now and then every `refresh` until nobody watches; a failed lookup
/// keeps the last good answer, since a DNS hiccup should not empty a service.
fn spawn_dns(host: String, port: u16, refresh: Duration) -> EndpointWatch {
    let (tx, rx) = watch::channel::<Arc<[Addr]>>(Arc::from(Vec::new()));
    tokio::spawn(async move {
        loop {
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    tx.send_if_modified(|cur| {
                        let changed = !cur.iter().map(|a| a.addr).eq(addrs.iter().copied());
                        if changed {
                            tracing::info!(%host, ?addrs, "dns endpoints changed");
                            *cur = addrs.into_iter().map(Addr::from).collect();
                        }
                        changed
                    });
                }
                Err(error) => {
                    tracing::warn!(%host, %error, "dns lookup failed; keeping last endpoints")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(refresh) => {}
                _ = tx.closed() => return,
            }
        }
    });
    rx
}
