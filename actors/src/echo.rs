//! Bounded echoes of untrusted text.
//!
//! A refusal message, a log line or an audit event often names the value that was wrong
//! (`apiVersion "v2" is not ...`). That value comes from the request, so it can be anything
//! a publisher sends: 600 KB of quotes, 200 KB of control bytes. Echoed as it is (and escaped
//! twice, once by `{:?}` and once by JSON) it makes the result larger than the broker accepts
//! and the job never ends. Every such value goes through [`echo`] first: at most
//! [`ECHO_MAX_BYTES`] of output, cut on a character boundary, control characters escaped once
//! (`\u{1b}`), and a marker saying how much was left out. [`bound_message`] is the final
//! bound applied to a whole message built from pieces, whatever its pieces did.

use std::fmt::Write as _;

/// Longest echo of one untrusted value, in bytes of output (before the marker).
pub const ECHO_MAX_BYTES: usize = 200;

/// Longest message a refusal (`error.message`) or a log line of one is allowed, in bytes
/// of output (before the marker). A few echoes plus the sentence around them.
pub const MESSAGE_MAX_BYTES: usize = 1024;

/// Longest the truncation marker can be: `…[+18446744073709551615 bytes]`.
pub const MARKER_MAX_BYTES: usize = 32;

/// `value` quoted, bounded to [`ECHO_MAX_BYTES`] and with control characters escaped once.
/// Quotes and backslashes are kept as they are: the encoder of the message (JSON, CBOR, a
/// log formatter) escapes them itself, once.
pub fn echo(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(ECHO_MAX_BYTES) + 2);
    out.push('"');
    push_bounded(&mut out, value, ECHO_MAX_BYTES);
    out.push('"');
    out
}

/// [`echo`] of a value that may be absent (`none` then).
pub fn echo_opt(value: Option<&str>) -> String {
    value.map_or_else(|| "none".to_owned(), echo)
}

/// `value` bounded to [`ECHO_MAX_BYTES`] with control characters escaped once, unquoted: for
/// a record member (an audit event's `caller.sub`) rather than a sentence. Unchanged when
/// already within the bound and free of control characters.
pub fn clip(value: &str) -> String {
    if value.len() <= ECHO_MAX_BYTES && !value.chars().any(char::is_control) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(ECHO_MAX_BYTES + MARKER_MAX_BYTES);
    push_bounded(&mut out, value, ECHO_MAX_BYTES);
    out
}

/// `message` bounded to [`MESSAGE_MAX_BYTES`] with control characters escaped once; a
/// message already within the bound and without control characters is returned unchanged.
pub fn bound_message(message: &str) -> String {
    if message.len() <= MESSAGE_MAX_BYTES && !message.chars().any(char::is_control) {
        return message.to_owned();
    }
    let mut out = String::with_capacity(MESSAGE_MAX_BYTES + MARKER_MAX_BYTES);
    push_bounded(&mut out, message, MESSAGE_MAX_BYTES);
    out
}

/// Appends `value` to `out`, escaping control characters, until `max` bytes of output; the
/// rest is replaced by a marker with the number of input bytes left out.
fn push_bounded(out: &mut String, value: &str, max: usize) {
    let start = out.len();
    for (at, c) in value.char_indices() {
        let before = out.len();
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
        if out.len() - start > max {
            out.truncate(before);
            let _ = write!(out, "…[+{} bytes]", value.len() - at);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_once_and_kept() {
        assert_eq!(echo("v2"), "\"v2\"");
        assert_eq!(echo(r#"a"b\c"#), r#""a"b\c""#, "no second escaping");
        assert_eq!(echo("a\u{1b}[31m\n"), "\"a\\u{1b}[31m\\u{a}\"");
        assert_eq!(bound_message("plain"), "plain");
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary_with_a_marker() {
        let quotes = "\"".repeat(600_000);
        let e = echo(&quotes);
        assert!(
            e.len() <= ECHO_MAX_BYTES + MARKER_MAX_BYTES + 2,
            "{}",
            e.len()
        );
        assert!(e.ends_with(&format!("…[+{} bytes]\"", 600_000 - ECHO_MAX_BYTES)));
        // multi-byte characters: never split
        let wide = "é€😀".repeat(10_000);
        let e = echo(&wide);
        assert!(e.len() <= ECHO_MAX_BYTES + MARKER_MAX_BYTES + 2);
        assert!(e.contains("…[+"));
        // control bytes count as their escaped form
        let ctl = "\u{1}".repeat(200_000);
        let e = echo(&ctl);
        assert!(
            e.len() <= ECHO_MAX_BYTES + MARKER_MAX_BYTES + 2,
            "{}",
            e.len()
        );
        assert!(e.starts_with("\"\\u{1}\\u{1}"));
        let m = bound_message(&format!("x {} y", "\u{7f}".repeat(1 << 20)));
        assert!(
            m.len() <= MESSAGE_MAX_BYTES + MARKER_MAX_BYTES,
            "{}",
            m.len()
        );
        assert!(!m.chars().any(char::is_control));
    }
}
