//! ServiceEntry: each host becomes one service, as istiod makes them
//! (`serviceentry/conversion.go` `convertServices`), keyed `(namespace, host)` beside the
//! Kubernetes Services and bound to this waypoint by the same labels (`istio.io/use-waypoint`
//! on the ServiceEntry or its namespace). Its VIPs are `spec.addresses` plus the addresses
//! istiod allocated for the host (`status.addresses`); its endpoints come from `resolution`:
//! `STATIC` inline IPs, `DNS`/`DNS_ROUND_ROBIN` names the proxy resolves
//! ([`crate::DnsTargets`]), `NONE` the address each tunnel was sent to.

use super::clusters::{LabelsRef, Topology};
use super::*;
use crate::resources::ServiceEntry;
use crate::snapshot::{DnsTarget, DnsTargets, Resolution};

const KIND: &str = "ServiceEntry";

impl<'a> Compiler<'a> {
    /// Validate one ServiceEntry and add a [`Svc`] for each of its hosts.
    pub(super) fn service_entry(
        &mut self,
        se: &'a ServiceEntry,
        gw: &GatewayInfo,
        allowed: &Allowed,
        gateway_found: bool,
        vip_owner: &mut HashMap<SocketAddr, String>,
    ) {
        let errors_before = self.errors.len();
        let Some(resolution) = self.entry_resolution(se) else {
            return;
        };
        let hosts = self.entry_hosts(se, resolution);
        let (vips, ranges) = self.entry_addresses(se, resolution);
        let ports = self.entry_ports(se, resolution);
        let endpoints = self.entry_endpoint_specs(se, resolution);
        let selector = se
            .spec
            .workload_selector
            .as_ref()
            .filter(|_| se.spec.endpoints.is_empty() && resolution == Resolution::Static)
            .map(|s| (se.metadata.namespace.clone(), s.labels.clone()));
        if self.errors.len() > errors_before {
            return;
        }
        let meta = &se.metadata;
        let sid = id(meta);
        let err = |errors: &mut Vec<ConfigError>, field: String, msg: String| {
            errors.push(error(KIND, meta, field, msg));
        };
        let (info, binding) = self.decide_binding(KIND, meta, gw, allowed, gateway_found);
        let ns = meta.namespace.as_str();
        let mut keys = Vec::new();
        for (i, host) in hosts.into_iter().enumerate() {
            let key = (ns, host);
            if self.services.contains_key(&key) {
                let msg = format!(
                    "host {host:?} is already a service in namespace {ns} (a Service or another ServiceEntry)"
                );
                err(&mut self.errors, format!("spec.hosts[{i}]"), msg);
                continue;
            }
            // istiod's allocation is per host (`status.addresses[].host`).
            let mut host_vips = vips.clone();
            for (value, h) in &se.allocated {
                if (h.is_empty() || h == host)
                    && let Ok(Some(ip)) = parse_vip(value)
                    && !host_vips.contains(&ip)
                {
                    host_vips.push(ip);
                }
            }
            let mut shared = Vec::new();
            for p in &ports {
                for vip in &host_vips {
                    let addr = SocketAddr::new(*vip, p.port);
                    if let Some(owner) = vip_owner.get(&addr) {
                        if owner.starts_with(&format!("{KIND} {sid} host ")) {
                            // Several hosts of one entry on one address: a tunnel names an
                            // address, not a host, so the first host listed serves it.
                            self.warnings.push(format!(
                                "{KIND} {sid}: host {host}: {addr} is already served for {owner}; this host is not reachable there"
                            ));
                            shared.push(*vip);
                        } else {
                            let msg = format!("{addr} is already used by {owner}");
                            err(&mut self.errors, "spec.addresses".into(), msg);
                        }
                    } else {
                        vip_owner.insert(addr, format!("{KIND} {sid} host {host}"));
                    }
                }
            }
            host_vips.retain(|v| !shared.contains(v));
            if binding.is_ok() && host_vips.is_empty() && (i > 0 || ranges.is_empty()) {
                self.warnings.push(format!(
                    "{KIND} {sid}: host {host}: no address (spec.addresses, or one istiod allocates into status.addresses); ztunnel sends a waypoint only traffic for an address, so none reaches this one"
                ));
            }
            let svc = Svc {
                vips: host_vips,
                ranges: if i == 0 { ranges.clone() } else { Vec::new() },
                ports: ports
                    .iter()
                    .map(|p| SvcPort {
                        name: p.name.clone(),
                        port: p.port,
                        target: p.target,
                        protocol: p.protocol,
                    })
                    .collect(),
                binding: binding.clone(),
                info: info.clone(),
                hostname: host.to_string(),
                entry: Some(EntryPlan {
                    name: meta.name.clone(),
                    resolution,
                    endpoints: endpoints.clone(),
                    selector: selector.clone(),
                }),
                // A ServiceEntry has no field for it: the annotations only.
                traffic_distribution: TrafficDistribution::of(
                    None,
                    meta,
                    self.namespaces.get(ns).copied(),
                ),
            };
            self.services.insert(key, svc);
            keys.push(key);
        }
        self.entries.insert((ns, meta.name.as_str()), keys);
    }

