//! Audit events and their hash chain.
//!
//! Each writer (one per replica) chains its events: `prevHash` is the previous event's
//! `hash`, and `hash` is the SHA-256 of the RFC 8785 form of the event without `hash`.
//! Removing, reordering or altering an event breaks the chain at that point.
//!
//! Two families of events share a chain: job decisions (`kind` `dsse`, `export`, `unknown`;
//! decision `signed`, `denied`, `failed`) and key control decisions (`kind: control`, tenant
//! [`CONTROL_TENANT`], a [`ControlRecord`]; decision `accepted`, `refused` or `failed`). Job
//! events carry no `control` member, so their JSON (and hash) is what it always was.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::digest::DigestSet;
use crate::error::ErrorCode;

/// `prevHash` of a writer's first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One decision, as stored on `SIGNER_AUDIT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditEvent {
    pub version: u32,
    pub time: String,
    pub worker: String,
    pub writer_seq: u64,
    pub request_id: String,
    pub tenant: String,
    pub kind: AuditKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<DigestSet>,
    /// How many subjects of the request are not listed in `subjects` (only the first
    /// [`MAX_AUDIT_SUBJECTS`] are, so an event has a fixed size bound); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects_omitted: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poe: Option<PoeRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<ProvenanceRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyRecord>,
    /// The payload's predicateType, once known to be an in-toto Statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicate_type: Option<String>,
    /// The policy the request says its report was evaluated under (`options.policyDigest`
    /// and `options.viewSet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyRecord>,
    /// Only on `kind: control` events: who asked for what, and what was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlRecord>,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub prev_hash: String,
    /// Empty only while the event is being sealed (and then left out of the JSON).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

/// `tenant` of control events (their subject is `<audit prefix>._control`).
pub const CONTROL_TENANT: &str = "_control";

/// `iss` and `sub` of the caller's OpTok.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    pub iss: String,
    pub sub: String,
}

/// Defines a snake_case wire enum with `as_str`.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $text)] $variant),+ }
        impl $name {
            /// Every value, in declaration order (the closed set the schemas enumerate).
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            pub fn as_str(self) -> &'static str { match self { $(Self::$variant => $text),+ } }
        }
    };
}
pub(crate) use wire_enum;

wire_enum!(
    /// `kind` of an audit event: a job's request kind, `control` for a key command, or
    /// `verify_referrers` for a provenance pre-flight question.
    AuditKind {
        Dsse = "dsse", Export = "export", Unknown = "unknown", Control = "control",
        VerifyReferrers = "verify_referrers",
    }
);

impl From<crate::messages::ResultKind> for AuditKind {
    fn from(k: crate::messages::ResultKind) -> Self {
        use crate::messages::ResultKind;
        match k {
            ResultKind::Dsse => Self::Dsse,
            ResultKind::Export => Self::Export,
            ResultKind::Unknown => Self::Unknown,
        }
    }
}

wire_enum!(
    /// Why a command on the key control subject was refused (stable codes, also sent in the
    /// reply).
    ControlRefusal {
        /// No `[gates.control]` is configured: the subject refuses everything.
        Disabled = "control_disabled",
        /// Not a control envelope (`{"command": {...}, "signatures": [...]}`), or an unknown action.
        Malformed = "malformed",
        /// No signature at all.
        Unsigned = "unsigned",
        /// Not a compact JWS, an algorithm other than the key's, or a signature that does not verify.
        BadSignature = "bad_signature",
        /// The `kid` is not in the operator key set.
        UnknownKey = "unknown_key",
        /// `exp` has passed (beyond the clock skew).
        Expired = "expired",
        /// `nbf` or `iat` is in the future (beyond the clock skew).
        NotYetValid = "not_yet_valid",
        /// `exp - iat` is longer than the accepted token life, or a time claim is missing.
        LifetimeTooLong = "lifetime_too_long",
        /// `scope` does not contain `signer.admin`.
        WrongScope = "wrong_scope",
        /// The token signs another command (its `cmd` digest differs), or has no `jti`/`sub`.
        CommandMismatch = "command_mismatch",
        /// A `jti` was used before (on any replica).
        Replayed = "replayed",
        /// Fewer distinct operators signed than `required_signatures`.
        NotEnoughSignatures = "not_enough_signatures",
        /// Authorised, but the command cannot be applied (unknown key, revoked key, bad scope).
        InvalidCommand = "invalid_command",
        /// The operator key set, the jti store, the key bucket or the audit stream is unreachable.
        Unavailable = "unavailable",
    }
);

