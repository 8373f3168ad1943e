//! The body of [`crate::compile`]: resources -> [`Snapshot`].
//!
//! Order of work: index the resources, find our Gateway, validate every Service and
//! EndpointSlice, decide which Services are bound to this waypoint (Istio `waypoints.go`
//! `fetchWaypointForTarget`), compile every HTTPRoute (validated even when it attaches to
//! nothing, so errors do not depend on labels), then assemble the VIP index. Errors never stop
//! the walk: every resource is checked and all errors are returned together.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::ConfigError;
use crate::authn::AuthnIndex;
use crate::authz::AuthzIndex;
use crate::load::LoadedResources;
use crate::resources::{
    Gateway, GatewayClass, HeaderModifierSpec, HttpBackendRef, HttpRoute, HttpRouteFilter,
    HttpRouteMatch, HttpRouteRule, HttpValueMatch, IntOrString, LabelSelector, Labels, MirrorSpec,
    ObjectMeta, ParentReference, PathModifierSpec, RedirectSpec, ReferenceGrant, Resource, Service,
    ServicePortSpec, TcpRoute, TlsRoute, WorkloadNames,
};
use crate::route::{
    Backend, BackendRef, Filters, HeaderMatch, HeaderModifier, MatchKind, Mirror, PathMatch,
    PathModifier, Precedence, QueryMatch, Redirect, RetryPolicy, Rewrite, RouteMatch, RouteRule,
    RouteTable, TcpRouteRule, TlsRoutes, WeightedBackends,
};
use crate::snapshot::{
    AppProtocol, BindingInfo, BindingSource, BindingState, Cluster, CompileOptions, GatewayInfo,
    ServiceInfo, ServicePort, ServicePortInfo, Snapshot, WaypointFor,
};
use crate::snapshot::{EndpointSpec, EndpointWorkload, Workload};

const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Istio 1.31 weighted waypoint canary (the weight is ztunnel's business).
const USE_WAYPOINT_CANARY: &str = "istio.io/use-waypoint-canary";
const USE_WAYPOINT_CANARY_NAMESPACE: &str = "istio.io/use-waypoint-canary-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Set on the Service of every Gateway API gateway; waypoints never get a waypoint.
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// `ambient` puts a pod (or every pod of a namespace) in the ambient data plane.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Gateway API caps a backendRef weight at 1,000,000 (`shared_types.go`).
const MAX_WEIGHT: i64 = 1_000_000;

/// Which namespaces the waypoint admits (`allowedRoutes.namespaces` of its `mesh` listener,
/// Istio `AllowsAttachmentFromNamespace`).
enum Allowed {
    Same,
    All,
    Selector(LabelSelector),
}

/// A validated Service, or one host of a validated ServiceEntry (istiod makes one service of
/// each host: `serviceentry/conversion.go` `convertServices`).
struct Svc {
    vips: Vec<IpAddr>,
    /// Address ranges (ServiceEntry CIDRs with `resolution: NONE`).
    ranges: Vec<ipnet::IpNet>,
    ports: Vec<SvcPort>,
    /// `Ok` = bound to this waypoint; `Err` = why not.
    binding: Result<(), String>,
    /// The same decision with the label that made it (for `waypoint services`).
    info: BindingInfo,
    /// `name.namespace.svc.<domain>`; a ServiceEntry's host.
    hostname: String,
    /// A ServiceEntry host: where its endpoints come from.
    entry: Option<EntryPlan>,
    /// `spec.trafficDistribution` (else the `networking.istio.io/traffic-distribution`
    /// annotation on it or its namespace).
    traffic_distribution: TrafficDistribution,
}

/// A Service's traffic distribution, as istiod reads it (`model.GetTrafficDistribution`):
/// `PreferClose`/`PreferSameZone` fail over by network, region, zone; `PreferSameNode` also
/// by subzone and node; both without outlier detection, by endpoint readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrafficDistribution {
    Any,
    PreferSameZone,
    PreferSameNode,
}

/// The annotation istiod accepts where the `trafficDistribution` field is not available
/// (ServiceEntries, namespaces, older clusters).
const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";

