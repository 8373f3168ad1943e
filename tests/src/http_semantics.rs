//! HTTP on the data path as Envoy's waypoint does it: request bodies for every method and
//! framing (HTTP/1.1 and h2c in, plaintext and HBONE out), the codec's refusals answered as
//! Envoy 1.40 answers them (docs/envoy-observed.md, "HTTP/1.1 framing"), WebSocket upgrades
//! with a real WebSocket library on both ends, and bodies that outlive the response timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hbone::client::Connection;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use waypoint_tests::*;

const TD: &str = "cluster.local";

/// FNV-1a 64: a digest of what the backend received.
fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A backend that reports what it received in response headers (`x-got-method`,
/// `x-got-len`, `x-got-fnv`, `x-got-te`, `x-got-cl`) with an empty body, so HEAD works too.
/// Counts the requests it saw.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn recorder(ip: &str) -> Recorder {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            conns.spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let method = req.method().to_string();
                            let te = req.headers().get("transfer-encoding").cloned();
                            let cl = req.headers().get("content-length").cloned();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut r = http::Response::new(Full::new(Bytes::new()));
                            let h = r.headers_mut();
                            h.insert("x-got-method", method.parse().unwrap());
                            h.insert("x-got-len", body.len().into());
                            h.insert("x-got-fnv", format!("{:016x}", fnv(&body)).parse().unwrap());
                            if let Some(te) = te {
                                h.insert("x-got-te", te);
                            }
                            if let Some(cl) = cl {
                                h.insert("x-got-cl", cl);
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    Recorder { addr, seen, task }
}

/// Service `echo` (10.0.0.60:80) on plaintext endpoints, or (`pod` set) on an ambient pod at
/// `pod` reached through HBONE (the test ztunnel forwards to 127.0.0.1:`target`).
fn manifests(endpoint: SocketAddr, pod: Option<&str>) -> String {
    match pod {
        None => {
            let mut m = Manifests::new();
            m.service("echo", "10.0.0.60", 80, "http", &[endpoint]);
            m.yaml()
        }
        Some(pod_ip) => {
            let target = endpoint.port();
            format!(
                r#"apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/use-waypoint: waypoint, istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default, labels: {{istio.io/waypoint-for: service}}}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{clusterIP: 10.0.0.60, ports: [{{name: http, port: 80, targetPort: {target}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-0, namespace: default}}
spec: {{serviceAccountName: echo}}
status: {{podIP: "{pod_ip}"}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, namespace: default, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
endpoints:
- addresses: ["{pod_ip}"]
  targetRef: {{kind: Pod, name: echo-0, namespace: default}}
ports: [{{name: http, port: {target}}}]
"#
            )
        }
    }
}

/// A waypoint in front of `backend`: plaintext, or through a ztunnel stand-in at `pod`.
async fn waypoint_for(backend: SocketAddr, pod: Option<&str>) -> (TestWaypoint, Option<Ztunnel>) {
    match pod {
        None => (TestWaypoint::start(&manifests(backend, None)).await, None),
        Some(ip) => {
            let pki = Arc::new(hbone::testing::Pki::new(TD).unwrap());
            let zt = Ztunnel::start(ip, &pki.issue("default", "echo").unwrap()).await;
            let port = zt.addr.port();
            let wp = TestWaypoint::start_with_pki(&manifests(backend, Some(ip)), pki, |c| {
                c.upstream.hbone_port = port
            })
            .await;
            (wp, Some(zt))
        }
    }
}

/// Write raw bytes into a new tunnel and read everything until the waypoint closes its half
/// (bounded). `Err` if the stream was reset instead of closed.
async fn raw_exchange(conn: &Connection, authority: &str, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = conn
        .open(authority, http::HeaderMap::new())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Ok(out),
        Ok(Err(e)) => Err(format!(
            "stream error after {:?}: {e}",
            String::from_utf8_lossy(&out)
        )),
        Err(_) => Err(format!(
            "no close within 10 s; got {:?}",
            String::from_utf8_lossy(&out)
        )),
    }
}

/// One request on a new tunnel, with `connection: close` so the waypoint ends the tunnel
/// after the response; returns the response head's lines.
async fn raw_request(conn: &Connection, authority: &str, head: &str, body: &[u8]) -> Vec<String> {
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(body);
    let out = raw_exchange(conn, authority, &bytes).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().map(str::to_string).collect()
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(1000) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

/// Every method, with no body, a Content-Length body and a chunked body, over HTTP/1.1 into
/// the tunnel: the backend gets exactly the bytes sent (length and digest), framed.
async fn http1_bodies_reach_the_backend(pod: Option<&str>) {
    let backend = recorder("127.0.0.1").await;
    let (wp, _zt) = waypoint_for(backend.addr, pod).await;
    let conn = wp.connect_as("default", "sleep").await;
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = format!("{:016x}", fnv(&body));
    for method in METHODS {
        for framing in ["none", "content-length", "chunked"] {
            let (head, payload) = match framing {
                "none" => (
                    format!("{method} /x HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"),
                    Vec::new(),
                ),
                "content-length" => (
                    format!(
                        "{method} /x HTTP/1.1\r\nhost: echo\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    ),
                    body.clone(),
                ),
                _ => (
                    format!(
                        "{method} /x HTTP/1.1\r\nhost: echo\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
                    ),
                    chunked(&body),
                ),
            };
            let lines = raw_request(&conn, "10.0.0.60:80", &head, &payload).await;
            let case = format!("{method} {framing} (pod {pod:?}): {lines:?}");
            assert_eq!(lines[0], "HTTP/1.1 200 OK", "{case}");
            assert_eq!(header(&lines, "x-got-method"), Some(*method), "{case}");
            let (len, sum) = if framing == "none" {
                ("0".to_string(), format!("{:016x}", fnv(b"")))
            } else {
                (body.len().to_string(), digest.clone())
            };
            assert_eq!(header(&lines, "x-got-len"), Some(len.as_str()), "{case}");
            assert_eq!(header(&lines, "x-got-fnv"), Some(sum.as_str()), "{case}");
            if framing == "chunked" {
                assert_eq!(header(&lines, "x-got-te"), Some("chunked"), "{case}");
            }
        }
    }
    let logs = wp.next_logs(METHODS.len() * 3);
    for l in &logs {
        assert_eq!(l["response_code"], 200, "{l}");
    }
    let with_body: Vec<_> = logs
        .iter()
        .filter(|l| l["bytes_received"] == 5000)
        .collect();
    assert_eq!(with_body.len(), METHODS.len() * 2, "{logs:?}");
}

#[tokio::test]
async fn http1_request_bodies_of_every_method_and_framing_reach_a_plaintext_backend() {
    http1_bodies_reach_the_backend(None).await;
}

#[tokio::test]
async fn http1_request_bodies_of_every_method_and_framing_reach_an_hbone_backend() {
    http1_bodies_reach_the_backend(Some("127.0.0.61")).await;
}

/// h2c into the tunnel: DATA with and without content-length, every method.
async fn h2c_bodies_reach_the_backend(pod: Option<&str>) {
    let backend = recorder("127.0.0.1").await;
    let (wp, _zt) = waypoint_for(backend.addr, pod).await;
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open("10.0.0.60:80", http::HeaderMap::new())
        .await
        .unwrap();
    let (mut sender, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(driver);
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 13 % 251) as u8).collect();
    let digest = format!("{:016x}", fnv(&body));
    for method in METHODS {
        for framing in ["none", "content-length", "stream"] {
            let builder = http::Request::builder()
                .method(*method)
                .uri("http://echo/x");
            let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = match framing {
                "none" => vec![],
                _ => body
                    .chunks(1000)
                    .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
                    .collect(),
            };
            let builder = if framing == "content-length" {
                builder.header("content-length", body.len())
            } else {
                builder
            };
            let req = builder
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let case = format!("h2c {method} {framing} (pod {pod:?}): {:?}", resp.headers());
            assert_eq!(resp.status(), 200, "{case}");
            let got = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let (len, sum) = if framing == "none" {
                ("0".to_string(), format!("{:016x}", fnv(b"")))
            } else {
                (body.len().to_string(), digest.clone())
            };
            assert_eq!(got("x-got-method").as_deref(), Some(*method), "{case}");
            assert_eq!(got("x-got-len"), Some(len), "{case}");
            assert_eq!(got("x-got-fnv"), Some(sum), "{case}");
            let _ = resp.into_body().collect().await;
        }
    }
    let _ = wp.next_logs(METHODS.len() * 3);
}

#[tokio::test]
async fn h2c_request_bodies_of_every_method_reach_a_plaintext_backend() {
    h2c_bodies_reach_the_backend(None).await;
}

#[tokio::test]
async fn h2c_request_bodies_of_every_method_reach_an_hbone_backend() {
    h2c_bodies_reach_the_backend(Some("127.0.0.62")).await;
}

/// One refused request: (name, request bytes, status line, body, details, flags).
type Refused = (
    &'static str,
    &'static [u8],
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

/// Requests Envoy 1.40's codec refuses, with what Envoy answered (docs/envoy-observed.md 12).
const REFUSED: &[Refused] = &[
    (
        "content-length with transfer-encoding",
        b"POST /x HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.content_length_and_chunked_not_allowed",
        "DPE",
    ),
    (
        "differing content-lengths",
        b"POST /x HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "repeated equal content-lengths",
        b"GET /x HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "space in a header name",
        b"GET /x HTTP/1.1\r\nHost: echo\r\nBad Name: v\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "control character in a header value",
        b"GET /x HTTP/1.1\r\nHost: echo\r\nx-a: a\x01b\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.invalid_characters",
        "DPE",
    ),
    (
        "missing host",
        b"GET /x HTTP/1.1\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "",
        "missing_host_header",
        "-",
    ),
    (
        "invalid method token",
        b"G@T /x HTTP/1.1\r\nHost: echo\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "method outside Envoy's list",
        b"QUERY /x HTTP/1.1\r\nHost: echo\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "unknown HTTP version",
        b"GET /x HTTP/9.9\r\nHost: echo\r\n\r\n",
        "HTTP/1.1 426 Upgrade Required",
        "Upgrade Required",
        "low_version",
        "DPE",
    ),
    (
        "garbage request line",
        b"hello there\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "NUL in the path",
        b"GET /x\x00y HTTP/1.1\r\nHost: echo\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.invalid_characters",
        "DPE",
    ),
    (
        "space in the path",
        b"GET /x y HTTP/1.1\r\nHost: echo\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "gzip transfer coding",
        b"POST /x HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: gzip\r\n\r\n",
        "HTTP/1.1 501 Not Implemented",
        "Not Implemented",
        "http1.invalid_transfer_encoding",
        "DPE",
    ),
    (
        "gzip then chunked",
        b"POST /x HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 501 Not Implemented",
        "Not Implemented",
        "http1.invalid_transfer_encoding",
        "DPE",
    ),
    (
        "invalid content-length",
        b"POST /x HTTP/1.1\r\nHost: echo\r\nContent-Length: abc\r\n\r\n",
        "HTTP/1.1 400 Bad Request",
        "Bad Request",
        "http1.codec_error",
        "DPE",
    ),
    (
        "an upgrade other than websocket",
        b"GET /x HTTP/1.1\r\nHost: echo\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n",
        "HTTP/1.1 403 Forbidden",
        "",
        "upgrade_failed",
        "-",
    ),
];

#[tokio::test]
async fn requests_envoys_codec_refuses_get_envoys_answer_a_close_and_a_log_line() {
    let backend = recorder("127.0.0.1").await;
    let (wp, _) = waypoint_for(backend.addr, None).await;
    let conn = wp.connect_as("default", "sleep").await;
    for (name, bytes, status, body, details, flags) in REFUSED {
        let out = raw_exchange(&conn, "10.0.0.60:80", bytes)
            .await
            .unwrap_or_else(|e| panic!("{name}: the tunnel must be closed, not reset: {e}"));
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, got_body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let lines: Vec<String> = head.lines().map(str::to_string).collect();
        assert_eq!(lines[0], *status, "{name}: {text:?}");
        assert_eq!(got_body, *body, "{name}: {text:?}");
        assert_eq!(
            header(&lines, "connection"),
            Some("close"),
            "{name}: {text:?}"
        );
        assert_eq!(
            header(&lines, "server"),
            Some("istio-envoy"),
            "{name}: {text:?}"
        );
        assert_eq!(
            header(&lines, "content-length"),
            Some(body.len().to_string().as_str()),
            "{name}: {text:?}"
        );
        assert!(header(&lines, "date").is_some(), "{name}: {text:?}");
        let log = &wp.next_logs(1)[0];
        assert_eq!(
            log["response_code"],
            status[9..12].parse::<u16>().unwrap(),
            "{name}: {log}"
        );
        assert_eq!(log["response_code_details"], *details, "{name}: {log}");
        assert_eq!(log["response_flags"], *flags, "{name}: {log}");
        assert_eq!(log["bytes_sent"], body.len(), "{name}: {log}");
        assert_eq!(log["protocol"], "HTTP/1.1", "{name}: {log}");
    }
    assert_eq!(
        backend.seen.load(Ordering::SeqCst),
        0,
        "no refused request may be forwarded"
    );
    // An h2c upgrade is dropped by the codec and the request served as a plain one.
    let lines = raw_request(
        &conn,
        "10.0.0.60:80",
        "GET /x HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nconnection: close\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(lines[0], "HTTP/1.1 200 OK", "{lines:?}");
    // `OPTIONS *`: 404 with no flag, the connection kept.
    let mut stream = conn
        .open("10.0.0.60:80", http::HeaderMap::new())
        .await
        .unwrap();
    stream
        .write_all(b"OPTIONS * HTTP/1.1\r\nHost: echo\r\n\r\nGET /x HTTP/1.1\r\nHost: echo\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 1, "{text}");
    let logs = wp.next_logs(3);
    assert_eq!(
        logs[1]["response_code_details"], "absolute_path_rejected",
        "{logs:?}"
    );
}

#[tokio::test]
async fn a_malformed_chunked_body_is_answered_400_not_reset() {
    let backend = recorder("127.0.0.1").await;
    let (wp, _) = waypoint_for(backend.addr, None).await;
    let conn = wp.connect_as("default", "sleep").await;
    let out = raw_exchange(
        &conn,
        "10.0.0.60:80",
        b"POST /x HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .expect("closed, not reset");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nBad Request"), "{text}");
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 400, "{log}");
    assert_eq!(log["response_flags"], "DPE", "{log}");
    assert_eq!(log["response_code_details"], "http1.codec_error", "{log}");
    // Envoy had already routed it: method, path and route are logged.
    assert_eq!(log["method"], "POST", "{log}");
    assert_eq!(log["route_name"], "default", "{log}");
}

/// A WebSocket echo server (tokio-tungstenite) on 127.0.0.1.
async fn websocket_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            conns.spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    (addr, task)
}

async fn websocket_through_the_waypoint(pod: Option<&str>) {
    let (ws_addr, ws_task) = websocket_echo().await;
    let (wp, _zt) = waypoint_for(ws_addr, pod).await;
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open("10.0.0.60:80", http::HeaderMap::new())
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://echo/chat", stream)
        .await
        .expect("the WebSocket handshake succeeds through the waypoint");
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers().get("server").and_then(|v| v.to_str().ok()),
        Some("istio-envoy")
    );
    let mut sent = 0;
    for i in 0..20 {
        let text = format!("hello {i}");
        sent += text.len();
        ws.send(Message::text(text.clone())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(text));
    }
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().len(), big.len());
    ws.close(None).await.unwrap();
    // The server ends the session after the close frame; the client's end of the tunnel
    // closes as ztunnel closes it when the application closes its socket.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    ws.get_mut().shutdown().await.unwrap();
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 101, "{log}");
    assert_eq!(log["response_flags"], "-", "{log}");
    assert_eq!(log["response_code_details"], "via_upstream", "{log}");
    assert_eq!(log["path"], "/chat", "{log}");
    let received = log["bytes_received"].as_u64().unwrap() as usize;
    let bytes_sent = log["bytes_sent"].as_u64().unwrap() as usize;
    assert!(received > sent + big.len(), "{log}");
    assert!(bytes_sent > sent + big.len(), "{log}");
    assert!(
        wp.drain_logs(Duration::from_millis(200)).is_empty(),
        "logged once"
    );
    ws_task.abort();
}

