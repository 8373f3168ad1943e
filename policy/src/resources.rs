//! Serde types mirroring the Kubernetes YAML users already write (unknown fields ignored).
//!
//! Only the fields the waypoint needs are modelled; everything else (`status`, `selector`
//! semantics, managed fields, ...) is accepted and dropped, so real `kubectl get -o yaml`
//! output loads unchanged. Numbers that Kubernetes bounds (ports, weights) are read as `i64`
//! so that [`crate::compile`] can report an out-of-range value as a [`ConfigError`] on the
//! exact field instead of a generic type error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ConfigError;

/// Gateway API group (`gateway.networking.k8s.io`).
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Kubernetes `ObjectMeta`, reduced to what routing and binding use.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    /// `default` when absent on a namespaced kind (as `kubectl apply` does); empty for
    /// cluster-scoped kinds (Namespace, GatewayClass).
    pub namespace: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// RFC 3339; tie-breaker in HTTPRoute precedence (older wins).
    pub creation_timestamp: Option<String>,
    /// A Pod's owners: its workload's name for metrics (Istio `GetDeployMetaFromPod`: a
    /// ReplicaSet's Deployment, else the owner, else the Pod).
    pub owner_references: Vec<OwnerReference>,
}

/// `metadata.ownerReferences[]`, reduced to what names a workload.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", default)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
}

/// Labels or annotations: a string map kept as a vector sorted by key. Objects carry a few
/// labels each, and a `BTreeMap`'s first node alone is ~550 bytes: with tens of thousands of
/// Pods watched (`--kube`), that was most of their memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Set `key` (replacing its value if present).
    pub fn insert(&mut self, key: String, value: String) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// Keep the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|(k, v)| keep(k, v));
        self.0.shrink_to_fit();
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Labels(map.into_iter().collect())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a map: duplicate keys resolve as they always did (the last one wins).
        let map = Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default();
        let mut v: Vec<(String, String)> = map.into_iter().collect();
        v.shrink_to_fit();
        Ok(Labels(v))
    }
}

/// Kubernetes `IntOrString` (Service `targetPort`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

/// A label selector (`matchLabels` and `matchExpressions`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry (`In`, `NotIn`, `Exists`, `DoesNotExist`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Kubernetes selector semantics: all requirements ANDed; an empty selector matches
    /// everything. An unknown operator matches nothing (fail closed).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// v1 Namespace: only its labels matter (`istio.io/use-waypoint`, allowedRoutes selectors).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// v1 Pod: labels (`istio.io/dataplane-mode`, `istio.io/use-waypoint`), its service account
/// (the SPIFFE identity its ztunnel presents) and its IPs. Matched to EndpointSlice endpoints
/// through `targetRef` (or by IP).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

impl Pod {
    /// The Pod's service account (`default` when unset, as Kubernetes defaults it).
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }

    /// The workload names Istio's telemetry gives this Pod ([`WorkloadNames`]).
    pub fn workload_names(&self) -> WorkloadNames {
        WorkloadNames::of(&self.metadata)
    }
}

/// The names of a Pod's workload as Istio's metrics label it (`*_workload`,
/// `*_canonical_service`, `*_canonical_revision`, `*_app`, `*_version`): the workload is a
/// ReplicaSet's Deployment (the ReplicaSet name less `-<pod-template-hash>`), else the owner,
/// else the Pod (Istio `GetDeployMetaFromPod`); the canonical service is
/// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the workload; the
/// canonical revision `service.istio.io/canonical-revision`, `app.kubernetes.io/version`,
/// `version`, else `latest` (Istio `labels.CanonicalService`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadNames {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub app: Option<String>,
    pub version: Option<String>,
}

