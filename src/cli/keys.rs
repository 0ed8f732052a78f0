//! `stella-signer keys ...`

use std::path::PathBuf;

use clap::Subcommand;
use signer_actors::keys::KeyAlgorithm;

use super::CliError;
use crate::keys::file::FileKey;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a key pair: DIR/NAME.key (PKCS#8 PEM, mode 0600) and DIR/NAME.pub (SPKI PEM).
    /// Prints the keyid.
    Generate {
        /// ecdsa-p256 or ed25519
        #[arg(long)]
        algorithm: KeyAlgorithm,
        /// Directory to write the key files to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// File name stem.
        #[arg(long, default_value = "signing")]
        name: String,
    },
}

impl KeysCommand {
    pub fn run(self) -> Result<(), CliError> {
        match self {
            KeysCommand::Generate {
                algorithm,
                out,
                name,
            } => {
                if name.is_empty() || name.contains('/') {
                    return Err(CliError::Unusable(format!(
                        "--name {name:?} must be a plain file name"
                    )));
                }
                let g = FileKey::generate(algorithm, &out, &name)
                    .map_err(|e| CliError::Unusable(e.to_string()))?;
                eprintln!(
                    "wrote {} and {}",
                    g.private_key.display(),
                    g.public_key.display()
                );
                println!("{}", g.keyid);
                Ok(())
            }
        }
    }
}