    /// `spec.resolution` (and `spec.location`, checked here); `None`: the entry is not served.
    fn entry_resolution(&mut self, se: &'a ServiceEntry) -> Option<Resolution> {
        let meta = &se.metadata;
        let spec = &se.spec;
        let err = |errors: &mut Vec<ConfigError>, field: String, msg: String| {
            errors.push(error(KIND, meta, field, msg));
        };
        let resolution = match spec.resolution.as_deref() {
            // The proto's default (0) is NONE.
            None | Some("NONE") => Resolution::None,
            Some("STATIC") => Resolution::Static,
            Some("DNS") => Resolution::Dns,
            Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
            Some("DYNAMIC_DNS") => Resolution::DynamicDns,
            Some(other) => {
                err(
                    &mut self.errors,
                    "spec.resolution".into(),
                    format!(
                        "invalid value {other:?} (expected NONE, STATIC, DNS, DNS_ROUND_ROBIN or DYNAMIC_DNS)"
                    ),
                );
                return None;
            }
        };
        match spec.location.as_deref() {
            // Istio's `ValidateServiceEntry`: "location MESH_INTERNAL with resolution type
            // DYNAMIC_DNS is not supported when using waypoints".
            Some("MESH_INTERNAL") if resolution == Resolution::DynamicDns => err(
                &mut self.errors,
                "spec.location".into(),
                "MESH_INTERNAL with resolution DYNAMIC_DNS is not supported when using waypoints (expected MESH_EXTERNAL)".into(),
            ),
            None | Some("MESH_EXTERNAL") | Some("MESH_INTERNAL") => {}
            Some(other) => err(
                &mut self.errors,
                "spec.location".into(),
                format!("invalid value {other:?} (expected MESH_EXTERNAL or MESH_INTERNAL)"),
            ),
        }

        Some(resolution)
    }

