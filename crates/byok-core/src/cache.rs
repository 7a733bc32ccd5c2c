//! A data-key cache with a time-to-live per entry, a maximum number of entries
//! per tenant (the guide's `cache_config`), and a global bound. Entries leave by
//! expiry, by least-recent use, or by invalidation; dropping an entry drops its
//! value, and cached ciphers zeroize their key schedule on drop.
//!
//! A hit is one hash lookup and one clock comparison: no allocation.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Tick;

/// Limits that come from a tenant's `cache_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub ttl: Duration,
    pub max_entries: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            ttl: Duration::from_secs(crate::config::DEFAULT_CACHE_TTL_SECONDS as u64),
            max_entries: crate::config::DEFAULT_CACHE_MAX_ENTRIES as usize,
        }
    }
}

/// Counters for monitoring (`key_cache_hit_ratio` and friends).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub expirations: u64,
    pub evictions: u64,
    pub invalidations: u64,
}

/// Hasher for the cache's integer key ids. They are assigned by a sequence, not
/// chosen by users, so SipHash's flooding resistance buys nothing here and costs
/// a noticeable share of a per-row lookup; one multiply spreads them well.
#[derive(Default)]
pub struct KeyIdHasher(u64);

impl Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type KeyIdMap<V> = HashMap<u64, V, BuildHasherDefault<KeyIdHasher>>;

struct Entry<V> {
    value: V,
    tenant: Arc<str>,
    expires_at: Tick,
    last_used: u64,
}

/// Keyed by data-key id (`u64`, the backend's cache) or by any hashable key
/// (the broker's cache, keyed by database and key).
pub struct KeyCache<V, K = u64, S = BuildHasherDefault<KeyIdHasher>> {
    entries: HashMap<K, Entry<V>, S>,
    capacity: usize,
    tick: u64,
    stats: CacheStats,
}

impl<V, K: Hash + Eq + Clone, S: BuildHasher + Default> KeyCache<V, K, S> {
    /// `capacity` bounds the whole cache, whatever the tenants' own limits say.
    pub fn new(capacity: usize) -> Self {
        KeyCache {
            entries: HashMap::default(),
            capacity: capacity.max(1),
            tick: 0,
            stats: CacheStats::default(),
        }
    }

    /// The live entry for `key`, if any; an expired entry is dropped here.
    pub fn get(&mut self, key: &K, now: Tick) -> Option<&V> {
        let expired = match self.entries.get(key) {
            None => {
                self.stats.misses += 1;
                return None;
            }
            Some(entry) => entry.expires_at <= now,
        };
        if expired {
            self.entries.remove(key);
            self.stats.expirations += 1;
            self.stats.misses += 1;
            return None;
        }
        self.tick += 1;
        self.stats.hits += 1;
        let entry = self.entries.get_mut(key).expect("present above");
        entry.last_used = self.tick;
        Some(&entry.value)
    }

    /// Caches `value` for `key` under `tenant`'s limits, evicting the least recently
    /// used entry of that tenant (or of the whole cache) when full.
    pub fn insert(&mut self, key: K, tenant: &str, value: V, limits: CacheLimits, now: Tick) {
        self.entries.remove(&key);
        self.drop_expired(now);
        let tenant_limit = limits.max_entries.max(1);
        while self.count_for(tenant) >= tenant_limit {
            self.evict_lru(Some(tenant));
        }
        while self.entries.len() >= self.capacity {
            self.evict_lru(None);
        }
        let tenant: Arc<str> = self
            .entries
            .values()
            .find(|e| &*e.tenant == tenant)
            .map(|e| e.tenant.clone())
            .unwrap_or_else(|| tenant.into());
        self.tick += 1;
        self.entries.insert(
            key,
            Entry {
                value,
                tenant,
                expires_at: now + limits.ttl,
                last_used: self.tick,
            },
        );
    }

    pub fn remove(&mut self, key: &K) -> bool {
        let removed = self.entries.remove(key).is_some();
        if removed {
            self.stats.invalidations += 1;
        }
        removed
    }

