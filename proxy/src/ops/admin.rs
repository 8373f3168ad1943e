//! The three operator-facing listeners, each plain HTTP/1.1:
//! - readiness (`--ready-addr`, 15021): `GET /healthz/ready`, 200 once serving, 503 while draining;
//! - metrics (`--metrics-addr`, 15020): `GET /stats/prometheus` (Prometheus text);
//! - admin (`--admin-addr`, 127.0.0.1:15000): `/ready`, `/config_dump`, `/clusters`, `/stats`,
//!   `/logging`, `/services` (the `waypoint services` table for the running snapshot).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::debug;

use crate::state::Shared;

/// Which listener this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ready,
    Metrics,
    Admin,
}

/// Serve one operator listener until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, role: Role) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, role, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn ready(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.draining.load(Ordering::Relaxed) {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        )
    } else if let Some(why) = config_not_ready(shared) {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {why}\n"),
        )
    } else if crate::state::cert_seconds_left(shared) <= 0 {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "certificate expired\n".into(),
        )
    } else {
        text(StatusCode::OK, "text/plain", "ready\n".into())
    }
}

/// Why the configuration cannot be trusted yet (`--kube`): a kind not listed, forbidden or
/// missing, or the first compile not done. A waypoint never serves without its policies.
fn config_not_ready(shared: &Shared) -> Option<String> {
    let source = shared.discovery.as_ref()?;
    if let Err(why) = source.readiness() {
        return Some(why);
    }
    (!shared.config_installed.load(Ordering::Relaxed))
        .then(|| "the configuration from the Kubernetes API is not compiled yet".into())
}

fn answer(shared: &Shared, role: Role, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (role, path) {
        (Role::Ready, "/healthz/ready") | (Role::Admin, "/ready") => ready(shared),
        (Role::Metrics, "/stats/prometheus")
        | (Role::Metrics, "/metrics")
        | (Role::Admin, "/stats/prometheus")
        | (Role::Admin, "/stats") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            prometheus(shared),
        ),
        (Role::Admin, "/config_dump") => {
            text(StatusCode::OK, "application/json", config_dump(shared))
        }
        (Role::Admin, "/clusters") => text(StatusCode::OK, "text/plain", clusters(shared)),
        (Role::Admin, "/memory") => text(StatusCode::OK, "application/json", memory()),
        (Role::Admin, "/logging") => logging(req),
        (Role::Admin, "/services") => text(
            StatusCode::OK,
            "text/plain",
            crate::ops::inspect::services_table(&shared.snapshot.load()),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such endpoint: {path}\n"),
        ),
    }
}

fn prometheus(shared: &Shared) -> String {
    let s = &shared.hbone_stats;
    let mem = crate::memory::stats();
    let extra = [
        (
            "waypoint_hbone_connections_active",
            "HBONE connections currently open.",
            s.connections_active.load(Ordering::Relaxed),
        ),
        (
            "waypoint_hbone_connections_total",
            "HBONE connections accepted.",
            s.connections_accepted.load(Ordering::Relaxed),
        ),
        (
            "waypoint_hbone_handshake_failures_total",
            "HBONE TLS/HTTP2 handshakes that failed or timed out.",
            s.handshake_failures.load(Ordering::Relaxed),
        ),
        (
            "waypoint_tunnels_total",
            "CONNECT streams received.",
            s.streams_accepted.load(Ordering::Relaxed),
        ),
        (
            "waypoint_upstream_connections_total",
            "Upstream connections opened.",
            shared.upstreams.connections_opened.load(Ordering::Relaxed),
        ),
        (
            "waypoint_metrics_source_overflow_total",
            "Tunnels whose source labels found the label table full (counted as source_workload=\"overflow\").",
            shared.metrics.sources_overflowed(),
        ),
        (
            "waypoint_metrics_destination_overflow_total",
            "Endpoint workloads that found the destination label table full (counted as destination_workload=\"overflow\").",
            shared.metrics.destinations_overflowed(),
        ),
        (
            "waypoint_metrics_override_overflow_total",
            "Requests and connections counted under an overflow series because the Telemetry override series table was full (tag values \"overflow\").",
            shared.metrics.overrides_overflowed(),
        ),
        (
            "waypoint_mirrors_skipped_total",
            "RequestMirror copies not sent because too many were in flight.",
            shared.mirrors_skipped.load(Ordering::Relaxed),
        ),
        (
            "waypoint_upstream_pools",
            "Upstream endpoint pools held (follows the configured endpoints).",
            shared.upstreams.pool_count() as u64,
        ),
        (
            "waypoint_upstream_idle_connections",
            "Idle keep-alive upstream connections held (closed after the pool idle timeout).",
            shared.upstreams.idle_connections() as u64,
        ),
        (
            "waypoint_config_reloads_ok_total",
            "Successful configuration reloads.",
            shared.reloads_ok.load(Ordering::Relaxed),
        ),
        (
            "waypoint_config_endpoint_updates_total",
            "Endpoint-only changes applied in place, without recompiling routes and policies.",
            shared.endpoint_refreshes.load(Ordering::Relaxed),
        ),
        (
            "waypoint_config_reloads_failed_total",
            "Rejected configuration reloads (the last good configuration stayed).",
            shared.reloads_failed.load(Ordering::Relaxed),
        ),
        (
            "waypoint_certificate_expiry_seconds",
            "Seconds until the workload certificate expires.",
            crate::state::cert_seconds_left(shared).max(0) as u64,
        ),
        (
            "waypoint_certificate_reloads_total",
            "Certificate rotations picked up.",
            shared.cert_reloads.load(Ordering::Relaxed),
        ),
        (
            "waypoint_requests_in_flight",
            "Requests currently in flight.",
            shared.in_flight.load(Ordering::Relaxed) as u64,
        ),
        (
            "waypoint_overload_shed_total",
            "Requests and tunnels shed for overload (503 OM).",
            shared.shed.load(Ordering::Relaxed),
        ),
        (
            "waypoint_tunnels_parked",
            "Idle HTTP tunnels waiting for a request with no connection state (open minus busy).",
            shared.reclaim.parked_now(),
        ),
        (
            "waypoint_memory_trims_total",
            "Times freed memory was returned to the OS after load dropped.",
            shared.reclaim.trims.load(Ordering::Relaxed),
        ),
        // Envoy's server.memory_allocated / memory_heap_size / memory_physical_size, from
        // jemalloc's stats (zeros with another allocator).
        (
            "waypoint_memory_allocated_bytes",
            "Bytes in live allocations (jemalloc stats.allocated).",
            mem.allocated,
        ),
        (
            "waypoint_memory_active_bytes",
            "Bytes in pages holding live allocations (jemalloc stats.active).",
            mem.active,
        ),
        (
            "waypoint_memory_resident_bytes",
            "Bytes the allocator keeps resident, data and metadata (jemalloc stats.resident).",
            mem.resident,
        ),
        (
            "waypoint_access_log_dropped_total",
            "Access-log records dropped because the writer could not keep up.",
            shared.access_log.as_ref().map(|l| l.dropped()).unwrap_or(0),
        ),
    ];
    let mut out = shared.metrics.render(&extra);
    shared.ext_authz_stats.render(&mut out);
    crate::telemetry::trace::render(&shared.tracing.load(), &mut out);
    if let Some(source) = &shared.discovery {
        discovery_metrics(&mut out, source);
    }
    out
}

