//! Offline answers for operators, from a compiled snapshot only (no sockets):
//! - [`services_table`]: every Service, its VIPs, ports and protocols, the waypoint it uses and
//!   which label decided it (`waypoint services`, admin `/services`; like
//!   `istioctl x ztunnel-config service`);
//! - [`explain`]: what the waypoint would do with one request (`waypoint explain`): binding,
//!   route rule chosen and why the others failed, backends, every AuthorizationPolicy with
//!   its result, and the reply a real request would get. The decisions come from the same
//!   `policy` functions the data path calls, and the replies from [`ProxyError::local_reply`].

use std::fmt::Write as _;
use std::net::SocketAddr;

use http::{HeaderMap, Method};
use policy::{Backend, BindingState, Snapshot, VipLookup};

use crate::config::meshconfig::{MeshConfig, ProviderKind};
use crate::request::error::{ProxyError, UNKNOWN_AUTHORITY_BODY};

/// The `waypoint services` table: one line per Service, sorted by namespace and name.
pub fn services_table(snapshot: &Snapshot) -> String {
    let header = [
        "NAMESPACE",
        "NAME",
        "VIPS",
        "PORTS",
        "WAYPOINT",
        "DECIDED BY",
        "STATUS",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(str::to_string)];
    for s in snapshot.services() {
        let vips: Vec<String> = s.vips.iter().map(|v| v.to_string()).collect();
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
            .collect();
        let b = &s.binding;
        let waypoint = match b.state {
            BindingState::OptedOut => "none".to_string(),
            _ => b.waypoint.clone().unwrap_or_else(|| "-".into()),
        };
        // A ServiceEntry is listed once per host (one service each, as istiod makes them).
        let name = match &s.entry {
            Some((entry, resolution)) => {
                format!("{} (ServiceEntry {entry}, {})", s.name, resolution.as_str())
            }
            None => s.name.to_string(),
        };
        rows.push([
            s.namespace.to_string(),
            name,
            if vips.is_empty() {
                "None".into()
            } else {
                vips.join(",")
            },
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(",")
            },
            waypoint,
            b.source.as_str().to_string(),
            b.state.as_str().to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One request to explain.
#[derive(Debug, Clone)]
pub struct ExplainRequest {
    /// The client's SPIFFE identity (the HBONE peer certificate).
    pub from: Option<String>,
    /// The CONNECT authority: the Service VIP:port (or pod ip:port) dialled.
    pub to: SocketAddr,
    pub method: Method,
    /// Lower-case names.
    pub headers: HeaderMap,
    /// Path with optional query.
    pub path: String,
}

/// The reply a real request would get, one line.
fn reply_line(e: &ProxyError) -> String {
    let r = e.local_reply();
    let mut line = format!("{}", r.status.as_u16());
    if !r.flags.is_empty() {
        let _ = write!(line, " {}", r.flags);
    }
    if !r.body.is_empty() {
        let _ = write!(line, " {:?}", r.body.trim_end());
    }
    let _ = write!(line, " (details {})", r.details);
    line
}

/// What the waypoint would do with `req`, as text. Never fails: every outcome is described.
pub fn explain(snapshot: &Snapshot, mesh: &MeshConfig, req: &ExplainRequest) -> String {
    let mut out = String::new();
    let o = &mut out;
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path.as_str(), None),
    };
    let _ = writeln!(
        o,
        "request: {} {} from {} to {} through waypoint {}/{}",
        req.method,
        req.path,
        req.from.as_deref().unwrap_or("(no identity)"),
        req.to,
        snapshot.gateway.namespace,
        snapshot.gateway.name
    );

    let Some(service) = explain_binding(o, snapshot, req) else {
        return out;
    };
    let normalized = match policy::normalize_path(path) {
        Ok(p) => p.into_owned(),
        Err(()) => {
            let _ = writeln!(
                o,
                "\nresult: {} (path cannot be normalized)",
                reply_line(&ProxyError::BadPath)
            );
            return out;
        }
    };
    if normalized != path {
        let _ = writeln!(o, "  path normalized to {normalized}");
    }
    let chosen = explain_route(o, &service, req, &normalized, query);
    if let Some((name, backends)) = &chosen {
        explain_backends(o, name, backends);
    }
    let decision = explain_authz(o, &service, mesh, req, &normalized);
    explain_telemetry(o, &service, mesh);
    explain_result(o, req, &decision, chosen);
    out
}

/// `explain` 1: the Service at the address, how it is bound, and whether this waypoint
/// serves it (`None`: the CONNECT is refused, the result written).
fn explain_binding(
    o: &mut String,
    snapshot: &Snapshot,
    req: &ExplainRequest,
) -> Option<std::sync::Arc<policy::ServicePort>> {
    let info = snapshot.service_at(req.to);
    let _ = writeln!(o, "\nservice:");
    match &info {
        Some(s) => {
            let port = s.ports.iter().find(|p| p.port == req.to.port());
            match &s.entry {
                Some((entry, resolution)) => {
                    let _ = writeln!(
                        o,
                        "  ServiceEntry {}/{entry} host {} port {} ({}), resolution {}",
                        s.namespace,
                        s.name,
                        req.to.port(),
                        port.map_or("unknown", |p| p.protocol.as_str()),
                        resolution.as_str()
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "  Service {}/{} port {} ({})",
                        s.namespace,
                        s.name,
                        req.to.port(),
                        port.map_or("unknown", |p| p.protocol.as_str())
                    );
                }
            }
            let _ = writeln!(
                o,
                "  binding: {} (decided by: {})",
                s.binding.state.as_str(),
                s.binding.source.as_str()
            );
            let _ = writeln!(o, "  why: {}", s.binding.reason);
        }
        None => {
            let _ = writeln!(o, "  no Service has VIP:port {}", req.to);
        }
    }
    let service = match snapshot.lookup_vip(req.to) {
        VipLookup::Bound(sp) => sp,
        VipLookup::NotBound(_) | VipLookup::Unknown => {
            let _ = writeln!(
                o,
                "\nresult: 503 {UNKNOWN_AUTHORITY_BODY:?} (CONNECT refused: no filter chain for {}, logged NR filter_chain_not_found)",
                req.to
            );
            return None;
        }
    };
    if info.is_none() {
        let _ = writeln!(
            o,
            "  workload address: served for workload traffic (cluster {})",
            service.cluster.name
        );
    }
    if service.protocol == policy::AppProtocol::Tcp {
        let _ = writeln!(
            o,
            "  port is TCP: no HTTP routing; the connection is proxied to {}",
            service.cluster.name
        );
    }
    Some(service)
}

/// A route rule's name and backends.
type Chosen = (String, policy::WeightedBackends);

/// `explain` 2: every route entry in precedence order, which one matched and why the others
/// did not (the implicit `default` route without an HTTPRoute; a DYNAMIC_DNS entry's domain).
fn explain_route(
    o: &mut String,
    service: &policy::ServicePort,
    req: &ExplainRequest,
    normalized: &str,
    query: Option<&str>,
) -> Option<Chosen> {
    let _ = writeln!(o, "\nroute:");
    let mut chosen: Option<(String, policy::WeightedBackends)> = None;
    match &service.routes {
        None => {
            let _ = writeln!(
                o,
                "  no HTTPRoute attached: the implicit route \"default\" to {}",
                service.cluster.name
            );
            chosen = Some((
                "default".into(),
                policy::WeightedBackends {
                    backends: vec![policy::BackendRef {
                        backend: Backend::Cluster(service.cluster.clone()),
                        weight: 1,
                        filters: Default::default(),
                    }],
                    total_weight: 1,
                },
            ));
        }
        Some(table) => {
            let traces = table.explain(&req.method, normalized, query, &req.headers);
            let _ = writeln!(
                o,
                "  {} match entr{} in Gateway API precedence order:",
                traces.len(),
                if traces.len() == 1 { "y" } else { "ies" }
            );
            for (i, t) in traces.iter().enumerate() {
                let verdict = match (&t.result, &chosen) {
                    (Ok(()), None) => {
                        chosen = Some((t.rule.name.to_string(), t.rule.backends.clone()));
                        "MATCHED (chosen)".to_string()
                    }
                    (Ok(()), Some(_)) => {
                        "would match, but a higher-precedence entry won".to_string()
                    }
                    (Err(why), _) => format!("no: {why}"),
                };
                let _ = writeln!(
                    o,
                    "  [{}] rule {} ({}): {verdict}",
                    i + 1,
                    t.rule.name,
                    t.description
                );
            }
            if chosen.is_none() {
                let _ = writeln!(o, "  no rule matches");
            }
        }
    }
    // A DYNAMIC_DNS entry's virtual host answers only Hosts under its wildcard.
    if let Some(d) = &service.cluster.dynamic_dns {
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok());
        let matched = host.is_some_and(|h| d.matches(h));
        let _ = writeln!(
            o,
            "  virtual host domain {} (DYNAMIC_DNS): Host {:?} {}",
            d.wildcard,
            host.unwrap_or(""),
            if matched {
                "matches"
            } else {
                "does not match (a Host with a port never does): no route"
            }
        );
        if !matched {
            chosen = None;
        }
    }
    chosen
}

