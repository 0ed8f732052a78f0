//! `stella-signer keys ...`

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use signer_actors::keys::KeyAlgorithm;

use super::CliError;
use crate::control::sign::{OperatorKey, add_signature};
use crate::control::{ControlCommand, ControlEnvelope, ControlReply};
use crate::keys::file::FileKey;
use crate::keys::material::KeyMaterial;

/// Who signs a key command.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// An operator private key (PKCS#8 PEM, P-256 or Ed25519) whose public key is in the
    /// replicas' [gates.control] key set; repeat for dual control.
    #[arg(long = "operator-key", value_name = "FILE")]
    pub operator_keys: Vec<PathBuf>,
    /// The kid of each --operator-key in the operator key set, in the same order
    /// (default: the key's RFC 7638 JWK thumbprint).
    #[arg(long = "operator-kid", value_name = "KID")]
    pub operator_kids: Vec<String>,
    /// The operator identity (`sub`) of each --operator-key, in the same order
    /// (default: `operator-<first 16 characters of the kid>`).
    #[arg(long = "operator-sub", value_name = "SUB")]
    pub operator_subs: Vec<String>,
    /// How long the signatures stay valid (at most the replicas' max_token_life).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// Write the signed command to this file (for `keys cosign`) instead of sending it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

impl OperatorArgs {
    /// The operator keys, with their kids and subs.
    fn load(&self) -> Result<Vec<OperatorKey>, CliError> {
        let paths = &self.operator_keys;
        if paths.is_empty() {
            return Err(CliError::Unusable(
                "name an operator key: --operator-key FILE (repeat for dual control)".into(),
            ));
        }
        if self.operator_kids.len() > paths.len() || self.operator_subs.len() > paths.len() {
            return Err(CliError::Unusable(
                "more --operator-kid or --operator-sub than --operator-key".into(),
            ));
        }
        paths
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))?;
                let key = OperatorKey::new(pem, self.operator_kids.get(i).cloned(), String::new())
                    .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))?;
                let sub =
                    self.operator_subs.get(i).cloned().unwrap_or_else(|| {
                        format!("operator-{}", &key.kid[..16.min(key.kid.len())])
                    });
                Ok(OperatorKey { sub, ..key })
            })
            .collect()
    }

    /// Signs `envelope` with every operator key.
    fn sign(&self, envelope: &mut ControlEnvelope) -> Result<(), CliError> {
        for key in self.load()? {
            add_signature(envelope, &key, self.token_ttl)
                .map_err(|e| CliError::Unusable(e.to_string()))?;
        }
        Ok(())
    }
}

/// Writes `envelope` to `path`.
fn write_envelope(path: &Path, envelope: &ControlEnvelope) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(envelope).unwrap_or_default();
    std::fs::write(path, text + "\n")
        .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))?;
    eprintln!(
        "wrote the command with {} signature(s) to {}; co-sign with `stella-signer keys cosign {}`",
        envelope.signatures.len(),
        path.display(),
        path.display()
    );
    Ok(())
}

/// Sends `envelope` over `signer.control.keys` and prints the reply: what changed, or why
/// it was refused (exit 1).
fn send(nats: &super::nats_client::NatsArgs, envelope: &ControlEnvelope) -> Result<(), CliError> {
    super::nats_client::runtime()?.block_on(async {
        let (cfg, client, _js) = nats.connect().await?;
        let body = serde_json::to_vec(envelope).unwrap_or_default();
        let subject = cfg.subject("signer.control.keys");
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            client.request(subject.clone(), body.into()),
        )
        .await
        .map_err(|_| CliError::Unusable(format!("no reply on {subject} within 30s")))?
        .map_err(|e| CliError::Unusable(format!("{subject}: {e} (is a signer running?)")))?;
        let reply: ControlReply = serde_json::from_slice(&answer.payload).map_err(|e| {
            CliError::Unusable(format!(
                "unreadable reply {:?}: {e}",
                String::from_utf8_lossy(&answer.payload)
            ))
        })?;
        match reply {
            ControlReply::Accepted {
                detail,
                operators,
                audit_seq,
                ..
            } => {
                println!("{detail}");
                eprintln!(
                    "accepted, signed by {} (audit event seq {audit_seq})",
                    operators.join(", ")
                );
                Ok(())
            }
            ControlReply::Refused { code, detail } => Err(CliError::Invalid(format!(
                "refused ({}): {detail}",
                code.as_str()
            ))),
            ControlReply::Failed { code, detail } => Err(CliError::Invalid(format!(
                "not applied ({}): {detail}",
                code.as_str()
            ))),
        }
    })
}