// Multi-threaded: `next_logs` blocks its thread, and the client's HBONE connection must keep
// running meanwhile to deliver the tunnel's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_to_a_plaintext_backend() {
    websocket_through_the_waypoint(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_to_an_hbone_backend() {
    websocket_through_the_waypoint(Some("127.0.0.63")).await;
}

#[tokio::test]
async fn websocket_upgrades_are_routed_and_authorized_like_any_request() {
    let (ws_addr, ws_task) = websocket_echo().await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.60", 80, "http", &[ws_addr]);
    m.push(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]\n",
    );
    m.route(
        "only-chat",
        "echo",
        80,
        "  - matches: [{path: {type: PathPrefix, value: /chat}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    );
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    for (path, status, details) in [
        (
            "/admin",
            403,
            "rbac_access_denied_matched_policy[ns[default]-policy[no-admin]-rule[0]]",
        ),
        ("/elsewhere", 404, "route_not_found"),
    ] {
        let stream = conn
            .open("10.0.0.60:80", http::HeaderMap::new())
            .await
            .unwrap();
        match tokio_tungstenite::client_async(format!("ws://echo{path}"), stream).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), status)
            }
            Err(other) => panic!("{path}: {other}"),
            Ok(_) => panic!("{path}: the upgrade must be refused"),
        }
        let log = &wp.next_logs(1)[0];
        assert_eq!(log["response_code"], status, "{log}");
        assert_eq!(log["response_code_details"], details, "{log}");
    }
    let stream = conn
        .open("10.0.0.60:80", http::HeaderMap::new())
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://echo/chat", stream)
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    let _ = ws.close(None).await;
    ws_task.abort();
}

