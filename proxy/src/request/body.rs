//! The response body handed to the downstream: either the upstream's body streamed through,
//! or a local reply. It counts bytes sent, returns the upstream connection to its pool at the
//! end, and emits the access-log record exactly once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::request::conn::InnerCounters;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use policy::EndpointLoad;

use crate::request::grpc_messages::{Direction, FrameCounter, GrpcMessages};
use crate::request::log::PendingLog;
use crate::upstream::PoolReturn;

/// Decrements an endpoint's outstanding-request count when the exchange is over.
/// The endpoint's in-flight count (least-request choice) and the cluster's circuit-breaker
/// slot, held until the response body ends.
pub struct LoadGuard(pub Arc<EndpointLoad>, pub Option<policy::traffic::Slot>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

enum Kind {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

/// The route timeout expired while the response body was streaming.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream request timeout")
    }
}

impl std::error::Error for BodyTimeout {}

/// Error of a response body: the upstream's, or our route timeout.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// See the module docs.
pub struct ResponseBody {
    kind: Kind,
    /// Route timeout (`timeouts.request`) still running: Envoy's covers the whole response,
    /// and when it expires after the headers were sent the stream is reset (flag `UT`).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    log: Option<PendingLog>,
    pool: Option<PoolReturn>,
    load: Option<LoadGuard>,
    sent: u64,
    /// Counts finished exchanges of the inner connection (request-head deadline bookkeeping).
    done: Option<Arc<InnerCounters>>,
    /// A gRPC response's messages, and the timer of their periodic report.
    grpc: Option<Box<GrpcCount>>,
}

/// Response-side gRPC message counting of a stream (see `grpc_messages`).
struct GrpcCount {
    counter: FrameCounter,
    messages: Arc<GrpcMessages>,
    every: std::time::Duration,
    report: Pin<Box<tokio::time::Sleep>>,
}

impl ResponseBody {
    pub fn upstream(
        inner: Incoming,
        log: PendingLog,
        pool: Option<PoolReturn>,
        load: LoadGuard,
    ) -> ResponseBody {
        let grpc = log.grpc_messages().map(|messages| {
            let every = log.grpc_report_interval();
            Box::new(GrpcCount {
                counter: FrameCounter::new(Direction::Response),
                messages,
                every,
                report: Box::pin(tokio::time::sleep(every)),
            })
        });
        ResponseBody {
            kind: Kind::Upstream(inner),
            deadline: None,
            log: Some(log),
            pool,
            load: Some(load),
            sent: 0,
            done: None,
            grpc,
        }
    }

    pub fn local(body: Bytes, log: PendingLog) -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(if body.is_empty() { None } else { Some(body) }),
            deadline: None,
            log: Some(log),
            pool: None,
            load: None,
            sent: 0,
            done: None,
            grpc: None,
        }
    }

    /// An empty body whose exchange is logged elsewhere (a `101`: the upgraded session
    /// logs the request when it ends).
    pub fn empty_unlogged() -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(None),
            deadline: None,
            log: None,
            pool: None,
            load: None,
            sent: 0,
            done: None,
            grpc: None,
        }
    }

    /// Reset the stream if the body has not ended by `deadline`.
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> ResponseBody {
        self.deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        self
    }

    /// Count the end of this exchange (body finished or dropped) in `counter`.
    pub fn with_done(mut self, counter: Arc<InnerCounters>) -> ResponseBody {
        self.done = Some(counter);
        self
    }

    fn complete(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.release();
        }
        self.load.take();
        if let Some(log) = self.log.take() {
            log.finish(self.sent);
        }
    }

    fn at_end(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Local(b) => b.is_none(),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let ended = this.at_end();
        if let Some(d) = &mut this.deadline
            && !ended
            && d.as_mut().poll(cx).is_ready()
        {
            // Envoy `onResponseTimeout` after the headers: the stream is reset, logged `UT`
            // with the status already sent.
            this.deadline = None;
            this.pool.take();
            this.load.take();
            if let Some(mut log) = this.log.take() {
                if let Some(r) = log.record() {
                    r.response_flags.set(accesslog::ResponseFlag::UT);
                    r.response_code_details = Some("response_timeout".into());
                }
                log.finish(this.sent);
            }
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        // A long gRPC stream reports its messages every interval, not only at its end.
        if let Some(g) = &mut this.grpc
            && !ended
            && g.report.as_mut().poll(cx).is_ready()
        {
            let next = tokio::time::Instant::now() + g.every;
            g.report.as_mut().reset(next);
            let _ = g.report.as_mut().poll(cx);
            if let Some(log) = this.log.as_mut() {
                log.report_grpc_messages();
            }
        }
        match &mut this.kind {
            Kind::Local(b) => match b.take() {
                Some(bytes) => {
                    this.sent += bytes.len() as u64;
                    this.complete();
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                None => {
                    this.complete();
                    Poll::Ready(None)
                }
            },
            Kind::Upstream(inner) => match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        this.sent += d.len() as u64;
                        if let Some(g) = &mut this.grpc {
                            g.counter.feed(d, &g.messages);
                        }
                    } else if let Some(t) = frame.trailers_ref()
                        && let Some(r) = this.log.as_mut().and_then(|l| l.record())
                    {
                        super::headers::record_grpc_status(r, t);
                    }
                    if this.at_end() {
                        this.complete();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    this.complete();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    // Upstream reset after the response started (Envoy UC,
                    // `upstream_reset_after_response_started{connection_termination}`).
                    this.pool.take();
                    this.load.take();
                    if let Some(mut log) = this.log.take() {
                        if let Some(r) = log.record() {
                            r.response_flags.set(accesslog::ResponseFlag::UC);
                            r.response_code_details = Some(
                                "upstream_reset_after_response_started{connection_termination}"
                                    .into(),
                            );
                        }
                        log.finish(this.sent);
                    }
                    Poll::Ready(Some(Err(e.into())))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.at_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.done.fetch_add(1, Ordering::Relaxed);
        }
        if self.log.is_none() {
            return;
        }
        if self.at_end() {
            // Bodies that were empty from the start (HEAD, 204, 304) are never polled.
            self.complete();
        } else {
            self.pool.take();
            self.load.take();
            if let Some(log) = self.log.take() {
                log.abandon(self.sent);
            }
        }
    }
}
