//! The background workers besides the key broker.
//!
//! - The *job launcher* (static, restarted by the postmaster) looks every
//!   second for databases with work for a *catalog writer* (queued audit
//!   records, lost-record reports, encryption counts to persist), and visits
//!   every database every `byok.scheduler_naptime_seconds` (first right after
//!   start-up) by starting a short-lived *scheduler* connected to it.
//! - The *catalog writer* writes a database's queued audit records, persists
//!   its data keys' encryption counts, and rotates any active key that reached
//!   `byok.max_encryptions_per_key`.
//! - The *scheduler* rotates data keys that are due (`key_rotation`), runs the
//!   master-key rotations scheduled for now (`byok.scheduled_rotations`), retires
//!   master keys whose grace period ended, and starts a *job worker* for each
//!   unfinished job: this is how jobs resume after a crash.
//! - A *job worker* runs one job through the shared driver (`super::drive`), a
//!   transaction per batch. A claim in the job's row (the worker's pid and
//!   start time) keeps a job to one worker at a time.
//!
//! Workers connect as the bootstrap superuser; everything they do goes through
//! the same paths as SQL calls: catalog work as the extension's owner with
//! search_path pinned, user tables as their owners (`jobs::engine`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::admin::{self, AdminOp, Origin};
use crate::errors::ByokError;
use crate::gucs;
use crate::postgres::spi::{NotNull, Required};

/// How often the launcher looks for a catalog writer's work.
const TICK: Duration = Duration::from_secs(1);
/// Encryption counts are persisted at least this often while a database has
/// some pending (sooner when many are).
const PERSIST_INTERVAL: Duration = Duration::from_secs(5);
const PERSIST_SOON: u64 = 1 << 20;
/// The worker names, as `pg_stat_activity.backend_type` shows them.
pub const CATALOG_WRITER: &str = "byok catalog writer";

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
    // The launcher writes the OID; InvalidOid (0) would make the connection fail loudly.
    let oid: u32 = BackgroundWorker::get_extra().trim().parse().unwrap_or(0);
    pg_sys::Oid::from(oid)
}

