//! The upstream leg and what the client sees: Envoy's local replies (UH, UF), retries on
//! connect failure, forwarded headers, access-log fields, limits, h2c, TCP and sniffing.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_tests::*;

fn req(method: &str, path: &str, host: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
}

#[tokio::test]
async fn service_without_ready_endpoints_gets_503_uh() {
    let mut m = Manifests::new();
    m.service("empty", "10.0.0.40", 80, "http", &[]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.40:80")
        .await
        .expect("tunnel");
    let r = http.get("empty", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "no healthy upstream");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "UH");
    assert_eq!(log["response_code_details"], "no_healthy_upstream");
    assert_eq!(
        log["upstream_cluster"],
        "inbound-vip|80|http|empty.default.svc.cluster.local"
    );
    assert_eq!(log["bytes_sent"], 19);
}

#[tokio::test]
async fn refused_upstream_gets_503_uf_after_istios_default_retries() {
    let dead = closed_port().await;
    let mut m = Manifests::new();
    m.service("dead", "10.0.0.41", 80, "http", &[dead]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.41:80")
        .await
        .expect("tunnel");
    let r = http.get("dead", "/").await.unwrap();
    assert_eq!(r.status, 503);
    // Envoy 1.40 (envoy-observed.md case 2a): no transport detail in the body, URX first.
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: \
         remote connection failure"
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "URX,UF");
    assert_eq!(
        log["response_code_details"],
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
    );
    assert_eq!(
        log["upstream_transport_failure_reason"],
        "delayed_connect_error:_Connection_refused"
    );
    assert_eq!(log["upstream_host"], dead.to_string());
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    let dead = closed_port().await;
    let live = Backend::echo("live").await;
    // Same target port for both endpoints: the live backend's; the dead one on another IP.
    let dead_same_port: std::net::SocketAddr =
        format!("127.0.0.2:{}", live.addr.port()).parse().unwrap();
    let _ = dead;
    let mut m = Manifests::new();
    m.service(
        "mixed",
        "10.0.0.42",
        80,
        "http",
        &[dead_same_port, live.addr],
    );
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.42:80")
        .await
        .expect("tunnel");
    for _ in 0..20 {
        let r = http.get("mixed", "/").await.unwrap();
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "live\n"));
    }
    for l in wp.next_logs(20) {
        assert_eq!(l["response_flags"], "-");
        assert_eq!(l["upstream_host"], live.addr.to_string());
    }
}

