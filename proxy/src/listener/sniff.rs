//! Protocol sniffing on undeclared ports: HTTP/1.1 or h2c prior knowledge, else TCP (Istio's
//! `http_inspector` behaviour on a waypoint's undeclared ports).

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::state::Shared;

use super::*;

pub(super) enum Sniffed {
    Http,
    Tcp,
    Closed,
}

/// Protocol detection on an undeclared port, like Envoy's http_inspector: HTTP/1.x request
/// line or the h2c prior-knowledge preface means HTTP, anything else TCP.
pub(super) async fn sniff(stream: &mut Rewind, shared: &Shared) -> Sniffed {
    let mut buf = [0u8; 64];
    let mut have = 0;
    let deadline = Instant::now() + shared.limits.sniff_timeout;
    loop {
        match looks_like_http(&buf[..have]) {
            Some(true) => break,
            Some(false) => {
                stream.rewind(Bytes::copy_from_slice(&buf[..have]));
                return Sniffed::Tcp;
            }
            None => {}
        }
        if have == buf.len() {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.inner.read(&mut buf[have..])).await {
            Ok(Ok(0)) if have == 0 => return Sniffed::Closed,
            Ok(Ok(0)) => {
                stream.rewind(Bytes::copy_from_slice(&buf[..have]));
                return Sniffed::Tcp;
            }
            Ok(Ok(n)) => have += n,
            Ok(Err(_)) => return Sniffed::Closed,
            Err(_) => {
                // Nothing (or too little) arrived: a server-first protocol; treat as TCP.
                stream.rewind(Bytes::copy_from_slice(&buf[..have]));
                return Sniffed::Tcp;
            }
        }
    }
    stream.rewind(Bytes::copy_from_slice(&buf[..have]));
    Sniffed::Http
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// `Some(true)` HTTP, `Some(false)` not HTTP, `None` need more bytes.
pub fn looks_like_http(b: &[u8]) -> Option<bool> {
    if b.is_empty() {
        return None;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if b.len() >= H2_PREFACE.len() {
            Some(true)
        } else {
            None
        };
    }
    let mut undecided = false;
    for m in METHODS {
        let n = b.len().min(m.len());
        if b[..n] == m[..n] {
            if b.len() >= m.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

/// Opaque TCP through the tunnel to one endpoint of the Service's own cluster (Envoy
/// tcp_proxy; one access-log line per connection at its end).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_http_from_tcp() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"GE"), None);
        assert_eq!(
            looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(true)
        );
        assert_eq!(looks_like_http(b"PRI * HTTP/2"), None);
        assert_eq!(looks_like_http(b"\x16\x03\x01\x02\x00"), Some(false));
        assert_eq!(looks_like_http(b"SSH-2.0-OpenSSH"), Some(false));
    }
}
