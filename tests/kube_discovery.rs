//! ferry-controller against a real kube-apiserver, etcd and the real EndpointSlice
//! controller on the host loopback (no root needed): what a sidecar asking the
//! Discovery API sees as Pods come, go, terminate, and Services change.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_discovery_api::{DiscoveryClient, Resolution, ResolveRequest};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use support::controller::Controller;
use support::kube::{
    Cluster, ServicePortSpec, TargetPort, create_namespace, create_node, create_pod,
    create_service, force_delete_pod, mark_pod_terminating, set_pod_ready,
};
use tonic::Streaming;

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(20);

fn port(name: &str, port: u16, target: TargetPort, app: Option<&str>) -> ServicePortSpec {
    ServicePortSpec {
        name: Some(name.into()),
        port,
        target_port: target,
        app_protocol: app.map(str::to_string),
    }
}

/// Reads the stream until `pred` holds for an answer, and returns it.
async fn until(
    s: &mut Streaming<Resolution>,
    what: &str,
    pred: impl Fn(&Resolution) -> bool,
) -> Resolution {
    let end = Instant::now() + WAIT;
    let mut last = None;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.message()).await {
            Ok(Ok(Some(r))) => {
                if pred(&r) {
                    return r;
                }
                last = Some(r);
            }
            Ok(other) => panic!("{what}: the stream ended: {other:?}"),
            Err(_) => panic!("{what}: not seen within {WAIT:?}; last answer: {last:#?}"),
        }
    }
}

/// Endpoint address → (ready, terminating, zone, region).
fn eps(r: &Resolution) -> BTreeMap<String, (bool, bool, String, String)> {
    r.endpoints
        .iter()
        .map(|e| {
            let l = e.locality.clone().unwrap_or_default();
            (
                format!("{}:{}", e.ip, e.port),
                (e.ready, e.terminating, l.zone, l.region),
            )
        })
        .collect()
}

fn ready_addrs(r: &Resolution) -> Vec<String> {
    r.endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| format!("{}:{}", e.ip, e.port))
        .collect()
}

