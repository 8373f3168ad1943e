//! gRPC message metrics (`istio_request_messages_total`, `istio_response_messages_total`)
//! through the waypoint, against a real gRPC server (tonic's streaming server codec): counted
//! per message each way, reported every `reportingInterval` while the stream is open and at
//! its end, under Istio's peer labels only.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use prost::Message;
use waypoint_tests::*;

#[derive(Clone, PartialEq, prost::Message)]
struct Chunk {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

/// Echoes every message of the client's stream as it arrives (bidirectional streaming).
#[derive(Clone)]
struct StreamEcho;

type ChunkStream = Pin<Box<dyn futures_util::Stream<Item = Result<Chunk, tonic::Status>> + Send>>;

impl tonic::server::StreamingService<Chunk> for StreamEcho {
    type Response = Chunk;
    type ResponseStream = ChunkStream;
    type Future = Pin<
        Box<
            dyn std::future::Future<Output = Result<tonic::Response<ChunkStream>, tonic::Status>>
                + Send,
        >,
    >;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Chunk>>) -> Self::Future {
        Box::pin(async move {
            let out: ChunkStream = Box::pin(request.into_inner());
            Ok(tonic::Response::new(out))
        })
    }
}

async fn grpc_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let mut grpc =
                            tonic::server::Grpc::new(
                                tonic_prost::ProstCodec::<Chunk, Chunk>::default(),
                            );
                        Ok::<_, Infallible>(grpc.streaming(StreamEcho, req).await)
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    addr
}

/// A request body fed from a channel (the client's side of the stream).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn framed(data: &[u8]) -> Bytes {
    let msg = Chunk {
        data: data.to_vec(),
    }
    .encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(&msg);
    b.freeze()
}

async fn messages(wp: &TestWaypoint) -> (u64, u64) {
    let sum = |v: Vec<(String, u64)>| v.iter().map(|(_, n)| n).sum::<u64>();
    (
        sum(wp.metric_series("istio_request_messages_total").await),
        sum(wp.metric_series("istio_response_messages_total").await),
    )
}

#[tokio::test]
async fn grpc_stream_messages_are_counted_each_way_and_reported_while_open() {
    let server = grpc_server().await;
    let mut m = Manifests::new();
    m.service("echo", "10.0.0.20", 9000, "grpc", &[server]);
    // A 1 s reporting interval (Istio's default is 5 s) for the stream's periodic report.
    m.push("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh, namespace: istio-system}\nspec:\n  metrics:\n  - providers: [{name: prometheus}]\n    reportingInterval: 1s\n");
    let wp = TestWaypoint::start(&m.yaml()).await;
    let conn = wp.connect_as("default", "sleep").await;
    let stream = conn
        .open("10.0.0.20:9000", http::HeaderMap::new())
        .await
        .unwrap();
    let (mut sender, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(driver);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://echo:9000/test.Echo/Stream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChannelBody(rx))
        .unwrap();
    tx.send(framed(b"one")).await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| d.len() == 10), "{first:?}");

    // The stream is still open: the first message each way is reported by the interval.
    let open = eventually(Duration::from_secs(10), || async {
        (messages(&wp).await == (1, 1)).then_some(())
    })
    .await;
    assert!(
        open.is_some(),
        "reported while open: {:?}",
        messages(&wp).await
    );
    assert!(
        wp.metric_series("istio_requests_total").await.is_empty(),
        "not finished yet"
    );

    // Two messages in one DATA frame, then the end of the client's stream.
    let mut two = BytesMut::new();
    two.extend_from_slice(&framed(b"two"));
    two.extend_from_slice(&framed(b"three"));
    tx.send(two.freeze()).await.unwrap();
    drop(tx);
    let mut echoed = 1;
    let mut status = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(d) = frame.data_ref() {
            echoed += count_messages(d);
        } else if let Some(t) = frame.trailers_ref() {
            status = t.get("grpc-status").cloned();
        }
    }
    assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"0"[..]));
    assert_eq!(echoed, 3);

    let done = eventually(Duration::from_secs(10), || async {
        (messages(&wp).await == (3, 3)).then_some(())
    })
    .await;
    assert!(done.is_some(), "{:?}", messages(&wp).await);
    let labels = wp.metric_series("istio_request_messages_total").await;
    assert_eq!(labels.len(), 1, "{labels:?}");
    let l = &labels[0].0;
    assert!(
        l.starts_with("reporter=\"waypoint\",source_workload="),
        "{l}"
    );
    assert!(
        l.ends_with("destination_cluster=\"unknown\""),
        "peer labels only: {l}"
    );
    assert!(l.contains("destination_service_name=\"echo\""), "{l}");
    let requests = wp.metric_series("istio_requests_total").await;
    assert!(
        requests.len() == 1
            && requests[0].0.contains("request_protocol=\"grpc\"")
            && requests[0].0.contains("grpc_response_status=\"0\""),
        "{requests:?}"
    );
}

/// Whole gRPC messages in one DATA frame.
fn count_messages(mut d: &[u8]) -> usize {
    let mut n = 0;
    while d.len() >= 5 {
        let len = u32::from_be_bytes([d[1], d[2], d[3], d[4]]) as usize;
        d = &d[(5 + len).min(d.len())..];
        n += 1;
    }
    n
}
