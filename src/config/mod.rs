//! `signer.toml`: typed configuration with defaults, `SIGNER_*` environment overrides and
//! validation at startup, so a mistake stops the service before it takes a job.
//!
//! Environment overrides name a key path with `__` between levels, upper case:
//! `SIGNER_NATS__URL=nats://nats:4222`, `SIGNER_WORKER__MAX_INFLIGHT=512`. A value is read
//! as a TOML literal when it parses as one (`512`, `true`, `["a","b"]`), else as a string.
//!
//! Every table refuses settings it does not know. Validation checks values only and reads no
//! file (the key factory reads the key files when `serve` starts). [`Config::to_toml`]
//! writes a configuration that reads back as the same value (tests build theirs that way).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use signer_actors::policy::SigningPolicy;
use signer_actors::profiles::{ProfileKeys, ProfileTable};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("configuration: cannot write it as TOML: {0}")]
    Write(#[source] toml::ser::Error),
}

pub mod gates;
pub mod keys;
pub mod kit;

pub use gates::{
    ControlGate, EntitlementGate, GateMode, GatesConfig, Plan, PoeConfig, ProvenanceGate,
    QuotaGate, RegistryCredentialsEnv, ReplayBackend,
};
pub use keys::{
    FileKeyConfig, FulcioKeyConfig, KEYLESS_HTTP_TIMEOUT, KEYLESS_RENEW_BEFORE, KeyConfig,
    MAX_KEY_SESSIONS, PinSource, PivSlot, Pkcs11KeyConfig, Pkcs11Object, YubikeyKeyConfig,
};
pub use kit::KitConfig;

pub(crate) mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub worker: WorkerConfig,
    pub idempotency: IdempotencyConfig,
    pub redis: Option<RedisConfig>,
    pub http: HttpConfig,
    pub gates: GatesConfig,
    #[serde(deserialize_with = "keys::deserialize_keys")]
    pub keys: Vec<KeyConfig>,
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// The offline kit (`kit export`); absent: no kit can be exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kit: Option<KitConfig>,
}

/// NATS connection, streams, subjects and the durable consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The NATS server, or a comma-separated list of the servers of a cluster
    /// (`nats://a:4222,nats://b:4222`): the client connects to any that answers and moves to
    /// another when its server goes away. See [`NatsConfig::servers`].
    pub url: String,
    /// Prepended to every subject (`<prefix>sign.requests`); empty in production. Lets
    /// several signer deployments (or test runs) share one NATS without colliding.
    pub subject_prefix: String,
    pub requests_stream: String,
    pub results_stream: String,
    pub audit_stream: String,
    /// Key-value bucket of key state shared by replicas (loaded keys, revocations).
    pub keys_bucket: String,
    pub consumer: String,
    /// Deliveries per job before a retryable failure is published as final.
    pub max_deliver: u64,
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    #[serde(with = "duration")]
    pub results_max_age: Duration,
    #[serde(with = "duration")]
    pub duplicate_window: Duration,
    #[serde(with = "duration")]
    pub audit_max_age: Duration,
    /// Credentials file (`.creds`) for NATS, when the server requires one.
    pub credentials: Option<PathBuf>,
    /// Object Store bucket of large artefacts: `payloadRef` objects are read from it,
    /// results too large to publish inline are stored in it
    /// (`docs/contract.md#large-artefacts`). Created when missing; an existing bucket is
    /// left as it is.
    pub blobs_bucket: String,
    /// How long objects live in a bucket `serve` creates (its TTL).
    #[serde(with = "duration")]
    pub blobs_max_age: Duration,
}

impl NatsConfig {
    /// The servers `url` names: its comma-separated entries, trimmed, empty ones left out.
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: String::new(),
            requests_stream: "SIGN_REQUESTS".into(),
            results_stream: "SIGN_RESULTS".into(),
            audit_stream: "SIGNER_AUDIT".into(),
            keys_bucket: "SIGNER_KEYS".into(),
            consumer: "signer".into(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            results_max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            audit_max_age: Duration::from_secs(400 * 24 * 3600),
            credentials: None,
            blobs_bucket: signer_actors::objects::DEFAULT_BUCKET.into(),
            blobs_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl NatsConfig {
    pub fn subject(&self, base: &str) -> String {
        format!("{}{base}", self.subject_prefix)
    }
}

/// Smallest `worker.max_inline_result_bytes`: a refusal or a one-key result of a small
/// statement must always fit inline.
pub const MIN_INLINE_RESULT_BYTES: usize = 16 << 10;

/// Most events `worker.audit_batch_max` may put in one audit message (messages are split
/// below the server's `max_payload` anyway; this bounds the work one message holds up).
pub const MAX_AUDIT_BATCH: usize = 4096;

/// How one replica works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Name in logs, audit events and leases; default `<hostname>-<pid>-<random>`.
    pub id: Option<String>,
    pub max_inflight: usize,
    pub max_body_bytes: usize,
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    #[serde(with = "duration")]
    pub backoff_base: Duration,
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    /// Most audit events in one message (1 to [`MAX_AUDIT_BATCH`]); 1 publishes every
    /// event on its own.
    pub audit_batch_max: usize,
    /// Longest time an audit event waits for its batch.
    #[serde(with = "duration")]
    pub audit_flush_interval: Duration,
    /// A job published longer ago than this when a worker takes it is refused with
    /// `request_expired` instead of being judged (its credentials are judged as of its
    /// publish time, so this bounds how far back that may be).
    #[serde(with = "duration")]
    pub max_queue_age: Duration,
    /// On a job's last delivery, how long it keeps retrying to store its outcome (audit
    /// event, result) while the store is unavailable; then the message is terminated
    /// (`+TERM`), logged and counted, instead of holding its slot for ever.
    #[serde(with = "duration")]
    pub retry_budget: Duration,
    /// The longest one job may hold its in-flight slot; then its work is dropped and the
    /// message NAKed (terminated on its last delivery). Longer than `retry_budget`.
    #[serde(with = "duration")]
    pub job_timeout: Duration,
    /// Largest object a request's `payloadRef` may name, whatever its plan allows (the
    /// plan's `max_payload_bytes` applies too). Checked against the declared size before
    /// the object is read.
    pub max_payload_ref_bytes: u64,
    /// Largest encoded result published inline; a larger one carries `envelopeRef` /
    /// `bundleRefs` to objects of `nats.blobs_bucket`. Default: the server's
    /// `max_payload` less 64 KiB for headers.
    pub max_inline_result_bytes: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            max_inflight: 256,
            max_body_bytes: 1 << 20,
            drain_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            audit_batch_max: 256,
            audit_flush_interval: Duration::ZERO,
            max_queue_age: Duration::from_secs(24 * 3600),
            retry_budget: Duration::from_secs(60),
            job_timeout: Duration::from_secs(300),
            max_payload_ref_bytes: signer_actors::pipeline::DEFAULT_MAX_PAYLOAD_REF_BYTES,
            max_inline_result_bytes: None,
        }
    }
}

