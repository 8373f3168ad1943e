//! Telemetry `accessLogging` on the waypoint: logging disabled (no lines, metrics still
//! count), CEL filters on the response code and request headers, Service-targeted Telemetry
//! overriding the waypoint-wide one, and a reload that adds a Telemetry to open tunnels.

use std::time::Duration;

use waypoint_tests::*;

fn telemetry(name: &str, target: &str, access_logging: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRefs: [{target}]\n  accessLogging: {access_logging}\n"
    )
}

const GATEWAY: &str = "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}";

fn mesh(backend: std::net::SocketAddr, extra: &[String]) -> String {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend]);
    m.service("ratings", "10.0.0.11", 9080, "http", &[backend]);
    m.route(
        "reviews",
        "reviews",
        9080,
        "  - matches: [{path: {type: PathPrefix, value: /ok}}]\n    backendRefs: [{name: reviews, port: 9080}]\n",
    );
    for doc in extra {
        m.push(doc);
    }
    m.yaml()
}

/// Sum of `istio_requests_total` over every label set.
async fn requests_total(wp: &TestWaypoint) -> u64 {
    let series = wp.metric_series("istio_requests_total").await;
    series.iter().map(|(_, v)| v).sum()
}

async fn get_with(http: &mut TunnelHttp, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = http::Request::builder()
        .uri(path)
        .header("host", "reviews:9080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    http.send(req).await.unwrap().status.as_u16()
}

#[tokio::test]
async fn disabled_access_logging_writes_no_lines_while_metrics_still_count() {
    let b = Backend::echo("reviews").await;
    let t = telemetry("quiet", GATEWAY, "[{disabled: true}]");
    let wp = TestWaypoint::start(&mesh(b.addr, &[t])).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(get_with(&mut http, "/ok", &[]).await, 200);
    assert_eq!(get_with(&mut http, "/missing", &[]).await, 404);
    let lines = wp.drain_logs(Duration::from_millis(500));
    assert!(lines.is_empty(), "no access-log lines: {lines:?}");
    let counted = eventually(Duration::from_secs(5), || async {
        (requests_total(&wp).await == 2).then_some(())
    })
    .await;
    assert!(counted.is_some(), "both requests are still counted");
}

#[tokio::test]
async fn a_response_code_filter_logs_only_errors_and_a_header_filter_only_marked_requests() {
    let b = Backend::echo("reviews").await;
    let errors = telemetry(
        "errors",
        GATEWAY,
        "[{providers: [{name: envoy}], filter: {expression: \"response.code >= 400\"}}]",
    );
    // Service-targeted Telemetry overrides the waypoint-wide one for ratings.
    let debug = telemetry(
        "debug",
        "{group: \"\", kind: Service, name: ratings}",
        "[{filter: {expression: \"request.headers['x-debug'] == 'true'\"}}]",
    );
    let wp = TestWaypoint::start(&mesh(b.addr, &[errors, debug])).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut reviews = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(get_with(&mut reviews, "/ok/1", &[]).await, 200);
    assert_eq!(get_with(&mut reviews, "/missing", &[]).await, 404);
    assert_eq!(get_with(&mut reviews, "/ok/2", &[]).await, 200);
    let lines = wp.next_logs(1);
    assert_eq!(lines[0]["response_code"], 404, "{lines:?}");
    assert_eq!(lines[0]["response_flags"], "NR");
    assert!(wp.drain_logs(Duration::from_millis(400)).is_empty());

    let mut ratings = TunnelHttp::open(&conn, "10.0.0.11:9080").await.unwrap();
    assert_eq!(get_with(&mut ratings, "/a", &[]).await, 200);
    assert_eq!(
        get_with(&mut ratings, "/b", &[("x-debug", "true")]).await,
        200
    );
    assert_eq!(
        get_with(&mut ratings, "/c", &[("x-debug", "no")]).await,
        200
    );
    let lines = wp.next_logs(1);
    assert_eq!(lines[0]["path"], "/b", "{lines:?}");
    assert!(wp.drain_logs(Duration::from_millis(400)).is_empty());
    let counted = eventually(Duration::from_secs(5), || async {
        (requests_total(&wp).await == 6).then_some(())
    })
    .await;
    assert!(counted.is_some(), "metrics count every request");
}

#[tokio::test]
async fn a_telemetry_added_by_reload_applies_to_tunnels_already_open() {
    let b = Backend::echo("reviews").await;
    let wp = TestWaypoint::start(&mesh(b.addr, &[])).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(get_with(&mut http, "/ok", &[]).await, 200);
    assert_eq!(wp.next_logs(1)[0]["response_code"], 200);

    let t = telemetry("quiet", GATEWAY, "[{disabled: true}]");
    std::fs::write(wp.dir.path().join("config.yaml"), mesh(b.addr, &[t])).unwrap();
    let reloaded = eventually(Duration::from_secs(10), || async {
        let snap = wp.running().shared.snapshot.load_full();
        (!snap.telemetries().is_empty()).then_some(())
    })
    .await;
    assert!(reloaded.is_some(), "the Telemetry is loaded");
    assert_eq!(get_with(&mut http, "/ok", &[]).await, 200);
    let lines = wp.drain_logs(Duration::from_millis(500));
    assert!(lines.is_empty(), "{lines:?}");
}

#[tokio::test]
async fn metrics_overrides_remove_replace_add_and_drop_tags_per_service() {
    let b = Backend::echo("reviews").await;
    // Waypoint-wide: requests_total loses response_code and source_principal (series that
    // differ only there merge), request_protocol becomes the method, a new tag comes from a
    // request header; the duration histogram is off.
    let waypoint = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: shaped, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  metrics:\n  - providers: [{name: prometheus}]\n    overrides:\n    - match: {metric: REQUEST_COUNT, mode: SERVER}\n      tagOverrides:\n        response_code: {operation: REMOVE}\n        source_principal: {operation: REMOVE}\n        request_protocol: {value: request.method}\n        user_tier: {value: \"request.headers['x-tier']\"}\n    - match: {metric: REQUEST_DURATION}\n      disabled: true\n    - match: {metric: REQUEST_SIZE, mode: CLIENT}\n      disabled: true\n".to_string();
    // Service-targeted: every metric of ratings off (Istio's documented way to turn them off).
    let ratings = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: ratings-off, namespace: default}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: ratings}]\n  metrics:\n  - overrides:\n    - match: {metric: ALL_METRICS, mode: CLIENT_AND_SERVER}\n      disabled: true\n".to_string();
    let wp = TestWaypoint::start(&mesh(b.addr, &[waypoint, ratings])).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut reviews = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(
        get_with(&mut reviews, "/ok", &[("x-tier", "gold")]).await,
        200
    );
    assert_eq!(get_with(&mut reviews, "/ok", &[]).await, 200);
    let other = wp.connect_as("default", "productpage").await;
    let mut from_other = TunnelHttp::open(&other, "10.0.0.10:9080").await.unwrap();
    assert_eq!(
        get_with(&mut from_other, "/ok", &[("x-tier", "gold")]).await,
        200
    );
    let mut ratings = TunnelHttp::open(&conn, "10.0.0.11:9080").await.unwrap();
    assert_eq!(get_with(&mut ratings, "/a", &[]).await, 200);
    assert_eq!(wp.next_logs(4).len(), 4, "every request is still logged");

    let counted = eventually(Duration::from_secs(5), || async {
        let s = wp.metric_series("istio_requests_total").await;
        (s.iter().map(|(_, v)| v).sum::<u64>() == 3).then_some(s)
    })
    .await
    .expect("reviews' 3 requests counted, ratings' none");
    assert_eq!(counted.len(), 2, "{counted:?}");
    for (labels, value) in &counted {
        assert!(!labels.contains("response_code="), "{labels}");
        assert!(!labels.contains("source_principal="), "{labels}");
        assert!(labels.contains("request_protocol=\"GET\""), "{labels}");
        assert!(
            labels.contains("destination_service_name=\"reviews\""),
            "{labels}"
        );
        // New tags come after Istio's.
        let expected = if *value == 2 {
            ",user_tier=\"gold\""
        } else {
            ",user_tier=\"unknown\""
        };
        assert!(labels.ends_with(expected), "{labels} = {value}");
    }
    assert!(
        wp.metric_series("istio_request_duration_milliseconds_count")
            .await
            .is_empty(),
        "REQUEST_DURATION is dropped"
    );
    // `waypoint explain` says what Telemetry does to the metrics.
    let text = wp.explain_get("10.0.0.10:9080", "/ok");
    assert!(
        text.contains("metrics: Telemetry default/shaped: istio_requests_total [request_protocol=request.method, -response_code, -source_principal, user_tier=request.headers['x-tier']]; istio_request_duration_milliseconds off"),
        "{text}"
    );
    // CLIENT-mode overrides do not apply to a waypoint; other metrics keep Istio's tags.
    let sizes = wp.metric_series("istio_request_bytes_count").await;
    assert_eq!(sizes.len(), 2, "one per source principal: {sizes:?}");
    assert!(
        sizes
            .iter()
            .all(|(l, _)| l.contains("request_protocol=\"http\"")
                && l.contains("response_code=\"200\"")
                && !l.contains("ratings"))
    );
}
