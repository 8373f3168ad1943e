//! The HBONE client: one mTLS HTTP/2 connection that carries many CONNECT streams, as
//! ztunnel's outbound side does (protocol.md 1.3-1.6). Used by the demo, the tests, the
//! benchmark load generator and (later) the upstream HBONE leg.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::Error;
use crate::stream::H2Stream;
use crate::tls::dummy_server_name;

/// HTTP/2 settings of the client side, as ztunnel's client (protocol.md 1.3).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub initial_stream_window: u32,
    pub initial_connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    pub connect_timeout: Duration,
    /// PING after this much time and every interval after; the connection is dropped when a
    /// PONG does not come back within `keepalive_timeout` (ztunnel: 10 s / 20 s, both sides).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The answer to a CONNECT.
pub struct ConnectResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The stream: the tunnel on 200, the error body otherwise.
    pub stream: H2Stream,
}

/// One HBONE connection (cheap to clone: clones share the connection).
#[derive(Clone)]
pub struct Connection {
    send: h2::client::SendRequest<Bytes>,
    pub peer: SocketAddr,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Connection {
    /// TCP + mTLS + HTTP/2 handshake to `addr`.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        settings: &ClientSettings,
    ) -> Result<Connection, Error> {
        let setup = async {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(tls)
                .connect(dummy_server_name(), tcp)
                .await?;
            let (send, conn) = h2::client::Builder::new()
                .initial_window_size(settings.initial_stream_window)
                .initial_connection_window_size(settings.initial_connection_window)
                .max_frame_size(settings.max_frame_size)
                .max_header_list_size(settings.max_header_list_size)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await?;
            Ok::<_, Error>((send, conn))
        };
        let (send, mut conn) = tokio::time::timeout(settings.connect_timeout, setup)
            .await
            .map_err(|_| Error::HandshakeTimeout {
                peer: addr,
                timeout: settings.connect_timeout,
            })??;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = closed.clone();
        let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
        let mut ping_pong = conn.ping_pong();
        tokio::spawn(async move {
            let keepalive = async {
                let Some(pp) = ping_pong.as_mut() else {
                    return std::future::pending::<()>().await;
                };
                loop {
                    tokio::time::sleep(interval).await;
                    match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => continue,
                        _ => return,
                    }
                }
            };
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        debug!(peer = %addr, error = %e, "HBONE client connection ended");
                    }
                }
                _ = keepalive => debug!(peer = %addr, "HBONE client connection: no PONG in time; dropping it"),
            }
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        Ok(Connection {
            send,
            peer: addr,
            closed,
        })
    }

    /// Send CONNECT for `authority` with extra `headers` and return whatever the server
    /// answered (status, headers and the stream).
    pub async fn send_connect(
        &self,
        authority: &str,
        headers: HeaderMap,
    ) -> Result<ConnectResponse, Error> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .map_err(|e| Error::Other(format!("bad CONNECT authority {authority:?}: {e}")))?;
        *req.headers_mut() = headers;
        let mut send = self.send.clone().ready().await?;
        let (resp, stream) = send.send_request(req, false)?;
        let resp = resp.await?;
        let (parts, body) = resp.into_parts();
        Ok(ConnectResponse {
            status: parts.status,
            headers: parts.headers,
            stream: H2Stream::new(stream, body),
        })
    }

    /// Open a tunnel to `authority`: CONNECT must be answered exactly `200`.
    pub async fn open(&self, authority: &str, headers: HeaderMap) -> Result<H2Stream, Error> {
        let resp = self.send_connect(authority, headers).await?;
        if resp.status != StatusCode::OK {
            return Err(Error::ConnectStatus {
                authority: authority.to_string(),
                status: resp.status,
            });
        }
        Ok(resp.stream)
    }

    /// Send an arbitrary (non-CONNECT) request on the HBONE connection, for tests of how the
    /// listener treats requests that are not tunnels. Returns status and body.
    pub async fn send_plain(
        &self,
        method: Method,
        uri: &str,
    ) -> Result<(StatusCode, Bytes), Error> {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .map_err(|e| Error::Other(e.to_string()))?;
        let mut send = self.send.clone().ready().await?;
        let (resp, _) = send.send_request(req, true)?;
        let resp = resp.await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut out = bytes::BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        Ok((status, out.freeze()))
    }

    /// The connection has ended (closed, keepalive failed, or finished after a GOAWAY).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }
}
