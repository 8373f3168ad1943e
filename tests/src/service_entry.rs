//! ServiceEntry through the waypoint (egress): a STATIC entry with its route and policies, a
//! NONE entry passed through to the tunnel's address, and DNS entries resolved by the
//! waypoint against a real DNS server (dnslib), refreshed at the answer's TTL, with TLS
//! originated by a DestinationRule to a real HTTPS server (Envoy) checking the hostname:
//! the egress pattern of Istio's ambient egress docs.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use waypoint_tests::dns::{DnsServer, Record};
use waypoint_tests::{Backend, Manifests, TestWaypoint, TunnelHttp, eventually};

fn get(path: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn entry(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

async fn send(wp: &TestWaypoint, vip: &str, path: &str, host: &str) -> (u16, String) {
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, vip).await.unwrap();
    let r = http.send(get(path, host)).await.unwrap();
    (r.status.as_u16(), r.text())
}

#[tokio::test]
async fn static_entry_is_routed_authorized_and_logged_like_a_service() {
    let a = Backend::echo("external-a").await;
    let b = Backend::echo("external-b").await;
    let mut m = Manifests::new();
    m.push(&entry(
        "external",
        &format!(
            "{{hosts: [api.example.test], addresses: [240.240.0.1], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: STATIC, location: MESH_EXTERNAL, endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]}}",
            a.addr.port()
        ),
    ))
    // A second entry: the route's /b backend, named by host (`kind: Hostname`).
    .push(&entry(
        "other",
        &format!(
            "{{hosts: [b.example.test], ports: [{{number: 8080, name: http, protocol: HTTP, targetPort: {}}}], resolution: STATIC, endpoints: [{{address: 127.0.0.1}}]}}",
            b.addr.port()
        ),
    ))
    .push(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: default}\nspec:\n  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: external, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /b}}]\n    backendRefs: [{group: networking.istio.io, kind: Hostname, name: b.example.test, port: 8080}]\n  - backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: external, port: 80}]\n",
    )
    .push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: default}\nspec:\n  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: external}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
    );
    let wp = TestWaypoint::start(&m.yaml()).await;
    assert_eq!(
        send(&wp, "240.240.0.1:80", "/", "api.example.test").await,
        (200, "external-a\n".into())
    );
    let line = wp.next_logs(1).remove(0);
    assert_eq!(
        line["upstream_cluster"],
        "inbound-vip|80|http|api.example.test"
    );
    assert_eq!(line["upstream_host"], a.addr.to_string());
    assert_eq!(line["route_name"], "default.split.1");
    assert_eq!(
        send(&wp, "240.240.0.1:80", "/b", "api.example.test").await,
        (200, "external-b\n".into())
    );
    let line = wp.next_logs(1).remove(0);
    assert_eq!(
        line["upstream_cluster"],
        "inbound-vip|8080|http|b.example.test"
    );
    let (status, body) = send(&wp, "240.240.0.1:80", "/admin", "api.example.test").await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    // The policy targets the entry, not the waypoint: a bound Service is not affected.
    let snapshot = wp.running().shared.snapshot.load_full();
    let entry = snapshot
        .services()
        .iter()
        .find(|s| &*s.name == "api.example.test")
        .expect("the entry is listed");
    assert_eq!(entry.kind, "ServiceEntry");
    // `waypoint services` and `waypoint explain` show the entry for what it is.
    let table = proxy::ops::inspect::services_table(&snapshot);
    assert!(
        table.contains("api.example.test (ServiceEntry external, STATIC)"),
        "{table}"
    );
    let req = proxy::ops::inspect::ExplainRequest {
        from: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
        to: "240.240.0.1:80".parse().unwrap(),
        method: http::Method::GET,
        headers: http::HeaderMap::new(),
        path: "/admin".into(),
    };
    let text = proxy::ops::inspect::explain(&snapshot, &Default::default(), &req);
    assert!(
        text.contains(
            "ServiceEntry default/external host api.example.test port 80 (http), resolution STATIC"
        ),
        "{text}"
    );
    assert!(text.contains("403"), "{text}");
}

