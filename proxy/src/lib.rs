//! # proxy: the waypoint
//!
//! Contract:
//! - Owns every socket: the HBONE listener (via the `hbone` crate), the tunnelled HTTP/TCP
//!   served inside each CONNECT ([`tunnel`]), the request phases ([`pipeline`]), upstream
//!   connections ([`upstream`]), and the readiness/metrics/admin listeners ([`admin`]).
//! - Reads configuration only through `policy` snapshots, swapped whole on reload (one
//!   snapshot per request), and writes exactly one access-log record per request.
//! - Every failure becomes a response in one place ([`error`]); nothing on the data path
//!   panics on peer input.
//! - Behaviour follows Istio's Envoy waypoint (`../shared/docs/protocol.md`), with each
//!   deliberate difference documented where it is implemented.

pub mod admin;
pub mod app;
pub mod authn;
pub mod body;
pub mod client;
pub mod codec;
pub mod demo;
pub mod error;
pub mod extauthz;
pub mod inspect;
pub mod logging;
pub mod logguard;
pub mod memory;
pub mod meshconfig;
pub mod metrics;
pub mod pages;
pub mod pipeline;
pub mod state;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;
pub mod watch;

pub use app::{Config, Inputs, Running, start};