/// What a key command asked for and how it was decided (`kind: control` events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlRecord {
    /// `revoke`, `rotate`, `restore`, or `unknown` when the command could not be read.
    pub action: String,
    /// The command's arguments as received (without `action`); absent when unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Map<String, serde_json::Value>>,
    /// SHA-256 (hex) of the RFC 8785 form of the command: what the operators signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_sha256: Option<String>,
    /// Every signature the command carried, in order, with who it names and its verdict.
    pub signatures: Vec<ControlSignature>,
    /// Why it was refused (or failed); absent when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<ControlRefusal>,
    /// Human-readable detail of the refusal or the change made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One operator signature of a key command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlSignature {
    /// `kid` of the JWS header (as claimed, when the signature was refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// `sub` claim: the operator (only read from a verified signature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// `jti` claim (only from a verified signature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// `true` when it verified and counted towards `required_signatures`.
    pub counted: bool,
    /// Why it did not count, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<ControlRefusal>,
}

wire_enum!(
    /// How the OpTok gate decided.
    AuthState { Valid = "valid", Disabled = "disabled", Bearer = "bearer", Invalid = "invalid", NotChecked = "not_checked" }
);
wire_enum!(
    /// How the Proof-of-Entitlement gate decided.
    PoeState {
        Valid = "valid", Disabled = "disabled", Bypassed = "bypassed", Invalid = "invalid", Expired = "expired",
        Denied = "denied", Unavailable = "unavailable", NotChecked = "not_checked",
    }
);
wire_enum!(
    /// How the quota gate decided.
    QuotaOutcome {
        Allowed = "allowed", Exceeded = "exceeded", Disabled = "disabled", FailOpen = "fail_open",
        Unavailable = "unavailable", NotChecked = "not_checked",
    }
);
wire_enum!(
    /// How the provenance gate decided.
    ProvenanceVerdict {
        Trusted = "trusted", Untrusted = "untrusted", Unavailable = "unavailable", Allowlisted = "allowlisted",
        Disabled = "disabled", NotChecked = "not_checked",
    }
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRecord {
    pub state: AuthState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoeRecord {
    pub state: PoeState,
    pub plan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaRecord {
    pub outcome: QuotaOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvenanceRecord {
    pub verdict: ProvenanceVerdict,
    pub scanner_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub keyid: String,
    pub source: crate::keys::KeySource,
    pub mode: crate::keys::KeyMode,
}

/// What the signer decided. Jobs: `signed`, `denied`, `failed`; key commands: `accepted`,
/// `refused`, `failed` (authorised but not applied); pre-flight questions: `accepted` (a job
/// would pass the provenance gate), `denied`, `failed` (as a job's refusal would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Signed,
    Denied,
    Failed,
    Accepted,
    Refused,
}

impl Decision {
    /// The wire value (also the last token of the event's subject).
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Signed => "signed",
            Decision::Denied => "denied",
            Decision::Failed => "failed",
            Decision::Accepted => "accepted",
            Decision::Refused => "refused",
        }
    }
}

/// The subject token of `tenant`: the tenant itself, since the tenant pattern
/// (`[A-Za-z0-9_-]`, 1 to 64) only allows characters that are safe in a subject token;
/// `_unknown` (the tenant of a job whose tenant could not be read) for anything else (an
/// event built from an unvalidated value), so that no event can publish on a subject with
/// wildcards or extra tokens.
pub fn subject_token(tenant: &str) -> &str {
    if crate::request::is_valid_tenant(tenant) {
        tenant
    } else {
        "_unknown"
    }
}

impl AuditEvent {
    /// The subject this event is published on, below the audit prefix:
    /// `<tenant token>.<decision>` (see [`subject_token`]).
    pub fn subject_suffix(&self) -> String {
        format!("{}.{}", subject_token(&self.tenant), self.decision.as_str())
    }
}

/// Why an audit message could not be read as events.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("neither an event (a JSON object) nor a batch (a JSON array of objects)")]
    NotEvents,
}

