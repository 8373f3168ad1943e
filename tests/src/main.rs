//! The one integration-test binary (one link on 2 cores): every module is a group of tests
//! against real sockets, real TLS and real HTTP/2 CONNECT.

mod abuse;
mod envoy_interop;
mod hbone_listener;
mod operations;
mod routing;
mod upstream;
