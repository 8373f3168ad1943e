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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use accesslog::{AccessLogRecord, ResponseFlag};
use bytes::{Buf, Bytes};
use hbone::H2Stream;
use hbone::server::{PeerInfo, TunnelRequest};
use http::Method;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use policy::{AppProtocol, ServicePort, VipLookup};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use crate::error::ProxyError;
use crate::state::Shared;
use crate::upstream::pick_endpoint;

/// Everything a request inside one tunnel needs to know about the tunnel.
///
/// Aligned to a cache line: an idle tunnel keeps this for as long as it is open, and the
/// allocator packs such objects together instead of between short-lived request memory
/// (pages.rs, slab). Per-connection text (peer address, principal) lives in [`PeerInfo`].
#[repr(align(64))]
pub struct TunnelCtx {
    pub shared: Arc<Shared>,
    /// The CONNECT authority: the Service VIP:port the client dialed.
    pub vip: SocketAddr,
    /// The HBONE connection's peer (client pod ip:port, identity).
    pub peer: Arc<PeerInfo>,
    /// The Service port as bound when the tunnel was opened.
    pub service: Arc<ServicePort>,
    /// Interned source labels of the metrics (from the peer identity and `baggage`).
    pub source: crate::metrics::SourceId,
}

impl TunnelCtx {
    /// The peer's SPIFFE URI, Istio's `io.istio.peer_principal`: the only source of
    /// principals and namespaces for authorization (never anything inside the tunnel).
    pub fn principal(&self) -> Option<&str> {
        self.peer.principal.as_deref()
    }

    /// The HBONE connection's peer address as text.
    pub fn remote_str(&self) -> &str {
        &self.peer.remote_str
    }
}

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
    let source = shared.metrics.source(
        crate::metrics::SourceLabels::from_tunnel(peer.identity.as_ref(), baggage),
        shared.limits.max_metric_sources,
    );
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
/// task and [`TunnelCtx`] (tunnel.rs `PARK_AFTER`).
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
fn emit(shared: &Shared, r: AccessLogRecord) {
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
    reply: &crate::error::LocalReply,
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
const DRAIN_IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// An HTTP/1.1 inner connection with no request in flight and no bytes for this long hands
/// hyper's per-connection state back (its read and write buffers, 16 KiB) and the tunnel's
/// task waits for the next request holding only the stream ([`Parked`]): an idle keep-alive
/// tunnel then costs ~2.7 KB (measured, benches `idle`, with the allocator's slab, pages.rs;
/// Envoy keeps its codec buffers: ~45 KB). The next request rebuilds the connection state, a
/// few microseconds once per idle period.
pub const PARK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// An HTTP inner connection waiting for its next request with no hyper state: just the
/// stream (and any bytes of a next request already read), the tunnel and the drain.
pub struct Parked {
    io: InnerIo,
    drain: hbone::drain::DrainWatcher,
}

impl Parked {
    /// A new HTTP tunnel: it waits for its first request like any idle one.
    fn new(t: Arc<TunnelCtx>, stream: Rewind, drain: hbone::drain::DrainWatcher) -> Parked {
        let counters = Arc::new(InnerCounters::default());
        Parked {
            io: InnerIo::new(stream, t, counters),
            drain,
        }
    }
}

/// Serve the inner connection as HTTP/1.1 or h2c (Envoy codec AUTO) now that bytes arrived,
/// until the client closes it, it stays idle past the idle timeout or the drain asks inner
/// connections to finish (`None`), or an HTTP/1.1 connection idles [`PARK_AFTER`] (parked
/// again).
async fn serve_inner(p: Parked) -> Option<Parked> {
    let Parked { mut io, drain } = p;
    let t = io.t.clone();
    let counters = io.counters.clone();
    // Only a connection's first bytes can be the h2c preface; one that parked has served
    // HTTP/1.1 requests (it parks only after an exchange).
    if counters.heads.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        io.h2c = starts_with_h2c_preface(&mut io.inner, io.head_timeout).await;
    }
    let service = {
        let (t, counters) = (t.clone(), counters.clone());
        hyper::service::service_fn(move |req| {
            counters
                .heads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (t, counters) = (t.clone(), counters.clone());
            // Boxed: hyper keeps the service future inline in every connection, and the
            // request phases make a large future.
            Box::pin(async move {
                let resp = crate::pipeline::handle(t, req, counters.clone()).await;
                resp.map(|r| r.map(|b| b.with_done(counters)))
            })
        })
    };
    // hyper's buffer limit: room for a request head at the limit (Envoy's 60 KiB), whose
    // oversize the request phases answer; a head beyond it is refused by hyper's parser and
    // answered the same way (codec.rs). The same limit bounds hyper's write buffer, i.e. how
    // much of a response waits for a client that does not read (slow_readers.rs).
    let header_room = t.shared.limits.max_request_headers + 4 * 1024;
    if io.h2c {
        // Boxed: h2c connections are rare and hyper's HTTP/2 state is large.
        Box::pin(serve_h2c(io, service, drain, header_room)).await;
        return None;
    }
    serve_http1(io, service, drain, header_room).await
}

