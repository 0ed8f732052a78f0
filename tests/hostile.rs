//! Hostile input through the real worker (`stella-signer serve` on the local NATS): values
//! built to blow up the refusal that echoes them, many at once, during a shutdown, and a
//! result the broker cannot take. Every message ends in exactly one compact result.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::stack::{ResultMsg, Stack, request};
use stella_signer::schemas::SchemaKind;

/// A refusal's encoding at most (the bounded message, escaped once by JSON, and the rest).
const MAX_REFUSAL_BYTES: usize = 4096;
/// A job's audit event at most (signer_actors::audit::MAX_JOB_EVENT_BYTES).
const MAX_EVENT_BYTES: usize = signer_actors::audit::MAX_JOB_EVENT_BYTES;

/// An unauthenticated request whose `apiVersion` is 300,000 quotes (600 KB of JSON).
fn quotes(id: &str) -> Vec<u8> {
    let mut r = request(id, "acme", None);
    r["apiVersion"] = "\"".repeat(300_000).into();
    serde_json::to_vec(&r).unwrap()
}

/// A request whose `scanner.imageDigest` is 200,000 control characters (400 KB of JSON).
fn control_bytes(id: &str) -> Vec<u8> {
    let mut r = request(id, "acme", None);
    r["scanner"]["imageDigest"] = "\u{1b}\n\t\r\u{8}".repeat(40_000).into();
    serde_json::to_vec(&r).unwrap()
}

fn by_id(results: &[ResultMsg]) -> HashMap<String, Vec<&ResultMsg>> {
    let mut map: HashMap<String, Vec<&ResultMsg>> = HashMap::new();
    for r in results {
        map.entry(r.header("Signer-Request-Id").unwrap_or("").to_string())
            .or_default()
            .push(r);
    }
    map
}

/// One compact, schema-valid `sign.failed` with `code`.
fn assert_compact_refusal(r: &ResultMsg, code: &str) {
    assert!(!r.completed(), "{:?}", r.body);
    assert_eq!(r.code(), code, "{:?}", r.body);
    assert!(
        r.raw.len() <= MAX_REFUSAL_BYTES,
        "refusal of {} bytes",
        r.raw.len()
    );
    let violations = SchemaKind::Failed.violations(&r.body).unwrap();
    assert!(violations.is_empty(), "{violations:?}");
}

