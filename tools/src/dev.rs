//! The development setup of `stella-signer-tools dev init --state DIR`: everything a signer
//! needs to pass every gate for real, kept in DIR, created on first use and reused afterwards:
//!
//! - `keys/`: signing keys (ECDSA P-256 `dev-ecdsa`, Ed25519 `dev-ed25519`);
//! - `authority/`: a dev Authority key (EdDSA) and its JWKS, which OpToks are checked against;
//! - `licensing/`: a dev licensing key (ES256) and its JWKS, for Proof-of-Entitlement JWTs;
//! - `release/`: a dev scanner release key; the dev scanner digest is allowlisted (offline kit);
//! - `operator/`: a dev operator key (EdDSA) and its JWKS, configured as `[gates.control]`:
//!   `stella-signer keys revoke --operator-key DIR/operator/operator.key` signs key commands
//!   with it;
//! - `signer.toml`: rewritten by every `dev init` from the files above, gates enforcing; the
//!   worker runs with `stella-signer serve --config DIR/signer.toml`.
//!
//! `dev token` mints OpToks, DPoP proofs and licences for this setup, and `dev identity` the
//! `auth`/`poe`/`scanner` members of a request (what `stella-signer submit --identity` reads).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use signer_actors::keys::KeyAlgorithm;

use stella_signer::keys::file::{FileKey, FileKeyError};

use crate::mint::{self, MintAlg, MintError};

/// `iss` of dev OpToks.
pub const DEV_ISSUER: &str = "https://authority.dev.stella-ops.local";
/// DPoP `htu` of the dev setup (the contract's default).
pub const DEV_HTU: &str = "nats:sign.requests";
/// The dev scanner release repository.
pub const DEV_SCANNER_REPOSITORY: &str = "localhost/stella-ops/scanner";

/// The digest of the dev scanner release (allowlisted in the dev configuration).
pub fn dev_scanner_digest() -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(b"stella-ops dev scanner release 2026.11"))
    )
}

/// Files of a development state directory.
pub struct DevState {
    pub dir: PathBuf,
    pub config: PathBuf,
}

/// Why the development setup could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source} (run `stella-signer-tools dev init --state {}` first)", path.display(), dir.display())]
    NotInitialised {
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key: {0}")]
    SigningKey(#[from] FileKeyError),
    #[error(transparent)]
    Mint(#[from] MintError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), DevError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// A JWS issuer key of the dev setup (`authority` or `licensing`): creates it when missing.
fn issuer_key(dir: &Path, name: &str, alg: MintAlg) -> Result<(), DevError> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).map_err(io(&sub))?;
    let key = sub.join(format!("{name}.key"));
    if key.exists() {
        return Ok(());
    }
    let (pem, jwk) = mint::generate_signing_key(alg)?;
    write_private(&key, &pem)?;
    let jwks = sub.join("jwks.json");
    std::fs::write(&jwks, serde_json::to_vec_pretty(&mint::jwks(&[jwk]))?).map_err(io(&jwks))
}

/// The private key PEM and kid of an issuer key.
fn read_issuer(dir: &Path, name: &str) -> Result<(String, String), DevError> {
    let key = dir.join(name).join(format!("{name}.key"));
    let pem = std::fs::read_to_string(&key).map_err(|source| DevError::NotInitialised {
        path: key.clone(),
        dir: dir.to_path_buf(),
        source,
    })?;
    let jwk = mint::public_jwk(&pem).map_err(MintError::from)?;
    // generate_signing_key names a key by its RFC 7638 thumbprint
    let kid = jwk.kid.clone().unwrap_or_else(|| mint::jkt_of(&jwk));
    Ok((pem, kid))
}

/// Creates what is missing in `dir`, writes `signer.toml`, and returns the state.
pub fn prepare(dir: &Path) -> Result<DevState, DevError> {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).map_err(io(&keys))?;
    for (name, algorithm) in [
        ("dev-ecdsa", KeyAlgorithm::EcdsaP256Sha256),
        ("dev-ed25519", KeyAlgorithm::Ed25519),
    ] {
        if !keys.join(format!("{name}.key")).exists() {
            FileKey::generate(algorithm, &keys, name)?;
        }
    }
    issuer_key(dir, "authority", MintAlg::EdDsa)?;
    issuer_key(dir, "licensing", MintAlg::Es256)?;
    issuer_key(dir, "operator", MintAlg::EdDsa)?;
    let release = dir.join("release");
    if !release.join("release.key").exists() {
        FileKey::generate(KeyAlgorithm::EcdsaP256Sha256, &release, "release")?;
    }
    let config = dir.join("signer.toml");
    let p = |rel: &str| dir.join(rel).display().to_string();
    let text = format!(
        r#"# Development configuration, rewritten by every `stella-signer-tools dev init --state {state}`.
# Every gate enforces, against the dev Authority, licensing and release keys in this directory.
# Run it with `stella-signer serve --config {state}/signer.toml`; mint credentials with
# `stella-signer-tools dev token --state {state}`. Edit a copy to change it.

[nats]
url = "nats://127.0.0.1:4222"

[http]
listen = "127.0.0.1:9464"

[gates.entitlement]
issuer = "{issuer}"
jwks_file = "{authority}"
dpop_htu = "{htu}"

[gates.entitlement.poe]
licensing_jwks_file = "{licensing}"

[gates.quota.plans.dev]
requests_per_second = 2000.0
burst = 4000
max_concurrent = 512
max_payload_bytes = 1048576

[gates.quota.plans.team]
requests_per_second = 50.0
burst = 100
max_concurrent = 16
max_payload_bytes = 262144
daily_cap = 100000

[gates.control]
jwks_file = "{operator}"

[gates.provenance]
trusted_keys = ["{release_pub}"]
allowlist = ["{scanner}"]

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
        state = dir.display(),
        issuer = DEV_ISSUER,
        authority = p("authority/jwks.json"),
        htu = DEV_HTU,
        licensing = p("licensing/jwks.json"),
        operator = p("operator/jwks.json"),
        release_pub = p("release/release.pub"),
        scanner = dev_scanner_digest(),
        ec = p("keys/dev-ecdsa.key"),
        ed = p("keys/dev-ed25519.key"),
    );
    std::fs::write(&config, text).map_err(io(&config))?;
    Ok(DevState {
        dir: dir.to_path_buf(),
        config,
    })
}

