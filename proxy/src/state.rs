//! State shared by every connection and request: the current config snapshot (swapped whole
//! on reload), upstream pools, the access logger, metrics, limits, the drain signal, fetched
//! JWKS, the MeshConfig and the ext_authz client.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use accesslog::AccessLogger;
use arc_swap::ArcSwap;
use hbone::server::ServerStats;
use policy::Snapshot;

use crate::config::jwks::JwksCache;
use crate::config::meshconfig::MeshConfig;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstreams;
use crate::upstream::extauthz::ExtAuthzClient;

/// Request-path limits, defaults as Envoy's (documented in the README).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request header block limit: Envoy `max_request_headers_kb` default 60 KiB -> 431.
    pub max_request_headers: usize,
    /// How long to wait for the first bytes of a tunnel on a port of unknown protocol before
    /// treating it as TCP (Envoy listener-filter timeout, 15 s; protocol.md 2.3).
    pub sniff_timeout: Duration,
    /// An HTTP/1.1 request head must arrive within this once its first byte did: 408 and
    /// close otherwise (slowloris). Envoy's waypoint has no such bound.
    pub request_header_timeout: Duration,
    /// An inner HTTP connection with no request in flight and no bytes for this long is
    /// closed (Envoy HCM `idle_timeout` default: 1 h).
    pub idle_timeout: Duration,
    /// The upstream must start its response within this once the request is complete
    /// (`None`: wait forever, as Istio's default route timeout 0s). HTTPRoute timeouts
    /// override it per route.
    pub upstream_response_timeout: Option<Duration>,
    /// A request body the client leaves unfinished without a byte for this long is answered
    /// 408 `stream timeout` (flag `SI`): Envoy's HCM `stream_idle_timeout` default (5 min).
    /// Istio sets 0 (off) on waypoint chains; `None` here is that (a stalled upload then
    /// waits forever, as it does in Envoy's waypoint).
    pub stream_idle_timeout: Option<Duration>,
    /// Requests in flight at once across the process; beyond it requests are shed with
    /// 503 `OM` instead of queueing without bound.
    pub max_requests: usize,
    /// Resident memory ceiling in bytes (`None`: none): above it new requests and tunnels
    /// are shed until memory falls back.
    pub max_memory: Option<u64>,
    /// RequestMirror copies in flight at once; beyond it copies are skipped and counted, so
    /// a slow mirror target never grows the waypoint's state (Envoy's shadows are best
    /// effort too).
    pub max_mirrors_in_flight: usize,
    /// Finished spans waiting for export, per tracing provider; beyond it spans are dropped
    /// and counted (`waypoint_tracing_spans_total{outcome="dropped"}`).
    pub max_queued_spans: usize,
    /// Source labels from the CONNECT `baggage` (Istio AMBIENT_ENABLE_BAGGAGE, off by
    /// default): client-supplied, so only when the operator trusts its ztunnels to set it.
    pub metrics_baggage: bool,
    /// Distinct source label sets kept for metrics; beyond it new sources are counted under
    /// one `overflow` set (`waypoint_metrics_source_overflow_total`); the same bound applies
    /// to destination workload sets (`waypoint_metrics_destination_overflow_total`).
    pub max_metric_sources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_headers: 60 * 1024,
            sniff_timeout: Duration::from_secs(15),
            request_header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            upstream_response_timeout: Some(Duration::from_secs(300)),
            stream_idle_timeout: Some(Duration::from_secs(300)),
            max_requests: 100_000,
            max_mirrors_in_flight: 1024,
            max_queued_spans: crate::telemetry::trace::export::QUEUE,
            metrics_baggage: false,
            max_metric_sources: 10_000,
            max_memory: None,
        }
    }
}

