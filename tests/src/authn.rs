//! RequestAuthentication (JWT) and CUSTOM (ext_authz) through real HBONE: keys generated and
//! tokens signed in the test, the JWKS served by a small HTTP server on 127.0.0.1 and fetched
//! by the waypoint, and a small real HTTP authorizer on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use policy::authn::testing::{TestAlg, TestKey, jwks};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use waypoint_tests::*;

const ISS: &str = "https://issuer.test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A small HTTP server on 127.0.0.1: `handler(request head)` -> response.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start<F>(handler: F) -> Server
    where
        F: Fn(http::request::Parts) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let (parts, _) = req.into_parts();
                                Ok::<_, Infallible>(handler(parts))
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        Server { addr, task }
    }
}

fn response(status: u16, body: &str, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            http::HeaderValue::from_str(v).expect("value"),
        );
    }
    r
}

/// A JWKS endpoint at `/jwks` that answers 503 while `up` is false.
async fn jwks_server(body: String, up: Arc<AtomicBool>) -> Server {
    Server::start(move |parts| {
        if parts.uri.path() != "/jwks" {
            return response(404, "", &[]);
        }
        if up.load(Ordering::SeqCst) {
            response(200, &body, &[("content-type", "application/json")])
        } else {
            response(503, "not yet", &[])
        }
    })
    .await
}

fn get(path: &str, headers: &[(&str, String)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().uri(path).header("host", "reviews:9080");
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

/// reviews (10.0.0.10:9080) -> `backend`, a RequestAuthentication on the waypoint with
/// `jwksUri`, and an AuthorizationPolicy requiring a request principal in group `ops` on
/// `/secure`.
fn jwt_manifests(backend: SocketAddr, jwks_uri: &str) -> String {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend]);
    m.push(&format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]\n  jwtRules:\n  - issuer: \"{ISS}\"\n    jwksUri: \"{jwks_uri}\"\n    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n"
    ));
    m.push(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: secure, namespace: default}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: [/secure]}}}}]\n    from: [{{source: {{notRequestPrincipals: [\"{ISS}/*\"]}}}}]\n  - to: [{{operation: {{paths: [/secure]}}}}]\n    when: [{{key: \"request.auth.claims[groups]\", notValues: [ops]}}]\n"
    ));
    m.yaml()
}

fn claims(sub: &str, groups: &[&str]) -> Value {
    json!({"iss": ISS, "sub": sub, "exp": now() + 600, "iat": now(), "groups": groups})
}

#[tokio::test]
async fn jwt_from_a_fetched_jwks_authenticates_and_feeds_authorization() {
    let rsa = TestKey::generate(TestAlg::RS256, "r1");
    let ec = TestKey::generate(TestAlg::ES256, "e1");
    let up = Arc::new(AtomicBool::new(true));
    let keys = jwks_server(jwks(&[&rsa, &ec]), up).await;
    let backend = Backend::echo("reviews").await;
    let yaml = jwt_manifests(backend.addr, &format!("http://{}/jwks", keys.addr));
    let wp = TestWaypoint::start(&yaml).await;
    let conn = wp.connect_as("default", "sleep").await;
    let http = Mutex::new(
        TunnelHttp::open(&conn, "10.0.0.10:9080")
            .await
            .expect("tunnel"),
    );

    // The keys are fetched in the background: wait (bounded) for the first success.
    let good = rsa.sign(&claims("alice", &["ops"]));
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let first = eventually(Duration::from_secs(10), || async {
        attempts.fetch_add(1, Ordering::SeqCst);
        let r = http
            .lock()
            .await
            .send(get("/debug/headers", &bearer(&good)))
            .await
            .expect("response");
        (r.status == 200).then_some(r)
    })
    .await
    .expect("a valid token is accepted once the JWKS is fetched");
    let attempts = attempts.load(Ordering::SeqCst);
    let mut http = http.into_inner();
    let seen: Value = serde_json::from_slice(&first.body).expect("json");
    assert!(
        seen["headers"].get("authorization").is_none(),
        "token removed (forwardOriginalToken false): {seen}"
    );
    assert_eq!(seen["headers"]["x-jwt-sub"], "alice");
    wp.next_logs(attempts);

    // ES256 works too, and authorization sees the claims.
    let ops = ec.sign(&claims("bob", &["ops"]));
    assert_eq!(
        http.send(get("/secure", &bearer(&ops)))
            .await
            .unwrap()
            .status,
        200
    );
    let dev = ec.sign(&claims("carol", &["dev"]));
    let r = http.send(get("/secure", &bearer(&dev))).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (403, "RBAC: access denied".into())
    );

    // No token: passes authentication, but /secure needs a request principal.
    assert_eq!(http.send(get("/", &[])).await.unwrap().status, 200);
    assert_eq!(http.send(get("/secure", &[])).await.unwrap().status, 403);

    // Expired beyond the 60 s skew: 401 with Envoy's body and challenge.
    let expired = rsa.sign(&json!({"iss": ISS, "sub": "alice", "exp": now() - 120}));
    let r = http.send(get("/api?x=1", &bearer(&expired))).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (401, "Jwt is expired".into())
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"http://reviews:9080/api?x=1\", error=\"invalid_token\"")
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));

    // Forged signature.
    let forged = TestKey::generate(TestAlg::RS256, "r1").sign(&claims("mallory", &["ops"]));
    let r = http.send(get("/", &bearer(&forged))).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (401, "Jwt verification fails".into())
    );

    let logs = wp.next_logs(6);
    assert_eq!(logs[0]["response_code"], 200);
    assert_eq!(
        logs[1]["response_code_details"],
        "rbac_access_denied_matched_policy[ns[default]-policy[secure]-rule[1]]"
    );
    assert_eq!(
        logs[3]["response_code_details"],
        "rbac_access_denied_matched_policy[ns[default]-policy[secure]-rule[0]]"
    );
    assert_eq!(logs[4]["response_code"], 401);
    assert_eq!(
        logs[4]["response_code_details"],
        "jwt_authn_access_denied{Jwt_is_expired}"
    );
    assert_eq!(logs[4]["response_flags"], "-");
    assert_eq!(logs[4]["upstream_host"], Value::Null);
    assert_eq!(
        logs[5]["response_code_details"],
        "jwt_authn_access_denied{Jwt_verification_fails}"
    );
}

