//! cosign's password-encrypted private keys, so that a key pair made by
//! `cosign generate-key-pair` (or `cosign import-key-pair`) can sign here.
//!
//! The format (cosign `pkg/cosign/keys.go`, which uses go-securesystemslib's `encrypted`
//! package): a PEM block labelled `ENCRYPTED SIGSTORE PRIVATE KEY` (older cosign:
//! `ENCRYPTED COSIGN PRIVATE KEY`) whose body is the JSON
//! `{"kdf":{"name":"scrypt","params":{"N":..,"r":..,"p":..},"salt":"<b64>"},
//!   "cipher":{"name":"nacl/secretbox","nonce":"<b64>"},"ciphertext":"<b64>"}`.
//! The secretbox key is scrypt(password, salt, N, r, p) with 32 bytes of output; the
//! plaintext is the private key as PKCS#8 DER (Go's `x509.MarshalPKCS8PrivateKey`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use crypto_secretbox::aead::{Aead as _, KeyInit as _};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::material::{KeyFormatError, KeyMaterial};

/// The PEM label cosign writes today.
pub const SIGSTORE_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// The PEM label older cosign releases wrote (still read by cosign).
pub const COSIGN_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";

/// The most memory scrypt may take for one key (128 * N * r bytes). cosign's own
/// parameters (N = 32768, r = 8) take 32 MiB; the bound keeps a crafted file from making
/// the command allocate gigabytes.
const MAX_SCRYPT_MEMORY: u64 = 256 * 1024 * 1024;
/// Bound on scrypt's parallelism factor (cosign uses 1).
const MAX_SCRYPT_P: u32 = 16;

