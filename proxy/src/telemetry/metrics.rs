//! Istio's standard metrics as a waypoint reports them (protocol.md 4.2, 4.3), in Prometheus
//! text format, fed from the same record as the access log so the two always agree.
//!
//! - HTTP: `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes`.
//! - TCP: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
//!
//! Labels follow Istio with `reporter="waypoint"`: `source_*` from the tunnel (the peer
//! certificate's SPIFFE identity and ztunnel's CONNECT `baggage`, or the client's Pod),
//! `destination_service*` from the chosen Service and the other `destination_*` from the Pod
//! behind the chosen endpoint (Istio's waypoint reads the upstream endpoint's workload
//! metadata, protocol.md 4.3). Missing values are `unknown`, canonical revisions default to
//! `latest`.
//!
//! Cost: the ~25 labels are not built per request. Source labels are interned once per tunnel
//! ([`Metrics::source`]), destination workloads once per compiled endpoint workload
//! ([`Metrics::destination`]), Service labels once per cluster; a request only hashes
//! (source id, destination id, cluster name, code, flags) under its own thread's lock
//! ([`Sharded`]).

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use accesslog::{AccessLogRecord, ResponseFlags};
use policy::{Cluster, EndpointWorkload};

use crate::sharded::Sharded;

/// Envoy's default histogram buckets (protocol.md 4.2).
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Who sent the traffic, as far as the tunnel tells.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceLabels {
    pub principal: String,
    pub workload: String,
    pub namespace: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl SourceLabels {
    /// From the peer's SPIFFE identity and ztunnel's CONNECT `baggage` header
    /// (`k8s.cluster.name=..,k8s.namespace.name=..,k8s.deployment.name=..,service.name=..,service.version=..`).
    pub fn from_tunnel(identity: Option<&hbone::Identity>, baggage: Option<&str>) -> SourceLabels {
        let mut bag: HashMap<&str, &str> = HashMap::new();
        if let Some(b) = baggage {
            for item in b.split(',') {
                if let Some((k, v)) = item.trim().split_once('=') {
                    bag.insert(k.trim(), v.trim());
                }
            }
        }
        // Values are the client's: a label value longer than a Kubernetes name is not kept.
        let get = |k: &str| {
            bag.get(k)
                .filter(|v| !v.is_empty() && v.len() <= MAX_BAGGAGE_VALUE)
                .map(|v| v.to_string())
        };
        let workload = [
            "k8s.deployment.name",
            "k8s.statefulset.name",
            "k8s.daemonset.name",
            "k8s.job.name",
            "k8s.cronjob.name",
            "k8s.pod.name",
        ]
        .iter()
        .find_map(|k| get(k));
        let unknown = || "unknown".to_string();
        SourceLabels {
            principal: identity.map(|i| i.to_string()).unwrap_or_else(unknown),
            namespace: identity
                .map(|i| i.namespace.to_string())
                .or_else(|| get("k8s.namespace.name"))
                .unwrap_or_else(unknown),
            workload: workload.unwrap_or_else(unknown),
            canonical_service: get("service.name").unwrap_or_else(unknown),
            canonical_revision: get("service.version").unwrap_or_else(|| "latest".into()),
            app: get("service.name").unwrap_or_else(unknown),
            version: get("service.version").unwrap_or_else(unknown),
            cluster: get("k8s.cluster.name").unwrap_or_else(unknown),
        }
    }
}

impl SourceLabels {
    /// From the client Pod found in the Kubernetes API (its workload, canonical labels and
    /// our cluster), with the verified identity as principal.
    pub fn from_pod(
        identity: Option<&hbone::Identity>,
        pod: &discovery::PodMeta,
        cluster: &str,
    ) -> SourceLabels {
        let unknown = || "unknown".to_string();
        SourceLabels {
            principal: identity.map(|i| i.to_string()).unwrap_or_else(unknown),
            namespace: pod.namespace.clone(),
            workload: pod.workload.clone(),
            canonical_service: pod.canonical_service.clone(),
            canonical_revision: pod.canonical_revision.clone(),
            app: pod.app.clone().unwrap_or_else(unknown),
            version: pod.version.clone().unwrap_or_else(unknown),
            cluster: cluster.to_string(),
        }
    }
}

/// The longest `baggage` value used as a label (a DNS-1123 subdomain's 253 bytes).
const MAX_BAGGAGE_VALUE: usize = 253;

/// Interned [`SourceLabels`].
pub type SourceId = u32;

/// Sources beyond the bound share this id; rendered with `source_workload="overflow"`.
const OVERFLOW: SourceId = SourceId::MAX;

/// Interned [`DestinationLabels`]: the workload behind the chosen endpoint.
pub type DestId = u32;

/// No endpoint chosen, or an endpoint whose Pod the configuration does not have: the
/// workload labels are `unknown` (the namespace is the Service's).
pub const NO_DESTINATION: DestId = DestId::MAX;

/// Destination workloads beyond the bound share this id (`destination_workload="overflow"`).
const DEST_OVERFLOW: DestId = DestId::MAX - 1;

/// The `destination_*` labels that come from the endpoint's Pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DestinationLabels {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
    cluster: String,
}

