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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesConfig {
    pub entitlement: EntitlementGate,
    pub quota: QuotaGate,
    pub provenance: ProvenanceGate,
}

/// OpTok (Authority token), DPoP and Proof-of-Entitlement.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Redis key prefix of the DPoP replay cache (memory when no [redis]).
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
            dpop_replay_prefix: "signer:dpop:".into(),
            poe: PoeConfig::default(),
        }
    }
}

/// Proof-of-Entitlement (licence) checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaGate {
    pub mode: GateMode,
    /// When Redis fails: `false` (default) refuses with a retryable error; `true` lets jobs
    /// through and records `fail_open` in the audit event.
    pub fail_open: bool,
    /// Redis key prefix of the buckets and counters.
    pub redis_prefix: String,
    /// Plans by name (the PoE's `plan` claim selects one).
    pub plans: BTreeMap<String, Plan>,
}

impl Default for QuotaGate {
    fn default() -> Self {
        QuotaGate {
            mode: GateMode::Enforce,
            fail_open: false,
            redis_prefix: "signer:quota:".into(),
            plans: BTreeMap::new(),
        }
    }
}

/// One plan's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Sustained requests per second (token bucket refill rate).
    pub requests_per_second: f64,
    /// Bucket size: requests that may arrive at once.
    pub burst: u32,
    /// Jobs of one tenant signing at the same time.
    pub max_concurrent: u32,
    /// Largest payload to sign.
    pub max_payload_bytes: u64,
    /// Requests per UTC day (0: no cap).
    #[serde(default)]
    pub daily_cap: u64,
}

/// Scanner release provenance.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
        }
    }
}
