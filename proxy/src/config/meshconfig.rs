//! Istio MeshConfig (`--mesh-config`): the parts a waypoint uses. `rootNamespace`,
//! `trustDomainAliases`, `accessLogFile` / `accessLogEncoding` / `accessLogFormat`, and
//! `extensionProviders` for CUSTOM AuthorizationPolicies
//! (`istio/api` `mesh/v1alpha1/config.proto`, `policy.md` 1.14). The file is the MeshConfig
//! YAML istiod reads (`/etc/istio/config/mesh`), or the `istio` ConfigMap holding it under
//! `data.mesh`. Unknown fields are ignored, as istiod ignores them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;

/// Istio's `EnvoyExternalAuthorizationHttpProvider.timeout` default.
const DEFAULT_EXT_AUTHZ_TIMEOUT: Duration = Duration::from_secs(600);

/// The MeshConfig fields this waypoint reads.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    pub root_namespace: Option<String>,
    pub trust_domain_aliases: Vec<String>,
    /// By name, in file order.
    pub extension_providers: Vec<ExtensionProvider>,
    /// `pathNormalization.normalization` (default BASE).
    pub path_normalization: policy::PathNormalization,
    /// Where and how access-log lines are written ([`AccessLogSettings`]).
    pub access_log: AccessLogSettings,
    /// The tracing settings outside Telemetry ([`TracingSettings`]).
    pub tracing: TracingSettings,
    /// `defaultProviders.metrics`; `None` when absent (Istio's chart then sets `[prometheus]`).
    pub default_metrics_providers: Option<Vec<String>>,
    /// `localityLbSetting` (enabled by default), for clusters whose DestinationRule has
    /// none.
    pub locality_lb: policy::LocalitySetting,
}

/// MeshConfig's tracing fields (istiod `configureTracingFromTelemetry`): which provider
/// applies without a Telemetry naming one, and ProxyConfig's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// `defaultProviders.tracing` (istiod uses only the first).
    pub default_providers: Vec<String>,
    /// `enableTracing` (default true). Without Telemetry and default provider Envoy gets a
    /// tracing block with no provider: no span is ever reported, so this waypoint does
    /// nothing then.
    pub enable_tracing: bool,
    /// `defaultConfig.tracing.sampling` (0 = unset: `PILOT_TRACE_SAMPLING`, 1%; above 100:
    /// 1%, as istiod clamps it).
    pub sampling: f64,
    /// `defaultConfig.tracing.maxPathTagLength` (0 = Envoy's 256).
    pub max_path_tag_length: u32,
    /// `defaultConfig.tracing.customTags`, used when Telemetry sets none.
    pub custom_tags: Vec<(String, policy::CustomTag)>,
}

impl Default for TracingSettings {
    fn default() -> TracingSettings {
        TracingSettings {
            default_providers: Vec::new(),
            enable_tracing: true,
            sampling: 1.0,
            max_path_tag_length: 0,
            custom_tags: Vec::new(),
        }
    }
}

/// A tracing extension provider (`opentelemetry` or `zipkin`).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingProvider {
    /// `[<namespace>/]<hostname>` as written.
    pub service: String,
    pub port: u16,
    /// `maxTagLength` (0: unset).
    pub max_tag_length: u32,
    pub kind: TracingProviderKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TracingProviderKind {
    /// OTLP over gRPC (`opentelemetry` without `http`): `grpc.timeout`,
    /// `grpc.initialMetadata`.
    OtlpGrpc {
        timeout: Option<Duration>,
        metadata: Vec<(HeaderName, HeaderValue)>,
    },
    /// OTLP over HTTP (`opentelemetry.http`): `path` (joined to the hostname), `timeout`,
    /// `headers`.
    OtlpHttp {
        path: String,
        timeout: Option<Duration>,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// Zipkin v2 JSON: `path` (default `/api/v2/spans`), 128-bit trace ids unless
    /// `enable64bitTraceId`, `timeout` (default 5 s, as istiod sets it), `headers`.
    Zipkin {
        path: String,
        trace_id_128: bool,
        timeout: Duration,
        headers: Vec<(HeaderName, HeaderValue)>,
        /// `traceContextOption: USE_B3_WITH_W3C_PROPAGATION`: also read and write W3C
        /// `traceparent`.
        w3c: bool,
    },
}

/// MeshConfig's access-log settings, compiled (istiod `FileAccessLogFromMeshConfig`).
///
/// Differences from Istio's Envoy, on purpose: with no access-log field in the mesh config
/// this waypoint still writes Istio's JSON line to stdout (Envoy writes no mesh-wide log
/// without `accessLogFile`; a waypoint you cannot see is harder to debug), and Telemetry
/// `accessLogging` `disabled: true` turns it off as before. As soon as any of the three
/// fields is set, Istio's rules apply: `accessLogEncoding` defaults to TEXT, an empty
/// `accessLogFormat` means Istio's default format of that encoding, and the file is
/// `accessLogFile` (`/dev/stdout` when empty).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogSettings {
    /// `/dev/stdout`, `/dev/stderr` or a file path (opened for append, created if missing).
    pub file: String,
    pub format: accesslog::LogFormat,
}