/// `--kube`: whether every watch is connected, when the store last changed, objects per kind.
fn discovery_metrics(out: &mut String, source: &discovery::Source) {
    use std::fmt::Write as _;
    let report = source.report();
    let _ = writeln!(
        out,
        "# HELP waypoint_config_source_up Whether every Kubernetes watch is connected (1) or some are retrying (0).\n\
# TYPE waypoint_config_source_up gauge\nwaypoint_config_source_up {}",
        u8::from(source.up())
    );
    let last = report
        .iter()
        .filter_map(|k| k.last_update)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP waypoint_config_last_update_timestamp_seconds Unix time of the last change from the Kubernetes API.\n\
# TYPE waypoint_config_last_update_timestamp_seconds gauge\nwaypoint_config_last_update_timestamp_seconds {last}"
    );
    let _ = writeln!(
        out,
        "# HELP waypoint_config_objects Objects held per watched kind.\n# TYPE waypoint_config_objects gauge"
    );
    for k in &report {
        let _ = writeln!(
            out,
            "waypoint_config_objects{{kind=\"{}\"}} {}",
            k.kind, k.objects
        );
    }
    let _ = writeln!(
        out,
        "# HELP waypoint_config_pod_shapes Distinct Pod shapes (namespace, labels kept, owner, service account) the stored Pods share.\n\
# TYPE waypoint_config_pod_shapes gauge\nwaypoint_config_pod_shapes {}",
        source.pod_shapes()
    );
}

