//! Operator keys for key commands: a JWKS the test stack configures as `[gates.control]`,
//! and signed (or deliberately badly signed) control envelopes.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use stella_signer::config::ControlGate;
use stella_signer::control::command::command_digest;
use stella_signer::control::sign::{OperatorKey, add_signature};
use stella_signer::control::{CONTROL_TOKEN_TYPE, ControlEnvelope};
use stella_signer_tools::mint::{self, MintAlg};

use super::stack::Stack;

/// One operator: private key file, kid, sub.
#[derive(Clone)]
pub struct Operator {
    pub key: OperatorKey,
    pub key_file: PathBuf,
}

/// `n` operators whose public keys are in `dir/operators-jwks.json`.
pub struct Operators {
    pub all: Vec<Operator>,
    pub jwks: PathBuf,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Operators {
    pub fn new(dir: &Path, n: usize) -> Operators {
        let mut jwks = Vec::new();
        let mut all = Vec::new();
        for i in 0..n {
            let alg = if i % 2 == 0 {
                MintAlg::EdDsa
            } else {
                MintAlg::Es256
            };
            let (pem, jwk) = mint::generate_signing_key(alg).unwrap();
            let key_file = dir.join(format!("operator-{i}.key"));
            std::fs::write(&key_file, &pem).unwrap();
            let kid = jwk.kid.clone().unwrap();
            jwks.push(jwk);
            all.push(Operator {
                key: OperatorKey {
                    pem,
                    kid,
                    sub: format!("operator-{i}@example.org"),
                },
                key_file,
            });
        }
        let path = dir.join("operators-jwks.json");
        std::fs::write(&path, mint::jwks(&jwks).to_string()).unwrap();
        Operators { all, jwks: path }
    }

    /// A test stack (see [`Stack::new`]) whose `[gates.control]` trusts these operators and
    /// needs `required` of them; its jti bucket is the stack's `<ID>_JTI` (deleted by
    /// [`Stack::cleanup`]).
    pub fn stack(&self, tag: &str, required: u32) -> Stack {
        let stack = Stack::new(tag);
        stack.configure(|c| {
            c.gates.control = Some(ControlGate {
                jwks_file: Some(self.jwks.clone()),
                required_signatures: required,
                jti_bucket: stack.stream("JTI"),
                ..ControlGate::default()
            })
        });
        stack
    }

    /// `command` signed by the operators at `who`.
    pub fn signed(&self, command: Value, who: &[usize]) -> Vec<u8> {
        let mut envelope = ControlEnvelope {
            command,
            signatures: vec![],
        };
        for &i in who {
            add_signature(
                &mut envelope,
                &self.all[i].key,
                std::time::Duration::from_secs(300),
            )
            .unwrap();
        }
        serde_json::to_vec(&envelope).unwrap()
    }
}

/// Good claims of operator `op` over `command`: cases break one of them.
pub fn claims(op: &Operator, command: &Value) -> Value {
    let t = now();
    json!({"sub": op.key.sub, "scope": "signer.admin", "iat": t, "nbf": t, "exp": t + 300,
           "jti": format!("jti-{}-{}", t, rand_hex()), "cmd": command_digest(command).unwrap()})
}

/// A control token with `claims`, signed by `pem` under `kid`.
pub fn token(pem: &str, kid: &str, claims: &Value) -> String {
    mint::sign_compact(pem, &json!({"typ": CONTROL_TOKEN_TYPE, "kid": kid}), claims).unwrap()
}

/// An envelope of `command` with these signatures.
pub fn envelope(command: &Value, signatures: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({"command": command, "signatures": signatures})).unwrap()
}

pub fn rand_hex() -> String {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    hex::encode(b)
}

/// Sends a control message and returns the reply as JSON.
pub async fn send(client: &async_nats::Client, subject: String, body: Vec<u8>) -> Value {
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.request(subject, body.into()),
    )
    .await
    .expect("a reply within 30s")
    .expect("a reply");
    serde_json::from_slice(&answer.payload)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&answer.payload)))
}
