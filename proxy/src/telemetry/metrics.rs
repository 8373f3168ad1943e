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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use accesslog::{AccessLogRecord, ResponseFlags};
use policy::{Cluster, EndpointWorkload, IstioMetric, MetricsSpec, TagRule};

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
    /// No Pod known behind the endpoint: every label `unknown`, as Istio's stats filter
    /// writes them for a waypoint (`istio_stats.cc` `populatePeerInfo`, reporter
    /// ServerGateway) when the upstream endpoint carries no workload metadata.
    fn unknown() -> DestinationLabels {
        let unknown = || "unknown".to_string();
        DestinationLabels {
            workload: unknown(),
            namespace: unknown(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
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

/// A request's (or connection's) Telemetry `metrics` overrides: the merged spec and the
/// value of each of its expressions, evaluated once (Istio evaluates an HTTP stream's at its
/// end, a TCP connection's before its first metric).
#[derive(Debug, Clone)]
pub struct Overrides {
    pub spec: Arc<MetricsSpec>,
    pub values: Box<[Box<str>]>,
}

/// What tells apart series counted under overrides: the spec (its id) and the values.
type OverrideKey = (u64, Box<[Box<str>]>);

/// Series with overrides (a thread's) beyond this many share one series per spec whose
/// values are all `overflow`: an expression over a request header must not let clients
/// grow the table without bound.
pub const MAX_OVERRIDE_SERIES: usize = 10_000;

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
    http: HashMap<(HttpKey, Option<OverrideKey>), HttpStats>,
    tcp: HashMap<(TcpKey, Option<OverrideKey>), TcpStats>,
    grpc: HashMap<MergedGrpcKey, GrpcStats>,
    specs: HashMap<u64, Arc<MetricsSpec>>,
}

/// The series of one cluster in one thread. Keys without the cluster name are plain
/// values: counting a request clones no `Arc` (a reference count is a write to a cache line
/// every worker shares, which is what per-thread series are for).
struct ClusterSeries {
    dest: Option<DestLabels>,
    http: HashMap<(SourceId, DestId, GrpcLabel, u16, ResponseFlags), HttpStats>,
    tcp: HashMap<(SourceId, DestId, ResponseFlags), TcpStats>,
    /// gRPC messages (`istio_request_messages_total`, `istio_response_messages_total`):
    /// Istio's stats filter counts them under the peer labels only.
    grpc: HashMap<(SourceId, DestId), GrpcStats>,
    /// The same under Telemetry overrides, by overrides first (so that a lookup borrows the
    /// request's values instead of copying them).
    http_over: OverriddenSeries<HttpSeriesKey, HttpStats>,
    tcp_over: OverriddenSeries<TcpSeriesKey, TcpStats>,
    grpc_over: OverriddenSeries<(SourceId, DestId), GrpcStats>,
}

/// Series counted under Telemetry overrides: by overrides, then by the family's own key.
type OverriddenSeries<K, S> = HashMap<OverrideKey, HashMap<K, S>>;

/// (source, destination workload, cluster name, overrides) of a merged gRPC message series.
type MergedGrpcKey = (SourceId, DestId, Option<Arc<str>>, Option<OverrideKey>);

type HttpSeriesKey = (SourceId, DestId, GrpcLabel, u16, ResponseFlags);
type TcpSeriesKey = (SourceId, DestId, ResponseFlags);

/// gRPC messages of streams, each way.
#[derive(Debug, Clone, Copy, Default)]
struct GrpcStats {
    requests: u64,
    responses: u64,
}

/// The series one thread has counted (see [`Metrics`]), by cluster name (`""`: no cluster).
#[derive(Default)]
struct Series {
    clusters: HashMap<Arc<str>, ClusterSeries>,
    /// The override specs series were counted under, by id (kept for rendering).
    specs: HashMap<u64, Arc<MetricsSpec>>,
    /// Series under overrides in this thread (bounded by [`MAX_OVERRIDE_SERIES`]).
    override_series: usize,
}

/// The key a series under overrides is counted with: `over`'s values, or all `overflow`
/// when the thread's table is full and the series is new (`exists` tells, given the
/// cluster's series).
fn override_key(
    series: &mut Series,
    cluster: Option<&Arc<Cluster>>,
    over: Overrides,
    exists: impl FnOnce(&mut ClusterSeries, &OverrideKey) -> bool,
    overflowed: &std::sync::atomic::AtomicU64,
) -> OverrideKey {
    let id = over.spec.id;
    series.specs.entry(id).or_insert(over.spec);
    let key = (id, over.values);
    let name: &str = cluster.map_or("", |c| &c.name);
    if series
        .clusters
        .get_mut(name)
        .is_some_and(|cs| exists(cs, &key))
    {
        return key;
    }
    if series.override_series >= MAX_OVERRIDE_SERIES {
        overflowed.fetch_add(1, Ordering::Relaxed);
        let values = key.1.iter().map(|_| Box::from("overflow")).collect();
        return (id, values);
    }
    series.override_series += 1;
    key
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
            grpc: HashMap::new(),
            http_over: HashMap::new(),
            tcp_over: HashMap::new(),
            grpc_over: HashMap::new(),
        };
        f(&mut s);
        let key = cluster.map_or_else(|| Arc::from(""), |c| c.name.clone());
        self.clusters.insert(key, s);
    }

    fn merge_into(&self, total: &mut Merged) {
        for (id, spec) in &self.specs {
            total.specs.entry(*id).or_insert_with(|| spec.clone());
        }
        for (name, cs) in &self.clusters {
            let cluster = (!name.is_empty()).then(|| name.clone());
            if let Some(d) = &cs.dest {
                total.dests.entry(name.clone()).or_insert_with(|| d.clone());
            }
            let http_key = |&(source, dest, grpc, code, flags): &(
                SourceId,
                DestId,
                GrpcLabel,
                u16,
                ResponseFlags,
            )| HttpKey {
                source,
                dest,
                cluster: cluster.clone(),
                grpc,
                code,
                flags,
            };
            for (k, v) in &cs.http {
                total.http.entry((http_key(k), None)).or_default().merge(v);
            }
            for (o, m) in &cs.http_over {
                for (k, v) in m {
                    let key = (http_key(k), Some(o.clone()));
                    total.http.entry(key).or_default().merge(v);
                }
            }
            let tcp_key = |&(source, dest, flags): &(SourceId, DestId, ResponseFlags)| TcpKey {
                source,
                dest,
                cluster: cluster.clone(),
                flags,
            };
            for (k, v) in &cs.tcp {
                total.tcp.entry((tcp_key(k), None)).or_default().merge(v);
            }
            for (o, m) in &cs.tcp_over {
                for (k, v) in m {
                    let key = (tcp_key(k), Some(o.clone()));
                    total.tcp.entry(key).or_default().merge(v);
                }
            }
            for (&(source, dest), v) in &cs.grpc {
                let e = total
                    .grpc
                    .entry((source, dest, cluster.clone(), None))
                    .or_default();
                e.requests += v.requests;
                e.responses += v.responses;
            }
            for (o, m) in &cs.grpc_over {
                for (&(source, dest), v) in m {
                    let e = total
                        .grpc
                        .entry((source, dest, cluster.clone(), Some(o.clone())))
                        .or_default();
                    e.requests += v.requests;
                    e.responses += v.responses;
                }
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
    /// Requests and connections counted under the overflow series of their overrides.
    overrides_overflowed: std::sync::atomic::AtomicU64,
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
            overrides_overflowed: Default::default(),
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

    /// Requests and connections counted under an `overflow` override series.
    pub fn overrides_overflowed(&self) -> u64 {
        self.overrides_overflowed.load(Ordering::Relaxed)
    }

    /// Count one finished HTTP request; `over`: the Service's Telemetry overrides (`None`:
    /// Istio's standard metrics, the fast path).
    pub fn record_http(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        r: &AccessLogRecord,
        grpc: bool,
        over: Option<Overrides>,
    ) {
        // Istio's stats filter: `grpc_response_status` is the gRPC status of a gRPC request.
        let grpc = match (grpc, r.grpc_status) {
            (false, _) => NOT_GRPC,
            (true, None) => GRPC_NO_STATUS,
            (true, Some(code)) => code.min(GRPC_NO_STATUS - 1),
        };
        let key = (source, dest, grpc, r.response_code, r.response_flags);
        let count = |s: &mut HttpStats| {
            s.requests += 1;
            s.duration.observe(r.duration as f64);
            s.request_bytes.observe(r.bytes_received as f64);
            s.response_bytes.observe(r.bytes_sent as f64);
        };
        self.count(
            cluster,
            key,
            over,
            |cs| (&mut cs.http, &mut cs.http_over),
            count,
        );
    }

    /// gRPC messages of a stream since its last report (Istio's stats filter reports them
    /// every `reportingInterval` and at the end, under the peer labels only).
    pub fn record_grpc_messages(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        requests: u64,
        responses: u64,
        over: Option<Overrides>,
    ) {
        if requests == 0 && responses == 0 {
            return;
        }
        let key = (source, dest);
        let count = |s: &mut GrpcStats| {
            s.requests += requests;
            s.responses += responses;
        };
        self.count(
            cluster,
            key,
            over,
            |cs| (&mut cs.grpc, &mut cs.grpc_over),
            count,
        );
    }

    /// A TCP connection through the waypoint opened.
    pub fn tcp_opened(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        over: Option<Overrides>,
    ) {
        self.tcp(source, dest, cluster, ResponseFlags::default(), over, |s| {
            s.opened += 1
        });
    }

    /// A TCP connection closed, with its byte counts (`r.bytes_*`) and flags.
    pub fn tcp_closed(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        r: &AccessLogRecord,
        over: Option<Overrides>,
    ) {
        self.tcp(source, dest, cluster, r.response_flags, over, |s| {
            s.closed += 1;
            s.sent += r.bytes_sent;
            s.received += r.bytes_received;
        });
    }

    fn tcp(
        &self,
        source: SourceId,
        dest: DestId,
        cluster: Option<&Arc<Cluster>>,
        flags: ResponseFlags,
        over: Option<Overrides>,
        count: impl FnOnce(&mut TcpStats),
    ) {
        let key = (source, dest, flags);
        self.count(
            cluster,
            key,
            over,
            |cs| (&mut cs.tcp, &mut cs.tcp_over),
            count,
        );
    }

    /// Count into this thread's series `key` of one family (`table` picks its plain and its
    /// overridden map): the plain series without overrides, none when they turn every metric
    /// off, else the series of the overrides' values (bounded, see [`override_key`]).
    fn count<K: std::hash::Hash + Eq, S: Default>(
        &self,
        cluster: Option<&Arc<Cluster>>,
        key: K,
        over: Option<Overrides>,
        table: impl Fn(&mut ClusterSeries) -> (&mut HashMap<K, S>, &mut OverriddenSeries<K, S>),
        count: impl FnOnce(&mut S),
    ) {
        let mut series = self.series.local();
        match over {
            None => series.with_cluster(cluster, |cs| count(table(cs).0.entry(key).or_default())),
            Some(o) if o.spec.disabled => {}
            Some(o) => {
                let o = override_key(
                    &mut series,
                    cluster,
                    o,
                    |cs, o| table(cs).1.get(o).is_some_and(|m| m.contains_key(&key)),
                    &self.overrides_overflowed,
                );
                series.with_cluster(cluster, |cs| {
                    count(table(cs).1.entry(o).or_default().entry(key).or_default())
                });
            }
        }
    }

    /// Prometheus text exposition, plus the proxy's own gauges/counters in `extra`
    /// (name, help, value).
    ///
    /// Every series is written with Istio's labels, then the Telemetry overrides it was
    /// counted under (if any) are applied per metric: a dropped metric is not written, tags
    /// are removed, replaced or appended; series whose labels become equal are summed, as
    /// Envoy's stats are (a removed tag merges its series).
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
        // Istio's peer labels of a series, in the stats filter's order.
        let peer = |source: SourceId, dest: DestId, cluster: &Option<Arc<str>>| -> Labels {
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
                        ..DestinationLabels::unknown()
                    };
                    &unknown_dest
                }
                id => match destinations.get(id as usize) {
                    Some(w) => w,
                    None => {
                        unknown_dest = DestinationLabels::unknown();
                        &unknown_dest
                    }
                },
            };
            peer_labels(s, w, (svc, name, ns))
        };
        let specs = &inner.specs;
        // The labels of `metric` for a series counted under `over`; `None`: not reported.
        let labelled = |mut labels: Labels, over: &Option<OverrideKey>, metric: IstioMetric| {
            let over = over
                .as_ref()
                .and_then(|(id, values)| specs.get(id).map(|s| (&**s, &values[..])));
            apply_overrides(&mut labels, over, metric).then(|| label_text(&labels))
        };

        // HTTP: one counter and three histograms per series.
        let mut requests: BTreeMap<String, u64> = BTreeMap::new();
        let mut histograms: [BTreeMap<String, Histogram>; 3] = Default::default();
        for ((k, over), s) in &inner.http {
            let status = match k.grpc {
                NOT_GRPC | GRPC_NO_STATUS => String::new(),
                code => code.to_string(),
            };
            let mut labels = peer(k.source, k.dest, &k.cluster);
            let protocol = if k.grpc == NOT_GRPC { "http" } else { "grpc" };
            labels.extend([
                (Cow::Borrowed("request_protocol"), protocol.to_string()),
                (
                    Cow::Borrowed("connection_security_policy"),
                    "mutual_tls".into(),
                ),
                (Cow::Borrowed("response_code"), k.code.to_string()),
                (Cow::Borrowed("grpc_response_status"), status),
                (Cow::Borrowed("response_flags"), k.flags.to_string()),
            ]);
            if let Some(l) = labelled(labels.clone(), over, IstioMetric::RequestCount) {
                *requests.entry(l).or_default() += s.requests;
            }
            for (i, (metric, h)) in [
                (IstioMetric::RequestDuration, &s.duration),
                (IstioMetric::RequestSize, &s.request_bytes),
                (IstioMetric::ResponseSize, &s.response_bytes),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(l) = labelled(labels.clone(), over, metric) {
                    histograms[i].entry(l).or_default().merge(h);
                }
            }
        }
        write_counter(&mut out, IstioMetric::RequestCount, &requests);
        for (metric, series) in [
            IstioMetric::RequestDuration,
            IstioMetric::RequestSize,
            IstioMetric::ResponseSize,
        ]
        .into_iter()
        .zip(&histograms)
        {
            write_histogram(&mut out, metric, series);
        }

        // gRPC messages: the peer labels only (the stats filter reports them before it adds
        // the protocol, code and flags).
        if !inner.grpc.is_empty() {
            let mut counts: [BTreeMap<String, u64>; 2] = Default::default();
            for ((source, dest, cluster, over), s) in &inner.grpc {
                let labels = peer(*source, *dest, cluster);
                for (i, (metric, v)) in [
                    (IstioMetric::GrpcRequestMessages, s.requests),
                    (IstioMetric::GrpcResponseMessages, s.responses),
                ]
                .into_iter()
                .enumerate()
                {
                    if let Some(l) = labelled(labels.clone(), over, metric) {
                        *counts[i].entry(l).or_default() += v;
                    }
                }
            }
            write_counter(&mut out, IstioMetric::GrpcRequestMessages, &counts[0]);
            write_counter(&mut out, IstioMetric::GrpcResponseMessages, &counts[1]);
        }

        // TCP: four counters per series.
        let mut tcp: [BTreeMap<String, u64>; 4] = Default::default();
        for ((k, over), s) in &inner.tcp {
            let mut labels = peer(k.source, k.dest, &k.cluster);
            labels.extend([
                (Cow::Borrowed("request_protocol"), "tcp".to_string()),
                (
                    Cow::Borrowed("connection_security_policy"),
                    "mutual_tls".into(),
                ),
                (Cow::Borrowed("response_flags"), k.flags.to_string()),
            ]);
            for (i, (metric, v)) in [
                (IstioMetric::TcpOpenedConnections, s.opened),
                (IstioMetric::TcpClosedConnections, s.closed),
                (IstioMetric::TcpSentBytes, s.sent),
                (IstioMetric::TcpReceivedBytes, s.received),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(l) = labelled(labels.clone(), over, metric) {
                    *tcp[i].entry(l).or_default() += v;
                }
            }
        }
        for (metric, series) in [
            IstioMetric::TcpOpenedConnections,
            IstioMetric::TcpClosedConnections,
            IstioMetric::TcpSentBytes,
            IstioMetric::TcpReceivedBytes,
        ]
        .into_iter()
        .zip(&tcp)
        {
            write_counter(&mut out, metric, series);
        }
        write_extra(&mut out, extra);
        out
    }
}