#[tokio::test]
async fn jwks_not_fetched_yet_refuses_tokens_but_not_token_less_requests() {
    let key = TestKey::generate(TestAlg::ES256, "e1");
    let up = Arc::new(AtomicBool::new(false));
    let keys = jwks_server(jwks(&[&key]), up.clone()).await;
    let backend = Backend::echo("reviews").await;
    let yaml = jwt_manifests(backend.addr, &format!("http://{}/jwks", keys.addr));
    let wp = TestWaypoint::start_with(&yaml, |c| {
        c.jwks.initial_backoff = Duration::from_millis(100);
        c.jwks.max_backoff = Duration::from_millis(200);
        c.jwks.min_retry = Duration::from_millis(50);
    })
    .await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("tunnel");
    let token = key.sign(&claims("alice", &["ops"]));
    let r = http.send(get("/", &bearer(&token))).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (401, "Jwks remote fetch is failed".into())
    );
    assert_eq!(
        wp.next_logs(1)[0]["response_code_details"],
        "jwt_authn_access_denied{Jwks_remote_fetch_is_failed}"
    );
    // Never blocks requests without a token.
    assert_eq!(http.send(get("/", &[])).await.unwrap().status, 200);
    wp.next_logs(1);
    // The fetcher retries; once the server is up the token is accepted.
    up.store(true, Ordering::SeqCst);
    let http = Mutex::new(http);
    let ok = eventually(Duration::from_secs(10), || async {
        let r = http
            .lock()
            .await
            .send(get("/", &bearer(&token)))
            .await
            .unwrap();
        (r.status == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "the token is accepted after the retry");
}

/// RequestAuthentication `fromCookies` through the real waypoint: the token in the `session`
/// cookie authenticates (and feeds authorization), a bad one is refused with Envoy's 401,
/// the cookie reaches the backend.
#[tokio::test]
async fn a_jwt_in_a_cookie_authenticates() {
    let key = TestKey::generate(TestAlg::ES256, "c1");
    let keys = jwks_server(jwks(&[&key]), Arc::new(AtomicBool::new(true))).await;
    let backend = Backend::echo("reviews").await;
    let yaml = jwt_manifests(backend.addr, &format!("http://{}/jwks", keys.addr)).replace(
        "    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]\n",
        "    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]\n    fromCookies: [session]\n",
    );
    assert!(yaml.contains("fromCookies"));
    let wp = TestWaypoint::start(&yaml).await;
    let conn = wp.connect_as("default", "sleep").await;
    let http = Mutex::new(
        TunnelHttp::open(&conn, "10.0.0.10:9080")
            .await
            .expect("tunnel"),
    );
    let token = key.sign(&claims("carol", &["ops"]));
    let cookie = vec![("cookie", format!("theme=dark; session={token}"))];
    // The key set is fetched in the background: bounded wait for the first success.
    let ok = eventually(Duration::from_secs(10), || async {
        let r = http
            .lock()
            .await
            .send(get("/secure", &cookie))
            .await
            .unwrap();
        (r.status == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "the cookie's token is accepted");
    let r = http
        .lock()
        .await
        .send(get("/debug/headers", &cookie))
        .await
        .unwrap();
    let echoed: Value = serde_json::from_slice(&r.body).expect("echo JSON");
    assert_eq!(echoed["headers"]["x-jwt-sub"], "carol");
    assert!(
        echoed["headers"]["cookie"]
            .as_str()
            .is_some_and(|c| c.contains("session=")),
        "the cookie is forwarded: {echoed}"
    );
    // A bad token in the cookie: 401 as Envoy answers it.
    let bad = vec![("cookie", "session=a.b.c".to_string())];
    let r = http.lock().await.send(get("/", &bad)).await.unwrap();
    assert_eq!(r.status, 401);
    // A bearer token is not a location any more: /secure is denied without the cookie.
    let r = http
        .lock()
        .await
        .send(get("/secure", &bearer(&token)))
        .await
        .unwrap();
    assert_eq!(r.status, 403);
}

// === CUSTOM (ext_authz) ===

/// An authorizer at `/check/...`: `x-ext-authz: allow` -> 200 with `x-user` (allowed
/// upstream) and `x-internal` (not); `deny` -> 401 `denied by authz` with `x-reason` (allowed
/// downstream) and `x-other` (not); anything else 500. Remembers the last check request.
async fn authorizer(last: Arc<std::sync::Mutex<Option<http::request::Parts>>>) -> Server {
    Server::start(move |parts| {
        let decision = parts
            .headers
            .get("x-ext-authz")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let path_ok = parts.uri.path().starts_with("/check/");
        if let Ok(mut l) = last.lock() {
            *l = Some(parts);
        }
        match (path_ok, decision.as_str()) {
            (true, "allow") => response(200, "", &[("x-user", "alice"), ("x-internal", "secret")]),
            (true, "deny") => response(
                401,
                "denied by authz",
                &[("x-reason", "no-entry"), ("x-other", "z")],
            ),
            _ => response(500, "", &[]),
        }
    })
    .await
}

/// reviews -> `backend`, Service ext-authz (port 8000) -> `authz`, a CUSTOM policy on the
/// waypoint for every path but `/public`, and a MeshConfig file with the provider.
async fn ext_authz_waypoint(
    backend: SocketAddr,
    authz: SocketAddr,
    fail_open: bool,
) -> (TestWaypoint, tempfile::TempDir) {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend])
        .service("ext-authz", "10.0.0.50", 8000, "http", &[authz]);
    m.push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: CUSTOM\n  provider: {name: my-authz}\n  rules:\n  - to: [{operation: {notPaths: [/public]}}]\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "extensionProviders:\n- name: my-authz\n  envoyExtAuthzHttp:\n    service: ext-authz.default.svc.cluster.local\n    port: 8000\n    timeout: 2s\n    pathPrefix: /check\n    failOpen: {fail_open}\n    includeRequestHeadersInCheck: [x-ext-authz]\n    headersToUpstreamOnAllow: [x-user]\n    headersToDownstreamOnDeny: [x-reason]\n"
        ),
    )
    .expect("mesh config");
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.mesh_config = Some(mesh)).await;
    (wp, dir)
}

