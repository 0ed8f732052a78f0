//! Verdicts reused for `cache_ttl`, so that a busy signer asks the registry once per
//! scanner release rather than once per job, and keeps signing through a short registry
//! outage for releases it has already checked.
//!
//! Only definite verdicts are kept (trusted, or untrusted with its reason); "the registry
//! could not be asked" is never cached, so the next job asks again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A definite answer about one `repository@digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    Untrusted(String),
}

/// Bounds memory: repositories come from requests, so the key space is caller-chosen.
const MAX_ENTRIES: usize = 4096;

#[derive(Debug)]
pub struct VerdictCache {
    ttl: Duration,
    entries: Mutex<HashMap<(String, String), (Instant, Verdict)>>,
}

impl VerdictCache {
    pub fn new(ttl: Duration) -> Self {
        VerdictCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A lock whose holder panicked still guards a consistent map (every update is a
    /// single insert or remove), so poisoning is ignored.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, Verdict)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The unexpired verdict for `repository@digest`, if any.
    pub fn get(&self, repository: &str, digest: &str) -> Option<Verdict> {
        let key = (repository.to_string(), digest.to_string());
        let mut entries = self.lock();
        match entries.get(&key) {
            Some((expires, verdict)) if Instant::now() < *expires => Some(verdict.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers a verdict for `ttl` (a zero TTL keeps nothing).
    pub fn put(&self, repository: &str, digest: &str, verdict: Verdict) {
        let now = Instant::now();
        if self.ttl.is_zero() {
            return;
        }
        let Some(expires) = now.checked_add(self.ttl) else {
            return;
        };
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (e, _)| now < *e);
        }
        if entries.len() >= MAX_ENTRIES {
            // Still full of live entries: drop the one closest to expiry.
            let oldest = entries
                .iter()
                .min_by_key(|(_, (e, _))| *e)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                entries.remove(&k);
            }
        }
        entries.insert(
            (repository.to_string(), digest.to_string()),
            (expires, verdict),
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_expire_after_ttl() {
        let cache = VerdictCache::new(Duration::from_millis(50));
        cache.put("r.example/s", "sha256:a", Verdict::Trusted);
        cache.put("r.example/s", "sha256:b", Verdict::Untrusted("no".into()));
        assert_eq!(cache.get("r.example/s", "sha256:a"), Some(Verdict::Trusted));
        assert_eq!(
            cache.get("r.example/s", "sha256:b"),
            Some(Verdict::Untrusted("no".into()))
        );
        // Keyed by repository too: the same digest elsewhere was not checked.
        assert_eq!(cache.get("r.example/t", "sha256:a"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("r.example/s", "sha256:a"), None);
    }

    #[test]
    fn zero_ttl_keeps_nothing_and_size_is_bounded() {
        let cache = VerdictCache::new(Duration::ZERO);
        cache.put("r.example/s", "sha256:a", Verdict::Trusted);
        assert_eq!(cache.get("r.example/s", "sha256:a"), None);

        let cache = VerdictCache::new(Duration::from_secs(60));
        for i in 0..MAX_ENTRIES + 10 {
            cache.put("r.example/s", &format!("sha256:{i}"), Verdict::Trusted);
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        let last = format!("sha256:{}", MAX_ENTRIES + 9);
        assert_eq!(cache.get("r.example/s", &last), Some(Verdict::Trusted));
    }
}
