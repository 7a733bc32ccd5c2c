//! Re-encryption jobs: registering columns, starting and steering jobs, and the
//! one driver that runs a job, whether in its background worker (a transaction
//! per batch) or in the transaction that started it (`byok.wait_job` in a
//! migration run as one transaction).

pub mod citus;
pub mod engine;
pub mod workers;

use std::time::{Duration, Instant};

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::admin;
use crate::catalog;
use crate::errors::ByokError;
use crate::gucs;
use crate::postgres::session;
use crate::postgres::spi::Required;
use engine::{JobState, Step};

/// How a unit of a job's work runs and how the driver waits between units.
pub trait Runner {
    /// Runs one unit of work (its own transaction in a worker).
    fn unit<R>(&mut self, f: impl FnOnce() -> R) -> R;
    /// Waits up to `time`; false when the driver should stop (shutdown, deadline).
    fn wait(&mut self, time: Duration) -> bool;
}

/// Drives job `job` until it stops running (done, failed, cancelled, paused
/// with `stop_when_paused`) or the runner says stop. Returns the last state seen.
pub fn drive(
    job: i64,
    runner: &mut impl Runner,
    stop_when_paused: bool,
) -> Result<Option<JobState>, ByokError> {
    // Whether this run's start is marked (rate and ETA count from there); a
    // pause ends a run, and so does a crash (the next driver starts anew).
    let mut run_marked = false;
    loop {
        let state = runner.unit(|| engine::state_of(job))?;
        match state {
            Some(JobState::Pending) | Some(JobState::Running) if !run_marked => {
                runner.unit(|| engine::mark_run_start(job))?;
                run_marked = true;
            }
            Some(JobState::Running) => {
                let started = Instant::now();
                let batch = gucs::reencrypt_batch_size();
                match runner.unit(|| engine::step(job, batch))? {
                    Step::Rewrote(n) => {
                        let max_rate = gucs::reencrypt_max_rows_per_second();
                        if n > 0 && max_rate > 0 {
                            let due = Duration::from_secs_f64(n as f64 / f64::from(max_rate));
                            if let Some(rest) = due.checked_sub(started.elapsed())
                                && !runner.wait(rest)
                            {
                                return Ok(Some(JobState::Running));
                            }
                        }
                    }
                    // The last values are in rows other transactions hold locked:
                    // look again shortly (each look scans the column).
                    Step::WaitingForLockedRows => {
                        if !runner.wait(Duration::from_millis(500)) {
                            return Ok(Some(JobState::Running));
                        }
                    }
                    Step::ScanDone => return runner.unit(|| engine::finish(job)).map(Some),
                    Step::NotRunning => {}
                    Step::Failed(_) => return Ok(Some(JobState::Failed)),
                }
            }
            Some(JobState::Paused) => {
                run_marked = false;
                if stop_when_paused || !runner.wait(Duration::from_millis(200)) {
                    return Ok(state);
                }
            }
            Some(JobState::Pending) => unreachable!("handled above"),
            other => return Ok(other),
        }
    }
}

/// In the caller's transaction, until a deadline.
struct InTransaction {
    deadline: Instant,
}

impl Runner for InTransaction {
    fn unit<R>(&mut self, f: impl FnOnce() -> R) -> R {
        f()
    }

    fn wait(&mut self, time: Duration) -> bool {
        let now = Instant::now();
        if now >= self.deadline {
            return false;
        }
        sleep((self.deadline - now).min(time));
        true
    }
}

/// Runs `f` with a new snapshot, so it sees what other transactions committed
/// since the statement began (as each statement of a PL/pgSQL loop would).
fn with_fresh_snapshot<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: pushes and pops a snapshot around `f`; on an error the
    // (sub)transaction abort pops it.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let result = f();
    // SAFETY: the snapshot pushed above is the active one again.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// Sleeps interruptibly (a cancel or statement_timeout ends it with an error).
