//! `stella-signer audit export` and `audit verify --file`: a slice of the audit stream that
//! verifies alone.
//!
//! An export is JSON lines: a header; then, in stream order, one line per event of every
//! message stored in the window, the event itself when it matches the filter, otherwise
//! only its link (worker, writerSeq, prevHash, hash), so that every writer's chain is
//! continuous across the events left out; then a trailer with the counts and, per writer,
//! the part of its chain the slice holds (its anchor, the `prevHash` of its first event, and
//! its head). The trailer makes a truncated file fail, and the anchors and heads tie the
//! slice to the exports before and after it, or to the stream.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use signer_actors::audit::{ChainBreak, ChainSpan, ChainVerifier, Decision, Link};

use super::{CliError, Filter, NatsArgs, Read, read};

/// `format` of an export's header.
pub const FORMAT: &str = "stella-signer/audit-export/v1";

/// The first line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub stream: String,
    /// The window, by the time the stream stored each message (RFC 3339).
    pub since: Option<String>,
    pub until: String,
    /// The filter: events it does not select are present as links only.
    pub tenant: Option<String>,
    pub decision: Option<Decision>,
}

/// One event of the slice: the event as stored, or its link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// The stream sequence of its message, and its index in that message.
    pub seq: u64,
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Link>,
}

/// The last line: `{"end": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct End {
    pub messages: u64,
    pub events: u64,
    pub links: u64,
    pub chains: Vec<ChainSpan>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndLine {
    end: End,
}

/// Writes an export while checking the chains it holds.
pub struct ExportWriter<W: Write> {
    out: W,
    verifier: ChainVerifier,
    end: End,
}

