//! Distributed tracing as Istio configures Envoy's for a waypoint (istiod `tracing.go`;
//! Envoy's HTTP connection manager tracing, its OpenTelemetry and Zipkin tracers), checked
//! field by field against Envoy 1.40 (docs/envoy-observed.md section 18).
//!
//! Contract:
//! - Which tracing applies to a request: the Service's Telemetry `tracing` (merged by
//!   [`policy::trace_policy`]) completed with MeshConfig ([`Tracing::resolve`]): the
//!   provider named by Telemetry, else `defaultProviders.tracing[0]`; no provider, or
//!   `disableSpanReporting`, means no tracing at all (no header is touched). Sampling:
//!   Telemetry `randomSamplingPercentage`, else `defaultConfig.tracing.sampling`, else 1%.
//! - Per request ([`Tracing::start`], called once the route is known): Envoy's decision from
//!   `x-request-id` (`context::decide`, which also packs the reason into the id), the
//!   caller's context (W3C for `opentelemetry`, B3 for `zipkin`), our span id, and the
//!   headers that carry it upstream. A sampled request gets a [`SpanStart`]; it is finished
//!   from the access-log record when the request ends ([`SpanStart::finish`]), so span,
//!   log line and metrics describe the same request.
//! - Export ([`export`]) is off the request path: a span is handed to a bounded queue with
//!   `try_send`; a full queue drops it and counts it (`waypoint_tracing_spans_total
//!   {outcome="dropped"}`). A slow or dead collector never blocks or slows a request.

pub mod context;
pub mod export;

use std::sync::Arc;
use std::time::SystemTime;

use accesslog::AccessLogRecord;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use policy::{CustomTag, TracingPolicy};

use crate::config::meshconfig::{
    MeshConfig, TracingProvider, TracingProviderKind, TracingSettings,
};
use context::{Parent, TraceId, hex};
pub use export::{SpanExporter, TraceStats};

/// Envoy's default `max_path_tag_length`.
const DEFAULT_MAX_PATH_TAG_LENGTH: usize = 256;

/// Who reports the spans: the `node` Envoy would have (istiod's waypoint bootstrap) and
/// the Istio tags istiod adds (`buildServiceTags`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// `waypoint~<pod IP>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    pub id: String,
    /// The node's cluster, `<gateway>.<namespace>`: the spans' service name.
    pub cluster: String,
    /// The pod IP (Zipkin `localEndpoint.ipv4`).
    pub ip: Option<std::net::IpAddr>,
    pub namespace: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub mesh_id: String,
    pub cluster_id: String,
}

impl NodeInfo {
    /// From the waypoint pod's environment (istiod's waypoint template sets `POD_NAME`,
    /// `POD_NAMESPACE`, `INSTANCE_IP`, `ISTIO_META_MESH_ID`, `ISTIO_META_CLUSTER_ID`) and the
    /// Gateway this waypoint serves.
    pub fn from_env(
        gateway: &str,
        namespace: &str,
        cluster_id: &str,
        trust_domain: &str,
    ) -> NodeInfo {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let ip = env("INSTANCE_IP").and_then(|v| v.parse().ok());
        let pod = env("POD_NAME").unwrap_or_else(|| gateway.to_string());
        let ip_text = ip.map_or_else(
            || "127.0.0.1".to_string(),
            |ip: std::net::IpAddr| ip.to_string(),
        );
        NodeInfo {
            id: format!("waypoint~{ip_text}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
            cluster: format!("{gateway}.{namespace}"),
            ip,
            namespace: namespace.to_string(),
            canonical_service: env("CANONICAL_SERVICE").unwrap_or_else(|| gateway.to_string()),
            canonical_revision: env("CANONICAL_REVISION").unwrap_or_else(|| "latest".into()),
            mesh_id: env("ISTIO_META_MESH_ID").unwrap_or_else(|| trust_domain.to_string()),
            cluster_id: cluster_id.to_string(),
        }
    }
}

/// One tracing provider in use: its settings and its exporter.
pub struct Tracer {
    pub name: String,
    pub provider: TracingProvider,
    pub exporter: SpanExporter,
}

/// The tracers of the MeshConfig in force; swapped with it.
#[derive(Default)]
pub struct Tracing {
    tracers: Vec<Arc<Tracer>>,
    settings: TracingSettings,
    node: Option<Arc<NodeInfo>>,
}

/// What applies to one request.
pub struct Active<'a> {
    tracer: &'a Arc<Tracer>,
    per_10000: u32,
    use_request_id: bool,
    istio_tags: bool,
    custom_tags: &'a [(String, CustomTag)],
    node: &'a Arc<NodeInfo>,
    max_path: usize,
}

