//! Freshness through the real worker (`docs/contract.md#freshness`): jobs published while no
//! worker runs are judged as of the moment the broker stored them, so a backlog longer than
//! `dpop_max_age` does not turn fresh proofs into refusals; a proof that was stale when it
//! was published is still refused; a job older than `worker.max_queue_age` is refused with
//! `request_expired`, audited, and neither claims its requestId nor costs quota.
//!
//! The jobs are published by an outside client, `freshness_publisher.py` (nats-py, PyJWT,
//! cryptography in a venv under `target/tmp`, made on first use), which mints its own DPoP
//! key, OpToks, proofs and licences; the test only plays the Authority and the licensing
//! service (their private keys) and runs the signer.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use serde_json::Value;
use stella_signer_tools::mint::MintAlg;

use stella_signer::config::GateMode;

use super::{HTU, ISSUER, Issuer, entitlement_gates};
use crate::common::stack::{NATS_URL, Stack, plan, redis_at, verify_completed};

/// `dpop_max_age` of these tests: small, so the backlog is many times older than a proof
/// may be at processing time.
const DPOP_MAX_AGE: Duration = Duration::from_secs(3);
const TENANT: &str = "acme";

/// A deployment with the entitlement gate enforcing (`dpop_max_age` 3 s, clock skew 1 s),
/// quota in Redis with one roomy plan, provenance off; its streams provisioned by a worker
/// that has been stopped again, so that jobs can be published while none runs.
struct Setup {
    stack: Stack,
    js: jetstream::Context,
    _client: async_nats::Client,
    authority: Issuer,
    licensing: Issuer,
    keys_dir: tempfile::TempDir,
}

/// What the publisher reports: how many jobs it published and when (unix seconds).
#[derive(Debug)]
struct Published {
    count: u64,
    last: f64,
}

impl Setup {
    /// `max_queue_age`: the worker's, when not the default.
    async fn new(tag: &str, max_queue_age: Option<Duration>) -> Setup {
        let keys_dir = tempfile::tempdir().unwrap();
        // ES256 for both: the publisher's `cryptography` reads ring's P-256 PKCS#8, not its
        // Ed25519 PKCS#8 v2 (the publisher's own DPoP key is Ed25519).
        let (authority, authority_jwks) = Issuer::new(keys_dir.path(), "authority", MintAlg::Es256);
        let (licensing, licensing_jwks) = Issuer::new(keys_dir.path(), "licensing", MintAlg::Es256);
        let mut gates = entitlement_gates(&authority_jwks, &licensing_jwks);
        gates.entitlement.dpop_max_age = DPOP_MAX_AGE;
        gates.entitlement.clock_skew = Duration::from_secs(1);
        gates
            .quota
            .plans
            .insert("big".into(), plan(100000.0, 100000, 10000));
        gates.provenance.mode = GateMode::Disabled;
        // Redis keys under prefixes of the stack's own.
        let stack = Stack::with_gates(tag, gates);
        stack.configure(|c| {
            c.redis = redis_at("redis://127.0.0.1:6379");
            if let Some(age) = max_queue_age {
                c.worker.max_queue_age = age;
            }
        });

        // The streams and the consumer, created as `serve` creates them, by the same code;
        // no worker runs yet (one started and stopped could leave a pull request behind
        // that the server would deliver to).
        let cfg = stella_signer::config::Config::parse(
            &std::fs::read_to_string(&stack.config).unwrap(),
            std::iter::empty(),
        )
        .unwrap();
        let (client, js) = stack.connect().await;
        stella_signer::jetstream::provision::provision(&js, &cfg.nats)
            .await
            .unwrap();
        Setup {
            stack,
            js,
            _client: client,
            authority,
            licensing,
            keys_dir,
        }
    }

