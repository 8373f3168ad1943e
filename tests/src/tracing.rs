//! Telemetry `tracing` through the waypoint, side by side with real Envoy 1.40 configured as
//! istiod configures a waypoint's HTTP connection manager (`tracing.go`): the same requests
//! through both, the spans collected by one test collector (OTLP/gRPC, OTLP/HTTP, Zipkin v2,
//! `waypoint_tests::collector`) and compared field by field, with the headers each proxy
//! sent upstream.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use waypoint_tests::collector::Collector;
use waypoint_tests::envoy::{Envoy, static_cluster};
use waypoint_tests::{Backend, Manifests, TestWaypoint, TunnelHttp};

const OTEL_CLUSTER: &str = "outbound|4317||otel.default.svc.cluster.local";
const ZIPKIN_CLUSTER: &str = "outbound|9411||zipkin.default.svc.cluster.local";

/// The HCM `tracing` block istiod renders for a provider (`configureFromProviderConfig`,
/// `configureSampling`, `configureCustomTags` with Istio's tags, sorted by name).
fn envoy_tracing(provider: &str, sampling: f64) -> String {
    let provider = match provider {
        "otel" => format!(
            r#"name: envoy.tracers.opentelemetry
typed_config:
  "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
  grpc_service:
    envoy_grpc: {{cluster_name: "{OTEL_CLUSTER}", authority: otel.default.svc.cluster.local}}
  service_name: waypoint.default"#
        ),
        _ => format!(
            r#"name: envoy.tracers.zipkin
typed_config:
  "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
  collector_endpoint_version: HTTP_JSON
  trace_id_128bit: true
  shared_span_context: false
  collector_service:
    http_uri: {{uri: "http://zipkin.default.svc.cluster.local/api/v2/spans", cluster: "{ZIPKIN_CLUSTER}", timeout: 5s}}"#
        ),
    };
    let mut tags: Vec<String> = [
        ("istio.canonical_revision", "latest"),
        ("istio.canonical_service", "waypoint"),
        ("istio.cluster_id", "Kubernetes"),
        ("istio.mesh_id", "cluster.local"),
        ("istio.namespace", "default"),
    ]
    .iter()
    .map(|(k, v)| format!("      - {{tag: {k}, literal: {{value: {v}}}}}"))
    .collect();
    for (tag, key) in [
        ("istio.source_workload", "workload"),
        ("istio.source_namespace", "namespace"),
    ] {
        tags.push(format!(
            "      - {{tag: {tag}, value: \"%FILTER_STATE(downstream_peer_obj:FIELD:{key})%\"}}"
        ));
    }
    tags.sort();
    format!(
        r#"tracing:
      client_sampling: {{value: 100}}
      random_sampling: {{value: {sampling}}}
      overall_sampling: {{value: 100}}
      custom_tags:
{tags}
      provider:
{provider}
"#,
        tags = tags.join("\n"),
        provider = provider
            .lines()
            .map(|l| format!("        {l}\n"))
            .collect::<String>()
    )
}

/// Envoy as the waypoint for `reviews` with tracing to `collector`.
async fn envoy(
    provider: &str,
    sampling: f64,
    backend: SocketAddr,
    collector: SocketAddr,
) -> (Envoy, SocketAddr) {
    let h2 = "  typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n      \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n      explicit_http_config: {http2_protocol_options: {}}\n";
    let clusters = static_cluster(
        "inbound-vip|9080|http|reviews.default.svc.cluster.local",
        backend,
    ) + &static_cluster(OTEL_CLUSTER, collector)
        + h2
        + &static_cluster(ZIPKIN_CLUSTER, collector)
        + &static_cluster(
            "inbound-vip|9080|http|down.default.svc.cluster.local",
            waypoint_tests::closed_port().await,
        );
    let retry = "retry_policy: {retry_on: \"connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes\", num_retries: 2}";
    // Istio's mesh default retry policy, as on every waypoint route.
    let routes = format!(
        "- name: down\n  match: {{prefix: /down}}\n  decorator: {{operation: \"reviews.default.svc.cluster.local:9080/*\"}}\n  route: {{cluster: \"inbound-vip|9080|http|down.default.svc.cluster.local\", {retry}}}\n- name: default\n  match: {{prefix: /}}\n  decorator: {{operation: \"reviews.default.svc.cluster.local:9080/*\"}}\n  route: {{cluster: \"inbound-vip|9080|http|reviews.default.svc.cluster.local\", {retry}}}\n"
    );
    let hcm = format!(
        "server_name: istio-envoy\nrequest_id_extension:\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig\n    use_request_id_for_trace_sampling: true\n{}",
        envoy_tracing(provider, sampling)
    );
    let config = waypoint_tests::envoy::http_bootstrap(&waypoint_tests::envoy::HttpListener {
        node: Some((
            "waypoint~127.0.0.1~waypoint.default~default.svc.cluster.local",
            "waypoint.default",
        )),
        stat_prefix: Some("inbound_0.0.0.0_9080"),
        virtual_host: Some("inbound|http|9080"),
        hcm: &hcm,
        routes: &routes,
        filters: "",
        clusters: &clusters,
        ..Default::default()
    });
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let addr = envoy.listener("plain").await.unwrap();
    (envoy, addr)
}