/// hyper's HTTP/1.1 server on the inner connection until it ends (`None`) or parks.
async fn serve_http1<S>(
    io: InnerIo,
    service: S,
    mut drain: hbone::drain::DrainWatcher,
    header_room: usize,
) -> Option<Parked>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::body::ResponseBody>
        + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let counters = io.counters.clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(header_room)
        .keep_alive(true);
    let done_before = counters.done.load(std::sync::atomic::Ordering::Relaxed);
    let mut conn = builder.serve_connection(TokioIo::new(io), service);
    let mut parking = false;
    let mut draining = false;
    let park = tokio::time::sleep(PARK_AFTER);
    tokio::pin!(park);
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let r = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            _ = &mut park, if !parking => {
                let idle_for = counters.idle_for();
                let exchanged = counters.done.load(std::sync::atomic::Ordering::Relaxed) > done_before;
                if !exchanged || counters.in_flight() {
                    // Nothing to park yet (first request still coming, or one in flight
                    // however long it takes): look again a full period later.
                    park.as_mut().reset(Instant::now() + PARK_AFTER);
                } else if idle_for >= PARK_AFTER {
                    // hyper closes an idle keep-alive connection at once and keeps any
                    // bytes of a next request it has read; both come back below.
                    parking = true;
                    Pin::new(&mut conn).graceful_shutdown();
                } else {
                    park.as_mut().reset(Instant::now() + (PARK_AFTER - idle_for));
                }
            }
            _ = drain.signaled(), if !draining => {
                // Drain: responses now carry `Connection: close`, so a busy connection ends
                // after its current response without racing the client's next request;
                // one still open after a short grace is idle: close it.
                draining = true;
                grace = Some(Box::pin(tokio::time::sleep(DRAIN_IDLE_GRACE)));
            }
            _ = async { if let Some(g) = grace.as_mut() { g.await } }, if grace.is_some() => {
                grace = None;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "inner HTTP connection ended with an error");
        let parts = conn.into_parts();
        let mut io = parts.io.into_inner();
        if io.refused_head {
            // hyper's parser refused a request head (its own bare reply was held back):
            // answer as Envoy's codec does, from the head's bytes.
            let err = crate::codec::refused_head(&parts.read_buf, &e.to_string());
            io.answer(err, SystemTime::now(), std::time::Duration::ZERO)
                .await;
        } else if io.timed_out {
            let waited = io.head_timeout;
            io.answer(
                ProxyError::RequestHeaderTimeout,
                SystemTime::now() - waited,
                waited,
            )
            .await;
        }
        return None;
    }
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    if let Some(up) = counters.upgrade.take() {
        // hyper wrote the backend's 101: the connection is the WebSocket session's now.
        io.inner.unread(parts.read_buf);
        let idle_timeout = io.idle_timeout;
        crate::upgrade::bridge(io.inner, up, idle_timeout).await;
        return None;
    }
    if parking && !draining {
        io.inner.unread(parts.read_buf);
        // The idle timer is the parked wait's; the next busy period makes a new one.
        io.idle = None;
        return Some(Parked { io, drain });
    }
    // The connection is over (client closed, `Connection: close`, idle timeout, drain): end
    // our half of the tunnel as hyper would have.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut io.inner).await;
    None
}

/// An inner connection that opened with h2c prior knowledge: hyper's HTTP/2 server.
async fn serve_h2c<S>(
    io: InnerIo,
    service: S,
    mut drain: hbone::drain::DrainWatcher,
    header_room: usize,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::body::ResponseBody>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(header_room as u32)
        .max_concurrent_streams(Some(100));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "inner h2c connection ended with an error");
            }
        }
        _ = drain.signaled() => {
            // Drain: GOAWAY after a short grace; in-flight streams finish.
            let grace = tokio::time::sleep(DRAIN_IDLE_GRACE);
            tokio::pin!(grace);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = &mut grace => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }
    }
}

