//! `bench keys`: signatures per second of each key backend (file ECDSA, file Ed25519,
//! PKCS#11 ECDSA on SoftHSM, keyless with a cached Fulcio certificate, keyless with a TSA
//! timestamp per signature) through KeySigner actors, beside the raw backend call measured
//! in the same run.
//!
//! Three figures per backend: "direct call" is the backend's own synchronous call where it
//! has one (ring for file keys, `C_Sign` on the session for PKCS#11); "KeySigner" awaits the
//! port's `sign` in a loop on one task (PKCS#11 adds its hop to a blocking thread, keyless
//! its certificate check and TSA call); "actors" sends the same PAE to key actors started on
//! their own (`signer_actors::pipeline::StandaloneKeyActor`: the actor and message of a
//! Keyring pool member), 64 calls in flight. `actor/raw` divides the last by
//! the first that exists: what the actor path costs, or with several actors (a PKCS#11
//! pool) what the pool gains. SoftHSM and the offline Sigstore peer are set up by the run itself;
//! a backend whose prerequisites are missing is reported as skipped, with the reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use signer_actors::keys::{KeyAlgorithm, KeySigner};
use signer_actors::pipeline::StandaloneKeyActor;
use signer_actors::ports::NoRevocations;
use stella_signer::config::{PinSource, Pkcs11KeyConfig, Pkcs11Object};
use stella_signer::keys::keyless::{KeylessKey, KeylessSettings};
use stella_signer::keys::pkcs11::{DEFAULT_MODULE, Pkcs11Key, create_token_key};

use crate::ToolError;

/// Calls in flight to the actors, as the pipeline keeps many jobs running.
const IN_FLIGHT: usize = 64;
const PIN: &str = "1234";

/// A SoftHSM token made for this run (`SOFTHSM2_CONF` points at it).
struct SoftHsmSetup {
    _dir: tempfile::TempDir,
    token: String,
    pin_file: PathBuf,
}

/// Creates a SoftHSM token with a P-256 key in a temporary directory and points
/// `SOFTHSM2_CONF` at it. Called before any thread starts (it sets an environment variable).
/// Errors are why the PKCS#11 rows are skipped.
fn prepare_softhsm() -> Result<SoftHsmSetup, String> {
    if !Path::new(DEFAULT_MODULE).exists() {
        return Err(format!("{DEFAULT_MODULE} missing (apt install softhsm2)"));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: called by `run` before it starts the runtime; `run` is called from `main`
    // before any other thread exists (see its documentation).
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let token = "bench".to_string();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", &token])
        .args(["--so-pin", PIN, "--pin", PIN])
        .output()
        .map_err(|e| format!("softhsm2-util: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    create_token_key(
        Path::new(DEFAULT_MODULE),
        &token,
        PIN,
        KeyAlgorithm::EcdsaP256Sha256,
        "bench-ec",
        &[1],
    )
    .map_err(|e| e.to_string())?;
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, PIN).map_err(|e| e.to_string())?;
    Ok(SoftHsmSetup {
        _dir: dir,
        token,
        pin_file,
    })
}

/// The offline Sigstore peer (`mock_sigstore_server.mjs` of the conformance tools).
pub(crate) struct MockSigstore {
    child: Child,
    pub(crate) port: u16,
    _dir: tempfile::TempDir,
    pub(crate) token_file: PathBuf,
    /// The peer's `trusted_root.json` (written before it listens): the key's `fulcio_roots`.
    pub(crate) trusted_root: PathBuf,
}

impl Drop for MockSigstore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn conformance_dir() -> PathBuf {
    std::env::var_os("SIGNER_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/conformance"))
}