fn sleep(time: Duration) {
    // SAFETY: waits on the backend's own latch, then checks for interrupts.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            time.as_millis().max(1) as i64,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// Registers a `byok.encrypted` column for re-encryption jobs (see
/// `byok.protect_column`). The caller must be allowed to update the column; only
/// permanent ordinary or partitioned tables qualify (a view, a foreign or
/// temporary table, a system catalog is refused).
pub fn register_column(
    relid: pg_sys::Oid,
    column: &str,
    tenant_column: Option<&str>,
    context: &str,
) -> Result<(), ByokError> {
    // Checked with the caller's rights: registering lets jobs rewrite the column.
    let facts = ColumnFacts::read(relid, column, tenant_column)?;
    let attnum = facts.registrable(column, tenant_column)?;
    let name = facts.name;
    catalog::as_extension_owner(|| {
        // (on Citus the registry is the coordinator's: its jobs rewrite every shard)
        admin::require_primary("protect_column")?;
        crate::locks::lock_for_transaction(crate::locks::TableLock::ColumnRegistry)?;
        // A searchable column keeps a context of its own: never the empty one.
        let searchable = catalog::read_one::<bool>(
            "SELECT search_term_length IS NOT NULL FROM byok.protected_column_registry
              WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                AND column_name OPERATOR(pg_catalog.=) $2",
            &[DatumWithOid::from(relid), DatumWithOid::from(column)],
        )?
        .unwrap_or(false);
        if searchable && context.is_empty() {
            return Err(ByokError::WrongState {
                message: format!("column \"{column}\" of {name} is searchable: it keeps a context of its own"),
                detail: Some("values and probes find a column's term settings by its context; the empty context is every unnamed column's".into()),
                hint: None,
            });
        }
        check_context(relid, column, context, false)?;
        Spi::run_with_args(
            "INSERT INTO byok.protected_column_registry (relid, column_name, attnum, tenant_column, context)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5)
             ON CONFLICT (relid, column_name) DO UPDATE
                SET tenant_column = EXCLUDED.tenant_column, context = EXCLUDED.context, attnum = EXCLUDED.attnum",
            &[
                DatumWithOid::from(relid),
                DatumWithOid::from(column),
                DatumWithOid::from(attnum),
                DatumWithOid::from(tenant_column),
                DatumWithOid::from(context),
            ],
        )?;
        catalog::audit(
            "protect_column",
            None,
            None,
            true,
            None,
            Some(serde_json::json!({"table": name, "column": column, "context": context})),
        )
    })
}

/// Refuses `context` for `column` of `relid` when another registered column
/// uses it and either is (or, with `making_searchable`, becomes) searchable, or
/// its table has another owner. Term settings are found by context when a value
/// is sealed or probed, so a searchable column's context is its alone; and a
/// context is its owner's, so no one else can take it over (an empty context,
/// shared by columns without one, is exempt from the owner rule).
fn check_context(
    relid: pg_sys::Oid,
    column: &str,
    context: &str,
    making_searchable: bool,
) -> Result<(), ByokError> {
    let other = Spi::connect(|client| {
        let rows = client.select(
            "SELECT r.relid::pg_catalog.text OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) r.column_name,
                    r.search_term_length IS NOT NULL
                        OR EXISTS (SELECT 1 FROM byok.protected_column_registry s
                                    WHERE s.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                                      AND s.column_name OPERATOR(pg_catalog.=) $2
                                      AND s.search_term_length IS NOT NULL),
                    c.relowner OPERATOR(pg_catalog.<>) (SELECT t.relowner FROM pg_catalog.pg_class t
                                                          WHERE t.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid)
               FROM byok.protected_column_registry r
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid
              WHERE r.context OPERATOR(pg_catalog.=) $3
                AND NOT (r.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                         AND r.column_name OPERATOR(pg_catalog.=) $2)
              ORDER BY 2 DESC, 3 DESC LIMIT 1",
            Some(1),
            &[
                DatumWithOid::from(relid),
                DatumWithOid::from(column),
                DatumWithOid::from(context),
            ],
        )?;
        if rows.is_empty() {
            return Ok::<_, ByokError>(None);
        }
        let row = rows.first();
        Ok(Some((
            row.required::<String>(1)?,
            row.required::<bool>(2)?,
            row.required::<bool>(3)?,
        )))
    })?;
    let Some((other, searchable, other_owner)) = other else {
        return Ok(());
    };
    if searchable || making_searchable {
        return Err(ByokError::WrongState {
            message: format!(
                "context \"{context}\" is also registered for {other}: a searchable column's context must be its own"
            ),
            detail: Some("values and probes find their term settings by context".into()),
            hint: Some("give each searchable column its own context".into()),
        });
    }
    if other_owner && !context.is_empty() {
        return Err(ByokError::WrongState {
            message: format!(
                "context \"{context}\" is registered for {other}, a table of another owner"
            ),
            detail: Some("a context belongs to the owner of the columns registered with it".into()),
            hint: Some("use a context of your own (for example the table and column name)".into()),
        });
    }
    Ok(())
}

/// Makes a registered column searchable (`byok.make_searchable`): values
/// sealed with its context and `searchable => true` carry terms of
/// `term_length` bytes over the value normalized per `normalization`. The
/// caller must be allowed to update the column, as to register it. The
/// column's context must be its own ([`check_context`]).
pub fn make_searchable(
    relid: pg_sys::Oid,
    column: &str,
    term_length: i32,
    normalization: &str,
) -> Result<String, ByokError> {
    use byok_core::search::{MAX_TERM_LEN, MIN_TERM_LEN, Normalization};
    if !(MIN_TERM_LEN as i32..=MAX_TERM_LEN as i32).contains(&term_length) {
        return Err(ByokError::InvalidArgument {
            message: format!("term_length must be between {MIN_TERM_LEN} and {MAX_TERM_LEN} bytes, not {term_length}"),
            hint: Some("8 (the default) gives one false candidate in 2^64 values; shorter terms leak less and match more (see README, Searchable encryption)".into()),
        });
    }
    let normalization = Normalization::parse(normalization)
        .map_err(|problem| ByokError::InvalidArgument {
            message: format!("invalid normalization: {problem}"),
            hint: Some("for example 'exact', 'lowercase,trim' or 'nfkc,lowercase,trim'".into()),
        })?
        .spec();
    // Checked with the caller's rights, as registering is.
    let facts = ColumnFacts::read(relid, column, None)?;
    catalog::as_extension_owner(|| admin::require_primary("make_searchable"))?;
    facts.registrable(column, None)?;
    let name = facts.name;
    catalog::as_extension_owner(|| {
        // The lock first: the context read below must be the one checked and
        // kept (a concurrent protect_column could move the column meanwhile).
        crate::locks::lock_for_transaction(crate::locks::TableLock::ColumnRegistry)?;
        let context = catalog::read_one::<String>(
            "SELECT context FROM byok.protected_column_registry
              WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass AND column_name OPERATOR(pg_catalog.=) $2",
            &[DatumWithOid::from(relid), DatumWithOid::from(column)],
        )?
        .ok_or_else(|| ByokError::WrongState {
            message: format!("column \"{column}\" of {name} is not registered"),
            detail: None,
            hint: Some(format!("register it first: SELECT byok.protect_column('{name}', '{column}', tenant_column, context)")),
        })?;
        if context.is_empty() {
            return Err(ByokError::WrongState {
                message: format!("column \"{column}\" of {name} is registered without a context"),
                detail: Some("values and probes find a column's term settings by its context; the empty context is every unnamed column's".into()),
                hint: Some(format!("register it with a context of its own: SELECT byok.protect_column('{name}', '{column}', tenant_column, '<table>.<column>')")),
            });
        }
        check_context(relid, column, &context, true)?;
        refuse_settings_change(relid, column, &name, term_length, &normalization)?;
        if !byok_core::search::is_default_spec(term_length as usize, &normalization)
            && catalog::citus_partition_method(relid)?.is_some()
        {
            return Err(ByokError::CitusSearchSettings(name.clone()));
        }
        let updated = Spi::connect_mut(|client| {
            Ok::<_, ByokError>(client.update(
                "UPDATE byok.protected_column_registry SET search_term_length = $3, search_normalization = $4
                  WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                    AND column_name OPERATOR(pg_catalog.=) $2 AND context OPERATOR(pg_catalog.=) $5",
                None,
                &[
                    DatumWithOid::from(relid),
                    DatumWithOid::from(column),
                    DatumWithOid::from(term_length as i16),
                    DatumWithOid::from(normalization.as_str()),
                    DatumWithOid::from(context.as_str()),
                ],
            )?
            .len())
        })?;
        if updated != 1 {
            return Err(ByokError::WrongState {
                message: format!(
                    "the registration of column \"{column}\" of {name} changed meanwhile"
                ),
                detail: None,
                hint: Some("try again".into()),
            });
        }
        catalog::audit(
            "make_searchable",
            None,
            None,
            true,
            None,
            Some(
                serde_json::json!({"table": name, "column": column, "context": context,
                                    "term_length": term_length, "normalization": normalization}),
            ),
        )?;
        Ok(normalization.clone())
    })
}

/// Refuses to change the term settings of a searchable column that holds
/// values with terms: probes would use the new settings at once and miss every
/// row until all terms were rewritten.
fn refuse_settings_change(
    relid: pg_sys::Oid,
    column: &str,
    name: &str,
    term_length: i32,
    normalization: &str,
) -> Result<(), ByokError> {
    let current = Spi::connect(|client| {
        let rows = client.select(
            "SELECT search_term_length::pg_catalog.int4, search_normalization FROM byok.protected_column_registry
              WHERE relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass
                AND column_name OPERATOR(pg_catalog.=) $2 AND search_term_length IS NOT NULL",
            Some(1),
            &[DatumWithOid::from(relid), DatumWithOid::from(column)],
        )?;
        if rows.is_empty() {
            return Ok::<_, ByokError>(None);
        }
        let row = rows.first();
        Ok(Some((row.required::<i32>(1)?, row.required::<String>(2)?)))
    })?;
    let Some((length, spec)) = current else {
        return Ok(());
    };
    if length == term_length && spec == normalization {
        return Ok(());
    }
    let columns = crate::columns::registered_columns(Some(relid))?;
    let Some(target) = columns.iter().find(|c| c.column == column) else {
        return Ok(());
    };
    let with_terms = crate::columns::count_in(target, "byok.term($col) IS NOT NULL", &[])?;
    if with_terms > 0 {
        return Err(ByokError::WrongState {
            message: format!(
                "column \"{column}\" of {name} already holds {with_terms} value(s) with terms of {length} byte(s), normalization {spec}"
            ),
            detail: Some("lookups would use the new settings at once and miss those rows until every term is rewritten".into()),
            hint: Some("copy the values into a new searchable column (with its own context), or keep the settings".into()),
        });
    }
    Ok(())
}

/// What registering a column needs to know about it and its table.
struct ColumnFacts {
    kind: String,
    persistence: String,
    system: bool,
    attnum: Option<i16>,
    encrypted: bool,
    type_name: String,
    may_update: bool,
    tenant_column_exists: bool,
    name: String,
}

impl ColumnFacts {
    fn read(
        relid: pg_sys::Oid,
        column: &str,
        tenant_column: Option<&str>,
    ) -> Result<ColumnFacts, ByokError> {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT c.relkind::pg_catalog.text, c.relpersistence::pg_catalog.text,
                        c.oid OPERATOR(pg_catalog.<) 16384 OR n.nspname OPERATOR(pg_catalog.=) ANY ('{byok,pg_catalog,information_schema,pg_toast}'),
                        a.attnum, a.atttypid OPERATOR(pg_catalog.=) 'byok.encrypted'::pg_catalog.regtype,
                        pg_catalog.format_type(a.atttypid, a.atttypmod),
                        a.attnum IS NOT NULL AND pg_catalog.has_column_privilege(c.oid, a.attnum, 'UPDATE'),
                        $3::pg_catalog.name IS NULL OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute t
                            WHERE t.attrelid OPERATOR(pg_catalog.=) c.oid AND t.attname OPERATOR(pg_catalog.=) $3
                              AND t.attnum > 0 AND NOT t.attisdropped),
                        c.oid::pg_catalog.regclass::pg_catalog.text
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                   LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
                         AND a.attname OPERATOR(pg_catalog.=) $2 AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE c.oid OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[
                    DatumWithOid::from(relid),
                    DatumWithOid::from(column),
                    DatumWithOid::from(tenant_column),
                ],
            )?;
            if rows.is_empty() {
                return Err(ByokError::NotFound {
                    message: format!("relation with OID {} does not exist", u32::from(relid)),
                    hint: None,
                });
            }
            let row = rows.first();
            // Columns 4 to 6 come from a LEFT JOIN: NULL when the column does not exist.
            Ok(ColumnFacts {
                kind: row.required(1)?,
                persistence: row.required(2)?,
                system: row.required(3)?,
                attnum: row.get(4)?,
                encrypted: row.get(5)?.unwrap_or(false),
                type_name: row.get(6)?.unwrap_or_default(),
                may_update: row.required(7)?,
                tenant_column_exists: row.required(8)?,
                name: row.required(9)?,
            })
        })
    }

    /// The column's number if it may be registered; otherwise why not.
    fn registrable(&self, column: &str, tenant_column: Option<&str>) -> Result<i16, ByokError> {
        let name = &self.name;
        if self.system || !matches!(self.kind.as_str(), "r" | "p") || self.persistence != "p" {
            let what = match (self.kind.as_str(), self.persistence.as_str()) {
                _ if self.system => "a system or byok_pg catalog",
                (_, "t") => "a temporary table",
                (_, "u") => "an unlogged table",
                ("v", _) => "a view",
                ("m", _) => "a materialized view",
                ("f", _) => "a foreign table",
                _ => "not an ordinary table",
            };
            return Err(ByokError::WrongState {
                message: format!("{name} cannot be registered: it is {what}"),
                detail: Some(
                    "re-encryption jobs rewrite permanent ordinary and partitioned tables only"
                        .into(),
                ),
                hint: None,
            });
        }
        let Some(attnum) = self.attnum else {
            return Err(ByokError::UndefinedColumn(format!(
                "column \"{column}\" of {name} does not exist"
            )));
        };
        if !self.may_update {
            return Err(ByokError::NotAllowed {
                message: format!(
                    "permission denied: {} may not update column {column} of {name}",
                    session::role_name(session::current_user())
                ),
                detail: Some("re-encryption jobs rewrite registered columns; registering needs UPDATE on the column".into()),
                hint: None,
            });
        }
        if !self.encrypted {
            return Err(ByokError::WrongType {
                message: format!("column \"{column}\" of {name} is of type {}, not byok.encrypted", self.type_name),
                hint: "encrypt it first: ALTER TABLE ... ALTER COLUMN ... TYPE byok.encrypted USING byok.encrypt(...)".into(),
            });
        }
        if !self.tenant_column_exists {
            return Err(ByokError::UndefinedColumn(format!(
                "tenant column \"{}\" of {name} does not exist",
                tenant_column.unwrap_or_default()
            )));
        }
        Ok(attnum)
    }
}

