//! The user PIN of a device key (PKCS#11 token, YubiKey), from a file or an environment
//! variable, so it never sits in the configuration file itself.

use signer_actors::keys::KeyError;

use crate::config::KeyConfig;

/// Reads the PIN from `pin_file` (trailing newline ignored) or `pin_env`. A missing PIN is
/// [`KeyError::Unavailable`]: it may appear (a mounted secret), and the Keyring retries.
pub fn read_pin(name: &str, cfg: &KeyConfig) -> Result<String, KeyError> {
    let pin = if let Some(path) = &cfg.pin_file {
        std::fs::read_to_string(path).map_err(|e| {
            KeyError::Unavailable(format!("key {name}: PIN file {}: {e}", path.display()))
        })?
    } else if let Some(var) = &cfg.pin_env {
        std::env::var(var).map_err(|_| {
            KeyError::Unavailable(format!("key {name}: environment variable {var} is not set"))
        })?
    } else {
        return Err(KeyError::Unavailable(format!(
            "key {name}: neither pin_file nor pin_env is set"
        )));
    };
    Ok(pin.trim_end_matches(['\r', '\n']).to_string())
}
