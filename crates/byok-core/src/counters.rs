//! The monitoring counters behind `byok.metrics`: one slot of relaxed atomic
//! counters per (database, provider, tenant), claimed on first use. They live
//! in PostgreSQL shared memory in the extension; all-zero is an empty table.

use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::config::ProviderKind;
use crate::histogram::BUCKETS;

/// Longest tenant id kept in a label (longer ones are cut).
pub const TENANT_LEN: usize = 128;

const EMPTY: u32 = 0;
const CLAIMING: u32 = 1;
const READY: u32 = 2;

/// A counter of a [`MetricSlot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    KmsCalls,
    KmsFailures,
    DekGenerations,
    L1Hits,
    L1Misses,
    L2Hits,
    L2Misses,
    ServedStale,
    ServedByReplica,
    Decrypts,
    DecryptFailures,
    Encrypts,
    /// Revocation checks of the master key made through this tenant's keys.
    KeyChecks,
}

const COUNTERS: usize = 13;

/// What the key broker's revocation checks last found about a tenant's master
/// key. Times are microseconds since the Unix epoch (0: never).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyHealthRecord {
    /// 0 unchecked, 1 ok, 2 revoked, 3 unreachable.
    pub status: u32,
    /// The key manager's reason: an error kind code set by the broker (0: none).
    pub reason: u32,
    /// The last check.
    pub checked_at: i64,
    /// The last check the key manager allowed.
    pub ok_at: i64,
    /// Since when the status has been what it is.
    pub since: i64,
}

/// A [`KeyHealthRecord`] in shared memory: written by the key broker only
/// (field by field; a reader may see one check's status with the previous
/// check's time, which no decision depends on).
#[repr(C)]
struct SharedKeyHealth {
    status: AtomicU32,
    reason: AtomicU32,
    checked_at: AtomicI64,
    ok_at: AtomicI64,
    since: AtomicI64,
}

/// Counters of one (database, provider, tenant).
#[repr(C)]
pub struct MetricSlot {
    state: AtomicU32,
    database: AtomicU32,
    provider: AtomicU32,
    tenant_len: AtomicU32,
    tenant: UnsafeCell<[u8; TENANT_LEN]>,
    counters: [AtomicU64; COUNTERS],
    /// Latency of every key-manager call.
    kms_latency: [AtomicU64; BUCKETS],
    /// Latency of obtaining a data key from the key manager (generate or unwrap).
    dek_latency: [AtomicU64; BUCKETS],
    health: SharedKeyHealth,
}

impl MetricSlot {
    #[inline]
    pub fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn kms_latency(&self, bucket: usize) {
        self.kms_latency[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records what a revocation check found (an `ok_at` of 0 keeps the
    /// time of the last check that was allowed).
    pub fn set_health(&self, record: KeyHealthRecord) {
        let h = &self.health;
        h.reason.store(record.reason, Ordering::Relaxed);
        h.checked_at.store(record.checked_at, Ordering::Relaxed);
        if record.ok_at != 0 {
            h.ok_at.store(record.ok_at, Ordering::Relaxed);
        }
        h.since.store(record.since, Ordering::Relaxed);
        h.status.store(record.status, Ordering::Release);
    }

    fn health(&self) -> KeyHealthRecord {
        let h = &self.health;
        KeyHealthRecord {
            status: h.status.load(Ordering::Acquire),
            reason: h.reason.load(Ordering::Relaxed),
            checked_at: h.checked_at.load(Ordering::Relaxed),
            ok_at: h.ok_at.load(Ordering::Relaxed),
            since: h.since.load(Ordering::Relaxed),
        }
    }

    pub fn dek_latency(&self, bucket: usize) {
        self.dek_latency[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// The slot's tenant label, once the slot is READY (`None` before).
    fn published_tenant(&self) -> Option<&[u8]> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        let len = (self.tenant_len.load(Ordering::Acquire) as usize).min(TENANT_LEN);
        // SAFETY: the label is written only by the party whose swap EMPTY ->
        // CLAIMING succeeded (`MetricTable::slot`), before its Release store of
        // READY, which the Acquire load above has seen; a slot never leaves
        // READY, so the label is never written again and shared reads of it
        // cannot race with a write.
        Some(unsafe { &(&*self.tenant.get())[..len] })
    }

    fn is(&self, database: u32, provider: u32, tenant: &[u8]) -> bool {
        self.published_tenant().is_some_and(|label| {
            self.database.load(Ordering::Relaxed) == database
                && self.provider.load(Ordering::Relaxed) == provider
                && label == tenant
        })
    }
}

/// What `byok.metrics` shows for one (database, provider, tenant).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub counters: [u64; COUNTERS],
    pub kms_latency: [u64; BUCKETS],
    pub dek_latency: [u64; BUCKETS],
    /// The newest revocation check's findings.
    pub health: KeyHealthRecord,
}

impl Totals {
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize]
    }
}

/// `N` metric slots.
#[repr(C)]
pub struct MetricTable<const N: usize> {
    slots: [MetricSlot; N],
}

// SAFETY: every field is an atomic except each slot's tenant label (an
// `UnsafeCell`). A label is written by exactly one party, the one whose swap
// EMPTY -> CLAIMING succeeded, and read only once the slot is READY
// (`MetricSlot::published_tenant`), after which it never changes; so threads,
// or processes sharing the table, never write a label another one reads.
unsafe impl<const N: usize> Sync for MetricTable<N> {}

impl<const N: usize> MetricTable<N> {
    /// A zeroed table on the heap (the extension places it in shared memory).
    pub fn new_boxed() -> Box<Self> {
        // SAFETY: every field is an integer atomic, a byte array in an
        // `UnsafeCell`, or an array of those, and all-zero bytes are a valid
        // value of each (the empty table: every slot EMPTY).
        unsafe { Box::new_zeroed().assume_init() }
    }

