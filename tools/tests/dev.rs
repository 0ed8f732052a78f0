//! `stella-signer-tools dev`: the setup it writes, and the credentials it mints for it, as a
//! user runs them (no services needed).

use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::Value;

fn tools(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stella-signer-tools"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The claims of a compact JWS (not verified: the gates' unit tests do that).
fn claims(token: &Value) -> Value {
    let payload = token.as_str().unwrap().split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn credentials_need_an_initialised_state_and_a_valid_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let out = tools(&["dev", "token", "--state", state, "--tenant", "acme"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authority.key") && err.contains("dev init --state"),
        "{err}"
    );

    let out = tools(&["dev", "init", "--state", state]);
    assert!(out.status.success());
    let out = tools(&["dev", "identity", "--state", state, "--tenant", "a b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[A-Za-z0-9_-]"),
        "{out:?}"
    );
}

#[test]
fn init_writes_a_config_the_service_loads_and_identities_fit_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let out = tools(&["dev", "init", "--state", state]);
    assert!(out.status.success(), "{out:?}");
    let config = String::from_utf8(out.stdout).unwrap();
    let config = std::path::Path::new(config.trim());
    assert_eq!(config, dir.path().join("signer.toml"));
    let cfg = stella_signer::config::Config::load(config, std::iter::empty()).unwrap();
    let issuer = cfg.gates.entitlement.issuer.clone();

    // a second init reuses the keys
    let key = std::fs::read(dir.path().join("keys/dev-ecdsa.key")).unwrap();
    assert!(tools(&["dev", "init", "--state", state]).status.success());
    assert_eq!(
        std::fs::read(dir.path().join("keys/dev-ecdsa.key")).unwrap(),
        key
    );

    // DPoP-bound by default: the proof hashes this OpTok, the OpTok names the proof key
    let id = stdout_json(&tools(&[
        "dev", "identity", "--state", state, "--tenant", "acme",
    ]));
    let optok = claims(&id["auth"]["opTok"]);
    assert_eq!(optok["iss"], issuer.as_str());
    assert_eq!(optok["tid"], "acme");
    assert!(optok["cnf"]["jkt"].is_string(), "{optok}");
    let proof = claims(&id["auth"]["dpop"]);
    assert_eq!(
        proof["ath"],
        stella_signer_tools::mint::ath_of(id["auth"]["opTok"].as_str().unwrap())
    );
    assert_eq!(id["poe"]["format"], "jwt");
    assert_eq!(claims(&id["poe"]["value"])["tid"], "acme");
    assert_eq!(
        id["scanner"]["imageDigest"],
        stella_signer_tools::dev::dev_scanner_digest()
    );

    // --bearer: no proof, and an OpTok bound to nothing
    let bearer = stdout_json(&tools(&[
        "dev", "identity", "--state", state, "--tenant", "acme", "--bearer",
    ]));
    assert!(bearer["auth"].get("dpop").is_none(), "{bearer}");
    assert!(claims(&bearer["auth"]["opTok"]).get("cnf").is_none());
}
