//! The one integration-test binary (one link on 2 cores): every module is a group of tests
//! against real sockets, real TLS and real HTTP/2 CONNECT.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

// The allocator the `waypoint` binary installs, with its options (proxy/src/memory/mod.rs):
// every test below runs the data path on it, as production does.
proxy::install_allocator!();

mod abuse;
mod access_log_formats;
mod authn;
mod dynamic_dns;
mod envoy_interop;
mod ext_authz_body;
mod ext_authz_grpc;
mod gamma;
mod grpc_metrics;
mod hbone_listener;
mod http_semantics;
mod mesh;
mod operations;
mod routing;
mod service_entry;
mod telemetry;
mod tracing;
mod traffic_policy;
mod upstream;
