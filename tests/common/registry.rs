//! A real OCI registry for one test: Debian's `docker-registry` (distribution 2.8), serving
//! a temporary directory over plain HTTP on a free loopback port, stopped when dropped.
//! [`TestRegistry::start_with_htpasswd`] runs one that requires HTTP basic auth (its
//! `auth: htpasswd:` setting, with a bcrypt file written by Apache's `htpasswd`).
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
    /// `auth: htpasswd:` is on (anonymous requests get 401).
    htpasswd: bool,
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
        Self::start_inner(None)
    }

    /// Starts a registry that only serves `user` with `password` (HTTP basic auth).
    pub fn start_with_htpasswd(user: &str, password: &str) -> TestRegistry {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> TestRegistry {
        let mut last = String::new();
        // The port is free when picked but another process may take it before the
        // registry binds: retry with a new one.
        for _ in 0..5 {
            let mut reg = TestRegistry {
                dir: tempfile::tempdir().unwrap(),
                port: free_port(),
                child: None,
                htpasswd: auth.is_some(),
            };
            if let Some((user, password)) = auth {
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
        let htpasswd = self.htpasswd.then(|| self.dir.path().join("htpasswd"));
        std::fs::write(
            &config,
            config_yaml(&storage, self.port, htpasswd.as_deref()),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(registry_binary())
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
            let ready = if self.htpasswd { 401 } else { 200 };
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

fn config_yaml(storage: &Path, port: u16, htpasswd: Option<&Path>) -> String {
    let auth = htpasswd.map_or(String::new(), |p| {
        format!(
            "auth:\n  htpasswd:\n    realm: stella-test\n    path: {}\n",
            p.display()
        )
    });
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
