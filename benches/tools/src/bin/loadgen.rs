//! `loadgen`: HTTP/1.1 load inside HBONE tunnels (mTLS + HTTP/2 CONNECT, as ztunnel sends it
//! to a waypoint), or straight to a backend for the no-proxy baseline.
//!
//! - closed loop (default): `--concurrency` workers, each with its own tunnel, send keep-alive
//!   requests back to back; latency is measured from send to the end of the response body;
//! - open loop (`--rate R`): requests are scheduled at fixed intervals (R per second over all
//!   workers); latency is measured from the *scheduled* send time, so a stalled proxy shows up
//!   as latency instead of as fewer samples (no coordinated omission). At most `--concurrency`
//!   requests are in flight; a late schedule turns into queueing time in the histogram;
//! - `--new-tunnel-per-request`: every request opens a new CONNECT stream (a new TCP
//!   connection in direct mode), counted in its latency;
//! - `--idle-tunnels N`: open N tunnels, send one request in each, hold them, and report how
//!   much the proxy's RSS grew per tunnel. With `--raw-idle` (hbone mode) a tunnel keeps only
//!   its HBONE stream, its request written and read by hand (no HTTP/1.1 client task per
//!   tunnel), so that a million tunnels fit the load generator; while they are held, new
//!   tunnels are opened and held ones probed, with their latencies reported.
//!
//! - `--grpc-messages N`: gRPC over h2c inside each tunnel (direct: over TCP) instead of
//!   HTTP/1.1: every call is a POST of N length-prefixed messages of `--body-bytes` each
//!   (1: unary; more: a client-streaming call whose messages bench-backend's gRPC listener
//!   echoes back), checked to come back whole with `grpc-status: 0`.
//!
//! Every response is checked to be the bench backend's whole answer to the whole request
//! ([`exchange`]); a mismatch counts as an error.
//!
//! Every run is bounded by time (`--warmup` + `--duration`, capped) and by count
//! (`--max-requests`). With `--proxy-pid`, the proxy's CPU seconds over the measured window,
//! CPU seconds per 1,000 requests and peak RSS (VmHWM, reset at start) are reported too.
//! Output: one JSON object on stdout; a one-line summary on stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hbone::client::{ClientSettings, Connection};
use hbone::tls::{CertBundle, ExpectedServer};
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use waypoint_benches::procstat;

const MAX_DURATION: Duration = Duration::from_secs(300);
const MAX_WARMUP: Duration = Duration::from_secs(60);
const MAX_CONCURRENCY: usize = 10_000;
const MAX_IDLE_TUNNELS: usize = 1_000_000;
/// When idle tunnels are first measured after the last one opened (before the waypoint parks
/// idle tunnels, listener `PARK_AFTER` = 1 s).
const EARLY_SAMPLE: Duration = Duration::from_millis(500);
/// Longest wait for the settled RSS after a run.
const MAX_SETTLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Through an HBONE waypoint: mTLS + HTTP/2 CONNECT to --authority, HTTP/1.1 inside.
    Hbone,
    /// Plain HTTP/1.1 over TCP straight to the backend (no-proxy baseline).
    Direct,
}

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "HBONE / HTTP/1.1 load generator for the waypoint benchmarks"
)]
struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Hbone)]
    mode: Mode,
    /// The waypoint's HBONE address (hbone) or the backend's address (direct). Loopback only
    /// unless --allow-remote.
    #[arg(long)]
    target: SocketAddr,
    /// CONNECT authority: the Service VIP:port.
    #[arg(long, default_value = waypoint_benches::model::REVIEWS_AUTHORITY)]
    authority: String,
    /// Host header of the inner requests.
    #[arg(long, default_value = "reviews:9080")]
    host: String,
    #[arg(long, default_value = "/reviews/0")]
    path: String,
    /// Directory with root-cert.pem and <client>-cert.pem / <client>-key.pem (hbone mode),
    /// as `waypoint certs --out DIR` writes them.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Which client identity files to use from --certs.
    #[arg(long, default_value = "sleep")]
    client: String,
    /// The waypoint must present a SPIFFE identity in this trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Workers = tunnels = maximum requests in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop: total requests per second (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured time (capped at 300 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before it (capped at 60 s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Stop after this many requests in total (warm-up included).
    #[arg(long, default_value_t = 20_000_000)]
    max_requests: u64,
    /// Request body size; a body makes the default method POST.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    #[arg(long)]
    method: Option<String>,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// Open a new tunnel (direct: a new TCP connection) for every request.
    #[arg(long)]
    new_tunnel_per_request: bool,
    /// Open a new HBONE connection (TCP + full mTLS handshake, no resumption + HTTP/2) for
    /// every request, one tunnel on it, and close it after the response (direct: a new TCP
    /// connection).
    #[arg(long)]
    new_connection_per_request: bool,
    /// Ask bench-backend for a response body of exactly this many bytes (`x-response-bytes`,
    /// at most 16 MiB) and check that every response has it.
    #[arg(long)]
    response_bytes: Option<usize>,
    /// Tunnels per HBONE connection before another connection is opened (ztunnel: 100).
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Idle-tunnel mode: open this many tunnels, one request each, then hold them.
    #[arg(long)]
    idle_tunnels: Option<usize>,
    /// How long to hold idle tunnels after they are all open.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Idle-tunnel mode: after closing the tunnels, wait this long and report the proxy's RSS
    /// (`rss_settled_kb`: what it gives back once a burst of tunnels is over; capped at 60 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    settle: Option<Duration>,
    /// gRPC calls of this many messages each (h2c inside the tunnel) instead of HTTP/1.1
    /// requests; the message size is --body-bytes.
    #[arg(long)]
    grpc_messages: Option<usize>,
    /// Idle-tunnel mode: keep each tunnel as its bare HBONE stream (hbone mode).
    #[arg(long)]
    raw_idle: bool,
    /// Tunnels being opened at once in idle-tunnel mode.
    #[arg(long, default_value_t = 64)]
    open_parallelism: usize,
    /// Per-request deadline (connect + request + response).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Process to account CPU and memory to (the proxy under test).
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// Backend process, for its CPU seconds (to see whether the client side saturates).
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long)]
    allow_remote: bool,
}

