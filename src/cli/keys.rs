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
