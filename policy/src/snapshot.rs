//! The compiled snapshot: everything the data path needs, validated and indexed.
//! INTERFACE CONTRACT (the proxy crate is written against exactly these items; extend, do not rename).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::ConfigError;
use crate::authn::{AuthnIndex, AuthnSet, JwksRef};
use crate::authz::{AuthzIndex, AuthzPolicy, AuthzSet};
use crate::load::LoadedResources;
use crate::route::{RouteTable, TcpRouteRule, TlsRoutes};
use crate::telemetry::{AccessLogPolicy, TelemetryIndex};

/// Static inputs to [`compile`] that do not come from the manifests.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The waypoint's own locality (`--locality`): locality failover needs it. Unset: found
    /// from `own_pod` (its locality label, else the zone of its EndpointSlice endpoint).
    pub locality: Option<Locality>,
    /// The waypoint's own Pod, (namespace, name) (`POD_NAMESPACE`, `POD_NAME` in istiod's
    /// waypoint Deployment).
    pub own_pod: Option<(String, String)>,
    /// MeshConfig `localityLbSetting` (enabled by default), for clusters whose
    /// DestinationRule has none.
    pub mesh_locality: LocalitySetting,
    /// The waypoint's own labels (`/etc/istio/pod/labels`), for `failoverPriority`; empty:
    /// its Pod's, when the configuration has it.
    pub proxy_labels: std::collections::BTreeMap<String, String>,
    /// `ISTIO_META_CLUSTER_ID`: the `topology.istio.io/cluster` of every workload here.
    pub cluster_id: String,
    /// `ISTIO_META_NETWORK`: the waypoint's network, and that of workloads whose Pod and
    /// namespace do not say.
    pub network: String,
    /// `ISTIO_META_NODE_NAME`: the waypoint's `kubernetes.io/hostname`.
    pub node_name: String,
    /// Namespace of the Gateway this instance is (`--gateway NS/NAME`).
    pub gateway_namespace: String,
    /// Name of the Gateway this instance is.
    pub gateway_name: String,
    /// SPIFFE trust domain (`cluster.local`).
    pub trust_domain: String,
    /// DNS suffix for Service hostnames (`cluster.local` -> `reviews.default.svc.cluster.local`).
    pub cluster_domain: String,
    /// Istio's root namespace (MeshConfig `rootNamespace`): AuthorizationPolicies here may
    /// target GatewayClass `istio-waypoint` to apply to every waypoint.
    pub root_namespace: String,
    /// MeshConfig `trustDomainAliases`: policy principals in the local trust domain (or
    /// `cluster.local`) also match these trust domains.
    pub trust_domain_aliases: Vec<String>,
    /// MeshConfig extension providers' `service` (as written, `[<ns>/]<hostname>`) and
    /// `port`: each gets an `outbound|<port>||<host>` cluster, found with
    /// [`Snapshot::extension_cluster`].
    pub extension_services: Vec<(String, u16)>,
    /// MeshConfig `envoyFileAccessLog` extension providers by name: Telemetry
    /// `accessLogging` may select them (others but `envoy` are warned about and ignored).
    pub log_providers: Vec<String>,
    /// MeshConfig's Prometheus-kind providers and `defaultProviders.metrics`: Telemetry
    /// `metrics` selecting none of them turns the istio_* metrics off.
    pub metric_providers: crate::metrics_policy::MetricProviders,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            locality: None,
            own_pod: None,
            mesh_locality: LocalitySetting::default(),
            proxy_labels: Default::default(),
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            node_name: String::new(),
            gateway_namespace: "default".into(),
            gateway_name: "waypoint".into(),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            trust_domain_aliases: Vec::new(),
            extension_services: Vec::new(),
            log_providers: Vec::new(),
            metric_providers: Default::default(),
        }
    }
}

/// `istio.io/waypoint-for` (Gateway label, else GatewayClass label, else `service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

/// The Gateway this instance serves.
#[derive(Debug, Clone)]
pub struct GatewayInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub waypoint_for: WaypointFor,
}

/// Protocol of a Service port, from `appProtocol`, else the port name prefix (Istio's
/// protocol selection: `http`, `http2`, `grpc`, `tcp`, ... ; `name: http-web` -> Http).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1 (upstream HTTP/1.1).
    Http,
    /// HTTP/2 cleartext (upstream h2c).
    Http2,
    /// gRPC (upstream h2c).
    Grpc,
    /// Opaque TCP: never sniffed.
    Tcp,
    /// Undeclared: sniff HTTP/1.1 or h2c prior knowledge, else TCP (protocol.md 2.3).
    Unknown,
}

impl AppProtocol {
    /// Lower-case name as Istio prints protocols (`http`, `http2`, `grpc`, `tcp`; `unknown`
    /// for sniffed ports).
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
            AppProtocol::Unknown => "unknown",
        }
    }
}

/// Which object's `istio.io/use-waypoint` label decided a Service's waypoint: "service/pod
/// label overrides namespace label" (`policy.md` 4, Istio `waypoints.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingSource {
    ServiceLabel,
    NamespaceLabel,
    /// Neither the Service nor its namespace has the label.
    None,
}

impl BindingSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BindingSource::ServiceLabel => "service label",
            BindingSource::NamespaceLabel => "namespace label",
            BindingSource::None => "none",
        }
    }
}

/// The outcome of Istio's `fetchWaypointForTarget` for one Service, seen from this waypoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingState {
    /// Served by this waypoint.
    Bound,
    /// No `istio.io/use-waypoint` label on the Service or its namespace.
    NoWaypoint,
    /// `istio.io/use-waypoint: none`.
    OptedOut,
    /// Labelled for another waypoint.
    OtherWaypoint,
    /// This waypoint's `istio.io/waypoint-for` does not admit service traffic.
    WaypointForRejects,
    /// This waypoint's `allowedRoutes` does not admit the Service's namespace.
    NamespaceNotAllowed,
    /// The Service of a gateway (label `gateway.networking.k8s.io/gateway-name`).
    GatewayService,
    /// The Gateway named by `--gateway` is not in the configuration.
    NoGateway,
}

