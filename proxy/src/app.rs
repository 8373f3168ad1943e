//! Building and running a waypoint: load config and certificates, bind the HBONE, readiness,
//! metrics and admin listeners, reload on demand, drain on shutdown. Tests start the same
//! [`start`] in-process; the binary wraps it with flags and signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use accesslog::AccessLogger;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use hbone::drain::{self, DrainTrigger};
use hbone::server::{ServerSettings, ServerStats, ServerTls};
use hbone::tls::CertBundle;
use policy::{CompileOptions, ConfigError, Snapshot};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::jwks::{JwksCache, JwksSettings};
use crate::config::meshconfig::MeshConfig;
use crate::ops::admin;
use crate::state::{Limits, Shared};
use crate::telemetry::metrics::Metrics;
use crate::upstream::{UpstreamSettings, Upstreams};

/// Static settings, built once from flags and environment (ztunnel src/config.rs).
#[derive(Debug, Clone)]
pub struct Config {
    /// Files or directories of Kubernetes manifests.
    pub config_paths: Vec<PathBuf>,
    pub gateway_namespace: String,
    pub gateway_name: String,
    /// Directory with `cert-chain.pem`, `key.pem`, `root-cert.pem`.
    pub certs_dir: PathBuf,
    pub trust_domain: String,
    pub hbone_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// A second `/stats/prometheus` listener where Envoy serves its own (`0.0.0.0_15090`,
    /// container port `http-envoy-prom`, protocol.md 4.1): scrape configs written for Istio's
    /// proxies (its PodMonitor `envoy-stats`) read that port. `None`: not bound.
    pub envoy_prom_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// This waypoint's locality, `region/zone/subzone` (`--locality`): DestinationRule
    /// locality failover orders endpoints by their distance from it.
    pub locality: Option<String>,
    /// This waypoint's Pod (namespace, name), from `POD_NAMESPACE`/`POD_NAME`: without
    /// `--locality`, its locality label or its EndpointSlice zone is the waypoint's locality.
    pub own_pod: Option<(String, String)>,
    /// How long requests in flight may take to finish after SIGTERM (Istio's
    /// terminationDrainDuration default: 5 s).
    pub drain_timeout: Duration,
    pub server: ServerSettings,
    pub limits: Limits,
    pub upstream: UpstreamSettings,
    /// How often config and certificate files are checked for changes (`None`: only SIGHUP).
    pub watch_interval: Option<Duration>,
    /// Istio MeshConfig file (`--mesh-config`): read by [`start`] into `mesh`.
    pub mesh_config: Option<PathBuf>,
    /// The MeshConfig in use (extension providers, root namespace, trust domain aliases).
    pub mesh: MeshConfig,
    /// Remote JWKS fetch timing.
    pub jwks: JwksSettings,
    /// `--kube`: resources from the Kubernetes API instead of `config_paths`.
    pub kube: Option<KubeSettings>,
    /// `--ca-addr`: the certificate from istiod's CA instead of `certs_dir`.
    pub ca: Option<identity::CaSettings>,
    /// `ISTIO_META_CLUSTER_ID`: the cluster of the workloads this waypoint sees
    /// (`source_cluster` of metrics for clients found in the Kubernetes API).
    pub cluster_id: String,
    /// `ISTIO_META_NETWORK`, `ISTIO_META_NODE_NAME` and the Pod's labels (downward API):
    /// what `failoverPriority` compares with the endpoints'.
    pub network: String,
    pub node_name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Name servers and refresh timing for ServiceEntry `resolution: DNS`.
    pub dns: crate::upstream::dns::DnsSettings,
}

