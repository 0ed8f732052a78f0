//! Making operator signatures over a command (the CLI, tests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::CONTROL_TOKEN_TYPE;
use super::command::{ControlEnvelope, command_digest};
use crate::entitlement::jws_sign::{self, JwsSignError};

/// Why a signature could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("operator key: {0}")]
    Key(#[from] JwsSignError),
    #[error("command: {0}")]
    Command(#[from] serde_json::Error),
}

/// Who signs, with which key.
#[derive(Debug, Clone)]
pub struct OperatorKey {
    /// PKCS#8 PEM private key (P-256 or Ed25519).
    pub pem: String,
    /// `kid` of its JWK in the operator key set (default: its RFC 7638 thumbprint).
    pub kid: String,
    /// The operator's identity (`sub`).
    pub sub: String,
}

impl OperatorKey {
    /// An operator key from its PEM; `kid` defaults to the key's thumbprint (what
    /// the tools' `generate_signing_key` and `dev init` publish as kid).
    pub fn new(pem: String, kid: Option<String>, sub: String) -> Result<Self, SignError> {
        let kid = match kid {
            Some(k) => k,
            None => jws_sign::public_jwk(&pem)?.thumbprint()?,
        };
        Ok(OperatorKey { pem, kid, sub })
    }
}

fn random_jti() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

/// Adds `key`'s signature over `envelope.command`, valid for `ttl` from now, with a fresh
/// `jti`.
pub fn add_signature(
    envelope: &mut ControlEnvelope,
    key: &OperatorKey,
    ttl: Duration,
) -> Result<(), SignError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = json!({
        "sub": key.sub,
        "scope": "signer.admin",
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs(),
        "jti": random_jti(),
        "cmd": command_digest(&envelope.command)?,
    });
    let token = jws_sign::sign_compact(
        &key.pem,
        &json!({"typ": CONTROL_TOKEN_TYPE, "kid": key.kid}),
        &claims,
    )?;
    envelope.signatures.push(token);
    Ok(())
}
