//! DestinationRule traffic policy on the waypoint's clusters, as istiod renders it for a
//! waypoint (`cluster_waypoint.go`, `cluster_traffic_policy.go`; protocol.md 2.7):
//!
//! - `loadBalancer.simple`: `LEAST_REQUEST` (Envoy's default, two random choices, also for
//!   `UNSPECIFIED`), `ROUND_ROBIN`, `RANDOM`.
//! - `connectionPool`: `http.http2MaxRequests` (Envoy `max_requests`: requests in flight to
//!   the cluster; beyond it 503 `UO`), `http.maxRequestsPerConnection`, `http.maxRetries`
//!   (retries in flight; beyond it no retry), `http.idleTimeout` (idle pooled connections),
//!   `tcp.connectTimeout`, `tcp.idleTimeout` (TCP proxying).
//! - `outlierDetection`: `consecutive5xxErrors` (and the deprecated `consecutiveErrors`),
//!   `consecutiveGatewayErrors`, `baseEjectionTime` (times the host's ejection count, at most
//!   300 s as Envoy's `max_ejection_time`), `maxEjectionPercent` (Istio's default 10),
//!   `minHealthPercent` (Envoy's panic threshold: below it every host is used again).
//! - `portLevelSettings`: per Service port, each of the three replaces the top-level one.
//!
//! Which rule applies to a Service: `host` is its FQDN, its short name (in the rule's
//! namespace) or a `*.` wildcard suffix; an exact host beats a wildcard, a rule in the
//! Service's namespace beats one in the root namespace, an older rule beats a newer one, as
//! istiod merges them. Fields a waypoint would apply but this one does not yet (`tls`,
//! `subsets`, `consistentHash`, `localityLbSetting`, `warmup`, `tcp.maxConnections`,
//! `http1MaxPendingRequests`, ...) are warnings naming the field, never silently dropped.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
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
}

