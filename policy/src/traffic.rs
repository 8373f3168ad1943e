//! DestinationRule traffic policy on the waypoint's clusters, as istiod renders it for a
//! waypoint (`cluster_waypoint.go`, `cluster_traffic_policy.go`; protocol.md 2.7):
//!
//! - `loadBalancer.simple`: `LEAST_REQUEST` (Envoy's default, two random choices, also for
//!   `UNSPECIFIED`), `ROUND_ROBIN`, `RANDOM`; `loadBalancer.consistentHash` by header,
//!   cookie (generated with its `ttl` when absent), source IP or query parameter, on a ring
//!   (`ringHash`, default) or a Maglev table ([`HashRing`]); `localityLbSetting` (`enabled`,
//!   `failover`, `failoverPriority`, `distribute`), applied per cluster as
//!   [`crate::snapshot::LocalityLb`].
//! - `connectionPool`: `http.http2MaxRequests` (Envoy `max_requests`: requests in flight to
//!   the cluster; beyond it 503 `UO`), `tcp.maxConnections` and `http.http1MaxPendingRequests`
//!   (Envoy `max_connections`, `max_pending_requests`), `http.maxRequestsPerConnection`, `http.maxRetries`
//!   (retries in flight; beyond it no retry), `http.idleTimeout` (idle pooled connections),
//!   `tcp.connectTimeout`, `tcp.idleTimeout` (TCP proxying).
//! - `outlierDetection`: `consecutive5xxErrors` (and the deprecated `consecutiveErrors`),
//!   `consecutiveGatewayErrors`, `baseEjectionTime` (times the host's ejection multiplier, at
//!   most 300 s as Envoy's `max_ejection_time`; the host returns at the first `interval` tick
//!   after it, and each tick it spends healthy takes one off the multiplier, as Envoy's
//!   detector does), `maxEjectionPercent` (Istio's default 10),
//!   `minHealthPercent` (Envoy's panic threshold: below it every host is used again).
//! - `tls`: SIMPLE and MUTUAL origination to plaintext endpoints ([`TlsOrigination`]), the
//!   certificates from files or from a `credentialName` Secret in the waypoint's namespace
//!   ([`TlsCredential`]); DISABLE turns it off.
//! - `portLevelSettings`: per Service port, each part replaces the top-level one.
//!
//! Which rule applies to a Service: `host` is its FQDN, its short name (in the rule's
//! namespace) or a `*.` wildcard suffix. As istiod picks one for a proxy ([`rule_for`]): a
//! rule in the waypoint's namespace first, then one the Service's namespace exports to the
//! waypoint's (`exportTo`), then one the root namespace exports to it; within a namespace an
//! exact host beats a wildcard and an older rule a newer one. Fields this waypoint does not apply (`subsets`, which no Gateway API
//! route can name, `h2UpgradePolicy`, ...) are warnings naming the field, never silently
//! dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::ConfigError;
use crate::duration::parse_proto_duration;
use crate::resources::{
    ConnectionPoolSpec, DestinationRule, LoadBalancerSpec, ObjectMeta, OutlierDetectionSpec,
};

/// Envoy's `max_ejection_time` default: an ejection never lasts longer.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// How a cluster picks an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// `consistentHash`: a key from the request picks the endpoint on a ring (ring hash) or
    /// a lookup table (Maglev), so the same key keeps reaching the same endpoint while the
    /// endpoints stay, and few keys move when one comes or goes.
    ConsistentHash(HashPolicy),
}

/// What `consistentHash` hashes and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    pub key: HashKey,
    pub table: HashTable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `httpHeaderName` (lower case).
    Header(String),
    /// `httpCookie`: with a `ttl`, a missing cookie is generated and set on the response
    /// (Envoy: `name="<16 hex>"; Max-Age=<ttl>; Path=<path>; HttpOnly`).
    Cookie {
        name: String,
        path: String,
        ttl: Option<Duration>,
    },
    /// `useSourceIp`.
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParam(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashTable {
    /// `ringHash.minimumRingSize` (Istio's default 1024), or the deprecated `minimumRingSize`.
    Ring { min_size: u64 },
    /// `maglev.tableSize` (Envoy's default 65537, a prime).
    Maglev { table_size: u64 },
}

/// Outlier detection settings (defaults as Istio documents them).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    /// Consecutive 5xx (and locally originated failures) before ejection; `None`: off.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (and connect failures) before ejection; `None`: off.
    pub consecutive_gateway: Option<u32>,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
    /// Envoy's detector tick (`interval`, 10 s by default): an ejected host returns at the
    /// first tick after its ejection time, and each tick a host spends healthy takes one off
    /// its ejection multiplier.
    pub interval: Duration,
}

/// The compiled traffic policy of one cluster, with its run-time counters (one per cluster:
/// Envoy's circuit breakers count per cluster).
#[derive(Debug, Default)]
pub struct TrafficPolicy {
    /// `DestinationRule ns/name`, for `/config_dump` and `explain`.
    pub source: String,
    pub lb: LbPolicy,
    /// Slow start for new endpoints (ROUND_ROBIN and LEAST_REQUEST only, as in Istio).
    pub warmup: Option<Warmup>,
    /// `loadBalancer.localityLbSetting`; `None`: MeshConfig's applies.
    pub locality: Option<crate::snapshot::LocalitySetting>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    /// `retryBudget` as Envoy receives it from istiod: (budget percent, min retry
    /// concurrency); replaces `max_retries` when set.
    pub retry_budget: Option<(f64, u32)>,
    /// `tcp.maxConnections` (Envoy `max_connections`).
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests` (Envoy `max_pending_requests`).
    pub max_pending_requests: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub tcp_idle_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive`: Envoy's cluster `upstream_connection_options.tcp_keepalive`, on
    /// the sockets to plaintext (or TLS-originated) endpoints.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `tcp.maxConnectionDuration`: Envoy's `common_http_protocol_options.max_connection_duration`;
    /// an upstream HTTP connection older than this takes no new request and closes when its
    /// requests are done.
    pub max_connection_duration: Option<Duration>,
    pub outlier: Option<OutlierPolicy>,
    /// The proxy's connection breaker for `max_connections`, made on first use.
    pub breaker: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
    /// Requests in flight to the cluster (for `max_requests`).
    pub active_requests: AtomicU32,
    /// Retries in flight (for `max_retries`).
    pub active_retries: AtomicU32,
    /// Requests refused by a circuit breaker (`UO`).
    pub overflows: AtomicU64,
    /// Endpoints ejected by outlier detection, ever.
    pub ejections_total: AtomicU64,
    /// DestinationRule `tls` (SIMPLE or MUTUAL origination to plaintext endpoints).
    pub tls: Option<Arc<TlsOrigination>>,
    /// The consistent-hash table of the current endpoint list (`ConsistentHash` only).
    pub ring: arc_swap::ArcSwapOption<RingCache>,
    /// Next round-robin position.
    pub rr: AtomicU64,
}

