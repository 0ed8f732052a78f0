//! The ports the pipeline drives. `stella-signer` implements them against NATS JetStream,
//! Redis and the key backends; tests implement them in memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::SignerError;
use crate::keys::{KeyError, KeySigner};

/// Whether retrying an operation that failed can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortErrorKind {
    /// The service may answer next time (unreachable, timed out, no leader, busy): retry
    /// with backoff, within a budget.
    Transient,
    /// The same call will fail again whatever the wait (a message over the broker's
    /// `max_payload`, a stream that refuses its size): answer the job now instead.
    Permanent,
}

/// A failure talking to the outside world: a kind the pipeline branches on (retry or answer)
/// and the error that caused it, kept as its source.
#[derive(Debug, Clone)]
pub struct PortError {
    kind: PortErrorKind,
    context: Option<std::borrow::Cow<'static, str>>,
    source: Arc<dyn std::error::Error + Send + Sync>,
}

impl PortError {
    /// A failure that a retry may not repeat.
    pub fn transient(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(PortErrorKind::Transient, source)
    }

    /// A failure that a retry would repeat.
    pub fn permanent(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(PortErrorKind::Permanent, source)
    }

    /// A failure of `kind`.
    pub fn new(
        kind: PortErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        PortError {
            kind,
            context: None,
            source: Arc::from(source.into()),
        }
    }

    /// Says what was being done (`"publish"`, `"idempotency bucket"`); shown before the
    /// source.
    pub fn context(mut self, context: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        self.context = Some(context.into());
        self
    }

    pub fn kind(&self) -> PortErrorKind {
        self.kind
    }

    pub fn is_permanent(&self) -> bool {
        self.kind == PortErrorKind::Permanent
    }

    /// Whether the store refused a message for its size ([`MessageTooLarge`] is the source):
    /// a result that will never be stored inline, whatever the wait.
    pub fn is_too_large(&self) -> bool {
        self.is_permanent() && self.source.downcast_ref::<MessageTooLarge>().is_some()
    }
}

/// The source of a permanent [`PortError`] for a message the broker will not store because
/// of its size (over the server's `max_payload`, or its stream's maximum message size).
/// Typed so the pipeline can tell "too large to store inline" (answered
/// `payload_too_large`, or stored by reference where an object store is configured) from
/// other refusals (`internal`).
#[derive(Debug, thiserror::Error)]
#[error("message of {bytes} bytes is too large to store: {source}")]
pub struct MessageTooLarge {
    /// The size of the refused message (body and headers).
    pub bytes: usize,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for PortError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.context {
            Some(c) => write!(f, "{c}: {}", self.source),
            None => write!(f, "{}", self.source),
        }
    }
}

impl std::error::Error for PortError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Equal when of the same kind and saying the same (sources are compared by their text).
impl PartialEq for PortError {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.to_string() == other.to_string()
    }
}

impl Eq for PortError {}

/// Why the blob store (the Object Store bucket of large artefacts) did not give or take an
/// object. The job branches on the kind: a missing or oversized object is the request's
/// fault (not retryable), a store failure is the outside world's (retried).
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No such object (never stored, deleted, or expired by the bucket's TTL).
    #[error("object {name:?} not found")]
    NotFound { name: String },
    /// The object is larger than the caller allows; nothing past the limit was read.
    #[error("object is {size} bytes, more than the {limit} allowed")]
    TooLarge { size: u64, limit: u64 },
    /// The store failed (unreachable, timed out, refused the write).
    #[error("blob store: {0}")]
    Store(#[source] PortError),
}

/// The bucket large payloads come from and large results go to (JetStream Object Store
/// `SIGNER_BLOBS` in production, [`crate::objects::MemoryBlobStore`] in tests).
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// The bucket's name: a `payloadRef` must name it, result references carry it.
    fn bucket(&self) -> &str;
    /// Reads object `name`, refusing one larger than `limit` bytes before reading it (and
    /// never reading past `limit`), so a reference cannot make the worker buffer more than
    /// the size it declared.
    async fn get(&self, name: &str, limit: u64) -> Result<Vec<u8>, BlobError>;
    /// Stores `bytes` as `name`, replacing an object of that name.
    async fn put(&self, name: &str, bytes: &[u8]) -> Result<crate::objects::ObjectRef, BlobError>;
}

