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

use byok_core::audit_ring::AuditRing;
use byok_core::key_usage::KeyUsage;
use pgrx::pg_sys;

pub const SLOT_COUNT: usize = 64;
/// Room for one encoded request or answer.
pub const PAYLOAD_LEN: usize = 16 * 1024;
pub const METRIC_SLOTS: usize = 1024;
pub const TENANT_LEN: usize = 128;
pub use byok_core::audit_ring::AUDIT_RECORD_LEN;
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
}

/// The plaintext data key of each slot's answer, apart from everything else:
/// the pages holding them are marked `MADV_DONTDUMP`, so a core dump of any
/// process never carries a key in flight. (They cross shared memory only from
/// the broker to the one backend that asked, and are wiped as soon as it has
/// read them.) Not page-aligned as a type: PostgreSQL places the shared state
/// at a cache-line boundary only, so the madvise range is widened to pages.
#[repr(C)]
pub struct SlotKeys([UnsafeCell<[u8; 32]>; SLOT_COUNT]);

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

#[repr(C)]
pub struct BrokerShared {
    pub broker_pid: AtomicI32,
    pub broker_latch: AtomicPtr<pg_sys::Latch>,
    /// Bumped each time a broker starts.
    pub generation: AtomicU64,
    pub next_request_id: AtomicU64,
    pub requests_served: AtomicU64,
    /// Data keys in the broker's shared cache (published by the broker).
    pub shared_cache_entries: AtomicU64,
    pub slot_freed: UnsafeCell<pg_sys::ConditionVariable>,
    pub slots: [Slot; SLOT_COUNT],
    pub slot_keys: SlotKeys,
    pub metrics: [MetricSlot; METRIC_SLOTS],
    /// Audit records waiting for their database's catalog writer.
    pub audit: AuditRing,
    /// Encryptions per data key not yet persisted in the catalog.
    pub key_usage: KeyUsage,
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
        exclude_from_core_dumps(&(*ptr).slot_keys);
        SHARED = ptr;
        pg_sys::LWLockRelease(lock);
    }
}

/// Marks the pages holding the slots' keys `MADV_DONTDUMP`. Done in the
/// postmaster, before any child exists; children inherit it through fork.
/// (The range is widened to whole pages: excluding a little more is harmless.)
fn exclude_from_core_dumps(keys: &SlotKeys) {
    let start = std::ptr::from_ref(keys) as usize;
    let end = start + std::mem::size_of::<SlotKeys>();
    // SAFETY: sysconf and madvise have no memory-safety preconditions; the
    // range lies within the shared segment we just mapped.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
        let first = start & !(page - 1);
        let last = end.next_multiple_of(page);
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

impl BrokerShared {
    /// The key field of slot `index`. Only the party the slot's state gives the
    /// slot to may touch it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_key(&self, index: usize) -> &mut [u8; 32] {
        // SAFETY: the caller owns the slot per its state (see the module docs).
        unsafe { &mut *self.slot_keys.0[index].get() }
    }

    /// The index of `slot` in `slots`.
    pub fn slot_index(&self, slot: &Slot) -> usize {
        (std::ptr::from_ref(slot) as usize - self.slots.as_ptr() as usize)
            / std::mem::size_of::<Slot>()
    }

    /// Wipes slot `index`'s answer and key; done before the slot is freed.
    pub fn wipe_slot(&self, index: usize) {
        // SAFETY: volatile write of the slot's own key field, by its owner.
        unsafe { std::ptr::write_volatile(self.slot_keys.0[index].get(), [0u8; 32]) };
        self.slots[index].wipe();
    }
}

impl Slot {
    /// The payload buffer. Only the party the state gives the slot to may touch it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn payload(&self) -> &mut [u8; PAYLOAD_LEN] {
        unsafe { &mut *self.payload.get() }
    }

    /// Wipes the answer (not the key: see [`BrokerShared::wipe_slot`]).
    fn wipe(&self) {
        unsafe {
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