/// The compiled traffic policy of one cluster, with its run-time counters (one per cluster:
/// Envoy's circuit breakers count per cluster).
#[derive(Debug, Default)]
pub struct TrafficPolicy {
    /// `DestinationRule ns/name`, for `/config_dump` and `explain`.
    pub source: String,
    pub lb: LbPolicy,
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub tcp_idle_timeout: Option<Duration>,
    pub outlier: Option<OutlierPolicy>,
    /// Requests in flight to the cluster (for `max_requests`).
    pub active_requests: AtomicU32,
    /// Retries in flight (for `max_retries`).
    pub active_retries: AtomicU32,
    /// Requests refused by a circuit breaker (`UO`).
    pub overflows: AtomicU64,
    /// Endpoints ejected by outlier detection, ever.
    pub ejections_total: AtomicU64,
    /// Next round-robin position.
    pub rr: AtomicU64,
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
        take(&self.active_retries, self.max_retries).then(|| Slot {
            policy: self.clone(),
            retry: true,
        })
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
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostMatch {
    Exact(String),
    Suffix(String),
}

/// The three parts port-level settings can override.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parts {
    pub lb: Option<LbPolicy>,
    pub pool: Option<PoolParts>,
    pub outlier: Option<OutlierPolicy>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PoolParts {
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub tcp_idle_timeout: Option<Duration>,
}

impl CompiledRule {
    /// Does this rule's host name the Service `name.namespace.svc.<domain>`?
    pub fn matches(&self, fqdn: &str) -> Option<bool> {
        match &self.host {
            HostMatch::Exact(h) => (h == fqdn).then_some(true),
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
            lb: pick(|p| p.lb.is_some()).lb.unwrap_or_default(),
            max_requests: pool.max_requests,
            max_requests_per_connection: pool.max_requests_per_connection,
            max_retries: pool.max_retries,
            connect_timeout: pool.connect_timeout,
            idle_timeout: pool.idle_timeout,
            tcp_idle_timeout: pool.tcp_idle_timeout,
            outlier: pick(|p| p.outlier.is_some()).outlier.clone(),
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
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Option<CompiledRule> {
    let meta = &dr.metadata;
    let id = format!("DestinationRule {}/{}", meta.namespace, meta.name);
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
    let host = if let Some(suffix) = host.strip_prefix('*') {
        HostMatch::Suffix(suffix.to_string())
    } else if host.contains('.') {
        // `name.namespace` and `name.namespace.svc` are completed as istiod completes them.
        let parts: Vec<&str> = host.split('.').collect();
        match parts.len() {
            2 => HostMatch::Exact(format!("{host}.svc.{cluster_domain}")),
            3 if parts[2] == "svc" => HostMatch::Exact(format!("{host}.{cluster_domain}")),
            _ => HostMatch::Exact(host.to_string()),
        }
    } else {
        HostMatch::Exact(format!("{host}.{}.svc.{cluster_domain}", meta.namespace))
    };
    if spec.workload_selector.is_some() {
        warn(
            "spec.workloadSelector",
            "a workload selector (it selects sidecars, never a waypoint)",
        );
    }
    if !spec.subsets.is_empty() {
        warn("spec.subsets", "subsets");
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
    };
    let Some(tp) = &spec.traffic_policy else {
        return Some(out);
    };
    let at = "spec.trafficPolicy";
    for (present, field, what) in [
        (tp.tls.is_some(), "tls", "TLS origination"),
        (tp.tunnel.is_some(), "tunnel", "tunnel settings"),
        (
            tp.proxy_protocol.is_some(),
            "proxyProtocol",
            "PROXY protocol",
        ),
        (tp.retry_budget.is_some(), "retryBudget", "a retry budget"),
    ] {
        if present {
            warn(&format!("{at}.{field}"), what);
        }
    }
    let mut ok = true;
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
        if p.tls.is_some() {
            warn(&format!("{at}.tls"), "TLS origination");
        }
        let parts = parts(
            meta,
            &at,
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            errors,
            &mut warn,
            &mut ok,
        );
        out.ports.push((port, parts));
    }
    ok.then_some(out)
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
    let duration = |field: String, v: &Option<String>, fail: &mut dyn FnMut(String, String)| {
        let v = v.as_deref()?;
        match parse_proto_duration(v) {
            Some(d) => Some(d),
            None => {
                fail(field, format!("{v:?} is not a duration (e.g. 10s, 0.5s)"));
                None
            }
        }
    };
    let count = |field: String, v: Option<i64>, fail: &mut dyn FnMut(String, String)| {
        let v = v?;
        match u32::try_from(v) {
            Ok(n) => Some(n),
            Err(_) => {
                fail(field, format!("{v} is not a count (0-4294967295)"));
                None
            }
        }
    };
    let mut out = Parts::default();
    if let Some(lb) = lb {
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
        for (present, field, what) in [
            (
                lb.consistent_hash.is_some(),
                "consistentHash",
                "consistent hashing",
            ),
            (
                lb.locality_lb_setting.is_some(),
                "localityLbSetting",
                "locality load balancing",
            ),
            (
                lb.warmup_duration_secs.is_some() || lb.warmup.is_some(),
                "warmupDurationSecs",
                "slow start",
            ),
        ] {
            if present {
                warn(&format!("{f}.{field}"), what);
            }
        }
    }
    if let Some(pool) = pool {
        let f = format!("{at}.connectionPool");
        let mut p = PoolParts::default();
        if let Some(tcp) = &pool.tcp {
            p.connect_timeout = duration(
                format!("{f}.tcp.connectTimeout"),
                &tcp.connect_timeout,
                &mut fail,
            );
            p.tcp_idle_timeout =
                duration(format!("{f}.tcp.idleTimeout"), &tcp.idle_timeout, &mut fail);
            for (present, field, what) in [
                (
                    tcp.max_connections.is_some(),
                    "maxConnections",
                    "a connection limit",
                ),
                (tcp.tcp_keepalive.is_some(), "tcpKeepalive", "TCP keepalive"),
                (
                    tcp.max_connection_duration.is_some(),
                    "maxConnectionDuration",
                    "a connection lifetime",
                ),
            ] {
                if present {
                    warn(&format!("{f}.tcp.{field}"), what);
                }
            }
        }
        if let Some(http) = &pool.http {
            p.max_requests = count(
                format!("{f}.http.http2MaxRequests"),
                http.http2_max_requests,
                &mut fail,
            );
            p.max_requests_per_connection = count(
                format!("{f}.http.maxRequestsPerConnection"),
                http.max_requests_per_connection,
                &mut fail,
            )
            .filter(|n| *n != 0);
            p.max_retries = count(format!("{f}.http.maxRetries"), http.max_retries, &mut fail);
            p.idle_timeout = duration(
                format!("{f}.http.idleTimeout"),
                &http.idle_timeout,
                &mut fail,
            );
            for (present, field, what) in [
                (
                    http.http1_max_pending_requests.is_some(),
                    "http1MaxPendingRequests",
                    "a pending-request limit",
                ),
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
    if let Some(o) = outlier {
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
            &mut fail,
        )
        .or(count(
            format!("{f}.consecutiveErrors"),
            o.consecutive_errors,
            &mut fail,
        ));
        let gateway = count(
            format!("{f}.consecutiveGatewayErrors"),
            o.consecutive_gateway_errors,
            &mut fail,
        );
        let percent = |field: &str,
                       v: Option<i64>,
                       default: u32,
                       fail: &mut dyn FnMut(String, String)| match v {
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
        if o.interval.is_some() {
            // Ejection is decided when the threshold is reached (Envoy's consecutive
            // detectors do not wait for the interval); the interval only paces
            // success-rate detection, which Istio does not configure.
            duration(format!("{f}.interval"), &o.interval, &mut fail);
        }
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
                &mut fail,
            )
            .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: percent(
                "maxEjectionPercent",
                o.max_ejection_percent,
                10,
                &mut fail,
            ),
            min_health_percent: percent("minHealthPercent", o.min_health_percent, 0, &mut fail),
        });
    }
    out
}

/// The rule that applies to the Service `ns/name` (FQDN `fqdn`), if any, by Istio's
/// precedence (see the module doc).
pub(crate) fn rule_for<'r>(
    rules: &'r [CompiledRule],
    fqdn: &str,
    service_namespace: &str,
    root_namespace: &str,
) -> Option<&'r CompiledRule> {
    rules
        .iter()
        .filter_map(|r| {
            let exact = r.matches(fqdn)?;
            let ns_rank = if r.namespace == service_namespace {
                0
            } else if r.namespace == root_namespace {
                1
            } else {
                // Istio applies a rule from another namespace only with exportTo; we take
                // the Service's and the root namespace's.
                return None;
            };
            Some((
                (
                    !exact,
                    ns_rank,
                    r.age.clone(),
                    r.namespace.clone(),
                    r.name.clone(),
                ),
                r,
            ))
        })
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, r)| r)
}

/// The policy of one cluster (`None`: no rule, Envoy's defaults).
pub(crate) fn cluster_policy(
    rules: &[CompiledRule],
    fqdn: &str,
    service_namespace: &str,
    root_namespace: &str,
    port: u16,
) -> Option<Arc<TrafficPolicy>> {
    rule_for(rules, fqdn, service_namespace, root_namespace).map(|r| Arc::new(r.policy(port)))
}