impl Default for AccessLogSettings {
    fn default() -> AccessLogSettings {
        AccessLogSettings {
            file: "/dev/stdout".into(),
            format: accesslog::LogFormat::IstioJson,
        }
    }
}

impl AccessLogSettings {
    fn parse(
        file: Option<String>,
        encoding: Option<String>,
        format: Option<String>,
    ) -> anyhow::Result<AccessLogSettings> {
        if file.is_none() && encoding.is_none() && format.is_none() {
            return Ok(AccessLogSettings::default());
        }
        let file = file
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| "/dev/stdout".into());
        let format = format.unwrap_or_default();
        let format = match encoding.as_deref().unwrap_or("TEXT") {
            "TEXT" | "" if format.is_empty() => {
                accesslog::LogFormat::text(accesslog::format::ISTIO_TEXT_FORMAT)
            }
            "TEXT" | "" => accesslog::LogFormat::text(&format),
            "JSON" if format.is_empty() => Ok(accesslog::LogFormat::IstioJson),
            "JSON" => accesslog::LogFormat::json_text(&format),
            other => anyhow::bail!("accessLogEncoding: {other:?} is not TEXT or JSON"),
        }
        .map_err(|e| anyhow::anyhow!("accessLogFormat: {e}"))?;
        Ok(AccessLogSettings { file, format })
    }

    /// Open the sink.
    pub fn output(&self) -> anyhow::Result<accesslog::format::OutputSink> {
        Ok(match self.file.as_str() {
            "/dev/stdout" => Box::new(std::io::stdout()),
            "/dev/stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("accessLogFile: cannot open {path}"))?,
            ),
        })
    }
}

/// One `extensionProviders[]` entry.
#[derive(Debug, Clone)]
pub struct ExtensionProvider {
    pub name: String,
    pub kind: ProviderKind,
}

/// What an extension provider is.
#[derive(Debug, Clone)]
pub enum ProviderKind {
    /// `envoyExtAuthzHttp`: called by CUSTOM policies on HTTP traffic.
    ExtAuthzHttp(ExtAuthzHttp),
    /// `envoyExtAuthzGrpc`: called by CUSTOM policies on HTTP traffic over gRPC.
    ExtAuthzGrpc(ExtAuthzGrpc),
    /// `envoyFileAccessLog`: an access log Telemetry `accessLogging` may select.
    FileAccessLog(FileAccessLogProvider),
    /// `opentelemetry` or `zipkin`: a tracer Telemetry `tracing` may select.
    Tracing(TracingProvider),
    /// Another type (tracing, other loggers, ...). CUSTOM policies naming it are denied as
    /// Istio denies a provider it cannot use.
    Other(String),
}

/// `envoyFileAccessLog` (istio `EnvoyFileAccessLogProvider`): `path` and `logFormat`
/// (`text`, an Envoy format string, or `labels`, a JSON format; neither: Istio's text
/// format).
#[derive(Debug, Clone, PartialEq)]
pub struct FileAccessLogProvider {
    pub path: String,
    pub format: accesslog::LogFormat,
}

/// A header name pattern of the provider lists, as istiod's `generateHeaders` builds Envoy
/// string matchers: `*x` suffix, `x*` prefix, else exact; case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl HeaderPattern {
    fn new(p: &str) -> HeaderPattern {
        let p = p.to_ascii_lowercase();
        if let Some(rest) = p.strip_prefix('*') {
            HeaderPattern::Suffix(rest.to_string())
        } else if let Some(rest) = p.strip_suffix('*') {
            HeaderPattern::Prefix(rest.to_string())
        } else {
            HeaderPattern::Exact(p)
        }
    }

    /// The pattern as written in the mesh config (`x-a`, `x-*`, `*-a`).
    pub fn text(&self) -> String {
        match self {
            HeaderPattern::Exact(v) => v.clone(),
            HeaderPattern::Prefix(v) => format!("{v}*"),
            HeaderPattern::Suffix(v) => format!("*{v}"),
        }
    }

    /// `name` is a lower-case header name (as `http::HeaderName` keeps them).
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HeaderPattern::Exact(v) => name == v,
            HeaderPattern::Prefix(v) => name.starts_with(v.as_str()),
            HeaderPattern::Suffix(v) => name.ends_with(v.as_str()),
        }
    }
}

