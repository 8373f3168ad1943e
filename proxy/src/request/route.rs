//! Phase 3, route: the Service comes from the tunnel's CONNECT authority (never from `Host`,
//! protocol.md 2.6); its HTTPRoutes pick a rule, or istiod's implicit `default` route applies.
//! The route is resolved before authorization so a denied request is still logged with its
//! route and cluster, as Envoy's RBAC filter logs the cached route (protocol.md 3.4). Then the
//! upgrade decision, which Envoy's HCM takes when it builds the filter chain.

use std::sync::Arc;

use http::header;
use http::{Request, Version};
use hyper::body::Incoming;
use policy::{Backend, Filters, PathMatch, RouteRule, ServicePort, Snapshot, VipLookup};

use super::conn::{InnerCounters, TunnelCtx};
use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::headers::{connection_has_upgrade, websocket_upgrade};

/// The route decision (phase 3).
pub(super) struct Selected {
    pub(super) name: Arc<str>,
    /// `None` = istiod's implicit `default` route.
    pub(super) rule: Option<Arc<RouteRule>>,
    /// The PathPrefix value of the winning match (URLRewrite/RequestRedirect
    /// `ReplacePrefixMatch` replace exactly this).
    pub(super) prefix: Option<String>,
    /// The drawn backend and its backendRef-level filters; `None` = every weight is zero.
    pub(super) backend: Option<(Backend, Option<Arc<Filters>>)>,
    /// The path part of the route's tracing operation (istiod `getRouteOperation`: an exact
    /// path, a regex; `None` for prefixes, which istiod renders `/*`).
    pub(super) operation_path: Option<String>,
}

/// The Service port this request is for: the one bound now, or (unbound by a reload while
/// the tunnel is open) the one the tunnel was opened with, as Envoy drains a removed filter
/// chain. Telemetry of that Service applies from here on.
pub(super) fn service_of(
    ctx: &mut RequestCtx,
    t: &TunnelCtx,
    snapshot: &Snapshot,
    req: &Request<Incoming>,
) -> Arc<ServicePort> {
    let service: Arc<ServicePort> = match snapshot.lookup_vip(t.vip) {
        VipLookup::Bound(sp) => sp,
        _ => t.service.clone(),
    };
    let telemetry = |s: &ServicePort| !s.access_log.is_default() || !s.metrics.is_default();
    if telemetry(&service) || telemetry(&t.service) {
        ctx.log
            .set_telemetry(&service.access_log, &service.metrics, t.principal(), || {
                req.headers().clone()
            });
    }
    service
}

/// Pick the rule and draw its backend; the route and cluster go into the log record now.
/// No rule matching is answered later (after authorization, as Envoy's router runs last).
pub(super) fn route(
    ctx: &mut RequestCtx,
    service: &ServicePort,
    req: &Request<Incoming>,
    normalized: &str,
) -> Result<Selected, ProxyError> {
    let routed = select(service, req, normalized);
    if let Ok(sel) = &routed {
        ctx.record().route_name = Some(sel.name.clone());
        if let Some((Backend::Cluster(c), _)) = &sel.backend {
            ctx.log.set_cluster(c.clone());
        }
    }
    routed
}

/// `websocket` is the one upgrade istiod enables; the codec drops an `h2c` upgrade (served
/// as a plain request, its headers stripped as hop-by-hop); any other is refused.
pub(super) fn check_upgrade(
    ctx: &mut RequestCtx,
    req: &Request<Incoming>,
    conn: &Arc<InnerCounters>,
) -> Result<(), ProxyError> {
    if req.version() != Version::HTTP_11
        || !req.headers().contains_key(header::UPGRADE)
        || !connection_has_upgrade(req.headers())
    {
        return Ok(());
    }
    if websocket_upgrade(req.headers()) {
        ctx.upgrade = Some(conn.clone());
        return Ok(());
    }
    let h2c = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c"));
    if h2c {
        Ok(())
    } else {
        Err(ProxyError::UpgradeFailed)
    }
}

/// The request's authority as Envoy's HCM sees it: the absolute-form URI's (HTTP/1.1) or
/// `:authority` (HTTP/2), else `Host`.
pub(super) fn request_host(req: &Request<Incoming>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok()),
    }
}

/// The rule (or the implicit default route) and a drawn backend.
fn select(
    service: &ServicePort,
    req: &Request<Incoming>,
    normalized_path: &str,
) -> Result<Selected, ProxyError> {
    // A `DYNAMIC_DNS` entry's virtual host has the wildcard host as its one domain (istiod
    // `buildRouteVHostDomains`, so a client cannot aim the forward proxy at any name it
    // likes): another `Host`, or one with a port, has no route (docs/envoy-observed.md 20).
    if let Some(d) = &service.cluster.dynamic_dns
        && !request_host(req).is_some_and(|h| d.matches(h))
    {
        return Err(ProxyError::RouteNotFound);
    }
    let Some(table) = &service.routes else {
        // No HTTPRoute: istiod's implicit route `default` to the Service's own cluster.
        return Ok(Selected {
            name: default_route_name(),
            rule: None,
            prefix: None,
            backend: Some((Backend::Cluster(service.cluster.clone()), None)),
            operation_path: None,
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
    let (prefix, operation_path) = match &m.path {
        PathMatch::Prefix(p) => (Some(p.clone()), None),
        PathMatch::Exact(p) => (None, Some(p.clone())),
        PathMatch::Regex(r) => (None, Some(r.as_str().to_string())),
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
        operation_path,
    })
}

fn default_route_name() -> Arc<str> {
    static DEFAULT: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| Arc::from("default")).clone()
}