/// Starts a job rewriting registered columns' values still under decrypt-only
/// keys (of `tenant_id`, or all tenants; in table `tbl`, or all); returns its id.
pub fn start(tenant_id: Option<&str>, tbl: Option<pg_sys::Oid>) -> Result<i64, ByokError> {
    admin::administer("reencrypt_start", tenant_id, None, || {
        catalog::as_extension_owner(|| {
            admin::require_primary("run a re-encryption job")?;
            if let Some(t) = tenant_id
                && catalog::load_tenant(t, false)?.is_none()
            {
                return Err(ByokError::UnknownTenant(t.to_string()));
            }
            Ok(())
        })?;
        // Counted as the tables' owners (outside the owner context).
        let total = engine::remaining(tenant_id, tbl)?;
        catalog::as_extension_owner(|| {
            let registered = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM byok.protected_column_registry r
                                 WHERE $1::pg_catalog.oid IS NULL OR r.relid OPERATOR(pg_catalog.=) $1::pg_catalog.oid)",
                &[DatumWithOid::from(tbl)],
            )?
            .unwrap_or(false);
            if !registered {
                return Err(ByokError::WrongState {
                    message: match tbl {
                        Some(t) => format!("no registered column in {}", relation_name(t)),
                        None => "no registered column".into(),
                    },
                    detail: None,
                    hint: Some("register columns with byok.protect_column(table, column)".into()),
                });
            }
            let job = Spi::get_one_with_args::<i64>(
                "INSERT INTO byok.reencrypt_jobs (tenant_id, relid, rows_total)
                 VALUES ($1, $2::pg_catalog.oid::pg_catalog.regclass, $3) RETURNING job_id",
                &[
                    DatumWithOid::from(tenant_id),
                    DatumWithOid::from(tbl),
                    DatumWithOid::from(total),
                ],
            )?
            .ok_or_else(|| ByokError::Internal("the job was not recorded".into()))?;
            catalog::audit(
                "reencrypt_start",
                tenant_id,
                None,
                true,
                None,
                Some(serde_json::json!({"job_id": job, "table": tbl.map(relation_name)})),
            )?;
            // The worker starts now and waits until this transaction commits.
            workers::launch_job(job, pg_sys::Oid::from(session::database()));
            Ok(job)
        })
    })
}

