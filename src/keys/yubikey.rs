//! YubiKey PIV keys: an ECDSA P-256 private key in a PIV slot, reached over PC/SC
//! (`pcscd` must be running). Built only with `--features yubikey`.
//!
//! Each [`YubiKeySigner`] holds the device behind a mutex, used by one KeySigner actor at
//! a time; device calls run on a blocking thread. The signature slot (9c) has PIN policy
//! "always" by default, so the PIN is kept in memory and verified before every signature.
//! A device that goes away, or a PIN that stops working, answers [`KeyError::Unavailable`]:
//! the actor fails and the Keyring calls [`YubiKeySigner::open`] again with backoff. `open`
//! never spends the last PIN try, so a wrong PIN cannot lock the device through restarts.
//!
//! The message is hashed in process and the digest signed; the YubiKey answers ECDSA as
//! ASN.1 DER (the PIV applet's format, passed through unchanged by `piv::sign_data`), and a
//! raw `r||s` answer is re-encoded all the same. Every signature is checked against the
//! public key before it leaves, so a slot certificate that names another key is caught.
//!
//! The public key comes from the slot's attestation certificate (keys generated on the
//! device) or else from the certificate stored in the slot. The attestation certificate,
//! signed by the device's attestation key (slot f9, chained to Yubico's PIV CA), is
//! reported as the identity's certificate chain.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use signer_actors::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, SignerIdentity,
};
use yubikey::piv::{self, AlgorithmId, SlotId};
use yubikey::{Certificate, Serial, YubiKey};

use crate::config::{PivSlot, YubikeyKeyConfig};
use crate::keys::pkcs11::ecdsa_raw_to_der;

/// OID of id-ecPublicKey.
const ID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// OID of prime256v1 (P-256).
const PRIME256V1: &str = "1.2.840.10045.3.1.7";

/// The device's slot for a configured one.
pub fn slot_id(slot: PivSlot) -> SlotId {
    match slot {
        PivSlot::Authentication => SlotId::Authentication,
        PivSlot::Signature => SlotId::Signature,
        PivSlot::KeyManagement => SlotId::KeyManagement,
        PivSlot::CardAuthentication => SlotId::CardAuthentication,
    }
}

/// Whether a device failure means "the YubiKey cannot be used now" (retryable, the key is
/// reopened) rather than "the device refused this operation".
fn classify(what: &str, e: yubikey::Error) -> KeyError {
    match e {
        yubikey::Error::AlgorithmError
        | yubikey::Error::ArgumentError
        | yubikey::Error::SizeError
        | yubikey::Error::KeyError
        | yubikey::Error::NotSupported => KeyError::Rejected(format!("{what}: {e}")),
        yubikey::Error::WrongPin { tries } => {
            KeyError::Unavailable(format!("{what}: wrong PIN ({tries} tries left)"))
        }
        _ => KeyError::Unavailable(format!("{what}: {e}")),
    }
}

/// The PIN, overwritten when dropped.
struct Pin(Vec<u8>);

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Reads the PIN from `pin_file` or `pin_env` (trailing newline ignored).
fn read_pin(name: &str, cfg: &YubikeyKeyConfig) -> Result<Pin, KeyError> {
    super::pin::read_pin(name, &cfg.pin).map(|pin| Pin(pin.into_bytes()))
}

/// The P-256 public key a certificate certifies, or `None` for any other key type.
fn p256_public_key(cert: &Certificate) -> Option<PublicKey> {
    let spki = cert.subject_pki();
    if spki.algorithm.oid.to_string() != ID_EC_PUBLIC_KEY
        || spki.algorithm.parameters_oid().ok()?.to_string() != PRIME256V1
    {
        return None;
    }
    let raw = spki.subject_public_key.as_bytes()?;
    PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, raw).ok()
}

/// A DER certificate as one LF-terminated PEM block.
fn certificate_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Whether `der` is exactly one DER SEQUENCE (the shape of an ECDSA-Sig-Value).
fn is_der_sequence(der: &[u8]) -> bool {
    match der {
        [0x30, len, body @ ..] if *len < 0x80 => body.len() == *len as usize,
        [0x30, 0x81, len, body @ ..] if *len >= 0x80 => body.len() == *len as usize,
        _ => false,
    }
}

