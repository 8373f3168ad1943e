//! The real `waypoint` binary, driven as users and Kubernetes drive it: `check`, `certs`,
//! `run` (readiness, a request over HBONE, SIGHUP reload, SIGTERM drain) and `demo`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_waypoint");

fn examples_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn check_accepts_every_bundled_example() {
    // Each file or directory under examples/ is one complete configuration.
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(BIN)
                .arg("check")
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn check_names_every_invalid_resource_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: "no-slash"}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "invalid config must fail: {text}");
    assert!(
        text.contains("HTTPRoute default/broken: spec.rules[0].matches[0].path.value"),
        "{text}"
    );
    assert!(
        text.contains("HTTPRoute default/broken: spec.rules[1].matches[0].path.value"),
        "{text}"
    );
    assert!(text.contains("2 problem(s) found"), "{text}");

    // A YAML syntax error names the file.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "kind: Service\nmetadata: [unclosed\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("bad.yaml"), "{text}");
}

/// A `waypoint run` child whose stderr is watched for the bound addresses.
struct Waypoint {
    child: Child,
    hbone: SocketAddr,
    ready: SocketAddr,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..].split_whitespace().next()?.parse().ok()
}

#[allow(clippy::zombie_processes)] // the child is killed and waited in `Waypoint::drop`
fn start_run(config: &Path, certs: &Path) -> Waypoint {
    let mut child = Command::new(BIN)
        .arg("run")
        .env("WAYPOINT_CONFIG", config)
        .env("WAYPOINT_CERTS", certs)
        .args(["--hbone-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--drain-timeout",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("waypoint did not report its listeners");
        if line.contains("waypoint serving") {
            return Waypoint {
                hbone: field(&line, "hbone_addr").unwrap(),
                ready: field(&line, "ready_addr").unwrap(),
                child,
                stderr: rx,
            };
        }
    }
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no stderr line containing {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn run_serves_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(BIN)
        .arg("certs")
        .arg("--out")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::copy(
        examples_dir().join("bookinfo.yaml"),
        config_dir.join("bookinfo.yaml"),
    )
    .unwrap();

    let mut wp = start_run(&config_dir, &certs);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Readiness.
        let (status, _) = http_get(wp.ready, "/healthz/ready").await;
        assert_eq!(status, 200);
        // A CONNECT over real mTLS as the dev `sleep` identity: reviews has no backend running
        // here, so the waypoint answers 503 after Envoy-style retries (the tunnel works).
        let chain = std::fs::read(certs.join("sleep-cert.pem")).unwrap();
        let key = std::fs::read(certs.join("sleep-key.pem")).unwrap();
        let root = std::fs::read(certs.join("root-cert.pem")).unwrap();
        let bundle = hbone::tls::CertBundle::from_pem(&chain, &key, &root).unwrap();
        let tls = hbone::tls::client_config(
            &bundle,
            hbone::tls::ExpectedServer::AnyOf(vec![
                "spiffe://cluster.local/ns/default/sa/waypoint"
                    .parse()
                    .unwrap(),
            ]),
        )
        .unwrap();
        let conn = hbone::client::Connection::connect(wp.hbone, tls, &Default::default())
            .await
            .unwrap();
        let mut http = proxy::client::TunnelHttp::open(&conn, "10.0.0.11:9080")
            .await
            .unwrap();
        let r = http.get("ratings:9080", "/").await.unwrap();
        assert_eq!(r.status, 503);
    });

    // SIGHUP with a broken config keeps the last good one.
    std::fs::write(config_dir.join("broken.yaml"), "kind: HTTPRoute\nmetadata: {name: x}\nspec: {rules: [{matches: [{path: {type: Exact, value: nope}}]}]}\n").unwrap();
    signal(&wp.child, "HUP");
    wait_line(&wp.stderr, "keeping the last good configuration");
    rt.block_on(async {
        assert_eq!(http_get(wp.ready, "/healthz/ready").await.0, 200);
    });
    // SIGHUP with a fixed config reloads.
    std::fs::remove_file(config_dir.join("broken.yaml")).unwrap();
    signal(&wp.child, "HUP");
    wait_line(&wp.stderr, "configuration reloaded");

    // SIGTERM: drain and exit 0.
    signal(&wp.child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = wp.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "waypoint did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn run_refuses_to_start_with_an_invalid_config_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(
        Command::new(BIN)
            .arg("certs")
            .arg("--out")
            .arg(&certs)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(dir.path().join("c.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: not-an-ip, ports: [{port: 80}]}\n").unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("c.yaml"))
        .arg("--certs")
        .arg(&certs)
        .args([
            "--hbone-addr",
            "127.0.0.1:0",
            "--ready-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Service default/s"), "{err}");
    assert!(err.contains("clusterIP"), "{err}");
}

#[test]
fn demo_prints_access_log_lines_and_exits() {
    let out = Command::new(BIN)
        .args(["demo", "--requests", "20"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
        })
        .collect();
    // 20 reviews + 2 ratings + the two lines of the refused unknown VIP.
    assert_eq!(lines.len(), 24, "{lines:?}");
    let reviews: Vec<_> = lines
        .iter()
        .filter(|l| l["route_name"] == "reviews-split")
        .collect();
    assert_eq!(reviews.len(), 20);
    assert!(reviews.iter().all(|l| l["response_code"] == 200));
    assert!(stderr.contains("demo summary"), "{stderr}");
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}
