//! RequestAuthentication validation (Istio `validateJwtRule`), translation into
//! [`JwtProvider`]s (istiod `convertToEnvoyJwtConfig`) and attachment to this waypoint (the same
//! `targetRefs` rules as AuthorizationPolicy).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::{
    AuthnSet, DEFAULT_JWKS_TIMEOUT, DEFAULT_SPACE_DELIMITED, Jwks, JwksRef, JwksSource,
    JwtProvider, sanitize_audience,
};
use crate::ConfigError;
use crate::authz::{Attached, TargetIndex, Targets, attach};
use crate::resources::{JwtRule, RequestAuthentication};
use crate::snapshot::CompileOptions;

const KIND: &str = "RequestAuthentication";

/// RequestAuthentications attached to this waypoint: waypoint-wide and per Service (merged
/// with the waypoint-wide ones), like [`crate::authz`]'s index.
#[derive(Debug, Default)]
pub(crate) struct AuthnIndex {
    pub(crate) waypoint: AuthnSet,
    pub(crate) by_service: HashMap<Arc<str>, HashMap<Arc<str>, AuthnSet>>,
    /// Every remote key set an attached rule needs, sorted.
    pub(crate) remote_jwks: Vec<JwksRef>,
    /// `<namespace>/<name>` of every attached RequestAuthentication, sorted.
    pub(crate) policies: Vec<Arc<str>>,
}

impl AuthnIndex {
    pub(crate) fn for_service(&self, namespace: &str, name: &str) -> AuthnSet {
        self.by_service
            .get(namespace)
            .and_then(|m| m.get(name))
            .unwrap_or(&self.waypoint)
            .clone()
    }
}

/// Validate and compile every RequestAuthentication; attach those whose `targetRefs` reach
/// this waypoint.
pub(crate) fn compile_request_authentications(
    policies: &[&RequestAuthentication],
    opts: &CompileOptions,
    service_exists: &TargetIndex<'_>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> AuthnIndex {
    let mut waypoint: Vec<Arc<JwtProvider>> = Vec::new();
    let mut by_service: BTreeMap<(String, String), Vec<Arc<JwtProvider>>> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for p in policies {
        let targets = Targets {
            selector: p.spec.selector.is_some(),
            target_ref: p.spec.target_ref.as_ref(),
            target_refs: &p.spec.target_refs,
        };
        let attached = attach(
            KIND,
            &p.metadata,
            &targets,
            opts,
            service_exists,
            errors,
            warnings,
        );
        // As for AuthorizationPolicy: policies without targetRefs are for ztunnel and
        // sidecars and are not validated here.
        if matches!(attached, Attached::Ignored) {
            continue;
        }
        let before = errors.len();
        let id: Arc<str> = format!("{}/{}", p.metadata.namespace, p.metadata.name).into();
        let providers: Vec<Arc<JwtProvider>> = p
            .spec
            .jwt_rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                let mut err = |field: &str, message: String| {
                    errors.push(ConfigError {
                        kind: KIND.into(),
                        namespace: p.metadata.namespace.clone(),
                        name: p.metadata.name.clone(),
                        field: format!("spec.jwtRules[{i}]{field}"),
                        message,
                    })
                };
                provider(&id, rule, &mut err).map(Arc::new)
            })
            .collect();
        let Attached::To(attachment) = attached else {
            continue;
        };
        if errors.len() > before {
            continue;
        }
        names.insert(id.clone());
        if attachment.waypoint {
            waypoint.extend(providers.iter().cloned());
        }
        for svc in attachment.services {
            by_service
                .entry((p.metadata.namespace.clone(), svc))
                .or_default()
                .extend(providers.iter().cloned());
        }
    }
    let remote_jwks: BTreeSet<JwksRef> = waypoint
        .iter()
        .chain(by_service.values().flatten())
        .filter_map(|p| match &p.jwks {
            JwksSource::Remote(r) => Some(r.clone()),
            JwksSource::Inline(_) => None,
        })
        .collect();
    let mut index = AuthnIndex {
        waypoint: AuthnSet::new(waypoint.clone()),
        by_service: HashMap::new(),
        remote_jwks: remote_jwks.into_iter().collect(),
        policies: names.into_iter().collect(),
    };
    for ((ns, name), attached) in by_service {
        let mut set = waypoint.clone();
        set.extend(attached);
        index
            .by_service
            .entry(ns.into())
            .or_default()
            .insert(name.into(), AuthnSet::new(set));
    }
    index
}

