//! `waypoint run --kube --ca-addr ...`: the real binary configured from an in-test Kubernetes
//! API server and given its identity by an in-test istiod CA (discovery::testing,
//! identity::testing: both speak the real protocols, failures included).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BIN, Waypoint, spawn_run};

use discovery::testing::ApiServer;
use identity::testing::IstioCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const TOKEN: &str = "istio-token-of-waypoint";

/// A backend answering every request with its name.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(name)),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint}
spec: {controllerName: istio.io/waypoint-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data: {mesh: 'rootNamespace: istio-system'}
";

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: {vip}, ports: [{{name: http, port: 9080}}]}}
"
    )
}

fn slice(service: &str, ports: &[u16]) -> String {
    // Every backend listens on 127.0.0.1; one slice per port keeps the endpoints distinct
    // (the EndpointSlice port is per slice).
    let mut out = String::new();
    for (i, p) in ports.iter().enumerate() {
        out.push_str(&format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {service}-{i}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
endpoints: [{{addresses: [\"127.0.0.1\"]}}]
ports: [{{name: http, port: {p}}}]
"
        ));
    }
    out
}

struct Mesh {
    _dir: tempfile::TempDir,
    pki: Arc<hbone::testing::Pki>,
    api: ApiServer,
    ca: IstioCa,
    wp: Waypoint,
}

/// API server with `objects`, a CA, and `waypoint run --kube --ca-addr` against both.
async fn start_mesh(objects: &str, tweak: impl FnOnce(&ApiServer), max_ttl: Duration) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(hbone::testing::Pki::new("cluster.local").unwrap());
    let api = ApiServer::start().await;
    api.apply_yaml(objects);
    tweak(&api);
    let ca = IstioCa::start(pki.clone(), &[(TOKEN, "default", "waypoint")], max_ttl).await;
    let kubeconfig = api.kubeconfig(dir.path());
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, TOKEN).unwrap();
    let ca_addr = ca.addr.to_string();
    let wp = spawn_run(
        &[
            "--kube",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--ca-addr",
            &ca_addr,
            "--ca-root",
            root.to_str().unwrap(),
            "--ca-token",
            token.to_str().unwrap(),
            "--workers",
            "2",
        ],
        &[("WAYPOINT_LOG", "info")],
    );
    Mesh {
        _dir: dir,
        pki,
        api,
        ca,
        wp,
    }
}

impl Mesh {
    fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        let sleep = self.pki.issue("default", "sleep").unwrap();
        hbone::tls::client_config(
            &sleep,
            hbone::tls::ExpectedServer::AnyOf(vec![WAYPOINT_ID.parse().unwrap()]),
        )
        .unwrap()
    }

    async fn connect(&self) -> hbone::client::Connection {
        hbone::client::Connection::connect(self.wp.hbone, self.client_tls(), &Default::default())
            .await
            .unwrap()
    }
}

/// One HTTP/1.1 GET through a new tunnel on `conn`: (status, body).
async fn get(conn: &hbone::client::Connection, authority: &str) -> (u16, String) {
    let mut s = conn.open(authority, http::HeaderMap::new()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A plain HTTP/1.1 GET on a local admin-style listener: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Poll `f` every 20 ms until it returns `Some`, at most `limit`.
async fn within<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(m: &Mesh) {
    within(Duration::from_secs(20), "ready", || async {
        (http_get(m.wp.ready, "/healthz/ready").await.0 == 200).then_some(())
    })
    .await;
}

async fn metric(m: &Mesh, name: &str) -> Option<f64> {
    let (_, body) = http_get(m.wp.metrics, "/stats/prometheus").await;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_policies_follow_the_api_and_identity_comes_from_the_ca() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let objects = format!(
        "{BASE}---\n{}{}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()]),
        service("reviews-v2", "10.0.0.11"),
        slice("reviews-v2", &[v2.port()]),
    );
    let m = start_mesh(&objects, |_| {}, Duration::from_secs(24 * 3600)).await;
    ready(&m).await;
    // The CA was asked with the projected token and the cluster ID, for istiod's default TTL.
    let (auth, cluster, ttl) = m.ca.last.lock().unwrap().clone().unwrap();
    assert_eq!(auth, format!("Bearer {TOKEN}"));
    assert_eq!(cluster, "Kubernetes");
    assert_eq!(ttl, 24 * 3600);

    // The client checks the waypoint's identity: it is the CA-issued one.
    let conn = m.connect().await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "v1".into()));

    // Source labels of metrics come from the Pod at the client's address, when it runs as
    // the client's verified identity (Istio's waypoint: workload discovery by address).
    let sleep_pod = |sa: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: sleep-7d9f8-x2x4k
  namespace: default
  labels: {{app: sleep, version: v1, pod-template-hash: 7d9f8}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: sleep-7d9f8, uid: u1}}]