fn with_decision(path: &str, decision: &str) -> Request<Full<Bytes>> {
    get(path, &[("x-ext-authz", decision.to_string())])
}

#[tokio::test]
async fn ext_authz_allows_and_passes_headers_upstream() {
    let last = Arc::new(std::sync::Mutex::new(None));
    let authz = authorizer(last.clone()).await;
    let backend = Backend::echo("reviews").await;
    let (wp, _dir) = ext_authz_waypoint(backend.addr, authz.addr, false).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("tunnel");
    let r = http
        .send(with_decision("/debug/headers?q=1", "allow"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let seen: Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(seen["headers"]["x-user"], "alice", "{seen}");
    assert!(seen["headers"].get("x-internal").is_none(), "{seen}");
    // The check request: pathPrefix + path with query, the original Host, the included
    // header, no body.
    let check = last.lock().unwrap().take().expect("a check request");
    assert_eq!(check.uri.path(), "/check/debug/headers");
    assert_eq!(check.uri.query(), Some("q=1"));
    assert_eq!(check.headers["host"], "reviews:9080");
    assert_eq!(check.headers["content-length"], "0");
    assert_eq!(check.method, http::Method::GET);
    // `/public` matches no CUSTOM rule: the authorizer is not asked (it would answer 500).
    assert_eq!(http.send(get("/public", &[])).await.unwrap().status, 200);
    assert!(last.lock().unwrap().is_none());
    let logs = wp.next_logs(2);
    assert_eq!(logs[0]["response_code"], 200);
    assert_eq!(logs[0]["response_flags"], "-");
}

#[tokio::test]
async fn ext_authz_denies_with_the_authorizer_status_body_and_allowed_headers() {
    let authz = authorizer(Arc::new(std::sync::Mutex::new(None))).await;
    let backend = Backend::echo("reviews").await;
    let (wp, _dir) = ext_authz_waypoint(backend.addr, authz.addr, false).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("tunnel");
    let r = http.send(with_decision("/", "deny")).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (401, "denied by authz".into())
    );
    assert_eq!(r.header("x-reason"), Some("no-entry"));
    assert_eq!(r.header("x-other"), None);
    assert_eq!(r.header("server"), Some("istio-envoy"));
    // An authorizer 5xx is an error: 403, empty body.
    let r = http.send(with_decision("/", "explode")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (403, String::new()));
    let logs = wp.next_logs(2);
    assert_eq!(logs[0]["response_code"], 401);
    assert_eq!(logs[0]["response_flags"], "UAEX");
    assert_eq!(logs[0]["response_code_details"], "ext_authz_denied");
    assert_eq!(logs[1]["response_code"], 403);
    assert_eq!(logs[1]["response_flags"], "UAEX");
    assert_eq!(logs[1]["response_code_details"], "ext_authz_error");
}

#[tokio::test]
async fn ext_authz_down_fails_closed_or_open_as_configured() {
    let backend = Backend::echo("reviews").await;
    let down = closed_port().await;
    for fail_open in [false, true] {
        let (wp, _dir) = ext_authz_waypoint(backend.addr, down, fail_open).await;
        let conn = wp.connect_as("default", "sleep").await;
        let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
            .await
            .expect("tunnel");
        let r = http.send(with_decision("/", "allow")).await.unwrap();
        let log = &wp.next_logs(1)[0];
        if fail_open {
            assert_eq!(r.status, 200, "failOpen lets the request through");
            assert_eq!(log["response_flags"], "-");
        } else {
            assert_eq!((r.status.as_u16(), r.text()), (403, String::new()));
            assert_eq!(log["response_flags"], "UAEX");
            assert_eq!(log["response_code_details"], "ext_authz_error");
        }
    }
}

#[tokio::test]
async fn custom_policy_with_an_unknown_provider_is_denied_like_istio() {
    let backend = Backend::echo("reviews").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend.addr]);
    m.push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: CUSTOM\n  provider: {name: nobody}\n  rules: [{}]\n",
    );
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
        .await
        .expect("tunnel");
    let r = http.send(get("/", &[])).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (403, "RBAC: access denied".into())
    );
    assert_eq!(
        wp.next_logs(1)[0]["response_code_details"],
        "rbac_access_denied_matched_policy[istio-ext-authz-nobody-ns[default]-policy[ext]-rule[0]-deny-due-to-bad-CUSTOM-action]"
    );
}

