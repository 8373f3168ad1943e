//! The dynamic forward proxy of `DYNAMIC_DNS` ServiceEntries (wildcard hosts, Istio's
//! egress through a waypoint): each request goes to the first address its `Host` resolves
//! to, as Envoy's `envoy.filters.http.dynamic_forward_proxy` and its DNS cache do with what
//! istiod renders (`buildDFPCluster`, `BuildWaypointInboundDFPFilter`: no settings, so
//! Envoy's defaults), checked side by side with Envoy 1.40 (docs/envoy-observed.md 20):
//!
//! - One cache per wildcard host (`<host>_dfp_dns_cache`, shared by its ports), at most
//!   [`MAX_HOSTS`] names (Envoy's `max_hosts`, 1024). A new name beyond it is refused with
//!   503 `DNS cache overflow`, no flag, details `dns_cache_overflow`; names not used for
//!   [`HOST_TTL`] (Envoy's `host_ttl`, 5 min) make room and are dropped.
//! - A request goes to the name's first address (`%UPSTREAM_HOST%`); a connection that
//!   fails there tries the next addresses in answer order (Envoy connects a DFP host through
//!   its address list: with two A records, the first refusing, Envoy 1.40 answers 200 and
//!   logs the first address). Envoy starts the next attempt 300 ms into a slow one (happy
//!   eyeballs); here the next starts when the previous fails.
//! - A name's first request waits for its lookup; a failed one (NXDOMAIN, no addresses,
//!   SERVFAIL, no server) is answered 503 `DNS resolution failure`, flag `DF`, details
//!   `dns_resolution_failure{<c-ares reason>}`, and remembered: the name is not asked again
//!   before the refresh rate (60 s, `dns_refresh_rate`).
//! - An answer is used until its TTL (at least [`MIN_REFRESH`], Envoy's
//!   `dns_min_refresh_rate`); the first request after that triggers a lookup in the
//!   background and keeps using the last address meanwhile; a refresh that fails keeps the
//!   last address. Envoy refreshes on a timer whether or not the name is used; refreshing on
//!   use asks the server only for names in use, with the same answers.
//! - Names are compared in lower case (DNS is case-insensitive; Envoy keys its cache by the
//!   `Host` as written, so `A.EXAMPLE.COM` is a second entry there).
//!
//! Wildcard hosts that leave the configuration take their cache with them
//! ([`DynamicHosts::sync`]), so the table is bounded by the configuration times
//! [`MAX_HOSTS`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use policy::Snapshot;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::dns::DnsEndpoints;

/// Names per cache (Envoy `DnsCacheConfig.max_hosts` default).
pub const MAX_HOSTS: usize = 1024;
/// A name not used for this long is dropped (Envoy `DnsCacheConfig.host_ttl` default).
pub const HOST_TTL: Duration = Duration::from_secs(300);
/// The shortest time an answer is used before it is asked again (Envoy
/// `dns_min_refresh_rate` default).
pub const MIN_REFRESH: Duration = Duration::from_secs(5);

/// Why a request has no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DynamicDnsFailure {
    /// The cache is full of names in use.
    Overflow,
    /// The lookup failed: Envoy's c-ares reason, `cares_norecords:Domain_name_not_found`.
    Resolution(&'static str),
}

