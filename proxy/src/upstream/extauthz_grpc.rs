//! CUSTOM AuthorizationPolicy with an `envoyExtAuthzGrpc` provider: the gRPC
//! `envoy.service.auth.v3.Authorization/Check` client, as Envoy's ext_authz filter with a
//! `grpc_service` behaves when istiod configures it (Istio `extauthz.go`; every request
//! header is sent, no include lists):
//!
//! - The CheckRequest carries the source (the client's address and SPIFFE principal), the
//!   destination (the address the tunnel named), the request time and the HTTP
//!   attributes: `x-request-id`, method, every header (lower-case, repeated ones joined with
//!   `,`), path with query, host, scheme, protocol, size (body bytes received so far), and
//!   with `includeRequestBodyInCheck` the body (`body`, or `raw_body` with `packAsBytes`)
//!   and `x-envoy-auth-partial-body`.
//! - `status.code` OK: allowed; `ok_response` headers are set on the upstream request
//!   (appended instead when their `append` is true: "`append` defaults to false when used in
//!   this message"), `headers_to_remove` removed (never pseudo-headers or `host`),
//!   `response_headers_to_add` added to the client's response.
//! - Any other code: denied with `denied_response` (status, default 403; headers; body).
//! - A transport error, a timeout or a gRPC error status: the provider's error
//!   (`statusOnError`, or through with `failOpen`).
//!
//! Principals: Envoy's waypoint runs ext_authz on its inner (internal-listener) connection,
//! which has no TLS, so it sends both principals empty (istio/istio#56379, where users ask
//! for them back). Ours sends the tunnel's peer principal as `source.principal`, as Envoy
//! does from a sidecar; `destination.principal` stays empty (the destination workload is not
//! chosen yet). An authorizer written for Envoy's waypoint ignores the field; one written for
//! sidecars finds it.
//!
//! The messages are written with prost's derive from the field numbers of Envoy's
//! `external_auth.proto`, `attribute_context.proto`, `address.proto`, `base.proto`,
//! `http_status.proto` and `google/rpc/status.proto` (no protoc needed). Checked against real
//! Envoy 1.40 talking to the same authorizer (tests/src/ext_authz_grpc.rs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use policy::Cluster;

use super::extauthz::{CheckBody, CheckResult, PARTIAL_BODY};
use crate::upstream::pick_endpoint;

/// The RPC's path.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Channels kept (one per authorizer endpoint); beyond it the table is emptied and refilled.
const MAX_CHANNELS: usize = 256;

// === Envoy's messages (field numbers from its .proto files) ===

/// `envoy.service.auth.v3.CheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequestMsg {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `envoy.service.auth.v3.AttributeContext`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "2")]
    pub destination: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<AttrRequest>,
    #[prost(map = "string, string", tag = "10")]
    pub context_extensions: HashMap<String, String>,
}

/// `AttributeContext.Peer`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
    #[prost(string, tag = "2")]
    pub service: String,
    #[prost(map = "string, string", tag = "3")]
    pub labels: HashMap<String, String>,
    #[prost(string, tag = "4")]
    pub principal: String,
    #[prost(string, tag = "5")]
    pub certificate: String,
}

/// `envoy.config.core.v3.Address` (only `socket_address`, field 1 of its oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

/// `envoy.config.core.v3.SocketAddress` (`port_value`, field 3 of its oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(int32, tag = "1")]
    pub protocol: i32,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(uint32, tag = "3")]
    pub port_value: u32,
}

/// `AttributeContext.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttrRequest {
    #[prost(message, optional, tag = "1")]
    pub time: Option<Timestamp>,
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `AttributeContext.HttpRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(map = "string, string", tag = "3")]
    pub headers: HashMap<String, String>,
    #[prost(string, tag = "4")]
    pub path: String,
    #[prost(string, tag = "5")]
    pub host: String,
    #[prost(string, tag = "6")]
    pub scheme: String,
    #[prost(string, tag = "7")]
    pub query: String,
    #[prost(string, tag = "8")]
    pub fragment: String,
    #[prost(int64, tag = "9")]
    pub size: i64,
    #[prost(string, tag = "10")]
    pub protocol: String,
    /// A `string` in the proto; carried as bytes (the same wire type) because Envoy copies the
    /// client's bytes into it unchecked, and they need not be UTF-8.
    #[prost(bytes = "vec", tag = "11")]
    pub body: Vec<u8>,
    #[prost(bytes = "vec", tag = "12")]
    pub raw_body: Vec<u8>,
}

/// `envoy.service.auth.v3.CheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResponseMsg {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RpcStatus>,
    #[prost(message, optional, tag = "2")]
    pub denied_response: Option<DeniedHttpResponse>,
    #[prost(message, optional, tag = "3")]
    pub ok_response: Option<OkHttpResponse>,
}

