//! # Istio Telemetry `accessLogging` for a waypoint: which requests get an access-log line
//!
//! Contract:
//! - [`crate::compile`] reads every `telemetry.istio.io` Telemetry (v1, v1alpha1) and keeps
//!   those that reach this waypoint, the way Istio attaches them (`telemetry.proto`,
//!   `policy.md` 4): `targetRefs` to this waypoint's `Gateway`, to GatewayClass
//!   `istio-waypoint` (root namespace only) or to a `Service` (that Service's traffic); a
//!   Telemetry with neither `selector` nor `targetRefs` in the root namespace is mesh-wide, in
//!   the waypoint's namespace namespace-wide. "Waypoints ignore `selector`": such Telemetry is
//!   warned about and skipped.
//! - Resolution follows Istio's "more specific overrides less specific": Service targetRef,
//!   then Gateway/GatewayClass targetRef, then namespace-wide, then mesh-wide; a Telemetry
//!   without `accessLogging` inherits it from the next level (Istio merges field by field).
//!   Two Telemetry at one level: the first by namespace/name wins, with a warning.
//! - Every `filter.expression` is compiled once at config compile time with the `cel` crate
//!   (cel-rust); a syntax error is a [`crate::ConfigError`] naming
//!   `Telemetry ns/name: spec.accessLogging[i].filter.expression`.
//! - The data path asks [`AccessLogPolicy::should_log`] with a [`LogAttributes`] built from the
//!   finished record. [`AccessLogPolicy::is_default`] (no Telemetry applies) is the fast path:
//!   no attributes are built and nothing is evaluated. Metrics never depend on this.
//! - Evaluation follows Envoy's CEL access-log filter (`extension_filters.cel`): a line is
//!   written only when the expression yields `true`; an evaluation error (e.g. a missing
//!   header or `response.code` on a TCP connection) or a non-bool result means "do not log".
//! - Pure: no I/O, no clocks; never panics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value as CelValue};
use http::HeaderMap;

use crate::ConfigError;
use crate::authz::{Attached, TargetIndex, Targets, attach};
use crate::metrics_policy::MetricsPolicy;
use crate::resources::Telemetry;
use crate::snapshot::CompileOptions;
use crate::trace_policy::TracingPolicy;

const KIND: &str = "Telemetry";

/// Envoy's built-in access-log provider name in Istio's default MeshConfig (stdout).
const DEFAULT_PROVIDER: &str = "envoy";

/// How specific a Telemetry is for this waypoint (higher wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    MeshWide,
    NamespaceWide,
    Waypoint,
    Service,
}

/// A compiled `filter.expression`.
struct Filter {
    expression: Arc<str>,
    program: Program,
    /// The expression mentions `headers`: the data path keeps the request headers for it.
    needs_headers: bool,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("expression", &self.expression)
            .finish()
    }
}

/// One `accessLogging[]` entry.
#[derive(Debug)]
struct Entry {
    disabled: bool,
    filter: Option<Filter>,
    /// Writes to the mesh-wide log (provider `envoy`, or no provider named).
    mesh: bool,
    /// `envoyFileAccessLog` providers it writes to.
    named: Vec<Arc<str>>,
}

/// Where one request's line goes ([`AccessLogPolicy::sinks`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSinks {
    /// The mesh-wide log (Istio's `envoy` provider: MeshConfig `accessLogFile` and format).
    pub mesh: bool,
    /// MeshConfig `envoyFileAccessLog` providers, by name.
    pub named: Vec<Arc<str>>,
}

impl LogSinks {
    pub fn any(&self) -> bool {
        self.mesh || !self.named.is_empty()
    }
}

/// The `accessLogging` of one Telemetry, compiled.
#[derive(Debug)]
struct AccessLogConfig {
    /// `Telemetry ns/name`, for explanations and the admin dump.
    source: Arc<str>,
    entries: Vec<Entry>,
    needs_headers: bool,
}

/// What decides whether a request through one Service gets an access-log line. Cheap to
/// clone. The default (no Telemetry) logs everything.
#[derive(Debug, Clone, Default)]
pub struct AccessLogPolicy(Option<Arc<AccessLogConfig>>);

