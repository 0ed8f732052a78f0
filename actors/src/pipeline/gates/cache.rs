//! A bounded map whose entries expire, owned by one gate actor (so no lock).
//!
//! The bound keeps a flood of distinct keys (tokens, licences, licensing values, scanner
//! images: all chosen by callers) from growing memory without limit: when full, expired entries
//! go first, then the ones closest to expiry (the least useful to keep).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// Entries keyed by `K`, each with an expiry of type `E` (unix seconds or an `Instant`).
pub(crate) struct TtlCache<K, V, E> {
    map: HashMap<K, (V, E)>,
    /// The same entries ordered by expiry, to find expired and soonest-expiring ones cheaply.
    order: BTreeSet<(E, K)>,
    capacity: usize,
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
            map: HashMap::new(),
            order: BTreeSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// The entry for `key` if it has not expired at `now` (an expired one is dropped).
    pub(crate) fn get(&mut self, key: &K, now: E) -> Option<V> {
        let expires = self.map.get(key)?.1;
        if expires <= now {
            self.remove(key);
            return None;
        }
        self.map.get(key).map(|(v, _)| v.clone())
    }

    /// Stores `value` until `expires`, evicting to stay within the bound.
    pub(crate) fn insert(&mut self, key: K, value: V, expires: E, now: E) {
        self.remove(&key);
        if self.map.len() >= self.capacity {
            while let Some((e, k)) = self.order.first().cloned() {
                if e > now {
                    break;
                }
                self.remove(&k);
            }
        }
        while self.map.len() >= self.capacity {
            let Some((_, k)) = self.order.first().cloned() else {
                break;
            };
            self.remove(&k);
        }
        self.order.insert((expires, key.clone()));
        self.map.insert(key, (value, expires));
    }

    /// Forgets `key`.
    pub(crate) fn remove(&mut self, key: &K) {
        if let Some((_, e)) = self.map.remove(key) {
            self.order.remove(&(e, key.clone()));
        }
    }

    /// Number of entries, expired or not.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_bound_evicts_expired_then_soonest() {
        let mut c: TtlCache<u32, &str, u64> = TtlCache::new(3);
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
