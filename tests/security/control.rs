//! The key control subject through the real worker: a command changes key state only with
//! valid operator signatures (enough distinct operators under dual control); every refusal
//! says why, changes nothing (jobs keep being signed) and, like every acceptance, is an
//! event in the audit hash chain that `audit verify` checks.

use std::time::Duration;

use serde_json::{Value, json};
use stella_signer::schemas::SchemaKind;
use stella_signer_tools::mint::{self, MintAlg};

use crate::common::operators::{self, Operators, claims, envelope, send, token};
use crate::common::stack::{ResultMsg, Stack, request};

/// Sends one job for `profile` and returns its result (`sent` counts results so far).
async fn sign_one(
    stack: &Stack,
    js: &async_nats::jetstream::Context,
    sent: &mut usize,
    id: &str,
    profile: &str,
) -> ResultMsg {
    let body = serde_json::to_vec(&request(id, "acme", Some(profile))).unwrap();
    stack
        .publish(js, "sign.requests", &[("Nats-Msg-Id", id)], body)
        .await;
    *sent += 1;
    stack
        .results(js, *sent, Duration::from_secs(30), Duration::ZERO)
        .await
        .into_iter()
        .find(|r| r.header("Signer-Request-Id") == Some(id))
        .unwrap_or_else(|| panic!("no result for {id}:\n{}", stack.log(0)))
}

/// The control audit events so far, each checked against the audit schema.
async fn control_events(stack: &Stack, js: &async_nats::jetstream::Context) -> Vec<Value> {
    let events: Vec<Value> = stack
        .audit_events(js)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "control")
        .collect();
    for e in &events {
        let violations = SchemaKind::Audit.violations(e).unwrap();
        assert!(violations.is_empty(), "{violations:?}: {e:#}");
        let typed: signer_actors::audit::AuditEvent = serde_json::from_value(e.clone()).unwrap();
        typed.validate().unwrap();
        assert_eq!(e["tenant"], "_control");
    }
    events
}

fn refusal(reply: &Value) -> &str {
    assert_eq!(reply["outcome"], "refused", "{reply}");
    reply["code"].as_str().unwrap_or("")
}

