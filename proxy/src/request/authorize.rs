//! Phase 4, authorize: the waypoint's security filters in istiod's order (protocol.md 2.8),
//! each on the policies attached to this waypoint or Service, all before "no route" is
//! answered (Envoy's HTTP filters run before its router):
//! - 4a **ext_authz**: a matching CUSTOM AuthorizationPolicy calls its MeshConfig
//!   `envoyExtAuthzHttp` or `envoyExtAuthzGrpc` provider; denied: the authorizer's status and body, `UAEX`;
//!   unreachable: 403 `UAEX` unless `failOpen`; a provider that cannot be used: 403 `RBAC:
//!   access denied` as Istio's bad-CUSTOM deny rules. With `includeRequestBodyInCheck` the
//!   body is held first (up to `maxRequestBytes`) and handed on to the upstream phase.
//! - 4b **jwt_authn**: RequestAuthentication; no token passes, a bad one gets 401 (403 for the
//!   audience) with Envoy's body and `www-authenticate`.
//! - 4c **RBAC**: AUDIT, DENY, ALLOW on the tunnel's peer identity and the verified JWT;
//!   denial: 403 `RBAC: access denied`.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::Request;
use http::header::HeaderMap;
use hyper::body::Incoming;
use policy::{ServicePort, Snapshot};

use super::conn::TunnelCtx;
use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::headers::{X_FORWARDED_PROTO, replace_path_and_query};
use crate::config::meshconfig::BodyInCheck;
use crate::config::meshconfig::ProviderKind;
use crate::telemetry::authz::Outcome;
use crate::upstream::BodyProgress;
use crate::upstream::extauthz::CheckBody;
use crate::upstream::extauthz::{CheckRequest, CheckResult};
use crate::upstream::prefix::{BodyPrefix, PrefixError};

/// Runs 4a-4c; the body prefix an ext_authz check held, if any, goes upstream first.
pub(super) async fn authorize(
    ctx: &mut RequestCtx,
    t: &TunnelCtx,
    req: &mut Request<Incoming>,
    received: &BodyProgress,
    normalized: &str,
    service: &ServicePort,
    snapshot: &Snapshot,
) -> Result<Option<BodyPrefix>, ProxyError> {
    let normalized = normalized.to_string();
    let mut held = None;
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
                &authz_request(t, remote_ip, req, &normalized, &host, None),
            )
        {
            let mesh = shared.mesh.load();
            let provider = match mesh.provider(&m.provider).map(|p| &p.kind) {
                Some(ProviderKind::ExtAuthzHttp(h)) if !m.conflicting_providers => {
                    Authorizer::Http(h)
                }
                Some(ProviderKind::ExtAuthzGrpc(g)) if !m.conflicting_providers => {
                    Authorizer::Grpc(g)
                }
                _ => {
                    tracing::warn!(provider = %m.provider, policy = %m.policy, "CUSTOM policy names no usable extension provider; denying as Istio does");
                    let d = m.bad_provider_denial();
                    return Err(ProxyError::RbacDenied { details: d.details });
                }
            };
            let (fail_open, status_on_error) = provider.on_error();
            let body = match provider.body() {
                Some(settings) if !http_body::Body::is_end_stream(req.body()) => {
                    let (prefix, body) = Box::pin(hold_body(ctx, req, received, settings)).await?;
                    held = Some(prefix);
                    Some(body)
                }
                _ => None,
            };
            let check = Check {
                host: &host,
                size: received.received(),
                body: body.as_ref(),
            };
            // Boxed: only requests under a CUSTOM policy carry the authorizer call's future.
            let asked = std::time::Instant::now();
            let result = Box::pin(ask(ctx, t, req, &check, provider, snapshot)).await;
            shared.ext_authz_stats.record(
                match &result {
                    CheckResult::Allowed { .. } => Outcome::Ok,
                    CheckResult::Denied { .. } => Outcome::Denied,
                    CheckResult::Error(_) if fail_open => Outcome::FailureModeAllowed,
                    CheckResult::Error(_) => Outcome::Error,
                },
                asked.elapsed(),
            );
            match result {
                CheckResult::Allowed {
                    upstream_set,
                    upstream_append,
                    upstream_remove,
                    downstream_add,
                } => {
                    apply_allowed(
                        req.headers_mut(),
                        upstream_set,
                        upstream_append,
                        upstream_remove,
                    );
                    ctx.response_headers.extend(downstream_add);
                }
                CheckResult::Denied {
                    status,
                    body,
                    headers,
                } => {
                    return Err(ProxyError::ExtAuthzDenied {
                        status,
                        body,
                        headers,
                    });
                }
                CheckResult::Error(reason) if fail_open => {
                    tracing::warn!(provider = %m.provider, "ext_authz failed, failOpen lets the request through: {reason}");
                }
                CheckResult::Error(reason) => {
                    tracing::warn!(provider = %m.provider, "ext_authz failed: {reason}");
                    return Err(ProxyError::ExtAuthzError {
                        status: status_on_error,
                    });
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
                    return Err(ProxyError::JwtDenied { status, realm });
                }
            }
        }

        // 4c: RBAC.
        if !service.authz.is_empty() {
            let decision = policy::evaluate_rbac(
                &service.authz,
                &authz_request(t, remote_ip, req, &normalized, &host, verified.as_ref()),
            );
            if let Some(dry) = &decision.dry_run {
                tracing::debug!(allowed = dry.allowed, policy = ?dry.matched_policy, "dry-run authorization result");
            }
            if !decision.allowed {
                return Err(ProxyError::RbacDenied {
                    details: decision.details,
                });
            }
        }
    }

    Ok(held)
}