/// TCP keepalive as istiod renders it (`applyConnectionPool`): SO_KEEPALIVE on, and each
/// parameter set only when given (else the kernel's); times in whole seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// A request (or retry) counted in flight against a circuit breaker; given back when dropped
/// (a request's rides with its response body, as Envoy counts a request until it ends).
#[derive(Debug)]
pub struct Slot {
    policy: Arc<TrafficPolicy>,
    retry: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = if self.retry {
            &self.policy.active_retries
        } else {
            &self.policy.active_requests
        };
        c.fetch_sub(1, Ordering::Relaxed);
    }
}

fn take(counter: &AtomicU32, max: Option<u32>) -> bool {
    let prev = counter.fetch_add(1, Ordering::Relaxed);
    if let Some(max) = max
        && prev >= max
    {
        counter.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

impl TrafficPolicy {
    /// Retries allowed in flight now: with a retry budget, Envoy's
    /// `max(budget_percent/100 x (active + pending requests), min_retry_concurrency)`
    /// (`ResourceManagerImpl::RetryBudgetImpl::max`; requests waiting for a connection are
    /// in `active_requests` here), else `maxRetries`.
    pub fn retry_limit(&self) -> Option<u32> {
        match self.retry_budget {
            Some((percent, min)) => {
                let active = f64::from(self.active_requests.load(Ordering::Relaxed));
                let share = (percent / 100.0 * active) as u32;
                Some(share.max(min))
            }
            None => self.max_retries,
        }
    }

    /// A request slot, or `None` when `http2MaxRequests` requests are in flight (Envoy's
    /// `max_requests` circuit breaker: 503 `UO`).
    pub fn request_slot(self: &Arc<Self>) -> Option<Slot> {
        if take(&self.active_requests, self.max_requests) {
            return Some(Slot {
                policy: self.clone(),
                retry: false,
            });
        }
        self.overflows.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// A retry slot, or `None` when `maxRetries` retries are in flight (Envoy's
    /// `max_retries`: the retry is not made).
    pub fn retry_slot(self: &Arc<Self>) -> Option<Slot> {
        take(&self.active_retries, self.retry_limit()).then(|| Slot {
            policy: self.clone(),
            retry: true,
        })
    }
}

/// DestinationRule `loadBalancer.warmup` (or `warmupDurationSecs`), rendered by istiod as
/// Envoy's `slow_start_config`: an endpoint added less than `window` ago gets
/// `max(min_percent/100, (age/window)^(1/aggression))` of its share
/// (`source/common/upstream/load_balancer_impl.cc` `applySlowStartFactor`; Envoy's defaults:
/// aggression 1.0, minimum weight 10%).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warmup {
    pub window: Duration,
    pub min_percent: f64,
    pub aggression: f64,
}

impl Warmup {
    /// The weight factor (0..=1] of an endpoint `age` after it was added.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let t = age.as_secs_f64() / self.window.as_secs_f64();
        t.powf(1.0 / self.aggression).max(self.min_percent / 100.0)
    }
}

/// One DestinationRule, compiled: its top-level policy parts and its per-port overrides.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub namespace: String,
    pub name: String,
    /// Exact host (FQDN), or the suffix after `*` of a wildcard host (`.default.svc...`).
    pub host: HostMatch,
    /// (absent timestamp, creationTimestamp) for precedence: older first.
    pub age: (bool, String),
    pub top: Parts,
    pub ports: Vec<(u16, Parts)>,
    /// `trafficPolicy.retryBudget` (top level only, as in Istio's API).
    pub retry_budget: Option<(f64, u32)>,
    /// `exportTo`: `*` (or empty) everyone, `.` its own namespace, else namespace names.
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostMatch {
    Exact(String),
    /// `a.b` / `a.b.svc`: a Service completed as `a.b.svc.<domain>`, or the name as written
    /// (a ServiceEntry host such as `example.com`).
    ExactOr(String, String),
    Suffix(String),
}

/// The parts port-level settings can override.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    pub lb: Option<LbPolicy>,
    /// `loadBalancer.localityLbSetting` (goes with `lb`).
    pub locality: Option<crate::snapshot::LocalitySetting>,
    /// `loadBalancer.warmup` / `warmupDurationSecs` (goes with `lb`).
    pub warmup: Option<Warmup>,
    pub pool: Option<PoolParts>,
    pub outlier: Option<OutlierPolicy>,
    /// `Some(None)`: `tls.mode: DISABLE` (overrides a top-level origination).
    pub tls: Option<Option<Arc<TlsOrigination>>>,
}

/// DestinationRule `tls` with mode SIMPLE or MUTUAL: the waypoint originates TLS to the
/// cluster's plaintext endpoints (not to HBONE ones, which carry mTLS already: istiod's
/// `supportTunnel`). Files are paths in the waypoint's filesystem, as for Envoy.
#[derive(Debug)]
pub struct TlsOrigination {
    pub mutual: bool,
    /// PEM roots to verify the server with; `None`: the system's roots.
    pub ca_certificates: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    /// `credentialName`: a Secret in the waypoint's namespace holds the certificates instead
    /// of the files (Istio applies it at gateways, which a waypoint is).
    pub credential_name: Option<String>,
    /// The Secret's credential as found when compiling, or why not (connections then fail
    /// with that reason, never in plaintext).
    pub credential: Option<Result<Arc<TlsCredential>, String>>,
    /// The SNI sent and the name verified (when `subject_alt_names` is empty); `None`: the
    /// Service's hostname.
    pub sni: Option<String>,
    /// The server certificate must carry one of these names.
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
    /// The TLS client configuration the proxy builds on first use (files read then), kept
    /// here so it is built once per compiled rule.
    pub client_config: std::sync::OnceLock<Result<Arc<dyn std::any::Any + Send + Sync>, String>>,
}

/// Finds a `credentialName` credential: (Secret name, MUTUAL) -> the credential or why not.
pub(crate) type CredentialLookup<'a> =
    dyn Fn(&str, bool) -> Result<Arc<TlsCredential>, String> + 'a;

/// The PEM blocks a `credentialName` Secret gives (Istio `secrets.go`: `tls.crt`/`cert`,
/// `tls.key`/`key`, `ca.crt`/`cacert`, the CA possibly in a `<name>-cacert` Secret).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsCredential {
    pub cert_chain: Option<Vec<u8>>,
    pub private_key: Option<Vec<u8>>,
    pub ca: Option<Vec<u8>>,
}

