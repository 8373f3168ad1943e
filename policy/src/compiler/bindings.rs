//! Service bindings: our Gateway (`istio.io/waypoint-for`, `allowedRoutes`), every Service
//! validated, which ones are bound to this waypoint and why (Istio `waypoints.go`
//! `fetchWaypointForTarget`), and the VIP index the CONNECT authority is looked up in.

use super::*;

/// Bound VIP:ports, known-but-not-bound ones (with why), and bound address ranges.
pub(super) type VipIndex = (
    HashMap<SocketAddr, Arc<ServicePort>>,
    HashMap<SocketAddr, String>,
    Vec<(ipnet::IpNet, u16, Arc<ServicePort>)>,
);

impl<'a> Compiler<'a> {
    /// Validate our Gateway and resolve `istio.io/waypoint-for`: the Gateway label, else its
    /// GatewayClass label, else `service` (Istio `gatewayToWaypointTransform`).
    pub(super) fn gateway(
        &mut self,
        g: &Gateway,
        classes: &HashMap<&str, &GatewayClass>,
    ) -> WaypointFor {
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
    pub(super) fn allowed_routes(&mut self, g: &Gateway) -> Allowed {
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
    pub(super) fn vip_index(
        &mut self,
        mut tables: HashMap<(SvcKey<'a>, u16), Candidates>,
        mut tcp_tables: HashMap<(SvcKey<'a>, u16), TcpCandidates>,
        mut tls_tables: HashMap<(SvcKey<'a>, u16), TlsCandidates>,
        authz: &AuthzIndex,
        authn: &AuthnIndex,
        telemetry: &crate::telemetry::TelemetryIndex,
    ) -> VipIndex {
        let mut bound = HashMap::new();
        let mut ranges = Vec::new();
        let mut not_bound = HashMap::new();
        let keys: Vec<SvcKey<'a>> = self.services.keys().copied().collect();
        for key in keys {
            let Some(svc) = self.services.get(&key) else {
                continue;
            };
            let (vips, binding) = (svc.vips.clone(), svc.binding.clone());
            let nets = svc.ranges.clone();
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
                        let tracing = telemetry.tracing_for(key.0, key.1);
                        let metrics = telemetry.metrics_for(key.0, key.1);
                        for net in &nets {
                            // Logged with the tunnel's own address (see `lookup_vip`).
                            let vip = SocketAddr::new(net.network(), port);
                            ranges.push((
                                *net,
                                port,
                                Arc::new(ServicePort {
                                    vip,
                                    vip_text: vip.to_string(),
                                    protocol,
                                    cluster: cluster.clone(),
                                    routes: routes.clone(),
                                    tcp_route: tcp_route.clone(),
                                    tls_routes: tls_routes.clone(),
                                    authz: authz.clone(),
                                    authn: authn.clone(),
                                    access_log: access_log.clone(),
                                    tracing: tracing.clone(),
                                    metrics: metrics.clone(),
                                }),
                            ));
                        }
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
                                    tracing: tracing.clone(),
                                    metrics: metrics.clone(),
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
        (bound, not_bound, ranges)
    }

    /// Namespace labels, plus the `kubernetes.io/metadata.name` label the API server adds to
    /// every Namespace (selectors commonly use it).
    pub(super) fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self
            .namespaces
            .get(ns)
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.into());
        labels
    }

    pub(super) fn service(
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
        let (info, binding) = self.decide_binding("Service", meta, gw, allowed, gateway_found);
        let hostname = format!(
            "{}.{}.svc.{}",
            meta.name, meta.namespace, self.opts.cluster_domain
        );
        Svc {
            vips,
            ranges: Vec::new(),
            ports,
            binding,
            info,
            hostname,
            entry: None,
            traffic_distribution: TrafficDistribution::of(
                s.spec.traffic_distribution.as_deref(),
                meta,
                self.namespaces.get(meta.namespace.as_str()).copied(),
            ),
        }
    }

    /// [`Compiler::binding`] when our Gateway is configured (else nothing is bound), with the
    /// decision as `Ok` (bound here) or the reason it is not.
    pub(super) fn decide_binding(
        &self,
        kind: &str,
        meta: &ObjectMeta,
        gw: &GatewayInfo,
        allowed: &Allowed,
        gateway_found: bool,
    ) -> (BindingInfo, Result<(), String>) {
        let info = if gateway_found {
            self.binding(kind, meta, gw, allowed)
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
        (info, binding)
    }

    /// Istio `fetchWaypointForTarget` for a Service or ServiceEntry (`kind`), seen from this
    /// waypoint: bound here, or why not, and which label decided.
    pub(super) fn binding(
        &self,
        kind: &str,
        meta: &ObjectMeta,
        gw: &GatewayInfo,
        allowed: &Allowed,
    ) -> BindingInfo {
        let svc = format!("{kind} {}", id(meta));
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
        let get =
            |labels: &'_ Labels, key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
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
        let mut named = Some(format!("{waypoint_ns}/{waypoint}"));
        let mut via = USE_WAYPOINT;
        if waypoint != *gw.name || waypoint_ns != *gw.namespace {
            // Istio 1.31 weighted canary (policy.md 3): the object that names the primary
            // waypoint may name a canary with `istio.io/use-waypoint-canary` (+`-namespace`);
            // ztunnel sends it a share of new connections, so the canary serves the Service
            // as the primary does. A canary equal to the primary is ignored
            // (`CanarySameAsPrimary`).
            let labels = if kind == BindingSource::ServiceLabel {
                &meta.labels
            } else {
                &ns_labels
            };
            let canary = get(labels, USE_WAYPOINT_CANARY).map(|c| {
                let cns =
                    get(labels, USE_WAYPOINT_CANARY_NAMESPACE).unwrap_or_else(|| ns.to_string());
                (c, cns)
            });
            match canary {
                Some((c, cns)) if c == *gw.name && cns == *gw.namespace => {
                    named = Some(format!("{cns}/{c}"));
                    via = USE_WAYPOINT_CANARY;
                }
                _ => {
                    return info(
                        BindingState::OtherWaypoint,
                        kind,
                        named,
                        format!(
                            "{svc} is bound to waypoint {waypoint_ns}/{waypoint} (label on {source})"
                        ),
                    );
                }
            }
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
            format!("{svc} uses waypoint {gw_id} ({via} label on {source})"),
        )
    }
}
