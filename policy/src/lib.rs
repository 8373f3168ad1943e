//! # policy: Kubernetes resources -> one compiled, immutable [`Snapshot`]
//!
//! Contract:
//! - Owns the *meaning* of the configuration: the serde types that mirror the Kubernetes YAML
//!   users already write ([`resources`]), loading them from files ([`load`]), and [`compile`],
//!   the only function that turns resources into a [`Snapshot`] the data path can use.
//! - Pure: no sockets, no tokio, no clocks, no randomness. Callers pass randomness in
//!   (e.g. [`WeightedBackends::pick`]) so every decision is reproducible in tests and benches.
//! - Never panics on any input. Every problem is a [`ConfigError`] naming the resource
//!   (`kind namespace/name`) and the field path; [`compile`] returns *all* of them at once.
//! - Follows Istio's waypoint semantics (see `../shared/docs/policy.md` section 3 and 4 and
//!   `protocol.md` 2.3-2.6): a waypoint serves the Service VIPs bound to it with
//!   `istio.io/use-waypoint`, picks the Service by the CONNECT authority (never by `Host`),
//!   and routes with Gateway API HTTPRoute precedence.
//! - Enforces Istio AuthorizationPolicy the way the waypoint's Envoy RBAC filters do
//!   (`policy.md` section 1, `protocol.md` 2.9): see [`authz`].
//! - Verifies JWTs for Istio RequestAuthentication the way Envoy's `jwt_authn` filter does
//!   (`policy.md` section 2): see [`authn`]. The caller passes the time and fetched key sets.
//! - Decides access logging per request from Istio Telemetry `accessLogging` (CEL filters
//!   compiled here): see [`telemetry`].

pub mod authn;
pub mod authz;
mod compiler;
pub mod duration;
pub mod load;
pub mod metrics_policy;
pub mod resources;
pub mod route;
pub mod snapshot;
pub mod telemetry;
pub mod trace_policy;
pub mod traffic;

pub use authn::{
    Authenticated, Authn, AuthnSet, CLOCK_SKEW_SECS, Jwks, JwksRef, JwksSource, JwtProvider,
    JwtStatus, authenticate,
};
pub use authz::{
    Action, AuthzPolicy, AuthzRequest, AuthzSet, CustomMatch, Decision, DryRun, HttpAttrs,
    PolicyOutcome, RuleOutcome, custom_match, evaluate, evaluate_rbac, explain as explain_authz,
};
pub use load::{
    LoadedResources, ResourceSource, load_paths, load_paths_partial, parse_manifests,
    parse_manifests_partial,
};
pub use metrics_policy::{IstioMetric, MetricProviders, MetricsPolicy, MetricsSpec, TagRule};
pub use route::{
    Backend, BackendRef, Filters, HeaderMatch, HeaderModifier, MatchKind, MatchTrace, Mirror,
    PathMatch, PathModifier, PathNormalization, QueryMatch, Redirect, RetryPolicy, Rewrite,
    RouteMatch, RouteRule, RouteTable, TcpRouteRule, TlsRoutes, WeightedBackends, normalize_path,
    normalize_path_with,
};
pub use snapshot::{
    AppProtocol, BindingInfo, BindingSource, BindingState, Cluster, CompileOptions, DnsTargets,
    DynamicDns, Endpoint, EndpointHealth, EndpointLoad, EndpointSpec, EndpointWorkload,
    GatewayInfo, Locality, LocalityLb, LocalitySetting, Resolution, ServiceInfo, ServicePort,
    ServicePortInfo, Snapshot, VipLookup, WaypointFor, Workload, compile,
};
pub use telemetry::{AccessLogPolicy, LogAttributes, LogSinks, RequestAttributes};
pub use trace_policy::{CustomTag, TracingPolicy, TracingSpec};

use std::fmt;

/// One problem in the configuration, with enough context for a user to fix it:
/// `HTTPRoute default/reviews: spec.rules[0].matches[0].path.value: must start with '/'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Resource kind (`HTTPRoute`, `Service`, ...); for syntax errors, `file`.
    pub kind: String,
    /// Namespace of the resource (empty for cluster-scoped or unparsable documents).
    pub namespace: String,
    /// Name of the resource; for syntax errors the file path (and document index).
    pub name: String,
    /// Field path inside the resource (`spec.rules[0].backendRefs[1].weight`), or empty.
    pub field: String,
    /// What is wrong and, where possible, what to do about it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)?;
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
