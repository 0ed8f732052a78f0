//! What a profile signs: the predicate types it accepts, and the policy a report predicate
//! must say it was evaluated under (`docs/contract.md#signing-policy`).
//!
//! A profile's keys vouch for what they sign: the Stella Ops design signs only its own
//! attestation types per key, so a profile may list the predicate types it signs and refuse
//! every other one. Report predicates (a verdict of a policy over a scan) carry the policy
//! they were evaluated under, as the request's `options.policyDigest` and `options.viewSet`;
//! a profile may require them and restrict the digests it accepts. What the request stated
//! is recorded in the result and the audit event.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// predicateType of a Stella Ops scan report: a report predicate.
pub const SCAN_REPORT_PREDICATE_TYPE: &str = "https://stella-ops.org/attestations/scan-report/v1";
/// The predicate types that are reports: the policy they were evaluated under applies.
pub const REPORT_PREDICATE_TYPES: &[&str] = &[SCAN_REPORT_PREDICATE_TYPE];
/// predicateType of a CycloneDX SBOM (in-toto predicate registry).
pub const CYCLONEDX_PREDICATE_TYPE: &str = "https://cyclonedx.org/bom";
/// predicateType of an SPDX SBOM (in-toto predicate registry).
pub const SPDX_PREDICATE_TYPE: &str = "https://spdx.dev/Document";

/// Whether `predicate_type` is a report predicate ([`REPORT_PREDICATE_TYPES`]).
pub fn is_report(predicate_type: &str) -> bool {
    REPORT_PREDICATE_TYPES.contains(&predicate_type)
}

/// A predicate type as a profile may list it: 1 to 256 printable ASCII characters without
/// spaces, with a URI scheme (`https://...`).
fn is_valid_predicate_type(t: &str) -> bool {
    (1..=256).contains(&t.len())
        && t.bytes().all(|b| b.is_ascii_graphic())
        && t.split_once(':').is_some_and(|(scheme, rest)| {
            !scheme.is_empty()
                && !rest.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
        })
}

/// The policy a report was evaluated under, as the request states it: recorded as `policy`
/// in the `sign.completed` result and the audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRecord {
    /// `sha256:<64 hex>` of the policy.
    pub digest: String,
    /// The view set the policy was evaluated with.
    pub view_set: String,
}

/// Checks a view set: 1 to 256 characters of `[A-Za-z0-9._:/@+=,-]`.
pub fn is_valid_view_set(v: &str) -> bool {
    (1..=256).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@+=,-".contains(&b))
}

/// What one profile signs. The default signs anything and requires no policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningPolicy {
    /// The predicate types the profile signs; `None`: any (and raw payloads too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate_types: Option<BTreeSet<String>>,
    /// Report predicates must carry `options.policyDigest` and `options.viewSet`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_policy: bool,
    /// The policy digests a report predicate may carry; `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_policy_digests: Option<BTreeSet<String>>,
}

/// Why a profile does not sign a payload (answered with `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    /// The profile lists its predicate types, and the payload is not an in-toto Statement.
    #[error(
        "signing profile {profile:?} signs in-toto statements of listed predicate types only, not payloadType {payload_type}"
    )]
    NotAStatement {
        profile: String,
        payload_type: String,
    },
    /// The profile lists its predicate types, and this one is not among them.
    #[error(
        "signing profile {profile:?} does not sign predicateType {predicate_type} (it signs: {allowed})"
    )]
    PredicateType {
        profile: String,
        predicate_type: String,
        allowed: String,
    },
    /// A report predicate without the policy it was evaluated under, which the profile requires.
    #[error(
        "signing profile {profile:?} requires options.policyDigest and options.viewSet for report predicate {predicate_type}"
    )]
    PolicyMissing {
        profile: String,
        predicate_type: String,
    },
    /// A report predicate evaluated under a policy the profile does not accept.
    #[error("signing profile {profile:?} does not accept policy digest {digest}")]
    PolicyDigest { profile: String, digest: String },
}

/// What a profile is asked to sign: the payload's type, its predicate type when it is an
/// in-toto Statement, and the policy the request states.
#[derive(Debug, Clone, Copy)]
pub struct Signable<'a> {
    pub payload_type: &'a str,
    pub predicate_type: Option<&'a str>,
    pub policy: Option<&'a PolicyRecord>,
}

impl SigningPolicy {
    /// Signs anything and requires no policy (the default).
    pub fn is_open(&self) -> bool {
        *self == SigningPolicy::default()
    }

