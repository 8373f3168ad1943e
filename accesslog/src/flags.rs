//! Envoy response flags (`%RESPONSE_FLAGS%`, protocol.md 3.5), joined with `,`, `-` when none.
//! Envoy 1.40 prints them in the order they were set (observed: the waypoint's router logs a
//! failed connect after retries as `URX,UF`, Envoy's tcp_proxy as `UF,URX`;
//! docs/envoy-observed.md case 2), so the set remembers insertion order.

use serde::{Serialize, Serializer};

/// One Envoy response flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResponseFlag {
    /// FailedLocalHealthCheck
    LH = 0,
    /// NoHealthyUpstream (503 `no healthy upstream`)
    UH,
    /// UpstreamRequestTimeout (504)
    UT,
    /// LocalReset
    LR,
    /// UpstreamRemoteReset
    UR,
    /// UpstreamConnectionFailure (503)
    UF,
    /// UpstreamConnectionTermination (503)
    UC,
    /// UpstreamOverflow (503)
    UO,
    /// NoRouteFound (404, or no filter chain)
    NR,
    /// DelayInjected
    DI,
    /// FaultInjected
    FI,
    /// RateLimited (429)
    RL,
    /// UnauthorizedExternalService (ext_authz denied)
    UAEX,
    /// RateLimitServiceError
    RLSE,
    /// DownstreamConnectionTermination (client went away)
    DC,
    /// UpstreamRetryLimitExceeded
    URX,
    /// StreamIdleTimeout
    SI,
    /// InvalidEnvoyRequestHeaders
    IH,
    /// DownstreamProtocolError
    DPE,
    /// UpstreamMaxStreamDurationReached
    UMSDR,
    /// ResponseFromCacheFilter
    RFCF,
    /// NoFilterConfigFound
    NFCF,
    /// DurationTimeout
    DT,
    /// UpstreamProtocolError (502)
    UPE,
    /// NoClusterFound
    NC,
    /// OverloadManagerTerminated
    OM,
    /// DnsResolutionFailed (503 `DNS resolution failure`, dynamic forward proxy)
    DF,
}

const NAMES: [&str; 27] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF",
];

const FLAGS: [ResponseFlag; 27] = {
    use ResponseFlag::*;
    [
        LH, UH, UT, LR, UR, UF, UC, UO, NR, DI, FI, RL, UAEX, RLSE, DC, URX, SI, IH, DPE, UMSDR,
        RFCF, NFCF, DT, UPE, NC, OM, DF,
    ]
};

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        NAMES[self as usize]
    }
}

/// A set of response flags in the order they were set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags {
    bits: u32,
    order: [u8; 6],
    len: u8,
}

impl ResponseFlags {
    /// Add `f` (no effect if already present).
    pub fn set(&mut self, f: ResponseFlag) {
        let bit = 1u32 << (f as u32);
        if self.bits & bit != 0 {
            return;
        }
        self.bits |= bit;
        if (self.len as usize) < self.order.len() {
            self.order[self.len as usize] = f as u8;
            self.len += 1;
        }
    }

    pub fn with(mut self, f: ResponseFlag) -> Self {
        self.set(f);
        self
    }

    /// Every flag of `self`, then those of `other` not yet present.
    pub fn union(mut self, other: ResponseFlags) -> ResponseFlags {
        for &i in &other.order[..other.len as usize] {
            self.set(FLAGS[i as usize]);
        }
        self
    }

    pub fn contains(&self, f: ResponseFlag) -> bool {
        self.bits & (1 << (f as u32)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Envoy's `response.flags` CEL attribute: the `CoreResponseFlag` bitmask (`LH` = 0x1,
    /// `UH` = 0x2, ... `NR` = 0x100, ...); [`ResponseFlag`] is declared in Envoy's bit order.
    pub fn bits(&self) -> u64 {
        u64::from(self.bits)
    }

    fn write(&self, out: &mut String) {
        if self.bits == 0 {
            out.push('-');
            return;
        }
        for (n, &i) in self.order[..self.len as usize].iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            out.push_str(NAMES[i as usize]);
        }
    }
}

impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

impl From<ResponseFlag> for ResponseFlags {
    fn from(f: ResponseFlag) -> Self {
        ResponseFlags::default().with(f)
    }
}

impl Serialize for ResponseFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(8);
        self.write(&mut out);
        s.serialize_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_in_the_order_they_were_set() {
        assert_eq!(ResponseFlags::default().to_string(), "-");
        let f = ResponseFlags::from(ResponseFlag::URX).with(ResponseFlag::UF);
        assert_eq!(f.to_string(), "URX,UF");
        assert_eq!(
            ResponseFlags::from(ResponseFlag::UF)
                .with(ResponseFlag::URX)
                .to_string(),
            "UF,URX"
        );
        assert_eq!(f.with(ResponseFlag::UF).to_string(), "URX,UF");
        assert!(f.contains(ResponseFlag::UF) && !f.contains(ResponseFlag::NR));
        assert_eq!(ResponseFlags::from(ResponseFlag::NC).to_string(), "NC");
    }
}
