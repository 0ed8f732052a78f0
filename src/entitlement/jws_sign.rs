//! Signing a compact JWS with a local PKCS#8 key (P-256 or Ed25519): the one place the
//! service signs a JWS, for operator key commands (`keys revoke|rotate|restore|cosign`,
//! `control/sign.rs`). The gates themselves only verify.
//!
//! The algorithm always follows the key (ES256 for P-256, EdDSA for Ed25519), as on the
//! verifying side. The tools crate mints OpToks, DPoP proofs and licences on top of this
//! (`tools/src/mint.rs`).

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::jwks::{KeyAlg, thumbprint_ec, thumbprint_okp};
use super::jws::b64url;

/// Why a key could not be read or a token not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsSignError {
    #[error("not a PKCS#8 PEM private key: {0}")]
    NotPkcs8(String),
    #[error("unsupported key: only P-256 and Ed25519 PKCS#8 keys can sign")]
    UnsupportedKey,
    #[error("JWK has no thumbprint: {0}")]
    BadJwk(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A public JWK as published in a JWKS (or carried in a DPoP proof header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl Jwk {
    /// The RFC 7638 SHA-256 thumbprint: the default `kid` of an operator key, and the value
    /// of an OpTok's `cnf.jkt` for a proof key.
    pub fn thumbprint(&self) -> Result<String, JwsSignError> {
        match (self.kty.as_str(), self.crv.as_str(), &self.y) {
            ("EC", "P-256", Some(y)) => Ok(thumbprint_ec(&self.x, y)),
            ("OKP", "Ed25519", None) => Ok(thumbprint_okp(&self.x)),
            _ => Err(JwsSignError::BadJwk(format!(
                "kty {} crv {}",
                self.kty, self.crv
            ))),
        }
    }

    /// The same key without `kid`, `alg` and `use` (the form carried in a DPoP header).
    pub fn bare(&self) -> Jwk {
        Jwk {
            kid: None,
            alg: None,
            use_: None,
            ..self.clone()
        }
    }
}

/// A private key read from PEM, with what is needed to sign and to publish it.
struct LoadedKey {
    alg: KeyAlg,
    encoding: jsonwebtoken::EncodingKey,
    public: Jwk,
}

fn load(key_pem: &str) -> Result<LoadedKey, JwsSignError> {
    let block = pem::parse(key_pem).map_err(|e| JwsSignError::NotPkcs8(e.to_string()))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(JwsSignError::NotPkcs8(format!("PEM label {}", block.tag())));
    }
    let der = block.contents();
    let rng = SystemRandom::new();
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
        let point = pair.public_key().as_ref();
        if point.len() != 65 {
            return Err(JwsSignError::UnsupportedKey);
        }
        let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes())
            .map_err(|e| JwsSignError::NotPkcs8(e.to_string()))?;
        return Ok(LoadedKey {
            alg: KeyAlg::Es256,
            encoding,
            public: Jwk {
                kty: "EC".into(),
                crv: "P-256".into(),
                x: b64url(&point[1..33]),
                y: Some(b64url(&point[33..65])),
                kid: None,
                alg: None,
                use_: None,
            },
        });
    }
    if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        let encoding = jsonwebtoken::EncodingKey::from_ed_pem(key_pem.as_bytes())
            .map_err(|e| JwsSignError::NotPkcs8(e.to_string()))?;
        return Ok(LoadedKey {
            alg: KeyAlg::EdDsa,
            encoding,
            public: Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: b64url(pair.public_key().as_ref()),
                y: None,
                kid: None,
                alg: None,
                use_: None,
            },
        });
    }
    Err(JwsSignError::UnsupportedKey)
}

/// The public JWK of a private key (no `kid`, `alg` or `use`).
pub fn public_jwk(key_pem: &str) -> Result<Jwk, JwsSignError> {
    Ok(load(key_pem)?.public)
}

/// Signs `claims` under `header` (a JSON object; `alg` is set from the key unless the
/// header already has one). Signs whatever it is given, so tests can make bad tokens too.
pub fn sign_compact(key_pem: &str, header: &Value, claims: &Value) -> Result<String, JwsSignError> {
    let key = load(key_pem)?;
    let mut header = header.clone();
    if let Some(obj) = header.as_object_mut() {
        obj.entry("alg")
            .or_insert_with(|| Value::String(key.alg.name().into()));
    }
    let message = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, key.alg.algorithm())
            .map_err(|e| JwsSignError::Sign(e.to_string()))?;
    Ok(format!("{message}.{signature}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_with_the_public_jwk() {
        let rng = SystemRandom::new();
        let keys = [
            (
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap(),
                "ES256",
            ),
            (Ed25519KeyPair::generate_pkcs8(&rng).unwrap(), "EdDSA"),
        ];
        for (pkcs8, expected) in keys {
            let pem_text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
            let token = sign_compact(
                &pem_text,
                &serde_json::json!({"kid": "k"}),
                &serde_json::json!({"sub": "x"}),
            )
            .unwrap();
            let header = super::super::jws::read_header(&token).unwrap();
            assert_eq!(header.alg, expected);
            let jwk = public_jwk(&pem_text).unwrap();
            let key = super::super::jwks::PublicKey::from_jwk(&serde_json::to_value(&jwk).unwrap())
                .unwrap();
            assert_eq!(key.thumbprint(), jwk.thumbprint().unwrap());
            let claims: Value = super::super::jws::verify(&token, &header, &key).unwrap();
            assert_eq!(claims["sub"], "x");
        }
        assert!(matches!(public_jwk("nope"), Err(JwsSignError::NotPkcs8(_))));
    }

    #[test]
    fn rfc8037_example_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of its Ed25519 example key.
        let jwk = Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
            y: None,
            kid: None,
            alg: None,
            use_: None,
        };
        assert_eq!(
            jwk.thumbprint().unwrap(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }
}
