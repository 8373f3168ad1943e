//! JWKS and JWT as Envoy's JWT library reads them (`source/common/jwt/jwks.cc`, `jwt.cc`,
//! `verify.cc`): the same acceptance rules, the same order of checks and the same
//! [`JwtStatus`] for each failure. Signatures are checked by `jsonwebtoken` on aws-lc-rs.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::JwtStatus;

/// Base64url as Envoy decodes it (`absl::WebSafeBase64Unescape`): padding optional.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    B64URL.decode(s).ok()
}

/// Envoy's `isImplemented`: algorithms a JWT header may name.
const IMPLEMENTED_ALGS: &[&str] = &[
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
    "PS384", "PS512", "EdDSA",
];

/// The key type of one JWK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kty {
    Ec,
    Rsa,
    Oct,
    Okp,
}

/// One usable public key of a JWKS.
#[derive(Clone)]
struct Jwk {
    kid: String,
    alg: String,
    kty: Kty,
    key: DecodingKey,
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kty", &self.kty)
            .finish_non_exhaustive()
    }
}

/// A parsed JSON Web Key Set: the keys Envoy would accept from it, in order.
#[derive(Debug, Clone)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

/// What a JSON field holds, as Envoy's `StructUtils` reports it.
enum Field<'v, T> {
    Missing,
    WrongType,
    Ok(&'v T),
}

fn string_field<'v>(obj: &'v Map<String, Value>, name: &str) -> Field<'v, String> {
    match obj.get(name) {
        None => Field::Missing,
        Some(Value::String(s)) => Field::Ok(s),
        Some(_) => Field::WrongType,
    }
}

impl Jwks {
    /// Parse a JWKS document (`{"keys": [...]}`) as Envoy does: keys that cannot be used are
    /// skipped; a set with no usable key is [`JwtStatus::JwksNoValidKeys`] (or the last key
    /// error when every key failed the same way is not reported: Envoy keeps the last one
    /// only in its status, which it then overrides with `JwksNoValidKeys`).
    pub fn parse(json: &str) -> Result<Jwks, JwtStatus> {
        let value: Value = serde_json::from_str(json).map_err(|_| JwtStatus::JwksParseError)?;
        let Value::Object(obj) = value else {
            return Err(JwtStatus::JwksParseError);
        };
        // Envoy also accepts `{"<kid>": "<x509 PEM certificate>"}` (Google's format); not
        // supported here: such a set is reported as having no `keys` field.
        let keys = match obj.get("keys") {
            None => return Err(JwtStatus::JwksNoKeys),
            Some(Value::Array(keys)) => keys,
            Some(_) => return Err(JwtStatus::JwksBadKeys),
        };
        let mut out = Vec::new();
        for k in keys {
            let Value::Object(k) = k else { continue };
            if let Ok(jwk) = parse_jwk(k) {
                out.push(jwk);
            }
        }
        if out.is_empty() {
            return Err(JwtStatus::JwksNoValidKeys);
        }
        Ok(Jwks { keys: out })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Envoy `extractJwk`.
fn parse_jwk(k: &Map<String, Value>) -> Result<Jwk, JwtStatus> {
    let kty = match string_field(k, "kty") {
        Field::Missing => return Err(JwtStatus::JwksMissingKty),
        Field::WrongType => return Err(JwtStatus::JwksBadKty),
        Field::Ok(s) => s.as_str(),
    };
    let opt = |name| match string_field(k, name) {
        Field::Ok(s) => s.clone(),
        _ => String::new(),
    };
    let (kid, alg) = (opt("kid"), opt("alg"));
    let (kty, key) = match kty {
        "EC" => (Kty::Ec, ec_key(k, &alg)?),
        "RSA" => (Kty::Rsa, rsa_key(k, &alg)?),
        "oct" => (Kty::Oct, oct_key(k, &alg)?),
        "OKP" => (Kty::Okp, okp_key(k, &alg)?),
        _ => return Err(JwtStatus::JwksNotImplementedKty),
    };
    Ok(Jwk { kid, alg, kty, key })
}

fn required<'v>(
    k: &'v Map<String, Value>,
    name: &str,
    missing: JwtStatus,
    wrong: JwtStatus,
) -> Result<&'v str, JwtStatus> {
    match string_field(k, name) {
        Field::Missing => Err(missing),
        Field::WrongType => Err(wrong),
        Field::Ok(s) => Ok(s),
    }
}