impl TrafficDistribution {
    /// From the Service's field, else its annotation, else its namespace's annotation.
    /// An unknown annotation value is `Any` (istiod logs and ignores it).
    fn of(spec: Option<&str>, svc: &ObjectMeta, ns: Option<&ObjectMeta>) -> TrafficDistribution {
        match spec {
            Some("PreferClose") | Some("PreferSameZone") => {
                return TrafficDistribution::PreferSameZone;
            }
            Some("PreferSameNode") => return TrafficDistribution::PreferSameNode,
            _ => {}
        }
        let annotation = |m: &ObjectMeta| {
            m.annotations
                .get(TRAFFIC_DISTRIBUTION_ANNOTATION)
                .filter(|v| !v.is_empty())
                .map(|v| match v.to_ascii_lowercase().as_str() {
                    "preferclose" | "prefersamezone" => TrafficDistribution::PreferSameZone,
                    "prefersamenode" => TrafficDistribution::PreferSameNode,
                    _ => TrafficDistribution::Any,
                })
        };
        annotation(svc)
            .or_else(|| ns.and_then(annotation))
            .unwrap_or(TrafficDistribution::Any)
    }

    /// The locality setting it stands for (istiod `GetEffectiveLbSetting`), if any.
    fn setting(self) -> Option<crate::snapshot::LocalitySetting> {
        let labels: &[&str] = match self {
            TrafficDistribution::Any => return None,
            TrafficDistribution::PreferSameZone => &[
                crate::snapshot::NETWORK_LABEL,
                "topology.kubernetes.io/region",
                "topology.kubernetes.io/zone",
            ],
            TrafficDistribution::PreferSameNode => &[
                crate::snapshot::NETWORK_LABEL,
                "topology.kubernetes.io/region",
                "topology.kubernetes.io/zone",
                "topology.istio.io/subzone",
                "kubernetes.io/hostname",
            ],
        };
        Some(crate::snapshot::LocalitySetting {
            failover_priority: labels.iter().map(|l| l.to_string()).collect(),
            force: true,
            ..Default::default()
        })
    }
}

/// The endpoints of one ServiceEntry host.
struct EntryPlan {
    name: String,
    resolution: crate::snapshot::Resolution,
    /// `spec.endpoints`, validated for the resolution (IPs for STATIC; IPs or host names for
    /// DNS).
    endpoints: Vec<EntryEndpoint>,
    /// `spec.workloadSelector`: the entry's namespace and the labels its Pods and
    /// WorkloadEntries must carry.
    selector: Option<(String, BTreeMap<String, String>)>,
}

/// One of a ServiceEntry's `spec.endpoints`.
#[derive(Clone)]
struct EntryEndpoint {
    address: String,
    /// `locality` (`region/zone/subzone`).
    locality: Option<Arc<crate::snapshot::Locality>>,
    /// Port name -> the endpoint's port for it.
    ports: BTreeMap<String, u16>,
    /// `weight` (Envoy `load_balancing_weight`; 0 and unset are 1, as istiod renders them).
    weight: u32,
    /// `labels` and `network` (for `failoverPriority`).
    labels: BTreeMap<String, String>,
    network: Option<String>,
}

struct SvcPort {
    /// Empty when unnamed.
    name: String,
    port: u16,
    /// Numeric `targetPort` (defaults to `port`); `None` for a named target port.
    target: Option<u16>,
    protocol: AppProtocol,
}

/// A validated WorkloadEntry.
struct WorkloadEntryInfo<'a> {
    meta: &'a ObjectMeta,
    labels: &'a BTreeMap<String, String>,
    ip: IpAddr,
    ports: BTreeMap<String, u16>,
    weight: u32,
    locality: Option<Arc<crate::snapshot::Locality>>,
    network: Option<&'a str>,
}

/// A validated EndpointSlice.
struct Slice {
    /// (port name, empty when unnamed; port number).
    ports: Vec<(String, Option<u16>)>,
    /// Its ready addresses, and the not-ready ones that are not terminating (istiod's
    /// `UnHealthy`, kept for Services with a `trafficDistribution`).
    endpoints: Vec<SliceEndpoint>,
}

