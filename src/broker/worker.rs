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
use byok_core::counters::{AlertChange, KeyHealthRecord};
use byok_kms::protocol::{ErrorWire, Request, Response, TenantRef};
use byok_kms::service::{KeyHealth, KmsOp, MetricEvent, Settled};
use byok_kms::{ErrorKind, KeyService, KmsCallAudit, MetricsSink, Outcome, ServiceSettings};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use byok_core::counters::Counter;
use byok_core::slots::{PAYLOAD_LEN, Taken};

use crate::errors::ByokError;
use crate::gucs;
use crate::shmem::{self, Shared};

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
        let Some(m) = shmem::shared().and_then(|shared| {
            shared
                .metrics
                .slot(tenant.database, provider, &tenant.tenant_id)
        }) else {
            return;
        };
        match event {
            MetricEvent::KmsCall { op, ok, latency } => {
                m.add(Counter::KmsCalls, 1);
                if !ok {
                    m.add(Counter::KmsFailures, 1);
                }
                let micros = latency.as_micros() as u64;
                m.kms_latency(micros);
                if ok && matches!(op, KmsOp::Unwrap | KmsOp::Generate) {
                    m.add(Counter::DekGenerations, 1);
                    m.dek_latency(micros);
                }
            }
            MetricEvent::SharedCacheHit => m.add(Counter::L2Hits, 1),
            MetricEvent::SharedCacheMiss => m.add(Counter::L2Misses, 1),
            MetricEvent::ServedStale => m.add(Counter::ServedStale, 1),
            MetricEvent::ServedByReplica => m.add(Counter::ServedByReplica, 1),
            MetricEvent::ServedByBackup => m.add(Counter::ServedByBackup, 1),
            MetricEvent::KeyCheck => m.add(Counter::KeyChecks, 1),
        }
    }

    /// A revocation check's result: each tenant's key status in shared
    /// memory; on a change, an audit record per tenant (which also raises
    /// `NOTIFY byok_alerts`); on a revocation, every backend's ready keys
    /// dropped before its next row (the service has already emptied its own
    /// cache and refuses new requests).
    fn key_checked(&self, settled: &Settled) {
        let Some(shared) = shmem::shared() else {
            return;
        };
        if settled.changed && matches!(settled.health, KeyHealth::Revoked(_)) {
            for tenant in &settled.tenants {
                let slot = shmem::tenant_epoch_slot(tenant.database, &tenant.tenant_id);
                shared.tenant_epochs[slot].fetch_add(1, Ordering::AcqRel);
            }
        }
        let now = crate::audit::now_micros();
        let since = micros(settled.since);
        let provider = settled.provider.provider;
        for tenant in &settled.tenants {
            if let Some(slot) = shared
                .metrics
                .slot(tenant.database, provider, &tenant.tenant_id)
            {
                slot.set_health(health_record(&settled.health, now, since));
            }
            if settled.changed {
                crate::audit::queue(
                    tenant.database,
                    &health_change_record(settled, tenant, since),
                );
            }
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
            KmsOp::Wrap => "kms_wrap",
            // (checks are audited as changes of a key's health: key_checked)
            KmsOp::Check => "kms_check",
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
        if call.backup {
            details["key_manager"] = "backup".into();
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

fn micros(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn health_record(health: &KeyHealth, now: i64, since: i64) -> KeyHealthRecord {
    KeyHealthRecord {
        status: match health {
            KeyHealth::Unchecked => 0,
            KeyHealth::Live => 1,
            KeyHealth::Revoked(_) => 2,
            KeyHealth::Unreachable(_) => 3,
        },
        reason: health.error().map_or(0, |e| e.kind as u32 + 1),
        checked_at: now,
        // (0 keeps the time of the last check that was allowed)
        ok_at: if matches!(health, KeyHealth::Live) {
            now
        } else {
            0
        },
        since,
    }
}

/// The audit record of a change in a master key's health, for one tenant.
fn health_change_record(
    settled: &Settled,
    tenant: &TenantRef,
    since: i64,
) -> crate::audit::QueuedRecord {
    let event = match (&settled.health, &settled.previous) {
        (KeyHealth::Revoked(_), _) => "master_key_revoked",
        (KeyHealth::Live, KeyHealth::Revoked(_)) => "master_key_restored",
        (KeyHealth::Unreachable(_), _) => "master_key_unreachable",
        _ => "master_key_reachable",
    };
    let error = settled.health.error();
    let mut details = serde_json::json!({
        "provider": settled.provider.provider.name(),
        "master_key_id": settled.cmk_id,
        "status": settled.health.name(),
        "previous_status": settled.previous.name(),
    });
    if let Some(e) = error {
        details["reason_kind"] = e.kind.name().into();
    }
    crate::audit::QueuedRecord {
        event: event.to_string(),
        tenant_id: Some(tenant.tenant_id.clone()),
        dek_id: None,
        ok: error.is_none(),
        reason: error.map(|e| match &e.detail {
            Some(detail) => format!("{}: {detail}", e.message),
            None => e.message.clone(),
        }),
        details: Some(details),
        role: pg_sys::BOOTSTRAP_SUPERUSERID,
        role_name: Some("byok key broker".into()),
        at_micros: since,
    }
}

fn settings() -> ServiceSettings {
    ServiceSettings {
        local_key_file: crate::providers::local_key_path(),
        policy: Arc::new(gucs::access_policy()),
        refusal_backoff_max: REFUSAL_BACKOFF_MAX,
        max_entries: SHARED_CACHE_CAPACITY,
        provider_timeout: Duration::from_millis(gucs::kms_timeout_ms()),
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
    // SAFETY: the sigsets are plain data initialised by sigfillset/pthread_sigmask
    // before use; masking signals on this thread has no memory-safety effect.
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
            Err(e) => ByokError::BrokerFailed(format!("could not start its runtime: {e}")).raise(),
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
        ByokError::NotPreloaded.raise();
    };
    // SAFETY: registers a plain C callback for this process's exit.
    unsafe { pg_sys::before_shmem_exit(Some(on_broker_exit), pg_sys::Datum::from(0)) };
    refuse_core_dumps();
    shared.generation.fetch_add(1, Ordering::AcqRel);
    // This broker's revocation checks cover the keys fetched through it: the
    // backends' ready keys from before it go, and come back through it.
    shared.key_epoch.fetch_add(1, Ordering::AcqRel);
    // Requests the previous broker had taken will never be answered by it.
    shared.slots.recover(
        &encode(&failure(
            None,
            ErrorKind::Unavailable,
            "the key broker restarted while handling this request; retry it".into(),
        )),
        shared,
    );
    let wake = Arc::new(new_eventfd());
    let runtime = build_runtime();
    let service = Arc::new(KeyService::new(settings(), Arc::new(SharedMetrics)));
    runtime.spawn(service.clone().watch_master_keys());
    let mut exporter = Exporter::default();
    exporter.configure(&runtime);
    let (done_tx, done_rx) = mpsc::channel::<Completion>();
    // SAFETY: publishes this process's own latch and pid; cleared at exit.
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
        wait_for_work(&wake);
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads postgresql.conf in this process, as any worker may.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            service.reconfigure(settings());
            exporter.configure(&runtime);
        }
        exporter.maintain(&runtime);
        for change in shared.metrics.tick(crate::audit::now_micros() / 1_000_000) {
            crate::audit::queue(change.database, &alert_record(&change));
        }
        // Published before the answers, so a caller that was just answered (a
        // flush, say) reads the count after its own request.
        shared
            .shared_cache_entries
            .store(service.cached_entries() as u64, Ordering::Relaxed);
        shared
            .watched_master_keys
            .store(service.watched_master_keys() as u64, Ordering::Relaxed);
        while let Ok(done) = done_rx.try_recv() {
            deliver(shared, done);
        }
        for index in 0..shmem::SLOT_COUNT {
            if let Some(taken) = shared.slots.take(index) {
                dispatch(shared, &runtime, &service, &done_tx, &wake, taken);
            }
        }
    }
    log!("byok key broker shutting down");
    runtime.shutdown_timeout(Duration::from_millis(500));
    // Exit code 1: a broker stopped on its own (pg_terminate_backend) is started
    // again; at server shutdown the postmaster does not restart anything.
    // SAFETY: ends this process the way PostgreSQL expects of a worker.
    unsafe { pg_sys::proc_exit(1) };
}

/// The broker holds every tenant's plaintext keys and the key managers'
/// credentials: it never writes a core dump, and other OS users (and
/// non-root ptrace) cannot attach to it.
fn refuse_core_dumps() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes an integer argument only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        pgrx::warning!(
            "byok key broker: could not disable core dumps: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Finished tasks write to this eventfd, which wakes the main loop.
fn new_eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory-safety preconditions; the descriptor is
    // owned by the returned value from here on.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        if fd < 0 {
            ByokError::BrokerFailed(format!(
                "could not create an eventfd: {}",
                std::io::Error::last_os_error()
            ))
            .raise();
        }
        OwnedFd::from_raw_fd(fd)
    }
}

