//! CUSTOM AuthorizationPolicy with an `envoyExtAuthzGrpc` provider: a gRPC authorizer
//! (`envoy.service.auth.v3.Authorization/Check`, tonic's server codec) that records every
//! CheckRequest and answers by path, asked by our waypoint and by real Envoy 1.40 configured
//! as istiod renders the provider (`extauthz.go`: `grpc_service.envoy_grpc` to the
//! provider's `outbound|<port>||<host>` cluster, `transport_api_version: V3`,
//! `failure_mode_allow` from failOpen, `status_on_error`): the same answers to the client,
//! the same header changes upstream, and the same request attributes in the check.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use proxy::upstream::extauthz_grpc::{
    BoolValue, CHECK_PATH, CheckRequestMsg, CheckResponseMsg, DeniedHttpResponse, HeaderValueMsg,
    HeaderValueOption, HttpStatus, OkHttpResponse, RpcStatus,
};
use serde_json::Value;
use waypoint_tests::envoy::{Envoy, plain_http_bootstrap, static_cluster};
use waypoint_tests::{Backend, Manifests, TestWaypoint, TunnelHttp};

pub(crate) type Seen = Arc<Mutex<Vec<CheckRequestMsg>>>;

fn header(key: &str, value: &str, append: Option<bool>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValueMsg {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: append.map(|value| BoolValue { value }),
        append_action: 0,
    }
}

/// The authorizer's answer for a path: `/deny` -> PERMISSION_DENIED with a 401, a body and
/// a header; anything else -> OK, setting `x-user`, appending to `x-tag`, removing
/// `x-secret` upstream and adding `x-authz` to the client's response.
fn answer(path: &str) -> CheckResponseMsg {
    if path.starts_with("/deny") {
        return CheckResponseMsg {
            status: Some(RpcStatus {
                code: 7,
                message: "no".into(),
            }),
            denied_response: Some(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                headers: vec![header("x-reason", "not-you", None)],
                body: "go away".into(),
            }),
            ok_response: None,
        };
    }
    CheckResponseMsg {
        status: Some(RpcStatus {
            code: 0,
            message: String::new(),
        }),
        denied_response: None,
        ok_response: Some(OkHttpResponse {
            headers: vec![
                header("x-user", "alice", Some(false)),
                header("x-tag", "from-authz", Some(true)),
            ],
            headers_to_remove: vec!["x-secret".into()],
            response_headers_to_add: vec![header("x-authz", "yes", None)],
        }),
    }
}

#[derive(Clone)]
struct Authorizer {
    seen: Seen,
}

impl tonic::server::UnaryService<CheckRequestMsg> for Authorizer {
    type Response = CheckResponseMsg;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tonic::Response<CheckResponseMsg>, tonic::Status>,
                > + Send,
        >,
    >;

    fn call(&mut self, request: tonic::Request<CheckRequestMsg>) -> Self::Future {
        let seen = self.seen.clone();
        Box::pin(async move {
            let check = request.into_inner();
            let path = check
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.as_ref())
                .map(|h| h.path.clone())
                .unwrap_or_default();
            seen.lock().unwrap().push(check);
            Ok(tonic::Response::new(answer(&path)))
        })
    }
}

/// The authorizer on 127.0.0.1:0 (h2c, as Envoy's `envoy_grpc` client speaks it).
pub(crate) async fn authorizer() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Authorizer { seen: seen.clone() };
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        async move {
                            if req.uri().path() != CHECK_PATH {
                                return Ok::<_, std::convert::Infallible>(
                                    tonic::Status::unimplemented("unknown method").into_http(),
                                );
                            }
                            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                                CheckResponseMsg,
                                CheckRequestMsg,
                            >::default(
                            ));
                            Ok(grpc.unary(service, req).await)
                        }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    (addr, seen)
}

const PROVIDER: &str = "extensionProviders:\n- name: grpc-authz\n  envoyExtAuthzGrpc:\n    service: authz.default.svc.cluster.local\n    port: 9000\n    timeout: 2s\n";

async fn waypoint(backend: SocketAddr, authz: SocketAddr) -> (TestWaypoint, tempfile::TempDir) {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend])
        .service("authz", "10.0.0.60", 9000, "grpc", &[authz]);
    m.push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: CUSTOM\n  provider: {name: grpc-authz}\n  rules: [{}]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, PROVIDER).unwrap();
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.mesh_config = Some(mesh)).await;
    (wp, dir)
}

/// Envoy with the ext_authz filter istiod renders for the provider, in front of `backend`.
async fn envoy(backend: SocketAddr, authz: SocketAddr) -> (Envoy, SocketAddr) {
    // The filter and cluster istiod renders for the provider (`extauthz.go`).
    let filter = r#"- name: envoy.filters.http.ext_authz
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
    grpc_service:
      envoy_grpc: {cluster_name: "outbound|9000||authz.default.svc.cluster.local", authority: authz.default.svc.cluster.local}
      timeout: 2s
    transport_api_version: V3
    failure_mode_allow: false
    status_on_error: {code: Forbidden}
"#;
    let authz_cluster = static_cluster("outbound|9000||authz.default.svc.cluster.local", authz)
        + "  typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n      \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n      explicit_http_config: {http2_protocol_options: {}}\n";
    let config = plain_http_bootstrap(
        "- match: {prefix: /}\n  route: {cluster: backend}\n",
        filter,
        &(static_cluster("backend", backend) + &authz_cluster),
    );
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let addr = envoy.listener("plain").await.unwrap();
    (envoy, addr)
}

/// (status, body, x-authz, x-reason, upstream x-user, upstream x-tag, upstream x-secret).
type Seen7 = (
    u16,
    String,
    Option<String>,
    Option<String>,
    Value,
    Value,
    Value,
);