    /// Runs the outside publisher with `args` (see freshness_publisher.py).
    async fn publish(&self, args: &[&str]) -> Published {
        let write_key = |name: &str, pem: &str| {
            let path = self.keys_dir.path().join(format!("{name}.pem"));
            std::fs::write(&path, pem).unwrap();
            path
        };
        let authority_key = write_key("authority", &self.authority.pem);
        let licensing_key = write_key("licensing", &self.licensing.pem);
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/security/freshness_publisher.py");
        let mut cmd = Command::new(crate::common::outside_python());
        cmd.arg(script)
            .args(["--nats", NATS_URL])
            .args(["--subject", &self.stack.subject("sign.requests")])
            .args([
                "--tenant", TENANT, "--plan", "big", "--issuer", ISSUER, "--htu", HTU,
            ])
            .arg("--statement")
            .arg(crate::common::example_statement())
            .arg("--authority-key")
            .arg(&authority_key)
            .args([
                "--authority-kid",
                &self.authority.kid,
                "--authority-alg",
                "ES256",
            ])
            .arg("--licensing-key")
            .arg(&licensing_key)
            .args([
                "--licensing-kid",
                &self.licensing.kid,
                "--licensing-alg",
                "ES256",
            ])
            .args(args);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "publisher failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "publisher output {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        Published {
            count: summary["published"].as_u64().unwrap(),
            last: summary["last"].as_f64().unwrap(),
        }
    }

    /// The consumer has `pending` messages waiting and has delivered none: no worker ran.
    async fn assert_untouched(&self, pending: u64) {
        let stream = self.js.get_stream(self.stack.stream("REQ")).await.unwrap();
        let mut consumer = stream
            .get_consumer::<consumer::pull::Config>(&self.stack.id)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        assert_eq!(
            (
                info.num_pending,
                info.delivered.stream_sequence,
                info.num_ack_pending
            ),
            (pending, 0, 0),
            "jobs waiting, none delivered"
        );
    }

    /// The records this deployment keeps of `what`: quota buckets in Redis (under its own
    /// `<id>:quota:` prefix); idempotency and DPoP replay records in its JetStream
    /// key-value buckets (`<ID>_IDEM`, `<ID>_DPOP`; a bucket not created yet holds none).
    async fn records(&self, what: &str) -> Vec<String> {
        let bucket = match what {
            "quota" => {
                let mut redis =
                    stella_signer::redis::connect_url("redis://127.0.0.1:6379").unwrap();
                return redis::cmd("KEYS")
                    .arg(format!("{}:{what}:*", self.stack.id))
                    .query_async(&mut redis)
                    .await
                    .unwrap();
            }
            "idem" => self.stack.stream("IDEM"),
            "dpop" => self.stack.stream("DPOP"),
            other => panic!("no records of {other}"),
        };
        let Ok(store) = self.js.get_key_value(&bucket).await else {
            return Vec::new();
        };
        let Ok(keys) = store.keys().await else {
            return Vec::new();
        };
        keys.filter_map(|k| async move { k.ok() }).collect().await
    }
}

/// Sleeps until unix time `t` has passed (and at least `min`).
async fn sleep_past(t: f64, min: Duration) {
    let started = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let wait = Duration::from_secs_f64((t - now).max(0.0)).max(min);
    tokio::time::sleep(wait).await;
    assert!(started.elapsed() >= min);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_published_while_no_worker_runs_are_judged_at_publish_time() {
    const JOBS: usize = 10_000;
    let mut s = Setup::new("fresh", None).await;
    let published = s
        .publish(&[
            "--count",
            &JOBS.to_string(),
            "--prefix",
            "job-",
            "--stale",
            "stale-proof",
            "--stale-age",
            &(2 * DPOP_MAX_AGE.as_secs()).to_string(),
            "--short-token",
            "short-token",
            "--short-token-ttl",
            "2",
        ])
        .await;
    assert_eq!(published.count, JOBS as u64 + 2);
    s.assert_untouched(JOBS as u64 + 2).await;

    // The worker starts when every proof is more than 2 × dpop_max_age old, and the short
    // token has expired (exp = publish + 2 s, skew 1 s).
    sleep_past(
        published.last + 2.0 * DPOP_MAX_AGE.as_secs_f64() + 0.5,
        Duration::from_secs(6),
    )
    .await;
    let w = s.stack.spawn_worker();
    let results = s
        .stack
        .results(
            &s.js,
            JOBS + 2,
            Duration::from_secs(900),
            Duration::from_secs(1),
        )
        .await;

    let mut by_id = std::collections::HashMap::new();
    for r in &results {
        let id = r.header("Signer-Request-Id").unwrap().to_string();
        assert!(by_id.insert(id.clone(), r).is_none(), "{id}: two results");
    }
    assert_eq!(
        by_id.len(),
        JOBS + 2,
        "one result per job\n{}",
        s.stack.log(w)
    );
    let refused: Vec<String> = (0..JOBS)
        .map(|i| format!("job-{i}"))
        .filter(|id| !by_id[id].completed())
        .map(|id| format!("{id}: {}", by_id[&id].body["error"]))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {JOBS} refused, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(3)]
    );
    for i in (0..JOBS).step_by(500) {
        verify_completed(&s.stack, by_id[&format!("job-{i}")]);
    }
    let short = by_id["short-token"];
    assert!(
        short.completed(),
        "OpTok valid at publish time: {}",
        short.body["error"]
    );

