//! A minimal raw HTTP/2 client over the real mTLS listener, for abuse tests that a well-behaved
//! client library refuses to perform (ignoring SETTINGS_MAX_CONCURRENT_STREAMS, rapid resets,
//! floods). Frames are written by hand (RFC 9113 §4, §6); headers use HPACK literals without
//! indexing (RFC 7541 §6.2.2), which every decoder must accept.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// Error codes (RFC 9113 §7).
pub const CANCEL: u32 = 0x8;
pub const REFUSED_STREAM: u32 = 0x7;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One received frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Error code of RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let p = &self.payload;
        match self.kind {
            RST_STREAM if p.len() >= 4 => Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
            GOAWAY if p.len() >= 8 => Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
            _ => None,
        }
    }
}

pub struct RawH2 {
    pub io: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    for s in [name, value] {
        let b = s.as_bytes();
        // 7-bit prefix integer (RFC 7541 §5.1), H = 0.
        if b.len() < 127 {
            out.push(b.len() as u8);
        } else {
            out.push(127);
            let mut n = b.len() - 127;
            while n >= 128 {
                out.push((n % 128) as u8 | 0x80);
                n /= 128;
            }
            out.push(n as u8);
        }
        out.extend_from_slice(b);
    }
}

/// HPACK block for a CONNECT to `authority`, plus extra headers.
pub fn connect_block(authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_literal(&mut b, ":method", "CONNECT");
    hpack_literal(&mut b, ":authority", authority);
    for (k, v) in extra {
        hpack_literal(&mut b, k, v);
    }
    b
}

impl RawH2 {
    /// TLS (the given client config) + client preface + empty SETTINGS.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<RawH2> {
        let tcp = TcpStream::connect(addr).await?;
        let io = TlsConnector::from(tls)
            .connect(hbone::tls::dummy_server_name(), tcp)
            .await?;
        let mut h = RawH2 {
            io,
            buf: Vec::new(),
        };
        h.io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        h.frame(SETTINGS, 0, 0, &[]).await?;
        Ok(h)
    }

    pub async fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut f = Vec::with_capacity(9 + payload.len());
        let len = payload.len() as u32;
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        self.io.write_all(&f).await
    }

    /// Queue a frame without flushing to the socket yet (for floods).
    pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
        let len = payload.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// Next frame, or `None` on EOF/error/timeout.
    pub async fn next(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Read frames until `pred` matches one (bounded by `timeout`); returns it.
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Frame) -> bool,
    ) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next(left).await?;
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                let _ = self.frame(SETTINGS, ACK, 0, &[]).await;
            }
            if pred(&f) {
                return Some(f);
            }
        }
    }
}
