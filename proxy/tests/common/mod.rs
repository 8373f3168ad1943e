//! What the binary-level tests share: `waypoint certs`, a `waypoint run` child with its bound
//! addresses read from stderr, and the dev `sleep` client's mTLS config.

#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_waypoint");

/// `waypoint certs --out <dir>/certs`: the dev PKI (waypoint and `sleep` identities).
pub fn dev_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
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
    certs
}

/// A `waypoint run` child whose stderr is watched for the bound addresses; killed on drop.
pub struct Waypoint {
    pub child: Child,
    pub hbone: SocketAddr,
    pub ready: SocketAddr,
    pub metrics: SocketAddr,
    /// The Envoy-compatible metrics listener (`--envoy-prom-addr`), when bound.
    pub envoy_prom: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The child's stderr lines after "waypoint serving".
    pub stderr: std::sync::mpsc::Receiver<String>,
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

/// `waypoint run` with configuration and certificates given through the environment (as the
/// Deployment does), every listener on 127.0.0.1 port 0, plus `args` and `env`.
pub fn start_run(config: &Path, certs: &Path, args: &[&str], env: &[(&str, &str)]) -> Waypoint {
    let config = config.display().to_string();
    let certs = certs.display().to_string();
    let mut all_env = vec![
        ("WAYPOINT_CONFIG", config.as_str()),
        ("WAYPOINT_CERTS", certs.as_str()),
    ];
    all_env.extend_from_slice(env);
    spawn_run(args, &all_env)
}

/// `waypoint run` with `args` and `env` only, listeners on 127.0.0.1 port 0; returns once it
/// reports its listeners (bounded: 30 s).
#[allow(clippy::zombie_processes)] // the child is killed and waited in `Waypoint::drop`
pub fn spawn_run(args: &[&str], env: &[(&str, &str)]) -> Waypoint {
    let child = Command::new(BIN)
        .arg("run")
        .envs(env.iter().copied())
        .args(["--hbone-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    attach(child)
}

/// Watch a started waypoint's stderr until it reports its listeners (bounded: 30 s).
pub fn attach(mut child: Child) -> Waypoint {
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(e) => panic!(
                "waypoint did not report its listeners ({e}); its stderr:\n{}",
                seen.join("\n")
            ),
        };
        seen.push(line.clone());
        if line.contains("waypoint serving") {
            return Waypoint {
                hbone: field(&line, "hbone_addr").unwrap(),
                ready: field(&line, "ready_addr").unwrap(),
                metrics: field(&line, "metrics_addr").unwrap(),
                envoy_prom: field(&line, "envoy_prom"),
                admin: field(&line, "admin_addr").unwrap(),
                child,
                stderr: rx,
            };
        }
    }
}

/// mTLS as the dev `sleep` identity, expecting the dev waypoint's identity.
pub fn sleep_client_tls(certs: &Path) -> Arc<rustls::ClientConfig> {
    let read = |f: &str| std::fs::read(certs.join(f)).unwrap();
    let bundle = hbone::tls::CertBundle::from_pem(
        &read("sleep-cert.pem"),
        &read("sleep-key.pem"),
        &read("root-cert.pem"),
    )
    .unwrap();
    hbone::tls::client_config(
        &bundle,
        hbone::tls::ExpectedServer::AnyOf(vec![
            "spiffe://cluster.local/ns/default/sa/waypoint"
                .parse()
                .unwrap(),
        ]),
    )
    .unwrap()
}

/// Resident anonymous memory of `pid` in KiB: the heap, stacks and buffers the process
/// allocated. File-backed pages (the binary's code, which grows as code paths are first run
/// and is reclaimable page cache) are left out.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `<dir>/config.yaml`: Gateway `default/waypoint` and Service reviews (10.0.0.10:9080) bound
/// to it, its one endpoint 127.0.0.1:`port`.
pub fn reviews_config(dir: &Path, port: u16) -> PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.0.0.10, ports: [{{name: http, port: 9080, targetPort: {port}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: reviews-1, namespace: default, labels: {{kubernetes.io/service-name: reviews}}}}
addressType: IPv4
endpoints: [{{addresses: [\"127.0.0.1\"]}}]
ports: [{{name: http, port: {port}}}]
"
        ),
    )
    .unwrap();
    config
}
