//! DPoP proofs (RFC 9449) carried on a message bus.
//!
//! An OpTok with `cnf.jkt` is sender-constrained: it is only good together with a fresh proof,
//! signed by the key whose RFC 7638 thumbprint is `jkt`, that the publisher makes for each job.
//! A stolen token alone is then useless. RFC 9449 binds a proof to an HTTP request; here the
//! "request" is publishing a job, so `htm` is `PUBLISH` and `htu` the configured target
//! (`gates.entitlement.dpop_htu`, e.g. `nats:sign.requests`). The proof must:
//!
//! - be a compact JWS with header `typ: dpop+jwt` and the public key in header `jwk`
//!   (EC P-256 or OKP Ed25519, no private members), signed with that key's algorithm;
//! - have `jwk`'s thumbprint equal to the token's `cnf.jkt`;
//! - carry `htm`, `htu`, `ath` (base64url SHA-256 of the OpTok), `iat` within
//!   ±`dpop_max_age` of the moment the job was published (the broker's timestamp, not the
//!   time a worker gets to it: a proof is made for publishing, and a backlog must not make
//!   fresh proofs stale), and a `jti` this key has not used before for another request
//!   (see [`crate::replay`]: records are per proof key, so one client cannot burn another's,
//!   and outlive every copy's wait in the stream).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use signer_actors::error::SignerError;

use super::jwks::PublicKey;
use super::jws::{self, JwsError, b64url, numeric_date};
use crate::replay::{ReplayCache, ReplayError, ReplayKey, ReplayOutcome};

