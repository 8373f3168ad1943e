//! Trace collectors for tests, speaking the real protocols from their real definitions:
//! OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`, the generated
//! tonic server of `opentelemetry-proto`), OTLP/HTTP (protobuf `POST /v1/traces`) and
//! Zipkin v2 (`POST /api/v2/spans`, a JSON list of spans). Each records what it received;
//! [`Collector::fail`] makes it answer with an error (UNAVAILABLE / 503), as a collector
//! that is overloaded or restarting does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::Value;

/// One received span with the resource and scope it came under.
#[derive(Debug, Clone)]
pub struct OtlpSpan {
    pub span: Span,
    /// Resource attributes, as `key -> string value`.
    pub resource: Vec<(String, String)>,
    pub scope: String,
}

/// One HTTP export as received: path, content-type and every header.
pub type HttpExport = (String, String, Vec<(String, String)>);

#[derive(Default)]
struct Inner {
    otlp: Mutex<Vec<OtlpSpan>>,
    zipkin: Mutex<Vec<Value>>,
    /// `(path, content-type, extra header values)` of each HTTP export.
    requests: Mutex<Vec<HttpExport>>,
    failing: AtomicBool,
    /// Never answer (a collector that accepted the connection and hangs).
    hanging: AtomicBool,
}

/// A running collector on 127.0.0.1:0.
#[derive(Clone)]
pub struct Collector {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Otlp(Arc<Inner>);

#[tonic::async_trait]
impl TraceService for Otlp {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.hanging.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        if self.0.failing.load(Ordering::Relaxed) {
            return Err(tonic::Status::unavailable("collector down"));
        }
        record_otlp(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr_string(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match &v.value {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::BoolValue(b)) => b.to_string(),
        Some(V::IntValue(i)) => i.to_string(),
        Some(V::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn record_otlp(inner: &Inner, req: ExportTraceServiceRequest) {
    let mut out = inner.otlp.lock().unwrap();
    for rs in req.resource_spans {
        let resource: Vec<(String, String)> = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map(attr_string).unwrap_or_default(),
                )
            })
            .collect();
        for ss in rs.scope_spans {
            let scope = ss
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for span in ss.spans {
                out.push(OtlpSpan {
                    span,
                    resource: resource.clone(),
                    scope: scope.clone(),
                });
            }
        }
    }
}

impl OtlpSpan {
    /// A span attribute as a string.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .map(attr_string)
    }

    /// Every span attribute, sorted by key.
    pub fn attrs(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .span
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map(attr_string).unwrap_or_default(),
                )
            })
            .collect();
        v.sort();
        v
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Collector {
    /// Serve OTLP/gRPC (h2c), OTLP/HTTP and Zipkin on one port: gRPC by content-type, the
    /// HTTP kinds by path.
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner::default());
        let collector = Collector {
            addr,
            inner: inner.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    let grpc = TraceServiceServer::new(Otlp(inner.clone()));
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let inner = inner.clone();
                            let mut grpc = grpc.clone();
                            async move {
                                let is_grpc = req
                                    .headers()
                                    .get(http::header::CONTENT_TYPE)
                                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                                if is_grpc {
                                    use tower::Service as _;
                                    let resp = grpc.call(req).await.unwrap();
                                    // Streamed as is: grpc-status travels in trailers.
                                    return Ok::<_, std::convert::Infallible>(
                                        resp.map(http_body_util::Either::Left),
                                    );
                                }
                                Ok(http_export(&inner, req)
                                    .await
                                    .map(http_body_util::Either::Right))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        collector
    }

    /// Answer every export with an error from now on (`false`: accept again).
    pub fn fail(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::Relaxed);
    }

    /// Accept exports and never answer them from now on.
    pub fn hang(&self) {
        self.inner.hanging.store(true, Ordering::Relaxed);
    }

    pub fn otlp_spans(&self) -> Vec<OtlpSpan> {
        self.inner.otlp.lock().unwrap().clone()
    }

    pub fn zipkin_spans(&self) -> Vec<Value> {
        self.inner.zipkin.lock().unwrap().clone()
    }

    /// `(path, content-type, headers)` of each HTTP export received.
    pub fn http_requests(&self) -> Vec<HttpExport> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Wait (bounded) until at least `n` OTLP spans arrived; returns them all.
    pub async fn wait_otlp(&self, n: usize, timeout: Duration) -> Vec<OtlpSpan> {
        self.wait(n, timeout, Collector::otlp_spans).await
    }

    /// Wait (bounded) until at least `n` Zipkin spans arrived; returns them all.
    pub async fn wait_zipkin(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.wait(n, timeout, Collector::zipkin_spans).await
    }

    async fn wait<T>(&self, n: usize, timeout: Duration, get: fn(&Collector) -> Vec<T>) -> Vec<T> {
        let this = self.clone();
        crate::eventually(timeout, || {
            let this = this.clone();
            async move {
                let spans = get(&this);
                (spans.len() >= n).then_some(spans)
            }
        })
        .await
        .unwrap_or_else(|| get(self))
    }
}

async fn http_export(
    inner: &Inner,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let ctype = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(400),
    };
    inner
        .requests
        .lock()
        .unwrap()
        .push((path.clone(), ctype.clone(), headers));
    if inner.failing.load(Ordering::Relaxed) {
        return status(503);
    }
    match path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
            Ok(r) => {
                record_otlp(inner, r);
                let mut ok = Vec::new();
                let _ = ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode(&mut ok);
                http::Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::from(ok)))
                    .unwrap()
            }
            Err(_) => status(400),
        },
        "/api/v2/spans" => match serde_json::from_slice::<Vec<Value>>(&body) {
            Ok(spans) => {
                inner.zipkin.lock().unwrap().extend(spans);
                status(202)
            }
            Err(_) => status(400),
        },
        _ => status(404),
    }
}

fn status(code: u16) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(code)
        .body(Full::new(Bytes::new()))
        .unwrap()
}
