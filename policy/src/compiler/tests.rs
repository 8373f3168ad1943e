use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

use crate::{
    AppProtocol, Backend, CompileOptions, ConfigError, RouteTable, Snapshot, VipLookup,
    WaypointFor, compile, parse_manifests,
};

const NS_LABELLED: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}\n";
const NS_PLAIN: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n";

fn gateway(labels: &str, allowed: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: default, labels: {{{labels}}}}}\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE{allowed}}}\n"
    )
}

fn service(ns: &str, name: &str, ip: &str, labels: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{clusterIP: {ip}, ports: {ports}}}\n"
    )
}

const HTTP_PORT: &str = "[{name: http, port: 9080}]";

fn slice(ns: &str, svc: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\n{body}\n"
    )
}

fn route(ns: &str, name: &str, meta_extra: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}{meta_extra}}}\nspec: {spec}\n"
    )
}

fn docs(parts: &[&str]) -> String {
    parts.join("---\n")
}

fn build(yaml: &str) -> Result<Snapshot, Vec<ConfigError>> {
    let loaded = parse_manifests(yaml, "test.yaml").expect("test YAML parses");
    compile(&loaded, &CompileOptions::default())
}

fn ok(yaml: &str) -> Snapshot {
    build(yaml).unwrap_or_else(|e| panic!("compile failed: {e:#?}"))
}

fn errs(yaml: &str) -> Vec<ConfigError> {
    match build(yaml) {
        Ok(_) => panic!("expected compile errors"),
        Err(e) => e,
    }
}

/// Assert exactly one error with this kind/ns/name/field.
fn assert_error(errors: &[ConfigError], kind: &str, ns: &str, name: &str, field: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.kind == kind && e.namespace == ns && e.name == name && e.field == field),
        "no error {kind} {ns}/{name} {field} in {errors:#?}"
    );
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn not_bound_reason(snap: &Snapshot, a: &str) -> String {
    match snap.lookup_vip(addr(a)) {
        VipLookup::NotBound(r) => r,
        other => panic!("{a}: expected NotBound, got {other:?}"),
    }
}

fn bound(snap: &Snapshot, a: &str) -> Arc<crate::ServicePort> {
    match snap.lookup_vip(addr(a)) {
        VipLookup::Bound(sp) => sp,
        other => panic!("{a}: expected Bound, got {other:?}"),
    }
}

/// Base config: labelled namespace, waypoint, Service `reviews` 10.0.0.10:9080.
fn base(extra: &[&str]) -> String {
    let gw = gateway("istio.io/waypoint-for: service", "");
    let svc = service("default", "reviews", "10.0.0.10", "", HTTP_PORT);
    let mut parts = vec![NS_LABELLED, gw.as_str(), svc.as_str()];
    parts.extend_from_slice(extra);
    docs(&parts)
}

// --- the example -------------------------------------------------------------------------

#[test]
fn bookinfo_example_compiles_as_documented() {
    let snap = ok(include_str!("../../tests-data/bookinfo.yaml"));
    assert_eq!(snap.gateway.waypoint_for, WaypointFor::Service);
    let reviews = bound(&snap, "10.0.0.10:9080");
    let table = reviews.routes.as_ref().expect("reviews has a route");
    assert_eq!(table.len(), 1);
    let rule = table
        .select(&Method::GET, "/reviews/1", None, &HeaderMap::new())
        .expect("rule matches");
    assert_eq!(&*rule.name, "reviews-split");
    assert_eq!(rule.backends.total_weight, 100);
    let names: Vec<_> = rule
        .backends
        .backends
        .iter()
        .map(|b| match &b.backend {
            Backend::Cluster(c) => (c.name.to_string(), b.weight, c.endpoints()[0].addr),
            Backend::Invalid { reason } => panic!("invalid backend: {reason}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            (
                "inbound-vip|9080|http|reviews-v1.default.svc.cluster.local".to_string(),
                90,
                addr("127.0.0.11:9080")
            ),
            (
                "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local".to_string(),
                10,
                addr("127.0.0.12:9080")
            ),
        ]
    );
    let ratings = bound(&snap, "10.0.0.11:9080");
    assert!(ratings.routes.is_none());
    assert_eq!(
        &*ratings.cluster.name,
        "inbound-vip|9080|http|ratings.default.svc.cluster.local"
    );
    assert_eq!(ratings.cluster.endpoints()[0].addr, addr("127.0.0.13:9080"));
    assert_eq!(reviews.cluster.endpoints().len(), 2);
    assert!(matches!(
        snap.lookup_vip(addr("10.0.0.10:80")),
        VipLookup::Unknown
    ));
    assert_eq!(snap.bound_services().len(), 4);
}

// --- Gateway ---------------------------------------------------------------------------

#[test]
fn missing_gateway_is_an_error_listing_the_known_ones() {
    let other = gateway("", "").replace(
        "name: waypoint, namespace: default",
        "name: gw, namespace: other",
    );
    let e = errs(&docs(&[NS_LABELLED, &other]));
    assert_error(&e, "Gateway", "default", "waypoint", "");
    assert!(
        e[0].message.contains("--gateway") && e[0].message.contains("other/gw"),
        "{}",
        e[0].message
    );
}

#[test]
fn gateway_class_must_be_istio_waypoint() {
    let gw = gateway("", "").replace("istio-waypoint", "istio");
    assert_error(
        &errs(&docs(&[NS_LABELLED, &gw])),
        "Gateway",
        "default",
        "waypoint",
        "spec.gatewayClassName",
    );
}

#[test]
fn invalid_waypoint_for_label_is_an_error() {
    let gw = gateway("istio.io/waypoint-for: pods", "");
    let e = errs(&docs(&[NS_LABELLED, &gw]));
    assert_error(
        &e,
        "Gateway",
        "default",
        "waypoint",
        "metadata.labels[\"istio.io/waypoint-for\"]",
    );
}

#[test]
fn waypoint_for_falls_back_to_gateway_class_label() {
    let class = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio-waypoint, labels: {istio.io/waypoint-for: workload}}\nspec: {controllerName: istio.io/mesh-controller}\n";
    let gw = gateway("", "");
    let svc = service("default", "reviews", "10.0.0.10", "", HTTP_PORT);
    let snap = ok(&docs(&[NS_LABELLED, &gw, class, &svc]));
    assert_eq!(snap.gateway.waypoint_for, WaypointFor::Workload);
    let reason = not_bound_reason(&snap, "10.0.0.10:9080");
    assert!(
        reason.contains("waypoint-for=workload")
            && reason.contains("does not admit service traffic"),
        "{reason}"
    );
    // The Gateway label wins over the class label.
    let gw = gateway("istio.io/waypoint-for: all", "");
    let svc = service("default", "reviews", "10.0.0.10", "", HTTP_PORT);
    let snap = ok(&docs(&[NS_LABELLED, &gw, class, &svc]));
    assert_eq!(snap.gateway.waypoint_for, WaypointFor::All);
    bound(&snap, "10.0.0.10:9080");
}

#[test]
fn waypoint_for_defaults_to_service() {
    let gw = gateway("", "");
    let svc = service("default", "reviews", "10.0.0.10", "", HTTP_PORT);
    let snap = ok(&docs(&[NS_LABELLED, &gw, &svc]));
    assert_eq!(snap.gateway.waypoint_for, WaypointFor::Service);
    bound(&snap, "10.0.0.10:9080");
}

#[test]
fn invalid_allowed_routes_from_is_an_error() {
    let gw = gateway("", ", allowedRoutes: {namespaces: {from: Some}}");
    let e = errs(&docs(&[NS_LABELLED, &gw]));
    assert_error(
        &e,
        "Gateway",
        "default",
        "waypoint",
        "spec.listeners[0].allowedRoutes.namespaces.from",
    );
}

// --- binding ----------------------------------------------------------------------------

fn bind_case(
    ns_doc: &str,
    gw_labels: &str,
    allowed: &str,
    svc_ns: &str,
    svc_labels: &str,
) -> Snapshot {
    let gw = gateway(gw_labels, allowed);
    let svc = service(svc_ns, "x", "10.0.1.1", svc_labels, HTTP_PORT);
    ok(&docs(&[ns_doc, &gw, &svc]))
}

#[test]
fn service_label_binds_without_namespace_label() {
    let snap = bind_case(
        NS_PLAIN,
        "",
        "",
        "default",
        "istio.io/use-waypoint: waypoint",
    );
    bound(&snap, "10.0.1.1:9080");
}

#[test]
fn namespace_label_binds_services_in_it() {
    let snap = bind_case(NS_LABELLED, "", "", "default", "");
    bound(&snap, "10.0.1.1:9080");
}

#[test]
fn no_label_anywhere_is_not_bound() {
    let snap = bind_case(NS_PLAIN, "", "", "default", "");
    assert_eq!(
        not_bound_reason(&snap, "10.0.1.1:9080"),
        "Service default/x has no istio.io/use-waypoint label (nor does its namespace)"
    );
}

#[test]
fn service_none_label_opts_out_despite_namespace_label() {
    let snap = bind_case(
        NS_LABELLED,
        "",
        "",
        "default",
        "istio.io/use-waypoint: none",
    );
    assert!(not_bound_reason(&snap, "10.0.1.1:9080").contains("opted out"));
}

#[test]
fn service_label_naming_other_waypoint_overrides_namespace_label() {
    let snap = bind_case(
        NS_LABELLED,
        "",
        "",
        "default",
        "istio.io/use-waypoint: foo, istio.io/use-waypoint-namespace: other-ns",
    );
    let reason = not_bound_reason(&snap, "10.0.1.1:9080");
    assert!(
        reason.starts_with("Service default/x is bound to waypoint other-ns/foo"),
        "{reason}"
    );
}

#[test]
fn waypoint_for_workload_does_not_bind_services() {
    let snap = bind_case(
        NS_LABELLED,
        "istio.io/waypoint-for: workload",
        "",
        "default",
        "",
    );
    assert!(not_bound_reason(&snap, "10.0.1.1:9080").contains("does not admit service traffic"));
}

#[test]
fn gateway_own_service_never_gets_a_waypoint() {
    let snap = bind_case(
        NS_LABELLED,
        "",
        "",
        "default",
        "gateway.networking.k8s.io/gateway-name: waypoint",
    );
    assert!(not_bound_reason(&snap, "10.0.1.1:9080").contains("waypoints never get a waypoint"));
}

const CROSS_NS_LABELS: &str =
    "istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: default";

#[test]
fn cross_namespace_binding_denied_by_default_same() {
    let snap = bind_case(NS_PLAIN, "", "", "apps", CROSS_NS_LABELS);
    let reason = not_bound_reason(&snap, "10.0.1.1:9080");
    assert!(
        reason.contains("does not admit namespace apps") && reason.contains("from=Same"),
        "{reason}"
    );
}

#[test]
fn cross_namespace_binding_admitted_by_all() {
    let snap = bind_case(
        NS_PLAIN,
        "",
        ", allowedRoutes: {namespaces: {from: All}}",
        "apps",
        CROSS_NS_LABELS,
    );
    bound(&snap, "10.0.1.1:9080");
}

#[test]
fn cross_namespace_binding_by_selector_uses_namespace_labels() {
    let allowed =
        ", allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {mesh: 'yes'}}}}";
    let apps_yes =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {mesh: 'yes'}}\n";
    let snap = bind_case(apps_yes, "", allowed, "apps", CROSS_NS_LABELS);
    bound(&snap, "10.0.1.1:9080");
    let apps_no = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {mesh: 'no'}}\n";
    let snap = bind_case(apps_no, "", allowed, "apps", CROSS_NS_LABELS);
    assert!(not_bound_reason(&snap, "10.0.1.1:9080").contains("from=Selector"));
    // The API server's automatic namespace name label is honoured.
    let by_name = ", allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {kubernetes.io/metadata.name: apps}}}}";
    bound(
        &bind_case(NS_PLAIN, "", by_name, "apps", CROSS_NS_LABELS),
        "10.0.1.1:9080",
    );
}

#[test]
fn use_waypoint_namespace_comes_from_the_object_that_named_the_waypoint() {
    // Namespace apps names default/waypoint; the Service has no labels of its own.
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: default}}\n";
    let snap = bind_case(
        ns,
        "",
        ", allowedRoutes: {namespaces: {from: All}}",
        "apps",
        "",
    );
    bound(&snap, "10.0.1.1:9080");
    // A Service label naming the waypoint ignores the namespace's use-waypoint-namespace.
    let snap = bind_case(
        ns,
        "",
        ", allowedRoutes: {namespaces: {from: All}}",
        "apps",
        "istio.io/use-waypoint: waypoint",
    );
    assert!(not_bound_reason(&snap, "10.0.1.1:9080").contains("bound to waypoint apps/waypoint"));
}

#[test]
fn every_cluster_ip_is_indexed_including_ipv6() {
    let gw = gateway("", "");
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: dual}\nspec: {clusterIP: 10.0.2.1, clusterIPs: [10.0.2.1, 'fd00::1'], ports: [{name: http, port: 80}]}\n";
    let snap = ok(&docs(&[NS_LABELLED, &gw, svc]));
    let v4 = bound(&snap, "10.0.2.1:80");
    let v6 = bound(&snap, "[fd00::1]:80");
    assert!(Arc::ptr_eq(&v4.cluster, &v6.cluster));
    assert_eq!(v6.vip, addr("[fd00::1]:80"));
}

#[test]
fn headless_service_has_no_vip() {
    let svc = service("default", "h", "None", "", HTTP_PORT);
    let snap = ok(&base(&[&svc]));
    assert_eq!(snap.bound_services().len(), 1);
}

// --- protocols and clusters -------------------------------------------------------------

#[test]
fn port_protocol_follows_app_protocol_then_name_prefix() {
    use crate::resources::ServicePortSpec;
    let p = |name: &str, app: Option<&str>| {
        super::port_protocol(&ServicePortSpec {
            name: Some(name.into()),
            app_protocol: app.map(Into::into),
            ..Default::default()
        })
    };
    let cases = [
        (p("tcp", Some("http")), AppProtocol::Http),
        (p("x", Some("kubernetes.io/h2c")), AppProtocol::Http2),
        (p("x", Some("HTTPS")), AppProtocol::Tcp),
        (p("http-web", Some("bogus")), AppProtocol::Http),
        (p("http", None), AppProtocol::Http),
        (p("http2-x", None), AppProtocol::Http2),
        (p("grpc", None), AppProtocol::Grpc),
        (p("grpc-web", None), AppProtocol::Http),
        (p("redis-main", None), AppProtocol::Tcp),
        (p("https", None), AppProtocol::Tcp),
        (p("httpx", None), AppProtocol::Unknown),
        (p("", None), AppProtocol::Unknown),
    ];
    for (i, (got, want)) in cases.into_iter().enumerate() {
        assert_eq!(got, want, "case {i}");
    }
}