impl WorkloadNames {
    pub fn of(m: &ObjectMeta) -> WorkloadNames {
        let label = |k: &str| m.labels.get(k).filter(|v| !v.is_empty()).cloned();
        let workload = match m.owner_references.first() {
            Some(o) if o.kind == "ReplicaSet" => match label("pod-template-hash") {
                Some(hash) => o
                    .name
                    .strip_suffix(&format!("-{hash}"))
                    .unwrap_or(&o.name)
                    .to_string(),
                None => o.name.clone(),
            },
            Some(o) => o.name.clone(),
            None => m.name.clone(),
        };
        WorkloadNames {
            canonical_service: label("service.istio.io/canonical-name")
                .or_else(|| label("app.kubernetes.io/name"))
                .or_else(|| label("app"))
                .unwrap_or_else(|| workload.clone()),
            canonical_revision: label("service.istio.io/canonical-revision")
                .or_else(|| label("app.kubernetes.io/version"))
                .or_else(|| label("version"))
                .unwrap_or_else(|| "latest".into()),
            app: label("app").or_else(|| label("app.kubernetes.io/name")),
            version: label("version").or_else(|| label("app.kubernetes.io/version")),
            workload,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodSpec {
    /// Defaults to `default`.
    pub service_account_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PodIp {
    pub ip: String,
}

/// v1 Service.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceSpec {
    /// `None` (the string) = headless: no VIP, so no waypoint chain (protocol.md 2.3).
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    pub ports: Vec<ServicePortSpec>,
    /// Kept for completeness; endpoints come from EndpointSlices, not from the selector.
    pub selector: BTreeMap<String, String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `PreferClose`, `PreferSameZone`, `PreferSameNode` (Kubernetes 1.31+): locality
    /// failover by readiness, as istiod renders it for the waypoint.
    pub traffic_distribution: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: i64,
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP`, `SCTP`; only TCP ports are served.
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

/// discovery.k8s.io/v1 EndpointSlice.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN` (FQDN slices are skipped with a warning).
    pub address_type: Option<String>,
    pub endpoints: Vec<EndpointSpec>,
    pub ports: Vec<EndpointPortSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointSpec {
    pub addresses: Vec<String>,
    pub conditions: EndpointConditions,
    pub target_ref: Option<ObjectReference>,
    /// The zone of the endpoint's node (`topology.kubernetes.io/zone`).
    pub zone: Option<String>,
    /// The node it runs on (istiod's `kubernetes.io/hostname` for `failoverPriority`).
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointConditions {
    /// Absent = ready (EndpointSlice API: "nil should be interpreted as true").
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectReference {
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointPortSpec {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

/// gateway.networking.k8s.io Gateway (v1 or v1beta1).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Listener {
    pub name: String,
    pub port: i64,
    pub protocol: String,
    pub hostname: Option<String>,
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AllowedRoutes {
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteNamespaces {
    /// `Same` (default), `All`, or `Selector`.
    pub from: Option<String>,
    pub selector: Option<LabelSelector>,
}

/// gateway.networking.k8s.io GatewayClass (cluster-scoped).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayClass {
    pub metadata: ObjectMeta,
    pub spec: GatewayClassSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayClassSpec {
    pub controller_name: String,
}

/// gateway.networking.k8s.io HTTPRoute (v1 or v1beta1).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
    /// Converted from a GRPCRoute (see [`Resource::GrpcRoute`]); not part of the YAML.
    #[serde(skip)]
    pub grpc: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    /// Ignored for Service parents: the VIP selects the Service, never `Host`
    /// (conformance `MeshFrontendHostname`).
    pub hostnames: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

/// `parentRefs[]`: group defaults to `gateway.networking.k8s.io` and kind to `Gateway`, so a
/// mesh route must spell `group: ""`, `kind: Service` (Gateway API GAMMA).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentReference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<i64>,
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<HttpBackendRef>,
    /// Gateway API durations (`1s`, `500ms`, `1m30s`).
    pub timeouts: Option<HttpRouteTimeouts>,
    /// GEP-1731 `retry` (experimental channel).
    pub retry: Option<HttpRouteRetry>,
}

/// `retry`: `codes` (retriable status codes), `attempts` (retries; 0 disables), `backoff`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteRetry {
    pub codes: Vec<i64>,
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
}

/// One `filters[]` entry; `type` says which member is used.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    pub request_header_modifier: Option<HeaderModifierSpec>,
    pub response_header_modifier: Option<HeaderModifierSpec>,
    pub request_redirect: Option<RedirectSpec>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewriteSpec>,
    pub request_mirror: Option<MirrorSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HeaderModifierSpec {
    pub set: Vec<HttpHeader>,
    pub add: Vec<HttpHeader>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct RedirectSpec {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifierSpec>,
    pub port: Option<i64>,
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct UrlRewriteSpec {
    pub hostname: Option<String>,
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct MirrorSpec {
    pub backend_ref: HttpBackendRefSpec,
    pub percent: Option<i64>,
    pub fraction: Option<FractionSpec>,
}

/// A `BackendObjectReference` (no weight, no filters).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpBackendRefSpec {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct FractionSpec {
    pub numerator: i64,
    /// Default 100.
    pub denominator: Option<i64>,
}

/// gateway.networking.k8s.io GRPCRoute (v1). Loaded as an [`HttpRoute`] with `grpc: true`:
/// method matches become path matches exactly as Istio converts them (`conversion.go`
/// `createGRPCURIMatch`): service+method Exact -> Exact `/<service>/<method>`; service only
/// -> PathPrefix `/<service>/`; method only -> regex `/[^/]+/<method>`; RegularExpression ->
/// regex `/<service or [^/]+>/<method or [^/]+>`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    pub hostnames: Vec<String>,
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    pub matches: Vec<GrpcRouteMatch>,
    pub filters: Vec<HttpRouteFilter>,
    pub backend_refs: Vec<HttpBackendRef>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    pub headers: Vec<HttpValueMatch>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
}

/// gateway.networking.k8s.io TCPRoute (v1alpha2): weighted TCP backends.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRoute {
    pub metadata: ObjectMeta,
    pub spec: TcpRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    pub rules: Vec<TcpRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRouteRule {
    pub name: Option<String>,
    pub backend_refs: Vec<HttpBackendRef>,
}

/// gateway.networking.k8s.io TLSRoute (v1alpha2, v1alpha3, v1): TLS passthrough routed by
/// the ClientHello SNI.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRoute {
    pub metadata: ObjectMeta,
    pub spec: TlsRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    /// SNI host names: exact, or `*.` + suffix; empty = every SNI (Istio: `sniHosts: ["*"]`).
    pub hostnames: Vec<String>,
    pub rules: Vec<TcpRouteRule>,
}

/// gateway.networking.k8s.io ReferenceGrant (v1beta1): lets routes in `from` namespaces
/// reference Services in this grant's namespace.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ReferenceGrantSpec {
    pub from: Vec<ReferenceGrantFrom>,
    pub to: Vec<ReferenceGrantTo>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ReferenceGrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ReferenceGrantTo {
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteMatch {
    pub path: Option<HttpPathMatch>,
    pub headers: Vec<HttpValueMatch>,
    pub query_params: Vec<HttpValueMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default), `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Default `/`.
    pub value: Option<String>,
}

/// A header or query-parameter match: `type` is `Exact` (default) or `RegularExpression`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpValueMatch {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpBackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
    /// Default 1; 0 = no traffic; at most 1,000,000.
    pub weight: Option<i64>,
    pub filters: Vec<HttpRouteFilter>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

/// Istio security API group (`security.istio.io`).
pub const SECURITY_GROUP: &str = "security.istio.io";

/// security.istio.io AuthorizationPolicy (v1 or v1beta1).
///
/// Lists that Istio's validation treats differently when absent and when empty (`rules`,
/// `from`, `to`, `when`) are `Option`s, so [`crate::compile`] can apply the same rules
/// (`rules` absent on DENY is an error; `from: []` is an error; `rules: [{}]` matches all).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthorizationPolicySpec {
    /// A workload selector (`matchLabels`). Kept only to warn: "Waypoint proxies are required
    /// to use `targetRefs` for policies to apply; `selector` policies will be ignored".
    pub selector: Option<Value>,
    /// Deprecated single form of `targetRefs`.
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Vec<PolicyTargetReference>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    pub action: Option<String>,
    /// The extension provider of a `CUSTOM` policy.
    pub provider: Option<AuthzProvider>,
    pub rules: Option<Vec<AuthzRule>>,
}

/// Istio telemetry API group (`telemetry.istio.io`).
pub const TELEMETRY_GROUP: &str = "telemetry.istio.io";

/// telemetry.istio.io Telemetry (v1 or v1alpha1). Only `accessLogging` is used by the
/// waypoint; `metrics` and `tracing` are accepted and ignored.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Telemetry {
    pub metadata: ObjectMeta,
    pub spec: TelemetrySpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TelemetrySpec {
    /// A workload selector; "waypoints ignore `selector`" (telemetry.proto): warned about.
    pub selector: Option<Value>,
    /// Deprecated single form of `targetRefs`.
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Vec<PolicyTargetReference>,
    /// `None` when absent (inherited from a less specific Telemetry, as Istio merges).
    pub access_logging: Option<Vec<AccessLogging>>,
    pub metrics: Option<Value>,
    pub tracing: Option<Value>,
}

/// Istio ServiceEntry (`networking.istio.io/v1`): a service the Kubernetes registry does not
/// have (an external API, VMs), bound to a waypoint like a Service (`istio.io/use-waypoint` on
/// it or its namespace). Each host is one service (istiod `serviceentry/conversion.go`
/// `convertServices`): its VIPs are `spec.addresses` plus the ones istiod allocates into
/// `status.addresses`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
    /// `status.addresses[]` (istiod's automatic allocation): (value, host).
    pub allocated: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<ServiceEntryPort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    pub endpoints: Vec<WorkloadEntrySpec>,
    pub workload_selector: Option<WorkloadSelectorSpec>,
    pub export_to: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceEntryPort {
    pub number: i64,
    pub protocol: Option<String>,
    pub name: String,
    pub target_port: Option<i64>,
}

/// Istio WorkloadEntry (`networking.istio.io/v1`): a workload outside Kubernetes (a VM), an
/// endpoint of the ServiceEntries whose `workloadSelector` matches its labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadEntry {
    pub metadata: ObjectMeta,
    pub spec: WorkloadEntrySpec,
}

/// A v1 Secret, reduced to the TLS credential keys Istio reads for a DestinationRule's
/// `credentialName` (`pilot/pkg/credentials/kube/secrets.go`): `cert`, `key`, `cacert` (an
/// Opaque secret) or `tls.crt`, `tls.key`, `ca.crt` (`kubernetes.io/tls`). Every other key is
/// dropped on reading: a Secret's other data is none of the waypoint's business.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secret {
    pub metadata: ObjectMeta,
    /// The credential keys found, decoded (`data` is base64; `stringData` as written, which
    /// the API server merges into `data`).
    pub data: BTreeMap<String, Vec<u8>>,
}

/// The keys [`Secret`] keeps.
pub const CREDENTIAL_KEYS: [&str; 6] = ["cert", "key", "cacert", "tls.crt", "tls.key", "ca.crt"];

impl Secret {
    fn read(
        metadata: ObjectMeta,
        object: &serde_json::Map<String, Value>,
        err: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<Secret, ConfigError> {
        use base64::Engine;
        let mut data = BTreeMap::new();
        if let Some(map) = object.get("data").and_then(Value::as_object) {
            for (k, v) in map
                .iter()
                .filter(|(k, _)| CREDENTIAL_KEYS.contains(&k.as_str()))
            {
                let text = v.as_str().unwrap_or_default();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| err(&format!("data.{k}"), format!("not base64: {e}")))?;
                data.insert(k.clone(), bytes);
            }
        }
        if let Some(map) = object.get("stringData").and_then(Value::as_object) {
            for (k, v) in map
                .iter()
                .filter(|(k, _)| CREDENTIAL_KEYS.contains(&k.as_str()))
            {
                data.insert(
                    k.clone(),
                    v.as_str().unwrap_or_default().as_bytes().to_vec(),
                );
            }
        }
        Ok(Secret { metadata, data })
    }
}

/// A ServiceEntry endpoint (the WorkloadEntry spec): an IP (`STATIC`) or a host name (`DNS`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadEntrySpec {
    pub address: String,
    /// Port name -> the endpoint's port for it.
    pub ports: BTreeMap<String, i64>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub locality: Option<String>,
    pub weight: Option<i64>,
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadSelectorSpec {
    pub labels: BTreeMap<String, String>,
}

/// Istio DestinationRule (`networking.istio.io/v1`): the traffic policy of a Service's
/// clusters on this waypoint (istiod `cluster_waypoint.go` applies connectionPool,
/// outlierDetection, loadBalancer and tls to waypoint clusters).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicySpec>,
    pub subsets: Vec<Value>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicySpec {
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<Value>,
    pub port_level_settings: Vec<PortTrafficPolicySpec>,
    pub tunnel: Option<Value>,
    pub proxy_protocol: Option<Value>,
    pub retry_budget: Option<RetryBudgetSpec>,
}

/// `trafficPolicy.retryBudget` (Istio 1.28): concurrent retries as a share of the requests in
/// flight, with a floor.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RetryBudgetSpec {
    pub percent: Option<f64>,
    pub min_retry_concurrency: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PortTrafficPolicySpec {
    pub port: Option<PortSelectorSpec>,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct PortSelectorSpec {
    pub number: i64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerSpec {
    pub simple: Option<String>,
    pub consistent_hash: Option<Value>,
    pub locality_lb_setting: Option<Value>,
    pub warmup_duration_secs: Option<Value>,
    pub warmup: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectionPoolSpec {
    pub tcp: Option<TcpPoolSpec>,
    pub http: Option<HttpPoolSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpPoolSpec {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Option<TcpKeepaliveSpec>,
    pub max_connection_duration: Option<String>,
    pub idle_timeout: Option<String>,
}

/// `connectionPool.tcp.tcpKeepalive` (`ConnectionPoolSettings.TCPSettings.TcpKeepalive`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpKeepaliveSpec {
    pub probes: Option<i64>,
    pub time: Option<String>,
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpPoolSpec {
    #[serde(rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
    pub h2_upgrade_policy: Option<String>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetectionSpec {
    /// Deprecated alias of `consecutive5xxErrors` (before Istio 1.5 it meant gateway errors).
    pub consecutive_errors: Option<i64>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub consecutive_local_origin_failures: Option<i64>,
    pub split_external_local_origin_errors: Option<bool>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
}

/// One `accessLogging[]` entry (`istio.telemetry.v1.AccessLogging`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct AccessLogging {
    /// Provider names from MeshConfig `extensionProviders`; empty = the default providers.
    pub providers: Vec<TelemetryProvider>,
    /// `true` turns access logging off for the selected providers.
    pub disabled: Option<bool>,
    pub filter: Option<AccessLogFilter>,
    /// `match: {mode: CLIENT | SERVER | CLIENT_AND_SERVER}`.
    #[serde(rename = "match")]
    pub match_: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct TelemetryProvider {
    pub name: String,
}

/// `filter: {expression: <CEL>}`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AccessLogFilter {
    pub expression: String,
}

/// `targetRef`/`targetRefs[]` (`istio.type.v1beta1.PolicyTargetReference`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyTargetReference {
    /// `""` (core) for Service, `gateway.networking.k8s.io` for Gateway and GatewayClass.
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    /// Must be empty or the policy's own namespace (cross-namespace references are invalid).
    pub namespace: Option<String>,
}

/// `provider` of a CUSTOM policy.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzProvider {
    pub name: String,
}

/// One `rules[]` entry: `from` entries ORed, `to` entries ORed, `when` conditions ANDed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzRule {
    pub from: Option<Vec<AuthzFrom>>,
    pub to: Option<Vec<AuthzTo>>,
    pub when: Option<Vec<AuthzCondition>>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzFrom {
    pub source: Option<AuthzSource>,
}

/// `from[].source`: fields ANDed, values within a field ORed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzSource {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    /// Istio 1.31 (extended channel): the peer's trust domain.
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzTo {
    pub operation: Option<AuthzOperation>,
}

/// `to[].operation`: fields ANDed, values within a field ORed. Ports are strings in the API.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzOperation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `when[]`: `key` with `values` (ORed) and/or `notValues` (none may match).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthzCondition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// security.istio.io RequestAuthentication (v1 or v1beta1): which JWTs a request may carry
/// (`request_authentication.proto`). Attached exactly like an [`AuthorizationPolicy`]:
/// waypoints use `targetRefs` only.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestAuthentication {
    pub metadata: ObjectMeta,
    pub spec: RequestAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestAuthenticationSpec {
    /// Kept only to warn: waypoints ignore selector-based policies.
    pub selector: Option<Value>,
    /// Deprecated single form of `targetRefs`.
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Vec<PolicyTargetReference>,
    pub jwt_rules: Vec<JwtRule>,
}

/// One `jwtRules[]` entry: a JWT issuer and how to find and verify its tokens.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// URL of the JSON Web Key Set (fetched, cached, refreshed).
    pub jwks_uri: String,
    /// The JSON Web Key Set inline, as a JSON string.
    pub jwks: String,
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: String,
    pub forward_original_token: bool,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// JWKS fetch timeout (`5s` default in Istio).
    pub timeout: Option<String>,
    /// Claims split on spaces for matching, in addition to `scope` and `permission`.
    pub space_delimited_claims: Vec<String>,
}

/// `fromHeaders[]`: a header that carries the token, with an optional value prefix.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct JwtHeader {
    pub name: String,
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// One Kubernetes object this waypoint understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Namespace(Namespace),
    Service(Service),
    Pod(Pod),
    EndpointSlice(EndpointSlice),
    Gateway(Gateway),
    GatewayClass(GatewayClass),
    HttpRoute(HttpRoute),
    /// A GRPCRoute, converted to an HTTPRoute with `grpc: true` (see [`GrpcRouteSpec`]).
    GrpcRoute(HttpRoute),
    TcpRoute(TcpRoute),
    TlsRoute(TlsRoute),
    ReferenceGrant(ReferenceGrant),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    Telemetry(Telemetry),
    DestinationRule(Box<DestinationRule>),
    ServiceEntry(Box<ServiceEntry>),
    WorkloadEntry(Box<WorkloadEntry>),
    /// A Secret's TLS credential (DestinationRule `tls.credentialName`).
    Secret(Secret),
    /// A kind (or apiVersion) the waypoint does not use; skipped with a warning.
    Unknown {
        api_version: String,
        kind: String,
        namespace: String,
        name: String,
    },
}

impl Resource {
    /// The Kubernetes kind, as written in manifests.
    pub fn kind(&self) -> &str {
        match self {
            Resource::Namespace(_) => "Namespace",
            Resource::Service(_) => "Service",
            Resource::Pod(_) => "Pod",
            Resource::EndpointSlice(_) => "EndpointSlice",
            Resource::Gateway(_) => "Gateway",
            Resource::GatewayClass(_) => "GatewayClass",
            Resource::HttpRoute(_) => "HTTPRoute",
            Resource::GrpcRoute(_) => "GRPCRoute",
            Resource::TcpRoute(_) => "TCPRoute",
            Resource::TlsRoute(_) => "TLSRoute",
            Resource::ReferenceGrant(_) => "ReferenceGrant",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::RequestAuthentication(_) => "RequestAuthentication",
            Resource::Telemetry(_) => "Telemetry",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::ServiceEntry(_) => "ServiceEntry",
            Resource::WorkloadEntry(_) => "WorkloadEntry",
            Resource::Secret(_) => "Secret",
            Resource::Unknown { kind, .. } => kind,
        }
    }

    /// Metadata of a known kind (`None` for [`Resource::Unknown`]).
    pub fn metadata(&self) -> Option<&ObjectMeta> {
        match self {
            Resource::Namespace(r) => Some(&r.metadata),
            Resource::Service(r) => Some(&r.metadata),
            Resource::Pod(r) => Some(&r.metadata),
            Resource::EndpointSlice(r) => Some(&r.metadata),
            Resource::Gateway(r) => Some(&r.metadata),
            Resource::GatewayClass(r) => Some(&r.metadata),
            Resource::HttpRoute(r) | Resource::GrpcRoute(r) => Some(&r.metadata),
            Resource::TcpRoute(r) => Some(&r.metadata),
            Resource::TlsRoute(r) => Some(&r.metadata),
            Resource::ReferenceGrant(r) => Some(&r.metadata),
            Resource::AuthorizationPolicy(r) => Some(&r.metadata),
            Resource::RequestAuthentication(r) => Some(&r.metadata),
            Resource::Telemetry(r) => Some(&r.metadata),
            Resource::DestinationRule(r) => Some(&r.metadata),
            Resource::ServiceEntry(r) => Some(&r.metadata),
            Resource::WorkloadEntry(r) => Some(&r.metadata),
            Resource::Secret(r) => Some(&r.metadata),
            Resource::Unknown { .. } => None,
        }
    }

    /// Convert one decoded object (`apiVersion`, `kind`, `metadata`, ...) into a resource.
    /// Dispatches on the API group and kind, so Istio's own `networking.istio.io` Gateway is
    /// never mistaken for a Gateway API Gateway. A known kind that does not deserialize is a
    /// [`ConfigError`] naming the resource and the top-level field (`metadata` or `spec`).
    pub fn from_value(value: Value) -> Result<Resource, ConfigError> {
        Self::from_value_checked(value, &mut Vec::new())
    }

    /// As [`Resource::from_value`], and every field of a policy or route `spec` that the
    /// waypoint does not know (a misspelling such as `principles` for `principals` would
    /// otherwise silently widen an AuthorizationPolicy) is pushed to `unknown_fields` as
    /// `Kind namespace/name: spec.path: unknown field, ignored`, as `kubectl apply
    /// --validate=strict` reports it. Other kinds are read leniently: real Services, Pods and
    /// EndpointSlices carry many fields the waypoint has no use for.
    pub fn from_value_checked(
        mut value: Value,
        unknown_fields: &mut Vec<String>,
    ) -> Result<Resource, ConfigError> {
        strip_nulls(&mut value);
        let api_version = str_at(&value, &["apiVersion"]).to_string();
        let kind = str_at(&value, &["kind"]).to_string();
        let raw_namespace = str_at(&value, &["metadata", "namespace"]).to_string();
        let raw_name = str_at(&value, &["metadata", "name"]).to_string();
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version.as_str()),
        };
        let gateway_version = group == GATEWAY_GROUP && matches!(version, "v1" | "v1beta1");
        let known = match kind.as_str() {
            "Namespace" | "Service" | "Pod" | "Secret" => group.is_empty() && version == "v1",
            "EndpointSlice" => group == "discovery.k8s.io" && version == "v1",
            "Gateway" | "GatewayClass" | "HTTPRoute" => gateway_version,
            "GRPCRoute" => group == GATEWAY_GROUP && matches!(version, "v1" | "v1alpha2"),
            "TCPRoute" => group == GATEWAY_GROUP && matches!(version, "v1alpha2" | "v1alpha3"),
            "TLSRoute" => {
                group == GATEWAY_GROUP && matches!(version, "v1" | "v1alpha2" | "v1alpha3")
            }
            "ReferenceGrant" => group == GATEWAY_GROUP && matches!(version, "v1beta1" | "v1alpha2"),
            "AuthorizationPolicy" | "RequestAuthentication" => {
                group == SECURITY_GROUP && matches!(version, "v1" | "v1beta1")
            }
            "Telemetry" => group == TELEMETRY_GROUP && matches!(version, "v1" | "v1alpha1"),
            "DestinationRule" | "ServiceEntry" | "WorkloadEntry" => {
                group == "networking.istio.io" && matches!(version, "v1" | "v1beta1" | "v1alpha3")
            }
            _ => false,
        };
        if !known {
            return Ok(Resource::Unknown {
                api_version,
                kind,
                namespace: raw_namespace,
                name: raw_name,
            });
        }
        let cluster_scoped = matches!(kind.as_str(), "Namespace" | "GatewayClass");
        let err = |field: &str, message: String| ConfigError {
            kind: kind.clone(),
            namespace: if cluster_scoped || !raw_namespace.is_empty() {
                raw_namespace.clone()
            } else {
                "default".into()
            },
            name: raw_name.clone(),
            field: field.into(),
            message,
        };
        let Value::Object(mut object) = value else {
            return Err(err("", "expected a mapping".into()));
        };
        // Deserialize metadata and spec separately so a type error names the right part.
        let mut metadata: ObjectMeta = part(object.remove("metadata"), "metadata", &err)?;
        if metadata.name.is_empty() {
            return Err(err("metadata.name", "is required".into()));
        }
        if cluster_scoped {
            metadata.namespace.clear();
        } else if metadata.namespace.is_empty() {
            metadata.namespace = "default".into();
        }
        let spec = object.remove("spec");
        let id = format!("{kind} {}/{}", metadata.namespace, metadata.name);
        let ignored = std::cell::RefCell::new(Vec::new());
        let result = Ok(match kind.as_str() {
            "Namespace" => Resource::Namespace(Namespace { metadata }),
            "Secret" => Resource::Secret(Secret::read(metadata, &object, &err)?),
            "Service" => Resource::Service(Service {
                metadata,
                spec: part(spec, "spec", &err)?,
            }),
            "Pod" => {
                // `spec` was taken out above; a Pod is read whole (spec and status).
                if let Some(spec) = spec {
                    object.insert("spec".into(), spec);
                }
                let mut pod: Pod = part(Some(Value::Object(object)), "", &err)?;
                pod.metadata = metadata;
                Resource::Pod(pod)
            }
            "EndpointSlice" => {
                let mut slice: EndpointSlice = part(Some(Value::Object(object)), "", &err)?;
                slice.metadata = metadata;
                Resource::EndpointSlice(slice)
            }
            "Gateway" => Resource::Gateway(Gateway {
                metadata,
                spec: part(spec, "spec", &err)?,
            }),
            "GatewayClass" => Resource::GatewayClass(GatewayClass {
                metadata,
                spec: part(spec, "spec", &err)?,
            }),
            "AuthorizationPolicy" => Resource::AuthorizationPolicy(AuthorizationPolicy {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            }),
            "RequestAuthentication" => Resource::RequestAuthentication(RequestAuthentication {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            }),
            "Telemetry" => Resource::Telemetry(Telemetry {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            }),
            "DestinationRule" => Resource::DestinationRule(Box::new(DestinationRule {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            })),
            "WorkloadEntry" => Resource::WorkloadEntry(Box::new(WorkloadEntry {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            })),
            "ServiceEntry" => {
                // `status.addresses` is written by istiod (automatic allocation); read leniently.
                let allocated = object
                    .get("status")
                    .and_then(|s| s.get("addresses"))
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|v| {
                                let f = |k: &str| {
                                    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
                                };
                                (f("value"), f("host"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Resource::ServiceEntry(Box::new(ServiceEntry {
                    metadata,
                    spec: strict_part(spec, &err, &ignored)?,
                    allocated,
                }))
            }
            "GRPCRoute" => {
                let g: GrpcRouteSpec = strict_part(spec, &err, &ignored)?;
                Resource::GrpcRoute(HttpRoute {
                    metadata,
                    spec: grpc_to_http(g, &err)?,
                    grpc: true,
                })
            }
            "TCPRoute" => Resource::TcpRoute(TcpRoute {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            }),
            "TLSRoute" => Resource::TlsRoute(TlsRoute {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            }),
            "ReferenceGrant" => Resource::ReferenceGrant(ReferenceGrant {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
            }),
            _ => Resource::HttpRoute(HttpRoute {
                metadata,
                spec: strict_part(spec, &err, &ignored)?,
                grpc: false,
            }),
        });
        // Only the policy and route kinds read their spec with `strict_part`.
        for path in ignored.into_inner() {
            unknown_fields.push(format!("{id}: {path}: unknown field, ignored"));
        }
        result
    }
}

/// GRPCRoute -> HTTPRoute the way Istio converts it (`conversion.go` `convertGRPCRoute`,
/// `createGRPCURIMatch`). A method match naming neither service nor method, or an Exact
/// value containing `/`, is an error on the field.
fn grpc_to_http(
    g: GrpcRouteSpec,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HttpRouteSpec, ConfigError> {
    let mut rules = Vec::with_capacity(g.rules.len());
    for (i, r) in g.rules.into_iter().enumerate() {
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.into_iter().enumerate() {
            let field = format!("spec.rules[{i}].matches[{j}].method");
            let path = match m.method {
                None => None,
                Some(mm) => {
                    let regex = match mm.type_.as_deref().unwrap_or("Exact") {
                        "Exact" => false,
                        "RegularExpression" => true,
                        other => {
                            return Err(err(
                                &format!("{field}.type"),
                                format!(
                                    "unknown method match type {other:?} (expected Exact or RegularExpression)"
                                ),
                            ));
                        }
                    };
                    let svc = mm.service.filter(|s| !s.is_empty());
                    let method = mm.method.filter(|s| !s.is_empty());
                    if !regex
                        && (svc.as_deref().is_some_and(|s| s.contains('/'))
                            || method.as_deref().is_some_and(|s| s.contains('/')))
                    {
                        return Err(err(
                            &field,
                            "Exact service and method must not contain '/'".into(),
                        ));
                    }
                    let (type_, value) = match (regex, svc, method) {
                        (_, None, None) => {
                            return Err(err(&field, "one of service or method must be set".into()));
                        }
                        (false, Some(s), Some(m)) => ("Exact", format!("/{s}/{m}")),
                        (false, Some(s), None) => ("PathPrefix", format!("/{s}/")),
                        (false, None, Some(m)) => {
                            ("RegularExpression", format!("/[^/]+/{}", regex_escape(&m)))
                        }
                        (true, s, m) => (
                            "RegularExpression",
                            format!(
                                "/{}/{}",
                                s.as_deref().unwrap_or("[^/]+"),
                                m.as_deref().unwrap_or("[^/]+")
                            ),
                        ),
                    };
                    Some(HttpPathMatch {
                        type_: Some(type_.into()),
                        value: Some(value),
                    })
                }
            };
            matches.push(HttpRouteMatch {
                path,
                headers: m.headers,
                query_params: Vec::new(),
                method: None,
            });
        }
        rules.push(HttpRouteRule {
            name: r.name,
            matches,
            filters: r.filters,
            backend_refs: r.backend_refs,
            timeouts: None,
            retry: None,
        });
    }
    Ok(HttpRouteSpec {
        parent_refs: g.parent_refs,
        hostnames: g.hostnames,
        rules,
    })
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Deserialize one part of an object (absent = default), mapping the serde message to a
/// [`ConfigError`] on `field`.
fn part<T: DeserializeOwned + Default>(
    value: Option<Value>,
    field: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(T::default()),
        Some(v) => serde_json::from_value(v).map_err(|e| err(field, e.to_string())),
    }
}

/// A `spec` read while noting every field serde ignored (`spec.a.b[0].c`).
fn strict_part<T: DeserializeOwned + Default>(
    value: Option<Value>,
    err: &dyn Fn(&str, String) -> ConfigError,
    ignored: &std::cell::RefCell<Vec<String>>,
) -> Result<T, ConfigError> {
    let Some(v) = value else {
        return Ok(T::default());
    };
    serde_ignored::deserialize(v, |path| {
        ignored.borrow_mut().push(spec_path(&path));
    })
    .map_err(|e| err("spec", e.to_string()))
}

/// `spec.rules[0].from` from serde_ignored's path.
fn spec_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => "spec".into(),
        Path::Seq { parent, index } => format!("{}[{index}]", spec_path(parent)),
        Path::Map { parent, key } => format!("{}.{key}", spec_path(parent)),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => spec_path(parent),
    }
}

/// A string at a path inside a JSON value, or `""`.
pub(crate) fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut v = value;
    for key in path {
        match v.get(key) {
            Some(next) => v = next,
            None => return "",
        }
    }
    v.as_str().unwrap_or("")
}

/// YAML `key:` with no value is `null`; Kubernetes treats it as absent, and so do we.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_parses_camel_case_and_defaults_namespace() {
        let r = Resource::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "labels": null, "extra": 1},
            "spec": {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1", "fd00::1"],
                     "ports": [{"name": "http", "port": 9080, "targetPort": "web", "appProtocol": "http"}]}
        }))
        .expect("valid");
        let Resource::Service(s) = r else {
            panic!("not a service: {r:?}")
        };
        assert_eq!(s.metadata.namespace, "default");
        assert_eq!(s.spec.cluster_ips.len(), 2);
        assert_eq!(
            s.spec.ports[0].target_port,
            Some(IntOrString::String("web".into()))
        );
    }

