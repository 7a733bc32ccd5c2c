//! The background workers of re-encryption jobs and scheduled rotation.
//!
//! - The *job launcher* (static, restarted by the postmaster) visits every
//!   database every `byok.scheduler_naptime_seconds`, first right after start-up,
//!   by starting a short-lived *scheduler* worker connected to it.
//! - The *scheduler* rotates data keys that are due (`key_rotation`) and starts a
//!   *job worker* for each unfinished job: this is how jobs resume after a crash.
//! - A *job worker* runs one job: batches of `byok.reencrypt_step` in their own
//!   transactions, throttled to `byok.reencrypt_max_rows_per_second`, then
//!   `byok.finish_job` (verification, retiring old keys). A session advisory lock
//!   on the job id keeps it to one worker at a time.
//!
//! All the SQL work is in the extension's SQL functions; these workers only
//! drive it, so a batch's effects and its checkpoint commit together.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::gucs;

/// The first key of the advisory locks that keep a job to one worker.
const JOB_LOCK_CLASS: i32 = 0x6279_6f6b; // "byok"

pub fn register_launcher() {
    BackgroundWorkerBuilder::new("byok job launcher")
        .set_type("byok job launcher")
        .set_library("byok_pg")
        .set_function("byok_job_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn start_worker(name: &str, function: &str, database: pg_sys::Oid, argument: i64) -> bool {
    BackgroundWorkerBuilder::new(name)
        .set_type(name)
        .set_library("byok_pg")
        .set_function(function)
        .set_argument(Some(pg_sys::Datum::from(argument)))
        .set_extra(&u32::from(database).to_string())
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic()
        .is_ok()
}

/// Starts the worker of job `job` in `database`; false when no worker slot is free
/// (the scheduler's next visit tries again).
pub fn launch_job(job: i64, database: pg_sys::Oid) -> bool {
    start_worker(
        "byok re-encryption job",
        "byok_reencrypt_main",
        database,
        job,
    )
}

fn database_of_worker() -> pg_sys::Oid {
    let oid: u32 = BackgroundWorker::get_extra().trim().parse().unwrap_or(0);
    pg_sys::Oid::from(oid)
}

/// Reloads postgresql.conf after a SIGHUP; true if it did.
fn reload_config_if_asked() -> bool {
    let asked = BackgroundWorker::sighup_received();
    if asked {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    asked
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_job_launcher_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some("postgres"), None);
    let mut next_visit = Instant::now();
    loop {
        // A new configuration (say, a shorter naptime) starts a visit at once.
        if reload_config_if_asked() {
            next_visit = Instant::now();
        }
        // Every second: an audit writer for each database with queued audit records.
        if let Some(shared) = crate::broker::shmem::shared() {
            let pending = crate::broker::shmem::audit_pending_databases(shared);
            if !pending.is_empty() {
                // A database dropped (or closed to connections) since its records
                // were queued would fail every writer: its records are discarded.
                let open: Vec<u32> = BackgroundWorker::transaction(|| {
                    Spi::connect(|client| {
                        client
                            .select(
                                "SELECT oid FROM pg_catalog.pg_database WHERE datallowconn",
                                None,
                                &[],
                            )
                            .map(|rows| {
                                rows.filter_map(|row| row.get::<pg_sys::Oid>(1).ok().flatten())
                                    .map(u32::from)
                                    .collect()
                            })
                            .unwrap_or_default()
                    })
                });
                for database in pending {
                    if open.contains(&database) {
                        start_worker(
                            "byok audit writer",
                            "byok_audit_writer_main",
                            pg_sys::Oid::from(database),
                            0,
                        );
                    } else {
                        crate::broker::shmem::take_audit(shared, database);
                    }
                }
            }
        }
        if Instant::now() < next_visit {
            if !BackgroundWorker::wait_latch(Some(AUDIT_TICK)) {
                break;
            }
            continue;
        }
        let databases: Vec<pg_sys::Oid> = BackgroundWorker::transaction(|| {
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT oid FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate",
                        None,
                        &[],
                    )
                    .map(|rows| {
                        rows.filter_map(|row| row.get::<pg_sys::Oid>(1).ok().flatten())
                            .collect()
                    })
                    .unwrap_or_default()
            })
        });
        for database in databases {
            start_worker("byok scheduler", "byok_scheduler_main", database, 0);
        }
        next_visit = Instant::now()
            + Duration::from_secs(gucs::SCHEDULER_NAPTIME_SECONDS.get().max(1) as u64);
        if !BackgroundWorker::wait_latch(Some(AUDIT_TICK)) {
            break;
        }
    }
}

/// Whether byok_pg is installed in the worker's database (inside a transaction).
fn extension_installed() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'byok_pg')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// How often the launcher looks for queued audit records.
const AUDIT_TICK: Duration = Duration::from_secs(1);

