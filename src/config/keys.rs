//! `[[keys]]`: one entry per signing key, a variant per `source`, each holding exactly the
//! settings of its source. A setting of another source (`token_label` on a `file` key), a
//! missing one, or two that exclude each other (`pin_file` and `pin_env`) is a parse error
//! that names the entry (`keys[1] (key "hsm")`) and the setting.
//!
//! Only values are read here. Key files, PINs, chains and Fulcio roots are read by the key
//! factory (`keys::factory`, which imports this module, not the other way round): it checks
//! the files at startup and loads the keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::duration;

/// One signing key, tagged by its `source`:
///
/// ```toml
/// [[keys]]
/// name = "release"
/// source = "file"
/// path = "/keys/release.key"
/// ```
///
/// Written with `source` as its tag; read by [`KeyConfig::try_from`] a table, which takes
/// `source` out and reads the rest as that variant's settings, so that an error names the
/// setting (`invalid type: string "abc", expected u32 in serial`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", try_from = "toml::Table")]
pub enum KeyConfig {
    /// A PKCS#8 PEM private key file.
    File(FileKeyConfig),
    /// A key pair on a PKCS#11 token (an HSM, SoftHSM2, a YubiKey through ykcs11).
    Pkcs11(Pkcs11KeyConfig),
    /// A PIV slot of a YubiKey over PC/SC. Parsed and validated by every build; only a build
    /// with `--features yubikey` can load it (others report the key unavailable, saying so).
    Yubikey(YubikeyKeyConfig),
    /// Keyless: an ephemeral key certified by Fulcio for an OIDC identity.
    Fulcio(FulcioKeyConfig),
}

/// The most pool members (`sessions`) one key may have.
pub const MAX_KEY_SESSIONS: u32 = 64;

/// Default of a `fulcio` key's `renew_before`.
pub const KEYLESS_RENEW_BEFORE: Duration = Duration::from_secs(60);
/// Default of a `fulcio` key's `http_timeout`.
pub const KEYLESS_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn default_sessions() -> u32 {
    1
}

fn default_renew_before() -> Duration {
    KEYLESS_RENEW_BEFORE
}

fn default_http_timeout() -> Duration {
    KEYLESS_HTTP_TIMEOUT
}

impl KeyConfig {
    pub fn name(&self) -> &str {
        match self {
            KeyConfig::File(k) => &k.name,
            KeyConfig::Pkcs11(k) => &k.name,
            KeyConfig::Yubikey(k) => &k.name,
            KeyConfig::Fulcio(k) => &k.name,
        }
    }

    /// The `source` tag, as written in the file.
    pub fn source(&self) -> &'static str {
        match self {
            KeyConfig::File(_) => "file",
            KeyConfig::Pkcs11(_) => "pkcs11",
            KeyConfig::Yubikey(_) => "yubikey",
            KeyConfig::Fulcio(_) => "fulcio",
        }
    }

    /// How many KeySigner actors serve this key, each with its own backend (for `pkcs11`,
    /// its own logged-in session, so the token signs that many jobs at once).
    pub fn sessions(&self) -> u32 {
        match self {
            KeyConfig::File(k) => k.sessions,
            KeyConfig::Pkcs11(k) => k.sessions,
            KeyConfig::Yubikey(k) => k.sessions,
            KeyConfig::Fulcio(k) => k.sessions,
        }
    }

    /// The configured X.509 chain of a keyful key (a `fulcio` key's chain comes from Fulcio).
    pub fn certificate_chain(&self) -> Option<&Path> {
        match self {
            KeyConfig::File(k) => k.certificate_chain.as_deref(),
            KeyConfig::Pkcs11(k) => k.certificate_chain.as_deref(),
            KeyConfig::Yubikey(k) => k.certificate_chain.as_deref(),
            KeyConfig::Fulcio(_) => None,
        }
    }
}