/// Why an export could not be written or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("line {line}: {what}")]
    Malformed { line: usize, what: String },
    #[error("line {line} (stream seq {seq}, event {index}): {source}")]
    Broken {
        line: usize,
        seq: u64,
        index: usize,
        #[source]
        source: ChainBreak,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl<W: Write> ExportWriter<W> {
    pub fn new(mut out: W, header: &Header) -> Result<Self, ExportError> {
        serde_json::to_writer(&mut out, header).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
        Ok(ExportWriter {
            out,
            verifier: ChainVerifier::default(),
            end: End {
                messages: 0,
                events: 0,
                links: 0,
                chains: Vec::new(),
            },
        })
    }

    /// Adds a message: the events `select` takes in full, the others as links.
    pub fn message(
        &mut self,
        m: &Read,
        select: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), ExportError> {
        self.end.messages += 1;
        for (index, event) in m.events.iter().enumerate() {
            let line = self.end.events + self.end.links + 2;
            self.verifier
                .push(event)
                .map_err(|source| ExportError::Broken {
                    line: line as usize,
                    seq: m.seq,
                    index,
                    source,
                })?;
            let entry = if select(event) {
                self.end.events += 1;
                Entry {
                    seq: m.seq,
                    index,
                    event: Some(event.clone()),
                    link: None,
                }
            } else {
                self.end.links += 1;
                Entry {
                    seq: m.seq,
                    index,
                    event: None,
                    link: Some(Link::of_stored(event)),
                }
            };
            serde_json::to_writer(&mut self.out, &entry).map_err(std::io::Error::from)?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Writes the trailer.
    pub fn finish(mut self) -> Result<End, ExportError> {
        self.end.chains = self.verifier.spans();
        serde_json::to_writer(
            &mut self.out,
            &EndLine {
                end: self.end.clone(),
            },
        )
        .map_err(std::io::Error::from)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(self.end)
    }
}

/// Checks an export: its events against their hashes, every chain's links (events and
/// links alike), the order of the entries, and the trailer against what was read.
pub fn verify_export(input: impl BufRead) -> Result<(Header, End), ExportError> {
    let malformed = |line: usize, what: String| ExportError::Malformed { line, what };
    let mut lines = input.lines().enumerate().map(|(i, l)| (i + 1, l));
    let header: Header = match lines.next() {
        Some((_, line)) => serde_json::from_str(&line?)
            .map_err(|e| malformed(1, format!("not an export header: {e}")))?,
        None => return Err(malformed(1, "empty file".into())),
    };
    if header.format != FORMAT {
        return Err(malformed(
            1,
            format!("format {:?}, not {FORMAT}", header.format),
        ));
    }
    let mut verifier = ChainVerifier::default();
    let (mut events, mut links, mut messages) = (0u64, 0u64, 0u64);
    let mut last: Option<(u64, usize)> = None;
    let mut end = None;
    for (n, line) in lines {
        let line = line?;
        if end.is_some() {
            return Err(malformed(n, "more after the trailer".into()));
        }
        if let Ok(EndLine { end: e }) = serde_json::from_str(&line) {
            end = Some((n, e));
            continue;
        }
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| malformed(n, format!("neither an entry nor the trailer: {e}")))?;
        // entries in stream order, the events of a message from index 0 without gaps
        let in_order = match last {
            None => entry.index == 0,
            Some((seq, index)) if seq == entry.seq => entry.index == index + 1,
            Some((seq, _)) => entry.seq > seq && entry.index == 0,
        };
        if !in_order {
            return Err(malformed(
                n,
                format!(
                    "stream seq {} event {} out of order",
                    entry.seq, entry.index
                ),
            ));
        }
        if last.is_none_or(|(seq, _)| seq != entry.seq) {
            messages += 1;
        }
        last = Some((entry.seq, entry.index));
        let broken = |source| ExportError::Broken {
            line: n,
            seq: entry.seq,
            index: entry.index,
            source,
        };
        match (&entry.event, entry.link) {
            (Some(event), None) => {
                events += 1;
                verifier.push(event).map_err(broken)?;
            }
            (None, Some(link)) => {
                links += 1;
                verifier.push_link(link).map_err(broken)?;
            }
            _ => return Err(malformed(n, "an entry has an event or a link".into())),
        }
    }
    let Some((n, end)) = end else {
        return Err(malformed(0, "no trailer: the export is truncated".into()));
    };
    let read = End {
        messages,
        events,
        links,
        chains: verifier.spans(),
    };
    if end != read {
        return Err(malformed(
            n,
            format!(
                "the trailer does not match the entries: it says {}, they hold {}",
                serde_json::to_string(&end).unwrap_or_default(),
                serde_json::to_string(&read).unwrap_or_default()
            ),
        ));
    }
    Ok((header, end))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub async fn export(
    nats: NatsArgs,
    filter: Filter,
    until: Option<SystemTime>,
    out: PathBuf,
) -> Result<(), CliError> {
    let cfg = nats.nats_config()?;
    let until = until.unwrap_or_else(SystemTime::now);
    let header = Header {
        format: FORMAT.into(),
        stream: cfg.audit_stream.clone(),
        since: filter.since.map(rfc3339),
        until: rfc3339(until),
        tenant: filter.tenant.clone(),
        decision: filter.decision,
    };
    let file = std::fs::File::create(&out)
        .map_err(|e| CliError::Unusable(format!("{}: {e}", out.display())))?;
    let failed = |e: ExportError| match e {
        ExportError::Broken { .. } => {
            CliError::Invalid(format!("the stream's chain is broken: {e}"))
        }
        e => CliError::Unusable(format!("{}: {e}", out.display())),
    };
    let mut writer = ExportWriter::new(std::io::BufWriter::new(file), &header).map_err(failed)?;
    // the window is by store time: the filter selects events, the rest are links
    let select = filter.clone();
    let audit = cfg.subject("signer.audit");
    read(&nats, format!("{audit}.>"), filter.since, |m| {
        if m.published > until {
            return Ok(false);
        }
        writer.message(&m, |e| select.admits(e)).map_err(failed)?;
        Ok(true)
    })
    .await?;
    let end = writer.finish().map_err(failed)?;
    println!(
        "exported {} events and {} links of {} messages from {} writer(s) to {}",
        end.events,
        end.links,
        end.messages,
        end.chains.len(),
        out.display()
    );
    Ok(())
}

pub fn verify_file(path: &Path) -> Result<(), CliError> {
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::Unusable(format!("{}: {e}", path.display())))?;
    match verify_export(std::io::BufReader::new(file)) {
        Ok((header, end)) => {
            println!(
                "OK: {}: {} events and {} links of {} messages from {} writer(s), every chain intact (stream {}, {} to {})",
                path.display(),
                end.events,
                end.links,
                end.messages,
                end.chains.len(),
                header.stream,
                header.since.as_deref().unwrap_or("the start"),
                header.until
            );
            for c in &end.chains {
                println!(
                    "  {}: writerSeq {}..{}, anchor {}, head {}",
                    c.worker, c.first_seq, c.last_seq, c.anchor, c.head
                );
            }
            Ok(())
        }
        Err(ExportError::Io(e)) => Err(CliError::Unusable(format!("{}: {e}", path.display()))),
        Err(e) => {
            println!("FAIL: {}: {e}", path.display());
            Err(CliError::Invalid("audit export does not verify".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signer_actors::audit::{AuditChain, AuditEvent, AuditKind};

    fn event(tenant: &str, decision: Decision, i: usize) -> AuditEvent {
        serde_json::from_value(serde_json::json!({
            "version": 1, "time": "2026-11-29T00:00:00Z", "worker": "", "writerSeq": 0,
            "requestId": format!("r-{i}"), "tenant": tenant, "kind": AuditKind::Dsse,
            "decision": decision, "prevHash": ""
        }))
        .unwrap()
    }

    /// Four messages from two writers: a batch of acme's signed events, a lone globex
    /// event, a batch of the second writer's, a lone acme event of the first.
    fn messages() -> Vec<Read> {
        let (mut a, mut b) = (AuditChain::new("a-w0"), AuditChain::new("b-w0"));
        let seal = |c: &mut AuditChain, tenant: &str, d: Decision, i: usize| {
            serde_json::to_value(c.seal(event(tenant, d, i)).unwrap()).unwrap()
        };
        let m1 = (0..3)
            .map(|i| seal(&mut a, "acme", Decision::Signed, i))
            .collect();
        let m2 = vec![seal(&mut a, "globex", Decision::Denied, 3)];
        let m3 = (4..6)
            .map(|i| seal(&mut b, "acme", Decision::Failed, i))
            .collect();
        let m4 = vec![seal(&mut a, "acme", Decision::Signed, 6)];
        [m1, m2, m3, m4]
            .into_iter()
            .enumerate()
            .map(|(i, events)| Read {
                seq: i as u64 + 1,
                published: SystemTime::now(),
                events,
            })
            .collect()
    }

    fn export_of(tenant: Option<&str>) -> String {
        let header = Header {
            format: FORMAT.into(),
            stream: "S".into(),
            since: None,
            until: "2026-11-30T00:00:00Z".into(),
            tenant: tenant.map(Into::into),
            decision: None,
        };
        let mut out = Vec::new();
        let mut w = ExportWriter::new(&mut out, &header).unwrap();
        for m in messages() {
            w.message(&m, |e| tenant.is_none_or(|t| e["tenant"] == t))
                .unwrap();
        }
        w.finish().unwrap();
        String::from_utf8(out).unwrap()
    }

    fn verify(text: &str) -> Result<End, ExportError> {
        verify_export(text.as_bytes()).map(|(_, end)| end)
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_filtered_export_verifies_alone_with_links_for_the_events_left_out() {
        let text = export_of(Some("acme"));
        let end = verify(&text).unwrap();
        assert_eq!((end.messages, end.events, end.links), (4, 6, 1));
        assert_eq!(end.chains.len(), 2);
        assert_eq!(end.chains[0].first_seq, 1);
        assert_eq!(end.chains[0].anchor, signer_actors::audit::GENESIS_HASH);
        assert_eq!(end.chains[0].last_seq, 5);
        assert!(text.lines().nth(4).unwrap().contains("\"link\""), "{text}");
        let all = verify(&export_of(None)).unwrap();
        assert_eq!((all.events, all.links), (7, 0));
    }

    #[test]
    fn a_tampered_export_fails() {
        let text = export_of(Some("acme"));
        // an event altered
        let altered = text.replacen("\"requestId\":\"r-1\"", "\"requestId\":\"r-9\"", 1);
        assert_ne!(altered, text);
        assert!(matches!(
            verify(&altered),
            Err(ExportError::Broken {
                line: 3,
                source: ChainBreak::Altered { .. },
                ..
            })
        ));
        // an event removed (its line dropped)
        let mut removed = lines(&text);
        removed.remove(2);
        assert!(
            matches!(
                verify(&removed.join("\n")),
                Err(ExportError::Malformed { line: 3, .. })
            ),
            "out of order inside its message"
        );
        // a whole message removed: the chain has a gap
        let mut gap = lines(&text);
        gap.remove(4); // the globex link, the only entry of seq 2
        assert!(matches!(
            verify(&gap.join("\n")),
            Err(ExportError::Broken {
                line: 7,
                source: ChainBreak::Gap { .. },
                ..
            })
        ));
        // a link rewritten: the next event of its chain no longer links to it
        let mut relinked = lines(&text);
        let mut link: Entry = serde_json::from_str(&relinked[4]).unwrap();
        link.link.as_mut().unwrap().hash = "1".repeat(64);
        relinked[4] = serde_json::to_string(&link).unwrap();
        assert!(matches!(
            verify(&relinked.join("\n")),
            Err(ExportError::Broken {
                line: 8,
                source: ChainBreak::Unlinked { .. },
                ..
            })
        ));
        // the trailer rewritten to claim another anchor
        let mut anchored = lines(&text);
        let trailer = anchored.pop().unwrap();
        anchored.push(trailer.replacen(signer_actors::audit::GENESIS_HASH, &"2".repeat(64), 1));
        assert_ne!(anchored.join("\n"), text.trim_end());
        match verify(&anchored.join("\n")) {
            Err(ExportError::Malformed { what, .. }) => assert!(what.contains("trailer"), "{what}"),
            other => panic!("{other:?}"),
        }
        // truncated: no trailer
        let mut truncated = lines(&text);
        truncated.pop();
        match verify(&truncated.join("\n")) {
            Err(ExportError::Malformed { what, .. }) => assert!(what.contains("truncated")),
            other => panic!("{other:?}"),
        }
        // an event replaced by its link is a legitimate omission, but the trailer counts it
        let mut hidden = lines(&text);
        let entry: Entry = serde_json::from_str(&hidden[1]).unwrap();
        let link = Link::of_stored(entry.event.as_ref().unwrap());
        hidden[1] = serde_json::to_string(&Entry {
            event: None,
            link: Some(link),
            ..entry
        })
        .unwrap();
        assert!(matches!(
            verify(&hidden.join("\n")),
            Err(ExportError::Malformed { .. })
        ));
    }
}
