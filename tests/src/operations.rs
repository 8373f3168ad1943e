//! Day-two operations: hot reload (file edits, ConfigMap `..data` swaps, invalid configs kept
//! out), certificate rotation without dropping connections, readiness, drain under load.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use waypoint_tests::*;

fn base(backend: std::net::SocketAddr) -> Manifests {
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[backend]);
    m
}

async fn served(wp: &TestWaypoint, conn: &hbone::client::Connection, vip: &str) -> bool {
    match conn.send_connect(vip, http::HeaderMap::new()).await {
        Ok(r) => r.status == 200,
        Err(_) => {
            let _ = wp;
            false
        }
    }
}

#[tokio::test]
async fn editing_the_config_file_reloads_without_dropping_tunnels() {
    let b = Backend::echo("reviews").await;
    let wp = TestWaypoint::start(&base(b.addr).yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut open = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert!(!served(&wp, &conn, "10.0.0.11:9080").await);

    let mut m = base(b.addr);
    m.service("ratings", "10.0.0.11", 9080, "http", &[b.addr]);
    std::fs::write(wp.dir.path().join("config.yaml"), m.yaml()).unwrap();
    let ok = eventually(Duration::from_secs(10), || async {
        served(&wp, &conn, "10.0.0.11:9080").await.then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "the new Service is served after the file changed"
    );
    assert!(wp.running().shared.reloads_ok.load(Ordering::Relaxed) >= 1);
    // The tunnel opened before the reload still works.
    assert_eq!(open.get("reviews:9080", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn an_invalid_config_keeps_the_last_good_one_and_says_why() {
    let b = Backend::echo("reviews").await;
    let wp = TestWaypoint::start(&base(b.addr).yaml()).await;
    let mut bad = base(b.addr);
    bad.push("apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: default}\nspec: {clusterIP: not-an-ip, ports: [{port: 80}]}\n");
    std::fs::write(wp.dir.path().join("config.yaml"), bad.yaml()).unwrap();
    let failed = eventually(Duration::from_secs(10), || async {
        (wp.running().shared.reloads_failed.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert!(failed.is_some(), "the bad reload is counted");
    let dump = http_get(wp.running().admin_addr, "/config_dump")
        .await
        .unwrap();
    let text = dump.text();
    assert!(text.contains("Service default/broken"), "{text}");
    // The dump says which configuration is in force and where each resource came from.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["version"], 1,
        "the rejected reload did not change the version"
    );
    let svc = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "Service" && r["name"] == "default/reviews")
        .expect("reviews is listed");
    assert!(
        svc["source"]
            .as_str()
            .unwrap()
            .contains("config.yaml (document"),
        "{svc}"
    );
    // Still serving the last good configuration.
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
    let metrics = http_get(wp.running().metrics_addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("waypoint_config_reloads_failed_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_configmap_style_data_symlink_swap_is_picked_up() {
    let b = Backend::echo("reviews").await;
    // Start from a ConfigMap mount layout: ..v1/config.yaml, ..data -> ..v1, config.yaml -> ..data/config.yaml
    let m1 = base(b.addr);
    let wp = TestWaypoint::start_with(&m1.yaml(), |_| {}).await;
    let mount = wp.dir.path().join("mount");
    std::fs::create_dir_all(mount.join("..v1")).unwrap();
    std::fs::write(mount.join("..v1/config.yaml"), m1.yaml()).unwrap();
    std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", mount.join("config.yaml")).unwrap();
    // Point the running waypoint at the mount by making the watched dir's file a link into it.
    std::fs::remove_file(wp.dir.path().join("config.yaml")).unwrap();
    std::os::unix::fs::symlink(mount.join("config.yaml"), wp.dir.path().join("config.yaml"))
        .unwrap();
    let conn = wp.connect_as("default", "sleep").await;
    let before = wp.running().shared.reloads_ok.load(Ordering::Relaxed);
    let settled = eventually(Duration::from_secs(10), || async {
        (wp.running().shared.reloads_ok.load(Ordering::Relaxed) > before).then_some(())
    })
    .await;
    assert!(settled.is_some());

    // Kubernetes' atomic update: write ..v2, then rename a new ..data symlink over the old one.
    let mut m2 = base(b.addr);
    m2.service("ratings", "10.0.0.11", 9080, "http", &[b.addr]);
    std::fs::create_dir_all(mount.join("..v2")).unwrap();
    std::fs::write(mount.join("..v2/config.yaml"), m2.yaml()).unwrap();
    std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    let ok = eventually(Duration::from_secs(10), || async {
        served(&wp, &conn, "10.0.0.11:9080").await.then_some(())
    })
    .await;
    assert!(ok.is_some(), "the swapped-in config is served");
}

#[tokio::test]
async fn rotated_certificates_serve_new_connections_and_keep_old_ones() {
    let b = Backend::echo("reviews").await;
    let wp = TestWaypoint::start_with_cert_dir(&base(b.addr).yaml()).await;
    let old_conn = wp.connect_as("default", "sleep").await;
    let mut old_tunnel = TunnelHttp::open(&old_conn, "10.0.0.10:9080").await.unwrap();

    // Rotate to a certificate for a new service account.
    wp.pki
        .write_dir(&wp.dir.path().join("certs"), "default", "waypoint-rotated")
        .unwrap();
    let rotated: hbone::Identity = "spiffe://cluster.local/ns/default/sa/waypoint-rotated"
        .parse()
        .unwrap();
    let client = wp.client_certs("default", "sleep");
    let tls = hbone::tls::client_config(&client, hbone::tls::ExpectedServer::AnyOf(vec![rotated]))
        .unwrap();
    let addr = wp.addr;
    let new_conn = eventually(Duration::from_secs(10), || {
        let tls = tls.clone();
        async move {
            hbone::client::Connection::connect(addr, tls, &Default::default())
                .await
                .ok()
        }
    })
    .await
    .expect("a client pinning the rotated identity connects");
    let mut t = TunnelHttp::open(&new_conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(t.get("reviews:9080", "/").await.unwrap().status, 200);
    // The connection established before the rotation is still up.
    assert_eq!(
        old_tunnel.get("reviews:9080", "/").await.unwrap().status,
        200
    );
    assert_eq!(wp.running().shared.cert_reloads.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn readiness_fails_with_an_expired_certificate() {
    let b = Backend::echo("reviews").await;
    let wp = TestWaypoint::start_with_cert_dir(&base(b.addr).yaml()).await;
    assert_eq!(
        http_get(wp.running().ready_addr, "/healthz/ready")
            .await
            .unwrap()
            .status,
        200
    );
    let certs = wp.dir.path().join("certs");
    let (chain, key) = wp
        .pki
        .issue_pem_valid(
            "spiffe://cluster.local/ns/default/sa/waypoint",
            Some(((2000, 1, 1), (2001, 1, 1))),
        )
        .unwrap();
    std::fs::write(certs.join("key.pem"), key).unwrap();
    std::fs::write(certs.join("cert-chain.pem"), chain).unwrap();
    let not_ready = eventually(Duration::from_secs(10), || async {
        let r = http_get(wp.running().ready_addr, "/healthz/ready")
            .await
            .ok()?;
        (r.status == 503).then_some(r.text())
    })
    .await;
    assert_eq!(not_ready.as_deref(), Some("certificate expired\n"));
}

#[tokio::test]
async fn drain_under_load_loses_no_request_and_accepts_no_new_one() {
    let b = Backend::echo("reviews").await;
    let wp = TestWaypoint::start(&base(b.addr).yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let completed = Arc::new(AtomicUsize::new(0));
    let failed_after_send = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(16);
    for _ in 0..8 {
        let conn = conn.clone();
        let completed = completed.clone();
        let failed = failed_after_send.clone();
        let started = started_tx.clone();
        workers.push(tokio::spawn(async move {
            let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080")
                .await
                .expect("tunnel");
            let _ = started.send(()).await;
            // Bounded: at most 2,000 requests per worker.
            for _ in 0..2_000 {
                match http.get("reviews:9080", "/").await {
                    Ok(r) if r.status == 200 => {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    // The connection was closed between requests (Connection: close after the
                    // drain): nothing was in flight, nothing lost.
                    Err(e)
                        if e.to_string().contains("closed")
                            || e.to_string().contains("canceled") =>
                    {
                        break;
                    }
                    Err(e) => panic!("request lost during drain: {e}"),
                }
            }
        }));
    }
    for _ in 0..8 {
        started_rx.recv().await.unwrap();
    }
    let before = completed.load(Ordering::Relaxed);
    let addr = wp.addr;
    // Drain while the workers are busy.
    let mut wp = wp;
    let r = wp.running.take().unwrap();
    let drained = tokio::spawn(async move { r.shutdown().await });
    for w in workers {
        w.await.expect("worker");
    }
    assert!(
        drained.await.unwrap(),
        "every tunnel finished within the drain deadline"
    );
    assert_eq!(failed_after_send.load(Ordering::Relaxed), 0);
    assert!(completed.load(Ordering::Relaxed) >= before);
    // No new connection is accepted once drained.
    let client = wp.client_certs("default", "sleep");
    assert!(
        wp.connect_with(&client).await.is_err() || {
            let c = wp.connect_with(&client).await.unwrap();
            c.send_connect("10.0.0.10:9080", http::HeaderMap::new())
                .await
                .is_err()
        },
        "a drained waypoint must not accept new tunnels at {addr}"
    );
    // Every response that was received was logged.
    let logs = wp.drain_logs(Duration::from_millis(300));
    assert_eq!(logs.len(), completed.load(Ordering::Relaxed));
}

#[tokio::test]
async fn the_admin_port_serves_the_services_table() {
    let b = Backend::echo("reviews").await;
    let mut m = base(b.addr);
    m.push("apiVersion: v1\nkind: Service\nmetadata: {name: legacy, namespace: default, labels: {istio.io/use-waypoint: none}}\nspec: {clusterIP: 10.0.0.20, ports: [{name: tcp, port: 5432}]}\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    let table = http_get(wp.running().admin_addr, "/services")
        .await
        .unwrap()
        .text();
    let rows: Vec<String> = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        rows.contains(
            &"default reviews 10.0.0.10 9080/http default/waypoint namespace label bound here"
                .to_string()
        ),
        "{table}"
    );
    assert!(
        rows.contains(
            &"default legacy 10.0.0.20 5432/tcp none service label opted out".to_string()
        ),
        "{table}"
    );
}
