//! Pods and EndpointSlices: ready endpoints by Service port, ambient pods (reached over HBONE,
//! with their SPIFFE identity), and the pods this waypoint serves workload-addressed traffic
//! for.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn pod(&mut self, p: &'a crate::resources::Pod) {
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
    pub(super) fn pod_is_ambient(&self, pod: &PodInfo<'_>) -> bool {
        match pod.meta.labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some("ambient") => true,
            Some(_) => false,
            None => self
                .namespace_labels(&pod.meta.namespace)
                .get(DATAPLANE_MODE)
                .is_some_and(|m| m == "ambient"),
        }
    }

    pub(super) fn pod_identity(&self, pod: &PodInfo<'_>) -> Arc<str> {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.opts.trust_domain, pod.meta.namespace, pod.service_account
        )
        .into()
    }

    /// The Pod behind an endpoint: by the endpoint's `targetRef`, else by IP.
    pub(super) fn endpoint_pod<'s>(
        &'s self,
        ip: IpAddr,
        pod: Option<&'s (String, String)>,
    ) -> Option<&'s PodInfo<'s>> {
        let key = match pod {
            // A map lookup, not a scan: this runs once per endpoint.
            Some((ns, name)) => self
                .pods
                .get_key_value(&(ns.as_str(), name.as_str()))
                .map(|(k, _)| *k),
            None => self.pods_by_ip.get(&ip).copied(),
        }?;
        self.pods.get(&key)
    }

    /// The `destination_*` metric labels of a Pod's endpoints, one shared value per workload
    /// and principal within this compile (a Deployment's replicas share it).
    pub(super) fn endpoint_workload(
        &self,
        pod: &PodInfo<'_>,
        principal: Option<Arc<str>>,
    ) -> Arc<EndpointWorkload> {
        let names = WorkloadNames::of(pod.meta);
        let key = (pod.meta.namespace.clone(), names, principal);
        let mut interned = self.endpoint_workloads.borrow_mut();
        interned
            .entry(key)
            .or_insert_with_key(|(ns, names, principal)| {
                Arc::new(EndpointWorkload {
                    namespace: ns.as_str().into(),
                    names: names.clone(),
                    principal: principal.clone(),
                    metrics_id: Default::default(),
                })
            })
            .clone()
    }

    /// Pods whose workload traffic this waypoint serves (protocol.md 2.10): the Gateway's
    /// `waypoint-for` is `workload` or `all`; the Pod's own `istio.io/use-waypoint`, else its
    /// namespace's, names this Gateway (`none` opts out; a Service label never applies to
    /// workload traffic); the namespace is admitted by allowedRoutes; the pod is ambient
    /// (ztunnel only redirects captured pods).
    pub(super) fn workloads(
        &mut self,
        gw: &GatewayInfo,
        allowed: &Allowed,
    ) -> HashMap<IpAddr, Arc<Workload>> {
        let mut out = HashMap::new();
        if !matches!(gw.waypoint_for, WaypointFor::Workload | WaypointFor::All) {
            return out;
        }
        for info in self.pods.values() {
            let meta = info.meta;
            let ns = meta.namespace.as_str();
            let ns_labels = self.namespace_labels(ns);
            let get =
                |labels: &Labels, key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
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
            let identity = self.pod_identity(info);
            let w = Arc::new(Workload {
                namespace: meta.namespace.as_str().into(),
                name: meta.name.as_str().into(),
                labels: self.endpoint_workload(info, Some(identity.clone())),
                identity,
                ambient: true,
            });
            for ip in &info.ips {
                out.insert(*ip, w.clone());
            }
        }
        out
    }

    pub(super) fn slice(&mut self, s: &'a crate::resources::EndpointSlice) {
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
            endpoints: Vec::new(),
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
            let zone = e
                .zone
                .as_deref()
                .filter(|z| !z.is_empty())
                .map(|z| Arc::new(crate::snapshot::Locality::zone_only(z)));
            if let (Some((ns, name)), Some(z)) = (&pod, &e.zone)
                && self
                    .opts
                    .own_pod
                    .as_ref()
                    .is_some_and(|(own_ns, own)| own_ns == ns && own == name)
            {
                self.own_zone = Some(z.clone());
            }
            // istiod `endpointHealthStatus`: not ready and terminating (or not saying) is
            // Terminating, never sent; not ready and not terminating is UnHealthy.
            let unhealthy = !ready && e.conditions.terminating == Some(false);
            let node: Option<Arc<str>> = e.node_name.as_deref().map(Into::into);
            for (j, a) in e.addresses.iter().enumerate() {
                match a.parse::<IpAddr>() {
                    Ok(ip) if ready || unhealthy => slice.endpoints.push(SliceEndpoint {
                        ip,
                        pod: pod.clone(),
                        zone: zone.clone(),
                        node: node.clone(),
                        ready,
                    }),
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
}
