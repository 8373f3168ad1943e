//! CUSTOM authorization outcomes and the authorizer's latency, as Envoy's ext_authz filter
//! counts them (`http.<prefix>.ext_authz.ok`, `.denied`, `.error`, `.failure_mode_allowed`)
//! and its authorizer cluster times them (`upstream_rq_time`). Process-wide atomics: only
//! requests under a CUSTOM policy touch them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bounds in milliseconds (Envoy's default buckets up to 10 s, the check timeout's
/// order).
const BOUNDS_MS: [f64; 13] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Denied,
    /// Unreachable, timed out, 5xx or a gRPC error; the request got `statusOnError`.
    Error,
    /// The same failures, let through by `failOpen`.
    FailureModeAllowed,
}

/// See the module docs.
#[derive(Default)]
pub struct ExtAuthzStats {
    outcomes: [AtomicU64; 4],
    buckets: [AtomicU64; BOUNDS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl ExtAuthzStats {
    /// One check: its outcome and how long the authorizer took.
    pub fn record(&self, outcome: Outcome, took: Duration) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let ms = took.as_secs_f64() * 1000.0;
        if let Some(i) = BOUNDS_MS.iter().position(|b| ms <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// `waypoint_ext_authz_checks_total{result=...}` and
    /// `waypoint_ext_authz_duration_milliseconds`, in Prometheus text.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP waypoint_ext_authz_checks_total CUSTOM authorization checks by result (Envoy ext_authz.ok/denied/error/failure_mode_allowed).\n# TYPE waypoint_ext_authz_checks_total counter"
        );
        for (name, o) in [
            ("ok", Outcome::Ok),
            ("denied", Outcome::Denied),
            ("error", Outcome::Error),
            ("failure_mode_allowed", Outcome::FailureModeAllowed),
        ] {
            let _ = writeln!(
                out,
                "waypoint_ext_authz_checks_total{{result=\"{name}\"}} {}",
                self.outcome(o)
            );
        }
        let name = "waypoint_ext_authz_duration_milliseconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from sending a CUSTOM check to its answer (or the error).\n# TYPE {name} histogram"
        );
        let mut running = 0;
        for (b, n) in BOUNDS_MS.iter().zip(&self.buckets) {
            running += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {running}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum_ms = self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum_ms}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outcomes_and_buckets_latency() {
        let s = ExtAuthzStats::default();
        s.record(Outcome::Ok, Duration::from_micros(300));
        s.record(Outcome::Denied, Duration::from_millis(7));
        s.record(Outcome::Error, Duration::from_secs(20));
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("waypoint_ext_authz_checks_total{result=\"ok\"} 1"));
        assert!(out.contains("waypoint_ext_authz_checks_total{result=\"failure_mode_allowed\"} 0"));
        assert!(out.contains("waypoint_ext_authz_duration_milliseconds_bucket{le=\"0.5\"} 1"));
        assert!(out.contains("waypoint_ext_authz_duration_milliseconds_bucket{le=\"10\"} 2"));
        assert!(out.contains("waypoint_ext_authz_duration_milliseconds_bucket{le=\"10000\"} 2"));
        assert!(out.contains("waypoint_ext_authz_duration_milliseconds_bucket{le=\"+Inf\"} 3"));
        assert!(out.contains("waypoint_ext_authz_duration_milliseconds_count 3"));
    }
}