impl Tracing {
    /// Build the tracers of `mesh`, keeping those of `previous` whose provider is unchanged
    /// (their queue, connections and counters carry on).
    pub fn build(
        mesh: &MeshConfig,
        node: NodeInfo,
        previous: &Tracing,
        resolver: export::Resolver,
        queue: usize,
    ) -> Tracing {
        let mut tracers = Vec::new();
        for p in &mesh.extension_providers {
            let crate::config::meshconfig::ProviderKind::Tracing(t) = &p.kind else {
                continue;
            };
            let kept = previous
                .tracers
                .iter()
                .find(|old| old.name == p.name && old.provider == *t)
                .filter(|_| previous.node.as_deref() == Some(&node));
            let tracer = match kept {
                Some(old) => old.clone(),
                None => Arc::new(Tracer {
                    name: p.name.clone(),
                    provider: t.clone(),
                    exporter: SpanExporter::spawn(
                        &p.name,
                        t.clone(),
                        node.clone(),
                        resolver.clone(),
                        queue,
                    ),
                }),
            };
            tracers.push(tracer);
        }
        Tracing {
            tracers,
            settings: mesh.tracing.clone(),
            node: Some(Arc::new(node)),
        }
    }

    /// Every tracer, for metrics and dumps.
    pub fn tracers(&self) -> &[Arc<Tracer>] {
        &self.tracers
    }

