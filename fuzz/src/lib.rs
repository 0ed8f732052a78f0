//! What the fuzz targets share: the keys they trust and sign with, and one function per
//! target that feeds the input to the service's own functions (the targets in
//! `fuzz_targets/` are one line each). Nothing here re-implements a check: it only calls
//! the library, and asserts what must hold whatever the input (a refusal's message stays
//! bounded, a request that decodes encodes and decodes back to itself).
//!
//! Several targets read their first byte as a mode. In the "signed" modes the rest of the
//! input is what a trusted key signed (a DSSE payload, JWT claims): the target signs it with
//! a fixed test key, so the fuzzer reaches the checks that run *after* a signature verified,
//! which random bytes never would.

use std::sync::OnceLock;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use signer_actors::error::SignerError;
use signer_actors::keys::{KeyAlgorithm, PublicKey};

pub mod targets;

/// The requested image digest (hex) the provenance checks compare against. The corpus
/// holds statements that name it.
pub const DIGEST_HEX: &str = "0b14ca2bf1d47f9cfe0b4ae1a4e0fcfd4c6e10f9dd6e45c8f1c4a3b7a2e9d1c0";

/// The test-only golden key of `tests/golden` (never trusted anywhere).
const GOLDEN_KEY: &str = include_str!("../../tests/golden/golden-test-ed25519.key");

/// Keys the signature checks trust, and the golden key that signs in the signed modes.
pub struct Keys {
    pub signer: Ed25519KeyPair,
    /// The golden key's public half, then a P-256 key nobody signs with (so every check
    /// walks more than one key, and ECDSA verification sees the fuzzer's signatures).
    pub trusted: Vec<PublicKey>,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let der = pem_body(GOLDEN_KEY);
        let signer = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).expect("golden key");
        let ed = PublicKey::from_raw(KeyAlgorithm::Ed25519, signer.public_key().as_ref())
            .expect("golden public key");
        let rng = SystemRandom::new();
        let p256 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .and_then(|pkcs8| {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                    .map_err(|_| ring::error::Unspecified)
            })
            .expect("P-256 key");
        let ec = PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, p256.public_key().as_ref())
            .expect("P-256 public key");
        Keys {
            signer,
            trusted: vec![ed, ec],
        }
    })
}

/// The DER inside a PEM block (the golden key file).
fn pem_body(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("PEM body")
}

/// What every refusal must satisfy once bounded (what the job publishes, logs and audits):
/// at most `MESSAGE_MAX_BYTES` plus the marker, no control characters.
pub fn assert_bounded(e: SignerError) {
    use signer_actors::echo::{MARKER_MAX_BYTES, MESSAGE_MAX_BYTES};
    let code = e.code();
    let b = e.bounded();
    let m = b.message();
    assert!(
        m.len() <= MESSAGE_MAX_BYTES + MARKER_MAX_BYTES,
        "{code:?}: bounded message is {} bytes",
        m.len()
    );
    assert!(
        !m.chars().any(char::is_control),
        "{code:?}: bounded message has control characters"
    );
}