/// Writes the queued audit records of its database into `byok.audit_log`.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_audit_writer_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = database_of_worker();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    BackgroundWorker::transaction(|| {
        if unsafe { pg_sys::RecoveryInProgress() } {
            return; // a standby cannot write; the records wait for promotion
        }
        if extension_installed() {
            crate::audit::write_queued(u32::from(database));
        } else {
            // The extension was dropped: nobody can read them any more.
            if let Some(shared) = crate::broker::shmem::shared() {
                crate::broker::shmem::take_audit(shared, u32::from(database));
            }
        }
    });
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_scheduler_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = database_of_worker();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    let jobs: Vec<i64> = BackgroundWorker::transaction(|| {
        if !extension_installed() || unsafe { pg_sys::RecoveryInProgress() } {
            return Vec::new();
        }
        // Errors of single tenants are reported as warnings inside; nothing here raises.
        let _ = Spi::run("SELECT byok.rotate_due_data_keys()");
        Spi::connect(|client| {
            client
                .select(
                    "SELECT job_id FROM byok.reencrypt_jobs WHERE state IN ('pending', 'running') ORDER BY job_id",
                    None,
                    &[],
                )
                .map(|rows| rows.filter_map(|row| row.get::<i64>(1).ok().flatten()).collect())
                .unwrap_or_default()
        })
    });
    for job in jobs {
        launch_job(job, database);
    }
}

fn job_state(job: i64) -> Option<String> {
    BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<String>(
            "SELECT state FROM byok.reencrypt_jobs WHERE job_id = $1",
            &[DatumWithOid::from(job)],
        )
        .ok()
        .flatten()
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_reencrypt_main(argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let job = argument.value() as i64;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database_of_worker()), None);
    // One worker per job: held until this process exits (or the server crashes).
    let mine = BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.pg_try_advisory_lock($1, $2)",
            &[
                DatumWithOid::from(JOB_LOCK_CLASS),
                DatumWithOid::from(job as i32),
            ],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    });
    if !mine {
        return;
    }
    // The job row commits with the caller's transaction, which may still be open.
    let appeared_by = Instant::now() + Duration::from_secs(30);
    // Whether this worker has marked the start of its run (rate and ETA count from
    // there); a pause ends a run, and so does a crash (the next worker starts anew).
    let mut run_marked = false;
    loop {
        reload_config_if_asked();
        if BackgroundWorker::sigterm_received() {
            return; // the job stays running; the scheduler resumes it
        }
        match job_state(job).as_deref() {
            None if Instant::now() < appeared_by => {
                BackgroundWorker::wait_latch(Some(Duration::from_millis(100)));
            }
            Some("pending") => BackgroundWorker::transaction(|| {
                let _ = Spi::run_with_args(
                    "UPDATE byok.reencrypt_jobs SET state = 'running', started_at = coalesce(started_at, now()), updated_at = now() WHERE job_id = $1 AND state = 'pending'",
                    &[DatumWithOid::from(job)],
                );
            }),
            Some("paused") => {
                run_marked = false;
                BackgroundWorker::wait_latch(Some(Duration::from_millis(200)));
            }
            Some("running") => {
                if !run_marked {
                    BackgroundWorker::transaction(|| {
                        let _ = Spi::run_with_args(
                            "UPDATE byok.reencrypt_jobs SET run_started_at = now(), run_rows_start = rows_done WHERE job_id = $1",
                            &[DatumWithOid::from(job)],
                        );
                    });
                    run_marked = true;
                }
                let started = Instant::now();
                let batch = gucs::REENCRYPT_BATCH_SIZE.get().max(1);
                let rewritten = BackgroundWorker::transaction(|| {
                    Spi::get_one_with_args::<i64>(
                        "SELECT byok.reencrypt_step($1, $2)",
                        &[DatumWithOid::from(job), DatumWithOid::from(batch)],
                    )
                    .ok()
                    .flatten()
                    .unwrap_or(-1)
                });
                if rewritten == -3 {
                    // The last values are in rows other transactions hold locked:
                    // wait for them to commit or roll back, then sweep again (once a
                    // second: each look is a scan of the column).
                    if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                        return;
                    }
                    continue;
                }
                if rewritten == -2 {
                    BackgroundWorker::transaction(|| {
                        let _ = Spi::run_with_args(
                            "SELECT byok.finish_job($1)",
                            &[DatumWithOid::from(job)],
                        );
                    });
                    return;
                }
                let max_rate = gucs::REENCRYPT_MAX_ROWS_PER_SECOND.get();
                if rewritten > 0 && max_rate > 0 {
                    let due = Duration::from_secs_f64(rewritten as f64 / max_rate as f64);
                    if let Some(rest) = due.checked_sub(started.elapsed())
                        && !BackgroundWorker::wait_latch(Some(rest))
                    {
                        return;
                    }
                }
            }
            // done, failed, cancelled, or a job that never appeared
            _ => return,
        }
    }
}
