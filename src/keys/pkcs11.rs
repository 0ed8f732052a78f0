//! PKCS#11 keys: a private key on a token (an HSM, SoftHSM, a YubiKey through `ykcs11`),
//! ECDSA P-256 or Ed25519.
//!
//! Each [`Pkcs11Key`] owns one logged-in session, used by one KeySigner actor at a time.
//! When the token goes away (wrong PIN, device removed, session closed) `sign` answers
//! [`KeyError::Unavailable`]; the actor fails and the Keyring calls [`Pkcs11Key::open`]
//! again, which opens a fresh session.
//!
//! ECDSA is hashed in process and signed with `CKM_ECDSA` (SoftHSM 2.6 rejects
//! `CKM_ECDSA_SHA256`); the token answers raw `r||s`, which DSSE verifiers do not accept,
//! so it is re-encoded as ASN.1 DER.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use sha2::{Digest as _, Sha256};
use signer_actors::keys::{
    KeyAlgorithm, KeyError, KeySignature, KeySigner, KeySource, PublicKey, SignerIdentity,
};

use crate::config::{Pkcs11KeyConfig, Pkcs11Object};

/// The module used when a key names none: Debian's SoftHSM2.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// DER of the prime256v1 (P-256) OID, as `CKA_EC_PARAMS` holds it.
pub const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the id-Ed25519 OID (RFC 8410), one way `CKA_EC_PARAMS` names Ed25519.
pub const ED25519_EC_PARAMS_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER PrintableString "edwards25519", the other (PKCS#11 3.0) way.
const ED25519_EC_PARAMS_NAME: &[u8] = b"\x13\x0cedwards25519";

/// One initialised context per module for the whole process: `C_Initialize` is
/// process-wide, and dropping the last handle of a context would finalise the module
/// under every other key that uses it. Contexts are therefore never dropped.
static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// Loads and initialises `module` once per process and returns a handle to it.
pub fn context(module: &Path) -> Result<Pkcs11, KeyError> {
    let mut contexts = CONTEXTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| KeyError::Unavailable("PKCS#11 context registry poisoned".into()))?;
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module)
        .map_err(|e| KeyError::Unavailable(format!("PKCS#11 module {}: {e}", module.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KeyError::Unavailable(format!(
                "PKCS#11 module {}: {e}",
                module.display()
            )));
        }
    }
    contexts.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Whether a PKCS#11 failure means "the token cannot be used now" (retryable, the key is
/// reloaded) rather than "the token refused this operation".
///
/// An invalid key or object handle counts as unavailable: the handle was found and checked
/// when the session was opened, so it goes bad only when the session lost its view of the
/// token (SoftHSM 2.6 answers `CKR_OBJECT_HANDLE_INVALID`, not `CKR_USER_NOT_LOGGED_IN`,
/// once the login is gone, and also when the token's storage disappeared). Reloading finds
/// the key again, or says why it cannot.
fn is_unavailable(e: &CkError) -> bool {
    match e {
        CkError::LibraryLoading(_) | CkError::NullFunctionPointer | CkError::MissingSymbol(_) => {
            true
        }
        CkError::Pkcs11(rv, _) => matches!(
            rv,
            RvError::PinIncorrect
                | RvError::PinExpired
                | RvError::PinLocked
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SessionCount
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::DeviceRemoved
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::SlotIdInvalid
                | RvError::GeneralError
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
        ),
        _ => false,
    }
}

fn classify(what: &str, e: CkError) -> KeyError {
    let text = match &e {
        CkError::Pkcs11(rv, _) => format!("{what}: {e} ({})", ckr_name(*rv)),
        _ => format!("{what}: {e}"),
    };
    if is_unavailable(&e) {
        KeyError::Unavailable(text)
    } else {
        KeyError::Rejected(text)
    }
}