/// The events of one audit stream message, in order: a message is one event (a JSON
/// object) or a batch (a JSON array of events).
pub fn decode_message(body: &[u8]) -> Result<Vec<serde_json::Value>, MessageError> {
    match serde_json::from_slice(body)? {
        one @ serde_json::Value::Object(_) => Ok(vec![one]),
        serde_json::Value::Array(events) if events.iter().all(|e| e.is_object()) => Ok(events),
        _ => Err(MessageError::NotEvents),
    }
}

/// Subjects an audit event lists at most; the rest are counted in `subjectsOmitted`.
pub const MAX_AUDIT_SUBJECTS: usize = 64;

/// Bytes a job's audit event (JSON, sealed) can take at most, whatever its request: the
/// bound [`AuditEvent::bounded`] guarantees, far below the broker's `max_payload`.
/// (64 subjects of 5 digests of at most 128 hex each, eight echoed strings, the fixed members.)
pub const MAX_JOB_EVENT_BYTES: usize = 64 * 1024;

impl AuditEvent {
    /// The event with every value that can come from a request bounded, so that it has a
    /// fixed size bound ([`MAX_JOB_EVENT_BYTES`]) and can always be stored: at most
    /// [`MAX_AUDIT_SUBJECTS`] subjects (the count of the others in `subjectsOmitted`), and
    /// the caller, plan and scanner digest cut to [`crate::echo::ECHO_MAX_BYTES`].
    /// Identifiers (`requestId`, `tenant`, `traceId`) are validated before they get here.
    pub fn bounded(mut self) -> Self {
        if self.subjects.len() > MAX_AUDIT_SUBJECTS {
            let omitted = self.subjects.len() - MAX_AUDIT_SUBJECTS;
            self.subjects.truncate(MAX_AUDIT_SUBJECTS);
            self.subjects_omitted = Some(
                self.subjects_omitted
                    .unwrap_or(0)
                    .saturating_add(omitted as u64),
            );
        }
        // a digest set holds only the five known algorithms once validated; anything else
        // (an event built from an unvalidated request) is cut to one entry
        for set in &mut self.subjects {
            if crate::digest::validate_set(set).is_err() {
                let first = set
                    .iter()
                    .next()
                    .map(|(k, v)| (crate::echo::clip(k), crate::echo::clip(v)));
                set.clear();
                set.extend(first);
            }
        }
        if let Some(c) = &mut self.caller {
            c.iss = crate::echo::clip(&c.iss);
            c.sub = crate::echo::clip(&c.sub);
        }
        if let Some(plan) = self.poe.as_mut().and_then(|p| p.plan.as_mut()) {
            *plan = crate::echo::clip(plan);
        }
        if let Some(d) = self
            .provenance
            .as_mut()
            .and_then(|p| p.scanner_digest.as_mut())
        {
            *d = crate::echo::clip(d);
        }
        for k in &mut self.keys {
            k.keyid = crate::echo::clip(&k.keyid);
        }
        if let Some(t) = &mut self.predicate_type {
            *t = crate::echo::clip(t);
        }
        if let Some(p) = &mut self.policy {
            p.digest = crate::echo::clip(&p.digest);
            p.view_set = crate::echo::clip(&p.view_set);
        }
        self
    }

    /// The hash this event must carry: SHA-256 of JCS(event without `hash`).
    pub fn compute_hash(&self) -> Result<String, serde_json::Error> {
        if self.hash.is_empty() {
            // the sealing path: no `hash` member to remove, canonicalise the struct directly
            crate::jcs::sha256_hex(self)
        } else {
            hash_of_stored(&serde_json::to_value(self)?)
        }
    }

