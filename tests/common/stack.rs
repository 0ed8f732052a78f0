//! A signer deployment for one test: its own streams, subjects, consumer, idempotency
//! records and keys on the machine's NATS (and Redis), and `stella-signer serve` processes
//! started like an operator would, so tests can run in parallel and kill replicas.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use serde_json::{Value, json};
use signer_actors::keys::{KeyAlgorithm, PublicKey};
use stella_signer::config::{
    Config, FileKeyConfig, GateMode, GatesConfig, Plan, ProfileConfig, RedisConfig,
};
use stella_signer::keys::file::FileKey;

pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// Every gate disabled: what [`Stack::new`] runs with.
pub fn disabled_gates() -> GatesConfig {
    let mut gates = GatesConfig::default();
    gates.entitlement.mode = GateMode::Disabled;
    gates.quota.mode = GateMode::Disabled;
    gates.provenance.mode = GateMode::Disabled;
    gates
}

/// A quota plan of `requests_per_second`, `burst` and `max_concurrent`, for payloads up to
/// 1 MiB, with no daily or per-request cap.
pub fn plan(requests_per_second: f64, burst: u32, max_concurrent: u32) -> Plan {
    Plan {
        requests_per_second,
        burst,
        max_concurrent,
        max_payload_bytes: 1 << 20,
        daily_cap: 0,
        max_signatures_per_request: None,
    }
}

/// `[redis]` at `url`.
pub fn redis_at(url: impl Into<String>) -> Option<RedisConfig> {
    Some(RedisConfig { url: url.into() })
}

/// One result message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct ResultMsg {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl ResultMsg {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn completed(&self) -> bool {
        self.subject.ends_with("sign.completed")
    }
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub id: String,
    pub prefix: String,
    pub config: PathBuf,
    pub public_keys: Vec<PublicKey>,
    workers: Vec<Child>,
}

fn unique_id(tag: &str) -> String {
    let mut rnd = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd).unwrap();
    format!("{tag}{}{}", std::process::id(), hex::encode(rnd))
}

impl Stack {
    /// A deployment with an ECDSA and an Ed25519 key (profiles `default` = ECDSA, `ed` =
    /// Ed25519, `multi` = both) and gates disabled. Change it with [`Stack::configure`].
    pub fn new(tag: &str) -> Stack {
        Self::with_gates(tag, disabled_gates())
    }