#[test]
fn cluster_names_follow_istiod() {
    let ports = "[{name: http, port: 80}, {name: tcp-db, port: 5432}, {port: 7000}]";
    let svc = service("default", "multi", "10.0.3.1", "", ports);
    let snap = ok(&base(&[&svc]));
    let name = |a: &str| bound(&snap, a).cluster.name.to_string();
    assert_eq!(
        name("10.0.3.1:80"),
        "inbound-vip|80|http|multi.default.svc.cluster.local"
    );
    assert_eq!(
        name("10.0.3.1:5432"),
        "inbound-vip|5432|tcp|multi.default.svc.cluster.local"
    );
    assert_eq!(
        name("10.0.3.1:7000"),
        "inbound-vip|7000|http|multi.default.svc.cluster.local"
    );
    assert_eq!(bound(&snap, "10.0.3.1:7000").protocol, AppProtocol::Unknown);
}

#[test]
fn backend_to_service_not_bound_here_uses_outbound_cluster() {
    let other = service(
        "default",
        "ext",
        "10.0.3.2",
        "istio.io/use-waypoint: none",
        HTTP_PORT,
    );
    let r = route(
        "default",
        "r",
        "",
        "{parentRefs: [{group: '', kind: Service, name: reviews}], rules: [{backendRefs: [{name: ext, port: 9080}]}]}",
    );
    let snap = ok(&base(&[&other, &r]));
    assert!(
        snap.cluster("outbound|9080||ext.default.svc.cluster.local")
            .is_some()
    );
    let options = CompileOptions {
        cluster_domain: "corp.example".into(),
        ..Default::default()
    };
    let loaded = parse_manifests(&base(&[&other, &r]), "t").expect("parses");
    let snap = compile(&loaded, &options).expect("compiles");
    assert!(
        snap.cluster("outbound|9080||ext.default.svc.corp.example")
            .is_some()
    );
    assert!(
        snap.cluster("inbound-vip|9080|http|reviews.default.svc.corp.example")
            .is_some()
    );
}

// --- endpoints --------------------------------------------------------------------------

fn endpoints(snap: &Snapshot, a: &str) -> Vec<SocketAddr> {
    bound(snap, a)
        .cluster
        .endpoints()
        .iter()
        .map(|e| e.addr)
        .collect()
}

#[test]
fn endpoint_target_port_comes_from_the_slice_port_with_the_service_port_name() {
    let s = slice(
        "default",
        "reviews",
        "s1",
        "endpoints: [{addresses: [10.1.0.2]}]\nports: [{name: other, port: 1}, {name: http, port: 8080}]",
    );
    assert_eq!(
        endpoints(&ok(&base(&[&s])), "10.0.0.10:9080"),
        [addr("10.1.0.2:8080")]
    );
}

#[test]
fn unnamed_service_port_matches_unnamed_slice_port() {
    let svc = service("default", "u", "10.0.4.1", "", "[{port: 80}]");
    let s = slice(
        "default",
        "u",
        "s1",
        "endpoints: [{addresses: [10.1.0.3]}]\nports: [{name: '', port: 8081}]",
    );
    assert_eq!(
        endpoints(&ok(&base(&[&svc, &s])), "10.0.4.1:80"),
        [addr("10.1.0.3:8081")]
    );
}

#[test]
fn without_matching_slice_port_use_numeric_target_port_else_service_port() {
    let svc = service(
        "default",
        "t",
        "10.0.4.2",
        "",
        "[{name: http, port: 80, targetPort: 8082}, {name: web, port: 81, targetPort: web}]",
    );
    let s = slice(
        "default",
        "t",
        "s1",
        "endpoints: [{addresses: [10.1.0.4]}]\nports: [{name: grpc, port: 1}]",
    );
    let snap = ok(&base(&[&svc, &s]));
    assert_eq!(endpoints(&snap, "10.0.4.2:80"), [addr("10.1.0.4:8082")]);
    assert_eq!(endpoints(&snap, "10.0.4.2:81"), [addr("10.1.0.4:81")]);
}

#[test]
fn only_ready_endpoints_deduplicated_and_sorted() {
    let s1 = slice(
        "default",
        "reviews",
        "s1",
        "endpoints: [{addresses: [10.1.0.9], conditions: {ready: true}}, {addresses: [10.1.0.5], conditions: {ready: false}}, {addresses: [10.1.0.7]}]\nports: [{name: http, port: 9080}]",
    );
    let s2 = slice(
        "default",
        "reviews",
        "s2",
        "endpoints: [{addresses: [10.1.0.9, 10.1.0.1]}]\nports: [{name: http, port: 9080}]",
    );
    let elsewhere = slice(
        "other",
        "reviews",
        "s3",
        "endpoints: [{addresses: [10.9.9.9]}]\nports: [{name: http, port: 9080}]",
    );
    let snap = ok(&base(&[&s1, &s2, &elsewhere]));
    assert_eq!(
        endpoints(&snap, "10.0.0.10:9080"),
        [
            addr("10.1.0.1:9080"),
            addr("10.1.0.7:9080"),
            addr("10.1.0.9:9080")
        ]
    );
}

// --- validation errors ------------------------------------------------------------------

#[test]
fn invalid_service_fields_are_errors_on_the_field() {
    let a = service("default", "a", "10.0.0.300", "", HTTP_PORT);
    let b = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIPs: [10.0.5.1, nope], ports: [{port: 0}, {port: 70000}, {port: 1, targetPort: 99999}]}\n";
    let e = errs(&base(&[&a, b]));
    assert_error(&e, "Service", "default", "a", "spec.clusterIP");
    assert_error(&e, "Service", "default", "b", "spec.clusterIPs[1]");
    assert_error(&e, "Service", "default", "b", "spec.ports[0].port");
    assert_error(&e, "Service", "default", "b", "spec.ports[1].port");
    assert_error(&e, "Service", "default", "b", "spec.ports[2].targetPort");
    assert_eq!(e.len(), 5, "{e:#?}");
}

#[test]
fn duplicate_vip_port_is_an_error_on_the_later_service() {
    let dup = service("default", "zzz-dup", "10.0.0.10", "", HTTP_PORT);
    let e = errs(&base(&[&dup]));
    assert_eq!(e.len(), 1);
    assert_error(&e, "Service", "default", "zzz-dup", "spec.ports[0].port");
    assert!(e[0].message.contains("default/reviews"), "{}", e[0].message);
}

#[test]
fn duplicate_resource_is_an_error() {
    let svc = service("default", "reviews", "10.0.0.99", "", HTTP_PORT);
    assert_error(
        &errs(&base(&[&svc])),
        "Service",
        "default",
        "reviews",
        "metadata.name",
    );
}

#[test]
fn endpoint_address_that_is_not_an_ip_is_an_error() {
    let s = slice(
        "default",
        "reviews",
        "bad",
        "endpoints: [{addresses: [10.1.0.1]}, {addresses: [10.1.0.2, pod.local]}]\nports: [{name: http, port: 0}]",
    );
    let e = errs(&base(&[&s]));
    assert_error(
        &e,
        "EndpointSlice",
        "default",
        "bad",
        "endpoints[1].addresses[1]",
    );
    assert_error(&e, "EndpointSlice", "default", "bad", "ports[0].port");
}

fn route_errors(rule: &str) -> Vec<ConfigError> {
    let r = route(
        "default",
        "r",
        "",
        &format!("{{parentRefs: [{{group: '', kind: Service, name: reviews}}], rules: [{rule}]}}"),
    );
    errs(&base(&[&r]))
}

#[test]
fn route_validation_errors_name_the_field() {
    let cases = [
        (
            "{matches: [{}, {path: {type: Exact, value: foo}}]}",
            "spec.rules[0].matches[1].path.value",
        ),
        (
            "{matches: [{path: {value: foo}}]}",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "{matches: [{path: {type: RegularExpression, value: '(unclosed'}}]}",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "{matches: [{path: {type: Glob, value: /x}}]}",
            "spec.rules[0].matches[0].path.type",
        ),
        (
            "{matches: [{headers: [{name: 'bad name', value: x}]}]}",
            "spec.rules[0].matches[0].headers[0].name",
        ),
        (
            "{matches: [{headers: [{name: x, type: RegularExpression, value: '['}]}]}",
            "spec.rules[0].matches[0].headers[0].value",
        ),
        (
            "{matches: [{headers: [{name: x, type: Prefix, value: a}]}]}",
            "spec.rules[0].matches[0].headers[0].type",
        ),
        (
            "{matches: [{queryParams: [{name: '', value: a}]}]}",
            "spec.rules[0].matches[0].queryParams[0].name",
        ),
        (
            "{matches: [{queryParams: [{name: q, type: RegularExpression, value: '('}]}]}",
            "spec.rules[0].matches[0].queryParams[0].value",
        ),
        (
            "{matches: [{method: get}]}",
            "spec.rules[0].matches[0].method",
        ),
        (
            "{backendRefs: [{name: reviews, port: 9080, weight: 1000001}]}",
            "spec.rules[0].backendRefs[0].weight",
        ),
        (
            "{backendRefs: [{name: reviews, port: 9080}, {name: reviews, port: 9080, weight: -1}]}",
            "spec.rules[0].backendRefs[1].weight",
        ),
        (
            "{backendRefs: [{name: reviews, port: 65536}]}",
            "spec.rules[0].backendRefs[0].port",
        ),
    ];
    for (rule, field) in cases {
        let e = route_errors(rule);
        assert_eq!(e.len(), 1, "{rule}: {e:#?}");
        assert_error(&e, "HTTPRoute", "default", "r", field);
    }
}

#[test]
fn parent_ref_port_out_of_range_is_an_error() {
    let r = route(
        "default",
        "r",
        "",
        "{parentRefs: [{group: '', kind: Service, name: reviews, port: 0}]}",
    );
    assert_error(
        &errs(&base(&[&r])),
        "HTTPRoute",
        "default",
        "r",
        "spec.parentRefs[0].port",
    );
}

#[test]
fn errors_from_all_resources_are_collected() {
    let a = service("default", "a", "bad-ip", "", HTTP_PORT);
    let r = route(
        "other",
        "r",
        "",
        "{rules: [{matches: [{path: {type: Exact, value: x}}]}]}",
    );
    let e = errs(&base(&[&a, &r]));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_error(
        &e,
        "HTTPRoute",
        "other",
        "r",
        "spec.rules[0].matches[0].path.value",
    );
}

// --- route attachment -------------------------------------------------------------------

fn has_warning(snap: &Snapshot, needle: &str) -> bool {
    snap.warnings.iter().any(|w| w.contains(needle))
}

const ALL_RULE: &str = "rules: [{name: hit}]";

#[test]
fn consumer_route_is_skipped_with_a_warning() {
    let r = route(
        "apps",
        "r",
        "",
        &format!(
            "{{parentRefs: [{{group: '', kind: Service, name: reviews, namespace: default}}], {ALL_RULE}}}"
        ),
    );
    let snap = ok(&base(&[&r]));
    assert!(bound(&snap, "10.0.0.10:9080").routes.is_none());
    assert!(has_warning(&snap, "consumer route"), "{:?}", snap.warnings);
}

#[test]
fn parent_ref_defaults_to_gateway_and_is_skipped() {
    let r = route(
        "default",
        "r",
        "",
        &format!(
            "{{parentRefs: [{{kind: Service, name: reviews}}, {{name: waypoint}}], {ALL_RULE}}}"
        ),
    );
    let snap = ok(&base(&[&r]));
    assert!(bound(&snap, "10.0.0.10:9080").routes.is_none());
    assert_eq!(
        snap.warnings
            .iter()
            .filter(|w| w.contains("not a mesh Service parent"))
            .count(),
        2
    );
}

#[test]
fn parent_not_bound_or_missing_is_a_warning() {
    let other = service(
        "default",
        "plain",
        "10.0.6.1",
        "istio.io/use-waypoint: none",
        HTTP_PORT,
    );
    let r = route(
        "default",
        "r",
        "",
        &format!(
            "{{parentRefs: [{{group: '', kind: Service, name: plain}}, {{group: '', kind: Service, name: ghost}}], {ALL_RULE}}}"
        ),
    );
    let snap = ok(&base(&[&other, &r]));
    assert!(has_warning(
        &snap,
        "label missing from parent and parent namespace; in ambient mode, route will not be respected"
    ));
    assert!(has_warning(&snap, "parent Service default/ghost not found"));
}

#[test]
fn parent_port_and_section_name_select_service_ports() {
    let svc = service(
        "default",
        "p",
        "10.0.6.2",
        "",
        "[{name: http, port: 80}, {name: admin, port: 81}]",
    );
    let attach = |parent: &str| {
        let r = route(
            "default",
            "r",
            "",
            &format!("{{parentRefs: [{{group: '', kind: Service, name: p{parent}}}], {ALL_RULE}}}"),
        );
        let snap = ok(&base(&[&svc, &r]));
        (
            bound(&snap, "10.0.6.2:80").routes.is_some(),
            bound(&snap, "10.0.6.2:81").routes.is_some(),
        )
    };
    assert_eq!(attach(""), (true, true));
    assert_eq!(attach(", port: 81"), (false, true));
    assert_eq!(attach(", sectionName: http"), (true, false));
    assert_eq!(attach(", port: 81, sectionName: admin"), (false, true));
    assert_eq!(attach(", port: 81, sectionName: http"), (false, false));
}

// --- backends ---------------------------------------------------------------------------

fn rule_of(extra: &[&str], rule: &str) -> (Snapshot, Arc<crate::RouteRule>) {
    let r = route(
        "default",
        "r",
        "",
        &format!("{{parentRefs: [{{group: '', kind: Service, name: reviews}}], rules: [{rule}]}}"),
    );
    let mut parts: Vec<&str> = extra.to_vec();
    parts.push(&r);
    let snap = ok(&base(&parts));
    let table = bound(&snap, "10.0.0.10:9080")
        .routes
        .clone()
        .expect("route attached");
    let rule = table
        .select(&Method::GET, "/", None, &HeaderMap::new())
        .expect("matches")
        .clone();
    (snap, rule)
}