impl TlsCredential {
    /// The credential named `name` among `secrets` (those of the waypoint's namespace):
    /// `name`'s certificate and key, and its CA, else `<name>-cacert`'s, as istiod's
    /// secret controller reads them. What the mode needs must be there: a client
    /// certificate and key for MUTUAL, a CA for both (the server is always verified).
    pub fn find<'s>(
        secrets: &dyn Fn(&str) -> Option<&'s crate::resources::Secret>,
        ns: &str,
        name: &str,
        mutual: bool,
    ) -> Result<TlsCredential, String> {
        let main = secrets(name);
        let ca_secret = secrets(&format!("{name}-cacert"));
        if main.is_none() && ca_secret.is_none() {
            return Err(format!("Secret {ns}/{name} not found"));
        }
        let get = |s: Option<&crate::resources::Secret>, keys: [&str; 2]| {
            s.and_then(|s| keys.iter().find_map(|k| s.data.get(*k)).cloned())
        };
        let c = TlsCredential {
            cert_chain: get(main, ["tls.crt", "cert"]),
            private_key: get(main, ["tls.key", "key"]),
            ca: get(main, ["ca.crt", "cacert"]).or_else(|| get(ca_secret, ["ca.crt", "cacert"])),
        };
        if mutual && (c.cert_chain.is_none() || c.private_key.is_none()) {
            return Err(format!(
                "Secret {ns}/{name} has no client certificate and key (tls.crt and tls.key, or cert and key)"
            ));
        }
        if c.ca.is_none() {
            return Err(format!(
                "no CA certificate in Secret {ns}/{name} (ca.crt or cacert) nor in {ns}/{name}-cacert"
            ));
        }
        Ok(c)
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PoolParts {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub tcp_idle_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
}

impl CompiledRule {
    /// Does this rule's host name the Service `name.namespace.svc.<domain>`?
    pub fn matches(&self, fqdn: &str) -> Option<bool> {
        match &self.host {
            HostMatch::Exact(h) => (h == fqdn).then_some(true),
            HostMatch::ExactOr(a, b) => (a == fqdn || b == fqdn).then_some(true),
            HostMatch::Suffix(s) => fqdn.ends_with(s.as_str()).then_some(false),
        }
    }

    /// The policy for one port of a cluster.
    pub fn policy(&self, port: u16) -> TrafficPolicy {
        let port_parts = self.ports.iter().find(|(p, _)| *p == port).map(|(_, p)| p);
        let pick = |f: fn(&Parts) -> bool| -> &Parts {
            match port_parts {
                Some(p) if f(p) => p,
                _ => &self.top,
            }
        };
        let pool = pick(|p| p.pool.is_some()).pool.clone().unwrap_or_default();
        TrafficPolicy {
            source: format!("DestinationRule {}/{}", self.namespace, self.name),
            lb: pick(|p| p.lb.is_some()).lb.clone().unwrap_or_default(),
            warmup: pick(|p| p.lb.is_some()).warmup,
            locality: pick(|p| p.lb.is_some()).locality.clone(),
            max_requests: pool.max_requests,
            max_requests_per_connection: pool.max_requests_per_connection,
            max_retries: pool.max_retries,
            retry_budget: self.retry_budget,
            max_connections: pool.max_connections,
            max_pending_requests: pool.max_pending_requests,
            connect_timeout: pool.connect_timeout,
            idle_timeout: pool.idle_timeout,
            tcp_idle_timeout: pool.tcp_idle_timeout,
            tcp_keepalive: pool.tcp_keepalive,
            max_connection_duration: pool.max_connection_duration,
            outlier: pick(|p| p.outlier.is_some()).outlier.clone(),
            tls: pick(|p| p.tls.is_some()).tls.clone().flatten(),
            ..TrafficPolicy::default()
        }
    }
}

fn err(meta: &ObjectMeta, field: &str, message: String) -> ConfigError {
    ConfigError {
        kind: "DestinationRule".into(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        field: field.into(),
        message,
    }
}

/// Compile one DestinationRule; `cluster_domain` completes short hosts.
pub(crate) fn compile_rule(
    dr: &DestinationRule,
    cluster_domain: &str,
    credentials: &CredentialLookup<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Option<CompiledRule> {
    let meta = &dr.metadata;
    let id = format!("DestinationRule {}/{}", meta.namespace, meta.name);
    if !dr.spec.subsets.is_empty() {
        // istiod builds a subset's cluster only for a route that names it (a VirtualService
        // `subset`); Gateway API routes name Services, never subsets, so nothing this
        // waypoint serves can reach one.
        warnings.push(format!(
            "{id}: spec.subsets: no route this waypoint serves names a subset (HTTPRoute, GRPCRoute, TCPRoute and TLSRoute backendRefs name Services); ignored"
        ));
    }
    let mut warn = |field: &str, what: &str| {
        warnings.push(format!(
            "{id}: {field}: {what} is not applied by this waypoint yet; ignored"
        ));
    };
    let spec = &dr.spec;
    let host = spec.host.trim();
    if host.is_empty() {
        errors.push(err(meta, "spec.host", "is required".into()));
        return None;
    }
    let host = HostMatch::of(host, &meta.namespace, cluster_domain);
    if spec.workload_selector.is_some() {
        warn(
            "spec.workloadSelector",
            "a workload selector (it selects sidecars, never a waypoint)",
        );
    }
    let mut out = CompiledRule {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        host,
        age: (
            meta.creation_timestamp.is_none(),
            meta.creation_timestamp.clone().unwrap_or_default(),
        ),
        top: Parts::default(),
        ports: Vec::new(),
        retry_budget: None,
        export_to: spec.export_to.clone(),
    };
    let Some(tp) = &spec.traffic_policy else {
        return Some(out);
    };
    let at = "spec.trafficPolicy";
    for (present, field, what) in [
        (tp.tunnel.is_some(), "tunnel", "tunnel settings"),
        (
            tp.proxy_protocol.is_some(),
            "proxyProtocol",
            "PROXY protocol",
        ),
    ] {
        if present {
            warn(&format!("{at}.{field}"), what);
        }
    }
    let mut ok = true;
    if let Some(rb) = &tp.retry_budget {
        out.retry_budget = retry_budget(meta, at, rb, errors, &mut ok);
    }
    out.top = parts(
        meta,
        at,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        errors,
        &mut warn,
        &mut ok,
    );
    let mut missing = Vec::new();
    let mut tls = |at: &str,
                   v: Option<&serde_json::Value>,
                   errors: &mut Vec<ConfigError>,
                   warn: &mut dyn FnMut(&str, &str),
                   ok: &mut bool| {
        tls(meta, at, v, errors, warn, ok).map(|t| {
            t.map(|mut t| {
                if let Some(name) = &t.credential_name {
                    let found = credentials(name, t.mutual);
                    // A Secret not there (yet): the rule stands, its connections fail
                    // closed until the Secret appears, as Envoy waits for an SDS secret.
                    if let Err(e) = &found {
                        missing.push(format!(
                            "{id}: {at}.credentialName {name:?}: {e}; its connections fail until it is there"
                        ));
                    }
                    t.credential = Some(found);
                }
                Arc::new(t)
            })
        })
    };
    out.top.tls = tls(
        &format!("{at}.tls"),
        tp.tls.as_ref(),
        errors,
        &mut warn,
        &mut ok,
    );
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        let Some(port) = p
            .port
            .as_ref()
            .and_then(|s| u16::try_from(s.number).ok())
            .filter(|n| *n != 0)
        else {
            errors.push(err(
                meta,
                &format!("{at}.port.number"),
                "must be a port (1-65535)".into(),
            ));
            ok = false;
            continue;
        };
        let tls = tls(
            &format!("{at}.tls"),
            p.tls.as_ref(),
            errors,
            &mut warn,
            &mut ok,
        );
        let mut parts = parts(
            meta,
            &at,
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            errors,
            &mut warn,
            &mut ok,
        );
        parts.tls = tls;
        out.ports.push((port, parts));
    }
    warnings.extend(missing);
    ok.then_some(out)
}

impl HostMatch {
    /// A rule's `host` in namespace `ns`: a `*` wildcard suffix; `name.namespace` and
    /// `name.namespace.svc` completed as istiod completes them (or taken as written, a
    /// ServiceEntry host); a short name completed in the rule's namespace.
    fn of(host: &str, ns: &str, cluster_domain: &str) -> HostMatch {
        if let Some(suffix) = host.strip_prefix('*') {
            return HostMatch::Suffix(suffix.to_string());
        }
        if !host.contains('.') {
            return HostMatch::Exact(format!("{host}.{ns}.svc.{cluster_domain}"));
        }
        let parts: Vec<&str> = host.split('.').collect();
        match parts.len() {
            2 => HostMatch::ExactOr(format!("{host}.svc.{cluster_domain}"), host.to_string()),
            3 if parts[2] == "svc" => {
                HostMatch::ExactOr(format!("{host}.{cluster_domain}"), host.to_string())
            }
            _ => HostMatch::Exact(host.to_string()),
        }
    }
}

/// `trafficPolicy.retryBudget` as istiod's `applyRetryBudget` renders it: the percent passed
/// as Envoy's Percent (0-100), default 0.2 (istiod writes `Percent{Value: 0.2}` meaning 20%,
/// which Envoy reads as 0.2%); `minRetryConcurrency` 0 or unset -> 3. Bad values are errors
/// naming the field (and clear `ok`).
fn retry_budget(
    meta: &ObjectMeta,
    at: &str,
    rb: &crate::resources::RetryBudgetSpec,
    errors: &mut Vec<ConfigError>,
    ok: &mut bool,
) -> Option<(f64, u32)> {
    let percent = rb.percent.unwrap_or(0.2);
    if !(0.0..=100.0).contains(&percent) || percent.is_nan() {
        errors.push(err(
            meta,
            &format!("{at}.retryBudget.percent"),
            format!("{percent} is out of range (0-100)"),
        ));
        *ok = false;
    }
    let min = match rb.min_retry_concurrency {
        None | Some(0) => 3,
        Some(n) => u32::try_from(n).unwrap_or_else(|_| {
            errors.push(err(
                meta,
                &format!("{at}.retryBudget.minRetryConcurrency"),
                format!("{n} is out of range (0-4294967295)"),
            ));
            *ok = false;
            3
        }),
    };
    Some((percent, min))
}

/// `tls` (istio `ClientTLSSettings`): `None` when absent, `Some(None)` for DISABLE (and for
/// ISTIO_MUTUAL, which HBONE endpoints already have and others cannot: warned).
fn tls(
    meta: &ObjectMeta,
    at: &str,
    v: Option<&serde_json::Value>,
    errors: &mut Vec<ConfigError>,
    warn: &mut dyn FnMut(&str, &str),
    ok: &mut bool,
) -> Option<Option<TlsOrigination>> {
    let v = v?;
    let mut fail = |field: &str, message: String| {
        errors.push(err(meta, &format!("{at}.{field}"), message));
        *ok = false;
    };
    let Some(obj) = v.as_object() else {
        fail("", "must be a mapping".into());
        return None;
    };
    let s = |k: &str| {
        obj.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let mutual = match s("mode").as_deref() {
        None | Some("DISABLE") => return Some(None),
        Some("SIMPLE") => false,
        Some("MUTUAL") => true,
        Some("ISTIO_MUTUAL") => {
            warn(
                &format!("{at}.mode"),
                "ISTIO_MUTUAL (mesh endpoints are reached over HBONE, which is mutual TLS)",
            );
            return Some(None);
        }
        Some(other) => {
            fail(
                "mode",
                format!("{other:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
            );
            return None;
        }
    };
    let credential_name = s("credentialName");
    if credential_name.is_some()
        && let Some(field) = ["clientCertificate", "privateKey", "caCertificates"]
            .into_iter()
            .find(|f| s(f).is_some())
    {
        // Istio's validation: "Only one of client certificates and CA certificate or
        // credentialName can be specified."
        fail(
            field,
            "cannot be given with credentialName (the Secret holds the certificates)".into(),
        );
        return None;
    }
    if s("caCrl").is_some() {
        warn(&format!("{at}.caCrl"), "a certificate revocation list");
    }
    let client_certificate = s("clientCertificate");
    let private_key = s("privateKey");
    if mutual
        && credential_name.is_none()
        && (client_certificate.is_none() || private_key.is_none())
    {
        fail(
            if client_certificate.is_none() {
                "clientCertificate"
            } else {
                "privateKey"
            },
            "is required for MUTUAL".into(),
        );
        return None;
    }
    let subject_alt_names = obj
        .get("subjectAltNames")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let insecure_skip_verify = match obj.get("insecureSkipVerify") {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::Object(o)) => {
            o.get("value").and_then(|v| v.as_bool()) == Some(true)
        }
        _ => false,
    };
    Some(Some(TlsOrigination {
        mutual,
        ca_certificates: s("caCertificates"),
        client_certificate,
        private_key,
        credential_name,
        credential: None,
        sni: s("sni"),
        subject_alt_names,
        insecure_skip_verify,
        client_config: Default::default(),
    }))
}

#[allow(clippy::too_many_arguments)]
fn parts(
    meta: &ObjectMeta,
    at: &str,
    lb: Option<&LoadBalancerSpec>,
    pool: Option<&ConnectionPoolSpec>,
    outlier: Option<&OutlierDetectionSpec>,
    errors: &mut Vec<ConfigError>,
    warn: &mut impl FnMut(&str, &str),
    ok: &mut bool,
) -> Parts {
    let mut fail = |field: String, message: String| {
        errors.push(err(meta, &field, message));
        *ok = false;
    };
    let mut out = Parts::default();
    if let Some(lb) = lb {
        lb_part(at, lb, &mut out, &mut fail, warn);
    }
    if let Some(pool) = pool {
        pool_part(at, pool, &mut out, &mut fail, warn);
    }
    if let Some(o) = outlier {
        outlier_part(at, o, &mut out, &mut fail, warn);
    }
    out
}

type Fail<'a> = dyn FnMut(String, String) + 'a;
type Warn<'a> = dyn FnMut(&str, &str) + 'a;

/// A protobuf duration field; a bad value is reported through `fail`.
fn duration(field: String, v: &Option<String>, fail: &mut Fail<'_>) -> Option<Duration> {
    let v = v.as_deref()?;
    match parse_proto_duration(v) {
        Some(d) => Some(d),
        None => {
            fail(field, format!("{v:?} is not a duration (e.g. 10s, 0.5s)"));
            None
        }
    }
}

/// A uint32 count field; a bad value is reported through `fail`.
fn count(field: String, v: Option<i64>, fail: &mut Fail<'_>) -> Option<u32> {
    let v = v?;
    match u32::try_from(v) {
        Ok(n) => Some(n),
        Err(_) => {
            fail(field, format!("{v} is not a count (0-4294967295)"));
            None
        }
    }
}

/// `loadBalancer`.
fn lb_part(
    at: &str,
    lb: &LoadBalancerSpec,
    out: &mut Parts,
    fail: &mut Fail<'_>,
    warn: &mut Warn<'_>,
) {
    let f = format!("{at}.loadBalancer");
    out.lb = match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") | Some("LEAST_REQUEST") | Some("LEAST_CONN") => {
            Some(LbPolicy::LeastRequest)
        }
        Some("ROUND_ROBIN") => Some(LbPolicy::RoundRobin),
        Some("RANDOM") => Some(LbPolicy::Random),
        Some("PASSTHROUGH") => {
            warn(&format!("{f}.simple"), "PASSTHROUGH");
            None
        }
        Some(other) => {
            fail(
                format!("{f}.simple"),
                format!(
                    "{other:?} is not one of UNSPECIFIED, LEAST_REQUEST, ROUND_ROBIN, RANDOM, PASSTHROUGH"
                ),
            );
            None
        }
    };
    if let Some(ch) = &lb.consistent_hash {
        let f = format!("{f}.consistentHash");
        match consistent_hash(ch, &f) {
            Ok((policy, ignored)) => {
                out.lb = Some(LbPolicy::ConsistentHash(policy));
                for field in ignored {
                    warn(&format!("{f}.{field}"), "this hash option");
                }
            }
            Err((field, message)) => fail(field, message),
        }
    }
    if let Some(v) = &lb.locality_lb_setting {
        out.locality = locality_setting(v, &format!("{f}.localityLbSetting"), fail);
    }
    out.warmup = warmup(lb, &f, fail);
    if out.warmup.is_some()
        && !matches!(
            out.lb,
            Some(LbPolicy::RoundRobin) | Some(LbPolicy::LeastRequest)
        )
    {
        // Istio: "currently this is only supported for ROUND_ROBIN and LEAST_REQUEST".
        warn(
            &format!("{f}.warmup"),
            "slow start with this load balancer (only ROUND_ROBIN and LEAST_REQUEST have it)",
        );
        out.warmup = None;
    }
}

/// MeshConfig's `localityLbSetting`, or the first error (naming the field).
pub fn parse_locality_setting(
    v: &serde_json::Value,
) -> Result<crate::snapshot::LocalitySetting, String> {
    let mut error = None;
    let setting = locality_setting(v, "localityLbSetting", &mut |field, msg| {
        error.get_or_insert(format!("{field}: {msg}"));
    });
    match (error, setting) {
        (Some(e), _) => Err(e),
        (None, Some(s)) => Ok(s),
        (None, None) => Err("localityLbSetting: not understood".into()),
    }
}

/// `localityLbSetting: {enabled, failover: [{from, to}], failoverPriority, distribute}`
/// (Istio's `LocalityLoadBalancerSetting`), validated as Istio validates it.
pub(crate) fn locality_setting(
    v: &serde_json::Value,
    f: &str,
    fail: &mut Fail<'_>,
) -> Option<crate::snapshot::LocalitySetting> {
    let Some(obj) = v.as_object() else {
        fail(f.to_string(), format!("{v} is not an object"));
        return None;
    };
    let enabled = match obj.get("enabled") {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(other) => {
            fail(format!("{f}.enabled"), format!("{other} is not a boolean"));
            true
        }
    };
    let mut failover = Vec::new();
    if let Some(list) = obj.get("failover") {
        let Some(items) = list.as_array() else {
            fail(format!("{f}.failover"), format!("{list} is not a list"));
            return None;
        };
        for (i, item) in items.iter().enumerate() {
            let from = item.get("from").and_then(|x| x.as_str());
            let to = item.get("to").and_then(|x| x.as_str());
            match (from, to) {
                (Some(from), Some(to)) if !from.is_empty() && !to.is_empty() && from != to => {
                    failover.push((from.to_string(), to.to_string()))
                }
                _ => fail(
                    format!("{f}.failover[{i}]"),
                    "needs a `from` and a different `to` region".into(),
                ),
            }
        }
    }
    let failover_priority = failover_priority(obj.get("failoverPriority"), f, fail);
    let distribute = distribute(obj.get("distribute"), f, fail);
    // Istio's ValidateLocalityLbSetting.
    if !distribute.is_empty() && !failover.is_empty() {
        fail(
            format!("{f}.distribute"),
            "can not simultaneously specify 'distribute' and 'failover'".into(),
        );
    }
    if !failover.is_empty()
        && let Some(l) = failover_priority.iter().find(|l| {
            matches!(
                l.as_str(),
                "topology.kubernetes.io/region"
                    | "topology.kubernetes.io/zone"
                    | "topology.istio.io/subzone"
            )
        })
    {
        fail(
            format!("{f}.failoverPriority"),
            format!(
                "can not simultaneously set 'failover' and topology label '{l}' in 'failover_priority'"
            ),
        );
    }
    Some(crate::snapshot::LocalitySetting {
        enabled,
        failover,
        failover_priority,
        distribute,
        force: false,
    })
}

/// `failoverPriority: [label or label=value]`.
fn failover_priority(v: Option<&serde_json::Value>, f: &str, fail: &mut Fail<'_>) -> Vec<String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(items) = v.as_array() else {
        fail(
            format!("{f}.failoverPriority"),
            format!("{v} is not a list"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(l) if !l.is_empty() && !l.starts_with('=') => out.push(l.to_string()),
            _ => fail(
                format!("{f}.failoverPriority[{i}]"),
                format!("{item} is not a label name (or label=value)"),
            ),
        }
    }
    out
}

/// `distribute: [{from, to: {locality: weight}}]`, validated as Istio's
/// `ValidateLocalityLbSetting` does: weights 1-100 summing to 100, at most one `*` and only
/// last, no empty part, no two patterns of one list overlapping.
fn distribute(
    v: Option<&serde_json::Value>,
    f: &str,
    fail: &mut Fail<'_>,
) -> Vec<crate::snapshot::LocalityDistribute> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(items) = v.as_array() else {
        fail(format!("{f}.distribute"), format!("{v} is not a list"));
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut froms: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{f}.distribute[{i}]");
        let from = item.get("from").and_then(|x| x.as_str()).unwrap_or("");
        if let Err(e) = locality_pattern(from, &froms) {
            fail(format!("{at}.from"), e);
            continue;
        }
        froms.push(from);
        let Some(to) = item.get("to").and_then(|x| x.as_object()) else {
            fail(
                format!("{at}.to"),
                "needs a map of locality to weight".into(),
            );
            continue;
        };
        let mut weights: Vec<(String, u32)> = Vec::new();
        let mut ok = true;
        for (loc, w) in to {
            match w.as_u64().filter(|w| (1..=100).contains(w)) {
                Some(w) => weights.push((loc.clone(), w as u32)),
                None => {
                    fail(
                        format!("{at}.to[{loc}]"),
                        format!("locality weight {w} must be in range [1, 100]"),
                    );
                    ok = false;
                }
            }
        }
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        if ok && total != 100 {
            fail(
                format!("{at}.to"),
                format!("total locality weight {total} != 100"),
            );
            ok = false;
        }
        let mut seen: Vec<&str> = Vec::new();
        for (loc, _) in &weights {
            if let Err(e) = locality_pattern(loc, &seen) {
                fail(format!("{at}.to[{loc}]"), e);
                ok = false;
            }
            seen.push(loc);
        }
        if ok {
            out.push(crate::snapshot::LocalityDistribute {
                from: from.to_string(),
                to: weights,
            });
        }
    }
    out
}

