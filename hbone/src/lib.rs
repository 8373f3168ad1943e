//! # hbone: mTLS + HTTP/2 CONNECT tunnels and SPIFFE peer identity
//!
//! Contract:
//! - Owns the HBONE wire protocol as ztunnel speaks it (`../shared/docs/protocol.md` section 1):
//!   TLS 1.3 with AES-GCM suites, ALPN `h2`, mandatory client certificates chained to the mesh
//!   root with a SPIFFE URI SAN in our trust domain, HTTP/2 `CONNECT` with `:authority = ip:port`,
//!   PING keepalive, GOAWAY on drain.
//! - Knows nothing about Services, routes or policy: the [`server`] hands every CONNECT stream
//!   to a caller-supplied handler as a [`server::TunnelRequest`], and the handler decides.
//! - Identity is only ever taken from the verified peer certificate ([`identity`]), never from
//!   anything the peer says inside the tunnel.
//! - [`testing`] (feature `testing`) issues real rcgen certificates for tests, benches and the demo.

pub mod client;
pub mod drain;
pub mod guard;
pub mod identity;
pub mod pool;
pub mod server;
pub mod stream;
pub mod tls;

#[cfg(feature = "testing")]
pub mod testing;

pub use identity::Identity;
pub use stream::H2Stream;

/// Errors from the tunnel layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS error: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    #[error("certificate files in {dir}: {message}")]
    Certificates { dir: String, message: String },
    #[error("CONNECT to {authority} answered {status} (want exactly 200)")]
    ConnectStatus {
        authority: String,
        status: http::StatusCode,
    },
    #[error("TLS handshake with {peer} did not finish within {timeout:?}")]
    HandshakeTimeout {
        peer: std::net::SocketAddr,
        timeout: std::time::Duration,
    },
    /// A recent handshake to this destination failed; the pool fails fast for a while.
    #[error("recent handshake failure, backing off: {last}")]
    Backoff { last: String, tls: bool },
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The failure happened in TLS (handshake or certificate verification).
    pub fn is_tls(&self) -> bool {
        match self {
            Error::Tls(_) => true,
            Error::Backoff { tls, .. } => *tls,
            Error::Io(io) => {
                io.get_ref().is_some_and(|i| i.is::<rustls::Error>())
                    || io.kind() == std::io::ErrorKind::InvalidData
            }
            _ => false,
        }
    }
}