/// Envoy's ext_authz `with_request_body`: the body is held until it ends or reaches
/// `maxRequestBytes` (with `allowPartialMessage` the check goes out as soon as the limit is
/// reached, `isBufferFull`); without partial messages a body over the limit overflows the
/// stream's buffer limit and the connection manager answers 413 (checked against Envoy 1.40,
/// tests/src/ext_authz_body.rs). Held: at most the limit plus one frame.
async fn hold_body(
    ctx: &RequestCtx,
    req: &mut Request<Incoming>,
    received: &BodyProgress,
    settings: BodyInCheck,
) -> Result<(BodyPrefix, CheckBody), ProxyError> {
    let max = settings.max_request_bytes as usize;
    let stop_at = if settings.allow_partial_message {
        max
    } else {
        max.saturating_add(1)
    };
    let idle = ctx.shared.limits.stream_idle_timeout;
    let prefix = match BodyPrefix::read(req.body_mut(), received, stop_at, idle).await {
        Ok(p) => p,
        Err(PrefixError::Idle) => return Err(ProxyError::StreamIdleTimeout),
        Err(PrefixError::Failed) => {
            return Err(ProxyError::Codec {
                status: http::StatusCode::BAD_REQUEST,
                details: "http1.codec_error",
            });
        }
    };
    if !settings.allow_partial_message && prefix.len() > max {
        return Err(ProxyError::PayloadTooLarge);
    }
    let bytes = prefix.head(max);
    let partial = bytes.len() != prefix.len();
    Ok((prefix, CheckBody { bytes, partial }))
}

/// What a check is asked with besides the request itself.
struct Check<'a> {
    host: &'a str,
    /// Body bytes received so far.
    size: u64,
    body: Option<&'a CheckBody>,
}

/// What AuthorizationPolicy sees of a request: the tunnel's peer identity and addresses, the
/// HTTP attributes, and the verified JWT (Envoy `jwt_authn` metadata) if any.
/// The ext_authz provider a CUSTOM policy names.
#[derive(Clone, Copy)]
enum Authorizer<'m> {
    Http(&'m crate::config::meshconfig::ExtAuthzHttp),
    Grpc(&'m crate::config::meshconfig::ExtAuthzGrpc),
}

impl Authorizer<'_> {
    /// (`failOpen`, `statusOnError`).
    fn on_error(self) -> (bool, http::StatusCode) {
        match self {
            Authorizer::Http(h) => (h.fail_open, h.status_on_error),
            Authorizer::Grpc(g) => (g.fail_open, g.status_on_error),
        }
    }

    /// `includeRequestBodyInCheck`.
    fn body(self) -> Option<BodyInCheck> {
        match self {
            Authorizer::Http(h) => h.body,
            Authorizer::Grpc(g) => g.body,
        }
    }
}

/// Ask the provider about the request, through the cluster istiod would build for it.
async fn ask(
    ctx: &mut RequestCtx,
    t: &TunnelCtx,
    req: &Request<Incoming>,
    check: &Check<'_>,
    provider: Authorizer<'_>,
    snapshot: &Snapshot,
) -> CheckResult {
    let host = check.host;
    let shared = ctx.shared.clone();
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match provider {
        Authorizer::Grpc(g) => {
            let cluster = snapshot.extension_cluster(&g.service, g.port);
            let request_id = ctx.record().request_id.clone().unwrap_or_default();
            let protocol = match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            };
            let grpc_check = crate::upstream::extauthz_grpc::GrpcCheck {
                method: req.method(),
                path_and_query: pq,
                authority: host,
                headers: req.headers(),
                protocol,
                request_id: &request_id,
                source: Some(t.peer.remote),
                source_principal: t.principal().unwrap_or(""),
                destination: t.vip,
                destination_principal: "",
                size: check.size,
                body: check.body,
                pack_as_bytes: g.body.is_some_and(|b| b.pack_as_bytes),
            };
            let check = shared.ext_authz_grpc.check(
                cluster.as_ref(),
                &g.service,
                g.port,
                g.timeout,
                &grpc_check,
            );
            check.await
        }
        Authorizer::Http(h) => {
            let cluster = snapshot.extension_cluster(&h.service, h.port);
            let http_check = CheckRequest {
                method: req.method(),
                path_and_query: pq,
                authority: host,
                headers: req.headers(),
                body: check.body,
            };
            shared
                .ext_authz
                .check(h, cluster.as_ref(), &http_check)
                .await
        }
    }
}

/// An allowing authorizer's changes to the upstream request: set, append (in place, joined
/// with `,`, as Envoy's `HeaderMap::appendCopy`; checked against Envoy 1.40), remove.
fn apply_allowed(
    h: &mut HeaderMap,
    set: Vec<(http::HeaderName, http::HeaderValue)>,
    append: Vec<(http::HeaderName, http::HeaderValue)>,
    remove: Vec<http::HeaderName>,
) {
    for (name, value) in set {
        h.insert(name, value);
    }
    for (name, value) in append {
        let joined = h.get(&name).and_then(|old| {
            let mut v = old.as_bytes().to_vec();
            v.push(b',');
            v.extend_from_slice(value.as_bytes());
            http::HeaderValue::from_bytes(&v).ok()
        });
        h.insert(name, joined.unwrap_or(value));
    }
    for name in remove {
        h.remove(name);
    }
}

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