/// One message taken from the request stream, with the means to settle it.
#[async_trait]
pub trait Delivery: Send + Sync {
    /// The subject it was published on (`sign.requests`, or `sign.requests.<tenant>` and
    /// anything under it).
    fn subject(&self) -> &str;
    /// A header value, if present.
    fn header(&self, name: &str) -> Option<&str>;
    /// The body bytes.
    fn body(&self) -> &[u8];
    /// Its sequence in the request stream.
    fn stream_sequence(&self) -> u64;
    /// How many times it has been delivered (1 the first time).
    fn delivered(&self) -> u64;
    /// When the broker stored the message (the JetStream message timestamp): the moment
    /// the request was made. A job is judged as of this time, not the time a worker gets
    /// to it, so a backlog does not turn fresh credentials stale (`docs/contract.md#freshness`).
    /// The same on every redelivery.
    fn published(&self) -> SystemTime;
    /// Acknowledges: the job is finished and must not come back.
    async fn ack(&self) -> Result<(), PortError>;
    /// Negative acknowledgement: redeliver after `delay`.
    async fn nak(&self, delay: Duration) -> Result<(), PortError>;
    /// Still working on it: restart the redelivery timer.
    async fn in_progress(&self) -> Result<(), PortError>;
    /// Gives up on the message for good: it is not redelivered (JetStream `+TERM`, which
    /// emits a `MSG_TERMINATED` advisory). Only for a job on its last delivery whose outcome
    /// could not be stored within the retry budget: nothing would bring it back anyway, and
    /// the advisory tells operators it ended without a result.
    async fn term(&self) -> Result<(), PortError>;
}

/// Where jobs come from (a durable pull consumer).
#[async_trait]
pub trait JobSource: Send {
    /// The next message; `None` when the source is closed.
    ///
    /// A [permanent](PortError::is_permanent) error means this stream is broken and will
    /// deliver nothing more (missed heartbeats, consumer deleted, no responders): the
    /// Intake drops it and opens a new one. A transient error means the next call may
    /// deliver; several in a row without a message are treated as broken too.
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, PortError>>;
}

/// Opens a [`JobSource`]; called again whenever the Intake replaces a broken stream, so an
/// implementation should look its consumer up afresh (it may have been deleted or recreated).
#[async_trait]
pub trait JobSourceFactory: Send + Sync {
    async fn open(&self) -> Result<Box<dyn JobSource>, PortError>;
}

/// A message to publish to a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl OutMessage {
    /// A header value, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where a published message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub stream_sequence: u64,
    /// The stream already had a message with the same `Nats-Msg-Id` (this one was dropped).
    pub duplicate: bool,
}

/// Resolves when the stream has stored (or refused) a sent message.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<Stored, PortError>> + Send>>;

/// Publishes to JetStream streams.
#[async_trait]
pub trait MessagePublisher: Send + Sync {
    /// Sends a message. Returns once it is on its way, in call order; the returned future
    /// resolves with the stream's acknowledgement.
    async fn send(&self, message: OutMessage) -> Result<AckFuture, PortError>;
    /// Fetches a stored message of the results stream by sequence (to answer a duplicate
    /// request with its original result); `None` when it is no longer there.
    async fn fetch_result(&self, stream_sequence: u64) -> Result<Option<OutMessage>, PortError>;
}

/// What the idempotency record of a request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No one has it: this worker now holds the lease.
    Acquired,
    /// Finished before; the result is at this sequence of the results stream.
    Done { result_sequence: u64 },
    /// Signed (and its audit event stored) before, but its result may not have been
    /// stored: publish this recorded result message again, without signing or charging
    /// anything.
    Signed { outcome: OutMessage },
    /// Another job attempt holds a live lease (another replica, or another copy of the
    /// request on this one): try again later.
    Busy { retry_after: Duration },
}

