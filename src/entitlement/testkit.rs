//! Test fixtures: keys, tokens, requests, a gate, and a tiny HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ractor::ActorRef;
use serde_json::{Value, json};
use signer_actors::error::ErrorCode;
use signer_actors::pipeline::{Entitlement, EntitlementMsg, EntitlementStats};
use signer_actors::ports::{EntitlementVerdict, EntitlementVerifier, GateDenial, GateInput};
use signer_actors::request::SignRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::EntitlementGateImpl;
use super::mint::{self, Jwk, MintAlg};
use crate::config::gates::EntitlementGate;

pub(crate) const ISSUER: &str = "https://authority.test";
pub(crate) const TENANT: &str = "acme";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// The tests' clock (unix seconds): a fixed moment, not the machine's time. Tokens, proofs
/// and licences are dated from it and every job is published at it ([`Fixture::input`]), and
/// the gate judges dates at a job's publish time only, so no verdict depends on how long a
/// test takes on a loaded machine. A test that needs another moment publishes its job then
/// (see `freshness_tests`). (2027-01-15: any machine clock is far from it, so a check that
/// read the machine's time instead would fail every run, not once in a while.)
pub(crate) const NOW: u64 = 1_800_000_000;

pub(crate) fn now() -> u64 {
    NOW
}

/// [`now`] (or any other moment of the tests' clock) as a publish time.
pub(crate) fn at(unix_seconds: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds)
}

/// A Redis key prefix no other test (or run) uses.
pub(crate) fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test:entitlement:{}:{nanos}:{}:",
        std::process::id(),
        next()
    )
}

/// A pool on the machine's Redis (127.0.0.1:6379).
#[cfg(feature = "integration")]
pub(crate) fn redis_pool() -> crate::redis::Redis {
    crate::redis::connect_url("redis://127.0.0.1:6379").unwrap()
}

/// A monotonic clock the test moves ([`ManualClock::advance`]); it stands still otherwise.
pub(crate) struct ManualClock {
    start: std::time::Instant,
    offset: std::sync::Mutex<std::time::Duration>,
}

impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            start: std::time::Instant::now(),
            offset: std::sync::Mutex::new(std::time::Duration::ZERO),
        }
    }

    pub fn advance(&self, by: std::time::Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl super::clock::Clock for ManualClock {
    fn now(&self) -> std::time::Instant {
        self.start + *self.offset.lock().unwrap()
    }
}

pub(crate) struct KeyPair {
    pub pem: String,
    pub jwk: Jwk,
}

impl KeyPair {
    pub fn new(alg: MintAlg) -> Self {
        let (pem, jwk) = mint::generate_signing_key(alg).unwrap();
        KeyPair { pem, jwk }
    }

    pub fn kid(&self) -> &str {
        self.jwk.kid.as_deref().unwrap()
    }
}

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub authority: KeyPair,
    pub authority_ed: KeyPair,
    pub licensing: KeyPair,
    pub client: KeyPair,
    pub cfg: EntitlementGate,
    /// The clock of the gates [`Fixture::gate`] builds (the licensing answers' cache).
    pub clock: Arc<ManualClock>,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let authority = KeyPair::new(MintAlg::Es256);
        let authority_ed = KeyPair::new(MintAlg::EdDsa);
        let licensing = KeyPair::new(MintAlg::EdDsa);
        let client = KeyPair::new(MintAlg::Es256);
        let authority_file = dir.path().join("authority.jwks.json");
        std::fs::write(
            &authority_file,
            mint::jwks(&[authority.jwk.clone(), authority_ed.jwk.clone()]).to_string(),
        )
        .unwrap();
        let licensing_file = dir.path().join("licensing.jwks.json");
        std::fs::write(
            &licensing_file,
            mint::jwks(std::slice::from_ref(&licensing.jwk)).to_string(),
        )
        .unwrap();
        let mut cfg = EntitlementGate {
            issuer: ISSUER.into(),
            jwks_file: Some(authority_file),
            ..EntitlementGate::default()
        };
        cfg.poe.licensing_jwks_file = Some(licensing_file);
        cfg.dpop_replay_prefix = unique_prefix();
        Fixture {
            dir,
            authority,
            authority_ed,
            licensing,
            client,
            cfg,
            clock: Arc::new(ManualClock::new()),
        }
    }

    /// Claims of a good, DPoP-bound OpTok for the client key.
    pub fn optok_claims(&self) -> Value {
        let now = now();
        json!({
            "iss": ISSUER,
            "sub": "svc:scanner",
            "aud": ["other", "signer"],
            "scope": "attest.read signer.sign",
            "tid": TENANT,
            "iat": now,
            "exp": now + 300,
            "cnf": {"jkt": mint::jkt_of(&self.client.jwk)},
        })
    }

    pub fn optok(&self, claims: &Value) -> String {
        mint::mint_optok(&self.authority.pem, self.authority.kid(), claims).unwrap()
    }

    pub fn licence_claims(&self) -> Value {
        json!({
            "tid": TENANT,
            "plan": "team",
            "features": ["signer.sign", "export"],
            "exp": now() + 3600,
        })
    }

    pub fn licence(&self, claims: &Value) -> String {
        mint::mint_poe(&self.licensing.pem, self.licensing.kid(), claims).unwrap()
    }

    /// A fresh proof by the client key for `optok`.
    pub fn dpop(&self, optok: &str) -> String {
        self.dpop_with(optok, &self.cfg.dpop_htu, now(), &format!("jti-{}", next()))
    }

    pub fn dpop_with(&self, optok: &str, htu: &str, iat: u64, jti: &str) -> String {
        mint::mint_dpop(&self.client.pem, optok, htu, iat, jti).unwrap()
    }

    /// A job with these credentials (a new requestId each time).
    pub fn input(&self, optok: &str, dpop: Option<&str>, poe: (&str, &str)) -> GateInput {
        let mut auth = json!({"opTok": optok});
        if let Some(d) = dpop {
            auth["dpop"] = d.into();
        }
        let body = json!({
            "apiVersion": signer_actors::API_VERSION,
            "requestId": format!("req-{}", next()),
            "tenant": TENANT,
            "kind": "dsse",
            "auth": auth,
            "poe": {"format": poe.0, "value": poe.1},
            "scanner": {"repository": "registry.example:5000/stella-ops/scanner", "imageDigest": format!("sha256:{}", "c".repeat(64))},
            "statement": {
                "_type": "https://in-toto.io/Statement/v1",
                "subject": [{"name": "app", "digest": {"sha256": "a".repeat(64)}}],
                "predicateType": "https://slsa.dev/provenance/v1",
                "predicate": {}
            }
        });
        let request: SignRequest = serde_json::from_value(body).unwrap();
        GateInput {
            request: Arc::new(request),
            subject_tenant: Some(TENANT.into()),
            payload_bytes: 10,
            published: at(now()),
        }
    }

    /// A job that passes every check.
    pub fn good_input(&self) -> GateInput {
        let optok = self.optok(&self.optok_claims());
        let proof = self.dpop(&optok);
        let licence = self.licence(&self.licence_claims());
        self.input(&optok, Some(&proof), ("jwt", &licence))
    }

    pub async fn gate(&self) -> TestGate {
        TestGate::new(
            EntitlementGateImpl::build(
                &self.cfg,
                None,
                super::jwks::UNKNOWN_KID_REFRESH_INTERVAL,
                self.clock.clone(),
            )
            .await
            .unwrap(),
        )
        .await
    }
}

/// The gate as the pipeline runs it: the adapter behind the Entitlement actor (which owns
/// the Authority's key set and the verified tokens).
pub(crate) struct TestGate {
    pub port: Arc<EntitlementGateImpl>,
    actor: ActorRef<EntitlementMsg>,
}

