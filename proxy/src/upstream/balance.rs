//! Endpoint choice under a DestinationRule (load-balancer policy, outlier ejection) and the
//! outcome reports that drive ejection, as Envoy's `outlier_detection` does with istiod's
//! settings (policy/src/traffic.rs has the settings and their defaults).
//!
//! - A cluster without a DestinationRule takes the fast path, [`pick_endpoint`] (Envoy's
//!   default least-request with two random choices).
//! - Ejected endpoints are skipped while their time runs; if fewer than `minHealthPercent`
//!   of the endpoints are left, all are used (Envoy's panic mode); if none is left and the
//!   threshold is 0, the request gets 503 `UH` `no healthy upstream`, as Envoy answers.
//! - An endpoint is ejected when its consecutive 5xx (or gateway errors: 502, 503, 504, and
//!   connect failures and timeouts, which Envoy counts as such when local-origin errors are
//!   not split) reach the threshold and fewer than `maxEjectionPercent` of the endpoints are
//!   ejected (at least one may always be), for `baseEjectionTime` times its ejection count,
//!   at most Envoy's 300 s. A success resets the counters.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Instant;

use policy::traffic::{LbPolicy, MAX_EJECTION_TIME, OutlierPolicy, TrafficPolicy};
use policy::{Cluster, Endpoint};

use super::pick_endpoint;

/// Milliseconds on the proxy's own clock (never 0, which means "not ejected").
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Choose an endpoint of `cluster` among `endpoints`, avoiding `tried` where possible.
pub fn choose<'a>(
    cluster: &Cluster,
    endpoints: &'a [Endpoint],
    tried: &[SocketAddr],
    r: u64,
) -> Option<&'a Endpoint> {
    let Some(t) = &cluster.traffic else {
        return pick_endpoint(endpoints, tried, r);
    };
    let now = t.outlier.as_ref().map(|_| now_ms());
    let healthy = |e: &Endpoint| now.is_none_or(|now| !e.health.is_ejected(now));
    let mut usable: Vec<&Endpoint> = endpoints.iter().filter(|e| healthy(e)).collect();
    if let Some(o) = &t.outlier
        && !endpoints.is_empty()
        && (usable.len() * 100) < (o.min_health_percent as usize * endpoints.len())
    {
        // Panic mode: too few healthy hosts; use them all.
        usable = endpoints.iter().collect();
    }
    if usable.is_empty() {
        return None;
    }
    let fresh: Vec<&Endpoint> = usable
        .iter()
        .copied()
        .filter(|e| !tried.contains(&e.addr))
        .collect();
    let pool = if fresh.is_empty() { usable } else { fresh };
    match t.lb {
        LbPolicy::RoundRobin => {
            let i = t.rr.fetch_add(1, Ordering::Relaxed) as usize;
            pool.get(i % pool.len()).copied()
        }
        LbPolicy::Random => pool.get((r % pool.len() as u64) as usize).copied(),
        LbPolicy::LeastRequest => {
            if pool.len() == 1 {
                return pool.first().copied();
            }
            let a = (r % pool.len() as u64) as usize;
            let mut b = ((r >> 32) % (pool.len() as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (pool[a], pool[b]);
            Some(if eb.load.get() < ea.load.get() {
                eb
            } else {
                ea
            })
        }
    }
}

/// What one attempt to an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// Connect failure, timeout or reset before a response (a locally originated failure,
    /// counted as a gateway error and a 5xx when they are not split, as Istio configures).
    LocalFailure,
}

/// Report an attempt's outcome on `endpoint` of `cluster` (no-op without outlier detection).
pub fn report(cluster: &Cluster, endpoint: &Endpoint, outcome: Outcome) {
    let Some(t) = &cluster.traffic else { return };
    let Some(o) = &t.outlier else { return };
    let h = &endpoint.health;
    let (five, gateway) = match outcome {
        Outcome::Status(s) if s >= 500 => (true, matches!(s, 502..=504)),
        Outcome::Status(_) => (false, false),
        Outcome::LocalFailure => (true, true),
    };
    if !five {
        h.consecutive_5xx.store(0, Ordering::Relaxed);
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        return;
    }
    let n5 = h.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
    let ng = if gateway {
        h.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        0
    };
    let hit = o.consecutive_5xx.is_some_and(|max| n5 >= max)
        || o.consecutive_gateway.is_some_and(|max| ng >= max);
    if hit {
        eject(t, o, cluster, endpoint);
    }
}