#[test]
fn the_controller_streams_each_destinations_endpoints_as_the_cluster_changes() {
    let cluster = Cluster::start(None);
    let mut controller = Controller::start(
        cluster.kubeconfig_path(),
        &["--addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
        &[],
    );
    let (grpc, admin) = (controller.grpc, controller.admin);
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    cluster.block_on(move || async move {
        let c = support::kube::client_for(&kubeconfig).await;
        create_namespace(&c, NS).await;
        create_node(&c, "node-a", Some("zone-a"), Some("region-1")).await;
        create_node(&c, "node-c", Some("zone-c"), Some("region-2")).await;
        // Two ports; the gRPC one targets a named container port, which pod 3 puts
        // elsewhere, as a rollout changing the port would.
        let svc = create_service(
            &c,
            NS,
            "echo",
            &[("app", "echo")],
            &[
                port("grpc", 50051, "grpc".into(), Some("kubernetes.io/h2c")),
                port("http", 80, 8080.into(), None),
            ],
        )
        .await;
        let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).unwrap();
        for (i, node, grpc_port) in [
            (1, "node-a", 50051),
            (2, "node-a", 50051),
            (3, "node-c", 50052),
        ] {
            let name = format!("echo-{i}");
            create_pod(
                &c,
                NS,
                &name,
                &[("app", "echo")],
                node,
                &[("grpc", grpc_port), ("http", 8080)],
            )
            .await;
            set_pod_ready(&c, NS, &name, &format!("10.252.0.1{i}"), true).await;
        }

        controller_ready(admin).await;
        let client = DiscoveryClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let resolve = |dest: String| {
            let mut client = client.clone();
            async move {
                client
                    .resolve(ResolveRequest {
                        destination: dest,
                        node: "node-a".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };

        // By ClusterIP, as a transparent sidecar asks.
        let mut by_ip = resolve(format!("{cluster_ip}:50051")).await;
        let r = until(&mut by_ip, "three ready endpoints", |r| {
            ready_addrs(r).len() == 3
        })
        .await;
        assert!(r.found);
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("echo", NS));
        assert_eq!(r.app_protocol, "kubernetes.io/h2c");
        assert_eq!(r.caller.clone().unwrap().zone, "zone-a");
        let a = |z: &str, r: &str| (true, false, z.to_string(), r.to_string());
        assert_eq!(
            eps(&r),
            BTreeMap::from([
                ("10.252.0.11:50051".to_string(), a("zone-a", "region-1")),
                ("10.252.0.12:50051".to_string(), a("zone-a", "region-1")),
                ("10.252.0.13:50052".to_string(), a("zone-c", "region-2")),
            ])
        );

        // By name, in every form, on the other port.
        for name in [
            "echo.shop:80",
            "echo.shop.svc:80",
            "echo.shop.svc.cluster.local:80",
        ] {
            let mut s = resolve(name.to_string()).await;
            let r = until(&mut s, name, |r| ready_addrs(r).len() == 3).await;
            assert!(
                ready_addrs(&r).iter().all(|a| a.ends_with(":8080")),
                "{name}: {r:?}"
            );
            assert_eq!(r.app_protocol, "");
        }

        // Scale up: the new pod reaches the open stream; the lag is what a sidecar waits.
        create_pod(
            &c,
            NS,
            "echo-4",
            &[("app", "echo")],
            "node-a",
            &[("grpc", 50051), ("http", 8080)],
        )
        .await;
        let t = Instant::now();
        set_pod_ready(&c, NS, "echo-4", "10.252.0.14", true).await;
        until(&mut by_ip, "pod 4 added", |r| {
            ready_addrs(r).contains(&"10.252.0.14:50051".to_string())
        })
        .await;
        eprintln!("pod ready -> sidecar stream: {:?}", t.elapsed());

        // Not ready: still listed, not ready (the sidecar stops sending to it).
        set_pod_ready(&c, NS, "echo-2", "10.252.0.12", false).await;
        until(&mut by_ip, "pod 2 not ready", |r| {
            eps(r).get("10.252.0.12:50051").is_some_and(|e| !e.0)
        })
        .await;

        // Terminating, then gone.
        mark_pod_terminating(&c, NS, "echo-1").await;
        until(&mut by_ip, "pod 1 terminating", |r| {
            eps(r).get("10.252.0.11:50051").is_some_and(|e| e.1 && !e.0)
        })
        .await;
        force_delete_pod(&c, NS, "echo-1").await;
        let r = until(&mut by_ip, "pod 1 gone", |r| {
            !eps(r).contains_key("10.252.0.11:50051")
        })
        .await;
        assert_eq!(ready_addrs(&r), ["10.252.0.13:50052", "10.252.0.14:50051"]);

        // What is not a Service with a ClusterIP: the sidecar passes it through.
        let headless: Api<Service> = Api::namespaced(c.clone(), NS);
        let mut h = Service::default();
        h.metadata.name = Some("db".into());
        h.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some([("app".to_string(), "db".to_string())].into()),
            ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
                name: Some("sql".into()),
                port: 5432,
                ..Default::default()
            }]),
            ..Default::default()
        });
        headless.create(&PostParams::default(), &h).await.unwrap();
        let mut s = resolve("db.shop:5432".into()).await;
        let r = until(&mut s, "headless", |r| r.reason.contains("headless")).await;
        assert!(!r.found);
        let mut s = resolve("10.252.0.13:50052".into()).await;
        let r = until(&mut s, "a pod IP", |_| true).await;
        assert!(!r.found && r.reason.contains("no Service"), "{r:?}");
        // A name that is not a destination is refused with what was expected.
        let err = client
            .clone()
            .resolve(ResolveRequest {
                destination: "echo:80".into(),
                node: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("name.namespace"), "{err:?}");

        // A Service without a selector, with an EndpointSlice written by hand.
        let manual = create_service(
            &c,
            NS,
            "legacy",
            &[],
            &[port("http", 80, 8080.into(), None)],
        )
        .await;
        let slices: Api<EndpointSlice> = Api::namespaced(c.clone(), NS);
        slices
            .create(
                &PostParams::default(),
                &EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some("legacy-1".into()),
                        labels: Some(
                            [(
                                "kubernetes.io/service-name".to_string(),
                                "legacy".to_string(),
                            )]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints: Some(vec![Endpoint {
                        addresses: vec!["10.252.9.9".into()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ports: Some(vec![EndpointPort {
                        name: Some("http".into()),
                        port: Some(9090),
                        ..Default::default()
                    }]),
                },
            )
            .await
            .unwrap();
        let legacy_ip = manual.spec.and_then(|s| s.cluster_ip).unwrap();
        let mut s = resolve(format!("{legacy_ip}:80")).await;
        let r = until(&mut s, "manual slice", |r| {
            ready_addrs(r) == ["10.252.9.9:9090"]
        })
        .await;
        assert_eq!(r.name, "legacy");

        // The Service goes away: so does the answer.
        let svcs: Api<Service> = Api::namespaced(c.clone(), NS);
        svcs.delete("legacy", &Default::default()).await.unwrap();
        until(&mut s, "service deleted", |r| !r.found).await;

        let (status, metrics) = support::raw(admin, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        assert!(
            metrics.contains("ferry_controller_subscriptions"),
            "{metrics}"
        );
        assert!(
            metrics.contains("ferry_controller_objects{kind=\"service\"}"),
            "{metrics}"
        );
    });
    controller.kill();
}

async fn controller_ready(admin: std::net::SocketAddr) {
    let end = Instant::now() + Duration::from_secs(30);
    while support::raw(admin, "GET", "/ready", "").await.0 != 200 {
        assert!(
            Instant::now() < end,
            "ferry-controller not ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
