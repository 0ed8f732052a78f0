//! `stella-signer kit export` and the `--kit` path of `stella-signer verify` (see
//! `crate::kit` for what a kit holds and docs/verification.md for the workflow).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use signer_actors::dsse::Envelope;
use signer_actors::keys::PublicKey;
use signer_actors::ports::KeyFactory as _;

use super::CliError;
use crate::config::{Config, KeyConfig};
use crate::kit::export::{self, KitInputs};
use crate::kit::load::{Kit, KitPin};
use crate::kit::verify::{Identity, Refusal};
use crate::kit::{KitError, MANIFEST, MANIFEST_ENVELOPE};

#[derive(Debug, Subcommand)]
pub enum KitCommand {
    /// Write the offline kit: every key of the SIGNER_KEYS ledger (public key, state,
    /// validity, revocation), the configured chains, the Fulcio and TSA roots as a Sigstore
    /// trusted_root.json, and manifest.json with every file's SHA-256, signed by the [kit] key.
    Export {
        /// The directory to write (missing or empty).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
}

impl KitCommand {
    pub fn run(self) -> Result<(), CliError> {
        match self {
            KitCommand::Export { out, nats } => {
                let cfg = nats.config()?;
                super::nats_client::runtime()?.block_on(async {
                    let (ncfg, _client, js) = nats.connect().await?;
                    let ledger = crate::keystate::KeyLedger::open(&js, &ncfg.keys_bucket)
                        .await
                        .map_err(|e| CliError::Unusable(e.to_string()))?;
                    let listed = ledger
                        .list()
                        .await
                        .map_err(|e| CliError::Unusable(e.to_string()))?;
                    let written = export_kit(&cfg, listed, &out).await.map_err(kit_error)?;
                    eprintln!(
                        "wrote the kit to {} ({} files, signed by {})",
                        out.display(),
                        written.0,
                        written.1
                    );
                    Ok(())
                })
            }
        }
    }
}

fn kit_error(e: KitError) -> CliError {
    match e {
        KitError::Refused(m) => CliError::Invalid(m),
        other => CliError::Unusable(other.to_string()),
    }
}

/// The configuration's chains and roots.
fn inputs(cfg: &Config, listed: Vec<serde_json::Value>) -> Result<KitInputs, KitError> {
    let mut inputs = KitInputs {
        listed,
        ..Default::default()
    };
    for key in &cfg.keys {
        if let Some(chain) = key.certificate_chain() {
            let text = std::fs::read_to_string(chain).map_err(|e| KitError::io(chain, e))?;
            inputs.chains.push((key.name().to_string(), text));
        }
        if let KeyConfig::Fulcio(k) = key {
            export::add_roots_file(&mut inputs, &k.fulcio_roots, &k.fulcio_url)?;
        }
    }
    for path in cfg.kit.iter().flat_map(|k| &k.tsa_roots) {
        let text = std::fs::read_to_string(path).map_err(|e| KitError::io(path, e))?;
        inputs.tsa.push(export::authority_of_pem(path, &text, "")?);
    }
    Ok(inputs)
}

/// Builds, signs and writes the kit; returns the number of files and the kit keyid.
pub async fn export_kit(
    cfg: &Config,
    listed: Vec<serde_json::Value>,
    out: &Path,
) -> Result<(usize, String), KitError> {
    let kit = cfg.kit.as_ref().ok_or_else(|| {
        KitError::Unusable("no [kit] section: name the key that signs the kit (kit.key)".into())
    })?;
    cfg.validate()
        .map_err(|e| KitError::Unusable(e.to_string()))?;
    let keys = crate::keys::factory::ConfiguredKeys::new(cfg.keys.clone());
    let signer = keys.load(&kit.key).await.map_err(|source| KitError::Sign {
        name: kit.key.clone(),
        source,
    })?;
    let kit_key = signer.identity().public_key.clone();
    let mut files = export::kit_files(&inputs(cfg, listed)?, &kit_key)?;
    let manifest = export::manifest(&files, &kit_key.keyid())?;
    let envelope = export::sign_manifest(&manifest, signer.as_ref()).await?;
    let count = files.len() + 2;
    files.insert(MANIFEST.into(), manifest);
    files.insert(MANIFEST_ENVELOPE.into(), envelope);
    export::write_kit(out, &files)?;
    Ok((count, kit_key.keyid()))
}

/// `verify --kit`'s options.
#[derive(Debug, Clone, Args)]
pub struct KitArgs {
    /// Verify offline against this kit (`kit export`) instead of --key: the kit's signature
    /// is checked first, against --kit-key or --kit-keyid.
    #[arg(long, value_name = "DIR", conflicts_with = "keys")]
    pub kit: Option<PathBuf>,
    /// The kit key's public key (SPKI PEM), obtained out of band.
    #[arg(
        long,
        value_name = "PEM",
        requires = "kit",
        conflicts_with = "kit_keyid"
    )]
    pub kit_key: Option<PathBuf>,
    /// The kit key's keyid (lowercase hex SHA-256 of its SPKI), obtained out of band.
    #[arg(long, value_name = "HEX", requires = "kit")]
    pub kit_keyid: Option<String>,
    /// Keyless bundles: the certificate's identity (SAN) must be this.
    #[arg(long, requires = "kit")]
    pub san: Option<String>,
    /// Keyless bundles: the certificate's OIDC issuer must be this.
    #[arg(long, requires = "kit")]
    pub issuer: Option<String>,
}