/// The device's ECDSA answer as ASN.1 DER: DER is passed through, raw `r||s` re-encoded.
fn ecdsa_to_der(sig: &[u8]) -> Result<Vec<u8>, KeyError> {
    if is_der_sequence(sig) {
        Ok(sig.to_vec())
    } else if sig.len() == 64 {
        ecdsa_raw_to_der(sig)
            .ok_or_else(|| KeyError::Rejected("YubiKey: malformed ECDSA signature".into()))
    } else {
        Err(KeyError::Rejected(format!(
            "YubiKey returned a {}-byte ECDSA signature, neither DER nor raw r||s",
            sig.len()
        )))
    }
}

/// The open device, its PIN and the slot, used from a blocking thread.
struct Device {
    yubikey: YubiKey,
    pin: Pin,
    slot: SlotId,
}

impl Device {
    /// Verifies the PIN (the signature slot wants it before every operation) and signs the
    /// SHA-256 digest of `message`.
    fn sign(&mut self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.yubikey
            .verify_pin(&self.pin.0)
            .map_err(|e| classify("YubiKey PIN verification", e))?;
        let digest = Sha256::digest(message);
        let sig = piv::sign_data(&mut self.yubikey, &digest, AlgorithmId::EccP256, self.slot)
            .map_err(|e| classify(&format!("YubiKey signing in slot {}", self.slot), e))?;
        ecdsa_to_der(&sig)
    }
}

/// An ECDSA P-256 key in a YubiKey PIV slot, PIN verified and ready to sign.
pub struct YubiKeySigner {
    name: String,
    identity: Arc<SignerIdentity>,
    device: Arc<Mutex<Device>>,
}

impl std::fmt::Debug for YubiKeySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("YubiKeySigner")
            .field("name", &self.name)
            .field("keyid", &self.identity.keyid)
            .finish()
    }
}

impl YubiKeySigner {
    /// Opens the configured YubiKey, verifies the PIN and reads the slot's public key.
    /// Blocking (PC/SC calls and the PIN file); every failure is [`KeyError::Unavailable`],
    /// so the Keyring retries.
    pub fn open(name: &str, cfg: &YubikeyKeyConfig) -> Result<Self, KeyError> {
        let slot_name = cfg.slot.as_str();
        let slot = slot_id(cfg.slot);
        let pin = read_pin(name, cfg)?;

        let which = match cfg.serial {
            Some(serial) => format!("the YubiKey with serial {serial}"),
            None => "a YubiKey".to_string(),
        };
        let opened = match cfg.serial {
            Some(serial) => YubiKey::open_by_serial(Serial(serial)),
            None => YubiKey::open(),
        };
        let mut yubikey = opened.map_err(|e| {
            let why = match e {
                yubikey::Error::NotFound => "none found".to_string(),
                yubikey::Error::PcscError { inner: None } if cfg.serial.is_none() => {
                    "more than one attached; set serial".to_string()
                }
                e => e.to_string(),
            };
            KeyError::Unavailable(format!(
                "key {name}: cannot open {which} over PC/SC ({why}); \
                 is pcscd running and the device attached?"
            ))
        })?;

        // Never spend the last PIN try: a wrong PIN retried by every restart would block it.
        let tries = yubikey
            .get_pin_retries()
            .map_err(|e| classify(&format!("key {name}: reading the PIN retry counter"), e))?;
        if tries <= 1 {
            return Err(KeyError::Unavailable(format!(
                "key {name}: the YubiKey PIN has {tries} tries left; the signer will not \
                 risk blocking it (check the PIN by hand, or unblock it with the PUK)"
            )));
        }
        yubikey
            .verify_pin(&pin.0)
            .map_err(|e| classify(&format!("key {name}: YubiKey PIN"), e))?;

        // The attestation certificate names the key the device holds; the slot certificate
        // is whatever was stored beside it.
        let attestation = piv::attest(&mut yubikey, slot)
            .ok()
            .and_then(|der| Some((Certificate::from_bytes(der.to_vec()).ok()?, der.to_vec())));
        let stored = Certificate::read(&mut yubikey, slot).ok();
        let from_attestation = attestation.as_ref().map(|(cert, _)| {
            p256_public_key(cert).ok_or_else(|| {
                KeyError::Unavailable(format!(
                    "key {name}: slot {slot_name} does not hold an ECDSA P-256 key"
                ))
            })
        });
        let public_key = match (from_attestation.transpose()?, &stored) {
            (Some(attested), Some(cert)) => {
                if p256_public_key(cert).as_ref() != Some(&attested) {
                    return Err(KeyError::Unavailable(format!(
                        "key {name}: the certificate in slot {slot_name} is not for the key \
                         the device attests in that slot"
                    )));
                }
                attested
            }
            (Some(attested), None) => attested,
            (None, Some(cert)) => p256_public_key(cert).ok_or_else(|| {
                KeyError::Unavailable(format!(
                    "key {name}: the certificate in slot {slot_name} is not for an ECDSA P-256 key"
                ))
            })?,
            (None, None) => {
                return Err(KeyError::Unavailable(format!(
                    "key {name}: slot {slot_name} has neither an attestation nor a certificate \
                     to read its public key from (store a certificate in the slot)"
                )));
            }
        };

        let mut identity = SignerIdentity::keyful(public_key, KeySource::Yubikey);
        if let Some((_, der)) = &attestation {
            identity.certificate_chain = vec![certificate_pem(der)];
        }
        Ok(Self {
            name: name.to_string(),
            identity: Arc::new(identity),
            device: Arc::new(Mutex::new(Device { yubikey, pin, slot })),
        })
    }
}

