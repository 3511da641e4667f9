//! What the controller knows of the cluster, kept small: per Service its ClusterIPs and
//! ports, per Service its EndpointSlices' endpoints, per Node its locality. Pure: the
//! watchers feed it, [`Index::resolve`] answers destinations from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ferry_discovery_api as api;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl SvcKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        SvcKey {
            namespace: Arc::from(namespace),
            name: Arc::from(name),
        }
    }
}

/// What a sidecar asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    /// A ClusterIP and a Service port.
    Addr(SocketAddr),
    /// A Service by name and a Service port.
    Name(SvcKey, u16),
}

impl Dest {
    /// Parses `10.96.0.12:80`, `[fd00::1]:80`, `echo.shop:80`, `echo.shop.svc:80` or
    /// `echo.shop.svc.<cluster domain>:80`.
    pub fn parse(s: &str, cluster_domain: &str) -> Result<Dest, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Dest::Addr(a));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("{s:?} has no port (expected name.namespace:port or ip:port)")
        })?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        let host = host.trim_end_matches('.');
        let host = host
            .strip_suffix(cluster_domain)
            .and_then(|h| h.strip_suffix('.'))
            .unwrap_or(host);
        let host = host.strip_suffix(".svc").unwrap_or(host);
        match host.split('.').collect::<Vec<_>>()[..] {
            [name, namespace] if !name.is_empty() && !namespace.is_empty() => {
                Ok(Dest::Name(SvcKey::new(namespace, name), port))
            }
            _ => Err(format!(
                "{s:?} is not a Service destination (expected name.namespace:port, \
                 name.namespace.svc.{cluster_domain}:port or ip:port)"
            )),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Dest::Addr(a) => a.port(),
            Dest::Name(_, p) => *p,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct SvcPort {
    name: String,
    port: u16,
    app_protocol: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SvcInfo {
    cluster_ips: Vec<IpAddr>,
    /// Headless or ExternalName: callers go where they were going.
    passthrough: Option<&'static str>,
    ports: Vec<SvcPort>,
    traffic_distribution: String,
}

impl SvcInfo {
    fn from(svc: &Service) -> SvcInfo {
        let spec = svc.spec.clone().unwrap_or_default();
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let passthrough = if spec.type_.as_deref() == Some("ExternalName") {
            Some("the Service is of type ExternalName")
        } else if cluster_ips.is_empty() {
            Some("the Service is headless (no ClusterIP)")
        } else {
            None
        };
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .map(|p| SvcPort {
                name: p.name.unwrap_or_default(),
                port: p.port as u16,
                app_protocol: p.app_protocol.unwrap_or_default(),
            })
            .collect();
        SvcInfo {
            cluster_ips,
            passthrough,
            ports,
            traffic_distribution: spec.traffic_distribution.unwrap_or_default(),
        }
    }
}

/// One EndpointSlice, as much of it as resolution needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    ipv6: Option<bool>,
    /// Port name → (number, appProtocol).
    ports: Vec<(String, u16, String)>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
struct SliceEndpoint {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone: String,
    node: String,
    pod: String,
    hint_zones: Vec<String>,
}

impl SliceInfo {
    fn from(s: &EndpointSlice) -> SliceInfo {
        let ipv6 = match s.address_type.as_str() {
            "IPv4" => Some(false),
            "IPv6" => Some(true),
            _ => None, // FQDN slices name no address to balance over.
        };
        let ports = s
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                    p.app_protocol.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let endpoints = s
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| {
                let ip: IpAddr = e.addresses.first()?.parse().ok()?;
                let c = e.conditions.clone().unwrap_or_default();
                // Unset conditions mean ready, as the EndpointSlice API says.
                let ready = c.ready.unwrap_or(true);
                Some(SliceEndpoint {
                    ip,
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                    zone: e.zone.clone().unwrap_or_default(),
                    node: e.node_name.clone().unwrap_or_default(),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone())
                        .unwrap_or_default(),
                    hint_zones: e
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|z| z.iter().map(|z| z.name.clone()).collect())
                        .unwrap_or_default(),
                })
            })
            .collect();
        SliceInfo {
            ipv6,
            ports,
            endpoints,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    zone: String,
    region: String,
}

impl NodeInfo {
    fn from(meta: &ObjectMeta) -> NodeInfo {
        let label = |k: &str| {
            meta.labels
                .as_ref()
                .and_then(|l| l.get(k).cloned())
                .unwrap_or_default()
        };
        NodeInfo {
            zone: label(ZONE_LABEL),
            region: label(REGION_LABEL),
        }
    }
}

/// What an update changed: every answer (`all`), or those of these Services.
#[derive(Debug, Default)]
pub struct Touched {
    pub all: bool,
    pub services: HashSet<SvcKey>,
}

/// The cluster as resolution sees it.
#[derive(Debug, Default)]
pub struct Index {
    services: HashMap<SvcKey, SvcInfo>,
    by_ip: HashMap<IpAddr, SvcKey>,
    /// Per Service, its slices by slice name.
    slices: HashMap<SvcKey, BTreeMap<Arc<str>, SliceInfo>>,
    /// Slice (namespace, name) → the Service it belongs to, to handle deletes.
    slice_owner: HashMap<(Arc<str>, Arc<str>), SvcKey>,
    nodes: HashMap<String, NodeInfo>,
}

fn svc_key(svc: &Service) -> SvcKey {
    SvcKey::new(
        svc.metadata.namespace.as_deref().unwrap_or_default(),
        svc.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn slice_id(s: &EndpointSlice) -> (Arc<str>, Arc<str>) {
    (
        Arc::from(s.metadata.namespace.as_deref().unwrap_or_default()),
        Arc::from(s.metadata.name.as_deref().unwrap_or_default()),
    )
}

impl Index {
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.services.len(),
            self.slice_owner.len(),
            self.nodes.len(),
        )
    }

    pub fn apply_service(&mut self, svc: &Service, t: &mut Touched) {
        let key = svc_key(svc);
        let info = SvcInfo::from(svc);
        if self.services.get(&key) == Some(&info) {
            return;
        }
        self.delete_service_key(&key);
        for ip in &info.cluster_ips {
            self.by_ip.insert(*ip, key.clone());
        }
        self.services.insert(key.clone(), info);
        t.services.insert(key);
    }

    pub fn delete_service(&mut self, svc: &Service, t: &mut Touched) {
        let key = svc_key(svc);
        if self.delete_service_key(&key) {
            t.services.insert(key);
        }
    }

    fn delete_service_key(&mut self, key: &SvcKey) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for ip in &old.cluster_ips {
            if self.by_ip.get(ip) == Some(key) {
                self.by_ip.remove(ip);
            }
        }
        true
    }

    /// Replaces every Service (after a relist); everything is touched.
    pub fn reset_services(&mut self, svcs: &[Service], t: &mut Touched) {
        self.services.clear();
        self.by_ip.clear();
        for s in svcs {
            self.apply_service(s, t);
        }
        t.all = true;
    }

    pub fn apply_slice(&mut self, s: &EndpointSlice, t: &mut Touched) {
        let id = slice_id(s);
        let owner = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|n| SvcKey::new(&id.0, n));
        // A slice whose service-name label changed leaves its old Service.
        if let Some(prev) = self.slice_owner.get(&id).cloned()
            && Some(&prev) != owner.as_ref()
        {
            self.remove_slice(&id, &prev, t);
        }
        let Some(owner) = owner else { return };
        let info = SliceInfo::from(s);
        let slices = self.slices.entry(owner.clone()).or_default();
        if slices.get(&id.1) == Some(&info) {
            return;
        }
        slices.insert(id.1.clone(), info);
        self.slice_owner.insert(id, owner.clone());
        t.services.insert(owner);
    }

    pub fn delete_slice(&mut self, s: &EndpointSlice, t: &mut Touched) {
        let id = slice_id(s);
        if let Some(owner) = self.slice_owner.get(&id).cloned() {
            self.remove_slice(&id, &owner, t);
        }
    }

    fn remove_slice(&mut self, id: &(Arc<str>, Arc<str>), owner: &SvcKey, t: &mut Touched) {
        self.slice_owner.remove(id);
        if let Some(slices) = self.slices.get_mut(owner) {
            slices.remove(&id.1);
            if slices.is_empty() {
                self.slices.remove(owner);
            }
        }
        t.services.insert(owner.clone());
    }

    pub fn reset_slices(&mut self, slices: &[EndpointSlice], t: &mut Touched) {
        self.slices.clear();
        self.slice_owner.clear();
        for s in slices {
            self.apply_slice(s, t);
        }
        t.all = true;
    }

    /// Nodes come as metadata only: their labels are all resolution needs.
    pub fn apply_node(&mut self, n: &ObjectMeta, t: &mut Touched) {
        let name = n.name.clone().unwrap_or_default();
        let info = NodeInfo::from(n);
        if self.nodes.get(&name) != Some(&info) {
            self.nodes.insert(name, info);
            t.all = true;
        }
    }

    pub fn delete_node(&mut self, n: &ObjectMeta, t: &mut Touched) {
        if self
            .nodes
            .remove(n.name.as_deref().unwrap_or_default())
            .is_some()
        {
            t.all = true;
        }
    }

    pub fn reset_nodes<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a ObjectMeta>,
        t: &mut Touched,
    ) {
        self.nodes.clear();
        for n in nodes {
            self.apply_node(n, t);
        }
        t.all = true;
    }

    fn locality(&self, node: &str, zone: &str) -> api::Locality {
        let n = self.nodes.get(node);
        api::Locality {
            region: n.map(|n| n.region.clone()).unwrap_or_default(),
            zone: if zone.is_empty() {
                n.map(|n| n.zone.clone()).unwrap_or_default()
            } else {
                zone.to_string()
            },
            node: node.to_string(),
        }
    }

    /// The Service a destination means, if any.
    pub fn service_of(&self, dest: &Dest) -> Option<SvcKey> {
        match dest {
            Dest::Addr(a) => self.by_ip.get(&a.ip()).cloned(),
            Dest::Name(k, _) => self.services.contains_key(k).then(|| k.clone()),
        }
    }

    /// The answer for `dest` now, for a caller on `caller_node`.
    pub fn resolve(&self, dest: &Dest, caller_node: &str) -> api::Resolution {
        let caller = (!caller_node.is_empty()).then(|| self.locality(caller_node, ""));
        let not_found = |reason: String| api::Resolution {
            found: false,
            reason,
            caller: caller.clone(),
            ..Default::default()
        };
        let Some(key) = self.service_of(dest) else {
            return not_found(match dest {
                Dest::Addr(a) => format!("no Service has the ClusterIP {}", a.ip()),
                Dest::Name(k, _) => format!("no Service {}/{}", k.namespace, k.name),
            });
        };
        let svc = &self.services[&key];
        if let Some(why) = svc.passthrough {
            return not_found(why.to_string());
        }
        let Some(sp) = svc.ports.iter().find(|p| p.port == dest.port()) else {
            return not_found(format!(
                "the Service {}/{} has no TCP port {}",
                key.namespace,
                key.name,
                dest.port()
            ));
        };
        let ipv6 = match dest {
            Dest::Addr(a) => a.is_ipv6(),
            Dest::Name(..) => svc.cluster_ips.first().is_some_and(IpAddr::is_ipv6),
        };
        let mut app_protocol = sp.app_protocol.clone();
        let mut eps: BTreeMap<(IpAddr, u16), api::Endpoint> = BTreeMap::new();
        for slice in self.slices.get(&key).into_iter().flat_map(|s| s.values()) {
            if slice.ipv6 != Some(ipv6) {
                continue;
            }
            // Slices name their ports after the Service's; the number is the target
            // port, resolved per pod by the EndpointSlice controller.
            let Some((_, port, proto)) = slice.ports.iter().find(|(n, ..)| *n == sp.name) else {
                continue;
            };
            if app_protocol.is_empty() {
                app_protocol = proto.clone();
            }
            for e in &slice.endpoints {
                let ep = api::Endpoint {
                    ip: e.ip.to_string(),
                    port: u32::from(*port),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    locality: Some(self.locality(&e.node, &e.zone)),
                    pod: e.pod.clone(),
                    hint_zones: e.hint_zones.clone(),
                };
                // The same address in two slices (mid-move): keep the readier entry.
                match eps.get(&(e.ip, *port)) {
                    Some(old) if old.ready || !ep.ready => {}
                    _ => {
                        eps.insert((e.ip, *port), ep);
                    }
                }
            }
        }
        api::Resolution {
            found: true,
            reason: String::new(),
            name: key.name.to_string(),
            namespace: key.namespace.to_string(),
            port: u32::from(sp.port),
            port_name: sp.name.clone(),
            app_protocol,
            traffic_distribution: svc.traffic_distribution.clone(),
            endpoints: eps.into_values().collect(),
            caller,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ObjectReference, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn service(ns: &str, name: &str, ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, ap)| ServicePort {
                            name: Some(n.to_string()),
                            port: *p,
                            app_protocol: (!ap.is_empty()).then(|| ap.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(
        ns: &str,
        name: &str,
        svc: &str,
        family: &str,
        ports: &[(&str, i32)],
        eps: &[(&str, bool, bool, &str)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, ready, terminating, node)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            serving: Some(*ready || *terminating),
                            terminating: Some(*terminating),
                        }),
                        node_name: Some(node.to_string()),
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(format!("pod-{ip}")),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn node(name: &str, zone: &str, region: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [
                    (ZONE_LABEL.to_string(), zone.to_string()),
                    (REGION_LABEL.to_string(), region.to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn destinations_parse_as_addresses_or_names() {
        let d = |s| Dest::parse(s, "cluster.local");
        assert_eq!(
            d("10.96.0.12:50051").unwrap(),
            Dest::Addr("10.96.0.12:50051".parse().unwrap())
        );
        let named = Dest::Name(SvcKey::new("shop", "echo"), 50051);
        for s in [
            "echo.shop:50051",
            "echo.shop.svc:50051",
            "echo.shop.svc.cluster.local:50051",
            "echo.shop.svc.cluster.local.:50051",
        ] {
            assert_eq!(d(s).unwrap(), named, "{s}");
        }
        assert!(d("echo:50051").unwrap_err().contains("name.namespace"));
        assert!(d("echo.shop").unwrap_err().contains("no port"));
        assert!(d("echo.shop:http").unwrap_err().contains("not a port"));
    }

    #[test]
    fn a_cluster_ip_resolves_to_the_ports_endpoints_with_locality() {
        let mut ix = Index::default();
        let mut t = Touched::default();
        ix.apply_node(&node("n1", "a", "r1"), &mut t);
        ix.apply_service(
            &service(
                "shop",
                "echo",
                &["10.96.0.12", "fd00::12"],
                &[("grpc", 50051, "kubernetes.io/h2c"), ("admin", 9000, "")],
            ),
            &mut t,
        );
        ix.apply_slice(
            &slice(
                "shop",
                "echo-abc",
                "echo",
                "IPv4",
                &[("grpc", 8080), ("admin", 9001)],
                &[
                    ("10.0.0.2", true, false, "n1"),
                    ("10.0.0.1", false, true, "n1"),
                ],
            ),
            &mut t,
        );
        ix.apply_slice(
            &slice(
                "shop",
                "echo-v6",
                "echo",
                "IPv6",
                &[("grpc", 8080)],
                &[("fd00::2", true, false, "n1")],
            ),
            &mut t,
        );
        assert!(t.services.contains(&SvcKey::new("shop", "echo")));

        let r = ix.resolve(&Dest::Addr("10.96.0.12:50051".parse().unwrap()), "n1");
        assert!(r.found);
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("echo", "shop"));
        assert_eq!(r.app_protocol, "kubernetes.io/h2c");
        let got: Vec<_> = r
            .endpoints
            .iter()
            .map(|e| (e.ip.as_str(), e.port, e.ready, e.terminating))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1", 8080, false, true),
                ("10.0.0.2", 8080, true, false)
            ]
        );
        let loc = r.endpoints[1].locality.clone().unwrap();
        assert_eq!((loc.zone.as_str(), loc.region.as_str()), ("a", "r1"));
        assert_eq!(r.caller.unwrap().zone, "a");

        // The other port of the same slice, and the other family.
        let r = ix.resolve(&Dest::Name(SvcKey::new("shop", "echo"), 9000), "");
        assert_eq!(r.endpoints.len(), 2);
        assert!(r.endpoints.iter().all(|e| e.port == 9001));
        let r = ix.resolve(&Dest::Addr("[fd00::12]:50051".parse().unwrap()), "");
        assert_eq!(r.endpoints.len(), 1);
        assert_eq!(r.endpoints[0].ip, "fd00::2");

        let r = ix.resolve(&Dest::Addr("10.96.0.12:1234".parse().unwrap()), "");
        assert!(!r.found);
        assert!(r.reason.contains("no TCP port 1234"), "{}", r.reason);
    }

    #[test]
    fn headless_unknown_and_deleted_services_pass_through() {
        let mut ix = Index::default();
        let mut t = Touched::default();
        let headless = service("shop", "db", &["None"], &[("sql", 5432, "")]);
        ix.apply_service(&headless, &mut t);
        let r = ix.resolve(&Dest::Name(SvcKey::new("shop", "db"), 5432), "");
        assert!(!r.found && r.reason.contains("headless"), "{}", r.reason);
        let r = ix.resolve(&Dest::Addr("10.244.1.7:8080".parse().unwrap()), "");
        assert!(!r.found && r.reason.contains("no Service"), "{}", r.reason);

        let svc = service("shop", "web", &["10.96.0.20"], &[("http", 80, "")]);
        ix.apply_service(&svc, &mut t);
        let sl = slice(
            "shop",
            "web-1",
            "web",
            "IPv4",
            &[("http", 8080)],
            &[("10.0.0.9", true, false, "")],
        );
        ix.apply_slice(&sl, &mut t);
        let dest = Dest::Addr("10.96.0.20:80".parse().unwrap());
        assert_eq!(ix.resolve(&dest, "").endpoints.len(), 1);
        ix.delete_slice(&sl, &mut t);
        let r = ix.resolve(&dest, "");
        assert!(r.found && r.endpoints.is_empty());
        ix.delete_service(&svc, &mut t);
        assert!(!ix.resolve(&dest, "").found);
        assert_eq!(ix.counts(), (1, 0, 0));
    }
}