spec: {{serviceAccountName: {sa}}}
status: {{podIP: 127.0.0.1, podIPs: [{{ip: 127.0.0.1}}]}}
"
        )
    };
    m.api.apply_yaml(&sleep_pod("sleep"));
    let labelled = "source_workload=\"sleep\",source_canonical_service=\"sleep\",source_canonical_revision=\"v1\",source_workload_namespace=\"default\",source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\",source_app=\"sleep\",source_version=\"v1\",source_cluster=\"Kubernetes\"";
    within(Duration::from_secs(5), "labels from the Pod", || async {
        let fresh = m.connect().await;
        get(&fresh, "10.0.0.10:9080").await;
        let (_, text) = http_get(m.wp.metrics, "/stats/prometheus").await;
        text.contains(labelled).then_some(())
    })
    .await;
    // A Pod at that address running as another service account lends no labels.
    m.api.apply_yaml(&sleep_pod("impostor"));
    within(Duration::from_secs(5), "no labels from a mismatched Pod", || async {
        let fresh = m.connect().await;
        get(&fresh, "10.0.0.10:9080").await;
        let (_, text) = http_get(m.wp.metrics, "/stats/prometheus").await;
        text.contains("source_workload=\"unknown\",source_canonical_service=\"unknown\",source_canonical_revision=\"latest\",source_workload_namespace=\"default\",source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"").then_some(())
    })
    .await;

    // Destination labels come from the Pod behind the chosen endpoint (the slice's
    // `targetRef`), as Istio's waypoint takes them from the upstream endpoint's workload; a
    // Pod relabelled through the API relabels the series, without a recompile.
    m.api.apply_yaml(
        "apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-6d8f7-q2w3e
  namespace: default
  labels: {app: reviews, version: v1, pod-template-hash: 6d8f7}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-6d8f7, uid: u2}]
spec: {serviceAccountName: bookinfo-reviews}
status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}]}
",
    );
    m.api.apply_yaml(&format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: reviews-0, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}
addressType: IPv4
endpoints: [{{addresses: [\"127.0.0.1\"], targetRef: {{kind: Pod, name: reviews-v1-6d8f7-q2w3e, namespace: default}}}}]
ports: [{{name: http, port: {}}}]
",
        v1.port()
    ));
    let dest = "destination_workload=\"reviews-v1\",destination_workload_namespace=\"default\",destination_principal=\"unknown\",destination_app=\"reviews\",destination_version=\"v1\",destination_service=\"reviews.default.svc.cluster.local\",destination_canonical_service=\"reviews\",destination_canonical_revision=\"v1\",destination_service_name=\"reviews\",destination_service_namespace=\"default\",destination_cluster=\"Kubernetes\"";
    within(
        Duration::from_secs(5),
        "destination labels from the endpoint's Pod",
        || async {
            get(&conn, "10.0.0.10:9080").await;
            let (_, text) = http_get(m.wp.metrics, "/stats/prometheus").await;
            text.contains(dest).then_some(())
        },
    )
    .await;
    let compiles = metric(&m, "waypoint_config_reloads_ok_total").await;
    m.api.apply_yaml(
        "apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-6d8f7-q2w3e
  namespace: default
  labels: {app: reviews, version: v1-patched, pod-template-hash: 6d8f7}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-6d8f7, uid: u2}]
spec: {serviceAccountName: bookinfo-reviews}
status: {podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}]}
",
    );
    within(
        Duration::from_secs(5),
        "destination labels follow the Pod",
        || async {
            get(&conn, "10.0.0.10:9080").await;
            let (_, text) = http_get(m.wp.metrics, "/stats/prometheus").await;
            text.contains("destination_version=\"v1-patched\"")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        metric(&m, "waypoint_config_reloads_ok_total").await,
        compiles
    );

    // An HTTPRoute created through the API: traffic follows it.
    m.api.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews-v2, port: 9080}]}]