/// One address of an EndpointSlice.
struct SliceEndpoint {
    ip: IpAddr,
    /// The Pod its `targetRef` names.
    pod: Option<(String, String)>,
    /// Its endpoint's `zone`.
    zone: Option<Arc<crate::snapshot::Locality>>,
    /// Its endpoint's `nodeName` (the `kubernetes.io/hostname` istiod gives the endpoint).
    node: Option<Arc<str>>,
    ready: bool,
}

/// A Pod, as far as the data plane cares.
struct PodInfo<'a> {
    meta: &'a ObjectMeta,
    ips: Vec<IpAddr>,
    service_account: String,
}

/// One parsed backendRef: where it points (or why it cannot be used) and its weight.
struct BackendPlan<'a> {
    target: Result<(SvcKey<'a>, u16), String>,
    weight: u32,
    filters: FilterPlan<'a>,
}

/// A mirror target before resolution: (target, numerator, denominator).
type MirrorPlan<'a> = (Result<(SvcKey<'a>, u16), String>, u32, u32);

/// Parsed filters; mirrors are resolved to clusters once the route's parents are known.
#[derive(Default)]
struct FilterPlan<'a> {
    filters: Filters,
    mirrors: Vec<MirrorPlan<'a>>,
}

/// A compiled rule before its backends are resolved.
struct RulePlan<'a> {
    name: Arc<str>,
    matches: Vec<RouteMatch>,
    backends: Vec<BackendPlan<'a>>,
    filters: FilterPlan<'a>,
    /// A filter we cannot apply: every request of the rule gets 500.
    invalid_filter: bool,
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
}

type SvcKey<'a> = (&'a str, &'a str);
/// (namespace, workload names, principal) of an endpoint's Pod.
type WorkloadKey = (String, WorkloadNames, Option<Arc<str>>);
type Candidates = Vec<(Precedence, RouteMatch, Arc<RouteRule>)>;
/// ((absent timestamp, timestamp, namespace/name), rule) of TCPRoutes on one port.
type TcpCandidates = Vec<((bool, String, String), Arc<TcpRouteRule>)>;
/// TLSRoutes on one port: (order key, host names, rule).
type TlsCandidates = Vec<((bool, String, String), Vec<String>, Arc<TcpRouteRule>)>;

struct Compiler<'a> {
    opts: &'a CompileOptions,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    namespaces: HashMap<&'a str, &'a ObjectMeta>,
    services: BTreeMap<SvcKey<'a>, Svc>,
    /// By (namespace, `kubernetes.io/service-name`).
    slices: HashMap<SvcKey<'a>, Vec<Slice>>,
    clusters: HashMap<(String, String, u16), Arc<Cluster>>,
    pods: HashMap<SvcKey<'a>, PodInfo<'a>>,
    pods_by_ip: HashMap<IpAddr, SvcKey<'a>>,
    /// DestinationRules, compiled (applied as clusters are built).
    traffic_rules: Vec<crate::traffic::CompiledRule>,
    /// Endpoint workloads made so far (one per workload and principal).
    endpoint_workloads: RefCell<HashMap<WorkloadKey, Arc<EndpointWorkload>>>,
    /// ServiceEntries by (namespace, name): the keys `(namespace, host)` of their hosts.
    entries: HashMap<SvcKey<'a>, Vec<SvcKey<'a>>>,
    /// Every ReferenceGrant (cross-namespace backendRefs).
    grants: Vec<&'a ReferenceGrant>,
    /// Every valid WorkloadEntry: (namespace, labels, address, port name -> port).
    workload_entries: Vec<WorkloadEntryInfo<'a>>,
    /// Kind of the route being compiled (`HTTPRoute`, `GRPCRoute`, `TCPRoute`), for errors.
    route_kind: &'static str,
    /// The zone of our own Pod's EndpointSlice endpoint (ready or not: a waypoint is not
    /// ready before its first compile).
    own_zone: Option<String>,
    /// The waypoint's locality for locality failover ([`CompileOptions::locality`], else
    /// found from its own Pod); set once Pods and slices are indexed.
    proxy_locality: Option<crate::snapshot::Locality>,
}

