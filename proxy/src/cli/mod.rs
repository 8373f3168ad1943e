//! What a user runs besides the waypoint itself: the self-contained demo ([`demo`]) and the
//! small HBONE HTTP client the demo, tests and benchmarks use ([`client`]).

pub mod client;
pub mod demo;