/// Reloads postgresql.conf after a SIGHUP; true if it did.
fn reload_config_if_asked() -> bool {
    let asked = BackgroundWorker::sighup_received();
    if asked {
        // SAFETY: the documented way for a background worker to reload.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    asked
}

fn oids(sql: &str) -> Vec<pg_sys::Oid> {
    BackgroundWorker::transaction(|| column_or_warn("databases", sql))
}

/// Column 1 of every row of `sql`. A background worker has no caller to raise
/// to: a failure is a warning in the server log and an empty answer, and the
/// next round tries again.
fn column_or_warn<T: pgrx::FromDatum + pgrx::IntoDatum>(what: &str, sql: &str) -> Vec<T> {
    let read = Spi::connect(|client| {
        let mut out = Vec::new();
        for row in client.select(sql, None, &[])? {
            out.push(row.required::<T>(1)?);
        }
        Ok::<_, ByokError>(out)
    });
    read.unwrap_or_else(|failure| {
        pgrx::warning!("byok: could not list {what}: {}", failure.summary());
        Vec::new()
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_job_launcher_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some("postgres"), None);
    let mut next_visit = Instant::now();
    let mut last_persist: HashMap<u32, Instant> = HashMap::new();
    loop {
        // A new configuration (say, a shorter naptime) starts a visit at once.
        if reload_config_if_asked() {
            next_visit = Instant::now();
        }
        if let Some(shared) = crate::shmem::shared() {
            let mut due: Vec<u32> = shared.audit.pending_databases();
            for (database, pending) in shared.key_usage.pending_by_database() {
                let last = last_persist.entry(database).or_insert_with(Instant::now);
                if pending >= PERSIST_SOON || last.elapsed() >= PERSIST_INTERVAL {
                    due.push(database);
                }
            }
            due.sort_unstable();
            due.dedup();
            if !due.is_empty() {
                // A database dropped (or closed to connections) since its records
                // were queued would fail every writer: its work is discarded.
                let open: Vec<u32> =
                    oids("SELECT oid FROM pg_catalog.pg_database WHERE datallowconn")
                        .into_iter()
                        .map(u32::from)
                        .collect();
                for database in due {
                    if open.contains(&database) {
                        if start_worker(
                            CATALOG_WRITER,
                            "byok_catalog_writer_main",
                            pg_sys::Oid::from(database),
                            0,
                        ) {
                            last_persist.insert(database, Instant::now());
                        }
                    } else {
                        shared.audit.take(database);
                        shared.audit.take_dropped(database);
                        for (slot, dek, n) in shared.key_usage.pending(database) {
                            shared.key_usage.persisted(slot, database, dek, n, true);
                        }
                    }
                }
            }
        }
        if Instant::now() >= next_visit {
            for database in oids(
                "SELECT oid FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate",
            ) {
                start_worker("byok scheduler", "byok_scheduler_main", database, 0);
            }
            next_visit = Instant::now() + Duration::from_secs(gucs::scheduler_naptime_seconds());
        }
        if !BackgroundWorker::wait_latch(Some(TICK)) {
            break;
        }
    }
}

/// Whether byok_pg is installed in the worker's database (inside a transaction).
fn extension_installed() -> bool {
    column_or_warn::<bool>(
        "installed extensions",
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'byok_pg')",
    )
    .first()
    .copied()
    .unwrap_or(false)
}

/// Writes its database's queued audit records, persists its encryption counts
/// and rotates the keys that reached their budget.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_catalog_writer_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = database_of_worker();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    let Some(shared) = crate::shmem::shared() else {
        return;
    };
    let db = u32::from(database);
    // SAFETY: reads shared state, no preconditions.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return; // a standby cannot write; the work waits for promotion
    }
    let persisted = BackgroundWorker::transaction(|| {
        let Some(shared) = crate::shmem::shared() else {
            return Vec::new();
        };
        if !extension_installed() {
            // The extension was dropped: nobody can read any of it any more.
            shared.audit.take(db);
            shared.audit.take_dropped(db);
            return shared
                .key_usage
                .pending(db)
                .into_iter()
                .map(|(slot, dek, n)| (slot, dek, n, true))
                .collect();
        }
        crate::audit::write_queued(db);
        Vec::new()
    });
    // Its own transaction: the audit records above hold the chain's lock until
    // they commit, and this one waits on data-key rows an administrative
    // transaction may hold while it waits for that lock.
    let counted = BackgroundWorker::transaction(|| {
        if !extension_installed() {
            return Vec::new();
        }
        persist_key_usage(db).unwrap_or_else(|e| {
            pgrx::warning!(
                "byok: could not persist data keys' encryption counts: {}",
                e.summary_ref()
            );
            Vec::new()
        })
    });
    let persisted = persisted.into_iter().chain(counted);
    // Subtracted only once the counts are committed (a crash in between counts twice: safe).
    for (slot, dek, n, retire) in persisted {
        shared.key_usage.persisted(slot, db, dek, n, retire);
    }
    BackgroundWorker::transaction(|| {
        if extension_installed()
            && !on_citus_worker()
            && let Err(e) = enforce_encryption_budget()
        {
            pgrx::warning!("byok: encryption budget: {}", e.summary_ref());
        }
    });
}

/// [`forget_dropped_grantees`] on Citus. Each node's copy of the grants holds
/// that node's own role OIDs, so no one statement through the reference table
/// can tell a dropped role's row (Citus would compare every copy with the
/// coordinator's OIDs and empty the workers'). Every copy is cleaned where it
/// lives, against its own node's roles: Citus drops a role on every node, so
/// the copies lose the same rows. The coordinator's copy names them for the
/// audit trail first.
fn forget_dropped_grantees_on_every_node() -> Result<i64, ByokError> {
    const DANGLING: &str = "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                                         WHERE r.oid OPERATOR(pg_catalog.=) g.grantee::pg_catalog.oid)";
    let audited = Spi::get_one::<i64>(&format!(
        "SELECT count(byok.audit_event('grant_dropped_with_role', g.tenant_id, NULL, 'ok', NULL,
                                       pg_catalog.jsonb_build_object('role_oid', g.grantee::pg_catalog.oid)))
           FROM byok.tenant_grants g WHERE {DANGLING}"
    ))?
    .unwrap_or(0);
    if audited == 0 {
        return Ok(0);
    }
    // (%s: Citus puts each placement's quoted, qualified shard name there)
    let failures = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(r.nodename OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) r.nodeport
                                      OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) r.result, '; ')
           FROM pg_catalog.run_command_on_placements('byok.tenant_grants', $1) r
          WHERE NOT r.success",
        &[DatumWithOid::from(
            format!("DELETE FROM %s g WHERE {DANGLING}").as_str(),
        )],
    )?;
    match failures {
        None => Ok(audited),
        Some(failures) => Err(ByokError::WrongState {
            message: format!("grants of dropped roles not removed on every node: {failures}"),
            detail: None,
            hint: None,
        }),
    }
}

