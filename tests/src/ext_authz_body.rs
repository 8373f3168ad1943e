//! ext_authz `includeRequestBodyInCheck` (`maxRequestBytes`, `allowPartialMessage`,
//! `packAsBytes`) for both provider kinds, asked by our waypoint and by real Envoy 1.40 with
//! the `with_request_body` istiod renders from it (`extauthz.go` `withBodyRequest`): the same
//! body (or its first `maxRequestBytes`) in the check, the same `x-envoy-auth-partial-body`,
//! the same 413 when the body is too large and partial messages are not allowed, and the
//! whole body still delivered upstream after an allowing check.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use waypoint_tests::envoy::{Envoy, HttpListener, http_bootstrap, static_cluster};
use waypoint_tests::{Backend, Manifests, TestWaypoint};

use crate::ext_authz_grpc::{Seen, authorizer as grpc_authorizer};

/// What an HTTP authorizer was sent: method, path, headers (lower-case), body.
#[derive(Debug, Clone, PartialEq)]
struct HttpCheck {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

type HttpSeen = Arc<Mutex<Vec<HttpCheck>>>;

/// An HTTP authorizer that records every check and allows all but bodies containing `deny`.
async fn http_authorizer() -> (SocketAddr, HttpSeen) {
    let seen: HttpSeen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes().to_vec();
                            let mut headers: Vec<(String, String)> = parts
                                .headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                                })
                                .collect();
                            headers.sort();
                            let deny = body.windows(4).any(|w| w == b"deny");
                            record.lock().unwrap().push(HttpCheck {
                                method: parts.method.to_string(),
                                path: parts.uri.to_string(),
                                headers,
                                body,
                            });
                            let status = if deny { 403 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"checked")))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// The provider's body settings, as YAML (MeshConfig) and as Envoy's `with_request_body`.
#[derive(Clone, Copy)]
struct BodySettings {
    max: u32,
    partial: bool,
    bytes: bool,
}

impl BodySettings {
    fn mesh(self) -> String {
        format!(
            "    includeRequestBodyInCheck: {{maxRequestBytes: {}, allowPartialMessage: {}, packAsBytes: {}}}\n",
            self.max, self.partial, self.bytes
        )
    }
    fn envoy(self) -> String {
        format!(
            "    with_request_body: {{max_request_bytes: {}, allow_partial_message: {}, pack_as_bytes: {}}}\n",
            self.max, self.partial, self.bytes
        )
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Grpc,
    Http,
}

async fn waypoint(
    kind: Kind,
    backend: SocketAddr,
    authz: SocketAddr,
    body: BodySettings,
) -> (TestWaypoint, tempfile::TempDir) {
    let mut m = Manifests::new();
    let (app, provider) = match kind {
        Kind::Grpc => (
            "grpc",
            format!(
                "extensionProviders:\n- name: authz\n  envoyExtAuthzGrpc:\n    service: authz.default.svc.cluster.local\n    port: 9000\n    timeout: 2s\n{}",
                body.mesh()
            ),
        ),
        Kind::Http => (
            "http",
            format!(
                "extensionProviders:\n- name: authz\n  envoyExtAuthzHttp:\n    service: authz.default.svc.cluster.local\n    port: 9000\n    timeout: 2s\n    pathPrefix: /check\n{}",
                body.mesh()
            ),
        ),
    };
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend])
        .service("authz", "10.0.0.60", 9000, app, &[authz]);
    m.push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: CUSTOM\n  provider: {name: authz}\n  rules: [{}]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, provider).unwrap();
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.mesh_config = Some(mesh)).await;
    (wp, dir)
}

/// Envoy with the ext_authz filter istiod renders for the provider, logging
/// `<code> <details> <flags>` lines to `log`.
async fn envoy(
    kind: Kind,
    backend: SocketAddr,
    authz: SocketAddr,
    body: BodySettings,
    log: &std::path::Path,
) -> (Envoy, SocketAddr) {
    const CLUSTER: &str = "outbound|9000||authz.default.svc.cluster.local";
    let (service, cluster) = match kind {
        Kind::Grpc => (
            format!(
                "    grpc_service:\n      envoy_grpc: {{cluster_name: \"{CLUSTER}\", authority: authz.default.svc.cluster.local}}\n      timeout: 2s\n"
            ),
            static_cluster(CLUSTER, authz)
                + "  typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n      \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n      explicit_http_config: {http2_protocol_options: {}}\n",
        ),
        Kind::Http => (
            format!(
                "    http_service:\n      server_uri: {{uri: \"http://authz.default.svc.cluster.local\", cluster: \"{CLUSTER}\", timeout: 2s}}\n      path_prefix: /check\n"
            ),
            static_cluster(CLUSTER, authz),
        ),
    };
    let filter = format!(
        "- name: envoy.filters.http.ext_authz\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz\n{service}    transport_api_version: V3\n    failure_mode_allow: false\n    status_on_error: {{code: Forbidden}}\n{}",
        body.envoy()
    );
    let access_log = format!(
        "access_log:\n- name: envoy.access_loggers.file\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: {}\n    log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS%\\n\"}}}}\n",
        log.display()
    );
    let config = http_bootstrap(&HttpListener {
        hcm: &access_log,
        routes: "- match: {prefix: /}\n  route: {cluster: backend}\n",
        filters: &filter,
        clusters: &(static_cluster("backend", backend) + &cluster),
        ..HttpListener::default()
    });
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let addr = envoy.listener("plain").await.unwrap();
    (envoy, addr)
}