    fn tracer(&self, name: &str) -> Option<&Arc<Tracer>> {
        self.tracers
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// The tracing of a Service's traffic, or `None` (nothing to do: the fast path).
    pub fn resolve<'a>(&'a self, policy: &'a TracingPolicy) -> Option<Active<'a>> {
        let node = self.node.as_ref()?;
        let spec = policy.spec();
        let provider = provider_name(policy, &self.settings)?;
        // istiod warns and configures no tracing when the provider cannot be found.
        let tracer = self.tracer(provider)?;
        let percent = sampling_percent(policy, &self.settings);
        let custom_tags = match spec.and_then(|s| s.custom_tags.as_deref()) {
            Some(tags) if !tags.is_empty() => tags,
            _ => &self.settings.custom_tags,
        };
        let max_path = match (
            tracer.provider.max_tag_length,
            self.settings.max_path_tag_length,
        ) {
            (0, 0) => DEFAULT_MAX_PATH_TAG_LENGTH,
            (0, n) | (n, _) => n as usize,
        };
        Some(Active {
            tracer,
            // Envoy keeps the percentage as a fraction of 10000.
            per_10000: (percent * 100.0) as u32,
            use_request_id: spec
                .and_then(|s| s.use_request_id_for_trace_sampling)
                .unwrap_or(true),
            istio_tags: spec.and_then(|s| s.enable_istio_tags).unwrap_or(true),
            custom_tags,
            node,
            max_path,
        })
    }
}

/// The provider that applies (istiod: Telemetry's, else `defaultProviders.tracing[0]`;
/// none, or `disableSpanReporting`: no tracing at all).
fn provider_name<'a>(policy: &'a TracingPolicy, settings: &'a TracingSettings) -> Option<&'a str> {
    let spec = policy.spec();
    let provider = spec
        .and_then(|s| s.provider.as_deref())
        .or(settings.default_providers.first().map(String::as_str))?;
    (spec.and_then(|s| s.disable_span_reporting) != Some(true)).then_some(provider)
}

/// Telemetry `randomSamplingPercentage`, else `defaultConfig.tracing.sampling` (1%).
fn sampling_percent(policy: &TracingPolicy, settings: &TracingSettings) -> f64 {
    policy
        .spec()
        .and_then(|s| s.random_sampling_percentage)
        .unwrap_or(settings.sampling)
        .clamp(0.0, 100.0)
}

/// What `waypoint explain` says about a Service's tracing.
pub fn describe(policy: &TracingPolicy, mesh: &MeshConfig) -> Option<String> {
    let from = policy
        .spec()
        .map(|s| s.sources.join(", "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "MeshConfig defaultProviders".into());
    if policy.spec().and_then(|s| s.disable_span_reporting) == Some(true) {
        return Some(format!("{from}: span reporting disabled"));
    }
    let name = provider_name(policy, &mesh.tracing)?;
    let Some((name, p)) = mesh.tracing_provider(name) else {
        return Some(format!(
            "{from}: provider {name:?} is not an opentelemetry or zipkin provider of the mesh config: no tracing"
        ));
    };
    let how = match &p.kind {
        TracingProviderKind::OtlpGrpc { .. } => "OTLP/gRPC",
        TracingProviderKind::OtlpHttp { .. } => "OTLP/HTTP",
        TracingProviderKind::Zipkin { .. } => "Zipkin",
    };
    Some(format!(
        "{from}: {name} ({how} to {}:{}), {}% sampled",
        p.service,
        p.port,
        sampling_percent(policy, &mesh.tracing)
    ))
}

/// Everything about the request the span needs before its end.
pub struct StartInfo<'a> {
    /// The route's decorator operation (`<host>:<port><path>`).
    pub operation: String,
    /// `x-forwarded-proto` (`http` when absent), `:authority`, path with query.
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// The client's address (`peer.address`: its IP).
    pub peer: Option<std::net::IpAddr>,
}

/// A span tag: Envoy's names are static (no allocation per span); custom tags' are owned.
pub type Tag = (std::borrow::Cow<'static, str>, String);

/// A sampled request's span, waiting for the request to end.
pub struct SpanStart {
    tracer: Arc<Tracer>,
    trace_id: TraceId,
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    remote_parent: bool,
    tracestate: String,
    start: SystemTime,
    name: String,
    /// Tags known at the start: Istio's, the custom ones, `http.url`, ...
    tags: Vec<Tag>,
    node: Arc<NodeInfo>,
}

/// The outcome of [`Active::start`]: headers to send upstream, and the span if sampled.
pub struct Started {
    pub upstream: Vec<(HeaderName, HeaderValue)>,
    pub span: Option<Box<SpanStart>>,
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let v: [u8; N] = rand::random();
        if v != [0; N] {
            return v;
        }
    }
}

fn header(name: &'static str, value: String) -> Option<(HeaderName, HeaderValue)> {
    HeaderValue::from_str(&value)
        .ok()
        .map(|v| (HeaderName::from_static(name), v))
}

/// The trace a request's span belongs to, as read from (or started for) the request.
struct SpanContext {
    trace_id: TraceId,
    parent: Option<[u8; 8]>,
    sampled: bool,
    tracestate: String,
}

/// OpenTelemetry (W3C `traceparent`/`tracestate`): Envoy's OpenTelemetry tracer follows a
/// valid parent's sampled flag; ours is sent upstream as the parent.
fn w3c_context(
    headers: &HeaderMap,
    reason: context::Reason,
    span_id: [u8; 8],
    upstream: &mut Vec<(HeaderName, HeaderValue)>,
) -> SpanContext {
    // Envoy's OpenTelemetry tracer follows a valid parent's sampled flag.
    let (trace_id, parent, sampled, state) = match context::w3c_parent(headers) {
        Some(Parent {
            trace_id,
            span_id,
            sampled,
            tracestate,
        }) => (
            trace_id,
            Some(span_id),
            sampled,
            tracestate.unwrap_or_default(),
        ),
        None => (
            TraceId {
                bytes: random_id(),
                narrow: false,
            },
            None,
            reason.traced(),
            String::new(),
        ),
    };
    upstream.extend(header(
        "traceparent",
        format!(
            "00-{}-{}-{}",
            trace_id.hex(),
            hex(&span_id),
            if sampled { "01" } else { "00" }
        ),
    ));
    upstream.extend(header("tracestate", state.clone()));
    SpanContext {
        trace_id,
        parent,
        sampled,
        tracestate: state,
    }
}

/// Zipkin (B3 `x-b3-*` or `b3`, W3C as well with `USE_B3_WITH_W3C_PROPAGATION`).
fn b3_context(
    headers: &HeaderMap,
    reason: context::Reason,
    span_id: [u8; 8],
    (trace_id_128, w3c): (bool, bool),
    upstream: &mut Vec<(HeaderName, HeaderValue)>,
) -> SpanContext {
    let b3 = context::b3(headers);
    let w3c_parent = if w3c {
        context::w3c_parent(headers)
    } else {
        None
    };
    let sampled = b3
        .sampled
        .or(w3c_parent
            .as_ref()
            .filter(|_| b3.ids.is_none())
            .map(|p| p.sampled))
        .unwrap_or(reason.traced());
    let (trace_id, parent, span_id) = match (b3.ids, &w3c_parent) {
        (Some((t, s)), _) => (t, Some(s), span_id),
        (None, Some(p)) => (p.trace_id, Some(p.span_id), span_id),
        (None, None) => {
            // A new root: its id is the trace id's low half (Envoy's Zipkin).
            let mut bytes: [u8; 16] = random_id();
            bytes[8..].copy_from_slice(&span_id);
            if !trace_id_128 {
                bytes[..8].fill(0);
            }
            (
                TraceId {
                    bytes,
                    narrow: !trace_id_128,
                },
                None,
                span_id,
            )
        }
    };
    upstream.extend(header("x-b3-traceid", trace_id.hex()));
    upstream.extend(header("x-b3-spanid", hex(&span_id)));
    if let Some(p) = parent.filter(|_| b3.ids.is_some() || w3c_parent.is_some()) {
        upstream.extend(header("x-b3-parentspanid", hex(&p)));
    }
    upstream.extend(header(
        "x-b3-sampled",
        if sampled { "1" } else { "0" }.into(),
    ));
    if w3c {
        upstream.extend(header(
            "traceparent",
            format!(
                "00-{}-{}-{}",
                hex(&trace_id.bytes),
                hex(&span_id),
                if sampled { "01" } else { "00" }
            ),
        ));
    }
    SpanContext {
        trace_id,
        parent,
        sampled,
        tracestate: String::new(),
    }
}

impl Active<'_> {
    /// Decide, read the caller's context, and make ours (see the module docs).
    pub fn start(&self, headers: &mut HeaderMap, info: StartInfo<'_>) -> Started {
        let reason = context::decide(headers, self.use_request_id, self.per_10000, rand::random);
        let span_id: [u8; 8] = random_id();
        let mut upstream = Vec::new();
        let ctx = match &self.tracer.provider.kind {
            TracingProviderKind::OtlpGrpc { .. } | TracingProviderKind::OtlpHttp { .. } => {
                w3c_context(headers, reason, span_id, &mut upstream)
            }
            TracingProviderKind::Zipkin {
                trace_id_128, w3c, ..
            } => b3_context(
                headers,
                reason,
                span_id,
                (*trace_id_128, *w3c),
                &mut upstream,
            ),
        };
        if !ctx.sampled {
            return Started {
                upstream,
                span: None,
            };
        }
        let tags = self.start_tags(headers, &info);
        Started {
            upstream,
            span: Some(Box::new(SpanStart {
                tracer: self.tracer.clone(),
                trace_id: ctx.trace_id,
                span_id,
                remote_parent: ctx.parent.is_some(),
                parent: ctx.parent,
                tracestate: ctx.tracestate,
                start: SystemTime::now(),
                name: info.operation,
                tags,
                node: self.node.clone(),
            })),
        }
    }

