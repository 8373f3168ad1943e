//! The HBONE server: accept TCP, complete mTLS (bounded in time), speak HTTP/2, and hand every
//! CONNECT stream to the caller's handler as a [`TunnelRequest`] (ztunnel src/proxy/h2/server.rs,
//! istiod's `connect_terminate` listener, protocol.md 1.3 and 2.2).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Ping, RecvStream};
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::drain::DrainWatcher;
use crate::identity::{Identity, identities_in};
use crate::stream::H2Stream;

/// HTTP/2 and TLS settings of the HBONE listener. Defaults follow ztunnel and the Envoy
/// waypoint (protocol.md 1.3, 2.2); each is explained where it is set.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS. Istio's connect_terminate HCM uses 100; ztunnel's
    /// client pool caps itself at 100 streams per connection and opens another connection
    /// beyond that, so 100 never starves a well-behaved client. Streams beyond it are refused
    /// with REFUSED_STREAM while the connection lives on.
    pub max_concurrent_streams: u32,
    /// Initial stream window: 4 MiB, as ztunnel (a tunnel can carry ~4 MiB in flight per RTT
    /// before waiting for WINDOW_UPDATE; bounds per-tunnel receive memory).
    pub initial_stream_window: u32,
    /// Initial connection window: 16 MiB, as ztunnel (several busy tunnels share one connection).
    pub initial_connection_window: u32,
    /// Max frame size: 1 MiB, as ztunnel (fewer frames for bulk transfers).
    pub max_frame_size: u32,
    /// Max header list size: 64 KiB, as ztunnel's server (CONNECT headers are small; this only
    /// bounds abuse).
    pub max_header_list_size: u32,
    /// Per-stream send buffer: 16 KiB (ztunnel: 400 KiB): what waits here for a client that
    /// does not read is bounded per tunnel, and back-pressure reaches the sender early.
    pub max_send_buffer_size: usize,
    /// Send a PING after this much time, and every interval after (ztunnel and Istio's
    /// connect_terminate: 10 s).
    pub keepalive_interval: Duration,
    /// Drop the connection when a PONG does not arrive within this (ztunnel / Istio: 20 s).
    pub keepalive_timeout: Duration,
    /// TLS handshake plus HTTP/2 preface must complete within this (Envoy has no such bound;
    /// we close stalled handshakes after 10 s so they cannot pin memory).
    pub handshake_timeout: Duration,
    /// Rapid-reset defence (CVE-2023-44487): a connection whose peer resets more than this
    /// many streams within one second gets GOAWAY `ENHANCE_YOUR_CALM` and is closed; other
    /// connections are unaffected. (h2 separately caps resets of not-yet-accepted streams
    /// at 20.) Envoy with istiod's config cuts such a client without a GOAWAY.
    pub max_resets_per_second: u32,
    /// PING / SETTINGS flood budgets ([`crate::guard`]).
    pub flood: crate::guard::FloodLimits,
    /// Connections in their TLS + HTTP/2 handshake at once. At the cap the listener stops
    /// accepting (new clients wait in the kernel's backlog) until one finishes or times out,
    /// so stalled handshakes cost at most this many tasks and buffers.
    pub max_pending_handshakes: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_concurrent_streams: 100,
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 64 * 1024,
            max_send_buffer_size: 16 * 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            max_resets_per_second: 200,
            flood: crate::guard::FloodLimits::default(),
            max_pending_handshakes: 1024,
        }
    }
}

/// What we know about the peer of one HBONE connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// TCP source of the HBONE connection: the client pod (ztunnel dials from the pod netns,
    /// protocol.md 1.6).
    pub remote: SocketAddr,
    /// Our local address of the connection.
    pub local: SocketAddr,
    /// The SPIFFE identity from the verified client certificate.
    pub identity: Option<Identity>,
    /// Our own SPIFFE identity (what the client verified).
    pub local_identity: Option<Identity>,
    /// `identity` as its SPIFFE URI (Istio's `source.principal`), formatted once per
    /// connection rather than per tunnel.
    pub principal: Option<String>,
    /// `remote` as text, for access logs.
    pub remote_str: String,
}

/// One CONNECT (or other) request received on an HBONE connection. The handler must either
/// [`accept`](TunnelRequest::accept) it or [`reject`](TunnelRequest::reject) it.
pub struct TunnelRequest {
    pub peer: Arc<PeerInfo>,
    pub method: Method,
    /// `:authority` (for CONNECT: the destination `ip:port`).
    pub authority: Option<String>,
    /// `:path` of a non-CONNECT request (empty for CONNECT).
    pub path: String,
    pub headers: HeaderMap,
    /// Held for as long as the tunnel is served: shutdown waits until every watcher is gone,
    /// and the tunnel watches it to finish inner requests gracefully.
    pub drain: DrainWatcher,
    respond: SendResponse<Bytes>,
    body: RecvStream,
    peer_resets: Arc<AtomicU32>,
}