/// What [`IdempotencyStore::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The outcome replaced this attempt's lease.
    Kept,
    /// The lease was no longer this attempt's (it expired and was taken over, or the
    /// request finished): nothing was written.
    LeaseLost,
}

/// The per tenant+requestId record that keeps a republished request from being signed twice.
///
/// `owner` names one job attempt (the worker id and a nonce drawn per claim), not just the
/// worker: two copies of a request processed at once by one replica are two owners, so the
/// second waits instead of signing too.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Takes a lease on `key` for `lease`, unless it is done, signed, or leased by another
    /// owner. The same owner may renew its lease.
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, PortError>;
    /// Records the result message of a signed job before it is published, replacing the
    /// lease of `owner`: a redelivery after a failed publish republishes it instead of
    /// signing again.
    async fn record(
        &self,
        key: &str,
        owner: &str,
        outcome: &OutMessage,
    ) -> Result<Recorded, PortError>;
    /// Records that `key` is finished, with the sequence of its result.
    async fn complete(&self, key: &str, result_sequence: u64) -> Result<(), PortError>;
    /// Gives a lease back (the job will be retried). Only a lease of `owner` is removed.
    async fn release(&self, key: &str, owner: &str) -> Result<(), PortError>;
}

/// Why a stored outcome record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutcomeRecordError {
    #[error("outcome record has no header line")]
    NoHeaderLine,
    #[error("outcome record header line: {0}")]
    Header(String),
}

/// The header line of an outcome record (subject and headers; the body follows raw).
#[derive(serde::Serialize, serde::Deserialize)]
struct OutcomeHead {
    subject: String,
    headers: Vec<(String, String)>,
}