/// Parked: wait until the next request's first bytes are readable (`true`), or the client
/// closes, the idle timeout passes or the drain starts (`false`).
async fn wait_for_bytes(io: &mut InnerIo, drain: &mut hbone::drain::DrainWatcher) -> bool {
    if drain.is_draining() {
        return false;
    }
    let idle_for = io.counters.idle_for();
    let deadline = Instant::now() + io.idle_timeout.saturating_sub(idle_for);
    let inner = &mut io.inner;
    tokio::select! {
        // Bytes first: a tunnel whose request is already here never touches the timer.
        biased;
        r = std::future::poll_fn(|cx| inner.poll_fill(cx)) => matches!(r, Ok(true)),
        _ = tokio::time::sleep_until(deadline) => {
            debug!("inner connection idle timeout");
            false
        }
        _ = drain.signaled() => false,
    }
}

/// Does the inner connection open with h2c prior knowledge (`PRI * HTTP/2.0`)? Reads at
/// most 4 bytes and puts them back.
async fn starts_with_h2c_preface(stream: &mut Rewind, head_timeout: std::time::Duration) -> bool {
    const PRI: &[u8; 4] = b"PRI ";
    let mut b = [0u8; 4];
    let mut have = 0;
    let deadline = Instant::now() + head_timeout;
    while have < 4 && b[..have] == PRI[..have] {
        match tokio::time::timeout_at(deadline, stream.read(&mut b[have..])).await {
            Ok(Ok(n)) if n > 0 => have += n,
            _ => break,
        }
    }
    stream.unread(Bytes::copy_from_slice(&b[..have]));
    have == 4 && &b == PRI
}

enum Sniffed {
    Http,
    Tcp,
    Closed,
}

