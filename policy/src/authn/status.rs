//! Envoy's JWT verification outcomes (`source/common/jwt/status.h`) and the exact strings
//! `getStatusString` gives them: Envoy's `jwt_authn` filter answers a failed request with the
//! string as the body.

use std::fmt;

/// Why a JWT (or a JWKS) was rejected, named as in Envoy's `JwtVerify::Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtStatus {
    JwtMissed,
    JwtNotYetValid,
    JwtExpired,
    JwtBadFormat,
    JwtHeaderParseErrorBadBase64,
    JwtHeaderParseErrorBadJson,
    JwtHeaderBadAlg,
    JwtHeaderNotImplementedAlg,
    JwtHeaderBadKid,
    JwtPayloadParseErrorBadBase64,
    JwtEd25519SignatureWrongLength,
    JwtPayloadParseErrorBadJson,
    JwtPayloadParseErrorIssNotString,
    JwtPayloadParseErrorSubNotString,
    JwtPayloadParseErrorIatNotInteger,
    JwtPayloadParseErrorIatOutOfRange,
    JwtPayloadParseErrorNbfNotInteger,
    JwtPayloadParseErrorNbfOutOfRange,
    JwtPayloadParseErrorExpNotInteger,
    JwtPayloadParseErrorExpOutOfRange,
    JwtPayloadParseErrorJtiNotString,
    JwtPayloadParseErrorAudNotString,
    JwtSignatureParseErrorBadBase64,
    JwtUnknownIssuer,
    JwtAudienceNotAllowed,
    JwtVerificationFail,
    JwksParseError,
    JwksNoKeys,
    JwksBadKeys,
    JwksNoValidKeys,
    JwksKidAlgMismatch,
    JwksRsaParseError,
    JwksEcXorYBadBase64,
    JwksEcParseError,
    JwksOctBadBase64,
    JwksOkpXBadBase64,
    JwksOkpXWrongLength,
    JwksFetchFail,
    JwksMissingKty,
    JwksBadKty,
    JwksNotImplementedKty,
    JwksRsaKeyBadAlg,
    JwksRsaKeyMissingN,
    JwksRsaKeyBadN,
    JwksRsaKeyMissingE,
    JwksRsaKeyBadE,
    JwksEcKeyBadAlg,
    JwksEcKeyBadCrv,
    JwksEcKeyAlgOrCrvUnsupported,
    JwksEcKeyAlgNotCompatibleWithCrv,
    JwksEcKeyMissingX,
    JwksEcKeyBadX,
    JwksEcKeyMissingY,
    JwksEcKeyBadY,
    JwksHmacKeyBadAlg,
    JwksHmacKeyMissingK,
    JwksHmacKeyBadK,
    JwksOkpKeyBadAlg,
    JwksOkpKeyMissingCrv,
    JwksOkpKeyBadCrv,
    JwksOkpKeyCrvUnsupported,
    JwksOkpKeyMissingX,
    JwksOkpKeyBadX,
}

