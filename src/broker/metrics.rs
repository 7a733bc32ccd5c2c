//! Monitoring, named as in the guide's `monitoring_rules.yaml`: `byok.metrics`
//! shows, per database, provider and tenant, `kms_api_success_rate`,
//! `dek_generation_p99_ms`, `key_cache_hit_ratio` and `decrypt_failures_rate`,
//! with the raw counters behind them. The counters live in shared memory.
//!
//! Per-row events (backend cache hits, decrypts, encrypts) are counted in the
//! backend first and added to shared memory every 1024 uses of a key, at a
//! transaction's end once a second, when the key leaves the cache, when the
//! session reads the metrics and when it exits, so the per-row path (and a short
//! transaction's commit) never writes shared memory.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use byok_core::config::ProviderKind;
use pgrx::prelude::*;

use super::shmem::{self, LATENCY_BUCKETS};

/// Counts of one ready key not yet added to shared memory.
pub struct PendingCounts {
    slot: Option<usize>,
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
        let slot = shmem::shared().and_then(|shared| {
            let provider = ProviderKind::ALL
                .iter()
                .position(|p| *p == provider)
                .unwrap_or(0) as u32;
            shmem::metric_slot(shared, super::this_database(), provider, tenant.as_bytes())
        });
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
                super::this_database(),
                self.dek_id,
                u64::from(encrypts),
                self.usage_slot.get(),
            );
            self.usage_slot.set(slot);
        }
        let Some(m) = self.metric() else {
            self.encrypts.set(0);
            return;
        };
        for (cell, counter) in [
            (&self.l1_hits, &m.l1_hits),
            (&self.decrypts, &m.decrypts),
            (&self.encrypts, &m.encrypts),
        ] {
            let n = cell.replace(0);
            if n > 0 {
                counter.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }

    fn metric(&self) -> Option<&'static shmem::MetricSlot> {
        Some(&shmem::shared()?.metrics[self.slot?])
    }

    /// Events counted at once (cache misses, failures: never per-row in steady state).
    pub fn miss(&self, decrypt: bool) {
        if let Some(m) = self.metric() {
            m.l1_misses.fetch_add(1, Ordering::Relaxed);
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
        if let Some(m) = self.metric() {
            m.decrypt_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A key leaving the cache (expiry, eviction, invalidation) publishes what it counted.
impl Drop for PendingCounts {
    fn drop(&mut self) {
        self.flush();
    }
}

#[derive(Default)]
struct Totals {
    kms_calls: u64,
    kms_failures: u64,
    dek_generations: u64,
    l1_hits: u64,
    l1_misses: u64,
    l2_hits: u64,
    l2_misses: u64,
    served_stale: u64,
    served_by_replica: u64,
    decrypts: u64,
    decrypt_failures: u64,
    encrypts: u64,
    kms_latency: [u64; LATENCY_BUCKETS],
    dek_latency: [u64; LATENCY_BUCKETS],
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The counters behind `byok.metrics`, one row per database, provider and tenant.
// pgrx reads the column names from the inline tuple, so it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn metrics_counters() -> TableIterator<
    'static,
    (
        name!(database_oid, pg_sys::Oid),
        name!(provider, String),
        name!(tenant_id, String),
        name!(kms_calls, i64),
        name!(kms_failures, i64),
        name!(dek_generations, i64),
        name!(dek_generation_p99_ms, Option<f64>),
        name!(l1_hits, i64),
        name!(l1_misses, i64),
        name!(l2_hits, i64),
        name!(l2_misses, i64),
        name!(served_stale, i64),
        name!(served_by_replica, i64),
        name!(decrypts, i64),
        name!(decrypt_failures, i64),
        name!(encrypts, i64),
        name!(kms_latency_histogram, Vec<i64>),
    ),
> {
    // This backend's own pending counts first, so a session sees its own work.
    crate::keyring::flush_metrics();
    let mut rows: BTreeMap<(u32, u32, Vec<u8>), Totals> = BTreeMap::new();
    if let Some(shared) = shmem::shared() {
        for m in shared
            .metrics
            .iter()
            .filter(|m| m.state.load(Ordering::Acquire) == 2)
        {
            let key = (
                load_u32(&m.database),
                load_u32(&m.provider),
                m.tenant().to_vec(),
            );
            let t = rows.entry(key).or_default();
            t.kms_calls += load(&m.kms_calls);
            t.kms_failures += load(&m.kms_failures);
            t.dek_generations += load(&m.dek_generations);
            t.l1_hits += load(&m.l1_hits);
            t.l1_misses += load(&m.l1_misses);
            t.l2_hits += load(&m.l2_hits);
            t.l2_misses += load(&m.l2_misses);
            t.served_stale += load(&m.served_stale);
            t.served_by_replica += load(&m.served_by_replica);
            t.decrypts += load(&m.decrypts);
            t.decrypt_failures += load(&m.decrypt_failures);
            t.encrypts += load(&m.encrypts);
            for i in 0..LATENCY_BUCKETS {
                t.kms_latency[i] += load(&m.kms_latency[i]);
                t.dek_latency[i] += load(&m.dek_latency[i]);
            }
        }
    }
    let rows: Vec<_> = rows
        .into_iter()
        .map(|((database, provider, tenant), t)| {
            (
                pg_sys::Oid::from(database),
                ProviderKind::ALL
                    .get(provider as usize)
                    .map(|p| p.name())
                    .unwrap_or("?")
                    .to_string(),
                String::from_utf8_lossy(&tenant).into_owned(),
                t.kms_calls as i64,
                t.kms_failures as i64,
                t.dek_generations as i64,
                byok_kms::histogram::p99_ms(&t.dek_latency),
                t.l1_hits as i64,
                t.l1_misses as i64,
                t.l2_hits as i64,
                t.l2_misses as i64,
                t.served_stale as i64,
                t.served_by_replica as i64,
                t.decrypts as i64,
                t.decrypt_failures as i64,
                t.encrypts as i64,
                t.kms_latency.iter().map(|n| *n as i64).collect(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

fn load_u32(c: &std::sync::atomic::AtomicU32) -> u32 {
    c.load(Ordering::Relaxed)
}

/// The key broker's state: its process, how often it started, and its slots.
// (pgrx reads the column names from the signature, so no type alias)
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn broker_status() -> TableIterator<
    'static,
    (
        name!(broker_pid, Option<i32>),
        name!(generation, i64),
        name!(busy_slots, i32),
        name!(total_slots, i32),
        name!(requests_served, i64),
        name!(audit_queued, i32),
        name!(audit_dropped, i64),
        name!(shared_cache_entries, i64),
        name!(key_usage_unattributed, i64),
    ),
> {
    let Some(shared) = shmem::shared() else {
        crate::errors::ByokError::NotPreloaded.raise();
    };
    let pid = shared.broker_pid.load(Ordering::Acquire);
    let busy = shared
        .slots
        .iter()
        .filter(|s| s.state.load(Ordering::Acquire) != shmem::FREE)
        .count();
    TableIterator::once((
        (pid != 0).then_some(pid),
        shared.generation.load(Ordering::Acquire) as i64,
        busy as i32,
        shmem::SLOT_COUNT as i32,
        shared.requests_served.load(Ordering::Relaxed) as i64,
        // Records waiting for (or being taken by) the catalog writer.
        shared.audit.queued() as i32,
        shared.audit.dropped_total() as i64,
        shared.shared_cache_entries.load(Ordering::Relaxed) as i64,
        shared.key_usage.unattributed() as i64,
    ))
}