/// `explain`: the chosen rule's backends, their endpoints and traffic policy.
fn explain_backends(o: &mut String, name: &str, backends: &policy::WeightedBackends) {
    let _ = writeln!(o, "\nbackends of rule {name}:");
    if backends.backends.is_empty() {
        let _ = writeln!(o, "  none with a non-zero weight");
    }
    for b in &backends.backends {
        let share = 100.0 * f64::from(b.weight) / backends.total_weight.max(1) as f64;
        match &b.backend {
            Backend::Cluster(c) => {
                let eps: Vec<String> = c.endpoints().iter().map(|e| e.addr.to_string()).collect();
                let _ = writeln!(
                    o,
                    "  weight {} ({share:.1}%): {} endpoints [{}]",
                    b.weight,
                    c.name,
                    eps.join(", ")
                );
                if let Some(t) = &c.traffic {
                    let _ = writeln!(o, "    traffic policy: {}", traffic_summary(t));
                }
                if let Some(d) = &c.dns {
                    let names: Vec<String> = d
                        .names
                        .iter()
                        .map(|t| format!("{}:{}", t.name, t.port))
                        .collect();
                    let _ = writeln!(
                        o,
                        "    endpoints from DNS ({}): {}{}",
                        if d.first_only {
                            "DNS_ROUND_ROBIN"
                        } else {
                            "DNS"
                        },
                        names.join(", "),
                        if c.endpoints().is_empty() {
                            " (not resolved here; the running waypoint resolves them)"
                        } else {
                            ""
                        }
                    );
                }
                if c.passthrough {
                    let _ = writeln!(
                        o,
                        "    resolution NONE: the endpoint is the address the tunnel names"
                    );
                }
                if c.dynamic_dns.is_some() {
                    let _ = writeln!(
                        o,
                        "    resolution DYNAMIC_DNS: the endpoint is the first address the request's Host resolves to, port 80 (443 with TLS origination)"
                    );
                }
            }
            Backend::Invalid { reason } => {
                let _ = writeln!(o, "  weight {} ({share:.1}%): invalid: {reason}", b.weight);
            }
        }
    }
}

