//! DNS endpoints: ServiceEntry `resolution: DNS` (Envoy STRICT_DNS: every address of every
//! name is an endpoint) and `DNS_ROUND_ROBIN` (LOGICAL_DNS: the first address of each
//! answer). istiod sets `respect_dns_ttl` on these clusters, so a name is resolved again when
//! its answer expires, but not sooner than `min_refresh` (Envoy's `dns_min_refresh_rate`,
//! 5 s by default). A failed lookup keeps the last answer (Envoy keeps the hosts of a
//! STRICT_DNS cluster when a refresh fails) and is retried after `min_refresh`; a name never
//! resolved has no endpoints, so requests get 503 `UH` as from Envoy's empty cluster.
//!
//! One task owns the answers. [`DnsEndpoints::sync`] runs before each snapshot is published:
//! the clusters of the new snapshot get the answers already known (a reload never empties a
//! DNS cluster), and the task is told which names are now wanted; names no longer in the
//! configuration are forgotten, so the table is bounded by the configuration.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use policy::{Cluster, EndpointSpec, Snapshot};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Where names are resolved.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Name servers (`--dns-server`); empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// The shortest time between two lookups of a name (Envoy `dns_min_refresh_rate`).
    pub min_refresh: Duration,
    /// How long one lookup may take (all servers and attempts).
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: Vec::new(),
            min_refresh: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The last answer for a name.
#[derive(Debug, Clone, Default)]
struct Answer {
    addrs: Vec<IpAddr>,
    /// When to ask again.
    refresh_at: Option<Instant>,
    /// Lookups that failed since the last success (for the logs and `/clusters`).
    failures: u32,
}

#[derive(Default)]
struct State {
    answers: HashMap<Arc<str>, Answer>,
    /// The DNS clusters of the snapshot in force.
    clusters: Vec<Arc<Cluster>>,
}

/// The DNS endpoints of every DNS cluster in force, kept fresh by one task.
pub struct DnsEndpoints {
    settings: DnsSettings,
    state: Mutex<State>,
    wake: Notify,
    /// Rounds of lookups done (for [`DnsEndpoints::warm`]).
    rounds: tokio::sync::watch::Sender<u64>,
    resolver: Mutex<Option<Result<TokioResolver, String>>>,
}

impl DnsEndpoints {
    pub fn new(settings: DnsSettings) -> Arc<DnsEndpoints> {
        Arc::new(DnsEndpoints {
            settings,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            rounds: tokio::sync::watch::Sender::new(0),
            resolver: Mutex::new(None),
        })
    }

    /// Adopt a snapshot about to be published: fill its DNS clusters from the answers known,
    /// forget names it no longer has, and wake the task for the new ones.
    pub fn sync(&self, snapshot: &Snapshot) {
        let clusters: Vec<Arc<Cluster>> = snapshot
            .clusters()
            .into_iter()
            .filter(|c| c.dns.is_some())
            .collect();
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let wanted: std::collections::HashSet<Arc<str>> = clusters
            .iter()
            .filter_map(|c| c.dns.as_ref())
            .flat_map(|d| d.names.iter().map(|(n, _)| n.clone()))
            .collect();
        st.answers.retain(|name, _| wanted.contains(name));
        for name in wanted {
            st.answers.entry(name).or_default();
        }
        for c in &clusters {
            apply(c, &st.answers);
        }
        st.clusters = clusters;
        drop(st);
        self.wake.notify_one();
    }

