//! Clusters named as istiod names them (`inbound-vip|port|http|host`), with their endpoints,
//! and the clusters of MeshConfig extension providers.

use super::*;

impl<'a> Compiler<'a> {
    /// The cluster of one Service port, built on first use. Services bound to this waypoint
    /// get istiod's `inbound-vip` name, others an `outbound` name (protocol.md 2.5).
    pub(super) fn cluster(&mut self, key: SvcKey<'a>, port: u16) -> Option<Arc<Cluster>> {
        let ckey = (key.0.to_string(), key.1.to_string(), port);
        if let Some(c) = self.clusters.get(&ckey) {
            return Some(c.clone());
        }
        let svc = self.services.get(&key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        let hostname = &svc.hostname;
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
    pub(super) fn extension_clusters(&mut self) -> HashMap<(String, u16), Arc<Cluster>> {
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
                    "mesh config: extension provider service {service:?} port {port} is not a known Service port; a CUSTOM check that needs it is handled as the provider's failure, a tracer resolves the hostname through DNS"
                )),
            }
        }
        out
    }

    /// A cluster for one Service port with the given name; `None` for an unknown port.
    pub(super) fn build_cluster(
        &self,
        key: SvcKey<'a>,
        port: u16,
        name: String,
    ) -> Option<Cluster> {
        let svc = self.services.get(&key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        let hostname = svc.hostname.clone();
        let addrs = self.endpoint_addrs(key, port)?;
        let traffic = crate::traffic::cluster_policy(
            &self.traffic_rules,
            &hostname,
            key.0,
            &self.opts.root_namespace,
            port,
        );
        // istiod applies locality failover only with outlier detection (else Envoy would
        // never leave priority 0) and with a setting that is on: the DestinationRule's, else
        // MeshConfig's (on by default). It needs the waypoint's own locality.
        let locality_lb = match (&traffic, &self.proxy_locality) {
            (Some(t), Some(proxy)) if t.outlier.is_some() => {
                let setting = t.locality.as_ref().unwrap_or(&self.opts.mesh_locality);
                setting.enabled.then(|| {
                    Arc::new(crate::snapshot::LocalityLb {
                        proxy: proxy.clone(),
                        failover: setting.failover.clone(),
                    })
                })
            }
            _ => None,
        };
        let endpoints = crate::snapshot::endpoint_list(addrs, locality_lb.as_deref(), &[]);
        Some(Cluster {
            name: name.into(),
            hostname: hostname.clone().into(),
            service_name: key.1.into(),
            service_namespace: key.0.into(),
            port,
            protocol: sp.protocol,
            endpoint_list: arc_swap::ArcSwap::from_pointee(endpoints),
            traffic,
            dns: self.dns_targets(key, port).map(Arc::new),
            passthrough: svc
                .entry
                .as_ref()
                .is_some_and(|e| e.resolution == crate::snapshot::Resolution::None),
            dynamic_dns: svc
                .entry
                .as_ref()
                .filter(|e| e.resolution == crate::snapshot::Resolution::DynamicDns)
                .map(|_| Arc::new(crate::snapshot::DynamicDns::new(&hostname))),
            locality_lb,
        })
    }

    /// The waypoint's own locality: `--locality`, else its Pod's locality label, else the zone
    /// of its Pod's EndpointSlice endpoint (the Gateway's Service lists it).
    pub(super) fn find_proxy_locality(&self) -> Option<crate::snapshot::Locality> {
        if let Some(l) = &self.opts.locality {
            return Some(l.clone());
        }
        let (ns, name) = self.opts.own_pod.as_ref()?;
        if let Some(l) = self
            .pods
            .get(&(ns.as_str(), name.as_str()))
            .and_then(|p| super::entries::pod_locality(p.meta))
        {
            return Some((*l).clone());
        }
        self.own_zone
            .as_deref()
            .map(crate::snapshot::Locality::zone_only)
    }

    /// The endpoints of one Service port: for each ready address of the Service's slices, the
    /// slice port with the Service port's name, else the numeric targetPort, else the Service
    /// port itself; a tunnel identity when the Pod is ambient; the Pod's workload names.
    pub(super) fn endpoint_addrs(&self, key: SvcKey<'a>, port: u16) -> Option<Vec<EndpointSpec>> {
        let svc = self.services.get(&key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        if let Some(entry) = &svc.entry {
            return Some(self.entry_endpoints(entry, sp));
        }
        let mut addrs = BTreeMap::new();
        for slice in self.slices.get(&key).map(Vec::as_slice).unwrap_or_default() {
            let target = slice
                .ports
                .iter()
                .find(|(n, _)| *n == sp.name)
                .and_then(|(_, p)| *p)
                .or(sp.target)
                .unwrap_or(sp.port);
            for (i, (ip, pod)) in slice.ready.iter().enumerate() {
                let addr = SocketAddr::new(*ip, target);
                if addrs.contains_key(&addr) {
                    continue;
                }
                let info = self.endpoint_pod(*ip, pod.as_ref());
                let tunnel = info
                    .filter(|i| self.pod_is_ambient(i))
                    .map(|i| self.pod_identity(i));
                let workload = info.map(|i| self.endpoint_workload(i, tunnel.clone()));
                // The Pod's locality label (as istiod reads it: `topology.istio.io/locality`,
                // else `istio-locality`), else the zone its slice gives.
                let locality = info
                    .and_then(|p| super::entries::pod_locality(p.meta))
                    .or_else(|| slice.zones.get(i).cloned().flatten());
                addrs.insert(
                    addr,
                    EndpointSpec {
                        locality,
                        ..EndpointSpec::new(addr, tunnel, workload)
                    },
                );
            }
        }
        Some(addrs.into_values().collect())
    }
}
