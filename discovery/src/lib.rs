//! # discovery: the waypoint's configuration from the Kubernetes API
//!
//! Contract:
//! - Lists and watches every kind the waypoint understands ([`KINDS`]) plus the mesh config
//!   (the `istio` ConfigMap in the Istio namespace) with kube-rs's watcher: paginated list,
//!   watch from the list's `resourceVersion` with bookmarks, a re-list after `410 Gone`, a
//!   resumed watch after a cut connection, and capped, jittered back-off ([`MIN_BACKOFF`]
//!   doubling to [`MAX_BACKOFF`], ±25%) while the API server cannot be reached. Nothing here
//!   is hand-made HTTP.
//! - Keeps compact projections, not objects: each object is decoded once into the policy
//!   crate's typed resources (a Pod keeps its name, namespace, labels, service account and
//!   IPs; managed fields, specs and statuses the waypoint never reads are dropped on decode).
//! - Says when it can be trusted ([`Source::readiness`]): only after every kind has been
//!   listed once. A kind that carries security policy (AuthorizationPolicy,
//!   RequestAuthentication, the mesh config) that cannot be listed keeps the waypoint not ready
//!   and names the missing permission or CRD; an optional kind whose CRD is absent (TLSRoute,
//!   say) is a warning. A waypoint never serves traffic without its policies.
//! - An invalid object is skipped with a warning naming kind, namespace/name and field; the
//!   rest applies. An invalid *policy* object is remembered as such ([`Input::invalid_policies`])
//!   so the caller can refuse to drop a policy silently (dropping a DENY opens access).
//! - Never blocks the data path: the store is touched by the watch tasks and whoever compiles
//!   a snapshot, and every change bumps a generation the compiler waits on ([`Source::changes`]),
//!   so a burst of events costs one compile.

mod pods;
#[cfg(feature = "testing")]
pub mod testing;

use pods::{PodRecord, Shapes};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};

use policy::load::{LoadedResources, ResourceSource};
use policy::resources::Resource;
use serde_json::Value;
use tracing::{info, warn};

/// How much a kind matters for readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Must be listed before the waypoint is ready (Services, endpoints, Gateway API core).
    Required,
    /// Carries security policy: must be listed; a forbidden list or a missing CRD is named in
    /// the readiness answer and the waypoint stays not ready.
    Policy,
    /// May be absent (CRD not installed): a warning, and the kind counts as empty.
    Optional,
}

/// One watched kind.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub need: Need,
}

impl KindSpec {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Watched in the waypoint's namespace only, by a Role a cluster may withhold: Secrets
    /// (DestinationRule `credentialName`). Forbidden is then a warning, never unreadiness:
    /// without it no credential is found and those connections fail closed.
    pub fn waypoint_namespace_only(&self) -> bool {
        self.group.is_empty() && self.kind == "Secret"
    }

    /// `authorizationpolicies.security.istio.io`, as RBAC rules and CRDs name it.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const GW: &str = "gateway.networking.k8s.io";

/// Every kind the waypoint understands, at the API versions Istio 1.31 and Gateway API 1.3
/// serve (`policy::resources::Resource::from_value` accepts these and older ones).
#[rustfmt::skip]
pub const KINDS: &[KindSpec] = &[
    KindSpec { group: "", version: "v1", kind: "Namespace", plural: "namespaces", need: Need::Required },
    KindSpec { group: "", version: "v1", kind: "Service", plural: "services", need: Need::Required },
    KindSpec { group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices", need: Need::Required },
    KindSpec { group: "", version: "v1", kind: "Pod", plural: "pods", need: Need::Required },
    KindSpec { group: GW, version: "v1", kind: "Gateway", plural: "gateways", need: Need::Required },
    KindSpec { group: GW, version: "v1", kind: "GatewayClass", plural: "gatewayclasses", need: Need::Required },
    KindSpec { group: GW, version: "v1", kind: "HTTPRoute", plural: "httproutes", need: Need::Required },
    KindSpec { group: GW, version: "v1", kind: "GRPCRoute", plural: "grpcroutes", need: Need::Optional },
    KindSpec { group: GW, version: "v1alpha2", kind: "TCPRoute", plural: "tcproutes", need: Need::Optional },
    KindSpec { group: GW, version: "v1alpha2", kind: "TLSRoute", plural: "tlsroutes", need: Need::Optional },
    KindSpec { group: GW, version: "v1beta1", kind: "ReferenceGrant", plural: "referencegrants", need: Need::Optional },
    KindSpec { group: "security.istio.io", version: "v1", kind: "AuthorizationPolicy", plural: "authorizationpolicies", need: Need::Policy },
    KindSpec { group: "security.istio.io", version: "v1", kind: "RequestAuthentication", plural: "requestauthentications", need: Need::Policy },
    KindSpec { group: "telemetry.istio.io", version: "v1", kind: "Telemetry", plural: "telemetries", need: Need::Optional },
    KindSpec { group: "networking.istio.io", version: "v1", kind: "DestinationRule", plural: "destinationrules", need: Need::Optional },
    KindSpec { group: "networking.istio.io", version: "v1", kind: "ServiceEntry", plural: "serviceentries", need: Need::Optional },
    KindSpec { group: "networking.istio.io", version: "v1", kind: "WorkloadEntry", plural: "workloadentries", need: Need::Optional },
    // DestinationRule `credentialName`: watched in the waypoint's namespace only
    // (`Settings::secret_namespace`), by a Role; without access, none is found.
    KindSpec { group: "", version: "v1", kind: "Secret", plural: "secrets", need: Need::Optional },
];

/// Secrets are listed without the types that never hold a TLS credential (Helm releases,
/// service-account tokens, image pull secrets): they can be large and many.
const SECRET_FIELD_SELECTOR: &str = "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token,type!=kubernetes.io/dockerconfigjson,type!=kubernetes.io/dockercfg";

/// The mesh config: ConfigMap `istio` (key `mesh`) in the Istio namespace. It names the
/// CUSTOM authorization providers, so it is policy.
const MESH_CONFIGMAP: KindSpec = KindSpec {
    group: "",
    version: "v1",
    kind: "ConfigMap",
    plural: "configmaps",
    need: Need::Policy,
};

/// Where to find the mesh config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Istio's namespace (`istio-system`): the `istio` ConfigMap lives there.
    pub istio_namespace: String,
    /// Name of the mesh ConfigMap (`istio`; `istio-<rev>` for a revision).
    pub mesh_configmap: String,
    /// Pod labels kept beyond the ones the waypoint always reads (`--pod-label`): custom
    /// labels a DestinationRule's `failoverPriority` names.
    pub pod_labels: Vec<String>,
    /// The namespace whose Secrets are watched (the waypoint's: DestinationRule
    /// `credentialName` names a Secret there).
    pub secret_namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            istio_namespace: "istio-system".into(),
            mesh_configmap: "istio".into(),
            pod_labels: Vec::new(),
            secret_namespace: "default".into(),
        }
    }
}