fn relation_name(relid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT $1::pg_catalog.oid::pg_catalog.regclass::pg_catalog.text",
        &[DatumWithOid::from(relid)],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| u32::from(relid).to_string())
}

/// Moves a job from one of `from` to `to`; returns the new state.
fn set_state(job: i64, from: &[JobState], to: JobState) -> Result<String, ByokError> {
    admin::administer("set_job_state", None, None, || {
        catalog::as_extension_owner(|| {
            let current = engine::load_job(job)?
                .ok_or_else(|| no_such_job(job))?
                .state;
            if current == to {
                return Ok(current.name().to_string());
            }
            if !from.contains(&current) {
                return Err(ByokError::WrongState {
                    message: format!(
                        "job {job} is {}; it cannot become {}",
                        current.name(),
                        to.name()
                    ),
                    detail: None,
                    hint: None,
                });
            }
            Spi::run_with_args(
                "UPDATE byok.reencrypt_jobs SET state = $2, updated_at = pg_catalog.now(),
                        finished_at = CASE WHEN $2 OPERATOR(pg_catalog.=) 'cancelled' THEN pg_catalog.now() END,
                        last_error = CASE WHEN $2 OPERATOR(pg_catalog.=) 'running' THEN NULL ELSE last_error END
                  WHERE job_id OPERATOR(pg_catalog.=) $1",
                &[DatumWithOid::from(job), DatumWithOid::from(to.name())],
            )?;
            catalog::audit(
                "set_job_state",
                None,
                None,
                true,
                None,
                Some(serde_json::json!({"job_id": job, "from": current.name(), "to": to.name()})),
            )?;
            if to == JobState::Running {
                workers::launch_job(job, pg_sys::Oid::from(session::database()));
            }
            Ok(to.name().to_string())
        })
    })
}