/// Whether this is a Citus worker reading a shared key catalog (whose
/// maintenance is the coordinator's).
fn on_citus_worker() -> bool {
    crate::catalog::cluster_role().ok() == Some(crate::catalog::ClusterRole::Worker)
}

/// Publishes the share of its encryption budget this database's busiest
/// active data key has used (`byok_data_key_budget_used_ratio`).
fn publish_budget_used(budget: i64) {
    let most = crate::catalog::as_extension_owner(|| {
        Ok(column_or_warn::<i64>(
            "data keys' encryption counts",
            "SELECT coalesce(max(encryptions), 0)::pg_catalog.int8 FROM byok.wrapped_data_keys
              WHERE state OPERATOR(pg_catalog.=) 'active'",
        ))
    })
    .ok()
    .and_then(|rows| rows.first().copied());
    if let (Some(most), Some(shared)) = (most, crate::shmem::shared()) {
        let database = crate::postgres::session::database();
        shared
            .databases
            .set_name(database, &crate::postgres::session::database_name());
        shared
            .databases
            .set_budget_used(database, most as f64 / budget.max(1) as f64);
    }
}

/// Adds the pending encryption counts of this database's keys to the catalog.
/// Returns what to subtract after commit: (slot, key, count, key no longer active).
fn persist_key_usage(database: u32) -> Result<Vec<(usize, u64, u64, bool)>, ByokError> {
    let Some(shared) = crate::shmem::shared() else {
        return Ok(Vec::new());
    };
    let mut done = Vec::new();
    crate::catalog::as_extension_owner(|| {
        for (slot, dek, n) in shared.key_usage.pending(database) {
            let state = Spi::get_one_with_args::<String>(
                "UPDATE byok.wrapped_data_keys SET encryptions = encryptions + $2
                  WHERE dek_id OPERATOR(pg_catalog.=) $1 RETURNING state",
                &[DatumWithOid::from(dek as i64), DatumWithOid::from(n as i64)],
            )?;
            done.push((slot, dek, n, state.as_deref() != Some("active")));
        }
        Ok(())
    })?;
    Ok(done)
}

