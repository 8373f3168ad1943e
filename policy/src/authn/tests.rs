//! RequestAuthentication through YAML and [`crate::compile`], tokens signed at test time with
//! keys generated at test time (aws-lc-rs, independent of the verifier), checked against
//! Envoy's `jwt_authn` outcomes (`policy.md` section 2).

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::testing::{TestAlg, TestKey, jwks};
use super::*;
use crate::{
    AuthzRequest, CompileOptions, ConfigError, HttpAttrs, Snapshot, compile, evaluate,
    parse_manifests,
};

const ISS: &str = "https://issuer.example.com";
/// A fixed "now" (2026-01-01T00:00:00Z).
const NOW: u64 = 1_767_225_600;

const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.0.0.10, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {clusterIP: 10.0.0.11, ports: [{name: http, port: 9080}]}
";

const GW_REF: &str =
    "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]";

struct Keys {
    rs256: TestKey,
    es256: TestKey,
    /// Same `kid` as `rs256`, another key: a forged signature.
    impostor: TestKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rs256: TestKey::generate(TestAlg::RS256, "rsa-1"),
        es256: TestKey::generate(TestAlg::ES256, "ec-1"),
        impostor: TestKey::generate(TestAlg::RS256, "rsa-1"),
    })
}

/// The JWKS of the test issuer: the RS256 and ES256 keys.
fn issuer_jwks() -> String {
    jwks(&[&keys().rs256, &keys().es256])
}

/// A RequestAuthentication `default/<name>` with a literal spec (flow style).
fn ra(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

/// A RequestAuthentication on the waypoint with one rule for [`ISS`] (inline JWKS) plus
/// `extra` fields of the rule.
fn ra_rule(extra: &str) -> String {
    let jwks = issuer_jwks();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    ra(
        "jwt",
        &format!("{{{GW_REF}, jwtRules: [{{issuer: \"{ISS}\", jwks: '{jwks}'{extra}}}]}}"),
    )
}

fn build(docs: &[String]) -> Result<Snapshot, Vec<ConfigError>> {
    let mut text = BASE.to_string();
    for d in docs {
        text.push_str("---\n");
        text.push_str(d);
    }
    let loaded = parse_manifests(&text, "test.yaml").expect("test YAML parses");
    compile(&loaded, &CompileOptions::default())
}

fn snap(docs: &[String]) -> Snapshot {
    build(docs).unwrap_or_else(|e| panic!("compile failed: {e:#?}"))
}

fn errs(docs: &[String]) -> Vec<ConfigError> {
    match build(docs) {
        Ok(_) => panic!("expected compile errors"),
        Err(e) => e,
    }
}

fn set(docs: &[String]) -> AuthnSet {
    snap(docs).authn_for("default", "reviews")
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "exp": NOW + 3600, "iat": NOW, "groups": ["dev", "ops"]})
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

fn no_remote(_: &JwksRef) -> Option<Arc<Jwks>> {
    None
}

fn auth(set: &AuthnSet, headers: &mut HeaderMap, path: &str) -> Result<Authn, JwtStatus> {
    authenticate(set, headers, path, NOW, &no_remote)
}

/// The status of authenticating `Authorization: Bearer <token>`.
fn status_of(set: &AuthnSet, token: &str) -> Result<String, JwtStatus> {
    let mut h = bearer(token);
    auth(set, &mut h, "/").map(|a| a.verified.map(|v| v.principal).unwrap_or_default())
}

#[test]
fn rs256_and_es256_tokens_verify_and_give_the_principal() {
    let s = set(&[ra_rule("")]);
    for key in [&keys().rs256, &keys().es256] {
        let token = key.sign(&claims());
        let mut h = bearer(&token);
        let a = auth(&s, &mut h, "/").expect("verifies");
        let v = a.verified.expect("verified");
        assert_eq!(v.principal, format!("{ISS}/alice"));
        assert_eq!(v.claims["groups"], json!(["dev", "ops"]));
        // forwardOriginalToken is false: the token header is removed.
        assert!(h.get(http::header::AUTHORIZATION).is_none());
    }
}