impl DestinationLabels {
    /// No Pod known behind the endpoint: Istio's `unknown`, the workload namespace and
    /// canonical service taken from the Service (`ns`, `name`), as before a Pod is known.
    fn unknown(ns: &str, name: &str) -> DestinationLabels {
        let unknown = || "unknown".to_string();
        DestinationLabels {
            workload: unknown(),
            namespace: ns.to_string(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: name.to_string(),
            canonical_revision: "latest".into(),
            cluster: unknown(),
        }
    }

    fn of(w: &EndpointWorkload, cluster: &str) -> DestinationLabels {
        let unknown = || "unknown".to_string();
        DestinationLabels {
            workload: w.names.workload.clone(),
            namespace: w.namespace.to_string(),
            principal: w.principal.as_deref().map_or_else(unknown, str::to_string),
            app: w.names.app.clone().unwrap_or_else(unknown),
            version: w.names.version.clone().unwrap_or_else(unknown),
            canonical_service: w.names.canonical_service.clone(),
            canonical_revision: w.names.canonical_revision.clone(),
            cluster: cluster.to_string(),
        }
    }
}

/// Interned destination label sets, written when an endpoint workload is first counted.
#[derive(Default)]
struct DestTable {
    overflowed: u64,
    labels: Vec<DestinationLabels>,
    ids: HashMap<DestinationLabels, DestId>,
}

/// Tells [`Metrics`] tables apart in an [`EndpointWorkload::metrics_id`] (a test process
/// runs several waypoints; an id is only meaningful in the table that gave it).
static TABLES: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone)]
struct DestLabels {
    service: Arc<str>,
    name: Arc<str>,
    namespace: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HttpKey {
    source: SourceId,
    dest: DestId,
    cluster: Option<Arc<str>>,
    grpc: GrpcLabel,
    code: u16,
    flags: ResponseFlags,
}

/// `request_protocol` and `grpc_response_status` of a request's series: [`NOT_GRPC`],
/// [`GRPC_NO_STATUS`], or the gRPC status code.
type GrpcLabel = u16;
const NOT_GRPC: GrpcLabel = u16::MAX;
const GRPC_NO_STATUS: GrpcLabel = u16::MAX - 1;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TcpKey {
    source: SourceId,
    dest: DestId,
    cluster: Option<Arc<str>>,
    flags: ResponseFlags,
}

/// One histogram: per-bucket counts (not cumulative: an observation increments one bucket),
/// made cumulative when rendered, as Prometheus wants them.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        // Values above the last bound only count towards `+Inf` (`count`).
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
    }

    /// The `le` buckets as Prometheus renders them: each the count of values at or below it.
    fn cumulative(&self) -> [u64; BUCKETS.len()] {
        let mut out = self.buckets;
        let mut running = 0;
        for b in out.iter_mut() {
            running += *b;
            *b = running;
        }
        out
    }
}

