//! Header names the request path writes or reads, and how a request is rewritten for the
//! hop upstream (Envoy's router as istiod configures it on a waypoint).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

use crate::upstream::{RequestBody, UpstreamProtocol};

pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub(super) static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(super) static ISTIO_ENVOY: HeaderValue = HeaderValue::from_static("istio-envoy");
pub(super) static X_ENVOY_ORIGINAL_PATH: HeaderName =
    HeaderName::from_static("x-envoy-original-path");
pub(super) static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub(super) static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

pub(super) fn header_string(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// `Host` (and the URI authority, for h2c) rewritten (URLRewrite `hostname`, Envoy
/// `host_rewrite_literal`).
pub(super) fn set_authority(parts: &mut http::request::Parts, host: &str) {
    let Ok(v) = HeaderValue::from_str(host) else {
        return;
    };
    parts.headers.insert(header::HOST, v);
    if parts.uri.authority().is_some() {
        let mut p = parts.uri.clone().into_parts();
        if let Ok(a) = host.parse() {
            p.authority = Some(a);
            if let Ok(uri) = http::Uri::from_parts(p) {
                parts.uri = uri;
            }
        }
    }
}

/// The URI with a new `path?query` (after jwt_authn removed a token parameter).
pub(super) fn replace_path_and_query(uri: &http::Uri, pq: &str) -> Result<http::Uri, http::Error> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

/// Request headers as Envoy's waypoint forwards them (protocol.md 2.8, 8): hop-by-hop headers
/// removed, `x-forwarded-proto: http` when absent, `x-forwarded-client-cert` stripped
/// (SANITIZE), `x-forwarded-for` neither appended to nor stripped (use_remote_address false).
pub(super) fn prepare_request(req: &mut Request<RequestBody>, proto: UpstreamProtocol) {
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let has_body = !http_body::Body::is_end_stream(req.body());
    let upgrade = websocket_upgrade(req.headers());
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    if upgrade && proto == UpstreamProtocol::Http1 {
        // Envoy's `upgrade_configs: websocket` (set by istiod on every waypoint HTTP chain)
        // forwards the upgrade hop by hop: `Connection: upgrade` + `Upgrade: websocket`.
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    h.remove(&X_FORWARDED_CLIENT_CERT);
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    match proto {
        UpstreamProtocol::Http1 => {
            // Envoy forwards a request body whatever the method. hyper's client sends a
            // GET/HEAD/CONNECT body of unknown length as no body at all (it assumes those
            // methods have none), so the framing is made explicit: chunked whenever the
            // client's length is not known (a chunked HTTP/1.1 body, h2c DATA without
            // content-length).
            if has_body && !h.contains_key(header::CONTENT_LENGTH) {
                h.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            // An h2c downstream carries the authority in the URI; HTTP/1.1 needs `Host`.
            if !h.contains_key(header::HOST)
                && let Some(a) = authority
                    .as_deref()
                    .and_then(|a| HeaderValue::from_str(a).ok())
            {
                h.insert(header::HOST, a);
            }
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(pq);
            *req.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::Http2 => {
            let host = authority
                .or_else(|| {
                    h.get(header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "localhost".to_string());
            h.remove(header::HOST);
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            if let Ok(uri) = http::Uri::builder()
                .scheme("http")
                .authority(host)
                .path_and_query(pq)
                .build()
            {
                *req.uri_mut() = uri;
            }
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

/// An HTTP/1.1 WebSocket upgrade request (RFC 6455 4.1): `Connection` lists `upgrade` and
/// `Upgrade` names `websocket`. The only upgrade istiod enables on a waypoint's HTTP chains.
pub fn websocket_upgrade(h: &HeaderMap) -> bool {
    connection_has_upgrade(h)
        && h.get(header::UPGRADE).is_some_and(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
        })
}

/// `Connection` lists the `upgrade` token.
pub(super) fn connection_has_upgrade(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    })
}

/// RFC 9110 7.6.1 connection-specific headers, plus those named in `Connection`.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            let name = name.trim();
            if !name.is_empty()
                && !name.eq_ignore_ascii_case("close")
                && !name.eq_ignore_ascii_case("keep-alive")
            {
                h.remove(name);
            }
        }
    }
    h.remove(header::CONNECTION);
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
    if let Some(te) = h.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        h.remove(header::TE);
    }
}

/// Record a response's `grpc-status` / `grpc-message` (headers of a trailers-only response,
/// or trailers), as Envoy's gRPC stats and tracer read them.
pub fn record_grpc_status(r: &mut accesslog::AccessLogRecord, h: &http::HeaderMap) {
    if let Some(code) = h
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok())
    {
        r.grpc_status = Some(code);
        r.grpc_message = h
            .get(&GRPC_MESSAGE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
}