/// A locality pattern (`region`, `region/zone`, `region/zone/subzone`, a trailing `*`) that
/// does not overlap any of `earlier` (Istio's `validateLocalities`).
fn locality_pattern(p: &str, earlier: &[&str]) -> Result<(), String> {
    let stars = p.matches('*').count();
    if stars > 1 || (stars == 1 && !p.ends_with('*')) {
        return Err(format!(
            "locality {p} wildcard '*' number can not exceed 1 and must be in the end"
        ));
    }
    let parts: Vec<&str> = p.split('/').collect();
    if p.is_empty() || parts.len() > 3 || parts.iter().any(|x| x.is_empty()) {
        return Err(format!(
            "locality {p} must not contain empty region/zone/subzone info"
        ));
    }
    // Two patterns overlap when one covers the other: compare part by part, a `*` (or a
    // shorter pattern) covering the rest.
    let covers = |a: &[&str], b: &[&str]| {
        for (i, x) in a.iter().enumerate() {
            if *x == "*" {
                return true;
            }
            match b.get(i) {
                Some(y) if y == x => {}
                Some(y) if *y == "*" => return true,
                Some(_) => return false,
                None => return true,
            }
        }
        true
    };
    for q in earlier {
        let qs: Vec<&str> = q.split('/').collect();
        if covers(&parts, &qs) || covers(&qs, &parts) {
            return Err(format!("locality {p} overlap with previous specified ones"));
        }
    }
    Ok(())
}

