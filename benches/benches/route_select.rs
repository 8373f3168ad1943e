//! Route selection with 1,000 HTTPRoute rules on one Service: the indexed
//! `RouteTable::select` (exact-path hash, prefix buckets by ancestor, regexes last) against
//! the reference linear scan `select_linear`. Rules are compiled from YAML exactly as the
//! waypoint compiles them, so the table is the real pre-sorted one.

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use policy::{CompileOptions, compile, parse_manifests};
use std::hint::black_box;
use std::sync::Arc;

const RULES: usize = 1_000;

/// 1,000 rules across 4 HTTPRoutes: 400 Exact paths, 400 PathPrefixes (half with a header
/// match), 150 method+prefix rules and 50 regexes.
fn table() -> Arc<policy::RouteTable> {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: default}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\nspec:\n  clusterIP: 10.0.0.10\n  ports: [{name: http, port: 80}]\n",
    );
    for route in 0..4 {
        yaml.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{route}, namespace: default}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: api}}]\n  rules:\n"
        ));
        for i in 0..RULES / 4 {
            let n = route * (RULES / 4) + i;
            let m = match n % 20 {
                0..=7 => format!("path: {{type: Exact, value: /api/v{n}/items}}"),
                8..=11 => format!("path: {{type: PathPrefix, value: /svc{n}}}"),
                12..=15 => format!(
                    "path: {{type: PathPrefix, value: /svc{n}}}, headers: [{{name: x-tenant, value: t{n}}}]"
                ),
                16..=18 => format!("path: {{type: PathPrefix, value: /m{n}}}, method: POST"),
                _ => format!("path: {{type: RegularExpression, value: '/re{n}/[0-9]+'}}"),
            };
            yaml.push_str(&format!(
                "  - matches: [{{{m}}}]\n    backendRefs: [{{name: api, port: 80}}]\n"
            ));
        }
    }
    let loaded = parse_manifests(&yaml, "bench.yaml").expect("bench YAML");
    let snap = compile(&loaded, &CompileOptions::default()).expect("bench config compiles");
    let sp = snap
        .bound_services()
        .into_iter()
        .next()
        .expect("bound service");
    let t = sp.routes.clone().expect("routes");
    assert_eq!(t.len(), RULES);
    t
}

fn bench(c: &mut Criterion) {
    let t = table();
    let mut tenant = HeaderMap::new();
    tenant.insert("x-tenant", HeaderValue::from_static("t513"));
    let none = HeaderMap::new();
    let cases: [(&str, Method, &str, &HeaderMap); 5] = [
        ("exact_hit", Method::GET, "/api/v500/items", &none),
        ("prefix_hit_deep", Method::GET, "/svc509/a/b/c", &none),
        ("prefix_with_header", Method::GET, "/svc513/x", &tenant),
        ("regex_hit_last", Method::GET, "/re999/42", &none),
        ("miss_404", Method::GET, "/nothing/here", &none),
    ];
    let mut g = c.benchmark_group("route_select_1000_rules");
    for (name, method, path, headers) in &cases {
        // Both implementations agree on every case.
        assert_eq!(
            t.select(method, path, None, headers)
                .map(|r| r.name.clone()),
            t.select_linear(method, path, None, headers)
                .map(|r| r.name.clone()),
            "{name}"
        );
        g.bench_function(format!("indexed/{name}"), |b| {
            b.iter(|| black_box(t.select(method, black_box(path), None, headers)).is_some())
        });
        g.bench_function(format!("linear/{name}"), |b| {
            b.iter(|| black_box(t.select_linear(method, black_box(path), None, headers)).is_some())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