    /// `spec.hosts`: DNS names; wildcards (`*.example.com`) with `DYNAMIC_DNS` only, where
    /// every host must be one (Istio's `ValidateServiceEntry`); elsewhere they are warned
    /// about and skipped.
    fn entry_hosts(&mut self, se: &'a ServiceEntry, resolution: Resolution) -> Vec<&'a str> {
        let meta = &se.metadata;
        let spec = &se.spec;
        let sid = id(meta);
        let err = |errors: &mut Vec<ConfigError>, field: String, msg: String| {
            errors.push(error(KIND, meta, field, msg));
        };
        // Hosts: DNS names; a wildcard host needs DYNAMIC_DNS (or NONE) in Istio.
        let mut hosts: Vec<&'a str> = Vec::new();
        if spec.hosts.is_empty() {
            err(
                &mut self.errors,
                "spec.hosts".into(),
                "at least one host is required".into(),
            );
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            let wildcard = h.starts_with('*');
            if resolution == Resolution::DynamicDns {
                if !wildcard {
                    err(
                        &mut self.errors,
                        field,
                        format!(
                            "{h:?}: a host must be a wildcard (*.example.com) for resolution DYNAMIC_DNS"
                        ),
                    );
                    continue;
                }
                if h.strip_prefix("*.")
                    .is_none_or(|rest| rest.contains('*') || !valid_host(rest))
                {
                    err(
                        &mut self.errors,
                        field,
                        format!("{h:?} is not a valid wildcard host (expected *.<domain>)"),
                    );
                    continue;
                }
            } else if wildcard {
                self.warnings.push(format!(
                    "{KIND} {sid}: {field}: wildcard host {h:?} is served with resolution DYNAMIC_DNS only; skipped"
                ));
                continue;
            } else if !valid_host(h) {
                err(
                    &mut self.errors,
                    field,
                    format!("{h:?} is not a valid host name"),
                );
                continue;
            }
            if hosts.contains(&h.as_str()) {
                err(&mut self.errors, field, format!("duplicate host {h:?}"));
                continue;
            }
            hosts.push(h);
        }

        hosts
    }

    /// `spec.addresses`: (single addresses, ranges served with resolution NONE).
    fn entry_addresses(
        &mut self,
        se: &'a ServiceEntry,
        resolution: Resolution,
    ) -> (Vec<IpAddr>, Vec<ipnet::IpNet>) {
        let meta = &se.metadata;
        let spec = &se.spec;
        let sid = id(meta);
        let err = |errors: &mut Vec<ConfigError>, field: String, msg: String| {
            errors.push(error(KIND, meta, field, msg));
        };
        // Addresses: IPs (a /32 or /128 CIDR is one IP); wider ranges serve every address in
        // them with `resolution: NONE` (each tunnel goes where it was sent), and are warned
        // about otherwise (a range has no single endpoint to resolve to).
        let mut vips = Vec::new();
        let mut ranges: Vec<ipnet::IpNet> = Vec::new();
        if resolution == Resolution::DynamicDns && !spec.addresses.is_empty() {
            // Istio's `ValidateServiceEntry`; the addresses istiod allocates per host
            // (`status.addresses`) are how ztunnel reaches the waypoint for these hosts.
            err(
                &mut self.errors,
                "spec.addresses".into(),
                "addresses cannot be set for resolution DYNAMIC_DNS (istiod allocates one per host into status.addresses)".into(),
            );
            return (vips, ranges);
        }
        for (i, a) in spec.addresses.iter().enumerate() {
            let field = format!("spec.addresses[{i}]");
            match parse_vip(a) {
                Ok(Some(ip)) if !vips.contains(&ip) => vips.push(ip),
                Ok(Some(_)) => {}
                Ok(None) if resolution == Resolution::None => {
                    if let Ok(net) = a.parse::<ipnet::IpNet>()
                        && !ranges.contains(&net)
                    {
                        ranges.push(net);
                    }
                }
                Ok(None) => self.warnings.push(format!(
                    "{KIND} {sid}: {field}: the range {a:?} is served only with resolution NONE; ignored"
                )),
                Err(()) => err(
                    &mut self.errors,
                    field,
                    format!("{a:?} is not an IP address or CIDR range"),
                ),
            }
        }

        (vips, ranges)
    }

    /// `spec.ports`: a number, a name, a protocol (Istio's names, upper case), a targetPort.
    fn entry_ports(&mut self, se: &'a ServiceEntry, resolution: Resolution) -> Vec<SvcPort> {
        let meta = &se.metadata;
        let spec = &se.spec;
        let sid = id(meta);
        let err = |errors: &mut Vec<ConfigError>, field: String, msg: String| {
            errors.push(error(KIND, meta, field, msg));
        };
        // Ports: a number, a name, a protocol (Istio's names, upper case), a targetPort.
        let mut ports: Vec<SvcPort> = Vec::new();
        if spec.ports.is_empty() {
            err(
                &mut self.errors,
                "spec.ports".into(),
                "at least one port is required".into(),
            );
        }
        for (i, p) in spec.ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let Some(number) = port_number(p.number) else {
                err(
                    &mut self.errors,
                    format!("{field}.number"),
                    format!("{} is not a valid port (1-65535)", p.number),
                );
                continue;
            };
            let target = match p.target_port {
                None => number,
                Some(t) => match port_number(t) {
                    Some(t) => t,
                    None => {
                        err(
                            &mut self.errors,
                            format!("{field}.targetPort"),
                            format!("{t} is not a valid port (1-65535)"),
                        );
                        continue;
                    }
                },
            };
            let protocol = match p.protocol.as_deref() {
                None | Some("") => AppProtocol::Unknown,
                Some(proto) => match parse_protocol(&proto.to_ascii_lowercase()) {
                    Some(p) => p,
                    None if matches!(proto, "UDP" | "UNSUPPORTED") => {
                        // Waypoints carry no UDP (istiod skips these ports too).
                        continue;
                    }
                    None => {
                        err(
                            &mut self.errors,
                            format!("{field}.protocol"),
                            format!(
                                "unknown protocol {proto:?} (expected HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP or TLS)"
                            ),
                        );
                        continue;
                    }
                },
            };
            if ports.iter().any(|q| q.port == number) {
                err(
                    &mut self.errors,
                    format!("{field}.number"),
                    format!("duplicate port {number}"),
                );
                continue;
            }
            if resolution == Resolution::DynamicDns {
                // Istio's `ValidateServiceEntry`: HTTP, TLS, GRPC and HTTP2 only. istiod
                // renders TLS ports of a wildcard entry only behind
                // ENABLE_WILDCARD_HOST_SERVICE_ENTRIES_FOR_TLS (off by default: SNI can be
                // spoofed), so they are not served here either.
                let proto = p.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
                match proto.as_str() {
                    "HTTP" | "GRPC" | "HTTP2" => {}
                    "TLS" => {
                        self.warnings.push(format!(
                            "{KIND} {sid}: {field}: TLS ports of a DYNAMIC_DNS entry are not served (istiod renders them only with ENABLE_WILDCARD_HOST_SERVICE_ENTRIES_FOR_TLS, off by default); skipped"
                        ));
                        continue;
                    }
                    _ => {
                        err(
                            &mut self.errors,
                            format!("{field}.protocol"),
                            format!(
                                "{:?}: only HTTP, TLS, GRPC and HTTP2 are supported for resolution DYNAMIC_DNS",
                                p.protocol.as_deref().unwrap_or("")
                            ),
                        );
                        continue;
                    }
                }
            }
            ports.push(SvcPort {
                name: p.name.clone(),
                port: number,
                target: Some(target),
                protocol,
            });
        }

        ports
    }