/// Protocol detection on an undeclared port, like Envoy's http_inspector: HTTP/1.x request
/// line or the h2c prior-knowledge preface means HTTP, anything else TCP.
async fn sniff(stream: &mut Rewind, shared: &Shared) -> Sniffed {
    let mut buf = [0u8; 64];
    let mut have = 0;
    let deadline = Instant::now() + shared.limits.sniff_timeout;
    loop {
        match looks_like_http(&buf[..have]) {
            Some(true) => break,
            Some(false) => {
                stream.rewind(Bytes::copy_from_slice(&buf[..have]));
                return Sniffed::Tcp;
            }
            None => {}
        }
        if have == buf.len() {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.inner.read(&mut buf[have..])).await {
            Ok(Ok(0)) if have == 0 => return Sniffed::Closed,
            Ok(Ok(0)) => {
                stream.rewind(Bytes::copy_from_slice(&buf[..have]));
                return Sniffed::Tcp;
            }
            Ok(Ok(n)) => have += n,
            Ok(Err(_)) => return Sniffed::Closed,
            Err(_) => {
                // Nothing (or too little) arrived: a server-first protocol; treat as TCP.
                stream.rewind(Bytes::copy_from_slice(&buf[..have]));
                return Sniffed::Tcp;
            }
        }
    }
    stream.rewind(Bytes::copy_from_slice(&buf[..have]));
    Sniffed::Http
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// `Some(true)` HTTP, `Some(false)` not HTTP, `None` need more bytes.
pub fn looks_like_http(b: &[u8]) -> Option<bool> {
    if b.is_empty() {
        return None;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if b.len() >= H2_PREFACE.len() {
            Some(true)
        } else {
            None
        };
    }
    let mut undecided = false;
    for m in METHODS {
        let n = b.len().min(m.len());
        if b[..n] == m[..n] {
            if b.len() >= m.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// Opaque TCP through the tunnel to one endpoint of the Service's own cluster (Envoy
/// tcp_proxy; one access-log line per connection at its end).
async fn proxy_tcp(t: Arc<TunnelCtx>, mut stream: Rewind, start: SystemTime, started: Instant) {
    let shared = &t.shared;
    // Telemetry `accessLogging` applies to TCP connections too (no `request.*` attributes).
    let emit = |shared: &Shared, r: AccessLogRecord| {
        let snapshot = shared.snapshot.load();
        let policy = match snapshot.lookup_vip(t.vip) {
            VipLookup::Bound(sp) => sp.access_log.clone(),
            _ => t.service.access_log.clone(),
        };
        if crate::logguard::log_allowed(&policy, &r, None, t.principal()) {
            emit(shared, r);
        }
    };
    let mut r = AccessLogRecord::new(start);
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
        let sni: Option<String> = read_sni(&mut stream, shared.limits.sniff_timeout)
            .await
            .unwrap_or_default();
        r.requested_server_name = sni.clone();
        match tls.select(sni.as_deref()) {
            Some(rule) => l4_route = Some(rule.clone()),
            None => {
                r.response_flags.set(ResponseFlag::NR);
                r.response_code_details = Some("filter_chain_not_found".into());
                r.downstream_local_address = Some(t.service.vip_text.clone());
                r.downstream_remote_address = Some(t.remote_str().to_string());
                r.duration = started.elapsed().as_millis() as u64;
                emit(shared, r);
                stream.inner.reset(h2::Reason::CONNECT_ERROR);
                return;
            }
        }
    }
    let cluster = match &l4_route {
        None => t.service.cluster.clone(),
        Some(route) => match route.backends.pick(rand::random::<u64>()) {
            Some(policy::BackendRef {
                backend: policy::Backend::Cluster(c),
                ..
            }) => c.clone(),
            _ => {
                r.response_flags.set(ResponseFlag::NC);
                r.downstream_local_address = Some(t.service.vip_text.clone());
                r.downstream_remote_address = Some(t.remote_str().to_string());
                r.duration = started.elapsed().as_millis() as u64;
                emit(shared, r);
                stream.inner.reset(h2::Reason::CONNECT_ERROR);
                return;
            }
        },
    };
    // A sniffed-TCP tunnel on an undeclared port uses istiod's `tcp` cluster name.
    r.upstream_cluster = Some(if cluster.protocol == AppProtocol::Unknown {
        cluster.name.replacen("|http|", "|tcp|", 1).into()
    } else {
        cluster.name.clone()
    });
    r.downstream_local_address = Some(t.service.vip_text.clone());
    r.downstream_remote_address = Some(t.remote_str().to_string());
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
            r.duration = started.elapsed().as_millis() as u64;
            emit(shared, r);
            stream.inner.reset(h2::Reason::CONNECT_ERROR);
            return;
        }
    }
    let Some(endpoint) = pick_endpoint(&cluster.endpoints, &[], rand::random::<u64>()) else {
        r.response_flags.set(ResponseFlag::UH);
        r.duration = started.elapsed().as_millis() as u64;
        emit(shared, r);
        stream.inner.reset(h2::Reason::CONNECT_ERROR);
        return;
    };
    r.upstream_host = Some(if endpoint.tunnel.is_some() {
        format!("envoy://connect_originate/{}", endpoint.addr)
    } else {
        endpoint.addr.to_string()
    });
    let (mut upstream, local) = match shared.upstreams.connect(endpoint).await {
        Ok(c) => c,
        Err(failure) => {
            r.response_flags.set(ResponseFlag::UF);
            if let crate::error::UpstreamFailure::Connect { detail, .. } = &failure
                && !detail.is_empty()
            {
                r.upstream_transport_failure_reason = Some(detail.replace(' ', "_"));
            }
            r.duration = started.elapsed().as_millis() as u64;
            emit(shared, r);
            stream.inner.reset(h2::Reason::CONNECT_ERROR);
            return;
        }
    };
    r.upstream_local_address = Some(match local {
        Some(a) => a.to_string(),
        None => "envoy://internal_client_address/".to_string(),
    });
    shared.metrics.tcp_opened(t.source, Some(&cluster));
    endpoint.load.inc();
    // Envoy's tcp_proxy closes a connection idle for its `idle_timeout` (1 h by default, as
    // our `--idle-timeout`); half-close is passed through.
    let spliced =
        crate::upgrade::splice(&mut stream, &mut upstream, shared.limits.idle_timeout).await;
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
    shared.metrics.tcp_closed(t.source, Some(&cluster), &r);
    emit(shared, r);
}

/// Read the start of the stream (put back afterwards) until the TLS ClientHello is complete
/// and return its SNI host name (`Ok(None)`: TLS without SNI, or not TLS at all). `Err` when
/// the client closed or went quiet past `limit`.
async fn read_sni(stream: &mut Rewind, limit: std::time::Duration) -> Result<Option<String>, ()> {
    let deadline = Instant::now() + limit;
    // Bytes already read by protocol sniffing come first.
    let mut buf = std::mem::take(&mut stream.prefix).to_vec();
    let mut chunk = [0u8; 4096];
    let result = loop {
        match parse_client_hello(&buf) {
            Hello::NeedMore if buf.len() < MAX_CLIENT_HELLO => {}
            Hello::NeedMore | Hello::NotTls => break Ok(None),
            Hello::Sni(sni) => break Ok(sni),
        }
        match tokio::time::timeout_at(deadline, stream.inner.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Err(()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    stream.rewind(Bytes::from(buf));
    result
}

/// Largest ClientHello we wait for (Envoy's tls_inspector reads up to 64 KiB).
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// What the start of a TLSRoute tunnel says so far.
#[derive(Debug, PartialEq)]
pub enum Hello {
    NeedMore,
    NotTls,
    Sni(Option<String>),
}

/// Parse a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3) that may span several records.
/// Public for the fuzz target (`fuzz/fuzz_targets/client_hello.rs`): never panics on input.
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut i = 0;
    loop {
        if buf.len() < i + 5 {
            return if buf.is_empty() || buf[0] == 0x16 {
                Hello::NeedMore
            } else {
                Hello::NotTls
            };
        }
        if buf[i] != 0x16 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([buf[i + 3], buf[i + 4]]));
        let Some(body) = buf.get(i + 5..i + 5 + len) else {
            return Hello::NeedMore;
        };
        hs.extend_from_slice(body);
        i += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 0x01 {
                return Hello::NotTls;
            }
            let need =
                4 + (usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]));
            if hs.len() >= need {
                return Hello::Sni(sni_of(&hs[4..need]));
            }
        }
    }
}