/// Where idempotency records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdempotencyBackend {
    /// Redis (`[redis]` must be set), shared by all replicas; only as durable as its
    /// persistence.
    Redis,
    /// A JetStream key-value bucket, replicated and on disk like the jobs (the default).
    Jetstream,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// `jetstream` (default, also when `[redis]` is configured) or `redis`.
    pub backend: Option<IdempotencyBackend>,
    /// How long a finished request is remembered.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// How long a job attempt's claim on its request lasts unless renewed (it is renewed
    /// every third of it while the job works). It must outlast the store outages a replica
    /// should ride out (a JetStream leader election, a Redis failover): a lease that expires
    /// while its holder cannot reach the store may be taken over by a redelivery, which then
    /// signs again. The cost of a long lease: the requests a crashed replica held wait this
    /// long before another replica takes them over.
    #[serde(with = "duration")]
    pub lease: Duration,
    pub bucket: String,
    pub redis_prefix: String,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            backend: None,
            ttl: Duration::from_secs(7 * 24 * 3600),
            lease: Duration::from_secs(30),
            bucket: "SIGNER_IDEMPOTENCY".into(),
            redis_prefix: "signer:idem:".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/metrics`, `/healthz`, `/readyz`; empty to disable.
    pub listen: String,
    /// How often `/readyz`'s probes ask Redis and the JetStream stores whether they answer,
    /// so an idle replica notices an outage (and its end) without a job to fail.
    #[serde(with = "duration")]
    pub probe_interval: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
            probe_interval: Duration::from_secs(5),
        }
    }
}

/// A signing profile: the keys that sign, one signature each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub keys: Vec<String>,
    /// Tenant -> the keys that sign this profile's jobs of that tenant instead.
    #[serde(default)]
    pub tenants: BTreeMap<String, Vec<String>>,
    /// Plan -> the keys that sign this profile's jobs on that plan (a tenant entry wins).
    #[serde(default)]
    pub plans: BTreeMap<String, Vec<String>>,
    /// The tenants that may use this profile (absent: every tenant). Others naming it are
    /// refused with `entitlement_denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_tenants: Option<BTreeSet<String>>,
    /// The plans (of the verified licence) whose tenants may use this profile (absent: every
    /// plan). With both lists, a job must be admitted by both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plans: Option<BTreeSet<String>>,
    /// The predicate types the profile signs (absent: any, raw payloads too). Others are
    /// refused with `invalid_request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate_types: Option<BTreeSet<String>>,
    /// Report predicates must carry `options.policyDigest` and `options.viewSet`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_policy: bool,
    /// The policy digests (`sha256:<hex>`) a report predicate may carry (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_policy_digests: Option<BTreeSet<String>>,
}

impl ProfileConfig {
    /// What the profile signs, as the pipeline checks it.
    pub fn signing_policy(&self) -> SigningPolicy {
        SigningPolicy {
            predicate_types: self.predicate_types.clone(),
            require_policy: self.require_policy,
            allowed_policy_digests: self.allowed_policy_digests.clone(),
        }
    }

    /// A profile signed by `keys`, for every tenant and plan, without refinements.
    pub fn new<K: Into<String>>(keys: impl IntoIterator<Item = K>) -> Self {
        ProfileConfig {
            keys: keys.into_iter().map(Into::into).collect(),
            tenants: BTreeMap::new(),
            plans: BTreeMap::new(),
            allow_tenants: None,
            allow_plans: None,
            predicate_types: None,
            require_policy: false,
            allowed_policy_digests: None,
        }
    }
}

