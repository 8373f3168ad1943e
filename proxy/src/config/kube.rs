//! `--kube`: the configuration from the Kubernetes API (the [`discovery`] crate's watches)
//! compiled into snapshots.
//!
//! - Endpoint churn is cheap: a change that touches only EndpointSlices and Pods swaps the
//!   endpoints of the affected Services' clusters in place ([`policy::Snapshot::refresh_endpoints`]);
//!   routes and policies are not recompiled (Pods of a waypoint serving workload traffic are
//!   bindings too: those recompile).
//! - Coalescing: a compile starts at once when the store changes after a quiet period, and at
//!   most once per [`COALESCE`] under a burst, so a storm of events costs a few compiles, not
//!   one per event (istio/istio#49918: Istio's waypoint took a full push per pod change).
//! - Readiness: not ready until every kind has been listed and the result compiled. Afterwards
//!   an unreachable API server keeps the last good snapshot serving; a policy kind that
//!   becomes forbidden makes the waypoint not ready again (it can no longer see its policies).
//! - Bad objects: a non-policy object that fails to compile is dropped with a warning naming
//!   it and the rest applies. A policy object (AuthorizationPolicy, RequestAuthentication)
//!   that fails keeps the last good configuration: dropping a DENY policy would open access.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use policy::{ConfigError, Snapshot};
use tracing::{info, warn};

use crate::app::Config;
use crate::config::meshconfig::MeshConfig;
use crate::state::Shared;

/// The shortest time between two compiles (a burst of events inside it is one compile).
pub const COALESCE: Duration = Duration::from_millis(50);

/// Kinds whose objects are never dropped to make a compile pass.
const POLICY_KINDS: &[&str] = &["AuthorizationPolicy", "RequestAuthentication"];

/// Connect and start the watches.
pub async fn connect(config: &Config) -> anyhow::Result<discovery::Source> {
    let kube = config
        .kube
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("not in --kube mode"))?;
    let client = discovery::client(kube.kubeconfig.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(discovery::Source::start(client, &kube.discovery))
}

/// Compile what the store holds now: the snapshot and the mesh config it was compiled with,
/// plus warnings for what was dropped; or why nothing may be installed.
pub fn compile_input(
    config: &Config,
    input: discovery::Input,
) -> Result<(Snapshot, MeshConfig), String> {
    if !input.invalid_policies.is_empty() {
        return Err(format!(
            "invalid policy objects (keeping the last good configuration):\n  {}",
            input.invalid_policies.join("\n  ")
        ));
    }
    let mesh = match &input.mesh {
        Some(text) => MeshConfig::parse(text)
            .map_err(|e| format!("ConfigMap mesh config: data.mesh: {e:#}"))?,
        None => MeshConfig::default(),
    };
    let mut with_mesh = config.clone();
    with_mesh.mesh = mesh.clone();
    let options = with_mesh.compile_options();
    let mut loaded = input.loaded;
    let mut dropped: Vec<String> = Vec::new();
    // Each round drops the objects named in errors; a handful of rounds covers errors that
    // only show once another object is gone (references to it).
    for _ in 0..4 {
        match policy::compile(&loaded, &options) {
            Ok(mut snapshot) => {
                snapshot.warnings.extend(loaded.warnings.iter().cloned());
                snapshot.warnings.extend(dropped);
                return Ok((snapshot, mesh));
            }
            Err(errors) => {
                if let Some(e) = errors
                    .iter()
                    .find(|e| POLICY_KINDS.contains(&e.kind.as_str()))
                {
                    return Err(format!(
                        "{e} (a policy that does not compile keeps the last good configuration)"
                    ));
                }
                let before = loaded.resources.len();
                drop_named(&mut loaded, &errors);
                dropped.extend(errors.iter().map(|e| format!("skipped: {e}")));
                if loaded.resources.len() == before {
                    return Err(crate::app::format_errors(&errors));
                }
            }
        }
    }
    Err("configuration still invalid after dropping the objects in error".into())
}

/// Remove the resources an error names (kind, namespace, name).
fn drop_named(loaded: &mut policy::LoadedResources, errors: &[ConfigError]) {
    let named = |r: &policy::resources::Resource| {
        let Some(m) = r.metadata() else { return false };
        errors
            .iter()
            .any(|e| e.kind == r.kind() && e.name == m.name && e.namespace == m.namespace)
    };
    let mut keep = Vec::with_capacity(loaded.resources.len());
    let mut sources = Vec::with_capacity(loaded.sources.len());
    for (r, s) in loaded.resources.drain(..).zip(loaded.sources.drain(..)) {
        if !named(&r) {
            keep.push(r);
            sources.push(s);
        }
    }
    loaded.resources = keep;
    loaded.sources = sources;
}

/// Install a compiled snapshot as [`crate::app::reload_config`] does.
fn install(shared: &Arc<Shared>, snapshot: Snapshot, mesh: MeshConfig) {
    apply_access_log(shared, &mesh);
    for w in &snapshot.warnings {
        warn!("config: {w}");
    }
    shared.jwks.sync(snapshot.remote_jwks());
    shared.dns.sync(&snapshot);
    shared.dynamic_hosts.sync(&snapshot);
    shared.mesh.store(Arc::new(mesh));
    shared.snapshot.store(Arc::new(snapshot));
    crate::state::install_tracing(shared);
    shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
    shared.config_version.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut e) = shared.last_reload_error.lock() {
        *e = None;
    }
}

