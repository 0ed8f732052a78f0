//! Idempotency records in a JetStream key-value bucket (the default, also when Redis is
//! configured: the records live beside the jobs, replicated and on disk like them, so a Redis
//! restart cannot make a republished request be signed again).
//!
//! Value: `lease <owner> <expiry unix ms>` while a job attempt works on the request (the
//! owner names the attempt, not only the replica), `signed <outcome record>` once it is
//! signed and audited and its result message is about to be published (the message as
//! [`OutMessage::to_record`] writes it), then `done <result sequence>`. Compare-and-set on
//! the entry revision makes a take-over of an expired lease, and the step from lease to
//! signed, safe between replicas. The bucket's max age is the record TTL.
//!
//! Every read goes to the bucket stream's leader (`STREAM.MSG.GET`), never a direct get: on
//! a replicated bucket any replica answers a direct get, and a follower that has not yet
//! applied this attempt's lease would make it look lost (and a stale `lease` over a newer
//! `signed` record would let a release delete it). A release deletes only the revision it
//! read.
//!
//! Two writes of a signed job's path cost less than a read and an awaited write (issue 11):
//!
//! - the step from lease to `signed` compares against the revision this store wrote the lease
//!   at (remembered per key from the claim or the last renewal), without reading the record
//!   first: the leader accepts the write only if that revision is still the key's latest, which
//!   means the record is still this attempt's lease. Any other revision (a renewal in between,
//!   a take-over) falls back to reading the record as before;
//! - `done` is sent and its acknowledgement awaited off the job path, together with the others
//!   in flight, by one task of the store ([`await_done_acks`]). A `done` that is lost leaves
//!   the `signed` record, whose outcome a duplicate then republishes: the same result message,
//!   still signed and charged once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use signer_actors::ports::{Claim, IdempotencyStore, OutMessage, PortError, Recorded};
use tokio::sync::mpsc;

use crate::jetstream::NatsError;

pub struct KvIdempotency {
    store: kv::Store,
    js: jetstream::Context,
    /// The revision each lease this store holds was last written at, with its owner, by
    /// (hashed) key: `record` replaces the lease by compare-and-set on it without a read.
    /// Removed when the lease is replaced or given back; cleared when it reaches
    /// [`LEASES_REMEMBERED`] (a forgotten revision only costs the read).
    leases: Mutex<HashMap<String, (String, u64)>>,
    /// The acknowledgements of `done` writes, awaited by [`await_done_acks`].
    done_acks: mpsc::UnboundedSender<PublishAckFuture>,
}

/// Leases whose revision the store remembers at most (a job that claimed and then vanished
/// without releasing, e.g. cut off in the middle of a call, leaves its entry behind).
const LEASES_REMEMBERED: usize = 1 << 16;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// KV keys allow few characters; requestIds allow `:`. Hash to a fixed, safe key.
fn kv_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn port(e: impl std::fmt::Display) -> PortError {
    PortError::transient(e.to_string()).context("idempotency bucket")
}

/// An entry as the bucket stream's leader has it: `None` when the key has no value (never
/// written, deleted, purged, aged out).
struct Current {
    revision: u64,
    value: Option<bytes::Bytes>,
}

enum Record {
    Lease { owner: String, until_ms: u64 },
    Signed { outcome: OutMessage },
    Done { seq: u64 },
}

/// The prefix of a signed record; the outcome record follows.
const SIGNED: &[u8] = b"signed ";

/// Reads a record; `None` for a deleted or unreadable entry (free to take). A signed record
/// whose outcome cannot be read is an error, not a free entry: taking it would sign again.
fn parse(value: &[u8]) -> Result<Option<Record>, PortError> {
    if let Some(record) = value.strip_prefix(SIGNED) {
        return OutMessage::from_record(record)
            .map(|outcome| Some(Record::Signed { outcome }))
            .map_err(|e| PortError::permanent(e).context("idempotency bucket: signed record"));
    }
    Ok(parse_text(value))
}

fn parse_text(value: &[u8]) -> Option<Record> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split(' ');
    match parts.next()? {
        "lease" => Some(Record::Lease {
            owner: parts.next()?.to_string(),
            until_ms: parts.next()?.parse().ok()?,
        }),
        "done" => Some(Record::Done {
            seq: parts.next()?.parse().ok()?,
        }),
        _ => None,
    }
}

