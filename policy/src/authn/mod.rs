//! # Istio RequestAuthentication for a waypoint: JWT rules and request authentication
//!
//! Contract:
//! - [`crate::compile`] validates every `security.istio.io` RequestAuthentication (Istio's
//!   `validateJwtRule`) and attaches those with `targetRefs` exactly as AuthorizationPolicies
//!   attach (`policy.md` 1.11, 2): `Gateway` (this waypoint) and `GatewayClass istio-waypoint`
//!   (root namespace) rules apply to all traffic, `Service` rules to that Service. Selector
//!   policies are warned about and ignored. The rules of one Service's traffic form an
//!   [`AuthnSet`], sorted by issuer as istiod sorts them.
//! - [`authenticate`] is Envoy's `jwt_authn` filter as istiod configures it for a waypoint
//!   (`policy_applier.go` `convertToEnvoyJwtConfig`: every provider OR `allow_missing`):
//!   a request without a token passes with no principal; every token found at a location a
//!   rule names must verify, else the request is refused with Envoy's status and body
//!   ([`JwtStatus`]). On success it edits the request headers as Envoy does
//!   (`outputPayloadToHeader`, `outputClaimToHeaders`, token removal unless
//!   `forwardOriginalToken`) and returns the payload for AuthorizationPolicy
//!   (`request.auth.*`, `requestPrincipals`).
//! - Pure: the caller passes the time (`now`, Unix seconds) and the remote key sets it has
//!   fetched (`jwksUri`); no I/O here. Never panics on any input.

mod compile;
mod jwt;
mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

pub(crate) use compile::{AuthnIndex, compile_request_authentications};
pub use jwt::Jwks;
pub use status::JwtStatus;

use jwt::Jwt;

/// Envoy's default clock skew for `exp` and `nbf` (`kClockSkewInSecond`); Istio does not set
/// `clock_skew_seconds`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Istio's default JWKS fetch timeout (`jwtRules[].timeout`).
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Claims Istio always treats as space-delimited lists (`buildSpaceDelimitedClaims`).
const DEFAULT_SPACE_DELIMITED: &[&str] = &["permission", "scope"];

/// Where a rule's keys are fetched from: its `jwksUri`, or (neither `jwks` nor `jwksUri` set)
/// OpenID discovery at `<issuer>/.well-known/openid-configuration`, as istiod resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JwksRef {
    /// The `jwksUri`, or the discovery document's URL when `discovery` is set.
    pub uri: Arc<str>,
    /// `uri` is an OpenID configuration whose `jwks_uri` names the key set.
    pub discovery: bool,
    /// Fetch timeout (`jwtRules[].timeout`, default 5 s).
    pub timeout: Duration,
}

/// The key source of one rule.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// `jwks` (validated at compile time).
    Inline(Arc<Jwks>),
    /// Fetched by the proxy and passed to [`authenticate`].
    Remote(JwksRef),
}

/// One compiled `jwtRules[]` entry (Envoy `JwtProvider`).
#[derive(Debug)]
pub struct JwtProvider {
    /// `<namespace>/<name>` of the RequestAuthentication, for logs.
    pub policy: Arc<str>,
    pub issuer: Arc<str>,
    /// Sanitized as Envoy's `CheckAudience` does (scheme and trailing `/` dropped). Empty:
    /// any audience.
    audiences: Vec<String>,
    pub jwks: JwksSource,
    from_headers: Vec<(HeaderName, String)>,
    from_params: Vec<String>,
    from_cookies: Vec<String>,
    forward_original_token: bool,
    output_payload_to_header: Option<HeaderName>,
    /// (header, claim path split at `.`).
    output_claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    space_delimited_claims: Vec<String>,
}

/// A header location: the header, the value prefix, and the issuers of the rules that use it
/// (Envoy's extractor `HeaderLocationSpec`).
#[derive(Debug)]
struct HeaderLocation {
    header: HeaderName,
    prefix: String,
    issuers: Vec<Arc<str>>,
}

/// A query parameter location and its issuers.
#[derive(Debug)]
struct ParamLocation {
    name: String,
    issuers: Vec<Arc<str>>,
}