/// Half-close: the client ends its direction, the backend still answers, then ends its own.
#[tokio::test]
async fn an_upgraded_session_honours_half_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        tcp.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap(); // until the client's half-close
        tcp.write_all(&got).await.unwrap();
        tcp.write_all(b"|bye").await.unwrap();
        tcp.shutdown().await.unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    let (wp, _) = waypoint_for(addr, None).await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut stream = conn
        .open("10.0.0.60:80", http::HeaderMap::new())
        .await
        .unwrap();
    stream
        .write_all(b"GET /raw HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream.write_all(b"+more").await.unwrap();
    stream.shutdown().await.unwrap(); // half-close: our direction ends
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "early+more|bye");
    let seen_head = backend.await.unwrap();
    assert!(
        seen_head
            .to_ascii_lowercase()
            .contains("upgrade: websocket"),
        "{seen_head}"
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 101, "{log}");
    assert_eq!(log["bytes_received"], 10, "{log}");
    assert_eq!(log["bytes_sent"], 14, "{log}");
}

/// A backend whose body trickles: headers at once, then a chunk every 200 ms for `total`.
async fn trickle_backend(total: Duration) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let start = tokio::time::Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                while start.elapsed() < total {
                    tick.tick().await;
                    if tcp.write_all(b"6\r\ndata.\n\r\n").await.is_err() {
                        return;
                    }
                }
                let _ = tcp.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_flowing_body_outlives_the_response_timeout_but_not_the_route_timeout() {
    let (addr, task) = trickle_backend(Duration::from_millis(2500)).await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.60", 80, "http", &[addr]);
    m.service("timed", "10.0.0.64", 80, "http", &[addr]);
    m.route(
        "timed",
        "timed",
        80,
        "  - backendRefs: [{name: timed, port: 80}]\n    timeouts: {request: 1s}\n",
    );
    // The header wait is 1 s: the body keeps flowing for 2.5 s and must not be cut.
    let wp = TestWaypoint::start_with(&m.yaml(), |c| {
        c.limits.upstream_response_timeout = Some(Duration::from_secs(1))
    })
    .await;
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    let r = http.get("echo", "/events").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.len() >= 6 * 10,
        "the whole stream arrived: {} bytes",
        r.body.len()
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "-", "{log}");
    assert!(log["duration"].as_u64().unwrap() >= 2000, "{log}");

    // The route's request timeout covers the whole exchange, as Envoy's route timeout does.
    let mut http = TunnelHttp::open(&conn, "10.0.0.64:80").await.unwrap();
    let r = http.get("timed", "/events").await;
    assert!(r.is_err(), "the body is cut at the route timeout");
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "UT", "{log}");
    assert_eq!(log["response_code"], 200, "{log}");
    task.abort();
}