/// Signs `command` and sends it, or writes it to `--out`.
fn sign_and_send(
    command: ControlCommand,
    operator: &OperatorArgs,
    nats: &super::nats_client::NatsArgs,
) -> Result<(), CliError> {
    let mut envelope = ControlEnvelope {
        command: command.to_value(),
        signatures: vec![],
    };
    operator.sign(&mut envelope)?;
    match &operator.out {
        Some(path) => write_envelope(path, &envelope),
        None => send(nats, &envelope),
    }
}

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
    /// The command is signed with --operator-key and sent over signer.control.keys.
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
        operator: OperatorArgs,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
    /// Make a profile sign with other keys on every replica, without a restart (for one
    /// tenant, one plan or the whole profile). The keys must be configured on the replicas
    /// (a configured key in no profile is loaded and waits for this); the keys they replace
    /// are listed as retired, with the time of the rotation. Signed with --operator-key.
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
        operator: OperatorArgs,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
    /// Undo the rotation of a scope (a tenant, a plan or the whole profile): it signs with
    /// its configured keys again. Signed with --operator-key.
    Restore {
        #[arg(long, default_value = "default")]
        profile: String,
        #[arg(long, conflicts_with = "plan")]
        tenant: Option<String>,
        #[arg(long)]
        plan: Option<String>,
        /// Why (recorded in the audit event).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        nats: super::nats_client::NatsArgs,
    },
    /// Add signatures to a signed command written with --out (dual control: the second
    /// operator co-signs offline), then write it back (or to --out), or send it with --send.
    Cosign {
        /// The signed command (JSON envelope).
        file: PathBuf,
        /// Send it over signer.control.keys instead of writing it.
        #[arg(long)]
        send: bool,
        #[command(flatten)]
        operator: OperatorArgs,
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

async fn key_ledger(
    nats: &super::nats_client::NatsArgs,
) -> Result<std::sync::Arc<crate::keystate::KeyLedger>, CliError> {
    let (cfg, _client, js) = nats.connect().await?;
    crate::keystate::KeyLedger::open(&js, &cfg.keys_bucket)
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
                operator,
                nats,
            } => {
                let command = match (keyid, issuer, san) {
                    (Some(keyid), _, _) => ControlCommand::Revoke { keyid, reason },
                    (None, Some(issuer), Some(san)) => ControlCommand::RevokeIdentity {
                        issuer,
                        san,
                        reason,
                    },
                    _ => {
                        return Err(CliError::Invalid(
                            "name a keyid, a certificate SHA-256, or --issuer and --san".into(),
                        ));
                    }
                };
                sign_and_send(command, &operator, &nats)
            }
            KeysCommand::Rotate {
                profile,
                tenant,
                plan,
                keys,
                reason,
                operator,
                nats,
            } => sign_and_send(
                ControlCommand::Rotate {
                    profile,
                    tenant,
                    plan,
                    keys,
                    reason,
                },
                &operator,
                &nats,
            ),
            KeysCommand::Restore {
                profile,
                tenant,
                plan,
                reason,
                operator,
                nats,
            } => sign_and_send(
                ControlCommand::Restore {
                    profile,
                    tenant,
                    plan,
                    reason,
                },
                &operator,
                &nats,
            ),
            KeysCommand::Cosign {
                file,
                send: now,
                operator,
                nats,
            } => {
                let text = std::fs::read(&file)
                    .map_err(|e| CliError::Unusable(format!("{}: {e}", file.display())))?;
                let mut envelope: ControlEnvelope = serde_json::from_slice(&text).map_err(|e| {
                    CliError::Unusable(format!("{}: not a signed command: {e}", file.display()))
                })?;
                if !operator.operator_keys.is_empty() {
                    operator.sign(&mut envelope)?;
                }
                if now {
                    send(&nats, &envelope)
                } else {
                    write_envelope(operator.out.as_deref().unwrap_or(&file), &envelope)
                }
            }
            KeysCommand::List { json, nats } => super::nats_client::runtime()?.block_on(async {
                let keys = key_ledger(&nats)
                    .await?
                    .list()
                    .await
                    .map_err(|e| CliError::Unusable(e.to_string()))?;
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
