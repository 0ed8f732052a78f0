//! Configuration of the three gates. Every gate enforces unless `mode = "disabled"`; a
//! disabled gate is logged at startup and recorded as `disabled` in results and audit events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

/// A gate's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    /// The gate checks (default).
    #[default]
    Enforce,
    /// The gate lets every job through; logged at startup and recorded as `disabled`.
    Disabled,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesConfig {
    pub entitlement: EntitlementGate,
    pub quota: QuotaGate,
    pub provenance: ProvenanceGate,
    /// Operator authorisation of key commands on `signer.control.keys`. Absent: the
    /// control subject refuses every command (`control_disabled`).
    pub control: Option<ControlGate>,
}

/// Who may change key state: commands on `signer.control.keys` must carry compact JWS
/// signatures by keys of this operator key set (see docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlGate {
    /// Operator public keys as a JWKS file...
    pub jwks_file: Option<PathBuf>,
    /// ...or fetched from a URL (refreshed every `jwks_refresh`, and on an unknown `kid`).
    pub jwks_url: Option<String>,
    #[serde(with = "duration")]
    pub jwks_refresh: Duration,
    /// Required member of the token's `scope` (space separated).
    pub scope: String,
    /// Distinct operators (distinct key and distinct `sub`) that must sign a command.
    pub required_signatures: u32,
    /// Longest accepted token life (`exp - iat`); also how long a `jti` is remembered.
    #[serde(with = "duration")]
    pub max_token_life: Duration,
    /// Tolerated clock difference for `exp`, `nbf`, `iat`.
    #[serde(with = "duration")]
    pub clock_skew: Duration,
    /// JetStream key-value bucket of used `jti`s, shared by every replica.
    pub jti_bucket: String,
}

impl Default for ControlGate {
    fn default() -> Self {
        ControlGate {
            jwks_file: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            scope: "signer.admin".into(),
            required_signatures: 1,
            max_token_life: Duration::from_secs(15 * 60),
            clock_skew: Duration::from_secs(60),
            jti_bucket: "SIGNER_CONTROL_JTI".into(),
        }
    }
}

/// Most signatures `required_signatures` may ask for.
pub const MAX_CONTROL_SIGNATURES: u32 = 16;

impl ControlGate {
    /// Startup checks: one key source, a sensible signature count and token life.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => {
                return Err("gates.control: set jwks_file or jwks_url, not both".into());
            }
            (None, None) => return Err("gates.control: set jwks_file or jwks_url".into()),
            _ => {}
        }
        if !(1..=MAX_CONTROL_SIGNATURES).contains(&self.required_signatures) {
            return Err(format!(
                "gates.control.required_signatures must be 1 to {MAX_CONTROL_SIGNATURES}"
            ));
        }
        if self.max_token_life.is_zero() || self.max_token_life > Duration::from_secs(24 * 3600) {
            return Err("gates.control.max_token_life must be more than 0 and at most 24h".into());
        }
        if self.scope.trim().is_empty() || self.scope.contains(' ') {
            return Err("gates.control.scope must be one scope token".into());
        }
        if self.jti_bucket.is_empty()
            || !self
                .jti_bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            return Err("gates.control.jti_bucket must be [A-Za-z0-9_-]+".into());
        }
        Ok(())
    }
}

/// OpTok (Authority token), DPoP and Proof-of-Entitlement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EntitlementGate {
    pub mode: GateMode,
    /// Expected `iss` of OpToks.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Required member of `scope` (space separated).
    pub scope: String,
    /// Authority signing keys as a JWKS file...
    pub jwks_file: Option<PathBuf>,
    /// ...or fetched from a URL (cached, refreshed every `jwks_refresh`, and on an unknown `kid`).
    pub jwks_url: Option<String>,
    #[serde(with = "duration")]
    pub jwks_refresh: Duration,
    /// Tolerated clock difference for `exp`, `nbf`, `iat`.
    #[serde(with = "duration")]
    pub clock_skew: Duration,
    /// Accept OpToks without `cnf.jkt` (bearer tokens). Off by default: tokens must be
    /// sender-constrained with DPoP. Logged at startup and recorded in affected audit events.
    pub allow_bearer: bool,
    /// DPoP `htu` for the request subject.
    pub dpop_htu: String,
    /// How old (or how far in the future) a DPoP proof's `iat` may be.
    #[serde(with = "duration")]
    pub dpop_max_age: Duration,
    /// Where the DPoP replay records live: `jetstream` (default) or `redis`.
    pub dpop_replay_backend: ReplayBackend,
    /// Key-value bucket of the replay records (backend `jetstream`).
    pub dpop_replay_bucket: String,
    /// Redis key prefix of the replay records (backend `redis`).
    pub dpop_replay_prefix: String,
    pub poe: PoeConfig,
}

