//! The quota stores against a real Redis: the machine's on 127.0.0.1:6379, each test with a
//! key prefix of its own (removed at the end), and for the batching measurement a
//! `redis-server` of its own. Built with the `integration` feature only.

use std::sync::Arc;

use ::redis as redis_rs;
use signer_actors::ports::QuotaRelease;

use super::*;

/// A key prefix of its own, and the means to remove its keys.
struct Space {
    prefix: String,
    pool: crate::redis::Redis,
}

impl Space {
    fn new() -> Self {
        let mut bytes = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
        Space {
            prefix: format!("test:quota:{}:", hex::encode(bytes)),
            pool: pool(REDIS_URL),
        }
    }

    fn gate(&self, p: Plan) -> QuotaGate {
        QuotaGate {
            redis_prefix: self.prefix.clone(),
            ..enforcing(p)
        }
    }

    /// A replica: its own pool, same keys.
    fn replica(&self, p: Plan) -> RedisQuota {
        RedisQuota::new(pool(REDIS_URL), self.gate(p)).unwrap()
    }

    async fn keys(&self) -> Vec<String> {
        let mut conn = self.pool.clone();
        redis_rs::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    async fn clean(self) {
        let keys = self.keys().await;
        if !keys.is_empty() {
            let mut conn = self.pool.clone();
            redis_rs::cmd("DEL")
                .arg(&keys)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn redis_charges_one_unit_per_signature() {
    let s = Space::new();
    signatures_are_units(&s.replica(plan(0.01, 3, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_daily_cap_counts_signatures() {
    let s = Space::new();
    daily_cap_counts_signatures(&s.replica(plan(1000.0, 100, 100, 5))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_signature_cap_and_one_slot_per_job() {
    let s = Space::new();
    signature_cap_and_one_slot_per_job(&s.replica(capped(0.01, 3, 1, 2))).await;
    // the refused request wrote nothing for its tenant
    let q = s.replica(capped(0.01, 3, 1, 2));
    denied(q.acquire("initech", "team", 10, 3).await, "per request");
    assert!(
        !s.keys().await.iter().any(|k| k.contains("{initech}")),
        "{:?}",
        s.keys().await
    );
    s.clean().await;
}

#[tokio::test]
async fn redis_multi_signature_charges_are_atomic_across_replicas() {
    let s = Space::new();
    // burst 10, nothing refills: 40 concurrent three-signature jobs from two replicas
    // get exactly three grants (9 units), and no refused job takes a partial charge.
    let p = plan(0.01, 10, 1000, 0);
    let replicas = [Arc::new(s.replica(p.clone())), Arc::new(s.replica(p))];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let q = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            q.acquire("acme", "team", 10, 3).await
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(QuotaGrant::Allowed) => allowed += 1,
            r => {
                refused(r);
            }
        }
    }
    assert_eq!(allowed, 3);
    replicas[0].acquire("acme", "team", 10, 1).await.unwrap();
    refused(replicas[1].acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_burst_then_quota_exceeded() {
    let s = Space::new();
    burst_then_refused(&s.replica(plan(1.0, 5, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_refills_over_time() {
    let s = Space::new();
    refills(&s.replica(plan(2.0, 2, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_replicas_share_one_budget() {
    let s = Space::new();
    // One token per 100 s: nothing refills during the test.
    let p = plan(0.01, 10, 1000, 0);
    let replicas = [Arc::new(s.replica(p.clone())), Arc::new(s.replica(p))];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let q = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            q.acquire("acme", "team", 10, 1).await
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(QuotaGrant::Allowed) => allowed += 1,
            r => {
                let (message, wait) = refused(r);
                assert_eq!(message, "plan 'team' allows 0.01 signatures/s");
                assert!(wait > 90_000, "retryAfterMs {wait}");
            }
        }
    }
    assert_eq!(allowed, 10);
    s.clean().await;
}

#[tokio::test]
async fn redis_tenants_are_independent() {
    let s = Space::new();
    let q = s.replica(plan(0.01, 1, 100, 0));
    q.acquire("acme", "team", 10, 1).await.unwrap();
    refused(q.acquire("acme", "team", 10, 1).await);
    assert_eq!(
        q.acquire("globex", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    s.clean().await;
}

#[tokio::test]
async fn redis_concurrency_limit_and_release() {
    let s = Space::new();
    concurrency(&s.replica(plan(1000.0, 100, 2, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_slots_of_a_crashed_replica_expire() {
    let s = Space::new();
    let p = plan(1000.0, 100, 1, 0);
    let crashed = s
        .replica(p.clone())
        .with_slot_lease(Duration::from_millis(300));
    crashed.acquire("acme", "team", 10, 1).await.unwrap();
    drop(crashed); // never releases
    let q = s.replica(p);
    refused(q.acquire("acme", "team", 10, 1).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        q.acquire("acme", "team", 10, 1).await.unwrap(),
        QuotaGrant::Allowed
    );
    // Releasing on one replica never frees another's slot.
    let other = s.replica(plan(1000.0, 100, 1, 0));
    other.release("acme", "team").await;
    refused(other.acquire("acme", "team", 10, 1).await);
    q.release("acme", "team").await;
    other.acquire("acme", "team", 10, 1).await.unwrap();
    s.clean().await;
}

#[tokio::test]
async fn redis_daily_cap() {
    let s = Space::new();
    let q = s.replica(plan(1000.0, 100, 100, 3));
    daily_cap(&q).await;
    // The counter expires after the day (plus margin), the bucket once it would be full.
    let mut conn = s.pool.clone();
    let daily: i64 = redis_rs::cmd("PTTL")
        .arg(format!("{}{{acme}}:daily", s.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let expected = ms_to_utc_midnight() + 3_600_000;
    assert!(
        (daily as u64).abs_diff(expected) < 5_000,
        "{daily} vs {expected}"
    );
    let bucket: i64 = redis_rs::cmd("PTTL")
        .arg(format!("{}{{acme}}:bucket", s.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=1_100).contains(&bucket), "bucket PTTL {bucket}");
    drop(conn);
    s.clean().await;
}

#[tokio::test]
async fn redis_payload_too_large_and_unknown_plan() {
    let s = Space::new();
    payload_and_plan(&s.replica(plan(0.01, 1, 100, 0))).await;
    s.clean().await;
}

#[tokio::test]
async fn redis_longest_wait_wins() {
    let s = Space::new();
    // Daily cap 1 and burst 1: both refuse; the cap's wait (until midnight) is reported.
    let q = s.replica(plan(0.01, 1, 100, 1));
    q.acquire("acme", "team", 10, 1).await.unwrap();
    let (message, wait) = refused(q.acquire("acme", "team", 10, 1).await);
    let midnight = ms_to_utc_midnight();
    if midnight > 100_000 {
        assert_eq!(message, "plan 'team' allows 1 signatures per UTC day");
        assert!(wait.abs_diff(midnight) < 5_000);
    } else {
        assert_eq!(message, "plan 'team' allows 0.01 signatures/s");
    }
    s.clean().await;
}

/// An answer in a form two runs can be compared in: the grant, or the code and message of
/// the refusal with its `retryAfterMs` rounded to seconds.
fn comparable(r: &Result<QuotaGrant, SignerError>) -> String {
    match r {
        Ok(g) => format!("{g:?}"),
        Err(e) => format!(
            "{} {} {:?}",
            e.code(),
            e.message(),
            e.retry_after_ms().map(|ms| ms.div_ceil(1000))
        ),
    }
}

/// A batch with every kind of answer: two tenants, a rate limit reached in the middle, a
/// two-signature request refused where a one-signature one still passes, a payload too
/// large, an unknown plan, the concurrency limit.
fn mixed_batch() -> Vec<QuotaRequest> {
    vec![
        request("acme", "team", 10, 1),
        request("acme", "team", 10, 2),
        request("globex", "team", 10, 1),
        request("acme", "team", 5000, 1), // payload too large: nothing charged
        request("acme", "gold", 10, 1),   // unknown plan
        request("acme", "team", 10, 1),   // 4 of 5 units
        request("acme", "team", 10, 2),   // 2 more do not fit: refused, takes nothing
        request("acme", "team", 10, 1),   // the last unit
        request("acme", "team", 10, 1),   // rate
        request("globex", "team", 10, 1),
        request("globex", "team", 10, 1),
        request("globex", "team", 10, 1), // its 4th slot
        request("globex", "team", 10, 1), // concurrency (4 slots)
    ]
}

#[tokio::test]
async fn redis_a_batch_answers_as_sequential_calls_do() {
    // burst 5 for each tenant, nothing refills during the test, 4 concurrent jobs
    let p = plan(0.001, 5, 4, 0);
    let (one, many) = (Space::new(), Space::new());
    let sequential = one.replica(p.clone());
    let mut expected = Vec::new();
    for r in mixed_batch() {
        expected.push(
            sequential
                .acquire(&r.tenant, &r.plan, r.payload_bytes, r.signatures)
                .await,
        );
    }
    let batched = many.replica(p).acquire_many(&mixed_batch()).await;
    let expected: Vec<String> = expected.iter().map(comparable).collect();
    let got: Vec<String> = batched.iter().map(comparable).collect();
    assert_eq!(got, expected);
    // and the answers are the ones the rules give
    let codes: Vec<_> = batched
        .iter()
        .map(|r| r.clone().map_err(|e| e.code()))
        .collect();
    use ErrorCode::*;
    let allowed = Ok(QuotaGrant::Allowed);
    assert_eq!(
        codes,
        [
            allowed,
            allowed,
            allowed,
            Err(PayloadTooLarge),
            Err(EntitlementDenied),
            allowed,
            Err(QuotaExceeded),
            allowed,
            Err(QuotaExceeded),
            allowed,
            allowed,
            allowed,
            Err(QuotaExceeded),
        ]
    );
    assert!(comparable(&batched[6]).contains("signatures/s"));
    assert!(comparable(&batched[12]).contains("concurrent"));
    one.clean().await;
    many.clean().await;
}

#[tokio::test]
async fn redis_batches_from_two_replicas_share_one_budget_exactly() {
    let s = Space::new();
    // burst 10, nothing refills: 4 rounds of 2 concurrent batches of 8 (from two replicas)
    // get exactly 10 units, whatever the interleaving.
    let p = plan(0.001, 10, 1000, 0);
    let replicas = [Arc::new(s.replica(p.clone())), Arc::new(s.replica(p))];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let q = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let batch: Vec<_> = (0..8)
                .map(|j| request("acme", "team", 10, 1 + ((i + j) % 2) as u32))
                .collect();
            let answers = q.acquire_many(&batch).await;
            batch
                .iter()
                .zip(answers)
                .map(|(r, a)| match a {
                    Ok(QuotaGrant::Allowed) => r.signatures,
                    other => {
                        refused(other);
                        0
                    }
                })
                .sum::<u32>()
        }));
    }
    let mut units = 0;
    for t in tasks {
        units += t.await.unwrap();
    }
    assert_eq!(units, 10, "granted units");
    refused(replicas[0].acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_a_batch_loads_the_script_when_redis_has_lost_it() {
    let s = Space::new();
    let salt = s.prefix.clone();
    let q = s
        .replica(plan(0.001, 3, 100, 0))
        .with_unloaded_script(&salt);
    // every command of the first pipeline is refused NOSCRIPT (nothing runs), then sent
    // again: each request is decided once
    let answers = q
        .acquire_many(&vec![request("acme", "team", 10, 1); 5])
        .await;
    let allowed = answers
        .iter()
        .filter(|a| matches!(a, Ok(QuotaGrant::Allowed)))
        .count();
    assert_eq!(allowed, 3, "{answers:?}");
    for a in answers.into_iter().skip(3) {
        refused(a);
    }
    // the single call takes the same path
    let q = s
        .replica(plan(0.001, 3, 100, 0))
        .with_unloaded_script(&format!("{salt}-single"));
    refused(q.acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_a_batch_releases_in_one_go() {
    let s = Space::new();
    let q = s.replica(plan(1000.0, 100, 1, 0));
    let batch = [
        request("acme", "team", 10, 1),
        request("globex", "team", 10, 1),
    ];
    assert!(q.acquire_many(&batch).await.iter().all(Result::is_ok));
    assert!(q.acquire_many(&batch).await.into_iter().all(|a| a.is_err()));
    q.release_many(&[
        QuotaRelease {
            tenant: "acme".into(),
            plan: "team".into(),
        },
        QuotaRelease {
            tenant: "globex".into(),
            plan: "team".into(),
        },
        // nothing held: a no-op
        QuotaRelease {
            tenant: "initech".into(),
            plan: "team".into(),
        },
    ])
    .await;
    assert!(q.acquire_many(&batch).await.iter().all(Result::is_ok));
    s.clean().await;
}

/// Reads `field` (a number) from Redis `INFO` of `url`.
async fn info_number(url: &str, section: &str, field: &str) -> f64 {
    let mut conn = pool(url);
    let info: String = redis_rs::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// This process's CPU seconds (user + system) from `/proc/self/stat`.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A measurement, not a check: what a job's quota acquire and release cost in Redis, asked
/// the way the Quota actor asked before batching (a task and a script call per acquire, a
/// task and a `ZREM` per release) and through the batching actor now, one job at a time and
/// 256 jobs at once, against a `redis-server` of its own. Run with
/// `cargo test -p stella-signer --lib --features integration measure_quota_batching -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_quota_batching() {
    use signer_actors::pipeline::{Quota, QuotaMsg};
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = plan(1e9, 1_000_000_000, 1_000_000, 0);
    let modes = ["per call (before)", "batching actor (after)"];
    let loads = [
        (1, 5_000),
        (1, 5_000),
        (256, 40_000),
        (256, 40_000),
        (256, 40_000),
        (256, 40_000),
    ];
    for (mode, (concurrency, jobs)) in modes.iter().cycle().zip(loads) {
        let gate = QuotaGate {
            mode: GateMode::Enforce,
            fail_open: false,
            redis_prefix: format!("m{}:", unix_ms()),
            batch_max: 64,
            plans: plans(p.clone()),
        };
        let store: Arc<dyn QuotaStore> = Arc::new(RedisQuota::new(pool(&url), gate).unwrap());
        store.acquire("warm", "team", 10, 1).await.unwrap(); // loads the script
        let actor = if mode.starts_with("batching") {
            let (a, _) = ractor::Actor::spawn(None, Quota, store.clone())
                .await
                .unwrap();
            Some(a)
        } else {
            None
        };
        let cpu = info_number(&url, "cpu", "used_cpu_user").await
            + info_number(&url, "cpu", "used_cpu_sys").await;
        let commands = info_number(&url, "stats", "total_commands_processed").await;
        let own = own_cpu_seconds();
        let started = Instant::now();
        let mut workers = Vec::new();
        for w in 0..concurrency {
            let store = store.clone();
            let actor = actor.clone();
            workers.push(tokio::spawn(async move {
                let tenant = format!("t{}", w % 16);
                for _ in 0..jobs / concurrency {
                    match &actor {
                        None => {
                            let (s, t) = (store.clone(), tenant.clone());
                            let grant =
                                tokio::spawn(async move { s.acquire(&t, "team", 10, 1).await })
                                    .await
                                    .unwrap();
                            assert_eq!(grant, Ok(QuotaGrant::Allowed));
                            let (s, t) = (store.clone(), tenant.clone());
                            tokio::spawn(async move { s.release(&t, "team").await });
                        }
                        Some(a) => {
                            let grant = a
                                .call(
                                    |reply| QuotaMsg::Acquire {
                                        tenant: tenant.clone(),
                                        plan: "team".into(),
                                        payload_bytes: 10,
                                        signatures: 1,
                                        reply,
                                    },
                                    Some(Duration::from_secs(10)),
                                )
                                .await
                                .unwrap();
                            assert!(matches!(
                                grant,
                                ractor::rpc::CallResult::Success(Ok(QuotaGrant::Allowed))
                            ));
                            a.cast(QuotaMsg::Release {
                                tenant: tenant.clone(),
                                plan: "team".into(),
                            })
                            .unwrap();
                        }
                    }
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        let took = started.elapsed().as_secs_f64();
        let own = own_cpu_seconds() - own;
        tokio::time::sleep(Duration::from_millis(300)).await; // the last releases
        let cpu = info_number(&url, "cpu", "used_cpu_user").await
            + info_number(&url, "cpu", "used_cpu_sys").await
            - cpu;
        let commands = info_number(&url, "stats", "total_commands_processed").await - commands;
        let jobs = (jobs / concurrency * concurrency) as f64;
        println!(
            "{mode:>24}, {concurrency:>3} at once: {:>7.0} acquire+release/s, {:>6.1} µs per job (acquire + release, wall), Redis CPU {:>5.1} µs/job, Redis commands {:.2}/job (pipelined commands count one each), test process CPU {:>5.1} µs/job",
            jobs / took,
            took * 1e6 / jobs * concurrency as f64,
            cpu * 1e6 / jobs,
            commands / jobs,
            own * 1e6 / jobs
        );
        if let Some(a) = actor {
            a.stop(None);
        }
    }
    // where Redis spends it (`calls`, `usec_per_call`): the script's commands, EVALSHA, ZREM
    let mut conn = pool(&url);
    let stats: String = redis_rs::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
        println!("  {line}");
    }
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test]
async fn from_config_picks_redis_when_given_a_pool() {
    let s = Space::new();
    let gate = s.gate(plan(0.01, 1, 10, 0));
    let memory = from_config(&gate, None).unwrap();
    let redis = from_config(&gate, Some(pool(REDIS_URL))).unwrap();
    memory.acquire("acme", "team", 10, 1).await.unwrap();
    assert!(s.keys().await.is_empty(), "the memory store wrote to Redis");
    redis.acquire("acme", "team", 10, 1).await.unwrap();
    assert_eq!(s.keys().await.len(), 2, "bucket and slots");
    refused(redis.acquire("acme", "team", 10, 1).await);
    s.clean().await;
}

#[tokio::test]
async fn redis_a_tiny_rate_still_refuses_with_a_wait() {
    let s = Space::new();
    tiny_rate_refuses_with_a_wait(&s.replica(plan(1e-300, 1, 10, 0))).await;
    s.clean().await;
}
