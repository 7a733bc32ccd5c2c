//! Master-key rotation, as called by `CALL byok.rotate_master_key` (see
//! `admin::rotation`): one step per transaction, then the finish.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::admin::{self, AdminOp};

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_master_key_step(tenant_id: &str, new_key_id: &str, grace_period: Interval) -> i64 {
    admin::run_or_raise(AdminOp::RotateMasterKeyStep {
        tenant_id: tenant_id.to_string(),
        new_key_id: new_key_id.to_string(),
        grace_period: grace_period.to_string(),
    })
    .int()
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_master_key_finish(tenant_id: &str, new_key_id: &str) -> String {
    admin::run_or_raise(AdminOp::FinishMasterKeyRotation {
        tenant_id: tenant_id.to_string(),
        new_key_id: new_key_id.to_string(),
    })
    .text()
}