/// A kube client from `--kubeconfig PATH`, else the usual inference: `KUBECONFIG` /
/// `~/.kube/config`, then the in-cluster service account (token, CA and
/// `KUBERNETES_SERVICE_HOST`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!(
                "no Kubernetes configuration found (in-cluster service account or KUBECONFIG): {e}"
            )
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Where a kind stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KindStatus {
    /// Not listed yet.
    Listing,
    /// Listed; the watch is running (or reconnecting: see `up`).
    Synced,
    /// The CRD is not installed (404); for an optional kind this counts as empty.
    Absent(String),
    /// The list is forbidden (403) or keeps failing: the message says what is missing.
    Failing(String),
}

/// One kind in `/config_dump` and metrics.
#[derive(Debug, Clone)]
pub struct KindReport {
    pub kind: &'static str,
    pub resource: String,
    pub status: KindStatus,
    /// The watch is connected (false between a failure and the next successful list/watch).
    pub up: bool,
    pub objects: usize,
    /// Unix seconds of the last change applied (list or event).
    pub last_update: Option<u64>,
}

#[derive(Debug, Clone)]
struct Stored {
    object: Object,
    resource_version: Option<String>,
}

/// What is kept of one object.
#[derive(Debug, Clone)]
enum Object {
    Resource(Arc<Resource>),
    /// Pods are many: kept compact, their shared parts interned ([`pods`]).
    Pod(Box<PodRecord>),
    /// The mesh ConfigMap's `data.mesh` text (parsed by the caller, which owns MeshConfig).
    Mesh(String),
}

/// An object that failed to decode: kept out of the store, reported.
impl Stored {
    /// The typed resource (a Pod made back from its record); `None` for the mesh config.
    fn resource(&self) -> Option<Arc<Resource>> {
        match &self.object {
            Object::Resource(r) => Some(r.clone()),
            Object::Pod(p) => Some(Arc::new(Resource::Pod(p.to_pod()))),
            Object::Mesh(_) => None,
        }
    }

    /// A decoded Pod becomes its compact record (other objects are kept as decoded).
    fn compact(self, shapes: &mut Shapes) -> Stored {
        let Stored {
            object,
            resource_version,
        } = self;
        let object = match object {
            Object::Resource(r) if matches!(*r, Resource::Pod(_)) => {
                match Arc::unwrap_or_clone(r) {
                    Resource::Pod(p) => Object::Pod(Box::new(PodRecord::new(p, shapes))),
                    other => Object::Resource(Arc::new(other)),
                }
            }
            other => other,
        };
        Stored {
            object,
            resource_version,
        }
    }
}

/// Give a dropped Pod record's shape back (see [`pods::Shapes::release`]).
fn release(shapes: &mut Shapes, stored: Option<Stored>) {
    if let Some(Stored {
        object: Object::Pod(p),
        ..
    }) = stored
    {
        shapes.release(*p);
    }
}

#[derive(Debug, Clone)]
struct Invalid {
    message: String,
}

type Objects = BTreeMap<(String, String), Stored>;
type Invalids = BTreeMap<(String, String), Invalid>;

#[derive(Default)]
struct KindState {
    status: Option<KindStatus>,
    /// When the watch last failed, and when it last delivered something.
    last_error: Option<Instant>,
    last_event: Option<Instant>,
    objects: BTreeMap<(String, String), Stored>,
    invalid: BTreeMap<(String, String), Invalid>,
    /// Objects of a list in progress (between `Init` and `InitDone`).
    listing: Option<(Objects, Invalids)>,
    last_update: Option<u64>,
}

impl KindState {
    /// Connected: nothing failed since the last event, or the last failure is older than the
    /// longest back-off (the retry that followed it succeeded, or it would have failed anew).
    fn up(&self) -> bool {
        match self.last_error {
            None => true,
            Some(e) => self.last_event.is_some_and(|v| v > e) || e.elapsed() > UP_AFTER_QUIET,
        }
    }
}

/// Watch retries: 250 ms doubling to [`MAX_BACKOFF`], ±25% jitter, reset by any success
/// (kube-runtime's `StreamBackoff` resets on every item that is not an error).
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
const UP_AFTER_QUIET: Duration =
    Duration::from_millis(MAX_BACKOFF.as_millis() as u64 * 5 / 4 + 1000);

struct WatchBackoff {
    next: Duration,
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let jitter: f64 = rand::random_range(0.75..=1.25);
        Some(base.mul_f64(jitter))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

struct State {
    kinds: Vec<KindState>,
    mesh: KindState,
    /// `data.mesh` of the mesh ConfigMap, when present.
    mesh_text: Option<String>,
    generation: u64,
    /// What changed since the caller last took the delta ([`Source::take_delta`]).
    delta: Delta,
    /// Pods by IP (`status.podIP(s)`), for the source workload of a connection.
    pods_by_ip: std::collections::HashMap<std::net::IpAddr, (String, String)>,
    /// What the stored Pods of one workload share, once.
    pod_shapes: Shapes,
    /// EndpointSlices by their Service (`kubernetes.io/service-name`): an endpoint update
    /// reads the slices of the Services it concerns, never all of them.
    slices_by_service:
        std::collections::HashMap<(String, String), std::collections::BTreeSet<(String, String)>>,
    /// [`Settings::pod_labels`].
    pod_labels: Arc<[String]>,
    /// The reverse of `slices_by_service`.
    service_of_slice: std::collections::HashMap<(String, String), (String, String)>,
}

impl State {
    fn new() -> State {
        State {
            kinds: KINDS.iter().map(|_| KindState::default()).collect(),
            mesh: KindState::default(),
            mesh_text: None,
            generation: 0,
            delta: Delta::default(),
            pods_by_ip: Default::default(),
            pod_shapes: Shapes::default(),
            slices_by_service: Default::default(),
            service_of_slice: Default::default(),
            pod_labels: Arc::new([]),
        }
    }
}

struct Inner {
    state: Mutex<State>,
    changes: tokio::sync::watch::Sender<u64>,
}

/// The live store fed by the watches. Cheap to clone.
#[derive(Clone)]
pub struct Source {
    inner: Arc<Inner>,
    tasks: Arc<Vec<tokio::task::AbortHandle>>,
}

/// What changed since the last [`Source::take_delta`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Something other than endpoints changed (or a kind was re-listed): compile everything.
    pub full: bool,
    /// Services whose endpoints may have changed (EndpointSlice events, and Pods those
    /// slices name), by (namespace, name).
    pub services: std::collections::BTreeSet<(String, String)>,
    /// A Pod's projection (labels, service account, IPs) changed: workload-addressed
    /// bindings may have too.
    pub pods_changed: bool,
}

