//! The access-log record of one request, emitted exactly once: when the response body ends,
//! or when everything holding it is dropped (client went away: flag `DC`), like agentgateway's
//! `DropOnLog`. Also feeds the request metrics from the same record, so logs and metrics agree.
//!
//! Telemetry `accessLogging` decides whether the line is written (never whether metrics
//! count): with no Telemetry for the Service nothing extra is kept or evaluated; otherwise
//! the CEL filters see the finished record ([`log_allowed`]).

use std::sync::Arc;

use accesslog::{AccessLogRecord, ResponseFlag};
use tokio::time::Instant;

use crate::request::grpc_messages::GrpcMessages;
use crate::state::Shared;
use crate::telemetry::metrics::{DestId, NO_DESTINATION, Overrides, SourceId};
use http::HeaderMap;
use policy::{AccessLogPolicy, Cluster, LogAttributes, MetricsPolicy, RequestAttributes};

/// A record being filled in across the request's phases.
pub struct PendingLog {
    inner: Option<Inner>,
}

struct Inner {
    record: AccessLogRecord,
    started: Instant,
    received: Arc<crate::upstream::BodyProgress>,
    shared: Arc<Shared>,
    source: SourceId,
    /// The chosen endpoint's workload (the `destination_*` metric labels).
    dest: DestId,
    cluster: Option<Arc<Cluster>>,
    grpc: bool,
    /// Held until the record is emitted: the request counts as in flight until then.
    _in_flight: Option<crate::state::InFlight>,
    /// `None` (no Telemetry applies): every request is logged and counted with Istio's
    /// standard metrics, nothing evaluated.
    filter: Option<Box<LogFilter>>,
    /// A sampled request's span, finished from the record.
    span: Option<Box<crate::telemetry::trace::SpanStart>>,
    /// A gRPC stream's message counts, and how many were reported already.
    /// Boxed: the record lives inline in every request's future (and so in every tunnel
    /// task's size); only gRPC requests pay for this.
    grpc_messages: Option<Box<GrpcCounted>>,
}

/// A gRPC stream's message counters and the counts already reported (requests, responses).
type GrpcCounted = (Arc<GrpcMessages>, (u64, u64));

/// Istio's stats filter reports a gRPC stream's messages this often by default
/// (`tcp_reporting_duration`, 5 s; Telemetry `reportingInterval` changes it).
const GRPC_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What Telemetry decisions (access log, metrics overrides) need beyond the record.
struct LogFilter {
    policy: AccessLogPolicy,
    metrics: MetricsPolicy,
    headers: Option<HeaderMap>,
    principal: Option<String>,
}

/// Whether a finished record gets written under `policy` (Telemetry `accessLogging`):
/// the default policy always logs, `disabled` never does, CEL filters see Envoy's attributes
/// built from the record. `headers` are the request headers (when the filter reads them).
pub fn log_allowed(
    policy: &AccessLogPolicy,
    r: &AccessLogRecord,
    headers: Option<&HeaderMap>,
    principal: Option<&str>,
) -> bool {
    log_sinks(policy, r, headers, principal).any()
}

/// Where a finished record goes under `policy`: the mesh-wide log and/or the
/// `envoyFileAccessLog` providers its entries name.
pub fn log_sinks(
    policy: &AccessLogPolicy,
    r: &AccessLogRecord,
    headers: Option<&HeaderMap>,
    principal: Option<&str>,
) -> policy::LogSinks {
    if policy.is_default() {
        return policy::LogSinks {
            mesh: true,
            named: Vec::new(),
        };
    }
    if policy.is_disabled() {
        return policy::LogSinks::default();
    }
    policy.sinks(&attributes(r, headers, principal))
}

/// The Telemetry metrics overrides of a finished (HTTP) or opening (TCP) record: the
/// expressions evaluated over Envoy's attributes. `None` for the default policy.
pub fn metric_overrides(
    policy: &MetricsPolicy,
    r: &AccessLogRecord,
    headers: Option<&HeaderMap>,
    principal: Option<&str>,
) -> Option<Overrides> {
    let spec = policy.spec()?;
    let values = if spec.disabled || spec.expressions.is_empty() {
        Box::default()
    } else {
        spec.evaluate(&attributes(r, headers, principal))
    };
    Some(Overrides {
        spec: spec.clone(),
        values,
    })
}