impl OutMessage {
    /// Encodes the message for an idempotency record: one JSON line with the subject and
    /// headers, then the body bytes as they are (no base64, so a result near the broker's
    /// size limit still fits a record).
    pub fn to_record(&self) -> Vec<u8> {
        let head = OutcomeHead {
            subject: self.subject.clone(),
            headers: self.headers.clone(),
        };
        // Strings and a list of string pairs always serialize.
        let mut out = serde_json::to_vec(&head).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads back what [`OutMessage::to_record`] wrote.
    pub fn from_record(record: &[u8]) -> Result<OutMessage, OutcomeRecordError> {
        let split = record
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(OutcomeRecordError::NoHeaderLine)?;
        let head: OutcomeHead = serde_json::from_slice(&record[..split])
            .map_err(|e| OutcomeRecordError::Header(e.to_string()))?;
        Ok(OutMessage {
            subject: head.subject,
            headers: head.headers,
            body: record[split + 1..].to_vec(),
        })
    }
}

/// Keys that must not sign any more, shared by every replica (revocation takes effect
/// without a restart).
pub trait RevocationList: Send + Sync {
    /// Why `keyid` is revoked, if it is.
    fn revoked(&self, keyid: &str) -> Option<String>;
}

/// No key is revoked (tests, and deployments that manage revocation elsewhere).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRevocations;

impl RevocationList for NoRevocations {
    fn revoked(&self, _: &str) -> Option<String> {
        None
    }
}

/// Builds the signing backend of a configured key; called again when its actor restarts.
#[async_trait]
pub trait KeyFactory: Send + Sync {
    /// The configured key names.
    fn names(&self) -> Vec<String>;
    /// Loads (or reconnects) the key `name`. Called once per pool member, so every member
    /// gets a backend of its own (for PKCS#11, its own session).
    async fn load(&self, name: &str) -> Result<Arc<dyn KeySigner>, KeyError>;
    /// How many KeySigner actors serve the key `name`, each with its own [`load`]ed
    /// backend. A key actor signs one message at a time, so a pool lets a slow backend
    /// (an HSM) sign several jobs at once, and lets the others keep signing while one
    /// member is reloaded. Values below 1 count as 1.
    ///
    /// [`load`]: KeyFactory::load
    fn pool_size(&self, _name: &str) -> usize {
        1
    }
}

/// A gate's view of a job.
#[derive(Debug, Clone)]
pub struct GateInput {
    pub request: Arc<crate::request::SignRequest>,
    /// The tenant named by the subject (`sign.requests.<tenant>[.…]`), if any.
    pub subject_tenant: Option<String>,
    /// The size of the payload to sign.
    pub payload_bytes: usize,
    /// When the request was published ([`Delivery::published`]): the time its tokens,
    /// proof and licence are judged at.
    pub published: SystemTime,
}

/// What the entitlement gate (OpTok, DPoP, PoE) established.
#[derive(Debug, Clone, PartialEq)]
pub struct EntitlementVerdict {
    pub caller: Option<crate::audit::Caller>,
    pub auth: crate::audit::AuthState,
    pub poe: crate::audit::PoeState,
    pub plan: String,
}

/// Why a gate refused: the contract error plus what to record in the audit event.
#[derive(Debug, Clone, PartialEq)]
pub struct GateDenial {
    pub error: SignerError,
    pub caller: Option<crate::audit::Caller>,
    pub auth: Option<crate::audit::AuthState>,
    pub poe: Option<crate::audit::PoeState>,
    pub plan: Option<String>,
}

impl From<SignerError> for GateDenial {
    fn from(error: SignerError) -> Self {
        GateDenial {
            error,
            caller: None,
            auth: None,
            poe: None,
            plan: None,
        }
    }
}

/// OpTok + DPoP + Proof-of-Entitlement, without caches: the Entitlement actor keeps the
/// Authority's key set and the verified tokens ([`tokens`](Self::tokens)), the licensing key
/// set and the verified licences ([`licences`](Self::licences)) and the licensing service's
/// answers ([`licensing`](Self::licensing)). For every job it checks the token, calls
/// [`authenticate`](Self::authenticate) with the token already checked, then does the
/// licence step that call names.
#[async_trait]
pub trait EntitlementVerifier: Send + Sync {
    /// The token step, when this gate checks OpToks (`None`: [`authenticate`](Self::authenticate)
    /// decides alone, with `token` `None`: a disabled gate, test doubles).
    fn tokens(&self) -> Option<Arc<dyn TokenAuthority>> {
        None
    }
    /// The licence JWTs (`poe.format: jwt`), when this gate takes them: the actor keeps their
    /// key set and the licences verified with it.
    fn licences(&self) -> Option<Arc<dyn LicenceAuthority>> {
        None
    }
    /// The licensing service (`poe.format: introspect`), when this gate asks one: the actor
    /// keeps its answers.
    fn licensing(&self) -> Option<Arc<dyn LicensingService>> {
        None
    }
    /// Everything after the token, Proof-of-Entitlement included, without the actor's caches
    /// (a licence JWT is checked against a key set loaded for this call, the licensing service
    /// is asked every time, with no grace). `token` is the job's OpTok as
    /// [`TokenAuthority::verify_token`] verified it (perhaps for an earlier job: dates are
    /// judged again here, at this job's publish time).
    async fn verify(
        &self,
        input: &GateInput,
        token: Option<&VerifiedToken>,
    ) -> Result<EntitlementVerdict, GateDenial>;
    /// What the actor calls for every job: everything after the token up to the licence (its
    /// dates and tenant binding for this job, DPoP), and what the licence step needs
    /// ([`LicenceStep`]). A refusal up to there (a licence format this gate does not take
    /// included) is the `Err`. The default is [`verify`](Self::verify), its licence decision
    /// included ([`LicenceStep::Decided`]): for gates whose licences the actor does not check.
    async fn authenticate(
        &self,
        input: &GateInput,
        token: Option<&VerifiedToken>,
    ) -> Result<Authenticated, GateDenial> {
        let verdict = self.verify(input, token).await?;
        Ok(Authenticated {
            caller: verdict.caller,
            auth: verdict.auth,
            licence: LicenceStep::Decided(PoeGrant {
                state: verdict.poe,
                plan: verdict.plan,
            }),
        })
    }
}

/// What [`EntitlementVerifier::authenticate`] established for a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    pub caller: Option<crate::audit::Caller>,
    pub auth: crate::audit::AuthState,
    /// What its Proof-of-Entitlement needs.
    pub licence: LicenceStep,
}

