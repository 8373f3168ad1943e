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
