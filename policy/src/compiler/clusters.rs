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
        let traffic = crate::traffic::cluster_policy(
            &self.traffic_rules,
            &hostname,
            key.0,
            &self.opts.root_namespace,
            &self.opts.gateway_namespace,
            port,
        );
        let locality_lb = self.locality_lb(svc, traffic.as_deref()).map(Arc::new);
        let addrs = self.endpoint_addrs(key, port, locality_lb.as_deref())?;
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
            dns: self
                .dns_targets(key, port, locality_lb.as_deref())
                .map(Arc::new),
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

    /// Locality load balancing for a cluster of `svc`, as istiod's `GetEffectiveLbSetting`
    /// and `ApplyToCluster` decide it: the DestinationRule's `localityLbSetting` (disabled:
    /// none), else the Service's `trafficDistribution`, else MeshConfig's (disabled: none).
    /// `distribute` applies when an entry's `from` matches the waypoint; failover only with
    /// outlier detection or a `trafficDistribution` (else Envoy would never leave priority
    /// 0), and locality failover only when the waypoint's locality is known.
    fn locality_lb(
        &self,
        svc: &Svc,
        traffic: Option<&crate::traffic::TrafficPolicy>,
    ) -> Option<crate::snapshot::LocalityLb> {
        let from_service = svc.traffic_distribution.setting();
        let setting = traffic
            .and_then(|t| t.locality.as_ref())
            .or(from_service.as_ref())
            .unwrap_or(&self.opts.mesh_locality);
        if !setting.enabled {
            return None;
        }
        let known = self.proxy_locality.clone();
        let proxy = known.clone().unwrap_or(crate::snapshot::Locality {
            region: Some(String::new()),
            ..Default::default()
        });
        let distribute = setting
            .distribute
            .iter()
            .find(|d| crate::snapshot::locality_matches(&proxy, &d.from))
            .map(|d| d.to.clone());
        let failover = setting.force || traffic.is_some_and(|t| t.outlier.is_some());
        let by_labels = !setting.failover_priority.is_empty();
        let by_locality = !by_labels || !setting.failover.is_empty();
        if distribute.is_none() && (!failover || (by_locality && !by_labels && known.is_none())) {
            return None;
        }
        let failover_priority = if distribute.is_some() {
            Vec::new()
        } else {
            self.proxy_priority_values(&setting.failover_priority, &proxy)
        };
        Some(crate::snapshot::LocalityLb {
            proxy,
            failover: setting.failover.clone(),
            by_locality,
            failover_priority,
            distribute,
            unready_hosts: svc.traffic_distribution != TrafficDistribution::Any,
        })
    }

    /// The waypoint's value of each `failoverPriority` label (or the `=value` given): its own
    /// labels (`CompileOptions::proxy_labels`, else its Pod's) with what istiod's
    /// `AugmentLabels` adds (locality, cluster, node, network). istiod ranks nothing when the
    /// proxy has no labels at all.
    fn proxy_priority_values(
        &self,
        labels: &[String],
        proxy: &crate::snapshot::Locality,
    ) -> Vec<(String, String)> {
        let own_pod = self.opts.own_pod.as_ref().and_then(|(ns, name)| {
            self.pods
                .get(&(ns.as_str(), name.as_str()))
                .map(|p| LabelsRef::Meta(&p.meta.labels))
        });
        let own = if self.opts.proxy_labels.is_empty() {
            own_pod
        } else {
            Some(LabelsRef::Map(&self.opts.proxy_labels))
        };
        let network = (!self.opts.network.is_empty()).then_some(self.opts.network.as_str());
        let topology = Topology {
            labels: own,
            locality: Some(proxy),
            node: (!self.opts.node_name.is_empty()).then_some(self.opts.node_name.as_str()),
            network,
        };
        labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((label, value)) => (label.to_string(), value.to_string()),
                None => (
                    l.clone(),
                    self.topology_label(&topology, l, proxy).unwrap_or_default(),
                ),
            })
            .collect()
    }

    /// A workload's label as `failoverPriority` sees it (istiod `AugmentLabels`): the
    /// locality's region, zone and subzone, the cluster and the node override its own labels
    /// when known; its network label wins over the network it is found in.
    pub(super) fn topology_label(
        &self,
        t: &Topology<'_>,
        key: &str,
        proxy: &crate::snapshot::Locality,
    ) -> Option<String> {
        let own = || t.labels.as_ref().and_then(|l| l.get(key)).cloned();
        let known = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
        match key {
            "topology.kubernetes.io/region" => known(
                t.locality
                    .and_then(|l| l.region.as_deref().or(proxy.region.as_deref())),
            )
            .or_else(own),
            "topology.kubernetes.io/zone" => {
                known(t.locality.map(|l| l.zone.as_str())).or_else(own)
            }
            "topology.istio.io/subzone" => {
                known(t.locality.map(|l| l.subzone.as_str())).or_else(own)
            }
            "topology.istio.io/cluster" => known(Some(&self.opts.cluster_id)).or_else(own),
            "kubernetes.io/hostname" => known(t.node).or_else(own),
            crate::snapshot::NETWORK_LABEL => known(own().as_deref()).or_else(|| known(t.network)),
            _ => own(),
        }
    }

    /// An endpoint's `failoverPriority` rank under `lb` (0 without one).
    pub(super) fn label_rank(
        &self,
        lb: Option<&crate::snapshot::LocalityLb>,
        t: &Topology<'_>,
    ) -> u8 {
        match lb {
            Some(lb) if !lb.failover_priority.is_empty() => {
                lb.label_rank(&|key| self.topology_label(t, key, &lb.proxy))
            }
            _ => 0,
        }
    }

    /// The network of a Pod (its label, else its namespace's), else the waypoint's own
    /// (`ISTIO_META_NETWORK`): istiod's `Network()` order, without meshNetworks.
    pub(super) fn pod_network(&self, meta: &'a ObjectMeta) -> Option<&'a str> {
        meta.labels
            .get(crate::snapshot::NETWORK_LABEL)
            .or_else(|| {
                self.namespaces
                    .get(meta.namespace.as_str())
                    .and_then(|n| n.labels.get(crate::snapshot::NETWORK_LABEL))
            })
            .map(String::as_str)
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
    /// port itself; a tunnel identity when the Pod is ambient; the Pod's workload names; with
    /// `lb`, the not-ready addresses it keeps and each endpoint's `failoverPriority` rank.
    pub(super) fn endpoint_addrs(
        &self,
        key: SvcKey<'a>,
        port: u16,
        lb: Option<&crate::snapshot::LocalityLb>,
    ) -> Option<Vec<EndpointSpec>> {
        let svc = self.services.get(&key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        if let Some(entry) = &svc.entry {
            return Some(self.entry_endpoints(entry, sp, lb));
        }
        let unready = lb.is_some_and(|l| l.unready_hosts);
        let mut addrs = BTreeMap::new();
        for slice in self.slices.get(&key).map(Vec::as_slice).unwrap_or_default() {
            let target = slice
                .ports
                .iter()
                .find(|(n, _)| *n == sp.name)
                .and_then(|(_, p)| *p)
                .or(sp.target)
                .unwrap_or(sp.port);
            for e in slice.endpoints.iter().filter(|e| e.ready || unready) {
                let addr = SocketAddr::new(e.ip, target);
                if addrs.contains_key(&addr) {
                    continue;
                }
                let info = self.endpoint_pod(e.ip, e.pod.as_ref());
                let tunnel = info
                    .filter(|i| self.pod_is_ambient(i))
                    .map(|i| self.pod_identity(i));
                let workload = info.map(|i| self.endpoint_workload(i, tunnel.clone()));
                // The Pod's locality label (as istiod reads it: `topology.istio.io/locality`,
                // else `istio-locality`), else the zone its slice gives.
                let locality = info
                    .and_then(|p| super::entries::pod_locality(p.meta))
                    .or_else(|| e.zone.clone());
                let label_rank = self.label_rank(
                    lb,
                    &Topology {
                        labels: info.map(|p| LabelsRef::Meta(&p.meta.labels)),
                        locality: locality.as_deref(),
                        node: e.node.as_deref(),
                        network: info
                            .and_then(|p| self.pod_network(p.meta))
                            .or(Some(self.opts.network.as_str())),
                    },
                );
                addrs.insert(
                    addr,
                    EndpointSpec {
                        locality,
                        label_rank,
                        ready: e.ready,
                        ..EndpointSpec::new(addr, tunnel, workload)
                    },
                );
            }
        }
        Some(addrs.into_values().collect())
    }
}

/// A workload's labels and what istiod's `AugmentLabels` adds to them, for
/// `failoverPriority`.
pub(super) struct Topology<'t> {
    pub labels: Option<LabelsRef<'t>>,
    pub locality: Option<&'t crate::snapshot::Locality>,
    pub node: Option<&'t str>,
    pub network: Option<&'t str>,
}

/// A workload's labels: a Kubernetes object's or a WorkloadEntry's.
pub(super) enum LabelsRef<'t> {
    Map(&'t BTreeMap<String, String>),
    Meta(&'t crate::resources::Labels),
}

impl LabelsRef<'_> {
    fn get(&self, key: &str) -> Option<&String> {
        match self {
            LabelsRef::Map(m) => m.get(key),
            LabelsRef::Meta(l) => l.get(key),
        }
    }
}
