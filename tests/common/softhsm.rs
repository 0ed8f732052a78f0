//! A fresh SoftHSM2 for one test run: its own token directory and `softhsm2.conf` under
//! the cargo target's tmp dir, `SOFTHSM2_CONF` set for this process (and so for every
//! `serve` child it spawns), and tokens with key pairs generated on them.
//!
//! SoftHSM reads its configuration and token list at `C_Initialize`, which happens once
//! per process, so every token of the run is created up front, before the first key opens.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use signer_actors::keys::KeyAlgorithm;
use stella_signer::config::{PinSource, Pkcs11KeyConfig, Pkcs11Object};
use stella_signer::keys::pkcs11::{DEFAULT_MODULE, create_token_key};

pub const PIN: &str = "1234";
pub const SO_PIN: &str = "1234";
/// Label (and `CKA_ID` 01) of the P-256 key pair on every token.
pub const EC_LABEL: &str = "ec";
pub const EC_ID: &str = "01";
/// Label (and `CKA_ID` 02) of the Ed25519 key pair, when SoftHSM can make one.
pub const ED_LABEL: &str = "ed";
pub const ED_ID: &str = "02";

pub struct SoftHsm {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub module: PathBuf,
    /// Token for tests that sign.
    pub token: String,
    /// Token for tests that log in with wrong PINs (so a lockout could not hit the others).
    pub fault_token: String,
    /// Token whose sessions a test closes with `C_CloseAllSessions` (which closes every
    /// session of the process on it, so no other test may use it).
    pub session_token: String,
    /// Why no Ed25519 key could be generated, if none could.
    pub ed25519_error: Option<String>,
}

/// The run's SoftHSM, created on first use. Fails (never skips) when SoftHSM2 is missing.
pub fn softhsm() -> &'static SoftHsm {
    static HSM: OnceLock<SoftHsm> = OnceLock::new();
    HSM.get_or_init(SoftHsm::create)
}

fn unique(tag: &str) -> String {
    let mut rnd = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd).unwrap();
    // token labels are at most 32 bytes
    format!("{tag}-{}-{}", std::process::id(), hex::encode(rnd))
}

/// Removes token directories of earlier runs (older than an hour).
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if old && entry.file_name().to_string_lossy().starts_with("softhsm-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl SoftHsm {
    fn create() -> SoftHsm {
        let module = PathBuf::from(DEFAULT_MODULE);
        let util = Command::new("softhsm2-util").arg("--version").output();
        assert!(
            module.exists() && util.is_ok_and(|o| o.status.success()),
            "SoftHSM2 is missing ({} or softhsm2-util): run scripts/bootstrap.sh",
            module.display()
        );
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale(root);
        let dir = root.join(unique("softhsm"));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        // SAFETY: set once, inside the OnceLock, before any PKCS#11 module is initialised in
        // this process; the test threads only read it through SoftHSM and child processes.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };

        let token = unique("t");
        let fault_token = unique("f");
        let session_token = unique("s");
        for label in [&token, &fault_token, &session_token] {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", label])
                .args(["--so-pin", SO_PIN, "--pin", PIN])
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "softhsm2-util --init-token: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut hsm = SoftHsm {
            dir,
            conf,
            module,
            token,
            fault_token,
            session_token,
            ed25519_error: None,
        };
        for label in [
            hsm.token.clone(),
            hsm.fault_token.clone(),
            hsm.session_token.clone(),
        ] {
            hsm.generate(&label, KeyAlgorithm::EcdsaP256Sha256, EC_LABEL, EC_ID)
                .unwrap();
        }
        hsm.ed25519_error = hsm
            .generate(&hsm.token.clone(), KeyAlgorithm::Ed25519, ED_LABEL, ED_ID)
            .err();
        hsm
    }

    /// Generates a token key pair with the backend's own helper.
    fn generate(
        &self,
        token: &str,
        algorithm: KeyAlgorithm,
        label: &str,
        id: &str,
    ) -> Result<(), String> {
        create_token_key(
            &self.module,
            token,
            PIN,
            algorithm,
            label,
            &hex::decode(id).unwrap(),
        )
        .map_err(|e| e.to_string())
    }

    /// The `[[keys]]` entry of a token key, as `serve` reads it (`.into()` a `KeyConfig`).
    pub fn key_config(
        &self,
        name: &str,
        token: &str,
        key_label: &str,
        pin_file: &Path,
    ) -> Pkcs11KeyConfig {
        Pkcs11KeyConfig {
            module: Some(self.module.clone()),
            ..Pkcs11KeyConfig::new(
                name,
                token,
                Pkcs11Object::Label(key_label.into()),
                PinSource::File(pin_file.to_path_buf()),
            )
        }
    }
}