async fn envoy_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::response::Parts, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::builder()
        .uri(path)
        .header("host", "reviews:9080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = send
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = r.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    (parts, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

const MESH: &str = "extensionProviders:\n- name: otel\n  opentelemetry:\n    service: otel.default.svc.cluster.local\n    port: 4317\n- name: otel-http\n  opentelemetry:\n    service: otel.default.svc.cluster.local\n    port: 4317\n    http:\n      path: /v1/traces\n      timeout: 2s\n      headers: [{name: x-tenant, value: acme}]\n- name: zipkin\n  zipkin:\n    service: zipkin.default.svc.cluster.local\n    port: 9411\n";

/// Our waypoint for `reviews` (and `down`, whose endpoint refuses), tracing to `provider`
/// at `sampling` percent through a mesh-wide Telemetry.
async fn waypoint(
    provider: &str,
    sampling: f64,
    backend: SocketAddr,
    collector: SocketAddr,
) -> (TestWaypoint, tempfile::TempDir) {
    waypoint_with(provider, sampling, backend, collector, |_| {}).await
}

async fn waypoint_with(
    provider: &str,
    sampling: f64,
    backend: SocketAddr,
    collector: SocketAddr,
    tweak: impl FnOnce(&mut proxy::app::Config),
) -> (TestWaypoint, tempfile::TempDir) {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend])
        .service(
            "down",
            "10.0.0.11",
            9080,
            "http",
            &[waypoint_tests::closed_port().await],
        )
        .service("otel", "10.0.0.70", 4317, "grpc", &[collector])
        .service("zipkin", "10.0.0.71", 9411, "http", &[collector]);
    m.push(&format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\nspec:\n  tracing:\n  - providers: [{{name: {provider}}}]\n    randomSamplingPercentage: {sampling}\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    let wp = TestWaypoint::start_with(&m.yaml(), |c| {
        c.mesh_config = Some(mesh);
        tweak(c);
    })
    .await;
    (wp, dir)
}

/// A request through our waypoint to `vip`: (status, headers, upstream echo).
async fn ours(
    wp: &TestWaypoint,
    vip: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Value) {
    let conn = wp.connect_as("default", "sleep").await;
    let mut tunnel = TunnelHttp::open(&conn, vip).await.unwrap();
    let mut b = http::Request::builder()
        .uri(path)
        .header("host", "reviews:9080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = tunnel
        .send(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status.as_u16(), r.headers.clone(), body)
}

/// Attributes both proxies set alike: ids, sizes and who we are aside.
fn comparable(attrs: &[(String, String)]) -> Vec<(String, String)> {
    attrs
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "guid:x-request-id"
                    | "response_size"
                    | "node_id"
                    | "istio.source_workload"
                    | "istio.source_namespace"
            )
        })
        .cloned()
        .collect()
}