/// The client of one tunnel (or TCP connection): HTTP/1.1, or HTTP/2 prior knowledge (h2c)
/// for gRPC.
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    async fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

/// How a worker gets a fresh HTTP/1.1 connection: TCP to the backend, or a CONNECT stream on
/// one of the pooled HBONE connections.
struct Dialer {
    mode: Mode,
    target: SocketAddr,
    authority: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    settings: ClientSettings,
    streams_per_connection: usize,
    /// gRPC mode: HTTP/2 prior knowledge inside the tunnel.
    h2: bool,
    slots: Vec<Mutex<Option<Connection>>>,
}

impl Dialer {
    async fn hbone_conn(&self, slot: usize) -> anyhow::Result<Connection> {
        let Some(cell) = self.slots.get(slot) else {
            bail!("no HBONE connection slot {slot}");
        };
        let mut guard = cell.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let tls = self.tls.clone().context("hbone mode needs --certs")?;
        let c = Connection::connect(self.target, tls, &self.settings)
            .await
            .with_context(|| format!("HBONE connection to {}", self.target))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// A new HTTP/1.1 client on a connection of its own: in hbone mode a new HBONE
    /// connection (TCP, mTLS handshake, HTTP/2) carrying this one tunnel, closed when the
    /// tunnel ends (the h2 client closes a connection once no handle or stream is left).
    async fn open_on_new_connection(&self) -> anyhow::Result<Sender> {
        match self.mode {
            Mode::Direct => self.open(0).await,
            Mode::Hbone => {
                let tls = self.tls.clone().context("hbone mode needs --certs")?;
                let conn = Connection::connect(self.target, tls, &self.settings)
                    .await
                    .with_context(|| format!("HBONE connection to {}", self.target))?;
                let stream = conn.open(&self.authority, HeaderMap::new()).await?;
                handshake(stream, self.h2).await
            }
        }
    }

    /// A new HTTP/1.1 client for tunnel number `n` (worker index or idle-tunnel index).
    async fn open(&self, n: usize) -> anyhow::Result<Sender> {
        match self.mode {
            Mode::Direct => {
                let tcp = TcpStream::connect(self.target).await?;
                let _ = tcp.set_nodelay(true);
                handshake(tcp, self.h2).await
            }
            Mode::Hbone => {
                let slot = n / self.streams_per_connection.max(1);
                let conn = self.hbone_conn(slot).await?;
                match conn.open(&self.authority, HeaderMap::new()).await {
                    Ok(stream) => handshake(stream, self.h2).await,
                    Err(e) => {
                        // The connection may be gone (GOAWAY, reset): reconnect next time.
                        if let Some(cell) = self.slots.get(slot) {
                            *cell.lock().await = None;
                        }
                        Err(e.into())
                    }
                }
            }
        }
    }
}

async fn handshake<IO>(io: IO, h2: bool) -> anyhow::Result<Sender>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        // The h2 client ends the stream (END_STREAM, then the peer's) when the last handle
        // goes away, as ztunnel ends a tunnel.
        let (sender, driver) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(io),
        )
        .await?;
        tokio::spawn(driver);
        return Ok(Sender::H2(sender));
    }
    let (sender, driver) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // When the sender is dropped, close the tunnel the way ztunnel does when the app closes
        // its connection: half-close (END_STREAM / FIN), then read until the peer has closed
        // too. Dropping a CONNECT stream that is still open would RST_STREAM it instead, which
        // Envoy counts as a premature reset (and then closes the whole HBONE connection).
        if let Ok(parts) = driver.without_shutdown().await {
            let mut io = parts.io.into_inner();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                io.shutdown().await?;
                let mut buf = [0u8; 4096];
                while io.read(&mut buf).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
        }
    });
    Ok(Sender::H1(sender))
}