#[derive(Debug, Default)]
struct AuthnInner {
    providers: Vec<Arc<JwtProvider>>,
    /// Sorted by header name then prefix (Envoy keeps them in a `std::map` by name + prefix).
    headers: Vec<HeaderLocation>,
    /// Sorted by name.
    params: Vec<ParamLocation>,
    /// Cookie locations (RequestAuthentication `fromCookies`), sorted by name; the same
    /// shape as a query parameter location.
    cookies: Vec<ParamLocation>,
    /// `outputPayloadToHeader` and `outputClaimToHeaders` headers: removed from every request
    /// before extraction so a client cannot forge them (Envoy `sanitizePayloadHeaders`).
    sanitize: Vec<HeaderName>,
}

/// The JWT rules that apply to one Service's traffic through this waypoint. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AuthnSet(Arc<AuthnInner>);

impl AuthnSet {
    pub(crate) fn new(mut providers: Vec<Arc<JwtProvider>>) -> AuthnSet {
        // istiod: "Sort the jwt rules by the issuer alphabetically" (stable).
        providers.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        let mut headers: BTreeMap<(String, String), HeaderLocation> = BTreeMap::new();
        let mut params: BTreeMap<String, ParamLocation> = BTreeMap::new();
        let mut cookies: BTreeMap<String, ParamLocation> = BTreeMap::new();
        let mut sanitize = Vec::new();
        for p in &providers {
            let mut add_header = |h: &HeaderName, prefix: &str| {
                headers
                    .entry((h.as_str().to_string(), prefix.to_string()))
                    .or_insert_with(|| HeaderLocation {
                        header: h.clone(),
                        prefix: prefix.to_string(),
                        issuers: Vec::new(),
                    })
                    .issuers
                    .push(p.issuer.clone());
            };
            let mut add_param = |name: &str| {
                params
                    .entry(name.to_string())
                    .or_insert_with(|| ParamLocation {
                        name: name.to_string(),
                        issuers: Vec::new(),
                    })
                    .issuers
                    .push(p.issuer.clone());
            };
            for name in &p.from_cookies {
                cookies
                    .entry(name.clone())
                    .or_insert_with(|| ParamLocation {
                        name: name.clone(),
                        issuers: Vec::new(),
                    })
                    .issuers
                    .push(p.issuer.clone());
            }
            if p.from_headers.is_empty() && p.from_params.is_empty() && p.from_cookies.is_empty() {
                // Envoy's default locations: `Authorization: Bearer <token>`, then the
                // `access_token` query parameter.
                add_header(&http::header::AUTHORIZATION, "Bearer ");
                add_param("access_token");
            }
            for (h, prefix) in &p.from_headers {
                add_header(h, prefix);
            }
            for name in &p.from_params {
                add_param(name);
            }
            sanitize.extend(p.output_payload_to_header.iter().cloned());
            sanitize.extend(p.output_claim_to_headers.iter().map(|(h, _)| h.clone()));
        }
        sanitize.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        sanitize.dedup();
        AuthnSet(Arc::new(AuthnInner {
            providers,
            headers: headers.into_values().collect(),
            params: params.into_values().collect(),
            cookies: cookies.into_values().collect(),
            sanitize,
        }))
    }

    /// No rule applies: requests are not looked at.
    pub fn is_empty(&self) -> bool {
        self.0.providers.is_empty()
    }

    /// The rules, sorted by issuer.
    pub fn providers(&self) -> &[Arc<JwtProvider>] {
        &self.0.providers
    }
}

/// A verified token, as Envoy's `jwt_authn` writes it to its dynamic metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `request.auth.principal`: `<iss>/<sub>`.
    pub principal: String,
    /// The payload with the space-delimited claims (`scope`, `permission`, ...) split into
    /// lists (Envoy `normalize_payload_in_metadata`): what `request.auth.claims[...]`,
    /// `request.auth.audiences`, `request.auth.presenter` and `requestPrincipals` read.
    pub claims: Value,
}

/// The outcome of [`authenticate`] for a request that may continue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Authn {
    /// The verified token; `None` when the request carried none.
    pub verified: Option<Authenticated>,
    /// The new `path?query` when a token was removed from a query parameter.
    pub path: Option<String>,
}

/// A token found in the request.
struct Token<'a> {
    value: String,
    issuers: &'a [Arc<str>],
    location: Location<'a>,
}

