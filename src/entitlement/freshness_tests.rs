//! Every date rule of the gate is judged at the job's publish time (`GateInput::published`),
//! not at the time of processing, and no cache lets a date check be skipped. The times are
//! injected (the tests' clock, `testkit::now`): a job "published" long ago is processed now.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use signer_actors::audit::{AuthState, PoeState};
use signer_actors::error::ErrorCode;
use signer_actors::ports::GateInput;

use super::testkit::{Fixture, TestServer, at, deny, now, unique_prefix};

/// `input` as if the broker had stored it at unix second `t`.
fn published_at(mut input: GateInput, t: u64) -> GateInput {
    input.published = at(t);
    input
}

/// A job published at `t` with this OpTok, a proof made at `iat`, and a good licence.
fn job(fx: &Fixture, optok: &str, iat: u64, t: u64) -> GateInput {
    let proof = fx.dpop_with(
        optok,
        &fx.cfg.dpop_htu,
        iat,
        &format!("jti-{}", unique_prefix()),
    );
    let licence = fx.licence(&fx.licence_claims());
    published_at(fx.input(optok, Some(&proof), ("jwt", &licence)), t)
}

/// OpTok claims valid from `from` to `until`.
fn optok_claims(fx: &Fixture, from: u64, until: u64) -> Value {
    let mut c = fx.optok_claims();
    c["iat"] = from.into();
    c["exp"] = until.into();
    c
}

fn max_age(fx: &Fixture) -> u64 {
    fx.cfg.dpop_max_age.as_secs()
}

fn skew(fx: &Fixture) -> u64 {
    fx.cfg.clock_skew.as_secs()
}

#[tokio::test]
async fn a_proof_fresh_at_publish_time_is_honoured_however_long_the_job_waited() {
    let fx = Fixture::new();
    let gate = fx.gate().await;
    let published = now() - 3600; // an hour in the queue, with a 1-minute dpop_max_age
    let optok = fx.optok(&optok_claims(&fx, published - 10, now() + 300));
    for iat in [
        published,
        published - max_age(&fx),
        published + max_age(&fx),
    ] {
        let v = gate
            .verify(&job(&fx, &optok, iat, published))
            .await
            .unwrap_or_else(|d| panic!("iat {iat}, published {published}: {}", d.error));
        assert_eq!(v.auth, AuthState::Valid);
    }
}

#[tokio::test]
async fn a_proof_stale_or_early_at_publish_time_is_refused() {
    let fx = Fixture::new();
    let gate = fx.gate().await;
    let published = now() - 3600;
    let optok = fx.optok(&optok_claims(&fx, published - 10, now() + 300));
    for (name, iat) in [
        ("already stale when published", published - max_age(&fx) - 1),
        ("made after the window", published + max_age(&fx) + 1),
        // Fresh by the clock of processing, but an hour after the job was published: a proof
        // minted now cannot belong to a job stored an hour ago.
        ("made at processing time", now()),
    ] {
        let d = deny(&gate, &job(&fx, &optok, iat, published)).await;
        assert_eq!(
            d.error.code(),
            ErrorCode::DpopInvalid,
            "{name}: {}",
            d.error
        );
        assert!(
            d.error.message().contains("publish time"),
            "{name}: {}",
            d.error
        );
        assert_eq!(d.auth, Some(AuthState::Invalid), "{name}");
    }
}

#[tokio::test]
async fn optok_exp_is_judged_at_publish_time() {
    let fx = Fixture::new();
    let gate = fx.gate().await;
    let now = now();
    // Expired by now (past the skew), valid when the job was published.
    let exp = now - skew(&fx) - 100;
    let optok = fx.optok(&optok_claims(&fx, exp - 600, exp));
    let published = exp - 200;
    gate.verify(&job(&fx, &optok, published, published))
        .await
        .unwrap();
    // A job published exactly at exp + skew is still in time (from the cache).
    let edge = exp + skew(&fx);
    gate.verify(&job(&fx, &optok, edge, edge)).await.unwrap();
    let stats = gate.stats().await;
    assert_eq!(
        (stats.token_signature_checks, stats.token_cache_hits),
        (1, 1)
    );
    // One published a second later is not.
    let late = edge + 1;
    let d = deny(&gate, &job(&fx, &optok, late, late)).await;
    assert_eq!(d.error.code(), ErrorCode::AuthExpired, "{}", d.error);
    assert_eq!(gate.stats().await.token_cache_hits, 1, "refused, not a hit");
}

