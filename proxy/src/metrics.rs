//! Request metrics in Prometheus text format, fed from the same record as the access log
//! (so the two always agree). Istio's standard `istio_requests_total` with the labels this
//! waypoint knows today; the full label set and histograms come with the operations work.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::Mutex;

use accesslog::{AccessLogRecord, ResponseFlags};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    cluster: Option<Arc<str>>,
    protocol: &'static str,
    code: u16,
    flags: ResponseFlags,
}

/// Counters behind `/stats/prometheus`.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<HashMap<RequestKey, u64>>,
}

impl Metrics {
    /// Count one finished request (or failed tunnel / TCP connection).
    pub fn record_request(&self, r: &AccessLogRecord) {
        let key = RequestKey {
            cluster: r.upstream_cluster.clone(),
            protocol: match r.protocol {
                Some(_) => "http",
                None => "tcp",
            },
            code: r.response_code,
            flags: r.response_flags,
        };
        if let Ok(mut m) = self.requests.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP istio_requests_total Requests handled by this waypoint.\n");
        out.push_str("# TYPE istio_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            let mut rows: Vec<_> = m.iter().collect();
            rows.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
            for (k, v) in rows {
                let svc = k
                    .cluster
                    .as_deref()
                    .and_then(|c| c.rsplit('|').next())
                    .unwrap_or("unknown");
                let _ = writeln!(
                    out,
                    "istio_requests_total{{reporter=\"waypoint\",destination_service=\"{svc}\",request_protocol=\"{}\",response_code=\"{}\",response_flags=\"{}\"}} {v}",
                    k.protocol, k.code, k.flags
                );
            }
        }
        for (name, help, value) in extra {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
