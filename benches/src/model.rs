//! A bench configuration as data, and its rendering as Kubernetes manifests for our waypoint.
//!
//! The base topology is bookinfo-like (as `examples/bookinfo.yaml`): namespace `default`
//! bound to the waypoint `default/waypoint`; Services `reviews` (10.0.0.10), `ratings`
//! (10.0.0.11), `reviews-v1` (10.0.0.12), `reviews-v2` (10.0.0.13), all `http` on 9080; an
//! HTTPRoute on reviews splitting 90/10 between v1 and v2; one AuthorizationPolicy on the
//! waypoint allowing the `sleep` identity. Endpoints are the bench backends on loopback.
//!
//! Variants add decoy HTTPRoute rules (a request for `/reviews/0` still falls through to the
//! catch-all split, after every decoy has been tried), decoy ALLOW policies (for other
//! principals and paths, named to be evaluated before `allow-sleep`), or thousands of extra
//! Services.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

/// The namespace everything lives in.
pub const NAMESPACE: &str = "default";
/// The service port every Service uses.
pub const SERVICE_PORT: u16 = 9080;
/// CONNECT authority of the reviews Service.
pub const REVIEWS_AUTHORITY: &str = "10.0.0.10:9080";

/// Where the backends listen.
#[derive(Debug, Clone)]
pub struct Backends {
    pub reviews_v1: SocketAddr,
    pub reviews_v2: SocketAddr,
    pub ratings: SocketAddr,
    /// The HTTPS backend of Service `secure` (variant `tlsorig`).
    pub secure: SocketAddr,
    /// The gRPC (h2c) echo backend of Service `grpc` (variant `grpc`).
    pub grpc: SocketAddr,
}

impl Default for Backends {
    fn default() -> Self {
        let lo = Ipv4Addr::LOCALHOST;
        Backends {
            reviews_v1: (lo, 19081).into(),
            reviews_v2: (lo, 19082).into(),
            ratings: (lo, 19083).into(),
            secure: (lo, 19084).into(),
            grpc: (lo, 19086).into(),
        }
    }
}

/// What to put in the configuration beyond the base topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Total HTTPRoute rules on reviews (>= 1): `routes - 1` decoys plus the catch-all split.
    pub routes: usize,
    /// Total ALLOW AuthorizationPolicies on the waypoint (>= 1): decoys plus `allow-sleep`.
    pub policies: usize,
    /// Extra Services (each with its own VIP and EndpointSlice), bound to the waypoint.
    pub extra_services: usize,
    /// The decoys share the request's path prefix and differ only in a header, and the request
    /// matches the last of them by its header: no path index can skip any rule.
    pub header_decoys: bool,
    /// Service `secure` (10.0.0.14), whose endpoint speaks HTTPS: both proxies originate TLS
    /// to it (a DestinationRule `tls: SIMPLE` for ours, the UpstreamTlsContext istiod renders
    /// from it for Envoy); and Service `insecure` (10.0.0.15), the same over plaintext.
    pub tls_origination: bool,
    /// Tracing to an OTLP/gRPC collector at this sampling percentage (`trace<N>`): both
    /// proxies configured as istiod configures them from a MeshConfig `opentelemetry`
    /// provider and a mesh-wide Telemetry `randomSamplingPercentage: N`.
    pub tracing: Option<u8>,
    /// Service `grpc` (10.0.0.16), a `grpc` port whose endpoint speaks gRPC over h2c: both
    /// proxies forward HTTP/2 upstream (Envoy: the cluster's http2_protocol_options istiod
    /// renders for a gRPC port).
    pub grpc: bool,
}

impl Variant {
    pub const BASE: Variant = Variant {
        routes: 1,
        policies: 1,
        extra_services: 0,
        header_decoys: false,
        tls_origination: false,
        tracing: None,
        grpc: false,
    };

