//! Digest sets (`{"sha256": "<hex>"}`) as in-toto and the contract use them.

use std::collections::BTreeMap;

/// Algorithm name -> lowercase hex digest. BTreeMap keeps output order stable.
pub type DigestSet = BTreeMap<String, String>;

/// Hex length each accepted algorithm must have. Anything else is refused: a signer
/// should not vouch for a digest it cannot even recognise.
fn expected_hex_len(algorithm: &str) -> Option<usize> {
    match algorithm {
        "sha256" => Some(64),
        "sha384" => Some(96),
        "sha512" => Some(128),
        "sha1" | "gitCommit" => Some(40),
        _ => None,
    }
}

/// Checks one digest value: known algorithm, lowercase hex of the right length.
pub fn validate_digest(algorithm: &str, value: &str) -> Result<(), String> {
    let len = expected_hex_len(algorithm).ok_or_else(|| {
        format!(
            "unsupported digest algorithm {}",
            crate::echo::echo(algorithm)
        )
    })?;
    if value.len() != len
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(format!(
            "{algorithm} digest must be {len} lowercase hex characters"
        ));
    }
    Ok(())
}

/// Checks a whole digest set: not empty, every entry valid.
pub fn validate_set(set: &DigestSet) -> Result<(), String> {
    if set.is_empty() {
        return Err("digest set is empty".into());
    }
    set.iter()
        .try_for_each(|(alg, value)| validate_digest(alg, value))
}

/// Parses an OCI digest `sha256:<64 hex>` and returns the hex part.
pub fn parse_oci_sha256(digest: &str) -> Result<&str, String> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        format!(
            "image digest {} must start with sha256:",
            crate::echo::echo(digest)
        )
    })?;
    validate_digest("sha256", hex)?;
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_known_algorithms_with_right_length() {
        assert!(validate_digest("sha256", &"a".repeat(64)).is_ok());
        assert!(validate_digest("sha512", &"0".repeat(128)).is_ok());
        assert!(validate_digest("sha256", &"a".repeat(63)).is_err());
        assert!(validate_digest("sha256", &"A".repeat(64)).is_err());
        assert!(validate_digest("md5", &"a".repeat(32)).is_err());
        assert!(validate_set(&DigestSet::new()).is_err());
        assert_eq!(
            parse_oci_sha256(&format!("sha256:{}", "b".repeat(64))).unwrap(),
            "b".repeat(64)
        );
        assert!(parse_oci_sha256("sha512:abc").is_err());
    }
}