/// The `source` of each variant, as [`KeyConfig::source`] names it.
const SOURCES: [&str; 4] = ["file", "pkcs11", "yubikey", "fulcio"];

impl TryFrom<toml::Table> for KeyConfig {
    type Error = toml::de::Error;

    fn try_from(mut entry: toml::Table) -> Result<Self, toml::de::Error> {
        use serde::de::Error as _;
        let source = match entry.remove("source") {
            Some(toml::Value::String(source)) => source,
            Some(other) => {
                return Err(toml::de::Error::custom(format!(
                    "source must be a string, not {}",
                    other.type_str()
                )));
            }
            None => return Err(toml::de::Error::missing_field("source")),
        };
        let settings = toml::Value::Table(entry);
        match source.as_str() {
            "file" => settings.try_into().map(KeyConfig::File),
            "pkcs11" => settings.try_into().map(KeyConfig::Pkcs11),
            "yubikey" => settings.try_into().map(KeyConfig::Yubikey),
            "fulcio" => settings.try_into().map(KeyConfig::Fulcio),
            other => Err(toml::de::Error::unknown_variant(other, &SOURCES)),
        }
    }
}

impl From<FileKeyConfig> for KeyConfig {
    fn from(k: FileKeyConfig) -> Self {
        KeyConfig::File(k)
    }
}

impl From<Pkcs11KeyConfig> for KeyConfig {
    fn from(k: Pkcs11KeyConfig) -> Self {
        KeyConfig::Pkcs11(k)
    }
}

impl From<YubikeyKeyConfig> for KeyConfig {
    fn from(k: YubikeyKeyConfig) -> Self {
        KeyConfig::Yubikey(k)
    }
}

impl From<FulcioKeyConfig> for KeyConfig {
    fn from(k: FulcioKeyConfig) -> Self {
        KeyConfig::Fulcio(k)
    }
}

/// `source = "file"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeyConfig {
    pub name: String,
    /// The PKCS#8 PEM private key (mode 0600).
    pub path: PathBuf,
    /// A PEM X.509 chain (leaf first) reported in `signers[].certificateChain`; its leaf
    /// must carry the key's public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_chain: Option<PathBuf>,
    /// KeySigner actors serving the key, 1 to [`MAX_KEY_SESSIONS`] (default 1).
    #[serde(default = "default_sessions")]
    pub sessions: u32,
}

impl FileKeyConfig {
    /// A file key with no chain and one session.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        FileKeyConfig {
            name: name.into(),
            path: path.into(),
            certificate_chain: None,
            sessions: default_sessions(),
        }
    }
}

/// Where a device key's user PIN comes from (`pin_file` or `pin_env`, exactly one), so it
/// never sits in the configuration file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `pin_file`: read from this file (trailing newline ignored).
    File(PathBuf),
    /// `pin_env`: read from this environment variable.
    Env(String),
}

impl PinSource {
    fn from_fields(
        file: Option<PathBuf>,
        env: Option<String>,
        source: &str,
    ) -> Result<Self, String> {
        match (file, env) {
            (Some(file), None) => Ok(PinSource::File(file)),
            (None, Some(env)) => Ok(PinSource::Env(env)),
            _ => Err(format!(
                "source {source:?} needs exactly one of pin_file or pin_env"
            )),
        }
    }

    fn into_fields(self) -> (Option<PathBuf>, Option<String>) {
        match self {
            PinSource::File(file) => (Some(file), None),
            PinSource::Env(env) => (None, Some(env)),
        }
    }
}

/// Which key pair on the token a `pkcs11` key is (`key_label` or `key_id`, exactly one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkcs11Object {
    /// `key_label`: the objects' `CKA_LABEL`.
    Label(String),
    /// `key_id`: their `CKA_ID`, written in hex.
    Id(Vec<u8>),
}

