//! Being a mesh citizen: HBONE to ambient pods (our own HBONE server and real Envoy as the
//! destination), identity checked both ways, and workload-addressed traffic.

use std::sync::Arc;

use waypoint_tests::envoy::{Envoy, hbone_server_config};
use waypoint_tests::*;

/// An ambient namespace with one pod `reviews-v1-0` at `pod_ip` (service account
/// bookinfo-reviews) behind Service reviews (10.0.0.10:9080 -> targetPort `target`).
fn ambient_manifests(pod_ip: &str, target: u16, waypoint_for: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {{istio.io/use-waypoint: waypoint, istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: default
  labels: {{istio.io/waypoint-for: {waypoint_for}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec: {{clusterIP: 10.0.0.10, ports: [{{name: http, port: 9080, targetPort: {target}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1-0, namespace: default}}
spec: {{serviceAccountName: bookinfo-reviews}}
status: {{podIP: "{pod_ip}"}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-1
  namespace: default
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints:
- addresses: ["{pod_ip}"]
  targetRef: {{kind: Pod, name: reviews-v1-0, namespace: default}}
ports: [{{name: http, port: {target}}}]
"#
    )
}

#[tokio::test]
async fn ambient_endpoints_are_reached_over_hbone_with_pooled_connections() {
    let backend = Backend::echo("reviews-v1").await;
    let pki = Arc::new(hbone::testing::Pki::new(TD).unwrap());
    let zt = Ztunnel::start(
        "127.0.0.21",
        &pki.issue("default", "bookinfo-reviews").unwrap(),
    )
    .await;
    let yaml = ambient_manifests("127.0.0.21", backend.addr.port(), "service");
    let port = zt.addr.port();
    let wp = TestWaypoint::start_with_pki(&yaml, pki, |c| c.upstream.hbone_port = port).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    for _ in 0..20 {
        let r = http.get("reviews:9080", "/").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "reviews-v1\n")
        );
    }
    let seen = zt.seen();
    let target = format!("127.0.0.21:{}", backend.addr.port());
    assert!(!seen.is_empty());
    for (identity, authority) in &seen {
        // The destination sees the waypoint's identity, and CONNECT names pod ip:targetPort.
        assert_eq!(
            identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/waypoint")
        );
        assert_eq!(authority, &target);
    }
    assert_eq!(
        zt.stats
            .connections_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "tunnels share one pooled HBONE connection"
    );
    let logs = wp.next_logs(20);
    assert_eq!(
        logs[0]["upstream_host"],
        format!("envoy://connect_originate/{target}")
    );
    assert_eq!(
        logs[0]["upstream_local_address"],
        "envoy://internal_client_address/"
    );
    assert_eq!(
        logs[0]["upstream_cluster"],
        "inbound-vip|9080|http|reviews.default.svc.cluster.local"
    );
}

#[tokio::test]
async fn a_destination_from_another_trust_domain_is_refused() {
    let backend = Backend::echo("reviews-v1").await;
    let pki = Arc::new(hbone::testing::Pki::new(TD).unwrap());
    // Chained to the mesh root, but claiming another trust domain.
    let foreign = pki
        .issue_uri("spiffe://other.domain/ns/default/sa/bookinfo-reviews")
        .unwrap();
    let zt = Ztunnel::start("127.0.0.23", &foreign).await;
    let yaml = ambient_manifests("127.0.0.23", backend.addr.port(), "service");
    let port = zt.addr.port();
    let wp = TestWaypoint::start_with_pki(&yaml, pki, |c| c.upstream.hbone_port = port).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    let r = http.get("reviews:9080", "/").await.unwrap();
    assert_eq!(r.status, 503);
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "URX,UF");
    let reason = log["upstream_transport_failure_reason"]
        .as_str()
        .unwrap_or("");
    assert!(reason.starts_with("TLS_error:"), "{reason}");
    assert!(
        zt.seen().is_empty(),
        "no tunnel may be opened to a foreign identity"
    );
}

#[tokio::test]
async fn real_envoy_terminating_hbone_is_a_valid_destination() {
    let backend = Backend::echo("reviews-v1").await;
    let pki = Arc::new(hbone::testing::Pki::new(TD).unwrap());
    let dir = tempfile::tempdir().unwrap();
    pki.write_named(dir.path(), "pod", "default", "bookinfo-reviews")
        .unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    let envoy = Envoy::start(&hbone_server_config(
        "127.0.0.24",
        &dir.path().join("pod-cert.pem"),
        &dir.path().join("pod-key.pem"),
        &root,
        backend.addr.port(),
    ))
    .await
    .expect("envoy starts");
    let listener = envoy.listener("hbone_inbound").await.unwrap();
    let yaml = ambient_manifests("127.0.0.24", backend.addr.port(), "service");
    let wp =
        TestWaypoint::start_with_pki(&yaml, pki, |c| c.upstream.hbone_port = listener.port()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    for _ in 0..5 {
        let r = http
            .get("reviews:9080", "/")
            .await
            .unwrap_or_else(|e| panic!("{e}; envoy log:\n{}", envoy.log()));
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "reviews-v1\n")
        );
    }
    // Envoy accepted our certificate (its SAN matcher requires the mesh trust domain) and
    // carried the tunnel to the pod.
    assert!(
        envoy.stat("cluster.pod.upstream_cx_total").await >= 1,
        "envoy log:\n{}",
        envoy.log()
    );
    let logs = wp.next_logs(5);
    assert!(logs.iter().all(|l| {
        l["upstream_host"]
            .as_str()
            .unwrap_or("")
            .starts_with("envoy://connect_originate/127.0.0.24:")
    }));
}

#[tokio::test]
async fn workload_addressed_traffic_needs_waypoint_for_workload() {
    let backend = Backend::echo("reviews-v1").await;
    let pki = Arc::new(hbone::testing::Pki::new(TD).unwrap());
    let zt = Ztunnel::start(
        "127.0.0.25",
        &pki.issue("default", "bookinfo-reviews").unwrap(),
    )
    .await;
    let pod_target = format!("127.0.0.25:{}", backend.addr.port());
    for (waypoint_for, served) in [("service", false), ("workload", true), ("all", true)] {
        let yaml = ambient_manifests("127.0.0.25", backend.addr.port(), waypoint_for);
        let port = zt.addr.port();
        let wp = TestWaypoint::start_with_pki(&yaml, pki.clone(), |c| c.upstream.hbone_port = port)
            .await;
        let conn = wp.connect_as("default", "sleep").await;
        let resp = conn
            .send_connect(&pod_target, http::HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(resp.status == 200, served, "waypoint-for={waypoint_for}");
        if served {
            let mut http = TunnelHttp::open(&conn, &pod_target).await.unwrap();
            let r = http.get("reviews-v1", "/").await.unwrap();
            assert_eq!(r.status, 200);
            let logs = wp.next_logs(1);
            assert_eq!(logs[0]["upstream_cluster"], "encap");
            assert_eq!(logs[0]["downstream_local_address"], pod_target.as_str());
        }
        // Service traffic is served only for service/all.
        let svc = conn
            .send_connect("10.0.0.10:9080", http::HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(
            svc.status == 200,
            waypoint_for != "workload",
            "service traffic, waypoint-for={waypoint_for}"
        );
    }
}