    /// The slot of (database, provider, tenant), claimed on first use; `None`
    /// when all are taken (those counters are then not kept).
    pub fn slot(&self, database: u32, provider: ProviderKind, tenant: &str) -> Option<&MetricSlot> {
        let provider = provider as u32;
        let tenant = &tenant.as_bytes()[..tenant.len().min(TENANT_LEN)];
        if let Some(slot) = self.slots.iter().find(|m| m.is(database, provider, tenant)) {
            return Some(slot);
        }
        for m in &self.slots {
            if m.state
                .compare_exchange(EMPTY, CLAIMING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                m.database.store(database, Ordering::Relaxed);
                m.provider.store(provider, Ordering::Relaxed);
                // SAFETY: our swap EMPTY -> CLAIMING succeeded, so no other party
                // writes this label, and none reads it until our Release store of
                // READY below; `tenant.len() <= TENANT_LEN` (cut above).
                unsafe { (&mut *m.tenant.get())[..tenant.len()].copy_from_slice(tenant) };
                m.tenant_len.store(tenant.len() as u32, Ordering::Relaxed);
                m.state.store(READY, Ordering::Release);
                // Two processes may claim a slot for the same labels at once;
                // `totals` adds up slots with equal labels, so that only costs a slot.
                return Some(m);
            }
            if m.is(database, provider, tenant) {
                return Some(m);
            }
        }
        None
    }

    /// Every (database, provider, tenant) with its counters, in label order.
    pub fn totals(&self) -> Vec<(u32, ProviderKind, String, Totals)> {
        let mut rows: BTreeMap<(u32, u32, Vec<u8>), Totals> = BTreeMap::new();
        for m in &self.slots {
            let Some(tenant) = m.published_tenant() else {
                continue;
            };
            let label = (
                m.database.load(Ordering::Relaxed),
                m.provider.load(Ordering::Relaxed),
                tenant.to_vec(),
            );
            let t = rows.entry(label).or_default();
            for (total, counter) in t.counters.iter_mut().zip(&m.counters) {
                *total += counter.load(Ordering::Relaxed);
            }
            for i in 0..BUCKETS {
                t.kms_latency[i] += m.kms_latency[i].load(Ordering::Relaxed);
                t.dek_latency[i] += m.dek_latency[i].load(Ordering::Relaxed);
            }
            let health = m.health();
            if health.checked_at > t.health.checked_at {
                t.health = health;
            }
        }
        rows.into_iter()
            .filter_map(|((database, provider, tenant), t)| {
                // `slot` stores only `ProviderKind as u32`, so every row maps
                // back and none is dropped here; the `?` only keeps a number
                // that is not a provider (which nothing writes) from being
                // reported as some other provider.
                let provider = *ProviderKind::ALL.get(provider as usize)?;
                Some((
                    database,
                    provider,
                    // Tenant ids are ASCII (`config::check_tenant_id`), so cutting
                    // at TENANT_LEN bytes never splits a character; lossy
                    // decoding is only a guard.
                    String::from_utf8_lossy(&tenant).into_owned(),
                    t,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_label_and_adds_up_duplicates() {
        let table = MetricTable::<3>::new_boxed();
        let a = table.slot(5, ProviderKind::AwsKms, "acme").unwrap();
        a.add(Counter::KmsCalls, 2);
        a.kms_latency(crate::histogram::bucket(300));
        assert!(std::ptr::eq(
            a,
            table.slot(5, ProviderKind::AwsKms, "acme").unwrap()
        ));
        table
            .slot(5, ProviderKind::Local, "acme")
            .unwrap()
            .add(Counter::Encrypts, 7);
        table
            .slot(6, ProviderKind::AwsKms, "acme")
            .unwrap()
            .add(Counter::L1Hits, 1);
        assert!(
            table.slot(7, ProviderKind::AwsKms, "full").is_none(),
            "all slots taken"
        );
        let totals = table.totals();
        assert_eq!(totals.len(), 3);
        assert_eq!(totals[0].0, 5);
        let aws = totals
            .iter()
            .find(|r| r.0 == 5 && r.1 == ProviderKind::AwsKms)
            .unwrap();
        assert_eq!(aws.3.get(Counter::KmsCalls), 2);
        assert_eq!(aws.3.kms_latency.iter().sum::<u64>(), 1);
        let local = totals.iter().find(|r| r.1 == ProviderKind::Local).unwrap();
        assert_eq!(
            (local.2.as_str(), local.3.get(Counter::Encrypts)),
            ("acme", 7)
        );
    }

    #[test]
    fn long_tenant_ids_are_cut() {
        let table = MetricTable::<1>::new_boxed();
        let long = "t".repeat(300);
        table
            .slot(1, ProviderKind::Vault, &long)
            .unwrap()
            .add(Counter::Decrypts, 1);
        assert!(table.slot(1, ProviderKind::Vault, &long).is_some());
        assert_eq!(table.totals()[0].2.len(), TENANT_LEN);
    }
}