impl Default for EntitlementGate {
    fn default() -> Self {
        EntitlementGate {
            mode: GateMode::Enforce,
            issuer: String::new(),
            audience: "signer".into(),
            scope: "signer.sign".into(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            clock_skew: Duration::from_secs(60),
            allow_bearer: false,
            dpop_htu: "nats:sign.requests".into(),
            dpop_max_age: Duration::from_secs(60),
            dpop_replay_backend: ReplayBackend::default(),
            dpop_replay_bucket: "SIGNER_DPOP".into(),
            dpop_replay_prefix: "signer:dpop:".into(),
            poe: PoeConfig::default(),
        }
    }
}

/// Where the DPoP replay records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayBackend {
    /// A JetStream key-value bucket: replicated and on disk like the jobs (default).
    #[default]
    Jetstream,
    /// Redis (`[redis]` must be set): only as durable as its persistence.
    Redis,
}

impl EntitlementGate {
    /// How long a replay record must live so that no copy of a proof can outwait it: a copy
    /// may be published up to `iat + dpop_max_age` and wait `max_queue_age` in the stream,
    /// while the first use may come as early as `iat - dpop_max_age`. See
    /// [`crate::replay::record_lifetime`].
    pub fn replay_lifetime(&self, max_queue_age: Duration) -> Duration {
        crate::replay::record_lifetime(self.dpop_max_age, max_queue_age, self.clock_skew)
    }
}

/// Proof-of-Entitlement (licence) checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoeConfig {
    /// Licensing public keys (JWKS) for `format: jwt`.
    pub licensing_jwks_file: Option<PathBuf>,
    /// Licensing service for `format: introspect` (`POST <url>/license/introspect`).
    pub introspect_url: Option<String>,
    /// How long an introspection verdict is reused.
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    /// During a licensing outage, how long past its TTL a cached verdict still counts.
    #[serde(with = "duration")]
    pub grace: Duration,
    /// Emergency bypass: PoE is not checked; every such decision is audited as `bypassed`.
    pub bypass: bool,
    /// Plan recorded for bypassed decisions (selects the quota plan).
    pub bypass_plan: String,
}

impl Default for PoeConfig {
    fn default() -> Self {
        PoeConfig {
            licensing_jwks_file: None,
            introspect_url: None,
            cache_ttl: Duration::from_secs(300),
            grace: Duration::from_secs(3600),
            bypass: false,
            bypass_plan: "bypass".into(),
        }
    }
}

/// Plan quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaGate {
    pub mode: GateMode,
    /// When Redis fails: `false` (default) refuses with a retryable error; `true` lets jobs
    /// through and records `fail_open` in the audit event.
    pub fail_open: bool,
    /// Redis key prefix of the buckets and counters.
    pub redis_prefix: String,
    /// Most quota requests the Quota actor sends to the store in one batch (with Redis: one
    /// round trip). At least 1.
    pub batch_max: usize,
    /// Plans by name (the PoE's `plan` claim selects one).
    pub plans: BTreeMap<String, Plan>,
}

impl Default for QuotaGate {
    fn default() -> Self {
        QuotaGate {
            mode: GateMode::Enforce,
            fail_open: false,
            redis_prefix: "signer:quota:".into(),
            batch_max: signer_actors::ports::QUOTA_BATCH_MAX,
            plans: BTreeMap::new(),
        }
    }
}

/// One plan's limits. Rates and the daily cap count **signatures**: a job signed by a
/// profile of two keys takes two units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Sustained signatures per second (token bucket refill rate). The name predates
    /// per-signature charging; a one-key job is one request and one signature.
    pub requests_per_second: f64,
    /// Bucket size: signatures that may be made at once.
    pub burst: u32,
    /// Jobs of one tenant signing at the same time (one slot per job, whatever its keys).
    pub max_concurrent: u32,
    /// Largest payload to sign.
    pub max_payload_bytes: u64,
    /// Signatures per UTC day (0: no cap).
    #[serde(default)]
    pub daily_cap: u64,
    /// Most signatures (keys of the profile) one request may ask for; none: no cap beyond
    /// `burst` and `daily_cap`. A request over it is refused with `entitlement_denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_signatures_per_request: Option<u32>,
}

