//! A bounded map whose entries expire.
//!
//! Verified tokens, licences and introspection verdicts are cached so that one token reused
//! across thousands of jobs costs one signature check (or one licensing call). The bound keeps
//! a flood of distinct valid tokens from growing memory without limit: when full, expired
//! entries go first, then the ones closest to expiry (the least useful to keep).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

/// Entries keyed by `K`, each with an expiry of type `E` (unix seconds or an `Instant`).
pub(crate) struct TtlCache<K, V, E> {
    inner: Mutex<Inner<K, V, E>>,
    capacity: usize,
}

struct Inner<K, V, E> {
    map: HashMap<K, (V, E)>,
    /// The same entries ordered by expiry, to find expired and soonest-expiring ones cheaply.
    order: BTreeSet<(E, K)>,
}

impl<K, V, E> TtlCache<K, V, E>
where
    K: Hash + Eq + Ord + Clone,
    V: Clone,
    E: Ord + Copy,
{
    /// A cache holding at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        TtlCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeSet::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V, E>> {
        // A panic while holding the lock cannot leave the two indexes inconsistent in a way
        // that matters for a cache (at worst an entry lingers until evicted), so keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `key` if it has not expired at `now` (an expired one is dropped).
    pub(crate) fn get(&self, key: &K, now: E) -> Option<V> {
        let mut inner = self.lock();
        let expires = inner.map.get(key)?.1;
        if expires <= now {
            inner.remove(key);
            return None;
        }
        inner.map.get(key).map(|(v, _)| v.clone())
    }

    /// Stores `value` until `expires`, evicting to stay within the bound.
    pub(crate) fn insert(&self, key: K, value: V, expires: E, now: E) {
        let mut inner = self.lock();
        inner.remove(&key);
        if inner.map.len() >= self.capacity {
            while let Some((e, k)) = inner.order.first().cloned() {
                if e > now {
                    break;
                }
                inner.remove(&k);
            }
        }
        while inner.map.len() >= self.capacity {
            let Some((_, k)) = inner.order.first().cloned() else {
                break;
            };
            inner.remove(&k);
        }
        inner.order.insert((expires, key.clone()));
        inner.map.insert(key, (value, expires));
    }

    /// Forgets `key`.
    pub(crate) fn remove(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Number of entries, expired or not.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl<K, V, E> Inner<K, V, E>
where
    K: Hash + Eq + Ord + Clone,
    E: Ord + Copy,
{
    fn remove(&mut self, key: &K) {
        if let Some((_, e)) = self.map.remove(key) {
            self.order.remove(&(e, key.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_bound_evicts_expired_then_soonest() {
        let c: TtlCache<u32, &str, u64> = TtlCache::new(3);
        c.insert(1, "a", 10, 0);
        c.insert(2, "b", 20, 0);
        c.insert(3, "c", 30, 0);
        assert_eq!(c.get(&1, 5), Some("a"));
        assert_eq!(c.get(&1, 10), None, "expired at its expiry");
        assert_eq!(c.len(), 2);
        c.insert(1, "a", 10, 0);
        // Full at now=15: entry 1 has expired and goes first.
        c.insert(4, "d", 40, 15);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&2, 15), Some("b"));
        // Full, nothing expired: the soonest to expire (2) goes.
        c.insert(5, "e", 50, 15);
        assert_eq!(c.get(&2, 15), None);
        assert_eq!(c.get(&3, 15), Some("c"));
        assert_eq!(c.get(&5, 15), Some("e"));
        // Re-inserting a key replaces it without growing.
        c.insert(5, "E", 60, 15);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&5, 55), Some("E"));
        c.remove(&5);
        assert_eq!(c.get(&5, 15), None);
    }
}
