//! The protobuf `Duration` as Istio's YAML spells it (`5s`, `1.5s`, `0.25s`, also `500ms`):
//! one parser for every such field (RequestAuthentication, MeshConfig providers, ...). Gateway
//! API durations have their own grammar (GEP-2257) in the route compiler.
//!
//! Never panics: values beyond protobuf's range (315,576,000,000 s, about 10,000 years),
//! negative, NaN or infinite values are `None` (a config error naming the field), not the
//! panic `Duration::from_secs_f64` raises on overflow.

use std::time::Duration;

/// protobuf `google.protobuf.Duration` seconds range: +-315,576,000,000.
pub const MAX_PROTO_SECONDS: u64 = 315_576_000_000;

/// `Some` for a valid, non-negative duration within protobuf's range.
pub fn parse_proto_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse::<u64>().ok()?)
    } else {
        let secs: f64 = s.strip_suffix('s')?.parse().ok()?;
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(secs).ok()?
    };
    (d.as_secs() <= MAX_PROTO_SECONDS).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn istio_spellings() {
        assert_eq!(parse_proto_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_proto_duration("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_proto_duration("500ms"),
            Some(Duration::from_millis(500))
        );
        for bad in [
            "",
            "s",
            "-1s",
            "NaNs",
            "infs",
            "1e300s",
            "99999999999999999999ms",
            "5",
        ] {
            assert_eq!(parse_proto_duration(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_proto_duration("315576000000s"),
            Some(Duration::from_secs(MAX_PROTO_SECONDS))
        );
        assert_eq!(parse_proto_duration("315576000001s"), None);
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(s in ".{0,40}") {
            let _ = parse_proto_duration(&s);
        }

        #[test]
        fn never_panics_on_any_number(f in proptest::num::f64::ANY, ms in any::<u64>()) {
            let _ = parse_proto_duration(&format!("{f}s"));
            let _ = parse_proto_duration(&format!("{f:e}s"));
            let _ = parse_proto_duration(&format!("{ms}ms"));
            let _ = parse_proto_duration(&format!("{ms}s"));
        }
    }
}