/// How the test client sends a body.
#[derive(Clone, Copy, Debug)]
enum Framing {
    /// `content-length`, one write.
    Length,
    /// `transfer-encoding: chunked`, in 10-byte chunks.
    Chunked,
}

type AnyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

fn request(path: &str, body: &[u8], framing: Framing) -> http::Request<AnyBody> {
    let b = http::Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri(path)
        .header("host", "reviews:9080")
        // A client cannot make a body look whole or cut: both proxies drop this one.
        .header("x-envoy-auth-partial-body", "spoofed");
    let body: AnyBody = match framing {
        Framing::Length => Full::new(Bytes::copy_from_slice(body)).boxed_unsync(),
        Framing::Chunked => {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = body
                .chunks(10)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
        }
    };
    b.body(body).unwrap()
}

/// (status, body) of one request on an HTTP/1.1 connection over `io`.
async fn exchange<IO>(io: IO, req: http::Request<AnyBody>) -> (u16, String)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = send.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn ours(wp: &TestWaypoint, req: http::Request<AnyBody>) -> (u16, String) {
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open("10.0.0.10:9080", http::HeaderMap::new())
        .await
        .unwrap();
    exchange(stream, req).await
}

async fn envoys(addr: SocketAddr, req: http::Request<AnyBody>) -> (u16, String) {
    exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), req).await
}

/// What each gRPC check carried of the body: (body, raw_body, x-envoy-auth-partial-body,
/// size).
fn grpc_bodies(seen: &Seen) -> Vec<GrpcSeen> {
    let checks = seen.lock().unwrap();
    checks
        .iter()
        .map(|c| {
            let http = c
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.clone())
                .unwrap_or_default();
            (
                String::from_utf8_lossy(&http.body).into_owned(),
                http.raw_body,
                http.headers.get("x-envoy-auth-partial-body").cloned(),
                http.size,
            )
        })
        .collect()
}

const BODY40: &[u8] = b"0123456789abcdefghijABCDEFGHIJ0123456789";

/// The cases both proxies get: a body under the limit, over it (in one write, and chunked
/// in 10-byte chunks), none, and one the HTTP authorizer denies.
const CASES: [(&[u8], Framing); 5] = [
    (b"hello", Framing::Length),
    (BODY40, Framing::Length),
    (BODY40, Framing::Chunked),
    (b"", Framing::Length),
    (b"please deny", Framing::Length),
];

const STRICT: BodySettings = BodySettings {
    max: 16,
    partial: false,
    bytes: false,
};
const PARTIAL: BodySettings = BodySettings {
    max: 16,
    partial: true,
    bytes: false,
};

/// What a check carried that both proxies must agree on.
type GrpcSeen = (String, Vec<u8>, Option<String>, i64);