/// How to reach the Kubernetes API (`--kube`).
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    /// `--kubeconfig` / `KUBECONFIG`; else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub discovery: discovery::Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            config_paths: Vec::new(),
            gateway_namespace: "default".into(),
            gateway_name: "waypoint".into(),
            certs_dir: PathBuf::from("/etc/certs"),
            trust_domain: "cluster.local".into(),
            hbone_addr: ([0, 0, 0, 0], 15008).into(),
            ready_addr: ([0, 0, 0, 0], 15021).into(),
            metrics_addr: ([0, 0, 0, 0], 15020).into(),
            envoy_prom_addr: None,
            admin_addr: ([127, 0, 0, 1], 15000).into(),
            locality: None,
            own_pod: None,
            drain_timeout: Duration::from_secs(5),
            server: ServerSettings::default(),
            limits: Limits::default(),
            upstream: UpstreamSettings::default(),
            watch_interval: Some(Duration::from_secs(1)),
            mesh_config: None,
            mesh: MeshConfig::default(),
            jwks: JwksSettings::default(),
            kube: None,
            ca: None,
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            node_name: String::new(),
            labels: Default::default(),
            dns: Default::default(),
        }
    }
}

impl Config {
    pub fn compile_options(&self) -> CompileOptions {
        let defaults = CompileOptions::default();
        CompileOptions {
            locality: self.locality.as_deref().map(policy::Locality::parse),
            own_pod: self.own_pod.clone(),
            mesh_locality: self.mesh.locality_lb.clone(),
            proxy_labels: self.labels.clone(),
            cluster_id: self.cluster_id.clone(),
            network: self.network.clone(),
            node_name: self.node_name.clone(),
            gateway_namespace: self.gateway_namespace.clone(),
            gateway_name: self.gateway_name.clone(),
            trust_domain: self.trust_domain.clone(),
            cluster_domain: "cluster.local".into(),
            root_namespace: self
                .mesh
                .root_namespace
                .clone()
                .unwrap_or(defaults.root_namespace),
            trust_domain_aliases: self.mesh.trust_domain_aliases.clone(),
            extension_services: self.mesh.extension_services(),
            log_providers: self
                .mesh
                .file_log_providers()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            metric_providers: self.mesh.metric_providers(),
        }
    }

    /// Read `mesh_config` (when set) into `mesh`.
    pub fn load_mesh_config(&mut self) -> anyhow::Result<()> {
        if let Some(path) = &self.mesh_config {
            self.mesh = MeshConfig::load(path)?;
        }
        Ok(())
    }
}

/// Load and compile the configuration; every problem is returned.
pub fn load_snapshot(config: &Config) -> Result<Snapshot, Vec<ConfigError>> {
    let loaded = policy::load_paths(&config.config_paths)?;
    policy::compile(&loaded, &config.compile_options())
}

/// What serves before the first complete list from the Kubernetes API compiled: our
/// Gateway alone, nothing bound (and readiness says not ready).
fn placeholder_snapshot(config: &Config) -> anyhow::Result<Snapshot> {
    let gateway = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": config.gateway_name, "namespace": config.gateway_namespace},
        "spec": {"gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    });
    let loaded = policy::parse_manifests(&gateway.to_string(), "<placeholder>")
        .map_err(|e| anyhow::anyhow!("placeholder configuration: {}", format_errors(&e)))?;
    policy::compile(&loaded, &config.compile_options())
        .map_err(|e| anyhow::anyhow!("placeholder configuration: {}", format_errors(&e)))
}

/// For `waypoint check`: every problem of every document. What loaded is compiled even when
/// other documents failed to load, so a type error in one Service does not hide a bad regex in
/// an HTTPRoute further down (references to the resources that failed may then be reported
/// too). Also returns the loader's warnings (unknown fields, skipped kinds).
pub fn check_config(config: &Config) -> (Result<Snapshot, ()>, Vec<ConfigError>, Vec<String>) {
    let (loaded, mut errors) = policy::load_paths_partial(&config.config_paths);
    let warnings = loaded.warnings.clone();
    match policy::compile(&loaded, &config.compile_options()) {
        Ok(snapshot) if errors.is_empty() => (Ok(snapshot), errors, warnings),
        Ok(_) => (Err(()), errors, warnings),
        Err(e) => {
            errors.extend(e);
            (Err(()), errors, warnings)
        }
    }
}

/// Format config errors, one per line.
pub fn format_errors(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Optional inputs that tests and the demo supply directly.
#[derive(Default)]
pub struct Inputs {
    /// Certificates (else loaded from `certs_dir`).
    pub certs: Option<CertBundle>,
    /// A compiled snapshot (else loaded from `config_paths`).
    pub snapshot: Option<Snapshot>,
    /// Where access-log lines go (else stdout).
    pub access_log: Option<AccessLogger>,
}

/// A running waypoint.
pub struct Running {
    pub hbone_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub envoy_prom_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    config: Config,
    drain: DrainTrigger,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot bind the {what} listener on {addr} (is another process using the port?)")
    })
}

