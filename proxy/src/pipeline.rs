//! The HTTP request path inside a tunnel: a short list of named phases over one
//! [`RequestCtx`]. Ordering rules live here and only here:
//!
//! 1. **accept** (`RequestCtx::new`): the access-log record starts, `x-request-id` is
//!    generated when absent (Envoy's UUID request-id extension; an incoming one is kept).
//! 2. **validate**: HTTP/1.0 is refused with 426 (Istio's default, protocol.md 2.6); the path
//!    is normalized as Istio's default `BASE` mode does before routing.
//! 3. **route**: the Service comes from the tunnel's CONNECT authority (never from `Host`,
//!    protocol.md 2.6); its HTTPRoutes pick a rule, or the implicit `default` route applies.
//!    No rule matches: 404 `NR`.
//! 4. **authz**: the waypoint's security filters in istiod's order (protocol.md 2.8), each
//!    on the policies attached to this waypoint or Service, all before "no route" is
//!    answered (Envoy's HTTP filters run before its router):
//!    - 4a **ext_authz**: a matching CUSTOM AuthorizationPolicy calls its MeshConfig
//!      `envoyExtAuthzHttp` provider ([`crate::extauthz`]); denied: the authorizer's status
//!      and body, `UAEX`; unreachable: 403 `UAEX` unless `failOpen`; a provider that cannot
//!      be used: 403 `RBAC: access denied` as Istio's bad-CUSTOM deny rules.
//!    - 4b **jwt_authn**: RequestAuthentication (`policy::authn`, keys from
//!      [`crate::authn`]); no token passes, a bad one gets 401 (403 for the audience) with
//!      Envoy's body and `www-authenticate`.
//!    - 4c **RBAC**: AUDIT, DENY, ALLOW on the tunnel's peer identity and the verified JWT
//!      (`request.auth.*`, `requestPrincipals`); denial: 403 `RBAC: access denied`.
//! 5. **backend**: a weighted backendRef is drawn; unresolvable: 500 `NC`; all weights zero:
//!    500; no ready endpoint: 503 `UH`.
//! 6. **upstream**: least-request endpoint, pooled connection, request headers rewritten as
//!    Envoy does; connect failures are retried on other hosts by Istio's default policy
//!    (2 retries), then 503 `UF[,URX]`.
//! 7. **respond**: `server: istio-envoy`, `x-envoy-upstream-service-time`; the body streams
//!    through and the log record is emitted when it ends (or the client leaves: `DC`).
//!
//! Any phase may short-circuit with a [`ProxyError`]; [`RequestCtx::local_reply`] is the one
//! place that turns it into a response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use accesslog::AccessLogRecord;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use policy::{Backend, Cluster, ServicePort, VipLookup};
use tokio::time::Instant;

use crate::body::{LoadGuard, ResponseBody};
use crate::error::ProxyError;
use crate::extauthz::{CheckRequest, CheckResult};
use crate::logguard::PendingLog;
use crate::meshconfig::ProviderKind;
use crate::state::Shared;
use crate::tunnel::TunnelCtx;
use crate::upstream::{RequestBody, UpstreamProtocol, pick_endpoint};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static ISTIO_ENVOY: HeaderValue = HeaderValue::from_static("istio-envoy");

/// Istio's default retry policy: 2 retries (protocol.md 2.6).
const MAX_ATTEMPTS: usize = 3;

/// Per-request state carried through the phases.
pub struct RequestCtx {
    shared: Arc<Shared>,
    log: PendingLog,
    /// Headers added to whatever response goes back (ext_authz
    /// `headersToDownstreamOnAllow`).
    response_headers: Vec<(HeaderName, HeaderValue)>,
}

/// The rightmost `x-forwarded-for` entry as `ip:0`, if it is an IP.
pub fn xff_client(xff: &str) -> Option<String> {
    let last = xff.rsplit(',').next()?.trim();
    let ip: std::net::IpAddr = last.parse().ok()?;
    Some(SocketAddr::new(ip, 0).to_string())
}

/// Size of the request head as Envoy's HTTP/1 codec counts it against
/// `max_request_headers_kb`: request line, every `name: value\r\n`, and the final CRLF.
fn head_size(req: &Request<Incoming>) -> usize {
    let line = req.method().as_str().len()
        + 1
        + req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().len())
            .unwrap_or(1)
        + 11;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + headers + 2
}

/// The route decision.
struct Routed {
    cluster: Arc<Cluster>,
}