#[test]
fn every_supported_algorithm_verifies() {
    for alg in [
        TestAlg::RS256,
        TestAlg::RS384,
        TestAlg::RS512,
        TestAlg::PS256,
        TestAlg::ES256,
        TestAlg::ES384,
    ] {
        let key = TestKey::generate(alg, alg.name());
        let doc = ra(
            "jwt",
            &format!(
                "{{{GW_REF}, jwtRules: [{{issuer: \"{ISS}\", jwks: '{}'}}]}}",
                jwks(&[&key])
            ),
        );
        let s = set(&[doc]);
        assert_eq!(
            status_of(&s, &key.sign(&claims())),
            Ok(format!("{ISS}/alice")),
            "{alg:?}"
        );
    }
}

#[test]
fn missing_token_passes_without_a_principal() {
    let s = set(&[ra_rule("")]);
    let mut h = HeaderMap::new();
    let a = auth(&s, &mut h, "/path?x=1").expect("passes");
    assert_eq!(a, Authn::default());
    // A header without the location's prefix is no token at all (Envoy skips it).
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Basic YWxhZGRpbg=="),
    );
    assert_eq!(auth(&s, &mut h, "/").expect("passes"), Authn::default());
}

#[test]
fn expiry_and_not_before_allow_60_seconds_of_clock_skew() {
    let s = set(&[ra_rule("")]);
    let k = &keys().rs256;
    let with = |extra: Value| {
        let mut c = json!({"iss": ISS, "sub": "alice"});
        for (key, v) in extra.as_object().expect("object") {
            c[key] = v.clone();
        }
        status_of(&s, &k.sign(&c))
    };
    assert!(with(json!({"exp": NOW - 30})).is_ok(), "within the skew");
    assert_eq!(with(json!({"exp": NOW - 61})), Err(JwtStatus::JwtExpired));
    assert!(with(json!({"nbf": NOW + 30})).is_ok(), "within the skew");
    assert_eq!(
        with(json!({"nbf": NOW + 61})),
        Err(JwtStatus::JwtNotYetValid)
    );
    // No exp at all: never expires (Envoy only checks a non-zero exp).
    assert!(with(json!({})).is_ok());
    assert_eq!(
        with(json!({"exp": "tomorrow"})),
        Err(JwtStatus::JwtPayloadParseErrorExpNotInteger)
    );
    // Messages and statuses are Envoy's.
    assert_eq!(JwtStatus::JwtExpired.message(), "Jwt is expired");
    assert_eq!(JwtStatus::JwtExpired.http_status(), 401);
    assert_eq!(JwtStatus::JwtNotYetValid.message(), "Jwt not yet valid");
}

#[test]
fn expired_is_reported_before_the_signature_is_checked() {
    // Envoy checks time before keys: a forged, expired token is "expired".
    let s = set(&[ra_rule("")]);
    let forged = keys()
        .impostor
        .sign(&json!({"iss": ISS, "sub": "a", "exp": NOW - 3600}));
    assert_eq!(status_of(&s, &forged), Err(JwtStatus::JwtExpired));
}

#[test]
fn wrong_issuer_is_not_configured() {
    let s = set(&[ra_rule("")]);
    let token = keys()
        .rs256
        .sign(&json!({"iss": "https://evil.example.com", "sub": "alice"}));
    assert_eq!(status_of(&s, &token), Err(JwtStatus::JwtUnknownIssuer));
    assert_eq!(
        JwtStatus::JwtUnknownIssuer.message(),
        "Jwt issuer is not configured"
    );
}

#[test]
fn wrong_audience_is_403_and_audiences_are_sanitized() {
    let s = set(&[ra_rule("audiences: [\"https://api.example.com/\", other]")]);
    let k = &keys().rs256;
    let tok = |aud: Value| k.sign(&json!({"iss": ISS, "sub": "a", "aud": aud}));
    assert!(status_of(&s, &tok(json!("api.example.com"))).is_ok());
    assert!(status_of(&s, &tok(json!(["x", "http://api.example.com"]))).is_ok());
    let denied = status_of(&s, &tok(json!("elsewhere")));
    assert_eq!(denied, Err(JwtStatus::JwtAudienceNotAllowed));
    assert_eq!(JwtStatus::JwtAudienceNotAllowed.http_status(), 403);
    assert_eq!(
        JwtStatus::JwtAudienceNotAllowed.message(),
        "Audiences in Jwt are not allowed"
    );
    // No `aud` at all while audiences are configured: not allowed.
    let none = k.sign(&json!({"iss": ISS, "sub": "a"}));
    assert_eq!(status_of(&s, &none), Err(JwtStatus::JwtAudienceNotAllowed));
    // No configured audience: any token audience passes.
    let open = set(&[ra_rule("")]);
    assert!(status_of(&open, &tok(json!("elsewhere"))).is_ok());
}

