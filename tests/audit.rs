//! The audit stream with batches, against the real NATS (own streams): `audit verify` on a
//! mixed stream and on broken batches, `audit show` filtered by the server, `audit export`
//! and `audit verify --file`; and, ignored, the writer's throughput and a million-event query.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, stream};
use common::stack::Stack;
use serde_json::Value;
use signer_actors::audit::{AuditChain, AuditEvent, Decision};
use signer_actors::pipeline::{PipelineConfig, StandaloneAuditWriter};
use signer_actors::ports::MessagePublisher;
use stella_signer::jetstream::publisher::JsPublisher;

fn event(tenant: &str, decision: Decision, request_id: &str) -> AuditEvent {
    serde_json::from_value(serde_json::json!({
        "version": 1,
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "worker": "", "writerSeq": 0, "requestId": request_id, "tenant": tenant,
        "kind": if tenant == "_control" { "control" } else { "dsse" },
        "decision": decision, "prevHash": ""
    }))
    .unwrap()
}

/// The stack's audit stream, as `serve` provisions it.
async fn audit_stream(stack: &Stack, js: &jetstream::Context) -> stream::Stream {
    js.create_stream(stream::Config {
        name: stack.stream("AUD"),
        subjects: vec![stack.subject("signer.audit.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A writer named `name` onto the stack's audit stream.
async fn writer(
    stack: &Stack,
    js: &jetstream::Context,
    name: &str,
    batch_max: usize,
    linger: Duration,
) -> Arc<StandaloneAuditWriter> {
    let publisher: Arc<dyn MessagePublisher> = Arc::new(JsPublisher {
        js: js.clone(),
        results: js.get_stream(stack.stream("AUD")).await.unwrap(),
    });
    let mut cfg = PipelineConfig::new(name, signer_actors::profiles::ProfileTable::default());
    cfg.audit_subject_prefix = stack.subject("signer.audit");
    cfg.audit_batch_max = batch_max;
    cfg.audit_flush_interval = linger;
    Arc::new(StandaloneAuditWriter::spawn(&cfg, publisher).await.unwrap())
}

/// Appends `events` at once; the stream sequences, in order.
async fn append(w: &Arc<StandaloneAuditWriter>, events: Vec<AuditEvent>) -> Vec<u64> {
    let tasks: Vec<_> = events
        .into_iter()
        .map(|e| {
            let w = w.clone();
            tokio::spawn(async move { w.append(e).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs
}

/// `stella-signer audit <args> --config <stack>`: (exit code, stdout, stderr).
fn audit(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let out = common::signer()
        .arg("audit")
        .args(args)
        .arg("--config")
        .arg(&stack.config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `audit show --json` with `args`: the requestIds shown, and stderr.
fn show(stack: &Stack, args: &[&str]) -> (Vec<String>, String) {
    let mut all = vec!["show", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = audit(stack, &all);
    assert_eq!(code, 0, "{out}{err}");
    let mut ids: Vec<String> = out
        .lines()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            e["requestId"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    (ids, err)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<_> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_stream_verifies_and_a_broken_batch_is_reported_with_its_index() {
    let stack = Stack::new("audb");
    let (_c, js) = stack.connect().await;
    let stream = audit_stream(&stack, &js).await;
    let batched = writer(&stack, &js, "batched", 256, Duration::from_millis(30)).await;
    let solo = writer(&stack, &js, "solo", 1, Duration::from_millis(1)).await;
    let (a, b) = tokio::join!(
        append(
            &batched,
            (0..40)
                .map(|i| event(
                    ["acme", "globex"][i % 2],
                    Decision::Signed,
                    &format!("b-{i}")
                ))
                .collect()
        ),
        append(
            &solo,
            (0..10)
                .map(|i| event("acme", Decision::Denied, &format!("s-{i}")))
                .collect()
        ),
    );
    assert!(
        a.iter().collect::<std::collections::BTreeSet<_>>().len() < 40,
        "batched events share messages: {a:?}"
    );
    assert_eq!(
        b.iter().collect::<std::collections::BTreeSet<_>>().len(),
        10,
        "one message each"
    );
    let (code, out, _) = audit(&stack, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("OK: 50 events in ") && out.contains("from 2 writer(s)"),
        "{out}"
    );

    // a batch whose second event was altered
    let mut chain = AuditChain::new("forger");
    let mut forged: Vec<AuditEvent> = (0..3)
        .map(|i| {
            chain
                .seal(event("acme", Decision::Signed, &format!("f-{i}")))
                .unwrap()
        })
        .collect();
    forged[1].decision = Decision::Denied;
    let subject = stack.subject("signer.audit.acme.signed");
    let ack = js
        .publish(subject.clone(), serde_json::to_vec(&forged).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (code, out, _) = audit(&stack, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!("FAIL: stream seq {}, event 1 of 3:", ack.sequence))
            && out.contains("altered"),
        "{out}"
    );
    stream.delete_message(ack.sequence).await.unwrap();
    assert_eq!(audit(&stack, &["verify"]).0, 0);

    // a batch with an event removed from its middle
    let mut chain = AuditChain::new("forger-2");
    let mut cut: Vec<AuditEvent> = (0..3)
        .map(|i| {
            chain
                .seal(event("acme", Decision::Signed, &format!("g-{i}")))
                .unwrap()
        })
        .collect();
    cut.remove(1);
    let ack = js
        .publish(subject, serde_json::to_vec(&cut).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (code, out, _) = audit(&stack, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!("FAIL: stream seq {}, event 1 of 2:", ack.sequence))
            && out.contains("missing"),
        "{out}"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_filters_on_the_server_and_an_export_verifies_alone() {
    let stack = Stack::new("auds");
    let (_c, js) = stack.connect().await;
    audit_stream(&stack, &js).await;
    let w = writer(&stack, &js, "w", 256, Duration::from_millis(20)).await;
    let mut early = Vec::new();
    early.extend((0..5).map(|i| event("acme", Decision::Signed, &format!("a-{i}"))));
    early.extend((0..3).map(|i| event("acme", Decision::Denied, &format!("d-{i}"))));
    early.extend((0..4).map(|i| event("globex", Decision::Signed, &format!("g-{i}"))));
    append(&w, early).await;
    let since = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    let mut late = Vec::new();
    late.extend((0..2).map(|i| event("acme", Decision::Signed, &format!("late-a-{i}"))));
    late.extend((0..2).map(|i| event("globex", Decision::Denied, &format!("late-g-{i}"))));
    append(&w, late).await;

    let (acme, _) = show(&stack, &["--tenant", "acme"]);
    let mut want = [ids("a-", 5), ids("d-", 3), ids("late-a-", 2)].concat();
    want.sort();
    assert_eq!(acme, want);
    assert_eq!(
        show(&stack, &["--tenant", "acme", "--decision", "denied"]).0,
        ids("d-", 3)
    );
    assert_eq!(
        show(&stack, &["--decision", "signed", "--since", &since]).0,
        ids("late-a-", 2)
    );
    let (recent, err) = show(&stack, &["--since", &since]);
    assert_eq!(recent.len(), 4, "{recent:?}");
    assert!(err.contains("4 event(s) from "), "{err}");
    assert_eq!(show(&stack, &["--request-id", "g-2"]).0, ["g-2"]);
    // the server sends only matching messages: none for a tenant with no events
    let (none, err) = show(&stack, &["--tenant", "initech"]);
    assert!(none.is_empty());
    assert!(err.contains("0 event(s) from 0 message(s)"), "{err}");
    // the table
    let (code, table, _) = audit(
        &stack,
        &["show", "--tenant", "globex", "--decision", "denied"],
    );
    assert_eq!(code, 0);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.lines().nth(1).unwrap().contains("late-g-"), "{table}");

    // an export of acme's events verifies alone; globex's are links
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acme.jsonl");
    let file_arg = file.to_str().unwrap();
    let (code, out, err) = audit(&stack, &["export", "--tenant", "acme", "--out", file_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("exported 10 events and 6 links"), "{out}");
    let (code, out, _) = audit(&stack, &["verify", "--file", file_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("10 events and 6 links") && out.contains("w-w"),
        "{out}"
    );
    // a window: only what was stored since `since`, anchored mid-chain
    let recent = dir.path().join("recent.jsonl");
    let recent_arg = recent.to_str().unwrap();
    let (code, out, err) = audit(
        &stack,
        &[
            "export", "--since", &since, "--until", "0s", "--out", recent_arg,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("exported 4 events and 0 links"), "{out}");
    let (code, out, _) = audit(&stack, &["verify", "--file", recent_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("writerSeq 13..16"), "{out}");
    // tampered: an event's decision changed
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replacen("\"decision\":\"denied\"", "\"decision\":\"signed\"", 1),
    )
    .unwrap();
    let (code, out, _) = audit(&stack, &["verify", "--file", file_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("FAIL:") && out.contains("altered"), "{out}");
    stack.cleanup(&js).await;
}

/// A worker under load batches its jobs' events: a result's `audit.seq` is the message
/// holding its event, on `<prefix>signer.audit.<tenant>.<decision>`, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_batches_hold_its_jobs_events_where_their_results_point() {
    let mut stack = Stack::new("audw");
    // a linger, so that the jobs' events meet in batches however the machine is loaded
    stack.configure(|cfg| cfg.worker.audit_flush_interval = Duration::from_millis(200));
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    for i in 0..20 {
        let id = format!("j-{i}");
        let mut body = common::stack::request(&id, ["acme", "globex"][i % 2], None);
        if i % 5 == 0 {
            body["kind"] = "nope".into();
        }
        stack
            .publish(
                &js,
                "sign.requests",
                &[("Nats-Msg-Id", &id)],
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
    }
    let results = stack
        .results(&js, 20, Duration::from_secs(60), Duration::ZERO)
        .await;
    let stream = js.get_stream(stack.stream("AUD")).await.unwrap();
    let mut messages = std::collections::BTreeSet::new();
    for r in &results {
        let seq = r.body["audit"]["seq"].as_u64().unwrap();
        let m = stream.get_raw_message(seq).await.unwrap();
        let events = signer_actors::audit::decode_message(&m.payload).unwrap();
        let e = events
            .iter()
            .find(|e| e["requestId"] == r.body["requestId"])
            .unwrap_or_else(|| panic!("{}: not in message {seq}", r.body["requestId"]));
        let subject = stack.subject(&format!(
            "signer.audit.{}.{}",
            e["tenant"].as_str().unwrap(),
            e["decision"].as_str().unwrap()
        ));
        assert_eq!(m.subject.as_str(), subject);
        assert!(
            events
                .iter()
                .all(|o| o["tenant"] == e["tenant"] && o["decision"] == e["decision"])
        );
        messages.insert(seq);
    }
    assert!(messages.len() < 20, "events shared messages: {messages:?}");
    let (code, text) = stack.audit_verify();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("OK: 20 events in "), "{text}");
    stack.cleanup(&js).await;
}

/// Keeps what it is sent, as a stream would, without a broker.
#[derive(Default)]
struct MemPublisher(std::sync::Mutex<u64>);

#[async_trait::async_trait]
impl MessagePublisher for MemPublisher {
    async fn send(
        &self,
        _: signer_actors::ports::OutMessage,
    ) -> Result<signer_actors::ports::AckFuture, signer_actors::ports::PortError> {
        let seq = {
            let mut n = self.0.lock().unwrap();
            *n += 1;
            *n
        };
        Ok(Box::pin(async move {
            Ok(signer_actors::ports::Stored {
                stream_sequence: seq,
                duplicate: false,
            })
        }))
    }
    async fn fetch_result(
        &self,
        _: u64,
    ) -> Result<Option<signer_actors::ports::OutMessage>, signer_actors::ports::PortError> {
        Ok(None)
    }
}

/// CPU time of this process so far (user + system, from /proc: 10 ms resolution).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // after the command: state is field 3, utime 14 and stime 15 (1-based, whole line)
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Events per second and CPU per event of the writer: `appenders` tasks append `total`
/// events between them (each waits for its PubAck before its next), one tenant and
/// decision (the case batches help most, one job stream of one tenant).
async fn measure(
    publisher: Arc<dyn MessagePublisher>,
    prefix: &str,
    (batch_max, linger): (usize, Duration),
    appenders: usize,
    total: usize,
) -> (f64, f64, u64) {
    let mut cfg = PipelineConfig::new("m", signer_actors::profiles::ProfileTable::default());
    cfg.audit_subject_prefix = prefix.into();
    cfg.audit_batch_max = batch_max;
    cfg.audit_flush_interval = linger;
    let w = Arc::new(StandaloneAuditWriter::spawn(&cfg, publisher).await.unwrap());
    let per = total / appenders;
    let work: Vec<Vec<AuditEvent>> = (0..appenders)
        .map(|a| {
            (0..per)
                .map(|i| event("acme", Decision::Signed, &format!("m-{a}-{i}")))
                .collect()
        })
        .collect();
    let (start, cpu0) = (Instant::now(), cpu());
    let tasks: Vec<_> = work
        .into_iter()
        .map(|events| {
            let w = w.clone();
            tokio::spawn(async move {
                let mut last = 0;
                for e in events {
                    last = w.append(e).await.unwrap();
                }
                last
            })
        })
        .collect();
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    let (wall, used) = (start.elapsed(), cpu() - cpu0);
    Arc::into_inner(w).unwrap().stop().await;
    let n = (per * appenders) as f64;
    (n / wall.as_secs_f64(), used.as_secs_f64() * 1e6 / n, last)
}

/// The figures of docs/performance.md "Audit events in batches": `audit_batch_max` 1 (every
/// event its own message and PubAck, as before #11), 256 with a 1 ms linger (the former
/// default) and 256 without linger (the default), in memory and on the real NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --features integration --test audit -- --ignored measure --nocapture"]
async fn measure_the_audit_writer() {
    let stack = Stack::new("audm");
    let (_c, js) = stack.connect().await;
    audit_stream(&stack, &js).await;
    let nats: Arc<dyn MessagePublisher> = Arc::new(JsPublisher {
        js: js.clone(),
        results: js.get_stream(stack.stream("AUD")).await.unwrap(),
    });
    println!(
        "publisher | audit_batch_max, linger | appenders | events/s | CPU µs/event | messages"
    );
    let ms = Duration::from_millis;
    for (name, total) in [("memory", 20_000), ("nats", 10_000)] {
        for batch in [(1, ms(0)), (256, ms(1)), (256, ms(0))] {
            for appenders in [1, 16, 256] {
                let publisher = match name {
                    "memory" => Arc::new(MemPublisher::default()) as Arc<dyn MessagePublisher>,
                    _ => nats.clone(),
                };
                let before = js
                    .get_stream(stack.stream("AUD"))
                    .await
                    .unwrap()
                    .info()
                    .await
                    .unwrap()
                    .state
                    .messages;
                let (rate, cpu, last) = measure(
                    publisher,
                    &stack.subject("signer.audit"),
                    batch,
                    appenders,
                    total,
                )
                .await;
                let messages = if name == "memory" {
                    last
                } else {
                    js.get_stream(stack.stream("AUD"))
                        .await
                        .unwrap()
                        .info()
                        .await
                        .unwrap()
                        .state
                        .messages
                        - before
                };
                println!(
                    "{name} | {}, {:?} | {appenders} | {rate:.0} | {cpu:.1} | {messages}",
                    batch.0, batch.1
                );
            }
        }
    }
    stack.cleanup(&js).await;
}

/// A stream of a million events (100 tenants, two decisions, 16 events per message, loaded
/// by publishing sealed batches directly), then a few for one tenant: a tenant + since
/// query reads only those messages, and a tenant query one hundredth of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: loads a million events; cargo test --features integration --test audit -- --ignored million --nocapture"]
async fn a_tenant_and_since_query_on_a_million_events_reads_only_its_messages() {
    const EVENTS: usize = 1_000_000;
    const PER_MESSAGE: usize = 16;
    let stack = Stack::new("aud1m");
    let (_c, js) = stack.connect().await;
    audit_stream(&stack, &js).await;
    let load = Instant::now();
    let mut chain = AuditChain::new("load-w0");
    let mut acks = Vec::new();
    for m in 0..EVENTS / PER_MESSAGE {
        let (tenant, decision) = (
            format!("t{}", m % 100),
            [Decision::Signed, Decision::Denied][(m / 100) % 2],
        );
        let batch: Vec<AuditEvent> = (0..PER_MESSAGE)
            .map(|i| {
                chain
                    .seal(event(&tenant, decision, &format!("r-{m}-{i}")))
                    .unwrap()
            })
            .collect();
        let subject = stack.subject(&format!("signer.audit.{tenant}.{}", decision.as_str()));
        acks.push(
            js.publish(subject, serde_json::to_vec(&batch).unwrap().into())
                .await
                .unwrap(),
        );
        if acks.len() >= 2000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks.drain(..) {
        a.await.unwrap();
    }
    let loaded = load.elapsed();
    let since = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    for m in 0..3 {
        let batch: Vec<AuditEvent> = (0..PER_MESSAGE)
            .map(|i| {
                chain
                    .seal(event("t7", Decision::Signed, &format!("new-{m}-{i}")))
                    .unwrap()
            })
            .collect();
        js.publish(
            stack.subject("signer.audit.t7.signed"),
            serde_json::to_vec(&batch).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let info = js
        .get_stream(stack.stream("AUD"))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    println!(
        "loaded {EVENTS} events in {} messages ({} bytes) in {loaded:?}",
        info.messages, info.bytes
    );

    let timed = |args: &[&str]| {
        let start = Instant::now();
        let (ids, err) = show(&stack, args);
        (ids.len(), err.trim().to_string(), start.elapsed())
    };
    let (n, err, took) = timed(&["--tenant", "t7", "--since", &since]);
    println!("show --tenant t7 --since: {n} events, {err}, {took:?}");
    assert_eq!(n, 3 * PER_MESSAGE);
    assert!(
        err.ends_with("from 3 message(s) read"),
        "only the matching messages: {err}"
    );
    let (n, err, took) = timed(&[
        "--tenant",
        "t7",
        "--decision",
        "signed",
        "--request-id",
        "r-7-3",
    ]);
    println!("show --tenant t7 --decision signed --request-id: {n} event, {err}, {took:?}");
    assert_eq!(n, 1);
    let (n, err, took) = timed(&["--tenant", "t7"]);
    println!("show --tenant t7: {n} events, {err}, {took:?}");
    assert_eq!(n, EVENTS / 100 + 3 * PER_MESSAGE);
    let start = Instant::now();
    let (code, out, _) = audit(&stack, &["verify"]);
    println!("verify: {} in {:?}", out.trim(), start.elapsed());
    assert_eq!(code, 0, "{out}");
    stack.cleanup(&js).await;
}