/// Sleeps until a backend sets the latch, a task finishes, or a second passes.
fn wait_for_work(wake: &OwnedFd) {
    // SAFETY: waits on this process's own latch and an eventfd it owns; the
    // read drains the eventfd's counter into a local.
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
}

/// Hands a taken request to the runtime; its answer comes back through
/// `done_tx` and the eventfd.
fn dispatch(
    shared: &Shared,
    runtime: &tokio::runtime::Runtime,
    service: &Arc<KeyService>,
    done_tx: &mpsc::Sender<Completion>,
    wake: &Arc<OwnedFd>,
    taken: Taken,
) {
    let request = match serde_json::from_slice::<Request>(&taken.request) {
        Ok(request) => request,
        Err(e) => {
            let outcome = failure(
                None,
                ErrorKind::Misconfigured,
                format!("malformed request: {e}"),
            );
            return deliver(
                shared,
                Completion {
                    slot: taken.index,
                    request_id: taken.request_id,
                    outcome,
                },
            );
        }
    };
    let provider = request.provider();
    let (service, done_tx, wake) = (service.clone(), done_tx.clone(), wake.clone());
    let work = runtime.spawn(async move { service.handle(request).await });
    runtime.spawn(async move {
        // A provider that panics must still answer, or its slot would never be freed.
        let outcome = work.await.unwrap_or_else(|_| {
            failure(
                provider,
                ErrorKind::Unavailable,
                "the key provider failed unexpectedly; see the server log".into(),
            )
        });
        // (The receiver lives as long as the main loop; after it, nobody waits.)
        let _ = done_tx.send(Completion {
            slot: taken.index,
            request_id: taken.request_id,
            outcome,
        });
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local to an eventfd this task shares ownership of.
        unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
    });
}