/// `explain` 3: RequestAuthentication, every AuthorizationPolicy with each rule's result, a
/// CUSTOM provider's check, and the decision.
fn explain_authz(
    o: &mut String,
    service: &policy::ServicePort,
    mesh: &MeshConfig,
    req: &ExplainRequest,
    normalized: &str,
) -> policy::Decision {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| req.to.to_string(), str::to_string);
    let areq = policy::AuthzRequest {
        source_principal: req.from.as_deref(),
        source_ip: None,
        remote_ip: None,
        dest_ip: Some(req.to.ip()),
        dest_port: req.to.port(),
        http: (service.protocol != policy::AppProtocol::Tcp).then_some(policy::HttpAttrs {
            method: req.method.as_str(),
            path: normalized,
            host: &host,
            headers: &req.headers,
            request_principal: None,
            request_auth: None,
        }),
    };
    let _ = writeln!(o, "\nauthorization:");
    if !service.authn.is_empty() {
        let _ = writeln!(
            o,
            "  RequestAuthentication applies: a request with an invalid JWT gets 401; explain verifies no token (evaluated as a request without one)"
        );
    }
    let (outcomes, mut decision) = policy::explain_authz(&service.authz, &areq);
    if outcomes.is_empty() {
        let _ = writeln!(o, "  no AuthorizationPolicy applies: allowed");
    }
    for p in &outcomes {
        let dry = if p.dry_run { " (dry-run)" } else { "" };
        let provider = p
            .provider
            .as_deref()
            .map(|p| format!(" provider {p}"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {} {}/{}{provider}{dry}:",
            p.action, p.namespace, p.name
        );
        if p.rules.is_empty() {
            let _ = writeln!(o, "    no rules (matches nothing)");
        }
        for r in &p.rules {
            if r.matched {
                let _ = writeln!(o, "    {}: matched", r.id);
            } else {
                let _ = writeln!(o, "    {}: not matched: {}", r.id, r.why_not);
            }
        }
    }
    if let Some(m) = policy::custom_match(&service.authz, &areq) {
        let usable = matches!(
            mesh.provider(&m.provider).map(|p| &p.kind),
            Some(ProviderKind::ExtAuthzHttp(_)) | Some(ProviderKind::ExtAuthzGrpc(_))
        ) && !m.conflicting_providers
            && areq.http.is_some();
        if usable {
            let _ = writeln!(
                o,
                "  CUSTOM {} matched: ext_authz provider {} decides first (explain assumes it allows)",
                m.policy, m.provider
            );
            let asked = match mesh.provider(&m.provider).map(|p| &p.kind) {
                Some(ProviderKind::ExtAuthzGrpc(g)) => format!(
                    "gRPC Authorization/Check to {}:{} (timeout {:?}) with every request header, the client's principal and address{}",
                    g.service,
                    g.port,
                    g.timeout,
                    body_in_check(g.body)
                ),
                Some(ProviderKind::ExtAuthzHttp(h)) => format!(
                    "HTTP {} {}{} to {}:{} (timeout {:?}) with the request's Host, authorization{}",
                    req.method,
                    h.path_prefix,
                    req.path,
                    h.service,
                    h.port,
                    h.timeout,
                    if h.include_request_headers_in_check.is_empty() {
                        String::new()
                    } else {
                        let names: Vec<String> = h
                            .include_request_headers_in_check
                            .iter()
                            .map(|p| p.text())
                            .collect();
                        format!(" and the headers matching {}", names.join(", "))
                    } + &body_in_check(h.body)
                ),
                _ => String::new(),
            };
            let _ = writeln!(o, "    asked: {asked}");
            decision = policy::evaluate_rbac(&service.authz, &areq);
        } else {
            let _ = writeln!(
                o,
                "  CUSTOM {} matched but provider {:?} cannot be used: denied as Istio does",
                m.policy, m.provider
            );
        }
    }
    if !outcomes.is_empty() {
        let _ = writeln!(
            o,
            "  decision: {}{}",
            if decision.allowed {
                "allowed"
            } else {
                "denied"
            },
            decision
                .matched_policy
                .as_deref()
                .map(|p| format!(" by {p}"))
                .unwrap_or_else(|| if decision.allowed {
                    String::new()
                } else {
                    " (no ALLOW policy matched)".into()
                })
        );
    }
    decision
}