    /// The tags known when the request starts: Istio's, the custom ones, Envoy's request tags.
    fn start_tags(&self, headers: &HeaderMap, info: &StartInfo<'_>) -> Vec<Tag> {
        let mut tags: Vec<Tag> = Vec::with_capacity(28);
        let node = self.node;
        if self.istio_tags {
            tags.push((
                "istio.canonical_revision".into(),
                node.canonical_revision.clone(),
            ));
            tags.push((
                "istio.canonical_service".into(),
                node.canonical_service.clone(),
            ));
            tags.push(("istio.cluster_id".into(), node.cluster_id.clone()));
            tags.push(("istio.mesh_id".into(), node.mesh_id.clone()));
            tags.push(("istio.namespace".into(), node.namespace.clone()));
        }
        for (name, tag) in self.custom_tags {
            let value = match tag {
                CustomTag::Literal(v) => Some(v.clone()),
                CustomTag::Environment { name, default } => std::env::var(name)
                    .ok()
                    .or_else(|| (!default.is_empty()).then(|| default.clone())),
                CustomTag::Header { name, default } => headers
                    .get(name.as_str())
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .or_else(|| (!default.is_empty()).then(|| default.clone())),
            };
            if let Some(v) = value {
                tags.push((name.clone().into(), v));
            }
        }
        let mut url = format!("{}://{}{}", info.scheme, info.authority, info.path);
        if url.len() > self.max_path {
            let mut cut = self.max_path;
            while !url.is_char_boundary(cut) {
                cut -= 1;
            }
            url.truncate(cut);
        }
        tags.push(("http.url".into(), url));
        tags.push((
            "downstream_cluster".into(),
            headers
                .get("x-envoy-downstream-service-cluster")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string(),
        ));
        if let Some(ip) = info.peer {
            tags.push(("peer.address".into(), ip.to_string()));
        }
        let text = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        if let Some(id) = text("x-client-trace-id") {
            tags.push(("guid:x-client-trace-id".into(), id));
        }
        // Envoy `addGrpcRequestTags` for gRPC requests.
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc {
            tags.push(("grpc.path".into(), info.path.to_string()));
            tags.push(("grpc.authority".into(), info.authority.to_string()));
            tags.extend(text("content-type").map(|v| ("grpc.content_type".into(), v)));
            tags.extend(text("grpc-timeout").map(|v| ("grpc.timeout".into(), v)));
        }
        tags
    }
}

