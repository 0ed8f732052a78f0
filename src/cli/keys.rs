//! `stella-signer keys ...`

use std::path::PathBuf;

use clap::Subcommand;
use signer_actors::keys::KeyAlgorithm;

use super::CliError;
use crate::keys::file::FileKey;
use crate::keys::material::KeyMaterial;

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
    /// Import a cosign key pair (`cosign generate-key-pair`): decrypts the cosign key and
    /// writes DIR/NAME.key (PKCS#8 v1 PEM, mode 0600) and DIR/NAME.pub (SPKI PEM). The password
    /// comes from COSIGN_PASSWORD, or is asked for on the terminal. Prints the keyid.
    Import {
        /// The cosign private key (PEM `ENCRYPTED SIGSTORE PRIVATE KEY`, or the older
        /// `ENCRYPTED COSIGN PRIVATE KEY`).
        #[arg(long, value_name = "KEY")]
        cosign: PathBuf,
        /// The pair's public key (cosign.pub): the import fails unless it is the private
        /// key's.
        #[arg(long, value_name = "PUB")]
        public: Option<PathBuf>,
        /// Directory to write the key files to (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// File name stem.
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// Print the public key of a private key file as PEM `PUBLIC KEY` (SPKI): the form
    /// `cosign verify --key`, `openssl pkey -pubin` and `stella-signer verify --key` take.
    /// Reads PKCS#8, SEC1 `EC PRIVATE KEY` and cosign keys (password as for `import`).
    ExportPublic {
        /// The private key file.
        key: PathBuf,
        /// Write the PEM to this file (never overwritten) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a key on every replica: from now on it signs nothing (jobs get key_revoked).
    /// A keyless certificate (by its keyid or certificate SHA-256, see `keys list`) is
    /// dropped and replaced with a new one; a keyless identity (`--issuer` and `--san`)
    /// makes the keys certified for it refuse to sign while it is revoked.
    Revoke {
        /// The keyid (lowercase hex SHA-256 of the key's SubjectPublicKeyInfo), or the
        /// SHA-256 of a keyless certificate.
        #[arg(required_unless_present = "san", conflicts_with_all = ["issuer", "san"])]
        keyid: Option<String>,
        /// With --san: the OIDC issuer of the keyless identity to revoke.
        #[arg(long, requires = "san")]
        issuer: Option<String>,
        /// With --issuer: the identity (certificate SAN) to revoke.
        #[arg(long, requires = "issuer")]
        san: Option<String>,
        /// Why (recorded with the revocation).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
    /// Make a profile sign with other keys on every replica, without a restart (for one
    /// tenant, one plan or the whole profile). The keys must be configured on the replicas
    /// (a configured key in no profile is loaded and waits for this); the keys they replace
    /// are listed as retired, with the time of the rotation.
    Rotate {
        /// The signing profile.
        #[arg(long, default_value = "default")]
        profile: String,
        /// Only this tenant's jobs of the profile.
        #[arg(long, conflicts_with = "plan")]
        tenant: Option<String>,
        /// Only the profile's jobs on this plan.
        #[arg(long)]
        plan: Option<String>,
        /// The key (its configured name) to sign with; repeat for several signatures.
        #[arg(long = "to", required = true)]
        keys: Vec<String>,
        /// Why (recorded with the rotation).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
    /// Every key the replicas have loaded, including retired and revoked ones, with their
    /// validity (validFrom, validUntil when revoked): what verifiers need.
    List {
        /// One JSON array instead of a line per key.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
}

async fn key_state(
    nats: &super::nats_client::NatsArgs,
) -> Result<std::sync::Arc<crate::jetstream::key_state::KeyState>, CliError> {
    let (cfg, _client, js) = nats.connect().await?;
    crate::jetstream::key_state::KeyState::open(&js, &cfg.keys_bucket)
        .await
        .map_err(|e| CliError::Unusable(e.to_string()))
}

/// cosign's password: `COSIGN_PASSWORD` (as cosign reads it: set, even empty, wins), else
/// asked on the terminal. Without either there is no one to ask, so it is an error rather
/// than a hang.
fn cosign_password() -> Result<zeroize::Zeroizing<Vec<u8>>, CliError> {
    use std::io::IsTerminal as _;
    use std::os::unix::ffi::OsStringExt as _;
    if let Some(p) = std::env::var_os("COSIGN_PASSWORD") {
        return Ok(zeroize::Zeroizing::new(p.into_vec()));
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Unusable(
            "no password: set COSIGN_PASSWORD (standard input is not a terminal to ask on)".into(),
        ));
    }
    rpassword::prompt_password("Enter password for private key: ")
        .map(|p| zeroize::Zeroizing::new(p.into_bytes()))
        .map_err(|e| CliError::Unusable(format!("reading the password: {e}")))
}

/// Decrypts a cosign key file. A wrong password is a verdict (exit 1); anything else about
/// the file makes it unusable (exit 2).
fn read_cosign_key(path: &std::path::Path, text: &str) -> Result<KeyMaterial, CliError> {
    use crate::keys::cosign::{CosignKeyError, decrypt};
    let password = cosign_password()?;
    decrypt(text, &password).map_err(|e| match e {
        CosignKeyError::WrongPassword => CliError::Invalid(format!("{}: {e}", path.display())),
        other => CliError::Unusable(format!("{}: {other}", path.display())),
    })
}

/// Reads any private key file `keys export-public` takes: a cosign key (decrypted), or a
/// plain PEM key (which must be mode 0600, as everywhere).
fn read_any_key(path: &std::path::Path) -> Result<KeyMaterial, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))?;
    if crate::keys::cosign::is_cosign_key(&text) {
        return read_cosign_key(path, &text);
    }
    crate::keys::file::read_material(path).map_err(|e| CliError::Unusable(e.to_string()))
}

