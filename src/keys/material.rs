//! Private key material as other tools write it, and as we write it for other tools.
//!
//! We read what users already have: PKCS#8 `PRIVATE KEY` v1 (RFC 5208 / RFC 8410, what
//! OpenSSL, Go, Python `cryptography` and cosign write) and v2 (RFC 5958, public key attached,
//! what ring writes), and SEC1 `EC PRIVATE KEY` (RFC 5915, what `openssl ecparam -genkey`
//! writes). We write one form only, PKCS#8 v1, because it is the one every reader accepts:
//! OpenSSL 3.0 and `cryptography` refuse ring's v2 Ed25519 documents.
//!
//! The parsing is ours (with the RustCrypto `pkcs8`/`sec1` decoders) rather than ring's,
//! because ring reads only the two forms it writes. ring still builds the key pair and checks
//! that the public key a file carries is the one its private key makes.

use p256::elliptic_curve::sec1::ToSec1Point as _;
use pkcs8::der::Decode as _;
use pkcs8::der::asn1::{ObjectIdentifier, OctetStringRef};
use signer_actors::keys::KeyAlgorithm;
use zeroize::Zeroizing;

/// id-ecPublicKey (RFC 5480): the PKCS#8 algorithm of an EC key; its parameter is the curve.
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// prime256v1 / secp256r1 (RFC 5480), the only curve we sign with.
const PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// id-Ed25519 (RFC 8410).
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// PKCS#8 v1 Ed25519 up to the seed (RFC 8410 section 7 and its example in section 10.3):
/// SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// PKCS#8 v1 P-256 up to the scalar: SEQUENCE { INTEGER 0, SEQUENCE { id-ecPublicKey,
/// prime256v1 }, OCTET STRING { ECPrivateKey { INTEGER 1, OCTET STRING (32) ...
/// This is the layout ring and OpenSSL write, so every reader in this code base (ring) and
/// outside it (OpenSSL, Go, `cryptography`) accepts it.
const P256_PKCS8_V1_PREFIX: [u8; 36] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20,
];
/// ... then `[1] { BIT STRING (0 unused bits) { uncompressed point (65) } } } }`.
const P256_PKCS8_V1_PUBLIC_PREFIX: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];

/// Why a private key document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFormatError {
    #[error("not PEM: {0}")]
    Pem(#[from] pem::PemError),
    #[error("no PEM block (-----BEGIN ...) found")]
    NoPem,
    #[error("a cosign key ({0}); import it first: stella-signer keys import --cosign FILE")]
    Cosign(String),
    #[error("an encrypted PKCS#8 key; decrypt it first (openssl pkey -in KEY -out PLAIN)")]
    Encrypted,
    #[error(
        "PEM label {0:?} is not a private key this signer reads (PRIVATE KEY or EC PRIVATE KEY)"
    )]
    Label(String),
    #[error("malformed {format}: {source}")]
    Der {
        format: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("unsupported key algorithm {0} (ECDSA P-256 or Ed25519 expected)")]
    Algorithm(String),
    #[error("unsupported elliptic curve {0} (P-256 expected)")]
    Curve(String),
    #[error("invalid key: {0}")]
    Invalid(&'static str),
}

/// A DER decoding error (der, spki and pkcs8 each have their own type) of a `format`.
fn der_error<E: std::error::Error + Send + Sync + 'static>(
    format: &'static str,
) -> impl FnOnce(E) -> KeyFormatError {
    move |e| KeyFormatError::Der {
        format,
        source: Box::new(e),
    }
}

/// The secret and public halves of a signing key, as read from a file.
///
/// The secret halves are wiped from memory when dropped.
pub enum KeyMaterial {
    /// ECDSA P-256: the 32-byte scalar and the uncompressed public point (65 bytes).
    EcdsaP256 {
        scalar: Zeroizing<[u8; 32]>,
        public: [u8; 65],
    },
    /// Ed25519: the 32-byte seed (RFC 8032's private key) and the 32-byte public key.
    Ed25519 {
        seed: Zeroizing<[u8; 32]>,
        public: [u8; 32],
    },
}

