//! Tenants and data keys: `byok.configure_tenant`, `byok.rotate_data_key`,
//! `byok.set_data_key_state`, `byok.destroy_data_key`, `byok.flush_cache`, and
//! `byok.backend_cache_stats` for observing this backend's key cache.
//!
//! Each builds an [`AdminOp`] and runs it on the one administrative path
//! (`admin::execute`): dual control, the extension owner's rights with a pinned
//! search_path, the standby check, the audit trail.

use pgrx::JsonB;
use pgrx::prelude::*;

use crate::admin::{self, AdminOp};
use crate::keyring;

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn configure_tenant(config: JsonB) -> String {
    admin::run_or_raise(AdminOp::ConfigureTenant { config: config.0 }).text()
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_data_key(tenant_id: &str) -> i64 {
    admin::run_or_raise(AdminOp::RotateDataKey {
        tenant_id: tenant_id.to_string(),
        reason: None,
    })
    .int()
}

#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn set_data_key_state(dek_id: i64, state: &str) -> String {
    let tenant_id = admin::tenant_of_data_key(dek_id, "set_data_key_state");
    admin::run_or_raise(AdminOp::SetDataKeyState {
        tenant_id,
        dek_id,
        state: state.to_string(),
    })
    .text()
}

/// Destroys a data key that is no longer active; `confirm` repeats its id.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn destroy_data_key(dek_id: i64, confirm: i64) -> String {
    if confirm != dek_id {
        admin::refuse(
            "destroy_data_key",
            None,
            Some(dek_id),
            crate::errors::ByokError::InvalidArgument {
                message: "destroy_data_key: confirm must repeat the data key id".into(),
                hint: Some(format!("SELECT byok.destroy_data_key({dek_id}, {dek_id})")),
            },
        );
    }
    let tenant_id = admin::tenant_of_data_key(dek_id, "destroy_data_key");
    admin::run_or_raise(AdminOp::DestroyDataKey { tenant_id, dek_id }).text()
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn flush_cache(tenant_id: default!(Option<&str>, "NULL")) -> i64 {
    admin::run_or_raise(AdminOp::FlushCache {
        tenant_id: tenant_id.map(str::to_string),
    })
    .int()
}

/// This backend's data-key cache: how many keys are ready and how lookups went.
#[pg_extern(volatile, parallel_restricted)]
fn backend_cache_stats() -> TableIterator<
    'static,
    (
        name!(cached_keys, i64),
        name!(hits, i64),
        name!(misses, i64),
        name!(expirations, i64),
        name!(evictions, i64),
        name!(invalidations, i64),
    ),
> {
    let (len, s) = keyring::stats();
    TableIterator::once((
        len as i64,
        s.hits as i64,
        s.misses as i64,
        s.expirations as i64,
        s.evictions as i64,
        s.invalidations as i64,
    ))
}