/// `explain` 4: access logging, tracing and metrics for the Service.
fn explain_telemetry(o: &mut String, service: &policy::ServicePort, mesh: &MeshConfig) {
    let log = &service.access_log;
    if let Some(source) = log.source() {
        let exprs = log.expressions();
        let what = if log.is_disabled() {
            "access logging disabled".to_string()
        } else if exprs.is_empty() {
            "every request logged".to_string()
        } else {
            format!("logged when {}", exprs.join(" or "))
        };
        let _ = writeln!(o, "\naccess log: {source}: {what}");
    }
    if let Some(t) = crate::telemetry::trace::describe(&service.tracing, mesh) {
        let _ = writeln!(o, "tracing: {t}");
    }
    if let Some(m) = crate::telemetry::metrics::describe(&service.metrics) {
        let _ = writeln!(o, "metrics: {m}");
    }
}

/// `explain` 5: the reply a real request would get.
fn explain_result(
    o: &mut String,
    req: &ExplainRequest,
    decision: &policy::Decision,
    chosen: Option<Chosen>,
) {
    let _ = write!(o, "\nresult: ");
    if !decision.allowed {
        let e = ProxyError::RbacDenied {
            details: decision.details.clone(),
        };
        let _ = writeln!(o, "{}", reply_line(&e));
        return;
    }
    let Some((_, backends)) = chosen else {
        let _ = writeln!(o, "{}", reply_line(&ProxyError::RouteNotFound));
        return;
    };
    if backends.total_weight == 0 {
        let _ = writeln!(o, "{}", reply_line(&ProxyError::NoBackendWeight));
        return;
    }
    let several = backends.backends.len() > 1;
    for b in &backends.backends {
        if several {
            let share = 100.0 * f64::from(b.weight) / backends.total_weight as f64;
            let _ = write!(o, "\n  {share:.1}%: ");
        }
        let line = match &b.backend {
            Backend::Invalid { .. } => reply_line(&ProxyError::ClusterNotFound),
            Backend::Cluster(c) if c.passthrough => {
                format!("proxied to {} at {} (resolution NONE)", c.name, req.to)
            }
            Backend::Cluster(c) if c.dynamic_dns.is_some() => format!(
                "proxied to {} at the address the Host resolves to (resolution DYNAMIC_DNS; else 503 \"DNS resolution failure\" DF)",
                c.name
            ),
            Backend::Cluster(c) if c.endpoints().is_empty() && c.dns.is_some() => format!(
                "proxied to {} once its DNS names resolve (else {})",
                c.name,
                reply_line(&ProxyError::NoHealthyUpstream)
            ),
            Backend::Cluster(c) if c.endpoints().is_empty() => {
                reply_line(&ProxyError::NoHealthyUpstream)
            }
            Backend::Cluster(c) => {
                let eps: Vec<String> = c
                    .endpoints()
                    .iter()
                    .map(|e| endpoint_note(c.locality_lb.as_deref(), e))
                    .collect();
                format!(
                    "proxied to {} endpoints [{}]{}",
                    c.name,
                    eps.join(", "),
                    c.locality_lb
                        .as_deref()
                        .map(locality_note)
                        .unwrap_or_default()
                )
            }
        };
        let _ = write!(o, "{line}");
    }
    o.push('\n');
}

