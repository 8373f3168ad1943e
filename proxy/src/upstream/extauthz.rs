//! CUSTOM AuthorizationPolicy: the HTTP ext_authz client, as Envoy's ext_authz filter with an
//! `http_service` behaves when istiod configures it from a MeshConfig `envoyExtAuthzHttp`
//! provider (`ext_authz_http_impl.cc`, Istio `extauthz.go`):
//!
//! - The check request has the original method, `pathPrefix` + the original path (with query),
//!   `content-length: 0` and no body, the original `Host`/`:authority` and `authorization`,
//!   the request headers matching `includeRequestHeadersInCheck`, and
//!   `includeAdditionalHeadersInCheck`. With `includeRequestBodyInCheck` and a request body:
//!   the body (its first `maxRequestBytes`), its `content-length`, and
//!   `x-envoy-auth-partial-body: true|false` (checked against Envoy 1.40).
//! - `200`: allowed. Response headers matching `headersToUpstreamOnAllow` are set on the
//!   upstream request (replacing), those named by `x-envoy-auth-headers-to-remove` are removed
//!   from it, those matching `headersToDownstreamOnAllow` are added to the client response.
//! - `5xx`, connect failure, timeout: error: `statusOnError` (403), or let through with
//!   `failOpen`.
//! - Any other status: denied with that status and body; the response headers matching
//!   `headersToDownstreamOnDeny` (plus `www-authenticate`, `location`), or all of them but
//!   `Host` when the list is empty, go to the client.
//!
//! The authorizer is reached through the cluster istiod would build for it
//! (`outbound|<port>||<service>`), on one of its ready endpoints.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use policy::Cluster;
use tracing::debug;

use crate::config::meshconfig::{ExtAuthzHttp, any_matches};
use crate::upstream::pick_endpoint;

/// Idle connections kept per authorizer endpoint.
const MAX_IDLE_PER_AUTHORIZER: usize = 64;

/// Largest authorizer response body kept for a denial.
const MAX_BODY: usize = 64 * 1024;

static HEADERS_TO_REMOVE: HeaderName = HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// Envoy `Headers::EnvoyAuthPartialBody`: whether the check's body was cut at
/// `maxRequestBytes`. A client's own is never passed on.
pub static PARTIAL_BODY: HeaderName = HeaderName::from_static("x-envoy-auth-partial-body");

/// The request body a check carries (`includeRequestBodyInCheck`).
#[derive(Debug, Clone)]
pub struct CheckBody {
    /// The first `maxRequestBytes` of what was held.
    pub bytes: Bytes,
    /// More was held than sent (Envoy: `length != decoding_buffer->length()`).
    pub partial: bool,
}

impl CheckBody {
    pub fn partial_flag(&self) -> &'static str {
        if self.partial { "true" } else { "false" }
    }
}

/// What the authorizer decided.
#[derive(Debug)]
pub enum CheckResult {
    Allowed {
        /// Set on the upstream request (replacing).
        upstream_set: Vec<(HeaderName, HeaderValue)>,
        /// Appended to the upstream request (gRPC `append: true`).
        upstream_append: Vec<(HeaderName, HeaderValue)>,
        /// Removed from the upstream request.
        upstream_remove: Vec<HeaderName>,
        /// Added to the client response.
        downstream_add: Vec<(HeaderName, HeaderValue)>,
    },
    Denied {
        status: StatusCode,
        body: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// The authorizer could not answer (the reason is for logs).
    Error(String),
}

/// The request attributes a check needs.
pub struct CheckRequest<'a> {
    pub method: &'a Method,
    /// `path?query` as received.
    pub path_and_query: &'a str,
    /// `:authority` or `Host`.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// `includeRequestBodyInCheck`: the body sent with the check.
    pub body: Option<&'a CheckBody>,
}

/// A pooled HTTP/1.1 client for authorizers.
#[derive(Clone)]
pub struct ExtAuthzClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for ExtAuthzClient {
    fn default() -> Self {
        // Bounded: idle connections per authorizer endpoint, closed after a minute unused.
        ExtAuthzClient {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(MAX_IDLE_PER_AUTHORIZER)
                .pool_idle_timeout(std::time::Duration::from_secs(60))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build_http(),
        }
    }
}

