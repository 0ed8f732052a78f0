//! `signer.toml`: typed configuration with defaults, `SIGNER_*` environment overrides and
//! validation at startup, so a mistake stops the service before it takes a job.
//!
//! Environment overrides name a key path with `__` between levels, upper case:
//! `SIGNER_NATS__URL=nats://nats:4222`, `SIGNER_WORKER__MAX_INFLIGHT=512`. A value is read
//! as a TOML literal when it parses as one (`512`, `true`, `["a","b"]`), else as a string.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    EntitlementGate, GateMode, GatesConfig, Plan, PoeConfig, ProvenanceGate, QuotaGate,
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
        }
    }
}

impl NatsConfig {
    pub fn subject(&self, base: &str) -> String {
        format!("{}{base}", self.subject_prefix)
    }
}

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
        }
    }
}

/// Where idempotency records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdempotencyBackend {
    /// Redis (`[redis]` must be set), shared by all replicas.
    Redis,
    /// A JetStream key-value bucket.
    Jetstream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// `redis` or `jetstream`; default: redis when `[redis]` is configured.
    pub backend: Option<IdempotencyBackend>,
    /// How long a finished request is remembered.
    #[serde(with = "duration")]
    pub ttl: Duration,
    pub bucket: String,
    pub redis_prefix: String,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            backend: None,
            ttl: Duration::from_secs(7 * 24 * 3600),
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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
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
    /// A PEM X.509 chain (leaf first) for this keyful key, reported in
    /// `signers[].certificateChain`. Its leaf must carry the key's public key.
    pub certificate_chain: Option<PathBuf>,
}

/// A signing profile: the keys that sign, one signature each.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub keys: Vec<String>,
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
        check_url(&self.nats.url, &["nats", "tls", "ws", "wss"], "nats.url")?;
        if let Some(r) = &self.redis {
            check_url(&r.url, &["redis", "rediss"], "redis.url")?;
        }
        if self.idempotency.backend == Some(IdempotencyBackend::Redis) && self.redis.is_none() {
            return invalid("idempotency.backend = \"redis\" needs a [redis] section".into());
        }
        if self.worker.max_inflight == 0 {
            return invalid("worker.max_inflight must be at least 1".into());
        }
        if self.nats.max_deliver == 0 {
            return invalid("nats.max_deliver must be at least 1".into());
        }
        if self.nats.duplicate_window < Duration::from_secs(120) {
            return invalid(
                "nats.duplicate_window must be at least 2m (the contract's minimum)".into(),
            );
        }
        if self.keys.is_empty() {
            return invalid("no [[keys]] configured".into());
        }
        let mut names = std::collections::HashSet::new();
        for key in &self.keys {
            if !names.insert(key.name.as_str()) {
                return invalid(format!("key {:?} is configured twice", key.name));
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
            if let Some(k) = profile.keys.iter().find(|k| !names.contains(k.as_str())) {
                return invalid(format!("profile {name:?} names unknown key {k:?}"));
            }
        }
        Ok(())
    }

    /// Profiles as the pipeline wants them.
    pub fn profile_map(&self) -> HashMap<String, Vec<String>> {
        self.profiles
            .iter()
            .map(|(k, v)| (k.clone(), v.keys.clone()))
            .collect()
    }

    /// The idempotency backend in effect.
    pub fn idempotency_backend(&self) -> IdempotencyBackend {
        self.idempotency.backend.unwrap_or(if self.redis.is_some() {
            IdempotencyBackend::Redis
        } else {
            IdempotencyBackend::Jetstream
        })
    }
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
}
