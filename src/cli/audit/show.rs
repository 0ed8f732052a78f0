//! `stella-signer audit show`: the events matching a filter, as a table or JSON lines.
//!
//! The server filters by subject (tenant, decision) and start time (`--since`), so a query
//! reads only the matching messages, however long the stream; `--request-id` is checked
//! here, on the events the server sent.

use std::io::Write as _;

use super::{CliError, Filter, NatsArgs, read};

pub async fn show(
    nats: NatsArgs,
    filter: Filter,
    request_id: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let audit = nats.nats_config()?.subject("signer.audit");
    let mut out = std::io::stdout().lock();
    let write_err = |e: std::io::Error| CliError::Unusable(format!("stdout: {e}"));
    if !json {
        writeln!(
            out,
            "{}",
            row([
                "SEQ",
                "TIME",
                "TENANT",
                "DECISION",
                "KIND",
                "REQUEST ID",
                "ERROR",
                "WRITER"
            ])
        )
        .map_err(write_err)?;
    }
    let (mut shown, mut messages) = (0u64, 0u64);
    read(&nats, filter.subject(&audit), filter.since, |m| {
        messages += 1;
        for event in m.events.iter().filter(|e| {
            filter.admits(e)
                && request_id
                    .as_deref()
                    .is_none_or(|r| e.get("requestId").and_then(|v| v.as_str()) == Some(r))
        }) {
            shown += 1;
            if json {
                writeln!(out, "{event}").map_err(write_err)?;
            } else {
                let text = |k: &str| event.get(k).and_then(|v| v.as_str()).unwrap_or("-");
                let writer = format!(
                    "{}#{}",
                    text("worker"),
                    event.get("writerSeq").and_then(|v| v.as_u64()).unwrap_or(0)
                );
                let seq = m.seq.to_string();
                writeln!(
                    out,
                    "{}",
                    row([
                        &seq,
                        text("time"),
                        text("tenant"),
                        text("decision"),
                        text("kind"),
                        text("requestId"),
                        text("errorCode"),
                        &writer,
                    ])
                )
                .map_err(write_err)?;
            }
        }
        Ok(true)
    })
    .await?;
    out.flush().map_err(write_err)?;
    eprintln!("{shown} event(s) from {messages} message(s) read");
    Ok(())
}

/// One table row: columns padded to fixed widths (the last one not).
fn row(cells: [&str; 8]) -> String {
    const WIDTHS: [usize; 7] = [8, 30, 16, 9, 8, 28, 24];
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        match WIDTHS.get(i) {
            Some(w) => line.push_str(&format!("{cell:<w$} ")),
            None => line.push_str(cell),
        }
    }
    line
}