#[tokio::test]
async fn optok_nbf_and_iat_are_judged_at_publish_time_even_from_the_cache() {
    let fx = Fixture::new();
    let gate = fx.gate().await;
    let now = now();
    let nbf = now + 600;
    let mut claims = optok_claims(&fx, nbf, nbf + 3600);
    claims["nbf"] = nbf.into();
    let optok = fx.optok(&claims);

    // Published before nbf (beyond the skew): refused, nothing cached.
    let early = nbf - skew(&fx) - 1;
    let d = deny(&gate, &job(&fx, &optok, early, early)).await;
    assert_eq!(d.error.code(), ErrorCode::AuthExpired, "{}", d.error);
    assert_eq!(gate.stats().await.token_signature_checks, 1);

    // Published after nbf: good, and now cached.
    let later = nbf + 10;
    gate.verify(&job(&fx, &optok, later, later)).await.unwrap();
    let checks = gate.stats().await.token_signature_checks;

    // Jobs are not processed in publish order: an earlier one must not ride on the cache.
    let d = deny(&gate, &job(&fx, &optok, early, early)).await;
    assert_eq!(d.error.code(), ErrorCode::AuthExpired, "{}", d.error);
    assert!(
        d.error.message().contains("not valid before"),
        "{}",
        d.error
    );
    assert_eq!(
        gate.stats().await.token_signature_checks,
        checks,
        "judged from the cache entry"
    );
    // Within the skew before nbf: accepted from the cache.
    let edge = nbf - skew(&fx);
    gate.verify(&job(&fx, &optok, edge, edge)).await.unwrap();

    // iat in the future relative to the publish time, the token already cached.
    let issued = now + 1800; // (the licence is good for an hour)
    let mut claims = optok_claims(&fx, issued, issued + 3600);
    claims["sub"] = "svc:later".into();
    let optok = fx.optok(&claims);
    gate.verify(&job(&fx, &optok, issued, issued))
        .await
        .unwrap();
    let before = issued - skew(&fx) - 1;
    let d = deny(&gate, &job(&fx, &optok, before, before)).await;
    assert_eq!(d.error.code(), ErrorCode::AuthExpired, "{}", d.error);
    assert!(
        d.error.message().contains("issued in the future"),
        "{}",
        d.error
    );
}

/// A job published at `t` with a fresh OpTok and proof for that time and this licence.
fn licence_job(fx: &Fixture, licence: &str, t: u64) -> GateInput {
    let optok = fx.optok(&optok_claims(fx, t - 10, t + 300));
    let proof = fx.dpop_with(
        &optok,
        &fx.cfg.dpop_htu,
        t,
        &format!("jti-{}", unique_prefix()),
    );
    published_at(fx.input(&optok, Some(&proof), ("jwt", licence)), t)
}

