//! Abuse and faults, driven with raw TLS and raw HTTP/2 frames at the real listener, with the
//! limits configured small so the tests run fast.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint_tests::rawh2::*;
use waypoint_tests::*;

async fn waypoint(tweak: impl FnOnce(&mut proxy::Config)) -> (TestWaypoint, Backend) {
    let b = Backend::echo("reviews").await;
    let mut m = Manifests::new();
    m.service("reviews", "10.0.0.10", 9080, "http", &[b.addr]);
    (TestWaypoint::start_with(&m.yaml(), tweak).await, b)
}

fn sleep_tls(wp: &TestWaypoint) -> std::sync::Arc<rustls::ClientConfig> {
    let (chain, key) = wp
        .pki
        .issue_pem("spiffe://cluster.local/ns/default/sa/sleep")
        .unwrap();
    raw_client_tls(Some((&chain, &key)))
}

/// Read until EOF/error; true if the peer closed within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn stalled_tls_handshakes_are_closed_and_do_not_slow_other_clients() {
    let (wp, _b) = waypoint(|c| c.server.handshake_timeout = Duration::from_millis(500)).await;
    let mut stalled = Vec::new();
    for _ in 0..200 {
        stalled.push(tokio::net::TcpStream::connect(wp.addr).await.unwrap());
    }
    // A real client is served promptly while 200 handshakes hang.
    let t0 = Instant::now();
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "served in {:?}",
        t0.elapsed()
    );
    // Every stalled handshake is closed by the deadline.
    for s in stalled.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a stalled handshake stayed open"
        );
    }
    assert!(
        wp.running()
            .shared
            .hbone_stats
            .handshake_failures
            .load(Ordering::Relaxed)
            >= 200
    );
}

/// Connections in their handshake are capped: beyond the cap nothing more is accepted (the
/// kernel's backlog holds newcomers) until a handshake finishes or times out, so stalled
/// handshakes cost at most the cap; a real client still gets through once slots free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_capped() {
    let (wp, _b) = waypoint(|c| {
        c.server.handshake_timeout = Duration::from_millis(500);
        c.server.max_pending_handshakes = 2;
    })
    .await;
    let stats = wp.running().shared.hbone_stats.clone();
    let mut stalled = Vec::new();
    for _ in 0..6 {
        stalled.push(tokio::net::TcpStream::connect(wp.addr).await.unwrap());
    }
    // While the first two stall, the others are not taken in.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        let accepted = stats.connections_accepted.load(Ordering::Relaxed);
        assert!(accepted <= 2, "{accepted} handshakes in progress, cap 2");
        tokio::task::yield_now().await;
    }
    // As deadlines close them, the rest are accepted in turn, then a real client is served.
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
    assert!(stats.connections_accepted.load(Ordering::Relaxed) >= 7);
}

