//! Making keys and tokens: for `stella-signer-tools dev token`, the bench, the demo and
//! tests.
//!
//! The signer only ever verifies OpToks, DPoP proofs and licences; in production they come
//! from the Authority, the publisher and the licensing service. To exercise the enforcing
//! gate without those services, this module makes the same artefacts with locally generated
//! keys: a PKCS#8 PEM private key plus its public JWK (to put into a JWKS file), and compact
//! JWS tokens signed with it, by the service's own JWS signer
//! (`stella_signer::entitlement::jws_sign`, which operator key commands use). The algorithm
//! always follows the key (ES256 for P-256, EdDSA for Ed25519), as on the verifying side.

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use stella_signer::entitlement::jws_sign::{Jwk, JwsSignError, public_jwk, sign_compact};

/// The key types the gate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintAlg {
    /// ECDSA P-256 (JWS `ES256`).
    Es256,
    /// Ed25519 (JWS `EdDSA`).
    EdDsa,
}

impl MintAlg {
    /// The JWS `alg` of this key type.
    pub fn name(self) -> &'static str {
        match self {
            MintAlg::Es256 => "ES256",
            MintAlg::EdDsa => "EdDSA",
        }
    }
}

/// Why a key or a token could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("key generation failed")]
    Generate,
    #[error(transparent)]
    Key(#[from] JwsSignError),
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
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(optok.as_bytes()))
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
    let pem_text = pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    let mut jwk = public_jwk(&pem_text)?;
    jwk.kid = Some(jwk.thumbprint()?);
    jwk.alg = Some(alg.name().into());
    jwk.use_ = Some("sig".into());
    Ok((pem_text, jwk))
}

/// An OpTok (Authority access token) with `claims`, signed by the Authority key `kid`.
pub fn mint_optok(key_pem: &str, kid: &str, claims: &Value) -> Result<String, MintError> {
    Ok(sign_compact(
        key_pem,
        &serde_json::json!({"typ": "JWT", "kid": kid}),
        claims,
    )?)
}

/// A licence (`poe.format: jwt`) with `claims`, signed by the licensing key `kid`.
pub fn mint_poe(key_pem: &str, kid: &str, claims: &Value) -> Result<String, MintError> {
    Ok(sign_compact(
        key_pem,
        &serde_json::json!({"typ": "JWT", "kid": kid}),
        claims,
    )?)
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
    Ok(sign_compact(
        key_pem,
        &serde_json::json!({"typ": "dpop+jwt", "jwk": jwk}),
        &serde_json::json!({
            "htm": "PUBLISH",
            "htu": htu,
            "iat": iat,
            "jti": jti,
            "ath": ath_of(optok),
        }),
    )?)
}

#[cfg(test)]
mod tests {
    use stella_signer::entitlement::{jwks, jws};

    use super::*;

    #[test]
    fn keys_and_tokens_round_trip() {
        for alg in [MintAlg::Es256, MintAlg::EdDsa] {
            let (pem_text, jwk) = generate_signing_key(alg).unwrap();
            assert!(pem_text.starts_with("-----BEGIN PRIVATE KEY-----"));
            assert_eq!(jwk.kid.as_deref(), Some(jkt_of(&jwk).as_str()));
            assert_eq!(jwk.alg.as_deref(), Some(alg.name()));
            assert_eq!(public_jwk(&pem_text).unwrap(), jwk.bare());
            let token = mint_optok(&pem_text, "k", &serde_json::json!({"sub": "x"})).unwrap();
            let header = jws::read_header(&token).unwrap();
            assert_eq!(header.alg, alg.name());
            assert_eq!(header.kid.as_deref(), Some("k"));
            let key = jwks::PublicKey::from_jwk(&serde_json::to_value(&jwk).unwrap()).unwrap();
            let claims: Value = jws::verify(&token, &header, &key).unwrap();
            assert_eq!(claims["sub"], "x");
        }
    }

    #[test]
    fn dpop_proofs_carry_the_key_and_the_token_hash() {
        let (pem_text, jwk) = generate_signing_key(MintAlg::EdDsa).unwrap();
        let proof = mint_dpop(&pem_text, "the-optok", "nats:sign.requests", 7, "j-1").unwrap();
        let header = jws::read_header(&proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        assert_eq!(
            header.fields["jwk"],
            serde_json::to_value(jwk.bare()).unwrap()
        );
        let key = jwks::PublicKey::from_jwk(&serde_json::to_value(&jwk).unwrap()).unwrap();
        let claims: Value = jws::verify(&proof, &header, &key).unwrap();
        assert_eq!(claims["ath"], ath_of("the-optok"));
        assert_eq!(claims["htm"], "PUBLISH");
        assert_eq!(
            (claims["iat"].as_u64(), claims["jti"].as_str()),
            (Some(7), Some("j-1"))
        );
    }
}
