//! Span export, off the request path: a bounded queue per provider ([`QUEUE`] spans), one
//! task that batches (up to [`MAX_BATCH`] spans or [`FLUSH`] after the first) and sends one
//! batch at a time, each within the provider's timeout. A full queue drops the span and
//! counts it; a failed or timed-out batch is counted and not retried (Envoy's tracers do
//! not retry either), so a dead collector costs a bounded queue and nothing else.
//!
//! Wire formats, as Envoy 1.40 sends them (docs/envoy-observed.md section 18):
//! - OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` over h2c,
//!   `:authority` the provider's hostname (istiod's `envoy_grpc.authority`), `initialMetadata`
//!   added; one ResourceSpans with `service.name` = the node's cluster.
//! - OTLP/HTTP: protobuf `POST <path>` (`content-type: application/x-protobuf`), `headers`.
//! - Zipkin: JSON v2 list `POST <path>` (default `/api/v2/spans`), `headers`.
//!
//! The collector is the provider's `service`: the Service of that name in the
//! configuration (an endpoint of its `outbound|<port>||<host>` cluster, as istiod resolves
//! it), else the hostname through DNS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tracing::debug;

use super::context::hex;
use super::{FinishedSpan, NodeInfo};
use crate::config::meshconfig::{TracingProvider, TracingProviderKind};

/// Spans waiting for export per provider by default (the OpenTelemetry SDK's batch
/// processor default; `Limits::max_queued_spans`).
pub const QUEUE: usize = 2048;
/// Spans per export request.
pub const MAX_BATCH: usize = 512;
/// How long a batch waits for more spans after its first.
pub const FLUSH: Duration = Duration::from_secs(1);
/// Export requests in flight at once per provider: the queue keeps draining while a batch
/// waits for the collector's answer (Envoy's OpenTelemetry exporter does not wait for one
/// answer before sending the next batch either); bounded, so a slow collector holds at most
/// this many batches besides the queue.
pub const MAX_IN_FLIGHT: usize = 4;
/// Export timeout when the provider sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// `(service, port)` -> an endpoint of that Service and its hostname.
pub type FindCollector = Arc<dyn Fn(&str, u16) -> Option<(SocketAddr, String)> + Send + Sync>;

/// Finds the collector: `find` maps `(service, port)` to an endpoint of the Service of that
/// name and the hostname to present; `dns` resolves a host outside the configuration (the
/// waypoint's resolver: `--dns-server` or the system's).
#[derive(Clone)]
pub struct Resolver {
    pub find: FindCollector,
    pub dns: Arc<crate::upstream::dns::DnsEndpoints>,
}

/// Spans per outcome.
#[derive(Debug, Default)]
pub struct TraceStats {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl TraceStats {
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// The sending side of one provider's queue.
pub struct SpanExporter {
    tx: mpsc::Sender<FinishedSpan>,
    pub stats: Arc<TraceStats>,
}

impl SpanExporter {
    /// Start the export task (needs a Tokio runtime).
    pub fn spawn(
        name: &str,
        provider: TracingProvider,
        node: NodeInfo,
        resolver: Resolver,
        queue: usize,
    ) -> SpanExporter {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let stats = Arc::new(TraceStats::default());
        let task = Task {
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            name: name.to_string(),
            provider,
            node,
            resolver,
            stats: stats.clone(),
            grpc: Arc::new(std::sync::Mutex::new(None)),
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(4)
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build_http(),
        };
        match export_runtime() {
            Some(rt) => drop(rt.spawn(task.run(rx))),
            None => drop(tokio::spawn(task.run(rx))),
        }
        SpanExporter { tx, stats }
    }

