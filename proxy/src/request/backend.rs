//! Phase 5, backend: Envoy's router. A `RequestRedirect` rule answers here (route redirect);
//! else the drawn weighted backendRef: unresolvable: 500 `NC`; all weights zero: 500; no
//! ready endpoint: 503 `UH`. No rule matched at all: 404 `NR` (decided in phase 3, answered
//! here, after the security filters).

use std::sync::Arc;

use http::Request;
use http::header;
use hyper::body::Incoming;
use policy::{Backend, Cluster, Filters, Redirect, RouteRule};

use super::conn::TunnelCtx;
use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::headers::{X_FORWARDED_PROTO, header_string};
use super::route::Selected;

/// Where the request goes: the cluster, the filters that apply (backendRef, then rule), and
/// the matched PathPrefix (URLRewrite `ReplacePrefixMatch` replaces exactly this).
pub(super) struct Target {
    pub(super) cluster: Arc<Cluster>,
    pub(super) backend_filters: Option<Arc<Filters>>,
    pub(super) rule: Option<Arc<RouteRule>>,
    pub(super) prefix: Option<String>,
}

pub(super) fn backend(
    ctx: &mut RequestCtx,
    t: &TunnelCtx,
    req: &Request<Incoming>,
    normalized: &str,
    routed: Result<Selected, ProxyError>,
) -> Result<Target, ProxyError> {
    let sel = routed?;
    let rule = sel.rule.clone();
    // Envoy's router applies the route's response header modifiers to its own local replies
    // too (redirects, 5xx, timeouts), backendRef level then rule level.
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
            req,
            normalized,
            t.vip.port(),
            sel.prefix.as_deref(),
        );
        let status = http::StatusCode::from_u16(redirect.status).unwrap_or(http::StatusCode::FOUND);
        return Err(ProxyError::Redirect { status, location });
    }
    let (cluster, backend_filters) = match sel.backend {
        Some((Backend::Cluster(c), f)) => (c, f),
        Some((Backend::Invalid { .. }, _)) => return Err(ProxyError::ClusterNotFound),
        None => return Err(ProxyError::NoBackendWeight),
    };
    // ServiceEntry `resolution: NONE`: the endpoint is the tunnel's own address.
    let cluster = if cluster.passthrough {
        Arc::new(cluster.original_destination(t.vip))
    } else {
        cluster
    };
    if cluster.endpoints().is_empty() {
        return Err(ProxyError::NoHealthyUpstream);
    }
    Ok(Target {
        cluster,
        backend_filters,
        rule,
        prefix: sel.prefix,
    })
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