impl BindingState {
    /// Short text for tables (`waypoint services`).
    pub fn as_str(self) -> &'static str {
        match self {
            BindingState::Bound => "bound here",
            BindingState::NoWaypoint => "no waypoint",
            BindingState::OptedOut => "opted out",
            BindingState::OtherWaypoint => "bound to another waypoint",
            BindingState::WaypointForRejects => "waypoint-for does not admit",
            BindingState::NamespaceNotAllowed => "namespace not allowed",
            BindingState::GatewayService => "gateway service",
            BindingState::NoGateway => "no gateway",
        }
    }
}

/// How a Service's waypoint was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingInfo {
    pub state: BindingState,
    /// Which label decided (the label's object), or `None`.
    pub source: BindingSource,
    /// `namespace/name` of the waypoint the labels name (`None` without label or for `none`).
    pub waypoint: Option<String>,
    /// One sentence saying why, as `waypoint check` and the debug logs print it.
    pub reason: String,
}

/// One port of a [`ServiceInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub port: u16,
    /// Empty when unnamed.
    pub name: String,
    pub protocol: AppProtocol,
}

/// A Service as `waypoint services` lists it (like `istioctl x ztunnel-config service`).
/// A ServiceEntry is listed once per host, as istiod makes one service of each host.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    /// `Service` or `ServiceEntry`.
    pub kind: &'static str,
    pub namespace: Arc<str>,
    /// The Service's name; a ServiceEntry's host (Istio's service name for it).
    pub name: Arc<str>,
    /// `name.namespace.svc.<domain>`, or the ServiceEntry host.
    pub hostname: Arc<str>,
    /// ServiceEntry: its name and `resolution` (`None` for a Service).
    pub entry: Option<(Arc<str>, Resolution)>,
    pub vips: Vec<std::net::IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    pub binding: BindingInfo,
}

/// ServiceEntry `resolution` (istiod `convertResolution`: STATIC -> EDS, DNS -> STRICT_DNS,
/// DNS_ROUND_ROBIN -> LOGICAL_DNS, NONE -> ORIGINAL_DST).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Static,
    Dns,
    DnsRoundRobin,
    None,
    /// Wildcard hosts (`*.example.com`): each request goes to the address its `Host`
    /// resolves to (Envoy's dynamic forward proxy, [`DynamicDns`]).
    DynamicDns,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
            Resolution::None => "NONE",
            Resolution::DynamicDns => "DYNAMIC_DNS",
        }
    }
}

/// The names a DNS cluster's endpoints come from (ServiceEntry `resolution: DNS` or
/// `DNS_ROUND_ROBIN`): the proxy resolves them, refreshes them at their TTL and stores the
/// answers with [`Cluster::set_endpoints`]. Compiling does no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTargets {
    /// Each endpoint to resolve: the ServiceEntry's endpoints, else its host.
    pub names: Vec<DnsTarget>,
    /// `DNS_ROUND_ROBIN` (Envoy LOGICAL_DNS): only the first address of each answer is used.
    pub first_only: bool,
}

/// One name of a DNS cluster, with what its addresses inherit (Envoy's STRICT_DNS hosts take
/// their `LbEndpoint`'s weight and locality).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: Arc<str>,
    pub port: u16,
    /// See [`Endpoint::weight`].
    pub weight: u32,
    pub locality: Option<Arc<Locality>>,
    /// See [`EndpointSpec::label_rank`].
    pub label_rank: u8,
}

impl DnsTarget {
    /// An endpoint at `addr`, one of this name's addresses.
    pub fn endpoint(&self, addr: SocketAddr) -> EndpointSpec {
        EndpointSpec {
            weight: self.weight,
            locality: self.locality.clone(),
            label_rank: self.label_rank,
            ..EndpointSpec::new(addr, None, None)
        }
    }
}

/// Where a workload runs: Istio's locality `region/zone/subzone` (from a ServiceEntry
/// endpoint's or WorkloadEntry's `locality`, a Pod's `topology.istio.io/locality` label, or
/// the `zone` of its EndpointSlice endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// `None`: not known (an EndpointSlice gives the zone only); taken to be the proxy's
    /// region, as a Kubernetes cluster's zones are one region's.
    pub region: Option<String>,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// `region/zone/subzone` (missing parts empty), as Istio writes a locality in fields.
    pub fn parse(s: &str) -> Locality {
        Self::split(s, '/')
    }

    /// `region.zone.subzone`, as Istio writes it in a label value (no `/` allowed there).
    pub fn from_label(s: &str) -> Locality {
        Self::split(s, '.')
    }

    fn split(s: &str, sep: char) -> Locality {
        let mut parts = s.trim().splitn(3, sep);
        let mut next = || parts.next().unwrap_or("").to_string();
        Locality {
            region: Some(next()),
            zone: next(),
            subzone: next(),
        }
    }

    /// Only the zone is known (an EndpointSlice endpoint's `zone`).
    pub fn zone_only(zone: &str) -> Locality {
        Locality {
            region: None,
            zone: zone.to_string(),
            subzone: String::new(),
        }
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.region.as_deref().unwrap_or("?"),
            self.zone,
            self.subzone
        )
    }
}