",
    );
    within(Duration::from_secs(5), "route to v2", || async {
        (get(&conn, "10.0.0.10:9080").await.1 == "v2").then_some(())
    })
    .await;
    // Changed: back to reviews (v1) by weight.
    m.api.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080, weight: 1}, {name: reviews-v2, port: 9080, weight: 0}]}]
",
    );
    within(Duration::from_secs(5), "route changed to v1", || async {
        (get(&conn, "10.0.0.10:9080").await.1 == "v1").then_some(())
    })
    .await;
    // Deleted: the default route (the Service's own endpoints).
    m.api.delete("HTTPRoute", "default", "reviews");
    m.api.apply_yaml(&slice("reviews", &[v2.port()]));
    within(Duration::from_secs(5), "route deleted", || async {
        (get(&conn, "10.0.0.10:9080").await.1 == "v2").then_some(())
    })
    .await;

    // An AuthorizationPolicy added through the API denies within a bounded time.
    let t0 = Instant::now();
    m.api.apply_yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]
",
    );
    within(Duration::from_secs(5), "policy denies", || async {
        (get(&conn, "10.0.0.10:9080").await.0 == 403).then_some(())
    })
    .await;
    eprintln!("AuthorizationPolicy took effect in {:?}", t0.elapsed());

    // An invalid policy change keeps the last good configuration (the DENY stays).
    m.api.apply_yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: 7}}]}]
",
    );
    within(
        Duration::from_secs(5),
        "rejected update counted",
        || async {
            (metric(&m, "waypoint_config_reloads_failed_total").await? >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await.0, 403);

    // Metrics and the config dump say where the configuration comes from.
    assert_eq!(metric(&m, "waypoint_config_source_up").await, Some(1.0));
    // The sleep Pod is stored as a compact record with an interned shape.
    assert!(metric(&m, "waypoint_config_pod_shapes").await >= Some(1.0));
    let (_, metrics) = http_get(m.wp.metrics, "/stats/prometheus").await;
    assert!(
        metrics.contains("waypoint_config_objects{kind=\"Service\"} 2"),
        "{metrics}"
    );
    let (_, dump) = http_get(m.wp.admin, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["source"]["kind"], "kubernetes");
    let svc = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "Service" && r["name"] == "default/reviews")
        .unwrap();
    assert!(svc["resource_version"].as_str().is_some(), "{svc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_a_missing_policy_crd_and_a_bad_object() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let objects = format!(
        "{BASE}---\n{}{}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()]),
        service("reviews-v2", "10.0.0.11"),
        slice("reviews-v2", &[v2.port()]),
    );
    // The API server is down when the waypoint starts: it serves nothing and is not ready.
    let m = start_mesh(&objects, |api| api.stop(), Duration::from_secs(3600)).await;
    let (code, body) = http_get(m.wp.ready, "/healthz/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("AuthorizationPolicy: not listed yet")
            || body.contains("AuthorizationPolicy: cannot list"),
        "{body}"
    );
    // Back, but RequestAuthentication's CRD is missing: still not ready, and it says so.
    m.api.remove_crd("requestauthentications");
    m.api.restart().await;
    // Every other kind lists once its back-off (capped at 10 s) retries; the missing CRD
    // alone keeps it not ready.
    let body = within(
        Duration::from_secs(30),
        "only the missing CRD left",
        || async {
            let (code, body) = http_get(m.wp.ready, "/healthz/ready").await;
            (code == 503
                && body.contains("RequestAuthentication CRD is not installed")
                && !body.contains("cannot list"))
            .then_some(body)
        },
    )
    .await;
    assert!(!body.contains("not listed yet"), "{body}");
    m.api.restore_crd("requestauthentications");
    ready(&m).await;
    let conn = m.connect().await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "v1".into()));

    // An HTTPRoute that does not compile is skipped with a warning naming it and its field;
    // a good one created with it applies.
    m.api.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews-v2, port: 9080}]
  rules: [{matches: [{path: {type: PathPrefix, value: no-slash}}], backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: good, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews-v2, port: 9080}]}]
