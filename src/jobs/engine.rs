//! The re-encryption state machine: registered columns, one batch at a time,
//! checkpointed in the job row, verified at the end; and the counts that
//! depend on registered columns (`data_key_references`, a job's remaining rows).
//!
//! Every statement against a user table runs as that table's owner, inside a
//! security-restricted operation, with search_path pinned and row-level
//! security off (`postgres::security`): the owner's triggers, index
//! expressions and rules run with the owner's rights, never the extension's
//! (a forced row-level security policy makes the statement fail rather than
//! leave rows unseen). Only `byok.reencrypt` and `byok.value_opens` called by
//! those statements act for the job, for the job's tenants only
//! ([`keyring::JobScope`]).
//!
//! Job states: pending -> running -> (paused <-> running) -> verifying -> done;
//! running/paused/failed -> cancelled; a failed job resumes as running.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;
use crate::columns::{
    Column, as_table_owner, count_in, quote_ident, registered_columns, under_keys,
};
use crate::errors::ByokError;
use crate::jobs::citus;
use crate::postgres::spi::{NotNull, Required};

/// A job's state, as stored in `byok.reencrypt_jobs.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    Paused,
    Verifying,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Pending,
        JobState::Running,
        JobState::Paused,
        JobState::Verifying,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Verifying => "verifying",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn from_name(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.name() == name)
    }

    /// A state a job does not leave on its own.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Values rewritten in this batch (0: a column finished, or an empty range).
    Rewrote(i64),
    /// The job is not running (paused, cancelled, done, failed).
    NotRunning,
    /// Every column is scanned: verification and retiring come next.
    ScanDone,
    /// The only values left under old keys are in rows other transactions hold
    /// locked: try again shortly.
    WaitingForLockedRows,
    /// The batch failed: the job is now `failed`, with the reason recorded.
    Failed(String),
}

/// The decrypt-only keys of `tenant` (all tenants: `None`): data keys whose
/// values a job reseals, index keys whose terms it rewrites.
fn old_keys(tenant: Option<&str>) -> Result<Vec<i64>, ByokError> {
    catalog::read_one::<Vec<i64>>(
        "SELECT coalesce(pg_catalog.array_agg(dek_id), '{}') FROM byok.wrapped_data_keys
          WHERE state OPERATOR(pg_catalog.=) 'decrypt-only'
            AND ($1::pg_catalog.text IS NULL OR tenant_id OPERATOR(pg_catalog.=) $1)",
        &[DatumWithOid::from(tenant)],
    )?
    .not_null("data keys of the tenant")
}

/// How many values of a job's columns are still under old keys.
pub fn remaining(tenant: Option<&str>, relid: Option<pg_sys::Oid>) -> Result<i64, ByokError> {
    let (columns, keys) =
        catalog::as_extension_owner(|| Ok((registered_columns(relid)?, old_keys(tenant)?)))?;
    let condition = under_keys("$col", "$1")?;
    let mut total = 0;
    for column in &columns {
        total += count_in(column, &condition, &[DatumWithOid::from(keys.clone())])?;
    }
    Ok(total)
}

/// A job's row, as the engine needs it.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub state: JobState,
    pub tenant: Option<String>,
    pub relid: Option<pg_sys::Oid>,
    cursor_relid: Option<pg_sys::Oid>,
    cursor_column: Option<String>,
    cursor_page: i64,
    sweeping: bool,
    scan_done: bool,
    rows_done: i64,
}

