//! # Istio Telemetry `tracing` for a waypoint: which provider, sampling and tags apply
//!
//! Contract:
//! - Attachment and levels are those of access logging ([`crate::telemetry`]): mesh-wide
//!   (root namespace), namespace-wide (the waypoint's namespace), `targetRefs` to this
//!   waypoint's Gateway or GatewayClass, to a Service. Each Telemetry's `tracing[]` entries
//!   are applied in that order, field by field, as istiod's `Telemetries.Tracing` merges them
//!   (`pilot/pkg/model/telemetry.go`): `providers` (the first name) replaces the provider,
//!   `customTags` replaces the whole tag map, `randomSamplingPercentage`,
//!   `disableSpanReporting`, `useRequestIdForTraceSampling` and `enableIstioTags` replace
//!   their value. An entry with `match.mode: CLIENT` does not apply: a waypoint's connection
//!   manager is the server side (`ServerSpec`).
//! - The merged result ([`TracingSpec`]) leaves MeshConfig out: the proxy fills in
//!   `defaultProviders.tracing`, the ProxyConfig sampling default and the provider itself.
//!   [`TracingPolicy::default`] means no Telemetry `tracing` applies (istiod then falls back
//!   to MeshConfig).
//! - Validation as Istio's webhook: `randomSamplingPercentage` in [0, 100]; a custom tag has
//!   exactly one of `literal`, `environment`, `header`. Errors name the Telemetry and field.
//! - Pure: no I/O; never panics.

use std::sync::Arc;

use serde::Deserialize;

use crate::ConfigError;
use crate::resources::Telemetry;

/// Where a custom tag's value comes from (`Tracing.CustomTag`).
#[derive(Debug, Clone, PartialEq)]
pub enum CustomTag {
    Literal(String),
    /// An environment variable of the proxy, or the default.
    Environment {
        name: String,
        default: String,
    },
    /// A request header, or the default (no tag when both are missing).
    Header {
        name: String,
        default: String,
    },
}

/// Telemetry `tracing` merged for one Service's traffic through this waypoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingSpec {
    /// `Telemetry ns/name` of each contributing Telemetry, least specific first.
    pub sources: Vec<String>,
    /// The provider named by the most specific entry that names one.
    pub provider: Option<String>,
    pub disable_span_reporting: Option<bool>,
    pub random_sampling_percentage: Option<f64>,
    /// Sorted by name.
    pub custom_tags: Option<Vec<(String, CustomTag)>>,
    pub use_request_id_for_trace_sampling: Option<bool>,
    pub enable_istio_tags: Option<bool>,
}

/// The tracing a Service's traffic gets from Telemetry; cheap to clone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingPolicy(pub Option<Arc<TracingSpec>>);

impl TracingPolicy {
    /// No Telemetry `tracing` applies.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
    pub fn spec(&self) -> Option<&TracingSpec> {
        self.0.as_deref()
    }
}

