//! The audit queue in shared memory: records that must outlive the transaction
//! that produced them (every key-manager call, every failure) wait here until
//! their database's audit writer puts them into `byok.audit_log`.
//!
//! Writers are the key broker's runtime threads and backends whose transaction
//! is about to abort, so the ring is atomics and plain memory only, usable from
//! any thread and independent of any transaction. All-zero is its initial state.
//!
//! No one can starve the others: a database may hold at most half of the
//! slots and a role a quarter, and a record refused (by a quota or a full
//! ring) is counted per database, so the writer can put an alert about the
//! loss into that database's trail.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const AUDIT_SLOTS: usize = 2048;
pub const AUDIT_RECORD_LEN: usize = 1536;
/// Most slots one database's records may hold at once.
pub const PER_DATABASE_QUOTA: usize = AUDIT_SLOTS / 2;
/// Most slots one role's records may hold at once.
pub const PER_ROLE_QUOTA: usize = AUDIT_SLOTS / 4;
/// Databases whose losses are counted separately (others share the total).
const DROP_COUNTERS: usize = 64;

const FREE: u32 = 0;
const FILLING: u32 = 1;
const READY: u32 = 2;
const TAKEN: u32 = 3;

#[repr(C)]
pub struct AuditSlot {
    state: AtomicU32,
    database: AtomicU32,
    role: AtomicU32,
    len: AtomicU32,
    /// Order of arrival, so records are written in the order they happened.
    seq: AtomicU64,
    record: UnsafeCell<[u8; AUDIT_RECORD_LEN]>,
}

#[repr(C)]
struct DropCounter {
    /// 0: unused (no database has OID 0).
    database: AtomicU32,
    count: AtomicU64,
}

/// Why a record was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooLarge,
    DatabaseQuota,
    RoleQuota,
    Full,
}

#[repr(C)]
pub struct AuditRing {
    seq: AtomicU64,
    dropped_total: AtomicU64,
    slots: [AuditSlot; AUDIT_SLOTS],
    dropped: [DropCounter; DROP_COUNTERS],
}

// SAFETY: the only non-`Sync` field is each slot's `record` (an `UnsafeCell`).
// Its buffer is touched only by the party that moved the slot's `state` with a
// compare-and-swap: FREE -> FILLING gives it to one pusher (`try_push`), READY ->
// TAKEN to one taker (`take`). The pusher publishes with a Release store of
// READY that the taker's AcqRel swap acquires, and the taker returns the slot
// with a Release store of FREE that the next pusher's swap acquires, so the
// accesses never overlap, whether from threads or from processes sharing the
// ring. Every other field is an atomic.
unsafe impl Sync for AuditRing {}

impl AuditRing {
    /// A ring on the heap (tests); in shared memory it is zeroed in place.
    pub fn new_boxed() -> Box<AuditRing> {
        // SAFETY: every field is an integer atomic, a byte array in an
        // `UnsafeCell`, or an array of those, and all-zero bytes are a valid value
        // of each (the empty ring: every slot FREE, no drop counter owned).
        unsafe { Box::new_zeroed().assume_init() }
    }

    /// Queues `record` for `database`, made for `role`.
    pub fn push(&self, database: u32, role: u32, record: &[u8]) -> Result<(), Refused> {
        let result = self.try_push(database, role, record);
        if result.is_err() {
            self.count_drop(database);
        }
        result
    }

    fn try_push(&self, database: u32, role: u32, record: &[u8]) -> Result<(), Refused> {
        if record.len() > AUDIT_RECORD_LEN {
            return Err(Refused::TooLarge);
        }
        let (mut of_database, mut of_role) = (0, 0);
        for slot in &self.slots {
            if slot.state.load(Ordering::Acquire) != FREE {
                of_database += usize::from(slot.database.load(Ordering::Relaxed) == database);
                of_role += usize::from(slot.role.load(Ordering::Relaxed) == role);
            }
        }
        // (Concurrent pushers may pass these checks together and exceed a quota
        // by their number: a bound, not an exact count.)
        if of_database >= PER_DATABASE_QUOTA {
            return Err(Refused::DatabaseQuota);
        }
        if of_role >= PER_ROLE_QUOTA {
            return Err(Refused::RoleQuota);
        }
        for slot in &self.slots {
            if slot
                .state
                .compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.database.store(database, Ordering::Relaxed);
                slot.role.store(role, Ordering::Relaxed);
                // SAFETY: our swap FREE -> FILLING succeeded, so no other pusher
                // holds this slot and no taker reads it (takers only take READY
                // slots); the swap acquired the last taker's release of FREE.
                // `record.len() <= AUDIT_RECORD_LEN` was checked above.
                unsafe { (&mut *slot.record.get())[..record.len()].copy_from_slice(record) };
                slot.len.store(record.len() as u32, Ordering::Relaxed);
                slot.seq
                    .store(self.seq.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
                slot.state.store(READY, Ordering::Release);
                return Ok(());
            }
        }
        Err(Refused::Full)
    }