#[derive(Debug, Clone, Default)]
struct HttpStats {
    requests: u64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl HttpStats {
    fn merge(&mut self, other: &HttpStats) {
        self.requests += other.requests;
        self.duration.merge(&other.duration);
        self.request_bytes.merge(&other.request_bytes);
        self.response_bytes.merge(&other.response_bytes);
    }
}

#[derive(Debug, Clone, Default)]
struct TcpStats {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

impl TcpStats {
    fn merge(&mut self, other: &TcpStats) {
        self.opened += other.opened;
        self.closed += other.closed;
        self.sent += other.sent;
        self.received += other.received;
    }
}

/// Interned source label sets: written once per tunnel, never per request.
#[derive(Default)]
struct SourceTable {
    overflowed: u64,
    sources: Vec<SourceLabels>,
    ids: HashMap<SourceLabels, SourceId>,
}

/// All series, summed over threads, keyed as they are rendered (a scrape builds it).
#[derive(Default)]
struct Merged {
    dests: HashMap<Arc<str>, DestLabels>,
    http: HashMap<HttpKey, HttpStats>,
    tcp: HashMap<TcpKey, TcpStats>,
}

/// The series of one cluster in one thread. Keys without the cluster name are plain
/// values: counting a request clones no `Arc` (a reference count is a write to a cache line
/// every worker shares, which is what per-thread series are for).
struct ClusterSeries {
    dest: Option<DestLabels>,
    http: HashMap<(SourceId, DestId, GrpcLabel, u16, ResponseFlags), HttpStats>,
    tcp: HashMap<(SourceId, DestId, ResponseFlags), TcpStats>,
}

/// The series one thread has counted (see [`Metrics`]), by cluster name (`""`: no cluster).
#[derive(Default)]
struct Series {
    clusters: HashMap<Arc<str>, ClusterSeries>,
}

impl Series {
    /// Run `f` on the cluster's series, looked up by name (the name is cloned only the
    /// first time this thread sees the cluster).
    fn with_cluster(&mut self, cluster: Option<&Arc<Cluster>>, f: impl FnOnce(&mut ClusterSeries)) {
        let name: &str = cluster.map_or("", |c| &c.name);
        if let Some(s) = self.clusters.get_mut(name) {
            f(s);
            return;
        }
        let mut s = ClusterSeries {
            dest: cluster.map(|c| DestLabels {
                service: c.hostname.clone(),
                name: c.service_name.clone(),
                namespace: c.service_namespace.clone(),
            }),
            http: HashMap::new(),
            tcp: HashMap::new(),
        };
        f(&mut s);
        let key = cluster.map_or_else(|| Arc::from(""), |c| c.name.clone());
        self.clusters.insert(key, s);
    }

    fn merge_into(&self, total: &mut Merged) {
        for (name, cs) in &self.clusters {
            let cluster = (!name.is_empty()).then(|| name.clone());
            if let Some(d) = &cs.dest {
                total.dests.entry(name.clone()).or_insert_with(|| d.clone());
            }
            for (&(source, dest, grpc, code, flags), v) in &cs.http {
                let key = HttpKey {
                    source,
                    dest,
                    cluster: cluster.clone(),
                    grpc,
                    code,
                    flags,
                };
                total.http.entry(key).or_default().merge(v);
            }
            for (&(source, dest, flags), v) in &cs.tcp {
                let key = TcpKey {
                    source,
                    dest,
                    cluster: cluster.clone(),
                    flags,
                };
                total.tcp.entry(key).or_default().merge(v);
            }
        }
    }
}

/// Everything behind `/stats/prometheus` that is per request or per connection.
///
/// Counted per thread ([`Sharded`]) and summed when scraped, as Envoy's thread-local stats
/// are: two workers finishing requests at the same moment never wait for each other or
/// share a cache line (benches/benches/contention.rs measures it). A series lives in each
/// thread that counted it, so the table is at most the shard count times the series.
pub struct Metrics {
    sources: Mutex<SourceTable>,
    destinations: Mutex<DestTable>,
    /// This table's tag in [`EndpointWorkload::metrics_id`].
    table: u32,
    series: Sharded<Series>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::with_shards(crate::sharded::default_shards())
    }
}

impl Metrics {
    /// With `shards` series tables instead of one per thread; `with_shards(1)` is one
    /// process-wide lock, the layout before per-thread shards (benches/benches/contention.rs
    /// compares the two).
    pub fn with_shards(shards: usize) -> Metrics {
        Metrics {
            sources: Mutex::default(),
            destinations: Mutex::default(),
            table: TABLES.fetch_add(1, Ordering::Relaxed),
            series: Sharded::new(shards),
        }
    }

