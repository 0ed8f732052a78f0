//! `stella-signer audit`: check the audit stream's hash chains (`verify`), query it
//! (`show`), and export a slice that verifies on its own (`export`, `verify --file`).
//!
//! A stream message holds one event (a JSON object) or a batch (a JSON array of events of
//! one subject, `<prefix>signer.audit.<tenant>.<decision>`); every command reads both.

mod export;
mod show;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use signer_actors::audit::{ChainVerifier, Decision, decode_message};

use super::CliError;
use super::nats_client::{NatsArgs, runtime};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every writer's hash chain in the audit stream, or in an export file (exit 1 on
    /// the first break).
    Verify {
        #[command(flatten)]
        nats: NatsArgs,
        /// Verify this file written by `audit export`, offline, instead of the stream.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List audit events, filtered by the server on tenant, decision and time.
    Show {
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        filter: Filter,
        /// Only the events of this requestId (checked here, within the other filters).
        #[arg(long)]
        request_id: Option<String>,
        /// One event per line, as stored, instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the events stored between --since and --until to a file that `audit verify
    /// --file` checks alone: the selected events, and the chain links of the others.
    Export {
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        filter: Filter,
        /// Messages stored up to this time (RFC 3339, or a duration ago such as `10m`);
        /// default: now.
        #[arg(long, value_parser = parse_time)]
        until: Option<SystemTime>,
        /// The export file (JSON lines; see docs/consumers.md).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Which events: the stream's server filters on subject and start time.
#[derive(Debug, Clone, Args)]
pub struct Filter {
    /// Only this tenant's events (`_control` for key control events, `_unknown` for jobs
    /// whose tenant could not be read).
    #[arg(long, value_parser = parse_tenant)]
    pub tenant: Option<String>,
    /// Only events with this decision: signed, denied, failed, accepted, refused.
    #[arg(long, value_parser = parse_decision)]
    pub decision: Option<Decision>,
    /// Only events the stream stored from this time on (RFC 3339, e.g.
    /// `2026-11-29T04:00:00Z`, or a duration ago such as `2h`).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<SystemTime>,
}

impl Filter {
    /// The consumer's subject filter below `audit` (`<prefix>signer.audit`). (Events
    /// published before subjects carried the decision, on `<audit>.<tenant>`, are found
    /// only without --tenant and --decision.)
    fn subject(&self, audit: &str) -> String {
        match (&self.tenant, self.decision) {
            (None, None) => format!("{audit}.>"),
            (t, d) => format!(
                "{audit}.{}.{}",
                t.as_deref().unwrap_or("*"),
                d.map_or("*", Decision::as_str)
            ),
        }
    }

    /// Whether `event` passes the tenant and decision filter (the server's filter works
    /// per message; this checks each event). `--since` is by the time the stream stored the
    /// message, checked in [`read`].
    fn admits(&self, event: &serde_json::Value) -> bool {
        let text = |k: &str| event.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        self.tenant.as_deref().is_none_or(|t| text("tenant") == t)
            && self.decision.is_none_or(|d| text("decision") == d.as_str())
    }
}

fn parse_tenant(s: &str) -> Result<String, String> {
    if signer_actors::request::is_valid_tenant(s) {
        Ok(s.to_string())
    } else {
        Err("a tenant is 1 to 64 characters of [A-Za-z0-9_-]".into())
    }
}

fn parse_decision(s: &str) -> Result<Decision, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| "one of signed, denied, failed, accepted, refused".into())
}

/// RFC 3339 (a time zone other than `Z` is not taken), or a duration before now.
fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?}: neither an RFC 3339 time nor a duration such as 2h"))?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("{s:?} is before the epoch"))
}

impl AuditCommand {
    pub fn run(self) -> Result<(), CliError> {
        match self {
            AuditCommand::Verify {
                file: Some(file), ..
            } => export::verify_file(&file),
            AuditCommand::Verify { nats, file: None } => runtime()?.block_on(verify(nats)),
            AuditCommand::Show {
                nats,
                filter,
                request_id,
                json,
            } => runtime()?.block_on(show::show(nats, filter, request_id, json)),
            AuditCommand::Export {
                nats,
                filter,
                until,
                out,
            } => runtime()?.block_on(export::export(nats, filter, until, out)),
        }
    }
}

/// One message of the audit stream, decoded.
pub struct Read {
    pub seq: u64,
    /// When the stream stored it.
    pub published: SystemTime,
    pub events: Vec<serde_json::Value>,
}

fn unusable(e: impl std::fmt::Display) -> CliError {
    CliError::Unusable(e.to_string())
}

/// Reads the audit stream's messages on `subject` from `since` (the first one otherwise)
/// in order, up to the last one stored when the read began, handing each to `each` until it
/// returns `false`. The server does the filtering: only matching messages are sent.
/// Returns the number of messages read.
pub async fn read(
    nats: &NatsArgs,
    subject: String,
    since: Option<SystemTime>,
    mut each: impl FnMut(Read) -> Result<bool, CliError>,
) -> Result<u64, CliError> {
    let (cfg, _client, js) = nats.connect().await?;
    let mut stream = js.get_stream(&cfg.audit_stream).await.map_err(unusable)?;
    if stream.info().await.map_err(unusable)?.state.last_sequence == 0 {
        return Ok(0);
    }
    let deliver_policy = match since {
        Some(t) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::DateTime::from(t),
        },
        None => DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy,
            filter_subject: subject,
            ..Default::default()
        })
        .await
        .map_err(unusable)?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.messages().await.map_err(unusable)?;
    let mut read = 0;
    loop {
        let msg = match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
            Ok(Some(msg)) => msg.map_err(unusable)?,
            Ok(None) => break,
            Err(_) => return Err(unusable("the audit stream sent nothing for 30s")),
        };
        let info = msg.info().map_err(unusable)?;
        let (seq, pending, published) = (
            info.stream_sequence,
            info.pending,
            SystemTime::from(info.published),
        );
        // The start time is the server's filter; checked here too, since an ordered consumer
        // recreated before its first message (a missed heartbeat) starts from the beginning.
        if since.is_none_or(|since| published >= since) {
            read += 1;
            let events = decode_message(&msg.payload).map_err(|e| {
                CliError::Invalid(format!("audit message at stream seq {seq}: {e}"))
            })?;
            if !each(Read {
                seq,
                published,
                events,
            })? {
                break;
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(read)
}

/// Where a break is: the stream sequence, and the event inside a batch.
fn at(seq: u64, index: usize, of: usize) -> String {
    if of == 1 {
        format!("stream seq {seq}")
    } else {
        format!("stream seq {seq}, event {index} of {of}")
    }
}

async fn verify(nats: NatsArgs) -> Result<(), CliError> {
    let stream = nats.nats_config()?.audit_stream;
    let audit = nats.nats_config()?.subject("signer.audit");
    let mut verifier = ChainVerifier::default();
    let messages = read(&nats, format!("{audit}.>"), None, |m| {
        let of = m.events.len();
        for (i, event) in m.events.iter().enumerate() {
            if let Err(e) = verifier.push(event) {
                println!("FAIL: {}: {e}", at(m.seq, i, of));
                return Err(CliError::Invalid("audit chain broken".into()));
            }
        }
        Ok(true)
    })
    .await?;
    if messages == 0 {
        println!("OK: {stream} is empty");
        return Ok(());
    }
    println!(
        "OK: {} events in {messages} messages from {} writer(s), every chain intact",
        verifier.checked(),
        verifier.writers()
    );
    Ok(())
}