fn failure(provider: Option<ProviderKind>, kind: ErrorKind, message: String) -> Outcome {
    let mut error = ErrorWire::broker(kind, message);
    error.provider = provider;
    Outcome {
        response: Response::Failed { error },
        data_key: None,
    }
}

fn encode(outcome: &Outcome) -> Vec<u8> {
    // Serializing these plain enums of strings and numbers cannot fail.
    serde_json::to_vec(&outcome.response).expect("a response serializes")
}

/// Writes an answer into its slot if the slot still waits for it.
fn deliver(shared: &Shared, done: Completion) {
    let mut encoded = encode(&done.outcome);
    if encoded.len() > PAYLOAD_LEN {
        encoded = encode(&failure(
            None,
            ErrorKind::Unavailable,
            "the key manager's answer is too large".into(),
        ));
    }
    shared.requests_served.fetch_add(1, Ordering::Relaxed);
    shared.slots.answer(
        done.slot,
        done.request_id,
        &encoded,
        done.outcome.data_key.as_ref(),
        shared,
    );
    // The data key, if any, is zeroized as `done` drops.
}

/// The audit record of a monitor that changed state (its `NOTIFY byok_alerts`
/// comes with it).
fn alert_record(change: &AlertChange) -> crate::audit::QueuedRecord {
    let a = &change.alert;
    let metric = a.metric;
    let window = byok_core::monitors::format_window(a.rule.window_seconds);
    let value = a.value.map_or("no data".to_string(), |v| {
        format!("{v:.4} {}", metric.unit())
    });
    let side = match (a.firing, metric.fires_below()) {
        (true, true) => "below",
        (true, false) => "above",
        (false, _) => "back within",
    };
    let reason = format!(
        "{}: {} over {window} is {value}, {side} the threshold {} ({})",
        metric.monitor(),
        metric.name(),
        a.rule.threshold,
        a.rule.severity.name(),
    );
    crate::audit::QueuedRecord {
        event: if a.firing {
            "alert_firing"
        } else {
            "alert_resolved"
        }
        .to_string(),
        tenant_id: Some(change.tenant.clone()),
        dek_id: None,
        ok: true,
        reason: Some(reason),
        details: Some(serde_json::json!({
            "provider": change.provider.name(),
            "monitor": metric.monitor(),
            "metric": metric.name(),
            "severity": a.rule.severity.name(),
            "state": if a.firing { "firing" } else { "ok" },
            "value": a.value,
            "threshold": a.rule.threshold,
            "unit": metric.unit(),
            "window": window,
        })),
        // Not the key broker's own role (10): monitors' changes have their own
        // share of the audit queue, so many of them never crowd out the
        // master keys' health records.
        role: pg_sys::InvalidOid.into(),
        role_name: Some("byok key broker".into()),
        at_micros: a.since * 1_000_000,
    }
}

