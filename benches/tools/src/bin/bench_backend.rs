//! `bench-backend`: a fast local HTTP/1.1 backend for the benchmarks. One listener per
//! `--listen [NAME=]ADDR`; every request is read to the end and answered `200` with body
//! `<name>\n`, header `x-backend: <name>` and `x-request-body-bytes: <n>` (the request body size
//! it received). A request with `x-response-bytes: <n>` (at most 16 MiB) gets a body of exactly
//! `n` bytes instead: `<name>\n` repeated and cut at `n`. Keep-alive, no logging, loopback only
//! unless --allow-remote. `--tls-listen [NAME=]ADDR` listeners serve the same over TLS
//! (`--tls-cert`/`--tls-key`), the HTTPS backend of the TLS origination scenario.
//! `--grpc-listen [NAME=]ADDR` listeners speak gRPC over h2c: every call's request messages are
//! read to the end and echoed back as its response messages, with `x-backend: <name>` and
//! the trailer `grpc-status: 0` (unary and streaming calls alike).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "bench-backend",
    about = "Fast HTTP/1.1 backend for the waypoint benchmarks"
)]
struct Args {
    /// `ADDR` or `NAME=ADDR`; repeatable (one listener each).
    #[arg(long)]
    listen: Vec<String>,
    /// `ADDR` or `NAME=ADDR`, served over TLS with --tls-cert and --tls-key; repeatable.
    #[arg(long)]
    tls_listen: Vec<String>,
    /// `ADDR` or `NAME=ADDR`: a gRPC (h2c) echo listener; repeatable.
    #[arg(long)]
    grpc_listen: Vec<String>,
    /// PEM certificate chain of the TLS listeners.
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the TLS listeners.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long)]
    allow_remote: bool,
}

struct Backend {
    name: HeaderValue,
    body: Bytes,
    /// `body` repeated to [`MAX_RESPONSE_BYTES`], made on the first `x-response-bytes`
    /// request; responses are slices of it (no copy per request).
    large: std::sync::OnceLock<Bytes>,
}

/// The largest body `x-response-bytes` may ask for.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

impl Backend {
    fn body_of(&self, n: usize) -> Bytes {
        let large = self.large.get_or_init(|| {
            let pattern = &self.body[..];
            Bytes::from(
                pattern
                    .iter()
                    .copied()
                    .cycle()
                    .take(MAX_RESPONSE_BYTES)
                    .collect::<Vec<u8>>(),
            )
        });
        large.slice(..n.min(large.len()))
    }
}

async fn handle(
    b: Arc<Backend>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let sized = req
        .headers()
        .get("x-response-bytes")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n <= MAX_RESPONSE_BYTES);
    let mut body = req.into_body();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    n += d.len();
                }
            }
            Err(_) => break,
        }
    }
    let out = match sized {
        Some(n) => b.body_of(n),
        None => b.body.clone(),
    };
    let mut resp = Response::new(Full::new(out));
    let h = resp.headers_mut();
    h.insert("x-backend", b.name.clone());
    h.insert("x-request-body-bytes", HeaderValue::from(n));
    Ok(resp)
}

/// A gRPC response body: the echoed messages, then the `grpc-status: 0` trailer.
struct GrpcEcho {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl hyper::body::Body for GrpcEcho {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let frame = match (self.data.take(), self.trailers.take()) {
            (Some(d), t) => {
                self.trailers = t;
                Some(hyper::body::Frame::data(d))
            }
            (None, Some(t)) => Some(hyper::body::Frame::trailers(t)),
            (None, None) => None,
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

async fn handle_grpc(
    b: Arc<Backend>,
    req: Request<Incoming>,
) -> Result<Response<GrpcEcho>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut resp = Response::new(GrpcEcho {
        data: (!body.is_empty()).then_some(body),
        trailers: Some(trailers),
    });
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("x-backend", b.name.clone());
    Ok(resp)
}

/// TLS (aws-lc-rs, the project's one provider) from PEM files.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What a listener speaks.
#[derive(Clone)]
enum Listen {
    /// HTTP/1.1.
    Plain,
    /// HTTP/1.1 over TLS.
    Tls(tokio_rustls::TlsAcceptor),
    /// gRPC over h2c (the echo of [`handle_grpc`]).
    Grpc,
}

async fn serve(listener: TcpListener, backend: Arc<Backend>, listen: Listen) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("bench-backend: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let backend = backend.clone();
        let listen = listen.clone();
        tokio::spawn(async move {
            if let Listen::Grpc = listen {
                let svc = hyper::service::service_fn(move |req| handle_grpc(backend.clone(), req));
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                return;
            }
            let svc = hyper::service::service_fn(move |req| handle(backend.clone(), req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            match listen {
                Listen::Plain | Listen::Grpc => {
                    let _ = builder
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                }
                Listen::Tls(acceptor) => {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = builder
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
            }
        });
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.listen.is_empty() && args.tls_listen.is_empty() && args.grpc_listen.is_empty() {
        bail!("give at least one --listen, --tls-listen or --grpc-listen");
    }
    let acceptor = if args.tls_listen.is_empty() {
        None
    } else {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            bail!("--tls-listen needs --tls-cert and --tls-key");
        };
        Some(tls_acceptor(cert, key)?)
    };
    let mut specs = Vec::new();
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Plain,
        Tls,
        Grpc,
    }
    let plain = args.listen.iter().map(|l| (l, Kind::Plain));
    let secure = args.tls_listen.iter().map(|l| (l, Kind::Tls));
    let grpc = args.grpc_listen.iter().map(|l| (l, Kind::Grpc));
    for (l, kind) in plain.chain(secure).chain(grpc) {
        let (name, addr) = match l.split_once('=') {
            Some((n, a)) => (n.to_string(), a),
            None => (String::new(), l.as_str()),
        };
        let addr: SocketAddr = addr.parse().with_context(|| format!("--listen {l:?}"))?;
        if !addr.ip().is_loopback() && !args.allow_remote {
            bail!("--listen {addr}: not a loopback address (pass --allow-remote if you mean it)");
        }
        let name = if name.is_empty() {
            format!("backend-{}", addr.port())
        } else {
            name
        };
        specs.push((name, addr, kind));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for (name, addr, kind) in specs {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            eprintln!("bench-backend: {name} on {}", listener.local_addr()?);
            let backend = Arc::new(Backend {
                name: HeaderValue::from_str(&name)?,
                body: Bytes::from(format!("{name}\n")),
                large: std::sync::OnceLock::new(),
            });
            let listen = match kind {
                Kind::Grpc => Listen::Grpc,
                Kind::Tls => Listen::Tls(acceptor.clone().context("--tls-listen needs a TLS acceptor")?),
                Kind::Plain => Listen::Plain,
            };
            tasks.push(tokio::spawn(serve(listener, backend, listen)));
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                term.recv().await;
                Ok::<_, std::io::Error>(())
            } => {}
        }
        for t in tasks {
            t.abort();
        }
        Ok::<_, anyhow::Error>(())
    })
}