impl JwtStatus {
    /// Envoy's `getStatusString`, byte for byte.
    pub fn message(self) -> &'static str {
        use JwtStatus::*;
        match self {
            JwtMissed => "Jwt is missing",
            JwtNotYetValid => "Jwt not yet valid",
            JwtExpired => "Jwt is expired",
            JwtBadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            JwtHeaderParseErrorBadBase64 => "Jwt header is an invalid Base64url encoded",
            JwtHeaderParseErrorBadJson => "Jwt header is an invalid JSON",
            JwtHeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            JwtHeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            JwtHeaderBadKid => "Jwt header [kid] field is not a string",
            JwtPayloadParseErrorBadBase64 => "Jwt payload is an invalid Base64url encoded",
            JwtEd25519SignatureWrongLength => "Jwt ED25519 signature is wrong length",
            JwtPayloadParseErrorBadJson => "Jwt payload is an invalid JSON",
            JwtPayloadParseErrorIssNotString => "Jwt payload [iss] field is not a string",
            JwtPayloadParseErrorSubNotString => "Jwt payload [sub] field is not a string",
            JwtPayloadParseErrorIatNotInteger => "Jwt payload [iat] field is not an integer",
            JwtPayloadParseErrorIatOutOfRange => {
                "Jwt payload [iat] field is not a positive 64 bit integer"
            }
            JwtPayloadParseErrorNbfNotInteger => "Jwt payload [nbf] field is not an integer",
            JwtPayloadParseErrorNbfOutOfRange => {
                "Jwt payload [nbf] field is not a positive 64 bit integer"
            }
            JwtPayloadParseErrorExpNotInteger => "Jwt payload [exp] field is not an integer",
            JwtPayloadParseErrorExpOutOfRange => {
                "Jwt payload [exp] field is not a positive 64 bit integer"
            }
            JwtPayloadParseErrorJtiNotString => "Jwt payload [jti] field is not a string",
            JwtPayloadParseErrorAudNotString => {
                "Jwt payload [aud] field is not a string or string list"
            }
            JwtSignatureParseErrorBadBase64 => "Jwt signature is an invalid Base64url encoded",
            JwtUnknownIssuer => "Jwt issuer is not configured",
            JwtAudienceNotAllowed => "Audiences in Jwt are not allowed",
            JwtVerificationFail => "Jwt verification fails",
            JwksParseError => "Jwks is an invalid JSON",
            JwksNoKeys => "Jwks does not have [keys] field",
            JwksBadKeys => "[keys] in Jwks is not an array",
            JwksNoValidKeys => "Jwks doesn't have any valid public key",
            JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            JwksRsaParseError => "Jwks RSA [n] or [e] field is missing or has a parse error",
            JwksEcXorYBadBase64 => "Jwks EC [x] or [y] field is an invalid Base64.",
            JwksEcParseError => "Jwks EC [x] and [y] fields have a parse error.",
            JwksOctBadBase64 => "Jwks Oct key is an invalid Base64",
            JwksOkpXBadBase64 => "Jwks OKP [x] field is an invalid Base64.",
            JwksOkpXWrongLength => "Jwks OKP [x] field is wrong length.",
            JwksFetchFail => "Jwks remote fetch is failed",
            JwksMissingKty => "[kty] is missing in [keys]",
            JwksBadKty => "[kty] is bad in [keys]",
            JwksNotImplementedKty => "[kty] is not supported in [keys]",
            JwksRsaKeyBadAlg => "[alg] is not started with [RS] or [PS] for an RSA key",
            JwksRsaKeyMissingN => "[n] field is missing for a RSA key",
            JwksRsaKeyBadN => "[n] field is not string for a RSA key",
            JwksRsaKeyMissingE => "[e] field is missing for a RSA key",
            JwksRsaKeyBadE => "[e] field is not string for a RSA key",
            JwksEcKeyBadAlg => "[alg] is not started with [ES] for an EC key",
            JwksEcKeyBadCrv => "[crv] field is not string for an EC key",
            JwksEcKeyAlgOrCrvUnsupported => "[crv] or [alg] field is not supported for an EC key",
            JwksEcKeyAlgNotCompatibleWithCrv => {
                "[crv] field specified is not compatible with [alg] for an EC key"
            }
            JwksEcKeyMissingX => "[x] field is missing for an EC key",
            JwksEcKeyBadX => "[x] field is not string for an EC key",
            JwksEcKeyMissingY => "[y] field is missing for an EC key",
            JwksEcKeyBadY => "[y] field is not string for an EC key",
            JwksHmacKeyBadAlg => "[alg] does not start with [HS] for an HMAC key",
            JwksHmacKeyMissingK => "[k] field is missing for an HMAC key",
            JwksHmacKeyBadK => "[k] field is not string for an HMAC key",
            JwksOkpKeyBadAlg => "[alg] is not [EdDSA] for an OKP key",
            JwksOkpKeyMissingCrv => "[crv] field is missing for an OKP key",
            JwksOkpKeyBadCrv => "[crv] field is not string for an OKP key",
            JwksOkpKeyCrvUnsupported => "[crv] field is not supported for an OKP key",
            JwksOkpKeyMissingX => "[x] field is missing for an OKP key",
            JwksOkpKeyBadX => "[x] field is not string for an OKP key",
        }
    }

    /// The status of Envoy's local reply: 403 for a disallowed audience, 401 for everything
    /// else (`jwt_authn/filter.cc` `onComplete`).
    pub fn http_status(self) -> u16 {
        if self == JwtStatus::JwtAudienceNotAllowed {
            403
        } else {
            401
        }
    }
}

impl fmt::Display for JwtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for JwtStatus {}
