//! OpToks: the Authority's access tokens (compact JWS) that name the caller of a job.
//!
//! A token is checked for its signature (a key of the Authority's JWKS, with the key's own
//! algorithm), `iss`, `exp`/`nbf`/`iat` (with the configured clock skew), `aud`, `scope`,
//! `sub` and `tid`, and an optional `cnf.jkt` (RFC 9449 section 6: the thumbprint of the key
//! whose DPoP proofs must accompany it). Publishers reuse one token for thousands of jobs, so
//! the Entitlement actor caches verified tokens until they expire (keyed by the SHA-256 of
//! the token text): one signature check per token, not per job. This module keeps nothing.
//! What depends on the job (the tenant binding) or on time (`exp`, `nbf`, `iat`) is checked
//! on every use, cached or not (`EntitlementGateImpl::verify`): jobs are judged at their
//! publish time, which is not monotonic across jobs (a job published before a token's `nbf`
//! may be processed after one published later), so a cache hit proves nothing about time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use serde_json::{Map, Value};
use signer_actors::error::SignerError;

use super::Verified;
use super::jwks::{KeyLookupError, KeySet, PublicKey};
use super::jws::{self, JwsError, numeric_date};

/// The claims of a verified OpTok that the signer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpTok {
    pub iss: String,
    pub sub: String,
    /// The tenant the token was issued for.
    pub tid: String,
    pub scope: Vec<String>,
    /// `exp`, `nbf`, `iat`: judged again for every job that uses the token.
    pub dates: TokenDates,
    /// `cnf.jkt`: when present, the token is sender-constrained and needs a DPoP proof.
    pub jkt: Option<String>,
}