/// The Prometheus endpoint, run on the broker's runtime: (re)started at every
/// SIGHUP (so a renewed certificate or password file is read again), stopped
/// when unset, and retried every few seconds when its address cannot be bound.
#[derive(Default)]
struct Exporter {
    running: Option<tokio::task::JoinHandle<()>>,
    wanted: Option<byok_exporter::ExporterConfig>,
    tenant_labels: bool,
    retry_at: Option<std::time::Instant>,
    /// The last problem reported, so a retry does not repeat it in the log.
    reported: Option<String>,
}

/// How often a endpoint that could not be bound is tried again.
const EXPORTER_RETRY: Duration = Duration::from_secs(10);

impl Exporter {
    /// Reads the settings (on this, the main thread) and restarts the endpoint.
    fn configure(&mut self, runtime: &tokio::runtime::Runtime) {
        self.stop(runtime);
        self.reported = None;
        self.wanted = match gucs::metrics_exporter() {
            Ok(wanted) => wanted,
            Err(problem) => {
                self.report(format!("metrics endpoint not served: {problem}"));
                None
            }
        };
        let Some(config) = &self.wanted else {
            return;
        };
        // Tenant ids only to a scraper that authenticates.
        self.tenant_labels = gucs::metrics_tenant_labels();
        if self.tenant_labels && config.basic_auth.is_none() {
            self.tenant_labels = false;
            pgrx::warning!(
                "byok key broker: byok.metrics_tenant_labels is on, but the metrics endpoint has no byok.metrics_basic_auth_file: it serves no tenant labels"
            );
        }
        if config.password_in_clear() {
            pgrx::warning!(
                "byok key broker: the metrics endpoint on {} takes a password over plain HTTP; set byok.metrics_tls_cert_file and byok.metrics_tls_key_file",
                config.address
            );
        }
        self.start(runtime);
    }

    /// Retries a start that failed, and restarts an endpoint that ended.
    fn maintain(&mut self, runtime: &tokio::runtime::Runtime) {
        if self.wanted.is_none() {
            return;
        }
        let ended = self.running.as_ref().is_some_and(|task| task.is_finished());
        let due = self
            .retry_at
            .is_some_and(|at| std::time::Instant::now() >= at);
        if ended || (self.running.is_none() && due) {
            self.running = None;
            self.start(runtime);
        }
    }

    fn start(&mut self, runtime: &tokio::runtime::Runtime) {
        let Some(config) = self.wanted.clone() else {
            return;
        };
        match runtime.block_on(byok_exporter::Exporter::bind(&config)) {
            Ok(endpoint) => {
                log!(
                    "byok key broker: serving Prometheus metrics on {}://{}/metrics",
                    if config.tls.is_some() {
                        "https"
                    } else {
                        "http"
                    },
                    endpoint.local_addr().unwrap_or(config.address)
                );
                let tenant_labels = self.tenant_labels;
                let render: byok_exporter::Render =
                    Arc::new(move || crate::shmem::exposition(None, tenant_labels));
                self.running = Some(runtime.spawn(endpoint.serve(render)));
                self.retry_at = None;
                self.reported = None;
            }
            Err(e) => {
                let retry = matches!(e, byok_exporter::ExporterError::Bind(..));
                self.report(format!(
                    "metrics endpoint not served: {e}{}",
                    if retry { " (retrying every 10 s)" } else { "" }
                ));
                self.retry_at = retry.then(|| std::time::Instant::now() + EXPORTER_RETRY);
            }
        }
    }

    /// Stops the endpoint and waits until its listener is closed (so the
    /// address can be bound again at once).
    fn stop(&mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(task) = self.running.take() {
            task.abort();
            let _ = runtime.block_on(task);
        }
        self.retry_at = None;
    }

    fn report(&mut self, problem: String) {
        if self.reported.as_ref() != Some(&problem) {
            pgrx::warning!("byok key broker: {problem}");
            self.reported = Some(problem);
        }
    }
}