/// The licence step of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenceStep {
    /// Decided without a licence check (PoE bypassed, or decided by
    /// [`EntitlementVerifier::verify`]).
    Decided(PoeGrant),
    /// `poe.value` is a licence JWT: the actor verifies it with the licensing key set
    /// ([`EntitlementVerifier::licences`]), or takes it from its cache.
    Jwt,
    /// `poe.value` is an opaque value: the actor asks the licensing service about it for the
    /// job's tenant ([`EntitlementVerifier::licensing`]), or takes the answer from its cache.
    Introspect,
}

/// What a job's licence lets it do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoeGrant {
    /// `Valid` or `Bypassed` (`Disabled` from a disabled gate).
    pub state: crate::audit::PoeState,
    /// The plan it names (selects the quota plan and the profiles the job may use).
    pub plan: String,
}

/// Why a job's licence does not let it sign: the contract error, and what the audit event
/// records (the PoE state; the plan when the licence was read far enough to know it).
#[derive(Debug, Clone, PartialEq)]
pub struct PoeRefusal {
    pub error: SignerError,
    pub state: crate::audit::PoeState,
    pub plan: Option<String>,
}

/// The terms of a licence, however it was presented (a licence JWT's claims, a licensing
/// service's answer). Judged for each job by the port ([`LicenceAuthority::judge`],
/// [`LicensingService::judge`]), never by the actor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LicenceTerms {
    /// `tid`: the tenant it is for.
    pub tenant: Option<String>,
    pub plan: Option<String>,
    pub features: Vec<String>,
    /// `exp`, `nbf` (unix seconds), judged at each job's publish time.
    pub expires: Option<u64>,
    pub not_before: Option<u64>,
    pub revoked: bool,
}

/// A licence JWT whose signature and claim types were verified, as the Entitlement actor
/// caches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLicence {
    pub terms: LicenceTerms,
    /// The key that verified it ([`TokenKeys::has_key`] of the licensing set): a cached
    /// licence counts only while that key is still in the set.
    pub key_id: String,
    /// Until when (unix seconds, compared with jobs' publish times) it may be reused: past it
    /// every job is refused anyway.
    pub reuse_until: u64,
}

/// Why [`LicenceAuthority::verify_licence`] did not verify a licence.
#[derive(Debug, Clone, PartialEq)]
pub enum LicenceRefusal {
    /// The licence names a key (`kid`) the set does not hold: perhaps one rotated in since the
    /// set was loaded. The actor reloads the set (at most once per
    /// [`LicenceAuthority::unknown_kid_interval`]) and checks again; `refusal` is the answer
    /// when the key is still unknown.
    UnknownKey { kid: String, refusal: PoeRefusal },
    /// Refused for good (forged, malformed, a claim missing).
    Refused(PoeRefusal),
}