/// The specification's name of a return value (`CKR_SESSION_HANDLE_INVALID`), which is what
/// HSM vendors' documentation and logs use; cryptoki's text is a sentence.
fn ckr_name(rv: RvError) -> String {
    let mut name = String::from("CKR");
    for c in format!("{rv:?}").chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// Any failure while opening the key is retryable: the Keyring tries again with backoff.
fn unavailable(what: impl std::fmt::Display) -> impl FnOnce(CkError) -> KeyError {
    move |e| KeyError::Unavailable(format!("{what}: {e}"))
}

/// Where the PIN comes from.
fn read_pin(name: &str, cfg: &Pkcs11KeyConfig) -> Result<AuthPin, KeyError> {
    super::pin::read_pin(name, &cfg.pin).map(AuthPin::from)
}

/// Strips a DER OCTET STRING header (short or long form length) when `der` is exactly one.
fn unwrap_octet_string(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 2 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (body.len() == len).then_some(body)
}

/// The raw public key from `CKA_EC_POINT`: normally a DER OCTET STRING around the point,
/// but some modules hand out the bare point.
fn raw_point(algorithm: KeyAlgorithm, ec_point: &[u8]) -> Option<&[u8]> {
    let expected = match algorithm {
        KeyAlgorithm::EcdsaP256Sha256 => 65,
        KeyAlgorithm::Ed25519 => 32,
    };
    match unwrap_octet_string(ec_point) {
        Some(inner) if inner.len() == expected => Some(inner),
        _ if ec_point.len() == expected => Some(ec_point),
        _ => None,
    }
}

/// Encodes one unsigned big-endian integer as a minimal DER INTEGER.
fn der_integer(out: &mut Vec<u8>, bytes: &[u8]) {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let mut v = &bytes[first..];
    if v.is_empty() {
        v = &[0];
    }
    let pad = v[0] & 0x80 != 0;
    out.push(0x02);
    out.push((v.len() + usize::from(pad)) as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(v);
}

/// Converts a raw `r||s` ECDSA signature (as PKCS#11 returns it) to ASN.1 DER.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 132 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = Vec::with_capacity(raw.len() + 6);
    der_integer(&mut body, r);
    der_integer(&mut body, s);
    let mut out = Vec::with_capacity(body.len() + 3);
    out.push(0x30);
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend(body);
    Some(out)
}

/// The session and the key handle, used from a blocking thread.
struct Token {
    session: Mutex<Session>,
    key: ObjectHandle,
    algorithm: KeyAlgorithm,
}

impl Token {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let session = self
            .session
            .lock()
            .map_err(|_| KeyError::Unavailable("PKCS#11 session lock poisoned".into()))?;
        match self.algorithm {
            KeyAlgorithm::EcdsaP256Sha256 => {
                let digest = Sha256::digest(message);
                let raw = session
                    .sign(&Mechanism::Ecdsa, self.key, &digest)
                    .map_err(|e| classify("CKM_ECDSA", e))?;
                if raw.len() != 64 {
                    return Err(KeyError::Rejected(format!(
                        "CKM_ECDSA returned {} bytes, expected 64 (r||s)",
                        raw.len()
                    )));
                }
                ecdsa_raw_to_der(&raw)
                    .ok_or_else(|| KeyError::Rejected("CKM_ECDSA: malformed signature".into()))
            }
            KeyAlgorithm::Ed25519 => {
                let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
                let sig = session
                    .sign(&mechanism, self.key, message)
                    .map_err(|e| classify("CKM_EDDSA", e))?;
                if sig.len() != 64 {
                    return Err(KeyError::Rejected(format!(
                        "CKM_EDDSA returned {} bytes, expected 64",
                        sig.len()
                    )));
                }
                Ok(sig)
            }
        }
    }
}

/// A private key on a PKCS#11 token, logged in and ready to sign.
pub struct Pkcs11Key {
    name: String,
    identity: Arc<SignerIdentity>,
    token: Arc<Token>,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("name", &self.name)
            .field("keyid", &self.identity.keyid)
            .finish()
    }
}