    /// Resolve every name that has no answer yet, waiting at most `within` (a DNS cluster
    /// warms before the waypoint reports ready, as Envoy's STRICT_DNS clusters do).
    pub async fn warm(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut rounds = self.rounds.subscribe();
        loop {
            let pending = self
                .state
                .lock()
                .map(|st| {
                    st.answers
                        .values()
                        .any(|a| a.refresh_at.is_none() && a.failures == 0)
                })
                .unwrap_or(false);
            if !pending {
                return;
            }
            self.wake.notify_one();
            match tokio::time::timeout_at(deadline, rounds.changed()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    /// The table for `/clusters`: (name, addresses, failures since the last success).
    pub fn answers(&self) -> Vec<(Arc<str>, Vec<IpAddr>, u32)> {
        let Ok(st) = self.state.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = st
            .answers
            .iter()
            .map(|(n, a)| (n.clone(), a.addrs.clone(), a.failures))
            .collect();
        out.sort();
        out
    }

    fn resolver(&self) -> Result<TokioResolver, String> {
        let mut slot = self
            .resolver
            .lock()
            .map_err(|_| "resolver lock poisoned".to_string())?;
        if let Some(r) = &*slot {
            return r.clone();
        }
        let built = build_resolver(&self.settings);
        *slot = Some(built.clone());
        built
    }

    /// The task: resolve what is due, store the answers, sleep until the next is due.
    pub async fn run(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let due: Vec<Arc<str>> = match self.state.lock() {
                Ok(st) => st
                    .answers
                    .iter()
                    .filter(|(_, a)| a.refresh_at.is_none_or(|t| t <= now))
                    .map(|(n, _)| n.clone())
                    .collect(),
                Err(_) => return,
            };
            if !due.is_empty() {
                let resolver = self.resolver();
                let mut lookups = tokio::task::JoinSet::new();
                for name in due {
                    let resolver = resolver.clone();
                    let timeout = self.settings.timeout;
                    lookups.spawn(async move {
                        let result = match resolver {
                            Ok(r) => lookup(&r, &name, timeout).await,
                            Err(e) => Err(e),
                        };
                        (name, result)
                    });
                }
                while let Some(done) = lookups.join_next().await {
                    let Ok((name, result)) = done else { continue };
                    self.store(&name, result);
                }
                self.rounds.send_modify(|n| *n += 1);
            }
            let next = self.state.lock().ok().and_then(|st| {
                st.answers
                    .values()
                    .map(|a| a.refresh_at.unwrap_or(now))
                    .min()
            });
            match next {
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    fn store(&self, name: &Arc<str>, result: Result<(Vec<IpAddr>, Duration), String>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let min = self.settings.min_refresh;
        let Some(answer) = st.answers.get_mut(name) else {
            return; // no longer configured
        };
        match result {
            Ok((addrs, ttl)) => {
                if addrs != answer.addrs {
                    debug!(%name, ?addrs, "DNS answer changed");
                }
                answer.addrs = addrs;
                answer.failures = 0;
                answer.refresh_at = Some(Instant::now() + ttl.max(min));
            }
            Err(e) => {
                answer.failures += 1;
                if answer.failures == 1 {
                    warn!(%name, error = %e, kept = answer.addrs.len(), "DNS lookup failed; keeping the last answer");
                }
                answer.refresh_at = Some(Instant::now() + min);
            }
        }
        let answers = &st.answers;
        for c in &st.clusters {
            if c.dns
                .as_ref()
                .is_some_and(|d| d.names.iter().any(|(n, _)| n == name))
            {
                apply(c, answers);
            }
        }
    }
}

/// Set a DNS cluster's endpoints from the answers: each name's addresses (the first only
/// for DNS_ROUND_ROBIN) with its port, in answer order, without duplicates.
fn apply(cluster: &Cluster, answers: &HashMap<Arc<str>, Answer>) {
    let Some(dns) = &cluster.dns else { return };
    let mut eps: Vec<EndpointSpec> = Vec::new();
    for (name, port) in &dns.names {
        let addrs = match name.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => answers
                .get(name)
                .map(|a| a.addrs.clone())
                .unwrap_or_default(),
        };
        let take = if dns.first_only { 1 } else { addrs.len() };
        for ip in addrs.into_iter().take(take) {
            let addr = SocketAddr::new(ip, *port);
            if !eps.iter().any(|e| e.addr == addr) {
                eps.push(EndpointSpec {
                    addr,
                    tunnel: None,
                    workload: None,
                });
            }
        }
    }
    cluster.set_endpoints(eps);
}

fn build_resolver(s: &DnsSettings) -> Result<TokioResolver, String> {
    let mut builder = if s.servers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("reading /etc/resolv.conf: {e}"))?
    } else {
        let servers = s
            .servers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    // Envoy's default `dns_lookup_family` for Istio's clusters prefers IPv4 (V4_PREFERRED).
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.timeout = s.timeout;
    builder.build().map_err(|e| format!("DNS resolver: {e}"))
}

/// One lookup: the addresses and how long the answer is valid.
async fn lookup(
    r: &TokioResolver,
    name: &str,
    timeout: Duration,
) -> Result<(Vec<IpAddr>, Duration), String> {
    let answer = tokio::time::timeout(timeout, r.lookup_ip(name))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let addrs: Vec<IpAddr> = answer.iter().collect();
    if addrs.is_empty() {
        return Err("no addresses".into());
    }
    let ttl = answer
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Ok((addrs, ttl))
}
