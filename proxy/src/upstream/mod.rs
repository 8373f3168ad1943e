//! Upstream connections: per-endpoint pools of plaintext HTTP/1.1 keep-alive connections and
//! shared HTTP/2 (h2c) connections, and least-request endpoint choice (Envoy's default
//! LEAST_REQUEST with two choices, protocol.md 2.7).
//!
//! We own the pool instead of using a generic client so that a *connect* failure is known
//! before the request is handed over: the request is then still ours and Istio's default
//! retry policy (`connect-failure`, previous hosts avoided) can try another endpoint without
//! buffering the body.

pub mod balance;
pub mod breaker;
pub mod dns;
pub mod dynamic_dns;
pub mod extauthz;
pub mod extauthz_grpc;
pub mod origination;
pub mod prefix;

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use policy::Endpoint;
use tokio::net::TcpStream;
use tracing::debug;

use crate::request::grpc_messages::{Direction, FrameCounter, GrpcMessages};
use crate::sharded::Sharded;

/// Why an upstream attempt failed before a response started.
#[derive(Debug, Clone)]
pub enum UpstreamFailure {
    /// TCP connect refused/unreachable/timed out: Envoy reset reason `remote connection failure`
    /// (or `connection timeout`), with the transport failure detail
    /// (`delayed connect error: Connection refused`).
    Connect { timeout: bool, detail: String },
    /// The connection closed or reset before response headers: `connection termination`.
    Termination,
    /// HTTP/2 stream refused by the upstream: `remote refused stream reset`.
    RefusedStream,
    /// A connection circuit breaker is full (`maxConnections` with
    /// `http1MaxPendingRequests` pending): `overflow`, 503 `UO`.
    Overflow,
    /// The upstream spoke something that is not HTTP: `protocol error` (502).
    Protocol,
}

impl UpstreamFailure {
    /// Envoy `resetReasonToString` (source/common/http/utility.cc).
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamFailure::Connect { timeout: false, .. } => "remote connection failure",
            UpstreamFailure::Connect { timeout: true, .. } => "connection timeout",
            UpstreamFailure::Termination => "connection termination",
            UpstreamFailure::RefusedStream => "remote refused stream reset",
            UpstreamFailure::Protocol => "protocol error",
            UpstreamFailure::Overflow => "overflow",
        }
    }

    pub fn transport_detail(&self) -> Option<&str> {
        match self {
            UpstreamFailure::Connect { detail, .. } if !detail.is_empty() => Some(detail),
            _ => None,
        }
    }

    /// Istio's default retry policy retries these (`connect-failure`, `refused-stream`;
    /// protocol.md 2.6). A termination after the request was sent is not retried.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            UpstreamFailure::Connect { .. } | UpstreamFailure::RefusedStream
        )
    }
}

/// Wire protocol towards one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// Read-ahead bound of an upstream HTTP/1.1 connection (hyper's adaptive read buffer; also
/// its write buffer's bound, which a request body streams through in chunks). 64 KiB reads
/// cut the CPU per GiB of 1 MiB responses by ~25% against fixed 16 KiB ones (fewer reads, and
/// fewer hand-offs between the connection task, the tunnel and the HTTP/2 writer); 256 KiB
/// was slower again (benches `resp1m`, 2026-12-07). Envoy reads up to its 1 MiB
/// per-connection buffer limit.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// The downstream request body, counted for `%BYTES_RECEIVED%`, optionally copied into a
/// bounded retry buffer as it streams upstream (Envoy's router keeps the body it sent for
/// retries and shadows and gives up retrying once it exceeds its buffer limit). A replayed
/// body ([`RetryBuffer::replay`]) is served from that copy.
///
/// Boxed: hyper queues each request (with its body inline) in a per-connection channel whose
/// blocks hold 32 requests; a pointer-sized body makes every upstream connection's block
/// ~4 KiB smaller.
pub struct RequestBody(Box<BodyState>);

struct BodyState {
    inner: Source,
    /// Frames read before the upstream call (ext_authz with the body), sent first.
    prefix: Option<Box<prefix::BodyPrefix>>,
    received: Option<Arc<BodyProgress>>,
    tee: Option<Arc<Mutex<Tee>>>,
    /// Envoy's stream idle timeout for a body the client stops sending (`--stream-idle-timeout`).
    idle: Option<StreamIdle>,
    /// A gRPC request's messages, counted once as they come from the client (not again on a
    /// replay for a retry, as Envoy's grpc_stats filter sits before the router).
    grpc: Option<Box<(FrameCounter, Arc<GrpcMessages>)>>,
}

/// How long the client may leave a started request body without a byte: armed when the body
/// has nothing to give (reading it was not held back by the upstream), reset by every frame.
struct StreamIdle {
    timeout: Duration,
    /// Made on the first wait: a body that streams without ever waiting never pays for a timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The sleep runs for the current wait (since the last frame).
    waiting: bool,
}

/// The client stopped sending its request body for the stream idle timeout (Envoy's HCM
/// `stream_idle_timeout`: 408 `stream timeout`, flag `SI`, when no response has started).
#[derive(Debug)]
pub struct StreamIdleTimeout;