/// Pauses a pending or running job.
pub fn pause(job: i64) -> Result<String, ByokError> {
    set_state(
        job,
        &[JobState::Pending, JobState::Running],
        JobState::Paused,
    )
}

/// Resumes a paused or failed job.
pub fn resume(job: i64) -> Result<String, ByokError> {
    set_state(
        job,
        &[JobState::Paused, JobState::Failed],
        JobState::Running,
    )
}

/// Cancels a job that has not finished.
pub fn cancel(job: i64) -> Result<String, ByokError> {
    set_state(
        job,
        &[
            JobState::Pending,
            JobState::Running,
            JobState::Paused,
            JobState::Failed,
        ],
        JobState::Cancelled,
    )
}

/// Waits until job `job` is done, failed or cancelled, or `timeout` passes;
/// returns its state. In the transaction that started the job (no worker can
/// see it before that commits) it does the work itself, in that transaction.
pub fn wait(job: i64, timeout: Duration) -> Result<String, ByokError> {
    let deadline = Instant::now() + timeout;
    let started_here = catalog::as_extension_owner(|| {
        catalog::read_one::<bool>(
            "SELECT coalesce(created_xact OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id_if_assigned(), false)
               FROM byok.reencrypt_jobs WHERE job_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(job)],
        )
    })?
    .ok_or_else(|| no_such_job(job))?;
    if started_here {
        drive(job, &mut InTransaction { deadline }, true)?;
    }
    loop {
        let state =
            with_fresh_snapshot(|| engine::state_of(job))?.ok_or_else(|| no_such_job(job))?;
        if state.is_final() || Instant::now() >= deadline {
            return Ok(state.name().to_string());
        }
        sleep(Duration::from_millis(100).min(deadline - Instant::now()));
    }
}

fn no_such_job(job: i64) -> ByokError {
    ByokError::NotFound {
        message: format!("no re-encryption job {job}"),
        hint: None,
    }
}

/// One batch of job `job` in the caller's transaction, for diagnosis and tests;
/// says what the step did.
pub fn step_here(job: i64, batch: i32) -> Result<String, ByokError> {
    Ok(match engine::step(job, batch.max(1))? {
        Step::Rewrote(n) => format!("rewrote {n}"),
        Step::NotRunning => "not running".into(),
        Step::ScanDone => "scan done".into(),
        Step::WaitingForLockedRows => "waiting for locked rows".into(),
        Step::Failed(reason) => format!("failed: {reason}"),
    })
}