/// The `server_name` host name of a ClientHello body.
fn sni_of(h: &[u8]) -> Option<String> {
    let mut p = 2 + 32; // legacy_version, random
    let sid = usize::from(*h.get(p)?);
    p += 1 + sid;
    let suites = usize::from(u16::from_be_bytes([*h.get(p)?, *h.get(p + 1)?]));
    p += 2 + suites;
    let comp = usize::from(*h.get(p)?);
    p += 1 + comp;
    let ext_len = usize::from(u16::from_be_bytes([*h.get(p)?, *h.get(p + 1)?]));
    p += 2;
    let end = (p + ext_len).min(h.len());
    while p + 4 <= end {
        let ty = u16::from_be_bytes([h[p], h[p + 1]]);
        let len = usize::from(u16::from_be_bytes([h[p + 2], h[p + 3]]));
        let data = h.get(p + 4..p + 4 + len)?;
        if ty == 0 {
            // server_name_list: u16 length, then (type u8, u16 length, name).
            let mut q = 2;
            while q + 3 <= data.len() {
                let nlen = usize::from(u16::from_be_bytes([data[q + 1], data[q + 2]]));
                let name = data.get(q + 3..q + 3 + nlen)?;
                if data[q] == 0 {
                    return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
                }
                q += 3 + nlen;
            }
            return None;
        }
        p += 4 + len;
    }
    None
}

/// A minimal TLS 1.2/1.3 ClientHello carrying `sni` (tests).
pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let list_len = 3 + n.len();
        ext.extend_from_slice(&[0x00, 0x00]);
        ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// An [`H2Stream`] with bytes already read (while sniffing) put back in front.
pub struct Rewind {
    prefix: Bytes,
    pub inner: H2Stream,
}

impl Rewind {
    fn new(inner: H2Stream) -> Rewind {
        Rewind {
            prefix: Bytes::new(),
            inner,
        }
    }

    fn rewind(&mut self, prefix: Bytes) {
        self.prefix = prefix;
    }