fn rsa_key(k: &Map<String, Value>, alg: &str) -> Result<DecodingKey, JwtStatus> {
    if !(alg.is_empty() || alg.starts_with("RS") || alg.starts_with("PS")) {
        return Err(JwtStatus::JwksRsaKeyBadAlg);
    }
    let n = required(
        k,
        "n",
        JwtStatus::JwksRsaKeyMissingN,
        JwtStatus::JwksRsaKeyBadN,
    )?;
    let e = required(
        k,
        "e",
        JwtStatus::JwksRsaKeyMissingE,
        JwtStatus::JwksRsaKeyBadE,
    )?;
    match (b64url_decode(n), b64url_decode(e)) {
        (Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => {
            Ok(DecodingKey::from_rsa_raw_components(&n, &e))
        }
        _ => Err(JwtStatus::JwksRsaParseError),
    }
}

fn ec_key(k: &Map<String, Value>, alg: &str) -> Result<DecodingKey, JwtStatus> {
    if !alg.is_empty() && !alg.starts_with("ES") {
        return Err(JwtStatus::JwksEcKeyBadAlg);
    }
    let crv = match string_field(k, "crv") {
        Field::Missing => "",
        Field::WrongType => return Err(JwtStatus::JwksEcKeyBadCrv),
        Field::Ok(s) => s.as_str(),
    };
    if !alg.is_empty()
        && !crv.is_empty()
        && !matches!(
            (alg, crv),
            ("ES256", "P-256") | ("ES384", "P-384") | ("ES512", "P-521")
        )
    {
        return Err(JwtStatus::JwksEcKeyAlgNotCompatibleWithCrv);
    }
    // Neither set: P-256.
    let coord_len = if alg == "ES256" || crv == "P-256" || (alg.is_empty() && crv.is_empty()) {
        32
    } else if alg == "ES384" || crv == "P-384" {
        48
    } else if alg == "ES512" || crv == "P-521" {
        66
    } else {
        return Err(JwtStatus::JwksEcKeyAlgOrCrvUnsupported);
    };
    let x = required(
        k,
        "x",
        JwtStatus::JwksEcKeyMissingX,
        JwtStatus::JwksEcKeyBadX,
    )?;
    let y = required(
        k,
        "y",
        JwtStatus::JwksEcKeyMissingY,
        JwtStatus::JwksEcKeyBadY,
    )?;
    let (Some(xb), Some(yb)) = (b64url_decode(x), b64url_decode(y)) else {
        return Err(JwtStatus::JwksEcXorYBadBase64);
    };
    // Envoy sets the affine coordinates on a key of the curve: a coordinate of the wrong size
    // does not describe a point of it.
    if xb.len() != coord_len || yb.len() != coord_len {
        return Err(JwtStatus::JwksEcParseError);
    }
    let mut point = Vec::with_capacity(1 + 2 * coord_len);
    point.push(0x04);
    point.extend_from_slice(&xb);
    point.extend_from_slice(&yb);
    Ok(DecodingKey::from_ec_der(&point))
}

fn oct_key(k: &Map<String, Value>, alg: &str) -> Result<DecodingKey, JwtStatus> {
    if !alg.is_empty() && !matches!(alg, "HS256" | "HS384" | "HS512") {
        return Err(JwtStatus::JwksHmacKeyBadAlg);
    }
    let kv = required(
        k,
        "k",
        JwtStatus::JwksHmacKeyMissingK,
        JwtStatus::JwksHmacKeyBadK,
    )?;
    match b64url_decode(kv) {
        Some(key) if !key.is_empty() => Ok(DecodingKey::from_secret(&key)),
        _ => Err(JwtStatus::JwksOctBadBase64),
    }
}

fn okp_key(k: &Map<String, Value>, alg: &str) -> Result<DecodingKey, JwtStatus> {
    if !alg.is_empty() && alg != "EdDSA" {
        return Err(JwtStatus::JwksOkpKeyBadAlg);
    }
    let crv = required(
        k,
        "crv",
        JwtStatus::JwksOkpKeyMissingCrv,
        JwtStatus::JwksOkpKeyBadCrv,
    )?;
    if crv != "Ed25519" {
        return Err(JwtStatus::JwksOkpKeyCrvUnsupported);
    }
    let x = required(
        k,
        "x",
        JwtStatus::JwksOkpKeyMissingX,
        JwtStatus::JwksOkpKeyBadX,
    )?;
    let Some(xb) = b64url_decode(x) else {
        return Err(JwtStatus::JwksOkpXBadBase64);
    };
    if xb.len() != 32 {
        return Err(JwtStatus::JwksOkpXWrongLength);
    }
    Ok(DecodingKey::from_ed_der(&xb))
}

/// A JWT parsed (not yet verified), as Envoy's `Jwt::parseFromString` leaves it.
#[derive(Debug, Clone)]
pub(crate) struct Jwt<'t> {
    header_b64: &'t str,
    payload_b64: &'t str,
    pub(crate) alg: String,
    pub(crate) kid: String,
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) nbf: u64,
    pub(crate) exp: u64,
    pub(crate) audiences: Vec<String>,
    pub(crate) payload: Map<String, Value>,
    signature: Vec<u8>,
}

