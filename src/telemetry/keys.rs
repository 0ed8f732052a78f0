//! What the key gauges are made of: every key a replica has loaded, its keyid, and when the
//! first certificate of its chain expires. Filled where keys load (`keys::factory`, and
//! `keys::keyless` for each new certificate); read by the poller (`telemetry::poller`),
//! which turns it into `signer_key_revoked{key}` and
//! `signer_key_certificate_expiry_seconds{key,mode}`.
//!
//! Labels are configured key names: a bounded set, unlike keyids of keyless keys, which
//! change with every certificate.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use der::Decode as _;
use signer_actors::keys::{KeyMode, SignerIdentity};

/// Where a certificate of a key comes from, the `mode` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateSource {
    /// `certificate_chain` of a keyful key (or a YubiKey's attestation): renewed by people.
    Chain,
    /// The current Fulcio certificate of a keyless key: renewed by the signer on its next
    /// signature once within `renew_before` of expiry, so it may run out while no job comes.
    Keyless,
}

impl CertificateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateSource::Chain => "chain",
            CertificateSource::Keyless => "keyless",
        }
    }
}

/// One loaded key, as the gauges see it.
#[derive(Debug, Clone)]
pub struct LoadedKey {
    /// The keyid a revocation names; `None` for keyless keys (they replace a revoked
    /// certificate themselves instead of refusing).
    pub keyful_keyid: Option<String>,
    /// The earliest `notAfter` of the key's certificates, with where they come from.
    pub expires: Option<(SystemTime, CertificateSource)>,
}

fn registry() -> &'static Mutex<BTreeMap<String, LoadedKey>> {
    static KEYS: OnceLock<Mutex<BTreeMap<String, LoadedKey>>> = OnceLock::new();
    KEYS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Records that key `name` is loaded with `identity` (called at every load: a reloaded key
/// replaces its entry).
pub fn loaded(name: &str, identity: &SignerIdentity) {
    let source = match identity.mode {
        KeyMode::Keyful => CertificateSource::Chain,
        KeyMode::Keyless => CertificateSource::Keyless,
    };
    let entry = LoadedKey {
        keyful_keyid: (identity.mode == KeyMode::Keyful).then(|| identity.keyid.clone()),
        expires: earliest_expiry(&identity.certificate_chain).map(|t| (t, source)),
    };
    if let Ok(mut keys) = registry().lock() {
        keys.insert(name.to_string(), entry);
    }
}

/// Every loaded key, by configured name.
pub fn snapshot() -> BTreeMap<String, LoadedKey> {
    registry().lock().map(|k| k.clone()).unwrap_or_default()
}

/// The earliest `notAfter` of the PEM certificates in `chain`: a chain is only as valid as
/// its shortest-lived member. Certificates that do not parse are skipped (the key's loader
/// has already judged them).
pub fn earliest_expiry(chain: &[String]) -> Option<SystemTime> {
    chain
        .iter()
        .filter_map(|c| pem::parse(c).ok())
        .filter_map(|p| x509_cert::Certificate::from_der(p.contents()).ok())
        .map(|c| c.tbs_certificate.validity.not_after.to_system_time())
        .min()
}

/// Seconds from `now` to `at`, negative once `at` has passed.
pub fn seconds_left(at: SystemTime, now: SystemTime) -> f64 {
    match at.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seconds_left_is_negative_after_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(seconds_left(now + Duration::from_secs(30), now), 30.0);
        assert_eq!(seconds_left(now - Duration::from_secs(5), now), -5.0);
    }

    /// A PEM certificate for `name` valid until `not_after` (unsigned: only its dates are
    /// read here, and the key's loader judges signatures).
    fn certificate(name: &str, not_after: SystemTime) -> String {
        use std::str::FromStr as _;

        use der::Encode as _;
        use der::asn1::{BitString, ObjectIdentifier};
        use x509_cert::certificate::{TbsCertificate, Version};
        use x509_cert::name::Name;
        use x509_cert::serial_number::SerialNumber;
        use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
        use x509_cert::time::{Time, Validity};

        let ecdsa_sha256 = AlgorithmIdentifierOwned {
            oid: ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
            parameters: None,
        };
        let name = Name::from_str(&format!("CN={name}")).unwrap();
        let tbs = TbsCertificate {
            version: Version::V3,
            serial_number: SerialNumber::new(&[1]).unwrap(),
            signature: ecdsa_sha256.clone(),
            issuer: name.clone(),
            validity: Validity {
                not_before: Time::try_from(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
                    .unwrap(),
                not_after: Time::try_from(not_after).unwrap(),
            },
            subject: name,
            subject_public_key_info: SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: ObjectIdentifier::new_unwrap("1.2.840.10045.2.1"),
                    parameters: None,
                },
                subject_public_key: BitString::from_bytes(&[4; 65]).unwrap(),
            },
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: None,
        };
        let der = x509_cert::Certificate {
            tbs_certificate: tbs,
            signature_algorithm: ecdsa_sha256,
            signature: BitString::from_bytes(&[0; 8]).unwrap(),
        }
        .to_der()
        .unwrap();
        pem::encode(&pem::Pem::new("CERTIFICATE", der))
    }

    #[test]
    fn the_earliest_not_after_of_a_chain_counts() {
        // Whole seconds: X.509 times have no fractions.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        let (leaf, ca) = (now + 30 * day, now + 3 * day);
        let chain = [certificate("leaf", leaf), certificate("ca", ca)];
        assert_eq!(earliest_expiry(&chain), Some(ca));
        assert_eq!(seconds_left(ca, now), 3.0 * 86_400.0);
        // Order does not matter, and an unreadable member is skipped.
        let chain = [
            certificate("ca", ca),
            "junk".into(),
            certificate("leaf", leaf),
        ];
        assert_eq!(earliest_expiry(&chain), Some(ca));
        assert_eq!(earliest_expiry(&chain[2..]), Some(leaf));
    }

    #[test]
    fn unparsable_chains_have_no_expiry() {
        assert_eq!(earliest_expiry(&[]), None);
        assert_eq!(earliest_expiry(&["not a pem".into()]), None);
    }
}