/// The job's row, locked for update.
pub fn load_job(job: i64) -> Result<Option<JobRow>, ByokError> {
    Spi::connect_mut(|client| {
        let rows = client.update(
            "SELECT state, tenant_id, relid::pg_catalog.oid, cursor_relid::pg_catalog.oid,
                    cursor_column::pg_catalog.text, (cursor_ctid::pg_catalog.text::pg_catalog.point)[0]::bigint,
                    sweeping, scan_done, rows_done
               FROM byok.reencrypt_jobs WHERE job_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
            Some(1),
            &[DatumWithOid::from(job)],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = rows.first();
        let state: String = row.required(1)?;
        Ok(Some(JobRow {
            state: JobState::from_name(&state)
                .ok_or_else(|| ByokError::Catalog(format!("unknown job state \"{state}\"")))?,
            tenant: row.get(2)?,
            relid: row.get(3)?,
            cursor_relid: row.get(4)?,
            cursor_column: row.get(5)?,
            cursor_page: row.required::<i64>(6)?,
            sweeping: row.required::<bool>(7)?,
            scan_done: row.required::<bool>(8)?,
            rows_done: row.required::<i64>(9)?,
        }))
    })
}

fn run_sql(sql: &str, args: &[DatumWithOid]) -> Result<(), ByokError> {
    Spi::run_with_args(sql, args)?;
    Ok(())
}

/// Marks the job failed with `reason` and records it.
fn fail(job: i64, tenant: Option<&str>, reason: &str) -> Result<(), ByokError> {
    if let Some(shared) = crate::shmem::shared() {
        shared
            .jobs_failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    run_sql(
        "UPDATE byok.reencrypt_jobs SET state = 'failed', updated_at = pg_catalog.now(), last_error = $2
          WHERE job_id OPERATOR(pg_catalog.=) $1",
        &[DatumWithOid::from(job), DatumWithOid::from(reason)],
    )?;
    catalog::audit(
        "reencrypt_finish",
        tenant,
        None,
        false,
        Some(reason),
        Some(serde_json::json!({"job_id": job})),
    )
}

/// One batch of job `job`, in the caller's transaction. A failure of the batch
/// is rolled back (a subtransaction), recorded in the job (`failed`), and
/// reported as [`Step::Failed`], not raised.
pub fn step(job: i64, batch: i32) -> Result<Step, ByokError> {
    catalog::as_extension_owner(|| {
        let Some(row) = load_job(job)? else {
            return Ok(Step::NotRunning);
        };
        if row.state != JobState::Running {
            return Ok(Step::NotRunning);
        }
        if row.scan_done {
            return Ok(Step::ScanDone);
        }
        let keys = old_keys(row.tenant.as_deref())?;
        let columns = registered_columns(row.relid)?;
        // The current column, or the first one after it.
        let position = |c: &Column| (u32::from(c.relid), c.column.clone());
        let cursor = row
            .cursor_relid
            .map(|r| (u32::from(r), row.cursor_column.clone().unwrap_or_default()));
        let Some(column) = columns
            .iter()
            .find(|c| cursor.as_ref().is_none_or(|cur| position(c) >= *cur))
            .cloned()
        else {
            run_sql(
                "UPDATE byok.reencrypt_jobs SET scan_done = true WHERE job_id OPERATOR(pg_catalog.=) $1",
                &[DatumWithOid::from(job)],
            )?;
            return Ok(Step::ScanDone);
        };
        let same_column = cursor.as_ref() == Some(&position(&column));
        let (page, sweeping) = if same_column {
            (row.cursor_page, row.sweeping)
        } else {
            (0, false)
        };
        let outcome = crate::postgres::subxact::run(|| {
            if citus::is_distributed(&column)? {
                citus_batch(&column, row.tenant.as_deref(), &keys, batch)
            } else {
                batch_of(&column, row.tenant.as_deref(), &keys, page, sweeping, batch)
            }
        });
        record_batch(job, row.tenant.as_deref(), &columns, &column, page, outcome)
    })
}

/// Moves the job's checkpoint past what a batch did (or fails the job).
fn record_batch(
    job: i64,
    tenant: Option<&str>,
    columns: &[Column],
    column: &Column,
    page: i64,
    outcome: Result<Batch, crate::postgres::subxact::Failure>,
) -> Result<Step, ByokError> {
    let position = |c: &Column| (u32::from(c.relid), c.column.clone());
    match outcome {
        Err(failure) => {
            let reason = match failure.sqlstate() {
                Some(state) => format!(
                    "{}.{}: {} (SQLSTATE {state})",
                    column.table,
                    column.column,
                    failure.message()
                ),
                None => format!("{}.{}: {}", column.table, column.column, failure.summary()),
            };
            fail(job, tenant, &reason)?;
            Ok(Step::Failed(reason))
        }
        Ok(Batch::Range {
            rewritten,
            next_page,
        }) => {
            checkpoint(job, column, next_page, false, rewritten)?;
            Ok(Step::Rewrote(rewritten))
        }
        Ok(Batch::EndOfTable) => {
            checkpoint(job, column, page, true, 0)?;
            Ok(Step::Rewrote(0))
        }
        Ok(Batch::Swept(rewritten)) => {
            checkpoint(job, column, page, true, rewritten)?;
            Ok(Step::Rewrote(rewritten))
        }
        Ok(Batch::LockedRowsLeft) => {
            run_sql(
                "UPDATE byok.reencrypt_jobs SET updated_at = pg_catalog.now() WHERE job_id OPERATOR(pg_catalog.=) $1",
                &[DatumWithOid::from(job)],
            )?;
            Ok(Step::WaitingForLockedRows)
        }
        Ok(Batch::ColumnDone) => {
            // On to the next column, or the end of the scan.
            let next = columns.iter().find(|c| position(c) > position(column));
            run_sql(
                "UPDATE byok.reencrypt_jobs SET cursor_relid = $2::pg_catalog.oid::pg_catalog.regclass,
                        cursor_column = $3, cursor_ctid = '(0,0)', sweeping = false,
                        scan_done = $2 IS NULL, batches = batches + 1, updated_at = pg_catalog.now()
                  WHERE job_id OPERATOR(pg_catalog.=) $1",
                &[
                    DatumWithOid::from(job),
                    DatumWithOid::from(next.map(|c| c.relid)),
                    DatumWithOid::from(next.map(|c| c.column.as_str())),
                ],
            )?;
            Ok(Step::Rewrote(0))
        }
    }
}

fn checkpoint(
    job: i64,
    column: &Column,
    page: i64,
    sweeping: bool,
    rewritten: i64,
) -> Result<(), ByokError> {
    // (counted before the commit: a batch rolled back later is counted anyway,
    // which a rate of progress can afford)
    if let Some(shared) = crate::shmem::shared() {
        shared.job_rows_rewritten.fetch_add(
            rewritten.max(0) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    run_sql(
        "UPDATE byok.reencrypt_jobs SET cursor_relid = $2::pg_catalog.oid::pg_catalog.regclass,
                cursor_column = $3, cursor_ctid = pg_catalog.format('(%s,0)', $4)::pg_catalog.tid,
                sweeping = $5, rows_done = rows_done + $6, batches = batches + 1,
                updated_at = pg_catalog.now()
          WHERE job_id OPERATOR(pg_catalog.=) $1",
        &[
            DatumWithOid::from(job),
            DatumWithOid::from(column.relid),
            DatumWithOid::from(column.column.as_str()),
            DatumWithOid::from(page),
            DatumWithOid::from(sweeping),
            DatumWithOid::from(rewritten),
        ],
    )
}

enum Batch {
    /// A range of pages rewritten; the scan continues at `next_page`.
    Range { rewritten: i64, next_page: i64 },
    /// The scan reached the end of the table: the sweep comes next.
    EndOfTable,
    /// The sweep rewrote values that moved behind the scan.
    Swept(i64),
    /// The sweep found values under old keys only in locked rows.
    LockedRowsLeft,
    /// Nothing of this column is left under old keys.
    ColumnDone,
}

/// One batch on one column, as the table's owner. Its two halves (a range of
/// pages by TID, then a sweep of what moved behind the scan) share the sizing
/// and the statement shape, which reads best side by side.
fn batch_of(
    column: &Column,
    tenant: Option<&str>,
    keys: &[i64],
    page: i64,
    sweeping: bool,
    batch: i32,
) -> Result<Batch, ByokError> {
    let col = quote_ident(&column.column);
    let table = &column.table;
    if !sweeping {
        // A range of pages from the checkpoint (a TID range scan), sized to about
        // one batch of rows; only rows under old keys are rewritten (and locked).
        let (table_pages, per_page): (i64, f64) = Spi::connect(|client| {
            let row = client.select(
                "SELECT pg_catalog.pg_relation_size($1::pg_catalog.regclass) / pg_catalog.current_setting('block_size')::bigint,
                        CASE WHEN relpages > 0 AND reltuples > 0 THEN reltuples / relpages ELSE 50 END
                   FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[DatumWithOid::from(column.relid)],
            )?;
            let row = row.first();
            Ok::<_, ByokError>((row.required::<i64>(1)?, row.required::<f64>(2)?))
        })?;
        if page >= table_pages {
            return Ok(Batch::EndOfTable);
        }
        let pages = ((f64::from(batch.max(1)) / per_page.max(1.0)).ceil() as i64).max(1);
        let next_page = page + pages;
        let old = under_keys(&format!("t.{col}"), "$1")?;
        let sql = format!(
            "WITH rewritten AS (UPDATE {table} t SET {col} = byok.reencrypt(t.{col}, $2)
                                 WHERE t.ctid >= pg_catalog.format('(%s,0)', $3)::pg_catalog.tid
                                   AND t.ctid < pg_catalog.format('(%s,0)', $4)::pg_catalog.tid
                                   AND {old}
                                 RETURNING 1)
             SELECT count(*) FROM rewritten"
        );
        let rewritten = as_table_owner(column, Some(tenant), || {
            Spi::get_one_with_args::<i64>(
                &sql,
                &[
                    DatumWithOid::from(keys.to_vec()),
                    DatumWithOid::from(column.context.as_str()),
                    DatumWithOid::from(page),
                    DatumWithOid::from(next_page),
                ],
            )?
            .not_null("rows rewritten")
        })?;
        return Ok(Batch::Range {
            rewritten,
            next_page,
        });
    }
    // Stragglers: rows moved behind the cursor or locked when it passed.
    let rewritten = sweep(column, tenant, keys, batch)?;
    swept(column, keys, rewritten)
}

/// What a sweep that rewrote `rewritten` values leaves to do. When it rewrote
/// nothing, values still under old keys are in rows other transactions hold
/// locked (SKIP LOCKED passed them): wait for those rather than finish with
/// values under a key the job is to retire.
fn swept(column: &Column, keys: &[i64], rewritten: i64) -> Result<Batch, ByokError> {
    if rewritten > 0 {
        return Ok(Batch::Swept(rewritten));
    }
    let left = count_in(
        column,
        &under_keys("$col", "$1")?,
        &[DatumWithOid::from(keys.to_vec())],
    )?;
    Ok(if left > 0 {
        Batch::LockedRowsLeft
    } else {
        Batch::ColumnDone
    })
}

/// Rewrites at most `batch` values of `column` still under `keys` (rows that
/// other transactions hold locked are skipped), as the table's owner; returns
/// how many. The job's sweep, and a Citus shard's whole batch.
pub fn sweep(
    column: &Column,
    tenant: Option<&str>,
    keys: &[i64],
    batch: i32,
) -> Result<i64, ByokError> {
    let col = quote_ident(&column.column);
    let table = &column.table;
    let (old, old_t) = (
        under_keys(&col, "$1")?,
        under_keys(&format!("t.{col}"), "$1")?,
    );
    let sweep = format!(
        "WITH todo AS (SELECT ctid FROM {table} WHERE {old}
                        LIMIT $2 FOR UPDATE SKIP LOCKED),
              rewritten AS (UPDATE {table} t SET {col} = byok.reencrypt(t.{col}, $3) FROM todo
                             WHERE t.ctid OPERATOR(pg_catalog.=) todo.ctid
                               AND {old_t} RETURNING 1)
         SELECT count(*) FROM rewritten"
    );
    as_table_owner(column, Some(tenant), || {
        Spi::get_one_with_args::<i64>(
            &sweep,
            &[
                DatumWithOid::from(keys.to_vec()),
                DatumWithOid::from(i64::from(batch.max(1))),
                DatumWithOid::from(column.context.as_str()),
            ],
        )?
        .not_null("rows rewritten")
    })
}

/// One batch on a column of a Citus distributed table. Citus runs no
/// volatile function (`byok.reencrypt`) in an UPDATE of a distributed table,
/// so each shard is rewritten where it lives: every placement's node runs
/// [`sweep`] on its shard (`byok.citus_reencrypt_shard`, as the table's owner
/// there), all at once. Nothing is checkpointed by position: a value is
/// rewritten only while it is under an old key, so a batch repeated after a
/// crash finds nothing to do twice.
fn citus_batch(
    column: &Column,
    tenant: Option<&str>,
    keys: &[i64],
    batch: i32,
) -> Result<Batch, ByokError> {
    let rewritten = citus::on_every_shard(
        column,
        "SELECT byok.citus_reencrypt_shard(%L::pg_catalog.regclass, %s, %L, %L, %L, %L::pg_catalog.int8[], %s)",
        tenant,
        keys,
        Some(batch),
    )?;
    swept(column, keys, rewritten)
}

/// How many values of `column` (of `tenant`'s `keys`, or all) do not open
/// with its context, as the table's owner with the job's authority.
pub fn unopened(
    column: &Column,
    tenant: Option<&str>,
    keys_of_tenant: &[i64],
) -> Result<i64, ByokError> {
    as_table_owner(column, Some(tenant), || {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {col} IS NOT NULL
                AND ($2::pg_catalog.text IS NULL OR byok.data_key_id({col}) OPERATOR(pg_catalog.=) ANY ($3))
                AND NOT byok.value_opens({col}, $1)",
            column.table,
            col = quote_ident(&column.column)
        );
        catalog::read_one::<i64>(
            &sql,
            &[
                DatumWithOid::from(column.context.as_str()),
                DatumWithOid::from(tenant),
                DatumWithOid::from(keys_of_tenant.to_vec()),
            ],
        )?
        .not_null("values counted")
    })
}

/// The end of a job: every registered value of its scope must open (the
/// guide's "verify all data accessible"); then its old data keys that nothing
/// registered references any more become retired. Returns the final state.
pub fn finish(job: i64) -> Result<JobState, ByokError> {
    catalog::as_extension_owner(|| {
        let Some(row) = load_job(job)? else {
            return Err(ByokError::NotFound {
                message: format!("no re-encryption job {job}"),
                hint: None,
            });
        };
        if row.state != JobState::Running {
            return Ok(row.state);
        }
        run_sql(
            "UPDATE byok.reencrypt_jobs SET state = 'verifying', updated_at = pg_catalog.now()
              WHERE job_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(job)],
        )?;
        let tenant = row.tenant.as_deref();
        if let Some(reason) = verify_columns(&row)? {
            fail(job, tenant, &reason)?;
            return Ok(JobState::Failed);
        }
        let retired = retire_unreferenced_keys(tenant)?;
        run_sql(
            "UPDATE byok.reencrypt_jobs SET state = 'done', keys_retired = $2, finished_at = pg_catalog.now(),
                    updated_at = pg_catalog.now()
              WHERE job_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(job), DatumWithOid::from(retired)],
        )?;
        catalog::audit(
            "reencrypt_finish",
            tenant,
            None,
            true,
            None,
            Some(
                serde_json::json!({"job_id": job, "rows_done": row.rows_done, "keys_retired": retired}),
            ),
        )?;
        Ok(JobState::Done)
    })
}

