//! The inner HTTP connection of a tunnel: hyper's HTTP/1.1 or h2c server on the CONNECT
//! stream, parked when idle ([`Parked`]), with the request-head and idle deadlines hyper does not
//! give in the shape needed ([`InnerIo`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use accesslog::AccessLogRecord;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use crate::request::conn::{InnerCounters, TunnelCtx};
use crate::request::error::ProxyError;

use super::*;

pub(super) const DRAIN_IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// An HTTP/1.1 inner connection with no request in flight and no bytes for this long hands
/// hyper's per-connection state back (its read and write buffers, 16 KiB) and the tunnel's
/// task waits for the next request holding only the stream ([`Parked`]): an idle keep-alive
/// tunnel then costs ~3 KB (measured, benches `idle` with jemalloc, memory/mod.rs; Envoy
/// keeps its codec buffers: ~45 KB). The next request rebuilds the connection state, a
/// few microseconds once per idle period.
pub const PARK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// An HTTP inner connection waiting for its next request with no hyper state: just the
/// stream (and any bytes of a next request already read), the tunnel and the drain.
pub struct Parked {
    pub(super) io: InnerIo,
    pub(super) drain: hbone::drain::DrainWatcher,
}

impl Parked {
    /// A new HTTP tunnel: it waits for its first request like any idle one.
    pub(super) fn new(
        t: Arc<TunnelCtx>,
        stream: Rewind,
        drain: hbone::drain::DrainWatcher,
    ) -> Parked {
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
pub(super) async fn serve_inner(p: Parked) -> Option<Parked> {
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
                let resp = crate::request::handle(t, req, counters.clone()).await;
                resp.map(|r| r.map(|b| b.with_done(counters)))
            })
        })
    };
    // hyper's buffer limit: room above a request head at the limit (Envoy's 60 KiB), whose
    // oversize the request phases answer; a head beyond it is refused by hyper's parser and
    // answered the same way (codec.rs). It also bounds hyper's write buffer, i.e. how much of a
    // response waits for a client that does not read (slow_readers.rs). 12 KiB of room, not
    // less: at 4 KiB a 64 KiB POST cost 45% more CPU (benches `body64k`: hyper's reads then
    // no longer fit the head and a 64 KiB body); 12 KiB measured as fast as 32 KiB.
    let header_room = t.shared.limits.max_request_headers + 12 * 1024;
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
    S: hyper::service::HttpService<
            hyper::body::Incoming,
            ResBody = crate::request::body::ResponseBody,
        > + Unpin,
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
            let err = crate::request::codec::refused_head(&parts.read_buf, &e.to_string());
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
        crate::request::upgrade::bridge(io.inner, up, idle_timeout).await;
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
    S: hyper::service::HttpService<
            hyper::body::Incoming,
            ResBody = crate::request::body::ResponseBody,
        > + Send
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
pub(super) async fn wait_for_bytes(
    io: &mut InnerIo,
    drain: &mut hbone::drain::DrainWatcher,
) -> bool {
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
pub(super) async fn starts_with_h2c_preface(
    stream: &mut Rewind,
    head_timeout: std::time::Duration,
) -> bool {
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

/// The inner connection's I/O with two deadlines hyper does not give us in the shape we need:
/// - request head: from the first byte of a request (none in flight) until its head is
///   complete; on expiry the client gets `408` and the connection closes (HTTP/1.1 only;
///   an h2c connection, recognised by its preface, has HTTP/2's own framing);
/// - idle: no request in flight and no bytes either way; the connection is closed.
pub struct InnerIo {
    pub(super) inner: Rewind,
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
    /// ([`crate::request::codec::is_hyper_auto_reply`]); the tunnel answers instead.
    refused_head: bool,
    /// Looks at the header lines of the head being read for framing headers.
    scan: crate::request::codec::HeadScan,
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
            scan: crate::request::codec::HeadScan::default(),
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
                        this.scan =
                            crate::request::codec::HeadScan::start(&this.counters.head_framing);
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

impl InnerIo {
    /// A head is being read that never reached the request phases: the only thing hyper
    /// writes then on its own is its bare reply to a head it refused. Held back; the
    /// tunnel writes Envoy's (serve_http1).
    fn holds_back(&mut self, buf: &[u8]) -> bool {
        if let Some((_, at)) = &self.head
            && self
                .counters
                .heads
                .load(std::sync::atomic::Ordering::Relaxed)
                == *at
            && crate::request::codec::is_hyper_auto_reply(buf)
        {
            self.refused_head = true;
            return true;
        }
        false
    }
}

impl AsyncWrite for InnerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.counters.touch();
        if self.holds_back(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.counters.touch();
        // hyper's own replies are a head alone: one slice, the rest empty.
        let mut written = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (written.next(), written.next())
            && self.holds_back(only)
        {
            return Poll::Ready(Ok(only.len()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