fn invalid_reasons(rule: &crate::RouteRule) -> Vec<String> {
    rule.backends
        .backends
        .iter()
        .filter_map(|b| match &b.backend {
            Backend::Invalid { reason } => Some(reason.to_string()),
            Backend::Cluster(_) => None,
        })
        .collect()
}

#[test]
fn invalid_backends_are_kept_with_a_reason() {
    let (snap, rule) = rule_of(
        &[],
        "{backendRefs: [{name: reviews, namespace: other, port: 9080}, {name: ghost, port: 80}, {name: reviews}, {name: reviews, port: 1234}, {name: x, kind: ServiceImport, group: multicluster.x-k8s.io, port: 80}]}",
    );
    assert_eq!(
        invalid_reasons(&rule),
        [
            "backendRef to Service other/reviews from namespace default is not permitted by a ReferenceGrant (RefNotPermitted)",
            "Service default/ghost not found",
            "backendRef to Service default/reviews has no port (port is required for Service backends)",
            "Service default/reviews has no port 1234",
            "unsupported backendRef kind ServiceImport (group \"multicluster.x-k8s.io\"; supported: Service, and Hostname or ServiceEntry in networking.istio.io)",
        ]
    );
    assert!(has_warning(&snap, "ReferenceGrant"));
}

#[test]
fn zero_weights_are_dropped_and_all_zero_is_empty() {
    let (_, rule) = rule_of(
        &[],
        "{backendRefs: [{name: reviews, port: 9080, weight: 0}, {name: reviews, port: 9080, weight: 3}]}",
    );
    assert_eq!(rule.backends.backends.len(), 1);
    assert_eq!(rule.backends.total_weight, 3);
    let (_, rule) = rule_of(
        &[],
        "{backendRefs: [{name: reviews, port: 9080, weight: 0}]}",
    );
    assert!(rule.backends.backends.is_empty());
    assert!(rule.backends.pick(7).is_none());
}

#[test]
fn rule_name_defaults_to_namespace_route_index() {
    let (_, rule) = rule_of(&[], "{matches: [{path: {value: /nope}}]}, {}");
    assert_eq!(&*rule.name, "default.r.1");
}

#[test]
fn filters_compile_to_the_rule_and_backend() {
    let (_, rule) = rule_of(
        &[],
        "{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c]}}, {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-r, value: v}]}}, {type: URLRewrite, urlRewrite: {hostname: elsewhere, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new/}}}, {type: RequestMirror, requestMirror: {backendRef: {name: reviews, port: 9080}, percent: 25}}], backendRefs: [{name: reviews, port: 9080, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend-filter, value: 'yes'}]}}]}]}",
    );
    let f = &rule.filters;
    let req = f.request_headers.as_ref().expect("request modifier");
    assert_eq!(req.set[0].0, "x-a");
    assert_eq!(req.add[0].1, "2");
    assert_eq!(req.remove[0], "x-c");
    assert!(f.response_headers.is_some());
    let rw = f.rewrite.as_ref().expect("rewrite");
    assert_eq!(rw.hostname.as_deref(), Some("elsewhere"));
    assert!(matches!(&rw.path, Some(crate::PathModifier::Prefix(p)) if p == "/new"));
    assert_eq!(f.mirrors.len(), 1);
    assert_eq!(
        (f.mirrors[0].numerator, f.mirrors[0].denominator),
        (25, 100)
    );
    let bf = &rule.backends.backends[0].filters;
    assert_eq!(
        bf.request_headers.as_ref().expect("backend filter").set[0].0,
        "x-backend-filter"
    );
}

#[test]
fn redirect_compiles_with_defaults() {
    let (_, rule) = rule_of(
        &[],
        "{filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.com}}]}",
    );
    let r = rule.filters.redirect.as_ref().expect("redirect");
    assert_eq!(r.status, 302);
    assert_eq!(r.scheme.as_deref(), Some("https"));
    assert_eq!(r.port, None);
}

#[test]
fn filter_errors_name_the_field() {
    let cases = [
        (
            "{filters: [{type: RequestHeaderModifier}]}",
            "spec.rules[0].filters[0].requestHeaderModifier",
        ),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]}",
            "spec.rules[0].filters[0].requestRedirect.statusCode",
        ),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]}",
            "spec.rules[0].filters[0].requestRedirect.scheme",
        ),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]}",
            "spec.rules[0].filters",
        ),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {}}], backendRefs: [{name: reviews, port: 9080}]}",
            "spec.rules[0].backendRefs",
        ),
        (
            "{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}",
            "spec.rules[0].filters",
        ),
        (
            "{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]}",
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
        ),
        (
            "{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]}",
            "spec.rules[0].filters[1].type",
        ),
        (
            "{backendRefs: [{name: reviews, port: 9080, filters: [{type: URLRewrite, urlRewrite: {}}]}]}",
            "spec.rules[0].backendRefs[0].filters[0].type",
        ),
        (
            "{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: reviews, port: 9080}, percent: 101}}]}",
            "spec.rules[0].filters[0].requestMirror.percent",
        ),
        (
            "{timeouts: {request: 10x}}",
            "spec.rules[0].timeouts.request",
        ),
        (
            "{timeouts: {request: 1s, backendRequest: 2s}}",
            "spec.rules[0].timeouts.backendRequest",
        ),
        ("{retry: {codes: [200]}}", "spec.rules[0].retry.codes[0]"),
    ];
    for (rule, field) in cases {
        let e = route_errors(rule);
        assert_eq!(e.len(), 1, "{rule}: {e:#?}");
        assert_error(&e, "HTTPRoute", "default", "r", field);
    }
}

#[test]
fn unsupported_filter_makes_the_rule_answer_500() {
    let (snap, rule) = rule_of(
        &[],
        "{filters: [{type: ExtensionRef}], backendRefs: [{name: reviews, port: 9080}]}",
    );
    assert!(rule.backends.pick(0).is_none());
    assert!(has_warning(&snap, "InvalidFilter"));
}

#[test]
fn timeouts_and_retries_follow_istio_conversion() {
    use std::time::Duration;
    let (_, rule) = rule_of(&[], "{}");
    assert_eq!(rule.request_timeout, None);
    assert_eq!(rule.retry, Some(crate::RetryPolicy::default()));
    assert_eq!(rule.retry.as_ref().map(|r| r.retries), Some(2));
    let (_, rule) = rule_of(&[], "{timeouts: {request: 1m30s, backendRequest: 500ms}}");
    // No retry stanza: backendRequest becomes the route timeout.
    assert_eq!(rule.request_timeout, Some(Duration::from_millis(500)));
    assert_eq!(rule.per_try_timeout, None);
    let (_, rule) = rule_of(
        &[],
        "{timeouts: {request: 2s, backendRequest: 1s}, retry: {attempts: 3, codes: [503], backoff: 10ms}}",
    );
    assert_eq!(rule.request_timeout, Some(Duration::from_secs(2)));
    assert_eq!(rule.per_try_timeout, Some(Duration::from_secs(1)));
    let retry = rule.retry.clone().expect("retry");
    assert_eq!(
        (retry.retries, retry.codes, retry.backoff),
        (3, vec![503], Duration::from_millis(10))
    );
    let (_, rule) = rule_of(&[], "{timeouts: {request: 0s}, retry: {attempts: 0}}");
    assert_eq!(rule.request_timeout, None);
    assert_eq!(rule.retry, None);
}

#[test]
fn gateway_api_durations() {
    use std::time::Duration;
    for (v, want) in [
        ("1s", Some(Duration::from_secs(1))),
        ("500ms", Some(Duration::from_millis(500))),
        ("1h30m", Some(Duration::from_secs(5400))),
        ("1m1s1ms", Some(Duration::from_millis(61_001))),
        ("0s", Some(Duration::ZERO)),
        ("", None),
        ("1", None),
        ("1.5s", None),
        ("123456s", None),
        ("1s1s1s1s1s", None),
        ("1d", None),
    ] {
        assert_eq!(super::parse_duration(v), want, "{v}");
    }
}

#[test]
fn cross_namespace_backend_needs_a_reference_grant() {
    let other = service(
        "other",
        "ratings",
        "10.0.0.50",
        "",
        "[{name: http, port: 9080}]",
    );
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: '', kind: Service}]\n";
    let rule = "{backendRefs: [{name: ratings, namespace: other, port: 9080}]}";
    let (_, r) = rule_of(&[&other], rule);
    assert_eq!(invalid_reasons(&r).len(), 1);
    let (_, r) = rule_of(&[&other, grant], rule);
    assert!(invalid_reasons(&r).is_empty());
    assert!(
        matches!(&r.backends.backends[0].backend, Backend::Cluster(c) if &*c.name == "outbound|9080||ratings.other.svc.cluster.local")
    );
    // A grant for another kind does not count.
    let (_, r) = rule_of(
        &[&other, &grant.replace("kind: HTTPRoute", "kind: GRPCRoute")],
        rule,
    );
    assert_eq!(invalid_reasons(&r).len(), 1);
}

#[test]
fn grpc_route_methods_become_paths_as_istio_converts_them() {
    let g = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: default}\nspec:\n  parentRefs: [{group: '', kind: Service, name: reviews}]\n  rules:\n  - name: exact\n    matches: [{method: {service: pkg.Svc, method: Get}}]\n  - name: service\n    matches: [{method: {service: pkg.Other}}]\n  - name: method\n    matches: [{method: {method: List}}]\n  - name: regex\n    matches: [{method: {type: RegularExpression, service: 'pkg\\.R.*', method: 'Wat.*'}}]\n";
    let t = table(&[g.to_string()]);
    for (path, want) in [
        ("/pkg.Svc/Get", Some("exact")),
        ("/pkg.Svc/Put", None),
        ("/pkg.Other/Anything", Some("service")),
        ("/x.Y/List", Some("method")),
        ("/pkg.Rx/Watch", Some("regex")),
    ] {
        assert_eq!(
            winner(&t, Method::POST, path, None, &[]).as_deref(),
            want,
            "{path}"
        );
    }
    let r = t
        .select(&Method::POST, "/pkg.Svc/Get", None, &HeaderMap::new())
        .expect("rule");
    assert!(r.grpc);
    let bad = g.replace("service: pkg.Svc, method: Get", "service: a/b, method: Get");
    let e = parse_manifests(&base(&[&bad]), "test.yaml").expect_err("bad method");
    assert_error(
        &e,
        "GRPCRoute",
        "default",
        "g",
        "spec.rules[0].matches[0].method",
    );
}

#[test]
fn tcp_route_attaches_to_tcp_ports_with_weights() {
    let svc = service(
        "default",
        "db",
        "10.0.0.60",
        "",
        "[{name: tcp, port: 5432}, {name: http, port: 80}]",
    );
    let v2 = service(
        "default",
        "db-v2",
        "10.0.0.61",
        "",
        "[{name: tcp, port: 5432}]",
    );
    let r = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: t, namespace: default}\nspec:\n  parentRefs: [{group: '', kind: Service, name: db}]\n  rules:\n  - backendRefs: [{name: db, port: 5432, weight: 1}, {name: db-v2, port: 5432, weight: 3}]\n";
    let snap = ok(&base(&[&svc, &v2, r]));
    let tcp = bound(&snap, "10.0.0.60:5432")
        .tcp_route
        .clone()
        .expect("tcp route");
    assert_eq!(tcp.backends.total_weight, 4);
    assert_eq!(&*tcp.name, "default.t.0");
    assert!(bound(&snap, "10.0.0.60:80").tcp_route.is_none());
    assert!(bound(&snap, "10.0.0.60:80").routes.is_none());
}

// --- precedence -------------------------------------------------------------------------

/// Compile routes attached to `reviews` and return the table.
fn table(routes: &[String]) -> Arc<RouteTable> {
    let parts: Vec<&str> = routes.iter().map(String::as_str).collect();
    let snap = ok(&base(&parts));
    bound(&snap, "10.0.0.10:9080")
        .routes
        .clone()
        .expect("routes attached")
}

fn attached(name: &str, meta_extra: &str, rules: &str) -> String {
    route(
        "default",
        name,
        meta_extra,
        &format!("{{parentRefs: [{{group: '', kind: Service, name: reviews}}], rules: {rules}}}"),
    )
}

fn winner(
    t: &RouteTable,
    method: Method,
    path: &str,
    query: Option<&str>,
    headers: &[(&str, &str)],
) -> Option<String> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    t.select(&method, path, query, &map)
        .map(|r| r.name.to_string())
}

#[test]
fn precedence_rules_of_gateway_api() {
    struct Case {
        what: &'static str,
        rules: &'static str,
        method: Method,
        path: &'static str,
        query: Option<&'static str>,
        headers: &'static [(&'static str, &'static str)],
        want: &'static str,
    }
    let cases = [
        Case {
            what: "exact beats prefix",
            rules: "[{name: prefix, matches: [{path: {value: /a/b}}]}, {name: exact, matches: [{path: {type: Exact, value: /a/b}}]}]",
            method: Method::GET,
            path: "/a/b",
            query: None,
            headers: &[],
            want: "exact",
        },
        Case {
            what: "longer prefix beats shorter",
            rules: "[{name: short, matches: [{path: {value: /a}}]}, {name: long, matches: [{path: {value: /a/b}}]}]",
            method: Method::GET,
            path: "/a/b/c",
            query: None,
            headers: &[],
            want: "long",
        },
        Case {
            what: "prefix beats regex",
            rules: "[{name: regex, matches: [{path: {type: RegularExpression, value: '/a/.*'}}]}, {name: prefix, matches: [{path: {value: /}}]}]",
            method: Method::GET,
            path: "/a/b",
            query: None,
            headers: &[],
            want: "prefix",
        },
        Case {
            what: "method beats headers at equal path",
            rules: "[{name: headers, matches: [{headers: [{name: x, value: '1'}, {name: w, value: '2'}]}]}, {name: method, matches: [{method: GET}]}]",
            method: Method::GET,
            path: "/",
            query: None,
            headers: &[("x", "1"), ("w", "2")],
            want: "method",
        },
        Case {
            what: "more headers beat fewer",
            rules: "[{name: one, matches: [{headers: [{name: x, value: '1'}]}]}, {name: two, matches: [{headers: [{name: x, value: '1'}, {name: w, value: '2'}]}]}]",
            method: Method::GET,
            path: "/",
            query: None,
            headers: &[("x", "1"), ("w", "2")],
            want: "two",
        },
        Case {
            what: "headers beat query params",
            rules: "[{name: query, matches: [{queryParams: [{name: q, value: '1'}, {name: r, value: '2'}]}]}, {name: header, matches: [{headers: [{name: x, value: '1'}]}]}]",
            method: Method::GET,
            path: "/",
            query: Some("q=1&r=2"),
            headers: &[("x", "1")],
            want: "header",
        },
        Case {
            what: "more query params beat fewer",
            rules: "[{name: one, matches: [{queryParams: [{name: q, value: '1'}]}]}, {name: two, matches: [{queryParams: [{name: q, value: '1'}, {name: r, value: '2'}]}]}]",
            method: Method::GET,
            path: "/",
            query: Some("q=1&r=2"),
            headers: &[],
            want: "two",
        },
        Case {
            what: "path beats everything else",
            rules: "[{name: rich, matches: [{method: GET, headers: [{name: x, value: '1'}], queryParams: [{name: q, value: '1'}]}]}, {name: path, matches: [{path: {value: /a}}]}]",
            method: Method::GET,
            path: "/a",
            query: Some("q=1"),
            headers: &[("x", "1")],
            want: "path",
        },
        Case {
            what: "within a route, first rule wins a tie",
            rules: "[{name: first, matches: [{path: {value: /a}}]}, {name: second, matches: [{path: {value: /a/}}]}]",
            method: Method::GET,
            path: "/a",
            query: None,
            headers: &[],
            want: "first",
        },
    ];
    for c in cases {
        let t = table(&[attached("r", "", c.rules)]);
        assert_eq!(
            winner(&t, c.method, c.path, c.query, c.headers).as_deref(),
            Some(c.want),
            "{}",
            c.what
        );
    }
}

