//! What happens to one HBONE CONNECT stream (Istio's `connect_terminate` + `main_internal`,
//! protocol.md 2.2, 2.3, 2.11):
//!
//! - a non-CONNECT request gets 404 `NR` (connect_terminate's only route matches CONNECT);
//! - the `:authority` must be an `ip:port` that is a Service VIP:port bound to this waypoint;
//!   anything else is refused exactly as Envoy refuses it: 503 with
//!   `upstream connect error or disconnect/reset before headers. reset reason: remote connection failure`,
//!   logged as an `NR` line (`filter_chain_not_found`) plus the failed CONNECT line;
//! - otherwise 200, and the inner bytes are served as HTTP (declared http/http2/grpc ports, or
//!   sniffed HTTP/1.1 or h2c prior knowledge on undeclared ports) or proxied as TCP.

mod inner;
mod rewind;
mod sniff;
mod tcp;
mod tls_hello;

pub use inner::{InnerIo, PARK_AFTER, Parked};
pub use rewind::Rewind;
pub use sniff::looks_like_http;
pub use tls_hello::{Hello, client_hello, parse_client_hello};

use inner::{serve_inner, wait_for_bytes};
use sniff::{Sniffed, sniff};
use tcp::proxy_tcp;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use accesslog::{AccessLogRecord, ResponseFlag};
use bytes::Bytes;
use hbone::H2Stream;
use hbone::server::TunnelRequest;
use http::Method;
use policy::{AppProtocol, VipLookup};
use tokio::time::Instant;
use tracing::debug;

use crate::request::conn::TunnelCtx;
use crate::request::error::ProxyError;
use crate::state::Shared;

/// A CONNECT that was answered 200: what serving the tunnel starts from.
pub struct Accepted {
    t: Arc<TunnelCtx>,
    stream: H2Stream,
    drain: hbone::drain::DrainWatcher,
    start_time: SystemTime,
    started: Instant,
}

/// Handle one stream received on the HBONE listener: the CONNECT is checked and answered at
/// once (on the HBONE connection's task, no wake-up in between), and the returned future,
/// spawned as the tunnel's task, serves it.
pub fn handle_tunnel(
    shared: Arc<Shared>,
    req: TunnelRequest,
) -> impl Future<Output = ()> + Send + 'static {
    // Boxed before the task starts: the task keeps a pointer, not the accepted CONNECT.
    let first = accept_tunnel(&shared, req).map(|a| {
        shared.reclaim.opened();
        Box::pin(serve_tunnel(a))
    });
    run_tunnel(shared.reclaim.clone(), first)
}

/// Check the CONNECT and answer it: 404/503 (logged as Envoy logs them) or 200.
fn accept_tunnel(shared: &Arc<Shared>, req: TunnelRequest) -> Option<Accepted> {
    let started = Instant::now();
    let start_time = SystemTime::now();
    if req.method != Method::CONNECT {
        let reply = ProxyError::NotConnect.local_reply();
        let mut r = AccessLogRecord::new(start_time);
        r.method = Some(req.method.to_string().into());
        r.path = Some(req.path.clone());
        r.protocol = Some("HTTP/2");
        r.authority = req.authority.clone();
        r.response_code = reply.status.as_u16();
        r.response_flags = reply.flags;
        r.response_code_details = Some(reply.details);
        r.downstream_remote_address = Some(req.peer.remote.to_string());
        r.downstream_local_address = Some(req.peer.local.to_string());
        r.duration = started.elapsed().as_millis() as u64;
        emit(shared, r);
        req.reject(reply.status, cow_bytes(reply.body));
        return None;
    }
    let authority = req.authority.clone().unwrap_or_default();
    let snapshot = shared.snapshot.load_full();
    let bound = match parse_authority(&authority) {
        Some(addr) => match snapshot.lookup_vip(addr) {
            VipLookup::Bound(sp) => Some((addr, sp)),
            VipLookup::NotBound(reason) => {
                debug!(%authority, %reason, "CONNECT to a Service not bound to this waypoint");
                None
            }
            VipLookup::Unknown => {
                debug!(%authority, "CONNECT to an address that is not a known Service VIP:port");
                None
            }
        },
        None => None,
    };
    // Under memory pressure new tunnels are refused (503, like an overloaded Envoy).
    if shared
        .memory_pressure
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        shared
            .shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reply = ProxyError::Overloaded.local_reply();
        req.reject(reply.status, cow_bytes(reply.body));
        return None;
    }
    let Some((vip, service)) = bound else {
        let reply = ProxyError::UnknownAuthority.local_reply();
        refuse_unknown_authority(shared, &req, &authority, &reply, start_time, started);
        req.reject(reply.status, cow_bytes(reply.body));
        return None;
    };
    let peer = req.peer.clone();
    let drain = req.drain.clone();
    // Source labels come from the peer's verified identity; the CONNECT's `baggage` is the
    // client's word and counts only in Istio's AMBIENT_ENABLE_BAGGAGE mode.
    let baggage = shared
        .limits
        .metrics_baggage
        .then(|| req.headers.get("baggage").and_then(|v| v.to_str().ok()))
        .flatten();
    // With the Kubernetes API (`--kube`), the client is the Pod at the connection's source
    // address, as Istio's waypoint finds it in workload discovery; only when that Pod runs as
    // the verified identity (a client cannot claim another workload's labels).
    let pod = match (&shared.discovery, baggage, peer.identity.as_ref()) {
        (Some(d), None, Some(id)) => d
            .pod_at(peer.remote.ip())
            .filter(|p| *p.namespace == *id.namespace && *p.service_account == *id.service_account),
        _ => None,
    };
    let labels = match pod {
        Some(pod) => crate::telemetry::metrics::SourceLabels::from_pod(
            peer.identity.as_ref(),
            &pod,
            &shared.cluster_id,
        ),
        None => {
            crate::telemetry::metrics::SourceLabels::from_tunnel(peer.identity.as_ref(), baggage)
        }
    };
    let source = shared
        .metrics
        .source(labels, shared.limits.max_metric_sources);
    let stream = match req.accept() {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "client went away before the CONNECT was answered");
            return None;
        }
    };
    let t = Arc::new(TunnelCtx {
        shared: shared.clone(),
        vip,
        peer,
        service: service.clone(),
        source,
    });
    Some(Accepted {
        t,
        stream,
        drain,
        start_time,
        started,
    })
}