/// Whether every value of the job's columns (of its tenant) opens; if one
/// does not, why not.
fn verify_columns(row: &JobRow) -> Result<Option<String>, ByokError> {
    let tenant = row.tenant.as_deref();
    let keys_of_tenant = tenant_keys(tenant)?;
    for column in registered_columns(row.relid)? {
        let verified = crate::postgres::subxact::run(|| {
            if citus::is_distributed(&column)? {
                citus::on_every_shard(
                    &column,
                    "SELECT byok.citus_unopened_in_shard(%L::pg_catalog.regclass, %s, %L, %L, %L, %L::pg_catalog.int8[])",
                    tenant,
                    &keys_of_tenant,
                    None,
                )
            } else {
                unopened(&column, tenant, &keys_of_tenant)
            }
        });
        let problem = match verified {
            Ok(0) => None,
            Ok(bad) => Some(format!(
                "verification: {bad} value(s) of {}.{} do not open",
                column.table, column.column
            )),
            Err(failure) => Some(format!(
                "verification of {}.{}: {}",
                column.table,
                column.column,
                failure.summary()
            )),
        };
        if problem.is_some() {
            return Ok(problem);
        }
    }
    Ok(None)
}

/// Retires the tenant's decrypt-only keys (data or index) no registered
/// column references any more (in any scope); returns how many.
fn retire_unreferenced_keys(tenant: Option<&str>) -> Result<i64, ByokError> {
    // Keys still referenced by any registered column (in any scope) stay decrypt-only.
    let mut referenced: Vec<i64> = Vec::new();
    for column in registered_columns(None)? {
        let col = quote_ident(&column.column);
        let index_keys = match crate::columns::search_installed()? {
            true => format!(
                " UNION SELECT byok.index_key_id({col}) FROM {}",
                column.table
            ),
            false => String::new(),
        };
        let sql = format!(
            "SELECT coalesce(pg_catalog.array_agg(DISTINCT id), '{{}}')
               FROM (SELECT byok.data_key_id({col}) FROM {}{index_keys}) AS used (id)",
            column.table,
        );
        let ids = as_table_owner(&column, None, || {
            catalog::read_one::<Vec<Option<i64>>>(&sql, &[])
        })?;
        referenced.extend(ids.not_null("data keys referenced")?.into_iter().flatten());
    }
    Spi::get_one_with_args::<i64>(
        "WITH retired AS (
             UPDATE byok.wrapped_data_keys SET state = 'retired'
              WHERE state OPERATOR(pg_catalog.=) 'decrypt-only'
                AND ($1::pg_catalog.text IS NULL OR tenant_id OPERATOR(pg_catalog.=) $1)
                AND NOT dek_id OPERATOR(pg_catalog.=) ANY ($2)
             RETURNING 1)
         SELECT count(*) FROM retired",
        &[DatumWithOid::from(tenant), DatumWithOid::from(referenced)],
    )?
    .not_null("data keys retired")
}