    /// Like [`Stack::new`] with `gates` as the `[gates]` configuration; the quota buckets and
    /// DPoP replay records in Redis get prefixes of the stack's own (`<id>:quota:`,
    /// `<id>:dpop:`).
    pub fn with_gates(tag: &str, gates: GatesConfig) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let id = unique_id(tag);
        let prefix = format!("{id}.");
        let ec = FileKey::generate(KeyAlgorithm::EcdsaP256Sha256, dir.path(), "ec").unwrap();
        let ed = FileKey::generate(KeyAlgorithm::Ed25519, dir.path(), "ed").unwrap();
        let public_keys = [&ec, &ed]
            .iter()
            .map(|g| PublicKey::from_pem(&std::fs::read_to_string(&g.public_key).unwrap()).unwrap())
            .collect();
        let config = dir.path().join("signer.toml");
        let stack = Stack {
            dir,
            id,
            prefix,
            config,
            public_keys,
            workers: Vec::new(),
        };
        let mut cfg = Config {
            gates,
            ..Config::default()
        };
        let nats = &mut cfg.nats;
        nats.url = NATS_URL.into();
        nats.subject_prefix = stack.prefix.clone();
        nats.requests_stream = stack.stream("REQ");
        nats.results_stream = stack.stream("RES");
        nats.audit_stream = stack.stream("AUD");
        nats.keys_bucket = stack.stream("KEYS");
        nats.blobs_bucket = stack.stream("BLOBS");
        nats.consumer = stack.id.clone();
        nats.ack_wait = Duration::from_secs(5);
        nats.max_deliver = 3;
        cfg.worker.backoff_base = Duration::from_millis(100);
        cfg.worker.backoff_max = Duration::from_secs(1);
        cfg.worker.drain_timeout = Duration::from_secs(20);
        cfg.idempotency.bucket = stack.stream("IDEM");
        cfg.idempotency.redis_prefix = format!("{}:idem:", stack.id);
        cfg.http.listen = String::new();
        cfg.gates.quota.redis_prefix = format!("{}:quota:", stack.id);
        cfg.gates.entitlement.dpop_replay_prefix = format!("{}:dpop:", stack.id);
        cfg.keys = vec![
            FileKeyConfig::new("ec", ec.private_key).into(),
            FileKeyConfig::new("ed", ed.private_key).into(),
        ];
        cfg.profiles = [
            ("default", ProfileConfig::new(["ec"])),
            ("ed", ProfileConfig::new(["ed"])),
            ("multi", ProfileConfig::new(["ec", "ed"])),
        ]
        .into_iter()
        .map(|(name, p)| (name.to_string(), p))
        .collect();
        stack.write_config(&cfg);
        stack
    }

    /// The configuration `serve` reads (the stack's file, without `SIGNER_*` overrides).
    pub fn cfg(&self) -> Config {
        let text = std::fs::read_to_string(&self.config).unwrap();
        Config::parse(&text, []).unwrap()
    }

    /// Changes the configuration file, for the workers started from now on. Not validated
    /// here: `serve` does that, so a test may also write one it must refuse.
    pub fn configure(&self, edit: impl FnOnce(&mut Config)) {
        let mut cfg = self.cfg();
        edit(&mut cfg);
        self.write_config(&cfg);
    }

    fn write_config(&self, cfg: &Config) {
        std::fs::write(&self.config, cfg.to_toml().unwrap()).unwrap();
    }

    pub fn subject(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    pub fn stream(&self, which: &str) -> String {
        format!("{}_{which}", self.id.to_ascii_uppercase())
    }

    /// Starts a `serve` process; returns its index. Logs go to `worker-<n>.log`.
    pub fn spawn_worker(&mut self) -> usize {
        self.spawn_worker_env(&[])
    }

    /// Like [`Stack::spawn_worker`], with extra environment (e.g. `SIGNER_HTTP__LISTEN`).
    pub fn spawn_worker_env(&mut self, env: &[(&str, &str)]) -> usize {
        let n = self.workers.len();
        let log = std::fs::File::create(self.dir.path().join(format!("worker-{n}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stella-signer"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("SIGNER_WORKER__ID", format!("{}-w{n}", self.id))
            // this deployment's DPoP replay records (the gates' table belongs to the caller)
            .env(
                "SIGNER_GATES__ENTITLEMENT__DPOP_REPLAY_BUCKET",
                self.stream("DPOP"),
            )
            .env("SIGNER_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.push(child);
        n
    }

    /// Waits until worker `n`'s log has a line containing every one of `needles`.
    pub fn wait_log(&self, n: usize, needles: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .log(n)
                .lines()
                .any(|l| needles.iter().all(|x| l.contains(x)))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no log line with {needles:?}; log:\n{}", self.log(n));
    }

    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("worker-{n}.log"))).unwrap_or_default()
    }

    /// Sends a signal to worker `n` (`KILL`, `TERM`).
    pub fn signal(&mut self, n: usize, signal: &str) {
        let pid = self.workers[n].id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for worker `n` to exit; returns its exit code.
    pub fn wait(&mut self, n: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.workers[n].try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub async fn connect(&self) -> (async_nats::Client, jetstream::Context) {
        let client = async_nats::connect(NATS_URL)
            .await
            .expect("NATS on 127.0.0.1:4222 (scripts/bootstrap.sh)");
        let js = jetstream::new(client.clone());
        (client, js)
    }

    /// Waits until the request stream exists (a worker provisioned it).
    pub async fn wait_provisioned(&self, js: &jetstream::Context) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if js.get_stream(self.stream("RES")).await.is_ok()
                && let Ok(s) = js.get_stream(self.stream("REQ")).await
                && s.get_consumer::<consumer::pull::Config>(&self.id)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "worker did not provision the streams; log:\n{}",
            self.log(0)
        );
    }

    /// Publishes a request body with headers; returns once JetStream stored it.
    pub async fn publish(
        &self,
        js: &jetstream::Context,
        subject: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) {
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, *v);
        }
        js.publish_with_headers(self.subject(subject), map, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Reads results until `expected` distinct requestIds have one, then for `settle` more,
    /// so that a duplicate would be seen too.
    pub async fn results(
        &self,
        js: &jetstream::Context,
        expected: usize,
        timeout: Duration,
        settle: Duration,
    ) -> Vec<ResultMsg> {
        let stream = js.get_stream(self.stream("RES")).await.unwrap();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out: Vec<ResultMsg> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let deadline = Instant::now() + timeout;
        let mut settle_until: Option<Instant> = None;
        loop {
            let until = settle_until.unwrap_or(deadline).min(deadline);
            let now = Instant::now();
            if now >= until {
                break;
            }
            let Ok(Some(Ok(msg))) = tokio::time::timeout(until - now, messages.next()).await else {
                break;
            };
            let headers: Vec<(String, String)> = msg
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| {
                            vs.iter()
                                .map(move |v| (k.to_string(), v.as_str().to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ct = headers
                .iter()
                .find(|(k, _)| k == "Content-Type")
                .map(|(_, v)| v.clone());
            let codec = signer_actors::codec::ContentType::from_header(ct.as_deref()).unwrap();
            let body: Value = codec.decode(&msg.payload).unwrap();
            let r = ResultMsg {
                subject: msg.subject.to_string(),
                headers,
                body,
                raw: msg.payload.to_vec(),
            };
            ids.insert(r.header("Nats-Msg-Id").unwrap_or("").to_string());
            out.push(r);
            if ids.len() >= expected && settle_until.is_none() {
                settle_until = Some(Instant::now() + settle);
            }
        }
        out
    }

    /// `stella-signer audit verify` on this deployment: (exit code, stdout).
    pub fn audit_verify(&self) -> (Option<i32>, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_stella-signer"))
            .args(["audit", "verify", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    /// Every audit event stored so far, in stream order.
    pub async fn audit_events(&self, js: &jetstream::Context) -> Vec<Value> {
        let mut stream = js.get_stream(self.stream("AUD")).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        if last == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        {
            out.push(serde_json::from_slice(&msg.payload).unwrap());
            if msg.info().map(|i| i.stream_sequence).unwrap_or(0) >= last {
                break;
            }
        }
        out
    }

    /// Stops every worker and deletes the test's streams and bucket.
    pub async fn cleanup(mut self, js: &jetstream::Context) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        for s in ["REQ", "RES", "AUD"] {
            let _ = js.delete_stream(self.stream(s)).await;
        }
        let _ = js.delete_object_store(self.stream("BLOBS")).await;
        // JTI: the used-jti bucket of [gates.control], when the test configured one
        for bucket in ["IDEM", "KEYS", "DPOP", "JTI"] {
            let _ = js
                .delete_stream(format!("KV_{}", self.stream(bucket)))
                .await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// A v1 request for `tenant` signing the example statement (with the request id in it, so
/// every payload differs).
pub fn request(request_id: &str, tenant: &str, profile: Option<&str>) -> Value {
    let mut statement: Value =
        serde_json::from_slice(&std::fs::read(super::example_statement()).unwrap()).unwrap();
    statement["predicate"]["requestId"] = request_id.into();
    let mut r = json!({
        "apiVersion": signer_actors::API_VERSION,
        "requestId": request_id,
        "tenant": tenant,
        "kind": "dsse",
        "auth": {"opTok": "test.token.unused"},
        "poe": {"format": "jwt", "value": "test.poe.unused"},
        "scanner": {"repository": "localhost/stella-ops/scanner", "imageDigest": format!("sha256:{}", "1".repeat(64))},
        "statement": statement,
    });
    if let Some(p) = profile {
        r["options"] = json!({"profile": p});
    }
    r
}

/// Verifies a completed result's envelope with the stack's keys (threshold: every signer).
pub fn verify_completed(stack: &Stack, result: &ResultMsg) {
    let env: signer_actors::dsse::Envelope =
        serde_json::from_value(result.body["envelope"].clone()).unwrap();
    let n = env.signatures.len();
    env.verify(&stack.public_keys, n)
        .unwrap_or_else(|e| panic!("{}: {e}", result.header("Nats-Msg-Id").unwrap_or("")));
    assert_eq!(
        env.jcs_sha256().unwrap(),
        result.body["bundleSha256"].as_str().unwrap()
    );
}

pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
