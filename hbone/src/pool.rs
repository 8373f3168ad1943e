//! The HBONE client pool for the waypoint's upstream leg, as ztunnel pools (protocol.md 1.6):
//! HTTP/2 connections keyed by (destination `ip:port`, expected server identity), many CONNECT
//! streams per connection up to a cap (100), a new connection when every one is full, idle
//! connections dropped after a while, connections that received GOAWAY never reused, and a
//! failed handshake remembered for a short backoff so a broken destination is not redialled in
//! a tight loop.
//!
//! Bounded: a stream slot is taken before a CONNECT is sent and given back however the open
//! ends (answered, refused, or the caller's future dropped: connect timeout, route timeout,
//! client gone), so a connection never looks busy forever; [`Pool::sweep`] drops idle
//! connections, closed ones and spent failure records of every destination, including
//! destinations nobody asks for any more (endpoints that left).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use crate::Error;
use crate::client::{ClientSettings, Connection};
use crate::stream::H2Stream;

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Streams per connection before another connection is opened (ztunnel
    /// `POOL_MAX_STREAMS_PER_CONNECTION`: 100).
    pub max_streams_per_connection: usize,
    /// Connections without streams for this long are dropped (ztunnel: 5 min).
    pub idle_timeout: Duration,
    /// After a failed handshake, new tunnels to the same key fail fast for this long.
    pub failure_backoff: Duration,
    pub client: ClientSettings,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            failure_backoff: Duration::from_millis(500),
            client: ClientSettings::default(),
        }
    }
}

struct Pooled {
    conn: Connection,
    streams: Arc<AtomicUsize>,
    last_used: Instant,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Pooled>,
    failed: Option<(Instant, String, bool)>,
}

/// A taken stream slot on a pooled connection: given back on drop unless it was handed to the
/// opened stream (which gives it back when the stream ends).
struct Slot(Option<Arc<AtomicUsize>>);