/// Every data key of `tenant` (values of other tenants in a shared column are
/// not this job's to verify).
fn tenant_keys(tenant: Option<&str>) -> Result<Vec<i64>, ByokError> {
    catalog::as_extension_owner(|| {
        catalog::read_one::<Vec<i64>>(
            "SELECT coalesce(pg_catalog.array_agg(dek_id), '{}') FROM byok.wrapped_data_keys
              WHERE $1::pg_catalog.text IS NULL OR tenant_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(tenant)],
        )?
        .not_null("data keys of the tenant")
    })
}

/// Marks the start of a run (rate and ETA count from here).
pub fn mark_run_start(job: i64) -> Result<(), ByokError> {
    catalog::as_extension_owner(|| {
        run_sql(
            "UPDATE byok.reencrypt_jobs SET state = 'running', started_at = coalesce(started_at, pg_catalog.now()),
                    run_started_at = pg_catalog.now(), run_rows_start = rows_done, updated_at = pg_catalog.now()
              WHERE job_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) ANY ('{pending,running}')",
            &[DatumWithOid::from(job)],
        )
    })
}

/// The job's state (without locking it).
pub fn state_of(job: i64) -> Result<Option<JobState>, ByokError> {
    catalog::as_extension_owner(|| {
        let name = catalog::read_one::<String>(
            "SELECT state FROM byok.reencrypt_jobs WHERE job_id OPERATOR(pg_catalog.=) $1",
            &[DatumWithOid::from(job)],
        )?;
        Ok(name.as_deref().and_then(JobState::from_name))
    })
}

