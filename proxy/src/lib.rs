//! # proxy: the waypoint
//!
//! Contract:
//! - Owns every socket: the HBONE listener and what is served inside each CONNECT
//!   ([`listener`]), the HTTP request path as a list of named phases ([`request`]), upstream
//!   connections ([`upstream`]), and the readiness/metrics/admin listeners ([`ops`]).
//! - Reads configuration only through `policy` snapshots, swapped whole on reload (one
//!   snapshot per request; sources in [`config`]), and writes exactly one access-log record
//!   per request.
//! - Every failure becomes a response in one place ([`request::error`]); nothing on the data
//!   path panics on peer input.
//! - Behaviour follows Istio's Envoy waypoint (`../shared/docs/protocol.md`), with each
//!   deliberate difference documented where it is implemented.
//!
//! Layout, one folder per concern; arrows only point down this list (no module imports one
//! above it): `app` (start, reload, drain) -> `listener` (HBONE, tunnels, inner connections,
//! TCP) -> `request` (phases, replies, access-log record) -> `upstream` (pools, HBONE
//! origination, the CUSTOM authorizer client) -> `state` (what requests share), with
//! `config` (mesh config, JWKS, file watch), `ops` (admin, metrics, memory) and `cli`
//! (offline commands, demo, test client) beside them; `sharded` (per-thread state, so no lock
//! on the request path is shared between workers) is a leaf any of them may use.

pub mod app;
pub mod cli;
pub mod config;
pub mod control;
pub mod listener;
pub mod memory;
pub mod ops;
pub mod request;
pub mod sharded;
pub mod state;
pub mod telemetry;
pub mod upstream;

pub use app::{Config, Inputs, Running, start};