impl KitArgs {
    /// Checks the kit, then `doc` (an envelope or a bundle) against it. Prints the verdict.
    pub fn verify(
        &self,
        dir: &Path,
        file: &Path,
        threshold: Option<usize>,
    ) -> Result<(), CliError> {
        let pin = match (&self.kit_key, &self.kit_keyid) {
            (Some(path), _) => {
                let text = String::from_utf8(super::read_file(path)?).map_err(|_| {
                    CliError::Unusable(format!("{}: not UTF-8 PEM", path.display()))
                })?;
                KitPin::Key(
                    PublicKey::from_pem(&text)
                        .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))?,
                )
            }
            (None, Some(keyid)) if crate::keystate::schema::is_keyid(keyid) => {
                KitPin::Keyid(keyid.clone())
            }
            (None, Some(keyid)) => {
                return Err(CliError::Unusable(format!(
                    "--kit-keyid {keyid:?} is not 64 lowercase hex digits"
                )));
            }
            (None, None) => {
                return Err(CliError::Unusable(
                    "pin the kit key: --kit-key PEM or --kit-keyid HEX (a kit that vouches for itself proves nothing)".into(),
                ));
            }
        };
        let kit = match Kit::load(dir, &pin) {
            Ok(kit) => kit,
            Err(KitError::Refused(m)) => {
                println!("FAIL: kit refused: {m}");
                return Err(CliError::Invalid("verification failed".into()));
            }
            Err(e) => return Err(CliError::Unusable(e.to_string())),
        };
        let bytes = super::read_file(file)?;
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Unusable(format!("{}: {e}", file.display())))?;
        let is_bundle = doc.get("dsseEnvelope").is_some() || doc.get("mediaType").is_some();
        let verdict = if is_bundle {
            if threshold.is_some() {
                return Err(CliError::Unusable(
                    "--threshold applies to envelopes; a bundle holds exactly one signature".into(),
                ));
            }
            let identity = Identity {
                san: self.san.clone(),
                issuer: self.issuer.clone(),
            };
            kit.verify_bundle(&bytes, &identity)
        } else {
            let envelope: Envelope = serde_json::from_value(doc)
                .map_err(|e| CliError::Unusable(format!("not a DSSE envelope: {e}")))?;
            kit.verify_envelope(&envelope, threshold)
        };
        match verdict {
            Ok(v) => {
                println!(
                    "OK: kit {} verified; {}",
                    kit.kit_keyid,
                    v.accepted.join("; ")
                );
                Ok(())
            }
            Err(Refusal::Refused(m)) => {
                println!("FAIL: {m}");
                Err(CliError::Invalid("verification failed".into()))
            }
            Err(Refusal::Unusable(m)) => Err(CliError::Unusable(m)),
        }
    }
}
