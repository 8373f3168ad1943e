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
use crate::upstream::dynamic_dns::DynamicDnsFailure;

/// Where the request goes: the cluster, the filters that apply (backendRef, then rule), and
/// the matched PathPrefix (URLRewrite `ReplacePrefixMatch` replaces exactly this).
pub(super) struct Target {
    pub(super) cluster: Arc<Cluster>,
    pub(super) backend_filters: Option<Arc<Filters>>,
    pub(super) rule: Option<Arc<RouteRule>>,
    pub(super) prefix: Option<String>,
    /// A `DYNAMIC_DNS` cluster's request: the `Host` it was resolved from, which originated
    /// TLS sends as SNI and checks the certificate against (istiod sets Envoy's `auto_sni`
    /// and `auto_san_validation` on these clusters, `cluster_tls.go`).
    pub(super) server_name: Option<Arc<str>>,
    /// A `DYNAMIC_DNS` cluster's request: the name's other addresses, tried in order when
    /// the first does not connect.
    pub(super) more_addrs: Option<Arc<[std::net::IpAddr]>>,
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
    // A `DYNAMIC_DNS` cluster's endpoint is found next ([`resolve_host`]).
    if cluster.dynamic_dns.is_none() && cluster.endpoints().is_empty() {
        return Err(ProxyError::NoHealthyUpstream);
    }
    Ok(Target {
        cluster,
        backend_filters,
        rule,
        prefix: sel.prefix,
        server_name: None,
        more_addrs: None,
    })
}

/// Phase 5b, for a `DYNAMIC_DNS` cluster only (Envoy's dynamic forward proxy filter, which
/// runs before the router): the request goes to the first address its `Host` resolves to,
/// on port 80, or 443 when a DestinationRule originates TLS (the filter's default ports;
/// the `Host` carries no port, or it had no route). Unresolvable: 503 `DF`; a full cache:
/// 503 `dns_cache_overflow` ([`crate::upstream::dynamic_dns`]).
pub(super) async fn resolve_host(
    ctx: &RequestCtx,
    mut target: Target,
    req: &Request<Incoming>,
) -> Result<Target, ProxyError> {
    let Some(d) = target.cluster.dynamic_dns.clone() else {
        return Ok(target);
    };
    let host = super::route::request_host(req).unwrap_or_default();
    let ips = ctx
        .shared
        .dynamic_hosts
        .resolve(&d.cache, host)
        .await
        .map_err(|f| match f {
            DynamicDnsFailure::Overflow => ProxyError::DnsCacheOverflow,
            DynamicDnsFailure::Resolution(why) => ProxyError::DnsResolutionFailure(why),
        })?;
    let Some((&ip, rest)) = ips.split_first() else {
        return Err(ProxyError::DnsResolutionFailure(
            "cares_norecords:DNS_server_returned_answer_with_no_data",
        ));
    };
    if !rest.is_empty() {
        target.more_addrs = Some(rest.into());
    }
    let tls = target
        .cluster
        .traffic
        .as_ref()
        .is_some_and(|t| t.tls.is_some());
    let port = if tls { 443 } else { 80 };
    target.cluster = Arc::new(
        target
            .cluster
            .original_destination(std::net::SocketAddr::new(ip, port)),
    );
    target.server_name = Some(host.to_ascii_lowercase().into());
    Ok(target)
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