#[tokio::test]
async fn grpc_check_carries_the_body_as_envoy_sends_it() {
    let backend = Backend::echo("reviews").await;
    let (authz, seen) = grpc_authorizer().await;
    for settings in [
        PARTIAL,
        BodySettings {
            bytes: true,
            ..STRICT
        },
    ] {
        let (wp, dir) = waypoint(Kind::Grpc, backend.addr, authz, settings).await;
        let envoy_log = dir.path().join("envoy.log");
        let (_envoy, envoy_addr) =
            envoy(Kind::Grpc, backend.addr, authz, settings, &envoy_log).await;
        for (body, framing) in CASES {
            let case = format!(
                "partial={} packAsBytes={} {framing:?} {} bytes",
                settings.partial,
                settings.bytes,
                body.len()
            );
            seen.lock().unwrap().clear();
            let a = ours(&wp, request("/echo", body, framing)).await;
            let ours_checks = grpc_bodies(&seen);
            seen.lock().unwrap().clear();
            let b = envoys(envoy_addr, request("/echo", body, framing)).await;
            let envoys_checks = grpc_bodies(&seen);
            assert_eq!(a, b, "{case}: the client's answer, ours (left) and Envoy's");
            assert_eq!(
                ours_checks.len(),
                envoys_checks.len(),
                "{case}: checks sent"
            );
            for (o, e) in ours_checks.iter().zip(&envoys_checks) {
                assert_eq!(
                    (&o.0, &o.1, &o.2),
                    (&e.0, &e.1, &e.2),
                    "{case}: body, raw_body, x-envoy-auth-partial-body"
                );
                // `size` is the bytes received when the check leaves: with a
                // content-length both have read it all; chunked, Envoy's codec may have read
                // more of the stream than the limit.
                match framing {
                    Framing::Length => assert_eq!(o.3, e.3, "{case}: size"),
                    Framing::Chunked => assert!(o.3 >= 16, "{case}: size {}", o.3),
                }
            }
            // Spelled out.
            let over = body.len() > 16;
            if over && !settings.partial {
                assert_eq!(a, (413, "Payload Too Large".into()), "{case}");
                assert!(ours_checks.is_empty(), "{case}: no check");
                let log = wp.next_logs(1).remove(0);
                assert_eq!(log["response_code"], 413);
                assert_eq!(log["response_code_details"], "request_payload_too_large");
                assert_eq!(log["response_flags"], "-");
                assert_eq!(
                    envoy_line(&envoy_log, 413).await,
                    "413 request_payload_too_large -",
                    "Envoy's line for the same request"
                );
                continue;
            }
            wp.next_logs(1);
            assert_eq!(a.0, 200, "{case}");
            assert_eq!(
                a.1.as_bytes(),
                body,
                "{case}: the whole body reached the backend"
            );
            let (text, raw, flag, _) = &ours_checks[0];
            let sent = if settings.bytes {
                raw.clone()
            } else {
                text.clone().into_bytes()
            };
            assert_eq!(sent, &body[..body.len().min(16)], "{case}");
            let expect_flag = (!body.is_empty()).then(|| over.to_string());
            assert_eq!(
                flag, &expect_flag,
                "{case}: a client's own header is never passed on"
            );
        }
    }
}

/// Envoy's first access-log line with `code`, waited for (Envoy flushes its log every second).
async fn envoy_line(path: &std::path::Path, code: u16) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(&format!("{code} "))) {
            return line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {code} line in Envoy's log: {text:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An HTTP check's headers without the two Envoy adds as a router to any upstream request
/// (`x-envoy-expected-rq-timeout-ms`, `x-envoy-internal`), which ours does not send.
fn comparable(c: &HttpCheck) -> HttpCheck {
    let mut c = c.clone();
    c.headers
        .retain(|(k, _)| k != "x-envoy-expected-rq-timeout-ms" && k != "x-envoy-internal");
    c
}

#[tokio::test]
async fn http_check_carries_the_body_as_envoy_sends_it() {
    let backend = Backend::echo("reviews").await;
    let (authz, seen) = http_authorizer().await;
    for settings in [PARTIAL, STRICT] {
        let (wp, dir) = waypoint(Kind::Http, backend.addr, authz, settings).await;
        let envoy_log = dir.path().join("envoy.log");
        let (_envoy, envoy_addr) =
            envoy(Kind::Http, backend.addr, authz, settings, &envoy_log).await;
        for (body, framing) in CASES {
            let case = format!(
                "partial={} {framing:?} {} bytes",
                settings.partial,
                body.len()
            );
            seen.lock().unwrap().clear();
            let a = ours(&wp, request("/echo", body, framing)).await;
            let ours_checks: Vec<HttpCheck> = seen.lock().unwrap().iter().map(comparable).collect();
            seen.lock().unwrap().clear();
            let b = envoys(envoy_addr, request("/echo", body, framing)).await;
            let envoys_checks: Vec<HttpCheck> =
                seen.lock().unwrap().iter().map(comparable).collect();
            assert_eq!(a, b, "{case}: the client's answer, ours (left) and Envoy's");
            assert_eq!(ours_checks, envoys_checks, "{case}: the check requests");
            if body.len() > 16 && !settings.partial {
                assert_eq!(a.0, 413, "{case}");
                assert!(ours_checks.is_empty(), "{case}");
            } else if body.starts_with(b"please deny") {
                assert_eq!(a, (403, "checked".into()), "{case}");
            } else {
                assert_eq!(a.1.as_bytes(), body, "{case}: the whole body upstream");
                let c = &ours_checks[0];
                assert_eq!(c.body, &body[..body.len().min(16)], "{case}");
                let length = c.body.len().to_string();
                assert!(
                    c.headers.contains(&("content-length".into(), length)),
                    "{case}: {c:?}"
                );
            }
        }
    }
}

#[test]
fn a_missing_or_zero_limit_is_a_config_error_naming_the_field() {
    for bad in ["{}", "{maxRequestBytes: 0}", "{maxRequestBytes: -1}"] {
        let err = proxy::config::meshconfig::MeshConfig::parse(&format!(
            "extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {{service: s, port: 9000, includeRequestBodyInCheck: {bad}}}\n"
        ))
        .expect_err(bad);
        let text = format!("{err:#}");
        assert!(
            text.contains("extensionProviders[0] (\"a\")")
                && text.contains("envoyExtAuthzGrpc.includeRequestBodyInCheck.maxRequestBytes"),
            "{text}"
        );
    }
}