/// What every request looks like.
struct RequestTemplate {
    method: Method,
    path: String,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    /// The response body size asked for (`x-response-bytes`), checked on every response.
    response_bytes: Option<usize>,
    /// A gRPC call: the response must echo `body` and end with `grpc-status: 0`.
    grpc: bool,
}

impl RequestTemplate {
    fn build(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str())
            .header(http::header::HOST, self.host.clone());
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        if let Some(n) = self.response_bytes {
            b = b.header("x-response-bytes", n);
        }
        Ok(b.body(Full::new(self.body.clone()))?)
    }
}

/// One request and its whole response: (status, body bytes). The response is checked to be
/// bench-backend's, intact: its body is `<x-backend>\n` (repeated to exactly the size asked
/// for with `x-response-bytes`) and it saw the request body whole (`x-request-body-bytes`), so
/// a proxy that truncated or mixed up bodies shows as errors, not as speed.
async fn exchange(sender: &mut Sender, template: &RequestTemplate) -> anyhow::Result<(u16, u64)> {
    let req = template.build()?;
    let sent = req.body().size_hint().exact().unwrap_or(0);
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (backend, received) = (header("x-backend"), header("x-request-body-bytes"));
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut n = 0u64;
    let mut grpc_status = None;
    let keep = if template.grpc {
        template.body.len()
    } else {
        256
    };
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                n += data.len() as u64;
                if got.len() < keep {
                    got.extend_from_slice(&data[..data.len().min(keep - got.len())]);
                }
            }
            Err(f) => {
                if let Some(t) = f.trailers_ref() {
                    grpc_status = t.get("grpc-status").cloned();
                }
            }
        }
    }
    if template.grpc && status == 200 {
        if backend.is_none() {
            bail!("a gRPC response without x-backend: not bench-backend's");
        }
        if got != template.body || n != template.body.len() as u64 {
            bail!("gRPC response ({n} bytes) does not echo the call's messages");
        }
        if grpc_status.as_ref().map(|v| v.as_bytes()) != Some(b"0") {
            bail!("gRPC call ended with grpc-status {grpc_status:?}");
        }
        return Ok((status, n));
    }
    if (200..300).contains(&status) {
        let Some(backend) = backend else {
            bail!("a {status} response without x-backend: not bench-backend's");
        };
        let unit = format!("{backend}\n");
        let want = template.response_bytes.unwrap_or(unit.len());
        let prefix: Vec<u8> = unit.bytes().cycle().take(want.min(256)).collect();
        if got != prefix || n != want as u64 {
            bail!(
                "response body {:?} ({n} bytes) is not {backend:?}'s",
                String::from_utf8_lossy(&got)
            );
        }
        if received.as_deref() != Some(sent.to_string().as_str()) {
            bail!("the backend saw {received:?} request body bytes, {sent} were sent");
        }
    }
    Ok((status, n))
}

struct Shared {
    args: Args,
    dialer: Dialer,
    template: RequestTemplate,
    issued: AtomicU64,
    start: Instant,
    measure_start: Instant,
    deadline: Instant,
}

