//! Phase 2, validate: overload admission, then what the codec and the HCM refuse before any
//! routing (HTTP/1.0, oversized heads, Envoy's codec rules), and path normalization.

use http::{Request, Version};
use hyper::body::Incoming;

use super::conn::InnerCounters;
use super::ctx::RequestCtx;
use super::error::ProxyError;

/// Overload (Envoy's overload manager): shed instead of queueing without bound when too many
/// requests are in flight or resident memory is above the ceiling. The request counts as in
/// flight until its log record is emitted.
pub(super) fn admit(ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    use std::sync::atomic::Ordering::Relaxed;
    let shared = ctx.shared.clone();
    let n = shared.in_flight.fetch_add(1, Relaxed);
    ctx.log.hold(crate::state::InFlight(shared.clone()));
    if n >= shared.limits.max_requests || shared.memory_pressure.load(Relaxed) {
        shared.shed.fetch_add(1, Relaxed);
        return Err(ProxyError::Overloaded);
    }
    Ok(())
}

/// The request as Envoy's codec and HCM would accept it; returns the normalized path (used
/// for routing and authorization, and what the backend receives).
pub(super) fn validate(
    ctx: &mut RequestCtx,
    req: &mut Request<Incoming>,
    conn: &InnerCounters,
) -> Result<String, ProxyError> {
    if req.version() == Version::HTTP_10 {
        return Err(ProxyError::Http10);
    }
    if head_size(req) > ctx.shared.limits.max_request_headers {
        return Err(ProxyError::HeadersTooLarge);
    }
    // What hyper accepts and Envoy's codec refuses (missing Host, repeated Content-Length,
    // Content-Length with Transfer-Encoding, unknown methods, `OPTIONS *`).
    let framing = conn.head_framing.load(std::sync::atomic::Ordering::Relaxed);
    super::codec::check_request(
        req.method(),
        req.version(),
        req.uri().path(),
        req.headers(),
        framing,
    )?;
    // MeshConfig pathNormalization (default BASE): the normalized path is used for routing
    // and authorization and is what the backend receives (policy.md 1.8).
    let normalized =
        policy::normalize_path_with(req.uri().path(), ctx.shared.mesh.load().path_normalization)
            .map_err(|()| ProxyError::BadPath)?
            .into_owned();
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
    Ok(normalized)
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