/// Envoy's CEL attributes of a record.
fn attributes<'a>(
    r: &'a AccessLogRecord,
    headers: Option<&'a HeaderMap>,
    principal: Option<&'a str>,
) -> LogAttributes<'a> {
    let port = |a: Option<&str>| {
        a.and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map_or(0, |a| a.port())
    };
    let request = r.method.as_deref().map(|method| RequestAttributes {
        method,
        path: r.path.as_deref().unwrap_or(""),
        host: r.authority.as_deref().unwrap_or(""),
        protocol: r.protocol.unwrap_or(""),
        id: r.request_id.as_deref().unwrap_or(""),
        user_agent: r.user_agent.as_deref().unwrap_or(""),
        headers,
        size: r.bytes_received,
        duration_ms: r.duration,
    });
    LogAttributes {
        request,
        response_code: r.response_code,
        response_code_details: r.response_code_details.as_deref().unwrap_or(""),
        response_flags: r.response_flags.bits(),
        response_size: r.bytes_sent,
        source_address: r.downstream_remote_address.as_deref().unwrap_or(""),
        source_port: port(r.downstream_remote_address.as_deref()),
        source_principal: principal.unwrap_or(""),
        destination_address: r.downstream_local_address.as_deref().unwrap_or(""),
        destination_port: port(r.downstream_local_address.as_deref()),
        // Everything reaches the waypoint over HBONE: mutual TLS.
        mtls: true,
        upstream_address: r.upstream_host.as_deref().unwrap_or(""),
        cluster_name: r.upstream_cluster.as_deref().unwrap_or(""),
        route_name: r.route_name.as_deref().unwrap_or(""),
        connection_termination_details: r.connection_termination_details.as_deref().unwrap_or(""),
    }
}

impl PendingLog {
    pub fn new(
        record: AccessLogRecord,
        started: Instant,
        received: Arc<crate::upstream::BodyProgress>,
        shared: Arc<Shared>,
        source: SourceId,
        grpc: bool,
    ) -> PendingLog {
        PendingLog {
            inner: Some(Inner {
                record,
                started,
                received,
                shared,
                source,
                dest: NO_DESTINATION,
                cluster: None,
                grpc,
                _in_flight: None,
                filter: None,
                span: None,
                grpc_messages: grpc.then(|| Box::new((Arc::default(), (0, 0)))),
            }),
        }
    }

    /// Keep `guard` (the request's in-flight slot) until the record is emitted.
    pub fn hold(&mut self, guard: crate::state::InFlight) {
        if let Some(i) = self.inner.as_mut() {
            i._in_flight = Some(guard);
        }
    }

    /// The upstream cluster chosen by routing (destination labels of the metrics).
    pub fn set_cluster(&mut self, cluster: Arc<Cluster>) {
        if let Some(i) = self.inner.as_mut() {
            i.record.upstream_cluster = Some(cluster.name.clone());
            i.cluster = Some(cluster);
        }
    }

    /// The endpoint chosen (the last one tried, on retries): its Pod's workload labels the
    /// metrics' `destination_*`.
    pub fn set_endpoint(&mut self, endpoint: &policy::Endpoint) {
        if let Some(i) = self.inner.as_mut() {
            i.dest = i.shared.metrics.destination(
                endpoint.workload.as_deref(),
                &i.shared.cluster_id,
                i.shared.limits.max_metric_sources,
            );
        }
    }

    /// The Telemetry access-log and metrics policies of the Service (from the current
    /// snapshot). Both default clears any filter (fast path); `headers` is called only when
    /// an expression reads request headers and none were kept yet.
    pub fn set_telemetry(
        &mut self,
        policy: &AccessLogPolicy,
        metrics: &MetricsPolicy,
        principal: Option<&str>,
        headers: impl FnOnce() -> HeaderMap,
    ) {
        let Some(i) = self.inner.as_mut() else {
            return;
        };
        if policy.is_default() && metrics.is_default() {
            i.filter = None;
            return;
        }
        let kept = i.filter.take().and_then(|f| f.headers);
        let headers = match kept {
            Some(h) => Some(h),
            None if policy.needs_request_headers() || metrics.needs_request_headers() => {
                Some(headers())
            }
            None => None,
        };
        i.filter = Some(Box::new(LogFilter {
            policy: policy.clone(),
            metrics: metrics.clone(),
            headers,
            principal: principal.map(str::to_string),
        }));
    }

    /// Finish `span` with the record when it is emitted.
    pub fn set_span(&mut self, span: Box<crate::telemetry::trace::SpanStart>) {
        if let Some(i) = self.inner.as_mut() {
            i.span = Some(span);
        }
    }

