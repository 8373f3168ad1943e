//! Test helpers (feature `testing`): signing keys generated at test time, their JWKS, and a
//! JWT signer written independently of the verifier (aws-lc-rs directly), so a test checks
//! verification against a second implementation. Never used by the data path.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// Which algorithm a [`TestKey`] signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestAlg {
    RS256,
    RS384,
    RS512,
    PS256,
    ES256,
    ES384,
}

impl TestAlg {
    pub fn name(self) -> &'static str {
        match self {
            TestAlg::RS256 => "RS256",
            TestAlg::RS384 => "RS384",
            TestAlg::RS512 => "RS512",
            TestAlg::PS256 => "PS256",
            TestAlg::ES256 => "ES256",
            TestAlg::ES384 => "ES384",
        }
    }
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A signing key with a `kid`.
pub struct TestKey {
    pub kid: String,
    pub alg: TestAlg,
    pair: Pair,
}

impl TestKey {
    /// A fresh key pair for `alg` (RSA keys are 2048-bit).
    pub fn generate(alg: TestAlg, kid: &str) -> TestKey {
        let pair = match alg {
            TestAlg::RS256 | TestAlg::RS384 | TestAlg::RS512 | TestAlg::PS256 => {
                Pair::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).expect("generate RSA key"))
            }
            TestAlg::ES256 => Pair::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                    .expect("generate P-256 key"),
            ),
            TestAlg::ES384 => Pair::Ec(
                EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)
                    .expect("generate P-384 key"),
            ),
        };
        TestKey {
            kid: kid.to_string(),
            alg,
            pair,
        }
    }

    /// The public key as a JWK (with `kid`, `alg` and `use: sig`).
    pub fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(k) => {
                let pk = k.public_key();
                json!({
                    "kty": "RSA", "kid": self.kid, "alg": self.alg.name(), "use": "sig",
                    "n": URL_SAFE_NO_PAD.encode(pk.modulus().big_endian_without_leading_zero()),
                    "e": URL_SAFE_NO_PAD.encode(pk.exponent().big_endian_without_leading_zero()),
                })
            }
            Pair::Ec(k) => {
                let point = k.public_key().as_ref();
                let n = (point.len() - 1) / 2;
                let crv = if n == 32 { "P-256" } else { "P-384" };
                json!({
                    "kty": "EC", "kid": self.kid, "alg": self.alg.name(), "use": "sig", "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..1 + n]),
                    "y": URL_SAFE_NO_PAD.encode(&point[1 + n..]),
                })
            }
        }
    }

    /// Sign `claims` with a header `{"alg", "kid", "typ": "JWT"}`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.alg.name(), "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }

    /// Sign with an arbitrary header (for `kid`/`alg` mismatch tests).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match &self.pair {
            Pair::Rsa(k) => {
                let enc: &'static dyn signature::RsaEncoding = match self.alg {
                    TestAlg::RS384 => &signature::RSA_PKCS1_SHA384,
                    TestAlg::RS512 => &signature::RSA_PKCS1_SHA512,
                    TestAlg::PS256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(enc, &rng, signing_input.as_bytes(), &mut sig)
                    .expect("RSA sign");
                sig
            }
            Pair::Ec(k) => k
                .sign(&rng, signing_input.as_bytes())
                .expect("ECDSA sign")
                .as_ref()
                .to_vec(),
        };
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// A JWKS document with the public keys of `keys`.
pub fn jwks(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}
