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

/// The least time the waits below give what they wait for (results, log lines, an exit,
/// provisioning), whatever a test asks: a loaded machine (CI shares its cores) can be many
/// times slower than a developer's, and a passing test waits only as long as the worker
/// takes, so a long deadline costs nothing but the time a failing test takes to say so.
pub const MIN_WAIT: Duration = Duration::from_secs(120);

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
        self.spawn(Command::new(env!("CARGO_BIN_EXE_stella-signer")), env)
    }

    /// A worker of a deployment shared by many tests and kept in a `static` (which is never
    /// dropped): it gets SIGKILL when the thread that started it ends (`setpriv --pdeathsig`,
    /// util-linux), so it dies with the test process however that ends. Start it from a
    /// thread that lives as long as the process.
    pub fn spawn_shared_worker(&mut self) -> usize {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--pdeathsig",
            "KILL",
            "--",
            env!("CARGO_BIN_EXE_stella-signer"),
        ]);
        self.spawn(cmd, &[])
    }

    fn spawn(&mut self, mut cmd: Command, env: &[(&str, &str)]) -> usize {
        let n = self.workers.len();
        let log = std::fs::File::create(self.dir.path().join(format!("worker-{n}.log"))).unwrap();
        let child = cmd
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
            .expect("stella-signer serve starts (setpriv for a shared worker)");
        self.workers.push(child);
        n
    }

    /// Waits until worker `n`'s log has a line containing every one of `needles` (at least
    /// [`MIN_WAIT`]).
    pub fn wait_log(&self, n: usize, needles: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout.max(MIN_WAIT);
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

    /// The port worker `n`'s HTTP server listens on (`http.listen`, port 0 included), from
    /// its `http server listening` log line: waits for that line up to `timeout`, and panics
    /// at once, with the log, if the worker exits first (a port taken by someone else, a bad
    /// configuration).
    pub fn http_port(&mut self, n: usize, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            let port = self.log(n).lines().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                if v["fields"]["message"] != "http server listening" {
                    return None;
                }
                v["fields"]["listen"]
                    .as_str()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            });
            if let Some(port) = port {
                return port;
            }
            self.assert_running(n, "before its HTTP server listened");
            assert!(
                Instant::now() < deadline,
                "worker {n} did not log its HTTP address within {timeout:?}; log:\n{}",
                self.log(n)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until worker `n` answers `GET path` on `port` with `status`; returns the body.
    /// Panics at once, with the log, if the worker exits, and at `timeout` with the last
    /// answer and the log.
    pub fn wait_http(
        &mut self,
        n: usize,
        port: u16,
        path: &str,
        status: u16,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match http_get(port, path) {
                Some((s, body)) if s == status => return body,
                answer => last = answer.or(last),
            }
            self.assert_running(n, &format!("while {path} was awaited"));
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {status} within {timeout:?}; last answer {last:?}; log:\n{}",
                self.log(n)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Panics, with its log, if worker `n` has exited.
    pub fn assert_running(&mut self, n: usize, when: &str) {
        if let Some(status) = self.workers[n].try_wait().unwrap() {
            panic!("worker {n} exited ({status}) {when}; log:\n{}", self.log(n));
        }
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

    /// Waits for worker `n` to exit (at least [`MIN_WAIT`]); returns its exit code.
    pub fn wait(&mut self, n: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout.max(MIN_WAIT);
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
        let deadline = Instant::now() + MIN_WAIT;
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

    /// The durable consumer's state once `done` holds for it, polled up to a minute (a
    /// loaded broker or worker is slow; a passing test waits only as long as they take).
    pub async fn wait_consumer(
        &self,
        js: &jetstream::Context,
        what: &str,
        done: impl Fn(&consumer::Info) -> bool,
    ) -> consumer::Info {
        let deadline = Instant::now() + MIN_WAIT;
        loop {
            // asked afresh each time: after a failover the stream may answer only later
            let info = match js.get_stream(self.stream("REQ")).await {
                Ok(s) => match s.get_consumer::<consumer::pull::Config>(&self.id).await {
                    Ok(mut c) => c.info().await.cloned().map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Ok(info) = &info
                && done(info)
            {
                return info.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the consumer never got {what}: {info:?}; log:\n{}",
                self.log(0)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The consumer's state once every stored request was delivered and settled (nothing
    /// pending, nothing waiting for an ack): what a redelivery check reads.
    pub async fn wait_settled(&self, js: &jetstream::Context) -> consumer::Info {
        self.wait_consumer(js, "settled", |i| {
            i.num_pending == 0 && i.num_ack_pending == 0
        })
        .await
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

    /// Reads results until `expected` distinct requestIds have one (waiting at least
    /// [`MIN_WAIT`] for them), then for `settle` more, so that a duplicate would be seen too.
    pub async fn results(
        &self,
        js: &jetstream::Context,
        expected: usize,
        timeout: Duration,
        settle: Duration,
    ) -> Vec<ResultMsg> {
        let timeout = timeout.max(MIN_WAIT);
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
            let r = result_msg(&msg);
            ids.insert(r.header("Nats-Msg-Id").unwrap_or("").to_string());
            out.push(r);
            if ids.len() >= expected && settle_until.is_none() {
                settle_until = Some(Instant::now() + settle);
            }
        }
        out
    }

    /// Every result stored so far for `request_id` (by its `Signer-Request-Id` header),
    /// waiting up to `timeout` for the first: for tests that share one deployment and so
    /// one results stream. Reads the stream up to its last message at the time of the call
    /// (or of the first result), so a duplicate stored before then is returned too.
    pub async fn results_for(
        &self,
        js: &jetstream::Context,
        request_id: &str,
        timeout: Duration,
    ) -> Vec<ResultMsg> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<ResultMsg> = self
                .stored(js, "RES")
                .await
                .iter()
                .map(result_msg)
                .filter(|r| r.header("Signer-Request-Id") == Some(request_id))
                .collect();
            if !found.is_empty() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no result for {request_id} within {timeout:?}; log:\n{}",
                self.log(0)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The audit events of `request_id`, waiting up to `timeout` for the first (the event
    /// is written after the result it describes).
    pub async fn audit_for(
        &self,
        js: &jetstream::Context,
        request_id: &str,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self
                .stored(js, "AUD")
                .await
                .iter()
                .flat_map(|m| signer_actors::audit::decode_message(&m.payload).unwrap())
                .filter(|e| e["requestId"] == request_id)
                .collect();
            if !found.is_empty() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no audit event for {request_id} within {timeout:?}; log:\n{}",
                self.log(0)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every message of stream `which` (`RES`, `AUD`) up to its last one now.
    async fn stored(&self, js: &jetstream::Context, which: &str) -> Vec<jetstream::Message> {
        let mut stream = js.get_stream(self.stream(which)).await.unwrap();
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
            tokio::time::timeout(Duration::from_secs(30), messages.next()).await
        {
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            out.push(msg);
            if seq >= last {
                break;
            }
        }
        out
    }

    /// Deletes what earlier [`Stack`]s tagged `tag` left in NATS (streams, buckets, object
    /// store) when the process that made them is gone: a deployment shared by a test
    /// binary's tests is never cleaned up by its last test (no test knows it is the last).
    /// Stacks of processes still running (another run at the same time) are left alone.
    pub async fn remove_stale(js: &jetstream::Context, tag: &str) {
        let tag = tag.to_ascii_uppercase();
        let mut names = js.stream_names();
        let mut stale = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            let bare = name
                .strip_prefix("KV_")
                .or_else(|| name.strip_prefix("OBJ_"))
                .unwrap_or(&name);
            let Some(id) = bare.strip_prefix(&tag).and_then(|r| r.split('_').next()) else {
                continue;
            };
            // `<pid><8 hex digits>`, see unique_id
            let Some(pid) = id.get(..id.len().saturating_sub(8)) else {
                continue;
            };
            if !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                stale.push(name.clone());
            }
        }
        for name in stale {
            let _ = js.delete_stream(&name).await;
        }
    }

    /// Waits until workers `ns` have applied every key-state change stored so far in the key
    /// bucket (revocations, rotations, restores, by the CLI or the control subject), instead
    /// of sleeping and hoping the watch was quick: puts a barrier entry that the watch logs
    /// and ignores (an unreadable `identity-revoked.` record, which changes no state), waits
    /// for that log line on each worker, then deletes it. The watch applies entries in
    /// order, so everything stored before the barrier is in effect once it is logged.
    pub async fn key_state_applied(&self, js: &jetstream::Context, ns: &[usize]) {
        let bucket = js.get_key_value(self.stream("KEYS")).await.unwrap();
        let mut rnd = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd).unwrap();
        let key = format!("identity-revoked.barrier{}", hex::encode(rnd));
        bucket.put(&key, "barrier".into()).await.unwrap();
        for &n in ns {
            self.wait_log(
                n,
                &["unreadable identity revocation", &key],
                Duration::from_secs(60),
            );
        }
        bucket.delete(&key).await.unwrap();
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

    /// Every audit event stored so far, in stream order (the events of a batch in order).
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
            out.extend(signer_actors::audit::decode_message(&msg.payload).unwrap());
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

/// `GET path` over plain TCP on loopback (HTTP/1.1, the connection closed by the server);
/// returns (status code, body), or `None` when nothing answered (in 5 s).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// A stored result as a consumer sees it (body decoded by its `Content-Type`).
fn result_msg(msg: &jetstream::Message) -> ResultMsg {
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
    ResultMsg {
        subject: msg.subject.to_string(),
        headers,
        body,
        raw: msg.payload.to_vec(),
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

/// Caller identity for `submit --identity` and `sign --identity` on a stack whose gates
/// are disabled: `DIR/identity.json`.
pub fn identity_file(dir: &Path) -> PathBuf {
    super::write_json(
        dir,
        "identity.json",
        &json!({
            "auth": {"opTok": "test.token.unused"},
            "poe": {"format": "jwt", "value": "test.poe.unused"},
            "scanner": {"repository": "localhost/stella-ops/scanner", "imageDigest": format!("sha256:{}", "1".repeat(64))}
        }),
    )
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