impl std::fmt::Display for StreamIdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream timeout")
    }
}

impl std::error::Error for StreamIdleTimeout {}

enum Source {
    Incoming(Incoming),
    Replay(std::collections::VecDeque<Bytes>, Option<http::HeaderMap>),
}

/// How far the client's request body got: bytes received (`%BYTES_RECEIVED%`), and whether
/// reading it failed (a malformed chunked body: Envoy's codec answers 400 `http1.codec_error`
/// even when the headers were already forwarded).
#[derive(Debug, Default)]
pub struct BodyProgress {
    received: AtomicU64,
    failed: std::sync::atomic::AtomicBool,
    /// The client left the body unfinished for the stream idle timeout.
    idle_timed_out: std::sync::atomic::AtomicBool,
    /// When the whole request had been read: Envoy's router arms the route timeout and each
    /// try's timeout only then (router.cc `onRequestComplete`), so a slow upload is not cut by
    /// a route timeout shorter than the upload.
    complete: std::sync::OnceLock<tokio::time::Instant>,
    completed: tokio::sync::Notify,
}

impl BodyProgress {
    /// The whole request has been read (end of stream, or a body that failed).
    pub fn mark_complete(&self) {
        if self.complete.set(tokio::time::Instant::now()).is_ok() {
            self.completed.notify_waiters();
        }
    }

    /// When the whole request was read, if it was.
    pub fn completed_at(&self) -> Option<tokio::time::Instant> {
        self.complete.get().copied()
    }

    /// Wait until the whole request has been read.
    pub async fn complete(&self) -> tokio::time::Instant {
        if let Some(at) = self.completed_at() {
            return at;
        }
        let notified = self.completed.notified();
        tokio::pin!(notified);
        loop {
            notified.as_mut().enable();
            if let Some(at) = self.completed_at() {
                return at;
            }
            notified.as_mut().await;
            notified.set(self.completed.notified());
        }
    }

    /// The client stopped sending its body for the stream idle timeout.
    pub fn idle_timed_out(&self) -> bool {
        self.idle_timed_out.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn add(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    /// Reading the client's body failed (its framing, not the upstream).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
        self.mark_complete();
    }

    fn mark_idle_timed_out(&self) {
        self.idle_timed_out.store(true, Ordering::Relaxed);
        self.mark_complete();
    }
}

/// What the retry buffer holds.
#[derive(Default)]
struct Tee {
    data: Vec<Bytes>,
    size: usize,
    limit: usize,
    /// The body went over `limit`: it can no longer be replayed.
    overflow: bool,
    /// The whole body has been seen.
    ended: bool,
    trailers: Option<http::HeaderMap>,
}

/// Copy one step of the body into the retry buffer: `None` = the body ended, `Some(None)` =
/// it failed (never replayed), `Some(Some(frame))` = a frame.
fn record_in_tee(tee: &Mutex<Tee>, step: Option<Option<&Frame<Bytes>>>, at_end: bool) {
    let Ok(mut tee) = tee.lock() else {
        return;
    };
    match step {
        Some(Some(frame)) => {
            if let Some(d) = frame.data_ref() {
                tee.size += d.len();
                if tee.size > tee.limit {
                    tee.overflow = true;
                    tee.data.clear();
                } else if !tee.overflow {
                    tee.data.push(d.clone());
                }
            } else if let Some(t) = frame.trailers_ref() {
                tee.trailers = Some(t.clone());
            }
            tee.ended = at_end;
        }
        None => tee.ended = true,
        Some(None) => tee.overflow = true,
    }
}

/// A handle on a request body's retry copy.
#[derive(Clone)]
pub struct RetryBuffer(Arc<Mutex<Tee>>);

impl RetryBuffer {
    /// A fresh body with the same bytes, if the whole body was seen and fit in the limit.
    /// A body that was streamed only partly (or beyond the limit) is never replayed.
    pub fn replay(&self) -> Option<RequestBody> {
        let tee = self.0.lock().ok()?;
        if tee.overflow || !tee.ended {
            return None;
        }
        Some(RequestBody(Box::new(BodyState {
            inner: Source::Replay(tee.data.iter().cloned().collect(), tee.trailers.clone()),
            received: None,
            tee: None,
            idle: None,
            prefix: None,
            grpc: None,
        })))
    }

    /// The buffered body, when complete (for mirrors).
    pub fn complete_bytes(&self) -> Option<Bytes> {
        let tee = self.0.lock().ok()?;
        if tee.overflow || !tee.ended {
            return None;
        }
        let mut out = Vec::with_capacity(tee.size);
        for d in &tee.data {
            out.extend_from_slice(d);
        }
        Some(Bytes::from(out))
    }
}

impl RequestBody {
    /// The client's body; `idle` is the stream idle timeout (`None`: wait forever, Istio's
    /// waypoint setting).
    pub fn new(
        inner: Incoming,
        received: Arc<BodyProgress>,
        idle: Option<Duration>,
    ) -> RequestBody {
        if inner.is_end_stream() {
            received.mark_complete();
        }
        RequestBody(Box::new(BodyState {
            idle: idle
                .filter(|_| !inner.is_end_stream())
                .map(|timeout| StreamIdle {
                    timeout,
                    sleep: None,
                    waiting: false,
                }),
            inner: Source::Incoming(inner),
            received: Some(received),
            tee: None,
            prefix: None,
            grpc: None,
        }))
    }