const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[tokio::test]
async fn otlp_spans_and_propagation_match_envoy() {
    let backend = Backend::echo("reviews").await;
    let collector = Collector::start().await;
    let (wp, _dir) = waypoint("otel", 100.0, backend.addr, collector.addr).await;
    let (envoy, envoy_addr) = envoy("otel", 100.0, backend.addr, collector.addr).await;

    // A new trace, then one continuing the caller's, then one the caller did not sample;
    // each through ours then Envoy, the spans compared in pairs.
    let cases: [&[(&str, &str)]; 3] = [
        &[("user-agent", "probe/1")],
        &[("traceparent", PARENT), ("tracestate", "vendor=1")],
        &[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        )],
    ];
    let mut seen = 0;
    for (i, headers) in cases.iter().enumerate() {
        let (status, resp, up) = ours(&wp, "10.0.0.10:9080", "/debug/headers?x=1", headers).await;
        let (envoy_resp, envoy_up) = envoy_get(envoy_addr, "/debug/headers?x=1", headers).await;
        assert_eq!((status, envoy_resp.status.as_u16()), (200, 200));
        assert_eq!(
            resp["x-envoy-decorator-operation"], "reviews.default.svc.cluster.local:9080/*",
            "the route's operation, as Envoy's ingress decorator"
        );
        assert_eq!(
            resp["x-envoy-decorator-operation"],
            envoy_resp.headers["x-envoy-decorator-operation"]
        );
        // Upstream: our span as the parent, the caller's trace and tracestate, the decision
        // packed into x-request-id.
        let (tp, envoy_tp) = (
            up["headers"]["traceparent"].as_str().unwrap(),
            envoy_up["headers"]["traceparent"].as_str().unwrap(),
        );
        assert_eq!(tp.len(), 55, "{tp}");
        assert_eq!(
            (&tp[..3], &tp[52..]),
            (&envoy_tp[..3], &envoy_tp[52..]),
            "version and flags: {tp} vs {envoy_tp}"
        );
        assert_eq!(
            up["headers"]["tracestate"],
            envoy_up["headers"]["tracestate"]
        );
        if i > 0 {
            assert_eq!(
                &tp[3..35],
                "0af7651916cd43dd8448eb211c80319c",
                "the caller's trace"
            );
        }
        let rid = up["headers"]["x-request-id"].as_str().unwrap();
        assert_eq!(
            &rid[14..15],
            "9",
            "sampled at 100%: Envoy's trace reason in {rid}"
        );
        assert_eq!(
            &envoy_up["headers"]["x-request-id"].as_str().unwrap()[14..15],
            "9"
        );
        if i < 2 {
            seen += 2;
            let spans = collector.wait_otlp(seen, Duration::from_secs(15)).await;
            assert_eq!(spans.len(), seen, "one span each");
            let (a, b) = (&spans[seen - 2], &spans[seen - 1]);
            let (a, b) = if a
                .resource
                .iter()
                .any(|(k, v)| k == "telemetry.sdk.name" && v == "waypoint")
            {
                (a, b)
            } else {
                (b, a)
            };
            assert_eq!(a.span.name, b.span.name);
            assert_eq!(a.span.name, "reviews.default.svc.cluster.local:9080/*");
            assert_eq!(
                (a.span.kind, a.span.flags, &a.span.status),
                (b.span.kind, b.span.flags, &b.span.status)
            );
            assert_eq!(a.span.trace_state, b.span.trace_state);
            assert_eq!(
                comparable(&a.attrs()),
                comparable(&b.attrs()),
                "ours (left), Envoy's (right)"
            );
            assert_eq!(a.attr("guid:x-request-id").as_deref(), Some(rid));
            assert_eq!(tp[36..52], a.span_id(), "upstream's parent is our span");
            let service = |s: &waypoint_tests::collector::OtlpSpan| {
                s.resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(service(a), service(b));
            if i == 1 {
                assert_eq!(a.parent_span_id(), "b7ad6b7169203331");
                assert_eq!(a.trace_id(), "0af7651916cd43dd8448eb211c80319c");
            } else {
                assert!(a.span.parent_span_id.is_empty());
            }
        }
    }
    // The unsampled caller: neither reported a span (bounded wait for stragglers).
    let late = collector.wait_otlp(seen + 1, Duration::from_secs(3)).await;
    assert_eq!(
        late.len(),
        seen,
        "a caller's unsampled decision is honoured"
    );

    // An upstream failure: error status and tag, flags, as Envoy.
    let (status, _, _) = ours(&wp, "10.0.0.11:9080", "/down", &[]).await;
    assert_eq!(status, 503);
    let spans = collector.wait_otlp(seen + 1, Duration::from_secs(15)).await;
    let s = spans.last().unwrap();
    assert_eq!(s.attr("error").as_deref(), Some("true"));
    // Istio's default retry policy retried the refused connection (the access log's flags).
    assert_eq!(s.attr("response_flags").as_deref(), Some("URX,UF"));
    assert_eq!(s.attr("http.status_code").as_deref(), Some("503"));
    assert_eq!(s.span.status.as_ref().map(|st| st.code), Some(2));
    assert_eq!(s.span.name, "down.default.svc.cluster.local:9080/*");

    // Counted once the collector has answered (bounded wait).
    let addr = wp.running().metrics_addr;
    let exported = waypoint_tests::eventually(Duration::from_secs(15), || async move {
        let m = waypoint_tests::http_get(addr, "/stats/prometheus")
            .await
            .ok()?
            .text();
        m.contains("waypoint_tracing_spans_total{provider=\"otel\",outcome=\"exported\"} 3")
            .then_some(())
    })
    .await;
    let m = waypoint_tests::http_get(addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    assert!(
        exported.is_some(),
        "three spans counted as exported: {:?}",
        m.lines()
            .filter(|l| l.contains("tracing"))
            .collect::<Vec<_>>()
    );
    // `waypoint explain` names the tracing that applies.
    let text = wp.explain_get("10.0.0.10:9080", "/");
    assert!(
        text.contains("tracing: Telemetry istio-system/mesh-default: otel (OTLP/gRPC to otel.default.svc.cluster.local:4317), 100% sampled"),
        "{text}"
    );
    drop(envoy);
}

#[tokio::test]
async fn zipkin_spans_and_b3_match_envoy() {
    let backend = Backend::echo("reviews").await;
    let collector = Collector::start().await;
    let (wp, _dir) = waypoint("zipkin", 100.0, backend.addr, collector.addr).await;
    let (_envoy, envoy_addr) = envoy("zipkin", 100.0, backend.addr, collector.addr).await;
    let cases: [&[(&str, &str)]; 2] = [
        &[("user-agent", "probe/1")],
        &[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
            ("traceparent", PARENT),
        ],
    ];
    for (i, headers) in cases.iter().enumerate() {
        let (_, _, up) = ours(&wp, "10.0.0.10:9080", "/debug/headers", headers).await;
        let (_, envoy_up) = envoy_get(envoy_addr, "/debug/headers", headers).await;
        let keys = |v: &Value| {
            let mut k: Vec<String> = v["headers"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with("x-b3") || *k == "traceparent")
                .cloned()
                .collect();
            k.sort();
            k
        };
        assert_eq!(keys(&up), keys(&envoy_up), "B3 headers upstream");
        assert_eq!(up["headers"]["x-b3-sampled"], "1");
        assert_eq!(
            up["headers"]["traceparent"], envoy_up["headers"]["traceparent"],
            "USE_B3: traceparent passed on untouched"
        );
        let spans = collector
            .wait_zipkin(2 * (i + 1), Duration::from_secs(15))
            .await;
        assert_eq!(spans.len(), 2 * (i + 1));
        let ours_span = spans
            .iter()
            .find(|s| s["id"] == up["headers"]["x-b3-spanid"])
            .expect("our span")
            .clone();
        let envoy_span = spans
            .iter()
            .find(|s| s["id"] == envoy_up["headers"]["x-b3-spanid"])
            .expect("Envoy's span")
            .clone();
        for field in ["kind", "name", "localEndpoint"] {
            let strip = |v: &Value| {
                let mut v = v[field].clone();
                if let Some(o) = v.as_object_mut() {
                    o.remove("ipv4");
                }
                v
            };
            assert_eq!(strip(&ours_span), strip(&envoy_span), "{field}");
        }
        let tags = |s: &Value| -> Vec<(String, String)> {
            s["tags"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        };
        assert_eq!(
            comparable(&tags(&ours_span)),
            comparable(&tags(&envoy_span)),
            "ours (left), Envoy's (right)"
        );
        assert_eq!(ours_span["annotations"][0]["value"], "ss");
        let trace = ours_span["traceId"].as_str().unwrap();
        if i == 0 {
            assert_eq!(trace.len(), 32, "128-bit trace ids (istiod's default)");
            assert_eq!(
                &trace[16..],
                ours_span["id"].as_str().unwrap(),
                "a root span's id is the trace's low half"
            );
            assert!(ours_span.get("parentId").is_none());
        } else {
            assert_eq!(trace, "80f198ee56343ba864fe8b2a57d3eff7");
            assert_eq!(ours_span["parentId"], "e457b5a2e4d86bd1");
            assert_eq!(up["headers"]["x-b3-parentspanid"], "e457b5a2e4d86bd1");
        }
    }
    let exports = collector.http_requests();
    assert!(
        exports.iter().any(|(p, ct, h)| p == "/api/v2/spans"
            && ct == "application/json"
            && h.iter()
                .any(|(k, v)| k == "host" && v == "zipkin.default.svc.cluster.local")),
        "{exports:?}"
    );
}

#[tokio::test]
async fn sampling_otlp_http_and_a_failing_collector() {
    let backend = Backend::echo("reviews").await;
    let collector = Collector::start().await;
    // 0%: only a caller's decision (a sampled traceparent) or one packed into the request id
    // is traced.
    let (wp, _dir) = waypoint("otel-http", 0.0, backend.addr, collector.addr).await;
    let (_, _, up) = ours(&wp, "10.0.0.10:9080", "/debug/headers?a", &[]).await;
    let rid = up["headers"]["x-request-id"].as_str().unwrap();
    assert_eq!(
        &rid[14..15],
        "4",
        "not sampled: the id is left as generated ({rid})"
    );
    assert!(
        up["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.ends_with("-00")),
        "{up}"
    );
    ours(
        &wp,
        "10.0.0.10:9080",
        "/debug/headers?b",
        &[("x-request-id", "4f1c8d2e-0000-9000-8000-000000000001")],
    )
    .await;
    ours(
        &wp,
        "10.0.0.10:9080",
        "/debug/headers?c",
        &[("traceparent", PARENT)],
    )
    .await;
    let spans = collector.wait_otlp(2, Duration::from_secs(15)).await;
    let mut urls: Vec<String> = spans.iter().filter_map(|s| s.attr("http.url")).collect();
    urls.sort();
    assert_eq!(
        urls,
        [
            "http://reviews:9080/debug/headers?b",
            "http://reviews:9080/debug/headers?c"
        ]
    );
    let exports = collector.http_requests();
    assert!(
        exports.iter().all(|(p, ct, h)| p == "/v1/traces"
            && ct == "application/x-protobuf"
            && h.iter().any(|(k, v)| k == "x-tenant" && v == "acme")),
        "{exports:?}"
    );

    // The collector fails: requests are served as before; the spans are counted as failed.
    collector.fail(true);
    for _ in 0..3 {
        let (status, _, _) = ours(
            &wp,
            "10.0.0.10:9080",
            "/debug/headers?d",
            &[("traceparent", PARENT)],
        )
        .await;
        assert_eq!(status, 200);
    }
    let addr = wp.running().metrics_addr;
    let failed = waypoint_tests::eventually(Duration::from_secs(15), || async move {
        let m = waypoint_tests::http_get(addr, "/stats/prometheus")
            .await
            .ok()?
            .text();
        m.contains("waypoint_tracing_spans_total{provider=\"otel-http\",outcome=\"failed\"} 3")
            .then_some(())
    })
    .await;
    assert!(failed.is_some(), "three spans counted as failed");
}

/// A gRPC call (h2c, `application/grpc`) on `sender`; the response's gRPC status.
async fn grpc_call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: &str,
    path: &str,
) -> Option<String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "5S")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    status
}

