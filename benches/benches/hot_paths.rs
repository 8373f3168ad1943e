//! Criterion micro-benches for the pure hot paths (CI compiles them with `cargo bench
//! --no-run`; it never times them):
//!
//! - `route_select/*`: HTTPRoute selection on a Service with 1,000 rules
//!   (`policy::RouteTable::select` on a compiled snapshot);
//! - `access_log/write_line`: encoding one Istio JSON access-log line;
//! - `authz/*`: AuthorizationPolicy evaluation (`policy::evaluate`) with 100 ALLOW policies,
//!   and with 1,000 policies in the config of which 999 target other Services;
//! - `snapshot/*`: parsing and compiling a 1,000-Service configuration.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use policy::{AuthzRequest, AuthzSet, CompileOptions, HttpAttrs, RouteTable, VipLookup};
use waypoint_benches::model::{Backends, Model, Variant};

fn compiled(variant: Variant) -> policy::Snapshot {
    let yaml = Model::new(variant, &Backends::default()).waypoint_manifests();
    let loaded = policy::parse_manifests(&yaml, "bench.yaml").expect("bench config parses");
    policy::compile(&loaded, &CompileOptions::default()).expect("bench config compiles")
}

fn reviews(snapshot: &policy::Snapshot) -> Arc<policy::ServicePort> {
    let vip: SocketAddr = "10.0.0.10:9080".parse().expect("vip");
    match snapshot.lookup_vip(vip) {
        VipLookup::Bound(sp) => sp,
        _ => panic!("reviews VIP not bound"),
    }
}

fn reviews_table(snapshot: &policy::Snapshot) -> Arc<RouteTable> {
    reviews(snapshot)
        .routes
        .clone()
        .expect("reviews has an HTTPRoute")
}

fn route_select(c: &mut Criterion) {
    let snapshot = compiled(Variant {
        routes: 1000,
        ..Variant::BASE
    });
    let table = reviews_table(&snapshot);
    assert_eq!(table.len(), 1000);
    let first = table.select(&Method::PUT, "/reviews/101/edit", None, &HeaderMap::new());
    assert_eq!(first.map(|r| &*r.name), Some("decoy-101"));
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let mut g = c.benchmark_group("route_select");
    // Falls through every decoy to the catch-all split: the worst case.
    g.bench_function("1000_rules_last_match", |b| {
        b.iter(|| {
            black_box(table.select(
                black_box(&Method::GET),
                black_box("/reviews/0"),
                None,
                black_box(&headers),
            ))
        })
    });
    // The exact-path rule sorted first by precedence (longest exact path, lowest rule index).
    g.bench_function("1000_rules_first_match", |b| {
        b.iter(|| {
            black_box(table.select(
                black_box(&Method::PUT),
                black_box("/reviews/101/edit"),
                None,
                black_box(&headers),
            ))
        })
    });
    g.finish();
}

fn access_log(c: &mut Criterion) {
    let r = waypoint_benches::sample_access_log_record();
    let mut buf = Vec::with_capacity(4096);
    c.bench_function("access_log/write_line", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&r).write_line(&mut buf);
            black_box(buf.len())
        })
    });
}

fn authz(c: &mut Criterion) {
    let snapshot = compiled(Variant {
        policies: 100,
        ..Variant::BASE
    });
    let set: AuthzSet = reviews(&snapshot).authz.clone();
    assert_eq!(set.policies().len(), 100);
    let headers = HeaderMap::new();
    let sleep = get_reviews("spiffe://cluster.local/ns/default/sa/sleep", &headers);
    let stranger = get_reviews("spiffe://cluster.local/ns/other/sa/stranger", &headers);
    assert!(policy::evaluate(&set, &sleep).allowed);
    assert!(!policy::evaluate(&set, &stranger).allowed);
    let mut g = c.benchmark_group("authz");
    // Allowed by the last of 100 ALLOW policies (99 decoys are tried first).
    g.bench_function("100_allow_policies_last_allows", |b| {
        b.iter(|| black_box(policy::evaluate(black_box(&set), black_box(&sleep))))
    });
    // Matches none: denied after all 100.
    g.bench_function("100_allow_policies_denied", |b| {
        b.iter(|| black_box(policy::evaluate(black_box(&set), black_box(&stranger))))
    });
    g.finish();
    authz_1000_in_config(c);
}

/// 1,000 AuthorizationPolicies in the config: one on the waypoint, 999 attached to 999 other
/// Services. Policies are indexed by target at compile time, so a request to reviews
/// evaluates only the waypoint-wide one: its cost must not grow with the others.
fn authz_1000_in_config(c: &mut Criterion) {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: default}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 9080}]}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: waypoint-wide, namespace: default}\n\
         spec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}], to: [{operation: {methods: [GET]}}]}]\n",
    );
    for i in 0..999 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\nspec: {{clusterIP: 10.1.{}.{}, ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i}, namespace: default}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: svc-{i}}}]\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/x{i}/sa/y]}}}}], to: [{{operation: {{paths: [/p{i}/*]}}}}]}}]\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let loaded = policy::parse_manifests(&yaml, "bench-1000-policies.yaml").expect("parses");
    let snapshot = policy::compile(&loaded, &CompileOptions::default()).expect("compiles");
    let set: AuthzSet = reviews(&snapshot).authz.clone();
    assert_eq!(
        set.policies().len(),
        1,
        "only the waypoint-wide policy applies to reviews"
    );
    let headers = HeaderMap::new();
    let req = get_reviews("spiffe://cluster.local/ns/default/sa/sleep", &headers);
    assert!(policy::evaluate(&set, &req).allowed);
    c.bench_function("authz/1000_policies_in_config_per_request", |b| {
        b.iter(|| black_box(policy::evaluate(black_box(&set), black_box(&req))))
    });
}

fn snapshot(c: &mut Criterion) {
    let variant = Variant {
        extra_services: 1000,
        ..Variant::BASE
    };
    let yaml = Model::new(variant, &Backends::default()).waypoint_manifests();
    let loaded = policy::parse_manifests(&yaml, "bench.yaml").expect("bench config parses");
    let options = CompileOptions::default();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("compile_1000_services", |b| {
        b.iter(|| black_box(policy::compile(black_box(&loaded), &options)).is_ok())
    });
    g.bench_function("parse_and_compile_1000_services", |b| {
        b.iter(|| {
            let loaded = policy::parse_manifests(black_box(&yaml), "bench.yaml");
            loaded.map(|l| policy::compile(&l, &options).is_ok())
        })
    });
    g.finish();
}

/// `GET /reviews/0` to reviews (10.0.0.10:9080) from pod 10.244.2.5 as `principal`.
fn get_reviews<'a>(principal: &'a str, headers: &'a HeaderMap) -> AuthzRequest<'a> {
    AuthzRequest {
        source_principal: Some(principal),
        source_ip: Some([10, 244, 2, 5].into()),
        remote_ip: Some([10, 244, 2, 5].into()),
        dest_ip: Some([10, 0, 0, 10].into()),
        dest_port: 9080,
        http: Some(HttpAttrs {
            method: "GET",
            path: "/reviews/0",
            host: "reviews:9080",
            headers,
            request_principal: None,
            request_auth: None,
        }),
    }
}

criterion_group!(benches, route_select, access_log, authz, snapshot);
criterion_main!(benches);