",
    );
    within(Duration::from_secs(5), "the good route applies", || async {
        (get(&conn, "10.0.0.10:9080").await.1 == "v2").then_some(())
    })
    .await;
    let (_, dump) = http_get(m.wp.admin, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let warnings = dump["warnings"].to_string();
    assert!(
        warnings.contains("HTTPRoute default/bad: spec.rules[0].matches[0].path.value"),
        "{warnings}"
    );
    // The bad route's parent keeps its default route.
    assert_eq!(get(&conn, "10.0.0.11:9080").await.1, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_policy_kind_keeps_the_waypoint_not_ready() {
    let v1 = backend("v1").await;
    let objects = format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()])
    );
    let m = start_mesh(
        &objects,
        |api| {
            api.forbid("authorizationpolicies", true);
            // An optional kind without its CRD is only a warning.
            api.remove_crd("tlsroutes");
            // Reading Secrets (credentialName) is the one grant a cluster may withhold: it
            // never holds readiness back.
            api.forbid("secrets", true);
        },
        Duration::from_secs(3600),
    )
    .await;
    // Not ready, and it says which permission is missing; it stays so.
    let body = within(Duration::from_secs(10), "listed the rest", || async {
        let (code, body) = http_get(m.wp.ready, "/healthz/ready").await;
        (code == 503 && body.contains("authorizationpolicies.security.istio.io")).then_some(body)
    })
    .await;
    assert!(body.contains("forbidden"), "{body}");
    assert!(!body.contains("TLSRoute"), "{body}");
    assert!(!body.contains("Secret"), "{body}");
    // Granted: ready.
    m.api.forbid("authorizationpolicies", false);
    ready(&m).await;
    let conn = m.connect().await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "v1".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_cut_connections_and_an_api_restart_are_survived_with_traffic_flowing() {
    let (a, b) = (backend("a").await, backend("b").await);
    let objects = format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[a.port()])
    );
    let m = start_mesh(&objects, |_| {}, Duration::from_secs(3600)).await;
    ready(&m).await;
    let conn = m.connect().await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await.1, "a");

    // 410 Gone on every watch: re-list, and changes made meanwhile are seen.
    let lists = |api: &ApiServer| {
        api.requests()
            .iter()
            .filter(|r| *r == "list endpointslices")
            .count()
    };
    let lists_before = lists(&m.api);
    m.api.expire_watches();
    m.api.apply_yaml(&slice("reviews", &[b.port()]));
    within(Duration::from_secs(10), "followed after 410", || async {
        (get(&conn, "10.0.0.10:9080").await.1 == "b").then_some(())
    })
    .await;
    assert!(lists(&m.api) > lists_before, "re-listed after 410 Gone");

    // Connections cut mid-watch: resumed.
    m.api.cut_connections();
    m.api.apply_yaml(&slice("reviews", &[a.port()]));
    within(Duration::from_secs(10), "followed after a cut", || async {
        (get(&conn, "10.0.0.10:9080").await.1 == "a").then_some(())
    })
    .await;

    // The API server goes away: the last good configuration keeps serving.
    m.api.stop();
    within(Duration::from_secs(10), "source down", || async {
        (metric(&m, "waypoint_config_source_up").await? == 0.0).then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "a".into()));
    }
    assert_eq!(http_get(m.wp.ready, "/healthz/ready").await.0, 200);
    // Back, with a change made while it was down.
    m.api.apply_yaml(&slice("reviews", &[b.port()]));
    m.api.restart().await;
    // Within the longest watch back-off (10 s, jittered) after the restart.
    within(
        Duration::from_secs(20),
        "followed after a restart",
        || async { (get(&conn, "10.0.0.10:9080").await.1 == "b").then_some(()) },
    )
    .await;
    // Up once every watch delivered or stayed quiet past its longest back-off.
    within(Duration::from_secs(30), "source up", || async {
        (metric(&m, "waypoint_config_source_up").await? == 1.0).then_some(())
    })
    .await;
    // Bookmarks are accepted without disturbing anything.
    m.api.bookmark();
    assert_eq!(get(&conn, "10.0.0.10:9080").await.1, "b");
    let watches = m
        .api
        .requests()
        .iter()
        .filter(|r| *r == "watch endpointslices")
        .count();
    assert!(watches >= 3, "re-watched after each failure: {watches}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_scaling_under_load_loses_no_request() {
    let backends = [
        backend("e0").await,
        backend("e1").await,
        backend("e2").await,
        backend("e3").await,
    ];
    let ports: Vec<u16> = backends.iter().map(|b| b.port()).collect();
    let objects = format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &ports[..1])
    );
    let m = start_mesh(&objects, |_| {}, Duration::from_secs(3600)).await;
    ready(&m).await;
    let conn = m.connect().await;
    let compiles_before = metric(&m, "waypoint_config_reloads_ok_total")
        .await
        .unwrap();
    let load = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            for _ in 0..400 {
                let (code, body) = get(&conn, "10.0.0.10:9080").await;
                assert_eq!(code, 200, "a request failed during endpoint churn: {body}");
                *seen.entry(body).or_default() += 1;
            }
            seen
        })
    };
    // Scale 1 -> 4 -> 2 -> 4 -> 1 while requests flow. Each step replaces the slices: a
    // removed backend keeps listening, as a terminating pod does within its grace period.
    for step in [4usize, 2, 4, 1, 3] {
        for i in step..4 {
            m.api
                .delete("EndpointSlice", "default", &format!("reviews-{i}"));
        }
        m.api.apply_yaml(&slice("reviews", &ports[..step]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = load.await.unwrap();
    eprintln!("responses by endpoint: {seen:?}");
    assert!(
        seen.len() >= 3,
        "traffic reached the new endpoints: {seen:?}"
    );
    // Endpoint churn was applied in place: no compile of routes and policies.
    assert_eq!(
        metric(&m, "waypoint_config_reloads_ok_total")
            .await
            .unwrap(),
        compiles_before
    );
    assert!(
        metric(&m, "waypoint_config_endpoint_updates_total")
            .await
            .unwrap()
            >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_drops_no_connection() {
    let v1 = backend("v1").await;
    let objects = format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()])
    );
    // The CA caps lifetimes at 4 s: renewal every ~2 s.
    let m = start_mesh(&objects, |_| {}, Duration::from_secs(4)).await;
    ready(&m).await;
    let conn = m.connect().await;
    let issued_before = m.ca.issued.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut requests = 0;
    // Requests on one established connection across several renewals.
    while m.ca.issued.load(std::sync::atomic::Ordering::Relaxed) < issued_before + 3 {
        assert!(Instant::now() < deadline, "no renewals within 30 s");
        assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "v1".into()));
        requests += 1;
    }
    assert!(!conn.is_closed());
    // New connections get the new certificate (and still verify as the waypoint).
    let fresh = m.connect().await;
    assert_eq!(get(&fresh, "10.0.0.10:9080").await, (200, "v1".into()));
    within(Duration::from_secs(5), "renewals installed", || async {
        (metric(&m, "waypoint_certificate_reloads_total").await? >= 3.0).then_some(())
    })
    .await;
    eprintln!("{requests} requests on one connection across 3 renewals");

    // The CA goes down: the current certificate stays until it expires; then not ready.
    m.ca.down.store(true, std::sync::atomic::Ordering::Relaxed);
    within(
        Duration::from_secs(15),
        "not ready once expired",
        || async { (http_get(m.wp.ready, "/healthz/ready").await.0 == 503).then_some(()) },
    )
    .await;
    // Back: renewed, ready again.
    m.ca.down.store(false, std::sync::atomic::Ordering::Relaxed);
    ready(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_explain_answer_from_the_live_cluster() {
    let v1 = backend("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start().await;
    api.apply_yaml(&format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()])
    ));
    let kubeconfig = api.kubeconfig(dir.path());
    // `waypoint <sub> --kube --kubeconfig ... <extra>`.
    let run = |sub: &str, extra: &[&str]| {
        let mut args = vec![sub.to_string(), "--kube".into(), "--kubeconfig".into()];
        args.push(kubeconfig.display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        async move {
            tokio::task::spawn_blocking(move || std::process::Command::new(BIN).args(args).output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let stdout = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = stdout(run("services", &[]).await);
    assert!(
        text.contains("reviews") && text.contains("10.0.0.10") && text.contains("bound here"),
        "{text}"
    );
    let text = stdout(run("explain", &["--to", "10.0.0.10:9080", "/"]).await);
    assert!(text.contains("reviews"), "{text}");
    let text = stdout(run("check", &[]).await);
    assert!(text.contains("serves 1 Service port"), "{text}");
    // Unreachable API server: a clear error, bounded.
    api.stop();
    let out = run("services", &[]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Kubernetes API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_istiods_waypoint_pod() {
    // `proxy waypoint ...` with the template's environment and downward-API labels.
    let v1 = backend("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(hbone::testing::Pki::new("cluster.local").unwrap());
    let api = ApiServer::start().await;
    api.apply_yaml(&format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()])
    ));
    let ca = IstioCa::start(
        pki.clone(),
        &[(TOKEN, "default", "waypoint")],
        Duration::from_secs(3600),
    )
    .await;
    let labels = dir.path().join("labels");
    std::fs::write(
        &labels,
        "gateway.networking.k8s.io/gateway-name=\"waypoint\"\nistio.io/dataplane-mode=\"none\"\n",
    )
    .unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, TOKEN).unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let ca_addr = ca.addr.to_string();
    let child = std::process::Command::new(BIN)
        .args([
            "proxy",
            "waypoint",
            "--domain",
            "default.svc.cluster.local",
            "--serviceCluster",
            "waypoint.default",
            "--proxyLogLevel",
            "warning",
        ])
        .envs([
            ("POD_NAMESPACE", "default"),
            ("POD_NAME", "waypoint-7d9f-abcde"),
            ("SERVICE_ACCOUNT", "waypoint"),
            ("TRUST_DOMAIN", "cluster.local"),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
            ("CA_ADDR", ca_addr.as_str()),
            ("WAYPOINT_POD_LABELS", labels.to_str().unwrap()),
            ("WAYPOINT_CA_ROOT", root.to_str().unwrap()),
            ("WAYPOINT_CA_TOKEN", token.to_str().unwrap()),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            // Ports of the template are the defaults; here port 0 on loopback.
            ("WAYPOINT_HBONE_ADDR", "127.0.0.1:0"),
            ("WAYPOINT_READY_ADDR", "127.0.0.1:0"),
            ("WAYPOINT_METRICS_ADDR", "127.0.0.1:0"),
            ("WAYPOINT_ENVOY_PROM_ADDR", "127.0.0.1:0"),
            ("WAYPOINT_ADMIN_ADDR", "127.0.0.1:0"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let m = Mesh {
        _dir: dir,
        pki,
        api,
        ca,
        wp: common::attach(child),
    };
    ready(&m).await;
    let conn = m.connect().await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "v1".into()));
    // Envoy's stats port (the template's `http-envoy-prom`, 15090) serves the same metrics.
    let prom = m.wp.envoy_prom.expect("the pod binds Envoy's stats port");
    let (status, text) = http_get(prom, "/stats/prometheus").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("istio_requests_total{reporter=\"waypoint\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entries_come_and_go_with_the_api() {
    let (v1, external) = (backend("v1").await, backend("external").await);
    let objects = format!(
        "{BASE}---\n{}{}",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()])
    );
    let m = start_mesh(&objects, |_| {}, Duration::from_secs(24 * 3600)).await;
    ready(&m).await;
    // Egress through the waypoint: an entry labelled for it, with an address istiod
    // allocated (status.addresses), appears through the watch.
    m.api.apply_yaml(&format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
status:
  addresses: [{{value: 240.240.0.1, host: api.example.com}}]
",
        external.port()
    ));
    within(Duration::from_secs(5), "the entry served", || async {
        let conn = m.connect().await;
        let ok = conn
            .open("240.240.0.1:80", http::HeaderMap::new())
            .await
            .is_ok();
        if !ok {
            return None;
        }
        (get(&conn, "240.240.0.1:80").await == (200, "external".into())).then_some(())
    })
    .await;
    // Deleted: its address is refused again, the Service is untouched.
    m.api.delete("ServiceEntry", "default", "external");
    within(Duration::from_secs(5), "the entry gone", || async {
        let conn = m.connect().await;
        conn.open("240.240.0.1:80", http::HeaderMap::new())
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let conn = m.connect().await;
    assert_eq!(get(&conn, "10.0.0.10:9080").await, (200, "v1".into()));

    // workloadSelector: the entry's endpoints are the Pods (and WorkloadEntries) it selects,
    // so a Pod coming and going changes them (a compile, not only an endpoint refresh).
    m.api.apply_yaml(&format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [legacy.internal]
  addresses: [240.240.0.2]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {}}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: legacy}}}}
