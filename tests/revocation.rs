//! Revoking and rotating keys: every replica stops signing with a revoked key and starts
//! signing with a rotated-in one within seconds, without a restart; tenants can have keys
//! of their own; and every key stays listed (with its validity) for verifiers. Every command
//! is signed by an operator key (`[gates.control]`), by the CLI or by hand.

mod common;

use std::time::Duration;

use common::operators::{Operators, send as send_control};
use common::stack::{Stack, request};
use stella_signer::config::FileKeyConfig;

/// One operator key (configure it with [`Operators::stack`]).
fn operators() -> (tempfile::TempDir, Operators) {
    let dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(dir.path(), 1);
    (dir, ops)
}

/// `args` plus the operator key.
fn signed<'a>(args: &[&'a str], ops: &'a Operators) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.push("--operator-key");
    v.push(ops.all[0].key_file.to_str().unwrap());
    v
}

fn signer(stack: &Stack, args: &[&str]) -> (i32, String) {
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
}

/// The replicas (worker ids without the per-writer suffix) that wrote an audit event
/// matching `pick`.
async fn replicas_whose_audit(
    stack: &Stack,
    js: &async_nats::jetstream::Context,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> std::collections::HashSet<String> {
    stack
        .audit_events(js)
        .await
        .iter()
        .filter(|e| pick(e))
        .filter_map(|e| {
            e["worker"]
                .as_str()?
                .rsplit_once("-w")
                .map(|w| w.0.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_signing_on_every_replica_without_a_restart() {
    let (_ops_dir, ops) = operators();
    let mut stack = ops.stack("rv", 1);
    stack.spawn_worker();
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let ec = stack.public_keys[0].keyid();
    let ed = stack.public_keys[1].keyid();
    let publish = |id: String, profile: &'static str| {
        let body = serde_json::to_vec(&request(&id, "acme", Some(profile))).unwrap();
        (id, body)
    };
    let mut n = 0;
    let mut send = async |id: String, profile: &'static str| {
        let (id, body) = publish(id, profile);
        stack
            .publish(&js, "sign.requests", &[("Nats-Msg-Id", &id)], body)
            .await;
        n += 1;
        let results = stack
            .results(&js, n, Duration::from_secs(20), Duration::ZERO)
            .await;
        results
            .into_iter()
            .find(|r| r.header("Signer-Request-Id") == Some(id.as_str()))
            .unwrap()
    };

    assert!(send("before".into(), "default").await.completed());
    let (code, list) = signer(&stack, &["keys", "list", "--json"]);
    assert_eq!(code, 0, "{list}");
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        keys.as_array().unwrap().len(),
        2,
        "both loaded keys are listed: {list}"
    );
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["status"] == "active")
    );

    // without an operator key the CLI sends nothing
    let (code, out) = signer(&stack, &["keys", "revoke", &ec]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = signer(
        &stack,
        &signed(
            &["keys", "revoke", &ec, "--reason", "key file leaked"],
            &ops,
        ),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("revoked {ec}")), "{out}");
    stack.key_state_applied(&js, &[0, 1]).await;
    for i in 0..12 {
        let r = send(format!("after-{i}"), "default").await;
        assert!(!r.completed(), "a revoked key signed: {:#}", r.body);
        assert_eq!(r.code(), "key_revoked");
        assert_eq!(r.body["error"]["retryable"], false);
    }
    assert!(
        send("other-key".into(), "ed").await.completed(),
        "other keys keep signing"
    );

    // the control subject reaches the same state through any replica
    let answer = send_control(
        &client,
        stack.subject("signer.control.keys"),
        ops.signed(
            serde_json::json!({"action": "revoke", "keyid": ed, "reason": "rotated out"}),
            &[0],
        ),
    )
    .await;
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    stack.key_state_applied(&js, &[0, 1]).await;
    assert_eq!(send("ed-after".into(), "ed").await.code(), "key_revoked");

    // both replicas refused (the audit events name their writers), and both keys stay listed
    let writers = replicas_whose_audit(&stack, &js, |e| e["errorCode"] == "key_revoked").await;
    assert_eq!(
        writers.len(),
        2,
        "every replica refuses the revoked key: {writers:?}"
    );
    let (_, list) = signer(&stack, &["keys", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ec_entry = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyid"] == ec)
        .unwrap();
    assert_eq!(ec_entry["status"], "revoked");
    assert_eq!(ec_entry["revocationReason"], "key file leaked");
    assert!(ec_entry["validUntil"].is_string() && ec_entry["validFrom"].is_string());
    assert!(
        ec_entry["publicKey"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    stack.cleanup(&js).await;
}

/// Sends one job and returns its result (`sent` counts the results expected so far).
async fn sign_one(
    stack: &Stack,
    js: &async_nats::jetstream::Context,
    sent: &mut usize,
    id: &str,
    tenant: &str,
) -> common::stack::ResultMsg {
    let body = serde_json::to_vec(&request(id, tenant, None)).unwrap();
    stack
        .publish(js, "sign.requests", &[("Nats-Msg-Id", id)], body)
        .await;
    *sent += 1;
    stack
        .results(js, *sent, Duration::from_secs(20), Duration::ZERO)
        .await
        .into_iter()
        .find(|r| r.header("Signer-Request-Id") == Some(id))
        .unwrap_or_else(|| panic!("no result for {id}:\n{}", stack.log(0)))
}

fn status_of(stack: &Stack, keyid: &str) -> String {
    let (code, list) = signer(stack, &["keys", "list", "--json"]);
    assert_eq!(code, 0, "{list}");
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyid"] == keyid)
        .and_then(|k| k["status"].as_str())
        .unwrap_or("missing")
        .to_string()
}

fn signed_by(r: &common::stack::ResultMsg) -> String {
    assert!(r.completed(), "{:#}", r.body);
    r.body["signers"][0]["keyid"].as_str().unwrap().to_string()
}

/// A deployment of two replicas for the rotation tests: `next` is configured but in no
/// profile (loaded by every replica, waiting), and tenant globex signs profile `default`
/// with `ed`, its own key. Checks both before anything is rotated.
struct Rotation {
    _staged: tempfile::TempDir,
    next: stella_signer::keys::file::GeneratedKey,
    _ops_dir: tempfile::TempDir,
    ops: Operators,
    stack: Stack,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    ec: String,
    ed: String,
    sent: usize,
}

async fn rotation(tag: &str) -> Rotation {
    let staged = tempfile::tempdir().unwrap();
    let next = stella_signer::keys::file::FileKey::generate(
        signer_actors::keys::KeyAlgorithm::EcdsaP256Sha256,
        staged.path(),
        "next",
    )
    .unwrap();
    // `next` is configured but in no profile: loaded by every replica, waiting.
    let (ops_dir, ops) = operators();
    let mut stack = ops.stack(tag, 1);
    stack.configure(|c| {
        c.keys
            .push(FileKeyConfig::new("next", &next.private_key).into());
        let default = c
            .profiles
            .get_mut("default")
            .expect("the stack's default profile");
        default.tenants.insert("globex".into(), vec!["ed".into()]);
    });
    stack.spawn_worker();
    stack.spawn_worker();
    let (client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    let ec = stack.public_keys[0].keyid();
    let ed = stack.public_keys[1].keyid();
    let mut sent = 0;
    stack.wait_log(0, &["key loaded", "\"next\""], Duration::from_secs(60));
    assert_eq!(
        status_of(&stack, &next.keyid),
        "staged",
        "loaded, in no profile yet"
    );
    assert_eq!(
        signed_by(&sign_one(&stack, &js, &mut sent, "a-0", "acme").await),
        ec
    );
    assert_eq!(
        signed_by(&sign_one(&stack, &js, &mut sent, "g-0", "globex").await),
        ed,
        "globex has keys of its own"
    );
    Rotation {
        _staged: staged,
        next,
        _ops_dir: ops_dir,
        ops,
        stack,
        client,
        js,
        ec,
        ed,
        sent,
    }
}

impl Rotation {
    /// Rotates profile `default` to `next` with the CLI and waits until both replicas have it.
    async fn rotate_default(&self) {
        let (stack, ops, js) = (&self.stack, &self.ops, &self.js);
        let (code, out) = signer(
            stack,
            &signed(
                &[
                    "keys",
                    "rotate",
                    "--profile",
                    "default",
                    "--to",
                    "next",
                    "--reason",
                    "yearly rotation",
                ],
                ops,
            ),
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("[ec] -> [next]"), "{out}");
        stack.key_state_applied(js, &[0, 1]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_reaches_every_replica_and_leaves_tenant_keys_alone() {
    let r = rotation("rot").await;
    r.rotate_default().await;
    let Rotation {
        stack,
        js,
        next,
        ed,
        mut sent,
        _ops_dir,
        _staged,
        ..
    } = r;
    for i in 1..=10 {
        let r = sign_one(&stack, &js, &mut sent, &format!("a-{i}"), "acme").await;
        assert_eq!(signed_by(&r), next.keyid, "a-{i} after the rotation");
    }
    assert_eq!(
        signed_by(&sign_one(&stack, &js, &mut sent, "g-1", "globex").await),
        ed,
        "rotating the profile leaves a tenant's own keys alone"
    );
    // both replicas signed with the new key
    let writers = replicas_whose_audit(&stack, &js, |e| {
        e["keys"][0]["keyid"] == next.keyid.as_str()
    })
    .await;
    assert_eq!(
        writers.len(),
        2,
        "every replica uses the rotated key: {writers:?}"
    );

    stack.cleanup(&js).await;
}

/// ec still signs profile `multi`; once that rotates too, ec is retired, not revoked: what
/// it signed stays verifiable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_out_of_every_profile_is_retired() {
    let r = rotation("rotm").await;
    r.rotate_default().await;
    let Rotation {
        stack,
        js,
        ops,
        next,
        ec,
        ed,
        _ops_dir,
        _staged,
        ..
    } = r;
    assert_eq!(status_of(&stack, &ec), "active");
    let (code, out) = signer(
        &stack,
        &signed(
            &[
                "keys",
                "rotate",
                "--profile",
                "multi",
                "--to",
                "next",
                "--to",
                "ed",
            ],
            &ops,
        ),
    );
    assert_eq!(code, 0, "{out}");
    let (_, list) = signer(&stack, &["keys", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    let status = |keyid: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["keyid"] == keyid)
            .unwrap_or_else(|| panic!("{keyid} not listed: {list}"))
            .clone()
    };
    assert_eq!(status(&ec)["status"], "retired", "{list}");
    assert!(status(&ec)["validUntil"].is_string(), "{list}");
    assert_eq!(status(&next.keyid)["status"], "active");
    assert_eq!(status(&ed)["status"], "active");

    stack.cleanup(&js).await;
}

/// One tenant's keys rotate through the control subject, and `keys restore` gives them back
/// their configured ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_rotates_through_the_control_subject_and_is_restored() {
    let Rotation {
        stack,
        client,
        js,
        ops,
        next,
        ed,
        mut sent,
        _ops_dir,
        _staged,
        ..
    } = rotation("rott").await;
    let answer = send_control(
        &client,
        stack.subject("signer.control.keys"),
        ops.signed(
            serde_json::json!({
                "action": "rotate", "profile": "default", "tenant": "globex", "keys": ["next", "ed"],
            }),
            &[0],
        ),
    )
    .await;
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    stack.key_state_applied(&js, &[0, 1]).await;
    let r = sign_one(&stack, &js, &mut sent, "g-2", "globex").await;
    assert_eq!(signed_by(&r), next.keyid);
    assert_eq!(
        r.body["signers"][1]["keyid"],
        ed.as_str(),
        "two signatures now"
    );

    // restore: globex signs with its configured key (ed) again
    let (code, out) = signer(
        &stack,
        &signed(
            &[
                "keys",
                "restore",
                "--profile",
                "default",
                "--tenant",
                "globex",
            ],
            &ops,
        ),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("undone"), "{out}");
    stack.key_state_applied(&js, &[0, 1]).await;
    let r = sign_one(&stack, &js, &mut sent, "g-3", "globex").await;
    assert_eq!(signed_by(&r), ed, "restored to its configured key");
    assert_eq!(r.body["signers"].as_array().unwrap().len(), 1);
    // nothing left to restore
    let (code, out) = signer(
        &stack,
        &signed(
            &[
                "keys",
                "restore",
                "--profile",
                "default",
                "--tenant",
                "globex",
            ],
            &ops,
        ),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid_command"), "{out}");
    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_no_replica_loaded_or_a_revoked_one_cannot_be_rotated_in() {
    let Rotation {
        stack,
        js,
        ops,
        ec,
        _ops_dir,
        _staged,
        ..
    } = rotation("rotr").await;
    let (code, out) = signer(&stack, &signed(&["keys", "rotate", "--to", "nope"], &ops));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no replica has loaded a key named \"nope\""),
        "{out}"
    );
    let (code, out) = signer(
        &stack,
        &signed(&["keys", "revoke", &ec, "--reason", "retired"], &ops),
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = signer(&stack, &signed(&["keys", "rotate", "--to", "ec"], &ops));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("revoked"), "{out}");

    stack.cleanup(&js).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_a_new_configuration_stops_using_is_listed_as_retired() {
    let mut stack = Stack::new("cfgout");
    stack.spawn_worker();
    let (_client, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["key loaded", "\"ec\""], Duration::from_secs(20));
    stack.wait_log(0, &["key loaded", "\"ed\""], Duration::from_secs(20));
    let ec = stack.public_keys[0].keyid();
    let ed = stack.public_keys[1].keyid();
    assert_eq!(status_of(&stack, &ec), "active");

    // the next roll-out signs everything with ed; ec stays configured (and loaded)
    stack.signal(0, "TERM");
    assert_eq!(stack.wait(0, Duration::from_secs(20)), Some(0));
    stack.configure(|c| {
        for profile in c.profiles.values_mut() {
            profile.keys = vec!["ed".into()];
        }
    });
    stack.spawn_worker();
    stack.wait_log(1, &["stella-signer serving"], Duration::from_secs(20));

    let (_, list) = signer(&stack, &["keys", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    let entry = |keyid: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["keyid"] == keyid)
            .cloned()
            .unwrap_or_else(|| panic!("{keyid} not listed: {list}"))
    };
    assert_eq!(entry(&ec)["status"], "retired", "{list}");
    assert!(entry(&ec)["validUntil"].is_string(), "{list}");
    assert_eq!(entry(&ed)["status"], "active", "{list}");
    stack.cleanup(&js).await;
}