impl SpanStart {
    /// Add a tag known only to the caller (the client's workload).
    pub fn tag(&mut self, key: &str, value: &str) {
        self.tags.push((key.to_string().into(), value.to_string()));
    }
}

/// A finished span, ready for export.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace_id: TraceId,
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub remote_parent: bool,
    pub tracestate: String,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Envoy's `error` tag: a 5xx or no response at all.
    pub error: bool,
    pub tags: Vec<Tag>,
    pub node: Arc<NodeInfo>,
}

impl SpanStart {
    /// Finish from the access-log record (status, flags, sizes, cluster) and hand the span to
    /// its exporter (never waits).
    #[allow(clippy::boxed_local)] // kept boxed in the log record; consumed here
    pub fn finish(self: Box<Self>, r: &AccessLogRecord) {
        let SpanStart {
            tracer,
            trace_id,
            span_id,
            parent,
            remote_parent,
            tracestate,
            start,
            name,
            mut tags,
            node,
        } = *self;
        let dash = |v: Option<&str>| v.filter(|s| !s.is_empty()).unwrap_or("-").to_string();
        let code = r.response_code;
        let flags = r.response_flags.to_string();
        tags.push(("component".into(), "proxy".into()));
        if let Some(id) = &r.request_id {
            tags.push(("guid:x-request-id".into(), id.clone()));
        }
        tags.push(("http.method".into(), dash(r.method.as_deref())));
        tags.push(("http.protocol".into(), dash(r.protocol)));
        tags.push(("http.status_code".into(), code.to_string()));
        tags.push(("node_id".into(), node.id.clone()));
        tags.push(("request_size".into(), r.bytes_received.to_string()));
        tags.push(("response_flags".into(), dash(Some(flags.as_str()))));
        tags.push(("response_size".into(), r.bytes_sent.to_string()));
        // Only with a cluster (Envoy `setCommonTags`): a 404 NR has none.
        if let Some(c) = &r.upstream_cluster {
            tags.push(("upstream_cluster".into(), c.to_string()));
            tags.push(("upstream_cluster.name".into(), c.to_string()));
        }
        tags.push(("user_agent".into(), dash(r.user_agent.as_deref())));
        let mut error = code == 0 || code >= 500;
        // Envoy `addGrpcResponseTags`: a server-side gRPC failure is an error too.
        if let Some(status) = r.grpc_status {
            tags.push(("grpc.status_code".into(), status.to_string()));
            if let Some(m) = &r.grpc_message {
                tags.push(("grpc.message".into(), m.clone()));
            }
            error |= matches!(status, 2 | 4 | 8 | 12 | 13 | 14 | 15);
        }
        if error {
            tags.push(("error".into(), "true".into()));
        }
        tags.sort();
        tracer.exporter.submit(FinishedSpan {
            trace_id,
            span_id,
            parent,
            remote_parent,
            tracestate,
            name,
            start,
            end: SystemTime::now(),
            error,
            tags,
            node,
        });
    }
}

/// Stats of every tracer, in Prometheus text.
pub fn render(tracing: &Tracing, out: &mut String) {
    use std::fmt::Write as _;
    if tracing.tracers.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP waypoint_tracing_spans_total Spans by tracing provider and outcome (exported, dropped: queue full, failed: the collector refused or did not answer).\n# TYPE waypoint_tracing_spans_total counter"
    );
    for t in &tracing.tracers {
        let s = &t.exporter.stats;
        for (outcome, n) in [
            ("exported", s.exported()),
            ("dropped", s.dropped()),
            ("failed", s.failed()),
        ] {
            let _ = writeln!(
                out,
                "waypoint_tracing_spans_total{{provider=\"{}\",outcome=\"{outcome}\"}} {n}",
                t.name
            );
        }
    }
}