    /// Field rules beyond the types: identifiers, hex hashes, sequence numbers.
    pub fn validate(&self) -> Result<(), String> {
        use crate::messages::check;
        check(self.version == 1, "version must be 1")?;
        check(!self.worker.is_empty(), "worker is empty")?;
        check(self.writer_seq >= 1, "writerSeq starts at 1")?;
        check(
            crate::request::is_valid_request_id(&self.request_id),
            "requestId pattern",
        )?;
        check(
            crate::request::is_valid_tenant(&self.tenant),
            "tenant pattern",
        )?;
        check(
            crate::messages::is_hex(&self.prev_hash, 64),
            "prevHash must be 64 lowercase hex",
        )?;
        check(
            crate::messages::is_hex(&self.hash, 64),
            "hash must be 64 lowercase hex",
        )?;
        if self.kind == AuditKind::Control {
            check(
                self.tenant == CONTROL_TENANT,
                "control events have tenant _control",
            )?;
            check(
                self.control.is_some(),
                "control events carry a control record",
            )?;
            check(
                matches!(
                    self.decision,
                    Decision::Accepted | Decision::Refused | Decision::Failed
                ),
                "control decisions are accepted, refused or failed",
            )?;
            check(
                self.keys.is_empty() && self.subjects.is_empty() && self.error_code.is_none(),
                "control events carry no keys, subjects or errorCode",
            )?;
        } else if self.kind == AuditKind::VerifyReferrers {
            check(self.control.is_none(), "only control events carry control")?;
            check(
                matches!(
                    self.decision,
                    Decision::Accepted | Decision::Denied | Decision::Failed
                ),
                "pre-flight decisions are accepted, denied or failed",
            )?;
            check(
                self.keys.is_empty() && self.subjects.is_empty(),
                "pre-flight events carry no keys or subjects",
            )?;
        } else {
            check(self.control.is_none(), "only control events carry control")?;
            check(
                !matches!(self.decision, Decision::Accepted | Decision::Refused),
                "accepted and refused are control and pre-flight decisions",
            )?;
        }
        check(
            self.subjects.len() <= MAX_AUDIT_SUBJECTS,
            "at most 64 subjects are listed",
        )?;
        check(
            self.subjects_omitted != Some(0),
            "subjectsOmitted is at least 1 when present",
        )?;
        if let Some(t) = &self.trace_id {
            check(
                crate::messages::is_hex(t, 32),
                "traceId must be 32 lowercase hex",
            )?;
        }
        self.subjects
            .iter()
            .try_for_each(crate::digest::validate_set)
    }
}

/// SHA-256 of JCS(stored event without `hash`). Verification works on the event exactly
/// as stored, so any writer that follows the rule (not only this one) can be checked.
pub fn hash_of_stored(event: &serde_json::Value) -> Result<String, serde_json::Error> {
    let mut value = event.clone();
    if let Some(map) = value.as_object_mut() {
        map.remove("hash");
    }
    crate::jcs::sha256_hex(&value)
}

/// The chain state of one writer.
#[derive(Debug, Clone)]
pub struct AuditChain {
    worker: String,
    prev_hash: String,
    next_seq: u64,
}

impl AuditChain {
    /// A new chain for `worker`, starting from the genesis hash.
    pub fn new(worker: impl Into<String>) -> Self {
        Self {
            worker: worker.into(),
            prev_hash: GENESIS_HASH.into(),
            next_seq: 1,
        }
    }

    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Links `event` to the chain: sets worker, writerSeq, prevHash and hash.
    pub fn seal(&mut self, mut event: AuditEvent) -> Result<AuditEvent, serde_json::Error> {
        event.worker.clone_from(&self.worker);
        event.writer_seq = self.next_seq;
        event.prev_hash.clone_from(&self.prev_hash);
        event.hash.clear();
        event.hash = event.compute_hash()?;
        self.prev_hash.clone_from(&event.hash);
        self.next_seq += 1;
        Ok(event)
    }
}