fn header_string(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

impl RequestCtx {
    /// Phase 1, accept: start the record from what the request says.
    fn new(t: &TunnelCtx, req: &mut Request<Incoming>, received: Arc<AtomicU64>) -> RequestCtx {
        let started = Instant::now();
        let headers = req.headers_mut();
        if !headers.contains_key(&X_REQUEST_ID) {
            let id = uuid::Uuid::new_v4();
            let mut buf = uuid::Uuid::encode_buffer();
            if let Ok(v) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)) {
                headers.insert(X_REQUEST_ID.clone(), v);
            }
        }
        let mut r = AccessLogRecord::new(SystemTime::now());
        r.method = Some(match req.method().as_str() {
            "GET" => "GET".into(),
            "POST" => "POST".into(),
            other => other.to_string().into(),
        });
        r.path = req.uri().path_and_query().map(|p| p.as_str().to_string());
        r.protocol = Some(match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        });
        let headers = req.headers();
        r.authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| header_string(headers, &header::HOST));
        r.user_agent = header_string(headers, &header::USER_AGENT);
        r.x_forwarded_for = header_string(headers, &X_FORWARDED_FOR);
        r.request_id = header_string(headers, &X_REQUEST_ID);
        r.downstream_local_address = Some(t.vip_str.clone());
        // use_remote_address is false on waypoints, so Envoy takes the rightmost
        // x-forwarded-for entry as the downstream address, with port 0 (envoy-observed.md 1).
        r.downstream_remote_address = Some(
            r.x_forwarded_for
                .as_deref()
                .and_then(xff_client)
                .unwrap_or_else(|| t.remote_str.clone()),
        );
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut log = PendingLog::new(r, started, received, t.shared.clone(), t.source, grpc);
        // Telemetry of the Service as the tunnel was opened (replies before routing); phase 3
        // replaces it with the current snapshot's.
        let access_log = &t.service.access_log;
        if !access_log.is_default() {
            log.set_access_log(access_log, t.principal.as_deref(), || headers.clone());
        }
        RequestCtx {
            log,
            shared: t.shared.clone(),
            response_headers: Vec::new(),
        }
    }

    fn record(&mut self) -> &mut AccessLogRecord {
        self.log
            .record()
            .expect("invariant: the record is only taken when the ctx is consumed")
    }

    /// The one place a [`ProxyError`] becomes a response (status, body, flags, details).
    fn local_reply(mut self, err: ProxyError) -> Response<ResponseBody> {
        let reply = err.local_reply();
        let r = self.record();
        r.response_code = reply.status.as_u16();
        r.response_flags = r.response_flags.union(reply.flags);
        r.response_code_details = Some(reply.details);
        r.upstream_transport_failure_reason = reply.transport_failure_reason;
        let body = Bytes::from(reply.body.into_owned());
        let mut resp = Response::new(ResponseBody::local(body.clone(), self.log));
        *resp.status_mut() = reply.status;
        let h = resp.headers_mut();
        for (name, value) in reply.headers {
            h.insert(name, value);
        }
        if !body.is_empty() && !h.contains_key(header::CONTENT_TYPE) {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        for (name, value) in self.response_headers.drain(..) {
            h.append(name, value);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        h.insert(header::SERVER, ISTIO_ENVOY.clone());
        if reply.flags.contains(accesslog::ResponseFlag::DPE) {
            // Envoy closes the downstream connection after a codec-level error reply.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// hyper service entry point for one request inside a tunnel.
pub async fn handle(
    t: Arc<TunnelCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let received = Arc::new(AtomicU64::new(0));
    let ctx = RequestCtx::new(&t, &mut req, received.clone());
    match run_phases(&t, ctx, req, received).await {
        Ok(resp) => Ok(resp),
        Err((ctx, err)) => Ok(ctx.local_reply(err)),
    }
}

/// A phase either produces the response or hands the ctx back with the error.
type PhaseResult = Result<Response<ResponseBody>, (RequestCtx, ProxyError)>;

async fn run_phases(
    t: &TunnelCtx,
    mut ctx: RequestCtx,
    req: Request<Incoming>,
    received: Arc<AtomicU64>,
) -> PhaseResult {
    // Phase 2: validate.
    if req.version() == Version::HTTP_10 {
        return Err((ctx, ProxyError::Http10));
    }
    if head_size(&req) > ctx.shared.limits.max_request_headers {
        return Err((ctx, ProxyError::HeadersTooLarge));
    }
    let path = req.uri().path();
    let normalized = match policy::normalize_path(path) {
        Ok(p) => p.into_owned(),
        Err(()) => return Err((ctx, ProxyError::BadPath)),
    };

    // Phase 3: route. One snapshot per request; the Service comes from the tunnel.
    let snapshot = ctx.shared.snapshot.load_full();
    let service: Arc<ServicePort> = match snapshot.lookup_vip(t.vip) {
        VipLookup::Bound(sp) => sp,
        // Unbound by a reload while the tunnel is open: finish on the config it was opened
        // with, as Envoy drains a removed filter chain.
        _ => t.service.clone(),
    };
    if !service.access_log.is_default() || !t.service.access_log.is_default() {
        ctx.log
            .set_access_log(&service.access_log, t.principal.as_deref(), || {
                req.headers().clone()
            });
    }
    // The route is resolved before authorization so a denied request is still logged with
    // its route and cluster, as Envoy's RBAC filter logs the cached route (protocol.md 3.4).
    let routed = route(&service, &req, &normalized);
    if let Ok((name, backend)) = &routed {
        ctx.record().route_name = Some(name.clone());
        if let Some(Backend::Cluster(c)) = backend {
            ctx.log.set_cluster(c.clone());
        }
    }

    // Phase 4: authz: ext_authz (CUSTOM), jwt_authn, RBAC, in istiod's filter order.
    let mut req = req;
    if !service.authz.is_empty() || !service.authn.is_empty() {
        let host = ctx.record().authority.clone().unwrap_or_default();
        let remote_ip = ctx
            .record()
            .downstream_remote_address
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip());
        let shared = ctx.shared.clone();
        // 4a: ext_authz. Only a matching CUSTOM rule calls the provider (Istio enables the
        // ext_authz filter from its shadow RBAC rules).
        if !service.authz.is_empty()
            && let Some(m) = policy::custom_match(
                &service.authz,
                &authz_request(t, remote_ip, &req, &normalized, &host, None),
            )
        {
            let provider = shared.mesh.provider(&m.provider).map(|p| &p.kind);
            let http_provider = match provider {
                Some(ProviderKind::ExtAuthzHttp(h)) if !m.conflicting_providers => h,
                _ => {
                    tracing::warn!(provider = %m.provider, policy = %m.policy, "CUSTOM policy names no usable extension provider; denying as Istio does");
                    let d = m.bad_provider_denial();
                    return Err((ctx, ProxyError::RbacDenied { details: d.details }));
                }
            };
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            let cluster = snapshot.extension_cluster(&http_provider.service, http_provider.port);
            let result = shared
                .ext_authz
                .check(
                    http_provider,
                    cluster.as_ref(),
                    &CheckRequest {
                        method: req.method(),
                        path_and_query: &pq,
                        authority: &host,
                        headers: req.headers(),
                    },
                )
                .await;
            match result {
                CheckResult::Allowed {
                    upstream_set,
                    upstream_remove,
                    downstream_add,
                } => {
                    let h = req.headers_mut();
                    for (name, value) in upstream_set {
                        h.insert(name, value);
                    }
                    for name in upstream_remove {
                        h.remove(name);
                    }
                    ctx.response_headers.extend(downstream_add);
                }
                CheckResult::Denied {
                    status,
                    body,
                    headers,
                } => {
                    return Err((
                        ctx,
                        ProxyError::ExtAuthzDenied {
                            status,
                            body,
                            headers,
                        },
                    ));
                }
                CheckResult::Error(reason) if http_provider.fail_open => {
                    tracing::warn!(provider = %m.provider, "ext_authz failed, failOpen lets the request through: {reason}");
                }
                CheckResult::Error(reason) => {
                    tracing::warn!(provider = %m.provider, "ext_authz failed: {reason}");
                    return Err((
                        ctx,
                        ProxyError::ExtAuthzError {
                            status: http_provider.status_on_error,
                        },
                    ));
                }
            }
        }

        // 4b: jwt_authn. Requests without a token pass with no request principal.
        let mut verified = None;
        if !service.authn.is_empty() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let lookup = |r: &policy::JwksRef| shared.jwks.get(r);
            match policy::authenticate(&service.authn, req.headers_mut(), &pq, now, &lookup) {
                Ok(a) => {
                    if let Some(new_pq) = a.path
                        && let Ok(uri) = replace_path_and_query(req.uri(), &new_pq)
                    {
                        *req.uri_mut() = uri;
                    }
                    verified = a.verified;
                }
                Err(status) => {
                    let realm = jwt_realm(req.headers(), &host, &pq);
                    return Err((ctx, ProxyError::JwtDenied { status, realm }));
                }
            }
        }

        // 4c: RBAC.
        if !service.authz.is_empty() {
            let decision = policy::evaluate_rbac(
                &service.authz,
                &authz_request(t, remote_ip, &req, &normalized, &host, verified.as_ref()),
            );
            if let Some(dry) = &decision.dry_run {
                tracing::debug!(allowed = dry.allowed, policy = ?dry.matched_policy, "dry-run authorization result");
            }
            if !decision.allowed {
                return Err((
                    ctx,
                    ProxyError::RbacDenied {
                        details: decision.details,
                    },
                ));
            }
        }
    }

    let routed = match routed {
        Ok((_, Some(Backend::Cluster(c)))) => Routed { cluster: c },
        Ok((_, Some(Backend::Invalid { .. }))) => return Err((ctx, ProxyError::ClusterNotFound)),
        Ok((_, None)) => return Err((ctx, ProxyError::NoBackendWeight)),
        Err(e) => return Err((ctx, e)),
    };

    // Phase 5: backend.
    if routed.cluster.endpoints.is_empty() {
        return Err((ctx, ProxyError::NoHealthyUpstream));
    }

    // Phase 6: upstream.
    let proto = match routed.cluster.protocol {
        policy::AppProtocol::Http2 | policy::AppProtocol::Grpc => UpstreamProtocol::Http2,
        policy::AppProtocol::Unknown if req.version() == Version::HTTP_2 => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Http1,
    };
    let (parts, body) = req.into_parts();
    let mut upstream_req = Request::from_parts(parts, RequestBody::new(body, received));
    prepare_request(&mut upstream_req, proto);

    let mut tried: Vec<SocketAddr> = Vec::with_capacity(MAX_ATTEMPTS);
    let mut attempts = 0;
    let mut stale_retries = 0;
    let upstream_started = Instant::now();
    loop {
        let Some(endpoint) =
            pick_endpoint(&routed.cluster.endpoints, &tried, rand::random::<u64>())
        else {
            return Err((ctx, ProxyError::NoHealthyUpstream));
        };
        let addr = endpoint.addr;
        if stale_retries == 0 {
            attempts += 1;
        }
        // Istio renders HBONE endpoints as `envoy://connect_originate/<ip>:<port>`.
        ctx.record().upstream_host = Some(if endpoint.tunnel.is_some() {
            format!("envoy://connect_originate/{addr}")
        } else {
            addr.to_string()
        });
        let checkout = match ctx.shared.upstreams.checkout(endpoint, proto).await {
            Ok(c) => c,
            Err(failure) => {
                tried.push(addr);
                if failure.retriable() && attempts < MAX_ATTEMPTS {
                    continue;
                }
                let retried = attempts > 1;
                return Err((ctx, ProxyError::Upstream { failure, retried }));
            }
        };
        ctx.record().upstream_local_address = Some(match checkout.local_addr {
            Some(a) => a.to_string(),
            None => "envoy://internal_client_address/".to_string(),
        });
        endpoint.load.inc();
        let load = LoadGuard(endpoint.load.clone());
        match checkout.send(upstream_req).await {
            Ok((resp, pool)) => {
                let service_time = upstream_started.elapsed().as_millis() as u64;
                return Ok(respond(ctx, resp, pool, load, service_time));
            }
            Err(e) => {
                drop(load);
                match e.request {
                    // Not sent on a *reused* connection the upstream had just closed: try
                    // again on a fresh connection, without spending a retry. (A fresh
                    // connection that fails is a real failure: Envoy does not retry it.)
                    Some(r) if e.reused && stale_retries < 2 => {
                        upstream_req = r;
                        stale_retries += 1;
                        continue;
                    }
                    Some(r) if e.failure.retriable() && attempts < MAX_ATTEMPTS => {
                        upstream_req = r;
                        tried.push(addr);
                        stale_retries = 0;
                        continue;
                    }
                    _ => {
                        let retried = attempts > 1;
                        return Err((
                            ctx,
                            ProxyError::Upstream {
                                failure: e.failure,
                                retried,
                            },
                        ));
                    }
                }
            }
        }
    }
}

/// What AuthorizationPolicy sees of a request: the tunnel's peer identity and addresses, the
/// HTTP attributes, and the verified JWT (Envoy `jwt_authn` metadata) if any.
fn authz_request<'a>(
    t: &'a TunnelCtx,
    remote_ip: Option<std::net::IpAddr>,
    req: &'a Request<Incoming>,
    normalized_path: &'a str,
    host: &'a str,
    verified: Option<&'a policy::Authenticated>,
) -> policy::AuthzRequest<'a> {
    policy::AuthzRequest {
        source_principal: t.principal.as_deref(),
        source_ip: Some(t.peer.remote.ip()),
        remote_ip,
        dest_ip: Some(t.vip.ip()),
        dest_port: t.vip.port(),
        http: Some(policy::HttpAttrs {
            method: req.method().as_str(),
            path: normalized_path,
            host,
            headers: req.headers(),
            request_principal: verified.map(|v| v.principal.as_str()),
            request_auth: verified.map(|v| &v.claims),
        }),
    }
}