async fn h2c_sender<S>(io: S) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(driver);
    sender
}

/// gRPC: Envoy's request tags (`grpc.path`, `grpc.authority`, `grpc.content_type`,
/// `grpc.timeout`) and response tags (`grpc.status_code`; `error` for UNAVAILABLE) on a
/// call whose upstream is down (a gRPC local reply: HTTP 200, grpc-status 14).
#[tokio::test]
async fn grpc_span_tags_match_envoy() {
    let backend = Backend::echo("reviews").await;
    let collector = Collector::start().await;
    let (wp, _dir) = waypoint("otel", 100.0, backend.addr, collector.addr).await;
    let (_envoy, envoy_addr) = envoy("otel", 100.0, backend.addr, collector.addr).await;
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open("10.0.0.11:9080", http::HeaderMap::new())
        .await
        .unwrap();
    let mut ours = h2c_sender(stream).await;
    let mut theirs = h2c_sender(tokio::net::TcpStream::connect(envoy_addr).await.unwrap()).await;
    assert_eq!(
        grpc_call(&mut ours, "down:9080", "/down").await.as_deref(),
        Some("14")
    );
    assert_eq!(
        grpc_call(&mut theirs, "down:9080", "/down")
            .await
            .as_deref(),
        Some("14")
    );
    let spans = collector.wait_otlp(2, Duration::from_secs(15)).await;
    assert_eq!(spans.len(), 2);
    let (a, b) = if spans[0]
        .resource
        .iter()
        .any(|(k, v)| k == "telemetry.sdk.name" && v == "waypoint")
    {
        (&spans[0], &spans[1])
    } else {
        (&spans[1], &spans[0])
    };
    let grpc = |s: &waypoint_tests::collector::OtlpSpan| -> Vec<(String, String)> {
        s.attrs()
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("grpc.")
                    || k == "error"
                    || k == "http.status_code"
                    || k == "http.protocol"
            })
            .collect()
    };
    assert_eq!(grpc(a), grpc(b), "ours (left), Envoy's (right)");
    assert_eq!(a.attr("grpc.status_code").as_deref(), Some("14"));
    assert_eq!(a.attr("grpc.path").as_deref(), Some("/down"));
    assert_eq!(a.attr("error").as_deref(), Some("true"));
}

