//! The embedded development setup of `serve --dev --state DIR`: signing keys and a config
//! kept in DIR, created on first use and reused afterwards.

use std::path::{Path, PathBuf};

use signer_actors::keys::KeyAlgorithm;

use crate::keys::file::FileKey;

/// Files of a development state directory.
pub struct DevState {
    pub config: PathBuf,
    pub identity: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// Creates what is missing in `dir` and returns its files.
pub fn prepare(dir: &Path) -> Result<DevState, String> {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).map_err(io(&keys))?;
    for (name, algorithm) in [
        ("dev-ecdsa", KeyAlgorithm::EcdsaP256Sha256),
        ("dev-ed25519", KeyAlgorithm::Ed25519),
    ] {
        if !keys.join(format!("{name}.key")).exists() {
            FileKey::generate(algorithm, &keys, name).map_err(|e| e.to_string())?;
        }
    }
    let config = dir.join("signer.toml");
    if !config.exists() {
        let text = format!(
            r#"# Development configuration written by `stella-signer serve --dev`. Not for production:
# the gates are disabled (every job passes them; results and audit events say "disabled").

[nats]
url = "nats://127.0.0.1:4222"

[http]
listen = "127.0.0.1:9464"

[gates.entitlement]
mode = "disabled"

[gates.quota]
mode = "disabled"

[gates.provenance]
mode = "disabled"

[[keys]]
name = "dev-ecdsa"
source = "file"
path = "{ec}"

[[keys]]
name = "dev-ed25519"
source = "file"
path = "{ed}"

[profiles.default]
keys = ["dev-ecdsa"]

[profiles.multi]
keys = ["dev-ecdsa", "dev-ed25519"]
"#,
            ec = keys.join("dev-ecdsa.key").display(),
            ed = keys.join("dev-ed25519.key").display(),
        );
        std::fs::write(&config, text).map_err(io(&config))?;
    }
    let identity = dir.join("identity.json");
    if !identity.exists() {
        // With the gates disabled any non-empty token passes; the values say what they are.
        let text = serde_json::json!({
            "auth": {"opTok": "dev.gates-disabled.no-token"},
            "poe": {"format": "jwt", "value": "dev.gates-disabled.no-licence"},
            "scanner": {"repository": "localhost/stella-ops/scanner", "imageDigest": format!("sha256:{}", "0".repeat(64))}
        });
        std::fs::write(
            &identity,
            serde_json::to_vec_pretty(&text).unwrap_or_default(),
        )
        .map_err(io(&identity))?;
    }
    Ok(DevState { config, identity })
}