    /// Put `bytes` back in front of whatever is still unread.
    fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        // Copied: `bytes` may be a view into a larger buffer (hyper's read buffer) that a
        // parked tunnel must not keep alive.
        let mut joined = bytes::BytesMut::with_capacity(bytes.len() + self.prefix.len());
        joined.extend_from_slice(&bytes);
        joined.extend_from_slice(&self.prefix);
        self.prefix = joined.freeze();
    }

    /// Ready when bytes can be read (`Ok(true)`) or at end of stream (`Ok(false)`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(true));
        }
        self.inner.poll_fill(cx)
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_http_from_tcp() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"GE"), None);
        assert_eq!(
            looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(true)
        );
        assert_eq!(looks_like_http(b"PRI * HTTP/2"), None);
        assert_eq!(looks_like_http(b"\x16\x03\x01\x02\x00"), Some(false));
        assert_eq!(looks_like_http(b"SSH-2.0-OpenSSH"), Some(false));
    }

    #[test]
    fn client_hello_sni_is_parsed_across_records() {
        let hello = client_hello(Some("DB.Example.com"));
        assert_eq!(
            parse_client_hello(&hello),
            Hello::Sni(Some("db.example.com".into()))
        );
        assert_eq!(parse_client_hello(&client_hello(None)), Hello::Sni(None));
        for cut in [0, 3, 5, 20, hello.len() - 1] {
            assert_eq!(parse_client_hello(&hello[..cut]), Hello::NeedMore, "{cut}");
        }
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        // The same handshake split over two records.
        let hs = &hello[5..];
        let (a, b) = hs.split_at(10);
        let mut split = vec![0x16, 0x03, 0x01, 0, a.len() as u8];
        split.extend_from_slice(a);
        split.extend_from_slice(&[0x16, 0x03, 0x01]);
        split.extend_from_slice(&(b.len() as u16).to_be_bytes());
        split.extend_from_slice(b);
        assert_eq!(
            parse_client_hello(&split),
            Hello::Sni(Some("db.example.com".into()))
        );
    }

    #[test]
    fn authority_must_be_ip_and_port() {
        assert!(parse_authority("10.0.0.10:9080").is_some());
        assert!(parse_authority("[fd00::1]:9080").is_some());
        assert!(parse_authority("reviews:9080").is_none());
        assert!(parse_authority("10.0.0.10").is_none());
        assert!(parse_authority("").is_none());
    }
}

/// Exchanges on one inner HTTP connection: request heads received (the service was called)
/// and responses finished (`heads > done`: a request is in flight), and when bytes last
/// moved either way.
/// Aligned like [`TunnelCtx`], and kept as long: packed with it (pages.rs, slab).
#[derive(Debug)]
#[repr(align(64))]
pub struct InnerCounters {
    pub heads: std::sync::atomic::AtomicU64,
    pub done: std::sync::atomic::AtomicU64,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last read or write.
    last_io_ms: std::sync::atomic::AtomicU64,
    /// A WebSocket upgrade the backend accepted, waiting for hyper to write the 101.
    pub upgrade: crate::upgrade::UpgradeSlot,
    /// Framing headers of the request head being read, as sent ([`crate::codec::framing`]
    /// bits): hyper drops a `Content-Length` that comes with `Transfer-Encoding` and a repeated
    /// equal one before the request phases see the head, and Envoy refuses both.
    pub head_framing: std::sync::atomic::AtomicU8,
}

impl Default for InnerCounters {
    fn default() -> Self {
        InnerCounters {
            heads: Default::default(),
            done: Default::default(),
            epoch: Instant::now(),
            last_io_ms: Default::default(),
            upgrade: Default::default(),
            head_framing: Default::default(),
        }
    }
}

impl InnerCounters {
    pub fn in_flight(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.heads.load(Relaxed) > self.done.load(Relaxed)
    }

    /// Record that bytes moved: a plain store, so the hot path never touches a timer.
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_io_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    fn idle_for(&self) -> std::time::Duration {
        let last = self.last_io_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.epoch
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }
}

/// The inner connection's I/O with two deadlines hyper does not give us in the shape we need:
/// - request head: from the first byte of a request (none in flight) until its head is
///   complete; on expiry the client gets `408` and the connection closes (HTTP/1.1 only;
///   an h2c connection, recognised by its preface, has HTTP/2's own framing);
/// - idle: no request in flight and no bytes either way; the connection is closed.
pub struct InnerIo {
    inner: Rewind,
    t: Arc<TunnelCtx>,
    counters: Arc<InnerCounters>,
    head_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
    head: Option<(Pin<Box<tokio::time::Sleep>>, u64)>,
    /// Armed while hyper serves the connection; a parked connection has none.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The connection opened with the h2c preface (set once it is known, before hyper runs).
    h2c: bool,
    timed_out: bool,
    /// hyper's parser refused a request head and its bare reply was held back
    /// ([`crate::codec::is_hyper_auto_reply`]); the tunnel answers instead.
    refused_head: bool,
    /// Looks at the header lines of the head being read for framing headers.
    scan: crate::codec::HeadScan,
}

