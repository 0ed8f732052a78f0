//! Checking operator signatures on key commands.
//!
//! Every signature is checked on its own (key, signature, `typ`, scope, time claims, command
//! digest, `jti`, `sub`); the ones that verify count once per operator (distinct key and
//! distinct `sub`); when enough count, their `jti`s are recorded in a JetStream key-value
//! bucket with `create`, which fails on every replica for a `jti` seen before.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use signer_actors::audit::{ControlRefusal, ControlSignature};

use super::CONTROL_TOKEN_TYPE;
use super::command::{ControlCommand, ControlEnvelope, command_digest};
use crate::config::ControlGate;
use crate::entitlement::jwks::{
    JwksError, JwksSource, JwksStore, KeyLookupError, UNKNOWN_KID_REFRESH_INTERVAL,
};
use crate::entitlement::jws::{self, numeric_date};

/// A refusal: its stable code and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}", code = .code.as_str())]
pub struct Refusal {
    pub code: ControlRefusal,
    pub detail: String,
}

impl Refusal {
    pub fn new(code: ControlRefusal, detail: impl Into<String>) -> Self {
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

/// An operator whose signature verified.
#[derive(Debug, Clone)]
struct Operator {
    kid: Option<String>,
    thumbprint: String,
    sub: String,
    jti: String,
}

/// The decision on one envelope: the verdict of every signature (for the audit event) and,
/// when authorised, the command.
#[derive(Debug, Clone)]
pub struct Decision {
    pub signatures: Vec<ControlSignature>,
    pub command_sha256: Option<String>,
    pub outcome: Result<ControlCommand, Refusal>,
}

impl Decision {
    fn refused(signatures: Vec<ControlSignature>, digest: Option<String>, r: Refusal) -> Self {
        Decision {
            signatures,
            command_sha256: digest,
            outcome: Err(r),
        }
    }
}

/// Why the operator authority could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlSetupError {
    #[error("gates.control: {0}")]
    Invalid(String),
    #[error("gates.control operator keys: {0}")]
    Jwks(#[from] JwksError),
    #[error("gates.control: {0}")]
    Bucket(#[from] crate::jetstream::NatsError),
    #[error("gates.control: HTTP client: {0}")]
    HttpClient(String),
}

/// The configured operator key set, the rules, and the shared `jti` store.
pub struct OperatorAuthority {
    keys: Arc<JwksStore>,
    jtis: kv::Store,
    scope: String,
    required: usize,
    max_life: u64,
    skew: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A bucket created earlier with a shorter life (a smaller `max_token_life` then) would forget
/// `jti`s of tokens that are still acceptable: lengthen it.
async fn keep_at_least(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
) -> Result<(), crate::jetstream::NatsError> {
    let failed = |e: String| crate::jetstream::NatsError::Bucket {
        bucket: bucket.into(),
        reason: e,
    };
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let config = stream
        .info()
        .await
        .map_err(|e| failed(e.to_string()))?
        .config
        .clone();
    if !config.max_age.is_zero() && config.max_age < max_age {
        tracing::warn!(bucket, from = ?config.max_age, to = ?max_age, "lengthening the jti bucket's max_age");
        let mut longer = config;
        longer.max_age = max_age;
        js.update_stream(&longer)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

impl OperatorAuthority {
    /// Loads the operator keys and opens the `jti` bucket (entries live `max_token_life` plus
    /// twice the skew: longer than any token that could carry them stays acceptable).
    pub async fn open(
        cfg: &ControlGate,
        js: &jetstream::Context,
    ) -> Result<Arc<Self>, ControlSetupError> {
        cfg.validate().map_err(ControlSetupError::Invalid)?;
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(path), _) => JwksSource::File(path.clone()),
            (None, Some(url)) => JwksSource::Url {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(10))
                    .user_agent(concat!("stella-signer/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| ControlSetupError::HttpClient(e.to_string()))?,
            },
            (None, None) => {
                return Err(ControlSetupError::Invalid(
                    "set jwks_file or jwks_url".into(),
                ));
            }
        };
        let keys = JwksStore::open("operators", source, UNKNOWN_KID_REFRESH_INTERVAL).await?;
        keys.spawn_periodic_refresh(cfg.jwks_refresh);
        let remember = cfg.max_token_life + cfg.clock_skew * 2;
        let jtis = crate::jetstream::open_bucket(js, &cfg.jti_bucket, remember).await?;
        keep_at_least(js, &cfg.jti_bucket, remember).await?;
        Ok(Arc::new(OperatorAuthority {
            keys,
            jtis,
            scope: cfg.scope.clone(),
            required: cfg.required_signatures as usize,
            max_life: cfg.max_token_life.as_secs(),
            skew: cfg.clock_skew.as_secs(),
        }))
    }

    /// Decides on `envelope`: authorised (the command) or refused (why), recording the
    /// `jti`s of the counted signatures when authorised.
    pub async fn decide(&self, envelope: &ControlEnvelope) -> Decision {
        let digest = match command_digest(&envelope.command) {
            Ok(d) => d,
            Err(e) => {
                return Decision::refused(
                    vec![],
                    None,
                    Refusal::new(ControlRefusal::Malformed, format!("command: {e}")),
                );
            }
        };
        let mut signatures = Vec::with_capacity(envelope.signatures.len());
        let mut operators: Vec<Operator> = Vec::new();
        let mut first_refusal: Option<Refusal> = None;
        for token in &envelope.signatures {
            let claimed_kid = jws::read_header(token).ok().and_then(|h| h.kid);
            match self.check(token, &digest).await {
                Ok(op) => {
                    let same = operators
                        .iter()
                        .any(|o| o.thumbprint == op.thumbprint || o.sub == op.sub);
                    signatures.push(ControlSignature {
                        kid: op.kid.clone(),
                        sub: Some(op.sub.clone()),
                        jti: Some(op.jti.clone()),
                        counted: !same,
                        refusal: same.then_some(ControlRefusal::NotEnoughSignatures),
                    });
                    if !same {
                        operators.push(op);
                    }
                }
                Err(r) => {
                    signatures.push(ControlSignature {
                        kid: claimed_kid,
                        sub: None,
                        jti: None,
                        counted: false,
                        refusal: Some(r.code),
                    });
                    first_refusal.get_or_insert(r);
                }
            }
        }
        let digest = Some(digest);
        if envelope.signatures.is_empty() {
            let r = Refusal::new(
                ControlRefusal::Unsigned,
                "the command carries no operator signature",
            );
            return Decision::refused(signatures, digest, r);
        }
        let command = match serde_json::from_value::<ControlCommand>(envelope.command.clone()) {
            Ok(c) => c,
            Err(e) => {
                let r = Refusal::new(ControlRefusal::Malformed, format!("command: {e}"));
                return Decision::refused(signatures, digest, r);
            }
        };
        if operators.len() < self.required {
            let r = first_refusal.unwrap_or_else(|| {
                Refusal::new(
                    ControlRefusal::NotEnoughSignatures,
                    format!(
                        "{} distinct operator(s) signed; {} required (distinct key and sub)",
                        operators.len(),
                        self.required
                    ),
                )
            });
            return Decision::refused(signatures, digest, r);
        }
        if let Err(r) = self.spend(&operators, &mut signatures).await {
            return Decision::refused(signatures, digest, r);
        }
        Decision {
            signatures,
            command_sha256: digest,
            outcome: Ok(command),
        }
    }

    /// Records each counted operator's `jti`; the first one seen before refuses the command.
    async fn spend(
        &self,
        operators: &[Operator],
        signatures: &mut [ControlSignature],
    ) -> Result<(), Refusal> {
        for op in operators {
            let key = format!("jti.{}", hex::encode(Sha256::digest(op.jti.as_bytes())));
            let value = serde_json::json!({"sub": op.sub, "kid": op.kid, "usedAt": now()});
            match self.jtis.create(&key, value.to_string().into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    for s in signatures.iter_mut() {
                        if s.jti.as_deref() == Some(op.jti.as_str()) {
                            s.counted = false;
                            s.refusal = Some(ControlRefusal::Replayed);
                        }
                    }
                    return Err(Refusal::new(
                        ControlRefusal::Replayed,
                        format!("jti {:?} of operator {:?} was used before", op.jti, op.sub),
                    ));
                }
                Err(e) => {
                    return Err(Refusal::new(
                        ControlRefusal::Unavailable,
                        format!("recording the jti: {e}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks one signature against the command digest.
    async fn check(&self, token: &str, digest: &str) -> Result<Operator, Refusal> {
        use ControlRefusal as C;
        let header =
            jws::read_header(token).map_err(|e| Refusal::new(C::BadSignature, e.to_string()))?;
        let key = self
            .keys
            .find(header.kid.as_deref())
            .await
            .map_err(|e| match e {
                KeyLookupError::Unavailable(_) => Refusal::new(C::Unavailable, e.to_string()),
                _ => Refusal::new(C::UnknownKey, e.to_string()),
            })?;
        let claims: serde_json::Map<String, Value> = jws::verify(token, &header, &key)
            .map_err(|e| Refusal::new(C::BadSignature, e.to_string()))?;
        if header.typ.as_deref() != Some(CONTROL_TOKEN_TYPE) {
            return Err(Refusal::new(
                C::BadSignature,
                format!("header typ is not {CONTROL_TOKEN_TYPE}"),
            ));
        }
        let scope_ok = claims
            .get("scope")
            .and_then(Value::as_str)
            .is_some_and(|s| s.split_whitespace().any(|x| x == self.scope));
        if !scope_ok {
            return Err(Refusal::new(
                C::WrongScope,
                format!("scope does not contain {}", self.scope),
            ));
        }
        self.check_times(&claims)?;
        if claims.get("cmd").and_then(Value::as_str) != Some(digest) {
            return Err(Refusal::new(
                C::CommandMismatch,
                "the signature's cmd is not the digest of this command",
            ));
        }
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty() && s.len() <= 256)
                .map(str::to_string)
                .ok_or_else(|| Refusal::new(C::CommandMismatch, format!("{name} is missing")))
        };
        Ok(Operator {
            kid: key.kid().map(str::to_string),
            thumbprint: key.thumbprint().to_string(),
            sub: text("sub")?,
            jti: text("jti")?,
        })
    }

    /// `exp` and `iat` are required, `nbf` optional; all within the skew; and the token's
    /// life (`exp - iat`) at most `max_token_life`, so a `jti` need not be kept forever.
    fn check_times(&self, claims: &serde_json::Map<String, Value>) -> Result<(), Refusal> {
        use ControlRefusal as C;
        let date = |name: &str| claims.get(name).and_then(numeric_date);
        let (Some(exp), Some(iat)) = (date("exp"), date("iat")) else {
            return Err(Refusal::new(C::LifetimeTooLong, "exp and iat are required"));
        };
        let t = now();
        if t > exp.saturating_add(self.skew) {
            return Err(Refusal::new(C::Expired, format!("expired at {exp}")));
        }
        if iat > t + self.skew || date("nbf").is_some_and(|nbf| nbf > t + self.skew) {
            return Err(Refusal::new(C::NotYetValid, "iat or nbf is in the future"));
        }
        if exp.saturating_sub(iat) > self.max_life {
            return Err(Refusal::new(
                C::LifetimeTooLong,
                format!("exp - iat is more than {}s", self.max_life),
            ));
        }
        Ok(())
    }
}