/// Envoy `buildOriginalUri` for the `www-authenticate` realm of a JWT failure:
/// `<x-forwarded-proto>://<host><path>`, the path with its query, cut at 256 bytes. The HCM
/// sets `x-forwarded-proto: http` before the filters when the client sent none.
fn jwt_realm(headers: &HeaderMap, host: &str, path_and_query: &str) -> String {
    let proto = headers
        .get(&X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    let mut end = path_and_query.len().min(256);
    while !path_and_query.is_char_boundary(end) {
        end -= 1;
    }
    format!("{proto}://{host}{}", &path_and_query[..end])
}

/// The URI with a new `path?query` (after jwt_authn removed a token parameter).
fn replace_path_and_query(uri: &http::Uri, pq: &str) -> Result<http::Uri, http::Error> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

/// Phase 3: pick the rule (or the implicit default route) and draw a backend.
/// Returns the route name and the backend (`None` = every weight is zero).
fn route(
    service: &ServicePort,
    req: &Request<Incoming>,
    normalized_path: &str,
) -> Result<(Arc<str>, Option<Backend>), ProxyError> {
    let Some(table) = &service.routes else {
        // No HTTPRoute: istiod's implicit route `default` to the Service's own cluster.
        return Ok((
            default_route_name(),
            Some(Backend::Cluster(service.cluster.clone())),
        ));
    };
    let rule = table
        .select(
            req.method(),
            normalized_path,
            req.uri().query(),
            req.headers(),
        )
        .ok_or(ProxyError::RouteNotFound)?;
    let backend = rule
        .backends
        .pick(rand::random::<u64>())
        .map(|b| b.backend.clone());
    Ok((rule.name.clone(), backend))
}

fn default_route_name() -> Arc<str> {
    static DEFAULT: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| Arc::from("default")).clone()
}