/// `source = "pkcs11"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Pkcs11Fields", into = "Pkcs11Fields")]
pub struct Pkcs11KeyConfig {
    pub name: String,
    /// The module (`module`; default: SoftHSM2's `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: Option<PathBuf>,
    /// Label of the token holding the key.
    pub token_label: String,
    pub object: Pkcs11Object,
    pub pin: PinSource,
    /// As for a file key: a chain whose leaf carries the key's public key.
    pub certificate_chain: Option<PathBuf>,
    /// Logged-in sessions (one KeySigner actor each), 1 to [`MAX_KEY_SESSIONS`].
    pub sessions: u32,
}

impl Pkcs11KeyConfig {
    /// A token key from the default module, with no chain and one session.
    pub fn new(
        name: impl Into<String>,
        token_label: impl Into<String>,
        object: Pkcs11Object,
        pin: PinSource,
    ) -> Self {
        Pkcs11KeyConfig {
            name: name.into(),
            module: None,
            token_label: token_label.into(),
            object,
            pin,
            certificate_chain: None,
            sessions: default_sessions(),
        }
    }
}

/// A `pkcs11` key as written in the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pkcs11Fields {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    module: Option<PathBuf>,
    token_label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate_chain: Option<PathBuf>,
    #[serde(default = "default_sessions")]
    sessions: u32,
}

impl TryFrom<Pkcs11Fields> for Pkcs11KeyConfig {
    type Error = String;

    fn try_from(f: Pkcs11Fields) -> Result<Self, String> {
        let object = match (f.key_label, f.key_id) {
            (Some(label), None) => Pkcs11Object::Label(label),
            (None, Some(id)) => {
                Pkcs11Object::Id(hex::decode(&id).map_err(|_| format!("key_id {id:?} is not hex"))?)
            }
            _ => return Err("source \"pkcs11\" needs exactly one of key_label or key_id".into()),
        };
        Ok(Pkcs11KeyConfig {
            name: f.name,
            module: f.module,
            token_label: f.token_label,
            object,
            pin: PinSource::from_fields(f.pin_file, f.pin_env, "pkcs11")?,
            certificate_chain: f.certificate_chain,
            sessions: f.sessions,
        })
    }
}

impl From<Pkcs11KeyConfig> for Pkcs11Fields {
    fn from(k: Pkcs11KeyConfig) -> Self {
        let (key_label, key_id) = match k.object {
            Pkcs11Object::Label(label) => (Some(label), None),
            Pkcs11Object::Id(id) => (None, Some(hex::encode(id))),
        };
        let (pin_file, pin_env) = k.pin.into_fields();
        Pkcs11Fields {
            name: k.name,
            module: k.module,
            token_label: k.token_label,
            key_label,
            key_id,
            pin_file,
            pin_env,
            certificate_chain: k.certificate_chain,
            sessions: k.sessions,
        }
    }
}

/// A PIV key slot a `yubikey` key may name (`slot`, case-insensitive hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PivSlot {
    /// `9a`
    Authentication,
    /// `9c`, the digital signature slot (the default).
    #[default]
    Signature,
    /// `9d`
    KeyManagement,
    /// `9e`
    CardAuthentication,
}

impl PivSlot {
    pub const ALL: [PivSlot; 4] = [
        PivSlot::Authentication,
        PivSlot::Signature,
        PivSlot::KeyManagement,
        PivSlot::CardAuthentication,
    ];

    /// The slot's number as written in the file (`9c`).
    pub fn as_str(self) -> &'static str {
        match self {
            PivSlot::Authentication => "9a",
            PivSlot::Signature => "9c",
            PivSlot::KeyManagement => "9d",
            PivSlot::CardAuthentication => "9e",
        }
    }
}

impl std::fmt::Display for PivSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for PivSlot {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        PivSlot::ALL
            .into_iter()
            .find(|s| s.as_str() == lower)
            .ok_or_else(|| {
                let all: Vec<_> = PivSlot::ALL.iter().map(|s| s.as_str()).collect();
                format!("slot {text:?} is not a PIV key slot ({})", all.join(", "))
            })
    }
}

