//! `signer.toml`: typed configuration with defaults, `SIGNER_*` environment overrides and
//! validation at startup, so a mistake stops the service before it takes a job.
//!
//! Environment overrides name a key path with `__` between levels, upper case:
//! `SIGNER_NATS__URL=nats://nats:4222`, `SIGNER_WORKER__MAX_INFLIGHT=512`. A value is read
//! as a TOML literal when it parses as one (`512`, `true`, `["a","b"]`), else as a string.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
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
}

pub mod gates;

pub use gates::{
    ControlGate, EntitlementGate, GateMode, GatesConfig, Plan, PoeConfig, ProvenanceGate,
    QuotaGate, ReplayBackend,
};

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

    /// The same for an optional setting.
    pub mod option {
        use serde::{Deserializer, Serializer};
        use std::time::Duration;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub worker: WorkerConfig,
    pub idempotency: IdempotencyConfig,
    pub redis: Option<RedisConfig>,
    pub http: HttpConfig,
    pub gates: GatesConfig,
    pub keys: Vec<KeyConfig>,
    pub profiles: BTreeMap<String, ProfileConfig>,
}

/// NATS connection, streams, subjects and the durable consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// How one replica works.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub audit_batch_max: usize,
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
            audit_flush_interval: Duration::from_millis(1),
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySourceConfig {
    File,
    Pkcs11,
    /// A PIV slot of a YubiKey over PC/SC; needs a build with `--features yubikey`.
    Yubikey,
    /// Keyless: an ephemeral key certified by Fulcio for an OIDC identity.
    Fulcio,
}

/// The PIV slots a `yubikey` key may name: authentication, signature (the default),
/// key management and card authentication.
pub const YUBIKEY_SLOTS: [&str; 4] = ["9a", "9c", "9d", "9e"];
/// The PIV slot used when a `yubikey` key names none: the digital signature slot.
pub const YUBIKEY_DEFAULT_SLOT: &str = "9c";

/// One signing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    pub source: KeySourceConfig,
    /// `file`: the PKCS#8 PEM private key (mode 0600).
    pub path: Option<PathBuf>,
    /// `pkcs11`: the module (default: SoftHSM2's `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: Option<PathBuf>,
    /// `pkcs11`: label of the token holding the key.
    pub token_label: Option<String>,
    /// `pkcs11`: the key's `CKA_LABEL`...
    pub key_label: Option<String>,
    /// ...or its `CKA_ID` in hex.
    pub key_id: Option<String>,
    /// `yubikey`: the PIV slot holding the P-256 key, one of `9a`, `9c`, `9d`, `9e`
    /// (default `9c`, the signature slot).
    pub slot: Option<String>,
    /// `yubikey`: serial number of the device to use, needed when more than one YubiKey
    /// is attached (without it, exactly one must be present).
    pub serial: Option<u32>,
    /// `pkcs11`, `yubikey`: user PIN read from this file (trailing newline ignored)...
    pub pin_file: Option<PathBuf>,
    /// ...or from this environment variable.
    pub pin_env: Option<String>,
    /// How many KeySigner actors serve this key, each with its own backend: for `pkcs11`,
    /// its own logged-in session, so the token signs that many jobs at once. Accepted for
    /// every source; 1 to [`MAX_KEY_SESSIONS`], default 1.
    #[serde(default = "default_sessions")]
    pub sessions: u32,
    /// A PEM X.509 chain (leaf first) for this keyful key, reported in
    /// `signers[].certificateChain`. Its leaf must carry the key's public key.
    pub certificate_chain: Option<PathBuf>,
    /// `fulcio`: Fulcio's base URL (the v2 `signingCert` endpoint is under it).
    pub fulcio_url: Option<String>,
    /// `fulcio`: the OIDC identity token (a JWT), read again for every new certificate.
    pub identity_token_file: Option<PathBuf>,
    /// `fulcio`: an RFC 3161 timestamp authority; every signature gets a timestamp from it.
    pub tsa_url: Option<String>,
    /// `fulcio`: a new certificate is requested this long before the current one expires
    /// (default 1m; Fulcio certificates live 10 minutes).
    #[serde(default, with = "duration::option")]
    pub renew_before: Option<Duration>,
    /// `fulcio`: timeout of each Fulcio and TSA request (default 10s).
    #[serde(default, with = "duration::option")]
    pub http_timeout: Option<Duration>,
    /// `fulcio` (required): the Fulcio roots every certificate must chain to, a Sigstore
    /// `trusted_root.json` (its `certificateAuthorities`) or a PEM bundle of root and
    /// intermediate certificates. A certificate that does not chain to them is not used.
    pub fulcio_roots: Option<PathBuf>,
}