/// Claims job `job` for this job worker, unless a live worker holds it: one
/// worker per job. The claim names this backend's pid and start time, so a
/// worker that died leaves a claim the next one may take.
pub fn claim_for_worker(job: i64) -> Result<bool, ByokError> {
    catalog::as_extension_owner(|| {
        Ok(Spi::get_one_with_args::<bool>(
            "WITH me AS (SELECT a.pid, a.backend_start FROM pg_catalog.pg_stat_activity a
                          WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid())
             UPDATE byok.reencrypt_jobs j
                SET worker_pid = me.pid, worker_started_at = me.backend_start
               FROM me
              WHERE j.job_id OPERATOR(pg_catalog.=) $1
                AND (j.worker_pid IS NULL
                     OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                     WHERE a.pid OPERATOR(pg_catalog.=) j.worker_pid
                                       AND a.backend_start OPERATOR(pg_catalog.=) j.worker_started_at))
             RETURNING true",
            &[DatumWithOid::from(job)],
        )?
        .unwrap_or(false))
    })
}

/// Gives up this worker's claim on job `job` (a worker that dies without
/// doing so leaves a claim that is free once its backend is gone).
pub fn release_worker_claim(job: i64) -> Result<(), ByokError> {
    catalog::as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE byok.reencrypt_jobs SET worker_pid = NULL, worker_started_at = NULL
              WHERE job_id OPERATOR(pg_catalog.=) $1
                AND worker_pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()",
            &[DatumWithOid::from(job)],
        )?;
        Ok(())
    })
}

/// Records a failure of the whole job that is not a batch's (it raised out of
/// the engine): used by the drivers.
pub fn record_failure(job: i64, reason: &str) -> Result<(), ByokError> {
    catalog::as_extension_owner(|| fail(job, None, reason))
}