/// See the module docs.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// The endpoints of DNS clusters (ServiceEntry `resolution: DNS`), kept fresh.
    pub dns: Arc<crate::upstream::dns::DnsEndpoints>,
    /// Names resolved for `DYNAMIC_DNS` ServiceEntries (Envoy's dynamic forward proxy).
    pub dynamic_hosts: Arc<crate::upstream::dynamic_dns::DynamicHosts>,
    pub upstreams: Upstreams,
    pub access_log: Option<AccessLogger>,
    /// MeshConfig `envoyFileAccessLog` providers Telemetry may select, with their loggers.
    pub log_providers: arc_swap::ArcSwap<Vec<LogProvider>>,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Set once draining started (readiness answers 503).
    pub draining: std::sync::atomic::AtomicBool,
    pub hbone_stats: Arc<ServerStats>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub last_reload_error: Mutex<Option<String>>,
    /// Unix time at which our certificate expires (readiness fails after it).
    pub cert_not_after: std::sync::atomic::AtomicI64,
    pub cert_reloads: AtomicU64,
    /// Remote JWKS for RequestAuthentication `jwksUri`, kept in step with the snapshot.
    pub jwks: JwksCache,
    /// The MeshConfig in force (`--mesh-config` at start, or the `istio` ConfigMap in
    /// `--kube` mode, swapped with the snapshot): extension providers for CUSTOM.
    pub mesh: ArcSwap<MeshConfig>,
    /// The Kubernetes watches (`--kube`), for readiness, metrics and `/config_dump`.
    pub discovery: Option<discovery::Source>,
    /// Whether a configuration from the configured source is installed (always true for
    /// files; in `--kube` mode, once the first complete list compiled).
    pub config_installed: std::sync::atomic::AtomicBool,
    /// Endpoint-only updates applied in place (`--kube`), without a compile.
    pub endpoint_refreshes: AtomicU64,
    /// `ISTIO_META_CLUSTER_ID` (metrics' `source_cluster` for clients found in the API).
    pub cluster_id: Arc<str>,
    /// Client for CUSTOM (ext_authz HTTP) authorizers.
    pub ext_authz: ExtAuthzClient,
    /// Client for CUSTOM gRPC (`envoyExtAuthzGrpc`) authorizers.
    pub ext_authz_grpc: crate::upstream::extauthz_grpc::GrpcAuthzClient,
    /// CUSTOM check outcomes and latency.
    pub ext_authz_stats: crate::telemetry::authz::ExtAuthzStats,
    /// Generation of the configuration in force: 1 at start, +1 on every accepted reload.
    pub config_version: AtomicU64,
    /// Requests in flight (overload shedding).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Set while resident memory is above `Limits::max_memory`.
    pub memory_pressure: std::sync::atomic::AtomicBool,
    /// Requests and tunnels shed for overload.
    pub shed: AtomicU64,
    /// Busy tunnels, to give memory back once load drops (memory/mod.rs).
    pub reclaim: Arc<crate::memory::Reclaim>,
    /// RequestMirror copies in flight (bounded by [`Limits::max_mirrors_in_flight`]).
    pub mirrors_in_flight: std::sync::atomic::AtomicUsize,
    /// Mirror copies not sent because the bound was reached.
    pub mirrors_skipped: AtomicU64,
    /// The tracing providers of the MeshConfig in force, with their exporters
    /// ([`install_tracing`]).
    pub tracing: ArcSwap<crate::telemetry::trace::Tracing>,
}

/// Build (or rebuild, after a MeshConfig change) the tracers; exporters of unchanged
/// providers carry on. Collectors are found in the snapshot in force at export time.
pub fn install_tracing(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let resolver = crate::telemetry::trace::export::Resolver {
        find: Arc::new(move |service: &str, port| {
            let shared = weak.upgrade()?;
            let snapshot = shared.snapshot.load();
            let cluster = snapshot.extension_cluster(service, port)?;
            let endpoints = cluster.endpoints();
            let e = crate::upstream::pick_endpoint(&endpoints, &[], rand::random::<u64>())?;
            Some((e.addr, cluster.hostname.to_string()))
        }),
        dns: shared.dns.clone(),
    };
    let snapshot = shared.snapshot.load();
    let node = crate::telemetry::trace::NodeInfo::from_env(
        &snapshot.gateway.name,
        &snapshot.gateway.namespace,
        &shared.cluster_id,
        &snapshot.trust_domain,
    );
    let mesh = shared.mesh.load();
    let previous = shared.tracing.load();
    let built = crate::telemetry::trace::Tracing::build(
        &mesh,
        node,
        &previous,
        resolver,
        shared.limits.max_queued_spans,
    );
    shared.tracing.store(Arc::new(built));
}

/// Counts one request in flight for its whole life (overload shedding).
pub struct InFlight(pub std::sync::Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Seconds until our certificate expires (negative once expired).
pub fn cert_seconds_left(shared: &Shared) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    shared
        .cert_not_after
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(now)
}

/// One `envoyFileAccessLog` provider and the logger writing it.
pub struct LogProvider {
    pub name: Arc<str>,
    pub provider: crate::config::meshconfig::FileAccessLogProvider,
    pub logger: AccessLogger,
}

/// Open the loggers of `mesh`'s file providers, keeping the running ones that did not change
/// (`current`). A provider whose file cannot be opened is skipped with an error logged
/// (Telemetry naming it then writes nothing there).
pub fn log_providers(
    mesh: &crate::config::meshconfig::MeshConfig,
    current: &[LogProvider],
) -> Vec<LogProvider> {
    mesh.file_log_providers()
        .into_iter()
        .filter_map(|(name, provider)| {
            if let Some(p) = current
                .iter()
                .find(|p| *p.name == *name && p.provider == provider)
            {
                return Some(LogProvider {
                    name: p.name.clone(),
                    provider,
                    logger: p.logger.clone(),
                });
            }
            match provider.logger() {
                Ok(logger) => Some(LogProvider {
                    name: name.as_str().into(),
                    provider,
                    logger,
                }),
                Err(e) => {
                    tracing::error!(provider = %name, error = %format!("{e:#}"), "access-log provider not opened");
                    None
                }
            }
        })
        .collect()
}

/// Write a finished record where the Telemetry decision sends it: the mesh-wide log and
/// each selected provider (a copy each).
pub fn write_log(shared: &Shared, sinks: &policy::LogSinks, record: accesslog::AccessLogRecord) {
    if !sinks.named.is_empty() {
        let providers = shared.log_providers.load();
        for name in &sinks.named {
            if let Some(p) = providers.iter().find(|p| p.name == *name) {
                p.logger.log(record.clone());
            }
        }
    }
    if sinks.mesh
        && let Some(l) = &shared.access_log
    {
        l.log(record);
    }
}
