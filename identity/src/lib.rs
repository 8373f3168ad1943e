//! # identity: the waypoint's workload certificate from istiod's CA
//!
//! Contract:
//! - [`CaClient::fetch`] generates a fresh ECDSA P-256 key in memory (never written to disk),
//!   sends a CSR for our SPIFFE identity to `CreateCertificate` of
//!   `istio.v1.auth.IstioCertificateService` (istio/api `security/v1alpha1/ca.proto`) over
//!   TLS verified against the mesh root (`/var/run/secrets/istio/root-cert.pem`), with the
//!   projected service-account token as `authorization: Bearer` and the cluster as
//!   `ClusterID` metadata, as pilot-agent and ztunnel do (ztunnel `src/identity/caclient.rs`).
//!   The root file and the token are re-read on every call: kubelet rotates the token and the
//!   root ConfigMap can change.
//! - The CA decides the identity (istiod issues the token's service account whatever the CSR
//!   asks); the returned leaf must still carry a SPIFFE URI SAN, or the answer is an error.
//! - [`rotate`] renews at half the certificate's lifetime with ±1% jitter (Istio's
//!   `SECRET_GRACE_PERIOD_RATIO` 0.5 and its jitter), keeps the current certificate on
//!   failure and retries with capped, jittered back-off. Whoever receives the new bundle
//!   swaps it for new connections; established ones keep theirs.
//! - Never panics on any answer from the CA: every failure is a [`CaError`].

#[cfg(feature = "testing")]
pub mod testing;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use hbone::tls::CertBundle;
use tracing::{info, warn};

/// `IstioCertificateRequest` (ca.proto): `csr = 1`, `validity_duration = 3` (seconds).
/// Field 4 (`metadata`, a Struct used by istiod for impersonation from a trusted node agent)
/// is not sent, as ztunnel does not send it for its own identity.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// `IstioCertificateResponse` (ca.proto): `repeated string cert_chain = 1`, PEM, leaf first
/// and root last (since Istio 1.26 one certificate per element; older CAs may put several
/// PEM blocks in one element, which parses the same).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The gRPC method path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// How to reach the CA and what to ask for.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// `host:port` (`CA_ADDR`, `istiod.istio-system.svc:15012`). The host is the TLS name
    /// checked on istiod's certificate.
    pub addr: String,
    /// PEM roots the CA's serving certificate must chain to; also the mesh roots we trust.
    pub root_cert: PathBuf,
    /// The projected service-account token (audience `istio-ca`).
    pub token: PathBuf,
    /// `ISTIO_META_CLUSTER_ID` (`Kubernetes` by default), sent as `ClusterID` metadata.
    pub cluster_id: String,
    /// The identity asked for in the CSR (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub identity: String,
    /// Requested lifetime (`SECRET_TTL`, 24 h).
    pub ttl: Duration,
    /// Bound on one call (connect, TLS, answer).
    pub timeout: Duration,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("CA address {0:?} is not host:port")]
    Address(String),
    #[error("cannot build the CSR: {0}")]
    Csr(String),
    #[error("cannot reach the CA at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the CA refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the CA's answer is unusable: {0}")]
    Answer(String),
}

