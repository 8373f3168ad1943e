//! What a request knows of the connection it came on: the tunnel ([`TunnelCtx`]: the HBONE
//! peer, the Service the CONNECT named) and the inner HTTP connection's counters
//! ([`InnerCounters`]). The listener creates both; the request phases only read them, so the
//! request path never depends on the listener.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::server::PeerInfo;
use policy::ServicePort;
use tokio::time::Instant;

use crate::state::Shared;

/// Everything a request inside one tunnel needs to know about the tunnel.
///
/// Aligned to a cache line, as it was when the idle-tunnel memory was measured
/// (docs/bench/2026-12-06-allocators.md): an idle tunnel keeps this for as long as it is open,
/// and the alignment keeps it off the cache lines of other tunnels' state that workers write.
/// Per-connection text (peer address, principal) lives in [`PeerInfo`].
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
    pub source: crate::telemetry::metrics::SourceId,
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

/// Exchanges on one inner HTTP connection: request heads received (the service was called)
/// and responses finished (`heads > done`: a request is in flight), and when bytes last
/// moved either way.
/// Aligned like [`TunnelCtx`], and kept as long: its counters change on every request.
#[derive(Debug)]
#[repr(align(64))]
pub struct InnerCounters {
    pub heads: std::sync::atomic::AtomicU64,
    pub done: std::sync::atomic::AtomicU64,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last read or write.
    last_io_ms: std::sync::atomic::AtomicU64,
    /// A WebSocket upgrade the backend accepted, waiting for hyper to write the 101.
    pub upgrade: crate::request::upgrade::UpgradeSlot,
    /// Framing headers of the request head being read, as sent ([`crate::request::codec::framing`]
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
    pub(crate) fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_io_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        let last = self.last_io_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.epoch
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }
}