    /// The message counters of a gRPC request (`None` for other requests): the request
    /// and response bodies count into them.
    pub fn grpc_messages(&self) -> Option<Arc<GrpcMessages>> {
        let (m, _) = &**self.inner.as_ref()?.grpc_messages.as_ref()?;
        Some(m.clone())
    }

    /// How often a long gRPC stream's messages are reported before it ends.
    pub fn grpc_report_interval(&self) -> std::time::Duration {
        self.inner
            .as_ref()
            .and_then(|i| i.filter.as_ref())
            .and_then(|f| f.metrics.spec())
            .and_then(|s| s.reporting_interval)
            .unwrap_or(GRPC_REPORT_INTERVAL)
    }

    /// Report the gRPC messages counted since the last report (periodic, as Istio's stats
    /// filter does for streams).
    pub fn report_grpc_messages(&mut self) {
        if let Some(i) = self.inner.as_mut() {
            let over = i.filter.as_ref().and_then(|f| {
                metric_overrides(
                    &f.metrics,
                    &i.record,
                    f.headers.as_ref(),
                    f.principal.as_deref(),
                )
            });
            report_grpc(i, over);
        }
    }

    /// The record, for phases to fill in. `None` only after it was emitted.
    pub fn record(&mut self) -> Option<&mut AccessLogRecord> {
        self.inner.as_mut().map(|i| &mut i.record)
    }

    /// Emit now, with `bytes_sent` response body bytes.
    pub fn finish(mut self, bytes_sent: u64) {
        self.emit(bytes_sent, false);
    }

    /// Emit now, counting `more_received` bytes beyond the request body (an upgraded
    /// session's bytes from the client) and `bytes_sent`.
    pub fn finish_with(mut self, more_received: u64, bytes_sent: u64) {
        if let Some(inner) = &self.inner {
            inner.received.add(more_received);
        }
        self.emit(bytes_sent, false);
    }

    fn emit(&mut self, bytes_sent: u64, downstream_gone: bool) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        let r = &mut inner.record;
        if downstream_gone {
            // Envoy DC: the downstream connection terminated before the response completed.
            r.response_flags.set(ResponseFlag::DC);
            if r.response_code_details.is_none() {
                r.response_code_details = Some("downstream_remote_disconnect".into());
            }
        }
        r.duration = inner.started.elapsed().as_millis() as u64;
        r.bytes_received = inner.received.received();
        r.bytes_sent = bytes_sent;
        let over = inner.filter.as_ref().and_then(|f| {
            metric_overrides(&f.metrics, r, f.headers.as_ref(), f.principal.as_deref())
        });
        if inner.grpc_messages.is_some() {
            report_grpc(&mut inner, over.clone());
        }
        let r = &inner.record;
        inner.shared.metrics.record_http(
            inner.source,
            inner.dest,
            inner.cluster.as_ref(),
            r,
            inner.grpc,
            over,
        );
        if let Some(span) = inner.span.take() {
            span.finish(&inner.record);
        }
        // No Telemetry `accessLogging` (none at all, or only metrics overrides): the mesh-wide
        // log, nothing evaluated.
        match inner.filter.as_ref().filter(|f| !f.policy.is_default()) {
            None => {
                if let Some(logger) = &inner.shared.access_log {
                    logger.log(inner.record);
                }
            }
            Some(f) => {
                let sinks = log_sinks(
                    &f.policy,
                    &inner.record,
                    f.headers.as_ref(),
                    f.principal.as_deref(),
                );
                crate::state::write_log(&inner.shared, &sinks, inner.record);
            }
        }
    }

    /// Emit as "client went away" (used on drop of an unfinished response).
    pub fn abandon(mut self, bytes_sent: u64) {
        self.emit(bytes_sent, true);
    }
}

/// Count a gRPC stream's messages since its last report.
fn report_grpc(i: &mut Inner, over: Option<Overrides>) {
    let Some(counted) = i.grpc_messages.as_deref_mut() else {
        return;
    };
    let (messages, reported) = counted;
    let (requests, responses) = messages.counts();
    let delta = (requests - reported.0, responses - reported.1);
    *reported = (requests, responses);
    i.shared.metrics.record_grpc_messages(
        i.source,
        i.dest,
        i.cluster.as_ref(),
        delta.0,
        delta.1,
        over,
    );
}

impl Drop for PendingLog {
    fn drop(&mut self) {
        self.emit(0, true);
    }
}
