//! Where configuration comes from besides the manifests' `policy` snapshot: Istio's
//! MeshConfig ([`meshconfig`]), remote JWKS for RequestAuthentication ([`jwks`]), the file
//! watch that reloads manifests and certificates ([`watch`]), and the Kubernetes API in
//! `--kube` mode ([`kube`]).

pub mod jwks;
pub mod kube;
pub mod meshconfig;
pub mod watch;