#[tokio::test]
async fn garbage_instead_of_tls_is_closed_at_once() {
    let (wp, _b) = waypoint(|_| {}).await;
    let mut s = tokio::net::TcpStream::connect(wp.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Default handshake deadline is 10 s: "at once" means far below it.
    assert!(closed_within(&mut s, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn garbage_instead_of_the_http2_preface_is_closed_at_once() {
    let (wp, _b) = waypoint(|_| {}).await;
    let tcp = tokio::net::TcpStream::connect(wp.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(sleep_tls(&wp))
        .connect(hbone::tls::dummy_server_name(), tcp)
        .await
        .unwrap();
    tls.write_all(b"this is not an HTTP/2 connection preface at all\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection must close right away");
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_and_the_connection_lives_on() {
    let (wp, _b) = waypoint(|c| c.server.max_concurrent_streams = 10).await;
    let mut h = RawH2::connect(wp.addr, sleep_tls(&wp)).await.unwrap();
    // Learn the server's SETTINGS first, then ignore its stream limit on purpose.
    h.until(Duration::from_secs(5), |f| {
        f.kind == SETTINGS && f.flags & ACK == 0
    })
    .await
    .unwrap();
    let block = connect_block("10.0.0.10:9080", &[]);
    for i in 0..11u32 {
        h.frame(HEADERS, END_HEADERS, 1 + 2 * i, &block)
            .await
            .unwrap();
    }
    let refused = h
        .until(Duration::from_secs(5), |f| {
            f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM)
        })
        .await
        .expect("the 11th stream is refused");
    assert_eq!(refused.stream, 21);
    // Close one tunnel, then a new stream on the same connection is served.
    h.frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes())
        .await
        .unwrap();
    h.frame(HEADERS, END_HEADERS, 23, &block).await.unwrap();
    let ok = h
        .until(Duration::from_secs(5), |f| {
            f.kind == HEADERS && f.stream == 23
        })
        .await;
    assert!(ok.is_some(), "the connection and its other streams live on");
}

#[tokio::test]
async fn rapid_reset_attacker_gets_goaway_and_others_are_unaffected() {
    let (wp, _b) = waypoint(|c| c.server.max_resets_per_second = 50).await;
    let mut h = RawH2::connect(wp.addr, sleep_tls(&wp)).await.unwrap();
    let block = connect_block("10.0.0.10:9080", &[]);
    let mut goaway = None;
    // Bounded: at most 5,000 HEADERS+RST pairs, sent in batches.
    'attack: for batch in 0..50u32 {
        let mut out = Vec::new();
        for i in 0..100u32 {
            let id = 1 + 2 * (batch * 100 + i);
            RawH2::encode(HEADERS, END_HEADERS, id, &block, &mut out);
            RawH2::encode(RST_STREAM, 0, id, &CANCEL.to_be_bytes(), &mut out);
        }
        if h.io.write_all(&out).await.is_err() {
            break;
        }
        while let Some(f) = h.next(Duration::from_millis(20)).await {
            if f.kind == GOAWAY {
                goaway = Some(f);
                break 'attack;
            }
        }
    }
    if goaway.is_none() {
        goaway = h.until(Duration::from_secs(5), |f| f.kind == GOAWAY).await;
    }
    let g = goaway.expect("the attacker is cut with a GOAWAY");
    assert_eq!(g.error_code(), Some(ENHANCE_YOUR_CALM));
    // Another client is unaffected.
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn ping_and_settings_floods_close_the_offending_connection() {
    let (wp, _b) = waypoint(|_| {}).await;
    for (kind, payload) in [(PING, vec![0u8; 8]), (SETTINGS, vec![])] {
        let mut h = RawH2::connect(wp.addr, sleep_tls(&wp)).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..5_000 {
            RawH2::encode(kind, 0, 0, &payload, &mut out);
        }
        let t0 = Instant::now();
        let _ = h.io.write_all(&out).await;
        // Drain what the server sends until it closes (bounded).
        while h.next(Duration::from_secs(3)).await.is_some() {}
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "flood of frame type {kind} not cut in time"
        );
    }
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
}

/// Envoy's other HTTP/2 abuse limits, at the real listener with raw frames: WINDOW_UPDATE
/// beyond 10 per DATA frame sent, PRIORITY beyond 100 per stream, and empty DATA frames in a
/// row each close the connection (h2 alone would accept all of them forever); others are
/// unaffected.
#[tokio::test]
async fn window_update_priority_and_empty_frame_floods_close_the_connection() {
    let (wp, _b) = waypoint(|_| {}).await;
    let window_update = (0x8u8, 0u8, 0u32, 1u32.to_be_bytes().to_vec());
    let priority = (0x2u8, 0u8, 3u32, vec![0, 0, 0, 0, 16]);
    for (kind, flags, stream, payload) in [window_update, priority] {
        let mut h = RawH2::connect(wp.addr, sleep_tls(&wp)).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..5_000 {
            RawH2::encode(kind, flags, stream, &payload, &mut out);
        }
        let _ = h.io.write_all(&out).await;
        let t0 = Instant::now();
        while h.next(Duration::from_secs(3)).await.is_some() {}
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "flood of frame type {kind} not cut in time"
        );
    }
    // Empty DATA frames on an open tunnel.
    let mut h = RawH2::connect(wp.addr, sleep_tls(&wp)).await.unwrap();
    let mut out = Vec::new();
    RawH2::encode(0x1, 0x4, 1, &connect_block("10.0.0.10:9080", &[]), &mut out);
    for _ in 0..5_000 {
        RawH2::encode(0x0, 0, 1, &[], &mut out);
    }
    let _ = h.io.write_all(&out).await;
    let t0 = Instant::now();
    while h.next(Duration::from_secs(3)).await.is_some() {}
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "empty DATA flood not cut"
    );
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    for _ in 0..50 {
        assert_eq!(http.get("reviews:9080", "/").await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn oversized_connect_headers_are_rejected_without_harming_other_streams() {
    let (wp, _b) = waypoint(|_| {}).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut keep = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    let mut big = http::HeaderMap::new();
    big.insert(
        "x-big",
        http::HeaderValue::from_str(&"a".repeat(100 * 1024)).unwrap(),
    );
    let r = conn.send_connect("10.0.0.10:9080", big).await;
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.status != 200),
        "a 100 KiB header list must not open a tunnel"
    );
    assert_eq!(keep.get("reviews:9080", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn slow_request_head_gets_408_and_other_tunnels_keep_working() {
    let (wp, _b) = waypoint(|c| c.limits.request_header_timeout = Duration::from_millis(300)).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut slow = conn
        .open("10.0.0.10:9080", http::HeaderMap::new())
        .await
        .unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nx-partial: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "got: {text:?}");
    let mut ok = TunnelHttp::open(&conn, "10.0.0.10:9080").await.unwrap();
    assert_eq!(ok.get("reviews:9080", "/").await.unwrap().status, 200);
    let logs = wp.next_logs(2);
    assert!(logs.iter().any(
        |l| l["response_code"] == 408 && l["response_code_details"] == "request_header_timeout"
    ));
}

#[tokio::test]
async fn a_slow_request_body_is_not_a_slow_head() {
    let (wp, _b) = waypoint(|c| c.limits.request_header_timeout = Duration::from_millis(300)).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut s = conn
        .open("10.0.0.10:9080", http::HeaderMap::new())
        .await
        .unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: reviews\r\ncontent-length: 4\r\n\r\nab")
        .await
        .unwrap();
    // The rest of the body arrives after the head deadline would have passed.
    let mut chunk = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(600), s.read(&mut chunk)).await;
    assert!(
        early.is_err(),
        "nothing may be answered while the body is incomplete"
    );
    s.write_all(b"cd").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn idle_inner_connections_time_out() {
    let (wp, _b) = waypoint(|c| c.limits.idle_timeout = Duration::from_millis(300)).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut s = conn
        .open("10.0.0.10:9080", http::HeaderMap::new())
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        r.is_ok(),
        "the idle connection is closed after its response"
    );
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}

/// A raw TCP "backend" running `behave` on every accepted connection; `closed` counts
/// connections the waypoint closed on it.
async fn raw_backend<F, Fut>(
    behave: F,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)
where
    F: Fn(tokio::net::TcpStream, std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = closed.clone();
    let behave = std::sync::Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(behave(s, c.clone()));
        }
    });
    (addr, closed)
}

