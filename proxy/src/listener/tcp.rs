//! TCP through a tunnel: TCPRoute and TLSRoute (by ClientHello SNI) backend choice, network
//! RBAC, the upstream connection, bytes both ways until both sides end or the idle timeout,
//! one log line and the istio_tcp_* metrics.

use std::sync::Arc;
use std::time::SystemTime;

use accesslog::{AccessLogRecord, ResponseFlag};
use policy::{AppProtocol, VipLookup};
use tokio::time::Instant;
use tracing::debug;

use crate::request::conn::TunnelCtx;
use crate::upstream::balance::{Outcome, report};

use super::tls_hello::read_sni;
use super::*;

pub(super) async fn proxy_tcp(
    t: Arc<TunnelCtx>,
    mut stream: Rewind,
    start: SystemTime,
    started: Instant,
) {
    let shared = &t.shared;
    let mut r = AccessLogRecord::new(start);
    r.downstream_local_address = Some(t.service.vip_text.clone());
    r.downstream_remote_address = Some(t.remote_str().to_string());
    let Some(cluster) = l4_cluster(&t, &mut stream, &mut r).await else {
        return refuse(&t, &mut stream, r, started);
    };
    // ServiceEntry `resolution: NONE`: the endpoint is the tunnel's own address.
    let cluster = if cluster.passthrough {
        Arc::new(cluster.original_destination(t.vip))
    } else {
        cluster
    };
    // A sniffed-TCP tunnel on an undeclared port uses istiod's `tcp` cluster name.
    r.upstream_cluster = Some(if cluster.protocol == AppProtocol::Unknown {
        cluster.name.replacen("|http|", "|tcp|", 1).into()
    } else {
        cluster.name.clone()
    });
    // Network RBAC (policy.md 1.7): HTTP-only fields never match ALLOW rules and are ignored
    // by DENY rules on TCP. A denial closes the connection and is logged.
    let snapshot = shared.snapshot.load_full();
    let service = match snapshot.lookup_vip(t.vip) {
        VipLookup::Bound(sp) => sp,
        _ => t.service.clone(),
    };
    if !service.authz.is_empty() {
        let req = policy::AuthzRequest {
            source_principal: t.principal(),
            source_ip: Some(t.peer.remote.ip()),
            remote_ip: Some(t.peer.remote.ip()),
            dest_ip: Some(t.vip.ip()),
            dest_port: t.vip.port(),
            http: None,
        };
        let decision = policy::evaluate(&service.authz, &req);
        if !decision.allowed {
            r.connection_termination_details = Some(decision.details.into());
            return refuse(&t, &mut stream, r, started);
        }
    }
    let endpoints = cluster.endpoints();
    let Some(endpoint) = crate::upstream::balance::choose(
        &cluster,
        &endpoints,
        &[],
        rand::random::<u64>(),
        tcp_hash_key(&cluster, t.peer.remote.ip()),
    ) else {
        r.response_flags.set(ResponseFlag::UH);
        return refuse(&t, &mut stream, r, started);
    };
    r.upstream_host = Some(if endpoint.tunnel.is_some() {
        format!("envoy://connect_originate/{}", endpoint.addr)
    } else {
        endpoint.addr.to_string()
    });
    let opts = crate::upstream::ConnOptions::of(&cluster);
    // DestinationRule `tcp.maxConnections` (Envoy tcp_proxy's `max_connections` breaker):
    // beyond it the connection is refused, flag `UO`.
    let _conn_slot = match &opts.breaker {
        None => None,
        Some(b) => match b.try_open() {
            Some(slot) => Some(slot),
            None => {
                r.response_flags.set(ResponseFlag::UO);
                return refuse(&t, &mut stream, r, started);
            }
        },
    };
    let (mut upstream, local) = match shared.upstreams.connect_with(endpoint, &opts).await {
        Ok(c) => {
            report(&cluster, endpoint, Outcome::Status(200));
            c
        }
        Err(failure) => {
            report(&cluster, endpoint, Outcome::LocalFailure);
            r.response_flags.set(ResponseFlag::UF);
            if let crate::request::error::UpstreamFailure::Connect { detail, .. } = &failure
                && !detail.is_empty()
            {
                r.upstream_transport_failure_reason = Some(detail.replace(' ', "_"));
            }
            return refuse(&t, &mut stream, r, started);
        }
    };
    r.upstream_local_address = Some(match local {
        Some(a) => a.to_string(),
        None => "envoy://internal_client_address/".to_string(),
    });
    let dest = shared.metrics.destination(
        endpoint.workload.as_deref(),
        &shared.cluster_id,
        shared.limits.max_metric_sources,
    );
    // Telemetry overrides of a TCP connection are evaluated once, before its first metric
    // (Istio's stats filter).
    let over = crate::request::log::metric_overrides(&t.service.metrics, &r, None, t.principal());
    shared
        .metrics
        .tcp_opened(t.source, dest, Some(&cluster), over.clone());
    endpoint.load.inc();
    // Envoy's tcp_proxy closes a connection idle for its `idle_timeout` (1 h by default, as
    // our `--idle-timeout`); half-close is passed through.
    // DestinationRule `connectionPool.tcp.idleTimeout` replaces it for the cluster (istiod
    // sets tcp_proxy's idle_timeout from it, protocol.md 2.6).
    let idle_timeout = cluster
        .traffic
        .as_ref()
        .and_then(|t| t.tcp_idle_timeout)
        .unwrap_or(shared.limits.idle_timeout);
    let spliced = crate::request::upgrade::splice(&mut stream, &mut upstream, idle_timeout).await;
    endpoint.load.dec();
    r.bytes_received = spliced.from_down;
    r.bytes_sent = spliced.from_up;
    if let Some(e) = spliced.error {
        debug!(error = %e, "TCP proxy ended with an error");
        r.connection_termination_details = Some(e.to_string().into());
    } else if spliced.idle {
        debug!("TCP proxy idle timeout");
        // The connection is closed on both sides, as Envoy's tcp_proxy does on idle timeout.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut upstream).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    }
    r.duration = started.elapsed().as_millis() as u64;
    shared
        .metrics
        .tcp_closed(t.source, dest, Some(&cluster), &r, over);
    emit(&t, r);
}

/// The cluster of an L4 tunnel: a TLSRoute chosen by the ClientHello's SNI, else the
/// TCPRoute, else the Service's own cluster. `None`: refused (`NR` no TLSRoute matches, `NC`
/// an invalid backend drawn), the flag set on `r`.
async fn l4_cluster(
    t: &TunnelCtx,
    stream: &mut Rewind,
    r: &mut AccessLogRecord,
) -> Option<Arc<policy::Cluster>> {
    // TCPRoute: a weighted draw among its backends (Istio `convertTCPRoute`). An invalid
    // backend, or all weights zero (Istio's dummy `internal.cluster.local` destination),
    // rejects the connection in proportion, as Envoy's tcp_proxy does for a cluster it does
    // not have (`NC`).
    // TLSRoute: Envoy's tls_inspector reads the ClientHello SNI and the filter chain whose
    // `server_names` match is used; none matches -> no filter chain (`NR`), connection closed.
    let mut l4_route = t.service.tcp_route.clone();
    if let Some(tls) = &t.service.tls_routes {
        // A client that closes or stays quiet is matched without SNI, as Istio's listener
        // filters continue on timeout (`continue_on_listener_filters_timeout`).
        let sni: Option<String> = read_sni(stream, t.shared.limits.sniff_timeout)
            .await
            .unwrap_or_default();
        r.requested_server_name = sni.clone();
        match tls.select(sni.as_deref()) {
            Some(rule) => l4_route = Some(rule.clone()),
            None => {
                r.response_flags.set(ResponseFlag::NR);
                r.response_code_details = Some("filter_chain_not_found".into());
                return None;
            }
        }
    }
    Some(match &l4_route {
        None => t.service.cluster.clone(),
        Some(route) => match route.backends.pick(rand::random::<u64>()) {
            Some(policy::BackendRef {
                backend: policy::Backend::Cluster(c),
                ..
            }) => c.clone(),
            _ => {
                r.response_flags.set(ResponseFlag::NC);
                return None;
            }
        },
    })
}

/// Log a TCP connection (Telemetry `accessLogging` applies to TCP connections too, without
/// `request.*` attributes), under the policy of the Service as the snapshot has it now.
fn emit(t: &TunnelCtx, r: AccessLogRecord) {
    let snapshot = t.shared.snapshot.load();
    let policy = match snapshot.lookup_vip(t.vip) {
        VipLookup::Bound(sp) => sp.access_log.clone(),
        _ => t.service.access_log.clone(),
    };
    let sinks = crate::request::log::log_sinks(&policy, &r, None, t.principal());
    crate::state::write_log(&t.shared, &sinks, r);
}

/// Refuse the tunnel (RST_STREAM CONNECT_ERROR, as Envoy's tcp_proxy resets it), logged.
fn refuse(t: &TunnelCtx, stream: &mut Rewind, mut r: AccessLogRecord, started: Instant) {
    r.duration = started.elapsed().as_millis() as u64;
    emit(t, r);
    stream.inner.reset(h2::Reason::CONNECT_ERROR);
}

/// The consistent-hash key of a TCP connection: only `useSourceIp` applies (no headers).
fn tcp_hash_key(cluster: &policy::Cluster, source: std::net::IpAddr) -> Option<u64> {
    match cluster.traffic.as_ref().map(|t| &t.lb) {
        Some(policy::traffic::LbPolicy::ConsistentHash(h))
            if h.key == policy::traffic::HashKey::SourceIp =>
        {
            Some(policy::traffic::stable_hash(source.to_string().as_bytes()))
        }
        _ => None,
    }
}