impl KvIdempotency {
    /// Opens (or creates) the bucket. The backing stream is created directly with the
    /// key-value layout (`KV_<bucket>`, `$KV.<bucket>.>`), because the client's bucket
    /// creation first queries account info in a form NATS 2.9 does not answer.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        ttl: Duration,
    ) -> Result<Self, NatsError> {
        let store = crate::jetstream::open_bucket(js, bucket, ttl).await?;
        let (done_acks, acks) = mpsc::unbounded_channel();
        tokio::spawn(await_done_acks(acks));
        Ok(KvIdempotency {
            store,
            js: js.clone(),
            leases: Mutex::new(HashMap::new()),
            done_acks,
        })
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, u64)>> {
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers that `owner`'s lease on `key` is at `revision`.
    fn lease_written(&self, key: &str, owner: &str, revision: u64) {
        let mut leases = self.leases();
        if leases.len() >= LEASES_REMEMBERED {
            leases.clear();
        }
        leases.insert(key.to_string(), (owner.to_string(), revision));
    }

    /// The revision `owner`'s lease on `key` was written at by this store, forgotten now.
    fn take_lease_revision(&self, key: &str, owner: &str) -> Option<u64> {
        let mut leases = self.leases();
        match leases.get(key) {
            Some((o, _)) if o == owner => leases.remove(key).map(|(_, revision)| revision),
            _ => None,
        }
    }

    /// Reads `key` (already hashed) from the stream leader: linearizable with the
    /// compare-and-set writes, unlike a direct get, which a lagging replica may answer.
    async fn current(&self, key: &str) -> Result<Option<Current>, PortError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", self.store.prefix);
        let message = match self
            .store
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(port(e)),
        };
        let removed = message
            .headers
            .get("KV-Operation")
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
            || message.headers.get("Nats-Marker-Reason").is_some();
        Ok(Some(Current {
            revision: message.sequence,
            value: (!removed).then_some(message.payload),
        }))
    }
}

#[async_trait]
impl IdempotencyStore for KvIdempotency {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError> {
        let key = kv_key(key);
        let lease_value = || format!("lease {owner} {}", now_ms() + lease.as_millis() as u64);
        match self.store.create(&key, lease_value().into()).await {
            Ok(revision) => {
                self.lease_written(&key, owner, revision);
                return Ok(Claim::Acquired);
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(port(e)),
        }
        let Some(entry) = self.current(&key).await? else {
            // (it existed a moment ago: aged out in between) try again
            return Ok(Claim::Busy {
                retry_after: Duration::from_millis(50),
            });
        };
        let record = match &entry.value {
            Some(value) => parse(value)?,
            None => None,
        };
        match record {
            Some(Record::Done { seq }) => {
                return Ok(Claim::Done {
                    result_sequence: seq,
                });
            }
            Some(Record::Signed { outcome }) => return Ok(Claim::Signed { outcome }),
            Some(Record::Lease { owner: o, until_ms }) if o != owner && until_ms > now_ms() => {
                return Ok(Claim::Busy {
                    retry_after: Duration::from_millis(until_ms - now_ms()),
                });
            }
            // free (deleted, unreadable), expired, or this owner's own lease: take it
            _ => {}
        }
        match self
            .store
            .update(&key, lease_value().into(), entry.revision)
            .await
        {
            Ok(revision) => {
                self.lease_written(&key, owner, revision);
                Ok(Claim::Acquired)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Claim::Busy {
                retry_after: Duration::from_millis(100),
            }),
            Err(e) => Err(port(e)),
        }
    }

    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError> {
        let key = kv_key(key);
        let mut value = SIGNED.to_vec();
        value.extend_from_slice(&outcome.to_record());
        let value: bytes::Bytes = value.into();
        // The revision this attempt's lease was written at is still the latest: it is ours.
        if let Some(revision) = self.take_lease_revision(&key, owner) {
            match self.store.update(&key, value.clone(), revision).await {
                Ok(_) => return Ok(Recorded::Kept),
                // written since (a renewal, a take-over): read it below
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(port(e)),
            }
        }
        // A lease renewal of this attempt may land between the read and the write: read
        // again then, a few times.
        for _ in 0..5 {
            let Some(entry) = self.current(&key).await? else {
                return Ok(Recorded::LeaseLost);
            };
            let ours = entry
                .value
                .as_deref()
                .and_then(parse_text)
                .is_some_and(|r| matches!(r, Record::Lease { owner: o, .. } if o == owner));
            if !ours {
                return Ok(Recorded::LeaseLost);
            }
            match self.store.update(&key, value.clone(), entry.revision).await {
                Ok(_) => return Ok(Recorded::Kept),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(port(e)),
            }
        }
        Err(PortError::transient("the record kept changing").context("idempotency bucket"))
    }