/// `warmup: {duration, minimumPercent, aggression}`, else the deprecated
/// `warmupDurationSecs` (a duration despite its name).
fn warmup(lb: &LoadBalancerSpec, f: &str, fail: &mut Fail<'_>) -> Option<Warmup> {
    let duration = |v: &serde_json::Value, field: String, fail: &mut Fail<'_>| match v
        .as_str()
        .and_then(parse_proto_duration)
    {
        Some(d) => Some(d),
        None => {
            fail(field, format!("{v} is not a duration (e.g. 30s)"));
            None
        }
    };
    let number = |v: Option<&serde_json::Value>, field: String, max: f64, fail: &mut Fail<'_>| {
        let v = v?;
        match v.as_f64().filter(|n| (0.0..=max).contains(n)) {
            Some(n) => Some(n),
            None => {
                fail(field, format!("{v} is not a number from 0 to {max}"));
                None
            }
        }
    };
    if let Some(w) = &lb.warmup {
        let window = duration(
            w.get("duration").unwrap_or(&serde_json::Value::Null),
            format!("{f}.warmup.duration"),
            fail,
        )?;
        let min_percent = number(
            w.get("minimumPercent"),
            format!("{f}.warmup.minimumPercent"),
            100.0,
            fail,
        );
        let aggression = number(
            w.get("aggression"),
            format!("{f}.warmup.aggression"),
            f64::MAX,
            fail,
        )
        .filter(|a| *a > 0.0);
        return Some(Warmup {
            window,
            min_percent: min_percent.unwrap_or(10.0),
            aggression: aggression.unwrap_or(1.0),
        });
    }
    let d = lb.warmup_duration_secs.as_ref()?;
    Some(Warmup {
        window: duration(d, format!("{f}.warmupDurationSecs"), fail)?,
        min_percent: 10.0,
        aggression: 1.0,
    })
}

