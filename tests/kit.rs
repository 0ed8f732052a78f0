//! The offline kit against a running stack and the offline Sigstore peer: `kit export`
//! reads the ledger (with a revoked key and a revoked keyless certificate) and the
//! configured roots; after the stack and its streams are gone, `verify --kit` checks an
//! envelope, a keyful bundle and a keyless bundle (its TSA timestamp and Fulcio chain) with
//! nothing but the kit, refuses a revoked key's signatures, a tampered kit and a kit under
//! another pin; sigstore-js verifies the keyless bundle with the kit's `trusted_root.json`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::operators::Operators;
use common::sigstore::{MockSigstore, write_identity_token};
use common::stack::{ResultMsg, Stack, request};
use common::{run, verify_bundle_peer, write_json};
use stella_signer::config::{FileKeyConfig, FulcioKeyConfig, KitConfig, ProfileConfig};

const ISSUER: &str = "https://token.actions.example.com";
const SUBJECT: &str = "https://ci.example.com/acme/scanner/.ci/release.yml@refs/heads/main";

/// The certificates of one kind of authority (`certificateAuthorities` or
/// `timestampAuthorities`) of a trusted root, as one PEM bundle: the form `fulcio_roots`
/// and `kit.tsa_roots` also take.
fn authorities_pem(trusted_root: &Path, kind: &str, out: &Path) -> PathBuf {
    let root: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trusted_root).unwrap()).unwrap();
    let mut pem_text = String::new();
    for ca in root[kind].as_array().unwrap() {
        for c in ca["certChain"]["certificates"].as_array().unwrap() {
            let der = STANDARD.decode(c["rawBytes"].as_str().unwrap()).unwrap();
            pem_text += &pem::encode(&pem::Pem::new("CERTIFICATE", der));
        }
    }
    assert!(
        !pem_text.is_empty(),
        "no {kind} in {}",
        trusted_root.display()
    );
    let path = out.join(format!("{kind}.pem"));
    std::fs::write(&path, pem_text).unwrap();
    path
}

fn signer(args: &[&str]) -> (i32, String) {
    let mut cmd = common::signer();
    cmd.args(args);
    run(cmd)
}

