//! Key backends that implement the [`signer_actors::keys::KeySigner`] port.

pub mod certified;
pub mod cosign;
pub mod factory;
pub mod file;
pub mod fulcio_trust;
pub mod keyless;
pub mod material;
pub mod pin;
pub mod pkcs11;
#[cfg(feature = "yubikey")]
pub mod yubikey;
