//! DNS endpoints: ServiceEntry `resolution: DNS` (Envoy STRICT_DNS: every address of every
//! name is an endpoint) and `DNS_ROUND_ROBIN` (LOGICAL_DNS: the first address of each
//! answer), answered as real Envoy 1.40 answers with istiod's settings (`respect_dns_ttl`,
//! `dns_refresh_rate` from MeshConfig `dnsRefreshRate`, 60 s), compared side by side in
//! tests/src/service_entry.rs (docs/envoy-observed.md 16):
//! - an answer is used until its TTL runs out, then the name is asked again (a TTL of 0:
//!   after the refresh rate);
//! - a negative answer (NXDOMAIN, or no address records) empties the cluster (503 `UH`) and
//!   the name is asked again after the refresh rate;
//! - a failed lookup (timeout, SERVFAIL, no server) keeps the last answer; it is retried
//!   after `failure_retry` (5 s; Envoy waits the refresh rate: we retry sooner, which only
//!   shortens an outage).
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
    /// When to ask again after a negative answer or a TTL of 0 (MeshConfig `dnsRefreshRate`,
    /// Envoy `dns_refresh_rate`).
    pub refresh_rate: Duration,
    /// When to retry a failed lookup.
    pub failure_retry: Duration,
    /// How long one lookup may take (all servers and attempts).
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: Vec::new(),
            refresh_rate: Duration::from_secs(60),
            failure_retry: Duration::from_secs(5),
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

    pub fn settings(&self) -> &DnsSettings {
        &self.settings
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
            .flat_map(|d| d.names.iter().map(|t| t.name.clone()))
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

    /// One lookup for the dynamic forward proxy ([`super::dynamic_dns`]): the addresses and
    /// how long they are valid, or the reason as Envoy's c-ares resolver words it in
    /// `dns_resolution_failure{...}` (docs/envoy-observed.md 20).
    pub(crate) async fn lookup_with_reason(
        &self,
        name: &str,
    ) -> Result<(Vec<IpAddr>, Duration), &'static str> {
        let resolver = self
            .resolver()
            .map_err(|_| "cares_failure:Could_not_contact_DNS_servers")?;
        match lookup(&resolver, name, self.settings.timeout).await {
            Lookup::Addresses(addrs, ttl) => Ok((addrs, ttl)),
            Lookup::Negative(why) | Lookup::Failed(why) => Err(why.cares()),
        }
    }

    /// One lookup with the same servers and timeout, outside the DNS clusters (a tracing
    /// collector outside the configuration): the addresses, or why there are none.
    pub async fn resolve_once(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let resolver = self.resolver()?;
        match lookup(&resolver, name, self.settings.timeout).await {
            Lookup::Addresses(addrs, _) => Ok(addrs),
            Lookup::Negative(why) | Lookup::Failed(why) => Err(format!("{name}: {why}")),
        }
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
                            Err(e) => Lookup::Failed(Reason::Unreachable(e)),
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

    fn store(&self, name: &Arc<str>, result: Lookup) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let settings = &self.settings;
        let Some(answer) = st.answers.get_mut(name) else {
            return; // no longer configured
        };
        let now = Instant::now();
        match result {
            Lookup::Addresses(addrs, ttl) => {
                if addrs != answer.addrs {
                    debug!(%name, ?addrs, "DNS answer changed");
                }
                answer.addrs = addrs;
                answer.failures = 0;
                let after = if ttl.is_zero() {
                    settings.refresh_rate
                } else {
                    ttl
                };
                answer.refresh_at = Some(now + after);
            }
            Lookup::Negative(why) => {
                if !answer.addrs.is_empty() {
                    warn!(%name, %why, "DNS: the name has no addresses any more; its endpoints are removed");
                }
                answer.addrs.clear();
                answer.failures = 0;
                answer.refresh_at = Some(now + settings.refresh_rate);
            }
            Lookup::Failed(e) => {
                answer.failures += 1;
                if answer.failures == 1 {
                    warn!(%name, error = %e, kept = answer.addrs.len(), "DNS lookup failed; keeping the last answer");
                }
                answer.refresh_at = Some(now + settings.failure_retry);
            }
        }
        let answers = &st.answers;
        for c in &st.clusters {
            if c.dns
                .as_ref()
                .is_some_and(|d| d.names.iter().any(|t| t.name == *name))
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
    for t in &dns.names {
        let addrs = match t.name.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => answers
                .get(&t.name)
                .map(|a| a.addrs.clone())
                .unwrap_or_default(),
        };
        let take = if dns.first_only { 1 } else { addrs.len() };
        for ip in addrs.into_iter().take(take) {
            let addr = SocketAddr::new(ip, t.port);
            if !eps.iter().any(|e| e.addr == addr) {
                // Each address inherits its name's weight, locality and rank.
                eps.push(t.endpoint(addr));
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
    // istiod renders `dns_lookup_family: V4_ONLY` for a proxy whose addresses are all IPv4
    // (and without dual stack), which is the waypoint pod's case (`util.go`
    // `SelectDNSLookupFamily`): A records only, so a name with only AAAA records does not
    // resolve (docs/envoy-observed.md 20).
    opts.ip_strategy = LookupIpStrategy::Ipv4Only;
    opts.timeout = s.timeout;
    builder.build().map_err(|e| format!("DNS resolver: {e}"))
}

/// Why a lookup gave no address.
#[derive(Debug)]
enum Reason {
    NxDomain,
    NoAddresses,
    Timeout,
    /// Another response code from the server (SERVFAIL, REFUSED, ...).
    Code(hickory_resolver::proto::op::ResponseCode),
    /// No server could be asked (unreachable, I/O, no configuration).
    Unreachable(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NxDomain => f.write_str("NXDOMAIN"),
            Reason::NoAddresses => f.write_str("no address records"),
            Reason::Timeout => f.write_str("no answer in time"),
            Reason::Code(c) => write!(f, "error response: {c}"),
            Reason::Unreachable(e) => f.write_str(e),
        }
    }
}

impl Reason {
    /// How Envoy's c-ares resolver words it in `dns_resolution_failure{...}`
    /// (`ares_strerror`, spaces as `_`): observed with Envoy 1.40 for NXDOMAIN, an answer
    /// without addresses, SERVFAIL and an unreachable server (docs/envoy-observed.md 20); the
    /// other codes and the timeout take c-ares's words for them.
    fn cares(&self) -> &'static str {
        use hickory_resolver::proto::op::ResponseCode;
        match self {
            Reason::NxDomain => "cares_norecords:Domain_name_not_found",
            Reason::NoAddresses => "cares_norecords:DNS_server_returned_answer_with_no_data",
            Reason::Timeout => "cares_failure:Timeout_while_contacting_DNS_servers",
            Reason::Code(ResponseCode::ServFail) => {
                "cares_failure:DNS_server_returned_general_failure"
            }
            Reason::Code(ResponseCode::Refused) => "cares_failure:DNS_server_refused_query",
            Reason::Code(ResponseCode::FormErr) => "cares_failure:Misformatted_DNS_query",
            Reason::Code(ResponseCode::NotImp) => {
                "cares_failure:DNS_server_does_not_implement_requested_operation"
            }
            Reason::Code(_) => "cares_failure:DNS_server_returned_general_failure",
            Reason::Unreachable(_) => "cares_failure:Could_not_contact_DNS_servers",
        }
    }
}

/// The outcome of one lookup.
enum Lookup {
    /// The addresses and how long they are valid.
    Addresses(Vec<IpAddr>, Duration),
    /// The server says the name has no addresses (NXDOMAIN, or no A/AAAA records).
    Negative(Reason),
    /// No answer (timeout, SERVFAIL, refused, no server).
    Failed(Reason),
}

async fn lookup(r: &TokioResolver, name: &str, timeout: Duration) -> Lookup {
    use hickory_resolver::net::{DnsError, NetError};
    use hickory_resolver::proto::op::ResponseCode;
    let answer = match tokio::time::timeout(timeout, r.lookup_ip(name)).await {
        Err(_) | Ok(Err(NetError::Timeout)) => return Lookup::Failed(Reason::Timeout),
        Ok(Err(NetError::Dns(DnsError::NoRecordsFound(nr)))) => {
            return match nr.response_code {
                ResponseCode::NXDomain => Lookup::Negative(Reason::NxDomain),
                ResponseCode::NoError => Lookup::Negative(Reason::NoAddresses),
                code => Lookup::Failed(Reason::Code(code)),
            };
        }
        Ok(Err(NetError::Dns(DnsError::ResponseCode(code)))) => {
            return Lookup::Failed(Reason::Code(code));
        }
        Ok(Err(e)) => return Lookup::Failed(Reason::Unreachable(e.to_string())),
        Ok(Ok(answer)) => answer,
    };
    let addrs: Vec<IpAddr> = answer.iter().collect();
    if addrs.is_empty() {
        return Lookup::Negative(Reason::NoAddresses);
    }
    let ttl = answer
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Lookup::Addresses(addrs, ttl)
}