/// Envoy `StructUtils::GetUInt64`: absent = 0; a number must be a non-negative integer that
/// fits in 64 bits.
fn uint_claim(
    payload: &Map<String, Value>,
    name: &str,
    wrong: JwtStatus,
    range: JwtStatus,
) -> Result<u64, JwtStatus> {
    match payload.get(name) {
        None => Ok(0),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(u)
            } else {
                let f = n.as_f64().unwrap_or(-1.0);
                if f < 0.0 || f >= u64::MAX as f64 {
                    Err(range)
                } else {
                    // Protobuf's Struct keeps numbers as doubles; Envoy truncates.
                    Ok(f as u64)
                }
            }
        }
        Some(_) => Err(wrong),
    }
}

fn opt_string(obj: &Map<String, Value>, name: &str, wrong: JwtStatus) -> Result<String, JwtStatus> {
    match string_field(obj, name) {
        Field::Missing => Ok(String::new()),
        Field::WrongType => Err(wrong),
        Field::Ok(s) => Ok(s.clone()),
    }
}

impl<'t> Jwt<'t> {
    /// Envoy `Jwt::parseFromString`, check for check.
    pub(crate) fn parse(token: &'t str) -> Result<Jwt<'t>, JwtStatus> {
        // "jwt must have exactly 2 dots with 3 sections" (empty sections are skipped first).
        let parts: Vec<&str> = token.split('.').filter(|p| !p.is_empty()).collect();
        let [header_b64, payload_b64, signature_b64] = parts[..] else {
            return Err(JwtStatus::JwtBadFormat);
        };
        let header = b64url_decode(header_b64).ok_or(JwtStatus::JwtHeaderParseErrorBadBase64)?;
        let header: Map<String, Value> =
            serde_json::from_slice(&header).map_err(|_| JwtStatus::JwtHeaderParseErrorBadJson)?;
        let alg = match string_field(&header, "alg") {
            Field::Ok(a) => a.clone(),
            _ => return Err(JwtStatus::JwtHeaderBadAlg),
        };
        if !IMPLEMENTED_ALGS.contains(&alg.as_str()) {
            return Err(JwtStatus::JwtHeaderNotImplementedAlg);
        }
        let kid = opt_string(&header, "kid", JwtStatus::JwtHeaderBadKid)?;
        let payload = b64url_decode(payload_b64).ok_or(JwtStatus::JwtPayloadParseErrorBadBase64)?;
        let payload: Map<String, Value> =
            serde_json::from_slice(&payload).map_err(|_| JwtStatus::JwtPayloadParseErrorBadJson)?;
        let iss = opt_string(&payload, "iss", JwtStatus::JwtPayloadParseErrorIssNotString)?;
        let sub = opt_string(&payload, "sub", JwtStatus::JwtPayloadParseErrorSubNotString)?;
        uint_claim(
            &payload,
            "iat",
            JwtStatus::JwtPayloadParseErrorIatNotInteger,
            JwtStatus::JwtPayloadParseErrorIatOutOfRange,
        )?;
        let nbf = uint_claim(
            &payload,
            "nbf",
            JwtStatus::JwtPayloadParseErrorNbfNotInteger,
            JwtStatus::JwtPayloadParseErrorNbfOutOfRange,
        )?;
        let exp = uint_claim(
            &payload,
            "exp",
            JwtStatus::JwtPayloadParseErrorExpNotInteger,
            JwtStatus::JwtPayloadParseErrorExpOutOfRange,
        )?;
        opt_string(&payload, "jti", JwtStatus::JwtPayloadParseErrorJtiNotString)?;
        // "aud" can be a string or a list of strings.
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtStatus::JwtPayloadParseErrorAudNotString)?,
            Some(_) => return Err(JwtStatus::JwtPayloadParseErrorAudNotString),
        };
        let signature =
            b64url_decode(signature_b64).ok_or(JwtStatus::JwtSignatureParseErrorBadBase64)?;
        Ok(Jwt {
            header_b64,
            payload_b64,
            alg,
            kid,
            iss,
            sub,
            nbf,
            exp,
            audiences,
            payload,
            signature,
        })
    }

    /// The payload segment as it appeared in the token (Envoy `payload_str_base64url_`).
    pub(crate) fn payload_b64(&self) -> &'t str {
        self.payload_b64
    }

    /// Envoy `Jwt::verifyTimeConstraint`: `nbf` and `exp` with `skew` seconds of tolerance.
    pub(crate) fn verify_time(&self, now: u64, skew: u64) -> Result<(), JwtStatus> {
        if now.saturating_add(skew) < self.nbf {
            return Err(JwtStatus::JwtNotYetValid);
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Err(JwtStatus::JwtExpired);
        }
        Ok(())
    }

    /// Envoy `verifyJwtWithoutTimeChecking`: try every key whose `kid` (when both have one)
    /// and `alg` (when the key has one) agree with the token; "Jwks doesn't have key to match
    /// kid or alg from Jwt" when none did, "Jwt verification fails" when some did but none
    /// verified the signature.
    pub(crate) fn verify_signature(&self, jwks: &Jwks) -> Result<(), JwtStatus> {
        let signed = format!("{}.{}", self.header_b64, self.payload_b64);
        let sig_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.signature);
        // ES512 is in Envoy's list but not in jsonwebtoken's: no key can verify it here.
        let alg = Algorithm::from_str(&self.alg).ok();
        let mut kid_alg_matched = false;
        for jwk in &jwks.keys {
            if !self.kid.is_empty() && !jwk.kid.is_empty() && jwk.kid != self.kid {
                continue;
            }
            if !jwk.alg.is_empty() && jwk.alg != self.alg {
                continue;
            }
            kid_alg_matched = true;
            let family_ok = match jwk.kty {
                Kty::Ec => self.alg.starts_with("ES"),
                Kty::Rsa => self.alg.starts_with("RS") || self.alg.starts_with("PS"),
                Kty::Oct => self.alg.starts_with("HS"),
                Kty::Okp => {
                    if self.alg == "EdDSA" && self.signature.len() != 64 {
                        return Err(JwtStatus::JwtEd25519SignatureWrongLength);
                    }
                    self.alg == "EdDSA"
                }
            };
            let Some(alg) = alg.filter(|_| family_ok) else {
                continue;
            };
            if jsonwebtoken::crypto::verify(&sig_b64, signed.as_bytes(), &jwk.key, alg)
                .unwrap_or(false)
            {
                return Ok(());
            }
        }
        Err(if kid_alg_matched {
            JwtStatus::JwtVerificationFail
        } else {
            JwtStatus::JwksKidAlgMismatch
        })
    }
}