    /// Count the gRPC messages of this body into `messages`.
    pub fn with_grpc_messages(mut self, messages: Option<Arc<GrpcMessages>>) -> RequestBody {
        self.0.grpc = messages.map(|m| Box::new((FrameCounter::new(Direction::Request), m)));
        self
    }

    /// Send `prefix` (already read from the client and counted) before the rest of the body.
    pub fn with_prefix(mut self, prefix: Option<prefix::BodyPrefix>) -> RequestBody {
        self.0.prefix = prefix.filter(|p| !p.frames.is_empty()).map(Box::new);
        self
    }

    /// An empty body (mirrored requests whose body cannot be copied are not sent; this is
    /// for bodiless ones).
    pub fn empty() -> RequestBody {
        RequestBody(Box::new(BodyState {
            inner: Source::Replay(Default::default(), None),
            received: None,
            tee: None,
            idle: None,
            prefix: None,
            grpc: None,
        }))
    }

    /// A body with these bytes.
    pub fn full(b: Bytes) -> RequestBody {
        RequestBody(Box::new(BodyState {
            inner: Source::Replay(std::iter::once(b).filter(|b| !b.is_empty()).collect(), None),
            received: None,
            tee: None,
            idle: None,
            prefix: None,
            grpc: None,
        }))
    }

