//! Verifying envelopes and bundles against a loaded [`Kit`], offline.
//!
//! The time a signature was made decides whether a revoked key still counts, and only a
//! trusted time is used: an RFC 3161 timestamp that verifies against the kit's timestamp
//! authorities. An envelope, or a bundle without such a timestamp, has no trusted time:
//! a signature by a key revoked at any time is refused (the signer's clock, or the
//! bundle's claims, could be anyone's). A keyless bundle needs the trusted time as well:
//! its certificate lives minutes, and the chain is checked at that time.

use std::time::SystemTime;

use signer_actors::dsse::{Envelope, Signature};
use signer_actors::keys::PublicKey;
use sigstore_protobuf_specs::dev::sigstore::bundle::v1::{Bundle, bundle, verification_material};

use super::KitKey;
use super::load::Kit;
use super::timestamp;

/// What a verified document showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// One line per accepted signature.
    pub accepted: Vec<String>,
}

/// Why a document does not verify against the kit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The document is not an envelope or bundle this can check (nothing decided).
    #[error("{0}")]
    Unusable(String),
    /// Checked and refused.
    #[error("{0}")]
    Refused(String),
}

/// Optional identity constraints of a keyless bundle.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub san: Option<String>,
    pub issuer: Option<String>,
}

fn refused(m: impl Into<String>) -> Refusal {
    Refusal::Refused(m.into())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339(t).to_string()
}

/// Whether a signature by `key` made at `at` (`None`: no trusted time) is refused, and why.
pub fn revoked_at(key: &KitKey, at: Option<SystemTime>) -> Option<String> {
    let r = key.revocation.as_ref()?;
    let Ok(revoked) = humantime::parse_rfc3339_weak(r.revoked_at.trim_end_matches('Z')) else {
        return Some(format!(
            "key {} is revoked (unreadable time {:?}): {}",
            key.keyid, r.revoked_at, r.reason
        ));
    };
    match at {
        None => Some(format!(
            "key {} ({}) was revoked at {} ({}) and the signature has no trusted time",
            key.keyid, key.name, r.revoked_at, r.reason
        )),
        Some(at) if at >= revoked => Some(format!(
            "key {} ({}) was revoked at {} ({}), before the signature's time {}",
            key.keyid,
            key.name,
            r.revoked_at,
            r.reason,
            rfc3339(at)
        )),
        Some(_) => None,
    }
}

impl Kit {
    /// The keyful keys of the kit that may sign artefacts: not keyless certificates'
    /// ephemeral keys (their certificates are what is trusted), and not the kit key (the
    /// ledger lists it, as a key the signer loaded, but it vouches for kits only).
    fn keyful(&self) -> impl Iterator<Item = &(KitKey, PublicKey)> {
        self.keys
            .iter()
            .filter(|(k, _)| k.certificate.is_none() && k.keyid != self.kit_keyid)
    }

    /// The kit's record of `keyid`, if it has one.
    fn record(&self, keyid: &str) -> Option<&KitKey> {
        self.keys
            .iter()
            .map(|(k, _)| k)
            .find(|k| k.keyid == keyid || k.certificate.as_ref().is_some_and(|c| c.sha256 == keyid))
    }

    /// A DSSE envelope: at least `threshold` distinct kit keys (default 1) each verify a
    /// distinct signature, none of them revoked (an envelope has no trusted time).
    pub fn verify_envelope(
        &self,
        envelope: &Envelope,
        threshold: Option<usize>,
    ) -> Result<Verdict, Refusal> {
        let threshold = threshold.unwrap_or(1);
        let mut accepted = Vec::new();
        let mut refusals = Vec::new();
        let message = envelope.pae();
        let mut used = vec![false; envelope.signatures.len()];
        for (key, public) in self.keyful() {
            let Some(i) = (0..envelope.signatures.len())
                .find(|&i| !used[i] && public.verify(&message, &envelope.signatures[i].sig))
            else {
                continue;
            };
            used[i] = true;
            match revoked_at(key, None) {
                Some(why) => refusals.push(format!("signature {i}: {why}")),
                None => accepted.push(format!(
                    "signature {i}: key {} ({}, {})",
                    key.keyid, key.name, key.status
                )),
            }
        }
        if accepted.len() < threshold {
            let mut m = format!(
                "{} signature(s) by usable kit keys, threshold {threshold}",
                accepted.len()
            );
            for r in refusals {
                m.push_str("; ");
                m.push_str(&r);
            }
            return Err(refused(m));
        }
        Ok(Verdict { accepted })
    }