/// A `localityLbSetting` (DestinationRule, else the Service's `trafficDistribution`, else
/// MeshConfig's, which is enabled by default), as Istio's `LocalityLoadBalancerSetting`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalitySetting {
    pub enabled: bool,
    /// Region `failover` pairs (from, to).
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`: label names, each optionally `label=value` (the value the proxy's
    /// is taken to be).
    pub failover_priority: Vec<String>,
    /// `distribute`: weights by locality for proxies in each `from`.
    pub distribute: Vec<LocalityDistribute>,
    /// Set by a Service's `trafficDistribution` (istiod `LocalityLBSettings.Force`): failover
    /// applies without outlier detection, and not-ready endpoints are kept as unhealthy hosts
    /// so levels spill over by readiness.
    pub force: bool,
}

impl Default for LocalitySetting {
    fn default() -> Self {
        LocalitySetting {
            enabled: true,
            failover: Vec::new(),
            failover_priority: Vec::new(),
            distribute: Vec::new(),
            force: false,
        }
    }
}

/// One `localityLbSetting.distribute` entry: from proxies in `from` (a locality pattern,
/// `region/zone/subzone` with a trailing `*`), requests go to the localities of `to` in
/// proportion to their weights (percent, summing to 100).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityDistribute {
    pub from: String,
    pub to: Vec<(String, u32)>,
}

/// Whether `locality` matches a locality pattern as istiod's `util.LocalityMatch` does: the
/// region equal or `*`; the zone and subzone equal, `*` or left out.
pub fn locality_matches(locality: &Locality, pattern: &str) -> bool {
    let mut parts = pattern.splitn(3, '/');
    let (region, zone, subzone) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let any = |rule: &str, value: &str| rule == "*" || rule.is_empty() || rule == value;
    (region == "*" || locality.region.as_deref().unwrap_or("") == region)
        && any(zone, &locality.zone)
        && any(subzone, &locality.subzone)
}

/// The Kubernetes label `failoverPriority` may name for the network; istiod skips a mismatch
/// on it when it is first (`applyFailoverPriorityPerLocality`) and adds a whole set of levels
/// instead.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// Locality load balancing on a cluster, as istiod renders it (`loadbalancer.go`):
/// - `distribute`: endpoints of the localities the proxy's entry names get those weights
///   (Envoy's locality-weighted load balancing); the others are dropped.
/// - else failover by priority levels: `failoverPriority` ranks each endpoint by the first of
///   the labels where it differs from the proxy (`applyFailoverPriorities`); locality ranks
///   it by how far its locality is from the proxy's (`applyLocalityFailover`, `LbPriority`:
///   0 same subzone, 1 same zone, 2 same region, 3 elsewhere, 4 a region that `failover` does
///   not name for the proxy's); with both, labels first. The levels present are then
///   numbered 0..N without gaps.
///
/// Failover applies only when the cluster has outlier detection (without it Envoy would never
/// leave priority 0) or the Service's `trafficDistribution` asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityLb {
    pub proxy: Locality,
    pub failover: Vec<(String, String)>,
    /// Whether locality ranks endpoints (false when `failoverPriority` is given without
    /// `failover`: istiod then ranks by labels only).
    pub by_locality: bool,
    /// `failoverPriority` labels with the value the proxy has for each (or the `=value`
    /// given); empty: no label ranking. Endpoints carry their rank
    /// ([`EndpointSpec::label_rank`], computed by [`LocalityLb::label_rank`]).
    pub failover_priority: Vec<(String, String)>,
    /// The `to` of the first `distribute` entry whose `from` matches the proxy.
    pub distribute: Option<Vec<(String, u32)>>,
    /// Service `trafficDistribution`: not-ready endpoints stay in the list as unhealthy hosts
    /// (istiod `SupportsUnhealthyEndpoints`), so a level's health follows readiness.
    pub unready_hosts: bool,
}

impl LocalityLb {
    /// The endpoint's locality with an unknown region taken to be the proxy's.
    fn resolve(&self, ep: Option<&Locality>) -> Locality {
        // No locality at all is Istio's empty locality (region ""), not an unknown region.
        match ep {
            None => Locality {
                region: Some(String::new()),
                ..Locality::default()
            },
            Some(l) => Locality {
                region: Some(
                    l.region
                        .clone()
                        .unwrap_or_else(|| self.proxy.region.clone().unwrap_or_default()),
                ),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            },
        }
    }

    fn raw_priority(&self, ep: Option<&Locality>) -> u8 {
        let ep = self.resolve(ep);
        let proxy_region = self.proxy.region.as_deref().unwrap_or("");
        let region = ep.region.as_deref().unwrap_or("");
        let p = if region == proxy_region {
            if ep.zone == self.proxy.zone {
                if ep.subzone == self.proxy.subzone {
                    0
                } else {
                    1
                }
            } else {
                2
            }
        } else {
            3
        };
        if p == 3
            && let Some((_, to)) = self.failover.iter().find(|(from, _)| from == proxy_region)
            && region != to
        {
            return 4;
        }
        p
    }

    /// An endpoint's `failoverPriority` rank (0 when every label matches the proxy's), as
    /// istiod's `applyFailoverPriorityPerLocality`: with n labels, a first mismatch at label
    /// j ranks n - j; a mismatch on the network label, when it is first, adds n instead and
    /// the other labels still count. `value` gives the endpoint's (augmented) label.
    pub fn label_rank(&self, value: &dyn Fn(&str) -> Option<String>) -> u8 {
        let n = self.failover_priority.len();
        let network_first = self
            .failover_priority
            .first()
            .is_some_and(|(l, _)| l == NETWORK_LABEL);
        let mut rank = 0;
        let mut adjust = 0;
        for (j, (label, proxy_value)) in self.failover_priority.iter().enumerate() {
            if value(label).as_deref().unwrap_or("") != proxy_value {
                if j == 0 && network_first {
                    adjust = n;
                    continue;
                }
                rank = n - j;
                break;
            }
        }
        (rank + adjust).min(u8::MAX as usize / 8) as u8
    }

    /// The priority of each endpoint (its locality and its label rank), numbered without
    /// gaps. All 0 with `distribute`.
    pub fn priorities(&self, endpoints: &[(Option<&Locality>, u8)]) -> Vec<u8> {
        if self.distribute.is_some() {
            return vec![0; endpoints.len()];
        }
        let raw: Vec<u16> = endpoints
            .iter()
            .map(|(l, rank)| {
                let by_locality = if self.by_locality {
                    self.raw_priority(*l)
                } else {
                    0
                };
                // istiod multiplies the label levels by 5 before adding the locality's.
                u16::from(*rank) * 5 + u16::from(by_locality)
            })
            .collect();
        let mut present: Vec<u16> = raw.clone();
        present.sort_unstable();
        present.dedup();
        raw.iter()
            .map(|p| present.iter().position(|q| q == p).unwrap_or(0) as u8)
            .collect()
    }

    /// With `distribute`: each endpoint's locality weight and locality group (the index of
    /// its locality among the list's), or `None` for an endpoint whose locality `to` does
    /// not name (istiod drops those). A pattern matching several localities shares its
    /// weight among them by their endpoint weights, rounded up (`applyLocalityWeights`).
    pub fn distribution(&self, endpoints: &[(Option<&Locality>, u32)]) -> Vec<Option<(u32, u16)>> {
        let Some(to) = &self.distribute else {
            return vec![None; endpoints.len()];
        };
        let resolved: Vec<Locality> = endpoints.iter().map(|(l, _)| self.resolve(*l)).collect();
        let mut groups: Vec<&Locality> = Vec::new();
        let group_of: Vec<u16> = resolved
            .iter()
            .map(|l| match groups.iter().position(|g| *g == l) {
                Some(i) => i as u16,
                None => {
                    groups.push(l);
                    (groups.len() - 1) as u16
                }
            })
            .collect();
        let pattern_of: Vec<Option<usize>> = resolved
            .iter()
            .map(|l| to.iter().position(|(p, _)| locality_matches(l, p)))
            .collect();
        // Each locality's original weight: the sum of its endpoints' weights; a pattern's
        // total: the weights of the localities it matched (a locality matches one pattern,
        // its endpoints sharing the locality).
        let mut group_weight = vec![0u64; groups.len()];
        let mut group_pattern = vec![None; groups.len()];
        for (i, (_, w)) in endpoints.iter().enumerate() {
            group_weight[group_of[i] as usize] += u64::from(*w);
            group_pattern[group_of[i] as usize] = pattern_of[i];
        }
        let mut pattern_total = vec![0u64; to.len()];
        for (g, p) in group_pattern.iter().enumerate() {
            if let Some(p) = p {
                pattern_total[*p] += group_weight[g];
            }
        }
        (0..endpoints.len())
            .map(|i| {
                let p = pattern_of[i]?;
                let g = group_of[i] as usize;
                let w = (group_weight[g] * u64::from(to[p].1)).div_ceil(pattern_total[p].max(1));
                (w > 0).then_some((w.min(u64::from(u32::MAX)) as u32, g as u16))
            })
            .collect()
    }
}

/// A `DYNAMIC_DNS` cluster (a wildcard ServiceEntry host), as istiod renders it for a
/// waypoint (`cluster_builder.go` `buildDFPCluster`, `listener_waypoint.go`
/// `buildRouteVHostDomains`): Envoy's dynamic forward proxy. The virtual host's one domain is
/// the wildcard host, so only a `Host` under it, without a port, is routed; the request then
/// goes to the first address that `Host` resolves to, on port 80 (443 when a DestinationRule
/// originates TLS, with the `Host` as SNI and the name checked), through a cache of resolved
/// names shared by the entry's ports (the proxy owns it). Compiling does no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicDns {
    /// `*.example.com`.
    pub wildcard: Arc<str>,
    /// Envoy's DNS cache name, `<host>_dfp_dns_cache` (istiod `BuildDNSCacheName`): the
    /// clusters of one host share it.
    pub cache: Arc<str>,
}

impl DynamicDns {
    pub fn new(wildcard: &str) -> DynamicDns {
        DynamicDns {
            wildcard: wildcard.into(),
            cache: format!("{wildcard}_dfp_dns_cache").into(),
        }
    }

    /// Whether `host` (a request's `Host`) is under the wildcard, as Envoy matches a virtual
    /// host's suffix domain: case-insensitive, at least one character before the suffix, and
    /// no port (istiod sets no `ignore_port_in_host_matching` here: `a.example.com:80` has no
    /// route).
    pub fn matches(&self, host: &str) -> bool {
        let suffix = &self.wildcard[1..];
        host.len() > suffix.len()
            && host.is_char_boundary(host.len() - suffix.len())
            && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    }
}

/// Outstanding-request counter of one endpoint, for least-request balancing.
/// The only interior mutability in a snapshot; it never affects compilation or matching.
#[derive(Debug, Default)]
pub struct EndpointLoad(AtomicUsize);

impl EndpointLoad {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One ready endpoint (pod IP + resolved target port).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub load: Arc<EndpointLoad>,
    /// `Some(spiffe identity)` when the endpoint is a pod in the ambient data plane: the
    /// waypoint reaches it over HBONE (mTLS to `ip:15008`, CONNECT `ip:targetPort`) and the
    /// pod's ztunnel presents this identity (protocol.md 1.8, 2.4). `None`: plaintext.
    pub tunnel: Option<Arc<str>>,
    /// The Pod behind the endpoint, when the configuration has it: the `destination_*`
    /// labels of Istio's metrics, which Istio's waypoint takes from the upstream endpoint's
    /// workload metadata (protocol.md 4.3). Shared by the endpoints of one workload.
    pub workload: Option<Arc<EndpointWorkload>>,
    /// Outlier detection state (kept across endpoint updates, like `load`).
    pub health: Arc<EndpointHealth>,
    /// Relative share of the requests (Envoy's `load_balancing_weight`, which istiod sets
    /// from a ServiceEntry endpoint's or WorkloadEntry's `weight`; 1 for every other
    /// endpoint, and for a weight of 0, as istiod renders it).
    pub weight: u32,
    /// Envoy's priority level (0 first): how far the endpoint's locality (or labels) is
    /// from the waypoint's, when the cluster fails over ([`LocalityLb`]); else 0.
    pub priority: u8,
    /// `false`: a not-ready endpoint kept as an unhealthy host (only with a Service's
    /// `trafficDistribution`, [`LocalityLb::unready_hosts`]); never chosen outside panic.
    pub ready: bool,
    /// With `distribute` ([`LocalityLb::distribution`]): the weight of the endpoint's
    /// locality (0: no locality weighting) and the locality's index among the list's.
    pub locality_weight: u32,
    pub locality_group: u16,
}

impl Endpoint {
    /// An endpoint of weight 1, ready, fresh counters, one priority (what a cluster without
    /// a locality policy holds).
    pub fn new(
        addr: SocketAddr,
        tunnel: Option<Arc<str>>,
        workload: Option<Arc<EndpointWorkload>>,
    ) -> Endpoint {
        Endpoint {
            addr,
            load: Arc::new(EndpointLoad::default()),
            tunnel,
            workload,
            health: Default::default(),
            weight: 1,
            priority: 0,
            ready: true,
            locality_weight: 0,
            locality_group: 0,
        }
    }
}

/// An endpoint's outlier-detection state (DestinationRule `outlierDetection`): consecutive
/// failures and, while ejected, until when (milliseconds on the proxy's clock; the caller
/// passes the time, this crate reads no clock).
#[derive(Debug, Default)]
pub struct EndpointHealth {
    pub consecutive_5xx: AtomicU32,
    pub consecutive_gateway: AtomicU32,
    /// 0: not ejected.
    pub ejected_until_ms: AtomicU64,
    /// Times ejected (the ejection time is `baseEjectionTime` times this).
    pub ejections: AtomicU32,
    /// When the balancer first saw the endpoint, on the proxy's clock (0: not yet), for
    /// DestinationRule warmup (slow start).
    pub added_ms: AtomicU64,
}

impl EndpointHealth {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > now_ms
    }
}

/// The workload of an endpoint's Pod, as the `destination_*` labels of Istio's metrics name it.
#[derive(Debug)]
pub struct EndpointWorkload {
    pub namespace: Arc<str>,
    pub names: crate::resources::WorkloadNames,
    /// `destination_principal`: the identity the upstream presents, i.e. the tunnel identity
    /// of an ambient Pod; `None` (rendered `unknown`) for a plaintext endpoint.
    pub principal: Option<Arc<str>>,
    /// Set once by whoever counts requests per destination (the proxy's metrics table), so a
    /// request finds its series by a number, not by hashing these names.
    pub metrics_id: std::sync::OnceLock<u64>,
}

impl PartialEq for EndpointWorkload {
    fn eq(&self, other: &Self) -> bool {
        self.namespace == other.namespace
            && self.names == other.names
            && self.principal == other.principal
    }
}

/// What an endpoint is made of before its load counter is attached.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub tunnel: Option<Arc<str>>,
    pub workload: Option<Arc<EndpointWorkload>>,
    /// See [`Endpoint::weight`].
    pub weight: u32,
    /// Where the endpoint runs, when known.
    pub locality: Option<Arc<Locality>>,
    /// Its `failoverPriority` rank ([`LocalityLb::label_rank`]); 0 without.
    pub label_rank: u8,
    /// See [`Endpoint::ready`].
    pub ready: bool,
}

impl EndpointSpec {
    /// An endpoint of weight 1 (every endpoint but a weighted ServiceEntry or WorkloadEntry
    /// one).
    pub fn new(
        addr: SocketAddr,
        tunnel: Option<Arc<str>>,
        workload: Option<Arc<EndpointWorkload>>,
    ) -> EndpointSpec {
        EndpointSpec {
            addr,
            tunnel,
            workload,
            weight: 1,
            locality: None,
            label_rank: 0,
            ready: true,
        }
    }
}

/// A pod this waypoint serves workload-addressed traffic for (`istio.io/waypoint-for`
/// `workload` or `all`; protocol.md 2.10): a CONNECT to its IP is proxied to the same
/// ip:port, over the `direct-http`/`direct-tcp` chains of Istio's waypoint.
#[derive(Debug, Clone)]
pub struct Workload {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// SPIFFE identity of the pod (its service account).
    pub identity: Arc<str>,
    /// Reached over HBONE (the pod is in the ambient data plane).
    pub ambient: bool,
    /// Its `destination_*` metric labels.
    pub labels: Arc<EndpointWorkload>,
}

/// An upstream cluster: one Service port, named the way istiod names it so access logs match
/// Envoy's: `inbound-vip|9080|http|reviews.default.svc.cluster.local` for Services bound to this
/// waypoint (`tcp` instead of `http` for TCP ports), `outbound|9080||x.ns.svc.cluster.local` otherwise.
#[derive(Debug)]
pub struct Cluster {
    /// Cluster name as Envoy's `%UPSTREAM_CLUSTER_RAW%` prints it.
    pub name: Arc<str>,
    /// Service FQDN, `reviews.default.svc.cluster.local`.
    pub hostname: Arc<str>,
    pub service_name: Arc<str>,
    pub service_namespace: Arc<str>,
    /// The Service port this cluster serves.
    pub port: u16,
    pub protocol: AppProtocol,
    /// Ready endpoints only (EndpointSlice `conditions.ready` absent or true), in a stable
    /// order. Swapped in place on endpoint churn ([`Snapshot::refresh_endpoints`]): endpoints
    /// change all day, routes and policies rarely, so a pod coming or going does not recompile
    /// the snapshot.
    pub(crate) endpoint_list: arc_swap::ArcSwap<Vec<Endpoint>>,
    /// The DestinationRule traffic policy of this cluster (`None`: Envoy's defaults).
    pub traffic: Option<Arc<crate::traffic::TrafficPolicy>>,
    /// A DNS cluster: the names its endpoints are resolved from (by the proxy).
    pub dns: Option<Arc<DnsTargets>>,
    /// ServiceEntry `resolution: NONE` (Envoy ORIGINAL_DST): the one endpoint of each
    /// tunnel is the address it was sent to (the CONNECT authority).
    pub passthrough: bool,
    /// ServiceEntry `resolution: DYNAMIC_DNS`: the endpoint of each request is what its
    /// `Host` resolves to.
    pub dynamic_dns: Option<Arc<DynamicDns>>,
    /// Locality failover (endpoints get priorities by locality); `None`: one priority.
    pub locality_lb: Option<Arc<LocalityLb>>,
}

impl Cluster {
    /// A copy whose one endpoint is `addr`: for a `passthrough` cluster (ServiceEntry
    /// `resolution: NONE`, Envoy ORIGINAL_DST) the address the tunnel was sent to, whichever
    /// route chose the cluster; for a `dynamic_dns` one the address the request's `Host`
    /// resolved to.
    pub fn original_destination(&self, addr: SocketAddr) -> Cluster {
        Cluster {
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            service_name: self.service_name.clone(),
            service_namespace: self.service_namespace.clone(),
            port: self.port,
            protocol: self.protocol,
            endpoint_list: arc_swap::ArcSwap::from_pointee(vec![Endpoint::new(addr, None, None)]),
            traffic: self.traffic.clone(),
            dns: None,
            passthrough: false,
            dynamic_dns: None,
            locality_lb: None,
        }
    }

    /// The endpoints now (lock-free: one reference count).
    pub fn endpoints(&self) -> Arc<Vec<Endpoint>> {
        self.endpoint_list.load_full()
    }

    /// Replace the endpoints if they differ (addresses, tunnel identities or workloads);
    /// endpoints that stay keep their load counters and their workload (so its metrics id).
    /// Returns whether anything changed.
    pub fn set_endpoints(&self, new: Vec<EndpointSpec>) -> bool {
        let current = self.endpoint_list.load();
        let list = endpoint_list(new, self.locality_lb.as_deref(), &current);
        let same = current.len() == list.len()
            && current.iter().zip(&list).all(|(e, n)| {
                e.addr == n.addr
                    && e.tunnel == n.tunnel
                    && e.weight == n.weight
                    && e.priority == n.priority
                    && e.ready == n.ready
                    && e.locality_weight == n.locality_weight
                    && e.locality_group == n.locality_group
                    && same_workload(&e.workload, &n.workload)
            });
        if same {
            return false;
        }
        self.endpoint_list.store(Arc::new(list));
        true
    }
}

fn same_workload(a: &Option<Arc<EndpointWorkload>>, b: &Option<Arc<EndpointWorkload>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        (None, None) => true,
        _ => false,
    }
}

/// Endpoints from their specs: the load counters and health of endpoints already in `old`
/// carry over (by address), priorities come from the cluster's locality failover.
pub(crate) fn endpoint_list(
    new: Vec<EndpointSpec>,
    locality_lb: Option<&LocalityLb>,
    old: &[Endpoint],
) -> Vec<Endpoint> {
    let (priorities, distribution) = match locality_lb {
        Some(lb) => {
            let ranked: Vec<(Option<&Locality>, u8)> = new
                .iter()
                .map(|n| (n.locality.as_deref(), n.label_rank))
                .collect();
            let weighted: Vec<(Option<&Locality>, u32)> = new
                .iter()
                .map(|n| (n.locality.as_deref(), n.weight))
                .collect();
            (lb.priorities(&ranked), lb.distribution(&weighted))
        }
        None => (Vec::new(), Vec::new()),
    };
    let distributing = locality_lb.is_some_and(|lb| lb.distribute.is_some());
    new.into_iter()
        .enumerate()
        // `distribute` drops the localities its `to` does not name.
        .filter(|(i, _)| !distributing || distribution.get(*i).is_some_and(Option::is_some))
        .map(|(i, n)| {
            let prev = old.iter().find(|e| e.addr == n.addr);
            let (locality_weight, locality_group) =
                distribution.get(i).copied().flatten().unwrap_or((0, 0));
            Endpoint {
                load: prev.map(|e| e.load.clone()).unwrap_or_default(),
                health: prev.map(|e| e.health.clone()).unwrap_or_default(),
                addr: n.addr,
                tunnel: n.tunnel,
                weight: n.weight,
                workload: match prev {
                    Some(e) if same_workload(&e.workload, &n.workload) => e.workload.clone(),
                    _ => n.workload,
                },
                priority: priorities.get(i).copied().unwrap_or(0),
                ready: n.ready,
                locality_weight,
                locality_group,
            }
        })
        .collect()
}

/// A Service port bound to this waypoint: the unit the CONNECT authority selects.
#[derive(Debug)]
pub struct ServicePort {
    /// The VIP:port this entry was found under (one per clusterIP in `clusterIPs`).
    pub vip: SocketAddr,
    /// `vip` as text, formatted once: every access-log line carries it
    /// (`downstream_local_address`).
    pub vip_text: String,
    pub protocol: AppProtocol,
    /// The Service's own cluster for this port (used when no HTTPRoute applies, and for TCP).
    pub cluster: Arc<Cluster>,
    /// HTTPRoutes attached to this Service port, pre-sorted; `None` = no HTTPRoute, use the
    /// default route (named `default`) to `cluster`.
    pub routes: Option<Arc<RouteTable>>,
    /// The TCPRoute for this (TCP or undeclared) port, if any; `None` = the Service's own
    /// cluster.
    pub tcp_route: Option<Arc<TcpRouteRule>>,
    /// TLSRoutes for this (TCP or undeclared) port: the proxy reads the ClientHello SNI and
    /// picks one; no match closes the connection (Envoy: no filter chain, `NR`).
    pub tls_routes: Option<Arc<TlsRoutes>>,
    /// The AuthorizationPolicies for this Service's traffic (waypoint-wide ones plus those
    /// attached to the Service); pass to [`crate::evaluate`]. Same as
    /// [`Snapshot::authz_for`] with the cluster's Service.
    pub authz: AuthzSet,
    /// The RequestAuthentication JWT rules for this Service's traffic (waypoint-wide plus
    /// Service-attached); pass to [`crate::authenticate`].
    pub authn: AuthnSet,
    /// Telemetry `accessLogging` for this Service's traffic; the default logs everything.
    pub access_log: AccessLogPolicy,
    /// Telemetry `tracing` for this Service's traffic (merged; MeshConfig fills the rest).
    pub tracing: crate::TracingPolicy,
    /// Telemetry `metrics` overrides for this Service's traffic; the default reports every
    /// istio_* metric with Istio's tags.
    pub metrics: crate::MetricsPolicy,
}

/// Result of looking up a CONNECT authority.
#[derive(Debug)]
pub enum VipLookup {
    /// A Service port bound to this waypoint.
    Bound(Arc<ServicePort>),
    /// A known Service VIP:port that this waypoint does not serve; the reason is for logs.
    NotBound(String),
    /// No Service has this address.
    Unknown,
}

/// The compiled, immutable configuration. Built only by [`compile`]; swapped whole on reload.
#[derive(Debug)]
pub struct Snapshot {
    pub gateway: GatewayInfo,
    pub trust_domain: Arc<str>,
    /// Bound Service ports by VIP:port.
    pub(crate) bound: HashMap<SocketAddr, Arc<ServicePort>>,
    /// ServiceEntry address ranges (`spec.addresses` CIDRs, with `resolution: NONE`): (range,
    /// port, the port served); tried in order when no exact VIP:port matches. Bounded by the
    /// configuration.
    pub(crate) bound_ranges: Vec<(ipnet::IpNet, u16, Arc<ServicePort>)>,
    /// Known-but-not-bound VIP:ports, with the reason (for logs and `waypoint check`).
    pub(crate) not_bound: HashMap<SocketAddr, String>,
    /// Every cluster, by name (for admin dumps and tests).
    pub(crate) clusters: HashMap<Arc<str>, Arc<Cluster>>,
    /// AuthorizationPolicies attached to this waypoint.
    pub(crate) authz: AuthzIndex,
    /// RequestAuthentications attached to this waypoint.
    pub(crate) authn: AuthnIndex,
    /// Pods bound to this waypoint for workload traffic, by IP.
    pub(crate) workloads: HashMap<std::net::IpAddr, Arc<Workload>>,
    /// Telemetry (access logging) attached to this waypoint.
    pub(crate) telemetry: TelemetryIndex,
    /// Every Service, with how its waypoint binding was decided (for `waypoint services`).
    pub(crate) services: Vec<Arc<ServiceInfo>>,
    /// Clusters of the MeshConfig extension providers, by (service as written, port).
    pub(crate) extension_clusters: HashMap<(String, u16), Arc<Cluster>>,
    /// Non-fatal findings (unknown kinds skipped, routes whose parent is not bound, ...).
    pub warnings: Vec<String>,
    /// Every resource compiled in: (kind, namespace/name, where it came from), for dumps.
    pub resources: Vec<(String, String, crate::load::ResourceSource)>,
    /// A ServiceEntry selects Pods (`workloadSelector`): a Pod change needs a compile, not
    /// only an endpoint refresh.
    pub(crate) selects_pods: bool,
}

impl Snapshot {
    /// Find what a CONNECT `:authority` (already parsed to ip:port) designates.
    pub fn lookup_vip(&self, addr: SocketAddr) -> VipLookup {
        if let Some(sp) = self.bound.get(&addr) {
            return VipLookup::Bound(sp.clone());
        }
        if let Some((_, _, sp)) = self
            .bound_ranges
            .iter()
            .find(|(net, port, _)| *port == addr.port() && net.contains(&addr.ip()))
        {
            // The tunnel's own address is its destination (NONE: Envoy's ORIGINAL_DST).
            return VipLookup::Bound(Arc::new(ServicePort {
                vip: addr,
                vip_text: addr.to_string(),
                protocol: sp.protocol,
                cluster: sp.cluster.clone(),
                routes: sp.routes.clone(),
                tcp_route: sp.tcp_route.clone(),
                tls_routes: sp.tls_routes.clone(),
                authz: sp.authz.clone(),
                authn: sp.authn.clone(),
                access_log: sp.access_log.clone(),
                tracing: sp.tracing.clone(),
                metrics: sp.metrics.clone(),
            }));
        }
        if let Some(reason) = self.not_bound.get(&addr) {
            return VipLookup::NotBound(reason.clone());
        }
        if let Some(w) = self.workloads.get(&addr.ip()) {
            return VipLookup::Bound(self.direct_port(addr, w));
        }
        VipLookup::Unknown
    }

    /// Workload-addressed traffic: a one-endpoint target for the pod itself, on the port the
    /// client dialed, named like Istio's `encap` cluster; protocol sniffed; only waypoint-wide
    /// policies apply (Service-attached ones concern Service traffic).
    fn direct_port(&self, addr: SocketAddr, w: &Workload) -> Arc<ServicePort> {
        Arc::new(ServicePort {
            vip: addr,
            vip_text: addr.to_string(),
            protocol: AppProtocol::Unknown,
            cluster: Arc::new(Cluster {
                name: "encap".into(),
                hostname: "unknown".into(),
                service_name: "unknown".into(),
                service_namespace: w.namespace.clone(),
                port: addr.port(),
                protocol: AppProtocol::Unknown,
                endpoint_list: arc_swap::ArcSwap::from_pointee(vec![Endpoint::new(
                    addr,
                    w.ambient.then(|| w.identity.clone()),
                    Some(w.labels.clone()),
                )]),
                traffic: None,
                dns: None,
                passthrough: false,
                dynamic_dns: None,
                locality_lb: None,
            }),
            routes: None,
            tcp_route: None,
            tls_routes: None,
            authz: self.authz.for_service("", ""),
            authn: self.authn.for_service("", ""),
            access_log: self.telemetry.for_service("", ""),
            tracing: self.telemetry.tracing_for("", ""),
            metrics: self.telemetry.metrics_for("", ""),
        })
    }

    /// Pods served for workload traffic, sorted by IP.
    pub fn workloads(&self) -> Vec<(std::net::IpAddr, Arc<Workload>)> {
        let mut v: Vec<_> = self
            .workloads
            .iter()
            .map(|(ip, w)| (*ip, w.clone()))
            .collect();
        v.sort_by_key(|(ip, _)| *ip);
        v
    }

    /// Every bound Service port, sorted by VIP:port.
    pub fn bound_services(&self) -> Vec<Arc<ServicePort>> {
        let mut v: Vec<_> = self.bound.values().cloned().collect();
        v.sort_by_key(|s| s.vip);
        v
    }

    /// Every Service in the configuration, sorted by namespace and name, with how its
    /// waypoint binding was decided.
    pub fn services(&self) -> &[Arc<ServiceInfo>] {
        &self.services
    }

    /// The Service that owns a VIP:port (bound here or not).
    pub fn service_at(&self, addr: SocketAddr) -> Option<Arc<ServiceInfo>> {
        self.services
            .iter()
            .find(|s| s.vips.contains(&addr.ip()) && s.ports.iter().any(|p| p.port == addr.port()))
            .cloned()
    }

    /// The access-log policy (Telemetry) for Service `namespace/name`'s traffic.
    pub fn access_log_for(&self, service_namespace: &str, service_name: &str) -> AccessLogPolicy {
        self.telemetry.for_service(service_namespace, service_name)
    }

    /// The tracing policy (Telemetry) for Service `namespace/name`'s traffic.
    pub fn tracing_for(&self, service_namespace: &str, service_name: &str) -> crate::TracingPolicy {
        self.telemetry.tracing_for(service_namespace, service_name)
    }

    /// The metrics overrides (Telemetry) for Service `namespace/name`'s traffic.
    pub fn metrics_for(&self, service_namespace: &str, service_name: &str) -> crate::MetricsPolicy {
        self.telemetry.metrics_for(service_namespace, service_name)
    }

    /// `Telemetry ns/name` of every Telemetry that applies to this waypoint, sorted.
    pub fn telemetries(&self) -> &[String] {
        &self.telemetry.applied
    }

    /// Every cluster, sorted by name.
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<_> = self.clusters.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.get(name).cloned()
    }

    /// The AuthorizationPolicies that apply to traffic for Service `namespace/name` through
    /// this waypoint: those attached to the waypoint's Gateway (or GatewayClass
    /// `istio-waypoint` from the root namespace) plus those attached to the Service. Cheap (one
    /// map lookup, an `Arc` clone); cost of [`crate::evaluate`] depends only on these policies.
    pub fn authz_for(&self, service_namespace: &str, service_name: &str) -> AuthzSet {
        self.authz.for_service(service_namespace, service_name)
    }

    /// Every AuthorizationPolicy attached to this waypoint (its Gateway, or GatewayClass
    /// `istio-waypoint` from the root namespace) or to a Service, sorted by namespace and name
    /// (for admin dumps and `waypoint check`).
    pub fn authz_policies(&self) -> &[Arc<AuthzPolicy>] {
        &self.authz.policies
    }

    /// The RequestAuthentication JWT rules for traffic to Service `namespace/name` (attached
    /// to the waypoint or to the Service), like [`Snapshot::authz_for`].
    pub fn authn_for(&self, service_namespace: &str, service_name: &str) -> AuthnSet {
        self.authn.for_service(service_namespace, service_name)
    }

    /// `<namespace>/<name>` of every RequestAuthentication attached here, sorted.
    pub fn request_authentications(&self) -> &[Arc<str>] {
        &self.authn.policies
    }

    /// Every remote key set (`jwksUri`, or OpenID discovery) an attached rule needs: what the
    /// proxy keeps fetched.
    pub fn remote_jwks(&self) -> &[JwksRef] {
        &self.authn.remote_jwks
    }

    /// The cluster of an extension provider's `service` and `port` (as given in
    /// [`CompileOptions::extension_services`]); `None` when it names no known Service port.
    pub fn extension_cluster(&self, service: &str, port: u16) -> Option<Arc<Cluster>> {
        self.extension_clusters
            .get(&(service.to_string(), port))
            .cloned()
    }
}

impl Snapshot {
    /// Endpoint churn without a recompile: `partial` holds the Services whose endpoints
    /// changed, with their EndpointSlices, the Pods those name and the Namespaces; every
    /// cluster of those Services (bound, outbound and extension-provider clusters) gets its
    /// endpoints recomputed exactly as [`compile`] computes them, and swapped in place. Routes,
    /// policies and requests in flight are untouched. Returns the clusters that changed.
    ///
    /// A change that is not only endpoints (a Service's ports or labels, a Pod's workload
    /// binding) needs [`compile`].
    /// A ServiceEntry's `workloadSelector` picks Pods: Pod changes can change its endpoints,
    /// which only a compile recomputes.
    pub fn selects_pods(&self) -> bool {
        self.selects_pods
    }

    pub fn refresh_endpoints(&self, partial: &LoadedResources, options: &CompileOptions) -> usize {
        crate::compiler::refresh_endpoints(self, partial, options)
    }
}

/// Compile loaded resources into a snapshot, or return every error found.
pub fn compile(
    resources: &LoadedResources,
    options: &CompileOptions,
) -> Result<Snapshot, Vec<ConfigError>> {
    crate::compiler::compile(resources, options)
}
