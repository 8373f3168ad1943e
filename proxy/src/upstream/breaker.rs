//! The connection circuit breakers of a cluster (DestinationRule
//! `connectionPool.tcp.maxConnections` and `http.http1MaxPendingRequests`, Envoy's
//! `max_connections` and `max_pending_requests`): a cluster opens at most `maxConnections`
//! upstream connections; a request that needs a new one beyond that waits as pending for a
//! connection of its endpoint to come free (or the count to drop), at most
//! `http1MaxPendingRequests` requests at a time; beyond that it is refused at once with 503
//! `UO` (reset reason `overflow`), as Envoy answers. The wait is bounded by the request's
//! timers (the route timeout), like Envoy's pending requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use policy::traffic::TrafficPolicy;
use tokio::sync::Notify;

/// One cluster's connection counters.
#[derive(Debug)]
pub struct ConnBreaker {
    max_connections: u32,
    max_pending: Option<u32>,
    connections: AtomicU32,
    pending: AtomicU32,
    /// Requests refused as pending overflow.
    pub overflows: AtomicU64,
    /// Woken when a connection closes or goes back to the pool.
    freed: Notify,
}

/// A connection counted against the cluster; given back when the connection ends.
#[derive(Debug)]
pub struct ConnSlot(Arc<ConnBreaker>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_waiters();
    }
}

/// A request waiting for a connection, counted against `max_pending`.
struct PendingSlot<'a>(&'a ConnBreaker);

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The breaker of a cluster's policy, made on first use (`None`: no `maxConnections`).
pub fn of(t: &TrafficPolicy) -> Option<Arc<ConnBreaker>> {
    let max = t.max_connections?;
    let any = t.breaker.get_or_init(|| {
        Arc::new(ConnBreaker {
            max_connections: max,
            max_pending: t.max_pending_requests,
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
            freed: Notify::new(),
        }) as Arc<dyn std::any::Any + Send + Sync>
    });
    any.clone().downcast::<ConnBreaker>().ok()
}

impl ConnBreaker {
    /// Count a new connection, if the cluster has room for one.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnSlot> {
        let prev = self.connections.fetch_add(1, Ordering::Relaxed);
        if prev >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnSlot(self.clone()))
    }

    /// A connection went back to its pool: pending requests look again.
    pub fn released(&self) {
        self.freed.notify_waiters();
    }

    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Connections counted now.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Wait as a pending request until a connection may be free; `false` when the pending
    /// queue is full (overflow: refuse the request).
    pub async fn wait_pending(&self, still_full: impl Fn() -> bool) -> bool {
        let prev = self.pending.fetch_add(1, Ordering::Relaxed);
        let slot = PendingSlot(self);
        if self.max_pending.is_some_and(|max| prev >= max) {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // Registered before the last check, so a release in between is not missed.
        let notified = self.freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if still_full() {
            notified.await;
        }
        drop(slot);
        true
    }
}