/// Licence JWTs: loading the licensing key set, verifying a licence against a set, and
/// judging a verified licence for a job. Nothing is cached here; the Entitlement actor owns
/// the key set (refresh, one load at a time) and the verified licences.
#[async_trait]
pub trait LicenceAuthority: Send + Sync {
    /// Loads the licensing key set (its JWKS file).
    async fn fetch_keys(&self) -> Result<Arc<dyn TokenKeys>, PortError>;
    /// The set loaded at startup (to check the configuration), handed over once so the first
    /// actor does not load it again; `None` afterwards.
    fn startup_keys(&self) -> Option<Arc<dyn TokenKeys>> {
        None
    }
    /// Checks `raw`'s signature and claim types against `keys`. CPU-bound and without I/O:
    /// the actor runs it on the blocking pool. Judges no date, tenant or feature (that is
    /// [`judge`](Self::judge)'s, for each job).
    fn verify_licence(
        &self,
        raw: &str,
        keys: &dyn TokenKeys,
    ) -> Result<VerifiedLicence, LicenceRefusal>;
    /// Whether `licence` lets `tenant` sign at `now` (unix seconds: the job's publish time).
    /// Cheap and without I/O: the actor calls it in its mailbox, for every job.
    fn judge(
        &self,
        licence: &VerifiedLicence,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal>;
    /// How often the key set is reloaded.
    fn refresh_every(&self) -> Duration;
    /// Least time between two reloads caused by unknown kids.
    fn unknown_kid_interval(&self) -> Duration;
    /// How many verified licences the actor keeps.
    fn licence_cache_capacity(&self) -> usize {
        100_000
    }
}

/// What the licensing service said about a value for a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicensingAnswer {
    /// It answered: whether the licence applies (`active`), and its terms.
    Answered { active: bool, terms: LicenceTerms },
    /// It rejected the value itself (the HTTP status).
    Rejected(u16),
}

/// The licensing service: asking it about a value once, and judging an answer for a job.
/// Nothing is cached here; the Entitlement actor keeps the answers for
/// [`cache_ttl`](Self::cache_ttl), uses one up to `cache_ttl + grace` old while the service
/// is unavailable, and has one request per value and tenant in flight at a time.
#[async_trait]
pub trait LicensingService: Send + Sync {
    /// Asks about `value` for `tenant`, uncached. `Err` is an outage (unreachable, timed out,
    /// an answer that is not one).
    async fn introspect(&self, value: &str, tenant: &str) -> Result<LicensingAnswer, PortError>;
    /// Whether `answer` lets `tenant` sign at `now` (unix seconds: the job's publish time).
    /// Cheap and without I/O: the actor calls it in its mailbox, for every job.
    fn judge(
        &self,
        answer: &LicensingAnswer,
        tenant: &str,
        now: u64,
    ) -> Result<PoeGrant, PoeRefusal>;
    /// How long an answer is used without asking again.
    fn cache_ttl(&self) -> Duration;
    /// How much longer an answer is used while the service is unavailable.
    fn grace(&self) -> Duration;
    /// The clock the answers' ages are measured by (not the jobs' publish times: they are
    /// about whether the service could be asked).
    fn clock(&self) -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }
    /// How many answers the actor keeps.
    fn answer_cache_capacity(&self) -> usize {
        100_000
    }
}

/// Monotonic time, for what is measured by the current time rather than by a job's publish
/// time (the age of a licensing answer). The service reads the machine's clock
/// ([`SystemClock`]); tests pass one they move, so a cache expires when the test says so.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The machine's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A key set (the Authority's, or the licensing service's) as its adapter parsed it. Opaque
/// to the actor, which only keeps it, hands it back to [`TokenAuthority::verify_token`] or
/// [`LicenceAuthority::verify_licence`], and asks whether a key that verified a cached token
/// or licence is still published.
pub trait TokenKeys: std::any::Any + Send + Sync {
    /// Whether the key with this id (the adapter's choice: a JWK thumbprint) is in the set.
    fn has_key(&self, key_id: &str) -> bool;
    /// Keys in the set.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An OpTok whose signature and claims were verified, as the Entitlement actor caches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub issuer: String,
    pub subject: String,
    /// `tid`: the tenant the token was issued for.
    pub tenant: String,
    pub scope: Vec<String>,
    /// `exp`, `nbf`, `iat` (unix seconds), judged again for every job.
    pub expires: u64,
    pub not_before: Option<u64>,
    pub issued_at: Option<u64>,
    /// `cnf.jkt`: the token needs a DPoP proof by this key.
    pub jkt: Option<String>,
    /// The key that verified it ([`TokenKeys::has_key`]): a cached token counts only while
    /// that key is still published.
    pub key_id: String,
    /// Until when (unix seconds, compared with jobs' publish times) the verdict may be
    /// reused: past it every job is refused anyway.
    pub reuse_until: u64,
}

