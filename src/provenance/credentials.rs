//! Registry credentials of the provenance gate: a Docker `config.json` (`auths`) and
//! `[[gates.provenance.registry_credentials]]` entries naming environment variables.
//! Read once at startup; a file or variable that is named but unusable stops the service.
//!
//! The credentials are handed to `oci-client` as HTTP basic credentials. It uses them
//! directly when the registry asks for `Basic`, and for the token flow when it asks for
//! `Bearer realm=...,service=...` (GET the realm with the basic credentials and
//! `scope=repository:<path>:pull`, then send the token), and never sends them to another
//! host than the registry they belong to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::config::gates::RegistryCredentialsEnv;

/// Why the credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("[gates.provenance] docker_config {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[gates.provenance] docker_config {path}: not a Docker config.json: {source}")]
    NotJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("[gates.provenance] docker_config {path}: auths entry {registry:?}: {reason}")]
    BadEntry {
        path: PathBuf,
        registry: String,
        reason: String,
    },
    #[error(
        "[gates.provenance] registry_credentials for {registry:?}: environment variable {var} is not set"
    )]
    MissingEnv { registry: String, var: String },
    #[error(
        "[gates.provenance] registry_credentials entry {registry:?} must be host[:port]: {reason}"
    )]
    BadRegistry { registry: String, reason: String },
}

/// A user name and password for one registry. The password is never printed.
#[derive(Clone, PartialEq, Eq)]
struct Basic {
    username: String,
    password: String,
}

/// Credentials by registry host (`host[:port]`, as in `scanner.repository`).
#[derive(Clone, Default)]
pub struct Credentials {
    by_registry: BTreeMap<String, Basic>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.by_registry
                    .iter()
                    .map(|(r, b)| (r.as_str(), b.username.as_str())),
            )
            .finish()
    }
}

/// The parts of a Docker `config.json` read here. `credsStore` / `credHelpers` (external
/// helper programs) are not run; entries that rely on them have no `auth` and are skipped.
#[derive(Debug, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    /// Loads the credentials: `docker_config` when configured (it must exist), otherwise
    /// `$DOCKER_CONFIG/config.json` when `docker_config_env` (the `DOCKER_CONFIG` variable)
    /// is set and the file exists; then `env_entries`, which win over the file.
    pub fn load(
        docker_config: Option<&Path>,
        docker_config_env: Option<PathBuf>,
        env_entries: &[RegistryCredentialsEnv],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, CredentialsError> {
        let mut creds = Credentials::default();
        let file = match docker_config {
            Some(p) => Some(p.to_path_buf()),
            None => docker_config_env
                .map(|dir| dir.join("config.json"))
                .filter(|p| p.exists()),
        };
        if let Some(path) = file {
            creds.read_docker_config(&path)?;
        }
        for entry in env_entries {
            super::repository::check_registry(&entry.registry).map_err(|reason| {
                CredentialsError::BadRegistry {
                    registry: entry.registry.clone(),
                    reason,
                }
            })?;
            let get = |var: &str| {
                env(var).ok_or_else(|| CredentialsError::MissingEnv {
                    registry: entry.registry.clone(),
                    var: var.to_string(),
                })
            };
            creds.by_registry.insert(
                canonical(&entry.registry),
                Basic {
                    username: get(&entry.username_env)?,
                    password: get(&entry.password_env)?,
                },
            );
        }
        Ok(creds)
    }

    fn read_docker_config(&mut self, path: &Path) -> Result<(), CredentialsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| CredentialsError::Unreadable {
                path: path.to_path_buf(),
                source,
            })?;
        let config: DockerConfig =
            serde_json::from_str(&text).map_err(|source| CredentialsError::NotJson {
                path: path.to_path_buf(),
                source,
            })?;
        if config.creds_store.is_some() || !config.cred_helpers.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "docker config names credential helpers (credsStore/credHelpers); they are not run, only inline auths are used"
            );
        }
        for (key, entry) in config.auths {
            let bad = |reason: &str| CredentialsError::BadEntry {
                path: path.to_path_buf(),
                registry: key.clone(),
                reason: reason.to_string(),
            };
            let basic = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    decode_auth(&auth).map_err(|r| bad(&r))?
                }
                (_, Some(username), Some(password)) => Basic { username, password },
                // An entry kept for a credential helper, or an identity token: nothing usable.
                _ => continue,
            };
            self.by_registry.insert(registry_of(&key), basic);
        }
        Ok(())
    }

    /// The auth `oci-client` is given for `registry` (`host[:port]`): basic credentials
    /// when there are some, anonymous otherwise.
    pub fn auth_for(&self, registry: &str) -> RegistryAuth {
        self.by_registry
            .get(&canonical(registry))
            .map_or(RegistryAuth::Anonymous, |b| {
                RegistryAuth::Basic(b.username.clone(), b.password.clone())
            })
    }

    /// Adds (or replaces) basic credentials for `registry` (`host[:port]`).
    pub fn with_basic(mut self, registry: &str, username: &str, password: &str) -> Self {
        self.by_registry.insert(
            canonical(registry),
            Basic {
                username: username.to_string(),
                password: password.to_string(),
            },
        );
        self
    }

    /// Whether credentials exist for `registry` (for error messages).
    pub fn has(&self, registry: &str) -> bool {
        self.by_registry.contains_key(&canonical(registry))
    }
}