/// Default of a `fulcio` key's `renew_before`.
pub const KEYLESS_RENEW_BEFORE: Duration = Duration::from_secs(60);
/// Default of a `fulcio` key's `http_timeout`.
pub const KEYLESS_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

impl KeyConfig {
    /// A key named `name` from `source` with every optional setting at its default, to be
    /// completed with struct update syntax (`KeyConfig { path: Some(..), ..KeyConfig::new(..) }`).
    pub fn new(name: impl Into<String>, source: KeySourceConfig) -> Self {
        KeyConfig {
            name: name.into(),
            source,
            path: None,
            module: None,
            token_label: None,
            key_label: None,
            key_id: None,
            slot: None,
            serial: None,
            pin_file: None,
            pin_env: None,
            sessions: default_sessions(),
            certificate_chain: None,
            fulcio_url: None,
            identity_token_file: None,
            tsa_url: None,
            renew_before: None,
            http_timeout: None,
            fulcio_roots: None,
        }
    }

    /// The settings of a `fulcio` key (validated: the required fields are present).
    pub fn keyless(&self) -> Option<crate::keys::keyless::KeylessSettings> {
        Some(crate::keys::keyless::KeylessSettings {
            fulcio_url: self.fulcio_url.clone()?,
            identity_token_file: self.identity_token_file.clone()?,
            fulcio_roots: self.fulcio_roots.clone()?,
            tsa_url: self.tsa_url.clone(),
            renew_before: self.renew_before.unwrap_or(KEYLESS_RENEW_BEFORE),
            timeout: self.http_timeout.unwrap_or(KEYLESS_HTTP_TIMEOUT),
        })
    }
}

/// The most pool members (`sessions`) one key may have.
pub const MAX_KEY_SESSIONS: u32 = 64;

fn default_sessions() -> u32 {
    1
}