/// Envoy's `/memory` answers with its allocator's totals (tcmalloc's `allocated`,
/// `heap_size`, ...); ours with jemalloc's, and the options it runs with.
fn memory() -> String {
    let s = crate::memory::stats();
    let (background_thread, dirty_decay_ms) = crate::memory::options();
    let v = json!({
        // Which allocator this binary was built with (proxy/Cargo.toml features).
        "allocator": crate::memory::ALLOCATOR,
        "allocated": s.allocated.to_string(),
        "active": s.active.to_string(),
        "resident": s.resident.to_string(),
        "metadata": s.metadata.to_string(),
        "retained": s.retained.to_string(),
        "background_thread": background_thread,
        "dirty_decay_ms": dirty_decay_ms,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn config_dump(shared: &Shared) -> String {
    let snap = shared.snapshot.load();
    let services: Vec<_> = snap
        .bound_services()
        .iter()
        .map(|s| {
            json!({
                "vip": s.vip.to_string(),
                "protocol": format!("{:?}", s.protocol),
                "cluster": &*s.cluster.name,
                "routes": s.routes.as_ref().map(|r| r.len()).unwrap_or(0),
            })
        })
        .collect();
    let clusters: Vec<_> = snap
        .clusters()
        .iter()
        .map(|c| {
            json!({
                "name": &*c.name,
                "service": &*c.hostname,
                "port": c.port,
                "endpoints": c.endpoints().iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let last_error = shared.last_reload_error.lock().ok().and_then(|e| e.clone());
    let dump = json!({
        "gateway": format!("{}/{}", snap.gateway.namespace, snap.gateway.name),
        "trust_domain": &*snap.trust_domain,
        "services": services,
        "clusters": clusters,
        "warnings": snap.warnings,
        "reloads_ok": shared.reloads_ok.load(Ordering::Relaxed),
        "reloads_failed": shared.reloads_failed.load(Ordering::Relaxed),
        "last_reload_error": last_error,
        "version": shared.config_version.load(Ordering::Relaxed),
        "source": shared.discovery.as_ref().map(|d| json!({
            "kind": "kubernetes",
            "up": d.up(),
            "ready": d.readiness().err(),
            "kinds": d.report().iter().map(|k| json!({
                "kind": k.kind,
                "resource": k.resource,
                "status": format!("{:?}", k.status),
                "up": k.up,
                "objects": k.objects,
                "last_update": k.last_update,
            })).collect::<Vec<_>>(),
        })).unwrap_or_else(|| json!({"kind": "files"})),
        "resources": snap.resources.iter().map(|(kind, id, src)| json!({
            "kind": kind,
            "name": id,
            "source": src.origin,
            "resource_version": src.resource_version,
        })).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_default()
}

/// `GET /logging`: the current filter; `POST /logging?level=debug` (or `?filter=proxy=debug`):
/// change it at runtime.
fn logging(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let wanted = query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "level" || k == "filter").then(|| v.replace("%3D", "=").replace("%2C", ","))
    });
    match (req.method(), wanted) {
        (&http::Method::POST, Some(directive)) => {
            match crate::telemetry::logging::set(&directive) {
                Ok(()) => text(
                    StatusCode::OK,
                    "text/plain",
                    format!("active filter: {directive}\n"),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        (&http::Method::POST, None) => text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "usage: POST /logging?level=<info|debug|...> or ?filter=<tracing filter>\n".into(),
        ),
        _ => match crate::telemetry::logging::current() {
            Some(f) => text(
                StatusCode::OK,
                "text/plain",
                format!("active filter: {f}\n"),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "log level control is not available in this process\n".into(),
            ),
        },
    }
}

/// Envoy `/clusters` style: `<cluster>::<endpoint>::rq_active::<n>`,
/// `<cluster>::<endpoint>::health_flags::healthy` (or `/failed_outlier_check` while an
/// outlier ejection lasts, `/failed_eds_health` for a not-ready endpoint a Service's
/// `trafficDistribution` keeps, as Envoy prints them), `<cluster>::<endpoint>::weight::<n>` and
/// `<cluster>::<endpoint>::priority::<n>` (locality failover's level); with
/// a DestinationRule, the cluster's `<cluster>::circuit_breakers::max_requests::<n>`,
/// `::rq_overflow::<n>` and `::outlier_ejections::<n>`.
fn clusters(shared: &Shared) -> String {
    let snap = shared.snapshot.load();
    let now = crate::upstream::balance::now_ms();
    let mut out = String::new();
    for c in snap.clusters() {
        if let Some(t) = &c.traffic {
            let max = t
                .max_requests
                .map_or_else(|| "4294967295".to_string(), |m| m.to_string());
            out.push_str(&format!(
                "{name}::default_priority::max_requests::{max}\n{name}::rq_overflow::{}\n{name}::outlier_ejections::{}\n",
                t.overflows.load(Ordering::Relaxed),
                t.ejections_total.load(Ordering::Relaxed),
                name = c.name,
            ));
            if let Some(b) = crate::upstream::breaker::of(t) {
                out.push_str(&format!(
                    "{name}::default_priority::max_connections::{}\n{name}::cx_active::{}\n{name}::rq_pending_active::{}\n{name}::rq_pending_overflow::{}\n",
                    b.max_connections(),
                    b.connections(),
                    b.pending(),
                    b.overflows.load(Ordering::Relaxed),
                    name = c.name,
                ));
            }
        }
        for e in c.endpoints().iter() {
            // Envoy's flag order (`HostUtility::healthFlagsToString`).
            let health = match (e.health.is_ejected(now), e.ready) {
                (false, true) => "healthy",
                (true, true) => "/failed_outlier_check",
                (false, false) => "/failed_eds_health",
                (true, false) => "/failed_outlier_check/failed_eds_health",
            };
            out.push_str(&format!(
                "{name}::{addr}::rq_active::{}\n{name}::{addr}::health_flags::{health}\n{name}::{addr}::weight::{}\n{name}::{addr}::priority::{}\n",
                e.load.get(),
                e.weight,
                e.priority,
                name = c.name,
                addr = e.addr,
            ));
        }
    }
    out
}