#[tokio::test]
async fn none_resolution_forwards_to_the_address_the_tunnel_names() {
    let a = Backend::echo("original-destination").await;
    let mut m = Manifests::new();
    m.push(&entry(
        "passthrough",
        &format!(
            "{{hosts: [db.example.test], addresses: [127.0.0.1], ports: [{{number: {}, name: http, protocol: HTTP}}], resolution: NONE}}",
            a.addr.port()
        ),
    ));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let vip = a.addr.to_string();
    assert_eq!(
        send(&wp, &vip, "/", "db.example.test").await,
        (200, "original-destination\n".into())
    );
    let line = wp.next_logs(1).remove(0);
    assert_eq!(line["upstream_host"], vip);

    // A range (the usual NONE entry: a subnet of external hosts): every address in it is
    // served, each tunnel going where it was sent.
    let other = Backend::echo_at("in-range", "127.0.0.6:0").await.unwrap();
    let mut m = Manifests::new();
    m.push(&entry(
        "subnet",
        &format!(
            "{{hosts: [subnet.example.test], addresses: [127.0.0.0/8], ports: [{{number: {}, name: http, protocol: HTTP}}], resolution: NONE}}",
            other.addr.port()
        ),
    ));
    let wp = TestWaypoint::start(&m.yaml()).await;
    let vip = other.addr.to_string();
    assert_eq!(
        send(&wp, &vip, "/", "subnet.example.test").await,
        (200, "in-range\n".into())
    );
    let line = wp.next_logs(1).remove(0);
    assert_eq!(line["upstream_host"], vip);
    assert_eq!(line["downstream_local_address"], vip);
}

/// The ambient egress pattern (istio.io `ambient/usage/egress-gateway`): port 80 in the
/// mesh, `targetPort` the HTTPS port, `resolution: DNS`, and a DestinationRule originating
/// TLS with the entry's host as SNI and the name checked.
#[tokio::test]
async fn dns_entry_with_tls_origination_reaches_a_real_https_server_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = hbone::testing::Pki::new("example.test").unwrap();
    let (_envoy, https) =
        crate::traffic_policy::https_envoy_for(&pki, dir.path(), false, "api.example.test").await;
    let dns = DnsServer::start(&[Record {
        name: "api.example.test",
        ip: "127.0.0.1",
        ttl: 30,
    }])
    .unwrap();
    let mut m = Manifests::new();
    m.push(&entry(
        "egress",
        &format!(
            "{{hosts: [api.example.test], addresses: [240.240.0.9], ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {}}}], resolution: DNS}}",
            https.port()
        ),
    ))
    .push(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: egress-tls, namespace: default}}\nspec: {{host: api.example.test, trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: \"{}\"}}}}}}\n",
        dir.path().join("ca.pem").display()
    ));
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.dns.servers = servers).await;
    assert_eq!(
        send(&wp, "240.240.0.9:80", "/", "api.example.test").await,
        (200, "secure".into())
    );
    let line = wp.next_logs(1).remove(0);
    assert_eq!(
        line["upstream_cluster"],
        "inbound-vip|80|http|api.example.test"
    );
    assert_eq!(line["upstream_host"], format!("127.0.0.1:{}", https.port()));
    assert!(dns.queries("api.example.test") >= 1);
    let snapshot = wp.running().shared.snapshot.load_full();
    let req = proxy::ops::inspect::ExplainRequest {
        from: None,
        to: "240.240.0.9:80".parse().unwrap(),
        method: http::Method::GET,
        headers: http::HeaderMap::new(),
        path: "/".into(),
    };
    let text = proxy::ops::inspect::explain(&snapshot, &Default::default(), &req);
    assert!(
        text.contains(&format!(
            "endpoints from DNS (DNS): api.example.test:{}",
            https.port()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{}", https.port())),
        "resolved in the running waypoint: {text}"
    );

    // A name the DNS server does not know: no endpoints, Envoy's empty-cluster answer.
    let mut m = Manifests::new();
    m.push(&entry(
        "unknown",
        "{hosts: [nowhere.example.test], addresses: [240.240.0.10], ports: [{number: 80, name: http, protocol: HTTP}], resolution: DNS}",
    ));
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.dns.servers = servers).await;
    let (status, body) = send(&wp, "240.240.0.10:80", "/", "nowhere.example.test").await;
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    assert_eq!(wp.next_logs(1).remove(0)["response_flags"], "UH");
}

