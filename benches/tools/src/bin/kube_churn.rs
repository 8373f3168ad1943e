//! `kube-churn`: the live-cluster benchmark (issue 18). The real `waypoint run --kube` binary
//! against the in-test Kubernetes API server (`discovery::testing`: HTTPS, paginated list,
//! watch) holding a large cluster, measured for what endpoint churn costs it.
//!
//! 1. Cluster: `--services` Services (each bound to the waypoint, one EndpointSlice of
//!    `--endpoints` endpoints, one Pod per endpoint), `--routes` HTTPRoutes and `--policies`
//!    AuthorizationPolicies (on distinct Services), plus the two Services the load uses.
//! 2. Start: time from process start to ready (every kind listed and compiled); RSS.
//! 3. Memory: add 10,000 Pods, then 10,000 endpoints (2,000 new slices of 5), through the API;
//!    the waypoint's RssAnon growth per 1,000 of each once it holds them.
//! 4. Quiet: c=`--conns` keep-alive GETs for `--base-secs`: latency p50/p99, requests/s, CPU.
//! 5. Churn alone: `--rate` endpoint changes per second for 20 s without traffic: the
//!    waypoint's CPU time per change (its idle CPU over the same time subtracted).
//! 6. Churn under load: the same churn for `--churn-secs` with the same load: latency p99
//!    against the quiet phase. One change in ten moves the probe Service's only endpoint
//!    between two live backends; a probe client requests it back to back and records the
//!    change-to-effect latency (change applied at the API server to the first response from
//!    the new backend), p50/p99.
//!
//! Every figure is printed with its conditions; `--json PATH` writes them for the README.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use discovery::testing::ApiServer;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_benches::procstat;

#[derive(Parser, Debug)]
struct Args {
    /// The waypoint binary.
    #[arg(long)]
    waypoint: std::path::PathBuf,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 5)]
    endpoints: usize,
    #[arg(long, default_value_t = 1_000)]
    routes: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Endpoint changes per second.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    #[arg(long, default_value_t = 60)]
    churn_secs: u64,
    #[arg(long, default_value_t = 20)]
    base_secs: u64,
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Worker threads of the waypoint.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// CPU list for the waypoint (taskset), e.g. "0".
    #[arg(long)]
    waypoint_cpus: Option<String>,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

fn vip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn pod_ip(i: usize, j: usize) -> String {
    let n = i * 8 + j;
    format!(
        "10.{}.{}.{}",
        128 + n / 62_500,
        (n / 250) % 250,
        n % 250 + 1
    )
}

fn cluster(args: &Args, load: SocketAddr, probe: SocketAddr) -> Vec<serde_json::Value> {
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": "istio-waypoint"}, "spec": {"controllerName": "istio.io/waypoint-controller"}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "default"},
            "spec": {"gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"}, "data": {"mesh": "{}"}}),
    ];
    let service = |name: &str, ip: &str| {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": {"istio.io/use-waypoint": "waypoint"}},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 9080}]}})
    };
    for (name, ip, backend) in [("load", "10.95.0.1", load), ("probe", "10.95.0.2", probe)] {
        out.push(service(name, ip));
        out.push(slice(
            name,
            0,
            &[(backend.ip().to_string(), None)],
            backend.port(),
        ));
    }
    for i in 0..args.services {
        let name = format!("svc-{i}");
        out.push(service(&name, &vip(i)));
        let eps: Vec<(String, Option<String>)> = (0..args.endpoints)
            .map(|j| (pod_ip(i, j), Some(format!("{name}-pod-{j}"))))
            .collect();
        out.push(slice(&name, 0, &eps, 8080));
        for j in 0..args.endpoints {
            out.push(pod(&format!("{name}-pod-{j}"), &pod_ip(i, j), &name));
        }
    }
    for i in 0..args.routes.min(args.services) {
        out.push(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": format!("route-{i}"), "namespace": "default"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": format!("svc-{i}"), "port": 9080}],
                "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                     "backendRefs": [{"name": format!("svc-{}", (i + 1) % args.services), "port": 9080}]},
                    {"backendRefs": [{"name": format!("svc-{i}"), "port": 9080}]}]}}));
    }
    for i in 0..args.policies.min(args.services) {
        let target = args.services - 1 - i;
        out.push(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": format!("allow-{target}"), "namespace": "default"},
            "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": format!("svc-{target}")}],
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}],
                           "to": [{"operation": {"methods": ["GET"]}}]}]}}));
    }
    out
}