/// One `tracing[]` entry, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TracingEntry {
    client_only: bool,
    provider: Option<String>,
    disable_span_reporting: Option<bool>,
    random_sampling_percentage: Option<f64>,
    custom_tags: Option<Vec<(String, CustomTag)>>,
    use_request_id_for_trace_sampling: Option<bool>,
    enable_istio_tags: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawTracing {
    #[serde(rename = "match")]
    matcher: Option<RawMatch>,
    providers: Vec<RawProviderRef>,
    custom_tags: Option<std::collections::BTreeMap<String, RawCustomTag>>,
    disable_span_reporting: Option<bool>,
    random_sampling_percentage: Option<f64>,
    use_request_id_for_trace_sampling: Option<bool>,
    enable_istio_tags: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawMatch {
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProviderRef {
    name: String,
}

/// A custom tag as Telemetry `tracing[].customTags` and ProxyConfig `tracing.customTags`
/// write it (the same shape in both).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RawCustomTag {
    literal: Option<RawLiteral>,
    environment: Option<RawFrom>,
    header: Option<RawFrom>,
}

impl RawCustomTag {
    /// The tag, or what is wrong with it (exactly one source is allowed).
    pub fn compile(&self) -> Result<CustomTag, &'static str> {
        match (&self.literal, &self.environment, &self.header) {
            (Some(l), None, None) => Ok(CustomTag::Literal(l.value.clone())),
            (None, Some(e), None) => Ok(CustomTag::Environment {
                name: e.name.clone(),
                default: e.default_value.clone(),
            }),
            (None, None, Some(h)) => Ok(CustomTag::Header {
                name: h.name.to_ascii_lowercase(),
                default: h.default_value.clone(),
            }),
            _ => Err("needs exactly one of literal, environment, header"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawLiteral {
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct RawFrom {
    name: String,
    default_value: String,
}

/// Parse and validate one Telemetry's `spec.tracing`; `None` when it has none.
pub(crate) fn compile_tracing(
    t: &Telemetry,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<[TracingEntry]>> {
    let entries: Vec<(String, RawTracing)> =
        crate::telemetry::section_entries(t, "tracing", t.spec.tracing.as_ref(), errors)?;
    let error =
        |field: String, message: String| crate::telemetry::telemetry_error(t, field, message);
    let mut out = Vec::new();
    for (field, raw) in entries {
        let client_only = match raw.matcher.and_then(|m| m.mode).as_deref() {
            None | Some("CLIENT_AND_SERVER") | Some("SERVER") => false,
            Some("CLIENT") => true,
            Some(other) => {
                errors.push(error(
                    format!("{field}.match.mode"),
                    format!("{other:?} is not CLIENT_AND_SERVER, CLIENT or SERVER"),
                ));
                continue;
            }
        };
        if let Some(p) = raw.random_sampling_percentage
            && !(0.0..=100.0).contains(&p)
        {
            errors.push(error(
                format!("{field}.randomSamplingPercentage"),
                format!("{p} must be in range [0.0, 100.0]"),
            ));
            continue;
        }
        let mut tags = Vec::new();
        let mut bad = false;
        for (name, tag) in raw.custom_tags.iter().flatten() {
            match tag.compile() {
                Ok(tag) => tags.push((name.clone(), tag)),
                Err(why) => {
                    errors.push(error(format!("{field}.customTags.{name}"), why.into()));
                    bad = true;
                }
            }
        }
        if bad {
            continue;
        }
        out.push(TracingEntry {
            client_only,
            provider: raw
                .providers
                .iter()
                .map(|p| p.name.clone())
                .find(|n| !n.is_empty()),
            disable_span_reporting: raw.disable_span_reporting,
            random_sampling_percentage: raw.random_sampling_percentage,
            custom_tags: raw.custom_tags.is_some().then_some(tags),
            use_request_id_for_trace_sampling: raw.use_request_id_for_trace_sampling,
            enable_istio_tags: raw.enable_istio_tags,
        });
    }
    Some(out.into())
}

/// Merge the entries of each applicable Telemetry, least specific first.
pub(crate) fn merge<'a>(
    levels: impl Iterator<Item = (&'a str, &'a Arc<[TracingEntry]>)>,
) -> TracingPolicy {
    let mut spec = TracingSpec::default();
    let mut any = false;
    for (source, entries) in levels {
        any = true;
        spec.sources.push(source.to_string());
        for e in entries.iter().filter(|e| !e.client_only) {
            if e.provider.is_some() {
                spec.provider.clone_from(&e.provider);
            }
            if e.disable_span_reporting.is_some() {
                spec.disable_span_reporting = e.disable_span_reporting;
            }
            if e.custom_tags.is_some() {
                spec.custom_tags.clone_from(&e.custom_tags);
            }
            if e.random_sampling_percentage.is_some() {
                spec.random_sampling_percentage = e.random_sampling_percentage;
            }
            if e.use_request_id_for_trace_sampling.is_some() {
                spec.use_request_id_for_trace_sampling = e.use_request_id_for_trace_sampling;
            }
            if e.enable_istio_tags.is_some() {
                spec.enable_istio_tags = e.enable_istio_tags;
            }
        }
    }
    if any {
        TracingPolicy(Some(Arc::new(spec)))
    } else {
        TracingPolicy::default()
    }
}
