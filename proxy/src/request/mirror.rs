//! `RequestMirror` copies, fire and forget.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http::header::{self, HeaderMap};
use policy::Cluster;

use super::headers::{header_string, prepare_request, set_authority};
use crate::upstream::{RequestBody, RetryBuffer, UpstreamProtocol, pick_endpoint};

/// A mirror copy's time limit when neither a route timeout nor the upstream response timeout
/// bounds it (`--upstream-response-timeout 0s`).
pub(super) const MIRROR_TIMEOUT_CAP: std::time::Duration = std::time::Duration::from_secs(300);

/// Copies of the request for `RequestMirror` filters, sent when the request's upstream phase
/// ends (dropped): fire and forget, responses read and discarded as they stream (never held),
/// each copy bounded in time (the route's request timeout, else the upstream response
/// timeout), and at most `Limits::max_mirrors_in_flight` at once (beyond it the copy
/// is skipped and counted in `waypoint_mirrors_skipped_total`). As with Envoy's shadows,
/// mirrored requests get `-shadow` appended to the host, are not written to the access log
/// (the waypoint's only access log is the HCM's, for downstream requests) and never affect
/// the client's response. The body is the one the client sent when it fit in the retry
/// buffer ([`super::forward::RETRY_BUFFER_LIMIT`]); a larger or unfinished body is not mirrored.
pub(super) struct MirrorJob {
    pub(super) shared: Arc<crate::state::Shared>,
    pub(super) mirrors: Vec<policy::Mirror>,
    pub(super) method: http::Method,
    pub(super) uri: http::Uri,
    pub(super) headers: HeaderMap,
    pub(super) body: Option<RetryBuffer>,
    pub(super) timeout: std::time::Duration,
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
    let endpoints = cluster.endpoints();
    let Some(endpoint) = pick_endpoint(&endpoints, &[], rand::random::<u64>()) else {
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
    let Ok(checkout) = shared
        .upstreams
        .checkout(endpoint, proto, crate::upstream::ConnOptions::default())
        .await
    else {
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
