//! Wildcard ServiceEntries with `resolution: DYNAMIC_DNS` (Istio's egress through a
//! waypoint): each request goes to what its `Host` resolves to, side by side with real Envoy
//! 1.40 configured as istiod configures a waypoint for such an entry (the
//! `dynamic_forward_proxy` HTTP filter and cluster sharing the DNS cache
//! `*.example.com_dfp_dns_cache`, the virtual host's one domain the wildcard host), both
//! resolving against the same real DNS server (dnslib). Envoy sends a `Host` without a port
//! to port 80 (443 with TLS), so the test runs in a network namespace of its own
//! ([`waypoint_tests::netns`]), where its backends listen on 127.0.0.1:80 and 127.0.0.2:80.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use waypoint_tests::dns::{DnsServer, Record};
use waypoint_tests::envoy::{Envoy, HttpListener, http_bootstrap};
use waypoint_tests::{Backend, Manifests, TestWaypoint, TunnelHttp, netns};

const VIP: &str = "240.240.0.30:80";
const CLUSTER: &str = "inbound-vip|80|http|*.example.com";

fn wildcard_entry(extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: wildcard, namespace: default}}\nspec: {{hosts: [\"*.example.com\"], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: DYNAMIC_DNS, location: MESH_EXTERNAL}}\nstatus: {{addresses: [{{value: 240.240.0.30, host: \"*.example.com\"}}]}}\n{extra}"
    )
}

/// Envoy with istiod's rendering of the entry on a plain HTTP listener, logging the fields
/// compared to `log`.
async fn envoy_dfp(dns: SocketAddr, log: &std::path::Path) -> Envoy {
    let cache = format!(
        "dns_cache_config:\n  name: \"*.example.com_dfp_dns_cache\"\n  dns_lookup_family: V4_ONLY\n  typed_dns_resolver_config:\n    name: envoy.network.dns_resolver.cares\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig\n      resolvers: [{{socket_address: {{address: \"{}\", port_value: {}}}}}]\n      use_resolvers_as_fallback: false\n",
        dns.ip(),
        dns.port()
    );
    let indent = |s: &str, n: usize| {
        s.lines()
            .map(|l| format!("{:n$}{l}\n", ""))
            .collect::<String>()
    };
    let hcm = format!(
        "access_log:\n- name: envoy.access_loggers.file\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n    path: \"{}\"\n    log_format:\n      json_format: {{response_code: \"%RESPONSE_CODE%\", response_flags: \"%RESPONSE_FLAGS%\", response_code_details: \"%RESPONSE_CODE_DETAILS%\", upstream_host: \"%UPSTREAM_HOST%\", upstream_cluster: \"%UPSTREAM_CLUSTER_RAW%\", authority: \"%REQ(:AUTHORITY)%\"}}\n",
        log.display()
    );
    let filters = format!(
        "- name: envoy.filters.http.dynamic_forward_proxy\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig\n{}",
        indent(&cache, 4)
    );
    let clusters = format!(
        "- name: \"{CLUSTER}\"\n  lb_policy: CLUSTER_PROVIDED\n  cluster_type:\n    name: envoy.clusters.dynamic_forward_proxy\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig\n{}",
        indent(&cache, 6)
    );
    let routes = waypoint_tests::envoy::istio_default_route(CLUSTER);
    let config = http_bootstrap(&HttpListener {
        stat_prefix: Some("inbound_0.0.0.0_80"),
        virtual_host: Some("inbound|http|80"),
        domains: Some("\"*.example.com\""),
        hcm: &hcm,
        routes: &routes,
        filters: &filters,
        clusters: &clusters,
        ..HttpListener::default()
    });
    Envoy::start(&config).await.expect("envoy starts")
}

/// Keep-alive HTTP/1.1 to Envoy's plain listener.
struct Plain(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Plain {
    async fn open(addr: SocketAddr) -> Plain {
        Plain(waypoint_tests::envoy::plain_connection(addr).await.unwrap())
    }

    async fn get(&mut self, host: &str) -> (u16, String) {
        self.0.ready().await.unwrap();
        let req = http::Request::builder()
            .uri("/")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Envoy's log lines so far.
fn envoy_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The compared fields of a log line (Envoy prints `null` for an empty field, as we do).
fn fields(v: &Value) -> [String; 4] {
    [
        "response_flags",
        "response_code_details",
        "upstream_host",
        "upstream_cluster",
    ]
    .map(|k| v[k].to_string())
}

#[tokio::test]
async fn dynamic_dns_sends_each_request_where_its_host_resolves_as_envoy_does() {
    const TEST: &str =
        "dynamic_dns::dynamic_dns_sends_each_request_where_its_host_resolves_as_envoy_does";
    if !netns::inside() {
        netns::run(TEST, Duration::from_secs(240)).await.unwrap();
        return;
    }
    netns::loopback_up().unwrap();
    let a = Backend::echo_at("a", "127.0.0.1:80").await.unwrap();
    let b = Backend::echo_at("b", "127.0.0.2:80").await.unwrap();
    let dns = DnsServer::start(&[
        Record {
            name: "a.example.com",
            ip: "127.0.0.1",
            ttl: 30,
        },
        Record {
            name: "b.example.com",
            ip: "127.0.0.2",
            ttl: 30,
        },
        // Nothing listens on 127.0.0.3:80: the connection goes on to the next address, the
        // log names the first.
        Record {
            name: "first.example.com",
            ip: "127.0.0.3",
            ttl: 30,
        },
        Record {
            name: "first.example.com",
            ip: "127.0.0.1",
            ttl: 30,
        },
        Record {
            name: "dead.example.com",
            ip: "127.0.0.4",
            ttl: 30,
        },
        Record {
            name: "dead.example.com",
            ip: "127.0.0.5",
            ttl: 30,
        },
        Record {
            name: "fail.example.com",
            ip: "SERVFAIL",
            ttl: 30,
        },
        Record {
            name: "v6only.example.com",
            ip: "::1",
            ttl: 30,
        },
        Record {
            name: "*.many.example.com",
            ip: "127.0.0.1",
            ttl: 30,
        },
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let envoy_log = dir.path().join("envoy.log");
    let envoy = envoy_dfp(dns.addr, &envoy_log).await;
    let mut theirs = Plain::open(envoy.listener("plain").await.unwrap()).await;

    let mut m = Manifests::new();
    m.push(&wildcard_entry(""));
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.dns.servers = servers).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut ours = TunnelHttp::open(&conn, VIP).await.unwrap();

    // (Host, expected status, expected body, expected flags): the answers Envoy gave by hand
    // (docs/envoy-observed.md 20), now checked against both.
    let cases: &[(&str, u16, &str, &str)] = &[
        ("a.example.com", 200, "a\n", "\"-\""),
        ("A.EXAMPLE.COM", 200, "a\n", "\"-\""),
        ("b.example.com", 200, "b\n", "\"-\""),
        ("first.example.com", 200, "a\n", "\"-\""),
        (
            "dead.example.com",
            503,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure",
            "\"URX,UF\"",
        ),
        ("nx.example.com", 503, "DNS resolution failure", "\"DF\""),
        ("fail.example.com", 503, "DNS resolution failure", "\"DF\""),
        (
            "v6only.example.com",
            503,
            "DNS resolution failure",
            "\"DF\"",
        ),
        ("x.a.example.com", 503, "DNS resolution failure", "\"DF\""),
        ("example.com", 404, "", "\"NR\""),
        ("a.example.com.", 404, "", "\"NR\""),
        ("a.example.com:80", 404, "", "\"NR\""),
        ("other.org", 404, "", "\"NR\""),
    ];
    let mut our_lines = Vec::new();
    for (host, status, body, flags) in cases {
        let got_theirs = theirs.get(host).await;
        let r = ours.get(host, "/").await.unwrap();
        let got_ours = (r.status.as_u16(), r.text());
        assert_eq!(
            got_theirs,
            (*status, body.to_string()),
            "Envoy, Host {host}"
        );
        assert_eq!(got_ours, got_theirs, "ours against Envoy's, Host {host}");
        let line = wp.next_logs(1).remove(0);
        assert_eq!(line["response_flags"].to_string(), *flags, "Host {host}");
        our_lines.push(line);
    }
    // Envoy writes its file log every 10 s (`--file-flush-interval-msec`): read it once.
    let envoy_log_lines = waypoint_tests::eventually(Duration::from_secs(30), || {
        let lines = envoy_lines(&envoy_log);
        std::future::ready((lines.len() >= cases.len()).then_some(lines))
    })
    .await
    .expect("Envoy logs every request");
    for ((host, ..), (ours, theirs)) in cases.iter().zip(our_lines.iter().zip(&envoy_log_lines)) {
        assert_eq!(fields(ours), fields(theirs), "log fields, Host {host}");
    }
    let servfail = &envoy_log_lines[6];
    assert_eq!(
        servfail["response_code_details"],
        "dns_resolution_failure{cares_failure:DNS_server_returned_general_failure}"
    );
    // A failed name is remembered: asked once, not again before the refresh rate (60 s).
    for _ in 0..3 {
        let again = ours.get("nx2.example.com", "/").await.unwrap();
        assert_eq!(again.status, 503);
        assert_eq!(wp.next_logs(1).remove(0)["response_flags"], "DF");
    }
    assert_eq!(dns.queries("nx2.example.com"), 1, "asked once");

    // A full cache (Envoy's max_hosts, 1024): a new name beyond it is refused, names held
    // keep working. Both caches already hold a few names from above.
    let overflow = |status: u16, body: &str| status == 503 && body == "DNS cache overflow";
    let mut first_overflow: [Option<usize>; 2] = [None, None];
    for n in 0..1040 {
        let host = format!("h{n}.many.example.com");
        let (s, body) = theirs.get(&host).await;
        if overflow(s, &body) && first_overflow[0].is_none() {
            first_overflow[0] = Some(n);
        }
        let r = ours.get(&host, "/").await.unwrap();
        if overflow(r.status.as_u16(), &r.text()) && first_overflow[1].is_none() {
            first_overflow[1] = Some(n);
        }
    }
    eprintln!(
        "first refused new name: Envoy's h{:?}, ours h{:?}",
        first_overflow[0], first_overflow[1]
    );
    // Envoy keys its cache by the Host as written (A.EXAMPLE.COM is a second name there),
    // ours in lower case: one name apart at most.
    let (e, o) = (first_overflow[0].unwrap(), first_overflow[1].unwrap());
    assert!(e.abs_diff(o) <= 1 && (1000..1024).contains(&o), "{e} {o}");
    let lines = wp.drain_logs(Duration::from_millis(200));
    let refused = lines.last().expect("log lines");
    assert_eq!(refused["response_code_details"], "dns_cache_overflow");
    assert_eq!(refused["response_flags"], "-");
    let total = cases.len() + 1040;
    let envoy_refused = waypoint_tests::eventually(Duration::from_secs(30), || {
        let lines = envoy_lines(&envoy_log);
        std::future::ready((lines.len() >= total).then(|| lines[total - 1].clone()))
    })
    .await
    .expect("Envoy logs every request");
    assert_eq!(fields(refused), fields(&envoy_refused));
    assert_eq!(ours.get("b.example.com", "/").await.unwrap().text(), "b\n");
    assert_eq!(theirs.get("b.example.com").await.1, "b\n");
    assert_eq!(wp.running().shared.dynamic_hosts.len(), 1024);
    drop((a, b, envoy));
}

/// A DestinationRule originating TLS for the wildcard host (Istio's own wildcard egress test
/// does this): the request goes to port 443, with the `Host` as SNI and the server's
/// certificate checked against it (istiod sets Envoy's `auto_sni` and `auto_san_validation`
/// on a DFP cluster). Two names on one address never share a connection: the name the
/// certificate does not carry fails every time, before and after the one it carries.
#[tokio::test]
async fn dynamic_dns_originates_tls_on_port_443_with_the_host_as_server_name() {
    const TEST: &str =
        "dynamic_dns::dynamic_dns_originates_tls_on_port_443_with_the_host_as_server_name";
    if !netns::inside() {
        netns::run(TEST, Duration::from_secs(120)).await.unwrap();
        return;
    }
    netns::loopback_up().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = hbone::testing::Pki::new("example.test").unwrap();
    let (_https, https) =
        crate::traffic_policy::https_envoy_at(&pki, dir.path(), false, "a.example.com", 443).await;
    assert_eq!(https.port(), 443);
    let dns = DnsServer::start(&[
        Record {
            name: "a.example.com",
            ip: "127.0.0.1",
            ttl: 30,
        },
        Record {
            name: "b.example.com",
            ip: "127.0.0.1",
            ttl: 30,
        },
    ])
    .unwrap();
    let rule = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: wildcard-tls, namespace: default}}\nspec: {{host: \"*.example.com\", trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: \"{}\"}}}}}}\n",
        dir.path().join("ca.pem").display()
    );
    let mut m = Manifests::new();
    m.push(&wildcard_entry(&rule));
    let servers = vec![dns.addr];
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.dns.servers = servers).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, VIP).await.unwrap();
    for round in 0..2 {
        let wrong = http.get("b.example.com", "/").await.unwrap();
        assert_eq!(wrong.status, 503, "round {round}: {}", wrong.text());
        let line = wp.next_logs(1).remove(0);
        assert_eq!(line["upstream_host"], "127.0.0.1:443");
        let reason = line["upstream_transport_failure_reason"].to_string();
        assert!(reason.contains("TLS_error"), "{line}");
        let right = http.get("a.example.com", "/").await.unwrap();
        assert_eq!(
            (right.status.as_u16(), right.text()),
            (200, "secure".into())
        );
        let line = wp.next_logs(1).remove(0);
        assert_eq!(line["upstream_host"], "127.0.0.1:443");
        assert_eq!(line["upstream_cluster"], CLUSTER);
    }
}