/// `connectionPool`.
fn pool_part(
    at: &str,
    pool: &ConnectionPoolSpec,
    out: &mut Parts,
    fail: &mut Fail<'_>,
    warn: &mut Warn<'_>,
) {
    let f = format!("{at}.connectionPool");
    let mut p = PoolParts::default();
    if let Some(tcp) = &pool.tcp {
        p.connect_timeout = duration(
            format!("{f}.tcp.connectTimeout"),
            &tcp.connect_timeout,
            &mut *fail,
        );
        p.tcp_idle_timeout = duration(
            format!("{f}.tcp.idleTimeout"),
            &tcp.idle_timeout,
            &mut *fail,
        );
        p.max_connections = count(
            format!("{f}.tcp.maxConnections"),
            tcp.max_connections,
            &mut *fail,
        );
        if let Some(k) = &tcp.tcp_keepalive {
            let at = format!("{f}.tcp.tcpKeepalive");
            // Whole seconds, as istiod converts them (`uint32(seconds)`); at least one.
            let secs = |d: Duration| Duration::from_secs(d.as_secs().max(1));
            p.tcp_keepalive = Some(TcpKeepalive {
                probes: count(format!("{at}.probes"), k.probes, &mut *fail).filter(|n| *n > 0),
                time: duration(format!("{at}.time"), &k.time, &mut *fail).map(secs),
                interval: duration(format!("{at}.interval"), &k.interval, &mut *fail).map(secs),
            });
        }
        p.max_connection_duration = duration(
            format!("{f}.tcp.maxConnectionDuration"),
            &tcp.max_connection_duration,
            &mut *fail,
        )
        .filter(|d| !d.is_zero());
    }
    if let Some(http) = &pool.http {
        p.max_requests = count(
            format!("{f}.http.http2MaxRequests"),
            http.http2_max_requests,
            &mut *fail,
        );
        p.max_requests_per_connection = count(
            format!("{f}.http.maxRequestsPerConnection"),
            http.max_requests_per_connection,
            &mut *fail,
        )
        .filter(|n| *n != 0);
        p.max_pending_requests = count(
            format!("{f}.http.http1MaxPendingRequests"),
            http.http1_max_pending_requests,
            &mut *fail,
        );
        p.max_retries = count(format!("{f}.http.maxRetries"), http.max_retries, &mut *fail);
        p.idle_timeout = duration(
            format!("{f}.http.idleTimeout"),
            &http.idle_timeout,
            &mut *fail,
        );
        for (present, field, what) in [
            (
                http.h2_upgrade_policy.is_some(),
                "h2UpgradePolicy",
                "upgrading to HTTP/2",
            ),
            (
                http.use_client_protocol.is_some(),
                "useClientProtocol",
                "the client's protocol upstream",
            ),
            (
                http.max_concurrent_streams.is_some(),
                "maxConcurrentStreams",
                "an upstream stream limit",
            ),
        ] {
            if present {
                warn(&format!("{f}.http.{field}"), what);
            }
        }
    }
    out.pool = Some(p);
}