/// Envoy arms the route timeout once the whole request has been read (router.cc
/// `onRequestComplete`): an upload slower than the route timeout is not cut. A body the
/// client stops sending is bounded by the stream idle timeout instead: 408 `stream timeout`,
/// flag `SI`, details `stream_idle_timeout` (Envoy's HCM `stream_idle_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_outlives_the_route_timeout_and_a_stalled_one_gets_408_si() {
    let rec = recorder("127.0.0.1").await;
    let mut m = Manifests::new();
    m.service("timed", "10.0.0.64", 80, "http", &[rec.addr]);
    m.route(
        "timed",
        "timed",
        80,
        "  - backendRefs: [{name: timed, port: 80}]\n    timeouts: {request: 500ms}\n",
    );
    let wp = TestWaypoint::start_with(&m.yaml(), |c| {
        c.limits.stream_idle_timeout = Some(Duration::from_millis(1500))
    })
    .await;
    let conn = wp.connect_as("default", "sleep").await;
    let head =
        "POST /up HTTP/1.1\r\nhost: timed\r\ncontent-length: 30\r\nconnection: close\r\n\r\n";

    // 30 bytes in three pieces 400 ms apart: the upload itself takes longer than the route
    // timeout (the pacing is what is tested, not a synchronisation).
    let mut s = conn
        .open("10.0.0.64:80", http::HeaderMap::new())
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(&[b'x'; 10]).await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("x-got-len: 30"),
        "the whole body arrived: {text}"
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_flags"], "-", "{log}");
    assert_eq!(log["bytes_received"], 30, "{log}");

    // 10 of 30 bytes, then nothing: neither the route timeout (the request never completes)
    // nor a hang, but the stream idle timeout.
    let mut s = conn
        .open("10.0.0.64:80", http::HeaderMap::new())
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'x'; 10]).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered within 10 s");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.ends_with("stream timeout"), "{text}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "not before the stream idle timeout: {:?}",
        started.elapsed()
    );
    let log = &wp.next_logs(1)[0];
    assert_eq!(log["response_code"], 408, "{log}");
    assert_eq!(log["response_flags"], "SI", "{log}");
    assert_eq!(log["response_code_details"], "stream_idle_timeout", "{log}");
    assert_eq!(log["bytes_received"], 10, "{log}");
}