/// Rotates every active data key that sealed `byok.max_encryptions_per_key`
/// values. If a rotation fails (the key manager unreachable) the key keeps
/// sealing until twice the budget, then stops being active: encryption for its
/// tenant fails, clearly, until a rotation succeeds; decryption goes on.
fn enforce_encryption_budget() -> Result<(), ByokError> {
    let budget = gucs::max_encryptions_per_key() as i64;
    publish_budget_used(budget);
    let over: Vec<(String, i64, i64)> = crate::catalog::as_extension_owner(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT tenant_id, dek_id, encryptions FROM byok.wrapped_data_keys
                  WHERE state OPERATOR(pg_catalog.=) 'active' AND encryptions >= $1 ORDER BY dek_id",
                None,
                &[DatumWithOid::from(budget)],
            )?;
            let mut out = Vec::new();
            for row in rows {
                out.push((
                    row.required::<String>(1)?,
                    row.required::<i64>(2)?,
                    row.required::<i64>(3)?,
                ));
            }
            Ok(out)
        })
    })?;
    for (tenant_id, dek_id, encryptions) in over {
        let reason = format!(
            "encryption budget: data key {dek_id} sealed {encryptions} values (byok.max_encryptions_per_key = {budget})"
        );
        let rotated = crate::postgres::subxact::run(|| {
            admin::execute(
                AdminOp::RotateDataKey {
                    tenant_id: tenant_id.clone(),
                    reason: Some(reason.clone()),
                },
                Origin::Policy,
            )
        });
        if let Err(failure) = rotated {
            pgrx::warning!(
                "byok: tenant {tenant_id}: data key {dek_id} reached its encryption budget but could not be rotated: {}",
                failure.summary()
            );
            if encryptions >= budget.saturating_mul(2) {
                crate::catalog::as_extension_owner(|| {
                    Spi::run_with_args(
                        "UPDATE byok.wrapped_data_keys SET state = 'decrypt-only', rotated_at = pg_catalog.now()
                          WHERE dek_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'active'",
                        &[DatumWithOid::from(dek_id)],
                    )?;
                    crate::catalog::audit(
                        "encryption_budget_exhausted",
                        Some(&tenant_id),
                        Some(dek_id),
                        false,
                        Some(
                            "the data key sealed twice its budget and could not be rotated: it no longer encrypts",
                        ),
                        Some(serde_json::json!({"encryptions": encryptions, "budget": budget})),
                    )
                })?;
            }
        }
    }
    Ok(())
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_scheduler_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = database_of_worker();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    let jobs: Vec<i64> = BackgroundWorker::transaction(|| {
        // SAFETY: reads shared state, no preconditions.
        if !extension_installed() || unsafe { pg_sys::RecoveryInProgress() } {
            return Vec::new();
        }
        if on_citus_worker() {
            // The coordinator keeps the shared catalog; this node only reads it.
            return Vec::new();
        }
        forget_dropped_grantees();
        publish_budget_used(gucs::max_encryptions_per_key() as i64);
        rotate_due_data_keys();
        run_scheduled_rotations();
        retire_expired_master_keys();
        if crate::catalog::cluster_role().ok() == Some(crate::catalog::ClusterRole::Coordinator)
            && let Err(e) = enforce_encryption_budget()
        {
            // (workers persist their counts into the shared catalog; the
            // coordinator rotates what reached the budget)
            pgrx::warning!("byok: encryption budget: {}", e.summary_ref());
        }
        crate::catalog::as_extension_owner(|| {
            Ok(column_or_warn::<i64>(
                "re-encryption jobs to run",
                "SELECT job_id FROM byok.reencrypt_jobs WHERE state IN ('pending', 'running') ORDER BY job_id",
            ))
        })
        .unwrap_or_else(|failure| {
            pgrx::warning!("byok: could not list jobs: {}", failure.summary());
            Vec::new()
        })
    });
    for job in jobs {
        launch_job(job, database);
    }
}

/// Removes grants whose role was dropped. `byok.tenant_grants` names roles by
/// OID, which PostgreSQL does not track as a dependency; left behind, a grant
/// would pass to a future role that happened to get the same OID.
fn forget_dropped_grantees() {
    let forgotten = crate::postgres::subxact::run(|| {
        crate::catalog::as_extension_owner(|| {
            if crate::catalog::cluster_role()? == crate::catalog::ClusterRole::Coordinator {
                return forget_dropped_grantees_on_every_node();
            }
            Spi::get_one::<i64>(
                "WITH gone AS (
                     DELETE FROM byok.tenant_grants g
                      WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                                         WHERE r.oid OPERATOR(pg_catalog.=) g.grantee::pg_catalog.oid)
                  RETURNING g.grantee::pg_catalog.oid AS role_oid, g.tenant_id)
                 SELECT count(byok.audit_event('grant_dropped_with_role', tenant_id, NULL, 'ok', NULL,
                                               pg_catalog.jsonb_build_object('role_oid', role_oid)))
                   FROM gone",
            )?
            .not_null("grants removed")
        })
    });
    if let Err(failure) = forgotten {
        pgrx::warning!(
            "byok: could not remove grants of dropped roles: {}",
            failure.summary()
        );
    }
}

/// Automatic data-key rotation: tenants with key_rotation.enabled whose active
/// key is older than interval_days. A tenant's failure is a warning, not the
/// end of the others'.
fn rotate_due_data_keys() {
    let due: Vec<String> = crate::catalog::as_extension_owner(|| {
        Ok(column_or_warn::<String>(
            "tenants due for rotation",
            // (index keys rotate only when asked: a rotation rewrites every term)
            &format!(
                "SELECT c.tenant_id FROM byok.tenant_config c
                   JOIN byok.wrapped_data_keys k ON k.tenant_id = c.tenant_id AND k.state = 'active'
                        AND {}
                  WHERE c.rotation_enabled
                    AND k.created_at < now() - make_interval(days => c.rotation_interval_days)",
                crate::catalog::data_keys_only()?
            ),
        ))
    })
    .unwrap_or_else(|failure| {
        pgrx::warning!(
            "byok: could not list tenants due for rotation: {}",
            failure.summary()
        );
        Vec::new()
    });
    for tenant_id in due {
        let rotated = crate::postgres::subxact::run(|| {
            admin::execute(
                AdminOp::RotateDataKey {
                    tenant_id: tenant_id.clone(),
                    reason: Some("scheduled: key_rotation.interval_days".into()),
                },
                Origin::Policy,
            )
        });
        if let Err(failure) = rotated {
            pgrx::warning!(
                "byok: scheduled data-key rotation of tenant {tenant_id} failed: {}",
                failure.summary()
            );
        }
    }
}

