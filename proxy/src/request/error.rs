//! Every failure on the request path is a [`ProxyError`], and this is the one place where a
//! failure becomes what the client and the access log see: status, body, Envoy response
//! flags and `response_code_details` (protocol.md 3.5-3.7, 8).

use std::borrow::Cow;

use accesslog::{ResponseFlag, ResponseFlags};
use http::{HeaderName, HeaderValue, StatusCode};
use policy::JwtStatus;

pub use crate::upstream::UpstreamFailure;

/// A request-path failure.
#[derive(Debug, Clone)]
pub enum ProxyError {
    /// No HTTPRoute rule matched (Envoy `route_not_found`, 404 NR, empty body).
    RouteNotFound,
    /// A non-CONNECT request on the HBONE listener: Istio's connect_terminate route only
    /// matches CONNECT, so Envoy answers 404 NR (protocol.md 2.2).
    NotConnect,
    /// Every backendRef of the matched rule has weight 0: Istio emits a direct response 500
    /// (policy.md 3.5).
    NoBackendWeight,
    /// The drawn backendRef does not resolve (missing Service, unsupported kind, ...):
    /// 500 NC `cluster_not_found` (Gateway API routes set cluster_not_found_response_code 500).
    ClusterNotFound,
    /// The cluster has no ready endpoint: 503 UH `no healthy upstream`.
    NoHealthyUpstream,
    /// A DestinationRule circuit breaker is full (`http2MaxRequests`): Envoy's router
    /// answers 503 `UO` with the overflow reset reason (docs/envoy-observed.md 14).
    Overflow,
    /// The upstream failed before response headers. `retried` = at least one retry happened
    /// (Envoy's "retried and the latest" wording); `retry_limit` = the failure was retriable
    /// under the route's retry policy and the budget ran out (flag `URX`; Envoy sets it even
    /// with `num_retries: 0`, but not without a retry policy: envoy-observed.md 2b, 2c).
    Upstream {
        failure: UpstreamFailure,
        retried: bool,
        retry_limit: bool,
    },
    /// The route timeout (`timeouts.request`) or the per-try timeout (`backendRequest` with a
    /// retry stanza) expired before response headers: 504 `upstream request timeout`, `UT`,
    /// details `response_timeout` / `upstream_per_try_timeout` (router.cc `onResponseTimeout`,
    /// `onPerTryTimeout`).
    Timeout { per_try: bool },
    /// The client left its request body unfinished for the stream idle timeout before any
    /// response started: Envoy's HCM answers 408 `stream timeout`, flag `SI`, details
    /// `stream_idle_timeout` (filter_manager `onIdleTimeout`).
    StreamIdleTimeout,
    /// HTTPRoute `RequestRedirect`: Envoy's route redirect, answered locally with the status,
    /// `location` and an empty body; no flag, details `direct_response`.
    Redirect {
        status: StatusCode,
        location: String,
    },
    /// HTTP/1.0 request: Envoy (Istio default, no PILOT_HTTP10) answers 426
    /// `Upgrade Required`, flag `DPE`, details `low_version` (envoy-observed.md case 6).
    Http10,
    /// Request head over Envoy's 60 KiB `max_request_headers_kb`: 431, `DPE`,
    /// `http1.headers_too_large` (envoy-observed.md case 7).
    HeadersTooLarge,
    /// The request path cannot be normalized: 400 `path_normalization_failed`.
    BadPath,
    /// Envoy's HTTP/1 codec refused the request (docs/envoy-observed.md, "HTTP/1.1 framing"):
    /// the status's reason phrase as a `text/plain` body (`Bad Request`, `Not Implemented`,
    /// `Upgrade Required`), flag `DPE`, details such as `http1.codec_error`,
    /// `http1.invalid_characters`, `http1.content_length_and_chunked_not_allowed`,
    /// `http1.invalid_transfer_encoding` (501); the connection closes after it.
    Codec {
        status: StatusCode,
        details: &'static str,
    },
    /// HTTP/1.1 request without `Host`: Envoy's HCM answers 400 with no body and no flag,
    /// details `missing_host_header`, and closes the connection.
    MissingHost,
    /// `OPTIONS *` (asterisk-form target): Envoy answers 404 with no body, no flag, details
    /// `absolute_path_rejected`; the connection stays open.
    AbsolutePathRejected,
    /// A CONNECT to an authority that is not a Service VIP:port bound to this waypoint:
    /// Envoy's internal listener has no filter chain for it, so the CONNECT's upstream fails:
    /// 503 with [`UNKNOWN_AUTHORITY_BODY`], `UF`, details
    /// `upstream_reset_before_response_started{remote_connection_failure}` (protocol.md 8).
    UnknownAuthority,
    /// The inner HTTP/1.1 request head did not complete within `--request-header-timeout`:
    /// 408 `request timeout`, details `request_header_timeout`, connection closed (Envoy's
    /// HCM `request_headers_timeout`, which Istio leaves unset; ours defaults to 30 s).
    RequestHeaderTimeout,
    /// An `Upgrade` other than `websocket` (the only upgrade istiod configures on waypoint
    /// chains; `h2c` is dropped by the codec and served as a plain request): 403, no body, no
    /// flag, details `upgrade_failed`, connection closed.
    UpgradeFailed,
    /// More work than the configured limits allow: shed as Envoy's overload manager does,
    /// 503 `envoy overloaded`, flag `OM`, details `overload`.
    Overloaded,
    /// AuthorizationPolicy denied the request: 403 `RBAC: access denied` (19 bytes), no
    /// response flag, details `rbac_access_denied_matched_policy[<id>|none]` (protocol.md 3.4, 3.7).
    RbacDenied { details: String },
    /// RequestAuthentication: a token was found and did not verify. Envoy's `jwt_authn`
    /// (`filter.cc` `onComplete`): 401 (403 for a disallowed audience), the status string as
    /// the body, `www-authenticate: Bearer realm="<x-forwarded-proto>://<host><path>"` plus
    /// `, error="invalid_token"`, no response flag, details
    /// `jwt_authn_access_denied{<status string, spaces as _>}`.
    JwtDenied {
        status: JwtStatus,
        /// `realm`: Envoy `buildOriginalUri` (path with query, at most 256 bytes).
        realm: String,
    },
    /// The CUSTOM authorizer (ext_authz HTTP) answered neither 200 nor 5xx: Envoy's ext_authz
    /// filter replies with the authorizer's status and body and the response headers allowed
    /// by `headersToDownstreamOnDeny`; flag UAEX, details `ext_authz_denied`.
    ExtAuthzDenied {
        status: StatusCode,
        body: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// `DYNAMIC_DNS`: the request's `Host` did not resolve. Envoy's dynamic forward proxy
    /// answers 503 `DNS resolution failure`, flag `DF`, details
    /// `dns_resolution_failure{<c-ares reason>}` (docs/envoy-observed.md 20).
    DnsResolutionFailure(&'static str),
    /// `DYNAMIC_DNS`: the DNS cache holds its maximum of names in use: 503
    /// `DNS cache overflow`, no flag, details `dns_cache_overflow`.
    DnsCacheOverflow,
    /// ext_authz `includeRequestBodyInCheck` without `allowPartialMessage` and a body over
    /// `maxRequestBytes`: the stream's buffer limit overflows and Envoy's connection manager
    /// answers 413 `Payload Too Large`, no flag, details `request_payload_too_large`
    /// (before any check, even with `failOpen`).
    PayloadTooLarge,
    /// The CUSTOM authorizer could not be asked (connect failure, timeout, 5xx) and the
    /// provider does not `failOpen`: `statusOnError` (403 by default), empty body, flag UAEX,
    /// details `ext_authz_error`.
    ExtAuthzError { status: StatusCode },
}

/// What a local reply looks like.
pub struct LocalReply {
    pub status: StatusCode,
    pub body: Cow<'static, str>,
    pub flags: ResponseFlags,
    pub details: Cow<'static, str>,
    pub transport_failure_reason: Option<String>,
    /// Headers the reply carries besides `content-type`/`content-length`/`server` (set,
    /// replacing any of the same name). A `content-type` here wins over `text/plain`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ProxyError {
    /// The one mapping from failure to response (status, body, flags, details).
    pub fn local_reply(&self) -> LocalReply {
        let reply =
            |status, body: &'static str, flags: ResponseFlags, details: &'static str| LocalReply {
                status,
                body: Cow::Borrowed(body),
                flags,
                details: Cow::Borrowed(details),
                transport_failure_reason: None,
                headers: Vec::new(),
            };
        match self {
            ProxyError::RouteNotFound | ProxyError::NotConnect => reply(
                StatusCode::NOT_FOUND,
                "",
                ResponseFlag::NR.into(),
                "route_not_found",
            ),
            ProxyError::NoBackendWeight => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                ResponseFlags::default(),
                "direct_response",
            ),
            ProxyError::ClusterNotFound => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                ResponseFlag::NC.into(),
                "cluster_not_found",
            ),
            ProxyError::NoHealthyUpstream => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                ResponseFlag::UH.into(),
                "no_healthy_upstream",
            ),
            ProxyError::Overflow => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                ResponseFlag::UO.into(),
                "upstream_reset_before_response_started{overflow}",
            ),
            ProxyError::Http10 => reply(
                StatusCode::UPGRADE_REQUIRED,
                "Upgrade Required",
                ResponseFlag::DPE.into(),
                "low_version",
            ),
            ProxyError::HeadersTooLarge => reply(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                ResponseFlag::DPE.into(),
                "http1.headers_too_large",
            ),
            ProxyError::BadPath => reply(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                ResponseFlags::default(),
                "path_normalization_failed",
            ),
            ProxyError::Codec { status, details } => LocalReply {
                status: *status,
                body: Cow::Borrowed(status.canonical_reason().unwrap_or("")),
                flags: ResponseFlag::DPE.into(),
                details: Cow::Borrowed(details),
                transport_failure_reason: None,
                headers: Vec::new(),
            },
            ProxyError::MissingHost => LocalReply {
                headers: vec![close()],
                ..reply(
                    StatusCode::BAD_REQUEST,
                    "",
                    ResponseFlags::default(),
                    "missing_host_header",
                )
            },
            ProxyError::AbsolutePathRejected => reply(
                StatusCode::NOT_FOUND,
                "",
                ResponseFlags::default(),
                "absolute_path_rejected",
            ),
            ProxyError::UnknownAuthority => LocalReply {
                transport_failure_reason: None,
                ..reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    UNKNOWN_AUTHORITY_BODY,
                    ResponseFlag::UF.into(),
                    "upstream_reset_before_response_started{remote_connection_failure}",
                )
            },
            ProxyError::RequestHeaderTimeout => LocalReply {
                headers: vec![close()],
                ..reply(
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout",
                    ResponseFlags::default(),
                    "request_header_timeout",
                )
            },
            ProxyError::UpgradeFailed => LocalReply {
                headers: vec![close()],
                ..reply(
                    StatusCode::FORBIDDEN,
                    "",
                    ResponseFlags::default(),
                    "upgrade_failed",
                )
            },
            ProxyError::RbacDenied { details } => LocalReply {
                status: StatusCode::FORBIDDEN,
                body: Cow::Borrowed("RBAC: access denied"),
                flags: ResponseFlags::default(),
                details: Cow::Owned(details.clone()),
                transport_failure_reason: None,
                headers: Vec::new(),
            },
            ProxyError::JwtDenied { status, realm } => {
                let mut challenge = format!("Bearer realm=\"{realm}\"");
                if *status != JwtStatus::JwtMissed {
                    challenge.push_str(", error=\"invalid_token\"");
                }
                LocalReply {
                    status: StatusCode::from_u16(status.http_status())
                        .unwrap_or(StatusCode::UNAUTHORIZED),
                    body: Cow::Borrowed(status.message()),
                    flags: ResponseFlags::default(),
                    details: Cow::Owned(format!(
                        "jwt_authn_access_denied{{{}}}",
                        status.message().replace(' ', "_")
                    )),
                    transport_failure_reason: None,
                    headers: HeaderValue::from_str(&challenge)
                        .map(|v| vec![(http::header::WWW_AUTHENTICATE, v)])
                        .unwrap_or_default(),
                }
            }
            ProxyError::ExtAuthzDenied {
                status,
                body,
                headers,
            } => LocalReply {
                status: *status,
                body: Cow::Owned(body.clone()),
                flags: ResponseFlag::UAEX.into(),
                details: Cow::Borrowed("ext_authz_denied"),
                transport_failure_reason: None,
                headers: headers.clone(),
            },
            ProxyError::ExtAuthzError { status } => LocalReply {
                status: *status,
                body: Cow::Borrowed(""),
                flags: ResponseFlag::UAEX.into(),
                details: Cow::Borrowed("ext_authz_error"),
                transport_failure_reason: None,
                headers: Vec::new(),
            },
            ProxyError::DnsResolutionFailure(why) => LocalReply {
                details: Cow::Owned(format!("dns_resolution_failure{{{why}}}")),
                ..reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "DNS resolution failure",
                    ResponseFlag::DF.into(),
                    "",
                )
            },
            ProxyError::DnsCacheOverflow => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "DNS cache overflow",
                ResponseFlags::default(),
                "dns_cache_overflow",
            ),
            ProxyError::Overloaded => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "envoy overloaded",
                ResponseFlag::OM.into(),
                "overload",
            ),
            ProxyError::Timeout { per_try } => reply(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout",
                ResponseFlag::UT.into(),
                if *per_try {
                    "upstream_per_try_timeout"
                } else {
                    "response_timeout"
                },
            ),
            ProxyError::PayloadTooLarge => reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
                ResponseFlags::default(),
                "request_payload_too_large",
            ),
            ProxyError::StreamIdleTimeout => reply(
                StatusCode::REQUEST_TIMEOUT,
                "stream timeout",
                ResponseFlag::SI.into(),
                "stream_idle_timeout",
            ),
            ProxyError::Redirect { status, location } => LocalReply {
                status: *status,
                body: Cow::Borrowed(""),
                flags: ResponseFlags::default(),
                details: Cow::Borrowed("direct_response"),
                transport_failure_reason: None,
                headers: HeaderValue::from_str(location)
                    .map(|v| vec![(http::header::LOCATION, v)])
                    .unwrap_or_default(),
            },
            ProxyError::Upstream {
                failure,
                retried,
                retry_limit,
            } => {
                // router.cc onUpstreamReset, as Envoy 1.40 prints it (envoy-observed.md 2, 8):
                // the body names the reset reason only; the transport failure detail goes to
                // the details and `upstream_transport_failure_reason` (spaces as `_`); the
                // retry-limit flag is set before the failure flag (`URX,UF`).
                let reason = failure.reason();
                let detail = failure.transport_detail();
                let mut body =
                    String::from("upstream connect error or disconnect/reset before headers. ");
                if *retried {
                    body.push_str("retried and the latest ");
                }
                body.push_str("reset reason: ");
                body.push_str(reason);
                let mut flags = ResponseFlags::default();
                if *retry_limit {
                    flags.set(ResponseFlag::URX);
                }
                flags.set(match failure {
                    UpstreamFailure::Connect { .. } => ResponseFlag::UF,
                    UpstreamFailure::Termination => ResponseFlag::UC,
                    UpstreamFailure::RefusedStream => ResponseFlag::UR,
                    UpstreamFailure::Protocol => ResponseFlag::UPE,
                    UpstreamFailure::Overflow => ResponseFlag::UO,
                });
                // `upstream_reset_before_response_started{<reason>[|<detail>]}`, spaces as `_`.
                let mut details = String::from("upstream_reset_before_response_started{");
                details.push_str(&reason.replace(' ', "_"));
                if let Some(d) = detail {
                    details.push('|');
                    details.push_str(&d.replace(' ', "_"));
                }
                details.push('}');
                let status = if matches!(failure, UpstreamFailure::Protocol) {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                LocalReply {
                    status,
                    body: Cow::Owned(body),
                    flags,
                    details: Cow::Owned(details),
                    transport_failure_reason: detail.map(|d| d.replace(' ', "_")),
                    headers: Vec::new(),
                }
            }
        }
    }
}