/// A new answer is used once the old one's TTL runs out, and the name is asked once per TTL,
/// not per request; requests never fail across the change.
#[tokio::test]
async fn dns_answers_are_refreshed_when_their_ttl_runs_out() {
    let old = Backend::echo_at("old", "127.0.0.2:0").await.unwrap();
    let port = old.addr.port();
    let Ok(new) = Backend::echo_at("new", &format!("127.0.0.3:{port}")).await else {
        panic!("127.0.0.3:{port} is taken; rerun");
    };
    let dns = DnsServer::start(&[Record {
        name: "svc.example.test",
        ip: "127.0.0.2",
        ttl: 1,
    }])
    .unwrap();
    let mut m = Manifests::new();
    m.push(&entry(
        "moving",
        &format!(
            "{{hosts: [svc.example.test], addresses: [240.240.0.20], ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}], resolution: DNS}}"
        ),
    ));
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.dns.servers = servers).await;
    assert_eq!(
        send(&wp, "240.240.0.20:80", "/", "svc.example.test").await,
        (200, "old\n".into())
    );
    let started = std::time::Instant::now();
    dns.set(&[Record {
        name: "svc.example.test",
        ip: "127.0.0.3",
        ttl: 1,
    }])
    .unwrap();
    let moved = eventually(Duration::from_secs(10), || async {
        let (status, body) = send(&wp, "240.240.0.20:80", "/", "svc.example.test").await;
        assert_eq!(status, 200, "no request fails while the answer changes");
        (body == "new\n").then_some(())
    })
    .await;
    assert!(moved.is_some(), "the new answer is used after the TTL");
    let elapsed = started.elapsed();
    // One lookup per refresh (>= 1 s apart), not one per request: bounded by elapsed time.
    let asked = dns.queries("svc.example.test");
    assert!(
        asked <= 2 * (2 + elapsed.as_secs() as usize),
        "{asked} queries in {elapsed:?}"
    );
    drop((old, new));
}

/// Real Envoy with the clusters istiod renders for `resolution: DNS` entries (STRICT_DNS,
/// `respect_dns_ttl`, `dns_refresh_rate` 60 s as from MeshConfig's default `dnsRefreshRate`),
/// resolving against the same DNS server; a plain HTTP listener routes `/<name>` to the
/// cluster of that name, since only the clusters' behaviour is compared here.
async fn envoy_strict_dns(dns: SocketAddr, names: &[(&str, u16)]) -> waypoint_tests::envoy::Envoy {
    let mut routes = String::new();
    let mut clusters = String::new();
    for (name, port) in names {
        let cluster = format!("inbound-vip|80|http|{name}");
        routes.push_str(&format!(
            "- match: {{prefix: /{name}}}\n  route: {{cluster: \"{cluster}\"}}\n"
        ));
        clusters.push_str(&format!(
            r#"- name: "{cluster}"
  type: STRICT_DNS
  respect_dns_ttl: true
  dns_refresh_rate: 60s
  dns_lookup_family: V4_ONLY
  typed_dns_resolver_config:
    name: envoy.network.dns_resolver.cares
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
      resolvers: [{{socket_address: {{address: 127.0.0.1, port_value: {dns_port}}}}}]
      use_resolvers_as_fallback: false
  load_assignment:
    cluster_name: "{cluster}"
    endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {name}, port_value: {port}}}}}}}}}]}}]
"#,
            dns_port = dns.port()
        ));
    }
    let config = waypoint_tests::envoy::plain_http_bootstrap(&routes, "", &clusters);
    waypoint_tests::envoy::Envoy::start(&config)
        .await
        .expect("envoy starts")
}