fn stack_with(tag: &str, ops: &Operators, required: u32) -> Stack {
    ops.stack(tag, required)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_commands_need_a_valid_single_use_operator_signature() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(dir.path(), 1);
    let op = &ops.all[0];
    let mut stack = stack_with("ctl", &ops, 1);
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["stella-signer serving"], Duration::from_secs(30));
    let subject = stack.subject("signer.control.keys");
    let ec = stack.public_keys[0].keyid();
    let ed = stack.public_keys[1].keyid();
    let mut sent = 0;
    assert!(
        sign_one(&stack, &js, &mut sent, "before", "default")
            .await
            .completed()
    );

    // every refused command targets ec: had any been applied, ec would stop signing
    let revoke_ec = json!({"action": "revoke", "keyid": ec, "reason": "attack"});
    let t = operators::now();
    let with = |k: &str, v: Value| {
        let mut c = claims(op, &revoke_ec);
        c[k] = v;
        token(&op.key.pem, &op.key.kid, &c)
    };
    let (stranger_pem, _) = mint::generate_signing_key(MintAlg::EdDsa).unwrap();
    let revoke_ed = json!({"action": "revoke", "keyid": ed, "reason": "operator-approved"});
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unsigned",
            serde_json::to_vec(&json!({"action": "revoke", "keyid": ec})).unwrap(),
        ),
        ("unsigned", envelope(&revoke_ec, &[])),
        ("malformed", b"not json".to_vec()),
        ("expired", {
            let mut c = claims(op, &revoke_ec);
            c["iat"] = (t - 900).into();
            c["nbf"] = (t - 900).into();
            c["exp"] = (t - 600).into();
            envelope(&revoke_ec, &[token(&op.key.pem, &op.key.kid, &c)])
        }),
        (
            "wrong_scope",
            envelope(&revoke_ec, &[with("scope", "signer.sign".into())]),
        ),
        (
            "lifetime_too_long",
            envelope(&revoke_ec, &[with("exp", (t + 7200).into())]),
        ),
        (
            "not_yet_valid",
            envelope(&revoke_ec, &[with("nbf", (t + 3600).into())]),
        ),
        (
            "unknown_key",
            envelope(
                &revoke_ec,
                &[token(&stranger_pem, "stranger", &claims(op, &revoke_ec))],
            ),
        ),
        (
            "bad_signature",
            envelope(
                &revoke_ec,
                &[token(&stranger_pem, &op.key.kid, &claims(op, &revoke_ec))],
            ),
        ),
        (
            // a valid signature, but over another command
            "command_mismatch",
            envelope(
                &revoke_ec,
                &[token(&op.key.pem, &op.key.kid, &claims(op, &revoke_ed))],
            ),
        ),
        (
            "malformed",
            ops.signed(json!({"action": "explode", "keyid": ec}), &[0]),
        ),
    ];
    for (code, body) in &cases {
        let reply = send(&client, subject.clone(), body.clone()).await;
        assert_eq!(refusal(&reply), *code, "{reply}");
    }
    stack.key_state_applied(&js, &[0]).await;
    let r = sign_one(&stack, &js, &mut sent, "after-refusals", "default").await;
    assert!(
        r.completed(),
        "a refused command changed key state: {:#}",
        r.body
    );

    // a valid command is applied and audited with who signed it
    let accepted = ops.signed(revoke_ed.clone(), &[0]);
    let reply = send(&client, subject.clone(), accepted.clone()).await;
    assert_eq!(reply["outcome"], "accepted", "{reply}");
    assert_eq!(reply["operators"], json!([op.key.sub]));
    stack.key_state_applied(&js, &[0]).await;
    assert_eq!(
        sign_one(&stack, &js, &mut sent, "ed-after", "ed")
            .await
            .code(),
        "key_revoked"
    );

    // the same signed command again: its jti was used
    let reply = send(&client, subject.clone(), accepted).await;
    assert_eq!(refusal(&reply), "replayed", "{reply}");
    assert!(
        sign_one(&stack, &js, &mut sent, "ec-still", "default")
            .await
            .completed()
    );

    let events = control_events(&stack, &js).await;
    assert_eq!(events.len(), cases.len() + 2, "{events:#?}");
    for (code, _) in &cases {
        assert!(
            events
                .iter()
                .any(|e| e["decision"] == "refused" && e["control"]["refusal"] == *code),
            "no refused event with {code}: {events:#?}"
        );
    }
    let ok = events
        .iter()
        .find(|e| e["decision"] == "accepted")
        .expect("an accepted event");
    assert_eq!(ok["control"]["action"], "revoke");
    assert_eq!(ok["control"]["arguments"]["keyid"], ed.as_str());
    assert_eq!(ok["control"]["signatures"][0]["sub"], op.key.sub.as_str());
    assert_eq!(ok["control"]["signatures"][0]["kid"], op.key.kid.as_str());
    assert_eq!(ok["control"]["signatures"][0]["counted"], true);
    let wrong_scope = events
        .iter()
        .find(|e| e["control"]["refusal"] == "wrong_scope")
        .unwrap();
    assert_eq!(
        wrong_scope["control"]["signatures"][0]["kid"],
        op.key.kid.as_str(),
        "a refused signature names the key it claims"
    );
    assert_eq!(wrong_scope["control"]["arguments"]["keyid"], ec.as_str());

    // one chain holds jobs and control decisions, and it verifies
    let (code, out) = stack.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    let workers: std::collections::HashSet<String> = stack
        .audit_events(&js)
        .await
        .iter()
        .filter_map(|e| e["worker"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        workers.len(),
        1,
        "jobs and control share the writer: {workers:?}"
    );
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_control_needs_two_distinct_operators() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(dir.path(), 3);
    let mut stack = stack_with("dual", &ops, 2);
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["stella-signer serving"], Duration::from_secs(30));
    let subject = stack.subject("signer.control.keys");
    let ec = stack.public_keys[0].keyid();
    let ed = stack.public_keys[1].keyid();
    let mut sent = 0;
    let revoke_ec = json!({"action": "revoke", "keyid": ec, "reason": "compromised"});

    // one operator
    let reply = send(
        &client,
        subject.clone(),
        ops.signed(revoke_ec.clone(), &[0]),
    )
    .await;
    assert_eq!(refusal(&reply), "not_enough_signatures", "{reply}");
    // the same operator twice (two signatures by one key)
    let reply = send(
        &client,
        subject.clone(),
        ops.signed(revoke_ec.clone(), &[1, 1]),
    )
    .await;
    assert_eq!(refusal(&reply), "not_enough_signatures", "{reply}");
    // two keys, one person (same sub)
    let mut c = claims(&ops.all[2], &revoke_ec);
    c["sub"] = ops.all[0].key.sub.clone().into();
    let borrowed = token(&ops.all[2].key.pem, &ops.all[2].key.kid, &c);
    let own = token(
        &ops.all[0].key.pem,
        &ops.all[0].key.kid,
        &claims(&ops.all[0], &revoke_ec),
    );
    let reply = send(
        &client,
        subject.clone(),
        envelope(&revoke_ec, &[own, borrowed]),
    )
    .await;
    assert_eq!(refusal(&reply), "not_enough_signatures", "{reply}");
    stack.key_state_applied(&js, &[0]).await;
    assert!(
        sign_one(&stack, &js, &mut sent, "still-signed", "default")
            .await
            .completed()
    );

    // two distinct operators
    let reply = send(&client, subject.clone(), ops.signed(revoke_ec, &[0, 2])).await;
    assert_eq!(reply["outcome"], "accepted", "{reply}");
    let mut who: Vec<String> = serde_json::from_value(reply["operators"].clone()).unwrap();
    who.sort();
    assert_eq!(
        who,
        [ops.all[0].key.sub.clone(), ops.all[2].key.sub.clone()]
    );
    stack.key_state_applied(&js, &[0]).await;
    assert_eq!(
        sign_one(&stack, &js, &mut sent, "ec-revoked", "default")
            .await
            .code(),
        "key_revoked"
    );

    // the CLI: the first operator signs to a file, the second co-signs and sends
    let file = dir.path().join("revoke-ed.json");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stella-signer"))
            .args(args)
            .arg("--config")
            .arg(&stack.config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let key = |i: usize| ops.all[i].key_file.to_str().unwrap().to_string();
    let (sub1, sub2) = (ops.all[1].key.sub.clone(), ops.all[2].key.sub.clone());
    let (code, out) = run(&[
        "keys",
        "revoke",
        &ed,
        "--reason",
        "dual",
        "--operator-key",
        &key(1),
        "--operator-sub",
        &sub1,
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    // sending it with one signature is refused
    let (code, out) = run(&["keys", "cosign", file.to_str().unwrap(), "--send"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not_enough_signatures"), "{out}");
    let (code, out) = run(&[
        "keys",
        "cosign",
        file.to_str().unwrap(),
        "--operator-key",
        &key(2),
        "--operator-sub",
        &sub2,
        "--send",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("revoked {ed}")), "{out}");
    stack.key_state_applied(&js, &[0]).await;
    assert_eq!(
        sign_one(&stack, &js, &mut sent, "ed-revoked", "ed")
            .await
            .code(),
        "key_revoked"
    );

    let events = control_events(&stack, &js).await;
    let decisions: Vec<&str> = events
        .iter()
        .map(|e| e["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        [
            "refused", "refused", "refused", "accepted", "refused", "accepted"
        ],
        "{events:#?}"
    );
    let counted = |e: &Value| {
        e["control"]["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["counted"] == true)
            .count()
    };
    assert_eq!(counted(&events[1]), 1, "the same operator counts once");
    assert_eq!(counted(&events[3]), 2);
    let (code, out) = stack.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gates_control_every_command_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(dir.path(), 1);
    let mut stack = Stack::new("noctl");
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["KEY CONTROL DISABLED"], Duration::from_secs(30));
    let ec = stack.public_keys[0].keyid();
    let reply = send(
        &client,
        stack.subject("signer.control.keys"),
        ops.signed(json!({"action": "revoke", "keyid": ec}), &[0]),
    )
    .await;
    assert_eq!(refusal(&reply), "control_disabled", "{reply}");
    let mut sent = 0;
    assert!(
        sign_one(&stack, &js, &mut sent, "signed", "default")
            .await
            .completed()
    );
    let events = control_events(&stack, &js).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["control"]["refusal"], "control_disabled");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_command_is_single_use_across_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(dir.path(), 1);
    let mut stack = stack_with("once", &ops, 1);
    stack.spawn_worker();
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["stella-signer serving"], Duration::from_secs(30));
    stack.wait_log(1, &["stella-signer serving"], Duration::from_secs(30));
    let ed = stack.public_keys[1].keyid();
    let signed = ops.signed(json!({"action": "revoke", "keyid": ed}), &[0]);
    let subject = stack.subject("signer.control.keys");
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let reply = send(&client, subject.clone(), signed.clone()).await;
        outcomes.push(reply["code"].as_str().unwrap_or("accepted").to_string());
    }
    // whichever replica of the queue group takes a copy, the jti is spent for all
    assert_eq!(outcomes[0], "accepted", "{outcomes:?}");
    assert!(
        outcomes[1..].iter().all(|o| o == "replayed"),
        "{outcomes:?}"
    );
    let events = control_events(&stack, &js).await;
    assert_eq!(events.len(), 8);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["decision"] == "accepted")
            .count(),
        1
    );
    let (code, out) = stack.audit_verify();
    assert_eq!(code, Some(0), "{out}");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_be_audited_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(dir.path(), 1);
    let mut stack = stack_with("noaud", &ops, 1);
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["stella-signer serving"], Duration::from_secs(30));
    stack.wait_log(0, &["key loaded", "\"ec\""], Duration::from_secs(30));
    let ec = stack.public_keys[0].keyid();
    // the audit stream is gone: nothing can be audited
    js.delete_stream(stack.stream("AUD")).await.unwrap();
    let reply = send(
        &client,
        stack.subject("signer.control.keys"),
        ops.signed(json!({"action": "revoke", "keyid": ec}), &[0]),
    )
    .await;
    assert_eq!(refusal(&reply), "unavailable", "{reply}");
    assert!(
        reply["detail"]
            .as_str()
            .unwrap()
            .starts_with("not applied: audit"),
        "{reply}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stella-signer"))
        .args(["keys", "list", "--json", "--config"])
        .arg(&stack.config)
        .output()
        .unwrap();
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyid"] == ec.as_str())
        .map(|k| k["status"].clone());
    assert_eq!(
        status,
        Some(json!("active")),
        "unaudited, so not revoked: {keys:#}"
    );
    stack.cleanup(&js).await;
}