/// An endpoint as `explain` lists it: its address, with its level or locality weight and
/// readiness when the cluster balances by locality.
fn endpoint_note(lb: Option<&policy::LocalityLb>, e: &policy::Endpoint) -> String {
    let mut notes = Vec::new();
    match lb {
        Some(lb) if lb.distribute.is_some() => {
            notes.push(format!("locality weight {}", e.locality_weight))
        }
        Some(_) => notes.push(format!("priority {}", e.priority)),
        None => {}
    }
    if !e.ready {
        notes.push("not ready".into());
    }
    if notes.is_empty() {
        e.addr.to_string()
    } else {
        format!("{} ({})", e.addr, notes.join(", "))
    }
}

/// How the cluster balances by locality (istiod's `localityLbSetting` or the Service's
/// `trafficDistribution`), for `explain`.
fn locality_note(lb: &policy::LocalityLb) -> String {
    if let Some(to) = &lb.distribute {
        let weights: Vec<String> = to.iter().map(|(l, w)| format!("{l} {w}%")).collect();
        return format!(
            "; locality weights from {}: {} (Envoy's locality-weighted balancing)",
            lb.proxy,
            weights.join(", ")
        );
    }
    let mut by = Vec::new();
    if !lb.failover_priority.is_empty() {
        let labels: Vec<String> = lb
            .failover_priority
            .iter()
            .map(|(l, v)| format!("{l}={v}"))
            .collect();
        by.push(format!("labels [{}]", labels.join(", ")));
    }
    if lb.by_locality {
        by.push(format!("locality (the waypoint's {})", lb.proxy));
    }
    format!(
        "; priority levels by {}, each taking 1.4 x its healthy share before the next{}",
        by.join(" then "),
        if lb.unready_hosts {
            " (trafficDistribution: not-ready endpoints count as unhealthy)"
        } else {
            ""
        }
    )
}

