//! Key backends that implement the [`signer_actors::keys::KeySigner`] port.

pub(crate) mod certified;
pub(crate) mod cosign;
pub mod factory;
pub mod file;
pub mod fulcio_trust;
pub mod keyless;
pub(crate) mod material;
pub(crate) mod pin;
pub mod pkcs11;
#[cfg(feature = "yubikey")]
pub(crate) mod yubikey;
