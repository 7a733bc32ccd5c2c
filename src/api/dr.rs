//! Disaster recovery (`admin::dr`): completing a tenant's key wraps,
//! activating or ending DR on its backup master key; and the key-compromise
//! response (`admin::compromise`) that `CALL byok.respond_to_compromise` drives.

use pgrx::prelude::*;

use crate::admin::{self, AdminOp};

/// One batch of `CALL byok.complete_key_wraps` (the procedure commits between batches).
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn complete_key_wraps_step(tenant_id: &str) -> i64 {
    admin::run_or_raise(AdminOp::CompleteKeyWrapsStep {
        tenant_id: tenant_id.to_string(),
    })
    .int()
}

/// The end of `CALL byok.complete_key_wraps`: how the tenant's keys are wrapped.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn complete_key_wraps_finish(tenant_id: &str) -> String {
    admin::run_or_raise(AdminOp::CompleteKeyWraps {
        tenant_id: tenant_id.to_string(),
    })
    .text()
}

/// `byok.activate_dr(tenant_id)`: the tenant's backup master key makes and
/// opens its data keys from now on; the primary is no longer asked.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn activate_dr(tenant_id: &str) -> String {
    admin::run_or_raise(AdminOp::ActivateDr {
        tenant_id: tenant_id.to_string(),
    })
    .text()
}

/// `byok.deactivate_dr(tenant_id)`: back to the primary master key, which
/// must answer again.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn deactivate_dr(tenant_id: &str) -> String {
    admin::run_or_raise(AdminOp::DeactivateDr {
        tenant_id: tenant_id.to_string(),
    })
    .text()
}

/// Starts a key-compromise response (under dual control: the operation a
/// second administrator approves). Returns its id; an unfinished response to
/// the same key is returned as is.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn start_compromise_response(tenant_id: &str, new_master_key: &str) -> i64 {
    admin::run_or_raise(AdminOp::StartCompromiseResponse {
        tenant_id: tenant_id.to_string(),
        new_master_key: new_master_key.to_string(),
    })
    .int()
}

/// One step of the response under way (the procedure commits between steps).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn compromise_response_step(
    tenant_id: Option<&str>,
    job_id: default!(Option<i64>, "NULL"),
) -> String {
    let Some(tenant_id) = tenant_id else {
        crate::errors::ByokError::NullArgument("tenant_id").raise()
    };
    admin::run_or_raise(AdminOp::CompromiseResponseStep {
        tenant_id: tenant_id.to_string(),
        job_id,
    })
    .text()
}
