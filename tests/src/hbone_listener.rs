//! The HBONE listener: who may connect (mTLS rules) and which CONNECTs are served.

use std::sync::atomic::Ordering;

use http::{Method, StatusCode};
use tokio::io::AsyncReadExt;
use waypoint_tests::*;

async fn one_service() -> (TestWaypoint, Backend) {
    let backend = Backend::echo("reviews").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend.addr]);
    (TestWaypoint::start(&m.yaml()).await, backend)
}

fn handshake_failures(wp: &TestWaypoint) -> u64 {
    wp.running()
        .shared
        .hbone_stats
        .handshake_failures
        .load(Ordering::Relaxed)
}

#[tokio::test]
async fn mesh_client_with_valid_identity_is_served() {
    let (wp, _b) = one_service().await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("tunnel");
    let resp = http.get("reviews:9080", "/").await.expect("response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "reviews\n");
}

#[tokio::test]
async fn client_without_certificate_is_rejected_in_tls() {
    let (wp, _b) = one_service().await;
    let before = handshake_failures(&wp);
    let r = try_tunnel(wp.addr, raw_client_tls(None), "10.0.0.10:9080").await;
    assert!(
        r.is_err(),
        "a client without a certificate must not get a CONNECT answer: {r:?}"
    );
    let counted = eventually(std::time::Duration::from_secs(5), || async {
        (handshake_failures(&wp) > before).then_some(())
    })
    .await;
    assert!(
        counted.is_some(),
        "the server side must count the failed handshake"
    );
}

#[tokio::test]
async fn client_certificate_from_an_untrusted_ca_is_rejected() {
    let (wp, _b) = one_service().await;
    // Same SPIFFE ID as a real client, signed by a root the waypoint does not trust.
    let rogue = hbone::testing::Pki::new(TD).expect("rogue pki");
    let (chain, key) = rogue
        .issue_pem("spiffe://cluster.local/ns/default/sa/sleep")
        .expect("cert");
    let r = try_tunnel(
        wp.addr,
        raw_client_tls(Some((&chain, &key))),
        "10.0.0.10:9080",
    )
    .await;
    assert!(r.is_err(), "untrusted CA must fail the handshake: {r:?}");
}

#[tokio::test]
async fn client_identity_in_another_trust_domain_is_rejected() {
    let (wp, _b) = one_service().await;
    // Chained to the mesh root, but the SPIFFE ID is in another trust domain.
    let (chain, key) = wp
        .pki
        .issue_pem("spiffe://other.domain/ns/default/sa/sleep")
        .expect("cert");
    let r = try_tunnel(
        wp.addr,
        raw_client_tls(Some((&chain, &key))),
        "10.0.0.10:9080",
    )
    .await;
    assert!(
        r.is_err(),
        "foreign trust domain must fail the handshake: {r:?}"
    );
    // And a certificate without any SPIFFE URI SAN.
    let (chain, key) = wp
        .pki
        .issue_pem("https://example.com/not-spiffe")
        .expect("cert");
    let r = try_tunnel(
        wp.addr,
        raw_client_tls(Some((&chain, &key))),
        "10.0.0.10:9080",
    )
    .await;
    assert!(r.is_err(), "no SPIFFE SAN must fail the handshake: {r:?}");
}

#[tokio::test]
async fn client_offering_only_http11_alpn_is_refused() {
    let (wp, _b) = one_service().await;
    let certs = wp.client_certs("default", "sleep");
    let mut cfg = (*hbone::tls::client_config(
        &certs,
        hbone::tls::ExpectedServer::AnyOf(vec![wp.identity.clone()]),
    )
    .unwrap())
    .clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let r = try_tunnel(wp.addr, std::sync::Arc::new(cfg), "10.0.0.10:9080").await;
    assert!(r.is_err(), "HBONE is HTTP/2 only (ALPN h2): {r:?}");
}

#[tokio::test]
async fn non_connect_request_gets_404_nr() {
    let (wp, _b) = one_service().await;
    let conn = wp.connect_as("default", "sleep").await;
    let (status, body) = conn
        .send_plain(Method::GET, "https://10.0.0.10:9080/hello")
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.is_empty());
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["method"], "GET");
    assert_eq!(log["response_code"], 404);
    assert_eq!(log["response_flags"], "NR");
    assert_eq!(log["response_code_details"], "route_not_found");
}

/// Envoy 1.40 answers a CONNECT it has no filter chain for with 503 and this body, and logs
/// an NR line plus the failed CONNECT line (protocol.md 8).
async fn assert_refused_like_envoy(wp: &TestWaypoint, authority: &str) {
    let conn = wp.connect_as("default", "sleep").await;
    let mut resp = conn
        .send_connect(authority, http::HeaderMap::new())
        .await
        .expect("answer");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{authority}");
    let mut body = String::new();
    resp.stream.read_to_string(&mut body).await.expect("body");
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
    );
    let logs = wp.next_logs(2);
    assert_eq!(logs[0]["method"], serde_json::Value::Null);
    assert_eq!(logs[0]["response_flags"], "NR");
    assert_eq!(logs[0]["response_code_details"], "filter_chain_not_found");
    assert_eq!(logs[0]["downstream_local_address"], authority);
    assert_eq!(logs[1]["method"], "CONNECT");
    assert_eq!(logs[1]["response_code"], 503);
    assert_eq!(logs[1]["response_flags"], "UF");
    assert_eq!(logs[1]["upstream_cluster"], "main_internal");
    assert_eq!(logs[1]["authority"], authority);
    // The connection stays usable for other tunnels.
    let mut ok = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("other tunnel");
    assert_eq!(
        ok.get("reviews:9080", "/").await.expect("served").status,
        200
    );
}

#[tokio::test]
async fn connect_to_an_unknown_vip_is_refused_as_envoy_does() {
    let (wp, _b) = one_service().await;
    assert_refused_like_envoy(&wp, "10.0.0.99:9080").await;
}

#[tokio::test]
async fn connect_to_a_known_vip_on_an_undeclared_port_is_refused() {
    let (wp, _b) = one_service().await;
    assert_refused_like_envoy(&wp, "10.0.0.10:8080").await;
}

#[tokio::test]
async fn connect_with_a_hostname_authority_is_refused() {
    let (wp, _b) = one_service().await;
    assert_refused_like_envoy(&wp, "reviews.default.svc.cluster.local:9080").await;
}

#[tokio::test]
async fn connect_to_a_service_not_bound_to_this_waypoint_is_refused() {
    let backend = Backend::echo("other").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend.addr]);
    // Opted out of the namespace's waypoint.
    m.push("apiVersion: v1\nkind: Service\nmetadata:\n  name: optout\n  namespace: default\n  labels: {istio.io/use-waypoint: none}\nspec:\n  clusterIP: 10.0.0.20\n  ports: [{name: http, port: 80}]\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    assert_refused_like_envoy(&wp, "10.0.0.20:80").await;
}

#[tokio::test]
async fn many_tunnels_share_one_connection() {
    let (wp, _b) = one_service().await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
                .await
                .expect("tunnel");
            for _ in 0..5 {
                assert_eq!(
                    http.get("reviews:9080", "/").await.expect("resp").status,
                    200
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        wp.running()
            .shared
            .hbone_stats
            .connections_accepted
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(wp.next_logs(100).len(), 100);
}
