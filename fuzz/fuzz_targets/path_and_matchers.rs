//! Path normalization is total and idempotent; route selection over a fixed table never
//! panics on any method, path, query or header value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: Exact, value: /a/b}}, {path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/v[0-9]+/.*"}, headers: [{name: x-k, value: v}]}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{queryParams: [{type: RegularExpression, name: q, value: "a.*"}]}]
    backendRefs: [{name: web, port: 80}]
"#;

fn table() -> &'static policy::Snapshot {
    static S: OnceLock<policy::Snapshot> = OnceLock::new();
    S.get_or_init(|| {
        let loaded = policy::parse_manifests(ROUTES, "<fuzz>").expect("fixture parses");
        policy::compile(&loaded, &policy::CompileOptions::default()).expect("fixture compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(4, '\n');
    let (method, path, query, header) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("/"),
        parts.next(),
        parts.next().unwrap_or(""),
    );
    if let Ok(n) = policy::normalize_path(path) {
        let twice = policy::normalize_path(&n).expect("a normalized path normalizes");
        assert_eq!(n, twice, "normalization must be idempotent");
        let Ok(m) = http::Method::from_bytes(method.as_bytes()) else { return };
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(header) {
            headers.insert("x-k", v);
        }
        if let policy::VipLookup::Bound(sp) = table().lookup_vip("10.0.0.1:80".parse().expect("addr"))
            && let Some(routes) = &sp.routes
        {
            let _ = routes.select(&m, &n, query, &headers);
        }
    }
});
