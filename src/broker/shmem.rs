//! The broker's shared memory: request slots (the checkpointer's request
//! pattern) and the monitoring counters behind `byok.metrics`.
//!
//! A slot moves through these states, each change by one party only:
//!
//! ```text
//! FREE --backend CAS--> FILLING --backend--> SUBMITTED --broker CAS--> RUNNING
//! RUNNING --broker CAS--> DONE --backend--> FREE
//! SUBMITTED --backend CAS (gave up)--> FREE
//! RUNNING --backend CAS (gave up)--> ABANDONED --broker, when its call ends--> FREE
//! ```
//!
//! The broker writes an answer only while the slot's request id is the one it
//! took, and a backend that gives up never reads one, so an answer can never
//! reach the next user of the slot. Answers, and above all the plaintext key
//! field, are zeroed before a slot is freed.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;

pub const SLOT_COUNT: usize = 64;
/// Room for one encoded request or answer.
pub const PAYLOAD_LEN: usize = 16 * 1024;
pub const METRIC_SLOTS: usize = 1024;
pub const TENANT_LEN: usize = 128;
pub use byok_kms::histogram::BUCKETS as LATENCY_BUCKETS;

pub const FREE: u32 = 0;
pub const FILLING: u32 = 1;
pub const SUBMITTED: u32 = 2;
pub const RUNNING: u32 = 3;
pub const DONE: u32 = 4;
pub const ABANDONED: u32 = 5;

#[repr(C)]
pub struct Slot {
    pub state: AtomicU32,
    pub request_id: AtomicU64,
    pub owner_pid: AtomicI32,
    pub request_len: AtomicU32,
    pub response_len: AtomicU32,
    pub has_data_key: AtomicBool,
    pub cv: UnsafeCell<pg_sys::ConditionVariable>,
    pub payload: UnsafeCell<[u8; PAYLOAD_LEN]>,
    pub data_key: UnsafeCell<[u8; 32]>,
}

/// Counters of one (database, provider, tenant). Written with relaxed atomic
/// adds; read by the `byok.metrics` view.
#[repr(C)]
pub struct MetricSlot {
    /// 0 empty, 1 being claimed, 2 ready.
    pub state: AtomicU32,
    pub database: AtomicU32,
    pub provider: AtomicU32,
    pub tenant_len: AtomicU32,
    pub tenant: UnsafeCell<[u8; TENANT_LEN]>,
    pub kms_calls: AtomicU64,
    pub kms_failures: AtomicU64,
    pub dek_generations: AtomicU64,
    pub l1_hits: AtomicU64,
    pub l1_misses: AtomicU64,
    pub l2_hits: AtomicU64,
    pub l2_misses: AtomicU64,
    pub served_stale: AtomicU64,
    pub served_by_replica: AtomicU64,
    pub decrypts: AtomicU64,
    pub decrypt_failures: AtomicU64,
    pub encrypts: AtomicU64,
    /// Latency of every key-manager call.
    pub kms_latency: [AtomicU64; LATENCY_BUCKETS],
    /// Latency of obtaining a data key from the key manager (generate or unwrap).
    pub dek_latency: [AtomicU64; LATENCY_BUCKETS],
}

/// Audit records waiting to be written into their database's `byok.audit_log`
/// (by the job launcher's audit writer). Written by the broker's runtime threads
/// and by backends whose transaction is about to abort, so: atomics and plain
/// memory only, and independent of any transaction.
pub const AUDIT_SLOTS: usize = 512;
pub const AUDIT_RECORD_LEN: usize = 1536;

pub const AUDIT_FREE: u32 = 0;
pub const AUDIT_FILLING: u32 = 1;
pub const AUDIT_READY: u32 = 2;
pub const AUDIT_TAKEN: u32 = 3;