#[test]
fn cross_route_tie_goes_to_oldest_creation_timestamp() {
    let rule = |n: &str| format!("[{{name: {n}}}]");
    let t = table(&[
        attached(
            "a",
            ", creationTimestamp: '2024-02-01T00:00:00Z'",
            &rule("newer"),
        ),
        attached(
            "b",
            ", creationTimestamp: '2024-01-01T00:00:00Z'",
            &rule("older"),
        ),
        attached("c", "", &rule("no-timestamp")),
    ]);
    assert_eq!(
        winner(&t, Method::GET, "/", None, &[]).as_deref(),
        Some("older")
    );
    assert_eq!(t.len(), 3);
}

#[test]
fn cross_route_tie_without_timestamps_goes_to_namespace_name_order() {
    let rule = |n: &str| format!("[{{name: {n}}}]");
    let t = table(&[
        attached("zeta", "", &rule("zeta")),
        attached("alpha", "", &rule("alpha")),
    ]);
    assert_eq!(
        winner(&t, Method::GET, "/", None, &[]).as_deref(),
        Some("alpha")
    );
    // An absent timestamp counts as newest.
    let t = table(&[
        attached("alpha", "", &rule("alpha")),
        attached(
            "zeta",
            ", creationTimestamp: '2020-01-01T00:00:00Z'",
            &rule("zeta"),
        ),
    ]);
    assert_eq!(
        winner(&t, Method::GET, "/", None, &[]).as_deref(),
        Some("zeta")
    );
}

/// Precedence across routes: the match-level criteria are compared first across all routes;
/// creation time and namespace/name only break complete ties.
#[test]
fn cross_route_precedence_table() {
    let old = ", creationTimestamp: '2020-01-01T00:00:00Z'";
    let new = ", creationTimestamp: '2024-01-01T00:00:00Z'";
    #[allow(clippy::type_complexity)]
    let cases: [(&str, [(&str, &str, &str); 2], &str, &[(&str, &str)], &str); 5] = [
        (
            "newer route's exact path beats older route's prefix",
            [
                (
                    "a",
                    old,
                    "[{name: old-prefix, matches: [{path: {value: /a}}]}]",
                ),
                (
                    "b",
                    new,
                    "[{name: new-exact, matches: [{path: {type: Exact, value: /a}}]}]",
                ),
            ],
            "/a",
            &[],
            "new-exact",
        ),
        (
            "newer route's longer prefix beats older route's shorter one",
            [
                (
                    "a",
                    old,
                    "[{name: old-short, matches: [{path: {value: /a}}]}]",
                ),
                (
                    "b",
                    new,
                    "[{name: new-long, matches: [{path: {value: /a/b}}]}]",
                ),
            ],
            "/a/b/c",
            &[],
            "new-long",
        ),
        (
            "more headers in the newer route win",
            [
                (
                    "a",
                    old,
                    "[{name: old-one, matches: [{headers: [{name: x, value: '1'}]}]}]",
                ),
                (
                    "b",
                    new,
                    "[{name: new-two, matches: [{headers: [{name: x, value: '1'}, {name: w, value: '2'}]}]}]",
                ),
            ],
            "/",
            &[("x", "1"), ("w", "2")],
            "new-two",
        ),
        (
            "complete tie: older route wins even if its rule index is later",
            [
                (
                    "a",
                    new,
                    "[{name: new-first, matches: [{path: {value: /a}}]}]",
                ),
                (
                    "b",
                    old,
                    "[{name: filler, matches: [{path: {type: Exact, value: /zzz}}]}, {name: old-second, matches: [{path: {value: /a}}]}]",
                ),
            ],
            "/a",
            &[],
            "old-second",
        ),
        (
            "complete tie, same timestamp: namespace/name order",
            [
                ("zz", old, "[{name: zz, matches: [{method: GET}]}]"),
                ("aa", old, "[{name: aa, matches: [{method: GET}]}]"),
            ],
            "/",
            &[],
            "aa",
        ),
    ];
    for (what, routes, path, headers, want) in cases {
        let t = table(&routes.map(|(n, meta, rules)| attached(n, meta, rules)));
        assert_eq!(
            winner(&t, Method::GET, path, None, headers).as_deref(),
            Some(want),
            "{what}"
        );
        // The index and the linear scan agree.
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        assert_eq!(
            t.select_linear(&Method::GET, path, None, &map)
                .map(|r| r.name.to_string())
                .as_deref(),
            Some(want)
        );
    }
}

#[test]
fn no_matching_rule_selects_nothing() {
    let t = table(&[attached(
        "r",
        "",
        "[{name: a, matches: [{path: {type: Exact, value: /a}}]}]",
    )]);
    assert_eq!(winner(&t, Method::GET, "/b", None, &[]), None);
}

#[test]
fn multiple_matches_of_one_rule_are_ored() {
    let t = table(&[attached(
        "r",
        "",
        "[{name: a, matches: [{path: {type: Exact, value: /a}}, {method: POST}]}]",
    )]);
    assert_eq!(
        winner(&t, Method::POST, "/z", None, &[]).as_deref(),
        Some("a")
    );
    assert_eq!(
        winner(&t, Method::GET, "/a", None, &[]).as_deref(),
        Some("a")
    );
    assert_eq!(winner(&t, Method::GET, "/z", None, &[]), None);
}

#[test]
fn repeated_header_name_in_a_match_keeps_only_the_first() {
    let t = table(&[attached(
        "r",
        "",
        "[{name: a, matches: [{headers: [{name: X, value: '1'}, {name: x, value: '2'}]}]}]",
    )]);
    assert_eq!(
        winner(&t, Method::GET, "/", None, &[("x", "1")]).as_deref(),
        Some("a")
    );
}

// --- property: a rule that cannot match never changes the winner ------------------------

fn arb_rule() -> impl Strategy<Value = String> {
    let path = prop_oneof![
        Just(String::new()),
        "(/[ab]{1,2}){1,2}/?".prop_map(|p| format!("path: {{type: PathPrefix, value: '{p}'}}, ")),
        "(/[ab]{1,2}){1,2}".prop_map(|p| format!("path: {{type: Exact, value: '{p}'}}, ")),
    ];
    let method = prop_oneof![Just(""), Just("method: GET, "), Just("method: POST, ")];
    let header = prop_oneof![Just(""), Just("headers: [{name: x, value: '1'}], ")];
    let query = prop_oneof![Just(""), Just("queryParams: [{name: q, value: '1'}], ")];
    (path, method, header, query).prop_map(|(p, m, h, q)| format!("{{{p}{m}{h}{q}}}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn adding_an_unmatchable_rule_never_changes_the_winner(
        rules in proptest::collection::vec(arb_rule(), 1..5),
        insert_at in 0usize..5,
        path in "(/[ab]{1,2}){1,3}/?",
        post in any::<bool>(),
        header in any::<bool>(),
        query in any::<bool>(),
    ) {
        let named: Vec<String> = rules.iter().enumerate().map(|(i, m)| format!("{{name: r{i}, matches: [{m}]}}")).collect();
        let before = table(&[attached("r", "", &format!("[{}]", named.join(", ")))]);
        // Highest possible precedence, but requires a header no request carries.
        let never = "{name: never, matches: [{path: {type: Exact, value: '/a'}, method: GET, headers: [{name: x-never, value: v}, {name: x, value: '1'}]}]}";
        let mut with = named.clone();
        with.insert(insert_at.min(with.len()), never.to_string());
        let after = table(&[attached("r", "", &format!("[{}]", with.join(", ")))]);
        // The same rule in an older route of its own (cross-route tie-breaks favour it).
        let other = attached(
            "aaa-never",
            ", creationTimestamp: '2000-01-01T00:00:00Z'",
            &format!("[{never}]"),
        );
        let cross = table(&[attached("r", "", &format!("[{}]", named.join(", "))), other]);
        let method = if post { Method::POST } else { Method::GET };
        let headers: &[(&str, &str)] = if header { &[("x", "1")] } else { &[] };
        let q = query.then_some("q=1");
        let want = winner(&before, method.clone(), &path, q, headers);
        prop_assert_eq!(&want, &winner(&after, method.clone(), &path, q, headers));
        prop_assert_eq!(&want, &winner(&cross, method, &path, q, headers));
    }
}

#[test]
fn tls_routes_select_by_sni_like_envoy_server_names() {
    let svc = service(
        "default",
        "tls",
        "10.0.0.70",
        "",
        "[{name: tls, port: 443}]",
    );
    let route = |name: &str, hosts: &str, created: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {{name: {name}, namespace: default{created}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: tls}}]\n  hostnames: {hosts}\n  rules: [{{name: {name}, backendRefs: [{{name: tls, port: 443}}]}}]\n"
        )
    };
    let snap = ok(&base(&[
        &svc,
        &route("exact", "[db.example.com]", ""),
        &route("wild", "['*.example.com']", ""),
        &route("deeper", "['*.eu.example.com']", ""),
        &route(
            "any-old",
            "[]",
            ", creationTimestamp: '2020-01-01T00:00:00Z'",
        ),
        &route("any-new", "[]", ""),
    ]));
    let tls = bound(&snap, "10.0.0.70:443")
        .tls_routes
        .clone()
        .expect("tls routes");
    let pick = |sni: Option<&str>| tls.select(sni).map(|r| r.name.to_string());
    assert_eq!(pick(Some("db.example.com")).as_deref(), Some("exact"));
    assert_eq!(pick(Some("DB.example.com")).as_deref(), Some("exact"));
    assert_eq!(pick(Some("x.example.com")).as_deref(), Some("wild"));
    assert_eq!(pick(Some("a.eu.example.com")).as_deref(), Some("deeper"));
    assert_eq!(pick(Some("example.com")).as_deref(), Some("any-old"));
    assert_eq!(pick(None).as_deref(), Some("any-old"));
    let e = errs(&base(&[&svc, &route("bad", "['10.0.0.1']", "")]));
    assert_error(&e, "TLSRoute", "default", "bad", "spec.hostnames[0]");
}

#[test]
fn several_parent_refs_attach_the_same_rules_to_each() {
    let other = service(
        "default",
        "details",
        "10.0.0.80",
        "",
        "[{name: http, port: 9080}]",
    );
    let r = route(
        "default",
        "two-parents",
        "",
        "{parentRefs: [{group: '', kind: Service, name: reviews}, {group: '', kind: Service, name: details, port: 9080}], rules: [{name: shared}]}",
    );
    let snap = ok(&base(&[&other, &r]));
    for vip in ["10.0.0.10:9080", "10.0.0.80:9080"] {
        let t = bound(&snap, vip).routes.clone().expect("routes");
        assert_eq!(
            t.select(&Method::GET, "/", None, &HeaderMap::new())
                .map(|r| r.name.to_string())
                .as_deref(),
            Some("shared"),
            "{vip}"
        );
    }
}

// ---- workloads: Pods, the ambient data plane, workload binding (protocol.md 2.10) ----

fn pod(name: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\nspec: {{serviceAccountName: sa-{name}}}\nstatus: {{podIP: \"{ip}\"}}\n"
    )
}

fn ns(labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{{labels}}}}}\n")
}

fn is_workload(snap: &Snapshot, ip: &str) -> bool {
    matches!(
        snap.lookup_vip(addr(&format!("{ip}:8080"))),
        VipLookup::Bound(_)
    )
}

#[test]
fn workload_binding_follows_istio_precedence() {
    // (namespace labels, pod labels, waypoint-for, served?)
    let cases = [
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint",
            "",
            "workload",
            true,
        ),
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint",
            "",
            "all",
            true,
        ),
        // A service-only waypoint silently ignores workloads that inherit it.
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint",
            "",
            "service",
            false,
        ),
        // The pod's own label wins over its namespace's; `none` opts out.
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint",
            "istio.io/use-waypoint: none",
            "workload",
            false,
        ),
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: other",
            "istio.io/use-waypoint: waypoint",
            "workload",
            true,
        ),
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint",
            "istio.io/use-waypoint: other",
            "workload",
            false,
        ),
        // Only pods in the ambient data plane have their traffic sent to a waypoint.
        ("istio.io/use-waypoint: waypoint", "", "workload", false),
        (
            "istio.io/use-waypoint: waypoint",
            "istio.io/dataplane-mode: ambient",
            "workload",
            true,
        ),
        (
            "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint",
            "istio.io/dataplane-mode: none",
            "workload",
            false,
        ),
        // No label anywhere: no waypoint.
        ("istio.io/dataplane-mode: ambient", "", "all", false),
    ];
    for (ns_labels, pod_labels, waypoint_for, served) in cases {
        let snap = ok(&docs(&[
            &ns(ns_labels),
            &gateway(&format!("istio.io/waypoint-for: {waypoint_for}"), ""),
            &pod("p", "10.1.0.5", pod_labels),
        ]));
        assert_eq!(
            is_workload(&snap, "10.1.0.5"),
            served,
            "ns {{{ns_labels}}} pod {{{pod_labels}}} waypoint-for {waypoint_for}"
        );
    }
}