/// A signing profile: the keys that sign, one signature each.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

    /// Checks what serde cannot: URLs, key files, profiles, limits.
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
            if !names.insert(key.name.as_str()) {
                return invalid(format!("key {:?} is configured twice", key.name));
            }
            if !(1..=MAX_KEY_SESSIONS).contains(&key.sessions) {
                return invalid(format!(
                    "key {:?}: sessions = {} is out of range (1 to {MAX_KEY_SESSIONS})",
                    key.name, key.sessions
                ));
            }
            match key.source {
                KeySourceConfig::File => {
                    let Some(path) = &key.path else {
                        return invalid(format!("key {:?}: source \"file\" needs path", key.name));
                    };
                    let loaded = crate::keys::file::FileKey::load(path, &key.name)
                        .map_err(|e| ConfigError::Invalid(format!("key {:?}: {e}", key.name)))?;
                    if let Some(chain) = &key.certificate_chain {
                        use signer_actors::keys::KeySigner as _;
                        crate::keys::certified::load_chain(chain, &loaded.identity()).map_err(
                            |e| ConfigError::Invalid(format!("key {:?}: {e}", key.name)),
                        )?;
                    }
                }
                // The token may be unreachable at startup: only the settings are checked here;
                // the Keyring keeps retrying and /readyz says which key is not loaded.
                KeySourceConfig::Pkcs11 => {
                    if key.token_label.is_none() {
                        return invalid(format!(
                            "key {:?}: source \"pkcs11\" needs token_label",
                            key.name
                        ));
                    }
                    if key.key_label.is_none() == key.key_id.is_none() {
                        return invalid(format!(
                            "key {:?}: source \"pkcs11\" needs exactly one of key_label or key_id",
                            key.name
                        ));
                    }
                    if key.pin_file.is_none() == key.pin_env.is_none() {
                        return invalid(format!(
                            "key {:?}: source \"pkcs11\" needs exactly one of pin_file or pin_env",
                            key.name
                        ));
                    }
                }
                // As for pkcs11: the device may be absent at startup (or the build may lack
                // the feature), so only the settings are checked; the Keyring reports the rest.
                KeySourceConfig::Yubikey => {
                    if let Some(slot) = &key.slot
                        && !YUBIKEY_SLOTS.contains(&slot.to_ascii_lowercase().as_str())
                    {
                        return invalid(format!(
                            "key {:?}: slot {slot:?} is not a PIV key slot ({})",
                            key.name,
                            YUBIKEY_SLOTS.join(", ")
                        ));
                    }
                    if key.pin_file.is_none() == key.pin_env.is_none() {
                        return invalid(format!(
                            "key {:?}: source \"yubikey\" needs exactly one of pin_file or pin_env",
                            key.name
                        ));
                    }
                    if key.path.is_some()
                        || key.module.is_some()
                        || key.token_label.is_some()
                        || key.key_label.is_some()
                        || key.key_id.is_some()
                    {
                        return invalid(format!(
                            "key {:?}: source \"yubikey\" takes slot, serial and a PIN, not \
                             path, module, token_label, key_label or key_id \
                             (for ykcs11 use source \"pkcs11\")",
                            key.name
                        ));
                    }
                }
                // Fulcio may be down at startup: the settings are checked here, the Keyring
                // retries the first certificate and /readyz says the key is not loaded.
                KeySourceConfig::Fulcio => {
                    let name = &key.name;
                    let (Some(url), Some(_)) = (&key.fulcio_url, &key.identity_token_file) else {
                        return invalid(format!(
                            "key {name:?}: source \"fulcio\" needs fulcio_url and identity_token_file"
                        ));
                    };
                    check_url(
                        url,
                        &["http", "https"],
                        &format!("key {name:?}: fulcio_url"),
                    )?;
                    // Mandatory: without a root the signer would sign with whatever
                    // certificate the network answered with. Read now so a wrong path or
                    // file stops startup (the key reads it again whenever it loads).
                    let Some(roots) = &key.fulcio_roots else {
                        return invalid(format!(
                            "key {name:?}: source \"fulcio\" needs fulcio_roots, the Fulcio \
                             trusted_root.json (or a PEM bundle of its roots) its certificates \
                             must chain to"
                        ));
                    };
                    crate::keys::fulcio_trust::FulcioTrust::load(roots)
                        .map_err(|e| ConfigError::Invalid(format!("key {name:?}: {e}")))?;
                    if let Some(tsa) = &key.tsa_url {
                        check_url(tsa, &["http", "https"], &format!("key {name:?}: tsa_url"))?;
                    }
                    if key.path.is_some()
                        || key.module.is_some()
                        || key.pin_file.is_some()
                        || key.pin_env.is_some()
                        || key.certificate_chain.is_some()
                    {
                        return invalid(format!(
                            "key {name:?}: source \"fulcio\" has no key file, module, PIN or \
                             configured chain (Fulcio issues the certificate)"
                        ));
                    }
                }
            }
            let keyless_only = key.fulcio_url.is_some()
                || key.identity_token_file.is_some()
                || key.tsa_url.is_some()
                || key.renew_before.is_some()
                || key.http_timeout.is_some()
                || key.fulcio_roots.is_some();
            if keyless_only && key.source != KeySourceConfig::Fulcio {
                return invalid(format!(
                    "key {:?}: fulcio_url, identity_token_file, fulcio_roots, tsa_url, \
                     renew_before and http_timeout belong to source \"fulcio\"",
                    key.name
                ));
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

    fn key_file(dir: &Path) -> PathBuf {
        crate::keys::file::FileKey::generate(signer_actors::keys::KeyAlgorithm::Ed25519, dir, "k")
            .unwrap()
            .private_key
    }

    fn base(dir: &Path) -> String {
        format!(
            "[[keys]]\nname = \"k\"\nsource = \"file\"\npath = \"{}\"\n\n[profiles.default]\nkeys = [\"k\"]\n",
            key_file(dir).display()
        )
    }

    #[test]
    fn defaults_env_overrides_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
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
        let dir = tempfile::tempdir().unwrap();
        let text = base(dir.path());
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
        assert!(err(&text.replace(".key\"", ".missing\""), vec![]).contains("key \"k\""));
        assert!(
            err(&text.replace("keys = [\"k\"]", "keys = [\"nope\"]"), vec![])
                .contains("unknown key \"nope\"")
        );
        assert!(
            err(
                &format!("{text}\n[idempotency]\nbackend = \"redis\"\n"),
                vec![]
            )
            .contains("[redis]")
        );
    }

    #[test]
    fn replay_and_idempotency_records_default_to_jetstream_even_with_redis() {
        let dir = tempfile::tempdir().unwrap();
        let plain = base(dir.path());
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

    /// A configuration with a file key `k` and `extra`, where `@ROOTS@` is the path of a
    /// PEM file holding a (generated) Fulcio root.
    fn with(extra: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::keys::file::FileKey::generate(
            signer_actors::keys::KeyAlgorithm::Ed25519,
            dir.path(),
            "k",
        )
        .unwrap();
        let roots = dir.path().join("fulcio.pem");
        std::fs::write(&roots, crate::keys::fulcio_trust::test_root_pem()).unwrap();
        let extra = extra.replace("@ROOTS@", &roots.display().to_string());
        let text = format!(
            "[[keys]]\nname = \"k\"\nsource = \"file\"\npath = \"{}\"\n\n{extra}",
            key.private_key.display()
        );
        Config::from_toml(&text, []).map_err(|e| e.to_string())
    }

    const FULCIO: &str = "[[keys]]\nname = \"kl\"\nsource = \"fulcio\"\n";

    #[test]
    fn profiles_refine_per_tenant_and_plan() {
        let cfg = with(&format!(
            "{FULCIO}fulcio_url = \"https://fulcio.example\"\nidentity_token_file = \"/t\"\n\
             fulcio_roots = \"@ROOTS@\"\n\
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
    fn keyless_keys_need_fulcio_and_a_token_and_nothing_of_keyful_keys() {
        let ok = with(&format!(
            "{FULCIO}fulcio_url = \"https://fulcio.example\"\nidentity_token_file = \"/t\"\n\
             fulcio_roots = \"@ROOTS@\"\n\
             tsa_url = \"https://tsa.example/api/v1/timestamp\"\nrenew_before = \"2m\"\n\
             [profiles.default]\nkeys = [\"kl\"]\n"
        ))
        .unwrap();
        let settings = ok.keys[1].keyless().unwrap();
        assert_eq!(settings.renew_before, Duration::from_secs(120));
        assert_eq!(settings.timeout, KEYLESS_HTTP_TIMEOUT);
        assert!(settings.tsa_url.is_some());
        assert!(settings.fulcio_roots.ends_with("fulcio.pem"));

        let err = |k: &str| {
            with(&format!("{FULCIO}{k}[profiles.default]\nkeys = [\"kl\"]\n")).unwrap_err()
        };
        assert!(
            err("fulcio_url = \"https://f\"\n")
                .contains("needs fulcio_url and identity_token_file")
        );
        const ROOTS: &str = "fulcio_roots = \"@ROOTS@\"\n";
        assert!(
            err(&format!(
                "fulcio_url = \"ftp://f\"\nidentity_token_file = \"/t\"\n{ROOTS}"
            ))
            .contains("fulcio_url")
        );
        assert!(
            err("fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\n")
                .contains("needs fulcio_roots"),
            "the Fulcio root is mandatory"
        );
        let unreadable = err(
            "fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\nfulcio_roots = \"/nonexistent/r.json\"\n",
        );
        assert!(
            unreadable.contains("fulcio_roots /nonexistent/r.json"),
            "read at startup: {unreadable}"
        );
        assert!(
            err(&format!(
                "fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\n{ROOTS}tsa_url = \"x\"\n"
            ))
            .contains("tsa_url")
        );
        assert!(
            err(&format!(
                "fulcio_url = \"https://f\"\nidentity_token_file = \"/t\"\n{ROOTS}pin_env = \"P\"\n"
            ))
            .contains("Fulcio issues the certificate")
        );
        let keyful = with("[profiles.default]\nkeys = [\"k\"]\n");
        assert!(keyful.is_ok());
        let misplaced = Config::from_toml(
            "[[keys]]\nname = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_label = \"l\"\n\
             pin_env = \"P\"\ntsa_url = \"https://tsa\"\n[profiles.default]\nkeys = [\"h\"]\n",
            [],
        )
        .unwrap_err()
        .to_string();
        assert!(
            misplaced.contains("belong to source \"fulcio\""),
            "{misplaced}"
        );
    }
}