/// Runs the customer-initiated rotations scheduled for now. Each runs whole
/// in a subtransaction of the scheduler's transaction, marked running, then done
/// or failed; a crash rolls all of it back, so the next visit starts it again
/// (a rotation is idempotent). A failure is recorded in its row and audited.
fn run_scheduled_rotations() {
    // (A table of 0.2.0: absent until ALTER EXTENSION byok_pg UPDATE.)
    let present = crate::catalog::as_extension_owner(|| {
        crate::catalog::read_one::<bool>(
            "SELECT pg_catalog.to_regclass('byok.scheduled_rotations') IS NOT NULL",
            &[],
        )
    });
    if !matches!(present, Ok(Some(true))) {
        return;
    }
    let due: Vec<(i64, String, String, String, bool)> = crate::catalog::as_extension_owner(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT rotation_id, tenant_id, new_key_id, grace_period::pg_catalog.text, approved
                   FROM byok.scheduled_rotations
                  WHERE state OPERATOR(pg_catalog.=) ANY (ARRAY['scheduled', 'running'])
                    AND rotation_time OPERATOR(pg_catalog.<=) pg_catalog.now()
                  ORDER BY rotation_time, rotation_id",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for row in rows {
                out.push((
                    row.required::<i64>(1)?,
                    row.required::<String>(2)?,
                    row.required::<String>(3)?,
                    row.required::<String>(4)?,
                    row.required::<bool>(5)?,
                ));
            }
            Ok(out)
        })
    })
    .unwrap_or_else(|failure| {
        pgrx::warning!(
            "byok: could not list scheduled rotations: {}",
            failure.summary()
        );
        Vec::new()
    });
    for (rotation_id, tenant_id, new_key_id, grace_period, approved) in due {
        // Only a rotation still scheduled (or running, after a crash) moves:
        // one cancelled since it was listed stays cancelled (the cancel holds
        // its row until it commits). Whether a row moved is the answer.
        let set_state = |state: &str, result: Option<&str>| {
            crate::catalog::as_extension_owner(|| {
                Spi::connect_mut(|client| {
                    let moved = client.update(
                        "UPDATE byok.scheduled_rotations
                            SET state = $2, result = $3,
                                started_at = coalesce(started_at, pg_catalog.now()),
                                finished_at = CASE WHEN $2 OPERATOR(pg_catalog.=) 'running' THEN NULL
                                                   ELSE pg_catalog.now() END
                          WHERE rotation_id OPERATOR(pg_catalog.=) $1
                            AND state OPERATOR(pg_catalog.=) ANY (ARRAY['scheduled', 'running'])
                      RETURNING rotation_id",
                        None,
                        &[
                            DatumWithOid::from(rotation_id),
                            DatumWithOid::from(state),
                            DatumWithOid::from(result),
                        ],
                    )?;
                    Ok::<_, ByokError>(!moved.is_empty())
                })
            })
        };
        let rotated = crate::postgres::subxact::run(|| {
            if !set_state("running", None)? {
                return Ok(());
            }
            // Scheduled while dual control did not apply, and it applies now:
            // a rotation nobody approved does not run.
            if !approved && crate::admin::policy::dual_control_applies() {
                return Err(ByokError::NotAllowed {
                    message: format!(
                        "scheduled rotation {rotation_id} was made without a second administrator's approval, and dual control applies now"
                    ),
                    detail: None,
                    hint: Some(
                        "schedule it again: byok.request_operation('schedule_master_key_rotation', ...)"
                            .into(),
                    ),
                });
            }
            let result = admin::execute(
                AdminOp::RotateMasterKey {
                    tenant_id: tenant_id.clone(),
                    new_key_id: new_key_id.clone(),
                    grace_period: grace_period.clone(),
                },
                Origin::Policy,
            )?;
            set_state("done", Some(&result.text())).map(drop)
        });
        if let Err(failure) = rotated {
            let summary = failure.summary();
            pgrx::warning!(
                "byok: scheduled rotation {rotation_id} of tenant {tenant_id} to master key {new_key_id} failed: {summary}"
            );
            if let Err(e) = set_state("failed", Some(&summary)) {
                pgrx::warning!(
                    "byok: could not record the failure of scheduled rotation {rotation_id}: {}",
                    e.summary_ref()
                );
            }
        }
    }
}