#[test]
fn ambient_endpoints_carry_the_pod_identity_and_others_stay_plaintext() {
    let snap = ok(&docs(&[
        &ns("istio.io/use-waypoint: waypoint"),
        &gateway("", ""),
        &service("default", "web", "10.0.0.50", "", HTTP_PORT),
        &pod("amb", "10.1.0.1", "istio.io/dataplane-mode: ambient"),
        &pod("plain", "10.1.0.2", ""),
        &slice(
            "default",
            "web",
            "web-1",
            "endpoints:\n- addresses: [\"10.1.0.1\"]\n  targetRef: {kind: Pod, name: amb, namespace: default}\n- addresses: [\"10.1.0.2\"]\nports: [{name: http, port: 8080}]\n",
        ),
    ]));
    let sp = bound(&snap, "10.0.0.50:9080");
    let eps = &sp.cluster.endpoints();
    assert_eq!(eps.len(), 2);
    assert_eq!(
        eps[0].tunnel.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/sa-amb")
    );
    assert_eq!(
        eps[1].tunnel, None,
        "a pod outside the ambient data plane is reached in plaintext"
    );
}

#[test]
fn pod_ip_must_be_an_ip() {
    let e = errs(&docs(&[
        &ns(""),
        &gateway("", ""),
        &pod("bad", "not-an-ip", ""),
    ]));
    assert_error(&e, "Pod", "default", "bad", "status.podIP");
}

/// Endpoint churn applied in place gives exactly what a full compile of the new state gives:
/// addresses, ports and tunnel identities; endpoints that stay keep their load counters; the
/// routes and the cluster objects are the same ones.
#[test]
fn refresh_endpoints_matches_a_full_compile_and_keeps_what_stays() {
    let before = |eps: &str| {
        docs(&[
            &ns("istio.io/use-waypoint: waypoint"),
            &gateway("", ""),
            &service("default", "web", "10.0.0.50", "", HTTP_PORT),
            &service("default", "other", "10.0.0.51", "", HTTP_PORT),
            &pod("amb", "10.1.0.1", "istio.io/dataplane-mode: ambient"),
            &pod("plain", "10.1.0.2", ""),
            &pod("new", "10.1.0.3", "istio.io/dataplane-mode: ambient"),
            &slice("default", "web", "web-1", eps),
            &slice(
                "default",
                "other",
                "other-1",
                "endpoints:\n- addresses: [\"10.1.0.9\"]\nports: [{name: http, port: 7000}]\n",
            ),
        ])
    };
    let v1 = "endpoints:\n- addresses: [\"10.1.0.1\"]\n  targetRef: {kind: Pod, name: amb, namespace: default}\n- addresses: [\"10.1.0.2\"]\nports: [{name: http, port: 8080}]\n";
    let v2 = "endpoints:\n- addresses: [\"10.1.0.1\"]\n  targetRef: {kind: Pod, name: amb, namespace: default}\n- addresses: [\"10.1.0.3\"]\n  targetRef: {kind: Pod, name: new, namespace: default}\nports: [{name: http, port: 8080}]\n";
    let snap = ok(&before(v1));
    let web = bound(&snap, "10.0.0.50:9080");
    let other = bound(&snap, "10.0.0.51:9080");
    let kept_load = web.cluster.endpoints()[0].load.clone();
    kept_load.inc();
    let other_before = other.cluster.endpoints();

    // The partial input holds only what changed: web, its slice, its pods, the namespace.
    let partial = parse_manifests(
        &docs(&[
            &ns("istio.io/use-waypoint: waypoint"),
            &service("default", "web", "10.0.0.50", "", HTTP_PORT),
            &pod("amb", "10.1.0.1", "istio.io/dataplane-mode: ambient"),
            &pod("new", "10.1.0.3", "istio.io/dataplane-mode: ambient"),
            &slice("default", "web", "web-1", v2),
        ]),
        "partial.yaml",
    )
    .expect("parses");
    assert_eq!(
        snap.refresh_endpoints(&partial, &CompileOptions::default()),
        1
    );
    let full = ok(&before(v2));
    let want: Vec<_> = bound(&full, "10.0.0.50:9080")
        .cluster
        .endpoints()
        .iter()
        .map(|e| (e.addr, e.tunnel.clone()))
        .collect();
    let got: Vec<_> = web
        .cluster
        .endpoints()
        .iter()
        .map(|e| (e.addr, e.tunnel.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1].1.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/sa-new")
    );
    // The same cluster object (routes hold it), the kept endpoint's counter carried over.
    assert!(Arc::ptr_eq(
        &web.cluster,
        &bound(&snap, "10.0.0.50:9080").cluster
    ));
    assert_eq!(web.cluster.endpoints()[0].load.get(), 1);
    // A Service not in the partial input is untouched.
    assert!(Arc::ptr_eq(&other_before, &other.cluster.endpoints()));
    // Nothing changed: nothing swapped.
    assert_eq!(
        snap.refresh_endpoints(&partial, &CompileOptions::default()),
        0
    );
    // Scaled to zero: no slices left for the Service.
    let empty = parse_manifests(
        &docs(&[&service("default", "web", "10.0.0.50", "", HTTP_PORT)]),
        "empty.yaml",
    )
    .expect("parses");
    assert_eq!(
        snap.refresh_endpoints(&empty, &CompileOptions::default()),
        1
    );
    assert!(web.cluster.endpoints().is_empty());
}

/// An endpoint carries the workload of its Pod (the `destination_*` metric labels): found by
/// `targetRef`, else by IP; the replicas of one workload share one value; the principal is
/// the tunnel identity of an ambient Pod only; an endpoint with no Pod has none; endpoint
/// churn keeps the value of an endpoint whose Pod did not change.
#[test]
fn endpoints_carry_their_pods_workload() {
    let replica = |name: &str, ip: &str, mode: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: web, version: v2, pod-template-hash: 5f7c9, {mode}}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: web-v2-5f7c9, uid: u}}]\nspec: {{serviceAccountName: web}}\nstatus: {{podIP: \"{ip}\"}}\n"
        )
    };
    let eps = "endpoints:\n- addresses: [\"10.1.0.1\"]\n  targetRef: {kind: Pod, name: web-v2-5f7c9-aaaaa, namespace: default}\n- addresses: [\"10.1.0.2\"]\n- addresses: [\"10.1.0.3\"]\n- addresses: [\"10.1.0.9\"]\nports: [{name: http, port: 8080}]\n";
    let input = docs(&[
        &ns("istio.io/use-waypoint: waypoint"),
        &gateway("", ""),
        &service("default", "web", "10.0.0.50", "", HTTP_PORT),
        &replica(
            "web-v2-5f7c9-aaaaa",
            "10.1.0.1",
            "istio.io/dataplane-mode: ambient",
        ),
        &replica(
            "web-v2-5f7c9-bbbbb",
            "10.1.0.2",
            "istio.io/dataplane-mode: ambient",
        ),
        &replica(
            "web-v2-5f7c9-ccccc",
            "10.1.0.3",
            "istio.io/dataplane-mode: none",
        ),
        &slice("default", "web", "web-1", eps),
    ]);
    let snap = ok(&input);
    let web = bound(&snap, "10.0.0.50:9080");
    let e = web.cluster.endpoints();
    let w: Vec<_> = e.iter().map(|e| e.workload.clone()).collect();
    let first = w[0].as_ref().expect("Pod by targetRef");
    assert_eq!(&*first.namespace, "default");
    assert_eq!(first.names.workload, "web-v2");
    assert_eq!(first.names.canonical_service, "web");
    assert_eq!(first.names.canonical_revision, "v2");
    assert_eq!(
        first.principal.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/web")
    );
    // Found by IP, same workload and principal: the same value.
    assert!(Arc::ptr_eq(first, w[1].as_ref().expect("Pod by IP")));
    // Not ambient: no tunnel, so no principal (Istio's `unknown`).
    let plain = w[2].as_ref().expect("Pod by IP");
    assert_eq!(plain.names.workload, "web-v2");
    assert_eq!(plain.principal, None);
    // No Pod at 10.1.0.9.
    assert!(w[3].is_none());

    // Refreshed with the same Pods: nothing changes, the values stay (and their metrics ids).
    let partial = parse_manifests(&input, "partial.yaml").expect("parses");
    assert_eq!(
        snap.refresh_endpoints(&partial, &CompileOptions::default()),
        0
    );
    // A Pod relabelled (a new revision behind the same IP): the endpoint follows.
    let relabelled = input.replace(
        "version: v2, pod-template-hash: 5f7c9, istio.io/dataplane-mode: none",
        "version: v3, pod-template-hash: 5f7c9, istio.io/dataplane-mode: none",
    );
    assert_ne!(relabelled, input);
    let partial = parse_manifests(&relabelled, "partial.yaml").expect("parses");
    assert_eq!(
        snap.refresh_endpoints(&partial, &CompileOptions::default()),
        1
    );
    let after = web.cluster.endpoints();
    assert!(Arc::ptr_eq(
        first,
        after[0].workload.as_ref().expect("still there")
    ));
    assert_eq!(
        after[2]
            .workload
            .as_ref()
            .expect("Pod")
            .names
            .canonical_revision,
        "v3"
    );
}

fn destination_rule(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// Which DestinationRule a waypoint applies to a Service of another namespace, as istiod's
/// `PushContext.destinationRule`: the waypoint's namespace first, then what the Service's
/// namespace exports to the waypoint's, then what the root namespace exports to it.
#[test]
fn destination_rule_lookup_follows_istiods_namespaces_and_export_to() {
    use crate::traffic::LbPolicy;
    let apps = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: default}}\n";
    let web = service("apps", "web", "10.0.1.1", "", HTTP_PORT);
    let gw = gateway("", ", allowedRoutes: {namespaces: {from: All}}");
    let dr = |ns: &str, name: &str, host: &str, export: &str, lb: &str| {
        destination_rule(
            ns,
            name,
            &format!(
                "{{host: {host}, exportTo: {export}, trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}}}"
            ),
        )
    };
    let private = dr("apps", "web-private", "web", "['.']", "RANDOM");
    let root = dr(
        "istio-system",
        "mesh",
        "'*.apps.svc.cluster.local'",
        "['*']",
        "ROUND_ROBIN",
    );
    let public = dr("apps", "web-public", "web", "[default]", "LEAST_REQUEST");
    let local = dr(
        "default",
        "from-waypoint",
        "web.apps.svc.cluster.local",
        "['.']",
        "RANDOM",
    );
    let lb_of = |extra: &[&str]| {
        let mut parts = vec![NS_PLAIN, apps, gw.as_str(), web.as_str()];
        parts.extend_from_slice(extra);
        let snap = ok(&docs(&parts));
        let c = &bound(&snap, "10.0.1.1:9080").cluster;
        c.traffic.as_ref().map(|t| (t.source.clone(), t.lb.clone()))
    };
    // The Service's own rule exported only to its namespace is not the waypoint's: the
    // root namespace's applies.
    assert_eq!(
        lb_of(&[&private, &root]),
        Some((
            "DestinationRule istio-system/mesh".into(),
            LbPolicy::RoundRobin
        ))
    );
    // Exported to the waypoint's namespace: it wins over the root namespace's.
    assert_eq!(
        lb_of(&[&private, &root, &public]),
        Some((
            "DestinationRule apps/web-public".into(),
            LbPolicy::LeastRequest
        ))
    );
    // A rule in the waypoint's own namespace wins over both, exported or not.
    assert_eq!(
        lb_of(&[&private, &root, &public, &local]),
        Some((
            "DestinationRule default/from-waypoint".into(),
            LbPolicy::Random
        ))
    );
    assert_eq!(lb_of(&[&private]), None, "nothing visible");
}