    let stale = by_id["stale-proof"];
    assert_eq!(stale.code(), "dpop_invalid", "{}", stale.body);
    let message = stale.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("publish time"), "{message}");
    assert_eq!(stale.body["error"]["retryable"], false);

    let audit = s.stack.audit_events(&s.js).await;
    let event =
        |id: &str| -> Vec<&Value> { audit.iter().filter(|e| e["requestId"] == id).collect() };
    let stale_events = event("stale-proof");
    assert_eq!(stale_events.len(), 1, "{stale_events:?}");
    assert_eq!(
        (
            &stale_events[0]["decision"],
            &stale_events[0]["errorCode"],
            &stale_events[0]["auth"]["state"]
        ),
        (&"denied".into(), &"dpop_invalid".into(), &"invalid".into())
    );
    assert_eq!(event("short-token")[0]["decision"], "signed");
    assert_eq!(
        audit.iter().filter(|e| e["decision"] == "signed").count(),
        JOBS + 1
    );
    // The publish time came from the broker's metadata, not the fallback.
    assert!(
        !s.stack.log(w).contains("metadata unreadable"),
        "{}",
        s.stack.log(w)
    );
    s.stack.cleanup(&s.js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_older_than_max_queue_age_is_request_expired_unclaimed_and_uncharged() {
    let mut s = Setup::new("qage", Some(Duration::from_secs(2))).await;
    let published = s.publish(&["--count", "1", "--prefix", "old-"]).await;
    assert_eq!(published.count, 1);
    s.assert_untouched(1).await;
    sleep_past(published.last + 2.5, Duration::from_secs(3)).await;
    let w = s.stack.spawn_worker();

    let results = s
        .stack
        .results(
            &s.js,
            1,
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(results.len(), 1, "{}", s.stack.log(w));
    let r = &results[0];
    assert_eq!(r.header("Signer-Request-Id"), Some("old-0"));
    assert_eq!(r.code(), "request_expired", "{}", r.body);
    assert_eq!(r.body["error"]["retryable"], false);

    let audit = s.stack.audit_events(&s.js).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let e = &audit[0];
    assert_eq!(
        (&e["requestId"], &e["decision"], &e["errorCode"]),
        (&"old-0".into(), &"failed".into(), &"request_expired".into())
    );
    assert_eq!(
        (&e["auth"]["state"], &e["quota"]["outcome"]),
        (&"not_checked".into(), &"not_checked".into())
    );
    assert_eq!(r.body["audit"]["seq"], 1);

    // Nothing was recorded for it: no idempotency record, no quota bucket, no DPoP record.
    for what in ["idem", "quota", "dpop"] {
        assert_eq!(s.records(what).await, Vec::<String>::new(), "{what}");
    }

    // A fresh job now is signed, and does leave those records: the checks above look at the
    // right keys.
    s.publish(&["--count", "1", "--prefix", "new-"]).await;
    let results = s
        .stack
        .results(
            &s.js,
            2,
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await;
    let new = results
        .iter()
        .find(|r| r.header("Signer-Request-Id") == Some("new-0"))
        .unwrap_or_else(|| panic!("no result for new-0\n{}", s.stack.log(w)));
    assert!(new.completed(), "{}", new.body);
    for what in ["idem", "quota", "dpop"] {
        assert!(!s.records(what).await.is_empty(), "{what}");
    }
    assert_eq!(
        s.records("idem").await.len(),
        1,
        "one idempotency record: new-0"
    );
    s.stack.cleanup(&s.js).await;
}
