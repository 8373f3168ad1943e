//! Memory of idle tunnels and after a burst, measured on the real `waypoint` binary (its own
//! process, so the client's memory is not counted): 2,000 idle keep-alive tunnels park and
//! cost ~10 KB each once idle (Envoy ~45 KB), the waypoint stays responsive while holding
//! them, a 200-tunnel burst is served, and once everything closes resident memory returns near
//! where it started.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{dev_certs, reviews_config, rss_kib, sleep_client_tls, start_run};
use http_body_util::Full;
use proxy::cli::client::TunnelHttp;

const IDLE_TUNNELS: usize = 2_000;
const BURST_TUNNELS: usize = 200;
/// The waypoint's HBONE stream limit: tunnels per connection.
const STREAMS_PER_CONN: usize = 100;
const AUTHORITY: &str = "10.0.0.10:9080";

/// A plain HTTP/1.1 backend answering 200 `ok` to everything.
async fn backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Open `n` tunnels (on `n / 100` new HBONE connections), one request in each, all at once.
async fn open_tunnels(
    hbone: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    n: usize,
) -> (Vec<hbone::client::Connection>, Vec<TunnelHttp>) {
    let mut conns = Vec::new();
    for _ in 0..n.div_ceil(STREAMS_PER_CONN) {
        conns.push(
            hbone::client::Connection::connect(hbone, tls.clone(), &Default::default())
                .await
                .unwrap(),
        );
    }
    let conns = Arc::new(conns);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let conns = conns.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = TunnelHttp::open(&conns[i / STREAMS_PER_CONN], AUTHORITY)
                .await
                .unwrap();
            let r = t.get("reviews:9080", "/").await.unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            t
        }));
    }
    let mut tunnels = Vec::with_capacity(n);
    for t in tasks {
        tunnels.push(t.await.unwrap());
    }
    let conns = Arc::try_unwrap(conns).unwrap_or_else(|_| unreachable!("tasks are done"));
    (conns, tunnels)
}

