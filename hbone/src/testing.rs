//! Test PKI: a mesh root CA issuing SPIFFE workload certificates with rcgen, as ztunnel's
//! src/tls/mock.rs does. Real certificates, real signatures; nothing is mocked.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;
use crate::identity::Identity;
use crate::tls::CertBundle;

/// A calendar date (year, month, day) for certificate validity.
pub type Ymd = (i32, u8, u8);

/// A mesh root CA for one trust domain.
pub struct Pki {
    pub trust_domain: String,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_pem: String,
}

fn rc(e: rcgen::Error) -> Error {
    Error::Other(format!("rcgen: {e}"))
}

impl Pki {
    /// A new self-signed root (EC P-256) for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Pki, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Test Mesh Root CA ({trust_domain})"),
        );
        dn.push(DnType::OrganizationName, "waypoint-tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().map_err(rc)?;
        let ca_cert = params.self_signed(&ca_key).map_err(rc)?;
        Ok(Pki {
            trust_domain: trust_domain.to_string(),
            ca_pem: ca_cert.pem(),
            ca_params: params,
            ca_key,
        })
    }

    /// PEM of the root certificate.
    pub fn root_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issue a leaf for `spiffe://<td>/ns/<ns>/sa/<sa>` (server + client auth, leaf-only chain,
    /// as ztunnel presents it).
    pub fn issue(&self, namespace: &str, service_account: &str) -> Result<CertBundle, Error> {
        let id = Identity::new(&self.trust_domain, namespace, service_account);
        self.issue_uri(&id.to_string())
    }

    /// Issue a leaf with an arbitrary URI SAN (for negative tests).
    pub fn issue_uri(&self, uri: &str) -> Result<CertBundle, Error> {
        let (chain_pem, key_pem) = self.issue_pem(uri)?;
        CertBundle::from_pem(
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            self.ca_pem.as_bytes(),
        )
    }

    /// Issue a leaf and return (cert-chain PEM, key PEM).
    pub fn issue_pem(&self, uri: &str) -> Result<(String, String), Error> {
        self.issue_pem_valid(uri, None)
    }

    /// Like [`Pki::issue_pem`], valid only between the two dates (year, month, day) if given.
    pub fn issue_pem_valid(
        &self,
        uri: &str,
        validity: Option<(Ymd, Ymd)>,
    ) -> Result<(String, String), Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "waypoint-tests");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(rc)?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if let Some(((y1, m1, d1), (y2, m2, d2))) = validity {
            params.not_before = rcgen::date_time_ymd(y1, m1, d1);
            params.not_after = rcgen::date_time_ymd(y2, m2, d2);
        }
        let key = KeyPair::generate().map_err(rc)?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(rc)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Sign a PEM CSR the way istiod's CA does: the signature is checked, but the identity is
    /// the one given (istiod takes it from the caller's token), never the SANs the CSR asks
    /// for. Valid from now for `ttl`. Returns the leaf PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        uri: &str,
        ttl: std::time::Duration,
    ) -> Result<String, Error> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(rc)?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(rc)?)];
        csr.params.distinguished_name = DistinguishedName::new();
        csr.params.is_ca = IsCa::NoCa;
        csr.params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.params.not_before = now - time::Duration::seconds(1);
        csr.params.not_after = now + ttl;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        Ok(csr.signed_by(&issuer).map_err(rc)?.pem())
    }

    /// Issue a plain TLS server certificate for an IP address (IP SAN), e.g. for an HTTPS
    /// JWKS endpoint on 127.0.0.1 in tests. Returns (cert-chain PEM, key PEM).
    pub fn issue_server_pem_for_ip(&self, ip: std::net::IpAddr) -> Result<(String, String), Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(rc)?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(rc)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issue a plain TLS server certificate for a DNS name (DNS SAN), e.g. for an HTTPS
    /// backend the waypoint originates TLS to. Returns (cert-chain PEM, key PEM).
    pub fn issue_server_pem_for_dns(&self, name: &str) -> Result<(String, String), Error> {
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(rc)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(rc)?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(rc)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A TLS server configuration (no client auth) for an HTTPS stand-in on `ip` with a
    /// certificate from this CA: the in-test API server, istiod's CA, a JWKS endpoint.
    pub fn server_tls_for_ip(&self, ip: std::net::IpAddr) -> Result<rustls::ServerConfig, Error> {
        let (cert, key) = self.issue_server_pem_for_ip(ip)?;
        Ok(
            rustls::ServerConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(vec![cert_from_pem(&cert)?], key_from_pem(&key)?)?,
        )
    }

    /// Write Istio's file-mounted names (`cert-chain.pem`, `key.pem`, `root-cert.pem`) for
    /// `spiffe://<td>/ns/<ns>/sa/<sa>` into `dir`.
    pub fn write_dir(
        &self,
        dir: &Path,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), Error> {
        let id = Identity::new(&self.trust_domain, namespace, service_account);
        let (chain, key) = self.issue_pem(&id.to_string())?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("cert-chain.pem"), chain)?;
        std::fs::write(dir.join("key.pem"), key)?;
        std::fs::write(dir.join("root-cert.pem"), &self.ca_pem)?;
        Ok(())
    }

    /// Write PEM files named `<name>-cert.pem` / `<name>-key.pem` (for external peers such as Envoy).
    pub fn write_named(
        &self,
        dir: &Path,
        name: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), Error> {
        let id = Identity::new(&self.trust_domain, namespace, service_account);
        let (chain, key) = self.issue_pem(&id.to_string())?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{name}-cert.pem")), chain)?;
        std::fs::write(dir.join(format!("{name}-key.pem")), key)?;
        Ok(())
    }
}

/// Parse a PEM certificate (helper for tests).
pub fn cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, Error> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Other(e.to_string()))
}

/// Parse a PEM key (helper for tests).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Other(e.to_string()))
}