impl KeysCommand {
    pub fn run(self) -> Result<(), CliError> {
        match self {
            KeysCommand::Import {
                cosign,
                public,
                out,
                name,
            } => {
                if name.is_empty() || name.contains('/') {
                    return Err(CliError::Unusable(format!(
                        "--name {name:?} must be a plain file name"
                    )));
                }
                let text = std::fs::read_to_string(&cosign)
                    .map_err(|e| CliError::Unusable(format!("{}: {e}", cosign.display())))?;
                let material = read_cosign_key(&cosign, &text)?;
                if let Some(public) = &public {
                    let given = std::fs::read_to_string(public)
                        .map_err(|e| CliError::Unusable(format!("{}: {e}", public.display())))
                        .and_then(|t| {
                            signer_actors::keys::PublicKey::from_pem(&t).map_err(|e| {
                                CliError::Unusable(format!("{}: {e}", public.display()))
                            })
                        })?;
                    let ours = FileKey::from_material(&material, &name, &cosign)
                        .map_err(|e| CliError::Unusable(e.to_string()))?;
                    if given.keyid() != ours.public_key().keyid() {
                        return Err(CliError::Invalid(format!(
                            "{} is not the public key of {}",
                            public.display(),
                            cosign.display()
                        )));
                    }
                }
                let g = FileKey::write_pair(&material, &out, &name)
                    .map_err(|e| CliError::Unusable(e.to_string()))?;
                eprintln!(
                    "imported {} ({}): wrote {} and {}",
                    cosign.display(),
                    material.algorithm().as_str(),
                    g.private_key.display(),
                    g.public_key.display()
                );
                println!("{}", g.keyid);
                Ok(())
            }
            KeysCommand::ExportPublic { key, out } => {
                let material = read_any_key(&key)?;
                let public = FileKey::from_material(&material, "export", &key)
                    .map_err(|e| CliError::Unusable(e.to_string()))?
                    .public_key()
                    .clone();
                let pem = public.to_pem();
                match out {
                    Some(path) => {
                        crate::keys::file::write_new(&path, pem.as_bytes(), 0o644)
                            .map_err(|e| CliError::Unusable(e.to_string()))?;
                        eprintln!("wrote {} (keyid {})", path.display(), public.keyid());
                    }
                    None => print!("{pem}"),
                }
                Ok(())
            }
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
            KeysCommand::Revoke {
                keyid,
                issuer,
                san,
                reason,
                nats,
            } => super::nats_client::runtime()?.block_on(async {
                let state = key_state(&nats).await?;
                match (keyid, issuer, san) {
                    (Some(keyid), _, _) => {
                        state
                            .revoke(&keyid, &reason)
                            .await
                            .map_err(CliError::Unusable)?;
                        println!("revoked {keyid}");
                    }
                    (None, Some(issuer), Some(san)) => {
                        use crate::jetstream::key_state::RevokeError;
                        let r = state
                            .revoke_identity(&issuer, &san, &reason)
                            .await
                            .map_err(|e| match e {
                                RevokeError::Invalid(m) => CliError::Invalid(m),
                                RevokeError::Bucket(m) => CliError::Unusable(m),
                            })?;
                        println!("revoked the identity {} of {}", r.san, r.issuer);
                    }
                    _ => {
                        return Err(CliError::Invalid(
                            "name a keyid, a certificate SHA-256, or --issuer and --san".into(),
                        ));
                    }
                }
                Ok(())
            }),
            KeysCommand::Rotate {
                profile,
                tenant,
                plan,
                keys,
                reason,
                nats,
            } => super::nats_client::runtime()?.block_on(async {
                let scope = crate::jetstream::key_state::scope_of(tenant, plan)
                    .map_err(CliError::Unusable)?;
                let state = key_state(&nats).await?;
                let a = state
                    .rotate(&profile, scope, keys, &reason)
                    .await
                    .map_err(CliError::Invalid)?;
                println!(
                    "profile {} ({}): [{}] -> [{}] at {}",
                    a.profile,
                    a.scope,
                    a.previous.join(", "),
                    a.keys.join(", "),
                    a.rotated_at
                );
                Ok(())
            }),
            KeysCommand::List { json, nats } => super::nats_client::runtime()?.block_on(async {
                let keys = key_state(&nats)
                    .await?
                    .list()
                    .await
                    .map_err(CliError::Unusable)?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&keys).unwrap_or_default()
                    );
                } else {
                    for k in &keys {
                        let s = |f: &str| k[f].as_str().unwrap_or("").to_string();
                        println!(
                            "{} {:<8} {:<18} {:<7} {} {}",
                            s("keyid"),
                            s("status"),
                            s("algorithm"),
                            s("source"),
                            s("name"),
                            s("validFrom")
                        );
                    }
                }
                Ok(())
            }),
        }
    }
}