impl Pkcs11Key {
    /// Opens a session on the configured token, logs in and finds the key pair. Blocking
    /// (module calls and the PIN file); every failure is [`KeyError::Unavailable`], so the
    /// Keyring retries.
    pub fn open(name: &str, cfg: &Pkcs11KeyConfig) -> Result<Self, KeyError> {
        let module = cfg
            .module
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE));
        let token_label = cfg.token_label.as_str();
        let ctx = context(&module)?;
        let slot = ctx
            .get_slots_with_token()
            .map_err(unavailable(format_args!("key {name}: listing slots")))?
            .into_iter()
            .find(|slot| {
                ctx.get_token_info(*slot)
                    .map(|info| info.label().trim_end() == token_label)
                    .unwrap_or(false)
            })
            .ok_or_else(|| {
                KeyError::Unavailable(format!(
                    "key {name}: no token labelled {token_label:?} in {}",
                    module.display()
                ))
            })?;
        let session = ctx
            .open_ro_session(slot)
            .map_err(unavailable(format_args!("key {name}: opening a session")))?;
        let pin = read_pin(name, cfg)?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(unavailable(format_args!("key {name}: login"))(e)),
        }

        let selector = match &cfg.object {
            Pkcs11Object::Label(label) => Attribute::Label(label.as_bytes().to_vec()),
            Pkcs11Object::Id(id) => Attribute::Id(id.clone()),
        };
        let find_one = |class: ObjectClass, what: &str| -> Result<ObjectHandle, KeyError> {
            let found = session
                .find_objects(&[Attribute::Class(class), selector.clone()])
                .map_err(unavailable(format_args!("key {name}: finding the {what}")))?;
            match found.as_slice() {
                [one] => Ok(*one),
                [] => Err(KeyError::Unavailable(format!(
                    "key {name}: no {what} matching {selector:?} on token {token_label:?}"
                ))),
                _ => Err(KeyError::Unavailable(format!(
                    "key {name}: {} {what}s match {selector:?} on token {token_label:?}; \
                     use a unique key_label or key_id",
                    found.len()
                ))),
            }
        };
        let private = find_one(ObjectClass::PRIVATE_KEY, "private key")?;
        let public = find_one(ObjectClass::PUBLIC_KEY, "public key")?;

        let attrs = session
            .get_attributes(
                public,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                ],
            )
            .map_err(unavailable(format_args!(
                "key {name}: reading the public key"
            )))?;
        let (mut key_type, mut params, mut point) = (None, None, None);
        for attr in attrs {
            match attr {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        let params = params.unwrap_or_default();
        let algorithm = if key_type == Some(KeyType::EC) && params == P256_EC_PARAMS {
            KeyAlgorithm::EcdsaP256Sha256
        } else if key_type == Some(KeyType::EC_EDWARDS)
            && (params == ED25519_EC_PARAMS_OID || params == ED25519_EC_PARAMS_NAME)
        {
            KeyAlgorithm::Ed25519
        } else {
            return Err(KeyError::Unavailable(format!(
                "key {name}: unsupported key (type {key_type:?}, EC params {}); \
                 ECDSA P-256 or Ed25519 expected",
                hex::encode(&params)
            )));
        };
        let point = point.unwrap_or_default();
        let raw = raw_point(algorithm, &point).ok_or_else(|| {
            KeyError::Unavailable(format!(
                "key {name}: CKA_EC_POINT is not a {} public key",
                algorithm.as_str()
            ))
        })?;
        let public_key = PublicKey::from_raw(algorithm, raw)
            .map_err(|e| KeyError::Unavailable(format!("key {name}: public key: {e}")))?;

        Ok(Self {
            name: name.to_string(),
            identity: Arc::new(SignerIdentity::keyful(public_key, KeySource::Pkcs11)),
            token: Arc::new(Token {
                session: Mutex::new(session),
                key: private,
                algorithm,
            }),
        })
    }

    /// Signs synchronously (blocks on the token).
    pub fn sign_blocking(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.token.sign(message)
    }
}

#[async_trait]
impl KeySigner for Pkcs11Key {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> Arc<SignerIdentity> {
        self.identity.clone()
    }

    async fn sign(&self, message: &[u8]) -> Result<KeySignature, KeyError> {
        // The module call blocks (on a network HSM, for a round trip). On the multi-thread
        // runtime, block in place: the worker hands its other tasks to a sibling, which
        // costs less than moving each signature to a blocking thread and back.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let sig = if multi_thread {
            tokio::task::block_in_place(|| self.token.sign(message))?
        } else {
            let token = self.token.clone();
            let message = message.to_vec();
            tokio::task::spawn_blocking(move || token.sign(&message))
                .await
                .map_err(|e| KeyError::Unavailable(format!("PKCS#11 signing task: {e}")))??
        };
        Ok(KeySignature {
            sig,
            identity: self.identity.clone(),
            rfc3161_timestamp: None,
        })
    }
}

