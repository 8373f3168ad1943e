//! SPIFFE workload identities (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`),
//! parsed strictly as ztunnel does (src/identity/manager.rs: extra path segments are rejected).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

/// A workload identity. Cheap to clone (shared strings).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why a string is not a SPIFFE workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SPIFFE workload identity (spiffe://<td>/ns/<ns>/sa/<sa>): {0:?}")]
pub struct IdentityParseError(pub String);

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdentityParseError(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        if td.is_empty() || ns.is_empty() || sa.is_empty() {
            return Err(err());
        }
        Ok(Identity::new(td, ns, sa))
    }
}

/// Every URI SAN of a certificate that parses as a SPIFFE identity (ztunnel certificate.rs
/// `identities`: only URI SANs count; DNS names are ignored).
pub fn identities_in(cert: &CertificateDer<'_>) -> Vec<Identity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.parse::<Identity>().ok(),
            _ => None,
        })
        .collect()
}

/// Certificate expiry (`notAfter`) as seconds since the Unix epoch.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_workload_identity() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(&*id.trust_domain, "cluster.local");
        assert_eq!(&*id.namespace, "default");
        assert_eq!(&*id.service_account, "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn rejects_extra_or_missing_segments() {
        for bad in [
            "spiffe://cluster.local/ns/default/sa/sleep/extra",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/sa/x/ns/y",
            "http://cluster.local/ns/default/sa/sleep",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns//sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} must not parse");
        }
    }
}