/// Side by side with Envoy 1.40 (docs/envoy-observed.md 16): a positive answer is used until
/// its TTL runs out (1 s here, no floor); a failed lookup (SERVFAIL) keeps the last answer; a
/// negative one (NXDOMAIN) empties the cluster: 503 `no healthy upstream`, `UH`.
#[tokio::test]
async fn dns_entries_resolve_refresh_and_fail_as_envoys_strict_dns_clusters_do() {
    let old = Backend::echo_at("old", "127.0.0.4:0").await.unwrap();
    let port = old.addr.port();
    let Ok(_new) = Backend::echo_at("new", &format!("127.0.0.5:{port}")).await else {
        panic!("127.0.0.5:{port} is taken; rerun");
    };
    let (a, b) = ("moves.example.test", "fails.example.test");
    let record = |name, ip| Record { name, ip, ttl: 1 };
    let dns = DnsServer::start(&[record(a, "127.0.0.4"), record(b, "127.0.0.4")]).unwrap();
    let envoy = envoy_strict_dns(dns.addr, &[(a, port), (b, port)]).await;
    let envoy_addr = envoy.listener("plain").await.unwrap();
    let mut m = Manifests::new();
    for (i, host) in [a, b].iter().enumerate() {
        m.push(&entry(
            &format!("entry-{i}"),
            &format!(
                "{{hosts: [{host}], addresses: [240.240.0.{}], ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}], resolution: DNS}}",
                30 + i
            ),
        ));
    }
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.dns.servers = servers).await;
    let ours = |host: &'static str| {
        let vip = if host == a {
            "240.240.0.30:80"
        } else {
            "240.240.0.31:80"
        };
        let wp = &wp;
        async move { send(wp, vip, &format!("/{host}"), host).await }
    };
    let envoys = |host: &'static str| async move {
        let r = waypoint_tests::http_get(envoy_addr, &format!("/{host}"))
            .await
            .unwrap();
        (r.status.as_u16(), r.text())
    };
    // Envoy's first resolution runs as it starts; wait (bounded) for its clusters to warm.
    let warm = eventually(Duration::from_secs(10), || async {
        (envoys(a).await.0 == 200 && envoys(b).await.0 == 200).then_some(())
    })
    .await;
    assert!(warm.is_some(), "Envoy resolved the names");
    for host in [a, b] {
        assert_eq!(ours(host).await, (200, "old\n".into()));
        assert_eq!(envoys(host).await, (200, "old\n".into()));
    }

    // `a` moves and `b` starts failing: both follow `a` once its 1 s TTL runs out, and both
    // keep serving `b` from its last answer.
    let qb = dns.queries(b);
    dns.set(&[record(a, "127.0.0.5"), record(b, "SERVFAIL")])
        .unwrap();
    let moved = eventually(Duration::from_secs(10), || async {
        (ours(a).await.1 == "new\n" && envoys(a).await.1 == "new\n").then_some(())
    })
    .await;
    assert!(moved.is_some(), "both follow the new answer at the TTL");
    let failed = eventually(Duration::from_secs(10), || async {
        (dns.queries(b) >= qb + 2).then_some(())
    })
    .await;
    assert!(failed.is_some(), "both asked for {b} again");
    assert_eq!(ours(b).await, (200, "old\n".into()));
    assert_eq!(envoys(b).await, (200, "old\n".into()));

    // `a` disappears (NXDOMAIN): both empty the cluster.
    let qa = dns.queries(a);
    dns.set(&[record(b, "SERVFAIL")]).unwrap();
    let gone = eventually(Duration::from_secs(10), || async {
        (dns.queries(a) >= qa + 2 && envoys(a).await.0 == 503 && ours(a).await.0 == 503)
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "both answer 503 once the name is gone");
    assert_eq!(envoys(a).await, (503, "no healthy upstream".into()));
    assert_eq!(ours(a).await, (503, "no healthy upstream".into()));
}