    /// The id of the destination workload labels of an endpoint (`cluster`: our cluster ID,
    /// `destination_cluster`). Interned by value the first time a compiled endpoint workload
    /// is counted, then remembered on it: a request reads a number, takes no lock and hashes
    /// no names. At most `max` distinct sets; further ones share the overflow set.
    pub fn destination(
        &self,
        workload: Option<&EndpointWorkload>,
        cluster: &str,
        max: usize,
    ) -> DestId {
        let Some(w) = workload else {
            return NO_DESTINATION;
        };
        if let Some(&tagged) = w.metrics_id.get()
            && (tagged >> 32) as u32 == self.table
        {
            return tagged as DestId;
        }
        let labels = DestinationLabels::of(w, cluster);
        let Ok(mut table) = self.destinations.lock() else {
            return DEST_OVERFLOW;
        };
        let id = match table.ids.get(&labels) {
            Some(id) => *id,
            None if table.labels.len() >= max.min(DEST_OVERFLOW as usize) => {
                table.overflowed += 1;
                DEST_OVERFLOW
            }
            None => {
                let id = table.labels.len() as DestId;
                table.labels.push(labels.clone());
                table.ids.insert(labels, id);
                id
            }
        };
        // First table to count this workload keeps the slot; others look it up by value.
        let _ = w.metrics_id.set(((self.table as u64) << 32) | id as u64);
        id
    }

    /// Intern the labels of a tunnel's source (once per tunnel). At most `max` distinct
    /// sets are kept (every series is kept for the process's life, as Envoy's stats are);
    /// further sources share the overflow set and are counted.
    pub fn source(&self, labels: SourceLabels, max: usize) -> SourceId {
        let Ok(mut table) = self.sources.lock() else {
            return OVERFLOW;
        };
        if let Some(id) = table.ids.get(&labels) {
            return *id;
        }
        if table.sources.len() >= max {
            table.overflowed += 1;
            return OVERFLOW;
        }
        let id = table.sources.len() as SourceId;
        table.sources.push(labels.clone());
        table.ids.insert(labels, id);
        id
    }

    /// The labels behind a source id (`None` for the overflow set).
    pub fn source_labels(&self, id: SourceId) -> Option<SourceLabels> {
        let table = self.sources.lock().ok()?;
        table.sources.get(id as usize).cloned()
    }

    /// Sources that found the table full and were counted under `overflow`.
    pub fn sources_overflowed(&self) -> u64 {
        self.sources.lock().map(|t| t.overflowed).unwrap_or(0)
    }

    /// Endpoint workloads that found the destination table full (`destination_workload="overflow"`).
    pub fn destinations_overflowed(&self) -> u64 {
        self.destinations.lock().map(|t| t.overflowed).unwrap_or(0)
    }

    /// Count one finished HTTP request.
    pub fn record_http(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        r: &AccessLogRecord,
        grpc: bool,
    ) {
        // Istio's stats filter: `grpc_response_status` is the gRPC status of a gRPC request.
        let grpc = match (grpc, r.grpc_status) {
            (false, _) => NOT_GRPC,
            (true, None) => GRPC_NO_STATUS,
            (true, Some(code)) => code.min(GRPC_NO_STATUS - 1),
        };
        let key = (source, dest, grpc, r.response_code, r.response_flags);
        self.series.local().with_cluster(cluster, |cs| {
            let s = cs.http.entry(key).or_default();
            s.requests += 1;
            s.duration.observe(r.duration as f64);
            s.request_bytes.observe(r.bytes_received as f64);
            s.response_bytes.observe(r.bytes_sent as f64);
        });
    }