/// The tunnel's task. It is small on purpose: what a busy tunnel needs (hyper's connection,
/// the request phases) lives in a box for as long as it is busy, and an idle HTTP/1.1 tunnel
/// waits here holding only its stream ([`Parked`]), so an idle tunnel costs its stream, this
/// task and [`TunnelCtx`] (listener/inner.rs `PARK_AFTER`).
async fn run_tunnel<F>(reclaim: Arc<crate::memory::Reclaim>, first: Option<Pin<Box<F>>>)
where
    F: Future<Output = Option<Parked>>,
{
    let Some(first) = first else { return };
    if let Some(mut p) = first.await {
        loop {
            reclaim.parked();
            let woke = wait_for_bytes(&mut p.io, &mut p.drain).await;
            reclaim.unparked();
            if !woke {
                // Client closed, idle timeout or drain: end our half of the tunnel as
                // hyper would have.
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut p.io.inner).await;
                break;
            }
            p = match Box::pin(serve_inner(p)).await {
                Some(p) => p,
                None => break,
            };
        }
    }
    reclaim.closed();
}

/// Serve an accepted tunnel by the Service port's protocol; an HTTP tunnel comes back
/// [`Parked`] whenever it waits for a request.
async fn serve_tunnel(a: Accepted) -> Option<Parked> {
    let Accepted {
        t,
        stream,
        drain,
        start_time,
        started,
    } = a;
    let shared = t.shared.clone();
    match t.service.protocol {
        AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc => {
            Some(Parked::new(t, Rewind::new(stream), drain))
        }
        AppProtocol::Tcp => {
            proxy_tcp(t, Rewind::new(stream), start_time, started).await;
            None
        }
        AppProtocol::Unknown => {
            let mut stream = Rewind::new(stream);
            match sniff(&mut stream, &shared).await {
                Sniffed::Http => Some(Parked::new(t, stream, drain)),
                Sniffed::Tcp => {
                    proxy_tcp(t, stream, start_time, started).await;
                    None
                }
                Sniffed::Closed => None,
            }
        }
    }
}

/// A reply body as bytes (no copy for the static ones).
fn cow_bytes(body: std::borrow::Cow<'static, str>) -> Bytes {
    match body {
        std::borrow::Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
        std::borrow::Cow::Owned(s) => Bytes::from(s),
    }
}

/// `ip:port` or `[v6]:port`; nothing else is a valid HBONE target here.
pub fn parse_authority(authority: &str) -> Option<SocketAddr> {
    authority.parse::<SocketAddr>().ok()
}

/// Log a line that is not an HTTP request through a chain (listener NR, failed CONNECT, TCP):
/// Envoy's istio stats filter does not count those as requests.
pub(super) fn emit(shared: &Shared, r: AccessLogRecord) {
    if let Some(l) = &shared.access_log {
        l.log(r);
    }
}

/// The two lines Envoy writes for a CONNECT it has no filter chain for (protocol.md 8):
/// the inner listener's `NR` line and the connect_terminate line for the failed CONNECT.
fn refuse_unknown_authority(
    shared: &Shared,
    req: &TunnelRequest,
    authority: &str,
    reply: &crate::request::error::LocalReply,
    start: SystemTime,
    started: Instant,
) {
    let mut nr = AccessLogRecord::new(start);
    nr.response_flags.set(ResponseFlag::NR);
    nr.response_code_details = Some("filter_chain_not_found".into());
    nr.downstream_local_address = Some(authority.to_string());
    nr.downstream_remote_address = Some(req.peer.remote.to_string());
    emit(shared, nr);

    let mut r = AccessLogRecord::new(start);
    r.method = Some("CONNECT".into());
    r.protocol = Some("HTTP/2");
    r.authority = Some(authority.to_string());
    r.response_code = reply.status.as_u16();
    r.response_flags = reply.flags;
    r.response_code_details = Some(reply.details.clone());
    r.upstream_cluster = Some("main_internal".into());
    r.bytes_sent = reply.body.len() as u64;
    r.downstream_local_address = Some(req.peer.local.to_string());
    r.downstream_remote_address = Some(req.peer.remote.to_string());
    r.duration = started.elapsed().as_millis() as u64;
    emit(shared, r);
}

/// How long a draining inner connection may stay idle before it is closed.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_must_be_ip_and_port() {
        assert!(parse_authority("10.0.0.10:9080").is_some());
        assert!(parse_authority("[fd00::1]:9080").is_some());
        assert!(parse_authority("reviews:9080").is_none());
        assert!(parse_authority("10.0.0.10").is_none());
        assert!(parse_authority("").is_none());
    }
}