/// Why an OpTok was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpTokError {
    #[error("{0}")]
    Jws(#[from] JwsError),
    #[error("no Authority key with kid {}", signer_actors::echo::echo(.0))]
    UnknownKey(String),
    #[error("{0}")]
    NoKid(String),
    #[error("Authority keys unavailable: {0}")]
    KeysUnavailable(String),
    #[error("a DPoP proof was presented as an OpTok")]
    WrongType,
    #[error("iss {} is not the configured issuer", signer_actors::echo::echo_opt(found.as_deref()))]
    WrongIssuer { found: Option<String> },
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    #[error("claim {0} is malformed")]
    BadClaim(&'static str),
    #[error("cnf has no jkt: only DPoP (RFC 9449) confirmation is supported")]
    UnsupportedConfirmation,
    #[error("expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("issued in the future ({iat}, now {now})")]
    IssuedInFuture { iat: u64, now: u64 },
    #[error("aud does not contain {0:?}")]
    Audience(String),
    #[error("scope does not contain {0:?}")]
    Scope(String),
    #[error("{0}")]
    Tenant(String),
}

impl From<OpTokError> for SignerError {
    fn from(e: OpTokError) -> Self {
        let msg = e.to_string();
        match e {
            OpTokError::KeysUnavailable(_) => SignerError::EntitlementUnavailable(msg),
            OpTokError::Expired { .. }
            | OpTokError::NotYetValid { .. }
            | OpTokError::IssuedInFuture { .. } => SignerError::AuthExpired(msg),
            OpTokError::Audience(_) => SignerError::AudienceMismatch(msg),
            OpTokError::Scope(_) => SignerError::ScopeMissing(msg),
            OpTokError::Tenant(_) => SignerError::TenantMismatch(msg),
            OpTokError::Jws(_)
            | OpTokError::UnknownKey(_)
            | OpTokError::NoKid(_)
            | OpTokError::WrongType
            | OpTokError::WrongIssuer { .. }
            | OpTokError::MissingClaim(_)
            | OpTokError::BadClaim(_)
            | OpTokError::UnsupportedConfirmation => SignerError::AuthInvalid(msg),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims as they come; types are checked here, values below.
#[derive(Deserialize)]
struct RawClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    scope: Option<String>,
    tid: Option<String>,
    exp: Option<Value>,
    nbf: Option<Value>,
    iat: Option<Value>,
    cnf: Option<Map<String, Value>>,
}

/// What the verifier checks every token against.
#[derive(Debug, Clone)]
pub struct OpTokPolicy {
    pub issuer: String,
    pub audience: String,
    pub scope: String,
    /// Seconds of tolerated clock difference.
    pub skew: u64,
}

/// The dates of a token that are judged against the job's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenDates {
    pub exp: u64,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
}

/// Verifies OpToks against a key set it is given. Keeps nothing: the key set and the
/// verified tokens are the Entitlement actor's (see `signer_actors::pipeline::Entitlement`).
pub struct OpTokVerifier {
    policy: OpTokPolicy,
    signature_checks: AtomicU64,
}

impl OpTokVerifier {
    pub fn new(policy: OpTokPolicy) -> Self {
        OpTokVerifier {
            policy,
            signature_checks: AtomicU64::new(0),
        }
    }

    /// Signature checks done so far (that reached the cryptography); for tests.
    #[cfg(test)]
    pub(crate) fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// Verifies `raw` against `keys` as of `now` (unix seconds: the job's publish time), and
    /// says which key verified it. Does not check the tenant binding: that depends on the
    /// job, see [`check_tenant`]. An unknown `kid` is [`OpTokError::UnknownKey`]: the caller
    /// may reload the set and try again.
    pub fn verify(
        &self,
        raw: &str,
        keys: &KeySet,
        now: u64,
    ) -> Result<(Verified<OpTok>, Arc<PublicKey>), OpTokError> {
        let header = jws::read_header(raw)?;
        if header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("dpop+jwt"))
        {
            return Err(OpTokError::WrongType);
        }
        let key = match keys.find(header.kid.as_deref()) {
            Some(key) => key,
            None => {
                return Err(match header.kid {
                    Some(kid) => OpTokError::UnknownKey(kid),
                    None => OpTokError::NoKid(KeyLookupError::NoKid(keys.len()).to_string()),
                });
            }
        };
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let claims: RawClaims = jws::verify(raw, &header, &key)?;
        let token = self.check_claims(claims, now)?;
        Ok((Verified(token), key))
    }

    /// Until when (unix seconds, compared with jobs' publish times) a verified token may be
    /// reused: past `exp` plus the skew every job is refused anyway.
    pub fn reuse_until(&self, token: &OpTok) -> u64 {
        token
            .dates
            .exp
            .saturating_add(self.policy.skew)
            .saturating_add(1)
    }

    fn check_claims(&self, c: RawClaims, now: u64) -> Result<OpTok, OpTokError> {
        let p = &self.policy;
        if c.iss.as_deref() != Some(p.issuer.as_str()) {
            return Err(OpTokError::WrongIssuer { found: c.iss });
        }
        let date = |v: Option<Value>, name: &'static str| -> Result<Option<u64>, OpTokError> {
            v.map(|v| numeric_date(&v).ok_or(OpTokError::BadClaim(name)))
                .transpose()
        };
        let dates = TokenDates {
            exp: date(c.exp, "exp")?.ok_or(OpTokError::MissingClaim("exp"))?,
            nbf: date(c.nbf, "nbf")?,
            iat: date(c.iat, "iat")?,
        };
        check_dates(dates, now, p.skew)?;
        let audience_ok = match &c.aud {
            Some(Audience::One(a)) => *a == p.audience,
            Some(Audience::Many(list)) => list.contains(&p.audience),
            None => false,
        };
        if !audience_ok {
            return Err(OpTokError::Audience(p.audience.clone()));
        }
        let scope: Vec<String> = c
            .scope
            .as_deref()
            .unwrap_or_default()
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        if !scope.contains(&p.scope) {
            return Err(OpTokError::Scope(p.scope.clone()));
        }
        let sub = c
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(OpTokError::MissingClaim("sub"))?;
        let tid = c
            .tid
            .filter(|s| !s.is_empty())
            .ok_or(OpTokError::MissingClaim("tid"))?;
        let jkt = match c.cnf {
            None => None,
            Some(cnf) => match cnf.get("jkt") {
                Some(Value::String(jkt)) if !jkt.is_empty() => Some(jkt.clone()),
                Some(_) => return Err(OpTokError::BadClaim("cnf.jkt")),
                None => return Err(OpTokError::UnsupportedConfirmation),
            },
        };
        Ok(OpTok {
            iss: p.issuer.clone(),
            sub,
            tid,
            scope,
            dates,
            jkt,
        })
    }
}