#[tokio::test]
async fn licence_exp_and_nbf_are_judged_at_publish_time_even_from_the_cache() {
    let fx = Fixture::new();
    let gate = fx.gate().await;
    let now = now();

    // Expired by now, valid when published.
    let exp = now - skew(&fx) - 100;
    let mut claims = fx.licence_claims();
    claims["exp"] = exp.into();
    let licence = fx.licence(&claims);
    let v = gate
        .verify(&licence_job(&fx, &licence, exp - 300))
        .await
        .unwrap();
    assert_eq!((v.poe, v.plan.as_str()), (PoeState::Valid, "team"));
    let d = deny(&gate, &licence_job(&fx, &licence, exp + skew(&fx) + 1)).await;
    assert_eq!(d.error.code(), ErrorCode::PoeExpired, "{}", d.error);
    assert_eq!(d.poe, Some(PoeState::Expired));

    // Not valid before a time after now: good for a job published after it (cached),
    // refused for one published before it, cache or not.
    let nbf = now + 600;
    let mut claims = fx.licence_claims();
    claims["nbf"] = nbf.into();
    claims["exp"] = (nbf + 3600).into();
    let licence = fx.licence(&claims);
    gate.verify(&licence_job(&fx, &licence, nbf + 5))
        .await
        .unwrap();
    let checks = gate.stats().await.licence_signature_checks;
    let d = deny(&gate, &licence_job(&fx, &licence, nbf - skew(&fx) - 1)).await;
    assert_eq!(d.error.code(), ErrorCode::PoeExpired, "{}", d.error);
    assert_eq!(d.poe, Some(PoeState::Expired));
    assert_eq!(
        gate.stats().await.licence_signature_checks,
        checks,
        "judged from the cache entry"
    );
    gate.verify(&licence_job(&fx, &licence, nbf - skew(&fx)))
        .await
        .unwrap();
}

#[tokio::test]
async fn introspection_exp_is_judged_at_publish_time_and_its_cache_by_the_clock() {
    let exp = now() - 3600;
    let server = TestServer::start(Arc::new(move |_: &str, _: &str, body: &Value| {
        let tenant = body["tenant"].as_str().unwrap_or_default().to_owned();
        let answer = json!({"active": true, "tid": tenant, "plan": "team",
            "features": ["signer.sign"], "exp": exp});
        (200, answer.to_string())
    }))
    .await;
    let mut fx = Fixture::new();
    fx.cfg.poe.licensing_jwks_file = None;
    fx.cfg.poe.introspect_url = Some(server.url());
    fx.cfg.poe.cache_ttl = Duration::from_millis(300);
    fx.cfg.poe.grace = Duration::ZERO;
    let gate = fx.gate().await;
    let input = |t: u64| {
        let optok = fx.optok(&optok_claims(&fx, t - 10, t + 300));
        let proof = fx.dpop_with(
            &optok,
            &fx.cfg.dpop_htu,
            t,
            &format!("jti-{}", unique_prefix()),
        );
        published_at(
            fx.input(&optok, Some(&proof), ("introspect", "opaque-1")),
            t,
        )
    };

    // The licence had not expired when this job was published.
    let v = gate.verify(&input(exp - 600)).await.unwrap();
    assert_eq!(v.poe, PoeState::Valid);
    assert_eq!(server.calls(), 1);
    // The cached answer, judged for a job published after exp: expired.
    let d = deny(&gate, &input(exp + skew(&fx) + 1)).await;
    assert_eq!(d.error.code(), ErrorCode::PoeExpired, "{}", d.error);
    assert_eq!(server.calls(), 1, "answered from the cache");

    // The cache's age is measured by the clock, not the publish time: after cache_ttl has
    // passed, an answer is asked for again even for a job published long before.
    fx.clock.advance(Duration::from_millis(400));
    gate.verify(&input(exp - 600)).await.unwrap();
    assert_eq!(
        server.calls(),
        2,
        "cache_ttl is measured by the current time"
    );
}

#[tokio::test]
async fn the_gate_uses_the_inputs_publish_time_not_the_clock() {
    // The same job, judged twice: as published now, and as published a day ago.
    let fx = Fixture::new();
    let gate = fx.gate().await;
    let input = fx.good_input(); // OpTok, proof and licence fresh now
    let mut old = input.clone();
    old.published = at(now() - 24 * 3600);
    let d = deny(&gate, &old).await;
    assert_eq!(d.error.code(), ErrorCode::AuthExpired, "{}", d.error);
    assert!(
        d.error.message().contains("issued in the future"),
        "{}",
        d.error
    );
    gate.verify(&input).await.unwrap();
}
