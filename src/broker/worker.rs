//! The key broker: a static background worker that owns every key-provider
//! client and the shared data-key cache (through [`KeyService`]).
//!
//! Its main thread is a PostgreSQL process and is the only one that touches
//! PostgreSQL: it waits on its latch and on an eventfd, moves submitted requests
//! from the slots to tokio tasks, and writes finished answers back. The tokio
//! threads run the key-manager calls; they only touch plain memory (the answer
//! channel, the eventfd, the atomic counters), never a PostgreSQL API.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use byok_core::config::ProviderKind;
use byok_kms::protocol::{ErrorWire, Request, Response, TenantRef};
use byok_kms::service::{KmsOp, MetricEvent};
use byok_kms::{ErrorKind, KeyService, KmsCallAudit, MetricsSink, Outcome, ServiceSettings};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::shmem::{self, BrokerShared, DONE, RUNNING, SUBMITTED};
use crate::gucs;

/// Longest a key manager's refusal is remembered before it is asked again.
const REFUSAL_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Entries the shared cache holds at most, across all tenants and databases.
const SHARED_CACHE_CAPACITY: usize = 100_000;

pub fn register() {
    BackgroundWorkerBuilder::new("byok key broker")
        .set_type("byok key broker")
        .set_library("byok_pg")
        .set_function("byok_broker_main")
        .enable_shmem_access(None)
        // Restarted by the postmaster a second after it exits or dies.
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Counters of the service, kept in shared memory for `byok.metrics`.
struct SharedMetrics;

impl MetricsSink for SharedMetrics {
    fn record(&self, provider: ProviderKind, tenant: &TenantRef, event: MetricEvent) {
        let Some(shared) = shmem::shared() else {
            return;
        };
        let provider = ProviderKind::ALL
            .iter()
            .position(|p| *p == provider)
            .unwrap_or(0) as u32;
        let Some(i) = shmem::metric_slot(
            shared,
            tenant.database,
            provider,
            tenant.tenant_id.as_bytes(),
        ) else {
            return;
        };
        let m = &shared.metrics[i];
        let add = |c: &std::sync::atomic::AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match event {
            MetricEvent::KmsCall { op, ok, latency } => {
                add(&m.kms_calls);
                if !ok {
                    add(&m.kms_failures);
                }
                let bucket = shmem::latency_bucket(latency.as_micros() as u64);
                add(&m.kms_latency[bucket]);
                if ok && matches!(op, KmsOp::Unwrap | KmsOp::Generate) {
                    add(&m.dek_generations);
                    add(&m.dek_latency[bucket]);
                }
            }
            MetricEvent::SharedCacheHit => add(&m.l2_hits),
            MetricEvent::SharedCacheMiss => add(&m.l2_misses),
            MetricEvent::ServedStale => add(&m.served_stale),
            MetricEvent::ServedByReplica => add(&m.served_by_replica),
        }
    }

    /// Every key-manager call goes to the audit trail (through the shared-memory
    /// queue: this runs on a runtime thread, which must not touch PostgreSQL).
    fn audit(&self, provider: ProviderKind, tenant: &TenantRef, call: KmsCallAudit) {
        let event = match call.op {
            KmsOp::Generate => "kms_generate",
            KmsOp::Unwrap => "kms_unwrap",
            KmsOp::Rewrap => "kms_rewrap",
            KmsOp::Validate => "kms_validate",
        };
        let mut details = serde_json::json!({
            "provider": provider.name(),
            "latency_ms": (call.latency.as_secs_f64() * 1e3 * 10.0).round() / 10.0,
        });
        if let Some(id) = call.request_id {
            details["request_id"] = id.into();
        }
        if let Some(replica) = call.replica {
            details["replica"] = replica.into();
        }
        // A validation probe's key is never stored: no key id, a note instead.
        let probe = call.dek_id == Some(byok_kms::protocol::PROBE_DEK_ID);
        if probe {
            details["probe_data_key"] = true.into();
        }
        crate::audit::queue(
            tenant.database,
            &crate::audit::QueuedRecord {
                event: event.to_string(),
                tenant_id: Some(tenant.tenant_id.clone()),
                dek_id: call.dek_id.filter(|_| !probe).map(|id| id as i64),
                ok: call.ok,
                reason: call.error,
                details: Some(details),
                role: tenant.role,
                role_name: Some(tenant.role_name.clone()).filter(|n| !n.is_empty()),
                at_micros: crate::audit::now_micros(),
            },
        );
    }
}

fn settings() -> ServiceSettings {
    ServiceSettings {
        local_key_file: crate::providers::local_key_path(),
        policy: Arc::new(gucs::access_policy()),
        refusal_backoff_max: REFUSAL_BACKOFF_MAX,
        max_entries: SHARED_CACHE_CAPACITY,
        provider_timeout: Duration::from_millis(gucs::KMS_TIMEOUT_MS.get().max(1) as u64),
    }
}

struct Completion {
    slot: usize,
    request_id: u64,
    outcome: Outcome,
}

/// Builds the tokio runtime with every signal blocked, so its threads inherit a
/// full mask: PostgreSQL's signal handlers must only ever run on this thread.
fn build_runtime() -> tokio::runtime::Runtime {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("byok-broker")
            .enable_all()
            .build();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        match runtime {
            Ok(runtime) => runtime,
            Err(e) => {
                pgrx::error!("byok key broker: could not start its runtime: {e}")
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_broker_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(shared) = shmem::shared() {
        shared
            .broker_latch
            .store(std::ptr::null_mut(), Ordering::Release);
        shared.broker_pid.store(0, Ordering::Release);
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_broker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(shared) = shmem::shared() else {
        pgrx::error!("byok key broker: shared memory is not set up");
    };
    unsafe { pg_sys::before_shmem_exit(Some(on_broker_exit), pg_sys::Datum::from(0)) };
    // The broker holds every tenant's plaintext keys and the key managers'
    // credentials: it never writes a core dump, and other OS users (and
    // non-root ptrace) cannot attach to it.
    // SAFETY: prctl with PR_SET_DUMPABLE takes an integer argument only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        pgrx::warning!(
            "byok key broker: could not disable core dumps: {}",
            std::io::Error::last_os_error()
        );
    }
    shared.generation.fetch_add(1, Ordering::AcqRel);
    recover_slots(shared);

    // Finished tasks write to this eventfd, which wakes the main loop.
    let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if wake < 0 {
        pgrx::error!(
            "byok key broker: could not create an eventfd: {}",
            std::io::Error::last_os_error()
        );
    }
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
    let runtime = build_runtime();
    let service = Arc::new(KeyService::new(settings(), Arc::new(SharedMetrics)));
    let (done_tx, done_rx) = mpsc::channel::<Completion>();

    unsafe {
        shared
            .broker_latch
            .store(pg_sys::MyLatch, Ordering::Release);
        shared
            .broker_pid
            .store(pg_sys::MyProcPid, Ordering::Release);
    }
    log!(
        "byok key broker started (generation {})",
        shared.generation.load(Ordering::Acquire)
    );

    loop {
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET
                    | pg_sys::WL_SOCKET_READABLE
                    | pg_sys::WL_TIMEOUT
                    | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                wake.as_raw_fd(),
                1000,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            let mut counter = 0u64;
            libc::read(wake.as_raw_fd(), (&raw mut counter).cast(), 8);
        }
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            service.reconfigure(settings());
        }
        // Published before the answers, so a caller that was just answered (a
        // flush, say) reads the count after its own request.
        shared
            .shared_cache_entries
            .store(service.cached_entries() as u64, Ordering::Relaxed);
        while let Ok(done) = done_rx.try_recv() {
            deliver(shared, done);
        }
        for (index, slot) in shared.slots.iter().enumerate() {
            if slot
                .state
                .compare_exchange(SUBMITTED, RUNNING, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let request_id = slot.request_id.load(Ordering::Acquire);
            let len = (slot.request_len.load(Ordering::Acquire) as usize).min(shmem::PAYLOAD_LEN);
            let request = serde_json::from_slice::<Request>(unsafe { &slot.payload()[..len] });
            match request {
                Ok(request) => {
                    let (service, done_tx, wake) = (service.clone(), done_tx.clone(), wake.clone());
                    let work = runtime.spawn(async move { service.handle(request).await });
                    runtime.spawn(async move {
                        // A provider that panics must still answer, or its slot would never be freed.
                        let outcome = work.await.unwrap_or_else(|_| {
                            failure(
                                ErrorKind::Unavailable,
                                "the key provider failed unexpectedly; see the server log".into(),
                            )
                        });
                        let _ = done_tx.send(Completion {
                            slot: index,
                            request_id,
                            outcome,
                        });
                        let one = 1u64;
                        unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
                    });
                }
                Err(e) => deliver(
                    shared,
                    Completion {
                        slot: index,
                        request_id,
                        outcome: failure(
                            ErrorKind::Misconfigured,
                            format!("malformed request: {e}"),
                        ),
                    },
                ),
            }
        }
    }
    log!("byok key broker shutting down");
    runtime.shutdown_timeout(Duration::from_millis(500));
    // Exit code 1: a broker stopped on its own (pg_terminate_backend) is started
    // again; at server shutdown the postmaster does not restart anything.
    unsafe { pg_sys::proc_exit(1) };
}

fn failure(kind: ErrorKind, message: String) -> Outcome {
    Outcome {
        response: Response::Failed {
            error: ErrorWire {
                provider: "local".into(),
                kind,
                message,
                detail: None,
                hint: None,
            },
        },
        data_key: None,
    }
}

/// Writes an answer into its slot if the slot still waits for it.
fn deliver(shared: &BrokerShared, done: Completion) {
    let slot = &shared.slots[done.slot];
    if slot.request_id.load(Ordering::Acquire) != done.request_id {
        return; // the data key, if any, is zeroized as `done` drops
    }
    let mut encoded = serde_json::to_vec(&done.outcome.response).unwrap_or_default();
    if encoded.len() > shmem::PAYLOAD_LEN {
        let too_large = failure(
            ErrorKind::Unavailable,
            "the key manager's answer is too large".into(),
        );
        encoded = serde_json::to_vec(&too_large.response).unwrap_or_default();
    }
    unsafe {
        slot.payload()[..encoded.len()].copy_from_slice(&encoded);
        if let Some(dek) = &done.outcome.data_key {
            shared.slot_key(done.slot).copy_from_slice(dek.expose());
            slot.has_data_key.store(true, Ordering::Relaxed);
        }
    }
    slot.response_len
        .store(encoded.len() as u32, Ordering::Relaxed);
    shared.requests_served.fetch_add(1, Ordering::Relaxed);
    match slot
        .state
        .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => unsafe { pg_sys::ConditionVariableBroadcast(slot.cv.get()) },
        Err(_) => {
            // The requester gave up (ABANDONED): nobody may read this answer.
            shared.wipe_slot(done.slot);
            slot.state.store(shmem::FREE, Ordering::Release);
            unsafe { pg_sys::ConditionVariableBroadcast(shared.slot_freed.get()) };
        }
    }
}

/// After a restart: requests the previous broker had taken will never be
/// answered by it, so answer them with an error; free abandoned slots.
fn recover_slots(shared: &BrokerShared) {
    for (index, slot) in shared.slots.iter().enumerate() {
        match slot.state.load(Ordering::Acquire) {
            RUNNING => {
                let outcome = failure(
                    ErrorKind::Unavailable,
                    "the key broker restarted while handling this request; retry it".into(),
                );
                let encoded = serde_json::to_vec(&outcome.response).unwrap_or_default();
                unsafe { slot.payload()[..encoded.len()].copy_from_slice(&encoded) };
                slot.response_len
                    .store(encoded.len() as u32, Ordering::Relaxed);
                if slot
                    .state
                    .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    unsafe { pg_sys::ConditionVariableBroadcast(slot.cv.get()) };
                } else {
                    shared.wipe_slot(index);
                    slot.state.store(shmem::FREE, Ordering::Release);
                }
            }
            shmem::ABANDONED => {
                shared.wipe_slot(index);
                slot.state.store(shmem::FREE, Ordering::Release);
            }
            _ => {}
        }
    }
    unsafe { pg_sys::ConditionVariableBroadcast(shared.slot_freed.get()) };
}
