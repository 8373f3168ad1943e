//! Benchmark harness support shared by the `loadgen`, `bench-backend` and `benchtool` binaries
//! and the Criterion micro-benches:
//!
//! - [`model`]: one neutral description of a bench configuration (Services, HTTPRoute rules,
//!   AuthorizationPolicies), rendered both as Kubernetes manifests for our waypoint and as an
//!   Envoy 1.40 bootstrap shaped the way istiod configures a waypoint;
//! - [`procstat`]: CPU time and memory of a process from `/proc` (Linux only);
//! - [`report`]: one run's tables; [`scaling`]: a 1-worker and a 2-worker run side by side.
//!
//! Nothing here opens sockets; every address it writes is on loopback or a Service VIP that
//! only ever appears as a CONNECT authority.

pub mod envoy;
pub mod model;
pub mod procstat;
pub mod report;
pub mod scaling;

/// One access-log record as a typical bench request produces it (a routed, authorized GET
/// through the reviews split): the input of the access-log and contention micro-benches.
pub fn sample_access_log_record() -> accesslog::AccessLogRecord {
    let mut r = accesslog::AccessLogRecord::new(std::time::SystemTime::now());
    r.route_name = Some("reviews-split".into());
    r.method = Some("GET".into());
    r.path = Some("/reviews/0".into());
    r.protocol = Some("HTTP/1.1");
    r.response_code = 200;
    r.response_flags = accesslog::ResponseFlags::default();
    r.response_code_details = Some("via_upstream".into());
    r.bytes_sent = 295;
    r.duration = 3;
    r.upstream_service_time = Some("2".into());
    r.user_agent = Some("curl/8.5.0".into());
    r.request_id = Some("6c5bd1e6-1f4a-4c1e-9d0b-6f6f3e4c2b1a".into());
    r.authority = Some("reviews:9080".into());
    r.upstream_host = Some("10.244.1.17:9080".into());
    r.upstream_cluster = Some("inbound-vip|9080|http|reviews-v1.default.svc.cluster.local".into());
    r.upstream_local_address = Some("10.244.1.9:51234".into());
    r.downstream_local_address = Some("10.0.0.10:9080".into());
    r.downstream_remote_address = Some("10.244.2.5:40312".into());
    r
}
