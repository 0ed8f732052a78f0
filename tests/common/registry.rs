//! A real OCI registry for one test: Debian's `docker-registry` (distribution 2.8), serving
//! a temporary directory over plain HTTP on a free loopback port, stopped when dropped.
//! [`TestRegistry::start_with_htpasswd`] runs one that requires HTTP basic auth (its
//! `auth: htpasswd:` setting, with a bcrypt file written by Apache's `htpasswd`), and
//! [`TestRegistry::start_with_token_server`] one that requires bearer tokens from a small
//! token server started with it ([`TokenServer`]).
//! Installed by `scripts/bootstrap.sh`; a missing binary fails the test (a skipped
//! provenance test proves nothing).
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry binary (`SIGNER_DOCKER_REGISTRY` overrides).
pub fn registry_binary() -> PathBuf {
    let bin = std::env::var_os("SIGNER_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"));
    assert!(
        bin.exists(),
        "{} not found: the provenance tests need a real OCI registry; run scripts/bootstrap.sh (installs the docker-registry package)",
        bin.display()
    );
    bin
}

/// A free loopback port (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct TestRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    auth: Auth,
    /// How the process is started.
    launch: Launch,
}

/// How the registry process is started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Launch {
    Plain,
    /// Through `setpriv --pdeathsig KILL` ([`TestRegistry::start_shared`]).
    Shared,
    /// Through `nice -n 10` ([`TestRegistry::start_foreign`]).
    Foreign,
}

/// How the registry authenticates; with any, anonymous requests get 401.
#[derive(Clone)]
enum Auth {
    None,
    /// `auth: htpasswd:` with the file `htpasswd` in the registry's directory.
    Htpasswd,
    /// `auth: token:`: tokens from `realm`, signed by the key of the certificate `cert`.
    Token {
        realm: String,
        cert: PathBuf,
    },
}

/// Writes an htpasswd file with one bcrypt entry (`htpasswd -B`, what distribution reads).
fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let out = Command::new("htpasswd")
        .args(["-B", "-b", "-n", user, password])
        .output()
        .unwrap_or_else(|e| {
            panic!("htpasswd: {e}; run scripts/bootstrap.sh (installs apache2-utils)")
        });
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(path, out.stdout).unwrap();
}

impl TestRegistry {
    /// Starts a registry with empty storage.
    pub fn start() -> TestRegistry {
        Self::start_inner(None, Auth::None, Launch::Plain)
    }

    /// [`TestRegistry::start`] at a low CPU priority (`nice -n 10`), for a registry that
    /// stands for someone else's machine in a test that measures what the signer spends:
    /// serving (say) a hostile tenant's huge referrers is that tenant's registry's work,
    /// which here shares the signer's cores. At nice 10 it yields to the signer and the test
    /// when the cores are short, and still serves in time (at 19 it starved under load).
    pub fn start_foreign() -> TestRegistry {
        Self::start_inner(None, Auth::None, Launch::Foreign)
    }

    /// [`TestRegistry::start`] for a deployment shared by many tests and kept in a `static`
    /// (never dropped): the registry gets SIGKILL when the thread that started it ends
    /// (`setpriv --pdeathsig`), so it dies with the test process. Start it from a thread
    /// that lives as long as the process.
    pub fn start_shared() -> TestRegistry {
        Self::start_inner(None, Auth::None, Launch::Shared)
    }

    /// Starts a registry that only serves `user` with `password` (HTTP basic auth).
    pub fn start_with_htpasswd(user: &str, password: &str) -> TestRegistry {
        Self::start_inner(Some((user, password)), Auth::Htpasswd, Launch::Plain)
    }

    /// Starts a registry that wants bearer tokens, and the token server that issues them
    /// to `user` with `password` (only).
    pub fn start_with_token_server(user: &str, password: &str) -> (TestRegistry, TokenServer) {
        let tokens = TokenServer::start(user, password);
        let reg = Self::start_inner(
            None,
            Auth::Token {
                realm: tokens.realm(),
                cert: tokens.cert.clone(),
            },
            Launch::Plain,
        );
        (reg, tokens)
    }