    /// `spec.endpoints` (and `workloadSelector`): (address, port name -> port).
    fn entry_endpoint_specs(
        &mut self,
        se: &'a ServiceEntry,
        resolution: Resolution,
    ) -> Vec<EntryEndpoint> {
        let meta = &se.metadata;
        let spec = &se.spec;
        let sid = id(meta);
        let err = |errors: &mut Vec<ConfigError>, field: String, msg: String| {
            errors.push(error(KIND, meta, field, msg));
        };
        // Endpoints, checked against the resolution (Istio `ValidateServiceEntry`).
        let mut endpoints = Vec::new();
        if spec.workload_selector.is_some() {
            if !spec.endpoints.is_empty() {
                err(
                    &mut self.errors,
                    "spec.workloadSelector".into(),
                    "only one of workloadSelector or endpoints can be set".into(),
                );
            } else if resolution != Resolution::Static {
                self.warnings.push(format!(
                    "{KIND} {sid}: spec.workloadSelector: Pods and WorkloadEntries are selected for resolution STATIC only; ignored"
                ));
            }
        }
        if resolution == Resolution::None && !spec.endpoints.is_empty() {
            err(
                &mut self.errors,
                "spec.endpoints".into(),
                "no endpoints should be provided for resolution type NONE".into(),
            );
        }
        if resolution == Resolution::DynamicDns && !spec.endpoints.is_empty() {
            err(
                &mut self.errors,
                "spec.endpoints".into(),
                "endpoints cannot be set for resolution DYNAMIC_DNS (the request's Host is resolved)".into(),
            );
            return endpoints;
        }
        for (i, e) in spec.endpoints.iter().enumerate() {
            let field = format!("spec.endpoints[{i}]");
            if e.address.starts_with("unix://") {
                self.warnings.push(format!(
                    "{KIND} {sid}: {field}.address: unix domain sockets are not reachable from a waypoint; skipped"
                ));
                continue;
            }
            let is_ip = e.address.parse::<IpAddr>().is_ok();
            let ok = match resolution {
                Resolution::Static => is_ip,
                _ => is_ip || valid_host(&e.address),
            };
            if !ok {
                let want = if resolution == Resolution::Static {
                    "an IP address (resolution STATIC)"
                } else {
                    "an IP address or host name"
                };
                err(
                    &mut self.errors,
                    format!("{field}.address"),
                    format!("{:?} is not {want}", e.address),
                );
                continue;
            }
            let mut by_name = BTreeMap::new();
            for (name, p) in &e.ports {
                match port_number(*p) {
                    Some(p) => {
                        by_name.insert(name.clone(), p);
                    }
                    None => err(
                        &mut self.errors,
                        format!("{field}.ports.{name}"),
                        format!("{p} is not a valid port (1-65535)"),
                    ),
                }
            }
            if e.network.is_some() {
                self.warnings.push(format!(
                    "{KIND} {sid}: {field}.network: used for failoverPriority only; this waypoint reaches endpoints of other networks directly, not through their network's gateway"
                ));
            }
            let weight = match endpoint_weight(e.weight) {
                Ok(w) => w,
                Err(msg) => {
                    err(&mut self.errors, format!("{field}.weight"), msg);
                    continue;
                }
            };
            endpoints.push(EntryEndpoint {
                address: e.address.clone(),
                locality: e
                    .locality
                    .as_deref()
                    .filter(|l| !l.is_empty())
                    .map(|l| Arc::new(crate::snapshot::Locality::parse(l))),
                ports: by_name,
                weight,
                labels: e.labels.clone(),
                network: e.network.clone().filter(|n| !n.is_empty()),
            });
        }
        endpoints
    }

