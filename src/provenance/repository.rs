//! The `scanner.repository` of a request: `host[:port]/path`, checked before anything is
//! fetched. It comes from the job publisher, so it is untrusted input: it decides which
//! server the signer talks to.

/// Why a repository string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepositoryError {
    /// `stella-ops/scanner` would silently mean Docker Hub to a Docker client; the signer
    /// never guesses a registry, so the request must name one.
    #[error("repository must name a registry host")]
    NoHost,
    #[error(
        "repository {} is not a valid OCI repository name: {reason}",
        signer_actors::echo::echo(repository)
    )]
    Invalid { repository: String, reason: String },
}

/// A repository split into the registry (`host[:port]`) and the path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository<'a> {
    pub registry: &'a str,
    pub path: &'a str,
}

/// The distribution spec's limit on a repository name (host included, as registries count it).
const MAX_LEN: usize = 255;

/// Splits and checks `host[:port]/path`.
///
/// Follows the Docker reference grammar: the first component is a registry host when it
/// contains `.` or `:`, is `localhost`, or is a bracketed IPv6 address; path components are
/// lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`. A tag or digest suffix
/// is refused: the digest travels separately and is the only thing that is verified.
pub fn parse(repository: &str) -> Result<Repository<'_>, RepositoryError> {
    let invalid = |reason: &str| RepositoryError::Invalid {
        repository: repository.chars().take(300).collect(),
        reason: reason.to_string(),
    };
    let Some((registry, path)) = repository.split_once('/') else {
        return Err(RepositoryError::NoHost);
    };
    let looks_like_host = registry.contains('.')
        || registry.contains(':')
        || registry == "localhost"
        || registry.starts_with('[');
    if !looks_like_host {
        return Err(RepositoryError::NoHost);
    }
    if repository.len() > MAX_LEN {
        return Err(invalid("longer than 255 characters"));
    }
    check_registry(registry).map_err(|r| invalid(&r))?;
    if path.is_empty() {
        return Err(invalid("no path after the registry host"));
    }
    for component in path.split('/') {
        check_path_component(component).map_err(|r| invalid(&r))?;
    }
    Ok(Repository { registry, path })
}

pub(super) fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| "unterminated IPv6 address".to_string())?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err("bad IPv6 address".into());
        }
        match after {
            "" => (None, None),
            p => (
                None,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| "junk after the IPv6 address".to_string())?,
                ),
            ),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(port) = port
        && (!port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err())
    {
        return Err("bad port".into());
    }
    if let Some(host) = host {
        if host.is_empty() {
            return Err("empty registry host".into());
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!(
                    "bad registry host {}",
                    signer_actors::echo::echo(host)
                ));
            }
        }
    }
    Ok(())
}

fn check_path_component(component: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "bad path component {} (lowercase letters, digits and . _ __ - separators)",
            signer_actors::echo::echo(component)
        ))
    };
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return bad();
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or one or more `-`, always followed by an alphanumeric
        // (the last byte is alphanumeric, so the run ends inside the component).
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += if bytes.get(i + 1) == Some(&b'_') {
                    2
                } else {
                    1
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return bad(),
        }
        if i == start || !bytes.get(i).copied().is_some_and(alnum) {
            return bad();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_registry_qualified_names() {
        for (repo, registry, path) in [
            (
                "127.0.0.1:5000/stella-ops/scanner",
                "127.0.0.1:5000",
                "stella-ops/scanner",
            ),
            ("registry.example/scanner", "registry.example", "scanner"),
            (
                "localhost/a/b_c/d__e/f--g.h",
                "localhost",
                "a/b_c/d__e/f--g.h",
            ),
            ("[::1]:5000/x", "[::1]:5000", "x"),
            (
                "ghcr.io/stella-ops/scanner",
                "ghcr.io",
                "stella-ops/scanner",
            ),
        ] {
            assert_eq!(
                parse(repo).unwrap(),
                Repository { registry, path },
                "{repo}"
            );
        }
    }

    #[test]
    fn refuses_names_without_a_host() {
        for repo in ["stella-ops/scanner", "scanner", "", "library/ubuntu"] {
            assert_eq!(parse(repo), Err(RepositoryError::NoHost), "{repo}");
        }
    }

    #[test]
    fn refuses_malformed_names() {
        for repo in [
            "registry.example/",
            "registry.example/Scanner",
            "registry.example/scanner:latest",
            "registry.example/scanner@sha256:00",
            "registry.example/a//b",
            "registry.example/-a",
            "registry.example/a-",
            "registry.example/a___b",
            "registry.example/a..b",
            "registry.example:/a",
            "registry.example:99999/a",
            "registry.example:5x/a",
            "-bad.example/a",
            "bad_host.example/a",
            "[::1/a",
            "user@host.example/a",
            "host.example/a b",
        ] {
            assert!(
                matches!(parse(repo), Err(RepositoryError::Invalid { .. })),
                "{repo}: {:?}",
                parse(repo)
            );
        }
        let long = format!("registry.example/{}", "a".repeat(300));
        assert!(matches!(parse(&long), Err(RepositoryError::Invalid { .. })));
    }
}
