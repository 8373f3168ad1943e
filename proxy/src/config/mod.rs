//! Where configuration comes from besides the manifests' `policy` snapshot: Istio's
//! MeshConfig ([`meshconfig`]), remote JWKS for RequestAuthentication ([`jwks`]), and the
//! file watch that reloads manifests and certificates ([`watch`]).

pub mod jwks;
pub mod meshconfig;
pub mod watch;
