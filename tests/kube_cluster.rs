//! The Kubernetes test harness itself: a real API server and EndpointSlice controller on
//! the host loopback (no root needed), Pods made ready, terminating and deleted by hand.
//! Builds the binaries through tests/tools/build-kube.sh when they are missing.

mod support;

use std::time::Duration;

use support::kube::{
    Cluster, ServicePortSpec, TargetPort, create_namespace, create_node, create_pod,
    create_service, endpoint, force_delete_pod, mark_pod_terminating, set_pod_ready,
    wait_for_slices,
};

const NS: &str = "smoke";
const IP1: &str = "10.250.1.11";
const IP2: &str = "10.250.1.12";
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn endpointslices_follow_pods() {
    let cluster = Cluster::start(None);
    let c = cluster.client().await;

    create_namespace(&c, NS).await;
    create_node(&c, "node-a", Some("zone-a"), Some("region-1")).await;
    let svc = create_service(
        &c,
        NS,
        "echo",
        &[("app", "echo")],
        &[ServicePortSpec {
            name: Some("grpc".into()),
            port: 50051,
            target_port: TargetPort::Name("grpc".into()),
            app_protocol: Some("kubernetes.io/h2c".into()),
        }],
    )
    .await;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");

    for (name, ip) in [("echo-1", IP1), ("echo-2", IP2)] {
        create_pod(
            &c,
            NS,
            name,
            &[("app", "echo")],
            "node-a",
            &[("grpc", 50051)],
        )
        .await;
        set_pod_ready(&c, NS, name, ip, true).await;
    }

    let ready = |ip| {
        move |s: &[_]| {
            endpoint(s, ip)
                .is_some_and(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        }
    };
    let slices = wait_for_slices(&c, NS, "echo", |s| ready(IP1)(s) && ready(IP2)(s), WAIT).await;
    let slice = slices
        .iter()
        .find(|s| endpoint(std::slice::from_ref(s), IP1).is_some())
        .unwrap();
    assert_eq!(slice.address_type, "IPv4");
    let ports = slice.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].name.as_deref(), Some("grpc"));
    assert_eq!(ports[0].port, Some(50051));
    assert_eq!(ports[0].app_protocol.as_deref(), Some("kubernetes.io/h2c"));
    for (pod, ip) in [("echo-1", IP1), ("echo-2", IP2)] {
        let e = endpoint(&slices, ip).unwrap();
        assert_eq!(e.zone.as_deref(), Some("zone-a"), "{e:?}");
        assert_eq!(e.node_name.as_deref(), Some("node-a"), "{e:?}");
        let target = e.target_ref.as_ref().unwrap();
        assert_eq!(target.kind.as_deref(), Some("Pod"));
        assert_eq!(target.name.as_deref(), Some(pod));
    }

    // No kubelet finishes the deletion, so the Pod stays terminating (and still Ready).
    mark_pod_terminating(&c, NS, "echo-1").await;
    let slices = wait_for_slices(
        &c,
        NS,
        "echo",
        |s| {
            endpoint(s, IP1)
                .and_then(|e| e.conditions.as_ref())
                .is_some_and(|c| {
                    c.ready == Some(false) && c.serving == Some(true) && c.terminating == Some(true)
                })
        },
        WAIT,
    )
    .await;
    assert!(ready(IP2)(&slices), "the other pod stays ready");

    force_delete_pod(&c, NS, "echo-1").await;
    wait_for_slices(
        &c,
        NS,
        "echo",
        |s| endpoint(s, IP1).is_none() && ready(IP2)(s),
        WAIT,
    )
    .await;
}
