//! The HBONE client pool for the waypoint's upstream leg, as ztunnel pools (protocol.md 1.6):
//! HTTP/2 connections keyed by (destination `ip:port`, expected server identity), many CONNECT
//! streams per connection up to a cap (100), a new connection when every one is full, idle
//! connections dropped after a while, connections that received GOAWAY never reused, and a
//! failed handshake remembered for a short backoff so a broken destination is not redialled in
//! a tight loop.

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
        match conn.open(authority, headers).await {
            Ok(stream) => Ok(stream.release_on_drop(streams)),
            Err(e) => {
                streams.fetch_sub(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}
