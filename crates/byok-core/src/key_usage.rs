//! How many values each data key has sealed and the catalog does not know yet:
//! one counter per (database, data key) in shared memory.
//!
//! Backends add their counts in batches (every 1024 uses of a key, at most once
//! a second at a transaction's end, when a key leaves their cache), never per
//! row. The catalog writer persists the pending counts into
//! `byok.wrapped_data_keys.encryptions` and then subtracts what it persisted,
//! so a crash between the two counts twice (safe) and never loses a persisted
//! count. What a crash can lose is only what was pending: a few seconds of
//! encryptions, far inside the margin between the rotation threshold and
//! NIST's bound for random nonces.
//!
//! Each slot has a lock bit taken with compare-and-swap, so a slot can be
//! reassigned to another key without a count ever landing on the wrong key.
//! All-zero is the initial state.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const USAGE_SLOTS: usize = 16384;

const FREE: u32 = 0;
const READY: u32 = 1;
const LOCKED: u32 = 2;

#[repr(C)]
pub struct UsageSlot {
    state: AtomicU32,
    database: AtomicU32,
    dek_id: AtomicU64,
    pending: AtomicU64,
}

#[repr(C)]
pub struct KeyUsage {
    /// Counts that found no slot (the table full): reported, never attributed.
    unattributed: AtomicU64,
    slots: [UsageSlot; USAGE_SLOTS],
}

impl UsageSlot {
    /// Locks the slot if it is READY (or, with `claim`, FREE), waiting while
    /// another party holds it; returns the state it had.
    fn lock(&self, claim: bool) -> Option<u32> {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state == LOCKED {
                std::hint::spin_loop();
                continue;
            }
            if state == FREE && !claim {
                return None;
            }
            if self
                .state
                .compare_exchange(state, LOCKED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(state);
            }
            std::hint::spin_loop();
        }
    }

    fn holds(&self, database: u32, dek_id: u64) -> bool {
        self.database.load(Ordering::Relaxed) == database
            && self.dek_id.load(Ordering::Relaxed) == dek_id
    }
}

impl KeyUsage {
    pub fn new_boxed() -> Box<KeyUsage> {
        // SAFETY: every field is an integer atomic or an array of structs of
        // them, and all-zero bytes are a valid value of each (the empty table:
        // every slot FREE, nothing unattributed). Being all atomics, the table
        // is `Sync` without an unsafe impl.
        unsafe { Box::new_zeroed().assume_init() }
    }