fn summarize(status: u16, body: &[u8], header: impl Fn(&str) -> Option<String>) -> Seen7 {
    let text = String::from_utf8_lossy(body).to_string();
    let upstream: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let h = |n: &str| upstream["headers"][n].clone();
    let body = if upstream.is_null() {
        text
    } else {
        "(echo)".into()
    };
    (
        status,
        body,
        header("x-authz"),
        header("x-reason"),
        h("x-user"),
        h("x-tag"),
        h("x-secret"),
    )
}

fn request(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header("host", "reviews:9080")
        .header("x-secret", "s3cret")
        .header("x-tag", "client")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn ours(wp: &TestWaypoint, path: &str) -> Seen7 {
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    let r = http.send(request(path)).await.unwrap();
    summarize(r.status.as_u16(), &r.body, |n| {
        r.header(n).map(str::to_string)
    })
}

async fn envoys(addr: SocketAddr, path: &str) -> Seen7 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = send.send_request(request(path)).await.unwrap();
    let (parts, body) = r.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    summarize(parts.status.as_u16(), &body, |n| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
}

/// The attributes both proxies must send alike (ids, ports, times and the proxies' own
/// headers aside).
fn attributes(c: &CheckRequestMsg) -> (String, String, String, String, String, BTreeSet<String>) {
    let http = c
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.clone())
        .unwrap_or_default();
    let keys = http
        .headers
        .keys()
        .filter(|k| !k.starts_with("x-envoy"))
        .cloned()
        .collect();
    (
        http.method,
        http.path,
        http.host,
        http.scheme,
        http.protocol,
        keys,
    )
}

#[tokio::test]
async fn grpc_authorizer_decides_as_with_envoy() {
    let backend = Backend::echo("reviews").await;
    let (authz, seen) = authorizer().await;
    let (wp, _dir) = waypoint(backend.addr, authz).await;
    let (_envoy, envoy_addr) = envoy(backend.addr, authz).await;
    for path in ["/debug/headers?x=1", "/deny"] {
        let a = ours(&wp, path).await;
        let b = envoys(envoy_addr, path).await;
        assert_eq!(a, b, "{path}: ours (left) and Envoy's (right)");
    }
    // What both answered, spelled out.
    let allowed = ours(&wp, "/debug/headers").await;
    assert_eq!(allowed.0, 200);
    assert_eq!(allowed.2.as_deref(), Some("yes"));
    assert_eq!(allowed.4, "alice");
    assert_eq!(
        allowed.5, "client,from-authz",
        "appended in place, as Envoy does"
    );
    assert_eq!(allowed.6, Value::Null, "x-secret removed");
    let denied = ours(&wp, "/deny").await;
    assert_eq!((denied.0, denied.1.as_str()), (401, "go away"));
    assert_eq!(denied.3.as_deref(), Some("not-you"));
    let logs = wp.next_logs(4);
    assert_eq!(logs[1]["response_flags"], "UAEX");
    assert_eq!(logs[1]["response_code_details"], "ext_authz_denied");

    // The check requests, in order: ours, Envoy's (x2), then ours twice more.
    let checks = seen.lock().unwrap().clone();
    assert_eq!(checks.len(), 6);
    let (ours_allow, envoys_allow) = (attributes(&checks[0]), attributes(&checks[1]));
    assert_eq!(ours_allow, envoys_allow);
    assert_eq!(ours_allow.0, "GET");
    assert_eq!(ours_allow.1, "/debug/headers?x=1");
    assert_eq!(ours_allow.2, "reviews:9080");
    let a = checks[0].attributes.as_ref().unwrap();
    assert_eq!(
        a.source.as_ref().unwrap().principal,
        "spiffe://cluster.local/ns/default/sa/sleep",
        "the tunnel's peer identity"
    );
    // `waypoint explain` names the provider and what it is sent.
    let text = wp.explain_get("10.0.0.10:9080", "/");
    assert!(
        text.contains(
            "asked: gRPC Authorization/Check to authz.default.svc.cluster.local:9000 (timeout 2s)"
        ),
        "{text}"
    );
    // Outcomes and latency, scraped as Prometheus would.
    let metrics = waypoint_tests::http_get(wp.running().metrics_addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    for line in [
        "waypoint_ext_authz_checks_total{result=\"ok\"} 2",
        "waypoint_ext_authz_checks_total{result=\"denied\"} 2",
        "waypoint_ext_authz_checks_total{result=\"error\"} 0",
        "waypoint_ext_authz_duration_milliseconds_count 4",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let dest = a.destination.as_ref().unwrap().address.as_ref().unwrap();
    assert_eq!(
        dest.socket_address
            .as_ref()
            .map(|s| (s.address.as_str(), s.port_value)),
        Some(("10.0.0.10", 9080))
    );
}

#[tokio::test]
async fn an_unreachable_grpc_authorizer_is_the_providers_error_as_with_envoy() {
    let backend = Backend::echo("reviews").await;
    let closed = waypoint_tests::closed_port().await;
    let (wp, _dir) = waypoint(backend.addr, closed).await;
    let (_envoy, envoy_addr) = envoy(backend.addr, closed).await;
    let a = ours(&wp, "/").await;
    let b = envoys(envoy_addr, "/").await;
    assert_eq!((a.0, a.1.as_str()), (403, ""));
    assert_eq!((a.0, &a.1), (b.0, &b.1));
    let line = wp.next_logs(1).remove(0);
    assert_eq!(line["response_flags"], "UAEX");
    assert_eq!(line["response_code_details"], "ext_authz_error");
    let metrics = waypoint_tests::http_get(wp.running().metrics_addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("waypoint_ext_authz_checks_total{result=\"error\"} 1"),
        "{metrics}"
    );
}