impl std::fmt::Debug for KeyMaterial {
    /// Never prints the secret half.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl KeyMaterial {
    /// Reads the first private key of a PEM text: `PRIVATE KEY` (PKCS#8) or `EC PRIVATE KEY`
    /// (SEC1). Other blocks before it are skipped, such as the `EC PARAMETERS` block that
    /// `openssl ecparam -genkey` writes without `-noout`; with no key at all, the error names
    /// the labels that were there.
    pub fn from_pem(text: &str) -> Result<Self, KeyFormatError> {
        let blocks = pem::parse_many(text)?;
        if blocks.is_empty() {
            return Err(KeyFormatError::NoPem);
        }
        let mut labels = Vec::new();
        for block in &blocks {
            match block.tag() {
                "PRIVATE KEY" => return Self::from_pkcs8_der(block.contents()),
                "EC PRIVATE KEY" => return Self::from_sec1_der(block.contents()),
                "ENCRYPTED SIGSTORE PRIVATE KEY" | "ENCRYPTED COSIGN PRIVATE KEY" => {
                    return Err(KeyFormatError::Cosign(block.tag().to_string()));
                }
                "ENCRYPTED PRIVATE KEY" => return Err(KeyFormatError::Encrypted),
                other => labels.push(other.to_string()),
            }
        }
        Err(KeyFormatError::Label(labels.join(", ")))
    }

    /// Reads PKCS#8 DER, v1 or v2, ECDSA P-256 or Ed25519.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyFormatError> {
        let info = pkcs8::PrivateKeyInfoRef::try_from(der).map_err(der_error("PKCS#8"))?;
        let oid = info.algorithm.oid;
        if oid == ID_EC_PUBLIC_KEY {
            let curve = info
                .algorithm
                .parameters_oid()
                .map_err(der_error("PKCS#8 EC parameters"))?;
            check_curve(curve)?;
            ec_from_sec1(info.private_key.as_bytes(), Some(curve))
        } else if oid == ID_ED25519 {
            // CurvePrivateKey ::= OCTET STRING, inside the PrivateKey OCTET STRING (RFC 8410)
            let inner = <&OctetStringRef>::from_der(info.private_key.as_bytes())
                .map_err(der_error("Ed25519 private key"))?;
            let seed: [u8; 32] = inner
                .as_bytes()
                .try_into()
                .map_err(|_| KeyFormatError::Invalid("an Ed25519 seed is 32 bytes"))?;
            let public = match &info.public_key {
                None => None,
                Some(bits) => Some(
                    bits.as_bytes()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or(KeyFormatError::Invalid("an Ed25519 public key is 32 bytes"))?,
                ),
            };
            Self::ed25519(Zeroizing::new(seed), public)
        } else {
            Err(KeyFormatError::Algorithm(oid.to_string()))
        }
    }

    /// Reads SEC1 `ECPrivateKey` DER (RFC 5915). The curve must be named and be P-256.
    pub fn from_sec1_der(der: &[u8]) -> Result<Self, KeyFormatError> {
        ec_from_sec1(der, None)
    }

    /// An Ed25519 key from its seed; `public`, when the file carried one, must match it.
    fn ed25519(
        seed: Zeroizing<[u8; 32]>,
        public: Option<[u8; 32]>,
    ) -> Result<Self, KeyFormatError> {
        use ring::signature::KeyPair as _;
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .map_err(|_| KeyFormatError::Invalid("Ed25519 seed rejected"))?;
        let derived: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| KeyFormatError::Invalid("Ed25519 public key length"))?;
        if public.is_some_and(|p| p != derived) {
            return Err(KeyFormatError::Invalid(
                "the Ed25519 public key in the file is not the private key's",
            ));
        }
        Ok(Self::Ed25519 {
            seed,
            public: derived,
        })
    }

    /// A fresh key from the system's random generator.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyFormatError> {
        use ring::rand::SecureRandom as _;
        let rng = ring::rand::SystemRandom::new();
        match algorithm {
            KeyAlgorithm::Ed25519 => {
                let mut seed = Zeroizing::new([0u8; 32]);
                rng.fill(seed.as_mut())
                    .map_err(|_| KeyFormatError::Invalid("no randomness"))?;
                Self::ed25519(seed, None)
            }
            KeyAlgorithm::EcdsaP256Sha256 => {
                let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    &rng,
                )
                .map_err(|_| KeyFormatError::Invalid("no randomness"))?;
                Self::from_pkcs8_der(pkcs8.as_ref())
            }
        }
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            KeyMaterial::EcdsaP256 { .. } => KeyAlgorithm::EcdsaP256Sha256,
            KeyMaterial::Ed25519 { .. } => KeyAlgorithm::Ed25519,
        }
    }

    /// The raw public key (uncompressed point for P-256, 32 bytes for Ed25519).
    pub fn public_raw(&self) -> &[u8] {
        match self {
            KeyMaterial::EcdsaP256 { public, .. } => public,
            KeyMaterial::Ed25519 { public, .. } => public,
        }
    }

    /// The key as PKCS#8 v1 DER, the form every reader accepts (see the module doc).
    pub fn to_pkcs8_v1_der(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(138));
        match self {
            KeyMaterial::EcdsaP256 { scalar, public } => {
                out.extend_from_slice(&P256_PKCS8_V1_PREFIX);
                out.extend_from_slice(scalar.as_ref());
                out.extend_from_slice(&P256_PKCS8_V1_PUBLIC_PREFIX);
                out.extend_from_slice(public);
            }
            KeyMaterial::Ed25519 { seed, .. } => {
                out.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
                out.extend_from_slice(seed.as_ref());
            }
        }
        out
    }

    /// The key as a PEM `PRIVATE KEY` (PKCS#8 v1), LF line endings, 64 columns. Built by
    /// hand into buffers sized up front, so no copy of the secret is left behind unwiped.
    pub fn to_pkcs8_v1_pem(&self) -> Zeroizing<String> {
        use base64::Engine as _;
        const BEGIN: &str = "-----BEGIN PRIVATE KEY-----\n";
        const END: &str = "-----END PRIVATE KEY-----\n";
        let der = self.to_pkcs8_v1_der();
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der.as_slice()));
        let lines = b64.len().div_ceil(64);
        let mut out = Zeroizing::new(String::with_capacity(
            BEGIN.len() + b64.len() + lines + END.len(),
        ));
        out.push_str(BEGIN);
        for line in b64.as_bytes().chunks(64) {
            out.extend(line.iter().map(|&b| char::from(b)));
            out.push('\n');
        }
        out.push_str(END);
        out
    }
}

