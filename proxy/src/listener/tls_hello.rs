//! The TLS ClientHello's SNI for TLSRoute passthrough (RFC 8446 4.1.2, RFC 6066 3), read
//! without consuming the stream.

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::*;

/// Read the start of the stream (put back afterwards) until the TLS ClientHello is complete
/// and return its SNI host name (`Ok(None)`: TLS without SNI, or not TLS at all). `Err` when
/// the client closed or went quiet past `limit`.
pub(super) async fn read_sni(
    stream: &mut Rewind,
    limit: std::time::Duration,
) -> Result<Option<String>, ()> {
    let deadline = Instant::now() + limit;
    // Bytes already read by protocol sniffing come first.
    let mut buf = std::mem::take(&mut stream.prefix).to_vec();
    let mut chunk = [0u8; 4096];
    let result = loop {
        match parse_client_hello(&buf) {
            Hello::NeedMore if buf.len() < MAX_CLIENT_HELLO => {}
            Hello::NeedMore | Hello::NotTls => break Ok(None),
            Hello::Sni(sni) => break Ok(sni),
        }
        match tokio::time::timeout_at(deadline, stream.inner.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Err(()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    stream.rewind(Bytes::from(buf));
    result
}

/// Largest ClientHello we wait for (Envoy's tls_inspector reads up to 64 KiB).
pub(super) const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// What the start of a TLSRoute tunnel says so far.
#[derive(Debug, PartialEq)]
pub enum Hello {
    NeedMore,
    NotTls,
    Sni(Option<String>),
}

/// Parse a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3) that may span several records.
/// Public for the fuzz target (`fuzz/fuzz_targets/client_hello.rs`): never panics on input.
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut i = 0;
    loop {
        if buf.len() < i + 5 {
            return if buf.is_empty() || buf[0] == 0x16 {
                Hello::NeedMore
            } else {
                Hello::NotTls
            };
        }
        if buf[i] != 0x16 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([buf[i + 3], buf[i + 4]]));
        let Some(body) = buf.get(i + 5..i + 5 + len) else {
            return Hello::NeedMore;
        };
        hs.extend_from_slice(body);
        i += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 0x01 {
                return Hello::NotTls;
            }
            let need =
                4 + (usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]));
            if hs.len() >= need {
                return Hello::Sni(sni_of(&hs[4..need]));
            }
        }
    }
}

/// The `server_name` host name of a ClientHello body.
pub(super) fn sni_of(h: &[u8]) -> Option<String> {
    let mut p = 2 + 32; // legacy_version, random
    let sid = usize::from(*h.get(p)?);
    p += 1 + sid;
    let suites = usize::from(u16::from_be_bytes([*h.get(p)?, *h.get(p + 1)?]));
    p += 2 + suites;
    let comp = usize::from(*h.get(p)?);
    p += 1 + comp;
    let ext_len = usize::from(u16::from_be_bytes([*h.get(p)?, *h.get(p + 1)?]));
    p += 2;
    let end = (p + ext_len).min(h.len());
    while p + 4 <= end {
        let ty = u16::from_be_bytes([h[p], h[p + 1]]);
        let len = usize::from(u16::from_be_bytes([h[p + 2], h[p + 3]]));
        let data = h.get(p + 4..p + 4 + len)?;
        if ty == 0 {
            // server_name_list: u16 length, then (type u8, u16 length, name).
            let mut q = 2;
            while q + 3 <= data.len() {
                let nlen = usize::from(u16::from_be_bytes([data[q + 1], data[q + 2]]));
                let name = data.get(q + 3..q + 3 + nlen)?;
                if data[q] == 0 {
                    // An empty host name is not a name (RFC 6066 3: `HostName<1..2^16-1>`):
                    // no SNI. Found by the `client_hello` fuzz target.
                    return std::str::from_utf8(name)
                        .ok()
                        .filter(|n| !n.is_empty())
                        .map(str::to_ascii_lowercase);
                }
                q += 3 + nlen;
            }
            return None;
        }
        p += 4 + len;
    }
    None
}