/// RequestMirror copies are bounded in number (beyond the bound: skipped and counted), in time
/// (the route timeout) and in memory (an endless mirror response is discarded as it streams),
/// and never hold the primary back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_bounded_and_never_hold_the_primary() {
    let primary = recorder("127.0.0.1").await;
    // The mirror target answers with an endless body.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = listener.local_addr().unwrap();
    let streamed = Arc::new(AtomicUsize::new(0));
    let counter = streamed.clone();
    let slow = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("{:x}\r\n{}\r\n", 16384, "z".repeat(16384));
                while tcp.write_all(chunk.as_bytes()).await.is_ok() {
                    counter.fetch_add(16384, Ordering::Relaxed);
                }
            });
        }
    });
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.60", 80, "http", &[primary.addr]);
    m.service("slow", "10.0.0.65", 80, "http", &[slow_addr]);
    m.route(
        "mirrored",
        "echo",
        80,
        "  - filters:\n    - {type: RequestMirror, requestMirror: {backendRef: {name: slow, port: 80}}}\n    backendRefs: [{name: echo, port: 80}]\n    timeouts: {request: 2s}\n",
    );
    let wp = TestWaypoint::start_with(&m.yaml(), |c| c.limits.max_mirrors_in_flight = 3).await;
    let shared = wp.running().shared.clone();
    let conn = wp.connect_as("default", "sleep").await;
    let mut http = TunnelHttp::open(&conn, "10.0.0.60:80").await.unwrap();
    for _ in 0..8 {
        let r = tokio::time::timeout(Duration::from_secs(2), http.get("echo", "/"))
            .await
            .expect("the primary is never held back by its mirror")
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let _ = wp.next_logs(8);
    assert!(
        shared.mirrors_in_flight.load(Ordering::Relaxed) <= 3,
        "in flight: {}",
        shared.mirrors_in_flight.load(Ordering::Relaxed)
    );
    assert_eq!(shared.mirrors_skipped.load(Ordering::Relaxed), 5);
    // The endless responses were being read (and dropped) ...
    let reading = eventually(Duration::from_secs(5), || {
        let n = streamed.load(Ordering::Relaxed);
        async move { (n > 4 << 20).then_some(n) }
    })
    .await;
    assert!(
        reading.is_some(),
        "mirror responses are drained as they stream"
    );
    // ... until the route timeout ends each copy.
    let done = eventually(Duration::from_secs(10), || {
        let n = shared.mirrors_in_flight.load(Ordering::Relaxed);
        async move { (n == 0).then_some(()) }
    })
    .await;
    assert!(done.is_some(), "mirror copies outlived the route timeout");
    let metrics = http_get(wp.running().metrics_addr, "/stats/prometheus")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("waypoint_mirrors_skipped_total 5"),
        "{metrics}"
    );
    slow.abort();
}