/// Endpoint weights, side by side with Envoy 1.40 given what istiod renders for them
/// (`load_balancing_weight` on each endpoint): a STATIC entry's inline endpoints with
/// weights 1 and 3 under a ROUND_ROBIN DestinationRule, and WorkloadEntries of weights 1 and
/// 3 selected by an entry's `workloadSelector` under the default policy (least request).
/// Round robin gives each endpoint exactly its share of every cycle; least request shares
/// an idle cluster (one request at a time) by weight.
#[tokio::test]
async fn endpoint_weights_share_requests_as_envoys_load_balancing_weight_does() {
    const REQUESTS: usize = 400;
    let light = Backend::echo("light").await;
    let heavy = Backend::echo("heavy").await;
    let (lp, hp) = (light.addr.port(), heavy.addr.port());
    let mut m = Manifests::new();
    m.push(&entry(
        "rr",
        &format!(
            "{{hosts: [rr.example.test], addresses: [240.240.0.40], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: STATIC, endpoints: [{{address: 127.0.0.1, ports: {{http: {lp}}}}}, {{address: 127.0.0.1, ports: {{http: {hp}}}, weight: 3}}]}}"
        ),
    ))
    .push(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: rr, namespace: default}\nspec: {host: rr.example.test, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
    )
    .push(&entry(
        "lr",
        "{hosts: [lr.example.test], addresses: [240.240.0.41], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, workloadSelector: {labels: {app: weighted}}}",
    ));
    for (name, port, weight) in [("light", lp, 1), ("heavy", hp, 3)] {
        m.push(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default}}\nspec: {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: weighted}}, weight: {weight}}}\n"
        ));
    }
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut ours = Vec::new();
    for (vip, host) in [
        ("240.240.0.40:80", "rr.example.test"),
        ("240.240.0.41:80", "lr.example.test"),
    ] {
        let mut http = TunnelHttp::open(&conn, vip).await.unwrap();
        let mut heavy_count = 0;
        for _ in 0..REQUESTS {
            let r = http.send(get("/", host)).await.unwrap();
            assert_eq!(r.status, 200);
            heavy_count += usize::from(r.text() == "heavy\n");
        }
        ours.push(heavy_count);
    }
    // `/clusters` shows each endpoint's weight, as Envoy's does.
    let clusters = waypoint_tests::http_get(wp.running().admin_addr, "/clusters")
        .await
        .unwrap()
        .text();
    assert!(
        clusters.contains(&format!(
            "inbound-vip|80|http|rr.example.test::127.0.0.1:{hp}::weight::3"
        )),
        "{clusters}"
    );

    let lb_endpoints = format!(
        "[{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {lp}}}}}}}, load_balancing_weight: 1}}, {{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {hp}}}}}}}, load_balancing_weight: 3}}]"
    );
    let routes = "- match: {prefix: /rr}\n  route: {cluster: rr}\n- match: {prefix: /lr}\n  route: {cluster: lr}\n";
    let clusters = format!(
        "- name: rr\n  type: STATIC\n  lb_policy: ROUND_ROBIN\n  load_assignment: {{cluster_name: rr, endpoints: [{{lb_endpoints: {lb_endpoints}}}]}}\n- name: lr\n  type: STATIC\n  lb_policy: LEAST_REQUEST\n  load_assignment: {{cluster_name: lr, endpoints: [{{lb_endpoints: {lb_endpoints}}}]}}\n"
    );
    let envoy = waypoint_tests::envoy::Envoy::start(&waypoint_tests::envoy::plain_http_bootstrap(
        routes, "", &clusters,
    ))
    .await
    .expect("envoy starts");
    let envoy_addr = envoy.listener("plain").await.unwrap();
    let mut envoys = Vec::new();
    for path in ["/rr", "/lr"] {
        let mut heavy_count = 0;
        for _ in 0..REQUESTS {
            let r = waypoint_tests::http_get(envoy_addr, path).await.unwrap();
            assert_eq!(r.status, 200);
            heavy_count += usize::from(r.text() == "heavy\n");
        }
        envoys.push(heavy_count);
    }
    eprintln!("heavy endpoint's share of {REQUESTS}: ours {ours:?}, Envoy's {envoys:?}");
    // Round robin: exactly 3 of every 4, both.
    assert_eq!(ours[0], REQUESTS * 3 / 4);
    assert!(envoys[0].abs_diff(REQUESTS * 3 / 4) <= 1, "{envoys:?}");
    // Least request, one request at a time: by weight (ours draws at random: 300 +- 7
    // standard deviations is 240-360; unweighted it would be 200).
    for share in [ours[1], envoys[1]] {
        assert!(
            share.abs_diff(REQUESTS * 3 / 4) <= 60,
            "{ours:?} {envoys:?}"
        );
    }
}