/// `outlierDetection`.
fn outlier_part(
    at: &str,
    o: &OutlierDetectionSpec,
    out: &mut Parts,
    fail: &mut Fail<'_>,
    warn: &mut Warn<'_>,
) {
    let f = format!("{at}.outlierDetection");
    if o.consecutive_local_origin_failures.is_some()
        || o.split_external_local_origin_errors == Some(true)
    {
        warn(
            &format!("{f}.consecutiveLocalOriginFailures"),
            "separate local-origin failure counting",
        );
    }
    let five = count(
        format!("{f}.consecutive5xxErrors"),
        o.consecutive_5xx_errors,
        &mut *fail,
    )
    .or(count(
        format!("{f}.consecutiveErrors"),
        o.consecutive_errors,
        &mut *fail,
    ));
    let gateway = count(
        format!("{f}.consecutiveGatewayErrors"),
        o.consecutive_gateway_errors,
        &mut *fail,
    );
    let percent =
        |field: &str, v: Option<i64>, default: u32, fail: &mut dyn FnMut(String, String)| match v {
            None => default,
            Some(n @ 0..=100) => n as u32,
            Some(n) => {
                fail(
                    format!("{f}.{field}"),
                    format!("{n} is not a percentage (0-100)"),
                );
                default
            }
        };
    // Ejection is decided when the threshold is reached (Envoy's consecutive detectors do
    // not wait for the interval); the interval paces the return and the multiplier's decay.
    let interval = duration(format!("{f}.interval"), &o.interval, &mut *fail)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(10));
    out.outlier = Some(OutlierPolicy {
        // Istio: consecutive5xxErrors defaults to 5 when the block is present; 0 turns
        // the detector off.
        consecutive_5xx: match five {
            None => Some(5),
            Some(0) => None,
            Some(n) => Some(n),
        },
        consecutive_gateway: gateway.filter(|n| *n != 0),
        base_ejection_time: duration(
            format!("{f}.baseEjectionTime"),
            &o.base_ejection_time,
            &mut *fail,
        )
        .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent: percent("maxEjectionPercent", o.max_ejection_percent, 10, &mut *fail),
        min_health_percent: percent("minHealthPercent", o.min_health_percent, 0, &mut *fail),
        interval,
    });
}

/// `loadBalancer.consistentHash` (istio `LoadBalancerSettings.ConsistentHashLB`): one key
/// (`httpHeaderName`, `httpCookie`, `useSourceIp`, `httpQueryParameterName`) and the table
/// (`ringHash`, `maglev`, else the deprecated `minimumRingSize`, else a ring of 1024).
/// Returns the policy and the fields present but not applied.
fn consistent_hash(
    v: &serde_json::Value,
    at: &str,
) -> Result<(HashPolicy, Vec<String>), (String, String)> {
    let obj = v
        .as_object()
        .ok_or_else(|| (at.to_string(), "must be a mapping".to_string()))?;
    let mut keys = Vec::new();
    if let Some(h) = obj.get("httpHeaderName") {
        let name = h.as_str().unwrap_or_default().to_ascii_lowercase();
        if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((
                format!("{at}.httpHeaderName"),
                format!("{h} is not a header name"),
            ));
        }
        keys.push(HashKey::Header(name));
    }
    if let Some(c) = obj.get("httpCookie") {
        let name = c.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        if name.is_empty() {
            return Err((format!("{at}.httpCookie.name"), "is required".into()));
        }
        let ttl = match c.get("ttl").and_then(|t| t.as_str()) {
            None => None,
            Some(t) => Some(parse_proto_duration(t).ok_or_else(|| {
                (
                    format!("{at}.httpCookie.ttl"),
                    format!("{t:?} is not a duration"),
                )
            })?),
        };
        keys.push(HashKey::Cookie {
            name: name.to_string(),
            path: c
                .get("path")
                .and_then(|p| p.as_str())
                .unwrap_or_default()
                .to_string(),
            ttl: ttl.filter(|t| !t.is_zero()),
        });
    }
    if obj.get("useSourceIp").and_then(|v| v.as_bool()) == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = obj.get("httpQueryParameterName") {
        let name = q.as_str().unwrap_or_default();
        if name.is_empty() {
            return Err((
                format!("{at}.httpQueryParameterName"),
                "must not be empty".into(),
            ));
        }
        keys.push(HashKey::QueryParam(name.to_string()));
    }
    if keys.len() != 1 {
        return Err((
            at.to_string(),
            "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is required".into(),
        ));
    }
    let size = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
    };
    let table = if let Some(m) = obj.get("maglev") {
        HashTable::Maglev {
            table_size: size(m.get("tableSize")).filter(|n| *n > 0).unwrap_or(65537),
        }
    } else if let Some(r) = obj.get("ringHash") {
        HashTable::Ring {
            min_size: size(r.get("minimumRingSize"))
                .filter(|n| *n > 0)
                .unwrap_or(1024),
        }
    } else {
        HashTable::Ring {
            min_size: size(obj.get("minimumRingSize"))
                .filter(|n| *n > 0)
                .unwrap_or(1024),
        }
    };
    let (HashTable::Maglev { table_size: n } | HashTable::Ring { min_size: n }) = table;
    if n > MAX_HASH_TABLE {
        return Err((
            at.to_string(),
            format!("table size {n} is above {MAX_HASH_TABLE}"),
        ));
    }
    let known = [
        "httpHeaderName",
        "httpCookie",
        "useSourceIp",
        "httpQueryParameterName",
        "ringHash",
        "maglev",
        "minimumRingSize",
    ];
    let ignored = obj
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .cloned()
        .collect();
    Ok((
        HashPolicy {
            key: keys.remove(0),
            table,
        },
        ignored,
    ))
}

/// The largest ring or Maglev table accepted (a table is built per cluster: at most 16 MiB).
pub const MAX_HASH_TABLE: u64 = 1_048_576;

impl CompiledRule {
    /// Whether a proxy in `client_namespace` sees this rule (`exportTo`, as istiod's
    /// `getExportedDestinationRuleFromNamespace` checks it).
    fn exported_to(&self, client_namespace: &str) -> bool {
        self.export_to.is_empty()
            || self.export_to.iter().any(|e| {
                e == "*"
                    || e == client_namespace
                    || (e == "." && self.namespace == client_namespace)
            })
    }
}

/// The rule that applies to the Service `fqdn` in `service_namespace` for this waypoint (in
/// `proxy_namespace`), as istiod's `PushContext.destinationRule` picks it: a rule in the
/// waypoint's own namespace first (any, exported or not), then one the Service's namespace
/// exports to the waypoint's, then one the root namespace exports to it. Within a namespace
/// the most specific host wins (exact over wildcard, the longer wildcard first), then the
/// older rule.
pub(crate) fn rule_for<'r>(
    rules: &'r [CompiledRule],
    fqdn: &str,
    service_namespace: &str,
    root_namespace: &str,
    proxy_namespace: &str,
) -> Option<&'r CompiledRule> {
    let best_in = |ns: &str, exported: bool| {
        rules
            .iter()
            .filter(|r| r.namespace == ns && (!exported || r.exported_to(proxy_namespace)))
            .filter_map(|r| {
                let exact = r.matches(fqdn)?;
                let specificity = match &r.host {
                    HostMatch::Suffix(s) => s.len(),
                    _ => usize::MAX,
                };
                Some((
                    (
                        !exact,
                        std::cmp::Reverse(specificity),
                        r.age.clone(),
                        r.name.clone(),
                    ),
                    r,
                ))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, r)| r)
    };
    best_in(proxy_namespace, false)
        .or_else(|| best_in(service_namespace, true))
        .or_else(|| best_in(root_namespace, true))
}