/// Istio's peer labels of a series, in the stats filter's order: the source's, then the
/// destination workload's and Service's (`service`: host, name, namespace).
fn peer_labels(
    s: &SourceLabels,
    w: &DestinationLabels,
    (svc, name, ns): (&str, &str, &str),
) -> Labels {
    let l = |n: &'static str, v: &str| (Cow::Borrowed(n), v.to_string());
    vec![
        l("reporter", "waypoint"),
        l("source_workload", &s.workload),
        l("source_canonical_service", &s.canonical_service),
        l("source_canonical_revision", &s.canonical_revision),
        l("source_workload_namespace", &s.namespace),
        l("source_principal", &s.principal),
        l("source_app", &s.app),
        l("source_version", &s.version),
        l("source_cluster", &s.cluster),
        l("destination_workload", &w.workload),
        l("destination_workload_namespace", &w.namespace),
        l("destination_principal", &w.principal),
        l("destination_app", &w.app),
        l("destination_version", &w.version),
        l("destination_service", svc),
        l("destination_canonical_service", &w.canonical_service),
        l("destination_canonical_revision", &w.canonical_revision),
        l("destination_service_name", name),
        l("destination_service_namespace", ns),
        l("destination_cluster", &w.cluster),
    ]
}

/// One Prometheus histogram: its buckets, sum and count per label set.
fn write_histogram(out: &mut String, metric: IstioMetric, series: &BTreeMap<String, Histogram>) {
    let name = metric.prometheus_name();
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (l, h) in series {
        for (b, n) in BUCKETS.iter().zip(h.cumulative()) {
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
    }
}

/// The waypoint's own series (`_total` ones are counters, the rest gauges).
fn write_extra(out: &mut String, extra: &[(&str, &str, u64)]) {
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
}

/// What Telemetry `metrics` changes for a Service's traffic, for `waypoint explain`
/// (`None`: Istio's standard metrics).
pub fn describe(policy: &policy::MetricsPolicy) -> Option<String> {
    let spec = policy.spec()?;
    let from = spec.sources.join(", ");
    if spec.disabled {
        return Some(format!("{from}: every istio_* metric off"));
    }
    let mut parts = Vec::new();
    for m in IstioMetric::ALL {
        let rule = spec.rule(m);
        if rule.drop {
            parts.push(format!("{} off", m.prometheus_name()));
            continue;
        }
        if rule.tags.is_empty() {
            continue;
        }
        let tags: Vec<String> = rule
            .tags
            .iter()
            .map(|(tag, r)| match r {
                TagRule::Remove => format!("-{tag}"),
                TagRule::Set(i) => format!("{tag}={}", spec.expressions[*i].text),
            })
            .collect();
        parts.push(format!("{} [{}]", m.prometheus_name(), tags.join(", ")));
    }
    if let Some(d) = spec.reporting_interval {
        parts.push(format!("reporting every {}", humantime::format_duration(d)));
    }
    Some(format!("{from}: {}", parts.join("; ")))
}

/// A series' labels, in order: (name, value unescaped).
type Labels = Vec<(Cow<'static, str>, String)>;

/// Every tag Istio's stats filter writes (`istio_stats.cc` `all_tags_`): `REMOVE` and
/// `UPSERT` of these act on a metric only where it has the tag; other names are new tags.
const STANDARD_TAGS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];

/// Apply `metric`'s rule of `over` (spec and evaluated values) to `labels`; `false` when
/// the metric is not reported.
fn apply_overrides(
    labels: &mut Labels,
    over: Option<(&MetricsSpec, &[Box<str>])>,
    metric: IstioMetric,
) -> bool {
    let Some((spec, values)) = over else {
        return true;
    };
    let rule = spec.rule(metric);
    if spec.disabled || rule.drop {
        return false;
    }
    let value = |i: usize| {
        values
            .get(i)
            .map_or_else(|| "unknown".to_string(), |v| v.to_string())
    };
    for (tag, r) in &rule.tags {
        match (labels.iter().position(|(n, _)| n == tag), r) {
            (Some(i), TagRule::Remove) => {
                labels.remove(i);
            }
            (Some(i), TagRule::Set(e)) => labels[i].1 = value(*e),
            (None, _) if STANDARD_TAGS.contains(&tag.as_str()) => {}
            (None, TagRule::Set(e)) => labels.push((Cow::Owned(label_name(tag)), value(*e))),
            (None, TagRule::Remove) => {}
        }
    }
    true
}

/// A tag name as Envoy's Prometheus output writes it: characters outside `[a-zA-Z0-9_]`
/// become `_`, and a leading digit gets a `_` prefix.
fn label_name(tag: &str) -> String {
    let mut out: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn label_text(labels: &Labels) -> String {
    let mut out = String::with_capacity(labels.len() * 40);
    for (i, (n, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{n}=\"{}\"", esc(v));
    }
    out
}

fn write_counter(out: &mut String, metric: IstioMetric, series: &BTreeMap<String, u64>) {
    let name = metric.prometheus_name();
    let _ = writeln!(out, "# TYPE {name} counter");
    for (l, v) in series {
        let _ = writeln!(out, "{name}{{{l}}} {v}");
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
            None,
        );
        m.record_http(
            0,
            NO_DESTINATION,
            None,
            &AccessLogRecord::new(std::time::SystemTime::now()),
            false,
            None,
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
            None,
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
                        m.record_http(0, NO_DESTINATION, None, &r, false, None);
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

    fn overrides(yaml: serde_json::Value, r: &AccessLogRecord) -> Overrides {
        let p = policy::MetricsPolicy::from_spec(yaml, &Default::default()).unwrap();
        crate::request::log::metric_overrides(&p, r, None, None).unwrap()
    }

    #[test]
    fn override_series_are_bounded_per_thread_with_an_overflow_series() {
        let m = Metrics::default();
        let spec = serde_json::json!([{"overrides": [
            {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {"path": {"value": "request.path"}}}
        ]}]);
        let mut r = AccessLogRecord::new(std::time::SystemTime::now());
        r.method = Some("GET".into());
        r.response_code = 200;
        for i in 0..MAX_OVERRIDE_SERIES + 5 {
            r.path = Some(format!("/{i}"));
            let o = overrides(spec.clone(), &r);
            m.record_http(0, NO_DESTINATION, None, &r, false, Some(o));
        }
        // Counting a known series again is not an overflow.
        r.path = Some("/0".into());
        let o = overrides(spec.clone(), &r);
        m.record_http(0, NO_DESTINATION, None, &r, false, Some(o));
        assert_eq!(m.overrides_overflowed(), 5);
        let text = m.render(&[]);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(lines.len(), MAX_OVERRIDE_SERIES + 1);
        assert!(lines.iter().any(|l| l.ends_with(",path=\"overflow\"} 5")));
        assert!(lines.iter().any(|l| l.ends_with(",path=\"/0\"} 2")));
    }

    #[test]
    fn tcp_metrics_follow_their_overrides() {
        let m = Metrics::default();
        let spec = serde_json::json!([{"overrides": [
            {"match": {"metric": "TCP_SENT_BYTES"}, "disabled": true},
            {"match": {"metric": "TCP_OPENED_CONNECTIONS"}, "tagOverrides": {
                "response_flags": {"operation": "REMOVE"},
                "destination_port": {"value": "destination.port"}}}
        ]}]);
        let mut r = AccessLogRecord::new(std::time::SystemTime::now());
        r.downstream_local_address = Some("10.0.0.1:9000".into());
        let o = overrides(spec, &r);
        m.tcp_opened(0, NO_DESTINATION, None, Some(o.clone()));
        r.bytes_sent = 10;
        m.tcp_closed(0, NO_DESTINATION, None, &r, Some(o));
        let text = m.render(&[]);
        assert!(!text.contains("istio_tcp_sent_bytes_total{"), "{text}");
        let opened = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap();
        assert!(
            opened.ends_with(",destination_port=\"9000\"} 1"),
            "{opened}"
        );
        assert!(!opened.contains("response_flags"), "{opened}");
        assert!(text.contains("istio_tcp_received_bytes_total{"));
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