/// A Pod's identity and workload labels (source labels of Istio's metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The workload: a ReplicaSet's Deployment, else the owner, else the Pod (Istio
    /// `GetDeployMetaFromPod`).
    pub workload: String,
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the workload.
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else
    /// `latest`.
    pub canonical_revision: String,
    pub app: Option<String>,
    pub version: Option<String>,
}

impl PodMeta {
    pub fn of(p: &policy::resources::Pod) -> PodMeta {
        let names = p.workload_names();
        PodMeta {
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone(),
            service_account: p.service_account().to_string(),
            workload: names.workload,
            canonical_service: names.canonical_service,
            canonical_revision: names.canonical_revision,
            app: names.app,
            version: names.version,
        }
    }
}

/// How one event changed the store.
enum Change {
    None,
    Endpoints {
        services: Vec<(String, String)>,
        pod: bool,
    },
    Full,
}

/// What a compile needs, taken from the store at one instant.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub loaded: LoadedResources,
    /// The mesh ConfigMap's `data.mesh`, when there is one.
    pub mesh: Option<String>,
    /// Policy objects that failed to decode (`AuthorizationPolicy ns/name: field: message`):
    /// the caller keeps the last good configuration while there are any.
    pub invalid_policies: Vec<String>,
    /// Generation of the store this was taken at.
    pub generation: u64,
}