    #[test]
    fn istio_gateway_kind_is_unknown_not_gateway_api() {
        let r = Resource::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "x"}
        }))
        .expect("ok");
        assert!(matches!(r, Resource::Unknown { ref kind, .. } if kind == "Gateway"));
    }

    #[test]
    fn gateway_api_v1beta1_is_accepted() {
        let r = Resource::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "HTTPRoute",
            "metadata": {"name": "r"}, "spec": {"rules": [{}]}
        }))
        .expect("ok");
        assert!(matches!(r, Resource::HttpRoute(ref h) if h.spec.rules.len() == 1));
    }

    #[test]
    fn type_error_names_resource_and_part() {
        let e = Resource::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"ports": [{"port": "eighty"}]}
        }))
        .expect_err("bad port");
        assert_eq!(
            (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
            ("Service", "ns", "x")
        );
        assert_eq!(e.field, "spec");
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    #[test]
    fn missing_name_is_an_error() {
        let e = Resource::from_value(json!({"apiVersion": "v1", "kind": "Namespace"}))
            .expect_err("no name");
        assert_eq!(e.field, "metadata.name");
    }

    #[test]
    fn labels_are_a_sorted_map() {
        let mut l: Labels =
            serde_json::from_value(json!({"b": "2", "a": "1", "c": "3"})).expect("labels");
        assert_eq!(l.get("a").map(String::as_str), Some("1"));
        assert_eq!(l.get("c").map(String::as_str), Some("3"));
        assert!(l.get("d").is_none());
        l.insert("b".into(), "two".into());
        l.insert("0".into(), "zero".into());
        let keys: Vec<&String> = l.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["0", "a", "b", "c"]);
        assert_eq!(l.get("b").map(String::as_str), Some("two"));
        l.retain(|k, _| k != "a");
        assert_eq!(l.len(), 3);
        let none: Labels = serde_json::from_value(json!(null)).expect("null is empty");
        assert!(none.is_empty());
    }

    #[test]
    fn label_selector_semantics() {
        let labels: Labels = [("env".to_string(), "prod".to_string())]
            .into_iter()
            .collect();
        let sel = |v: Value| serde_json::from_value::<LabelSelector>(v).expect("selector");
        assert!(sel(json!({})).matches(&labels));
        assert!(sel(json!({"matchLabels": {"env": "prod"}})).matches(&labels));
        assert!(!sel(json!({"matchLabels": {"env": "dev"}})).matches(&labels));
        assert!(
            sel(
                json!({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]})
            )
            .matches(&labels)
        );
        assert!(
            !sel(json!({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}))
                .matches(&labels)
        );
        assert!(
            !sel(json!({"matchExpressions": [{"key": "env", "operator": "Bogus"}]}))
                .matches(&labels)
        );
    }
}
