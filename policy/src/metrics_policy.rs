//! # Istio Telemetry `metrics` for a waypoint: which istio_* metrics are kept, with which tags
//!
//! Contract:
//! - Attachment and levels are those of access logging ([`crate::telemetry`]). Each applicable
//!   Telemetry's `metrics[]` entries are applied in order, least specific first, exactly as
//!   istiod's `mergeMetrics` normalises them (`pilot/pkg/model/telemetry.go`):
//!   - `providers` names the providers an entry applies to (none: the previous entry's, the
//!     first entry inherits MeshConfig `defaultProviders.metrics`); the providers in scope
//!     are the last non-empty list. Only Prometheus-kind providers produce metrics here
//!     (`prometheus`, Istio's built-in, or a MeshConfig `extensionProviders[].prometheus`);
//!     with none in scope every metric is off, as istiod then adds no stats filter.
//!   - `overrides[]` in order, later wins: `disabled` replaces a metric's drop flag, each
//!     `tagOverrides` key replaces that tag's rule; `match.metric: ALL_METRICS` (or no match)
//!     applies to every metric, and `disabled: true` on it turns every metric off until a
//!     later override for that mode turns them back on (istiod's `disabledAllMetricsProviders`).
//!   - A waypoint's stats filter is the server side (istiod builds waypoint filters with
//!     `ListenerClassSidecarInbound`, whose `ServerMetrics` it reads): overrides with
//!     `match.mode: CLIENT` do not apply.
//! - Tag rules as Istio's stats filter applies them (Envoy contrib `istio_stats.cc`):
//!   `REMOVE` drops a standard tag (a non-standard one is ignored), `UPSERT` replaces a
//!   standard tag's value in place or appends a new tag (new tags in name order), the value
//!   being a CEL expression over Envoy's attributes; an expression that fails at run time
//!   gives `unknown`. A CEL syntax error is a [`ConfigError`] naming the field (Envoy only
//!   logs it and drops the tag, which a user never sees).
//! - `customMetric` matches name metrics this waypoint does not define (Istio defines them
//!   only through stats `definitions` in EnvoyFilters): warned about and ignored.
//! - Bounds: a tag value is cut to [`MAX_TAG_VALUE`] bytes (a header-derived value is the
//!   client's); the number of series is bounded by the proxy (its metrics table).
//! - Pure: no I/O; never panics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cel::{Program, Value as CelValue};
use serde::Deserialize;
use serde_json::Value;

use crate::ConfigError;
use crate::resources::Telemetry;
use crate::telemetry::LogAttributes;

/// The longest tag value kept from an expression (longer values are cut at a character
/// boundary): a request header can be 60 KiB, and every distinct value is a series.
pub const MAX_TAG_VALUE: usize = 256;

/// Istio's standard metrics (`MetricSelector.IstioMetric`), as a waypoint reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IstioMetric {
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    TcpOpenedConnections,
    TcpClosedConnections,
    TcpSentBytes,
    TcpReceivedBytes,
    GrpcRequestMessages,
    GrpcResponseMessages,
}

impl IstioMetric {
    pub const ALL: [IstioMetric; 10] = [
        IstioMetric::RequestCount,
        IstioMetric::RequestDuration,
        IstioMetric::RequestSize,
        IstioMetric::ResponseSize,
        IstioMetric::TcpOpenedConnections,
        IstioMetric::TcpClosedConnections,
        IstioMetric::TcpSentBytes,
        IstioMetric::TcpReceivedBytes,
        IstioMetric::GrpcRequestMessages,
        IstioMetric::GrpcResponseMessages,
    ];