#[test]
fn bad_signature_and_unknown_kid() {
    let s = set(&[ra_rule("")]);
    // Same kid, different key: the key is tried and fails.
    let forged = keys().impostor.sign(&claims());
    assert_eq!(status_of(&s, &forged), Err(JwtStatus::JwtVerificationFail));
    assert_eq!(
        JwtStatus::JwtVerificationFail.message(),
        "Jwt verification fails"
    );
    // A tampered payload.
    let good = keys().rs256.sign(&claims());
    let mut parts: Vec<&str> = good.split('.').collect();
    let evil = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"iss": ISS, "sub": "admin", "exp": NOW + 3600}).to_string());
    parts[1] = &evil;
    assert_eq!(
        status_of(&s, &parts.join(".")),
        Err(JwtStatus::JwtVerificationFail)
    );
    // A kid no key has (keys have kids and algs): no key to try.
    let other = keys()
        .rs256
        .sign_with_header(&json!({"alg": "RS256", "kid": "nope"}), &claims());
    assert_eq!(status_of(&s, &other), Err(JwtStatus::JwksKidAlgMismatch));
    assert_eq!(
        JwtStatus::JwksKidAlgMismatch.message(),
        "Jwks doesn't have key to match kid or alg from Jwt"
    );
    // Not a JWT.
    assert_eq!(status_of(&s, "abc.def"), Err(JwtStatus::JwtBadFormat));
    assert_eq!(
        status_of(&s, "a!b.e30.sig"),
        Err(JwtStatus::JwtHeaderParseErrorBadBase64)
    );
    // alg none is not implemented.
    let none = format!(
        "{}.{}.c2ln",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    assert_eq!(
        status_of(&s, &none),
        Err(JwtStatus::JwtHeaderNotImplementedAlg)
    );
}

#[test]
fn from_headers_with_prefix() {
    let s = set(&[ra_rule(
        "fromHeaders: [{name: x-jwt-assertion, prefix: \"Token \"}]",
    )]);
    let token = keys().es256.sign(&claims());
    let mut h = HeaderMap::new();
    h.insert(
        "x-jwt-assertion",
        HeaderValue::from_str(&format!("Token {token}")).expect("v"),
    );
    let a = auth(&s, &mut h, "/").expect("verifies");
    assert_eq!(
        a.verified.expect("verified").principal,
        format!("{ISS}/alice")
    );
    assert!(h.get("x-jwt-assertion").is_none(), "token header removed");
    // The default location is not used once fromHeaders is set: a bearer token is ignored.
    let mut h = bearer(&token);
    assert_eq!(auth(&s, &mut h, "/").expect("passes"), Authn::default());
    assert!(h.get(http::header::AUTHORIZATION).is_some());
    // Without the prefix: skipped (no token).
    let mut h = HeaderMap::new();
    h.insert("x-jwt-assertion", HeaderValue::from_str(&token).expect("v"));
    assert_eq!(auth(&s, &mut h, "/").expect("passes"), Authn::default());
    // With the prefix and garbage: rejected.
    let mut h = HeaderMap::new();
    h.insert("x-jwt-assertion", HeaderValue::from_static("Token a.b"));
    assert_eq!(auth(&s, &mut h, "/"), Err(JwtStatus::JwtBadFormat));
}