    fn start_inner(users: Option<(&str, &str)>, auth: Auth, launch: Launch) -> TestRegistry {
        let mut last = String::new();
        // The port is free when picked but another process may take it before the
        // registry binds: retry with a new one.
        for _ in 0..5 {
            let mut reg = TestRegistry {
                dir: tempfile::tempdir().unwrap(),
                port: free_port(),
                child: None,
                auth: auth.clone(),
                launch,
            };
            if let Some((user, password)) = users {
                write_htpasswd(&reg.dir.path().join("htpasswd"), user, password);
            }
            match reg.spawn() {
                Ok(()) => return reg,
                Err(e) => last = e,
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT/<path>`.
    pub fn repository(&self, path: &str) -> String {
        format!("{}/{path}", self.host())
    }

    /// Stops the registry; its storage and port are kept for [`TestRegistry::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("docker-registry did not restart: {last}");
    }

    /// A plain HTTP GET; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let config = self.dir.path().join("config.yml");
        let storage = self.dir.path().join("storage");
        let auth = match &self.auth {
            Auth::None => String::new(),
            Auth::Htpasswd => format!(
                "auth:\n  htpasswd:\n    realm: stella-test\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ),
            Auth::Token { realm, cert } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                cert.display()
            ),
        };
        std::fs::write(&config, config_yaml(&storage, self.port, &auth)).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = match self.launch {
            Launch::Plain => Command::new(registry_binary()),
            Launch::Shared => {
                let mut c = Command::new("setpriv");
                c.args(["--pdeathsig", "KILL", "--"]).arg(registry_binary());
                c
            }
            Launch::Foreign => {
                let mut c = Command::new("nice");
                c.args(["-n", "10"]).arg(registry_binary());
                c
            }
        };
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ready = if matches!(self.auth, Auth::None) {
                200
            } else {
                401
            };
            let answered = matches!(http_get(self.port, "/v2/"), Ok((s, _)) if s == ready);
            // Still running after an answer: it is ours that answered, not another test's
            // registry that got the port first (ours would have exited on the bind).
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if answered && exited.is_none() {
                return Ok(());
            }
            if exited.is_some() || Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "not serving on 127.0.0.1:{} ({}): {}",
                    self.port,
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_yaml(storage: &Path, port: u16, auth: &str) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n{auth}",
        storage.display()
    )
}

pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `service` of the token-auth registry (the tokens' `aud`).
pub const TOKEN_SERVICE: &str = "stella-test-registry";
/// `issuer` of its tokens (`iss`).
pub const TOKEN_ISSUER: &str = "stella-test-token-issuer";

/// What the token server saw of one request: the Authorization header and the query.
pub type TokenRequest = (Option<String>, String);

/// A token server as distribution's `auth: token:` expects one: `GET /token?scope=...&service=...`
/// with HTTP basic credentials answers `{"token": JWT}`, an ES256 JWT whose `x5c` header is
/// the (self-signed) certificate the registry trusts, granting what `scope` asks. Wrong or
/// no credentials get 401. Every request is recorded.
pub struct TokenServer {
    _dir: tempfile::TempDir,
    port: u16,
    cert: PathBuf,
    /// (Authorization header, query) of each request.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<TokenRequest>>>,
}

impl TokenServer {
    fn start(user: &str, password: &str) -> TokenServer {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        let cert = dir.path().join("token.crt");
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=stella-test-token-issuer", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap();
            let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        };
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der(&key),
            &rng,
        )
        .unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(der(&cert));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let user = user.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = vec![0u8; 16 * 1024];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let query = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.split_once('?'))
                    .map(|(_, q)| q.to_string())
                    .unwrap_or_default();
                let authorization = head.lines().find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                        .map(|(_, v)| v.trim().to_string())
                });
                seen.lock()
                    .unwrap()
                    .push((authorization.clone(), query.clone()));
                let (status, body) = if authorization.as_deref() == Some(expected.as_str()) {
                    let token = jwt(&pair, &rng, &x5c, &user, &query);
                    (
                        "200 OK",
                        format!(r#"{{"token":"{token}","expires_in":300}}"#),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"details":"bad credentials"}"#.to_string(),
                    )
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer {
            _dir: dir,
            port,
            cert,
            requests,
        }
    }

    /// The `realm` URL the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

/// A registry token granting every action the scopes of `query` ask for.
fn jwt(
    pair: &ring::signature::EcdsaKeyPair,
    rng: &ring::rand::SystemRandom,
    x5c: &str,
    user: &str,
    query: &str,
) -> String {
    use base64::Engine as _;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .filter_map(|scope| {
            let scope = percent_decode(scope);
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
            }))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut jti = [0u8; 8];
    ring::rand::SecureRandom::fill(rng, &mut jti).unwrap();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": hex::encode(jti),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        url.encode(serde_json::to_vec(&header).unwrap()),
        url.encode(serde_json::to_vec(&claims).unwrap())
    );
    let sig = pair.sign(rng, signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", url.encode(sig.as_ref()))
}

/// Decodes `%XX` escapes and `+` of a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}
