//! Phase 6a, forward: the request as it goes upstream. Filters in Envoy's order: backendRef
//! (weighted cluster) header mutations, then the rule's (a rule-level `set` wins over a
//! backend-level one, as with Envoy's default `most_specific_header_mutations_wins: false`);
//! `URLRewrite`; `RequestMirror` copies (sent when the upstream phase ends, [`super::mirror`]);
//! headers as Envoy forwards them; the route's retry policy and the body copy that replays
//! it (bounded by [`RETRY_BUFFER_LIMIT`]).

use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Version};
use hyper::body::Incoming;
use policy::RetryPolicy;

use super::backend::Target;
use super::ctx::RequestCtx;
use super::headers::{
    X_ENVOY_ORIGINAL_PATH, prepare_request, replace_path_and_query, set_authority,
};
use super::mirror::{MIRROR_TIMEOUT_CAP, MirrorJob};
use crate::upstream::prefix::BodyPrefix;
use crate::upstream::{BodyProgress, RequestBody, RetryBuffer, UpstreamProtocol};

/// How much of a request body is kept for retries (and mirrors). Envoy keeps what it sent
/// upstream for retries up to its buffer limit and stops retrying beyond it; ours is 64 KiB.
/// A body that was streamed upstream and did not fit is never replayed.
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// The request ready for the upstream call, with what a retry or a mirror needs.
pub(super) struct Outbound {
    pub(super) req: Request<RequestBody>,
    pub(super) proto: UpstreamProtocol,
    /// `None`: the route has no retry policy.
    pub(super) policy: Option<RetryPolicy>,
    pub(super) retry_buf: Option<RetryBuffer>,
    /// The head, kept to rebuild a retry.
    pub(super) head: Option<Request<()>>,
    /// Sent when dropped, i.e. when the upstream phase ends.
    pub(super) mirror: Option<MirrorJob>,
}

pub(super) fn forward(
    ctx: &RequestCtx,
    req: Request<Incoming>,
    held: Option<BodyPrefix>,
    target: &Target,
    normalized: &str,
    received: &Arc<BodyProgress>,
) -> Outbound {
    let (cluster, backend_filters, rule) = (&target.cluster, &target.backend_filters, &target.rule);
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
    if let Some(rule) = rule {
        if let Some(m) = &rule.filters.request_headers {
            m.apply(&mut parts.headers);
        }
        if let Some(rw) = &rule.filters.rewrite {
            if let Some(host) = &rw.hostname {
                set_authority(&mut parts, host);
            }
            if let Some(pm) = &rw.path {
                let original = parts.uri.path_and_query().map(|p| p.as_str().to_string());
                let mut pq = pm.apply(normalized, target.prefix.as_deref());
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
    // Our span's context (Envoy's tracer injects it into the upstream request).
    for (name, value) in &ctx.trace_upstream {
        parts.headers.insert(name.clone(), value.clone());
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
    let policy: Option<RetryPolicy> = match rule {
        Some(r) => r.retry.clone(),
        None => Some(RetryPolicy::default()),
    };
    let max_attempts = policy.as_ref().map_or(1, |p| p.retries.saturating_add(1));
    let mut upstream_req = Request::from_parts(
        parts,
        RequestBody::new(
            body,
            received.clone(),
            ctx.shared.limits.stream_idle_timeout,
        )
        .with_prefix(held)
        .with_grpc_messages(ctx.log.grpc_messages()),
    );
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
    let mirror = mirror_head.map(|(method, uri, headers)| MirrorJob {
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
    Outbound {
        req: upstream_req,
        proto,
        policy,
        retry_buf,
        head,
        mirror,
    }
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

pub(super) fn rebuild(head: &Request<()>, body: RequestBody) -> Request<RequestBody> {
    let mut r = Request::new(body);
    *r.method_mut() = head.method().clone();
    *r.uri_mut() = head.uri().clone();
    *r.version_mut() = head.version();
    *r.headers_mut() = head.headers().clone();
    r
}