    /// A TCP connection through the waypoint opened.
    pub fn tcp_opened(&self, source: SourceId, dest: DestId, cluster: Option<&Arc<Cluster>>) {
        self.series.local().with_cluster(cluster, |cs| {
            cs.tcp
                .entry((source, dest, ResponseFlags::default()))
                .or_default()
                .opened += 1;
        });
    }

    /// A TCP connection closed, with its byte counts (`r.bytes_*`) and flags.
    pub fn tcp_closed(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        r: &AccessLogRecord,
    ) {
        self.series.local().with_cluster(cluster, |cs| {
            let s = cs.tcp.entry((source, dest, r.response_flags)).or_default();
            s.closed += 1;
            s.sent += r.bytes_sent;
            s.received += r.bytes_received;
        });
    }

    /// Prometheus text exposition, plus the proxy's own gauges/counters in `extra`
    /// (name, help, value).
    pub fn render(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        // The sources are copied out (a bounded table) so that tunnels opening during a
        // scrape do not wait for the text to be written.
        let sources = match self.sources.lock() {
            Ok(t) => t.sources.clone(),
            Err(_) => return out,
        };
        let destinations = match self.destinations.lock() {
            Ok(t) => t.labels.clone(),
            Err(_) => return out,
        };
        let mut inner = Merged::default();
        self.series.for_each(|shard| shard.merge_into(&mut inner));
        let unknown = SourceLabels::from_tunnel(None, None);
        let overflow = SourceLabels {
            workload: "overflow".into(),
            ..unknown.clone()
        };
        let labels = |source: SourceId,
                      dest: DestId,
                      cluster: &Option<Arc<str>>,
                      protocol: &str|
         -> String {
            let s = match source {
                OVERFLOW => &overflow,
                id => sources.get(id as usize).unwrap_or(&unknown),
            };
            let d = cluster.as_ref().and_then(|c| inner.dests.get(c));
            let (svc, name, ns) = match d {
                Some(d) => (&*d.service, &*d.name, &*d.namespace),
                None => ("unknown", "unknown", "unknown"),
            };
            let unknown_dest;
            let w = match dest {
                DEST_OVERFLOW => {
                    unknown_dest = DestinationLabels {
                        workload: "overflow".into(),
                        ..DestinationLabels::unknown(ns, name)
                    };
                    &unknown_dest
                }
                id => match destinations.get(id as usize) {
                    Some(w) => w,
                    None => {
                        unknown_dest = DestinationLabels::unknown(ns, name);
                        &unknown_dest
                    }
                },
            };
            format!(
                "reporter=\"waypoint\",source_workload=\"{}\",source_canonical_service=\"{}\",source_canonical_revision=\"{}\",\
source_workload_namespace=\"{}\",source_principal=\"{}\",source_app=\"{}\",source_version=\"{}\",source_cluster=\"{}\",\
destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_principal=\"{}\",\
destination_app=\"{}\",destination_version=\"{}\",destination_service=\"{svc}\",\
destination_canonical_service=\"{}\",destination_canonical_revision=\"{}\",destination_service_name=\"{name}\",\
destination_service_namespace=\"{ns}\",destination_cluster=\"{}\",request_protocol=\"{protocol}\",\
connection_security_policy=\"mutual_tls\"",
                esc(&s.workload),
                esc(&s.canonical_service),
                esc(&s.canonical_revision),
                esc(&s.namespace),
                esc(&s.principal),
                esc(&s.app),
                esc(&s.version),
                esc(&s.cluster),
                esc(&w.workload),
                esc(&w.namespace),
                esc(&w.principal),
                esc(&w.app),
                esc(&w.version),
                esc(&w.canonical_service),
                esc(&w.canonical_revision),
                esc(&w.cluster),
            )
        };
        let mut http: Vec<(&HttpKey, &HttpStats)> = inner.http.iter().collect();
        http.sort_by(|a, b| {
            (a.0.source, &a.0.cluster, a.0.dest, a.0.code).cmp(&(
                b.0.source,
                &b.0.cluster,
                b.0.dest,
                b.0.code,
            ))
        });
        let per = |k: &HttpKey| {
            let status = match k.grpc {
                NOT_GRPC | GRPC_NO_STATUS => String::new(),
                code => code.to_string(),
            };
            format!(
                "{},response_code=\"{}\",grpc_response_status=\"{status}\",response_flags=\"{}\"",
                labels(
                    k.source,
                    k.dest,
                    &k.cluster,
                    if k.grpc == NOT_GRPC { "http" } else { "grpc" }
                ),
                k.code,
                k.flags
            )
        };
        out.push_str("# TYPE istio_requests_total counter\n");
        for (k, s) in &http {
            let _ = writeln!(out, "istio_requests_total{{{}}} {}", per(k), s.requests);
        }
        for (name, pick) in [
            ("istio_request_duration_milliseconds", 0usize),
            ("istio_request_bytes", 1),
            ("istio_response_bytes", 2),
        ] {
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (k, s) in &http {
                let h = match pick {
                    0 => &s.duration,
                    1 => &s.request_bytes,
                    _ => &s.response_bytes,
                };
                let l = per(k);
                for (b, n) in BUCKETS.iter().zip(h.cumulative()) {
                    let _ = writeln!(out, "{name}_bucket{{{l},le=\"{b}\"}} {n}");
                }
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
            }
        }
        let mut tcp: Vec<(&TcpKey, &TcpStats)> = inner.tcp.iter().collect();
        tcp.sort_by(|a, b| {
            (a.0.source, &a.0.cluster, a.0.dest).cmp(&(b.0.source, &b.0.cluster, b.0.dest))
        });
        for (name, pick) in [
            ("istio_tcp_connections_opened_total", 0usize),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_sent_bytes_total", 2),
            ("istio_tcp_received_bytes_total", 3),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter");
            for (k, s) in &tcp {
                let v = [s.opened, s.closed, s.sent, s.received][pick];
                let _ = writeln!(
                    out,
                    "{name}{{{},response_flags=\"{}\"}} {v}",
                    labels(k.source, k.dest, &k.cluster, "tcp"),
                    k.flags
                );
            }
        }
        for (name, help, value) in extra {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

/// Escape a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_labels_come_from_identity_and_baggage() {
        let id: hbone::Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        let l = SourceLabels::from_tunnel(
            Some(&id),
            Some(
                "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1",
            ),
        );
        assert_eq!(l.principal, "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(l.namespace, "default");
        assert_eq!(l.workload, "sleep");
        assert_eq!(l.canonical_revision, "v1");
        assert_eq!(l.cluster, "Kubernetes");
        let none = SourceLabels::from_tunnel(None, None);
        assert_eq!(
            (none.workload.as_str(), none.canonical_revision.as_str()),
            ("unknown", "latest")
        );
    }

    #[test]
    fn source_label_sets_are_bounded_with_an_overflow_set() {
        let m = Metrics::default();
        let id: hbone::Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        let mut ids = std::collections::HashSet::new();
        for i in 0..50 {
            let bag = format!("k8s.deployment.name=w{i}");
            ids.insert(m.source(SourceLabels::from_tunnel(Some(&id), Some(&bag)), 10));
        }
        // 10 kept, the other 40 share the overflow set.
        assert_eq!(ids.len(), 11);
        assert!(ids.contains(&OVERFLOW));
        assert_eq!(m.sources_overflowed(), 40);
        // Known sets are still found when the table is full.
        let again = m.source(
            SourceLabels::from_tunnel(Some(&id), Some("k8s.deployment.name=w0")),
            10,
        );
        assert_ne!(again, OVERFLOW);
        let huge = "x".repeat(300);
        let l = SourceLabels::from_tunnel(Some(&id), Some(&format!("k8s.deployment.name={huge}")));
        assert_eq!(
            l.workload, "unknown",
            "over-long baggage values are not labels"
        );
    }

    fn workload(name: &str, principal: Option<&str>) -> policy::EndpointWorkload {
        policy::EndpointWorkload {
            namespace: "shop".into(),
            names: policy::resources::WorkloadNames {
                workload: name.into(),
                canonical_service: "web".into(),
                canonical_revision: "v2".into(),
                app: Some("web".into()),
                version: None,
            },
            principal: principal.map(Into::into),
            metrics_id: Default::default(),
        }
    }

    #[test]
    fn destination_labels_come_from_the_endpoint_workload_and_are_bounded() {
        let m = Metrics::default();
        let w = workload("web-v2", Some("spiffe://cluster.local/ns/shop/sa/web"));
        let id = m.destination(Some(&w), "Kubernetes", 2);
        // Remembered on the workload: the same id without the table.
        assert_eq!(m.destination(Some(&w), "Kubernetes", 2), id);
        // Equal labels in another compiled value: the same series.
        let same = workload("web-v2", Some("spiffe://cluster.local/ns/shop/sa/web"));
        assert_eq!(m.destination(Some(&same), "Kubernetes", 2), id);
        // Another table (another waypoint in this process) has its own ids.
        let other = Metrics::default();
        let plain = workload("other", None);
        let other_id = other.destination(Some(&plain), "Kubernetes", 2);
        assert_eq!(other.destination(Some(&w), "Kubernetes", 2), other_id + 1);
        assert_eq!(m.destination(Some(&w), "Kubernetes", 2), id);
        assert_eq!(m.destination(None, "Kubernetes", 2), NO_DESTINATION);
        m.record_http(
            0,
            id,
            None,
            &AccessLogRecord::new(std::time::SystemTime::now()),
            false,
        );
        m.record_http(
            0,
            NO_DESTINATION,
            None,
            &AccessLogRecord::new(std::time::SystemTime::now()),
            false,
        );
        let text = m.render(&[]);
        assert!(
            text.contains("destination_workload=\"web-v2\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\",destination_app=\"web\",destination_version=\"unknown\",destination_service=\"unknown\",destination_canonical_service=\"web\",destination_canonical_revision=\"v2\",destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",destination_cluster=\"Kubernetes\""),
            "{text}"
        );
        assert!(
            text.contains("destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",destination_principal=\"unknown\""),
            "{text}"
        );
        // Bounded: a third distinct set shares the overflow set.
        let third = workload("third", None);
        assert_eq!(m.destination(Some(&plain), "Kubernetes", 2), 1);
        assert_eq!(m.destination(Some(&third), "Kubernetes", 2), DEST_OVERFLOW);
        m.record_http(
            0,
            DEST_OVERFLOW,
            None,
            &AccessLogRecord::new(std::time::SystemTime::now()),
            false,
        );
        assert!(m.render(&[]).contains("destination_workload=\"overflow\""));
    }

    #[test]
    fn counts_from_many_threads_are_summed_when_scraped() {
        let m = Metrics::default();
        let mut r = AccessLogRecord::new(std::time::SystemTime::now());
        r.response_code = 200;
        r.duration = 7;
        r.bytes_sent = 100;
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        m.record_http(0, NO_DESTINATION, None, &r, false);
                    }
                });
            }
        });
        let text = m.render(&[]);
        let value = |prefix: &str, suffix: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with(prefix) && l.contains(suffix))
                .filter_map(|l| l.rsplit(' ').next().map(str::to_string))
                .collect()
        };
        assert_eq!(value("istio_requests_total{", ""), ["1000"]);
        assert_eq!(
            value("istio_request_duration_milliseconds_bucket{", "le=\"5\""),
            ["0"]
        );
        assert_eq!(
            value("istio_request_duration_milliseconds_bucket{", "le=\"10\""),
            ["1000"]
        );
        assert_eq!(
            value("istio_request_duration_milliseconds_sum{", ""),
            ["7000"]
        );
        assert_eq!(
            value("istio_response_bytes_bucket{", "le=\"+Inf\""),
            ["1000"]
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.0);
        h.observe(7.0);
        h.observe(99999999.0);
        let c = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[3], 2); // le=10
        assert_eq!(c[BUCKETS.len() - 1], 2);
        assert_eq!(h.count, 3);
    }
}