    /// Checks the configuration without I/O: lists not empty, predicate types that look like
    /// URIs, digests `sha256:<64 hex>`, and no report policy on a profile that signs no
    /// report predicate (it would never apply).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(types) = &self.predicate_types {
            if types.is_empty() {
                return Err("predicate_types is empty (the profile could sign nothing; \
                            remove the list to sign any predicate type)"
                    .into());
            }
            if let Some(t) = types.iter().find(|t| !is_valid_predicate_type(t)) {
                return Err(format!(
                    "predicate_types: {t:?} is not a predicate type URI (1 to 256 printable \
                     characters with a scheme, no spaces)"
                ));
            }
        }
        if let Some(digests) = &self.allowed_policy_digests {
            if digests.is_empty() {
                return Err(
                    "allowed_policy_digests is empty (no report could be signed; \
                            remove the list to accept any policy digest)"
                        .into(),
                );
            }
            if let Some(d) = digests
                .iter()
                .find(|d| crate::digest::parse_oci_sha256(d).is_err())
            {
                return Err(format!(
                    "allowed_policy_digests: {d:?} is not sha256:<64 lowercase hex>"
                ));
            }
        }
        let reports_policy = self.require_policy || self.allowed_policy_digests.is_some();
        if reports_policy
            && let Some(types) = &self.predicate_types
            && !types.iter().any(|t| is_report(t))
        {
            return Err(format!(
                "require_policy / allowed_policy_digests apply to report predicates ({}), \
                 and predicate_types lists none",
                REPORT_PREDICATE_TYPES.join(", ")
            ));
        }
        Ok(())
    }

    /// Whether `profile` signs `what`: its predicate type must be listed (when the profile
    /// lists them), and a report predicate must carry a policy when the profile requires
    /// one, and an accepted digest when the profile lists them.
    pub fn check(&self, profile: &str, what: Signable<'_>) -> Result<(), PolicyRefusal> {
        let echo = crate::echo::echo;
        if let Some(allowed) = &self.predicate_types {
            let Some(predicate_type) = what.predicate_type else {
                return Err(PolicyRefusal::NotAStatement {
                    profile: profile.to_owned(),
                    payload_type: echo(what.payload_type),
                });
            };
            if !allowed.contains(predicate_type) {
                return Err(PolicyRefusal::PredicateType {
                    profile: profile.to_owned(),
                    predicate_type: echo(predicate_type),
                    allowed: allowed.iter().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        let Some(predicate_type) = what.predicate_type.filter(|t| is_report(t)) else {
            return Ok(());
        };
        match what.policy {
            None if self.require_policy => Err(PolicyRefusal::PolicyMissing {
                profile: profile.to_owned(),
                predicate_type: predicate_type.to_owned(),
            }),
            Some(p)
                if self
                    .allowed_policy_digests
                    .as_ref()
                    .is_some_and(|allowed| !allowed.contains(&p.digest)) =>
            {
                Err(PolicyRefusal::PolicyDigest {
                    profile: profile.to_owned(),
                    digest: p.digest.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = SCAN_REPORT_PREDICATE_TYPE;
    const INTOTO: &str = crate::statement::INTOTO_PAYLOAD_TYPE;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn policy(c: char) -> PolicyRecord {
        PolicyRecord {
            digest: digest(c),
            view_set: "prod".into(),
        }
    }

    fn statement<'a>(t: &'a str, policy: Option<&'a PolicyRecord>) -> Signable<'a> {
        Signable {
            payload_type: INTOTO,
            predicate_type: Some(t),
            policy,
        }
    }

    fn sboms_and_reports() -> SigningPolicy {
        SigningPolicy {
            predicate_types: Some(
                [CYCLONEDX_PREDICATE_TYPE, SPDX_PREDICATE_TYPE, REPORT]
                    .map(String::from)
                    .into(),
            ),
            ..SigningPolicy::default()
        }
    }

    #[test]
    fn the_default_signs_anything_without_a_policy() {
        let open = SigningPolicy::default();
        assert_eq!(open.check("p", statement("https://x/any", None)), Ok(()));
        assert_eq!(open.check("p", statement(REPORT, None)), Ok(()));
        let raw = Signable {
            payload_type: "text/plain",
            predicate_type: None,
            policy: None,
        };
        assert_eq!(open.check("p", raw), Ok(()));
    }

    #[test]
    fn a_listed_profile_signs_its_predicate_types_only() {
        let p = sboms_and_reports();
        assert_eq!(
            p.check("r", statement(CYCLONEDX_PREDICATE_TYPE, None)),
            Ok(())
        );
        assert_eq!(p.check("r", statement(SPDX_PREDICATE_TYPE, None)), Ok(()));
        let e = p
            .check("r", statement("https://slsa.dev/provenance/v1", None))
            .unwrap_err();
        assert!(matches!(e, PolicyRefusal::PredicateType { .. }));
        let msg = e.to_string();
        assert!(msg.contains("https://slsa.dev/provenance/v1"), "{msg}");
        assert!(msg.contains(CYCLONEDX_PREDICATE_TYPE), "{msg}");
        // compared exactly: a version suffix is another type
        assert!(
            p.check("r", statement("https://cyclonedx.org/bom/v1.5", None))
                .is_err()
        );
        // raw bytes have no predicate type: not signed by a listed profile
        let raw = Signable {
            payload_type: "text/plain",
            predicate_type: None,
            policy: None,
        };
        assert!(matches!(
            p.check("r", raw),
            Err(PolicyRefusal::NotAStatement { .. })
        ));
    }

    #[test]
    fn a_required_policy_applies_to_report_predicates_only() {
        let p = SigningPolicy {
            require_policy: true,
            ..sboms_and_reports()
        };
        assert_eq!(
            p.check("r", statement(REPORT, None)),
            Err(PolicyRefusal::PolicyMissing {
                profile: "r".into(),
                predicate_type: REPORT.into()
            })
        );
        let with = policy('a');
        assert_eq!(p.check("r", statement(REPORT, Some(&with))), Ok(()));
        // an SBOM is no report: nothing required
        assert_eq!(
            p.check("r", statement(CYCLONEDX_PREDICATE_TYPE, None)),
            Ok(())
        );
    }

    #[test]
    fn allowed_digests_restrict_the_policy_of_reports() {
        let p = SigningPolicy {
            allowed_policy_digests: Some([digest('a')].into()),
            ..SigningPolicy::default()
        };
        let (good, bad) = (policy('a'), policy('b'));
        assert_eq!(p.check("r", statement(REPORT, Some(&good))), Ok(()));
        assert_eq!(
            p.check("r", statement(REPORT, Some(&bad))),
            Err(PolicyRefusal::PolicyDigest {
                profile: "r".into(),
                digest: digest('b')
            })
        );
        // not required: a report without a policy passes; a non-report's policy is recorded only
        assert_eq!(p.check("r", statement(REPORT, None)), Ok(()));
        assert_eq!(p.check("r", statement("https://x/y", Some(&bad))), Ok(()));
    }

    #[test]
    fn configuration_is_checked_without_io() {
        assert_eq!(SigningPolicy::default().validate(), Ok(()));
        assert_eq!(sboms_and_reports().validate(), Ok(()));
        let err = |p: SigningPolicy| p.validate().unwrap_err();
        let empty = SigningPolicy {
            predicate_types: Some(BTreeSet::new()),
            ..SigningPolicy::default()
        };
        assert!(err(empty).contains("predicate_types is empty"));
        for bad in ["", "no scheme", "cyclonedx", "https://x/ y", ":x"] {
            let p = SigningPolicy {
                predicate_types: Some([bad.to_string()].into()),
                ..SigningPolicy::default()
            };
            assert!(err(p).contains("not a predicate type"), "{bad:?}");
        }
        let p = SigningPolicy {
            allowed_policy_digests: Some(["sha256:abc".to_string()].into()),
            ..SigningPolicy::default()
        };
        assert!(err(p).contains("sha256:<64 lowercase hex>"));
        let p = SigningPolicy {
            allowed_policy_digests: Some(BTreeSet::new()),
            ..SigningPolicy::default()
        };
        assert!(err(p).contains("allowed_policy_digests is empty"));
        // a report policy on a profile that signs only SBOMs would never apply
        let p = SigningPolicy {
            predicate_types: Some([CYCLONEDX_PREDICATE_TYPE.to_string()].into()),
            require_policy: true,
            ..SigningPolicy::default()
        };
        assert!(err(p).contains("lists none"));
        let p = SigningPolicy {
            require_policy: true,
            allowed_policy_digests: Some([digest('a')].into()),
            ..sboms_and_reports()
        };
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn view_sets() {
        assert!(is_valid_view_set("prod"));
        assert!(is_valid_view_set("tenant:acme/views=sec,ops"));
        assert!(!is_valid_view_set(""));
        assert!(!is_valid_view_set("a b"));
        assert!(!is_valid_view_set(&"v".repeat(257)));
    }
}
