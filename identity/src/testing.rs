//! (feature `testing`) An in-test istiod CA: `istio.v1.auth.IstioCertificateService/CreateCertificate` (istio/api
//! `security/v1alpha1/ca.proto`, the messages in the `identity` crate) served by tonic's
//! server codec over HTTP/2 and TLS, as istiod serves it on 15012. Like istiod it checks the
//! bearer token and issues the identity of the token's service account, whatever SANs the CSR
//! asks for; lifetimes are capped (istiod's `MAX_WORKLOAD_CERT_TTL`). It can be taken down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fixture: a broken fixture is a failed test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{IstioCertificateRequest, IstioCertificateResponse};
use tokio::net::TcpListener;

pub struct IstioCa {
    pub addr: SocketAddr,
    pub issued: Arc<AtomicU64>,
    pub down: Arc<AtomicBool>,
    /// What the last request carried: (authorization, clusterid, requested validity).
    pub last: Arc<Mutex<Option<(String, String, i64)>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for IstioCa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Signer {
    pki: Arc<hbone::testing::Pki>,
    /// token -> (namespace, service account), as a TokenReview would answer.
    tokens: Arc<HashMap<String, (String, String)>>,
    max_ttl: Duration,
    issued: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    last: Arc<Mutex<Option<(String, String, i64)>>>,
}

impl tonic::server::UnaryService<IstioCertificateRequest> for Signer {
    type Response = IstioCertificateResponse;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>,
                > + Send,
        >,
    >;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if this.down.load(Ordering::Relaxed) {
                return Err(tonic::Status::unavailable("CA down for the test"));
            }
            let md = request.metadata();
            let auth = md
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let cluster = md
                .get("clusterid")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let req = request.into_inner();
            *this.last.lock().unwrap() = Some((auth.clone(), cluster, req.validity_duration));
            let Some((ns, sa)) = auth
                .strip_prefix("Bearer ")
                .and_then(|t| this.tokens.get(t.trim()))
            else {
                return Err(tonic::Status::unauthenticated(
                    "request authenticate failure",
                ));
            };
            let ttl = Duration::from_secs(req.validity_duration.max(1) as u64).min(this.max_ttl);
            let uri = format!("spiffe://{}/ns/{ns}/sa/{sa}", this.pki.trust_domain);
            let leaf = this
                .pki
                .sign_csr(&req.csr, &uri, ttl)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            this.issued.fetch_add(1, Ordering::Relaxed);
            Ok(tonic::Response::new(IstioCertificateResponse {
                cert_chain: vec![leaf, this.pki.root_pem().to_string()],
            }))
        })
    }
}

impl IstioCa {
    /// Serve on 127.0.0.1 with a certificate for that IP signed by the mesh root.
    pub async fn start(
        pki: Arc<hbone::testing::Pki>,
        tokens: &[(&str, &str, &str)],
        max_ttl: Duration,
    ) -> IstioCa {
        let mut tls = pki.server_tls_for_ip("127.0.0.1".parse().unwrap()).unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let signer = Signer {
            pki,
            tokens: Arc::new(
                tokens
                    .iter()
                    .map(|(t, ns, sa)| (t.to_string(), (ns.to_string(), sa.to_string())))
                    .collect(),
            ),
            max_ttl,
            issued: Arc::default(),
            down: Arc::default(),
            last: Arc::default(),
        };
        let (issued, down, last) = (
            signer.issued.clone(),
            signer.down.clone(),
            signer.last.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, signer) = (acceptor.clone(), signer.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let signer = signer.clone();
                            async move {
                                if req.uri().path() != crate::CREATE_CERTIFICATE {
                                    return Ok::<_, std::convert::Infallible>(
                                        tonic::Status::unimplemented("unknown method").into_http(),
                                    );
                                }
                                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                                    IstioCertificateResponse,
                                    IstioCertificateRequest,
                                >::default(
                                ));
                                Ok(grpc.unary(signer, req).await)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        })
        .abort_handle();
        IstioCa {
            addr,
            issued,
            down,
            last,
            task,
        }
    }
}