/// Request headers as Envoy's waypoint forwards them (protocol.md 2.8, 8): hop-by-hop headers
/// removed, `x-forwarded-proto: http` when absent, `x-forwarded-client-cert` stripped
/// (SANITIZE), `x-forwarded-for` neither appended to nor stripped (use_remote_address false).
fn prepare_request(req: &mut Request<RequestBody>, proto: UpstreamProtocol) {
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    h.remove(&X_FORWARDED_CLIENT_CERT);
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    match proto {
        UpstreamProtocol::Http1 => {
            // An h2c downstream carries the authority in the URI; HTTP/1.1 needs `Host`.
            if !h.contains_key(header::HOST)
                && let Some(a) = authority
                    .as_deref()
                    .and_then(|a| HeaderValue::from_str(a).ok())
            {
                h.insert(header::HOST, a);
            }
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(pq);
            *req.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::Http2 => {
            let host = authority
                .or_else(|| {
                    h.get(header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "localhost".to_string());
            h.remove(header::HOST);
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            if let Ok(uri) = http::Uri::builder()
                .scheme("http")
                .authority(host)
                .path_and_query(pq)
                .build()
            {
                *req.uri_mut() = uri;
            }
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

/// RFC 9110 7.6.1 connection-specific headers, plus those named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            let name = name.trim();
            if !name.is_empty()
                && !name.eq_ignore_ascii_case("close")
                && !name.eq_ignore_ascii_case("keep-alive")
            {
                h.remove(name);
            }
        }
    }
    h.remove(header::CONNECTION);
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
    if let Some(te) = h.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        h.remove(header::TE);
    }
}

/// Phase 7: respond with the upstream's response.
fn respond(
    mut ctx: RequestCtx,
    resp: Response<Incoming>,
    pool: Option<crate::upstream::PoolReturn>,
    load: LoadGuard,
    service_time_ms: u64,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::SERVER, ISTIO_ENVOY.clone());
    parts.headers.insert(
        X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
        HeaderValue::from(service_time_ms),
    );
    parts.version = Version::default();
    if ctx
        .shared
        .draining
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        // Drain: the client learns on this response that the connection ends after it
        // (HTTP/1.1; hyper drops the header for h2c, which gets GOAWAY instead).
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    for (name, value) in ctx.response_headers.drain(..) {
        parts.headers.append(name, value);
    }
    let r = ctx.record();
    r.response_code = parts.status.as_u16();
    r.response_code_details = Some("via_upstream".into());
    r.upstream_service_time = Some(service_time_ms.to_string());
    Response::from_parts(parts, ResponseBody::upstream(body, ctx.log, pool, load))
}