impl Config {
    /// Reads a file, applies `SIGNER_*` overrides from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, env)
    }

    /// Parses TOML text, applies overrides, validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let cfg = Self::parse(text, env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML text that [`Config::from_toml`] reads back as `self`.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(ConfigError::Write)
    }

    /// Parses TOML text and applies overrides without validating (for the client
    /// commands, which need only the [nats] section and never load keys).
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut doc, env)?;
        doc.try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))
    }

    /// Checks the values serde cannot: URLs, names, profiles, limits. Reads no file: key
    /// files, chains and Fulcio roots are checked by the key factory
    /// (`keys::factory::ConfiguredKeys::check`) when `serve` starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.nats.servers().is_empty() {
            return invalid("nats.url names no server".into());
        }
        for server in self.nats.servers() {
            check_url(server, &["nats", "tls", "ws", "wss"], "nats.url")?;
        }
        if let Some(r) = &self.redis {
            check_url(&r.url, &["redis", "rediss"], "redis.url")?;
        }
        if self.idempotency.lease < Duration::from_secs(1) {
            return invalid("idempotency.lease must be at least 1s".into());
        }
        if self.idempotency.backend == Some(IdempotencyBackend::Redis) && self.redis.is_none() {
            return invalid("idempotency.backend = \"redis\" needs a [redis] section".into());
        }
        let entitlement = &self.gates.entitlement;
        if entitlement.mode == GateMode::Enforce {
            match entitlement.dpop_replay_backend {
                ReplayBackend::Redis if self.redis.is_none() => {
                    return invalid(
                        "gates.entitlement.dpop_replay_backend = \"redis\" needs a [redis] section"
                            .into(),
                    );
                }
                ReplayBackend::Jetstream if !is_bucket_name(&entitlement.dpop_replay_bucket) => {
                    return invalid(format!(
                        "gates.entitlement.dpop_replay_bucket {:?} must be 1 to 64 characters of [A-Za-z0-9_-]",
                        entitlement.dpop_replay_bucket
                    ));
                }
                _ => {}
            }
        }
        if self.worker.max_inflight == 0 {
            return invalid("worker.max_inflight must be at least 1".into());
        }
        if self.worker.max_queue_age < Duration::from_secs(1) {
            return invalid("worker.max_queue_age must be at least 1s".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.http.probe_interval) {
            return invalid("http.probe_interval must be between 1s and 1m".into());
        }
        if self.worker.retry_budget < Duration::from_secs(1) {
            return invalid("worker.retry_budget must be at least 1s".into());
        }
        if self.worker.job_timeout <= self.worker.retry_budget {
            return invalid(format!(
                "worker.job_timeout ({}) must be longer than worker.retry_budget ({})",
                humantime::format_duration(self.worker.job_timeout),
                humantime::format_duration(self.worker.retry_budget)
            ));
        }
        if self.worker.drain_timeout < Duration::from_secs(1) {
            return invalid("worker.drain_timeout must be at least 1s".into());
        }
        if !signer_actors::objects::is_valid_bucket(&self.nats.blobs_bucket) {
            return invalid("nats.blobs_bucket must be 1 to 64 characters of [A-Za-z0-9_-]".into());
        }
        if self.nats.blobs_max_age < Duration::from_secs(60) {
            return invalid("nats.blobs_max_age must be at least 1m".into());
        }
        if !(1..=MAX_AUDIT_BATCH).contains(&self.worker.audit_batch_max) {
            return invalid(format!(
                "worker.audit_batch_max must be between 1 and {MAX_AUDIT_BATCH}"
            ));
        }
        if self.worker.max_payload_ref_bytes == 0 {
            return invalid("worker.max_payload_ref_bytes must be at least 1".into());
        }
        if let Some(n) = self.worker.max_inline_result_bytes
            && n < MIN_INLINE_RESULT_BYTES
        {
            return invalid(format!(
                "worker.max_inline_result_bytes must be at least {MIN_INLINE_RESULT_BYTES}"
            ));
        }
        if self.nats.max_deliver == 0 {
            return invalid("nats.max_deliver must be at least 1".into());
        }
        if self.nats.duplicate_window < Duration::from_secs(120) {
            return invalid(
                "nats.duplicate_window must be at least 2m (the contract's minimum)".into(),
            );
        }
        if let Some(control) = &self.gates.control {
            control.validate().map_err(ConfigError::Invalid)?;
        }
        if self.keys.is_empty() {
            return invalid("no [[keys]] configured".into());
        }
        let mut names = std::collections::HashSet::new();
        for key in &self.keys {
            let name = key.name();
            if !names.insert(name) {
                return invalid(format!("key {name:?} is configured twice"));
            }
            if !(1..=MAX_KEY_SESSIONS).contains(&key.sessions()) {
                return invalid(format!(
                    "key {name:?}: sessions = {} is out of range (1 to {MAX_KEY_SESSIONS})",
                    key.sessions()
                ));
            }
            // What each source needs is in its type; its files (and Fulcio) are the key
            // factory's to read.
            if let KeyConfig::Fulcio(k) = key {
                check_url(
                    &k.fulcio_url,
                    &["http", "https"],
                    &format!("key {name:?}: fulcio_url"),
                )?;
                if let Some(tsa) = &k.tsa_url {
                    check_url(tsa, &["http", "https"], &format!("key {name:?}: tsa_url"))?;
                }
            }
        }
        if let Some(kit) = &self.kit {
            match self.keys.iter().find(|k| k.name() == kit.key) {
                None => return invalid(format!("kit.key names unknown key {:?}", kit.key)),
                Some(KeyConfig::Fulcio(_)) => {
                    return invalid(format!(
                        "kit.key {:?} is a fulcio key: a kit key must be one a verifier can pin",
                        kit.key
                    ));
                }
                Some(_) => {}
            }
        }
        if !self.profiles.contains_key("default") {
            return invalid("no [profiles.default]".into());
        }
        for (name, profile) in &self.profiles {
            if !signer_actors::request::is_valid_profile(name) {
                return invalid(format!(
                    "profile name {name:?} must be 1 to 64 characters of [A-Za-z0-9._-]"
                ));
            }
            if profile.keys.is_empty() {
                return invalid(format!("profile {name:?} has no keys"));
            }
            if let Some(t) = profile
                .tenants
                .keys()
                .find(|t| !signer_actors::request::is_valid_tenant(t))
            {
                return invalid(format!(
                    "profile {name:?}: tenant {t:?} must be 1 to 64 characters of [A-Za-z0-9_-]"
                ));
            }
            let refinements = profile.tenants.iter().chain(&profile.plans);
            if let Some((who, _)) = refinements.clone().find(|(_, keys)| keys.is_empty()) {
                return invalid(format!("profile {name:?}: {who:?} has no keys"));
            }
            let mut all = profile
                .keys
                .iter()
                .chain(refinements.flat_map(|(_, keys)| keys));
            if let Some(k) = all.find(|k| !names.contains(k.as_str())) {
                return invalid(format!("profile {name:?} names unknown key {k:?}"));
            }
            self.validate_access(name, profile)?;
            profile
                .signing_policy()
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("profile {name:?}: {e}")))?;
        }
        Ok(())
    }

    /// Checks a profile's allow lists: not empty (a profile no one may use is a mistake),
    /// tenant names well formed, plans known to the quota gate when it enforces, and no
    /// tenant or plan refinement for someone the lists shut out (keys no job could use).
    fn validate_access(&self, name: &str, profile: &ProfileConfig) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Some(tenants) = &profile.allow_tenants {
            if tenants.is_empty() {
                return invalid(format!(
                    "profile {name:?}: allow_tenants is empty (no one could use the profile; \
                     remove the list to open it to every tenant)"
                ));
            }
            if let Some(t) = tenants
                .iter()
                .find(|t| !signer_actors::request::is_valid_tenant(t))
            {
                return invalid(format!(
                    "profile {name:?}: allow_tenants: tenant {t:?} must be 1 to 64 characters of [A-Za-z0-9_-]"
                ));
            }
            if let Some(t) = profile.tenants.keys().find(|t| !tenants.contains(*t)) {
                return invalid(format!(
                    "profile {name:?}: tenant {t:?} has keys but is not in allow_tenants"
                ));
            }
        }
        if let Some(plans) = &profile.allow_plans {
            if plans.is_empty() {
                return invalid(format!(
                    "profile {name:?}: allow_plans is empty (no one could use the profile; \
                     remove the list to open it to every plan)"
                ));
            }
            let quota = &self.gates.quota;
            if quota.mode == GateMode::Enforce
                && let Some(p) = plans.iter().find(|p| !quota.plans.contains_key(*p))
            {
                return invalid(format!(
                    "profile {name:?}: allow_plans names plan {p:?}, which is not in [gates.quota.plans]"
                ));
            }
            if let Some(p) = profile.plans.keys().find(|p| !plans.contains(*p)) {
                return invalid(format!(
                    "profile {name:?}: plan {p:?} has keys but is not in allow_plans"
                ));
            }
        }
        Ok(())
    }

    /// Profiles as the pipeline wants them.
    pub fn profile_table(&self) -> ProfileTable {
        let map = |m: &BTreeMap<String, Vec<String>>| {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        ProfileTable::new(
            self.profiles
                .iter()
                .map(|(name, p)| {
                    let keys = ProfileKeys {
                        keys: p.keys.clone(),
                        tenants: map(&p.tenants),
                        plans: map(&p.plans),
                        allow_tenants: p.allow_tenants.clone(),
                        allow_plans: p.allow_plans.clone(),
                        signs: p.signing_policy(),
                    };
                    (name.clone(), keys)
                })
                .collect(),
        )
    }

    /// The idempotency backend in effect: JetStream unless Redis is chosen explicitly (a
    /// Redis without persistence would forget, on restart, which requests were signed).
    pub fn idempotency_backend(&self) -> IdempotencyBackend {
        self.idempotency
            .backend
            .unwrap_or(IdempotencyBackend::Jetstream)
    }

    /// How long a DPoP replay record lives (see [`EntitlementGate::replay_lifetime`]).
    pub fn dpop_replay_lifetime(&self) -> Duration {
        self.gates
            .entitlement
            .replay_lifetime(self.worker.max_queue_age)
    }
}