/// One of the waypoint's own metrics (`waypoint_*`, unlabelled).
async fn metric(metrics: SocketAddr, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let prefix = format!("{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Wait (bounded) until `metric(name)` satisfies `ok`.
async fn metric_until(metrics: SocketAddr, name: &str, ok: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = metric(metrics, name).await;
        if ok(v) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `pid`'s RSS every 100 ms until `ok(rss)` or `within`; the last reading either way.
async fn rss_until(pid: u32, within: Duration, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let rss = rss_kib(pid);
        if ok(rss) || Instant::now() >= deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_cost_a_few_kib_and_memory_returns_after_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let backend = backend().await;
    let config = reviews_config(dir.path(), backend.port());
    let wp = start_run(
        &config,
        &certs,
        &["--workers", "2"],
        &[("WAYPOINT_LOG", "info,proxy::memory=debug")],
    );
    let (pid, hbone, metrics) = (wp.child.id(), wp.hbone, wp.metrics);
    let tls = sleep_client_tls(&certs);

    // The binary runs on jemalloc with the options compiled into it (memory/mod.rs
    // MALLOC_CONF), and says so on admin /memory.
    let memory: serde_json::Value = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(wp.admin).await.unwrap();
        s.write_all(b"GET /memory HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    assert_eq!(memory["allocator"], "jemalloc", "{memory}");
    assert_eq!(memory["background_thread"], true, "{memory}");
    assert_eq!(memory["dirty_decay_ms"], 1000, "{memory}");
    assert!(
        memory["resident"].as_str().unwrap().parse::<u64>().unwrap() > 0,
        "{memory}"
    );

    // Warm up (pools, TLS, allocator arenas) with a small burst, then take the baseline.
    drop(open_tunnels(hbone, &tls, STREAMS_PER_CONN).await);
    let start = rss_until(pid, Duration::from_secs(5), |_| false).await;

    // Two rounds: the first from a cold process (thread stacks, pools and allocator arenas
    // grow to their working size once), the second from where the first ended, which must
    // come back near its start: nothing accumulates per round.
    let mut start = start;
    for round in 1..=2 {
        // 2,000 idle keep-alive tunnels, one request each.
        let (idle_conns, idle) = open_tunnels(hbone, &tls, IDLE_TUNNELS).await;
        let peak_open = rss_kib(pid);
        // Once idle (listener/inner.rs PARK_AFTER), each costs a few KiB: ~3 KB in the release
        // build (benches: `idle` scenario, 10,000 tunnels; Envoy ~45 KB) and in this test build
        // from a warm process (round 2). Round 1 also pays for the process growing to its
        // working size (pools, allocator arenas). Without parking an idle tunnel cost over
        // 35 KB here.
        // Round 2's figure moves with how much of round 1's memory had come back before its
        // baseline was read: 3.2 KB to 5.5 KB over runs of the same code (2026-12-07), so
        // the bound is 8 KiB, still far below the 35 KB of a tunnel that is not parked. The
        // release figure is the bench's (`idle`: ~3.2 KB).
        let per_tunnel_kib: u64 = if round == 1 { 16 } else { 8 };
        // Wait until they have all parked and the waypoint has given the freed memory back.
        metric_until(metrics, "waypoint_tunnels_parked", |n| {
            n >= IDLE_TUNNELS as u64
        })
        .await;
        let trims = metric(metrics, "waypoint_memory_trims_total").await;
        metric_until(metrics, "waypoint_memory_trims_total", |n| n > trims).await;
        let idle_rss = rss_kib(pid);
        let per_tunnel = idle_rss.saturating_sub(start) * 1024 / IDLE_TUNNELS as u64;
        eprintln!(
            "round {round}: baseline {start} KiB, {IDLE_TUNNELS} tunnels just opened {peak_open} KiB, idle {idle_rss} KiB = {per_tunnel} B per idle tunnel"
        );
        assert!(
            per_tunnel <= per_tunnel_kib * 1024,
            "round {round}: an idle tunnel costs {per_tunnel} B (bound {per_tunnel_kib} KiB)"
        );

        // Responsive while holding them: a new connection, tunnel and request, promptly.
        let t0 = Instant::now();
        let (c, t) = open_tunnels(hbone, &tls, 1).await;
        let fresh = t0.elapsed();
        assert!(fresh < Duration::from_secs(2), "new tunnel took {fresh:?}");
        drop((c, t));
        // ... and the idle (parked) tunnels still answer.
        let mut idle = idle;
        for i in (0..IDLE_TUNNELS).step_by(IDLE_TUNNELS / 20) {
            let req = http::Request::get("/")
                .header(http::header::HOST, "reviews:9080")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(5), idle[i].send(req))
                .await
                .expect("an idle tunnel did not answer")
                .unwrap();
            assert_eq!(r.status, 200);
        }

        // A 200-tunnel burst on top, all served.
        let burst = open_tunnels(hbone, &tls, BURST_TUNNELS).await;
        let peak = rss_kib(pid).max(peak_open);
        drop(burst);
        drop(idle);
        drop(idle_conns);

        // Everything closed: memory returns near the start (within a quarter of the growth).
        metric_until(metrics, "waypoint_hbone_connections_active", |n| n == 0).await;
        let growth = peak.saturating_sub(start);
        let end = rss_until(pid, Duration::from_secs(15), |rss| {
            rss.saturating_sub(start) <= growth / 4
        })
        .await;
        eprintln!("round {round}: peak {peak} KiB (growth {growth} KiB), after closing {end} KiB");
        for line in wp.stderr.try_iter() {
            eprintln!("waypoint: {line}");
        }
        // Round 1 may keep up to half its growth (the working size above); round 2 a quarter.
        let keep = if round == 1 { growth / 2 } else { growth / 4 };
        assert!(
            end.saturating_sub(start) <= keep,
            "round {round}: RSS {end} KiB after closing everything; started at {start} KiB, peaked at {peak} KiB"
        );
        start = end;
    }
}
