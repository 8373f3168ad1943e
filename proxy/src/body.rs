//! The response body handed to the downstream: either the upstream's body streamed through,
//! or a local reply. It counts bytes sent, returns the upstream connection to its pool at the
//! end, and emits the access-log record exactly once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::tunnel::InnerCounters;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use policy::EndpointLoad;

use crate::logguard::PendingLog;
use crate::upstream::PoolReturn;

/// Decrements an endpoint's outstanding-request count when the exchange is over.
pub struct LoadGuard(pub Arc<EndpointLoad>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

enum Kind {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

/// See the module docs.
pub struct ResponseBody {
    kind: Kind,
    log: Option<PendingLog>,
    pool: Option<PoolReturn>,
    load: Option<LoadGuard>,
    sent: u64,
    /// Counts finished exchanges of the inner connection (request-head deadline bookkeeping).
    done: Option<Arc<InnerCounters>>,
}

impl ResponseBody {
    pub fn upstream(
        inner: Incoming,
        log: PendingLog,
        pool: Option<PoolReturn>,
        load: LoadGuard,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream(inner),
            log: Some(log),
            pool,
            load: Some(load),
            sent: 0,
            done: None,
        }
    }

    pub fn local(body: Bytes, log: PendingLog) -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(if body.is_empty() { None } else { Some(body) }),
            log: Some(log),
            pool: None,
            load: None,
            sent: 0,
            done: None,
        }
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
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
                    Poll::Ready(Some(Err(e)))
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