    /// `base`, `routes<N>`, `routes<N>h` (header decoys), `authz<N>`, `services<N>`,
    /// `tlsorig`, `trace<N>` (N percent sampled, 0..=100).
    pub fn parse(name: &str) -> Option<Variant> {
        if let Some(p) = name
            .strip_prefix("trace")
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|p| *p <= 100)
        {
            return Some(Variant {
                tracing: Some(p),
                ..Variant::BASE
            });
        }
        if name == "tlsorig" {
            return Some(Variant {
                tls_origination: true,
                ..Variant::BASE
            });
        }
        if name == "grpc" {
            return Some(Variant {
                grpc: true,
                ..Variant::BASE
            });
        }
        let num = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|n| n.parse::<usize>().ok())
        };
        if name == "base" {
            Some(Variant::BASE)
        } else if let Some(n) = name
            .strip_prefix("routes")
            .and_then(|n| n.strip_suffix('h'))
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(Variant {
                routes: n.max(1),
                header_decoys: true,
                ..Variant::BASE
            })
        } else if let Some(n) = num("routes") {
            Some(Variant {
                routes: n.max(1),
                ..Variant::BASE
            })
        } else if let Some(n) = num("authz") {
            Some(Variant {
                policies: n.max(1),
                ..Variant::BASE
            })
        } else {
            num("services").map(|n| Variant {
                extra_services: n,
                ..Variant::BASE
            })
        }
    }
}

/// A Service with one `http` port 9080.
#[derive(Debug, Clone)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub endpoints: Vec<SocketAddr>,
    /// The port is `grpc` (HTTP/2 to the endpoints), else `http`.
    pub grpc: bool,
}

impl Svc {
    /// The Service port's name: `grpc` or `http` (what tells both proxies the protocol).
    pub fn port_name(&self) -> &'static str {
        if self.grpc { "grpc" } else { "http" }
    }

    pub fn fqdn(&self) -> String {
        format!("{}.{NAMESPACE}.svc.cluster.local", self.name)
    }

    /// istiod's cluster (and filter chain) name for a Service port bound to a waypoint.
    pub fn cluster(&self) -> String {
        format!("inbound-vip|{SERVICE_PORT}|http|{}", self.fqdn())
    }
}

/// A path match of an HTTPRoute rule.
#[derive(Debug, Clone)]
pub enum PathKind {
    Exact(String),
    Prefix(String),
}

/// One HTTPRoute rule with a single match.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub path: PathKind,
    pub method: Option<String>,
    /// Exact header matches (lower-case names).
    pub headers: Vec<(String, String)>,
    /// (Service name, weight).
    pub backends: Vec<(String, u32)>,
}

impl Rule {
    /// Gateway API precedence key (smaller wins): Exact before Prefix, longer path first, then
    /// a method, then more headers; ties keep rule order.
    fn precedence(&self) -> (u8, std::cmp::Reverse<usize>, bool, std::cmp::Reverse<usize>) {
        let (rank, len) = match &self.path {
            PathKind::Exact(p) => (0, p.len()),
            PathKind::Prefix(p) => (1, p.len()),
        };
        (
            rank,
            std::cmp::Reverse(len),
            self.method.is_none(),
            std::cmp::Reverse(self.headers.len()),
        )
    }
}

/// One ALLOW AuthorizationPolicy targeting the waypoint, with a single rule.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    /// `from.source.principals` (`cluster.local/ns/x/sa/y`).
    pub principals: Vec<String>,
    /// `to.operation.paths` (a trailing `*` is a prefix match).
    pub paths: Vec<String>,
    /// `to.operation.methods`.
    pub methods: Vec<String>,
}

/// Everything a bench configuration contains.
#[derive(Debug, Clone)]
pub struct Model {
    pub services: Vec<Svc>,
    /// Rules of the HTTPRoute `reviews` (attached to Service reviews), in declaration order.
    pub reviews_rules: Vec<Rule>,
    pub policies: Vec<Policy>,
    pub trust_domain: String,
    /// CA file that verifies Service `secure`'s certificate (variant `tlsorig`).
    pub tls_ca: Option<String>,
    /// Sampling percentage and the OTLP/gRPC collector (variant `trace<N>`).
    pub tracing: Option<(u8, SocketAddr)>,
}

