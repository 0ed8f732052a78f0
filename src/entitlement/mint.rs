//! Making keys and tokens: for `stella-signer dev token`, the demo and tests.
//!
//! The signer only ever verifies OpToks, DPoP proofs and licences; in production they come
//! from the Authority, the publisher and the licensing service. To exercise the enforcing
//! gate without those services, this module makes the same artefacts with locally generated
//! keys: a PKCS#8 PEM private key plus its public JWK (to put into a JWKS file), and compact
//! JWS tokens signed with it. The algorithm always follows the key (ES256 for P-256, EdDSA
//! for Ed25519), as on the verifying side.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::jwks::{KeyAlg, thumbprint_ec, thumbprint_okp};
use super::jws::b64url;

/// The key types the gate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintAlg {
    /// ECDSA P-256 (JWS `ES256`).
    Es256,
    /// Ed25519 (JWS `EdDSA`).
    EdDsa,
}

/// Why a key or a token could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("key generation failed")]
    Generate,
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
    /// The RFC 7638 SHA-256 thumbprint, the value of an OpTok's `cnf.jkt` for this key.
    pub fn thumbprint(&self) -> Result<String, MintError> {
        match (self.kty.as_str(), self.crv.as_str(), &self.y) {
            ("EC", "P-256", Some(y)) => Ok(thumbprint_ec(&self.x, y)),
            ("OKP", "Ed25519", None) => Ok(thumbprint_okp(&self.x)),
            _ => Err(MintError::BadJwk(format!(
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

/// A JWKS document holding `keys`.
pub fn jwks(keys: &[Jwk]) -> Value {
    serde_json::json!({ "keys": keys })
}

/// RFC 7638 thumbprint of `jwk` (what an Authority puts into `cnf.jkt`). Empty for a key
/// type the gate does not accept; [`Jwk::thumbprint`] says why instead.
pub fn jkt_of(jwk: &Jwk) -> String {
    jwk.thumbprint().unwrap_or_default()
}

/// `ath` of a DPoP proof for `optok`: base64url(SHA-256(ASCII of the token)).
pub fn ath_of(optok: &str) -> String {
    b64url(&Sha256::digest(optok.as_bytes()))
}

fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A private key read from PEM, with what is needed to sign and to publish it.
struct LoadedKey {
    alg: KeyAlg,
    encoding: jsonwebtoken::EncodingKey,
    public: Jwk,
}

fn load(key_pem: &str) -> Result<LoadedKey, MintError> {
    let block = pem::parse(key_pem).map_err(|e| MintError::NotPkcs8(e.to_string()))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(MintError::NotPkcs8(format!("PEM label {}", block.tag())));
    }
    let der = block.contents();
    let rng = SystemRandom::new();
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
        let point = pair.public_key().as_ref();
        if point.len() != 65 {
            return Err(MintError::UnsupportedKey);
        }
        let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes())
            .map_err(|e| MintError::NotPkcs8(e.to_string()))?;
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
            .map_err(|e| MintError::NotPkcs8(e.to_string()))?;
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
    Err(MintError::UnsupportedKey)
}

/// Generates a key pair: the private key as PKCS#8 PEM and the public JWK, with
/// `kid` = its thumbprint, `alg` and `use: sig`, ready for a JWKS file.
pub fn generate_signing_key(alg: MintAlg) -> Result<(String, Jwk), MintError> {
    let rng = SystemRandom::new();
    let pkcs8 = match alg {
        MintAlg::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
        MintAlg::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
    }
    .map_err(|_| MintError::Generate)?;
    let pem_text = pem_of(pkcs8.as_ref());
    let loaded = load(&pem_text)?;
    let mut jwk = loaded.public;
    jwk.kid = Some(jwk.thumbprint()?);
    jwk.alg = Some(loaded.alg.name().into());
    jwk.use_ = Some("sig".into());
    Ok((pem_text, jwk))
}

/// The public JWK of a private key (no `kid`).
pub fn public_jwk(key_pem: &str) -> Result<Jwk, MintError> {
    Ok(load(key_pem)?.public)
}

/// Signs `claims` under `header` (a JSON object; `alg` is set from the key unless the
/// header already has one). Signs whatever it is given, so tests can make bad tokens too.
pub fn sign_compact(key_pem: &str, header: &Value, claims: &Value) -> Result<String, MintError> {
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
            .map_err(|e| MintError::Sign(e.to_string()))?;
    Ok(format!("{message}.{signature}"))
}

/// An OpTok (Authority access token) with `claims`, signed by the Authority key `kid`.
pub fn mint_optok(key_pem: &str, kid: &str, claims: &Value) -> Result<String, MintError> {
    sign_compact(
        key_pem,
        &serde_json::json!({"typ": "JWT", "kid": kid}),
        claims,
    )
}

/// A licence (`poe.format: jwt`) with `claims`, signed by the licensing key `kid`.
pub fn mint_poe(key_pem: &str, kid: &str, claims: &Value) -> Result<String, MintError> {
    sign_compact(
        key_pem,
        &serde_json::json!({"typ": "JWT", "kid": kid}),
        claims,
    )
}

/// A DPoP proof (RFC 9449) for publishing a job carrying `optok`: header `typ: dpop+jwt`
/// with the public key of `key_pem`; claims `htm: PUBLISH`, `htu`, `iat`, `jti` and `ath`.
pub fn mint_dpop(
    key_pem: &str,
    optok: &str,
    htu: &str,
    iat: u64,
    jti: &str,
) -> Result<String, MintError> {
    let jwk = public_jwk(key_pem)?;
    sign_compact(
        key_pem,
        &serde_json::json!({"typ": "dpop+jwt", "jwk": jwk}),
        &serde_json::json!({
            "htm": "PUBLISH",
            "htu": htu,
            "iat": iat,
            "jti": jti,
            "ath": ath_of(optok),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_tokens_round_trip() {
        for alg in [MintAlg::Es256, MintAlg::EdDsa] {
            let (pem_text, jwk) = generate_signing_key(alg).unwrap();
            assert!(pem_text.starts_with("-----BEGIN PRIVATE KEY-----"));
            assert_eq!(jwk.kid.as_deref(), Some(jkt_of(&jwk).as_str()));
            assert_eq!(public_jwk(&pem_text).unwrap(), jwk.bare());
            let token = mint_optok(&pem_text, "k", &serde_json::json!({"sub": "x"})).unwrap();
            let header = super::super::jws::read_header(&token).unwrap();
            let expected = match alg {
                MintAlg::Es256 => "ES256",
                MintAlg::EdDsa => "EdDSA",
            };
            assert_eq!(header.alg, expected);
            let key = super::super::jwks::PublicKey::from_jwk(&serde_json::to_value(&jwk).unwrap())
                .unwrap();
            let claims: Value = super::super::jws::verify(&token, &header, &key).unwrap();
            assert_eq!(claims["sub"], "x");
        }
        assert!(matches!(public_jwk("nope"), Err(MintError::NotPkcs8(_))));
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
