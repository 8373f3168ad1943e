//! Routing through real HBONE: the Service comes from the CONNECT authority, HTTPRoutes pick
//! rules with Gateway API precedence, weighted backendRefs split traffic.

use std::collections::HashMap;

use waypoint_tests::*;

#[tokio::test]
async fn weighted_split_over_1000_requests_stays_within_tolerance() {
    let v1 = Backend::echo("reviews-v1").await;
    let v2 = Backend::echo("reviews-v2").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[v1.addr])
        .service("reviews-v1", "10.0.0.12", 9080, "http", &[v1.addr])
        .service("reviews-v2", "10.0.0.13", 9080, "http", &[v2.addr])
        .route(
            "reviews",
            "reviews",
            9080,
            "  - name: reviews-split\n    backendRefs:\n    - {name: reviews-v1, port: 9080, weight: 90}\n    - {name: reviews-v2, port: 9080, weight: 10}\n",
        );
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
                .await
                .expect("tunnel");
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..100 {
                let r = http
                    .get("reviews:9080", "/reviews/0")
                    .await
                    .expect("response");
                assert_eq!(r.status, 200);
                *seen
                    .entry(r.header("x-backend").unwrap_or("?").to_string())
                    .or_default() += 1;
            }
            seen
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.expect("task") {
            *total.entry(k).or_default() += v;
        }
    }
    let v2n = total.get("reviews-v2").copied().unwrap_or(0);
    let v1n = total.get("reviews-v1").copied().unwrap_or(0);
    assert_eq!(v1n + v2n, 1000, "{total:?}");
    // Binomial(1000, 0.1): mean 100, sd 9.5; [55, 145] is a ±4.7 sd band (false failure < 1e-5).
    assert!(
        (55..=145).contains(&v2n),
        "reviews-v2 got {v2n} of 1000 (want ~100): {total:?}"
    );
    let logs = wp.next_logs(1000);
    let mut clusters: HashMap<String, usize> = HashMap::new();
    for l in &logs {
        assert_eq!(l["route_name"], "reviews-split");
        *clusters
            .entry(l["upstream_cluster"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    assert_eq!(
        clusters.get("inbound-vip|9080|http|reviews-v2.default.svc.cluster.local"),
        Some(&v2n)
    );
    assert_eq!(
        clusters.get("inbound-vip|9080|http|reviews-v1.default.svc.cluster.local"),
        Some(&v1n)
    );
}

async fn api_routes() -> (TestWaypoint, Backend, Backend) {
    let a = Backend::echo("api").await;
    let b = Backend::echo("admin").await;
    let mut m = Manifests::new();
    m.service("web", "10.0.0.30", 80, "http", &[a.addr])
        .service("api", "10.0.0.31", 80, "http", &[a.addr])
        .service("admin", "10.0.0.32", 80, "http", &[b.addr])
        .route(
            "web",
            "web",
            80,
            "  - matches:\n    - path: {type: PathPrefix, value: /api}\n    backendRefs: [{name: api, port: 80}]\n  - matches:\n    - path: {type: Exact, value: /api/admin}\n    - headers: [{name: x-role, value: admin}]\n      path: {type: PathPrefix, value: /api}\n    backendRefs: [{name: admin, port: 80}]\n",
        );
    (TestWaypoint::start(&m.yaml()).await, a, b)
}

#[tokio::test]
async fn request_matching_no_rule_gets_404_nr() {
    let (wp, _a, _b) = api_routes().await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.30:80")
        .await
        .expect("tunnel");
    let r = http.get("web", "/other").await.expect("response");
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert_eq!(r.header("server"), Some("istio-envoy"));
    // PathPrefix is element-wise: /apiary is not under /api.
    assert_eq!(
        http.get("web", "/apiary").await.expect("response").status,
        404
    );
    let logs = wp.next_logs(2);
    assert_eq!(logs[0]["response_code"], 404);
    assert_eq!(logs[0]["response_flags"], "NR");
    assert_eq!(logs[0]["response_code_details"], "route_not_found");
    assert_eq!(logs[0]["upstream_cluster"], serde_json::Value::Null);
    assert_eq!(logs[0]["route_name"], serde_json::Value::Null);
}

#[tokio::test]
async fn exact_path_and_header_matches_outrank_a_plain_prefix() {
    let (wp, _a, _b) = api_routes().await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.30:80")
        .await
        .expect("tunnel");
    assert_eq!(http.get("web", "/api/users").await.unwrap().text(), "api\n");
    assert_eq!(
        http.get("web", "/api/admin").await.unwrap().text(),
        "admin\n"
    );
    let req = http::Request::builder()
        .uri("/api/x")
        .header("host", "web")
        .header("x-role", "admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(http.send(req).await.unwrap().text(), "admin\n");
    let logs = wp.next_logs(3);
    assert_eq!(logs[0]["route_name"], "default.web.0");
    assert_eq!(logs[1]["route_name"], "default.web.1");
}

#[tokio::test]
async fn the_vip_not_the_host_header_selects_the_service() {
    let (wp, _a, _b) = api_routes().await;
    let conn = wp.connect_as("default", "sleep").await;
    // Dial the admin VIP with Host naming web: the admin Service (no routes) answers.
    let mut http = TunnelHttp::open(&conn, "10.0.0.32:80")
        .await
        .expect("tunnel");
    let r = http.get("web", "/other").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "admin\n"));
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["route_name"], "default");
    assert_eq!(
        log["upstream_cluster"],
        "inbound-vip|80|http|admin.default.svc.cluster.local"
    );
    assert_eq!(log["downstream_local_address"], "10.0.0.32:80");
}