impl InnerIo {
    pub fn new(inner: Rewind, t: Arc<TunnelCtx>, counters: Arc<InnerCounters>) -> InnerIo {
        let limits = &t.shared.limits;
        let (head_timeout, idle_timeout) = (limits.request_header_timeout, limits.idle_timeout);
        InnerIo {
            inner,
            counters,
            head_timeout,
            idle_timeout,
            head: None,
            idle: None,
            h2c: false,
            timed_out: false,
            refused_head: false,
            scan: crate::codec::HeadScan::default(),
            t,
        }
    }

    /// A reply hyper cannot write itself (a head its parser refused, the request-head
    /// deadline), from [`ProxyError::local_reply`], written whole (bounded by the head
    /// timeout); then the connection closes. Envoy's replies to a refused head
    /// (docs/envoy-observed.md, "HTTP/1.1 framing"): status, reason-phrase body,
    /// `connection: close`, and a `DPE` log line with
    /// no method or path (Envoy logs them as null); then the connection closes.
    async fn answer(&mut self, err: ProxyError, start: SystemTime, duration: std::time::Duration) {
        let reply = err.local_reply();
        let bytes = reply.http1_bytes(SystemTime::now());
        let _ = tokio::time::timeout(self.head_timeout, async {
            tokio::io::AsyncWriteExt::write_all(&mut self.inner, &bytes).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut self.inner).await
        })
        .await;
        let mut r = AccessLogRecord::new(start);
        r.protocol = Some("HTTP/1.1");
        r.response_code = reply.status.as_u16();
        r.response_flags = reply.flags;
        r.response_code_details = Some(reply.details);
        r.bytes_sent = reply.body.len() as u64;
        r.duration = duration.as_millis() as u64;
        r.downstream_local_address = Some(self.t.service.vip_text.clone());
        r.downstream_remote_address = Some(self.t.remote_str().to_string());
        emit(&self.t.shared, r);
    }

    fn in_flight(&self) -> bool {
        self.counters.in_flight()
    }
}

impl AsyncRead for InnerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        let heads = this
            .counters
            .heads
            .load(std::sync::atomic::Ordering::Relaxed);
        if let Some((_, at)) = &this.head
            && heads > *at
        {
            this.head = None;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    this.counters.touch();
                    if this.head.is_none() && !this.h2c && !this.in_flight() {
                        this.head = Some((Box::pin(tokio::time::sleep(this.head_timeout)), heads));
                        this.scan = crate::codec::HeadScan::start(&this.counters.head_framing);
                    }
                    if this.head.is_some() {
                        this.scan.feed(got, &this.counters.head_framing);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some((sleep, _)) = &mut this.head
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    // hyper gets an error and ends the connection; serve_http1 then writes
                    // the 408 whole and logs it (no request is in flight, so nothing else
                    // is being written).
                    this.timed_out = true;
                    this.head = None;
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                // The idle timer is re-armed lazily from the last activity, not on every
                // read and write.
                if this.in_flight() {
                    return Poll::Pending;
                }
                let idle_timeout = this.idle_timeout;
                let counters = &this.counters;
                let idle = this.idle.get_or_insert_with(|| {
                    let left = idle_timeout.saturating_sub(counters.idle_for());
                    Box::pin(tokio::time::sleep(left))
                });
                while idle.as_mut().poll(cx).is_ready() {
                    let idle_for = this.counters.idle_for();
                    if idle_for >= this.idle_timeout {
                        debug!("inner connection idle timeout");
                        return Poll::Ready(Ok(()));
                    }
                    let due = Instant::now() + (this.idle_timeout - idle_for);
                    idle.as_mut().reset(due);
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for InnerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.counters.touch();
        // A head is being read that never reached the request phases: the only thing hyper
        // writes then on its own is its bare reply to a head it refused. Held back; the
        // tunnel writes Envoy's (serve_http1).
        if let Some((_, at)) = &self.head
            && self
                .counters
                .heads
                .load(std::sync::atomic::Ordering::Relaxed)
                == *at
            && crate::codec::is_hyper_auto_reply(buf)
        {
            self.refused_head = true;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