/// Istio `validateJwtRule` plus what Envoy needs to accept the provider; `None` when invalid.
fn provider(
    policy: &Arc<str>,
    rule: &JwtRule,
    err: &mut dyn FnMut(&str, String),
) -> Option<JwtProvider> {
    let mut ok = true;
    let mut fail = |field: &str, message: String| {
        ok = false;
        err(field, message);
    };
    if rule.issuer.is_empty() {
        fail(".issuer", "issuer must be set".into());
    }
    for (i, a) in rule.audiences.iter().enumerate() {
        if a.is_empty() {
            fail(
                &format!(".audiences[{i}]"),
                "audience must be non-empty string".into(),
            );
        }
    }
    if !rule.jwks_uri.is_empty() && !rule.jwks.is_empty() {
        fail(".jwks", "only one of jwks or jwksUri can be set".into());
    }
    if !rule.jwks_uri.is_empty()
        && let Err(m) = validate_uri(&rule.jwks_uri)
    {
        fail(".jwksUri", m);
    }
    let inline = if rule.jwks.is_empty() {
        None
    } else {
        match Jwks::parse(&rule.jwks) {
            Ok(k) => Some(Arc::new(k)),
            Err(status) => {
                fail(".jwks", format!("jwks parse error: {status}"));
                None
            }
        }
    };
    let mut from_headers = Vec::new();
    for (i, h) in rule.from_headers.iter().enumerate() {
        if h.name.is_empty() {
            fail(
                &format!(".fromHeaders[{i}].name"),
                "location header name must be non-empty string".into(),
            );
            continue;
        }
        match HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()) {
            Ok(n) => from_headers.push((n, h.prefix.clone())),
            Err(_) => fail(
                &format!(".fromHeaders[{i}].name"),
                format!("{:?} is not a valid header name", h.name),
            ),
        }
    }
    for (i, p) in rule.from_params.iter().enumerate() {
        if p.is_empty() {
            fail(
                &format!(".fromParams[{i}]"),
                "location query must be non-empty string".into(),
            );
        }
    }
    for (i, c) in rule.from_cookies.iter().enumerate() {
        // A cookie name is an RFC 6265 token.
        let token_char = |ch: char| ch.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(ch);
        if c.is_empty() || !c.chars().all(token_char) {
            fail(
                &format!(".fromCookies[{i}]"),
                format!("{c:?} is not a cookie name"),
            );
        }
    }
    let output_payload_to_header = if rule.output_payload_to_header.is_empty() {
        None
    } else {
        match HeaderName::from_bytes(
            rule.output_payload_to_header
                .to_ascii_lowercase()
                .as_bytes(),
        ) {
            Ok(h) => Some(h),
            Err(_) => {
                fail(
                    ".outputPayloadToHeader",
                    format!(
                        "{:?} is not a valid header name",
                        rule.output_payload_to_header
                    ),
                );
                None
            }
        }
    };
    let mut output_claim_to_headers = Vec::new();
    for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
        let field = format!(".outputClaimToHeaders[{i}]");
        if c.header.is_empty() || c.claim.is_empty() {
            fail(
                &field,
                "outputClaimToHeaders header and claim value must be non-empty string".into(),
            );
            continue;
        }
        match HeaderName::from_bytes(c.header.to_ascii_lowercase().as_bytes()) {
            Ok(h) if !c.header.starts_with(':') => output_claim_to_headers.push((
                h,
                c.claim.split('.').map(str::to_string).collect::<Vec<_>>(),
            )),
            _ => fail(
                &format!("{field}.header"),
                format!("invalid header name {:?}", c.header),
            ),
        }
    }
    let timeout = match rule.timeout.as_deref() {
        None | Some("") => DEFAULT_JWKS_TIMEOUT,
        Some(t) => match parse_duration(t) {
            Some(d) => d,
            None => {
                fail(".timeout", format!("invalid duration {t:?}"));
                DEFAULT_JWKS_TIMEOUT
            }
        },
    };
    if !ok {
        return None;
    }
    let jwks = match inline {
        Some(k) => JwksSource::Inline(k),
        None if !rule.jwks_uri.is_empty() => JwksSource::Remote(JwksRef {
            uri: rule.jwks_uri.as_str().into(),
            discovery: false,
            timeout,
        }),
        // Neither: istiod resolves the key set through OpenID discovery on the issuer.
        None => JwksSource::Remote(JwksRef {
            uri: format!(
                "{}/.well-known/openid-configuration",
                rule.issuer.trim_end_matches('/')
            )
            .into(),
            discovery: true,
            timeout,
        }),
    };
    let mut space_delimited_claims: Vec<String> = DEFAULT_SPACE_DELIMITED
        .iter()
        .map(|s| s.to_string())
        .chain(rule.space_delimited_claims.iter().cloned())
        .collect();
    space_delimited_claims.sort();
    space_delimited_claims.dedup();
    Some(JwtProvider {
        policy: policy.clone(),
        issuer: rule.issuer.as_str().into(),
        audiences: rule
            .audiences
            .iter()
            .map(|a| sanitize_audience(a))
            .collect(),
        jwks,
        from_headers,
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        forward_original_token: rule.forward_original_token,
        output_payload_to_header,
        output_claim_to_headers,
        space_delimited_claims,
    })
}

/// Istio `ParseJwksURI`: an `http` or `https` URL with a host.
fn validate_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))
        .ok_or_else(|| format!("{uri:?}: jwksUri must be an http or https URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.parse::<http::uri::Authority>().is_err() {
        return Err(format!("{uri:?}: jwksUri has no valid host"));
    }
    Ok(())
}

/// A protobuf `Duration` as written in YAML (`5s`, `1.5s`, `500ms`).
fn parse_duration(s: &str) -> Option<Duration> {
    crate::duration::parse_proto_duration(s)
}