/// The dev operator's private key in a state directory (signs key commands).
pub fn operator_key_path(dir: &Path) -> PathBuf {
    dir.join("operator").join("operator.key")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

/// What `dev token` mints.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub tenant: String,
    pub plan: String,
    pub scope: String,
    pub dpop: bool,
    pub subject: String,
}

/// Mints `{opTok, dpop?, poe}` for the dev setup in `dir`. With `dpop`, the OpTok is bound
/// (`cnf.jkt`) to a fresh Ed25519 proof key and a proof for publishing it is included.
pub fn token(dir: &Path, req: &TokenRequest) -> Result<Value, DevError> {
    let (authority, authority_kid) = read_issuer(dir, "authority")?;
    let (licensing, licensing_kid) = read_issuer(dir, "licensing")?;
    let t = now();
    let mut claims = json!({
        "iss": DEV_ISSUER, "sub": req.subject, "aud": ["signer"], "scope": req.scope,
        "tid": req.tenant, "iat": t, "nbf": t, "exp": t + 3600,
    });
    let proof_key = if req.dpop {
        let (pem, jwk) = mint::generate_signing_key(MintAlg::EdDsa)?;
        claims["cnf"] = json!({"jkt": mint::jkt_of(&jwk)});
        Some(pem)
    } else {
        None
    };
    let op_tok = mint::mint_optok(&authority, &authority_kid, &claims)?;
    let poe = mint::mint_poe(
        &licensing,
        &licensing_kid,
        &json!({"tid": req.tenant, "plan": req.plan, "features": ["signer.sign"], "iat": t, "exp": t + 86_400}),
    )?;
    let mut out = json!({"opTok": op_tok, "poe": poe});
    if let Some(pem) = proof_key {
        out["dpop"] = mint::mint_dpop(&pem, &op_tok, DEV_HTU, t, &random_id())?.into();
    }
    Ok(out)
}

/// The `auth`, `poe` and `scanner` members of a request from the dev setup, with a fresh
/// DPoP proof (what `dev identity` prints for `stella-signer submit --identity`), or a bearer
/// OpTok when `dpop` is false.
pub fn request_identity(dir: &Path, tenant: &str, dpop: bool) -> Result<Value, DevError> {
    let t = token(
        dir,
        &TokenRequest {
            tenant: tenant.into(),
            plan: "dev".into(),
            scope: "signer.sign".into(),
            dpop,
            subject: "dev-user".into(),
        },
    )?;
    let mut auth = json!({"opTok": t["opTok"]});
    if dpop {
        auth["dpop"] = t["dpop"].clone();
    }
    Ok(json!({
        "auth": auth,
        "poe": {"format": "jwt", "value": t["poe"]},
        "scanner": {"repository": DEV_SCANNER_REPOSITORY, "imageDigest": dev_scanner_digest()},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dev setup configures key control with the operator key it holds: the key's kid
    /// (what `keys revoke --operator-key DIR/operator/operator.key` signs with) is in the
    /// configured operator key set.
    #[test]
    fn dev_state_holds_an_operator_key_configured_for_key_control() {
        let dir = tempfile::tempdir().unwrap();
        let state = prepare(dir.path()).unwrap();
        let cfg = stella_signer::config::Config::load(&state.config, std::iter::empty()).unwrap();
        let control = cfg
            .gates
            .control
            .expect("[gates.control] in the dev config");
        assert_eq!(control.required_signatures, 1);
        let jwks = std::fs::read(control.jwks_file.unwrap()).unwrap();
        let (set, _) = stella_signer::entitlement::jwks::KeySet::parse(&jwks).unwrap();
        let pem = std::fs::read_to_string(operator_key_path(dir.path())).unwrap();
        let key = stella_signer::control::sign::OperatorKey::new(pem, None, "dev".into()).unwrap();
        assert!(set.find(Some(&key.kid)).is_some(), "kid {}", key.kid);
        // a second start reuses the key
        prepare(dir.path()).unwrap();
        let again = std::fs::read_to_string(operator_key_path(dir.path())).unwrap();
        assert_eq!(key.pem, again);
    }
}