    /// The enum name Telemetry uses (`REQUEST_COUNT`).
    pub fn api_name(self) -> &'static str {
        match self {
            IstioMetric::RequestCount => "REQUEST_COUNT",
            IstioMetric::RequestDuration => "REQUEST_DURATION",
            IstioMetric::RequestSize => "REQUEST_SIZE",
            IstioMetric::ResponseSize => "RESPONSE_SIZE",
            IstioMetric::TcpOpenedConnections => "TCP_OPENED_CONNECTIONS",
            IstioMetric::TcpClosedConnections => "TCP_CLOSED_CONNECTIONS",
            IstioMetric::TcpSentBytes => "TCP_SENT_BYTES",
            IstioMetric::TcpReceivedBytes => "TCP_RECEIVED_BYTES",
            IstioMetric::GrpcRequestMessages => "GRPC_REQUEST_MESSAGES",
            IstioMetric::GrpcResponseMessages => "GRPC_RESPONSE_MESSAGES",
        }
    }

    /// The Prometheus name (istiod `metricToPrometheusMetric` with the `istio_` prefix).
    pub fn prometheus_name(self) -> &'static str {
        match self {
            IstioMetric::RequestCount => "istio_requests_total",
            IstioMetric::RequestDuration => "istio_request_duration_milliseconds",
            IstioMetric::RequestSize => "istio_request_bytes",
            IstioMetric::ResponseSize => "istio_response_bytes",
            IstioMetric::TcpOpenedConnections => "istio_tcp_connections_opened_total",
            IstioMetric::TcpClosedConnections => "istio_tcp_connections_closed_total",
            IstioMetric::TcpSentBytes => "istio_tcp_sent_bytes_total",
            IstioMetric::TcpReceivedBytes => "istio_tcp_received_bytes_total",
            IstioMetric::GrpcRequestMessages => "istio_request_messages_total",
            IstioMetric::GrpcResponseMessages => "istio_response_messages_total",
        }
    }

    fn from_api_name(s: &str) -> Option<IstioMetric> {
        IstioMetric::ALL.into_iter().find(|m| m.api_name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What happens to one tag of one metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagRule {
    /// `REMOVE`: the tag is not written.
    Remove,
    /// `UPSERT`: the value of expression `i` of [`MetricsSpec::expressions`].
    Set(usize),
}

/// The overrides of one metric.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricRule {
    /// `disabled: true`: the metric is not reported.
    pub drop: bool,
    /// By tag name (sorted: new tags are appended in this order, as Envoy does).
    pub tags: Vec<(String, TagRule)>,
}

/// A compiled tag value expression.
pub struct MetricExpression {
    pub text: String,
    program: Program,
}

impl std::fmt::Debug for MetricExpression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Telemetry `metrics` merged for one Service's traffic through this waypoint.
#[derive(Debug)]
pub struct MetricsSpec {
    /// A hash of what the spec does (rules, expressions): series counted under it are told
    /// apart by it, and a recompiled snapshot with the same overrides counts into the same
    /// series instead of starting new ones.
    pub id: u64,
    /// `Telemetry ns/name` of each contributing Telemetry, least specific first.
    pub sources: Vec<String>,
    /// Every metric is off (no Prometheus provider in scope, or `ALL_METRICS` disabled).
    pub disabled: bool,
    /// Indexed like [`IstioMetric::ALL`].
    pub rules: [MetricRule; 10],
    /// Distinct `UPSERT` expressions; a request evaluates each once.
    pub expressions: Vec<MetricExpression>,
    /// An expression reads `request.headers`: the data path keeps the request headers.
    pub needs_headers: bool,
    /// `reportingInterval` of the last entry setting it (periodic reports of long streams).
    pub reporting_interval: Option<Duration>,
}

impl MetricsSpec {
    pub fn rule(&self, m: IstioMetric) -> &MetricRule {
        &self.rules[m.index()]
    }

    /// The value of every expression for one request: a failed evaluation gives Envoy's
    /// `unknown`, values longer than [`MAX_TAG_VALUE`] are cut.
    pub fn evaluate(&self, attrs: &LogAttributes<'_>) -> Box<[Box<str>]> {
        if self.expressions.is_empty() {
            return Box::default();
        }
        let ctx = crate::telemetry::context(attrs);
        self.expressions
            .iter()
            .map(|e| {
                let mut v = match e.program.execute(&ctx) {
                    Ok(v) => print(&v),
                    Err(_) => "unknown".to_string(),
                };
                if v.len() > MAX_TAG_VALUE {
                    let mut cut = MAX_TAG_VALUE;
                    while !v.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    v.truncate(cut);
                }
                v.into_boxed_str()
            })
            .collect()
    }
}

/// A CEL value as Envoy's `Expr::print` writes it into a tag.
fn print(v: &CelValue) -> String {
    match v {
        CelValue::String(s) => s.to_string(),
        CelValue::Int(i) => i.to_string(),
        CelValue::UInt(u) => u.to_string(),
        CelValue::Float(f) => f.to_string(),
        CelValue::Bool(b) => b.to_string(),
        CelValue::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        CelValue::Null => "NULL".into(),
        _ => "unexpected".into(),
    }
}

/// The metrics a Service's traffic reports under Telemetry; cheap to clone. The default (no
/// Telemetry `metrics`, or nothing changed) reports every metric with Istio's tags.
#[derive(Debug, Clone, Default)]
pub struct MetricsPolicy(pub Option<Arc<MetricsSpec>>);

impl MetricsPolicy {
    pub fn is_default(&self) -> bool {
        self.0.is_none()
    }

    pub fn spec(&self) -> Option<&Arc<MetricsSpec>> {
        self.0.as_ref()
    }

    /// Every metric is off.
    pub fn is_disabled(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.disabled)
    }

    /// `m` is reported (not disabled, not dropped).
    pub fn reports(&self, m: IstioMetric) -> bool {
        match &self.0 {
            None => true,
            Some(s) => !s.disabled && !s.rule(m).drop,
        }
    }

    pub fn needs_request_headers(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.needs_headers)
    }
    /// The policy one Telemetry's `spec.metrics` (`metrics`, as JSON) gives on its own, as
    /// if it were mesh-wide; its errors as [`crate::compile`] reports them.
    pub fn from_spec(
        metrics: Value,
        providers: &MetricProviders,
    ) -> Result<MetricsPolicy, Vec<ConfigError>> {
        let t = Telemetry {
            metadata: crate::resources::ObjectMeta {
                name: "metrics".into(),
                namespace: "istio-system".into(),
                ..Default::default()
            },
            spec: crate::resources::TelemetrySpec {
                metrics: Some(metrics),
                ..Default::default()
            },
        };
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let entries = compile_metrics(&t, &mut errors, &mut warnings);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(merge(
            entries
                .iter()
                .map(|e| ("Telemetry istio-system/metrics", e)),
            providers,
        ))
    }
}