#[repr(C)]
pub struct AuditSlot {
    pub state: AtomicU32,
    pub database: AtomicU32,
    /// Order of arrival, so records are written in the order they happened.
    pub seq: AtomicU64,
    pub len: AtomicU32,
    pub record: UnsafeCell<[u8; AUDIT_RECORD_LEN]>,
}

#[repr(C)]
pub struct BrokerShared {
    pub broker_pid: AtomicI32,
    pub broker_latch: AtomicPtr<pg_sys::Latch>,
    /// Bumped each time a broker starts.
    pub generation: AtomicU64,
    pub next_request_id: AtomicU64,
    pub requests_served: AtomicU64,
    pub slot_freed: UnsafeCell<pg_sys::ConditionVariable>,
    pub slots: [Slot; SLOT_COUNT],
    pub metrics: [MetricSlot; METRIC_SLOTS],
    pub audit_seq: AtomicU64,
    /// Records that found every audit slot taken (reported by `byok.broker_status`).
    pub audit_dropped: AtomicU64,
    pub audit: [AuditSlot; AUDIT_SLOTS],
}

// SAFETY: every field is either atomic, a PostgreSQL condition variable (which
// has its own spinlock), or a buffer whose ownership the slot state hands over.
unsafe impl Sync for BrokerShared {}

static mut SHARED: *mut BrokerShared = std::ptr::null_mut();
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// The shared state, when byok_pg was loaded through `shared_preload_libraries`.
pub fn shared() -> Option<&'static BrokerShared> {
    // SAFETY: set once in the postmaster before any child exists, then only read.
    unsafe { SHARED.as_ref() }
}

/// Installs the hooks that size and create the shared state. Called from
/// `_PG_init` while `shared_preload_libraries` is being processed.
pub fn install_hooks() {
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_hook);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_hook);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_hook() {
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<BrokerShared>());
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup_hook() {
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
            std::mem::size_of::<BrokerShared>(),
            &mut found,
        )
        .cast::<BrokerShared>();
        if !found {
            // All-zero is a valid initial state for every field: FREE slots, no
            // broker, zero counters. Condition variables need their own init.
            std::ptr::write_bytes(ptr.cast::<u8>(), 0, std::mem::size_of::<BrokerShared>());
            pg_sys::ConditionVariableInit((*ptr).slot_freed.get());
            for slot in (*ptr).slots.iter() {
                pg_sys::ConditionVariableInit(slot.cv.get());
            }
        }
        SHARED = ptr;
        pg_sys::LWLockRelease(lock);
    }
}

impl Slot {
    /// The payload buffer. Only the party the state gives the slot to may touch it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn payload(&self) -> &mut [u8; PAYLOAD_LEN] {
        unsafe { &mut *self.payload.get() }
    }

    #[allow(clippy::mut_from_ref)]
    pub unsafe fn data_key(&self) -> &mut [u8; 32] {
        unsafe { &mut *self.data_key.get() }
    }

    /// Wipes the answer and key material; done before the slot is freed.
    pub fn wipe(&self) {
        unsafe {
            std::ptr::write_volatile(self.data_key.get(), [0u8; 32]);
            let len = (self.response_len.load(Ordering::Relaxed) as usize)
                .max(self.request_len.load(Ordering::Relaxed) as usize)
                .min(PAYLOAD_LEN);
            std::ptr::write_bytes(self.payload.get().cast::<u8>(), 0, len);
        }
        self.has_data_key.store(false, Ordering::Relaxed);
        self.request_len.store(0, Ordering::Relaxed);
        self.response_len.store(0, Ordering::Relaxed);
    }
}

impl MetricSlot {
    pub fn tenant(&self) -> &[u8] {
        let len = (self.tenant_len.load(Ordering::Acquire) as usize).min(TENANT_LEN);
        unsafe { &(&*self.tenant.get())[..len] }
    }
}

pub use byok_kms::histogram::bucket as latency_bucket;