#[tokio::test]
async fn zero_weights_and_missing_backends_answer_500() {
    let a = Backend::echo("a").await;
    let mut m = Manifests::new();
    m.service("web", "10.0.0.30", 80, "http", &[a.addr]).route(
        "web",
        "web",
        80,
        "  - matches: [{path: {type: PathPrefix, value: /zero}}]\n    backendRefs: [{name: web, port: 80, weight: 0}]\n  - matches: [{path: {type: PathPrefix, value: /missing}}]\n    backendRefs: [{name: nosuch, port: 80}]\n",
    );
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.30:80")
        .await
        .expect("tunnel");
    assert_eq!(http.get("web", "/zero").await.unwrap().status, 500);
    assert_eq!(http.get("web", "/missing").await.unwrap().status, 500);
    let logs = wp.next_logs(2);
    assert_eq!(logs[0]["response_code"], 500);
    assert_eq!(logs[1]["response_code"], 500);
    assert_eq!(logs[1]["response_flags"], "NC");
    assert_eq!(logs[1]["response_code_details"], "cluster_not_found");
}

/// AuthorizationPolicy through real HBONE, with three identities: same namespace, another
/// namespace, and a client certificate from an untrusted CA (rejected before any policy).
#[tokio::test]
async fn authorization_policy_uses_the_tunnel_identity() {
    let b = Backend::echo("reviews").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[b.addr]);
    m.push(include_str!("../../examples/envoy-reference/authz.yaml"));
    let wp = TestWaypoint::start(&m.yaml()).await;

    let sleep = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&sleep, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
    let post = http
        .send(
            http::Request::builder()
                .method("POST")
                .uri("/")
                .header("host", "reviews:9080")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x=1")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(post.status, 403);
    assert_eq!(post.text(), "RBAC: access denied");

    // Same namespace, other service account: allowed by `namespaces: [default]`.
    let other_sa = wp.connect_as("default", "productpage").await;
    let mut http2 = TunnelHttp::open(&other_sa, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http2.get("reviews:9080", "/").await.unwrap().status, 200);

    // Another namespace: denied; identity comes from the certificate, not from headers.
    let attacker = wp.connect_as("other", "attacker").await;
    let mut http3 = TunnelHttp::open(&attacker, "10.0.0.10:9080").await.unwrap();
    let r = http3
        .send(
            http::Request::builder()
                .uri("/")
                .header("host", "reviews:9080")
                .header(
                    "x-forwarded-client-cert",
                    "URI=spiffe://cluster.local/ns/default/sa/sleep",
                )
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);

    let logs = wp.next_logs(4);
    assert_eq!(logs[1]["response_code"], 403);
    assert_eq!(logs[1]["response_flags"], "-");
    assert_eq!(
        logs[1]["response_code_details"],
        "rbac_access_denied_matched_policy[none]"
    );
    assert_eq!(logs[1]["bytes_sent"], 19);
    assert_eq!(
        logs[1]["upstream_cluster"],
        "inbound-vip|9080|http|reviews.default.svc.cluster.local"
    );
    assert_eq!(logs[1]["upstream_host"], serde_json::Value::Null);
    assert_eq!(logs[3]["response_code"], 403);
}