/// A client for istiod's CA. Holds no connection: each call dials afresh (a call every
/// 12 hours needs no pool, and the roots are re-read each time).
#[derive(Debug, Clone)]
pub struct CaClient {
    pub settings: CaSettings,
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl CaClient {
    pub fn new(settings: CaSettings) -> CaClient {
        CaClient { settings }
    }

    /// One CSR round trip: a new key, a certificate for it, the mesh roots.
    pub async fn fetch(&self) -> Result<CertBundle, CaError> {
        let s = &self.settings;
        let root_pem = read("the CA root", &s.root_cert)?;
        let token = read("the service-account token", &s.token)?;
        let token = String::from_utf8_lossy(&token).trim().to_string();
        let host = s
            .addr
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| CaError::Address(s.addr.clone()))?;

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        let uri = s
            .identity
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Csr(e.to_string()))?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| CaError::Csr(e.to_string()))?;

        let connect = |message: String| CaError::Connect {
            addr: s.addr.clone(),
            message,
        };
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&root_pem))
            .domain_name(host);
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", s.addr))
            .map_err(|e| connect(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| connect(e.to_string()))?
            .connect_timeout(s.timeout)
            .timeout(s.timeout)
            .connect()
            .await
            .map_err(|e| connect(source_chain(&e)))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| connect(e.to_string()))?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: s.ttl.as_secs() as i64,
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CaError::Csr("the token is not valid header text".into()))?;
        request.metadata_mut().insert("authorization", bearer);
        if let Ok(v) = s.cluster_id.parse() {
            request.metadata_mut().insert("clusterid", v);
        }
        let codec =
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let answer = grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
                codec,
            )
            .await
            .map_err(|status| CaError::Refused {
                code: status.code(),
                message: status.message().to_string(),
            })?
            .into_inner();

        // Leaf first, root last: everything but a trailing root is our chain.
        let mut chain: Vec<&str> = answer.cert_chain.iter().map(String::as_str).collect();
        if chain.is_empty() {
            return Err(CaError::Answer("empty cert_chain".into()));
        }
        if chain.len() > 1 {
            chain.pop();
        }
        let chain_pem = chain.join("\n");
        CertBundle::from_pem(
            chain_pem.as_bytes(),
            key.serialize_pem().as_bytes(),
            &root_pem,
        )
        .map_err(|e| CaError::Answer(e.to_string()))
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// When to renew a certificate valid from `issued` (when we received it) to `not_after`:
/// at half its remaining lifetime, ±1%.
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    let jitter: f64 = rand::random_range(-0.01..=0.01);
    issued + life.mul_f64((0.5 + jitter).clamp(0.0, 1.0))
}

/// Keep the certificate fresh: sleep until [`renew_at`], fetch, hand the new bundle to
/// `install`; on failure keep the current one and retry with back-off (1 s doubling to
/// 5 min, ±20%), never later than the certificate's expiry allows. Runs until aborted.
pub async fn rotate(client: CaClient, current_not_after: i64, install: impl Fn(CertBundle)) {
    let mut not_after = unix_to_time(current_not_after);
    let mut issued = SystemTime::now();
    loop {
        let at = renew_at(issued, not_after);
        if let Ok(wait) = at.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            match client.fetch().await {
                Ok(bundle) => {
                    issued = SystemTime::now();
                    not_after = bundle
                        .leaf_not_after()
                        .map(unix_to_time)
                        .unwrap_or(issued + client.settings.ttl);
                    info!(identity = %bundle.identity, "certificate renewed by the CA");
                    install(bundle);
                    break;
                }
                Err(e) => {
                    warn!(retry_in = ?backoff, "certificate renewal failed; keeping the current certificate: {e}");
                    let jitter: f64 = rand::random_range(0.8..=1.2);
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        }
    }
}

fn unix_to_time(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_within_jitter() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = issued + Duration::from_secs(24 * 3600);
        for _ in 0..100 {
            let at = renew_at(issued, not_after)
                .duration_since(issued)
                .expect("after issue")
                .as_secs_f64();
            assert!((0.49 * 86400.0..=0.51 * 86400.0).contains(&at), "{at}");
        }
        // Already expired: renew now.
        assert_eq!(renew_at(not_after, issued), not_after);
    }

    #[test]
    fn messages_use_ca_proto_field_numbers() {
        use prost::Message as _;
        let req = IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 3600,
        };
        // field 1 (string, wire type 2) = 0x0a; field 3 (varint) = 0x18.
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'x', 0x18, 0x90, 0x1c]);
        let resp =
            IstioCertificateResponse::decode(&[0x0a, 1, b'a', 0x0a, 1, b'b'][..]).expect("decodes");
        assert_eq!(resp.cert_chain, ["a", "b"]);
    }
}