enum Location<'a> {
    Header(&'a HeaderName),
    Param(&'a str),
    /// A cookie: never removed from the request (Envoy's `JwtCookieLocation::removeJwt` is
    /// a no-op).
    Cookie,
}

/// Authenticate a request against `set` (Envoy `jwt_authn`, istiod's requirement "each
/// provider OR allow_missing"): headers are edited in place; `now` is the Unix time in
/// seconds; `remote` returns the key set fetched for a [`JwksRef`], `None` while it is not
/// available ("Jwks remote fetch is failed").
///
/// Every token found must verify; the first failure (in Envoy's extraction order: header
/// locations sorted by name and prefix, then query parameters sorted by name) is returned.
/// Envoy's `requires_any` lets a request through when its *first* token verifies even if a
/// later one does not; this stricter rule refuses it (a request with a good and a bad token
/// is suspicious, and Envoy's own authenticator comment calls accepting it a security hole).
pub fn authenticate(
    set: &AuthnSet,
    headers: &mut HeaderMap,
    path_and_query: &str,
    now: u64,
    remote: &dyn Fn(&JwksRef) -> Option<Arc<Jwks>>,
) -> Result<Authn, JwtStatus> {
    let inner = &*set.0;
    if inner.providers.is_empty() {
        return Ok(Authn::default());
    }
    for h in &inner.sanitize {
        headers.remove(h);
    }
    let tokens = extract(inner, headers, path_and_query);
    if tokens.is_empty() {
        return Ok(Authn::default());
    }
    let mut verified = Vec::with_capacity(tokens.len());
    for t in &tokens {
        verified.push(verify_token(inner, t, now, remote)?);
    }
    let mut out = Authn::default();
    let mut path = path_and_query.to_string();
    for (t, (provider, jwt)) in tokens.iter().zip(&verified) {
        if let Some(h) = &provider.output_payload_to_header
            && let Ok(v) = HeaderValue::from_str(jwt.payload_b64())
        {
            headers.append(h.clone(), v);
        }
        for (h, claim) in &provider.output_claim_to_headers {
            if let Some(v) = claim_header_value(&jwt.payload, claim) {
                headers.append(h.clone(), v);
            }
        }
        if !provider.forward_original_token {
            match t.location {
                Location::Header(h) => {
                    headers.remove(h);
                }
                Location::Param(name) => {
                    path = remove_query_param(&path, name);
                    out.path = Some(path.clone());
                }
                Location::Cookie => {}
            }
        }
        if out.verified.is_none() {
            out.verified = Some(Authenticated {
                principal: format!("{}/{}", jwt.iss, jwt.sub),
                claims: Value::Object(normalize(&jwt.payload, &provider.space_delimited_claims)),
            });
        }
    }
    Ok(out)
}

/// Envoy `ExtractorImpl::extract`: every value of every header location (a value without the
/// location's prefix is skipped), then the first value of every query parameter location.
fn extract<'a>(inner: &'a AuthnInner, headers: &HeaderMap, path_and_query: &str) -> Vec<Token<'a>> {
    let mut tokens = Vec::new();
    for loc in &inner.headers {
        for v in headers.get_all(&loc.header) {
            let v = String::from_utf8_lossy(v.as_bytes());
            let value = if loc.prefix.is_empty() {
                v.into_owned()
            } else {
                let Some(pos) = v.find(&loc.prefix) else {
                    continue;
                };
                extract_jwt(&v, pos + loc.prefix.len()).to_string()
            };
            tokens.push(Token {
                value,
                issuers: &loc.issuers,
                location: Location::Header(&loc.header),
            });
        }
    }
    if !inner.params.is_empty()
        && let Some((_, query)) = path_and_query.split_once('?')
    {
        for loc in &inner.params {
            let first = query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (crate::route::percent_decode(k) == loc.name)
                    .then(|| crate::route::percent_decode(v))
            });
            if let Some(value) = first {
                tokens.push(Token {
                    value,
                    issuers: &loc.issuers,
                    location: Location::Param(&loc.name),
                });
            }
        }
    }
    if !inner.cookies.is_empty() {
        for loc in &inner.cookies {
            if let Some(value) = cookie(headers, &loc.name) {
                tokens.push(Token {
                    value,
                    issuers: &loc.issuers,
                    location: Location::Cookie,
                });
            }
        }
    }
    tokens
}