    /// Keep a copy of up to `limit` bytes while streaming, for retries.
    pub fn with_retry_buffer(mut self, limit: usize) -> (RequestBody, RetryBuffer) {
        let tee = Tee {
            limit,
            ended: self.is_end_stream(),
            ..Tee::default()
        };
        let tee = Arc::new(Mutex::new(tee));
        self.0.tee = Some(tee.clone());
        (self, RetryBuffer(tee))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = crate::request::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this: &mut BodyState = &mut self.0;
        match &mut this.inner {
            Source::Replay(data, trailers) => Poll::Ready(match data.pop_front() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            Source::Incoming(inner) => {
                if let Some(prefix) = &mut this.prefix
                    && let Some(frame) = prefix.frames.pop_front()
                {
                    if prefix.frames.is_empty() {
                        this.prefix = None;
                    }
                    let at_end = this.prefix.is_none() && inner.is_end_stream();
                    if let (Some(g), Some(d)) = (&mut this.grpc, frame.data_ref()) {
                        g.0.feed(d, &g.1);
                    }
                    if let Some(tee) = &this.tee {
                        record_in_tee(tee, Some(Some(&frame)), at_end);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                let r = Pin::new(&mut *inner).poll_frame(cx);
                let at_end = inner.is_end_stream();
                if let Some(idle) = &mut this.idle {
                    if r.is_ready() {
                        idle.waiting = false;
                    } else {
                        let due = tokio::time::Instant::now() + idle.timeout;
                        let sleep = idle
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                        if !idle.waiting {
                            idle.waiting = true;
                            sleep.as_mut().reset(due);
                        }
                        if sleep.as_mut().poll(cx).is_ready() {
                            this.idle = None;
                            if let Some(progress) = &this.received {
                                progress.idle_timed_out.store(true, Ordering::Relaxed);
                                progress.mark_complete();
                            }
                            return Poll::Ready(Some(Err(Box::new(StreamIdleTimeout))));
                        }
                    }
                }
                if let Some(progress) = &this.received
                    && (at_end || matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))))
                {
                    progress.mark_complete();
                }
                if let (Poll::Ready(Some(Err(_))), Some(progress)) = (&r, &this.received) {
                    progress.failed.store(true, Ordering::Relaxed);
                }
                let r = r.map(|f| f.map(|f| f.map_err(|e| Box::new(e) as Self::Error)));
                if let Poll::Ready(frame) = &r {
                    if let Some(Ok(frame)) = frame
                        && let Some(d) = frame.data_ref()
                        && let Some(received) = &this.received
                    {
                        received.add(d.len() as u64);
                    }
                    if let (Some(Ok(frame)), Some(g)) = (frame, &mut this.grpc)
                        && let Some(d) = frame.data_ref()
                    {
                        g.0.feed(d, &g.1);
                    }
                    if let Some(tee) = &this.tee {
                        record_in_tee(tee, frame.as_ref().map(|f| f.as_ref().ok()), at_end);
                    }
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0.inner {
            Source::Incoming(i) => self.0.prefix.is_none() && i.is_end_stream(),
            Source::Replay(d, t) => d.is_empty() && t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0.inner {
            Source::Incoming(i) => match &self.0.prefix {
                None => i.size_hint(),
                Some(p) => {
                    let held = p.len() as u64;
                    let rest = i.size_hint();
                    let mut hint = SizeHint::new();
                    hint.set_lower(rest.lower() + held);
                    if let Some(upper) = rest.upper() {
                        hint.set_upper(upper + held);
                    }
                    hint
                }
            },
            Source::Replay(d, _) => SizeHint::with_exact(d.iter().map(|b| b.len() as u64).sum()),
        }
    }
}

/// Settings for upstream connections.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Istio MeshConfig `connectTimeout` default: 10 s (protocol.md 2.4).
    pub connect_timeout: Duration,
    /// Port of the destination ztunnel's HBONE listener (15008; overridable for tests).
    pub hbone_port: u16,
    /// A pooled keep-alive connection unused this long is closed: Envoy's cluster
    /// `idle_timeout`, which istiod sets from DestinationRule `connectionPool.http.idleTimeout`
    /// (default 1 h).
    pub pool_idle_timeout: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(10),
            hbone_port: 15008,
            pool_idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Everything needed to originate HBONE to ambient pods (Istio's `connect_originate`):
/// our workload certificate, the trust domain the destination must be in, and the pool.
pub struct HboneUpstream {
    pub pool: hbone::pool::Pool,
    /// Client TLS (our cert; server checked to be in our trust domain, as Envoy's
    /// connect_originate SAN matcher does, protocol.md 2.4). Swapped on certificate rotation.
    pub tls: arc_swap::ArcSwap<rustls::ClientConfig>,
}

/// The byte stream of one upstream connection: plain TCP or an HBONE tunnel.
pub trait UpstreamIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

enum Sender {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

struct IdleConn {
    sender: http1::SendRequest<RequestBody>,
    local_addr: Option<SocketAddr>,
    since: tokio::time::Instant,
    /// When the connection was opened (`maxConnectionDuration`).
    opened: tokio::time::Instant,
    /// The lifetime it was given back with (checked by the sweep).
    lifetime: Option<Duration>,
    /// Requests this connection has carried (DestinationRule `maxRequestsPerConnection`).
    served: u32,
    /// How long it may stay idle (the cluster's `connectionPool.http.idleTimeout`, else
    /// the pool idle timeout).
    idle_timeout: Duration,
    /// Which TLS origination it carries (0: none): a connection is reused only by a
    /// cluster with the same one.
    tls_id: usize,
}

/// Per-cluster connection settings from a DestinationRule `connectionPool` (`None`: the
/// waypoint's own settings).
#[derive(Debug, Clone, Default)]
pub struct ConnOptions {
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    /// DestinationRule `tls` origination, with the Service hostname (the default SNI).
    pub tls: Option<(Arc<policy::traffic::TlsOrigination>, Arc<str>)>,
    /// The cluster's connection breaker (`maxConnections`).
    pub breaker: Option<Arc<breaker::ConnBreaker>>,
    /// `tcp.tcpKeepalive` on the sockets to plaintext (or TLS-originated) endpoints.
    pub tcp_keepalive: Option<policy::traffic::TcpKeepalive>,
    /// `tcp.maxConnectionDuration`: a connection this old takes no new request.
    pub max_connection_duration: Option<Duration>,
    /// A `DYNAMIC_DNS` name's other addresses (answer order): tried, on the endpoint's port,
    /// when the endpoint's own address does not connect.
    pub more_addrs: Option<Arc<[std::net::IpAddr]>>,
}

impl ConnOptions {
    pub fn of(cluster: &policy::Cluster) -> ConnOptions {
        match &cluster.traffic {
            None => ConnOptions::default(),
            Some(t) => ConnOptions {
                connect_timeout: t.connect_timeout,
                idle_timeout: t.idle_timeout,
                max_requests_per_connection: t.max_requests_per_connection,
                tls: t.tls.clone().map(|tls| (tls, cluster.hostname.clone())),
                breaker: breaker::of(t),
                tcp_keepalive: t.tcp_keepalive,
                max_connection_duration: t.max_connection_duration,
                more_addrs: None,
            },
        }
    }

    /// A connection opened at `opened` is past `maxConnectionDuration` (Envoy then drains
    /// it: no new request, closed once idle).
    fn expired(&self, opened: tokio::time::Instant) -> bool {
        self.max_connection_duration
            .is_some_and(|d| opened.elapsed() >= d)
    }

    /// Which TLS a pooled connection was opened with: the settings and the server name (a
    /// `DYNAMIC_DNS` cluster sends each `Host` as SNI, and names sharing an address must not
    /// share a connection).
    fn tls_id(&self) -> usize {
        self.tls.as_ref().map_or(0, |(t, name)| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (Arc::as_ptr(t) as *const () as usize).hash(&mut h);
            name.hash(&mut h);
            h.finish() as usize
        })
    }
}

struct EndpointPool {
    addr: SocketAddr,
    /// Idle keep-alive connections, newest last, with when each was given back.
    idle: Mutex<Vec<IdleConn>>,
    /// The shared h2c connection, if one is open.
    h2: Mutex<Option<SharedH2>>,
}

/// The shared h2c connection to an endpoint: sender, our address, when it was opened, and
/// the TLS it was opened with ([`ConnOptions::tls_id`]).
type SharedH2 = (
    http2::SendRequest<RequestBody>,
    Option<SocketAddr>,
    tokio::time::Instant,
    usize,
);

/// All upstream pools. Shared by every request.
pub struct Upstreams {
    /// Per worker thread, as Envoy keeps a connection pool per worker for each host: the
    /// lookup and the idle list a request touches are its own thread's, so workers never
    /// wait on each other's pool lock (benches/benches/contention.rs). A connection checked
    /// out on one thread goes back to the pool it came from.
    pools: Sharded<HashMap<SocketAddr, Arc<EndpointPool>>>,
    settings: UpstreamSettings,
    pub connections_opened: AtomicU64,
    /// `None` until certificates are known (then every ambient endpoint fails with UF).
    pub hbone: Option<HboneUpstream>,
}

/// A connection checked out for one request.
pub struct Checkout {
    sender: Sender,
    pool: Arc<EndpointPool>,
    /// Requests the connection carried before this one.
    served: u32,
    opts: ConnOptions,
    default_idle: Duration,
    /// Our side of the upstream TCP connection (`%UPSTREAM_LOCAL_ADDRESS%`); `None` for an
    /// HBONE tunnel (Envoy logs `envoy://internal_client_address/` there).
    pub local_addr: Option<SocketAddr>,
    /// Taken from the pool rather than freshly connected.
    pub reused: bool,
    /// When the connection was opened.
    opened: tokio::time::Instant,
}

/// Gives an HTTP/1.1 connection back to its pool once the response body has been read to
/// the end; dropped early (client gone, error) it closes the connection instead.
pub struct PoolReturn {
    sender: http1::SendRequest<RequestBody>,
    local_addr: Option<SocketAddr>,
    pool: Arc<EndpointPool>,
    /// Requests carried, this one included.
    served: u32,
    opts: ConnOptions,
    default_idle: Duration,
    opened: tokio::time::Instant,
}

impl PoolReturn {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        // Envoy closes a connection that carried `max_requests_per_connection` requests, or
        // that outlived `max_connection_duration`.
        if self
            .opts
            .max_requests_per_connection
            .is_some_and(|max| self.served >= max)
            || self.opts.expired(self.opened)
        {
            return;
        }
        if let Ok(mut idle) = self.pool.idle.lock()
            && idle.len() < MAX_IDLE_PER_ENDPOINT
        {
            idle.push(IdleConn {
                sender: self.sender,
                local_addr: self.local_addr,
                since: tokio::time::Instant::now(),
                opened: self.opened,
                lifetime: self.opts.max_connection_duration,
                served: self.served,
                idle_timeout: self.opts.idle_timeout.unwrap_or(self.default_idle),
                tls_id: self.opts.tls_id(),
            });
        }
        if let Some(b) = &self.opts.breaker {
            b.released();
        }
    }
}

/// Why `send` failed, and whether the request came back unsent (safe to retry).
pub struct SendError {
    pub failure: UpstreamFailure,
    pub request: Option<Request<RequestBody>>,
    /// The connection came from the pool (it may have been closed by the upstream meanwhile).
    pub reused: bool,
}

fn connect_detail(e: &io::Error) -> String {
    // Envoy: "delayed connect error: Connection refused" (strerror text, no errno suffix).
    let text = match e.raw_os_error() {
        Some(code) => {
            let s = io::Error::from_raw_os_error(code).to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    };
    format!("delayed connect error: {text}")
}

impl Upstreams {
    pub fn new(settings: UpstreamSettings) -> Upstreams {
        Upstreams::with_pool_shards(settings, crate::sharded::default_shards())
    }

    /// With `shards` pool tables instead of one per worker thread; `1` is one table shared by
    /// every worker, the layout before per-worker pools (benches/benches/contention.rs).
    pub fn with_pool_shards(settings: UpstreamSettings, shards: usize) -> Upstreams {
        Upstreams {
            pools: Sharded::new(shards),
            settings,
            connections_opened: AtomicU64::new(0),
            hbone: None,
        }
    }

    fn pool(&self, addr: SocketAddr) -> Arc<EndpointPool> {
        self.pools
            .local()
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(EndpointPool {
                    addr,
                    idle: Mutex::new(Vec::new()),
                    h2: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Drop what the pools no longer need: idle connections past the idle timeout, closed
    /// shared h2c connections, the pools of endpoints not in `live` (endpoints that left the
    /// configuration; requests still using them keep their connection to the end), and the
    /// HBONE pool's idle connections. Run periodically by the owner.
    pub fn sweep(&self, live: impl Fn(&SocketAddr) -> bool) {
        self.pools.for_each(|pools| {
            pools.retain(|addr, pool| {
                if let Ok(mut idle) = pool.idle.lock() {
                    idle.retain(|c| {
                        !c.sender.is_closed()
                            && c.since.elapsed() < c.idle_timeout
                            && c.lifetime.is_none_or(|l| c.opened.elapsed() < l)
                    });
                }
                if let Ok(mut h2) = pool.h2.lock()
                    && h2.as_ref().is_some_and(|(s, _, _, _)| s.is_closed())
                {
                    *h2 = None;
                }
                live(addr)
            })
        });
        if let Some(h) = &self.hbone {
            h.pool.sweep();
        }
    }

    /// Endpoint pools held now, summed over workers (a metric: it must follow the
    /// endpoints, not only grow).
    pub fn pool_count(&self) -> usize {
        let mut n = 0;
        self.pools.for_each(|p| n += p.len());
        n
    }

    /// Idle keep-alive connections held now.
    pub fn idle_connections(&self) -> usize {
        let mut n = 0;
        self.pools.for_each(|p| {
            n += p
                .values()
                .map(|e| e.idle.lock().map(|i| i.len()).unwrap_or(0))
                .sum::<usize>()
        });
        n
    }

    /// A ready connection to `addr`: a pooled one if possible, else a new one.
    pub async fn checkout(
        &self,
        endpoint: &Endpoint,
        proto: UpstreamProtocol,
        opts: ConnOptions,
    ) -> Result<Checkout, UpstreamFailure> {
        let addr = endpoint.addr;
        let pool = self.pool(addr);
        match proto {
            UpstreamProtocol::Http1 => {
                loop {
                    let candidate = pool.idle.lock().ok().and_then(|mut idle| idle.pop());
                    let Some(IdleConn {
                        mut sender,
                        local_addr,
                        since,
                        opened,
                        served,
                        idle_timeout,
                        tls_id,
                        ..
                    }) = candidate
                    else {
                        break;
                    };
                    if sender.is_closed()
                        || since.elapsed() >= idle_timeout
                        || tls_id != opts.tls_id()
                        || opts.expired(opened)
                    {
                        continue;
                    }
                    if sender.ready().await.is_ok() {
                        return Ok(Checkout {
                            sender: Sender::H1(sender),
                            pool,
                            served,
                            opts,
                            default_idle: self.settings.pool_idle_timeout,
                            local_addr,
                            reused: true,
                            opened,
                        });
                    }
                }
                // The cluster's connection budget (`maxConnections`): beyond it, wait as a
                // pending request for a connection of this endpoint to come back, or the
                // count to drop (bounded by `http1MaxPendingRequests` and the caller's timers).
                let slot = match &opts.breaker {
                    None => None,
                    Some(b) => match b.try_open() {
                        Some(slot) => Some(slot),
                        None => {
                            let idle_here =
                                || pool.idle.lock().map(|i| i.is_empty()).unwrap_or(true);
                            if !b
                                .wait_pending(|| {
                                    idle_here() && b.connections() >= b.max_connections()
                                })
                                .await
                            {
                                return Err(UpstreamFailure::Overflow);
                            }
                            return Box::pin(self.checkout(endpoint, proto, opts)).await;
                        }
                    },
                };
                // Boxed: connecting (TCP, or TLS + HTTP/2 for an HBONE tunnel) makes a large
                // future that only a request opening a connection needs; the request's own
                // future stays small for the pooled case.
                Box::pin(self.new_connection(endpoint, pool, proto, opts, slot)).await
            }
            UpstreamProtocol::Http2 => {
                let existing = pool.h2.lock().ok().and_then(|g| g.clone());
                // An expired shared connection takes no new stream: a new one replaces it in
                // the pool, and it closes when its last stream ends and its senders are gone.
                if let Some((sender, local_addr, opened, tls_id)) = existing
                    && !sender.is_closed()
                    && sender.is_ready()
                    && !opts.expired(opened)
                    && tls_id == opts.tls_id()
                {
                    return Ok(Checkout {
                        sender: Sender::H2(sender),
                        pool,
                        served: 0,
                        opts,
                        default_idle: self.settings.pool_idle_timeout,
                        local_addr,
                        reused: true,
                        opened,
                    });
                }
                let slot = match &opts.breaker {
                    None => None,
                    Some(b) => Some(b.try_open().ok_or(UpstreamFailure::Overflow)?),
                };
                Box::pin(self.new_connection(endpoint, pool, proto, opts, slot)).await
            }
        }
    }

    /// Open a new upstream connection and hand it out (the pool's slow path).
    async fn new_connection(
        &self,
        endpoint: &Endpoint,
        pool: Arc<EndpointPool>,
        proto: UpstreamProtocol,
        opts: ConnOptions,
        slot: Option<breaker::ConnSlot>,
    ) -> Result<Checkout, UpstreamFailure> {
        let addr = endpoint.addr;
        match proto {
            UpstreamProtocol::Http1 => {
                let (io, local_addr) = self.connect_with(endpoint, &opts).await?;
                // A response body is never read ahead more than UPSTREAM_READ_BUFFER of what
                // the client takes: a client that stops reading back-pressures the backend
                // instead of growing our buffers. hyper's adaptive reads start at 8 KiB and
                // double while reads fill the buffer, so small responses stay small.
                let (sender, conn) = http1::Builder::new()
                    .max_buf_size(UPSTREAM_READ_BUFFER)
                    .handshake::<_, RequestBody>(TokioIo::new(io))
                    .await
                    .map_err(|_| UpstreamFailure::Termination)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
                    }
                    // Counted against the cluster until it closes.
                    drop(slot);
                });
                Ok(Checkout {
                    sender: Sender::H1(sender),
                    pool,
                    served: 0,
                    opts,
                    default_idle: self.settings.pool_idle_timeout,
                    local_addr,
                    reused: false,
                    opened: tokio::time::Instant::now(),
                })
            }
            UpstreamProtocol::Http2 => {
                let (io, local_addr) = self.connect_with(endpoint, &opts).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(4 * 1024 * 1024)
                    .initial_connection_window_size(16 * 1024 * 1024)
                    .handshake::<_, RequestBody>(TokioIo::new(io))
                    .await
                    .map_err(|_| UpstreamFailure::Protocol)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                    drop(slot);
                });
                let opened = tokio::time::Instant::now();
                if let Ok(mut g) = pool.h2.lock() {
                    *g = Some((sender.clone(), local_addr, opened, opts.tls_id()));
                }
                Ok(Checkout {
                    sender: Sender::H2(sender),
                    pool,
                    served: 0,
                    opts,
                    default_idle: self.settings.pool_idle_timeout,
                    local_addr,
                    reused: false,
                    opened,
                })
            }
        }
    }

    /// A new byte stream to the endpoint: plain TCP, or an HBONE tunnel for ambient pods
    /// (mTLS to `ip:15008`, CONNECT `ip:targetPort`, protocol.md 1.8).
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(Box<dyn UpstreamIo>, Option<SocketAddr>), UpstreamFailure> {
        self.connect_with(endpoint, &ConnOptions::default()).await
    }

    /// As [`Upstreams::connect`] with a cluster's DestinationRule settings: its
    /// `connectionPool.tcp.connectTimeout` instead of `--connect-timeout`, and TLS originated
    /// to a plaintext endpoint when the rule has `tls` (an HBONE endpoint is mTLS already).
    pub async fn connect_with(
        &self,
        endpoint: &Endpoint,
        opts: &ConnOptions,
    ) -> Result<(Box<dyn UpstreamIo>, Option<SocketAddr>), UpstreamFailure> {
        let timeout = opts
            .connect_timeout
            .unwrap_or(self.settings.connect_timeout);
        if let Some(identity) = &endpoint.tunnel {
            return self
                .connect_hbone(endpoint.addr, identity, timeout)
                .await
                .map(|s| (s, None));
        }
        let (tcp, local) = match self.connect_tcp(endpoint.addr, timeout).await {
            Ok(c) => c,
            Err(first) => {
                let mut connected = Err(first);
                for ip in opts.more_addrs.iter().flat_map(|a| a.iter()) {
                    let addr = SocketAddr::new(*ip, endpoint.addr.port());
                    if let Ok(c) = self.connect_tcp(addr, timeout).await {
                        connected = Ok(c);
                        break;
                    }
                }
                connected?
            }
        };
        if let Some(k) = &opts.tcp_keepalive {
            set_keepalive(&tcp, k);
        }
        if let Some((tls, hostname)) = &opts.tls {
            let handshake = origination::connect(tcp, tls, hostname);
            return match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(s)) => Ok((Box::new(s), Some(local))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(UpstreamFailure::Connect {
                    timeout: true,
                    detail: String::new(),
                }),
            };
        }
        Ok((Box::new(tcp), Some(local)))
    }

    async fn connect_hbone(
        &self,
        addr: SocketAddr,
        identity: &Arc<str>,
        timeout: Duration,
    ) -> Result<Box<dyn UpstreamIo>, UpstreamFailure> {
        let Some(h) = &self.hbone else {
            return Err(UpstreamFailure::Connect {
                timeout: false,
                detail: "no workload certificate for HBONE".into(),
            });
        };
        let dest = SocketAddr::new(addr.ip(), self.settings.hbone_port);
        let opened = tokio::time::timeout(
            timeout,
            h.pool.open(
                dest,
                identity.clone(),
                h.tls.load_full(),
                &addr.to_string(),
                http::HeaderMap::new(),
            ),
        )
        .await;
        match opened {
            Ok(Ok(stream)) => {
                self.connections_opened.fetch_add(1, Ordering::Relaxed);
                Ok(Box::new(stream))
            }
            Ok(Err(e)) => Err(UpstreamFailure::Connect {
                timeout: false,
                detail: hbone_failure_detail(&e),
            }),
            Err(_) => Err(UpstreamFailure::Connect {
                timeout: true,
                detail: String::new(),
            }),
        }
    }

    async fn connect_tcp(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), UpstreamFailure> {
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(UpstreamFailure::Connect {
                    timeout: false,
                    detail: connect_detail(&e),
                });
            }
            Err(_) => {
                return Err(UpstreamFailure::Connect {
                    timeout: true,
                    detail: String::new(),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        let local = tcp.local_addr().unwrap_or(addr);
        Ok((tcp, local))
    }
}

/// DestinationRule `tcpKeepalive` on an upstream socket: SO_KEEPALIVE, and the idle time,
/// probe interval and probe count given (the kernel's defaults otherwise), as Envoy applies
/// `upstream_connection_options.tcp_keepalive`.
fn set_keepalive(tcp: &TcpStream, k: &policy::traffic::TcpKeepalive) {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(t);
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(i);
    }
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    if let Some(n) = k.probes {
        ka = ka.with_retries(n);
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        debug!(error = %e, "setting TCP keepalive on an upstream socket");
    }
}

/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` for a failed HBONE origination, in Envoy's shapes:
/// `TLS_error:...` for handshake/verification failures, `delayed connect error: ...` for TCP,
/// `tunnel_response:<status>` when the CONNECT is refused.
fn hbone_failure_detail(e: &hbone::Error) -> String {
    match e {
        hbone::Error::ConnectStatus { status, .. } => {
            format!("tunnel_response:{}", status.as_u16())
        }
        hbone::Error::Backoff { last, tls: true } => format!("TLS_error:{last}"),
        e if e.is_tls() => format!("TLS_error:{e}"),
        hbone::Error::Io(io) => connect_detail(io),
        other => other.to_string(),
    }
}

impl Checkout {
    /// Send the request. On failure, says whether the request came back unsent.
    pub async fn send(
        self,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<PoolReturn>), SendError> {
        let reused = self.reused;
        match self.sender {
            Sender::H1(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => Ok((
                    resp,
                    Some(PoolReturn {
                        sender,
                        local_addr: self.local_addr,
                        pool: self.pool,
                        served: self.served.saturating_add(1),
                        opts: self.opts,
                        default_idle: self.default_idle,
                        opened: self.opened,
                    }),
                )),
                Err(mut e) => {
                    let failure = classify(e.error());
                    Err(SendError {
                        failure,
                        request: e.take_message(),
                        reused,
                    })
                }
            },
            Sender::H2(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => Ok((resp, None)),
                Err(mut e) => {
                    let failure = classify(e.error());
                    if let Ok(mut g) = self.pool.h2.lock()
                        && g.as_ref().is_some_and(|(s, _, _, _)| s.is_closed())
                    {
                        *g = None;
                    }
                    Err(SendError {
                        failure,
                        request: e.take_message(),
                        reused,
                    })
                }
            },
        }
    }

    pub fn endpoint(&self) -> SocketAddr {
        self.pool.addr
    }

    /// Return an unused connection to its pool instead of closing it (a shared HTTP/2
    /// connection simply stays shared).
    pub fn give_back(self) {
        if let Sender::H1(sender) = self.sender {
            PoolReturn {
                sender,
                local_addr: self.local_addr,
                pool: self.pool,
                served: self.served,
                opts: self.opts,
                default_idle: self.default_idle,
                opened: self.opened,
            }
            .release();
        }
    }
}

fn classify(e: &hyper::Error) -> UpstreamFailure {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        return UpstreamFailure::Protocol;
    }
    // h2 REFUSED_STREAM surfaces as a user-visible h2 error in the source chain.
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>()
            && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return UpstreamFailure::RefusedStream;
        }
        src = s.source();
    }
    UpstreamFailure::Termination
}

/// Least-request choice among `endpoints` (power of two random choices, Envoy's default
/// `choice_count: 2`), avoiding `tried` endpoints when another exists (Istio's
/// `previous_hosts` retry predicate).
pub fn pick_endpoint<'a>(
    endpoints: &'a [Endpoint],
    tried: &[SocketAddr],
    r: u64,
) -> Option<&'a Endpoint> {
    if endpoints.len() <= 1 {
        return endpoints.first();
    }
    let fresh = |e: &Endpoint| !tried.contains(&e.addr);
    let untried = endpoints.iter().filter(|e| fresh(e)).count();
    // Every host was tried: any host is allowed again.
    let (pool, count): (&dyn Fn(&Endpoint) -> bool, usize) = if untried == 0 {
        (&|_| true, endpoints.len())
    } else {
        (&fresh, untried)
    };
    if balance::is_weighted(endpoints) {
        balance::weighted_least_request(endpoints, pool, r)
    } else {
        balance::two_choices(endpoints, pool, count, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint::new(format!("127.0.0.{}:80", i + 1).parse().unwrap(), None, None))
            .collect()
    }

    #[test]
    fn least_request_prefers_the_less_loaded_of_two() {
        let e = eps(2);
        for _ in 0..5 {
            e[0].load.inc();
        }
        for r in 0..64u64 {
            assert_eq!(
                pick_endpoint(&e, &[], r.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .unwrap()
                    .addr,
                e[1].addr
            );
        }
    }

    #[test]
    fn retries_avoid_previous_hosts_while_others_exist() {
        let e = eps(3);
        let tried = [e[0].addr, e[1].addr];
        for r in 0..64u64 {
            assert_eq!(pick_endpoint(&e, &tried, r * 7919).unwrap().addr, e[2].addr);
        }
        let all = [e[0].addr, e[1].addr, e[2].addr];
        assert!(pick_endpoint(&e, &all, 3).is_some());
    }

    #[test]
    fn connect_detail_matches_envoy_wording() {
        let e = io::Error::from_raw_os_error(111);
        assert_eq!(
            connect_detail(&e),
            "delayed connect error: Connection refused"
        );
    }
}