/// Start a waypoint: everything is bound and serving when this returns.
pub async fn start(mut config: Config, inputs: Inputs) -> anyhow::Result<Running> {
    config.load_mesh_config()?;
    seed_random();
    // Fingerprints first: a change made while we load is then seen as a change.
    let config_fp = crate::config::watch::fingerprint(&config.config_paths);
    let cert_fp =
        crate::config::watch::fingerprint(&crate::config::watch::cert_files(&config.certs_dir));
    let certs_from_dir = inputs.certs.is_none() && config.ca.is_none();
    let certs = initial_certs(&config, inputs.certs).await?;
    let snapshot_from_files = inputs.snapshot.is_none() && config.kube.is_none();
    let kube_source = match &config.kube {
        // The watches run on the control thread (crate::control), off the workers.
        Some(_) => Some({
            let config = config.clone();
            crate::control::spawn(async move { crate::config::kube::connect(&config).await })
                .await
                .map_err(|e| anyhow::anyhow!("control thread: {e}"))??
        }),
        None => None,
    };
    let snapshot = match inputs.snapshot {
        Some(s) => s,
        // Until the first complete list compiles: nothing bound, not ready.
        None if kube_source.is_some() => placeholder_snapshot(&config)?,
        None => load_snapshot(&config).map_err(|errs| {
            anyhow::anyhow!(
                "the configuration is invalid ({} problems):\n{}",
                errs.len(),
                format_errors(&errs)
            )
        })?,
    };
    for w in &snapshot.warnings {
        warn!("config: {w}");
    }
    let server_tls = Arc::new(ArcSwap::from_pointee(ServerTls {
        config: hbone::tls::server_config(&certs, &config.trust_domain)?,
        identity: Some(certs.identity.clone()),
    }));
    let (trigger, watcher) = drain::channel();
    let hbone_stats = Arc::new(ServerStats::default());
    let shared = new_shared(
        &config,
        snapshot,
        &certs,
        inputs.access_log,
        hbone_stats.clone(),
        kube_source.clone(),
    )?;
    crate::state::install_tracing(&shared);
    shared.jwks.sync(shared.snapshot.load().remote_jwks());
    // DNS clusters (ServiceEntry `resolution: DNS`) warm before the listeners open, as
    // Envoy's STRICT_DNS clusters do before its listeners serve; bounded by the lookup
    // timeout, after which an unresolved name answers 503 UH until it resolves.
    shared.dns.sync(&shared.snapshot.load());
    shared.dynamic_hosts.sync(&shared.snapshot.load());
    let dns_task = tokio::spawn(shared.dns.clone().run());
    shared.dns.warm(config.dns.timeout).await;

    let Listeners {
        hbone: hbone_listener,
        ready: ready_listener,
        metrics: metrics_listener,
        envoy_prom: envoy_prom_listener,
        admin: admin_listener,
    } = Listeners::bind(&config).await?;
    let hbone_addr = hbone_listener.local_addr()?;
    let ready_addr = ready_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let envoy_prom_addr = match &envoy_prom_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let admin_addr = admin_listener.local_addr()?;

    let mut tasks = Vec::new();
    let handler_shared = shared.clone();
    let tls_for_listener = server_tls.clone();
    let tls_source: hbone::server::TlsSource =
        Arc::new(move || (**tls_for_listener.load()).clone());
    tasks.push(tokio::spawn(hbone::server::serve(
        hbone_listener,
        tls_source,
        Arc::new(config.server.clone()),
        hbone_stats,
        move |req| crate::listener::handle_tunnel(handler_shared.clone(), req),
        watcher,
    )));
    tasks.push(dns_task);
    tasks.push(tokio::spawn(crate::memory::run(shared.reclaim.clone())));
    tasks.push(tokio::spawn(sweep_upstreams(shared.clone())));
    // Readiness, metrics (and Envoy's metrics port), admin.
    let http_listeners = [
        Some((ready_listener, admin::Role::Ready)),
        Some((metrics_listener, admin::Role::Metrics)),
        envoy_prom_listener.map(|l| (l, admin::Role::Metrics)),
        Some((admin_listener, admin::Role::Admin)),
    ];
    for (listener, role) in http_listeners.into_iter().flatten() {
        tasks.push(tokio::spawn(admin::serve(listener, shared.clone(), role)));
    }
    if let Some(source) = kube_source {
        tasks.push(crate::control::spawn(crate::config::kube::follow(
            shared.clone(),
            config.clone(),
            source,
        )));
    }
    if let Some(ca) = &config.ca {
        let client = identity::CaClient::new(ca.clone());
        let (shared, config, tls) = (shared.clone(), config.clone(), server_tls.clone());
        let not_after = shared.cert_not_after.load(Ordering::Relaxed);
        tasks.push(tokio::spawn(async move {
            identity::rotate(client, not_after, |bundle| {
                install_certs(&shared, &config, &tls, bundle)
            })
            .await
        }));
    }
    if let Some(interval) = config.watch_interval {
        tasks.push(tokio::spawn(watch_files(
            shared.clone(),
            config.clone(),
            server_tls,
            interval,
            snapshot_from_files.then_some(config_fp),
            certs_from_dir.then_some(cert_fp),
        )));
    }
    let envoy_prom = envoy_prom_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    info!(%hbone_addr, %ready_addr, %metrics_addr, %envoy_prom, %admin_addr, identity = %certs.identity, "waypoint serving");
    Ok(Running {
        hbone_addr,
        ready_addr,
        metrics_addr,
        envoy_prom_addr,
        admin_addr,
        shared,
        config,
        drain: trigger,
        tasks,
    })
}