/// The last lookup of one name.
#[derive(Debug, Clone)]
enum Answer {
    /// In answer order; never empty.
    Addresses(Arc<[IpAddr]>),
    Failed(&'static str),
}

struct Host {
    /// `None` until the first lookup ends.
    answer: watch::Sender<Option<Answer>>,
    /// When to ask again, in ms since [`DynamicHosts::epoch`].
    refresh_at_ms: AtomicU64,
    /// Last request, in ms since the epoch.
    used_ms: AtomicU64,
    /// A lookup is running.
    resolving: AtomicBool,
}

/// The caches of every `DYNAMIC_DNS` wildcard host in force.
pub struct DynamicHosts {
    dns: Arc<DnsEndpoints>,
    refresh_rate: Duration,
    epoch: Instant,
    /// By cache name.
    caches: Mutex<HashMap<Arc<str>, HostCache>>,
}

/// One cache: names (lower case) to their state; at most [`MAX_HOSTS`].
type HostCache = HashMap<Arc<str>, Arc<Host>>;

impl DynamicHosts {
    /// Lookups go through `dns`'s resolver (`--dns-server`, or the system's) and timeout; a
    /// failure is remembered for its refresh rate (`--dns-refresh-rate`, 60 s as Envoy's
    /// `dns_refresh_rate` default).
    pub fn new(dns: Arc<DnsEndpoints>) -> Arc<DynamicHosts> {
        Arc::new(DynamicHosts {
            refresh_rate: dns.settings().refresh_rate,
            dns,
            epoch: Instant::now(),
            caches: Mutex::new(HashMap::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Adopt a snapshot about to be published: drop the caches of wildcard hosts it no longer
    /// has.
    pub fn sync(&self, snapshot: &Snapshot) {
        let wanted: std::collections::HashSet<Arc<str>> = snapshot
            .clusters()
            .into_iter()
            .filter_map(|c| c.dynamic_dns.as_ref().map(|d| d.cache.clone()))
            .collect();
        if let Ok(mut caches) = self.caches.lock() {
            caches.retain(|name, _| wanted.contains(name));
        }
    }

    /// The addresses of `host` (a request's `Host`, already matched against the wildcard) in
    /// `cache`, in answer order. Envoy's host is the first (what `%UPSTREAM_HOST%` prints);
    /// its connection goes through the list in order until one connects.
    pub async fn resolve(
        self: &Arc<Self>,
        cache: &Arc<str>,
        host: &str,
    ) -> Result<Arc<[IpAddr]>, DynamicDnsFailure> {
        let name: Arc<str> = host.to_ascii_lowercase().into();
        let now = self.now_ms();
        let entry = {
            // A poisoned lock only means a request panicked mid-update; the map is whole.
            let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            let hosts = caches.entry(cache.clone()).or_default();
            match hosts.get(&name) {
                Some(h) => h.clone(),
                None => {
                    if hosts.len() >= MAX_HOSTS {
                        let ttl = HOST_TTL.as_millis() as u64;
                        hosts.retain(|_, h| {
                            now.saturating_sub(h.used_ms.load(Ordering::Relaxed)) < ttl
                        });
                    }
                    if hosts.len() >= MAX_HOSTS {
                        return Err(DynamicDnsFailure::Overflow);
                    }
                    let h = Arc::new(Host {
                        answer: watch::Sender::new(None),
                        refresh_at_ms: AtomicU64::new(0),
                        used_ms: AtomicU64::new(now),
                        resolving: AtomicBool::new(false),
                    });
                    hosts.insert(name.clone(), h.clone());
                    h
                }
            }
        };
        entry.used_ms.store(now, Ordering::Relaxed);
        if entry.refresh_at_ms.load(Ordering::Relaxed) <= now
            && !entry.resolving.swap(true, Ordering::AcqRel)
        {
            let this = self.clone();
            let entry = entry.clone();
            tokio::spawn(async move { this.lookup(&name, &entry).await });
        }
        let mut answers = entry.answer.subscribe();
        // The lookup is bounded by the resolver's timeout; the extra second only guards
        // against a lookup task that never reports.
        let bound = self.dns.settings().timeout + Duration::from_secs(1);
        let answer = match tokio::time::timeout(bound, answers.wait_for(Option::is_some)).await {
            Ok(Ok(a)) => a.clone(),
            _ => None,
        };
        match answer {
            Some(Answer::Addresses(ips)) => Ok(ips),
            Some(Answer::Failed(why)) => Err(DynamicDnsFailure::Resolution(why)),
            None => Err(DynamicDnsFailure::Resolution(
                "cares_failure:Timeout_while_contacting_DNS_servers",
            )),
        }
    }

    /// Look `name` up and store the answer (a failure does not replace a good address).
    async fn lookup(&self, name: &str, host: &Host) {
        let result = self.dns.lookup_with_reason(name).await;
        let now = self.now_ms();
        let (answer, after) = match result {
            Ok((addrs, _)) if addrs.is_empty() => (
                Answer::Failed("cares_norecords:DNS_server_returned_answer_with_no_data"),
                self.refresh_rate,
            ),
            Ok((addrs, ttl)) => (Answer::Addresses(addrs.into()), ttl.max(MIN_REFRESH)),
            Err(why) => (Answer::Failed(why), self.refresh_rate),
        };
        debug!(%name, ?answer, "dynamic forward proxy: lookup done");
        host.answer.send_modify(|a| {
            let keep =
                matches!(answer, Answer::Failed(_)) && matches!(a, Some(Answer::Addresses(_)));
            if !keep {
                *a = Some(answer);
            }
        });
        host.refresh_at_ms
            .store(now + after.as_millis() as u64, Ordering::Relaxed);
        host.resolving.store(false, Ordering::Release);
    }

    /// Addresses in use now (on `port`s 80 and 443), for the upstream pool sweep.
    pub fn live_addrs(&self) -> Vec<SocketAddr> {
        let Ok(caches) = self.caches.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for hosts in caches.values() {
            for h in hosts.values() {
                if let Some(Answer::Addresses(ips)) = &*h.answer.borrow()
                    && let Some(ip) = ips.first()
                {
                    out.push(SocketAddr::new(*ip, 80));
                    out.push(SocketAddr::new(*ip, 443));
                }
            }
        }
        out
    }

    /// Names held now, over every cache (a metric; bounded by [`MAX_HOSTS`] per cache).
    pub fn len(&self) -> usize {
        self.caches
            .lock()
            .map(|c| c.values().map(HashMap::len).sum())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