/// The tracing collector's Service (variant `trace<N>`).
pub const OTEL_HOST: &str = "otel.default.svc.cluster.local";
pub const OTEL_PORT: u16 = 4317;

/// The VIP of extra Service `i`: 10.16.0.1, 10.16.0.2, ... (never .0 or .255).
pub fn extra_vip(i: usize) -> Ipv4Addr {
    let n = i as u32;
    let (hi, lo) = (n / 254, n % 254 + 1);
    Ipv4Addr::new(10, 16 + (hi / 256) as u8, (hi % 256) as u8, lo as u8)
}

impl Model {
    pub fn new(variant: Variant, backends: &Backends) -> Model {
        let svc = |name: &str, vip: [u8; 4], endpoints: Vec<SocketAddr>| Svc {
            name: name.to_string(),
            vip: Ipv4Addr::from(vip),
            endpoints,
            grpc: false,
        };
        let mut services = vec![
            svc(
                "reviews",
                [10, 0, 0, 10],
                vec![backends.reviews_v1, backends.reviews_v2],
            ),
            svc("ratings", [10, 0, 0, 11], vec![backends.ratings]),
            svc("reviews-v1", [10, 0, 0, 12], vec![backends.reviews_v1]),
            svc("reviews-v2", [10, 0, 0, 13], vec![backends.reviews_v2]),
        ];
        for i in 0..variant.extra_services {
            services.push(Svc {
                name: format!("svc-{i:05}"),
                vip: extra_vip(i),
                endpoints: vec![backends.ratings],
                grpc: false,
            });
        }

        let mut reviews_rules = Vec::new();
        if variant.header_decoys {
            // Every rule matches /reviews/0 by path; only the `x-team` header tells them
            // apart, and the request's (`x-team: hit`) is the last rule of equal precedence
            // (Gateway API keeps declaration order), so every decoy is tried first.
            for i in 0..variant.routes.saturating_sub(2) {
                reviews_rules.push(Rule {
                    name: format!("decoy-{i}"),
                    path: PathKind::Prefix("/reviews".into()),
                    method: None,
                    headers: vec![("x-team".into(), format!("t{i}"))],
                    backends: vec![("reviews-v2".into(), 1)],
                });
            }
            reviews_rules.push(Rule {
                name: "team-hit".into(),
                path: PathKind::Prefix("/reviews".into()),
                method: None,
                headers: vec![("x-team".into(), "hit".into())],
                backends: vec![("reviews-v1".into(), 90), ("reviews-v2".into(), 10)],
            });
        }
        let plain_decoys = if variant.header_decoys {
            0
        } else {
            variant.routes.saturating_sub(1)
        };
        for i in 0..plain_decoys {
            // Decoys that a request for /reviews/0 never matches, alternating the kinds of
            // conditions a real route table carries.
            let rule = if i % 2 == 0 {
                Rule {
                    name: format!("decoy-{i}"),
                    path: PathKind::Prefix(format!("/team-{i}/api")),
                    method: None,
                    headers: vec![("x-team".into(), format!("t{i}"))],
                    backends: vec![("reviews-v1".into(), 1)],
                }
            } else {
                Rule {
                    name: format!("decoy-{i}"),
                    path: PathKind::Exact(format!("/reviews/{i}/edit")),
                    method: Some("PUT".into()),
                    headers: Vec::new(),
                    backends: vec![("reviews-v2".into(), 1)],
                }
            };
            reviews_rules.push(rule);
        }
        reviews_rules.push(Rule {
            name: "reviews-split".into(),
            path: PathKind::Prefix("/".into()),
            method: None,
            headers: Vec::new(),
            backends: vec![("reviews-v1".into(), 90), ("reviews-v2".into(), 10)],
        });

        let mut policies = Vec::new();
        // Named to sort before `allow-sleep`: policies are evaluated in name order, so every
        // request is checked against all the decoys before the one that allows it.
        for i in 0..variant.policies.saturating_sub(1) {
            policies.push(Policy {
                name: format!("access-team-{i:03}"),
                principals: vec![format!("cluster.local/ns/team-{i}/sa/client")],
                paths: vec![format!("/team-{i}/*")],
                methods: vec!["GET".into(), "POST".into()],
            });
        }
        policies.push(Policy {
            name: "allow-sleep".into(),
            principals: vec!["cluster.local/ns/default/sa/sleep".into()],
            paths: Vec::new(),
            methods: Vec::new(),
        });

        if variant.tls_origination {
            services.push(svc("secure", [10, 0, 0, 14], vec![backends.secure]));
            // The same shape over plaintext (no route, no DestinationRule, the same backend
            // process): the pair isolates the cost of TLS origination.
            services.push(svc("insecure", [10, 0, 0, 15], vec![backends.reviews_v1]));
        }
        if variant.grpc {
            services.push(Svc {
                grpc: true,
                ..svc("grpc", [10, 0, 0, 16], vec![backends.grpc])
            });
        }
        Model {
            services,
            reviews_rules,
            policies,
            trust_domain: "cluster.local".into(),
            tls_ca: None,
            tracing: None,
        }
    }