/// Which MeshConfig providers count for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricProviders {
    /// Names of Prometheus-kind providers (`prometheus` is Istio's built-in one).
    pub prometheus: Vec<String>,
    /// MeshConfig `defaultProviders.metrics` (Istio's chart sets `[prometheus]`).
    pub defaults: Vec<String>,
}

impl Default for MetricProviders {
    fn default() -> Self {
        MetricProviders {
            prometheus: vec!["prometheus".into()],
            defaults: vec!["prometheus".into()],
        }
    }
}

/// One `metrics[]` entry, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct MetricsEntry {
    providers: Vec<String>,
    overrides: Vec<OverrideEntry>,
    reporting_interval: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
struct OverrideEntry {
    /// `match.mode: CLIENT`: not for a waypoint.
    client_only: bool,
    /// No match, or `ALL_METRICS`.
    all: bool,
    /// The metrics matched (empty for a `customMetric`).
    metrics: Vec<IstioMetric>,
    disabled: Option<bool>,
    /// (tag, `None` = REMOVE, `Some(expr)` = UPSERT).
    tags: Vec<(String, Option<String>)>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawMetrics {
    providers: Vec<RawProviderRef>,
    overrides: Vec<RawOverride>,
    reporting_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProviderRef {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawOverride {
    #[serde(rename = "match")]
    matcher: Option<RawSelector>,
    disabled: Option<bool>,
    tag_overrides: BTreeMap<String, RawTagOverride>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawSelector {
    metric: Option<String>,
    custom_metric: Option<String>,
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTagOverride {
    operation: Option<String>,
    value: Option<String>,
}

/// Parse and validate one Telemetry's `spec.metrics`; `None` when it has none.
pub(crate) fn compile_metrics(
    t: &Telemetry,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Option<Arc<[MetricsEntry]>> {
    let entries: Vec<(String, RawMetrics)> =
        crate::telemetry::section_entries(t, "metrics", t.spec.metrics.as_ref(), errors)?;
    let error =
        |field: String, message: String| crate::telemetry::telemetry_error(t, field, message);
    let mut out = Vec::new();
    for (field, raw) in entries {
        let mut bad = false;
        for (j, p) in raw.providers.iter().enumerate() {
            if p.name.is_empty() {
                errors.push(error(
                    format!("{field}.providers[{j}].name"),
                    "may not be empty".into(),
                ));
                bad = true;
            }
        }
        let reporting_interval = match raw.reporting_interval.as_deref() {
            None => None,
            Some(s) => match crate::duration::parse_proto_duration(s) {
                Some(d) if !d.is_zero() => Some(d),
                _ => {
                    errors.push(error(
                        format!("{field}.reportingInterval"),
                        format!("{s:?} is not a positive duration (`5s`)"),
                    ));
                    bad = true;
                    None
                }
            },
        };
        let mut overrides = Vec::new();
        for (j, o) in raw.overrides.into_iter().enumerate() {
            let field = format!("{field}.overrides[{j}]");
            match compile_override(o, &field, warnings, &mut |f, m| errors.push(error(f, m))) {
                Some(o) => overrides.push(o),
                None => bad = true,
            }
        }
        if bad {
            continue;
        }
        out.push(MetricsEntry {
            providers: raw.providers.into_iter().map(|p| p.name).collect(),
            overrides,
            reporting_interval,
        });
    }
    Some(out.into())
}

fn compile_override(
    o: RawOverride,
    field: &str,
    warnings: &mut Vec<String>,
    error: &mut dyn FnMut(String, String),
) -> Option<OverrideEntry> {
    let mut ok = true;
    let m = o.matcher.unwrap_or_default();
    let client_only = match m.mode.as_deref() {
        None | Some("CLIENT_AND_SERVER") | Some("SERVER") => false,
        Some("CLIENT") => true,
        Some(other) => {
            error(
                format!("{field}.match.mode"),
                format!("{other:?} is not CLIENT_AND_SERVER, CLIENT or SERVER"),
            );
            ok = false;
            false
        }
    };
    let (all, metrics) = match (m.metric.as_deref(), m.custom_metric.as_deref()) {
        (Some(_), Some(_)) => {
            error(
                format!("{field}.match"),
                "metric and customMetric are one of: set only one".into(),
            );
            return None;
        }
        (None, Some("")) => {
            error(
                format!("{field}.match.customMetric"),
                "may not be empty".into(),
            );
            return None;
        }
        (None, Some(custom)) => {
            warnings.push(format!(
                "{field}.match.customMetric {custom:?}: this waypoint defines no custom metrics; override ignored"
            ));
            (false, Vec::new())
        }
        (None | Some("ALL_METRICS"), None) => (true, IstioMetric::ALL.to_vec()),
        (Some(name), None) => match IstioMetric::from_api_name(name) {
            Some(metric) => (false, vec![metric]),
            None => {
                error(
                    format!("{field}.match.metric"),
                    format!(
                        "{name:?} is not an Istio metric (ALL_METRICS, {})",
                        IstioMetric::ALL.map(IstioMetric::api_name).join(", ")
                    ),
                );
                return None;
            }
        },
    };
    let mut tags = Vec::new();
    for (tag, t) in o.tag_overrides {
        let tfield = format!("{field}.tagOverrides.{tag}");
        if tag.is_empty() {
            error(
                format!("{field}.tagOverrides"),
                "a tag name may not be empty".into(),
            );
            ok = false;
            continue;
        }
        match (t.operation.as_deref().unwrap_or("UPSERT"), t.value) {
            ("UPSERT", Some(v)) if !v.is_empty() => {
                if let Err(e) = Program::compile(&v) {
                    error(
                        format!("{tfield}.value"),
                        format!("invalid CEL expression {v:?}: {}", e.to_string().trim()),
                    );
                    ok = false;
                    continue;
                }
                tags.push((tag, Some(v)));
            }
            ("UPSERT", _) => {
                error(
                    format!("{tfield}.value"),
                    "must be set when operation is UPSERT".into(),
                );
                ok = false;
            }
            ("REMOVE", None) => tags.push((tag, None)),
            ("REMOVE", Some(v)) if v.is_empty() => tags.push((tag, None)),
            ("REMOVE", Some(_)) => {
                error(
                    format!("{tfield}.value"),
                    "may only be set when operation is UPSERT".into(),
                );
                ok = false;
            }
            (other, _) => {
                error(
                    format!("{tfield}.operation"),
                    format!("{other:?} is not UPSERT or REMOVE"),
                );
                ok = false;
            }
        }
    }
    ok.then_some(OverrideEntry {
        client_only,
        all,
        metrics,
        disabled: o.disabled,
        tags,
    })
}

/// Merge the entries of each applicable Telemetry, least specific first (istiod
/// `mergeMetrics`, server side).
pub(crate) fn merge<'a>(
    levels: impl Iterator<Item = (&'a str, &'a Arc<[MetricsEntry]>)>,
    providers: &MetricProviders,
) -> MetricsPolicy {
    let levels: Vec<(&str, &Arc<[MetricsEntry]>)> = levels.collect();
    if levels.is_empty() {
        return MetricsPolicy::default();
    }
    let entries = || levels.iter().flat_map(|(_, e)| e.iter());
    let in_scope: &[String] = entries()
        .rfind(|e| !e.providers.is_empty())
        .map_or(&providers.defaults, |e| &e.providers);
    let counts = |names: &[String]| {
        names
            .iter()
            .any(|n| in_scope.contains(n) && providers.prometheus.contains(n))
    };
    let mut parent: &[String] = &providers.defaults;
    let mut disabled_all = false;
    let mut rules: Vec<(bool, BTreeMap<String, Option<String>>)> =
        vec![(false, BTreeMap::new()); IstioMetric::ALL.len()];
    let mut interval = None;
    for e in entries() {
        let names: &[String] = if e.providers.is_empty() {
            parent
        } else {
            &e.providers
        };
        parent = names;
        if !counts(names) {
            continue;
        }
        if e.reporting_interval.is_some() {
            interval = e.reporting_interval;
        }
        for o in e.overrides.iter().filter(|o| !o.client_only) {
            if o.all && o.disabled == Some(true) {
                disabled_all = true;
                continue;
            }
            // istiod: any other override for this mode turns the metrics back on.
            disabled_all = false;
            for m in &o.metrics {
                let rule = &mut rules[m.index()];
                if let Some(d) = o.disabled {
                    rule.0 = d;
                }
                for (tag, v) in &o.tags {
                    rule.1.insert(tag.clone(), v.clone());
                }
            }
        }
    }
    let disabled = disabled_all || !counts(in_scope);
    if !disabled && interval.is_none() && rules.iter().all(|(d, t)| !d && t.is_empty()) {
        return MetricsPolicy::default();
    }
    let mut expressions: Vec<MetricExpression> = Vec::new();
    let mut compiled: [MetricRule; 10] = Default::default();
    for (slot, (drop, tags)) in compiled.iter_mut().zip(rules) {
        slot.drop = drop;
        for (tag, v) in tags {
            let rule = match v {
                None => TagRule::Remove,
                Some(text) => match expressions.iter().position(|e| e.text == text) {
                    Some(i) => TagRule::Set(i),
                    None => match Program::compile(&text) {
                        Ok(program) => {
                            expressions.push(MetricExpression { text, program });
                            TagRule::Set(expressions.len() - 1)
                        }
                        // Checked when the entry was compiled.
                        Err(_) => continue,
                    },
                },
            };
            slot.tags.push((tag, rule));
        }
    }
    let needs_headers = expressions.iter().any(|e| e.text.contains("headers"));
    let id = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        disabled.hash(&mut h);
        for r in &compiled {
            r.drop.hash(&mut h);
            for (tag, rule) in &r.tags {
                tag.hash(&mut h);
                match rule {
                    TagRule::Remove => h.write_u8(0),
                    TagRule::Set(i) => expressions[*i].text.hash(&mut h),
                }
            }
            h.write_u8(0xff);
        }
        h.finish()
    };
    MetricsPolicy(Some(Arc::new(MetricsSpec {
        id,
        sources: levels.iter().map(|(s, _)| s.to_string()).collect(),
        disabled,
        rules: compiled,
        expressions,
        needs_headers,
        reporting_interval: interval,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{ObjectMeta, TelemetrySpec};

    fn telemetry(metrics: serde_json::Value) -> Telemetry {
        Telemetry {
            metadata: ObjectMeta {
                name: "t".into(),
                namespace: "istio-system".into(),
                ..Default::default()
            },
            spec: TelemetrySpec {
                metrics: Some(metrics),
                ..Default::default()
            },
        }
    }

    fn entries(v: serde_json::Value) -> Arc<[MetricsEntry]> {
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let e = compile_metrics(&telemetry(v), &mut errors, &mut warnings).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        e
    }

    fn merged(levels: &[Arc<[MetricsEntry]>]) -> MetricsPolicy {
        merge(
            levels.iter().map(|e| ("Telemetry x/y", e)),
            &MetricProviders::default(),
        )
    }

    #[test]
    fn overrides_merge_in_order_and_skip_client_mode() {
        let mesh = entries(serde_json::json!([{
            "providers": [{"name": "prometheus"}],
            "overrides": [
                {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {
                    "request_protocol": {"operation": "REMOVE"},
                    "request_host": {"value": "request.host"}}},
                {"match": {"metric": "REQUEST_DURATION", "mode": "CLIENT"}, "disabled": true}
            ]
        }]));
        let ns = entries(serde_json::json!([{
            "overrides": [
                {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {
                    "request_host": {"value": "request.method"}}},
                {"match": {"metric": "REQUEST_SIZE"}, "disabled": true}
            ]
        }]));
        let p = merged(&[mesh, ns]);
        let spec = p.spec().unwrap();
        assert!(!spec.disabled);
        let count = spec.rule(IstioMetric::RequestCount);
        assert_eq!(
            count.tags,
            vec![
                ("request_host".to_string(), TagRule::Set(0)),
                ("request_protocol".to_string(), TagRule::Remove)
            ]
        );
        assert_eq!(spec.expressions.len(), 1);
        assert_eq!(spec.expressions[0].text, "request.method");
        assert!(
            p.reports(IstioMetric::RequestDuration),
            "CLIENT mode skipped"
        );
        assert!(!p.reports(IstioMetric::RequestSize));
        assert_eq!(spec.sources.len(), 2);
    }

    #[test]
    fn all_metrics_disabled_then_enabled_again_as_istiod_does() {
        let off = entries(serde_json::json!([{"overrides": [{"disabled": true}]}]));
        assert!(merged(std::slice::from_ref(&off)).is_disabled());
        let on = entries(serde_json::json!([{"overrides": [
            {"match": {"metric": "REQUEST_COUNT"}, "disabled": false}]}]));
        let p = merged(&[off, on]);
        assert!(!p.is_disabled());
        // Nothing left to change: the default (fast) path.
        assert!(p.is_default());
        // No Prometheus provider in scope: no metrics at all.
        let other = entries(serde_json::json!([{"providers": [{"name": "stackdriver"}]}]));
        assert!(merged(&[other]).is_disabled());
    }

    #[test]
    fn errors_name_the_field() {
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let t = telemetry(serde_json::json!([{"overrides": [
            {"match": {"metric": "REQUESTS"}},
            {"tagOverrides": {"a": {"operation": "UPSERT"}}},
            {"tagOverrides": {"b": {"operation": "REMOVE", "value": "x"}}},
            {"tagOverrides": {"c": {"value": "request.host =="}}},
            {"match": {"customMetric": "my_metric"}, "disabled": true}
        ]}]));
        compile_metrics(&t, &mut errors, &mut warnings);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.metrics[0].overrides[0].match.metric",
                "spec.metrics[0].overrides[1].tagOverrides.a.value",
                "spec.metrics[0].overrides[2].tagOverrides.b.value",
                "spec.metrics[0].overrides[3].tagOverrides.c.value",
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn expressions_evaluate_to_envoy_strings() {
        let e = entries(serde_json::json!([{"overrides": [{"tagOverrides": {
            "method": {"value": "request.method"},
            "code": {"value": "response.code"},
            "missing": {"value": "request.headers['x-nope']"},
            "long": {"value": "request.path"}
        }}]}]));
        let p = merged(&[e]);
        let spec = p.spec().unwrap();
        let path = "/".repeat(1000);
        let attrs = LogAttributes {
            request: Some(crate::telemetry::RequestAttributes {
                method: "GET",
                path: &path,
                ..Default::default()
            }),
            response_code: 503,
            ..Default::default()
        };
        let values = spec.evaluate(&attrs);
        let value_of = |tag: &str| -> &str {
            let rule = &spec.rule(IstioMetric::RequestCount).tags;
            let (_, r) = rule.iter().find(|(t, _)| t == tag).unwrap();
            match r {
                TagRule::Set(i) => &values[*i],
                TagRule::Remove => unreachable!(),
            }
        };
        assert_eq!(value_of("method"), "GET");
        assert_eq!(value_of("code"), "503");
        assert_eq!(value_of("missing"), "unknown");
        assert_eq!(value_of("long").len(), MAX_TAG_VALUE);
        assert!(spec.needs_headers);
    }
}
