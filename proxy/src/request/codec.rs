//! What Envoy's HTTP/1 codec (Balsa, Envoy 1.40) refuses, in two halves:
//!
//! - [`refused_head`]: a request head hyper's parser refused too. hyper would answer with its
//!   own bare `400`; the inner connection swallows that ([`is_hyper_auto_reply`]) and the tunnel
//!   writes Envoy's reply instead, classified from the head's bytes.
//! - [`check_request`]: a request hyper accepts but Envoy does not (missing `Host`, repeated
//!   `Content-Length`, `Content-Length` with `Transfer-Encoding`, methods outside Balsa's list,
//!   `OPTIONS *`), answered from the request phases.
//!
//! Every answer was captured from Envoy 1.40 as Istio's waypoint (docs/envoy-observed.md,
//! "HTTP/1.1 framing and request-line errors").

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

use crate::request::error::ProxyError;

/// Methods Envoy 1.40's Balsa parser accepts (observed: every other token, lowercase `get`,
/// `QUERY`, `M-SEARCH`, `PRI`, ... gets `400 http1.codec_error`).
const ENVOY_METHODS: &[&str] = &[
    "ACL",
    "BIND",
    "CHECKOUT",
    "CONNECT",
    "COPY",
    "DELETE",
    "GET",
    "HEAD",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MOVE",
    "MSEARCH",
    "NOTIFY",
    "OPTIONS",
    "PATCH",
    "POST",
    "PROPFIND",
    "PROPPATCH",
    "PURGE",
    "PUT",
    "REBIND",
    "REPORT",
    "SEARCH",
    "SOURCE",
    "SUBSCRIBE",
    "TRACE",
    "UNBIND",
    "UNLINK",
    "UNLOCK",
    "UNSUBSCRIBE",
];

/// Bits of [`HeadScan`]'s findings for the head being read.
pub mod framing {
    pub const CONTENT_LENGTH: u8 = 1;
    pub const CONTENT_LENGTH_TWICE: u8 = 2;
    pub const TRANSFER_ENCODING: u8 = 4;
}

/// Which framing headers a request head carried, as sent. hyper removes a `Content-Length`
/// that comes with `Transfer-Encoding` (the chunked framing wins, the connection is not kept
/// alive) and a repeated equal `Content-Length` before the request phases see the head;
/// Envoy's codec refuses both, so the inner connection notes them while the head is read.
/// Only header-line starts are looked at, up to the blank line; a line start cut by the end of
/// a read is kept (18 bytes at most) and finished with the next.
#[derive(Debug, Default)]
pub struct HeadScan {
    active: bool,
    line_start: bool,
    /// The start of a header line that ended a read before its name could be told.
    carry: [u8; NAME_ROOM],
    carry_len: usize,
}

/// The longest name looked for, `transfer-encoding:`.
const NAME_ROOM: usize = 18;

impl HeadScan {
    /// A new head begins (its first line is the request line).
    pub fn start(found: &std::sync::atomic::AtomicU8) -> HeadScan {
        found.store(0, std::sync::atomic::Ordering::Relaxed);
        HeadScan {
            active: true,
            ..HeadScan::default()
        }
    }

    pub fn feed(&mut self, bytes: &[u8], found: &std::sync::atomic::AtomicU8) {
        let mut i = 0;
        if self.carry_len > 0 {
            // Complete the line start the last read cut short.
            let take = (NAME_ROOM - self.carry_len).min(bytes.len());
            let mut line = self.carry;
            line[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            let n = self.carry_len + take;
            self.carry_len = 0;
            if !self.line(&line[..n], found) {
                return;
            }
            // That line start is classified; go on from its end.
            self.line_start = false;
        }
        while self.active && i < bytes.len() {
            if self.line_start && !self.line(&bytes[i..], found) {
                return;
            }
            match bytes[i..].iter().position(|&b| b == b'\n') {
                Some(p) => {
                    i += p + 1;
                    self.line_start = true;
                }
                None => {
                    self.line_start = false;
                    return;
                }
            }
        }
    }

    /// Look at a header line's start; `false` when scanning stops here (end of the head, or
    /// the start is kept for the next read).
    fn line(&mut self, rest: &[u8], found: &std::sync::atomic::AtomicU8) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if rest[0] == b'\r' || rest[0] == b'\n' {
            self.active = false;
            return false;
        }
        if rest.len() < NAME_ROOM && !rest.contains(&b'\n') {
            self.carry[..rest.len()].copy_from_slice(rest);
            self.carry_len = rest.len();
            return false;
        }
        if starts_with_ignore_case(rest, b"content-length:") {
            let before = found.fetch_or(framing::CONTENT_LENGTH, Relaxed);
            if before & framing::CONTENT_LENGTH != 0 {
                found.fetch_or(framing::CONTENT_LENGTH_TWICE, Relaxed);
            }
        } else if starts_with_ignore_case(rest, b"transfer-encoding:") {
            found.fetch_or(framing::TRANSFER_ENCODING, Relaxed);
        }
        true
    }
}