impl Source {
    /// Start one watch per kind (and one for the mesh ConfigMap). Returns at once; see
    /// [`Source::readiness`] for when the store is complete.
    pub fn start(client: kube::Client, settings: &Settings) -> Source {
        let (tx, _) = tokio::sync::watch::channel(0);
        let mut state = State::new();
        state.pod_labels = settings.pod_labels.clone().into();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            changes: tx,
        });
        let mut tasks = Vec::new();
        for (i, spec) in KINDS.iter().enumerate() {
            let ar = api_resource(spec);
            let (api, cfg) = if spec.waypoint_namespace_only() {
                (
                    Api::namespaced_with(client.clone(), &settings.secret_namespace, &ar),
                    watcher::Config::default().fields(SECRET_FIELD_SELECTOR),
                )
            } else {
                (
                    Api::all_with(client.clone(), &ar),
                    watcher::Config::default(),
                )
            };
            let inner = inner.clone();
            let spec = *spec;
            tasks.push(tokio::spawn(watch(api, cfg, spec, Slot::Kind(i), inner)).abort_handle());
        }
        let ar = api_resource(&MESH_CONFIGMAP);
        let api: Api<DynamicObject> = Api::namespaced_with(client, &settings.istio_namespace, &ar);
        let cfg = watcher::Config::default()
            .fields(&format!("metadata.name={}", settings.mesh_configmap));
        tasks.push(
            tokio::spawn(watch(api, cfg, MESH_CONFIGMAP, Slot::Mesh, inner.clone())).abort_handle(),
        );
        Source {
            inner,
            tasks: Arc::new(tasks),
        }
    }

    /// Stop every watch.
    pub fn stop(&self) {
        for t in self.tasks.iter() {
            t.abort();
        }
    }

    /// A receiver whose value is the store's generation; it changes on every applied change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// `Ok` once every kind has been listed (optional kinds may be absent), else why not:
    /// each kind not yet listed, forbidden or missing, with the RBAC rule or CRD to add.
    pub fn readiness(&self) -> Result<(), String> {
        let state = self.lock();
        let mut missing = Vec::new();
        let all = KINDS
            .iter()
            .zip(&state.kinds)
            .chain([(&MESH_CONFIGMAP, &state.mesh)]);
        for (spec, k) in all {
            match &k.status {
                Some(KindStatus::Synced) => {}
                Some(KindStatus::Absent(_)) if spec.need == Need::Optional => {}
                Some(KindStatus::Absent(m) | KindStatus::Failing(m)) => {
                    missing.push(format!("{}: {m}", spec.kind))
                }
                Some(KindStatus::Listing) | None => {
                    missing.push(format!("{}: not listed yet", spec.kind))
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    /// Whether every watch is currently connected (`waypoint_config_source_up`).
    pub fn up(&self) -> bool {
        let state = self.lock();
        KINDS
            .iter()
            .zip(&state.kinds)
            .chain([(&MESH_CONFIGMAP, &state.mesh)])
            .all(|(spec, k)| {
                k.up() || matches!(&k.status, Some(KindStatus::Absent(_)) if spec.need == Need::Optional)
            })
    }

    /// Per kind: status, objects held, last update.
    pub fn report(&self) -> Vec<KindReport> {
        let state = self.lock();
        KINDS
            .iter()
            .zip(&state.kinds)
            .chain([(&MESH_CONFIGMAP, &state.mesh)])
            .map(|(spec, k)| KindReport {
                kind: spec.kind,
                resource: spec.resource_name(),
                status: k.status.clone().unwrap_or(KindStatus::Listing),
                up: k.up(),
                objects: k.objects.len(),
                last_update: k.last_update,
            })
            .collect()
    }

    /// Pod shapes held (what the replicas of a workload share, stored once): a gauge that
    /// follows the workloads, not the Pods.
    pub fn pod_shapes(&self) -> usize {
        self.lock().pod_shapes.len()
    }

    /// The Pod with this IP, as far as telemetry cares (Istio's waypoint looks the client up
    /// by address in its workload discovery, protocol.md 4.3).
    pub fn pod_at(&self, ip: std::net::IpAddr) -> Option<PodMeta> {
        let state = self.lock();
        let key = state.pods_by_ip.get(&ip)?;
        let pod_i = KINDS.iter().position(|k| k.kind == "Pod")?;
        let r = state.kinds[pod_i].objects.get(key)?.resource()?;
        let Resource::Pod(p) = &*r else { return None };
        Some(PodMeta::of(p))
    }

    /// What changed since the previous call (and forget it).
    pub fn take_delta(&self) -> Delta {
        std::mem::take(&mut self.lock().delta)
    }

    /// What [`Snapshot::refresh_endpoints`](policy::Snapshot::refresh_endpoints) needs for
    /// `services` (all Services when `None`): those Services, their EndpointSlices, the Pods
    /// the slices name (by `targetRef`, else by IP) and every Namespace.
    pub fn endpoint_input(&self, services: Option<&Delta>) -> LoadedResources {
        let state = self.lock();
        let idx = |kind: &str| KINDS.iter().position(|k| k.kind == kind);
        let (Some(ns_i), Some(svc_i), Some(eps_i), Some(pod_i)) = (
            idx("Namespace"),
            idx("Service"),
            idx("EndpointSlice"),
            idx("Pod"),
        ) else {
            return LoadedResources::default();
        };
        let resource = |s: Option<&Stored>| s.and_then(Stored::resource);
        let mut picked: Vec<Arc<Resource>> = Vec::new();
        picked.extend(
            state.kinds[ns_i]
                .objects
                .values()
                .filter_map(|s| resource(Some(s))),
        );
        // The Services and their slices: by index when a delta names them, else all.
        let mut slices: Vec<Arc<Resource>> = Vec::new();
        match services {
            Some(d) => {
                for key in &d.services {
                    picked.extend(resource(state.kinds[svc_i].objects.get(key)));
                    for slice_key in state.slices_by_service.get(key).into_iter().flatten() {
                        slices.extend(resource(state.kinds[eps_i].objects.get(slice_key)));
                    }
                }
            }
            None => {
                picked.extend(
                    state.kinds[svc_i]
                        .objects
                        .values()
                        .filter_map(|s| resource(Some(s))),
                );
                slices.extend(
                    state.kinds[eps_i]
                        .objects
                        .values()
                        .filter_map(|s| resource(Some(s))),
                );
            }
        }
        let pods = &state.kinds[pod_i].objects;
        let mut pod_keys = std::collections::BTreeSet::new();
        let mut ips = std::collections::BTreeSet::new();
        for r in &slices {
            let Resource::EndpointSlice(slice) = &**r else {
                continue;
            };
            for e in &slice.endpoints {
                match e.target_ref.as_ref().and_then(|t| t.name.clone()) {
                    Some(name) => {
                        let ns = e
                            .target_ref
                            .as_ref()
                            .and_then(|t| t.namespace.clone())
                            .unwrap_or_else(|| slice.metadata.namespace.clone());
                        pod_keys.insert((ns, name));
                    }
                    None => ips.extend(
                        e.addresses
                            .iter()
                            .filter_map(|a| a.parse::<std::net::IpAddr>().ok()),
                    ),
                }
            }
        }
        picked.extend(slices);
        for key in &pod_keys {
            picked.extend(resource(pods.get(key)));
        }
        // Address-only endpoints: the Pod with that IP (the index, not a scan).
        for ip in &ips {
            if let Some(key) = state.pods_by_ip.get(ip)
                && !pod_keys.contains(key)
            {
                picked.extend(resource(pods.get(key)));
            }
        }
        drop(state);
        LoadedResources {
            sources: vec![ResourceSource::default(); picked.len()],
            resources: picked.iter().map(|r| (**r).clone()).collect(),
            ..Default::default()
        }
    }

    /// Every object in the store now, in a stable order (kind, then namespace/name), with
    /// the mesh config and the generation it was taken at.
    pub fn full_input(&self) -> Input {
        let state = self.lock();
        let mut input = Input {
            mesh: state.mesh_text.clone(),
            generation: state.generation,
            ..Input::default()
        };
        for (spec, k) in KINDS.iter().zip(&state.kinds) {
            for ((ns, name), s) in &k.objects {
                let Some(r) = s.resource() else {
                    continue;
                };
                input.loaded.resources.push(Arc::unwrap_or_clone(r));
                input.loaded.sources.push(ResourceSource {
                    origin: format!("kube {} {}", spec.kind, qualified(ns, name)),
                    resource_version: s.resource_version.clone(),
                });
            }
            for ((ns, name), inv) in &k.invalid {
                let text = format!("{} {}: {}", spec.kind, qualified(ns, name), inv.message);
                if spec.need == Need::Policy {
                    input.invalid_policies.push(text);
                } else {
                    input.loaded.warnings.push(format!("skipped: {text}"));
                }
            }
        }
        input
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters (every update is a single insert/remove/replace), so poisoning is ignored.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn qualified(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

fn api_resource(spec: &KindSpec) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(spec.group, spec.version, spec.kind),
        spec.plural,
    )
}

#[derive(Clone, Copy)]
enum Slot {
    Kind(usize),
    Mesh,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One kind's watch loop: events into the store until aborted.
async fn watch(
    api: Api<DynamicObject>,
    config: watcher::Config,
    spec: KindSpec,
    slot: Slot,
    inner: Arc<Inner>,
) {
    let mut stream = watcher::watcher(api, config)
        .backoff(WatchBackoff { next: MIN_BACKOFF })
        .boxed();
    while let Some(item) = stream.next().await {
        let mut state = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let change = match item {
            Ok(event) => apply(&mut state, &spec, slot, event),
            // A status change (listed -> forbidden, absent) matters to readiness: wake the
            // compiler too.
            Err(e) => {
                if failed(&mut state, &spec, slot, &e) {
                    Change::Full
                } else {
                    Change::None
                }
            }
        };
        let changed = match change {
            Change::None => false,
            Change::Full => {
                state.delta.full = true;
                true
            }
            Change::Endpoints { services, pod } => {
                state.delta.services.extend(services);
                state.delta.pods_changed |= pod;
                true
            }
        };
        if changed {
            state.generation += 1;
            let generation = state.generation;
            drop(state);
            inner.changes.send_replace(generation);
        }
    }
}

fn kind_state(state: &mut State, slot: Slot) -> &mut KindState {
    match slot {
        Slot::Kind(i) => &mut state.kinds[i],
        Slot::Mesh => &mut state.mesh,
    }
}

/// Apply one watcher event; says what changed.
fn apply(state: &mut State, spec: &KindSpec, slot: Slot, event: Event<DynamicObject>) -> Change {
    // The shapes table is taken out for the event (the kind's state borrows `state`) and
    // always put back, whichever way the event returns.
    let mut shapes = std::mem::take(&mut state.pod_shapes);
    let change = apply_event(state, &mut shapes, spec, slot, event);
    state.pod_shapes = shapes;
    change
}

fn apply_event(
    state: &mut State,
    shapes: &mut Shapes,
    spec: &KindSpec,
    slot: Slot,
    event: Event<DynamicObject>,
) -> Change {
    let is_mesh = matches!(slot, Slot::Mesh);
    let mut mesh_text = None;
    // Endpoint changes are told apart so the caller can skip a full compile.
    let endpoints_kind = matches!(spec.kind, "EndpointSlice" | "Pod");
    let mut endpoint_services: Vec<(String, String)> = Vec::new();
    let mut touched_pods: Vec<Arc<Resource>> = Vec::new();
    let mut touched_key: Option<(String, String)> = None;
    let extra_labels = state.pod_labels.clone();
    let k = kind_state(state, slot);
    k.last_event = Some(Instant::now());
    let change = match event {
        Event::Init => {
            k.listing = Some(Default::default());
            Change::None
        }
        Event::InitApply(obj) => {
            if let Some((objects, invalid)) = &mut k.listing {
                let key = key_of(&obj);
                match decode(spec, obj, &extra_labels) {
                    Ok(s) => {
                        // A key listed twice: the later wins, the earlier's shape goes back.
                        let replaced = objects.insert(key, s.compact(shapes));
                        release(shapes, replaced);
                    }
                    Err(message) => {
                        invalid.insert(key, Invalid { message });
                    }
                }
            }
            Change::None
        }
        Event::InitDone => {
            let (objects, invalid) = k.listing.take().unwrap_or_default();
            let first = !matches!(k.status, Some(KindStatus::Synced));
            if first {
                info!(kind = spec.kind, objects = objects.len(), "listed");
            }
            for ((ns, name), inv) in &invalid {
                warn!(
                    "skipping {} {}: {}",
                    spec.kind,
                    qualified(ns, name),
                    inv.message
                );
            }
            k.objects = objects;
            k.invalid = invalid;
            k.status = Some(KindStatus::Synced);
            if spec.kind == "Pod" {
                // The Pods of the previous list are gone: so are the shapes only they used.
                shapes.sweep();
            }
            // A (re-)list may hold anything.
            Change::Full
        }
        Event::Apply(obj) => {
            let key = key_of(&obj);
            touched_key = Some(key.clone());
            match decode(spec, obj, &extra_labels) {
                Ok(s) => {
                    let s = s.compact(shapes);
                    let had_invalid = k.invalid.remove(&key).is_some();
                    let old = k.objects.insert(key, s.clone());
                    let same = match (&old, &s.object) {
                        (
                            Some(Stored {
                                object: Object::Resource(a),
                                ..
                            }),
                            Object::Resource(b),
                        ) => a == b,
                        (
                            Some(Stored {
                                object: Object::Pod(a),
                                ..
                            }),
                            Object::Pod(b),
                        ) => a == b,
                        (
                            Some(Stored {
                                object: Object::Mesh(a),
                                ..
                            }),
                            Object::Mesh(b),
                        ) => a == b,
                        _ => false,
                    };
                    if same && !had_invalid {
                        // Only fields the waypoint never reads changed (a Pod's status
                        // conditions, say): nothing to do.
                        release(shapes, old);
                        return Change::None;
                    }
                    if endpoints_kind && !had_invalid {
                        for r in old.iter().chain([&s]).filter_map(Stored::resource) {
                            collect_endpoint_change(&r, &mut endpoint_services, &mut touched_pods);
                        }
                    }
                    release(shapes, old);
                }
                Err(message) => {
                    warn!(
                        "skipping {} {}: {message}",
                        spec.kind,
                        qualified(&key.0, &key.1)
                    );
                    release(shapes, k.objects.remove(&key));
                    k.invalid.insert(key, Invalid { message });
                }
            }
            if endpoints_kind && (!endpoint_services.is_empty() || !touched_pods.is_empty()) {
                Change::Endpoints {
                    services: Vec::new(),
                    pod: false,
                }
            } else {
                Change::Full
            }
        }
        Event::Delete(obj) => {
            let key = key_of(&obj);
            touched_key = Some(key.clone());
            let was_invalid = k.invalid.remove(&key).is_some();
            let removed = k.objects.remove(&key);
            let resource = removed.as_ref().and_then(Stored::resource);
            release(shapes, removed);
            match resource {
                Some(r) if endpoints_kind && !was_invalid => {
                    collect_endpoint_change(&r, &mut endpoint_services, &mut touched_pods);
                    Change::Endpoints {
                        services: Vec::new(),
                        pod: false,
                    }
                }
                _ => Change::Full,
            }
        }
    };
    let changed = !matches!(change, Change::None);
    if changed {
        k.last_update = Some(now_unix());
        if is_mesh {
            mesh_text = Some(k.objects.values().next().and_then(|s| match &s.object {
                Object::Mesh(text) => Some(text.clone()),
                Object::Resource(_) | Object::Pod(_) => None,
            }));
        }
    }
    if let Some(text) = mesh_text {
        state.mesh_text = text;
    }
    if spec.kind == "EndpointSlice" {
        match (&change, touched_key) {
            (Change::Full, _) => reindex_slices(state, None),
            (_, Some(key)) => reindex_slices(state, Some(key)),
            _ => {}
        }
    }
    if spec.kind == "Pod" {
        if matches!(change, Change::Full) {
            reindex_pods(state, None);
        } else if !touched_pods.is_empty() {
            reindex_pods(state, Some(&touched_pods));
        }
    }
    match change {
        Change::Endpoints { .. } => {
            // A Pod matters through the slices that name it (by targetRef, else by IP).
            if !touched_pods.is_empty() {
                pods_referenced(state, &touched_pods, &mut endpoint_services);
            }
            Change::Endpoints {
                services: endpoint_services,
                pod: !touched_pods.is_empty(),
            }
        }
        other => other,
    }
}

/// Keep `pods_by_ip` in step: for `touched` Pods (old and new versions), drop their IPs and
/// add those of the Pod now stored under their name; `None`: rebuild from the store.
fn reindex_pods(state: &mut State, touched: Option<&[Arc<Resource>]>) {
    let Some(pod_i) = KINDS.iter().position(|k| k.kind == "Pod") else {
        return;
    };
    let parse = |ip: &str| ip.parse::<std::net::IpAddr>().ok();
    let current = |state: &State, key: &(String, String)| -> Vec<std::net::IpAddr> {
        match state.kinds[pod_i].objects.get(key) {
            Some(Stored {
                object: Object::Pod(p),
                ..
            }) => p.ips().filter_map(parse).collect(),
            Some(Stored {
                object: Object::Resource(r),
                ..
            }) => match &**r {
                Resource::Pod(p) => pod_ips(p).map(String::as_str).filter_map(parse).collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    };
    match touched {
        None => {
            let keys: Vec<(String, String)> = state.kinds[pod_i].objects.keys().cloned().collect();
            let mut index = std::collections::HashMap::with_capacity(keys.len());
            for key in keys {
                for ip in current(state, &key) {
                    index.insert(ip, key.clone());
                }
            }
            state.pods_by_ip = index;
        }
        Some(pods) => {
            for r in pods {
                let Resource::Pod(p) = &**r else { continue };
                let key = (p.metadata.namespace.clone(), p.metadata.name.clone());
                for ip in pod_ips(p).map(String::as_str).filter_map(parse) {
                    if state.pods_by_ip.get(&ip) == Some(&key) {
                        state.pods_by_ip.remove(&ip);
                    }
                }
                for ip in current(state, &key) {
                    state.pods_by_ip.insert(ip, key.clone());
                }
            }
        }
    }
}

/// Keep `slices_by_service` in step for one slice (or rebuild it from the store).
fn reindex_slices(state: &mut State, key: Option<(String, String)>) {
    let Some(eps_i) = KINDS.iter().position(|k| k.kind == "EndpointSlice") else {
        return;
    };
    let service = |state: &State, key: &(String, String)| match state.kinds[eps_i].objects.get(key)
    {
        Some(Stored {
            object: Object::Resource(r),
            ..
        }) => match &**r {
            Resource::EndpointSlice(slice) => slice_service(slice),
            _ => None,
        },
        _ => None,
    };
    let keys: Vec<(String, String)> = match key {
        Some(k) => vec![k],
        None => {
            state.slices_by_service.clear();
            state.service_of_slice.clear();
            state.kinds[eps_i].objects.keys().cloned().collect()
        }
    };
    for key in keys {
        if let Some(old) = state.service_of_slice.remove(&key)
            && let Some(set) = state.slices_by_service.get_mut(&old)
        {
            set.remove(&key);
            if set.is_empty() {
                state.slices_by_service.remove(&old);
            }
        }
        if let Some(svc) = service(state, &key) {
            state
                .slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
            state.service_of_slice.insert(key, svc);
        }
    }
}

/// The (namespace, Service) an EndpointSlice belongs to (`kubernetes.io/service-name`).
fn slice_service(slice: &policy::resources::EndpointSlice) -> Option<(String, String)> {
    slice
        .metadata
        .labels
        .get("kubernetes.io/service-name")
        .map(|svc| (slice.metadata.namespace.clone(), svc.clone()))
}

fn pod_ips(p: &policy::resources::Pod) -> impl Iterator<Item = &String> {
    p.status
        .pod_ip
        .iter()
        .chain(p.status.pod_ips.iter().map(|i| &i.ip))
}

/// Note what an EndpointSlice or Pod (old or new version) touches.
fn collect_endpoint_change(
    r: &Arc<Resource>,
    services: &mut Vec<(String, String)>,
    pods: &mut Vec<Arc<Resource>>,
) {
    match &**r {
        Resource::EndpointSlice(slice) => services.extend(slice_service(slice)),
        Resource::Pod(_) => pods.push(r.clone()),
        _ => {}
    }
}

/// Services whose slices name one of `pods` (by targetRef, or by IP).
fn pods_referenced(state: &State, pods: &[Arc<Resource>], out: &mut Vec<(String, String)>) {
    let Some(eps_i) = KINDS.iter().position(|k| k.kind == "EndpointSlice") else {
        return;
    };
    let pods: Vec<&policy::resources::Pod> = pods
        .iter()
        .filter_map(|r| match &**r {
            Resource::Pod(p) => Some(p),
            _ => None,
        })
        .collect();
    for s in state.kinds[eps_i].objects.values() {
        let Object::Resource(r) = &s.object else {
            continue;
        };
        let Resource::EndpointSlice(slice) = &**r else {
            continue;
        };
        let names_pod = slice.endpoints.iter().any(|e| {
            pods.iter().any(
                |p| match e.target_ref.as_ref().and_then(|t| t.name.as_ref()) {
                    Some(name) => {
                        *name == p.metadata.name && slice.metadata.namespace == p.metadata.namespace
                    }
                    None => e.addresses.iter().any(|a| pod_ips(p).any(|ip| ip == a)),
                },
            )
        });
        if names_pod {
            out.extend(slice_service(slice));
        }
    }
}

fn key_of(obj: &DynamicObject) -> (String, String) {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Decode one object into its compact typed form. List items from the API server carry no
/// `apiVersion`/`kind` for built-in kinds, so both are set from the watched kind.
fn decode(spec: &KindSpec, obj: DynamicObject, extra_labels: &[String]) -> Result<Stored, String> {
    let resource_version = obj.metadata.resource_version.clone();
    if spec.kind == "ConfigMap" {
        let text = obj
            .data
            .get("data")
            .and_then(|d| d.get("mesh"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        return Ok(Stored {
            object: Object::Mesh(text),
            resource_version,
        });
    }
    let mut value = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
    if let Value::Object(map) = &mut value {
        map.insert("apiVersion".into(), Value::String(spec.api_version()));
        map.insert("kind".into(), Value::String(spec.kind.into()));
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            meta.remove("managedFields");
            if spec.kind == "Pod" {
                // A Pod's annotations are never read and can be kilobytes; nor is its
                // creation time.
                meta.remove("annotations");
                meta.remove("creationTimestamp");
            }
        }
    }
    match Resource::from_value(value) {
        Ok(Resource::Pod(mut p)) => {
            // A Pod keeps only the labels the waypoint reads (Istio's, and the workload
            // labels of metrics): real Pods carry many more (Helm, operators).
            p.metadata
                .labels
                .retain(|k, _| pod_label_kept(k) || extra_labels.iter().any(|e| e == k));
            Ok(Stored {
                object: Object::Resource(Arc::new(Resource::Pod(p))),
                resource_version,
            })
        }
        Ok(Resource::Unknown { .. }) => Err(format!(
            "{} is not a kind or apiVersion the waypoint understands",
            spec.api_version()
        )),
        Ok(r) => Ok(Stored {
            object: Object::Resource(Arc::new(r)),
            resource_version,
        }),
        Err(e) => Err(if e.field.is_empty() {
            e.message
        } else {
            format!("{}: {}", e.field, e.message)
        }),
    }
}

/// Pod labels the waypoint reads: `istio.io/*`-family labels (data-plane mode, waypoint
/// binding, canonical names), the Gateway name, the workload labels of Istio's metrics, and
/// the locality and topology labels (`failoverPriority`, `trafficDistribution`).
fn pod_label_kept(key: &str) -> bool {
    key.starts_with("istio.io/")
        || key.starts_with("service.istio.io/")
        || key.starts_with("gateway.networking.k8s.io/")
        || key.starts_with("topology.istio.io/")
        || key.starts_with("topology.kubernetes.io/")
        || matches!(
            key,
            "app"
                | "version"
                | "kubernetes.io/hostname"
                | "istio-locality"
                | "app.kubernetes.io/name"
                | "app.kubernetes.io/version"
                | "pod-template-hash"
        )
}

/// Record a watch failure: 403 and 404 say what is missing; anything else is a connection
/// problem retried with back-off (the store keeps serving what it has). Returns whether the
/// kind's status changed.
fn failed(state: &mut State, spec: &KindSpec, slot: Slot, e: &watcher::Error) -> bool {
    let k = kind_state(state, slot);
    let before = k.status.clone();
    k.last_error = Some(Instant::now());
    let api_status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref().clone()),
        watcher::Error::WatchError(s) => Some(s.as_ref().clone()),
        _ => None,
    };
    let listed = matches!(k.status, Some(KindStatus::Synced));
    let code = api_status.as_ref().map(|s| s.code).unwrap_or(0);
    let status = match code {
        // Reading Secrets is the one grant a cluster may withhold on purpose: without it no
        // `credentialName` is found (those connections fail closed), the rest serves.
        403 if spec.waypoint_namespace_only() => KindStatus::Absent(
            "forbidden: no DestinationRule credentialName can be read without list and watch on secrets in the waypoint's namespace (Role in deploy/)".into(),
        ),
        403 => KindStatus::Failing(format!(
            "forbidden: the waypoint's service account needs list and watch on {} (ClusterRole in deploy/)",
            spec.resource_name()
        )),
        404 => KindStatus::Absent(format!(
            "the {} CRD is not installed (404 on {})",
            spec.kind,
            spec.resource_name()
        )),
        // 410 Gone: the watcher re-lists on its own; keep serving meanwhile.
        410 => {
            info!(kind = spec.kind, "watch expired (410 Gone); re-listing");
            k.last_error = None;
            return false;
        }
        _ => KindStatus::Failing(format!("cannot list {}: {e}", spec.resource_name())),
    };
    // A kind already listed keeps its objects and its Synced status while reconnecting:
    // the last good state is served.
    if listed && code != 403 && code != 404 {
        warn!(
            kind = spec.kind,
            "watch failed, retrying with back-off: {e}"
        );
        return false;
    }
    match (&status, spec.need) {
        (KindStatus::Absent(m), Need::Optional) if k.status.as_ref() != Some(&status) => {
            warn!(kind = spec.kind, "{m}; treating as empty");
        }
        (KindStatus::Absent(_), Need::Optional) => {}
        (KindStatus::Absent(m) | KindStatus::Failing(m), _) => {
            warn!(kind = spec.kind, "{m}");
        }
        _ => {}
    }
    if listed && code == 404 && spec.need == Need::Optional {
        // The CRD was removed: its objects are gone with it.
        k.objects.clear();
    }
    if !listed || code == 403 || code == 404 {
        k.status = Some(status);
    }
    k.status != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> policy::resources::Pod {
        #![allow(clippy::unwrap_used)]
        let v: Value = serde_saphyr::from_str(yaml).unwrap();
        match Resource::from_value(v).unwrap() {
            Resource::Pod(p) => p,
            other => panic!("{other:?}"),
        }
    }

    /// Workload and canonical labels as Istio derives them from a Pod.
    #[test]
    fn pod_meta_names_the_workload_as_istio_does() {
        let head = "apiVersion: v1\nkind: Pod\nmetadata:\n  namespace: ns\n";
        let deployment = pod(&format!(
            "{head}  name: reviews-v1-5b4d7-abcde\n  labels: {{app: reviews, version: v1, pod-template-hash: 5b4d7}}\n  ownerReferences: [{{kind: ReplicaSet, name: reviews-v1-5b4d7}}]\nspec: {{serviceAccountName: bookinfo-reviews}}\n"
        ));
        let m = PodMeta::of(&deployment);
        assert_eq!(m.workload, "reviews-v1");
        assert_eq!(m.canonical_service, "reviews");
        assert_eq!(m.canonical_revision, "v1");
        assert_eq!(m.service_account, "bookinfo-reviews");
        let canonical = pod(&format!(
            "{head}  name: db-0\n  labels: {{service.istio.io/canonical-name: database, app.kubernetes.io/version: '15'}}\n  ownerReferences: [{{kind: StatefulSet, name: db}}]\n"
        ));
        let m = PodMeta::of(&canonical);
        assert_eq!(
            (m.workload.as_str(), m.canonical_service.as_str()),
            ("db", "database")
        );
        assert_eq!(m.canonical_revision, "15");
        assert_eq!(m.service_account, "default");
        let bare = pod(&format!("{head}  name: lonely\n"));
        let m = PodMeta::of(&bare);
        assert_eq!(
            (
                m.workload.as_str(),
                m.canonical_service.as_str(),
                m.canonical_revision.as_str()
            ),
            ("lonely", "lonely", "latest")
        );
        assert_eq!((m.app, m.version), (None, None));
    }

    /// Pods go through the store as the watch delivers them (list, changes, deletes, a
    /// re-list): each is kept as a compact record, comes back whole for compiles and source
    /// lookups, and the shapes the replicas of a workload share follow the Pods.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn pods_are_stored_compact_and_their_shared_shapes_follow_them() {
        let pod_i = KINDS.iter().position(|k| k.kind == "Pod").unwrap();
        let (spec, slot) = (&KINDS[pod_i], Slot::Kind(pod_i));
        let obj = |name: &str, ip: &str, app: &str, phase: &str| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ns", "resourceVersion": "7",
                    "labels": {"app": app, "pod-template-hash": "h1", "helm.sh/chart": "x"},
                    "annotations": {"big": "x".repeat(2000)},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": format!("{app}-h1"), "uid": "u"}]},
                "spec": {"serviceAccountName": app},
                "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}))
            .unwrap()
        };
        let mut state = State::new();
        apply(&mut state, spec, slot, Event::Init);
        for i in 0..6 {
            let ev = Event::InitApply(obj(
                &format!("web-h1-{i}"),
                &format!("10.1.0.{i}"),
                "web",
                "Running",
            ));
            apply(&mut state, spec, slot, ev);
        }
        apply(
            &mut state,
            spec,
            slot,
            Event::InitApply(obj("db-h1-0", "10.1.1.1", "db", "Running")),
        );
        assert!(matches!(
            apply(&mut state, spec, slot, Event::InitDone),
            Change::Full
        ));
        assert_eq!(
            state.pod_shapes.len(),
            2,
            "six web replicas share one shape"
        );
        assert!(
            state.kinds[pod_i]
                .objects
                .values()
                .all(|s| matches!(s.object, Object::Pod(_)))
        );

        // A change the waypoint does not read: nothing to do. A new IP: an endpoint change.
        let same = apply(
            &mut state,
            spec,
            slot,
            Event::Apply(obj("web-h1-3", "10.1.0.3", "web", "Succeeded")),
        );
        assert!(matches!(same, Change::None));
        let moved = apply(
            &mut state,
            spec,
            slot,
            Event::Apply(obj("web-h1-3", "10.1.0.33", "web", "Running")),
        );
        assert!(matches!(moved, Change::Endpoints { pod: true, .. }));
        assert_eq!(state.pod_shapes.len(), 2);
        // A Pod of a new workload version: a new shape; the old one goes with its last Pod.
        let relabeled = obj("db-h1-0", "10.1.1.1", "db2", "Running");
        apply(&mut state, spec, slot, Event::Apply(relabeled));
        assert_eq!(
            state.pod_shapes.len(),
            2,
            "db's shape left with its only Pod"
        );
        apply(
            &mut state,
            spec,
            slot,
            Event::Delete(obj("db-h1-0", "10.1.1.1", "db2", "Running")),
        );
        assert_eq!(state.pod_shapes.len(), 1);

        let source = Source {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                changes: tokio::sync::watch::channel(0).0,
            }),
            tasks: Arc::new(Vec::new()),
        };
        // The source lookup by IP follows the change, and sees the Pod whole.
        assert!(source.pod_at("10.1.0.3".parse().unwrap()).is_none());
        let m = source.pod_at("10.1.0.33".parse().unwrap()).unwrap();
        assert_eq!((m.name.as_str(), m.workload.as_str()), ("web-h1-3", "web"));
        assert_eq!(m.service_account, "web");
        assert!(source.pod_at("10.1.1.1".parse().unwrap()).is_none());
        // A compile gets the Pods back as decoded: kept labels, no annotations.
        let input = source.full_input();
        let pods: Vec<&policy::resources::Pod> = input
            .loaded
            .resources
            .iter()
            .filter_map(|r| match r {
                Resource::Pod(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(pods.len(), 6);
        let p = pods.iter().find(|p| p.metadata.name == "web-h1-3").unwrap();
        assert_eq!(p.status.pod_ip.as_deref(), Some("10.1.0.33"));
        assert_eq!(p.status.pod_ips.len(), 1);
        assert!(p.metadata.labels.get("helm.sh/chart").is_none());
        assert_eq!(
            p.metadata.labels.get("app").map(String::as_str),
            Some("web")
        );
        assert!(p.metadata.annotations.is_empty());

        // A re-list with fewer Pods: the shapes of the Pods that went are swept.
        let mut state = source.lock();
        apply(&mut state, spec, slot, Event::Init);
        apply(
            &mut state,
            spec,
            slot,
            Event::InitApply(obj("api-h1-0", "10.1.2.1", "api", "Running")),
        );
        apply(&mut state, spec, slot, Event::InitDone);
        assert_eq!(state.pod_shapes.len(), 1);
        assert_eq!(state.kinds[pod_i].objects.len(), 1);
    }

    #[test]
    fn pods_keep_only_the_labels_the_waypoint_reads() {
        for kept in [
            "istio.io/dataplane-mode",
            "istio.io/use-waypoint",
            "service.istio.io/canonical-name",
            "app",
            "version",
            "app.kubernetes.io/name",
            "pod-template-hash",
            "gateway.networking.k8s.io/gateway-name",
        ] {
            assert!(pod_label_kept(kept), "{kept}");
        }
        for dropped in [
            "helm.sh/chart",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/instance",
            "team",
        ] {
            assert!(!pod_label_kept(dropped), "{dropped}");
        }
    }

    /// deploy/istio-waypoint.yaml grants list and watch on every kind watched here, and
    /// nothing more: a kind added to [`KINDS`] without its RBAC rule would leave a real
    /// waypoint not ready.
    #[test]
    fn the_shipped_rbac_covers_every_watched_kind() {
        #![allow(clippy::unwrap_used)]
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/istio-waypoint.yaml"
        ))
        .unwrap();
        let docs: Vec<Value> = text
            .split("\n---")
            .filter(|d| {
                d.lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            })
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        let granted = |kind: &str| -> Vec<(String, String, Vec<String>)> {
            docs.iter()
                .filter(|d| d["kind"] == kind)
                .flat_map(|d| d["rules"].as_array().unwrap().clone())
                .flat_map(|r| {
                    let verbs: Vec<String> = r["verbs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string())
                        .collect();
                    let groups = r["apiGroups"].as_array().unwrap().clone();
                    let resources = r["resources"].as_array().unwrap().clone();
                    groups.into_iter().flat_map(move |g| {
                        let verbs = verbs.clone();
                        resources.clone().into_iter().map(move |res| {
                            (
                                g.as_str().unwrap().to_string(),
                                res.as_str().unwrap().to_string(),
                                verbs.clone(),
                            )
                        })
                    })
                })
                .collect()
        };
        let cluster = granted("ClusterRole");
        let namespaced = granted("Role");
        for spec in KINDS.iter().filter(|k| k.waypoint_namespace_only()) {
            // Secrets: the waypoint's namespace only, by a Role.
            let rule = namespaced
                .iter()
                .find(|(g, r, _)| g == spec.group && r == spec.plural)
                .unwrap_or_else(|| panic!("no Role rule for {}", spec.resource_name()));
            assert_eq!(rule.2, ["list", "watch"], "{}", spec.resource_name());
        }
        for spec in KINDS.iter().filter(|k| !k.waypoint_namespace_only()) {
            let rule = cluster
                .iter()
                .find(|(g, r, _)| g == spec.group && r == spec.plural)
                .unwrap_or_else(|| panic!("no ClusterRole rule for {}", spec.resource_name()));
            assert_eq!(rule.2, ["list", "watch"], "{}", spec.resource_name());
        }
        assert_eq!(cluster.len(), KINDS.len() - 1, "only the watched kinds");
        let ns = granted("Role");
        assert!(
            ns.iter()
                .any(|(g, r, v)| g.is_empty() && r == "configmaps" && v == &["list", "watch"])
        );
        // The overlay swaps the image of istiod's `istio-proxy` container.
        let overlay = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        assert!(
            overlay["data"]["deployment"]
                .as_str()
                .unwrap()
                .contains("name: istio-proxy")
        );
    }
}