    /// Sends `done`; its acknowledgement is awaited by [`await_done_acks`], not here (see
    /// the module's notes). A failure to send is returned.
    async fn complete(&self, key: &str, result_sequence: u64) -> Result<(), PortError> {
        let key = kv_key(key);
        self.leases().remove(&key);
        let value: bytes::Bytes = format!("done {result_sequence}").into();
        if self.store.use_jetstream_prefix {
            // (a JetStream domain: the client composes the subject) awaited here
            return self.store.put(key, value).await.map(|_| ()).map_err(port);
        }
        let prefix = self.store.put_prefix.as_ref().unwrap_or(&self.store.prefix);
        let ack = self
            .js
            .publish(format!("{prefix}{key}"), value)
            .await
            .map_err(port)?;
        if let Err(mpsc::error::SendError(ack)) = self.done_acks.send(ack) {
            ack.await.map_err(port)?;
        }
        Ok(())
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError> {
        let key = kv_key(key);
        self.take_lease_revision(&key, owner);
        let Some(entry) = self.current(&key).await? else {
            return Ok(());
        };
        let ours = entry
            .value
            .as_deref()
            .and_then(parse_text)
            .is_some_and(|r| matches!(r, Record::Lease { owner: o, .. } if o == owner));
        if !ours {
            return Ok(());
        }
        // Only the revision read: a record written since (signed, another lease) stays.
        match self
            .store
            .delete_expect_revision(&key, Some(entry.revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(port(e)),
        }
    }
}

/// Awaits the acknowledgements of `done` writes, all those in flight at once, until the
/// store is dropped and every one sent has been answered. A failure is logged: the record
/// stays `signed`, and a duplicate of the request republishes its recorded outcome.
async fn await_done_acks(mut sent: mpsc::UnboundedReceiver<PublishAckFuture>) {
    let mut pending = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            ack = sent.recv() => match ack {
                Some(ack) => pending.push(ack.into_future()),
                None => break,
            },
            Some(acked) = pending.next(), if !pending.is_empty() => done_acked(acked),
        }
    }
    while let Some(acked) = pending.next().await {
        done_acked(acked);
    }
}

fn done_acked(acked: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>) {
    if let Err(e) = acked {
        tracing::warn!(error = %e, "recording the idempotency result (done) failed; the signed record stays and answers duplicates");
    }
}

// Against the machine's NATS: `--features integration`.
#[cfg(all(test, feature = "integration"))]
mod tests {
    use super::*;

    async fn bucket(tag: &str) -> (jetstream::Context, String) {
        let client = async_nats::connect("nats://127.0.0.1:4222")
            .await
            .expect("NATS on 127.0.0.1:4222");
        let mut rnd = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
        let name = format!(
            "TEST_IDEM_{tag}_{}_{}",
            std::process::id(),
            hex::encode(rnd)
        );
        (jetstream::new(client), name)
    }