async fn sign(
    stack: &Stack,
    js: &async_nats::jetstream::Context,
    id: &str,
    profile: &str,
    n: usize,
) -> ResultMsg {
    let body = serde_json::to_vec(&request(id, "acme", Some(profile))).unwrap();
    stack
        .publish(js, "sign.requests.acme", &[("Nats-Msg-Id", id)], body)
        .await;
    let r = stack
        .results(js, n, Duration::from_secs(60), Duration::ZERO)
        .await
        .into_iter()
        .find(|r| r.header("Signer-Request-Id") == Some(id))
        .unwrap_or_else(|| panic!("no result for {id}: {}", stack.log(0)));
    assert!(r.completed(), "{id}: {:#}\n{}", r.body, stack.log(0));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kit_exported_from_the_ledger_verifies_offline_and_refuses_revoked_keys_and_tampering() {
    let mock = MockSigstore::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    write_identity_token(&token, ISSUER, SUBJECT);
    let operator_dir = tempfile::tempdir().unwrap();
    let ops = Operators::new(operator_dir.path(), 1);
    let operator_key = ops.all[0].key_file.to_str().unwrap().to_string();
    let mut stack = ops.stack("kit", 1);
    let out = tempfile::tempdir().unwrap();
    let work = out.path();

    // The keyless key trusts the peer's trusted_root.json (Fulcio CA, CT log, TSA): the kit
    // carries them; the TSA chain is also given as PEM (`kit.tsa_roots`), as for a TSA the
    // Fulcio roots file does not name. The kit key is a file key in no profile.
    let tsa_pem = authorities_pem(&mock.trusted_root(), "timestampAuthorities", work);
    let (kit_private, kit_pub, kit_keyid) = common::generate_key(work, "ed25519", "kit");
    stack.configure(|c| {
        c.keys.push(
            FulcioKeyConfig {
                tsa_url: Some(mock.tsa_url()),
                ..FulcioKeyConfig::new("keyless", mock.url(), &token, mock.trusted_root())
            }
            .into(),
        );
        c.keys.push(FileKeyConfig::new("kit", &kit_private).into());
        c.profiles
            .insert("keyless".into(), ProfileConfig::new(["keyless"]));
        c.kit = Some(KitConfig {
            key: "kit".into(),
            tsa_roots: vec![tsa_pem.clone()],
        });
    });
    stack.spawn_worker();
    let (_c, js) = stack.connect().await;
    stack.wait_provisioned(&js).await;
    stack.wait_log(0, &["keyless certificate issued"], Duration::from_secs(30));

    // an envelope by ec and ed, and a keyless bundle
    let multi = sign(&stack, &js, "kit-multi", "multi", 1).await;
    let keyless = sign(&stack, &js, "kit-keyless", "keyless", 2).await;
    let envelope = write_json(work, "multi.envelope.json", &multi.body["envelope"]);
    let ec_bundle = write_json(work, "ec.bundle.json", &multi.body["bundles"][0]);
    let ed_bundle = write_json(work, "ed.bundle.json", &multi.body["bundles"][1]);
    let ed_only = serde_json::json!({
        "payloadType": multi.body["envelope"]["payloadType"],
        "payload": multi.body["envelope"]["payload"],
        "signatures": [multi.body["envelope"]["signatures"][1]],
    });
    let ed_envelope = write_json(work, "ed.envelope.json", &ed_only);
    let keyless_bundle = write_json(work, "keyless.bundle.json", &keyless.body["bundles"][0]);
    let leaf = keyless.body["signers"][0]["certificateChain"][0]
        .as_str()
        .unwrap()
        .to_string();
    let leaf_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        pem::parse(&leaf).unwrap().contents(),
    ));

    // revoke ed, and the keyless certificate (after it signed)
    let config = stack.config.to_str().unwrap().to_string();
    let ed_keyid = stack.public_keys[1].keyid();
    for (id, reason) in [(&ed_keyid, "ed leaked"), (&leaf_sha, "certificate retired")] {
        let (code, text) = signer(&[
            "keys",
            "revoke",
            id,
            "--reason",
            reason,
            "--operator-key",
            &operator_key,
            "--config",
            &config,
        ]);
        assert_eq!(code, 0, "{text}");
    }
    stack.wait_log(0, &["key revoked", &ed_keyid], Duration::from_secs(20));

    let kit = work.join("kit");
    let kit_dir = kit.to_str().unwrap();
    let (code, text) = signer(&["kit", "export", "--out", kit_dir, "--config", &config]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&kit_keyid), "{text}");
    // exporting again writes the same files (the ECDSA-free kit key signs deterministically)
    let again = work.join("kit-again");
    let (code, text) = signer(&[
        "kit",
        "export",
        "--out",
        again.to_str().unwrap(),
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{text}");
    for f in [
        "manifest.json",
        "manifest.dsse.json",
        "keys.json",
        "trusted_root.json",
    ] {
        assert_eq!(
            std::fs::read(kit.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f} differs between two exports"
        );
    }
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kit.join("keys.json")).unwrap()).unwrap();
    let ed = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyid"] == ed_keyid.as_str())
        .unwrap_or_else(|| panic!("ed not in the kit: {keys:#}"));
    assert_eq!(ed["status"], "revoked", "{ed:#}");
    assert_eq!(ed["revocation"]["reason"], "ed leaked", "{ed:#}");

    // the stack and its streams go: what follows uses the kit alone
    let ec = stack.public_keys[0].clone();
    stack.cleanup(&js).await;
    drop(mock);

    let kit_pub = kit_pub.to_str().unwrap();
    let verify = |file: &Path, extra: &[&str]| {
        let mut args = vec!["verify", file.to_str().unwrap(), "--kit", kit_dir];
        args.extend_from_slice(extra);
        signer(&args)
    };
    let pinned = ["--kit-key", kit_pub];

    // the envelope: ec counts, ed (revoked, and an envelope has no trusted time) does not
    let (code, text) = verify(&envelope, &pinned);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&ec.keyid()), "{text}");
    let (code, text) = verify(&envelope, &["--kit-key", kit_pub, "--threshold", "2"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("no trusted time") && text.contains("ed leaked"),
        "{text}"
    );
    let (code, text) = verify(&ed_envelope, &pinned);
    assert_eq!(code, 1, "a revoked key's envelope verified: {text}");

    // keyful bundles
    let (code, text) = verify(&ec_bundle, &["--kit-keyid", &kit_keyid]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = verify(&ed_bundle, &pinned);
    assert_eq!(code, 1, "a revoked key's bundle verified: {text}");

    // the keyless bundle: timestamped before its certificate was revoked, so it stands
    let (code, text) = verify(
        &keyless_bundle,
        &["--kit-key", kit_pub, "--san", SUBJECT, "--issuer", ISSUER],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("timestamped") && text.contains(&leaf_sha),
        "{text}"
    );
    let (code, text) = verify(
        &keyless_bundle,
        &["--kit-key", kit_pub, "--san", "https://other"],
    );
    assert_eq!(code, 1, "{text}");
    // sigstore-js accepts it with the kit's trusted root
    let trusted_root = kit.join("trusted_root.json");
    let (code, text) = verify_bundle_peer(
        &keyless_bundle,
        &[
            "--trusted-root",
            trusted_root.to_str().unwrap(),
            "--tlog",
            "0",
            "--san",
            SUBJECT,
            "--issuer",
            ISSUER,
            "--intoto",
        ],
    );
    assert_eq!(code, 0, "sigstore-js with the kit's trusted root: {text}");
    // a timestamp that does not verify (its last byte, in the TSA's signature, changed)
    let mut forged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&keyless_bundle).unwrap()).unwrap();
    let stamp = &mut forged["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"]
        [0]["signedTimestamp"];
    let mut der = STANDARD.decode(stamp.as_str().unwrap()).unwrap();
    *der.last_mut().unwrap() ^= 1;
    *stamp = STANDARD.encode(der).into();
    let forged = write_json(work, "keyless-forged-tsa.bundle.json", &forged);
    let (code, text) = verify(&forged, &pinned);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("timestamp 0"), "{text}");
    // a keyless bundle whose timestamp is gone has no trusted time
    let mut bare: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&keyless_bundle).unwrap()).unwrap();
    bare["verificationMaterial"]
        .as_object_mut()
        .unwrap()
        .remove("timestampVerificationData");
    let bare = write_json(work, "keyless-no-tsa.bundle.json", &bare);
    let (code, text) = verify(&bare, &pinned);
    assert_eq!(code, 1, "{text}");

    // the pin: without one nothing is decided; another key's pin refuses the kit
    let (code, text) = verify(&envelope, &[]);
    assert_eq!(code, 2, "{text}");
    let ec_pub = common::stack::path_of(work, "ec.pub");
    std::fs::write(&ec_pub, ec.to_pem()).unwrap();
    let (code, text) = verify(&envelope, &["--kit-key", ec_pub.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("kit refused"), "{text}");

    // a tampered kit: ed un-revoked in keys.json
    let keys_json = kit.join("keys.json");
    let original = std::fs::read_to_string(&keys_json).unwrap();
    std::fs::write(&keys_json, original.replace("\"revoked\"", "\"active\"")).unwrap();
    let (code, text) = verify(&ed_envelope, &pinned);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("kit refused") && text.contains("keys.json"),
        "{text}"
    );
}
