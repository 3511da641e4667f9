//! Discovery through `ferry-controller`: each destination the app calls is resolved once
//! and then followed over one gRPC stream, on one shared HTTP/2 connection to the
//! controller. The last answer stays while the controller is away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_discovery_api::{DiscoveryClient, Resolution, ResolveRequest};
use ferry_policy::Endpoints;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::discovery::{Addr, DefaultDiscover, Discover, DstWatch, EndpointWatch, Resolved};
use crate::locality::Place;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct ControllerDiscover {
    base: DefaultDiscover,
    client: DiscoveryClient<Channel>,
    node: Arc<str>,
    reachable: Arc<AtomicBool>,
}

impl ControllerDiscover {
    /// `url` is the controller's gRPC address (`http://ferry-controller.ferry-system:8086`);
    /// `node` the pod's node, for locality. Connects lazily.
    pub fn new(base: DefaultDiscover, url: &str, node: &str) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_string())
            .map_err(|e| anyhow::anyhow!("--controller {url:?} is not a URL: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(ControllerDiscover {
            base,
            client: DiscoveryClient::new(channel),
            node: Arc::from(node),
            // Optimistic at start, so the first calls wait for their first answer.
            reachable: Arc::new(AtomicBool::new(true)),
        })
    }
}

impl Discover for ControllerDiscover {
    fn watch(&self, spec: &Endpoints) -> EndpointWatch {
        self.base.watch(spec)
    }

    fn resolve(&self, dst: SocketAddr) -> Option<DstWatch> {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(follow(
            self.client.clone(),
            dst,
            self.node.clone(),
            tx,
            self.reachable.clone(),
        ));
        Some(rx)
    }

    fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

/// Streams `dst`'s answers into `tx` until nobody watches; reconnects with backoff.
async fn follow(
    mut client: DiscoveryClient<Channel>,
    dst: SocketAddr,
    node: Arc<str>,
    tx: watch::Sender<Option<Arc<Resolved>>>,
    reachable: Arc<AtomicBool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let req = ResolveRequest {
            destination: dst.to_string(),
            node: node.to_string(),
        };
        let call = tokio::select! {
            _ = tx.closed() => return,
            r = client.resolve(req) => r,
        };
        match call {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(r)) => {
                            reachable.store(true, Ordering::Relaxed);
                            backoff = BACKOFF_MIN;
                            let r = resolved(r);
                            tx.send_if_modified(|cur| {
                                let changed = cur.as_deref() != Some(&r);
                                if changed {
                                    tracing::debug!(%dst, service = %r.name, endpoints = r.addrs.len(), "discovery update");
                                    *cur = Some(Arc::new(r));
                                }
                                changed
                            });
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%dst, %status, "discovery stream ended");
                            break;
                        }
                    }
                }
                reachable.store(false, Ordering::Relaxed);
            }
            Err(status) => {
                if reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%dst, %status, "discovery controller unreachable; keeping last endpoints, passing new destinations through");
                }
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn place(l: Option<&ferry_discovery_api::Locality>) -> Place {
    let some = |s: &str| (!s.is_empty()).then(|| Arc::from(s));
    match l {
        Some(l) => Place {
            region: some(&l.region),
            zone: some(&l.zone),
            node: some(&l.node),
        },
        None => Place::default(),
    }
}

/// The controller's answer as the proxy uses it.
fn resolved(r: Resolution) -> Resolved {
    let addr = |e: &ferry_discovery_api::Endpoint| {
        Some(Addr {
            addr: SocketAddr::new(e.ip.parse().ok()?, u16::try_from(e.port).ok()?),
            place: place(e.locality.as_ref()),
            hints: e.hint_zones.iter().map(|z| Arc::from(z.as_str())).collect(),
        })
    };
    let ready: Vec<Addr> = r
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(addr)
        .collect();
    let addrs = if ready.is_empty() {
        r.endpoints
            .iter()
            .filter(|e| e.serving)
            .filter_map(addr)
            .collect()
    } else {
        ready
    };
    Resolved {
        found: r.found,
        reason: r.reason,
        name: Arc::from(format!("{}.{}", r.name, r.namespace)),
        h2: matches!(
            r.app_protocol.as_str(),
            "kubernetes.io/h2c" | "h2c" | "grpc" | "http2"
        ),
        addrs: Arc::from(addrs),
        prefer_node: r.traffic_distribution == "PreferSameNode",
        caller: place(r.caller.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_discovery_api::Endpoint as Ep;

    fn ep(ip: &str, ready: bool, serving: bool) -> Ep {
        Ep {
            ip: ip.into(),
            port: 8080,
            ready,
            serving,
            terminating: !ready,
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_win_and_terminating_ones_serve_only_when_none_is_ready() {
        let r = resolved(Resolution {
            found: true,
            name: "echo".into(),
            namespace: "shop".into(),
            app_protocol: "kubernetes.io/h2c".into(),
            endpoints: vec![ep("10.0.0.1", false, true), ep("10.0.0.2", true, true)],
            ..Default::default()
        });
        assert_eq!(&*r.name, "echo.shop");
        assert!(r.h2);
        assert_eq!(r.addrs[0].addr, "10.0.0.2:8080".parse().unwrap());

        let r = resolved(Resolution {
            found: true,
            endpoints: vec![ep("10.0.0.1", false, true), ep("10.0.0.3", false, false)],
            ..Default::default()
        });
        assert!(!r.h2);
        assert_eq!(r.addrs[0].addr, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(r.addrs.len(), 1);
    }
}
