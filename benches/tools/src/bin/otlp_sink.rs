//! The benchmark's trace collector: an OTLP/gRPC `TraceService/Export` server (the generated
//! tonic server of `opentelemetry-proto`) that accepts every export and counts spans. `GET
//! /spans` on the same port (HTTP/1.1) answers the count, so the bench can check that the
//! spans of a run arrived.
//!
//! Usage: otlp-sink --listen 127.0.0.1:29085

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:29085")]
    listen: SocketAddr,
}

#[derive(Clone, Default)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| r.scope_spans.iter())
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        anyhow::bail!("--listen {} is not on loopback", args.listen);
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let sink = Sink::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let sink = sink.clone();
        tokio::spawn(async move {
            let grpc = TraceServiceServer::new(sink.clone());
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut grpc = grpc.clone();
                    let count = sink.0.load(Ordering::Relaxed);
                    async move {
                        use tower::Service as _;
                        if req.uri().path() == "/spans" {
                            let body = Full::new(bytes::Bytes::from(format!("{count}\n")));
                            return Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Either::Right(body),
                            ));
                        }
                        let resp = match grpc.call(req).await {
                            Ok(r) => r,
                            Err(never) => match never {},
                        };
                        Ok(resp.map(http_body_util::Either::Left))
                    }
                });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
        });
    }
}
