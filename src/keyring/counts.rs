//! What a ready key counts before it reaches shared memory.
//!
//! Per-row events (backend cache hits, decrypts, encrypts) are counted in the
//! backend first and added to shared memory every 1024 uses of a key, at a
//! transaction's end once a second, when the key leaves the cache, when the
//! session reads the metrics and when it exits, so the per-row path (and a short
//! transaction's commit) never writes shared memory.

use std::cell::Cell;

use byok_core::config::ProviderKind;
use byok_core::counters::{Counter, MetricSlot};
use byok_core::monitors::Rules;

use crate::postgres::session;
use crate::shmem;

/// Publishes a tenant's monitoring rules for the key broker's evaluation, and
/// this database's name for the Prometheus labels. Called before each key is
/// fetched (not per row), so the rules are in place even when the fetch
/// fails; both are no-ops when already published.
pub fn publish_monitoring(provider: ProviderKind, tenant: &str, rules: &Rules) {
    let Some(shared) = shmem::shared() else {
        return;
    };
    shared
        .databases
        .set_name(session::database(), &session::database_name());
    if let Some(slot) = shared.metrics.slot(session::database(), provider, tenant) {
        slot.set_rules(rules);
    }
}

/// Counts of one ready key not yet added to shared memory.
pub struct PendingCounts {
    slot: Option<&'static MetricSlot>,
    dek_id: u64,
    /// The key's slot in the encryption counters (`KeyUsage`), as last found.
    usage_slot: Cell<Option<usize>>,
    l1_hits: Cell<u32>,
    decrypts: Cell<u32>,
    encrypts: Cell<u32>,
}

const FLUSH_EVERY: u32 = 1024;

impl PendingCounts {
    /// Counters for (this database, provider, tenant) and data key `dek_id`.
    pub fn new(provider: ProviderKind, tenant: &str, dek_id: u64) -> Self {
        let slot = shmem::shared()
            .and_then(|shared| shared.metrics.slot(session::database(), provider, tenant));
        PendingCounts {
            slot,
            dek_id,
            usage_slot: Cell::new(None),
            l1_hits: Cell::new(0),
            decrypts: Cell::new(0),
            encrypts: Cell::new(0),
        }
    }

    #[inline]
    pub fn hit(&self, decrypt: bool) {
        let hits = self.l1_hits.get() + 1;
        self.l1_hits.set(hits);
        let counter = if decrypt {
            &self.decrypts
        } else {
            &self.encrypts
        };
        counter.set(counter.get() + 1);
        if hits >= FLUSH_EVERY {
            self.flush();
        }
    }

    /// Adds what is pending to shared memory: the monitoring counters, and
    /// the key's encryption count (its nonce budget, persisted by the catalog
    /// writer).
    pub fn flush(&self) {
        let Some(shared) = shmem::shared() else {
            return;
        };
        let encrypts = self.encrypts.get();
        if encrypts > 0 {
            let slot = shared.key_usage.add(
                session::database(),
                self.dek_id,
                u64::from(encrypts),
                self.usage_slot.get(),
            );
            self.usage_slot.set(slot);
        }
        let Some(m) = self.slot else {
            self.encrypts.set(0);
            return;
        };
        for (cell, counter) in [
            (&self.l1_hits, Counter::L1Hits),
            (&self.decrypts, Counter::Decrypts),
            (&self.encrypts, Counter::Encrypts),
        ] {
            let n = cell.replace(0);
            if n > 0 {
                m.add(counter, u64::from(n));
            }
        }
    }

    /// Events counted at once (cache misses, failures: never per-row in steady state).
    pub fn miss(&self, decrypt: bool) {
        if let Some(m) = self.slot {
            m.add(Counter::L1Misses, 1);
        }
        // The use itself is counted with the others (and reaches the key's
        // encryption count with them).
        let counter = if decrypt {
            &self.decrypts
        } else {
            &self.encrypts
        };
        counter.set(counter.get() + 1);
    }

    pub fn decrypt_failed(&self) {
        if let Some(m) = self.slot {
            m.add(Counter::DecryptFailures, 1);
        }
    }
}

/// A key leaving the cache (expiry, eviction, invalidation) publishes what it counted.
impl Drop for PendingCounts {
    fn drop(&mut self) {
        self.flush();
    }
}