/// The first problem found while walking an audit stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error(
        "event at position {position} (worker {worker}, writerSeq {writer_seq}) was altered: hash does not match its content"
    )]
    Altered {
        position: usize,
        worker: String,
        writer_seq: u64,
    },
    #[error(
        "event at position {position} (worker {worker}, writerSeq {writer_seq}) does not follow writerSeq {expected_prev}: an event is missing or out of order"
    )]
    Gap {
        position: usize,
        worker: String,
        writer_seq: u64,
        expected_prev: u64,
    },
    #[error(
        "event at position {position} (worker {worker}, writerSeq {writer_seq}) has a prevHash that is not the previous event's hash"
    )]
    Unlinked {
        position: usize,
        worker: String,
        writer_seq: u64,
    },
}

/// An event's place in its writer's chain: what an export keeps of an event it leaves out,
/// so the chain still links across it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Link {
    pub worker: String,
    pub writer_seq: u64,
    pub prev_hash: String,
    pub hash: String,
}

impl Link {
    /// The link of an event as stored (members missing or of the wrong type read as empty,
    /// which no chain check accepts).
    pub fn of_stored(stored: &serde_json::Value) -> Link {
        let text = |k: &str| {
            stored
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Link {
            worker: text("worker"),
            writer_seq: stored
                .get("writerSeq")
                .and_then(|v| v.as_u64())
                .unwrap_or_default(),
            prev_hash: text("prevHash"),
            hash: text("hash"),
        }
    }
}

/// The part of one writer's chain a walk saw: where it starts (its anchor, the `prevHash`
/// of its first event seen) and where it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChainSpan {
    pub worker: String,
    pub first_seq: u64,
    pub anchor: String,
    pub last_seq: u64,
    pub head: String,
}

/// Walks events in stream order. Several writers interleave; each chain is checked on its own.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    /// Per writer: its span so far (the last link is its head).
    spans: HashMap<String, ChainSpan>,
    position: usize,
}

impl ChainVerifier {
    /// Checks the next event, as stored: its hash, then its link. A writer's first event
    /// seen may start mid-chain (the stream's retention may have dropped older ones); from
    /// then on every link must hold.
    pub fn push(&mut self, stored: &serde_json::Value) -> Result<(), ChainBreak> {
        let link = Link::of_stored(stored);
        if link.worker.is_empty() || hash_of_stored(stored).ok().as_deref() != Some(&link.hash) {
            let position = self.position;
            self.position += 1;
            return Err(ChainBreak::Altered {
                position,
                worker: link.worker,
                writer_seq: link.writer_seq,
            });
        }
        self.push_link(link)
    }

    /// Checks the next link of an event whose content is not at hand (left out of an
    /// export): only that it follows its writer's previous one.
    pub fn push_link(&mut self, link: Link) -> Result<(), ChainBreak> {
        let position = self.position;
        self.position += 1;
        let Link {
            worker,
            writer_seq,
            prev_hash,
            hash,
        } = link;
        if worker.is_empty() || !crate::messages::is_hex(&hash, 64) {
            return Err(ChainBreak::Altered {
                position,
                worker,
                writer_seq,
            });
        }
        if let Some(span) = self.spans.get_mut(&worker) {
            if writer_seq != span.last_seq + 1 {
                return Err(ChainBreak::Gap {
                    position,
                    worker,
                    writer_seq,
                    expected_prev: span.last_seq,
                });
            }
            if prev_hash != span.head {
                return Err(ChainBreak::Unlinked {
                    position,
                    worker,
                    writer_seq,
                });
            }
            span.last_seq = writer_seq;
            span.head = hash;
            return Ok(());
        }
        if writer_seq == 1 && prev_hash != GENESIS_HASH {
            return Err(ChainBreak::Unlinked {
                position,
                worker,
                writer_seq,
            });
        }
        self.spans.insert(
            worker.clone(),
            ChainSpan {
                worker,
                first_seq: writer_seq,
                anchor: prev_hash,
                last_seq: writer_seq,
                head: hash,
            },
        );
        Ok(())
    }

    /// Number of events checked so far.
    pub fn checked(&self) -> usize {
        self.position
    }