impl ExtAuthzClient {
    /// Ask `provider` (reached through `cluster`) about a request.
    pub async fn check(
        &self,
        provider: &ExtAuthzHttp,
        cluster: Option<&Arc<Cluster>>,
        req: &CheckRequest<'_>,
    ) -> CheckResult {
        let Some(cluster) = cluster else {
            return CheckResult::Error(format!(
                "no cluster for ext_authz service {} port {}",
                provider.service, provider.port
            ));
        };
        let endpoints = cluster.endpoints();
        let Some(endpoint) = pick_endpoint(&endpoints, &[], rand::random::<u64>()) else {
            return CheckResult::Error(format!("{}: no healthy upstream", cluster.name));
        };
        let check = match build_check(provider, endpoint.addr, req) {
            Ok(c) => c,
            Err(e) => return CheckResult::Error(format!("building the check request: {e}")),
        };
        let client = self.client.clone();
        let call = async move {
            let resp = client.request(check).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
                .to_bytes();
            anyhow::Ok((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(provider.timeout, call).await {
            Err(_) => return CheckResult::Error(format!("timed out after {:?}", provider.timeout)),
            Ok(Err(e)) => return CheckResult::Error(format!("{}: {e:#}", endpoint.addr)),
            Ok(Ok(r)) => r,
        };
        debug!(status = %parts.status, authorizer = %endpoint.addr, "ext_authz check answered");
        interpret(provider, parts.status, &parts.headers, body)
    }
}

fn build_check(
    provider: &ExtAuthzHttp,
    endpoint: std::net::SocketAddr,
    req: &CheckRequest<'_>,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let path = format!("{}{}", provider.path_prefix, req.path_and_query);
    let body = req.body.map(|b| b.bytes.clone()).unwrap_or_default();
    let length = HeaderValue::from(body.len());
    let mut check = Request::builder()
        .method(req.method.clone())
        .uri(format!("http://{endpoint}{path}"))
        .body(Full::new(body))?;
    let h = check.headers_mut();
    h.insert(header::CONTENT_LENGTH, length);
    if let Ok(host) = HeaderValue::from_str(req.authority) {
        h.insert(header::HOST, host);
    }
    for (name, value) in req.headers {
        let n = name.as_str();
        if name == header::AUTHORIZATION
            || (n != "host"
                && n != "content-length"
                && *name != PARTIAL_BODY
                && any_matches(&provider.include_request_headers_in_check, n))
        {
            h.append(name.clone(), value.clone());
        }
    }
    if let Some(b) = req.body {
        h.insert(
            PARTIAL_BODY.clone(),
            HeaderValue::from_static(b.partial_flag()),
        );
    }
    for (name, value) in &provider.include_additional_headers_in_check {
        h.insert(name.clone(), value.clone());
    }
    Ok(check)
}

/// Envoy `RawHttpClientImpl::toResponse`.
fn interpret(
    provider: &ExtAuthzHttp,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> CheckResult {
    if status.is_server_error() {
        return CheckResult::Error(format!("authorizer answered {status}"));
    }
    let pairs = || {
        headers
            .iter()
            .filter(|(n, _)| **n != HEADERS_TO_REMOVE)
            .map(|(n, v)| (n.clone(), v.clone()))
    };
    if status == StatusCode::OK {
        let upstream_remove = headers
            .get_all(&HEADERS_TO_REMOVE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
            .collect();
        return CheckResult::Allowed {
            upstream_append: Vec::new(),
            upstream_set: pairs()
                .filter(|(n, _)| any_matches(&provider.headers_to_upstream_on_allow, n.as_str()))
                .collect(),
            upstream_remove,
            downstream_add: pairs()
                .filter(|(n, _)| any_matches(&provider.headers_to_downstream_on_allow, n.as_str()))
                .collect(),
        };
    }
    // Denied. Framing headers are the local reply's own.
    let framing = |n: &HeaderName| {
        *n == header::CONTENT_LENGTH
            || *n == header::TRANSFER_ENCODING
            || *n == header::CONNECTION
            || *n == header::HOST
    };
    let deny_list = &provider.headers_to_downstream_on_deny;
    let headers = pairs()
        .filter(|(n, _)| !framing(n))
        .filter(|(n, _)| {
            deny_list.is_empty()
                || *n == header::WWW_AUTHENTICATE
                || *n == header::LOCATION
                || any_matches(deny_list, n.as_str())
        })
        .collect();
    CheckResult::Denied {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::meshconfig::{MeshConfig, ProviderKind};

    fn provider(extra: &str) -> ExtAuthzHttp {
        let m = MeshConfig::parse(&format!(
            "extensionProviders:\n- name: x\n  envoyExtAuthzHttp: {{service: s.ns.svc.cluster.local, port: 80{extra}}}\n"
        ))
        .expect("mesh");
        match &m.extension_providers[0].kind {
            ProviderKind::ExtAuthzHttp(h) => h.clone(),
            _ => panic!("http"),
        }
    }

    #[test]
    fn denial_copies_all_headers_but_host_when_no_list() {
        let mut h = HeaderMap::new();
        h.insert("x-reason", HeaderValue::from_static("no"));
        h.insert("host", HeaderValue::from_static("authz"));
        let r = interpret(
            &provider(""),
            StatusCode::UNAUTHORIZED,
            &h,
            Bytes::from("nope"),
        );
        let CheckResult::Denied {
            status,
            body,
            headers,
        } = r
        else {
            panic!("denied")
        };
        assert_eq!((status.as_u16(), body.as_str()), (401, "nope"));
        assert_eq!(headers.len(), 1);
        let r = interpret(
            &provider(", headersToDownstreamOnDeny: [x-other]"),
            StatusCode::FORBIDDEN,
            &h,
            Bytes::new(),
        );
        assert!(matches!(r, CheckResult::Denied { ref headers, .. } if headers.is_empty()));
        assert!(matches!(
            interpret(&provider(""), StatusCode::BAD_GATEWAY, &h, Bytes::new()),
            CheckResult::Error(_)
        ));
    }

    #[test]
    fn allow_selects_upstream_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.insert("x-internal", HeaderValue::from_static("1"));
        h.insert(
            "x-envoy-auth-headers-to-remove",
            HeaderValue::from_static("cookie, x-a"),
        );
        let r = interpret(
            &provider(", headersToUpstreamOnAllow: [x-user]"),
            StatusCode::OK,
            &h,
            Bytes::new(),
        );
        let CheckResult::Allowed {
            upstream_set,
            upstream_remove,
            downstream_add,
            ..
        } = r
        else {
            panic!("allowed")
        };
        assert_eq!(upstream_set.len(), 1);
        assert_eq!(upstream_set[0].0, "x-user");
        assert_eq!(upstream_remove.len(), 2);
        assert!(downstream_add.is_empty());
    }
}