/// `auth`: base64 of `user:password`.
fn decode_auth(auth: &str) -> Result<Basic, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| "auth is not base64".to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "auth is not UTF-8".to_string())?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| "auth is not base64 of user:password".to_string())?;
    Ok(Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// The registry host of an `auths` key: Docker writes `host[:port]` or a URL
/// (`https://index.docker.io/v1/`).
fn registry_of(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    canonical(rest.split('/').next().unwrap_or(rest))
}

/// One name per registry: Docker Hub's several names become `index.docker.io`, which is
/// what `oci-client` resolves `docker.io` to.
fn canonical(host: &str) -> String {
    match host {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<String> {
        None
    }

    fn basic(c: &Credentials, registry: &str) -> Option<(String, String)> {
        match c.auth_for(registry) {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn docker_config_auths_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "registry.example:5000": {{"auth": "{auth}"}},
                    "https://index.docker.io/v1/": {{"username": "bob", "password": "pw"}},
                    "helper.example": {{}}
                }}, "credsStore": "desktop"}}"#
            ),
        )
        .unwrap();
        let c = Credentials::load(Some(&path), None, &[], none).unwrap();
        assert_eq!(
            basic(&c, "registry.example:5000"),
            Some(("alice".into(), "s3cr:et".into()))
        );
        for hub in ["index.docker.io", "docker.io", "registry-1.docker.io"] {
            assert_eq!(basic(&c, hub), Some(("bob".into(), "pw".into())), "{hub}");
        }
        assert_eq!(basic(&c, "helper.example"), None);
        assert_eq!(basic(&c, "other.example"), None);
        // The password never shows in Debug output.
        assert!(!format!("{c:?}").contains("s3cr"), "{c:?}");

        // Found through DOCKER_CONFIG when nothing is configured.
        let c = Credentials::load(None, Some(dir.path().to_path_buf()), &[], none).unwrap();
        assert!(c.has("registry.example:5000"));
        // A DOCKER_CONFIG without a config.json is no error: anonymous.
        let empty = tempfile::tempdir().unwrap();
        let c = Credentials::load(None, Some(empty.path().to_path_buf()), &[], none).unwrap();
        assert!(!c.has("registry.example:5000"));
    }

    #[test]
    fn bad_files_and_missing_variables_stop_startup() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert!(matches!(
            Credentials::load(Some(&missing), None, &[], none),
            Err(CredentialsError::Unreadable { .. })
        ));
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            Credentials::load(Some(&path), None, &[], none),
            Err(CredentialsError::NotJson { .. })
        ));
        std::fs::write(
            &path,
            r#"{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}"#,
        )
        .unwrap();
        let err = Credentials::load(Some(&path), None, &[], none).unwrap_err();
        assert!(matches!(err, CredentialsError::BadEntry { .. }), "{err}");

        let entry = RegistryCredentialsEnv {
            registry: "r.example".into(),
            username_env: "R_USER".into(),
            password_env: "R_PASS".into(),
        };
        let err = Credentials::load(None, None, std::slice::from_ref(&entry), |v| {
            (v == "R_USER").then(|| "u".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains("R_PASS"), "{err}");
        let c = Credentials::load(None, None, std::slice::from_ref(&entry), |v| {
            Some(format!("{v}-value"))
        })
        .unwrap();
        assert_eq!(
            basic(&c, "r.example"),
            Some(("R_USER-value".into(), "R_PASS-value".into()))
        );
        let bad = RegistryCredentialsEnv {
            registry: "https://r.example".into(),
            ..entry
        };
        assert!(matches!(
            Credentials::load(None, None, &[bad], |_| Some("x".into())),
            Err(CredentialsError::BadRegistry { .. })
        ));
    }

    #[test]
    fn settings_parse_from_toml_and_unknown_keys_are_refused() {
        let gate: crate::config::gates::ProvenanceGate = toml::from_str(
            r#"
trusted_keys = ["/k.pub"]
docker_config = "/etc/stella-signer/registry/config.json"
[[registry_credentials]]
registry = "registry.internal:5000"
username_env = "U"
password_env = "P"
"#,
        )
        .unwrap();
        assert_eq!(
            gate.docker_config.as_deref(),
            Some(Path::new("/etc/stella-signer/registry/config.json"))
        );
        assert_eq!(gate.registry_credentials.len(), 1);
        assert_eq!(
            gate.registry_credentials[0].registry,
            "registry.internal:5000"
        );
        let typo = toml::from_str::<crate::config::gates::ProvenanceGate>(
            "[[registry_credentials]]\nregistry = \"r\"\nusername_env = \"U\"\npassword = \"x\"\n",
        );
        assert!(typo.is_err());
    }
}
