//! Trace context on the wire and Envoy's sampling decision, as Envoy 1.40 reads and writes
//! them for a waypoint (checked against it: docs/envoy-observed.md section 18).
//!
//! - W3C (`opentelemetry` provider): `traceparent: 00-<32 hex>-<16 hex>-<2 hex flags>`; all-zero
//!   ids or a malformed header start a new trace. Upstream gets our span as the parent and
//!   the incoming `tracestate` (an empty `tracestate` when there was none, as Envoy sends).
//! - B3 (`zipkin` provider): `x-b3-traceid` (16 or 32 hex, width kept), `x-b3-spanid`,
//!   `x-b3-sampled` (`1`/`true`/`d` or `0`/`false`), or the single `b3` header. A new
//!   128-bit trace's low half is its root span id (as Envoy's Zipkin tracer makes it).
//! - The decision (`ConnectionManagerUtility::mutateTracingRequestHeader`): with
//!   `useRequestIdForTraceSampling` the first 8 hex digits of `x-request-id`, mod 10000, are
//!   compared with the sampling percentage (a request id that is not a UUID is never traced);
//!   a trace reason already packed into the id (`9` sampled, `a` forced, `b` client) is kept;
//!   `x-client-trace-id` forces tracing (client sampling is 100% in Istio) and
//!   `x-envoy-force-trace` too. The reason is packed into character 14 of the id that goes
//!   upstream. Without `useRequestIdForTraceSampling` the draw is random and the id untouched.

use http::HeaderMap;
use http::header::HeaderValue;

/// Why a request is traced (Envoy `Tracing::Reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotTraceable,
    Sampling,
    ServiceForced,
    ClientForced,
}

impl Reason {
    pub fn traced(self) -> bool {
        self != Reason::NotTraceable
    }
}

/// Envoy's UUID request-id extension: where the reason lives and its codes.
const TRACE_BYTE: usize = 14;
const UUID_LEN: usize = 36;

/// The sampling decision for one request; rewrites `x-request-id` with the reason as Envoy
/// does. `per_10000` is the random sampling percentage in hundredths of a percent.
pub fn decide(
    headers: &mut HeaderMap,
    use_request_id: bool,
    per_10000: u32,
    random: impl FnOnce() -> u64,
) -> Reason {
    let forced = |h: &HeaderMap| {
        if h.contains_key("x-client-trace-id") {
            Some(Reason::ClientForced)
        } else if h.contains_key("x-envoy-force-trace") {
            Some(Reason::ServiceForced)
        } else {
            None
        }
    };
    if !use_request_id {
        return match forced(headers) {
            Some(r) => r,
            None if random() % 10_000 < u64::from(per_10000) => Reason::Sampling,
            None => Reason::NotTraceable,
        };
    }
    // Read from the header in place: a request that is not traced allocates nothing here.
    let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) else {
        return Reason::NotTraceable;
    };
    // Envoy `getInteger`: the first 8 characters as hex; anything else is not traceable.
    let Some(value) = id.get(..8).and_then(|h| u64::from_str_radix(h, 16).ok()) else {
        return Reason::NotTraceable;
    };
    let mut reason = match id.as_bytes().get(TRACE_BYTE) {
        Some(b'a') if id.len() == UUID_LEN => Reason::ServiceForced,
        Some(b'9') if id.len() == UUID_LEN => Reason::Sampling,
        Some(b'b') if id.len() == UUID_LEN => Reason::ClientForced,
        _ => Reason::NotTraceable,
    };
    if reason == Reason::NotTraceable {
        if let Some(r) = forced(headers) {
            reason = r;
        } else if value % 10_000 < u64::from(per_10000) {
            reason = Reason::Sampling;
        }
        if reason.traced() {
            pack_reason(headers, reason);
        }
    }
    reason
}

/// Write `reason` into the request id's trace byte (UUID-length ids only).
fn pack_reason(headers: &mut HeaderMap, reason: Reason) {
    let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) else {
        return;
    };
    if id.len() != UUID_LEN
        || !id.is_char_boundary(TRACE_BYTE)
        || !id.is_char_boundary(TRACE_BYTE + 1)
    {
        return;
    }
    let code = match reason {
        Reason::ServiceForced => "a",
        Reason::ClientForced => "b",
        Reason::Sampling => "9",
        Reason::NotTraceable => return,
    };
    let packed = format!("{}{code}{}", &id[..TRACE_BYTE], &id[TRACE_BYTE + 1..]);
    if let Ok(v) = HeaderValue::from_str(&packed) {
        headers.insert("x-request-id", v);
    }
}

/// A trace id (128 bits; `narrow` for a 64-bit B3 id, written back as 16 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId {
    pub bytes: [u8; 16],
    pub narrow: bool,
}

/// The span this request continues, as read from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: [u8; 8],
    /// The caller's sampling flag.
    pub sampled: bool,
    /// W3C `tracestate`, passed on.
    pub tracestate: Option<String>,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