#[tokio::test]
async fn headers_and_access_log_match_envoys_waypoint() {
    let b = Backend::echo("reviews").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("tunnel");
    let r = http
        .send(
            req("GET", "/debug/headers?x=1", "reviews:9080")
                .header("user-agent", "waypoint-test/1")
                .header("x-forwarded-for", "1.2.3.4")
                .header("x-forwarded-client-cert", "By=spoofed")
                .header("x-request-id", "keep-me-1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("server"), Some("istio-envoy"));
    let ust: u64 = r
        .header("x-envoy-upstream-service-time")
        .expect("service time")
        .parse()
        .expect("ms");
    let seen: Value = serde_json::from_slice(&r.body).expect("echo json");
    let h = &seen["headers"];
    assert_eq!(
        h["x-request-id"], "keep-me-1",
        "an incoming x-request-id is kept"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["x-forwarded-for"], "1.2.3.4",
        "XFF neither appended to nor stripped"
    );
    assert_eq!(
        h["x-forwarded-client-cert"],
        Value::Null,
        "XFCC is sanitized"
    );
    assert_eq!(h["host"], "reviews:9080");

    // Without x-request-id, one is generated (UUID) and forwarded.
    let r2 = http.get("reviews:9080", "/debug/headers").await.unwrap();
    let seen2: Value = serde_json::from_slice(&r2.body).unwrap();
    let rid = seen2["headers"]["x-request-id"]
        .as_str()
        .expect("generated id")
        .to_string();
    assert_eq!(rid.len(), 36);

    let logs = wp.next_logs(2);
    let l = logs[0].as_object().expect("object");
    assert_eq!(l.len(), 24, "exactly Istio's 24 keys: {l:?}");
    let expect = serde_json::json!({
        "route_name": "default",
        "method": "GET",
        "path": "/debug/headers?x=1",
        "protocol": "HTTP/1.1",
        "response_code": 200,
        "response_flags": "-",
        "response_code_details": "via_upstream",
        "connection_termination_details": null,
        "upstream_transport_failure_reason": null,
        "bytes_received": 0,
        "bytes_sent": r.body.len(),
        "upstream_service_time": ust.to_string(),
        "x_forwarded_for": "1.2.3.4",
        "user_agent": "waypoint-test/1",
        "request_id": "keep-me-1",
        "authority": "reviews:9080",
        "upstream_host": b.addr.to_string(),
        "upstream_cluster": "inbound-vip|9080|http|reviews.default.svc.cluster.local",
        "downstream_local_address": "10.0.0.10:9080",
        "requested_server_name": null,
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&l[k], v, "key {k}");
    }
    let st = l["start_time"].as_str().expect("start_time");
    assert!(
        st.len() == 24 && st.ends_with('Z') && st.as_bytes()[10] == b'T',
        "RFC 3339 millis: {st}"
    );
    assert!(l["duration"].is_u64());
    let ula: std::net::SocketAddr = l["upstream_local_address"]
        .as_str()
        .unwrap()
        .parse()
        .expect("ip:port");
    assert!(ula.ip().is_loopback());
    // With x-forwarded-for present, Envoy (use_remote_address: false) logs its rightmost
    // entry with port 0 (envoy-observed.md case 1); without it, the HBONE peer address.
    assert_eq!(l["downstream_remote_address"], "1.2.3.4:0");
    let dra: std::net::SocketAddr = logs[1]["downstream_remote_address"]
        .as_str()
        .unwrap()
        .parse()
        .expect("ip:port");
    assert!(dra.ip().is_loopback());
    assert_eq!(logs[1]["request_id"], rid.as_str());
}

#[tokio::test]
async fn request_body_is_streamed_and_counted() {
    let b = Backend::echo("echo").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.43", 80, "http", &[b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.43:80")
        .await
        .expect("tunnel");
    let payload = vec![b'x'; 256 * 1024];
    let r = http
        .send(
            req("POST", "/echo", "echo")
                .body(Full::new(Bytes::from(payload.clone())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), payload.len());
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["bytes_received"], 256 * 1024);
    assert_eq!(log["bytes_sent"], 256 * 1024);
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let b = Backend::echo("echo").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.43", 80, "http", &[b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut stream = conn
        .open("10.0.0.43:80", http::HeaderMap::new())
        .await
        .expect("tunnel");
    let big = "a".repeat(70 * 1024);
    stream
        .write_all(format!("GET / HTTP/1.1\r\nhost: echo\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut out),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431"), "got: {text}");
}

#[tokio::test]
async fn http10_requests_get_426() {
    let b = Backend::echo("echo").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.43", 80, "http", &[b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut stream = conn
        .open("10.0.0.43:80", http::HeaderMap::new())
        .await
        .expect("tunnel");
    stream
        .write_all(b"GET / HTTP/1.0\r\nhost: echo\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut out),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.0 426") || text.starts_with("HTTP/1.1 426"),
        "got: {text}"
    );
    assert!(text.ends_with("Upgrade Required"), "{text}");
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 426);
    assert_eq!(log["response_flags"], "DPE");
    assert_eq!(log["response_code_details"], "low_version");
}