/// Retires the master keys whose grace period (after a rotation) ended.
fn retire_expired_master_keys() {
    let due: Vec<String> = crate::catalog::as_extension_owner(|| {
        Ok(column_or_warn::<String>(
            "master keys whose grace period ended",
            "SELECT tenant_id FROM byok.tenant_config
              WHERE previous_master_key_id IS NOT NULL
                AND previous_master_key_retires_at OPERATOR(pg_catalog.<=) pg_catalog.now()
              ORDER BY tenant_id",
        ))
    })
    .unwrap_or_else(|failure| {
        pgrx::warning!("byok: could not list grace periods: {}", failure.summary());
        Vec::new()
    });
    for tenant_id in due {
        let retired = crate::postgres::subxact::run(|| {
            admin::execute(
                AdminOp::RetirePreviousMasterKey {
                    tenant_id: tenant_id.clone(),
                },
                Origin::Policy,
            )
        });
        if let Err(failure) = retired {
            pgrx::warning!(
                "byok: the grace period of tenant {tenant_id}'s previous master key ended, but it could not be retired (retried at the next visit): {}",
                failure.summary()
            );
        }
    }
}

/// One unit of a job's work per transaction; waits on the latch.
struct WorkerRunner;

impl super::Runner for WorkerRunner {
    fn unit<R>(&mut self, f: impl FnOnce() -> R) -> R {
        // (A panic ends the worker; nothing of `f` is used after one.)
        let f = std::panic::AssertUnwindSafe(f);
        BackgroundWorker::transaction(move || {
            let f = f; // the whole wrapper, not just its field
            (f.0)()
        })
    }

    fn wait(&mut self, time: Duration) -> bool {
        reload_config_if_asked();
        BackgroundWorker::wait_latch(Some(time)) && !BackgroundWorker::sigterm_received()
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn byok_reencrypt_main(argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let job = argument.value() as i64;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database_of_worker()), None);
    // The job row commits with the caller's transaction, which may still be
    // open; then one worker per job (the claim is in the job's row).
    let appeared_by = Instant::now() + Duration::from_secs(30);
    loop {
        match BackgroundWorker::transaction(|| super::engine::state_of(job)) {
            Ok(Some(_)) => break,
            Ok(None)
                if Instant::now() < appeared_by
                    && BackgroundWorker::wait_latch(Some(Duration::from_millis(100))) => {}
            _ => return,
        }
    }
    if !BackgroundWorker::transaction(|| super::engine::claim_for_worker(job)).unwrap_or(false) {
        return;
    }
    count_running_job();
    let outcome = super::drive(job, &mut WorkerRunner, false);
    let recorded = BackgroundWorker::transaction(|| {
        if let Err(e) = &outcome {
            super::engine::record_failure(job, &e.summary_ref())?;
        }
        super::engine::release_worker_claim(job)
    });
    if let Err(e) = recorded {
        // The job's row could not be updated (the database is going away, say):
        // the claim frees itself when this process ends; say why in the log.
        pgrx::warning!("byok job worker for job {job}: {}", e.summary_ref());
    }
}

/// Counts this worker in `jobs_running` until its process exits, however it
/// exits (an error, a SIGTERM: the exit callback runs in every case).
fn count_running_job() {
    let Some(shared) = crate::shmem::shared() else {
        return;
    };
    shared
        .jobs_running
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: registers a plain C callback for this process's exit.
    unsafe { pg_sys::before_shmem_exit(Some(uncount_running_job), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn uncount_running_job(_code: i32, _arg: pg_sys::Datum) {
    if let Some(shared) = crate::shmem::shared() {
        shared
            .jobs_running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