/// RequestAuthentication `fromCookies` (Envoy `from_cookies`): the token is read from the
/// named cookie of any `cookie` header (quotes removed), kept in the request, and then the
/// default locations are not used.
#[test]
fn from_cookies_reads_the_named_cookie_and_replaces_the_default_locations() {
    let token = keys().rs256.sign(&claims());
    let s = set(&[ra_rule("fromCookies: [session, jwt]")]);
    let cookie = |v: &str| {
        let mut h = HeaderMap::new();
        h.append(http::header::COOKIE, HeaderValue::from_static("theme=dark"));
        h.append(http::header::COOKIE, HeaderValue::from_str(v).expect("v"));
        h
    };
    let mut h = cookie(&format!("a=1; session=\"{token}\"; b=2"));
    let a = auth(&s, &mut h, "/").expect("verifies");
    assert_eq!(
        a.verified.expect("verified").principal,
        format!("{ISS}/alice")
    );
    assert_eq!(
        h.get_all(http::header::COOKIE).iter().count(),
        2,
        "cookies kept"
    );
    // Another listed cookie works too; a bad token there is rejected.
    let mut h = cookie(&format!("jwt={token}"));
    assert!(auth(&s, &mut h, "/").expect("verifies").verified.is_some());
    let mut h = cookie("jwt=a.b.c");
    assert!(auth(&s, &mut h, "/").is_err());
    // The default locations are replaced: a bearer token is not looked at.
    let mut h = bearer("garbage");
    assert_eq!(auth(&s, &mut h, "/").expect("passes"), Authn::default());
    // A bad cookie name is a config error naming the field.
    let found = errs(&[ra_rule("fromCookies: [\"bad name\"]")]);
    assert!(
        found.iter().any(|e| e.field.ends_with(".fromCookies[0]")),
        "{found:?}"
    );
}

#[test]
fn from_params_and_the_default_access_token_param() {
    let token = keys().rs256.sign(&claims());
    let s = set(&[ra_rule("fromParams: [my_token]")]);
    let mut h = HeaderMap::new();
    let a = auth(&s, &mut h, &format!("/p?a=1&my_token={token}&b=2")).expect("verifies");
    assert!(a.verified.is_some());
    assert_eq!(a.path.as_deref(), Some("/p?a=1&b=2"), "token param removed");
    // Default locations include `access_token`.
    let s = set(&[ra_rule("")]);
    let a = auth(&s, &mut h, &format!("/p?access_token={token}")).expect("verifies");
    assert_eq!(a.path.as_deref(), Some("/p"));
    // forwardOriginalToken keeps it.
    let s = set(&[ra_rule("forwardOriginalToken: true")]);
    let a = auth(&s, &mut h, &format!("/p?access_token={token}")).expect("verifies");
    assert_eq!(a.path, None);
    let mut h = bearer(&token);
    auth(&s, &mut h, "/").expect("verifies");
    assert!(h.get(http::header::AUTHORIZATION).is_some());
}

#[test]
fn output_payload_and_claims_to_headers_and_spoofed_headers_are_removed() {
    let s = set(&[ra_rule(
        "outputPayloadToHeader: x-jwt-payload, outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-nested, claim: org.id}, {header: x-groups, claim: groups}]",
    )]);
    let mut c = claims();
    c["org"] = json!({"id": 42});
    let token = keys().rs256.sign(&c);
    let mut h = bearer(&token);
    h.insert("x-sub", HeaderValue::from_static("spoofed"));
    h.insert("x-jwt-payload", HeaderValue::from_static("spoofed"));
    auth(&s, &mut h, "/").expect("verifies");
    assert_eq!(h.get("x-sub").and_then(|v| v.to_str().ok()), Some("alice"));
    assert_eq!(h.get("x-nested").and_then(|v| v.to_str().ok()), Some("42"));
    assert!(h.get("x-groups").is_none(), "lists are not copied");
    assert_eq!(
        h.get("x-jwt-payload").and_then(|v| v.to_str().ok()),
        token.split('.').nth(1),
        "the payload segment as in the token"
    );
    // Without a token the spoofed headers are still removed.
    let mut h = HeaderMap::new();
    h.insert("x-sub", HeaderValue::from_static("spoofed"));
    auth(&s, &mut h, "/").expect("passes");
    assert!(h.get("x-sub").is_none());
}

#[test]
fn scope_is_split_into_a_list_for_authorization() {
    let s = set(&[ra_rule("")]);
    let mut c = claims();
    c["scope"] = json!("read write");
    let mut h = bearer(&keys().rs256.sign(&c));
    let v = auth(&s, &mut h, "/").expect("ok").verified.expect("v");
    assert_eq!(v.claims["scope"], json!(["read", "write"]));
}