    /// A WorkloadEntry, validated: an IP address (a host name only serves DNS entries, which
    /// resolve their own endpoints) and its ports.
    pub(super) fn workload_entry(&mut self, w: &'a crate::resources::WorkloadEntry) {
        let meta = &w.metadata;
        let Ok(ip) = w.spec.address.parse::<IpAddr>() else {
            self.warnings.push(format!(
                "WorkloadEntry {}: spec.address {:?} is not an IP address; ServiceEntries select it only by IP",
                id(meta),
                w.spec.address
            ));
            return;
        };
        let mut ports = BTreeMap::new();
        for (name, p) in &w.spec.ports {
            match port_number(*p) {
                Some(p) => {
                    ports.insert(name.clone(), p);
                }
                None => self.errors.push(error(
                    "WorkloadEntry",
                    meta,
                    format!("spec.ports.{name}"),
                    format!("{p} is not a valid port (1-65535)"),
                )),
            }
        }
        let weight = match endpoint_weight(w.spec.weight) {
            Ok(weight) => weight,
            Err(msg) => {
                self.errors
                    .push(error("WorkloadEntry", meta, "spec.weight".to_string(), msg));
                return;
            }
        };
        self.workload_entries.push(WorkloadEntryInfo {
            meta,
            labels: &w.spec.labels,
            ip,
            ports,
            weight,
            network: w.spec.network.as_deref().filter(|n| !n.is_empty()),
            locality: w
                .spec
                .locality
                .as_deref()
                .filter(|l| !l.is_empty())
                .map(|l| Arc::new(crate::snapshot::Locality::parse(l))),
        });
    }