impl Slot {
    fn into_stream(mut self, stream: H2Stream) -> H2Stream {
        match self.0.take() {
            Some(slot) => stream.release_on_drop(slot),
            None => stream,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What the pool holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Destinations (address, identity) with a connection or a failure record.
    pub destinations: usize,
    pub connections: usize,
    /// Streams open or being opened on those connections.
    pub streams: usize,
}

/// See the module docs. `key` is the expected identity (one TLS config per identity).
pub struct Pool {
    settings: PoolSettings,
    entries: Mutex<HashMap<(SocketAddr, Arc<str>), Entry>>,
    /// Connections opened so far (for metrics and tests).
    pub connections_opened: AtomicUsize,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        Pool {
            settings,
            entries: Mutex::new(HashMap::new()),
            connections_opened: AtomicUsize::new(0),
        }
    }

    /// Drop connections idle past the idle timeout or closed, spent failure records, and
    /// destinations left with neither. Called periodically by the owner.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let (idle, backoff) = (self.settings.idle_timeout, self.settings.failure_backoff);
        entries.retain(|_, e| {
            e.conns.retain(|p| {
                let busy = p.streams.load(Ordering::Relaxed) > 0;
                !p.conn.is_closed() && (busy || now.saturating_duration_since(p.last_used) < idle)
            });
            if e.failed
                .as_ref()
                .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= backoff)
            {
                e.failed = None;
            }
            !e.conns.is_empty() || e.failed.is_some()
        });
    }

    pub fn stats(&self) -> PoolStats {
        let Ok(entries) = self.entries.lock() else {
            return PoolStats::default();
        };
        let mut s = PoolStats {
            destinations: entries.len(),
            ..PoolStats::default()
        };
        for e in entries.values() {
            s.connections += e.conns.len();
            s.streams += e
                .conns
                .iter()
                .map(|p| p.streams.load(Ordering::Relaxed))
                .sum::<usize>();
        }
        s
    }

    fn pick(
        &self,
        key: &(SocketAddr, Arc<str>),
    ) -> Result<Option<(Connection, Arc<AtomicUsize>)>, Error> {
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| Error::Other("pool lock poisoned".into()))?;
        let e = entries.entry(key.clone()).or_default();
        if let Some((at, why, tls)) = &e.failed {
            if at.elapsed() < self.settings.failure_backoff {
                return Err(Error::Backoff {
                    last: why.clone(),
                    tls: *tls,
                });
            }
            e.failed = None;
        }
        let now = Instant::now();
        let idle = self.settings.idle_timeout;
        e.conns.retain(|p| {
            p.streams.load(Ordering::Relaxed) > 0 || now.duration_since(p.last_used) < idle
        });
        for p in e.conns.iter_mut() {
            if p.streams.load(Ordering::Relaxed) < self.settings.max_streams_per_connection
                && !p.conn.is_closed()
            {
                p.streams.fetch_add(1, Ordering::Relaxed);
                p.last_used = now;
                return Ok(Some((p.conn.clone(), p.streams.clone())));
            }
        }
        Ok(None)
    }

    /// Open a tunnel to `authority` through an HBONE connection to `dest`, verifying the
    /// server with `tls` (whose expected identity is `identity_key`).
    pub async fn open(
        &self,
        dest: SocketAddr,
        identity_key: Arc<str>,
        tls: Arc<rustls::ClientConfig>,
        authority: &str,
        headers: HeaderMap,
    ) -> Result<H2Stream, Error> {
        let key = (dest, identity_key);
        let (conn, streams) = match self.pick(&key)? {
            Some(c) => c,
            None => match Connection::connect(dest, tls, &self.settings.client).await {
                Ok(conn) => {
                    self.connections_opened.fetch_add(1, Ordering::Relaxed);
                    let streams = Arc::new(AtomicUsize::new(1));
                    if let Ok(mut entries) = self.entries.lock() {
                        entries.entry(key.clone()).or_default().conns.push(Pooled {
                            conn: conn.clone(),
                            streams: streams.clone(),
                            last_used: Instant::now(),
                        });
                    }
                    (conn, streams)
                }
                Err(e) => {
                    if let Ok(mut entries) = self.entries.lock() {
                        entries.entry(key.clone()).or_default().failed =
                            Some((Instant::now(), e.to_string(), e.is_tls()));
                    }
                    return Err(e);
                }
            },
        };
        // Given back if the CONNECT fails or this future is dropped before it is answered.
        let slot = Slot(Some(streams));
        let stream = conn.open(authority, headers).await?;
        Ok(slot.into_stream(stream))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;
    use crate::server::{ServerSettings, ServerStats, ServerTls, TunnelRequest};
    use crate::tls::{ExpectedServer, client_config, server_config};

    /// An HBONE server that answers CONNECT `10.0.0.1:1` with 200 and never answers any
    /// other (the request is held until the test ends).
    async fn server(pki: &crate::testing::Pki) -> (SocketAddr, crate::drain::DrainTrigger) {
        let certs = pki.issue("default", "dest").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTls {
            config: server_config(&certs, "cluster.local").unwrap(),
            identity: Some(certs.identity.clone()),
        };
        let (trigger, watcher) = crate::drain::channel();
        tokio::spawn(crate::server::serve(
            listener,
            Arc::new(move || tls.clone()),
            Arc::new(ServerSettings::default()),
            Arc::new(ServerStats::default()),
            |req: TunnelRequest| async move {
                if req.authority.as_deref() == Some("10.0.0.1:1") {
                    if let Ok(mut s) = req.accept() {
                        let _ = tokio::io::copy(&mut tokio::io::empty(), &mut s).await;
                        std::future::pending::<()>().await;
                    }
                } else {
                    let _held = req;
                    std::future::pending::<()>().await;
                }
            },
            watcher,
        ));
        (addr, trigger)
    }

    #[tokio::test]
    async fn cancelled_opens_give_their_stream_back_and_idle_connections_expire() {
        let pki = crate::testing::Pki::new("cluster.local").unwrap();
        let (addr, _drain) = server(&pki).await;
        let me = pki.issue("default", "waypoint").unwrap();
        let tls = client_config(&me, ExpectedServer::TrustDomain("cluster.local".into())).unwrap();
        let pool = Pool::new(PoolSettings::default());
        let key: Arc<str> = Arc::from("dest");
        let open = |authority: &'static str| {
            pool.open(addr, key.clone(), tls.clone(), authority, HeaderMap::new())
        };
        // A new connection whose CONNECT is never answered: cancelled by a timeout.
        let cancelled = tokio::time::timeout(Duration::from_millis(200), open("10.0.0.2:1")).await;
        assert!(cancelled.is_err(), "the held CONNECT must not be answered");
        assert_eq!(pool.stats().streams, 0, "{:?}", pool.stats());
        // A pooled connection: one stream answered and dropped, then cancelled opens (by a
        // timeout, and by dropping the future after its first poll).
        let stream = open("10.0.0.1:1").await.unwrap();
        assert_eq!(pool.stats().streams, 1);
        drop(stream);
        assert_eq!(pool.stats().streams, 0);
        let cancelled = tokio::time::timeout(Duration::from_millis(200), open("10.0.0.3:1")).await;
        assert!(cancelled.is_err());
        let mut fut = Box::pin(open("10.0.0.4:1"));
        assert!(futures_poll_once(fut.as_mut()).await.is_none());
        assert_eq!(
            pool.stats().streams,
            1,
            "the open in progress holds its slot"
        );
        drop(fut);
        assert_eq!(pool.stats().streams, 0, "{:?}", pool.stats());
        assert_eq!(
            pool.stats().connections,
            1,
            "one connection reused throughout"
        );
        // Idle past the timeout: the connection and the destination are swept.
        pool.sweep_at(Instant::now());
        assert_eq!(pool.stats().connections, 1, "not idle long enough yet");
        pool.sweep_at(Instant::now() + PoolSettings::default().idle_timeout);
        assert_eq!(pool.stats(), PoolStats::default());
    }

    /// Poll a future once; `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