/// `exp`, `nbf` and `iat` as of `now` (the job's publish time), with `skew` seconds of
/// tolerated clock difference.
pub fn check_dates(d: TokenDates, now: u64, skew: u64) -> Result<(), OpTokError> {
    if d.exp.saturating_add(skew) < now {
        return Err(OpTokError::Expired { exp: d.exp, now });
    }
    if let Some(nbf) = d.nbf
        && nbf > now.saturating_add(skew)
    {
        return Err(OpTokError::NotYetValid { nbf, now });
    }
    if let Some(iat) = d.iat
        && iat > now.saturating_add(skew)
    {
        return Err(OpTokError::IssuedInFuture { iat, now });
    }
    Ok(())
}

/// The token's tenant must be the job's: the body's, and the subject's when the job was
/// published on `sign.requests.<tenant>`.
pub fn check_tenant(
    token: &OpTok,
    body_tenant: &str,
    subject_tenant: Option<&str>,
) -> Result<(), OpTokError> {
    if token.tid != body_tenant {
        return Err(OpTokError::Tenant(format!(
            "OpTok is for tenant {}, the request names {}",
            signer_actors::echo::echo(&token.tid),
            signer_actors::echo::echo(body_tenant)
        )));
    }
    if let Some(subject) = subject_tenant
        && token.tid != subject
    {
        return Err(OpTokError::Tenant(format!(
            "OpTok is for tenant {}, the request was published for {}",
            signer_actors::echo::echo(&token.tid),
            signer_actors::echo::echo(subject)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use signer_actors::audit::{AuthState, PoeState};
    use signer_actors::error::ErrorCode;

    use super::super::jws::{b64url, b64url_decode};
    use super::super::testkit::{self, Fixture, KeyPair, code, deny, now};
    use super::*;
    use stella_signer_tools::mint::{self, MintAlg};

    /// A job with this OpTok (a fresh proof for it, a good licence).
    fn job(fx: &Fixture, optok: &str) -> signer_actors::ports::GateInput {
        let licence = fx.licence(&fx.licence_claims());
        fx.input(optok, Some(&fx.dpop(optok)), ("jwt", &licence))
    }

    async fn code_for_claims(
        fx: &Fixture,
        gate: &super::super::testkit::TestGate,
        change: impl FnOnce(&mut Value),
    ) -> ErrorCode {
        let mut claims = fx.optok_claims();
        change(&mut claims);
        let token = fx.optok(&claims);
        code(gate, &job(fx, &token)).await
    }

    #[tokio::test]
    async fn forged_and_confused_tokens_are_auth_invalid() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let good = fx.optok(&fx.optok_claims());
        let kid = fx.authority.kid().to_owned();
        let claims = fx.optok_claims();

        // Payload changed after signing.
        let forged = testkit::tamper(&good, |c| c["tid"] = "globex".into());
        // Signed by another key under the Authority's kid.
        let impostor = KeyPair::new(MintAlg::Es256);
        let wrong_key = mint::mint_optok(&impostor.pem, &kid, &claims).unwrap();
        // alg none, with and without a signature part.
        let none_header = b64url(json!({"alg": "none", "kid": kid}).to_string().as_bytes());
        let payload = good.split('.').nth(1).unwrap();
        let alg_none = format!("{none_header}.{payload}.");
        let alg_none_sig = format!("{none_header}.{payload}.AAAA");
        // HS256 keyed with the public key (JWK text, and raw point bytes).
        let jwk_text = serde_json::to_string(&fx.authority.jwk).unwrap();
        let hs_jwk = testkit::hs256(
            &json!({"alg": "HS256", "kid": kid}),
            &claims,
            jwk_text.as_bytes(),
        );
        let mut point = vec![4u8];
        point.extend(b64url_decode(&fx.authority.jwk.x).unwrap());
        point.extend(b64url_decode(fx.authority.jwk.y.as_deref().unwrap()).unwrap());
        let hs_point = testkit::hs256(&json!({"alg": "HS256", "kid": kid}), &claims, &point);
        // The Ed25519 key's kid with header ES256, and the ES256 key's with header EdDSA.
        let ed_kid = fx.authority_ed.kid();
        let mismatch_1 = mint::sign_compact(
            &fx.authority_ed.pem,
            &json!({"alg": "ES256", "kid": ed_kid}),
            &claims,
        )
        .unwrap();
        let mismatch_2 = mint::sign_compact(
            &fx.authority.pem,
            &json!({"alg": "EdDSA", "kid": kid}),
            &claims,
        )
        .unwrap();
        // A kid the Authority never published.
        let unknown_kid = mint::mint_optok(&fx.authority.pem, "no-such-kid", &claims).unwrap();
        // No kid while the JWKS has two keys.
        let no_kid =
            mint::sign_compact(&fx.authority.pem, &json!({"typ": "JWT"}), &claims).unwrap();
        // A DPoP proof presented as an OpTok.
        let proof_as_token = fx.dpop(&good);

        for (name, token) in [
            ("forged payload", forged),
            ("other key, same kid", wrong_key),
            ("alg none", alg_none),
            ("alg none with signature", alg_none_sig),
            ("HS256 keyed with the JWK", hs_jwk),
            ("HS256 keyed with the point", hs_point),
            ("header ES256 on an Ed25519 key", mismatch_1),
            ("header EdDSA on a P-256 key", mismatch_2),
            ("unknown kid", unknown_kid),
            ("no kid, several keys", no_kid),
            ("DPoP proof as OpTok", proof_as_token),
            ("garbage", "not-a-token".to_owned()),
        ] {
            let d = deny(&gate, &job(&fx, &token)).await;
            assert_eq!(
                d.error.code(),
                ErrorCode::AuthInvalid,
                "{name}: {}",
                d.error
            );
            assert_eq!(d.caller, None, "{name}");
            assert_eq!(d.auth, Some(AuthState::Invalid), "{name}");
            assert_eq!(d.poe, Some(PoeState::NotChecked), "{name}");
        }
        assert_eq!(gate.stats().await.token_cache_hits, 0);
    }

    #[tokio::test]
    async fn ed25519_authority_tokens_verify() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let token = mint::mint_optok(
            &fx.authority_ed.pem,
            fx.authority_ed.kid(),
            &fx.optok_claims(),
        )
        .unwrap();
        gate.verify(&job(&fx, &token)).await.unwrap();
    }

    type Change = Box<dyn FnOnce(&mut Value)>;

    #[tokio::test]
    async fn claim_rules_give_their_contract_codes() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let now = now();
        let cases: Vec<(&str, Change, ErrorCode)> = vec![
            (
                "expired",
                Box::new(move |c| {
                    c["exp"] = (now - 120).into();
                    c["iat"] = (now - 600).into();
                }),
                ErrorCode::AuthExpired,
            ),
            (
                "not yet valid",
                Box::new(move |c| c["nbf"] = (now + 120).into()),
                ErrorCode::AuthExpired,
            ),
            (
                "issued in the future",
                Box::new(move |c| c["iat"] = (now + 120).into()),
                ErrorCode::AuthExpired,
            ),
            (
                "no exp",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                ErrorCode::AuthInvalid,
            ),
            (
                "exp not a number",
                Box::new(|c| c["exp"] = "soon".into()),
                ErrorCode::AuthInvalid,
            ),
            (
                "wrong iss",
                Box::new(|c| c["iss"] = "https://evil.test".into()),
                ErrorCode::AuthInvalid,
            ),
            (
                "no iss",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("iss");
                }),
                ErrorCode::AuthInvalid,
            ),
            (
                "wrong aud (string)",
                Box::new(|c| c["aud"] = "attestor".into()),
                ErrorCode::AudienceMismatch,
            ),
            (
                "wrong aud (array)",
                Box::new(|c| c["aud"] = json!(["attestor", "export"])),
                ErrorCode::AudienceMismatch,
            ),
            (
                "no aud",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
                ErrorCode::AudienceMismatch,
            ),
            (
                "scope without signer.sign",
                Box::new(|c| c["scope"] = "attest.read signer.signx".into()),
                ErrorCode::ScopeMissing,
            ),
            (
                "no scope",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("scope");
                }),
                ErrorCode::ScopeMissing,
            ),
            (
                "no sub",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
                ErrorCode::AuthInvalid,
            ),
            (
                "no tid",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("tid");
                }),
                ErrorCode::AuthInvalid,
            ),
            (
                "cnf without jkt",
                Box::new(|c| c["cnf"] = json!({"x5t#S256": "abc"})),
                ErrorCode::AuthInvalid,
            ),
            (
                "tid of another tenant",
                Box::new(|c| c["tid"] = "globex".into()),
                ErrorCode::TenantMismatch,
            ),
        ];
        for (name, change, expected) in cases {
            assert_eq!(
                code_for_claims(&fx, &gate, change).await,
                expected,
                "{name}"
            );
        }
        // aud as a plain string that matches is fine.
        let mut claims = fx.optok_claims();
        claims["aud"] = "signer".into();
        gate.verify(&job(&fx, &fx.optok(&claims))).await.unwrap();
    }

    #[tokio::test]
    async fn tenant_must_match_body_and_subject() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let token = fx.optok(&fx.optok_claims());

        let mut other_subject = job(&fx, &token);
        other_subject.subject_tenant = Some("globex".into());
        let d = deny(&gate, &other_subject).await;
        assert_eq!(d.error.code(), ErrorCode::TenantMismatch);
        assert_eq!(
            d.caller.as_ref().map(|c| c.sub.as_str()),
            Some("svc:scanner")
        );

        // A token for another tenant, with body and subject both naming ours.
        let mut claims = fx.optok_claims();
        claims["tid"] = "globex".into();
        let d = deny(&gate, &job(&fx, &fx.optok(&claims))).await;
        assert_eq!(d.error.code(), ErrorCode::TenantMismatch);

        // Published on the plain subject: only the body counts.
        let mut plain = job(&fx, &token);
        plain.subject_tenant = None;
        gate.verify(&plain).await.unwrap();
    }

    #[tokio::test]
    async fn a_reused_token_costs_one_signature_check_and_is_rechecked_per_job() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let token = fx.optok(&fx.optok_claims());
        for _ in 0..5 {
            gate.verify(&job(&fx, &token)).await.unwrap();
        }
        let stats = gate.stats().await;
        assert_eq!(stats.token_signature_checks, 1);
        assert_eq!(stats.token_cache_hits, 4);

        // The cached token is still bound to its tenant, job by job.
        let mut other = job(&fx, &token);
        other.subject_tenant = Some("globex".into());
        assert_eq!(code(&gate, &other).await, ErrorCode::TenantMismatch);
        assert_eq!(gate.stats().await.token_signature_checks, 1);

        // Up to the skew past exp it is still good, from the cache...
        let exp = testkit::tamper_claims(&token)["exp"].as_u64().unwrap();
        let licence = fx.licence(&fx.licence_claims());
        let jti = std::sync::atomic::AtomicU64::new(0);
        let published_at = |secs: u64| {
            let n = jti.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let proof = fx.dpop_with(&token, &fx.cfg.dpop_htu, secs, &format!("jti-late-{n}"));
            let mut input = fx.input(&token, Some(&proof), ("jwt", &licence));
            input.published = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            input
        };
        let hits = gate.stats().await.token_cache_hits;
        gate.verify(&published_at(exp + gate_skew(&fx)))
            .await
            .unwrap();
        assert_eq!(gate.stats().await.token_cache_hits, hits + 1);
        // ...and one second later it is refused, cached or not.
        let late = exp + gate_skew(&fx) + 1;
        for _ in 0..2 {
            assert_eq!(
                code(&gate, &published_at(late)).await,
                ErrorCode::AuthExpired
            );
        }
        assert_eq!(gate.stats().await.token_cache_hits, hits + 1);
    }

    fn gate_skew(fx: &Fixture) -> u64 {
        fx.cfg.clock_skew.as_secs()
    }

    #[test]
    fn verified_tokens_map_to_contract_codes() {
        let cases = [
            (
                OpTokError::KeysUnavailable("x".into()),
                ErrorCode::EntitlementUnavailable,
            ),
            (
                OpTokError::Expired { exp: 1, now: 2 },
                ErrorCode::AuthExpired,
            ),
            (
                OpTokError::Audience("signer".into()),
                ErrorCode::AudienceMismatch,
            ),
            (
                OpTokError::Scope("signer.sign".into()),
                ErrorCode::ScopeMissing,
            ),
            (OpTokError::Tenant("x".into()), ErrorCode::TenantMismatch),
            (
                OpTokError::WrongIssuer { found: None },
                ErrorCode::AuthInvalid,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(SignerError::from(e).code(), code);
        }
    }
}