    /// The Pods and WorkloadEntries a `workloadSelector` picks, as endpoints of `sp` (istiod
    /// `serviceentry` controller): same namespace, every selector label present. A Pod's
    /// port is the targetPort (else the port), reached over HBONE when the Pod is in the
    /// ambient mesh; a WorkloadEntry's is its port of that name, else the same, plain TCP.
    fn selected_endpoints(
        &self,
        (ns, labels): &(String, BTreeMap<String, String>),
        sp: &SvcPort,
        lb: Option<&crate::snapshot::LocalityLb>,
        out: &mut Vec<EndpointSpec>,
    ) {
        let pod_matches =
            |p: &PodInfo<'_>| labels.iter().all(|(k, v)| p.meta.labels.get(k) == Some(v));
        let entry_matches =
            |w: &WorkloadEntryInfo<'_>| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v));
        let port = sp.target.unwrap_or(sp.port);
        let mut pods: Vec<&PodInfo<'_>> = self
            .pods
            .values()
            .filter(|p| p.meta.namespace == *ns && pod_matches(p))
            .collect();
        pods.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        for pod in pods {
            let identity = self.pod_identity(pod);
            let tunnel = self.pod_is_ambient(pod).then(|| identity.clone());
            let workload = self.endpoint_workload(pod, Some(identity));
            let locality = pod_locality(pod.meta);
            let label_rank = self.label_rank(
                lb,
                &Topology {
                    labels: Some(LabelsRef::Meta(&pod.meta.labels)),
                    locality: locality.as_deref(),
                    node: None,
                    network: self
                        .pod_network(pod.meta)
                        .or(Some(self.opts.network.as_str())),
                },
            );
            for ip in &pod.ips {
                let addr = SocketAddr::new(*ip, port);
                if !out.iter().any(|e| e.addr == addr) {
                    out.push(EndpointSpec {
                        locality: locality.clone(),
                        label_rank,
                        ..EndpointSpec::new(addr, tunnel.clone(), Some(workload.clone()))
                    });
                }
            }
        }
        for w in &self.workload_entries {
            if w.meta.namespace != *ns || !entry_matches(w) {
                continue;
            }
            let p = w.ports.get(&sp.name).copied().unwrap_or(port);
            let addr = SocketAddr::new(w.ip, p);
            if !out.iter().any(|e| e.addr == addr) {
                let label_rank = self.label_rank(
                    lb,
                    &Topology {
                        labels: Some(LabelsRef::Map(w.labels)),
                        locality: w.locality.as_deref(),
                        node: None,
                        network: w.network.or(Some(self.opts.network.as_str())),
                    },
                );
                out.push(EndpointSpec {
                    weight: w.weight,
                    locality: w.locality.clone(),
                    label_rank,
                    ..EndpointSpec::new(addr, None, None)
                });
            }
        }
    }

    /// The endpoints compiled in for one port of a ServiceEntry host: the inline IPs of a
    /// `STATIC` entry (port: the endpoint's port of that name, else the targetPort, else the
    /// port), plain TCP (no HBONE: istiod `supportTunnel` is false for them), or the Pods and
    /// WorkloadEntries its `workloadSelector` picks. DNS and NONE entries get theirs at run
    /// time.
    pub(super) fn entry_endpoints(
        &self,
        entry: &EntryPlan,
        sp: &SvcPort,
        lb: Option<&crate::snapshot::LocalityLb>,
    ) -> Vec<EndpointSpec> {
        if entry.resolution != Resolution::Static {
            return Vec::new();
        }
        let mut out: Vec<EndpointSpec> = Vec::new();
        if let Some(selector) = &entry.selector {
            self.selected_endpoints(selector, sp, lb, &mut out);
        }
        for e in &entry.endpoints {
            let Ok(ip) = e.address.parse::<IpAddr>() else {
                continue;
            };
            let port = e
                .ports
                .get(&sp.name)
                .copied()
                .or(sp.target)
                .unwrap_or(sp.port);
            let addr = SocketAddr::new(ip, port);
            if !out.iter().any(|o| o.addr == addr) {
                let label_rank = self.entry_label_rank(lb, e);
                out.push(EndpointSpec {
                    weight: e.weight,
                    locality: e.locality.clone(),
                    label_rank,
                    ..EndpointSpec::new(addr, None, None)
                });
            }
        }
        out
    }