/// The policy of one cluster (`None`: no rule, Envoy's defaults).
pub(crate) fn cluster_policy(
    rules: &[CompiledRule],
    fqdn: &str,
    service_namespace: &str,
    root_namespace: &str,
    proxy_namespace: &str,
    port: u16,
) -> Option<Arc<TrafficPolicy>> {
    rule_for(
        rules,
        fqdn,
        service_namespace,
        root_namespace,
        proxy_namespace,
    )
    .map(|r| Arc::new(r.policy(port)))
}

/// A consistent-hash table over a cluster's endpoints (by index into the endpoint list it
/// was built from). Built once per endpoint list, looked up per request.
#[derive(Debug)]
pub enum HashRing {
    /// Sorted (point, endpoint index): a key goes to the first point at or after its hash.
    Ring(Vec<(u64, u32)>),
    /// Maglev's lookup table: a key goes to `table[hash % len]`.
    Maglev(Vec<u32>),
}

/// The hash every consistent-hash decision uses: SipHash-1-3 with fixed keys (std's
/// `DefaultHasher::new()`), the same in every process, so two waypoint replicas send a key to
/// the same endpoint. (Envoy uses xxHash64; the mapping differs, the property is the same.)
pub fn stable_hash(data: &[u8]) -> u64 {
    use std::hash::Hasher;
    #[allow(deprecated)]
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(data);
    h.finish()
}

impl HashRing {
    /// Build the table for endpoints named by `hosts` (address, weight; their order is the
    /// index). Each host's share of the table follows its weight (Envoy's `load_balancing_weight`,
    /// which its ring hash and Maglev tables honour).
    pub fn build(table: HashTable, hosts: &[(String, u32)]) -> HashRing {
        let weights = scaled_weights(hosts);
        match table {
            HashTable::Ring { min_size } => {
                // Envoy gives each host a share of at least `min_size` points by weight;
                // points per unit of weight are rounded up to a power of two here, so a host
                // coming or going changes the other hosts' points only when the count crosses
                // a power of two (fewer keys move).
                let total: u64 = weights.iter().sum();
                let per_unit = if total == 0 {
                    0
                } else {
                    min_size.div_ceil(total).next_power_of_two()
                };
                let mut ring = Vec::with_capacity((per_unit * total) as usize);
                for (i, (a, _)) in hosts.iter().enumerate() {
                    for j in 0..per_unit * weights[i] {
                        ring.push((stable_hash(format!("{a}_{j}").as_bytes()), i as u32));
                    }
                }
                ring.sort_unstable();
                HashRing::Ring(ring)
            }
            HashTable::Maglev { table_size } => {
                let m = table_size as usize;
                let n = hosts.len() as u64;
                let mut table = vec![u32::MAX; m];
                if n == 0 {
                    return HashRing::Maglev(Vec::new());
                }
                // Maglev (Eisenbud et al., 2016): each host walks its own permutation
                // (offset, skip) and takes the next free slot, in turns, until full. Weighted
                // as Envoy's `MaglevTable`: a host takes a turn each time its accumulated
                // weight reaches the largest weight, so its slots follow its weight.
                let perms: Vec<(usize, usize)> = hosts
                    .iter()
                    .map(|(a, _)| {
                        let offset = stable_hash(format!("{a}#o").as_bytes()) as usize % m;
                        let skip = if m > 1 {
                            stable_hash(format!("{a}#s").as_bytes()) as usize % (m - 1) + 1
                        } else {
                            1
                        };
                        (offset, skip)
                    })
                    .collect();
                let max_weight = weights.iter().copied().max().unwrap_or(1).max(1);
                let mut credit = vec![0u64; perms.len()];
                let mut next = vec![0usize; perms.len()];
                let mut filled = 0;
                'fill: loop {
                    for (i, &(offset, skip)) in perms.iter().enumerate() {
                        credit[i] += weights[i];
                        if credit[i] < max_weight {
                            continue;
                        }
                        credit[i] -= max_weight;
                        // Bounded: a permutation visits every slot within m steps when skip
                        // and m are coprime (m prime); otherwise give up on this host.
                        let mut tries = 0;
                        loop {
                            let slot = (offset + next[i] * skip) % m;
                            next[i] += 1;
                            if table[slot] == u32::MAX {
                                table[slot] = i as u32;
                                filled += 1;
                                break;
                            }
                            tries += 1;
                            if tries > m {
                                break;
                            }
                        }
                        if filled == m {
                            break 'fill;
                        }
                    }
                    // Bounded: the heaviest host takes a turn every round, and every host
                    // has walked its permutation twice over by then.
                    if next.iter().all(|t| *t > 2 * m)
                        || next[weights.iter().position(|w| *w == max_weight).unwrap_or(0)] > 2 * m
                    {
                        break;
                    }
                }
                // Slots no permutation reached (non-prime sizes) go round-robin.
                for (k, slot) in table.iter_mut().enumerate() {
                    if *slot == u32::MAX {
                        *slot = (k as u64 % n) as u32;
                    }
                }
                HashRing::Maglev(table)
            }
        }
    }

    /// The endpoint indexes in the order a key visits them (the first is its endpoint; the
    /// next ones are where it goes when that one is ejected). No allocation.
    pub fn walk(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        let (len, start) = match self {
            HashRing::Ring(r) => (r.len(), r.partition_point(|(p, _)| *p < key)),
            HashRing::Maglev(t) => (
                t.len(),
                if t.is_empty() {
                    0
                } else {
                    (key % t.len() as u64) as usize
                },
            ),
        };
        (0..len).map(move |k| {
            let at = (start + k) % len;
            match self {
                HashRing::Ring(r) => r[at].1,
                HashRing::Maglev(t) => t[at],
            }
        })
    }
}

/// Hash-table weights: each host's weight (at least 1), scaled down in proportion when they
/// sum past 65,536 so a table stays bounded whatever weights a ServiceEntry gives.
fn scaled_weights(hosts: &[(String, u32)]) -> Vec<u64> {
    const MAX_TOTAL: u64 = 1 << 16;
    let total: u64 = hosts.iter().map(|(_, w)| u64::from((*w).max(1))).sum();
    hosts
        .iter()
        .map(|(_, w)| {
            let w = u64::from((*w).max(1));
            if total > MAX_TOTAL {
                (w * MAX_TOTAL / total).max(1)
            } else {
                w
            }
        })
        .collect()
}

/// The table built for one endpoint list (kept while the list is current).
#[derive(Debug)]
pub struct RingCache {
    /// The list the table indexes (its address identifies it; held so it cannot be reused).
    pub endpoints: Arc<Vec<crate::Endpoint>>,
    pub ring: HashRing,
}