fn starts_with_ignore_case(hay: &[u8], prefix: &[u8]) -> bool {
    hay.len() >= prefix.len() && hay[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn codec(status: StatusCode, details: &'static str) -> ProxyError {
    ProxyError::Codec { status, details }
}

/// A request hyper parsed that Envoy's codec or HCM refuses (`Err`), checked before routing.
/// `framing`: what [`HeadScan`] saw in the head as sent.
pub fn check_request(
    method: &Method,
    version: http::Version,
    target: &str,
    headers: &HeaderMap,
    framing: u8,
) -> Result<(), ProxyError> {
    if version != http::Version::HTTP_11 {
        // h2c requests went through hyper's HTTP/2 codec, which has its own rules.
        return Ok(());
    }
    if !ENVOY_METHODS.contains(&method.as_str()) {
        return Err(codec(StatusCode::BAD_REQUEST, "http1.codec_error"));
    }
    // The larger of what hyper kept and what was sent (hyper drops some, see HeadScan).
    let te = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .count()
        .max(usize::from(framing & framing::TRANSFER_ENCODING != 0));
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count().max(
        usize::from(framing & framing::CONTENT_LENGTH != 0)
            + usize::from(framing & framing::CONTENT_LENGTH_TWICE != 0),
    );
    if te > 0 && cl > 0 {
        return Err(codec(
            StatusCode::BAD_REQUEST,
            "http1.content_length_and_chunked_not_allowed",
        ));
    }
    if cl > 1 {
        // Even equal values (RFC 9112 6.3 lets a recipient merge them; Balsa does not).
        return Err(codec(StatusCode::BAD_REQUEST, "http1.codec_error"));
    }
    if te > 0 && !chunked_only(headers.get_all(header::TRANSFER_ENCODING).iter()) {
        return Err(codec(
            StatusCode::NOT_IMPLEMENTED,
            "http1.invalid_transfer_encoding",
        ));
    }
    if !headers.contains_key(header::HOST) {
        return Err(ProxyError::MissingHost);
    }
    if target == "*" {
        return Err(ProxyError::AbsolutePathRejected);
    }
    Ok(())
}

/// Envoy accepts exactly one coding, `chunked`; anything else (`gzip`, `gzip, chunked`) is 501.
fn chunked_only<'a>(mut values: impl Iterator<Item = &'a http::HeaderValue>) -> bool {
    let (Some(v), None) = (values.next(), values.next()) else {
        return false;
    };
    v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Envoy's answer to a request head hyper's parser refused, from the head's bytes (what hyper
/// left unparsed in its read buffer). hyper's error kinds are coarser than Envoy's details, so
/// the bytes decide: a non-`chunked` transfer coding is 501; a request line `METHOD TARGET
/// HTTP/x.y` with another version is 426 `low_version`; control characters in the target or a
/// header value are `http1.invalid_characters`; everything else is `http1.codec_error`.
pub fn refused_head(head: &[u8], hyper_error: &str) -> ProxyError {
    // hyper has already taken a head whose framing headers it refused out of its buffer; its
    // error says which.
    if hyper_error.contains("too large") {
        // Past hyper's buffer: Envoy's `max_request_headers_kb` answer.
        return ProxyError::HeadersTooLarge;
    }
    if hyper_error.contains("transfer-encoding") {
        return codec(
            StatusCode::NOT_IMPLEMENTED,
            "http1.invalid_transfer_encoding",
        );
    }
    let end = find(head, b"\r\n\r\n").map_or(head.len(), |i| i + 2);
    let head = &head[..end];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    let mut te: Vec<&[u8]> = Vec::new();
    let mut has_cl = false;
    let mut bad_value = false;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te.push(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_cl = true;
        }
        bad_value |= value.iter().any(|&b| is_forbidden(b));
    }
    let chunked_only = te.len() == 1 && te[0].eq_ignore_ascii_case(b"chunked");
    if !te.is_empty() && !chunked_only {
        return codec(
            StatusCode::NOT_IMPLEMENTED,
            "http1.invalid_transfer_encoding",
        );
    }
    if !te.is_empty() && has_cl {
        return codec(
            StatusCode::BAD_REQUEST,
            "http1.content_length_and_chunked_not_allowed",
        );
    }
    if let [_, target, version] = parts.as_slice() {
        if target.contains(&0) {
            return codec(StatusCode::BAD_REQUEST, "http1.invalid_characters");
        }
        if version.starts_with(b"HTTP/") && *version != b"HTTP/1.1" && *version != b"HTTP/1.0" {
            return codec(StatusCode::UPGRADE_REQUIRED, "low_version");
        }
    }
    if bad_value {
        return codec(StatusCode::BAD_REQUEST, "http1.invalid_characters");
    }
    codec(StatusCode::BAD_REQUEST, "http1.codec_error")
}

/// Bytes Envoy refuses in a header value (RFC 9110 5.5: no CTLs but HTAB).
fn is_forbidden(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// hyper answers a head its parser refused with its own bare reply (`HTTP/1.1 400 Bad
/// Request`, `431`, `414`: a status line, `content-length: 0`, `date`, nothing else) and
/// closes. The inner connection passes every write through this filter while a request head
/// is being read and has not reached the request phases: a write that is exactly such a reply
/// is swallowed (reported written, never sent), so that the tunnel can write Envoy's reply in
/// its place. Anything else (the tail of an earlier response still being flushed) passes.
pub fn is_hyper_auto_reply(buf: &[u8]) -> bool {
    const STATUS_LINES: [&[u8]; 3] = [
        b"HTTP/1.1 400 Bad Request\r\n",
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        b"HTTP/1.1 414 URI Too Long\r\n",
    ];
    buf.len() <= 256
        && STATUS_LINES.iter().any(|l| buf.starts_with(l))
        && buf.ends_with(b"\r\n\r\n")
        && find(buf, b"server:").is_none()
        && find(buf, b"content-length: 0\r\n").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(e: ProxyError) -> (u16, &'static str) {
        match e {
            ProxyError::Codec { status, details } => (status.as_u16(), details),
            ProxyError::MissingHost => (400, "missing_host_header"),
            ProxyError::AbsolutePathRejected => (404, "absolute_path_rejected"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refused_heads_are_classified_as_envoy_does() {
        let cases: &[(&[u8], (u16, &str))] = &[
            (
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                (501, "http1.invalid_transfer_encoding"),
            ),
            (
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                (501, "http1.invalid_transfer_encoding"),
            ),
            (
                b"GET /x HTTP/1.1\r\nHost: a\r\nx-a: a\x01b\r\n\r\n",
                (400, "http1.invalid_characters"),
            ),
            (
                b"GET /x\x00y HTTP/1.1\r\nHost: a\r\n\r\n",
                (400, "http1.invalid_characters"),
            ),
            (b"GET /x HTTP/9.9\r\nHost: a\r\n\r\n", (426, "low_version")),
            (
                b"GET /x y HTTP/1.1\r\nHost: a\r\n\r\n",
                (400, "http1.codec_error"),
            ),
            (b"hello there\r\n\r\n", (400, "http1.codec_error")),
            (
                b"G@T /x HTTP/1.1\r\nHost: a\r\n\r\n",
                (400, "http1.codec_error"),
            ),
            (
                b"GET /x HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n",
                (400, "http1.codec_error"),
            ),
            (
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                (400, "http1.codec_error"),
            ),
        ];
        for (head, want) in cases {
            assert_eq!(
                details(refused_head(head, "invalid HTTP header parsed")),
                *want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(
            details(refused_head(b"", "invalid transfer-encoding parsed")),
            (501, "http1.invalid_transfer_encoding")
        );
        assert!(matches!(
            refused_head(b"", "message head is too large"),
            ProxyError::HeadersTooLarge
        ));
    }

    #[test]
    fn accepted_heads_envoy_refuses() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap_or(header::HOST),
                    http::HeaderValue::from_str(v).unwrap_or(http::HeaderValue::from_static("")),
                );
            }
            m
        };
        let v11 = http::Version::HTTP_11;
        let get = Method::GET;
        let check = |m: &Method, t: &str, hm: &HeaderMap| check_request(m, v11, t, hm, 0);
        assert!(check(&get, "/x", &h(&[("host", "a")])).is_ok());
        assert_eq!(
            details(check(&get, "/x", &h(&[])).unwrap_err()),
            (400, "missing_host_header")
        );
        assert_eq!(
            details(
                check(
                    &get,
                    "/x",
                    &h(&[
                        ("host", "a"),
                        ("content-length", "5"),
                        ("content-length", "5")
                    ])
                )
                .unwrap_err()
            ),
            (400, "http1.codec_error")
        );
        assert_eq!(
            details(
                check(
                    &Method::POST,
                    "/x",
                    &h(&[
                        ("host", "a"),
                        ("content-length", "5"),
                        ("transfer-encoding", "chunked")
                    ])
                )
                .unwrap_err()
            ),
            (400, "http1.content_length_and_chunked_not_allowed")
        );
        let query = Method::from_bytes(b"QUERY").unwrap_or(Method::GET);
        assert_eq!(
            details(check(&query, "/x", &h(&[("host", "a")])).unwrap_err()),
            (400, "http1.codec_error")
        );
        let msearch = Method::from_bytes(b"MSEARCH").unwrap_or(Method::GET);
        assert!(check(&msearch, "/x", &h(&[("host", "a")])).is_ok());
        assert_eq!(
            details(check(&Method::OPTIONS, "*", &h(&[("host", "a")])).unwrap_err()),
            (404, "absolute_path_rejected")
        );
        // h2c is not HTTP/1.
        assert!(check_request(&query, http::Version::HTTP_2, "/x", &h(&[]), 0).is_ok());
        // What hyper hid from the headers, seen by the head scan.
        let scanned = |bytes: &[u8]| {
            let found = std::sync::atomic::AtomicU8::new(0);
            let mut scan = HeadScan::start(&found);
            for part in bytes.chunks(7) {
                scan.feed(part, &found);
            }
            found.into_inner()
        };
        let both = scanned(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\ncontent-length: 9\r\n");
        assert_eq!(both, framing::CONTENT_LENGTH | framing::TRANSFER_ENCODING);
        assert_eq!(
            details(
                check_request(
                    &Method::POST,
                    v11,
                    "/x",
                    &h(&[("host", "a"), ("transfer-encoding", "chunked")]),
                    both
                )
                .unwrap_err()
            ),
            (400, "http1.content_length_and_chunked_not_allowed")
        );
        let twice = scanned(b"GET /x HTTP/1.1\r\ncontent-length: 5\r\nCONTENT-LENGTH: 5\r\n\r\n");
        assert_eq!(
            details(
                check_request(
                    &get,
                    v11,
                    "/x",
                    &h(&[("host", "a"), ("content-length", "5")]),
                    twice
                )
                .unwrap_err()
            ),
            (400, "http1.codec_error")
        );
        // Body bytes after the blank line are not headers.
        assert_eq!(
            scanned(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\ntransfer-encoding: x\r\n"),
            0
        );
    }

    #[test]
    fn only_hypers_own_bare_replies_are_swallowed() {
        assert!(is_hyper_auto_reply(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 12:53:49 GMT\r\n\r\n"
        ));
        // Our own replies carry `server`; body bytes that merely look like a reply do not end
        // a head, or are too long.
        assert!(!is_hyper_auto_reply(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nserver: istio-envoy\r\n\r\n"
        ));
        assert!(!is_hyper_auto_reply(b"HTTP/1.1 400 Bad Request\r\nx"));
        assert!(!is_hyper_auto_reply(b"0\r\n\r\n"));
    }
}