fn slice(
    service: &str,
    n: usize,
    endpoints: &[(String, Option<String>)],
    port: u16,
) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, pod)| match pod {
            Some(p) => json!({"addresses": [ip], "targetRef": {"kind": "Pod", "name": p, "namespace": "default"}}),
            None => json!({"addresses": [ip]}),
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-{n}"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": eps, "ports": [{"name": "http", "port": port}]})
}

fn pod(name: &str, ip: &str, app: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
            "labels": {"app": app, "version": "v1", "pod-template-hash": "5b4d7c8f9"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-5b4d7c8f9"), "uid": "u"}]},
        "spec": {"serviceAccountName": app},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// A backend answering every request with its name.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(name)),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// One keep-alive HTTP/1.1 client on its own tunnel.
struct Client {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl Client {
    async fn open(conn: &hbone::client::Connection, authority: &str) -> anyhow::Result<Client> {
        let stream = conn.open(authority, http::HeaderMap::new()).await?;
        let (send, driver) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(driver);
        Ok(Client { send })
    }

    async fn get(&mut self) -> anyhow::Result<bytes::Bytes> {
        use http_body_util::BodyExt as _;
        self.send.ready().await?;
        let req = http::Request::get("/")
            .header("host", "svc")
            .body(http_body_util::Empty::new())?;
        let resp = self.send.send_request(req).await?;
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        Ok(resp.into_body().collect().await?.to_bytes())
    }
}

/// c=`conns` closed-loop load on the `load` Service until `stop`; latencies in µs.
async fn load(
    conns: Vec<hbone::client::Connection>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    let mut tasks = Vec::new();
    for conn in conns {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut errors = 0u64;
            let mut client = Client::open(&conn, "10.95.0.1:9080").await?;
            // Bounded: stops at `stop` or after 10 million requests per connection.
            for _ in 0..10_000_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                match client.get().await {
                    Ok(body) if &body[..] == b"load" => {
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
            }
            anyhow::Ok((h, errors))
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        all.add(h)?;
        errors += e;
    }
    let n = all.len();
    Ok((all, n, errors))
}

struct Waypoint {
    child: std::process::Child,
    ready: SocketAddr,
    metrics: SocketAddr,
    hbone: SocketAddr,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

async fn metric(w: &Waypoint, line_prefix: &str) -> Option<f64> {
    let (_, body) = http_get(w.metrics, "/stats/prometheus").await.ok()?;
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Poll every 50 ms until `f` holds, at most `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        anyhow::ensure!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

fn rss_kib(pid: u32) -> u64 {
    procstat::status_kb(pid, "RssAnon").unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile_dir()?;
    let (load_b, probe_a, probe_b) = (
        backend("load").await,
        backend("a").await,
        backend("b").await,
    );
    let api = ApiServer::start().await;
    let t = Instant::now();
    let objects = cluster(&args, load_b, probe_a);
    let object_count = objects.len();
    for o in objects {
        api.apply(o);
    }
    eprintln!(
        "cluster: {object_count} objects in the API server ({:?})",
        t.elapsed()
    );

    let pki = hbone::testing::Pki::new("cluster.local")?;
    pki.write_dir(&dir, "default", "waypoint")?;
    let sleep = pki.issue("default", "sleep")?;
    let tls = hbone::tls::client_config(
        &sleep,
        hbone::tls::ExpectedServer::AnyOf(vec![WAYPOINT_ID.parse()?]),
    )?;
    let kubeconfig = api.kubeconfig(&dir);

    let started = Instant::now();
    let wp = start_waypoint(&args, &kubeconfig, &dir)?;
    let pid = wp.child.id();
    until(Duration::from_secs(600), "ready", || async {
        http_get(wp.ready, "/healthz/ready")
            .await
            .is_ok_and(|(c, _)| c == 200)
    })
    .await?;
    let to_ready = started.elapsed();
    let cpu_ready = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let rss_ready = rss_kib(pid);
    eprintln!(
        "ready in {to_ready:?} ({cpu_ready:.2} CPU-s), RssAnon {} MiB",
        rss_ready / 1024
    );

    // Memory per watched Pod and per endpoint: three fresh waypoints, settled after ready
    // (a heap that already holds slack would hide growth): the cluster alone, plus 50,000
    // Pods that no endpoint names (10,000 workloads of 5 replicas), plus 50,000 endpoints
    // (10,000 more slices of 5).
    let (per_1000_pods, per_1000_endpoints, rss_settled) =
        memory_per_object(&args, &pki, load_b, probe_a).await?;
    eprintln!(
        "memory (RssAnon, settled): cluster {} MiB; +{per_1000_pods:.0} KiB per 1,000 Pods, +{per_1000_endpoints:.0} KiB per 1,000 endpoints",
        rss_settled / 1024
    );

    let mut conns = Vec::new();
    for _ in 0..args.conns {
        conns.push(
            hbone::client::Connection::connect(wp.hbone, tls.clone(), &Default::default()).await?,
        );
    }

    // Quiet phase.
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    let quiet = tokio::spawn(load(conns.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(args.base_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (quiet_h, quiet_n, quiet_err) = quiet.await??;
    let quiet_secs = t0.elapsed().as_secs_f64();
    let quiet_cpu = procstat::cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    eprintln!(
        "quiet: {:.0} req/s, p50 {} µs, p99 {} µs, {quiet_err} errors, {:.3} CPU-s/s",
        quiet_n as f64 / quiet_secs,
        quiet_h.value_at_quantile(0.5),
        quiet_h.value_at_quantile(0.99),
        quiet_cpu / quiet_secs
    );

    // Idle CPU (nothing happening) for the subtraction.
    let c = procstat::cpu_seconds(pid).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu_per_s = (procstat::cpu_seconds(pid).unwrap_or(0.0) - c) / 5.0;

    // Churn alone.
    let churn_alone_secs = 20;
    let updates0 = metric(&wp, "waypoint_config_endpoint_updates_total")
        .await
        .unwrap_or(0.0);
    let compiles0 = metric(&wp, "waypoint_config_reloads_ok_total")
        .await
        .unwrap_or(0.0);
    let c0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let changes = churn(&api, &args, churn_alone_secs, None, 0).await;
    // The last changes' effect: wait for the update counter to settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let churn_cpu = procstat::cpu_seconds(pid).unwrap_or(0.0)
        - c0
        - idle_cpu_per_s * (churn_alone_secs as f64 + 0.5);
    let cpu_per_change_ms = churn_cpu / changes as f64 * 1000.0;
    let updates = metric(&wp, "waypoint_config_endpoint_updates_total")
        .await
        .unwrap_or(0.0)
        - updates0;
    let compiles = metric(&wp, "waypoint_config_reloads_ok_total")
        .await
        .unwrap_or(0.0)
        - compiles0;
    eprintln!(
        "churn alone: {changes} changes in {churn_alone_secs} s, {cpu_per_change_ms:.3} ms CPU per change, {updates} in-place updates, {compiles} compiles"
    );

    // Churn under load, with the probe.
    let probe_conn =
        hbone::client::Connection::connect(wp.hbone, tls.clone(), &Default::default()).await?;
    let probe = Arc::new(Probe::default());
    let probe_task = {
        let probe = probe.clone();
        tokio::spawn(async move { probe.run(probe_conn).await })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let t1 = Instant::now();
    let cpu1 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let loaded = tokio::spawn(load(conns.clone(), stop.clone()));
    let changes_loaded = churn(
        &api,
        &args,
        args.churn_secs,
        Some((&probe, probe_a, probe_b)),
        10,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    probe.stop.store(true, Ordering::Relaxed);
    let (churn_h, churn_n, churn_err) = loaded.await??;
    let churn_secs = t1.elapsed().as_secs_f64();
    let churn_cpu_loaded = procstat::cpu_seconds(pid).unwrap_or(0.0) - cpu1;
    // The waypoint's CPU per request, quiet and under churn: what churn costs the data path,
    // apart from the load generator and API server sharing the other CPU.
    let quiet_cpu_per_1k = quiet_cpu / quiet_n.max(1) as f64 * 1000.0;
    let churn_cpu_per_1k = churn_cpu_loaded / churn_n.max(1) as f64 * 1000.0;
    probe_task.await??;
    let effect = probe
        .latencies
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| Histogram::new(3).expect("h"));
    let missed = probe.missed.load(Ordering::Relaxed);
    eprintln!(
        "churn under load: {changes_loaded} changes, {:.0} req/s, p50 {} µs, p99 {} µs, {churn_err} errors; waypoint CPU per 1k requests {churn_cpu_per_1k:.4} s (quiet {quiet_cpu_per_1k:.4} s)",
        churn_n as f64 / churn_secs,
        churn_h.value_at_quantile(0.5),
        churn_h.value_at_quantile(0.99),
    );
    eprintln!(
        "change to effect ({} probe changes, {missed} not seen within 5 s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        effect.len(),
        effect.value_at_quantile(0.5) as f64 / 1000.0,
        effect.value_at_quantile(0.99) as f64 / 1000.0,
        effect.max() as f64 / 1000.0
    );
    let report = json!({
        "conditions": {
            "services": args.services, "endpoints_per_service": args.endpoints,
            "pods": args.services * args.endpoints, "httproutes": args.routes.min(args.services),
            "authorization_policies": args.policies.min(args.services),
            "objects": object_count, "churn_rate_per_s": args.rate, "churn_secs": args.churn_secs,
            "conns": args.conns, "waypoint_workers": args.workers,
            "waypoint_cpus": args.waypoint_cpus,
        },
        "ready_s": to_ready.as_secs_f64(), "ready_cpu_s": cpu_ready, "rss_ready_mib": rss_ready as f64 / 1024.0,
        "rss_settled_mib": rss_settled as f64 / 1024.0,
        "rss_kib_per_1000_pods": per_1000_pods, "rss_kib_per_1000_endpoints": per_1000_endpoints,
        "quiet": {"rps": quiet_n as f64 / quiet_secs, "cpu_s_per_1k": quiet_cpu_per_1k,
            "p50_us": quiet_h.value_at_quantile(0.5),
            "p99_us": quiet_h.value_at_quantile(0.99), "errors": quiet_err},
        "churn_alone": {"changes": changes, "cpu_ms_per_change": cpu_per_change_ms,
            "in_place_updates": updates, "compiles": compiles},
        "churn_loaded": {"changes": changes_loaded, "rps": churn_n as f64 / churn_secs,
            "cpu_s_per_1k": churn_cpu_per_1k,
            "p50_us": churn_h.value_at_quantile(0.5), "p99_us": churn_h.value_at_quantile(0.99),
            "errors": churn_err},
        "change_to_effect_ms": {"samples": effect.len(), "missed": missed,
            "p50": effect.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": effect.value_at_quantile(0.99) as f64 / 1000.0,
            "max": effect.max() as f64 / 1000.0},
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(quiet_err == 0 && churn_err == 0, "requests failed");
    Ok(())
}

/// Start `waypoint run --kube` (pinned with `--waypoint-cpus`); returns once it listens.
fn start_waypoint(
    args: &Args,
    kubeconfig: &std::path::Path,
    certs: &std::path::Path,
) -> anyhow::Result<Waypoint> {
    let mut cmd = match &args.waypoint_cpus {
        Some(cpus) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", cpus]).arg(&args.waypoint);
            c
        }
        None => std::process::Command::new(&args.waypoint),
    };
    let mut child = cmd
        .args(["run", "--kube", "--kubeconfig"])
        .arg(kubeconfig)
        .arg("--certs")
        .arg(certs)
        .args(["--workers", &args.workers.to_string()])
        .args(["--hbone-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("WAYPOINT_LOG", "warn,proxy::app=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting the waypoint")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .context("the waypoint did not report its listeners")?;
        if line.contains("waypoint serving") {
            break line;
        }
    };
    let field = |key: &str| -> anyhow::Result<SocketAddr> {
        let start = line.find(&format!("{key}=")).context("field")? + key.len() + 1;
        Ok(line[start..]
            .split_whitespace()
            .next()
            .context("field")?
            .parse()?)
    };
    Ok(Waypoint {
        ready: field("ready_addr")?,
        metrics: field("metrics_addr")?,
        hbone: field("hbone_addr")?,
        child,
    })
}

/// RssAnon of a fresh waypoint once ready and settled (3 s: its post-compile trim done).
async fn settled_rss(
    args: &Args,
    objects: Vec<serde_json::Value>,
    pki: &hbone::testing::Pki,
) -> anyhow::Result<u64> {
    let dir = tempfile_dir()?;
    pki.write_dir(&dir, "default", "waypoint")?;
    let api = ApiServer::start().await;
    for o in objects {
        api.apply(o);
    }
    let wp = start_waypoint(args, &api.kubeconfig(&dir), &dir)?;
    until(Duration::from_secs(600), "ready", || async {
        http_get(wp.ready, "/healthz/ready")
            .await
            .is_ok_and(|(c, _)| c == 200)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kib(wp.child.id());
    drop(wp);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rss)
}

/// (KiB per 1,000 Pods, KiB per 1,000 endpoints, RssAnon KiB of the cluster alone).
async fn memory_per_object(
    args: &Args,
    pki: &hbone::testing::Pki,
    load_b: SocketAddr,
    probe_a: SocketAddr,
) -> anyhow::Result<(f64, f64, u64)> {
    const EXTRA: usize = 50_000;
    let base = settled_rss(args, cluster(args, load_b, probe_a), pki).await?;
    let mut with_pods = cluster(args, load_b, probe_a);
    // Five replicas per workload (each its own labels, owner and service account), not one
    // workload for all: the store shares what a workload's Pods have in common, and a
    // single workload would flatter that.
    with_pods.extend((0..EXTRA).map(|k| {
        pod(
            &format!("extra-{}-{k}", k / 5),
            &pod_ip(200_000 + k / 8, k % 8),
            &format!("extra-{}", k / 5),
        )
    }));
    let pods = settled_rss(args, with_pods, pki).await?;
    let mut with_endpoints = cluster(args, load_b, probe_a);
    let per_slice = args.endpoints.max(1);
    with_endpoints.extend((0..EXTRA / per_slice).map(|s| {
        let i = s % args.services.max(1);
        let eps: Vec<(String, Option<String>)> = (0..per_slice)
            .map(|j| (pod_ip(300_000 + s, j), None))
            .collect();
        slice(
            &format!("svc-{i}"),
            1 + s / args.services.max(1),
            &eps,
            8080,
        )
    }));
    let endpoints = settled_rss(args, with_endpoints, pki).await?;
    let per = |with: u64| (with as f64 - base as f64) / (EXTRA as f64 / 1000.0);
    Ok((per(pods), per(endpoints), base))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kube-churn-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The probe: back-to-back requests to the `probe` Service; after a change, the time until
/// the first answer from the new backend.
struct Probe {
    /// (expected body, when the change was applied); `None` when nothing is pending.
    pending: std::sync::Mutex<Option<(&'static [u8], Instant)>>,
    latencies: std::sync::Mutex<Histogram<u64>>,
    missed: AtomicU64,
    stop: AtomicBool,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            pending: Default::default(),
            latencies: std::sync::Mutex::new(Histogram::new(3).expect("histogram")),
            missed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }
}

impl Probe {
    async fn run(&self, conn: hbone::client::Connection) -> anyhow::Result<()> {
        let mut client = Client::open(&conn, "10.95.0.2:9080").await?;
        for _ in 0..100_000_000u64 {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let body = client.get().await?;
            let now = Instant::now();
            let mut pending = self.pending.lock().map_err(|_| anyhow::anyhow!("lock"))?;
            if let Some((want, at)) = *pending
                && &body[..] == want
            {
                // The response started after the change was applied only if the request did;
                // requests are back to back, so a response from the new backend is the effect.
                let _ = self
                    .latencies
                    .lock()
                    .map(|mut h| h.record(now.duration_since(at).as_micros() as u64));
                *pending = None;
            }
        }
        Ok(())
    }

    /// Mark a change to `want` applied now; a previous one still pending counts as missed.
    fn changed(&self, want: &'static [u8]) {
        if let Ok(mut p) = self.pending.lock() {
            if p.is_some() {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
            *p = Some((want, Instant::now()));
        }
    }
}

/// `rate` endpoint changes per second for `secs`: each moves one endpoint of a Service to a new
/// address. With a probe, one change in `probe_every` moves the probe Service between its two
/// backends instead. Returns the changes made.
async fn churn(
    api: &ApiServer,
    args: &Args,
    secs: u64,
    probe: Option<(&Arc<Probe>, SocketAddr, SocketAddr)>,
    probe_every: u64,
) -> u64 {
    let tick = Duration::from_millis(100);
    let per_tick = (args.rate / 10).max(1);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let mut on_b = false;
    for t in 0..secs * 10 {
        interval.tick().await;
        for k in 0..per_tick {
            n += 1;
            if let Some((p, a, b)) = probe
                && probe_every > 0
                && k == 0
                && t % (10 / probe_every.min(10)).max(1) == 0
            {
                on_b = !on_b;
                let (addr, name): (SocketAddr, &'static [u8]) =
                    if on_b { (b, b"b") } else { (a, b"a") };
                api.apply(slice(
                    "probe",
                    0,
                    &[(addr.ip().to_string(), None)],
                    addr.port(),
                ));
                p.changed(name);
                continue;
            }
            let i = (n as usize * 7919) % args.services;
            let mut eps: Vec<(String, Option<String>)> = (0..args.endpoints)
                .map(|j| (pod_ip(i, j), Some(format!("svc-{i}-pod-{j}"))))
                .collect();
            // Move one endpoint to a fresh address (a pod replaced).
            eps[0] = (pod_ip(400_000 + (n as usize % 100_000), 0), None);
            api.apply(slice(&format!("svc-{i}"), 0, &eps, 8080));
        }
    }
    n
}