/// DestinationRule traffic policy reaches the Service's clusters: host by short name, FQDN
/// or wildcard (exact wins, the Service's namespace before the root namespace), port-level
/// settings replacing the top-level part, unsupported fields warned about by path, bad
/// values errors naming the field.
#[test]
fn destination_rules_set_the_cluster_traffic_policy() {
    use crate::traffic::LbPolicy;
    use std::time::Duration;
    let base = |rules: &[&str]| {
        let mut d = vec![
            ns("istio.io/use-waypoint: waypoint"),
            gateway("", ""),
            service(
                "default",
                "web",
                "10.0.0.50",
                "",
                "[{name: http, port: 9080}, {name: admin, port: 9090}]",
            ),
            service("default", "api", "10.0.0.51", "", HTTP_PORT),
        ];
        d.extend(rules.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = d.iter().map(String::as_str).collect();
        docs(&refs)
    };
    let snap = ok(&base(&[
        &destination_rule(
            "default",
            "web",
            "{host: web, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {http: {http2MaxRequests: 10, maxRequestsPerConnection: 5, maxRetries: 2}, tcp: {connectTimeout: 2s, maxConnections: 7}}, outlierDetection: {consecutiveGatewayErrors: 3, baseEjectionTime: 10s}, portLevelSettings: [{port: {number: 9090}, loadBalancer: {simple: RANDOM}}], tls: {mode: SIMPLE}}}",
        ),
        &destination_rule(
            "default",
            "all",
            "{host: '*.default.svc.cluster.local', trafficPolicy: {loadBalancer: {simple: RANDOM}}}",
        ),
        &destination_rule(
            "istio-system",
            "web-root",
            "{host: web.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}",
        ),
    ]));
    let web = bound(&snap, "10.0.0.50:9080");
    let t = web.cluster.traffic.as_ref().expect("web has a policy");
    assert_eq!(t.source, "DestinationRule default/web");
    assert_eq!(t.lb, LbPolicy::RoundRobin);
    assert_eq!(
        (t.max_requests, t.max_requests_per_connection, t.max_retries),
        (Some(10), Some(5), Some(2))
    );
    assert_eq!(t.connect_timeout, Some(Duration::from_secs(2)));
    assert!(t.tls.as_ref().is_some_and(|tls| !tls.mutual), "tls SIMPLE");
    let o = t.outlier.as_ref().expect("outlier detection");
    // consecutive5xxErrors defaults to 5 when the block is present (Istio).
    assert_eq!(
        (o.consecutive_5xx, o.consecutive_gateway),
        (Some(5), Some(3))
    );
    assert_eq!(o.base_ejection_time, Duration::from_secs(10));
    assert_eq!((o.max_ejection_percent, o.min_health_percent), (10, 0));
    // The admin port's load balancer comes from portLevelSettings; the rest from the top.
    let admin = bound(&snap, "10.0.0.50:9090");
    let ta = admin.cluster.traffic.as_ref().expect("admin port policy");
    assert_eq!(ta.lb, LbPolicy::Random);
    assert_eq!(ta.max_requests, Some(10));
    // api has only the wildcard rule.
    let api = bound(&snap, "10.0.0.51:9080");
    let tapi = api.cluster.traffic.as_ref().expect("wildcard applies");
    assert_eq!(tapi.source, "DestinationRule default/all");
    assert_eq!((t.max_connections, t.max_pending_requests), (Some(7), None));
    // Unsupported fields are named.
    let snap2 = ok(&base(&[&destination_rule(
        "default",
        "web",
        "{host: web, trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}, subsets: [{name: v1, labels: {version: v1}}]}",
    )]));
    for needle in [
        "DestinationRule default/web: spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
        "DestinationRule default/web: spec.subsets",
    ] {
        assert!(
            has_warning(&snap2, needle),
            "{needle}: {:?}",
            snap2.warnings
        );
    }
    // No rule: no policy.
    let plain = ok(&base(&[]));
    assert!(bound(&plain, "10.0.0.50:9080").cluster.traffic.is_none());
    // Bad values are errors naming the field.
    let e = errs(&base(&[&destination_rule(
        "default",
        "bad",
        "{host: web, trafficPolicy: {loadBalancer: {simple: FASTEST}, connectionPool: {tcp: {connectTimeout: soon}}, outlierDetection: {maxEjectionPercent: 150}}}",
    )]));
    assert_error(
        &e,
        "DestinationRule",
        "default",
        "bad",
        "spec.trafficPolicy.loadBalancer.simple",
    );
    assert_error(
        &e,
        "DestinationRule",
        "default",
        "bad",
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
    );
    assert_error(
        &e,
        "DestinationRule",
        "default",
        "bad",
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
    );
    let e = errs(&base(&[&destination_rule(
        "default",
        "nohost",
        "{trafficPolicy: {}}",
    )]));
    assert_error(&e, "DestinationRule", "default", "nohost", "spec.host");
    // TLS origination: never silently plaintext.
    let e = errs(&base(&[&destination_rule(
        "default",
        "tls",
        "{host: web, trafficPolicy: {tls: {mode: MUTUAL, caCertificates: /ca.pem}, portLevelSettings: [{port: {number: 9090}, tls: {mode: SIMPLE, credentialName: web-tls, caCertificates: /ca.pem}}]}}",
    )]));
    assert_error(
        &e,
        "DestinationRule",
        "default",
        "tls",
        "spec.trafficPolicy.tls.clientCertificate",
    );
    assert_error(
        &e,
        "DestinationRule",
        "default",
        "tls",
        "spec.trafficPolicy.portLevelSettings[0].tls.caCertificates",
    );
    let snap = ok(&base(&[&destination_rule(
        "default",
        "tls",
        "{host: web, trafficPolicy: {tls: {mode: SIMPLE, sni: web.example, subjectAltNames: [web.example]}, portLevelSettings: [{port: {number: 9090}, tls: {mode: DISABLE}}]}}",
    )]));
    let t = bound(&snap, "10.0.0.50:9080")
        .cluster
        .traffic
        .clone()
        .expect("policy");
    let tls = t.tls.as_ref().expect("tls");
    assert_eq!(
        (tls.mutual, tls.sni.as_deref()),
        (false, Some("web.example"))
    );
    assert!(
        bound(&snap, "10.0.0.50:9090")
            .cluster
            .traffic
            .as_ref()
            .expect("policy")
            .tls
            .is_none(),
        "DISABLE on the port wins"
    );
}

/// Istio 1.31's weighted canary: a Service whose `use-waypoint` names another waypoint and
/// whose `use-waypoint-canary` names this one is served here (ztunnel sends this waypoint its
/// share of connections); a canary naming another waypoint or namespace is not.
#[test]
fn a_service_naming_this_waypoint_as_its_canary_is_served() {
    let snap = ok(&docs(&[
        &ns(""),
        &gateway("", ""),
        &service(
            "default",
            "canaried",
            "10.0.0.60",
            "istio.io/use-waypoint: envoy-waypoint, istio.io/use-waypoint-canary: waypoint",
            HTTP_PORT,
        ),
        &service(
            "default",
            "elsewhere",
            "10.0.0.61",
            "istio.io/use-waypoint: envoy-waypoint, istio.io/use-waypoint-canary: waypoint, istio.io/use-waypoint-canary-namespace: other",
            HTTP_PORT,
        ),
        &service(
            "default",
            "primary-only",
            "10.0.0.62",
            "istio.io/use-waypoint: envoy-waypoint",
            HTTP_PORT,
        ),
    ]));
    let sp = bound(&snap, "10.0.0.60:9080");
    assert_eq!(&*sp.cluster.service_name, "canaried");
    for vip in ["10.0.0.61:9080", "10.0.0.62:9080"] {
        assert!(
            !matches!(snap.lookup_vip(addr(vip)), VipLookup::Bound(_)),
            "{vip} is not served here"
        );
    }
}

// --- ServiceEntry --------------------------------------------------------------------------

fn entry(name: &str, labels: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\nspec: {spec}\n"
    )
}

#[test]
fn service_entry_hosts_are_services_bound_by_label() {
    // The namespace label binds it; each host is its own service (own VIPs, own cluster named
    // as istiod names it), STATIC endpoints with the endpoint's port of that name.
    let se = entry(
        "external",
        "",
        "{hosts: [api.example.com], addresses: [240.240.0.1/32], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}, {number: 5432, name: pg, protocol: TCP}], resolution: STATIC, location: MESH_EXTERNAL, endpoints: [{address: 127.0.0.7, ports: {pg: 15432}}, {address: 127.0.0.8}]}",
    );
    let snap = ok(&base(&[&se]));
    let http = bound(&snap, "240.240.0.1:80");
    assert!(
        http.cluster.name.starts_with("inbound-vip|80|http|"),
        "{}",
        http.cluster.name
    );
    let eps: Vec<_> = http.cluster.endpoints().iter().map(|e| e.addr).collect();
    assert_eq!(eps, vec![addr("127.0.0.7:8080"), addr("127.0.0.8:8080")]);
    assert!(http.cluster.endpoints().iter().all(|e| e.tunnel.is_none()));
    let tcp = bound(&snap, "240.240.0.1:5432");
    assert_eq!(
        &*tcp.cluster.name,
        format!("inbound-vip|5432|tcp|{}", tcp.cluster.hostname)
    );
    let eps: Vec<_> = tcp.cluster.endpoints().iter().map(|e| e.addr).collect();
    assert_eq!(eps, vec![addr("127.0.0.7:15432"), addr("127.0.0.8:5432")]);
    let info: Vec<_> = snap
        .services()
        .iter()
        .filter(|s| s.kind == "ServiceEntry")
        .map(|s| (s.name.to_string(), s.entry.clone().map(|e| e.1)))
        .collect();
    assert_eq!(
        info,
        vec![(
            "api.example.com".to_string(),
            Some(crate::Resolution::Static)
        )]
    );
}

#[test]
fn service_entry_allocated_addresses_are_per_host_and_dns_names_are_planned() {
    let se = format!(
        "{}status: {{addresses: [{{value: 240.240.0.2, host: api.example.com}}, {{value: 240.240.0.3, host: other.example.com}}]}}\n",
        entry(
            "external",
            "istio.io/use-waypoint: waypoint",
            "{hosts: [api.example.com, other.example.com], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}], resolution: DNS}",
        )
    );
    let snap = ok(&docs(&[NS_PLAIN, &gateway("", ""), &se]));
    let a = bound(&snap, "240.240.0.2:80");
    assert_eq!(&*a.cluster.name, "inbound-vip|80|http|api.example.com");
    assert_eq!(&*a.cluster.hostname, "api.example.com");
    assert_eq!(&*a.cluster.service_name, "api.example.com");
    let dns = a.cluster.dns.as_ref().expect("a DNS cluster");
    let plan: Vec<(&str, u16, u32)> = dns
        .names
        .iter()
        .map(|t| (&*t.name, t.port, t.weight))
        .collect();
    assert_eq!(plan, vec![("api.example.com", 443, 1)]);
    assert!(!dns.first_only);
    assert!(a.cluster.endpoints().is_empty(), "resolved at run time");
    let b = bound(&snap, "240.240.0.3:80");
    assert_eq!(&*b.cluster.hostname, "other.example.com");
    assert!(matches!(
        snap.lookup_vip(addr("240.240.0.3:81")),
        VipLookup::Unknown
    ));
    // Endpoints keep their weight and locality for the addresses they resolve to.
    let weighted = entry(
        "weighted",
        "istio.io/use-waypoint: waypoint",
        "{hosts: [w.example.com], addresses: [240.240.0.9], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS, endpoints: [{address: a.example.com, weight: 3, locality: r1/z1}, {address: b.example.com}]}",
    );
    let snap = ok(&docs(&[NS_PLAIN, &gateway("", ""), &weighted]));
    let dns = bound(&snap, "240.240.0.9:80")
        .cluster
        .dns
        .clone()
        .expect("DNS");
    let ep = dns.names[0].endpoint(addr("10.9.0.1:80"));
    assert_eq!(
        (ep.weight, ep.locality.as_deref()),
        (3, Some(&crate::Locality::parse("r1/z1")))
    );
    assert_eq!(dns.names[1].endpoint(addr("10.9.0.2:80")).weight, 1);
}

#[test]
fn service_entry_none_resolution_passes_through_to_the_tunnel_address() {
    let se = entry(
        "passthrough",
        "",
        "{hosts: [db.example.com], addresses: [127.0.0.9], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: NONE}",
    );
    let snap = ok(&base(&[&se]));
    let sp = bound(&snap, "127.0.0.9:5432");
    assert!(sp.cluster.passthrough && sp.cluster.endpoints().is_empty());
    let at = sp.cluster.original_destination(addr("127.0.0.9:5432"));
    let eps: Vec<_> = at.endpoints().iter().map(|e| e.addr).collect();
    assert_eq!(eps, vec![addr("127.0.0.9:5432")]);
    assert_eq!(at.name, sp.cluster.name);
}

#[test]
fn service_entry_errors_name_the_field() {
    let bad = entry(
        "bad",
        "",
        "{hosts: [\"not a host\"], addresses: [nope], ports: [{number: 0, name: http, protocol: HTTP}, {number: 81, name: x, protocol: SMTP}], resolution: STATIC, endpoints: [{address: api.example.com}, {address: 1.2.3.4, weight: -1}]}",
    );
    let bad_we = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: default}\nspec: {address: 10.2.0.9, weight: 4294967296}\n";
    let e = errs(&base(&[&bad, bad_we]));
    for field in [
        "spec.hosts[0]",
        "spec.addresses[0]",
        "spec.ports[0].number",
        "spec.ports[1].protocol",
        "spec.endpoints[0].address",
        "spec.endpoints[1].weight",
    ] {
        assert_error(&e, "ServiceEntry", "default", "bad", field);
    }
    assert_error(&e, "WorkloadEntry", "default", "vm", "spec.weight");
    let none_eps = entry(
        "none",
        "",
        "{hosts: [a.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: NONE, endpoints: [{address: 1.2.3.4}]}",
    );
    assert_error(
        &errs(&base(&[&none_eps])),
        "ServiceEntry",
        "default",
        "none",
        "spec.endpoints",
    );
    let resolution = entry(
        "res",
        "",
        "{hosts: [a.example.com], ports: [{number: 80, name: http}], resolution: DNSX}",
    );
    assert_error(
        &errs(&base(&[&resolution])),
        "ServiceEntry",
        "default",
        "res",
        "spec.resolution",
    );
    // Two ServiceEntries claiming one VIP:port.
    let one = entry(
        "one",
        "",
        "{hosts: [a.example.com], addresses: [240.0.0.1], ports: [{number: 80, name: http}], resolution: DNS}",
    );
    let two = entry(
        "two",
        "",
        "{hosts: [b.example.com], addresses: [240.0.0.1], ports: [{number: 80, name: http}], resolution: DNS}",
    );
    assert_error(
        &errs(&base(&[&one, &two])),
        "ServiceEntry",
        "default",
        "two",
        "spec.addresses",
    );
}

#[test]
fn routes_policies_and_destination_rules_attach_to_service_entries() {
    let se = entry(
        "httpbin",
        "",
        "{hosts: [httpbin.org], addresses: [240.240.0.5], ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: HTTPS}], resolution: DNS}",
    );
    let r = route(
        "default",
        "to-tls",
        "",
        "{parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, port: 80}], rules: [{backendRefs: [{group: networking.istio.io, kind: Hostname, name: httpbin.org, port: 443}]}]}",
    );
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: default}\nspec: {targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}], action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}\n";
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: httpbin-tls, namespace: default}\nspec: {host: httpbin.org, trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: SIMPLE}}]}}\n";
    let snap = ok(&base(&[&se, &r, ap, dr]));
    let sp = bound(&snap, "240.240.0.5:80");
    let table = sp
        .routes
        .as_ref()
        .expect("the HTTPRoute attached to the entry");
    let hit = table
        .select(&Method::GET, "/", None, &HeaderMap::new())
        .expect("the rule matches");
    let Backend::Cluster(c) = &hit.backends.pick(0).expect("a backend").backend else {
        panic!("expected a cluster backend");
    };
    // Istio `portToSubset`: an HTTPS port is a `tcp` cluster even for HTTP routes.
    assert_eq!(&*c.name, "inbound-vip|443|tcp|httpbin.org");
    let tls = c.traffic.as_ref().and_then(|t| t.tls.clone());
    assert!(tls.is_some(), "the DestinationRule's port 443 tls applies");
    assert!(
        !sp.authz.is_empty(),
        "the ServiceEntry-targeted policy applies"
    );
    assert!(
        bound(&snap, "10.0.0.10:9080").authz.is_empty(),
        "and not to the Service"
    );
}