/// The first certificate: given (tests, the demo), from istiod's CA (`--ca-addr`), else from
/// the certificate directory. A trust domain other than `--trust-domain` is warned about.
async fn initial_certs(config: &Config, given: Option<CertBundle>) -> anyhow::Result<CertBundle> {
    let certs = match (given, &config.ca) {
        (Some(c), _) => c,
        (None, Some(ca)) => first_certificate(ca).await,
        (None, None) => {
            CertBundle::load_dir(&config.certs_dir).context("loading the workload certificate")?
        }
    };
    if *certs.identity.trust_domain != *config.trust_domain {
        warn!(
            identity = %certs.identity,
            trust_domain = %config.trust_domain,
            "our certificate's trust domain differs from --trust-domain; clients will be checked against --trust-domain"
        );
    }
    Ok(certs)
}

/// The sockets of the template's ports, bound before anything is served.
struct Listeners {
    hbone: TcpListener,
    ready: TcpListener,
    metrics: TcpListener,
    envoy_prom: Option<TcpListener>,
    admin: TcpListener,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            hbone: bind(config.hbone_addr, "HBONE").await?,
            ready: bind(config.ready_addr, "readiness").await?,
            metrics: bind(config.metrics_addr, "metrics").await?,
            envoy_prom: match config.envoy_prom_addr {
                Some(addr) => Some(bind(addr, "Envoy-compatible metrics (15090)").await?),
                None => None,
            },
            admin: bind(config.admin_addr, "admin").await?,
        })
    }
}

