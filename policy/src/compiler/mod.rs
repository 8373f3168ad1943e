//! The body of [`crate::compile`]: resources -> [`Snapshot`].
//!
//! Order of work: index the resources, find our Gateway, validate every Service and
//! EndpointSlice, decide which Services are bound to this waypoint (Istio `waypoints.go`
//! `fetchWaypointForTarget`), compile every HTTPRoute (validated even when it attaches to
//! nothing, so errors do not depend on labels), then assemble the VIP index. Errors never stop
//! the walk: every resource is checked and all errors are returned together.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
    HttpRouteMatch, HttpRouteRule, HttpValueMatch, IntOrString, LabelSelector, MirrorSpec,
    ObjectMeta, ParentReference, PathModifierSpec, RedirectSpec, ReferenceGrant, Resource, Service,
    ServicePortSpec, TcpRoute, TlsRoute,
};
use crate::route::{
    Backend, BackendRef, Filters, HeaderMatch, HeaderModifier, MatchKind, Mirror, PathMatch,
    PathModifier, Precedence, QueryMatch, Redirect, RetryPolicy, Rewrite, RouteMatch, RouteRule,
    RouteTable, TcpRouteRule, TlsRoutes, WeightedBackends,
};
use crate::snapshot::Workload;
use crate::snapshot::{
    AppProtocol, BindingInfo, BindingSource, BindingState, Cluster, CompileOptions, Endpoint,
    EndpointLoad, GatewayInfo, ServiceInfo, ServicePort, ServicePortInfo, Snapshot, WaypointFor,
};

const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
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

/// A validated Service.
struct Svc {
    vips: Vec<IpAddr>,
    ports: Vec<SvcPort>,
    /// `Ok` = bound to this waypoint; `Err` = why not.
    binding: Result<(), String>,
    /// The same decision with the label that made it (for `waypoint services`).
    info: BindingInfo,
}

struct SvcPort {
    /// Empty when unnamed.
    name: String,
    port: u16,
    /// Numeric `targetPort` (defaults to `port`); `None` for a named target port.
    target: Option<u16>,
    protocol: AppProtocol,
}