fn check_curve(curve: ObjectIdentifier) -> Result<(), KeyFormatError> {
    if curve == PRIME256V1 {
        Ok(())
    } else {
        Err(KeyFormatError::Curve(curve.to_string()))
    }
}

/// An EC key from SEC1 `ECPrivateKey` DER. `outer_curve` is the curve PKCS#8's algorithm
/// named (SEC1 inside PKCS#8 may leave its own out); a bare SEC1 key must name it itself.
fn ec_from_sec1(
    der: &[u8],
    outer_curve: Option<ObjectIdentifier>,
) -> Result<KeyMaterial, KeyFormatError> {
    let key = sec1::EcPrivateKey::from_der(der).map_err(der_error("SEC1 EC private key"))?;
    match (key.parameters.as_ref(), outer_curve) {
        (Some(sec1::EcParameters::NamedCurve(inner)), outer) => {
            check_curve(*inner)?;
            if outer.is_some_and(|o| o != *inner) {
                return Err(KeyFormatError::Invalid(
                    "the curve of the EC key differs from its PKCS#8 algorithm's",
                ));
            }
        }
        (None, Some(_)) => {}
        (None, None) => {
            return Err(KeyFormatError::Invalid(
                "the SEC1 key does not name its curve",
            ));
        }
    }
    // RFC 5915: the scalar is ceiling(log2(n)/8) = 32 octets; tolerate writers that drop
    // leading zeros.
    let raw = key.private_key;
    if raw.is_empty() || raw.len() > 32 {
        return Err(KeyFormatError::Invalid("a P-256 private key is 32 bytes"));
    }
    let mut scalar = Zeroizing::new([0u8; 32]);
    scalar[32 - raw.len()..].copy_from_slice(raw);
    let secret = p256::SecretKey::from_slice(scalar.as_ref())
        .map_err(|_| KeyFormatError::Invalid("the P-256 private key is out of range"))?;
    let point = secret.public_key().to_sec1_point(false);
    let public: [u8; 65] = point
        .as_bytes()
        .try_into()
        .map_err(|_| KeyFormatError::Invalid("P-256 public point length"))?;
    if let Some(given) = key.public_key {
        // The file may carry the point compressed: compare points, not encodings.
        let given = p256::PublicKey::from_sec1_bytes(given)
            .map_err(|_| KeyFormatError::Invalid("the EC public key in the file is malformed"))?;
        if given != secret.public_key() {
            return Err(KeyFormatError::Invalid(
                "the EC public key in the file is not the private key's",
            ));
        }
    }
    Ok(KeyMaterial::EcdsaP256 { scalar, public })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8410 section 10.3: the example Ed25519 private key (v1) and its public key.
    const RFC8410_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC
-----END PRIVATE KEY-----
";

    #[test]
    fn reads_the_rfc8410_example_and_writes_it_back_byte_for_byte() {
        let k = KeyMaterial::from_pem(RFC8410_PRIVATE).unwrap();
        assert_eq!(k.algorithm(), KeyAlgorithm::Ed25519);
        // public key of the RFC's example (section 10.1)
        assert_eq!(
            hex::encode(k.public_raw()),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
        assert_eq!(k.to_pkcs8_v1_pem().as_str(), RFC8410_PRIVATE);
    }

    #[test]
    fn ring_v2_documents_read_and_become_v1() {
        let rng = ring::rand::SystemRandom::new();
        let v2 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let k = KeyMaterial::from_pkcs8_der(v2.as_ref()).unwrap();
        let v1 = k.to_pkcs8_v1_der();
        assert_eq!(v1.len(), 48);
        assert_eq!(v1[4], 0, "version v1");
        let again = KeyMaterial::from_pkcs8_der(&v1).unwrap();
        assert_eq!(again.public_raw(), k.public_raw());
        // what ring itself reads (the codebase's other readers use ring)
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&v1).unwrap();
    }

    #[test]
    fn p256_pkcs8_and_sec1_read_and_our_form_is_what_ring_reads() {
        let k = KeyMaterial::generate(KeyAlgorithm::EcdsaP256Sha256).unwrap();
        let der = k.to_pkcs8_v1_der();
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &der,
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair as _;
        assert_eq!(pair.public_key().as_ref(), k.public_raw());
        let KeyMaterial::EcdsaP256 { scalar, .. } = &k else {
            panic!()
        };
        // the same key as SEC1, as p256 writes it (curve named, public key included)
        let sec1 = p256::SecretKey::from_slice(scalar.as_ref())
            .unwrap()
            .to_sec1_der()
            .unwrap();
        let back = KeyMaterial::from_sec1_der(&sec1).unwrap();
        assert_eq!(back.public_raw(), k.public_raw());
    }

    #[test]
    fn mismatched_public_keys_and_other_curves_are_refused() {
        let a = KeyMaterial::generate(KeyAlgorithm::EcdsaP256Sha256).unwrap();
        let b = KeyMaterial::generate(KeyAlgorithm::EcdsaP256Sha256).unwrap();
        let mut der = a.to_pkcs8_v1_der().to_vec();
        let n = der.len();
        der[n - 65..].copy_from_slice(b.public_raw());
        assert!(matches!(
            KeyMaterial::from_pkcs8_der(&der),
            Err(KeyFormatError::Invalid(_))
        ));
        // the same document naming another curve (1.2.840.10045.3.1.8)
        let mut der = a.to_pkcs8_v1_der().to_vec();
        let p256 = pkcs8::der::Encode::to_der(&PRIME256V1).unwrap();
        let at = der.windows(p256.len()).position(|w| w == p256).unwrap();
        der[at + p256.len() - 1] = 0x08;
        assert!(matches!(
            KeyMaterial::from_pkcs8_der(&der),
            Err(KeyFormatError::Curve(_))
        ));
    }

    #[test]
    fn other_pem_labels_say_what_to_do() {
        let cosign = "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\neyJ9\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n";
        assert!(matches!(
            KeyMaterial::from_pem(cosign),
            Err(KeyFormatError::Cosign(_))
        ));
        let public = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        assert!(matches!(
            KeyMaterial::from_pem(public),
            Err(KeyFormatError::Label(l)) if l == "PUBLIC KEY"
        ));
    }
}
