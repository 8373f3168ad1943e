//! Envoy response flags (`%RESPONSE_FLAGS%`, protocol.md 3.5), printed in Envoy's enum order
//! and joined with `,` (so a failed connect after retries prints `UF,URX`), `-` when none.

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
}

const NAMES: [&str; 26] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM",
];

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        NAMES[self as usize]
    }
}

/// A set of response flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    pub fn set(&mut self, f: ResponseFlag) {
        self.0 |= 1 << (f as u32);
    }

    pub fn with(mut self, f: ResponseFlag) -> Self {
        self.set(f);
        self
    }

    /// Every flag of `self` and `other`.
    pub fn union(self, other: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | other.0)
    }

    pub fn contains(&self, f: ResponseFlag) -> bool {
        self.0 & (1 << (f as u32)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    fn write(&self, out: &mut String) {
        if self.0 == 0 {
            out.push('-');
            return;
        }
        for (i, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
            }
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
    fn flags_print_in_envoy_order() {
        assert_eq!(ResponseFlags::default().to_string(), "-");
        let f = ResponseFlags::from(ResponseFlag::URX).with(ResponseFlag::UF);
        assert_eq!(f.to_string(), "UF,URX");
        assert_eq!(ResponseFlags::from(ResponseFlag::NC).to_string(), "NC");
    }
}