/// `google.rpc.Status` (details left out).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `envoy.service.auth.v3.DeniedHttpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeniedHttpResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    #[prost(string, tag = "3")]
    pub body: String,
}

/// `envoy.type.v3.HttpStatus` (`code` is an enum of HTTP status numbers).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

/// `envoy.service.auth.v3.OkHttpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OkHttpResponse {
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    #[prost(string, repeated, tag = "5")]
    pub headers_to_remove: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    pub response_headers_to_add: Vec<HeaderValueOption>,
}

/// `envoy.config.core.v3.HeaderValueOption`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValueMsg>,
    /// `google.protobuf.BoolValue append` (deprecated, still what most authorizers set).
    #[prost(message, optional, tag = "2")]
    pub append: Option<BoolValue>,
    /// `HeaderAppendAction`: 0 APPEND_IF_EXISTS_OR_ADD, 1 ADD_IF_ABSENT,
    /// 2 OVERWRITE_IF_EXISTS_OR_ADD, 3 OVERWRITE_IF_EXISTS.
    #[prost(int32, tag = "3")]
    pub append_action: i32,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueMsg {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

/// `google.protobuf.BoolValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BoolValue {
    #[prost(bool, tag = "1")]
    pub value: bool,
}

// === the client ===

/// What the check request says about the request and its connection.
pub struct GrpcCheck<'a> {
    pub method: &'a Method,
    pub path_and_query: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub request_id: &'a str,
    pub source: Option<SocketAddr>,
    pub source_principal: &'a str,
    pub destination: SocketAddr,
    pub destination_principal: &'a str,
    /// Bytes of the request body received when the check is sent (Envoy
    /// `stream_info.bytesReceived()`).
    pub size: u64,
    /// `includeRequestBodyInCheck`: the body (or its first `maxRequestBytes`).
    pub body: Option<&'a CheckBody>,
    /// `packAsBytes`: the body goes in `raw_body`.
    pub pack_as_bytes: bool,
}

/// One h2c channel per authorizer endpoint, kept for reuse (tonic multiplexes calls on it).
#[derive(Default)]
pub struct GrpcAuthzClient {
    channels: Mutex<HashMap<SocketAddr, tonic::transport::Channel>>,
}

impl GrpcAuthzClient {
    fn channel(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<tonic::transport::Channel, String> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = channels.get(&addr) {
            return Ok(c.clone());
        }
        if channels.len() >= MAX_CHANNELS {
            channels.clear();
        }
        // A lazy channel: it connects on first use, reconnects after failures.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(timeout)
            .connect_lazy();
        channels.insert(addr, channel.clone());
        Ok(channel)
    }

    /// Ask the provider (reached through `cluster`) about a request, within `timeout`.
    pub async fn check(
        &self,
        cluster: Option<&Arc<Cluster>>,
        service: &str,
        port: u16,
        timeout: Duration,
        req: &GrpcCheck<'_>,
    ) -> CheckResult {
        let Some(cluster) = cluster else {
            return CheckResult::Error(format!(
                "no cluster for ext_authz service {service} port {port}"
            ));
        };
        let endpoints = cluster.endpoints();
        let Some(endpoint) = pick_endpoint(&endpoints, &[], rand::random::<u64>()) else {
            return CheckResult::Error(format!("{}: no healthy upstream", cluster.name));
        };
        let channel = match self.channel(endpoint.addr, timeout) {
            Ok(c) => c,
            Err(e) => return CheckResult::Error(e),
        };
        let message = check_request(req);
        let call = async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<CheckRequestMsg, CheckResponseMsg>::default();
            grpc.unary(
                tonic::Request::new(message),
                http::uri::PathAndQuery::from_static(CHECK_PATH),
                codec,
            )
            .await
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => CheckResult::Error(format!("timed out after {timeout:?}")),
            Ok(Err(status)) => CheckResult::Error(format!(
                "{}: gRPC {:?}: {}",
                endpoint.addr,
                status.code(),
                status.message()
            )),
            Ok(Ok(answer)) => decide(answer.into_inner()),
        }
    }
}