    /// Drops every entry of `tenant`; returns how many.
    pub fn remove_tenant(&mut self, tenant: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| &*e.tenant != tenant);
        let removed = before - self.entries.len();
        self.stats.invalidations += removed as u64;
        removed
    }

    /// Drops every entry for which `doomed(key, tenant)` holds; returns how many.
    pub fn remove_where(&mut self, doomed: impl Fn(&K, &str) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|k, e| !doomed(k, &e.tenant));
        let removed = before - self.entries.len();
        self.stats.invalidations += removed as u64;
        removed
    }

    /// Drops everything; returns how many entries there were.
    pub fn clear(&mut self) -> usize {
        let removed = self.entries.len();
        self.entries.clear();
        self.stats.invalidations += removed as u64;
        removed
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every cached value, live or not yet dropped after expiring.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.values().map(|e| &e.value)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.entries.len() > self.capacity {
            self.evict_lru(None);
        }
    }

    fn count_for(&self, tenant: &str) -> usize {
        self.entries
            .values()
            .filter(|e| &*e.tenant == tenant)
            .count()
    }

    fn drop_expired(&mut self, now: Tick) {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.expires_at > now);
        self.stats.expirations += (before - self.entries.len()) as u64;
    }

    fn evict_lru(&mut self, tenant: Option<&str>) {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| tenant.is_none_or(|t| &*e.tenant == t))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        if let Some(key) = victim {
            self.entries.remove(&key);
            self.stats.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits(ttl_secs: u64, max: usize) -> CacheLimits {
        CacheLimits {
            ttl: Duration::from_secs(ttl_secs),
            max_entries: max,
        }
    }

    #[test]
    fn hit_then_expiry() {
        let mut cache: KeyCache<_> = KeyCache::new(100);
        let t0 = Tick::now();
        cache.insert(1, "a", "k1", limits(10, 10), t0);
        assert_eq!(cache.get(&1, t0 + Duration::from_secs(9)), Some(&"k1"));
        assert_eq!(cache.get(&1, t0 + Duration::from_secs(10)), None);
        assert_eq!(cache.len(), 0);
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.expirations), (1, 1, 1));
    }

    #[test]
    fn per_tenant_limit_evicts_that_tenants_lru_only() {
        let mut cache: KeyCache<_> = KeyCache::new(100);
        let t0 = Tick::now();
        cache.insert(100, "b", "b100", limits(60, 10), t0);
        cache.insert(1, "a", "a1", limits(60, 2), t0);
        cache.insert(2, "a", "a2", limits(60, 2), t0);
        assert!(cache.get(&1, t0).is_some()); // 1 is now more recent than 2
        cache.insert(3, "a", "a3", limits(60, 2), t0);
        assert!(cache.get(&2, t0).is_none(), "tenant a's LRU entry went");
        assert!(cache.get(&1, t0).is_some());
        assert!(cache.get(&3, t0).is_some());
        assert!(cache.get(&100, t0).is_some(), "tenant b untouched");
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn global_capacity_bounds_all_tenants() {
        let mut cache: KeyCache<_> = KeyCache::new(3);
        let t0 = Tick::now();
        for k in 0..10u64 {
            cache.insert(k, &format!("t{k}"), k, limits(60, 1000), t0);
            assert!(cache.len() <= 3);
        }
        assert!(cache.get(&9, t0).is_some());
        assert!(cache.get(&0, t0).is_none());
    }

    #[test]
    fn invalidation() {
        let mut cache: KeyCache<_> = KeyCache::new(10);
        let t0 = Tick::now();
        cache.insert(1, "a", 1, limits(60, 10), t0);
        cache.insert(2, "a", 2, limits(60, 10), t0);
        cache.insert(3, "b", 3, limits(60, 10), t0);
        assert_eq!(cache.remove_tenant("a"), 2);
        assert!(cache.remove(&3));
        assert!(!cache.remove(&3));
        assert!(cache.is_empty());
    }

    struct DropCounter<'a>(&'a AtomicUsize);
    impl Drop for DropCounter<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn evicted_and_expired_values_are_dropped() {
        let drops = AtomicUsize::new(0);
        let mut cache: KeyCache<_> = KeyCache::new(1);
        let t0 = Tick::now();
        cache.insert(1, "a", DropCounter(&drops), limits(1, 10), t0);
        cache.insert(2, "a", DropCounter(&drops), limits(1, 10), t0);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert!(cache.get(&2, t0 + Duration::from_secs(5)).is_none());
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }
}