/// Follow the store: compile on change (coalesced), install, until the task is aborted.
pub async fn follow(shared: Arc<Shared>, config: Config, source: discovery::Source) {
    let mut changes = source.changes();
    let mut last_compile: Option<Instant> = None;
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        if let Some(at) = last_compile {
            let since = at.elapsed();
            if since < COALESCE {
                tokio::time::sleep(COALESCE - since).await;
            }
        }
        changes.borrow_and_update();
        if let Err(why) = source.readiness() {
            if !shared.config_installed.load(Ordering::Relaxed) {
                info!("waiting for the Kubernetes API: {why}");
            }
            continue;
        }
        let delta = source.take_delta();
        let installed = shared.config_installed.load(Ordering::Relaxed);
        // Pods decide bindings (workload mode) or ServiceEntry endpoints (workloadSelector):
        // then a Pod change is a compile.
        let pods_compile =
            delta.pods_changed && (workload_mode(&shared) || shared.snapshot.load().selects_pods());
        if installed && !delta.full && !pods_compile {
            // Endpoint churn: the clusters of the Services concerned get their endpoints
            // swapped in place; no compile, nothing else touched.
            if !delta.services.is_empty() {
                let started = Instant::now();
                let partial = source.endpoint_input(Some(&delta));
                let changed = shared
                    .snapshot
                    .load()
                    .refresh_endpoints(&partial, &config.compile_options());
                shared.endpoint_refreshes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(services = delta.services.len(), clusters = changed, took = ?started.elapsed(), "endpoints updated");
            }
            continue;
        }
        let input = source.full_input();
        let generation = input.generation;
        last_compile = Some(Instant::now());
        let started = Instant::now();
        let compiled = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || compile_input(&config, input)).await
        };
        match compiled {
            Ok(Ok((snapshot, mesh))) => {
                let first = !shared.config_installed.swap(true, Ordering::Relaxed);
                let services = snapshot.bound_services().len();
                install(&shared, snapshot, mesh);
                // A compile's transient copies (every object cloned, indexes) are garbage
                // now, and so is the old snapshot: give the pages back rather than sit at the
                // compile's peak until the next burst of traffic triggers a trim.
                let _ = tokio::task::spawn_blocking(crate::memory::trim).await;
                if first {
                    info!(generation, services, took = ?started.elapsed(), "configuration from the Kubernetes API installed; ready");
                } else {
                    tracing::debug!(generation, services, took = ?started.elapsed(), "configuration updated");
                }
            }
            Ok(Err(text)) => {
                shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
                warn!("configuration from the Kubernetes API not applied:\n{text}");
                if let Ok(mut e) = shared.last_reload_error.lock() {
                    *e = Some(text);
                }
                // The endpoint changes this delta carried still apply to the configuration
                // that stays.
                if installed {
                    let partial = source.endpoint_input(None);
                    shared
                        .snapshot
                        .load()
                        .refresh_endpoints(&partial, &config.compile_options());
                }
            }
            Err(e) => warn!("compile task failed: {e}"),
        }
    }
}

/// Whether the Gateway serves workload-addressed traffic (its Pods are bound, so a Pod
/// change can change bindings, which only a compile decides).
fn workload_mode(shared: &Shared) -> bool {
    matches!(
        shared.snapshot.load().gateway.waypoint_for,
        policy::WaypointFor::Workload | policy::WaypointFor::All
    )
}

/// For `services --kube` and `explain --kube`: list everything once (bounded by `timeout`)
/// and compile it.
pub async fn snapshot_once(
    config: &Config,
    timeout: Duration,
) -> anyhow::Result<(Snapshot, MeshConfig)> {
    let source = connect(config).await?;
    let mut changes = source.changes();
    let deadline = tokio::time::Instant::now() + timeout;
    let ready = loop {
        match source.readiness() {
            Ok(()) => break Ok(()),
            Err(why) => {
                if tokio::time::timeout_at(deadline, changes.changed())
                    .await
                    .is_err()
                {
                    break Err(why);
                }
            }
        }
    };
    let result = match ready {
        Ok(()) => compile_input(config, source.full_input()).map_err(|e| anyhow::anyhow!(e)),
        Err(why) => Err(anyhow::anyhow!(
            "the Kubernetes API did not answer everything within {timeout:?}: {why}"
        )),
    };
    source.stop();
    result
}

/// The mesh config's access-log settings changed (the `istio` ConfigMap): write with them
/// from the next batch on. A file that cannot be opened keeps the current output.
fn apply_access_log(shared: &Shared, mesh: &MeshConfig) {
    // The `envoyFileAccessLog` providers: loggers kept for those that did not change.
    if mesh.file_log_providers() != shared.mesh.load().file_log_providers() {
        let current = shared.log_providers.load();
        shared
            .log_providers
            .store(Arc::new(crate::state::log_providers(mesh, &current)));
    }
    let (Some(logger), current) = (&shared.access_log, shared.mesh.load()) else {
        return;
    };
    if current.access_log == mesh.access_log {
        return;
    }
    match mesh.access_log.output() {
        Ok(sink) => {
            logger.set_output(accesslog::Output::new(mesh.access_log.format.clone(), sink));
            tracing::info!(file = %mesh.access_log.file, "access log: mesh config settings applied");
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "access log: kept the current output"),
    }
}