/// The state every task shares, at start: the first snapshot, the upstream pools (HBONE with
/// our certificate), the access logger, counters, caches.
fn new_shared(
    config: &Config,
    snapshot: Snapshot,
    certs: &CertBundle,
    access_log: Option<AccessLogger>,
    hbone_stats: Arc<ServerStats>,
    kube_source: Option<discovery::Source>,
) -> anyhow::Result<Arc<Shared>> {
    let dns = crate::upstream::dns::DnsEndpoints::new(config.dns.clone());
    Ok(Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        upstreams: {
            let mut u = Upstreams::new(config.upstream.clone());
            u.hbone = Some(crate::upstream::HboneUpstream {
                pool: hbone::pool::Pool::new(hbone::pool::PoolSettings::default()),
                tls: ArcSwap::new(upstream_tls(certs, config)?),
            });
            u
        },
        // The mesh config's accessLogFile / accessLogEncoding / accessLogFormat; an injected
        // logger (tests, the demo) keeps its sink and takes the format.
        access_log: Some(match access_log {
            Some(l) => {
                l.set_format(config.mesh.access_log.format.clone());
                l
            }
            None => AccessLogger::spawn_with(accesslog::Output::new(
                config.mesh.access_log.format.clone(),
                config.mesh.access_log.output()?,
            )),
        }),
        log_providers: arc_swap::ArcSwap::from_pointee(crate::state::log_providers(
            &config.mesh,
            &[],
        )),
        metrics: Metrics::default(),
        limits: config.limits.clone(),
        draining: AtomicBool::new(false),
        hbone_stats,
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        last_reload_error: Mutex::new(None),
        cert_not_after: AtomicI64::new(certs.leaf_not_after().unwrap_or(i64::MAX)),
        cert_reloads: AtomicU64::new(0),
        jwks: JwksCache::new(config.jwks.clone(), &certs.roots),
        mesh: ArcSwap::from_pointee(config.mesh.clone()),
        config_installed: AtomicBool::new(kube_source.is_none()),
        discovery: kube_source,
        endpoint_refreshes: AtomicU64::new(0),
        cluster_id: config.cluster_id.as_str().into(),
        ext_authz: Default::default(),
        ext_authz_grpc: Default::default(),
        ext_authz_stats: Default::default(),
        config_version: AtomicU64::new(1),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        memory_pressure: AtomicBool::new(false),
        shed: AtomicU64::new(0),
        reclaim: Default::default(),
        mirrors_in_flight: Default::default(),
        mirrors_skipped: AtomicU64::new(0),
        dynamic_hosts: crate::upstream::dynamic_dns::DynamicHosts::new(dns.clone()),
        dns,
        tracing: Default::default(),
    }))
}

impl Running {
    /// Re-read every config path and swap in the new snapshot; on any error keep the current
    /// one, count the failure and remember the error for `/config_dump`.
    pub fn reload(&self) -> Result<(), Vec<ConfigError>> {
        reload_config(&self.shared, &self.config)
    }