/// The value of cookie `name` across every `cookie` header (Envoy
/// `Http::Utility::parseCookieValue`: `;`-separated pairs, whitespace trimmed, surrounding
/// double quotes removed, the first occurrence wins).
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    for h in headers.get_all(http::header::COOKIE) {
        let Ok(text) = h.to_str() else { continue };
        for pair in text.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if k.trim() == name {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Envoy `extractJWT`: from the first base64url-or-dot character at or after `after` to the
/// end of the value; the whole value when there is none.
fn extract_jwt(value: &str, after: usize) -> &str {
    let is_jwt_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    match value.get(after..).and_then(|rest| rest.find(is_jwt_char)) {
        Some(i) => &value[after + i..],
        None => value,
    }
}

/// The path with every `name=...` query parameter removed (Envoy `JwtParamLocation::removeJwt`);
/// the `?` goes when nothing is left.
fn remove_query_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let k = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
            crate::route::percent_decode(k) != name
        })
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// Parse and verify one token (Envoy `AuthenticatorImpl::startVerify`, `verifyKey`), in
/// Envoy's order: format, issuer, time, audience, keys, signature.
fn verify_token<'t>(
    inner: &AuthnInner,
    t: &'t Token<'_>,
    now: u64,
    remote: &dyn Fn(&JwksRef) -> Option<Arc<Jwks>>,
) -> Result<(Arc<JwtProvider>, Jwt<'t>), JwtStatus> {
    let jwt = Jwt::parse(&t.value)?;
    if !t.issuers.iter().any(|i| **i == *jwt.iss) {
        return Err(JwtStatus::JwtUnknownIssuer);
    }
    let provider = inner
        .providers
        .iter()
        .find(|p| *p.issuer == *jwt.iss)
        .ok_or(JwtStatus::JwtUnknownIssuer)?;
    jwt.verify_time(now, CLOCK_SKEW_SECS)?;
    if !audience_allowed(&provider.audiences, &jwt.audiences) {
        return Err(JwtStatus::JwtAudienceNotAllowed);
    }
    let jwks = match &provider.jwks {
        JwksSource::Inline(k) => k.clone(),
        JwksSource::Remote(r) => remote(r).ok_or(JwtStatus::JwksFetchFail)?,
    };
    jwt.verify_signature(&jwks)?;
    Ok((provider.clone(), jwt))
}

/// Envoy `sanitizeAudience`: `http://` or `https://` and one trailing `/` dropped.
pub(crate) fn sanitize_audience(aud: &str) -> String {
    let s = aud
        .strip_prefix("http://")
        .or_else(|| aud.strip_prefix("https://"))
        .unwrap_or(aud);
    s.strip_suffix('/').unwrap_or(s).to_string()
}

/// Envoy `CheckAudience::areAudiencesAllowed`: no configured audience allows any token.
fn audience_allowed(configured: &[String], token: &[String]) -> bool {
    configured.is_empty()
        || token
            .iter()
            .any(|a| configured.contains(&sanitize_audience(a)))
}

/// Envoy `addJWTClaimToHeader`: a string, number or boolean claim (nested with `.`); other
/// types and absent claims add nothing.
fn claim_header_value(payload: &Map<String, Value>, path: &[String]) -> Option<HeaderValue> {
    let (first, rest) = path.split_first()?;
    let mut v = payload.get(first)?;
    for key in rest {
        v = v.as_object()?.get(key)?;
    }
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_u64() {
            Some(u) => u.to_string(),
            // `convertClaimDoubleToString`: non-integers (and negatives) as `std::to_string`
            // prints a double: six decimals.
            None => format!("{:.6}", n.as_f64().unwrap_or(0.0)),
        },
        _ => return None,
    };
    if s.is_empty() {
        return None;
    }
    HeaderValue::from_str(&s).ok()
}

/// The payload as Envoy puts it in metadata: space-delimited string claims become lists.
fn normalize(payload: &Map<String, Value>, space_delimited: &[String]) -> Map<String, Value> {
    let mut out = payload.clone();
    for name in space_delimited {
        if let Some(Value::String(s)) = out.get(name) {
            let items = s
                .split(' ')
                .filter(|p| !p.is_empty())
                .map(|p| Value::String(p.to_string()))
                .collect();
            out.insert(name.clone(), Value::Array(items));
        }
    }
    out
}