fn sign_checked(
    device: &Mutex<Device>,
    identity: &SignerIdentity,
    message: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let sig = device
        .lock()
        .map_err(|_| KeyError::Unavailable("YubiKey device lock poisoned".into()))?
        .sign(message)?;
    if !identity.public_key.verify(message, &sig) {
        return Err(KeyError::Unavailable(format!(
            "the YubiKey's signature does not verify with key {}: the slot's key changed \
             since it was opened",
            identity.keyid
        )));
    }
    Ok(sig)
}

#[async_trait]
impl KeySigner for YubiKeySigner {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }

    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        let device = self.device.clone();
        let identity = self.identity.clone();
        let message = message.to_vec();
        let sig = tokio::task::spawn_blocking(move || sign_checked(&device, &identity, &message))
            .await
            .map_err(|e| KeyError::Unavailable(format!("YubiKey signing task: {e}")))??;
        Ok(KeySignature {
            sig,
            identity: self.identity.clone(),
            rfc3161_timestamp: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PinSource;

    /// A self-signed P-256 certificate (openssl), and its SubjectPublicKeyInfo in hex.
    const P256_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBhjCCASugAwIBAgIUWmXD4s2wpbqqGPYyhAg/bnq7RA4wCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMeXViaWtleS10ZXN0MCAXDTI2MTEyOTA2MTEwMloYDzIxMjYx
MTA1MDYxMTAyWjAXMRUwEwYDVQQDDAx5dWJpa2V5LXRlc3QwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAQEnb5S+ndkj3Ma50t4BlfNODW+RFP/oeznL2+aHUwcM9VE
Kg8de/7pDBNdlZityNYgwMSQ1mzhJpOVFZkAUOPXo1MwUTAdBgNVHQ4EFgQUV1OD
tcjBok8zBEVrOTkKIgrEBawwHwYDVR0jBBgwFoAUV1ODtcjBok8zBEVrOTkKIgrE
BawwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA7fnkEh8ZT/l8
H+fVHJb+fySCKMSmLqLXUrhYUcpo5EoCIQCz3obE0Wuc+QPdEWZqIdLcaRIQoJB5
tJbzv/VtlIcKaQ==
-----END CERTIFICATE-----
";
    const P256_SPKI_HEX: &str = "3059301306072a8648ce3d020106082a8648ce3d03010703420004049dbe52fa\
        77648f731ae74b780657cd3835be4453ffa1ece72f6f9a1d4c1c33d5442a0f1d7bfee90c135d9598adc8d6\
        20c0c490d66ce126939515990050e3d7";
    /// A self-signed Ed25519 certificate: not a key a PIV slot can sign DSSE with here.
    const ED25519_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBMDCB46ADAgECAhRT8mcr8pQ+TEMJXYcU8WU4yTNnIzAFBgMrZXAwDTELMAkG
A1UEAwwCZWQwIBcNMjYxMTI5MDYxMTAyWhgPMjEyNjExMDUwNjExMDJaMA0xCzAJ
BgNVBAMMAmVkMCowBQYDK2VwAyEA02d+zkY64Om5nSS4u1Yn6ek3goUR3GMB1W0l
ebCh4OqjUzBRMB0GA1UdDgQWBBQ5mM4zxEN5px6YrP//QlgWJfj6CzAfBgNVHSME
GDAWgBQ5mM4zxEN5px6YrP//QlgWJfj6CzAPBgNVHRMBAf8EBTADAQH/MAUGAytl
cANBAG+4VUYBz2irUJZ3gcy9cZgfS2n88Qd+SLd7vmgqva8p4Oq7Jl385ccOeXFu
4AWgrCu9uu8q6kqNPpVngebeNgI=
-----END CERTIFICATE-----
";

    fn cert(text: &str) -> (Certificate, Vec<u8>) {
        let der = pem::parse(text).unwrap().into_contents();
        (Certificate::from_bytes(der.clone()).unwrap(), der)
    }

    fn key_config(serial: Option<u32>, pin_file: &std::path::Path) -> YubikeyKeyConfig {
        YubikeyKeyConfig {
            serial,
            ..YubikeyKeyConfig::new("yk", PinSource::File(pin_file.to_path_buf()))
        }
    }

    #[test]
    fn every_configured_slot_is_its_piv_key_slot() {
        let slots: Vec<_> = PivSlot::ALL.into_iter().map(slot_id).collect();
        assert_eq!(
            slots,
            [
                SlotId::Authentication,
                SlotId::Signature,
                SlotId::KeyManagement,
                SlotId::CardAuthentication
            ]
        );
        assert_eq!(slot_id(PivSlot::default()), SlotId::Signature);
        let names: Vec<_> = PivSlot::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["9a", "9c", "9d", "9e"]);
    }

    #[test]
    fn the_public_key_is_read_from_a_p256_certificate_only() {
        let (p256, der) = cert(P256_CERT);
        let pk = p256_public_key(&p256).unwrap();
        assert_eq!(hex::encode(pk.spki_der()), P256_SPKI_HEX);
        // the identity's chain check (certified::load_chain) finds the key in this leaf
        assert!(der.windows(pk.spki_der().len()).any(|w| w == pk.spki_der()));
        let pem_text = certificate_pem(&der);
        assert!(pem_text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(pem::parse(&pem_text).unwrap().contents(), der);
        let (ed, _) = cert(ED25519_CERT);
        assert_eq!(p256_public_key(&ed), None);
    }

    #[test]
    fn signatures_leave_as_der_whatever_the_device_answers() {
        use ring::rand::SystemRandom;
        use ring::signature::{
            ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair,
            KeyPair as _,
        };
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let fixed =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap();
        let asn1 = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public =
            PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, fixed.public_key().as_ref())
                .unwrap();
        for i in 0..32u8 {
            let msg = [i; 40];
            let der = asn1.sign(&rng, &msg).unwrap();
            assert_eq!(
                ecdsa_to_der(der.as_ref()).unwrap(),
                der.as_ref(),
                "DER passes"
            );
            let raw = fixed.sign(&rng, &msg).unwrap();
            assert!(public.verify(&msg, &ecdsa_to_der(raw.as_ref()).unwrap()));
        }
        assert!(matches!(
            ecdsa_to_der(&[1u8; 10]),
            Err(KeyError::Rejected(_))
        ));
        assert!(matches!(
            ecdsa_to_der(&[0x30, 5, 1]),
            Err(KeyError::Rejected(_))
        ));
    }

    #[test]
    fn device_errors_split_into_retryable_and_refused() {
        for e in [
            yubikey::Error::NotFound,
            yubikey::Error::GenericError,
            yubikey::Error::PinLocked,
            yubikey::Error::WrongPin { tries: 2 },
            yubikey::Error::PcscError { inner: None },
        ] {
            assert!(
                matches!(classify("x", e), KeyError::Unavailable(_)),
                "{e:?}"
            );
        }
        for e in [yubikey::Error::SizeError, yubikey::Error::AlgorithmError] {
            assert!(matches!(classify("x", e), KeyError::Rejected(_)), "{e:?}");
        }
        let KeyError::Unavailable(m) = classify("PIN", yubikey::Error::WrongPin { tries: 2 })
        else {
            unreachable!()
        };
        assert!(m.contains("2 tries left"), "{m}");
    }

    /// No YubiKey here (and usually no pcscd): opening must fail as retryable and say where
    /// to look. Serial 1 matches no real device, so this holds on a machine with one too.
    #[test]
    fn opening_without_a_device_is_unavailable_and_names_pcscd() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "123456\n").unwrap();
        let cfg = key_config(Some(1), &pin);
        let err = YubiKeySigner::open("yk", &cfg).unwrap_err();
        let KeyError::Unavailable(m) = &err else {
            panic!("expected Unavailable, got {err:?}")
        };
        assert!(m.contains("PC/SC") && m.contains("pcscd"), "{m}");
        assert!(m.contains("serial 1"), "{m}");
    }
}