/// Why a cosign key could not be decrypted.
#[derive(Debug, thiserror::Error)]
pub enum CosignKeyError {
    #[error("not PEM: {0}")]
    Pem(#[from] pem::PemError),
    #[error("PEM label {0:?} is not a cosign key ({SIGSTORE_LABEL} or {COSIGN_LABEL} expected)")]
    Label(String),
    #[error("the cosign key's JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the cosign key's {0} is not base64")]
    Base64(&'static str),
    #[error("unsupported {what} {name:?} (cosign keys use scrypt and nacl/secretbox)")]
    Unsupported { what: &'static str, name: String },
    #[error(
        "scrypt parameters N={n} r={r} p={p} refused (N a power of two, 128*N*r at most 256 MiB, p at most {MAX_SCRYPT_P})"
    )]
    Params { n: u64, r: u32, p: u32 },
    #[error("the nonce is {0} bytes; nacl/secretbox takes 24")]
    Nonce(usize),
    #[error("wrong password for the cosign key (or the file is damaged)")]
    WrongPassword,
    #[error("the decrypted private key: {0}")]
    Key(#[from] KeyFormatError),
}

#[derive(Deserialize)]
struct Sealed {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

/// Whether `text` is a cosign encrypted key (by its first PEM label).
pub fn is_cosign_key(text: &str) -> bool {
    pem::parse(text).is_ok_and(|b| b.tag() == SIGSTORE_LABEL || b.tag() == COSIGN_LABEL)
}

/// Decrypts a cosign key with `password` and reads the private key inside it.
pub fn decrypt(text: &str, password: &[u8]) -> Result<KeyMaterial, CosignKeyError> {
    let block = pem::parse(text)?;
    if block.tag() != SIGSTORE_LABEL && block.tag() != COSIGN_LABEL {
        return Err(CosignKeyError::Label(block.tag().to_string()));
    }
    let sealed: Sealed = serde_json::from_slice(block.contents())?;
    let der = open(&sealed, password)?;
    Ok(KeyMaterial::from_pkcs8_der(&der)?)
}

fn b64(field: &'static str, value: &str) -> Result<Vec<u8>, CosignKeyError> {
    STANDARD
        .decode(value)
        .map_err(|_| CosignKeyError::Base64(field))
}

/// scrypt, then secretbox: the plaintext (PKCS#8 DER), wiped when dropped.
fn open(sealed: &Sealed, password: &[u8]) -> Result<Zeroizing<Vec<u8>>, CosignKeyError> {
    if sealed.kdf.name != "scrypt" {
        return Err(CosignKeyError::Unsupported {
            what: "key derivation",
            name: sealed.kdf.name.clone(),
        });
    }
    if sealed.cipher.name != "nacl/secretbox" {
        return Err(CosignKeyError::Unsupported {
            what: "cipher",
            name: sealed.cipher.name.clone(),
        });
    }
    let params = scrypt_params(&sealed.kdf.params)?;
    let salt = b64("salt", &sealed.kdf.salt)?;
    let nonce = b64("nonce", &sealed.cipher.nonce)?;
    let ciphertext = b64("ciphertext", &sealed.ciphertext)?;
    if nonce.len() != 24 {
        return Err(CosignKeyError::Nonce(nonce.len()));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    let ScryptParams { n, r, p } = sealed.kdf.params;
    scrypt::scrypt(password, &salt, &params, key.as_mut()).map_err(|_| CosignKeyError::Params {
        n,
        r,
        p,
    })?;
    let cipher = crypto_secretbox::XSalsa20Poly1305::new(key.as_ref().into());
    cipher
        .decrypt(nonce.as_slice().into(), ciphertext.as_slice())
        .map(Zeroizing::new)
        .map_err(|_| CosignKeyError::WrongPassword)
}

/// The scrypt parameters of the file, if they are within bounds.
fn scrypt_params(p: &ScryptParams) -> Result<scrypt::Params, CosignKeyError> {
    let refused = || CosignKeyError::Params {
        n: p.n,
        r: p.r,
        p: p.p,
    };
    if p.n < 2 || !p.n.is_power_of_two() || p.r == 0 || p.p == 0 || p.p > MAX_SCRYPT_P {
        return Err(refused());
    }
    let memory = 128u64
        .checked_mul(p.n)
        .and_then(|m| m.checked_mul(u64::from(p.r)))
        .ok_or_else(refused)?;
    if memory > MAX_SCRYPT_MEMORY {
        return Err(refused());
    }
    let log_n = u8::try_from(p.n.trailing_zeros()).map_err(|_| refused())?;
    scrypt::Params::new(log_n, p.r, p.p, 32).map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seals `der` the way cosign does (for this module's own error paths; the test that
    /// counts, against an independent implementation, is in tests/keys_interop.rs).
    fn seal(der: &[u8], password: &[u8], label: &str, n: u64) -> String {
        let salt = [7u8; 32];
        let nonce = [9u8; 24];
        let params = scrypt::Params::new(n.trailing_zeros() as u8, 8, 1, 32).unwrap();
        let mut key = [0u8; 32];
        scrypt::scrypt(password, &salt, &params, &mut key).unwrap();
        let ct = crypto_secretbox::XSalsa20Poly1305::new((&key).into())
            .encrypt((&nonce).into(), der)
            .unwrap();
        let json = serde_json::json!({
            "kdf": {"name": "scrypt", "params": {"N": n, "r": 8, "p": 1}, "salt": STANDARD.encode(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": STANDARD.encode(nonce)},
            "ciphertext": STANDARD.encode(ct),
        });
        pem::encode(&pem::Pem::new(label, serde_json::to_vec(&json).unwrap()))
    }

    #[test]
    fn decrypts_with_the_password_and_refuses_a_wrong_one() {
        let k = KeyMaterial::generate(signer_actors::keys::KeyAlgorithm::EcdsaP256Sha256).unwrap();
        for label in [SIGSTORE_LABEL, COSIGN_LABEL] {
            let text = seal(&k.to_pkcs8_v1_der(), b"hunter2", label, 1024);
            assert!(is_cosign_key(&text));
            let back = decrypt(&text, b"hunter2").unwrap();
            assert_eq!(back.public_raw(), k.public_raw());
            assert!(matches!(
                decrypt(&text, b"hunter3"),
                Err(CosignKeyError::WrongPassword)
            ));
        }
    }

    #[test]
    fn refuses_other_formats_and_costly_parameters() {
        let k = KeyMaterial::generate(signer_actors::keys::KeyAlgorithm::Ed25519).unwrap();
        let plain = k.to_pkcs8_v1_pem();
        assert!(!is_cosign_key(&plain));
        assert!(matches!(
            decrypt(&plain, b""),
            Err(CosignKeyError::Label(_))
        ));
        let text = seal(&k.to_pkcs8_v1_der(), b"", SIGSTORE_LABEL, 1024);
        let block = pem::parse(&text).unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(block.contents()).unwrap();
        for (n, r, p) in [
            (1u64 << 30, 8u32, 1u32),
            (1000, 8, 1),
            (1024, 8, 1000),
            (1024, 0, 1),
        ] {
            json["kdf"]["params"] = serde_json::json!({"N": n, "r": r, "p": p});
            let bad = pem::encode(&pem::Pem::new(
                SIGSTORE_LABEL,
                serde_json::to_vec(&json).unwrap(),
            ));
            assert!(
                matches!(decrypt(&bad, b""), Err(CosignKeyError::Params { .. })),
                "N={n} r={r} p={p}"
            );
        }
        json["kdf"]["params"] = serde_json::json!({"N": 1024, "r": 8, "p": 1});
        json["cipher"]["name"] = "aes-gcm".into();
        let bad = pem::encode(&pem::Pem::new(
            SIGSTORE_LABEL,
            serde_json::to_vec(&json).unwrap(),
        ));
        assert!(matches!(
            decrypt(&bad, b""),
            Err(CosignKeyError::Unsupported { .. })
        ));
    }
}
