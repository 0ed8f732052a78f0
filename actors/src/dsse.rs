//! DSSE v1: pre-authentication encoding, envelopes and threshold verification.
//! <https://github.com/secure-systems-lab/dsse/blob/master/protocol.md>

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = pae_header(payload_type, payload.len());
    out.reserve_exact(payload.len());
    out.extend_from_slice(payload);
    out
}

/// The PAE up to the body: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP`. With the body
/// appended it is [`pae`]; kept apart so a large body can be copied once, into wherever the
/// PAE is needed.
pub fn pae_header(payload_type: &str, body_len: usize) -> Vec<u8> {
    let type_len = payload_type.len().to_string();
    let body_len = body_len.to_string();
    let mut out = Vec::with_capacity(10 + type_len.len() + payload_type.len() + body_len.len());
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(type_len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.as_bytes());
    out.push(b' ');
    out
}

/// A DSSE envelope. Bytes are standard base64 on output; either alphabet is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    #[serde(with = "crate::b64")]
    pub payload: Vec<u8>,
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope. `keyid` is an unauthenticated hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    #[serde(default)]
    pub keyid: String,
    #[serde(with = "crate::b64")]
    pub sig: Vec<u8>,
}

/// Which key verified which signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub key_index: usize,
    pub signature_index: usize,
    pub keyid: String,
}

/// Why an envelope did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("envelope has no signatures")]
    NoSignatures,
    #[error("threshold {threshold} must be between 1 and the number of keys ({keys})")]
    BadThreshold { threshold: usize, keys: usize },
    #[error("{verified} of {keys} key(s) verified a signature, threshold {threshold}")]
    ThresholdNotMet {
        verified: usize,
        keys: usize,
        threshold: usize,
    },
    /// [`Envelope::verify_until`] was told to stop before it had an answer.
    #[error("verification cancelled")]
    Cancelled,
}

impl Envelope {
    /// The PAE bytes the signatures cover.
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }

    /// Verifies that at least `threshold` distinct keys each verify a distinct signature.
    /// Every key is tried on every signature: keyids are hints, never trusted.
    pub fn verify(
        &self,
        keys: &[PublicKey],
        threshold: usize,
    ) -> Result<Vec<Verified>, VerifyError> {
        self.verify_until(keys, threshold, || false)
    }

    /// [`Envelope::verify`] that asks `cancelled` before each signature check and stops
    /// with [`VerifyError::Cancelled`] once it says yes: a caller whose deadline passed
    /// (the provenance gate, checking envelopes from a registry) does not keep a CPU busy
    /// with work nobody waits for.
    pub fn verify_until(
        &self,
        keys: &[PublicKey],
        threshold: usize,
        cancelled: impl Fn() -> bool,
    ) -> Result<Vec<Verified>, VerifyError> {
        if self.signatures.is_empty() {
            return Err(VerifyError::NoSignatures);
        }
        if threshold == 0 || threshold > keys.len() {
            return Err(VerifyError::BadThreshold {
                threshold,
                keys: keys.len(),
            });
        }
        let message = self.pae();
        let mut used = vec![false; self.signatures.len()];
        let mut verified = Vec::new();
        for (key_index, key) in keys.iter().enumerate() {
            let mut hit = None;
            for (i, s) in self.signatures.iter().enumerate() {
                if cancelled() {
                    return Err(VerifyError::Cancelled);
                }
                if !used[i] && key.verify(&message, &s.sig) {
                    hit = Some((i, s));
                    break;
                }
            }
            if let Some((signature_index, s)) = hit {
                used[signature_index] = true;
                verified.push(Verified {
                    key_index,
                    signature_index,
                    keyid: s.keyid.clone(),
                });
            }
        }
        if verified.len() < threshold {
            return Err(VerifyError::ThresholdNotMet {
                verified: verified.len(),
                keys: keys.len(),
                threshold,
            });
        }
        Ok(verified)
    }

    /// The contract's `bundleSha256`: lowercase hex SHA-256 of JCS(envelope).
    ///
    /// An envelope has no numbers and its keys are sorted, so its canonical form is fixed
    /// text around the base64 values and the JSON-escaped strings (escaped by serde_json,
    /// exactly as RFC 8785 asks); it is hashed as it is written, never buffered. A test
    /// holds this to `serde_jcs`'s bytes.
    pub fn jcs_sha256(&self) -> Result<String, serde_json::Error> {
        use std::io::Write as _;

        use sha2::Digest as _;
        fn b64_into(w: &mut crate::jcs::Sha256Writer, bytes: &[u8]) -> std::io::Result<()> {
            let mut enc =
                base64::write::EncoderWriter::new(w, &base64::engine::general_purpose::STANDARD);
            enc.write_all(bytes)?;
            enc.finish().map(|_| ())
        }
        let mut w = crate::jcs::Sha256Writer::default();
        let io = serde_json::Error::io;
        w.write_all(b"{\"payload\":\"").map_err(io)?;
        b64_into(&mut w, &self.payload).map_err(io)?;
        w.write_all(b"\",\"payloadType\":").map_err(io)?;
        serde_json::to_writer(&mut w, &self.payload_type)?;
        w.write_all(b",\"signatures\":[").map_err(io)?;
        for (i, s) in self.signatures.iter().enumerate() {
            w.write_all(if i == 0 {
                b"{\"keyid\":"
            } else {
                b",{\"keyid\":"
            })
            .map_err(io)?;
            serde_json::to_writer(&mut w, &s.keyid)?;
            w.write_all(b",\"sig\":\"").map_err(io)?;
            b64_into(&mut w, &s.sig).map_err(io)?;
            w.write_all(b"\"}").map_err(io)?;
        }
        w.write_all(b"]}").map_err(io)?;
        Ok(hex::encode(w.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_spec_test_vector() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn envelope_hash_is_over_its_rfc8785_form() {
        for payload_type in [
            "application/vnd.in-toto+json",
            "t\u{1}\"\\",
            "\u{1f600}\u{e000}\u{2028}",
        ] {
            let env = Envelope {
                payload: (0..=255).collect(),
                payload_type: payload_type.into(),
                signatures: vec![
                    Signature {
                        keyid: "k1".into(),
                        sig: vec![1, 2, 3],
                    },
                    Signature {
                        keyid: String::new(),
                        sig: vec![],
                    },
                ],
            };
            use sha2::Digest as _;
            let expected = hex::encode(sha2::Sha256::digest(serde_jcs::to_vec(&env).unwrap()));
            assert_eq!(env.jcs_sha256().unwrap(), expected);
        }
    }

    #[test]
    fn envelope_json_uses_standard_base64_and_reads_url_safe() {
        let env = Envelope {
            payload: vec![0xfb, 0xff, 0xfe],
            payload_type: "t".into(),
            signatures: vec![Signature {
                keyid: "k".into(),
                sig: vec![0xff; 3],
            }],
        };
        let json = serde_json::to_string(&env).unwrap();
        assert_eq!(
            json,
            r#"{"payload":"+//+","payloadType":"t","signatures":[{"keyid":"k","sig":"////"}]}"#
        );
        let url = json.replace("+//+", "-__-").replace("////", "____");
        assert_eq!(serde_json::from_str::<Envelope>(&url).unwrap(), env);
    }
}