/// The JWKS over HTTPS, with a server certificate from the mesh CA (the waypoint trusts the
/// operating system's roots plus its mesh root for JWKS fetches).
#[tokio::test]
async fn jwks_is_fetched_over_https() {
    let pki = Arc::new(hbone::testing::Pki::new(TD).unwrap());
    let tls = pki.server_tls_for_ip("127.0.0.1".parse().unwrap()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let rsa = TestKey::generate(TestAlg::RS256, "r1");
    let body = jwks(&[&rsa]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move {
                            Ok::<_, Infallible>(response(
                                200,
                                &body,
                                &[("content-type", "application/json")],
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let backend = Backend::echo("reviews").await;
    let yaml = jwt_manifests(
        backend.addr,
        &format!("https://127.0.0.1:{}/jwks", addr.port()),
    );
    let wp = TestWaypoint::start_with_pki(&yaml, pki, |_| {}).await;
    let conn = wp.connect_as("default", "sleep").await;
    let http = Mutex::new(TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap());
    let good = rsa.sign(&claims("alice", &["ops"]));
    let ok = eventually(Duration::from_secs(10), || async {
        let r = http
            .lock()
            .await
            .send(get("/secure", &bearer(&good)))
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "a token verified with keys fetched over HTTPS is accepted"
    );
    let forged = TestKey::generate(TestAlg::RS256, "r1").sign(&claims("mallory", &["ops"]));
    let r = http
        .lock()
        .await
        .send(get("/secure", &bearer(&forged)))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    server.abort();
}