#[test]
fn retry_budget_bounds_retries_by_the_requests_in_flight() {
    let dr = destination_rule(
        "default",
        "budget",
        "{host: reviews, trafficPolicy: {retryBudget: {percent: 50, minRetryConcurrency: 2}}}",
    );
    let snap = ok(&base(&[&dr]));
    let t = bound(&snap, "10.0.0.10:9080")
        .cluster
        .traffic
        .clone()
        .expect("a traffic policy");
    assert_eq!(t.retry_budget, Some((50.0, 2)));
    // Nothing in flight: the floor (2) allows two retries, not three.
    let r1 = t.retry_slot().expect("first retry");
    let r2 = t.retry_slot().expect("second retry");
    assert!(t.retry_slot().is_none(), "the floor is 2");
    drop((r1, r2));
    // Ten requests in flight: 50% of them, five retries.
    let requests: Vec<_> = (0..10).map(|_| t.request_slot().unwrap()).collect();
    let retries: Vec<_> = (0..5)
        .map(|_| t.retry_slot().expect("within budget"))
        .collect();
    assert!(t.retry_slot().is_none(), "the sixth is over budget");
    drop((requests, retries));
    // istiod's defaults: Envoy gets 0.2 percent and a floor of 3.
    let dr = destination_rule(
        "default",
        "budget",
        "{host: reviews, trafficPolicy: {retryBudget: {}}}",
    );
    let snap = ok(&base(&[&dr]));
    let t = bound(&snap, "10.0.0.10:9080")
        .cluster
        .traffic
        .clone()
        .unwrap();
    assert_eq!(t.retry_budget, Some((0.2, 3)));
    let bad = destination_rule(
        "default",
        "bad",
        "{host: reviews, trafficPolicy: {retryBudget: {percent: 150}}}",
    );
    assert_error(
        &errs(&base(&[&bad])),
        "DestinationRule",
        "default",
        "bad",
        "spec.trafficPolicy.retryBudget.percent",
    );
}

#[test]
fn service_entry_none_ranges_serve_every_address_in_them() {
    let se = entry(
        "db-subnet",
        "",
        "{hosts: [db.example.com], addresses: [10.20.0.0/16], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: NONE}",
    );
    let snap = ok(&base(&[&se]));
    let sp = bound(&snap, "10.20.3.4:5432");
    assert_eq!(
        sp.vip,
        addr("10.20.3.4:5432"),
        "logged as the tunnel's address"
    );
    assert!(sp.cluster.passthrough);
    assert!(matches!(
        snap.lookup_vip(addr("10.21.0.1:5432")),
        VipLookup::Unknown
    ));
    assert!(matches!(
        snap.lookup_vip(addr("10.20.3.4:5433")),
        VipLookup::Unknown
    ));
    // A range with another resolution has no single endpoint: warned about, not served.
    let dns = entry(
        "dns-range",
        "",
        "{hosts: [x.example.com], addresses: [10.30.0.0/16], ports: [{number: 80, name: http}], resolution: DNS}",
    );
    let snap = ok(&base(&[&dns]));
    assert!(matches!(
        snap.lookup_vip(addr("10.30.0.1:80")),
        VipLookup::Unknown
    ));
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("served only with resolution NONE")),
        "{:?}",
        snap.warnings
    );
}

#[test]
fn tcp_keepalive_and_connection_lifetime_compile_as_istiod_renders_them() {
    let dr = destination_rule(
        "default",
        "pool",
        "{host: reviews, trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {probes: 3, time: 7.5s, interval: 500ms}, maxConnectionDuration: 30s}}}}",
    );
    let snap = ok(&base(&[&dr]));
    assert!(
        snap.warnings
            .iter()
            .all(|w| !w.contains("tcpKeepalive") && !w.contains("maxConnectionDuration")),
        "applied, not warned: {:?}",
        snap.warnings
    );
    let t = bound(&snap, "10.0.0.10:9080")
        .cluster
        .traffic
        .clone()
        .expect("a traffic policy");
    // Whole seconds, at least one (istiod's `uint32(seconds)`).
    assert_eq!(
        t.tcp_keepalive,
        Some(crate::traffic::TcpKeepalive {
            probes: Some(3),
            time: Some(Duration::from_secs(7)),
            interval: Some(Duration::from_secs(1)),
        })
    );
    assert_eq!(t.max_connection_duration, Some(Duration::from_secs(30)));
    let bad = destination_rule(
        "default",
        "bad",
        "{host: reviews, trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: soon}}}}}",
    );
    assert_error(
        &errs(&base(&[&bad])),
        "DestinationRule",
        "default",
        "bad",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.time",
    );
}

// --- Telemetry tracing --------------------------------------------------------------------

#[test]
fn telemetry_tracing_merges_field_by_field_as_istiod() {
    let mesh = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - providers: [{name: otel}]\n    randomSamplingPercentage: 10\n    customTags:\n      team: {literal: {value: payments}}\n";
    let svc = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: reviews, namespace: default}\nspec:\n  targetRefs: [{kind: Service, group: '', name: reviews}]\n  tracing:\n  - randomSamplingPercentage: 100\n    useRequestIdForTraceSampling: false\n  - match: {mode: CLIENT}\n    disableSpanReporting: true\n";
    let snap = ok(&base(&[mesh, svc]));
    let reviews = bound(&snap, "10.0.0.10:9080");
    let spec = reviews.tracing.spec().expect("tracing applies");
    assert_eq!(
        spec.provider.as_deref(),
        Some("otel"),
        "inherited from the mesh"
    );
    assert_eq!(spec.random_sampling_percentage, Some(100.0));
    assert_eq!(spec.use_request_id_for_trace_sampling, Some(false));
    assert_eq!(
        spec.disable_span_reporting, None,
        "a CLIENT-mode entry does not apply to the waypoint (server side)"
    );
    assert_eq!(
        spec.custom_tags,
        Some(vec![(
            "team".to_string(),
            crate::CustomTag::Literal("payments".into())
        )])
    );
    assert_eq!(
        spec.sources,
        [
            "Telemetry istio-system/mesh-default",
            "Telemetry default/reviews"
        ]
    );
    // Without Telemetry: nothing from policy.
    assert!(bound(&ok(&base(&[])), "10.0.0.10:9080").tracing.is_none());
}

#[test]
fn telemetry_tracing_is_validated_as_istio_webhook() {
    let bad = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: default}\nspec:\n  tracing:\n  - randomSamplingPercentage: 120\n  - customTags:\n      a: {literal: {value: x}, header: {name: x-team}}\n";
    let e = errs(&base(&[bad]));
    assert_error(
        &e,
        "Telemetry",
        "default",
        "t",
        "spec.tracing[0].randomSamplingPercentage",
    );
    assert_error(
        &e,
        "Telemetry",
        "default",
        "t",
        "spec.tracing[1].customTags.a",
    );
}

#[test]
fn service_entry_workload_selector_picks_pods_and_workload_entries() {
    // istiod's serviceentry controller: Pods and WorkloadEntries of the entry's namespace with
    // every selector label. A Pod in the ambient mesh is reached over HBONE at the targetPort;
    // a WorkloadEntry at its port of that name, plain TCP.
    let se = entry(
        "legacy",
        "",
        "{hosts: [legacy.internal], addresses: [240.240.0.9], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 9090}], resolution: STATIC, workloadSelector: {labels: {app: legacy}}}",
    );
    let we = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm-1, namespace: default}\nspec: {address: 10.2.0.9, labels: {app: legacy, version: v1}, ports: {http: 8080}, serviceAccount: vm}\n";
    let other_we = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm-2, namespace: default}\nspec: {address: 10.2.0.10, labels: {app: other}}\n";
    let snap = ok(&docs(&[
        &ns("istio.io/use-waypoint: waypoint, istio.io/dataplane-mode: ambient"),
        &gateway("istio.io/waypoint-for: service", ""),
        &se,
        &pod("legacy-1", "10.1.0.5", "app: legacy"),
        &pod("unrelated", "10.1.0.6", "app: other"),
        we,
        other_we,
    ]));
    let sp = bound(&snap, "240.240.0.9:80");
    let eps: Vec<_> = sp
        .cluster
        .endpoints()
        .iter()
        .map(|e| (e.addr, e.tunnel.as_deref().map(str::to_string)))
        .collect();
    assert_eq!(
        eps,
        vec![
            (
                addr("10.1.0.5:9090"),
                Some("spiffe://cluster.local/ns/default/sa/sa-legacy-1".to_string())
            ),
            (addr("10.2.0.9:8080"), None),
        ]
    );
    assert!(snap.selects_pods());
    // The selector and inline endpoints exclude each other (Istio's validation).
    let both = entry(
        "bad",
        "",
        "{hosts: [bad.internal], addresses: [240.240.0.10], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, workloadSelector: {labels: {app: x}}, endpoints: [{address: 10.0.0.1}]}",
    );
    let e = errs(&base(&[&both]));
    assert_error(
        &e,
        "ServiceEntry",
        "default",
        "bad",
        "spec.workloadSelector",
    );
}

#[test]
fn dynamic_dns_wildcard_entries_compile_as_istiod_renders_them_for_a_waypoint() {
    // istiod allocates one address per wildcard host (status.addresses); HTTP, GRPC and
    // HTTP2 ports are served by the dynamic forward proxy, TLS ports only behind an istiod
    // flag that is off by default (warned here, not served).
    let se = format!(
        "{}status: {{addresses: [{{value: 240.240.0.9, host: \"*.example.com\"}}, {{value: 240.240.0.10, host: \"*.example.org\"}}]}}\n",
        entry(
            "wild",
            "istio.io/use-waypoint: waypoint",
            "{hosts: [\"*.example.com\", \"*.example.org\"], ports: [{number: 80, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}, {number: 443, name: tls, protocol: TLS}], resolution: DYNAMIC_DNS, location: MESH_EXTERNAL}",
        )
    );
    let snap = ok(&docs(&[NS_PLAIN, &gateway("", ""), &se]));
    let http = bound(&snap, "240.240.0.9:80");
    assert_eq!(&*http.cluster.name, "inbound-vip|80|http|*.example.com");
    let d = http
        .cluster
        .dynamic_dns
        .as_ref()
        .expect("a DYNAMIC_DNS cluster");
    assert_eq!(&*d.cache, "*.example.com_dfp_dns_cache");
    assert!(http.cluster.endpoints().is_empty());
    // Envoy's suffix domain: case-insensitive, something before it, no port.
    assert!(
        d.matches("a.example.com") && d.matches("A.Example.COM") && d.matches("x.a.example.com")
    );
    for no in [
        "example.com",
        ".example.com",
        "a.example.com:80",
        "a.example.com.",
        "a.example.org",
        "",
    ] {
        assert!(!d.matches(no), "{no:?}");
    }
    let grpc = bound(&snap, "240.240.0.9:9090");
    assert_eq!(grpc.cluster.protocol, AppProtocol::Grpc);
    assert!(grpc.cluster.dynamic_dns.is_some());
    let other = bound(&snap, "240.240.0.10:80");
    assert_eq!(
        &*other.cluster.dynamic_dns.as_ref().unwrap().wildcard,
        "*.example.org"
    );
    assert!(matches!(
        snap.lookup_vip(addr("240.240.0.9:443")),
        VipLookup::Unknown
    ));
    assert!(
        snap.warnings.iter().any(|w| w.contains("spec.ports[2]")
            && w.contains("ENABLE_WILDCARD_HOST_SERVICE_ENTRIES_FOR_TLS")),
        "{:?}",
        snap.warnings
    );
    let info: Vec<_> = snap
        .services()
        .iter()
        .filter(|s| s.kind == "ServiceEntry")
        .map(|s| (s.name.to_string(), s.entry.clone().map(|e| e.1)))
        .collect();
    assert!(info.contains(&(
        "*.example.com".to_string(),
        Some(crate::Resolution::DynamicDns)
    )));

    // A wildcard with another resolution is skipped with a warning, as before.
    let static_wild = entry(
        "sw",
        "",
        "{hosts: [\"*.example.net\", api.example.net], addresses: [240.240.0.11], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, endpoints: [{address: 127.0.0.1}]}",
    );
    let snap = ok(&base(&[&static_wild]));
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("spec.hosts[0]") && w.contains("DYNAMIC_DNS only"))
    );
}

#[test]
fn dynamic_dns_entries_are_validated_as_istio_validates_them() {
    let cases = [
        (
            "fqdn",
            "{hosts: [api.example.com], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DYNAMIC_DNS}",
            "spec.hosts[0]",
        ),
        (
            "star",
            "{hosts: [\"*\"], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DYNAMIC_DNS}",
            "spec.hosts[0]",
        ),
        (
            "inner",
            "{hosts: [\"*.a.*.com\"], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DYNAMIC_DNS}",
            "spec.hosts[0]",
        ),
        (
            "addrs",
            "{hosts: [\"*.example.com\"], addresses: [240.240.0.12], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DYNAMIC_DNS}",
            "spec.addresses",
        ),
        (
            "eps",
            "{hosts: [\"*.example.com\"], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DYNAMIC_DNS, endpoints: [{address: 1.2.3.4}]}",
            "spec.endpoints",
        ),
        (
            "tcp",
            "{hosts: [\"*.example.com\"], ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: tcp, protocol: TCP}], resolution: DYNAMIC_DNS}",
            "spec.ports[1].protocol",
        ),
        (
            "internal",
            "{hosts: [\"*.example.com\"], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DYNAMIC_DNS, location: MESH_INTERNAL}",
            "spec.location",
        ),
    ];
    for (name, spec, field) in cases {
        let e = errs(&base(&[&entry(name, "", spec)]));
        assert_error(&e, "ServiceEntry", "default", name, field);
    }
}

#[test]
fn locality_priorities_are_istiods_failover_priorities() {
    use crate::snapshot::{Locality, LocalityLb};
    let lb = LocalityLb {
        proxy: Locality::parse("us-east/zone1/sub1"),
        failover: Vec::new(),
        by_locality: true,
        failover_priority: Vec::new(),
        distribute: None,
        unready_hosts: false,
    };
    let l = |s: &str| Locality::parse(s);
    let eps = [
        Some(l("us-east/zone1/sub1")),
        Some(l("us-east/zone1/sub2")),
        Some(l("us-east/zone2/x")),
        Some(l("us-west/zone1/sub1")),
        None,
        // An EndpointSlice's zone only: the proxy's region is assumed.
        Some(Locality::zone_only("zone1")),
        Some(Locality::from_label("us-east.zone2.y")),
    ];
    let refs: Vec<(Option<&Locality>, u8)> = eps.iter().map(|l| (l.as_ref(), 0)).collect();
    assert_eq!(lb.priorities(&refs), vec![0, 1, 2, 3, 3, 1, 2]);
    // No endpoint in the proxy's subzone: the nearest ones are priority 0 (no gaps).
    assert_eq!(lb.priorities(&refs[2..4]), vec![0, 1]);
    // `failover: us-east -> eu-west`: other regions than eu-west fall behind it.
    let lb = LocalityLb {
        failover: vec![("us-east".into(), "eu-west".into())],
        ..lb
    };
    let eps = [
        Some(l("us-east/zone1/sub1")),
        Some(l("us-west/zone1")),
        Some(l("eu-west/zone1")),
    ];
    let refs: Vec<(Option<&Locality>, u8)> = eps.iter().map(|l| (l.as_ref(), 0)).collect();
    assert_eq!(lb.priorities(&refs), vec![0, 2, 1]);
    // failoverPriority ranks first, locality second (istiod multiplies by 5 and compacts).
    let ranked = [
        (refs[0].0, 1),
        (refs[1].0, 0),
        (refs[2].0, 0),
        (refs[0].0, 0),
    ];
    assert_eq!(lb.priorities(&ranked), vec![3, 2, 1, 0]);
    let labels_only = LocalityLb {
        by_locality: false,
        ..lb.clone()
    };
    assert_eq!(labels_only.priorities(&ranked), vec![1, 0, 0, 0]);
}