/// The `htm` of a proof for publishing a job.
pub const DPOP_HTM: &str = "PUBLISH";

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("the OpTok is bound to a key (cnf.jkt) but the request has no auth.dpop proof")]
    Missing,
    #[error(
        "sender-constrained token required: the OpTok has no cnf.jkt and bearer tokens are not accepted"
    )]
    BearerNotAllowed,
    #[error("{0}")]
    Jws(#[from] JwsError),
    #[error("header typ is {}, not \"dpop+jwt\"", typ_text(.0))]
    WrongType(Option<String>),
    #[error("header jwk: {0}")]
    BadJwk(String),
    #[error("proof key thumbprint does not match the OpTok's cnf.jkt")]
    ThumbprintMismatch,
    #[error("claim {0} is missing or malformed")]
    BadClaim(&'static str),
    #[error("htm {} is not \"PUBLISH\"", signer_actors::echo::echo(.0))]
    WrongMethod(String),
    #[error("htu {} is not the configured target", signer_actors::echo::echo(.0))]
    WrongTarget(String),
    #[error("ath does not match the OpTok")]
    WrongAth,
    #[error("iat {iat} is more than {max_age}s from the job's publish time ({now})")]
    Stale { iat: u64, now: u64, max_age: u64 },
    #[error("jti was already used with another request")]
    Replayed,
    #[error("{0}")]
    CacheUnavailable(#[from] ReplayError),
}

fn typ_text(typ: &Option<String>) -> String {
    typ.as_ref()
        .map_or_else(|| "missing".to_owned(), |t| signer_actors::echo::echo(t))
}

impl From<DpopError> for SignerError {
    fn from(e: DpopError) -> Self {
        let msg = e.to_string();
        match e {
            DpopError::Replayed => SignerError::DpopReplayed(msg),
            // Fail closed, but let the job be retried: the proof may well be good.
            DpopError::CacheUnavailable(_) => SignerError::EntitlementUnavailable(msg),
            _ => SignerError::DpopInvalid(msg),
        }
    }
}

#[derive(Deserialize)]
struct RawProof {
    htm: Option<String>,
    htu: Option<String>,
    ath: Option<String>,
    iat: Option<Value>,
    jti: Option<String>,
}

/// What a proof is checked against, from the job and its verified OpTok.
#[derive(Debug, Clone, Copy)]
pub struct ProofContext<'a> {
    /// The OpTok exactly as presented (for `ath`).
    pub op_tok: &'a str,
    /// The OpTok's `cnf.jkt`.
    pub jkt: &'a str,
    /// Identifies the request (see [`crate::replay`]): a redelivery presents the same.
    pub binding: &'a str,
    /// When the job was published (unix seconds): `iat` is judged against this.
    pub now: u64,
}

/// Verifies proofs and records their `jti`s (per proof key, for the store's lifetime).
pub struct DpopVerifier {
    htu: String,
    max_age: Duration,
    replay: Arc<dyn ReplayCache>,
}

impl DpopVerifier {
    pub fn new(htu: impl Into<String>, max_age: Duration, replay: Arc<dyn ReplayCache>) -> Self {
        DpopVerifier {
            htu: htu.into(),
            max_age,
            replay,
        }
    }

    /// Checks `proof` for the job described by `ctx`; records its `jti` when it is good.
    pub async fn verify(&self, proof: &str, ctx: ProofContext<'_>) -> Result<(), DpopError> {
        let header = jws::read_header(proof)?;
        if !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("dpop+jwt"))
        {
            return Err(DpopError::WrongType(header.typ));
        }
        let jwk = header
            .fields
            .get("jwk")
            .ok_or_else(|| DpopError::BadJwk("missing".into()))?;
        let key = PublicKey::from_jwk(jwk).map_err(|e| DpopError::BadJwk(e.to_string()))?;
        // Cheap and decisive: a proof by any other key is refused before the cryptography.
        if key.thumbprint() != ctx.jkt {
            return Err(DpopError::ThumbprintMismatch);
        }
        let claims: RawProof = jws::verify(proof, &header, &key)?;
        let jti = claims
            .jti
            .filter(|j| !j.is_empty())
            .ok_or(DpopError::BadClaim("jti"))?;
        let htm = claims.htm.ok_or(DpopError::BadClaim("htm"))?;
        if htm != DPOP_HTM {
            return Err(DpopError::WrongMethod(htm));
        }
        let htu = claims.htu.ok_or(DpopError::BadClaim("htu"))?;
        if htu != self.htu {
            return Err(DpopError::WrongTarget(htu));
        }
        let ath = claims.ath.ok_or(DpopError::BadClaim("ath"))?;
        if ath != b64url(&Sha256::digest(ctx.op_tok.as_bytes())) {
            return Err(DpopError::WrongAth);
        }
        let iat = claims
            .iat
            .as_ref()
            .and_then(numeric_date)
            .ok_or(DpopError::BadClaim("iat"))?;
        let max_age = self.max_age.as_secs();
        if iat.abs_diff(ctx.now) > max_age {
            return Err(DpopError::Stale {
                iat,
                now: ctx.now,
                max_age,
            });
        }
        // Scoped by the thumbprint checked above (equal to the token's cnf.jkt).
        match self
            .replay
            .record(&ReplayKey::new(ctx.jkt, &jti), ctx.binding)
            .await?
        {
            ReplayOutcome::First | ReplayOutcome::SameRequest => Ok(()),
            ReplayOutcome::Replayed => Err(DpopError::Replayed),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use signer_actors::audit::{AuthState, PoeState};
    use signer_actors::error::ErrorCode;
    use signer_actors::ports::GateInput;

    use super::super::EntitlementGateImpl;
    use super::super::mint::{self, MintAlg};
    use super::super::testkit::{self, Fixture, KeyPair, TestGate, code, deny, now};
    use super::*;
    use crate::replay::RedisReplayCache;

    fn job(fx: &Fixture, optok: &str, proof: Option<&str>) -> GateInput {
        let licence = fx.licence(&fx.licence_claims());
        fx.input(optok, proof, ("jwt", &licence))
    }

    /// A proof by the client key with these header and claims.
    fn proof(fx: &Fixture, header: serde_json::Value, claims: serde_json::Value) -> String {
        mint::sign_compact(&fx.client.pem, &header, &claims).unwrap()
    }

    fn claims(fx: &Fixture, optok: &str) -> serde_json::Value {
        json!({
            "htm": "PUBLISH",
            "htu": fx.cfg.dpop_htu,
            "iat": now(),
            "jti": format!("jti-{}", testkit::unique_prefix()),
            "ath": mint::ath_of(optok),
        })
    }

    fn header(fx: &Fixture) -> serde_json::Value {
        json!({"typ": "dpop+jwt", "jwk": mint::public_jwk(&fx.client.pem).unwrap()})
    }

    #[tokio::test]
    async fn bad_proofs_are_dpop_invalid() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        let optok = fx.optok(&fx.optok_claims());
        let other_optok = {
            let mut c = fx.optok_claims();
            c["sub"] = "svc:other".into();
            fx.optok(&c)
        };
        let stranger = KeyPair::new(MintAlg::Es256);
        let with_claim = |k: &str, v: serde_json::Value| {
            let mut c = claims(&fx, &optok);
            c[k] = v;
            proof(&fx, header(&fx), c)
        };
        let without_claim = |k: &str| {
            let mut c = claims(&fx, &optok);
            c.as_object_mut().unwrap().remove(k);
            proof(&fx, header(&fx), c)
        };
        let mut private_jwk =
            serde_json::to_value(mint::public_jwk(&fx.client.pem).unwrap()).unwrap();
        private_jwk["d"] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into();
        // The tests' clock: the job is published at `now`, so the window is exact.
        let now = now();
        let max_age = fx.cfg.dpop_max_age.as_secs();

        let cases: Vec<(&str, Option<String>)> = vec![
            ("missing", None),
            (
                "signed by another key (wrong thumbprint)",
                Some(mint::mint_dpop(&stranger.pem, &optok, &fx.cfg.dpop_htu, now, "j-1").unwrap()),
            ),
            (
                "stranger's key in the header, signed by the client",
                Some(proof(
                    &fx,
                    json!({"typ": "dpop+jwt", "jwk": mint::public_jwk(&stranger.pem).unwrap()}),
                    claims(&fx, &optok),
                )),
            ),
            ("ath of another token", Some(fx.dpop(&other_optok))),
            ("wrong htm", Some(with_claim("htm", "POST".into()))),
            (
                "wrong htu",
                Some(fx.dpop_with(&optok, "nats:sign.other", now, "j-2")),
            ),
            (
                "stale iat (a second past the window)",
                Some(fx.dpop_with(&optok, &fx.cfg.dpop_htu, now - max_age - 1, "j-3")),
            ),
            (
                "stale iat",
                Some(fx.dpop_with(&optok, &fx.cfg.dpop_htu, now - 3600, "j-3b")),
            ),
            (
                "iat in the future (a second past the window)",
                Some(fx.dpop_with(&optok, &fx.cfg.dpop_htu, now + max_age + 1, "j-4")),
            ),
            (
                "iat in the future",
                Some(fx.dpop_with(&optok, &fx.cfg.dpop_htu, now + 90, "j-4b")),
            ),
            ("no jti", Some(without_claim("jti"))),
            ("empty jti", Some(with_claim("jti", "".into()))),
            ("no ath", Some(without_claim("ath"))),
            ("no iat", Some(without_claim("iat"))),
            ("no htu", Some(without_claim("htu"))),
            (
                "typ JWT",
                Some(proof(
                    &fx,
                    json!({"typ": "JWT", "jwk": mint::public_jwk(&fx.client.pem).unwrap()}),
                    claims(&fx, &optok),
                )),
            ),
            (
                "no typ",
                Some(proof(
                    &fx,
                    json!({"jwk": mint::public_jwk(&fx.client.pem).unwrap()}),
                    claims(&fx, &optok),
                )),
            ),
            (
                "no jwk",
                Some(proof(&fx, json!({"typ": "dpop+jwt"}), claims(&fx, &optok))),
            ),
            (
                "private key in jwk",
                Some(proof(
                    &fx,
                    json!({"typ": "dpop+jwt", "jwk": private_jwk}),
                    claims(&fx, &optok),
                )),
            ),
            (
                "header alg EdDSA on a P-256 jwk",
                Some(proof(
                    &fx,
                    json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": mint::public_jwk(&fx.client.pem).unwrap()}),
                    claims(&fx, &optok),
                )),
            ),
            (
                "forged claims",
                Some(testkit::tamper(&fx.dpop(&optok), |c| c["htu"] = "x".into())),
            ),
        ];
        for (name, p) in cases {
            let d = deny(&gate, &job(&fx, &optok, p.as_deref())).await;
            assert_eq!(
                d.error.code(),
                ErrorCode::DpopInvalid,
                "{name}: {}",
                d.error
            );
            assert_eq!(d.auth, Some(AuthState::Invalid), "{name}");
            assert_eq!(d.poe, Some(PoeState::NotChecked), "{name}");
            assert_eq!(
                d.caller.as_ref().map(|c| c.iss.as_str()),
                Some(testkit::ISSUER),
                "{name}: the token was genuine"
            );
        }
        // Within max age on both sides is fine, up to its last second.
        for (iat, jti) in [(now - max_age, "j-5"), (now + max_age, "j-6"), (now, "j-7")] {
            gate.verify(&job(
                &fx,
                &optok,
                Some(&fx.dpop_with(&optok, &fx.cfg.dpop_htu, iat, jti)),
            ))
            .await
            .unwrap_or_else(|d| panic!("iat {iat} (published {now}): {}", d.error));
        }
    }

    #[tokio::test]
    async fn ed25519_proof_keys_work() {
        let mut fx = Fixture::new();
        fx.client = KeyPair::new(MintAlg::EdDsa);
        let gate = fx.gate().await;
        let optok = fx.optok(&fx.optok_claims());
        let v = gate
            .verify(&job(&fx, &optok, Some(&fx.dpop(&optok))))
            .await
            .unwrap();
        assert_eq!(v.auth, AuthState::Valid);
    }

    async fn replay_is_refused(gate_a: &TestGate, gate_b: &TestGate, fx: &Fixture) {
        let optok = fx.optok(&fx.optok_claims());
        let p = fx.dpop(&optok);
        let first = job(fx, &optok, Some(&p));
        gate_a.verify(&first).await.unwrap();
        // The same job again (a JetStream redelivery) is not a replay.
        gate_a.verify(&first).await.unwrap();
        gate_b.verify(&first).await.unwrap();
        // The same proof on another job is.
        for gate in [gate_a, gate_b] {
            let d = deny(gate, &job(fx, &optok, Some(&p))).await;
            assert_eq!(d.error.code(), ErrorCode::DpopReplayed);
            assert_eq!(d.auth, Some(AuthState::Invalid));
        }
    }

    #[tokio::test]
    async fn replayed_jti_in_memory() {
        let fx = Fixture::new();
        let gate = fx.gate().await;
        replay_is_refused(&gate, &gate, &fx).await;
    }

    fn redis_records(fx: &Fixture, pool: crate::redis::Redis) -> Option<Arc<dyn ReplayCache>> {
        Some(Arc::new(RedisReplayCache::new(
            pool,
            fx.cfg.dpop_replay_prefix.clone(),
            Duration::from_secs(120),
        )))
    }

    #[cfg(feature = "integration")]
    #[tokio::test]
    async fn replayed_jti_in_redis_across_replicas() {
        let fx = Fixture::new(); // its replay prefix is unique to this test
        let a = TestGate::new(
            EntitlementGateImpl::from_config(&fx.cfg, redis_records(&fx, testkit::redis_pool()))
                .await
                .unwrap(),
        )
        .await;
        let b = TestGate::new(
            EntitlementGateImpl::from_config(&fx.cfg, redis_records(&fx, testkit::redis_pool()))
                .await
                .unwrap(),
        )
        .await;
        replay_is_refused(&a, &b, &fx).await;
    }

    /// RFC 9449 makes a `jti` unique per key: the same `jti` from another client's key is
    /// another proof, not a replay (records keyed by `jti` alone let one tenant burn another's).
    #[tokio::test]
    async fn the_same_jti_from_another_proof_key_is_not_a_replay() {
        let fx = Fixture::new();
        let mut other = Fixture::new();
        other.client = KeyPair::new(MintAlg::EdDsa);
        let gate = fx.gate().await;
        let mine = fx.optok(&fx.optok_claims());
        let theirs = fx.optok(&{
            let mut c = fx.optok_claims();
            c["cnf"]["jkt"] = mint::jkt_of(&other.client.jwk).into();
            c
        });
        let jti = "jti-predictable-1";
        gate.verify(&job(
            &fx,
            &mine,
            Some(&fx.dpop_with(&mine, &fx.cfg.dpop_htu, now(), jti)),
        ))
        .await
        .unwrap();
        let their_proof = other.dpop_with(&theirs, &fx.cfg.dpop_htu, now(), jti);
        gate.verify(&job(&fx, &theirs, Some(&their_proof)))
            .await
            .unwrap();
        // ...while each key's own reuse still is a replay.
        let d = deny(&gate, &job(&fx, &theirs, Some(&their_proof))).await;
        assert_eq!(d.error.code(), ErrorCode::DpopReplayed);
    }

    #[tokio::test]
    async fn replay_cache_outage_is_retryable() {
        let fx = Fixture::new();
        let pool = crate::redis::connect_url("redis://127.0.0.1:1").unwrap();
        let gate = TestGate::new(
            EntitlementGateImpl::from_config(&fx.cfg, redis_records(&fx, pool))
                .await
                .unwrap(),
        )
        .await;
        let optok = fx.optok(&fx.optok_claims());
        let d = deny(&gate, &job(&fx, &optok, Some(&fx.dpop(&optok)))).await;
        assert_eq!(d.error.code(), ErrorCode::EntitlementUnavailable);
        assert!(d.error.code().retryable());
        assert_eq!(d.auth, Some(AuthState::NotChecked));
    }

    #[tokio::test]
    async fn bearer_tokens_are_refused_unless_allowed() {
        let mut fx = Fixture::new();
        let mut claims = fx.optok_claims();
        claims.as_object_mut().unwrap().remove("cnf");
        let bearer = fx.optok(&claims);

        let gate = fx.gate().await;
        let d = deny(&gate, &job(&fx, &bearer, None)).await;
        assert_eq!(d.error.code(), ErrorCode::DpopInvalid);
        assert!(
            d.error.message().contains("sender-constrained"),
            "{}",
            d.error
        );
        // A proof does not help a token that is not bound to its key.
        assert_eq!(
            code(&gate, &job(&fx, &bearer, Some(&fx.dpop(&bearer)))).await,
            ErrorCode::DpopInvalid
        );

        fx.cfg.allow_bearer = true;
        let gate = fx.gate().await;
        let v = gate.verify(&job(&fx, &bearer, None)).await.unwrap();
        assert_eq!(v.auth, AuthState::Bearer);
        // A bound token still needs its proof when bearer tokens are allowed.
        let bound = fx.optok(&fx.optok_claims());
        assert_eq!(
            code(&gate, &job(&fx, &bound, None)).await,
            ErrorCode::DpopInvalid
        );
    }
}