fn socket(addr: SocketAddr) -> Option<Address> {
    Some(Address {
        socket_address: Some(SocketAddress {
            protocol: 0,
            address: addr.ip().to_string(),
            port_value: u32::from(addr.port()),
        }),
    })
}

/// The CheckRequest Envoy's filter builds (`CheckRequestUtils::createHttpCheck`).
pub fn check_request(req: &GrpcCheck<'_>) -> CheckRequestMsg {
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in req.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    // Envoy's header map holds the pseudo-headers too.
    headers.insert(":authority".into(), req.authority.to_string());
    headers.insert(":method".into(), req.method.as_str().to_string());
    headers.insert(":path".into(), req.path_and_query.to_string());
    headers.insert(":scheme".into(), "http".into());
    // Envoy's connection manager has set it before its filters run (we set it when
    // forwarding).
    headers
        .entry("x-forwarded-proto".into())
        .or_insert_with(|| "http".into());
    headers.remove("host");
    // "Skip any client EnvoyAuthPartialBody header, which could interfere with internal use"
    // (check_request_utils.cc); the filter's own goes in when a body is sent.
    headers.remove(PARTIAL_BODY.as_str());
    let (mut body, mut raw_body) = (Vec::new(), Vec::new());
    if let Some(b) = req.body {
        headers.insert(PARTIAL_BODY.to_string(), b.partial_flag().to_string());
        if req.pack_as_bytes {
            raw_body = b.bytes.to_vec();
        } else {
            body = b.bytes.to_vec();
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    CheckRequestMsg {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: req.source.and_then(socket),
                principal: req.source_principal.to_string(),
                ..Default::default()
            }),
            destination: Some(Peer {
                address: socket(req.destination),
                principal: req.destination_principal.to_string(),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                time: Some(Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(HttpRequest {
                    id: req.request_id.to_string(),
                    method: req.method.as_str().to_string(),
                    headers,
                    path: req.path_and_query.to_string(),
                    host: req.authority.to_string(),
                    scheme: "http".into(),
                    size: i64::try_from(req.size).unwrap_or(i64::MAX),
                    protocol: req.protocol.to_string(),
                    body,
                    raw_body,
                    ..Default::default()
                }),
            }),
            context_extensions: HashMap::new(),
        }),
    }
}

fn header_pair(h: &HeaderValueOption) -> Option<(HeaderName, HeaderValue, bool)> {
    let hv = h.header.as_ref()?;
    let name = HeaderName::from_bytes(hv.key.as_bytes()).ok()?;
    let value = if hv.raw_value.is_empty() {
        HeaderValue::from_str(&hv.value).ok()?
    } else {
        HeaderValue::from_bytes(&hv.raw_value).ok()?
    };
    // "the `append` field in HeaderValueOption defaults to false when used in this message".
    let append = match &h.append {
        Some(b) => b.value,
        None => false,
    };
    Some((name, value, append))
}

/// Turn the authorizer's answer into a decision (Envoy `GrpcClientImpl::onSuccess`).
pub fn decide(answer: CheckResponseMsg) -> CheckResult {
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let ok = answer.ok_response.unwrap_or_default();
        let mut upstream_set = Vec::new();
        let mut upstream_append = Vec::new();
        for h in &ok.headers {
            if let Some((n, v, append)) = header_pair(h) {
                if append {
                    upstream_append.push((n, v));
                } else {
                    upstream_set.push((n, v));
                }
            }
        }
        let upstream_remove = ok
            .headers_to_remove
            .iter()
            .filter(|n| !n.starts_with(':') && !n.eq_ignore_ascii_case("host"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        let downstream_add = ok
            .response_headers_to_add
            .iter()
            .filter_map(header_pair)
            .map(|(n, v, _)| (n, v))
            .collect();
        return CheckResult::Allowed {
            upstream_set,
            upstream_append,
            upstream_remove,
            downstream_add,
        };
    }
    let denied = answer.denied_response.unwrap_or_default();
    let status = denied
        .status
        .as_ref()
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|c| *c != 0)
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    CheckResult::Denied {
        status,
        body: denied.body,
        headers: denied
            .headers
            .iter()
            .filter_map(header_pair)
            .map(|(n, v, _)| (n, v))
            .collect(),
    }
}