",
        external.port()
    ));
    // A CONNECT before the entry is compiled in is refused; once it is, no endpoint: 503.
    let served = || async {
        let conn = m.connect().await;
        conn.open("240.240.0.2:80", http::HeaderMap::new())
            .await
            .ok()?;
        Some(get(&conn, "240.240.0.2:80").await)
    };
    within(
        Duration::from_secs(5),
        "the selecting entry, no endpoint yet",
        || async { served().await.filter(|(code, _)| *code == 503) },
    )
    .await;
    m.api.apply_yaml(
        "apiVersion: v1
kind: Pod
metadata: {name: legacy-1, namespace: default, labels: {app: legacy}}
spec: {serviceAccountName: legacy}
status: {podIP: 127.0.0.1, podIPs: [{ip: 127.0.0.1}]}
",
    );
    within(
        Duration::from_secs(5),
        "the selected Pod serves",
        || async {
            served()
                .await
                .filter(|r| *r == (200, "external".to_string()))
        },
    )
    .await;
    m.api.delete("Pod", "default", "legacy-1");
    within(Duration::from_secs(5), "the Pod gone", || async {
        served().await.filter(|(code, _)| *code == 503)
    })
    .await;
}

/// DestinationRule `tls.credentialName` in `--kube`: Secrets are watched in the waypoint's
/// namespace only, without the types that never hold a credential (field selector on
/// `type`); a Secret appearing there resolves the credential. Forbidden Secrets keep the
/// waypoint ready (the rest serves; such connections fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_name_secrets_come_from_the_waypoints_namespace() {
    let v1 = backend("v1").await;
    let objects = format!(
        "{BASE}---\n{}{}---\napiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec: {{host: reviews, trafficPolicy: {{tls: {{mode: SIMPLE, credentialName: egress-ca}}}}}}
",
        service("reviews", "10.0.0.10"),
        slice("reviews", &[v1.port()])
    );
    let m = start_mesh(&objects, |_| {}, Duration::from_secs(24 * 3600)).await;
    ready(&m).await;
    let warnings = || async {
        let (_, dump) = http_get(m.wp.admin, "/config_dump").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
        dump["warnings"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|w| w.as_str().map(str::to_string))
            .filter(|w| w.contains("credentialName"))
            .collect::<Vec<_>>()
    };
    let not_found = "Secret default/egress-ca not found";
    assert!(
        warnings().await.iter().any(|w| w.contains(not_found)),
        "{:?}",
        warnings().await
    );
    // In another namespace, or of a type never listed: still not found.
    m.api.apply_yaml(
        "apiVersion: v1
kind: Secret
metadata: {name: egress-ca, namespace: other}
stringData: {cacert: x}
---
apiVersion: v1
kind: Secret
metadata: {name: egress-ca, namespace: default}
type: helm.sh/release.v1
stringData: {cacert: x}
",
    );
    // The Pod list and watch carry on meanwhile; a change that is seen proves the Secret
    // watch had its chance (events are delivered in order per watch, so wait on a marker in
    // the same namespace and kind).
    m.api.apply_yaml(
        "apiVersion: v1
kind: Secret
metadata: {name: marker, namespace: default}
type: kubernetes.io/tls
stringData: {tls.crt: x, tls.key: y}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: marker, namespace: default}
spec: {host: marker-host, trafficPolicy: {tls: {mode: SIMPLE, credentialName: marker}}}
",
    );
    within(Duration::from_secs(5), "the marker Secret seen", || async {
        let w = warnings().await;
        // The marker has no CA: found, but not usable.
        w.iter()
            .any(|w| w.contains("no CA certificate in Secret default/marker"))
            .then_some(())
    })
    .await;
    assert!(
        warnings().await.iter().any(|w| w.contains(not_found)),
        "other namespaces and helm releases are not read"
    );
    // The Secret in the waypoint's namespace: the credential resolves.
    m.api.apply_yaml(
        "apiVersion: v1
kind: Secret
metadata: {name: egress-ca-cacert, namespace: default}
stringData: {cacert: x}
",
    );
    within(Duration::from_secs(5), "the credential found", || async {
        (!warnings().await.iter().any(|w| w.contains("egress-ca"))).then_some(())
    })
    .await;
    let requests = m.api.requests();
    assert!(requests.iter().any(|r| r == "list secrets"), "{requests:?}");
}
