//! `bench sign-local`: what envelope and bundle construction add to the raw signature.

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use signer_actors::keys::KeyAlgorithm;
use signer_actors::statement::{INTOTO_PAYLOAD_TYPE, Statement};

use stella_signer::cli::CliError;
use stella_signer::cli::sign_local::sign_statement;
use stella_signer::keys::file::FileKey;

use crate::ToolError;

/// A Statement whose canonical form is about `size` bytes.
pub fn statement_of_size(size: usize) -> Statement {
    let mut st: Statement = serde_json::from_value(serde_json::json!({
        "_type": signer_actors::statement::STATEMENT_V1,
        "subject": [{"name": "registry.example:5000/acme/app", "digest": {"sha256": "ab".repeat(32)}}],
        "predicateType": "https://stella-ops.org/attestations/scan-report/v1",
        "predicate": {"scanner": {"name": "stella-scanner", "version": "2026.11.0"}, "notes": ""}
    }))
    .unwrap_or_else(|_| unreachable!("literal statement"));
    let base = st.canonical_bytes().map(|b| b.len()).unwrap_or(0);
    if let Some(p) = st.predicate.as_mut() {
        p.insert("notes".into(), "x".repeat(size.saturating_sub(base)).into());
    }
    st
}

pub(crate) fn key(algorithm: KeyAlgorithm) -> Result<FileKey, ToolError> {
    let rng = SystemRandom::new();
    let pkcs8 = match algorithm {
        KeyAlgorithm::EcdsaP256Sha256 => {
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        }
        KeyAlgorithm::Ed25519 => Ed25519KeyPair::generate_pkcs8(&rng),
    }
    .map_err(|_| ToolError::Unusable("key generation failed".into()))?;
    FileKey::from_pkcs8_der(pkcs8.as_ref(), algorithm.as_str())
        .map_err(|e| ToolError::Unusable(e.to_string()))
}

/// Runs the benchmark and prints the table; returns the JSON report.
///
/// "constructed" is the work `sign-local` does per signature: validate the statement,
/// RFC 8785, PAE, sign, envelope, one bundle, `bundleSha256`. "+ JSON bytes" adds writing
/// the envelope and the bundle as JSON, reported beside it.
pub fn run(iterations: usize, statement_bytes: usize) -> Result<serde_json::Value, ToolError> {
    let statement = statement_of_size(statement_bytes);
    let payload = statement
        .canonical_bytes()
        .map_err(|e| ToolError::Unusable(e.to_string()))?;
    let pae = signer_actors::dsse::pae(INTOTO_PAYLOAD_TYPE, &payload);
    println!(
        "sign-local: {} B statement (RFC 8785), {iterations} signatures per round, best of 5",
        payload.len()
    );
    println!(
        "{:<20} {:>12} {:>14} {:>10} {:>8} {:>16} {:>10}",
        "algorithm",
        "raw sign/s",
        "constructed/s",
        "overhead",
        "target",
        "+ JSON bytes/s",
        "overhead"
    );
    let mut rows = Vec::new();
    for algorithm in [KeyAlgorithm::EcdsaP256Sha256, KeyAlgorithm::Ed25519] {
        let k = key(algorithm)?;
        let mut failure = None;
        let raw = super::ops_per_sec(5, iterations, || {
            if let Err(e) = k.sign_now(&pae) {
                failure = Some(e.to_string());
            }
        });
        let constructed = super::ops_per_sec(5, iterations, || {
            if let Err(e) = sign_statement(&statement, std::slice::from_ref(&k)) {
                failure = Some(e.to_string());
            }
        });
        let serialized = super::ops_per_sec(5, iterations, || {
            let outcome = sign_statement(&statement, std::slice::from_ref(&k)).and_then(|signed| {
                let envelope = serde_json::to_vec(&signed.envelope);
                let bundles = serde_json::to_vec(&signed.bundles);
                envelope
                    .and(bundles)
                    .map_err(|e| CliError::Unusable(e.to_string()))
            });
            if let Err(e) = outcome {
                failure = Some(e.to_string());
            }
        });
        if let Some(e) = failure {
            return Err(ToolError::Unusable(e));
        }
        let overhead = raw / constructed - 1.0;
        let serialized_overhead = raw / serialized - 1.0;
        let ok = overhead <= 0.15;
        println!(
            "{:<20} {:>12.0} {:>14.0} {:>9.1}% {:>8} {:>16.0} {:>9.1}%",
            algorithm.as_str(),
            raw,
            constructed,
            overhead * 100.0,
            if ok { "met" } else { "MISSED" },
            serialized,
            serialized_overhead * 100.0
        );
        rows.push(serde_json::json!({
            "algorithm": algorithm.as_str(), "rawSignPerSec": raw, "constructedPerSec": constructed,
            "overhead": overhead, "targetOverhead": 0.15, "targetMet": ok,
            "constructedAndSerializedPerSec": serialized, "serializedOverhead": serialized_overhead
        }));
    }
    Ok(
        serde_json::json!({"bench": "sign-local", "statementBytes": payload.len(), "iterations": iterations, "results": rows}),
    )
}
