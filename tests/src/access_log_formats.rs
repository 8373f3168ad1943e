//! MeshConfig access-log formats (`accessLogEncoding` / `accessLogFormat`) rendered by our
//! waypoint and by real Envoy 1.40 for the same requests, compared line by line. Envoy is
//! configured as istiod configures the file access log (text format source, the cluster's
//! `alt_stat_name` = name + `;`, route name `default`); the same plain backend answers both.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use waypoint_tests::envoy::Envoy;
use waypoint_tests::*;

const CLUSTER: &str = "inbound-vip|9080|http|reviews.default.svc.cluster.local";

/// Every operator of the custom format that is the same for both proxies given the same
/// request: headers (with `?` fallback and `:N` truncation), codes, flags, details, byte
/// counts, cluster names (`%UPSTREAM_CLUSTER%` is istiod's `alt_stat_name`, name + `;`),
/// SNI, route name, a literal `%%`.
const CUSTOM: &str = "\"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" %UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW% %REQUESTED_SERVER_NAME% %ROUTE_NAME% tenant=%REQ(X-TENANT?X-ORG):4% type=%RESP(CONTENT-TYPE)% 100%% %START_TIME(%Y)%";

/// A backend whose answer does not depend on the request (the echo backend's body lists the
/// request headers, which differ between the two proxies).
async fn plain_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "text/plain")
                            .body(Full::new(Bytes::from_static(b"hello from reviews\n")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Envoy proxying `/ok` to `backend` (anything else: no route), logging `format` to a file.
fn envoy_config(backend: SocketAddr, log: &std::path::Path, format: &str) -> String {
    let format = serde_json::to_string(format).unwrap();
    let access_log = format!(
        "access_log:\n- name: envoy.access_loggers.file\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: \"{}\"\n    log_format:\n      text_format_source: {{inline_string: {format}}}\n",
        log.display()
    );
    // istiod's cluster: `%UPSTREAM_CLUSTER%` prints its `alt_stat_name`.
    let cluster = format!(
        "- name: \"{CLUSTER}\"\n  alt_stat_name: \"{CLUSTER};\"\n  type: STATIC\n  connect_timeout: 5s\n  load_assignment:\n    cluster_name: \"{CLUSTER}\"\n    endpoints:\n    - lb_endpoints:\n      - endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}\n",
        backend.ip(),
        backend.port()
    );
    waypoint_tests::envoy::http_bootstrap(&waypoint_tests::envoy::HttpListener {
        stat_prefix: Some("http"),
        virtual_host: Some("reviews"),
        hcm: &access_log,
        routes: &format!(
            "- name: default\n  match: {{prefix: /ok}}\n  route: {{cluster: \"{CLUSTER}\"}}\n"
        ),
        clusters: &cluster,
        ..Default::default()
    })
}

/// The requests both proxies get: a routed GET with a truncated header fallback, and one
/// without a route.
fn requests() -> Vec<http::Request<Full<Bytes>>> {
    let req = |path: &str, extra: &[(&str, &str)]| {
        let mut b = http::Request::builder()
            .uri(path)
            .header("host", "reviews:9080")
            .header("user-agent", "format-test/1.0")
            .header("x-request-id", "3e8a7d0c-1111-4222-8333-944455556666");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    };
    vec![
        req("/ok/1?q=x", &[("x-org", "acme-corp")]),
        req("/missing", &[]),
    ]
}

/// Our waypoint with `mesh` as its mesh config: the lines it writes for [`requests`].
async fn ours(backend: SocketAddr, mesh: &str, n: usize) -> Vec<String> {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend]).route(
        "reviews",
        "reviews",
        9080,
        "  - name: default\n    matches: [{path: {type: PathPrefix, value: /ok}}]\n    backendRefs: [{name: reviews, port: 9080}]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, mesh).unwrap();
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.mesh_config = Some(path)).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    for r in requests() {
        http.send(r).await.unwrap();
    }
    (0..n)
        .map(|_| {
            wp.logs
                .recv_timeout(Duration::from_secs(10))
                .expect("an access-log line")
        })
        .collect()
}

/// Real Envoy with `format`: the lines it writes for [`requests`].
async fn envoys(backend: SocketAddr, format: &str, n: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let envoy = Envoy::start(&envoy_config(backend, &log, format))
        .await
        .expect("envoy starts");
    let addr = envoy.listener("plain").await.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, driver) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(driver);
    for r in requests() {
        sender.ready().await.unwrap();
        let resp = sender.send_request(r).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
    }
    // Envoy flushes its access log every second (file_flush_interval_msec).
    let lines = eventually(Duration::from_secs(10), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).ok()?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            (lines.len() >= n).then_some(lines)
        }
    })
    .await;
    lines.unwrap_or_else(|| panic!("envoy wrote no {n} lines; its log:\n{}", envoy.log()))
}