/// The HTTP part of [`LogAttributes`] (Envoy's `request.*` attributes).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestAttributes<'a> {
    pub method: &'a str,
    /// Path with query, as received (`request.path`).
    pub path: &'a str,
    /// `:authority` / `Host` (`request.host`).
    pub host: &'a str,
    /// `HTTP/1.1`, `HTTP/2` (`request.protocol`).
    pub protocol: &'a str,
    /// `x-request-id` (`request.id`).
    pub id: &'a str,
    pub user_agent: &'a str,
    /// The request headers when the filter needs them ([`AccessLogPolicy::needs_request_headers`]).
    pub headers: Option<&'a HeaderMap>,
    /// Request body bytes (`request.size`).
    pub size: u64,
    /// Milliseconds from the first request byte to the end of the response (`request.duration`
    /// is a CEL duration in Envoy; here it is `request.duration_ms`, an int).
    pub duration_ms: u64,
}

/// The attributes Envoy offers a CEL access-log filter, as far as the waypoint knows them.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogAttributes<'a> {
    /// `None` for TCP connections: `request.*` and `response.*` are then absent.
    pub request: Option<RequestAttributes<'a>>,
    /// `response.code` (HTTP only).
    pub response_code: u16,
    pub response_code_details: &'a str,
    /// `response.flags`: Envoy's response-flag bitmask (`UH` = 0x2, `NR` = 0x100, ...).
    pub response_flags: u64,
    /// Response body bytes (`response.size`).
    pub response_size: u64,
    /// `source.address` (`ip:port`) and `source.port`.
    pub source_address: &'a str,
    pub source_port: u16,
    /// The peer's SPIFFE URI (`connection.uri_san_peer_certificate`, also `source.principal`).
    pub source_principal: &'a str,
    /// `destination.address` (the VIP:port dialled) and `destination.port`.
    pub destination_address: &'a str,
    pub destination_port: u16,
    /// `connection.mtls`: true for HBONE (always mutual TLS).
    pub mtls: bool,
    /// `upstream.address` (`%UPSTREAM_HOST%`), `xds.cluster_name`, `xds.route_name`.
    pub upstream_address: &'a str,
    pub cluster_name: &'a str,
    pub route_name: &'a str,
    pub connection_termination_details: &'a str,
}

impl AccessLogPolicy {
    /// No Telemetry applies: log every request, no attributes needed (the fast path).
    pub fn is_default(&self) -> bool {
        self.0.is_none()
    }

    /// The Telemetry that decides (`Telemetry ns/name`), if any.
    pub fn source(&self) -> Option<&str> {
        self.0.as_ref().map(|c| &*c.source)
    }

    /// Every applicable `accessLogging` entry is `disabled`: nothing is logged, nothing to
    /// evaluate.
    pub fn is_disabled(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|c| c.entries.iter().all(|e| e.disabled))
    }

    /// A filter reads `request.headers`: keep the request headers for [`Self::should_log`].
    pub fn needs_request_headers(&self) -> bool {
        self.0.as_ref().is_some_and(|c| c.needs_headers)
    }

    /// The filter expressions in effect, for explanations.
    pub fn expressions(&self) -> Vec<Arc<str>> {
        self.0
            .iter()
            .flat_map(|c| c.entries.iter())
            .filter(|e| !e.disabled)
            .filter_map(|e| e.filter.as_ref().map(|f| f.expression.clone()))
            .collect()
    }

    /// Whether this request gets a line: some enabled entry has no filter, or its filter
    /// evaluates to `true` (Istio configures one Envoy access log per entry; the waypoint has
    /// one sink, so the line is written once when any of them would write it).
    pub fn should_log(&self, attrs: &LogAttributes<'_>) -> bool {
        self.sinks(attrs).any()
    }

    /// Where this request's line goes: every enabled entry whose filter passes (or that has
    /// none) adds its providers, as Istio configures one Envoy access log per entry and
    /// provider; a sink named twice gets one line.
    pub fn sinks(&self, attrs: &LogAttributes<'_>) -> LogSinks {
        let Some(config) = &self.0 else {
            return LogSinks {
                mesh: true,
                named: Vec::new(),
            };
        };
        let mut out = LogSinks::default();
        let mut ctx: Option<Context<'_, '_>> = None;
        for e in &config.entries {
            if e.disabled {
                continue;
            }
            if let Some(filter) = &e.filter {
                let ctx = ctx.get_or_insert_with(|| context(attrs));
                if !matches!(filter.program.execute(ctx), Ok(CelValue::Bool(true))) {
                    continue;
                }
            }
            out.mesh |= e.mesh;
            for n in &e.named {
                if !out.named.contains(n) {
                    out.named.push(n.clone());
                }
            }
        }
        out
    }
}

fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

fn map(entries: Vec<(&str, CelValue)>) -> CelValue {
    let m: HashMap<Key, CelValue> = entries
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k.to_string())), v))
        .collect();
    CelValue::Map(Map { map: Arc::new(m) })
}

fn s(v: &str) -> CelValue {
    CelValue::String(Arc::new(v.to_string()))
}

fn int(v: u64) -> CelValue {
    CelValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

/// The CEL activation: Envoy attribute names (envoy `extensions/filters/common/expr`).
pub(crate) fn context<'a>(a: &LogAttributes<'_>) -> Context<'a, 'a> {
    let mut ctx = Context::with_env(env());
    if let Some(r) = &a.request {
        let url_path = r.path.split_once('?').map_or(r.path, |(p, _)| p);
        let mut headers: HashMap<Key, CelValue> = HashMap::new();
        if let Some(h) = r.headers {
            for name in h.keys() {
                let joined: Vec<String> = h
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                headers.insert(
                    Key::String(Arc::new(name.as_str().to_string())),
                    s(&joined.join(",")),
                );
            }
        }
        let referer = r
            .headers
            .and_then(|h| h.get(http::header::REFERER))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        ctx.add_variable_from_value(
            "request",
            map(vec![
                ("method", s(r.method)),
                ("path", s(r.path)),
                ("url_path", s(url_path)),
                ("host", s(r.host)),
                ("scheme", s("http")),
                ("protocol", s(r.protocol)),
                ("id", s(r.id)),
                ("useragent", s(r.user_agent)),
                ("referer", s(referer)),
                (
                    "headers",
                    CelValue::Map(Map {
                        map: Arc::new(headers),
                    }),
                ),
                ("size", int(r.size)),
                ("total_size", int(r.size)),
                ("duration_ms", int(r.duration_ms)),
            ]),
        );
        ctx.add_variable_from_value(
            "response",
            map(vec![
                ("code", int(u64::from(a.response_code))),
                ("code_details", s(a.response_code_details)),
                ("flags", int(a.response_flags)),
                ("size", int(a.response_size)),
                ("total_size", int(a.response_size)),
            ]),
        );
    }
    ctx.add_variable_from_value(
        "connection",
        map(vec![
            ("mtls", CelValue::Bool(a.mtls)),
            ("uri_san_peer_certificate", s(a.source_principal)),
            ("termination_details", s(a.connection_termination_details)),
            ("requested_server_name", s("")),
        ]),
    );
    ctx.add_variable_from_value(
        "source",
        map(vec![
            ("address", s(a.source_address)),
            ("port", int(u64::from(a.source_port))),
            ("principal", s(a.source_principal)),
        ]),
    );
    ctx.add_variable_from_value(
        "destination",
        map(vec![
            ("address", s(a.destination_address)),
            ("port", int(u64::from(a.destination_port))),
        ]),
    );
    ctx.add_variable_from_value("upstream", map(vec![("address", s(a.upstream_address))]));
    ctx.add_variable_from_value(
        "xds",
        map(vec![
            ("cluster_name", s(a.cluster_name)),
            ("route_name", s(a.route_name)),
        ]),
    );
    ctx
}

/// Telemetry attached to this waypoint, by level; per-Service ones by (namespace, name).
#[derive(Debug, Default)]
pub(crate) struct TelemetryIndex {
    /// The waypoint-wide policy (Gateway/GatewayClass, else namespace-wide, else mesh-wide).
    waypoint: AccessLogPolicy,
    /// The waypoint-wide tracing (every level merged).
    waypoint_tracing: TracingPolicy,
    /// The waypoint-wide metrics overrides (every level merged).
    waypoint_metrics: MetricsPolicy,
    by_service: HashMap<(String, String), (AccessLogPolicy, TracingPolicy, MetricsPolicy)>,
    /// `Telemetry ns/name` of every Telemetry that applies somewhere, sorted.
    pub(crate) applied: Vec<String>,
}

