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
//! 5. **backend**: a `RequestRedirect` rule answers here (Envoy route redirect); else a
//!    weighted backendRef is drawn; unresolvable: 500 `NC`; all weights zero: 500; no ready
//!    endpoint: 503 `UH`.
//! 6. **upstream**: filters (backendRef then rule header modifiers, `URLRewrite`), mirrors
//!    (fire and forget), least-request endpoint, pooled connection, request headers rewritten
//!    as Envoy does; the route's retry policy (Istio's default: 2 retries on connect failure,
//!    refused stream, gRPC unavailable/cancelled, listed codes; other hosts preferred; bodies
//!    replayed only from the 64 KiB buffer), route and per-try timeouts (504 `UT`).
//! 7. **respond**: `ResponseHeaderModifier`s, `server: istio-envoy`,
//!    `x-envoy-upstream-service-time`; the body streams
//!    through and the log record is emitted when it ends (or the client leaves: `DC`).
//!
//! Any phase may short-circuit with a [`ProxyError`]; [`RequestCtx::local_reply`] is the one
//! place that turns it into a response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use accesslog::AccessLogRecord;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use policy::{
    Backend, Cluster, Filters, PathMatch, Redirect, RetryPolicy, RouteRule, ServicePort, VipLookup,
};
use tokio::time::Instant;

use crate::body::{LoadGuard, ResponseBody};
use crate::error::ProxyError;
use crate::extauthz::{CheckRequest, CheckResult};
use crate::logguard::PendingLog;
use crate::meshconfig::ProviderKind;
use crate::state::Shared;
use crate::tunnel::{InnerCounters, TunnelCtx};
use crate::upstream::{BodyProgress, RequestBody, RetryBuffer, UpstreamProtocol, pick_endpoint};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static ISTIO_ENVOY: HeaderValue = HeaderValue::from_static("istio-envoy");

static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// How much of a request body is kept for retries (and mirrors). Envoy keeps what it sent
/// upstream for retries up to its buffer limit and stops retrying beyond it; ours is 64 KiB.
/// A body that was streamed upstream and did not fit is never replayed.
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// A mirror copy's time limit when neither a route timeout nor the upstream response timeout
/// bounds it (`--upstream-response-timeout 0s`).
const MIRROR_TIMEOUT_CAP: std::time::Duration = std::time::Duration::from_secs(300);

/// Envoy's retry back-off ceiling: 10 x the base interval.
const BACKOFF_MAX_FACTOR: u32 = 10;

