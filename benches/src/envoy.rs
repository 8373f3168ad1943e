//! The Envoy side of a bench configuration: the templates in `benches/envoy/` filled from a
//! [`Model`], the way istiod would translate the same Services, HTTPRoute and
//! AuthorizationPolicies for a waypoint (protocol.md 2.2-2.9).

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::model::{
    Model, NAMESPACE, OTEL_HOST, OTEL_PORT, PathKind, Policy, Rule, SERVICE_PORT, Svc,
};

pub const WAYPOINT_TEMPLATE: &str = include_str!("../envoy/waypoint.yaml");
pub const CHAIN_TEMPLATE: &str = include_str!("../envoy/chain.yaml");
pub const CLUSTER_TEMPLATE: &str = include_str!("../envoy/cluster.yaml");

/// Paths and ports the bootstrap needs.
#[derive(Debug, Clone)]
pub struct EnvoyParams {
    pub hbone_port: u16,
    pub admin_port: u16,
    pub cert_chain: String,
    pub private_key: String,
    pub root_cert: String,
    pub access_log: String,
}

/// Fill `template`: a line holding only `@@NAME@@` is replaced by the block `vars[NAME]`,
/// every line indented to the placeholder's column (an empty block removes the line); other
/// `@@NAME@@` occurrences are replaced inline. Lines starting with `#` in column 0 are
/// dropped when `strip_header_comments` (snippet templates repeated thousands of times).
pub fn render(
    template: &str,
    vars: &HashMap<&str, String>,
    strip_header_comments: bool,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() * 2);
    for line in template.lines() {
        if strip_header_comments && line.starts_with('#') {
            continue;
        }
        let trimmed = line.trim_start();
        if let Some(name) = trimmed
            .strip_prefix("@@")
            .and_then(|r| r.strip_suffix("@@"))
            .filter(|n| !n.contains("@@") && !n.contains(' '))
        {
            let block = vars
                .get(name)
                .ok_or_else(|| format!("template needs a value for {name}"))?;
            let indent = &line[..line.len() - trimmed.len()];
            for b in block.lines() {
                out.push_str(indent);
                out.push_str(b);
                out.push('\n');
            }
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("@@") {
            let after = &rest[start + 2..];
            let end = after
                .find("@@")
                .ok_or_else(|| format!("unterminated placeholder in {line:?}"))?;
            let name = &after[..end];
            let value = vars
                .get(name)
                .ok_or_else(|| format!("template needs a value for {name}"))?;
            out.push_str(&rest[..start]);
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    Ok(out)
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Envoy route entries (flow-style YAML, one per line) for the reviews HTTPRoute, in
/// precedence order, as istiod converts Gateway API rules.
fn reviews_routes(model: &Model) -> String {
    let mut out = String::new();
    for r in model.sorted_rules() {
        route_entry(&mut out, model, r);
    }
    out
}

fn route_entry(out: &mut String, model: &Model, r: &Rule) {
    let mut m = match &r.path {
        PathKind::Prefix(p) if p == "/" => "prefix: \"/\"".to_string(),
        PathKind::Prefix(p) => format!("path_separated_prefix: {}", json(p)),
        PathKind::Exact(p) => format!("path: {}", json(p)),
    };
    let mut headers = Vec::new();
    if let Some(method) = &r.method {
        headers.push(format!(
            "{{name: \":method\", string_match: {{exact: {}}}}}",
            json(method)
        ));
    }
    for (k, v) in &r.headers {
        headers.push(format!(
            "{{name: {}, string_match: {{exact: {}}}}}",
            json(k),
            json(v)
        ));
    }
    if !headers.is_empty() {
        let _ = write!(m, ", headers: [{}]", headers.join(", "));
    }
    let cluster_of = |name: &str| {
        model
            .service(name)
            .map(Svc::cluster)
            .unwrap_or_else(|| "UnknownService".into())
    };
    let target = if r.backends.len() == 1 {
        format!("cluster: {}", json(&cluster_of(&r.backends[0].0)))
    } else {
        let cs: Vec<String> = r
            .backends
            .iter()
            .map(|(s, w)| format!("{{name: {}, weight: {w}}}", json(&cluster_of(s))))
            .collect();
        format!("weighted_clusters: {{clusters: [{}]}}", cs.join(", "))
    };
    let _ = writeln!(
        out,
        "- name: {name}\n  match: {{{m}}}\n  route: {{{target}, timeout: 0s, retry_policy: {retry}}}",
        name = json(&r.name),
        retry = MESH_DEFAULT_RETRY,
    );
}

/// The mesh default retry policy (istiod retry.go, 1.24+: no 503 in the retriable codes).
const MESH_DEFAULT_RETRY: &str = "{retry_on: \"connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes\", \
num_retries: 2, host_selection_retry_max_attempts: 5, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, \
typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]}";

/// The HCM `tracing` block istiod renders for an `opentelemetry` provider and a Telemetry
/// `randomSamplingPercentage` (`tracing.go`: client and overall sampling 100, Istio's tags
/// sorted, the OpenTelemetry tracer on `envoy_grpc` with the node cluster as service name),
/// or nothing.
fn tracing_block(model: &Model) -> String {
    let Some((percent, _)) = model.tracing else {
        return String::new();
    };
    let tags = [
        ("istio.canonical_revision", "latest"),
        ("istio.canonical_service", "waypoint"),
        ("istio.cluster_id", "Kubernetes"),
        ("istio.mesh_id", model.trust_domain.as_str()),
        ("istio.namespace", NAMESPACE),
    ]
    .iter()
    .map(|(k, v)| format!("  - {{tag: {k}, literal: {{value: {v}}}}}\n"))
    .collect::<String>();
    format!(
        "tracing:\n  client_sampling: {{value: 100}}\n  random_sampling: {{value: {percent}}}\n  overall_sampling: {{value: 100}}\n  custom_tags:\n{tags}\
         \x20 provider:\n    name: envoy.tracers.opentelemetry\n    typed_config:\n\
         \x20     \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig\n\
         \x20     grpc_service: {{envoy_grpc: {{cluster_name: \"outbound|{OTEL_PORT}||{OTEL_HOST}\", authority: {OTEL_HOST}}}}}\n\
         \x20     service_name: waypoint.default\n"
    )
}

/// The default route of a Service without HTTPRoute.
fn default_route(svc: &Svc) -> String {
    format!(
        "- name: default\n  match: {{prefix: \"/\"}}\n  route: {{cluster: {}, timeout: 0s, retry_policy: {MESH_DEFAULT_RETRY}}}\n",
        json(&svc.cluster())
    )
}

/// The RBAC filter for the ALLOW policies (istiod's translation with filter-state principals:
/// principals -> exact match on `io.istio.peer_principal`, paths -> url_path, methods ->
/// `:method` header), or nothing when there is no policy.
fn rbac_filter(model: &Model) -> String {
    if model.policies.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "- name: envoy.filters.http.rbac\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n    shadow_rules_stat_prefix: istio_dry_run_allow_\n    rules:\n      action: ALLOW\n      policies:\n",
    );
    for p in &model.policies {
        let _ = writeln!(
            out,
            "        {}: {{permissions: [{}], principals: [{}]}}",
            json(&format!("ns[{NAMESPACE}]-policy[{}]-rule[0]", p.name)),
            permission(p),
            principal(p)
        );
    }
    out
}

fn permission(p: &Policy) -> String {
    let mut rules = Vec::new();
    if !p.methods.is_empty() {
        let ms: Vec<String> = p
            .methods
            .iter()
            .map(|m| {
                format!(
                    "{{header: {{name: \":method\", string_match: {{exact: {}}}}}}}",
                    json(m)
                )
            })
            .collect();
        rules.push(format!("{{or_rules: {{rules: [{}]}}}}", ms.join(", ")));
    }
    if !p.paths.is_empty() {
        let ps: Vec<String> = p
            .paths
            .iter()
            .map(|path| {
                let sm = match path.strip_suffix('*') {
                    Some(prefix) => format!("{{prefix: {}}}", json(prefix)),
                    None => format!("{{exact: {}}}", json(path)),
                };
                format!("{{url_path: {{path: {sm}}}}}")
            })
            .collect();
        rules.push(format!("{{or_rules: {{rules: [{}]}}}}", ps.join(", ")));
    }
    if rules.is_empty() {
        rules.push("{any: true}".into());
    }
    format!("{{and_rules: {{rules: [{}]}}}}", rules.join(", "))
}

fn principal(p: &Policy) -> String {
    let ids: Vec<String> = p
        .principals
        .iter()
        .map(|pr| {
            format!(
                "{{filter_state: {{key: io.istio.peer_principal, string_match: {{exact: {}}}}}}}",
                json(&format!("spiffe://{pr}"))
            )
        })
        .collect();
    format!(
        "{{and_ids: {{ids: [{{or_ids: {{ids: [{}]}}}}]}}}}",
        ids.join(", ")
    )
}

/// The whole bootstrap for `model`.
/// The UpstreamTlsContext istiod renders for DestinationRule `tls: {mode: SIMPLE,
/// caCertificates}` (`cluster_tls.go` `applyUpstreamTLSSettings`): the CA file, the SNI and the
/// checked name (the Service hostname here, as our waypoint defaults to).
fn transport_socket(model: &Model, svc: &crate::model::Svc) -> String {
    match (&model.tls_ca, svc.name.as_str()) {
        (Some(ca), "secure") => format!(
            "transport_socket:\n  name: envoy.transport_sockets.tls\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n    sni: {fqdn}\n    common_tls_context:\n      validation_context:\n        trusted_ca: {{filename: \"{ca}\"}}\n        match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: {fqdn}}}}}]\n",
            fqdn = svc.fqdn()
        ),
        _ => String::new(),
    }
}

/// HTTP/2 to a gRPC port's endpoints, as istiod renders a waypoint cluster of a `grpc` port
/// (`typed_extension_protocol_options`, `http2_protocol_options`).
fn upstream_protocol(svc: &crate::model::Svc) -> String {
    if !svc.grpc {
        return String::new();
    }
    "typed_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    explicit_http_config: {http2_protocol_options: {}}\n".into()
}

pub fn bootstrap(model: &Model, params: &EnvoyParams) -> Result<String, String> {
    let port = SERVICE_PORT.to_string();
    let rbac = rbac_filter(model);
    let mut vip_matchers = String::new();
    let mut chains = String::new();
    let mut clusters = String::new();
    for svc in &model.services {
        let chain = svc.cluster();
        let matcher = serde_json::json!({
            "ranges": [{"address_prefix": svc.vip.to_string(), "prefix_len": 32}],
            "on_match": {"matcher": {"matcher_tree": {
                "input": {"name": "port", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"}},
                "exact_match_map": {"map": {port.as_str(): {"action": {
                    "name": chain,
                    "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain}}}}}}}}
        });
        let _ = writeln!(vip_matchers, "- {matcher}");
        let routes = if svc.name == "reviews" {
            reviews_routes(model)
        } else {
            default_route(svc)
        };
        let routes = match model.tracing {
            // istiod's route decorator (`<fqdn>:<port>/*`), which names the span.
            Some(_) => routes.replace(
                "\n  route: {",
                &format!(
                    "\n  decorator: {{operation: \"{}:{port}/*\"}}\n  route: {{",
                    svc.fqdn()
                ),
            ),
            None => routes,
        };
        let vars: HashMap<&str, String> = HashMap::from([
            ("CHAIN", chain.clone()),
            ("SERVICE_PORT", port.clone()),
            ("ACCESS_LOG", params.access_log.clone()),
            ("ROUTES", routes),
            ("RBAC", rbac.clone()),
            ("TRACING", tracing_block(model)),
        ]);
        chains.push_str(&render(CHAIN_TEMPLATE, &vars, true)?);
        let endpoints: String = svc
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "- endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}\n",
                    e.ip(),
                    e.port()
                )
            })
            .collect();
        let vars: HashMap<&str, String> = HashMap::from([
            ("CLUSTER", chain),
            ("FQDN", svc.fqdn()),
            ("NAME", svc.name.clone()),
            ("NAMESPACE", NAMESPACE.to_string()),
            ("ENDPOINTS", endpoints),
            (
                "TRANSPORT",
                transport_socket(model, svc) + &upstream_protocol(svc),
            ),
        ]);
        clusters.push_str(&render(CLUSTER_TEMPLATE, &vars, true)?);
    }
    if let Some((_, sink)) = model.tracing {
        // The provider's `outbound|<port>||<host>` cluster (HTTP/2 for the gRPC port).
        let _ = write!(
            clusters,
            "- name: \"outbound|{OTEL_PORT}||{OTEL_HOST}\"\n  type: STATIC\n  connect_timeout: 10s\n\
             \x20 typed_extension_protocol_options:\n    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n\
             \x20     \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n\
             \x20     explicit_http_config: {{http2_protocol_options: {{}}}}\n\
             \x20 load_assignment:\n    cluster_name: \"outbound|{OTEL_PORT}||{OTEL_HOST}\"\n\
             \x20   endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}]}}]\n",
            sink.ip(),
            sink.port()
        );
    }
    let vars: HashMap<&str, String> = HashMap::from([
        ("TRUST_DOMAIN", model.trust_domain.clone()),
        ("ADMIN_PORT", params.admin_port.to_string()),
        ("HBONE_PORT", params.hbone_port.to_string()),
        ("CERT_CHAIN", params.cert_chain.clone()),
        ("PRIVATE_KEY", params.private_key.clone()),
        ("ROOT_CERT", params.root_cert.clone()),
        ("ACCESS_LOG", params.access_log.clone()),
        ("SERVICE_PORT", port),
        ("SERVICE_PORT_END", (SERVICE_PORT + 1).to_string()),
        ("VIP_MATCHERS", vip_matchers),
        ("FILTER_CHAINS", chains),
        ("CLUSTERS", clusters),
    ]);
    render(WAYPOINT_TEMPLATE, &vars, false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{Backends, Variant};

    #[test]
    fn blocks_are_indented_and_scalars_replaced() {
        let vars = HashMap::from([("A", "x".to_string()), ("B", "- 1\n- 2\n".to_string())]);
        let out = render("k: @@A@@/@@A@@\n  @@B@@\n", &vars, false).unwrap();
        assert_eq!(out, "k: x/x\n  - 1\n  - 2\n");
        assert!(render("@@C@@\n", &vars, false).is_err());
    }

    #[test]
    fn bootstrap_renders_without_placeholders() {
        let m = Model::new(Variant::parse("routes100").unwrap(), &Backends::default());
        let params = EnvoyParams {
            hbone_port: 15008,
            admin_port: 15000,
            cert_chain: "/c".into(),
            private_key: "/k".into(),
            root_cert: "/r".into(),
            access_log: "/dev/null".into(),
        };
        let y = bootstrap(&m, &params).unwrap();
        assert!(!y.contains("@@"));
        assert!(y.contains("inbound-vip|9080|http|reviews.default.svc.cluster.local"));
        assert_eq!(y.matches("name: \"decoy-").count(), 99);
        let a = bootstrap(
            &Model::new(Variant::parse("authz100").unwrap(), &Backends::default()),
            &params,
        )
        .unwrap();
        assert_eq!(a.matches("-policy[access-team-").count(), 99 * 4);
        // trace<N>: both proxies trace to the same collector at N%.
        let mut t = Model::new(Variant::parse("trace1").unwrap(), &Backends::default());
        assert_eq!(t.mesh_config(), None, "no collector given yet");
        t.tracing = Some((1, "127.0.0.1:29085".parse().unwrap()));
        let y = bootstrap(&t, &params).unwrap();
        assert!(!y.contains("@@"));
        assert_eq!(y.matches("random_sampling: {value: 1}").count(), 4);
        assert!(y.contains("name: \"outbound|4317||otel.default.svc.cluster.local\""));
        assert!(y.contains("decorator: {operation: \"ratings.default.svc.cluster.local:9080/*\"}"));
        assert!(t.mesh_config().unwrap().contains("opentelemetry"));
        let w = t.waypoint_manifests();
        assert!(w.contains("randomSamplingPercentage: 1\n") && w.contains("port: 29085"));
        assert!(!bootstrap(&m, &params).unwrap().contains("tracing:"));
    }
}
