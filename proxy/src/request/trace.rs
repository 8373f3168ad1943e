//! Phase 3b, trace: once the route is known, Telemetry `tracing` decides whether this
//! request is traced, as Envoy's connection manager does after route resolution
//! ([`crate::telemetry::trace`]). The request id may change (Envoy packs the decision into
//! it), the headers for upstream wait in the ctx for the forward phase, the route's operation
//! goes back to the client as `x-envoy-decorator-operation` (Envoy's ingress decorator), and
//! a sampled request's span rides with its access-log record until the request ends.

use http::header::HeaderValue;
use http::{Request, header};
use hyper::body::Incoming;
use policy::{Backend, ServicePort};

use super::conn::TunnelCtx;
use super::ctx::RequestCtx;
use super::headers::{X_REQUEST_ID, header_string};
use super::route::Selected;
use crate::telemetry::trace::StartInfo;

static DECORATOR_OPERATION: http::HeaderName =
    http::HeaderName::from_static("x-envoy-decorator-operation");

/// istiod's route decorator (`getRouteOperation`): `<host>:<port><path>`, the host of the
/// route's one cluster (the Service's own for the implicit default route), the path `/*`
/// unless the rule matched an exact path or a regex.
fn operation(service: &ServicePort, routed: &Result<Selected, super::error::ProxyError>) -> String {
    let (host, path) = match routed {
        Ok(sel) => {
            let host = match &sel.backend {
                Some((Backend::Cluster(c), _)) => c.hostname.clone(),
                _ => service.cluster.hostname.clone(),
            };
            (
                host,
                sel.operation_path.as_deref().unwrap_or("/*").to_string(),
            )
        }
        Err(_) => (service.cluster.hostname.clone(), "/*".to_string()),
    };
    format!("{host}:{}{path}", service.vip.port())
}

pub(super) fn start(
    ctx: &mut RequestCtx,
    t: &TunnelCtx,
    service: &ServicePort,
    routed: &Result<Selected, super::error::ProxyError>,
    req: &mut Request<Incoming>,
) {
    let tracing = ctx.shared.tracing.load();
    let Some(active) = tracing.resolve(&service.tracing) else {
        return;
    };
    let op = operation(service, routed);
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_string(req.headers(), &header::HOST))
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let scheme = header_string(
        req.headers(),
        &http::HeaderName::from_static("x-forwarded-proto"),
    )
    .unwrap_or_else(|| "http".into());
    // Envoy's `peer.address` is the direct peer (never `x-forwarded-for`).
    let peer = t
        .remote_str()
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip());
    let started = active.start(
        req.headers_mut(),
        StartInfo {
            operation: op.clone(),
            scheme: &scheme,
            authority: &authority,
            path: &path,
            peer,
        },
    );
    // The id as it now goes upstream and into the log.
    ctx.record().request_id = header_string(req.headers(), &X_REQUEST_ID);
    ctx.trace_upstream = started.upstream;
    if let Ok(v) = HeaderValue::from_str(&op) {
        ctx.response_headers.push((DECORATOR_OPERATION.clone(), v));
    }
    if let Some(mut span) = started.span {
        // istiod's waypoint source tags: the client's workload as workload discovery knows
        // it (never from anything the client sends).
        if let Some(l) = ctx.shared.metrics.source_labels(t.source)
            && l.workload != "unknown"
            && !l.workload.is_empty()
        {
            span.tag("istio.source_workload", &l.workload);
            span.tag("istio.source_namespace", &l.namespace);
        }
        ctx.log.set_span(span);
    }
}