    /// Number of distinct writers seen.
    pub fn writers(&self) -> usize {
        self.spans.len()
    }

    /// What was seen of each writer's chain, by writer name.
    pub fn spans(&self) -> Vec<ChainSpan> {
        let mut spans: Vec<_> = self.spans.values().cloned().collect();
        spans.sort_by(|a, b| a.worker.cmp(&b.worker));
        spans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(request_id: &str) -> AuditEvent {
        AuditEvent {
            version: 1,
            time: "2026-11-29T00:00:00Z".into(),
            worker: String::new(),
            writer_seq: 0,
            request_id: request_id.into(),
            tenant: "acme".into(),
            kind: AuditKind::Dsse,
            caller: None,
            subjects: vec![],
            subjects_omitted: None,
            auth: None,
            poe: None,
            quota: None,
            provenance: None,
            keys: vec![],
            predicate_type: None,
            policy: None,
            control: None,
            decision: Decision::Signed,
            error_code: None,
            trace_id: None,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    fn chain(n: usize) -> Vec<AuditEvent> {
        let mut c = AuditChain::new("w1");
        (0..n)
            .map(|i| c.seal(event(&format!("r{i}"))).unwrap())
            .collect()
    }

    fn verify(events: &[AuditEvent]) -> Result<(), ChainBreak> {
        let mut v = ChainVerifier::default();
        events
            .iter()
            .try_for_each(|e| v.push(&serde_json::to_value(e).unwrap()))
    }

    /// The worst a request can put into a job's event: a million subjects, each with every
    /// algorithm and unknown ones, a megabyte of control bytes in every string. Sealed and
    /// encoded, the event stays within its bound, and is still a valid event.
    #[test]
    fn a_job_event_has_a_fixed_size_bound_whatever_the_request() {
        let huge = "\u{1}\"".repeat(1 << 19);
        let mut set = DigestSet::new();
        for (alg, len) in [
            ("sha256", 64),
            ("sha384", 96),
            ("sha512", 128),
            ("sha1", 40),
            ("gitCommit", 40),
        ] {
            set.insert(alg.into(), "a".repeat(len));
        }
        let mut bad = set.clone();
        bad.insert(huge.clone(), huge.clone());
        let mut e = event("r-1");
        e.subjects = std::iter::repeat_n(set, 500_000)
            .chain(std::iter::repeat_n(bad, 10))
            .collect();
        e.subjects.rotate_right(10); // the unvalidated ones first, where they are kept
        e.caller = Some(Caller {
            iss: huge.clone(),
            sub: huge.clone(),
        });
        e.poe = Some(PoeRecord {
            state: PoeState::Invalid,
            plan: Some(huge.clone()),
        });
        e.quota = Some(QuotaRecord {
            outcome: QuotaOutcome::NotChecked,
            retry_after_ms: Some(u64::MAX),
        });
        e.provenance = Some(ProvenanceRecord {
            verdict: ProvenanceVerdict::NotChecked,
            scanner_digest: Some(huge.clone()),
        });
        e.keys = (0..16)
            .map(|_| KeyRecord {
                keyid: huge.clone(),
                source: crate::keys::KeySource::Pkcs11,
                mode: crate::keys::KeyMode::Keyful,
            })
            .collect();
        e.predicate_type = Some(huge.clone());
        e.policy = Some(crate::policy::PolicyRecord {
            digest: huge.clone(),
            view_set: huge.clone(),
        });
        e.decision = Decision::Failed;
        e.error_code = Some(ErrorCode::InvalidRequest);
        e.trace_id = Some("f".repeat(32));
        let mut chain = AuditChain::new("w".repeat(200));
        let sealed = chain.seal(e.bounded()).unwrap();
        let json = serde_json::to_vec(&sealed).unwrap();
        assert!(json.len() <= MAX_JOB_EVENT_BYTES, "{} bytes", json.len());
        assert_eq!(sealed.subjects.len(), MAX_AUDIT_SUBJECTS);
        assert_eq!(
            sealed.subjects_omitted,
            Some(500_010 - MAX_AUDIT_SUBJECTS as u64)
        );
        assert!(sealed.caller.as_ref().unwrap().sub.contains("…[+"));
        assert!(sealed.predicate_type.as_ref().unwrap().contains("…[+"));
        assert!(sealed.policy.as_ref().unwrap().view_set.contains("…[+"));
        let back: AuditEvent = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            back.compute_hash().unwrap(),
            back.hash,
            "the bounded event verifies"
        );
        // a well-formed event is left as it was
        let small = event("r-2");
        assert_eq!(small.clone().bounded(), small);
    }

    /// Messages of `events`: `sizes` events each, a lone one as an object.
    fn messages(events: &[AuditEvent], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut rest = events;
        sizes
            .iter()
            .map(|&n| {
                let (these, more) = rest.split_at(n);
                rest = more;
                match these {
                    [one] => serde_json::to_vec(one).unwrap(),
                    many => serde_json::to_vec(many).unwrap(),
                }
            })
            .collect()
    }

    fn verify_messages(messages: &[Vec<u8>]) -> Result<usize, ChainBreak> {
        let mut v = ChainVerifier::default();
        for m in messages {
            for e in decode_message(m).unwrap() {
                v.push(&e)?;
            }
        }
        Ok(v.checked())
    }

    #[test]
    fn a_stream_of_lone_events_and_batches_verifies_and_a_broken_batch_is_found() {
        let events = chain(10);
        let mixed = messages(&events, &[1, 4, 1, 3, 1]);
        assert_eq!(mixed[0].first(), Some(&b'{'));
        assert_eq!(mixed[1].first(), Some(&b'['));
        assert_eq!(verify_messages(&mixed), Ok(10));

        let mut altered = events.clone();
        altered[3].decision = Decision::Failed;
        assert!(matches!(
            verify_messages(&messages(&altered, &[1, 4, 1, 3, 1])),
            Err(ChainBreak::Altered { position: 3, .. })
        ));

        let mut removed = events.clone();
        removed.remove(2); // from inside the batch of four
        assert!(matches!(
            verify_messages(&messages(&removed, &[1, 3, 1, 3, 1])),
            Err(ChainBreak::Gap { position: 2, .. })
        ));

        assert!(decode_message(b"[1,2]").is_err());
        assert!(decode_message(b"\"x\"").is_err());
        assert!(decode_message(b"[").is_err());
    }

    #[test]
    fn an_event_subject_names_its_tenant_and_decision_with_safe_tokens() {
        let mut e = event("r-1");
        assert_eq!(e.subject_suffix(), "acme.signed");
        e.tenant = "a.b.*".into();
        e.decision = Decision::Refused;
        assert_eq!(e.subject_suffix(), "_unknown.refused");
        for d in [
            Decision::Signed,
            Decision::Denied,
            Decision::Failed,
            Decision::Accepted,
            Decision::Refused,
        ] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
    }

    #[test]
    fn intact_chain_verifies_and_links() {
        let events = chain(5);
        assert_eq!(events[0].prev_hash, GENESIS_HASH);
        assert_eq!(events[1].prev_hash, events[0].hash);
        verify(&events).unwrap();
    }

    #[test]
    fn altered_removed_and_reordered_events_are_found() {
        let mut altered = chain(5);
        altered[2].tenant = "evil".into();
        assert!(matches!(
            verify(&altered),
            Err(ChainBreak::Altered { position: 2, .. })
        ));

        let mut removed = chain(5);
        removed.remove(2);
        assert!(matches!(
            verify(&removed),
            Err(ChainBreak::Gap { position: 2, .. })
        ));

        let mut swapped = chain(5);
        swapped.swap(1, 2);
        assert!(verify(&swapped).is_err());

        let mut relinked = chain(5);
        relinked[3].prev_hash = relinked[1].hash.clone();
        relinked[3].hash = relinked[3].compute_hash().unwrap();
        assert!(matches!(
            verify(&relinked),
            Err(ChainBreak::Unlinked { position: 3, .. })
        ));
    }
}