#[derive(Default)]
struct WorkerResult {
    hist: Option<Histogram<u64>>,
    ok: u64,
    non_2xx: u64,
    io_errors: u64,
    timeouts: u64,
    warmup_requests: u64,
    response_bytes: u64,
    last_end: Option<Instant>,
    first_error: Option<String>,
    statuses: std::collections::BTreeMap<u16, u64>,
}

fn new_hist() -> anyhow::Result<Histogram<u64>> {
    // 1 ns .. 120 s, 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 120_000_000_000, 3)?)
}

async fn worker(id: usize, sh: Arc<Shared>) -> anyhow::Result<WorkerResult> {
    let mut res = WorkerResult::default();
    let mut hist = new_hist()?;
    let mut sender: Option<Sender> = None;
    let args = &sh.args;
    loop {
        let k = sh.issued.fetch_add(1, Ordering::Relaxed);
        if k >= args.max_requests {
            break;
        }
        // When does this request start, for latency purposes?
        let t0 = match args.rate {
            Some(rate) => {
                let intended = sh.start + Duration::from_secs_f64(k as f64 / rate);
                if intended >= sh.deadline {
                    break;
                }
                if intended > Instant::now() {
                    // On schedule: wait, then measure from the actual send (timer slack is
                    // the load generator's, not the proxy's).
                    tokio::time::sleep_until(intended).await;
                    Instant::now()
                } else {
                    // Behind schedule: the request has been waiting since `intended`.
                    intended
                }
            }
            None => {
                let now = Instant::now();
                if now >= sh.deadline {
                    break;
                }
                now
            }
        };
        let measured = t0 >= sh.measure_start;
        let fresh = args.new_tunnel_per_request || args.new_connection_per_request;
        let reuse = if fresh { None } else { sender.take() };
        let attempt = async {
            let mut s = match reuse {
                Some(s) => s,
                None if args.new_connection_per_request => {
                    sh.dialer.open_on_new_connection().await?
                }
                None => sh.dialer.open(id).await?,
            };
            let r = exchange(&mut s, &sh.template).await?;
            Ok::<_, anyhow::Error>((s, r))
        };
        let outcome = tokio::time::timeout(args.timeout, attempt).await;
        let end = Instant::now();
        if !measured {
            res.warmup_requests += 1;
        }
        match outcome {
            Ok(Ok((s, (status, n)))) => {
                if !fresh {
                    sender = Some(s);
                }
                if measured {
                    *res.statuses.entry(status).or_default() += 1;
                    if (200..300).contains(&status) {
                        res.ok += 1;
                        res.response_bytes += n;
                        let ns = u64::try_from((end - t0).as_nanos()).unwrap_or(u64::MAX);
                        hist.saturating_record(ns.max(1));
                    } else {
                        res.non_2xx += 1;
                    }
                    res.last_end = Some(end);
                }
            }
            Ok(Err(e)) => {
                if measured {
                    res.io_errors += 1;
                    res.last_end = Some(end);
                }
                if res.first_error.is_none() {
                    res.first_error = Some(format!("{e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                if measured {
                    res.timeouts += 1;
                    res.last_end = Some(end);
                }
                if res.first_error.is_none() {
                    res.first_error = Some(format!("timeout after {:?}", args.timeout));
                }
            }
        }
    }
    res.hist = Some(hist);
    Ok(res)
}

struct ProcSample {
    cpu: Option<f64>,
    backend_cpu: Option<f64>,
    self_cpu: Option<f64>,
    machine: Option<(u64, u64)>,
}

fn sample(args: &Args) -> ProcSample {
    ProcSample {
        cpu: args.proxy_pid.and_then(procstat::cpu_seconds),
        backend_cpu: args.backend_pid.and_then(procstat::cpu_seconds),
        self_cpu: procstat::cpu_seconds(std::process::id()),
        machine: procstat::machine_ticks(),
    }
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn run_load(sh: Arc<Shared>) -> anyhow::Result<serde_json::Value> {
    let args = &sh.args;
    // Warm-up end: sample the proxy's CPU there.
    let sampler = {
        let sh = sh.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(sh.measure_start).await;
            sample(&sh.args)
        })
    };
    let mut handles = Vec::with_capacity(args.concurrency);
    for id in 0..args.concurrency {
        handles.push(tokio::spawn(worker(id, sh.clone())));
    }
    let mut total = WorkerResult::default();
    let mut hist = new_hist()?;
    for h in handles {
        let r = h.await??;
        if let Some(wh) = &r.hist {
            hist.add(wh)?;
        }
        total.ok += r.ok;
        total.non_2xx += r.non_2xx;
        total.io_errors += r.io_errors;
        total.timeouts += r.timeouts;
        total.warmup_requests += r.warmup_requests;
        total.response_bytes += r.response_bytes;
        total.last_end = total.last_end.max(r.last_end);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
        for (s, n) in r.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
    }
    let after = sample(args);
    let before = sampler.await?;
    let end = total
        .last_end
        .unwrap_or_else(Instant::now)
        .max(sh.measure_start);
    let secs = (end - sh.measure_start).as_secs_f64().max(1e-9);
    let completed = total.ok + total.non_2xx;
    let us = |q: f64| round3(hist.value_at_quantile(q) as f64 / 1000.0);
    let proxy_cpu = diff(before.cpu, after.cpu);
    let proxy = args.proxy_pid.map(|pid| {
        json!({
            "pid": pid,
            "cpu_seconds": proxy_cpu.map(round3),
            "cpu_s_per_1k": proxy_cpu.filter(|_| completed > 0).map(|c| (c / completed as f64 * 1000.0 * 1e4).round() / 1e4),
            "core_pct": proxy_cpu.map(|c| (100.0 * c / secs).round()),
            "peak_rss_kb": procstat::status_kb(pid, "VmHWM"),
            "rss_kb": procstat::status_kb(pid, "VmRSS"),
        })
    });
    let machine_busy = match (before.machine, after.machine) {
        (Some(a), Some(b)) => Some(procstat::busy_percent(a, b).round()),
        _ => None,
    };
    Ok(json!({
        "kind": "load",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "target": args.target.to_string(),
        "authority": if args.mode == Mode::Hbone { Some(args.authority.clone()) } else { None },
        "loop": if args.rate.is_some() { "open" } else { "closed" },
        "rate": args.rate,
        "concurrency": args.concurrency,
        "method": sh.template.method.as_str(),
        "body_bytes": args.body_bytes,
        "new_tunnel_per_request": args.new_tunnel_per_request,
        "new_connection_per_request": args.new_connection_per_request,
        "response_bytes": args.response_bytes,
        "duration_s": round3(secs),
        "warmup_requests": total.warmup_requests,
        "requests": completed + total.io_errors + total.timeouts,
        "ok": total.ok,
        "errors": total.non_2xx + total.io_errors + total.timeouts,
        "non_2xx": total.non_2xx,
        "io_errors": total.io_errors,
        "timeouts": total.timeouts,
        "statuses": total.statuses,
        "first_error": total.first_error,
        "rps": (total.ok as f64 / secs).round(),
        "response_bytes": total.response_bytes,
        "latency_us": {
            "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "p999": us(0.999),
            "max": round3(hist.max() as f64 / 1000.0), "mean": round3(hist.mean() / 1000.0),
            "samples": hist.len(),
        },
        "proxy": proxy,
        "backend_cpu_seconds": diff(before.backend_cpu, after.backend_cpu).map(round3),
        "loadgen_cpu_seconds": diff(before.self_cpu, after.self_cpu).map(round3),
        "machine_busy_pct": machine_busy,
    }))
}

/// Open `n` tunnels (one request each), hold them, report the proxy's RSS growth per tunnel.
async fn run_idle(sh: Arc<Shared>, n: usize) -> anyhow::Result<serde_json::Value> {
    let args = &sh.args;
    let rss = |what: &str| args.proxy_pid.and_then(|p| procstat::status_kb(p, what));
    let rss_start = rss("VmRSS");
    let t_open = Instant::now();
    // The HBONE connections first, so their cost is not counted per tunnel.
    if args.mode == Mode::Hbone {
        let conns = n.div_ceil(args.streams_per_connection.max(1));
        for slot in 0..conns {
            sh.dialer.hbone_conn(slot).await?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_conns = rss("VmRSS");
    let sem = Arc::new(Semaphore::new(args.open_parallelism.max(1)));
    let raw = args.raw_idle && args.mode == Mode::Hbone;
    let held: Arc<Mutex<Vec<Held>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut tasks = Vec::with_capacity(n);
    for j in 0..n {
        if Instant::now() >= sh.deadline {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        let (sh, held, errors, first_error) = (
            sh.clone(),
            held.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let r = tokio::time::timeout(sh.args.timeout, open_held(&sh, j, raw)).await;
            match r {
                Ok(Ok(s)) => held.lock().await.push(s),
                Ok(Err(e)) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert(format!("{e:#}"));
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert("timeout".into());
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    // Measured twice: just after the tunnels went idle (0.5 s after the last one opened, before
    // any proxy releases the state of idle tunnels, the waypoint after 1 s), and at the end of
    // the hold, when every tunnel has been idle for at least `--hold` (what a parked tunnel
    // costs). Both are reported, as neither alone tells the whole story.
    let idle_start = Instant::now();
    tokio::time::sleep(EARLY_SAMPLE).await;
    let rss_early = rss("VmRSS");
    tokio::time::sleep_until(idle_start + args.hold.max(EARLY_SAMPLE)).await;
    let rss_tunnels = rss("VmRSS");
    // Are the tunnels still usable after the hold? Probe up to 100 of them, and open 100 new
    // ones beside them (one at a time): their latencies show whether the held tunnels slow
    // the proxy down.
    let mut senders = std::mem::take(&mut *held.lock().await);
    let open = senders.len();
    let step = (open / 100).max(1);
    let (mut probed, mut alive) = (0u64, 0u64);
    let mut probe_us = Vec::with_capacity(100);
    for s in senders.iter_mut().step_by(step).take(100) {
        probed += 1;
        let t = Instant::now();
        let ok = tokio::time::timeout(args.timeout, s.exchange(&sh.template)).await;
        if matches!(ok, Ok(Ok((200..=299, _)))) {
            alive += 1;
            probe_us.push(t.elapsed().as_micros() as u64);
        }
    }
    let mut new_us = Vec::with_capacity(100);
    let mut new_errors = 0u64;
    for j in 0..100 {
        let t = Instant::now();
        match tokio::time::timeout(args.timeout, open_held(&sh, n + j, raw)).await {
            Ok(Ok(h)) => {
                new_us.push(t.elapsed().as_micros() as u64);
                senders.push(h);
            }
            _ => new_errors += 1,
        }
    }
    let peak = rss("VmHWM");
    close_all(senders, args.open_parallelism.max(1)).await;
    // Every tunnel is closed now (the HBONE connections stay): what does the proxy give back?
    let settle = args.settle.map(|d| d.min(MAX_SETTLE));
    let rss_settled = match settle {
        Some(wait) => {
            tokio::time::sleep(wait).await;
            rss("VmRSS")
        }
        None => None,
    };
    let per_tunnel = |after: Option<u64>| match (rss_conns, after) {
        (Some(a), Some(b)) if open > 0 => {
            Some(((b as f64 - a as f64) * 1024.0 / open as f64).round())
        }
        _ => None,
    };
    Ok(json!({
        "kind": "idle",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "target": args.target.to_string(),
        "tunnels_requested": n,
        "tunnels_open": open,
        "open_errors": errors.load(Ordering::Relaxed),
        "first_error": first_error.lock().await.clone(),
        "open_seconds": round3(open_secs),
        "hbone_connections": if args.mode == Mode::Hbone { Some(n.div_ceil(args.streams_per_connection.max(1))) } else { None },
        "probed": probed,
        "probed_alive": alive,
        "probe_latency_us": latency_summary(&mut probe_us),
        "new_tunnels_beside": new_us.len(),
        "new_tunnel_errors": new_errors,
        "new_tunnel_latency_us": latency_summary(&mut new_us),
        "proxy": args.proxy_pid.map(|pid| json!({
            "pid": pid,
            "rss_start_kb": rss_start,
            "rss_after_connections_kb": rss_conns,
            "rss_after_tunnels_early_kb": rss_early,
            "rss_after_tunnels_kb": rss_tunnels,
            "peak_rss_kb": peak,
            "early_seconds": EARLY_SAMPLE.as_secs_f64(),
            "hold_seconds": args.hold.max(EARLY_SAMPLE).as_secs_f64(),
            "bytes_per_tunnel_early": per_tunnel(rss_early),
            "bytes_per_tunnel": per_tunnel(rss_tunnels),
            "rss_settled_kb": rss_settled,
            "settle_seconds": settle.map(|d| d.as_secs_f64()),
        })),
    }))
}

/// p50 / p99 / max of a few latencies (sorted in place).
fn latency_summary(v: &mut [u64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    json!({"p50": at(0.5), "p99": at(0.99), "max": v[v.len() - 1]})
}

/// A held tunnel: an HTTP/1.1 client on it, or (`--raw-idle`) the bare HBONE stream.
enum Held {
    Client(Sender),
    Raw(hbone::H2Stream),
}

impl Held {
    async fn exchange(&mut self, template: &RequestTemplate) -> anyhow::Result<(u16, u64)> {
        match self {
            Held::Client(s) => exchange(s, template).await,
            Held::Raw(s) => raw_exchange(s, template).await,
        }
    }
}

/// Open tunnel `j` and make its one request.
async fn open_held(sh: &Shared, j: usize, raw: bool) -> anyhow::Result<Held> {
    let mut h = if raw {
        let slot = j / sh.dialer.streams_per_connection;
        let conn = sh.dialer.hbone_conn(slot).await?;
        Held::Raw(conn.open(&sh.dialer.authority, HeaderMap::new()).await?)
    } else {
        Held::Client(sh.dialer.open(j).await?)
    };
    let (status, _) = h.exchange(&sh.template).await?;
    if !(200..300).contains(&status) {
        bail!("status {status}");
    }
    Ok(h)
}

/// Close every tunnel as ztunnel does when the app closes (half-close, then read to the
/// peer's end), `parallel` at a time; HTTP/1.1 clients close theirs when dropped.
async fn close_all(held: Vec<Held>, parallel: usize) {
    let sem = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for h in held {
        let Held::Raw(mut s) = h else {
            continue;
        };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                s.shutdown().await?;
                let mut buf = [0u8; 1024];
                while s.read(&mut buf).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// [`exchange`] written and read by hand on a bare stream: the request head (and body), then
/// the response head and its `content-length` body, checked the same way.
async fn raw_exchange(
    s: &mut hbone::H2Stream,
    template: &RequestTemplate,
) -> anyhow::Result<(u16, u64)> {
    use std::fmt::Write as _;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\n",
        template.method,
        template.path,
        template.host.to_str()?
    );
    for (k, v) in &template.headers {
        let _ = write!(head, "{k}: {}\r\n", v.to_str()?);
    }
    if let Some(n) = template.response_bytes {
        let _ = write!(head, "x-response-bytes: {n}\r\n");
    }
    let _ = write!(head, "content-length: {}\r\n\r\n", template.body.len());
    s.write_all(head.as_bytes()).await?;
    s.write_all(&template.body).await?;
    s.flush().await?;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 16 * 1024 {
            bail!("response head over 16 KiB");
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("tunnel closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = std::str::from_utf8(&buf[..end])?;
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let (mut length, mut backend, mut received) = (0usize, None, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse()?,
            "x-backend" => backend = Some(v.trim().to_string()),
            "x-request-body-bytes" => received = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut body = buf.split_off(end + 4);
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(64 * 1024)];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("tunnel closed in the response body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if (200..300).contains(&status) {
        let Some(backend) = backend else {
            bail!("a {status} response without x-backend: not bench-backend's");
        };
        let unit = format!("{backend}\n");
        let want = template.response_bytes.unwrap_or(unit.len());
        let expected: Vec<u8> = unit.bytes().cycle().take(want).collect();
        if body != expected {
            bail!("response body ({} bytes) is not {backend:?}'s", body.len());
        }
        let sent = template.body.len().to_string();
        if received.as_deref() != Some(sent.as_str()) {
            bail!("the backend saw {received:?} request body bytes, {sent} were sent");
        }
    }
    Ok((status, body.len() as u64))
}

fn parse_headers(raw: &[String]) -> anyhow::Result<Vec<(HeaderName, HeaderValue)>> {
    raw.iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?}: expected `name: value`"))?;
            Ok((
                HeaderName::from_bytes(k.trim().as_bytes())?,
                HeaderValue::from_str(v.trim())?,
            ))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if !args.target.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--target {} is not a loopback address (pass --allow-remote if you mean it)",
            args.target
        );
    }
    args.duration = args.duration.min(MAX_DURATION);
    args.warmup = args.warmup.min(MAX_WARMUP);
    if args.concurrency == 0 || args.concurrency > MAX_CONCURRENCY {
        bail!("--concurrency must be in 1..={MAX_CONCURRENCY}");
    }
    if args.response_bytes.is_some_and(|n| n > 16 * 1024 * 1024) {
        bail!("--response-bytes must be at most 16 MiB (bench-backend's limit)");
    }
    if args.idle_tunnels.is_some_and(|n| n > MAX_IDLE_TUNNELS) {
        bail!("--idle-tunnels must be at most {MAX_IDLE_TUNNELS}");
    }
    if args.hold > MAX_DURATION {
        args.hold = MAX_DURATION;
    }
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number");
    }
    let tls = match args.mode {
        Mode::Direct => None,
        Mode::Hbone => {
            let dir = args
                .certs
                .clone()
                .context("--certs DIR is required in hbone mode")?;
            let read = |name: String| {
                std::fs::read(dir.join(&name))
                    .with_context(|| format!("reading {}", dir.join(&name).display()))
            };
            let bundle = CertBundle::from_pem(
                &read(format!("{}-cert.pem", args.client))?,
                &read(format!("{}-key.pem", args.client))?,
                &read("root-cert.pem".into())?,
            )?;
            Some(hbone::tls::client_config(
                &bundle,
                ExpectedServer::TrustDomain(args.trust_domain.clone()),
            )?)
        }
    };
    let method = match &args.method {
        Some(m) => Method::from_bytes(m.as_bytes())?,
        None if args.body_bytes > 0 || args.grpc_messages.is_some() => Method::POST,
        None => Method::GET,
    };
    let mut headers = parse_headers(&args.header)?;
    let body = match args.grpc_messages {
        Some(n) => {
            if n == 0 || n > 10_000 || args.body_bytes > 1 << 20 {
                bail!("--grpc-messages must be in 1..=10000, --body-bytes at most 1 MiB");
            }
            headers.push((
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            ));
            headers.push((http::header::TE, HeaderValue::from_static("trailers")));
            let mut framed = Vec::with_capacity(n * (5 + args.body_bytes));
            for _ in 0..n {
                framed.push(0);
                framed.extend_from_slice(&(args.body_bytes as u32).to_be_bytes());
                framed.extend(std::iter::repeat_n(b'x', args.body_bytes));
            }
            Bytes::from(framed)
        }
        None => Bytes::from(vec![b'x'; args.body_bytes]),
    };
    let template = RequestTemplate {
        method,
        path: args.path.clone(),
        host: HeaderValue::from_str(&args.host)?,
        headers,
        body,
        response_bytes: args.response_bytes,
        grpc: args.grpc_messages.is_some(),
    };
    let tunnels = args.idle_tunnels.unwrap_or(args.concurrency);
    // Idle mode: one more connection for the tunnels opened beside the held ones (the held
    // ones fill theirs to the stream limit).
    let slots = tunnels.div_ceil(args.streams_per_connection.max(1))
        + usize::from(args.idle_tunnels.is_some());
    let dialer = Dialer {
        mode: args.mode,
        target: args.target,
        authority: args.authority.clone(),
        tls,
        settings: ClientSettings::default(),
        streams_per_connection: args.streams_per_connection.max(1),
        h2: args.grpc_messages.is_some(),
        slots: (0..slots.max(1)).map(|_| Mutex::new(None)).collect(),
    };
    if let Some(pid) = args.proxy_pid
        && !procstat::reset_peak_rss(pid)
    {
        eprintln!(
            "loadgen: cannot reset VmHWM of pid {pid} (peak RSS then covers the process lifetime)"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let out = rt.block_on(async move {
        let start = Instant::now();
        let idle = args.idle_tunnels;
        let measure_start = start
            + if idle.is_some() {
                Duration::ZERO
            } else {
                args.warmup
            };
        let deadline = measure_start + args.duration;
        let sh = Arc::new(Shared {
            args,
            dialer,
            template,
            issued: AtomicU64::new(0),
            start,
            measure_start,
            deadline,
        });
        match idle {
            Some(n) => run_idle(sh, n).await,
            None => run_load(sh).await,
        }
    })?;
    println!("{out}");
    if out["kind"] == "load" {
        eprintln!(
            "loadgen: {} req/s, p50 {} us, p99 {} us, p99.9 {} us, errors {}{}",
            out["rps"],
            out["latency_us"]["p50"],
            out["latency_us"]["p99"],
            out["latency_us"]["p999"],
            out["errors"],
            out["proxy"]["cpu_s_per_1k"]
                .as_f64()
                .map(|c| format!(", proxy {c} cpu-s/1k req"))
                .unwrap_or_default()
        );
    } else {
        eprintln!(
            "loadgen: {} of {} tunnels open, {} B/tunnel",
            out["tunnels_open"], out["tunnels_requested"], out["proxy"]["bytes_per_tunnel"]
        );
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