impl TelemetryIndex {
    pub(crate) fn for_service(&self, namespace: &str, name: &str) -> AccessLogPolicy {
        self.by_service
            .get(&(namespace.to_string(), name.to_string()))
            .map_or(&self.waypoint, |(a, _, _)| a)
            .clone()
    }

    pub(crate) fn tracing_for(&self, namespace: &str, name: &str) -> TracingPolicy {
        self.by_service
            .get(&(namespace.to_string(), name.to_string()))
            .map_or(&self.waypoint_tracing, |(_, t, _)| t)
            .clone()
    }

    pub(crate) fn metrics_for(&self, namespace: &str, name: &str) -> MetricsPolicy {
        self.by_service
            .get(&(namespace.to_string(), name.to_string()))
            .map_or(&self.waypoint_metrics, |(_, _, m)| m)
            .clone()
    }
}

/// A Telemetry chosen at one level: its `Telemetry ns/name` and its `accessLogging`.
/// The Telemetry chosen at one place: its id, `accessLogging` and `tracing` (each `None`
/// when absent).
type Placed = (
    String,
    Option<Arc<AccessLogConfig>>,
    Option<Arc<[crate::trace_policy::TracingEntry]>>,
    Option<Arc<[crate::metrics_policy::MetricsEntry]>>,
);

/// A config error of Telemetry `t` at `field`.
pub(crate) fn telemetry_error(t: &Telemetry, field: String, message: String) -> ConfigError {
    ConfigError {
        kind: KIND.into(),
        namespace: t.metadata.namespace.clone(),
        name: t.metadata.name.clone(),
        field,
        message,
    }
}