    /// Adds `count` encryptions under (database, dek_id). `hint` is the slot
    /// used last time (kept by the caller); returns the slot used now.
    pub fn add(
        &self,
        database: u32,
        dek_id: u64,
        count: u64,
        hint: Option<usize>,
    ) -> Option<usize> {
        if count == 0 {
            return hint;
        }
        if let Some(index) = hint.filter(|i| *i < USAGE_SLOTS)
            && self.add_at(index, database, dek_id, count, false)
        {
            return Some(index);
        }
        // Its slot, if it has one...
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.state.load(Ordering::Acquire) != FREE
                && slot.holds(database, dek_id)
                && self.add_at(index, database, dek_id, count, false)
            {
                return Some(index);
            }
        }
        // ...else a free one.
        for index in 0..USAGE_SLOTS {
            if self.add_at(index, database, dek_id, count, true) {
                return Some(index);
            }
        }
        self.unattributed.fetch_add(count, Ordering::Relaxed);
        None
    }

    fn add_at(&self, index: usize, database: u32, dek_id: u64, count: u64, claim: bool) -> bool {
        let slot = &self.slots[index];
        let Some(previous) = slot.lock(claim) else {
            return false;
        };
        let ok = if previous == FREE {
            slot.database.store(database, Ordering::Relaxed);
            slot.dek_id.store(dek_id, Ordering::Relaxed);
            slot.pending.store(count, Ordering::Relaxed);
            true
        } else if slot.holds(database, dek_id) {
            slot.pending.fetch_add(count, Ordering::Relaxed);
            true
        } else {
            false
        };
        slot.state.store(READY, Ordering::Release);
        ok
    }

    /// The pending counts of `database`'s keys: (slot, data key, count).
    pub fn pending(&self, database: u32) -> Vec<(usize, u64, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.load(Ordering::Acquire) != FREE)
            .filter(|(_, s)| s.database.load(Ordering::Relaxed) == database)
            .map(|(i, s)| {
                (
                    i,
                    s.dek_id.load(Ordering::Relaxed),
                    s.pending.load(Ordering::Relaxed),
                )
            })
            .filter(|(_, _, n)| *n > 0)
            .collect()
    }

    /// Total pending per database (for deciding when to persist).
    pub fn pending_by_database(&self) -> Vec<(u32, u64)> {
        let mut totals: Vec<(u32, u64)> = Vec::new();
        for slot in &self.slots {
            if slot.state.load(Ordering::Acquire) == FREE {
                continue;
            }
            let n = slot.pending.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            let database = slot.database.load(Ordering::Relaxed);
            match totals.iter_mut().find(|(d, _)| *d == database) {
                Some((_, total)) => *total += n,
                None => totals.push((database, n)),
            }
        }
        totals
    }

    /// After `count` of (database, dek_id)'s pending encryptions were persisted:
    /// subtracts them, and frees the slot when nothing is pending and `retire`
    /// says the key will seal no more (no longer active).
    pub fn persisted(&self, index: usize, database: u32, dek_id: u64, count: u64, retire: bool) {
        let slot = &self.slots[index];
        if slot.lock(false).is_none() {
            // A free slot holds nothing pending, so there is nothing to subtract.
            return;
        }
        let mut next = READY;
        // A slot that now holds another key has nothing of this key's left.
        if slot.holds(database, dek_id) {
            let left = slot.pending.load(Ordering::Relaxed).saturating_sub(count);
            slot.pending.store(left, Ordering::Relaxed);
            if left == 0 && retire {
                next = FREE;
            }
        }
        slot.state.store(next, Ordering::Release);
    }

    pub fn unattributed(&self) -> u64 {
        self.unattributed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_accumulate_per_key_and_survive_until_persisted() {
        let usage = KeyUsage::new_boxed();
        let a = usage.add(1, 10, 1024, None);
        let b = usage.add(1, 11, 5, None);
        assert_ne!(a, b);
        assert_eq!(usage.add(1, 10, 1024, a), a);
        usage.add(2, 10, 7, None);
        let mut pending = usage.pending(1);
        pending.sort();
        assert_eq!(
            pending.iter().map(|p| (p.1, p.2)).collect::<Vec<_>>(),
            vec![(10, 2048), (11, 5)]
        );
        // Persisted 2048 while 100 more arrived: 100 stay pending.
        usage.add(1, 10, 100, a);
        usage.persisted(a.unwrap(), 1, 10, 2048, true);
        assert_eq!(usage.pending(1).iter().find(|p| p.1 == 10).unwrap().2, 100);
        let mut totals = usage.pending_by_database();
        totals.sort();
        assert_eq!(totals, vec![(1, 105), (2, 7)]);
    }

    #[test]
    fn a_freed_slot_reused_by_another_key_never_takes_a_stale_holders_count() {
        let usage = KeyUsage::new_boxed();
        let a = usage.add(1, 10, 3, None).unwrap();
        usage.persisted(a, 1, 10, 3, true); // key 10 retired: slot freed
        let b = usage.add(1, 99, 1, None).unwrap();
        assert_eq!(a, b, "the slot is reused");
        // A backend still holding the old hint for key 10 adds: it must not land on 99.
        let c = usage.add(1, 10, 5, Some(a)).unwrap();
        assert_ne!(c, a);
        let pending = usage.pending(1);
        assert_eq!(pending.iter().find(|p| p.1 == 99).unwrap().2, 1);
        assert_eq!(pending.iter().find(|p| p.1 == 10).unwrap().2, 5);
    }

    #[test]
    fn concurrent_adders_and_a_persister_lose_nothing() {
        let usage: Arc<KeyUsage> = Arc::from(KeyUsage::new_boxed());
        let adders: Vec<_> = (0..8u64)
            .map(|t| {
                let usage = usage.clone();
                std::thread::spawn(move || {
                    let mut hint = None;
                    for _ in 0..10_000 {
                        hint = usage.add(1, t % 3, 1, hint);
                    }
                })
            })
            .collect();
        let mut persisted = [0u64; 3];
        while !adders.iter().all(|a| a.is_finished()) {
            for (slot, dek, n) in usage.pending(1) {
                persisted[dek as usize] += n;
                usage.persisted(slot, 1, dek, n, false);
            }
        }
        for a in adders {
            a.join().unwrap();
        }
        for (slot, dek, n) in usage.pending(1) {
            persisted[dek as usize] += n;
            usage.persisted(slot, 1, dek, n, false);
        }
        assert_eq!(persisted.iter().sum::<u64>(), 80_000);
        assert_eq!(persisted[0], 30_000);
        assert_eq!(usage.unattributed(), 0);
    }
}
