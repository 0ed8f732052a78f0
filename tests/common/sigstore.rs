//! The offline Sigstore peer of `../shared/conformance` (`node/mock_sigstore_server.mjs`:
//! Fulcio v2, a TSA and `trusted_root.json` on one port) for one test, stopped when dropped,
//! and OIDC identity tokens for it to certify.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::registry::{free_port, http_get};

pub struct MockSigstore {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl MockSigstore {
    pub fn start() -> MockSigstore {
        let mut last = String::new();
        for _ in 0..5 {
            let mut mock = MockSigstore {
                dir: tempfile::tempdir().unwrap(),
                port: free_port(),
                child: None,
            };
            match mock.spawn() {
                Ok(()) => return mock,
                Err(e) => last = e,
            }
        }
        panic!("mock_sigstore_server.mjs did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let script = super::conformance_dir().join("node/mock_sigstore_server.mjs");
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new("node")
            .arg(&script)
            .args(["--port", &self.port.to_string()])
            .arg("--trusted-root-out")
            .arg(self.trusted_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn node: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answered = matches!(http_get(self.port, "/healthz"), Ok((200, _)));
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if answered && exited.is_none() && self.trusted_root().exists() {
                return Ok(());
            }
            if exited.is_some() || Instant::now() > deadline {
                self.stop();
                return Err(format!("port {}: {}", self.port, self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `http://127.0.0.1:PORT` (Fulcio's base URL).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The TSA endpoint.
    pub fn tsa_url(&self) -> String {
        format!("{}/api/v1/timestamp", self.url())
    }

    /// The trusted root (Fulcio CA, TSA, logs) verifiers are given.
    pub fn trusted_root(&self) -> PathBuf {
        self.dir.path().join("trusted_root.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mock.log")
    }

    /// What the peer logged: one line per request (`POST /api/v2/signingCert -> 201`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// How many certificates Fulcio issued. The peer logs a request after answering it, so
    /// this waits up to 2 s for a count to settle.
    pub fn certificates_issued(&self) -> usize {
        let count = || {
            self.log()
                .matches("POST /api/v2/signingCert -> 201")
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = count();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = count();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    /// How many timestamps the TSA issued.
    pub fn timestamps_issued(&self) -> usize {
        self.log().matches("POST /api/v1/timestamp -> 201").count()
    }
}

impl Drop for MockSigstore {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes an OIDC identity token for `subject` from `issuer`, valid for an hour. The peer,
/// like Fulcio's own tests, decodes it without checking the issuer's signature.
pub fn write_identity_token(path: &Path, issuer: &str, subject: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
    let token = format!(
        "{}.{}.{}",
        part(serde_json::json!({"alg": "ES256", "typ": "JWT"})),
        part(serde_json::json!({
            "iss": issuer, "sub": subject, "aud": "sigstore",
            "iat": now, "exp": now + 3600,
        })),
        URL_SAFE_NO_PAD.encode(b"not-checked"),
    );
    // Written to a temporary file and renamed, as a kubelet swaps a projected token.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