    /// Drain: stop accepting, GOAWAY every HBONE connection, let requests in flight finish
    /// within the drain deadline, then stop everything. Returns whether everything finished
    /// in time.
    pub async fn shutdown(self) -> bool {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.drain.start();
        let finished = tokio::time::timeout(self.config.drain_timeout, self.drain.closed())
            .await
            .is_ok();
        if !finished {
            warn!(
                deadline = ?self.config.drain_timeout,
                "drain deadline reached with tunnels still open; closing them"
            );
        }
        for t in self.tasks {
            t.abort();
        }
        if let Some(d) = &self.shared.discovery {
            d.stop();
        }
        finished
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// Load, compile and swap the configuration, or keep the last good one.
pub fn reload_config(shared: &Shared, config: &Config) -> Result<(), Vec<ConfigError>> {
    match load_snapshot(config) {
        Ok(s) => {
            for w in &s.warnings {
                warn!("config: {w}");
            }
            shared.jwks.sync(s.remote_jwks());
            shared.dns.sync(&s);
            shared.dynamic_hosts.sync(&s);
            shared.snapshot.store(Arc::new(s));
            shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
            shared.config_version.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut e) = shared.last_reload_error.lock() {
                *e = None;
            }
            info!("configuration reloaded");
            Ok(())
        }
        Err(errs) => {
            shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
            let text = format_errors(&errs);
            warn!("configuration reload failed; keeping the last good configuration:\n{text}");
            if let Ok(mut e) = shared.last_reload_error.lock() {
                *e = Some(text);
            }
            Err(errs)
        }
    }
}

/// Reload certificates from `certs_dir`; new connections use them, established ones keep
/// theirs. On failure the current certificate stays.
fn reload_certs(shared: &Shared, config: &Config, tls: &ArcSwap<ServerTls>) {
    match CertBundle::load_dir(&config.certs_dir) {
        Ok(certs) => install_certs(shared, config, tls, certs),
        Err(e) => warn!("certificate reload failed; keeping the current certificate: {e:#}"),
    }
}

/// Swap in new certificates (from files or the CA): new connections use them at once,
/// established ones keep theirs. An unusable bundle leaves the current one in place.
fn install_certs(shared: &Shared, config: &Config, tls: &ArcSwap<ServerTls>, certs: CertBundle) {
    let loaded = hbone::tls::server_config(&certs, &config.trust_domain).map(|c| (c, certs));
    match loaded {
        Ok((server_config, certs)) => {
            if let Some(h) = &shared.upstreams.hbone {
                match upstream_tls(&certs, config) {
                    Ok(c) => h.tls.store(c),
                    Err(e) => warn!("rotated certificate unusable for HBONE origination: {e:#}"),
                }
            }
            tls.store(Arc::new(ServerTls {
                config: server_config,
                identity: Some(certs.identity.clone()),
            }));
            shared.cert_not_after.store(
                certs.leaf_not_after().unwrap_or(i64::MAX),
                Ordering::Relaxed,
            );
            shared.cert_reloads.fetch_add(1, Ordering::Relaxed);
            info!(identity = %certs.identity, "certificates reloaded");
        }
        Err(e) => warn!("new certificate unusable; keeping the current certificate: {e:#}"),
    }
}

/// The first certificate from the CA: retried with capped, jittered back-off until it comes
/// (the listeners are not bound before, so the readiness probe fails meanwhile).
async fn first_certificate(ca: &identity::CaSettings) -> CertBundle {
    let client = identity::CaClient::new(ca.clone());
    let mut backoff = Duration::from_millis(500);
    loop {
        match client.fetch().await {
            Ok(bundle) => {
                info!(identity = %bundle.identity, ca = %ca.addr, "certificate issued by the CA");
                return bundle;
            }
            Err(e) => {
                warn!(retry_in = ?backoff, "cannot get a certificate from the CA: {e}");
                let jitter: f64 = rand::random_range(0.8..=1.2);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Client TLS for HBONE to ambient pods: our certificate; the destination must chain to our
/// roots with an identity in our trust domain (Envoy's connect_originate, protocol.md 2.4).
/// aws-lc seeds its random generator on first use, from CPU jitter entropy: about 0.4 billion
/// instructions, once per process (callgrind, docs/bench/2026-12-06-profile.md). Without this
/// the first TLS handshake (the first client after every start) waits for it; here it is paid
/// before the listeners open and readiness turns green.
fn seed_random() {
    let started = std::time::Instant::now();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    if provider.secure_random.fill(&mut [0u8; 16]).is_err() {
        warn!("the TLS random source failed to produce bytes; handshakes will fail");
    }
    tracing::debug!(elapsed = ?started.elapsed(), "TLS random source seeded");
}

fn upstream_tls(certs: &CertBundle, config: &Config) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(hbone::tls::client_config(
        certs,
        hbone::tls::ExpectedServer::TrustDomain(config.trust_domain.clone()),
    )?)
}

/// Poll config and certificate files; reload whatever changed. Warns once a day-ish ahead of
/// certificate expiry (at less than 24 h left).
async fn watch_files(
    shared: Arc<Shared>,
    config: Config,
    tls: Arc<ArcSwap<ServerTls>>,
    interval: Duration,
    config_fp: Option<u64>,
    cert_fp: Option<u64>,
) {
    let cert_paths = crate::config::watch::cert_files(&config.certs_dir);
    let (watch_config, mut config_fp) = (config_fp.is_some(), config_fp.unwrap_or(0));
    let (watch_certs, mut cert_fp) = (cert_fp.is_some(), cert_fp.unwrap_or(0));
    let mut warned_expiry = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if watch_config {
            let fp = crate::config::watch::fingerprint(&config.config_paths);
            if fp != config_fp {
                config_fp = fp;
                info!("configuration files changed; reloading");
                let _ = reload_config(&shared, &config);
            }
        }
        if watch_certs {
            let fp = crate::config::watch::fingerprint(&cert_paths);
            if fp != cert_fp {
                cert_fp = fp;
                reload_certs(&shared, &config, &tls);
                warned_expiry = false;
            }
        }
        if let Some(ceiling) = shared.limits.max_memory {
            let rss = resident_bytes().unwrap_or(0);
            let over = rss > ceiling;
            if over != shared.memory_pressure.swap(over, Ordering::Relaxed) {
                warn!(
                    rss,
                    ceiling, over, "memory ceiling crossed; shedding new work while over it"
                );
            }
        }
        let left = crate::state::cert_seconds_left(&shared);
        if left < 24 * 3600 && !warned_expiry {
            warned_expiry = true;
            warn!(
                seconds_left = left,
                "the workload certificate expires soon (or has expired); rotate cert-chain.pem/key.pem"
            );
        }
    }
}

/// Resident set size of this process (Linux `/proc/self/statm`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// How often upstream pools are swept (idle connections, endpoints that left).
const UPSTREAM_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Keep the upstream pools in step with the configuration: every [`UPSTREAM_SWEEP_EVERY`],
/// pools of endpoints no longer in the snapshot are dropped and idle connections past their
/// timeout closed ([`crate::upstream::Upstreams::sweep`]).
async fn sweep_upstreams(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(UPSTREAM_SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep_upstreams_now(&shared);
    }
}

/// One sweep against the current snapshot: endpoints of every cluster and the pods served
/// for workload-addressed traffic are live.
pub fn sweep_upstreams_now(shared: &Shared) {
    let snapshot = shared.snapshot.load_full();
    let mut live = std::collections::HashSet::new();
    for c in snapshot.clusters() {
        live.extend(c.endpoints().iter().map(|e| e.addr));
    }
    // ServiceEntry `resolution: DYNAMIC_DNS`: the addresses names resolved to.
    live.extend(shared.dynamic_hosts.live_addrs());
    // ServiceEntry `resolution: NONE`: the endpoint is the bound address itself.
    for sp in snapshot.bound_services() {
        if sp.cluster.passthrough {
            live.insert(sp.vip);
        }
    }
    let pods: std::collections::HashSet<std::net::IpAddr> =
        snapshot.workloads().into_iter().map(|(ip, _)| ip).collect();
    shared
        .upstreams
        .sweep(|a| live.contains(a) || pods.contains(&a.ip()));
}