    #[tokio::test]
    async fn kv_leases_complete_release_and_busy() {
        let (js, name) = bucket("LEASE").await;
        let ttl = Duration::from_secs(600);
        let a = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        let b = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        let lease = Duration::from_secs(30);
        let key = "acme/req:1";
        assert_eq!(a.claim(key, "w1", lease).await.unwrap(), Claim::Acquired);
        assert_eq!(
            a.claim(key, "w1", lease).await.unwrap(),
            Claim::Acquired,
            "the holder may renew its lease"
        );
        assert!(
            matches!(b.claim(key, "w2", lease).await.unwrap(), Claim::Busy { retry_after } if retry_after <= lease),
            "another worker waits for a live lease"
        );
        // Release by someone else changes nothing; by the holder frees the request.
        b.release(key, "w2").await.unwrap();
        assert!(matches!(
            b.claim(key, "w2", lease).await.unwrap(),
            Claim::Busy { .. }
        ));
        a.release(key, "w1").await.unwrap();
        assert_eq!(b.claim(key, "w2", lease).await.unwrap(), Claim::Acquired);
        b.complete(key, 42).await.unwrap();
        for (store, owner) in [(&a, "w1"), (&b, "w2")] {
            assert_eq!(
                store.claim(key, owner, lease).await.unwrap(),
                Claim::Done {
                    result_sequence: 42
                }
            );
        }
        // A store opened later (a restarted replica) still knows it.
        let c = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        assert_eq!(
            c.claim(key, "w3", lease).await.unwrap(),
            Claim::Done {
                result_sequence: 42
            }
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }

    #[tokio::test]
    async fn kv_signed_outcome_is_recorded_by_its_attempt_only() {
        let (js, name) = bucket("SIGNED").await;
        let a = KvIdempotency::open(&js, &name, Duration::from_secs(600))
            .await
            .unwrap();
        let lease = Duration::from_secs(30);
        let key = "acme/req:3";
        // Two attempts of one worker are two owners: the second waits.
        assert_eq!(a.claim(key, "w1.aa", lease).await.unwrap(), Claim::Acquired);
        assert!(matches!(
            a.claim(key, "w1.bb", lease).await.unwrap(),
            Claim::Busy { .. }
        ));
        // A binary (CBOR) body survives the record.
        let outcome = OutMessage {
            subject: "sign.completed".into(),
            headers: vec![("Nats-Msg-Id".into(), key.into())],
            body: vec![0xa1, 0x00, b'\n', 0xff, b' '],
        };
        assert_eq!(
            a.record(key, "w1.bb", &outcome).await.unwrap(),
            Recorded::LeaseLost,
            "only the lease holder records"
        );
        assert_eq!(
            a.record(key, "w1.aa", &outcome).await.unwrap(),
            Recorded::Kept
        );
        for owner in ["w1.aa", "w1.bb", "w2.cc"] {
            assert_eq!(
                a.claim(key, owner, lease).await.unwrap(),
                Claim::Signed {
                    outcome: outcome.clone()
                },
                "a signed request is republished, not claimed"
            );
        }
        a.release(key, "w1.aa").await.unwrap();
        assert!(
            matches!(
                a.claim(key, "w2.cc", lease).await.unwrap(),
                Claim::Signed { .. }
            ),
            "release removes leases only"
        );
        a.complete(key, 7).await.unwrap();
        assert_eq!(
            a.claim(key, "w2.cc", lease).await.unwrap(),
            Claim::Done { result_sequence: 7 }
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }

    /// The step from lease to `signed` without a read: right after the claim, after a
    /// renewal, and refused (through the read) when the lease was taken over since, also by
    /// a store that still remembers the revision of its own, expired lease.
    #[tokio::test]
    async fn kv_record_compares_against_the_remembered_lease_revision() {
        let (js, name) = bucket("RECORD").await;
        let ttl = Duration::from_secs(600);
        let a = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        let b = KvIdempotency::open(&js, &name, ttl).await.unwrap();
        let outcome = OutMessage {
            subject: "sign.completed".into(),
            headers: vec![],
            body: b"{}".to_vec(),
        };
        let lease = Duration::from_secs(30);
        assert_eq!(
            a.claim("acme/r1", "w1.a", lease).await.unwrap(),
            Claim::Acquired
        );
        assert_eq!(
            a.claim("acme/r1", "w1.a", lease).await.unwrap(),
            Claim::Acquired,
            "renewed"
        );
        assert_eq!(
            a.record("acme/r1", "w1.a", &outcome).await.unwrap(),
            Recorded::Kept
        );
        assert_eq!(
            b.claim("acme/r1", "w2.b", lease).await.unwrap(),
            Claim::Signed {
                outcome: outcome.clone()
            }
        );

        // a's lease expires, b takes it over: a's remembered revision is stale
        let short = Duration::from_millis(200);
        assert_eq!(
            a.claim("acme/r2", "w1.a", short).await.unwrap(),
            Claim::Acquired
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            b.claim("acme/r2", "w2.b", lease).await.unwrap(),
            Claim::Acquired
        );
        assert_eq!(
            a.record("acme/r2", "w1.a", &outcome).await.unwrap(),
            Recorded::LeaseLost,
            "a lease taken over is not replaced by its former holder"
        );
        assert_eq!(
            b.record("acme/r2", "w2.b", &outcome).await.unwrap(),
            Recorded::Kept
        );

        // another owner's call does not make the store forget the holder's revision
        assert_eq!(
            a.claim("acme/r3", "w1.a", lease).await.unwrap(),
            Claim::Acquired
        );
        assert_eq!(
            a.record("acme/r3", "w1.x", &outcome).await.unwrap(),
            Recorded::LeaseLost
        );
        a.release("acme/r3", "w1.x").await.unwrap();
        assert_eq!(
            a.record("acme/r3", "w1.a", &outcome).await.unwrap(),
            Recorded::Kept
        );

        // `done` is sent without waiting for its ack; the next read on the connection sees it
        a.complete("acme/r3", 9).await.unwrap();
        assert_eq!(
            b.claim("acme/r3", "w2.b", lease).await.unwrap(),
            Claim::Done { result_sequence: 9 }
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }

    #[tokio::test]
    async fn kv_expired_lease_is_taken_over_once() {
        let (js, name) = bucket("TAKEOVER").await;
        let a = KvIdempotency::open(&js, &name, Duration::from_secs(600))
            .await
            .unwrap();
        let key = "acme/req:2";
        assert_eq!(
            a.claim(key, "dead", Duration::from_millis(200))
                .await
                .unwrap(),
            Claim::Acquired
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lease = Duration::from_secs(30);
        let (x, y) = tokio::join!(a.claim(key, "w1", lease), a.claim(key, "w2", lease));
        let won = [x.unwrap(), y.unwrap()]
            .iter()
            .filter(|c| **c == Claim::Acquired)
            .count();
        assert_eq!(
            won, 1,
            "compare-and-set: one worker takes an expired lease over"
        );
        let _ = js.delete_stream(format!("KV_{name}")).await;
    }
}
