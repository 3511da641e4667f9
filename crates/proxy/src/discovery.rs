//! Endpoint sources behind one trait: static lists and DNS today; Kubernetes
//! EndpointSlices plug in behind the same [`Discover`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_policy::Endpoints;
use tokio::sync::watch;

/// The current addresses of a service; a new value is sent on every change.
pub type EndpointWatch = watch::Receiver<Arc<[SocketAddr]>>;

/// Turns a service's endpoint spec into a live view of its addresses.
pub trait Discover: Send + Sync + 'static {
    fn watch(&self, spec: &Endpoints) -> EndpointWatch;
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
            Endpoints::Static(addrs) => watch::channel(Arc::from(addrs.as_slice())).1,
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
    let (tx, rx) = watch::channel::<Arc<[SocketAddr]>>(Arc::from(Vec::new()));
    tokio::spawn(async move {
        loop {
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    tx.send_if_modified(|cur| {
                        let changed = **cur != *addrs;
                        if changed {
                            tracing::info!(%host, ?addrs, "dns endpoints changed");
                            *cur = Arc::from(addrs);
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