    /// The names a `DNS`/`DNS_ROUND_ROBIN` host's endpoints are resolved from: its endpoints'
    /// addresses, else the host itself (istiod: "the hosts are resolved when no endpoints are
    /// given"), each with its port, weight, locality and (under `lb`) label rank.
    pub(super) fn dns_targets(
        &self,
        key: SvcKey<'a>,
        port: u16,
        lb: Option<&crate::snapshot::LocalityLb>,
    ) -> Option<DnsTargets> {
        let svc = self.services.get(&key)?;
        let entry = svc.entry.as_ref()?;
        let first_only = match entry.resolution {
            Resolution::Dns => false,
            Resolution::DnsRoundRobin => true,
            _ => return None,
        };
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        let target = sp.target.unwrap_or(sp.port);
        let mut names: Vec<DnsTarget> = Vec::new();
        if entry.endpoints.is_empty() {
            names.push(DnsTarget {
                name: svc.hostname.as_str().into(),
                port: target,
                weight: 1,
                locality: None,
                label_rank: 0,
            });
        }
        for e in &entry.endpoints {
            let p = e.ports.get(&sp.name).copied().unwrap_or(target);
            if !names.iter().any(|t| *t.name == *e.address && t.port == p) {
                names.push(DnsTarget {
                    name: e.address.as_str().into(),
                    port: p,
                    weight: e.weight,
                    locality: e.locality.clone(),
                    label_rank: self.entry_label_rank(lb, e),
                });
            }
        }
        Some(DnsTargets { names, first_only })
    }

    /// A ServiceEntry endpoint's `failoverPriority` rank under `lb` (its labels, locality and
    /// network; the waypoint's network when it names none).
    fn entry_label_rank(&self, lb: Option<&crate::snapshot::LocalityLb>, e: &EntryEndpoint) -> u8 {
        self.label_rank(
            lb,
            &Topology {
                labels: Some(LabelsRef::Map(&e.labels)),
                locality: e.locality.as_deref(),
                node: None,
                network: e.network.as_deref().or(Some(self.opts.network.as_str())),
            },
        )
    }

    /// The Service or ServiceEntry host keys a `ServiceEntry` reference names.
    pub(super) fn entry_keys(&self, ns: &str, name: &str) -> Option<Vec<SvcKey<'a>>> {
        // The map is covariant in its key: looked up with the caller's shorter-lived strings.
        let entries: &HashMap<SvcKey<'_>, Vec<SvcKey<'a>>> = &self.entries;
        entries.get(&(ns, name)).cloned()
    }

    /// A `Hostname` backendRef (group `networking.istio.io`): the ServiceEntry host of that
    /// name, in the route's namespace first, else any namespace (first by name).
    pub(super) fn host_key(&self, route_ns: &str, host: &str) -> Option<SvcKey<'a>> {
        // Only ServiceEntry hosts: the entries' keys, not every Service.
        self.entries
            .values()
            .flatten()
            .filter(|k| k.1 == host)
            .copied()
            .min_by_key(|k| (k.0 != route_ns, k.0))
    }
}

/// A Pod's locality label, as istiod reads it (`topology.istio.io/locality`, else the older
/// `istio-locality`; `region.zone.subzone`).
pub(super) fn pod_locality(meta: &ObjectMeta) -> Option<Arc<crate::snapshot::Locality>> {
    meta.labels
        .get("topology.istio.io/locality")
        .or_else(|| meta.labels.get("istio-locality"))
        .filter(|l| !l.is_empty())
        .map(|l| Arc::new(crate::snapshot::Locality::from_label(l)))
}

/// An address of `spec.addresses`: `Some(ip)`; `None` for a range wider than one address.
fn parse_vip(a: &str) -> Result<Option<IpAddr>, ()> {
    if let Ok(ip) = a.parse::<IpAddr>() {
        return Ok(Some(ip));
    }
    match a.parse::<ipnet::IpNet>() {
        Ok(net) if net.prefix_len() == net.max_prefix_len() => Ok(Some(net.addr())),
        Ok(_) => Ok(None),
        Err(_) => Err(()),
    }
}

/// A DNS name as Istio validates ServiceEntry hosts (labels of letters, digits and `-`, at
/// most 63 bytes each, 253 in all); a short name (no dot) is allowed.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A ServiceEntry endpoint's or WorkloadEntry's `weight` (a uint32 in istio/api): unset and
/// 0 are 1, as istiod renders `load_balancing_weight` (Envoy rejects 0).
fn endpoint_weight(w: Option<i64>) -> Result<u32, String> {
    match w {
        None | Some(0) => Ok(1),
        Some(w) => {
            u32::try_from(w).map_err(|_| format!("{w} is not a valid weight (0-4294967295)"))
        }
    }
}
