//! Shared memory: everything byok_pg keeps across processes, laid out once,
//! below both the key broker and the backends.
//!
//! - the request slots between backends and the broker
//!   ([`byok_core::slots`], woken through PostgreSQL condition variables here);
//! - the monitoring counters behind `byok.metrics`, `byok.alerts` and the
//!   Prometheus endpoint, with their windows ([`byok_core::counters`]);
//! - the audit queue the catalog writers drain ([`byok_core::audit_ring`]);
//! - per-data-key encryption counts not yet persisted ([`byok_core::key_usage`]);
//! - the broker's process, latch and a few gauges.
//!
//! The protocols are pgrx-free and unit-tested in `byok-core`; this module only
//! places them in PostgreSQL's segment and supplies the waiting.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicPtr, AtomicU64, Ordering};
use std::time::Duration;

use byok_core::audit_ring::AuditRing;
use byok_core::counters::{DatabaseTable, MetricTable};
use byok_core::key_usage::KeyUsage;
use byok_core::slots::{Signals, SlotTable};
use pgrx::pg_sys;

pub const SLOT_COUNT: usize = 64;
pub const METRIC_SLOTS: usize = 1024;
pub const TENANT_EPOCH_SLOTS: usize = 256;
pub const DATABASE_SLOTS: usize = 256;

#[repr(C)]
pub struct Shared {
    pub broker_pid: AtomicI32,
    pub broker_latch: AtomicPtr<pg_sys::Latch>,
    /// Bumped each time a broker starts.
    pub generation: AtomicU64,
    pub requests_served: AtomicU64,
    /// Data keys in the broker's shared cache (published by the broker).
    pub shared_cache_entries: AtomicU64,
    /// Bumped when every backend must drop all its ready keys before its next
    /// row: a broker (re)start (whose revocation checks only cover keys
    /// fetched through it).
    pub key_epoch: AtomicU64,
    /// Bumped when the key broker finds a tenant's master key revoked: every
    /// backend drops its ready keys of the tenants in that slot
    /// ([`tenant_epoch_slot`]) before their next row. Per slot, so that one
    /// tenant's revocations (a hostile administrator toggling its own key)
    /// cost the others nothing but a 1-in-256 chance of sharing its slot.
    pub tenant_epochs: [AtomicU64; TENANT_EPOCH_SLOTS],
    /// Master keys the broker watches for revocation (published by the broker).
    pub watched_master_keys: AtomicU64,
    /// Backends waiting for a free slot sleep here.
    slot_freed: UnsafeCell<pg_sys::ConditionVariable>,
    /// A backend waiting for its answer sleeps on its slot's variable.
    slot_answered: [UnsafeCell<pg_sys::ConditionVariable>; SLOT_COUNT],
    pub slots: SlotTable<SLOT_COUNT>,
    pub metrics: MetricTable<METRIC_SLOTS>,
    /// Database names (for the Prometheus labels) and budget figures.
    pub databases: DatabaseTable<DATABASE_SLOTS>,
    /// Re-encryption jobs: workers running, values rewritten, jobs failed.
    pub jobs_running: AtomicI64,
    pub job_rows_rewritten: AtomicU64,
    pub jobs_failed: AtomicU64,
    /// Audit records waiting for their database's catalog writer.
    pub audit: AuditRing,
    /// Encryptions per data key not yet persisted in the catalog.
    pub key_usage: KeyUsage,
}

// SAFETY: every field is atomic, a PostgreSQL condition variable (which has its
// own spinlock), or one of the core's tables, which are Sync themselves.
unsafe impl Sync for Shared {}

static mut SHARED: *mut Shared = std::ptr::null_mut();
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// The shared state, when byok_pg was loaded through `shared_preload_libraries`.
pub fn shared() -> Option<&'static Shared> {
    // SAFETY: set once in the postmaster before any child exists, then only read.
    unsafe { SHARED.as_ref() }
}

/// The current [`Shared::key_epoch`] (0 when not preloaded).
#[inline(always)]
pub fn key_epoch() -> u64 {
    shared().map_or(0, |shared| shared.key_epoch.load(Ordering::Acquire))
}

/// The slot of [`Shared::tenant_epochs`] for a tenant of a database (FNV-1a:
/// the broker and every backend compute the same).
pub fn tenant_epoch_slot(database: u32, tenant_id: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in database.to_le_bytes().iter().chain(tenant_id.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % TENANT_EPOCH_SLOTS as u64) as usize
}

/// The current value of a tenant epoch slot (0 when not preloaded).
#[inline(always)]
pub fn tenant_epoch(slot: usize) -> u64 {
    shared().map_or(0, |shared| {
        shared.tenant_epochs[slot % TENANT_EPOCH_SLOTS].load(Ordering::Acquire)
    })
}

/// Installs the hooks that size and create the shared state. Called from
/// `_PG_init` while `shared_preload_libraries` is being processed.
pub fn install_hooks() {
    // SAFETY: the postmaster runs `_PG_init` single-threaded, before any hook
    // can be called; chaining keeps other libraries' hooks working.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_hook);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_hook);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_hook() {
    // SAFETY: called by the postmaster while shared memory is being sized.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup_hook() {
    // SAFETY: called once per process that attaches to shared memory (the
    // postmaster, and EXEC_BACKEND children); AddinShmemInitLock serializes
    // creation, and the struct is initialized only by whoever creates it.
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        // AddinShmemInitLock is entry 21 of the main LWLock array (lwlocknames.txt).
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(
            c"byok_pg key broker".as_ptr(),
            std::mem::size_of::<Shared>(),
            &mut found,
        )
        .cast::<Shared>();
        if !found {
            // All-zero is a valid initial state for every field: free slots, no
            // broker, zero counters. Condition variables need their own init.
            std::ptr::write_bytes(ptr.cast::<u8>(), 0, std::mem::size_of::<Shared>());
            pg_sys::ConditionVariableInit((*ptr).slot_freed.get());
            for cv in (*ptr).slot_answered.iter() {
                pg_sys::ConditionVariableInit(cv.get());
            }
        }
        exclude_from_core_dumps((*ptr).slots.key_region());
        SHARED = ptr;
        pg_sys::LWLockRelease(lock);
    }
}

