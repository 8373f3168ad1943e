//! TLS origination to a cluster's plaintext endpoints (DestinationRule `tls.mode` SIMPLE or
//! MUTUAL; policy/src/traffic.rs has the settings), as Envoy's `UpstreamTlsContext` from
//! istiod does it: SNI from `sni` (else the Service's hostname), the server certificate
//! verified against `caCertificates` (else the system's roots) and, when
//! `subjectAltNames` is set, required to carry one of them (else the SNI); a client
//! certificate for MUTUAL; `insecureSkipVerify` skips verification.
//!
//! The certificates come from the files, or from a `credentialName` Secret in the waypoint's
//! namespace (found when compiling). The rustls configuration is built once per compiled
//! rule (files read then); a file that cannot be read or a Secret that is missing makes every
//! connection fail with the reason in `%UPSTREAM_TRANSPORT_FAILURE_REASON%`
//! (`TLS_error:...`), never a plaintext connection.

use std::sync::Arc;

use policy::traffic::TlsOrigination;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::UpstreamFailure;

fn failure(detail: String) -> UpstreamFailure {
    UpstreamFailure::Connect {
        timeout: false,
        detail: format!("TLS_error:{detail}"),
    }
}

/// The client configuration of `t`, built on first use.
pub fn client_config(t: &TlsOrigination) -> Result<Arc<rustls::ClientConfig>, UpstreamFailure> {
    let built = t
        .client_config
        .get_or_init(|| build(t).map(|c| Arc::new(c) as Arc<dyn std::any::Any + Send + Sync>));
    match built {
        Ok(any) => any
            .clone()
            .downcast::<rustls::ClientConfig>()
            .map_err(|_| failure("internal: not a TLS client configuration".into())),
        Err(e) => Err(failure(e.clone())),
    }
}

fn pem_certs(pem: &[u8], from: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(format!("no PEM certificate in {from}"));
    }
    Ok(certs)
}

fn pem_key(pem: &[u8], from: &str) -> Result<rustls_pki_types::PrivateKeyDer<'static>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no private key in {from}: {e}"))
}

/// Where the certificates come from: the files, or the `credentialName` Secret.
struct Material {
    /// PEM roots and where they came from; `None`: the system's roots.
    roots: Option<(Vec<u8>, String)>,
    /// Client certificate chain and key (PEM), with where they came from.
    client: Option<(Vec<u8>, Vec<u8>, String)>,
}

fn material(t: &TlsOrigination) -> Result<Material, String> {
    if let Some(name) = &t.credential_name {
        let c = match &t.credential {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(format!("credentialName {name}: not resolved")),
        };
        let from = format!("Secret {name}");
        return Ok(Material {
            roots: c.ca.clone().map(|ca| (ca, from.clone())),
            client: match (&c.cert_chain, &c.private_key) {
                (Some(cert), Some(key)) if t.mutual => Some((cert.clone(), key.clone(), from)),
                _ => None,
            },
        });
    }
    let roots = match &t.ca_certificates {
        Some(path) => Some((
            std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?,
            path.clone(),
        )),
        None => None,
    };
    let client = match (&t.client_certificate, &t.private_key) {
        (Some(cert), Some(key)) if t.mutual => Some((
            std::fs::read(cert).map_err(|e| format!("cannot read {cert}: {e}"))?,
            std::fs::read(key).map_err(|e| format!("cannot read {key}: {e}"))?,
            format!("{cert} and {key}"),
        )),
        _ => None,
    };
    Ok(Material { roots, client })
}

fn build(t: &TlsOrigination) -> Result<rustls::ClientConfig, String> {
    // The process's one crypto provider (aws-lc-rs), as for HBONE.
    let provider = hbone::tls::provider();
    let m = material(t)?;
    let mut roots = rustls::RootCertStore::empty();
    match &m.roots {
        Some((pem, from)) => {
            for c in pem_certs(pem, from)? {
                roots
                    .add(c)
                    .map_err(|e| format!("bad CA certificate in {from}: {e}"))?;
            }
        }
        None => {
            let (_, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("CA certificates: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = Arc::new(Verifier {
        inner: webpki,
        names: t.subject_alt_names.clone(),
        skip: t.insecure_skip_verify,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    if t.mutual {
        let Some((cert, key, from)) = &m.client else {
            return Err("MUTUAL without a client certificate and key".into());
        };
        builder
            .with_client_auth_cert(pem_certs(cert, from)?, pem_key(key, from)?)
            .map_err(|e| format!("client certificate: {e}"))
    } else {
        Ok(builder.with_no_client_auth())
    }
}

/// Chain verification by webpki; the name checked is one of `subjectAltNames` when given
/// (any may match), else the SNI; or nothing at all with `insecureSkipVerify`.
#[derive(Debug)]
struct Verifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<String>,
    skip: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.skip {
            return Ok(ServerCertVerified::assertion());
        }
        if self.names.is_empty() {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        let mut last = rustls::Error::General("no subjectAltNames".into());
        for n in &self.names {
            let Ok(name) = ServerName::try_from(n.as_str()) else {
                continue;
            };
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    // Handshake signatures: webpki's own checks, whatever the name policy.
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

/// Originate TLS on `tcp` for `t`, to `hostname` unless the rule names an SNI.
pub async fn connect(
    tcp: tokio::net::TcpStream,
    t: &TlsOrigination,
    hostname: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, UpstreamFailure> {
    let config = client_config(t)?;
    let sni = t.sni.as_deref().unwrap_or(hostname);
    let name = ServerName::try_from(sni.to_string())
        .map_err(|_| failure(format!("{sni:?} is not a server name")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| failure(e.to_string().replace(' ', "_")))
}
