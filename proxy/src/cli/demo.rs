//! `waypoint demo`: the real waypoint, the bundled bookinfo config, development certificates
//! issued on the spot, local demo backends on the endpoint addresses the config names, and a
//! built-in HBONE client (ztunnel's role). Access-log lines go to stdout, narration to stderr.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use accesslog::AccessLogger;
use anyhow::Context as _;
use bytes::Bytes;
use hbone::client::{ClientSettings, Connection};
use hbone::testing::Pki;
use hbone::tls::ExpectedServer;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use policy::Snapshot;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::app::{Config, Inputs};
use crate::cli::client::TunnelHttp;

/// The example every README reader starts from.
pub const BOOKINFO_YAML: &str = include_str!("../../../examples/bookinfo.yaml");

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Requests to the reviews VIP.
    pub requests: usize,
    /// Manifests to use instead of the bundled bookinfo example.
    pub manifests: Option<String>,
    /// Where access-log lines go (default: stdout).
    pub access_log: Option<AccessLogger>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            requests: 20,
            manifests: None,
            access_log: None,
        }
    }
}

/// What the demo observed.
#[derive(Debug, Default)]
pub struct DemoReport {
    /// `x-backend` of each 200 from reviews, counted.
    pub reviews_backends: BTreeMap<String, usize>,
    pub reviews_non_200: usize,
    pub ratings_status: Vec<u16>,
    /// Status of the CONNECT to a VIP the waypoint does not serve.
    pub unknown_vip_status: Option<u16>,
}

impl DemoReport {
    pub fn summary(&self) -> String {
        let split: Vec<String> = self
            .reviews_backends
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "demo summary: reviews 10.0.0.10:9080 -> {} (non-200: {}); ratings 10.0.0.11:9080 -> {:?}; \
             unknown VIP 10.0.0.99:9080 -> CONNECT {}",
            split.join(" "),
            self.reviews_non_200,
            self.ratings_status,
            self.unknown_vip_status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into())
        )
    }
}

/// One demo backend per endpoint address in the config, named after the Service that owns
/// it most specifically (the smallest cluster containing it), answering any path with
/// `200 <name>\n` and `x-backend: <name>`.
async fn start_backends(snapshot: &Snapshot) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut owner: BTreeMap<SocketAddr, (usize, String)> = BTreeMap::new();
    for c in snapshot.clusters() {
        for e in c.endpoints().iter() {
            let candidate = (c.endpoints().len(), c.service_name.to_string());
            match owner.get(&e.addr) {
                Some(existing) if *existing <= candidate => {}
                _ => {
                    owner.insert(e.addr, candidate);
                }
            }
        }
    }
    let mut tasks = Vec::new();
    for (addr, (_, name)) in owner {
        if !addr.ip().is_loopback() {
            anyhow::bail!("demo backends only run on loopback; endpoint {addr} ({name}) is not");
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot start the demo backend {name} on {addr}"))?;
        let name: Arc<str> = name.into();
        tasks.push(tokio::spawn(serve_backend(listener, name)));
    }
    Ok(tasks)
}

/// A demo backend: any request -> `200 <name>\n` with `x-backend: <name>`.
pub async fn serve_backend(listener: TcpListener, name: Arc<str>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let name = name.clone();
                async move {
                    let mut r = Response::new(Full::new(Bytes::from(format!("{name}\n"))));
                    *r.status_mut() = StatusCode::OK;
                    if let Ok(v) = http::HeaderValue::from_str(&name) {
                        r.headers_mut().insert("x-backend", v);
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Run the demo end to end and return what it saw.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let manifests = opts.manifests.as_deref().unwrap_or(BOOKINFO_YAML);
    let loaded = policy::parse_manifests(manifests, "examples/bookinfo.yaml")
        .map_err(|e| anyhow::anyhow!("bundled config: {}", crate::app::format_errors(&e)))?;
    let config = Config {
        hbone_addr: ([127, 0, 0, 1], 0).into(),
        ready_addr: ([127, 0, 0, 1], 0).into(),
        metrics_addr: ([127, 0, 0, 1], 0).into(),
        admin_addr: ([127, 0, 0, 1], 0).into(),
        drain_timeout: Duration::from_secs(2),
        ..Config::default()
    };
    let snapshot = policy::compile(&loaded, &config.compile_options())
        .map_err(|e| anyhow::anyhow!("bundled config: {}", crate::app::format_errors(&e)))?;

    eprintln!("demo: issuing development certificates (test root CA, SPIFFE identities)");
    let pki = Pki::new(&config.trust_domain)?;
    let waypoint_certs = pki.issue("default", "waypoint")?;
    let client_certs = pki.issue("default", "sleep")?;
    let waypoint_id = waypoint_certs.identity.clone();

    let backends = start_backends(&snapshot).await?;
    eprintln!(
        "demo: {} demo backends listening on their endpoint addresses",
        backends.len()
    );

    let logger = opts.access_log.clone().unwrap_or_else(AccessLogger::stdout);
    let running = crate::app::start(
        config,
        Inputs {
            certs: Some(waypoint_certs),
            snapshot: Some(snapshot),
            access_log: Some(logger.clone()),
        },
    )
    .await?;
    eprintln!(
        "demo: waypoint {waypoint_id} serving HBONE on {} (ready {}, metrics {}, admin {})",
        running.hbone_addr, running.ready_addr, running.metrics_addr, running.admin_addr
    );

    let tls = hbone::tls::client_config(&client_certs, ExpectedServer::AnyOf(vec![waypoint_id]))?;
    let conn = Connection::connect(running.hbone_addr, tls, &ClientSettings::default()).await?;
    eprintln!(
        "demo: HBONE client as {} connected; access log follows on stdout",
        client_certs.identity
    );

    let mut report = DemoReport::default();
    let mut reviews = TunnelHttp::open(&conn, "10.0.0.10:9080").await?;
    for _ in 0..opts.requests {
        let resp = reviews.get("reviews:9080", "/reviews/0").await?;
        if resp.status == StatusCode::OK {
            let backend = resp.header("x-backend").unwrap_or("?").to_string();
            *report.reviews_backends.entry(backend).or_default() += 1;
        } else {
            report.reviews_non_200 += 1;
        }
    }
    let mut ratings = TunnelHttp::open(&conn, "10.0.0.11:9080").await?;
    for _ in 0..2 {
        let resp = ratings.get("ratings:9080", "/ratings/0").await?;
        report.ratings_status.push(resp.status.as_u16());
    }
    let unknown = conn
        .send_connect("10.0.0.99:9080", http::HeaderMap::new())
        .await?;
    report.unknown_vip_status = Some(unknown.status.as_u16());
    drop(reviews);
    drop(ratings);
    drop(conn);

    running.shutdown().await;
    logger.flushed(Duration::from_secs(2)).await;
    for b in backends {
        b.abort();
    }
    Ok(report)
}