impl TunnelRequest {
    /// Answer `200` (exactly: ztunnel treats anything else as failure, protocol.md 8) and
    /// return the tunnel as a byte stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("invariant: static response parts are valid");
        let send = self.respond.send_response(resp, false)?;
        Ok(H2Stream::new(send, self.body).count_resets_in(self.peer_resets))
    }

    /// Answer with an error status and an optional text body, then end the stream.
    pub fn reject(mut self, status: StatusCode, body: impl Into<Bytes>) {
        let body: Bytes = body.into();
        let mut builder = Response::builder().status(status);
        if !body.is_empty() {
            builder = builder
                .header(http::header::CONTENT_TYPE, "text/plain")
                .header(http::header::CONTENT_LENGTH, body.len());
        }
        // Envoy's local replies carry `date` and `server: istio-envoy` (envoy-observed.md 9).
        let builder = builder
            .header(http::header::DATE, http_date(std::time::SystemTime::now()))
            .header(http::header::SERVER, "istio-envoy");
        let Ok(resp) = builder.body(()) else { return };
        match self.respond.send_response(resp, body.is_empty()) {
            Ok(mut send) if !body.is_empty() => {
                let _ = send.send_data(body, true);
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "could not send CONNECT rejection"),
        }
    }
}

/// IMF-fixdate (RFC 9110 5.6.7), e.g. `Sun, 22 Nov 2026 05:02:35 GMT`.
pub fn http_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WD[(days.rem_euclid(7)) as usize],
        day,
        MON[(month - 1) as usize],
        year,
        h,
        m,
        s
    )
}

/// Counters of the HBONE listener, shared with metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub streams_accepted: AtomicU64,
    /// Connections closed with GOAWAY ENHANCE_YOUR_CALM for exceeding the reset budget.
    pub reset_floods: AtomicU64,
}

/// The TLS config for new connections and the identity it presents.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub identity: Option<Identity>,
}

/// Supplies the current TLS config for each new connection (so certificates can rotate
/// without touching established connections).
pub type TlsSource = Arc<dyn Fn() -> ServerTls + Send + Sync>;

/// Accept HBONE connections on `listener` until drained. Each connection is served on its
/// own task; each stream's handler on its own task.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: TlsSource,
    settings: Arc<ServerSettings>,
    stats: Arc<ServerStats>,
    handler: H,
    mut drain: DrainWatcher,
) where
    H: Fn(TunnelRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        settings.max_pending_handshakes.max(1),
    ));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.signaled() => {
                info!("HBONE listener draining: no longer accepting connections");
                return;
            }
            accepted = async {
                // A handshake slot first: at the cap, nothing more is accepted until one
                // handshake ends (the kernel's backlog holds the newcomers).
                let permit = handshakes.clone().acquire_owned().await;
                (listener.accept().await, permit)
            } => accepted,
        };
        let (accepted, permit) = accepted;
        let Ok(permit) = permit else {
            return;
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: log and back off briefly instead of spinning.
                warn!(error = %e, "accepting an HBONE connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        let conn = Connection {
            tls: tls(),
            settings: settings.clone(),
            stats: stats.clone(),
            drain: drain.clone(),
        };
        let handler = handler.clone();
        tokio::spawn(async move { conn.serve(tcp, remote, handler, permit).await });
    }
}

struct Connection {
    tls: ServerTls,
    settings: Arc<ServerSettings>,
    stats: Arc<ServerStats>,
    drain: DrainWatcher,
}