pub(crate) async fn start_mock_sigstore() -> Result<MockSigstore, String> {
    let script = conformance_dir().join("node/mock_sigstore_server.mjs");
    if !script.exists() {
        return Err(format!(
            "{} missing (scripts/bootstrap.sh installs it)",
            script.display()
        ));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let trusted_root = dir.path().join("trusted_root.json");
    let child = Command::new("node")
        .arg(&script)
        .args(["--port", &port.to_string()])
        .arg("--trusted-root-out")
        .arg(&trusted_root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("node: {e}"))?;
    let token_file = dir.path().join("token");
    let mock = MockSigstore {
        child,
        port,
        _dir: dir,
        token_file,
        trusted_root,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("the Sigstore peer did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claims = serde_json::json!({
        "iss": "https://bench.example", "sub": "https://bench.example/signer",
        "exp": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() + 3600)
            .unwrap_or_default(),
    });
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let token = format!(
        "{}.{}.x",
        b64.encode(br#"{"alg":"none"}"#),
        b64.encode(claims.to_string())
    );
    std::fs::write(&mock.token_file, token).map_err(|e| e.to_string())?;
    Ok(mock)
}

/// Signatures/s of `key.sign` on one task, best of 3 rounds.
pub(crate) async fn key_signer_rate(
    key: &dyn KeySigner,
    pae: &[u8],
    n: usize,
) -> Result<f64, String> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..n {
            key.sign(pae).await.map_err(|e| e.to_string())?;
        }
        best = best.max(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Signatures/s through one actor per key (round-robin, [`IN_FLIGHT`] calls in flight),
/// best of 3 rounds.
async fn actor_rate(keys: &[Arc<dyn KeySigner>], pae: &[u8], n: usize) -> Result<f64, String> {
    let mut actors: Vec<Arc<StandaloneKeyActor>> = Vec::new();
    for key in keys {
        let actor = StandaloneKeyActor::spawn(key.clone(), Arc::new(NoRevocations))
            .await
            .map_err(|e| e.to_string())?;
        actors.push(Arc::new(actor));
    }
    let pae: Arc<[u8]> = pae.into();
    let mut best: f64 = 0.0;
    let mut failure = None;
    for _ in 0..3 {
        let start = Instant::now();
        let mut pending = FuturesUnordered::new();
        let mut sent = 0;
        let mut done = 0;
        while done < n {
            while sent < n && pending.len() < IN_FLIGHT {
                let actor = actors[sent % actors.len()].clone();
                let pae = pae.clone();
                pending.push(async move { actor.sign(pae).await });
                sent += 1;
            }
            match pending.next().await {
                Some(Ok(_)) => done += 1,
                Some(Err(e)) => {
                    failure = Some(e.to_string());
                    break;
                }
                None => break,
            }
        }
        if failure.is_some() {
            break;
        }
        best = best.max(n as f64 / start.elapsed().as_secs_f64());
    }
    drop(actors);
    match failure {
        Some(f) => Err(format!("an actor call failed: {f}")),
        None => Ok(best),
    }
}

/// The direct call into a backend (no async, no port): what "raw" measures where the
/// backend has one.
type Direct = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// A backend to measure: its keys (one per actor) and, if it has one, its direct call.
struct Backend {
    keys: Vec<Arc<dyn KeySigner>>,
    direct: Option<Direct>,
}

/// One backend's figures: (direct call, `KeySigner::sign`, actors) in signatures/s.
struct Row {
    backend: String,
    outcome: Result<(Option<f64>, f64, f64), String>,
}

/// Calls/s of a direct backend call, best of 3 rounds.
fn direct_rate(direct: &Direct, pae: &[u8], n: usize) -> Result<f64, String> {
    let mut failure = None;
    let rate = super::ops_per_sec(3, n, || {
        if let Err(e) = direct(pae) {
            failure = Some(e);
        }
    });
    failure.map_or(Ok(rate), Err)
}

/// Runs every backend; prints the table and returns the JSON report.
///
/// Call it from `main` before any other thread exists: it makes the SoftHSM token first and
/// points `SOFTHSM2_CONF` at it (an environment variable), then starts its own runtime.
pub fn run(signatures: usize) -> Result<serde_json::Value, ToolError> {
    let softhsm = prepare_softhsm();
    crate::runtime()?.block_on(measure_all(signatures, softhsm))
}

async fn measure_all(
    signatures: usize,
    softhsm: Result<SoftHsmSetup, String>,
) -> Result<serde_json::Value, ToolError> {
    let statement = super::sign_local::statement_of_size(1024);
    let payload = statement
        .canonical_bytes()
        .map_err(|e| ToolError::Unusable(e.to_string()))?;
    let pae = signer_actors::dsse::pae(signer_actors::statement::INTOTO_PAYLOAD_TYPE, &payload);
    println!(
        "bench keys: {signatures} signatures of a {} B PAE per round, best of 3; actors: {IN_FLIGHT} calls in flight",
        pae.len()
    );
    let mut rows = Vec::new();
    let mut measure = async |name: &str, backend: Result<Backend, String>, n| {
        let outcome = async {
            let backend = backend?;
            let direct = match &backend.direct {
                Some(d) => Some(direct_rate(d, &pae, n)?),
                None => None,
            };
            let port = key_signer_rate(backend.keys[0].as_ref(), &pae, n).await?;
            let actor = actor_rate(&backend.keys, &pae, n).await?;
            Ok((direct, port, actor))
        }
        .await;
        rows.push(Row {
            backend: name.to_string(),
            outcome,
        });
    };

    for algorithm in [KeyAlgorithm::EcdsaP256Sha256, KeyAlgorithm::Ed25519] {
        let backend = super::sign_local::key(algorithm)
            .map(|k| {
                let k = Arc::new(k);
                let direct = k.clone();
                Backend {
                    keys: vec![k as Arc<dyn KeySigner>],
                    direct: Some(Box::new(move |m: &[u8]| {
                        direct.sign_now(m).map(drop).map_err(|e| e.to_string())
                    }) as Direct),
                }
            })
            .map_err(|e| e.to_string());
        measure(&format!("file {}", algorithm.as_str()), backend, signatures).await;
    }

    let hsm = softhsm.as_ref().map_err(Clone::clone);
    let open_hsm = |n: usize| -> Result<Backend, String> {
        let setup = hsm.as_ref().map_err(|e| e.to_string())?;
        let cfg = pkcs11_config(setup);
        let keys = (0..n)
            .map(|_| Pkcs11Key::open("bench-ec", &cfg).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let direct = keys[0].clone();
        Ok(Backend {
            keys: keys.into_iter().map(|k| k as Arc<dyn KeySigner>).collect(),
            direct: Some(Box::new(move |m: &[u8]| {
                direct.sign_blocking(m).map(drop).map_err(|e| e.to_string())
            })),
        })
    };
    measure("pkcs11 ecdsa-p256-sha256", open_hsm(1), signatures).await;
    measure("pkcs11 ecdsa, sessions = 2", open_hsm(2), signatures).await;

    let mock = start_mock_sigstore().await;
    for (name, tsa, n) in [
        ("keyless (cached certificate)", false, signatures),
        // one HTTP round trip to the TSA per signature
        ("keyless + TSA timestamp", true, (signatures / 40).max(20)),
    ] {
        let backend = match &mock {
            Ok(m) => keyless_key(m, tsa).await.map(|k| Backend {
                keys: vec![k],
                direct: None,
            }),
            Err(e) => Err(e.clone()),
        };
        measure(name, backend, n).await;
    }
    drop(mock);

    println!(
        "{:<30} {:>13} {:>13} {:>12} {:>10}",
        "backend", "direct call/s", "KeySigner/s", "actors sig/s", "actor/raw"
    );
    let mut report = Vec::new();
    for row in &rows {
        match &row.outcome {
            Ok((direct, port, actor)) => {
                // the raw ceiling: the direct call where there is one, else the port
                let raw = direct.unwrap_or(*port);
                let direct_text = direct.map_or("-".to_string(), |d| format!("{d:.0}"));
                println!(
                    "{:<30} {:>13} {:>13.0} {:>12.0} {:>10.2}",
                    row.backend,
                    direct_text,
                    port,
                    actor,
                    actor / raw
                );
                report.push(serde_json::json!({
                    "backend": row.backend, "directPerSec": direct, "keySignerPerSec": port,
                    "rawPerSec": raw, "actorPerSec": actor, "actorToRaw": actor / raw,
                }));
            }
            Err(reason) => {
                println!("{:<30} skipped: {reason}", row.backend);
                report.push(serde_json::json!({"backend": row.backend, "skipped": reason}));
            }
        }
    }
    Ok(serde_json::json!({
        "signaturesPerRound": signatures,
        "paeBytes": pae.len(),
        "inFlight": IN_FLIGHT,
        "backends": report,
    }))
}

fn pkcs11_config(setup: &SoftHsmSetup) -> Pkcs11KeyConfig {
    Pkcs11KeyConfig {
        module: Some(PathBuf::from(DEFAULT_MODULE)),
        ..Pkcs11KeyConfig::new(
            "bench-ec",
            setup.token.clone(),
            Pkcs11Object::Label("bench-ec".into()),
            PinSource::File(setup.pin_file.clone()),
        )
    }
}

pub(crate) async fn keyless_key(
    mock: &MockSigstore,
    tsa: bool,
) -> Result<Arc<dyn KeySigner>, String> {
    let url = format!("http://127.0.0.1:{}", mock.port);
    let settings = KeylessSettings {
        tsa_url: tsa.then(|| format!("{url}/api/v1/timestamp")),
        fulcio_url: url,
        identity_token_file: mock.token_file.clone(),
        renew_before: Duration::from_secs(60),
        timeout: Duration::from_secs(10),
        fulcio_roots: mock.trusted_root.clone(),
    };
    KeylessKey::open("bench-keyless", settings, None)
        .await
        .map(|k| Arc::new(k) as Arc<dyn KeySigner>)
        .map_err(|e| e.to_string())
}
