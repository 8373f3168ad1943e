//! Phase 1, accept: the per-request context every phase works on ([`RequestCtx`]), and the
//! one place a failure becomes the response the client gets ([`RequestCtx::local_reply`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use accesslog::AccessLogRecord;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::conn::{InnerCounters, TunnelCtx};
use super::error::ProxyError;
use super::headers::{
    GRPC_MESSAGE, GRPC_STATUS, ISTIO_ENVOY, X_FORWARDED_FOR, X_REQUEST_ID, header_string,
};
use super::log::PendingLog;
use crate::state::Shared;
use crate::upstream::BodyProgress;

/// Per-request state carried through the phases.
pub struct RequestCtx {
    pub(super) shared: Arc<Shared>,
    pub(super) log: PendingLog,
    /// Headers added to whatever response goes back (ext_authz
    /// `headersToDownstreamOnAllow`).
    pub(super) response_headers: Vec<(http::HeaderName, HeaderValue)>,
    /// `content-type: application/grpc*`: local replies go out as gRPC status.
    grpc: bool,
    /// Set once the router phase owns the request: the ResponseHeaderModifiers (backendRef,
    /// then rule) that Envoy's router also applies to its own local replies (redirects, 5xx,
    /// timeouts) through `finalizeResponseHeaders`. Replies of earlier filters (RBAC, JWT,
    /// 404) never get them.
    pub(super) route_response: Vec<policy::HeaderModifier>,
    /// A WebSocket upgrade request: where a `101` hands the session to the inner connection.
    pub(super) upgrade: Option<Arc<InnerCounters>>,
    /// Trace context headers for the upstream request (phase 3b), set in phase 6.
    pub(super) trace_upstream: Vec<(http::HeaderName, HeaderValue)>,
}

/// The rightmost `x-forwarded-for` entry as `ip:0`, if it is an IP.
pub fn xff_client(xff: &str) -> Option<String> {
    let last = xff.rsplit(',').next()?.trim();
    let ip: std::net::IpAddr = last.parse().ok()?;
    Some(SocketAddr::new(ip, 0).to_string())
}

impl RequestCtx {
    /// Phase 1, accept: start the record from what the request says.
    pub(super) fn new(
        t: &TunnelCtx,
        req: &mut Request<Incoming>,
        received: Arc<BodyProgress>,
    ) -> RequestCtx {
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
        // Headers a configured log format reads beyond these (`%REQ(X-TENANT)%`): only those.
        if let Some(logger) = &t.shared.access_log {
            let captured = logger.capture_request(|name| {
                headers
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            });
            if !captured.is_empty() {
                r.captured = Some(Box::new(accesslog::CapturedHeaders {
                    request: captured,
                    response: Vec::new(),
                }));
            }
        }
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
        let (access_log, metrics) = (&t.service.access_log, &t.service.metrics);
        if !access_log.is_default() || !metrics.is_default() {
            log.set_telemetry(access_log, metrics, t.principal(), || headers.clone());
        }
        RequestCtx {
            log,
            shared: t.shared.clone(),
            response_headers: Vec::new(),
            grpc,
            route_response: Vec::new(),
            upgrade: None,
            trace_upstream: Vec::new(),
        }
    }

    pub(super) fn record(&mut self) -> &mut AccessLogRecord {
        self.log
            .record()
            .expect("invariant: the record is only taken when the ctx is consumed")
    }

    /// The one place a [`ProxyError`] becomes a response (status, body, flags, details).
    pub(super) fn local_reply(mut self, err: ProxyError) -> Response<ResponseBody> {
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
    fn grpc_local_reply(mut self, reply: super::error::LocalReply) -> Response<ResponseBody> {
        let grpc_status = super::error::grpc_status_for(reply.status);
        let r = self.record();
        r.response_code = 200;
        r.grpc_status = Some(u16::from(grpc_status));
        r.grpc_message = (!reply.body.is_empty()).then(|| super::error::grpc_message(&reply.body));
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
            && let Ok(v) = HeaderValue::from_str(&super::error::grpc_message(&reply.body))
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
