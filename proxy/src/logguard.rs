//! The access-log record of one request, emitted exactly once: when the response body ends,
//! or when everything holding it is dropped (client went away: flag `DC`), like agentgateway's
//! `DropOnLog`. Also feeds the request metrics from the same record, so logs and metrics agree.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use accesslog::{AccessLogRecord, ResponseFlag};
use tokio::time::Instant;

use crate::metrics::SourceId;
use crate::state::Shared;
use policy::Cluster;

/// A record being filled in across the request's phases.
pub struct PendingLog {
    inner: Option<Inner>,
}

struct Inner {
    record: AccessLogRecord,
    started: Instant,
    received: Arc<AtomicU64>,
    shared: Arc<Shared>,
    source: SourceId,
    cluster: Option<Arc<Cluster>>,
    grpc: bool,
    /// Held until the record is emitted: the request counts as in flight until then.
    _in_flight: Option<crate::state::InFlight>,
}

impl PendingLog {
    pub fn new(
        record: AccessLogRecord,
        started: Instant,
        received: Arc<AtomicU64>,
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
                cluster: None,
                grpc,
                _in_flight: None,
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

    /// The record, for phases to fill in. `None` only after it was emitted.
    pub fn record(&mut self) -> Option<&mut AccessLogRecord> {
        self.inner.as_mut().map(|i| &mut i.record)
    }

    /// Emit now, with `bytes_sent` response body bytes.
    pub fn finish(mut self, bytes_sent: u64) {
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
        r.bytes_received = inner.received.load(Ordering::Relaxed);
        r.bytes_sent = bytes_sent;
        inner
            .shared
            .metrics
            .record_http(inner.source, inner.cluster.as_ref(), r, inner.grpc);
        if let Some(logger) = &inner.shared.access_log {
            logger.log(inner.record);
        }
    }

    /// Emit as "client went away" (used on drop of an unfinished response).
    pub fn abandon(mut self, bytes_sent: u64) {
        self.emit(bytes_sent, true);
    }
}

impl Drop for PendingLog {
    fn drop(&mut self) {
        self.emit(0, true);
    }
}