/// The metrics slot of (database, provider, tenant), claimed on first use.
/// `None` when all slots are taken (the counters are then not kept).
pub fn metric_slot(
    shared: &BrokerShared,
    database: u32,
    provider: u32,
    tenant: &[u8],
) -> Option<usize> {
    let tenant = &tenant[..tenant.len().min(TENANT_LEN)];
    let matches = |m: &MetricSlot| {
        m.state.load(Ordering::Acquire) == 2
            && m.database.load(Ordering::Relaxed) == database
            && m.provider.load(Ordering::Relaxed) == provider
            && m.tenant() == tenant
    };
    if let Some(i) = shared.metrics.iter().position(matches) {
        return Some(i);
    }
    for (i, m) in shared.metrics.iter().enumerate() {
        if m.state
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            m.database.store(database, Ordering::Relaxed);
            m.provider.store(provider, Ordering::Relaxed);
            unsafe { (&mut *m.tenant.get())[..tenant.len()].copy_from_slice(tenant) };
            m.tenant_len.store(tenant.len() as u32, Ordering::Relaxed);
            m.state.store(2, Ordering::Release);
            // Two processes may claim a slot for the same labels at once; the view
            // adds up slots with equal labels, so that only costs a slot.
            return Some(i);
        }
        if matches(m) {
            return Some(i);
        }
    }
    None
}

/// Queues one audit record (JSON, at most `AUDIT_RECORD_LEN` bytes) for
/// `database`. Returns false, and counts it, when every slot is taken.
pub fn push_audit(shared: &BrokerShared, database: u32, record: &[u8]) -> bool {
    if record.len() > AUDIT_RECORD_LEN {
        shared.audit_dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    for slot in shared.audit.iter() {
        if slot
            .state
            .compare_exchange(
                AUDIT_FREE,
                AUDIT_FILLING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            // SAFETY: FILLING gives this process the slot's buffer.
            unsafe { (&mut *slot.record.get())[..record.len()].copy_from_slice(record) };
            slot.len.store(record.len() as u32, Ordering::Relaxed);
            slot.database.store(database, Ordering::Relaxed);
            slot.seq.store(
                shared.audit_seq.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            slot.state.store(AUDIT_READY, Ordering::Release);
            return true;
        }
    }
    shared.audit_dropped.fetch_add(1, Ordering::Relaxed);
    false
}

/// The databases that have audit records waiting.
pub fn audit_pending_databases(shared: &BrokerShared) -> Vec<u32> {
    let mut databases: Vec<u32> = shared
        .audit
        .iter()
        .filter(|slot| slot.state.load(Ordering::Acquire) == AUDIT_READY)
        .map(|slot| slot.database.load(Ordering::Relaxed))
        .collect();
    databases.sort_unstable();
    databases.dedup();
    databases
}

/// Takes every waiting record of `database`, oldest first, freeing their slots.
pub fn take_audit(shared: &BrokerShared, database: u32) -> Vec<Vec<u8>> {
    let mut taken: Vec<(u64, Vec<u8>)> = Vec::new();
    for slot in shared.audit.iter() {
        if slot.state.load(Ordering::Acquire) != AUDIT_READY
            || slot.database.load(Ordering::Relaxed) != database
        {
            continue;
        }
        if slot
            .state
            .compare_exchange(
                AUDIT_READY,
                AUDIT_TAKEN,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            continue; // another writer took it
        }
        let len = (slot.len.load(Ordering::Relaxed) as usize).min(AUDIT_RECORD_LEN);
        // SAFETY: TAKEN gives this process the slot's buffer.
        let record = unsafe { (&*slot.record.get())[..len].to_vec() };
        taken.push((slot.seq.load(Ordering::Relaxed), record));
        slot.state.store(AUDIT_FREE, Ordering::Release);
    }
    taken.sort_by_key(|(seq, _)| *seq);
    taken.into_iter().map(|(_, record)| record).collect()
}