#[test]
fn remote_jwks_is_used_when_fetched_and_fails_like_envoy_when_not() {
    let s = set(&[ra(
        "jwt",
        &format!(
            "{{{GW_REF}, jwtRules: [{{issuer: \"{ISS}\", jwksUri: \"http://127.0.0.1:1/keys\"}}]}}"
        ),
    )]);
    let snapshot = snap(&[ra(
        "jwt",
        &format!(
            "{{{GW_REF}, jwtRules: [{{issuer: \"{ISS}\", jwksUri: \"http://127.0.0.1:1/keys\", timeout: 2s}}]}}"
        ),
    )]);
    assert_eq!(snapshot.remote_jwks().len(), 1);
    assert_eq!(&*snapshot.remote_jwks()[0].uri, "http://127.0.0.1:1/keys");
    assert_eq!(
        snapshot.remote_jwks()[0].timeout,
        std::time::Duration::from_secs(2)
    );
    let token = keys().rs256.sign(&claims());
    assert_eq!(status_of(&s, &token), Err(JwtStatus::JwksFetchFail));
    assert_eq!(
        JwtStatus::JwksFetchFail.message(),
        "Jwks remote fetch is failed"
    );
    let fetched = Arc::new(Jwks::parse(&issuer_jwks()).expect("jwks"));
    let lookup = |r: &JwksRef| (&*r.uri == "http://127.0.0.1:1/keys").then(|| fetched.clone());
    let mut h = bearer(&token);
    let a = authenticate(&s, &mut h, "/", NOW, &lookup).expect("verifies");
    assert!(a.verified.is_some());
    // A token-less request never needs the keys.
    assert!(auth(&s, &mut HeaderMap::new(), "/").is_ok());
    // Neither jwks nor jwksUri: OpenID discovery on the issuer.
    let d = snap(&[ra(
        "jwt",
        &format!("{{{GW_REF}, jwtRules: [{{issuer: \"{ISS}/\"}}]}}"),
    )]);
    assert_eq!(
        &*d.remote_jwks()[0].uri,
        "https://issuer.example.com/.well-known/openid-configuration"
    );
    assert!(d.remote_jwks()[0].discovery);
}

#[test]
fn claims_and_request_principals_drive_authorization_policy() {
    let ap = |name: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec: {{{GW_REF}, {spec}}}\n"
        )
    };
    let s = snap(&[
        ra_rule(""),
        ap(
            "require-jwt",
            &format!(
                "rules: [{{from: [{{source: {{requestPrincipals: [\"{ISS}/*\"]}}}}], when: [{{key: \"request.auth.claims[groups]\", values: [ops]}}]}}]"
            ),
        ),
    ]);
    let authn = s.authn_for("default", "reviews");
    let authz = s.authz_for("default", "reviews");
    let decide = |headers: &mut HeaderMap| {
        let a = authenticate(&authn, headers, "/", NOW, &no_remote).expect("authn passes");
        let claims = a.verified.as_ref().map(|v| v.claims.clone());
        let principal = a.verified.as_ref().map(|v| v.principal.clone());
        evaluate(
            &authz,
            &AuthzRequest {
                source_principal: Some("spiffe://cluster.local/ns/default/sa/sleep"),
                source_ip: None,
                remote_ip: None,
                dest_ip: None,
                dest_port: 9080,
                http: Some(HttpAttrs {
                    method: "GET",
                    path: "/",
                    host: "reviews",
                    headers,
                    request_principal: principal.as_deref(),
                    request_auth: claims.as_ref(),
                }),
            },
        )
        .allowed
    };
    let ops = keys().rs256.sign(&claims());
    assert!(decide(&mut bearer(&ops)), "ops member with a token");
    let mut dev_only = claims();
    dev_only["groups"] = json!(["dev"]);
    assert!(
        !decide(&mut bearer(&keys().es256.sign(&dev_only))),
        "not in ops"
    );
    assert!(
        !decide(&mut HeaderMap::new()),
        "no token: no request principal"
    );
}

#[test]
fn attachment_follows_authorization_policy_rules() {
    let jwks = issuer_jwks();
    let svc = ra(
        "svc",
        &format!(
            "{{targetRefs: [{{kind: Service, group: \"\", name: ratings}}], jwtRules: [{{issuer: \"{ISS}\", jwks: '{jwks}'}}]}}"
        ),
    );
    let sel = ra(
        "sel",
        &format!(
            "{{selector: {{matchLabels: {{app: reviews}}}}, jwtRules: [{{issuer: \"{ISS}\", jwks: '{jwks}'}}]}}"
        ),
    );
    let s = snap(&[svc, sel]);
    assert!(s.authn_for("default", "reviews").is_empty());
    assert_eq!(s.authn_for("default", "ratings").providers().len(), 1);
    assert_eq!(&*s.request_authentications()[0], "default/svc");
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("RequestAuthentication default/sel uses a selector")),
        "{:?}",
        s.warnings
    );
    // Bound ServicePorts carry their set.
    let sp = match s.lookup_vip("10.0.0.11:9080".parse().expect("addr")) {
        crate::VipLookup::Bound(sp) => sp,
        other => panic!("{other:?}"),
    };
    assert_eq!(sp.authn.providers().len(), 1);
}