/// Every audit event is within its bound and none echoes the hostile digest.
async fn assert_bounded_events(stack: &Stack, js: &async_nats::jetstream::Context, n: usize) {
    let events = stack.audit_events(js).await;
    assert_eq!(events.len(), n, "one event per job");
    for e in &events {
        let bytes = serde_json::to_vec(e).unwrap().len();
        assert!(bytes <= MAX_EVENT_BYTES, "event of {bytes} bytes");
        let digest = &e["provenance"]["scannerDigest"];
        assert!(
            digest.is_null() || digest.as_str().unwrap().starts_with("sha256:"),
            "{digest}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostile_message_gets_one_compact_refusal_and_a_bounded_event() {
    let mut stack = Stack::new("h");
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    for (id, body) in [
        ("quotes-1", quotes("quotes-1")),
        ("ctl-1", control_bytes("ctl-1")),
    ] {
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", id)], body)
            .await;
    }
    let results = stack
        .results(&js, 2, Duration::from_secs(30), Duration::from_secs(2))
        .await;
    let map = by_id(&results);
    assert_eq!(
        results.len(),
        2,
        "exactly one result each:\n{}",
        stack.log(0)
    );
    assert_compact_refusal(map["quotes-1"][0], "unsupported_api_version");
    assert_compact_refusal(map["ctl-1"][0], "invalid_request");
    let message = map["quotes-1"][0].body["error"]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("…[+"),
        "truncated with a marker: {message}"
    );
    assert!(
        !message.contains("\\\""),
        "quotes escaped once, by JSON only: {message}"
    );
    let message = map["ctl-1"][0].body["error"]["message"].as_str().unwrap();
    assert!(
        !message.chars().any(char::is_control),
        "control characters escaped: {message:?}"
    );
    assert_bounded_events(&stack, &js, 2).await;
    // every log line of the worker is bounded too
    let longest = stack.log(0).lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 8192, "a log line of {longest} bytes");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_hostile_messages_do_not_stop_a_replica_of_256_slots() {
    let mut stack = Stack::new("hh");
    stack.configure(|c| c.worker.max_inflight = 256);
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let n = 300;
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let (id, body) = if i % 2 == 0 {
            let id = format!("quotes-{i}");
            let body = quotes(&id);
            (id, body)
        } else {
            let id = format!("ctl-{i}");
            let body = control_bytes(&id);
            (id, body)
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(stack.subject("sign.requests"), headers, body.into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let published = std::time::SystemTime::now();
    let id = "valid-after";
    stack
        .publish(
            &js,
            "sign.requests",
            &[("Nats-Msg-Id", id)],
            serde_json::to_vec(&request(id, "acme", None)).unwrap(),
        )
        .await;
    let results = stack
        .results(&js, n + 1, Duration::from_secs(120), Duration::from_secs(2))
        .await;
    let map = by_id(&results);
    assert_eq!(
        map.len(),
        n + 1,
        "every message answered:\n{}",
        stack.log(0)
    );
    assert!(map.values().all(|v| v.len() == 1), "none twice");
    for (id, rs) in &map {
        if let Some(rest) = id.strip_prefix("quotes-") {
            assert!(rest.parse::<usize>().is_ok());
            assert_compact_refusal(rs[0], "unsupported_api_version");
        } else if id.starts_with("ctl-") {
            assert_compact_refusal(rs[0], "invalid_request");
        }
    }
    let valid = map[id][0];
    assert!(valid.completed(), "{:?}", valid.body);
    // when the valid job's result was stored, from the results stream's own timestamp
    let stream = js.get_stream(stack.stream("RES")).await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&stack.subject("sign.completed"))
        .await
        .unwrap();
    let stored_at = std::time::SystemTime::from(stored.time);
    let waited = stored_at.duration_since(published).unwrap_or_default();
    eprintln!("valid job signed {waited:?} after its publish");
    assert!(
        waited < Duration::from_secs(1),
        "the valid job published after 300 hostile ones was signed {waited:?} later"
    );
    stack.cleanup(&js).await;
}

/// Time between the first log line containing `from` and the next one containing any of
/// `to`, by the lines' `timestamp`s.
fn log_span(log: &str, from: &str, to: &[&str]) -> Option<Duration> {
    let at = |line: &str| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()
    };
    let mut lines = log.lines();
    let start = at(lines.find(|l| l.contains(from))?)?;
    let end = at(lines.find(|l| to.iter().any(|t| l.contains(t)))?)?;
    end.duration_since(start).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_hostile_messages_in_flight_exits_within_the_drain_timeout() {
    let mut stack = Stack::new("ht");
    stack.configure(|c| c.worker.drain_timeout = Duration::from_secs(5));
    let w = stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let n = 300;
    for i in 0..n {
        let id = format!("t-{i}");
        let body = if i % 2 == 0 {
            quotes(&id)
        } else {
            control_bytes(&id)
        };
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", &id)], body)
            .await;
        if i == 20 {
            stack.wait_log(w, &["job refused"], Duration::from_secs(30));
        }
    }
    let term = Instant::now();
    stack.signal(w, "TERM");
    let code = stack.wait(w, Duration::from_secs(60));
    let took = term.elapsed();
    let log = stack.log(w);
    assert_eq!(code, Some(0), "clean exit:\n{log}");
    // The drain, by the worker's own clock (its log's timestamps): from the start of the
    // drain to its last line, within the 5 s drain timeout. The wall time from SIGTERM to
    // the exit adds the test's and the kernel's scheduling, which a loaded machine
    // stretches: it only has to show that the process does not linger after the drain.
    let drain = log_span(
        &log,
        "draining in-flight jobs",
        &["drained; bye", "drain timed out"],
    )
    .unwrap_or_else(|| panic!("no drain in the log:\n{log}"));
    assert!(
        drain <= Duration::from_millis(5500),
        "drained in {drain:?}, the drain timeout is 5 s"
    );
    assert!(
        took <= Duration::from_secs(15),
        "exited {took:?} after SIGTERM, having drained in {drain:?}"
    );
    // what it did not finish, another replica does: every message ends in one result
    stack.spawn_worker();
    let results = stack
        .results(&js, n, Duration::from_secs(60), Duration::from_secs(2))
        .await;
    let map = by_id(&results);
    assert_eq!(map.len(), n, "every message answered");
    assert!(map.values().all(|v| v.len() == 1), "none twice");
    stack.cleanup(&js).await;
}

/// A statement that signs fine but whose result (envelope and bundle, each carrying the
/// payload in base64) is more than the results stream stores: an operator provisioned it
/// with a 64 KiB `max_msg_size` (serve leaves existing streams as they are), below the
/// inline limit, so the result goes inline and the stream refuses it in its PubAck. That
/// refusal is permanent, so the job is answered `payload_too_large` at once, acked, never
/// redelivered. (A result over the inline limit goes by reference instead: tests/large.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_max_payload_is_answered_payload_too_large_at_once() {
    let mut stack = Stack::new("hl");
    let (client, js) = stack.connect().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stack.stream("RES"),
        subjects: vec![
            stack.subject("sign.completed"),
            stack.subject("sign.failed"),
        ],
        max_message_size: 64 * 1024,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    stack.spawn_worker();
    stack.wait_provisioned(&js).await;
    let max_payload = client.server_info().max_payload;
    let id = "large-1";
    let mut r = request(id, "acme", None);
    // well within max_body_bytes, the broker's limit and the inline limit, but over what
    // the results stream takes once signed
    let blob = "x".repeat(100_000);
    r["statement"]["predicate"]["blob"] = blob.into();
    let body = serde_json::to_vec(&r).unwrap();
    assert!(body.len() < max_payload);
    stack
        .publish(&js, "sign.requests", &[("Nats-Msg-Id", id)], body)
        .await;
    let results = stack
        .results(&js, 1, Duration::from_secs(30), Duration::from_secs(3))
        .await;
    assert_eq!(results.len(), 1, "{results:?}\n{}", stack.log(0));
    assert_compact_refusal(&results[0], "payload_too_large");
    assert_eq!(results[0].body["error"]["retryable"], false);
    let events = stack.audit_events(&js).await;
    let decisions: Vec<_> = events.iter().map(|e| e["decision"].clone()).collect();
    assert_eq!(decisions, ["signed", "failed"], "{events:?}");
    // acked once: nothing pending, nothing redelivered
    let info = stack.wait_settled(&js).await;
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    stack.cleanup(&js).await;
}
