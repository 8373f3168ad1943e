//! TLS configuration for HBONE, as ztunnel builds it (protocol.md 1.2, 2.2, 8):
//! TLS 1.3 only, AES-GCM suites only, ALPN `h2`, client certificate mandatory and chained to
//! the mesh root, peer SPIFFE identity in our trust domain; no SNI, no session resumption on
//! the client side.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::Error;
use crate::identity::{Identity, identities_in};

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// A workload's certificate material, as Istio mounts it (`cert-chain.pem`, `key.pem`,
/// `root-cert.pem`; protocol.md 5.2).
#[derive(Debug)]
pub struct CertBundle {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    /// The SPIFFE identity of our own leaf (first URI SAN that parses).
    pub identity: Identity,
}

impl Clone for CertBundle {
    fn clone(&self) -> Self {
        CertBundle {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            identity: self.identity.clone(),
        }
    }
}

impl CertBundle {
    /// Load `cert-chain.pem`, `key.pem` and `root-cert.pem` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<CertBundle, Error> {
        let err = |message: String| Error::Certificates {
            dir: dir.display().to_string(),
            message,
        };
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| err(format!("cannot read {name}: {e}")))
        };
        let chain_pem = read("cert-chain.pem")?;
        let key_pem = read("key.pem")?;
        let root_pem = read("root-cert.pem")?;
        CertBundle::from_pem(&chain_pem, &key_pem, &root_pem).map_err(|m| err(m.to_string()))
    }

    /// Parse PEM text for the chain, key and roots.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        root_pem: &[u8],
    ) -> Result<CertBundle, Error> {
        let other = |m: String| Error::Other(m);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| other(format!("cert-chain.pem: {e}")))?;
        if chain.is_empty() {
            return Err(other("cert-chain.pem holds no certificate".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| other(format!("key.pem: {e}")))?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(root_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| other(format!("root-cert.pem: {e}")))?;
        if roots.is_empty() {
            return Err(other("root-cert.pem holds no certificate".into()));
        }
        let identity = identities_in(&chain[0]).into_iter().next().ok_or_else(|| {
            other(
                "the leaf in cert-chain.pem has no SPIFFE URI SAN (spiffe://<td>/ns/<ns>/sa/<sa>)"
                    .into(),
            )
        })?;
        Ok(CertBundle {
            chain,
            key,
            roots,
            identity,
        })
    }

    /// Seconds since the Unix epoch at which our leaf expires.
    pub fn leaf_not_after(&self) -> Option<i64> {
        crate::identity::not_after_unix(&self.chain[0])
    }

    fn root_store(&self) -> Result<RootCertStore, Error> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| Error::Other(format!("root-cert.pem: {e}")))?;
        }
        Ok(store)
    }
}

/// rustls's aws-lc-rs provider restricted to ztunnel's suites: TLS13_AES_256_GCM_SHA384 and
/// TLS13_AES_128_GCM_SHA256, no ChaCha20 (ztunnel src/tls/lib.rs `provider`).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

/// Server config for the HBONE listener: TLS 1.3, ALPN h2, client cert required, chained to
/// our roots, with a SPIFFE URI SAN in `trust_domain` (ztunnel `TrustDomainVerifier`).
pub fn server_config(
    bundle: &CertBundle,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(bundle.root_store()?),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::Other(format!("client verifier: {e}")))?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(bundle.chain.clone(), bundle.key.clone_key())?;
    // HBONE is HTTP/2 only. Real Envoy does not insist on ALPN (protocol.md 8); we offer only
    // h2, and rustls then refuses a client that offers ALPN without h2 (no_application_protocol).
    // A client offering no ALPN at all still completes TLS and then must speak HTTP/2.
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every tunnel is authenticated by a full handshake, as in ztunnel.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Which server identities a client accepts.
#[derive(Debug, Clone)]
pub enum ExpectedServer {
    /// Exactly one of these identities (ztunnel `IdentityVerifier`: the waypoint's own SAN).
    AnyOf(Vec<Identity>),
    /// Any identity in this trust domain (Envoy's connect_originate SAN matcher, protocol.md 2.4).
    TrustDomain(String),
}

/// Client config for originating HBONE: our cert chain, ALPN h2, no SNI, server verified
/// against our roots and `expected` (DNS names are never used; protocol.md 1.2).
pub fn client_config(
    bundle: &CertBundle,
    expected: ExpectedServer,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: bundle.root_store()?,
        expected,
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(bundle.chain.clone(), bundle.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The server name handed to rustls by clients: ignored (no SNI, SAN checked by identity),
/// as ztunnel passes a dummy 0.0.0.0.
pub fn dummy_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// Client-certificate verifier: WebPKI chain validation, then "some URI SAN is a SPIFFE
/// identity in our trust domain" (ztunnel workload.rs `TrustDomainVerifier`). No per-identity
/// check here: identity-based authorization happens per request.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if identities_in(end_entity)
            .iter()
            .any(|id| *id.trust_domain == *self.trust_domain)
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server-certificate verifier for HBONE clients: chain to our roots, then the SAN check.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ids = identities_in(end_entity);
        let ok = match &self.expected {
            ExpectedServer::AnyOf(want) => ids.iter().any(|id| want.contains(id)),
            ExpectedServer::TrustDomain(td) => ids.iter().any(|id| *id.trust_domain == **td),
        };
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