#[test]
fn failover_priority_ranks_as_istiod_does() {
    use crate::snapshot::{Locality, LocalityLb};
    let lb = |labels: &[(&str, &str)]| LocalityLb {
        proxy: Locality::parse("r/z/s"),
        failover: Vec::new(),
        by_locality: false,
        failover_priority: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        distribute: None,
        unready_hosts: false,
    };
    let of = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(kk, _)| *kk == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let two = lb(&[("a", "1"), ("b", "2")]);
    assert_eq!(two.label_rank(&of(&[("a", "1"), ("b", "2")])), 0);
    assert_eq!(two.label_rank(&of(&[("a", "1"), ("b", "x")])), 1);
    assert_eq!(two.label_rank(&of(&[("a", "x"), ("b", "2")])), 2);
    assert_eq!(two.label_rank(&of(&[])), 2);
    // The network first: a mismatch adds n and the other labels still rank.
    let net = lb(&[("topology.istio.io/network", "n1"), ("b", "2")]);
    assert_eq!(
        net.label_rank(&of(&[("topology.istio.io/network", "n1"), ("b", "2")])),
        0
    );
    assert_eq!(
        net.label_rank(&of(&[("topology.istio.io/network", "n2"), ("b", "2")])),
        2
    );
    assert_eq!(
        net.label_rank(&of(&[("topology.istio.io/network", "n2"), ("b", "x")])),
        3
    );
    assert_eq!(
        net.label_rank(&of(&[("topology.istio.io/network", "n1"), ("b", "x")])),
        1
    );
}

#[test]
fn distribute_weights_localities_as_istiod_does() {
    use crate::snapshot::{Locality, LocalityLb};
    let l = |s: &str| Locality::parse(s);
    let lb = LocalityLb {
        proxy: l("us-east/zone1/sub1"),
        failover: Vec::new(),
        by_locality: true,
        failover_priority: Vec::new(),
        distribute: Some(vec![("us-east/zone1/*".into(), 70), ("eu/*".into(), 30)]),
        unready_hosts: false,
    };
    let locs = [
        l("us-east/zone1/sub1"),
        l("us-east/zone1/sub1"),
        l("eu/zone2/a"),
        l("eu/zone3/b"),
        l("eu/zone3/b"),
        l("us-west/zone1/sub1"),
    ];
    let eps: Vec<(Option<&Locality>, u32)> = locs.iter().map(|x| (Some(x), 1)).collect();
    // zone1 gets 70; `eu/*` matches two localities, whose endpoint weights 1 and 2 share its
    // 30: ceil(30/3) = 10 and ceil(60/3) = 20. us-west is named by no pattern: dropped.
    assert_eq!(
        lb.distribution(&eps),
        vec![
            Some((70, 0)),
            Some((70, 0)),
            Some((10, 1)),
            Some((20, 2)),
            Some((20, 2)),
            None
        ]
    );
    assert_eq!(lb.priorities(&[(Some(&locs[5]), 0)]), vec![0]);
}

#[test]
fn locality_failover_needs_outlier_detection_and_the_proxys_locality() {
    let p1 = pod("r1", "10.1.0.1", "app: reviews");
    let p2 = pod(
        "r2",
        "10.1.0.2",
        "app: reviews, topology.istio.io/locality: us-west.zone9",
    );
    let s = slice(
        "default",
        "reviews",
        "reviews-1",
        "endpoints:\n- {addresses: [10.1.0.1], zone: zone1, targetRef: {kind: Pod, name: r1}}\n- {addresses: [10.1.0.2], zone: zone1, targetRef: {kind: Pod, name: r2}}\n- {addresses: [10.1.0.3], zone: zone2}\nports: [{name: http, port: 9080}]",
    );
    let dr = |tp: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec: {{host: reviews, trafficPolicy: {tp}}}\n"
        )
    };
    let compile_with = |yaml: &str, opts: CompileOptions| {
        let loaded = parse_manifests(yaml, "t").expect("parses");
        compile(&loaded, &opts).expect("compiles")
    };
    let at = |locality: Option<&str>| CompileOptions {
        locality: locality.map(crate::Locality::parse),
        ..Default::default()
    };
    let priorities = |snap: &Snapshot| -> Vec<(String, u8)> {
        bound(snap, "10.0.0.10:9080")
            .cluster
            .endpoints()
            .iter()
            .map(|e| (e.addr.ip().to_string(), e.priority))
            .collect()
    };
    let outlier = dr("{outlierDetection: {consecutive5xxErrors: 3}}");
    let yaml = base(&[&p1, &p2, &s, &outlier]);
    // The slice's zone (same region assumed), the Pod's label over its zone.
    let snap = compile_with(&yaml, at(Some("us-east/zone1")));
    assert!(bound(&snap, "10.0.0.10:9080").cluster.locality_lb.is_some());
    assert_eq!(
        priorities(&snap),
        vec![
            ("10.1.0.1".into(), 0),
            ("10.1.0.2".into(), 2),
            ("10.1.0.3".into(), 1)
        ]
    );
    // Without the proxy's locality, without outlier detection, or turned off: one priority.
    let none = |snap: &Snapshot| {
        let c = &bound(snap, "10.0.0.10:9080").cluster;
        c.locality_lb.is_none() && c.endpoints().iter().all(|e| e.priority == 0)
    };
    assert!(none(&compile_with(&yaml, at(None))));
    let plain = base(&[&p1, &p2, &s, &dr("{loadBalancer: {simple: ROUND_ROBIN}}")]);
    assert!(none(&compile_with(&plain, at(Some("us-east/zone1")))));
    let off = base(&[
        &p1,
        &p2,
        &s,
        &dr(
            "{outlierDetection: {consecutive5xxErrors: 3}, loadBalancer: {localityLbSetting: {enabled: false}}}",
        ),
    ]);
    assert!(none(&compile_with(&off, at(Some("us-east/zone1")))));
    let mesh_off = CompileOptions {
        mesh_locality: crate::LocalitySetting {
            enabled: false,
            ..Default::default()
        },
        ..at(Some("us-east/zone1"))
    };
    assert!(none(&compile_with(&yaml, mesh_off)));
    // Bad settings name their field, as Istio's validation words them.
    let f = "spec.trafficPolicy.loadBalancer.localityLbSetting";
    for (setting, field, says) in [
        (
            "{failover: [{from: us-east}]}",
            format!("{f}.failover[0]"),
            "different",
        ),
        (
            "{failover: [{from: a, to: b}], distribute: [{from: a, to: {b: 100}}]}",
            format!("{f}.distribute"),
            "simultaneously",
        ),
        (
            "{distribute: [{from: a, to: {b: 60, c: 30}}]}",
            format!("{f}.distribute[0].to"),
            "total locality weight 90 != 100",
        ),
        (
            "{distribute: [{from: a, to: {b: 0, c: 100}}]}",
            format!("{f}.distribute[0].to[b]"),
            "[1, 100]",
        ),
        (
            "{distribute: [{from: 'a/*/c', to: {b: 100}}]}",
            format!("{f}.distribute[0].from"),
            "wildcard",
        ),
        (
            "{distribute: [{from: a, to: {'b/*': 50, 'b/z': 50}}]}",
            format!("{f}.distribute[0].to[b/z]"),
            "overlap",
        ),
        (
            "{failover: [{from: a, to: b}], failoverPriority: [topology.kubernetes.io/zone]}",
            format!("{f}.failoverPriority"),
            "topology label",
        ),
    ] {
        let bad = base(&[&dr(&format!(
            "{{outlierDetection: {{}}, loadBalancer: {{localityLbSetting: {setting}}}}}"
        ))]);
        let e = errs(&bad);
        assert_error(&e, "DestinationRule", "default", "reviews", &field);
        assert!(
            e.iter()
                .any(|e| e.field == field && e.message.contains(says)),
            "{setting}: {e:?}"
        );
    }
}

#[test]
fn failover_priority_and_traffic_distribution_rank_endpoints_by_their_labels() {
    // Pods in two zones and on two nodes; the waypoint in zone1 on node-a.
    let p = |name: &str, ip: &str, labels: &str| pod(name, ip, labels);
    let pods = [
        p("r1", "10.1.0.1", "app: reviews, tier: gold"),
        p("r2", "10.1.0.2", "app: reviews, tier: silver"),
        p("r3", "10.1.0.3", "app: reviews, tier: gold"),
    ];
    let s = slice(
        "default",
        "reviews",
        "reviews-1",
        "endpoints:\n- {addresses: [10.1.0.1], zone: zone1, nodeName: node-a, targetRef: {kind: Pod, name: r1}}\n- {addresses: [10.1.0.2], zone: zone1, nodeName: node-b, targetRef: {kind: Pod, name: r2}}\n- {addresses: [10.1.0.3], zone: zone2, nodeName: node-c, targetRef: {kind: Pod, name: r3}}\n- {addresses: [10.1.0.4], zone: zone1, nodeName: node-a, conditions: {ready: false, terminating: false}}\n- {addresses: [10.1.0.5], zone: zone1, conditions: {ready: false}}\nports: [{name: http, port: 9080}]",
    );
    let opts = CompileOptions {
        locality: Some(crate::Locality::parse("us-east/zone1")),
        proxy_labels: [("tier".to_string(), "gold".to_string())].into(),
        node_name: "node-a".into(),
        ..Default::default()
    };
    let endpoints = |yaml: &str| -> Vec<(String, u8, bool)> {
        let loaded = parse_manifests(yaml, "t").expect("parses");
        let snap = compile(&loaded, &opts).expect("compiles");
        bound(&snap, "10.0.0.10:9080")
            .cluster
            .endpoints()
            .iter()
            .map(|e| (e.addr.ip().to_string(), e.priority, e.ready))
            .collect()
    };
    let mut all: Vec<&str> = pods.iter().map(String::as_str).collect();
    all.push(&s);
    // failoverPriority [tier]: gold first (the proxy's own label), zones not considered.
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec: {host: reviews, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}, loadBalancer: {localityLbSetting: {failoverPriority: [tier]}}}}\n";
    let mut with_dr = all.clone();
    with_dr.push(dr);
    assert_eq!(
        endpoints(&base(&with_dr)),
        vec![
            ("10.1.0.1".into(), 0, true),
            ("10.1.0.2".into(), 1, true),
            ("10.1.0.3".into(), 0, true)
        ]
    );
    // A `=value` override: silver first.
    let silver = dr.replace("[tier]", "['tier=silver']");
    let mut with_silver = all.clone();
    with_silver.push(&silver);
    assert_eq!(
        endpoints(&base(&with_silver))[1],
        ("10.1.0.2".into(), 0, true)
    );
    // PreferSameNode on the Service (no DestinationRule, no outlier detection): the node,
    // then the zone; the not-ready, not-terminating endpoint is kept as unhealthy, the
    // one that does not say it is not terminating is not (istiod's endpointHealthStatus).
    let yaml = base(&all).replace(
        "clusterIP: 10.0.0.10",
        "clusterIP: 10.0.0.10, trafficDistribution: PreferSameNode",
    );
    assert!(
        yaml.contains("PreferSameNode"),
        "the fixture has the Service"
    );
    assert_eq!(
        endpoints(&yaml),
        vec![
            ("10.1.0.1".into(), 0, true),
            ("10.1.0.2".into(), 1, true),
            ("10.1.0.3".into(), 2, true),
            ("10.1.0.4".into(), 0, false)
        ]
    );
    // PreferClose by the namespace annotation: the zone only.
    let yaml = base(&all).replace(
        "metadata: {name: default, labels",
        "metadata: {name: default, annotations: {networking.istio.io/traffic-distribution: PreferClose}, labels",
    );
    assert!(
        yaml.contains("PreferClose"),
        "the fixture has the Namespace"
    );
    let eps = endpoints(&yaml);
    assert_eq!(
        eps.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![0, 0, 1, 0],
        "{eps:?}"
    );
}

#[test]
fn the_waypoints_locality_is_found_from_its_own_pod() {
    // istiod's waypoint Deployment gives POD_NAMESPACE/POD_NAME; the Gateway's Service lists
    // the waypoint Pod (not ready yet at its first compile) with its node's zone.
    let me = "apiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-abc, namespace: default, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {serviceAccountName: waypoint}\nstatus: {podIP: 10.9.0.1, podIPs: [{ip: 10.9.0.1}]}\n";
    let own_slice = slice(
        "default",
        "waypoint",
        "waypoint-1",
        "endpoints:\n- {addresses: [10.9.0.1], zone: zone2, conditions: {ready: false}, targetRef: {kind: Pod, name: waypoint-abc}}\nports: [{name: mesh, port: 15008}]",
    );
    let reviews = slice(
        "default",
        "reviews",
        "reviews-1",
        "endpoints:\n- {addresses: [10.1.0.1], zone: zone1}\n- {addresses: [10.1.0.2], zone: zone2}\nports: [{name: http, port: 9080}]",
    );
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec: {host: reviews, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}}\n";
    let yaml = base(&[me, &own_slice, &reviews, dr]);
    let opts = CompileOptions {
        own_pod: Some(("default".into(), "waypoint-abc".into())),
        ..Default::default()
    };
    let loaded = parse_manifests(&yaml, "t").expect("parses");
    let snap = compile(&loaded, &opts).expect("compiles");
    let eps: Vec<(String, u8)> = bound(&snap, "10.0.0.10:9080")
        .cluster
        .endpoints()
        .iter()
        .map(|e| (e.addr.ip().to_string(), e.priority))
        .collect();
    assert_eq!(eps, vec![("10.1.0.1".into(), 1), ("10.1.0.2".into(), 0)]);
    // `--locality` wins over what the Pod says.
    let opts = CompileOptions {
        locality: Some(crate::Locality::parse("r/zone1")),
        ..opts
    };
    let snap = compile(&loaded, &opts).expect("compiles");
    let first = bound(&snap, "10.0.0.10:9080").cluster.endpoints()[0].priority;
    assert_eq!(first, 0);
}
