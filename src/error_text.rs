//! Error messages an operator can act on.

/// The error with its causes: reqwest's own message ("error sending request") leaves out
/// what an operator needs ("Connection refused", a TLS failure).
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}