async fn read_request_head(s: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// A backend answering every request with an endless chunked body (16 KiB chunks, bounded at
/// ~1.6 GB, far more than any window); `closed` counts connections the waypoint let go of.
async fn endless_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    raw_backend(|mut s, closed| async move {
        read_request_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        let chunk = format!("{:x}\r\n{}\r\n", 16384, "x".repeat(16384));
        for _ in 0..100_000 {
            if s.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    })
    .await
}

async fn one_backend_waypoint(
    addr: std::net::SocketAddr,
    tweak: impl FnOnce(&mut proxy::Config),
) -> TestWaypoint {
    let mut m = Manifests::new();
    m.service("svc", "10.0.0.60", 80, "http", &[addr]);
    TestWaypoint::start_with(&m.yaml(), tweak).await
}

#[tokio::test]
async fn a_backend_that_never_answers_is_timed_out_and_released() {
    let (addr, closed) = raw_backend(|mut s, closed| async move {
        read_request_head(&mut s).await;
        // Never answer; notice when the waypoint lets go.
        let mut b = [0u8; 64];
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    })
    .await;
    let wp = one_backend_waypoint(addr, |c| {
        c.limits.upstream_response_timeout = Some(Duration::from_millis(300))
    })
    .await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    let r = http.get("svc", "/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (504, "upstream request timeout")
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "UT");
    let released = eventually(Duration::from_secs(5), || async {
        (closed.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert!(released.is_some(), "the upstream connection is released");
}

#[tokio::test]
async fn a_backend_that_closes_before_answering_gets_503_uc() {
    let (addr, _) = raw_backend(|mut s, _| async move {
        read_request_head(&mut s).await;
        drop(s);
    })
    .await;
    let wp = one_backend_waypoint(addr, |_| {}).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    let r = http.get("svc", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "UC");
    assert_eq!(
        log["response_code_details"],
        "upstream_reset_before_response_started{connection_termination}"
    );
}

#[tokio::test]
async fn a_backend_that_resets_mid_response_gives_a_clean_failure_and_a_log_line() {
    let (addr, _) = raw_backend(|mut s, _| async move {
        read_request_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
            .await;
        drop(s);
    })
    .await;
    let wp = one_backend_waypoint(addr, |_| {}).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    let r = http.get("svc", "/").await;
    assert!(
        r.is_err(),
        "an incomplete body must not look complete: {r:?}"
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 200);
    assert_eq!(log["response_flags"], "UC");
    assert_eq!(
        log["response_code_details"],
        "upstream_reset_after_response_started{connection_termination}"
    );
    // The HBONE connection itself is unharmed.
    let again = TunnelHttp::open(&conn, "10.0.0.60:80").await;
    assert!(again.is_ok());
}

#[tokio::test]
async fn an_endless_body_is_back_pressured_and_released_when_the_client_leaves() {
    let (addr, closed) = endless_backend().await;
    let wp = one_backend_waypoint(addr, |_| {}).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut stream = conn
        .open("10.0.0.60:80", http::HeaderMap::new())
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    while got < 256 * 1024 {
        got += stream.read(&mut buf).await.unwrap();
    }
    // The client stops reading, then goes away.
    drop(stream);
    let released = eventually(Duration::from_secs(10), || async {
        (closed.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert!(
        released.is_some(),
        "the upstream connection is released when the client leaves"
    );
    let log = &wp.next_logs(1)[0];
    assert!(
        log["response_flags"].as_str().unwrap_or("").contains("DC"),
        "{log}"
    );
}

#[tokio::test]
async fn overload_sheds_with_503_om_instead_of_queueing() {
    let (addr, _) = raw_backend(|mut s, _| async move {
        read_request_head(&mut s).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let wp = one_backend_waypoint(addr, |c| c.limits.max_requests = 1).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut slow = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    let mut fast = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    let first = tokio::spawn(async move { slow.get("svc", "/").await.map(|r| r.status.as_u16()) });
    // Wait (bounded) until the first request is in flight.
    let inflight = eventually(Duration::from_secs(5), || async {
        (wp.running().shared.in_flight.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert!(inflight.is_some());
    let r = fast.get("svc", "/").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (503, "envoy overloaded")
    );
    assert_eq!(first.await.unwrap().unwrap(), 200);
    let logs = wp.next_logs(2);
    assert!(logs.iter().any(|l| l["response_flags"] == "OM"));
}

/// A peer that stops reading while the waypoint streams to it: its TCP buffers fill, the
/// keepalive PING goes unanswered and the connection is shut down abruptly, but its GOAWAY can
/// never be written. The connection's task must still end (a bounded flush), not hold the
/// connection and its buffers forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_let_go_after_an_abrupt_shutdown() {
    let (addr, _closed) = endless_backend().await;
    let wp = one_backend_waypoint(addr, |c| {
        c.server.keepalive_interval = Duration::from_millis(300);
        c.server.keepalive_timeout = Duration::from_millis(300);
    })
    .await;
    let stats = wp.running.as_ref().unwrap().shared.hbone_stats.clone();
    let mut h = RawH2::connect(wp.addr, sleep_tls(&wp)).await.unwrap();
    // Windows as large as HTTP/2 allows, so only TCP holds the waypoint back.
    let mut settings = Vec::new();
    settings.extend_from_slice(&4u16.to_be_bytes()); // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    h.frame(SETTINGS, 0, 0, &settings).await.unwrap();
    h.frame(0x8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes())
        .await
        .unwrap(); // WINDOW_UPDATE on the connection
    h.frame(HEADERS, END_HEADERS, 1, &connect_block("10.0.0.60:80", &[]))
        .await
        .unwrap();
    h.frame(DATA, 0, 1, b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    let active = |n: u64| {
        let stats = stats.clone();
        async move { (stats.connections_active.load(Ordering::Relaxed) == n).then_some(()) }
    };
    assert!(
        eventually(Duration::from_secs(5), || active(1))
            .await
            .is_some()
    );
    // From here on the client reads nothing. Keepalive (0.6 s) + the GOAWAY flush bound (5 s).
    let gone = eventually(Duration::from_secs(15), || active(0)).await;
    assert!(
        gone.is_some(),
        "the connection task still holds a peer that never reads"
    );
    drop(h);
}