/// Marks the pages holding the slots' plaintext keys `MADV_DONTDUMP`. Done in
/// the postmaster, before any child exists; children inherit it through fork.
/// (The range is widened to whole pages: excluding a little more is harmless.)
fn exclude_from_core_dumps((start, len): (usize, usize)) {
    // SAFETY: sysconf and madvise have no memory-safety preconditions; the
    // range lies within the shared segment just mapped.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
        let first = start & !(page - 1);
        let last = (start + len).next_multiple_of(page);
        if libc::madvise(
            first as *mut libc::c_void,
            last - first,
            libc::MADV_DONTDUMP,
        ) != 0
        {
            pgrx::warning!(
                "byok_pg: could not exclude key memory from core dumps: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Signals for Shared {
    fn answered(&self, index: usize) {
        // SAFETY: the condition variable was initialized with the segment.
        unsafe { pg_sys::ConditionVariableBroadcast(self.slot_answered[index].get()) };
    }

    fn slot_freed(&self) {
        // SAFETY: as above.
        unsafe { pg_sys::ConditionVariableBroadcast(self.slot_freed.get()) };
    }
}

impl Shared {
    /// Sleeps until slot `index` is answered or `timeout` passes. Interruptible:
    /// a cancel or statement_timeout raises its error from here.
    pub fn sleep_until_answered(&self, index: usize, timeout: Duration) {
        sleep_on(self.slot_answered[index].get(), timeout);
    }

    /// Sleeps until a slot is freed or `timeout` passes (interruptible).
    pub fn sleep_until_slot_freed(&self, timeout: Duration) {
        sleep_on(self.slot_freed.get(), timeout);
    }

    /// Wakes the broker, if one runs.
    pub fn wake_broker(&self) {
        let latch = self.broker_latch.load(Ordering::Acquire);
        if !latch.is_null() {
            // SAFETY: the broker publishes its own latch and clears it before it exits.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }
}

fn sleep_on(cv: *mut pg_sys::ConditionVariable, timeout: Duration) {
    // SAFETY: `cv` points into the shared segment and was initialized with it;
    // CHECK_FOR_INTERRUPTS runs inside the sleep.
    unsafe {
        pg_sys::ConditionVariableTimedSleep(
            cv,
            timeout.as_millis().clamp(1, i64::MAX as u128) as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
    }
}

/// Leaves the wait list of the condition variable last slept on (the first
/// sleep on a variable only joins its list and returns at once, so the list is
/// kept across a waiting loop and left once at its end).
pub fn stop_waiting() {
    // SAFETY: no preconditions; a no-op when not on any wait list.
    unsafe { pg_sys::ConditionVariableCancelSleep() };
}

/// The Prometheus text exposition of what shared memory holds: the key
/// broker's figures and, per (database, provider[, tenant]), the counters and
/// monitors, for every database or only `database`. Reads atomics only (no
/// PostgreSQL call): the key broker's runtime threads run it.
pub fn exposition(database: Option<u32>, tenant_labels: bool) -> String {
    let Some(shared) = shared() else {
        return String::new();
    };
    let pid = shared.broker_pid.load(Ordering::Acquire);
    let wanted = |db: &u32| database.is_none_or(|only| only == *db);
    let mut totals = shared.metrics.totals();
    totals.retain(|(db, ..)| wanted(db));
    let mut alerts = shared.metrics.alerts();
    alerts.retain(|(db, ..)| wanted(db));
    let mut database_names = shared.databases.names();
    database_names.retain(|db, _| wanted(db));
    let mut key_budget_used = shared.databases.budgets_used();
    key_budget_used.retain(|db, _| wanted(db));
    byok_core::prometheus::Snapshot {
        broker: byok_core::prometheus::BrokerFigures {
            up: pid != 0,
            starts: shared.generation.load(Ordering::Acquire),
            busy_slots: shared.slots.busy() as u64,
            total_slots: SLOT_COUNT as u64,
            requests_served: shared.requests_served.load(Ordering::Relaxed),
            audit_queued: shared.audit.queued() as u64,
            audit_dropped: shared.audit.dropped_total(),
            shared_cache_entries: shared.shared_cache_entries.load(Ordering::Relaxed),
            watched_master_keys: shared.watched_master_keys.load(Ordering::Relaxed),
            metric_slots_used: shared.metrics.used() as u64,
            metric_slots: METRIC_SLOTS as u64,
            jobs_running: shared.jobs_running.load(Ordering::Relaxed).max(0) as u64,
            job_rows_rewritten: shared.job_rows_rewritten.load(Ordering::Relaxed),
            jobs_failed: shared.jobs_failed.load(Ordering::Relaxed),
        },
        totals,
        alerts,
        database_names,
        key_budget_used,
        tenant_labels,
    }
    .render()
}