/// Whether any pattern matches.
pub fn any_matches(patterns: &[HeaderPattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

/// `envoyExtAuthzHttp` (`EnvoyExternalAuthorizationHttpProvider`).
#[derive(Debug, Clone)]
pub struct ExtAuthzHttp {
    /// `[<Namespace>/]<Hostname>` of the authorizer's Service.
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    /// Prepended to the original path in the check request.
    pub path_prefix: String,
    /// On error (unreachable, timeout, 5xx): let the request through instead of
    /// `status_on_error`.
    pub fail_open: bool,
    /// Status of the reply on error when not failing open (`statusOnError`, default 403).
    pub status_on_error: StatusCode,
    /// Request headers copied into the check request, besides the ones Envoy always sends
    /// (`:method`, `:path`, `:authority`/Host, `authorization`).
    pub include_request_headers_in_check: Vec<HeaderPattern>,
    /// Headers set on the check request.
    pub include_additional_headers_in_check: Vec<(HeaderName, HeaderValue)>,
    /// Authorizer response headers set on the upstream request when allowed.
    pub headers_to_upstream_on_allow: Vec<HeaderPattern>,
    /// Authorizer response headers sent to the client when denied (empty: all of them).
    pub headers_to_downstream_on_deny: Vec<HeaderPattern>,
    /// Authorizer response headers added to the client response when allowed.
    pub headers_to_downstream_on_allow: Vec<HeaderPattern>,
    /// `includeRequestBodyInCheck`: the check carries the request body.
    pub body: Option<BodyInCheck>,
}

/// `includeRequestBodyInCheck` (`EnvoyExternalAuthorizationRequestBody`), rendered by istiod
/// as the ext_authz filter's `with_request_body` (`extauthz.go` `withBodyRequest`): the body is
/// held until `max_request_bytes`; the check carries it (or its first `max_request_bytes`)
/// with `x-envoy-auth-partial-body: true|false`. Over the limit without
/// `allow_partial_message`: 413 `Payload Too Large`, even with `failOpen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyInCheck {
    pub max_request_bytes: u32,
    pub allow_partial_message: bool,
    /// gRPC: the body goes in `raw_body` (bytes) instead of `body`. The HTTP provider sends
    /// the bytes as they are either way.
    pub pack_as_bytes: bool,
}

/// `envoyExtAuthzGrpc` (`EnvoyExternalAuthorizationGrpcProvider`): every request header is
/// sent (the gRPC provider has no include lists).
#[derive(Debug, Clone)]
pub struct ExtAuthzGrpc {
    /// `[<Namespace>/]<Hostname>` of the authorizer's Service.
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: StatusCode,
    /// `includeRequestBodyInCheck`: the check carries the request body.
    pub body: Option<BodyInCheck>,
}

// === serde mirror of the YAML ===

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawMesh {
    root_namespace: Option<String>,
    trust_domain_aliases: Vec<String>,
    extension_providers: Vec<RawProvider>,
    path_normalization: Option<RawPathNormalization>,
    access_log_file: Option<String>,
    access_log_encoding: Option<String>,
    access_log_format: Option<String>,
    default_providers: Option<RawDefaultProviders>,
    enable_tracing: Option<bool>,
    default_config: Option<RawProxyConfig>,
    locality_lb_setting: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawDefaultProviders {
    tracing: Vec<String>,
    metrics: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawProxyConfig {
    tracing: Option<RawProxyTracing>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawProxyTracing {
    sampling: Option<f64>,
    max_path_tag_length: Option<u32>,
    custom_tags: BTreeMap<String, policy::trace_policy::RawCustomTag>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawHttpHeader {
    name: String,
    value: Option<String>,
    env_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawOtel {
    service: String,
    port: i64,
    max_tag_length: u32,
    http: Option<RawOtelHttp>,
    grpc: Option<RawOtelGrpc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawOtelHttp {
    path: String,
    timeout: Option<String>,
    headers: Vec<RawHttpHeader>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawOtelGrpc {
    timeout: Option<String>,
    initial_metadata: Vec<RawHttpHeader>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawZipkin {
    service: String,
    port: i64,
    max_tag_length: u32,
    #[serde(rename = "enable64bitTraceId")]
    enable_64bit_trace_id: bool,
    path: String,
    timeout: Option<String>,
    headers: Vec<RawHttpHeader>,
    trace_context_option: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawPathNormalization {
    normalization: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawProvider {
    name: String,
    envoy_ext_authz_http: Option<RawExtAuthzHttp>,
    envoy_ext_authz_grpc: Option<RawExtAuthzGrpc>,
    envoy_file_access_log: Option<RawFileAccessLog>,
    opentelemetry: Option<RawOtel>,
    zipkin: Option<RawZipkin>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawExtAuthzGrpc {
    service: String,
    port: i64,
    timeout: Option<String>,
    fail_open: bool,
    status_on_error: Option<serde_json::Value>,
    clear_route_cache: bool,
    include_request_body_in_check: Option<RawBodyInCheck>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawBodyInCheck {
    max_request_bytes: Option<i64>,
    allow_partial_message: bool,
    pack_as_bytes: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawFileAccessLog {
    path: String,
    log_format: Option<RawLogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawLogFormat {
    text: Option<String>,
    labels: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawExtAuthzHttp {
    service: String,
    port: i64,
    timeout: Option<String>,
    path_prefix: String,
    fail_open: bool,
    status_on_error: Option<serde_json::Value>,
    include_request_headers_in_check: Vec<String>,
    /// Older name of `includeRequestHeadersInCheck`.
    include_headers_in_check: Vec<String>,
    include_additional_headers_in_check: BTreeMap<String, String>,
    headers_to_upstream_on_allow: Vec<String>,
    headers_to_downstream_on_deny: Vec<String>,
    headers_to_downstream_on_allow: Vec<String>,
    include_request_body_in_check: Option<RawBodyInCheck>,
}

impl MeshConfig {
    /// Read a MeshConfig file (or the `istio` ConfigMap with it under `data.mesh`).
    pub fn load(path: &Path) -> anyhow::Result<MeshConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the mesh config {}", path.display()))?;
        MeshConfig::parse(&text).with_context(|| format!("mesh config {}", path.display()))
    }

    /// Parse MeshConfig YAML; every problem is an error naming the provider and field.
    pub fn parse(text: &str) -> anyhow::Result<MeshConfig> {
        let value: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_saphyr::from_str(text).context("not valid YAML")?
        };
        // The `istio` ConfigMap form: the MeshConfig is a YAML string under `data.mesh`.
        if let Some(mesh) = value
            .get("data")
            .and_then(|d| d.get("mesh"))
            .and_then(|m| m.as_str())
        {
            return MeshConfig::parse(mesh);
        }
        let raw: RawMesh = serde_json::from_value(value).context("unexpected field type")?;
        let default_metrics_providers = raw
            .default_providers
            .as_ref()
            .and_then(|d| d.metrics.clone());
        let locality_lb = match &raw.locality_lb_setting {
            None => Default::default(),
            Some(v) => {
                policy::traffic::parse_locality_setting(v).map_err(|e| anyhow::anyhow!(e))?
            }
        };
        let mut out = MeshConfig {
            locality_lb,
            default_metrics_providers,
            root_namespace: raw.root_namespace.filter(|s| !s.is_empty()),
            trust_domain_aliases: raw.trust_domain_aliases,
            extension_providers: Vec::new(),
            access_log: AccessLogSettings::parse(
                raw.access_log_file,
                raw.access_log_encoding,
                raw.access_log_format,
            )?,
            tracing: tracing_settings(
                raw.default_providers,
                raw.enable_tracing,
                raw.default_config,
            )?,
            path_normalization: match raw.path_normalization.and_then(|p| p.normalization) {
                None => policy::PathNormalization::Base,
                Some(n) => policy::PathNormalization::parse(&n).with_context(|| {
                    format!(
                        "pathNormalization.normalization: {n:?} is not one of NONE, BASE, DEFAULT, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES"
                    )
                })?,
            },
        };
        for (i, p) in raw.extension_providers.into_iter().enumerate() {
            let at = format!("extensionProviders[{i}] ({:?})", p.name);
            if p.name.is_empty() {
                anyhow::bail!("{at}: name is required");
            }
            if out.extension_providers.iter().any(|e| e.name == p.name) {
                anyhow::bail!("{at}: duplicate provider name");
            }
            let kind = match (
                p.envoy_ext_authz_http,
                p.envoy_ext_authz_grpc,
                p.envoy_file_access_log,
            ) {
                (Some(h), _, _) => ProviderKind::ExtAuthzHttp(ext_authz_http(h).context(at)?),
                (None, Some(g), _) => ProviderKind::ExtAuthzGrpc(ext_authz_grpc(g).context(at)?),
                (None, None, Some(f)) => {
                    ProviderKind::FileAccessLog(file_access_log(f).context(at)?)
                }
                (None, None, None) => match (p.opentelemetry, p.zipkin) {
                    (Some(o), _) => ProviderKind::Tracing(otel_provider(o).context(at)?),
                    (None, Some(z)) => ProviderKind::Tracing(zipkin_provider(z).context(at)?),
                    (None, None) => {
                        ProviderKind::Other(p.other.keys().next().cloned().unwrap_or_default())
                    }
                },
            };
            out.extension_providers
                .push(ExtensionProvider { name: p.name, kind });
        }
        Ok(out)
    }

    /// The providers Telemetry `metrics` may select that produce the istio_* metrics:
    /// Prometheus-kind ones (`prometheus: {}`) and Istio's built-in `prometheus` unless the
    /// mesh config gives that name to another kind.
    pub fn metric_providers(&self) -> policy::MetricProviders {
        let mut prometheus: Vec<String> = self
            .extension_providers
            .iter()
            .filter(|p| matches!(&p.kind, ProviderKind::Other(k) if k == "prometheus"))
            .map(|p| p.name.clone())
            .collect();
        if self.provider("prometheus").is_none() {
            prometheus.push("prometheus".into());
        }
        let defaults = policy::MetricProviders::default().defaults;
        policy::MetricProviders {
            prometheus,
            defaults: self.default_metrics_providers.clone().unwrap_or(defaults),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }

    /// The `(service, port)` of every HTTP ext_authz provider (they need clusters).
    pub fn extension_services(&self) -> Vec<(String, u16)> {
        self.extension_providers
            .iter()
            .filter_map(|p| match &p.kind {
                ProviderKind::ExtAuthzHttp(h) => Some((h.service.clone(), h.port)),
                ProviderKind::ExtAuthzGrpc(g) => Some((g.service.clone(), g.port)),
                ProviderKind::Tracing(t) => Some((t.service.clone(), t.port)),
                ProviderKind::FileAccessLog(_) | ProviderKind::Other(_) => None,
            })
            .collect()
    }

    /// A tracing provider by name (istiod's `fetchProvider`: names compare case-insensitively).
    pub fn tracing_provider(&self, name: &str) -> Option<(&str, &TracingProvider)> {
        self.extension_providers
            .iter()
            .filter(|p| p.name.eq_ignore_ascii_case(name))
            .find_map(|p| match &p.kind {
                ProviderKind::Tracing(t) => Some((p.name.as_str(), t)),
                _ => None,
            })
    }
}

fn tracing_settings(
    defaults: Option<RawDefaultProviders>,
    enable: Option<bool>,
    proxy: Option<RawProxyConfig>,
) -> anyhow::Result<TracingSettings> {
    let mut out = TracingSettings {
        default_providers: defaults.map(|d| d.tracing).unwrap_or_default(),
        enable_tracing: enable.unwrap_or(true),
        ..TracingSettings::default()
    };
    if let Some(t) = proxy.and_then(|p| p.tracing) {
        // istiod `proxyConfigSamplingValue`: 0 means unset; above 100 becomes 1.
        match t.sampling {
            Some(s) if s < 0.0 => {
                anyhow::bail!("defaultConfig.tracing.sampling: {s} must not be negative")
            }
            Some(s) if s > 100.0 => out.sampling = 1.0,
            Some(s) if s > 0.0 => out.sampling = s,
            _ => {}
        }
        out.max_path_tag_length = t.max_path_tag_length.unwrap_or(0);
        for (name, tag) in t.custom_tags {
            let tag = tag
                .compile()
                .map_err(|why| anyhow::anyhow!("defaultConfig.tracing.customTags.{name}: {why}"))?;
            out.custom_tags.push((name, tag));
        }
    }
    Ok(out)
}

/// Headers for a provider (`name` with `value`, or the value of environment variable
/// `envName`, as istiod's `getHeaderValue` reads it).
fn provider_headers(
    list: Vec<RawHttpHeader>,
    what: &str,
) -> anyhow::Result<Vec<(HeaderName, HeaderValue)>> {
    list.into_iter()
        .enumerate()
        .map(|(i, h)| {
            let value = match (h.value, h.env_name) {
                (Some(v), _) => v,
                (None, Some(env)) => std::env::var(env).unwrap_or_default(),
                (None, None) => String::new(),
            };
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .with_context(|| format!("{what}[{i}].name: {:?} is not a header name", h.name))?;
            let value = HeaderValue::from_str(&value)
                .with_context(|| format!("{what}[{i}]: the value is not a valid header value"))?;
            Ok((name, value))
        })
        .collect()
}

fn provider_port(port: i64, what: &str) -> anyhow::Result<u16> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("{what}.port: {port} is not a port"))
}

fn otel_provider(o: RawOtel) -> anyhow::Result<TracingProvider> {
    if o.service.is_empty() {
        anyhow::bail!("opentelemetry.service is required");
    }
    let port = provider_port(o.port, "opentelemetry")?;
    let timeout = |t: Option<String>, what: &str| -> anyhow::Result<Option<Duration>> {
        t.map(|t| parse_duration(&t).with_context(|| format!("{what}: {t:?} is not a duration")))
            .transpose()
    };
    let kind = match o.http {
        Some(h) => TracingProviderKind::OtlpHttp {
            path: if h.path.starts_with('/') || h.path.is_empty() {
                h.path
            } else {
                format!("/{}", h.path)
            },
            timeout: timeout(h.timeout, "opentelemetry.http.timeout")?,
            headers: provider_headers(h.headers, "opentelemetry.http.headers")?,
        },
        None => {
            let g = o.grpc.unwrap_or_default();
            TracingProviderKind::OtlpGrpc {
                timeout: timeout(g.timeout, "opentelemetry.grpc.timeout")?,
                metadata: provider_headers(
                    g.initial_metadata,
                    "opentelemetry.grpc.initialMetadata",
                )?,
            }
        }
    };
    Ok(TracingProvider {
        service: o.service,
        port,
        max_tag_length: o.max_tag_length,
        kind,
    })
}

fn zipkin_provider(z: RawZipkin) -> anyhow::Result<TracingProvider> {
    if z.service.is_empty() {
        anyhow::bail!("zipkin.service is required");
    }
    let port = provider_port(z.port, "zipkin")?;
    let timeout = match z.timeout {
        Some(t) => parse_duration(&t)
            .with_context(|| format!("zipkin.timeout: {t:?} is not a duration"))?,
        None => Duration::from_secs(5),
    };
    let w3c = match z.trace_context_option.as_deref() {
        None | Some("USE_B3") | Some("") => false,
        Some("USE_B3_WITH_W3C_PROPAGATION") => true,
        Some(other) => anyhow::bail!(
            "zipkin.traceContextOption: {other:?} is not USE_B3 or USE_B3_WITH_W3C_PROPAGATION"
        ),
    };
    Ok(TracingProvider {
        service: z.service,
        port,
        max_tag_length: z.max_tag_length,
        kind: TracingProviderKind::Zipkin {
            path: if z.path.is_empty() {
                "/api/v2/spans".into()
            } else {
                z.path
            },
            trace_id_128: !z.enable_64bit_trace_id,
            timeout,
            headers: provider_headers(z.headers, "zipkin.headers")?,
            w3c,
        },
    })
}

fn file_access_log(f: RawFileAccessLog) -> anyhow::Result<FileAccessLogProvider> {
    if f.path.is_empty() {
        anyhow::bail!("envoyFileAccessLog.path is required");
    }
    let format = match f.log_format {
        Some(RawLogFormat {
            text: Some(t),
            labels: None,
        }) if !t.is_empty() => accesslog::LogFormat::text(&t),
        Some(RawLogFormat {
            labels: Some(l), ..
        }) => accesslog::LogFormat::json(&l),
        _ => accesslog::LogFormat::text(accesslog::format::ISTIO_TEXT_FORMAT),
    }
    .map_err(|e| anyhow::anyhow!("envoyFileAccessLog.logFormat: {e}"))?;
    Ok(FileAccessLogProvider {
        path: f.path,
        format,
    })
}

impl MeshConfig {
    /// The `envoyFileAccessLog` providers, by name.
    pub fn file_log_providers(&self) -> Vec<(String, FileAccessLogProvider)> {
        self.extension_providers
            .iter()
            .filter_map(|p| match &p.kind {
                ProviderKind::FileAccessLog(f) => Some((p.name.clone(), f.clone())),
                _ => None,
            })
            .collect()
    }
}

impl FileAccessLogProvider {
    /// Open its file (`/dev/stdout`, `/dev/stderr` or a path, appended).
    pub fn logger(&self) -> anyhow::Result<accesslog::AccessLogger> {
        let settings = AccessLogSettings {
            file: self.path.clone(),
            format: self.format.clone(),
        };
        Ok(accesslog::AccessLogger::spawn_with(accesslog::Output::new(
            self.format.clone(),
            settings.output()?,
        )))
    }
}

fn ext_authz_grpc(g: RawExtAuthzGrpc) -> anyhow::Result<ExtAuthzGrpc> {
    if g.service.is_empty() {
        anyhow::bail!("envoyExtAuthzGrpc.service is required");
    }
    let port = u16::try_from(g.port)
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("envoyExtAuthzGrpc.port: {} is not a port", g.port))?;
    let timeout = match g.timeout.as_deref() {
        None | Some("") => DEFAULT_EXT_AUTHZ_TIMEOUT,
        Some(t) => parse_duration(t)
            .with_context(|| format!("envoyExtAuthzGrpc.timeout: invalid duration {t:?}"))?,
    };
    let status_on_error = status_on_error(&g.status_on_error, "envoyExtAuthzGrpc")?;
    let body = body_in_check(g.include_request_body_in_check, "envoyExtAuthzGrpc")?;
    // clearRouteCache: routes are chosen before the check here, as Envoy's are unless the
    // cache is cleared; header changes by the authorizer do not re-route.
    let _ = g.clear_route_cache;
    Ok(ExtAuthzGrpc {
        service: g.service,
        port,
        timeout,
        fail_open: g.fail_open,
        status_on_error,
        body,
    })
}

/// `includeRequestBodyInCheck`: `maxRequestBytes` is required and positive (Envoy's
/// `BufferSettings.max_request_bytes` is validated `gt: 0`; istiod passes it through, so a
/// missing or zero value is a config Envoy rejects).
fn body_in_check(raw: Option<RawBodyInCheck>, what: &str) -> anyhow::Result<Option<BodyInCheck>> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let max = raw.max_request_bytes.unwrap_or(0);
    let max_request_bytes = u32::try_from(max)
        .ok()
        .filter(|m| *m > 0)
        .with_context(|| {
            format!(
                "{what}.includeRequestBodyInCheck.maxRequestBytes: {max} is not a byte count above 0 (Envoy rejects a missing or zero limit)"
            )
        })?;
    Ok(Some(BodyInCheck {
        max_request_bytes,
        allow_partial_message: raw.allow_partial_message,
        pack_as_bytes: raw.pack_as_bytes,
    }))
}

/// `statusOnError`: a string in the API ("403"); a number is accepted too.
fn status_on_error(v: &Option<serde_json::Value>, what: &str) -> anyhow::Result<StatusCode> {
    let Some(v) = v else {
        return Ok(StatusCode::FORBIDDEN);
    };
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.is_empty() {
        return Ok(StatusCode::FORBIDDEN);
    }
    s.parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .with_context(|| format!("{what}.statusOnError: {s:?} is not a status code"))
}

fn ext_authz_http(h: RawExtAuthzHttp) -> anyhow::Result<ExtAuthzHttp> {
    if h.service.is_empty() {
        anyhow::bail!("envoyExtAuthzHttp.service is required");
    }
    let port = u16::try_from(h.port)
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("envoyExtAuthzHttp.port: {} is not a port", h.port))?;
    let timeout = match h.timeout.as_deref() {
        None | Some("") => DEFAULT_EXT_AUTHZ_TIMEOUT,
        Some(t) => parse_duration(t)
            .with_context(|| format!("envoyExtAuthzHttp.timeout: invalid duration {t:?}"))?,
    };
    if !h.path_prefix.is_empty() && !h.path_prefix.starts_with('/') {
        anyhow::bail!("envoyExtAuthzHttp.pathPrefix must start with '/'");
    }
    let status_on_error = status_on_error(&h.status_on_error, "envoyExtAuthzHttp")?;
    let body = body_in_check(h.include_request_body_in_check, "envoyExtAuthzHttp")?;
    let patterns = |v: &[String]| v.iter().map(|p| HeaderPattern::new(p)).collect::<Vec<_>>();
    let mut additional = Vec::new();
    for (k, v) in &h.include_additional_headers_in_check {
        let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
            .with_context(|| format!("includeAdditionalHeadersInCheck: bad header name {k:?}"))?;
        let value = HeaderValue::from_str(v)
            .with_context(|| format!("includeAdditionalHeadersInCheck: bad value for {k:?}"))?;
        additional.push((name, value));
    }
    let mut include = patterns(&h.include_request_headers_in_check);
    include.extend(patterns(&h.include_headers_in_check));
    Ok(ExtAuthzHttp {
        service: h.service,
        port,
        timeout,
        path_prefix: h.path_prefix,
        fail_open: h.fail_open,
        status_on_error,
        include_request_headers_in_check: include,
        include_additional_headers_in_check: additional,
        headers_to_upstream_on_allow: patterns(&h.headers_to_upstream_on_allow),
        headers_to_downstream_on_deny: patterns(&h.headers_to_downstream_on_deny),
        headers_to_downstream_on_allow: patterns(&h.headers_to_downstream_on_allow),
        body,
    })
}

/// A protobuf `Duration` as written in YAML (`1s`, `0.5s`) or a humantime one (`500ms`).
fn parse_duration(s: &str) -> Option<Duration> {
    // humantime checks its own range (`1h`, `2m`): overflow is an error, never a panic.
    policy::duration::parse_proto_duration(s).or_else(|| humantime::parse_duration(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_providers_with_istio_defaults() {
        let m = MeshConfig::parse(
            "rootNamespace: istio-system\nextensionProviders:\n- name: ext\n  envoyExtAuthzHttp:\n    service: ext-authz.foo.svc.cluster.local\n    port: 8000\n    timeout: 0.5s\n    headersToDownstreamOnDeny: [x-reason, \"x-ext-*\"]\n- name: grpc\n  envoyExtAuthzGrpc: {service: g, port: 9000}\n",
        )
        .expect("parses");
        let ProviderKind::ExtAuthzHttp(h) = &m.provider("ext").expect("ext").kind else {
            panic!("http provider")
        };
        assert_eq!(h.timeout, Duration::from_millis(500));
        assert_eq!(h.status_on_error, StatusCode::FORBIDDEN);
        assert!(!h.fail_open);
        assert!(any_matches(&h.headers_to_downstream_on_deny, "x-ext-code"));
        assert!(!any_matches(&h.headers_to_downstream_on_deny, "x-other"));
        assert!(
            matches!(m.provider("grpc").expect("grpc").kind, ProviderKind::ExtAuthzGrpc(ref g) if g.port == 9000 && g.service == "g")
        );
        assert_eq!(
            m.extension_services(),
            vec![
                ("ext-authz.foo.svc.cluster.local".to_string(), 8000),
                ("g".to_string(), 9000)
            ]
        );
        // includeRequestBodyInCheck, as istiod passes it to Envoy's `with_request_body`.
        let b = MeshConfig::parse(
            "extensionProviders:\n- name: b\n  envoyExtAuthzHttp: {service: s, port: 80, includeRequestBodyInCheck: {maxRequestBytes: 4096, allowPartialMessage: true}}\n",
        )
        .expect("body");
        let ProviderKind::ExtAuthzHttp(h) = &b.provider("b").expect("b").kind else {
            panic!("http provider")
        };
        assert_eq!(
            h.body,
            Some(BodyInCheck {
                max_request_bytes: 4096,
                allow_partial_message: true,
                pack_as_bytes: false
            })
        );
        // The ConfigMap form.
        let cm = MeshConfig::parse(
            "apiVersion: v1\nkind: ConfigMap\ndata:\n  mesh: |\n    rootNamespace: other\n",
        )
        .expect("cm");
        assert_eq!(cm.root_namespace.as_deref(), Some("other"));
        assert!(
            MeshConfig::parse("extensionProviders: [{name: x, envoyExtAuthzHttp: {service: s}}]")
                .is_err()
        );
    }

    #[test]
    fn access_log_settings_follow_istio_once_any_is_set() {
        use accesslog::LogFormat;
        let parse = |yaml: &str| MeshConfig::parse(yaml).map(|m| m.access_log);
        // Nothing set: our default, Istio's JSON line on stdout.
        assert_eq!(
            parse("rootNamespace: x").unwrap(),
            AccessLogSettings::default()
        );
        // accessLogFile alone: Istio's TEXT default format (istiod's default encoding).
        let s = parse("accessLogFile: /dev/stdout").unwrap();
        assert_eq!(
            s.format,
            LogFormat::text(accesslog::format::ISTIO_TEXT_FORMAT).unwrap()
        );
        // JSON without a format: Istio's JSON line.
        let s = parse("accessLogFile: /tmp/x.log\naccessLogEncoding: JSON").unwrap();
        assert_eq!(
            (s.file.as_str(), s.format),
            ("/tmp/x.log", LogFormat::IstioJson)
        );
        // A format: compiled for its encoding (TEXT gets the newline Istio appends).
        let s = parse("accessLogFormat: '%RESPONSE_CODE% %REQ(X-TENANT)%'").unwrap();
        assert_eq!(
            s.format,
            LogFormat::text("%RESPONSE_CODE% %REQ(X-TENANT)%\n").unwrap()
        );
        assert_eq!(s.file, "/dev/stdout");
        let s =
            parse("accessLogEncoding: JSON\naccessLogFormat: '{\"code\": \"%RESPONSE_CODE%\"}'")
                .unwrap();
        assert!(matches!(s.format, LogFormat::Json(_)));
        // Errors name the field and the operator.
        let e = format!(
            "{:#}",
            parse("accessLogFormat: '%GRPC_STATUS%'").unwrap_err()
        );
        assert!(
            e.contains("accessLogFormat") && e.contains("%GRPC_STATUS%"),
            "{e}"
        );
        let e = format!("{:#}", parse("accessLogEncoding: XML").unwrap_err());
        assert!(e.contains("accessLogEncoding"), "{e}");
    }
}