/// Generates a key pair on the token labelled `token` (P-256 or Ed25519), with `label` as
/// `CKA_LABEL` and `id` as `CKA_ID`: the private key sensitive and not extractable. For
/// tests and benchmarks on SoftHSM; production keys are made with the HSM vendor's tools.
pub fn create_token_key(
    module: &Path,
    token: &str,
    pin: &str,
    algorithm: KeyAlgorithm,
    label: &str,
    id: &[u8],
) -> Result<(), KeyError> {
    let failed = |what: &str, e: CkError| KeyError::Unavailable(format!("{what}: {e}"));
    let ctx = context(module)?;
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| failed("listing slots", e))?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == token))
        .ok_or_else(|| KeyError::Unavailable(format!("no token labelled {token:?}")))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| failed("opening a session", e))?;
    session
        .login(UserType::User, Some(&AuthPin::from(pin.to_string())))
        .map_err(|e| failed("logging in", e))?;
    let (kind, mechanism, params) = match algorithm {
        KeyAlgorithm::EcdsaP256Sha256 => (
            KeyType::EC,
            Mechanism::EccKeyPairGen,
            P256_EC_PARAMS.to_vec(),
        ),
        KeyAlgorithm::Ed25519 => (
            KeyType::EC_EDWARDS,
            Mechanism::EccEdwardsKeyPairGen,
            ED25519_EC_PARAMS_OID.to_vec(),
        ),
    };
    let common = |class: ObjectClass| {
        vec![
            Attribute::Class(class),
            Attribute::KeyType(kind),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]
    };
    let mut public = common(ObjectClass::PUBLIC_KEY);
    public.extend([Attribute::Verify(true), Attribute::EcParams(params)]);
    let mut private = common(ObjectClass::PRIVATE_KEY);
    private.extend([
        Attribute::Sign(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ]);
    session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(|e| failed(&format!("{mechanism:?}"), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ecdsa_signatures_become_minimal_der() {
        // high bit set on r: a 0x00 pad; leading zeros on s: stripped
        let mut raw = vec![0x80; 32];
        raw.extend(std::iter::repeat_n(0u8, 31));
        raw.push(0x05);
        let der = ecdsa_raw_to_der(&raw).unwrap();
        let mut expected = vec![0x30, 3 + 33 + 2, 0x02, 33, 0x00];
        expected.extend([0x80; 32]);
        expected.extend([0x02, 1, 0x05]);
        assert_eq!(der, expected);
        // all-zero integers are one 0x00 byte
        assert_eq!(
            ecdsa_raw_to_der(&[0u8; 64]).unwrap(),
            [0x30, 6, 2, 1, 0, 2, 1, 0]
        );
        assert!(ecdsa_raw_to_der(&[1u8; 63]).is_none());
        assert!(ecdsa_raw_to_der(&[]).is_none());
    }

    #[test]
    fn der_from_raw_verifies_like_ring_der() {
        use ring::rand::SystemRandom;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let fixed =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap();
        let public =
            PublicKey::from_raw(KeyAlgorithm::EcdsaP256Sha256, fixed.public_key().as_ref())
                .unwrap();
        for i in 0..64u8 {
            let msg = [i; 17];
            let raw = fixed.sign(&rng, &msg).unwrap();
            let der = ecdsa_raw_to_der(raw.as_ref()).unwrap();
            assert!(public.verify(&msg, &der), "round {i}");
        }
    }

    #[test]
    fn ec_points_are_unwrapped_from_their_octet_string() {
        let mut point = vec![0x04; 65];
        point[1] = 9;
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&point);
        assert_eq!(
            raw_point(KeyAlgorithm::EcdsaP256Sha256, &wrapped),
            Some(&point[..])
        );
        assert_eq!(
            raw_point(KeyAlgorithm::EcdsaP256Sha256, &point),
            Some(&point[..])
        );
        let mut ed = vec![0x04, 32];
        ed.extend([7u8; 32]);
        assert_eq!(raw_point(KeyAlgorithm::Ed25519, &ed), Some(&[7u8; 32][..]));
        assert_eq!(raw_point(KeyAlgorithm::Ed25519, &wrapped), None);
        let mut long = vec![0x04, 0x81, 65];
        long.extend(&point);
        assert_eq!(
            raw_point(KeyAlgorithm::EcdsaP256Sha256, &long),
            Some(&point[..])
        );
    }

    #[test]
    fn token_loss_is_retryable_and_bad_data_is_not() {
        use cryptoki::context::Function;
        for rv in [
            RvError::PinIncorrect,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::DeviceError,
            RvError::DeviceRemoved,
            RvError::UserNotLoggedIn,
            RvError::ObjectHandleInvalid,
            RvError::KeyHandleInvalid,
        ] {
            assert!(matches!(
                classify("x", CkError::Pkcs11(rv, Function::Sign)),
                KeyError::Unavailable(_)
            ));
        }
        let KeyError::Unavailable(text) = classify(
            "CKM_ECDSA",
            CkError::Pkcs11(RvError::SessionHandleInvalid, Function::SignInit),
        ) else {
            unreachable!()
        };
        assert!(
            text.starts_with("CKM_ECDSA: ") && text.ends_with(" (CKR_SESSION_HANDLE_INVALID)"),
            "{text}"
        );
        assert_eq!(
            ckr_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        for rv in [
            RvError::MechanismInvalid,
            RvError::DataLenRange,
            RvError::KeyTypeInconsistent,
        ] {
            assert!(matches!(
                classify("x", CkError::Pkcs11(rv, Function::Sign)),
                KeyError::Rejected(_)
            ));
        }
    }
}