/// What the adapter and the actor counted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub token_signature_checks: u64,
    pub token_cache_hits: u64,
    pub licence_signature_checks: u64,
    pub introspect_calls: u64,
    pub authority_jwks_loads: u64,
}

impl TestGate {
    pub async fn new(port: EntitlementGateImpl) -> Self {
        let port = Arc::new(port);
        let (actor, _) = ractor::Actor::spawn(
            None,
            Entitlement,
            port.clone() as Arc<dyn EntitlementVerifier>,
        )
        .await
        .unwrap();
        TestGate { port, actor }
    }

    pub async fn verify(&self, input: &GateInput) -> Result<EntitlementVerdict, GateDenial> {
        let input = input.clone();
        match self
            .actor
            .call(
                |r| EntitlementMsg::Verify(input, r),
                Some(std::time::Duration::from_secs(60)),
            )
            .await
            .unwrap()
        {
            ractor::rpc::CallResult::Success(r) => r,
            other => panic!("the Entitlement actor did not answer: {other:?}"),
        }
    }

    async fn actor_stats(&self) -> EntitlementStats {
        self.actor
            .call(
                EntitlementMsg::Stats,
                Some(std::time::Duration::from_secs(10)),
            )
            .await
            .unwrap()
            .unwrap()
    }

    pub async fn stats(&self) -> Stats {
        let actor = self.actor_stats().await;
        let port = self.port.stats();
        Stats {
            token_signature_checks: port.token_signature_checks,
            token_cache_hits: actor.token_cache_hits,
            licence_signature_checks: port.licence_signature_checks,
            introspect_calls: port.introspect_calls,
            authority_jwks_loads: port.authority_jwks_loads,
        }
    }

    /// Has the actor reload the Authority's key set now, and waits until it has.
    pub async fn refresh(&self) {
        let before = self.actor_stats().await.key_loads_finished;
        self.actor.cast(EntitlementMsg::Refresh).unwrap();
        for _ in 0..500 {
            if self.actor_stats().await.key_loads_finished > before {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the key set was not reloaded");
    }
}

impl Drop for TestGate {
    fn drop(&mut self) {
        self.actor.stop(None);
    }
}

pub(crate) async fn deny(gate: &TestGate, input: &GateInput) -> GateDenial {
    match gate.verify(input).await {
        Ok(v) => panic!("expected a denial, got {v:?}"),
        Err(d) => d,
    }
}

pub(crate) async fn code(gate: &TestGate, input: &GateInput) -> ErrorCode {
    deny(gate, input).await.error.code()
}

/// What the test server answers: status and JSON body, from method, path and request body.
pub(crate) type Handler = dyn Fn(&str, &str, &Value) -> (u16, String) + Send + Sync;

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1:0.
pub(crate) struct TestServer {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(handler: Arc<Handler>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    break;
                };
                let handler = handler.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let header_end = loop {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
                    let mut words = head.split_whitespace();
                    let method = words.next().unwrap_or_default().to_string();
                    let path = words.next().unwrap_or_default().to_string();
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < header_end + length {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body: Value =
                        serde_json::from_slice(&buf[header_end..]).unwrap_or(Value::Null);
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (status, text) = handler(&method, &path, &body);
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        TestServer { addr, calls, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops accepting connections (later requests fail to connect).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// `token` with its payload changed and its signature kept (a forgery).
pub(crate) fn tamper(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&super::jws::b64url_decode(parts[1]).unwrap()).unwrap();
    change(&mut claims);
    format!(
        "{}.{}.{}",
        parts[0],
        super::jws::b64url(claims.to_string().as_bytes()),
        parts[2]
    )
}

/// A JWS "signed" with HMAC-SHA256 under `header`, keyed with `secret`.
/// The claims of a compact JWS, unverified.
pub(crate) fn tamper_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&super::jws::b64url_decode(payload).unwrap()).unwrap()
}

pub(crate) fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let b64 = super::jws::b64url;
    let message = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, message.as_bytes());
    format!("{message}.{}", b64(tag.as_ref()))
}