#[test]
fn validation_follows_istio() {
    let e = errs(&[ra(
        "a",
        &format!("{{{GW_REF}, jwtRules: [{{jwksUri: \"http://x/k\"}}]}}"),
    )]);
    assert!(
        e.iter()
            .any(|e| e.field == "spec.jwtRules[0].issuer" && e.message == "issuer must be set"),
        "{e:#?}"
    );
    let e = errs(&[ra(
        "b",
        &format!("{{{GW_REF}, jwtRules: [{{issuer: i, jwks: '{{\"keys\": []}}'}}]}}"),
    )]);
    assert!(
        e.iter()
            .any(|e| e.field == "spec.jwtRules[0].jwks" && e.message.contains("jwks parse error")),
        "{e:#?}"
    );
    let e = errs(&[ra(
        "c",
        &format!("{{{GW_REF}, jwtRules: [{{issuer: i, jwksUri: \"ftp://x/k\"}}]}}"),
    )]);
    assert!(
        e.iter().any(|e| e.field == "spec.jwtRules[0].jwksUri"),
        "{e:#?}"
    );
    let e = errs(&[ra(
        "d",
        &format!(
            "{{{GW_REF}, jwtRules: [{{issuer: i, jwksUri: \"http://x/k\", fromHeaders: [{{name: \"\"}}], outputClaimToHeaders: [{{header: \"bad header\", claim: sub}}]}}]}}"
        ),
    )]);
    assert!(
        e.iter()
            .any(|e| e.field == "spec.jwtRules[0].fromHeaders[0].name"),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|e| e.field == "spec.jwtRules[0].outputClaimToHeaders[0].header"),
        "{e:#?}"
    );
}

#[test]
fn jwks_parsing_skips_unusable_keys_like_envoy() {
    let good = keys().rs256.jwk();
    let doc = json!({"keys": [{"kty": "RSA", "n": 1}, {"kty": "XYZ"}, good]}).to_string();
    assert_eq!(Jwks::parse(&doc).expect("one good key").len(), 1);
    assert_eq!(
        Jwks::parse(r#"{"keys": [{"kty": "XYZ"}]}"#).err(),
        Some(JwtStatus::JwksNoValidKeys)
    );
    assert_eq!(Jwks::parse("{}").err(), Some(JwtStatus::JwksNoKeys));
    assert_eq!(Jwks::parse("nope").err(), Some(JwtStatus::JwksParseError));
    assert_eq!(
        Jwks::parse(r#"{"keys": 1}"#).err(),
        Some(JwtStatus::JwksBadKeys)
    );
}

#[test]
fn several_rules_each_verify_their_own_issuer() {
    let other = TestKey::generate(TestAlg::ES256, "other");
    let jwks_a = issuer_jwks();
    let jwks_b = jwks(&[&other]);
    let s = set(&[ra(
        "multi",
        &format!(
            "{{{GW_REF}, jwtRules: [{{issuer: \"{ISS}\", jwks: '{jwks_a}'}}, {{issuer: other, jwks: '{jwks_b}'}}]}}"
        ),
    )]);
    assert_eq!(s.providers().len(), 2);
    assert!(status_of(&s, &keys().rs256.sign(&claims())).is_ok());
    let b = other.sign(&json!({"iss": "other", "sub": "bob"}));
    assert_eq!(status_of(&s, &b), Ok("other/bob".to_string()));
    // Issuer `other` signed with the first issuer's RSA key: only `other`'s keys (one ES256
    // key) are tried, and none has the token's alg.
    let cross = keys().rs256.sign_with_header(
        &json!({"alg": "RS256"}),
        &json!({"iss": "other", "sub": "x"}),
    );
    assert_eq!(status_of(&s, &cross), Err(JwtStatus::JwksKidAlgMismatch));
}