struct ActiveGuard(Arc<ServerStats>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    async fn serve<H, F>(
        self,
        tcp: TcpStream,
        remote: SocketAddr,
        handler: H,
        handshake_slot: tokio::sync::OwnedSemaphorePermit,
    ) where
        H: Fn(TunnelRequest) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        self.stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(self.stats.clone());
        let local = tcp.local_addr().unwrap_or(remote);
        let _ = tcp.set_nodelay(true);
        let settings = self.settings.clone();

        // TLS handshake and HTTP/2 preface share one deadline: a peer that stalls either is
        // closed (stalled handshakes must not accumulate).
        let setup = async {
            let tls = TlsAcceptor::from(self.tls.config.clone())
                .accept(tcp)
                .await?;
            let (_, session) = tls.get_ref();
            let identity = session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| identities_in(leaf).into_iter().next());
            let local_identity = self.tls.identity.clone();
            let h2 = h2::server::Builder::new()
                .max_concurrent_streams(settings.max_concurrent_streams)
                .initial_window_size(settings.initial_stream_window)
                .initial_connection_window_size(settings.initial_connection_window)
                .max_frame_size(settings.max_frame_size)
                .max_header_list_size(settings.max_header_list_size)
                .max_send_buffer_size(settings.max_send_buffer_size)
                .handshake::<_, Bytes>(crate::guard::FrameGuard::new(tls, settings.flood))
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((h2, identity, local_identity))
        };
        let handshake = tokio::time::timeout(settings.handshake_timeout, setup).await;
        drop(handshake_slot);
        let (mut conn, identity, local_identity) = match handshake {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%remote, error = %e, "HBONE handshake failed");
                return;
            }
            Err(_) => {
                self.stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%remote, timeout = ?settings.handshake_timeout, "HBONE handshake timed out");
                return;
            }
        };
        let peer = Arc::new(PeerInfo {
            remote,
            local,
            principal: identity.as_ref().map(|i| i.to_string()),
            remote_str: remote.to_string(),
            identity,
            local_identity,
        });
        debug!(%remote, identity = ?peer.identity, "HBONE connection established");

        let mut ping_pong = conn.ping_pong();
        let keepalive = async {
            let Some(pp) = ping_pong.as_mut() else {
                return std::future::pending::<()>().await;
            };
            loop {
                tokio::time::sleep(settings.keepalive_interval).await;
                match tokio::time::timeout(settings.keepalive_timeout, pp.ping(Ping::opaque()))
                    .await
                {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "HBONE keepalive PING failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "HBONE keepalive: no PONG in time");
                        return;
                    }
                }
            }
        };
        tokio::pin!(keepalive);
        let mut draining = false;
        let peer_resets = Arc::new(AtomicU32::new(0));
        let mut window_start = tokio::time::Instant::now();
        let mut resets_at_window_start = 0u32;
        let mut drain = self.drain.clone();
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((req, respond))) => {
                        self.stats.streams_accepted.fetch_add(1, Ordering::Relaxed);
                        // Reset budget, checked as streams arrive (an attacker must open
                        // streams to reset them).
                        let now = tokio::time::Instant::now();
                        let resets = peer_resets.load(Ordering::Relaxed);
                        if now.duration_since(window_start) >= Duration::from_secs(1) {
                            window_start = now;
                            resets_at_window_start = resets;
                        } else if resets.wrapping_sub(resets_at_window_start) > settings.max_resets_per_second {
                            self.stats.reset_floods.fetch_add(1, Ordering::Relaxed);
                            warn!(%remote, identity = ?peer.identity, "HBONE peer exceeded the stream reset budget; closing with GOAWAY ENHANCE_YOUR_CALM");
                            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                            flush_goaway(&mut conn).await;
                            break;
                        }
                        let (parts, body) = req.into_parts();
                        let tunnel = TunnelRequest {
                            peer: peer.clone(),
                            method: parts.method,
                            authority: parts.uri.authority().map(|a| a.as_str().to_string()),
                            path: parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default(),
                            headers: parts.headers,
                            drain: self.drain.clone(),
                            respond,
                            body,
                            peer_resets: peer_resets.clone(),
                        };
                        tokio::spawn(handler.clone()(tunnel));
                    }
                    Some(Err(e)) => {
                        debug!(%remote, error = %e, "HBONE connection error");
                        break;
                    }
                    None => break,
                },
                _ = drain.signaled(), if !draining => {
                    // GOAWAY: the client stops opening streams here and reconnects elsewhere;
                    // streams in flight finish (protocol.md 1.3, 5.1).
                    draining = true;
                    conn.graceful_shutdown();
                }
                _ = &mut keepalive => {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    flush_goaway(&mut conn).await;
                    break;
                }
            }
        }
        debug!(%remote, "HBONE connection closed");
    }
}

/// How long a connection shut down abruptly gets to write its GOAWAY.
const GOAWAY_FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// After `abrupt_shutdown`, keep polling the connection so the GOAWAY is written, but only
/// for [`GOAWAY_FLUSH_DEADLINE`]: a peer that never reads would otherwise hold the task (and
/// the connection's buffers) forever.
async fn flush_goaway<T>(conn: &mut h2::server::Connection<T, bytes::Bytes>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(GOAWAY_FLUSH_DEADLINE, async {
        while let Some(Ok(_)) = conn.accept().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_is_imf_fixdate() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_324_955);
        assert_eq!(http_date(t), "Sun, 22 Nov 2026 05:22:35 GMT");
        assert_eq!(
            http_date(std::time::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }
}