/// Fields of a text line: split on spaces, a `"..."` or `[...]` group kept whole.
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut close = None;
    for c in line.chars() {
        match (close, c) {
            (None, '"') => close = Some('"'),
            (None, '[') if cur.is_empty() => close = Some(']'),
            (None, ' ') => out.push(std::mem::take(&mut cur)),
            (Some(end), c) if c == end => close = None,
            _ => {}
        }
        if !(close.is_none() && c == ' ') {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

#[tokio::test]
async fn a_custom_text_format_prints_what_envoy_prints() {
    let backend = plain_backend().await;
    let mesh = format!(
        "accessLogEncoding: TEXT\naccessLogFormat: {}\n",
        serde_json::to_string(CUSTOM).unwrap()
    );
    let ours = ours(backend, &mesh, 2).await;
    let envoys = envoys(backend, &format!("{CUSTOM}\n"), 2).await;
    eprintln!("ours:  {ours:?}\nenvoy: {envoys:?}");
    assert_eq!(ours, envoys, "ours first, Envoy's second");
    // Not vacuous: the routed line has the fallback header truncated, the cluster with `;`.
    assert!(
        ours[0].contains(&format!(
            "{CLUSTER}; {CLUSTER} - default tenant=acme type=text/plain 100% 20"
        )),
        "{}",
        ours[0]
    );
    assert!(
        ours[1].starts_with("\"GET /missing HTTP/1.1\" 404 NR route_not_found"),
        "{}",
        ours[1]
    );
}

#[tokio::test]
async fn istios_default_text_format_matches_envoys_line_for_line() {
    let backend = plain_backend().await;
    // `accessLogFile` alone selects Istio's default TEXT format, as istiod does.
    let ours = ours(backend, "accessLogFile: /dev/stdout\n", 2).await;
    let envoys = envoys(backend, accesslog::format::ISTIO_TEXT_FORMAT, 2).await;
    for (o, e) in ours.iter().zip(&envoys) {
        eprintln!("ours:  {o}\nenvoy: {e}");
        let (o, e) = (fields(o), fields(e));
        assert_eq!(o.len(), 22, "{o:?}");
        assert_eq!(o.len(), e.len(), "{o:?} / {e:?}");
        for (i, (a, b)) in o.iter().zip(&e).enumerate() {
            match i {
                // Start time (same shape), duration, upstream service time: timings.
                0 => assert_eq!(a.len(), b.len(), "start time {a} / {b}"),
                9 | 10 => assert!(a.parse::<u64>().is_ok() || a == "-", "{a}"),
                // Upstream host, upstream local, downstream local and remote addresses: our
                // waypoint is reached over HBONE at a VIP, Envoy on its listener port.
                15 | 17 | 18 | 19 => assert_eq!(a == "-", b == "-", "field {i}: {a} / {b}"),
                _ => assert_eq!(a, b, "field {i} differs:\nours  {o:?}\nenvoy {e:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_json_format_keeps_envoys_types() {
    let backend = plain_backend().await;
    let format = r#"{"code":"%RESPONSE_CODE%","bytes":"%BYTES_SENT%","sni":"%REQUESTED_SERVER_NAME%","who":"%REQ(:AUTHORITY)% %ROUTE_NAME%","flags":"%RESPONSE_FLAGS%"}"#;
    let mesh = format!(
        "accessLogEncoding: JSON\naccessLogFormat: {}\n",
        serde_json::to_string(format).unwrap()
    );
    let ours = ours(backend, &mesh, 2).await;
    let first: serde_json::Value = serde_json::from_str(&ours[0]).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"code": 200, "bytes": 19, "sni": null, "who": "reviews:9080 default", "flags": "-"})
    );
    let second: serde_json::Value = serde_json::from_str(&ours[1]).unwrap();
    assert_eq!(second["code"], 404);
    assert_eq!(second["flags"], "NR");
}

/// Telemetry `accessLogging` selecting MeshConfig `envoyFileAccessLog` providers: each entry
/// writes to its providers (a JSON `labels` format and a text format, each to its own file),
/// its filter deciding for its own providers; `envoy` is the mesh-wide log.
#[tokio::test]
async fn telemetry_selects_file_access_log_providers() {
    let backend = plain_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let (json_file, text_file) = (dir.path().join("errors.json"), dir.path().join("all.txt"));
    let mesh = format!(
        "extensionProviders:\n- name: errors-json\n  envoyFileAccessLog:\n    path: {}\n    logFormat:\n      labels: {{code: \"%RESPONSE_CODE%\", path: \"%REQ(:PATH)%\"}}\n- name: all-text\n  envoyFileAccessLog:\n    path: {}\n    logFormat:\n      text: \"%RESPONSE_CODE% %REQ(:PATH)%\"\n",
        json_file.display(),
        text_file.display()
    );
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh).unwrap();
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend]).route(
        "reviews",
        "reviews",
        9080,
        "  - matches: [{path: {type: PathPrefix, value: /ok}}]\n    backendRefs: [{name: reviews, port: 9080}]\n",
    );
    m.push(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: logs, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  accessLogging:\n  - providers: [{name: errors-json}]\n    filter: {expression: \"response.code >= 400\"}\n  - providers: [{name: all-text}, {name: nowhere}]\n",
    );
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.mesh_config = Some(mesh_path)).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    for r in requests() {
        http.send(r).await.unwrap();
    }
    let read = |p: std::path::PathBuf, n: usize| async move {
        eventually(Duration::from_secs(10), || {
            let p = p.clone();
            async move {
                let text = std::fs::read_to_string(&p).ok()?;
                (text.lines().count() >= n).then_some(text)
            }
        })
        .await
        .unwrap_or_else(|| panic!("{} lines in {}", n, p.display()))
    };
    assert_eq!(read(text_file, 2).await, "200 /ok/1?q=x\n404 /missing\n");
    let json = read(json_file, 1).await;
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![serde_json::json!({"code": 404, "path": "/missing"})],
        "only the error, in the labels format"
    );
    // No entry names `envoy`: the mesh-wide log gets nothing.
    assert!(wp.drain_logs(Duration::from_millis(200)).is_empty());
    let warnings = &wp.running().shared.snapshot.load().warnings;
    assert!(
        warnings.iter().any(|w| w.contains("\"nowhere\"")),
        "{warnings:?}"
    );
}