/// A minimal TLS 1.2/1.3 ClientHello carrying `sni` (tests).
pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let list_len = 3 + n.len();
        ext.extend_from_slice(&[0x00, 0x00]);
        ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// An [`H2Stream`] with bytes already read (while sniffing) put back in front.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_sni_is_parsed_across_records() {
        let hello = client_hello(Some("DB.Example.com"));
        assert_eq!(
            parse_client_hello(&hello),
            Hello::Sni(Some("db.example.com".into()))
        );
        assert_eq!(parse_client_hello(&client_hello(None)), Hello::Sni(None));
        for cut in [0, 3, 5, 20, hello.len() - 1] {
            assert_eq!(parse_client_hello(&hello[..cut]), Hello::NeedMore, "{cut}");
        }
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        // The same handshake split over two records.
        let hs = &hello[5..];
        let (a, b) = hs.split_at(10);
        let mut split = vec![0x16, 0x03, 0x01, 0, a.len() as u8];
        split.extend_from_slice(a);
        split.extend_from_slice(&[0x16, 0x03, 0x01]);
        split.extend_from_slice(&(b.len() as u16).to_be_bytes());
        split.extend_from_slice(b);
        assert_eq!(
            parse_client_hello(&split),
            Hello::Sni(Some("db.example.com".into()))
        );
        // Regression corpus (fuzz target `client_hello`): a server_name entry of length 0.
        const EMPTY_SNI: &[u8] = &[
            22, 33, 22, 0, 16, 1, 0, 1, 1, 1, 129, 7, 192, 0, 0, 0, 0, 0, 0, 0, 0, 22, 0, 0, 1, 1,
            129, 5, 192, 0, 0, 0, 0, 243, 0, 0, 0, 22, 0, 0, 0, 0, 22, 33, 22, 0, 8, 0, 0, 0, 22,
            0, 0, 0, 0, 22, 33, 22, 0, 0, 22, 0, 0, 0, 16, 1, 1, 218, 38, 37, 37, 37, 37, 37, 37,
            37, 218, 218, 218, 218, 218, 218, 218, 218, 218, 218, 218, 217, 218, 1, 1, 1, 129, 5,
            192, 0, 0, 0, 0, 0, 0, 0, 0, 22, 0, 0, 0, 0, 22, 33, 22, 0, 8, 0, 0, 0, 38, 22, 0, 0,
            0, 0, 22, 33, 22, 0, 50, 55, 48, 48, 8, 0, 0, 0, 22, 0, 0, 0, 84, 84, 84, 84, 84, 84,
            84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 84, 0, 0,
            0, 0, 0, 22, 0, 0, 0, 16, 1, 1, 1, 1, 1, 129, 5, 192, 0, 0, 0, 0, 0, 0, 0, 0, 22, 0, 0,
            0, 0, 22, 33, 22, 0, 8, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 22, 33, 22, 0, 8, 0, 0, 0, 22,
            0, 0, 0, 0, 22, 33, 22, 0, 0, 22, 0, 0, 0, 8, 0, 0, 0, 22, 0, 0, 0, 0, 22, 33, 198,
            198, 198, 198, 198, 198, 198, 198, 198, 198, 198, 198, 198, 198, 0, 16, 1, 1, 1, 1, 1,
            133, 5, 192, 0, 0, 0, 0, 0, 0, 0, 0, 22, 0, 0, 0, 0, 127, 0, 0, 0, 0, 0, 0, 1, 198,
            198, 198, 198, 198, 198, 198, 1, 1, 1, 1, 1, 129, 5, 192, 0, 1, 0, 0, 16, 1, 1, 1, 1,
            1, 8, 0, 0, 0, 0, 0, 0, 1,
        ];
        assert!(
            !matches!(parse_client_hello(EMPTY_SNI), Hello::Sni(Some(ref n)) if n.is_empty()),
            "an empty host name is no SNI"
        );
    }
}
