//! `stella-signer verify`: checks an envelope (threshold) or a keyful Sigstore bundle
//! against --key, or anything the offline kit covers with --kit (`super::kit`).

use std::path::PathBuf;

use clap::Args;
use signer_actors::bundle::Bundle;
use signer_actors::dsse::Envelope;
use signer_actors::keys::PublicKey;

use super::{CliError, read_file, read_json};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A DSSE envelope or a Sigstore bundle (JSON).
    file: PathBuf,
    /// Public key (SPKI PEM); repeat for several.
    #[arg(long = "key", required_unless_present = "kit")]
    keys: Vec<PathBuf>,
    /// How many of the keys must each verify a distinct signature (default: all; with
    /// --kit: 1).
    #[arg(long)]
    threshold: Option<usize>,
    #[command(flatten)]
    kit: super::kit::KitArgs,
}

impl VerifyArgs {
    pub fn run(self) -> Result<(), CliError> {
        if let Some(dir) = &self.kit.kit {
            return self.kit.verify(dir, &self.file, self.threshold);
        }
        let keys = self
            .keys
            .iter()
            .map(|p| {
                let text = String::from_utf8(read_file(p)?)
                    .map_err(|_| CliError::Unusable(format!("{}: not UTF-8 PEM", p.display())))?;
                PublicKey::from_pem(&text)
                    .map_err(|e| CliError::Unusable(format!("{}: {e}", p.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let doc: serde_json::Value = read_json(&self.file)?;
        let is_bundle = doc.get("dsseEnvelope").is_some() || doc.get("mediaType").is_some();
        let threshold = self.threshold.unwrap_or(keys.len());
        if is_bundle && self.threshold.is_some() {
            return Err(CliError::Unusable(
                "--threshold applies to envelopes; a bundle holds exactly one signature".into(),
            ));
        }
        if !is_bundle && !(1..=keys.len()).contains(&threshold) {
            return Err(CliError::Unusable(format!(
                "--threshold {threshold} must be between 1 and the number of --key ({})",
                keys.len()
            )));
        }
        if is_bundle && doc.pointer("/verificationMaterial/certificate").is_some() {
            return Err(CliError::Unusable(
                "keyless (certificate) bundle: verify it against a Sigstore trust root, e.g. with sigstore-js (docs/verification.md)".into(),
            ));
        }
        let line = if is_bundle {
            verify_bundle(doc, &keys)
        } else {
            verify_envelope(doc, &keys, threshold)
        };
        match line {
            Ok(msg) => {
                println!("OK: {msg}");
                Ok(())
            }
            Err(CliError::Invalid(msg)) => {
                println!("FAIL: {msg}");
                Err(CliError::Invalid("verification failed".into()))
            }
            Err(e) => Err(e),
        }
    }
}

fn verify_envelope(
    doc: serde_json::Value,
    keys: &[PublicKey],
    threshold: usize,
) -> Result<String, CliError> {
    let env: Envelope = serde_json::from_value(doc)
        .map_err(|e| CliError::Unusable(format!("not a DSSE envelope: {e}")))?;
    let verified = env
        .verify(keys, threshold)
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    let ids: Vec<String> = verified
        .iter()
        .map(|v| keys[v.key_index].keyid()[..16].to_string())
        .collect();
    Ok(format!(
        "envelope: {}/{} key(s) verified (threshold {threshold}); payloadType={}; keyids {}",
        verified.len(),
        keys.len(),
        env.payload_type,
        ids.join(",")
    ))
}

fn verify_bundle(doc: serde_json::Value, keys: &[PublicKey]) -> Result<String, CliError> {
    let bundle: Bundle = serde_json::from_value(doc)
        .map_err(|e| CliError::Unusable(format!("not a Sigstore bundle: {e}")))?;
    let index = bundle
        .verify_keyful(keys)
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    Ok(format!(
        "bundle {}: keyid {} verified; payloadType={}",
        bundle.media_type,
        keys[index].keyid(),
        bundle.dsse_envelope.payload_type
    ))
}
