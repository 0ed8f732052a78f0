//! `stella-signer sign-local`: the offline signer (no NATS, no gates).

use std::path::PathBuf;

use clap::Args;
use signer_actors::keys::KeySigner as _;
use signer_actors::signing::{self, SignedEnvelope};
use signer_actors::statement::{INTOTO_PAYLOAD_TYPE, Statement};

use super::{CliError, read_json, write_file};
use crate::keys::file::FileKey;

#[derive(Debug, Args)]
pub struct SignLocalArgs {
    /// Private key file (PKCS#8 PEM); repeat for a multi-signature envelope.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// in-toto Statement v1 (JSON); it is signed in its RFC 8785 form.
    #[arg(long)]
    statement: PathBuf,
    /// Where to write the DSSE envelope.
    #[arg(long)]
    out: PathBuf,
    /// Directory for one Sigstore bundle per signature (`<n>-<keyid>.sigstore.json`).
    #[arg(long)]
    bundles_out: Option<PathBuf>,
}

/// Signs a statement with file keys: validation, RFC 8785, PAE, one signature per key.
pub fn sign_statement(statement: &Statement, keys: &[FileKey]) -> Result<SignedEnvelope, CliError> {
    statement.validate().map_err(CliError::Invalid)?;
    let payload = statement
        .canonical_bytes()
        .map_err(|e| CliError::Unusable(e.to_string()))?;
    let message = signer_actors::dsse::pae(INTOTO_PAYLOAD_TYPE, &payload);
    let signatures = keys
        .iter()
        .map(|k| {
            let sig = k
                .sign_now(&message)
                .map_err(|e| CliError::Unusable(e.to_string()))?;
            Ok(signer_actors::keys::KeySignature {
                sig,
                identity: k.identity(),
                rfc3161_timestamp: None,
            })
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    signing::assemble(INTOTO_PAYLOAD_TYPE.into(), payload, signatures)
        .map_err(|e| CliError::Unusable(e.to_string()))
}

/// File name of the bundle for signature `index`.
pub fn bundle_file_name(index: usize, keyid: &str) -> String {
    format!("{index}-{keyid}.sigstore.json")
}

impl SignLocalArgs {
    pub fn run(self) -> Result<(), CliError> {
        let keys = self
            .keys
            .iter()
            .map(|p| {
                FileKey::load(p, p.display().to_string())
                    .map_err(|e| CliError::Unusable(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let statement: Statement = read_json(&self.statement)?;
        let signed = sign_statement(&statement, &keys)?;
        write_file(&self.out, &pretty_json(&signed.envelope)?)?;
        if let Some(dir) = &self.bundles_out {
            std::fs::create_dir_all(dir)
                .map_err(|e| CliError::Unusable(format!("{}: {e}", dir.display())))?;
            for (i, bundle) in signed.bundles.iter().enumerate() {
                let keyid = &signed.signers[i].keyid;
                write_file(&dir.join(bundle_file_name(i, keyid)), &pretty_json(bundle)?)?;
            }
        }
        for s in &signed.signers {
            println!(
                "signed {} {} keyid={}",
                s.algorithm.as_str(),
                s.source.as_str(),
                s.keyid
            );
        }
        println!("bundleSha256={}", signed.bundle_sha256);
        Ok(())
    }
}

/// Pretty JSON with a trailing newline, for files people read.
pub fn pretty_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CliError> {
    let mut out =
        serde_json::to_vec_pretty(value).map_err(|e| CliError::Unusable(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}
