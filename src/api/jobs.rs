//! Re-encryption jobs: registering columns, starting, steering and waiting
//! for jobs (`jobs`), and counting what a data key still seals (`columns`).

use std::time::Duration;

use pgrx::PgRelation;
use pgrx::prelude::*;

use crate::{admin, columns, jobs};

/// `byok.protect_column(tbl, col, tenant_col, context)`: registers a
/// `byok.encrypted` column for re-encryption jobs. The caller must be allowed
/// to update the column; only permanent ordinary or partitioned tables qualify
/// (a view, a foreign or temporary table, a system catalog is refused).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn protect_column(
    tbl: PgRelation,
    col: &str,
    tenant_col: default!(Option<&str>, "NULL"),
    context: default!(Option<&str>, "NULL"),
) {
    admin::administer("protect_column", None, None, || {
        jobs::register_column(tbl.oid(), col, tenant_col, context.unwrap_or(""))
    })
    .unwrap_or_else(|e| e.raise());
}

/// `byok.start_reencrypt(tenant_id, tbl)`: starts a job rewriting registered
/// columns' values still under decrypt-only keys; returns its id.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn start_reencrypt(
    tenant_id: default!(Option<&str>, "NULL"),
    tbl: default!(Option<PgRelation>, "NULL"),
) -> i64 {
    jobs::start(tenant_id, tbl.map(|t| t.oid())).unwrap_or_else(|e| e.raise())
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn pause_job(job_id: i64) -> String {
    jobs::pause(job_id).unwrap_or_else(|e| e.raise())
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn resume_job(job_id: i64) -> String {
    jobs::resume(job_id).unwrap_or_else(|e| e.raise())
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn cancel_job(job_id: i64) -> String {
    jobs::cancel(job_id).unwrap_or_else(|e| e.raise())
}

/// `byok.wait_job(job, timeout)`: for migrations. Waits until the job is done,
/// failed or cancelled (or the timeout) and returns its state. Called in the
/// transaction that started the job, it does the work itself.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn wait_job(job_id: i64, timeout: default!(pgrx::datum::Interval, "'1 hour'")) -> String {
    let timeout = Duration::from_micros(timeout.as_micros().max(0) as u64);
    jobs::wait(job_id, timeout).unwrap_or_else(|e| e.raise())
}

/// `byok.data_key_references(dek_id)`: how many values of registered columns
/// a data key seals (`destroy_data_key` refuses while it is above zero).
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn data_key_references(dek_id: i64) -> i64 {
    columns::data_key_references(dek_id).unwrap_or_else(|e| e.raise())
}

/// `byok.reencrypt_step(job, batch)`: one batch of a job in the caller's
/// transaction, for diagnosis and tests (superusers only; jobs are driven by
/// their worker or `wait_job`). Says what the step did.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn reencrypt_step(job_id: i64, batch: i32) -> String {
    jobs::step_here(job_id, batch).unwrap_or_else(|e| e.raise())
}

/// `byok.citus_reencrypt_shard(...)`: on the node holding shard `shard_id` of
/// Citus distributed table `tbl`, one batch of a re-encryption job on that
/// shard (the coordinator's job sends it; superusers only). Returns how many
/// values it rewrote (0 also when the shard is not on this node).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn citus_reencrypt_shard(
    tbl: pg_sys::Oid,
    shard_id: i64,
    column_name: &str,
    context: &str,
    tenant_id: Option<&str>,
    keys: Vec<i64>,
    batch: i32,
) -> i64 {
    jobs::citus::on_shard(tbl, shard_id, column_name, context, |column| {
        jobs::engine::sweep(column, tenant_id, &keys, batch)
    })
    .unwrap_or_else(|e| e.raise())
}

/// `byok.citus_unopened_in_shard(...)`: on the node holding the shard, how
/// many of its values (of the tenant's keys, or all) do not open: a job's
/// verification (superusers only).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn citus_unopened_in_shard(
    tbl: pg_sys::Oid,
    shard_id: i64,
    column_name: &str,
    context: &str,
    tenant_id: Option<&str>,
    keys: Vec<i64>,
) -> i64 {
    jobs::citus::on_shard(tbl, shard_id, column_name, context, |column| {
        jobs::engine::unopened(column, tenant_id, &keys)
    })
    .unwrap_or_else(|e| e.raise())
}