/// A validated EndpointSlice.
struct Slice {
    /// (port name, empty when unnamed; port number).
    ports: Vec<(String, Option<u16>)>,
    /// Addresses of ready endpoints, with the Pod their `targetRef` names.
    ready: Vec<(IpAddr, Option<(String, String)>)>,
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
    /// Every ReferenceGrant (cross-namespace backendRefs).
    grants: Vec<&'a ReferenceGrant>,
    /// Kind of the route being compiled (`HTTPRoute`, `GRPCRoute`, `TCPRoute`), for errors.
    route_kind: &'static str,
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
        grants: Vec::new(),
        route_kind: "HTTPRoute",
    };

    // Index, rejecting duplicates (the later definition is the error).
    let mut seen = HashSet::new();
    let (mut gateways, mut classes, mut services, mut slices, mut routes, mut policies) = (
        Vec::new(),
        HashMap::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut request_authns = Vec::new();
    let mut tcp_routes = Vec::new();
    let mut tls_routes = Vec::new();
    let mut telemetries = Vec::new();
    for r in &resources.resources {
        let Some(meta) = r.metadata() else { continue };
        if !seen.insert((r.kind(), meta.namespace.as_str(), meta.name.as_str())) {
            let e = error(r.kind(), meta, "metadata.name", "defined more than once");
            c.errors.push(e);
            continue;
        }
        match r {
            Resource::Namespace(n) => {
                c.namespaces.insert(n.metadata.name.as_str(), &n.metadata);
            }
            Resource::Service(s) => services.push(s),
            Resource::Pod(p) => c.pod(p),
            Resource::EndpointSlice(s) => slices.push(s),
            Resource::Gateway(g) => gateways.push(g),
            Resource::GatewayClass(g) => {
                classes.insert(g.metadata.name.as_str(), g);
            }
            Resource::HttpRoute(h) | Resource::GrpcRoute(h) => routes.push(h),
            Resource::TcpRoute(t) => tcp_routes.push(t),
            Resource::TlsRoute(t) => tls_routes.push(t),
            Resource::ReferenceGrant(g) => c.grants.push(g),
            Resource::AuthorizationPolicy(p) => policies.push(p),
            Resource::RequestAuthentication(p) => request_authns.push(p),
            Resource::Telemetry(t) => telemetries.push(t),
            Resource::Unknown { .. } => {}
        }
    }

    let ours = gateways.iter().find(|g| {
        g.metadata.namespace == options.gateway_namespace && g.metadata.name == options.gateway_name
    });
    let mut info = GatewayInfo {
        namespace: options.gateway_namespace.as_str().into(),
        name: options.gateway_name.as_str().into(),
        waypoint_for: WaypointFor::None,
    };
    let mut allowed = Allowed::Same;
    match ours {
        Some(g) => {
            info.waypoint_for = c.gateway(g, &classes);
            allowed = c.allowed_routes(g);
        }
        None => {
            let mut known: Vec<_> = gateways.iter().map(|g| id(&g.metadata)).collect();
            known.sort();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            c.errors.push(ConfigError {
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

    // Services, in load order so a duplicate VIP:port is reported on the later Service.
    let mut vip_owner = HashMap::new();
    for s in services {
        let svc = c.service(s, &info, &allowed, ours.is_some(), &mut vip_owner);
        let key = (s.metadata.namespace.as_str(), s.metadata.name.as_str());
        c.services.insert(key, svc);
    }
    for s in slices {
        c.slice(s);
    }
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
    let authz = {
        let services = &c.services;
        let exists = |ns: &str, name: &str| services.contains_key(&(ns, name));
        crate::authz::compile_policies(&policies, options, &exists, &mut c.errors, &mut c.warnings)
    };
    let authn = {
        let services = &c.services;
        let exists = |ns: &str, name: &str| services.contains_key(&(ns, name));
        crate::authn::compile_request_authentications(
            &request_authns,
            options,
            &exists,
            &mut c.errors,
            &mut c.warnings,
        )
    };
    let telemetry = {
        let services = &c.services;
        let exists = |ns: &str, name: &str| services.contains_key(&(ns, name));
        crate::telemetry::compile_telemetry(
            &telemetries,
            options,
            &exists,
            &mut c.errors,
            &mut c.warnings,
        )
    };
    let (bound, not_bound) =
        c.vip_index(tables, tcp_tables, tls_tables, &authz, &authn, &telemetry);
    let services = c
        .services
        .iter()
        .map(|((ns, name), svc)| {
            Arc::new(ServiceInfo {
                namespace: (*ns).into(),
                name: (*name).into(),
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
        .collect();
    let workloads = c.workloads(&info, &allowed);
    let extension_clusters = c.extension_clusters();

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let clusters = c.clusters.into_values();
    Ok(Snapshot {
        gateway: info,
        trust_domain: options.trust_domain.as_str().into(),
        bound,
        not_bound,
        clusters: clusters.map(|cl| (cl.name.clone(), cl)).collect(),
        authz,
        authn,
        telemetry,
        services,
        workloads,
        resources: resources
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
            .collect(),
        extension_clusters,
        warnings: c.warnings,
    })
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

impl<'a> Compiler<'a> {
    /// Validate our Gateway and resolve `istio.io/waypoint-for`: the Gateway label, else its
    /// GatewayClass label, else `service` (Istio `gatewayToWaypointTransform`).
    fn gateway(&mut self, g: &Gateway, classes: &HashMap<&str, &GatewayClass>) -> WaypointFor {
        let meta = &g.metadata;
        if g.spec.gateway_class_name != "istio-waypoint" {
            let class = &g.spec.gateway_class_name;
            let msg = format!("must be istio-waypoint, got {class:?}");
            self.errors
                .push(error("Gateway", meta, "spec.gatewayClassName", msg));
        }
        let listeners = &g.spec.listeners;
        if !(listeners.len() == 1 && listeners[0].port == 15008 && listeners[0].protocol == "HBONE")
        {
            // Istio's status message for this (`conversion.go` `unexpectedWaypointListener`).
            self.warnings.push(format!(
                "Gateway {}: Expected a single listener on port 15008 with protocol \"HBONE\"; other listeners are ignored",
                id(meta)
            ));
        }
        let class = classes.get(g.spec.gateway_class_name.as_str());
        let (kind, meta, value) = match (meta.labels.get(WAYPOINT_FOR), class) {
            (Some(v), _) => ("Gateway", meta, v),
            (None, Some(class)) => match class.metadata.labels.get(WAYPOINT_FOR) {
                Some(v) => ("GatewayClass", &class.metadata, v),
                None => return WaypointFor::Service,
            },
            (None, None) => return WaypointFor::Service,
        };
        match value.as_str() {
            "service" => WaypointFor::Service,
            "workload" => WaypointFor::Workload,
            "all" => WaypointFor::All,
            "none" => WaypointFor::None,
            other => {
                let field = format!("metadata.labels[\"{WAYPOINT_FOR}\"]");
                let msg =
                    format!("invalid value {other:?} (expected service, workload, all or none)");
                self.errors.push(error(kind, meta, field, msg));
                WaypointFor::None
            }
        }
    }

    /// `allowedRoutes.namespaces` of the `mesh` listener (else the first; none = `Same`).
    fn allowed_routes(&mut self, g: &Gateway) -> Allowed {
        let listeners = &g.spec.listeners;
        let Some(i) = listeners
            .iter()
            .position(|l| l.name == "mesh")
            .or((!listeners.is_empty()).then_some(0))
        else {
            return Allowed::Same;
        };
        let ns = listeners[i]
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref());
        let field = format!("spec.listeners[{i}].allowedRoutes.namespaces");
        match ns.and_then(|n| n.from.as_deref()) {
            None | Some("Same") => Allowed::Same,
            Some("All") => Allowed::All,
            Some("Selector") => match ns.and_then(|n| n.selector.clone()) {
                Some(sel) => Allowed::Selector(sel),
                None => {
                    let field = format!("{field}.selector");
                    self.errors.push(error(
                        "Gateway",
                        &g.metadata,
                        field,
                        "required when from is Selector",
                    ));
                    Allowed::Same
                }
            },
            Some(other) => {
                let msg = format!("invalid value {other:?} (expected Same, All or Selector)");
                self.errors
                    .push(error("Gateway", &g.metadata, format!("{field}.from"), msg));
                Allowed::Same
            }
        }
    }

    /// Bound VIP:ports (with their clusters and sorted route tables) and not-bound ones.
    fn vip_index(
        &mut self,
        mut tables: HashMap<(SvcKey<'a>, u16), Candidates>,
        mut tcp_tables: HashMap<(SvcKey<'a>, u16), TcpCandidates>,
        mut tls_tables: HashMap<(SvcKey<'a>, u16), TlsCandidates>,
        authz: &AuthzIndex,
        authn: &AuthnIndex,
        telemetry: &crate::telemetry::TelemetryIndex,
    ) -> (
        HashMap<SocketAddr, Arc<ServicePort>>,
        HashMap<SocketAddr, String>,
    ) {
        let mut bound = HashMap::new();
        let mut not_bound = HashMap::new();
        let keys: Vec<SvcKey<'a>> = self.services.keys().copied().collect();
        for key in keys {
            let Some(svc) = self.services.get(&key) else {
                continue;
            };
            let (vips, binding) = (svc.vips.clone(), svc.binding.clone());
            let ports: Vec<(u16, AppProtocol)> =
                svc.ports.iter().map(|p| (p.port, p.protocol)).collect();
            for (port, protocol) in ports {
                let reason = match &binding {
                    Err(reason) => reason,
                    Ok(()) => {
                        let Some(cluster) = self.cluster(key, port) else {
                            continue;
                        };
                        let routes = tables
                            .remove(&(key, port))
                            .map(|c| Arc::new(RouteTable::build(c)));
                        let tcp_route = tcp_tables.remove(&(key, port)).and_then(|mut c| {
                            // Several TCPRoutes on one port: the oldest (then namespace/name)
                            // wins, as Istio orders routes; its first rule carries the backends.
                            c.sort_by(|a, b| a.0.cmp(&b.0));
                            c.into_iter().next().map(|(_, r)| r)
                        });
                        let tls_routes = tls_tables.remove(&(key, port)).map(|mut c| {
                            c.sort_by(|a, b| a.0.cmp(&b.0));
                            Arc::new(TlsRoutes {
                                routes: c.into_iter().map(|(_, hosts, r)| (hosts, r)).collect(),
                            })
                        });
                        let authz = authz.for_service(key.0, key.1);
                        let authn = authn.for_service(key.0, key.1);
                        let access_log = telemetry.for_service(key.0, key.1);
                        for vip in &vips {
                            let vip = SocketAddr::new(*vip, port);
                            let (cluster, routes) = (cluster.clone(), routes.clone());
                            bound.insert(
                                vip,
                                Arc::new(ServicePort {
                                    vip,
                                    vip_text: vip.to_string(),
                                    protocol,
                                    cluster,
                                    routes,
                                    tcp_route: tcp_route.clone(),
                                    tls_routes: tls_routes.clone(),
                                    authz: authz.clone(),
                                    authn: authn.clone(),
                                    access_log: access_log.clone(),
                                }),
                            );
                        }
                        continue;
                    }
                };
                for vip in &vips {
                    not_bound.insert(SocketAddr::new(*vip, port), reason.clone());
                }
            }
        }
        (bound, not_bound)
    }

    /// Namespace labels, plus the `kubernetes.io/metadata.name` label the API server adds to
    /// every Namespace (selectors commonly use it).
    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .get(ns)
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.into());
        labels
    }

    fn service(
        &mut self,
        s: &'a Service,
        gw: &GatewayInfo,
        allowed: &Allowed,
        gateway_found: bool,
        vip_owner: &mut HashMap<SocketAddr, String>,
    ) -> Svc {
        let meta = &s.metadata;
        let mut vips = Vec::new();
        let ips = s
            .spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip));
        let ips = ips.chain(
            s.spec
                .cluster_ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
        );
        for (field, ip) in ips {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            match ip.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                Ok(_) => {}
                Err(_) => self.errors.push(error(
                    "Service",
                    meta,
                    field,
                    format!("{ip:?} is not an IP address"),
                )),
            }
        }
        let mut ports: Vec<SvcPort> = Vec::new();
        for (i, p) in s.spec.ports.iter().enumerate() {
            // Only TCP ports carry HTTP or HBONE traffic (protocol.md 2.3: UDP ports skipped).
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let Some(port) = port_number(p.port) else {
                self.errors.push(error(
                    "Service",
                    meta,
                    format!("spec.ports[{i}].port"),
                    format!("{} is not a valid port (1-65535)", p.port),
                ));
                continue;
            };
            let target = match &p.target_port {
                None => Some(port),
                Some(IntOrString::Int(t)) => match port_number(*t) {
                    Some(t) => Some(t),
                    None => {
                        self.errors.push(error(
                            "Service",
                            meta,
                            format!("spec.ports[{i}].targetPort"),
                            format!("{t} is not a valid port (1-65535)"),
                        ));
                        continue;
                    }
                },
                Some(IntOrString::String(_)) => None,
            };
            if ports.iter().any(|q| q.port == port) {
                self.errors.push(error(
                    "Service",
                    meta,
                    format!("spec.ports[{i}].port"),
                    format!("duplicate port {port}"),
                ));
                continue;
            }
            for vip in &vips {
                let addr = SocketAddr::new(*vip, port);
                if let Some(owner) = vip_owner.get(&addr) {
                    self.errors.push(error(
                        "Service",
                        meta,
                        format!("spec.ports[{i}].port"),
                        format!("{addr} is already used by Service {owner}"),
                    ));
                } else {
                    vip_owner.insert(addr, id(meta));
                }
            }
            ports.push(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                target,
                protocol: port_protocol(p),
            });
        }
        let info = if gateway_found {
            self.binding(s, gw, allowed)
        } else {
            BindingInfo {
                state: BindingState::NoGateway,
                source: BindingSource::None,
                waypoint: None,
                reason: "the waypoint Gateway is not configured".into(),
            }
        };
        let binding = match info.state {
            BindingState::Bound => Ok(()),
            _ => Err(info.reason.clone()),
        };
        Svc {
            vips,
            ports,
            binding,
            info,
        }
    }

    /// Istio `fetchWaypointForTarget` for a Service, seen from this waypoint: bound here, or
    /// why not, and which label decided.
    fn binding(&self, s: &Service, gw: &GatewayInfo, allowed: &Allowed) -> BindingInfo {
        let meta = &s.metadata;
        let svc = format!("Service {}", id(meta));
        let info = |state, source, waypoint: Option<String>, reason: String| BindingInfo {
            state,
            source,
            waypoint,
            reason,
        };
        if meta.labels.contains_key(GATEWAY_NAME_LABEL) {
            return info(
                BindingState::GatewayService,
                BindingSource::None,
                None,
                format!("{svc} belongs to a gateway; waypoints never get a waypoint"),
            );
        }
        let ns = meta.namespace.as_str();
        let ns_labels = self.namespace_labels(ns);
        let get = |labels: &'_ BTreeMap<String, String>, key: &str| {
            labels.get(key).filter(|v| !v.is_empty()).cloned()
        };
        // The object that supplied `use-waypoint` also supplies `use-waypoint-namespace`.
        let (kind, source, waypoint, waypoint_ns) = if let Some(w) = get(&meta.labels, USE_WAYPOINT)
        {
            (
                BindingSource::ServiceLabel,
                svc.clone(),
                w,
                get(&meta.labels, USE_WAYPOINT_NAMESPACE),
            )
        } else if let Some(w) = get(&ns_labels, USE_WAYPOINT) {
            (
                BindingSource::NamespaceLabel,
                format!("namespace {ns}"),
                w,
                get(&ns_labels, USE_WAYPOINT_NAMESPACE),
            )
        } else {
            return info(
                BindingState::NoWaypoint,
                BindingSource::None,
                None,
                format!("{svc} has no {USE_WAYPOINT} label (nor does its namespace)"),
            );
        };
        if waypoint == "none" {
            return info(
                BindingState::OptedOut,
                kind,
                None,
                format!("{svc} opted out of waypoints ({USE_WAYPOINT}=none on {source})"),
            );
        }
        let waypoint_ns = waypoint_ns.unwrap_or_else(|| ns.to_string());
        let named = Some(format!("{waypoint_ns}/{waypoint}"));
        if waypoint != *gw.name || waypoint_ns != *gw.namespace {
            return info(
                BindingState::OtherWaypoint,
                kind,
                named,
                format!("{svc} is bound to waypoint {waypoint_ns}/{waypoint} (label on {source})"),
            );
        }
        let gw_id = format!("{}/{}", gw.namespace, gw.name);
        let wf = match gw.waypoint_for {
            WaypointFor::Service | WaypointFor::All => None,
            WaypointFor::Workload => Some("workload"),
            WaypointFor::None => Some("none"),
        };
        if let Some(wf) = wf {
            return info(
                BindingState::WaypointForRejects,
                kind,
                named,
                format!(
                    "{svc}: waypoint {gw_id} has {WAYPOINT_FOR}={wf}, which does not admit service traffic"
                ),
            );
        }
        let (admitted, from) = match allowed {
            Allowed::Same => (ns == &*gw.namespace, "Same"),
            Allowed::All => (true, "All"),
            Allowed::Selector(sel) => (sel.matches(&ns_labels), "Selector"),
        };
        if !admitted {
            return info(
                BindingState::NamespaceNotAllowed,
                kind,
                named,
                format!(
                    "{svc}: waypoint {gw_id} does not admit namespace {ns} (allowedRoutes.namespaces.from={from}; missing allowedRoutes?)"
                ),
            );
        }
        info(
            BindingState::Bound,
            kind,
            named,
            format!("{svc} uses waypoint {gw_id} ({USE_WAYPOINT} label on {source})"),
        )
    }

    fn pod(&mut self, p: &'a crate::resources::Pod) {
        let meta = &p.metadata;
        let mut ips = Vec::new();
        let listed = p
            .status
            .pod_ip
            .iter()
            .chain(p.status.pod_ips.iter().map(|i| &i.ip));
        for (i, ip) in listed.enumerate() {
            match ip.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => self.errors.push(error(
                    "Pod",
                    meta,
                    if i == 0 && p.status.pod_ip.is_some() {
                        "status.podIP".to_string()
                    } else {
                        "status.podIPs".to_string()
                    },
                    format!("{ip:?} is not an IP address"),
                )),
            }
        }
        let key = (meta.namespace.as_str(), meta.name.as_str());
        for ip in &ips {
            self.pods_by_ip.insert(*ip, key);
        }
        self.pods.insert(
            key,
            PodInfo {
                meta,
                ips,
                service_account: p
                    .spec
                    .service_account_name
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
            },
        );
    }

    /// Is the pod in the ambient data plane? The Pod's `istio.io/dataplane-mode` label wins
    /// (`none` opts out), else its namespace's (`ambient` opts in).
    fn pod_is_ambient(&self, pod: &PodInfo<'_>) -> bool {
        match pod.meta.labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some("ambient") => true,
            Some(_) => false,
            None => self
                .namespace_labels(&pod.meta.namespace)
                .get(DATAPLANE_MODE)
                .is_some_and(|m| m == "ambient"),
        }
    }

    fn pod_identity(&self, pod: &PodInfo<'_>) -> Arc<str> {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.opts.trust_domain, pod.meta.namespace, pod.service_account
        )
        .into()
    }

    /// The SPIFFE identity to expect when the endpoint is an ambient pod (then reached over
    /// HBONE), found by the endpoint's `targetRef`, else by IP.
    fn ambient_identity(&self, ip: IpAddr, pod: Option<&(String, String)>) -> Option<Arc<str>> {
        let key = match pod {
            Some((ns, name)) => self.pods.keys().find(|k| k.0 == ns && k.1 == name).copied(),
            None => self.pods_by_ip.get(&ip).copied(),
        }?;
        let info = self.pods.get(&key)?;
        self.pod_is_ambient(info).then(|| self.pod_identity(info))
    }

    /// Pods whose workload traffic this waypoint serves (protocol.md 2.10): the Gateway's
    /// `waypoint-for` is `workload` or `all`; the Pod's own `istio.io/use-waypoint`, else its
    /// namespace's, names this Gateway (`none` opts out; a Service label never applies to
    /// workload traffic); the namespace is admitted by allowedRoutes; the pod is ambient
    /// (ztunnel only redirects captured pods).
    fn workloads(&mut self, gw: &GatewayInfo, allowed: &Allowed) -> HashMap<IpAddr, Arc<Workload>> {
        let mut out = HashMap::new();
        if !matches!(gw.waypoint_for, WaypointFor::Workload | WaypointFor::All) {
            return out;
        }
        for info in self.pods.values() {
            let meta = info.meta;
            let ns = meta.namespace.as_str();
            let ns_labels = self.namespace_labels(ns);
            let get = |labels: &BTreeMap<String, String>, key: &str| {
                labels.get(key).filter(|v| !v.is_empty()).cloned()
            };
            let (waypoint, waypoint_ns) = if let Some(w) = get(&meta.labels, USE_WAYPOINT) {
                (w, get(&meta.labels, USE_WAYPOINT_NAMESPACE))
            } else if let Some(w) = get(&ns_labels, USE_WAYPOINT) {
                (w, get(&ns_labels, USE_WAYPOINT_NAMESPACE))
            } else {
                continue;
            };
            let waypoint_ns = waypoint_ns.unwrap_or_else(|| ns.to_string());
            if waypoint == "none" || waypoint != *gw.name || waypoint_ns != *gw.namespace {
                continue;
            }
            if meta.labels.contains_key(GATEWAY_NAME_LABEL) || !self.pod_is_ambient(info) {
                continue;
            }
            let admitted = match allowed {
                Allowed::Same => ns == &*gw.namespace,
                Allowed::All => true,
                Allowed::Selector(sel) => sel.matches(&ns_labels),
            };
            if !admitted {
                self.warnings.push(format!(
                    "Pod {}: waypoint {}/{} does not admit namespace {ns} (missing allowedRoutes?)",
                    id(meta),
                    gw.namespace,
                    gw.name
                ));
                continue;
            }
            let w = Arc::new(Workload {
                namespace: meta.namespace.as_str().into(),
                name: meta.name.as_str().into(),
                identity: self.pod_identity(info),
                ambient: true,
            });
            for ip in &info.ips {
                out.insert(*ip, w.clone());
            }
        }
        out
    }

    fn slice(&mut self, s: &'a crate::resources::EndpointSlice) {
        let meta = &s.metadata;
        let err = |field: String, msg: String| error("EndpointSlice", meta, field, msg);
        let Some(service) = meta.labels.get(SERVICE_NAME_LABEL) else {
            self.warnings.push(format!(
                "EndpointSlice {}: no {SERVICE_NAME_LABEL} label; ignored",
                id(meta)
            ));
            return;
        };
        if s.address_type.as_deref() == Some("FQDN") {
            self.warnings.push(format!(
                "EndpointSlice {}: addressType FQDN is not supported; ignored",
                id(meta)
            ));
            return;
        }
        let mut slice = Slice {
            ports: Vec::new(),
            ready: Vec::new(),
        };
        for (i, p) in s.ports.iter().enumerate() {
            let port = match p.port {
                None => None,
                Some(n) => match port_number(n) {
                    Some(n) => Some(n),
                    None => {
                        self.errors.push(err(
                            format!("ports[{i}].port"),
                            format!("{n} is not a valid port (1-65535)"),
                        ));
                        continue;
                    }
                },
            };
            slice.ports.push((p.name.clone().unwrap_or_default(), port));
        }
        for (i, e) in s.endpoints.iter().enumerate() {
            // `ready` absent means ready (EndpointConditions API doc).
            let ready = e.conditions.ready != Some(false);
            let pod = e.target_ref.as_ref().and_then(|r| {
                (r.kind.as_deref().unwrap_or("Pod") == "Pod").then(|| {
                    (
                        r.namespace
                            .clone()
                            .unwrap_or_else(|| meta.namespace.clone()),
                        r.name.clone().unwrap_or_default(),
                    )
                })
            });
            for (j, a) in e.addresses.iter().enumerate() {
                match a.parse::<IpAddr>() {
                    Ok(ip) if ready => slice.ready.push((ip, pod.clone())),
                    Ok(_) => {}
                    Err(_) => self.errors.push(err(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                    )),
                }
            }
        }
        self.slices
            .entry((meta.namespace.as_str(), service.as_str()))
            .or_default()
            .push(slice);
    }

    /// The cluster of one Service port, built on first use. Services bound to this waypoint
    /// get istiod's `inbound-vip` name, others an `outbound` name (protocol.md 2.5).
    fn cluster(&mut self, key: SvcKey<'a>, port: u16) -> Option<Arc<Cluster>> {
        let ckey = (key.0.to_string(), key.1.to_string(), port);
        if let Some(c) = self.clusters.get(&ckey) {
            return Some(c.clone());
        }
        let svc = self.services.get(&key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        let hostname = format!("{}.{}.svc.{}", key.1, key.0, self.opts.cluster_domain);
        let name = match (&svc.binding, sp.protocol) {
            (Ok(()), AppProtocol::Tcp) => format!("inbound-vip|{port}|tcp|{hostname}"),
            (Ok(()), _) => format!("inbound-vip|{port}|http|{hostname}"),
            (Err(_), _) => format!("outbound|{port}||{hostname}"),
        };
        let cluster = Arc::new(self.build_cluster(key, port, name)?);
        self.clusters.insert(ckey, cluster.clone());
        Some(cluster)
    }

    /// The `outbound|<port>||<host>` clusters istiod builds for the MeshConfig extension
    /// providers (`CompileOptions::extension_services`), by (service as written, port).
    /// A provider naming an unknown Service or port is warned about and gets no cluster.
    fn extension_clusters(&mut self) -> HashMap<(String, u16), Arc<Cluster>> {
        let mut out = HashMap::new();
        let wanted = self.opts.extension_services.clone();
        let suffix = format!(".svc.{}", self.opts.cluster_domain);
        let keys: Vec<SvcKey<'a>> = self.services.keys().copied().collect();
        for (service, port) in wanted {
            // `[<Namespace>/]<Hostname>`; the hostname of a Kubernetes Service is
            // `<name>.<namespace>.svc.<cluster domain>`.
            let host = service.rsplit('/').next().unwrap_or(&service);
            let short = host.strip_suffix(&suffix).unwrap_or(host);
            let key = short
                .split_once('.')
                .and_then(|(name, ns)| keys.iter().find(|k| k.0 == ns && k.1 == name).copied());
            let cluster = key.and_then(|key| {
                let hostname = format!("{}.{}{suffix}", key.1, key.0);
                self.build_cluster(key, port, format!("outbound|{port}||{hostname}"))
            });
            match cluster {
                Some(c) => {
                    out.insert((service.clone(), port), Arc::new(c));
                }
                None => self.warnings.push(format!(
                    "mesh config: extension provider service {service:?} port {port} is not a known Service port; requests that need it are handled as the provider's failure"
                )),
            }
        }
        out
    }

    /// A cluster for one Service port with the given name; `None` for an unknown port.
    fn build_cluster(&self, key: SvcKey<'a>, port: u16, name: String) -> Option<Cluster> {
        let svc = self.services.get(&key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        let hostname = format!("{}.{}.svc.{}", key.1, key.0, self.opts.cluster_domain);
        let mut addrs = BTreeSet::new();
        for slice in self.slices.get(&key).map(Vec::as_slice).unwrap_or_default() {
            // The slice port with the Service port's name, else the numeric targetPort, else
            // the Service port itself.
            let target = slice
                .ports
                .iter()
                .find(|(n, _)| *n == sp.name)
                .and_then(|(_, p)| *p)
                .or(sp.target)
                .unwrap_or(sp.port);
            for (ip, pod) in &slice.ready {
                let tunnel = self.ambient_identity(*ip, pod.as_ref());
                addrs.insert((SocketAddr::new(*ip, target), tunnel));
            }
        }
        Some(Cluster {
            name: name.into(),
            hostname: hostname.into(),
            service_name: key.1.into(),
            service_namespace: key.0.into(),
            port,
            protocol: sp.protocol,
            endpoints: addrs
                .into_iter()
                .map(|(addr, tunnel)| Endpoint {
                    addr,
                    load: Arc::new(EndpointLoad::default()),
                    tunnel,
                })
                .collect(),
        })
    }

    /// A TCPRoute: weighted TCP backends for the TCP ports it attaches to (Istio
    /// `convertTCPRoute`). Only the first rule is used (Gateway API allows one rule per
    /// TCPRoute on a mesh parent; more are warned about).
    fn tcp_route(
        &mut self,
        r: &'a TcpRoute,
        tables: &mut HashMap<(SvcKey<'a>, u16), TcpCandidates>,
    ) {
        self.route_kind = "TCPRoute";
        let Some((key, rule, parents)) =
            self.l4_route(&r.metadata, &r.spec.parent_refs, &r.spec.rules)
        else {
            return;
        };
        for parent in parents {
            tables
                .entry(parent)
                .or_default()
                .push((key.clone(), rule.clone()));
        }
    }

    /// A TLSRoute: like a TCPRoute, selected by SNI (`hostnames`, Istio `buildTLSMatch`).
    fn tls_route(
        &mut self,
        r: &'a TlsRoute,
        tables: &mut HashMap<(SvcKey<'a>, u16), TlsCandidates>,
    ) {
        self.route_kind = "TLSRoute";
        let meta = &r.metadata;
        let mut hosts = Vec::new();
        for (i, h) in r.spec.hostnames.iter().enumerate() {
            let valid = !h.is_empty()
                && h.parse::<IpAddr>().is_err()
                && h.strip_prefix("*.").unwrap_or(h).split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if valid {
                hosts.push(h.to_ascii_lowercase());
            } else {
                self.errors.push(error(
                    "TLSRoute",
                    meta,
                    format!("spec.hostnames[{i}]"),
                    format!("{h:?} is not a host name (exact, or *. followed by a suffix; no IPs)"),
                ));
            }
        }
        let Some((key, rule, parents)) = self.l4_route(meta, &r.spec.parent_refs, &r.spec.rules)
        else {
            return;
        };
        for parent in parents {
            tables
                .entry(parent)
                .or_default()
                .push((key.clone(), hosts.clone(), rule.clone()));
        }
    }

    /// The shared part of TCPRoute and TLSRoute: backends of the first rule and parents.
    #[allow(clippy::type_complexity)]
    fn l4_route(
        &mut self,
        meta: &'a ObjectMeta,
        parent_refs: &'a [ParentReference],
        rules: &'a [crate::resources::TcpRouteRule],
    ) -> Option<(
        (bool, String, String),
        Arc<TcpRouteRule>,
        Vec<(SvcKey<'a>, u16)>,
    )> {
        let kind = self.route_kind;
        let rid = id(meta);
        let errors_before = self.errors.len();
        if rules.len() > 1 {
            self.warnings.push(format!(
                "{kind} {rid}: spec.rules: only the first rule is used"
            ));
        }
        let mut plans = Vec::new();
        if let Some(rule) = rules.first() {
            for (k, b) in rule.backend_refs.iter().enumerate() {
                if let Some(plan) =
                    self.backend(meta, &format!("spec.rules[0].backendRefs[{k}]"), b)
                {
                    plans.push(plan);
                }
            }
        }
        let parents = self.parents(meta, parent_refs, true);
        if self.errors.len() > errors_before || parents.is_empty() {
            return None;
        }
        let mut wb = WeightedBackends::default();
        for b in plans {
            let backend = self.resolve(b.target);
            if let Backend::Invalid { reason } = &backend {
                self.warnings.push(format!("{kind} {rid}: spec.rules[0]: invalid backendRef: {reason}; its share of connections is rejected"));
            }
            wb.total_weight += u64::from(b.weight);
            wb.backends.push(BackendRef {
                backend,
                weight: b.weight,
                filters: Arc::default(),
            });
        }
        let name = rules
            .first()
            .and_then(|rule| rule.name.clone())
            .unwrap_or_else(|| format!("{}.{}.0", meta.namespace, meta.name));
        let rule = Arc::new(TcpRouteRule {
            name: name.into(),
            backends: wb,
        });
        let created = meta.creation_timestamp.clone();
        let key = (created.is_none(), created.unwrap_or_default(), rid);
        Some((key, rule, parents))
    }

    fn route(&mut self, r: &'a HttpRoute, tables: &mut HashMap<(SvcKey<'a>, u16), Candidates>) {
        let meta = &r.metadata;
        let kind = if r.grpc { "GRPCRoute" } else { "HTTPRoute" };
        self.route_kind = kind;
        let rid = id(meta);
        let errors_before = self.errors.len();
        let mut plans = Vec::new();
        for (i, rule) in r.spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            let matches = if rule.matches.is_empty() {
                vec![RouteMatch {
                    path: PathMatch::Prefix("/".into()),
                    method: None,
                    headers: Vec::new(),
                    query: Vec::new(),
                }]
            } else {
                let mut v = Vec::new();
                for (j, m) in rule.matches.iter().enumerate() {
                    if let Some(m) = self.route_match(meta, &format!("{field}.matches[{j}]"), m) {
                        v.push(m);
                    }
                }
                v
            };
            let filters = self.filters(meta, &field, &rule.filters, false, r.grpc);
            if let Some(f) = &filters {
                self.check_rule_filters(meta, &field, f, rule, &matches);
            }
            let mut backends = Vec::new();
            let mut invalid_filter = filters.is_none();
            for (k, b) in rule.backend_refs.iter().enumerate() {
                let bfield = format!("{field}.backendRefs[{k}]");
                let Some(mut plan) = self.backend(meta, &bfield, b) else {
                    continue;
                };
                match self.filters(meta, &bfield, &b.filters, true, r.grpc) {
                    Some(f) => plan.filters = f,
                    None => invalid_filter = true,
                }
                backends.push(plan);
            }
            let (request_timeout, per_try_timeout) = self.timeouts(meta, &field, rule);
            let retry = self.retry(meta, &field, rule);
            let name = rule
                .name
                .clone()
                .unwrap_or_else(|| format!("{}.{}.{i}", meta.namespace, meta.name));
            plans.push(RulePlan {
                name: name.into(),
                matches,
                backends,
                filters: filters.unwrap_or_default(),
                invalid_filter,
                request_timeout,
                per_try_timeout,
                retry,
            });
        }
        let parents = self.parents(meta, &r.spec.parent_refs, false);
        if self.errors.len() > errors_before || parents.is_empty() {
            return;
        }
        let created = meta.creation_timestamp.as_deref();
        for (i, plan) in plans.into_iter().enumerate() {
            let mut wb = WeightedBackends::default();
            if plan.invalid_filter {
                // Gateway API: a filter that cannot be applied must not be skipped; the
                // requests it would have processed get an error (500, as an all-zero rule).
                self.warnings.push(format!("{kind} {rid}: spec.rules[{i}]: unsupported filter; requests matching this rule get 500"));
            }
            for b in plan.backends {
                if plan.invalid_filter {
                    break;
                }
                let backend = self.resolve(b.target);
                if let Backend::Invalid { reason } = &backend {
                    self.warnings.push(format!("{kind} {rid}: spec.rules[{i}]: invalid backendRef: {reason}; its share of requests gets 500"));
                }
                let filters = self.resolve_filters(kind, &rid, i, b.filters);
                wb.total_weight += u64::from(b.weight);
                wb.backends.push(BackendRef {
                    backend,
                    weight: b.weight,
                    filters: Arc::new(filters),
                });
            }
            let filters = self.resolve_filters(kind, &rid, i, plan.filters);
            let rule = Arc::new(RouteRule {
                name: plan.name,
                backends: wb,
                filters,
                request_timeout: plan.request_timeout,
                per_try_timeout: plan.per_try_timeout,
                retry: plan.retry,
                grpc: r.grpc,
            });
            for &parent in &parents {
                let list = tables.entry(parent).or_default();
                for (j, m) in plan.matches.iter().enumerate() {
                    let key = Precedence::new(m, created, rid.clone(), i, j);
                    list.push((key, m.clone(), rule.clone()));
                }
            }
        }
    }

    /// A backend target as the data path uses it.
    fn resolve(&mut self, target: Result<(SvcKey<'a>, u16), String>) -> Backend {
        match target {
            Ok(((ns, name), port)) => match self.services.get_key_value(&(ns, name)) {
                Some((key, _)) => {
                    let key = *key;
                    match self.cluster(key, port) {
                        Some(cl) => Backend::Cluster(cl),
                        None => Backend::Invalid {
                            reason: format!("Service {ns}/{name} has no port {port}").into(),
                        },
                    }
                }
                None => Backend::Invalid {
                    reason: format!("Service {ns}/{name} not found").into(),
                },
            },
            Err(reason) => Backend::Invalid {
                reason: reason.into(),
            },
        }
    }

    /// Resolve mirror targets; an unusable mirror is dropped with a warning (Envoy would
    /// shadow to a cluster that does not exist, which only fails the shadow).
    fn resolve_filters(
        &mut self,
        kind: &str,
        rid: &str,
        i: usize,
        plan: FilterPlan<'a>,
    ) -> Filters {
        let mut filters = plan.filters;
        for (target, numerator, denominator) in plan.mirrors {
            match self.resolve(target) {
                Backend::Cluster(cluster) => filters.mirrors.push(Mirror {
                    cluster,
                    numerator,
                    denominator,
                }),
                Backend::Invalid { reason } => self.warnings.push(format!(
                    "{kind} {rid}: spec.rules[{i}]: RequestMirror target unusable ({reason}); not mirrored"
                )),
            }
        }
        filters
    }

    /// `timeouts` as Istio converts them (policy.md 3.6): `request` is the route timeout;
    /// `backendRequest` is the per-try timeout when the rule has a `retry` stanza, else it
    /// becomes the route timeout. `0s` disables.
    fn timeouts(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        rule: &HttpRouteRule,
    ) -> (Option<Duration>, Option<Duration>) {
        let Some(t) = &rule.timeouts else {
            return (None, None);
        };
        let mut parse = |name: &str, v: &Option<String>| -> Option<Duration> {
            let v = v.as_deref()?;
            match parse_duration(v) {
                Some(d) => Some(d).filter(|d| !d.is_zero()),
                None => {
                    self.errors.push(error(
                        self.route_kind,
                        meta,
                        format!("{field}.timeouts.{name}"),
                        format!("{v:?} is not a Gateway API duration (like 1h, 10s, 500ms)"),
                    ));
                    None
                }
            }
        };
        let request = parse("request", &t.request);
        let backend = parse("backendRequest", &t.backend_request);
        if let (Some(r), Some(b)) = (request, backend)
            && b > r
        {
            self.errors.push(error(
                self.route_kind,
                meta,
                format!("{field}.timeouts.backendRequest"),
                "must not be greater than timeouts.request",
            ));
        }
        match (rule.retry.is_some(), backend) {
            (true, b) => (request, b),
            (false, Some(b)) => (Some(b), None),
            (false, None) => (request, None),
        }
    }

    /// `retry` (GEP-1731) as Istio converts it; absent = Istio's waypoint default policy.
    fn retry(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        rule: &HttpRouteRule,
    ) -> Option<RetryPolicy> {
        let Some(r) = &rule.retry else {
            return Some(RetryPolicy::default());
        };
        let mut policy = RetryPolicy::default();
        if let Some(a) = r.attempts {
            match u32::try_from(a) {
                Ok(0) => return None,
                Ok(a) => policy.retries = a,
                Err(_) => {
                    self.errors.push(error(
                        self.route_kind,
                        meta,
                        format!("{field}.retry.attempts"),
                        format!("{a} must not be negative"),
                    ));
                }
            }
        }
        for (k, c) in r.codes.iter().enumerate() {
            match u16::try_from(*c).ok().filter(|c| (400..=599).contains(c)) {
                Some(c) => policy.codes.push(c),
                None => self.errors.push(error(
                    self.route_kind,
                    meta,
                    format!("{field}.retry.codes[{k}]"),
                    format!("{c} is not a 4xx or 5xx status code"),
                )),
            }
        }
        if let Some(b) = &r.backoff {
            match parse_duration(b) {
                Some(d) => policy.backoff = d,
                None => self.errors.push(error(
                    self.route_kind,
                    meta,
                    format!("{field}.retry.backoff"),
                    format!("{b:?} is not a Gateway API duration"),
                )),
            }
        }
        Some(policy)
    }

    /// Parse `filters` of a rule (or of a backendRef). `None` = a filter we cannot apply
    /// (ExtensionRef, ExternalAuth, unknown types): the rule must answer 500.
    fn filters(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        list: &'a [HttpRouteFilter],
        backend_level: bool,
        grpc: bool,
    ) -> Option<FilterPlan<'a>> {
        let kind = self.route_kind;
        let mut plan = FilterPlan::default();
        let mut ok = true;
        let mut seen: Vec<&str> = Vec::new();
        for (k, f) in list.iter().enumerate() {
            let ff = format!("{field}.filters[{k}]");
            let t = f.type_.as_str();
            if t != "RequestMirror" {
                if seen.contains(&t) {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{ff}.type"),
                        format!("{t} may appear at most once"),
                    ));
                    continue;
                }
                seen.push(t);
            }
            // Istio supports only the header modifiers and RequestMirror on backendRefs and
            // on GRPCRoutes (conversion.go); the rest is reported like Istio's InvalidFilter.
            let limited = matches!(t, "RequestRedirect" | "URLRewrite" | "CORS");
            if limited && (backend_level || grpc) {
                let msg = if grpc {
                    "not supported on GRPCRoute"
                } else {
                    "not supported on a backendRef (Istio applies only header modifiers and RequestMirror there)"
                };
                self.errors.push(error(
                    kind,
                    meta,
                    format!("{ff}.type"),
                    format!("{t} is {msg}"),
                ));
                continue;
            }
            let missing = |s: &mut Self, member: &str| {
                s.errors.push(error(
                    kind,
                    meta,
                    format!("{ff}.{member}"),
                    format!("required when type is {t}"),
                ));
            };
            match t {
                "RequestHeaderModifier" => match &f.request_header_modifier {
                    Some(m) => {
                        plan.filters.request_headers = Some(self.header_modifier(
                            meta,
                            &format!("{ff}.requestHeaderModifier"),
                            m,
                        ))
                    }
                    None => missing(self, "requestHeaderModifier"),
                },
                "ResponseHeaderModifier" => match &f.response_header_modifier {
                    Some(m) => {
                        plan.filters.response_headers = Some(self.header_modifier(
                            meta,
                            &format!("{ff}.responseHeaderModifier"),
                            m,
                        ))
                    }
                    None => missing(self, "responseHeaderModifier"),
                },
                "RequestRedirect" => match &f.request_redirect {
                    Some(r) => {
                        plan.filters.redirect =
                            self.redirect(meta, &format!("{ff}.requestRedirect"), r)
                    }
                    None => missing(self, "requestRedirect"),
                },
                "URLRewrite" => match &f.url_rewrite {
                    Some(r) => {
                        let path = r.path.as_ref().and_then(|p| {
                            self.path_modifier(meta, &format!("{ff}.urlRewrite.path"), p)
                        });
                        plan.filters.rewrite = Some(Rewrite {
                            hostname: r.hostname.clone().filter(|h| !h.is_empty()),
                            path,
                        });
                    }
                    None => missing(self, "urlRewrite"),
                },
                "RequestMirror" => match &f.request_mirror {
                    Some(m) => {
                        if let Some(mirror) = self.mirror(meta, &format!("{ff}.requestMirror"), m) {
                            plan.mirrors.push(mirror);
                        }
                    }
                    None => missing(self, "requestMirror"),
                },
                "CORS" => self.warnings.push(format!(
                    "{kind} {}: {ff}: CORS is not implemented; ignored",
                    id(meta)
                )),
                other => {
                    self.warnings.push(format!("{kind} {}: {ff}: filter type {other:?} is not supported (Istio: InvalidFilter)", id(meta)));
                    ok = false;
                }
            }
        }
        ok.then_some(plan)
    }

    /// Rule-wide filter constraints (Gateway API CEL rules, policy.md 3.4).
    fn check_rule_filters(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        f: &FilterPlan<'a>,
        rule: &HttpRouteRule,
        matches: &[RouteMatch],
    ) {
        let kind = self.route_kind;
        if f.filters.redirect.is_some() && f.filters.rewrite.is_some() {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.filters"),
                "RequestRedirect and URLRewrite cannot both be set",
            ));
        }
        if f.filters.redirect.is_some() && !rule.backend_refs.is_empty() {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.backendRefs"),
                "must be empty when a RequestRedirect filter is set",
            ));
        }
        let prefix_modifier = |p: &Option<PathModifier>| matches!(p, Some(PathModifier::Prefix(_)));
        let uses_prefix = f
            .filters
            .rewrite
            .as_ref()
            .is_some_and(|r| prefix_modifier(&r.path))
            || f.filters
                .redirect
                .as_ref()
                .is_some_and(|r| prefix_modifier(&r.path));
        if uses_prefix
            && matches
                .iter()
                .any(|m| !matches!(m.path, PathMatch::Prefix(_)))
        {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.filters"),
                "ReplacePrefixMatch requires every match to be a PathPrefix match",
            ));
        }
    }

    fn header_modifier(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        m: &HeaderModifierSpec,
    ) -> HeaderModifier {
        let kind = self.route_kind;
        let mut out = HeaderModifier::default();
        for (list, name, dst) in [(&m.set, "set", 0), (&m.add, "add", 1)] {
            for (k, h) in list.iter().enumerate() {
                let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_str(&h.value),
                ) else {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.{name}[{k}]"),
                        format!("invalid header {:?}: {:?}", h.name, h.value),
                    ));
                    continue;
                };
                if dst == 0 {
                    out.set.push((n, v))
                } else {
                    out.add.push((n, v))
                }
            }
        }
        for (k, r) in m.remove.iter().enumerate() {
            match HeaderName::from_bytes(r.as_bytes()) {
                Ok(n) => out.remove.push(n),
                Err(_) => self.errors.push(error(
                    kind,
                    meta,
                    format!("{field}.remove[{k}]"),
                    format!("{r:?} is not a valid header name"),
                )),
            }
        }
        out
    }

    fn path_modifier(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        p: &PathModifierSpec,
    ) -> Option<PathModifier> {
        let kind = self.route_kind;
        match p.type_.as_str() {
            "ReplaceFullPath" => match p.replace_full_path.as_deref() {
                Some(v) if v.starts_with('/') => Some(PathModifier::Full(v.into())),
                Some(v) => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replaceFullPath"),
                        format!("{v:?} must start with '/'"),
                    ));
                    None
                }
                None => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replaceFullPath"),
                        "required when type is ReplaceFullPath",
                    ));
                    None
                }
            },
            "ReplacePrefixMatch" => match p.replace_prefix_match.as_deref() {
                // Istio trims the trailing `/` and treats empty as `/` (strip the prefix).
                Some(v) if v.is_empty() || v.starts_with('/') => {
                    Some(PathModifier::Prefix(v.trim_end_matches('/').into()))
                }
                Some(v) => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replacePrefixMatch"),
                        format!("{v:?} must start with '/'"),
                    ));
                    None
                }
                None => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.replacePrefixMatch"),
                        "required when type is ReplacePrefixMatch",
                    ));
                    None
                }
            },
            other => {
                self.errors.push(error(kind, meta, format!("{field}.type"), format!("unknown path modifier {other:?} (expected ReplaceFullPath or ReplacePrefixMatch)")));
                None
            }
        }
    }

    fn redirect(&mut self, meta: &ObjectMeta, field: &str, r: &RedirectSpec) -> Option<Redirect> {
        let kind = self.route_kind;
        let before = self.errors.len();
        let scheme = r.scheme.clone().filter(|s| !s.is_empty());
        if let Some(s) = &scheme
            && s != "http"
            && s != "https"
        {
            self.errors.push(error(
                kind,
                meta,
                format!("{field}.scheme"),
                format!("{s:?} must be http or https"),
            ));
        }
        let port = match r.port {
            None => None,
            Some(p) => match port_number(p) {
                Some(p) => Some(p),
                None => {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.port"),
                        format!("{p} is not a valid port (1-65535)"),
                    ));
                    None
                }
            },
        };
        let status = match r.status_code.unwrap_or(302) {
            c @ (301 | 302 | 303 | 307 | 308) => c as u16,
            c => {
                self.errors.push(error(
                    kind,
                    meta,
                    format!("{field}.statusCode"),
                    format!("{c} is not a redirect code (301, 302, 303, 307, 308)"),
                ));
                302
            }
        };
        let path = r
            .path
            .as_ref()
            .and_then(|p| self.path_modifier(meta, &format!("{field}.path"), p));
        (self.errors.len() == before).then(|| Redirect {
            scheme,
            hostname: r.hostname.clone().filter(|h| !h.is_empty()),
            port,
            path,
            status,
        })
    }

    fn mirror(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        m: &'a MirrorSpec,
    ) -> Option<MirrorPlan<'a>> {
        let kind = self.route_kind;
        let (num, den) = match (&m.percent, &m.fraction) {
            (Some(_), Some(_)) => {
                self.errors.push(error(
                    kind,
                    meta,
                    field.to_string(),
                    "percent and fraction cannot both be set",
                ));
                return None;
            }
            (Some(p), None) if (0..=100).contains(p) => (*p, 100),
            (None, Some(f)) => {
                let den = f.denominator.unwrap_or(100);
                if den <= 0 || f.numerator < 0 || f.numerator > den {
                    self.errors.push(error(
                        kind,
                        meta,
                        format!("{field}.fraction"),
                        "need 0 <= numerator <= denominator and denominator > 0",
                    ));
                    return None;
                }
                (f.numerator, den)
            }
            (None, None) => (100, 100),
            (Some(p), None) => {
                self.errors.push(error(
                    kind,
                    meta,
                    format!("{field}.percent"),
                    format!("{p} is out of range (0-100)"),
                ));
                return None;
            }
        };
        let b = &m.backend_ref;
        let target = self.backend_target(
            meta,
            &format!("{field}.backendRef"),
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
        )?;
        Some((
            target,
            u32::try_from(num).unwrap_or(0),
            u32::try_from(den).unwrap_or(100),
        ))
    }

    /// The bound (Service, port) pairs a route attaches to; everything else is a warning.
    /// `tcp`: a TCPRoute, which attaches to TCP (and undeclared) ports only, where an
    /// HTTPRoute/GRPCRoute attaches to every other port.
    fn parents(
        &mut self,
        meta: &'a ObjectMeta,
        refs: &'a [ParentReference],
        tcp: bool,
    ) -> Vec<(SvcKey<'a>, u16)> {
        let rk = self.route_kind;
        let rid = id(meta);
        let mut out = Vec::new();
        for (j, p) in refs.iter().enumerate() {
            let field = format!("spec.parentRefs[{j}]");
            let group = p
                .group
                .as_deref()
                .unwrap_or(crate::resources::GATEWAY_GROUP);
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            if !(group.is_empty() && kind == "Service") {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: parent {kind} {} (group {group:?}) is not a mesh Service parent (set group: \"\" and kind: Service); skipped",
                    p.name
                ));
                continue;
            }
            let port = match p.port {
                None => None,
                Some(n) => match port_number(n) {
                    Some(n) => Some(n),
                    None => {
                        self.errors.push(error(
                            rk,
                            meta,
                            format!("{field}.port"),
                            format!("{n} is not a valid port (1-65535)"),
                        ));
                        continue;
                    }
                },
            };
            let ns = p.namespace.as_deref().unwrap_or(&meta.namespace);
            if ns != meta.namespace {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: consumer route for Service {ns}/{} is not supported in Istio ambient; skipped",
                    p.name
                ));
                continue;
            }
            let Some((key, svc)) = self.services.get_key_value(&(ns, p.name.as_str())) else {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: parent Service {ns}/{} not found; skipped",
                    p.name
                ));
                continue;
            };
            if let Err(reason) = &svc.binding {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: {USE_WAYPOINT} label missing from parent and parent namespace; in ambient mode, route will not be respected ({reason})"
                ));
                continue;
            }
            let explicit = port.is_some() || p.section_name.is_some();
            let mut matched = false;
            for sp in &svc.ports {
                let port_ok = port.is_none_or(|n| n == sp.port);
                let section_ok = p.section_name.as_deref().is_none_or(|s| s == sp.name);
                if !(port_ok && section_ok) {
                    continue;
                }
                matched = true;
                // An HTTPRoute cannot apply to an opaque TCP port; say so only when the
                // parentRef named that port explicitly.
                let fits = match sp.protocol {
                    AppProtocol::Tcp => tcp,
                    AppProtocol::Unknown => true,
                    _ => !tcp,
                };
                if !fits {
                    if explicit {
                        self.warnings.push(format!(
                            "{rk} {rid}: {field}: Service {ns}/{} port {} is {}; {rk} ignored there",
                            p.name,
                            sp.port,
                            if tcp { "HTTP" } else { "TCP" }
                        ));
                    }
                } else if !out.contains(&(*key, sp.port)) {
                    out.push((*key, sp.port));
                }
            }
            if !matched {
                self.warnings.push(format!(
                    "{rk} {rid}: {field}: no port of Service {ns}/{} matches; skipped",
                    p.name
                ));
            }
        }
        out
    }

    fn route_match(
        &mut self,
        meta: &ObjectMeta,
        field: &str,
        m: &HttpRouteMatch,
    ) -> Option<RouteMatch> {
        let before = self.errors.len();
        let rkind = self.route_kind;
        let err = |errors: &mut Vec<ConfigError>, f: String, msg: String| {
            errors.push(error(rkind, meta, f, msg))
        };
        let (kind, value) = m.path.as_ref().map_or(("PathPrefix", "/"), |p| {
            (
                p.type_.as_deref().unwrap_or("PathPrefix"),
                p.value.as_deref().unwrap_or("/"),
            )
        });
        let path = match kind {
            "Exact" | "PathPrefix" if !value.starts_with('/') => {
                err(
                    &mut self.errors,
                    format!("{field}.path.value"),
                    format!("{value:?} must start with '/'"),
                );
                None
            }
            "Exact" => Some(PathMatch::Exact(value.into())),
            "PathPrefix" => {
                let trimmed = value.trim_end_matches('/');
                Some(PathMatch::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                }))
            }
            "RegularExpression" => match full_regex(value) {
                Ok(r) => Some(PathMatch::Regex(r)),
                Err(e) => {
                    err(&mut self.errors, format!("{field}.path.value"), e);
                    None
                }
            },
            other => {
                err(
                    &mut self.errors,
                    format!("{field}.path.type"),
                    format!(
                        "unknown path match type {other:?} (expected Exact, PathPrefix or RegularExpression)"
                    ),
                );
                None
            }
        };
        let method = match m.method.as_deref() {
            None => None,
            Some(s) if is_upper_token(s) => Method::from_bytes(s.as_bytes()).ok(),
            Some(s) => {
                err(
                    &mut self.errors,
                    format!("{field}.method"),
                    format!("{s:?} is not an upper-case HTTP method"),
                );
                None
            }
        };
        let mut headers: Vec<HeaderMatch> = Vec::new();
        for (k, h) in m.headers.iter().enumerate() {
            let f = format!("{field}.headers[{k}]");
            let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
                err(
                    &mut self.errors,
                    format!("{f}.name"),
                    format!("{:?} is not a valid header name", h.name),
                );
                continue;
            };
            let value = value_match(h, &f, &mut self.errors, meta, rkind);
            // Gateway API: if a header name repeats, only the first entry counts.
            if let Some(value) = value
                && !headers.iter().any(|x| x.name == name)
            {
                headers.push(HeaderMatch { name, value });
            }
        }
        let mut query: Vec<QueryMatch> = Vec::new();
        for (k, q) in m.query_params.iter().enumerate() {
            let f = format!("{field}.queryParams[{k}]");
            if q.name.is_empty() {
                err(
                    &mut self.errors,
                    format!("{f}.name"),
                    "must not be empty".into(),
                );
                continue;
            }
            if let Some(value) = value_match(q, &f, &mut self.errors, meta, rkind)
                && !query.iter().any(|x| x.name == q.name)
            {
                query.push(QueryMatch {
                    name: q.name.clone(),
                    value,
                });
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(RouteMatch {
            path: path?,
            method,
            headers,
            query,
        })
    }

    fn backend(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        b: &'a HttpBackendRef,
    ) -> Option<BackendPlan<'a>> {
        let weight = b.weight.unwrap_or(1);
        if !(0..=MAX_WEIGHT).contains(&weight) {
            self.errors.push(error(
                self.route_kind,
                meta,
                format!("{field}.weight"),
                format!("{weight} is out of range (0-{MAX_WEIGHT})"),
            ));
            return None;
        }
        let target = self.backend_target(
            meta,
            field,
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
        )?;
        // Zero weights are dropped (Istio conversion.go); they never receive traffic.
        let weight = u32::try_from(weight).ok().filter(|w| *w > 0)?;
        Some(BackendPlan {
            target,
            weight,
            filters: FilterPlan::default(),
        })
    }

    /// Where a backendRef (or mirror backendRef) points, or why it cannot be used. `None`
    /// only for a field error (reported). Cross-namespace references need a ReferenceGrant
    /// in the target namespace, as Istio requires (`RefNotPermitted` otherwise).
    #[allow(clippy::too_many_arguments)]
    fn backend_target(
        &mut self,
        meta: &'a ObjectMeta,
        field: &str,
        group: Option<&str>,
        kind: Option<&str>,
        name: &'a str,
        namespace: Option<&'a str>,
        port: Option<i64>,
    ) -> Option<Result<(SvcKey<'a>, u16), String>> {
        let port = match port {
            None => None,
            Some(n) => match port_number(n) {
                Some(n) => Some(n),
                None => {
                    self.errors.push(error(
                        self.route_kind,
                        meta,
                        format!("{field}.port"),
                        format!("{n} is not a valid port (1-65535)"),
                    ));
                    return None;
                }
            },
        };
        let group = group.unwrap_or("");
        let kind = kind.unwrap_or("Service");
        let ns = namespace.unwrap_or(&meta.namespace);
        Some(if !(group.is_empty() && kind == "Service") {
            Err(format!(
                "unsupported backendRef kind {kind} (group {group:?})"
            ))
        } else if ns != meta.namespace && !self.granted(&meta.namespace, ns, name) {
            Err(format!(
                "backendRef to Service {ns}/{name} from namespace {} is not permitted by a ReferenceGrant (RefNotPermitted)",
                meta.namespace
            ))
        } else if let Some(port) = port {
            Ok(((ns, name), port))
        } else {
            Err(format!(
                "backendRef to Service {ns}/{name} has no port (port is required for Service backends)"
            ))
        })
    }

    /// Whether a ReferenceGrant in `to_ns` lets routes of the current kind in `from_ns`
    /// reference Service `name`.
    fn granted(&self, from_ns: &str, to_ns: &str, name: &str) -> bool {
        let kind = self.route_kind;
        self.grants.iter().any(|g| {
            g.metadata.namespace == to_ns
                && g.spec.from.iter().any(|f| {
                    f.group == crate::resources::GATEWAY_GROUP
                        && f.kind == kind
                        && f.namespace == from_ns
                })
                && g.spec.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n.is_empty() || n == name)
                })
        })
    }
}