    /// Reviews rules in Gateway API precedence order (what istiod emits as Envoy routes).
    pub fn sorted_rules(&self) -> Vec<&Rule> {
        let mut v: Vec<&Rule> = self.reviews_rules.iter().collect();
        v.sort_by_key(|r| r.precedence());
        v
    }

    pub fn service(&self, name: &str) -> Option<&Svc> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Kubernetes manifests for our waypoint (multi-document YAML).
    /// The MeshConfig our waypoint reads (`--mesh-config`), when the variant needs one.
    pub fn mesh_config(&self) -> Option<String> {
        self.tracing.map(|_| {
            format!(
                "extensionProviders:\n- name: otel\n  opentelemetry:\n    service: {OTEL_HOST}\n    port: {OTEL_PORT}\n"
            )
        })
    }

    pub fn waypoint_manifests(&self) -> String {
        let mut out = String::with_capacity(1024 + self.services.len() * 700);
        out.push_str(
            "# Generated by `benchtool gen` (waypoint-benches): the bench configuration.\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    istio.io/use-waypoint: waypoint\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: default\n  labels:\n    istio.io/waypoint-for: service\n\
             spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n",
        );
        for s in &self.services {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {NAMESPACE}}}\n\
                 spec:\n  clusterIP: {vip}\n  ports: [{{name: {p}, port: {SERVICE_PORT}, targetPort: {SERVICE_PORT}}}]\n",
                n = s.name,
                vip = s.vip,
                p = s.port_name(),
            );
            // One slice per distinct endpoint port (an EndpointSlice has one port list).
            let mut ports: Vec<u16> = s.endpoints.iter().map(|e| e.port()).collect();
            ports.sort_unstable();
            ports.dedup();
            for (k, port) in ports.iter().enumerate() {
                let _ = write!(
                    out,
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-{k}\n  namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: {n}}}\n\
                     addressType: IPv4\nendpoints:\n",
                    n = s.name
                );
                for e in s.endpoints.iter().filter(|e| e.port() == *port) {
                    let _ = writeln!(
                        out,
                        "- addresses: [\"{}\"]\n  conditions: {{ready: true}}",
                        e.ip()
                    );
                }
                let _ = writeln!(
                    out,
                    "ports: [{{name: {}, port: {port}, protocol: TCP}}]",
                    s.port_name()
                );
            }
        }
        if let (Some(ca), Some(_)) = (&self.tls_ca, self.service("secure")) {
            // TLS origination to `secure`'s HTTPS endpoint: SNI and checked name are the
            // Service hostname (our default; Envoy's config says the same explicitly).
            let _ = write!(
                out,
                "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: secure, namespace: {NAMESPACE}}}\n\
                 spec: {{host: secure, trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: \"{ca}\"}}}}}}\n"
            );
        }
        if let Some((percent, sink)) = self.tracing {
            // The collector's Service (istiod resolves the provider's `service` to it) and a
            // mesh-wide Telemetry selecting the provider.
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: otel, namespace: {NAMESPACE}, labels: {{istio.io/use-waypoint: none}}}}\n\
                 spec:\n  clusterIP: 10.0.0.90\n  ports: [{{name: grpc, port: {OTEL_PORT}}}]\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: otel-0\n  namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: otel}}\n\
                 addressType: IPv4\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\nports: [{{name: grpc, port: {port}, protocol: TCP}}]\n\
                 ---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\n\
                 spec:\n  tracing:\n  - providers: [{{name: otel}}]\n    randomSamplingPercentage: {percent}\n",
                ip = sink.ip(),
                port = sink.port(),
            );
        }
        out.push_str(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: reviews\n  namespace: default\n\
             spec:\n  parentRefs:\n  - {group: \"\", kind: Service, name: reviews, port: 9080}\n  rules:\n",
        );
        for r in &self.reviews_rules {
            let _ = writeln!(out, "  - name: {}", r.name);
            let path = match &r.path {
                PathKind::Exact(p) => format!("{{type: Exact, value: \"{p}\"}}"),
                PathKind::Prefix(p) => format!("{{type: PathPrefix, value: \"{p}\"}}"),
            };
            let _ = write!(out, "    matches:\n    - path: {path}\n");
            if let Some(m) = &r.method {
                let _ = writeln!(out, "      method: {m}");
            }
            if !r.headers.is_empty() {
                out.push_str("      headers:\n");
                for (k, v) in &r.headers {
                    let _ = writeln!(out, "      - {{type: Exact, name: {k}, value: \"{v}\"}}");
                }
            }
            out.push_str("    backendRefs:\n");
            for (svc, w) in &r.backends {
                let _ = writeln!(
                    out,
                    "    - {{name: {svc}, port: {SERVICE_PORT}, weight: {w}}}"
                );
            }
        }
        for p in &self.policies {
            let _ = write!(
                out,
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {n}\n  namespace: {NAMESPACE}\n\
                 spec:\n  targetRefs:\n  - {{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}\n  action: ALLOW\n  rules:\n\
                 \x20 - from:\n    - source:\n        principals: [{pr}]\n",
                n = p.name,
                pr = quoted_list(&p.principals)
            );
            if !p.paths.is_empty() || !p.methods.is_empty() {
                out.push_str("    to:\n    - operation:\n");
                if !p.paths.is_empty() {
                    let _ = writeln!(out, "        paths: [{}]", quoted_list(&p.paths));
                }
                if !p.methods.is_empty() {
                    let _ = writeln!(out, "        methods: [{}]", quoted_list(&p.methods));
                }
            }
        }
        out
    }
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse() {
        assert_eq!(Variant::parse("base"), Some(Variant::BASE));
        assert_eq!(Variant::parse("routes100").map(|v| v.routes), Some(100));
        let h = Variant::parse("routes100h").unwrap();
        assert!(h.header_decoys && h.routes == 100);
        let m = Model::new(h, &Backends::default());
        let sorted = m.sorted_rules();
        assert_eq!(sorted.len(), 100);
        assert_eq!(
            sorted[98].name, "team-hit",
            "the hit is the last header rule"
        );
        assert_eq!(sorted[99].name, "reviews-split");
        assert_eq!(Variant::parse("authz100").map(|v| v.policies), Some(100));
        assert_eq!(
            Variant::parse("services10000").map(|v| v.extra_services),
            Some(10_000)
        );
        assert_eq!(Variant::parse("nope"), None);
    }

    #[test]
    fn extra_vips_are_distinct() {
        let mut v: Vec<_> = (0..70_000).map(extra_vip).collect();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 70_000);
        assert!(
            v.iter()
                .all(|ip| ip.octets()[3] != 0 && ip.octets()[3] != 255)
        );
    }

    #[test]
    fn catch_all_sorts_last() {
        let m = Model::new(Variant::parse("routes100").unwrap(), &Backends::default());
        let sorted = m.sorted_rules();
        assert_eq!(sorted.len(), 100);
        assert_eq!(sorted.last().unwrap().name, "reviews-split");
    }
}