    /// Queue a span; never waits. A full queue drops it (counted).
    pub fn submit(&self, span: FinishedSpan) {
        if self.tx.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The export tasks' own thread and runtime: encoding a batch of spans and talking to the
/// collector never wait for a request worker's turn, nor make requests wait behind a whole
/// batch on the worker (on a machine with a free core, they run beside it). At the normal
/// priority: a lower one starved the export on a saturated single core and dropped two
/// thirds of the spans at 100% sampling (benches, 2026-12-07). `None` when the thread cannot
/// be started (then the caller's runtime is used).
fn export_runtime() -> Option<tokio::runtime::Handle> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Handle>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("waypoint-trace".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(_) => {
                            let _ = tx.send(None);
                            return;
                        }
                    };
                    let _ = tx.send(Some(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                });
            spawned.ok()?;
            rx.recv().ok().flatten()
        })
        .clone()
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// One provider's exporter; cloned into each export in flight.
#[derive(Clone)]
struct Task {
    name: String,
    provider: TracingProvider,
    node: NodeInfo,
    resolver: Resolver,
    stats: Arc<TraceStats>,
    /// The gRPC client and the endpoint it was made for (forgotten after a failure).
    grpc: Arc<std::sync::Mutex<Option<GrpcClient>>>,
    http: HttpClient,
    in_flight: Arc<tokio::sync::Semaphore>,
}

type GrpcClient = (SocketAddr, TraceServiceClient<tonic::transport::Channel>);

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<FinishedSpan>) {
        while let Some(first) = rx.recv().await {
            let mut batch = Vec::with_capacity(64);
            batch.push(first);
            let deadline = tokio::time::Instant::now() + FLUSH;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            // At most MAX_IN_FLIGHT exports at once: beyond that the loop waits here and
            // the bounded queue fills (and drops) instead of memory growing.
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let task = self.clone();
            tokio::spawn(async move {
                task.export_counted(&batch).await;
                drop(permit);
            });
        }
    }

    async fn export_counted(&self, batch: &[FinishedSpan]) {
        let n = batch.len() as u64;
        match tokio::time::timeout(self.timeout(), self.export(batch)).await {
            Ok(Ok(())) => {
                self.stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                debug!(provider = %self.name, error = %e, spans = n, "span export failed");
                self.stats.failed.fetch_add(n, Ordering::Relaxed);
                self.forget_client();
            }
            Err(_) => {
                debug!(provider = %self.name, spans = n, "span export timed out");
                self.stats.failed.fetch_add(n, Ordering::Relaxed);
                self.forget_client();
            }
        }
    }

    fn forget_client(&self) {
        if let Ok(mut g) = self.grpc.lock() {
            *g = None;
        }
    }

    fn timeout(&self) -> Duration {
        match &self.provider.kind {
            TracingProviderKind::OtlpGrpc { timeout, .. }
            | TracingProviderKind::OtlpHttp { timeout, .. } => timeout.unwrap_or(DEFAULT_TIMEOUT),
            TracingProviderKind::Zipkin { timeout, .. } => *timeout,
        }
    }