fn eject(t: &TrafficPolicy, o: &OutlierPolicy, cluster: &Cluster, endpoint: &Endpoint) {
    let now = now_ms();
    if endpoint.health.is_ejected(now) {
        return;
    }
    let all = cluster.endpoints();
    let ejected = all.iter().filter(|e| e.health.is_ejected(now)).count();
    // At most maxEjectionPercent of the hosts, but one may always be ejected.
    let allowed = (all.len() * o.max_ejection_percent as usize / 100).max(1);
    if ejected >= allowed {
        return;
    }
    let h = &endpoint.health;
    let times = h.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let for_ms = (o.base_ejection_time.as_millis() as u64)
        .saturating_mul(times as u64)
        .min(MAX_EJECTION_TIME.as_millis() as u64);
    h.ejected_until_ms.store(now + for_ms, Ordering::Relaxed);
    h.consecutive_5xx.store(0, Ordering::Relaxed);
    h.consecutive_gateway.store(0, Ordering::Relaxed);
    t.ejections_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        cluster = %cluster.name,
        endpoint = %endpoint.addr,
        ejected_for_ms = for_ms,
        "outlier detection: endpoint ejected"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The cluster of a Service with `n` endpoints and a DestinationRule whose
    /// trafficPolicy is `policy` (YAML flow mapping), compiled as in production.
    fn cluster(policy: &str, n: u8) -> Arc<Cluster> {
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/use-waypoint: waypoint}}}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: default}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 80}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\nspec: {{host: web, trafficPolicy: {policy}}}\n",
            (1..=n)
                .map(|i| format!("{{addresses: [\"10.1.0.{i}\"]}}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let loaded = policy::parse_manifests(&yaml, "t.yaml").unwrap();
        let snap = policy::compile(&loaded, &Default::default()).unwrap();
        let policy::VipLookup::Bound(sp) = snap.lookup_vip("10.0.0.1:80".parse().unwrap()) else {
            panic!("bound")
        };
        sp.cluster.clone()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let c = cluster("{loadBalancer: {simple: ROUND_ROBIN}}", 3);
        let eps = c.endpoints();
        let seen: Vec<_> = (0..6)
            .map(|_| choose(&c, &eps, &[], 7).unwrap().addr)
            .collect();
        assert_eq!(seen[..3], seen[3..]);
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn consecutive_errors_eject_within_the_percentage_and_success_resets() {
        let c = cluster(
            "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3, maxEjectionPercent: 50}}",
            4,
        );
        let eps = c.endpoints();
        // Two 5xx, a success, two more: not ejected (the run was broken).
        for s in [500, 503, 200, 500, 500] {
            report(&c, &eps[0], Outcome::Status(s));
        }
        assert!(!eps[0].health.is_ejected(now_ms()));
        report(&c, &eps[0], Outcome::LocalFailure);
        assert!(eps[0].health.is_ejected(now_ms()));
        // Never chosen while ejected.
        for _ in 0..8 {
            assert_ne!(choose(&c, &eps, &[], 1).unwrap().addr, eps[0].addr);
        }
        // 50% of 4: a second may go, a third may not.
        for _ in 0..3 {
            report(&c, &eps[1], Outcome::Status(502));
            report(&c, &eps[2], Outcome::Status(502));
        }
        assert!(eps[1].health.is_ejected(now_ms()));
        assert!(!eps[2].health.is_ejected(now_ms()));
        let t = c.traffic.as_ref().unwrap();
        assert_eq!(t.ejections_total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn all_ejected_is_no_healthy_upstream_unless_in_panic() {
        let c = cluster(
            "{outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}}",
            2,
        );
        let eps = c.endpoints();
        report(&c, &eps[0], Outcome::Status(500));
        report(&c, &eps[1], Outcome::Status(500));
        assert!(choose(&c, &eps, &[], 3).is_none());
        // With minHealthPercent 50, fewer than half healthy: every host is used again.
        let c = cluster(
            "{outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100, minHealthPercent: 50}}",
            2,
        );
        let eps = c.endpoints();
        report(&c, &eps[0], Outcome::Status(500));
        report(&c, &eps[1], Outcome::Status(500));
        assert!(choose(&c, &eps, &[], 3).is_some());
    }
}