    /// A Sigstore bundle with a DSSE envelope: keyful (a kit key verifies it) or keyless (a
    /// certificate chaining to the kit's Fulcio roots at the TSA's time).
    pub fn verify_bundle(&self, json: &[u8], identity: &Identity) -> Result<Verdict, Refusal> {
        let bundle: Bundle = serde_json::from_slice(json)
            .map_err(|e| Refusal::Unusable(format!("not a Sigstore bundle: {e}")))?;
        let Some(bundle::Content::DsseEnvelope(dsse)) = &bundle.content else {
            return Err(Refusal::Unusable(
                "the bundle holds no DSSE envelope (message signatures are not checked)".into(),
            ));
        };
        let [sig] = dsse.signatures.as_slice() else {
            return Err(Refusal::Unusable(
                "a bundle's envelope must hold exactly one signature".into(),
            ));
        };
        let envelope = Envelope {
            payload: dsse.payload.clone(),
            payload_type: dsse.payload_type.clone(),
            signatures: vec![Signature {
                keyid: sig.keyid.clone(),
                sig: sig.sig.clone(),
            }],
        };
        let material = bundle
            .verification_material
            .as_ref()
            .ok_or_else(|| Refusal::Unusable("the bundle has no verificationMaterial".into()))?;
        let time = self.trusted_time(material, &sig.sig)?;
        match &material.content {
            Some(verification_material::Content::PublicKey(_)) => {
                self.verify_keyful(&envelope, time)
            }
            Some(verification_material::Content::Certificate(c)) => self.verify_keyless(
                &envelope,
                std::slice::from_ref(&c.raw_bytes),
                time,
                identity,
            ),
            Some(verification_material::Content::X509CertificateChain(chain)) => {
                let chain: Vec<Vec<u8>> = chain
                    .certificates
                    .iter()
                    .map(|c| c.raw_bytes.clone())
                    .collect();
                self.verify_keyless(&envelope, &chain, time, identity)
            }
            None => Err(Refusal::Unusable(
                "the bundle's verificationMaterial names no key or certificate".into(),
            )),
        }
    }

    /// The time the bundle's timestamps vouch for (the earliest that verifies), or `None`
    /// when it has none; a timestamp that does not verify refuses the bundle.
    fn trusted_time(
        &self,
        material: &sigstore_protobuf_specs::dev::sigstore::bundle::v1::VerificationMaterial,
        signature: &[u8],
    ) -> Result<Option<SystemTime>, Refusal> {
        let stamps = material
            .timestamp_verification_data
            .iter()
            .flat_map(|d| &d.rfc3161_timestamps);
        let roots: Vec<Vec<u8>> = self
            .trusted_root
            .timestamp_authorities
            .iter()
            .flat_map(|a| a.cert_chain.iter().flat_map(|c| &c.certificates))
            .map(|c| c.raw_bytes.clone())
            .collect();
        let mut earliest: Option<SystemTime> = None;
        for (i, t) in stamps.enumerate() {
            let at = timestamp::verify(&t.signed_timestamp, signature, &self.tsa, &roots)
                .map_err(|e| refused(format!("timestamp {i}: {e}")))?;
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
        Ok(earliest)
    }

    fn verify_keyful(
        &self,
        envelope: &Envelope,
        time: Option<SystemTime>,
    ) -> Result<Verdict, Refusal> {
        let message = envelope.pae();
        let (key, _) = self
            .keyful()
            .find(|(_, public)| public.verify(&message, &envelope.signatures[0].sig))
            .ok_or_else(|| refused("no key of the kit verifies the bundle's signature"))?;
        if let Some(why) = revoked_at(key, time) {
            return Err(refused(why));
        }
        Ok(Verdict {
            accepted: vec![format!(
                "bundle: key {} ({}, {}){}",
                key.keyid,
                key.name,
                key.status,
                time.map(|t| format!(", timestamped {}", rfc3339(t)))
                    .unwrap_or_default()
            )],
        })
    }

    fn verify_keyless(
        &self,
        envelope: &Envelope,
        chain: &[Vec<u8>],
        time: Option<SystemTime>,
        identity: &Identity,
    ) -> Result<Verdict, Refusal> {
        use der::{Decode as _, Encode as _};
        let time = time.ok_or_else(|| {
            refused(
                "keyless bundle without a trusted timestamp: its certificate's validity at signing cannot be checked offline",
            )
        })?;
        let leaf_der = chain
            .first()
            .ok_or_else(|| Refusal::Unusable("the bundle's certificate chain is empty".into()))?;
        let leaf = x509_cert::Certificate::from_der(leaf_der)
            .map_err(|e| Refusal::Unusable(format!("the bundle's certificate: {e}")))?;
        let spki = leaf
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| Refusal::Unusable(e.to_string()))?;
        let public = PublicKey::from_spki_der(&spki)
            .map_err(|e| Refusal::Unusable(format!("the certificate's key: {e}")))?;
        let facts = self
            .fulcio
            .verify(chain, &public, time)
            .map_err(|e| refused(format!("certificate at {}: {e}", rfc3339(time))))?;
        if !public.verify(&envelope.pae(), &envelope.signatures[0].sig) {
            return Err(refused(
                "the certificate's key does not verify the signature",
            ));
        }
        if let Some(san) = &identity.san
            && *san != facts.san
        {
            return Err(refused(format!(
                "the certificate is for {:?}, not {san:?}",
                facts.san
            )));
        }
        if let Some(issuer) = &identity.issuer
            && *issuer != facts.issuer
        {
            return Err(refused(format!(
                "the certificate's OIDC issuer is {:?}, not {issuer:?}",
                facts.issuer
            )));
        }
        let record = self
            .record(&public.keyid())
            .or_else(|| self.record(&facts.sha256));
        if let Some(why) = record.and_then(|k| revoked_at(k, Some(time))) {
            return Err(refused(why));
        }
        Ok(Verdict {
            accepted: vec![format!(
                "keyless bundle: certificate {} for {} (issuer {}), timestamped {}{}",
                facts.sha256,
                facts.san,
                facts.issuer,
                rfc3339(time),
                if record.is_some() {
                    ""
                } else {
                    "; the certificate is not in the kit's key list"
                }
            )],
        })
    }
}