    /// The collector's address and the hostname to present.
    async fn collector(&self) -> anyhow::Result<(SocketAddr, String)> {
        let (service, port) = (self.provider.service.as_str(), self.provider.port);
        if let Some(found) = (self.resolver.find)(service, port) {
            return Ok(found);
        }
        // Outside the configuration: the hostname through DNS.
        let host = service.rsplit('/').next().unwrap_or(service).to_string();
        let ip = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => *self
                .resolver
                .dns
                .resolve_once(&host)
                .await
                .map_err(anyhow::Error::msg)?
                .first()
                .ok_or_else(|| anyhow::anyhow!("{host}: no address"))?,
        };
        Ok((SocketAddr::new(ip, port), host))
    }

    async fn export(&self, batch: &[FinishedSpan]) -> anyhow::Result<()> {
        let (addr, host) = self.collector().await?;
        match &self.provider.kind {
            TracingProviderKind::OtlpGrpc { metadata, .. } => {
                let cached = self.grpc.lock().ok().and_then(|g| g.clone());
                let client = match cached {
                    Some((a, c)) if a == addr => c,
                    _ => {
                        let endpoint =
                            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                                .origin(format!("http://{host}").parse()?)
                                .connect_timeout(DEFAULT_TIMEOUT);
                        let c = TraceServiceClient::new(endpoint.connect_lazy());
                        if let Ok(mut g) = self.grpc.lock() {
                            *g = Some((addr, c.clone()));
                        }
                        c
                    }
                };
                let mut client = client;
                let mut req = tonic::Request::new(otlp_request(&self.node, batch));
                for (k, v) in metadata {
                    if let (Ok(k), Ok(v)) = (
                        tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes()),
                        v.to_str().map(tonic::metadata::MetadataValue::try_from),
                    ) && let Ok(v) = v
                    {
                        req.metadata_mut().insert(k, v);
                    }
                }
                client.export(req).await?;
                Ok(())
            }
            TracingProviderKind::OtlpHttp { path, headers, .. } => {
                let body = otlp_request(&self.node, batch).encode_to_vec();
                let path = if path.is_empty() {
                    "/v1/traces"
                } else {
                    path.as_str()
                };
                self.post(addr, &host, path, "application/x-protobuf", headers, body)
                    .await
            }
            TracingProviderKind::Zipkin { path, headers, .. } => {
                let body = serde_json::to_vec(&zipkin_spans(&self.node, batch))?;
                self.post(addr, &host, path, "application/json", headers, body)
                    .await
            }
        }
    }

    async fn post(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        content_type: &'static str,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> anyhow::Result<()> {
        let mut req = http::Request::post(format!("http://{addr}{path}"))
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))?;
        for (k, v) in headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let resp = self.http.request(req).await?;
        let status = resp.status();
        // Drain the answer so the connection can be reused.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        if status.is_success() {
            Ok(())
        } else {
            anyhow::bail!("collector answered {status}")
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// W3C flags (sampled) with OTLP's "has is_remote" bit and the parent's remoteness, as
/// Envoy's OpenTelemetry tracer sets `flags`.
const FLAG_SAMPLED: u32 = 0x1;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// One ExportTraceServiceRequest for a batch.
pub fn otlp_request(node: &NodeInfo, batch: &[FinishedSpan]) -> ExportTraceServiceRequest {
    let spans = batch
        .iter()
        .map(|s| Span {
            trace_id: s.trace_id.bytes.to_vec(),
            span_id: s.span_id.to_vec(),
            trace_state: s.tracestate.clone(),
            parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: FLAG_SAMPLED
                | FLAG_HAS_IS_REMOTE
                | if s.remote_parent { FLAG_IS_REMOTE } else { 0 },
            name: s.name.clone(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            // Envoy's OpenTelemetry spans also carry the local zone (empty off Kubernetes
            // zones); its Zipkin spans do not.
            attributes: s
                .tags
                .iter()
                .map(|(k, v)| kv(k, v))
                .chain(std::iter::once(kv("zone", "")))
                .collect(),
            status: s.error.then(|| Status {
                message: String::new(),
                code: status::StatusCode::Error as i32,
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", &node.cluster),
                    kv("telemetry.sdk.language", "rust"),
                    kv("telemetry.sdk.name", "waypoint"),
                    kv("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "waypoint".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Zipkin v2 JSON spans for a batch, shaped as Envoy's Zipkin tracer writes them (no
/// `zone` tag; a `ss` annotation at the end).
pub fn zipkin_spans(node: &NodeInfo, batch: &[FinishedSpan]) -> Vec<serde_json::Value> {
    batch
        .iter()
        .map(|s| {
            let start = micros(s.start);
            let end = micros(s.end).max(start);
            let tags: serde_json::Map<String, serde_json::Value> = s
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                .collect();
            let mut local = serde_json::json!({"serviceName": node.cluster, "port": 0});
            match node.ip {
                Some(std::net::IpAddr::V4(ip)) => local["ipv4"] = ip.to_string().into(),
                Some(std::net::IpAddr::V6(ip)) => local["ipv6"] = ip.to_string().into(),
                None => {}
            }
            let mut span = serde_json::json!({
                "traceId": s.trace_id.hex(),
                "id": hex(&s.span_id),
                "kind": "SERVER",
                "name": s.name,
                "timestamp": start,
                "duration": end - start,
                "localEndpoint": local,
                "tags": tags,
                "annotations": [{"timestamp": end, "value": "ss"}],
            });
            if let Some(p) = s.parent {
                span["parentId"] = hex(&p).into();
            }
            span
        })
        .collect()
}
