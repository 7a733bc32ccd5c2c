//! `byok.launch_job`: starts the background worker of a re-encryption job (called
//! by `byok.start_reencrypt` and `byok.resume_job`).

use pgrx::prelude::*;

/// Starts a worker for the job in this database; false when no worker slot is
/// free right now (the scheduler starts it on its next visit).
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog)]
fn launch_job(job_id: i64) -> bool {
    super::require_primary("run a re-encryption job");
    crate::jobs::launch_job(job_id, unsafe { pg_sys::MyDatabaseId })
}
