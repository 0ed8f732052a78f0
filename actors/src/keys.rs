//! The `KeySigner` port and the public-key side of our two algorithms.
//!
//! Shaped like rustls' `SigningKey`/`Signer`: a backend implements one small, object-safe
//! trait, and everything the outside world needs to know about the key (its keyid,
//! algorithm, PEM, certificate chain) travels with each signature as a [`SignerIdentity`].

use std::sync::Arc;

use async_trait::async_trait;
use ring::signature::{ECDSA_P256_SHA256_ASN1, ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SignerError;

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, BIT STRING of 66 bytes).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (id-Ed25519, BIT STRING of 33 bytes).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A signature algorithm the signer emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA over P-256 with SHA-256; signatures are ASN.1 DER.
    #[serde(rename = "ecdsa-p256-sha256")]
    EcdsaP256Sha256,
    /// Ed25519 (pure, RFC 8032).
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl KeyAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Self::Ed25519 => "ed25519",
        }
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ecdsa-p256-sha256" | "ecdsa-p256" => Ok(Self::EcdsaP256Sha256),
            "ed25519" => Ok(Self::Ed25519),
            other => Err(format!("unknown algorithm {other:?} (ecdsa-p256, ed25519)")),
        }
    }
}

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    File,
    Pkcs11,
    Yubikey,
    Fulcio,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Pkcs11 => "pkcs11",
            Self::Yubikey => "yubikey",
            Self::Fulcio => "fulcio",
        }
    }
}

/// Keyful (a long-lived key, identified by its keyid) or keyless (ephemeral key, Fulcio certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    Keyful,
    Keyless,
}

/// A public key we can verify with, kept as its SubjectPublicKeyInfo DER.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    algorithm: KeyAlgorithm,
    spki_der: Vec<u8>,
}

/// Why a public key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    #[error("not PEM: {0}")]
    Pem(String),
    #[error("PEM block is {0:?}, expected PUBLIC KEY")]
    WrongPemTag(String),
    #[error("unsupported key: only ECDSA P-256 and Ed25519 SubjectPublicKeyInfo are accepted")]
    Unsupported,
}

impl PublicKey {
    /// Parses SubjectPublicKeyInfo DER. DER is canonical, so for our two algorithms the
    /// encoding is a fixed prefix followed by the raw key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, PublicKeyError> {
        let algorithm =
            if der.len() == P256_SPKI_PREFIX.len() + 65 && der.starts_with(&P256_SPKI_PREFIX) {
                if der[P256_SPKI_PREFIX.len()] != 0x04 {
                    return Err(PublicKeyError::Unsupported);
                }
                KeyAlgorithm::EcdsaP256Sha256
            } else if der.len() == ED25519_SPKI_PREFIX.len() + 32
                && der.starts_with(&ED25519_SPKI_PREFIX)
            {
                KeyAlgorithm::Ed25519
            } else {
                return Err(PublicKeyError::Unsupported);
            };
        Ok(Self {
            algorithm,
            spki_der: der.to_vec(),
        })
    }

    /// Builds the SPKI of a raw key: an uncompressed P-256 point (65 bytes) or a 32-byte Ed25519 key.
    pub fn from_raw(algorithm: KeyAlgorithm, raw: &[u8]) -> Result<Self, PublicKeyError> {
        let prefix: &[u8] = match algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => &P256_SPKI_PREFIX,
            KeyAlgorithm::Ed25519 => &ED25519_SPKI_PREFIX,
        };
        let mut der = Vec::with_capacity(prefix.len() + raw.len());
        der.extend_from_slice(prefix);
        der.extend_from_slice(raw);
        Self::from_spki_der(&der)
    }

    /// Parses a `-----BEGIN PUBLIC KEY-----` PEM block.
    pub fn from_pem(text: &str) -> Result<Self, PublicKeyError> {
        let block = pem::parse(text).map_err(|e| PublicKeyError::Pem(e.to_string()))?;
        if block.tag() != "PUBLIC KEY" {
            return Err(PublicKeyError::WrongPemTag(block.tag().to_string()));
        }
        Self::from_spki_der(block.contents())
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The raw key bytes after the SPKI header.
    pub fn raw(&self) -> &[u8] {
        let skip = match self.algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => P256_SPKI_PREFIX.len(),
            KeyAlgorithm::Ed25519 => ED25519_SPKI_PREFIX.len(),
        };
        &self.spki_der[skip..]
    }

    /// PEM (`PUBLIC KEY`) with LF line endings.
    pub fn to_pem(&self) -> String {
        pem::encode_config(
            &pem::Pem::new("PUBLIC KEY", self.spki_der.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// The contract's keyid: lowercase hex SHA-256 of the SPKI DER.
    pub fn keyid(&self) -> String {
        hex::encode(Sha256::digest(&self.spki_der))
    }

    /// Verifies `sig` over `message`. ECDSA signatures must be ASN.1 DER: a raw r||s
    /// signature is refused, as every DSSE verifier of P-256 does.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn ring::signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => &ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::Ed25519 => &ED25519,
        };
        UnparsedPublicKey::new(alg, self.raw())
            .verify(message, sig)
            .is_ok()
    }
}