fn error(
    kind: &str,
    meta: &ObjectMeta,
    field: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError {
        kind: kind.into(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        field: field.into(),
        message: message.into(),
    }
}

fn id(meta: &ObjectMeta) -> String {
    format!("{}/{}", meta.namespace, meta.name)
}

/// A Kubernetes port number (1..=65535).
fn port_number(p: i64) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// [`Snapshot::refresh_endpoints`]: index the partial resources as [`compile`] does (Services,
/// EndpointSlices, Pods, Namespaces) and recompute the endpoints of every cluster of the
/// Services present. Problems in the partial input were or will be reported by a full compile;
/// here a Service that does not validate keeps its endpoints.
pub(crate) fn refresh_endpoints(
    snapshot: &Snapshot,
    partial: &LoadedResources,
    options: &CompileOptions,
) -> usize {
    let mut c = Compiler {
        opts: options,
        errors: Vec::new(),
        warnings: Vec::new(),
        namespaces: HashMap::new(),
        services: BTreeMap::new(),
        slices: HashMap::new(),
        clusters: HashMap::new(),
        pods: HashMap::new(),
        pods_by_ip: HashMap::new(),
        traffic_rules: Vec::new(),
        endpoint_workloads: RefCell::default(),
        entries: HashMap::new(),
        grants: Vec::new(),
        workload_entries: Vec::new(),
        route_kind: "HTTPRoute",
        own_zone: None,
        proxy_locality: None,
    };
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for r in &partial.resources {
        match r {
            Resource::Namespace(n) => {
                c.namespaces.insert(n.metadata.name.as_str(), &n.metadata);
            }
            Resource::Service(s) => services.push(s),
            Resource::Pod(p) => c.pod(p),
            Resource::EndpointSlice(s) => slices.push(s),
            _ => {}
        }
    }
    // Binding does not change endpoints; the Gateway is the snapshot's.
    let info = snapshot.gateway.clone();
    let mut vip_owner = HashMap::new();
    for s in services {
        let svc = c.service(s, &info, &Allowed::All, true, &mut vip_owner);
        let key = (s.metadata.namespace.as_str(), s.metadata.name.as_str());
        c.services.insert(key, svc);
    }
    for s in slices {
        c.slice(s);
    }
    // The clusters of the Services present, found by the names istiod gives them (no walk
    // over every cluster), plus the extension providers' (few).
    let mut changed = 0;
    let mut refresh = |cluster: &Arc<Cluster>| {
        let key = (&*cluster.service_namespace, &*cluster.service_name);
        if let Some(addrs) = c.endpoint_addrs(key, cluster.port, cluster.locality_lb.as_deref())
            && cluster.set_endpoints(addrs)
        {
            changed += 1;
        }
    };
    for ((ns, name), svc) in &c.services {
        let host = format!("{name}.{ns}.svc.{}", options.cluster_domain);
        for p in &svc.ports {
            for cluster_name in [
                format!("inbound-vip|{}|http|{host}", p.port),
                format!("inbound-vip|{}|tcp|{host}", p.port),
                format!("outbound|{}||{host}", p.port),
            ] {
                if let Some(cluster) = snapshot.clusters.get(cluster_name.as_str()) {
                    refresh(cluster);
                }
            }
        }
    }
    for cluster in snapshot.extension_clusters.values() {
        refresh(cluster);
    }
    changed
}

pub(crate) fn compile(
    resources: &LoadedResources,
    options: &CompileOptions,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut c = Compiler {
        opts: options,
        errors: Vec::new(),
        warnings: resources.warnings.clone(),
        namespaces: HashMap::new(),
        services: BTreeMap::new(),
        slices: HashMap::new(),
        clusters: HashMap::new(),
        pods: HashMap::new(),
        pods_by_ip: HashMap::new(),
        traffic_rules: Vec::new(),
        endpoint_workloads: RefCell::default(),
        entries: HashMap::new(),
        grants: Vec::new(),
        workload_entries: Vec::new(),
        route_kind: "HTTPRoute",
        own_zone: None,
        proxy_locality: None,
    };

    // Index, rejecting duplicates (the later definition is the error).
    let Indexed {
        gateways,
        classes,
        services,
        slices,
        routes,
        policies,
        request_authns,
        tcp_routes,
        tls_routes,
        telemetries,
        destination_rules,
        service_entries,
        secrets,
    } = c.index(resources);

    let ours = gateways.iter().find(|g| {
        g.metadata.namespace == options.gateway_namespace && g.metadata.name == options.gateway_name
    });
    let (info, allowed) = c.our_gateway(ours.copied(), &gateways, &classes);

    // Services, in load order so a duplicate VIP:port is reported on the later Service.
    let mut vip_owner = HashMap::new();
    for s in services {
        let svc = c.service(s, &info, &allowed, ours.is_some(), &mut vip_owner);
        let key = (s.metadata.namespace.as_str(), s.metadata.name.as_str());
        c.services.insert(key, svc);
    }
    for e in service_entries {
        c.service_entry(e, &info, &allowed, ours.is_some(), &mut vip_owner);
    }
    for s in slices {
        c.slice(s);
    }
    c.proxy_locality = c.find_proxy_locality();
    c.destination_rules(&destination_rules, &secrets);
    let mut tables = HashMap::new();
    for r in routes {
        c.route(r, &mut tables);
    }
    let mut tcp_tables = HashMap::new();
    for r in tcp_routes {
        c.tcp_route(r, &mut tcp_tables);
    }
    let mut tls_tables = HashMap::new();
    for r in tls_routes {
        c.tls_route(r, &mut tls_tables);
    }
    let (services_ref, entries_ref) = (&c.services, &c.entries);
    let service_exists = |ns: &str, name: &str| {
        services_ref
            .get(&(ns, name))
            .is_some_and(|s| s.entry.is_none())
    };
    let entry_hosts = |ns: &str, name: &str| {
        entries_ref
            .get(&(ns, name))
            .map(|keys| keys.iter().map(|k| k.1.to_string()).collect())
    };
    let targets = crate::authz::TargetIndex {
        service_exists: &service_exists,
        entry_hosts: &entry_hosts,
    };
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let authz =
        crate::authz::compile_policies(&policies, options, &targets, &mut errors, &mut warnings);
    let authn = crate::authn::compile_request_authentications(
        &request_authns,
        options,
        &targets,
        &mut errors,
        &mut warnings,
    );
    let telemetry = crate::telemetry::compile_telemetry(
        &telemetries,
        options,
        &targets,
        &mut errors,
        &mut warnings,
    );
    c.errors.append(&mut errors);
    c.warnings.append(&mut warnings);
    let (bound, not_bound, bound_ranges) =
        c.vip_index(tables, tcp_tables, tls_tables, &authz, &authn, &telemetry);
    let services = c.service_infos();
    let workloads = c.workloads(&info, &allowed);
    let extension_clusters = c.extension_clusters();

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let selects_pods = c
        .services
        .values()
        .any(|s| s.entry.as_ref().is_some_and(|e| e.selector.is_some()));
    let clusters = c.clusters.into_values();
    Ok(Snapshot {
        selects_pods,
        gateway: info,
        trust_domain: options.trust_domain.as_str().into(),
        bound,
        bound_ranges,
        not_bound,
        clusters: clusters.map(|cl| (cl.name.clone(), cl)).collect(),
        authz,
        authn,
        telemetry,
        services,
        workloads,
        resources: resource_list(resources),
        extension_clusters,
        warnings: c.warnings,
    })
}

/// The resources of one compile, by kind, borrowed from the input.
#[derive(Default)]
struct Indexed<'a> {
    gateways: Vec<&'a Gateway>,
    classes: HashMap<&'a str, &'a GatewayClass>,
    services: Vec<&'a Service>,
    slices: Vec<&'a crate::resources::EndpointSlice>,
    routes: Vec<&'a HttpRoute>,
    policies: Vec<&'a crate::resources::AuthorizationPolicy>,
    request_authns: Vec<&'a crate::resources::RequestAuthentication>,
    tcp_routes: Vec<&'a TcpRoute>,
    tls_routes: Vec<&'a TlsRoute>,
    telemetries: Vec<&'a crate::resources::Telemetry>,
    destination_rules: Vec<&'a crate::resources::DestinationRule>,
    service_entries: Vec<&'a crate::resources::ServiceEntry>,
    secrets: HashMap<SvcKey<'a>, &'a crate::resources::Secret>,
}