/// Why [`TokenAuthority::verify_token`] did not verify a token.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRefusal {
    /// The token names a key (`kid`) the set does not hold: perhaps a key the Authority
    /// rotated in since the set was loaded. The actor reloads the set (at most once per
    /// [`TokenAuthority::unknown_kid_interval`]) and checks again; `error` is the refusal
    /// when the key is still unknown.
    UnknownKey { kid: String, error: SignerError },
    /// Refused for good (forged, confused, expired, wrong audience...).
    Refused(SignerError),
}

/// The Authority's tokens: loading its key set and checking a token against it. Neither is
/// cached here; the Entitlement actor owns the key set (refresh, one load at a time) and the
/// verified tokens.
#[async_trait]
pub trait TokenAuthority: Send + Sync {
    /// Loads the Authority's current key set (its JWKS file or URL).
    async fn fetch_keys(&self) -> Result<Arc<dyn TokenKeys>, PortError>;
    /// The set loaded at startup (to check the configuration), handed over once so the
    /// first actor does not load it again; `None` afterwards.
    fn startup_keys(&self) -> Option<Arc<dyn TokenKeys>> {
        None
    }
    /// Checks `raw`'s signature and claims against `keys`, as of `now` (unix seconds: the
    /// job's publish time). CPU-bound and without I/O: the actor runs it on the blocking
    /// pool. Does not check the tenant binding (that is the job's, see
    /// [`EntitlementVerifier::verify`]).
    fn verify_token(
        &self,
        raw: &str,
        keys: &dyn TokenKeys,
        now: u64,
    ) -> Result<VerifiedToken, TokenRefusal>;
    /// How often the key set is reloaded.
    fn refresh_every(&self) -> Duration;
    /// Least time between two reloads caused by unknown kids, so that tokens with made-up
    /// kids cannot turn the signer into a load generator against the Authority.
    fn unknown_kid_interval(&self) -> Duration;
    /// How many verified tokens the actor keeps (a flood of distinct valid tokens must not
    /// grow memory without limit).
    fn token_cache_capacity(&self) -> usize {
        100_000
    }
}

/// What the quota gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaGrant {
    Allowed,
    Disabled,
    FailOpen,
}

/// One job's quota request: what [`QuotaStore::acquire`] takes, as one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRequest {
    pub tenant: String,
    pub plan: String,
    pub payload_bytes: usize,
    /// Signatures the job makes (the units charged; values below 1 count as 1).
    pub signatures: u32,
}

/// One job's concurrency slot to give back: what [`QuotaStore::release`] takes, as one
/// entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRelease {
    pub tenant: String,
    pub plan: String,
}

/// Requests one batch carries when the store does not say otherwise
/// ([`QuotaStore::batch_max`]).
pub const QUOTA_BATCH_MAX: usize = 64;

/// Plan quotas. `release` ends a concurrency slot taken by `acquire`.
///
/// Quota is charged per signature: a job signed by `signatures` keys takes that many units
/// of the tenant's rate bucket and daily cap, all or nothing in one atomic step, and one
/// concurrency slot (a slot counts jobs in flight, whatever their key count).
///
/// The Quota actor calls the batch methods ([`acquire_many`](Self::acquire_many),
/// [`release_many`](Self::release_many)); their default implementations call the single
/// ones in order, so a store only implements them when it can do a batch in fewer round
/// trips (Redis: one pipeline).
#[async_trait]
pub trait QuotaStore: Send + Sync {
    /// Admits a job of `tenant` on `plan` that signs `payload_bytes` with `signatures` keys
    /// (values below 1 count as 1), or says which limit refuses it. A refusal takes nothing.
    async fn acquire(
        &self,
        tenant: &str,
        plan: &str,
        payload_bytes: usize,
        signatures: u32,
    ) -> Result<QuotaGrant, SignerError>;
    async fn release(&self, tenant: &str, plan: &str);