#[tokio::test]
async fn h2c_prior_knowledge_inside_the_tunnel_is_served() {
    let b = Backend::echo("grpcish").await;
    let mut m = Manifests::new();
    m.service("h2svc", "10.0.0.44", 80, "http2", &[b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open("10.0.0.44:80", http::HeaderMap::new())
        .await
        .expect("tunnel");
    let (mut sender, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(driver);
    let resp = sender
        .send_request(
            http::Request::builder()
                .uri("http://h2svc/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("h2c response");
    assert_eq!(resp.status(), 200);
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["protocol"], "HTTP/2");
    assert_eq!(log["authority"], "h2svc");
}

#[tokio::test]
async fn tcp_ports_are_proxied_as_bytes_and_logged_once() {
    let echo = Backend::tcp_echo().await;
    let mut m = Manifests::new();
    m.service("db", "10.0.0.45", 5432, "tcp", &[echo.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut stream = conn
        .open("10.0.0.45:5432", http::HeaderMap::new())
        .await
        .expect("tunnel");
    stream
        .write_all(b"GET / HTTP/1.1\r\n\r\n not http at all")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    assert_eq!(
        out, b"GET / HTTP/1.1\r\n\r\n not http at all",
        "a tcp port is never parsed as HTTP"
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["method"], Value::Null);
    assert_eq!(
        log["upstream_cluster"],
        "inbound-vip|5432|tcp|db.default.svc.cluster.local"
    );
    assert_eq!(log["bytes_received"], 34);
    assert_eq!(log["bytes_sent"], 34);
}

#[tokio::test]
async fn undeclared_ports_are_sniffed_http_or_tcp() {
    let http_b = Backend::echo("sniffed-http").await;
    let tcp_b = Backend::tcp_echo().await;
    let mut m = Manifests::new();
    m.service("web", "10.0.0.46", 8000, "", &[http_b.addr]);
    m.service("raw", "10.0.0.47", 7000, "", &[tcp_b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.46:8000")
        .await
        .expect("tunnel");
    assert_eq!(http.get("web", "/").await.unwrap().text(), "sniffed-http\n");
    let log = &wp.next_logs(1)[0];
    assert_eq!(
        log["upstream_cluster"],
        "inbound-vip|8000|http|web.default.svc.cluster.local"
    );

    let mut stream = conn
        .open("10.0.0.47:7000", http::HeaderMap::new())
        .await
        .expect("tunnel");
    stream.write_all(b"\x16\x03\x01binary").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"\x16\x03\x01binary");
    let log = &wp.next_logs(1)[0];
    assert_eq!(
        log["upstream_cluster"],
        "inbound-vip|7000|tcp|raw.default.svc.cluster.local"
    );
}

#[tokio::test]
async fn the_backend_receives_the_normalized_path_and_mesh_config_picks_the_mode() {
    let b = Backend::echo("echo").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.43", 80, "http", &[b.addr]);
    for (mode, sent, want) in [
        (None, "/x/../debug/./headers?q=%2e", "/debug/headers?q=%2e"),
        (Some("MERGE_SLASHES"), "//debug//headers", "/debug/headers"),
        (Some("NONE"), "/debug/headers/.", "/debug/headers/."),
    ] {
        let wp = TestWaypoint::start_with(&m.yaml(), |c| {
            if let Some(mode) = mode {
                c.mesh = proxy::config::meshconfig::MeshConfig::parse(&format!(
                    "pathNormalization:\n  normalization: {mode}\n"
                ))
                .unwrap();
            }
        })
        .await;
        let conn = wp.connect_as("default", "sleep").await;
        let mut http = TunnelHttp::open(&conn, "10.0.0.43:80").await.unwrap();
        let r = http.get("echo", sent).await.unwrap();
        if mode == Some("NONE") {
            // Not normalized: the literal path reaches the backend (which answers its name).
            assert_eq!(r.text(), "echo\n");
            continue;
        }
        let seen: Value = serde_json::from_slice(&r.body).expect("headers json");
        assert_eq!(seen["uri"], want, "mode {mode:?}");
        assert_eq!(wp.next_logs(1)[0]["path"], want);
    }
}

/// Endpoints come and go: the pool of an endpoint that left the configuration is dropped at
/// the next sweep, and idle pooled connections close after the pool idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pools_follow_the_endpoints_and_idle_connections_expire() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.43", 80, "http", &[a.addr]);
    let wp = TestWaypoint::start_with(&m.yaml(), |c| {
        c.upstream.pool_idle_timeout = std::time::Duration::from_millis(300)
    })
    .await;
    let shared = wp.running().shared.clone();
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.43:80").await.unwrap();
    assert_eq!(http.get("echo", "/").await.unwrap().text(), "a\n");
    assert_eq!(shared.upstreams.pool_count(), 1);
    assert_eq!(shared.upstreams.idle_connections(), 1);

    // The endpoint moves to b: a's pool goes at the next sweep.
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.43", 80, "http", &[b.addr]);
    std::fs::write(wp.dir.path().join("config.yaml"), m.yaml()).unwrap();
    wp.running().reload().expect("reload");
    assert_eq!(http.get("echo", "/").await.unwrap().text(), "b\n");
    assert_eq!(shared.upstreams.pool_count(), 2);
    proxy::app::sweep_upstreams_now(&shared);
    assert_eq!(
        shared.upstreams.pool_count(),
        1,
        "the pool of the endpoint that left"
    );
    assert_eq!(shared.upstreams.idle_connections(), 1);

    // Idle past the pool idle timeout: closed by the sweep (and never handed out again).
    let idle_gone = eventually(std::time::Duration::from_secs(5), || {
        let shared = shared.clone();
        async move {
            proxy::app::sweep_upstreams_now(&shared);
            (shared.upstreams.idle_connections() == 0).then_some(())
        }
    })
    .await;
    assert!(
        idle_gone.is_some(),
        "idle connection not closed after its timeout"
    );
    assert_eq!(shared.upstreams.pool_count(), 1, "b is still configured");
    let metrics = http_get(wp.running().metrics_addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    assert!(metrics.contains("waypoint_upstream_pools 1"), "{metrics}");
    assert!(
        metrics.contains("waypoint_upstream_idle_connections 0"),
        "{metrics}"
    );
}

/// A client's CONNECT `baggage` is not trusted for metric labels unless the operator turns on
/// Istio's AMBIENT_ENABLE_BAGGAGE: by default the labels come from the verified identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_source_labels_ignore_client_baggage_by_default() {
    let b = Backend::echo("echo").await;
    for trust_baggage in [false, true] {
        let mut m = Manifests::new();
        m.service("echo", "10.0.0.43", 80, "http", &[b.addr]);
        let wp =
            TestWaypoint::start_with(&m.yaml(), |c| c.limits.metrics_baggage = trust_baggage).await;
        let conn = wp.connect_as("default", "sleep").await;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "baggage",
            "k8s.deployment.name=spoofed,service.name=spoofed"
                .parse()
                .unwrap(),
        );
        let stream = conn.open("10.0.0.43:80", headers).await.unwrap();
        let (mut sender, driver) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(driver);
        let resp = sender
            .send_request(
                http::Request::builder()
                    .uri("/")
                    .header("host", "echo")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = wp.next_logs(1);
        let metrics = http_get(wp.running().metrics_addr, "/stats/prometheus")
            .await
            .unwrap()
            .text();
        let line = metrics
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap_or_default()
            .to_string();
        assert!(
            line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""),
            "{line}"
        );
        assert_eq!(
            line.contains("source_workload=\"spoofed\""),
            trust_baggage,
            "trust_baggage={trust_baggage}: {line}"
        );
    }
}

/// A TCP tunnel where nothing moves either way for the idle timeout is closed on both sides
/// and logged once, as Envoy's tcp_proxy `idle_timeout` does (1 h by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_tunnels_are_closed_after_the_idle_timeout() {
    let echo = Backend::tcp_echo().await;
    let mut m = Manifests::new();
    m.service("db", "10.0.0.45", 5432, "tcp", &[echo.addr]);
    let wp = TestWaypoint::start_with(&m.yaml(), |c| {
        c.limits.idle_timeout = std::time::Duration::from_millis(500)
    })
    .await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut stream = conn
        .open("10.0.0.45:5432", http::HeaderMap::new())
        .await
        .expect("tunnel");
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await
    .expect("closed by the idle timeout")
    .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["bytes_received"], 4, "{log}");
    assert_eq!(log["bytes_sent"], 4, "{log}");
}
