//! Gateway API mesh (GAMMA) behaviour through real HBONE: each Gateway API mesh conformance
//! test (`conformance/tests/mesh/*.go`, policy.md 3.9) re-expressed as our own test and named
//! after it, plus filters, timeouts, retries, mirrors, GRPCRoute and TCPRoute.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use waypoint_tests::*;

/// A backend that answers every request with a JSON echo (`name`, `method`, `path` with
/// query, `headers`, `body`) and `x-backend: <name>`, and records what it received.
/// `/status/<code>` answers that status; `/sleep/<ms>` waits first; a `grpc-status` request
/// header is copied to the response (to play a trailers-only gRPC error).
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (name, seen2): (Arc<str>, _) = (name.into(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (name, seen) = (name.clone(), seen2.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (name, seen) = (name.clone(), seen.clone());
                            async move {
                                let path = req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str().to_string())
                                    .unwrap_or_default();
                                let method = req.method().to_string();
                                let mut headers = serde_json::Map::new();
                                for (k, v) in req.headers() {
                                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                                    let entry = headers
                                        .entry(k.as_str().to_string())
                                        .or_insert(Value::String(String::new()));
                                    let joined = match entry.as_str() {
                                        Some("") => v,
                                        Some(prev) => format!("{prev},{v}"),
                                        None => v,
                                    };
                                    *entry = Value::String(joined);
                                }
                                let grpc_status = req.headers().get("grpc-status").cloned();
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                let body =
                                    String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                                let record = json!({"name": &*name, "method": method, "path": path,
                                    "headers": headers, "body": body});
                                seen.lock().unwrap().push(record.clone());
                                let mut status = StatusCode::OK;
                                if let Some(code) = path.strip_prefix("/status/") {
                                    status = code
                                        .parse::<u16>()
                                        .ok()
                                        .and_then(|c| StatusCode::from_u16(c).ok())
                                        .unwrap_or(StatusCode::OK);
                                }
                                if let Some(ms) = path.strip_prefix("/sleep/") {
                                    let ms = ms.parse().unwrap_or(0);
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                let mut r =
                                    Response::new(Full::new(Bytes::from(record.to_string())));
                                *r.status_mut() = status;
                                r.headers_mut().insert(
                                    "x-backend",
                                    http::HeaderValue::from_str(&name).unwrap(),
                                );
                                if let Some(g) = grpc_status {
                                    r.headers_mut().insert("grpc-status", g);
                                    r.headers_mut().insert(
                                        "content-type",
                                        http::HeaderValue::from_static("application/grpc"),
                                    );
                                }
                                Ok::<_, Infallible>(r)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Echo { addr, seen, task }
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

/// A TCP server that writes `<name>\n` on accept and then echoes.
async fn tcp_named(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tcp.write_all(format!("{name}\n").as_bytes()).await;
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

fn body_json(r: &FullResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn req(path: &str, host: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().uri(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// A Service (namespace default) with several ports, each with its own endpoints.
fn multi_port_service(m: &mut Manifests, name: &str, vip: &str, ports: &[(u16, &str, SocketAddr)]) {
    let mut spec = String::new();
    let mut slice_ports = String::new();
    for (port, pname, ep) in ports {
        spec.push_str(&format!(
            "  - {{name: {pname}, port: {port}, targetPort: {}}}\n",
            ep.port()
        ));
        slice_ports.push_str(&format!("- {{name: {pname}, port: {}}}\n", ep.port()));
    }
    m.push(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports:\n{spec}"
    ));
    m.push(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-slice\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nendpoints:\n- addresses: [\"127.0.0.1\"]\nports:\n{slice_ports}"
    ));
}

/// echo-v1 and echo-v2 behind Service `echo` (10.0.0.10:80), plus their own Services.
async fn echo_mesh(routes: &[&str]) -> (TestWaypoint, Echo, Echo) {
    let v1 = Echo::start("echo-v1").await;
    let v2 = Echo::start("echo-v2").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.10", 80, "http", &[v1.addr])
        .service("echo-v1", "10.0.0.11", 80, "http", &[v1.addr])
        .service("echo-v2", "10.0.0.12", 80, "http", &[v2.addr]);
    for r in routes {
        m.push(r);
    }
    (TestWaypoint::start(&m.yaml()).await, v1, v2)
}

fn http_route(name: &str, parent: &str, parent_port: Option<u16>, rules: &str) -> String {
    let port = parent_port
        .map(|p| format!(", port: {p}"))
        .unwrap_or_default();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: {parent}{port}}}\n  rules:\n{rules}"
    )
}

async fn client(wp: &TestWaypoint, vip: &str) -> TunnelHttp {
    let conn = wp.connect_as("default", "sleep").await;
    TunnelHttp::open(&conn, vip).await.expect("tunnel")
}

// --- conformance: mesh --------------------------------------------------------------------

#[tokio::test]
async fn mesh_basic() {
    let (wp, _v1, _v2) = echo_mesh(&[]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", "/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-backend")),
        (200, Some("echo-v1"))
    );
}

#[tokio::test]
async fn mesh_frontend() {
    let route = http_route(
        "echo-v2",
        "echo-v2",
        None,
        "  - filters:\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-header-set, value: set}]}}\n    backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.12:80").await;
    let r = c.get("echo-v2", "/").await.unwrap();
    assert_eq!(r.header("x-header-set"), Some("set"));
    // Calling the pod directly is not a Service VIP: the waypoint does not serve it (and so
    // never applies the route), answering like Envoy's missing filter chain.
    let conn = wp.connect_as("default", "sleep").await;
    let pod = format!("127.0.0.1:{}", v2.addr.port());
    assert!(TunnelHttp::open(&conn, &pod).await.is_err());
}

#[tokio::test]
async fn mesh_frontend_hostname() {
    let route = http_route(
        "echo-v2",
        "echo-v2",
        None,
        "  - filters:\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-header-set, value: set}]}}\n    backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    // Dial echo-v2 with Host: echo-v1: the route follows the address.
    let mut c = client(&wp, "10.0.0.12:80").await;
    let r = c.get("echo-v1", "/").await.unwrap();
    assert_eq!(r.header("x-header-set"), Some("set"));
    // Dial echo-v1 with Host: echo-v2: no route.
    let mut c = client(&wp, "10.0.0.11:80").await;
    let r = c.get("echo-v2", "/").await.unwrap();
    assert_eq!(r.header("x-header-set"), None);
}

#[tokio::test]
async fn mesh_ports() {
    let e80 = Echo::start("echo-80").await;
    let e8080 = Echo::start("echo-8080").await;
    let mut m = Manifests::new();
    multi_port_service(
        &mut m,
        "echo",
        "10.0.0.10",
        &[(80, "http", e80.addr), (8080, "http-alt", e8080.addr)],
    );
    let rules = "  - filters:\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-port, value: port-specific}]}}\n    backendRefs: [{name: echo, port: 80}]\n";
    m.push(&http_route("port-80", "echo", Some(80), rules));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    assert_eq!(
        c.get("echo", "/").await.unwrap().header("x-port"),
        Some("port-specific")
    );
    let mut c = client(&wp, "10.0.0.10:8080").await;
    let r = c.get("echo", "/").await.unwrap();
    assert_eq!(
        (r.header("x-port"), r.header("x-backend")),
        (None, Some("echo-8080"))
    );
    drop(wp);
    // No port: every port.
    let mut m = Manifests::new();
    multi_port_service(
        &mut m,
        "echo",
        "10.0.0.10",
        &[(80, "http", e80.addr), (8080, "http-alt", e8080.addr)],
    );
    m.push(&http_route(
        "all-ports",
        "echo",
        None,
        &rules.replace("port-specific", "all"),
    ));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let mut c = client(&wp, "10.0.0.10:8080").await;
    assert_eq!(
        c.get("echo", "/").await.unwrap().header("x-port"),
        Some("all")
    );
}

/// Istio ambient does not support consumer routes (its ambient conformance run skips
/// MeshConsumerRoute): a route in another namespace than its parent Service is not applied
/// for anyone, including callers from the route's namespace. Documented in the README.
#[tokio::test]
async fn mesh_consumer_route() {
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: consumer, namespace: client-ns}\nspec:\n  parentRefs:\n  - {group: \"\", kind: Service, name: echo, namespace: default}\n  rules:\n  - filters:\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-consumer, value: 'true'}]}}\n    backendRefs: [{name: echo-v2, namespace: default, port: 80}]\n";
    let (wp, _v1, _v2) = echo_mesh(&[consumer]).await;
    for ns in ["client-ns", "default"] {
        let conn = wp.connect_as(ns, "client").await;
        let mut c = TunnelHttp::open(&conn, "10.0.0.10:80").await.unwrap();
        let r = c.get("echo", "/").await.unwrap();
        assert_eq!(
            (r.header("x-consumer"), r.header("x-backend")),
            (None, Some("echo-v1")),
            "{ns}"
        );
    }
    let snapshot = wp.running().shared.snapshot.load_full();
    let warnings = &snapshot.warnings;
    assert!(
        warnings.iter().any(|w| w.contains("consumer route")),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn mesh_traffic_split() {
    let route = http_route(
        "split",
        "echo",
        Some(80),
        "  - matches: [{path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /v2}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    assert_eq!(
        c.get("echo", "/v1").await.unwrap().header("x-backend"),
        Some("echo-v1")
    );
    assert_eq!(
        c.get("echo", "/v2").await.unwrap().header("x-backend"),
        Some("echo-v2")
    );
}

#[tokio::test]
async fn mesh_http_route_simple_same_namespace() {
    let route = http_route(
        "simple",
        "echo",
        Some(80),
        "  - backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", "/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.header("x-backend")),
        (200, Some("echo-v2"))
    );
    assert_eq!(wp.next_logs(1)[0]["route_name"], "default.simple.0");
}

#[tokio::test]
async fn mesh_http_route_matching() {
    let route = http_route(
        "matching",
        "echo",
        Some(80),
        "  - matches:\n    - path: {type: PathPrefix, value: /}\n    - path: {type: PathPrefix, value: /v1}\n    backendRefs: [{name: echo-v1, port: 80}]\n  - matches:\n    - path: {type: PathPrefix, value: /v2}\n      headers: [{name: version, value: two}]\n    - path: {type: PathPrefix, value: /v2}\n    backendRefs: [{name: echo-v2, port: 80}]\n  - matches:\n    - path: {type: PathPrefix, value: /}\n      headers: [{name: version, value: two}]\n    backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    for (path, headers, want) in [
        ("/", &[][..], "echo-v1"),
        ("/example", &[][..], "echo-v1"),
        ("/", &[("version", "one")][..], "echo-v1"),
        ("/v2", &[("version", "two")][..], "echo-v2"),
        ("/v2/example", &[][..], "echo-v2"),
        ("/", &[("version", "two")][..], "echo-v2"),
        ("/v2example", &[][..], "echo-v1"),
        ("/foo/v2/example", &[][..], "echo-v1"),
    ] {
        let r = c.send(req(path, "echo", headers)).await.unwrap();
        assert_eq!(r.header("x-backend"), Some(want), "{path} {headers:?}");
    }
}

#[tokio::test]
async fn mesh_http_route_query_param_matching() {
    let route = http_route(
        "query",
        "echo",
        Some(80),
        "  - matches: [{queryParams: [{name: animal, value: whale}]}]\n    backendRefs: [{name: echo-v1, port: 80}]\n  - matches: [{queryParams: [{name: animal, value: dolphin}]}]\n    backendRefs: [{name: echo-v2, port: 80}]\n  - matches:\n    - queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]\n    - queryParams: [{name: ANIMAL, value: Whale}]\n    backendRefs: [{name: echo, port: 80}]\n  - matches:\n    - path: {type: PathPrefix, value: /path}\n      queryParams: [{name: animal, value: whale}]\n    backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    for (path, want) in [
        ("/?animal=whale", Some("echo-v1")),
        ("/?animal=dolphin", Some("echo-v2")),
        ("/?animal=dolphin&color=blue", Some("echo-v1")), // Service echo -> echo-v1 pod
        ("/?ANIMAL=Whale", Some("echo-v1")),
        ("/path?animal=whale", Some("echo-v2")), // path match outranks query-only
        ("/?animal=shark", None),
        ("/", None),
    ] {
        let r = c.get("echo", path).await.unwrap();
        match want {
            Some(b) => assert_eq!(r.header("x-backend"), Some(b), "{path}"),
            None => assert_eq!(r.status, 404, "{path}"),
        }
    }
    let logs = wp.next_logs(7);
    // dolphin+blue went to the `echo` Service cluster (rule 2), not echo-v2.
    assert_eq!(logs[2]["route_name"], "default.query.2");
    assert_eq!(
        logs[2]["upstream_cluster"],
        "inbound-vip|80|http|echo.default.svc.cluster.local"
    );
    assert_eq!(logs[5]["response_flags"], "NR");
}

#[tokio::test]
async fn mesh_http_route_weight() {
    let route = http_route(
        "weights",
        "echo",
        Some(80),
        "  - backendRefs:\n    - {name: echo-v1, port: 80, weight: 70}\n    - {name: echo-v2, port: 80, weight: 30}\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        let r = c.get("echo", "/").await.unwrap();
        *seen
            .entry(r.header("x-backend").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let v2 = seen.get("echo-v2").copied().unwrap_or(0);
    // 30% +-5 points (sd 14.5 of 1000: a 3.4 sd band).
    assert!((250..=350).contains(&v2), "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 1000);
}

#[tokio::test]
async fn mesh_http_route_request_header_modifier() {
    let route = http_route(
        "hdr",
        "echo",
        Some(80),
        "  - matches: [{path: {type: PathPrefix, value: /set}}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}]}}\n    backendRefs: [{name: echo, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /add}}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: X-Header-Add, value: add-appends-values}]}}\n    backendRefs: [{name: echo, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /remove}}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [X-Header-Remove]}}\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let h = |r: &FullResponse, n: &str| body_json(r)["headers"][n].as_str().map(str::to_string);
    let r = c
        .send(req("/set", "echo", &[("x-header-set", "original")]))
        .await
        .unwrap();
    assert_eq!(
        h(&r, "x-header-set").as_deref(),
        Some("set-overwrites-values")
    );
    let r = c
        .send(req("/add", "echo", &[("x-header-add", "original")]))
        .await
        .unwrap();
    assert_eq!(
        h(&r, "x-header-add").as_deref(),
        Some("original,add-appends-values")
    );
    let r = c.send(req("/add", "echo", &[])).await.unwrap();
    assert_eq!(h(&r, "x-header-add").as_deref(), Some("add-appends-values"));
    let r = c
        .send(req("/remove", "echo", &[("x-header-remove", "val")]))
        .await
        .unwrap();
    assert_eq!(h(&r, "x-header-remove"), None);
}

#[tokio::test]
async fn mesh_http_route_backend_request_header_modifier() {
    let route = http_route(
        "backend-hdr",
        "echo",
        Some(80),
        "  - backendRefs:\n    - name: echo-v1\n      port: 80\n      filters:\n      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: v1}], add: [{name: x-header-add, value: add-v1}], remove: [x-header-remove]}}\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c
        .send(req(
            "/",
            "echo",
            &[
                ("x-header-set", "orig"),
                ("x-header-add", "orig"),
                ("x-header-remove", "x"),
            ],
        ))
        .await
        .unwrap();
    let headers = &body_json(&r)["headers"];
    assert_eq!(headers["x-header-set"], "v1");
    assert_eq!(headers["x-header-add"], "orig,add-v1");
    assert_eq!(headers["x-header-remove"], Value::Null);
}

#[tokio::test]
async fn mesh_http_route_rewrite_path() {
    let route = http_route(
        "rewrite",
        "echo",
        Some(80),
        "  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]\n    backendRefs: [{name: echo, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]\n    backendRefs: [{name: echo, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /full/one}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]\n    backendRefs: [{name: echo, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}]\n    filters:\n    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplaceFullPath, replaceFullPath: /test}}}\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}], add: [{name: X-Header-Add-Append, value: append}], remove: [X-Header-Remove]}}\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let path = |r: &FullResponse| body_json(r)["path"].as_str().unwrap_or("").to_string();
    for (from, to) in [
        ("/prefix/one/two", "/one/two"),
        ("/prefix/one", "/one"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/one?q=1", "/one?q=1"),
    ] {
        let r = c.get("echo", from).await.unwrap();
        assert_eq!(path(&r), to, "{from}");
    }
    let r = c
        .send(req(
            "/full/rewrite-path-and-modify-headers/x",
            "echo",
            &[
                ("x-header-set", "o"),
                ("x-header-add-append", "o"),
                ("x-header-remove", "o"),
            ],
        ))
        .await
        .unwrap();
    let j = body_json(&r);
    assert_eq!(j["path"], "/test");
    assert_eq!(j["headers"]["host"], "rewritten.example");
    assert_eq!(j["headers"]["x-header-set"], "set-overwrites-values");
    assert_eq!(j["headers"]["x-header-add-append"], "o,append");
    assert_eq!(j["headers"]["x-header-remove"], Value::Null);
    assert_eq!(
        j["headers"]["x-envoy-original-path"],
        "/full/rewrite-path-and-modify-headers/x"
    );
    // The access log keeps the client's path, as Envoy's %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%.
    let logs = wp.next_logs(7);
    assert_eq!(logs[0]["path"], "/prefix/one/two");
}

fn redirect_route(filter: &str) -> String {
    http_route(
        "redirect",
        "echo",
        Some(80),
        &format!("  - filters:\n    - {{type: RequestRedirect, requestRedirect: {filter}}}\n"),
    )
}

async fn redirected(filter: &str, path: &str) -> (u16, Option<String>, TestWaypoint) {
    let (wp, _v1, _v2) = echo_mesh(&[&redirect_route(filter)]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", path).await.unwrap();
    assert!(r.body.is_empty());
    (
        r.status.as_u16(),
        r.header("location").map(str::to_string),
        wp,
    )
}

#[tokio::test]
async fn mesh_http_route_redirect_path() {
    let (s, l, wp) = redirected(
        "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}",
        "/original-prefix/lemon",
    )
    .await;
    assert_eq!(
        (s, l.as_deref()),
        (
            302,
            Some("http://echo/replacement-prefix/original-prefix/lemon")
        )
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(
        (
            log["response_code"].as_u64(),
            log["response_code_details"].as_str()
        ),
        (Some(302), Some("direct_response"))
    );
    assert_eq!(log["upstream_cluster"], Value::Null);
    let (s, l, _) = redirected(
        "{path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}}",
        "/full-path-original?x=1",
    )
    .await;
    assert_eq!(
        (s, l.as_deref()),
        (302, Some("http://echo/replacement-full?x=1"))
    );
}

#[tokio::test]
async fn mesh_http_route_redirect_port() {
    let (s, l, _) = redirected("{port: 8083}", "/port").await;
    assert_eq!((s, l.as_deref()), (302, Some("http://echo:8083/port")));
    // Without a port or scheme: the Service port dialed (Istio FROM_REQUEST_PORT = the
    // route's port), whatever Host says; 80 is http's default, so it is left out.
    let (wp, _v1, _v2) = echo_mesh(&[&redirect_route("{hostname: example.org}")]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo:8080", "/x").await.unwrap();
    assert_eq!(r.header("location"), Some("http://example.org/x"));
}

#[tokio::test]
async fn mesh_http_route_scheme_redirect() {
    let (s, l, _) = redirected("{scheme: https}", "/scheme").await;
    assert_eq!((s, l.as_deref()), (302, Some("https://echo/scheme")));
    let (_, l, _) = redirected("{scheme: https, port: 8443}", "/s").await;
    assert_eq!(l.as_deref(), Some("https://echo:8443/s"));
}

#[tokio::test]
async fn mesh_http_route_redirect_host_and_status() {
    let (s, l, _) = redirected("{hostname: example.org}", "/hostname-redirect").await;
    assert_eq!(
        (s, l.as_deref()),
        (302, Some("http://example.org/hostname-redirect"))
    );
    let (s, l, _) = redirected(
        "{hostname: example.org, statusCode: 301}",
        "/host-and-status",
    )
    .await;
    assert_eq!(
        (s, l.as_deref()),
        (301, Some("http://example.org/host-and-status"))
    );
}

#[tokio::test]
async fn mesh_http_route_303_307_308_redirect() {
    for code in [303, 307, 308] {
        let (s, l, _) = redirected(
            &format!("{{hostname: example.org, statusCode: {code}}}"),
            "/x",
        )
        .await;
        assert_eq!((s, l.as_deref()), (code, Some("http://example.org/x")));
    }
}

#[tokio::test]
async fn mesh_http_route_named_rule() {
    let route = http_route(
        "named",
        "echo",
        Some(80),
        "  - name: named-rule\n    matches: [{path: {type: PathPrefix, value: /named}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /unnamed}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    assert_eq!(
        c.get("echo", "/named").await.unwrap().header("x-backend"),
        Some("echo-v1")
    );
    assert_eq!(
        c.get("echo", "/unnamed").await.unwrap().header("x-backend"),
        Some("echo-v2")
    );
    let logs = wp.next_logs(2);
    assert_eq!(logs[0]["route_name"], "named-rule");
    assert_eq!(logs[1]["route_name"], "default.named.1");
}

// --- gRPC ---------------------------------------------------------------------------------

/// h2c (gRPC-like) requests through one tunnel.
async fn h2c(wp: &TestWaypoint, vip: &str) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open(vip, http::HeaderMap::new())
        .await
        .expect("tunnel");
    let (sender, driver) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c");
    tokio::spawn(async move {
        let _ = driver.await;
    });
    sender
}

async fn grpc_call(
    s: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> FullResponse {
    let mut b = Request::builder()
        .method("POST")
        .uri(format!("http://grpc{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = s
        .send_request(
            b.body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap(),
        )
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    FullResponse {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn grpc_mesh(rules: &str) -> (TestWaypoint, Echo, Echo, Echo) {
    let v1 = Echo::start("grpc-v1").await;
    let v2 = Echo::start("grpc-v2").await;
    let v3 = Echo::start("grpc-v3").await;
    let mut m = Manifests::new();
    m.service("grpc", "10.0.0.20", 9000, "grpc", &[v1.addr])
        .service("grpc-v1", "10.0.0.21", 9000, "grpc", &[v1.addr])
        .service("grpc-v2", "10.0.0.22", 9000, "grpc", &[v2.addr])
        .service("grpc-v3", "10.0.0.23", 9000, "grpc", &[v3.addr]);
    m.push(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: grpc, port: 9000}}]\n  rules:\n{rules}"
    ));
    (TestWaypoint::start(&m.yaml()).await, v1, v2, v3)
}

#[tokio::test]
async fn mesh_grpc_route_weight() {
    let (wp, _a, _b, _c) = grpc_mesh("  - backendRefs:\n    - {name: grpc-v1, port: 9000, weight: 70}\n    - {name: grpc-v2, port: 9000, weight: 30}\n    - {name: grpc-v3, port: 9000, weight: 0}\n").await;
    let mut s = h2c(&wp, "10.0.0.20:9000").await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        let r = grpc_call(&mut s, "/grpc.Echo/Echo", &[]).await;
        *seen
            .entry(r.header("x-backend").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let v2 = seen.get("grpc-v2").copied().unwrap_or(0);
    assert!((250..=350).contains(&v2), "{seen:?}");
    assert_eq!(seen.get("grpc-v3"), None, "weight 0 never chosen: {seen:?}");
}

#[tokio::test]
async fn mesh_grpc_route_request_header_modifier() {
    let (wp, _a, _b, _c) = grpc_mesh("  - matches: [{method: {service: grpc.Echo, method: Echo}}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: set}], add: [{name: x-add, value: add}], remove: [x-remove]}}\n    backendRefs: [{name: grpc-v2, port: 9000}]\n").await;
    let mut s = h2c(&wp, "10.0.0.20:9000").await;
    let r = grpc_call(
        &mut s,
        "/grpc.Echo/Echo",
        &[("x-set", "orig"), ("x-add", "orig"), ("x-remove", "x")],
    )
    .await;
    let j = body_json(&r);
    assert_eq!(j["name"], "grpc-v2");
    assert_eq!(j["headers"]["x-set"], "set");
    assert_eq!(j["headers"]["x-add"], "orig,add");
    assert_eq!(j["headers"]["x-remove"], Value::Null);
}

/// Local replies to gRPC requests are gRPC statuses in a trailers-only response, as Envoy's
/// `sendLocalReply` makes them: no route -> 12 UNIMPLEMENTED, missing backend (500) -> 2
/// UNKNOWN, no healthy upstream -> 14 UNAVAILABLE with the body as `grpc-message`.
#[tokio::test]
async fn grpc_local_replies_are_grpc_status() {
    let (wp, _a, _b, _c) = grpc_mesh("  - matches: [{method: {service: grpc.Echo}}]\n    backendRefs: [{name: grpc-v1, port: 9000}]\n  - matches: [{method: {service: grpc.Missing}}]\n    backendRefs: [{name: nosuch, port: 9000}]\n").await;
    let mut s = h2c(&wp, "10.0.0.20:9000").await;
    let r = grpc_call(&mut s, "/grpc.Other/Call", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.header("grpc-status")),
        (200, Some("12"))
    );
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    assert!(r.body.is_empty());
    let r = grpc_call(&mut s, "/grpc.Missing/Call", &[]).await;
    assert_eq!(r.header("grpc-status"), Some("2"));
    let r = grpc_call(&mut s, "/grpc.Echo/Echo", &[]).await;
    assert_eq!(r.header("x-backend"), Some("grpc-v1"));
    let logs = wp.next_logs(3);
    assert_eq!(logs[0]["response_code"], 200);
    assert_eq!(logs[0]["response_flags"], "NR");
    assert_eq!(logs[1]["response_flags"], "NC");
    // Istio's `grpc_response_status`: the gRPC status of each gRPC request.
    let metrics = http_get(wp.running().metrics_addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    for (status, flags) in [("12", "NR"), ("2", "NC")] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains("request_protocol=\"grpc\"")
                    && l.contains(&format!(
                        "grpc_response_status=\"{status}\",response_flags=\"{flags}\""
                    ))),
            "{status} {flags}: {metrics}"
        );
    }
}

// --- backends, timeouts, retries, mirrors -------------------------------------------------

#[tokio::test]
async fn missing_backend_gets_its_weighted_share_of_500() {
    let route = http_route(
        "half",
        "echo",
        Some(80),
        "  - backendRefs:\n    - {name: echo-v1, port: 80}\n    - {name: nosuch, port: 80}\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let mut errors = 0;
    for _ in 0..400 {
        let r = c.get("echo", "/").await.unwrap();
        match r.status.as_u16() {
            500 => errors += 1,
            200 => {}
            s => panic!("unexpected {s}"),
        }
    }
    // Binomial(400, 0.5): sd 10; [140, 260] is 6 sd.
    assert!((140..=260).contains(&errors), "{errors} of 400");
}

#[tokio::test]
async fn request_timeout_answers_504_ut() {
    let route = http_route(
        "slow",
        "echo",
        Some(80),
        "  - timeouts: {request: 200ms}\n    filters:\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: slow}]}}\n    backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let started = std::time::Instant::now();
    let r = c.get("echo", "/sleep/2000").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (504, "upstream request timeout")
    );
    // Envoy's router applies the route's response headers to its own local replies too.
    assert_eq!(r.header("x-route"), Some("slow"));
    // A fast request on the same rule is fine.
    assert_eq!(c.get("echo", "/sleep/1").await.unwrap().status, 200);
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "UT");
    assert_eq!(log["response_code_details"], "response_timeout");
}

#[tokio::test]
async fn backend_request_timeout_with_retry_is_per_try() {
    let route = http_route(
        "per-try",
        "echo",
        Some(80),
        "  - timeouts: {request: 5s, backendRequest: 200ms}\n    retry: {attempts: 2}\n    backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", "/sleep/2000").await.unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(
        wp.next_logs(1)[0]["response_code_details"],
        "upstream_per_try_timeout"
    );
}

/// Istio's default policy (no `retry`) does not retry a 503 from the app (503 left the
/// default retriable codes in 1.24); a Gateway API `retry` with `codes: [503]` retries it,
/// replays a buffered body, and forwards the last 503 flagged `URX` (envoy-observed 2d).
/// `x-envoy-attempt-count` is never added (Istio does not enable it on waypoint routes).
#[tokio::test]
async fn retries_follow_the_route_policy() {
    let routes = http_route(
        "retry",
        "echo",
        Some(80),
        "  - matches: [{path: {type: PathPrefix, value: /status/503}, headers: [{name: x-retry, value: 'on'}]}]\n    retry: {attempts: 2, codes: [503], backoff: 1ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n  - backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    let (wp, v1, _v2) = echo_mesh(&[&routes]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", "/status/503").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(v1.seen().len(), 1, "default policy: 503 not retried");
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "-");
    let post = Request::builder()
        .method("POST")
        .uri("/status/503")
        .header("host", "echo")
        .header("x-retry", "on")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let r = c.send(post).await.unwrap();
    assert_eq!(r.status, 503);
    let seen = v1.seen();
    assert_eq!(seen.len(), 4, "1 + 3 attempts");
    for s in &seen[1..] {
        assert_eq!(s["body"], "payload");
        assert_eq!(s["headers"]["x-envoy-attempt-count"], Value::Null);
    }
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "URX");
    assert_eq!(log["response_code_details"], "via_upstream");
    assert_eq!(log["bytes_received"], 7);
}

#[tokio::test]
async fn retry_body_over_the_buffer_limit_is_not_replayed() {
    let routes = http_route(
        "retry",
        "echo",
        Some(80),
        "  - retry: {attempts: 2, codes: [503], backoff: 1ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    let (wp, v1, _v2) = echo_mesh(&[&routes]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let big = Bytes::from(vec![b'x'; proxy::request::RETRY_BUFFER_LIMIT + 1]);
    let post = Request::builder()
        .method("POST")
        .uri("/status/503")
        .header("host", "echo")
        .body(Full::new(big))
        .unwrap();
    assert_eq!(c.send(post).await.unwrap().status, 503);
    assert_eq!(
        v1.seen().len(),
        1,
        "a streamed body beyond the buffer is never replayed"
    );
    drop(wp);
}

#[tokio::test]
async fn connect_failures_without_retry_policy_have_no_urx() {
    let dead = closed_port().await;
    let mut m = Manifests::new();
    m.service("dead", "10.0.0.40", 80, "http", &[dead]);
    m.push(&http_route(
        "noretry",
        "dead",
        Some(80),
        "  - retry: {attempts: 0}\n    backendRefs: [{name: dead, port: 80}]\n",
    ));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let mut c = client(&wp, "10.0.0.40:80").await;
    let r = c.get("dead", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
    );
    assert_eq!(wp.next_logs(1)[0]["response_flags"], "UF");
}

#[tokio::test]
async fn request_mirror_is_fire_and_forget() {
    let route = http_route(
        "mirror",
        "echo",
        Some(80),
        "  - filters:\n    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}\n    backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    let (wp, v1, v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let post = Request::builder()
        .method("POST")
        .uri("/m?x=1")
        .header("host", "echo:80")
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap();
    let r = c.send(post).await.unwrap();
    assert_eq!(r.header("x-backend"), Some("echo-v1"));
    let mirrored = eventually(Duration::from_secs(5), || {
        let v = v2.seen();
        async move { v.first().cloned() }
    })
    .await
    .expect("mirror arrives");
    assert_eq!(mirrored["path"], "/m?x=1");
    assert_eq!(mirrored["body"], "body");
    assert_eq!(mirrored["headers"]["host"], "echo-shadow:80");
    assert_eq!(v1.seen().len(), 1);
    // One access-log line: the client's request only.
    assert_eq!(
        wp.next_logs(1)[0]["upstream_cluster"],
        "inbound-vip|80|http|echo-v1.default.svc.cluster.local"
    );
    assert!(wp.drain_logs(Duration::from_millis(300)).is_empty());
}

#[tokio::test]
async fn response_header_modifier_rule_and_backend() {
    let route = http_route(
        "resp",
        "echo",
        Some(80),
        "  - filters:\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-rule, value: r}], remove: [x-backend]}}\n    backendRefs:\n    - name: echo-v1\n      port: 80\n      filters:\n      - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-from-backend-ref, value: b}]}}\n",
    );
    let (wp, _v1, _v2) = echo_mesh(&[&route]).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", "/").await.unwrap();
    assert_eq!(
        (
            r.header("x-rule"),
            r.header("x-from-backend-ref"),
            r.header("x-backend")
        ),
        (Some("r"), Some("b"), None)
    );
}

#[tokio::test]
async fn cross_namespace_backend_with_reference_grant() {
    let other = Echo::start("other").await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.10", 80, "http", &[other.addr]);
    m.push(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: remote, namespace: other}}\nspec:\n  clusterIP: 10.0.1.1\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: remote-1, namespace: other, labels: {{kubernetes.io/service-name: remote}}}}\naddressType: IPv4\nendpoints: [{{addresses: [\"127.0.0.1\"]}}]\nports: [{{name: http, port: {}}}]\n", other.addr.port()));
    m.push(&http_route("x", "echo", Some(80), "  - matches: [{path: {type: PathPrefix, value: /remote}}]\n    backendRefs: [{name: remote, namespace: other, port: 80}]\n"));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    assert_eq!(
        c.get("echo", "/remote").await.unwrap().status,
        500,
        "RefNotPermitted"
    );
    drop(c);
    drop(wp);
    m.push("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: allow, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: \"\", kind: Service, name: remote}]\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    let mut c = client(&wp, "10.0.0.10:80").await;
    let r = c.get("echo", "/remote").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        wp.next_logs(1)[0]["upstream_cluster"],
        "outbound|80||remote.other.svc.cluster.local"
    );
}

// --- TCPRoute -----------------------------------------------------------------------------

#[tokio::test]
async fn tcp_route_splits_connections_by_weight() {
    let (a, _ta) = tcp_named("tcp-a").await;
    let (b, _tb) = tcp_named("tcp-b").await;
    let mut m = Manifests::new();
    m.service("db", "10.0.0.50", 5432, "tcp", &[a])
        .service("db-a", "10.0.0.51", 5432, "tcp", &[a])
        .service("db-b", "10.0.0.52", 5432, "tcp", &[b]);
    m.push("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: db, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: db, port: 5432}]\n  rules:\n  - backendRefs:\n    - {name: db-a, port: 5432, weight: 1}\n    - {name: db-b, port: 5432, weight: 3}\n    - {name: db-zero, port: 5432, weight: 0}\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let mut s = conn
            .open("10.0.0.50:5432", http::HeaderMap::new())
            .await
            .unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).await.unwrap();
        *seen
            .entry(String::from_utf8_lossy(&buf).into_owned())
            .or_default() += 1;
    }
    let nb = seen.get("tcp-b\n").copied().unwrap_or(0);
    // Binomial(200, 0.75): sd 6.1; [120, 180] is ~5 sd.
    assert!((120..=180).contains(&nb), "{seen:?}");
}

#[tokio::test]
async fn tcp_route_to_a_missing_backend_rejects_the_connection() {
    let (a, _ta) = tcp_named("tcp-a").await;
    let mut m = Manifests::new();
    m.service("db", "10.0.0.50", 5432, "tcp", &[a]);
    m.push("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: db, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: db}]\n  rules:\n  - backendRefs: [{name: nosuch, port: 5432}]\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    // The tunnel is reset (the reset may even overtake the CONNECT's 200).
    if let Ok(mut s) = conn.open("10.0.0.50:5432", http::HeaderMap::new()).await {
        let mut buf = [0u8; 6];
        assert!(s.read_exact(&mut buf).await.is_err());
    }
    assert_eq!(wp.next_logs(1)[0]["response_flags"], "NC");
}

// --- TLSRoute -----------------------------------------------------------------------------

/// TLS passthrough routed by the ClientHello SNI: exact names, `*.` wildcards, and no match
/// -> the tunnel is reset and logged `NR` `filter_chain_not_found` (Envoy's missing filter
/// chain). The ClientHello reaches the chosen backend unchanged.
#[tokio::test]
async fn tls_route_routes_passthrough_by_sni() {
    let (a, _ta) = tcp_named("tls-a").await;
    let (b, _tb) = tcp_named("tls-b").await;
    let mut m = Manifests::new();
    m.service("web", "10.0.0.90", 443, "tls", &[a])
        .service("web-a", "10.0.0.91", 443, "tls", &[a])
        .service("web-b", "10.0.0.92", 443, "tls", &[b]);
    for (name, hosts, backend) in [
        ("a", "[a.example.com]", "web-a"),
        ("b", "['*.example.org']", "web-b"),
    ] {
        m.push(&format!("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 443}}]\n  hostnames: {hosts}\n  rules:\n  - backendRefs: [{{name: {backend}, port: 443}}]\n"));
    }
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    for (sni, want) in [
        (Some("a.example.com"), Some("tls-a\n")),
        (Some("x.example.org"), Some("tls-b\n")),
        (Some("other.net"), None),
        (None, None),
    ] {
        let hello = proxy::listener::client_hello(sni);
        let Ok(mut s) = conn.open("10.0.0.90:443", http::HeaderMap::new()).await else {
            assert!(want.is_none());
            continue;
        };
        let _ = s.write_all(&hello).await;
        let mut buf = vec![0u8; 6 + hello.len()];
        match want {
            Some(name) => {
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf[..6], name.as_bytes(), "{sni:?}");
                assert_eq!(&buf[6..], &hello[..], "ClientHello passed through");
            }
            None => assert!(s.read_exact(&mut buf).await.is_err(), "{sni:?}"),
        }
        drop(s);
    }
    let logs = wp.next_logs(4);
    let nr: Vec<_> = logs
        .iter()
        .filter(|l| l["response_flags"] == "NR")
        .collect();
    assert_eq!(nr.len(), 2, "{logs:?}");
    assert_eq!(nr[0]["response_code_details"], "filter_chain_not_found");
    let ok: Vec<_> = logs.iter().filter(|l| l["response_flags"] == "-").collect();
    assert!(
        ok.iter()
            .any(|l| l["requested_server_name"] == "a.example.com"),
        "{logs:?}"
    );
}

/// The first TLS record(s) a real client sends (its ClientHello), captured on a local
/// listener: read until the handshake message is complete.
async fn capture_client_hello(
    connect: impl FnOnce(SocketAddr) -> tokio::task::JoinHandle<()>,
) -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = connect(listener.local_addr().unwrap());
    let (mut tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut buf = Vec::new();
    // Records: 5-byte header + length; the handshake message: 4-byte header + length.
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "client closed before its ClientHello");
        buf.extend_from_slice(&chunk[..n]);
        let mut handshake = Vec::new();
        let mut at = 0;
        while at + 5 <= buf.len() {
            let len = usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]]));
            if at + 5 + len > buf.len() {
                break;
            }
            handshake.extend_from_slice(&buf[at + 5..at + 5 + len]);
            at += 5 + len;
        }
        if handshake.len() >= 4 {
            let msg = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if handshake.len() >= 4 + msg {
                buf.truncate(at);
                break;
            }
        }
    }
    drop(tcp);
    client.abort();
    buf
}

/// TLSRoute SNI matching on ClientHellos from real TLS stacks, not our generator: rustls
/// (TLS 1.3, ALPN) and `openssl s_client` (many extensions, ALPN, OCSP status request), each
/// fed to the waypoint in 100-byte pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_route_reads_the_sni_of_real_client_hellos() {
    let (a, _ta) = tcp_named("tls-a").await;
    let mut m = Manifests::new();
    m.service("web", "10.0.0.90", 443, "tls", &[a])
        .service("web-a", "10.0.0.91", 443, "tls", &[a]);
    m.push("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: a, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 443}]\n  hostnames: [a.example.com]\n  rules:\n  - backendRefs: [{name: web-a, port: 443}]\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    let rustls_hello = capture_client_hello(|addr| {
        tokio::spawn(async move {
            let mut roots = rustls::RootCertStore::empty();
            let pki = hbone::testing::Pki::new("cluster.local").unwrap();
            roots
                .add(hbone::testing::cert_from_pem(pki.root_pem()).unwrap())
                .unwrap();
            let mut cfg = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("a.example.com").unwrap();
            let _ = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await;
        })
    })
    .await;
    let openssl_hello = capture_client_hello(|addr| {
        tokio::task::spawn_blocking(move || {
            let _ = std::process::Command::new("openssl")
                .args(["s_client", "-connect", &addr.to_string()])
                .args(["-servername", "a.example.com", "-alpn", "h2,http/1.1"])
                .arg("-status")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        })
    })
    .await;
    assert!(rustls_hello.len() > 200 && openssl_hello.len() > 200);
    let conn = wp.connect_as("default", "sleep").await;
    for (who, hello) in [("rustls", rustls_hello), ("openssl", openssl_hello)] {
        let mut s = conn
            .open("10.0.0.90:443", http::HeaderMap::new())
            .await
            .unwrap();
        for piece in hello.chunks(100) {
            s.write_all(piece).await.unwrap();
        }
        let mut buf = vec![0u8; 6 + hello.len()];
        s.read_exact(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(&buf[..6], b"tls-a\n", "{who}");
        assert_eq!(&buf[6..], &hello[..], "{who}: ClientHello passed through");
        s.shutdown().await.unwrap();
        drop(s);
        let log = &wp.next_logs(1)[0];
        assert_eq!(
            log["requested_server_name"], "a.example.com",
            "{who}: {log}"
        );
    }
}

/// Istio's default `retry_on` includes gRPC `unavailable`: a trailers-only
/// `grpc-status: 14` answer is retried (on another endpoint when there is one).
#[tokio::test]
async fn grpc_unavailable_is_retried_by_default() {
    let (wp, v1, _b, _c) = grpc_mesh("  - backendRefs: [{name: grpc-v1, port: 9000}]\n").await;
    let mut s = h2c(&wp, "10.0.0.20:9000").await;
    let r = grpc_call(&mut s, "/grpc.Echo/Echo", &[("grpc-status", "14")]).await;
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert_eq!(v1.seen().len(), 3, "1 + 2 retries");
    assert_eq!(wp.next_logs(1)[0]["response_flags"], "URX");
}

/// A backend that sends the response headers and a first chunk at once, and the end of the
/// body only after 3 s.
async fn slow_body_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = tcp.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (addr, task)
}

/// `timeouts.request` covers the whole response, as Envoy's route timeout: expiring while the
/// body streams resets the stream, logged `UT` with the status already sent.
#[tokio::test]
async fn request_timeout_during_the_body_resets_the_stream() {
    let (slow, _task) = slow_body_backend().await;
    let mut m = Manifests::new();
    m.service("slow", "10.0.0.95", 80, "http", &[slow]);
    m.push(&http_route(
        "slow",
        "slow",
        Some(80),
        "  - timeouts: {request: 300ms}\n    backendRefs: [{name: slow, port: 80}]\n",
    ));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let mut c = client(&wp, "10.0.0.95:80").await;
    let started = std::time::Instant::now();
    assert!(c.get("slow", "/").await.is_err(), "body must not complete");
    assert!(started.elapsed() < Duration::from_millis(2500));
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 200);
    assert_eq!(log["response_flags"], "UT");
    assert_eq!(log["response_code_details"], "response_timeout");
}