/// Who made a signature, as the result's `signers[]` entry reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerIdentity {
    pub keyid: String,
    pub algorithm: KeyAlgorithm,
    pub source: KeySource,
    pub mode: KeyMode,
    pub public_key: PublicKey,
    /// PEM certificates, leaf first (keyless, or a configured chain for a keyful key).
    pub certificate_chain: Vec<String>,
}

impl SignerIdentity {
    /// The identity of a keyful key without a certificate chain.
    pub fn keyful(public_key: PublicKey, source: KeySource) -> Self {
        Self {
            keyid: public_key.keyid(),
            algorithm: public_key.algorithm(),
            source,
            mode: KeyMode::Keyful,
            public_key,
            certificate_chain: Vec::new(),
        }
    }
}

/// One signature from a backend, with the identity that made it.
#[derive(Debug, Clone)]
pub struct KeySignature {
    /// ASN.1 DER for ECDSA, 64 bytes for Ed25519.
    pub sig: Vec<u8>,
    pub identity: Arc<SignerIdentity>,
    /// An RFC 3161 `TimeStampResp` (DER) over the signature, when a TSA is configured: what a
    /// bundle's `rfc3161Timestamps[].signedTimestamp` holds.
    pub rfc3161_timestamp: Option<Vec<u8>>,
}

/// Why a backend could not sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The backend cannot be reached now (HSM gone, wrong PIN, Fulcio down): retryable.
    #[error("key unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the operation.
    #[error("backend rejected the signing operation: {0}")]
    Rejected(String),
    /// The key is revoked and must not sign.
    #[error("key revoked: {0}")]
    Revoked(String),
}

impl From<KeyError> for SignerError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Unavailable(m) => SignerError::KeyUnavailable(m),
            KeyError::Rejected(m) => SignerError::SigningFailed(m),
            KeyError::Revoked(m) => SignerError::KeyRevoked(m),
        }
    }
}

/// A signing key backend: file, PKCS#11, YubiKey or Fulcio.
///
/// `sign` receives the DSSE PAE bytes and signs them with the key's algorithm (ECDSA
/// hashes with SHA-256). Implementations serialise access to their device themselves or
/// are driven by one KeySigner actor each.
#[async_trait]
pub trait KeySigner: Send + Sync {
    /// The configured name of the key (`release-2026`), for logs and metrics.
    fn name(&self) -> &str;
    /// The identity the next signature will carry (keyless keys change it per certificate).
    fn identity(&self) -> Arc<SignerIdentity>;
    /// Signs `message`.
    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trips_and_keyid_is_sha256_of_der() {
        let raw = [7u8; 32];
        let pk = PublicKey::from_raw(KeyAlgorithm::Ed25519, &raw).unwrap();
        let back = PublicKey::from_pem(&pk.to_pem()).unwrap();
        assert_eq!(back, pk);
        assert_eq!(pk.keyid(), hex::encode(Sha256::digest(pk.spki_der())));
        assert_eq!(pk.raw(), raw);
        assert!(PublicKey::from_spki_der(&[0x30, 0x00]).is_err());
    }
}