/// A JetStream key-value bucket name (the server allows `[A-Za-z0-9_-]`).
fn is_bucket_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_url(url: &str, schemes: &[&str], field: &str) -> Result<(), ConfigError> {
    let ok = url.split_once("://").is_some_and(|(scheme, rest)| {
        schemes.contains(&scheme) && !rest.is_empty() && !rest.contains(' ')
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{field} {url:?} is not a URL with scheme {}",
            schemes.join("|")
        )))
    }
}

/// Applies `SIGNER_A__B=value` as `a.b = value`.
fn apply_env(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in env {
        let Some(path) = var.strip_prefix("SIGNER_") else {
            continue;
        };
        // Only `SECTION__KEY` names are overrides; `SIGNER_LOG`, `SIGNER_CONFIG` and other
        // single-word SIGNER_* variables belong to the process, not to the file.
        if !path.contains("__") {
            continue;
        }
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw.clone()));
        let mut table = &mut *doc;
        for k in &keys[..keys.len() - 1] {
            let entry = table
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                reason: format!("{k} is not a table"),
            })?;
        }
        table.insert(keys[keys.len() - 1].clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One file key `k` (never read: validation reads no file) and the default profile.
    const BASE: &str = "[[keys]]\nname = \"k\"\nsource = \"file\"\npath = \"/nonexistent/k.key\"\n\n\
        [profiles.default]\nkeys = [\"k\"]\n";

    fn base() -> String {
        BASE.to_string()
    }

    #[test]
    fn the_kit_key_must_be_a_configured_key_a_verifier_can_pin() {
        let kit = |section: &str| Config::from_toml(&format!("{BASE}\n{section}"), []);
        let cfg = kit("[kit]\nkey = \"k\"\ntsa_roots = [\"/etc/tsa.pem\"]\n").unwrap();
        let k = cfg.kit.as_ref().unwrap();
        assert_eq!((k.key.as_str(), k.tsa_roots.len()), ("k", 1));
        assert_eq!(Config::from_toml(&cfg.to_toml().unwrap(), []).unwrap(), cfg);
        assert!(Config::from_toml(&base(), []).unwrap().kit.is_none());
        let err = kit("[kit]\nkey = \"nope\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown key \"nope\""), "{err}");
        let err = kit("[kit]\nkey = \"k\"\nroots = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
        let keyless = "[[keys]]\nname = \"kl\"\nsource = \"fulcio\"\nfulcio_url = \"https://fulcio.example\"\n\
            identity_token_file = \"/t\"\nfulcio_roots = \"/r\"\n\n[kit]\nkey = \"kl\"\n";
        let err = kit(keyless).unwrap_err().to_string();
        assert!(err.contains("is a fulcio key"), "{err}");
    }

    #[test]
    fn defaults_env_overrides_and_validation() {
        let text = base();
        let cfg = Config::from_toml(&text, []).unwrap();
        assert_eq!(cfg.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(
            cfg.gates.quota.mode,
            GateMode::Enforce,
            "gates enforce unless configured otherwise"
        );
        let env = [
            (
                "SIGNER_NATS__URL".to_string(),
                "nats://nats:4222".to_string(),
            ),
            ("SIGNER_WORKER__MAX_INFLIGHT".to_string(), "7".to_string()),
            ("SIGNER_NATS__ACK_WAIT".to_string(), "10s".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let cfg = Config::from_toml(&text, env).unwrap();
        assert_eq!(cfg.nats.url, "nats://nats:4222");
        assert_eq!(cfg.worker.max_inflight, 7);
        assert_eq!(cfg.nats.ack_wait, Duration::from_secs(10));
    }

    #[test]
    fn blob_bucket_and_large_artefact_limits_default_parse_and_are_validated() {
        let text = base();
        let cfg = Config::from_toml(&text, []).unwrap();
        assert_eq!(cfg.nats.blobs_bucket, "SIGNER_BLOBS");
        assert_eq!(cfg.nats.blobs_max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(cfg.worker.max_payload_ref_bytes, 64 << 20);
        assert_eq!(cfg.worker.max_inline_result_bytes, None);
        let with = format!(
            "{text}\n[nats]\nblobs_bucket = \"BLOBS_EU\"\nblobs_max_age = \"2d\"\n[worker]\nmax_payload_ref_bytes = 1000000\nmax_inline_result_bytes = 500000\n"
        );
        let cfg = Config::from_toml(&with, []).unwrap();
        assert_eq!(cfg.nats.blobs_bucket, "BLOBS_EU");
        assert_eq!(cfg.nats.blobs_max_age, Duration::from_secs(2 * 24 * 3600));
        assert_eq!(cfg.worker.max_payload_ref_bytes, 1_000_000);
        assert_eq!(cfg.worker.max_inline_result_bytes, Some(500_000));
        for (key, value, says) in [
            ("SIGNER_NATS__BLOBS_BUCKET", "a.b", "nats.blobs_bucket"),
            ("SIGNER_NATS__BLOBS_MAX_AGE", "1s", "nats.blobs_max_age"),
            (
                "SIGNER_WORKER__MAX_PAYLOAD_REF_BYTES",
                "0",
                "worker.max_payload_ref_bytes",
            ),
            (
                "SIGNER_WORKER__MAX_INLINE_RESULT_BYTES",
                "100",
                "worker.max_inline_result_bytes",
            ),
        ] {
            let err = Config::from_toml(&text, [(key.to_string(), value.to_string())])
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{key}={value}: {err}");
        }
    }

    #[test]
    fn max_queue_age_defaults_to_a_day_parses_humantime_and_must_be_positive() {
        let text = base();
        let cfg = Config::from_toml(&text, []).unwrap();
        assert_eq!(cfg.worker.max_queue_age, Duration::from_secs(24 * 3600));
        let env = |v: &str| [("SIGNER_WORKER__MAX_QUEUE_AGE".to_string(), v.to_string())];
        let cfg = Config::from_toml(&text, env("90m")).unwrap();
        assert_eq!(cfg.worker.max_queue_age, Duration::from_secs(90 * 60));
        let err = Config::from_toml(&text, env("0s")).unwrap_err().to_string();
        assert!(err.contains("worker.max_queue_age"), "{err}");
        let err = Config::from_toml(&text, env("soon"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn the_idempotency_lease_is_its_own_setting_of_at_least_a_second() {
        let text = base();
        let cfg = Config::from_toml(&text, []).unwrap();
        assert_eq!(cfg.idempotency.lease, Duration::from_secs(30));
        let env = |v: &str| [("SIGNER_IDEMPOTENCY__LEASE".to_string(), v.to_string())];
        let cfg = Config::from_toml(&text, env("2m")).unwrap();
        assert_eq!(cfg.idempotency.lease, Duration::from_secs(120));
        let p = crate::serve::pipeline_config(&cfg, "w".into(), 5, Duration::from_secs(5));
        assert_eq!(
            p.lease,
            Duration::from_secs(120),
            "not derived from ack_wait"
        );
        assert_eq!(p.ack_wait, Duration::from_secs(5));
        let err = Config::from_toml(&text, env("500ms"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("idempotency.lease"), "{err}");
    }

    #[test]
    fn nats_url_may_list_the_servers_of_a_cluster() {
        let text = base();
        let env = |v: &str| [("SIGNER_NATS__URL".to_string(), v.to_string())];
        let cfg =
            Config::from_toml(&text, env("nats://a:4222, nats://b:4223,nats://c:4224")).unwrap();
        assert_eq!(
            cfg.nats.servers(),
            vec!["nats://a:4222", "nats://b:4223", "nats://c:4224"]
        );
        let cfg = Config::from_toml(&text, env("tls://one:4222")).unwrap();
        assert_eq!(cfg.nats.servers(), vec!["tls://one:4222"]);
        let err = Config::from_toml(&text, env("nats://a:4222,http://b"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nats.url") && err.contains("http://b"),
            "{err}"
        );
        let err = Config::from_toml(&text, env(" , "))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats.url names no server"), "{err}");
    }

    #[test]
    fn mistakes_are_reported_with_a_clear_message() {
        let text = base();
        let err = |t: &str, env: Vec<(String, String)>| {
            Config::from_toml(t, env).unwrap_err().to_string()
        };
        assert!(
            err(&format!("{text}\n[worker]\nmax_inflite = 3\n"), vec![])
                .contains("unknown field `max_inflite`")
        );
        assert!(
            err(&text, vec![("SIGNER_NATS__URL".into(), "http//x".into())]).contains("nats.url")
        );
        let mut unknown = Config::from_toml(&text, []).unwrap();
        unknown
            .profiles
            .insert("default".into(), ProfileConfig::new(["nope"]));
        let e = unknown.validate().unwrap_err().to_string();
        assert!(e.contains("unknown key \"nope\""), "{e}");
        let mut twice = Config::from_toml(&text, []).unwrap();
        twice.keys.push(twice.keys[0].clone());
        let e = twice.validate().unwrap_err().to_string();
        assert!(e.contains("key \"k\" is configured twice"), "{e}");
        assert!(
            err(
                &format!("{text}\n[idempotency]\nbackend = \"redis\"\n"),
                vec![]
            )
            .contains("[redis]")
        );
    }

    /// A configuration with every optional section present and a key of every source.
    fn everything() -> Config {
        let mut cfg = Config::from_toml(&base(), []).unwrap();
        cfg.redis = Some(RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
        });
        cfg.worker.id = Some("w".into());
        cfg.idempotency.backend = Some(IdempotencyBackend::Redis);
        cfg.gates.control = Some(ControlGate {
            jwks_file: Some("/ops.json".into()),
            ..ControlGate::default()
        });
        cfg.gates.quota.plans.insert(
            "team".into(),
            Plan {
                requests_per_second: 1.5,
                burst: 2,
                max_concurrent: 3,
                max_payload_bytes: 4,
                daily_cap: 5,
                max_signatures_per_request: Some(6),
            },
        );
        cfg.gates.provenance.registry_credentials = vec![RegistryCredentialsEnv {
            registry: "registry.example".into(),
            username_env: "U".into(),
            password_env: "P".into(),
        }];
        cfg.keys.push(
            Pkcs11KeyConfig {
                module: Some("/m.so".into()),
                ..Pkcs11KeyConfig::new(
                    "hsm",
                    "t",
                    Pkcs11Object::Id(vec![1, 2]),
                    PinSource::Env("P".into()),
                )
            }
            .into(),
        );
        cfg.keys.push(
            YubikeyKeyConfig {
                serial: Some(7),
                ..YubikeyKeyConfig::new("yk", PinSource::File("/pin".into()))
            }
            .into(),
        );
        cfg.keys.push(
            FulcioKeyConfig {
                tsa_url: Some("https://tsa.example".into()),
                ..FulcioKeyConfig::new("kl", "https://fulcio.example", "/t", "/r.json")
            }
            .into(),
        );
        let mut multi = ProfileConfig::new(["k", "hsm"]);
        multi.tenants.insert("acme".into(), vec!["kl".into()]);
        multi.plans.insert("team".into(), vec!["yk".into()]);
        multi.allow_plans = Some(["team".to_string()].into());
        multi.allow_tenants = Some(["acme".to_string()].into());
        cfg.profiles.insert("multi".into(), multi);
        cfg.validate().unwrap();
        cfg
    }

    #[test]
    fn a_configuration_written_as_toml_reads_back_the_same() {
        for cfg in [Config::from_toml(&base(), []).unwrap(), everything()] {
            let text = cfg.to_toml().unwrap();
            assert_eq!(Config::from_toml(&text, []).unwrap(), cfg, "{text}");
        }
    }

    #[test]
    fn an_unknown_setting_in_any_section_is_an_error_naming_it() {
        let full: toml::Table = toml::from_str(&everything().to_toml().unwrap()).unwrap();
        let sections = [
            "",
            "nats",
            "worker",
            "idempotency",
            "redis",
            "http",
            "gates",
            "gates.entitlement",
            "gates.entitlement.poe",
            "gates.quota",
            "gates.quota.plans.team",
            "gates.provenance",
            "gates.provenance.registry_credentials.0",
            "gates.control",
            "keys.0",
            "keys.1",
            "keys.2",
            "keys.3",
            "profiles.multi",
        ];
        for section in sections {
            let mut doc = toml::Value::Table(full.clone());
            let mut at = &mut doc;
            for step in section.split('.').filter(|s| !s.is_empty()) {
                at = match step.parse::<usize>() {
                    Ok(i) => at.get_mut(i),
                    Err(_) => at.get_mut(step),
                }
                .expect(section);
            }
            let table = at.as_table_mut().expect(section);
            table.insert("bogus_setting".into(), toml::Value::Integer(1));
            let text = toml::to_string(&doc).unwrap();
            let err = Config::from_toml(&text, []).unwrap_err().to_string();
            assert!(
                err.contains("unknown field `bogus_setting`"),
                "[{section}]: {err}"
            );
        }
    }

    #[test]
    fn replay_and_idempotency_records_default_to_jetstream_even_with_redis() {
        let plain = base();
        let text = format!("{plain}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
        let cfg = Config::from_toml(&text, []).unwrap();
        assert_eq!(cfg.idempotency_backend(), IdempotencyBackend::Jetstream);
        assert_eq!(
            cfg.gates.entitlement.dpop_replay_backend,
            ReplayBackend::Jetstream
        );
        assert_eq!(cfg.gates.entitlement.dpop_replay_bucket, "SIGNER_DPOP");
        let explicit = Config::from_toml(
            &format!("{text}[idempotency]\nbackend = \"redis\"\n[gates.entitlement]\ndpop_replay_backend = \"redis\"\n"),
            [],
        )
        .unwrap();
        assert_eq!(explicit.idempotency_backend(), IdempotencyBackend::Redis);
        assert_eq!(
            explicit.gates.entitlement.dpop_replay_backend,
            ReplayBackend::Redis
        );
        // 2 × dpop_max_age + max_queue_age + clock_skew
        let e = &cfg.gates.entitlement;
        assert_eq!(
            cfg.dpop_replay_lifetime(),
            e.dpop_max_age * 2 + Duration::from_secs(24 * 3600) + e.clock_skew
        );
        let short_queue =
            Config::from_toml(&format!("{text}[worker]\nmax_queue_age = \"1h\"\n"), []).unwrap();
        assert_eq!(
            short_queue.dpop_replay_lifetime(),
            e.dpop_max_age * 2 + Duration::from_secs(3600) + e.clock_skew,
            "follows worker.max_queue_age"
        );

        let err = |extra: &str| {
            Config::from_toml(&format!("{plain}\n{extra}"), [])
                .unwrap_err()
                .to_string()
        };
        assert!(err("[gates.entitlement]\ndpop_replay_backend = \"redis\"\n").contains("[redis]"));
        assert!(
            err("[gates.entitlement]\ndpop_replay_bucket = \"a.b\"\n")
                .contains("dpop_replay_bucket")
        );
        assert!(
            err("[gates.entitlement]\ndpop_replay_backend = \"memory\"\n")
                .contains("dpop_replay_backend")
        );
    }
}

#[cfg(test)]
mod profile_and_keyless_tests {
    use super::*;
    use signer_actors::profiles::{NoAssignments, Scope};

    /// A configuration with a file key `k` (never read) and `extra`.
    fn with(extra: &str) -> Result<Config, String> {
        let text = format!(
            "[[keys]]\nname = \"k\"\nsource = \"file\"\npath = \"/nonexistent/k.key\"\n\n{extra}"
        );
        Config::from_toml(&text, []).map_err(|e| e.to_string())
    }

    const FULCIO: &str = "[[keys]]\nname = \"kl\"\nsource = \"fulcio\"\n";

    #[test]
    fn profiles_refine_per_tenant_and_plan() {
        let cfg = with(&format!(
            "{FULCIO}fulcio_url = \"https://fulcio.example\"\nidentity_token_file = \"/t\"\n\
             fulcio_roots = \"/roots/fulcio.pem\"\n\
             [profiles.default]\nkeys = [\"k\"]\n\
             [profiles.default.tenants]\nacme = [\"kl\"]\n\
             [profiles.default.plans]\nenterprise = [\"kl\", \"k\"]\n"
        ))
        .unwrap();
        let table = cfg.profile_table();
        let pick =
            |t: &str, p: Option<&str>| table.select("default", t, p, &NoAssignments).unwrap();
        assert_eq!(
            pick("acme", Some("enterprise")).scope,
            Scope::Tenant("acme".into())
        );
        assert_eq!(pick("globex", Some("enterprise")).keys, ["kl", "k"]);
        assert_eq!(pick("globex", Some("free")).keys, ["k"]);

        let err = |extra: &str| {
            with(&format!("[profiles.default]\nkeys = [\"k\"]\n{extra}")).unwrap_err()
        };
        assert!(err("[profiles.default.tenants]\nacme = [\"x\"]\n").contains("unknown key \"x\""));
        assert!(err("[profiles.default.plans]\nfree = []\n").contains("\"free\" has no keys"));
        assert!(err("[profiles.default.tenants]\n\"a b\" = [\"k\"]\n").contains("tenant \"a b\""));
    }

    #[test]
    fn what_a_profile_signs_is_read_and_checked_without_io() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let cfg = with(&format!(
            "[profiles.default]\nkeys = [\"k\"]\n\
             [profiles.report]\nkeys = [\"k\"]\n\
             predicate_types = [\"https://stella-ops.org/attestations/scan-report/v1\"]\n\
             require_policy = true\nallowed_policy_digests = [\"{digest}\"]\n"
        ))
        .unwrap();
        let table = cfg.profile_table();
        let report = table.signing_policy("report").unwrap();
        assert!(report.require_policy);
        assert_eq!(report.allowed_policy_digests, Some([digest.clone()].into()));
        assert!(table.signing_policy("default").unwrap().is_open());
        // what the file says survives the round trip the stack tests and `serve` rely on
        let back = Config::from_toml(&cfg.to_toml().unwrap(), []).unwrap();
        assert_eq!(back.profiles, cfg.profiles);

        let err = |extra: &str| {
            with(&format!("[profiles.default]\nkeys = [\"k\"]\n{extra}")).unwrap_err()
        };
        assert!(
            err("predicate_types = []\n").contains("profile \"default\": predicate_types is empty")
        );
        assert!(err("predicate_types = [\"cyclonedx\"]\n").contains("not a predicate type"));
        assert!(err("allowed_policy_digests = [\"abc\"]\n").contains("sha256:<64 lowercase hex>"));
        assert!(
            err("predicate_types = [\"https://cyclonedx.org/bom\"]\nrequire_policy = true\n")
                .contains("lists none")
        );
        assert!(err("require_policy = \"yes\"\n").contains("require_policy"));
        assert!(
            err("predicate_type = [\"https://cyclonedx.org/bom\"]\n").contains("unknown field")
        );
    }

    const PLANS: &str = "[gates.quota.plans.team]\nrequests_per_second = 1.0\nburst = 1\n\
        max_concurrent = 1\nmax_payload_bytes = 1024\n\
        [gates.quota.plans.enterprise]\nrequests_per_second = 1.0\nburst = 4\n\
        max_concurrent = 1\nmax_payload_bytes = 1024\nmax_signatures_per_request = 2\n";

    #[test]
    fn profiles_name_who_may_use_them() {
        let cfg = with(&format!(
            "{PLANS}[profiles.default]\nkeys = [\"k\"]\n\
             [profiles.multi]\nkeys = [\"k\"]\nallow_plans = [\"enterprise\"]\n\
             allow_tenants = [\"acme\", \"globex\"]\n\
             [profiles.multi.tenants]\nacme = [\"k\"]\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.gates.quota.plans["enterprise"].max_signatures_per_request,
            Some(2)
        );
        assert_eq!(
            cfg.gates.quota.plans["team"].max_signatures_per_request,
            None
        );
        let table = cfg.profile_table();
        assert!(table.permit("multi", "acme", "enterprise").is_ok());
        assert!(table.permit("multi", "acme", "team").is_err());
        assert!(table.permit("multi", "initech", "enterprise").is_err());
        assert!(table.permit("default", "initech", "team").is_ok());

        let err = |extra: &str| {
            with(&format!(
                "{PLANS}[profiles.default]\nkeys = [\"k\"]\n{extra}"
            ))
            .unwrap_err()
        };
        let e = err("[profiles.p]\nkeys = [\"k\"]\nallow_plans = []\n");
        assert!(e.contains("allow_plans is empty"), "{e}");
        let e = err("[profiles.p]\nkeys = [\"k\"]\nallow_tenants = []\n");
        assert!(e.contains("allow_tenants is empty"), "{e}");
        let e = err("[profiles.p]\nkeys = [\"k\"]\nallow_tenants = [\"a b\"]\n");
        assert!(e.contains("tenant \"a b\""), "{e}");
        let e = err("[profiles.p]\nkeys = [\"k\"]\nallow_plans = [\"gold\"]\n");
        assert!(
            e.contains("plan \"gold\", which is not in [gates.quota.plans]"),
            "{e}"
        );
        let e = err("[profiles.p]\nkeys = [\"k\"]\nallow_tenants = [\"acme\"]\n\
             [profiles.p.tenants]\nglobex = [\"k\"]\n");
        assert!(
            e.contains("\"globex\" has keys but is not in allow_tenants"),
            "{e}"
        );
        let e = err(
            "[profiles.p]\nkeys = [\"k\"]\nallow_plans = [\"enterprise\"]\n\
             [profiles.p.plans]\nteam = [\"k\"]\n",
        );
        assert!(
            e.contains("\"team\" has keys but is not in allow_plans"),
            "{e}"
        );
        let e = err("[profiles.p]\nkeys = [\"k\"]\nallow_planz = [\"team\"]\n");
        assert!(e.contains("unknown field `allow_planz`"), "{e}");
        // with the quota gate disabled there are no plans to check against
        assert!(
            with(
                "[gates.quota]\nmode = \"disabled\"\n[profiles.default]\nkeys = [\"k\"]\n\
                 allow_plans = [\"anything\"]\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn keyless_keys_are_validated_without_reading_their_files_or_asking_fulcio() {
        let ok = with(&format!(
            "{FULCIO}fulcio_url = \"https://fulcio.example\"\nidentity_token_file = \"/t\"\n\
             fulcio_roots = \"/nonexistent/r.json\"\n\
             tsa_url = \"https://tsa.example/api/v1/timestamp\"\nrenew_before = \"2m\"\n\
             [profiles.default]\nkeys = [\"kl\"]\n"
        ))
        .unwrap();
        let KeyConfig::Fulcio(k) = &ok.keys[1] else {
            panic!("{:?}", ok.keys[1])
        };
        assert_eq!(k.renew_before, Duration::from_secs(120));
        assert_eq!(k.http_timeout, KEYLESS_HTTP_TIMEOUT);
        assert!(k.tsa_url.is_some());

        let err = |k: &str| {
            with(&format!("{FULCIO}{k}[profiles.default]\nkeys = [\"kl\"]\n")).unwrap_err()
        };
        const ROOTS: &str = "fulcio_roots = \"/r.json\"\n";
        let e = err("fulcio_url = \"https://f\"\n");
        assert!(
            e.contains("keys[1] (key \"kl\")") && e.contains("missing field `identity_token_file`"),
            "{e}"
        );
        let e = err("fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\n");
        assert!(e.contains("missing field `fulcio_roots`"), "mandatory: {e}");
        let e = err(&format!(
            "fulcio_url = \"ftp://f\"\nidentity_token_file = \"/t\"\n{ROOTS}"
        ));
        assert!(e.contains("key \"kl\": fulcio_url \"ftp://f\""), "{e}");
        let e = err(&format!(
            "fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\n{ROOTS}tsa_url = \"x\"\n"
        ));
        assert!(e.contains("key \"kl\": tsa_url"), "{e}");
        let e = err(&format!(
            "fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\n{ROOTS}pin_env = \"P\"\n"
        ));
        assert!(e.contains("unknown field `pin_env`"), "{e}");
        let misplaced = Config::from_toml(
            "[[keys]]\nname = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_label = \"l\"\n\
             pin_env = \"P\"\ntsa_url = \"https://tsa\"\n[profiles.default]\nkeys = [\"h\"]\n",
            [],
        )
        .unwrap_err()
        .to_string();
        assert!(
            misplaced.contains("keys[0] (key \"h\")")
                && misplaced.contains("unknown field `tsa_url`"),
            "{misplaced}"
        );
    }
}