impl From<PivSlot> for String {
    fn from(slot: PivSlot) -> Self {
        slot.as_str().to_string()
    }
}

/// `source = "yubikey"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "YubikeyFields", into = "YubikeyFields")]
pub struct YubikeyKeyConfig {
    pub name: String,
    /// The slot holding the P-256 key (default `9c`).
    pub slot: PivSlot,
    /// Serial number of the device to use, needed when more than one YubiKey is attached
    /// (without it, exactly one must be present).
    pub serial: Option<u32>,
    pub pin: PinSource,
    /// As for a file key: a chain whose leaf carries the key's public key.
    pub certificate_chain: Option<PathBuf>,
    /// KeySigner actors serving the key, 1 to [`MAX_KEY_SESSIONS`] (default 1).
    pub sessions: u32,
}

impl YubikeyKeyConfig {
    /// The key in slot 9c of the one attached YubiKey, with no chain and one session.
    pub fn new(name: impl Into<String>, pin: PinSource) -> Self {
        YubikeyKeyConfig {
            name: name.into(),
            slot: PivSlot::default(),
            serial: None,
            pin,
            certificate_chain: None,
            sessions: default_sessions(),
        }
    }
}

/// A `yubikey` key as written in the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct YubikeyFields {
    name: String,
    #[serde(default)]
    slot: PivSlot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate_chain: Option<PathBuf>,
    #[serde(default = "default_sessions")]
    sessions: u32,
}

impl TryFrom<YubikeyFields> for YubikeyKeyConfig {
    type Error = String;

    fn try_from(f: YubikeyFields) -> Result<Self, String> {
        Ok(YubikeyKeyConfig {
            name: f.name,
            slot: f.slot,
            serial: f.serial,
            pin: PinSource::from_fields(f.pin_file, f.pin_env, "yubikey")?,
            certificate_chain: f.certificate_chain,
            sessions: f.sessions,
        })
    }
}

impl From<YubikeyKeyConfig> for YubikeyFields {
    fn from(k: YubikeyKeyConfig) -> Self {
        let (pin_file, pin_env) = k.pin.into_fields();
        YubikeyFields {
            name: k.name,
            slot: k.slot,
            serial: k.serial,
            pin_file,
            pin_env,
            certificate_chain: k.certificate_chain,
            sessions: k.sessions,
        }
    }
}

/// `source = "fulcio"`: no key file, module, PIN or chain (Fulcio issues the certificate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FulcioKeyConfig {
    pub name: String,
    /// Fulcio's base URL (the v2 `signingCert` endpoint is under it).
    pub fulcio_url: String,
    /// The OIDC identity token (a JWT), read again for every new certificate.
    pub identity_token_file: PathBuf,
    /// The Fulcio roots every certificate must chain to: a Sigstore `trusted_root.json`
    /// (its `certificateAuthorities`) or a PEM bundle of root and intermediate certificates.
    /// A certificate that does not chain to them is not used.
    pub fulcio_roots: PathBuf,
    /// An RFC 3161 timestamp authority; every signature gets a timestamp from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsa_url: Option<String>,
    /// A new certificate is requested this long before the current one expires (default
    /// 1m; Fulcio certificates live 10 minutes).
    #[serde(default = "default_renew_before", with = "duration")]
    pub renew_before: Duration,
    /// Timeout of each Fulcio and TSA request (default 10s).
    #[serde(default = "default_http_timeout", with = "duration")]
    pub http_timeout: Duration,
    /// KeySigner actors serving the key, 1 to [`MAX_KEY_SESSIONS`] (default 1).
    #[serde(default = "default_sessions")]
    pub sessions: u32,
}