impl LocalReply {
    /// The reply as HTTP/1.1 bytes, for a request hyper's parser refused (nothing else can
    /// write it then), in Envoy's header order: `content-length`, `content-type`, `date`,
    /// `server`, `connection: close` (docs/envoy-observed.md, "HTTP/1.1 framing").
    pub fn http1_bytes(&self, now: std::time::SystemTime) -> Vec<u8> {
        let mut out = Vec::with_capacity(192 + self.body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(self.body.len().to_string().as_bytes());
        if !self.body.is_empty() {
            out.extend_from_slice(b"\r\ncontent-type: text/plain");
        }
        out.extend_from_slice(b"\r\ndate: ");
        out.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
        out.extend_from_slice(b"\r\nserver: istio-envoy\r\nconnection: close\r\n\r\n");
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// `connection: close`: Envoy closes the downstream connection after these replies.
fn close() -> (HeaderName, HeaderValue) {
    (http::header::CONNECTION, HeaderValue::from_static("close"))
}

/// Envoy `Grpc::Utility::httpToGrpcStatus`: the gRPC status a local reply carries when the
/// request is gRPC (`content-type: application/grpc*`).
pub fn grpc_status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` value: percent-encoding of bytes outside printable ASCII and `%`
/// (gRPC HTTP/2 protocol spec), as Envoy's `Grpc::Utility::PercentEncoding` does.
pub fn grpc_message(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    for b in body.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Body Envoy sends when a CONNECT names an address this waypoint has no filter chain for
/// (observed on Envoy 1.40, protocol.md 8).
pub const UNKNOWN_AUTHORITY_BODY: &str = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_failure_after_retries_reads_like_envoy() {
        let r = ProxyError::Upstream {
            failure: UpstreamFailure::Connect {
                timeout: false,
                detail: "delayed connect error: Connection refused".into(),
            },
            retried: true,
            retry_limit: true,
        }
        .local_reply();
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: \
             remote connection failure"
        );
        assert_eq!(r.flags.to_string(), "URX,UF");
        assert_eq!(
            r.transport_failure_reason.as_deref(),
            Some("delayed_connect_error:_Connection_refused")
        );
        assert_eq!(
            r.details,
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
        );
    }

    #[test]
    fn jwt_failures_read_like_envoy_jwt_authn() {
        let r = ProxyError::JwtDenied {
            status: JwtStatus::JwtExpired,
            realm: "http://reviews:9080/api?x=1".into(),
        }
        .local_reply();
        assert_eq!((r.status.as_u16(), &*r.body), (401, "Jwt is expired"));
        assert_eq!(r.details, "jwt_authn_access_denied{Jwt_is_expired}");
        assert_eq!(r.flags.to_string(), "-");
        assert_eq!(
            r.headers[0].1,
            "Bearer realm=\"http://reviews:9080/api?x=1\", error=\"invalid_token\""
        );
        let aud = ProxyError::JwtDenied {
            status: JwtStatus::JwtAudienceNotAllowed,
            realm: String::new(),
        }
        .local_reply();
        assert_eq!(aud.status, 403);
    }

    #[test]
    fn ext_authz_replies_carry_uaex() {
        let d = ProxyError::ExtAuthzDenied {
            status: StatusCode::UNAUTHORIZED,
            body: "nope".into(),
            headers: Vec::new(),
        }
        .local_reply();
        assert_eq!(
            (
                d.status.as_u16(),
                &*d.body,
                &*d.details,
                d.flags.to_string()
            ),
            (401, "nope", "ext_authz_denied", "UAEX".to_string())
        );
        let e = ProxyError::ExtAuthzError {
            status: StatusCode::FORBIDDEN,
        }
        .local_reply();
        assert_eq!(
            (e.status.as_u16(), &*e.body, &*e.details),
            (403, "", "ext_authz_error")
        );
    }

    #[test]
    fn no_healthy_upstream_is_503_uh() {
        let r = ProxyError::NoHealthyUpstream.local_reply();
        assert_eq!(
            (r.status.as_u16(), &*r.body, r.flags.to_string()),
            (503, "no healthy upstream", "UH".into())
        );
    }
}