/// Header/query value match (`Exact` default, `RegularExpression`).
fn value_match(
    v: &HttpValueMatch,
    field: &str,
    errors: &mut Vec<ConfigError>,
    meta: &ObjectMeta,
    kind: &str,
) -> Option<MatchKind> {
    match v.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Some(MatchKind::Exact(v.value.clone())),
        "RegularExpression" => match full_regex(&v.value) {
            Ok(r) => Some(MatchKind::Regex(r)),
            Err(e) => {
                errors.push(error(kind, meta, format!("{field}.value"), e));
                None
            }
        },
        other => {
            errors.push(error(
                kind,
                meta,
                format!("{field}.type"),
                format!("unknown match type {other:?} (expected Exact or RegularExpression)"),
            ));
            None
        }
    }
}

/// A Gateway API `Duration` (GEP-2257): `^([0-9]{1,5}(h|m|s|ms)){1,4}$`.
pub(crate) fn parse_duration(v: &str) -> Option<Duration> {
    let b = v.as_bytes();
    let (mut i, mut parts, mut total) = (0, 0, Duration::ZERO);
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = v[start..i].parse().ok()?;
        let unit = if v[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else {
            let d = match b.get(i)? {
                b'h' => Duration::from_secs(n * 3600),
                b'm' => Duration::from_secs(n * 60),
                b's' => Duration::from_secs(n),
                _ => return None,
            };
            i += 1;
            d
        };
        total += unit;
        parts += 1;
    }
    (parts > 0 && parts <= 4).then_some(total)
}

/// An anchored regex: Gateway API / Envoy `safe_regex` match the whole value.
fn full_regex(v: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{v})$")).map_err(|e| format!("invalid regular expression: {e}"))
}

/// An RFC 9110 token with no lower-case letters (Gateway API methods are upper case).
fn is_upper_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

#[cfg(test)]
mod tests;