impl FulcioKeyConfig {
    /// A keyless key without a timestamp authority, with the default timings.
    pub fn new(
        name: impl Into<String>,
        fulcio_url: impl Into<String>,
        identity_token_file: impl Into<PathBuf>,
        fulcio_roots: impl Into<PathBuf>,
    ) -> Self {
        FulcioKeyConfig {
            name: name.into(),
            fulcio_url: fulcio_url.into(),
            identity_token_file: identity_token_file.into(),
            fulcio_roots: fulcio_roots.into(),
            tsa_url: None,
            renew_before: KEYLESS_RENEW_BEFORE,
            http_timeout: KEYLESS_HTTP_TIMEOUT,
            sessions: default_sessions(),
        }
    }
}

/// `keys`, each entry parsed on its own so that an error names it: `keys[1] (key "hsm"):
/// unknown field `token_label`, ...`.
pub(super) fn deserialize_keys<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<KeyConfig>, D::Error> {
    let entries = Vec::<toml::Table>::deserialize(d)?;
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let name = match entry.get("name").and_then(toml::Value::as_str) {
                Some(name) => format!(" (key {name:?})"),
                None => String::new(),
            };
            KeyConfig::try_from(entry).map_err(|e| {
                let why = e.to_string().trim_end().replace('\n', " ");
                serde::de::Error::custom(format!("keys[{i}]{name}: {why}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `[[keys]]` entry parsed as the file's would be.
    fn key(text: &str) -> Result<KeyConfig, String> {
        #[derive(Deserialize)]
        struct Keys {
            #[serde(deserialize_with = "deserialize_keys")]
            keys: Vec<KeyConfig>,
        }
        let parsed: Keys = toml::from_str::<toml::Table>(&format!("[[keys]]\n{text}"))
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        Ok(parsed.keys.into_iter().next().expect("one entry"))
    }

    #[test]
    fn each_source_takes_its_own_settings() {
        assert_eq!(
            key("name = \"f\"\nsource = \"file\"\npath = \"/k.key\"\n").unwrap(),
            KeyConfig::File(FileKeyConfig::new("f", "/k.key"))
        );
        let KeyConfig::Pkcs11(hsm) = key(
            "name = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_id = \"0A01\"\n\
             pin_env = \"P\"\nsessions = 4\n",
        )
        .unwrap() else {
            panic!("a pkcs11 key")
        };
        assert_eq!(hsm.object, Pkcs11Object::Id(vec![0x0a, 0x01]));
        assert_eq!(hsm.pin, PinSource::Env("P".into()));
        assert_eq!((hsm.module, hsm.sessions), (None, 4));
        let KeyConfig::Yubikey(yk) =
            key("name = \"y\"\nsource = \"yubikey\"\nslot = \"9A\"\npin_file = \"/p\"\n").unwrap()
        else {
            panic!("a yubikey key")
        };
        assert_eq!(yk.slot, PivSlot::Authentication);
        assert_eq!(yk.pin, PinSource::File("/p".into()));
        let KeyConfig::Fulcio(kl) = key(
            "name = \"kl\"\nsource = \"fulcio\"\nfulcio_url = \"https://f\"\n\
             identity_token_file = \"/t\"\nfulcio_roots = \"/r.json\"\nrenew_before = \"2m\"\n",
        )
        .unwrap() else {
            panic!("a fulcio key")
        };
        assert_eq!(kl.renew_before, Duration::from_secs(120));
        assert_eq!(kl.http_timeout, KEYLESS_HTTP_TIMEOUT);
        assert_eq!(kl.tsa_url, None);
    }

    #[test]
    fn a_setting_of_another_source_is_an_error_naming_the_entry_and_the_setting() {
        let cases = [
            (
                "name = \"f\"\nsource = \"file\"\npath = \"/k\"\ntoken_label = \"t\"\n",
                "unknown field `token_label`",
            ),
            (
                "name = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_label = \"l\"\n\
                 pin_env = \"P\"\ntsa_url = \"https://tsa\"\n",
                "unknown field `tsa_url`",
            ),
            (
                "name = \"y\"\nsource = \"yubikey\"\npin_env = \"P\"\nmodule = \"/m.so\"\n",
                "unknown field `module`",
            ),
            (
                "name = \"kl\"\nsource = \"fulcio\"\nfulcio_url = \"https://f\"\n\
                 identity_token_file = \"/t\"\nfulcio_roots = \"/r\"\npin_env = \"P\"\n",
                "unknown field `pin_env`",
            ),
            (
                "name = \"kl\"\nsource = \"fulcio\"\nfulcio_url = \"https://f\"\n\
                 identity_token_file = \"/t\"\nfulcio_roots = \"/r\"\ncertificate_chain = \"/c\"\n",
                "unknown field `certificate_chain`",
            ),
            ("name = \"f\"\nsource = \"file\"\n", "missing field `path`"),
            (
                "name = \"kl\"\nsource = \"fulcio\"\nfulcio_url = \"https://f\"\n\
                 identity_token_file = \"/t\"\n",
                "missing field `fulcio_roots`",
            ),
            (
                "name = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\npin_env = \"P\"\n",
                "needs exactly one of key_label or key_id",
            ),
            (
                "name = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_id = \"xyz\"\n\
                 pin_env = \"P\"\n",
                "key_id \"xyz\" is not hex",
            ),
            (
                "name = \"y\"\nsource = \"yubikey\"\n",
                "source \"yubikey\" needs exactly one of pin_file or pin_env",
            ),
            (
                "name = \"y\"\nsource = \"yubikey\"\npin_env = \"P\"\npin_file = \"/p\"\n",
                "needs exactly one of pin_file or pin_env",
            ),
            (
                "name = \"y\"\nsource = \"yubikey\"\nslot = \"f9\"\npin_env = \"P\"\n",
                "slot \"f9\" is not a PIV key slot (9a, 9c, 9d, 9e)",
            ),
            (
                "name = \"y\"\nsource = \"yubikey\"\nserial = \"abc\"\npin_env = \"P\"\n",
                "serial",
            ),
            (
                "name = \"x\"\nsource = \"vault\"\n",
                "unknown variant `vault`",
            ),
            ("name = \"x\"\npath = \"/k\"\n", "missing field `source`"),
        ];
        for (text, says) in cases {
            let name = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("name = "))
                .unwrap_or_default();
            let err = key(text).unwrap_err();
            assert!(
                err.contains(&format!("keys[0] (key {name})")) && err.contains(says),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn every_source_writes_back_what_it_read() {
        for text in [
            "name = \"f\"\nsource = \"file\"\npath = \"/k\"\ncertificate_chain = \"/c\"\n",
            "name = \"h\"\nsource = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\n\
             key_id = \"0a01\"\npin_file = \"/p\"\nsessions = 3\n",
            "name = \"h\"\nsource = \"pkcs11\"\ntoken_label = \"t\"\nkey_label = \"l\"\npin_env = \"P\"\n",
            "name = \"y\"\nsource = \"yubikey\"\nslot = \"9e\"\nserial = 7\npin_env = \"P\"\n",
            "name = \"kl\"\nsource = \"fulcio\"\nfulcio_url = \"https://f\"\n\
             identity_token_file = \"/t\"\nfulcio_roots = \"/r\"\ntsa_url = \"https://tsa\"\n\
             http_timeout = \"3s\"\n",
        ] {
            let parsed = key(text).unwrap();
            let written = toml::to_string(&parsed).unwrap();
            assert!(SOURCES.contains(&parsed.source()), "{parsed:?}");
            assert!(
                written.contains(&format!("source = \"{}\"", parsed.source())),
                "{written}"
            );
            assert_eq!(key(&written).unwrap(), parsed, "{text} -> {written}");
        }
    }
}