impl TraceId {
    pub fn hex(&self) -> String {
        if self.narrow {
            hex(&self.bytes[8..])
        } else {
            hex(&self.bytes)
        }
    }
}

/// W3C `traceparent` (and `tracestate`), if valid.
pub fn w3c_parent(headers: &HeaderMap) -> Option<Parent> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = v.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may add more (W3C 3.2.4).
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    hex_bytes::<1>(version)?;
    let trace: [u8; 16] = hex_bytes(trace)?;
    let span: [u8; 8] = hex_bytes(span)?;
    let flags: [u8; 1] = hex_bytes(flags)?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id: TraceId {
            bytes: trace,
            narrow: false,
        },
        span_id: span,
        sampled: flags[0] & 1 == 1,
        tracestate: headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    })
}

/// What B3 headers say: ids when both are valid, and the sampling flag when present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct B3 {
    pub ids: Option<(TraceId, [u8; 8])>,
    pub sampled: Option<bool>,
}

fn b3_sampled(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => hex_bytes::<16>(s).map(|bytes| TraceId {
            bytes,
            narrow: false,
        }),
        16 => hex_bytes::<8>(s).map(|low| {
            let mut bytes = [0u8; 16];
            bytes[8..].copy_from_slice(&low);
            TraceId {
                bytes,
                narrow: true,
            }
        }),
        _ => None,
    }
    .filter(|t| t.bytes != [0; 16])
}

/// B3 multi headers, else the single `b3` header.
pub fn b3(headers: &HeaderMap) -> B3 {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(single) = get("b3") {
        // `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]` or just `{sampled}`.
        let parts: Vec<&str> = single.split('-').collect();
        if parts.len() == 1 {
            return B3 {
                ids: None,
                sampled: b3_sampled(parts[0]),
            };
        }
        let ids = b3_trace_id(parts[0]).zip(hex_bytes::<8>(parts[1]).filter(|s| *s != [0; 8]));
        return B3 {
            ids,
            sampled: parts.get(2).and_then(|s| b3_sampled(s)),
        };
    }
    let ids = get("x-b3-traceid").and_then(b3_trace_id).zip(
        get("x-b3-spanid")
            .and_then(hex_bytes::<8>)
            .filter(|s| *s != [0; 8]),
    );
    B3 {
        ids,
        sampled: get("x-b3-sampled").and_then(b3_sampled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn request_id_sampling_packs_the_reason_as_envoy() {
        // 0x024d9cc8 % 10000 = 840: sampled at 100%, not at 1%.
        let id = "024d9cc8-8693-4d5a-aa23-475a35b0da79";
        let mut h = headers(&[("x-request-id", id)]);
        assert_eq!(decide(&mut h, true, 10_000, || 0), Reason::Sampling);
        assert_eq!(h["x-request-id"], "024d9cc8-8693-9d5a-aa23-475a35b0da79");
        // Already sampled upstream of us: kept whatever our percentage.
        assert_eq!(decide(&mut h, true, 0, || 0), Reason::Sampling);
        let mut h = headers(&[("x-request-id", id)]);
        assert_eq!(decide(&mut h, true, 100, || 0), Reason::NotTraceable);
        assert_eq!(h["x-request-id"], id, "not traced: untouched");
        let mut h = headers(&[("x-request-id", "not-a-uuid")]);
        assert_eq!(decide(&mut h, true, 10_000, || 0), Reason::NotTraceable);
        let mut h = headers(&[("x-request-id", id), ("x-client-trace-id", "abc")]);
        assert_eq!(decide(&mut h, true, 0, || 0), Reason::ClientForced);
        assert_eq!(h["x-request-id"], "024d9cc8-8693-bd5a-aa23-475a35b0da79");
        let mut h = headers(&[("x-request-id", id)]);
        assert_eq!(decide(&mut h, false, 5_000, || 4_999), Reason::Sampling);
        assert_eq!(h["x-request-id"], id, "random draw: id untouched");
        assert_eq!(decide(&mut h, false, 5_000, || 5_000), Reason::NotTraceable);
    }

    #[test]
    fn w3c_and_b3_parse_as_envoy() {
        let h = headers(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )]);
        let p = w3c_parent(&h).expect("valid");
        assert_eq!(p.trace_id.hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&p.span_id), "b7ad6b7169203331");
        assert!(p.sampled);
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319X-b7ad6b7169203331-01",
        ] {
            assert_eq!(w3c_parent(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
        let b = b3(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba8"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]));
        let (t, s) = b.ids.expect("ids");
        assert_eq!(
            (t.hex(), hex(&s)),
            ("80f198ee56343ba8".into(), "e457b5a2e4d86bd1".into())
        );
        assert_eq!(b.sampled, Some(true));
        let single = b3(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0",
        )]));
        assert_eq!(single.sampled, Some(false));
        assert!(!single.ids.expect("ids").0.narrow);
        assert_eq!(b3(&headers(&[("x-b3-sampled", "0")])).ids, None);
    }
}