/// Scanner release provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvenanceGate {
    pub mode: GateMode,
    /// Release public keys (SPKI PEM files) whose signature makes a scanner image trusted.
    pub trusted_keys: Vec<PathBuf>,
    /// Image digests trusted without asking a registry (offline kits).
    pub allowlist: Vec<String>,
    /// How long a verdict is reused.
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    /// Registries reached over plain HTTP (e.g. a local test registry `127.0.0.1:5000`).
    pub insecure_registries: Vec<String>,
    /// Time limit of one registry request.
    #[serde(with = "duration")]
    pub registry_timeout: Duration,
    /// Docker `config.json` whose `auths` hold registry credentials. Unset: the file in
    /// `$DOCKER_CONFIG`, if that is set and the file exists; otherwise registries are read
    /// anonymously.
    pub docker_config: Option<PathBuf>,
    /// Registry credentials from environment variables; they win over `docker_config`.
    pub registry_credentials: Vec<RegistryCredentialsEnv>,
    /// Signatures a DSSE envelope may carry, and signature layers a signature manifest may
    /// have. More is refused (`provenance_untrusted`) before any signature is checked.
    pub max_envelope_signatures: usize,
    /// Entries an image's referrers list may have; a longer list is refused unread.
    pub max_referrers: usize,
    /// Registry lookups one tenant may have running at once (per replica). More wait, so
    /// that one tenant's slow or hostile registry cannot take the gate from the others.
    pub tenant_lookups: usize,
    /// How long a job waits for one of its tenant's lookups; then it fails
    /// `provenance_unavailable` (retryable).
    #[serde(with = "duration")]
    pub tenant_wait: Duration,
}

/// Credentials for one registry, read from two environment variables at startup (so the
/// password stays out of the configuration file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentialsEnv {
    /// `host[:port]`, as in `scanner.repository`.
    pub registry: String,
    /// Variable holding the user name.
    pub username_env: String,
    /// Variable holding the password (or token used as a password).
    pub password_env: String,
}

impl Default for ProvenanceGate {
    fn default() -> Self {
        ProvenanceGate {
            mode: GateMode::Enforce,
            trusted_keys: Vec::new(),
            allowlist: Vec::new(),
            cache_ttl: Duration::from_secs(600),
            insecure_registries: Vec::new(),
            registry_timeout: Duration::from_secs(10),
            docker_config: None,
            registry_credentials: Vec::new(),
            max_envelope_signatures: crate::provenance::formats::DEFAULT_MAX_ENVELOPE_SIGNATURES,
            max_referrers: 64,
            tenant_lookups: 4,
            tenant_wait: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_gate_needs_one_key_source_and_sane_limits() {
        let ok = ControlGate {
            jwks_file: Some("operators.json".into()),
            ..ControlGate::default()
        };
        ok.validate().unwrap();
        let bad = [
            ControlGate::default(),
            ControlGate {
                jwks_url: Some("https://keys.example/jwks.json".into()),
                ..ok.clone()
            },
            ControlGate {
                required_signatures: 0,
                ..ok.clone()
            },
            ControlGate {
                required_signatures: MAX_CONTROL_SIGNATURES + 1,
                ..ok.clone()
            },
            ControlGate {
                max_token_life: Duration::ZERO,
                ..ok.clone()
            },
            ControlGate {
                max_token_life: Duration::from_secs(2 * 24 * 3600),
                ..ok.clone()
            },
            ControlGate {
                scope: "signer.admin extra".into(),
                ..ok.clone()
            },
            ControlGate {
                jti_bucket: "a.b".into(),
                ..ok.clone()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
        let parsed: GatesConfig = toml::from_str(
            "[control]\njwks_file = \"ops.json\"\nrequired_signatures = 2\nmax_token_life = \"5m\"\n",
        )
        .unwrap();
        let c = parsed.control.unwrap();
        assert_eq!(
            (c.required_signatures, c.max_token_life),
            (2, Duration::from_secs(300))
        );
        assert!(toml::from_str::<GatesConfig>("[control]\njwks_fil = \"x\"\n").is_err());
    }
}