    /// [`acquire`](Self::acquire) for each request, in order: the answer `i` is request
    /// `i`'s, with exactly the result `acquire` would have given it had the requests been
    /// made one after another (a refusal takes nothing, so a later request of the same
    /// tenant may still pass). Always one answer per request.
    async fn acquire_many(
        &self,
        requests: &[QuotaRequest],
    ) -> Vec<Result<QuotaGrant, SignerError>> {
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(
                self.acquire(&r.tenant, &r.plan, r.payload_bytes, r.signatures)
                    .await,
            );
        }
        answers
    }

    /// [`release`](Self::release) for each entry, in order.
    async fn release_many(&self, releases: &[QuotaRelease]) {
        for r in releases {
            self.release(&r.tenant, &r.plan).await;
        }
    }

    /// The most requests the Quota actor puts in one batch (values below 1 count as 1).
    fn batch_max(&self) -> usize {
        QUOTA_BATCH_MAX
    }
    /// The largest payload `plan` allows, when the store knows the plan (`None`: no plan
    /// limit to apply here). Asked before a referenced payload is read, so an object over
    /// the plan's `max_payload_bytes` is refused without reading it or charging anything.
    fn max_payload_bytes(&self, _plan: &str) -> Option<u64> {
        None
    }
}

/// How the scanner release was found trustworthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvenanceGrant {
    /// Signed by a trusted release key: which, and where the signature was found.
    Trusted(ReleaseSignature),
    Allowlisted,
    Disabled,
}

crate::audit::wire_enum!(
    /// Where a release signature was found (`docs/contract.md#provenance-pre-flight`).
    SignatureLocation {
        /// An OCI 1.1 referrer of the image (referrers API or the `sha256-<hex>` tag
        /// schema); the reference is the referrer manifest's digest.
        Referrer = "referrer",
        /// cosign's signature tag; the reference is the tag (`sha256-<hex>.sig`).
        Tag = "tag",
    }
);

crate::audit::wire_enum!(
    /// The format of a release signature.
    SignatureFormat {
        /// A cosign simple-signing payload with its signature annotation.
        CosignSignature = "cosign_signature",
        /// A DSSE envelope (in-toto attestation).
        DsseAttestation = "dsse_attestation",
        /// A Sigstore bundle v0.3 (DSSE or message signature).
        SigstoreBundle = "sigstore_bundle",
    }
);

/// The trusted release signature of a scanner image: the key that made it and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseSignature {
    /// The release key's keyid (lowercase hex SHA-256 of its SubjectPublicKeyInfo DER).
    pub keyid: String,
    pub location: SignatureLocation,
    /// The referrer manifest's digest, or the signature tag.
    pub reference: String,
    pub format: SignatureFormat,
}

/// Scanner release provenance, without a cache: the Provenance actor keeps the verdicts,
/// makes one lookup per scanner image at a time and bounds lookups per tenant.
#[async_trait]
pub trait ReleaseVerifier: Send + Sync {
    /// What is decided without a registry (gate disabled, malformed input, allowlisted
    /// digest, nothing to check signatures with): `Some` is the answer; `None`: the registry
    /// must be asked ([`look_up`](Self::look_up)). Cheap and without I/O: the actor calls it
    /// in its mailbox.
    fn decide_offline(
        &self,
        _repository: &str,
        _image_digest: &str,
    ) -> Option<Result<ProvenanceGrant, SignerError>> {
        None
    }
    /// Asks the registry about `repository@image_digest`, uncached. A definite answer is
    /// `Ok(Trusted)` or `provenance_untrusted` (the actor keeps those for its TTL); any
    /// other error (e.g. `provenance_unavailable`) is not kept.
    async fn look_up(
        &self,
        repository: &str,
        image_digest: &str,
    ) -> Result<ProvenanceGrant, SignerError>;
    /// Both steps, uncached (tools and tests that use the adapter without the actor).
    async fn verify(
        &self,
        repository: &str,
        image_digest: &str,
    ) -> Result<ProvenanceGrant, SignerError> {
        match self.decide_offline(repository, image_digest) {
            Some(answer) => answer,
            None => self.look_up(repository, image_digest).await,
        }
    }
}