    fn count_drop(&self, database: u32) {
        self.dropped_total.fetch_add(1, Ordering::Relaxed);
        for counter in &self.dropped {
            let owner = counter.database.load(Ordering::Acquire);
            if owner == database
                || (owner == 0
                    && counter
                        .database
                        .compare_exchange(0, database, Ordering::AcqRel, Ordering::Acquire)
                        .map_or_else(|current| current == database, |_| true))
            {
                counter.count.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Records refused for `database` since the last call (then reset).
    pub fn take_dropped(&self, database: u32) -> u64 {
        self.dropped
            .iter()
            .filter(|c| c.database.load(Ordering::Acquire) == database)
            .map(|c| c.count.swap(0, Ordering::AcqRel))
            .sum()
    }

    /// Every record refused since the server started.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Records waiting (or being taken).
    pub fn queued(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) != FREE)
            .count()
    }

    /// The databases with records waiting or losses to report.
    pub fn pending_databases(&self) -> Vec<u32> {
        let mut databases: Vec<u32> = self
            .slots
            .iter()
            .filter(|slot| slot.state.load(Ordering::Acquire) == READY)
            .map(|slot| slot.database.load(Ordering::Relaxed))
            .chain(
                self.dropped
                    .iter()
                    .filter(|c| c.count.load(Ordering::Relaxed) > 0)
                    .map(|c| c.database.load(Ordering::Acquire)),
            )
            .filter(|d| *d != 0)
            .collect();
        databases.sort_unstable();
        databases.dedup();
        databases
    }

    /// Takes every waiting record of `database`, oldest first, freeing their slots.
    pub fn take(&self, database: u32) -> Vec<Vec<u8>> {
        let mut taken: Vec<(u64, Vec<u8>)> = Vec::new();
        for slot in &self.slots {
            if slot.state.load(Ordering::Acquire) != READY
                || slot.database.load(Ordering::Relaxed) != database
            {
                continue;
            }
            if slot
                .state
                .compare_exchange(READY, TAKEN, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue; // another writer took it
            }
            let len = (slot.len.load(Ordering::Relaxed) as usize).min(AUDIT_RECORD_LEN);
            // SAFETY: our swap READY -> TAKEN succeeded, so this thread alone
            // owns the buffer until it stores FREE below; the swap acquired the
            // pusher's Release store of READY, made after the buffer was written.
            let record = unsafe { (&*slot.record.get())[..len].to_vec() };
            taken.push((slot.seq.load(Ordering::Relaxed), record));
            slot.state.store(FREE, Ordering::Release);
        }
        taken.sort_by_key(|(seq, _)| *seq);
        taken.into_iter().map(|(_, record)| record).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn records_come_out_in_order_per_database() {
        let ring = AuditRing::new_boxed();
        for i in 0..10u8 {
            ring.push(1 + u32::from(i % 2), 10, &[i]).unwrap();
        }
        assert_eq!(ring.pending_databases(), vec![1, 2]);
        assert_eq!(
            ring.take(1),
            (0..10u8).step_by(2).map(|i| vec![i]).collect::<Vec<_>>()
        );
        assert_eq!(ring.queued(), 5);
        assert_eq!(ring.take(2).len(), 5);
        assert_eq!(ring.queued(), 0);
        assert!(ring.pending_databases().is_empty());
    }

    #[test]
    fn one_role_cannot_fill_the_queue_and_its_losses_are_counted() {
        let ring = AuditRing::new_boxed();
        let mut refused = 0;
        for _ in 0..1000 {
            if ring.push(5, 666, b"flood").is_err() {
                refused += 1;
            }
        }
        assert_eq!(1000 - refused, PER_ROLE_QUOTA);
        assert_eq!(ring.take_dropped(5), refused as u64);
        assert_eq!(ring.take_dropped(5), 0, "reset once taken");
        // Everyone else still gets in.
        for role in 0..8 {
            ring.push(5, role, b"other").unwrap();
            ring.push(6, role, b"other database").unwrap();
        }
        assert_eq!(ring.dropped_total(), refused as u64);
    }

    #[test]
    fn one_database_cannot_fill_the_queue() {
        let ring = AuditRing::new_boxed();
        let mut queued = 0;
        for role in 0..100u32 {
            for _ in 0..PER_ROLE_QUOTA {
                if ring.push(7, role, b"x").is_ok() {
                    queued += 1;
                }
            }
        }
        assert_eq!(queued, PER_DATABASE_QUOTA);
        assert_eq!(ring.pending_databases(), vec![7]);
        ring.push(8, 999, b"y").unwrap();
        assert!(ring.take_dropped(7) > 0);
    }

    #[test]
    fn concurrent_pushers_and_a_taker_lose_nothing_within_the_quotas() {
        let ring: Arc<AuditRing> = Arc::from(AuditRing::new_boxed());
        let pushers: Vec<_> = (0..8u32)
            .map(|role| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut ok = 0;
                    for i in 0..1000u32 {
                        while ring.push(1 + role % 4, role, &i.to_le_bytes()).is_err() {
                            std::thread::yield_now();
                        }
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();
        let mut taken = 0;
        let mut pushed = 0;
        let mut handles = pushers.into_iter().peekable();
        loop {
            for database in 1..=4 {
                taken += ring.take(database).len();
            }
            if handles.peek().is_some_and(|h| h.is_finished()) {
                pushed += handles.next().unwrap().join().unwrap();
            }
            if handles.peek().is_none() {
                for database in 1..=4 {
                    taken += ring.take(database).len();
                }
                break;
            }
        }
        assert_eq!(pushed, 8000);
        assert_eq!(taken, 8000);
    }

    #[test]
    fn oversized_records_are_refused() {
        let ring = AuditRing::new_boxed();
        assert_eq!(
            ring.push(1, 1, &[0; AUDIT_RECORD_LEN + 1]),
            Err(Refused::TooLarge)
        );
        assert_eq!(ring.take_dropped(1), 1);
    }
}