/// Per-request state carried through the phases.
pub struct RequestCtx {
    shared: Arc<Shared>,
    log: PendingLog,
    /// Headers added to whatever response goes back (ext_authz
    /// `headersToDownstreamOnAllow`).
    response_headers: Vec<(HeaderName, HeaderValue)>,
    /// `content-type: application/grpc*`: local replies go out as gRPC status.
    grpc: bool,
    /// Set once the router phase owns the request: the ResponseHeaderModifiers (backendRef,
    /// then rule) that Envoy's router also applies to its own local replies (redirects, 5xx,
    /// timeouts) through `finalizeResponseHeaders`. Replies of earlier filters (RBAC, JWT,
    /// 404) never get them.
    route_response: Vec<policy::HeaderModifier>,
    /// A WebSocket upgrade request: where a `101` hands the session to the inner connection.
    upgrade: Option<Arc<InnerCounters>>,
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

/// The route decision (phase 3).
struct Selected {
    name: Arc<str>,
    /// `None` = istiod's implicit `default` route.
    rule: Option<Arc<RouteRule>>,
    /// The PathPrefix value of the winning match (URLRewrite/RequestRedirect
    /// `ReplacePrefixMatch` replace exactly this).
    prefix: Option<String>,
    /// The drawn backend and its backendRef-level filters; `None` = every weight is zero.
    backend: Option<(Backend, Option<Arc<Filters>>)>,
}

fn header_string(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

impl RequestCtx {
    /// Phase 1, accept: start the record from what the request says.
    fn new(t: &TunnelCtx, req: &mut Request<Incoming>, received: Arc<BodyProgress>) -> RequestCtx {
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
        r.downstream_local_address = Some(t.service.vip_text.clone());
        // use_remote_address is false on waypoints, so Envoy takes the rightmost
        // x-forwarded-for entry as the downstream address, with port 0 (envoy-observed.md 1).
        r.downstream_remote_address = Some(
            r.x_forwarded_for
                .as_deref()
                .and_then(xff_client)
                .unwrap_or_else(|| t.remote_str().to_string()),
        );
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut log = PendingLog::new(r, started, received, t.shared.clone(), t.source, grpc);
        // Telemetry of the Service as the tunnel was opened (replies before routing); phase 3
        // replaces it with the current snapshot's.
        let access_log = &t.service.access_log;
        if !access_log.is_default() {
            log.set_access_log(access_log, t.principal(), || headers.clone());
        }
        RequestCtx {
            log,
            shared: t.shared.clone(),
            response_headers: Vec::new(),
            grpc,
            route_response: Vec::new(),
            upgrade: None,
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
        if self.grpc {
            return self.grpc_local_reply(reply);
        }
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
        for m in &self.route_response {
            m.apply(h);
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

impl RequestCtx {
    /// A local reply to a gRPC request, as Envoy's `sendLocalReply` sends it when
    /// `is_grpc_request`: a trailers-only response (`:status 200`, `content-type:
    /// application/grpc`, `grpc-status` from `httpToGrpcStatus`, the body as `grpc-message`),
    /// no body. Logged with the status on the wire (200); details and flags as for HTTP.
    fn grpc_local_reply(mut self, reply: crate::error::LocalReply) -> Response<ResponseBody> {
        let grpc_status = crate::error::grpc_status_for(reply.status);
        let r = self.record();
        r.response_code = 200;
        r.response_flags = r.response_flags.union(reply.flags);
        r.response_code_details = Some(reply.details);
        r.upstream_transport_failure_reason = reply.transport_failure_reason;
        let mut resp = Response::new(ResponseBody::local(Bytes::new(), self.log));
        let h = resp.headers_mut();
        for (name, value) in reply.headers {
            h.insert(name, value);
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            GRPC_STATUS.clone(),
            HeaderValue::from(u16::from(grpc_status)),
        );
        if !reply.body.is_empty()
            && let Ok(v) = HeaderValue::from_str(&crate::error::grpc_message(&reply.body))
        {
            h.insert(GRPC_MESSAGE.clone(), v);
        }
        for m in &self.route_response {
            m.apply(h);
        }
        for (name, value) in self.response_headers.drain(..) {
            h.append(name, value);
        }
        h.insert(header::SERVER, ISTIO_ENVOY.clone());
        resp
    }
}

/// hyper service entry point for one request inside a tunnel.
pub async fn handle(
    t: Arc<TunnelCtx>,
    mut req: Request<Incoming>,
    conn: Arc<InnerCounters>,
) -> Result<Response<ResponseBody>, Infallible> {
    let received = Arc::new(BodyProgress::default());
    let ctx = RequestCtx::new(&t, &mut req, received.clone());
    match run_phases(&t, ctx, req, received, conn).await {
        Ok(resp) => Ok(resp),
        Err((ctx, err)) => Ok(ctx.local_reply(err)),
    }
}

/// A phase either produces the response or hands the ctx back with the error.
type PhaseResult = Result<Response<ResponseBody>, (RequestCtx, ProxyError)>;

async fn run_phases(
    t: &TunnelCtx,
    mut ctx: RequestCtx,
    mut req: Request<Incoming>,
    received: Arc<BodyProgress>,
    conn: Arc<InnerCounters>,
) -> PhaseResult {
    // Overload (Envoy's overload manager): shed instead of queueing without bound when too
    // many requests are in flight or resident memory is above the ceiling.
    let shared = ctx.shared.clone();
    let n = shared
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.log.hold(crate::state::InFlight(shared.clone()));
    if n >= shared.limits.max_requests
        || shared
            .memory_pressure
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        shared
            .shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err((ctx, ProxyError::Overloaded));
    }

    // Phase 2: validate.
    if req.version() == Version::HTTP_10 {
        return Err((ctx, ProxyError::Http10));
    }
    if head_size(&req) > ctx.shared.limits.max_request_headers {
        return Err((ctx, ProxyError::HeadersTooLarge));
    }
    // What hyper accepts and Envoy's codec refuses (missing Host, repeated Content-Length,
    // Content-Length with Transfer-Encoding, unknown methods, `OPTIONS *`).
    let framing = conn.head_framing.load(std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = crate::codec::check_request(
        req.method(),
        req.version(),
        req.uri().path(),
        req.headers(),
        framing,
    ) {
        return Err((ctx, e));
    }
    // MeshConfig pathNormalization (default BASE): the normalized path is used for routing
    // and authorization and is what the backend receives (policy.md 1.8).
    let normalized =
        match policy::normalize_path_with(req.uri().path(), ctx.shared.mesh.path_normalization) {
            Ok(p) => p.into_owned(),
            Err(()) => return Err((ctx, ProxyError::BadPath)),
        };
    if normalized != req.uri().path() {
        let pq = match req.uri().query() {
            Some(q) => format!("{normalized}?{q}"),
            None => normalized.clone(),
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = http::uri::PathAndQuery::try_from(pq) {
            // Envoy normalizes `:path` in place, so its log shows the normalized path.
            ctx.record().path = Some(pq.as_str().to_string());
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }

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
            .set_access_log(&service.access_log, t.principal(), || req.headers().clone());
    }
    // The route is resolved before authorization so a denied request is still logged with
    // its route and cluster, as Envoy's RBAC filter logs the cached route (protocol.md 3.4).
    let routed = route(&service, &req, &normalized);
    if let Ok(sel) = &routed {
        ctx.record().route_name = Some(sel.name.clone());
        if let Some((Backend::Cluster(c), _)) = &sel.backend {
            ctx.log.set_cluster(c.clone());
        }
    }

    // Upgrades are decided when Envoy's HCM builds the filter chain: after the route is
    // cached, before any filter runs. `websocket` is the one istiod enables; the codec drops an
    // `h2c` upgrade (served as a plain request, its headers stripped as hop-by-hop); any other
    // is refused.
    if req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has_upgrade(req.headers())
    {
        if websocket_upgrade(req.headers()) {
            ctx.upgrade = Some(conn);
        } else if !req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c"))
        {
            return Err((ctx, ProxyError::UpgradeFailed));
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
            // Boxed: only requests under a CUSTOM policy carry the authorizer call's future.
            let result = Box::pin(shared.ext_authz.check(
                http_provider,
                cluster.as_ref(),
                &CheckRequest {
                    method: req.method(),
                    path_and_query: &pq,
                    authority: &host,
                    headers: req.headers(),
                },
            ))
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

    // Phase 5: backend (Envoy's router: redirect, then the weighted cluster).
    let sel = match routed {
        Ok(sel) => sel,
        Err(e) => return Err((ctx, e)),
    };
    let rule = sel.rule.clone();
    ctx.route_response = sel
        .backend
        .as_ref()
        .and_then(|(_, f)| f.as_ref())
        .and_then(|f| f.response_headers.clone())
        .into_iter()
        .chain(
            rule.as_ref()
                .and_then(|r| r.filters.response_headers.clone()),
        )
        .collect();
    if let Some(redirect) = rule.as_ref().and_then(|r| r.filters.redirect.as_ref()) {
        let location = redirect_location(
            redirect,
            &req,
            &normalized,
            t.vip.port(),
            sel.prefix.as_deref(),
        );
        let status = http::StatusCode::from_u16(redirect.status).unwrap_or(http::StatusCode::FOUND);
        return Err((ctx, ProxyError::Redirect { status, location }));
    }
    let (cluster, backend_filters) = match sel.backend {
        Some((Backend::Cluster(c), f)) => (c, f),
        Some((Backend::Invalid { .. }, _)) => return Err((ctx, ProxyError::ClusterNotFound)),
        None => return Err((ctx, ProxyError::NoBackendWeight)),
    };
    if cluster.endpoints.is_empty() {
        return Err((ctx, ProxyError::NoHealthyUpstream));
    }

    // Phase 6: upstream. Filters first, in Envoy's order: backendRef (weighted cluster)
    // header mutations, then the rule's (a rule-level `set` wins over a backend-level one, as
    // with Envoy's default `most_specific_header_mutations_wins: false`); URLRewrite.
    let proto = match cluster.protocol {
        policy::AppProtocol::Http2 | policy::AppProtocol::Grpc => UpstreamProtocol::Http2,
        policy::AppProtocol::Unknown if req.version() == Version::HTTP_2 => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Http1,
    };
    let (mut parts, body) = req.into_parts();
    if let Some(m) = backend_filters
        .as_ref()
        .and_then(|f| f.request_headers.as_ref())
    {
        m.apply(&mut parts.headers);
    }
    if let Some(rule) = &rule {
        if let Some(m) = &rule.filters.request_headers {
            m.apply(&mut parts.headers);
        }
        if let Some(rw) = &rule.filters.rewrite {
            if let Some(host) = &rw.hostname {
                set_authority(&mut parts, host);
            }
            if let Some(pm) = &rw.path {
                let original = parts.uri.path_and_query().map(|p| p.as_str().to_string());
                let mut pq = pm.apply(&normalized, sel.prefix.as_deref());
                if let Some(q) = parts.uri.query() {
                    pq.push('?');
                    pq.push_str(q);
                }
                if let Ok(uri) = replace_path_and_query(&parts.uri, &pq) {
                    parts.uri = uri;
                    // Envoy records the pre-rewrite path (router `finalizePathHeader`,
                    // Envoy headers not suppressed in Istio).
                    if let Some(v) = original.and_then(|o| HeaderValue::from_str(&o).ok()) {
                        parts.headers.insert(X_ENVOY_ORIGINAL_PATH.clone(), v);
                    }
                }
            }
        }
    }
    let mirrors: Vec<policy::Mirror> = rule
        .iter()
        .flat_map(|r| r.filters.mirrors.iter())
        .chain(backend_filters.iter().flat_map(|f| f.mirrors.iter()))
        .filter(|m| m.sampled(rand::random::<u64>()))
        .cloned()
        .collect();
    let mirror_head = (!mirrors.is_empty()).then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    // The implicit default route carries Istio's default retry policy.
    let policy: Option<RetryPolicy> = match &rule {
        Some(r) => r.retry.clone(),
        None => Some(RetryPolicy::default()),
    };
    let max_attempts = policy.as_ref().map_or(1, |p| p.retries.saturating_add(1));
    let mut upstream_req = Request::from_parts(parts, RequestBody::new(body, received.clone()));
    prepare_request(&mut upstream_req, proto);
    let buffered = max_attempts > 1 || mirror_head.is_some();
    let retry_buf = if buffered {
        let (parts, body) = upstream_req.into_parts();
        let (body, buf) = body.with_retry_buffer(RETRY_BUFFER_LIMIT);
        upstream_req = Request::from_parts(parts, body);
        Some(buf)
    } else {
        None
    };
    let _mirror = mirror_head.map(|(method, uri, headers)| MirrorJob {
        shared: ctx.shared.clone(),
        mirrors,
        method,
        uri,
        headers,
        body: retry_buf.clone(),
        timeout: rule
            .as_ref()
            .and_then(|r| r.request_timeout)
            .or(ctx.shared.limits.upstream_response_timeout)
            .unwrap_or(MIRROR_TIMEOUT_CAP),
    });
    let head = (max_attempts > 1).then(|| clone_head(&upstream_req));
    let retry_codes: &[u16] = policy.as_ref().map_or(&[], |p| &p.codes);

    let upstream_started = Instant::now();
    // The route's request timeout (HTTPRoute `timeouts.request`), else this waypoint's
    // default response timeout (300 s; Istio's default is none): a backend that never
    // answers is released with 504 UT.
    let deadline = rule
        .as_ref()
        .and_then(|r| r.request_timeout)
        .or(ctx.shared.limits.upstream_response_timeout)
        .map(|d| upstream_started + d);
    let route_deadline = rule
        .as_ref()
        .and_then(|r| r.request_timeout)
        .map(|d| upstream_started + d);
    let per_try = rule.as_ref().and_then(|r| r.per_try_timeout);
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(max_attempts as usize);
    let mut attempts = Attempts::new(max_attempts);
    let retry_backoff = policy.as_ref().map(|p| p.backoff);
    loop {
        let Some(endpoint) = pick_endpoint(&cluster.endpoints, &tried, rand::random::<u64>())
        else {
            return Err((ctx, ProxyError::NoHealthyUpstream));
        };
        let addr = endpoint.addr;
        attempts.start();
        // Istio renders HBONE endpoints as `envoy://connect_originate/<ip>:<port>`.
        ctx.record().upstream_host = Some(if endpoint.tunnel.is_some() {
            format!("envoy://connect_originate/{addr}")
        } else {
            addr.to_string()
        });
        let checkout = match until(deadline, ctx.shared.upstreams.checkout(endpoint, proto)).await {
            None => return Err((ctx, ProxyError::Timeout { per_try: false })),
            Some(Ok(c)) => c,
            Some(Err(failure)) => {
                tried.push(addr);
                if failure.retriable() && policy.is_some() && attempts.may_retry() {
                    if !back_off(deadline, retry_backoff, attempts.count).await {
                        return Err((ctx, ProxyError::Timeout { per_try: false }));
                    }
                    continue;
                }
                let retry_limit = failure.retriable() && policy.is_some();
                let retried = attempts.count > 1;
                return Err((
                    ctx,
                    ProxyError::Upstream {
                        failure,
                        retried,
                        retry_limit,
                    },
                ));
            }
        };
        ctx.record().upstream_local_address = Some(match checkout.local_addr {
            Some(a) => a.to_string(),
            None => "envoy://internal_client_address/".to_string(),
        });
        endpoint.load.inc();
        let load = LoadGuard(endpoint.load.clone());
        let try_deadline = per_try.map(|d| Instant::now() + d);
        let (limit, per_try_first) = match (deadline, try_deadline) {
            (Some(a), Some(b)) if b < a => (Some(b), true),
            (None, Some(b)) => (Some(b), true),
            (a, _) => (a, false),
        };
        let sent = match until(limit, checkout.send(upstream_req)).await {
            Some(r) => r,
            None => {
                return Err((
                    ctx,
                    ProxyError::Timeout {
                        per_try: per_try_first,
                    },
                ));
            }
        };
        match sent {
            Ok((resp, pool)) => {
                let retriable = retriable_response(&resp, retry_codes) && policy.is_some();
                if retriable
                    && attempts.may_retry()
                    && let (Some(head), Some(body)) =
                        (&head, retry_buf.as_ref().and_then(RetryBuffer::replay))
                {
                    // Envoy retries a retriable response and throws it away.
                    drop((resp, pool, load));
                    tried.push(addr);
                    upstream_req = rebuild(head, body);
                    if !back_off(deadline, retry_backoff, attempts.count).await {
                        return Err((ctx, ProxyError::Timeout { per_try: false }));
                    }
                    continue;
                }
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS && ctx.upgrade.is_none() {
                    // A 101 to a request that asked for no upgrade cannot be forwarded.
                    return Err((
                        ctx,
                        ProxyError::Upstream {
                            failure: crate::error::UpstreamFailure::Protocol,
                            retried: attempts.count > 1,
                            retry_limit: false,
                        },
                    ));
                }
                if retriable {
                    // The last response is forwarded, flagged as the retry limit (envoy-observed 2d).
                    ctx.record()
                        .response_flags
                        .set(accesslog::ResponseFlag::URX);
                }
                let service_time = upstream_started.elapsed().as_millis() as u64;
                let resp_filters = (backend_filters, rule);
                let resp = respond(ctx, resp, pool, load, service_time, resp_filters);
                // Only the route's `timeouts.request` covers the body, as Envoy's route timeout
                // does; `--upstream-response-timeout` bounds the wait for response headers
                // and never cuts a body that keeps flowing (SSE, gRPC streams, downloads).
                return Ok(resp.map(|b| b.with_deadline(route_deadline)));
            }
            Err(e) => {
                drop(load);
                let can_retry = e.failure.retriable() && policy.is_some() && attempts.may_retry();
                match e.request {
                    // Not sent on a *reused* connection the upstream had just closed: try
                    // again on a fresh connection, without spending a retry. (A fresh
                    // connection that fails is a real failure: Envoy does not retry it.)
                    Some(r) if e.reused && attempts.resend_unsent() => {
                        upstream_req = r;
                        continue;
                    }
                    Some(r) if can_retry => {
                        upstream_req = r;
                    }
                    // The request went out: only a body we still hold whole can go again.
                    None if can_retry
                        && let (Some(head), Some(body)) =
                            (&head, retry_buf.as_ref().and_then(RetryBuffer::replay)) =>
                    {
                        upstream_req = rebuild(head, body);
                    }
                    _ if received.failed() => {
                        // The client's body broke its framing mid-request: Envoy's codec
                        // answers that (400 `http1.codec_error`), not the upstream reset it
                        // caused.
                        return Err((
                            ctx,
                            ProxyError::Codec {
                                status: http::StatusCode::BAD_REQUEST,
                                details: "http1.codec_error",
                            },
                        ));
                    }
                    _ => {
                        let retry_limit = e.failure.retriable() && policy.is_some();
                        let retried = attempts.count > 1;
                        return Err((
                            ctx,
                            ProxyError::Upstream {
                                failure: e.failure,
                                retried,
                                retry_limit,
                            },
                        ));
                    }
                }
                tried.push(addr);
                if !back_off(deadline, retry_backoff, attempts.count).await {
                    return Err((ctx, ProxyError::Timeout { per_try: false }));
                }
            }
        }
    }
}

/// The attempts of one request against the route's retry budget. Every attempt counts,
/// whatever failed before it, except a resend of a request that never left: one that was
/// not sent on a pooled connection the upstream had just closed goes again on a fresh
/// connection without spending a retry, at most [`Attempts::FREE_RESENDS`] times per request.
#[derive(Debug)]
struct Attempts {
    /// Attempts started that count against the budget.
    count: u32,
    max: u32,
    free_resends: u32,
    /// The next attempt is a free resend.
    resend: bool,
}

impl Attempts {
    const FREE_RESENDS: u32 = 2;

    fn new(max: u32) -> Attempts {
        Attempts {
            count: 0,
            max,
            free_resends: 0,
            resend: false,
        }
    }

    /// An attempt begins.
    fn start(&mut self) {
        if !std::mem::take(&mut self.resend) {
            self.count += 1;
        }
    }

    /// Another attempt fits in the budget.
    fn may_retry(&self) -> bool {
        self.count < self.max
    }

    /// The last attempt's request never left: resend it for free if the allowance lasts.
    fn resend_unsent(&mut self) -> bool {
        if self.free_resends >= Self::FREE_RESENDS {
            return false;
        }
        self.free_resends += 1;
        self.resend = true;
        true
    }
}

/// Envoy's retry back-off before retry `n` (1-based): a random wait in
/// `[0, base * 2^(n-1))`, the window capped at 10 x base (`BACKOFF_MAX_FACTOR`). `false` when
/// the route deadline passes first.
async fn back_off(deadline: Option<Instant>, base: Option<std::time::Duration>, n: u32) -> bool {
    let base = base.unwrap_or_default();
    let cap = base * BACKOFF_MAX_FACTOR;
    let window = (base * 2u32.saturating_pow(n.saturating_sub(1))).min(cap);
    let ms = window.as_millis() as u64;
    let wait = std::time::Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::random::<u64>() % ms
    });
    until(deadline, tokio::time::sleep(wait)).await.is_some()
}

/// Run `f` until `deadline` (if any); `None` when the deadline passed first.
async fn until<F: std::future::Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    match deadline {
        None => Some(f.await),
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
    }
}

/// Istio's `retry_on` on a response: `retriable-status-codes` (the route's `codes`; none by
/// default since Istio 1.24) and, for gRPC, `unavailable` (14) and `cancelled` (1) in a
/// trailers-only response's headers.
fn retriable_response(resp: &Response<Incoming>, codes: &[u16]) -> bool {
    if codes.contains(&resp.status().as_u16()) {
        return true;
    }
    matches!(
        resp.headers().get(&GRPC_STATUS).map(|v| v.as_bytes()),
        Some(b"14") | Some(b"1")
    )
}

/// The request head, kept to rebuild a retry.
fn clone_head(req: &Request<RequestBody>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

fn rebuild(head: &Request<()>, body: RequestBody) -> Request<RequestBody> {
    let mut r = Request::new(body);
    *r.method_mut() = head.method().clone();
    *r.uri_mut() = head.uri().clone();
    *r.version_mut() = head.version();
    *r.headers_mut() = head.headers().clone();
    r
}

/// `Host` (and the URI authority, for h2c) rewritten (URLRewrite `hostname`, Envoy
/// `host_rewrite_literal`).
fn set_authority(parts: &mut http::request::Parts, host: &str) {
    let Ok(v) = HeaderValue::from_str(host) else {
        return;
    };
    parts.headers.insert(header::HOST, v);
    if parts.uri.authority().is_some() {
        let mut p = parts.uri.clone().into_parts();
        if let Ok(a) = host.parse() {
            p.authority = Some(a);
            if let Ok(uri) = http::Uri::from_parts(p) {
                parts.uri = uri;
            }
        }
    }
}

/// The `location` of a RequestRedirect, as Istio configures Envoy's route redirect
/// (`conversion.go` `createRedirectFilter`): scheme from the filter, else the request's
/// (`x-forwarded-proto`, else `http`); host from the filter, else the request's; port the
/// filter's, else the scheme's default when the scheme is set (`FROM_PROTOCOL_DEFAULT`), else
/// the request's (`FROM_REQUEST_PORT`: Istio sets the route's port, the Service port); the
/// port is left out when it is the scheme's default (http:80, https:443). Path from the
/// path modifier, else the request's (normalized); the query string is kept.
fn redirect_location(
    r: &Redirect,
    req: &Request<Incoming>,
    normalized: &str,
    vip_port: u16,
    prefix: Option<&str>,
) -> String {
    let host_header = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_string(req.headers(), &header::HOST))
        .unwrap_or_default();
    // The request's host without its port (`[v6]:port` keeps the brackets).
    let req_host = match host_header.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            h.to_string()
        }
        _ => host_header.clone(),
    };
    let scheme = r.scheme.clone().unwrap_or_else(|| {
        req.headers()
            .get(&X_FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("http")
            .to_string()
    });
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(_)) => default_port,
        // Istio `FROM_REQUEST_PORT` sets Envoy's `port_redirect` to the route's port, which
        // on a waypoint is the Service port dialed (not whatever `Host` says).
        (None, None) => vip_port,
    };
    let host = r.hostname.clone().unwrap_or(req_host);
    let mut path = match &r.path {
        Some(pm) => pm.apply(normalized, prefix),
        None => normalized.to_string(),
    };
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    if port == default_port {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    }
}

/// Copies of the request for `RequestMirror` filters, sent when the request's upstream phase
/// ends (dropped): fire and forget, responses read and discarded as they stream (never held),
/// each copy bounded in time (the route's request timeout, else the upstream response
/// timeout), and at most `Limits::max_mirrors_in_flight` at once (beyond it the copy
/// is skipped and counted in `waypoint_mirrors_skipped_total`). As with Envoy's shadows,
/// mirrored requests get `-shadow` appended to the host, are not written to the access log
/// (the waypoint's only access log is the HCM's, for downstream requests) and never affect
/// the client's response. The body is the one the client sent when it fit in the retry
/// buffer ([`RETRY_BUFFER_LIMIT`]); a larger or unfinished body is not mirrored.
struct MirrorJob {
    shared: Arc<crate::state::Shared>,
    mirrors: Vec<policy::Mirror>,
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: Option<RetryBuffer>,
    timeout: std::time::Duration,
}

/// One mirror copy in flight.
struct MirrorSlot(Arc<crate::state::Shared>);

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.0
            .mirrors_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        let body = match &self.body {
            Some(b) => match b.complete_bytes() {
                Some(bytes) => bytes,
                None => {
                    tracing::debug!("request body not buffered whole; not mirrored");
                    return;
                }
            },
            None => Bytes::new(),
        };
        for m in self.mirrors.drain(..) {
            let Ok(mut req) = Request::builder()
                .method(self.method.clone())
                .uri(self.uri.clone())
                .body(RequestBody::full(body.clone()))
            else {
                continue;
            };
            *req.headers_mut() = self.headers.clone();
            let shared = self.shared.clone();
            let in_flight = shared
                .mirrors_in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let slot = MirrorSlot(shared.clone());
            if in_flight >= shared.limits.max_mirrors_in_flight {
                shared
                    .mirrors_skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            let timeout = self.timeout;
            tokio::spawn(async move {
                let _slot = slot;
                let _ = tokio::time::timeout(timeout, send_mirror(shared, m.cluster, req)).await;
            });
        }
    }
}

async fn send_mirror(
    shared: Arc<crate::state::Shared>,
    cluster: Arc<Cluster>,
    mut req: Request<RequestBody>,
) {
    let Some(endpoint) = pick_endpoint(&cluster.endpoints, &[], rand::random::<u64>()) else {
        return;
    };
    let proto = match cluster.protocol {
        policy::AppProtocol::Http2 | policy::AppProtocol::Grpc => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Http1,
    };
    // Envoy appends `-shadow` to the host (before any port).
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_string(req.headers(), &header::HOST));
    if let Some(host) = host {
        let shadow = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!("{h}-shadow:{p}"),
            _ => format!("{host}-shadow"),
        };
        let (mut parts, body) = req.into_parts();
        set_authority(&mut parts, &shadow);
        req = Request::from_parts(parts, body);
    }
    prepare_request(&mut req, proto);
    let Ok(checkout) = shared.upstreams.checkout(endpoint, proto).await else {
        return;
    };
    if let Ok((resp, pool)) = checkout.send(req).await {
        use http_body_util::BodyExt;
        // Read to the end, dropping each frame as it comes: a large or endless mirror
        // response costs one frame of memory, never its whole body.
        let mut body = resp.into_body();
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return,
                None => break,
            }
        }
        if let Some(pool) = pool {
            pool.release();
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
        source_principal: t.principal(),
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
fn route(
    service: &ServicePort,
    req: &Request<Incoming>,
    normalized_path: &str,
) -> Result<Selected, ProxyError> {
    let Some(table) = &service.routes else {
        // No HTTPRoute: istiod's implicit route `default` to the Service's own cluster.
        return Ok(Selected {
            name: default_route_name(),
            rule: None,
            prefix: None,
            backend: Some((Backend::Cluster(service.cluster.clone()), None)),
        });
    };
    let (m, rule) = table
        .select_match(
            req.method(),
            normalized_path,
            req.uri().query(),
            req.headers(),
        )
        .ok_or(ProxyError::RouteNotFound)?;
    let prefix = match &m.path {
        PathMatch::Prefix(p) => Some(p.clone()),
        _ => None,
    };
    let backend = rule.backends.pick(rand::random::<u64>()).map(|b| {
        (
            b.backend.clone(),
            Some(b.filters.clone()).filter(|f| !f.is_empty()),
        )
    });
    Ok(Selected {
        name: rule.name.clone(),
        rule: Some(rule.clone()),
        prefix,
        backend,
    })
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
    let has_body = !http_body::Body::is_end_stream(req.body());
    let upgrade = websocket_upgrade(req.headers());
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    if upgrade && proto == UpstreamProtocol::Http1 {
        // Envoy's `upgrade_configs: websocket` (set by istiod on every waypoint HTTP chain)
        // forwards the upgrade hop by hop: `Connection: upgrade` + `Upgrade: websocket`.
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    h.remove(&X_FORWARDED_CLIENT_CERT);
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    match proto {
        UpstreamProtocol::Http1 => {
            // Envoy forwards a request body whatever the method. hyper's client sends a
            // GET/HEAD/CONNECT body of unknown length as no body at all (it assumes those
            // methods have none), so the framing is made explicit: chunked whenever the
            // client's length is not known (a chunked HTTP/1.1 body, h2c DATA without
            // content-length).
            if has_body && !h.contains_key(header::CONTENT_LENGTH) {
                h.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
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

/// An HTTP/1.1 WebSocket upgrade request (RFC 6455 4.1): `Connection` lists `upgrade` and
/// `Upgrade` names `websocket`. The only upgrade istiod enables on a waypoint's HTTP chains.
pub fn websocket_upgrade(h: &HeaderMap) -> bool {
    connection_has_upgrade(h)
        && h.get(header::UPGRADE).is_some_and(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
        })
}

/// `Connection` lists the `upgrade` token.
fn connection_has_upgrade(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    })
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
    mut resp: Response<Incoming>,
    pool: Option<crate::upstream::PoolReturn>,
    load: LoadGuard,
    service_time_ms: u64,
    filters: (Option<Arc<Filters>>, Option<Arc<RouteRule>>),
) -> Response<ResponseBody> {
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let upstream_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if switching {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    // ResponseHeaderModifier: backendRef level, then rule level (Envoy's order).
    if let Some(m) = filters.0.as_ref().and_then(|f| f.response_headers.as_ref()) {
        m.apply(&mut parts.headers);
    }
    if let Some(m) = filters
        .1
        .as_ref()
        .and_then(|r| r.filters.response_headers.as_ref())
    {
        m.apply(&mut parts.headers);
    }
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
    if let (Some(upstream), Some(conn)) = (upstream_upgrade, ctx.upgrade.take()) {
        // The backend's connection now belongs to the session (never back to the pool); the
        // inner connection takes it over once hyper has written this 101 (upgrade.rs).
        drop((pool, body));
        conn.upgrade.put(crate::upgrade::PendingUpgrade {
            upstream,
            log: ctx.log,
            load,
        });
        return Response::from_parts(parts, ResponseBody::empty_unlogged());
    }
    Response::from_parts(parts, ResponseBody::upstream(body, ctx.log, pool, load))
}

#[cfg(test)]
mod tests {
    use super::Attempts;

    /// The sequence of the bug this accounting fixes: a request not sent on a stale pooled
    /// connection is resent for free, then the endpoint refuses every connection. The old
    /// loop stopped counting after the free resend (a dying endpoint was retried every few
    /// milliseconds until the route deadline); every later attempt must count, so Istio's
    /// default budget (2 retries) ends after three counted attempts.
    #[test]
    fn every_attempt_after_a_free_resend_counts() {
        let mut a = Attempts::new(3);
        a.start(); // pooled connection: request came back unsent
        assert!(a.resend_unsent());
        let mut counted_failures = 0;
        loop {
            a.start(); // fresh connection: refused
            counted_failures += 1;
            assert!(counted_failures <= 3, "attempts never ran out: {a:?}");
            if !a.may_retry() {
                break;
            }
        }
        assert_eq!(a.count, 3);
        assert_eq!(counted_failures, 3);
    }

    #[test]
    fn free_resends_are_bounded() {
        let mut a = Attempts::new(1);
        a.start();
        assert!(a.resend_unsent());
        a.start();
        assert!(a.resend_unsent());
        a.start();
        assert!(
            !a.resend_unsent(),
            "a third free resend must not be granted"
        );
        assert_eq!(a.count, 1);
        assert!(!a.may_retry());
    }
}
