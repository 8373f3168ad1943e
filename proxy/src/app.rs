//! Building and running a waypoint: load config and certificates, bind the HBONE, readiness,
//! metrics and admin listeners, reload on demand, drain on shutdown. Tests start the same
//! [`start`] in-process; the binary wraps it with flags and signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

use crate::admin;
use crate::metrics::Metrics;
use crate::state::{Limits, Shared};
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
    pub admin_addr: SocketAddr,
    /// How long requests in flight may take to finish after SIGTERM (Istio's
    /// terminationDrainDuration default: 5 s).
    pub drain_timeout: Duration,
    pub server: ServerSettings,
    pub limits: Limits,
    pub upstream: UpstreamSettings,
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
            admin_addr: ([127, 0, 0, 1], 15000).into(),
            drain_timeout: Duration::from_secs(5),
            server: ServerSettings::default(),
            limits: Limits::default(),
            upstream: UpstreamSettings::default(),
        }
    }
}

impl Config {
    pub fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            gateway_namespace: self.gateway_namespace.clone(),
            gateway_name: self.gateway_name.clone(),
            trust_domain: self.trust_domain.clone(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// Load and compile the configuration; every problem is returned.
pub fn load_snapshot(config: &Config) -> Result<Snapshot, Vec<ConfigError>> {
    let loaded = policy::load_paths(&config.config_paths)?;
    policy::compile(&loaded, &config.compile_options())
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
pub async fn start(config: Config, inputs: Inputs) -> anyhow::Result<Running> {
    let certs = match inputs.certs {
        Some(c) => c,
        None => {
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
    let snapshot = match inputs.snapshot {
        Some(s) => s,
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
    let server_tls = ServerTls {
        config: hbone::tls::server_config(&certs, &config.trust_domain)?,
        identity: Some(certs.identity.clone()),
    };
    let (trigger, watcher) = drain::channel();
    let hbone_stats = Arc::new(ServerStats::default());
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        upstreams: Upstreams::new(config.upstream.clone()),
        access_log: Some(inputs.access_log.unwrap_or_else(AccessLogger::stdout)),
        metrics: Metrics::default(),
        limits: config.limits.clone(),
        draining: AtomicBool::new(false),
        hbone_stats: hbone_stats.clone(),
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        last_reload_error: Mutex::new(None),
    });

    let hbone_listener = bind(config.hbone_addr, "HBONE").await?;
    let ready_listener = bind(config.ready_addr, "readiness").await?;
    let metrics_listener = bind(config.metrics_addr, "metrics").await?;
    let admin_listener = bind(config.admin_addr, "admin").await?;
    let hbone_addr = hbone_listener.local_addr()?;
    let ready_addr = ready_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let mut tasks = Vec::new();
    let handler_shared = shared.clone();
    let tls_source: hbone::server::TlsSource = Arc::new(move || server_tls.clone());
    tasks.push(tokio::spawn(hbone::server::serve(
        hbone_listener,
        tls_source,
        Arc::new(config.server.clone()),
        hbone_stats,
        move |req| crate::tunnel::handle_tunnel(handler_shared.clone(), req),
        watcher,
    )));
    tasks.push(tokio::spawn(admin::serve(
        ready_listener,
        shared.clone(),
        admin::Role::Ready,
    )));
    tasks.push(tokio::spawn(admin::serve(
        metrics_listener,
        shared.clone(),
        admin::Role::Metrics,
    )));
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        shared.clone(),
        admin::Role::Admin,
    )));
    info!(%hbone_addr, %ready_addr, %metrics_addr, %admin_addr, identity = %certs.identity, "waypoint serving");
    Ok(Running {
        hbone_addr,
        ready_addr,
        metrics_addr,
        admin_addr,
        shared,
        config,
        drain: trigger,
        tasks,
    })
}

impl Running {
    /// Re-read every config path and swap in the new snapshot; on any error keep the current
    /// one, count the failure and remember the error for `/config_dump`.
    pub fn reload(&self) -> Result<(), Vec<ConfigError>> {
        match load_snapshot(&self.config) {
            Ok(s) => {
                for w in &s.warnings {
                    warn!("config: {w}");
                }
                self.shared.snapshot.store(Arc::new(s));
                self.shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = self.shared.last_reload_error.lock() {
                    *e = None;
                }
                info!("configuration reloaded");
                Ok(())
            }
            Err(errs) => {
                self.shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
                let text = format_errors(&errs);
                warn!("configuration reload failed; keeping the last good configuration:\n{text}");
                if let Ok(mut e) = self.shared.last_reload_error.lock() {
                    *e = Some(text);
                }
                Err(errs)
            }
        }
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
        finished
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}