/// One line on a cluster's DestinationRule policy, for `explain`.
fn traffic_summary(t: &policy::traffic::TrafficPolicy) -> String {
    use policy::traffic::{HashKey, LbPolicy};
    let mut parts = vec![t.source.clone()];
    parts.push(match &t.lb {
        LbPolicy::LeastRequest => "LEAST_REQUEST".to_string(),
        LbPolicy::RoundRobin => "ROUND_ROBIN".to_string(),
        LbPolicy::Random => "RANDOM".to_string(),
        LbPolicy::ConsistentHash(h) => format!(
            "consistent hash by {}",
            match &h.key {
                HashKey::Header(n) => format!("header {n}"),
                HashKey::Cookie { name, .. } => format!("cookie {name}"),
                HashKey::SourceIp => "source IP".to_string(),
                HashKey::QueryParam(q) => format!("query parameter {q}"),
            }
        ),
    });
    let limit = |name: &str, v: Option<u32>| v.map(|n| format!("{name} {n}"));
    parts.extend(
        [
            limit("max requests", t.max_requests),
            limit("max connections", t.max_connections),
            limit("max pending", t.max_pending_requests),
            limit("max retries", t.max_retries),
            limit("max requests per connection", t.max_requests_per_connection),
        ]
        .into_iter()
        .flatten(),
    );
    if let Some(w) = &t.warmup {
        parts.push(format!(
            "warmup {:?} (minimum {}%, aggression {})",
            w.window, w.min_percent, w.aggression
        ));
    }
    if let Some((percent, min)) = t.retry_budget {
        parts.push(format!(
            "retry budget {percent}% of requests in flight, at least {min}"
        ));
    }
    if let Some(o) = &t.outlier {
        parts.push(format!(
            "outlier detection (5xx {}, gateway errors {}, ejection {:?}, max {}%)",
            o.consecutive_5xx.map_or("off".into(), |n| n.to_string()),
            o.consecutive_gateway
                .map_or("off".into(), |n| n.to_string()),
            o.base_ejection_time,
            o.max_ejection_percent
        ));
    }
    if let Some(tls) = &t.tls {
        parts.push(format!(
            "TLS {}{}",
            if tls.mutual { "MUTUAL" } else { "SIMPLE" },
            tls.sni
                .as_deref()
                .map(|s| format!(" sni {s}"))
                .unwrap_or_default()
        ));
    }
    parts.join(", ")
}

/// How `explain` words `includeRequestBodyInCheck`.
fn body_in_check(body: Option<crate::config::meshconfig::BodyInCheck>) -> String {
    match body {
        None => String::new(),
        Some(b) if b.allow_partial_message => format!(
            ", and the body's first {} bytes (held until then; x-envoy-auth-partial-body says if cut)",
            b.max_request_bytes
        ),
        Some(b) => format!(
            ", and the body (held; over {} bytes: 413 Payload Too Large)",
            b.max_request_bytes
        ),
    }
}