/// A collector that accepts and never answers: the export in flight waits for its timeout,
/// the bounded queue fills, further spans are dropped and counted; requests are served
/// all along.
#[tokio::test]
async fn a_hanging_collector_drops_spans_never_requests() {
    let backend = Backend::echo("reviews").await;
    let collector = Collector::start().await;
    collector.hang();
    let (wp, _dir) = waypoint_with("otel", 100.0, backend.addr, collector.addr, |c| {
        c.limits.max_queued_spans = 4;
    })
    .await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut tunnel = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    let addr = wp.running().metrics_addr;
    let mut dropped = false;
    // Bounded: one batch (at most 512 spans) hangs in flight, the queue holds 4; the 517th
    // span at the latest finds it full, however fast the requests come.
    for _ in 0..1000 {
        let r = tunnel
            .send(
                http::Request::builder()
                    .uri("/debug/headers")
                    .header("host", "reviews:9080")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 200);
        let m = waypoint_tests::http_get(addr, "/stats/prometheus")
            .await
            .unwrap()
            .text();
        if !m.contains("waypoint_tracing_spans_total{provider=\"otel\",outcome=\"dropped\"} 0") {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "spans beyond the queue are dropped and counted");
}

/// A provider whose `service` is no Service of the configuration is reached as istiod's
/// Envoy would not be able to, but as users expect: through DNS (here a real DNS server,
/// the waypoint's `--dns-server`), with the hostname as `Host`.
#[tokio::test]
async fn a_collector_outside_the_configuration_is_found_through_dns() {
    let backend = Backend::echo("reviews").await;
    let collector = Collector::start().await;
    let dns = waypoint_tests::dns::DnsServer::start(&[waypoint_tests::dns::Record {
        name: "collector.example.test",
        ip: "127.0.0.1",
        ttl: 30,
    }])
    .unwrap();
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend.addr]);
    m.push("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - randomSamplingPercentage: 100\n");
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "defaultProviders: {{tracing: [external]}}\nextensionProviders:\n- name: external\n  zipkin: {{service: collector.example.test, port: {}}}\n",
            collector.addr.port()
        ),
    )
    .unwrap();
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| {
        c.mesh_config = Some(mesh);
        c.dns.servers = servers;
    })
    .await;
    let (status, _, up) = ours(&wp, "10.0.0.10:9080", "/debug/headers", &[]).await;
    assert_eq!(status, 200);
    let spans = collector.wait_zipkin(1, Duration::from_secs(15)).await;
    assert_eq!(
        spans.len(),
        1,
        "the span reached the collector found by DNS"
    );
    assert_eq!(spans[0]["id"], up["headers"]["x-b3-spanid"]);
    assert!(dns.queries("collector.example.test") >= 1);
    assert!(collector.http_requests().iter().any(|(_, _, h)| {
        h.iter()
            .any(|(k, v)| k == "host" && v == "collector.example.test")
    }));
}