impl<'a> Compiler<'a> {
    /// Sort the resources by kind (Namespaces, Pods, grants and WorkloadEntries straight into
    /// the compiler's indexes), rejecting a kind/namespace/name defined twice (the later one
    /// is the error).
    fn index(&mut self, resources: &'a LoadedResources) -> Indexed<'a> {
        let mut seen = HashSet::new();
        let mut ix = Indexed::default();
        for r in &resources.resources {
            let Some(meta) = r.metadata() else { continue };
            if !seen.insert((r.kind(), meta.namespace.as_str(), meta.name.as_str())) {
                let e = error(r.kind(), meta, "metadata.name", "defined more than once");
                self.errors.push(e);
                continue;
            }
            match r {
                Resource::Namespace(n) => {
                    self.namespaces
                        .insert(n.metadata.name.as_str(), &n.metadata);
                }
                Resource::Service(s) => ix.services.push(s),
                Resource::Pod(p) => self.pod(p),
                Resource::EndpointSlice(s) => ix.slices.push(s),
                Resource::Gateway(g) => ix.gateways.push(g),
                Resource::GatewayClass(g) => {
                    ix.classes.insert(g.metadata.name.as_str(), g);
                }
                Resource::HttpRoute(h) | Resource::GrpcRoute(h) => ix.routes.push(h),
                Resource::TcpRoute(t) => ix.tcp_routes.push(t),
                Resource::TlsRoute(t) => ix.tls_routes.push(t),
                Resource::ReferenceGrant(g) => self.grants.push(g),
                Resource::AuthorizationPolicy(p) => ix.policies.push(p),
                Resource::RequestAuthentication(p) => ix.request_authns.push(p),
                Resource::Telemetry(t) => ix.telemetries.push(t),
                Resource::DestinationRule(d) => ix.destination_rules.push(d),
                Resource::ServiceEntry(e) => ix.service_entries.push(&**e),
                Resource::WorkloadEntry(w) => self.workload_entry(w),
                Resource::Secret(s) => {
                    ix.secrets
                        .insert((s.metadata.namespace.as_str(), s.metadata.name.as_str()), s);
                }
                Resource::Unknown { .. } => {}
            }
        }
        ix
    }

    /// This waypoint's Gateway (`--gateway`): what it serves and which namespaces it admits;
    /// an error naming the Gateways found when it is not there.
    fn our_gateway(
        &mut self,
        ours: Option<&'a Gateway>,
        gateways: &[&'a Gateway],
        classes: &HashMap<&'a str, &'a GatewayClass>,
    ) -> (GatewayInfo, Allowed) {
        let options = self.opts;
        let mut info = GatewayInfo {
            namespace: options.gateway_namespace.as_str().into(),
            name: options.gateway_name.as_str().into(),
            waypoint_for: WaypointFor::None,
        };
        let mut allowed = Allowed::Same;
        match ours {
            Some(g) => {
                info.waypoint_for = self.gateway(g, classes);
                allowed = self.allowed_routes(g);
            }
            None => {
                let mut known: Vec<_> = gateways.iter().map(|g| id(&g.metadata)).collect();
                known.sort();
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                self.errors.push(ConfigError {
                    kind: "Gateway".into(),
                    namespace: options.gateway_namespace.clone(),
                    name: options.gateway_name.clone(),
                    field: String::new(),
                    message: format!(
                        "the Gateway named by --gateway is not in the config (Gateways found: {known})"
                    ),
                });
            }
        }
        (info, allowed)
    }

    /// Compile the DestinationRules (applied as clusters are built).
    fn destination_rules(
        &mut self,
        rules: &[&'a crate::resources::DestinationRule],
        secrets: &HashMap<SvcKey<'a>, &'a crate::resources::Secret>,
    ) {
        // `credentialName` Secrets are the waypoint's namespace's (Istio reads a gateway's
        // credentials in its own namespace).
        let ns = self.opts.gateway_namespace.as_str();
        let credentials = |name: &str, mutual: bool| {
            crate::traffic::TlsCredential::find(
                &|n: &str| secrets.get(&(ns, n)).copied(),
                ns,
                name,
                mutual,
            )
            .map(Arc::new)
        };
        for d in rules {
            if let Some(rule) = crate::traffic::compile_rule(
                d,
                &self.opts.cluster_domain,
                &credentials,
                &mut self.errors,
                &mut self.warnings,
            ) {
                self.traffic_rules.push(rule);
            }
        }
    }

    /// Every Service and ServiceEntry host as `waypoint services` lists it.
    fn service_infos(&self) -> Vec<Arc<ServiceInfo>> {
        self.services
            .iter()
            .map(|((ns, name), svc)| {
                Arc::new(ServiceInfo {
                    kind: if svc.entry.is_some() {
                        "ServiceEntry"
                    } else {
                        "Service"
                    },
                    namespace: (*ns).into(),
                    name: (*name).into(),
                    hostname: svc.hostname.as_str().into(),
                    entry: svc
                        .entry
                        .as_ref()
                        .map(|e| (e.name.as_str().into(), e.resolution)),
                    vips: svc.vips.clone(),
                    ports: svc
                        .ports
                        .iter()
                        .map(|p| ServicePortInfo {
                            port: p.port,
                            name: p.name.clone(),
                            protocol: p.protocol,
                        })
                        .collect(),
                    binding: svc.info.clone(),
                })
            })
            .collect()
    }
}

/// Every resource loaded, as (kind, `namespace/name`, source) for `/config_dump`.
fn resource_list(
    resources: &LoadedResources,
) -> Vec<(String, String, crate::load::ResourceSource)> {
    resources
        .resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let meta = r.metadata()?;
            let id = if meta.namespace.is_empty() {
                meta.name.clone()
            } else {
                format!("{}/{}", meta.namespace, meta.name)
            };
            Some((
                r.kind().to_string(),
                id,
                resources.sources.get(i).cloned().unwrap_or_default(),
            ))
        })
        .collect()
}

/// Istio protocol selection (`kube.ConvertProtocol`): a recognised `appProtocol` wins, else the
/// port name's prefix (`http`, `http-web`, ...), else unknown (sniffed).
pub(crate) fn port_protocol(p: &ServicePortSpec) -> AppProtocol {
    if let Some(ap) = &p.app_protocol
        && let Some(proto) = parse_protocol(&ap.to_ascii_lowercase())
    {
        return proto;
    }
    let name = p.name.as_deref().unwrap_or("").to_ascii_lowercase();
    const PREFIXES: [&str; 10] = [
        "grpc-web", "http2", "http", "grpc", "tcp", "tls", "https", "mongo", "redis", "mysql",
    ];
    PREFIXES
        .iter()
        .find(|pre| {
            name == **pre
                || name
                    .strip_prefix(**pre)
                    .is_some_and(|rest| rest.starts_with('-'))
        })
        .and_then(|pre| parse_protocol(pre))
        .unwrap_or(AppProtocol::Unknown)
}

fn parse_protocol(p: &str) -> Option<AppProtocol> {
    Some(match p {
        "http" | "grpc-web" | "kubernetes.io/ws" => AppProtocol::Http,
        "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" | "kubernetes.io/wss" => {
            AppProtocol::Tcp
        }
        _ => return None,
    })
}

mod bindings;
mod clusters;
mod entries;
mod http_routes;
mod l4_routes;
mod workloads;

#[cfg(test)]
use http_routes::parse_duration;

#[cfg(test)]
mod tests;
