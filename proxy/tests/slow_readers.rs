//! Clients that never read: 100 tunnels each ask for an endless response and never take a
//! byte of it. What the waypoint holds for them is bounded per tunnel whatever window the
//! client advertises (the HBONE server's per-stream send buffer, hyper's write buffer), so
//! back-pressure reaches the backend early and resident memory stays flat (Envoy's
//! `per_connection_buffer_limit_bytes` idea). Measured on the real binary.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{dev_certs, reviews_config, rss_kib, sleep_client_tls, start_run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TUNNELS: usize = 100;

/// A backend whose every response is endless (16 KiB chunks for as long as it can write);
/// counts the bytes the waypoint accepted from it.
async fn endless_backend(written: Arc<AtomicU64>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let written = written.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("4000\r\n{}\r\n", "x".repeat(16384));
                while tcp.write_all(chunk.as_bytes()).await.is_ok() {
                    written.fetch_add(16384, Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_clients_hold_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dev_certs(dir.path());
    let written = Arc::new(AtomicU64::new(0));
    let backend = endless_backend(written.clone()).await;
    let config = reviews_config(dir.path(), backend.port());
    let wp = start_run(&config, &certs, &["--workers", "2"], &[]);
    let pid = wp.child.id();
    let tls = sleep_client_tls(&certs);
    // Warm up: one full exchange's worth of process growth (TLS, pools, allocator).
    {
        let conn = hbone::client::Connection::connect(wp.hbone, tls.clone(), &Default::default())
            .await
            .unwrap();
        let mut s = conn
            .open("10.0.0.10:9080", http::HeaderMap::new())
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 4 << 20 {
            got += s.read(&mut buf).await.unwrap();
        }
    }
    let before = rss_kib(pid);
    // 100 tunnels on one HBONE connection, the client's windows wide open (16 MiB connection,
    // 4 MiB per stream, ztunnel's), and never a byte read.
    let conn = hbone::client::Connection::connect(wp.hbone, tls.clone(), &Default::default())
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..TUNNELS {
        let mut s = conn
            .open("10.0.0.10:9080", http::HeaderMap::new())
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
            .await
            .unwrap();
        streams.push(s);
    }
    // Wait until the backend can write no more (back-pressure reached it): no progress for
    // a second, bounded by 20 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = written.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = written.load(Ordering::Relaxed);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let grown_kib = rss_kib(pid).saturating_sub(before);
    eprintln!(
        "{TUNNELS} never-reading tunnels: waypoint RSS +{grown_kib} KiB, backend wrote {} MiB",
        last >> 20
    );
    // Per tunnel: the HBONE stream's send buffer, hyper's queued response chunks and 64 KiB
    // read ahead from the backend (~190 KiB, measured +18.7-19.6 MiB for the 100; +15.1 MiB
    // with 16 KiB reads). Envoy lets each connection buffer up to its 1 MiB limit.
    assert!(
        grown_kib < 24 * 1024,
        "{TUNNELS} never-reading tunnels grew the waypoint by {grown_kib} KiB (bound: 24 MiB)"
    );
    drop(streams);
}