/// The entries of one Telemetry list section (`spec.tracing`, `spec.metrics`), each read into
/// `R` with its field path (`spec.metrics[2]`); `None` when the section is absent. A section
/// that is not a list, or an entry that does not read, is an error naming it (the entry is
/// skipped, the others are kept).
pub(crate) fn section_entries<R: serde::de::DeserializeOwned>(
    t: &Telemetry,
    section: &str,
    value: Option<&serde_json::Value>,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<(String, R)>> {
    let list = match value? {
        serde_json::Value::Array(a) => a.as_slice(),
        serde_json::Value::Null => &[],
        _ => {
            let e = telemetry_error(t, format!("spec.{section}"), "must be a list".into());
            errors.push(e);
            return None;
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let field = format!("spec.{section}[{i}]");
        match R::deserialize(v) {
            Ok(r) => out.push((field, r)),
            Err(e) => errors.push(telemetry_error(t, field, format!("invalid: {e}"))),
        }
    }
    Some(out)
}

/// Validate every Telemetry and index those that reach this waypoint.
pub(crate) fn compile_telemetry(
    telemetries: &[&Telemetry],
    opts: &CompileOptions,
    service_exists: &TargetIndex<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> TelemetryIndex {
    let mut sorted: Vec<&Telemetry> = telemetries.to_vec();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    // (level, service) -> the Telemetry chosen there.
    let mut waypoint_levels: BTreeMap<Level, Placed> = BTreeMap::new();
    let mut services: BTreeMap<(String, String), Placed> = BTreeMap::new();
    for t in sorted {
        let meta = &t.metadata;
        let id = format!("{KIND} {}/{}", meta.namespace, meta.name);
        // Compiled (and so validated) whether or not it applies here, so errors do not
        // depend on where a Telemetry attaches.
        let config = compile_access_logging(t, &id, &opts.log_providers, errors, warnings);
        let tracing = crate::trace_policy::compile_tracing(t, errors);
        let metrics = crate::metrics_policy::compile_metrics(t, errors, warnings);
        let spec = &t.spec;
        let has_targets = spec.target_ref.is_some() || !spec.target_refs.is_empty();
        let mut places: Vec<(Level, Option<String>)> = Vec::new();
        if !has_targets && spec.selector.is_none() {
            // Istio: a Telemetry without selector or targetRefs in the root namespace is
            // mesh-wide; in any other namespace it applies to that namespace's proxies.
            if meta.namespace == opts.root_namespace {
                places.push((Level::MeshWide, None));
            } else if meta.namespace == opts.gateway_namespace {
                places.push((Level::NamespaceWide, None));
            }
        } else {
            let targets = Targets {
                selector: spec.selector.is_some(),
                target_ref: spec.target_ref.as_ref(),
                target_refs: &spec.target_refs,
            };
            let attached = attach(KIND, meta, &targets, opts, service_exists, errors, warnings);
            if let Attached::To(a) = attached {
                if a.waypoint {
                    places.push((Level::Waypoint, None));
                }
                for svc in a.services {
                    places.push((Level::Service, Some(svc)));
                }
            }
        }
        for (level, service) in places {
            let slot = (id.clone(), config.clone(), tracing.clone(), metrics.clone());
            match service {
                Some(svc) => match services.get(&(meta.namespace.clone(), svc.clone())) {
                    Some((first, _, _, _)) => warnings.push(format!(
                        "{id}: Service {}/{svc} already has {first}; ignored for it",
                        meta.namespace
                    )),
                    None => {
                        services.insert((meta.namespace.clone(), svc), slot);
                    }
                },
                None => match waypoint_levels.get(&level) {
                    Some((first, _, _, _)) => warnings.push(format!(
                        "{id}: {first} already applies to this waypoint at the same level; ignored"
                    )),
                    None => {
                        waypoint_levels.insert(level, slot);
                    }
                },
            }
        }
    }
    // Most specific level with an `accessLogging` field wins.
    let resolve = |extra: Option<&Placed>| -> AccessLogPolicy {
        extra
            .into_iter()
            .chain(waypoint_levels.values().rev())
            .find_map(|(_, c, _, _)| c.clone())
            .map_or_else(AccessLogPolicy::default, |c| AccessLogPolicy(Some(c)))
    };
    // Tracing merges field by field, least specific first (istiod `Telemetries.Tracing`).
    let resolve_tracing = |extra: Option<&Placed>| -> TracingPolicy {
        crate::trace_policy::merge(
            waypoint_levels
                .values()
                .chain(extra)
                .filter_map(|(id, _, t, _)| t.as_ref().map(|t| (id.as_str(), t))),
        )
    };
    // Metrics overrides apply in order, least specific first (istiod `mergeMetrics`).
    let resolve_metrics = |extra: Option<&Placed>| -> MetricsPolicy {
        crate::metrics_policy::merge(
            waypoint_levels
                .values()
                .chain(extra)
                .filter_map(|(id, _, _, m)| m.as_ref().map(|m| (id.as_str(), m))),
            &opts.metric_providers,
        )
    };
    let mut applied: Vec<String> = waypoint_levels
        .values()
        .chain(services.values())
        .map(|(id, _, _, _)| id.clone())
        .collect();
    applied.sort();
    applied.dedup();
    TelemetryIndex {
        waypoint: resolve(None),
        waypoint_tracing: resolve_tracing(None),
        waypoint_metrics: resolve_metrics(None),
        by_service: services
            .iter()
            .map(|(k, v)| {
                let policies = (
                    resolve(Some(v)),
                    resolve_tracing(Some(v)),
                    resolve_metrics(Some(v)),
                );
                (k.clone(), policies)
            })
            .collect(),
        applied,
    }
}

/// `spec.accessLogging`, compiled; `None` when absent (inherit). Errors are recorded.
fn compile_access_logging(
    t: &Telemetry,
    id: &str,
    log_providers: &[String],
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Option<Arc<AccessLogConfig>> {
    let list = t.spec.access_logging.as_ref()?;
    let meta = &t.metadata;
    let mut entries = Vec::new();
    for (i, e) in list.iter().enumerate() {
        let field = format!("spec.accessLogging[{i}]");
        // No provider named: the mesh-wide log (Istio's `envoy` default provider).
        let mut mesh = e.providers.is_empty();
        let mut named: Vec<Arc<str>> = Vec::new();
        for (j, p) in e.providers.iter().enumerate() {
            if p.name == DEFAULT_PROVIDER {
                mesh = true;
            } else if log_providers.contains(&p.name) {
                named.push(p.name.as_str().into());
            } else {
                // Istio skips a provider it cannot find; OpenTelemetry and ALS providers
                // are not implemented here.
                warnings.push(format!(
                    "{id}: {field}.providers[{j}]: provider {:?} is not an envoyFileAccessLog provider of the mesh config (or `envoy`); ignored",
                    p.name
                ));
            }
        }
        let filter = match &e.filter {
            Some(f) if !f.expression.trim().is_empty() => match Program::compile(&f.expression) {
                Ok(program) => Some(Filter {
                    expression: f.expression.as_str().into(),
                    program,
                    needs_headers: f.expression.contains("headers"),
                }),
                Err(err) => {
                    errors.push(ConfigError {
                        kind: KIND.into(),
                        namespace: meta.namespace.clone(),
                        name: meta.name.clone(),
                        field: format!("{field}.filter.expression"),
                        message: format!(
                            "invalid CEL expression {:?}: {}",
                            f.expression,
                            err.to_string().trim()
                        ),
                    });
                    None
                }
            },
            _ => None,
        };
        entries.push(Entry {
            disabled: e.disabled.unwrap_or(false),
            filter,
            mesh,
            named,
        });
    }
    let needs_headers = entries
        .iter()
        .any(|e| e.filter.as_ref().is_some_and(|f| f.needs_headers));
    Some(Arc::new(AccessLogConfig {
        source: id.into(),
        entries,
        needs_headers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(exprs: &[(&str, bool)]) -> AccessLogPolicy {
        let entries = exprs
            .iter()
            .map(|(e, disabled)| Entry {
                disabled: *disabled,
                filter: (!e.is_empty()).then(|| Filter {
                    expression: (*e).into(),
                    program: Program::compile(e).expect("valid"),
                    needs_headers: e.contains("headers"),
                }),
                mesh: true,
                named: Vec::new(),
            })
            .collect();
        AccessLogPolicy(Some(Arc::new(AccessLogConfig {
            source: "Telemetry default/t".into(),
            entries,
            needs_headers: true,
        })))
    }

    fn http(code: u16, headers: &HeaderMap) -> LogAttributes<'_> {
        LogAttributes {
            request: Some(RequestAttributes {
                method: "GET",
                path: "/v1beta3/items?x=1",
                host: "reviews:9080",
                protocol: "HTTP/1.1",
                headers: Some(headers),
                ..Default::default()
            }),
            response_code: code,
            response_flags: 0x100,
            mtls: true,
            ..Default::default()
        }
    }

    #[test]
    fn default_logs_everything_and_disabled_nothing() {
        let h = HeaderMap::new();
        assert!(AccessLogPolicy::default().should_log(&http(200, &h)));
        assert!(AccessLogPolicy::default().is_default());
        let off = policy(&[("", true)]);
        assert!(off.is_disabled());
        assert!(!off.should_log(&http(500, &h)));
        assert!(policy(&[("", false)]).should_log(&http(200, &h)));
    }

    #[test]
    fn istio_documented_filters() {
        let mut h = HeaderMap::new();
        h.insert("x-debug", "true".parse().expect("value"));
        let errors = policy(&[("response.code >= 400", false)]);
        assert!(errors.should_log(&http(503, &h)));
        assert!(!errors.should_log(&http(200, &h)));
        let debug = policy(&[("request.headers['x-debug'] == 'true'", false)]);
        assert!(debug.should_log(&http(200, &h)));
        // A missing header is an evaluation error: not logged (Envoy's CEL filter).
        assert!(!debug.should_log(&http(200, &HeaderMap::new())));
        let docs = policy(&[(
            "connection.mtls && request.url_path.contains('v1beta3')",
            false,
        )]);
        assert!(docs.should_log(&http(200, &h)));
        let flags = policy(&[("response.flags == 256", false)]);
        assert!(flags.should_log(&http(404, &h)));
        // TCP: no response.code, so a response filter never logs.
        let tcp = LogAttributes {
            mtls: true,
            ..Default::default()
        };
        assert!(!errors.should_log(&tcp));
        assert!(policy(&[("connection.mtls", false)]).should_log(&tcp));
        // Non-bool result: not logged.
        assert!(!policy(&[("response.code", false)]).should_log(&http(500, &h)));
    }

    #[test]
    fn any_enabled_entry_logs() {
        let h = HeaderMap::new();
        let p = policy(&[("response.code >= 500", false), ("", true)]);
        assert!(p.should_log(&http(500, &h)) && !p.should_log(&http(404, &h)));
        assert_eq!(&*p.expressions()[0], "response.code >= 500");
    }
}
