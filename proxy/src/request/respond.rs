//! Phase 7, respond: the upstream's response as Envoy's router forwards it: hop-by-hop headers
//! removed, `ResponseHeaderModifier`s (backendRef, then rule), `server: istio-envoy`,
//! `x-envoy-upstream-service-time`, `connection: close` while draining, ext_authz
//! `headersToDownstreamOnAllow`. The body streams through and the log record is emitted when
//! it ends (or the client leaves: `DC`). A `101` hands the session to the inner connection
//! ([`super::upgrade`]).

use http::header::{self, HeaderValue};
use http::{Response, Version};

use super::backend::Target;
use super::body::ResponseBody;
use super::call::Answer;
use super::ctx::RequestCtx;
use super::headers::{ISTIO_ENVOY, X_ENVOY_UPSTREAM_SERVICE_TIME, strip_hop_by_hop};

/// The upstream's response to the client.
pub(super) fn respond(
    mut ctx: RequestCtx,
    answer: Answer,
    target: &Target,
) -> Response<ResponseBody> {
    let Answer {
        mut resp,
        pool,
        load,
        service_time_ms,
        route_deadline,
    } = answer;
    let filters = (&target.backend_filters, &target.rule);
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
    let captured = ctx.shared.access_log.as_ref().map(|l| {
        l.capture_response(|name| {
            parts
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        })
    });
    let r = ctx.record();
    if let Some(c) = captured.filter(|c| !c.is_empty()) {
        r.captured.get_or_insert_with(Default::default).response = c;
    }
    r.response_code = parts.status.as_u16();
    r.response_code_details = Some("via_upstream".into());
    super::headers::record_grpc_status(r, &parts.headers);
    r.upstream_service_time = Some(service_time_ms.to_string());
    if let (Some(upstream), Some(conn)) = (upstream_upgrade, ctx.upgrade.take()) {
        // The backend's connection now belongs to the session (never back to the pool); the
        // inner connection takes it over once hyper has written this 101 (upgrade.rs).
        drop((pool, body));
        conn.upgrade.put(super::upgrade::PendingUpgrade {
            upstream,
            log: ctx.log,
            load,
        });
        return Response::from_parts(parts, ResponseBody::empty_unlogged());
    }
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, ctx.log, pool, load).with_deadline(route_deadline),
    )
}
