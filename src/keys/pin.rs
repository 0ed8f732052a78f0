//! The user PIN of a device key (PKCS#11 token, YubiKey), from a file or an environment
//! variable, so it never sits in the configuration file itself.

use signer_actors::keys::KeyError;

use crate::config::PinSource;

/// Reads the PIN from its file (trailing newline ignored) or environment variable. A missing
/// PIN is [`KeyError::Unavailable`]: it may appear (a mounted secret), and the Keyring retries.
pub fn read_pin(name: &str, source: &PinSource) -> Result<String, KeyError> {
    let pin = match source {
        PinSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            KeyError::Unavailable(format!("key {name}: PIN file {}: {e}", path.display()))
        })?,
        PinSource::Env(var) => std::env::var(var).map_err(|_| {
            KeyError::Unavailable(format!("key {name}: environment variable {var} is not set"))
        })?,
    };
    Ok(pin.trim_end_matches(['\r', '\n']).to_string())
}
